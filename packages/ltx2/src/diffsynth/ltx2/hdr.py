"""HDR video-to-video with LTX-2.3's HDR IC-LoRA (`Lightricks/LTX-2.3-22b-IC-LoRA-HDR`; the authors'
`HDRICLoraPipeline`, diffusers' `LTX2HDRPipeline`).

An SDR (Rec.709) video goes in as an IC-LoRA reference; the LoRA makes the DiT generate the same scene whose
decoded pixels are ARRI LogC3 (EI 800) code values instead of display values. Inverting LogC3 gives scene-linear
Rec.709 light in [0, ~55]: an HDR float video for EXR export, grading or tone mapping.

The recipe follows the authors' pipeline on the distilled model, video only (the audio stream is left out of the
DiT, as ltx-core leaves out an absent modality), no guidance:
- sizes are rounded up to the two-stage multiple (64) and the output is cropped back; the reference is fitted to
  each stage's size without cropping: shrunk to fit (aspect kept, bilinear), then reflect-padded on the bottom and
  right (`fit_reflect_pad`). Its pixels are the SDR frames in [-1, 1] as they are (LogC3 applies to the output only);
- stage 1 at half size: the distilled 8-step table, the reference's clean tokens beside the video's (at the LoRA's
  `reference_downscale_factor`, as `in_context.py` places them), noise drawn over both in token layout;
- stage 2: the x2 latent upsampler, re-noised to 0.909375 with noise from a fresh generator of the same seed (the
  authors' first stage-2 tile), 2 steps (0.909375, 0.725) with the reference again at full size;
- decoded in float32 when the VAE is not block-managed, mapped from [-1, 1] to [0, 1] and LogC3-decoded.
`high_quality=True` is the authors' `--high-quality`: each reference frame is doubled, `2N - 1` frames are
generated and every other one is kept.

The embeddings the LoRA was trained with are pre-computed (a `.safetensors` with `video_context` and
`audio_context`): `load_prompt_embeddings` reads them, or a dict of tensors, in place of the text encoder; so
`LTX2HDRPipeline` needs no Gemma. Outputs: `tone_map` (sRGB preview values), `save_hdr_preview` (an H.264 mp4 of
the tone-mapped frames) and `save_exr_frames` (half or full float EXR frames through PyAV's FFmpeg EXR encoder).

Not built: the authors' stage-2 tiling (2 x 2 x 2 latent tiles, each with its own seed; a memory saver at 4K
that also changes the result), reference strengths below 1, and the ACEScct transfer of the native `--hdr` path.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.media import load_frames, pil_to_tensor, save_video
from diffsynth.runtime.parallel import saves_outputs
from diffsynth.runtime.pipeline import seeded_generator
from diffsynth.runtime.schedulers import LTX2_DISTILLED_SIGMAS, FlowMatchScheduler
from diffsynth.runtime.vram import module_dtype

from .dit import video_positions
from .pipeline import LTX2Pipeline, pixel_tiles
from .velocity import DEFAULT_FRAME_RATE, LTX2Keyframes, LTX2Text, pack_video

logger = logging.getLogger(__name__)

# ARRI LogC3 at EI 800 (ARRI's "ALEXA Log C Curve" white paper): linear x >= CUT is coded c * log10(a x + b) + d,
# below it e x + f (the two pieces meet at CUT).
LOGC3_CUT, LOGC3_A, LOGC3_B, LOGC3_C = 0.010591, 5.555556, 0.052272, 0.247190
LOGC3_D, LOGC3_E, LOGC3_F = 0.385537, 5.367655, 0.092809
LOGC3_CODE_CUT = LOGC3_E * LOGC3_CUT + LOGC3_F  # the code value at CUT

DEFAULT_NUM_FRAMES = 161  # the authors' default length (at most this many of the reference's frames)
SIZE_MULTIPLE = 64  # two stages: the first samples at half size, in whole latent cells
MIN_SIZE = 64
STAGE_1_SIGMAS = LTX2_DISTILLED_SIGMAS  # the distilled table, 8 steps
STAGE_2_SIGMAS = (0.909375, 0.725, 0.0)  # the authors' HDR stage 2: 2 steps of the stage-2 table
TILED_ENCODE_PIXELS = 512 * 768  # the authors encode larger references in tiles (when tiling is asked for)
EMBEDDING_KEYS = ("video_context", "audio_context")
HDR_TRANSFORM_KEY = "hdr_transform"  # LoRA metadata: the transfer its outputs are coded in ("logc3", or "true")


# ------------------------------------------------------------------------------------------------- LogC3
def logc3_encode(linear: torch.Tensor) -> torch.Tensor:
    """Scene-linear light `[0, inf)` -> LogC3 (EI 800) code values in [0, 1] (negative light counts as 0;
    codes saturate at 1, linear ~55.1)."""
    x = linear.float().clamp(min=0.0)
    coded = torch.where(x >= LOGC3_CUT, LOGC3_C * torch.log10(LOGC3_A * x + LOGC3_B) + LOGC3_D, LOGC3_E * x + LOGC3_F)
    return coded.clamp(0.0, 1.0)


def logc3_decode(code: torch.Tensor) -> torch.Tensor:
    """LogC3 (EI 800) code values -> scene-linear light, the inverse of `logc3_encode` on its range ([0.0928, 1]).
    Codes are clamped to [0, 1] first and codes below `logc3_encode(0)` give 0 (the authors clamp the linear
    result at 0 too), so the result is in [0, ~55.1]."""
    t = code.float().clamp(0.0, 1.0)
    log_piece = (torch.pow(10.0, (t - LOGC3_D) / LOGC3_C) - LOGC3_B) / LOGC3_A
    linear = torch.where(t >= LOGC3_CODE_CUT, log_piece, (t - LOGC3_F) / LOGC3_E)
    return linear.clamp(min=0.0)


def lora_hdr_transform(path) -> str | None:
    """The transfer an HDR IC-LoRA file declares in its metadata (`hdr_transform`: "logc3"; a bare "true" means
    LogC3 too), None without one. Any other transfer is refused: only LogC3 is built."""
    if not isinstance(path, (str, os.PathLike)) or not str(path).endswith(".safetensors"):
        return None
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    value = metadata.get(HDR_TRANSFORM_KEY) or ("logc3" if metadata.get("use_hdr_transform") else None)
    if value is None:
        return None
    value = "logc3" if value.lower() == "true" else value.lower()
    if value != "logc3":
        raise ConfigError(f"{path}: metadata {HDR_TRANSFORM_KEY}={value!r}; only LogC3 ('logc3') outputs are decoded")
    return value


# ------------------------------------------------------------------------------------------------- sizes and frames
def aligned_size(height: int, width: int, multiple: int = SIZE_MULTIPLE) -> tuple[int, int]:
    """`height` x `width` rounded up to `multiple` (the authors pad, then crop the output back)."""
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name}={value!r} is not accepted; use a positive number of pixels")
    up = (math.ceil(height / multiple) * multiple, math.ceil(width / multiple) * multiple)
    if min(up) < MIN_SIZE:
        raise ConfigError(f"{height}x{width} is too small: the HDR pipeline generates at least {MIN_SIZE}x{MIN_SIZE}")
    return up


def fit_reflect_pad(video: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Videos `[B, C, F, H, W]` fitted to `height` x `width` without cropping: shrunk (bilinear, aspect ratio kept)
    only when larger in either side, then padded on the bottom and right by reflection (by repeating the edge when
    a pad is not smaller than the picture, as reflection needs)."""
    b, c, f, h, w = video.shape
    frames = video.transpose(1, 2).reshape(b * f, c, h, w)
    if height < h or width < w:
        scale = min(height / h, width / w)
        size = (round(h * scale), round(w * scale))
        frames = F.interpolate(frames, size=size, mode="bilinear", align_corners=False)
    fitted_h, fitted_w = frames.shape[-2:]
    pad_h, pad_w = height - fitted_h, width - fitted_w
    if pad_h or pad_w:
        mode = "reflect" if pad_h < fitted_h and pad_w < fitted_w else "replicate"
        frames = F.pad(frames, (0, pad_w, 0, pad_h), mode=mode)
    return frames.reshape(b, f, c, height, width).transpose(1, 2)


