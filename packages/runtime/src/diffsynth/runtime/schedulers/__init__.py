"""Flow-matching schedules: per-family sigma templates (plain functions), the `FlowMatchScheduler` that steps
along one (Euler) and samples training noise levels, and `UniPCScheduler` (the multistep sampler the Wan authors
use); `make_scheduler` picks one by name."""

from __future__ import annotations

from .flow_match import FlowMatchScheduler, apply_strength, gaussian_training_weights
from .templates import (
    FIXED_TABLES,
    LTX2_DISTILLED_SIGMAS,
    LTX2_STAGE2_SIGMAS,
    QWEN_IMAGE_LIGHTNING_MU,
    TEMPLATES,
    exponential_shift,
    flux1,
    flux2,
    flux2_empirical_mu,
    get_template,
    linear_grid,
    linear_mu,
    ltx2,
    ltx2_distilled,
    ltx2_stage2,
    qwen_image,
    qwen_image_lightning,
    static_shift,
    stretch_to_terminal,
    wan,
    z_image,
)
from .unipc import UniPCScheduler

SAMPLERS = ("euler", "unipc")


def make_scheduler(template: str, sampler: str = "euler", **template_defaults) -> FlowMatchScheduler:
    """The scheduler of `template` that steps with `sampler`: "euler" (`FlowMatchScheduler`) or "unipc"."""
    from ..errors import ConfigError

    if sampler not in SAMPLERS:
        raise ConfigError(f"sampler={sampler!r} is not known; use one of {', '.join(SAMPLERS)}")
    cls = UniPCScheduler if sampler == "unipc" else FlowMatchScheduler
    return cls(template, **template_defaults)


__all__ = [
    "FIXED_TABLES",
    "LTX2_DISTILLED_SIGMAS",
    "LTX2_STAGE2_SIGMAS",
    "QWEN_IMAGE_LIGHTNING_MU",
    "SAMPLERS",
    "TEMPLATES",
    "FlowMatchScheduler",
    "UniPCScheduler",
    "apply_strength",
    "exponential_shift",
    "flux1",
    "flux2",
    "flux2_empirical_mu",
    "gaussian_training_weights",
    "get_template",
    "linear_grid",
    "linear_mu",
    "ltx2",
    "ltx2_distilled",
    "ltx2_stage2",
    "make_scheduler",
    "qwen_image",
    "qwen_image_lightning",
    "static_shift",
    "stretch_to_terminal",
    "wan",
    "z_image",
]
