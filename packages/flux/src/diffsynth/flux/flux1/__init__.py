"""FLUX.1 (dev, Krea, Kontext, schnell): the DiT with BFL's original key names, the ControlNet and their formats."""

from __future__ import annotations

from .controlnet import Flux1ControlNet, Flux1ControlNetConfig
from .dit import Flux1DiT, Flux1DiTConfig

__all__ = ["Flux1ControlNet", "Flux1ControlNetConfig", "Flux1DiT", "Flux1DiTConfig"]
