"""Image-quality metrics with DiffSynth-Studio's `diffsynth.metrics` API: CLIP score, PickScore, HPSv2, Aesthetic,
FID, LPIPS, ImageReward.

`XMetric.from_pretrained(model_config=ModelConfig(...), device=...)` loads DiffSynth-Studio's files (the
`DiffSynth-Studio/ImageMetrics` repo by default); `metric.compute(...)` returns Python floats. Names are imported
lazily, so importing this package does not import transformers.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ModelConfig": "..hub",
    "Metric": ".base",
    "CLIPMetric": ".clip",
    "PickScoreMetric": ".clip",
    "HPSv2Metric": ".clip",
    "AestheticMetric": ".aesthetic",
    "FIDMetric": ".fid",
    "frechet_distance": ".fid",
    "FIDInceptionV3": ".inception",
    "LPIPSMetric": ".lpips",
    "ImageRewardMetric": ".image_reward",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'diffsynth.runtime.metrics' has no attribute {name!r}")
