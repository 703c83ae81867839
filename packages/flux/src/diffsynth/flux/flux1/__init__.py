"""FLUX.1 (dev, Krea, Kontext, schnell): the DiT with BFL's original key names and its formats."""

from __future__ import annotations

from .dit import Flux1DiT, Flux1DiTConfig

__all__ = ["Flux1DiT", "Flux1DiTConfig"]
