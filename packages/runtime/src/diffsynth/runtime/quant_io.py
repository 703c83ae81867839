"""Quantized checkpoints: `save_quantized_model` writes a model's quantized state dict, and `load_prequantized`
builds the model back from it with its quantized layers made directly from the packed tensors (no full-precision
copy: the float [out, in] weights never exist in memory).

The file is .safetensors in the libraries' own serialization: bitsandbytes' `Linear4bit.state_dict()` keys
(`weight` packed, `weight.absmax`, `weight.quant_map`, `weight.quant_state.bitsandbytes__nf4`, ...), the same keys
diffusers' bnb-4bit checkpoints hold; torchao's tensors flattened by torchao's safetensors support
(`<layer>._weight_qdata`, `<layer>._weight_scale`, with each tensor's type in the header). The `QuantizeConfig`
is recorded in the header (`diffsynth_quantize`), so a file of ours or a diffusers bnb-4bit file is recognised as
quantized without being told. Prequantized files must be in the model's own module names (a layout that only
renames keys is fine; one that reshapes or splits a quantized weight cannot be applied to packed data).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError, ConfigError, DiffSynthError, preview
from .quant import (
    AnyQuantizeConfig,
    MixedQuantizeConfig,
    QuantizeConfig,
    _bitsandbytes,
    _replace,
    bnb_shell,
    config_from_dict,
    dequantized_linear,
    layer_method,
    quantize_config,
)

logger = logging.getLogger(__name__)

HEADER_KEY = "diffsynth_quantize"
CONFIG_KEY = "diffsynth_config_json"
MODULE_CONFIG_KEY = "diffsynth_module_config"  # the module's config dataclass, when no config.json is known
BNB_STATE = ".quant_state.bitsandbytes__"
TORCHAO_TYPES = {"Int8Tensor": "torchao_int8_w8a16", "Float8Tensor": "torchao_fp8_w8a16"}


# ----------------------------------------------------------------------------------- saving
def save_quantized_model(model_or_model_config, path: str | os.PathLike, *, torch_dtype=None, device=None) -> str:
    """Write a quantized model (a module quantized by `QuantizeConfig.quantize_model`, or a `ModelConfig` with
    `quantize=`: its file is loaded and quantized on `device` first) to `path` (.safetensors), atomically: a
    temporary file beside it renamed into place. Returns the path written."""
    from .hub import ModelConfig

    config_json = None
    if isinstance(model_or_model_config, ModelConfig):
        model, config_json = _load_and_quantize(model_or_model_config, torch_dtype, device)
    elif isinstance(model_or_model_config, nn.Module):
        model = model_or_model_config
    else:
        raise ConfigError(
            f"save_quantized_model takes a quantized nn.Module or a ModelConfig(quantize=...), got "
            f"{type(model_or_model_config).__name__}"
        )
    config = quantize_config(model)
    if config is None:
        raise ConfigError(f"save_quantized_model: the {type(model).__name__} is not quantized (QuantizeConfig)")
    _refuse_gguf(model, config)
    if config.mode != "dynamic":
        raise ConfigError(
            f"save_quantized_model: the {type(model).__name__} was quantized with mode={config.mode!r}, whose layers "
            "are plain Linears again; quantize with mode='dynamic' to save the packed weights"
        )
    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        raise ConfigError(f"save_quantized_model writes .safetensors; got path {path!r}")
    state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    metadata = {HEADER_KEY: json.dumps({**config.to_dict(), "load_prequantized": True})}
    if config_json is not None:  # the source's config.json, for loading the file from anywhere
        metadata[CONFIG_KEY] = json.dumps(config_json)
    else:
        metadata.update(_module_config_header(model))
    if any(type(v).__module__.startswith("torchao.") for v in state.values()):
        try:
            from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict
        except ImportError as exc:  # pragma: no cover - torchao without its safetensors support
            raise ConfigError(f"save_quantized_model: this torchao cannot write safetensors ({exc})") from None
        state, torchao_metadata = flatten_tensor_state_dict(state)
        metadata.update(torchao_metadata)
    from safetensors.torch import save_file

    from .checkpoint import new_file_mode

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".quantized-", suffix=".safetensors", dir=folder)
    os.close(handle)
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, temporary, metadata=metadata)
        os.chmod(temporary, new_file_mode())  # mkstemp's 0600 is for the temporary only
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    logger.info("saved %s (%d tensors, %s)", path, len(state), config.method)
    return path


def _refuse_gguf(model: nn.Module, config) -> None:
    """GGUF blocks have no safetensors form a loader reads back: the .gguf file is already the packed model."""
    from .gguf import MODE_ENV, GGUFQuantization

    if isinstance(config, GGUFQuantization):
        raise ConfigError(
            f"save_quantized_model: the {type(model).__name__} is GGUF-packed ({', '.join(config.types)}); a "
            "GGUF-packed model cannot be saved as safetensors; keep the .gguf, or load it with "
            f"{MODE_ENV}=dequantize (load_gguf(mode='dequantize')) and quantize it with a QuantizeConfig"
        )


def _module_config_header(model: nn.Module) -> dict[str, str]:
    """The module's own config dataclass as a header entry: without a config.json, shapes alone may not give the
    model's config back (RoPE widths, eps), so the file records the config it was built with."""
    config = getattr(model, "config", None)
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        logger.warning("%s has no config dataclass: the saved file needs its config.json beside it to load "
                       "when shapes do not give the config", type(model).__name__)  # fmt: skip
        return {}
    try:
        return {MODULE_CONFIG_KEY: json.dumps(_encode_config(config))}
    except TypeError as exc:
        logger.warning("%s's config is not recorded (%s): the saved file needs its config.json beside it to load "
                       "when shapes do not give the config", type(model).__name__, exc)  # fmt: skip
        return {}


