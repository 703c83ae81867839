"""`LTX2Pipeline`: LTX-2 text-to-video with synchronised audio.

Stages: encode prompts (Gemma-3 hidden states of every layer -> the text connectors, one context per
stream) -> prepare latents (seeded noise for the video `[B, 128, 1 + (F-1)/8, H/32, W/32]` and the audio
`[B, 8, L, 16]`, drawn in that order from one generator) -> denoise (Euler on the `ltx2` schedule; CFG
batched with the conditional pass, with its own scale per stream and an optional rescale) -> decode
(video VAE; audio VAE to a mel spectrogram, then the vocoder to a waveform).
`ltx2_velocity` is the per-step model call; a trainer reuses it.

The audio stream covers the video's duration: `L = round(F / frame_rate * 25)` latent frames (16 kHz mel,
hop 160, 4x compressed). The schedule follows the authors' pipelines, which shift it as if the video
had 4096 tokens whatever its size (diffusers shifts by the real token count; pass `sigmas=` to choose).
The authors' two other guidance terms (STG, which perturbs block 29, and modality isolation) need
DiT hooks we do not have yet and are not applied.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.media import tensor_to_output
from diffsynth.runtime.pipeline import BasePipeline
from diffsynth.runtime.schedulers import FlowMatchScheduler
from diffsynth.runtime.vram import module_dtype

from .audio_vae import pack_latents, unpack_latents
from .dit import audio_positions, video_positions

logger = logging.getLogger(__name__)

DEFAULT_STEPS = 40  # ltx-pipelines LTX_2_PARAMS (full model)
DEFAULT_CFG = 3.0
DEFAULT_AUDIO_CFG = 7.0
DEFAULT_RESCALE = 0.7
DEFAULT_FRAME_RATE = 24.0
DEFAULT_MAX_SEQUENCE_LENGTH = 1024  # Gemma prompts are left-padded to this many tokens
GEMMA_REPO = "google/gemma-3-12b-it-qat-q4_0-unquantized"
SCHEDULE_TOKENS = 4096  # the authors call LTX2Scheduler without a latent: the shift of 4096 tokens
TIMESTEP_SCALE = 1000.0


@dataclass
class LTX2Text:
    """What the DiT reads of a prompt batch: connector outputs `[B, L, 3840]` per stream and their mask
    `[B, L]` (1 = keep), or None when every token is kept."""

    video: torch.Tensor
    audio: torch.Tensor
    mask: torch.Tensor | None = None

    def cat(self, other: LTX2Text) -> LTX2Text:
        """This batch followed by `other` (prompts, then negative prompts)."""
        if self.video.shape[1:] != other.video.shape[1:]:
            raise ConfigError(
                f"prompt and negative prompt contexts differ in shape ({tuple(self.video.shape[1:])} vs "
                f"{tuple(other.video.shape[1:])}); both are padded to max_sequence_length"
            )
        masks = (self.mask, other.mask)
        if any(m is None for m in masks) and any(m is not None for m in masks):
            masks = tuple(
                m if m is not None else torch.ones(t.shape[:2], device=t.device)
                for m, t in zip(masks, (self.video, other.video), strict=True)
            )
        mask = None if masks[0] is None else torch.cat([masks[0].to(masks[1].dtype), masks[1]])
        return LTX2Text(torch.cat([self.video, other.video]), torch.cat([self.audio, other.audio]), mask)


def pack_video(latents: torch.Tensor) -> torch.Tensor:
    """Video latents `[B, C, F, H, W]` -> DiT tokens `[B, F * H * W, C]` (frame, row, column order)."""
    return latents.flatten(2).transpose(1, 2)


def unpack_video(tokens: torch.Tensor, frames: int, height: int, width: int) -> torch.Tensor:
    return tokens.transpose(1, 2).unflatten(2, (frames, height, width))


def ltx2_velocity(
    dit,
    video: torch.Tensor,
    audio: torch.Tensor,
    sigma: torch.Tensor | float,
    text: LTX2Text,
    frame_rate: float = DEFAULT_FRAME_RATE,
    audio_sigma: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flow velocities (noise - clean), float32, of video latents `[B, 128, f, h, w]` and audio latents
    `[B, C, L, M]` at noise level `sigma` (scalar or `[B]`; `audio_sigma` defaults to it).

    `text` comes from `LTX2Pipeline.encode_prompt`; `frame_rate` places the video tokens in time (RoPE),
    so it must be the rate the frames will be played at. Computation runs in the DiT's dtype.
    """
    dtype = module_dtype(dit)
    b, _, f, h, w = video.shape
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=video.device).reshape(-1).expand(b)
    audio_t = None
    if audio_sigma is not None:
        audio_sigma = torch.as_tensor(audio_sigma, dtype=torch.float32, device=video.device).reshape(-1).expand(b)
        audio_t = audio_sigma * TIMESTEP_SCALE
    cfg = dit.config
    mask = text.mask
    v_video, v_audio = dit(
        pack_video(video).to(dtype),
        pack_latents(audio).to(dtype),
        text.video.to(dtype),
        text.audio.to(dtype),
        sigma * TIMESTEP_SCALE,
        audio_timestep=audio_t,
        video_context_mask=mask,
        audio_context_mask=mask,
        video_coords=video_positions(cfg, b, f, h, w, float(frame_rate), video.device),
        audio_coords=audio_positions(cfg, b, audio.shape[2], video.device),
    )
    return unpack_video(v_video.float(), f, h, w), unpack_latents(v_audio.float(), audio.shape[3])


