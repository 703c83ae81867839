"""The LTX-2 audio-video denoiser (LTX-2.0 19B, LTX-2.3 22B), with ltx-core's original key names.

Two token streams run side by side through every block: video (4096 wide, 32 heads x 128) and audio
(2048 wide, 32 heads x 64). Each block does, per stream, AdaLN-modulated self-attention, text
cross-attention, then the two audio<->video cross-attentions (audio->video: video queries, audio
keys/values; video->audio the reverse, both reading the streams as they were before either update),
then an AdaLN-modulated GELU-tanh feed-forward. Attention layers have biases and RMSNorm over the
whole q / k width; the block norms are weightless RMSNorms.

Modulation comes from PixArt-style `adaln_single` embedders of the timestep: one per stream for the
blocks (6 vectors) and the output layer, plus two per stream for the audio<->video attentions (4
scale/shift vectors and 1 gate), each added to a per-block learned table.

LTX-2.3 (`gated_attention`, `cross_attention_adaln`, `caption_projection=False`) adds per-head output
gates to every attention, an AdaLN (shift, scale, gate: block tables of 9 rows) on the text
cross-attention's query and a shift / scale of the text keys' and values' input from per-block
`prompt_scale_shift_table`s plus `prompt_adaln_single` embedders of each stream's sigma; its
connectors output the stream widths, so there is no caption projection. Its audio<->video AdaLN reads
the other stream's sigma (`cross_modal_timestep`).

Positions are RoPE over fractional coordinates: video tokens carry (time in seconds, pixel row,
pixel column) bounds, audio tokens time bounds; the cross-modal attentions rotate by time only.
The released model uses the "split" layout (each head's first and second halves form the pairs).

Module names equal the `model.diffusion_model.*` keys of `ltx-2-19b-dev.safetensors` and
`ltx-2.3-22b-dev.safetensors` (minus the text connectors, a separate model), so those files load as
is. Calling conventions follow diffusers' `LTX2VideoTransformer3DModel` as its pipeline calls it:
timesteps already multiplied by 1000 (the scheduler's `t`, also the unit of `sigma`), text embeddings
as the connectors return them (2.0: 3840 wide, projected here; 2.3: already at the stream widths).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from diffsynth.runtime.attention import attention
from diffsynth.runtime.layers import add_mul, rope_tables, timestep_embedding
from diffsynth.runtime.parallel import SequenceShards, active_sequence, batch_parallel, shard_sequence
from diffsynth.runtime.step_cache import run_blocks

TIME_FREQ_DIM = 256  # sinusoidal features fed to every adaln_single embedder
MASK_BIAS = -10000.0  # additive score bias of a masked text token (the references' value)
ROPE_TYPES = ("split", "interleaved")
SKIP_KINDS = ("video_self", "audio_self", "a2v", "v2a")  # attentions `AttentionSkip` can switch off
# Timestep of a stream's audio<->video AdaLN (scale/shift, gate): "own" its own (per-token) timestep for
# both (LTX-2.0; diffusers `use_cross_timestep=False`); "cross" the other stream's sigma for both (diffusers
# `use_cross_timestep=True`, its pipelines' default, and ltx-core from 2026-03); "cross_gate" its own
# timestep for scale/shift and the other stream's sigma for the gate (ltx-core from 2026-05).
CROSS_MODAL_TIMESTEPS = ("own", "cross", "cross_gate")

Rope = tuple[torch.Tensor, torch.Tensor]  # (cos, signed sin), each [B, L, width] float32
# Per attention of one block, which batch rows run it: None all, False none, else a bool keep-mask [B, 1, 1].
Keep = torch.Tensor | bool | None


@dataclass(frozen=True)
class AttentionSkip:
    """Attentions some rows of a batch skip, as the authors' extra guidance passes do (ltx-core's
    `Perturbation`), so those passes can share one batch with the conditional one.

    `kind`: "video_self" / "audio_self" replace a stream's self-attention by its value projection (STG,
    spatio-temporal guidance); "a2v" / "v2a" drop the audio->video / video->audio attention's update
    (modality isolation). `blocks`: block indices (None: every block); `samples`: batch rows (None: all).
    """

    kind: str
    blocks: tuple[int, ...] | None = None
    samples: tuple[int, ...] | None = None


@dataclass
class LTX2DiTConfig:
    """Architecture of the LTX-2 audio-video DiT; defaults are the released LTX-2 19B ("2.0")."""

    in_channels: int = 128
    out_channels: int = 128
    num_heads: int = 32
    head_dim: int = 128
    audio_in_channels: int = 128
    audio_out_channels: int = 128
    audio_num_heads: int = 32
    audio_head_dim: int = 64
    num_layers: int = 48
    caption_channels: int = 3840
    norm_eps: float = 1e-6
    rope_type: str = "split"
    rope_theta: float = 10000.0
    rope_max_pos: tuple[int, int, int] = (20, 2048, 2048)  # (seconds*fps scale, pixels, pixels) of the video grid
    audio_rope_max_pos: int = 20
    rope_double_precision: bool = True
    # sigma -> t factor (the caller passes t); only the ratio below enters forward, for the a2v / v2a gates
    timestep_scale_multiplier: int = 1000
    av_ca_timestep_scale_multiplier: int = 1000
    # How latent positions map to pixel / time coordinates (used when positions are built here).
    vae_scale_factors: tuple[int, int, int] = (8, 32, 32)
    causal_offset: int = 1
    audio_sampling_rate: int = 16000
    audio_hop_length: int = 160
    audio_scale_factor: int = 4
    # LTX-2.3 (22B) switches; the defaults are LTX-2.0's.
    gated_attention: bool = False  # every attention scales each head's output by 2 * sigmoid(to_gate_logits(query))
    # 9-row block tables: the text cross-attention gets a query AdaLN (shift, scale, gate) and its text K/V a
    # per-block `prompt_scale_shift_table` modulation
    cross_attention_adaln: bool = False
    # with cross_attention_adaln: the text K/V modulation also follows sigma (`prompt_adaln_single`);
    # False is LTX-2.5's static per-block table (cacheable K/V)
    prompt_adaln_single: bool = True
    caption_projection: bool = True  # False (2.3): the connectors already output the stream widths
    ff_bias: bool = True  # False in LTX-2.5
    audio_ff_bias: bool = True
    keyframes_abs_pos_embedding: bool = False  # LTX-2.5: a learned vector added to marked keyframe tokens
    # Which timestep drives the audio<->video attentions' AdaLN (see `CROSS_MODAL_TIMESTEPS`); None picks
    # "cross" for a cross_attention_adaln (2.3+) model, else "own" (2.0).
    cross_modal_timestep: str | None = None

    def __post_init__(self):
        if self.cross_modal_timestep is not None and self.cross_modal_timestep not in CROSS_MODAL_TIMESTEPS:
            raise ValueError(
                f"LTX2DiTConfig.cross_modal_timestep={self.cross_modal_timestep!r} must be one of "
                f"{CROSS_MODAL_TIMESTEPS}"
            )
        self.rope_max_pos = tuple(int(v) for v in self.rope_max_pos)
        self.vae_scale_factors = tuple(int(v) for v in self.vae_scale_factors)
        self.rope_theta = float(self.rope_theta)
        positive = (
            "in_channels",
            "out_channels",
            "num_heads",
            "head_dim",
            "audio_in_channels",
            "audio_out_channels",
            "audio_num_heads",
            "audio_head_dim",
            "caption_channels",
            "audio_rope_max_pos",
            "timestep_scale_multiplier",
            "av_ca_timestep_scale_multiplier",
            "audio_sampling_rate",
            "audio_hop_length",
            "audio_scale_factor",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"LTX2DiTConfig.{name}={value!r} must be a positive integer")
        if not isinstance(self.num_layers, int) or self.num_layers < 0:
            raise ValueError(f"LTX2DiTConfig.num_layers={self.num_layers!r} must be a non-negative integer")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"LTX2DiTConfig.rope_type={self.rope_type!r} must be one of {ROPE_TYPES}")
        for name in ("head_dim", "audio_head_dim"):
            if getattr(self, name) % 2:
                raise ValueError(f"LTX2DiTConfig.{name}={getattr(self, name)} must be even (RoPE rotates pairs)")
        if len(self.rope_max_pos) != 3 or min(self.rope_max_pos) < 1:
            raise ValueError(f"LTX2DiTConfig.rope_max_pos={self.rope_max_pos} must be 3 positive integers (t, h, w)")
        if len(self.vae_scale_factors) != 3 or min(self.vae_scale_factors) < 1:
            raise ValueError(f"LTX2DiTConfig.vae_scale_factors={self.vae_scale_factors} must be 3 positive integers")
        if self.rope_theta <= 1:
            raise ValueError(f"LTX2DiTConfig.rope_theta={self.rope_theta!r} must be greater than 1")
        if self.norm_eps <= 0:
            raise ValueError(f"LTX2DiTConfig.norm_eps={self.norm_eps!r} must be positive")

    @classmethod
    def ltx23(cls, **overrides) -> LTX2DiTConfig:
        """The released LTX-2.3 (22B) DiT: LTX-2.0's sizes with gated attentions, the text cross-attention's
        AdaLN and no caption projection."""
        return cls(**{"gated_attention": True, "cross_attention_adaln": True, "caption_projection": False, **overrides})

    @property
    def cross_modal_mode(self) -> str:
        """`cross_modal_timestep`, or when unset the model's own: "cross" for 2.3+ (`cross_attention_adaln`),
        "own" for 2.0. Resolved here, not stored, so `dataclasses.replace` of the switches keeps it right."""
        if self.cross_modal_timestep is not None:
            return self.cross_modal_timestep
        return "cross" if self.cross_attention_adaln else "own"

    @property
    def dim(self) -> int:
        """Width of the video stream."""
        return self.num_heads * self.head_dim

    @property
    def audio_dim(self) -> int:
        """Width of the audio stream (also the width of both audio<->video attentions)."""
        return self.audio_num_heads * self.audio_head_dim


def modulation_rows(config: LTX2DiTConfig) -> int:
    """Rows of a block's `scale_shift_table` and vectors per token of `adaln_single`: self-attention and
    feed-forward (shift, scale, gate each), plus the text cross-attention's with `cross_attention_adaln`."""
    return 9 if config.cross_attention_adaln else 6


