"""Weight-only quantization of a model's Linear layers: NF4 / FP4 through bitsandbytes, int8 / fp8 through torchao.

`ModelConfig(..., quantize=QuantizeConfig(method="bitsandbytes_nf4"))` (DiffSynth-Studio's names and fields)
replaces the model's `nn.Linear` layers, once its weights are loaded, by quantized ones:

- "bitsandbytes_nf4" / "bitsandbytes_fp4": bitsandbytes' `Linear4bit`, about 4.5 bits per weight in blocks of
  64 with one absmax each, dequantized to the compute dtype inside each forward (QLoRA's storage);
- "torchao_int8_w8a16" / "torchao_fp8_w8a16": torchao's `quantize_` with `Int8WeightOnlyConfig` /
  `Float8WeightOnlyConfig`: the layer stays an `nn.Linear` whose weight is a torchao tensor subclass of the true
  [out, in] shape, 8 bits per weight with one scale per output channel; activations stay in the compute dtype.

The libraries do the work (their kernels, their CPU paths), so they are optional dependencies (the `quant`
extra). The quantized layers are differentiable with respect to their input: LoRAs attach to them (kept apart:
a fused delta would be lost in the rounding) and train on them. `MixedQuantizeConfig` gives disjoint layer sets
different methods; `quant_io` saves quantized models and loads them back without a full-precision copy.

Not the VRAM manager's fp8 storage (`offload_dtype="float8_e4m3fn"`): that keeps every unit's weights in 8 bits
and streams them; this stores chosen Linears quantized for good. A quantized model moves between stages as a
whole; block streaming and disk offload do not apply to it (see `check_vram_keys`).
"""

from __future__ import annotations

import ast
import dataclasses
import json
import logging
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import ConfigError

logger = logging.getLogger(__name__)

# method -> what it stores
METHODS = {
    "bitsandbytes_nf4": "bitsandbytes NF4 weights (4-bit, blocks of 64)",
    "bitsandbytes_fp4": "bitsandbytes FP4 weights (4-bit, blocks of 64)",
    "torchao_int8_w8a16": "torchao int8 weights, one scale per output channel (Int8WeightOnlyConfig)",
    "torchao_fp8_w8a16": "torchao float8 e4m3 weights, one scale per output channel (Float8WeightOnlyConfig)",
}
BNB_TYPES = {"bitsandbytes_nf4": "nf4", "bitsandbytes_fp4": "fp4"}
TORCHAO_CONFIGS = {"torchao_int8_w8a16": "Int8WeightOnlyConfig", "torchao_fp8_w8a16": "Float8WeightOnlyConfig"}
# DiffSynth-Studio's other names: activation quantization, int4 and microscaling formats need kernels (CUDA, recent
# GPUs) that torchao does not run on the CPU this project is built and tested on
NOT_SUPPORTED = (
    "torchao_int4_w4a16",
    "torchao_nvfp4_w4a16",
    "torchao_int8_w8a8",
    "torchao_fp8_w8a8",
    "torchao_int4_w4a8",
    "torchao_mxfp8_w8a8",
    "torchao_mxfp4_w4a4",
    "torchao_nvfp4_w4a4",
    "comfy_kitchen_int8_w8a8",
    "comfy_kitchen_fp8_w8a8",
)
MODES = ("dynamic", "dequant_once")
BACKEND_OPTIONS = ("compress_statistics", "blocksize", "quant_storage")
BNB_STORAGE = (torch.uint8, torch.int8, torch.float16, torch.bfloat16, torch.float32)
INSTALL_HINT = "pip install bitsandbytes (or the extra: pip install 'diffsynth-runtime[quant]')"
TORCHAO_HINT = "pip install 'torchao>=0.16' (or the extra: pip install 'diffsynth-runtime[quant]')"


