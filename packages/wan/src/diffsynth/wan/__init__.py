"""DiffSynth Wan video family: Wan 2.1 and Wan 2.2 text/image-to-video (T2V, I2V, TI2V) and their variants."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "WanVideoPipeline": "pipeline",
    "WanDiT": "dit",
    "WanDiTConfig": "dit",
    "WanDancerDiT": "dancer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'diffsynth.wan' has no attribute {name!r}")