# ----------------------------------------------------------------------------------- positions
def video_positions(
    config: LTX2DiTConfig, batch: int, num_frames: int, height: int, width: int, fps: float, device=None
) -> torch.Tensor:
    """`[B, 3, F*H*W, 2]` [start, end) bounds of each latent video token in (seconds, pixel row, pixel column).

    Tokens are ordered frame, row, column (patch size 1). The first latent frame covers one pixel frame
    (causal VAE), so frame bounds are shifted by `causal_offset - scale` and clamped at 0 before / fps.
    """
    grid = torch.meshgrid(
        *(torch.arange(n, dtype=torch.float32, device=device) for n in (num_frames, height, width)), indexing="ij"
    )
    start = torch.stack(grid).flatten(1)  # [3, N]
    scale = torch.tensor(config.vae_scale_factors, dtype=torch.float32, device=device)[:, None, None]
    pixels = torch.stack((start, start + 1), dim=-1) * scale  # [3, N, 2]
    frames = (pixels[0] + config.causal_offset - config.vae_scale_factors[0]).clamp(min=0) / fps
    return torch.cat((frames[None], pixels[1:])).expand(batch, -1, -1, -1)


def keyframe_positions(
    config: LTX2DiTConfig, height: int, width: int, pixel_frame: int, fps: float, device=None
) -> torch.Tensor:
    """`[1, 3, H*W, 2]` bounds of a one-image keyframe's latent tokens placed at video frame `pixel_frame`:
    the rows and columns as `video_positions` gives them, the time `[pixel_frame, pixel_frame + 1)` / fps
    (one pixel frame, no causal shift), as ltx-core's `VideoConditionByKeyframeIndex` places them."""
    rows = video_positions(config, 1, 1, height, width, fps, device)[:, 1:]
    frames = torch.tensor([pixel_frame, pixel_frame + 1], dtype=torch.float32, device=device) / fps
    return torch.cat((frames.expand(1, 1, height * width, 2), rows), dim=1)


