"""What FLUX.1 Kontext and FLUX.2 editing training share: a row's reference images, and batching samples that
carry reference tokens (the tokens stacked, their ids shared, so every row of a batch needs the same layout)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.media import tensor_to_pil


def row_references(row: Mapping[str, Any], column: str) -> list:
    """The reference images in a row's `column`: dataset tensors back to PIL (lossless for 8-bit files)."""
    value = row.get(column)
    if value is None or (isinstance(value, (str, list, tuple)) and not value):
        return []
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    return [tensor_to_pil(item)[0] if isinstance(item, torch.Tensor) else item for item in items]


def collate_references(
    samples: Sequence[Mapping[str, torch.Tensor]], stacked: Sequence[str], tokens: str, ids: str, column: str
) -> dict[str, Any]:
    """`stacked` keys stacked; with references (`tokens` stacked, `ids` shared) when the rows have them. A batch
    mixing rows with and without references, or with different reference layouts, is an error naming `column`."""
    batch = {name: torch.stack([s[name] for s in samples]) for name in stacked}
    with_references = sum(tokens in s for s in samples)
    if with_references == 0:
        return batch
    if with_references < len(samples):
        raise ConfigError(
            f"a batch mixes {with_references} rows with {column} and {len(samples) - with_references} without; give "
            f"every row {column} (or none), or train with --batch_size 1"
        )
    shared = samples[0][ids]
    if any(s[ids].shape != shared.shape or not torch.equal(s[ids], shared) for s in samples):
        raise ConfigError(
            f"the rows of a batch have {column} of different sizes or counts; train with --batch_size 1 or give "
            "the rows of one size bucket references of one size"
        )
    return {**batch, tokens: torch.stack([s[tokens] for s in samples]), ids: shared}


__all__ = ["collate_references", "row_references"]
