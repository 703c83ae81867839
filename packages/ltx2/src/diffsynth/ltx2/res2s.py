"""The res_2s sampler of LTX-2's HQ pipeline (ltx-pipelines' `TI2VidTwoStagesHQPipeline`).

Along a flow-matching path `x = (1 - sigma) x0 + sigma noise` the velocity is `(x - x0) / sigma`, so in the
log-time `t = -log(sigma)` the sampling ODE reads `dx/dt = D(x, t) - x`, with `D` the model's clean estimate. Its
linear part is solved exactly: over a step of length `h = log(sigma / sigma_next)`,

    x_next = x + h * sum_i b_i * (D_i - x),

with the weights `b_i` built from the phi functions `phi_k(z) = sum_{m >= 0} z^m / (m + k)!` at `z = -h`. res_2s
(a two-stage exponential Runge-Kutta method) evaluates `D` at the start and once more at `sigma_mid = sqrt(sigma *
sigma_next)` (the middle of the step in log-time, `c2 = 1/2`), reached by the one-stage update with weight `a21 =
c2 * phi_1(-c2 h)`; the weights `b2 = phi_2(-h) / c2`, `b1 = phi_1(-h) - b2` make the step second-order (a
single stage, the exponential Euler step, is the flow-matching Euler step the other pipelines take).

Each update is made stochastic the authors' way (`sde_step`): the deterministic target is moved to a lower noise
level and fresh noise brings it back to the scheduled one (`eta` sets how much noise, 0 = none). When the middle
point was so re-noised, the start point is moved to where the one-stage update would have reached that middle
point (the authors' "bong" iteration, whose fixed point we take directly), for steps with `h < 1/2` above sigma 0.03.
A schedule ending at 0 ends at 0.0011 instead and one last clean estimate finishes it.

Conditioning works as in the Euler loop: every clean estimate is blended with the given latents by `1 - mask` (a
kept first frame, retake frames, a given sound), and so is every re-noised point.

The stage-1 schedule is the LTX-2 one shifted by the stage's real token count (`hq_image_seq_len`) rather than
the fixed 4096 the other pipelines use. The SDE noise comes from the call's generator (the authors seed two
fixed generators, -1 and 9999, whatever the seed), drawn in the DiT's token layout and standardised per sample.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from diffsynth.runtime.errors import ConfigError

ETA = 0.5  # the authors' noise share of each step (and, fixed, of each middle point)
C2 = 0.5  # where the second stage sits in log-time (geometric middle of the step)
LAST_SIGMA = 0.0011  # a schedule ending at 0 stops here; one clean estimate does the rest
ANCHOR_MAX_H, ANCHOR_MIN_SIGMA = 0.5, 0.03  # the start point is re-anchored on steps this short, above this noise

HQ_STEPS = 15  # ltx-pipelines `LTX_2_3_HQ_PARAMS`
HQ_RESCALE, HQ_AUDIO_RESCALE = 0.45, 1.0
HQ_STAGE_1_LORA_STRENGTH, HQ_STAGE_2_LORA_STRENGTH = 0.25, 0.5  # `hq_2_stage_arg_parser`'s defaults
HQ_HEIGHT, HQ_WIDTH = 1088, 1920  # the HQ parameters' stage-1 544 x 960, doubled


# --------------------------------------------------------------------------------------------------- coefficients
def phi(k: int, z: float) -> float:
    """`phi_k(z) = sum_{m >= 0} z^m / (m + k)!` (`phi_0 = e^z`, `phi_{k+1}(z) = (phi_k(z) - 1/k!) / z`), by its
    series for |z| < 1, where the recursion loses digits to cancellation, and by the recursion elsewhere."""
    if abs(z) < 1.0:
        return sum(z**m / math.factorial(m + k) for m in range(30))
    value = math.exp(z)
    for j in range(k):
        value = (value - 1.0 / math.factorial(j)) / z
    return value


def res2s_coefficients(h: float, c2: float = C2) -> tuple[float, float, float]:
    """`(a21, b1, b2)` of res_2s for a log-time step `h`: the middle point is `x + h * a21 * (D1 - x)`, the end
    `x + h * (b1 * (D1 - x) + b2 * (D2 - x))`."""
    b2 = phi(2, -h) / c2
    return c2 * phi(1, -c2 * h), phi(1, -h) - b2, b2


# --------------------------------------------------------------------------------------------------- noise
def sde_coefficients(sigma_next: float, eta: float) -> tuple[float, float, float]:
    """`(scale, sigma_down, sigma_up)`: a point at `sigma_down` scaled by `scale` plus `sigma_up` fresh noise has
    the signal share `1 - sigma_next` and the noise share `sigma_next` (variances add), `sigma_up = eta *
    sigma_next` (kept just below `sigma_next`)."""
    sigma_up = min(eta * sigma_next, 0.9999 * sigma_next)
    remaining = math.sqrt(max(sigma_next**2 - sigma_up**2, 0.0))
    scale = (1.0 - sigma_next) + remaining
    return scale, remaining / scale, sigma_up


def sde_step(x, target, sigma: float, sigma_next: float, noise: torch.Tensor | None, eta: float):
    """The update from `x` (at `sigma`) to `target` (at `sigma_next`), with fresh `noise` for the share `eta`:
    the line through both points gives a clean end and a direction; the point at `sigma_down` on it, scaled, plus
    `sigma_up * noise`. `eta` 0 (or a last step to 0) returns `target`."""
    if eta == 0.0 or sigma_next == 0.0:
        return target
    scale, sigma_down, sigma_up = sde_coefficients(sigma_next, eta)
    direction = (x - target) / (sigma - sigma_next)
    clean = x - sigma * direction
    return scale * (clean + sigma_down * direction) + sigma_up * noise


def standardized(noise: torch.Tensor) -> torch.Tensor:
    """`noise` in float64 with zero mean and unit (unbiased) standard deviation per sample, as the authors'."""
    noise = noise.double()
    dims = tuple(range(1, noise.dim()))
    return (noise - noise.mean(dim=dims, keepdim=True)) / noise.std(dim=dims, keepdim=True)


