"""Flex.2 (`ostris/Flex.2-preview`): a FLUX.1-style DiT (8 double blocks) whose wider input takes an inpainting
image, its mask and a control map at once, DiffSynth-Studio's arguments:

- `flex_inpaint_image` + `flex_inpaint_mask` (white = repaint): the image's latents, faded out where the mask
  (on the latent grid) is white, and the mask itself;
- `flex_control_image` (pose, depth, edges, ...) times `flex_control_strength` (default 0.5): followed while the
  sampler is in the first `flex_control_stop` (default 0.5) of its steps, then replaced by zeros, as
  DiffSynth-Studio switches at the timestep `timesteps[int(stop * (steps - 1))]`.

Everything is optional: without inputs the DiT draws from the prompt alone (zero latents, a mask of ones).
Images are resized to the output size (Lanczos); the mask (its red channel) to the latent grid (bicubic, as PIL
resizes by default in DiffSynth-Studio). The tokens are built in `channels.flex_condition` and packed like the latents.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.media import load_image, pil_to_tensor
from diffsynth.runtime.pipeline import finite_number
from diffsynth.runtime.vram import module_dtype

from .channels import FLEX, condition_kind, describe_widths, flex_condition

DEFAULT_CONTROL_STRENGTH = 0.5
DEFAULT_CONTROL_STOP = 0.5


@dataclass
class FlexInputs:
    """A Flex.2 call's condition images (each optional) and the control's strength and stop."""

    inpaint_image: Image.Image | None
    inpaint_mask: Image.Image | None
    control_image: Image.Image | None
    control_strength: float
    control_stop: float

    def first_image(self) -> Image.Image | None:
        """The image the output takes its size from when none is given."""
        return self.inpaint_image if self.inpaint_image is not None else self.control_image


@dataclass
class FlexCondition:
    """The packed condition tokens with the control map and without it, and the last step that sees the map."""

    with_control: torch.Tensor
    without_control: torch.Tensor
    last_control_step: int

    def at(self, step: int) -> torch.Tensor:
        return self.with_control if step <= self.last_control_step else self.without_control


def check_flex_inputs(dit, inpaint_image, inpaint_mask, control_image, strength, stop, kontext_images) -> FlexInputs:
    """The Flex.2 inputs of a call (None for other DiTs, which must be given none of them)."""
    given = {"flex_inpaint_image": inpaint_image, "flex_inpaint_mask": inpaint_mask}
    given["flex_control_image"] = control_image
    is_flex = dit is not None and condition_kind(dit.config) == FLEX
    if not is_flex:
        used = [name for name, value in given.items() if value is not None]
        if used:
            what = describe_widths(dit.config) if dit is not None else "no DiT"
            raise ConfigError(
                f"{', '.join(used)} need a Flex.2 DiT (ostris/Flex.2-preview, in_channels 196); this is {what}"
            )
        return None
    if (inpaint_image is None) != (inpaint_mask is None):
        raise ConfigError(
            "flex_inpaint_image and flex_inpaint_mask go together: the mask (white = repaint) and its image"
        )
    if kontext_images is not None:
        raise ConfigError(
            "kontext_images need FLUX.1-Kontext-dev; Flex.2 takes flex_inpaint_image / flex_control_image"
        )
    # a NaN or infinite strength scales the control latents into a NaN image; a NaN stop passes the range check
    strength = finite_number(strength, "flex_control_strength")
    stop = finite_number(stop, "flex_control_stop")
    if not 0.0 <= stop <= 1.0:
        raise ConfigError(f"flex_control_stop={stop!r} must be in [0, 1]: the part of the steps that see the control")
    for name, value in (("flex_inpaint_image", inpaint_image), ("flex_control_image", control_image)):
        if isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} is one image (a path or PIL image), shared by every prompt")
    # the mask's red channel (a gray mask's gray), as DiffSynth-Studio reads the first channel
    mask = None if inpaint_mask is None else load_image(inpaint_mask).getchannel("R")
    return FlexInputs(
        None if inpaint_image is None else load_image(inpaint_image),
        mask,
        None if control_image is None else load_image(control_image),
        strength,
        stop,
    )


def encode_flex(pipe, inputs: FlexInputs, noise: torch.Tensor, steps: int, tiled, tile_size, tile_stride):
    """`FlexCondition` for latents like `noise` `[B, 16, H/8, W/8]` and a sampler of `steps` steps."""
    from ..pipeline import pack_latents

    h, w = noise.shape[-2:]

    def latents(image: Image.Image) -> torch.Tensor:
        pixels = pil_to_tensor(image.resize((8 * w, 8 * h), Image.LANCZOS), dtype=module_dtype(pipe.vae))
        z = pipe.vae.encode(pixels.to(pipe.device), tiled=tiled, tile_size=tile_size, tile_stride=tile_stride)
        return z.float()

    inpaint = None if inputs.inpaint_image is None else latents(inputs.inpaint_image)
    mask = None
    if inputs.inpaint_mask is not None:
        grid = np.asarray(inputs.inpaint_mask.resize((w, h), Image.BICUBIC), dtype=np.float32) / 255.0
        mask = torch.from_numpy(grid)[None, None].to(pipe.device)
    control = None if inputs.control_image is None else latents(inputs.control_image) * inputs.control_strength
    like = noise.float()
    with_control = pack_latents(flex_condition(inpaint, mask, control, like))
    without_control = pack_latents(flex_condition(inpaint, mask, None, like))
    return FlexCondition(with_control, without_control, int(inputs.control_stop * (steps - 1)))
