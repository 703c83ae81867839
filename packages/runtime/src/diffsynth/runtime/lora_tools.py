"""LoRA files made from other files: extracted from a fine-tune, resized to another rank, merged.

- `extract_lora(base, tuned, rank)`: each 2-D weight's difference between two checkpoints of one model, cut to its
  best rank-`rank` approximation (truncated SVD: no rank-`rank` matrix is closer in Frobenius norm, Eckart-Young).
  A full fine-tune becomes a small file that loads like any LoRA. Layers are read one at a time.
- `resize_lora(lora, rank)`: every change of a LoRA (low-rank pair, LoHa, LoKr, diff) as its best rank-`rank`
  pair, so a large or LyCORIS file becomes a plain LoRA of the size asked for.
- `merge_loras([(lora, scale), ...])`: one file that changes the model as loading each at its scale does, exactly
  (ranks stacked), or at a given rank (the summed change cut by SVD).
The results are `LoRAWeights` for `save_lora`. A DoRA's change depends on the base weights, so it is refused.
They keep what the inputs say besides the tensors: the safetensors header (`header`, less the entries the new
tensors make wrong: diffusers' alphas, which are folded in, kohya's rank and alpha; for a merge the entries the
inputs agree on, an entry in one input only kept, one they disagree on dropped with a warning, or refused for
entries a loader reads such as an IC-LoRA's `reference_downscale_factor`), the prefix the names were read under
(`prefix`, when all inputs share it) and the tensors' dtype (float32 while computing). Text-encoder entries, which
the tools do not handle, are refused unless `drop_text_encoder=True`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection, Mapping, Sequence

import torch

from .errors import LoRAError, preview
from .lora import LoRATarget, LoRAWeights, read_lora, without_dotted_prefixes
from .lora_factors import HadamardDelta, KroneckerDelta, lycoris_tensors

# header entries the new tensors make wrong: diffusers' peft config (its alphas are folded in), kohya's rank / alpha
STALE_HEADER = ("format", "diffsynth_lora_format", "lora_adapter_metadata", "ss_network_dim", "ss_network_alpha")
# header entries a loader reads (LTX-2 IC-LoRA): two inputs that disagree on one cannot be merged
LOADER_HEADER = ("reference_downscale_factor",)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

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
    linears: Collection[str] | None = None,
    dtype: torch.dtype | None = None,
) -> LoRAWeights:
    """A rank-`rank` LoRA of `tuned - base` (checkpoint files, shards or state dicts of one model in one layout),
    one target per Linear `.weight` that changed by more than `threshold` (largest absolute difference); biases are
    left out. Target names are the checkpoint's keys without `.weight` and without the prefixes `read_lora` drops
    (`model.diffusion_model.`, ...). `linears` names the model's Linear layers; without it a 2-D weight counts as
    one unless it looks like an `nn.Embedding` table (`emb` in its last name part, no bias). Changed weights that
    are no Linear (embeddings, convolutions, norms) are left out with one warning: a LoRA changes Linears only.
    Written in `dtype` (default the base weight's: float16, bfloat16 or float32, else bfloat16)."""
    from .checkpoint import open_checkpoint

    _check_rank(rank)
    base_state = base if isinstance(base, Mapping) else open_checkpoint(_paths(base))
    tuned_state = tuned if isinstance(tuned, Mapping) else open_checkpoint(_paths(tuned))
    base_keys, tuned_keys = set(base_state.keys()), set(tuned_state.keys())
    missing = sorted(k for k in base_keys - tuned_keys if k.endswith(".weight"))
    if missing:
        logger.warning("the fine-tuned checkpoint lacks %d weights of the base (e.g. %s)", len(missing), missing[0])
    targets: dict[str, LoRATarget] = {}
    from_key: dict[str, str] = {}
    errors: list[float] = []
    left_out: list[str] = []
    unchanged = 0
    for key in sorted(base_keys & tuned_keys):
        if not key.endswith(".weight"):
            continue
        before, after = base_state[key], tuned_state[key]
        if tuple(before.shape) != tuple(after.shape):
            raise LoRAError(
                f"{key!r} is {tuple(before.shape)} in the base and {tuple(after.shape)} in the fine-tune: "
                "they are not checkpoints of one model"
            )
        name = without_dotted_prefixes(key.removesuffix(".weight"))
        if linears is not None:
            linear = name in linears and before.dim() == 2
        else:
            linear = before.dim() == 2 and not _looks_like_embedding(key, base_keys)
        delta = after.to(device, torch.float32) - before.to(device, torch.float32)
        if delta.numel() == 0 or float(delta.abs().max()) <= threshold:
            unchanged += 1
            continue
        if not linear:
            left_out.append(f"{key} {tuple(before.shape)}")
            continue
        if name in from_key:
            raise LoRAError(f"{from_key[name]!r} and {key!r} are both the weight of layer {name!r} (two prefixes)")
        from_key[name] = key
        down, up, error = low_rank(delta, rank)
        out = dtype or _written_dtype(before.dtype)
        targets[name] = LoRATarget(down=down.cpu().to(out), up=up.cpu().to(out))
        errors.append(error)
    if left_out:
        logger.warning(
            "%d changed weights are no Linear layer and are left out (a LoRA changes Linears only): %s",
            len(left_out), preview(left_out, 5),
        )  # fmt: skip
    if not targets:
        raise LoRAError(f"no Linear weight differs by more than {threshold} between the two checkpoints")
    logger.info(
        "extracted %d layers at rank %d (%d unchanged); relative error mean %.3g, worst %.3g",
        len(targets), rank, unchanged, sum(errors) / len(errors), max(errors),
    )  # fmt: skip
    return LoRAWeights(targets=targets, source="extracted", keys={n: f"{k} (extracted)" for n, k in from_key.items()})


def _looks_like_embedding(key: str, keys: Collection[str]) -> bool:
    """A 2-D weight that is an `nn.Embedding` table, judged by name: `emb` in the module's last name part
    (`addition_t_embedding`, `embed_tokens`) and no bias (Linears named so, `x_embedder`, have one)."""
    module = key.removesuffix(".weight")
    return "emb" in module.rsplit(".", 1)[-1].lower() and f"{module}.bias" not in keys


def _written_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype to write a LoRA made from tensors of `dtype` in: the same if a usual float, else bfloat16 (fp8)."""
    return dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.bfloat16


def lora_dtype(lora: LoRAWeights) -> torch.dtype:
    """The dtype of `lora`'s tensors (the first found; float32 for an empty one)."""
    for target in lora.targets.values():
        tensors = [target.down, target.up, target.diff, target.diff_b]
        if isinstance(target.factors, (HadamardDelta, KroneckerDelta)):
            tensors += list(lycoris_tensors(target.factors).values())
        for tensor in tensors:
            if tensor is not None and tensor.is_floating_point():
                return _written_dtype(tensor.dtype)
    return torch.float32


def cast_targets(targets: dict[str, LoRATarget], dtype: torch.dtype) -> dict[str, LoRATarget]:
    for target in targets.values():
        for name in ("down", "up", "diff", "diff_b"):
            tensor = getattr(target, name)
            if tensor is not None:
                setattr(target, name, tensor.to(dtype))
    return targets


def carried_header(header: Mapping[str, str]) -> dict[str, str]:
    """The entries of an input's safetensors header that still hold for a LoRA made from it (`STALE_HEADER` out)."""
    return {key: value for key, value in header.items() if key not in STALE_HEADER}


def refuse_text_encoder(lora: LoRAWeights, what: str) -> None:
    """Refuse `lora` when it has text-encoder entries, which `what` (a tool) would drop."""
    if lora.skipped:
        raise LoRAError(
            f"{lora.source} holds {len(lora.skipped)} text-encoder LoRA keys (e.g. {lora.skipped[0]!r}); {what} "
            "handles the denoiser's part only and would drop them. Pass --drop-text-encoder "
            "(drop_text_encoder=True) to write the denoiser's part alone"
        )


def resize_lora(
    lora: LoRAWeights | str | os.PathLike | Mapping[str, torch.Tensor],
    rank: int,
    *,
    dtype: torch.dtype | None = None,
    drop_text_encoder: bool = False,
) -> LoRAWeights:
    """`lora` with every change as its best rank-`rank` pair (scale folded in, no alpha); bias changes kept.
    Written in `dtype` (default the input's)."""
    _check_rank(rank)
    lora = read_lora(lora)
    if not drop_text_encoder:
        refuse_text_encoder(lora, "lora resize")
    targets = {}
    for name, target in lora.targets.items():
        _refuse_dora(lora, name, target)
        delta = target.delta_weight()
        resized = LoRATarget(diff_b=target.diff_b)
        if delta is not None:
            resized.down, resized.up, _ = low_rank(delta, rank)
        targets[name] = resized
    return LoRAWeights(
        targets=cast_targets(targets, dtype or lora_dtype(lora)),
        source=f"{lora.source} (rank {rank})",
        keys=dict(lora.keys),
        header=carried_header(lora.header),
        prefix=lora.prefix,
    )


def merge_loras(
    loras: Sequence[tuple[LoRAWeights | str | os.PathLike | Mapping[str, torch.Tensor], float]],
    rank: int | None = None,
    *,
    dtype: torch.dtype | None = None,
    drop_text_encoder: bool = False,
) -> LoRAWeights:
    """One LoRA changing the model as loading each `(lora, scale)` does. Without `rank` the pairs are stacked
    (exact; every change must be a low-rank pair or a diff); with `rank` each layer's summed change is cut to it.
    Names must be spelled alike in all files (the same layout, or ours: `diffsynth lora convert` first); a layer
    named two ways (kohya's `blocks_0_q` and `blocks.0.q`) is refused. Written in `dtype` (default the inputs'
    widest); the headers are merged as the module docstring says."""
    if not loras:
        raise LoRAError("merge_loras needs at least one LoRA")
    if rank is not None:
        _check_rank(rank)
    read = [(read_lora(lora), float(scale)) for lora, scale in loras]
    for lora, _ in read:
        if not drop_text_encoder:
            refuse_text_encoder(lora, "lora merge")
    _refuse_two_namings(read)
    names = list(dict.fromkeys(name for lora, _ in read for name in lora.targets))
    targets = {}
    for name in names:
        parts = [(lora, lora.targets[name], scale) for lora, scale in read if name in lora.targets]
        for lora, target, _ in parts:
            _refuse_dora(lora, name, target)
        targets[name] = _merge_target(name, parts, rank)
    if dtype is None:
        dtype = lora_dtype(read[0][0])
        for lora, _ in read[1:]:
            dtype = torch.promote_types(dtype, lora_dtype(lora))
    prefixes = {lora.prefix for lora, _ in read}
    sources = ", ".join(f"{lora.source} x {scale:g}" for lora, scale in read)
    return LoRAWeights(
        targets=cast_targets(targets, dtype),
        source=f"merged ({sources})",
        header=_merged_header(read),
        prefix=prefixes.pop() if len(prefixes) == 1 else None,
    )


def _refuse_two_namings(read: list[tuple[LoRAWeights, float]]) -> None:
    """Refuse inputs that name one layer two ways (kohya's underscored name and the dotted one): stacked as two
    targets they would map to one module, which loading refuses."""
    seen: dict[str, tuple[str, LoRAWeights]] = {}  # underscored name -> (name, the LoRA it is from)
    for lora, _ in read:
        for name in lora.targets:
            underscored = name.replace(".", "_")
            first = seen.setdefault(underscored, (name, lora))
            if first[0] != name:
                other = first[1]
                raise LoRAError(
                    f"{other.source} names a layer {other.keys.get(first[0], first[0])!r} and {lora.source} "
                    f"{lora.keys.get(name, name)!r}: both are layer {underscored!r} (kohya's underscored name and the "
                    "dotted one), which a merge would write twice; convert them to one naming first "
                    "(`diffsynth lora convert --family ...`)"
                )


def _merged_header(read: list[tuple[LoRAWeights, float]]) -> dict[str, str]:
    merged: dict[str, tuple[str, str]] = {}  # key -> (value, the file it is from)
    dropped: set[str] = set()
    for lora, _ in read:
        for key, value in carried_header(lora.header).items():
            if key in dropped:
                continue
            first = merged.setdefault(key, (value, lora.source))
            if first[0] == value:
                continue
            if key in LOADER_HEADER:
                raise LoRAError(
                    f"header entry {key!r} is {first[0]!r} in {first[1]} but {value!r} in {lora.source}; its loader "
                    "reads it, so LoRAs that disagree on it cannot be merged"
                )
            logger.warning(
                "header entry %r differs between %s and %s; it is left out of the merged file", key, first[1],
                lora.source,
            )  # fmt: skip
            dropped.add(key)
            del merged[key]
    return {key: value for key, (value, _) in merged.items()}


def _merge_target(name: str, parts: list, rank: int | None) -> LoRATarget:
    _check_part_shapes(name, parts)
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


def _check_part_shapes(name: str, parts: list) -> None:
    """Every input's change of layer `name` must have one weight (and bias) shape."""
    first = None
    for lora, t, _ in parts:
        if t.down is not None:
            shape = (int(t.up.shape[0]), int(t.down.shape[1]))
        elif t.diff is not None:
            shape = tuple(t.diff.shape)
        elif t.factors is not None:
            shape = tuple(t.factors.shape)
        else:
            shape = None
        shapes = (shape, None if t.diff_b is None else tuple(t.diff_b.shape))
        if first is None:
            first = (lora, shapes)
            continue
        (other, other_shapes) = first
        clash = [
            f"{what} {a} in {other.source} but {b} in {lora.source}"
            for what, a, b in zip(("weight change", "bias change"), other_shapes, shapes, strict=True)
            if a is not None and b is not None and a != b
        ]
        if clash:
            raise LoRAError(
                f"{lora.keys.get(name, name)!r}: layer {name!r} has {'; '.join(clash)}; the LoRAs are for "
                "different models (or model sizes) and cannot be merged"
            )
        first = (other, tuple(a if a is not None else b for a, b in zip(other_shapes, shapes, strict=True)))


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


__all__ = ["carried_header", "extract_lora", "low_rank", "merge_loras", "refuse_text_encoder", "resize_lora"]
