"""The VRAM manager: block-granular offload, streaming, fp8 storage and disk reads for one model.

`enable_vram_management(model, config, vram_limit=...)` applies DiffSynth-Studio's eight keys to a
model whose class declares `offload_units`, and returns a `VramHandle` (activate/park between
pipeline stages, `report()`). Modules, one job each: `config` (the keys), `plan` (what stays
resident), `storage` (fp8 with scales, packing), `disk` (safetensors reads), `streaming` (hooks,
side-stream prefetch), `fp8_matmul` (`torch._scaled_mm` Linear), `units` (which parameters move),
`parked` (placeholders), `report` (what is observed), `manager` (the handle).
"""

from __future__ import annotations

from .config import VRAM_KEYS, VramConfig
from .manager import VramHandle, enable_vram_management, vram_handle
from .parked import ParkedWeight, ParkedWeightError
from .plan import DEFAULT_ACTIVATION_GIB, Plan, UnitSize, find_units, make_plan
from .report import VramReport
from .storage import dequantize, quantize
from .units import module_dtype

__all__ = [
    "DEFAULT_ACTIVATION_GIB",
    "VRAM_KEYS",
    "ParkedWeight",
    "ParkedWeightError",
    "Plan",
    "UnitSize",
    "VramConfig",
    "VramHandle",
    "VramReport",
    "dequantize",
    "enable_vram_management",
    "find_units",
    "make_plan",
    "module_dtype",
    "quantize",
    "vram_handle",
]
