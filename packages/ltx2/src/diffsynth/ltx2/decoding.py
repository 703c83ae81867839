"""How the pipeline turns its final video latents into pixels: with the convolutional video VAE (`vae`), or with
LTX-2.5's diffusion decoder (`diffusion_decoder`, `diffusion_decoder.py`) when it is loaded, as the authors'
pipelines do when given `ltx-2.5-video-vae-bf16.safetensors`.

The diffusion decoder draws the noise it denoises from the pipeline's generator (continuing after the denoising
loop, as ltx-pipelines passes its generator to the decoder), and always decodes in overlapping tiles
(`DecoderTiles`: 768 px and 80 frames, overlaps 64 px and 24 frames, unless the call's `tile_size_in_pixels` /
`tile_overlap_in_pixels` / `tile_size_in_frames` / `tile_overlap_in_frames` say otherwise): a whole 1080p clip at
once would need tens of GiB for stage 5 alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.vram import module_dtype

from .diffusion_decoder import DecoderTiles
from .video_vae import LTX2VideoEncoderVAE

DIFFUSION_VAE_FILE = "vae/ltx-2.5-video-vae-bf16.safetensors"  # in Lightricks/LTX-2.5
CONV_VAE_FILE = "vae/ltx-2.5-video-vae-conv-bf16.safetensors"


@dataclass(frozen=True)
class Decoding:
    """The call's decoding settings. `single`: one prompt with "pil" (the batch axis is dropped); `tiled`,
    `tile_size`, `tile_stride`: the convolutional VAE's spatial tiles in latent cells; `use_diffusion_decoder`:
    whether the diffusion decoder decodes (`uses_diffusion_decoder` of the call's argument); `diffusion_tiles`: its
    tiles."""

    single: bool
    output_type: str
    tiled: bool = False
    tile_size: int | tuple[int, int] = 16
    tile_stride: int | tuple[int, int] | None = None
    use_diffusion_decoder: bool = False
    diffusion_tiles: DecoderTiles = DecoderTiles()


def diffusion_tiles(
    size_in_pixels: int | None,
    overlap_in_pixels: int | None,
    size_in_frames: int | None,
    overlap_in_frames: int | None,
) -> DecoderTiles:
    """The diffusion decoder's tiles from DiffSynth-Studio's tiling arguments (square spatial tiles); the
    defaults for what is not given (a default overlap at most half the tile). A bad size is a ConfigError naming the
    argument."""
    base = DecoderTiles()
    space = _size_and_stride(
        "tile_size_in_pixels", size_in_pixels, base.height, "tile_overlap_in_pixels", overlap_in_pixels,
        base.height - base.height_stride,
    )  # fmt: skip
    time = _size_and_stride(
        "tile_size_in_frames", size_in_frames, base.frames, "tile_overlap_in_frames", overlap_in_frames,
        base.frames - base.frame_stride,
    )  # fmt: skip
    return DecoderTiles(
        frames=time[0], frame_stride=time[1], height=space[0], height_stride=space[1], width=space[0],
        width_stride=space[1],
    )  # fmt: skip


def _size_and_stride(size_name, size, default_size, overlap_name, overlap, default_overlap) -> tuple[int, int]:
    size = default_size if size is None else size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"{size_name}={size!r} must be a positive integer")
    overlap = min(default_overlap, size // 2) if overlap is None else overlap
    if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap < size:
        raise ConfigError(f"{overlap_name}={overlap!r} must be an integer in [0, {size_name}={size})")
    return size, size - overlap


def uses_diffusion_decoder(pipe, wanted: bool | None) -> bool:
    """Whether to decode with the diffusion decoder: `wanted` None means when loaded; True without it, or False
    with only the diffusion-VAE file's encoder as the VAE, is an error that says what to load."""
    loaded = getattr(pipe, "diffusion_decoder", None) is not None
    if wanted and not loaded:
        raise ConfigError(
            "use_diffusion_decoder=True needs LTX-2.5's diffusion decoder: add "
            f"ModelConfig(model_id='Lightricks/LTX-2.5', origin_file_pattern='{DIFFUSION_VAE_FILE}') to the "
            "pipeline's model_configs (or a diffusers diffusion_decoder/ folder)"
        )
    use = loaded if wanted is None else bool(wanted)
    if not use and isinstance(pipe.vae, LTX2VideoEncoderVAE):
        raise ConfigError(
            "use_diffusion_decoder=False needs the convolutional video VAE, but the loaded one is the diffusion-VAE "
            f"file's encoder: add ModelConfig(model_id='Lightricks/LTX-2.5', origin_file_pattern='{CONV_VAE_FILE}')"
        )
    return use


def decode_video(pipe, video: torch.Tensor, decoding: Decoding, generator: torch.Generator | None) -> torch.Tensor:
    """Normalised video latents `[B, C, F, h, w]` to pixels `[B, 3, 1 + 8(F-1), 32h, 32w]` in [-1, 1]."""
    if decoding.use_diffusion_decoder:
        decoder = pipe.diffusion_decoder
        pipe.load_models_to_device(["diffusion_decoder"])
        latents = video.to(device=pipe.device, dtype=module_dtype(decoder))
        return decoder.decode(latents, generator=generator, tiles=decoding.diffusion_tiles)
    pipe.load_models_to_device(["vae"])
    return pipe.vae.decode(
        video.to(module_dtype(pipe.vae)),
        tiled=decoding.tiled,
        tile_size=decoding.tile_size,
        tile_stride=decoding.tile_stride,
    )


__all__ = [
    "CONV_VAE_FILE",
    "DIFFUSION_VAE_FILE",
    "Decoding",
    "decode_video",
    "diffusion_tiles",
    "uses_diffusion_decoder",
]
