"""FLUX.2 DiT LoRAs in the layouts people share, converted to our (BFL) module names.

Accepted (text-encoder entries in any of them are skipped; `diffusion_model.` / `transformer.` /
`base_model.model.` prefixes and the key suffixes are read by `diffsynth.runtime.lora`):

- BFL names: `double_blocks.0.img_attn.qkv.lora_A.weight` / `.lora_B.weight` (our trainer's default file, no
  prefix), under `diffusion_model.` (ai-toolkit, our trainer's `peft` file, with `.alpha`), or `lora_down` /
  `lora_up` / `alpha` (ComfyUI), and ComfyUI's `.diff` / `.diff_b`;
- kohya with BFL names: `lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight` / `.lora_up.weight` / `.alpha`
  (our trainer's `kohya` file, which diffusers' `Flux2Pipeline.load_lora_weights` and ComfyUI also read);
- diffusers / peft names: `transformer.transformer_blocks.0.attn.to_q.lora_A.weight`, `add_q_proj`,
  `single_transformer_blocks.0.attn.to_qkv_mlp_proj`, `ff.linear_in`, `double_stream_modulation_img.linear`,
  `norm_out.linear`, ... (diffusers' `save_lora_weights`; DiffSynth-Studio's FLUX.2 uses these names without a
  prefix), optionally with `.alpha`, also kohya-style (`lora_transformer_transformer_blocks_0_attn_to_q`) and
  with the `sformer_blocks.` spelling some exporters write for `transformer_blocks.`.

diffusers splits our fused `img_attn.qkv` / `txt_attn.qkv` into to_q, to_k, to_v (add_{q,k,v}_proj): those
parts are merged into one LoRA on the fused layer (`flux1/lora.py`: downs stacked along the rank, up
block-diagonal, zero rows for parts the file leaves out). The single blocks' `to_qkv_mlp_proj` is fused exactly
like our `linear1`, so it maps one to one. diffusers' `norm_out.linear` stores (scale, shift) where our
`final_layer.adaLN_modulation.1` stores (shift, scale), so its up rows are swapped like the weights in
`formats.py`. diffusers' own files keep their alphas in the safetensors header (`lora_adapter_metadata`), which
is read too. (diffusers 0.42 renames a BFL-named `final_layer.adaLN_modulation.1` LoRA to `norm_out.linear`
without that swap; we apply it as BFL's model and ComfyUI do.)
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import nn

from diffsynth.runtime.errors import LoRAError
from diffsynth.runtime.lora import LoRAWeights, read_lora

from ..flux1.lora import LoRANaming, convert_lora, rename_lora
from .formats import DIFFUSERS_TO_OURS, OURS_FUSED, SWAPPED, _template

FLUX2_NAMING = LoRANaming(
    model="FLUX.2 DiT",
    diffusers_to_ours=DIFFUSERS_TO_OURS,
    ours_fused=OURS_FUSED,
    swapped=SWAPPED,
    template=_template,
    aliases=(("sformer_blocks.", "transformer_blocks."),),
    accepted="BFL names (double_blocks.0.img_attn.qkv, single_blocks.0.linear1), diffusers names "
    "(transformer_blocks.0.attn.to_q, single_transformer_blocks.0.attn.to_qkv_mlp_proj) and their kohya forms "
    "(lora_unet_double_blocks_0_img_attn_qkv, lora_transformer_transformer_blocks_0_attn_to_q)",
)


def read_flux2_lora(
    path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor] | LoRAWeights, model: nn.Module
) -> LoRAWeights:
    """Read a FLUX.2 DiT LoRA in any layout above and return it targeted at `model`'s Linears (our names).

    Raises `LoRAError` naming the file and key for an entry that is no layer of the FLUX.2 DiT or does not fit
    its shape (a FLUX.1 LoRA, or one for another FLUX.2 size)."""
    lora = read_lora(path_or_state_dict)  # with diffusers' header alphas
    return convert_lora(lora, model, FLUX2_NAMING)


def convert_flux2_naming(
    path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor],
    to: str = "official",
    model: nn.Module | None = None,
) -> LoRAWeights:
    """A FLUX.2 DiT LoRA in any layout above renamed to BFL's names (`to="official"`) or diffusers'
    (`to="diffusers"`), exactly (`flux1.lora.rename_lora`). `model` gives the shapes; by default each released
    size (dev, klein-4b, klein-9b) is built on the meta device (no memory) and the first the LoRA fits is used."""
    lora = read_lora(path_or_state_dict)  # with diffusers' header alphas
    if model is not None:
        return rename_lora(convert_lora(lora, model, FLUX2_NAMING), model, FLUX2_NAMING, to)
    from .dit import Flux2DiT, Flux2DiTConfig

    first_error = None
    for variant in ("dev", "klein-4b", "klein-9b"):
        with torch.device("meta"):
            candidate = Flux2DiT(Flux2DiTConfig.variant(variant))
        try:
            converted = convert_lora(lora, candidate, FLUX2_NAMING)
        except LoRAError as exc:
            first_error = first_error or exc
            continue
        return rename_lora(converted, candidate, FLUX2_NAMING, to)
    raise LoRAError(f"{first_error} (it fits none of FLUX.2 dev, klein-4b and klein-9b either)") from None


__all__ = ["FLUX2_NAMING", "convert_flux2_naming", "read_flux2_lora"]
