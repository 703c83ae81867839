"""Dtype and device arguments: one place that turns what users type into torch objects.

Users write `torch_dtype="bf16"` or `offload_device="disk"` in scripts, CLI flags and
`ModelConfig`s; every entry point parses them here so a typo gets the same clear message.
"""

from __future__ import annotations

import re

import torch

from .errors import ConfigError

_DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float64": torch.float64,
    "fp64": torch.float64,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "fp8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
    "fp8_e5m2": torch.float8_e5m2,
}
DTYPE_NAMES: tuple[str, ...] = tuple(_DTYPES)
DEVICE_NAMES: tuple[str, ...] = ("cpu", "cuda", "cuda:N", "mps", "disk")
DISK = "disk"  # not a torch device: the VRAM manager reads weights from the file's memory map

_DEVICE = re.compile(r"^(cpu|mps|cuda)(?::(\d+))?$")


def parse_dtype(name_or_dtype: str | torch.dtype) -> torch.dtype:
    """A floating torch dtype from a dtype or a name such as "bf16" or "torch.float8_e4m3fn"."""
    if isinstance(name_or_dtype, torch.dtype):
        if not name_or_dtype.is_floating_point:
            raise ConfigError(f"dtype {name_or_dtype} is not accepted: use a floating dtype ({', '.join(DTYPE_NAMES)})")
        return name_or_dtype
    if isinstance(name_or_dtype, str):
        key = name_or_dtype.strip().lower().removeprefix("torch.")
        if key in _DTYPES:
            return _DTYPES[key]
    raise ConfigError(f"unknown dtype {name_or_dtype!r}; accepted: {', '.join(DTYPE_NAMES)} (or a torch.dtype)")


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.bfloat16` -> "bfloat16" (for messages and JSON)."""
    return str(dtype).removeprefix("torch.")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def parse_device(device: str | torch.device | None) -> torch.device | str:
    """A torch.device, or the string "disk" for the VRAM manager; None means cuda when available, else cpu."""
    if device is None:
        return default_device()
    if isinstance(device, torch.device):
        if device.type in ("cpu", "cuda", "mps"):
            return device
        raise ConfigError(f"device {device} is not accepted; use one of {', '.join(DEVICE_NAMES)}")
    if isinstance(device, str):
        text = device.strip().lower()
        if text == DISK:
            return DISK
        found = _DEVICE.match(text)
        if found and (found.group(2) is None or found.group(1) == "cuda"):
            return torch.device(text)
    raise ConfigError(f"unknown device {device!r}; accepted: {', '.join(DEVICE_NAMES)} (or a torch.device)")


def check_device(device: torch.device | str, name: str = "device", given=None) -> None:
    """Refuse a device this torch cannot run on (a GPU it does not see), naming the argument that gave it (`name`:
    "device", "computation_device", "--device"; `given`: what was typed, default `device`), before any model loads
    rather than with torch's error after. "cpu", "disk" and devices that are there pass."""
    if isinstance(device, str) and device.strip().lower() == DISK:
        return
    device = torch.device(device)
    given = device if given is None else given
    shown, cpu = (
        (f"{name} {given}", f"{name} cpu") if name.startswith("--") else (f"{name}={str(given)!r}", f"{name}='cpu'")
    )
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(
                f"{shown}: torch {torch.__version__} sees no CUDA GPU here (CUDA build: {torch.version.cuda or 'none'}); "
                f"use {cpu}, or install a torch build for this machine's GPU"
            )
        if device.index is not None and device.index >= count:
            raise ConfigError(f"{shown}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{shown}: the Apple GPU (mps) is not available to this torch; use {cpu}")
