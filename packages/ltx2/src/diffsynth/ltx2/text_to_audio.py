"""Text-to-audio: sound alone from a prompt (the authors' `T2AOneStagePipeline`).

The audio-video DiT runs with no video tokens: each block leaves the empty stream out, with the attentions
between the streams, so the audio tokens see only themselves and the text (ltx-core's audio-only forward). One
stage on the full model's schedule (shifted as for 4096 tokens), with the audio stream's guidance: CFG with the
rescale, and STG on the audio self-attentions of the STG blocks; modality isolation has nothing to isolate.
The length follows `num_frames / frame_rate` seconds (LTX-2.5's duration head predicts `num_frames` from the prompt
when loaded and it is left out): `L = round(num_frames / frame_rate * 25)` audio latent frames, decoded to `4L - 3`
mel frames of 10 ms (`240 * (4L - 3)` samples at 24 kHz, 480 per mel frame at 48 kHz) and returned unpadded, a
few tens of milliseconds shorter than the zero-padded sound of a video call. Used for speech or sound alone, and
to try an audio LoRA (an accent, a voice) without making a video.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.parallel import describe_parallel
from diffsynth.runtime.pipeline import finite_number, seeded_generator
from diffsynth.runtime.schedulers import FlowMatchScheduler

if TYPE_CHECKING:
    from .pipeline import LTX2Audio, LTX2Pipeline


def generate_audio(
    pipe: LTX2Pipeline,
    prompt: str | Sequence[str],
    negative_prompt: str | Sequence[str] | None = None,
    *,
    num_frames: int | None = None,
    frame_rate: float | None = None,
    audio_cfg_scale: float | None = None,
    audio_stg_scale: float | None = None,
    audio_guidance_rescale: float | None = None,
    spatio_temporal_guidance_blocks: Sequence[int] | None = None,
    num_inference_steps: int | None = None,
    sigmas: Sequence[float] | torch.Tensor | None = None,
    seed: int | None = None,
    rand_device: str = "cpu",
    audio_latents: torch.Tensor | None = None,
    max_sequence_length: int | None = None,
    min_seconds: float = 1.0,
    max_seconds: float = 20.0,
    enhance_prompt: bool = False,
    enhance_prompt_seed: int | None = None,
    progress_bar: bool = True,
) -> LTX2Audio:
    """Sound for each prompt: an `LTX2Audio` (waveform `[2, N]` for one prompt, `[B, 2, N]` for a list).

    The guidance arguments are the audio stream's of `LTX2Pipeline.__call__`, with the same defaults (the
    preset's, else the authors': CFG 7, rescale 0.7, STG 1 at block 29 of LTX-2 / 28 of LTX-2.3); a distilled
    preset runs its 8-step table without guidance, as `__call__` does. `audio_latents` is the
    initial noise `[B, 8, L, 16]` (else drawn from `seed` on `rand_device`).
    """
    from .pipeline import (
        DEFAULT_AUDIO_CFG,
        DEFAULT_FRAME_RATE,
        DEFAULT_MAX_SEQUENCE_LENGTH,
        DEFAULT_RESCALE,
        DEFAULT_STG,
        SCHEDULE_TOKENS,
        LTX2Audio,
        LTX2Guidance,
    )

    groups = getattr(pipe.dit, "parallel", None)
    if groups is not None and groups.sequence_size > 1:  # batch (CFG) parallelism divides its rows as any call's
        raise ConfigError(
            f"text-to-audio does not run under {describe_parallel(groups)}: sequence parallelism divides the video "
            "tokens, and text-to-audio has none; use batch (CFG) parallelism alone (enable_parallel(sequence=1, "
            "batch=2), --cfg-parallel 2) or pipe.disable_parallel()"
        )
    if pipe.step_caches():
        raise ConfigError(
            "the first-block cache decides on the video tokens, and text-to-audio has none: "
            "pipe.disable_first_block_cache() first"
        )
    negative = pipe.setting("negative_prompt", negative_prompt, "")
    prompts, negatives = pipe.check_prompt_pair(prompt, negative)
    if enhance_prompt:
        enhance_seed = seed if enhance_prompt_seed is None else enhance_prompt_seed
        prompts = pipe.enhance_prompts(prompts, [None] * len(prompts), enhance_seed)
    distilled = bool(pipe.setting("use_distilled_pipeline", None, False))
    steps = pipe.setting("num_inference_steps", num_inference_steps, 8 if distilled else pipe.default_steps)
    scale = pipe.setting("audio_cfg_scale", audio_cfg_scale, 1.0 if distilled else DEFAULT_AUDIO_CFG)
    scale = finite_number(scale, "audio_cfg_scale")  # a NaN scale gives a NaN waveform
    rescale = pipe.setting("audio_guidance_rescale", audio_guidance_rescale, None)
    rescale = float(pipe.setting("guidance_rescale", None, DEFAULT_RESCALE) if rescale is None else rescale)
    if not 0.0 <= rescale <= 1.0:
        raise ConfigError(f"audio_guidance_rescale={rescale!r} is not accepted; use a number in [0, 1]")
    stg_default = 0.0 if distilled else pipe.setting("stg_scale", None, DEFAULT_STG)
    stg = finite_number(pipe.setting("audio_stg_scale", audio_stg_scale, stg_default), "audio_stg_scale")
    guidance = LTX2Guidance(audio_stg_scale=stg, blocks=pipe.check_stg_blocks(spatio_temporal_guidance_blocks))
    fps = pipe.check_frame_rate(pipe.setting("frame_rate", frame_rate, DEFAULT_FRAME_RATE))
    max_len = pipe.setting("max_sequence_length", max_sequence_length, DEFAULT_MAX_SEQUENCE_LENGTH)
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
        raise ConfigError(f"max_sequence_length={max_len!r} is not accepted; use an integer >= 1")
    if num_frames is None and pipe.duration_head is not None and "num_frames" not in pipe.defaults:
        # from the audio connector's output only, as ltx-pipelines' text-to-audio (it passes no video encoding)
        num_frames = pipe.predict_num_frames(prompts[0], max_len, fps, min_seconds, max_seconds, video=False)
    frames = pipe.check_num_frames(pipe.setting("num_frames", num_frames, 121))
    use_cfg = scale != 1.0

    pipe.load_models_to_device(["text_encoder", "connectors"])
    text = pipe.encode_prompt(prompts, max_len)
    both = text.cat(pipe.encode_prompt(negatives, max_len)) if use_cfg else text

    if distilled:  # a distilled preset: its fixed table, as `__call__` runs it
        scheduler = FlowMatchScheduler("ltx2_distilled")
        scheduler.set_timesteps(steps, sigmas=sigmas)
    else:
        scheduler = FlowMatchScheduler("ltx2")
        scheduler.set_timesteps(steps, sigmas=sigmas, image_seq_len=SCHEDULE_TOKENS)
    shape = pipe.audio_latent_shape(len(prompts), frames, fps)
    if audio_latents is not None:
        audio = pipe._check_initial(audio_latents, shape, "audio_latents")
    else:  # only the audio noise is drawn: there is no video to draw first
        generator, rand_device = seeded_generator(seed, rand_device, pipe.samples_in_parallel())
        audio = torch.randn(shape, generator=generator, device=rand_device, dtype=torch.float32).to(pipe.device)
    no_video = audio.new_zeros(len(prompts), pipe.dit.config.in_channels, 0, 1, 1)
    guided = (use_cfg, 1.0, scale, (0.0, rescale), guidance)  # (video, audio) rescale: there is no video
    _, audio = pipe.denoise(no_video, audio, scheduler, both, fps, None, guided, progress_bar)

    waveform = pipe.decode_audio(audio)
    pipe.load_models_to_device([])
    single = isinstance(prompt, str)
    return LTX2Audio(waveform[0] if single else waveform, pipe.sample_rate)
