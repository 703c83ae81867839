"""One attention entry point for every model.

`attention(q, k, v, mask=None)` takes `[batch, seq, heads, head_dim]` tensors and returns the same
layout. The backend is torch SDPA by default (it picks cuDNN / flash kernels on Hopper by itself);
`DIFFSYNTH_ATTENTION=flash|sage|xformers|sdpa` selects another when it is installed. A backend that
cannot serve a call (a mask, a dtype, a CPU tensor) falls back to SDPA, so results never depend on
whether an optional kernel happens to be installed, only speed does.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from functools import cache

import torch
import torch.nn.functional as F

from .errors import ConfigError
from .parallel import active_sequence

logger = logging.getLogger(__name__)

BACKENDS = ("sdpa", "flash", "sage", "xformers")
_MODULES = {"flash": "flash_attn", "sage": "sageattention", "xformers": "xformers"}


@cache
def _available(backend: str) -> bool:
    return backend == "sdpa" or importlib.util.find_spec(_MODULES[backend]) is not None


def selected_backend() -> str:
    name = os.environ.get("DIFFSYNTH_ATTENTION", "sdpa").strip().lower() or "sdpa"
    if name not in BACKENDS:
        raise ConfigError(f"DIFFSYNTH_ATTENTION={name!r} is not a known backend; choose one of {', '.join(BACKENDS)}")
    if not _available(name):
        _warn_missing(name)
        return "sdpa"
    return name


@cache
def _warn_missing(name: str) -> None:
    logger.warning("attention backend %r is not installed (pip install %s); using torch SDPA", name, _MODULES[name])


def _expand_mask(mask: torch.Tensor, q_len: int) -> torch.Tensor:
    """Bool key-padding mask `[B, S_k]` -> `[B, 1, 1, S_k]`; 4-D masks pass through."""
    if mask.dim() == 2:
        return mask[:, None, None, :]
    if mask.dim() == 3:
        return mask[:, None, :, :]
    return mask


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    sequence_parallel: bool = False,
) -> torch.Tensor:
    """Scaled dot-product attention on `[B, S, H, D]` tensors.

    `mask` is boolean (True = attend) with shape `[B, S_k]` (key padding), `[B, S_q, S_k]` or
    `[B, H|1, S_q, S_k]`, or an additive float mask of the 4-D shape. `sequence_parallel` marks a
    call whose q, k and v are all this rank's shard of one token sequence: inside a model call
    that divides its sequence (`parallel.shard_sequence`) they are exchanged so that attention sees
    every token (the mask then covers the whole padded sequence); elsewhere it changes nothing.
    """
    if sequence_parallel:
        shards = active_sequence()
        if shards is not None:
            return shards.attention(q, k, v, mask, scale, _attend)
    return _attend(q, k, v, mask, scale)


def _attend(q, k, v, mask, scale) -> torch.Tensor:
    backend = selected_backend()
    if backend != "sdpa" and mask is None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        out = _fast_attention(backend, q, k, v, scale)
        if out is not None:
            return out
    attn_mask = _expand_mask(mask, q.shape[1]) if mask is not None else None
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask, scale=scale
    )
    return out.transpose(1, 2)


def _fast_attention(backend, q, k, v, scale):
    try:
        if backend == "flash":
            from flash_attn import flash_attn_func

            return flash_attn_func(q, k, v, softmax_scale=scale)
        if backend == "sage":
            from sageattention import sageattn

            return sageattn(q, k, v, tensor_layout="NHD", sm_scale=scale)
        if backend == "xformers":
            import xformers.ops as xops

            return xops.memory_efficient_attention(q, k, v, scale=scale)
    except Exception as exc:  # an optional kernel that cannot serve this call: fall back
        logger.debug("attention backend %s failed (%s); falling back to SDPA", backend, exc)
    return None
