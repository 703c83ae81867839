"""The runtime's own `Family`: specs of architectures shared by several model families."""

from __future__ import annotations

from ..registry import Family
from .autoencoder_kl import AUTOENCODER_KL_SPEC
from .qwen3 import QWEN3_SPEC
from .qwen25vl import TEXT_ENCODER_SPEC as QWEN25VL_SPEC
from .wan_vae import WAN21_VAE_SPEC, WAN22_VAE_SPEC

FAMILY = Family(
    name="runtime",
    specs=(AUTOENCODER_KL_SPEC, QWEN3_SPEC, QWEN25VL_SPEC, WAN21_VAE_SPEC, WAN22_VAE_SPEC),
    description="Shared architectures: FLUX.1-style AutoencoderKL, Qwen3 and Qwen2.5-VL text encoders.",
)
