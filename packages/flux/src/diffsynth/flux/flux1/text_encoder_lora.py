"""The text-encoder part of a FLUX.1 LoRA file: CLIP-L's and T5-XXL's entries, for those two models.

kohya's FLUX.1 LoRAs (sd-scripts, `--network_train_unet_only` off) carry besides `lora_unet_*` the CLIP-L layers as
`lora_te1_text_model_encoder_layers_0_self_attn_q_proj.*` and T5-XXL's as `lora_te3_encoder_block_0_layer_0_
SelfAttention_q.*` (the names ComfyUI reads); diffusers writes CLIP-L's as `text_encoder.text_model.encoder.layers.
0.self_attn.q_proj.lora_A.weight` (and a T5 part, where a tool writes one, under `text_encoder_2.`). Our encoders
are transformers' `CLIPTextModel` (without its `text_model.` level) and `T5EncoderModel`, so the names resolve
once the prefix is taken off; any kind of change the runtime reads comes along (LoRA, LoHa / LoKr, DoRA).
The DiT's reader skips these entries (`diffsynth.runtime.lora`); `FluxImagePipeline.apply_lora` gives them here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from diffsynth.runtime.lora import LoRAWeights, read_lora, read_lora_state

# key prefix -> (pipeline slot, what follows it that our module names leave out)
PREFIXES = {
    "lora_te1_": ("text_encoder_1", "text_model_"),
    "lora_te3_": ("text_encoder_2", ""),
    "text_encoder.": ("text_encoder_1", "text_model."),
    "text_encoder_2.": ("text_encoder_2", ""),
}


def text_encoder_loras(
    path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor] | LoRAWeights,
) -> dict[str, LoRAWeights]:
    """The file's text-encoder LoRAs by pipeline slot ("text_encoder_1": CLIP-L, "text_encoder_2": T5), names as
    read (dotted, or kohya-underscored for `resolve_lora` to match); empty for `LoRAWeights` (already a DiT's)
    and for files without such entries."""
    if isinstance(path_or_state_dict, LoRAWeights):
        return {}
    state, source = read_lora_state(path_or_state_dict)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        for prefix, (slot, inner) in PREFIXES.items():
            if key.startswith(prefix):
                rest = key[len(prefix) :]
                parts.setdefault(slot, {})[rest.removeprefix(inner)] = value
                break
    return {slot: read_lora(part, source=f"{source} ({slot})") for slot, part in parts.items()}


__all__ = ["PREFIXES", "text_encoder_loras"]
