"""Weight-only quantization of a model's Linear layers: NF4 / FP4 through bitsandbytes (QLoRA's storage).

`ModelConfig(..., quantize=QuantizeConfig(method="bitsandbytes_nf4"))` (DiffSynth-Studio's names) replaces the
model's `nn.Linear` layers, once its weights are loaded, by bitsandbytes' `Linear4bit`: about 4.5 bits per
weight in blocks of 64 with one absmax each, dequantized to the compute dtype inside each forward. That is
bitsandbytes' job (its CUDA kernels, its CPU path), so it is an optional dependency (`pip install bitsandbytes`,
or the `quant` extra). The quantized layers stay `nn.Linear` subclasses, differentiable with respect to their
input: LoRAs attach to them (kept apart: a fused delta would be lost in the 4-bit rounding) and train on them.

Not the VRAM manager's fp8 storage (`offload_dtype="float8_e4m3fn"`): that keeps every unit's weights in 8 bits
and streams them; this stores Linears in 4 bits for good. A quantized model moves between stages as a whole
(its 4-bit weights are small); block streaming and disk offload do not apply to it (see `check_vram_keys`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import ConfigError

logger = logging.getLogger(__name__)

# method -> bitsandbytes' quant_type
METHODS = {"bitsandbytes_nf4": "nf4", "bitsandbytes_fp4": "fp4"}
MODES = ("dynamic", "dequant_once")
BACKEND_OPTIONS = ("compress_statistics", "blocksize", "quant_storage")
INSTALL_HINT = "pip install bitsandbytes (or the extra: pip install 'diffsynth-runtime[quant]')"


@dataclass
class QuantizeConfig:
    """Which Linear layers of one model to quantize, and how (DiffSynth-Studio's `QuantizeConfig` fields).

    `method`: "bitsandbytes_nf4" (NF4, QLoRA's) or "bitsandbytes_fp4". `mode`: "dynamic" keeps the 4-bit layers
    (dequantized per forward: the memory saving); "dequant_once" puts plain Linears back holding the rounded
    weights (the quality of the format at full speed and full size). `target_modules` / `exclude_modules`:
    module names; a Linear matches an entry when its dotted name equals it or ends with "." + it (None targets
    every Linear). `backend_config_kwargs`: bitsandbytes' `compress_statistics` (default True: the absmax values
    quantized again), `blocksize` (64) and `quant_storage` (torch.uint8)."""

    method: str | None = None
    mode: str = "dynamic"
    target_modules: list[str] | None = None
    exclude_modules: list[str] | None = None
    backend_config_kwargs: dict[str, Any] = field(default_factory=dict)
    load_prequantized: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"QuantizeConfig method={self.method!r} is not supported; methods: {sorted(METHODS)}")
        if self.mode not in MODES:
            raise ConfigError(f"QuantizeConfig mode={self.mode!r} must be one of {MODES}")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = [part.strip() for part in value.split(",") if part.strip()]
            if value is not None and (
                not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value)
            ):
                raise ConfigError(f"QuantizeConfig {name} must be a list of module names, got {value!r}")
            setattr(self, name, None if value is None else list(value))
        unknown = sorted(set(self.backend_config_kwargs) - set(BACKEND_OPTIONS))
        if unknown:
            raise ConfigError(
                f"QuantizeConfig backend_config_kwargs {unknown} are not bitsandbytes options; it takes "
                f"{list(BACKEND_OPTIONS)}"
            )
        blocksize = self.backend_config_kwargs.get("blocksize")
        if blocksize is not None and (isinstance(blocksize, bool) or blocksize not in (32, 64, 128, 256, 512, 1024)):
            raise ConfigError(f"QuantizeConfig blocksize={blocksize!r}: bitsandbytes takes 32, 64, ..., 1024")
        if self.load_prequantized:
            raise ConfigError(
                "QuantizeConfig load_prequantized=True (a checkpoint saved quantized) is not supported yet: load the "
                "original weights with load_prequantized=False and they are quantized as they load"
            )

    @classmethod
    def parse(cls, value: QuantizeConfig | str | None) -> QuantizeConfig | None:
        """A `QuantizeConfig`, or a method name as shorthand (`quantize="bitsandbytes_nf4"`)."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, str):
            return cls(method=value.strip())
        raise ConfigError(f"quantize must be a QuantizeConfig or a method name {sorted(METHODS)}, got {value!r}")

    def targets(self, model: nn.Module) -> list[str]:
        """The names of the Linear layers of `model` this config quantizes (in module order)."""

        def matches(name: str, entries: list[str]) -> bool:
            return any(name == entry or name.endswith("." + entry) for entry in entries)

        chosen = []
        for name, module in model.named_modules():
            if type(module) is not nn.Linear:  # subclasses (fp8 matmul, already quantized) are left as they are
                continue
            if self.target_modules is not None and not matches(name, self.target_modules):
                continue
            if self.exclude_modules and matches(name, self.exclude_modules):
                continue
            chosen.append(name)
        return chosen

    def quantize_model(self, model: nn.Module, compute_device: str | torch.device | None = None) -> nn.Module:
        """Quantize the targeted Linears of `model` (weights loaded) in place, one layer at a time on
        `compute_device` (default: where the layer is; on a GPU the rounding runs there, fast), each layer left
        where it was. Returns `model`."""
        bnb = _bitsandbytes()
        names = self.targets(model)
        if not names:
            raise ConfigError(
                f"QuantizeConfig({self.method}): no nn.Linear of {type(model).__name__} matches "
                f"target_modules={self.target_modules} / exclude_modules={self.exclude_modules}"
            )
        options = dict(self.backend_config_kwargs)
        quant_type = METHODS[self.method]
        for name in names:
            linear = model.get_submodule(name)
            home = linear.weight.device
            device = torch.device(compute_device) if compute_device is not None else home
            quantized = _quantized_linear(bnb, linear, quant_type, options).to(device)
            if self.mode == "dequant_once":
                quantized = _dequantized(bnb, quantized)
            _replace(model, name, quantized.to(home))
        logger.info("%s: %d Linear layers quantized (%s, %s)", type(model).__name__, len(names), self.method, self.mode)
        model._diffsynth_quantize = self  # noqa: SLF001 - read by `quantize_config`
        return model


def quantize_config(model: nn.Module | None) -> QuantizeConfig | None:
    """The config `model` was quantized with (None for a model that was not)."""
    return getattr(model, "_diffsynth_quantize", None)


def is_quantized_linear(module: nn.Module) -> bool:
    """Whether `module` is a Linear whose weight is stored quantized (its `.weight` is packed, not [out, in])."""
    weight = getattr(module, "weight", None)
    return isinstance(module, nn.Linear) and getattr(weight, "quant_state", None) is not None


def linear_weight(module: nn.Linear) -> torch.Tensor:
    """A Linear's [out, in] weight, dequantized for a quantized layer: for code that calls `F.linear` with the
    weight itself rather than the module."""
    if not is_quantized_linear(module):
        return module.weight
    return _bitsandbytes().functional.dequantize_4bit(module.weight.data, module.weight.quant_state)


def check_vram_keys(slot: str, config: QuantizeConfig, vram_keys: dict[str, Any]) -> None:
    """Refuse VRAM settings a quantized model cannot honour: fp8 storage or disk offload of its weights (they are
    4-bit already, and not in the file's layout). Placement keys are fine: the model moves as a whole."""
    bad = {
        key: value
        for key, value in vram_keys.items()
        if value is not None
        and ((key.endswith("_dtype") and (value == "disk" or getattr(value, "itemsize", 2) == 1)) or value == "disk")
    }
    if bad:
        raise ConfigError(
            f"the {slot} model is quantized ({config.method}); its ModelConfig also sets {bad}, which a quantized "
            "model cannot take (fp8 storage and disk offload apply to unquantized weights): drop one of the two"
        )


# ----------------------------------------------------------------------------------- internals
def _bitsandbytes():
    try:
        import bitsandbytes
    except ImportError:
        raise ConfigError(f"quantization with bitsandbytes needs the bitsandbytes package: {INSTALL_HINT}") from None
    return bitsandbytes


def _quantized_linear(bnb, linear: nn.Linear, quant_type: str, options: dict) -> nn.Module:
    """A `Linear4bit` holding `linear`'s weight, not yet rounded: bitsandbytes rounds it when it is moved to a
    device (`.to`)."""
    weight = linear.weight.detach()
    if weight.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ConfigError(
            f"bitsandbytes quantizes float16/bfloat16/float32 weights; a {weight.dtype} Linear "
            f"({tuple(weight.shape)}) cannot be quantized: load the model in one of those dtypes"
        )
    storage = options.get("quant_storage", torch.uint8)
    compress = options.get("compress_statistics", True)
    layer = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=weight.dtype,
        compress_statistics=compress,
        quant_type=quant_type,
        quant_storage=storage,
        device="meta",
    )
    layer.weight = bnb.nn.Params4bit(
        weight.cpu() if weight.device.type == "meta" else weight,
        requires_grad=False,
        blocksize=options.get("blocksize") or 64,
        compress_statistics=compress,
        quant_type=quant_type,
        quant_storage=storage,
        module=layer,
    )
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
    layer.requires_grad_(False)
    return layer


def _dequantized(bnb, layer: nn.Module) -> nn.Linear:
    """A plain Linear holding `layer`'s rounded weights (mode "dequant_once")."""
    weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(layer.compute_dtype)
    plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    plain.weight = nn.Parameter(weight, requires_grad=False)
    if layer.bias is not None:
        plain.bias = nn.Parameter(layer.bias.detach(), requires_grad=False)
    return plain


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


__all__ = [
    "METHODS",
    "QuantizeConfig",
    "check_vram_keys",
    "is_quantized_linear",
    "linear_weight",
    "quantize_config",
]
