"""Wan2.2-S2V-14B: the speech-to-video DiT (a talking / singing person from one image, an audio track and a prompt).

The S2V DiT is a Wan 2.1-style text-to-video DiT (same blocks, same key names: `blocks.N.self_attn.q`, ...) whose
token sequence is the noisy video, then the reference image's tokens, then FramePack tokens of the frames
generated before (the "motion" frames of the previous clip), each kind marked by a learned embedding
(`trainable_cond_mask`: 0 video, 1 reference, 2 motion). The reference and motion tokens are modulated with the
embedding of timestep 0 (`zero_timestep`), the video's with the current one, and only the video tokens reach the
head. RoPE places the reference at frame 30 and the motion tokens at negative frames (-1 for the newest latent
frame, -3 for the 2x-compressed pair, -19..-4 for the 4x-compressed 16), with the spatial positions of compressed
tokens spread over the full grid, as the authors' `rope_precompute` samples them.

Audio: wav2vec2 hidden states of every layer (`audio_encoder.py`), one vector per video frame, are mixed by
learned layer weights and turned into per-latent-frame tokens by `casual_audio_encoder` (causal 1-D convolutions
that downsample time 4x; `num_audio_token` local tokens plus a padding token, and one global vector). After the
blocks listed in `audio_inject_layers`, each latent frame's video tokens attend to that frame's audio tokens
(`audio_injector.injector.K`, a Wan cross-attention) after an adaptive LayerNorm driven by the global vector
(`audio_injector.injector_adain_layers.K`), and the result is added to the residual stream.

An optional pose video's latent enters through `cond_encoder` (added to the patch embedding; without a pose the
authors add the embedding of zeros, i.e. its bias, and so do we).

Module names are the authors' (`wan/modules/s2v/model_s2v.py`, including their spelling `casual_audio_encoder`), so
the official `diffusion_pytorch_model-*.safetensors` loads strictly. The 14B model uses FramePack for the motion
frames (`enable_framepack`), not the authors' alternative motion transformer, which is not built here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.layers import MultiAxisRope, rope_tables

from .dit import (
    CrossAttention,
    Head,
    WanBackboneConfig,
    WanBlock,
    add_input_layers,
    backbone_fields,
    text_tokens,
    time_modulation,
)

REFERENCE_FRAME = 30  # the RoPE frame index of the reference image's tokens (the authors' fixed choice)
ADAIN_EPS = 1e-5  # the audio AdaLayerNorm uses diffusers' AdaLayerNorm default, not config.eps
S2V_PREFIXES = ("cond_encoder.", "casual_audio_encoder.", "audio_injector.", "trainable_cond_mask.", "frame_packer.")


@dataclass
class WanS2VConfig(WanBackboneConfig):
    """Architecture of the Wan S2V DiT; defaults are Wan2.2-S2V-14B (`wan/configs/wan_s2v_14B.py`).

    `audio_dim` / `audio_layers` are the wav2vec2 width and hidden-state count (24 layers + embeddings),
    `motion_frames` the pixel frames of the previous clip kept as context (73 -> 19 latent frames).
    """

    cond_dim: int = 16
    audio_dim: int = 1024
    audio_layers: int = 25
    num_audio_token: int = 4
    audio_inject_layers: tuple[int, ...] = (0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39)
    enable_adain: bool = True
    zero_timestep: bool = True
    add_last_motion: bool = True
    framepack_buckets: tuple[int, int, int] = (1, 2, 16)  # latent frames packed at 1x, 2x, 4x, newest first
    framepack_drop_mode: str = "padd"
    motion_frames: int = 73
    model_type: str = "s2v"

    def __post_init__(self):
        super().__post_init__()  # the backbone's sizes
        self.audio_inject_layers = tuple(int(i) for i in self.audio_inject_layers)
        self.framepack_buckets = tuple(int(i) for i in self.framepack_buckets)
        for name in ("cond_dim", "audio_dim", "audio_layers", "num_audio_token", "motion_frames"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"WanS2VConfig.{name}={value!r} must be a positive integer")
        if self.model_type != "s2v":
            raise ValueError(f"WanS2VConfig.model_type={self.model_type!r} must be 's2v'")
        if self.dim % 4:
            raise ValueError(f"WanS2VConfig.dim={self.dim} must be divisible by 4 (the audio encoder's widths)")
        layers = self.audio_inject_layers
        if not layers or list(layers) != sorted(set(layers)) or layers[0] < 0 or layers[-1] >= self.num_layers:
            raise ValueError(
                f"WanS2VConfig.audio_inject_layers={layers} must be increasing block indices below "
                f"num_layers={self.num_layers}"
            )
        if len(self.framepack_buckets) != 3 or min(self.framepack_buckets) < 1:
            raise ValueError(f"WanS2VConfig.framepack_buckets={self.framepack_buckets} must be three positive counts")
        if self.framepack_buckets[1] % 2 or self.framepack_buckets[2] % 4:
            raise ValueError(
                f"WanS2VConfig.framepack_buckets={self.framepack_buckets}: the 2x bucket must be even and the 4x "
                "bucket a multiple of 4"
            )
        if self.framepack_drop_mode not in ("padd", "drop"):
            raise ValueError(f"WanS2VConfig.framepack_drop_mode={self.framepack_drop_mode!r} must be 'padd' or 'drop'")

    @property
    def motion_latent_frames(self) -> int:
        """Latent frames of the `motion_frames` context (the VAE's 4x causal compression): 73 -> 19."""
        return (self.motion_frames + 3) // 4

    def audio_frames(self, latent_frames: int) -> int:
        """Video frames of audio features a clip of `latent_frames` latent frames takes (4 per latent frame)."""
        return 4 * latent_frames


# ----------------------------------------------------------------------------------------- audio
class CausalConv1d(nn.Module):
    """A 1-D convolution that sees only the past: `kernel - 1` frames of replicate padding on the left."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1):
        super().__init__()
        self.left = kernel_size - 1
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (self.left, 0), mode="replicate"))


class AudioTokenEncoder(nn.Module):
    """Per-frame audio features `[B, T, audio_dim]` -> per-latent-frame tokens (time downsampled 4x).

    The local path makes `num_tokens` tokens per latent frame (one conv channel group each) and appends the
    learned `padding_tokens`; the global path (with `need_global`) makes one vector per latent frame that drives
    the injection's adaptive LayerNorm. Both share `conv2` and `conv3`. (The authors' `MotionEncoder_tc`.)
    """

    def __init__(self, in_dim: int, dim: int, num_tokens: int, need_global: bool):
        super().__init__()
        self.num_tokens = num_tokens
        self.conv1_local = CausalConv1d(in_dim, dim // 4 * num_tokens, 3)
        if need_global:
            self.conv1_global = CausalConv1d(in_dim, dim // 4, 3)
            self.final_linear = nn.Linear(dim, dim)
        self.conv2 = CausalConv1d(dim // 4, dim // 2, 3, stride=2)
        self.conv3 = CausalConv1d(dim // 2, dim, 3, stride=2)
        self.padding_tokens = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def _downsample(self, x: torch.Tensor) -> torch.Tensor:
        """`[N, T, dim/4]` after the first conv -> `[N, T/4, dim]`: LayerNorm + SiLU around each strided conv."""
        for conv in (None, self.conv2, self.conv3):
            if conv is not None:
                x = conv(x.transpose(1, 2)).transpose(1, 2)
            x = F.silu(F.layer_norm(x, x.shape[-1:], eps=1e-6))
        return x

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """`(global [B, T', 1, dim] or None, local [B, T', num_tokens + 1, dim])`."""
        b = x.shape[0]
        channels_first = x.transpose(1, 2)
        local = self.conv1_local(channels_first)  # [B, n * dim/4, T], token-major channel groups
        local = local.unflatten(1, (self.num_tokens, -1)).flatten(0, 1).transpose(1, 2)
        local = self._downsample(local).unflatten(0, (b, self.num_tokens)).transpose(1, 2)
        pad = self.padding_tokens.to(local.dtype).expand(b, local.shape[1], 1, -1)
        local = torch.cat([local, pad], dim=2)
        if not hasattr(self, "conv1_global"):
            return None, local
        glob = self._downsample(self.conv1_global(channels_first).transpose(1, 2))
        return self.final_linear(glob)[:, :, None], local


class CausalAudioEncoder(nn.Module):
    """wav2vec2 features of every layer `[B, layers, audio_dim, T]` -> audio tokens: a softmax-free learned mix of
    the layers (SiLU of `weights`, normalised to sum 1) computed in float32, then `AudioTokenEncoder`."""

    def __init__(self, config: WanS2VConfig):
        super().__init__()
        self.weights = nn.Parameter(torch.full((1, config.audio_layers, 1, 1), 0.01))
        self.encoder = AudioTokenEncoder(config.audio_dim, config.dim, config.num_audio_token, config.enable_adain)

    def forward(self, features: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor]:
        w = F.silu(self.weights.float())
        mixed = (features.float() * w / w.sum(dim=1, keepdim=True)).sum(dim=1)  # [B, audio_dim, T]
        return self.encoder(mixed.transpose(1, 2).to(dtype))


class AudioAdaNorm(nn.Module):
    """LayerNorm (no affine, eps 1e-5) shifted and scaled per latent frame by a projection of the global audio
    vector: `shift, scale = linear(silu(g))` (diffusers' `AdaLayerNorm` with `chunk_dim=1`, shift first)."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        shift, scale = self.linear(F.silu(emb)).float().chunk(2, dim=-1)
        return F.layer_norm(x.float(), x.shape[-1:], eps=ADAIN_EPS) * (1 + scale[:, None]) + shift[:, None]


class AudioInjector(nn.Module):
    """One audio cross-attention (and, with `enable_adain`, one AdaNorm) per entry of `audio_inject_layers`."""

    def __init__(self, config: WanS2VConfig):
        super().__init__()
        n = len(config.audio_inject_layers)
        self.injector = nn.ModuleList(CrossAttention(config.dim, config.num_heads, config.eps, False) for _ in range(n))
        if config.enable_adain:
            self.injector_adain_layers = nn.ModuleList(AudioAdaNorm(config.dim) for _ in range(n))


# ----------------------------------------------------------------------------------------- motion
class FramePackMotioner(nn.Module):
    """The previous clip's latents as tokens: the newest `buckets[0]` latent frames at full resolution (`proj`),
    the next `buckets[1]` compressed 2x in time and space (`proj_2x`), the oldest `buckets[2]` 4x (`proj_4x`)."""

    def __init__(self, in_dim: int, dim: int, buckets: tuple[int, int, int], drop_mode: str):
        super().__init__()
        self.proj = nn.Conv3d(in_dim, dim, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.proj_2x = nn.Conv3d(in_dim, dim, kernel_size=(2, 4, 4), stride=(2, 4, 4))
        self.proj_4x = nn.Conv3d(in_dim, dim, kernel_size=(4, 8, 8), stride=(4, 8, 8))
        self.buckets = buckets
        self.drop_mode = drop_mode

    def forward(self, motion: torch.Tensor, add_last_motion: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
        """`motion` `[B, C, T, H, W]` (the last `sum(buckets)` frames are used; fewer are zero-padded in front)
        -> (tokens `[B, N, dim]`, RoPE positions `[N, 3]` with negative frame indices).

        `add_last_motion` < 2 leaves out the newest bucket (and < 1 the 2x one too): zeroed in "padd" mode,
        removed in "drop" mode."""
        b, c, t, h, w = motion.shape
        total = sum(self.buckets)
        packed = motion.new_zeros(b, c, total, h, w)
        keep = min(total, t)
        if keep:
            packed[:, :, total - keep :] = motion[:, :, t - keep :]
        if add_last_motion < 2 and self.drop_mode != "drop":
            zeroed = sum(self.buckets[: len(self.buckets) - add_last_motion - 1])
            packed[:, :, total - zeroed :] = 0
        oldest, middle, newest = packed.split(self.buckets[::-1], dim=2)
        tokens, positions, start = [], [], 0
        for scale, (conv, frames, bucket) in enumerate(
            ((self.proj, newest, self.buckets[0]), (self.proj_2x, middle, self.buckets[1]),
             (self.proj_4x, oldest, self.buckets[2]))
        ):  # fmt: skip
            start -= bucket
            if self.drop_mode == "drop" and scale < 2 - add_last_motion:
                continue
            out = conv(frames)
            tokens.append(out.flatten(2).transpose(1, 2))
            # the tokens cover `bucket` frames and the full (h / 2, w / 2) patch grid: positions are sampled over it
            positions.append(grid_positions((start, 0, 0), tuple(out.shape[2:]), (bucket, h // 2, w // 2)))
        return torch.cat(tokens, dim=1), torch.cat(positions).to(motion.device)


def _sampled(start: int, extent: int, count: int) -> np.ndarray:
    """`count` integer positions spread over `extent` cells from `start` (truncated like the authors' numpy
    `linspace(...).astype(int)`); a negative start counts backwards from `-start`, mirrored."""
    if start >= 0:
        return np.linspace(start, start + extent - 1, count).astype(np.int64)
    return -np.linspace(-start, -start - extent + 1, count).astype(np.int64)


def grid_positions(start: tuple[int, int, int], counts: tuple[int, ...], extents: tuple[int, ...]) -> torch.Tensor:
    """RoPE positions `[f * h * w, 3]` (row-major over frame, row, column) of a token grid of `counts` tokens
    that stands for `extents` positions from `start` on each axis."""
    axes = [torch.from_numpy(_sampled(s, e, n)) for s, e, n in zip(start, extents, counts, strict=True)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)


# ----------------------------------------------------------------------------------------- DiT
class WanS2VDiT(nn.Module):
    """Wan S2V DiT. `forward(x, timestep, context, ref_latents, audio_embeds, motion_latents=None,
    pose_latents=None, drop_motion_frames=False) -> [B, out_dim, F, H, W]` (the velocity of the noisy clip)."""

    offload_units = ("blocks",)
    compile_units = ("blocks",)
    lora_target_modules = ("q", "k", "v", "o", "ffn.0", "ffn.2")

    def __init__(self, config: WanS2VConfig | None = None):
        super().__init__()
        self.config = config = config if config is not None else WanS2VConfig()
        self.gradient_checkpointing = False
        dim, patch = config.dim, config.patch_size
        add_input_layers(self, config)
        block_config = config.block_config()
        self.blocks = nn.ModuleList(WanBlock(block_config) for _ in range(config.num_layers))
        self.head = Head(dim, config.out_dim * math.prod(patch), config.eps)
        self.cond_encoder = nn.Conv3d(config.cond_dim, dim, kernel_size=patch, stride=patch)
        self.casual_audio_encoder = CausalAudioEncoder(config)
        self.audio_injector = AudioInjector(config)
        self.trainable_cond_mask = nn.Embedding(3, dim)
        self.frame_packer = FramePackMotioner(config.in_dim, dim, config.framepack_buckets, config.framepack_drop_mode)
        self.rope = MultiAxisRope(config.rope_theta, block_config.rope_axes_dims, (config.rope_max_len,) * 3)
        self._inject = {layer: k for k, layer in enumerate(config.audio_inject_layers)}

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor | float,
        context: torch.Tensor,
        ref_latents: torch.Tensor,
        audio_embeds: torch.Tensor,
        motion_latents: torch.Tensor | None = None,
        pose_latents: torch.Tensor | None = None,
        drop_motion_frames: bool = False,
    ) -> torch.Tensor:
        """Velocity for the noisy clip `x` `[B, in_dim, F, H, W]`; computation runs in `x.dtype`.

        `timestep` `[B]` (or a scalar) in [0, 1000]; `context` the UMT5 states `[B, L <= text_len, text_dim]`;
        `ref_latents` `[B, in_dim, 1, H, W]` the reference image's latent; `audio_embeds`
        `[B, audio_layers, audio_dim, 4 F]` the wav2vec2 features of the clip's video frames (`audio_encoder.py`);
        `motion_latents` `[B, in_dim, T, H, W]` the latents of the frames before the clip (None or
        `drop_motion_frames` = none: the first clip); `pose_latents` `[B, cond_dim, F, H, W]` or None.
        """
        cfg = self.config
        grid = self._check_inputs(x, context, ref_latents, audio_embeds, motion_latents, pose_latents)
        b, dtype, device = x.shape[0], x.dtype, x.device
        patches = self.patch_embedding(x)
        if pose_latents is not None:
            patches = patches + self.cond_encoder(pose_latents.to(dtype))
        else:  # the authors embed an all-zero pose: only the bias is left
            patches = patches + self.cond_encoder.bias.to(dtype).view(1, -1, 1, 1, 1)
        video = patches.flatten(2).transpose(1, 2)
        ref = self.patch_embedding(ref_latents.to(dtype)).flatten(2).transpose(1, 2)
        parts, positions = [video, ref], [grid_positions((0, 0, 0), grid, grid)]
        positions.append(grid_positions((REFERENCE_FRAME, 0, 0), (1, *grid[1:]), (1, *grid[1:])))
        if motion_latents is not None and not drop_motion_frames:
            add_last = 2 if cfg.add_last_motion else 0
            motion, motion_positions = self.frame_packer(motion_latents.to(dtype), add_last)
            parts.append(motion)
            positions.append(motion_positions)
        kinds = torch.cat([torch.full((p.shape[1],), i, dtype=torch.long) for i, p in enumerate(parts)]).to(device)
        seq = torch.cat(parts, dim=1).float() + self.trainable_cond_mask(kinds).float()
        n_video = video.shape[1]

        t = torch.as_tensor(timestep, dtype=torch.float32, device=device).reshape(-1).expand(b)
        values = torch.cat([t, t.new_zeros(1)]) if cfg.zero_timestep else t
        index = torch.arange(b, device=device)[:, None].expand(b, seq.shape[1]).clone()
        if cfg.zero_timestep:  # the reference and motion tokens are clean: they get timestep 0
            index[:, n_video:] = b
        e, temb = time_modulation(self, values, dtype)
        context = text_tokens(self, context, dtype)
        rope = self._rope(torch.cat(positions).to(device))
        audio_global, audio_local = self.audio_tokens(audio_embeds, grid[0], dtype)

        for i, block in enumerate(self.blocks):
            seq = self._run(block, seq, e, index, context, None, rope)
            if i in self._inject:
                seq = self._run(self._inject_audio, seq, self._inject[i], n_video, audio_global, audio_local)
        out = self.head(seq[:, :n_video], temb.float(), torch.arange(b, device=device)[:, None], dtype)
        return self._unpatchify(out, grid)

    def audio_tokens(
        self, audio_embeds: torch.Tensor, frames: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(global `[B, F, 1, dim]` or None, local `[B, F, num_audio_token + 1, dim]`) for the clip's latent frames.

        As the authors do, the first feature frame is repeated `motion_frames` times in front (the motion context's
        share of the causal convolutions), and the latent frames that share makes are dropped."""
        cfg = self.config
        audio = audio_embeds.float()
        audio = torch.cat([audio[..., :1].expand(*audio.shape[:-1], cfg.motion_frames), audio], dim=-1)
        glob, local = self.casual_audio_encoder(audio, dtype)
        skip = cfg.motion_latent_frames
        return (glob[:, skip:] if glob is not None else None), local[:, skip:]

    def _inject_audio(
        self, seq: torch.Tensor, k: int, n_video: int, audio_global: torch.Tensor | None, audio_local: torch.Tensor
    ) -> torch.Tensor:
        """Each latent frame's video tokens attend to that frame's audio tokens; the result joins the residual."""
        b, frames = audio_local.shape[:2]
        tokens = seq[:, :n_video].unflatten(1, (frames, -1)).flatten(0, 1)  # [(B F), h * w, dim]
        if audio_global is not None:
            tokens = self.audio_injector.injector_adain_layers[k](tokens, audio_global.flatten(0, 2))
        else:
            tokens = F.layer_norm(tokens, tokens.shape[-1:], eps=1e-6)
        dtype = audio_local.dtype
        out = self.audio_injector.injector[k](tokens.to(dtype), audio_local.flatten(0, 1), None)
        return torch.cat([seq[:, :n_video] + out.float().unflatten(0, (b, frames)).flatten(1, 2), seq[:, n_video:]], 1)

    def _run(self, fn, *args) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def _rope(self, positions: torch.Tensor):
        """RoPE tables `[1, S, 1, head_dim]`; a negative frame index rotates the frame channels backwards (the
        conjugate rotation, as the authors' `freqs.conj()`)."""
        cos, sin = self.rope(positions.abs())
        n = self.rope.axes_dims[0] // 2
        sign = torch.where(positions[:, :1] < 0, -1.0, 1.0).to(sin.device)
        sin = torch.cat([sin[:, :n] * sign, sin[:, n:]], dim=-1)
        return rope_tables(cos[None, :, None], sin[None, :, None])

    def _unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """`[B, S, pt*ph*pw*C]` (channels fastest within a patch) -> `[B, C, F, H, W]`."""
        (pt, ph, pw), c, (f, h, w) = self.config.patch_size, self.config.out_dim, grid
        x = x.view(x.shape[0], f, h, w, pt, ph, pw, c)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(x.shape[0], c, f * pt, h * ph, w * pw)

    def _check_inputs(self, x, context, ref, audio, motion, pose) -> tuple[int, int, int]:
        cfg = self.config
        if x.dim() != 5 or x.shape[1] != cfg.in_dim:
            raise ConfigError(f"x has shape {tuple(x.shape)}; expected [B, in_dim={cfg.in_dim}, F, H, W]")
        b, _, *size = x.shape
        if any(s % p for s, p in zip(size, cfg.patch_size, strict=True)):
            raise ConfigError(f"latent size (F, H, W)={tuple(size)} must be divisible by the patch {cfg.patch_size}")
        grid = tuple(s // p for s, p in zip(size, cfg.patch_size, strict=True))
        if context.dim() != 3 or context.shape[0] != b or context.shape[2] != cfg.text_dim:
            raise ConfigError(f"context has shape {tuple(context.shape)}; expected [{b}, L, text_dim={cfg.text_dim}]")
        if context.shape[1] > cfg.text_len:
            raise ConfigError(f"context has {context.shape[1]} tokens; the S2V DiT takes at most {cfg.text_len}")
        expected = (b, cfg.in_dim, 1, *size[1:])
        if not isinstance(ref, torch.Tensor) or tuple(ref.shape) != expected:
            got = tuple(ref.shape) if isinstance(ref, torch.Tensor) else type(ref).__name__
            raise ConfigError(f"ref_latents has shape {got}; expected {expected} (one latent frame of the image)")
        frames = cfg.audio_frames(size[0])
        expected = (b, cfg.audio_layers, cfg.audio_dim, frames)
        if not isinstance(audio, torch.Tensor) or tuple(audio.shape) != expected:
            got = tuple(audio.shape) if isinstance(audio, torch.Tensor) else type(audio).__name__
            raise ConfigError(
                f"audio_embeds has shape {got}; expected {expected} (wav2vec2 layers x width x the clip's "
                f"{frames} video frames)"
            )
        if motion is not None and (
            motion.dim() != 5 or motion.shape[:2] != (b, cfg.in_dim) or motion.shape[3:] != x.shape[3:]
        ):
            raise ConfigError(
                f"motion_latents has shape {tuple(motion.shape)}; expected [{b}, {cfg.in_dim}, T, {size[1]}, {size[2]}]"
            )
        if pose is not None and tuple(pose.shape) != (b, cfg.cond_dim, *size):
            raise ConfigError(f"pose_latents has shape {tuple(pose.shape)}; expected {(b, cfg.cond_dim, *size)}")
        return grid


# ----------------------------------------------------------------------------------------- config from files
def config_from_state(state, config_json: dict | None = None) -> WanS2VConfig:
    """The S2V config from our-named shapes (the authors' names); a `config.json` (the authors' `WanModel_S2V`
    fields) may add heads, eps and the injection layers, and must agree with the shapes."""
    from diffsynth.runtime.registry import build_config, merge_fields

    given = {}
    for name in ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "text_dim", "freq_dim", "eps",
                 "text_len", "cond_dim", "audio_dim", "num_audio_token", "enable_adain", "zero_timestep",
                 "add_last_motion", "framepack_drop_mode", "motion_frames"):  # fmt: skip
        if config_json and config_json.get(name) is not None:
            given[name] = config_json[name]
    if config_json and config_json.get("audio_inject_layers") is not None:
        given["audio_inject_layers"] = tuple(int(i) for i in config_json["audio_inject_layers"])
    if config_json and config_json.get("patch_size") is not None:
        given["patch_size"] = tuple(int(p) for p in config_json["patch_size"])
    derived = {}
    if state:
        derived = backbone_fields(state)
        dim = derived["dim"]
        derived.update(
            cond_dim=int(state["cond_encoder.weight"].shape[1]),
            audio_dim=int(state["casual_audio_encoder.encoder.conv1_local.conv.weight"].shape[1]),
            audio_layers=int(state["casual_audio_encoder.weights"].shape[1]),
            num_audio_token=int(state["casual_audio_encoder.encoder.conv1_local.conv.weight"].shape[0]) // (dim // 4),
            enable_adain="audio_injector.injector_adain_layers.0.linear.weight" in state,
        )  # fmt: skip
        injectors = 0
        while f"audio_injector.injector.{injectors}.q.weight" in state:
            injectors += 1
        if "audio_inject_layers" not in given and injectors != len(WanS2VConfig.audio_inject_layers):
            raise ConfigError(
                f"Wan S2V DiT: {injectors} audio injectors, not the 14B model's "
                f"{len(WanS2VConfig.audio_inject_layers)}; give audio_inject_layers in a config.json beside the file"
            )
        if "audio_inject_layers" in given and len(given["audio_inject_layers"]) != injectors:
            raise ConfigError(
                f"Wan S2V DiT config.json says audio_inject_layers={list(given['audio_inject_layers'])} but the "
                f"checkpoint has {injectors} audio injectors"
            )
    merged = merge_fields("Wan S2V DiT", given, derived)
    merged.setdefault("num_heads", merged.get("dim", WanS2VConfig.dim) // 128)
    return build_config(WanS2VConfig, "Wan S2V DiT", merged)


# ----------------------------------------------------------------------------------------- pipeline
@dataclass
class S2VConditions:
    """The S2V DiT's inputs besides latents, timestep and text for one clip: the reference image's latent
    `[B, z, 1, h, w]`, the clip's audio features `[B, 25, 1024, 4 T]`, the motion latents of the frames before it
    `[B, z, 19, h, w]` (None for a first clip) and the pose latent `[B, z, T, h, w]` (or None)."""

    ref_latents: torch.Tensor
    audio_embeds: torch.Tensor
    motion_latents: torch.Tensor | None = None
    pose_latents: torch.Tensor | None = None

    def silent(self) -> S2VConditions:
        """The negative branch's inputs: the same, with the audio zeroed (as the authors guide)."""
        return S2VConditions(self.ref_latents, self.audio_embeds * 0, self.motion_latents, self.pose_latents)


def s2v_velocity(dit: WanS2VDiT, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, cond: S2VConditions):
    """Flow velocity of the S2V DiT in float32 (the per-step model call); inputs run in the DiT's weight dtype."""
    from diffsynth.runtime.vram import module_dtype

    dtype = module_dtype(dit)

    def cast(t):
        return None if t is None else t.to(dtype)

    out = dit(
        x.to(dtype), timestep.to(device=x.device, dtype=torch.float32), context.to(dtype), cast(cond.ref_latents),
        cond.audio_embeds.float(), cast(cond.motion_latents), cast(cond.pose_latents),
        drop_motion_frames=cond.motion_latents is None,
    )  # fmt: skip
    return out.float()


def check_s2v_call(pipe, input_image, input_audio, audio_embeds, pose_video, pose_latents, motion_video, frames: int):
    """Refuse what an S2V call cannot use, naming the argument (before any model runs)."""
    if pipe.dit2 is not None:
        raise ConfigError("Wan2.2-S2V is one DiT: remove the second DiT (dit2) from the pipeline")
    if input_image is None or isinstance(input_image, (list, tuple)):
        raise ConfigError("Wan2.2-S2V needs input_image: one image of the person to animate")
    if input_audio is None and audio_embeds is None:
        raise ConfigError("Wan2.2-S2V needs input_audio (a waveform or an audio file) or audio_embeds")
    if input_audio is not None and audio_embeds is not None:
        raise ConfigError("give input_audio or audio_embeds, not both")
    if input_audio is not None and pipe.audio_encoder is None:
        raise ConfigError(
            "input_audio needs the wav2vec2 audio encoder: add ModelConfig(model_id='Wan-AI/Wan2.2-S2V-14B', "
            "origin_file_pattern='wav2vec2-large-xlsr-53-english/model.safetensors'), or pass audio_embeds"
        )
    if pose_video is not None and pose_latents is not None:
        raise ConfigError("give s2v_pose_video or s2v_pose_latents, not both")
    if frames < 5:
        raise ConfigError(
            f"num_frames={frames}: an S2V clip is the reference frame + 4k new frames; use at least 5 (81)"
        )


def _motion_pixels(motion_video, frames: int, height: int, width: int, dtype, device) -> torch.Tensor:
    """The last `frames` frames before the clip `[1, 3, frames, H, W]` in [-1, 1]: a tensor `[1, 3, T, H, W]` in
    [-1, 1] (DiffSynth-Studio's form) or a list of frames / a file; fewer than `frames` frames are preceded by
    zeros (mid-grey), as the authors' buffer of previous frames starts out."""
    from diffsynth.runtime.media import load_frames

    from .animate import frames_tensor

    if isinstance(motion_video, torch.Tensor):
        pixels = motion_video if motion_video.dim() == 5 else motion_video[None]
        if (
            pixels.dim() != 5
            or pixels.shape[0] != 1
            or pixels.shape[1] != 3
            or tuple(pixels.shape[3:]) != (height, width)
        ):
            raise ConfigError(
                f"motion_video has shape {tuple(motion_video.shape)}; expected [1, 3, T, {height}, {width}] in [-1, 1]"
            )
        pixels = pixels.to(device=device, dtype=dtype)
    else:
        pixels = frames_tensor(load_frames(motion_video, "motion_video"), height, width, dtype, device)
    pixels = pixels[:, :, -frames:]
    if pixels.shape[2] < frames:
        pixels = torch.cat([pixels.new_zeros(1, 3, frames - pixels.shape[2], height, width), pixels], dim=2)
    return pixels


def _pose_latents(pipe, pose_video, clip_frames: int, height: int, width: int, vae_kwargs) -> torch.Tensor:
    """The pose video's latent for the clip `[1, z, clip_frames / 4, h, w]`: its first `clip_frames` frames
    (padded with black), the first frame repeated in front so the causal VAE gives it a latent frame of its own,
    which is then dropped (the authors' `load_pose_cond`)."""
    from diffsynth.runtime.media import load_frames
    from diffsynth.runtime.vram import module_dtype

    from .animate import frames_tensor

    dtype = module_dtype(pipe.vae)
    pixels = frames_tensor(load_frames(pose_video, "s2v_pose_video")[:clip_frames], height, width, dtype, pipe.device)
    missing = clip_frames - pixels.shape[2]
    if missing:
        pixels = torch.cat([pixels, -torch.ones_like(pixels[:, :, :1]).expand(-1, -1, missing, -1, -1)], dim=2)
    pixels = torch.cat([pixels[:, :, :1], pixels], dim=2)
    return pipe.vae.encode(pixels, **vae_kwargs).float()[:, :, 1:]


def _check_shape(value, name: str, tail: tuple[int, ...], where: str = "") -> None:
    """`value` must be a tensor `[B, *tail]`; refused by `name` otherwise."""
    if not isinstance(value, torch.Tensor) or value.dim() != len(tail) + 1 or tuple(value.shape[1:]) != tail:
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ConfigError(f"{name} has shape {got}; expected [1, {', '.join(map(str, tail))}]{where}")


def generate_s2v(
    pipe, prompts, negatives, input_image, input_audio, audio_sample_rate, audio_embeds, pose_video, pose_latents,
    motion_video, size, seed, rand_device, latents, max_sequence_length, schedule, scale, vae_kwargs, progress_bar,
) -> torch.Tensor:  # fmt: skip
    """One S2V clip `[B, 3, num_frames, H, W]` in [-1, 1]: the context frame then `num_frames - 1` new frames.

    The context frame is the reference image (a first clip) or the last frame of `motion_video` (a continuation,
    whose latents lead the decode so the new frames continue it). `latents` is the noise `[B, z, 1 + T, h, w]` as
    DiffSynth-Studio draws it (its first frame, the reference's place, is not used)."""
    from diffsynth.runtime.media import load_image
    from diffsynth.runtime.schedulers import make_scheduler
    from diffsynth.runtime.vram import module_dtype

    from .audio_encoder import audio_clips, prepare_waveform
    from .pipeline import sampler_grid

    height, width, frames = size
    steps, shift, sigmas, sampler = schedule
    dit, vae, batch = pipe.dit, pipe.vae, len(prompts)
    cfg, (s, tc, z) = dit.config, (vae.spatial_compression, vae.temporal_compression, vae.z_dim)
    clip_frames = frames - 1
    if clip_frames % tc:
        raise ConfigError(f"num_frames={frames}: an S2V clip is the reference frame + {tc}k new frames (e.g. 81)")
    lat = clip_frames // tc
    if audio_embeds is None:
        pipe.load_models_to_device(["audio_encoder"])
        wave = prepare_waveform(input_audio, audio_sample_rate)
        audio_embeds = audio_clips(pipe.audio_encoder, wave, pipe.defaults.get("fps", 16), clip_frames, pipe.device)[0]
    _check_shape(
        audio_embeds, "audio_embeds", (cfg.audio_layers, cfg.audio_dim, cfg.audio_frames(lat)), " for this clip"
    )
    if audio_embeds.shape[0] not in (1, batch):
        raise ConfigError(f"audio_embeds has {audio_embeds.shape[0]} samples for {batch} prompts; give 1")
    audio_embeds = audio_embeds.to(pipe.device).float().expand(batch, -1, -1, -1)

    use_cfg = scale != 1.0
    pipe.load_models_to_device(["text_encoder"])
    context = pipe.encode_prompt(prompts, max_sequence_length)
    negative_context = pipe.encode_prompt(negatives, max_sequence_length) if use_cfg else None

    pipe.load_models_to_device(["vae"])
    vae_dtype = module_dtype(vae)
    pixels = pipe._pixels([load_image(input_image)], height, width, vae_dtype)[:, :, None]
    ref = vae.encode(pixels, **vae_kwargs).float()
    motion = None
    if motion_video is not None:
        motion_pixels = _motion_pixels(motion_video, cfg.motion_frames, height, width, vae_dtype, pipe.device)
        motion = vae.encode(motion_pixels, **vae_kwargs).float()
    if pose_video is not None:
        pose_latents = _pose_latents(pipe, pose_video, clip_frames, height, width, vae_kwargs)
    shape = (batch, z, lat + 1, height // s, width // s)
    if pose_latents is not None:
        _check_shape(pose_latents, "s2v_pose_latents", (cfg.cond_dim, lat, *shape[3:]))
        pose_latents = pose_latents.to(pipe.device).float().expand(batch, -1, -1, -1, -1)
    cond = S2VConditions(
        ref.expand(batch, -1, -1, -1, -1), audio_embeds,
        None if motion is None else motion.expand(batch, -1, -1, -1, -1), pose_latents,
    )  # fmt: skip

    noise = pipe.check_latents(latents, shape) if latents is not None else pipe.generate_noise(shape, seed, rand_device)
    x = noise[:, :, 1:]
    scheduler = make_scheduler("wan", sampler)
    scheduler.set_timesteps(steps, sigmas=sigmas, shift=shift, **sampler_grid(sampler))
    pipe.load_models_to_device(["dit"])
    for i in pipe.progress(range(len(scheduler.timesteps)), progress_bar):
        timestep = scheduler.timesteps[i].to(device=x.device, dtype=torch.float32).expand(batch)
        velocity = s2v_velocity(dit, x, timestep, context, cond)
        if use_cfg:
            velocity = pipe.guide(velocity, s2v_velocity(dit, x, timestep, negative_context, cond.silent()), scale)
        x = scheduler.step(velocity, i, x)

    pipe.load_models_to_device(["vae"])
    lead = cond.ref_latents if motion is None else cond.motion_latents
    video = vae.decode(torch.cat([lead, x], dim=2).to(vae_dtype), **vae_kwargs).float()
    pipe.load_models_to_device([])
    return video[:, :, -frames:]


__all__ = [
    "AudioInjector",
    "S2VConditions",
    "CausalAudioEncoder",
    "FramePackMotioner",
    "WanS2VConfig",
    "WanS2VDiT",
    "check_s2v_call",
    "config_from_state",
    "generate_s2v",
    "grid_positions",
    "s2v_velocity",
]
