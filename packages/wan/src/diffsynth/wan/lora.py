"""Wan DiT LoRAs in diffusers' module names (diffusers' and finetrainers' Wan LoRAs), renamed to the official ones.

Our DiT keeps the authors' names (`blocks.0.self_attn.q`), which LoRAs in the ComfyUI / kohya / musubi layouts use
already; LoRAs trained on diffusers' `WanTransformer3DModel` name the same layers `blocks.0.attn1.to_q`,
`blocks.0.ffn.net.0.proj`, `condition_embedder.text_embedder.linear_1`, ... (dotted, under `transformer.` or
`diffusion_model.`, or kohya-underscored: `lora_transformer_blocks_0_attn1_to_q`). The layers are the same ones
one to one (no fused layers), so renaming each target through the checkpoint tables (`formats.DIFFUSERS_TO_OURS`)
is the whole conversion; any kind of change (LoRA, LoHa / LoKr, DoRA, diff) moves with its name.
"""

from __future__ import annotations

import re

from diffsynth.runtime.errors import LoRAError
from diffsynth.runtime.lora import LoRAWeights

from .formats import DIFFUSERS_TO_OURS, _template

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


__all__ = ["convert_wan_lora", "wan_module_name"]