DATACLASS_TAG, TUPLE_TAG, DTYPE_TAG = "diffsynth.dataclass", "diffsynth.tuple", "diffsynth.dtype"


def _encode_config(value: Any) -> Any:
    """A config value as JSON, dataclasses (by class path), tuples and torch dtypes as tagged records."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        kind = type(value)
        fields = {f.name: _encode_config(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
        return {DATACLASS_TAG: f"{kind.__module__}:{kind.__qualname__}", "fields": fields}
    if isinstance(value, tuple):
        return {TUPLE_TAG: [_encode_config(v) for v in value]}
    if isinstance(value, list):
        return [_encode_config(v) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _encode_config(v) for k, v in value.items()}
    if isinstance(value, torch.dtype):
        return {DTYPE_TAG: str(value).removeprefix("torch.")}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"a {type(value).__name__} value has no JSON form")


def _decode_config(value: Any, label: str) -> Any:
    """`_encode_config`'s inverse; only diffsynth's own dataclasses are rebuilt (a header names no other code)."""
    if isinstance(value, list):
        return [_decode_config(v, label) for v in value]
    if not isinstance(value, dict):
        return value
    if TUPLE_TAG in value:
        return tuple(_decode_config(v, label) for v in value[TUPLE_TAG])
    if DTYPE_TAG in value:
        return getattr(torch, value[DTYPE_TAG])
    if DATACLASS_TAG not in value:
        return {k: _decode_config(v, label) for k, v in value.items()}
    module_name, _, qualname = str(value[DATACLASS_TAG]).partition(":")
    if not module_name.startswith("diffsynth."):
        raise CheckpointError(f"{label} (header {MODULE_CONFIG_KEY!r}) names {value[DATACLASS_TAG]!r}, not a "
                              "diffsynth config class")  # fmt: skip
    import importlib

    kind: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        kind = getattr(kind, part)
    if not dataclasses.is_dataclass(kind):
        raise CheckpointError(f"{label} (header {MODULE_CONFIG_KEY!r}): {value[DATACLASS_TAG]!r} is no dataclass")
    return kind(**{k: _decode_config(v, label) for k, v in value["fields"].items()})


def _load_and_quantize(model_config, torch_dtype, device) -> nn.Module:
    from .loading import config_json_beside, load_models
    from .pipeline import fetch_companion_config, weight_paths

    quantize = model_config.quantize
    if quantize is None or quantize.load_prequantized:
        raise ConfigError(
            "save_quantized_model needs ModelConfig(..., quantize=QuantizeConfig(method=...)) of a full-precision "
            f"file; got quantize={quantize!r}"
        )
    paths = weight_paths(model_config)
    fetch_companion_config(model_config)
    loaded = load_models(paths, torch_dtype=torch_dtype, device="cpu")
    if len(loaded) != 1:
        raise ConfigError(
            f"save_quantized_model: the file holds {len(loaded)} models ({[m.role for m in loaded]}); save one "
            "model per file (load it with roles and pass the module)"
        )
    module = quantize.quantize_model(loaded[0].module.eval().requires_grad_(False), compute_device=device)
    return module, config_json_beside(loaded[0].files)


# ----------------------------------------------------------------------------------- reading
@dataclass
class Packed:
    """One quantized weight of a file: its key, the method, the file keys holding it, its true shape."""

    key: str
    method: str
    parts: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: torch.dtype
    header: str | None = None  # torchao's type record


def file_quantization(paths: Sequence[str]) -> tuple[dict[str, Packed], dict[str, str], AnyQuantizeConfig | None]:
    """The packed weights of safetensors `paths` (by key), their merged header, and the config recorded in it.
    A weight's parts are gathered over all `paths`: a shard boundary may fall between them."""
    from .checkpoint import checkpoint_label, open_checkpoint

    packed: dict[str, Packed] = {}
    header: dict[str, str] = {}
    keys: list[str] = []
    records: list[tuple[str, str, Any]] = []  # (weight, quant-state key, its file)
    for path in paths:
        if not str(path).endswith(".safetensors"):
            continue
        handle = open_checkpoint(str(path))  # the checked header reader: a truncated file is named as such
        header.update(handle.metadata)
        file_keys = list(handle.keys())
        keys += file_keys
        records += [(key.split(BNB_STATE)[0], key, handle) for key in file_keys if BNB_STATE in key]
    for weight, key, handle in records:
        try:
            record = json.loads(bytes(handle[key].tolist()).decode())
            dtype = getattr(torch, record.get("dtype", "float32"))
            method, shape = f"bitsandbytes_{record['quant_type']}", tuple(record["shape"])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{handle.files[0]}: key {key!r} is no bitsandbytes quant state ({exc!r})") from None
        parts = tuple(k for k in keys if k == weight or k.startswith(weight + "."))
        packed[weight] = Packed(weight, method, parts, shape, dtype)
    for name in json.loads(header.get("tensor_names", "[]")):
        record = json.loads(header.get(name, "{}"))
        kind = record.get("_type", "Tensor")
        if kind == "Tensor":
            continue
        if kind not in TORCHAO_TYPES:
            raise CheckpointError(f"{name} is a torchao {kind}, which is not supported; tensors: {list(TORCHAO_TYPES)}")
        owner, _, attribute = name.rpartition(".")
        stem = f"{owner}._{attribute}_" if owner else f"_{attribute}_"
        parts = tuple(stem + part for part in record["_tensor_data_names"] if stem + part in keys)
        qdata = stem + "qdata"
        shape = _shape_of(paths, qdata)
        dtype = getattr(torch, record["_data"]["dtype"]["_data"])
        packed[name] = Packed(name, TORCHAO_TYPES[kind], parts, shape, dtype, header[name])
    if HEADER_KEY not in header:
        return packed, header, None
    label = f"{checkpoint_label([str(p) for p in paths])} (header {HEADER_KEY!r})"
    try:
        recorded = json.loads(header[HEADER_KEY])
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{label} is not JSON ({exc})") from None
    return packed, header, config_from_dict(recorded, label)


