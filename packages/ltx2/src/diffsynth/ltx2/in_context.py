"""IC-LoRA reference videos (DiffSynth-Studio's `in_context_videos`, ltx-core's `VideoConditionByReferenceLatent`).

An IC-LoRA (Union-Control, Detailer, ...) was trained with a control video's tokens beside the video's:
at sampling they are appended to the video tokens as clean tokens (timestep 0, never stepped), like
keyframes. A reference may be smaller than the video by `downscale_factor` (an IC-LoRA trained so stores
it as `reference_downscale_factor` in its safetensors metadata); its token positions are then scaled by
that factor in rows and columns, so they land on the video's grid. Time positions are the reference's
own, at the video's frame rate.
"""

from __future__ import annotations

import logging
import os

import torch
from PIL import Image
from safetensors import safe_open

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.media import load_frames, pil_to_tensor
from diffsynth.runtime.vram import module_dtype

from .dit import video_positions
from .framing import fit_image
from .velocity import pack_video

logger = logging.getLogger(__name__)

METADATA_KEY = "reference_downscale_factor"


def lora_reference_downscale_factor(path) -> int | None:
    """The `reference_downscale_factor` an IC-LoRA file declares in its metadata (None when it declares none
    or is not a safetensors file)."""
    if not isinstance(path, (str, os.PathLike)) or not str(path).endswith(".safetensors"):
        return None
    with safe_open(str(path), framework="pt") as f:
        value = (f.metadata() or {}).get(METADATA_KEY)
    if value is None:
        return None
    try:
        factor = int(value)
    except ValueError:
        raise ConfigError(f"{path}: metadata {METADATA_KEY}={value!r} is not an integer") from None
    return factor


def check_factor(factor) -> int:
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ConfigError(f"in_context_downsample_factor={factor!r} is not accepted; use an integer >= 1 (e.g. 2)")
    return factor


def reference_frames(video, height: int, width: int, num_frames: int, temporal: int) -> list[Image.Image]:
    """The frames of one reference (a list of images or paths, or a video file): at most `num_frames`, then
    the longest `temporal`k + 1 of them (what the video VAE encodes), each fitted to `height` x `width`."""

    frames = load_frames(video, "each in_context_videos entry")[:num_frames]
    usable = (len(frames) - 1) // temporal * temporal + 1
    if usable != len(frames):
        logger.warning(
            "an in-context video has %d frames; its first %d (%dk + 1) are used", len(frames), usable, temporal
        )
    return [fit_image(frame, height, width) for frame in frames[:usable]]


def encode_references(
    pipe, videos, height: int, width: int, num_frames: int, fps: float, factor: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens `[1, K, C]` and positions `[1, 3, K, 2]` of the reference `videos` for a video of `height` x
    `width` (each reference at a `factor` of that size, encoded by the video VAE, its rows and columns
    scaled back up by `factor`), in the order given. Each must hold at least `num_frames` frames (the clip's:
    the factor scales rows and columns only): a shorter one would control only the clip's start."""

    m = pipe.size_multiple
    if height % factor or width % factor or (height // factor) % m or (width // factor) % m:
        raise ConfigError(
            f"in_context_downsample_factor={factor}: {height}x{width} / {factor} must be a multiple of "
            f"{m} in height and width (the video VAE's), for the reference videos"
        )
    ref_height, ref_width = height // factor, width // factor
    pipe.load_models_to_device(["vae"])
    tokens, coords = [], []
    for index, video in enumerate(videos):
        given = load_frames(video, "each in_context_videos entry")
        if len(given) < num_frames:
            raise ConfigError(
                f"in_context_videos[{index}] has {len(given)} frames, fewer than the clip's num_frames={num_frames}: "
                "give a control video at least as long as the clip (or fewer num_frames)"
            )
        frames = reference_frames(given, ref_height, ref_width, num_frames, pipe.vae.temporal_compression)
        pixels = pil_to_tensor(frames, dtype=module_dtype(pipe.vae), device=pipe.device)  # [F, 3, h, w]
        latent = pipe.vae.encode(pixels.transpose(0, 1)[None]).float()  # [1, C, f, h', w']
        positions = video_positions(pipe.dit.config, 1, *latent.shape[2:], fps, pipe.device)
        positions[:, 1:] *= factor
        tokens.append(pack_video(latent))
        coords.append(positions)
    return torch.cat(tokens, dim=1), torch.cat(coords, dim=2)
