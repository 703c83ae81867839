"""The eight VRAM keys of DiffSynth-Studio, parsed once and completed with defaults.

Users write these per model (`ModelConfig(..., offload_device="cpu", ...)`); the manager needs
every one resolved to a concrete device and dtype. The four states, as in DiffSynth-Studio:

- offload: the model is parked (its pipeline stage is not running);
- onload: the model's stage is running; units that do not fit `vram_limit` stay here and are
  streamed to the computation device for each forward;
- preparing: units that fit `vram_limit` stay resident on the computation device in this dtype;
- computation: what the forward sees (fp8 here means fp8 matmuls through `torch._scaled_mm`).

Unset keys are filled so that a partial config means the obvious thing: devices default towards
the computation device (onload becomes "cpu" when a `vram_limit` asks for streaming), and an
unset storage dtype takes the nearest set storage dtype (offload -> onload -> preparing), so
`offload_dtype=float8_e4m3fn` alone stores fp8 everywhere and computes in the model's dtype.
`"disk"` is accepted as a device for offload/onload and as their dtype (the file's own dtype).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch

from ..dtypes import DISK, dtype_name, parse_device, parse_dtype
from ..errors import ConfigError
from ..hub import VRAM_KEYS

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
HOST_DEVICES = ("cpu", DISK)

Device = str  # "cpu", "cuda:0", "disk"


def is_fp8(dtype) -> bool:
    return dtype in FP8_DTYPES


def is_host(device: Device) -> bool:
    return device in HOST_DEVICES


@dataclass(frozen=True)
class VramConfig:
    """A fully resolved set of the eight keys (devices as strings, dtypes as torch dtypes or "disk")."""

    offload_dtype: torch.dtype | str
    offload_device: Device
    onload_dtype: torch.dtype | str
    onload_device: Device
    preparing_dtype: torch.dtype
    preparing_device: Device
    computation_dtype: torch.dtype
    computation_device: Device

    @classmethod
    def resolve(
        cls,
        keys: Mapping | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        streaming: bool = False,
    ) -> VramConfig:
        """Parse `keys` (any subset of the eight, None values ignored) and fill the rest.

        `device`/`dtype` are the pipeline's (the defaults of the computation keys); `streaming`
        says a `vram_limit` was given, which makes an unset onload device "cpu".
        """
        given = parse_vram_keys(keys)
        comp_device = given.get("computation_device") or _device(device, "device")
        if comp_device == DISK:
            raise ConfigError("computation_device='disk' is not accepted: computation runs on cpu or cuda")
        comp_dtype = given.get("computation_dtype") or parse_dtype(dtype if dtype is not None else torch.bfloat16)
        if comp_dtype == DISK:
            raise ConfigError("computation_dtype='disk' is not accepted: use a floating dtype such as bfloat16")
        prep_device = given.get("preparing_device") or comp_device
        offload_given = given.get("offload_device")
        if streaming and comp_device != "cpu":
            default_onload = DISK if offload_given == DISK else "cpu"
        else:
            default_onload = comp_device
        onload_device = given.get("onload_device") or default_onload
        offload_device = offload_given or onload_device
        offload_dtype, onload_dtype, prep_dtype = _storage_dtypes(given, comp_dtype, offload_device, onload_device)
        config = cls(
            offload_dtype=offload_dtype,
            offload_device=offload_device,
            onload_dtype=onload_dtype,
            onload_device=onload_device,
            preparing_dtype=prep_dtype,
            preparing_device=prep_device,
            computation_dtype=comp_dtype,
            computation_device=comp_device,
        )
        config._check()
        return config

    # ------------------------------------------------------------------ derived facts
    @property
    def streams(self) -> bool:
        """Whether units can stay in host memory (or on disk) while the model runs, i.e. whether
        `vram_limit` decides anything. An onload device equal to a GPU computation device means the
        whole model sits on the GPU while its stage runs (DiffSynth-Studio's meaning)."""
        return is_host(self.onload_device)

    @property
    def parks(self) -> bool:
        """Whether the model leaves the computation device between its stages."""
        return self.offload_device != self.computation_device

    @property
    def fp8_matmul(self) -> bool:
        return is_fp8(self.computation_dtype)

    def as_dict(self) -> dict[str, str]:
        return {f.name: _show(getattr(self, f.name)) for f in fields(self)}

    def _check(self) -> None:
        for key in ("preparing_device", "computation_device"):
            if getattr(self, key) == DISK:
                raise ConfigError(f"{key}='disk' is not accepted: only offload_device and onload_device can be 'disk'")
        if self.preparing_device not in (self.computation_device, self.onload_device):
            raise ConfigError(
                f"preparing_device={self.preparing_device!r} must be the computation device "
                f"({self.computation_device!r}) or the onload device ({self.onload_device!r})"
            )
        for key in ("onload_device", "offload_device"):
            value = getattr(self, key)
            if not is_host(value) and value != self.computation_device:
                raise ConfigError(
                    f"{key}={value!r} must be 'cpu', 'disk' or the computation device ({self.computation_device!r})"
                )
        if not is_host(self.offload_device) and is_host(self.onload_device):
            raise ConfigError(
                f"offload_device={self.offload_device!r} keeps the model on the computation device, so "
                f"onload_device={self.onload_device!r} cannot hold it off the device while it runs; use "
                "offload_device='cpu' (or 'disk') to stream"
            )
        if self.offload_device != DISK and self.onload_device == DISK:
            raise ConfigError(
                f"onload_device='disk' needs offload_device='disk' too (got {self.offload_device!r}): "
                "weights parked in memory cannot be read back from the file"
            )
        for key in ("preparing_dtype", "computation_dtype"):
            if getattr(self, key) == DISK:
                raise ConfigError(f"{key}='disk' is not accepted; 'disk' is a dtype of offload/onload only")


def parse_vram_keys(keys: Mapping | None) -> dict:
    """The VRAM keys of `keys` that are set, parsed (devices as strings, dtypes as torch dtypes or "disk");
    an unknown key or value is a `ConfigError` naming it."""
    if keys is None:
        return {}
    if not isinstance(keys, Mapping):
        raise ConfigError(f"the VRAM config must be a mapping of the keys {list(VRAM_KEYS)}, got {type(keys).__name__}")
    unknown = [k for k in keys if k not in VRAM_KEYS]
    if unknown:
        raise ConfigError(f"unknown VRAM config key(s) {unknown}; accepted: {list(VRAM_KEYS)}")
    parsed = {}
    for key, value in keys.items():
        if value is None:
            continue
        if key.endswith("_dtype"):
            parsed[key] = _dtype(value, key)
        else:
            parsed[key] = _device(value, key)
    return parsed


def _dtype(value, key: str) -> torch.dtype | str:
    if isinstance(value, str) and value.strip().lower() == DISK:
        if key not in ("offload_dtype", "onload_dtype"):
            raise ConfigError(f"{key}='disk' is not accepted; 'disk' is a dtype of offload/onload only")
        return DISK
    try:
        return parse_dtype(value)
    except ConfigError as exc:
        raise ConfigError(f"{key}: {exc}") from None


def _device(value, key: str) -> Device:
    try:
        parsed = parse_device(value)
    except ConfigError as exc:
        raise ConfigError(f"{key}: {exc}") from None
    if parsed == DISK:
        return DISK
    if parsed.type == "cuda" and parsed.index is None:
        parsed = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return str(parsed)


def _storage_dtypes(given: dict, comp_dtype: torch.dtype, offload_device: Device, onload_device: Device):
    """offload/onload/preparing dtypes: each unset one takes the nearest set one (towards offload first)."""
    names = ("offload_dtype", "onload_dtype", "preparing_dtype")
    values = [given.get(n) for n in names]
    devices = (offload_device, onload_device, None)
    for i, (name, value) in enumerate(zip(names, values, strict=True)):
        if value == DISK and devices[i] != DISK:
            raise ConfigError(f"{name}='disk' needs {name.replace('dtype', 'device')}='disk', got {devices[i]!r}")
        if value not in (None, DISK) and devices[i] == DISK:
            raise ConfigError(
                f"{name}={_show(value)} is not accepted with {name.replace('dtype', 'device')}='disk': weights on "
                "disk are read as the file stores them; leave it unset (or 'disk') and choose fp8 through "
                "preparing_dtype / computation_dtype"
            )
    filled = []
    for i in range(3):
        if devices[i] == DISK:
            filled.append(DISK)
            continue
        real = [(abs(j - i), j > i, values[j]) for j in range(3) if values[j] not in (None, DISK)]
        filled.append(values[i] if values[i] is not None else (min(real)[2] if real else comp_dtype))
    return tuple(filled)


def _show(value) -> str:
    return dtype_name(value) if isinstance(value, torch.dtype) else str(value)


__all__ = ["FP8_DTYPES", "VRAM_KEYS", "VramConfig", "is_fp8", "is_host", "parse_vram_keys"]
