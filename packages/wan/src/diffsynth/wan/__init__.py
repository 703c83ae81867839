"""DiffSynth Wan video family: Wan 2.1 and Wan 2.2 text/image-to-video (T2V, I2V, TI2V) and their variants."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ModelConfig": "diffsynth.runtime.hub",  # so a DiffSynth-Studio import changes in one line
    "WanVideoPipeline": "pipeline",
    "WanDiT": "dit",
    "WanDiTConfig": "dit",
    "WanDancerDiT": "dancer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        module = _EXPORTS[name]
        module = importlib.import_module(module if module.startswith("diffsynth.") else f".{module}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'diffsynth.wan' has no attribute {name!r}")
