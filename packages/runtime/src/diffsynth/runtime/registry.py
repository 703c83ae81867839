"""What installed model families declare: specs that recognise checkpoints, presets, pipelines.

Each family package exposes one `Family` object through the entry-point group `diffsynth.models`
(for example `z_image = "diffsynth.z_image.formats:FAMILY"`). The runtime discovers them here, so
there is no global table and the CLI only knows the families that are installed.

Recognition works on shapes only (meta tensors), so a 20B checkpoint is identified without reading
its weights:

- a `KeyLayout` is one way a model's weights are stored on disk (diffusers names, original names,
  a ComfyUI repack...). It has a key prefix, `signature` keys that must all be present, and a
  `convert` function from that layout to our module's names (identity when `None`);
- a `ModelSpec` is one of our modules: its layouts, how to derive its config from converted shapes
  (and the `config.json` beside the file when there is one), and how to build it.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

StateDict = Mapping[str, torch.Tensor]
ENTRY_POINT_GROUP = "diffsynth.models"


@dataclass(frozen=True)
class KeyLayout:
    """One on-disk key layout of a model.

    `signature` keys are given without `prefix`. `owns(key)` decides which keys of a file belong to
    this layout (all keys under `prefix`, unless `owns_prefixes` narrows it, for files that hold
    several models). `convert` takes the prefix-stripped state dict (real or meta tensors) and
    returns it in our module's names; it must raise `KeyError` naming any key it cannot map.
    """

    name: str
    signature: tuple[str, ...]
    prefix: str = ""
    convert: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None
    owns_prefixes: tuple[str, ...] | None = None

    def owns(self, key: str) -> bool:
        if not key.startswith(self.prefix):
            return False
        if self.owns_prefixes is None:
            return True
        rest = key[len(self.prefix) :]
        return any(rest.startswith(p) for p in self.owns_prefixes)

    def signature_hits(self, keys: Iterable[str]) -> int:
        keys = set(keys)
        return sum(1 for k in self.signature if self.prefix + k in keys)

    def matches(self, keys: Iterable[str]) -> bool:
        return self.signature_hits(keys) == len(self.signature)

    def to_ours(self, state: StateDict) -> dict[str, torch.Tensor]:
        """Select this layout's keys, strip the prefix and convert to our names."""
        n = len(self.prefix)
        stripped = {k[n:]: v for k, v in state.items() if self.owns(k)}
        return dict(self.convert(stripped)) if self.convert is not None else stripped


@dataclass(frozen=True)
class ModelSpec:
    """One of our model classes and the files it can be loaded from.

    `config_from_state(state, config_json)` gets our-named meta tensors and the parsed
    `config.json` found beside the checkpoint (or None) and returns the model's config dataclass.
    `build(config)` returns the module (called under the meta device by the loader).
    """

    name: str
    role: str
    layouts: tuple[KeyLayout, ...]
    config_from_state: Callable[[StateDict, dict | None], Any]
    build: Callable[[Any], torch.nn.Module]
    description: str = ""

    def match(self, keys: Iterable[str]) -> KeyLayout | None:
        keys = set(keys)
        for layout in self.layouts:
            if layout.matches(keys):
                return layout
        return None

    def closeness(self, keys: Iterable[str]) -> float:
        """Best fraction of a layout signature present in `keys` (for 'closest spec' errors)."""
        keys = set(keys)
        return max((lay.signature_hits(keys) / max(len(lay.signature), 1) for lay in self.layouts), default=0.0)


@dataclass(frozen=True)
class PresetFile:
    """One model file (or shard set) of a preset, in DiffSynth-Studio's (model_id, pattern) terms."""

    model_id: str
    origin_file_pattern: str


@dataclass(frozen=True)
class PresetLoRA:
    """A LoRA a preset applies once its models are loaded (a distillation LoRA, a camera-motion or IC-LoRA on
    its base model): the file in DiffSynth-Studio's (model_id, pattern) terms and `load_lora`'s arguments.
    `fuse=False` keeps it apart from the weights (an IC-LoRA the second stage runs without)."""

    model_id: str
    origin_file_pattern: str
    scale: float = 1.0
    fuse: bool = True
    slot: str = "dit"


@dataclass(frozen=True)
class Preset:
    """A known model: the hub files to fetch (or a local `folder` shipped with its package, such as the
    bundled demo model, laid out like a hub repo), the LoRAs applied on top, and the authors' default
    generation settings."""

    name: str
    files: tuple[PresetFile, ...] = ()
    tokenizer: PresetFile | None = None
    defaults: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    folder: str | None = None
    pipeline: str | None = None  # "module:Class" when the preset needs another class than its family's pipeline
    loras: tuple[PresetLoRA, ...] = ()
    training: str | None = None  # "module:Class" of its training task when not its family's (with `pipeline`)

    def pipeline_class(self):
        """The preset's own pipeline class (None: its family's)."""
        return None if self.pipeline is None else _import(self.pipeline)


@dataclass(frozen=True)
class Family:
    """Everything a model package contributes to the runtime."""

    name: str
    specs: tuple[ModelSpec, ...] = ()
    presets: Mapping[str, Preset] = field(default_factory=dict)
    pipeline: str | None = None  # "module:Class", imported only when used
    training: str | None = None  # "module:Class" of the family's training task, imported only when used
    description: str = ""
    # "module:function" renaming the family's LoRA files (`diffsynth lora convert`): f(lora, to) -> LoRAWeights in
    # the naming `to` ("official" or "diffusers"), imported only when used
    lora_converter: str | None = None

    def pipeline_class(self):
        if self.pipeline is None:
            raise LookupError(f"family {self.name!r} has no pipeline")
        return _import(self.pipeline)

    def training_class(self):
        if self.training is None:
            raise LookupError(f"family {self.name!r} has no training task")
        return _import(self.training)

    def lora_converter_function(self):
        if self.lora_converter is None:
            raise LookupError(f"family {self.name!r} has no LoRA naming converter")
        return _import(self.lora_converter)


