"""DiffSynth FLUX family: FLUX.1 (dev, Krea, Kontext, schnell) and FLUX.2 (dev, klein) pipelines, DiTs, encoders.

`FluxImagePipeline`, `ControlNetInput` and `Flux2ImagePipeline` are imported lazily (the pipelines pull in
transformers); `diffsynth.flux.flux1` and `diffsynth.flux.flux2` hold each generation's models with their
checkpoint formats.
"""

from __future__ import annotations


def __getattr__(name: str):
    if name in ("FluxImagePipeline", "ControlNetInput"):
        from . import pipeline

        return getattr(pipeline, name)
    if name == "ModelConfig":  # so a DiffSynth-Studio import changes in one line
        from diffsynth.runtime.hub import ModelConfig

        return ModelConfig
    if name == "Flux2ImagePipeline":
        from .flux2 import pipeline as flux2_pipeline

        return flux2_pipeline.Flux2ImagePipeline
    raise AttributeError(f"module 'diffsynth.flux' has no attribute {name!r}")


__all__ = ["ControlNetInput", "Flux2ImagePipeline", "FluxImagePipeline", "ModelConfig"]
