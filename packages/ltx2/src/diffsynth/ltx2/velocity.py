"""The LTX-2 DiT's per-step call, shared by the pipeline, its samplers and the trainer: `ltx2_velocity`
and what it reads (`LTX2Text` prompt contexts, `LTX2Keyframes` clean condition tokens, packing of video
latents to tokens). It lives apart from `LTX2Pipeline` so that the modules the pipeline uses (guidance,
Dub-It, in-context references) can call the model without importing the pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.vram import module_dtype

from .audio_vae import pack_latents, unpack_latents
from .dit import AttentionSkip, audio_positions, video_positions

DEFAULT_FRAME_RATE = 24.0
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


@dataclass
class LTX2Keyframes:
    """Clean tokens the DiT reads after the video's own: keyframes' (normalised latents of the images,
    packed, at their frames) and IC-LoRA references' (`in_context.py`), `tokens` `[1, K, 128]` with their
    positions `coords` `[1, 3, K, 2]`. They are seen at timestep 0 and never stepped; only the video's tokens
    come back from the model call."""

    tokens: torch.Tensor
    coords: torch.Tensor

    def __len__(self) -> int:
        return self.tokens.shape[1]

    @staticmethod
    def join(first: LTX2Keyframes | None, tokens: torch.Tensor | None, coords: torch.Tensor | None):
        """`first` with `tokens` at `coords` after its own (either may be absent)."""
        if tokens is None:
            return first
        if first is None:
            return LTX2Keyframes(tokens, coords)
        return LTX2Keyframes(torch.cat([first.tokens, tokens], dim=1), torch.cat([first.coords, coords], dim=2))


@dataclass
class LTX2AudioCondition:
    """A given sound: its normalised latents `[1, C, L, M]`, the mask `[1, 1, L, 1]` of the latent frames
    to re-make (0 = kept as given) and, when it is kept whole, the waveform `[2, N]` and its rate to return."""

    latents: torch.Tensor
    mask: torch.Tensor
    waveform: torch.Tensor | None = None
    sample_rate: int | None = None


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
    denoise_mask: torch.Tensor | None = None,
    skips: Sequence[AttentionSkip] = (),
    keyframes: LTX2Keyframes | None = None,
    audio_denoise_mask: torch.Tensor | None = None,
    audio_references: LTX2Keyframes | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flow velocities (noise - clean), float32, of video latents `[B, 128, f, h, w]` and audio latents
    `[B, C, L, M]` at noise level `sigma` (scalar or `[B]`; `audio_sigma` defaults to it).

    `text` comes from `LTX2Pipeline.encode_prompt`; `frame_rate` places the video tokens in time (RoPE),
    so it must be the rate the frames will be played at. `denoise_mask` (`[1 or B, 1, f, h, w]`, 1 = being
    denoised, 0 = a clean conditioning latent such as image-to-video's first frame) scales each video
    token's timestep, so the DiT sees the given frames as clean. `skips` (`AttentionSkip`) switch DiT
    attentions off for some rows (STG / modality isolation). `keyframes` (`LTX2Keyframes`) are clean tokens
    appended to the video's, at timestep 0, for keyframe conditioning. `audio_denoise_mask` (`[1 or B, 1, L,
    1]`, 0 = a given, clean audio latent frame) does for the audio what `denoise_mask` does for the video.
    `audio_references` (tokens `[1, K, C * M]`, positions `[1, 1, K, 2]`) are clean audio tokens appended to the
    audio's at timestep 0, as `keyframes` are to the video's (Dub-It's reference sound, `dubit.py`).
    Computation runs in the DiT's dtype.
    """
    dtype = module_dtype(dit)
    b, _, f, h, w = video.shape
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=video.device).reshape(-1).expand(b)
    video_t = sigma * TIMESTEP_SCALE
    audio_t = video_t
    if audio_sigma is not None:
        audio_sigma = torch.as_tensor(audio_sigma, dtype=torch.float32, device=video.device).reshape(-1).expand(b)
        audio_t = audio_sigma * TIMESTEP_SCALE
    if denoise_mask is not None:  # per-token timesteps [B, f * h * w]
        video_t = video_t[:, None] * denoise_mask.to(video.device, torch.float32).expand(b, 1, f, h, w).flatten(1)
    if audio_denoise_mask is not None:  # per-token [B, L]
        audio_mask = audio_denoise_mask.to(video.device, torch.float32).expand(b, 1, audio.shape[2], 1)
        audio_t = audio_t[:, None] * audio_mask.flatten(1)
    cfg = dit.config
    mask = text.mask
    tokens, coords = pack_video(video), video_positions(cfg, b, f, h, w, float(frame_rate), video.device)
    if keyframes is not None:  # clean tokens after the video's: timestep 0, their own positions
        video_t = video_t[:, None].expand(b, f * h * w) if video_t.dim() == 1 else video_t
        video_t = torch.cat([video_t, video_t.new_zeros(b, len(keyframes))], dim=1)
        tokens = torch.cat([tokens, keyframes.tokens.to(tokens).expand(b, -1, -1)], dim=1)
        coords = torch.cat([coords, keyframes.coords.to(coords).expand(b, -1, -1, -1)], dim=2)
    extra = {}
    if cfg.keyframes_abs_pos_embedding:  # LTX-2.5: the first latent frame holds one pixel frame, as a keyframe does
        marked = torch.zeros(b, tokens.shape[1], device=video.device)
        marked[:, : h * w] = 1.0  # ltx-core marks it always; appended condition tokens are not marked
        extra["keyframes_mask"] = marked
    audio_tokens, audio_coords = pack_latents(audio), audio_positions(cfg, b, audio.shape[2], video.device)
    if audio_references is not None:  # clean tokens after the audio's: timestep 0, their own positions
        audio_t = audio_t[:, None].expand(b, audio.shape[2]) if audio_t.dim() == 1 else audio_t
        audio_t = torch.cat([audio_t, audio_t.new_zeros(b, len(audio_references))], dim=1)
        audio_tokens = torch.cat([audio_tokens, audio_references.tokens.to(audio_tokens).expand(b, -1, -1)], dim=1)
        audio_coords = torch.cat([audio_coords, audio_references.coords.to(audio_coords).expand(b, -1, -1, -1)], dim=2)
    v_video, v_audio = dit(
        tokens.to(dtype),
        audio_tokens.to(dtype),
        text.video.to(dtype),
        text.audio.to(dtype),
        video_t,
        audio_timestep=audio_t,
        video_context_mask=mask,
        audio_context_mask=mask,
        video_coords=coords,
        audio_coords=audio_coords,
        skips=skips,
        **extra,
    )
    v_video, v_audio = v_video[:, : f * h * w], v_audio[:, : audio.shape[2]]
    return unpack_video(v_video.float(), f, h, w), unpack_latents(v_audio.float(), audio.shape[3])


def repeat_conditions(conditions: dict, n: int) -> dict:
    """The model call's conditions for a batch repeated `n` times (per-sample masks repeated with it)."""
    masks = ("denoise_mask", "audio_denoise_mask")
    return {
        k: torch.cat([v] * n) if k in masks and v is not None and v.shape[0] > 1 else v for k, v in conditions.items()
    }