@dataclass
class QuantizeConfig:
    """Which Linear layers of one model to quantize, and how (DiffSynth-Studio's `QuantizeConfig` fields).

    `method`: one of `METHODS`. `mode`: "dynamic" keeps the quantized layers (dequantized per forward: the memory
    saving); "dequant_once" puts plain Linears back holding the rounded weights (the quality of the format at full
    speed and full size). `target_modules` / `exclude_modules`: module names; a Linear matches an entry when its
    dotted name equals it or ends with "." + it (None targets every Linear). `backend_config_kwargs`: for
    bitsandbytes `compress_statistics` (default True: the absmax values quantized again), `blocksize` (64) and
    `quant_storage` (torch.uint8); for torchao the fields of its config class (e.g. Int8WeightOnlyConfig's
    `group_size`). `load_prequantized`: the checkpoint holds this config's quantized layers (`quant_io`)."""

    method: str | None = None
    mode: str = "dynamic"
    target_modules: list[str] | None = None
    exclude_modules: list[str] | None = None
    backend_config_kwargs: dict[str, Any] = field(default_factory=dict)
    load_prequantized: bool = False

    def __post_init__(self) -> None:
        if self.method in NOT_SUPPORTED:
            raise ConfigError(
                f"QuantizeConfig method={self.method!r} (activation quantization, int4 or microscaling formats) is "
                f"not supported here; weight-only methods: {sorted(METHODS)}"
            )
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
        if not isinstance(self.backend_config_kwargs, dict):
            raise ConfigError(
                f"QuantizeConfig backend_config_kwargs must be a dict, got {self.backend_config_kwargs!r}"
            )
        if self.method in BNB_TYPES:
            _check_bnb_options(self.backend_config_kwargs)
        else:
            _check_torchao_options(self.method, self.backend_config_kwargs)
        self.load_prequantized = bool(self.load_prequantized)

    @classmethod
    def parse(cls, value: QuantizeConfig | MixedQuantizeConfig | str | None) -> QuantizeConfig | None:
        """A `QuantizeConfig` or `MixedQuantizeConfig`, or a method name as shorthand (`quantize="bitsandbytes_nf4"`)."""
        if value is None or isinstance(value, (cls, MixedQuantizeConfig)):
            return value
        if isinstance(value, str):
            return cls(method=value.strip())
        raise ConfigError(f"quantize must be a QuantizeConfig or a method name {sorted(METHODS)}, got {value!r}")

    @property
    def configs(self) -> list[QuantizeConfig]:
        return [self]

    def targets(self, model: nn.Module) -> list[str]:
        """The names of the Linear layers of `model` this config quantizes (in module order)."""

        def matches(name: str, entries: list[str]) -> bool:
            return any(name == entry or name.endswith("." + entry) for entry in entries)

        chosen = []
        for name, module in model.named_modules():
            # subclasses (fp8 matmul, bitsandbytes) and torchao layers (already quantized) are left as they are
            if type(module) is not nn.Linear or is_quantized_linear(module):
                continue
            if self.target_modules is not None and not matches(name, self.target_modules):
                continue
            if self.exclude_modules and matches(name, self.exclude_modules):
                continue
            chosen.append(name)
        return chosen

    def layer_methods(self, model: nn.Module) -> dict[str, QuantizeConfig]:
        """Layer name -> the config that quantizes it."""
        return dict.fromkeys(self.targets(model), self)

    def quantize_model(self, model: nn.Module, compute_device: str | torch.device | None = None) -> nn.Module:
        """Quantize the targeted Linears of `model` (weights loaded) in place, one layer at a time on
        `compute_device` (default: where the layer is; on a GPU the rounding runs there, fast), each layer left
        where it was. Returns `model`."""
        return _quantize_layers(self, model, self.layer_methods(model), compute_device)

    def quantize_linear(self, linear: nn.Linear) -> nn.Module:
        """One Linear quantized by this config's method and mode (a new module; `linear` may be consumed)."""
        if self.method in BNB_TYPES:
            bnb = _bitsandbytes()
            layer = _bnb_linear(bnb, linear, BNB_TYPES[self.method], self.backend_config_kwargs)
            layer = layer.to(linear.weight.device)  # bitsandbytes rounds here
        else:
            layer = _torchao_linear(self.method, linear, self.backend_config_kwargs)
        return dequantized_linear(layer) if self.mode == "dequant_once" else layer

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields (what a saved checkpoint records, read back by `config_from_dict`): torch dtypes and
        torchao granularities as small tagged records, so the options come back as the objects they were."""
        data = dataclasses.asdict(self)
        data["backend_config_kwargs"] = {
            k: _encode_option(v, f"backend_config_kwargs[{k!r}]") for k, v in self.backend_config_kwargs.items()
        }
        return data


@dataclass
class MixedQuantizeConfig:
    """Several `QuantizeConfig`s over disjoint layer sets of one model (DiffSynth-Studio's), e.g. int8 for the
    precision-sensitive modulation layers and NF4 for the rest. All share one `mode`; `load_prequantized` is set
    here, not on the parts. Accepted wherever a `QuantizeConfig` is."""

    configs: list[QuantizeConfig] = field(default_factory=list)
    load_prequantized: bool = False

    def __post_init__(self) -> None:
        parts = [QuantizeConfig.parse(c) for c in (self.configs or [])]
        if not parts or any(not isinstance(c, QuantizeConfig) for c in parts):
            raise ConfigError(
                f"MixedQuantizeConfig configs must be a non-empty list of QuantizeConfig, got {self.configs!r}"
            )
        modes = sorted({c.mode for c in parts})
        if len(modes) > 1:
            raise ConfigError(f"MixedQuantizeConfig configs must share one mode; got {modes}")
        if any(c.load_prequantized for c in parts):
            raise ConfigError("MixedQuantizeConfig: set load_prequantized on the MixedQuantizeConfig, not its configs")
        self.configs = parts
        self.load_prequantized = bool(self.load_prequantized)

    @property
    def method(self) -> str:
        return "mixed(" + ", ".join(c.method for c in self.configs) + ")"

    @property
    def mode(self) -> str:
        return self.configs[0].mode

    def targets(self, model: nn.Module) -> list[str]:
        chosen = self.layer_methods(model)
        return [name for name, _ in model.named_modules() if name in chosen]

    def layer_methods(self, model: nn.Module) -> dict[str, QuantizeConfig]:
        """Layer name -> the part that quantizes it; a layer two parts match is refused by name."""
        chosen: dict[str, QuantizeConfig] = {}
        for config in self.configs:
            for name in config.targets(model):
                if name in chosen:
                    raise ConfigError(
                        f"MixedQuantizeConfig: layer {name!r} is matched by both {chosen[name].method} and "
                        f"{config.method}; the configs' target_modules / exclude_modules must not overlap"
                    )
                chosen[name] = config
        return chosen

    def quantize_model(self, model: nn.Module, compute_device: str | torch.device | None = None) -> nn.Module:
        """As `QuantizeConfig.quantize_model`, each layer by its part."""
        return _quantize_layers(self, model, self.layer_methods(model), compute_device)

    def to_dict(self) -> dict[str, Any]:
        return {"configs": [c.to_dict() for c in self.configs], "load_prequantized": self.load_prequantized}


AnyQuantizeConfig = QuantizeConfig | MixedQuantizeConfig


def config_from_dict(data: Any, source: str = "the recorded quantization config") -> AnyQuantizeConfig:
    """The config `to_dict` wrote (as recorded in a saved checkpoint), with its backend_config_kwargs: the packed
    tensors carry what shaped their rounding, but the model's config should say it too (a loaded model saved again,
    or its config used to quantize another, gives the same layers). Anything unknown or ill-typed is an error naming
    `source` (the file) and the key."""

    def fail(what: str) -> ConfigError:
        return ConfigError(f"{source}: {what}")

    def part(fields: Any, where: str) -> QuantizeConfig:
        if not isinstance(fields, dict):
            raise fail(f"{where}must be a dict of QuantizeConfig fields, got {fields!r}")
        known = [f.name for f in dataclasses.fields(QuantizeConfig)]
        unknown = sorted(set(fields) - set(known))
        if unknown:
            raise fail(f"{where}key {unknown[0]!r} is not a QuantizeConfig field ({known})")
        options = fields.get("backend_config_kwargs") or {}
        if not isinstance(options, dict):
            raise fail(f"{where}backend_config_kwargs must be a dict, got {options!r}")
        decoded = {k: _decode_option(v, f"{where}backend_config_kwargs[{k!r}]", source) for k, v in options.items()}
        try:
            return QuantizeConfig(**{**fields, "backend_config_kwargs": decoded})
        except ConfigError as exc:
            raise fail(f"{where}{exc}") from None

    if not isinstance(data, dict):
        raise fail(f"the recorded quantization config must be a dict, got {data!r}")
    if "configs" in data:
        unknown = sorted(set(data) - {"configs", "load_prequantized"})
        if unknown or not isinstance(data["configs"], list):
            raise fail(f"key {(unknown or ['configs'])[0]!r} does not fit a MixedQuantizeConfig record")
        parts = [part({**c, "load_prequantized": False} if isinstance(c, dict) else c, f"configs[{i}] ")
                 for i, c in enumerate(data["configs"])]  # fmt: skip
        return MixedQuantizeConfig(configs=parts, load_prequantized=True)
    return part(data, "")


def save_quantized_model(model_or_model_config, path, **options) -> str:
    """`quant_io.save_quantized_model`, here too (DiffSynth-Studio imports it beside the configs)."""
    from .quant_io import save_quantized_model as save

    return save(model_or_model_config, path, **options)


def quantize_config(model: nn.Module | None) -> AnyQuantizeConfig | None:
    """The config `model` was quantized with (None for a model that was not)."""
    return getattr(model, "_diffsynth_quantize", None)


def layer_method(module: nn.Module) -> str | None:
    """The method that stored `module`'s weight (None for a plain or fp8-matmul Linear)."""
    weight = getattr(module, "weight", None)
    if not isinstance(module, nn.Linear) or weight is None:
        return None
    if callable(getattr(module, "dequantized_weight", None)):  # gguf.GGUFLinear: the file's ggml blocks
        return f"gguf_{module.qtype}"
    state = getattr(weight, "quant_state", None)
    if state is not None:
        return f"bitsandbytes_{state.quant_type}"
    kind = _torchao_kind(weight)
    return {"Int8Tensor": "torchao_int8_w8a16", "Float8Tensor": "torchao_fp8_w8a16"}.get(kind, kind)


