"""`ControlNetInput`: one control passed to a pipeline's `controlnet_inputs`, shared by every family
that takes ControlNets (DiffSynth-Studio's class of the same name and fields)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from PIL import Image

ImageInput = Image.Image | str | os.PathLike


@dataclass
class ControlNetInput:
    """One control for `pipe(controlnet_inputs=[...])`.

    `image` is the control image as the net expects it (a canny/depth/pose map, the low-resolution
    image for an upscaler, the image to inpaint; no annotator is run), resized to the output size.
    `scale` multiplies the net's residuals; `start` / `end` are the fractions of the denoising steps
    where it acts (diffusers' `control_guidance_start/end`: step i of n runs when
    `start <= i / n` and `(i + 1) / n <= end`). `processor_id` is the control mode of a union net
    that takes one (FLUX.1 Union: a mode name such as "canny" or "depth", or its index); nets without
    modes ignore or refuse it (see the family's README). `inpaint_mask` (white = repaint) is needed by inpainting nets; `inpaint_image` is the
    image to repaint for nets that take it apart from the control image (Z-Image Fun Union 2.x).
    `controlnet_id` picks the loaded ControlNet (in load order); several inputs may share one net.
    Which fields a family reads is in its README.
    """

    image: ImageInput | None = None
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    processor_id: str | int | None = None
    inpaint_mask: ImageInput | None = None
    inpaint_image: ImageInput | None = None
    controlnet_id: int = 0


def acts_at(start: float, end: float, step: int, steps: int) -> bool:
    """Whether a control with fractions `start` / `end` acts at step `step` of `steps` (see `ControlNetInput`)."""
    return not (step / steps < start or (step + 1) / steps > end)


__all__ = ["ControlNetInput", "acts_at"]
