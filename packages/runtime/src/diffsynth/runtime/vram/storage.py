"""How a unit's weights are stored off the compute path: fp8 with scales, packed into one flat buffer.

fp8 is a floating format, so a single per-tensor scale keeps every element's relative error at
the format's rounding (2^-4 for e4m3, 2^-3 for e5m2) as long as it stays in the normal range.
Per-channel scales only help rows whose magnitude is far below the tensor's largest row, where
per-tensor scaling would push them into the subnormals; "auto" picks per-channel exactly then
(row spread above `AUTO_CHANNEL_SPREAD`). Scales are float32 and always stored per output
channel (a per-tensor scale is repeated), so dequantisation is one broadcast multiply.

A unit's tensors are packed into one flat byte buffer (fp8 data, its scales, and the tensors kept
in a wider dtype), so moving a unit host->device is one copy of one pinned buffer.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from ..dtypes import dtype_name
from ..errors import ConfigError
from .config import FP8_DTYPES, is_fp8

FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}
# Row-amax spread (largest row / smallest row) beyond which per-tensor scaling sends the smallest rows
# into the subnormal range: about 2^(normal binades - 5) of the format (e4m3: 2^-6..448, e5m2: 2^-14..57344).
AUTO_CHANNEL_SPREAD = {torch.float8_e4m3fn: 2.0**10, torch.float8_e5m2: 2.0**24}
GRANULARITIES = ("auto", "tensor", "channel")
ALIGN = 64  # bytes; every tensor starts on an aligned offset so views are valid for any kernel


@dataclass
class Quantized:
    """fp8 `data` and its float32 `scale` (shape `[out, 1, ...]`): value = data * scale."""

    data: torch.Tensor
    scale: torch.Tensor
    per_channel: bool

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize(self.data, self.scale, dtype)


def check_granularity(value: str) -> str:
    if value not in GRANULARITIES:
        raise ConfigError(f"fp8_granularity={value!r} is not accepted; use one of {list(GRANULARITIES)}")
    return value


def scale_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """Shape of a stored scale: one per output channel (dim 0) of a matrix or filter bank, broadcast
    over the other dims; a single broadcast value for vectors and scalars."""
    if len(shape) < 2:
        return (1,) * len(shape)
    return (int(shape[0]),) + (1,) * (len(shape) - 1)


def quantize(tensor: torch.Tensor, dtype: torch.dtype, granularity: str = "auto") -> Quantized:
    """`tensor` as fp8 `dtype` with float32 scales (see the module docstring for `granularity`)."""
    if not is_fp8(dtype):
        raise ConfigError(f"quantize() needs an fp8 dtype ({[dtype_name(d) for d in FP8_DTYPES]}), got {dtype}")
    check_granularity(granularity)
    shape = scale_shape(tensor.shape)
    if tensor.dtype == dtype:  # already fp8 (e.g. an fp8 checkpoint): keep it bit-exact
        return Quantized(tensor, torch.ones(shape, dtype=torch.float32, device=tensor.device), False)
    limit = FP8_MAX[dtype]
    with torch.no_grad():
        t32 = tensor.detach().to(torch.float32)
        if t32.dim() >= 2:
            row_amax = t32.abs().amax(dim=tuple(range(1, t32.dim())), keepdim=True)
        else:
            row_amax = t32.abs().amax().reshape(shape)
        top = row_amax.max() if row_amax.numel() else torch.zeros((), device=t32.device)
        per_channel = t32.dim() >= 2 and _wants_channels(granularity, row_amax, top, dtype)
        amax = row_amax if per_channel else top.expand(shape)
        scale = torch.where(amax > 0, amax / limit, torch.ones_like(amax)).to(torch.float32).contiguous()
        data = (t32 / scale).clamp_(-limit, limit).to(dtype)
    return Quantized(data, scale, per_channel)


def _wants_channels(granularity: str, row_amax: torch.Tensor, top: torch.Tensor, dtype: torch.dtype) -> bool:
    if granularity != "auto":
        return granularity == "channel"
    smallest = row_amax[row_amax > 0]
    if smallest.numel() == 0:
        return False
    return bool(top / smallest.min() > AUTO_CHANNEL_SPREAD[dtype])


def dequantize(data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """data * scale in float32, then rounded once to `dtype`."""
    return data.to(torch.float32).mul_(scale).to(dtype)


def fp8_error_bound(tensor: torch.Tensor, q: Quantized) -> torch.Tensor:
    """Element-wise bound of |dequantize(q) - tensor|: half an ulp relative to each value (normal
    range) plus half the smallest subnormal step of its scale (values near zero)."""
    mantissa = {torch.float8_e4m3fn: 3, torch.float8_e5m2: 2}[q.data.dtype]
    min_exp = {torch.float8_e4m3fn: -6, torch.float8_e5m2: -14}[q.data.dtype]
    half_sub = 2.0 ** (min_exp - mantissa - 1)
    return tensor.abs().float() * 2.0 ** -(mantissa + 1) + half_sub * q.scale


# ----------------------------------------------------------------------------------- packing
@dataclass(frozen=True)
class Slot:
    """Where one tensor sits in a packed buffer (and its fp8 scale, when quantised)."""

    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    scale_offset: int = -1

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def quantized(self) -> bool:
        return self.scale_offset >= 0

    @property
    def scale_nbytes(self) -> int:
        return math.prod(scale_shape(self.shape)) * 4 if self.quantized else 0


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def layout(shapes: Sequence[Sequence[int]], dtypes: Sequence[torch.dtype]) -> tuple[list[Slot], int]:
    """Slots for tensors of `shapes` stored as `dtypes` (fp8 ones get a scale), and the total bytes."""
    slots, end = [], 0
    for shape, dtype in zip(shapes, dtypes, strict=True):
        shape = tuple(int(d) for d in shape)
        offset = end
        end = _aligned(offset + math.prod(shape) * dtype.itemsize)
        scale_offset = -1
        if is_fp8(dtype):
            scale_offset = end
            end = _aligned(end + math.prod(scale_shape(shape)) * 4)
        slots.append(Slot(offset, dtype, shape, scale_offset))
    return slots, end


def view(buffer: torch.Tensor, slot: Slot) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The tensor (and scale) a slot describes, as views of a flat uint8 `buffer`."""
    data = buffer[slot.offset : slot.offset + slot.nbytes].view(slot.dtype).view(slot.shape)
    if not slot.quantized:
        return data, None
    scale = buffer[slot.scale_offset : slot.scale_offset + slot.scale_nbytes].view(torch.float32)
    return data, scale.view(scale_shape(slot.shape))