def audio_positions(config: LTX2DiTConfig, batch: int, num_frames: int, device=None, shift: int = 0) -> torch.Tensor:
    """`[B, 1, num_frames, 2]` [start, end) seconds of each latent audio frame (mel hop times the audio VAE's
    `audio_scale_factor`; the first frame is causal like the video's)."""
    index = torch.arange(shift, num_frames + shift, dtype=torch.float32, device=device)
    scale = config.audio_scale_factor
    bounds = torch.stack((index, index + 1), dim=-1) * scale
    seconds = (
        (bounds + config.causal_offset - scale).clamp(min=0) * config.audio_hop_length / config.audio_sampling_rate
    )
    return seconds[None, None].expand(batch, -1, -1, -1)


def rope_from_positions(
    positions: torch.Tensor,
    max_pos: tuple[int, ...],
    width: int,
    heads: int,
    config: LTX2DiTConfig,
) -> Rope:
    """RoPE tables `(cos, signed sin)`, each `[B, L, width]` float32, for `positions` `[B, axes, L, 2]`
    (bounds: their midpoints are used) or `[B, axes, L]`.

    Each axis position is divided by its `max_pos` and mapped to [-1, 1]; frequencies are
    `theta ** linspace(0, 1) * pi / 2`, interleaved across axes and left-padded with identity
    rotations to `width / 2` pairs. "split": pair `i` of a head is channels `(i, i + head_dim/2)`;
    "interleaved": channels `(2i, 2i+1)` of the whole width.
    """
    if positions.dim() == 4:
        positions = positions.float().mean(dim=-1)  # (start + end) / 2
    axes = positions.shape[1]
    fraction = torch.stack([positions[:, a].float() / max_pos[a] for a in range(axes)], dim=-1)  # [B, L, axes]
    precision = torch.float64 if config.rope_double_precision else torch.float32
    steps = torch.linspace(0.0, 1.0, width // (2 * axes), dtype=precision, device=positions.device)
    freqs = (config.rope_theta**steps * math.pi / 2.0).float()
    angles = ((fraction[..., None] * 2 - 1) * freqs).transpose(-1, -2).flatten(2)  # [B, L, freqs * axes]
    if config.rope_type == "split":
        pad = width // 2 - angles.shape[-1]
        cos = F.pad(angles.cos(), (pad, 0), value=1.0).unflatten(-1, (heads, -1))
        sin = F.pad(angles.sin(), (pad, 0), value=0.0).unflatten(-1, (heads, -1))
        return torch.cat((cos, cos), -1).flatten(-2), torch.cat((-sin, sin), -1).flatten(-2)
    cos, signed_sin = rope_tables(angles.cos(), angles.sin())
    pad = width - cos.shape[-1]
    return F.pad(cos, (pad, 0), value=1.0), F.pad(signed_sin, (pad, 0), value=0.0)


def rotate(x: torch.Tensor, rope: Rope, head_dim: int, rope_type: str) -> torch.Tensor:
    """Apply `rope_from_positions` tables to `x` `[B, L, heads * head_dim]`: `x * cos + partner(x) * signed_sin`
    in float32 (returned in `x.dtype`), where `partner` swaps each head's halves ("split") or each
    channel pair ("interleaved")."""
    cos, signed_sin = rope
    if rope_type == "split":
        partner = x.unflatten(-1, (-1, 2, head_dim // 2)).flip(-2).flatten(-3)
    else:
        partner = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return add_mul(x * cos, partner, signed_sin).to(x.dtype)


# ----------------------------------------------------------------------------------- layers
class TimestepEmbedder(nn.Module):
    """`linear_2(silu(linear_1(sinusoid(t))))`."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(TIME_FREQ_DIM, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(timestep_embedding(t, TIME_FREQ_DIM).to(dtype))))


class TimestepEmbedding(nn.Module):
    """Holds the embedder under ltx-core's `emb.timestep_embedder` name."""

    def __init__(self, dim: int):
        super().__init__()
        self.timestep_embedder = TimestepEmbedder(dim)


class AdaLayerNormSingle(nn.Module):
    """PixArt adaLN-single: the timestep embedding `e` and `linear(silu(e))` (`coefficient` vectors of `dim`)."""

    def __init__(self, dim: int, coefficient: int):
        super().__init__()
        self.emb = TimestepEmbedding(dim)
        self.linear = nn.Linear(dim, coefficient * dim)

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        embedded = self.emb.timestep_embedder(t, dtype)
        return self.linear(F.silu(embedded)), embedded


class CaptionProjection(nn.Module):
    """`linear_2(gelu_tanh(linear_1(x)))`: connector output (3840) -> stream width."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(x), approximate="tanh"))


class GELUProjection(nn.Module):
    """`gelu_tanh(proj(x))` (the feed-forward's first layer, named like ltx-core's `net.0.proj`)."""

    def __init__(self, dim: int, hidden: int, bias: bool = True):
        super().__init__()
        self.proj = nn.Linear(dim, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """4x GELU-tanh MLP; `net.1` is a parameterless placeholder so the keys read `net.0.proj` / `net.2`."""

    def __init__(self, dim: int, mult: int = 4, bias: bool = True):
        super().__init__()
        self.net = nn.Sequential(
            GELUProjection(dim, mult * dim, bias), nn.Identity(), nn.Linear(mult * dim, dim, bias=bias)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Attention(nn.Module):
    """Multi-head attention with biases, RMSNorm over the whole q / k width and optional RoPE on q and k;
    `gated` (LTX-2.3) adds `to_gate_logits`, a per-head gate `2 * sigmoid(logits(query input))` on the
    heads' outputs before `to_out` (1 at zero logits)."""

    def __init__(
        self,
        query_dim: int,
        context_dim: int,
        heads: int,
        head_dim: int,
        eps: float,
        rope_type: str,
        gated: bool = False,
    ):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim, self.rope_type = heads, head_dim, rope_type
        self.q_norm = nn.RMSNorm(inner, eps=eps)
        self.k_norm = nn.RMSNorm(inner, eps=eps)
        self.to_q = nn.Linear(query_dim, inner)
        self.to_k = nn.Linear(context_dim, inner)
        self.to_v = nn.Linear(context_dim, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim)])
        self.to_gate_logits = nn.Linear(query_dim, heads) if gated else None

    def _gate(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.to_gate_logits is None:
            return out
        gates = 2.0 * torch.sigmoid(self.to_gate_logits(x))  # [B, L, heads]
        return (out.unflatten(-1, (self.heads, self.head_dim)) * gates[..., None]).flatten(-2)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        rope: Rope | None = None,
        k_rope: Rope | None = None,
        keep: Keep = None,
        sequence_parallel: bool = False,
        gather_keys: bool = False,
    ) -> torch.Tensor:
        """`keep` (STG): rows where it is False output `to_out(to_v(context))`, the values passed through
        unmixed; `False` for the whole batch skips the query / key work. Under sequence parallelism
        (`parallel.shard_sequence`), `sequence_parallel` marks a self-attention over the rank's video
        shard, and `gather_keys` an attention whose keys and values are video shards but whose queries
        are whole (video->audio): its keys and values are gathered first. The head gates (`gated`) apply to
        the passed-through values too, as in both references."""
        context = x if context is None else context
        v = self.to_v(context)
        if keep is False:
            return self.to_out[0](self._gate(x, v))
        q = self.q_norm(self.to_q(x))
        k = self.k_norm(self.to_k(context))
        if rope is not None:
            q = rotate(q, rope, self.head_dim, self.rope_type)
            k = rotate(k, rope if k_rope is None else k_rope, self.head_dim, self.rope_type)
        kv = v
        shards = active_sequence() if gather_keys else None
        if shards is not None:
            k, kv = shards.gather(k), shards.gather(v)
        heads = (self.heads, self.head_dim)
        out = attention(
            q.unflatten(-1, heads),
            k.unflatten(-1, heads),
            kv.unflatten(-1, heads),
            mask,
            sequence_parallel=sequence_parallel,
        ).flatten(2)
        if keep is not None:
            out = torch.where(keep, out, v)
        return self.to_out[0](self._gate(x, out))


@dataclass
class BlockInputs:
    """Per-call tensors every block reads (computed once per forward). Modulation tensors are
    `[B, 1 or L, n * width]`; masks additive `[B, 1, 1, L_text]` or None; ropes `rope_from_positions` tables."""

    video_context: torch.Tensor
    audio_context: torch.Tensor
    video_context_mask: torch.Tensor | None
    audio_context_mask: torch.Tensor | None
    video_mod: torch.Tensor
    audio_mod: torch.Tensor
    video_cross_mod: torch.Tensor
    audio_cross_mod: torch.Tensor
    video_cross_gate: torch.Tensor
    audio_cross_gate: torch.Tensor
    video_rope: Rope
    audio_rope: Rope
    video_cross_rope: Rope
    audio_cross_rope: Rope
    # LTX-2.3 text K/V modulation from `prompt_adaln_single(sigma)` `[B, 1, 2 * width]` (None: table only)
    video_prompt_mod: torch.Tensor | None = None
    audio_prompt_mod: torch.Tensor | None = None
    video_self_mask: torch.Tensor | None = None  # sequence parallelism: the padding of the divided video tokens

    def video_shard(self, shards: SequenceShards, tokens: int) -> BlockInputs:
        """These inputs for one rank's share of the `tokens` video tokens: per-token modulation and the
        video RoPE tables divided like the tokens, the padding masked as self-attention keys."""

        def divide(x: torch.Tensor) -> torch.Tensor:
            return shards.shard(x) if x.shape[1] == tokens else x  # [B, 1, ...] is per sample

        batch = self.video_mod.shape[0]
        return replace(
            self,
            video_mod=divide(self.video_mod),
            video_cross_mod=divide(self.video_cross_mod),
            video_cross_gate=divide(self.video_cross_gate),
            video_rope=tuple(divide(r) for r in self.video_rope),
            video_cross_rope=tuple(divide(r) for r in self.video_cross_rope),
            video_self_mask=shards.key_mask(None, batch, self.video_mod.device),
        )


def _ada_values(table: torch.Tensor, mod: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-block `table` `[n, D]` plus the shared modulation `mod` `[B, T, n * D]` -> n tensors `[B, T, D]`."""
    n = table.shape[0]
    return (table.to(mod.dtype) + mod.unflatten(-1, (n, -1))).unbind(dim=2)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`x * (1 + scale) + shift` (AdaLN)."""
    return add_mul(shift, x, 1 + scale)


class LTX2Block(nn.Module):
    """One audio-video transformer block (ltx-core `BasicAVTransformerBlock`)."""

    def __init__(self, config: LTX2DiTConfig):
        super().__init__()
        dim, adim, eps, rope = config.dim, config.audio_dim, config.norm_eps, config.rope_type
        heads, head_dim = config.num_heads, config.head_dim
        aheads, ahead_dim = config.audio_num_heads, config.audio_head_dim
        gated, rows = config.gated_attention, modulation_rows(config)
        self.eps = eps
        self.attn1 = Attention(dim, dim, heads, head_dim, eps, rope, gated)
        self.attn2 = Attention(dim, dim, heads, head_dim, eps, rope, gated)
        self.ff = FeedForward(dim, bias=config.ff_bias)
        self.scale_shift_table = nn.Parameter(torch.empty(rows, dim))
        self.audio_attn1 = Attention(adim, adim, aheads, ahead_dim, eps, rope, gated)
        self.audio_attn2 = Attention(adim, adim, aheads, ahead_dim, eps, rope, gated)
        self.audio_ff = FeedForward(adim, bias=config.audio_ff_bias)
        self.audio_scale_shift_table = nn.Parameter(torch.empty(rows, adim))
        # Both audio<->video attentions run at the audio width and head count.
        self.audio_to_video_attn = Attention(dim, adim, aheads, ahead_dim, eps, rope, gated)
        self.video_to_audio_attn = Attention(adim, dim, aheads, ahead_dim, eps, rope, gated)
        self.scale_shift_table_a2v_ca_audio = nn.Parameter(torch.empty(5, adim))
        self.scale_shift_table_a2v_ca_video = nn.Parameter(torch.empty(5, dim))
        self.cross_attention_adaln = config.cross_attention_adaln
        if self.cross_attention_adaln:  # (shift, scale) of the text keys / values
            self.prompt_scale_shift_table = nn.Parameter(torch.empty(2, dim))
            self.audio_prompt_scale_shift_table = nn.Parameter(torch.empty(2, adim))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), eps=self.eps)

    def forward(
        self, vx: torch.Tensor, ax: torch.Tensor, inp: BlockInputs, keep: tuple[Keep, ...] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`keep`: which rows run the video self-, audio self-, a2v and v2a attentions (SKIP_KINDS order);
        None runs them all. A stream without tokens (text-to-audio's video) is left out, with the attentions
        between the streams, as ltx-core leaves out an absent modality."""
        keep_video, keep_audio, keep_a2v, keep_v2a = (None,) * 4 if keep is None else keep
        run_video, run_audio = vx.shape[1] > 0, ax.shape[1] > 0
        video_values = _ada_values(self.scale_shift_table, inp.video_mod)
        audio_values = _ada_values(self.audio_scale_shift_table, inp.audio_mod)
        v_shift, v_scale, v_gate, v_shift_ff, v_scale_ff, v_gate_ff = video_values[:6]
        a_shift, a_scale, a_gate, a_shift_ff, a_scale_ff, a_gate_ff = audio_values[:6]
        # self-attention, then text cross-attention (AdaLN-modulated only with cross_attention_adaln), per stream
        if run_video:
            v_attn = self.attn1(
                _modulate(self._norm(vx), v_shift, v_scale),
                mask=inp.video_self_mask,
                rope=inp.video_rope,
                keep=keep_video,
                sequence_parallel=True,
            )
            vx = add_mul(vx, v_attn, v_gate)
        if run_audio:
            a_attn = self.audio_attn1(_modulate(self._norm(ax), a_shift, a_scale), rope=inp.audio_rope, keep=keep_audio)
            ax = add_mul(ax, a_attn, a_gate)
        if self.cross_attention_adaln:
            if run_video:
                vx = self._text_adaln(
                    self.attn2, vx, video_values[6:], inp.video_context, inp.video_context_mask,
                    self.prompt_scale_shift_table, inp.video_prompt_mod,
                )  # fmt: skip
            if run_audio:
                ax = self._text_adaln(
                    self.audio_attn2, ax, audio_values[6:], inp.audio_context, inp.audio_context_mask,
                    self.audio_prompt_scale_shift_table, inp.audio_prompt_mod,
                )  # fmt: skip
        else:
            if run_video:
                vx = vx + self.attn2(self._norm(vx), inp.video_context, inp.video_context_mask)
            if run_audio:
                ax = ax + self.audio_attn2(self._norm(ax), inp.audio_context, inp.audio_context_mask)

        # audio <-> video: both directions read the streams as they are now
        if run_video and run_audio and (keep_a2v is not False or keep_v2a is not False):
            vx, ax = self._cross_modal(vx, ax, inp, keep_a2v, keep_v2a)

        if run_video:
            vx = add_mul(vx, self.ff(_modulate(self._norm(vx), v_shift_ff, v_scale_ff)), v_gate_ff)
        if run_audio:
            ax = add_mul(ax, self.audio_ff(_modulate(self._norm(ax), a_shift_ff, a_scale_ff)), a_gate_ff)
        return vx, ax

    def _text_adaln(
        self,
        attn: Attention,
        x: torch.Tensor,
        query_values: Sequence[torch.Tensor],
        context: torch.Tensor,
        mask: torch.Tensor | None,
        table: torch.Tensor,
        prompt_mod: torch.Tensor | None,
    ) -> torch.Tensor:
        """LTX-2.3 text cross-attention: AdaLN on the normed query (rows 6-8 of the block table: shift, scale,
        gate on the output) and shift / scale of the raw text context (the block's prompt table plus the
        sigma-driven `prompt_mod`, or the table alone)."""
        shift_q, scale_q, gate_q = query_values
        if prompt_mod is None:
            shift_kv, scale_kv = table.to(context.dtype)
        else:
            shift_kv, scale_kv = _ada_values(table, prompt_mod)
        out = attn(_modulate(self._norm(x), shift_q, scale_q), _modulate(context, shift_kv, scale_kv), mask)
        return add_mul(x, out, gate_q)

    def _cross_modal(
        self, vx: torch.Tensor, ax: torch.Tensor, inp: BlockInputs, keep_a2v: Keep, keep_v2a: Keep
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The audio->video and video->audio attentions; a direction whose `keep` is False is not computed,
        rows whose keep-mask is False are left as they were."""
        v_a2v_scale, v_a2v_shift, v_v2a_scale, v_v2a_shift = _ada_values(
            self.scale_shift_table_a2v_ca_video[:4], inp.video_cross_mod
        )
        (a2v_gate,) = _ada_values(self.scale_shift_table_a2v_ca_video[4:], inp.video_cross_gate)
        a_a2v_scale, a_a2v_shift, a_v2a_scale, a_v2a_shift = _ada_values(
            self.scale_shift_table_a2v_ca_audio[:4], inp.audio_cross_mod
        )
        (v2a_gate,) = _ada_values(self.scale_shift_table_a2v_ca_audio[4:], inp.audio_cross_gate)
        v_norm, a_norm = self._norm(vx), self._norm(ax)
        new_vx, new_ax = vx, ax
        if keep_a2v is not False:
            a2v = self.audio_to_video_attn(
                _modulate(v_norm, v_a2v_shift, v_a2v_scale),
                _modulate(a_norm, a_a2v_shift, a_a2v_scale),
                rope=inp.video_cross_rope,
                k_rope=inp.audio_cross_rope,
            )
            new_vx = add_mul(vx, a2v_gate, a2v)
            if keep_a2v is not None:
                new_vx = torch.where(keep_a2v, new_vx, vx)
        if keep_v2a is not False:
            v2a = self.video_to_audio_attn(
                _modulate(a_norm, a_v2a_shift, a_v2a_scale),
                _modulate(v_norm, v_v2a_shift, v_v2a_scale),
                rope=inp.audio_cross_rope,
                k_rope=inp.video_cross_rope,
                gather_keys=True,  # audio queries are whole, the video keys divided
            )
            new_ax = add_mul(ax, v2a_gate, v2a)
            if keep_v2a is not None:
                new_ax = torch.where(keep_v2a, new_ax, ax)
        return new_vx, new_ax


# ----------------------------------------------------------------------------------- model
class LTX2DiT(nn.Module):
    """LTX-2 audio-video DiT. `forward(video, audio, video_context, audio_context, timestep, ...)` ->
    `(video velocity [B, L_v, out_channels], audio velocity [B, L_a, audio_out_channels])`."""

    offload_units = ("transformer_blocks",)
    compile_units = ("transformer_blocks",)
    lora_target_modules = (
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "ff.net.0.proj",
        "ff.net.2",
        "audio_ff.net.0.proj",
        "audio_ff.net.2",
    )

    def __init__(self, config: LTX2DiTConfig | None = None):
        super().__init__()
        self.config = config = config if config is not None else LTX2DiTConfig()
        self.gradient_checkpointing = False
        self.step_cache = None  # a FirstBlockCache over `transformer_blocks` (BasePipeline.enable_first_block_cache)
        self.parallel = None  # ParallelGroups dividing batch and video tokens (BasePipeline.enable_parallel)
        dim, adim = config.dim, config.audio_dim
        self.patchify_proj = nn.Linear(config.in_channels, dim)
        self.audio_patchify_proj = nn.Linear(config.audio_in_channels, adim)
        rows = modulation_rows(config)
        self.adaln_single = AdaLayerNormSingle(dim, rows)
        self.audio_adaln_single = AdaLayerNormSingle(adim, rows)
        self.av_ca_video_scale_shift_adaln_single = AdaLayerNormSingle(dim, 4)
        self.av_ca_audio_scale_shift_adaln_single = AdaLayerNormSingle(adim, 4)
        self.av_ca_a2v_gate_adaln_single = AdaLayerNormSingle(dim, 1)
        self.av_ca_v2a_gate_adaln_single = AdaLayerNormSingle(adim, 1)
        if config.cross_attention_adaln and config.prompt_adaln_single:
            self.prompt_adaln_single = AdaLayerNormSingle(dim, 2)
            self.audio_prompt_adaln_single = AdaLayerNormSingle(adim, 2)
        if config.caption_projection:
            self.caption_projection = CaptionProjection(config.caption_channels, dim)
            self.audio_caption_projection = CaptionProjection(config.caption_channels, adim)
        if config.keyframes_abs_pos_embedding:
            self.keyframes_abs_pos_embedding = nn.Parameter(torch.zeros(1, dim))
        self.transformer_blocks = nn.ModuleList(LTX2Block(config) for _ in range(config.num_layers))
        self.scale_shift_table = nn.Parameter(torch.empty(2, dim))
        self.audio_scale_shift_table = nn.Parameter(torch.empty(2, adim))
        self.proj_out = nn.Linear(dim, config.out_channels)
        self.audio_proj_out = nn.Linear(adim, config.audio_out_channels)

    def forward(
        self,
        video: torch.Tensor,
        audio: torch.Tensor,
        video_context: torch.Tensor,
        audio_context: torch.Tensor,
        timestep: torch.Tensor | float,
        *,
        audio_timestep: torch.Tensor | float | None = None,
        sigma: torch.Tensor | float | None = None,
        audio_sigma: torch.Tensor | float | None = None,
        video_context_mask: torch.Tensor | None = None,
        audio_context_mask: torch.Tensor | None = None,
        video_coords: torch.Tensor | None = None,
        audio_coords: torch.Tensor | None = None,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        fps: float = 24.0,
        skips: Sequence[AttentionSkip] = (),
        keyframes_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Velocities for latent video tokens `video` `[B, L_v, in_channels]` (frame-major, patch 1) and audio
        tokens `audio` `[B, L_a, audio_in_channels]`.

        `video_context` / `audio_context` are the text connectors' outputs `[B, L_text, caption_channels]`
        (with `caption_projection=False`, LTX-2.3: `[B, L_text, width]` of each stream), with optional masks
        `[B, L_text]` (bool, or 1 = keep / 0 = drop). `timestep` is the scheduler's `t` = sigma * 1000: a
        scalar, `[B]`, or per token `[B, L_v]`; `audio_timestep` likewise for audio (scalar, `[B]` or
        `[B, L_a]`): by default `timestep`, so it must be given when `timestep` is per video token.
        `sigma` / `audio_sigma` (scalar or `[B]`, in the same units as `timestep`) are each sample's noise
        level of a stream, which LTX-2.3 uses for the text K/V modulation and (`cross_modal_timestep`) the
        other stream's audio<->video AdaLN; when absent, each is its stream's largest per-token timestep
        (the noisy tokens' level: conditioning tokens carry 0, a frozen stream is 0 throughout). 2.0 models
        with the default "own" cross-modal timestep never read them. Positions: `video_coords`
        `[B, 3, L_v, 2]` and `audio_coords` `[B, 1, L_a, 2]` as `video_positions` / `audio_positions` build
        them, or built here from `num_frames`, `height`, `width` (latent sizes) and `fps`. `skips` switch
        attentions off for some rows (`AttentionSkip`: the authors' STG and modality-isolation passes); none
        by default. `keyframes_mask` `[B, L_v]` or `[B, L_v, 1]` (non-zero: a token whose latent holds one
        pixel frame) adds the learned `keyframes_abs_pos_embedding` to those tokens (LTX-2.5; ignored by
        models without it). Computation runs in `video.dtype`.

        Under parallelism (`self.parallel`) the rows are divided over the batch ranks (the keep-masks
        of `skips` with them) and the video tokens over the sequence ranks; the audio stays whole.
        """
        check_inputs(self.config, video, audio, video_context, audio_context)
        b = video.shape[0]
        return batch_parallel(
            self.parallel, b, self._forward, video, audio, video_context, audio_context, timestep,
            audio_timestep=audio_timestep, sigma=sigma, audio_sigma=audio_sigma,
            video_context_mask=video_context_mask, audio_context_mask=audio_context_mask,
            video_coords=video_coords, audio_coords=audio_coords, num_frames=num_frames, height=height,
            width=width, fps=fps, keeps=self._keeps(skips, b), keyframes_mask=keyframes_mask,
        )  # fmt: skip

    def _forward(
        self, video, audio, video_context, audio_context, timestep, *, audio_timestep, sigma, audio_sigma,
        video_context_mask, audio_context_mask, video_coords, audio_coords, num_frames, height, width, fps,
        keeps, keyframes_mask,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        cfg = self.config
        b = video.shape[0]
        dtype = video.dtype
        if video_coords is None:
            if None in (num_frames, height, width) or num_frames * height * width != video.shape[1]:
                raise ValueError(
                    f"pass video_coords, or num_frames, height, width (latent sizes) whose product is the "
                    f"{video.shape[1]} video tokens; got num_frames={num_frames}, height={height}, width={width}"
                )
            video_coords = video_positions(cfg, b, num_frames, height, width, fps, video.device)
        if audio_coords is None:
            audio_coords = audio_positions(cfg, b, audio.shape[1], audio.device)
        _check_coords("video_coords", video_coords, b, 3, video.shape[1])
        _check_coords("audio_coords", audio_coords, b, 1, audio.shape[1])
        video_coords, audio_coords = _shared(video_coords), _shared(audio_coords)

        t = _timesteps("timestep", timestep, b, video.shape[1], video.device)
        if audio_timestep is None and t.shape[1] != 1:
            raise ValueError("timestep is per video token: pass audio_timestep as well ([B] or [B, L_audio])")
        t_audio = (
            t if audio_timestep is None else _timesteps("audio_timestep", audio_timestep, b, audio.shape[1], t.device)
        )
        s_video = t.amax(dim=1, keepdim=True) if sigma is None else _timesteps("sigma", sigma, b, 1, t.device)
        s_audio = (
            t_audio.amax(dim=1, keepdim=True)
            if audio_sigma is None
            else _timesteps("audio_sigma", audio_sigma, b, 1, t.device)
        )
        # audio<->video AdaLN timesteps: (video scale/shift, video gate, audio scale/shift, audio gate)
        mode = cfg.cross_modal_mode
        video_ss, audio_ss = (s_audio, s_video) if mode == "cross" else (t, t_audio)
        video_g, audio_g = (t, t_audio) if mode == "own" else (s_audio, s_video)
        gate_factor = cfg.av_ca_timestep_scale_multiplier / cfg.timestep_scale_multiplier
        video_mod, video_embedded = self._embed(self.adaln_single, t, b, dtype)
        audio_mod, audio_embedded = self._embed(self.audio_adaln_single, t_audio, b, dtype)
        prompt_mods = (None, None)
        if cfg.cross_attention_adaln and cfg.prompt_adaln_single:
            prompt_mods = (
                self._embed(self.prompt_adaln_single, s_video, b, dtype)[0],
                self._embed(self.audio_prompt_adaln_single, s_audio, b, dtype)[0],
            )

        cross_max = max(cfg.rope_max_pos[0], cfg.audio_rope_max_pos)
        adim, aheads = cfg.audio_dim, cfg.audio_num_heads
        inputs = BlockInputs(
            video_context=self._context(video_context, "caption_projection", dtype),
            audio_context=self._context(audio_context, "audio_caption_projection", dtype),
            video_context_mask=_text_bias("video_context_mask", video_context_mask, video_context, dtype),
            audio_context_mask=_text_bias("audio_context_mask", audio_context_mask, audio_context, dtype),
            video_mod=video_mod,
            audio_mod=audio_mod,
            video_cross_mod=self._embed(self.av_ca_video_scale_shift_adaln_single, video_ss, b, dtype)[0],
            audio_cross_mod=self._embed(self.av_ca_audio_scale_shift_adaln_single, audio_ss, b, dtype)[0],
            video_cross_gate=self._embed(self.av_ca_a2v_gate_adaln_single, video_g * gate_factor, b, dtype)[0],
            audio_cross_gate=self._embed(self.av_ca_v2a_gate_adaln_single, audio_g * gate_factor, b, dtype)[0],
            video_rope=rope_from_positions(video_coords, cfg.rope_max_pos, cfg.dim, cfg.num_heads, cfg),
            audio_rope=rope_from_positions(audio_coords, (cfg.audio_rope_max_pos,), adim, aheads, cfg),
            video_cross_rope=rope_from_positions(video_coords[:, :1], (cross_max,), adim, aheads, cfg),
            audio_cross_rope=rope_from_positions(audio_coords[:, :1], (cross_max,), adim, aheads, cfg),
            video_prompt_mod=prompt_mods[0],
            audio_prompt_mod=prompt_mods[1],
        )
        vx = self.patchify_proj(video)
        if keyframes_mask is not None and cfg.keyframes_abs_pos_embedding:
            vx = self._mark_keyframes(vx, keyframes_mask)
        ax = self.audio_patchify_proj(audio.to(dtype))
        blocks = list(zip(self.transformer_blocks, _local_keeps(keeps, video.device), strict=True))

        # sequence parallelism: each rank runs the blocks on its share of the video tokens; the audio
        # tokens (few) are whole on every rank
        with shard_sequence(self.parallel, vx.shape[1]) as shards:
            if shards is not None:
                inputs = inputs.video_shard(shards, vx.shape[1])
                vx = shards.shard(vx)

            def run(part: list, streams: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
                for block, keep in part:
                    extra = (inputs,) if keep is None else (inputs, keep)
                    streams = self._run(block, *streams, *extra)
                return streams

            if blocks:  # the video tokens (with any keyframe tokens) lead: the cache decides on them
                vx, ax = run_blocks(
                    self.step_cache, (vx, ax), lambda s: run(blocks[:1], s), lambda s: run(blocks[1:], s)
                )
            if shards is not None:
                vx = shards.gather(vx)
        return (
            self._output(vx, self.scale_shift_table, video_embedded, self.proj_out),
            self._output(ax, self.audio_scale_shift_table, audio_embedded, self.audio_proj_out),
        )

    def _keeps(self, skips: Sequence[AttentionSkip], batch: int) -> list[tuple[Keep, ...] | None]:
        """Per block, which rows run each of its `SKIP_KINDS` attentions (None for a block nothing skips);
        keep-masks `[B, 1, 1]` on the CPU, divided with the batch under batch parallelism."""
        n = self.config.num_layers
        if not skips:
            return [None] * n
        skipped = {(kind, i): set() for kind in SKIP_KINDS for i in range(n)}
        for skip in skips:
            if not isinstance(skip, AttentionSkip) or skip.kind not in SKIP_KINDS:
                raise ValueError(f"skips holds {skip!r}; expected AttentionSkip with kind in {SKIP_KINDS}")
            blocks = range(n) if skip.blocks is None else skip.blocks
            samples = range(batch) if skip.samples is None else skip.samples
            for name, values, size in (("blocks", blocks, n), ("samples", samples, batch)):
                bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < size]
                if bad:
                    raise ValueError(f"AttentionSkip({skip.kind!r}) {name}={list(values)}: {bad} not in [0, {size})")
            for i in blocks:
                skipped[skip.kind, i].update(samples)
        masks: dict[frozenset, Keep] = {}

        def keep(rows: set) -> Keep:
            if not rows:
                return None
            if len(rows) == batch:
                return False
            key = frozenset(rows)
            if key not in masks:
                mask = torch.ones(batch, 1, 1, dtype=torch.bool)
                mask[sorted(rows)] = False
                masks[key] = mask
            return masks[key]

        per_block = [tuple(keep(skipped[kind, i]) for kind in SKIP_KINDS) for i in range(n)]
        return [None if all(k is None for k in ks) else ks for ks in per_block]

    def _context(self, context: torch.Tensor, projection: str, dtype) -> torch.Tensor:
        """The text context in `dtype`, through the caption projection when the model has one (2.0)."""
        context = context.to(dtype)
        return getattr(self, projection)(context) if self.config.caption_projection else context

    def _mark_keyframes(self, vx: torch.Tensor, keyframes_mask: torch.Tensor) -> torch.Tensor:
        """`vx` plus the learned keyframe vector on the tokens `keyframes_mask` marks (non-zero)."""
        mask = keyframes_mask if keyframes_mask.dim() == 3 else keyframes_mask[..., None]
        if mask.shape != (*vx.shape[:2], 1):
            raise ValueError(
                f"keyframes_mask has shape {tuple(keyframes_mask.shape)}; expected [B, L_video] = {tuple(vx.shape[:2])}"
            )
        return vx + (mask > 0).to(vx.dtype) * self.keyframes_abs_pos_embedding.to(vx.dtype)

    @staticmethod
    def _embed(adaln: AdaLayerNormSingle, t: torch.Tensor, batch: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """`adaln(t)` for `t` `[B, T]` -> (modulation `[B, T, n * D]`, embedding `[B, T, D]`)."""
        mod, embedded = adaln(t.flatten(), dtype)
        return mod.unflatten(0, (batch, -1)), embedded.unflatten(0, (batch, -1))

    def _output(self, x, table: torch.Tensor, embedded: torch.Tensor, proj: nn.Linear) -> torch.Tensor:
        shift, scale = (table.to(embedded.dtype) + embedded[:, :, None]).unbind(dim=2)
        x = F.layer_norm(x, (x.shape[-1],), eps=self.config.norm_eps)
        return proj(_modulate(x, shift, scale))

    def _run(self, block: nn.Module, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)


def _local_keeps(keeps: list[tuple[Keep, ...] | None], device) -> list[tuple[Keep, ...] | None]:
    """The keep-masks of this call's rows on `device`: a mask that keeps every row becomes None and one that
    keeps none False (that attention is then not computed), as `_keeps` gives them for a whole batch."""
    moved: dict[tuple, Keep] = {}

    def local(keep: Keep) -> Keep:
        if not isinstance(keep, torch.Tensor):
            return keep
        rows = tuple(keep.flatten().tolist())
        if rows not in moved:
            moved[rows] = None if all(rows) else False if not any(rows) else keep.to(device)
        return moved[rows]

    out = []
    for block in keeps:
        block = None if block is None else tuple(local(k) for k in block)
        out.append(None if block is None or all(k is None for k in block) else block)
    return out


# ----------------------------------------------------------------------------------- input checks
def _timesteps(name: str, value, batch: int, tokens: int, device) -> torch.Tensor:
    """A scalar, `[1]`, `[B]` or per-token `[B, L]` timestep as float32 `[B, 1]` or `[B, L]`."""
    t = torch.as_tensor(value, device=device, dtype=torch.float32)
    if t.dim() == 2 and t.shape[0] == batch and t.shape[1] in (1, tokens):
        return t
    t = t.reshape(-1)
    if t.numel() not in (1, batch):
        raise ValueError(
            f"{name} has shape {tuple(torch.as_tensor(value).shape)}; expected a scalar, [B={batch}] or [B, {tokens}]"
        )
    return t.expand(batch)[:, None]


def _shared(coords: torch.Tensor) -> torch.Tensor:
    """Positions expanded over the batch (stride 0, as `video_positions` returns them) as one sample, so
    the RoPE tables are built once and broadcast instead of once per sample."""
    return coords[:1] if coords.shape[0] > 1 and coords.stride(0) == 0 else coords


def _text_bias(name: str, mask: torch.Tensor | None, context: torch.Tensor, dtype) -> torch.Tensor | None:
    """A keep-mask `[B, L_text]` as the additive bias `[B, 1, 1, L_text]` (0 kept, -10000 dropped); None when
    every token is kept, so fused attention kernels stay usable."""
    if mask is None:
        return None
    if mask.shape != context.shape[:2]:
        raise ValueError(f"{name} has shape {tuple(mask.shape)}; expected [B, L_text] = {tuple(context.shape[:2])}")
    keep = mask.to(dtype)
    if bool((keep == 1).all()):
        return None
    return ((1 - keep) * MASK_BIAS)[:, None, None, :]


def _check_coords(name: str, coords: torch.Tensor, batch: int, axes: int, tokens: int) -> None:
    if coords.dim() not in (3, 4) or coords.shape[0] not in (1, batch) or coords.shape[1:3] != (axes, tokens):
        raise ValueError(f"{name} has shape {tuple(coords.shape)}; expected [B={batch}, {axes}, {tokens}, 2]")
    if coords.dim() == 4 and coords.shape[3] != 2:
        raise ValueError(f"{name} has shape {tuple(coords.shape)}; the last axis holds [start, end) bounds (2)")


def check_inputs(cfg: LTX2DiTConfig, video, audio, video_context, audio_context) -> None:
    """Shapes of an LTX-2 DiT call."""
    if video.dim() != 3 or video.shape[-1] != cfg.in_channels:
        raise ValueError(f"video has shape {tuple(video.shape)}; expected [B, L_video, in_channels={cfg.in_channels}]")
    b = video.shape[0]
    if audio.dim() != 3 or audio.shape[0] != b or audio.shape[-1] != cfg.audio_in_channels:
        raise ValueError(
            f"audio has shape {tuple(audio.shape)}; expected [B={b}, L_audio, audio_in_channels={cfg.audio_in_channels}]"
        )
    widths = (
        (("caption_channels", cfg.caption_channels),) * 2
        if cfg.caption_projection
        else (("video width", cfg.dim), ("audio width", cfg.audio_dim))
    )
    for (name, context), (what, width) in zip(
        (("video_context", video_context), ("audio_context", audio_context)), widths, strict=True
    ):
        if context.dim() != 3 or context.shape[0] != b or context.shape[-1] != width:
            raise ValueError(
                f"{name} has shape {tuple(context.shape)}; expected [B={b}, L_text, {what}={width}] "
                f"(the text connector's output)"
            )
