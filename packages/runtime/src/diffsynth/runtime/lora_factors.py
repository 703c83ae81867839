"""LyCORIS weight changes that are not a low-rank pair: LoHa (Hadamard product) and LoKr (Kronecker product).

A LoHa or LoKr file is small, but the weight change it describes is as large as the layer. It is kept factored
(`WeightDelta`) until it is used: fusing builds one layer's change at a time, an unfused adapter computes
`x @ delta^T` per call (LoKr without ever building the change). The family converters move these changes about
like a LoRA's (renamed, placed on some output rows of a fused layer, halves swapped), so those operations are
here too (`RowStackedDelta`).

Scales follow LyCORIS and ComfyUI, which read the files people share: LoHa `alpha / rank` (rank: rows of
`hada_w1_b`); LoKr `alpha / rank` when one of its factors is itself a low-rank pair (rank: its inner size; the
second factor's when both are), 1 when both factors are full matrices (no rank to divide by), 1 without an alpha.
peft stores the same factors (it keeps alpha in its config: write it as the `.alpha` key to get its scale).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import LoRAError

LOHA_FIELDS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOKR_FIELDS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
TUCKER_FIELDS = ("hada_t1", "hada_t2", "lokr_t1", "lokr_t2")
FIELDS = LOHA_FIELDS + LOKR_FIELDS + TUCKER_FIELDS


class WeightDelta:
    """A Linear's weight change kept in factors: `shape` (out, in), `delta()` the change at scale 1."""

    shape: tuple[int, int]

    def delta(self) -> torch.Tensor:
        raise NotImplementedError

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> WeightDelta:
        raise NotImplementedError

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """`x @ delta^T` (factors already on x's device and dtype: `to`)."""
        return F.linear(x, self.delta())


def _cast(tensors, device, dtype):
    return tuple(t.to(device=device, dtype=dtype) for t in tensors)


@dataclass(frozen=True)
class HadamardDelta(WeightDelta):
    """LoHa: `scale * (w1_a @ w1_b) * (w2_a @ w2_b)`, elementwise."""

    w1_a: torch.Tensor
    w1_b: torch.Tensor
    w2_a: torch.Tensor
    w2_b: torch.Tensor
    scale: float

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.w1_a.shape[0]), int(self.w1_b.shape[1]))

    def delta(self) -> torch.Tensor:
        return (self.w1_a @ self.w1_b) * (self.w2_a @ self.w2_b) * self.scale

    def to(self, device=None, dtype=None) -> HadamardDelta:
        return HadamardDelta(*_cast((self.w1_a, self.w1_b, self.w2_a, self.w2_b), device, dtype), self.scale)


@dataclass(frozen=True)
class KroneckerDelta(WeightDelta):
    """LoKr: `scale * kron(w1, w2)`; each factor a matrix or a low-rank pair `(a, b)` standing for `a @ b`."""

    w1: torch.Tensor | tuple[torch.Tensor, torch.Tensor]
    w2: torch.Tensor | tuple[torch.Tensor, torch.Tensor]
    scale: float

    @staticmethod
    def _matrix(w) -> torch.Tensor:
        return w[0] @ w[1] if isinstance(w, tuple) else w

    @staticmethod
    def _shape(w) -> tuple[int, int]:
        return (int(w[0].shape[0]), int(w[1].shape[1])) if isinstance(w, tuple) else (int(w.shape[0]), int(w.shape[1]))

    @property
    def shape(self) -> tuple[int, int]:
        (a_out, a_in), (b_out, b_in) = self._shape(self.w1), self._shape(self.w2)
        return (a_out * b_out, a_in * b_in)

    def delta(self) -> torch.Tensor:
        return torch.kron(self._matrix(self.w1), self._matrix(self.w2)) * self.scale

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        # kron(A, B)[k*bo + l, i*bi + j] = A[k, i] B[l, j], so y[k, l] = sum_ij A[k, i] x[i, j] B[l, j]
        (a_out, a_in), (b_out, b_in) = self._shape(self.w1), self._shape(self.w2)
        grid = x.reshape(*x.shape[:-1], a_in, b_in)
        w2 = self.w2
        inner = F.linear(F.linear(grid, w2[1]), w2[0]) if isinstance(w2, tuple) else F.linear(grid, w2)
        y = torch.matmul(self._matrix(self.w1), inner)  # [..., a_out, b_out]
        return y.reshape(*x.shape[:-1], a_out * b_out) * self.scale

    def to(self, device=None, dtype=None) -> KroneckerDelta:
        def cast(w):
            return _cast(w, device, dtype) if isinstance(w, tuple) else w.to(device=device, dtype=dtype)

        return KroneckerDelta(cast(self.w1), cast(self.w2), self.scale)


