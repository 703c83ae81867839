"""LTX-2's text connectors: Gemma's 49 hidden states -> the video and audio text contexts of the DiT.

Three steps (ltx-core `FeatureExtractorV1` / `V2` + `Embeddings1DConnector`, diffusers `LTX2TextConnectors`):

1. the hidden states are normalised and the 49 x 3840 values of a token projected:
   - LTX-2.0: every hidden state is normalised per sample over the prompt tokens (minus its masked mean,
     divided by its masked range, times 8), padding zeroed, and one projection
     `text_embedding_projection.aggregate_embed` (no bias) gives 3840 values both streams share;
   - LTX-2.3 (`per_modality_projections`): every hidden state of every token is RMS-normalised over its
     3840 features, padding zeroed, scaled by `sqrt(stream width / 3840)` per stream, and projected by
     that stream's `text_embedding_projection.video_aggregate_embed` / `audio_aggregate_embed` (with
     bias) straight to the DiT's stream width (4096 / 2048; the 2.3 DiT has no caption projection);
2. per stream, a small transformer (blocks of RMSNorm -> self-attention with 1-D RoPE -> RMSNorm ->
   GELU-tanh MLP, then a final RMSNorm; 2.0: 2 blocks, 30 heads x 128; 2.3: 8 blocks, 32 heads x 128
   (video) or x 64 (audio), each attention gated per head by `to_gate_logits`) reads the projected
   tokens. Padding is not masked: the prompt tokens are moved to the front (in order) and every later
   position gets the learned register of its index (128 registers, tiled over the sequence), so all
   positions attend;
3. the result is `(video_context, audio_context, mask)`; the mask is all ones, since registers fill
   the padding (the DiT then runs its text attention unmasked).

Module names are ltx-core's (`text_embedding_projection.aggregate_embed`, `video_embeddings_connector.
transformer_1d_blocks.N.attn1.q_norm`, ...), so the keys of `ltx-2-19b-dev.safetensors` and
`ltx-2.3-22b-dev.safetensors` load after stripping `model.diffusion_model.` (see `connectors_formats.py`).
Attention and MLP layers are the DiT's own (`dit.Attention`, `dit.FeedForward`), as in ltx-core.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .dit import ROPE_TYPES, Attention, FeedForward, rope_from_positions

NORM_SCALE = 8.0  # normalised hidden states are scaled by this before the projection
NORM_EPS = 1e-6


@dataclass
class LTX2ConnectorsConfig:
    """Architecture of the LTX-2 text connectors; defaults are the released LTX-2 19B ("2.0").

    LTX-2.3 (22B): `per_modality_projections`, `projection_bias`, both `*_gated_attention`, 8 layers a
    stream, 32 heads (video x 128, audio x 64)."""

    caption_channels: int = 3840  # Gemma-3-12B hidden size (and, in 2.0, the connectors' width)
    text_proj_in_factor: int = 49  # hidden states read: embeddings + 48 layers
    video_num_heads: int = 30
    video_head_dim: int = 128
    video_num_layers: int = 2
    video_num_registers: int = 128
    audio_num_heads: int = 30
    audio_head_dim: int = 128
    audio_num_layers: int = 2
    audio_num_registers: int = 128
    rope_max_pos: int = 4096  # token index i is at position i / rope_max_pos
    rope_theta: float = 10000.0
    rope_double_precision: bool = True
    rope_type: str = "split"
    norm_eps: float = 1e-6
    # LTX-2.3: per-token RMS norm and one projection per stream, to that stream's width (heads x head_dim)
    per_modality_projections: bool = False
    projection_bias: bool = False  # the projection(s) have a bias (2.3)
    video_gated_attention: bool = False  # per-head output gates `attn1.to_gate_logits` (2.3)
    audio_gated_attention: bool = False

    @classmethod
    def ltx23(cls, **overrides) -> LTX2ConnectorsConfig:
        """The released LTX-2.3 connectors: per-stream projections with biases to 4096 / 2048, then 8 gated
        blocks per stream (32 heads of 128 / 64)."""
        fields = dict(
            video_num_heads=32,
            video_head_dim=128,
            video_num_layers=8,
            audio_num_heads=32,
            audio_head_dim=64,
            audio_num_layers=8,
            per_modality_projections=True,
            projection_bias=True,
            video_gated_attention=True,
            audio_gated_attention=True,
        )
        return cls(**{**fields, **overrides})

    def __post_init__(self):
        self.rope_theta = float(self.rope_theta)
        positive = (
            "caption_channels",
            "text_proj_in_factor",
            "video_num_heads",
            "video_head_dim",
            "video_num_registers",
            "audio_num_heads",
            "audio_head_dim",
            "audio_num_registers",
            "rope_max_pos",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"LTX2ConnectorsConfig.{name}={value!r} must be a positive integer")
        for name in ("video_num_layers", "audio_num_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"LTX2ConnectorsConfig.{name}={value!r} must be a non-negative integer")
        for side in ("video", "audio"):
            width = getattr(self, f"{side}_num_heads") * getattr(self, f"{side}_head_dim")
            if width != self.caption_channels and not self.per_modality_projections:
                raise ValueError(
                    f"LTX2ConnectorsConfig: {side}_num_heads x {side}_head_dim = {width} must equal "
                    f"caption_channels={self.caption_channels} (the shared projection gives that width; "
                    "per_modality_projections lifts this)"
                )
            if getattr(self, f"{side}_head_dim") % 2:
                raise ValueError(f"LTX2ConnectorsConfig.{side}_head_dim must be even (RoPE rotates pairs)")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"LTX2ConnectorsConfig.rope_type={self.rope_type!r} must be one of {ROPE_TYPES}")
        if self.rope_theta <= 1:
            raise ValueError(f"LTX2ConnectorsConfig.rope_theta={self.rope_theta!r} must be greater than 1")
        if self.norm_eps <= 0:
            raise ValueError(f"LTX2ConnectorsConfig.norm_eps={self.norm_eps!r} must be positive")
        for name in ("per_modality_projections", "projection_bias", "video_gated_attention", "audio_gated_attention"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"LTX2ConnectorsConfig.{name}={getattr(self, name)!r} must be True or False")


def normalize_hidden_states(hidden_states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`[B, L, C, K]` hidden states (K of them per channel) -> `[B, L, C * K]`, each of the K states
    normalised per sample over the tokens `mask` keeps (`8 * (x - mean) / (max - min)`), padding zeroed.

    Computed in the input's dtype, as both references do (the model was trained that way).
    """
    b, _, c, _ = hidden_states.shape
    keep = mask.bool()[:, :, None, None]
    count = mask.sum(dim=-1).view(b, 1, 1, 1)
    mean = hidden_states.masked_fill(~keep, 0.0).sum(dim=(1, 2), keepdim=True) / (count * c + NORM_EPS)
    low = hidden_states.masked_fill(~keep, float("inf")).amin(dim=(1, 2), keepdim=True)
    high = hidden_states.masked_fill(~keep, float("-inf")).amax(dim=(1, 2), keepdim=True)
    normed = (hidden_states - mean) / (high - low + NORM_EPS) * NORM_SCALE
    return normed.flatten(2).masked_fill(~keep[..., 0], 0.0).to(hidden_states.dtype)