def is_quantized_linear(module: nn.Module) -> bool:
    """Whether `module` is a Linear whose weight is stored quantized (bitsandbytes' packed weight, a torchao
    tensor subclass, a GGUF file's blocks): its weight cannot take a fused LoRA delta, `linear_weight` gives its
    float value."""
    return layer_method(module) is not None


def linear_weight(module: nn.Linear) -> torch.Tensor:
    """A Linear's [out, in] weight, dequantized for a quantized layer: for code that calls `F.linear` with the
    weight itself rather than the module."""
    if callable(getattr(module, "dequantized_weight", None)):  # gguf.GGUFLinear
        return module.dequantized_weight()
    weight = module.weight
    if getattr(weight, "quant_state", None) is not None:
        return _bitsandbytes().functional.dequantize_4bit(weight.data, weight.quant_state)
    if _torchao_kind(weight) is not None:
        return weight.dequantize()
    return weight


def dequantized_linear(layer: nn.Module) -> nn.Linear:
    """A plain Linear holding `layer`'s rounded weights (mode "dequant_once"), in the layer's float dtype."""
    if getattr(layer.weight, "quant_state", None) is not None:
        weight = linear_weight(layer).to(layer.compute_dtype)
    else:
        weight = linear_weight(layer)
    plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    plain.weight = nn.Parameter(weight.detach(), requires_grad=False)
    if layer.bias is not None:
        plain.bias = nn.Parameter(layer.bias.detach().to(weight.dtype), requires_grad=False)
    return plain


