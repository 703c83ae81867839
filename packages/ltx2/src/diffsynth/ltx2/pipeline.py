"""`LTX2Pipeline`: LTX-2 text-to-video with synchronised audio.

Stages: encode prompts (Gemma-3 hidden states of every layer -> the text connectors, one context per
stream) -> prepare latents (seeded noise for the video `[B, 128, 1 + (F-1)/8, H/32, W/32]` and the audio
`[B, 8, L, 16]`, drawn in that order from one generator) -> denoise (Euler on the `ltx2` schedule; CFG
batched with the conditional pass, with its own scale per stream and an optional rescale) -> decode
(video VAE; audio VAE to a mel spectrogram, then the vocoder to a waveform).
`ltx2_velocity` (`velocity.py`) is the per-step model call; a trainer reuses it.

The audio stream covers the video's duration: `L = round(F / frame_rate * 25)` latent frames (16 kHz mel,
hop 160, 4x compressed). The schedule follows the authors' pipelines, which shift it as if the video
had 4096 tokens whatever its size (diffusers shifts by the real token count; pass `sigmas=` to choose).
Besides CFG the authors add two guidance terms, on by default: STG (spatio-temporal guidance, away from
a pass whose block-29 self-attentions pass their values through) and modality isolation (away from a
pass without the audio<->video attentions); `LTX2Guidance` holds their scales, and their passes join
the CFG batch (`guidance.py`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import operator
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.media import (
    h264_frame,
    load_audio,
    load_image,
    pil_to_tensor,
    resample_audio,
    tensor_to_output,
    video_frame_rate,
)
from diffsynth.runtime.pipeline import BasePipeline, finite_number, lora_file, seeded_generator
from diffsynth.runtime.schedulers import FlowMatchScheduler
from diffsynth.runtime.vram import module_dtype

from . import dfr, res2s
from .audio_vae import mel_spectrogram, unpack_latents
from .decoding import Decoding, decode_video, diffusion_tiles, uses_diffusion_decoder
from .dfr import DFRImages
from .dit import audio_positions, keyframe_positions
from .duration_head import num_frames_from_seconds
from .framing import fit_image
from .guidance import LTX2Guidance, guided_velocities
from .in_context import check_factor, encode_references, lora_reference_downscale_factor
from .retake import keep_video, retake_frames
from .velocity import DEFAULT_FRAME_RATE, LTX2AudioCondition, LTX2Keyframes, LTX2Text, pack_video, unpack_video
from .velocity import ltx2_velocity as ltx2_velocity  # the pipeline's public model call, as before
from .video_vae import LTX2VideoEncoderVAE

logger = logging.getLogger(__name__)

DEFAULT_STEPS = 40  # ltx-pipelines LTX_2_PARAMS (full model)
LTX23_STEPS, LTX23_STG_BLOCKS = 30, (28,)  # ltx-pipelines LTX_2_3_PARAMS: the only defaults 2.3 changes
LTX24_IMAGE_CRF = 18  # ltx-pipelines LTX_2_4_PARAMS (2.4 and later, 2.5 included): 2.3's, with this image CRF
DEFAULT_CFG = 3.0
DEFAULT_AUDIO_CFG = 7.0
DEFAULT_RESCALE = 0.7
DEFAULT_STG = 1.0  # ltx-pipelines LTX_2_PARAMS, both streams
DEFAULT_MODALITY = 3.0
DEFAULT_STG_BLOCKS = (29,)  # of the released 48; a default block past a smaller DiT's depth is dropped
DEFAULT_AUDIO_SAMPLE_RATE = 48000  # DiffSynth-Studio's default for retake_audio
DEFAULT_IMAGE_CRF = 33  # the authors re-compress an image-to-video first frame with H.264 at CRF 33 (LTX-2.0)
DEFAULT_MAX_SEQUENCE_LENGTH = 1024  # Gemma prompts are left-padded to this many tokens
GEMMA_REPO = "google/gemma-3-12b-it-qat-q4_0-unquantized"
STAGE_2_LORA_STRENGTH = 0.8  # the authors' README runs the distilled LoRA at 0.8 in stage 2 (as DiffSynth-Studio)
STAGE_2_LORA_NAME = "stage_2_distilled"
DFR_DISTILLED_LORA_STRENGTH = 1.0  # ltx-pipelines' DFRPipeline runs the distilled LoRA at the default strength, 1
SCHEDULE_TOKENS = 4096  # the authors call LTX2Scheduler without a latent: the shift of 4096 tokens
ImageInput = str | os.PathLike | Image.Image
MAX_WAVEFORM_PEAK = 2.0  # a float waveform is in [-1, 1]; peaks past this are PCM-scaled (x 32767), not sound


def frame_index(value) -> int | None:
    """A video frame index as an int (numpy integers too, via `operator.index`); None for bools, floats and the
    rest."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def first_frame_strength(value) -> float:
    """`input_images_strength` as a float: one number, for the image at index 0 (keyframes are always kept whole),
    so a list (DiffSynth-Studio-style per-image strengths) is refused by name instead of failing in float()."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        raise ConfigError(
            f"input_images_strength={value!r} must be one number, the first frame's (index 0); per-keyframe "
            "strengths are not supported: the other input_images are kept exactly"
        )
    return finite_number(value, "input_images_strength")


def _gemma_config_of(paths: Sequence[str]) -> dict | None:
    """Gemma's config.json of a text encoder: LTX-2.5's file carries it as `gemma_config` metadata, a Hugging Face
    folder beside its weights; None where neither is there."""
    from .split_files import GEMMA_CONFIG_KEY, file_metadata

    for path in paths:
        if str(path).endswith(".safetensors") and GEMMA_CONFIG_KEY in (metadata := file_metadata(path)):
            return json.loads(metadata[GEMMA_CONFIG_KEY])
    config_json = os.path.join(os.path.dirname(str(paths[0])), "config.json") if paths else ""
    if not os.path.isfile(config_json):
        return None
    with open(config_json, encoding="utf-8") as handle:
        return json.load(handle)


def check_waveform(waveform: torch.Tensor) -> None:
    """`retake_audio` must be float sound in [-1, 1]: integer PCM, or floats at PCM scale, would be encoded and
    returned thousands of times too loud; the peak check leaves room for a little overshoot."""
    if not waveform.dtype.is_floating_point:
        raise ConfigError(
            f"retake_audio is a {waveform.dtype} tensor; give float samples in [-1, 1] (integer PCM divided by its "
            "full scale, e.g. int16 / 32768) or an audio file"
        )
    if not torch.isfinite(waveform).all():
        raise ConfigError("retake_audio holds NaN or infinite samples; give float samples in [-1, 1]")
    peak = float(waveform.abs().max()) if waveform.numel() else 0.0
    if peak > MAX_WAVEFORM_PEAK:
        raise ConfigError(
            f"retake_audio peaks at {peak:g}, far outside [-1, 1]: a PCM-scaled waveform? Divide it by its full "
            "scale (e.g. 32768 for 16-bit)"
        )


def pixel_tiles(tile_size, tile_stride, size_in_pixels, overlap_in_pixels, cell: int):
    """(tile_size, tile_stride) in latent cells; DiffSynth-Studio's pixel settings (a tile of `size_in_pixels`,
    neighbours overlapping by `overlap_in_pixels`, multiples of the VAE's `cell`) replace them when given."""
    if size_in_pixels is None and overlap_in_pixels is None:
        return tile_size, tile_stride
    size = 512 if size_in_pixels is None else size_in_pixels  # DiffSynth-Studio's defaults
    overlap = 128 if overlap_in_pixels is None else overlap_in_pixels
    for name, value in (("tile_size_in_pixels", size), ("tile_overlap_in_pixels", overlap)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value % cell:
            raise ConfigError(f"{name}={value!r} must be a non-negative multiple of {cell} pixels (a latent cell)")
    if not 0 <= overlap < size:
        raise ConfigError(f"tile_overlap_in_pixels={overlap} must be smaller than tile_size_in_pixels={size}")
    return size // cell, (size - overlap) // cell


def check_diffsynth_settings(stage2_spatial_upsample_factor, denoising_strength) -> None:
    """DiffSynth-Studio's LTX-2 arguments with one meaning here: the x2 latent upsampler, full denoising."""
    if stage2_spatial_upsample_factor != 2:
        raise ConfigError(
            f"stage2_spatial_upsample_factor={stage2_spatial_upsample_factor!r}: the released latent upsampler "
            "(ltx-2-spatial-upscaler-x2) doubles the size; only 2 is accepted"
        )
    if denoising_strength != 1.0:
        raise ConfigError(
            f"denoising_strength={denoising_strength!r}: LTX-2 always denoises from pure noise; for video-to-video "
            "use retake_video (with retake_video_regions)"
        )


class LTX2Pipeline(BasePipeline):
    """LTX-2 text-to-video with audio, API compatible with DiffSynth-Studio's `LTX2AudioVideoPipeline`."""

    family = "ltx2"
    model_slots = {
        "dit": "dit",
        "vae": "vae",
        "audio_vae": "audio_vae",
        "vocoder": "vocoder",
        "connectors": "connectors",
        "text_encoder": "text_encoder",
        "upsampler": "upsampler",
        "temporal_upsampler": "temporal_upsampler",
        "duration_head": "duration_head",
        "diffusion_decoder": "diffusion_decoder",
    }
    optional_slots = ("upsampler", "temporal_upsampler", "duration_head", "diffusion_decoder")  # some pipelines
    slot_specs = {
        "dit": ("ltx2_dit",),
        "vae": ("ltx2_video_vae",),
        "audio_vae": ("ltx2_audio_vae",),
        "vocoder": ("ltx2_vocoder",),
        "connectors": ("ltx2_connectors",),
        "text_encoder": ("gemma3_text_encoder", "gemma4_text_encoder"),
    }
    size_multiple = 32  # the video VAE's spatial compression

    def __init__(self, device: str | torch.device | None = None, torch_dtype: torch.dtype | str = torch.bfloat16):
        super().__init__(device, torch_dtype)
        self.fused_loras: list[str] = []  # LoRAs fused into the weights (`clear_lora_before_state_two` refuses)
        self.reference_downscale_factor: int | None = None  # the last loaded IC-LoRA's (its file metadata)
        self.prompt_enhancer = None  # a Gemma chat model (`load_prompt_enhancer`), not a model slot
        self.prompt_enhancer_processor = None

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        cfg_scale: float | None = None,
        audio_cfg_scale: float | None = None,
        guidance_rescale: float | None = None,
        audio_guidance_rescale: float | None = None,
        stg_scale: float | None = None,
        audio_stg_scale: float | None = None,
        modality_scale: float | None = None,
        audio_modality_scale: float | None = None,
        spatio_temporal_guidance_blocks: Sequence[int] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        min_seconds: float = 1.0,
        max_seconds: float = 20.0,
        frame_rate: float | None = None,
        seed: int | None = None,
        rand_device: str = "cpu",
        num_inference_steps: int | None = None,
        sigmas: Sequence[float] | torch.Tensor | None = None,
        use_distilled_pipeline: bool | None = None,
        use_two_stage_pipeline: bool | None = None,
        stage2_lora_strength: float | None = None,
        use_hq_pipeline: bool | None = None,
        stage1_lora_strength: float | None = None,
        latents: torch.Tensor | None = None,
        audio_latents: torch.Tensor | None = None,
        input_images: Sequence[ImageInput] | None = None,
        input_images_indexes: Sequence[int] | None = None,
        input_images_strength: float = 1.0,
        input_image: ImageInput | Sequence[ImageInput] | None = None,
        image_crf: int | None = None,
        retake_audio: torch.Tensor | str | os.PathLike | None = None,
        audio_sample_rate: int | None = None,
        retake_audio_regions: Sequence[tuple[float, float]] | None = None,
        retake_video: Sequence[ImageInput] | str | os.PathLike | None = None,
        retake_video_regions: Sequence[tuple[float, float]] | None = None,
        in_context_videos: Sequence | None = None,
        in_context_downsample_factor: int | None = None,
        clear_lora_before_state_two: bool | None = None,
        max_sequence_length: int | None = None,
        enhance_prompt: bool = False,
        enhance_prompt_seed: int | None = None,
        tiled: bool = False,
        tile_size: int | tuple[int, int] = 16,
        tile_stride: int | tuple[int, int] | None = None,
        tile_size_in_pixels: int | None = None,
        tile_overlap_in_pixels: int | None = None,
        tile_size_in_frames: int | None = None,
        tile_overlap_in_frames: int | None = None,
        stage2_spatial_upsample_factor: int = 2,
        denoising_strength: float = 1.0,
        use_dfr_pipeline: bool | None = None,
        detailing_lora: ModelConfig | str | os.PathLike | None = None,
        detailing_lora_strength: float = 1.0,
        temporal_upsample_rounds: int = 0,
        use_diffusion_decoder: bool | None = None,
        output_type: str = "pil",
        progress_bar: bool = True,
    ):
        """Generate `(frames, audio)`.

        `frames` are, for one prompt, a list of PIL images (a list of such lists for a list of prompts);
        "np" gives `[B, F, H, W, 3]` and "pt" `[B, 3, F, H, W]`, floats in [0, 1]. `audio` is an
        `LTX2Audio` (waveforms `[B, 2, N]` in [-1, 1] and their `sample_rate`); for one prompt with
        "pil" its waveform is `[2, N]`. Write both with `diffsynth.runtime.media.mux_video_audio`.

        `num_frames` must be 8k + 1 and `height`/`width` multiples of 32: other values are rounded with a
        warning. Left out with LTX-2.5's duration head loaded (and no preset default), it is predicted from the
        first prompt (`predict_num_frames`, within `min_seconds` .. `max_seconds`). `cfg_scale` guides the video
        stream and `audio_cfg_scale` the audio stream (1 = off; the
        authors' 3 and 7 by default, and the audio follows an explicit `cfg_scale` when not given itself);
        `guidance_rescale` in [0, 1] (default 0.7) pulls the guided prediction's spread back towards the
        conditional one's (`audio_guidance_rescale` for the audio, which follows it by default). `stg_scale` /
        `audio_stg_scale` (STG, default 1, 0 = off; perturbing the self-attentions of
        `spatio_temporal_guidance_blocks`, default [29]) and `modality_scale` / `audio_modality_scale` (modality
        isolation, default 3, 1 = off) are the authors' two other terms
        (`LTX2Guidance`); each audio scale follows an explicit video one. `use_distilled_pipeline` runs the
        distilled model's fixed 8-step table without CFG. `latents` / `audio_latents` are the initial noise
        (`[B, 128, 1 + (F-1)/8, H/32, W/32]` and `[B, 8, L, 16]`, at the first stage's size); `sigmas` an
        explicit schedule (terminal 0 appended). `tiled`, `tile_size`, `tile_stride` (latent cells) go to the
        video VAE; DiffSynth-Studio's `tile_size_in_pixels` / `tile_overlap_in_pixels` give them in pixels
        instead. The video is decoded whole in time: `tile_size_in_frames` / `tile_overlap_in_frames` are
        accepted for DiffSynth-Studio's scripts, with a warning when the clip is longer than a tile.
        `stage2_spatial_upsample_factor` is the latent upsampler's (2); `denoising_strength` must be 1 (for
        video-to-video use `retake_video`).

        LTX-2.5's diffusion decoder (`diffusion_decoder`, loaded from `vae/ltx-2.5-video-vae-bf16.safetensors`; see
        `decoding.py`) decodes the video instead of the video VAE when it is loaded (`use_diffusion_decoder=False`
        keeps the VAE). It denoises pixels, so it draws noise from the call's generator, and decodes in overlapping
        tiles (768 px, 80 frames; `tile_size_in_pixels` / `tile_overlap_in_pixels` / `tile_size_in_frames` /
        `tile_overlap_in_frames` change them). The video VAE still encodes images and videos.

        Two stages (`use_two_stage_pipeline`, on by default with `use_distilled_pipeline`, as the authors'
        `DistilledPipeline` and DiffSynth-Studio run it): the first stage samples at half of `height` x
        `width` (both multiples of 64), the latent upsampler (`upsampler`, `ltx-2-spatial-upscaler-x2`)
        doubles the video latents, and the second stage re-noises video and audio to sigma 0.909375 and
        refines them in the authors' 3 distilled steps without guidance, at full size. With the full model the
        second stage runs with the distilled LoRA (`stage2_lora_config` of `from_pretrained`, at
        `stage2_lora_strength`, default 0.8) attached, and removed afterwards.

        Image-to-video: `input_images=[image]` (DiffSynth-Studio's name, at `input_images_indexes=[0]`) or
        `input_image=image` (one image for every prompt, or one per prompt). A path or PIL image, resized to
        `width` x `height` and encoded by the video VAE: that latent replaces the first latent frame, which
        the DiT is told is clean (timestep 0) and which no step changes. It is first re-compressed with H.264
        at `image_crf` (default 33, the authors'; 18 for LTX-2.5; 0 = as given). Images at other `input_images_indexes`
        (video frames) are keyframes: encoded the same way, their clean tokens join the video's at their
        frame's time (`LTX2Keyframes`, `prepare_keyframes`). `input_images_strength` (DiffSynth-Studio's
        name; 1 = kept exactly) below 1 lets the first frame change: it starts that much noised, the DiT
        sees it at `sigma * (1 - strength)`, and each step's clean estimate is blended with it by that
        weight (ltx-core's and diffusers' conditioning strength).

        Audio-to-video (DiffSynth-Studio's arguments): `retake_audio` (a waveform `[C, N]` in [-1, 1] at
        `audio_sample_rate` Hz, default 48000, or an audio or video file) is encoded by the audio VAE and
        kept: the DiT sees it clean (timestep 0) and no step changes it, so the video is made to its sound
        (the authors' `A2VidPipelineTwoStage`). `retake_audio_regions` (`[(start, end), ...]` seconds) re-makes
        the sound there instead and keeps the rest. Kept whole, the given waveform (cut or zero-padded to the clip)
        is returned as the audio.

        Video retake (DiffSynth-Studio's arguments, the authors' `RetakePipeline`): `retake_video` (a video file
        or a list of at least `num_frames` frames) is encoded at each stage's size and kept, except in
        `retake_video_regions` (`[(start, end), ...]` seconds), which are re-made (`retake.py`); without regions
        the whole video is kept and only its sound is made (video-to-audio). A file's frame rate is `frame_rate`
        unless the call gives one. With `retake_audio` too, both streams keep what is given outside their regions.

        IC-LoRA (DiffSynth-Studio's arguments; load the IC-LoRA with `load_lora` first): `in_context_videos`
        are control videos (each a list of frames or a video file) whose clean tokens join the video's in the
        first stage (`in_context.py`), at `in_context_downsample_factor` below the first stage's size (default:
        the loaded IC-LoRA's `reference_downscale_factor`, else 1). `clear_lora_before_state_two` runs the
        second stage without the LoRAs you loaded (they must be loaded with `fuse=False`), as the authors'
        `ICLoraPipeline` does.

        HQ (`use_hq_pipeline`; the authors' `TI2VidTwoStagesHQPipeline`, see `res2s.py`): the two-stage pipeline
        with the second-order res_2s sampler in both stages (two DiT calls a step, SDE noise from the call's
        generator), the first stage's schedule shifted by its real token count, the distilled LoRA attached in both
        stages (`stage1_lora_strength`, default 0.25; `stage2_lora_strength`, default 0.5) and the first stage's
        sound kept. Where neither the call nor the preset sets them, the authors' HQ defaults apply: 15 steps, STG
        off, guidance rescale 0.45 (video) and 1 (audio). It takes neither `use_distilled_pipeline` nor DFR.

        DFR (`use_dfr_pipeline`, LTX-2.5; the authors' `DFRPipeline`, see `dfr.py`): a distilled half-size pass that
        also generates keyframe slots, the x2 upsampler, and a distilled full-size pass, without guidance. With the
        full model the distilled LoRA (`stage2_lora_config`) is attached in both passes at `stage2_lora_strength`
        (default 1, the authors'); with `use_distilled_pipeline` the DiT is the distilled one. `detailing_lora` (the
        authors' x2 detailing IC-LoRA, a file or `ModelConfig`) is attached in the second pass at
        `detailing_lora_strength`, which then reads the first pass's video as its reference (strength 0 is no
        detailing). `sigmas` replaces the first pass's schedule; guidance arguments, `negative_prompt` and
        `num_inference_steps` are refused. Images condition every pass (`input_images`, `input_image`).
        `temporal_upsample_rounds` (1 or 2; the temporal upsampler `ltx-2.5-latent-temporal-upscaler-x2` must be loaded)
        then doubles the frame rate that many times: `(num_frames - 1) * 2 ** rounds + 1` frames, to be played at
        `frame_rate * 2 ** rounds`.

        `enhance_prompt` rewrites each prompt with the enhancer loaded by `load_prompt_enhancer` before it is encoded
        (`prompt_enhancer.py`; the image-to-video recipe when a first frame is given), seeded by
        `enhance_prompt_seed` (default: `seed`); the rewritten prompts are logged at INFO.
        """
        negative = self.setting("negative_prompt", negative_prompt, "")
        prompts, negatives = self.check_prompt_pair(prompt, negative)
        if enhance_prompt:
            images = self.first_frame_images(input_images, input_images_indexes, input_image, len(prompts))
            enhance_seed = seed if enhance_prompt_seed is None else enhance_prompt_seed
            prompts = self.enhance_prompts(prompts, images, enhance_seed)
        if output_type not in ("pil", "np", "pt"):
            raise ConfigError(f"output_type={output_type!r} is not accepted; use 'pil', 'np' or 'pt'")
        distilled = bool(self.setting("use_distilled_pipeline", use_distilled_pipeline, False))
        hq = bool(self.setting("use_hq_pipeline", use_hq_pipeline, False))
        default_steps = 8 if distilled else res2s.HQ_STEPS if hq else self.default_steps
        steps = self.setting("num_inference_steps", num_inference_steps, default_steps)
        scale = finite_number(self.setting("cfg_scale", cfg_scale, 1.0 if distilled else DEFAULT_CFG), "cfg_scale")
        dfr_on = bool(self.setting("use_dfr_pipeline", use_dfr_pipeline, False))
        guidance_given = {  # the arguments DFR does not read (no guidance, fixed sigma tables): it refuses them
            "negative_prompt": negative_prompt, "cfg_scale": cfg_scale, "audio_cfg_scale": audio_cfg_scale,
            "guidance_rescale": guidance_rescale, "audio_guidance_rescale": audio_guidance_rescale,
            "stg_scale": stg_scale, "audio_stg_scale": audio_stg_scale, "modality_scale": modality_scale,
            "audio_modality_scale": audio_modality_scale,
            "spatio_temporal_guidance_blocks": spatio_temporal_guidance_blocks,
            "num_inference_steps": num_inference_steps,
        }  # fmt: skip
        if audio_cfg_scale is None:  # an explicit cfg_scale guides both streams unless audio_cfg_scale is given
            fallback = 1.0 if distilled else DEFAULT_AUDIO_CFG
            audio_cfg_scale = scale if cfg_scale is not None else self.defaults.get("audio_cfg_scale", fallback)
        audio_scale = finite_number(audio_cfg_scale, "audio_cfg_scale")
        rescale = float(self.setting("guidance_rescale", guidance_rescale, res2s.HQ_RESCALE if hq else DEFAULT_RESCALE))
        if audio_guidance_rescale is None:  # follows an explicit guidance_rescale, as the audio scales do
            fallback = res2s.HQ_AUDIO_RESCALE if hq else rescale
            audio_guidance_rescale = self.defaults.get("audio_guidance_rescale", fallback)
            audio_guidance_rescale = rescale if guidance_rescale is not None else audio_guidance_rescale
        pair = (rescale, float(audio_guidance_rescale))
        for name, value in zip(("guidance_rescale", "audio_guidance_rescale"), pair, strict=True):
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name}={value!r} is not accepted; use a number in [0, 1]")
        rescale = rescale if pair[1] == rescale else pair  # (video, audio) when they differ
        stg = self._stream_scales("stg_scale", stg_scale, audio_stg_scale, 0.0 if distilled or hq else DEFAULT_STG)
        modality = self._stream_scales(
            "modality_scale", modality_scale, audio_modality_scale, 1.0 if distilled else DEFAULT_MODALITY
        )
        guidance = LTX2Guidance(*stg, *modality, self.check_stg_blocks(spatio_temporal_guidance_blocks))
        if frame_rate is None and isinstance(retake_video, (str, os.PathLike)):  # the file's rate, as the authors'
            frame_rate = video_frame_rate(retake_video)
        fps = self.check_frame_rate(self.setting("frame_rate", frame_rate, DEFAULT_FRAME_RATE))
        max_len = self.setting("max_sequence_length", max_sequence_length, DEFAULT_MAX_SEQUENCE_LENGTH)
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
            raise ConfigError(f"max_sequence_length={max_len!r} is not accepted; use an integer >= 1")
        height, width = self.setting("height", height, 512), self.setting("width", width, 768)
        two_stage = self.setting("use_two_stage_pipeline", use_two_stage_pipeline, None)
        two_stage = (distilled or hq) if two_stage is None else bool(two_stage)
        if two_stage or dfr_on:  # half-size first passes: refused now rather than rounded to 32 and refused later
            self.check_half_size(height, width)
        height, width = self.check_size(height, width)
        diffusion_decoding = uses_diffusion_decoder(self, use_diffusion_decoder)  # refused early when not loaded
        if not diffusion_decoding:  # (the diffusion decoder reads the pixel tiles itself: `decoding.py`)
            tile_size, tile_stride = pixel_tiles(
                tile_size, tile_stride, tile_size_in_pixels, tile_overlap_in_pixels, self.vae.spatial_compression
            )
        check_diffsynth_settings(stage2_spatial_upsample_factor, denoising_strength)
        if hq:  # the first stage's LoRA strength (the second's is stage2_lora_strength)
            refused = {"use_distilled_pipeline": distilled or None, "use_dfr_pipeline": dfr_on or None}
            res2s.check_hq({**refused, "use_two_stage_pipeline=False": None if two_stage else 0})
            hq_strength = self.setting("stage1_lora_strength", stage1_lora_strength, res2s.HQ_STAGE_1_LORA_STRENGTH)
        elif stage1_lora_strength is not None:
            raise ConfigError("stage1_lora_strength belongs to the HQ pipeline: pass use_hq_pipeline=True")
        if two_stage and not dfr_on:
            self.check_two_stage(height, width, distilled)
            fallback = res2s.HQ_STAGE_2_LORA_STRENGTH if hq else STAGE_2_LORA_STRENGTH
            lora_strength = float(self.setting("stage2_lora_strength", stage2_lora_strength, fallback))
        elif not dfr_on and stage2_lora_strength is not None:
            raise ConfigError(
                "stage2_lora_strength is the second stage's and this call runs one stage: pass "
                "use_two_stage_pipeline=True (use_hq_pipeline and use_dfr_pipeline run two stages too)"
            )
        if distilled and stage2_lora_strength is not None:
            raise ConfigError(
                "stage2_lora_strength scales the distilled LoRA that the full model's second stage runs with; the "
                "distilled model runs without it: drop the argument"
            )
        stage_height, stage_width = (height // 2, width // 2) if two_stage else (height, width)
        if num_frames is None and self.duration_head is not None and "num_frames" not in self.defaults:
            num_frames = self.predict_num_frames(prompts[0], max_len, fps, min_seconds, max_seconds)
        frames = self.check_num_frames(self.setting("num_frames", num_frames, 121))
        if tiled and not diffusion_decoding and tile_size_in_frames is not None and frames > tile_size_in_frames:
            logger.warning(
                "tile_size_in_frames=%s: the video VAE decodes the %d frames whole in time (only spatial tiles)",
                tile_size_in_frames,
                frames,
            )
        use_cfg = scale != 1.0 or audio_scale != 1.0
        first_frames, keyframe_images = self.check_input_images(
            input_images, input_images_indexes, input_image, len(prompts), frames
        )
        strength = first_frame_strength(input_images_strength)
        if not 0.0 <= strength <= 1.0:
            raise ConfigError(f"input_images_strength={input_images_strength} must be in [0, 1] (1 keeps the image)")
        if strength != 1.0 and first_frames is None:
            raise ConfigError("input_images_strength applies to the first frame: give an image at index 0")
        factor = self.check_in_context(in_context_videos, in_context_downsample_factor)
        retake = None
        if retake_video is not None:
            if first_frames is not None or keyframe_images:
                raise ConfigError("retake_video keeps the given frames: it takes no input_images / input_image")
            retake = (retake_frames(retake_video, frames), retake_video_regions)
        elif retake_video_regions:
            raise ConfigError("retake_video_regions are regions of retake_video: give the video too")
        if retake_audio_regions and retake_audio is None:
            raise ConfigError("retake_audio_regions are regions of retake_audio: give the sound too")
        clear_lora_before_state_two = bool(self.setting("clear_lora_before_state_two", clear_lora_before_state_two, 0))
        if clear_lora_before_state_two:
            self.check_clearable_loras(two_stage)
        single = isinstance(prompt, str) and output_type == "pil"
        decoding = Decoding(
            single, output_type, tiled, tile_size, tile_stride, diffusion_decoding,
            diffusion_tiles(tile_size_in_pixels, tile_overlap_in_pixels, tile_size_in_frames, tile_overlap_in_frames),
        )  # fmt: skip
        if dfr_on:
            refused = {
                "in_context_videos": in_context_videos, "retake_audio": retake_audio, "retake_video": retake_video,
                "latents": latents, "audio_latents": audio_latents, **guidance_given,
                "clear_lora_before_state_two": clear_lora_before_state_two or None,
                "use_two_stage_pipeline": None if use_two_stage_pipeline is not False else False,
            }  # fmt: skip
            self.check_dfr(height, width, distilled, refused)
            crf = self.setting("image_crf", image_crf, self.default_image_crf) if first_frames or keyframe_images else 0
            images = DFRImages(first_frames, keyframe_images, strength, crf)
            rounds = self.check_temporal_rounds(temporal_upsample_rounds)
            return self.generate_dfr(
                prompts, max_len, images, (height, width, frames, fps), seed, rand_device, sigmas, distilled,
                stage2_lora_strength, (detailing_lora, detailing_lora_strength), rounds, progress_bar, decoding,
            )  # fmt: skip
        dfr_only = {  # the DFR pipeline's own arguments, given (not at their defaults) on another pipeline
            "temporal_upsample_rounds": temporal_upsample_rounds not in (0, None),
            "detailing_lora": detailing_lora is not None,
            "detailing_lora_strength": detailing_lora_strength != 1.0,
        }
        given = [name for name, on in dfr_only.items() if on]
        if given:
            raise ConfigError(f"{given[0]} belongs to the DFR pipeline: pass use_dfr_pipeline=True")

        # 1. prompts
        self.load_models_to_device(["text_encoder", "connectors"])
        text = self.encode_prompt(prompts, max_len)
        negative_text = self.encode_prompt(negatives, max_len) if use_cfg else None

        # 2. schedule and latents
        scheduler = FlowMatchScheduler("ltx2_distilled" if distilled else "ltx2")
        if distilled:
            scheduler.set_timesteps(steps, sigmas=sigmas)
        else:
            tokens = res2s.hq_image_seq_len(self, frames, stage_height, stage_width) if hq else SCHEDULE_TOKENS
            scheduler.set_timesteps(steps, sigmas=sigmas, image_seq_len=tokens)
        generator, rand_device = seeded_generator(seed, rand_device, self.samples_in_parallel())
        images = first_frames is not None or keyframe_images
        crf = self.setting("image_crf", image_crf, self.default_image_crf) if images else 0
        keyframes = self.prepare_keyframes(keyframe_images, stage_height, stage_width, crf, fps)
        if in_context_videos:
            references = encode_references(self, in_context_videos, stage_height, stage_width, frames, fps, factor)
            keyframes = LTX2Keyframes.join(keyframes, *references)
        video, audio = self.prepare_latents(
            len(prompts), frames, stage_height, stage_width, fps, generator, rand_device, latents, audio_latents,
            keyframe_tokens=0 if keyframes is None else len(keyframes), token_layout=retake is not None,
        )  # fmt: skip
        mask = clean = None
        if first_frames is not None:
            video, mask, clean = self.first_frame_condition(
                video, first_frames, stage_height, stage_width, crf, strength, video, float(scheduler.sigmas[0])
            )
        if retake is not None:
            video, mask = keep_video(self, video, retake[0], stage_height, stage_width, retake[1], fps)
        given = None
        if retake_audio is not None:
            rate = self.setting("audio_sample_rate", audio_sample_rate, DEFAULT_AUDIO_SAMPLE_RATE)
            given = self.prepare_audio_condition(retake_audio, rate, retake_audio_regions, frames, fps, audio)
            audio = given.latents + given.mask * (audio - given.latents)  # the noise only where it is re-made

        # 3. denoise
        both = text.cat(negative_text) if use_cfg else text
        guided = (use_cfg, scale, audio_scale, rescale, guidance)
        audio_mask = None if given is None else given.mask
        sampler = self.denoise  # HQ: res_2s (`res2s.py`), the distilled LoRA on in both stages
        if hq:
            sampler = functools.partial(res2s.denoise, self, generator=generator, rand_device=rand_device)
        with self.stage_loras([(self._stage2_lora(), float(hq_strength), STAGE_2_LORA_NAME)] if hq else []):
            video, audio = sampler(
                video, audio, scheduler, both, fps, mask, guided, progress_bar, keyframes, audio_mask, clean
            )
        if two_stage:
            video, refined_audio = self.refine(
                video, audio, text, fps, generator, rand_device,
                (first_frames, strength, keyframe_images, audio_mask, retake),
                size=(height, width), crf=crf, lora_strength=None if distilled else lora_strength,
                progress_bar=progress_bar, without_loras=clear_lora_before_state_two, sampler=sampler,
            )  # fmt: skip
            audio = audio if hq else refined_audio  # HQ keeps the first stage's sound, as the authors do

        # 4. decode
        kept = None if given is None or given.waveform is None else (given.waveform, given.sample_rate)
        return self.finish(video, audio, decoding, kept, seconds=frames / fps, generator=generator)

    def finish(self, video, audio, decoding: Decoding, kept=None, seconds: float | None = None, generator=None):
        """Decode the final latents into `(frames, LTX2Audio)` (`decoding.py`: the video VAE, or the diffusion
        decoder drawing its noise from `generator`). `kept` (waveform, rate) is a given sound returned as it is
        instead of re-synthesised; `seconds` (the video's duration) cuts or zero-pads the sound to
        `round(seconds * sample_rate)` samples: the causal audio VAE decodes `4 L - 3` mel frames, a few tens of
        milliseconds short of the clip (the authors return that; padded, the sound lasts as long as the video)."""
        single = decoding.single
        pixels = decode_video(self, video, decoding, generator)
        frames_out = tensor_to_output(pixels.float(), decoding.output_type)
        waveform = self.decode_audio(audio)
        if kept is not None:  # kept whole: the sound as given, not re-synthesised
            waveform, sample_rate = kept[0].expand(waveform.shape[0], -1, -1), kept[1]
        else:
            sample_rate = self.sample_rate
        if seconds is not None:
            samples = round(seconds * sample_rate)
            waveform = torch.nn.functional.pad(waveform[..., :samples], (0, max(0, samples - waveform.shape[-1])))
        self.load_models_to_device([])
        sound = LTX2Audio(waveform[0] if single else waveform, sample_rate)
        return (frames_out[0] if single else frames_out), sound

    def generate_dfr(
        self, prompts, max_len, images, size, seed, rand_device, sigmas, distilled, lora_strength, detailing, rounds,
        progress_bar, decoding,
    ):  # fmt: skip
        """The DFR pipeline (`dfr.generate`) for `__call__`: prompts, the stage LoRAs, then decoding; the sound is
        cut to the clip's duration (it covers the padded canvas)."""
        from diffsynth.runtime.lora import read_lora

        height, width, frames, fps = size
        self.load_models_to_device(["text_encoder", "connectors"])
        text = self.encode_prompt(prompts, max_len)
        generator, rand_device = seeded_generator(seed, rand_device, self.samples_in_parallel())
        loras = []
        if not distilled:
            strength = float(self.setting("stage2_lora_strength", lora_strength, DFR_DISTILLED_LORA_STRENGTH))
            loras.append((self._stage2_lora(), strength, dfr.DISTILLED_LORA_NAME))
        detail = None
        lora, scale = detailing
        if lora is not None:
            path = lora_file(lora, "detailing_lora")
            factor = lora_reference_downscale_factor(path) or dfr.DETAILING_DOWNSCALE
            detail = (read_lora(path), float(scale), check_factor(factor))
        first_sigmas = dfr.DISTILLED_SIGMAS if sigmas is None else dfr.check_sigmas(sigmas, "sigmas")
        video, audio = dfr.generate(
            self, text, height=height, width=width, num_frames=frames, frame_rate=fps, generator=generator,
            rand_device=rand_device, images=images, stage_1_sigmas=first_sigmas, loras=loras, detailing=detail,
            temporal_rounds=rounds, seed=0 if seed is None else int(seed), progress_bar=progress_bar,
        )  # fmt: skip
        seconds = ((frames - 1) * 2**rounds + 1) / (fps * 2**rounds)
        return self.finish(video, audio, decoding, seconds=seconds, generator=generator)

    @torch.no_grad()
    def dub_video(self, prompt: str, reference_video, **kwargs):
        """Dub-It (the authors' `DubItPipeline`): `reference_video` (a video file with sound) re-voiced to say
        `prompt`, lips in sync, as `(frames, LTX2Audio)`; load the distilled model, the latent upsampler and the
        Dub-It IC-LoRA first. The arguments are `dubit.dub_video`'s."""
        from .dubit import dub_video

        return dub_video(self, prompt, reference_video, **kwargs)

    @torch.no_grad()
    def generate_audio(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None, **kwargs):
        """Sound alone from text (the authors' text-to-audio pipeline): an `LTX2Audio`. The arguments and their
        defaults are `text_to_audio.generate_audio`'s (`num_frames` / `frame_rate` give the duration, the audio
        guidance scales, `num_inference_steps`, `sigmas`, `seed`, ...)."""
        from .text_to_audio import generate_audio

        return generate_audio(self, prompt, negative_prompt, **kwargs)

    @torch.no_grad()
    def generate_hdr(self, reference_video, prompt_embeddings=None, **kwargs):
        """Linear HDR frames from an SDR video with LTX-2.3's HDR IC-LoRA loaded (`hdr.generate_hdr`, whose arguments
        these are; `hdr.LTX2HDRPipeline` is this pipeline without a text encoder, calling it)."""
        from .hdr import generate_hdr

        return generate_hdr(self, reference_video, prompt_embeddings, **kwargs)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        model_id_or_configs: str | os.PathLike | Sequence[ModelConfig] | None = None,
        *,
        torch_dtype: torch.dtype | str = torch.bfloat16,
        device: str | torch.device | None = None,
        model_configs: Sequence[ModelConfig] = (),
        tokenizer_config: ModelConfig | None = None,
        vram_limit: float | None = None,
        use_usp: bool = False,
        stage2_lora_config: ModelConfig | str | os.PathLike | None = None,
        stage2_lora_strength: float | None = None,
        quantize=None,
    ):
        """As `BasePipeline.from_pretrained`, plus DiffSynth-Studio's two-stage settings: `stage2_lora_config`
        is the distilled LoRA the full model's second stage runs with (a `ModelConfig` or a file; the
        two-stage preset names `ltx-2-19b-distilled-lora-384.safetensors`, fetched at its first use), and
        `stage2_lora_strength` its scale (default 0.8). Load the latent upsampler like any model, e.g.
        `ModelConfig(model_id="Lightricks/LTX-2", origin_file_pattern="ltx-2-spatial-upscaler-x2-1.0.safetensors")`."""
        pipe = super().from_pretrained(
            model_id_or_configs,
            torch_dtype=torch_dtype,
            device=device,
            model_configs=model_configs,
            tokenizer_config=tokenizer_config,
            vram_limit=vram_limit,
            use_usp=use_usp,
            quantize=quantize,
        )
        preset_lora = pipe.defaults.pop("stage2_lora", None)
        if stage2_lora_config is None and preset_lora is not None:
            stage2_lora_config = ModelConfig(model_id=preset_lora[0], origin_file_pattern=preset_lora[1])
        pipe.stage2_lora = stage2_lora_config
        if stage2_lora_strength is not None:
            pipe.defaults["stage2_lora_strength"] = float(stage2_lora_strength)
        pipe.check_text_encoder_fits()
        return pipe

    def check_text_encoder_fits(self) -> None:
        """Refuse, at load, a text encoder the DiT and connectors cannot take (e.g. LTX-2.3's file beside LTX-2.5's
        text encoder): its hidden states must be the connectors' input width, and its Gemma version the one the
        transformer file's metadata names (ltx-core's `_check_gemma_version`)."""
        from diffsynth.runtime.pipeline import describe_config

        if self.text_encoder is None or self.connectors is None:
            return
        encoder_config = self.model_configs.get("text_encoder")
        encoder_name = describe_config(encoder_config) if encoder_config is not None else "the text encoder"
        gemma = getattr(self.text_encoder.config, "text_config", self.text_encoder.config)
        given = (gemma.hidden_size, gemma.num_hidden_layers + 1)
        wanted = (self.connectors.config.caption_channels, self.connectors.config.text_proj_in_factor)
        if given != wanted:
            connectors_config = self.model_configs.get("connectors")
            connectors_name = describe_config(connectors_config) if connectors_config is not None else "connectors"
            raise ConfigError(
                f"the text encoder ({encoder_name}) gives {given[0]} channels x {given[1]} hidden states (layers + "
                f"1), but the text connectors ({connectors_name}) take {wanted[0]} x {wanted[1]}: load the text "
                "encoder released with the DiT"
            )
        self._check_gemma_version(encoder_name)

    def _check_gemma_version(self, encoder_name: str) -> None:
        """`split_files.check_gemma_version` on the DiT's file and the text encoder's config, where the DiT's file
        carries ltx-core's metadata (a diffusers folder has none to check against)."""
        from diffsynth.runtime.pipeline import weight_paths

        from .split_files import check_gemma_version, file_metadata, has_ltx_core_metadata

        dit_config, encoder_config = self.model_configs.get("dit"), self.model_configs.get("text_encoder")
        if dit_config is None or encoder_config is None:
            return
        dit_files = [p for p in weight_paths(dit_config) if str(p).endswith(".safetensors")]
        dit_files = [(p, meta) for p in dit_files if has_ltx_core_metadata(meta := file_metadata(p))]
        gemma = _gemma_config_of(weight_paths(encoder_config)) if dit_files else None
        if gemma is not None:
            path, metadata = dit_files[0]
            check_gemma_version(metadata, gemma, str(path), encoder_name)

    def read_lora(self, path, slot: str = "dit"):
        """The part of an LTX-2 LoRA for `slot` in our names (see `lora.split_lora`): ltx-core / ComfyUI
        files as they are, diffusers names renamed, connector targets given to the connectors."""
        from diffsynth.runtime.lora import LoRAError, read_lora

        from .lora import split_lora

        weights = read_lora(path)
        parts = split_lora(weights)
        if slot not in parts:
            raise LoRAError(f"{weights.source} has no LoRA for the {slot!r} model (it adapts {sorted(parts)})")
        return parts[slot]

    def apply_lora(self, source, scale: float, fuse: bool, slot: str, name: str | None):
        """For the DiT (the default) a LoRA's text-connector part, if any, goes to the connectors. An IC-LoRA's
        `reference_downscale_factor` (file metadata) becomes the default of `in_context_downsample_factor`;
        fused LoRAs are listed in `fused_loras` (they cannot be turned off for the second stage)."""
        from diffsynth.runtime.lora import read_lora

        from .lora import split_lora

        factor = lora_reference_downscale_factor(source)  # an IC-LoRA's: the default for in_context_videos
        weights = read_lora(source)
        parts = split_lora(weights)
        if slot == "dit" and "connectors" in parts and "dit" not in parts:
            slot = "connectors"
        result = super().apply_lora(weights, scale, fuse, slot, name)
        if slot == "dit" and "connectors" in parts:
            super().apply_lora(weights, scale, fuse, "connectors", name)
        if factor is not None:
            self.reference_downscale_factor = factor
        if fuse:
            self.fused_loras.append(name or weights.source or "a LoRA")
        return result

    # ------------------------------------------------------------------ prompt enhancement
    def load_prompt_enhancer(self, model, processor=None) -> None:
        """The Gemma chat model `__call__(..., enhance_prompt=True)` rewrites prompts with (`prompt_enhancer.py`):
        a loaded transformers generative model with its `processor` (or tokenizer, for text-to-video only), or a
        local folder or `ModelConfig` of one, loaded in the pipeline's dtype with the processor beside it.
        LTX-2.0 / 2.3 enhance with Gemma-3-12B-it (the authors use their text encoder's Gemma 3 whole, with its LM
        head: `ModelConfig(model_id="google/gemma-3-12b-it-qat-q4_0-unquantized")`), LTX-2.5 with
        `google/gemma-4-E2B-it`. It is a plain attribute, not a model slot: moved to the device to generate, and
        back to the CPU afterwards when the pipeline offloads its models."""
        if isinstance(model, (str, os.PathLike, ModelConfig)):
            from .prompt_enhancer import read_enhancer

            model, found = read_enhancer(model, self.torch_dtype)
            processor = found if processor is None else processor
        elif processor is None:
            raise ConfigError("load_prompt_enhancer: give the loaded model's processor (or tokenizer) as processor=")
        if not callable(getattr(model, "generate", None)):
            raise ConfigError(
                f"load_prompt_enhancer: a {type(model).__name__} cannot write prompts (no `generate`); give a "
                "transformers generative model such as Gemma3ForConditionalGeneration, or its folder"
            )
        self.prompt_enhancer, self.prompt_enhancer_processor = model, processor

    @staticmethod
    def first_frame_images(input_images, input_images_indexes, input_image, batch: int) -> list:
        """The first frame each prompt's enhancer is shown (None: text-to-video): `input_image` (one, or one per
        prompt), or the `input_images` image at index 0. Bad inputs are left to `check_input_images`."""
        if input_image is not None:
            items = list(input_image) if isinstance(input_image, (list, tuple)) else [input_image]
        elif input_images is not None:
            images = [input_images] if isinstance(input_images, (str, os.PathLike, Image.Image)) else input_images
            indexes = (0,) if input_images_indexes is None else input_images_indexes
            items = [image for image, i in zip(images, indexes, strict=False) if i == 0][:1]
        else:
            items = []
        images = [load_image(item) for item in items]
        return images if len(images) == batch else [images[0] if images else None] * batch

    def enhance_prompts(self, prompts: list[str], images: list, seed: int | None = None) -> list[str]:
        """Each prompt rewritten by the loaded enhancer, shown its first frame (or None); `seed` defaults to
        `prompt_enhancer.DEFAULT_SEED`."""
        from .prompt_enhancer import DEFAULT_SEED, enhance_prompt

        model = self.prompt_enhancer
        if model is None:
            raise ConfigError(
                "enhance_prompt=True needs a prompt enhancer: call pipe.load_prompt_enhancer(...) first, with "
                "Gemma-3-12B-it for LTX-2.0 / 2.3 (the authors enhance with their text encoder's own Gemma 3, LM head "
                f"included: ModelConfig(model_id='{GEMMA_REPO}')) or google/gemma-4-E2B-it for LTX-2.5"
            )
        movable = getattr(model, "hf_device_map", None) is None  # accelerate-dispatched models stay where they are
        if movable:
            if self.model_offload:
                self.load_models_to_device([])  # park the pipeline's models before the enhancer comes in
            model.to(self.device)
        seed = DEFAULT_SEED if seed is None else int(seed)
        try:
            enhanced = [
                enhance_prompt(model, self.prompt_enhancer_processor, prompt, image=image, seed=seed)
                for prompt, image in zip(prompts, images, strict=True)
            ]
        finally:
            if movable and self.model_offload:
                model.to("cpu")
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
        for prompt, rewritten in zip(prompts, enhanced, strict=True):
            logger.info("enhanced prompt %r: %s", prompt, rewritten)
        return enhanced

    # ------------------------------------------------------------------ checks
    def check_two_stage(self, height: int, width: int, distilled: bool) -> None:
        """The two-stage pipeline needs the upsampler, sizes that halve to multiples of 32, and with the full
        model the distilled LoRA."""
        if self.upsampler is None:
            raise ConfigError(
                "the two-stage pipeline (use_two_stage_pipeline, on by default with use_distilled_pipeline) needs "
                "the latent upsampler: add ModelConfig(model_id='Lightricks/LTX-2', origin_file_pattern="
                "'ltx-2-spatial-upscaler-x2-1.0.safetensors') to model_configs, or pass use_two_stage_pipeline=False"
            )
        self.check_half_size(height, width)
        factor = self.upsampler.config.spatial_factor
        if factor != 2.0 or self.upsampler.config.temporal_upsample:
            raise ConfigError(
                f"the loaded latent upsampler scales by {factor} (temporal: {self.upsampler.config.temporal_upsample});"
                " the two-stage pipeline needs the spatial x2 model (ltx-2-spatial-upscaler-x2-1.0)"
            )
        if not distilled and getattr(self, "stage2_lora", None) is None:
            raise ConfigError(
                "the full model's second stage runs with the distilled LoRA: pass stage2_lora_config=ModelConfig("
                "model_id='Lightricks/LTX-2', origin_file_pattern='ltx-2-19b-distilled-lora-384.safetensors') to "
                "from_pretrained (the 'Lightricks/LTX-2:two-stage' preset does), or use the distilled model"
            )

    def check_half_size(self, height, width) -> None:
        """A run whose first pass is at half size (two stages, DFR) needs sizes that halve to the VAE's multiple;
        checked before `check_size` rounds (to multiples of 32 only), so other sizes are refused, not rounded."""
        multiple = 2 * self.size_multiple
        if any(isinstance(v, bool) or not isinstance(v, int) for v in (height, width)):
            return  # `check_size` refuses these
        if height % multiple or width % multiple:
            raise ConfigError(
                f"height={height}, width={width}: the two-stage pipeline samples at half size first, so both must "
                f"be multiples of {multiple} (e.g. 1024 x 1536)"
            )

    def check_dfr(self, height, width, distilled, refused: dict) -> None:
        """DFR needs an LTX-2.5 DiT (the keyframe embedding), the x2 upsampler, sizes that halve to multiples of 32
        and, with the full model, the distilled LoRA; `refused` (name -> value) are arguments of the other pipelines
        (or guidance, which DFR does not use): any given is refused by name."""
        if not self.is_ltx25:
            raise ConfigError(
                "use_dfr_pipeline needs an LTX-2.5 DiT: its keyframe slots are marked with the DiT's "
                "keyframes_abs_pos_embedding, which this DiT does not have"
            )
        given = [name for name, value in refused.items() if value is not None]
        if given:
            raise ConfigError(
                f"use_dfr_pipeline does not take {', '.join(given)}: DFR runs without guidance (so without a "
                "negative prompt) on the authors' fixed sigma tables (sigmas replaces the first pass's)"
            )
        self.check_two_stage(height, width, distilled)

    def check_temporal_rounds(self, rounds) -> int:
        """DFR's temporal refine rounds: 0, 1 or 2 (the authors'), the last two with the temporal upsampler."""
        if isinstance(rounds, bool) or rounds not in (0, 1, 2):
            raise ConfigError(f"temporal_upsample_rounds={rounds!r} is not accepted; use 0, 1 or 2")
        if rounds and (self.temporal_upsampler is None or not self.temporal_upsampler.config.temporal_upsample):
            raise ConfigError(
                "temporal_upsample_rounds needs the temporal latent upsampler: add ModelConfig(model_id="
                "'Lightricks/LTX-2.5', origin_file_pattern='latent_upscale_models/"
                "ltx-2.5-latent-temporal-upscaler-x2-bf16-1.0.safetensors') to model_configs"
            )
        return rounds

    def cli_options(self, options: dict) -> dict:
        """The `diffsynth generate` inputs under this pipeline's names: `--control-video` is an IC-LoRA's control
        video (`in_context_videos`)."""
        options = dict(options)
        if "control_video" in options:
            options["in_context_videos"] = [options.pop("control_video")]
        return options

    def check_in_context(self, videos, factor) -> int:
        """The reference videos' downscale factor: the one given, else the loaded IC-LoRA's, else 1."""
        if videos is not None and (isinstance(videos, (str, os.PathLike)) or not isinstance(videos, Sequence)):
            raise ConfigError("in_context_videos is a list of videos (each a list of frames or a video file)")
        if factor is None:
            factor = self.reference_downscale_factor or 1
        return check_factor(factor)

    def check_clearable_loras(self, two_stage: bool) -> None:
        """`clear_lora_before_state_two` turns LoRAs off for the second stage, which needs two stages and no
        LoRA fused into the weights (those cannot be taken out again)."""
        if not two_stage:
            raise ConfigError("clear_lora_before_state_two applies to the two-stage pipeline (use_two_stage_pipeline)")
        if self.fused_loras:
            raise ConfigError(
                f"clear_lora_before_state_two cannot take out LoRAs fused into the weights ({self.fused_loras}): "
                "load them with load_lora(..., fuse=False) (DiffSynth-Studio: hotload=True)"
            )

    def check_num_frames(self, num_frames) -> int:
        """Round to the nearest 8k + 1 (the video VAE's temporal compression) with a warning."""
        tc = self.vae.temporal_compression if self.vae is not None else 8
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
            raise ConfigError(f"num_frames={num_frames!r} is not accepted: use {tc}k + 1 frames, e.g. 121")
        rounded = max(1, (num_frames - 1 + tc // 2) // tc * tc + 1)
        if rounded != num_frames:
            logger.warning("num_frames=%d rounded to %d (%dk + 1 frames)", num_frames, rounded, tc)
        return rounded

    @staticmethod
    def check_input_images(
        input_images, input_images_indexes, input_image, batch: int, num_frames: int
    ) -> tuple[list[Image.Image] | None, list[tuple[Image.Image, int]]]:
        """(the first frame of each prompt's video, or None; the keyframes as (image, video frame)), from
        DiffSynth-Studio's `input_images` at `input_images_indexes` (video frames; index 0 is the first frame,
        any other a keyframe; default [0]) or our `input_image` (the first frame: one image, or one per prompt)."""
        if input_images is not None and input_image is not None:
            raise ConfigError("pass the first frame as input_images=[image] or as input_image=image, not both")
        if input_images_indexes is not None and input_images is None:
            raise ConfigError(
                f"input_images_indexes={list(input_images_indexes)!r} are the video frames of input_images: give "
                "input_images too (input_image is always the first frame; a keyframe needs input_images)"
            )
        keyframes: list[tuple[Image.Image, int]] = []
        if input_images is not None:
            images = [input_images] if isinstance(input_images, (str, os.PathLike, Image.Image)) else input_images
            images, indexes = list(images), [0] if input_images_indexes is None else list(input_images_indexes)
            if len(images) != len(indexes):
                raise ConfigError(
                    f"input_images has {len(images)} images but input_images_indexes={indexes} has {len(indexes)} "
                    "frame indexes; give one video frame index per image"
                )
            given, indexes = indexes, [frame_index(i) for i in indexes]
            bad = [i for i in indexes if i is None or not 0 <= i < num_frames]
            if bad or len(set(indexes)) != len(indexes):
                raise ConfigError(
                    f"input_images_indexes={given}: use distinct video frame indexes in [0, {num_frames - 1}] "
                    f"(num_frames={num_frames})"
                )
            keyframes = [(load_image(image), i) for image, i in zip(images, indexes, strict=True) if i != 0]
            input_image = next((image for image, i in zip(images, indexes, strict=True) if i == 0), None)
        if input_image is None:
            return None, keyframes
        items = list(input_image) if isinstance(input_image, (list, tuple)) else [input_image]
        if len(items) == 1:
            items = items * batch
        if len(items) != batch:
            raise ConfigError(f"input_image has {len(items)} images for {batch} prompts; give one, or one per prompt")
        return [load_image(image) for image in items], keyframes

    @staticmethod
    def check_frame_rate(frame_rate) -> float:
        ok = isinstance(frame_rate, (int, float)) and not isinstance(frame_rate, bool) and frame_rate > 0
        if not ok or not math.isfinite(frame_rate):
            raise ConfigError(f"frame_rate={frame_rate!r} is not accepted; use a positive number (frames per second)")
        return float(frame_rate)

    # ------------------------------------------------------------------ stages
    def predict_num_frames(
        self,
        prompt: str,
        max_sequence_length: int,
        frame_rate: float,
        min_seconds: float,
        max_seconds: float,
        *,
        video: bool = True,
    ) -> int:
        """The clip length LTX-2.5's duration head (`duration_head.py`) gives `prompt`: its seconds at `frame_rate`,
        clamped to `[min_seconds, max_seconds]` and floored onto the VAE's `8k + 1` grid, as ltx-pipelines does.
        `video=False` reads the audio connector's output only (ltx-pipelines' text-to-audio passes no video)."""
        self.load_models_to_device(["text_encoder", "connectors"])
        text = self.encode_prompt([prompt], max_sequence_length)
        self.load_models_to_device(["duration_head"])
        head_dtype = module_dtype(self.duration_head)
        video_tokens = text.video.to(head_dtype) if video else None
        seconds = float(self.duration_head(video_tokens, text.audio.to(head_dtype))[0])
        frames = num_frames_from_seconds(seconds, frame_rate, min_seconds, max_seconds, self.vae.temporal_compression)
        logger.info("the duration head gives %.2f s: %d frames at %g fps", seconds, frames, frame_rate)
        return frames

    def encode_prompt(self, prompts: list[str], max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH) -> LTX2Text:
        """Gemma-3 hidden states of every layer (left-padded to `max_sequence_length` tokens) through the
        text connectors: one context per stream, `[B, L, 3840]` each."""
        from .text_encoder import gemma_prompt_embeds

        if self.tokenizer is None:
            raise ConfigError(
                "LTX2Pipeline has no tokenizer: pass tokenizer_config=ModelConfig(model_id="
                f"'{GEMMA_REPO}', origin_file_pattern='tokenizer*') or a folder holding tokenizer files"
            )
        embeds, mask = gemma_prompt_embeds(
            self.text_encoder, self.tokenizer, prompts, max_sequence_length, device=self.device
        )
        video, audio, mask = self.connectors(embeds.to(module_dtype(self.connectors)), mask)
        return LTX2Text(video, audio, mask)

    def audio_latent_shape(self, batch: int, num_frames: int, frame_rate: float) -> tuple[int, int, int, int]:
        """`[B, C, L, M]` audio latents covering the video's `num_frames / frame_rate` seconds (checked against the
        DiT's audio token width when a DiT is loaded)."""
        cfg = self.audio_vae.config
        length = max(1, round(num_frames / frame_rate * cfg.latents_per_second))
        shape = (batch, cfg.latent_channels, length, cfg.latent_mel_bins)
        if self.dit is not None and shape[1] * shape[3] != self.dit.config.audio_in_channels:
            raise ConfigError(
                f"the DiT takes {self.dit.config.audio_in_channels} audio features per token but the audio VAE's "
                f"latents have {shape[1]} channels x {shape[3]} mel bins: the two come from different models"
            )
        return shape

    @property
    def sample_rate(self) -> int:
        """Sample rate (Hz) of the vocoder's waveforms."""
        return int(self.vocoder.sampling_rate)

    def prepare_latents(
        self,
        batch,
        num_frames,
        height,
        width,
        frame_rate,
        generator,
        rand_device,
        latents=None,
        audio_latents=None,
        keyframe_tokens: int = 0,
        token_layout: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Initial video and audio noise, float32. Drawn from `generator` (seeded on `rand_device`; None
        draws unseeded), video first (the same values on any compute device, and as diffusers draws them
        from a generator on that device). With `keyframe_tokens` both are drawn in the DiT's token layout,
        the video's with that many tokens more (unused: keyframes are clean), as ltx-core and diffusers'
        `LTX2ConditionPipeline` draw them; `token_layout` draws so without keyframes (a retake, as that pipeline
        draws a video condition's)."""
        if isinstance(generator, int):  # a seed
            generator, rand_device = seeded_generator(generator, rand_device, self.samples_in_parallel())
        tc, sc = self.vae.temporal_compression, self.vae.spatial_compression
        video_shape = (batch, self.dit.config.in_channels, (num_frames - 1) // tc + 1, height // sc, width // sc)
        audio_shape = self.audio_latent_shape(batch, num_frames, frame_rate)
        device = torch.device(rand_device)
        draws = []
        for given, shape, name in ((latents, video_shape, "latents"), (audio_latents, audio_shape, "audio_latents")):
            if given is not None:
                draws.append(self._check_initial(given, shape, name))
            elif keyframe_tokens or token_layout:  # both streams in token layout, the video's with keyframe tokens
                extra = keyframe_tokens if name == "latents" else 0
                draws.append(self._token_noise(shape, generator, rand_device, self.device, extra))
            else:
                noise = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
                draws.append(noise.to(self.device))
        return draws[0], draws[1]

    def prepare_image_condition(
        self, video: torch.Tensor, images: list[Image.Image], height: int, width: int, crf: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Image-to-video: each image, fitted to the video size and encoded alone by the video VAE, replaces
        the first latent frame of `video`. Returns the new latents and the denoise mask `[1, 1, f, h, w]`
        (0 on that frame: the DiT sees it clean and steps keep it). Fitting crops the centre to the video's
        aspect ratio (as the authors do; diffusers stretches instead), then resizes bilinearly; `crf` > 0 then
        passes each through H.264 at that CRF (`h264_frame`), as the model saw first frames in training."""
        video, mask, _ = self.first_frame_condition(video, images, height, width, crf)
        return video, mask

    def first_frame_condition(
        self,
        video: torch.Tensor,
        images: list[Image.Image],
        height: int,
        width: int,
        crf: int = 0,
        strength: float = 1.0,
        noise: torch.Tensor | None = None,
        start: float = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`prepare_image_condition` with a `strength`: the first latent frame becomes the image noised to
        `(1 - strength) * start` with `noise` (the stage's raw noise, default `video`), its mask `1 - strength`;
        also returns the clean latents (the image's frame, zeros after) that `denoise` blends towards."""
        self.load_models_to_device(["vae"])
        fitted = [fit_image(image, height, width) for image in images]
        if crf:
            fitted = [h264_frame(image, crf) for image in fitted]
        pixels = pil_to_tensor(fitted, dtype=module_dtype(self.vae), device=self.device)
        encoded = self.vae.encode(pixels[:, :, None]).float()  # [B, C, 1, h, w]
        level = (1.0 - strength) * start  # how far the frame starts noised (0: exactly the image)
        noise = video if noise is None else noise
        first = noise[:, :, :1] * level + encoded * (1.0 - level)
        video = torch.cat([first, video[:, :, 1:]], dim=2)
        mask = torch.ones((1, 1, *video.shape[2:]), device=video.device)
        mask[:, :, 0] = 1.0 - strength
        clean = torch.cat([encoded, torch.zeros_like(video[:, :, 1:])], dim=2)
        return video, mask, clean

    def encode_audio(
        self, waveform: torch.Tensor, sample_rate: int, num_frames: int, frame_rate: float, length: int | None = None
    ) -> torch.Tensor:
        """Normalised audio latents `[1, C, L, M]` of a waveform `[C, N]` (mono or stereo) for a clip of
        `num_frames` at `frame_rate`: resampled to the audio VAE's rate, cut or zero-padded to the clip's
        `num_frames / frame_rate` seconds (as the authors cut it), log-mel, encoded (posterior mode), and
        the first `length` latent frames kept (default: the clip's, as `audio_latent_shape`)."""
        config = self.audio_vae.config
        waveform = resample_audio(waveform.detach().float().cpu(), int(sample_rate), config.sample_rate)
        samples = int(num_frames / frame_rate * config.sample_rate)
        waveform = torch.nn.functional.pad(waveform[:, :samples], (0, max(0, samples - waveform.shape[1])))
        self.load_models_to_device(["audio_vae"])
        mel = mel_spectrogram(waveform[None].to(self.device), config.sample_rate, config)
        latents = self.audio_vae.encode(mel.to(module_dtype(self.audio_vae))).float()
        length = length or max(1, round(num_frames / frame_rate * config.latents_per_second))
        if latents.shape[2] < length:  # cannot happen at the release's settings; kept as a check
            raise ConfigError(
                f"{samples} audio samples give {latents.shape[2]} latent frames, fewer than the {length} the DiT "
                f"takes for {num_frames} frames at {frame_rate:g} fps"
            )
        return latents[:, :, :length]

    def prepare_audio_condition(
        self, audio_input, sample_rate, regions, num_frames, frame_rate, like
    ) -> LTX2AudioCondition:
        """A given sound (`retake_audio`): a waveform `[C, N]` at `sample_rate`, or a file (its own rate),
        encoded for the clip; `regions` (seconds) are re-made, a latent frame counting as inside a region
        when its half-open span [s, e) overlaps it (e > start and s < end, the authors' `TemporalRegionMask`);
        without regions all of it is kept."""
        if isinstance(audio_input, (str, os.PathLike)):
            audio_input, sample_rate = load_audio(audio_input)
        if not isinstance(audio_input, torch.Tensor) or audio_input.dim() not in (1, 2):
            got = tuple(audio_input.shape) if isinstance(audio_input, torch.Tensor) else type(audio_input).__name__
            raise ConfigError(f"retake_audio must be a waveform [channels, samples] or a file path, got {got}")
        waveform = audio_input[None] if audio_input.dim() == 1 else audio_input
        if waveform.shape[0] not in (1, 2):
            raise ConfigError(f"retake_audio has {waveform.shape[0]} channels; give mono or stereo sound")
        check_waveform(waveform)
        self.check_audio_duration(num_frames, frame_rate)
        latents = self.encode_audio(waveform, sample_rate, num_frames, frame_rate, like.shape[2])
        mask = torch.zeros((1, 1, like.shape[2], 1), device=like.device)
        if regions:
            spans = audio_positions(self.dit.config, 1, like.shape[2], like.device)[0, 0]  # [L, 2] seconds
            for region in regions:
                start, end = self._region(region)
                inside = (spans[:, 1] > start) & (spans[:, 0] < end)  # touching is not overlapping
                if not inside.any():
                    raise ConfigError(
                        f"retake_audio_regions entry {region!r} overlaps no audio latent frame of the "
                        f"{num_frames / frame_rate:g} s clip; give (start, end) seconds inside it"
                    )
                mask[0, 0, inside, 0] = 1.0
            return LTX2AudioCondition(latents.to(like.device), mask)
        stereo = waveform.float().cpu().expand(2, -1)
        samples = int(num_frames / frame_rate * int(sample_rate))  # cut or zero-padded to the clip, as encoded
        kept = torch.nn.functional.pad(stereo[:, :samples], (0, max(0, samples - stereo.shape[1])))
        return LTX2AudioCondition(latents.to(like.device), mask, kept, int(sample_rate))

    def check_audio_duration(self, num_frames: int, frame_rate: float) -> None:
        """A given sound is cut to the clip, whose log-mel (reflect-padded STFT) needs more than `n_fft / 2`
        samples at the audio VAE's rate: a shorter clip (e.g. 1 frame at 50 fps) is refused by name, as the
        authors' STFT would fail on it too."""
        config = self.audio_vae.config
        samples, needed = int(num_frames / frame_rate * config.sample_rate), config.n_fft // 2 + 1
        if samples < needed:
            raise ConfigError(
                f"retake_audio: the clip (num_frames={num_frames} at frame_rate={frame_rate:g}) lasts "
                f"{num_frames / frame_rate * 1000:g} ms, {samples} samples at {config.sample_rate} Hz; the audio VAE "
                f"needs at least {needed} ({needed / config.sample_rate * 1000:g} ms): give more frames"
            )

    @staticmethod
    def _region(region, name: str = "retake_audio_regions") -> tuple[float, float]:
        ok = isinstance(region, (tuple, list)) and len(region) == 2
        ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in region)
        if not ok or region[0] >= region[1]:  # an empty or reversed region re-makes nothing: refused, as the authors'
            raise ConfigError(f"{name} entry {region!r} is not accepted; give (start, end) seconds, start < end")
        return float(region[0]), float(region[1])

    def prepare_keyframes(
        self, images: Sequence[tuple[Image.Image, int]], height: int, width: int, crf: int, fps: float
    ) -> LTX2Keyframes | None:
        """Keyframe tokens (`LTX2Keyframes`) of (image, video frame) pairs: each image fitted to the video size
        (and re-compressed at `crf`) as a first frame is, encoded alone by the video VAE, packed, and placed
        at its frame (`keyframe_positions`); None without keyframes."""
        if not images:
            return None
        self.load_models_to_device(["vae"])
        tokens, coords = [], []
        for image, frame in images:
            fitted = fit_image(image, height, width)
            fitted = h264_frame(fitted, crf) if crf else fitted
            pixels = pil_to_tensor([fitted], dtype=module_dtype(self.vae), device=self.device)
            latent = self.vae.encode(pixels[:, :, None]).float()  # [1, C, 1, h, w]
            tokens.append(pack_video(latent))
            coords.append(keyframe_positions(self.dit.config, *latent.shape[-2:], frame, fps, self.device))
        return LTX2Keyframes(torch.cat(tokens, dim=1), torch.cat(coords, dim=2))

    def denoise(
        self,
        video,
        audio,
        scheduler,
        text: LTX2Text,
        fps,
        mask,
        guided,
        progress_bar: bool = True,
        keyframes=None,
        audio_mask=None,
        clean=None,
        audio_references=None,
    ):
        """Euler steps over the scheduler's sigmas; `guided` is (use_cfg, cfg, audio cfg, rescale,
        `LTX2Guidance`). Latents under `mask` / `audio_mask` 0 stay as they are; `keyframes` (and
        `audio_references`) are read at every step. With `clean` (the first frame's latents), each step's clean
        estimate is blended with it by `1 - mask` (a first frame of strength below 1), which leaves mask-0 frames
        as they are."""
        use_cfg, scale, audio_scale, rescale, guidance = guided
        extra = dict(denoise_mask=mask, keyframes=keyframes, audio_denoise_mask=audio_mask)
        extra.update(audio_references=audio_references, guidance=guidance)
        self.load_models_to_device(["dit"])
        for i in self.progress(range(len(scheduler.timesteps)), progress_bar):
            sigma = scheduler.sigmas[i]
            v_video, v_audio = self.predict(
                video, audio, sigma, text, fps, use_cfg, scale, audio_scale, rescale, **extra
            )
            if clean is not None:  # x0 = video - sigma * v, blended with `clean` by 1 - mask, back to a velocity
                v_video = v_video * mask + (1.0 - mask) * (video - clean) / float(sigma)
            elif mask is not None:
                v_video = v_video * mask  # clean frames stay
            video = scheduler.step(v_video, i, video)
            audio = scheduler.step(v_audio if audio_mask is None else v_audio * audio_mask, i, audio)
        return video, audio

    def upsample_latents(self, video: torch.Tensor, upsampler=None) -> torch.Tensor:
        """Normalised video latents at twice the width and height (or, with the temporal `upsampler`, twice the
        frame rate): the upsamplers work on raw latents, so the VAE's per-channel statistics are undone before and
        applied again after (ltx-core's `upsample_video`)."""
        upsampler = self.upsampler if upsampler is None else upsampler
        self.load_models_to_device(["upsampler" if upsampler is self.upsampler else "temporal_upsampler"])
        mean, std = self.vae.per_channel_statistics.stats(video, (1, -1, 1, 1, 1))
        raw = (video * std + mean).to(module_dtype(upsampler))
        return (upsampler(raw).float() - mean) / std

    def _load_into_slots(self, config) -> None:
        """A temporal latent upsampler (`ltx-2.5-latent-temporal-upscaler-x2`) goes to `temporal_upsampler`: both
        upsamplers share one role and are told apart by their config. LTX-2.5's split files (`split_files.py`)
        load with the configs their metadata holds; DiffSynth-Studio's LTX-2 repack files by `_load_repack_files`."""
        from diffsynth.runtime.pipeline import weight_paths

        from .repackage import repack_kinds
        from .split_files import file_kinds

        paths = weight_paths(config)
        repack = repack_kinds(paths)
        if repack is not None:
            return self._load_repack_files(config, repack)
        kinds = file_kinds(paths)
        if any(kind is not None for kind in kinds.values()):
            return self._load_split_files(config, kinds)
        spatial, spatial_config = self.upsampler, self.model_configs.get("upsampler")
        self.upsampler = None
        super()._load_into_slots(config)
        loaded = self.upsampler
        if loaded is None:
            self.upsampler = spatial
        elif loaded.config.temporal_upsample:
            self.temporal_upsampler, self.upsampler = loaded, spatial
            self.model_configs["temporal_upsampler"] = self.model_configs.pop("upsampler")
            if spatial_config is not None:
                self.model_configs["upsampler"] = spatial_config
        elif spatial is not None:
            logger.warning("%s replaces an earlier latent upsampler", config)

    def _load_split_files(self, config, kinds: dict) -> None:
        """LTX-2.5's split files of one `ModelConfig` into the slots. The text connectors need the transformer and
        the text encoder files together: each is loaded without them, and the connectors once both were given (in
        one `ModelConfig` or two)."""
        from .split_files import KIND_ROLES, load_split

        pending = self.__dict__.setdefault("_split_halves", {})
        loaded = []
        for path, kind in kinds.items():
            if kind is None:
                raise ConfigError(f"{path} is not an LTX-2.5 split file; give it in a ModelConfig of its own")
            roles = set(KIND_ROLES.get(kind, ())) - {"connectors"} if kind in ("transformer", "text_encoder") else None
            loaded += load_split(path, self.torch_dtype, "cpu", roles=roles)
            if kind in ("transformer", "text_encoder"):
                pending[kind] = path
        if len(pending) == 2 and self.connectors is None:
            loaded += load_split([pending["transformer"], pending["text_encoder"]], self.torch_dtype, "cpu",
                                 roles={"connectors"})  # fmt: skip
        for item in loaded:
            slot = "upsampler" if item.role == "upsampler" else item.role
            if item.role == "upsampler" and item.module.config.temporal_upsample:
                slot = "temporal_upsampler"
            if slot == "vae" and self.vae is not None:  # the diffusion-VAE file's encoder is the conv VAE's own
                if isinstance(item.module, LTX2VideoEncoderVAE):
                    continue
                if isinstance(self.vae, LTX2VideoEncoderVAE):
                    self.vae = None
            if getattr(self, slot, None) is not None:
                logger.warning("%s replaces an earlier %s model", config, slot)
            setattr(self, slot, item.module.eval().requires_grad_(False))
            self.model_configs[slot] = config

    def _load_repack_files(self, config, kinds: dict) -> None:
        """DiffSynth-Studio's `LTX-2-Repackage` files of one `ModelConfig` (`repackage.py`): whole parts load as
        the single file's; a VAE half goes with the other half of that VAE, whichever `ModelConfig` gave it."""
        from dataclasses import replace

        from diffsynth.runtime.quant import check_vram_keys

        from .repackage import VAE_HALVES, load_vae

        halves = self.__dict__.setdefault("_repack_halves", {})
        given = set()
        for path, kind in kinds.items():
            if kind not in VAE_HALVES:
                one = config if len(kinds) == 1 else replace(config, path=path, model_id=None, origin_file_pattern=None)
                super()._load_into_slots(one)
                continue
            slot, half = VAE_HALVES[kind]
            if self.load_roles is None or slot in self.load_roles:
                halves.setdefault(slot, {})[half] = path
                given.add(slot)
        for slot in sorted(given):
            module = load_vae(halves[slot], self.torch_dtype).requires_grad_(False)
            if getattr(self, slot) is not None and len(halves[slot]) == 1:
                logger.warning("%s replaces an earlier %s model", config, slot)
            if config.quantize is not None:
                check_vram_keys(slot, config.quantize, config.vram_config())
                config.quantize.quantize_model(module, compute_device=self.device)
            setattr(self, slot, module)
            self.model_configs[slot] = config

    def _load_tokenizer(self, config):
        """The Gemma tokenizer; LTX-2.5's text encoder file packs its own (`split_files.gemma_tokenizer`)."""
        paths = config.resolve()
        if len(paths) == 1 and str(paths[0]).endswith(".safetensors"):
            from .split_files import gemma_tokenizer

            return gemma_tokenizer(paths[0])
        return super()._load_tokenizer(config)

    def refine(
        self,
        video,
        audio,
        text,
        fps,
        generator,
        rand_device,
        conditions,
        *,
        size,
        crf,
        lora_strength,
        progress_bar,
        without_loras: bool = False,
        sampler=None,
    ):
        """The second stage: upsample the video latents, re-noise video and audio to the first stage-2 sigma
        (noise drawn from the first stage's generator in token layout, video first), put the first frame back
        and the keyframes at full `size` (`conditions`: first frames, keyframe images, the mask of a given
        sound, which stays as it is, and a retaken video, whose kept frames come back at full size), and take
        the authors' 3 distilled steps without guidance. With a `lora_strength` (the full model) the distilled
        LoRA is attached for these steps only; `without_loras` turns the LoRAs loaded apart off for them
        (IC-LoRA references are first-stage only). `sampler` replaces `denoise` (same arguments)."""
        (height, width), (first_frames, strength, keyframe_images, audio_mask, retake) = size, conditions
        keyframes = self.prepare_keyframes(keyframe_images, height, width, crf, fps)
        video = self.upsample_latents(video)
        scheduler = FlowMatchScheduler("ltx2_stage2")
        scheduler.set_timesteps(3)
        start = float(scheduler.sigmas[0])
        extra = 0 if keyframes is None else len(keyframes)  # ltx-core draws noise for the keyframe tokens too
        video_noise = self._token_noise(video.shape, generator, rand_device, video.device, extra)
        audio_noise = self._token_noise(audio.shape, generator, rand_device, audio.device)
        video = start * video_noise + (1 - start) * video
        renoised = start * audio_noise + (1 - start) * audio
        audio = renoised if audio_mask is None else audio + audio_mask * (renoised - audio)  # given sound stays
        mask = clean = None
        if first_frames is not None:
            video, mask, clean = self.first_frame_condition(
                video, first_frames, height, width, crf, strength, video_noise, start
            )
        if retake is not None:  # the given video again, at full size
            video, mask = keep_video(self, video, retake[0], height, width, retake[1], fps)
        unguided = (False, 1.0, 1.0, 0.0, None)
        denoise = (video, audio, scheduler, text, fps, mask, unguided, progress_bar, keyframes, audio_mask, clean)
        sample = self.denoise if sampler is None else sampler
        with self._loras_off(without_loras):
            if lora_strength is None:
                return sample(*denoise)
            self.load_models_to_device(["dit"])
            self.load_lora(self._stage2_lora(), scale=lora_strength, fuse=False, name=STAGE_2_LORA_NAME)
            try:
                return sample(*denoise)
            finally:
                from diffsynth.runtime.lora import clear_loras, list_loras

                for model in (self.dit, self.connectors):
                    if STAGE_2_LORA_NAME in list_loras(model):
                        clear_loras(model, STAGE_2_LORA_NAME)

    @contextlib.contextmanager
    def stage_loras(self, loras):
        """`loras` ((weights, scale, name), each from `read_lora`) attached unfused inside, taken out after."""
        from diffsynth.runtime.lora import clear_loras, list_loras

        if loras:
            self.load_models_to_device(["dit"])
        try:
            for weights, scale, name in loras:
                self.load_lora(weights, scale=scale, fuse=False, name=name)
            yield
        finally:
            for _, _, name in loras:
                for model in (self.dit, self.connectors):
                    if model is not None and name in list_loras(model):
                        clear_loras(model, name)

    @contextlib.contextmanager
    def _loras_off(self, off: bool):
        """With `off`, the LoRAs loaded apart on the DiT and connectors are at scale 0 inside, restored after."""
        from diffsynth.runtime.lora import list_loras, set_lora_scale

        models = [m for m in (self.dit, self.connectors) if m is not None] if off else []
        saved = [(model, name, scale) for model in models for name, scale in list_loras(model).items()]
        for model, name, _ in saved:
            set_lora_scale(model, name, 0.0)
        try:
            yield
        finally:
            for model, name, scale in saved:
                set_lora_scale(model, name, scale)

    @staticmethod
    def _token_noise(shape, generator, rand_device, device, extra: int = 0) -> torch.Tensor:
        """Noise for latents of `shape` (video `[B, C, F, H, W]` or audio `[B, C, L, M]`) drawn in the DiT's
        token layout (as ltx-core's noiser and diffusers' second stage and condition pipeline draw it), for
        `extra` keyframe tokens after the video's too (drawn, then dropped), returned in the latent layout."""
        video = len(shape) == 5
        b, c = shape[:2]
        n, width = (math.prod(shape[2:]), c) if video else (shape[2], c * shape[3])
        noise = torch.randn((b, n + extra, width), generator=generator, device=torch.device(rand_device))[:, :n]
        noise = unpack_video(noise, *shape[2:]) if video else unpack_latents(noise, shape[3])
        return noise.to(device)

    def _stage2_lora(self):
        """The distilled LoRA of `stage2_lora`, read once per source (a `ModelConfig` is fetched at its first
        use)."""
        from diffsynth.runtime.lora import read_lora

        source = self.stage2_lora
        cached = getattr(self, "_stage2_weights", None)
        if cached is not None and cached[0] is source:
            return cached[1]
        self._stage2_weights = (source, read_lora(lora_file(source, "stage2_lora_config")))
        return self._stage2_weights[1]

    def _check_initial(self, latents, expected, name: str) -> torch.Tensor:
        if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != tuple(expected):
            got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ConfigError(f"{name} must be a tensor of shape {tuple(expected)}, got {got}")
        return latents.to(device=self.device, dtype=torch.float32)

    def predict(
        self,
        video,
        audio,
        sigma,
        text: LTX2Text,
        fps,
        use_cfg,
        scale,
        audio_scale,
        rescale,
        denoise_mask=None,
        guidance: LTX2Guidance | None = None,
        keyframes: LTX2Keyframes | None = None,
        audio_denoise_mask=None,
        audio_references: LTX2Keyframes | None = None,
    ):
        """Guided velocities; with CFG the conditional and unconditional passes run as one batch.
        `denoise_mask` / `audio_denoise_mask` mark clean conditioning latents and `keyframes` are clean tokens
        the DiT reads beside the video's (see `ltx2_velocity`); `guidance` adds the STG and
        modality-isolation passes to that batch. `rescale` is one factor, or (video, audio) ones."""
        conditions = {"denoise_mask": denoise_mask, "keyframes": keyframes, "audio_denoise_mask": audio_denoise_mask}
        conditions["audio_references"] = audio_references
        scales = (scale, audio_scale)
        return guided_velocities(
            self.dit, video, audio, sigma, text, fps, use_cfg, scales, rescale, guidance, conditions
        )

    def _stream_scales(self, name: str, value, audio_value, fallback: float) -> tuple[float, float]:
        """(video, audio) scales of one guidance term: an explicit `name` sets both streams unless the audio
        one is given too, else the preset's defaults, else `fallback`."""
        audio_name = f"audio_{name}"
        video = self.setting(name, value, fallback)
        if audio_value is None:
            audio_value = video if value is not None else self.defaults.get(audio_name, fallback)
        return finite_number(video, name), finite_number(audio_value, audio_name)

    @property
    def is_ltx23(self) -> bool:
        """Whether the loaded DiT is LTX-2.3's or later (its text cross-attention has an AdaLN), whose authors'
        defaults (30 steps, STG at block 28) apply when no preset sets them, as ltx-pipelines picks them per model."""
        return self.dit is not None and self.dit.config.cross_attention_adaln

    @property
    def is_ltx25(self) -> bool:
        """Whether the loaded DiT is LTX-2.5's (it has the keyframe embedding): also the 2.4+ image CRF of 18."""
        return self.dit is not None and self.dit.config.keyframes_abs_pos_embedding

    @property
    def default_image_crf(self) -> int:
        return LTX24_IMAGE_CRF if self.is_ltx25 else DEFAULT_IMAGE_CRF

    @property
    def default_steps(self) -> int:
        return LTX23_STEPS if self.is_ltx23 else DEFAULT_STEPS

    @property
    def default_stg_blocks(self) -> tuple[int, ...]:
        return LTX23_STG_BLOCKS if self.is_ltx23 else DEFAULT_STG_BLOCKS

    def check_stg_blocks(self, blocks) -> tuple[int, ...]:
        """STG's block indices: explicit ones must exist in the DiT; the defaults (for the released 48
        blocks) keep only those that do, so a smaller DiT runs without STG."""
        n = self.dit.config.num_layers
        if blocks is None:
            default = tuple(self.defaults.get("spatio_temporal_guidance_blocks", self.default_stg_blocks))
            kept = tuple(i for i in default if 0 <= i < n)
            if kept != default:
                logger.debug("default STG blocks %s dropped: the DiT has %d blocks", default, n)
            return kept
        values = [blocks] if isinstance(blocks, int) else list(blocks)
        if any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n for i in values):
            raise ConfigError(
                f"spatio_temporal_guidance_blocks={blocks!r} is not accepted; use block indices in [0, {n}) "
                "(the authors perturb block 29 of LTX-2's 48)"
            )
        return tuple(values)

    def decode_audio(self, audio: torch.Tensor) -> torch.Tensor:
        """Audio latents -> waveforms `[B, channels, samples]` (float32): the audio VAE gives a mel
        spectrogram, the vocoder turns it into sound."""
        self.load_models_to_device(["audio_vae", "vocoder"])
        mel = self.audio_vae.decode(audio.to(module_dtype(self.audio_vae)))
        return self.vocoder(mel.to(module_dtype(self.vocoder))).float()


@dataclass
class LTX2Audio:
    """Generated sound: `waveform` `[2, N]` for one prompt with `output_type="pil"`, else `[B, 2, N]` (also
    `[1, 2, N]` for one prompt with "np" / "pt"), in [-1, 1] at `sample_rate` Hz."""

    waveform: torch.Tensor
    sample_rate: int

    def __iter__(self):  # `waveform, sample_rate = audio`
        return iter((self.waveform, self.sample_rate))
