"""Wan DiT LoRAs in diffusers' module names (diffusers' and finetrainers' Wan LoRAs), renamed to the official ones.

Our DiT keeps the authors' names (`blocks.0.self_attn.q`), which LoRAs in the ComfyUI / kohya / musubi layouts use
already; LoRAs trained on diffusers' `WanTransformer3DModel` name the same layers `blocks.0.attn1.to_q`,
`blocks.0.ffn.net.0.proj`, `condition_embedder.text_embedder.linear_1`, ... (dotted, under `transformer.` or
`diffusion_model.`, or kohya-underscored: `lora_transformer_blocks_0_attn1_to_q`). The layers are the same ones
one to one (no fused layers), so renaming each target through the checkpoint tables (`formats.DIFFUSERS_TO_OURS`)
is the whole conversion; any kind of change (LoRA, LoHa / LoKr, DoRA, diff) moves with its name.
`convert_wan_naming` (`diffsynth lora convert`) writes a LoRA back out in either naming.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import torch
from torch import nn

from diffsynth.runtime.errors import LoRAError, preview
from diffsynth.runtime.lora import LoRAWeights, read_lora, read_lora_state

from .formats import DIFFUSERS_TO_OURS, OURS_TO_DIFFUSERS, _template

# diffusers -> ours module templates (`{}` the block index), from the key table's weights
_MODULES = {
    theirs.removesuffix(".weight"): ours.removesuffix(".weight")
    for theirs, ours in DIFFUSERS_TO_OURS.items()
    if theirs.endswith(".weight") and theirs != ours
}
# the same templates written kohya-style (dots as underscores), for underscored names
_UNDERSCORED = {theirs.replace(".", "_"): theirs for theirs in _MODULES}
_BLOCK = re.compile(r"^(blocks|vace_blocks)_(\d+)_(.+)$")


def wan_module_name(raw: str) -> str:
    """Our module name for a LoRA target named as read (dotted, or underscored from a kohya key); names that are
    not diffusers' are returned as they are (ours, or for `resolve_lora` to refuse)."""
    template, index = _template(raw + ".weight")
    template = template.removesuffix(".weight")
    if template in _MODULES:
        return _MODULES[template].format(*index)
    if "." in raw:
        return raw
    block = _BLOCK.match(raw)
    template, index = (f"{block.group(1)}_{{}}_{block.group(3)}", [int(block.group(2))]) if block else (raw, [])
    dotted = _UNDERSCORED.get(template)
    return _MODULES[dotted].format(*index) if dotted is not None else raw


def convert_wan_lora(lora: LoRAWeights) -> LoRAWeights:
    """`lora` with diffusers-named targets renamed to our modules (the others kept as they are)."""
    targets, keys = {}, {}
    for raw, target in lora.targets.items():
        name = wan_module_name(raw)
        if name in targets:
            raise LoRAError(
                f"{lora.source}: {keys[name]!r} and {lora.keys.get(raw, raw)!r} both change {name!r} (under its "
                "diffusers name and its own)"
            )
        targets[name] = target
        keys[name] = lora.keys.get(raw, raw)
    return LoRAWeights(targets=targets, source=lora.source, skipped=list(lora.skipped), keys=keys)


def convert_wan_naming(
    path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor],
    to: str = "official",
    model: nn.Module | None = None,
) -> LoRAWeights:
    """A Wan DiT LoRA in any layout we read (also LongCat-Video's) with dotted names in the authors' naming
    (`to="official"`) or diffusers' (`to="diffusers"`). Kohya's underscored names are resolved against `model`'s
    Linears (default: a 14B I2V DiT with VACE blocks and Wan2.2-Animate's, on the meta device: every Wan DiT's
    layer names);
    a target that is no Linear of it is an error naming its key."""
    from .longcat import is_longcat_lora, longcat_lora_to_standard

    to = "official" if to == "comfyui" else to  # ComfyUI's Wan model uses the authors' names
    if to not in ("official", "diffusers"):
        raise LoRAError(f"unknown LoRA naming {to!r}; accepted: ['official', 'diffusers', 'comfyui']")
    state, source = read_lora_state(path_or_state_dict)
    if is_longcat_lora(state):
        state = longcat_lora_to_standard(state, source)
    lora = convert_wan_lora(read_lora(state, source=source))
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)} if model else _meta_linears()
    underscored = {n.replace(".", "_"): n for n in linears}
    targets, keys, unknown = {}, {}, []
    for raw, target in lora.targets.items():
        name = raw if raw in linears else underscored.get(raw)
        if name is None:
            unknown.append(lora.keys.get(raw, raw))
            continue
        if to == "diffusers":
            template, index = _template(name + ".weight")
            if template not in OURS_TO_DIFFUSERS:
                raise LoRAError(
                    f"{source}: {lora.keys.get(raw, raw)!r} changes {name!r}, which diffusers' Wan DiT does not have"
                )
            name = OURS_TO_DIFFUSERS[template].removesuffix(".weight").format(*index)
        targets[name] = target
        keys[name] = lora.keys.get(raw, raw)
    if unknown:
        raise LoRAError(
            f"{source}: {len(unknown)} of {len(lora.targets)} LoRA entries match no layer of the Wan DiT: "
            f"{preview(unknown, 5)}. Accepted are the authors' names (blocks.0.self_attn.q), diffusers' "
            "(blocks.0.attn1.to_q) and their kohya forms (lora_unet_blocks_0_self_attn_q)"
        )
    return LoRAWeights(targets=targets, source=source, skipped=list(lora.skipped), keys=keys)


def _meta_linears() -> set[str]:
    """The Linear names of a 14B I2V DiT with VACE blocks and of Wan2.2-Animate's (face adapter, motion and face
    encoders), built on the meta device: between them every Wan DiT's layer names."""
    from .dit import WanDiT, WanDiTConfig

    common = {"has_image_input": True, "model_type": "i2v", "image_pos_len": 514}
    configs = (WanDiTConfig(**common, vace_layers=tuple(range(0, 40, 2))), WanDiTConfig(**common, animate=True))
    names: set[str] = set()
    for config in configs:
        with torch.device("meta"):
            model = WanDiT(config)
        names |= {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    return names


__all__ = ["convert_wan_lora", "convert_wan_naming", "wan_module_name"]
