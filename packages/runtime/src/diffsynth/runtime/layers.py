"""Small building blocks shared by the model families: timestep embeddings and rotary embeddings.

Only pieces that several architectures use in the same form live here; anything family-specific
stays in that family's `dit.py`. RMSNorm is `torch.nn.RMSNorm` (fused kernels, same math as the
references), so it is not redefined.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "MultiAxisRope",
    "add_mul",
    "apply_rope",
    "rope_inverse_frequencies",
    "rope_tables",
    "rotate",
    "timestep_embedding",
]


def timestep_embedding(
    t: torch.Tensor,
    dim: int,
    *,
    max_period: float = 10000.0,
    scale: float = 1.0,
    cos_first: bool = True,
    freq_shift: float = 0.0,
    angle_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Sinusoidal embedding `[N] -> [N, dim]` in float32 (the DiT/ADM time embedding).

    Frequencies are `max_period ** (-i / (dim / 2 - freq_shift))`. `cos_first=True` gives
    `[cos, sin]` (BFL FLUX, Z-Image, Wan); `False` gives `[sin, cos]`. An odd `dim` gets a zero
    column at the end. The angles are computed in `angle_dtype` (float32, or float64 for models whose authors
    embed so: Wan2.2-Animate-2), never lower: low-precision angles lose the fine timesteps.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=angle_dtype, device=t.device)
    freqs = torch.exp(exponent / (half - freq_shift))
    args = t.reshape(-1).to(angle_dtype)[:, None] * freqs[None] * scale
    parts = (torch.cos(args), torch.sin(args)) if cos_first else (torch.sin(args), torch.cos(args))
    emb = torch.cat(parts, dim=-1).float()
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


def rope_inverse_frequencies(dim: int, theta: float) -> torch.Tensor:
    """`theta ** (-2i / dim)` for i < dim/2, in float64 (positions times these are the angles)."""
    if dim % 2:
        raise ValueError(f"rotary dim={dim} must be even")
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))


class MultiAxisRope:
    """Rotary tables for positions with several axes (e.g. time/text, height, width).

    Axis `a` rotates `axes_dims[a]` channels of each head; `__call__(ids)` takes integer positions
    `[..., n_axes]` and returns `(cos, sin)`, each `[..., sum(axes_dims) // 2]` float32, axis 0's
    frequencies first. Angles are computed in float64 on the CPU and rounded to float32 before
    cos/sin, which is what the Lumina / Z-Image references do; tables are built once per device.
    Not an `nn.Module` and holds no buffers, so meta-device builds and `assign=True` loads never
    leave it behind on the wrong device.
    """

    def __init__(self, theta: float, axes_dims: Sequence[int], axes_lens: Sequence[int]):
        if len(axes_dims) != len(axes_lens):
            raise ValueError(f"axes_dims={tuple(axes_dims)} and axes_lens={tuple(axes_lens)} differ in length")
        self.theta = float(theta)
        self.axes_dims = tuple(int(d) for d in axes_dims)
        self.axes_lens = tuple(int(n) for n in axes_lens)
        self._tables: dict[torch.device, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def _build(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        tables = []
        for dim, length in zip(self.axes_dims, self.axes_lens, strict=True):
            positions = torch.arange(length, dtype=torch.float64)
            angles = torch.outer(positions, rope_inverse_frequencies(dim, self.theta)).float()
            tables.append((angles.cos(), angles.sin()))
        return tables

    def tables(self, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        device = torch.device(device)
        if device not in self._tables:
            cpu = self._tables.get(torch.device("cpu")) or self._build()
            self._tables[device] = [(c.to(device), s.to(device)) for c, s in cpu]
        return self._tables[device]

    def __call__(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tables = self.tables(ids.device)
        cos = torch.cat([c[ids[..., a]] for a, (c, _) in enumerate(tables)], dim=-1)
        sin = torch.cat([s[ids[..., a]] for a, (_, s) in enumerate(tables)], dim=-1)
        return cos, sin


def add_mul(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """`a + b * c`: AdaLN modulation (`shift + x * (1 + scale)`), gated residuals (`x + gate * y`) and RoPE.

    These are memory-bound passes over whole activations. With half-precision `b` (the activations) they are
    one `addcmul`: each tensor read and written once, one rounding. In float32 the two-op form is kept, so
    float32 outputs stay equal to the references' (diffusers, the authors' code) to the last bit.
    """
    if b.dtype in (torch.bfloat16, torch.float16):
        return torch.addcmul(a, b, c)
    return a + b * c


def rope_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Half tables `[..., D/2]` -> per-channel `(cos, signed sin)` `[..., D]` for `rotate`: channel pair
    `(2i, 2i+1)` gets `(cos_i, cos_i)` and `(-sin_i, sin_i)`. A DiT builds them once per forward (they are
    `1 / heads` the size of q), and every block's rotation is then two fused passes."""
    return cos.repeat_interleave(2, dim=-1), torch.stack((-sin, sin), dim=-1).flatten(-2)


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """RoPE with `rope_tables`' tables: `x * cos + swap_pairs(x) * signed_sin` in float32, returned in
    `x.dtype`. The multiplies with the float32 tables upcast inside the kernel, so q/k are never copied to
    float32 first; in float32 the products and sums are those of the complex multiplication, bit for bit."""
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return add_mul(x * cos, swapped, signed_sin).to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs `(2i, 2i+1)` of `x` by the angles behind `cos`/`sin`.

    This is the complex-multiplication convention (`view_as_complex` on pairs) used by FLUX,
    Lumina, Z-Image, Wan and Qwen-Image, written with real tensors so it compiles well and runs
    on backends without complex support. `cos`/`sin` broadcast against `x[..., ::2]` (e.g.
    `[B, S, 1, D/2]` for `x` in `[B, S, H, D]`). Computed in float32, returned in `x.dtype`.
    A model that rotates q and k in many blocks builds `rope_tables` once and calls `rotate`.
    """
    return rotate(x, *rope_tables(cos, sin))
