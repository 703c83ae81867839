"""DiffSynth Z-Image family: Z-Image-Turbo and Z-Image text-to-image and image-to-image."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ZImagePipeline": "pipeline",
    "ZImageDiT": "dit",
    "ZImageDiTConfig": "dit",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'diffsynth.z_image' has no attribute {name!r}")
