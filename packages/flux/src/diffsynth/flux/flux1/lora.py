"""FLUX.1 DiT LoRAs in the layouts people share, converted to our (BFL) module names.

Accepted (text-encoder entries in any of them are skipped; `diffusion_model.` / `transformer.` prefixes and
the key suffixes are read by `diffsynth.runtime.lora`):

- BFL names: `double_blocks.0.img_attn.qkv.lora_A.weight` / `.lora_B.weight`, or `lora_down` / `lora_up` /
  `alpha` (ComfyUI), and ComfyUI's `.diff` / `.diff_b`;
- kohya with BFL names: `lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight` / `.lora_up.weight` / `.alpha`;
- diffusers / peft names: `transformer.transformer_blocks.0.attn.to_q.lora_A.weight`, `add_q_proj`,
  `single_transformer_blocks.0.proj_mlp`, `norm_out.linear`, ... (optional `.alpha`), and the same names
  kohya-style (`lora_transformer_transformer_blocks_0_attn_to_q.lora_down.weight`);
- XLabs: `double_blocks.0.processor.qkv_lora1.down.weight` / `.up.weight` (`qkv_lora1`, `proj_lora1` for the
  image stream, `qkv_lora2`, `proj_lora2` for the text stream; single blocks `qkv_lora`, `proj_lora`), no alpha.

BFL's control LoRAs (`flux1-canny-dev-lora`, `flux1-depth-dev-lora`, BFL names) are peft LoRAs with a bias on every
up matrix (`<name>.lora_B.bias`, read as the layer's bias delta `diff_b`), the QK-norm scales they were trained
with (`<...>.norm.query_norm.scale` / `key_norm.scale`; diffusers names `attn.norm_q.weight`, ... too), and an
`img_in` LoRA twice as wide as FLUX.1-dev's input (the control image's tokens are concatenated to the noisy ones).
`read_flux1_lora` returns them as `Flux1LoRAWeights` with `in_channels` and `norm_scales` set, and
`prepare_model` makes the DiT take them the way diffusers' loader does: `img_in` widened with zero columns for the
new inputs (so the LoRA's delta alone fills them), then the norm scales replaced. A LoRA narrower than a widened
`img_in` (an ordinary LoRA after a control LoRA) gets zero columns instead.

Where diffusers splits one of our fused Linears (`img_attn.qkv` = to_q, to_k, to_v; `single_blocks.N.linear1` =
to_q, to_k, to_v, proj_mlp) the parts are merged into one LoRA on the fused layer: the downs stacked along the
rank, the up block-diagonal with each part's alpha / rank folded in, zero rows for parts the file leaves out.
XLabs' single-block `qkv_lora` covers the q, k, v rows of `linear1` the same way. diffusers' `norm_out.linear`
stores (scale, shift) where our `final_layer.adaLN_modulation.1` stores (shift, scale), so the rows of its up
matrix (and diff) are swapped like the weights in `formats.py`.

`convert_flux1_naming` (`diffsynth lora convert`, through the family's `lora_converter`) writes a LoRA back out in
BFL names (fused layers as one exact LoRA each) or diffusers' (fused LoRAs split exactly, `to_diffusers_names`).

The machinery is shared with FLUX.2 (`flux2/lora.py`): a family hands its name tables over as a `LoRANaming`
(diffusers -> ours, fused parts, swapped layers, XLabs names) and `convert_lora` does the rest. Merging the parts
of a fused layer and splitting it back are the runtime's (`diffsynth.runtime.lora_fused`, shared with Z-Image).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from diffsynth.runtime.errors import LoRAError, preview
from diffsynth.runtime.lora import LoRATarget, LoRAWeights, read_lora, read_lora_state, without_dotted_prefixes
from diffsynth.runtime.lora_factors import RowStackedDelta
from diffsynth.runtime.lora_fused import merge_parts, split_fused

from .formats import DIFFUSERS_TO_OURS, OURS_FUSED, SWAPPED, _template

logger = logging.getLogger(__name__)

# Ours -> XLabs processor names (the `.down` / `.up` LoRALinearLayer in each block's processor).
XLABS_NAMES = {
    "double_blocks.{}.img_attn.qkv": "double_blocks.{}.processor.qkv_lora1",
    "double_blocks.{}.img_attn.proj": "double_blocks.{}.processor.proj_lora1",
    "double_blocks.{}.txt_attn.qkv": "double_blocks.{}.processor.qkv_lora2",
    "double_blocks.{}.txt_attn.proj": "double_blocks.{}.processor.proj_lora2",
    "single_blocks.{}.linear1": "single_blocks.{}.processor.qkv_lora",  # the q, k, v rows only
    "single_blocks.{}.linear2": "single_blocks.{}.processor.proj_lora",
}
_XLABS_SUFFIXES = {".down.weight": ".lora_A.weight", ".up.weight": ".lora_B.weight"}
# QK-norm scales a control LoRA replaces: diffusers template -> ours (BFL's own names end in `_norm.scale`)
_DIFFUSERS_NORMS = {k: v for k, v in DIFFUSERS_TO_OURS.items() if k.endswith(".scale") or v.endswith(".scale")}
_BFL_NORM_SUFFIXES = (".norm.query_norm.scale", ".norm.key_norm.scale")


@dataclass(frozen=True)
class LoRANaming:
    """A family's LoRA names, from its `formats.py` tables (tensor names with `{}` for the block index):
    diffusers -> ours, our fused tensors -> the diffusers parts stacked in them, diffusers -> ours for the layers
    whose two output halves are stored the other way round, and ours -> XLabs processor names. `aliases` are
    (other prefix, diffusers prefix) pairs some exporters write; `model` and `accepted` word the messages."""

    model: str
    diffusers_to_ours: Mapping[str, str]
    ours_fused: Mapping[str, tuple[str, ...]]
    swapped: Mapping[str, str]
    template: Callable[[str], tuple[str, list[int]]]
    accepted: str
    xlabs: Mapping[str, str] = field(default_factory=dict)
    aliases: tuple[tuple[str, str], ...] = ()


FLUX1_NAMING = LoRANaming(
    model="FLUX.1 DiT",
    diffusers_to_ours=DIFFUSERS_TO_OURS,
    ours_fused=OURS_FUSED,
    swapped=SWAPPED,
    template=_template,
    xlabs=XLABS_NAMES,
    accepted="BFL names (double_blocks.0.img_attn.qkv), diffusers names (transformer_blocks.0.attn.to_q), their "
    "kohya forms (lora_unet_double_blocks_0_..., lora_transformer_transformer_blocks_0_...) and XLabs "
    "(double_blocks.0.processor.qkv_lora1)",
)


def _layer_names(table: Mapping[str, str]) -> dict[str, str]:
    """{ours: theirs} of a {theirs: ours} tensor table, as layer names (no `.weight`; biases drop out)."""
    return {o.removesuffix(".weight"): t.removesuffix(".weight") for t, o in table.items() if o.endswith(".weight")}


@dataclass(frozen=True)
class LoRAPart:
    """Where a named LoRA target lands in our model: output rows `start:start+rows` of Linear `module`
    (rows None: all of them); `swap`: its two output halves are stored the other way round."""

    module: str
    start: int = 0
    rows: int | None = None
    swap: bool = False


def lora_names(model: nn.Module, naming: LoRANaming = FLUX1_NAMING) -> dict[str, LoRAPart]:
    """Every dotted LoRA target name we accept for `model` (ours, diffusers, XLabs) -> where it lands."""
    tables = _layer_names(naming.diffusers_to_ours), _layer_names(naming.swapped)
    names: dict[str, LoRAPart] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        names[name] = LoRAPart(name)
        names.update(_diffusers_parts(name, module, naming, tables))
        template, index = naming.template(name)
        in_features = module.weight.shape[1]
        if template in naming.xlabs:
            rows = 3 * in_features if template.endswith("linear1") else None
            names[naming.xlabs[template].format(*index)] = LoRAPart(name, 0, rows)
    for alias, prefix in naming.aliases:
        names.update({alias + n.removeprefix(prefix): p for n, p in list(names.items()) if n.startswith(prefix)})
    return names


def _diffusers_parts(name: str, module: nn.Linear, naming: LoRANaming, tables: tuple) -> dict[str, LoRAPart]:
    """diffusers' names for our Linear `name` -> where each lands in it (several for a fused layer, none for a
    layer diffusers lacks). `tables` are `_layer_names` of `naming.diffusers_to_ours` and `naming.swapped`."""
    diffusers_names, diffusers_swapped = tables
    template, index = naming.template(name)
    out_features, in_features = module.weight.shape
    if template in diffusers_names:
        return {diffusers_names[template].format(*index): LoRAPart(name)}
    if template in diffusers_swapped:
        return {diffusers_swapped[template].format(*index): LoRAPart(name, swap=True)}
    if f"{template}.weight" not in naming.ours_fused:
        return {}
    parts = [p.removesuffix(".weight") for p in naming.ours_fused[f"{template}.weight"]]
    # q, k, v of the hidden width each, then (single blocks) the MLP input
    width = out_features // 3 if len(parts) == 3 else in_features
    sizes = [width] * 3 + [out_features - 3 * width] * (len(parts) - 3)
    found, start = {}, 0
    for part, rows in zip(parts, sizes, strict=True):
        found[part.format(*index)] = LoRAPart(name, start, rows)
        start += rows
    return found


def read_flux1_lora(
    path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor] | LoRAWeights, model: nn.Module
) -> LoRAWeights:
    """Read a FLUX.1 DiT LoRA in any layout above and return it targeted at `model`'s Linears (our names)."""
    if isinstance(path_or_state_dict, LoRAWeights):
        return convert_flux1_lora(path_or_state_dict, model)
    state, source = read_lora_state(path_or_state_dict)
    state, norms = split_control_parts(state, source)
    lora = read_lora(_xlabs_to_peft(state), source=source, header=getattr(state, "header", None))
    return convert_flux1_lora(lora, model, norms)