def check_vram_keys(
    slot: str, config: AnyQuantizeConfig, vram_keys: dict[str, Any], source: str = "its ModelConfig"
) -> None:
    """Refuse VRAM settings a quantized model cannot honour: fp8 storage or disk offload of its weights (they are
    quantized already, and not in the file's layout). Placement keys are fine: the model moves as a whole.
    `source` says where the keys came from, for the message."""
    bad = {
        key: value
        for key, value in vram_keys.items()
        if value is not None
        and ((key.endswith("_dtype") and (value == "disk" or getattr(value, "itemsize", 2) == 1)) or value == "disk")
    }
    if bad:
        raise ConfigError(
            f"the {slot} model is quantized ({config.method}); {source} also sets {bad}, which a quantized "
            "model cannot take (fp8 storage and disk offload apply to unquantized weights): drop one of the two"
        )


# ----------------------------------------------------------------------------------- internals
def _quantize_layers(config, model: nn.Module, chosen: dict[str, QuantizeConfig], compute_device) -> nn.Module:
    if config.load_prequantized:
        raise ConfigError(
            f"QuantizeConfig({config.method}, load_prequantized=True) describes a checkpoint saved quantized: give it "
            "to the ModelConfig(path=..., quantize=...) of that file; a loaded model is quantized with "
            "load_prequantized=False"
        )
    if not chosen:
        raise ConfigError(
            f"QuantizeConfig({config.method}): no nn.Linear of {type(model).__name__} matches "
            + "; ".join(
                f"target_modules={c.target_modules} / exclude_modules={c.exclude_modules}" for c in config.configs
            )
        )
    for name, part in chosen.items():
        linear = model.get_submodule(name)
        home = linear.weight.device
        if compute_device is not None:
            linear = linear.to(torch.device(compute_device))
        try:
            quantized = part.quantize_linear(linear)
        except ConfigError as exc:
            raise ConfigError(f"{type(model).__name__} layer {name}: {exc}") from None
        _replace(model, name, quantized.to(home))
    logger.info(
        "%s: %d Linear layers quantized (%s, %s)", type(model).__name__, len(chosen), config.method, config.mode
    )
    model._diffsynth_quantize = config  # noqa: SLF001 - read by `quantize_config`
    return model


