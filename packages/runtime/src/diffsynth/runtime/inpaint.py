"""Inpainting as DiffSynth-Studio does it (`input_image` + `inpaint_mask`, white = repaint).

The mask goes to the grid the velocity lives on (latent pixels or packed tokens), optionally blurred
there (`inpaint_blur_size`, `inpaint_blur_sigma`: a Gaussian of `2 * size + 1` taps, reflected at the
borders, as torchvision's `GaussianBlur` that DiffSynth-Studio uses), and every step blends the
model's velocity with the one that keeps the input image (`inpaint_velocity`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import ConfigError


def inpaint_velocity(
    velocity: torch.Tensor, latents: torch.Tensor, clean: torch.Tensor, sigma, mask: torch.Tensor
) -> torch.Tensor:
    """DiffSynth-Studio's inpainting step: `mask * velocity + (1 - mask) * (latents - clean) / sigma`.

    Outside the mask (0) the Euler step from `sigma` to `sigma_next` then lands on
    `(1 - sigma_next) * clean + sigma_next * noise` when `latents` is `clean` noised to `sigma` with `noise`:
    the input image latent re-noised to each sigma, and `clean` itself after the last step.
    `mask` `[B or 1, 1, H, W]` in [0, 1]: 1 repaints (the model's velocity), fractions blend.
    At `sigma` 0 (a schedule reaching 0 before its end) the clean latent is already there: the kept velocity is 0.
    """
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=latents.device)
    delta = latents.float() - clean.float()
    keep = torch.where(sigma == 0, torch.zeros_like(delta), delta / torch.where(sigma == 0, 1.0, sigma))
    return mask * velocity.float() + (1 - mask) * keep


def gaussian_blur(mask: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """`mask` `[B, 1, H, W]` blurred by a separable Gaussian of `2 * size + 1` taps, borders reflected."""
    taps = torch.arange(2 * size + 1, dtype=torch.float32, device=mask.device) - size
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = kernel / kernel.sum()
    padded = F.pad(mask.float(), (size, size, size, size), mode="reflect")
    out = F.conv2d(padded, kernel.view(1, 1, 1, -1))
    return F.conv2d(out, kernel.view(1, 1, -1, 1))


def check_blur(size, sigma) -> tuple[int, float] | None:
    """DiffSynth-Studio blurs only when both are given; each must make sense."""
    if size is None and sigma is None:
        return None
    if size is None or sigma is None:
        raise ConfigError("inpaint_blur_size and inpaint_blur_sigma go together: give both (e.g. 3 and 1.0)")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(
            f"inpaint_blur_size={size!r} is not accepted; use an integer >= 1 (the kernel is 2 * size + 1)"
        )
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma > 0:
        raise ConfigError(f"inpaint_blur_sigma={sigma!r} is not accepted; use a number > 0")
    return size, float(sigma)


def mask_grid(
    inpaint_mask,
    images: Sequence[Image.Image],
    batch: int,
    grid: tuple[int, int],
    device,
    blur: tuple[int, float] | None = None,
) -> torch.Tensor:
    """`inpaint_mask` (one PIL "L" image for every input image, or one per input image, each its input image's
    size) as `[B or 1, 1, h, w]` floats in [0, 1] on the `grid` (h, w) the velocity lives on: resized bicubic
    straight to it, as DiffSynth-Studio does, then blurred there with `blur` (taps, sigma)."""
    masks = list(inpaint_mask) if isinstance(inpaint_mask, (list, tuple)) else [inpaint_mask]
    if len(masks) != 1 and len(masks) != len(images):
        raise ConfigError(
            f"inpaint_mask is a list of {len(masks)} masks for {len(images)} input images; "
            "pass one mask, or one per input image"
        )
    grids = []
    for index, mask in enumerate(masks):
        name = "inpaint_mask" if len(masks) == 1 else f"inpaint_mask[{index}]"
        if not isinstance(mask, Image.Image):
            raise ConfigError(f"{name} must be a PIL image in mode 'L' (white = repaint), got {type(mask).__name__}")
        if mask.mode != "L":
            raise ConfigError(
                f"{name} has mode {mask.mode!r}; use a grayscale mask in mode 'L' (white = repaint), "
                f"e.g. mask.convert('L')"
            )
        image = images[index] if len(masks) > 1 else images[0]
        if mask.size != image.size:
            raise ConfigError(
                f"{name} is {mask.size[0]}x{mask.size[1]} but input_image is {image.size[0]}x{image.size[1]}; "
                "the mask must have its input image's size"
            )
        small = mask.resize((grid[1], grid[0]), Image.BICUBIC)
        grids.append(torch.from_numpy(np.asarray(small, dtype=np.float32) / 255.0))
    out = torch.stack(grids)[:, None].to(device)
    if out.shape[0] not in (1, batch):
        raise ConfigError(f"inpaint_mask has {out.shape[0]} masks for {batch} prompts")
    if blur is not None and blur[0] >= min(grid):
        raise ConfigError(
            f"inpaint_blur_size={blur[0]} reaches past the {grid[0]}x{grid[1]} mask grid; use at most {min(grid) - 1}"
        )
    return out if blur is None else gaussian_blur(out, *blur)
