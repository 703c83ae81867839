"""Flow-matching sampler and training helpers over a sigma template.

Convention (rectified flow, as every supported family was trained): `x_sigma = (1 - sigma) * x0 + sigma * noise`,
the model predicts the velocity `v = noise - x0`, and sampling takes Euler steps `x += (sigma_next - sigma) * v`
from sigma near 1 down to 0.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch

from ..errors import ConfigError
from .templates import FIXED_TABLES, check_steps, get_template

TRAINING_DISTRIBUTIONS = ("uniform", "logit_normal")  # how `sample_training_sigmas` picks grid positions


def apply_strength(sigmas: torch.Tensor, denoising_strength: float) -> torch.Tensor:
    """The tail of an N+1 schedule that image-to-image runs: diffusers' `get_timesteps` convention.

    Skip the first `int(N - N * strength)` steps and keep the rest, so about `N * strength` steps run and the first
    kept sigma is the full schedule's value at unshifted time ~`strength` (with a shift it is above `strength`).
    DiffSynth-Studio instead squeezes all N steps into [0, strength] before shifting; we keep diffusers' rule
    because it reuses the exact noise levels of the text-to-image schedule.
    """
    if isinstance(denoising_strength, bool) or not isinstance(denoising_strength, (int, float)):
        raise ConfigError(f"denoising_strength={denoising_strength!r} is not accepted; use a number in (0, 1]")
    if not 0 < denoising_strength <= 1:
        raise ConfigError(f"denoising_strength={denoising_strength!r} is not accepted; use a number in (0, 1]")
    steps = len(sigmas) - 1
    start = int(max(steps - min(steps * denoising_strength, steps), 0))
    if start >= steps:
        raise ConfigError(
            f"denoising_strength={denoising_strength!r} with {steps} steps leaves no step to run; "
            f"raise denoising_strength or num_inference_steps"
        )
    return sigmas[start:]


def gaussian_training_weights(sigmas: torch.Tensor, num_train_timesteps: int = 1000) -> torch.Tensor:
    """DiffSynth-Studio's loss weights: a bell over the timestep t = 1000 * sigma, peaked at t = 500.

    `w = exp(-2 * ((t - T/2) / T)^2)`, minus its minimum over the grid (so the least weighted grid point gets 0),
    rescaled to mean 1 over the grid. On its 1000-point training grid this is DiffSynth-Studio's
    `set_training_weight` exactly; we skip its extra empirical rescale for other grid sizes.
    """
    t = sigmas.double() * num_train_timesteps
    bell = torch.exp(-2 * ((t - num_train_timesteps / 2) / num_train_timesteps) ** 2)
    bell = bell - bell.min()
    return (bell * (len(bell) / bell.sum())).to(torch.float32)


def _check_sigmas(sigmas) -> torch.Tensor:
    """An explicit schedule: N noise levels (terminal 0 appended), or N+1 that already end with 0."""
    values = torch.as_tensor(sigmas, dtype=torch.float64).flatten().cpu()
    accepted = "a non-empty, non-increasing sequence of finite values in [0, 1]"
    if values.numel() == 0 or not torch.isfinite(values).all():
        raise ConfigError(f"sigmas={values.tolist()!r} is not accepted; use {accepted}")
    if (values < 0).any() or (values > 1).any() or (values[1:] > values[:-1]).any():
        raise ConfigError(f"sigmas={values.tolist()!r} is not accepted; use {accepted}")
    if len(values) == 1 or values[-1] != 0:
        values = torch.cat([values, values.new_zeros(1)])
    return values.to(torch.float32)


class FlowMatchScheduler:
    """Holds one sampling schedule (N+1 `sigmas`, N `timesteps`) and one training grid; steps along the schedule.

    `FlowMatchScheduler("flux1", image_seq_len=4096)` fixes template settings that every `set_timesteps` call
    reuses unless it overrides them.
    """

    num_train_timesteps = 1000

    def __init__(self, template: str, **template_defaults):
        self.template = template
        self._fn = get_template(template)
        self._accepted = [
            p.name for p in inspect.signature(self._fn).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY
        ]
        self.template_defaults: dict = {}
        self.template_defaults = self._settings(template_defaults)
        self.sigmas: torch.Tensor | None = None
        self.timesteps: torch.Tensor | None = None
        self.train_sigmas: torch.Tensor | None = None
        self.train_weights: torch.Tensor | None = None

    def _settings(self, overrides: dict) -> dict:
        unknown = sorted(set(overrides) - set(self._accepted))
        if unknown:
            accepted = ", ".join(self._accepted) or "no settings"
            raise ConfigError(f"template {self.template!r} does not take {', '.join(unknown)}; it accepts {accepted}")
        return {**self.template_defaults, **overrides}

    @property
    def num_inference_steps(self) -> int:
        return 0 if self.timesteps is None else len(self.timesteps)

    # ------------------------------------------------------------------------------------------------ sampling
    def set_timesteps(
        self,
        num_inference_steps: int,
        *,
        denoising_strength: float = 1.0,
        sigmas: Sequence[float] | torch.Tensor | None = None,
        **template_kwargs,
    ) -> None:
        """Build the schedule: `.sigmas` (N+1, float32, ends with 0) and `.timesteps` (`1000 * sigma`, N).

        `sigmas` replaces the template: they are used as given, not shifted (diffusers would shift them); the
        step count is then their length. `denoising_strength < 1` keeps the tail of the schedule
        (see `apply_strength`); start image-to-image from `add_noise(x0, noise, scheduler.sigmas[0])`.
        """
        check_steps(num_inference_steps)
        settings = self._settings(template_kwargs)
        full = self._fn(num_inference_steps, **settings) if sigmas is None else _check_sigmas(sigmas)
        self.sigmas = apply_strength(full, denoising_strength).clone()
        self.timesteps = self.sigmas[:-1] * self.num_train_timesteps

    def step(self, model_output: torch.Tensor, step_index: int, sample: torch.Tensor) -> torch.Tensor:
        """One Euler step on the velocity, from `sigmas[step_index]` to `sigmas[step_index + 1]`, in float32."""
        if self.sigmas is None:
            raise ConfigError("FlowMatchScheduler.step was called before set_timesteps")
        if not 0 <= int(step_index) < self.num_inference_steps:
            raise ConfigError(f"step_index={step_index!r} is not accepted; use 0..{self.num_inference_steps - 1}")
        i = int(step_index)
        dt = self.sigmas[i + 1] - self.sigmas[i]
        return (sample.float() + dt * model_output.float()).to(sample.dtype)

    @staticmethod
    def add_noise(original: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
        """`(1 - sigma) * x0 + sigma * noise`; `sigma` is a number, a 0-d tensor or one value per batch item."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=original.device)
        if sigma.dim() == 1:
            sigma = sigma.view(-1, *([1] * (original.dim() - 1)))
        return ((1 - sigma) * original.float() + sigma * noise.float()).to(original.dtype)

    @staticmethod
    def training_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The velocity the model learns: d x_sigma / d sigma = noise - x0."""
        return noise - x0

    # ------------------------------------------------------------------------------------------------ training
    def set_training_grid(self, num_train_timesteps: int = 1000, **template_kwargs) -> None:
        """The template's schedule on a `num_train_timesteps` grid (DiffSynth-Studio trains on 1000 steps), with
        its loss weights. The fixed LTX-2 tables have no such grid; LTX-2 trains on `ltx2`.
        """
        if self.template in FIXED_TABLES:
            raise ConfigError(
                f"template {self.template!r} is a fixed sampling table and has no training grid; use 'ltx2' to train"
            )
        check_steps(num_train_timesteps, "num_train_timesteps")
        sigmas = self._fn(num_train_timesteps, **self._settings(template_kwargs))[:-1]
        self.train_sigmas = sigmas
        self.train_weights = gaussian_training_weights(sigmas, self.num_train_timesteps)

    def sample_training_sigmas(
        self,
        batch: int,
        generator: torch.Generator | None = None,
        *,
        min_boundary: float = 0.0,
        max_boundary: float = 1.0,
        device: torch.device | str | None = None,
        distribution: str = "uniform",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
    ) -> torch.Tensor:
        """`batch` sigmas drawn from the training grid (built with the template defaults if not set): uniformly,
        or with `distribution="logit_normal"` (SD3's timestep density, kohya's and ai-toolkit's "sigmoid") each
        grid position weighted by the logit-normal density (`logit_mean`, `logit_std`) of its noise fraction t
        (1 at the noisy end), so the middle noise levels are drawn most; the family's shift applies on top.

        `min_boundary`/`max_boundary` restrict the draw to grid positions `[int(min*T), int(max*T))` counted from
        the noisy end, as DiffSynth-Studio's `min/max_timestep_boundary` do (e.g. Wan 2.2's two experts).
        """
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ConfigError(f"batch={batch!r} is not accepted; use an integer >= 1")
        if distribution not in TRAINING_DISTRIBUTIONS or not logit_std > 0:
            raise ConfigError(
                f"timestep distribution {distribution!r} (std {logit_std}): use one of {TRAINING_DISTRIBUTIONS} "
                "with a std > 0"
            )
        start, stop = self.training_span()
        size = len(self.train_sigmas)
        low, high = max(start, int(min_boundary * size)), min(stop, int(max_boundary * size))
        if not (0 <= min_boundary < max_boundary <= 1) or low >= high:
            raise self.span_error(min_boundary, max_boundary)
        gen_device = generator.device if generator is not None else "cpu"
        if distribution == "uniform":
            index = torch.randint(low, high, (batch,), generator=generator, device=gen_device).cpu()
        else:
            t = 1 - (torch.arange(low, high, dtype=torch.float64) + 0.5) / size  # noise fraction of each position
            z = (torch.log(t / (1 - t)) - logit_mean) / logit_std
            density = torch.exp(-0.5 * z**2) / (t * (1 - t))  # the logit-normal pdf, up to a constant
            picks = torch.multinomial(density.float().to(gen_device), batch, replacement=True, generator=generator)
            index = low + picks.cpu()
        return self.train_sigmas[index].to(device)

    def training_span(self) -> tuple[int, int]:
        """The training-grid positions `[start, stop)` draws may come from: all of them here; a subclass narrows
        it (one Wan 2.2 A14B expert's noise levels)."""
        if self.train_sigmas is None:
            self.set_training_grid()
        return 0, len(self.train_sigmas)

    def span_error(self, min_boundary: float, max_boundary: float) -> ConfigError:
        """What `sample_training_sigmas` raises when the boundaries leave no grid point of the span."""
        return ConfigError(
            f"min_boundary={min_boundary!r}, max_boundary={max_boundary!r} are not accepted; "
            f"use 0 <= min_boundary < max_boundary <= 1 spanning at least one of {len(self.train_sigmas)} grid points"
        )

    def training_weight(self, sigmas: torch.Tensor | float) -> torch.Tensor:
        """Loss weight of each sigma: the weight of the nearest training-grid point (float32, same shape)."""
        if self.train_sigmas is None:
            self.set_training_grid()
        sigmas = torch.as_tensor(sigmas, dtype=torch.float32)
        flat = sigmas.detach().float().cpu().reshape(-1, 1)
        nearest = (flat - self.train_sigmas.view(1, -1)).abs().argmin(dim=1)
        return self.train_weights[nearest].view(sigmas.shape).to(sigmas.device)

    def __repr__(self) -> str:
        shown = "unset" if self.sigmas is None else f"{self.num_inference_steps} steps"
        settings = "".join(f", {k}={v!r}" for k, v in self.template_defaults.items())
        return f"FlowMatchScheduler({self.template!r}{settings}; {shown})"
