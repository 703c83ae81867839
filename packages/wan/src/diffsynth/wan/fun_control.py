"""Wan Fun Control (Alibaba PAI's Wan2.1-Fun-*-Control, Wan2.1-Fun-V1.1-*-Control, Wan2.2-Fun-A14B-Control):
what `WanVideoPipeline(control_video=..., reference_image=...)` gives these DiTs, as DiffSynth-Studio's
`WanVideoUnit_FunControl` / `WanVideoUnit_FunReference` build it.

The DiTs are image-to-video DiTs whose extra input channels start with the VAE latent of the control video
(a pose, depth or edge video); the rest are the I2V channels without their 4 mask channels (V1.0 / V1.1:
2 x 16 extra channels) or with them (Wan2.2 A14B: 2 x 16 + 4), zero when no `input_image` is given. CLIP
features (the DiTs with image input) are those of the reference image when one is given, else of the
`input_image`, else zeros. A DiT with `ref_conv` also takes the reference image's latent as leading tokens.
"""

from __future__ import annotations

import torch
from PIL import Image

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.media import load_frames, pil_to_tensor
from diffsynth.runtime.vram import module_dtype

from .dit import WanDiTConfig

CLIP_TOKENS = 257  # one image's CLIP tokens (the zeros stand-in when no image is given)


def control_channels(config: WanDiTConfig) -> int:
    """The control latent's channels among an I2V DiT's extra inputs: `z` (the latent channels, `out_dim`) for
    the Fun Control layouts (2 z or 2 z + 4 extra channels), 0 for the plain I2V layout (z + 4)."""
    z, extra = config.out_dim, config.in_dim - config.out_dim
    return z if config.model_type == "i2v" and extra in (2 * z, 2 * z + 4) else 0


def encode_control_video(pipe, video, batch: int, frames: int, height: int, width: int, vae_kwargs) -> torch.Tensor:
    """The control video's latent `[B, z, T, h, w]`: its first `frames` frames, resized to the output."""
    items = load_frames(video, "control_video")
    if len(items) < frames:
        raise ConfigError(f"control_video has {len(items)} frames, fewer than num_frames={frames}")
    dtype = module_dtype(pipe.vae)
    pixels = pil_to_tensor([im.resize((width, height), Image.BICUBIC) for im in items[:frames]], dtype, pipe.device)
    return pipe.vae.encode(pixels.transpose(0, 1)[None], **vae_kwargs).float().expand(batch, -1, -1, -1, -1)


def control_y(control: torch.Tensor, image_y: torch.Tensor | None, image_channels: int) -> torch.Tensor:
    """`y` of a Fun Control DiT: the control latent, then the last `image_channels` of the I2V channels
    (zeros without an input image)."""
    if image_y is None:
        image_part = control.new_zeros(control.shape[0], image_channels, *control.shape[2:])
    else:
        image_part = image_y[:, image_y.shape[1] - image_channels :]
    return torch.cat([control, image_part], dim=1)


def zero_clip(batch: int, config: WanDiTConfig, device) -> torch.Tensor:
    """DiffSynth-Studio's stand-in CLIP features when a Fun DiT with image input gets no image."""
    return torch.zeros(batch, CLIP_TOKENS, config.image_dim, device=device)


__all__ = ["CLIP_TOKENS", "control_channels", "control_y", "encode_control_video", "zero_clip"]