@dataclass
class Flux1LoRAWeights(LoRAWeights):
    """A FLUX.1 DiT LoRA in our names, with what a control LoRA changes besides Linear deltas: `in_channels`, the
    input width `img_in` must be widened to first (None: as it is), and `norm_scales` (our parameter names) that
    replace the model's QK-norm scales. `prepare_model` applies both."""

    in_channels: int | None = None
    norm_scales: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def changes_model(self) -> bool:
        return self.in_channels is not None or bool(self.norm_scales)


def split_control_parts(state: Mapping[str, torch.Tensor], source: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(the LoRA tensors, QK-norm scales in our names) of a raw LoRA state dict.

    A peft `lora_bias` LoRA (BFL's control LoRAs) adds `lora_B.bias` times alpha / rank to the layer's output:
    it is returned as the key `<name>.diff_b`, scaled when the file has an alpha. Norm scales (BFL or diffusers
    names, any of the usual prefixes) are taken out; everything else is returned as it was."""
    lora: dict[str, torch.Tensor] = {}
    norms: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = without_dotted_prefixes(key)
        if key.endswith(".lora_B.bias"):
            base = key.removesuffix(".lora_B.bias")
            alpha, down = state.get(f"{base}.alpha"), state.get(f"{base}.lora_A.weight")
            if alpha is not None and down is not None:
                value = value * (float(alpha) / down.shape[0])
            lora[f"{base}.diff_b"] = value
        elif key.endswith(".lora_A.bias"):
            raise LoRAError(
                f"{source}: {key!r} is a bias on a LoRA down matrix, which no LoRA layout we read has "
                "(peft's lora_bias puts it on lora_B)"
            )
        elif name.endswith(_BFL_NORM_SUFFIXES):
            norms[name] = value
        elif _template(name)[0] in _DIFFUSERS_NORMS:
            template, index = _template(name)
            norms[_DIFFUSERS_NORMS[template].format(*index)] = value
        else:
            lora[key] = value
    return lora, norms


@torch.no_grad()
def prepare_model(model: nn.Module, lora: LoRAWeights) -> None:
    """Make the FLUX.1 DiT `model` take `lora` (a `Flux1LoRAWeights` from `read_flux1_lora`): `img_in` widened to
    `lora.in_channels` (`widen_img_in`), the QK-norm scales replaced by `lora.norm_scales`. Every norm name and
    shape is checked before anything changes; a plain LoRA changes nothing. These changes stay when the LoRA's
    deltas are removed (reload the DiT to undo them), as with diffusers' `load_lora_weights`."""
    if not isinstance(lora, Flux1LoRAWeights) or not lora.changes_model:
        return
    params = dict(model.named_parameters())
    for name, value in lora.norm_scales.items():
        if name not in params:
            raise LoRAError(
                f"{lora.source}: norm scale {name!r} is no parameter of the {type(model).__name__} (its QK norms "
                f"are e.g. {preview([n for n in params if n.endswith('_norm.scale')], 3)}); the LoRA was "
                "probably made for a different model"
            )
        if tuple(params[name].shape) != tuple(value.shape):
            raise LoRAError(
                f"{lora.source}: norm scale {name!r} has shape {tuple(value.shape)}; the "
                f"{type(model).__name__}'s is {tuple(params[name].shape)}"
            )
    if lora.in_channels is not None:
        widen_img_in(model, lora.in_channels)
    for name, value in lora.norm_scales.items():
        params[name].copy_(value.to(params[name].device, params[name].dtype))
    if lora.norm_scales:
        logger.info("%s: replaced %d QK-norm scales of the DiT", lora.source, len(lora.norm_scales))


@torch.no_grad()
def widen_img_in(model: nn.Module, in_channels: int) -> None:
    """`model.img_in` (and `model.config.in_channels`) widened to `in_channels` input features: the old weight in
    the first columns, zeros in the new ones, the bias kept, so the output is unchanged until a LoRA fills them
    (diffusers' `_maybe_expand_transformer_param_shape_or_error_`)."""
    old = model.img_in
    if in_channels < old.in_features:
        raise LoRAError(f"img_in has {old.in_features} input features; it cannot be narrowed to {in_channels}")
    if in_channels == old.in_features:
        return
    weight = old.weight
    new = nn.Linear(in_channels, old.out_features, bias=old.bias is not None, device=weight.device, dtype=weight.dtype)
    new.weight.zero_()
    new.weight[:, : old.in_features].copy_(weight)
    if old.bias is not None:
        new.bias.copy_(old.bias)
    new.requires_grad_(weight.requires_grad).train(old.training)
    model.img_in = new
    model.config.in_channels = in_channels
    logger.info("widened the DiT's img_in from %d to %d input features", old.in_features, in_channels)


def _xlabs_to_peft(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """XLabs `<block>.processor.<name>.down.weight` -> `<block>.processor.<name>.lora_A.weight` (and up -> B)."""
    out = {}
    for key, value in state.items():
        if ".processor." in key:
            for old, new in _XLABS_SUFFIXES.items():
                if key.endswith(old):
                    key = key.removesuffix(old) + new
                    break
        out[key] = value
    return out


def convert_flux1_lora(
    lora: LoRAWeights, model: nn.Module, norm_scales: Mapping[str, torch.Tensor] | None = None
) -> Flux1LoRAWeights:
    """`lora` (names as read: dotted, or kohya-underscored) renamed and merged onto `model`'s Linears.

    An `img_in` LoRA wider than the model's input (a control LoRA) is kept at its width and recorded as
    `in_channels`; a narrower one (the model was widened by a control LoRA) gets zero columns. `norm_scales`
    (from `split_control_parts`) are carried along."""
    norm_scales = dict(norm_scales or {})
    if isinstance(lora, Flux1LoRAWeights):
        norm_scales = {**lora.norm_scales, **norm_scales}
    in_channels, lora = _img_in_width(lora, model)
    converted = convert_lora(
        lora, model, FLUX1_NAMING, in_features={"img_in": in_channels} if in_channels is not None else None
    )
    return Flux1LoRAWeights(
        targets=converted.targets,
        source=converted.source,
        skipped=converted.skipped,
        keys=converted.keys,
        in_channels=in_channels,
        norm_scales=norm_scales,
    )


def _img_in_width(lora: LoRAWeights, model: nn.Module) -> tuple[int | None, LoRAWeights]:
    """(the input width a wider `img_in` LoRA needs, or None; `lora` with a narrower one zero-padded)."""
    img_in = getattr(model, "img_in", None)
    if not isinstance(img_in, nn.Linear):
        return None, lora
    names = lora_names(model)
    underscored = {name.replace(".", "_"): name for name in names}
    width, targets = None, dict(lora.targets)
    for raw, t in lora.targets.items():
        part = names.get(raw if raw in names else underscored.get(raw, ""))
        if part is None or part.module != "img_in" or t.down is None:
            continue
        n = t.down.shape[1]
        if n > img_in.in_features:
            width = n
        elif n < img_in.in_features:
            targets[raw] = replace(t, down=F.pad(t.down, (0, img_in.in_features - n)))
    return width, replace(lora, targets=targets)


def convert_lora(
    lora: LoRAWeights, model: nn.Module, naming: LoRANaming, in_features: Mapping[str, int] | None = None
) -> LoRAWeights:
    """`lora` (names as read: dotted, or kohya-underscored) renamed through `naming` and merged onto `model`'s
    Linears. `in_features` gives layers the input width they will have once widened (`widen_img_in`).

    Raises `LoRAError` naming the file and key for a target that is no layer of the model, a part whose
    shape does not fit its layer, or two entries giving the same rows of one layer."""
    names = lora_names(model, naming)
    underscored = {name.replace(".", "_"): name for name in names}
    modules = dict(model.named_modules())
    widths = dict(in_features or {})
    groups: dict[str, list[tuple[LoRAPart, LoRATarget, str]]] = {}
    unknown = []
    for raw, target in lora.targets.items():
        key = lora.keys.get(raw, raw)
        name = raw if raw in names else underscored.get(raw)
        if name is None:
            unknown.append(key)
            continue
        part = names[name]
        groups.setdefault(part.module, []).append((part, target, key))
    if unknown:
        raise LoRAError(
            f"{lora.source}: {len(unknown)} of {len(lora.targets)} LoRA entries match no layer of the "
            f"{type(model).__name__}: {preview(unknown, 5)}. Accepted are {naming.accepted}"
        )
    targets = {
        module: _merge(modules[module], module, parts, lora.source, naming.model, widths.get(module))
        for module, parts in groups.items()
    }
    keys = {module: parts[0][2] for module, parts in groups.items()}
    return LoRAWeights(targets=targets, source=lora.source, skipped=list(lora.skipped), keys=keys)


def _merge(
    linear: nn.Linear, module: str, parts: list, source: str, model: str, width: int | None = None
) -> LoRATarget:
    """`merge_parts` on our Linear `module` (input width `width` once widened), swapping the halves of a whole-layer
    part diffusers stores the other way round."""
    out_features, in_features = linear.weight.shape
    merged = merge_parts(out_features, width or in_features, module, parts, source, model)
    part = parts[0][0]
    return _swap_halves(merged) if len(parts) == 1 and part.rows is None and part.swap else merged


def _swap_halves(t: LoRATarget) -> LoRATarget:
    def swap(x):
        if x is None:
            return None
        a, b = x.chunk(2, dim=0)
        return torch.cat([b, a])

    factors = None
    if t.factors is not None:
        factors = RowStackedDelta(*t.factors.shape, ((0, t.factors),), swap_halves=True)
    magnitude = t.magnitude
    if magnitude is not None and magnitude.shape[1] == 1:  # row norms move with their rows
        magnitude = swap(magnitude)
    return LoRATarget(
        down=t.down,
        up=swap(t.up),
        alpha=t.alpha,
        diff=swap(t.diff),
        diff_b=swap(t.diff_b),
        factors=factors,
        magnitude=magnitude,
    )


# ----------------------------------------------------------------------------------- renaming (`diffsynth lora convert`)
NAMINGS = ("official", "diffusers")


def convert_flux1_naming(
    path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor],
    to: str = "official",
    model: nn.Module | None = None,
) -> LoRAWeights:
    """A FLUX.1 DiT LoRA in any layout we read, renamed to BFL's names (`to="official"`: one exact LoRA per fused
    layer) or to diffusers' (`to="diffusers"`: fused LoRAs split exactly into their parts). `model` gives the
    shapes (default: FLUX.1-dev's DiT on the meta device, which costs no memory). Refuses, naming the layer, what
    the target naming cannot hold exactly (a control LoRA's QK-norm scales; LyCORIS changes on fused parts)."""
    model = _meta_model() if model is None else model
    lora = read_flux1_lora(path_or_state_dict, model)
    if lora.norm_scales:
        raise LoRAError(
            f"{lora.source} is a control LoRA that also replaces {len(lora.norm_scales)} QK-norm scales (e.g. "
            f"{next(iter(lora.norm_scales))!r}); a LoRA file cannot carry those, so it is not converted"
        )
    return rename_lora(lora, model, FLUX1_NAMING, to)


def _meta_model() -> nn.Module:
    from .dit import Flux1DiT, Flux1DiTConfig

    with torch.device("meta"):
        return Flux1DiT(Flux1DiTConfig())


def rename_lora(lora: LoRAWeights, model: nn.Module, naming: LoRANaming, to: str) -> LoRAWeights:
    """`lora` as `convert_lora` returns it (on `model`'s Linears, our names) in the naming `to` (`NAMINGS`)."""
    to = "official" if to == "comfyui" else to  # ComfyUI's FLUX models use the official (BFL) names
    if to not in NAMINGS:
        raise LoRAError(f"unknown LoRA naming {to!r}; accepted: {[*NAMINGS, 'comfyui']}")
    for name, t in lora.targets.items():
        if isinstance(t.factors, RowStackedDelta):
            raise LoRAError(
                f"{lora.source}: {lora.keys.get(name, name)!r} is a LoHa / LoKr on part of {name!r} of the "
                f"{naming.model} (rows of a fused layer, or its halves swapped), which no LyCORIS change on the "
                f"whole layer equals; it cannot be written in {to} names"
            )
    return lora if to == "official" else to_diffusers_names(lora, model, naming)


def to_diffusers_names(lora: LoRAWeights, model: nn.Module, naming: LoRANaming) -> LoRAWeights:
    """`lora` (our names, on `model`'s Linears) in diffusers' names: a fused layer's LoRA split into its parts
    (the down shared, the up's rows split, each part keeping only the rank columns its rows use, so a LoRA
    merged from diffusers parts comes back as those parts), swapped halves swapped back. A LoHa / LoKr or a
    column-norm DoRA on a fused layer cannot be split and is refused, naming the layer."""
    tables = _layer_names(naming.diffusers_to_ours), _layer_names(naming.swapped)
    modules = dict(model.named_modules())
    targets: dict[str, LoRATarget] = {}
    keys: dict[str, str] = {}
    for name, t in lora.targets.items():
        key = lora.keys.get(name, name)
        module = modules.get(name)
        parts = _diffusers_parts(name, module, naming, tables) if isinstance(module, nn.Linear) else {}
        if not parts:
            raise LoRAError(
                f"{lora.source}: {key!r} changes {name!r}, which has no counterpart in diffusers' {naming.model}"
            )
        if len(parts) == 1 and next(iter(parts.values())).rows is None:
            [(theirs, part)] = parts.items()
            if part.swap and t.factors is not None:
                raise LoRAError(
                    f"{lora.source}: {key!r} is a LoHa / LoKr on {name!r}, whose output halves diffusers stores "
                    f"the other way round ({theirs!r}); its factors cannot be reordered exactly"
                )
            pieces = {theirs: _swap_halves(t) if part.swap else t}
        else:
            pieces = split_fused(t, key, name, parts, lora.source)
        for theirs, piece in pieces.items():
            targets[theirs] = piece
            keys[theirs] = key
    return LoRAWeights(targets=targets, source=lora.source, skipped=list(lora.skipped), keys=keys)
