"""`--task dmd2`: distribution matching distillation (Yin et al. 2024, "Improved Distribution Matching
Distillation"), with DiffSynth-Studio's options (`diffsynth/diffusion/dmd2.py`, read for its behaviour).

Three denoisers take part:

- the student: the trained denoiser (LoRA or full), which learns to sample in `--dmd2_student_sample_steps`;
- the teacher (the "real score"): the denoiser as loaded, frozen, with CFG at `--dmd2_teacher_cfg_scale`
  against `--dmd2_negative_prompt`. For a LoRA it is the student's own base with the LoRA switched off (no
  second copy in memory); for full fine-tuning a frozen copy taken before training;
- the fake score: a full, trainable copy of the denoiser as loaded, with its own AdamW, that tracks the
  distribution of the student's samples.

Each optimizer step, per micro-batch (all random draws from the trainer's per-batch generator, so a resumed
run continues bit for bit):

    k ~ U{0..K-1}, eps                                       # one of the student's K steps
    x_k = sigma_0 eps (k = 0) | (1 - s_k) x0 + s_k eps (sde) | the student's Euler steps from noise (ode)
    g = x_k - s_k student(x_k, s_k)                          # the student's x0; gradients only through this call
    if step % --dmd2_student_update_freq == 0:              # the student's update
        t ~ U[t_min, t_max] (or logit-normal), x_t = (1 - t) g + t eps'
        d = fake_x0(x_t) - teacher_cfg_x0(x_t)               # the distribution matching direction (no grad)
        loss_student = 0.5 mean((g - sg(g - d / mean|g - teacher_x0|))^2)   # d(loss)/dg = the normalised d / N
        + --dmd2_gan_loss_weight * softplus(-D(F(x_t)))      # optional GAN term, F: the fake score's features
    loss_fake = the trainer's flow-matching loss of the fake score on sg(g)   # every step
    loss_D = softplus(D(F(sg(g)_s))) + softplus(-D(F(x0_s))) [+ R1]        # every step, with the GAN term

The student's optimizer is the trainer's (`--learning_rate`, its LR schedule, clipped at
`--dmd2_student_grad_clip_norm`); the fake score's has `--dmd2_fake_score_learning_rate` (constant, clipped at
`--max_grad_norm`). Differences from DiffSynth-Studio, on purpose: the fake score trains every step (the paper's
schedule; DiffSynth-Studio trains it only on the steps the student does not), with the plain flow-matching loss
(the family's timesteps and weights) rather than an x0 MSE at the matching timesteps; the student's first step
never sees the data (DiffSynth-Studio noises the data to 0.999 there when K > 1); `ode` is implemented (DiffSynth-
Studio accepts the option and ignores it); a CFG scale below 1 is applied as given (DiffSynth-Studio skips CFG
at <= 1); the discriminator reads the fake score's hidden features (the DMD2 paper's choice; DiffSynth-Studio
reads the teacher's), without training the fake score through them, and the approximate R1 penalty perturbs the
discriminator's noisy real input (DiffSynth-Studio perturbs the clean latents). The GAN term is off by default
(DiffSynth-Studio's 0.03 needs `--dmd2_feature_indices` and a task with `hidden_features`, see `task.py`).
Several processes run as DDP: the student through the trainer's DDP wrapper, the fake score's and the
discriminator's gradients averaged by hand (`average_gradients`). Not supported: FSDP, DeepSpeed, `--cache_dir`.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffsynth.runtime.dtypes import parse_dtype
from diffsynth.runtime.errors import ConfigError

from .checkpoint import read_auxiliary, write_auxiliary
from .config import TrainConfig, dmd2_feature_indices, dmd2_t_list
from .teacher import guided_velocity, lora_disabled, negative_rows_batch

logger = logging.getLogger(__name__)

FAKE_SCORE = "dmd2-fake_score"  # its files in a resume checkpoint: <name>.safetensors, <name>-optimizer.pt
DISCRIMINATOR = "dmd2-discriminator"


@dataclass
class DMD2:
    """The auxiliary models of a DMD2 run (see the module docstring)."""

    fake_score: nn.Module
    fake_optimizer: torch.optim.Optimizer
    teacher: nn.Module | None  # a frozen copy (full fine-tuning); None: the student's base with its LoRA off
    metrics: dict[str, float] = field(default_factory=dict)  # the last step's losses, for the log
    discriminator: nn.Module | None = None  # with --dmd2_gan_loss_weight > 0: built at its first use
    discriminator_optimizer: torch.optim.Optimizer | None = None


class Discriminator(nn.Module):
    """DMD2's GAN discriminator: one head per hidden feature map [B, C, h, w] (a 4x4 stride-2 convolution to C/2
    channels, GroupNorm, LeakyReLU(0.2), a 1x1 convolution to one logit per position, averaged), the layout of
    DiffSynth-Studio's FLUX.2 discriminator; `forward(features)` gives one logit per head, [B, heads]. Maps need
    at least 2x2 positions."""

    def __init__(self, channels: Sequence[int]):
        super().__init__()
        self.heads = nn.ModuleList(_head(c) for c in channels)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(features) != len(self.heads):
            raise ValueError(f"the discriminator has {len(self.heads)} heads, got {len(features)} feature maps")
        dtype = self.heads[0][0].weight.dtype
        return torch.cat([head(f.to(dtype)) for head, f in zip(self.heads, features, strict=True)], dim=1)


def _head(channels: int) -> nn.Sequential:
    hidden = max(channels // 2, 1)
    groups = next(g for g in range(min(32, hidden), 0, -1) if hidden % g == 0)
    return nn.Sequential(
        nn.Conv2d(channels, hidden, kernel_size=4, stride=2, padding=1),
        nn.GroupNorm(groups, hidden),
        nn.LeakyReLU(0.2),
        nn.Conv2d(hidden, 1, kernel_size=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


# ----------------------------------------------------------------------------------- setup
def check_run(cfg: TrainConfig, task, accelerator) -> None:
    """What the trainer refuses at setup for `--task dmd2` (the settings alone are checked in `config.py`)."""
    if cfg.dmd2_student_schedule == "pipeline" and not callable(getattr(task, "inference_sigmas", None)):
        raise ConfigError(
            f"--dmd2_student_schedule pipeline: the {task.family} training task has no inference schedule "
            "(inference_sigmas); use --dmd2_student_schedule uniform or --dmd2_student_t_list"
        )
    from .distributed import distributed_kind, is_deepspeed, is_sharded

    if is_deepspeed(accelerator) or is_sharded(accelerator):
        raise ConfigError(
            f"--task dmd2 under {distributed_kind(accelerator)}: the fake score model is not sharded; train in "
            "one process or with DDP (several processes), without DeepSpeed / FSDP"
        )
    if cfg.dmd2_gan_loss_weight > 0 and not callable(getattr(task, "hidden_features", None)):
        raise ConfigError(
            f"--dmd2_gan_loss_weight {cfg.dmd2_gan_loss_weight}: the {task.family} training task cannot give hidden "
            "features for the discriminator (hidden_features); pass --dmd2_gan_loss_weight 0"
        )


def build(cfg: TrainConfig, module: nn.Module, lora: bool, started_from_file: bool = False) -> DMD2:
    """The fake score (a trainable copy of `module` in `--trainable_dtype`) and, for full fine-tuning, the frozen
    teacher copy. Called on the denoiser as loaded, before the LoRA goes in or its dtype changes; for a LoRA
    started from `--lora_checkpoint` (`started_from_file`), once that LoRA is in: both start from the model the
    student starts as (the teacher a frozen copy, as the base with the LoRA off would be another model)."""
    fake = copy.deepcopy(module).to(parse_dtype(cfg.trainable_dtype)).requires_grad_(True).train()
    copied = not lora or started_from_file
    teacher = copy.deepcopy(module).requires_grad_(False).eval() if copied else None
    lr = cfg.dmd2_fake_score_learning_rate or cfg.learning_rate
    optimizer = torch.optim.AdamW(fake.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    logger.info(
        "dmd2: fake score %.2fM parameters (lr %g); teacher: %s",
        sum(p.numel() for p in fake.parameters()) / 1e6,
        lr,
        "a frozen copy of the denoiser" if copied else "the base with the LoRA off",
    )
    return DMD2(fake, optimizer, teacher)


# ----------------------------------------------------------------------------------- the pieces
def student_sigmas(cfg: TrainConfig, task, latent_shape: Sequence[int]) -> torch.Tensor:
    """The student's K + 1 sigmas, ending with 0: `--dmd2_student_t_list`, else the family's inference schedule
    (`pipeline`) or `linspace(min(t_max, 0.999), 0, K + 1)` (`uniform`, DiffSynth-Studio's default)."""
    steps = cfg.dmd2_student_sample_steps
    if cfg.dmd2_student_t_list:
        return torch.tensor(dmd2_t_list(cfg), dtype=torch.float32)
    if cfg.dmd2_student_schedule == "pipeline":
        return task.inference_sigmas(tuple(latent_shape), steps).float().cpu()
    return torch.linspace(min(cfg.dmd2_matching_t_max, 0.999), 0.0, steps + 1, dtype=torch.float32)


def _expand(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, ...] on `like`'s device (in its dtype, unless a mask)."""
    value = value.to(like.device, like.dtype if value.is_floating_point() else value.dtype)
    return value.view(-1, *([1] * (like.ndim - 1)))


def student_sample(
    run, model, batch: dict[str, Any], rng: torch.Generator, *, grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the student's x0 for the batch [B, ...] in float32, the sigma it was called at [B]): a random step k per
    sample, its input built as `--dmd2_student_sample_type` says, one student call (with gradients when `grad`)."""
    cfg, task = run.config, run.task
    x0 = batch["latents"].float()
    sigmas = student_sigmas(cfg, task, x0.shape)
    b = x0.shape[0]
    k = torch.randint(0, cfg.dmd2_student_sample_steps, (b,), generator=rng)
    noise = torch.randn(x0.shape, generator=rng).to(x0.device)
    sigma = sigmas[k]
    if cfg.dmd2_student_sample_type == "sde":  # step 0 starts from noise alone, as sampling does
        x = torch.where(
            _expand(k == 0, x0), _expand(sigma, x0) * noise, task.scheduler.add_noise(x0, noise, sigma.to(x0))
        )
    else:  # ode: the student's own Euler steps from noise up to each sample's step, without gradients
        x = sigmas[0].item() * noise
        # the module itself, not a DDP wrapper: processes take different numbers of these calls
        plain = run.accelerator.unwrap_model(run.model)
        with torch.no_grad():
            for i in range(int(k.max())):
                velocity = task.velocity(plain, batch, x, sigmas[i].expand(b).to(x0.device)).float()
                stepped = x + (sigmas[i + 1] - sigmas[i]).item() * velocity
                x = torch.where(_expand(i < k, x0), stepped, x)
    with torch.set_grad_enabled(grad):
        velocity = task.velocity(model, batch, x, sigma.to(x0.device)).float()
        return x - _expand(sigma, x) * velocity, sigma


def matching_sigma(cfg: TrainConfig, batch_size: int, rng: torch.Generator) -> torch.Tensor:
    """The re-noising sigma of each sample, in [--dmd2_matching_t_min, --dmd2_matching_t_max]."""
    low, high = cfg.dmd2_matching_t_min, cfg.dmd2_matching_t_max
    if cfg.dmd2_matching_t_sampling == "uniform":
        u = torch.rand(batch_size, generator=rng)
    else:
        u = torch.sigmoid(torch.randn(batch_size, generator=rng) * cfg.dmd2_matching_t_std + cfg.dmd2_matching_t_mean)
    return (u * (high - low) + low).clamp(low, high)


def teacher_velocity(
    run, student: nn.Module, batch: dict[str, Any], negative: dict[str, Any] | None, noisy, sigma
) -> torch.Tensor:
    """The teacher's velocity with CFG: `uncond + s (cond - uncond)` at `--dmd2_teacher_cfg_scale` s, the
    unconditional branch on `negative` (the rows encoded with the negative prompt); just `cond` at s = 1."""
    scale = run.config.dmd2_teacher_cfg_scale
    return guided_velocity(run.task, run.dmd2.teacher, student, batch, negative, noisy, sigma, scale)


def dmd_loss(generated: torch.Tensor, fake_x0: torch.Tensor, teacher_x0: torch.Tensor, mask=None) -> torch.Tensor:
    """DMD2's surrogate loss, whose gradient in `generated` is `(fake_x0 - teacher_x0) / mean|generated -
    teacher_x0|` (per sample) over the element count: the student's samples move against the fake score's x0
    and toward the teacher's. `mask` (the task's `loss_mask`) zeroes the direction where the loss does not count."""
    dims = tuple(range(1, generated.ndim))
    with torch.no_grad():
        norm = (generated - teacher_x0).abs().mean(dim=dims, keepdim=True) + 1e-6
        direction = (fake_x0 - teacher_x0) / norm
        if mask is not None:
            direction = direction * mask.to(direction)
        target = generated - direction
    return 0.5 * (generated.float() - target.float()).pow(2).mean()


def negative_batch(run, items: list[dict], positive: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The batch's rows encoded again with `--dmd2_negative_prompt` in place of their prompts (the teacher's
    unconditional branch); None when the teacher runs without CFG."""
    cfg = run.config
    return negative_rows_batch(run, items, cfg.dmd2_negative_prompt, cfg.dmd2_teacher_cfg_scale, positive)


def hidden_features(run, batch: dict[str, Any], noisy: torch.Tensor, sigma: torch.Tensor) -> list[torch.Tensor]:
    """The fake score model's hidden feature maps at `--dmd2_feature_indices` (the task's `hidden_features`)."""
    indices = dmd2_feature_indices(run.config)
    return run.task.hidden_features(run.dmd2.fake_score, batch, noisy, sigma, indices)


def discriminator(run, features: Sequence[torch.Tensor]) -> nn.Module:
    """The discriminator, built at its first use from the feature maps' channels (seeded by --seed), with its
    AdamW (`--dmd2_discriminator_learning_rate`, default --learning_rate)."""
    dmd, cfg = run.dmd2, run.config
    if dmd.discriminator is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            module = Discriminator([f.shape[1] for f in features])
        attach_discriminator(dmd, cfg, module.to(features[0].device, parse_dtype(cfg.trainable_dtype)))
    return dmd.discriminator


def attach_discriminator(dmd: DMD2, cfg: TrainConfig, module: nn.Module) -> None:
    lr = cfg.dmd2_discriminator_learning_rate or cfg.learning_rate
    dmd.discriminator = module.train().requires_grad_(True)
    dmd.discriminator_optimizer = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=cfg.weight_decay)


def generator_gan_loss(run, batch: dict[str, Any], noisy: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The student's GAN term `softplus(-D(features(x_t)))`, `noisy` carrying the student's graph. Its gradient
    is taken with respect to `noisy` alone (`autograd.grad`: nothing lands on the fake score's or the
    discriminator's weights) and handed on as a surrogate with the term's value and that gradient. (Switching
    their weights' requires_grad off for the call instead would break gradient checkpointing's recompute.)"""
    features = hidden_features(run, batch, noisy, sigma)
    term = torch.nn.functional.softplus(-discriminator(run, features)(features)).mean()
    (grad,) = torch.autograd.grad(term, noisy)
    surrogate = (noisy.float() * grad.float()).sum()
    return term.detach() + surrogate - surrogate.detach()


def discriminator_loss(run, batch: dict[str, Any], generated: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """`softplus(D(fake)) + softplus(-D(real))` on the fake score's features (no gradient into it) of the
    student's detached samples and of the data latents, both noised with one noise at a matching sigma; plus
    `--dmd2_gan_r1_reg_weight` times the approximate R1 penalty: the squared change of the real logits when
    the discriminator's noisy real input moves by `--dmd2_gan_r1_reg_alpha` Gaussian noise."""
    cfg, scheduler = run.config, run.task.scheduler
    x0 = batch["latents"].float()
    sigma = matching_sigma(cfg, x0.shape[0], rng).to(x0.device)
    noise = torch.randn(x0.shape, generator=rng).to(x0.device)
    real_input = scheduler.add_noise(x0, noise, sigma)
    with torch.no_grad():
        fake_features = hidden_features(run, batch, scheduler.add_noise(generated, noise, sigma), sigma)
        real_features = hidden_features(run, batch, real_input, sigma)
    judge = discriminator(run, real_features)
    real_logits = judge(real_features)
    softplus = torch.nn.functional.softplus
    loss = softplus(judge(fake_features)).mean() + softplus(-real_logits).mean()
    if cfg.dmd2_gan_r1_reg_weight > 0:
        jitter = cfg.dmd2_gan_r1_reg_alpha * torch.randn(x0.shape, generator=rng).to(x0.device)
        with torch.no_grad():
            moved = hidden_features(run, batch, real_input + jitter, sigma)
        loss = loss + cfg.dmd2_gan_r1_reg_weight * (real_logits - judge(moved)).pow(2).mean()
    return loss


def micro_batch_losses(
    run, student, batch: dict[str, Any], negative, rng: torch.Generator, *, update_student: bool
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """(the student's loss: DMD plus the weighted GAN term, or None when it does not update; the fake score's
    flow-matching loss; the discriminator's loss, or None without the GAN term)."""
    from .trainer import _saved_activations, flow_matching_loss

    cfg = run.config
    with _saved_activations(cfg, batch["latents"].device):
        generated, _ = student_sample(run, student, batch, rng, grad=update_student)
    loss = None
    if update_student:
        sigma = matching_sigma(cfg, generated.shape[0], rng).to(generated.device)
        noise = torch.randn(generated.shape, generator=rng).to(generated.device)
        with torch.no_grad():
            noisy = run.task.scheduler.add_noise(generated.detach(), noise, sigma)
            fake_x0 = (
                noisy - _expand(sigma, noisy) * run.task.velocity(run.dmd2.fake_score, batch, noisy, sigma).float()
            )
            base = run.accelerator.unwrap_model(run.model)  # the teacher, with its LoRA off, when there is no copy
            teacher = teacher_velocity(run, base, batch, negative, noisy, sigma)
            teacher_x0 = noisy - _expand(sigma, noisy) * teacher
        mask = run.task.loss_mask(batch) if callable(getattr(run.task, "loss_mask", None)) else None
        loss = dmd_loss(generated, fake_x0, teacher_x0, mask)
        if cfg.dmd2_gan_loss_weight > 0:
            noisy = run.task.scheduler.add_noise(generated, noise, sigma)  # the same x_t, with the student's graph
            loss = loss + cfg.dmd2_gan_loss_weight * generator_gan_loss(run, batch, noisy, sigma)
    fake = flow_matching_loss(run, run.dmd2.fake_score, {**batch, "latents": generated.detach()}, rng)
    judged = discriminator_loss(run, batch, generated.detach(), rng) if cfg.dmd2_gan_loss_weight > 0 else None
    return loss, fake, judged


def student_updates(cfg: TrainConfig, step: int) -> bool:
    """Whether the step after `step` steps done updates the student (every `--dmd2_student_update_freq`-th)."""
    return step % cfg.dmd2_student_update_freq == 0


def dmd2_step(run, state, group: list[list[dict]]):
    """One DMD2 step over `group` (micro-batches): the student's update on every `--dmd2_student_update_freq`-th
    step (counting from the first), the fake score's every step."""
    from diffsynth.training.distributed import PreparedDenoiser

    from .trainer import draw_batch_choices, micro_batch_noise, prepare_batch

    acc, cfg, dmd = run.accelerator, run.config, run.dmd2
    update = student_updates(cfg, state.step)
    # the student runs through its DDP wrapper only when its gradients are wanted
    student = PreparedDenoiser(run.model, acc.unwrap_model(run.model)) if update else acc.unwrap_model(run.model)
    dmd_losses, fake_losses, judge_losses = [], [], []
    for k, items in enumerate(group):
        index = (state.batches_done + k) * acc.num_processes + acc.process_index
        batch = draw_batch_choices(run, prepare_batch(run, items), state.epoch, index)
        negative = negative_batch(run, items, batch) if update else None
        # DDP reduces the student's gradients at the group's last backward pass (the others accumulate)
        sync = acc.no_sync(run.model) if k < len(group) - 1 else contextlib.nullcontext()
        with sync:
            with acc.autocast():
                loss, fake, judged = micro_batch_losses(
                    run,
                    student,
                    batch,
                    negative,
                    micro_batch_noise(cfg.seed, state.epoch, index),
                    update_student=update,
                )
            # each loss reaches only its own model's parameters (the others' outputs are detached, computed
            # without gradients, or passed on through autograd.grad), so one backward pass serves all
            total = sum(x for x in (loss, fake, judged) if x is not None)
            acc.backward(total / len(group))
        fake_losses.append(fake.detach().float())
        if loss is not None:
            dmd_losses.append(loss.detach().float())
        if judged is not None:
            judge_losses.append(judged.detach().float())
    if update:
        clip = cfg.dmd2_student_grad_clip_norm
        if clip:
            acc.clip_grad_norm_(list(run.trainable.values()), clip)
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    auxiliary = [dmd.fake_score, *([dmd.discriminator] if dmd.discriminator is not None else [])]
    average_gradients(acc, [p for m in auxiliary for p in m.parameters()])
    if cfg.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(list(dmd.fake_score.parameters()), cfg.max_grad_norm)
    dmd.fake_optimizer.step()
    dmd.fake_optimizer.zero_grad(set_to_none=True)
    if dmd.discriminator is not None:
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(list(dmd.discriminator.parameters()), cfg.max_grad_norm)
        dmd.discriminator_optimizer.step()
        dmd.discriminator_optimizer.zero_grad(set_to_none=True)
    lr = run.lr_scheduler.get_last_lr()[0]  # this step's rate, logged
    with warnings.catch_warnings():  # the student's LR follows the steps, also those it does not update on
        warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)` before")
        run.lr_scheduler.step()

    def mean(losses):  # over micro-batches and processes
        return float(acc.reduce(torch.stack(losses).mean(), reduction="mean"))

    fake_loss = mean(fake_losses)
    dmd.metrics = {"fake_score_loss": fake_loss}
    if dmd_losses:
        dmd.metrics["dmd_loss"] = mean(dmd_losses)  # with the GAN term, when there is one
    if judge_losses:
        dmd.metrics["discriminator_loss"] = mean(judge_losses)
    if not torch.isfinite(torch.tensor(fake_loss)):
        logger.warning("step %d: the fake score's loss is %s", state.step + 1, fake_loss)
    done = state.batches_done + len(group)
    return replace(state, step=state.step + 1, batches_done=done, loss=fake_loss, lr=lr)


def average_gradients(accelerator, params: Sequence[nn.Parameter]) -> None:
    """Under DDP, the gradients of the fake score and the discriminator (not DDP-wrapped: the discriminator is
    built at its first use) averaged over the processes, as DDP does the student's: each process then takes the
    same optimizer step. A parameter no process has a gradient for keeps none (AdamW skips it, as in one
    process); one only some have one for gets zeros on the others."""
    if accelerator.num_processes == 1:
        return
    import torch.distributed as dist

    device = params[0].device
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
    dist.all_reduce(has)
    for p, count in zip(params, has.tolist(), strict=True):
        if count == 0:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad.div_(accelerator.num_processes)


# ----------------------------------------------------------------------------------- checkpoints
def save_state(dmd: DMD2, folder: Path) -> None:
    """The fake score's weights and optimizer state into a checkpoint folder (written before it is renamed
    into place, so atomically with the rest)."""
    write_auxiliary(folder, FAKE_SCORE, dmd.fake_score.state_dict(), dmd.fake_optimizer.state_dict())
    if dmd.discriminator is not None:
        write_auxiliary(folder, DISCRIMINATOR, dmd.discriminator.state_dict(), dmd.discriminator_optimizer.state_dict())


def load_state(dmd: DMD2, folder: Path, cfg: TrainConfig) -> None:
    """Restore what `save_state` wrote (the discriminator rebuilt from its saved shapes); a checkpoint without it
    (another --task, or no GAN term) is refused by name."""
    weights, optimizer = read_auxiliary(folder, FAKE_SCORE, "--task dmd2 (the fake score model)")
    expected = dmd.fake_score.state_dict()
    bad = sorted(set(expected) ^ set(weights)) or [k for k in expected if expected[k].shape != weights[k].shape]
    if bad:
        raise ConfigError(f"--resume {folder}: the saved fake score does not fit this denoiser ({bad[:3]})")
    dmd.fake_score.load_state_dict(weights)
    dmd.fake_optimizer.load_state_dict(optimizer)
    if cfg.dmd2_gan_loss_weight > 0:
        weights, optimizer = read_auxiliary(folder, DISCRIMINATOR, "--dmd2_gan_loss_weight > 0 (the discriminator)")
        heads = sorted(int(k.split(".")[1]) for k in weights if k.endswith(".0.weight"))
        module = Discriminator([weights[f"heads.{i}.0.weight"].shape[1] for i in heads])
        device = next(dmd.fake_score.parameters()).device
        module.load_state_dict(weights)
        attach_discriminator(dmd, cfg, module.to(device, parse_dtype(cfg.trainable_dtype)))
        dmd.discriminator_optimizer.load_state_dict(optimizer)


def log_record(dmd: DMD2 | None) -> Mapping[str, float]:
    return {} if dmd is None else dict(dmd.metrics)


__all__ = [
    "DMD2",
    "Discriminator",
    "build",
    "check_run",
    "dmd2_step",
    "discriminator_loss",
    "average_gradients",
    "dmd_loss",
    "generator_gan_loss",
    "load_state",
    "lora_disabled",
    "matching_sigma",
    "micro_batch_losses",
    "negative_batch",
    "save_state",
    "student_sample",
    "student_sigmas",
    "student_updates",
    "teacher_velocity",
]
