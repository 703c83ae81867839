"""`VramReport`: what a managed model holds on the device and what it moves, for `pipe.vram_report()`."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass
class VramReport:
    """What one managed model holds and moves (bytes, seconds since enabling or `reset_stats`)."""

    name: str
    state: str  # "active" (its stage runs) or "parked"
    device: str
    units: int
    resident_units: int
    streamed_units: int
    resident_bytes: int  # on the compute device now
    streamed_bytes: int  # unit bytes held off the compute device and streamed each forward
    bytes_per_step: int  # moved to the compute device during the last forward call
    bytes_moved: int
    forward_calls: int
    copy_wait_s: float  # compute stream stalled on copies (CUDA) + host blocked on fetches/disk reads
    gpu_wait_s: float
    host_wait_s: float
    fetches: int
    prefetch_hits: int
    misses: int
    peak_in_flight: int
    plan: str
    config: dict

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def unmanaged(cls, name: str, model: nn.Module, device: torch.device) -> VramReport:
        """The report of a model outside the manager: only what it holds on `device`."""
        held = sum(
            t.numel() * t.element_size()
            for t in (*model.parameters(), *model.buffers())
            if t.device.type == device.type
        )
        zeros = dict.fromkeys(
            ("units", "resident_units", "streamed_units", "streamed_bytes", "bytes_per_step", "bytes_moved"), 0
        )
        zeros.update(dict.fromkeys(("forward_calls", "fetches", "prefetch_hits", "misses", "peak_in_flight"), 0))
        waits = dict.fromkeys(("copy_wait_s", "gpu_wait_s", "host_wait_s"), 0.0)
        plan = "not managed: the whole model sits on the device"
        return cls(name, "unmanaged", str(device), resident_bytes=held, plan=plan, config={}, **zeros, **waits)


def device_bytes(model: nn.Module, dtype: torch.dtype) -> int:
    """Bytes an unmanaged-size model holds on its device: floating parameters in `dtype`, the rest as they are."""
    params = sum(
        p.numel() * (dtype.itemsize if p.is_floating_point() else p.element_size()) for p in model.parameters()
    )
    return params + sum(b.numel() * b.element_size() for b in model.buffers())


__all__ = ["VramReport", "device_bytes"]
