"""`--task trajectory_imitation` (DiffSynth-Studio's, its Z-Image-Turbo recipe): a few-step student learns to
follow a many-step teacher's sampling trajectory.

Each micro-batch: from noise, the frozen teacher samples in `--trajectory_teacher_steps` Euler steps with CFG
(`--trajectory_teacher_cfg_scale` against `--trajectory_negative_prompt`) on the family's inference schedule, the
student's `--trajectory_student_steps` sigmas placed on that grid; then at each student sigma the student, put on the
teacher's latent there, predicts (without CFG) the velocity of one big step: the straight line from that latent to
the teacher's latent at the next student sigma (its clean result at the last), and the loss is the sum over the
steps of the scheduler-weighted MSE. The data's images are not used: only their prompts and sizes.

The teacher is the model as the run starts: with `--lora_checkpoint` (a LoRA fine-tuned on the data, the recipe's
first stage) a frozen copy of the denoiser with that LoRA; without it the student's own base with the LoRA switched
off. This is how a fine-tuned Turbo model (whose LoRA broke its few-step sampling) learns to sample in few steps
again. DiffSynth-Studio also computes an LPIPS term between the student's detached few-step sample and the
teacher's; no gradient reaches the student through it, so it is not computed here."""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

from diffsynth.runtime.errors import ConfigError

from .teacher import guided_velocity, negative_rows_batch

logger = logging.getLogger(__name__)


def check_run(cfg, task) -> None:
    """Refuse what this mode cannot do, naming the flag."""
    if not callable(getattr(task, "inference_sigmas", None)):
        raise ConfigError(
            f"--task trajectory_imitation: the {task.family} training task has no inference schedule "
            "(inference_sigmas) to sample the teacher's trajectory with; it trains with --task sft"
        )


def make_teacher(module: nn.Module, lora: bool, started_from_file: bool) -> nn.Module | None:
    """The frozen teacher: a copy of `module` as it starts (full fine-tuning, or a LoRA started from
    `--lora_checkpoint`), or None: the student's base with its LoRA switched off (a LoRA starting at zero)."""
    if lora and not started_from_file:
        logger.info("trajectory_imitation: the teacher is the student's base (its LoRA switched off)")
        return None
    logger.info("trajectory_imitation: the teacher is a frozen copy of the model as it starts")
    return copy.deepcopy(module).requires_grad_(False).eval()


def grids(task, latent_shape, student_steps: int, teacher_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the student's K + 1 sigmas, the teacher's N + 1 sigmas with each student sigma put in place of the grid
    point nearest to it), both from the family's inference schedule and ending with 0."""
    student = task.inference_sigmas(tuple(latent_shape), student_steps).float().cpu()
    teacher = task.inference_sigmas(tuple(latent_shape), teacher_steps).float().cpu().clone()
    places = [int(torch.argmin((teacher[:-1] - sigma).abs())) for sigma in student[:-1]]
    for place, sigma in zip(places, student[:-1], strict=True):
        teacher[place] = sigma
    if len(set(places)) < len(places) or not bool((teacher[1:] < teacher[:-1]).all()):
        raise ConfigError(
            f"--trajectory_teacher_steps {teacher_steps} is too coarse to hold the student's "
            f"{student_steps} sigmas as distinct grid points: raise it"
        )
    return student, teacher


def negative_batch(run, items: list[dict], positive: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The rows encoded with `--trajectory_negative_prompt` (the teacher's CFG branch); None at scale 1."""
    cfg = run.config
    return negative_rows_batch(run, items, cfg.trajectory_negative_prompt, cfg.trajectory_teacher_cfg_scale, positive)


def teacher_trajectory(run, student: nn.Module, batch, negative, noise: torch.Tensor, sigmas: torch.Tensor):
    """The teacher's latents at every point of `sigmas` (a list, the first being `noise`), sampled with CFG."""
    scale, x, path = run.config.trajectory_teacher_cfg_scale, noise, [noise]
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i].expand(noise.shape[0]).to(x.device)
        velocity = guided_velocity(run.task, run.teacher, student, batch, negative, x, sigma, scale)
        x = x + (sigmas[i + 1] - sigmas[i]).item() * velocity
        path.append(x)
    return path


def trajectory_loss(run, model: nn.Module, items: list[dict], batch: dict[str, Any], rng: torch.Generator):
    """The summed, scheduler-weighted MSE of the student's velocity against each big step of the teacher's
    trajectory (see the module docstring)."""
    cfg, task = run.config, run.task
    x0 = batch["latents"]
    student, teacher = grids(task, x0.shape, cfg.trajectory_student_steps, cfg.trajectory_teacher_steps)
    noise = torch.randn(x0.shape, generator=rng).to(x0.device)
    unwrapped = run.accelerator.unwrap_model(run.model)  # the teacher's calls need no DDP
    path = teacher_trajectory(run, unwrapped, batch, negative_batch(run, items, batch), noise, teacher)
    at = {round(float(s), 7): x for s, x in zip(teacher.tolist(), path, strict=True)}
    b, loss = x0.shape[0], 0.0
    for i in range(cfg.trajectory_student_steps):
        here, there = float(student[i]), float(student[i + 1])
        start, end = at[round(here, 7)], at[round(there, 7)]
        target = (end - start) / (there - here)
        sigma = student[i].expand(b).to(x0.device)
        predicted = task.velocity(model, batch, start, sigma).float()
        error = (predicted - target).pow(2).flatten(1).mean(1)
        if cfg.loss_weighting == "scheduler":
            error = error * task.scheduler.training_weight(student[i].expand(b)).to(error)
        loss = loss + error.mean()
    return loss


__all__ = ["check_run", "grids", "make_teacher", "negative_batch", "teacher_trajectory", "trajectory_loss"]
