"""LoRA files in the layouts people share, applied to our models fused (fast) or unfused (hot-swappable).

Reading normalises every layout to `LoRAWeights`: one `LoRATarget` (down [r, in], up [out, r], alpha, and
optional full deltas `diff`/`diff_b`) per target module, named like our modules (the official checkpoint names,
dotted, without `.weight`). Recognised layouts:

- peft / diffusers: `<name>.lora_A.weight`, `<name>.lora_B.weight` (also `lora_A.<adapter>.weight`), optional
  `<name>.alpha`; prefixes `base_model.model.`, `model.diffusion_model.`, `diffusion_model.`, `transformer.`,
  `unet.` are dropped;
- kohya / ComfyUI: `lora_unet_<name with dots as underscores>.lora_down.weight` / `.lora_up.weight` / `.alpha`
  (also `lora_transformer_`, `lycoris_`); the underscored names are ambiguous, so they are resolved against the
  model's module names when the LoRA is applied;
- `lora_down` / `lora_up` with dotted names and the prefixes above; ComfyUI's `.diff` / `.diff_b`;
- LyCORIS LoHa (`.hada_w1_a`, `.hada_w1_b`, `.hada_w2_a`, `.hada_w2_b`) and LoKr (`.lokr_w1` or `.lokr_w1_a` /
  `.lokr_w1_b`, `.lokr_w2` or `.lokr_w2_a` / `.lokr_w2_b`), with `.alpha`, under any of the names above (also
  peft's); their changes stay factored until used (`lora_factors`);
- DoRA: any of the above plus a magnitude, peft's `.lora_magnitude_vector` or LyCORIS' `.dora_scale`
  (`lora_dora`).
Text-encoder entries (`lora_te*_`, `text_encoder*.`) are skipped: a denoiser LoRA is applied to the denoiser.
diffusers' own files keep their alphas in the safetensors header (`lora_adapter_metadata`, its peft config) instead
of `.alpha` keys; those are read too (`diffusers_alphas`), so such a file has the strength diffusers gives it.

Unfused LoRAs are attached with a forward hook on the target `nn.Linear` and kept in a plain attribute of it,
not in a wrapper module or a parametrization. That keeps the module object, its class and its state-dict keys
exactly as they were (the VRAM manager, strict loads and `compile_units` keep seeing the same model), costs
one small matmul pair per call instead of recomputing the full weight (parametrize would), and `clear_loras`
restores the original by removing the hook and the attribute. The LoRA tensors are cast to the input's device
and dtype on first use and cached, so a model moved or offloaded after the LoRA was applied still works.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CheckpointError, ConfigError, LoRAError, preview
from .lora_dora import check_magnitude, decomposition_scale, fused_weight, read_magnitude, unfused_extra
from .lora_factors import FIELDS as FACTOR_FIELDS
from .lora_factors import HadamardDelta, KroneckerDelta, WeightDelta, lycoris_tensors, read_factors
from .quant import is_quantized_linear, linear_weight
from .vram import vram_handle
from .vram.config import is_fp8
from .vram.disk import mark_changed

logger = logging.getLogger(__name__)

KeyMap = Callable[[str], "str | None"]

DOTTED_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.", "unet.")
KOHYA_PREFIXES = ("lora_unet_", "lora_transformer_", "lycoris_")
SKIPPED_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "text_encoder.", "text_encoder_2.")
SAVE_FORMATS = ("diffsynth", "peft", "kohya")
_DEFAULT_SAVE_PREFIX = {"diffsynth": "", "peft": "diffusion_model.", "kohya": "lora_unet_"}
_ATTR = "_diffsynth_loras"
_MERGER_ATTR = "_diffsynth_lora_merger"
_FUSED_ATTR = "_diffsynth_fused_lora"  # set on a Linear once a LoRA was fused into it

# (regex, field): the suffix that says what a tensor is; the name in front of it is the target.
_SUFFIXES = (
    (re.compile(r"^(.+)\.lora_A(?:\.[A-Za-z0-9_\-]+)?\.weight$"), "down"),
    (re.compile(r"^(.+)\.lora_B(?:\.[A-Za-z0-9_\-]+)?\.weight$"), "up"),
    (re.compile(r"^(.+)\.lora_down\.weight$"), "down"),
    (re.compile(r"^(.+)\.lora_up\.weight$"), "up"),
    (re.compile(r"^(.+)\.alpha$"), "alpha"),
    (re.compile(r"^(.+)\.diff$"), "diff"),
    (re.compile(r"^(.+)\.diff_b$"), "diff_b"),
    (re.compile(rf"^(.+)\.({'|'.join(FACTOR_FIELDS)})(?:\.weight)?$"), "factor"),
    (re.compile(r"^(.+)\.lora_magnitude_vector(?:\.[A-Za-z0-9_\-]+)?(?:\.weight)?$"), "magnitude"),
    (re.compile(r"^(.+)\.dora_scale$"), "magnitude"),
)
_UNSUPPORTED = {"lora_mid": "LoCon (Tucker)"}


@dataclass
class LoRATarget:
    """What one LoRA changes in one Linear: delta W = (alpha / rank) * up @ down, plus `diff`/`diff_b`, plus a
    LyCORIS change kept in `factors` (LoHa, LoKr; its alpha already in it). A DoRA `magnitude` ([out, 1] or [1, in])
    then rescales the merged weight's norms (`lora_dora`)."""

    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    alpha: float | None = None
    diff: torch.Tensor | None = None
    diff_b: torch.Tensor | None = None
    factors: WeightDelta | None = None
    magnitude: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return 0 if self.down is None else int(self.down.shape[0])

    @property
    def factor(self) -> float:
        """alpha / rank; an absent alpha means the file's convention of no extra scaling."""
        return 1.0 if self.alpha is None or self.rank == 0 else float(self.alpha) / self.rank

    def delta_weight(self) -> torch.Tensor | None:
        """The weight change at scale 1, in float32 (None when the target only changes the bias)."""
        delta = None
        if self.down is not None:
            delta = self.factor * (self.up.float() @ self.down.float())
        if self.diff is not None:
            delta = self.diff.float() if delta is None else delta + self.diff.float()
        if self.factors is not None:
            change = self.factors.to(dtype=torch.float32).delta()
            delta = change if delta is None else delta + change
        return delta