def _check_bnb_options(options: dict[str, Any]) -> None:
    unknown = sorted(set(options) - set(BACKEND_OPTIONS))
    if unknown:
        raise ConfigError(
            f"QuantizeConfig backend_config_kwargs {unknown} are not bitsandbytes options; it takes "
            f"{list(BACKEND_OPTIONS)}"
        )
    blocksize = options.get("blocksize")
    if blocksize is not None and (isinstance(blocksize, bool) or blocksize not in (32, 64, 128, 256, 512, 1024)):
        raise ConfigError(f"QuantizeConfig blocksize={blocksize!r}: bitsandbytes takes 32, 64, ..., 1024")
    compress = options.get("compress_statistics", True)
    if not isinstance(compress, bool):
        raise ConfigError(f"QuantizeConfig compress_statistics={compress!r} must be True or False")
    storage = options.get("quant_storage", torch.uint8)
    if storage not in BNB_STORAGE:
        raise ConfigError(f"QuantizeConfig quant_storage={storage!r} must be a torch dtype of {list(BNB_STORAGE)}")


def _check_torchao_options(method: str, options: dict[str, Any]) -> None:
    """Names torchao's config class does not have are refused (when torchao is installed: without it the
    quantization itself says how to install it)."""
    if not options:
        return
    try:
        config_class = _torchao_config_class(method)
    except ConfigError:
        return
    fields = [f.name for f in dataclasses.fields(config_class)]
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise ConfigError(
            f"QuantizeConfig backend_config_kwargs {unknown} are not fields of torchao's {config_class.__name__}; "
            f"it takes {fields}"
        )
    for f in dataclasses.fields(config_class):
        if f.name in options and not _fits(options[f.name], f.type):
            raise ConfigError(
                f"QuantizeConfig backend_config_kwargs {f.name}={options[f.name]!r} is not a {f.type} (the type of "
                f"torchao's {config_class.__name__}.{f.name})"
            )
    if options.get("version", 2) != 2:
        raise ConfigError(
            f"QuantizeConfig backend_config_kwargs version={options['version']!r}: only torchao's version 2 tensors "
            "(Int8Tensor / Float8Tensor) are supported"
        )
    _torchao_config(method, options)  # torchao's own checks of the values, now rather than at load


