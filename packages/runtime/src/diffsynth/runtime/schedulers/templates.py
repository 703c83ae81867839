"""Per-family sigma schedules for flow matching, as plain functions.

Every template takes the number of steps N (and keyword settings) and returns N+1 float32 sigmas: the N noise
levels the denoiser is evaluated at, non-increasing from at most 1, then the terminal 0. The math runs in float64
and is rounded once at the end, so the values agree with the references to float32 precision.

Where the model authors' code and diffusers / DiffSynth-Studio disagree, the authors' code decides; each template
names the code it follows. All shifted schedules start from the same grid, `linspace(1, 0, N + 1)` without its
last point (BFL `get_schedule`; diffusers passes the identical `linspace(1, 1/N, N)`), and differ only in how the
grid is bent towards high noise.
"""

from __future__ import annotations

import math
import numbers

import torch

from ..errors import ConfigError

DEFAULT_IMAGE_SEQ_LEN = 4096  # tokens of a 1024x1024 image in the 16x-downsampled packed latent (FLUX/Qwen/Z-Image)

# LTX-2 authors' fixed tables (ltx_pipelines/utils/constants.py), terminal 0 included. The distilled model runs
# them as they are; the stage-2 (upscaled latent) refinement starts from the table's 6th entry.
LTX2_DISTILLED_SIGMAS = (1.0, 0.99375, 0.9875, 0.98125, 0.975, 0.909375, 0.725, 0.421875, 0.0)
LTX2_STAGE2_SIGMAS = (0.909375, 0.725, 0.421875, 0.0)


# ----------------------------------------------------------------------------------------------- building blocks
def check_steps(num_inference_steps, name: str = "num_inference_steps") -> int:
    """A step count as an int: any integer (numpy's too) >= 1; 2.5 or True is refused, not truncated."""
    value = num_inference_steps
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ConfigError(f"{name}={value!r} is not accepted; use an integer >= 1")
    return int(value)


def _positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name}={value!r} is not accepted; use a finite number > 0")
    return float(value)


def _unit(name: str, value, *, low_open: bool = False, high_open: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > 0 if low_open else value >= 0) and (value < 1 if high_open else value <= 1)
    if not ok:
        interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        raise ConfigError(f"{name}={value!r} is not accepted; use a number in {interval}")
    return float(value)


def linear_grid(num_inference_steps: int) -> torch.Tensor:
    """The N unshifted noise levels 1, (N-1)/N, ..., 1/N (float64)."""
    n = check_steps(num_inference_steps)
    return torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64)[:n]