@dataclass
class LoRAWeights:
    """A LoRA in normalised form: target module name -> `LoRATarget`. Names without dots may be kohya names
    that still need resolving against a model (`resolve_lora`)."""

    targets: dict[str, LoRATarget]
    source: str = "<state dict>"
    skipped: list[str] = field(default_factory=list)
    keys: dict[str, str] = field(default_factory=dict)  # target -> one key of the file, for messages
    header: dict[str, str] = field(default_factory=dict)  # the file's safetensors header (metadata)
    prefix: str | None = None  # the prefix every name was read under ("transformer.", "lora_unet_", ""); None: mixed

    def __len__(self) -> int:
        return len(self.targets)


# ----------------------------------------------------------------------------------- reading
class LoRAState(dict):
    """The raw tensors of a LoRA file (`read_lora_state`), with the file's safetensors header in `header`, so a
    family that rewrites keys before `read_lora` still hands the header (diffusers' alphas) on when it passes the
    same dict (a new dict needs `header=` given to `read_lora`)."""

    header: dict[str, str]

    def __init__(self, tensors: Mapping[str, torch.Tensor], header: Mapping[str, str] | None = None):
        super().__init__(tensors)
        self.header = dict(header or {})


def read_lora(
    path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor] | LoRAWeights,
    *,
    source: str | None = None,
    header: Mapping[str, str] | None = None,
) -> LoRAWeights:
    """Read a LoRA file (safetensors or torch pickle) or state dict into `LoRAWeights`; `source` names a
    state dict in messages (a family converter passes the file it rewrote keys of), `header` gives a state dict's
    safetensors header (default: a file's own, or that of a `LoRAState`), whose diffusers alphas are applied."""
    if isinstance(path_or_state_dict, LoRAWeights):
        return path_or_state_dict
    state, read_from = read_lora_state(path_or_state_dict)
    if header is None:
        header = state.header if isinstance(state, LoRAState) else {}
    return _normalise(state, source or read_from, dict(header))


def read_lora_state(path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor]) -> tuple[dict, str]:
    """The raw tensors of a LoRA file or state dict (a `LoRAState`, with the file's header), and the name to use for
    it in messages."""
    if isinstance(path_or_state_dict, Mapping):
        return LoRAState(path_or_state_dict, getattr(path_or_state_dict, "header", None)), "<state dict>"
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        path = Path(path_or_state_dict)
        return LoRAState(_read_file(path), read_lora_header(path)), str(path_or_state_dict)
    raise LoRAError(f"a LoRA must be a file path, a state dict or LoRAWeights, got {type(path_or_state_dict).__name__}")


def read_lora_header(path: str | os.PathLike | object) -> dict[str, str]:
    """The safetensors header (metadata) of the LoRA file `path`; empty for anything else (a state dict, a pickle)."""
    if not isinstance(path, (str, os.PathLike)) or not str(path).endswith(".safetensors") or not Path(path).is_file():
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as exc:  # a broken file is reported by the tensor read, with its listing
        logger.debug("cannot read the header of %s: %s", path, exc)
        return {}


def diffusers_alphas(lora: LoRAWeights, header: Mapping[str, str] | None = None) -> LoRAWeights:
    """`lora` with the alphas diffusers keeps out of the tensors filled in (from `header`, default `lora.header`).

    diffusers' `save_lora_weights` (and its training scripts) write no `.alpha` keys: the peft config goes into
    the safetensors header (`lora_adapter_metadata`: `<component>.lora_alpha`, `.alpha_pattern`, `.use_rslora` for a
    pipeline's file, the same without `<component>.` for a model's), and its loader scales each layer by that
    alpha / rank. Low-rank targets without an alpha of their own get the one peft would use (the first
    `alpha_pattern` key matching the module name's end, else `lora_alpha`); without that header nothing changes."""
    config = _diffusers_lora_config(lora.header if header is None else header, lora.source)
    if config is None or config.get("lora_alpha") is None:
        return lora
    patterns = config.get("alpha_pattern") or {}
    for name, target in lora.targets.items():
        if target.alpha is not None or target.down is None:
            continue
        key = next((k for k in patterns if re.match(rf"(.*\.)?({k})$", name)), None)
        alpha = float(patterns[key] if key is not None else config["lora_alpha"])
        target.alpha = alpha * math.sqrt(target.rank) if config.get("use_rslora") else alpha  # rsLoRA: alpha/sqrt(r)
    return lora