def _shape_of(paths, key: str) -> tuple[int, ...]:
    from .checkpoint import open_checkpoint

    for path in paths:
        shapes = open_checkpoint(str(path)).shapes()
        if key in shapes:
            return tuple(shapes[key])
    raise CheckpointError(f"{preview([str(p) for p in paths])}: torchao tensor {key!r} is missing")


def prequantized_config(paths: Sequence[str], quantize: AnyQuantizeConfig | None, label: str):
    """The config to load `paths` with when they hold quantized layers (None for a plain file): the user's, which
    must then say `load_prequantized=True`, or else the one recorded in the file (ours) or derived from its
    layers (a diffusers bnb-4bit file). A folder stands for the weight files in it."""
    from .checkpoint import weight_files

    try:
        paths = weight_files(list(paths))
    except DiffSynthError:  # missing files: the loader that follows says so
        return None
    if not any(str(p).endswith(".safetensors") for p in paths):
        if quantize is not None and quantize.load_prequantized:
            raise ConfigError(f"{label}: load_prequantized=True needs a .safetensors file saved quantized")
        return None
    packed, _, recorded = file_quantization(paths)
    if not packed:
        if quantize is not None and quantize.load_prequantized:
            raise ConfigError(
                f"{label} holds no quantized layers; QuantizeConfig(load_prequantized=True) is for files written by "
                "save_quantized_model (or diffusers bnb-4bit files): drop load_prequantized to quantize as it loads"
            )
        return None
    first = next(iter(packed.values()))
    if quantize is not None and not quantize.load_prequantized:
        raise ConfigError(
            f"{label} holds quantized layers (key {first.key!r}: {first.method}); load it with "
            f"QuantizeConfig(method=..., load_prequantized=True), or without quantize="
        )
    if quantize is not None:
        return quantize
    if recorded is not None:
        return recorded
    methods = sorted({p.method for p in packed.values()})
    if len(methods) != 1:
        raise ConfigError(f"{label} holds layers of several methods {methods} and no recorded config")
    logger.info("%s holds %d %s layers: loaded prequantized", label, len(packed), methods[0])
    return _FromFile(QuantizeConfig(method=methods[0], load_prequantized=True))


