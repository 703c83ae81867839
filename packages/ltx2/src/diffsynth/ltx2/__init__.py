"""DiffSynth LTX-2 audio+video family: text-to-video with synchronised audio (LTX-2 19B, Lightricks)."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LTX2Pipeline": "pipeline",
    "LTX2Audio": "pipeline",
    "LTX2HDRPipeline": "hdr",
    "ltx2_velocity": "velocity",
    "LTX2DiT": "dit",
    "LTX2DiTConfig": "dit",
    "LTX2VideoVAE": "video_vae",
    "LTX2VideoVAEConfig": "video_vae",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'diffsynth.ltx2' has no attribute {name!r}")
