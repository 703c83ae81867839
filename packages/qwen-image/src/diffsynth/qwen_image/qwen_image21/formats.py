"""What Qwen-Image 2.1 contributes to the runtime: its family (DiT, VAE and Qwen3-VL text encoder specs, presets,
pipeline), registered beside Qwen-Image's through the package's one entry point."""

from __future__ import annotations

from diffsynth.runtime.registry import Family

from .dit_formats import DIT21_SPEC
from .presets import PRESETS
from .text_encoder import TEXT_ENCODER21_SPEC
from .vae_formats import QWEN_IMAGE21_VAE_SPEC

FAMILY = Family(
    name="qwen_image21",
    specs=(DIT21_SPEC, QWEN_IMAGE21_VAE_SPEC, TEXT_ENCODER21_SPEC),
    presets=PRESETS,
    pipeline="diffsynth.qwen_image.qwen_image21.pipeline:QwenImage21Pipeline",
    training="diffsynth.qwen_image.qwen_image21.training:QwenImage21TrainingTask",
    description="Qwen-Image 2.1 (and Turbo): single-stream block-causal DiT (32 blocks) over one interleaved "
    "text/image sequence with a prefix KV cache, Qwen3-VL-8B text encoder, 64-channel RGBA VAE",
)
