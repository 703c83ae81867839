"""LoRA files made from other files: extracted from a fine-tune, resized to another rank, merged.

- `extract_lora(base, tuned, rank)`: each 2-D weight's difference between two checkpoints of one model, cut to its
  best rank-`rank` approximation (truncated SVD: no rank-`rank` matrix is closer in Frobenius norm, Eckart-Young).
  A full fine-tune becomes a small file that loads like any LoRA. Layers are read one at a time.
- `resize_lora(lora, rank)`: every change of a LoRA (low-rank pair, LoHa, LoKr, diff) as its best rank-`rank`
  pair, so a large or LyCORIS file becomes a plain LoRA of the size asked for.
- `merge_loras([(lora, scale), ...])`: one file that changes the model as loading each at its scale does, exactly
  (ranks stacked), or at a given rank (the summed change cut by SVD).
The results are `LoRAWeights` for `save_lora`. A DoRA's change depends on the base weights, so it is refused.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence

import torch

from .errors import LoRAError, preview
from .lora import LoRATarget, LoRAWeights, read_lora

logger = logging.getLogger(__name__)


def low_rank(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(down [r, in], up [out, r], relative Frobenius error) of the best rank-`r` approximation of `delta`, r =
    min(rank, its sides), the singular values split evenly between the two factors; computed in float32 on the
    tensor's device."""
    matrix = delta.float()
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    down, up = root[:, None] * vh[:r], u[:, :r] * root[None, :]
    total = float(s.pow(2).sum())
    error = (float(s[r:].pow(2).sum()) / total) ** 0.5 if total > 0 else 0.0
    return down.contiguous(), up.contiguous(), error


def extract_lora(
    base: str | os.PathLike | Sequence[str] | Mapping[str, torch.Tensor],
    tuned: str | os.PathLike | Sequence[str] | Mapping[str, torch.Tensor],
    rank: int,
    *,
    threshold: float = 0.0,
    device: str | torch.device = "cpu",
) -> LoRAWeights:
    """A rank-`rank` LoRA of `tuned - base` (checkpoint files, shards or state dicts of one model in one layout),
    one target per 2-D `.weight` that changed by more than `threshold` (largest absolute difference); biases and
    other tensors are left out. Target names are the checkpoint's keys without `.weight`."""
    from .checkpoint import open_checkpoint

    _check_rank(rank)
    base_state = base if isinstance(base, Mapping) else open_checkpoint(_paths(base))
    tuned_state = tuned if isinstance(tuned, Mapping) else open_checkpoint(_paths(tuned))
    base_keys, tuned_keys = set(base_state.keys()), set(tuned_state.keys())
    missing = sorted(k for k in base_keys - tuned_keys if k.endswith(".weight"))
    if missing:
        logger.warning("the fine-tuned checkpoint lacks %d weights of the base (e.g. %s)", len(missing), missing[0])
    targets: dict[str, LoRATarget] = {}
    errors: list[float] = []
    unchanged = 0
    for key in sorted(base_keys & tuned_keys):
        if not key.endswith(".weight"):
            continue
        before, after = base_state[key], tuned_state[key]
        if before.dim() != 2:
            continue
        if tuple(before.shape) != tuple(after.shape):
            raise LoRAError(
                f"{key!r} is {tuple(before.shape)} in the base and {tuple(after.shape)} in the fine-tune: "
                "they are not checkpoints of one model"
            )
        delta = after.to(device, torch.float32) - before.to(device, torch.float32)
        if float(delta.abs().max()) <= threshold:
            unchanged += 1
            continue
        down, up, error = low_rank(delta, rank)
        targets[key.removesuffix(".weight")] = LoRATarget(down=down.cpu(), up=up.cpu())
        errors.append(error)
    if not targets:
        raise LoRAError(f"no 2-D weight differs by more than {threshold} between the two checkpoints")
    logger.info(
        "extracted %d layers at rank %d (%d unchanged); relative error mean %.3g, worst %.3g",
        len(targets), rank, unchanged, sum(errors) / len(errors), max(errors),
    )  # fmt: skip
    return LoRAWeights(targets=targets, source="extracted")