@dataclass(frozen=True)
class RowStackedDelta(WeightDelta):
    """Factored changes placed on output rows of one wider layer (the parts of a fused qkv), zeros elsewhere;
    `swap_halves`: the two output halves are then exchanged (a layer stored (shift, scale) the other way)."""

    out_features: int
    in_features: int
    parts: tuple[tuple[int, WeightDelta], ...]  # (first row, change)
    swap_halves: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def delta(self) -> torch.Tensor:
        changes = [(start, part.delta()) for start, part in self.parts]
        out = changes[0][1].new_zeros(self.out_features, self.in_features)
        for start, change in changes:
            out[start : start + change.shape[0]] = change.to(out.dtype)
        return self._swap(out, 0)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(*x.shape[:-1], self.out_features)
        for start, part in self.parts:
            out[..., start : start + part.shape[0]] = part.linear(x)
        return self._swap(out, -1)

    def _swap(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        if not self.swap_halves:
            return t
        a, b = t.chunk(2, dim=dim)
        return torch.cat([b, a], dim=dim)

    def to(self, device=None, dtype=None) -> RowStackedDelta:
        parts = tuple((start, part.to(device, dtype)) for start, part in self.parts)
        return RowStackedDelta(self.out_features, self.in_features, parts, self.swap_halves)


def read_factors(fields: Mapping[str, torch.Tensor], alpha: float | None, key: str, source: str) -> WeightDelta:
    """The `WeightDelta` of one target's LyCORIS tensors (`fields`: name such as `hada_w1_a` -> tensor); `key`
    (one of the file's keys) and `source` name the target in errors."""
    where = f"{source}: {key!r}"
    tucker = sorted(set(fields) & set(TUCKER_FIELDS))
    if tucker:
        raise LoRAError(
            f"{where} has {tucker[0]}, a Tucker (CP) factor LyCORIS writes for convolution layers; only changes "
            "of Linear layers are supported"
        )
    flat = [name for name, t in fields.items() if t.dim() != 2]
    if flat:
        shape = tuple(fields[flat[0]].shape)
        raise LoRAError(
            f"{where}: {flat[0]} has shape {shape}; only changes of Linear layers (2-D factors) are supported, "
            "not convolution ones"
        )
    if set(fields) & set(LOHA_FIELDS) and set(fields) & set(LOKR_FIELDS):
        raise LoRAError(f"{where} mixes LoHa (hada_*) and LoKr (lokr_*) factors for one layer")
    if set(fields) & set(LOHA_FIELDS):
        return _loha(fields, alpha, where)
    return _lokr(fields, alpha, where)


def _require(fields: Mapping, names, where: str, kind: str) -> None:
    missing = [name for name in names if name not in fields]
    if missing:
        raise LoRAError(f"{where}: a {kind} needs {', '.join(names)}; {', '.join(missing)} missing")


def _loha(fields: Mapping[str, torch.Tensor], alpha: float | None, where: str) -> HadamardDelta:
    _require(fields, LOHA_FIELDS, where, "LoHa")
    w1_a, w1_b, w2_a, w2_b = (fields[name] for name in LOHA_FIELDS)
    if w1_a.shape[1] != w1_b.shape[0] or w2_a.shape[1] != w2_b.shape[0]:
        raise LoRAError(
            f"{where}: LoHa ranks disagree: hada_w1_a {tuple(w1_a.shape)} @ hada_w1_b {tuple(w1_b.shape)}, "
            f"hada_w2_a {tuple(w2_a.shape)} @ hada_w2_b {tuple(w2_b.shape)}"
        )
    if (w1_a.shape[0], w1_b.shape[1]) != (w2_a.shape[0], w2_b.shape[1]):
        raise LoRAError(
            f"{where}: LoHa's two products differ in shape ({w1_a.shape[0]} x {w1_b.shape[1]} vs "
            f"{w2_a.shape[0]} x {w2_b.shape[1]})"
        )
    scale = 1.0 if alpha is None else alpha / w1_b.shape[0]
    return HadamardDelta(w1_a, w1_b, w2_a, w2_b, float(scale))


def _lokr(fields: Mapping[str, torch.Tensor], alpha: float | None, where: str) -> KroneckerDelta:
    factors, rank = [], None
    for n in (1, 2):
        full, a, b = f"lokr_w{n}", f"lokr_w{n}_a", f"lokr_w{n}_b"
        if full in fields:
            if a in fields or b in fields:
                raise LoRAError(f"{where}: LoKr gives {full} and also {a} / {b}; give one of them")
            factors.append(fields[full])
            continue
        _require(fields, (a, b), where, f"LoKr without {full}")
        if fields[a].shape[1] != fields[b].shape[0]:
            raise LoRAError(f"{where}: {a} {tuple(fields[a].shape)} @ {b} {tuple(fields[b].shape)} do not multiply")
        factors.append((fields[a], fields[b]))
        rank = int(fields[b].shape[0])
    scale = 1.0 if alpha is None or rank is None else alpha / rank
    return KroneckerDelta(factors[0], factors[1], float(scale))


def lycoris_tensors(delta: HadamardDelta | KroneckerDelta) -> dict[str, torch.Tensor]:
    """The LyCORIS file entries (field name -> tensor, with `alpha`) that `read_factors` reads back as `delta`."""
    if isinstance(delta, HadamardDelta):
        fields = dict(zip(LOHA_FIELDS, (delta.w1_a, delta.w1_b, delta.w2_a, delta.w2_b), strict=True))
        return {**fields, "alpha": torch.tensor(delta.scale * delta.w1_b.shape[0])}
    out: dict[str, torch.Tensor] = {}
    rank = None
    for n, w in ((1, delta.w1), (2, delta.w2)):
        if isinstance(w, tuple):
            out[f"lokr_w{n}_a"], out[f"lokr_w{n}_b"] = w
            rank = int(w[1].shape[0])
        else:
            out[f"lokr_w{n}"] = w
    if rank is None:  # two full factors are read at scale 1: the scale goes into the first
        out["lokr_w1"] = (out["lokr_w1"].float() * delta.scale).to(out["lokr_w1"].dtype)
    else:
        out["alpha"] = torch.tensor(delta.scale * rank)
    return out
