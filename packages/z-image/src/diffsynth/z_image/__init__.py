"""DiffSynth Z-Image family: Z-Image-Turbo and Z-Image text-to-image and image-to-image, with the Fun ControlNets;
Z-Image Omni (generation and editing with `edit_image`).

Names are imported lazily (the pipeline pulls in transformers). `ControlNetInput` is the runtime's
(`diffsynth.runtime.controlnet`), shared by every family that takes ControlNets.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ZImageI2LPipeline": "image_to_lora",
    "ZImagePipeline": "pipeline",
    "ControlNetInput": "pipeline",
    "ZImageDiT": "dit",
    "ZImageDiTConfig": "dit",
    "ZImageControlNet": "controlnet",
    "ZImageControlNetConfig": "controlnet",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'diffsynth.z_image' has no attribute {name!r}")
