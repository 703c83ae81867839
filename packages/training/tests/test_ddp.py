"""Multi-process training (accelerate DDP, here two CPU processes over gloo) takes the same optimizer steps as
one process accumulating the same micro-batches: process r trains batch `k * world + r` of the epoch's plan
with that batch's own noise, and DDP averages the gradients the way accumulation does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffsynth_training_toy import DISTRIBUTED_SETTINGS, assert_same_tensors, run_two_processes, train_one_process
from safetensors.torch import load_file


def final_weights(output: Path) -> dict[str, torch.Tensor]:
    return load_file(str(output / "checkpoints" / "step-000003" / "trainable.safetensors"))


def test_two_processes_equal_one_process_accumulating_two_micro_batches(tmp_path, dataset):
    train_one_process(tmp_path, dataset, accumulation=2)
    run_two_processes(tmp_path, {**DISTRIBUTED_SETTINGS, "dataset_base_path": dataset, "output_path": tmp_path / "ddp"})

    one, ddp = final_weights(tmp_path / "one"), final_weights(tmp_path / "ddp")
    assert max(v.abs().max().item() for k, v in one.items() if "lora_B" in k) > 1e-4  # B starts at zero: it trained
    assert_same_tensors(one, ddp)


@pytest.mark.parametrize(
    "dropout",
    [
        {"lora_type": "loha", "module_dropout": 0.5},
        # one layer, mostly dropped: some micro-batches hold no trained weight at all in one process
        {"lora_type": "lokr", "module_dropout": 0.7, "lora_target_modules": ["proj_out"]},
    ],
    ids=["some_layers", "every_layer"],
)
def test_module_dropout_trains_under_ddp_as_one_process_does(tmp_path, dataset, dropout):
    """A LoHa layer `--module_dropout` leaves out gets no gradient in that process: DDP is told to expect unused
    parameters, and the dropout draws follow the micro-batch, so two processes equal one accumulating two (also
    when a process's micro-batch leaves out every layer: its zero gradients keep DDP in step)."""
    train_one_process(tmp_path, dataset, accumulation=2, **dropout)
    flags = {k: ",".join(v) if isinstance(v, list) else v for k, v in dropout.items()}
    settings = {**DISTRIBUTED_SETTINGS, "dataset_base_path": dataset, "output_path": tmp_path / "ddp", **flags}
    run_two_processes(tmp_path, settings)
    assert_same_tensors(final_weights(tmp_path / "one"), final_weights(tmp_path / "ddp"))