# --------------------------------------------------------------------------------------------------- the loop
@dataclass
class Kept:
    """What conditioning keeps of a stream: `mask` (1 = generated, 0 = given, between: partly) and the given
    `clean` latents (read where the mask is below 1)."""

    mask: torch.Tensor
    clean: torch.Tensor

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.mask.to(x)
        return x * mask + self.clean.to(x) * (1.0 - mask)


def _keep(kept: Kept | None, x: torch.Tensor) -> torch.Tensor:
    return x if kept is None else kept.apply(x)


def run_schedule(sigmas) -> tuple[list[float], bool]:
    """The sigmas res_2s steps through (float32 values, as float): a terminal 0 becomes `LAST_SIGMA`; and whether
    a last clean estimate finishes the run."""
    values = torch.as_tensor(sigmas, dtype=torch.float32).flatten().tolist()
    if len(values) < 2:
        raise ConfigError(f"sigmas={values!r}: res_2s needs at least one step (two sigmas)")
    finish = values[-1] == 0.0
    if finish:
        values[-1] = float(torch.tensor(LAST_SIGMA, dtype=torch.float32))
    return values, finish


def res2s_loop(
    predict: Callable[[torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]],
    video: torch.Tensor,
    audio: torch.Tensor,
    sigmas,
    noise: Callable[[torch.Tensor], torch.Tensor] | None = None,
    *,
    kept: tuple[Kept | None, Kept | None] = (None, None),
    eta: float = ETA,
    substep_eta: float = ETA,
    anchor: bool = True,
    steps: Callable[[Iterable[int]], Iterable[int]] = iter,
) -> tuple[torch.Tensor, torch.Tensor]:
    """res_2s over `sigmas` for video and audio latents together. `predict(video, audio, sigma)` gives the clean
    estimates of both; `noise(x)` standardised noise shaped as `x` (drawn for the middle point, video then audio,
    then for the end of the step, when its eta is not 0); `kept` the conditioning of each stream; `steps` wraps
    the step indexes (a progress bar). Arithmetic in float64, latents returned in their dtype."""
    values, finish = run_schedule(sigmas)
    if noise is None and (eta != 0.0 or substep_eta != 0.0):
        raise ConfigError(f"res_2s with eta={eta}, substep_eta={substep_eta} needs a noise source (or both 0)")
    xs = [video.double(), audio.double()]
    dtypes = (video.dtype, audio.dtype)

    def estimates(latents, sigma):
        out = predict(latents[0].to(dtypes[0]), latents[1].to(dtypes[1]), sigma)
        return [_keep(k, d.double()) for k, d in zip(kept, out, strict=True)]

    def noisy(targets, starts, sigma, sigma_next, share):
        draws = [None, None] if share == 0.0 else [noise(x) for x in starts]
        return [
            _keep(k, sde_step(x, t, sigma, sigma_next, n, share))
            for k, x, t, n in zip(kept, starts, targets, draws, strict=True)
        ]

    for i in steps(range(len(values) - 1)):
        sigma, sigma_next = values[i], values[i + 1]
        h = math.log(sigma / sigma_next)
        a21, b1, b2 = res2s_coefficients(h)
        sigma_mid = math.sqrt(sigma * sigma_next)
        first = estimates(xs, sigma)
        mids = [x + h * a21 * (d - x) for x, d in zip(xs, first, strict=True)]
        mids = noisy(mids, xs, sigma, sigma_mid, substep_eta)
        starts = xs
        if anchor and h < ANCHOR_MAX_H and sigma > ANCHOR_MIN_SIGMA:  # the start the noisy middle point came from
            k = h * a21
            starts = [(m - k * d) / (1.0 - k) for m, d in zip(mids, first, strict=True)]
        second = estimates(mids, sigma_mid)
        ends = [x + h * (b1 * (d1 - x) + b2 * (d2 - x)) for x, d1, d2 in zip(starts, first, second, strict=True)]
        xs = [e.to(dt).double() for e, dt in zip(noisy(ends, starts, sigma, sigma_next, eta), dtypes, strict=True)]
    if finish:
        xs = estimates(xs, values[-1])
    return xs[0].to(dtypes[0]), xs[1].to(dtypes[1])


