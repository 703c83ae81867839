"""What every family with ControlNets shares: `ControlNetInput` (one control passed to a pipeline's
`controlnet_inputs`, DiffSynth-Studio's class of the same name and fields), `ControlNetSlot` (the
pipeline's `controlnet` slot: the loaded nets in load order), the checks of the inputs' common fields
and `model_source` (what a user names a model file by, as a `ModelConfig`). `BasePipeline` loads nets
into the slot (`load_controlnet`); each family says which spec and hub repos its nets have."""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from torch import nn

from .errors import ConfigError
from .hub import ModelConfig

ImageInput = Image.Image | str | os.PathLike


@dataclass
class ControlNetInput:
    """One control for `pipe(controlnet_inputs=[...])`.

    `image` is the control image as the net expects it (a canny/depth/pose map, the low-resolution
    image for an upscaler, the image to inpaint; no annotator is run), resized to the output size.
    `scale` multiplies the net's residuals; `start` / `end` say in which steps it acts (`acts_at`). Both None
    (the default): every step. Both given, in either of two forms: `start < end` are diffusers'
    `control_guidance_start/end` (fractions of the steps); `start > end` are DiffSynth-Studio's (the progress
    from 1 at the first step to 0 at the last). Only one given is read as DiffSynth-Studio reads it, the other
    at Studio's default (`start=1.0`, `end=0.0`), so Studio scripts port unchanged: `end=0.3` alone acts down
    to progress 0.3 (the first 70% of the steps), `start=0.7` alone from progress 0.7 on (the last 70%).
    `processor_id` is the control mode of a union net
    that takes one (FLUX.1 Union: a mode name such as "canny" or "depth", or its index); nets without
    modes ignore or refuse it (see the family's README). `inpaint_mask` (white = repaint) is needed by inpainting
    nets; `inpaint_image` is the image to repaint for nets that take it apart from the control image (Z-Image Fun
    Union 2.x).
    `controlnet_id` picks the loaded ControlNet (in load order); several inputs may share one net.
    Which fields a family reads is in its README.
    """

    image: ImageInput | None = None
    scale: float = 1.0
    start: float | None = None
    end: float | None = None
    processor_id: str | int | None = None
    inpaint_mask: ImageInput | None = None
    inpaint_image: ImageInput | None = None
    controlnet_id: int = 0
    _one_bound: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self):
        """Fill the bounds not given, so every family reads two numbers: neither given is every step (0 to 1);
        one given takes DiffSynth-Studio's default for the other (start 1.0, end 0.0), its progress form."""
        self._one_bound = (self.start is None) != (self.end is None)
        if self.start is None and self.end is None:
            self.start, self.end = 0.0, 1.0
        elif self.start is None:
            self.start = 1.0
        elif self.end is None:
            self.end = 0.0


class ControlNetSlot(nn.Module):
    """The pipeline's `controlnet` slot: the loaded ControlNets in load order (their `controlnet_id`), with
    their offload and compile units, so the VRAM manager streams each net's blocks like a DiT's."""

    def __init__(self, nets: Sequence[nn.Module] = ()):
        super().__init__()
        self.nets = nn.ModuleList()
        self.offload_units: tuple[str, ...] = ()
        self.compile_units: tuple[str, ...] = ()
        for net in nets:
            self.append(net)

    def append(self, net: nn.Module) -> int:
        self.nets.append(net)
        i = len(self.nets) - 1
        self.offload_units += tuple(f"nets.{i}.{u}" for u in getattr(net, "offload_units", ()))
        self.compile_units += tuple(f"nets.{i}.{u}" for u in getattr(net, "compile_units", ()))
        return i

    def __len__(self) -> int:
        return len(self.nets)


