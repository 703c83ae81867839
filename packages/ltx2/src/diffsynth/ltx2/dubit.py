"""Dub-It: a clip re-voiced from a prompt, keeping the speaker's voice and syncing the lips (the authors'
`DubItPipeline`, for `Lightricks/LTX-2.3-22b-IC-LoRA-DubIt`, `ltx-2.3-22b-ic-lora-dubit-0.9.safetensors`, on the
distilled model).

The Dub-It IC-LoRA (loaded with `load_lora`, in both stages) reads two references of the source clip:

- its video, as any IC-LoRA reference (`in_context.py`: clean tokens beside the video's, at the LoRA's
  `reference_downscale_factor` below each stage's size);
- its whole sound track (not cut to the clip), encoded by the audio VAE: clean audio tokens appended after the
  audio's, at timestep 0, placed before the clip in time (their positions shifted back by the sound's length plus
  0.04 s), so the model hears the voice without taking it for the new sound.

The clip's length and frame rate are the source's (its frame count rounded down to 8k + 1). Stage 1 samples the
video and the new sound at half size on the distilled schedule; stage 2 doubles the video latents (the latent
upsampler), re-noises them to the second stage's first sigma and refines them in its 3 steps with the
full-size video reference, while the new sound stays as it is (the stage-1 sound is also the audio reference
there). No guidance: the distilled model runs unguided.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.media import load_audio, load_video, resample_audio, video_frame_rate
from diffsynth.runtime.pipeline import seeded_generator
from diffsynth.runtime.schedulers import FlowMatchScheduler
from diffsynth.runtime.vram import module_dtype

from .audio_vae import mel_spectrogram, pack_latents
from .decoding import Decoding, diffusion_tiles, uses_diffusion_decoder
from .dit import audio_positions
from .in_context import encode_references
from .velocity import LTX2Keyframes

logger = logging.getLogger(__name__)

REFERENCE_GAP = 0.04  # seconds between the reference sound's end and the clip's start (ltx-pipelines)


def frame_count(frames: int, temporal: int = 8) -> int:
    """The most frames on the video VAE's `temporal * k + 1` grid that a source of `frames` frames holds."""
    if frames < 1:
        raise ConfigError("the reference video holds no frames")
    return (frames - 1) // temporal * temporal + 1