def _fits(value: Any, annotation: Any) -> bool:
    """Whether `value` has the type a torchao config field declares, for the plain types (bool, int, float, str,
    torch.dtype, classes) and their Optional / Union; other annotations are left to torchao."""
    if annotation is Any or isinstance(annotation, str):
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is int or annotation is float:
        return isinstance(value, (int, float) if annotation is float else int) and not isinstance(value, bool)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def _torchao_config(method: str, options: dict[str, Any]):
    config_class = _torchao_config_class(method)
    try:
        return config_class(**options)
    except (AssertionError, ValueError, TypeError) as exc:
        raise ConfigError(f"QuantizeConfig({method}) backend_config_kwargs {options}: torchao says: {exc}") from None


def _bitsandbytes():
    try:
        import bitsandbytes
    except ImportError:
        raise ConfigError(f"quantization with bitsandbytes needs the bitsandbytes package: {INSTALL_HINT}") from None
    return bitsandbytes


def _torchao_config_class(method: str):
    try:
        from torchao import quantization
    except ImportError:
        raise ConfigError(f"{method} needs the torchao package: {TORCHAO_HINT}") from None
    return getattr(quantization, TORCHAO_CONFIGS[method])


def _torchao_kind(weight) -> str | None:
    """The torchao tensor subclass' name of a weight (None for any other tensor), without importing torchao."""
    kind = type(weight)
    if kind.__module__.startswith("torchao.") and hasattr(weight, "dequantize"):
        return kind.__name__
    return None


def _check_float(weight: torch.Tensor, library: str) -> None:
    if weight.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ConfigError(
            f"{library} quantizes float16/bfloat16/float32 weights; a {weight.dtype} Linear "
            f"({tuple(weight.shape)}) cannot be quantized: load the model in one of those dtypes"
        )


def _torchao_linear(method: str, linear: nn.Linear, options: dict) -> nn.Linear:
    """A new nn.Linear whose weight is torchao's quantized tensor of `linear`'s weight."""
    config = _torchao_config(method, options)
    from torchao.quantization import quantize_

    weight = linear.weight.detach()
    _check_float(weight, "torchao")
    layer = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
    layer.weight = nn.Parameter(weight, requires_grad=False)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
    try:
        quantize_(layer, config)
    except (AssertionError, ValueError, RuntimeError) as exc:
        raise ConfigError(
            f"{method} cannot quantize a Linear({linear.in_features}, {linear.out_features}) with "
            f"backend_config_kwargs {options}: torchao says: {exc}"
        ) from None
    return layer.requires_grad_(False)


def _bnb_linear(bnb, linear: nn.Linear, quant_type: str, options: dict) -> nn.Module:
    """A `Linear4bit` holding `linear`'s weight, not yet rounded: bitsandbytes rounds it when it is moved to a
    device (`.to`)."""
    weight = linear.weight.detach()
    _check_float(weight, "bitsandbytes")
    layer = bnb_shell(
        bnb, linear.in_features, linear.out_features, linear.bias is not None, weight.dtype, quant_type, options
    )
    compress = options.get("compress_statistics", True)
    layer.weight = bnb.nn.Params4bit(
        weight,
        requires_grad=False,
        blocksize=options.get("blocksize") or 64,
        compress_statistics=compress,
        quant_type=quant_type,
        quant_storage=options.get("quant_storage", torch.uint8),
        module=layer,
    )
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
    return layer


def bnb_shell(bnb, in_features, out_features, bias, compute_dtype, quant_type, options) -> nn.Module:
    """An empty `Linear4bit` (on meta) to put packed weights in."""
    layer = bnb.nn.Linear4bit(
        in_features,
        out_features,
        bias=bias,
        compute_dtype=compute_dtype,
        compress_statistics=options.get("compress_statistics", True),
        quant_type=quant_type,
        quant_storage=options.get("quant_storage", torch.uint8),
        device="meta",
    )
    # bitsandbytes repacks the weight in place on the first CPU forward in eval mode (AVX512-BF16 machines), which
    # fails for layers narrower than a block and makes eval and train forwards differ: one path everywhere
    layer.support_avx512bf16_for_cpu = False
    return layer.requires_grad_(False)


