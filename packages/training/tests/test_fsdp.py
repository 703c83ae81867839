"""FSDP2 (accelerate's `fsdp_version: 2`): the denoiser's weights, gradients and optimizer state sharded over two
processes, here on the CPU over gloo. The trainer must take the same optimizer steps as one process
accumulating the same micro-batches, write the LoRA / full weights gathered from the shards, and resume from its
own checkpoints.

The runs get the environment `accelerate launch --config_file` sets for the shipped configs. accelerate selects
FSDP only for GPU processes, so the prelude below switches the CPU run's accelerator state to FSDP2 with the
plugin that environment configures; everything after that (the blocks sharded by `fully_shard`, the optimizer
over the sharded parameters, gradient reduction) is accelerate's and torch's own FSDP2 code."""

from __future__ import annotations

from pathlib import Path

from diffsynth_training_toy import DISTRIBUTED_SETTINGS, assert_same_tensors, run_two_processes, train_one_process
from safetensors.torch import load_file

from diffsynth.training.distributed import accelerate_config

CPU_FSDP2 = """
import accelerate
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

class CpuFsdp2Accelerator(accelerate.Accelerator):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # read from the FSDP_* variables
        self.state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # what AcceleratorState() rereads

accelerate.Accelerator = CpuFsdp2Accelerator
"""


def launch_environment(config: str) -> dict[str, str]:
    """What `accelerate launch --config_file <shipped config>` puts in the environment of the processes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(
        ["--config_file", str(accelerate_config(config)), "-m", "diffsynth.training.cli"]
    )
    args, _, _ = _validate_launch_command(args)
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    return {k: v for k, v in env.items() if k.startswith(("FSDP_", "ACCELERATE_USE_FSDP"))}


def train_sharded(tmp_path: Path, dataset: Path, output: str, config: str = "fsdp2", **overrides) -> Path:
    settings = {**DISTRIBUTED_SETTINGS, "dataset_base_path": dataset, "output_path": tmp_path / output, **overrides}
    done = run_two_processes(tmp_path, settings, prelude=CPU_FSDP2, env=launch_environment(config))
    assert "FSDP: one group per Sequential" in done.stderr  # the toy's declared block became its own group
    return tmp_path / output


def test_fsdp2_lora_matches_one_process_and_resumes(tmp_path, dataset):
    one = train_one_process(tmp_path, dataset)
    sharded = train_sharded(tmp_path, dataset, "fsdp", save_steps=1)

    # the exported LoRA and the checkpoint's trained weights are gathered from both shards
    assert_same_tensors(
        load_file(str(one / "step-000003.safetensors")), load_file(str(sharded / "step-000003.safetensors"))
    )
    final = load_file(str(sharded / "checkpoints" / "step-000003" / "trainable.safetensors"))
    assert_same_tensors(load_file(str(one / "checkpoints" / "step-000003" / "trainable.safetensors")), final)
    assert max(v.abs().max().item() for k, v in final.items() if "lora_B" in k) > 1e-4  # B starts at zero

    # resuming the sharded run at step 2 (weights, Adam moments, schedule, data position) ends where it ended
    resumed = train_sharded(tmp_path, dataset, "resumed", resume=sharded / "checkpoints" / "step-000002")
    assert_same_tensors(final, load_file(str(resumed / "checkpoints" / "step-000003" / "trainable.safetensors")))


def test_fsdp2_shard_grad_op_full_fine_tuning_writes_the_gathered_model_and_validates(tmp_path, dataset):
    import numpy as np
    from PIL import Image

    settings = dict(max_steps=2, learning_rate=1e-3, validation_steps=2)
    one = train_one_process(
        tmp_path, dataset, trainable_models=["denoiser"], validation_prompts=["a red circle"], **settings
    )
    sharded = train_sharded(
        tmp_path, dataset, "fsdp", "fsdp2_shard_grad_op", trainable_models="denoiser",
        validation_prompts="a red circle", **settings,
    )  # fmt: skip
    name = "step-000002/denoiser/diffusion_pytorch_model.safetensors"
    assert_same_tensors(load_file(str(one / name)), load_file(str(sharded / name)))
    # the sharded model samples (every process runs the forward, the first writes) what one process samples
    picture = "validation/step-000002-0.png"
    a, b = (np.asarray(Image.open(folder / picture), dtype=np.int16) for folder in (one, sharded))
    assert a.shape == b.shape and np.abs(a - b).max() <= 1  # rounding to 8 bits may flip on a 1e-6 difference