def rms_normalize_hidden_states(hidden_states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """LTX-2.3's normalisation: `[B, L, C, K]` -> `[B, L, C * K]`, each of a token's K states divided by
    its root mean square over the C features, padding zeroed. No statistic crosses tokens, so the
    padding does not change the prompt tokens' values.

    Computed in the input's dtype, as both references do."""
    mean_square = hidden_states.square().mean(dim=2, keepdim=True)
    normed = hidden_states * torch.rsqrt(mean_square + NORM_EPS)
    return normed.flatten(2).masked_fill(~mask.bool()[..., None], 0.0)


class TextEmbeddingProjection(nn.Module):
    """ltx-core's `text_embedding_projection`: 2.0's `aggregate_embed` (shared by both streams), or
    2.3's `video_aggregate_embed` / `audio_aggregate_embed`, each to its stream's width."""

    def __init__(self, config: LTX2ConnectorsConfig):
        super().__init__()
        flat = config.caption_channels * config.text_proj_in_factor
        if config.per_modality_projections:
            for side in ("video", "audio"):
                width = getattr(config, f"{side}_num_heads") * getattr(config, f"{side}_head_dim")
                setattr(self, f"{side}_aggregate_embed", nn.Linear(flat, width, bias=config.projection_bias))
        else:
            self.aggregate_embed = nn.Linear(flat, config.caption_channels, bias=config.projection_bias)


class ConnectorBlock(nn.Module):
    """`x + attn1(rms(x))`, then `x + ff(rms(x))` (weightless RMSNorms); `gated` (2.3): attn1's heads are
    gated by `to_gate_logits`."""

    def __init__(self, dim: int, heads: int, head_dim: int, eps: float, rope_type: str, gated: bool = False):
        super().__init__()
        self.eps = eps
        self.attn1 = Attention(dim, dim, heads, head_dim, eps, rope_type, gated)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, rope) -> torch.Tensor:
        x = x + self.attn1(F.rms_norm(x, (x.shape[-1],), eps=self.eps), rope=rope)
        return x + self.ff(F.rms_norm(x, (x.shape[-1],), eps=self.eps))


