"""fp8 matmuls for Linear layers whose weights are fp8 (`computation_dtype=float8_*`).

The weight stays fp8 with its float32 scales; each call quantises the input to e4m3 with a
scale taken from its own absolute maximum (per tensor, or per token when the weight has
per-channel scales) and multiplies with `torch._scaled_mm`, which accumulates in higher precision
and writes the activation dtype. Backward (for inputs, e.g. LoRA training on an fp8 base) uses the
dequantised weight. Layers whose sizes `_scaled_mm` cannot take (not multiples of 16) are not
given this path; a device without fp8 matmuls (CUDA before sm_89) falls back to dequantising.

The forward is installed as an instance attribute of the Linear, so its class, state-dict keys
and hooks (unfused LoRAs) stay as they were.
"""

from __future__ import annotations

import logging
import types

import torch
import torch.nn.functional as F
from torch import nn

from .storage import FP8_MAX, dequantize

logger = logging.getLogger(__name__)

SCALE_ATTR = "_vram_fp8_scale"  # (scale [out, 1] float32, per_channel) of the weight swapped in
INPUT_DTYPE = torch.float8_e4m3fn
_ROWWISE_OUT = (torch.bfloat16,)  # rowwise-scaled _scaled_mm writes bfloat16 only


def fp8_matmul_supported(device: torch.device | str) -> bool:
    """`torch._scaled_mm` exists for this device: CPU, or CUDA sm_89+ (Ada, Hopper and newer)."""
    device = torch.device(device)
    if not hasattr(torch, "_scaled_mm"):
        return False
    if device.type == "cpu":
        return True
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_capability(device) >= (8, 9)
    return False


def eligible(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0


def install(linear: nn.Linear) -> None:
    linear.forward = types.MethodType(_fp8_linear_forward, linear)


def uninstall(linear: nn.Linear) -> None:
    linear.__dict__.pop("forward", None)
    linear.__dict__.pop(SCALE_ATTR, None)


def _fp8_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    weight = self.weight
    scaled = self.__dict__.get(SCALE_ATTR)
    if scaled is None or weight.dtype not in FP8_MAX:
        return F.linear(x, weight, self.bias)
    scale, per_channel = scaled
    if per_channel and x.dtype not in _ROWWISE_OUT:
        return F.linear(x, dequantize(weight, scale, x.dtype), self.bias)
    if torch.is_grad_enabled() and x.requires_grad:
        out = _ScaledLinear.apply(x, weight, scale, per_channel)
    else:  # inference: no autograd node, whose bookkeeping costs as much as a small layer's kernels
        out = _scaled_linear(x, weight, scale, per_channel)
    return out if self.bias is None else out + self.bias.to(out.dtype)


def _scaled_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """x @ (w * scale).T with x quantised to e4m3 by its own absolute maximum (per token with per-channel weight
    scales). Few kernels, as the layers are small enough at inference that launches count: the maximum is one
    float32 infinity norm; a zero input gets a tiny scale instead of a branch (it quantises to zeros either way);
    dividing by the float32 scale upcasts inside the kernel."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    limit = FP8_MAX[INPUT_DTYPE]
    dims = -1 if per_channel else (0, 1)
    amax = torch.linalg.vector_norm(x2, float("inf"), dim=dims, keepdim=True, dtype=torch.float32)
    scale_a = amax.clamp_min_(torch.finfo(torch.float32).tiny).div_(limit)  # [M, 1], or [1, 1] per tensor
    xq = (x2 / scale_a).clamp_(-limit, limit).to(INPUT_DTYPE)
    if per_channel:
        scale_b = scale.reshape(1, -1)
    else:
        scale_a, scale_b = scale_a.reshape(()), scale.reshape(-1)[0]
    out = torch._scaled_mm(xq, weight.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=x.dtype)
    return out.reshape(*shape[:-1], weight.shape[0])


class _ScaledLinear(torch.autograd.Function):
    """`_scaled_linear` with a gradient for x through the dequantised weight."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, per_channel: bool):
        ctx.save_for_backward(weight, scale)
        return _scaled_linear(x, weight, scale, per_channel)

    @staticmethod
    def backward(ctx, grad):
        weight, scale = ctx.saved_tensors
        grad_x = grad.matmul(dequantize(weight, scale, grad.dtype)) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None


__all__ = ["SCALE_ATTR", "eligible", "fp8_matmul_supported", "install", "uninstall"]