def read_reference(video, limit: int) -> tuple[list, float | None]:
    """At most `limit` frames of the reference (a video file, read only that far, or a list of frames) as RGB
    images, and the file's frame rate (None for a list, or when the file does not say)."""
    if not isinstance(video, (str, os.PathLike)):
        return load_frames(video, "reference_video")[:limit], None
    import av

    path = Path(video)
    if not path.is_file():
        raise ConfigError(f"reference_video: {path} is not a file (give a video file or a list of frames)")
    frames = []
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ConfigError(f"reference_video: {path} holds no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        for frame in container.decode(stream):
            frames.append(frame.to_image().convert("RGB"))
            if len(frames) >= limit:
                break
    if not frames:
        raise ConfigError(f"reference_video: {path} holds no decodable frames")
    return frames, float(rate) if rate else None


def reference_pixels(frames, num_frames: int, temporal: int, height: int, width: int, doubled: bool = False):
    """The reference as pixels `[1, 3, F, height, width]` in [-1, 1] (float32), each frame fitted by
    `fit_reflect_pad`: at most `num_frames` of `frames` (PIL images; with `doubled`, the first
    `(num_frames + 1) // 2`, each shown twice and cut to `num_frames`), then the longest `temporal`k + 1 of them,
    what the video VAE encodes. Frames are fitted one at a time, so only the fitted video is held."""
    frames = frames[: (num_frames + 1) // 2 if doubled else num_frames]
    count = min(2 * len(frames), num_frames) if doubled else len(frames)
    usable = (count - 1) // temporal * temporal + 1
    if usable != count:
        logger.warning("the reference video has %d frames; its first %d (%dk + 1) are used", count, usable, temporal)
    fitted = [fit_reflect_pad(pil_to_tensor([frame]).transpose(0, 1)[None], height, width) for frame in frames]
    pixels = torch.cat(fitted, dim=2)
    if doubled:
        pixels = pixels.repeat_interleave(2, dim=2)
    return pixels[:, :, :usable]


def encode_reference(pipe, frames, num_frames: int, size: tuple[int, int], factor: int, fps: float, options):
    """`LTX2Keyframes` of the reference `frames` (`reference_pixels`, `options` = (doubled, tiled)) for a video of
    `size` (height, width): fitted to that size over `factor`, encoded by the video VAE, its rows and columns placed
    on the video's grid (scaled by `factor`), time at the video's frame rate."""
    (height, width), (doubled, tiled) = size, options
    m = pipe.size_multiple
    if height % factor or width % factor or (height // factor) % m or (width // factor) % m:
        raise ConfigError(
            f"reference_downscale_factor={factor}: {height}x{width} / {factor} must be a multiple of {m} in height "
            "and width (the video VAE's), for the reference video"
        )
    ref_h, ref_w = height // factor, width // factor
    pixels = reference_pixels(frames, num_frames, pipe.vae.temporal_compression, ref_h, ref_w, doubled)
    pipe.load_models_to_device(["vae"])
    tiles = {"tiled": True} if tiled and ref_h * ref_w > TILED_ENCODE_PIXELS else {}
    latent = pipe.vae.encode(pixels.to(pipe.device, module_dtype(pipe.vae)), **tiles).float()
    coords = video_positions(pipe.dit.config, 1, *latent.shape[2:], fps, pipe.device)
    coords[:, 1:] *= factor
    return LTX2Keyframes(pack_video(latent), coords)


# ------------------------------------------------------------------------------------------------- embeddings
def load_prompt_embeddings(source, dit_config=None) -> LTX2Text:
    """Pre-computed DiT text contexts (what the text connectors would give): a `.safetensors` file or a mapping
    holding `video_context` `[L, D]` / `[1, L, D]` and `audio_context` `[L', D']` / `[1, L', D']` (the authors' HDR
    embeddings file; an `LTX2Text` passes through), or a `ModelConfig` naming such a file. With `dit_config` the
    widths are checked against what the DiT reads. Errors name the file (or "prompt_embeddings") and the key."""
    if isinstance(source, LTX2Text):
        return source
    if isinstance(source, ModelConfig):
        files = [p for p in source.resolve() if str(p).endswith(".safetensors")]
        if len(files) != 1:
            raise ConfigError(f"prompt_embeddings resolves to {len(files)} .safetensors files {files}; name one")
        source = files[0]
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"prompt_embeddings: {path} is not a file (a .safetensors with {list(EMBEDDING_KEYS)})")
        name = str(path)
        try:
            with safe_open(name, framework="pt") as f:
                keys = list(f.keys())
                tensors = {k: f.get_tensor(k) for k in EMBEDDING_KEYS if k in keys}
        except Exception as error:  # safetensors raises its own error types for a bad header
            raise ConfigError(f"prompt_embeddings: {name} is not a readable .safetensors file ({error})") from None
    elif isinstance(source, Mapping):
        name, keys, tensors = "prompt_embeddings", list(source), dict(source)
    else:
        raise ConfigError(
            f"prompt_embeddings must be a .safetensors path or a dict of tensors with {list(EMBEDDING_KEYS)}, "
            f"got {type(source).__name__}"
        )
    contexts = []
    for key in EMBEDDING_KEYS:
        if key not in tensors:
            raise ConfigError(f"{name} has no {key!r} tensor (it holds {sorted(map(str, keys))})")
        value = tensors[key]
        if (
            not isinstance(value, torch.Tensor)
            or value.dim() not in (2, 3)
            or (value.dim() == 3 and value.shape[0] != 1)
        ):
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ConfigError(f"{name}: {key!r} must be a tensor [tokens, width] or [1, tokens, width], got {got}")
        if value.shape[-2] == 0 or not value.is_floating_point():
            raise ConfigError(f"{name}: {key!r} must hold float vectors for at least one token, got {value.dtype}")
        contexts.append((value[None] if value.dim() == 2 else value).float())
    if dit_config is not None:
        wide = dit_config.caption_channels if dit_config.caption_projection else None
        for key, context, width in zip(EMBEDDING_KEYS, contexts, (dit_config.dim, dit_config.audio_dim), strict=True):
            expected = wide or width
            if context.shape[-1] != expected:
                raise ConfigError(
                    f"{name}: {key!r} is {context.shape[-1]} wide but the loaded DiT reads {expected}: the embeddings "
                    "were made for another model (the HDR IC-LoRA's are LTX-2.3's)"
                )
    return LTX2Text(contexts[0], contexts[1], None)


# ------------------------------------------------------------------------------------------------- generation
def generate_hdr(
    pipe: LTX2Pipeline,
    reference_video,
    prompt_embeddings=None,
    *,
    height: int | None = None,
    width: int | None = None,
    num_frames: int | None = None,
    frame_rate: float | None = None,
    seed: int | None = None,
    rand_device: str = "cpu",
    use_two_stage_pipeline: bool | None = None,
    high_quality: bool = False,
    reference_downscale_factor: int | None = None,
    sigmas: Sequence[float] | torch.Tensor | None = None,
    stage2_sigmas: Sequence[float] | torch.Tensor | None = None,
    tiled: bool = False,
    tile_size: int | tuple[int, int] = 16,
    tile_stride: int | tuple[int, int] | None = None,
    tile_size_in_pixels: int | None = None,
    tile_overlap_in_pixels: int | None = None,
    float32_decode: bool = True,
    output_type: str = "pt",
    progress_bar: bool = True,
):
    """Linear HDR frames for the SDR `reference_video` (a video file or a list of frames), with the HDR IC-LoRA
    loaded (`pipe.load_lora(...)`): "pt" `[1, 3, F, H, W]` or "np" `[1, F, H, W, 3]`, float32 scene-linear Rec.709
    in [0, ~55] (1 = diffuse white).

    `prompt_embeddings`: the pre-computed contexts (`load_prompt_embeddings`: a path, a dict, a `ModelConfig`;
    default: the preset's file). `height` / `width` default to the reference's size and `num_frames` to its length
    (at most 161, the authors' default; 8k + 1), `frame_rate` to its rate (else 24). Sizes are rounded up to 64
    (32 in one stage) and the frames cropped back. `use_two_stage_pipeline` (default on; off: stage 1 at full size,
    as one call of diffusers' `LTX2HDRPipeline`) needs the x2 latent upsampler. `sigmas` / `stage2_sigmas` replace
    the stages' tables. `reference_downscale_factor` defaults to the loaded IC-LoRA's (its metadata), else 1.
    `high_quality` generates `2 num_frames - 1` frames from a doubled reference and keeps every other one (~2x
    slower). `tiled` and the tile settings go to the video VAE's decoder (and encoder, for references above
    512x768). `float32_decode` decodes with the VAE's weights in float32, as the authors do (skipped for a
    block-managed VAE). Seeded noise is drawn on `rand_device`.
    """
    if output_type not in ("pt", "np"):
        raise ConfigError(f"output_type={output_type!r} is not accepted for HDR frames; use 'pt' or 'np'")
    if reference_video is None:
        raise ConfigError("reference_video is required: the SDR video (a file or a list of frames) to make HDR")
    source = pipe.setting("prompt_embeddings", prompt_embeddings, None)
    if source is None:
        raise ConfigError(
            "prompt_embeddings is required: the HDR IC-LoRA's pre-computed embeddings (a .safetensors file with "
            "video_context and audio_context, from Lightricks/LTX-2.3-22b-IC-LoRA-HDR, or a dict of those tensors)"
        )
    if isinstance(source, tuple):  # a preset's (repo, file pattern)
        source = ModelConfig(model_id=source[0], origin_file_pattern=source[1])
    text = load_prompt_embeddings(source, pipe.dit.config)
    wanted = pipe.setting("num_frames", num_frames, None)
    count = None if wanted is None else pipe.check_num_frames(wanted)
    frames, file_rate = read_reference(reference_video, DEFAULT_NUM_FRAMES if count is None else count)
    if count is not None and len(frames) < count:  # high_quality shows each of the first `count` frames twice
        raise ConfigError(
            f"num_frames={count} needs {count} frames of reference_video, which has {len(frames)}: give "
            f"num_frames <= {len(frames)} (8k + 1) or leave it out to follow the reference"
        )
    two_stage = bool(pipe.setting("use_two_stage_pipeline", use_two_stage_pipeline, True))
    fps = pipe.check_frame_rate(pipe.setting("frame_rate", frame_rate, file_rate or DEFAULT_FRAME_RATE))
    ref_width, ref_height = frames[0].size
    height, width = pipe.setting("height", height, ref_height), pipe.setting("width", width, ref_width)
    gen_height, gen_width = aligned_size(height, width, SIZE_MULTIPLE if two_stage else pipe.size_multiple)
    if (gen_height, gen_width) != (height, width):
        logger.info("HDR: generating %dx%d, cropped to %dx%d", gen_width, gen_height, width, height)
    if count is None:  # the reference's length, down to 8k + 1
        temporal = pipe.vae.temporal_compression
        count = (len(frames) - 1) // temporal * temporal + 1
    generated = 2 * count - 1 if high_quality else count
    factor = pipe.check_in_context([reference_video], reference_downscale_factor)
    if two_stage:
        pipe.check_two_stage(gen_height, gen_width, distilled=True)
    tile_size, tile_stride = pixel_tiles(
        tile_size, tile_stride, tile_size_in_pixels, tile_overlap_in_pixels, pipe.vae.spatial_compression
    )
    stage_1 = FlowMatchScheduler("ltx2_distilled")
    stage_1.set_timesteps(len(STAGE_1_SIGMAS) - 1, sigmas=STAGE_1_SIGMAS if sigmas is None else sigmas)
    generator, rand_device = seeded_generator(seed, rand_device, pipe.samples_in_parallel())

    # stage 1 (half size with two stages)
    size = (gen_height // 2, gen_width // 2) if two_stage else (gen_height, gen_width)
    reference = encode_reference(pipe, frames, generated, size, factor, fps, (high_quality, tiled))
    video = _noised(pipe, (generated, *size), reference, generator, rand_device, float(stage_1.sigmas[0]))
    video = _denoise(pipe, video, stage_1, text, fps, reference, progress_bar)

    # stage 2: x2 latents, re-noised, refined at full size with the reference at full size
    if two_stage:
        stage_2 = FlowMatchScheduler("ltx2_stage2")
        stage_2_sigmas = STAGE_2_SIGMAS if stage2_sigmas is None else stage2_sigmas
        stage_2.set_timesteps(len(STAGE_2_SIGMAS) - 1, sigmas=stage_2_sigmas)
        upsampled = pipe.upsample_latents(video)
        reference = encode_reference(
            pipe, frames, generated, (gen_height, gen_width), factor, fps, (high_quality, tiled)
        )
        fresh, _ = seeded_generator(seed, rand_device, pipe.samples_in_parallel())  # the authors' tile 0
        video = _noised(pipe, upsampled, reference, fresh, rand_device, float(stage_2.sigmas[0]))
        video = _denoise(pipe, video, stage_2, text, fps, reference, progress_bar)

    # decode: LogC3 codes -> linear light
    linear = decode_linear(pipe, video, (tiled, tile_size, tile_stride), float32_decode)
    pipe.load_models_to_device([])
    linear = linear[:, :, :: 2 if high_quality else 1, :height, :width]
    return linear.permute(0, 2, 3, 4, 1).cpu().numpy() if output_type == "np" else linear


def _noised(pipe, latents_or_size, reference: LTX2Keyframes, generator, rand_device, sigma: float) -> torch.Tensor:
    """Video latents noised to `sigma`: pure noise for a (frames, height, width) size, else the given latents mixed
    with noise. The noise is drawn over the video's and the reference's tokens (as ltx-core and diffusers draw it)."""
    if isinstance(latents_or_size, torch.Tensor):
        latents = latents_or_size
    else:
        frames, height, width = latents_or_size
        tc, sc = pipe.vae.temporal_compression, pipe.vae.spatial_compression
        shape = (1, pipe.dit.config.in_channels, (frames - 1) // tc + 1, height // sc, width // sc)
        latents = torch.zeros(shape, device=pipe.device)
    noise = pipe._token_noise(latents.shape, generator, rand_device, pipe.device, len(reference))
    return sigma * noise + (1.0 - sigma) * latents


def _denoise(pipe, video, scheduler, text: LTX2Text, fps, reference: LTX2Keyframes, progress_bar) -> torch.Tensor:
    """Euler steps of the video alone (the DiT leaves the empty audio stream out), no guidance."""
    no_audio = video.new_zeros(video.shape[0], 1, 0, pipe.dit.config.audio_in_channels)
    unguided = (False, 1.0, 1.0, 0.0, None)
    video, _ = pipe.denoise(video, no_audio, scheduler, text, fps, None, unguided, progress_bar, reference)
    return video


def decode_linear(pipe, video: torch.Tensor, tiles, float32: bool = True) -> torch.Tensor:
    """Video latents -> linear HDR `[B, 3, F, H, W]` (float32): the VAE's frames in [-1, 1] are LogC3 codes in
    [0, 1] after `(x + 1) / 2`. With `float32`, the VAE's weights are float32 for the decode (unless block-managed,
    whose weights stream in their own dtype)."""
    tiled, tile_size, tile_stride = tiles
    pipe.load_models_to_device(["vae"])
    managed = "vae" in pipe.vram_handles
    if float32 and managed:
        logger.info("HDR: the VAE is block-managed; decoding in %s", module_dtype(pipe.vae))
    cast = float32 and not managed
    with float32_weights(pipe.vae) if cast else contextlib.nullcontext():
        dtype = module_dtype(pipe.vae)
        pixels = pipe.vae.decode(video.to(dtype), tiled=tiled, tile_size=tile_size, tile_stride=tile_stride)
    return logc3_decode((pixels.float() + 1.0) / 2.0)


@contextlib.contextmanager
def float32_weights(module: torch.nn.Module):
    """`module`'s floating parameters and buffers in float32 inside, each back to its own tensor after."""
    saved = []
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.is_floating_point() and tensor.dtype != torch.float32:
            saved.append((tensor, tensor.data))
            tensor.data = tensor.data.float()
    try:
        yield module
    finally:
        for tensor, data in saved:
            tensor.data = data


# ------------------------------------------------------------------------------------------------- outputs
def _frames_last(frames) -> np.ndarray:
    """Linear frames as float32 `[F, H, W, 3]`: a tensor `[3, F, H, W]` ("pt") or an array `[F, H, W, 3]` ("np"),
    either with a batch axis of one."""
    array = frames.detach().float().cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if array.ndim == 5 and array.shape[0] == 1:
        array = array[0]
    if isinstance(frames, torch.Tensor) and array.ndim == 4 and array.shape[0] == 3:
        array = array.transpose(1, 2, 3, 0)
    if array.ndim != 4 or array.shape[-1] != 3:
        layout = "a tensor [(1,) 3, F, H, W] or an array [(1,) F, H, W, 3]"
        raise ConfigError(f"HDR frames must be {layout}, got shape {tuple(np.shape(frames))}")
    return array.astype(np.float32, copy=False)


def tone_map(linear, exposure: float = 0.0, method: str = "clip"):
    """Display values (sRGB-encoded, [0, 1]) of linear HDR light (a tensor or an array, any layout), for previews:
    scaled by `2 ** exposure` stops, then `method` "clip" (values above 1 clip; the authors' preview) or "reinhard"
    (`x / (1 + x)`, which keeps highlight detail), then the sRGB transfer function."""
    if method not in ("clip", "reinhard"):
        raise ConfigError(f"method={method!r} is not accepted; use 'clip' or 'reinhard'")
    lib = torch if isinstance(linear, torch.Tensor) else np
    x = lib.clip(linear * float(2.0**exposure), 0.0, None)
    x = x / (1.0 + x) if method == "reinhard" else lib.clip(x, 0.0, 1.0)
    return lib.where(x <= 0.0031308, 12.92 * x, 1.055 * lib.clip(x, 0.0031308, None) ** (1.0 / 2.4) - 0.055)


def save_hdr_preview(
    frames, path, fps: float, exposure: float = 0.0, method: str = "clip", quality: float = 6.5
) -> None:
    """An H.264 mp4 preview of linear HDR frames (tone-mapped by `tone_map`; `quality` 6.5 is about CRF 18, the
    authors' preview)."""
    save_video(tone_map(_frames_last(frames), exposure, method), path, fps=fps, quality=quality)


def save_exr_frames(frames, folder, half: bool = True, prefix: str = "frame_") -> list[Path]:
    """Linear HDR frames as OpenEXR images `folder/{prefix}00000.exr`, ... (R, G, B channels, ZIP compressed; half
    floats, or 32-bit floats with `half=False`), written by PyAV's FFmpeg EXR encoder. Returns the paths."""
    import av

    if "exr" not in av.codecs_available:
        raise ConfigError(
            "this PyAV's FFmpeg has no EXR encoder: install the PyAV wheel (`pip install av`, which bundles it) or "
            "save the frames yourself (e.g. numpy.save of the 'np' output)"
        )
    array = _frames_last(frames)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, frame in enumerate(array):
        path = folder / f"{prefix}{i:05d}.exr"
        path.write_bytes(_exr_bytes(frame, half))
        paths.append(path)
    logger.info("wrote %d EXR frames to %s", len(paths), folder)
    return paths


def _exr_bytes(rgb: np.ndarray, half: bool) -> bytes:
    """One `[H, W, 3]` float frame as an EXR file's bytes (FFmpeg's encoder takes planar G, B, R floats)."""
    from fractions import Fraction

    import av

    h, w = rgb.shape[:2]
    if half:  # rounded to the nearest half here: FFmpeg's own conversion truncates
        rgb = np.clip(rgb, -65504.0, 65504.0).astype(np.float16).astype(np.float32)
    context = av.codec.CodecContext.create("exr", "w")
    context.width, context.height, context.pix_fmt = w, h, "gbrpf32le"
    context.time_base = Fraction(1, 1)
    context.options = {"compression": "zip16", "format": "half" if half else "float"}
    frame = av.VideoFrame(w, h, "gbrpf32le")
    for plane, channel in zip(frame.planes, (1, 2, 0), strict=True):
        row = plane.line_size // 4
        padded = np.zeros((h, row), dtype=np.float32)
        padded[:, :w] = rgb[..., channel]
        plane.update(padded.tobytes())
    frame.pts = 0
    return b"".join(bytes(packet) for packet in [*context.encode(frame), *context.encode(None)])


# ------------------------------------------------------------------------------------------------- pipeline
class LTX2HDRPipeline(LTX2Pipeline):
    """LTX-2.3 HDR IC-LoRA video-to-video (`generate_hdr`): `pipe(reference_video, prompt_embeddings=...)` gives
    linear HDR frames. It reads pre-computed embeddings, so the text encoder and tokenizer are optional; the
    `Lightricks/LTX-2.3:hdr` preset loads the distilled model, the x2 upsampler and the HDR IC-LoRA and finds the
    embeddings itself. Any LTX-2 loading works (`model_configs`, folders); load the LoRA with `load_lora`."""

    optional_slots = (*LTX2Pipeline.optional_slots, "text_encoder")

    @classmethod
    def from_pretrained(cls, model_id_or_configs=None, **kwargs):
        """As `LTX2Pipeline.from_pretrained`; a preset's HDR IC-LoRA (`hdr_lora`) is fetched and fused."""
        pipe = super().from_pretrained(model_id_or_configs, **kwargs)
        preset_lora = pipe.defaults.pop("hdr_lora", None)
        if preset_lora is not None:
            pipe.load_lora(ModelConfig(model_id=preset_lora[0], origin_file_pattern=preset_lora[1]))
        return pipe

    def apply_lora(self, source, scale: float, fuse: bool, slot: str, name: str | None):
        """As `LTX2Pipeline.apply_lora`; an HDR IC-LoRA declaring a transfer other than LogC3 is refused."""
        lora_hdr_transform(source)
        return super().apply_lora(source, scale, fuse, slot, name)

    @torch.no_grad()
    def __call__(self, reference_video, prompt_embeddings=None, **kwargs):
        """`generate_hdr(self, reference_video, prompt_embeddings, **kwargs)`: linear HDR frames."""
        return generate_hdr(self, reference_video, prompt_embeddings, **kwargs)

    # the `diffsynth generate` flags `run_cli` and the load read (dests; --prompt only to warn): others are refused
    cli_flags = frozenset({"input_video", "height", "width", "num_frames", "fps", "seed", "prompt", "lora"})
    cli_flags |= {"sequence_parallel", "cfg_parallel", "first_block_cache", "tea_cache", "tea_cache_model_id"}

    def run_cli(self, args) -> int:
        """`diffsynth generate --model Lightricks/LTX-2.3:hdr --input-video clip.mp4 --output hdr.mp4`: the linear HDR
        frames as half-float EXR files in `<output stem>_exr/` and a tone-mapped H.264 preview at `--output`, at the
        reference's frame rate (or `--fps`). `--height`, `--width`, `--num-frames` and `--seed` are read."""
        from diffsynth.runtime.media import video_frame_rate

        if args.input_video is None:
            raise ConfigError(f"{args.model} makes an SDR video HDR: give it with --input-video")
        if args.prompt is not None:
            logger.warning("--prompt is not read: the HDR IC-LoRA's pre-computed embeddings are its prompt")
        output = Path(args.output or "output.mp4")
        if output.suffix.lower() != ".mp4":
            raise ConfigError(f"--output is the tone-mapped preview, an .mp4 file, not {output}")
        options = {"height": args.height, "width": args.width, "num_frames": args.num_frames, "frame_rate": args.fps}
        options = {name: value for name, value in options.items() if value is not None}
        frames = self(args.input_video, seed=args.seed, **options)
        if not saves_outputs():  # under torchrun every rank holds the frames: rank 0 alone writes them
            return 0
        fps = args.fps or video_frame_rate(args.input_video)
        output.parent.mkdir(parents=True, exist_ok=True)
        exr = save_exr_frames(frames, output.with_name(f"{output.stem}_exr"))
        save_hdr_preview(frames, output, fps=fps)
        logger.info("wrote %d EXR frames to %s and the preview %s", len(exr), exr[0].parent, output)
        return 0


__all__ = [
    "LTX2HDRPipeline",
    "aligned_size",
    "fit_reflect_pad",
    "generate_hdr",
    "load_prompt_embeddings",
    "logc3_decode",
    "logc3_encode",
    "save_exr_frames",
    "save_hdr_preview",
    "tone_map",
]
