"""DoRA: a LoRA whose merged weight is rescaled to learned norms (weight-decomposed low-rank adaptation).

A DoRA file adds a magnitude to a LoRA (peft's `lora_magnitude_vector` [out], LyCORIS' `dora_scale` [out, 1] or
[1, in]). With the change `delta` the merged weight `W + delta` has its row norms (or, for a [1, in] magnitude, its
column norms) replaced by the magnitude: `W' = (W + delta) * m / ||W + delta||`. At a strength `s` other than 1
we follow LyCORIS, which made the format: `W_s = (W + s delta) * (s (m / ||W + s delta|| - 1) + 1)`, so 0 leaves
the layer as it was and 1 is peft's DoRA exactly.

The norms need the base weight, so they are computed when the LoRA is fused, or, unfused, at the first call at
each strength (inside the layer's forward, where a streamed weight is present), then kept. A NaN magnitude row
means "not decomposed" (the rows of a fused layer no part of the file covers): its scale is 1.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .errors import LoRAError


def read_magnitude(tensor: torch.Tensor, key: str, source: str) -> torch.Tensor:
    """A DoRA magnitude as [out, 1] (row norms) or [1, in] (column norms)."""
    if tensor.dim() == 1:
        return tensor.reshape(-1, 1)
    if tensor.dim() == 2 and 1 in tensor.shape:
        return tensor
    raise LoRAError(
        f"{source}: {key!r} has shape {tuple(tensor.shape)}; a DoRA magnitude of a Linear layer is [out], [out, 1] "
        "or [1, in] (convolution DoRA is not supported)"
    )


def is_row_wise(magnitude: torch.Tensor) -> bool:
    """Whether the magnitude sets row norms ([out, 1]); a [1, 1] magnitude (a layer with one output) counts too."""
    return magnitude.shape[1] == 1


def check_magnitude(magnitude: torch.Tensor, out_features: int, in_features: int) -> str | None:
    """What is wrong with `magnitude` for a [out, in] layer, or None."""
    if is_row_wise(magnitude) and magnitude.shape[0] == out_features:
        return None
    if magnitude.shape == (1, in_features):
        return None
    return f"DoRA magnitude {tuple(magnitude.shape)} vs weight ({out_features}, {in_features})"


def decomposition_scale(
    weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, strength: float
) -> torch.Tensor:
    """The factor ([out, 1] or [1, in], float32) the merged weight `weight + strength * delta` is multiplied by."""
    merged = weight.float() + strength * delta.float()
    dim = 1 if is_row_wise(magnitude) else 0
    norm = torch.linalg.vector_norm(merged, dim=dim, keepdim=True) + torch.finfo(torch.float32).eps
    ratio = magnitude.float().to(norm.device) / norm
    scale = strength * (ratio - 1) + 1
    return torch.where(torch.isnan(scale), torch.ones_like(scale), scale)


def fused_weight(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, strength: float) -> torch.Tensor:
    """`weight` with the DoRA at `strength` merged in (float32)."""
    scale = decomposition_scale(weight, delta, magnitude, strength)
    return (weight.float() + strength * delta.float()) * scale


def unfused_extra(
    x: torch.Tensor,
    base: torch.Tensor,
    weight: torch.Tensor,
    change_of: Callable[[torch.Tensor], torch.Tensor],
    scale: torch.Tensor,
) -> torch.Tensor:
    """What a DoRA adds to a layer's output: `base` = x @ W^T (no bias), `change_of(v)` = v @ (strength * delta)^T,
    `scale` from `decomposition_scale` (in x's dtype). Row-wise the output columns are rescaled; column-wise the
    input is, which takes the base matmul once more."""
    if is_row_wise(scale):
        factor = scale.reshape(-1)
        return base * (factor - 1) + change_of(x) * factor
    scaled = x * scale.reshape(-1)
    return F.linear(scaled, weight) - base + change_of(scaled)
