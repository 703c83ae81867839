"""What the FLUX package contributes to the runtime: its model specs (FLUX.1 DiT so far)."""

from __future__ import annotations

from diffsynth.runtime.registry import Family

from .flux1.formats import FLUX1_DIT_SPEC

FAMILY = Family(
    name="flux",
    specs=(FLUX1_DIT_SPEC,),
    presets={},
    pipeline=None,
    description="FLUX.1 (dev, Krea, Kontext, schnell) from Black Forest Labs: 12B double/single-stream DiT",
)
