"""Load models from checkpoints by recognising them: spec match -> config -> meta build -> strict assign load.

Recognition uses shapes only (`LazyStateDict.meta_state_dict`), so every error about the wrong
file, missing keys or mismatched shapes is raised before a byte of weights is read. A file may
hold several models (LTX-2 holds DiT, VAEs and vocoder): each recognised spec takes the keys its
layout owns, and every key of the file must belong to one of them.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import LazyStateDict, checkpoint_label, open_checkpoint
from .dtypes import DISK, parse_device, parse_dtype
from .errors import CheckpointError, ConfigError, DiffSynthError, UnknownModelError, preview
from .registry import KeyLayout, ModelSpec

logger = logging.getLogger(__name__)

Source = str | os.PathLike | Sequence[str | os.PathLike] | Mapping[str, torch.Tensor]


@dataclass
class LoadedModel:
    """One module loaded from a checkpoint, with what pipelines need to put it in a slot."""

    spec: str
    role: str
    module: torch.nn.Module
    config: Any
    layout: str
    files: list[str]


@dataclass(frozen=True)
class Recognition:
    """A spec recognised in a checkpoint: the layout that matched and the file keys it owns."""

    spec: ModelSpec
    layout: KeyLayout
    keys: tuple[str, ...]


# ----------------------------------------------------------------------------------- recognition
def recognise(keys: Iterable[str], specs: Iterable[ModelSpec] | None = None, label: str = "checkpoint"):
    """The specs whose layouts match `keys`, each owning a disjoint share; together they own every key.

    Larger shares win (a spec that owns the whole file beats a narrower one); ties go to the longer
    signature, then to the order of `specs`. Raises `UnknownModelError` naming the closest specs.
    """
    keys = list(keys)
    key_set = set(keys)
    specs = _check_specs(specs)
    candidates = []
    for order, spec in enumerate(specs):
        layout = spec.match(key_set)
        if layout is None:
            continue
        owned = tuple(k for k in keys if layout.owns(k))
        if owned:
            candidates.append((-len(owned), -len(layout.signature), order, Recognition(spec, layout, owned)))
    if not candidates:
        raise UnknownModelError(_unknown_message(key_set, specs, label))
    picked: list[tuple[int, Recognition]] = []
    taken: set[str] = set()
    for _, _, order, rec in sorted(candidates, key=lambda c: c[:3]):
        if taken.isdisjoint(rec.keys):
            picked.append((order, rec))
            taken.update(rec.keys)
    chosen = [rec for _, rec in sorted(picked, key=lambda p: p[0])]
    roles = [r.spec.role for r in chosen]
    if len(set(roles)) < len(roles):
        raise UnknownModelError(
            f"{label}: several models of the same role were recognised "
            f"({[(r.spec.name, r.spec.role, r.layout.name) for r in chosen]}); pass specs=[...] to choose"
        )
    left = [k for k in keys if k not in taken]
    if left:
        raise UnknownModelError(
            f"{label}: recognised {[f'{r.spec.name} ({r.layout.name})' for r in chosen]}, but {len(left)} keys "
            f"belong to no known model: {preview(left)}. Partial loads are not done silently: extract the "
            "model's keys into their own file, or install the family that owns the rest"
        )
    return chosen


def _check_specs(specs) -> list[ModelSpec]:
    if specs is None:
        from .registry import all_specs

        specs = all_specs()
    specs = list(specs) if isinstance(specs, Iterable) else [specs]
    bad = [s for s in specs if not isinstance(s, ModelSpec)]
    if bad:
        raise ConfigError(f"specs must be ModelSpec objects, got {preview(type(s).__name__ for s in bad)}")
    return specs


def _unknown_message(keys: set[str], specs: list[ModelSpec], label: str) -> str:
    if _all_lora_keys(keys):  # a LoRA given where a model is expected: the closest specs would all be at 0%
        return (
            f"{label} is a LoRA file ({len(keys)} LoRA keys, e.g. {preview(sorted(keys), 3)}), not a model: "
            "load it with pipe.load_lora(path) (--lora on the command line), after loading the model it adapts"
        )
    head = f"{label} is not a model this installation recognises ({len(keys)} keys, e.g. {preview(sorted(keys), 5)})"
    if not specs:
        return head + "; no model specs are installed (pip install diffsynth-z-image, diffsynth-wan, ...)"
    ranked = sorted(specs, key=lambda s: -s.closeness(keys))[:3]
    lines = []
    for spec in ranked:
        layout = max(spec.layouts, key=lambda lay: lay.signature_hits(keys) / max(len(lay.signature), 1))
        missing = [layout.prefix + k for k in layout.signature if layout.prefix + k not in keys]
        extra = sorted(k for k in keys if not layout.owns(k))
        lines.append(
            f"  {spec.name!r} ({spec.role}, layout {layout.name!r}, {spec.closeness(keys):.0%} of its signature): "
            f"missing {preview(missing, 5)}; keys it would not take: {preview(extra, 5)}"
        )
    return head + ". Closest specs:\n" + "\n".join(lines)


def _all_lora_keys(keys: set[str]) -> bool:
    """Whether every key names a LoRA (or LyCORIS / DoRA) tensor, some of them for a target layer: the test
    `diffsynth inspect` applies to the key names before it reads a file as a LoRA."""
    from .lora import _parse_key

    parsed = [_parse_key(key) for key in keys]
    return bool(parsed) and None not in parsed and any(p[0] is not None and p[1] != "alpha" for p in parsed)


# ----------------------------------------------------------------------------------- config
def config_json_beside(files: Sequence[str]) -> dict | None:
    """The parsed `config.json` in the folder holding `files` (None without one, or with several folders)."""
    folders = {Path(f).parent for f in files}
    if len(folders) != 1:
        return None
    path = folders.pop() / "config.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); fix or delete it") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object; fix or delete it")
    logger.debug("using %s", path)
    return data


def derive_config(rec: Recognition, meta: Mapping[str, torch.Tensor], config_json: dict | None, label: str):
    """The spec's config from our-named meta tensors (and a config.json-style dict)."""
    ours = _convert(rec, {k: meta[k] for k in rec.keys}, label)
    return _config_from_state(rec, ours, config_json, label)


