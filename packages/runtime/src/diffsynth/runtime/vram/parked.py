"""`ParkedWeight`: what a managed parameter looks like while its real values are held elsewhere.

Between forwards a streamed (or fp8-stored) weight has no tensor of its own shape and dtype: its
bytes sit in a packed host buffer, on disk, or in fp8. The module still needs an attribute with
the right shape, dtype and a device (LoRA matching, `module_dtype`, repr) and anything that tries to
compute with it, copy it or move it must fail loudly instead of reading zeros or writing into
nothing (a meta tensor would silently accept `copy_`). This wrapper tensor gives exactly that.
"""

from __future__ import annotations

import torch
from torch import nn  # noqa: F401  (nn.Parameter is what parked_parameter returns)

from ..errors import DiffSynthError

_METADATA_OPS = (torch.ops.aten.detach.default, torch.ops.aten.alias.default)


class ParkedWeightError(DiffSynthError, RuntimeError):
    """A VRAM-managed weight was used outside its unit's forward."""


class ParkedWeight(torch.Tensor):
    """Shape/dtype-only stand-in (device "meta") for a weight held by the VRAM manager."""

    _name: str
    _where: str

    @staticmethod
    def __new__(cls, shape, dtype: torch.dtype, name: str, where: str):
        tensor = torch.Tensor._make_wrapper_subclass(cls, tuple(shape), dtype=dtype, device="meta", requires_grad=False)
        tensor._name = name
        tensor._where = where
        return tensor

    def __repr__(self, *, tensor_contents=None) -> str:
        return f"ParkedWeight({self._name!r}, shape={tuple(self.shape)}, dtype={self.dtype}, held {self._where})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func in _METADATA_OPS:
            return args[0]
        parked = next(a for a in (*args, *(kwargs or {}).values()) if isinstance(a, ParkedWeight))
        raise ParkedWeightError(
            f"{parked._name!r} is held by the VRAM manager ({parked._where}) and has no values outside its "
            f"block's forward ({func.__name__} was called on it). Move models with pipe.load_models_to_device() "
            "or handle.activate()/park() rather than .to(); apply LoRAs unfused (fuse=False); edit or read "
            "weights inside `with handle.materialized():`, or use handle.state_dict()"
        )


def parked_parameter(shape, dtype: torch.dtype, name: str, where: str) -> nn.Parameter:
    """A `ParkedWeight` that modules count as a parameter (what `nn.Parameter` does for tensor
    subclasses, without its `detach()` round trip)."""
    tensor = ParkedWeight(shape, dtype, name, where)
    tensor._is_param = True
    return tensor


__all__ = ["ParkedWeight", "ParkedWeightError", "parked_parameter"]
