"""LoRAs on fused Linears: the parts of one fused layer merged into one exact LoRA, and a fused LoRA split back.

Checkpoints disagree on which projections are one Linear: BFL's FLUX `img_attn.qkv` and ComfyUI's Z-Image
`attention.qkv` stack q, k and v on the output rows, where diffusers (and our Z-Image DiT) keep `to_q`, `to_k` and
`to_v` apart. A LoRA trained on one layout is exact on the other, because every kind of change we read acts on
output rows independently (a LoRA's up rows, a diff's rows, a row-norm DoRA's norms) or can be placed on its rows
(a LyCORIS change, `RowStackedDelta`). A part is described by where its rows start and how many there are
(`FusedPart`); the families keep their own name tables and hand the parts over.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from .errors import LoRAError
from .lora import LoRATarget
from .lora_dora import check_magnitude
from .lora_factors import RowStackedDelta


class PartRows(Protocol):
    """Anything with a `FusedPart`'s `start` and `rows` (a family's part type may carry more)."""

    start: int
    rows: int | None


@dataclass(frozen=True)
class FusedPart:
    """Output rows `start:start+rows` of a fused Linear (rows None: all of them)."""

    start: int = 0
    rows: int | None = None


@torch.no_grad()
def merge_parts(
    out_features: int,
    in_features: int,
    module: str,
    parts: Sequence[tuple[PartRows, LoRATarget, str]],
    source: str,
    model: str,
) -> LoRATarget:
    """One exact LoRA on the Linear `module` ([out_features, in_features]) from `parts`: (where, change, file key).

    The downs are stacked along the rank and the up is block-diagonal with each part's alpha / rank folded in
    (rows of parts not given stay zero); diffs and bias diffs go on their rows, LyCORIS changes stay factored on
    their rows, DoRA row norms on their rows (NaN: no norm given). A single part covering the whole layer is
    returned as it is. Raises `LoRAError` naming the key for a part whose shape does not fit its rows, two
    parts on the same rows, or a column-norm DoRA on a part (its norms would span the other parts)."""
    spans = []
    for part, t, key in parts:
        rows = out_features if part.rows is None else part.rows
        where = repr(module) if part.rows is None else f"rows {part.start}:{part.start + rows} of {module!r}"
        check_part(t, key, where, rows, in_features, source, model)
        spans.append((part.start, part.start + rows, key))
    spans.sort()
    for (_, end, first), (start, _, second) in zip(spans, spans[1:], strict=False):
        if start < end:
            raise LoRAError(f"{source}: {first!r} and {second!r} both change rows of {module!r}; give one of them")
    if len(parts) == 1 and parts[0][0].rows is None:
        return parts[0][1]
    first = next((x for _, t, _ in parts for x in (t.down, t.diff, t.diff_b) if x is not None), None)
    dtype, device = (None, None) if first is None else (first.dtype, first.device)
    ranked = [(p, t) for p, t, _ in parts if t.down is not None]
    merged = LoRATarget()
    if ranked:
        up = torch.zeros(out_features, sum(t.rank for _, t in ranked), device=device)
        column = 0
        for p, t in ranked:
            up[p.start : p.start + t.up.shape[0], column : column + t.rank] = t.up.float().to(device) * t.factor
            column += t.rank
        merged.down = torch.cat([t.down.float().to(device) for _, t in ranked]).to(dtype)
        merged.up = up.to(dtype)
    if any(t.diff is not None for _, t, _ in parts):
        merged.diff = torch.zeros(out_features, in_features, dtype=dtype, device=device)
        for p, t, _ in parts:
            if t.diff is not None:
                merged.diff[p.start : p.start + t.diff.shape[0]] = t.diff.to(dtype)
    if any(t.diff_b is not None for _, t, _ in parts):
        merged.diff_b = torch.zeros(out_features, dtype=dtype, device=device)
        for p, t, _ in parts:
            if t.diff_b is not None:
                merged.diff_b[p.start : p.start + t.diff_b.shape[0]] = t.diff_b.to(dtype)
    factored = tuple((p.start, t.factors) for p, t, _ in parts if t.factors is not None)
    if factored:  # LyCORIS changes stay factored, each on its rows
        merged.factors = RowStackedDelta(out_features, in_features, factored)
    decomposed = [(p, t, key) for p, t, key in parts if t.magnitude is not None]
    if decomposed:  # DoRA row norms are each row's own: the parts' magnitudes on their rows, NaN (none) elsewhere
        column_wise = [key for _, t, key in decomposed if t.magnitude.shape[1] != 1]
        if column_wise:
            raise LoRAError(
                f"{source}: {column_wise[0]!r} is a DoRA with column norms ([1, in] magnitude) on a part of "
                f"{module!r}; the norms of a fused layer's columns span its other parts, so it cannot be applied"
            )
        merged.magnitude = torch.full((out_features, 1), float("nan"), dtype=decomposed[0][1].magnitude.dtype)
        for p, t, _ in decomposed:
            merged.magnitude[p.start : p.start + t.magnitude.shape[0]] = t.magnitude.to(merged.magnitude)
    return merged


def check_part(t: LoRATarget, key: str, where: str, rows: int, in_features: int, source: str, model: str) -> None:
    """Raise `LoRAError` naming `key` when `t` does not fit `rows` x `in_features` (`where`: the rows, for the
    message)."""
    problems = []
    if t.down is not None and (t.down.shape[1] != in_features or t.up.shape[0] != rows):
        problems.append(f"down {tuple(t.down.shape)} / up {tuple(t.up.shape)}")
    if t.diff is not None and tuple(t.diff.shape) != (rows, in_features):
        problems.append(f"diff {tuple(t.diff.shape)}")
    if t.diff_b is not None and tuple(t.diff_b.shape) != (rows,):
        problems.append(f"diff_b {tuple(t.diff_b.shape)}")
    if t.factors is not None and tuple(t.factors.shape) != (rows, in_features):
        problems.append(f"a {type(t.factors).__name__} of shape {tuple(t.factors.shape)}")
    if t.magnitude is not None and check_magnitude(t.magnitude, rows, in_features):
        problems.append(f"a DoRA magnitude {tuple(t.magnitude.shape)}")
    if problems:
        raise LoRAError(
            f"{source}: {key!r} has {', '.join(problems)} but lands on {where} of the {model}, which takes "
            f"[{rows}, {in_features}]; the LoRA was probably made for a different model or model size"
        )


def split_fused(
    t: LoRATarget,
    key: str,
    name: str,
    parts: Mapping[str, PartRows],
    source: str,
    into: str = "diffusers'",
) -> dict[str, LoRATarget]:
    """The exact LoRAs of the parts (name -> rows, each with `rows` set) of the fused layer `name` changed by `t`.

    The down is shared, the up's rows are split and each part keeps only the rank columns its rows use (so a LoRA
    merged from parts comes back as those parts, with the same alpha / rank); diffs, bias diffs and DoRA row
    norms are split on their rows. Parts the LoRA leaves unchanged are left out. A LoHa / LoKr or a column-norm
    DoRA cannot be split and is refused, naming `key`; `into` words whose parts they are."""
    if t.factors is not None:
        raise LoRAError(
            f"{source}: {key!r} is a LoHa / LoKr on the fused layer {name!r}; it cannot be split exactly into "
            f"{into} {list(parts)}"
        )
    if t.magnitude is not None and t.magnitude.shape[1] != 1:
        raise LoRAError(
            f"{source}: {key!r} is a DoRA with column norms on the fused layer {name!r}; each of {into} parts "
            f"{list(parts)} would need its own column norms, which the file does not give"
        )
    pieces = {}
    for theirs, part in parts.items():
        rows = slice(part.start, part.start + part.rows)
        piece = LoRATarget()
        if t.down is not None:
            up = t.up[rows]
            used = (up != 0).any(dim=0)
            if used.any():
                rank = int(used.sum())
                piece.down, piece.up = t.down[used], up[:, used]
                piece.alpha = None if t.alpha is None else t.factor * rank  # the same alpha / rank
        if t.diff is not None and (t.diff[rows] != 0).any():
            piece.diff = t.diff[rows]
        if t.diff_b is not None and (t.diff_b[rows] != 0).any():
            piece.diff_b = t.diff_b[rows]
        if t.magnitude is not None and not torch.isnan(t.magnitude[rows]).all():
            piece.magnitude = t.magnitude[rows]  # row norms are each row's own
        if piece.magnitude is not None and piece.down is None and piece.diff is None:  # a DoRA of no change
            source_tensor = t.down if t.down is not None else t.diff
            piece.down = source_tensor.new_zeros(1, source_tensor.shape[1])
            piece.up = source_tensor.new_zeros(part.rows, 1)
        if piece.down is not None or piece.diff is not None or piece.diff_b is not None:
            pieces[theirs] = piece
    return pieces


__all__ = ["FusedPart", "PartRows", "check_part", "merge_parts", "split_fused"]
