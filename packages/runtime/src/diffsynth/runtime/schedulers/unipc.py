"""UniPC for flow matching: the multistep predictor-corrector sampler the Wan authors sample with (their
`FlowUniPCMultistepScheduler`; diffusers' `UniPCMultistepScheduler` with flow sigmas), on our sigma schedules.

A flow model's velocity `v` at noise level `s` gives the clean estimate `x0 = x - s * v`; UniPC keeps the last
`order` estimates and extrapolates them in log-SNR `lambda = log((1 - s) / s)` (the "bh2" variant, data
prediction). Each step first corrects the current sample with the new estimate (UniC), then predicts the next
(UniP); the first step and the last one run at first order. At equal step counts it tracks the ODE better than
Euler, which is why the authors need fewer steps with it.
"""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError
from .flow_match import FlowMatchScheduler


class UniPCScheduler(FlowMatchScheduler):
    """`FlowMatchScheduler` whose `step` is UniPC (order 2 by default, bh2, data prediction, lower order on the
    last steps). Steps must be taken in order from 0: the sampler carries the previous estimates between them."""

    def __init__(self, template: str, *, solver_order: int = 2, **template_defaults):
        super().__init__(template, **template_defaults)
        if isinstance(solver_order, bool) or solver_order not in (1, 2, 3):
            raise ConfigError(f"solver_order={solver_order!r} is not accepted; use 1, 2 or 3")
        self.solver_order = solver_order
        self._reset()

    def _reset(self) -> None:
        self._estimates: list[torch.Tensor] = []  # x0 estimates, oldest first, at steps `_steps`
        self._steps: list[int] = []
        self._last_sample: torch.Tensor | None = None
        self._order = 0  # the order of the last prediction, which its correction uses
        self._next_index = 0

    def set_timesteps(self, num_inference_steps: int, **kwargs) -> None:
        super().set_timesteps(num_inference_steps, **kwargs)
        _check_strictly_decreasing(self.sigmas)
        self._reset()

    def _lambda(self, i: int) -> float:
        """log-SNR at `sigmas[i]`: -inf at pure noise, +inf at the clean end."""
        s = float(self.sigmas[i])
        return math.log1p(-s) - math.log(s) if 0.0 < s < 1.0 else (math.inf if s <= 0.0 else -math.inf)

    def step(self, model_output: torch.Tensor, step_index: int, sample: torch.Tensor) -> torch.Tensor:
        """Correct `sample` (at `sigmas[step_index]`) with this velocity, then predict the sample at the next sigma."""
        if self.sigmas is None:
            raise ConfigError("UniPCScheduler.step was called before set_timesteps")
        i = int(step_index)
        if not 0 <= i < self.num_inference_steps:
            raise ConfigError(f"step_index={step_index!r} is not accepted; use 0..{self.num_inference_steps - 1}")
        if i == 0:
            self._reset()
        elif i != self._next_index:
            raise ConfigError(f"UniPC steps run in order: step {self._next_index} is next, not {i}")
        dtype, x = sample.dtype, sample.float()
        estimate = x - float(self.sigmas[i]) * model_output.float()
        if self._last_sample is not None:  # UniC: the new estimate corrects the step that led here
            x = self._update(self._last_sample, i - 1, i, self._order, estimate)
        self._estimates = [*self._estimates, estimate][-self.solver_order :]
        self._steps = [*self._steps, i][-self.solver_order :]
        self._order = min(self.solver_order, self.num_inference_steps - i, i + 1)  # warm up; lower at the end
        self._last_sample = x
        self._next_index = i + 1
        return self._update(x, i, i + 1, self._order, None).to(dtype)

    def _update(self, x: torch.Tensor, s: int, t: int, order: int, new: torch.Tensor | None) -> torch.Tensor:
        """From `x` at `sigmas[s]` to `sigmas[t]` at `order`: UniP, extrapolating the kept estimates (`new` None),
        or UniC with `new`, the estimate at `t` (not yet among the kept ones)."""
        (s_step, m0), *older = list(zip(self._steps, self._estimates, strict=True))[::-1]  # m0: the estimate at s
        if s_step != s:
            raise AssertionError(f"UniPC history is at step {s_step}, not {s}")
        sigma_t, sigma_s = float(self.sigmas[t]), float(self.sigmas[s])
        alpha_t = 1.0 - sigma_t
        lambda_s = self._lambda(s)
        h = self._lambda(t) - lambda_s
        # the older estimates in use and where they sit relative to this step (pure noise has no log-SNR: left out)
        points = [(step, m) for step, m in older[: order - 1] if math.isfinite(self._lambda(step))]
        ratios = [(self._lambda(step) - lambda_s) / h for step, _ in points]
        differences = [(m - m0) / r for (_, m), r in zip(points, ratios, strict=True)]
        hh = -h
        h_phi_1 = b_h = math.expm1(hh)  # "bh2": B(h) = e^{-h} - 1
        r_rows, b = [], []
        h_phi_k, factorial = h_phi_1 / hh - 1.0, 1
        for k in range(1, len(points) + 2):
            r_rows.append([r ** (k - 1) for r in [*ratios, 1.0]])
            b.append(h_phi_k * factorial / b_h)
            factorial *= k + 1
            h_phi_k = h_phi_k / hh - 1.0 / factorial
        base = (sigma_t / sigma_s) * x - alpha_t * h_phi_1 * m0
        if new is None:  # UniP
            if not differences:
                return base
            if len(differences) == 1:
                rhos = [0.5]
            else:
                rhos = _solve([row[:-1] for row in r_rows[:-1]], b[:-1])
            return base - alpha_t * b_h * sum(rho * d for rho, d in zip(rhos, differences, strict=True))
        rhos = [0.5] if not differences else _solve(r_rows, b)  # UniC
        residual = sum((rho * d for rho, d in zip(rhos[:-1], differences, strict=True)), torch.zeros_like(x))
        return base - alpha_t * b_h * (residual + rhos[-1] * (new - m0))


def _check_strictly_decreasing(sigmas: torch.Tensor) -> None:
    """UniPC steps in log-SNR and divides by its change: a repeated sigma (a zero step) has no such step."""
    values = sigmas.tolist()
    for i in range(1, len(values)):
        if not values[i] < values[i - 1]:
            raise ConfigError(
                f"sigmas={[round(v, 6) for v in values]!r} is not accepted by UniPC: sigmas[{i}]={values[i]:.6g} is "
                f"not below sigmas[{i - 1}]={values[i - 1]:.6g}; use a strictly decreasing schedule (or sampler euler)"
            )


def _solve(rows: list[list[float]], b: list[float]) -> list[float]:
    return torch.linalg.solve(torch.tensor(rows, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)).tolist()
