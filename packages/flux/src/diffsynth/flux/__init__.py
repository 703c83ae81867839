"""DiffSynth FLUX family: FLUX.1 (dev, Krea, Kontext) pipeline, DiT, CLIP-L and T5-XXL encoders.

`FluxImagePipeline` is imported lazily (it pulls in transformers); `diffsynth.flux.flux1` holds the
DiT and the text encoders with their checkpoint formats.
"""

from __future__ import annotations


def __getattr__(name: str):
    if name == "FluxImagePipeline":
        from .pipeline import FluxImagePipeline

        return FluxImagePipeline
    raise AttributeError(f"module 'diffsynth.flux' has no attribute {name!r}")


__all__ = ["FluxImagePipeline"]
