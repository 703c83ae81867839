"""Video retake (DiffSynth-Studio's `retake_video` / `retake_video_regions`, the authors' `RetakePipeline`).

A given video is encoded at the stage's size and kept as it is, except in the time regions to re-make:
its latent frames there start from noise and are denoised; the others the DiT sees clean (timestep 0)
and no step changes them. A latent frame belongs to a region when its half-open time span [s, e) overlaps
it: e > start and s < end, so a span that only touches a region's edge is kept (the authors'
`TemporalRegionMask`; DiffSynth-Studio also re-makes the touching frame). Our audio retake uses the same rule. Without
regions the whole video is kept, and only the sound is made for it (video-to-audio).
"""

from __future__ import annotations

import torch
from PIL import Image

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.media import load_frames, pil_to_tensor
from diffsynth.runtime.vram import module_dtype

from .dit import video_positions
from .framing import fit_image


def retake_frames(video, num_frames: int) -> list[Image.Image]:
    """The first `num_frames` frames of the given video (a video file or a list of frames)."""
    frames = load_frames(video, "retake_video")
    if len(frames) < num_frames:
        raise ConfigError(f"retake_video has {len(frames)} frames; num_frames={num_frames} needs that many")
    return frames[:num_frames]


def region_mask(config, shape, fps: float, regions, check_region, device) -> torch.Tensor:
    """`[1, 1, f, h, w]`: 1 on the latent frames whose time span overlaps one of `regions` (seconds), else 0.
    A region that selects no frame (outside the clip) is refused, as for audio: it would silently keep it all."""
    frames, height, width = shape
    mask = torch.zeros((1, 1, frames, height, width), device=device)
    spans = video_positions(config, 1, frames, 1, 1, fps, device)[0, 0]  # [f, 2] seconds
    for region in regions or ():
        start, end = check_region(region, "retake_video_regions")
        inside = (spans[:, 1] > start) & (spans[:, 0] < end)  # half-open spans: touching is not overlapping
        if not inside.any():
            raise ConfigError(
                f"retake_video_regions entry {region!r} overlaps no video latent frame of the "
                f"{float(spans[-1, 1]):g} s clip (at {fps:g} fps); give (start, end) seconds inside it"
            )
        mask[0, 0, inside] = 1.0
    return mask


def keep_video(pipe, video: torch.Tensor, frames, height: int, width: int, regions, fps: float):
    """`video` (the stage's noisy latents) with the given `frames`' latents, fitted to `height` x `width`
    and encoded, put in where they are kept; and the mask (1 = re-made)."""

    pipe.load_models_to_device(["vae"])
    fitted = [fit_image(frame, height, width) for frame in frames]
    pixels = pil_to_tensor(fitted, dtype=module_dtype(pipe.vae), device=pipe.device)  # [F, 3, H, W]
    given = pipe.vae.encode(pixels.transpose(0, 1)[None]).float().to(video.device)  # [1, C, f, h, w]
    if given.shape[2:] != video.shape[2:]:
        raise ConfigError(f"retake_video encodes to latents {tuple(given.shape[2:])}, not {tuple(video.shape[2:])}")
    mask = region_mask(pipe.dit.config, video.shape[2:], fps, regions, pipe._region, video.device)
    return given * (1.0 - mask) + video * mask, mask