class _FromFile:
    """A config derived from the file's own layers (a diffusers checkpoint): its layer set is the file's."""

    def __init__(self, config: QuantizeConfig):
        self.config = config

    def __getattr__(self, name: str) -> Any:
        return getattr(self.config, name)


# ----------------------------------------------------------------------------------- loading
def load_prequantized(paths: Sequence[str], quantize, *, torch_dtype=None, roles=None, config_json=None):
    """The models of quantized safetensors `paths` as `loading.LoadedModel`s, each built on meta from the file's
    shapes (a packed weight stands for its true [out, in] shape), its quantized layers made from the packed tensors
    and the rest of its tensors assigned (cast to `torch_dtype`). The file's layers must be the ones `quantize`
    targets, by the same methods."""
    from .checkpoint import checkpoint_label, open_checkpoint
    from .dtypes import parse_dtype
    from .loading import config_json_beside, load_on_meta, recognise

    dtype = None if torch_dtype is None else parse_dtype(torch_dtype)
    state = open_checkpoint(list(paths))
    files = list(state.files)
    label = checkpoint_label(files)
    packed, header, _ = file_quantization(files)
    _check_compute_dtype(packed, dtype, label)
    hidden = {part for p in packed.values() for part in p.parts}
    meta = {k: v for k, v in state.meta_state_dict().items() if k not in hidden}
    for p in packed.values():
        meta[p.key] = torch.empty(p.shape, dtype=p.dtype, device="meta")
    found = recognise(meta, label=label)
    if roles is not None:
        found = [rec for rec in found if rec.spec.role in set(roles)]
    if config_json is None:
        config_json = config_json_beside(files)
    if config_json is None and CONFIG_KEY in header:
        config_json = json.loads(header[CONFIG_KEY])
    if config_json is not None:
        config_json = {k: v for k, v in config_json.items() if k != "quantization_config"}
    elif MODULE_CONFIG_KEY in header and len(found) == 1:
        config_json = _recorded_module_config(header[MODULE_CONFIG_KEY], label)  # a config object, used as is
    built = load_on_meta(meta, found, dtype, config_json, label)
    wanted = quantize.config if isinstance(quantize, _FromFile) else quantize
    for rec, item in zip(found, built, strict=True):
        source = {k: meta[k] for k in rec.keys}
        ours = rec.layout.to_ours(source)
        by_identity = {id(v): k for k, v in source.items()}
        renamed = {ours_key: by_identity[id(v)] for ours_key, v in ours.items() if id(v) in by_identity}
        mine = {ours_key[: -len(".weight")]: packed[file_key] for ours_key, file_key in renamed.items()
                if file_key in packed and ours_key.endswith(".weight")}  # fmt: skip
        left = [p.key for p in packed.values() if p.key in rec.keys and p not in mine.values()]
        if left:
            raise CheckpointError(
                f"{label}: layout {rec.layout.name!r} of the {rec.spec.name!r} model converts quantized key "
                f"{left[0]!r} as it loads, which packed weights cannot take; prequantized files must use the model's "
                "own module names (as save_quantized_model writes them)"
            )
        module = item.module
        chosen = None if isinstance(quantize, _FromFile) else wanted.layer_methods(module)
        _check_layers(module, mine, chosen, label, wanted)
        for name, p in mine.items():
            _replace(module, name, _packed_linear(state, header, module.get_submodule(name), p, dtype))
        rest = {k: state[k] for k in rec.keys if k not in hidden and k not in packed}
        rest.update({p.key: meta[p.key] for p in packed.values() if p.key in rec.keys})
        packed_keys = {name + ".weight" for name in mine}
        real = {k: v for k, v in rec.layout.to_ours(rest).items() if k not in packed_keys}
        real = {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v for k, v in real.items()}
        missing, unexpected = module.load_state_dict(real, strict=False, assign=True)
        if unexpected:
            raise CheckpointError(f"{label}: keys {preview(unexpected)} fit no tensor of the {rec.spec.name!r} model")
        _materialize(module)
        on_meta = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.device.type == "meta"]
        if on_meta:
            raise CheckpointError(f"{label}: the {rec.spec.name!r} model lacks tensors {preview(on_meta)}")
        if wanted.mode == "dequant_once":
            for name in mine:
                _replace(module, name, dequantized_linear(module.get_submodule(name)))
        module.requires_grad_(False)
        module._diffsynth_quantize = wanted  # noqa: SLF001 - read by `quant.quantize_config`
        logger.info("loaded %s prequantized (%d quantized layers) from %s", rec.spec.name, len(mine), label)
    return built