def _convert(rec: Recognition, state: dict[str, torch.Tensor], label: str) -> dict[str, torch.Tensor]:
    try:
        return rec.layout.to_ours(state)
    except KeyError as exc:
        raise CheckpointError(
            f"{label}: the {rec.spec.name!r} layout {rec.layout.name!r} cannot map key {exc.args[0]!r}"
        ) from None


def _config_from_state(rec: Recognition, ours: Mapping[str, torch.Tensor], config_json: dict | None, label: str):
    try:
        return rec.spec.config_from_state(ours, config_json)
    except DiffSynthError as exc:
        raise type(exc)(f"{label}: {exc}") from None
    except (KeyError, ValueError, TypeError, IndexError) as exc:
        raise CheckpointError(
            f"{label}: cannot derive the {rec.spec.name!r} config from the checkpoint ({type(exc).__name__}: {exc})"
        ) from exc


# ----------------------------------------------------------------------------------- loading
def load_model(
    source: Source,
    torch_dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = "cpu",
    *,
    specs: Iterable[ModelSpec] | None = None,
    config: Any = None,
):
    """The module in `source`, or a dict role -> module when the file holds several models.

    `source` is a file, a list of shards, a folder or a state dict (meta tensors give a module on
    meta). The config comes from `config` when given (a config object is used as is; a dict is read
    like the `config.json` beside the file, which it replaces; per role for multi-model files), else
    from that `config.json` plus the shapes. Floating tensors are cast to `torch_dtype` (None keeps
    the file's); "disk" loads on cpu, where uncast safetensors weights stay views of the file.
    """
    loaded = load_models(source, torch_dtype, device, specs=specs, config=config)
    if len(loaded) == 1:
        return loaded[0].module
    return {item.role: item.module for item in loaded}