def static_shift(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3-style shift `s*t / (1 + (s-1)*t)`: shift > 1 spends more steps at high noise."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def exponential_shift(sigmas: torch.Tensor, mu: float) -> torch.Tensor:
    """BFL `time_shift(mu, 1, t)` = e^mu / (e^mu + 1/t - 1); equals `static_shift` with shift = e^mu; 0 stays 0."""
    positive = sigmas > 0
    safe = torch.where(positive, sigmas, torch.ones_like(sigmas))
    shifted = math.exp(mu) / (math.exp(mu) + (1 / safe - 1))
    return torch.where(positive, shifted, torch.zeros_like(sigmas))


def linear_mu(
    image_seq_len: float, base_seq_len: float, max_seq_len: float, base_shift: float, max_shift: float
) -> float:
    """mu on the line through (base_seq_len, base_shift) and (max_seq_len, max_shift), extrapolated outside."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return float(base_shift + slope * (image_seq_len - base_seq_len))


def flux2_empirical_mu(image_seq_len: float, num_steps: int) -> float:
    """BFL flux2 `compute_empirical_mu`: two lines in token count, fitted at 10 and 200 steps, interpolated in steps.

    Above 4300 tokens the 200-step line is used for any step count (as BFL does).
    """
    a1, b1 = 8.73809524e-05, 1.89833333  # mu(tokens) fitted at 10 steps
    a2, b2 = 0.00016927, 0.45666666  # mu(tokens) fitted at 200 steps
    mu_200 = a2 * image_seq_len + b2
    if image_seq_len > 4300:
        return float(mu_200)
    mu_10 = a1 * image_seq_len + b1
    slope = (mu_200 - mu_10) / 190.0
    return float(mu_200 + slope * (num_steps - 200.0))


def stretch_to_terminal(sigmas: torch.Tensor, terminal: float) -> torch.Tensor:
    """Scale `1 - sigma` so the last (non-terminal) sigma lands on `terminal`; the first stays where it is.

    LTX-Video `rf.py` / LTX-2 `LTX2Scheduler` / diffusers `shift_terminal`. With a single step (last sigma 1)
    the scale is 0/0 in the references; we leave that schedule unchanged. `terminal=0` means no stretch, as in
    diffusers (a stretch to 0 would put the last model call at sigma 0, a wasted call and a repeated sigma).
    """
    one_minus = 1 - sigmas
    if terminal == 0 or one_minus[-1] <= 0:
        return sigmas
    return 1 - one_minus * ((1 - terminal) / one_minus[-1])


def _finish(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(torch.float32)


def _seq_len(image_seq_len) -> float:
    return _positive("image_seq_len", image_seq_len)


# ------------------------------------------------------------------------------------------------------ templates
def z_image(num_inference_steps: int, *, shift: float = 3.0) -> torch.Tensor:
    """Z-Image: static shift 3 on the linear grid.

    Tongyi-MAI/Z-Image `src/zimage/pipeline.py` sets `sigma_min = 0` on its FlowMatchEulerDiscreteScheduler
    (shift 3, no dynamic shifting: the `mu` it computes is ignored) and takes `linspace(1, 0, N + 1)[:-1]`;
    diffusers' ZImagePipeline passes `linspace(1, 1/N, N)` to the same scheduler: both give these values.
    """
    return _finish(static_shift(linear_grid(num_inference_steps), _positive("shift", shift)))


def flux1(
    num_inference_steps: int,
    *,
    image_seq_len: float = DEFAULT_IMAGE_SEQ_LEN,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
    mu: float | None = None,
) -> torch.Tensor:
    """FLUX.1 dev/Kontext: exponential time shift, mu linear in image tokens (0.5 @ 256 .. 1.15 @ 4096).

    BFL `flux/sampling.py` `get_schedule`; diffusers' FluxPipeline gives the same values (its `calculate_shift`
    with FLUX.1's scheduler config). `image_seq_len` is the packed token count (H/16 * W/16). FLUX.1-schnell:
    BFL turns the shift off, which is `mu=0`. (DiffSynth-Studio's "FLUX.1" template, a static shift 3 from
    sigma 0.003/1.002, is not what the authors sample with.)
    """
    if mu is None:
        mu = linear_mu(_seq_len(image_seq_len), 256, 4096, base_shift, max_shift)
    return _finish(exponential_shift(linear_grid(num_inference_steps), mu))


def flux2(
    num_inference_steps: int, *, image_seq_len: float = DEFAULT_IMAGE_SEQ_LEN, mu: float | None = None
) -> torch.Tensor:
    """FLUX.2: exponential time shift with BFL's empirical mu(tokens, steps).

    BFL `flux2/sampling.py` `get_schedule` + `compute_empirical_mu`; diffusers' Flux2Pipeline is the same.
    `image_seq_len` counts the generated image's packed tokens (H/16 * W/16), not reference-image tokens.
    """
    steps = check_steps(num_inference_steps)
    if mu is None:
        mu = flux2_empirical_mu(_seq_len(image_seq_len), steps)
    return _finish(exponential_shift(linear_grid(steps), mu))


def qwen_image(
    num_inference_steps: int,
    *,
    image_seq_len: float = DEFAULT_IMAGE_SEQ_LEN,
    base_shift: float = 0.5,
    max_shift: float = 0.9,
    shift_terminal: float | None = 0.02,
    mu: float | None = None,
) -> torch.Tensor:
    """Qwen-Image: exponential shift, mu linear in tokens (0.5 @ 256 .. 0.9 @ 8192), last sigma stretched to 0.02.

    The authors ship diffusers: QwenImagePipeline with the Qwen/Qwen-Image `scheduler_config.json`
    (`use_dynamic_shifting`, `time_shift_type="exponential"`, `shift_terminal=0.02`). `image_seq_len` is
    H/16 * W/16. `shift_terminal=None` (or 0, as in diffusers) skips the stretch.
    """
    if mu is None:
        mu = linear_mu(_seq_len(image_seq_len), 256, 8192, base_shift, max_shift)
    sigmas = exponential_shift(linear_grid(num_inference_steps), mu)
    if shift_terminal is not None:
        sigmas = stretch_to_terminal(sigmas, _unit("shift_terminal", shift_terminal, high_open=True))
    return _finish(sigmas)


QWEN_IMAGE_LIGHTNING_MU = math.log(3.0)  # shift 3, what lightx2v distilled Qwen-Image-Lightning with


def qwen_image_lightning(
    num_inference_steps: int, *, image_seq_len: float = DEFAULT_IMAGE_SEQ_LEN, mu: float | None = None
) -> torch.Tensor:
    """Qwen-Image-Lightning (lightx2v's 4/8-step distillation LoRAs): exponential shift with mu = ln 3 at every
    token count (a static shift 3), no terminal stretch.

    lightx2v/Qwen-Image-Lightning runs diffusers' QwenImagePipeline with a scheduler config of
    `base_shift = max_shift = ln 3` ("we use shift=3 in distillation") and `shift_terminal=None`;
    DiffSynth-Studio's "Qwen-Image-Lightning" template is the same. `image_seq_len` is accepted (and has no
    effect) so the Qwen-Image pipeline passes the same settings to either template; `mu` overrides ln 3.
    """
    return qwen_image(
        num_inference_steps,
        image_seq_len=image_seq_len,
        base_shift=QWEN_IMAGE_LIGHTNING_MU,
        max_shift=QWEN_IMAGE_LIGHTNING_MU,
        shift_terminal=None,
        mu=mu,
    )


def wan(num_inference_steps: int, *, shift: float = 5.0, sigma_max: float = 1.0) -> torch.Tensor:
    """Wan 2.1 / 2.2: static shift (5 by default; the authors' `sample_shift` is 3 for 480p I2V, 12 for 2.2 T2V-A14B).

    The authors sample with UniPC (or DPM++) multistep solvers; we take Euler steps on the authors' sigma schedule,
    as DiffSynth-Studio does. The grid follows Wan's `get_sampling_sigmas` (DPM++ path, and DiffSynth-Studio):
    it starts at 1. Their UniPC path starts its grid at 1 - 1/1000; pass `sigma_max=0.999` for that.
    """
    grid = linear_grid(num_inference_steps) * _unit("sigma_max", sigma_max, low_open=True)
    return _finish(static_shift(grid, _positive("shift", shift)))


def ltx2(
    num_inference_steps: int,
    *,
    image_seq_len: float = DEFAULT_IMAGE_SEQ_LEN,
    base_shift: float = 0.95,
    max_shift: float = 2.05,
    terminal: float = 0.1,
    stretch: bool = True,
) -> torch.Tensor:
    """LTX-2 (non-distilled, stage 1): exponential shift, mu linear in tokens (0.95 @ 1024 .. 2.05 @ 4096), then
    the last sigma stretched to 0.1.

    Lightricks/LTX-2 `ltx_core/components/schedulers.py` `LTX2Scheduler`. `image_seq_len` is the number of video
    latent positions (frames * height * width); the authors' pipelines call it without a latent, i.e. 4096.
    `stretch=False` or `terminal=0` skips the stretch.
    """
    mu = linear_mu(_seq_len(image_seq_len), 1024, 4096, base_shift, max_shift)
    sigmas = exponential_shift(linear_grid(num_inference_steps), mu)
    if stretch:
        sigmas = stretch_to_terminal(sigmas, _unit("terminal", terminal, high_open=True))
    return _finish(sigmas)


def _fixed(name: str, table: tuple[float, ...], num_inference_steps) -> torch.Tensor:
    steps = len(table) - 1
    if num_inference_steps != steps or isinstance(num_inference_steps, bool):
        raise ConfigError(
            f"num_inference_steps={num_inference_steps!r} is not accepted by template {name!r}: it is a fixed table "
            f"of {steps} steps; use {steps} (or template 'ltx2' for any step count)"
        )
    return torch.tensor(table, dtype=torch.float32)


def ltx2_distilled(num_inference_steps: int = 8) -> torch.Tensor:
    """LTX-2 distilled model, stage 1: the authors' fixed 8-step table `DISTILLED_SIGMA_VALUES`."""
    return _fixed("ltx2_distilled", LTX2_DISTILLED_SIGMAS, num_inference_steps)


def ltx2_stage2(num_inference_steps: int = 3) -> torch.Tensor:
    """LTX-2 stage 2 (refining the 2x-upsampled latent): the authors' 3-step `STAGE_2_DISTILLED_SIGMA_VALUES`."""
    return _fixed("ltx2_stage2", LTX2_STAGE2_SIGMAS, num_inference_steps)


TEMPLATES = {
    "z_image": z_image,
    "flux1": flux1,
    "flux2": flux2,
    "qwen_image": qwen_image,
    "wan": wan,
    "ltx2": ltx2,
    "ltx2_distilled": ltx2_distilled,
    "ltx2_stage2": ltx2_stage2,
    "qwen_image_lightning": qwen_image_lightning,
}
FIXED_TABLES = frozenset({"ltx2_distilled", "ltx2_stage2"})


def get_template(name: str):
    """The sigma function registered under `name`."""
    if name not in TEMPLATES:
        raise ConfigError(f"template={name!r} is not a known sigma template; choose one of {', '.join(TEMPLATES)}")
    return TEMPLATES[name]