_DENOISER_COMPONENTS = ("transformer", "unet")  # the names diffusers' pipelines give the denoiser's config


def _diffusers_lora_config(header: Mapping[str, str], source: str) -> dict | None:
    raw = header.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise LoRAError(f"{source}: its lora_adapter_metadata header is not JSON ({exc})") from None
    if not isinstance(config, dict):
        raise LoRAError(f"{source}: its lora_adapter_metadata header is not a JSON object")
    for component in _DENOISER_COMPONENTS:  # a pipeline's file: one config per model
        if any(key.startswith(f"{component}.") for key in config):
            return {k.removeprefix(f"{component}."): v for k, v in config.items() if k.startswith(f"{component}.")}
    if "lora_alpha" not in config and any("." in key for key in config):
        return None  # only other models' configs (text encoders)
    return config


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    from .checkpoint import folder_listing, open_checkpoint

    if not path.is_file():
        raise LoRAError(f"LoRA file {path} does not exist; {folder_listing(path.parent)}")
    try:
        lazy = open_checkpoint(str(path))
        return {key: lazy[key] for key in lazy}
    except CheckpointError as exc:
        raise LoRAError(f"cannot read LoRA file {path}: {exc}") from None


def _normalise(state: dict[str, torch.Tensor], source: str, header: dict[str, str] | None = None) -> LoRAWeights:
    targets: dict[str, LoRATarget] = {}
    prefixes: set[str] = set()  # what the names were read under
    origin: dict[tuple[str, str], str] = {}  # (target, field) -> key, to name keys in errors
    skipped: list[str] = []
    unknown: list[str] = []
    factors: dict[str, dict[str, torch.Tensor]] = {}  # target -> LyCORIS field -> tensor
    for key, tensor in state.items():
        for marker, kind in _UNSUPPORTED.items():
            if marker in key:
                raise LoRAError(
                    f"{source}: key {key!r} belongs to a {kind} adapter, which is not supported; "
                    "accepted are plain LoRA (lora_A/lora_B, lora_down/lora_up with alpha) and diff/diff_b"
                )
        parsed = _parse_key(key)
        if parsed is None:
            unknown.append(key)
            continue
        name, kind, field_name, prefix = parsed
        if name is None:
            skipped.append(key)
            continue
        prefixes.add(prefix)
        if kind == "factor":
            kind = field_name
        if (name, kind) in origin:
            raise LoRAError(
                f"{source}: keys {origin[(name, kind)]!r} and {key!r} both give the {kind} of {name!r} "
                "(the same module under two prefixes?)"
            )
        origin[(name, kind)] = key
        target = targets.setdefault(name, LoRATarget())
        if kind == "alpha":
            if tensor.numel() != 1:
                raise LoRAError(f"{source}: {key!r} should be a scalar alpha, got shape {tuple(tensor.shape)}")
            target.alpha = float(tensor.float().item())
        elif kind in FACTOR_FIELDS:
            factors.setdefault(name, {})[kind] = tensor
        elif kind == "magnitude":
            target.magnitude = read_magnitude(tensor, key, source)
        else:
            setattr(target, kind, tensor)
    if unknown and not targets:
        raise LoRAError(
            f"{source} holds no LoRA keys we recognise; its keys start with {preview(sorted(unknown), 5)}. "
            "Accepted: '<module>.lora_A.weight'/'.lora_B.weight' (peft, diffusers), "
            "'lora_unet_<module>.lora_down.weight'/'.lora_up.weight'/'.alpha' (kohya, ComfyUI), '<module>.diff'"
        )
    if unknown:
        raise LoRAError(
            f"{source} mixes LoRA keys with keys we do not recognise: {preview(sorted(unknown), 5)}; "
            "refusing to apply it partly"
        )
    if not targets:
        what = "only text-encoder weights" if skipped else "no tensors"
        raise LoRAError(f"{source} holds {what} ({preview(sorted(skipped), 5)}); there is nothing for the denoiser")
    first_keys = {}
    for (name, _), key in origin.items():
        first_keys.setdefault(name, key)
    for name, fields in factors.items():
        target = targets[name]
        if target.down is not None or target.up is not None or target.diff is not None:
            raise LoRAError(
                f"{source}: {first_keys[name]!r}: module {name!r} has LyCORIS factors and also LoRA matrices or a "
                "diff; a layer takes one kind of change per file"
            )
        target.factors = read_factors(fields, target.alpha, first_keys[name], source)
    for name, target in targets.items():
        _check_target(name, target, origin, source)
    if skipped:
        logger.info("%s: skipped %d text-encoder LoRA keys (e.g. %s)", source, len(skipped), skipped[0])
    keys = {name: _first_key(name, origin, first_keys) for name in targets}
    prefix = next(iter(prefixes)) if len(prefixes) == 1 else None
    lora = LoRAWeights(targets, source, skipped, keys, header=dict(header or {}), prefix=prefix)
    return diffusers_alphas(lora)


