"""LTX-2.5's duration head: how long the shot a prompt describes should be, from the text connectors' outputs.

A small regression head (a few MB, `model_patches/ltx-2.5-duration-head-bf16.safetensors`): each stream's
connector tokens are projected to a shared width and tagged with a learned modality vector, one learned query
pools them by cross-attention, and a two-layer MLP (tanh GELU) gives the log of the duration in seconds. The
pipelines use it when `num_frames` is not given (`num_frames_from_seconds`: clamped to `[min_seconds,
max_seconds]`, then floored onto the VAE's `8k + 1` frame grid, as ltx-pipelines does).

Module names are ltx-core's (its `duration_head.*` keys without the prefix; the pooler is a
`torch.nn.MultiheadAttention` there, whose packed `in_proj_*` we keep), so the authors' file loads as is;
`duration_head_formats` converts diffusers' `LTX2DurationHead` (separate q/k/v projections).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from diffsynth.runtime.errors import ConfigError


@dataclass
class LTX2DurationHeadConfig:
    """The released head: 4096 / 2048 wide connector tokens (the DiT's cross-attention widths), a 256-wide
    pooler with 4 heads and one query, a 256-wide MLP."""

    video_dim: int = 4096
    audio_dim: int = 2048
    hidden_dim: int = 256
    num_queries: int = 1
    num_heads: int = 4
    mlp_dim: int = 256

    def __post_init__(self):
        if self.hidden_dim % self.num_heads:
            raise ConfigError(
                f"LTX2DurationHeadConfig: hidden_dim={self.hidden_dim} is not a multiple of num_heads={self.num_heads}"
            )


class PooledAttention(nn.Module):
    """Multi-head cross-attention with packed q/k/v projections (`in_proj_*`, `out_proj`), as PyTorch's
    `nn.MultiheadAttention` stores them."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)

        def heads(x):  # [B, L, D] -> [B, heads, L, D / heads]
            return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        q, k, v = heads(F.linear(queries, wq, bq)), heads(F.linear(tokens, wk, bk)), heads(F.linear(tokens, wv, bv))
        return self.out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


class AttentionPooler(nn.Module):
    """`num_queries` learned tokens attending over every input token (no mask: the connectors put learned
    registers where a prompt is padded, so every token is valid)."""

    def __init__(self, dim: int, num_queries: int, heads: int):
        super().__init__()
        self.query_tokens = nn.Parameter(torch.zeros(num_queries, dim))
        self.cross_attn = PooledAttention(dim, heads)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        queries = self.query_tokens[None].expand(tokens.shape[0], -1, -1).to(tokens.dtype)
        return self.cross_attn(queries, tokens)


class LTX2DurationHead(nn.Module):
    """Predicted shot duration in seconds `[B]` from the video and/or audio connector outputs."""

    def __init__(self, config: LTX2DurationHeadConfig | None = None):
        super().__init__()
        self.config = config = config or LTX2DurationHeadConfig()
        self.video_input_proj = nn.Linear(config.video_dim, config.hidden_dim)
        self.video_modality_emb = nn.Parameter(torch.zeros(config.hidden_dim))
        self.audio_input_proj = nn.Linear(config.audio_dim, config.hidden_dim)
        self.audio_modality_emb = nn.Parameter(torch.zeros(config.hidden_dim))
        self.attention_pooler = AttentionPooler(config.hidden_dim, config.num_queries, config.num_heads)
        self.mlp_hidden = nn.Linear(config.hidden_dim * config.num_queries, config.mlp_dim)
        self.mlp_out = nn.Linear(config.mlp_dim, 1)

    def forward(self, video: torch.Tensor | None = None, audio: torch.Tensor | None = None) -> torch.Tensor:
        """`video` `[B, L, video_dim]` and / or `audio` `[B, L', audio_dim]` -> seconds `[B]` (float32)."""
        if video is None and audio is None:
            raise ConfigError("the duration head needs the video or the audio connector output (or both)")
        dtype = self.mlp_out.weight.dtype
        parts = []
        for tokens, proj, tag, name, width in (
            (video, self.video_input_proj, self.video_modality_emb, "video", self.config.video_dim),
            (audio, self.audio_input_proj, self.audio_modality_emb, "audio", self.config.audio_dim),
        ):
            if tokens is None:
                continue
            if tokens.dim() != 3 or tokens.shape[-1] != width:
                raise ConfigError(
                    f"the duration head takes {name} tokens [B, L, {width}], got {tuple(tokens.shape)}: the head and "
                    "the text connectors come from different models"
                )
            parts.append(proj(tokens.to(dtype)) + tag)
        pooled = self.attention_pooler(torch.cat(parts, dim=1)).flatten(1)
        log_seconds = self.mlp_out(F.gelu(self.mlp_hidden(pooled), approximate="tanh")).squeeze(-1)
        return log_seconds.float().exp()


def num_frames_from_seconds(
    seconds: float, frame_rate: float, min_seconds: float = 1.0, max_seconds: float = 20.0, temporal: int = 8
) -> int:
    """A frame count for `seconds` at `frame_rate`: clamped to `[min_seconds, max_seconds]` (in frames, before
    snapping), floored onto the `temporal * k + 1` grid, and moved up one grid step when the floor falls under the
    minimum (capped at the maximum), as ltx-pipelines' `seconds_to_clamped_num_frames` does."""
    if not 0 < min_seconds <= max_seconds:
        raise ConfigError(f"min_seconds={min_seconds}, max_seconds={max_seconds}: need 0 < min_seconds <= max_seconds")
    low, high = max(1, round(min_seconds * frame_rate)), round(max_seconds * frame_rate)
    frames = max(low, min(round(seconds * frame_rate), high))
    snapped = (frames - 1) // temporal * temporal + 1
    if snapped < low:
        snapped = min(-(-(low - 1) // temporal) * temporal + 1, high)
    return snapped