def _recorded_module_config(text: str, label: str):
    """The config dataclass `save_quantized_model` recorded from a module (a file saved without a config.json)."""
    try:
        return _decode_config(json.loads(text), label)
    except (ValueError, TypeError, AttributeError, ImportError, KeyError) as exc:
        raise CheckpointError(f"{label} (header {MODULE_CONFIG_KEY!r}) holds no readable config ({exc})") from None


def _check_layers(module: nn.Module, mine: dict[str, Packed], chosen, label: str, config) -> None:
    """The file's quantized layers against the ones the config targets: a clear error naming the key."""
    for name, p in mine.items():
        layer = module.get_submodule(name)
        if type(layer) is not nn.Linear:
            raise CheckpointError(f"{label}: key {p.key!r} is a quantized Linear weight, but {name} is a "
                                  f"{type(layer).__name__}")  # fmt: skip
        if chosen is None:
            continue
        if name not in chosen:
            raise ConfigError(
                f"{label}: key {p.key!r} is stored quantized ({p.method}), but the QuantizeConfig leaves {name} out "
                f"({_describe(config)}); give the target_modules / exclude_modules the file was saved with"
            )
        if chosen[name].method != p.method:
            raise ConfigError(
                f"{label}: key {p.key!r} is stored as {p.method}, but the QuantizeConfig asks {chosen[name].method} "
                "for it; give the method the file was saved with"
            )
    for name in chosen or {}:
        if name not in mine:
            raise ConfigError(
                f"{label}: key {name + '.weight'!r} is stored unquantized, but the QuantizeConfig targets it "
                f"({_describe(config)}); give the target_modules / exclude_modules the file was saved with"
            )


