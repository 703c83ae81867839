"""What the FLUX package contributes to the runtime: two families, FLUX.1 and FLUX.2, with their model
specs, presets, pipelines and training tasks (registered together through one entry point)."""

from __future__ import annotations

from diffsynth.runtime.registry import Family

from .flux1.controlnet_formats import FLUX1_CONTROLNET_SPEC
from .flux1.encoder_formats import CLIP_TEXT_SPEC, T5_ENCODER_SPEC
from .flux1.formats import FLUX1_DIT_SPEC
from .flux1.lora_encoder import LORA_ENCODER_SPEC
from .flux1.lora_fusion import LORA_FUSION_SPEC
from .flux1.step1x_connector import STEP1X_CONNECTOR_SPEC
from .flux1.value_control import VALUE_ENCODER_SPEC
from .flux2.encoder_formats import MISTRAL3_TEXT_SPEC
from .flux2.formats import FLUX2_DIT_SPEC
from .flux2.presets import PRESETS as FLUX2_PRESETS
from .flux2.vae_formats import FLUX2_VAE_SPEC
from .presets import PRESETS

FAMILY = Family(
    name="flux",
    specs=(
        FLUX1_DIT_SPEC,
        CLIP_TEXT_SPEC,
        T5_ENCODER_SPEC,
        FLUX1_CONTROLNET_SPEC,
        STEP1X_CONNECTOR_SPEC,
        VALUE_ENCODER_SPEC,
        LORA_ENCODER_SPEC,
        LORA_FUSION_SPEC,
    ),
    presets=PRESETS,
    pipeline="diffsynth.flux.pipeline:FluxImagePipeline",
    training="diffsynth.flux.training:FluxTrainingTask",
    lora_converter="diffsynth.flux.flux1.lora:convert_flux1_naming",
    description="FLUX.1 (dev, Krea, Kontext, schnell, Fill, Canny, Depth) from Black Forest Labs: 12B "
    "double/single-stream DiT, CLIP-L + T5-XXL text encoders, FLUX.1 VAE, ControlNets in the diffusers "
    "FluxControlNetModel format, Redux image prompts",
)

FLUX2_FAMILY = Family(
    name="flux2",
    specs=(FLUX2_DIT_SPEC, FLUX2_VAE_SPEC, MISTRAL3_TEXT_SPEC),  # klein's Qwen3 encoder is the runtime's
    presets=FLUX2_PRESETS,
    pipeline="diffsynth.flux.flux2.pipeline:Flux2ImagePipeline",
    training="diffsynth.flux.flux2.training:Flux2TrainingTask",
    lora_converter="diffsynth.flux.flux2.lora:convert_flux2_naming",
    description="FLUX.2 (dev 32B with Mistral-Small-3.1; klein 4B/9B with Qwen3) from Black Forest Labs: "
    "shared-modulation double/single-stream DiT, 32-channel VAE, multi-reference editing (KV-cached on klein-9B-KV)",
)

FAMILIES = (FAMILY, FLUX2_FAMILY)