TORCH_DTYPE_TAG = "torch.dtype"
GRANULARITY_TAG = "torchao.granularity"


def _encode_option(value: Any, key: str) -> Any:
    """One backend option as JSON: torch dtypes and torchao granularities (dataclasses) as tagged records."""
    if isinstance(value, torch.dtype):
        return {TORCH_DTYPE_TAG: str(value).removeprefix("torch.")}
    if type(value).__module__ == "torchao.quantization.granularity" and dataclasses.is_dataclass(value):
        fields = {f.name: _encode_option(getattr(value, f.name), key) for f in dataclasses.fields(value)}
        return {GRANULARITY_TAG: type(value).__name__, "fields": fields}
    if isinstance(value, (list, tuple)):
        return [_encode_option(v, key) for v in value]
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"QuantizeConfig {key}={value!r} cannot be recorded in a checkpoint header (JSON values, torch dtypes and "
            "torchao granularities can)"
        ) from None
    return value


def _decode_option(value: Any, key: str, source: str) -> Any:
    """The option `_encode_option` recorded (also the repr strings older files hold: "torch.uint8",
    "PerGroup(group_size=16)")."""

    def fail(what: str) -> ConfigError:
        return ConfigError(f"{source}: {key} {what}")

    if isinstance(value, str) and (legacy := _legacy_option(value)) is not None:
        value = legacy
    if isinstance(value, list):
        return [_decode_option(v, key, source) for v in value]
    if not isinstance(value, dict):
        return value
    if set(value) == {TORCH_DTYPE_TAG}:
        dtype = getattr(torch, str(value[TORCH_DTYPE_TAG]), None)
        if not isinstance(dtype, torch.dtype):
            raise fail(f"names no torch dtype: {value[TORCH_DTYPE_TAG]!r}")
        return dtype
    if set(value) == {GRANULARITY_TAG, "fields"} and isinstance(value["fields"], dict):
        try:
            from torchao.quantization import granularity
        except ImportError:
            raise fail(f"is a torchao granularity; it needs the torchao package: {TORCHAO_HINT}") from None
        kind = getattr(granularity, str(value[GRANULARITY_TAG]), None)
        if not (
            isinstance(kind, type) and issubclass(kind, granularity.Granularity) and dataclasses.is_dataclass(kind)
        ):
            raise fail(f"names no torchao granularity: {value[GRANULARITY_TAG]!r}")
        fields = {k: _decode_option(v, key, source) for k, v in value["fields"].items()}
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}  # PerBlock's block_size
        try:
            return kind(**fields)
        except (TypeError, ValueError, AssertionError) as exc:
            raise fail(f"is no valid {kind.__name__}: {exc}") from None
    raise fail(f"is a record this version cannot read: {value!r}")


def _legacy_option(text: str) -> dict | None:
    """The tagged record of a repr string an older file holds ("torch.uint8", "PerRow(dim=-1)"); None for a string
    of another kind (kept as a string)."""
    if re.fullmatch(r"torch\.\w+", text):
        return {TORCH_DTYPE_TAG: text.removeprefix("torch.")}
    if not re.fullmatch(r"Per[A-Za-z]+\(.*\)", text):
        return None
    try:
        call = ast.parse(text, mode="eval").body
        fields = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    except (SyntaxError, ValueError, AttributeError):
        return None
    if call.args or None in fields:
        return None
    return {GRANULARITY_TAG: call.func.id, "fields": fields}


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


__all__ = [
    "METHODS",
    "MixedQuantizeConfig",
    "QuantizeConfig",
    "check_vram_keys",
    "dequantized_linear",
    "is_quantized_linear",
    "layer_method",
    "linear_weight",
    "quantize_config",
    "save_quantized_model",
]
