"""DeepSpeed ZeRO-2 and ZeRO-3 (accelerate's `distributed_type: DEEPSPEED`) in two processes, here on the CPU over
gloo with DeepSpeed's CPU accelerator. The trainer must take the same optimizer steps as one process
accumulating the same micro-batches, write the LoRA / full weights gathered from the partitions, resume from its
own checkpoints (DeepSpeed's master weights and optimizer partitions included), and refuse what it cannot do.

The runs get the environment `accelerate launch --config_file` sets for the shipped configs. accelerate joins
CPU processes into a DeepSpeed group only when it is not told to run on the CPU and is given a backend, so the
prelude below makes the trainer's Accelerator do that; everything after (DeepSpeed's engine, its ZeRO optimizer,
partitioning, clipping, its checkpoints) is accelerate's and DeepSpeed's own code."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffsynth_training_toy import DISTRIBUTED_SETTINGS, assert_same_tensors, run_two_processes, train_one_process
from safetensors.torch import load_file

from diffsynth.runtime.errors import ConfigError
from diffsynth.training.distributed import accelerate_config, check_mode, configure_deepspeed

CPU_DEEPSPEED = """
import accelerate
import deepspeed.ops
from accelerate.utils import InitProcessGroupKwargs

# DeepSpeed's CPU backend would JIT-compile its shared-memory all-reduce (about 50 s of a 2-core machine on
# each fresh one); gloo's all-reduce gives the same sums here, and GPUs use NCCL
deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

class CpuDeepSpeedAccelerator(accelerate.Accelerator):
    def __init__(self, *args, cpu=False, kwargs_handlers=(), **kwargs):
        handlers = [*kwargs_handlers, InitProcessGroupKwargs(backend="gloo")]
        super().__init__(*args, cpu=False, kwargs_handlers=handlers, **kwargs)

accelerate.Accelerator = CpuDeepSpeedAccelerator
"""


def launch_environment(config: str) -> dict[str, str]:
    """What `accelerate launch --config_file <shipped config>` puts in the environment of the processes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    args = launch_command_parser().parse_args(
        ["--config_file", str(accelerate_config(config)), "-m", "diffsynth.training.cli"]
    )
    args, defaults, _ = _validate_launch_command(args)
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as launch_command does
    _, env = prepare_deepspeed_cmd_env(args)
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
    return {k: v for k, v in env.items() if k.startswith("ACCELERATE_") and k != "ACCELERATE_MIXED_PRECISION"}


def train_deepspeed(tmp_path: Path, dataset: Path, output: str, config: str, **overrides) -> Path:
    settings = {**DISTRIBUTED_SETTINGS, "dataset_base_path": dataset, "output_path": tmp_path / output, **overrides}
    done = run_two_processes(tmp_path, settings, prelude=CPU_DEEPSPEED, env=launch_environment(config))
    stage = config.removeprefix("deepspeed_zero")
    assert f"DeepSpeed ZeRO stage {stage}" in done.stderr
    return tmp_path / output


@pytest.mark.parametrize("stage", [2, 3])
def test_lora_matches_one_process_and_resumes(tmp_path, dataset, stage):
    pytest.importorskip("deepspeed")
    schedule = dict(lr_scheduler="cosine", lr_warmup_steps=1)  # DeepSpeed steps the optimizer the schedule sets
    one = train_one_process(tmp_path, dataset, **schedule)
    config = f"deepspeed_zero{stage}"
    zero = train_deepspeed(tmp_path, dataset, "zero", config, save_steps=1, **schedule)

    # the exported LoRA and the checkpoint's trained weights: the same steps as one process (clipping at 1.0 and
    # the LR schedule included), not one process's half of the data
    assert_same_tensors(
        load_file(str(one / "step-000003.safetensors")), load_file(str(zero / "step-000003.safetensors"))
    )
    final = load_file(str(zero / "checkpoints" / "step-000003" / "trainable.safetensors"))
    assert max(v.abs().max().item() for k, v in final.items() if "lora_B" in k) > 1e-4  # B starts at zero
    assert (zero / "checkpoints" / "step-000003" / "deepspeed").is_dir()

    # resuming at step 2 (DeepSpeed's master weights and Adam partitions, the schedule, the data position)
    resumed = train_deepspeed(
        tmp_path, dataset, "resumed", config, resume=zero / "checkpoints" / "step-000002", **schedule
    )
    assert_same_tensors(final, load_file(str(resumed / "checkpoints" / "step-000003" / "trainable.safetensors")))

    # DeepSpeed's optimizer files only fit a DeepSpeed run: one process refuses them by name
    with pytest.raises(ConfigError, match=f"written under DeepSpeed ZeRO-{stage} by 2 processes, resumed without"):
        train_one_process(tmp_path, dataset, resume=str(zero / "checkpoints" / "step-000002"))