class Packed:
    """A unit's tensors in one flat uint8 buffer on one device (see the module docstring).

    `per_channel[i]` says whether tensor i's scales differ per channel (fp8 matmuls then scale
    rows instead of using one scalar).
    """

    def __init__(self, slots: list[Slot], buffer: torch.Tensor, per_channel: list[bool]):
        self.slots = slots
        self.buffer = buffer
        self.per_channel = per_channel

    @classmethod
    def pack(
        cls,
        tensors: Iterable[torch.Tensor],
        shapes: Sequence[Sequence[int]],
        dtypes: Sequence[torch.dtype],
        *,
        device: torch.device | str = "cpu",
        pin: bool = False,
        granularity: str = "auto",
        work_device: torch.device | str | None = None,
        buffer: torch.Tensor | None = None,
    ) -> Packed:
        """Pack `tensors` (consumed one at a time, so a generator keeps one in memory) as `dtypes`;
        quantisation runs on `work_device` when given (a GPU quantises a host store much faster). `buffer`: the
        flat uint8 memory to pack into (e.g. a `HostArena` view of exactly `layout`'s total bytes), instead of a
        new allocation on `device`."""
        slots, total = layout(shapes, dtypes)
        device = torch.device(device)
        if buffer is None:
            buffer = torch.empty(total, dtype=torch.uint8, device=device, pin_memory=pin and device.type == "cpu")
        elif buffer.dtype != torch.uint8 or buffer.numel() != total:
            raise ValueError(f"pack: a given buffer must be {total} uint8 bytes, got {buffer.numel()} {buffer.dtype}")
        per_channel = []
        count = 0
        with torch.no_grad():
            for tensor in tensors:
                if count >= len(slots):
                    raise ValueError(f"pack: got more tensors than the {len(slots)} slots")
                slot = slots[count]
                count += 1
                if tuple(tensor.shape) != slot.shape:
                    raise ValueError(f"pack: tensor of shape {tuple(tensor.shape)} for a slot of shape {slot.shape}")
                data, scale = view(buffer, slot)
                if slot.quantized:
                    q = quantize(tensor.to(work_device or device), slot.dtype, granularity)
                    data.copy_(q.data)
                    scale.copy_(q.scale)
                    per_channel.append(q.per_channel)
                else:
                    data.copy_(tensor)
                    per_channel.append(False)
        if count != len(slots):
            raise ValueError(f"pack: got {count} tensors for {len(slots)} slots")
        return cls(slots, buffer, per_channel)

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()

    @property
    def device(self) -> torch.device:
        return self.buffer.device

    def views(self, buffer: torch.Tensor | None = None) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """(data, scale) per tensor, over `buffer` (a copy of ours elsewhere) or our own."""
        buffer = self.buffer if buffer is None else buffer
        return [view(buffer, slot) for slot in self.slots]

    def values(self, dtypes: Sequence[torch.dtype], device: torch.device | str | None = None):
        """Each tensor's value in `dtypes[i]` (dequantised), one at a time, computed on `device`."""
        buffer = self.buffer if device is None else self.buffer.to(device)
        for (data, scale), dtype in zip(self.views(buffer), dtypes, strict=True):
            yield dequantize(data, scale, dtype) if scale is not None else data.to(dtype)

    def update(self, i: int, tensor: torch.Tensor, granularity: str = "auto") -> None:
        """Store a new value for tensor i (quantised again when its slot is fp8)."""
        slot = self.slots[i]
        data, scale = view(self.buffer, slot)
        with torch.no_grad():
            if slot.quantized:
                q = quantize(tensor.to(self.device), slot.dtype, granularity)
                data.copy_(q.data)
                scale.copy_(q.scale)
                self.per_channel[i] = q.per_channel
            else:
                data.copy_(tensor)

    def to(self, device: torch.device | str, pin: bool = False) -> Packed:
        """The same layout on another device (one copy of the buffer)."""
        device = torch.device(device)
        if device == self.buffer.device:
            return self
        buffer = torch.empty(self.nbytes, dtype=torch.uint8, device=device, pin_memory=pin and device.type == "cpu")
        buffer.copy_(self.buffer)
        return Packed(self.slots, buffer, list(self.per_channel))


__all__ = [
    "AUTO_CHANNEL_SPREAD",
    "FP8_MAX",
    "GRANULARITIES",
    "Packed",
    "Quantized",
    "Slot",
    "dequantize",
    "fp8_error_bound",
    "layout",
    "quantize",
    "view",
]
