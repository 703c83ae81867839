"""DiffSynth Z-Image family: Z-Image-Turbo and Z-Image text-to-image and image-to-image, with the Fun ControlNets;
Z-Image Omni (generation and editing with `edit_image`).

Names are imported lazily (the pipeline pulls in transformers). `ControlNetInput` is the runtime's
(`diffsynth.runtime.controlnet`), shared by every family that takes ControlNets.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ModelConfig": "diffsynth.runtime.hub",  # so a DiffSynth-Studio import changes in one line
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
        module = _EXPORTS[name]
        module = importlib.import_module(module if module.startswith("diffsynth.") else f".{module}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'diffsynth.z_image' has no attribute {name!r}")
