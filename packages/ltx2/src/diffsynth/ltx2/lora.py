"""LTX-2 LoRA files in our module names, split between the two models they can touch.

LTX-2 LoRAs (the authors' `ltx-2-19b-distilled-lora-384`, camera-control and IC LoRAs, ComfyUI and
ltx-trainer exports) name ltx-core modules under `diffusion_model.`, which are ours: they load as they are.
Some also adapt the text connectors (`diffusion_model.video_embeddings_connector.*`,
`text_embedding_projection.*`), which in our split are their own model: `split_lora` hands those to the
connectors. diffusers / peft exports (`transformer.<diffusers name>`) are renamed to ours with the DiT's
checkpoint tables (`proj_in` -> `patchify_proj`, `time_embed` -> `adaln_single`, ...).
"""

from __future__ import annotations

from diffsynth.runtime.lora import LoRAWeights

from .dit_formats import TOP_LEVEL

CONNECTOR_PREFIXES = ("video_embeddings_connector.", "audio_embeddings_connector.", "text_embedding_projection.")
# diffusers module name -> ours, for the top-level linears (block modules keep their names)
_DIFFUSERS_MODULES = {
    theirs.removesuffix(".weight"): ours.removesuffix(".weight")
    for ours, theirs in TOP_LEVEL.items()
    if ours.endswith(".weight") and ours != theirs
}


def dit_module_name(name: str) -> str:
    """Our DiT module for a LoRA target read from a file (diffusers top-level names renamed, others kept)."""
    return _DIFFUSERS_MODULES.get(name, name)


def split_lora(lora: LoRAWeights) -> dict[str, LoRAWeights]:
    """The LoRA's targets by pipeline slot ("dit", "connectors"), in our module names; slots it does not
    touch are absent."""
    parts: dict[str, dict] = {}
    for name, target in lora.targets.items():
        slot = "connectors" if name.startswith(CONNECTOR_PREFIXES) else "dit"
        parts.setdefault(slot, {})[name if slot == "connectors" else dit_module_name(name)] = target
    return {
        slot: LoRAWeights(targets=targets, source=lora.source, skipped=list(lora.skipped))
        for slot, targets in parts.items()
    }


__all__ = ["CONNECTOR_PREFIXES", "dit_module_name", "split_lora"]