def load_on_meta(meta: Mapping[str, torch.Tensor], found: Sequence, torch_dtype, config: dict | None, label: str):
    """The models `found` (`recognise`) in `meta`, a state dict of meta tensors read from file headers, built on the
    meta device from their shapes (`config`, a `config.json`'s, for a single model): key and shape errors come before
    any tensor is read, naming `label` (the files) rather than "the given state dict". GGUF and prequantized files
    load this way."""
    try:
        return load_models(
            meta, torch_dtype=torch_dtype, device="cpu", config=config if len(found) == 1 else None,
            roles=[rec.spec.role for rec in found],
        )  # fmt: skip
    except DiffSynthError as exc:
        raise type(exc)(str(exc).replace("the given state dict", label)) from None


def load_models(
    source: Source,
    torch_dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = "cpu",
    *,
    specs: Iterable[ModelSpec] | None = None,
    config: Any = None,
    roles: Iterable[str] | None = None,
) -> list[LoadedModel]:
    """Every model in `source` as `LoadedModel`s (see `load_model`), in the order of `specs`. With `roles`,
    only the models of those roles are built and their tensors read (the file is still recognised whole):
    one part of a many-model file, such as LTX-2's VAEs without its 19B DiT, costs only its own memory."""
    dtype = None if torch_dtype is None else parse_dtype(torch_dtype)
    target = parse_device(device)
    state, files, label = _open(source)
    meta_source = _is_meta(state, label)
    meta = state.meta_state_dict() if isinstance(state, LazyStateDict) else _meta_of(state)
    found = recognise(meta, specs=specs, label=label)
    if roles is not None:
        wanted = set(roles)
        found = [rec for rec in found if rec.spec.role in wanted]
    configs = _split_config(config, found, label)
    config_json = config_json_beside(files) if files else None
    if config_json is not None and len(found) > 1:
        logger.info("%s holds several models; the config.json beside it is not used", label)
        config_json = None
    result = []
    for rec in found:
        given = configs.get(rec.spec.role)
        ours_meta = _convert(rec, {k: meta[k] for k in rec.keys}, label)
        if given is not None and not isinstance(given, Mapping):
            cfg = given
        else:
            cfg = _config_from_state(rec, ours_meta, dict(given) if given is not None else config_json, label)
        module = _build(rec, cfg, label)
        _check_keys(module, ours_meta, rec, label)
        stored = {k: state[k] for k in rec.keys} if not meta_source else {}
        real = ours_meta if meta_source else _convert(rec, stored, label)
        unchanged = _unchanged_sources(state, stored, real)
        place = torch.device("cpu") if target == DISK else target
        real = {k: _prepare(v, dtype, None if meta_source else place) for k, v in real.items()}
        module.load_state_dict(real, strict=True, assign=True)
        if not meta_source:
            _materialize_buffers(module, rec, label)
            module.to(place)
        if isinstance(state, LazyStateDict):
            _mark_sources(module, unchanged)
        logger.info("loaded %s (%s, layout %s) from %s", rec.spec.name, rec.spec.role, rec.layout.name, label)
        result.append(LoadedModel(rec.spec.name, rec.spec.role, module.eval(), cfg, rec.layout.name, list(files)))
    return result


