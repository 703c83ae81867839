"""VACE control context: what `WanVideoPipeline(vace_video=..., vace_video_mask=...,
vace_reference_image=...)` gives a VACE DiT (Wan2.1-VACE-1.3B / 14B), built as the authors'
`WanVace.vace_encode_frames` / `vace_encode_masks` do.

- The control video (zeros when none is given) is split by the mask (white = generate, made
  binary at 0.5) into the kept pixels (`video * (1 - mask)`) and the pixels to repaint
  (`video * mask`); each is VAE-encoded and the two latents are joined on channels (2 x 16).
- The mask itself (ones when none is given) is folded into the latent grid: each 8 x 8 pixel cell
  becomes 64 channels, and frames are resampled (nearest) to the latent frame count.
- Reference images are fitted into the frame (aspect kept, centred on white) and encoded one frame
  each. Their latents, with 16 zero channels, come before the video's latent frames, with zero mask;
  the denoised latents carry as many extra leading frames, dropped before decoding.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.media import IMAGE_SUFFIXES, load_frames, load_image, pil_to_tensor
from diffsynth.runtime.vram import module_dtype


@dataclass
class VaceControl:
    """The control context `[1, vace_in_dim, R + T, h, w]` for the DiT, the clean latents of the `R`
    reference images `[1, z, R, h, w]` (None without references) and the per-layer scale."""

    context: torch.Tensor
    references: torch.Tensor | None
    scale: float | tuple[float, ...]

    @property
    def num_references(self) -> int:
        return 0 if self.references is None else self.references.shape[2]


def fit_reference(image: Image.Image, height: int, width: int) -> torch.Tensor:
    """`[3, height, width]` in [-1, 1]: the image bilinearly resized to fit (aspect kept) and centred
    on a white canvas; an image of the frame's size is taken as is."""
    pixels = pil_to_tensor(image)[0]
    h, w = pixels.shape[-2:]
    if (h, w) == (height, width):
        return pixels
    scale = min(height / h, width / w)
    new_h, new_w = int(h * scale), int(w * scale)
    resized = F.interpolate(pixels[None], size=(new_h, new_w), mode="bilinear", align_corners=False)[0]
    canvas = torch.ones(3, height, width)
    top, left = (height - new_h) // 2, (width - new_w) // 2
    canvas[:, top : top + new_h, left : left + new_w] = resized
    return canvas


def fold_mask(mask: torch.Tensor, latent_frames: int, cell: int) -> torch.Tensor:
    """`[F, H, W]` pixel mask -> `[cell * cell, latent_frames, H / cell, W / cell]`: each cell's pixels
    become channels (row offset major), frames resampled with nearest-exact."""
    frames, height, width = mask.shape
    h, w = height // cell, width // cell
    folded = mask.view(frames, h, cell, w, cell).permute(2, 4, 0, 1, 3).reshape(cell * cell, frames, h, w)
    return F.interpolate(folded[None], size=(latent_frames, h, w), mode="nearest-exact")[0]


def _mask_frames(mask, frames: int, height: int, width: int) -> torch.Tensor:
    """`[F, H, W]` in [0, 1] from the first channel of each mask frame; one image (a PIL image or an
    image file) applies to every frame. Masks are resized with nearest so their values stay as drawn."""
    one = isinstance(mask, Image.Image) or (
        isinstance(mask, (str, os.PathLike)) and str(mask).lower().endswith(IMAGE_SUFFIXES)
    )
    items = [mask] * frames if one else load_frames(mask, "vace_video_mask")
    if len(items) < frames:
        raise ConfigError(f"vace_video_mask has {len(items)} frames, fewer than num_frames={frames}")
    planes = [
        np.asarray(load_image(im).resize((width, height), Image.NEAREST), dtype=np.float32)[..., 0]
        for im in items[:frames]
    ]
    return torch.from_numpy(np.stack(planes) / np.float32(255.0))


def _references(images) -> list[Image.Image]:
    items = list(images) if isinstance(images, (list, tuple)) else [images]
    if not items:
        raise ConfigError("vace_reference_image is an empty list; give one image or several")
    return [load_image(im) for im in items]


def check_vace_channels(dit_config, vae) -> None:
    """The VACE DiT's control channels must be what this VAE gives: 2 latents and the folded mask."""
    expected = 2 * vae.z_dim + vae.spatial_compression**2
    if dit_config.vace_in_dim != expected:
        raise ConfigError(
            f"the VACE DiT takes vace_in_dim={dit_config.vace_in_dim} control channels but this VAE gives "
            f"{expected} (2 x {vae.z_dim} latent + {vae.spatial_compression}^2 mask): use the Wan 2.1 VAE"
        )


def prepare_vace(
    pipe,
    video,
    mask,
    references,
    scale,
    frames: int,
    height: int,
    width: int,
    vae_kwargs: dict,
) -> VaceControl:
    """The control context for one video (shared by every prompt of the call); `pipe` gives the VAE."""
    vae, device = pipe.vae, pipe.device
    dtype = module_dtype(vae)
    if video is None:
        pixels = torch.zeros(3, frames, height, width)
    else:
        items = load_frames(video, "vace_video")
        if len(items) < frames:
            raise ConfigError(f"vace_video has {len(items)} frames, fewer than num_frames={frames}")
        resized = [im.resize((width, height), Image.BICUBIC) for im in items[:frames]]
        pixels = pil_to_tensor(resized).transpose(0, 1)  # [3, F, H, W]
    weights = torch.ones(frames, height, width) if mask is None else _mask_frames(mask, frames, height, width)
    binary = (weights > 0.5).float()[None]
    kept, repainted = pixels * (1 - binary), pixels * binary

    def encode(x: torch.Tensor) -> torch.Tensor:
        return vae.encode(x[None].to(device=device, dtype=dtype), **vae_kwargs).float()

    latent = torch.cat([encode(kept), encode(repainted)], dim=1)  # [1, 2z, T, h, w]
    folded = fold_mask(weights, latent.shape[2], vae.spatial_compression)[None].to(device)
    ref_latents = None
    if references is not None:
        refs = [fit_reference(im, height, width) for im in _references(references)]
        ref_latents = torch.cat([encode(r[:, None]) for r in refs], dim=2)  # [1, z, R, h, w]
        padded = torch.cat([ref_latents, torch.zeros_like(ref_latents)], dim=1)
        latent = torch.cat([padded, latent], dim=2)
        folded = torch.cat([folded.new_zeros(*folded.shape[:2], len(refs), *folded.shape[3:]), folded], dim=2)
    context = torch.cat([latent, folded], dim=1)
    return VaceControl(context, ref_latents, scale)


__all__ = ["VaceControl", "check_vace_channels", "fit_reference", "fold_mask", "prepare_vace"]
