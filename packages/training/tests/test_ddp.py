"""Multi-process training (accelerate DDP, here two CPU processes over gloo) takes the same optimizer steps as
one process accumulating the same micro-batches: process r trains batch `k * world + r` of the epoch's plan
with that batch's own noise, and DDP averages the gradients the way accumulation does."""

from __future__ import annotations

from pathlib import Path

import torch
from diffsynth_training_toy import DISTRIBUTED_SETTINGS, run_two_processes
from safetensors.torch import load_file

from diffsynth.training.config import TrainConfig
from diffsynth.training.trainer import train


def final_weights(output: Path) -> dict[str, torch.Tensor]:
    return load_file(str(output / "checkpoints" / "step-000003" / "trainable.safetensors"))


def test_two_processes_equal_one_process_accumulating_two_micro_batches(tmp_path, dataset):
    train(TrainConfig(**DISTRIBUTED_SETTINGS, dataset_base_path=str(dataset), output_path=str(tmp_path / "one"),
                      gradient_accumulation_steps=2))  # fmt: skip
    run_two_processes(tmp_path, {**DISTRIBUTED_SETTINGS, "dataset_base_path": dataset, "output_path": tmp_path / "ddp"})

    one, ddp = final_weights(tmp_path / "one"), final_weights(tmp_path / "ddp")
    assert one.keys() == ddp.keys() and len(one) > 0
    assert max(v.abs().max().item() for k, v in one.items() if "lora_B" in k) > 1e-4  # B starts at zero: it trained
    for key in one:
        torch.testing.assert_close(ddp[key], one[key], rtol=1e-5, atol=1e-6, msg=key)