# --------------------------------------------------------------------------------------------------- pipeline terms
def hq_image_seq_len(pipe, num_frames: int, height: int, width: int) -> int:
    """The video latent positions of a stage at `height` x `width` (what the HQ schedule is shifted by)."""
    tc, sc = pipe.vae.temporal_compression, pipe.vae.spatial_compression
    return ((num_frames - 1) // tc + 1) * (height // sc) * (width // sc)


def token_noise(pipe, generator, rand_device) -> Callable[[torch.Tensor], torch.Tensor]:
    """Standardised SDE noise from the call's `generator` (on `rand_device`), in the DiT's token layout."""
    return lambda x: standardized(pipe._token_noise(x.shape, generator, rand_device, x.device))


def denoise(
    pipe,
    video,
    audio,
    scheduler,
    text,
    fps,
    mask,
    guided,
    progress_bar: bool = True,
    keyframes=None,
    audio_mask=None,
    clean=None,
    *,
    generator,
    rand_device,
    eta: float = ETA,
):
    """`LTX2Pipeline.denoise` with res_2s over the scheduler's sigmas (same arguments; `generator` / `rand_device`
    draw the SDE noise). Where `mask` is below 1 the estimates are pulled to `clean` (a first frame) or, without
    it, to the latents as given (retake frames); where `audio_mask` is, to the given sound."""
    use_cfg, scale, audio_scale, rescale, guidance = guided
    extra = {"denoise_mask": mask, "keyframes": keyframes, "audio_denoise_mask": audio_mask}
    extra = {k: v for k, v in extra.items() if v is not None}
    pipe.load_models_to_device(["dit"])

    def predict(v, a, sigma):
        v_video, v_audio = pipe.predict(v, a, sigma, text, fps, use_cfg, scale, audio_scale, rescale, **extra,
                                        guidance=guidance)  # fmt: skip
        return v - sigma * v_video, a - sigma * v_audio

    kept = (
        None if mask is None else Kept(mask, video if clean is None else clean),
        None if audio_mask is None else Kept(audio_mask, audio),
    )
    return res2s_loop(
        predict, video, audio, scheduler.sigmas, token_noise(pipe, generator, rand_device), kept=kept, eta=eta,
        steps=lambda indexes: pipe.progress(indexes, progress_bar),
    )  # fmt: skip


def check_hq(refused: dict) -> None:
    """HQ runs the full model's two stages (the pipeline checks the upsampler, the sizes and the distilled LoRA);
    `refused` (name -> value) are settings of other pipelines, each refused by name when not None."""
    given = [name for name, value in refused.items() if value is not None]
    if given:
        raise ConfigError(
            f"use_hq_pipeline does not take {', '.join(given)}: the HQ pipeline is the full model's two-stage recipe "
            "with res_2s steps and the distilled LoRA in both stages"
        )