def _import(target: str):
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


@cache
def installed_families() -> dict[str, Family]:
    """All families registered under the `diffsynth.models` entry-point group.

    An entry point names one `Family` or a tuple of them (a package holding two generations of a
    model, such as FLUX.1 and FLUX.2, registers both through its one entry point).
    """
    from importlib.metadata import entry_points

    families: dict[str, Family] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = ep.load()
        except Exception as exc:  # a broken family must not hide the others
            logger.warning("could not load model family %r (%s): %s", ep.name, ep.value, exc)
            continue
        for family in loaded if isinstance(loaded, (tuple, list)) else (loaded,):
            if not isinstance(family, Family):
                logger.warning("entry point %r (%s) gave %r, not a Family", ep.name, ep.value, type(family).__name__)
                continue
            families[family.name] = family
    return families


def all_specs() -> list[ModelSpec]:
    """Every installed family's specs, each once (a shared spec, such as the runtime's Qwen2.5-VL, may be listed
    by several families)."""
    specs: dict[int, ModelSpec] = {}
    for fam in installed_families().values():
        for spec in fam.specs:
            specs.setdefault(id(spec), spec)
    return list(specs.values())


def find_preset(name: str) -> tuple[Family, Preset]:
    """The family and preset for a hub repo name such as `Tongyi-MAI/Z-Image-Turbo`."""
    from .errors import ConfigError

    known: list[str] = []
    for fam in installed_families().values():
        for key, preset in fam.presets.items():
            if key.lower() == name.lower():
                return fam, preset
            known.append(key)
    import difflib

    def plain(text: str) -> str:  # "Tongyi-MAI/Z-Image-Turbo" -> "zimageturbo": what people misspell
        return "".join(ch for ch in text.lower().rsplit("/", 1)[-1] if ch.isalnum())

    by_plain: dict[str, list[str]] = {}
    for key in sorted(known):
        by_plain.setdefault(plain(key), []).append(key)
    close = [
        key for k in difflib.get_close_matches(plain(name), list(by_plain), n=3, cutoff=0.6) for key in by_plain[k]
    ]
    hint = f" (did you mean {' or '.join(repr(c) for c in close[:3])}?)" if close else ""
    raise ConfigError(
        f"unknown model preset {name!r}{hint}; `diffsynth list-models` lists the {len(known)} installed presets "
        "(a local folder of the model's files is taken too)"
    )


def family_for_folder(folder: str | os.PathLike, *, kind: str = "pipeline") -> Family:
    """The first installed family with a `kind` ("pipeline" or "training") one of whose model specs recognises a
    weight file in the local model folder (or one of its subfolders), so a folder needs no family name. Families are
    asked in registration order; a folder of only a text encoder two families share goes to the first."""
    from .checkpoint import open_checkpoint
    from .errors import ConfigError
    from .pipeline import WEIGHT_SUFFIXES

    folder = Path(folder)
    weight_dirs = [
        d
        for d in [folder, *sorted(p for p in folder.iterdir() if p.is_dir())]
        if any(f.name.endswith(WEIGHT_SUFFIXES) for f in d.iterdir() if f.is_file())
    ]
    for family in installed_families().values():
        if getattr(family, kind) is None:
            continue
        for spec in family.specs:
            for d in weight_dirs:
                if spec.match(open_checkpoint(str(d)).shapes().keys()) is not None:
                    return family
    raise ConfigError(
        f"no installed family recognises the weights in {folder} (folders with weights: "
        f"{[d.name for d in weight_dirs]}); see `diffsynth list-models`"
    )


def merge_fields(label: str, given: Mapping[str, Any], derived: Mapping[str, Any]) -> dict[str, Any]:
    """Config fields from a `config.json` (`given`) over those the shapes fix (`derived`).

    The shapes are the truth: a json value that contradicts them is an error naming the field; the
    json adds what shapes cannot tell (RoPE, eps, ...). Empty `derived` means the json alone.
    """
    from .errors import ConfigError

    if (wrong := _contradiction(given, derived)) is not None:
        name, said, value = wrong
        raise ConfigError(f"{label} config.json says {name}={said!r} but the checkpoint's shapes give {value!r}")
    return {**derived, **given}


def check_config_facts(label: str, config: Any, facts: Mapping[str, Any]) -> None:
    """A text/image encoder's config (a transformers config, or the mapping a `config.json` gave, checked only
    on the fields it has) against what the weights' shapes fix: a contradiction is an error naming the field,
    raised before a model of the wrong shape is built."""
    from .errors import ConfigError

    if (wrong := _contradiction(config, facts)) is not None:
        name, said, value = wrong
        raise ConfigError(f"{label} says {name}={said!r} but the weights have {value!r}")


def _contradiction(config: Any, facts: Mapping[str, Any]) -> tuple[str, Any, Any] | None:
    """The first field where `config` (a mapping, compared only on the keys it has, or an object with the
    fields as attributes) differs from `facts`: (name, what the config says, what the facts say)."""
    for name, value in facts.items():
        if isinstance(config, Mapping):
            if name not in config:
                continue
            said = config[name]
        else:
            said = getattr(config, name)
        if said != value:
            return name, said, value
    return None


def build_config(config_cls, label: str, fields: Mapping[str, Any]):
    """`config_cls(**fields)`, with an invalid combination reported as a ConfigError naming the model."""
    from .errors import ConfigError

    try:
        return config_cls(**fields)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{label} checkpoint gives an invalid config: {exc}") from exc
