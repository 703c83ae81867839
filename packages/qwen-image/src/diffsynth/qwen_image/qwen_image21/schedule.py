"""Qwen-Image 2.1's sampling schedule, read from the model's own files.

Qwen ships the schedule as data, not code: `scheduler/scheduler_config.json` (a diffusers
`FlowMatchEulerDiscreteScheduler` config: resolution-dependent shift, optional terminal stretch) and, for the
step-distilled models, `sample_sigmas` in `model_index.json` (the unshifted noise levels, whose count is the
number of steps). `ScheduleSettings` holds both and builds the N+1 sigmas the way diffusers' `QwenImage21Pipeline`
does: the raw levels (`sample_sigmas`, else `linspace(1, 1/N, N)`), shifted by `mu` linear in the generated
image's tokens (or by the static `shift`), stretched to `shift_terminal`, then the terminal 0.

Settings this engine does not sample with (Karras / exponential / beta spacing, inverted or stochastic sigmas)
are refused by name rather than silently ignored.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.schedulers.templates import (
    check_steps,
    exponential_shift,
    linear_mu,
    static_shift,
    stretch_to_terminal,
)

logger = logging.getLogger(__name__)

_REFUSED = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas", "stochastic_sampling")


def _number(source: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{source}: {name}={value!r} is not a finite number")
    return float(value)


@dataclass(frozen=True)
class ScheduleSettings:
    """The schedule-relevant fields of a diffusers scheduler config plus the model's `sample_sigmas`.

    Defaults are diffusers' `FlowMatchEulerDiscreteScheduler()` and the pipeline's `calculate_shift` defaults: what
    a folder without `scheduler/` would get there.
    """

    shift: float = 1.0
    use_dynamic_shifting: bool = False
    time_shift_type: str = "exponential"
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    shift_terminal: float | None = None
    sample_sigmas: tuple[float, ...] | None = None

    @classmethod
    def from_configs(
        cls, scheduler_config: Mapping | None, model_index: Mapping | None = None, source: str = "scheduler config"
    ) -> ScheduleSettings:
        """From a parsed `scheduler_config.json` and `model_index.json` (either may be None)."""
        config = dict(scheduler_config or {})
        refused = [name for name in _REFUSED if config.get(name)]
        if refused:
            raise ConfigError(f"{source}: {', '.join(f'{n}={config[n]!r}' for n in refused)} is not supported")
        time_shift = config.get("time_shift_type", "exponential")
        if time_shift not in ("exponential", "linear"):
            raise ConfigError(f"{source}: time_shift_type={time_shift!r} is not supported; use exponential or linear")
        fields = {"time_shift_type": time_shift, "use_dynamic_shifting": bool(config.get("use_dynamic_shifting"))}
        for name in ("shift", "base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len"):
            if config.get(name) is not None:
                fields[name] = _number(source, name, config[name])
        if config.get("shift_terminal"):
            terminal = _number(source, "shift_terminal", config["shift_terminal"])
            if not 0 < terminal < 1:
                raise ConfigError(f"{source}: shift_terminal={terminal} must be in (0, 1)")
            fields["shift_terminal"] = terminal
        raw = (model_index or {}).get("sample_sigmas")
        if raw is not None:
            fields["sample_sigmas"] = _checked_levels(raw, "model_index.json sample_sigmas")
        return cls(**fields)

    @classmethod
    def from_folder(cls, repo_folder: Path) -> ScheduleSettings:
        """From `<repo>/scheduler/scheduler_config.json` and `<repo>/model_index.json`, whichever exist."""
        scheduler_file = repo_folder / "scheduler" / "scheduler_config.json"
        index_file = repo_folder / "model_index.json"
        scheduler = _read_json(scheduler_file) if scheduler_file.is_file() else None
        index = _read_json(index_file) if index_file.is_file() else None
        if scheduler is None:
            logger.warning(
                "%s has no scheduler/scheduler_config.json: sampling with diffusers' default flow-match "
                "schedule (no resolution shift), which is not what Qwen-Image 2.1 was tuned for",
                repo_folder,
            )
        return cls.from_configs(scheduler, index, source=str(scheduler_file))

    def steps(self, requested: int | None) -> int:
        """The step count: `sample_sigmas` fixes it (a different request is an error), else the request."""
        if self.sample_sigmas is not None:
            if requested is not None and requested != len(self.sample_sigmas):
                raise ConfigError(
                    f"num_inference_steps={requested}: this model samples the {len(self.sample_sigmas)} noise levels "
                    "of its model_index.json (sample_sigmas); pass sigmas=[...] for another schedule"
                )
            return len(self.sample_sigmas)
        return check_steps(40 if requested is None else requested)

    def sigmas(self, num_inference_steps: int, image_seq_len: int) -> torch.Tensor:
        """N+1 float32 sigmas ending with 0, for a generated image of `image_seq_len` latent tokens."""
        n = check_steps(num_inference_steps)
        if self.sample_sigmas is not None:
            raw = torch.tensor(self.sample_sigmas, dtype=torch.float64)
        else:
            raw = torch.linspace(1.0, 1.0 / n, n, dtype=torch.float64)
        if self.use_dynamic_shifting:
            mu = linear_mu(
                image_seq_len, self.base_image_seq_len, self.max_image_seq_len, self.base_shift, self.max_shift
            )
            if self.time_shift_type == "exponential":
                shifted = exponential_shift(raw, mu)
            else:
                shifted = mu / (mu + (1 / raw - 1))
        else:
            shifted = static_shift(raw, self.shift)
        if self.shift_terminal is not None:
            shifted = stretch_to_terminal(shifted, self.shift_terminal)
        return torch.cat([shifted, shifted.new_zeros(1)]).to(torch.float32)


def _checked_levels(values: Sequence, what: str) -> tuple[float, ...]:
    levels = [_number(what, "value", v) for v in values]
    if (
        not levels
        or any(not 0 < v <= 1 for v in levels)
        or any(b >= a for a, b in zip(levels, levels[1:], strict=False))
    ):
        raise ConfigError(f"{what}={list(values)!r} must be strictly decreasing values in (0, 1]")
    return tuple(levels)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} is not readable JSON: {exc}") from exc
