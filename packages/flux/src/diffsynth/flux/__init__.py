"""DiffSynth FLUX family: FLUX.1 (dev, Krea, Kontext) pipeline, DiT, CLIP-L and T5-XXL encoders.

`FluxImagePipeline` and `ControlNetInput` are imported lazily (the pipeline pulls in transformers);
`diffsynth.flux.flux1` holds the DiT, the ControlNet and the text encoders with their checkpoint formats.
"""

from __future__ import annotations


def __getattr__(name: str):
    if name in ("FluxImagePipeline", "ControlNetInput"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'diffsynth.flux' has no attribute {name!r}")


__all__ = ["ControlNetInput", "FluxImagePipeline"]
