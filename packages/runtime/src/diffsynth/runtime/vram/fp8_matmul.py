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
    out = _ScaledLinear.apply(x, weight, scale, per_channel)
    return out if self.bias is None else out + self.bias.to(out.dtype)


class _ScaledLinear(torch.autograd.Function):
    """x @ (w * scale).T with x quantised on the fly; gradient for x through the dequantised weight."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, per_channel: bool):
        ctx.save_for_backward(weight, scale)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        limit = FP8_MAX[INPUT_DTYPE]
        if per_channel:
            amax = x2.abs().amax(dim=-1, keepdim=True).float()
            scale_a = torch.where(amax > 0, amax / limit, torch.ones_like(amax))
            scale_b = scale.reshape(1, -1)
        else:
            amax = x2.abs().amax().float()
            scale_a = torch.where(amax > 0, amax / limit, torch.ones_like(amax))
            scale_b = scale.reshape(-1)[0]
        xq = (x2.float() / scale_a).clamp_(-limit, limit).to(INPUT_DTYPE)
        out = torch._scaled_mm(xq, weight.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=x.dtype)
        return out.reshape(*shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        weight, scale = ctx.saved_tensors
        grad_x = grad.matmul(dequantize(weight, scale, grad.dtype)) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None


__all__ = ["SCALE_ATTR", "eligible", "fp8_matmul_supported", "install", "uninstall"]