def rescale_guidance(guided: torch.Tensor, positive: torch.Tensor, factor: float) -> torch.Tensor:
    """Pull the guided prediction's per-sample standard deviation back towards the conditional one's
    (`factor` 0: unchanged, 1: fully rescaled), against the over-saturation strong CFG causes."""
    dims = tuple(range(1, guided.dim()))
    ratio = positive.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)
    return guided * (factor * ratio + (1 - factor))


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
    }
    size_multiple = 32  # the video VAE's spatial compression

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        cfg_scale: float | None = None,
        audio_cfg_scale: float | None = None,
        guidance_rescale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        frame_rate: float | None = None,
        seed: int | None = None,
        rand_device: str = "cpu",
        num_inference_steps: int | None = None,
        sigmas: Sequence[float] | torch.Tensor | None = None,
        use_distilled_pipeline: bool | None = None,
        latents: torch.Tensor | None = None,
        audio_latents: torch.Tensor | None = None,
        max_sequence_length: int | None = None,
        tiled: bool = False,
        tile_size: int | tuple[int, int] = 16,
        tile_stride: int | tuple[int, int] | None = None,
        output_type: str = "pil",
        progress_bar: bool = True,
    ):
        """Generate `(frames, audio)`.

        `frames` are, for one prompt, a list of PIL images (a list of such lists for a list of prompts);
        "np" gives `[B, F, H, W, 3]` and "pt" `[B, 3, F, H, W]`, floats in [0, 1]. `audio` is an
        `LTX2Audio` (waveforms `[B, 2, N]` in [-1, 1] and their `sample_rate`); for one prompt with
        "pil" its waveform is `[2, N]`. Write both with `diffsynth.runtime.media.mux_video_audio`.

        `num_frames` must be 8k + 1 and `height`/`width` multiples of 32: other values are rounded with a
        warning. `cfg_scale` guides the video stream and `audio_cfg_scale` the audio stream (1 = off; the
        authors' 3 and 7 by default, and the audio follows an explicit `cfg_scale` when not given itself);
        `guidance_rescale` in [0, 1] (default 0.7) pulls the guided prediction's spread back towards the
        conditional one's. `use_distilled_pipeline` runs the distilled model's fixed 8-step table without
        CFG. `latents` / `audio_latents` are the initial noise (`[B, 128, 1 + (F-1)/8, H/32, W/32]` and
        `[B, 8, L, 16]`); `sigmas` an explicit schedule (terminal 0 appended). `tiled`, `tile_size`, `tile_stride` (latent cells) go to the video VAE.
        """
        negative = self.setting("negative_prompt", negative_prompt, "")
        prompts, negatives = self.check_prompt_pair(prompt, negative)
        if output_type not in ("pil", "np", "pt"):
            raise ConfigError(f"output_type={output_type!r} is not accepted; use 'pil', 'np' or 'pt'")
        distilled = bool(self.setting("use_distilled_pipeline", use_distilled_pipeline, False))
        steps = self.setting("num_inference_steps", num_inference_steps, 8 if distilled else DEFAULT_STEPS)
        scale = float(self.setting("cfg_scale", cfg_scale, 1.0 if distilled else DEFAULT_CFG))
        if audio_cfg_scale is None:  # an explicit cfg_scale guides both streams unless audio_cfg_scale is given
            fallback = 1.0 if distilled else DEFAULT_AUDIO_CFG
            audio_cfg_scale = scale if cfg_scale is not None else self.defaults.get("audio_cfg_scale", fallback)
        audio_scale = float(audio_cfg_scale)
        rescale = float(self.setting("guidance_rescale", guidance_rescale, DEFAULT_RESCALE))
        if not 0.0 <= rescale <= 1.0:
            raise ConfigError(f"guidance_rescale={rescale!r} is not accepted; use a number in [0, 1]")
        fps = self.check_frame_rate(self.setting("frame_rate", frame_rate, DEFAULT_FRAME_RATE))
        max_len = self.setting("max_sequence_length", max_sequence_length, DEFAULT_MAX_SEQUENCE_LENGTH)
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
            raise ConfigError(f"max_sequence_length={max_len!r} is not accepted; use an integer >= 1")
        height, width = self.check_size(self.setting("height", height, 512), self.setting("width", width, 768))
        frames = self.check_num_frames(self.setting("num_frames", num_frames, 121))
        use_cfg = scale != 1.0 or audio_scale != 1.0

        # 1. prompts
        self.load_models_to_device(["text_encoder", "connectors"])
        text = self.encode_prompt(prompts, max_len)
        negative_text = self.encode_prompt(negatives, max_len) if use_cfg else None

        # 2. schedule and latents
        scheduler = FlowMatchScheduler("ltx2_distilled" if distilled else "ltx2")
        if distilled:
            scheduler.set_timesteps(steps, sigmas=sigmas)
        else:
            scheduler.set_timesteps(steps, sigmas=sigmas, image_seq_len=SCHEDULE_TOKENS)
        video, audio = self.prepare_latents(
            len(prompts), frames, height, width, fps, seed, rand_device, latents, audio_latents
        )

        # 3. denoise
        self.load_models_to_device(["dit"])
        both = text.cat(negative_text) if use_cfg else text
        for i in self.progress(range(len(scheduler.timesteps)), progress_bar):
            sigma = scheduler.sigmas[i]
            v_video, v_audio = self.predict(video, audio, sigma, both, fps, use_cfg, scale, audio_scale, rescale)
            video = scheduler.step(v_video, i, video)
            audio = scheduler.step(v_audio, i, audio)

        # 4. decode
        self.load_models_to_device(["vae"])
        pixels = self.vae.decode(
            video.to(module_dtype(self.vae)), tiled=tiled, tile_size=tile_size, tile_stride=tile_stride
        )
        frames_out = tensor_to_output(pixels.float(), output_type)
        waveform = self.decode_audio(audio)
        self.load_models_to_device([])
        single = isinstance(prompt, str) and output_type == "pil"
        sound = LTX2Audio(waveform[0] if single else waveform, self.sample_rate)
        return (frames_out[0] if single else frames_out), sound

    # ------------------------------------------------------------------ checks
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
    def check_frame_rate(frame_rate) -> float:
        ok = isinstance(frame_rate, (int, float)) and not isinstance(frame_rate, bool) and frame_rate > 0
        if not ok:
            raise ConfigError(f"frame_rate={frame_rate!r} is not accepted; use a positive number (frames per second)")
        return float(frame_rate)

    # ------------------------------------------------------------------ stages
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
        """`[B, C, L, M]` audio latents covering the video's `num_frames / frame_rate` seconds."""
        cfg = self.audio_vae.config
        length = max(1, round(num_frames / frame_rate * cfg.latents_per_second))
        shape = (batch, cfg.latent_channels, length, cfg.latent_mel_bins)
        if shape[1] * shape[3] != self.dit.config.audio_in_channels:
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
        self, batch, num_frames, height, width, frame_rate, seed, rand_device, latents=None, audio_latents=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Initial video and audio noise, float32. Drawn from one generator seeded with `seed` on
        `rand_device`, video first (the same values on any compute device, and as diffusers draws them
        from a generator on that device)."""
        tc, sc = self.vae.temporal_compression, self.vae.spatial_compression
        video_shape = (batch, self.dit.config.in_channels, (num_frames - 1) // tc + 1, height // sc, width // sc)
        audio_shape = self.audio_latent_shape(batch, num_frames, frame_rate)
        device = torch.device(rand_device)
        generator = None if seed is None else torch.Generator(device).manual_seed(int(seed))
        draws = []
        for given, shape, name in ((latents, video_shape, "latents"), (audio_latents, audio_shape, "audio_latents")):
            if given is not None:
                draws.append(self._check_initial(given, shape, name))
            else:
                noise = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
                draws.append(noise.to(self.device))
        return draws[0], draws[1]

    def _check_initial(self, latents, expected, name: str) -> torch.Tensor:
        if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != tuple(expected):
            got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ConfigError(f"{name} must be a tensor of shape {tuple(expected)}, got {got}")
        return latents.to(device=self.device, dtype=torch.float32)

    def predict(self, video, audio, sigma, text: LTX2Text, fps, use_cfg, scale, audio_scale, rescale):
        """Guided velocities; with CFG the conditional and unconditional passes run as one batch."""
        if not use_cfg:
            return ltx2_velocity(self.dit, video, audio, sigma, text, fps)
        v_video, v_audio = ltx2_velocity(
            self.dit, torch.cat([video, video]), torch.cat([audio, audio]), sigma, text, fps
        )
        b = video.shape[0]
        return (
            self._guide(video, v_video[:b], v_video[b:], sigma, scale, rescale),
            self._guide(audio, v_audio[:b], v_audio[b:], sigma, audio_scale, rescale),
        )

    def _guide(self, x, positive, negative, sigma, scale, rescale) -> torch.Tensor:
        if rescale == 0.0:
            return self.guide(positive, negative, scale)
        # rescaling acts on the predicted clean latents (x0 = x - sigma * v), as the authors and diffusers do
        sigma = float(sigma)
        x = x.float()
        x0_pos, x0_neg = x - sigma * positive, x - sigma * negative
        guided = rescale_guidance(self.guide(x0_pos, x0_neg, scale), x0_pos, rescale)
        return (x - guided) / sigma

    def decode_audio(self, audio: torch.Tensor) -> torch.Tensor:
        """Audio latents -> waveforms `[B, channels, samples]` (float32): the audio VAE gives a mel
        spectrogram, the vocoder turns it into sound."""
        self.load_models_to_device(["audio_vae", "vocoder"])
        mel = self.audio_vae.decode(audio.to(module_dtype(self.audio_vae)))
        return self.vocoder(mel.to(module_dtype(self.vocoder))).float()


@dataclass
class LTX2Audio:
    """Generated sound: `waveform` `[2, N]` (or `[B, 2, N]` for a batch) in [-1, 1] at `sample_rate` Hz."""

    waveform: torch.Tensor
    sample_rate: int

    def __iter__(self):  # `waveform, sample_rate = audio`
        return iter((self.waveform, self.sample_rate))
