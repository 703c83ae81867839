"""The frozen teacher of the distillation tasks (`--task dmd2`, `--task trajectory_imitation`): its guided
velocity, and the rows encoded with the negative prompt that its CFG branch reads. The teacher is either a frozen
copy of the denoiser or, for a LoRA student whose start is its base, the student itself with its LoRA switched off
(no second copy in memory)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


@contextlib.contextmanager
def lora_disabled(module: nn.Module) -> Iterator[None]:
    """The peft LoRA layers of `module` switched off (the base alone runs), then back on."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def negative_rows_batch(
    run, items: list[dict], prompt: str, scale: float, positive: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """The batch's rows encoded again with `prompt` in place of their prompts (the teacher's unconditional
    branch), on the device, with the random choices drawn for the `positive` batch (the task's `batch_choices`
    keys); None when the teacher runs without CFG (`scale` 1)."""
    from .trainer import prepare_batch

    if scale == 1:
        return None
    negative = prepare_batch(run, [{**item, "prompt": prompt} for item in items])
    drawn = {key: positive[key] for key in getattr(run.task, "batch_choices", ()) if key in (positive or {})}
    return {**negative, **drawn}


def guided_velocity(
    task, teacher: nn.Module | None, student: nn.Module, batch, negative, noisy, sigma, scale: float
) -> torch.Tensor:
    """The teacher's velocity (float32, no gradients) with CFG: `uncond + scale (cond - uncond)`, the
    unconditional branch on `negative`; just `cond` without a negative batch or at scale 1. `teacher` None: the
    student's base, its LoRA switched off."""
    model = teacher if teacher is not None else student
    off = lora_disabled(student) if teacher is None else contextlib.nullcontext()
    with torch.no_grad(), off:
        cond = task.velocity(model, batch, noisy, sigma).float()
        if negative is None or scale == 1:
            return cond
        uncond = task.velocity(model, negative, noisy, sigma).float()
    return uncond + scale * (cond - uncond)


__all__ = ["guided_velocity", "lora_disabled", "negative_rows_batch"]
