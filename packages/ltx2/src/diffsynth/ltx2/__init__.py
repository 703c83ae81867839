"""DiffSynth LTX-2 audio+video family: text-to-video with synchronised audio (LTX-2 19B, Lightricks)."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ModelConfig": "diffsynth.runtime.hub",  # so a DiffSynth-Studio import changes in one line
    "LTX2Pipeline": "pipeline",
    "LTX2AudioVideoPipeline": "pipeline",  # DiffSynth-Studio's name of LTX2Pipeline
    "LTX2Audio": "pipeline",
    "LTX2HDRPipeline": "hdr",
    "ltx2_velocity": "velocity",
    "LTX2DiT": "dit",
    "LTX2DiTConfig": "dit",
    "LTX2VideoVAE": "video_vae",
    "LTX2VideoVAEConfig": "video_vae",
}

__all__ = sorted(_EXPORTS)


_ALIASES = {"LTX2AudioVideoPipeline": "LTX2Pipeline"}


def __getattr__(name: str):
    if name in _EXPORTS:
        module = _EXPORTS[name]
        module = importlib.import_module(module if module.startswith("diffsynth.") else f".{module}", __name__)
        return getattr(module, _ALIASES.get(name, name))
    raise AttributeError(f"module 'diffsynth.ltx2' has no attribute {name!r}")