def _describe(config) -> str:
    parts = config.configs if isinstance(config, MixedQuantizeConfig) else [config]
    return "; ".join(
        f"{c.method}: target_modules={c.target_modules}, exclude_modules={c.exclude_modules}" for c in parts
    )


def _packed_linear(state, header, shell: nn.Linear, p: Packed, dtype) -> nn.Module:
    """The quantized layer of one packed weight, made from the file's tensors (no float weight)."""
    if tuple(p.shape) != (shell.out_features, shell.in_features):
        raise CheckpointError(f"key {p.key!r} holds a {p.shape} weight; the model's layer is "
                              f"{(shell.out_features, shell.in_features)}")  # fmt: skip
    if p.method.startswith("bitsandbytes_"):
        bnb = _bitsandbytes()
        data = state[p.key]
        stats = {k[len(p.key) + 1 :]: state[k] for k in p.parts if k != p.key}
        nested = any(k.startswith("nested_") for k in stats)
        options = {"compress_statistics": nested, "quant_storage": data.dtype}
        layer = bnb_shell(bnb, shell.in_features, shell.out_features, shell.bias is not None, dtype or p.dtype,
                          p.method.split("_")[1], options)  # fmt: skip
        layer.weight = bnb.nn.Params4bit.from_prequantized(data, stats, requires_grad=False, device="cpu", module=layer)
    else:
        from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

        record = {"tensor_names": json.dumps([p.key]), p.key: _torchao_header(p, dtype)}
        rebuilt, _ = unflatten_tensor_state_dict({k: state[k] for k in p.parts}, record)
        layer = nn.Linear(shell.in_features, shell.out_features, bias=shell.bias is not None, device="meta")
        layer.weight = nn.Parameter(rebuilt[p.key], requires_grad=False)
    if layer_method(layer) != p.method:  # pragma: no cover - a library that changed its format
        raise CheckpointError(f"key {p.key!r} did not rebuild as {p.method}")
    return layer


def _check_compute_dtype(packed: dict[str, Packed], dtype: torch.dtype | None, label: str) -> None:
    """torchao layers compute in a float dtype, as quantizing in memory requires: say so before building any."""
    torchao = [p for p in packed.values() if p.header is not None]
    if dtype is None or not torchao or dtype in (torch.float16, torch.bfloat16, torch.float32):
        return
    first = torchao[0]
    raise ConfigError(
        f"{label}: key {first.key!r} is a {first.method} weight saved in {first.dtype}; it cannot compute in "
        f"torch_dtype={dtype} (float16 / bfloat16 / float32 only)"
    )


def _torchao_header(p: Packed, dtype: torch.dtype | None) -> str:
    """torchao's type record of `p`, reporting `dtype` (the requested compute dtype) instead of the saved one: the
    packed data and scales do not depend on it (torchao keeps int8 / fp8 scales in float32 whatever the weight's
    dtype), so the layer equals one quantized in memory at `dtype` up to the saved weights' own rounding."""
    if dtype is None or dtype == p.dtype:
        return p.header
    record = json.loads(p.header)
    record["_data"]["dtype"] = {"_type": "torch.dtype", "_data": str(dtype).removeprefix("torch.")}
    return json.dumps(record)


def _materialize(module: nn.Module) -> None:
    """Buffers no checkpoint carries (rotary tables) are rebuilt by the module, as the plain loader does."""
    if any(b.device.type == "meta" for b in module.buffers()):
        for sub in module.modules():
            method = getattr(sub, "materialize_buffers", None)
            if callable(method):
                method()


__all__ = ["HEADER_KEY", "file_quantization", "load_prequantized", "prequantized_config", "save_quantized_model"]
