"""Z-Image DiT LoRAs in ComfyUI's (Lumina "NextDiT") names, read into ours and written back out.

Our DiT keeps the official diffusers names (`layers.0.attention.to_q`, `to_out.0`, `all_x_embedder.2-1`,
`all_final_layer.2-1.linear`), which LoRAs from ai-toolkit, musubi-tuner (kohya: `lora_unet_layers_0_attention_to_q`),
DiffSynth-Studio and our trainer use. ComfyUI's Z-Image model is NextDiT: `attention.qkv` (q, k, v stacked on the
output rows, in that order, equal thirds), `attention.out`, `x_embedder`, `final_layer.linear`,
`final_layer.adaLN_modulation.1`, and LoRAs saved from it use those names (`diffusion_model.layers.0.attention.qkv`,
kohya `lora_unet_layers_0_attention_qkv`). The name tables are the checkpoint tables of `formats.py` (`COMFY_TO_OURS`,
`COMFY_FUSED`), so a LoRA is renamed exactly as the weights it changes are.

Reading (`convert_z_image_lora`, the pipeline's `read_lora` for the DiT): ComfyUI names are renamed, dotted or
kohya-underscored, for `noise_refiner`, `context_refiner`, `layers` and the top-level layers; a `qkv` change is
split exactly into `to_q` / `to_k` / `to_v` (`diffsynth.runtime.lora_fused.split_fused`: LoRA, diff, bias diff,
row-norm DoRA); a LoHa / LoKr or a column-norm DoRA on `qkv` cannot be split and is refused, naming its key. Names
that are already ours pass unchanged; one layer under both namings is an error naming both keys.

Writing (`convert_z_image_naming`, `diffsynth lora convert --family z_image`): "official" and "diffusers" are both
our names; "comfyui" writes the NextDiT names, each block's `to_q` / `to_k` / `to_v` as one exact LoRA on `qkv`
(`merge_parts`: downs stacked, block-diagonal up), never a full `.diff`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import torch
from torch import nn

from diffsynth.runtime.errors import LoRAError, preview
from diffsynth.runtime.lora import LoRATarget, LoRAWeights, read_lora, resolve_lora
from diffsynth.runtime.lora_fused import FusedPart, merge_parts, split_fused

from .formats import COMFY_FUSED, COMFY_TO_OURS, _template

NAMINGS = ("official", "diffusers", "comfyui")
MODEL = "Z-Image DiT"

# ComfyUI -> ours layer templates (`{}` the block index), from the checkpoint tables' weights
COMFY_LAYERS = {
    theirs.removesuffix(".weight"): ours.removesuffix(".weight")
    for theirs, ours in COMFY_TO_OURS.items()
    if theirs.endswith(".weight") and theirs != ours
}
COMFY_FUSED_LAYERS = {
    theirs.removesuffix(".weight"): tuple(p.removesuffix(".weight") for p in parts)
    for theirs, parts in COMFY_FUSED.items()
}
_OURS_TO_COMFY = {ours: theirs for theirs, ours in COMFY_LAYERS.items()}
_PART_OF = {part: (fused, i) for fused, parts in COMFY_FUSED_LAYERS.items() for i, part in enumerate(parts)}
# every layer template either naming knows, kohya-underscored -> dotted
_DOTTED = {
    name.replace(".", "_"): name
    for name in (
        *COMFY_LAYERS,
        *COMFY_LAYERS.values(),
        *COMFY_FUSED_LAYERS,
        *_PART_OF,
        *(ours.removesuffix(".weight") for ours in COMFY_TO_OURS.values()),
    )
}
_UNDERSCORED_BLOCK = re.compile(r"^(noise_refiner|context_refiner|layers)_(\d+)_(.+)$")
ACCEPTED = (
    "our (diffusers) names (layers.0.attention.to_q, all_x_embedder.2-1), ComfyUI's NextDiT names "
    "(layers.0.attention.qkv, x_embedder, final_layer.linear) and their kohya forms (lora_unet_layers_0_attention_qkv)"
)


def _dotted_template(raw: str) -> tuple[str, list[int]]:
    """(layer template, block index) of a LoRA target name as read: dotted, or kohya-underscored when the
    underscored name is one of the known layers (else the name itself, for `resolve_lora` to resolve or refuse)."""
    template, index = _template(raw)
    if template in _DOTTED.values():
        return template, index
    block = _UNDERSCORED_BLOCK.match(raw)
    if block:
        underscored, index = f"{block.group(1)}_{{}}_{block.group(3)}", [int(block.group(2))]
    else:
        underscored, index = raw, []
    if underscored in _DOTTED:
        return _DOTTED[underscored], index
    return raw, []


def convert_z_image_lora(lora: LoRAWeights) -> LoRAWeights:
    """`lora` with ComfyUI-named targets renamed to our modules and `qkv` changes split exactly into q, k, v.

    Raises `LoRAError` naming the key for a `qkv` change that cannot be split exactly (LoHa / LoKr, column-norm
    DoRA, rows not a multiple of 3) and naming both keys for one layer given under both namings."""
    targets: dict[str, LoRATarget] = {}
    keys: dict[str, str] = {}
    for raw, target in lora.targets.items():
        key = lora.keys.get(raw, raw)
        template, index = _dotted_template(raw)
        if template in COMFY_FUSED_LAYERS:
            pieces = _split_qkv(target, key, template.format(*index), COMFY_FUSED_LAYERS[template], index, lora.source)
            claimed = [part.format(*index) for part in COMFY_FUSED_LAYERS[template]]
        else:
            renamed = COMFY_LAYERS.get(template, template)
            name = renamed.format(*index) if index or template in COMFY_LAYERS else template  # unknown: as read
            pieces, claimed = {name: target}, [name]
        for name in claimed:
            if name in keys:
                raise LoRAError(
                    f"{lora.source}: {keys[name]!r} and {key!r} both change {name!r} of the {MODEL} (under our name "
                    "and ComfyUI's fused / NextDiT name); give one of them"
                )
            keys[name] = key
        targets.update(pieces)
    keys = {name: keys[name] for name in targets}
    return LoRAWeights(targets=targets, source=lora.source, skipped=list(lora.skipped), keys=keys)


def _split_qkv(
    t: LoRATarget, key: str, name: str, parts: tuple[str, ...], index: list[int], source: str
) -> dict[str, LoRATarget]:
    """The exact changes of `to_q`, `to_k`, `to_v` (equal thirds of the rows, as `formats.comfy_to_ours` splits
    the weight) from a change of the fused `qkv`."""
    ours = [part.format(*index) for part in parts]
    if t.factors is not None:
        raise LoRAError(
            f"{source}: {key!r} is a LoHa / LoKr on ComfyUI's fused {name!r}; no LyCORIS changes on our {ours} "
            "equal it, so it cannot be applied to the Z-Image DiT"
        )
    rows = next(x.shape[0] for x in (t.up, t.diff, t.diff_b) if x is not None)
    if rows % len(parts):
        raise LoRAError(
            f"{source}: {key!r} changes {rows} output rows of the fused {name!r}, which stacks q, k and v in equal "
            "thirds; the LoRA was probably made for a different model"
        )
    size = rows // len(parts)
    split = {part: FusedPart(i * size, size) for i, part in enumerate(ours)}
    return split_fused(t, key, name, split, source, into="our")


def convert_z_image_naming(
    path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor] | LoRAWeights,
    to: str = "official",
    model: nn.Module | None = None,
) -> LoRAWeights:
    """A Z-Image DiT LoRA in any naming we read, in our names (`to="official"` or `"diffusers"`, the same) or
    ComfyUI's (`to="comfyui"`: NextDiT names, each block's q, k, v as one exact LoRA on `qkv`). `model` gives the
    layers and shapes (default: the released DiT with Omni's SigLIP layers, on the meta device: no memory).
    Raises `LoRAError` naming the key for a target that is no Linear of the model or does not fit its shape,
    and for what ComfyUI's names cannot hold exactly."""
    if to not in NAMINGS:
        raise LoRAError(f"unknown LoRA naming {to!r}; accepted: {list(NAMINGS)}")
    model = _meta_model() if model is None else model
    lora = convert_z_image_lora(read_lora(path_or_state_dict))
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    underscored = {n.replace(".", "_"): n for n in linears}
    unknown = [lora.keys.get(raw, raw) for raw in lora.targets if raw not in linears and raw not in underscored]
    if unknown:
        raise LoRAError(
            f"{lora.source}: {len(unknown)} of {len(lora.targets)} LoRA entries match no layer of the {MODEL}: "
            f"{preview(unknown, 5)}. Accepted are {ACCEPTED}"
        )
    keys = {underscored.get(raw, raw): lora.keys.get(raw, raw) for raw in lora.targets}
    resolved = resolve_lora(model, lora)  # dotted names, shapes checked
    resolved.keys = {name: keys[name] for name in resolved.targets}
    return to_comfyui_names(resolved, model) if to == "comfyui" else resolved


def to_comfyui_names(lora: LoRAWeights, model: nn.Module) -> LoRAWeights:
    """`lora` (our dotted names, on `model`'s Linears) in ComfyUI's NextDiT names: each block's q, k, v changes
    merged into one exact LoRA on `attention.qkv`, the renamed layers renamed. Refuses, naming the key, a layer
    ComfyUI's model lacks (Omni's SigLIP layers), a LoHa / LoKr on q, k or v (it would need a full `.diff` of the
    fused layer) and a DoRA on some of q, k, v only (the others' row norms are not in the file)."""
    modules = dict(model.named_modules())
    targets: dict[str, LoRATarget] = {}
    keys: dict[str, str] = {}
    fused: dict[str, list] = {}  # ComfyUI's qkv -> its parts given
    shapes: dict[str, tuple[int, int]] = {}  # ComfyUI's qkv -> its weight's shape
    for name, t in lora.targets.items():
        key = lora.keys.get(name, name)
        template, index = _template(name)
        if template in _PART_OF:
            fused_template, i = _PART_OF[template]
            if t.factors is not None:
                raise LoRAError(
                    f"{lora.source}: {key!r} is a LoHa / LoKr on {name!r}, which ComfyUI's {MODEL} fuses into "
                    f"{fused_template.format(*index)!r}; no LyCORIS change on the fused layer equals it"
                )
            rows, in_features = modules[name].weight.shape
            fused_name = fused_template.format(*index)
            shapes[fused_name] = (len(COMFY_FUSED_LAYERS[fused_template]) * rows, in_features)
            fused.setdefault(fused_name, []).append((FusedPart(i * rows, rows), t, key))
            continue
        if template.startswith("siglip_"):
            raise LoRAError(f"{lora.source}: {key!r} changes {name!r}, which ComfyUI's {MODEL} does not have")
        theirs = _OURS_TO_COMFY.get(template, template).format(*index)
        targets[theirs] = t
        keys[theirs] = key
    for name, parts in fused.items():
        merged = merge_parts(*shapes[name], name, parts, lora.source, MODEL)
        if merged.magnitude is not None and torch.isnan(merged.magnitude).any():
            raise LoRAError(
                f"{lora.source}: {parts[0][2]!r} is a DoRA on some of q, k, v of {name!r} only; the fused layer's "
                "other rows would need their norms, which the file does not give"
            )
        targets[name] = merged
        keys[name] = parts[0][2]
    return LoRAWeights(targets=targets, source=lora.source, skipped=list(lora.skipped), keys=keys)


def _meta_model() -> nn.Module:
    from .dit import ZImageDiT, ZImageDiTConfig

    with torch.device("meta"):
        return ZImageDiT(ZImageDiTConfig(siglip_feat_dim=1152))


__all__ = ["COMFY_LAYERS", "NAMINGS", "convert_z_image_lora", "convert_z_image_naming", "to_comfyui_names"]
