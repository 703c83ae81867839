"""LTX-2's training task, for the DiffSynth trainer (`diffsynth-train --family ltx2`, package diffsynth-training).

It implements the trainer's `TrainingTask` protocol structurally (this package does not depend on the
trainer): class attributes `family`, `denoiser_slot`, `size_multiple`, `media`; a `scheduler`; `models`,
`model_files` and `sample` (the runtime's `PipelineTrainingTask`); `from_pretrained(model_configs, *,
tokenizer_config, torch_dtype, device, encoders, denoiser)`; `encode(rows)`, `collate(samples)`,
`velocity(dit, batch, noisy_latents, sigma)` and `loss_mask(batch)`.

A row is `{"prompt": str, "video": [3, F, H, W] in [-1, 1]}` (F = 8k + 1, H and W multiples of 32) or
`{"prompt": str, "image": [3, H, W]}` (a one-frame video), with its sound as `"audio"`: a waveform
`[channels, samples]` in [-1, 1] (mono or stereo) at `"audio_sample_rate"` Hz (the audio VAE's 16 kHz when
not given), as the trainer's dataset reads it from an `audio` column or the video file's own track, or None
for a clip without sound. The frame rate is the row's `"frame_rate"` (the dataset fills it from the video
file when the metadata has no such column), else 24, the pipeline's default: it places the video tokens in
time (RoPE) and sets how long the sound is. Each row is encoded as the pipeline encodes, at the same sizes:

- the prompt through `LTX2Pipeline.encode_prompt` (Gemma-3, then the text connectors): `"text_video"`,
  `"text_audio"` `[L_text, 3840]` and their `"text_mask"`;
- the video through the video VAE (posterior mode, normalised), packed as the DiT reads it (`pack_video`):
  `F' * H' * W'` tokens (F' = 1 + (F - 1) / 8, H' = H / 32, W' = W / 32);
- the sound resampled to 16 kHz, cut or zero-padded to the clip's `F / frame_rate` seconds, through the
  audio VAE's mel front end (`mel_spectrogram`) and encoder (posterior mode, normalised), cut to the
  `L` latent frames `audio_latent_shape` gives for F frames at that rate, and packed (`pack_latents`).

The trainer applies one noise level to one latent tensor per sample, so the two token sequences travel as
one: `"latents"` `[F'H'W' + L, 128]`, video first, with `"video_shape"` (F', H', W'), `"audio_shape"` (C, L,
mel bins), `"frame_rate"` and `"audio_weight"` (1, or 0 for a clip without sound) beside it. `velocity` splits
the noisy tokens, calls `ltx2_velocity` (the pipeline's per-step call, both streams at the same sigma, as the
pipeline denoises them) and joins the two velocities again.

What the authors do, and what this task does with it (Lightricks' `ltx-trainer`, `text_to_video` strategy;
DiffSynth-Studio's `FlowMatchSFTAudioVideoLoss` agrees on the loss):

- Loss: the video's mean squared error plus the audio's, each a mean over its own tokens (a short sound
  track weighs as much as the video). `loss_mask` gives the trainer per-element weights 1/size of each
  stream, so a sample's loss is the mean of the two streams' errors: the authors' sum halved for every clip
  with sound, which Adam's updates do not see (mind `--max_grad_norm`).
- Clips without sound (and images): the authors' video-only training runs the DiT without an audio stream,
  so the video never attends to audio. Here the sample keeps zero audio latents, out of the loss
  (`audio_weight` 0), and the DiT's audio->video attentions are skipped for it (`AttentionSkip("a2v")`, the
  modality-isolation switch): its video prediction is the video-only one. `with_audio="required"` refuses
  such rows; `"none"` trains every row video-only (DiffSynth-Studio's `LTX-2-T2AV-noaudio` recipe).
- Noise levels: the authors' default `shifted_logit_normal` sampler: sigmoid(N(mu, 1)) stretched between
  its 0.5 and 99.9 percentiles to [0, 1] (reflected at 1e-3), mu = 0.95 + 1.1 (n - 1024) / 3072 for the n
  video tokens of the batch, with one draw in ten uniform instead; `timestep_sampling="uniform"` is their
  other choice. No loss weights (the authors weigh every noise level alike). `--min/max_timestep_boundary`
  squeeze the draw into sigma in [1 - max, 1 - min]. DiffSynth-Studio instead draws from a 1000-step grid
  and weighs it; we follow the model's authors.

Image-to-video (`first_frame=true`): the clip's own clean first latent frame stands in place of the noisy
one, the DiT sees it at timestep 0 token by token (`ltx2_velocity`'s `denoise_mask`, as the pipeline's
`input_image` does) and `loss_mask` leaves it out of the loss: the authors' first-frame conditioning with
`first_frame_conditioning_p` = 1. `first_frame=0.1` is their probability (the default of their
`text_to_video` and `video_to_video` strategies, so an IC-LoRA or a text-to-video LoRA also learns to continue
a given first frame): as in their trainer, one draw per batch decides whether all its clips train from their
first frame, made by `draw_choices` from the generator the trainer keys by the micro-batch (so DDP and gradient
accumulation draw alike, and a resumed run draws as an uninterrupted one) and carried as the batch's
`"first_frame"` rows, so `velocity` and `loss_mask` agree (a teacher's negative batch takes the same rows). Validation samples take their first frame
from `--validation_images` (expected with `first_frame=true`, optional otherwise). One-frame clips train as
text-to-image.

IC-LoRA (DiffSynth-Studio's LTX-2 / LTX-2.3 IC-LoRA recipes; the authors' `video_to_video` strategy): a row's
`in_context_videos` (one control video or a list, read by the dataset as videos: list the column in
`--data_file_keys`) at its `in_context_downsample_factor` (a column, else the task option of that name, else 1:
the pipeline's factor for a LoRA file that declares none) are encoded as the pipeline encodes its reference
videos for a clip of that size and length (`in_context.encode_references`: each fitted to the clip's size /
factor, at most its frame count, 8k + 1 of them, through the video VAE). The sample keeps their tokens
(`"reference_tokens"` `[K, 128]`), latent grids (`"reference_grid"`, one (f, h, w) per video) and factor;
`velocity` appends them to the video's tokens as clean tokens (timestep 0) at their own positions, rows and
columns scaled by the factor (`reference_positions`), as the pipeline's denoising step does, and returns the
target's velocity alone: the references are outside `"latents"`, so they are never noised and the loss covers
the target only (the authors and DiffSynth-Studio both leave them out of the loss). The authors train IC-LoRAs
video-only; DiffSynth-Studio's recipes train the sound too: here the sound follows `with_audio` as for any clip.
The LoRA file declares the factor it trained at as `reference_downscale_factor` in its header (`lora_metadata`,
the authors' key), which the pipeline reads when it loads the IC-LoRA: the factor of the dataset's rows, which
`prepare_dataset` reads before any step (none when they differ), so a resumed run and every DDP process declare
the same; without that call (or from a cache, whose items have no metadata rows) it is the factors of the
batches this process trained. Validation samples take their control
video from `--task_options validation_ic_video=control.mp4` (a video file, relative to the working directory;
several joined by '|'; `--validation_images` reads pictures only), the same for every prompt: the pipeline's
`in_context_videos`, at the factor the rows trained at (else the `in_context_downsample_factor` option's).

LoRA: the trainer wraps `LTX2DiT.lora_target_modules` (ltx-core's names: q/k/v/out of every attention and
both feed-forwards), so the LoRA file loads in `LTX2Pipeline.load_lora`; `--lora_formats peft` adds one
with `diffusion_model.` names, the layout ComfyUI and diffusers' `LTX2Pipeline.load_lora_weights` read.
Validation samples are the pipeline's with CFG, STG and modality guidance off (cfg 1, stg 0, modality 1), as
long as the clips trained and at their frame rate (the dataset's first item's, from `prepare_dataset`, so a
`--sample_at_first` sample too; else the last batch's); the trainer writes them with their sound.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.media import pil_to_tensor, tensor_to_pil
from diffsynth.runtime.schedulers import FlowMatchScheduler
from diffsynth.runtime.training_support import PipelineTrainingTask, load_partial_pipeline, row_video
from diffsynth.runtime.vram import module_dtype

from .audio_vae import pack_latents, unpack_latents
from .dit import AttentionSkip, video_positions
from .in_context import reference_frames
from .pipeline import DEFAULT_MAX_SEQUENCE_LENGTH, LTX2Pipeline
from .velocity import DEFAULT_FRAME_RATE, LTX2Keyframes, LTX2Text, ltx2_velocity, pack_video, unpack_video

logger = logging.getLogger(__name__)

ENCODER_SLOTS = ("vae", "audio_vae", "connectors", "text_encoder")
WITH_AUDIO = ("auto", "required", "none")
SAMPLINGS = ("shifted_logit_normal", "uniform")
IN_CONTEXT = "in_context_videos"  # DiffSynth-Studio's column names
FACTOR = "in_context_downsample_factor"
REFERENCE_KEYS = ("reference_tokens", "reference_grid", "reference_factor")


class LTX2TimestepSampler(FlowMatchScheduler):
    """The authors' training noise levels (see the module docstring), unweighted. `tokens` is the video token
    count the shift follows: the task sets it from each batch it collates, before the trainer draws."""

    def __init__(self, sampling: str = "shifted_logit_normal", *, std: float = 1.0, uniform_prob: float = 0.1):
        if sampling not in SAMPLINGS:
            raise ConfigError(f"timestep_sampling={sampling!r} is not accepted; use one of {SAMPLINGS}")
        if not std > 0 or not 0 <= uniform_prob <= 1:
            raise ConfigError(f"timestep_std={std!r} must be > 0 and uniform_prob={uniform_prob!r} in [0, 1]")
        super().__init__("ltx2")
        self.sampling, self.std, self.uniform_prob, self.eps = sampling, float(std), float(uniform_prob), 1e-3
        self.tokens = 4096

    @staticmethod
    def shift(tokens: int) -> float:
        """mu of the logit-normal draw: 0.95 at 1024 video tokens, 2.05 at 4096, linear (not clamped) around."""
        return 0.95 + (2.05 - 0.95) * (tokens - 1024) / (4096 - 1024)

    def sample_training_sigmas(
        self,
        batch: int,
        generator: torch.Generator | None = None,
        *,
        min_boundary: float = 0.0,
        max_boundary: float = 1.0,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ConfigError(f"batch={batch!r} is not accepted; use an integer >= 1")
        if not 0 <= min_boundary < max_boundary <= 1:
            raise ConfigError(
                f"--min_timestep_boundary {min_boundary} / --max_timestep_boundary {max_boundary}: use "
                "0 <= min < max <= 1 (LTX-2 trains on sigma in [1 - max, 1 - min])"
            )
        uniform = (1 - self.eps) * torch.rand(batch, generator=generator) + self.eps
        if self.sampling == "uniform":
            unit = torch.rand(batch, generator=generator)
        else:
            mu = self.shift(self.tokens)
            drawn = torch.sigmoid(torch.randn(batch, generator=generator) * self.std + mu)
            low, high = (torch.sigmoid(torch.tensor(mu + p * self.std)) for p in (-2.5758, 3.0902))
            stretched = (drawn - low) / (high - low)
            stretched = torch.where(stretched >= self.eps, stretched, 2 * self.eps - stretched).clamp(0, 1)
            pick = torch.rand(batch, generator=generator)
            unit = torch.where(pick > self.uniform_prob, stretched, uniform)
        sigma = (1 - max_boundary) + (max_boundary - min_boundary) * unit
        return sigma.float().to(device)

    def training_weight(self, sigmas: torch.Tensor | float) -> torch.Tensor:
        """1 for every noise level (the authors weigh none)."""
        return torch.ones_like(torch.as_tensor(sigmas, dtype=torch.float32))

    def __repr__(self) -> str:
        return f"LTX2TimestepSampler({self.sampling!r}, tokens={self.tokens})"


class LTX2TrainingTask(PipelineTrainingTask):
    """Turns rows into LTX-2 video + audio tokens and runs the pipeline's per-step DiT call (see the module
    docstring)."""

    family: ClassVar[str] = "ltx2"
    denoiser_slot: ClassVar[str] = "dit"
    size_multiple: ClassVar[int] = LTX2Pipeline.size_multiple
    media: ClassVar[tuple[str, ...]] = ("video", "image")
    # --task_options that act only on the noise levels or the model call: a cache stays valid (with_audio
    # shapes the samples)
    loss_options: ClassVar[tuple[str, ...]] = ("timestep_sampling", "first_frame", "validation_ic_video")
    # a batch of clips without sound skips the audio->video attentions, whose weights then get no gradient
    # (DiffSynth-Studio's video-only LTX-2 recipe passes --find_unused_parameters for the same reason)
    ddp_find_unused_parameters: ClassVar[bool] = True
    # the trainer's `--masked_loss` weighs a grid of latent cells; these latents are a token sequence (video + audio)
    takes_loss_masks: ClassVar[bool] = False
    # the batch entries `draw_choices` draws (copied onto a teacher's negative batch)
    batch_choices: ClassVar[tuple[str, ...]] = ("first_frame",)

    def __init__(
        self,
        pipe: LTX2Pipeline,
        *,
        with_audio: str = "auto",
        timestep_sampling: str = "shifted_logit_normal",
        max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
        first_frame: bool | float = False,
        in_context_downsample_factor: int = 1,
        validation_ic_video: str | Sequence[str] | None = None,
    ):
        """`with_audio`: "auto" trains each clip's sound when it has one, "required" refuses clips without,
        "none" trains the video alone; `timestep_sampling`: the authors' "shifted_logit_normal" or "uniform";
        `max_sequence_length`: the padded prompt length (the pipeline's 1024); `first_frame`: image-to-video,
        every clip of more than one frame conditioned on its own clean first latent frame;
        `in_context_downsample_factor`: the IC-LoRA reference factor of rows without that column;
        `validation_ic_video`: the control video file(s) of every validation sample (the pipeline's
        `in_context_videos`)."""
        if with_audio not in WITH_AUDIO:
            raise ConfigError(f"with_audio={with_audio!r} is not accepted; use one of {WITH_AUDIO}")
        if isinstance(first_frame, int) and not isinstance(first_frame, bool) and first_frame in (0, 1):
            first_frame = bool(first_frame)
        if not isinstance(first_frame, (bool, float)) or not 0.0 <= first_frame <= 1.0:
            raise ConfigError(
                f"first_frame={first_frame!r} is not accepted; use true, false or a probability in [0, 1] (the "
                "authors' first_frame_conditioning_p, e.g. 0.1)"
            )
        self.validation_ic_video = _control_videos(validation_ic_video)
        if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) or max_sequence_length < 1:
            raise ConfigError(f"max_sequence_length={max_sequence_length!r} is not accepted; use an integer >= 1")
        self.in_context_downsample_factor = _factor(in_context_downsample_factor, f"{FACTOR}=")
        self.reference_factors: set[int] = set()  # the IC-LoRA factors trained at (`lora_metadata`)
        self.factors_from_data = False  # `prepare_dataset` read them from the rows: batches add none
        self.pipe = pipe
        self.with_audio = with_audio
        self.max_sequence_length = max_sequence_length
        self.scheduler = LTX2TimestepSampler(timestep_sampling)
        self.temporal_compression = pipe.vae.temporal_compression if pipe.vae is not None else 8
        self.clip: dict[str, Any] = {}  # the last batch's frame count and rate, for validation samples
        self.first_frame = first_frame
        self.first_frame_p = float(first_frame)  # the chance a batch trains from its first frame
        # validation samples: an image-to-video LoRA is meant to be drawn from a first frame
        self.validation_references = "expected" if self.first_frame_p == 1.0 else "optional"

    @classmethod
    def from_pretrained(
        cls,
        model_configs: Sequence[ModelConfig],
        *,
        tokenizer_config: ModelConfig | None = None,
        torch_dtype: torch.dtype | str = torch.bfloat16,
        device: str | torch.device | None = None,
        encoders: bool = True,
        denoiser: bool = True,
        **task_options: Any,
    ) -> LTX2TrainingTask:
        """Load the models a stage needs: the DiT (`denoiser`) and/or the video VAE, audio VAE, text
        connectors, Gemma and its tokenizer (`encoders`; the vocoder too when the files hold it, for validation
        samples). Without `tokenizer_config`, tokenizer files beside the Gemma weights are used. One LTX-2
        single file holds the DiT and the encoders: only the wanted models' tensors are read from it."""
        slots = ({"dit"} if denoiser else set()) | (set(ENCODER_SLOTS) if encoders else set())
        if encoders and tokenizer_config is None:
            tokenizer_config = _tokenizer_beside(model_configs)
        pipe = load_partial_pipeline(
            LTX2Pipeline,
            model_configs,
            slots,
            tokenizers=("tokenizer",) if encoders else (),
            optional=("vocoder",) if encoders else (),  # for validation samples' decoding
            name="LTX-2",
            tokenizer_config=tokenizer_config if encoders else None,
            torch_dtype=torch_dtype,
            device=device,
        )
        task_options.setdefault(
            "max_sequence_length", pipe.defaults.get("max_sequence_length", DEFAULT_MAX_SEQUENCE_LENGTH)
        )
        return cls(pipe, **task_options)

    def reference_arguments(self, images: Sequence[Any]) -> dict[str, Any]:
        """A validation sample's reference as the pipeline's `input_image` (its first frame)."""
        images = list(images)
        if len(images) > 1:
            raise ConfigError(f"{len(images)} reference images for one LTX-2 validation sample; it takes a first frame")
        return {"input_image": images[0]} if images else {}

    def prepare_dataset(self, dataset: Any) -> None:
        """Read what validation samples and the LoRA header follow from the run's dataset, before any step (so a
        `--sample_at_first` sample, a resumed run and every DDP process see the same): the clip length and frame
        rate of its first item (a row, or a cached sample), and the IC-LoRA factors of its rows (`rows`: the
        metadata; a row with `in_context_videos` trains at its `in_context_downsample_factor`, else the option's).
        A dataset without `rows` (a cache) leaves the factors to the batches trained."""
        if len(dataset) == 0:
            return
        first = dataset[0]
        if "video_shape" in first:  # a cached sample
            frames = (int(first["video_shape"][0]) - 1) * self.temporal_compression + 1
            rate = float(torch.as_tensor(first["frame_rate"]).flatten()[0])
        else:
            video = first.get("video", first.get("image"))
            frames = int(video.shape[1]) if isinstance(video, torch.Tensor) and video.dim() == 4 else 1
            rate = _frame_rate(0, first)
        self.clip = {"num_frames": frames, "frame_rate": rate}
        rates_batch_apart(dataset)
        rows = getattr(dataset, "rows", None)
        if rows is None:
            return
        factors = set()
        for i, row in enumerate(rows):
            value = row.get(IN_CONTEXT)
            if value is None or (isinstance(value, (str, list, tuple)) and not value):
                continue
            raw = row.get(FACTOR)
            unset = raw is None or (isinstance(raw, str) and not raw.strip())
            factors.add(self.in_context_downsample_factor if unset else _factor(raw, f"row {i}: {FACTOR} "))
        self.reference_factors, self.factors_from_data = factors, True

    @property
    def validation_factor(self) -> int:
        """The reference factor of validation samples: the one the rows trained at (when they agree), else the
        `in_context_downsample_factor` option's."""
        if len(self.reference_factors) == 1:
            return next(iter(self.reference_factors))
        return self.in_context_downsample_factor

    @property
    def sample_fps(self) -> float:
        """The rate validation videos play at: the last batch's (the pipeline's 24 before any)."""
        return float(self.clip.get("frame_rate", DEFAULT_FRAME_RATE))

    def sample(self, denoiser: nn.Module, prompts: Sequence[str], *, seed: int, references=None, **options: Any):
        """The pipeline's `(frames, (waveform, sample_rate))` with `denoiser` as the DiT, guidance off (cfg 1,
        STG 0, modality isolation 1), as many frames at the frame rate of the last batch trained (the pipeline's
        121 at 24 fps before any) unless `options` say otherwise, prompts padded to this task's length."""
        for name, value in (("cfg_scale", 1.0), ("stg_scale", 0.0), ("modality_scale", 1.0), *self.clip.items()):
            options.setdefault(name, value)
        options.setdefault("max_sequence_length", self.max_sequence_length)
        if self.validation_ic_video is not None:
            options.setdefault("in_context_videos", self.validation_ic_video)
            options.setdefault(FACTOR, self.validation_factor)
        drawn = super().sample(denoiser, prompts, seed=seed, references=references, **options)
        return [(frames, (sound.waveform, sound.sample_rate)) for frames, sound in drawn]

    # ------------------------------------------------------------------ the protocol
    def encode(self, rows: list[Mapping[str, Any]]) -> list[dict[str, torch.Tensor]]:
        """`"latents"` `[F'H'W' + L, 128]` and the prompt's contexts per row (see the module docstring)."""
        pipe = self.pipe
        missing = [s for s in ("vae", "audio_vae", "connectors", "text_encoder") if getattr(pipe, s) is None]
        if missing:
            raise ConfigError(
                f"this LTX-2 training task was built without {missing} (encoders=False): it cannot encode"
            )
        videos = [self._video(i, row) for i, row in enumerate(rows)]
        text = pipe.encode_prompt([str(row["prompt"]) for row in rows], self.max_sequence_length)
        mask = text.mask if text.mask is not None else torch.ones(text.video.shape[:2], device=text.video.device)
        samples = []
        for i, (row, video) in enumerate(zip(rows, videos, strict=True)):
            frame_rate = _frame_rate(i, row)
            latents = pipe.vae.encode(video[None].to(pipe.device, module_dtype(pipe.vae))).float()
            frames = video.shape[1]
            audio, weight = self._audio(i, row, frames, frame_rate)
            video_tokens, audio_tokens = pack_video(latents)[0], pack_latents(audio)[0]
            if video_tokens.shape[1] != audio_tokens.shape[1]:
                raise ConfigError(
                    f"the video VAE's latents have {video_tokens.shape[1]} channels but the audio VAE's tokens "
                    f"{audio_tokens.shape[1]} features: the two come from different models"
                )
            samples.append(
                {
                    **self._references(i, row, video),
                    "latents": torch.cat([video_tokens, audio_tokens.to(video_tokens.device)]),
                    "text_video": text.video[i].float(),
                    "text_audio": text.audio[i].float(),
                    "text_mask": mask[i].float(),
                    "video_shape": torch.tensor(latents.shape[2:], dtype=torch.int64),
                    "audio_shape": torch.tensor(audio.shape[1:], dtype=torch.int64),
                    "frame_rate": torch.tensor([frame_rate], dtype=torch.float32),
                    "audio_weight": torch.tensor([weight], dtype=torch.float32),
                }
            )
        return samples

    def _video(self, index: int, row: Mapping[str, Any]) -> torch.Tensor:
        """The row's video `[3, F, H, W]` (an image is one frame), checked against the VAE."""
        video = row_video(row, index, "LTX-2", self.pipe.vae.temporal_compression)
        sc = self.pipe.vae.spatial_compression
        height, width = video.shape[2:]
        if height % sc or width % sc:
            raise ConfigError(
                f"row {index}: the video is {width}x{height}; LTX-2 needs multiples of {sc} (--height/--width or "
                f"--bucket_step {sc})"
            )
        return video

    def _references(self, index: int, row: Mapping[str, Any], video: torch.Tensor) -> dict[str, torch.Tensor]:
        """The row's IC-LoRA reference videos encoded as `in_context.encode_references` encodes them for a clip
        of `video`'s size and length (tokens, latent grids, factor; see the module docstring), or nothing."""
        value = row.get(IN_CONTEXT)
        if value is None or (isinstance(value, (str, list, tuple)) and not value):
            return {}
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        paths = [item for item in items if isinstance(item, (str, Path))]
        if paths:
            raise ConfigError(
                f"row {index}: {IN_CONTEXT} is the path {str(paths[0])!r}, not a loaded video; add {IN_CONTEXT} "
                f"to --data_file_keys (e.g. --data_file_keys video,{IN_CONTEXT})"
            )
        raw = row.get(FACTOR)
        unset = raw is None or (isinstance(raw, str) and not raw.strip())
        factor = self.in_context_downsample_factor if unset else _factor(raw, f"row {index}: {FACTOR} ")
        pipe = self.pipe
        frames, (height, width), m = video.shape[1], video.shape[2:], pipe.vae.spatial_compression
        if height % factor or width % factor or (height // factor) % m or (width // factor) % m:
            raise ConfigError(
                f"row {index}: {FACTOR}={factor} does not divide the {width}x{height} clip into a reference of "
                f"multiples of {m} (the video VAE's); use a factor that does (e.g. 1), or --height/--width that "
                f"are multiples of {m * factor}"
            )
        pipe.load_models_to_device(["vae"])
        tokens, grids = [], []
        for item in items:
            fitted = reference_frames(
                _frames(index, item), height // factor, width // factor, frames, pipe.vae.temporal_compression
            )
            pixels = pil_to_tensor(fitted, dtype=module_dtype(pipe.vae), device=pipe.device)  # [F, 3, h, w]
            latent = pipe.vae.encode(pixels.transpose(0, 1)[None]).float()
            tokens.append(pack_video(latent)[0])
            grids.append(list(latent.shape[2:]))
        return {
            "reference_tokens": torch.cat(tokens),
            "reference_grid": torch.tensor(grids, dtype=torch.int64),
            "reference_factor": torch.tensor([factor], dtype=torch.int64),
        }

    def _audio(self, index: int, row: Mapping[str, Any], frames: int, frame_rate: float) -> tuple[torch.Tensor, float]:
        """The row's normalised audio latents `[1, C, L, M]` and its loss weight (0: no sound; zero latents)."""
        pipe = self.pipe
        config = pipe.audio_vae.config
        shape = pipe.audio_latent_shape(1, frames, frame_rate)  # checked against the DiT when it is loaded
        waveform = self._waveform(index, row)
        if waveform is None:
            return torch.zeros(shape, device=pipe.device), 0.0
        rate = row.get("audio_sample_rate") or config.sample_rate
        return pipe.encode_audio(waveform, int(rate), frames, frame_rate, shape[2]), 1.0

    def _waveform(self, index: int, row: Mapping[str, Any]) -> torch.Tensor | None:
        """The row's sound `[channels, samples]` float32, or None (no sound, an image, or `with_audio="none"`)."""
        value = row.get("audio")
        if isinstance(value, (str, Path)) and str(value).strip():
            raise ConfigError(
                f"row {index}: audio is the path {str(value)!r}, not a loaded waveform; add audio to "
                "--data_file_keys (e.g. --data_file_keys video,audio)"
            )
        if isinstance(value, str) or value is None or self.with_audio == "none":
            if self.with_audio == "required":
                raise ConfigError(
                    f"row {index} (prompt {str(row.get('prompt'))[:60]!r}) has no sound, and with_audio='required': "
                    "give it an audio column or a video with an audio track, or use with_audio='auto' to train "
                    "such clips on their video alone"
                )
            return None
        waveform = torch.as_tensor(value, dtype=torch.float32)
        if waveform.dim() == 1:
            waveform = waveform[None]
        if waveform.dim() != 2 or waveform.shape[0] not in (1, 2) or waveform.shape[1] == 0:
            raise ConfigError(
                f"row {index}: audio must be a mono or stereo waveform [channels, samples], got {tuple(waveform.shape)}"
            )
        return waveform

    def collate(self, samples: list[Mapping[str, torch.Tensor]]) -> dict[str, Any]:
        """Stacked: the rows of one batch share their sizes and frame rate. Sets the sampler's token count and
        the clip length and frame rate of validation samples."""
        if len({REFERENCE_KEYS[0] in s for s in samples}) > 1:
            raise ConfigError(
                f"an LTX-2 batch mixes rows with and without {IN_CONTEXT}: give every row of the dataset a control "
                "video, or use --batch_size 1"
            )
        keys = ["latents", "video_shape", "audio_shape", "text_video", "frame_rate"]
        if REFERENCE_KEYS[0] in samples[0]:
            keys += ["reference_factor", "reference_grid"]  # the factor first: it sets the grids too
        for key in keys:
            values = {
                tuple(s[key].flatten().tolist())
                if s[key].dim() == 1 or key == "reference_grid"
                else tuple(s[key].shape)
                for s in samples
            }
            if len(values) > 1 and key == "reference_factor":
                raise ConfigError(
                    f"an LTX-2 batch mixes IC-LoRA reference factors {sorted(v[0] for v in values)} (the rows' "
                    f"{FACTOR} column, else --task_options {FACTOR}=): give every row of a batch one factor, or "
                    "use --batch_size 1"
                )
            if len(values) > 1:
                raise ConfigError(
                    f"an LTX-2 batch mixes {key} {sorted(values)}: give every row of a batch one size, frame count "
                    "and frame rate (--num_frames, --height/--width, a frame_rate column), or use --batch_size 1"
                )
        batch = {key: torch.stack([s[key] for s in samples]) for key in samples[0]}
        self.scheduler.tokens = int(torch.prod(samples[0]["video_shape"]))
        frames = (int(samples[0]["video_shape"][0]) - 1) * self.temporal_compression + 1
        self.clip = {"num_frames": frames, "frame_rate": float(samples[0]["frame_rate"][0])}
        return batch

    def draw_choices(self, batch: Mapping[str, Any], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """With a first-frame probability, the authors' one draw per batch: whether all its rows train from their
        first frame (`"first_frame"`, one bool per row); nothing otherwise."""
        if not 0.0 < self.first_frame_p < 1.0:
            return {}
        drawn = torch.rand((), generator=generator) < self.first_frame_p
        return {"first_frame": drawn.expand(batch["latents"].shape[0]).clone()}

    def velocity(
        self, dit: nn.Module, batch: Mapping[str, Any], noisy_latents: torch.Tensor, sigma: torch.Tensor
    ) -> torch.Tensor:
        f, h, w = (int(v) for v in batch["video_shape"][0])
        mel_bins = int(batch["audio_shape"][0][2])
        split = f * h * w
        video = unpack_video(noisy_latents[:, :split], f, h, w)
        audio = unpack_latents(noisy_latents[:, split:], mel_bins)
        device = noisy_latents.device
        text = LTX2Text(batch["text_video"].to(device), batch["text_audio"].to(device), batch["text_mask"].to(device))
        silent = tuple(i for i, weight in enumerate(batch["audio_weight"][:, 0].tolist()) if weight == 0)
        skips = [AttentionSkip("a2v", None, silent)] if silent else []
        frame_rate = float(batch["frame_rate"][0, 0])
        denoise_mask = None
        given = self._conditioned(batch, f)
        if given is not None:  # the clean first frame in place, at timestep 0 token by token
            given = given.to(device)[:, None, None, None, None]
            clean = unpack_video(batch["latents"][:, : h * w].to(device, video.dtype), 1, h, w)
            video = torch.cat([torch.where(given, clean, video[:, :, :1]), video[:, :, 1:]], dim=2)
            denoise_mask = torch.ones(video.shape[0], 1, f, h, w, device=device)
            denoise_mask[:, :, :1] = (~given).float()
        references = None
        if REFERENCE_KEYS[0] in batch:  # IC-LoRA: clean tokens after the video's, not returned
            grid, factor = batch["reference_grid"][0].tolist(), int(batch["reference_factor"][0, 0])
            if not self.factors_from_data:
                self.reference_factors.add(factor)
            coords = reference_positions(dit.config, grid, factor, frame_rate, device)
            references = LTX2Keyframes(batch["reference_tokens"].to(device), coords)
        v_video, v_audio = ltx2_velocity(
            dit, video, audio, sigma, text, frame_rate, denoise_mask=denoise_mask, skips=skips, keyframes=references
        )
        return torch.cat([pack_video(v_video), pack_latents(v_audio)], dim=1)

    def lora_metadata(self) -> dict[str, str]:
        """The trained IC-LoRA's `reference_downscale_factor` for its file's header (the authors' key, which the
        pipeline reads, so the LoRA samples at the factor it was trained at); nothing for a plain LoRA, or when rows
        trained at several factors (then give `in_context_downsample_factor=` when sampling)."""
        from .in_context import METADATA_KEY

        if len(self.reference_factors) == 1:
            return {METADATA_KEY: str(next(iter(self.reference_factors)))}
        if self.reference_factors:
            logger.warning(
                "the IC-LoRA trained at several in_context_downsample_factor values %s: its file declares none",
                sorted(self.reference_factors),
            )
        return {}

    def _conditioned(self, batch: Mapping[str, Any], latent_frames: int) -> torch.Tensor | None:
        """Which rows `[B]` (bool) of a batch of `latent_frames` train from their first frame, None for none: all
        with `first_frame` true, the batch's draw (`"first_frame"`) with a probability; a one-frame clip trains
        as an image."""
        if latent_frames <= 1 or self.first_frame_p == 0.0:
            return None
        rows = batch.get("first_frame")
        if rows is None:
            if self.first_frame_p < 1.0:
                raise ConfigError(
                    f"first_frame={self.first_frame} draws per batch (draw_choices, which the trainer calls); this "
                    "batch has no draw"
                )
            return torch.ones(batch["latents"].shape[0], dtype=torch.bool)
        rows = rows.bool().cpu()
        return rows if rows.any() else None

    def loss_mask(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Per-token weights `[B, tokens, 1]`: 1 / (video elements) on the video, `audio_weight` / (audio
        elements) on the audio, so each stream's error counts as its own mean (see the module docstring); 0 on
        a given first frame."""
        latents = batch["latents"]
        f, h, w = (int(v) for v in batch["video_shape"][0])
        split, channels = f * h * w, latents.shape[2]
        rows = self._conditioned(batch, f)
        given = torch.zeros(latents.shape[0], 1, dtype=torch.float64)  # weights in float64 on the CPU, then cast
        if rows is not None:
            given = rows.double()[:, None] * (h * w)
        audio_tokens = latents.shape[1] - split
        mask = torch.empty(latents.shape[0], latents.shape[1], 1, device=latents.device)
        index = torch.arange(split, dtype=torch.float64)[None]
        mask[:, :split, 0] = torch.where(index < given, 0.0, 1.0 / ((split - given) * channels)).to(mask)
        mask[:, split:] = batch["audio_weight"].to(latents.device)[:, :, None] / (audio_tokens * channels)
        return mask


def reference_positions(config, grid: Sequence[Sequence[int]], factor: int, fps: float, device=None) -> torch.Tensor:
    """`[1, 3, K, 2]` positions of reference videos with latent grids `grid` ((f, h, w) each, in order): each
    its own `video_positions` at the clip's `fps`, rows and columns scaled by `factor` onto the clip's grid (as
    `in_context.encode_references` places them)."""
    coords = [video_positions(config, 1, *(int(n) for n in shape), fps, device) for shape in grid]
    coords = torch.cat(coords, dim=2)
    coords[:, 1:] *= factor
    return coords


def _factor(value: Any, where: str) -> int:
    """An IC-LoRA downscale factor: an integer >= 1 (a CSV cell's "2" too), else an error naming `where`."""
    number = value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value
    if isinstance(number, str):
        try:
            number = float(number.strip())
        except ValueError:
            pass
    if isinstance(number, float) and number.is_integer():
        number = int(number)
    if isinstance(number, bool) or not isinstance(number, int) or number < 1:
        raise ConfigError(f"{where}{value!r} is not accepted; use an integer >= 1 (e.g. 2: a half-size reference)")
    return number


def _frames(index: int, item: Any) -> list:
    """One reference video as PIL frames: the dataset's `[3, F, H, W]` in [-1, 1] (`[3, H, W]`: one frame), or
    a list of frames as the pipeline takes them."""
    if isinstance(item, torch.Tensor):
        if item.dim() == 3:
            item = item[:, None]
        if item.dim() != 4 or item.shape[0] != 3 or item.shape[1] == 0:
            raise ConfigError(f"row {index}: each {IN_CONTEXT} video must be [3, F, H, W], got {tuple(item.shape)}")
        return tensor_to_pil(item.transpose(0, 1))
    return item  # `reference_frames` refuses what is not a video


def _control_videos(value: str | Sequence[str] | None) -> list[str] | None:
    """`validation_ic_video` as a list of existing files: a path (several joined by "|"), or a list."""
    if value is None:
        return None
    where = "--task_options validation_ic_video"
    items = value.split("|") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items or not all(isinstance(v, (str, Path)) for v in items):
        raise ConfigError(f"{where}={value!r}: give a control video file (several joined by '|'), or a list of them")
    paths = [str(v).strip() for v in items]
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise ConfigError(
            f"{where}: no such file {missing[0]!r} (relative paths are read against the working directory "
            f"{Path.cwd()}); give the control video (e.g. an .mp4) the validation samples follow"
        )
    return paths


def rates_batch_apart(dataset: Any) -> None:
    """Samples of different frame rates never share a batch (`collate` stacks one rate, and would stop the run at
    the first mixed batch): where the dataset holds several rates, each sample's joins its `batch_keys`."""
    rates = sample_rates(dataset)
    if rates is None or len(set(rates)) < 2:
        return
    dataset.batch_keys = [(*key, rate) for key, rate in zip(dataset.batch_keys, rates, strict=True)]
    logger.info("LTX-2: the clips' frame rates %s batch apart", sorted(set(rates)))


def sample_rates(dataset: Any) -> list[float] | None:
    """Each sample's frame rate, as the dataset gives it (`fps`, a row's `frame_rate` column, else its video's
    header) or a cached sample holds it; None for a dataset of another kind."""
    if hasattr(dataset, "parts"):  # several datasets (--dataset_config), one after the other
        rates = [sample_rates(part) for part in dataset.parts]
        return None if None in rates else [rate for part in rates for rate in part]
    if hasattr(dataset, "sample_rows") and hasattr(dataset, "rows"):
        per_row = [_row_rate(dataset, i) for i in range(len(dataset.rows))]
        return [per_row[i] for i in dataset.sample_rows]
    if hasattr(dataset, "files"):  # an encoded cache
        from safetensors import safe_open

        rates = []
        for path in dataset.files:
            with safe_open(str(path), framework="pt") as f:
                rates.append(float(f.get_tensor("frame_rate").flatten()[0]) if "frame_rate" in f.keys() else None)
        return None if None in rates else rates
    return None


def _row_rate(dataset: Any, index: int) -> float:
    """The frame rate a metadata row's samples are read at (as the dataset's `_add_sound` sets it)."""
    from diffsynth.runtime.media import VIDEO_SUFFIXES
    from diffsynth.training.data import reading, video_frame_rate

    row = dataset.rows[index]
    where = f"{dataset.metadata} row {index + 1}"
    main = next((k for k in dataset.media if row.get(k)), None)
    video = row.get(main)
    if not isinstance(video, str) or Path(video).suffix.lower() not in VIDEO_SUFFIXES:
        return _frame_rate(index, row)  # a picture: it batches apart from the clips anyway (one frame)
    if getattr(dataset, "fps", None) is not None:
        return float(dataset.fps)
    if row.get("frame_rate") not in (None, ""):
        try:
            return _frame_rate(index, row)
        except ConfigError as error:
            raise ConfigError(f"{where}: {str(error).split(': ', 1)[-1]}") from None
    with reading(dataset.base / video, f"{where} column {main}"):
        return video_frame_rate(dataset.base / video)


def _frame_rate(index: int, row: Mapping[str, Any]) -> float:
    """The row's `frame_rate` column (the dataset's: else the video file's), else 24."""
    value = row.get("frame_rate")
    if value is None or (isinstance(value, str) and not value.strip()):
        return DEFAULT_FRAME_RATE
    try:
        rate = float(value.item() if isinstance(value, torch.Tensor) else value)
    except (TypeError, ValueError):
        rate = float("nan")
    if not math.isfinite(rate) or rate <= 0:
        raise ConfigError(f"row {index}: frame_rate {value!r} is not a positive number of frames per second")
    return rate


def _tokenizer_beside(model_configs: Sequence[ModelConfig]) -> ModelConfig | None:
    """Gemma's tokenizer files beside its weights (the hub repo's layout), or in a `tokenizer/` folder there."""
    for config in model_configs:
        for path in [config.path] if isinstance(config.path, str) else list(config.path or ()):
            base = Path(path) if Path(path).is_dir() else Path(path).parent
            for folder in (base, base / "tokenizer", base.parent / "tokenizer"):
                if (folder / "tokenizer_config.json").is_file():
                    return ModelConfig(path=str(folder))
    return None


__all__ = ["LTX2TimestepSampler", "LTX2TrainingTask", "reference_positions"]
