"""FLUX.1 (dev, Krea, Kontext, schnell): the DiT with BFL's original key names, the ControlNet, the IP-Adapter and their formats."""

from __future__ import annotations

from .controlnet import Flux1ControlNet, Flux1ControlNetConfig
from .dit import Flux1DiT, Flux1DiTConfig
from .ip_adapter import FluxIPAdapter, FluxIPAdapterConfig

__all__ = [
    "Flux1ControlNet",
    "Flux1ControlNetConfig",
    "Flux1DiT",
    "Flux1DiTConfig",
    "FluxIPAdapter",
    "FluxIPAdapterConfig",
]
