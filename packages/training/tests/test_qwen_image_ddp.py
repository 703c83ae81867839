"""Qwen-Image trained by two processes (DDP, and DeepSpeed ZeRO-3; CPU, gloo) on the tiny repo of the qwen-image tests equals one process
accumulating the same two micro-batches. Qwen-Image's per-step call reads `dit.config.patch_size`, which DDP's
wrapper does not pass through: the trainer must hand the family the model's attributes and DDP's forward. And
the last block's text-stream outputs feed nothing, so their LoRAs get no gradient: the task tells DDP so
(`ddp_find_unused_parameters`) without a flag from the user. Under ZeRO-3, accelerate registers its DeepSpeed
config with transformers, which would build the text encoder for partitioning: the trainer loads it whole.

Integration: needs diffsynth-qwen-image installed (the `integration` nox session installs every package).
"""

import shutil
from pathlib import Path

import pytest

pytest.importorskip("diffsynth.qwen_image")

from diffsynth_training_toy import assert_same_tensors, run_two_processes  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from diffsynth.training.testing import (  # noqa: E402
    TINY_SETTINGS,
    load_module,
    tiny_config,  # noqa: E402
    write_caption_dataset,
)
from diffsynth.training.trainer import train  # noqa: E402

pytestmark = pytest.mark.integration

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow star"]


@pytest.mark.parametrize("mode", ["ddp", "deepspeed_zero3"])
def test_two_processes_equal_one_process_accumulating_two_micro_batches(tmp_path, mode):
    qwen_tests = load_module(Path(__file__).parents[2] / "qwen-image" / "tests" / "conftest.py", "qwen_tiny_repo")
    repo = qwen_tests.build_tiny_repo(tmp_path / "repo")
    shutil.rmtree(Path(repo) / "processor")  # Qwen/Qwen-Image's layout: an Edit `processor/` makes an Edit task
    dataset = write_caption_dataset(tmp_path / "data", PROMPTS)
    # no weight decay: DeepSpeed gives the unused weights zero gradients where torch's AdamW skips them, and only
    # decay would tell those apart
    settings = dict(batch_size=1, max_steps=2, save_steps=2, weight_decay=0.0)

    train(tiny_config(repo, "qwen_image", dataset, tmp_path / "one", gradient_accumulation_steps=2, **settings))
    flags = {**TINY_SETTINGS, **settings, "model": repo, "family": "qwen_image", "dataset_base_path": dataset}
    if mode == "ddp":
        run_two_processes(tmp_path, {**flags, "output_path": tmp_path / "ddp"})
    else:
        pytest.importorskip("deepspeed")
        deepspeed = load_module(Path(__file__).with_name("test_deepspeed.py"), "deepspeed_launch")
        env = deepspeed.launch_environment(mode)
        run_two_processes(
            tmp_path, {**flags, "output_path": tmp_path / "ddp"}, prelude=deepspeed.CPU_DEEPSPEED, env=env
        )

    one, ddp = (load_file(str(tmp_path / name / "step-000002.safetensors")) for name in ("one", "ddp"))
    assert max(v.abs().max().item() for k, v in one.items() if "lora_B" in k) > 1e-4  # it trained
    assert_same_tensors(one, ddp)
