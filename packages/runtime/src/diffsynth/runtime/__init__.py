"""DiffSynth runtime: the engine every model family builds on.

Public names are imported lazily so `diffsynth --help` and family discovery stay fast.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "ModelConfig": "hub",
    "load_model": "loading",
    "load_models": "loading",
    "LoadedModel": "loading",
    "open_checkpoint": "checkpoint",
    "describe_checkpoint": "checkpoint",
    "parse_dtype": "dtypes",
    "parse_device": "dtypes",
    "attention": "attention",
    "BasePipeline": "pipeline",
    "FlowMatchScheduler": "schedulers",
    "save_video": "media",
    "load_video": "media",
    "save_audio": "media",
    "load_lora": "lora",
    "read_lora": "lora",
    "save_lora": "lora",
    "load_image": "media",
    "save_image": "media",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'diffsynth.runtime' has no attribute {name!r}")
