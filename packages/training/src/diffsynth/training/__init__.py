"""DiffSynth trainer: LoRA and full fine-tuning for every installed family, one flow-matching loop.

A family makes itself trainable with a `TrainingTask` (`task.py`): how a dataset row becomes model inputs through
its frozen encoders, and the per-step model call its pipeline already makes. The trainer owns the rest: datasets
and size buckets, the cached two-stage mode, LoRA (peft) or full fine-tuning, accelerate (DDP, FSDP2), atomic resumable
checkpoints. Use `diffsynth-train` (see the README) or `train(TrainConfig(...))`.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "TrainConfig": "config",
    "parse_args": "config",
    "TrainingTask": "task",
    "TrainState": "trainer",
    "Run": "trainer",
    "train": "trainer",
    "setup": "trainer",
    "train_step": "trainer",
    "save": "trainer",
    "resume": "trainer",
    "encode_dataset": "trainer",
    "run_stage": "trainer",
    "MetadataDataset": "data",
    "CachedDataset": "data",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'diffsynth.training' has no attribute {name!r}")