class EmbeddingsConnector(nn.Module):
    """One stream's connector (ltx-core `Embeddings1DConnector`): registers fill the padding, then blocks."""

    def __init__(self, config: LTX2ConnectorsConfig, side: str):
        super().__init__()
        self.config = config
        self.heads = getattr(config, f"{side}_num_heads")
        head_dim = getattr(config, f"{side}_head_dim")
        width = self.heads * head_dim
        self.learnable_registers = nn.Parameter(torch.empty(getattr(config, f"{side}_num_registers"), width))
        gated = getattr(config, f"{side}_gated_attention")
        self.transformer_1d_blocks = nn.ModuleList(
            ConnectorBlock(width, self.heads, head_dim, config.norm_eps, config.rope_type, gated)
            for _ in range(getattr(config, f"{side}_num_layers"))
        )
        self.gradient_checkpointing = False

    def fill_padding(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Prompt tokens moved to the front in order; position `i` past them gets register `i % registers`."""
        b, length, width = x.shape
        registers = self.learnable_registers.to(x.dtype)
        if length % registers.shape[0]:
            raise ValueError(
                f"the prompt length {length} must be a multiple of the {registers.shape[0]} learnable registers "
                "(pass max_sequence_length as such a multiple, e.g. 1024)"
            )
        keep = mask.bool().to(torch.int8)
        order = torch.argsort(1 - keep, dim=1, stable=True)  # prompt tokens first, in their order
        front = torch.gather(x, 1, order[..., None].expand(-1, -1, width))
        valid = torch.arange(length, device=x.device)[None, :] < keep.sum(dim=1, keepdim=True)
        tiled = registers.repeat(length // registers.shape[0], 1)
        return torch.where(valid[..., None], front, tiled[None])

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.fill_padding(x, mask)
        positions = torch.arange(x.shape[1], dtype=torch.float32, device=x.device)[None, None, :]
        rope = rope_from_positions(positions, (self.config.rope_max_pos,), x.shape[-1], self.heads, self.config)
        for block in self.transformer_1d_blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, rope, use_reentrant=False)
            else:
                x = block(x, rope)
        return F.rms_norm(x, (x.shape[-1],), eps=self.config.norm_eps)


class LTX2TextConnectors(nn.Module):
    """LTX-2 text connectors. `forward(hidden_states, attention_mask)` -> `(video_context, audio_context,
    mask)`, contexts `[B, L, width]` for the DiT's `video_context` / `audio_context` (2.0: both
    `caption_channels` wide; 2.3: each stream's `heads x head_dim`, the DiT's own widths)."""

    offload_units = (
        "video_embeddings_connector.transformer_1d_blocks",
        "audio_embeddings_connector.transformer_1d_blocks",
    )
    compile_units = offload_units
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")

    def __init__(self, config: LTX2ConnectorsConfig | None = None):
        super().__init__()
        self.config = config = config if config is not None else LTX2ConnectorsConfig()
        self.text_embedding_projection = TextEmbeddingProjection(config)
        self.video_embeddings_connector = EmbeddingsConnector(config, "video")
        self.audio_embeddings_connector = EmbeddingsConnector(config, "audio")

    @property
    def gradient_checkpointing(self) -> bool:
        return self.video_embeddings_connector.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        self.video_embeddings_connector.gradient_checkpointing = bool(value)
        self.audio_embeddings_connector.gradient_checkpointing = bool(value)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`hidden_states` as `gemma_prompt_embeds` returns them: `[B, L, C * K]` channel-major (or `[B, L, C, K]`),
        C = `caption_channels`, K = `text_proj_in_factor`; `attention_mask` `[B, L]`, 1 / True for prompt
        tokens (any padding side). Computation runs in `hidden_states.dtype`. Returns the video and audio
        contexts `[B, L, width]` and their keep-mask `[B, L]` (int64, all ones: registers fill the padding)."""
        cfg = self.config
        flat = cfg.caption_channels * cfg.text_proj_in_factor
        if hidden_states.dim() == 3 and hidden_states.shape[-1] == flat:
            hidden_states = hidden_states.unflatten(2, (cfg.caption_channels, cfg.text_proj_in_factor))
        if hidden_states.dim() != 4 or hidden_states.shape[2:] != (cfg.caption_channels, cfg.text_proj_in_factor):
            raise ValueError(
                f"hidden_states has shape {tuple(hidden_states.shape)}; expected [B, L, {flat}] or "
                f"[B, L, {cfg.caption_channels}, {cfg.text_proj_in_factor}] (caption_channels x text_proj_in_factor)"
            )
        if attention_mask.shape != hidden_states.shape[:2]:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; expected [B, L] = {tuple(hidden_states.shape[:2])}"
            )
        projection = self.text_embedding_projection
        if cfg.per_modality_projections:
            normed = rms_normalize_hidden_states(hidden_states, attention_mask)
            video_in = projection.video_aggregate_embed(normed * self._rescale("video"))
            audio_in = projection.audio_aggregate_embed(normed * self._rescale("audio"))
        else:
            video_in = audio_in = projection.aggregate_embed(normalize_hidden_states(hidden_states, attention_mask))
        video = self.video_embeddings_connector(video_in, attention_mask)
        audio = self.audio_embeddings_connector(audio_in, attention_mask)
        mask = torch.ones(attention_mask.shape, dtype=torch.int64, device=attention_mask.device)
        return video, audio, mask

    def _rescale(self, side: str) -> float:
        """2.3: unit-RMS features are scaled by `sqrt(width / caption_channels)` before the stream's
        projection (ltx-core's `_rescale_norm`)."""
        cfg = self.config
        width = getattr(cfg, f"{side}_num_heads") * getattr(cfg, f"{side}_head_dim")
        return math.sqrt(width / cfg.caption_channels)


__all__ = [
    "LTX2ConnectorsConfig",
    "LTX2TextConnectors",
    "normalize_hidden_states",
    "rms_normalize_hidden_states",
]
