"""Flow-matching schedules: per-family sigma templates (plain functions) and the `FlowMatchScheduler` that steps
along one and samples training noise levels."""

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

__all__ = [
    "FIXED_TABLES",
    "LTX2_DISTILLED_SIGMAS",
    "LTX2_STAGE2_SIGMAS",
    "QWEN_IMAGE_LIGHTNING_MU",
    "TEMPLATES",
    "FlowMatchScheduler",
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
    "qwen_image",
    "qwen_image_lightning",
    "static_shift",
    "stretch_to_terminal",
    "wan",
    "z_image",
]