def test_zero3_full_fine_tuning_accumulates_writes_the_gathered_model_validates_and_resumes(tmp_path, dataset):
    pytest.importorskip("deepspeed")
    import numpy as np
    from PIL import Image

    # 2 processes x 2 accumulated micro-batches against one process accumulating 4, over two epochs, with
    # gradient checkpointing (recomputing a block whose weights ZeRO-3 gathers again)
    settings = dict(
        max_steps=2, num_epochs=2, learning_rate=1e-3, max_grad_norm=0.05, use_gradient_checkpointing=True,
    )  # fmt: skip
    one = train_one_process(
        tmp_path, dataset, 4, trainable_models=["denoiser"], validation_prompts=["a red circle"], validation_steps=2,
        **settings,
    )  # fmt: skip
    full = dict(trainable_models="denoiser", gradient_accumulation_steps=2, **settings)
    validation = dict(validation_prompts="a red circle", validation_steps=2)  # not the resumed run's: it samples none
    zero3 = train_deepspeed(tmp_path, dataset, "zero3", "deepspeed_zero3", save_steps=1, **validation, **full)
    name = "step-000002/denoiser/diffusion_pytorch_model.safetensors"
    final = load_file(str(zero3 / name))
    assert_same_tensors(load_file(str(one / name)), final)
    # the partitioned model samples (every process runs the forward, the first writes) what one process samples
    picture = "validation/step-000002-0.png"
    a, b = (np.asarray(Image.open(folder / picture), dtype=np.int16) for folder in (one, zero3))
    assert a.shape == b.shape and np.abs(a - b).max() <= 1  # rounding to 8 bits may flip on a 1e-6 difference

    # resuming the partitioned run after its first step (epoch 0) ends with the same model
    resumed = train_deepspeed(
        tmp_path, dataset, "resumed", "deepspeed_zero3", resume=zero3 / "checkpoints" / "step-000001", **full
    )
    assert_same_tensors(final, load_file(str(resumed / name)))


def test_bf16_mixed_precision_trains_what_float32_trains(tmp_path, dataset):
    """`--mixed_precision bf16`: DeepSpeed casts the partitioned denoiser (its LoRA too) to bf16 and keeps fp32
    master weights; three steps end within bf16 round-off of one float32 process, and validation draws with
    the bf16 model."""
    pytest.importorskip("deepspeed")
    one = load_file(str(train_one_process(tmp_path, dataset) / "step-000003.safetensors"))
    bf16 = train_deepspeed(tmp_path, dataset, "bf16", "deepspeed_zero3", mixed_precision="bf16",
                           validation_prompts="a red circle")  # fmt: skip
    mixed = load_file(str(bf16 / "step-000003.safetensors"))
    assert mixed.keys() == one.keys() and all(v.dtype == torch.bfloat16 for v in mixed.values())
    for key in one:  # Adam moved each lora_B by about 0.03 from zero; bf16 keeps ~3 significant digits
        torch.testing.assert_close(mixed[key].float(), one[key], rtol=0, atol=4e-3, msg=key)
    assert max(v.abs().max().item() for k, v in one.items() if "lora_B" in k) > 1e-2
    assert (bf16 / "validation" / "step-000003-0.png").is_file()


def _deepspeed_accelerator(zero: dict, processes: int = 2, **config) -> SimpleNamespace:
    plugin = SimpleNamespace(deepspeed_config={"zero_optimization": zero, **config})
    return SimpleNamespace(
        distributed_type="DistributedType.DEEPSPEED",
        state=SimpleNamespace(deepspeed_plugin=plugin),
        num_processes=processes,
    )


def test_cpu_offload_in_the_deepspeed_config_is_refused_by_name():
    offload = {"stage": 3, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "none"}}
    with pytest.raises(ConfigError, match="offload_optimizer_device cpu"):
        check_mode(_deepspeed_accelerator(offload))
    check_mode(_deepspeed_accelerator({"stage": 2, "offload_optimizer": {"device": "none"}}))


def test_the_trainer_flags_set_deepspeed_batch_accumulation_and_clipping(caplog):
    acc = _deepspeed_accelerator({"stage": 2}, 4, gradient_accumulation_steps=1, train_micro_batch_size_per_gpu="auto")
    cfg = SimpleNamespace(batch_size=2, gradient_accumulation_steps=3, max_grad_norm=0.5)
    with caplog.at_level("WARNING"):
        configure_deepspeed(acc, cfg)
    config = acc.state.deepspeed_plugin.deepspeed_config
    assert config["train_micro_batch_size_per_gpu"] == 2 and config["gradient_accumulation_steps"] == 3
    assert config["train_batch_size"] == 2 * 3 * 4 and config["gradient_clipping"] == 0.5
    assert "gradient_accumulation_steps 1 overruled by the trainer's flags: 3" in caplog.text