def encode_whole_track(pipe, waveform: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """Normalised audio latents `[1, C, L, M]` of the source's whole sound track `[C, N]`, neither cut nor padded to
    the clip (the authors' `_encode_reference_audio_vae_latent` encodes all of it): the voice to keep."""
    config = pipe.audio_vae.config
    waveform = resample_audio(waveform.detach().float().cpu(), int(sample_rate), config.sample_rate)
    pipe.load_models_to_device(["audio_vae"])
    mel = mel_spectrogram(waveform[None].to(pipe.device), config.sample_rate, config)
    return pipe.audio_vae.encode(mel.to(module_dtype(pipe.audio_vae))).float()


def audio_reference(pipe, latents: torch.Tensor):
    """`LTX2Keyframes` of audio latents `[1, C, L, M]`: their tokens, at their own positions shifted back by
    their duration plus `REFERENCE_GAP`, so they end just before the clip starts."""

    positions = audio_positions(pipe.dit.config, 1, latents.shape[2], latents.device)
    positions = positions - (positions[..., 1].max() + REFERENCE_GAP)
    return LTX2Keyframes(pack_latents(latents), positions)


def dub_video(
    pipe,
    prompt: str,
    reference_video: str | os.PathLike,
    *,
    height: int | None = None,
    width: int | None = None,
    seed: int | None = None,
    rand_device: str = "cpu",
    max_sequence_length: int | None = None,
    enhance_prompt: bool = False,
    stage_1_sigmas: Sequence[float] | None = None,
    tiled: bool = False,
    tile_size: int | tuple[int, int] = 16,
    tile_stride: int | tuple[int, int] | None = None,
    output_type: str = "pil",
    progress_bar: bool = True,
):
    """`(frames, LTX2Audio)` of `reference_video` (a video file with sound) re-voiced to say `prompt`, at `height`
    x `width` (default 512 x 768; multiples of 64), its length and frame rate. Load the distilled model and the
    Dub-It IC-LoRA (`load_lora`) first. `stage_1_sigmas` replaces the distilled schedule of the first stage."""
    from .pipeline import DEFAULT_MAX_SEQUENCE_LENGTH

    if not isinstance(prompt, str):
        raise ConfigError("dub_video takes one prompt (the new speech) for one reference video")
    if not isinstance(reference_video, (str, os.PathLike)):
        raise ConfigError("reference_video is a video file with sound (its frame rate and audio track are read)")
    if output_type not in ("pil", "np", "pt"):
        raise ConfigError(f"output_type={output_type!r} is not accepted; use 'pil', 'np' or 'pt'")
    factor = pipe.reference_downscale_factor or 1
    if pipe.reference_downscale_factor is None:
        logger.warning("no IC-LoRA with a reference_downscale_factor is loaded: load the Dub-It IC-LoRA first")
    height, width = pipe.check_size(pipe.setting("height", height, 512), pipe.setting("width", width, 768))
    pipe.check_two_stage(height, width, distilled=True)  # the upsampler, sizes that halve to multiples of 32
    fps = video_frame_rate(reference_video)
    source = load_video(reference_video)
    frames = frame_count(len(source), pipe.vae.temporal_compression)
    source = source[:frames]
    waveform, rate = load_audio(reference_video)
    max_len = pipe.setting("max_sequence_length", max_sequence_length, DEFAULT_MAX_SEQUENCE_LENGTH)
    prompts = [prompt]
    if enhance_prompt:
        prompts = pipe.enhance_prompts(prompts, [None], seed)  # no image: the authors' text-to-video prompt

    pipe.load_models_to_device(["text_encoder", "connectors"])
    text = pipe.encode_prompt(prompts, max_len)
    generator, rand_device = seeded_generator(seed, rand_device, pipe.samples_in_parallel())
    unguided = (False, 1.0, 1.0, 0.0, None)

    # stage 1: half size, the new sound sampled beside the video, both references read
    stage_height, stage_width = height // 2, width // 2
    video_tokens, video_coords = encode_references(pipe, [source], stage_height, stage_width, frames, fps, factor)
    video_reference = LTX2Keyframes(video_tokens, video_coords)
    heard = encode_whole_track(pipe, waveform, rate)
    sound_reference = audio_reference(pipe, heard)
    scheduler = FlowMatchScheduler("ltx2_distilled")
    scheduler.set_timesteps(8, sigmas=stage_1_sigmas)
    tc, sc = pipe.vae.temporal_compression, pipe.vae.spatial_compression
    video_shape = (1, pipe.dit.config.in_channels, (frames - 1) // tc + 1, stage_height // sc, stage_width // sc)
    video = pipe._token_noise(video_shape, generator, rand_device, pipe.device, len(video_reference))
    audio_shape = pipe.audio_latent_shape(1, frames, fps)
    audio = pipe._token_noise(audio_shape, generator, rand_device, pipe.device, len(sound_reference))
    video, audio = pipe.denoise(
        video, audio, scheduler, text, fps, None, unguided, progress_bar, video_reference,
        audio_references=sound_reference,
    )  # fmt: skip

    # stage 2: full size; the new sound stays and is the audio reference
    video = pipe.upsample_latents(video)
    video_tokens, video_coords = encode_references(pipe, [source], height, width, frames, fps, factor)
    video_reference = LTX2Keyframes(video_tokens, video_coords)
    scheduler = FlowMatchScheduler("ltx2_stage2")
    scheduler.set_timesteps(3)
    start = float(scheduler.sigmas[0])
    noise = pipe._token_noise(video.shape, generator, rand_device, video.device, len(video_reference))
    video = start * noise + (1 - start) * video
    frozen = torch.zeros((1, 1, audio.shape[2], 1), device=audio.device)
    video, _ = pipe.denoise(
        video, audio, scheduler, text, fps, None, unguided, progress_bar, video_reference, frozen,
        audio_references=audio_reference(pipe, audio),
    )  # fmt: skip

    decoding = Decoding(
        output_type == "pil", output_type, tiled, tile_size, tile_stride, uses_diffusion_decoder(pipe, None),
        diffusion_tiles(None, None, None, None),
    )  # fmt: skip
    return pipe.finish(video, audio, decoding, seconds=frames / fps, generator=generator)
