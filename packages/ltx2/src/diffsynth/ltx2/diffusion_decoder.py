"""LTX-2.5's diffusion video decoder ("DiffVAE", the authors' `ltx-2.5-video-vae-bf16` decoder).

Instead of convolutions it decodes in two parts, all channels-last `(B, T, H, W, C)`:

- stages 1-4: neighbourhood-attention blocks (`NABlock`), each stage followed by a linear pixel-shuffle
  upsampler, turn the latent into a context volume at a quarter of the output's height and width;
- stage 5: a small diffusion transformer over 4x4-patchified pixels. Every `DiffusionNABlock` adds the
  projected context, then runs attention and a SwiGLU MLP modulated (scale/shift, ungated) by one shared
  AdaLN projection of the timestep. The released decoder predicts `x0` in one step from pure noise.

Module and parameter names are ltx-core's (`ltx_core.model.video_vae.diffusion_video_decoder`), so the
converted authors' file loads strictly (`diffusion_decoder_formats.py`). Attention is 3D neighbourhood
attention with NATTEN's window: centred where possible and shifted inward at the border so it always
covers `kernel` positions. Without NATTEN we compute it exactly, block by block, with masked SDPA over
the box of keys a block of queries can see.

Behaviour follows ltx-core, not diffusers, where they differ (only for clips too small for the kernels):
latents smaller than the kernels allow are edge-padded and the padding is cropped from the pixels, and
the trailing "ghost" frames are cropped only down to stage 5's temporal kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from diffsynth.runtime.attention import attention
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.layers import timestep_embedding

from .latent_statistics import PerChannelStatistics

Kernel = tuple[int, int, int]

# Tokens per SwiGLU call: the MLP is per token, so chunking only bounds the three hidden-width tensors.
MLP_CHUNK_TOKENS = 16384
# Smallest query block per axis in the exact neighbourhood attention (bigger blocks, fewer SDPA calls).
MIN_QUERY_BLOCK = 8
# Most key elements one neighbourhood-attention call gathers (blocks of one pattern are batched up to it).
MAX_GATHERED = 1 << 27


@dataclass
class LTX2DiffusionDecoderConfig:
    """Defaults are the released LTX-2.5 decoder (`ltx-2.5-video-vae-bf16`).

    `stage_channels`/`stage_depths` list the four deterministic stages then stage 5 (its context width and
    depth); `stage_kernels` are the four deterministic stages' (T, H, W) windows; upsampler i follows stage i
    with stride `upsample_strides[i]` and divides the width by `upsample_reductions[i]`.
    """

    latent_channels: int = 128
    out_channels: int = 3
    patch_size: int = 4
    head_dim: int = 64
    stage_channels: tuple[int, ...] = (2048, 1024, 512, 512, 256)
    stage_depths: tuple[int, ...] = (4, 6, 4, 2, 8)
    stage_kernels: tuple[Kernel, ...] = ((3, 7, 7), (3, 7, 7), (3, 5, 5), (3, 5, 5))
    upsample_strides: tuple[Kernel, ...] = ((1, 2, 2), (2, 1, 1), (2, 2, 2), (2, 2, 2))
    upsample_reductions: tuple[int, ...] = (2, 2, 1, 2)
    stage5_kernel: Kernel = (11, 11, 11)
    stage5_channels: int | None = None  # None: the context width, stage_channels[-1]
    t_emb_dim: int = 384
    mlp_ratio: float = 4.0
    rope_base: float = 10000.0
    timestep_scale_multiplier: float = 1000.0
    model_output_type: str = "x0"
    num_steps: int = 1
    rope_dim_split: Kernel | None = field(default=None)  # None: ltx-core's split of head_dim

    def __post_init__(self):
        self.stage_channels = tuple(int(c) for c in self.stage_channels)
        self.stage_depths = tuple(int(d) for d in self.stage_depths)
        self.stage_kernels = tuple(tuple(int(k) for k in ks) for ks in self.stage_kernels)
        self.upsample_strides = tuple(tuple(int(s) for s in st) for st in self.upsample_strides)
        self.upsample_reductions = tuple(int(r) for r in self.upsample_reductions)
        self.stage5_kernel = tuple(int(k) for k in self.stage5_kernel)
        n = len(self.stage_kernels)
        for name, value, want in (
            ("stage_channels", self.stage_channels, n + 1),
            ("stage_depths", self.stage_depths, n + 1),
            ("upsample_strides", self.upsample_strides, n),
            ("upsample_reductions", self.upsample_reductions, n),
        ):
            if len(value) != want:
                raise ValueError(f"{name}={value} must have {want} entries ({n} stage_kernels)")
        for name, kernels in (("stage_kernels", self.stage_kernels), ("stage5_kernel", (self.stage5_kernel,))):
            if any(len(k) != 3 or min(k) < 1 for k in kernels):
                raise ValueError(f"{name}={getattr(self, name)} must hold positive (T, H, W) triples")
        if any(len(s) != 3 or min(s) < 1 or s[0] > 2 for s in self.upsample_strides):
            raise ValueError(f"upsample_strides={self.upsample_strides} must be (T, H, W) triples with T in 1, 2")
        if self.head_dim % 8:
            raise ValueError(f"head_dim={self.head_dim} must be a multiple of 8")
        for i, reduction in enumerate(self.upsample_reductions):
            if self.stage_channels[i] // reduction != self.stage_channels[i + 1]:
                raise ValueError(
                    f"stage_channels[{i + 1}]={self.stage_channels[i + 1]} must be stage_channels[{i}] // "
                    f"upsample_reductions[{i}] = {self.stage_channels[i] // reduction}"
                )
        for c in (*self.stage_channels, self.stage5_width):
            if c % self.head_dim:
                raise ValueError(f"stage width {c} is not a multiple of head_dim={self.head_dim}")
        if self.model_output_type not in ("x0", "v"):
            raise ValueError(f"model_output_type={self.model_output_type!r} must be 'x0' or 'v'")
        if self.num_steps < 1:
            raise ValueError(f"num_steps={self.num_steps} must be at least 1")
        if self.rope_dim_split is not None:
            self.rope_dim_split = tuple(int(d) for d in self.rope_dim_split)
            if sum(self.rope_dim_split) != self.head_dim or any(d % 2 for d in self.rope_dim_split):
                raise ValueError(f"rope_dim_split={self.rope_dim_split} must be even and sum to {self.head_dim}")

    @property
    def stage5_width(self) -> int:
        return self.stage5_channels if self.stage5_channels is not None else self.stage_channels[-1]

    @property
    def temporal_compression(self) -> int:
        return math.prod(s[0] for s in self.upsample_strides)

    @property
    def spatial_compression(self) -> int:
        return math.prod(s[1] for s in self.upsample_strides) * self.patch_size

    @property
    def ghost_latent_frames(self) -> int:
        """Copies of the last latent frame appended through stages 1-4 and cropped before stage 5, so
        that NATTEN's inward window shift at the end of the clip falls on frames that are thrown away."""
        return (self.stage_kernels[0][0] // 2) * 2

    @property
    def min_latent_size(self) -> Kernel:
        """The smallest latent (T, H, W) every stage's window fits in; smaller latents are edge-padded."""
        mins, scale = [1, 1, 1], [1, 1, 1]
        for kernel, stride in zip(
            (*self.stage_kernels, self.stage5_kernel), (*self.upsample_strides, None), strict=True
        ):
            mins = [max(m, -(-k // s)) for m, k, s in zip(mins, kernel, scale, strict=True)]
            if stride is not None:
                scale = [s * st for s, st in zip(scale, stride, strict=True)]
        return tuple(mins)

    def resolved_rope_split(self) -> Kernel:
        """ltx-core's split of `head_dim` into (T, H, W) rotary parts: a quarter to T, the rest halved,
        all kept even."""
        if self.rope_dim_split is not None:
            return self.rope_dim_split
        d_t = (self.head_dim // 4) // 2 * 2
        d_hw = (self.head_dim - d_t) // 2
        if d_hw % 2:
            d_t -= 2
            d_hw = (self.head_dim - d_t) // 2
        return (d_t, d_hw, d_hw)


@dataclass(frozen=True)
class DecoderTiles:
    """Tile sizes of a tiled decode, in frames and pixels of the output video; a size minus its stride is the
    overlap blended linearly. The defaults are diffusers' (and the authors' order of size). Stages before the
    last deterministic one always see the whole latent; the last one and stage 5, where memory goes, run per
    tile, so tiling changes the output only near the seams."""

    frames: int = 80
    frame_stride: int = 56
    height: int = 768
    height_stride: int = 704
    width: int = 768
    width_stride: int = 704

    def __post_init__(self):
        for axis in ("frames", "height", "width"):
            size, stride = getattr(self, axis), getattr(self, f"{axis.removesuffix('s')}_stride")
            if not 1 <= stride <= size:
                raise ConfigError(f"diffusion decoder tiles: {axis}={size} needs 1 <= stride <= {size}, got {stride}")


# ----------------------------------------------------------------------------------- attention
def _window_starts(length: int, kernel: int, device) -> torch.Tensor:
    """First key of each query's window along one axis: centred, shifted inward at the borders."""
    return (torch.arange(length, device=device) - kernel // 2).clamp(0, length - kernel)


@dataclass(frozen=True)
class _Run:
    """Query blocks along one axis that share one window pattern: `count` blocks of `q_len` queries starting at
    `q_start`, `stride` apart; each sees the `k_len` keys from its own start `k_start + i * stride`, through
    `mask` (q_len x k_len)."""

    q_start: int
    count: int
    q_len: int
    k_start: int
    k_len: int
    stride: int
    mask: torch.Tensor


def _axis_runs(length: int, kernel: int, block: int, device) -> list[_Run]:
    """One axis cut into query blocks of `block` (the last may be shorter), consecutive blocks with the same
    relative window pattern merged into runs: the interior is one run, the clamped borders a few more."""
    starts = _window_starts(length, kernel, device)
    runs: list[_Run] = []
    for a in range(0, length, block):
        b = min(a + block, length)
        lo, hi = int(starts[a]), int(starts[b - 1]) + kernel
        rel = torch.arange(lo, hi, device=device)[None, :] - starts[a:b, None]
        mask = (rel >= 0) & (rel < kernel)
        last = runs[-1] if runs else None
        if (
            last is not None
            and last.q_len == b - a
            and last.k_len == hi - lo
            and a == last.q_start + last.count * block
            and lo == last.k_start + last.count * block
            and torch.equal(last.mask, mask)
        ):
            runs[-1] = _Run(last.q_start, last.count + 1, last.q_len, last.k_start, last.k_len, block, last.mask)
        else:
            runs.append(_Run(a, 1, b - a, lo, hi - lo, block, mask))
    return runs


def _split(run: _Run, parts: int) -> list[_Run]:
    """`run` as up to `parts` runs of consecutive blocks (to bound one call's gathered keys)."""
    size = -(-run.count // parts)
    return [
        _Run(run.q_start + i * run.stride, min(size, run.count - i), run.q_len, run.k_start + i * run.stride,
             run.k_len, run.stride, run.mask)
        for i in range(0, run.count, size)
    ]  # fmt: skip


def _query_view(x: torch.Tensor, runs: tuple[_Run, _Run, _Run]) -> torch.Tensor:
    """The query blocks of three runs as a view of `x` `(B, T, H, W, heads, d)`: `(B, ct, qt, ch, qh, cw, qw,
    heads, d)` (a run shorter than its stride is a single, last block)."""
    for i, run in enumerate(runs):
        axis = 1 + 2 * i  # each axis before it became two
        if run.q_len == run.stride:
            x = x.narrow(axis, run.q_start, run.count * run.stride).unflatten(axis, (run.count, run.stride))
        else:
            x = x.narrow(axis, run.q_start, run.q_len).unsqueeze(axis)
    return x


def _key_boxes(x: torch.Tensor, runs: tuple[_Run, _Run, _Run]) -> torch.Tensor:
    """The key boxes of three runs, `(B * blocks, box tokens, heads, d)`: overlapping strided views of `x` (unfold
    puts each box's extent last), copied once by the reshape."""
    for axis, run in enumerate(runs, start=1):
        x = x.narrow(axis, run.k_start, (run.count - 1) * run.stride + run.k_len).unfold(axis, run.k_len, run.stride)
    x = x.permute(0, 1, 2, 3, 6, 7, 8, 4, 5)  # (B, ct, ch, cw, kt, kh, kw, heads, d)
    return x.reshape(-1, math.prod(x.shape[4:7]), *x.shape[7:])


def neighborhood_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: Kernel) -> torch.Tensor:
    """NATTEN-style 3D neighbourhood attention on `(B, T, H, W, heads, d)`; q is pre-scaled (scale 1).

    Exact and memory-bounded. Queries go in blocks; a block's windows all lie inside one box of keys (window
    starts are non-decreasing and move by at most one per query), so a block is an SDPA over its box with a mask
    keeping each query's own window. Blocks with the same pattern (the whole interior, then a few kinds at the
    borders) are batched into one call, split so that one call gathers at most `MAX_GATHERED` key elements.
    """
    dims = q.shape[1:4]
    if any(n < kk for n, kk in zip(dims, kernel, strict=True)):
        raise ConfigError(f"neighbourhood attention needs a (T, H, W) grid of at least {kernel}, got {tuple(dims)}")
    batch, heads, d = q.shape[0], q.shape[4], q.shape[5]
    axes = [_axis_runs(n, kk, min(n, max(kk, MIN_QUERY_BLOCK)), q.device) for n, kk in zip(dims, kernel, strict=True)]
    out = torch.empty_like(q)
    for run_t in axes[0]:
        for run_h in axes[1]:
            for run_w in axes[2]:
                box = run_t.k_len * run_h.k_len * run_w.k_len
                per_block_t = run_h.count * run_w.count * box * batch * heads * d
                parts = min(run_t.count, max(1, -(-per_block_t * run_t.count // MAX_GATHERED)))
                mask = run_t.mask[:, None, None, :, None, None] & run_h.mask[None, :, None, None, :, None]
                mask = (mask & run_w.mask[None, None, :, None, None, :]).reshape(
                    run_t.q_len * run_h.q_len * run_w.q_len, box
                )
                for part in _split(run_t, parts):
                    runs = (part, run_h, run_w)
                    blocks = _query_view(q, runs).permute(0, 1, 3, 5, 2, 4, 6, 7, 8)  # (B, ct, ch, cw, qt, qh, qw, ...)
                    queries = blocks.reshape(-1, math.prod(blocks.shape[4:7]), heads, d)
                    ob = attention(queries, _key_boxes(k, runs), _key_boxes(v, runs), mask=mask[None, None], scale=1.0)
                    ob = ob.reshape(blocks.shape).permute(0, 1, 4, 2, 5, 3, 6, 7, 8)
                    _query_view(out, runs).copy_(ob)
    return out.reshape(*q.shape[:4], heads * d)


def _rotate_axis(x: torch.Tensor, inv_freqs: torch.Tensor, axis: int) -> torch.Tensor:
    """Absolute RoPE over interleaved pairs of `x` (B, T, H, W, heads, D) by position along `axis` (1-3)."""
    pairs = x.reshape(*x.shape[:-1], -1, 2).float()
    shape = [1] * 6
    shape[axis], shape[5] = x.shape[axis], inv_freqs.shape[0]
    angles = (torch.arange(x.shape[axis], device=x.device, dtype=torch.float32)[:, None] * inv_freqs).view(shape)
    cos, sin = angles.cos(), angles.sin()
    even, odd = pairs[..., 0], pairs[..., 1]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).reshape(x.shape).to(x.dtype)


class QKVProjections(nn.Module):
    """Separate q/k/v projections (the file stores them fused as `qkv`; ltx-core splits them on load)."""

    def __init__(self, dim: int):
        super().__init__()
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)


class NeighborhoodAttention3D(nn.Module):
    """Per-head RMS-normed q/k, q scaled by 1/sqrt(d), absolute 3D RoPE, neighbourhood attention."""

    def __init__(self, dim: int, kernel: Kernel, head_dim: int, rope_split: Kernel, rope_base: float):
        super().__init__()
        self.kernel, self.heads, self.head_dim = tuple(kernel), dim // head_dim, head_dim
        self.rope_split, self.rope_base = tuple(rope_split), rope_base
        self.qkv = QKVProjections(dim)
        self.proj = nn.Linear(dim, dim)
        self.q_norm = nn.RMSNorm(head_dim, eps=1e-6)
        self.k_norm = nn.RMSNorm(head_dim, eps=1e-6)

    def _rope(self, x: torch.Tensor) -> torch.Tensor:
        parts, start = [], 0
        for axis, size in enumerate(self.rope_split, start=1):
            exponents = torch.arange(0, size, 2, dtype=torch.float64, device=x.device) / size
            inv = (1.0 / self.rope_base**exponents).float()
            parts.append(_rotate_axis(x[..., start : start + size], inv, axis))
            start += size
        return torch.cat(parts, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (*x.shape[:4], self.heads, self.head_dim)
        q = self.q_norm(self.qkv.to_q(x).view(shape)) * self.head_dim**-0.5
        k = self.k_norm(self.qkv.to_k(x).view(shape))
        v = self.qkv.to_v(x).view(shape)
        return self.proj(neighborhood_attention(self._rope(q), self._rope(k), v, self.kernel))


class SwiGLU(nn.Module):
    """`w_down(silu(w_gate(x)) * w_up(x))`, run in token chunks to bound the hidden-width activations."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w_up = nn.Linear(dim, hidden, bias=False)
        self.w_gate = nn.Linear(dim, hidden, bias=False)
        self.w_down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        out = torch.cat(
            [self.w_down(F.silu(self.w_gate(c)) * self.w_up(c)) for c in flat.split(MLP_CHUNK_TOKENS)], dim=0
        )
        return out.reshape(x.shape)


def _mlp_hidden(dim: int, ratio: float) -> int:
    return (int(dim * ratio) + 15) // 16 * 16


class NABlock(nn.Module):
    """Deterministic-stage block: pre-norm neighbourhood attention and SwiGLU, plain residuals."""

    def __init__(self, dim: int, kernel: Kernel, config: LTX2DiffusionDecoderConfig):
        super().__init__()
        self.norm1 = nn.RMSNorm(dim, eps=1e-6)
        self.attn = NeighborhoodAttention3D(
            dim, kernel, config.head_dim, config.resolved_rope_split(), config.rope_base
        )
        self.norm2 = nn.RMSNorm(dim, eps=1e-6)
        self.mlp = SwiGLU(dim, _mlp_hidden(dim, config.mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


NUM_MODULATIONS = 7  # scale/shift/gate for attention and MLP, and a context gate; the gates are unused


class DiffusionNABlock(nn.Module):
    """Stage-5 block: adds the projected context, then attention and SwiGLU on AdaLN scale/shift inputs.

    Residuals are ungated: the released weights' static gates are folded into `attn.proj`,
    `mlp.w_down` and `context_proj` on load, as ltx-core does."""

    def __init__(self, dim: int, context_channels: int, config: LTX2DiffusionDecoderConfig):
        super().__init__()
        self.context_proj = nn.Linear(context_channels, dim)
        self.scale_shift_table = nn.Parameter(torch.zeros(NUM_MODULATIONS, dim))
        self.norm1 = nn.RMSNorm(dim, eps=1e-6)
        self.attn = NeighborhoodAttention3D(
            dim, config.stage5_kernel, config.head_dim, config.resolved_rope_split(), config.rope_base
        )
        self.norm2 = nn.RMSNorm(dim, eps=1e-6)
        self.mlp = SwiGLU(dim, _mlp_hidden(dim, config.mlp_ratio))

    def forward(self, x: torch.Tensor, context: torch.Tensor, modulation: tuple[torch.Tensor, ...]) -> torch.Tensor:
        table = self.scale_shift_table.to(modulation[0].dtype)
        scale_msa, shift_msa, _, scale_mlp, shift_mlp, _, _ = (m + table[i] for i, m in enumerate(modulation))
        x = x + self.context_proj(context)
        x = x + self.attn(self.norm1(x) * (1 + scale_msa) + shift_msa)
        return x + self.mlp(self.norm2(x) * (1 + scale_mlp) + shift_mlp)


class PixelShuffleUpsample(nn.Module):
    """Linear to `prod(stride) * C / reduction` channels, then channels-last pixel shuffle. A temporal
    stride of 2 makes a duplicate first frame, dropped to keep the causal 1 + 8(T-1) frame mapping."""

    def __init__(self, channels: int, stride: Kernel, reduction: int):
        super().__init__()
        self.stride = tuple(stride)
        self.out_channels = channels // reduction
        self.proj = nn.Linear(channels, math.prod(stride) * self.out_channels)

    def forward(self, x: torch.Tensor, drop_leading_frame: bool = True) -> torch.Tensor:
        """`drop_leading_frame=False` keeps both frames of the first input frame: a temporal tile that starts
        inside the clip, where that frame is an interior one."""
        b, t, h, w, _ = x.shape
        st, sh, sw = self.stride
        x = self.proj(x).reshape(b, t, h, w, self.out_channels, st, sh, sw)
        x = x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, t * st, h * sh, w * sw, self.out_channels)
        return x[:, 1:] if st == 2 and drop_leading_frame else x


class AdaLNZero(nn.Module):
    """The shared timestep modulation: `proj(silu(t_emb))` in seven `(B, 1, 1, 1, C)` chunks."""

    def __init__(self, dim: int, t_emb_dim: int):
        super().__init__()
        self.proj = nn.Linear(t_emb_dim, NUM_MODULATIONS * dim)

    def forward(self, t_emb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(c[:, None, None, None, :] for c in self.proj(F.silu(t_emb)).chunk(NUM_MODULATIONS, dim=-1))


class TimestepMLP(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(256, dim)
        self.linear_2 = nn.Linear(dim, dim)


class TimestepEmbedder(nn.Module):
    """PixArt-alpha timestep embedding without size terms: 256 sinusoids ([cos, sin]) then an MLP."""

    def __init__(self, dim: int):
        super().__init__()
        self.timestep_embedder = TimestepMLP(dim)

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        emb = timestep_embedding(t, 256, cos_first=True, freq_shift=0.0).to(dtype)
        mlp = self.timestep_embedder
        return mlp.linear_2(F.silu(mlp.linear_1(emb)))


# ----------------------------------------------------------------------------------- the decoder
def _pad_axis(x: torch.Tensor, dim: int, size: int, symmetric: bool) -> tuple[torch.Tensor, int]:
    """Edge-replicate `x` along `dim` up to `size`: at the end, or split over both ends (the odd one at
    the end). Returns the tensor and the count added before."""
    need = size - x.shape[dim]
    if need <= 0:
        return x, 0
    before = need // 2 if symmetric else 0
    parts = [x.narrow(dim, 0, 1).repeat_interleave(before, dim)] if before else []
    parts += [x, x.narrow(dim, x.shape[dim] - 1, 1).repeat_interleave(need - before, dim)]
    return torch.cat(parts, dim=dim), before


class LTX2DiffusionDecoder(nn.Module):
    """The LTX-2.5 diffusion video decoder; `decode` maps normalised latents to video in [-1, 1]."""

    def __init__(self, config: LTX2DiffusionDecoderConfig | None = None):
        super().__init__()
        config = config or LTX2DiffusionDecoderConfig()
        self.config = config
        # dotted paths the runtime reads (VRAM manager, compiling): each block of each stage is one unit
        stages = tuple(f"det_stages.{i}" for i in range(len(config.stage_kernels)))
        self.offload_units = self.compile_units = (*stages, "diff_blocks")
        channels = config.stage_channels
        self.per_channel_statistics = PerChannelStatistics(config.latent_channels)
        self.conv_in = nn.Linear(config.latent_channels, channels[0])
        self.det_stages = nn.ModuleList(
            nn.ModuleList(NABlock(channels[i], kernel, config) for _ in range(config.stage_depths[i]))
            for i, kernel in enumerate(config.stage_kernels)
        )
        self.upsamples = nn.ModuleList(
            PixelShuffleUpsample(channels[i], stride, reduction)
            for i, (stride, reduction) in enumerate(
                zip(config.upsample_strides, config.upsample_reductions, strict=True)
            )
        )
        self.t_embedder = TimestepEmbedder(config.t_emb_dim)
        width, pixels = config.stage5_width, config.out_channels * config.patch_size**2
        self.conv_in_x_t = nn.Linear(pixels, width)
        self.shared_adaln = AdaLNZero(width, config.t_emb_dim)
        self.diff_blocks = nn.ModuleList(
            DiffusionNABlock(width, channels[-1], config) for _ in range(config.stage_depths[-1])
        )
        self.norm_out = nn.RMSNorm(width, eps=1e-6)
        self.conv_out = nn.Linear(width, pixels)

    # -- stages 1-4
    def features(self, z: torch.Tensor) -> torch.Tensor:
        """Stages 1 to n-1 on un-normalised latents `(B, C, T, H, W)` (already padded to `min_latent_size`),
        channels-last, with the trailing ghost frames appended (`last_stage` crops them). They run on the
        whole latent; a tiled decode cuts tiles from their output."""
        ghost = self.config.ghost_latent_frames
        if ghost:
            z = torch.cat([z, z[:, :, -1:].expand(-1, -1, ghost, -1, -1)], dim=2)
        x = self.conv_in(z.permute(0, 2, 3, 4, 1))
        for blocks, upsample in zip(self.det_stages[:-1], self.upsamples[:-1], strict=True):
            for block in blocks:
                x = block(x)
            x = upsample(x)
        return x

    def last_stage(self, x: torch.Tensor, drop_leading_frame: bool = True, crop_ghost: bool = True) -> torch.Tensor:
        """The last deterministic stage: `features` (or a tile of them) to stage 5's context `(B, T5, H5, W5, C)`.
        A temporal tile not at the clip's start keeps its upsampled leading frame; only the tile at its end
        crops the ghost frames (down to no fewer than stage 5's temporal kernel, as ltx-core)."""
        cfg = self.config
        for block in self.det_stages[-1]:
            x = block(x)
        x = self.upsamples[-1](x, drop_leading_frame=drop_leading_frame)
        ghost = cfg.ghost_latent_frames
        if ghost and crop_ghost:
            content = max(x.shape[1] - ghost * cfg.temporal_compression, 1)
            x = x[:, : min(x.shape[1], max(content, cfg.stage5_kernel[0]))]
        return x

    def context(self, z: torch.Tensor) -> torch.Tensor:
        """Context `(B, T5, H5, W5, C)` from un-normalised latents `(B, C, T, H, W)` (already padded to
        `min_latent_size`): all deterministic stages on the whole latent."""
        return self.last_stage(self.features(z))

    # -- stage 5
    def predict(self, context: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """One stage-5 call: the model's prediction (x0 or velocity) for pixels `x_t` `(B, 3, F, H, W)`
        at times `t` `(B,)` in [0, 1]."""
        p, cfg = self.config.patch_size, self.config
        b, c, f, h, w = x_t.shape
        t_emb = self.t_embedder(cfg.timestep_scale_multiplier * t, context.dtype)
        modulation = self.shared_adaln(t_emb)
        # (c, w offset, h offset) channel order, as ltx-core's patchify
        x = x_t.reshape(b, c, f, h // p, p, w // p, p).permute(0, 2, 3, 5, 1, 6, 4).reshape(b, f, h // p, w // p, -1)
        x = self.conv_in_x_t(x)
        for block in self.diff_blocks:
            x = block(x, context, modulation)
        x = self.conv_out(self.norm_out(x)).reshape(b, f, h // p, w // p, c, p, p)
        return x.permute(0, 4, 1, 2, 6, 3, 5).reshape(b, c, f, h, w)

    def denoise(self, context: torch.Tensor, x_t: torch.Tensor, num_steps: int) -> torch.Tensor:
        """Euler from t=1 over `linspace(1, 1/n, n)` to 0 (ltx-core's loop); an x0 model's last prediction
        is the result."""
        batch = x_t.shape[0]
        times = torch.linspace(1.0, 1.0 / num_steps, num_steps, device=x_t.device)
        for i in range(num_steps):
            now = times[i].expand(batch)
            out = self.predict(context, x_t, now)
            if i == num_steps - 1 and self.config.model_output_type == "x0":
                return out
            nxt = times[i + 1] if i + 1 < num_steps else torch.zeros((), device=x_t.device)
            x32 = x_t.float()
            velocity = out.float() if self.config.model_output_type == "v" else (x32 - out.float()) / times[i]
            x_t = (x32 - (times[i] - nxt) * velocity).to(x_t.dtype)
        return x_t

    def decode(
        self,
        latents: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        num_steps: int | None = None,
        clamp: bool = True,
        tiles: DecoderTiles | None = None,
    ) -> torch.Tensor:
        """Video `(B, 3, 1 + 8(T-1), 32H, 32W)` in [-1, 1] from normalised latents `(B, 128, T, H, W)`.

        The decoder denoises pixels, so it draws noise: from `generator`, else a CPU generator seeded
        with `seed`, else the global RNG (on the generator's device, like ltx-core). `num_steps` defaults
        to the config's (1 for the release). With `tiles`, a video larger than one tile is decoded in
        overlapping tiles (`DecoderTiles`)."""
        cfg = self.config
        if not isinstance(latents, torch.Tensor) or latents.dim() != 5 or latents.shape[1] != cfg.latent_channels:
            got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ConfigError(f"latents must be (B, {cfg.latent_channels}, T, H, W), got {got}")
        steps = cfg.num_steps if num_steps is None else int(num_steps)
        if steps < 1:
            raise ConfigError(f"num_steps={num_steps} must be at least 1")
        if generator is not None and seed is not None:
            raise ConfigError("pass generator or seed, not both")
        if seed is not None:
            generator = torch.Generator("cpu").manual_seed(int(seed))
        dtype = self.conv_in.weight.dtype
        latents = latents.to(dtype)
        frames, height, width = latents.shape[2:]
        s, tc = cfg.spatial_compression, cfg.temporal_compression
        min_t, min_h, min_w = cfg.min_latent_size
        z, _ = _pad_axis(latents, 2, min_t, symmetric=False)
        z, top = _pad_axis(z, 3, min_h, symmetric=True)
        z, left = _pad_axis(z, 4, min_w, symmetric=True)
        mean, std = self.per_channel_statistics.stats(z, (1, -1, 1, 1, 1))
        if tiles is not None and (
            frames > tiles.frames // tc or height > tiles.height // s or width > tiles.width // s
        ):
            video = self._decode_tiled(z * std + mean, tiles, generator, steps)
            video = video[:, :, : (frames - 1) * tc + 1, top * s : (top + height) * s, left * s : (left + width) * s]
            return video.clamp(-1.0, 1.0) if clamp else video
        context = self.context(z * std + mean)

        b, canvas = z.shape[0], (context.shape[1], context.shape[2] * cfg.patch_size, context.shape[3] * cfg.patch_size)
        noise_device = generator.device if generator is not None else z.device
        if steps == 1 and cfg.model_output_type == "x0":
            shape = (b, cfg.out_channels, *canvas)
            x_t = torch.randn(shape, generator=generator, device=noise_device, dtype=dtype).to(z.device)
        else:  # drawn on the padded video's grid, then fitted to the stage-5 canvas (ltx-core's order)
            full = (b, cfg.out_channels, (z.shape[2] - 1) * tc + 1, z.shape[3] * s, z.shape[4] * s)
            x_t = torch.randn(full, generator=generator, device=noise_device, dtype=dtype).to(z.device)
            x_t = _fit(x_t, canvas)
        video = self.denoise(context, x_t, steps)
        video = video[:, :, : (frames - 1) * tc + 1, top * s : (top + height) * s, left * s : (left + width) * s]
        return video.clamp(-1.0, 1.0) if clamp else video

    def _decode_tiled(
        self, z: torch.Tensor, tiles: DecoderTiles, generator: torch.Generator | None, steps: int
    ) -> torch.Tensor:
        """Stages 1 to n-1 on the whole latent, then the last stage and stage 5 per tile of their output grid
        (one cell: the last upsampler's stride times the patch), tiles blended in raster order with their
        already blended neighbours above and to the left, and frame groups likewise. A one-step x0 decode draws
        each tile's noise in turn; more steps share one canvas of noise, so overlapping tiles agree."""
        cfg = self.config
        stride_t, stride_h, stride_w = cfg.upsample_strides[-1]
        cell = (stride_t, stride_h * cfg.patch_size, stride_w * cfg.patch_size)
        features = self.features(z)
        ghost = cfg.ghost_latent_frames * math.prod(st[0] for st in cfg.upsample_strides[:-1])
        grid = (features.shape[1] - ghost, features.shape[2], features.shape[3])
        sizes = [max(1, n // c) for n, c in zip((tiles.frames, tiles.height, tiles.width), cell, strict=True)]
        steps_between = (tiles.frame_stride, tiles.height_stride, tiles.width_stride)
        strides = [max(1, n // c) for n, c in zip(steps_between, cell, strict=True)]
        # a tile must fit the last stage's window and, upsampled, stage 5's
        mins = [max(k, -(-k5 // st)) for k, k5, st in zip(cfg.stage_kernels[-1], cfg.stage5_kernel, cfg.upsample_strides[-1], strict=True)]  # fmt: skip
        spans = [_tile_spans(*args) for args in zip(grid, sizes, strides, mins, strict=True)]
        overlaps = [(size - stride) * c for size, stride, c in zip(sizes, strides, cell, strict=True)]
        lead = 1 if stride_t == 2 else 0  # the clip's first cell gives one frame, the others stride_t
        batch, noise_device = z.shape[0], generator.device if generator is not None else z.device
        single = steps == 1 and cfg.model_output_type == "x0"
        canvas = None
        if not single:
            shape = (batch, cfg.out_channels, grid[0] * stride_t - lead, grid[1] * cell[1], grid[2] * cell[2])
            canvas = torch.randn(shape, generator=generator, device=noise_device, dtype=z.dtype).to(z.device)

        groups = []
        for t0, t1 in spans[0]:
            origin, end = t0 == 0, t1 == grid[0]
            rows: list[list[torch.Tensor]] = []
            for i, (h0, h1) in enumerate(spans[1]):
                row: list[torch.Tensor] = []
                for j, (w0, w1) in enumerate(spans[2]):
                    part = features[:, t0 : features.shape[1] if end else t1, h0:h1, w0:w1]
                    context = self.last_stage(part, drop_leading_frame=origin, crop_ghost=end)
                    shape = (batch, cfg.out_channels, context.shape[1], *(n * cfg.patch_size for n in context.shape[2:4]))  # fmt: skip
                    if single:
                        x_t = torch.randn(shape, generator=generator, device=noise_device, dtype=z.dtype).to(z.device)
                    else:
                        f0 = t0 * stride_t - (0 if origin else lead)
                        y0, x0 = h0 * cell[1], w0 * cell[2]
                        x_t = canvas[:, :, f0 : f0 + shape[2], y0 : y0 + shape[3], x0 : x0 + shape[4]]
                    tile = self.denoise(context, x_t, steps)
                    if i:
                        _blend_into(rows[i - 1][j], tile, 3, overlaps[1])
                    if j:
                        _blend_into(row[j - 1], tile, 4, overlaps[2])
                    row.append(tile)
                rows.append(row)
            kept_rows = []
            for i, row in enumerate(rows):
                keep_h = strides[1] * cell[1] if i < len(rows) - 1 else None
                keep_w = [strides[2] * cell[2] if j < len(row) - 1 else None for j in range(len(row))]
                kept_rows.append(torch.cat([tile[..., :keep_h, :kw] for tile, kw in zip(row, keep_w, strict=True)], 4))
            group = torch.cat(kept_rows, dim=3)
            if groups:
                _blend_into(groups[-1], group, 2, overlaps[0])
            groups.append(group)
        kept = []
        for k, group in enumerate(groups):
            if k < len(groups) - 1:
                group = group[:, :, : strides[0] * stride_t - (lead if k == 0 else 0)]
            kept.append(group)
        return torch.cat(kept, dim=2)

    def forward(self, latents: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.decode(latents, generator=generator, clamp=False)


def _tile_spans(length: int, size: int, stride: int, smallest: int) -> list[tuple[int, int]]:
    """`[start, end)` tiles over `length`, starts `stride` apart, each `size` long but the last, which runs to
    the end; a last tile shorter than `smallest` (too small for the attention windows) is merged into the one
    before."""
    if length <= size:
        return [(0, length)]
    starts = list(range(0, length, stride))
    while len(starts) > 1 and length - starts[-1] < smallest:
        starts.pop()
    return [(a, min(a + size, length)) for a in starts[:-1]] + [(starts[-1], length)]


def _blend_into(before: torch.Tensor, tile: torch.Tensor, dim: int, overlap: int) -> None:
    """Linear cross-fade, in place, of `tile`'s first `overlap` entries along `dim` from `before`'s last ones."""
    n = min(before.shape[dim], tile.shape[dim], overlap)
    if n <= 0:
        return
    shape = [1] * tile.dim()
    shape[dim] = n
    ramp = (torch.arange(n, device=tile.device, dtype=torch.float32) / n).view(shape)
    head = tile.narrow(dim, 0, n)
    mixed = before.narrow(dim, before.shape[dim] - n, n).float() * (1 - ramp) + head.float() * ramp
    head.copy_(mixed.to(tile.dtype))


def _fit(x: torch.Tensor, canvas: tuple[int, int, int]) -> torch.Tensor:
    """Frames cut or repeated at the end, height/width cut or edge-padded evenly on both sides."""
    f = canvas[0]
    x = x[:, :, :f] if x.shape[2] >= f else _pad_axis(x, 2, f, symmetric=False)[0]
    for dim, size in ((3, canvas[1]), (4, canvas[2])):
        if x.shape[dim] > size:
            cut = x.shape[dim] - size
            x = x.narrow(dim, cut // 2, size)
        else:
            x = _pad_axis(x, dim, size, symmetric=True)[0]
    return x


__all__ = [
    "DecoderTiles",
    "LTX2DiffusionDecoder",
    "LTX2DiffusionDecoderConfig",
    "neighborhood_attention",
]