def checked_inputs(inputs, loaded: int, how_to_load: str) -> list[ControlNetInput]:
    """`controlnet_inputs` (one `ControlNetInput` or a list) with their common fields checked against the
    `loaded` nets: type, `controlnet_id`, `scale`, `start` / `end`. The family checks the rest."""
    if not inputs:
        return []
    items = [inputs] if isinstance(inputs, ControlNetInput) else list(inputs)
    if not loaded:
        raise ConfigError(f"controlnet_inputs were given but no ControlNet is loaded: {how_to_load}")
    for i, item in enumerate(items):
        where = f"controlnet_inputs[{i}]"
        if not isinstance(item, ControlNetInput):
            raise ConfigError(f"{where} is a {type(item).__name__}; use ControlNetInput(image=..., ...)")
        cid = item.controlnet_id
        if isinstance(cid, bool) or not isinstance(cid, int) or not 0 <= cid < loaded:
            raise ConfigError(f"{where}.controlnet_id={cid!r}: {loaded} ControlNet(s) are loaded (ids 0..)")
        for name in ("scale", "start", "end"):
            value = getattr(item, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):  # numpy scalars are numbers too
                raise ConfigError(f"{where}.{name}={value!r} must be a number")
            if not math.isfinite(value):  # NaN would pass the range check below and turn the image to NaN
                raise ConfigError(f"{where}.{name}={value!r} must be a finite number")
        start, end = item.start, item.end
        outside = [name for name, value in (("start", start), ("end", end)) if not 0.0 <= value <= 1.0]
        if item._one_bound and outside:  # the bound filled in is Studio's default, so this one was given
            raise ConfigError(
                f"{where}.{outside[0]}={getattr(item, outside[0])!r} must be in [0, 1] (alone it is "
                "DiffSynth-Studio's progress, 1 at the first step to 0 at the last)"
            )
        if not (0.0 <= min(start, end) and max(start, end) <= 1.0):  # equal: Studio's one progress point
            raise ConfigError(
                f"{where}: start={start!r}, end={end!r} must be numbers in [0, 1] "
                "(start < end: fractions of the steps; start > end: DiffSynth-Studio's progress, 1 to 0)"
            )
    return items


def model_source(item, name: str, hub_files: Callable[[str], object], hub_hint: str) -> ModelConfig:
    """What the user gave for `name` (a file or folder, a hub repo id, or a ModelConfig) as a ModelConfig.
    `hub_files(repo_id)` gives the files to fetch from a repo, or None for a repo this argument does not know
    (`hub_hint` then says what is known)."""
    if isinstance(item, ModelConfig):
        return item
    if not isinstance(item, (str, os.PathLike)):
        raise ConfigError(f"{name} must be a path, a hub repo id or a ModelConfig, got {type(item).__name__}")
    source = str(item)
    if Path(source).exists():
        return ModelConfig(path=source)
    looks_like_repo = source.count("/") == 1 and not source.startswith((".", "/"))
    files = hub_files(source) if looks_like_repo else None
    if files is None:
        raise ConfigError(f"{name}={source!r} is neither an existing file or folder nor {hub_hint}")
    return ModelConfig(model_id=source, origin_file_pattern=files)


def acts_at(start: float, end: float, step: int, steps: int) -> bool:
    """Whether a control acts at step `step` of `steps` (`start` / `end` as `ControlNetInput` fills them; see
    there). `start < end`: step i of n acts when `start <= i / n` and `(i + 1) / n <= end`
    (diffusers). `start >= end`: when the progress `(n - 1 - i) / (n - 1)` lies within [end, start], with
    DiffSynth-Studio's 1e-4 slack (equal bounds come only from one bound given, e.g. Studio's `end=1.0`)."""
    if start >= end:
        progress = (steps - 1 - step) / max(steps - 1, 1)
        return end - 1e-4 <= progress <= start + 1e-4
    return not (step / steps < start or (step + 1) / steps > end)


__all__ = ["ControlNetInput", "ControlNetSlot", "acts_at", "checked_inputs", "model_source"]