def _first_key(name: str, origin: dict, first_keys: dict) -> str:
    kinds = ("down", "up", "diff", "diff_b")
    return next((origin[(name, k)] for k in kinds if (name, k) in origin), first_keys.get(name, name))


def _parse_key(key: str) -> tuple[str | None, str, str | None, str] | None:
    """(target name, field, LyCORIS factor name or None, the prefix dropped from the name) of a LoRA key; the name
    is None for keys of other models; None if unrecognised."""
    for pattern, kind in _SUFFIXES:
        match = pattern.match(key)
        if match:
            raw = match.group(1)
            name = _target_name(raw)
            prefix = "" if name is None else raw[: len(raw) - len(name)]
            return name, kind, match.group(2) if kind == "factor" else None, prefix
    return None


def _target_name(raw: str) -> str | None:
    if raw.startswith(SKIPPED_PREFIXES):
        return None
    for prefix in KOHYA_PREFIXES:
        if raw.startswith(prefix):
            return raw[len(prefix) :]
    return without_dotted_prefixes(raw)


def without_dotted_prefixes(name: str) -> str:
    """`name` without the leading `DOTTED_PREFIXES` (`transformer.`, a ComfyUI checkpoint's `model.diffusion_model.`,
    ...), however many are stacked."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in DOTTED_PREFIXES:
            if name.startswith(prefix) and len(name) > len(prefix):
                name, stripped = name[len(prefix) :], True
    return name


def _check_target(name: str, t: LoRATarget, origin: dict, source: str) -> None:
    key = origin.get((name, "down")) or origin.get((name, "up")) or origin.get((name, "alpha")) or name
    if (t.down is None) != (t.up is None):
        have, lacks = ("down (lora_A/lora_down)", "up") if t.up is None else ("up (lora_B/lora_up)", "down")
        raise LoRAError(f"{source}: {key!r} has the {have} matrix but no {lacks} matrix for module {name!r}")
    if t.down is None and t.diff is None and t.diff_b is None and t.factors is None:
        what = "a DoRA magnitude" if t.magnitude is not None else "an alpha"
        raise LoRAError(f"{source}: {key!r} gives {what} for {name!r} but no LoRA matrices")
    if t.magnitude is not None and t.down is None and t.diff is None and t.factors is None:
        raise LoRAError(f"{source}: {key!r} gives a DoRA magnitude for {name!r} but only a bias change (diff_b)")
    if t.down is not None:
        if t.down.dim() != 2 or t.up.dim() != 2:
            raise LoRAError(
                f"{source}: {key!r} has shapes down {tuple(t.down.shape)}, up {tuple(t.up.shape)}; only LoRAs "
                "on Linear layers (2-D matrices) are supported, not convolution LoRAs"
            )
        if t.down.shape[0] != t.up.shape[1]:
            raise LoRAError(
                f"{source}: {key!r} has rank {t.down.shape[0]} in its down matrix {tuple(t.down.shape)} but "
                f"{t.up.shape[1]} in its up matrix {tuple(t.up.shape)}; the file is inconsistent"
            )


def describe_lora(lora: LoRAWeights) -> dict:
    """What `diffsynth inspect` says about a LoRA file: its kinds of change, target count, ranks and alphas."""
    kinds: dict[str, int] = {}
    ranks: set[int] = set()
    alphas: set[float] = set()
    for target in lora.targets.values():
        if target.down is not None:
            kind = "LoRA"
        elif isinstance(target.factors, (HadamardDelta, KroneckerDelta)):
            kind = "LoHa" if isinstance(target.factors, HadamardDelta) else "LoKr"
        else:
            kind = "diff" if target.diff is not None else "bias (diff_b)"
        kind = f"DoRA ({kind})" if target.magnitude is not None else kind
        kinds[kind] = kinds.get(kind, 0) + 1
        if target.rank:
            ranks.add(target.rank)
        if target.alpha is not None:
            alphas.add(target.alpha)
    info: dict = {"adapter": kinds, "targets": len(lora.targets)}
    if ranks:
        info["ranks"] = sorted(ranks)
    if alphas:
        info["alphas"] = sorted(alphas)
    if lora.skipped:
        info["text_encoder_keys_skipped"] = len(lora.skipped)
    return info


# ----------------------------------------------------------------------------------- matching a model
def resolve_lora(model: nn.Module, lora: LoRAWeights, key_map: KeyMap | None = None) -> LoRAWeights:
    """`lora` with every target renamed to a Linear of `model` and checked against its shapes.

    `key_map` (a family's mapper) sees each name as read (dotted, prefixes dropped; kohya names underscored,
    `lora_unet_` dropped) and returns our dotted name, an underscored name to resolve, or None to skip it."""
    modules = dict(model.named_modules())
    underscored: dict[str, list[str]] = {}
    for module_name in modules:
        if module_name:
            underscored.setdefault(module_name.replace(".", "_"), []).append(module_name)
    resolved: dict[str, LoRATarget] = {}
    unmatched: list[str] = []
    for raw, target in lora.targets.items():
        name = key_map(raw) if key_map is not None else raw
        if name is None:
            continue
        if name not in modules and "." not in name:
            candidates = underscored.get(name, [])
            if len(candidates) > 1:
                raise LoRAError(
                    f"{lora.source}: kohya name {raw!r} fits several modules of {type(model).__name__} "
                    f"({candidates}); pass key_map= to say which"
                )
            name = candidates[0] if candidates else name
        if not isinstance(modules.get(name), nn.Linear):
            unmatched.append(raw if name == raw else f"{raw} -> {name}")
            continue
        if name in resolved:
            raise LoRAError(f"{lora.source}: two LoRA targets map to module {name!r} of {type(model).__name__}")
        _check_shapes(modules[name], name, target, lora.source, type(model).__name__)
        resolved[name] = target
    if unmatched:
        raise LoRAError(
            f"{lora.source}: {len(unmatched)} of {len(lora.targets)} LoRA targets are not Linear layers of "
            f"{type(model).__name__}: {preview(unmatched, 5)}. The LoRA was probably made for a different model "
            "(or needs this family's key mapping)"
        )
    return LoRAWeights(targets=resolved, source=lora.source, skipped=list(lora.skipped))


def _check_shapes(module: nn.Linear, name: str, t: LoRATarget, source: str, model_name: str) -> None:
    out_features, in_features = module.out_features, module.in_features  # a quantized weight is packed
    weight_shape = (out_features, in_features)
    problems = []
    if t.down is not None and (t.down.shape[1] != in_features or t.up.shape[0] != out_features):
        problems.append(f"down {tuple(t.down.shape)} / up {tuple(t.up.shape)} vs weight {weight_shape}")
    if t.diff is not None and tuple(t.diff.shape) != weight_shape:
        problems.append(f"diff {tuple(t.diff.shape)} vs weight {weight_shape}")
    if t.factors is not None and tuple(t.factors.shape) != weight_shape:
        problems.append(f"{type(t.factors).__name__} of shape {tuple(t.factors.shape)} vs weight {weight_shape}")
    if t.magnitude is not None and check_magnitude(t.magnitude, *weight_shape):
        problems.append(check_magnitude(t.magnitude, *weight_shape))
    if t.diff_b is not None:
        if module.bias is None:
            problems.append("diff_b given but the layer has no bias")
        elif tuple(t.diff_b.shape) != tuple(module.bias.shape):
            problems.append(f"diff_b {tuple(t.diff_b.shape)} vs bias {tuple(module.bias.shape)}")
    if problems:
        raise LoRAError(
            f"{source}: LoRA for {name!r} does not fit {model_name}.{name} ({'; '.join(problems)}); "
            "the LoRA was probably made for a different model or model size"
        )


# ----------------------------------------------------------------------------------- applying
def apply_lora(
    model: nn.Module,
    lora: LoRAWeights | str | os.PathLike | Mapping[str, torch.Tensor],
    *,
    scale: float = 1.0,
    fuse: bool | None = None,
    name: str | None = None,
    key_map: KeyMap | None = None,
) -> str | None:
    """Apply a LoRA to `model`. Fused: added into the weights for good (returns None). Unfused: attached
    under `name` (default `lora_<n>`; re-using a name replaces that LoRA) and returned, for
    `set_lora_scale` / `clear_loras`. A scale that is not a finite number is a `ConfigError` naming the LoRA.

    `fuse=None` (the default) fuses, except into weights that would round most of the change away: quantized
    Linears (always kept apart) and weights the VRAM manager stores in fp8 (`stores_fp8`; `fuse=True` fuses
    those anyway, with a warning). Fusing a DoRA onto layers another fused LoRA changed is order-dependent and
    differs from keeping both apart (each DoRA then sees the base weight): a warning says so."""
    lora = read_lora(lora)
    if not math.isfinite(scale):
        raise ConfigError(f"LoRA {lora.source}: scale {scale} must be a finite number")
    resolved = resolve_lora(model, lora, key_map)
    fuse = _fuse_or_keep_apart(model, resolved, fuse)
    if fuse:
        if name is not None:
            logger.warning(
                "LoRA %s: name %r is ignored: names are for LoRAs kept apart (fuse=False)", lora.source, name
            )
        _fuse_all(model, resolved, float(scale))
        logger.info("fused LoRA %s into %d layers (scale %g)", resolved.source, len(resolved), scale)
        return None
    loaded = list_loras(model)
    if name is None:
        n = len(loaded)
        while f"lora_{n}" in loaded:
            n += 1
        name = f"lora_{n}"
    elif name in loaded:
        clear_loras(model, name)
    for target_name, target in resolved.targets.items():
        module = model.get_submodule(target_name)
        _stack(module).adapters[name] = _Adapter(target, float(scale), module.weight.device)
    logger.info("attached LoRA %r from %s to %d layers (scale %g)", name, resolved.source, len(resolved), scale)
    return name


def _fuse_or_keep_apart(model: nn.Module, lora: LoRAWeights, fuse: bool | None) -> bool:
    """Whether to fuse `lora` (resolved) into `model`: a LoRA's change is far below a 4-bit or fp8 step, so
    fused into such weights it would mostly vanish; it is kept apart unless `fuse=True` asked for fp8."""
    if fuse is False:
        return False
    if any(is_quantized_linear(model.get_submodule(n)) for n in lora.targets):
        logger.info("LoRA %s kept apart (not fused): the model's Linears are quantized", lora.source)
        return False
    if not stores_fp8(vram_handle(model), [model.get_submodule(n) for n in lora.targets]):
        return True
    if fuse is None:
        logger.info("LoRA %s kept apart (not fused): the VRAM manager stores the model's weights in fp8", lora.source)
        return False
    logger.warning(
        "LoRA %s fused (fuse=True) into weights the VRAM manager stores in fp8: most of its change is lost to "
        "fp8 rounding; leave fuse unset (or fuse=False) to keep it apart",
        lora.source,
    )
    return True


def stores_fp8(handle, modules: list[nn.Module] | None = None) -> bool:
    """Whether the VRAM manager `handle` keeps weights in fp8: its config's offload / onload / preparing /
    computation dtype is fp8, or it stores a weight of `modules` (default: any) in fp8 (e.g. an fp8 file on disk)."""
    config = getattr(handle, "config", None)
    if config is None:
        return False
    keys = ("offload_dtype", "onload_dtype", "preparing_dtype", "computation_dtype")
    if any(is_fp8(getattr(config, key, None)) for key in keys):
        return True
    owners = None if modules is None else {id(m) for m in modules}
    for unit in getattr(handle, "units", ()):
        slots = getattr(unit.offload, "slots", ())
        for target, slot in zip(unit.targets, slots, strict=False):
            mine = owners is None or any(id(owner) in owners for owner, _ in target.owners)
            if mine and is_fp8(slot.dtype):
                return True
    return False


def _fuse_all(model: nn.Module, lora: LoRAWeights, scale: float) -> None:
    """Fuse every target of `lora` (resolved); a DoRA onto layers changed by an earlier fused LoRA is warned about."""
    handle = vram_handle(model)
    stacked = [
        n for n, t in lora.targets.items() if t.magnitude is not None and _FUSED_ATTR in vars(model.get_submodule(n))
    ]
    if stacked:
        logger.warning(
            "DoRA %s fused onto %d layers already changed by another fused LoRA (e.g. %r): its norms are taken of "
            "the changed weight, so the result depends on the order of loading and differs from keeping the LoRAs "
            "apart (fuse=False)",
            lora.source,
            len(stacked),
            stacked[0],
        )
    # a VRAM-managed model's weights are placeholders between forwards: fuse into the real values,
    # all layers at once, stored back when the block ends (re-entrant, e.g. inside pipe.load_lora's)
    with handle.materialized() if handle is not None else contextlib.nullcontext():
        for target_name, target in lora.targets.items():
            module = model.get_submodule(target_name)
            _fuse(module, target, scale)
            module.__dict__[_FUSED_ATTR] = True


def load_lora(
    model: nn.Module,
    path: str | os.PathLike | Mapping[str, torch.Tensor] | LoRAWeights,
    scale: float = 1.0,
    fuse: bool | None = None,
    name: str | None = None,
    key_map: KeyMap | None = None,
) -> str | None:
    """`read_lora` + `apply_lora`."""
    return apply_lora(model, read_lora(path), scale=scale, fuse=fuse, name=name, key_map=key_map)


@torch.no_grad()
def _fuse(module: nn.Linear, t: LoRATarget, scale: float) -> None:
    """Add the LoRA into `module`'s weight (and bias); each tensor changed is marked (`vram.disk.mark_changed`):
    it no longer holds what the checkpoint file stores, so disk offload enabled later keeps it in memory."""
    weight = module.weight
    delta = t.delta_weight()
    if delta is not None and t.magnitude is not None:
        weight.copy_(fused_weight(weight, delta.to(weight.device), t.magnitude, scale).to(weight.dtype))
        mark_changed(weight)
    elif delta is not None:
        new = weight.float() + scale * delta.to(weight.device)
        weight.copy_(new.to(weight.dtype))
        mark_changed(weight)
    if t.diff_b is not None:
        bias = module.bias
        bias.copy_((bias.float() + scale * t.diff_b.float().to(bias.device)).to(bias.dtype))
        mark_changed(bias)


class _Adapter:
    """One unfused LoRA on one Linear: its tensors, its scale, and a copy cast for the last input seen (and, for a
    DoRA, its norm scale at the last strength)."""

    def __init__(self, t: LoRATarget, scale: float, device: torch.device):
        device = torch.device("cpu") if device.type == "meta" else device

        def move(x):
            return None if x is None else x.detach().to(device)

        self.tensors = (move(t.down), move(t.up), move(t.diff), move(t.diff_b))
        self.factors = None if t.factors is None else t.factors.to(device)
        self.magnitude = move(t.magnitude)
        self.factor = t.factor
        self.alpha = t.alpha
        self.scale = scale
        self._cast: tuple = ()
        self._cast_key: tuple | None = None
        self._dora: tuple = (None, None)  # (strength, device, dtype), the decomposition scale

    def __call__(self, x: torch.Tensor, module: nn.Linear, output: torch.Tensor) -> torch.Tensor | None:
        """What this LoRA adds to `module`'s `output` (the layer's own, before any LoRA) for input `x`."""
        key = (x.device, x.dtype)
        if key != self._cast_key:
            self._cast = tuple(None if w is None else w.to(device=x.device, dtype=x.dtype) for w in self.tensors)
            self._cast += (None if self.factors is None else self.factors.to(x.device, x.dtype),)
            self._cast_key = key
        diff_b = self._cast[3]
        if self.magnitude is None:
            y = self._change(x)
        else:
            weight = linear_weight(module).to(x.dtype)
            base = output if module.bias is None else output - module.bias.to(output.dtype)
            y = unfused_extra(x, base, weight, self._change, self._dora_scale(weight, x))
        if diff_b is not None:
            extra = diff_b.expand(*x.shape[:-1], -1) * self.scale
            y = extra if y is None else y + extra
        return y

    def _change(self, x: torch.Tensor) -> torch.Tensor | None:
        """x @ (scale * delta)^T, the bias change left out."""
        down, up, diff, _, factors = self._cast
        y = None
        if down is not None:
            y = F.linear(F.linear(x, down), up) * (self.scale * self.factor)
        if diff is not None:
            extra = F.linear(x, diff) * self.scale
            y = extra if y is None else y + extra
        if factors is not None:
            extra = factors.linear(x) * self.scale
            y = extra if y is None else y + extra
        return y

    def _dora_scale(self, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        key = (self.scale, x.device, x.dtype)
        if self._dora[0] != key:
            down, up, diff, _ = self.tensors
            delta = LoRATarget(down=down, up=up, alpha=self.alpha, diff=diff, factors=self.factors).delta_weight()
            scale = decomposition_scale(weight, delta.to(weight.device), self.magnitude, self.scale)
            self._dora = (key, scale.to(x.dtype))
        return self._dora[1]


class _LoRAStack:
    """The unfused LoRAs attached to one Linear, with the hook that adds them to its output."""

    def __init__(self, module: nn.Linear):
        self.adapters: dict[str, _Adapter] = {}
        self.handle = module.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        merger = module.__dict__.get(_MERGER_ATTR)
        outputs = []
        own = output
        x = args[0] if args else kwargs["input"]  # nn.Linear.forward(input): also called as layer(input=x)
        for adapter in self.adapters.values():
            if adapter.scale != 0.0:
                y = adapter(x, module, own)
                if y is None:
                    continue
                if merger is None:
                    output = output + y.to(output.dtype)
                else:
                    outputs.append(y.to(output.dtype))
        return merger(output, torch.stack(outputs)) if outputs else output


def _stack(module: nn.Linear) -> _LoRAStack:
    stack = module.__dict__.get(_ATTR)
    if stack is None:
        stack = _LoRAStack(module)
        module.__dict__[_ATTR] = stack
    return stack


def _stacks(model: nn.Module):
    for module in model.modules():
        stack = module.__dict__.get(_ATTR)
        if stack is not None:
            yield module, stack


def set_lora_merger(module: nn.Linear, merger: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None) -> None:
    """Combine the unfused LoRAs of one Linear with `merger(output, lora_outputs)` (`lora_outputs` `[n, ...]`: each
    LoRA's output at its scale) instead of adding them; None goes back to adding. A learned merger such as
    DiffSynth-Studio's LoRA Fusion gates each LoRA by the layer's output."""
    if not isinstance(module, nn.Linear):
        raise LoRAError(f"a LoRA merger goes on a Linear layer, not {type(module).__name__}")
    if merger is None:
        module.__dict__.pop(_MERGER_ATTR, None)
    else:
        module.__dict__[_MERGER_ATTR] = merger


def list_loras(model: nn.Module) -> dict[str, float]:
    """The unfused LoRAs attached to `model`: name -> scale."""
    found: dict[str, float] = {}
    for _, stack in _stacks(model):
        for name, adapter in stack.adapters.items():
            found.setdefault(name, adapter.scale)
    return found


def set_lora_scale(model: nn.Module, name: str, scale: float) -> None:
    """Change the scale of the unfused LoRA `name` (0 switches it off without removing it)."""
    if not math.isfinite(scale):
        raise ConfigError(f"LoRA {name!r}: scale {scale} must be a finite number")
    hits = 0
    for _, stack in _stacks(model):
        if name in stack.adapters:
            stack.adapters[name].scale = float(scale)
            hits += 1
    if not hits:
        raise LoRAError(
            f"no unfused LoRA named {name!r} on {type(model).__name__}; loaded: {preview(list_loras(model))}"
        )


def clear_loras(model: nn.Module, name: str | None = None) -> None:
    """Remove unfused LoRAs (all, or the one called `name`), leaving each Linear exactly as it was.
    Fused LoRAs are part of the weights and cannot be removed: reload the model for those."""
    if name is not None and name not in list_loras(model):
        raise LoRAError(
            f"no unfused LoRA named {name!r} on {type(model).__name__}; loaded: {preview(list_loras(model))}"
        )
    for module, stack in list(_stacks(model)):
        if name is None:
            stack.adapters.clear()
        else:
            stack.adapters.pop(name, None)
        if not stack.adapters:
            stack.handle.remove()
            del module.__dict__[_ATTR]


# ----------------------------------------------------------------------------------- saving
def _note_dora_outside_diffusers(path: Path) -> None:
    """diffusers' LoRA loaders drop `.dora_scale` (and refuse peft's `lora_magnitude_vector` in files with ComfyUI's
    `diffusion_model.` names), so they would load a DoRA file as a plain LoRA: say where it does load."""
    logger.warning(
        "%s: a DoRA's magnitudes are written as .dora_scale, which pipe.load_lora and ComfyUI read; diffusers' "
        "load_lora_weights drops them and would apply a plain LoRA (a different model)",
        path,
    )


def save_lora(
    lora_state: LoRAWeights | Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    format: str = "diffsynth",
    *,
    prefix: str | None = None,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write a LoRA as safetensors in one of `SAVE_FORMATS`, atomically; `metadata` adds string entries to the
    file's header (e.g. an IC-LoRA's `reference_downscale_factor`, which its loader reads).

    - "diffsynth": `<name>.lora_A.weight` / `.lora_B.weight`, no alpha (what DiffSynth-Studio loads; an alpha
      other than the rank is folded into lora_B, so reading it back gives the same delta with alpha None);
    - "peft": `<prefix><name>.lora_A.weight` / `.lora_B.weight`, no alpha either (diffusers' loaders refuse
      other keys in these files, so an alpha other than the rank is folded into lora_B too), prefix
      `diffusion_model.` by default (ComfyUI's name for official-layout models);
    - "kohya": `lora_unet_<name with dots as underscores>.lora_down.weight` / `.lora_up.weight` / `.alpha`.
    `diff` / `diff_b` are written as `<key name>.diff` / `.diff_b` in every format; a LoHa / LoKr change as its
    LyCORIS factors (`<key name>.hada_w1_a`, `.lokr_w1`, ..., `.alpha`), or, once placed on rows of a fused layer,
    built in full as a `.diff`; a DoRA's magnitude as `.dora_scale` (what `load_lora` and ComfyUI read; diffusers'
    loaders drop it and would apply a plain LoRA, so a DoRA "peft" / "kohya" file logs a note). Names should be
    resolved (dotted, `resolve_lora`) for the first two."""
    from .checkpoint import save_safetensors

    lora = read_lora(lora_state)
    if format not in SAVE_FORMATS:
        raise LoRAError(f"unknown LoRA save format {format!r}; accepted: {list(SAVE_FORMATS)}")
    path = Path(path)
    if path.suffix != ".safetensors":
        raise LoRAError(f"LoRA files are written as .safetensors; got the path {path}")
    prefix = _DEFAULT_SAVE_PREFIX[format] if prefix is None else prefix
    tensors: dict[str, torch.Tensor] = {}
    for name, t in lora.targets.items():
        key = prefix + (name.replace(".", "_") if format == "kohya" else name)
        if t.down is not None:
            down_key, up_key = ("lora_down", "lora_up") if format == "kohya" else ("lora_A", "lora_B")
            up = t.up
            if format != "kohya" and t.alpha is not None and t.factor != 1.0:
                up = (up.float() * t.factor).to(up.dtype)
            tensors[f"{key}.{down_key}.weight"] = t.down
            tensors[f"{key}.{up_key}.weight"] = up
            if t.alpha is not None and format == "kohya":
                tensors[f"{key}.alpha"] = torch.tensor(float(t.alpha))
        diff = t.diff
        if isinstance(t.factors, (HadamardDelta, KroneckerDelta)):
            tensors.update({f"{key}.{field}": value for field, value in lycoris_tensors(t.factors).items()})
        elif t.factors is not None:
            change = t.factors.delta()
            diff = change if diff is None else (diff.float() + change.float()).to(diff.dtype)
        if diff is not None:
            tensors[f"{key}.diff"] = diff
        if t.diff_b is not None:
            tensors[f"{key}.diff_b"] = t.diff_b
        if t.magnitude is not None:
            if torch.isnan(t.magnitude).any():
                raise LoRAError(
                    f"{name!r}: its DoRA covers only some rows of the layer (parts of a fused layer); save the file "
                    "as it was read, before a family's conversion"
                )
            tensors[f"{key}.dora_scale"] = t.magnitude
    if format != "diffsynth" and any(t.magnitude is not None for t in lora.targets.values()):
        _note_dora_outside_diffusers(path)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    header = {**{str(k): str(v) for k, v in (metadata or {}).items()}, "format": "pt", "diffsynth_lora_format": format}
    save_safetensors(tensors, path, metadata=header)
    logger.info("wrote %d LoRA targets to %s (%s layout)", len(lora), path, format)
