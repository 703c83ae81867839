"""What the FLUX package contributes to the runtime: model specs, presets and the FLUX.1 pipeline."""

from __future__ import annotations

from diffsynth.runtime.registry import Family

from .flux1.controlnet_formats import FLUX1_CONTROLNET_SPEC
from .flux1.encoder_formats import CLIP_TEXT_SPEC, T5_ENCODER_SPEC
from .flux1.formats import FLUX1_DIT_SPEC
from .presets import PRESETS

FAMILY = Family(
    name="flux",
    specs=(FLUX1_DIT_SPEC, CLIP_TEXT_SPEC, T5_ENCODER_SPEC, FLUX1_CONTROLNET_SPEC),
    presets=PRESETS,
    pipeline="diffsynth.flux.pipeline:FluxImagePipeline",
    training="diffsynth.flux.training:FluxTrainingTask",
    description="FLUX.1 (dev, Krea, Kontext, schnell) from Black Forest Labs: 12B double/single-stream DiT, "
    "CLIP-L + T5-XXL text encoders, FLUX.1 VAE, ControlNets in the diffusers FluxControlNetModel format",
)