def _open(source) -> tuple[Mapping[str, torch.Tensor], list[str], str]:
    if isinstance(source, LazyStateDict):
        return source, list(source.files), checkpoint_label(source.files)
    if isinstance(source, Mapping):
        bad = [k for k, v in source.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
        if bad:
            raise ConfigError(f"a state dict source must map str keys to tensors; bad entries: {preview(bad)}")
        if not source:
            raise ConfigError("the state dict source is empty")
        return source, [], "the given state dict"
    if isinstance(source, (str, os.PathLike, list, tuple)):
        state = open_checkpoint(source)
        return state, list(state.files), checkpoint_label(state.files)
    raise ConfigError(
        f"source must be a path, a list of shard paths, a folder or a state dict, got {type(source).__name__}"
    )


def _is_meta(state: Mapping[str, torch.Tensor], label: str) -> bool:
    if isinstance(state, LazyStateDict):
        return False
    on_meta = [k for k, v in state.items() if v.device.type == "meta"]
    if on_meta and len(on_meta) < len(state):
        raise ConfigError(
            f"{label} mixes meta and real tensors (meta: {preview(on_meta)}); pass all real or all meta tensors"
        )
    return bool(on_meta)


def _meta_of(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in state.items()}


def _split_config(config, found: list[Recognition], label: str) -> dict[str, Any]:
    if config is None:
        return {}
    if len(found) == 1:
        return {found[0].spec.role: config}
    roles = [r.spec.role for r in found]
    if isinstance(config, Mapping) and config and set(config) <= set(roles):
        return dict(config)
    raise ConfigError(
        f"{label} holds several models (roles {roles}); pass config as a dict role -> config, e.g. "
        f"{{{roles[0]!r}: ...}}"
    )


def _build(rec: Recognition, cfg, label: str) -> torch.nn.Module:
    try:
        with torch.device("meta"):
            module = rec.spec.build(cfg)
    except DiffSynthError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{label}: cannot build {rec.spec.name!r} with config {cfg!r}: {exc}") from exc
    if not isinstance(module, torch.nn.Module):
        raise ConfigError(f"spec {rec.spec.name!r}: build() returned {type(module).__name__}, not a torch.nn.Module")
    return module


def _check_keys(module: torch.nn.Module, ours: Mapping[str, torch.Tensor], rec: Recognition, label: str) -> None:
    expected = module.state_dict()
    missing = [k for k in expected if k not in ours]
    unexpected = [k for k in ours if k not in expected]
    where = f"{label}: the {rec.spec.name!r} model ({rec.spec.role}, layout {rec.layout.name!r})"
    if missing or unexpected:
        raise CheckpointError(
            f"{where} does not fit the checkpoint: missing keys {preview(missing)}; "
            f"unexpected keys {preview(unexpected)}"
        )
    wrong = [
        f"{k!r}: checkpoint {tuple(ours[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if tuple(ours[k].shape) != tuple(v.shape)
    ]
    if wrong:
        more = f" (and {len(wrong) - 8} more)" if len(wrong) > 8 else ""
        raise CheckpointError(f"{where} has shape mismatches: {'; '.join(wrong[:8])}{more}")


def _unchanged_sources(state, stored: Mapping[str, torch.Tensor], ours: Mapping[str, torch.Tensor]):
    """our name -> (safetensors file, key) for the tensors the format conversion passed through unchanged: the
    stored tensor itself, renamed, or a view of all its bytes in another shape (a conv weight as a linear one).
    Split, concatenated, transposed or cast tensors are new memory, so they are not listed."""
    if not isinstance(state, LazyStateDict):
        return {}

    def whole(t: torch.Tensor):
        return (t.data_ptr(), t.dtype, t.numel()) if t.numel() and t.is_contiguous() else None

    by_bytes = {whole(t): key for key, t in stored.items() if whole(t) is not None}
    found = {}
    for name, tensor in ours.items():
        key = by_bytes.get(whole(tensor)) if whole(tensor) is not None else None
        if key is not None and state.file_of(key).endswith(".safetensors"):
            found[name] = (state.file_of(key), key)
    return found


def _mark_sources(module: torch.nn.Module, unchanged: Mapping[str, tuple[str, str]]) -> None:
    """Note on each parameter the file key it holds unchanged, or that it was computed (for offload to disk)."""
    from .vram.disk import mark_stored

    for name, param in module.named_parameters():
        mark_stored(param, unchanged.get(name))


def _prepare(tensor: torch.Tensor, dtype: torch.dtype | None, device: torch.device | None) -> torch.Tensor:
    cast = dtype if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype else None
    if cast is None and (device is None or tensor.device == device):
        return tensor
    return tensor.to(device=device, dtype=cast)


def _materialize_buffers(module: torch.nn.Module, rec: Recognition, label: str) -> None:
    """Buffers no checkpoint carries (e.g. non-persistent rotary tables) are rebuilt by the module."""
    if not any(b.device.type == "meta" for b in module.buffers()):
        return
    for sub in module.modules():
        method = getattr(sub, "materialize_buffers", None)
        if callable(method):
            method()
    left = [name for name, b in module.named_buffers() if b.device.type == "meta"]
    if left:
        raise DiffSynthError(
            f"{label}: the {rec.spec.name!r} model left buffers on the meta device after loading: {preview(left)}. "
            "They are not in the checkpoint; the model class must define materialize_buffers() to rebuild them"
        )
