"""Seeded random weights for tiny test models.

Released inits zero many gates and pad tokens, which would let a parity test pass while whole paths
are never compared; these weights make every parameter count.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def _is_norm_weight(name: str, param: torch.Tensor) -> bool:
    return param.dim() == 1 and "norm" in name


def random_weights(
    model: torch.nn.Module,
    seed: int = 0,
    *,
    scale: float = 0.1,
    is_norm: Callable[[str, torch.Tensor], bool] = _is_norm_weight,
) -> torch.nn.Module:
    """Fill every parameter with `scale * N(0, 1)`, norm weights with `1 + 0.1 * N(0, 1)` (in order, seeded).

    A model on the meta device is returned untouched (meta builds have no values to set).
    """
    if any(p.is_meta for p in model.parameters()):
        return model
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1.0 + 0.1 * noise if is_norm(name, param) else scale * noise)
    return model