def resize_lora(lora: LoRAWeights | str | os.PathLike | Mapping[str, torch.Tensor], rank: int) -> LoRAWeights:
    """`lora` with every change as its best rank-`rank` pair (scale folded in, no alpha); bias changes kept."""
    _check_rank(rank)
    lora = read_lora(lora)
    targets = {}
    for name, target in lora.targets.items():
        _refuse_dora(lora, name, target)
        delta = target.delta_weight()
        resized = LoRATarget(diff_b=target.diff_b)
        if delta is not None:
            resized.down, resized.up, _ = low_rank(delta, rank)
        targets[name] = resized
    return LoRAWeights(targets=targets, source=f"{lora.source} (rank {rank})", skipped=list(lora.skipped))


def merge_loras(
    loras: Sequence[tuple[LoRAWeights | str | os.PathLike | Mapping[str, torch.Tensor], float]],
    rank: int | None = None,
) -> LoRAWeights:
    """One LoRA changing the model as loading each `(lora, scale)` does. Without `rank` the pairs are stacked
    (exact; every change must be a low-rank pair or a diff); with `rank` each layer's summed change is cut to it.
    Names must be spelled alike in all files (the same layout, or ours: load them in a pipeline to convert)."""
    if not loras:
        raise LoRAError("merge_loras needs at least one LoRA")
    if rank is not None:
        _check_rank(rank)
    read = [(read_lora(lora), float(scale)) for lora, scale in loras]
    names = list(dict.fromkeys(name for lora, _ in read for name in lora.targets))
    targets = {}
    for name in names:
        parts = [(lora, lora.targets[name], scale) for lora, scale in read if name in lora.targets]
        for lora, target, _ in parts:
            _refuse_dora(lora, name, target)
        targets[name] = _merge_target(name, parts, rank)
    sources = ", ".join(f"{lora.source} x {scale:g}" for lora, scale in read)
    return LoRAWeights(targets=targets, source=f"merged ({sources})")


def _merge_target(name: str, parts: list, rank: int | None) -> LoRATarget:
    merged = LoRATarget()
    biases = [t.diff_b.float() * s for _, t, s in parts if t.diff_b is not None]
    if biases:
        merged.diff_b = torch.stack(biases).sum(0)
    if rank is not None:
        deltas = [t.delta_weight() * s for _, t, s in parts if t.delta_weight() is not None]
        if deltas:
            merged.down, merged.up, _ = low_rank(torch.stack(deltas).sum(0), rank)
        return merged
    factored = [lora.keys.get(name, name) for lora, t, _ in parts if t.factors is not None]
    if factored:
        raise LoRAError(
            f"{factored[0]!r} is a LyCORIS change (LoHa / LoKr), which cannot be stacked with LoRA pairs exactly; "
            "give a rank to merge at (the summed change is then cut to it)"
        )
    pairs = [(t, s) for _, t, s in parts if t.down is not None]
    if pairs:
        merged.down = torch.cat([t.down.float() for t, _ in pairs])
        merged.up = torch.cat([t.up.float() * (t.factor * s) for t, s in pairs], dim=1)
    diffs = [t.diff.float() * s for _, t, s in parts if t.diff is not None]
    if diffs:
        merged.diff = torch.stack(diffs).sum(0)
    return merged


def _refuse_dora(lora: LoRAWeights, name: str, target: LoRATarget) -> None:
    if target.magnitude is not None:
        raise LoRAError(
            f"{lora.source}: {lora.keys.get(name, name)!r} is a DoRA, whose change depends on the base weights; "
            "it cannot be resized or merged without them (load it into the model instead)"
        )


def _check_rank(rank: int) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise LoRAError(f"rank must be a whole number >= 1, got {rank!r}")


def _paths(source) -> list[str]:
    if isinstance(source, (str, os.PathLike)):
        return [os.fspath(source)]
    paths = [os.fspath(p) for p in source]
    if not paths:
        raise LoRAError(f"no checkpoint files given ({preview(paths)})")
    return paths


__all__ = ["extract_lora", "low_rank", "merge_loras", "resize_lora"]
