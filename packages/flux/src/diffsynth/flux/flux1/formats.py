"""How FLUX.1 DiT checkpoints are recognised, converted and configured.

Our module names are BFL's originals (`flux1-dev.safetensors`, `flux1-kontext-dev.safetensors`,
Krea, schnell, and the FLUX.1 Tools `flux1-fill-dev` / `-canny-dev` / `-depth-dev`, whose wider `img_in`
sets `in_channels` 384 / 128 from its shape), so that layout loads as is. Also accepted:

- the same keys under `model.diffusion_model.` (ComfyUI single files);
- the diffusers `transformer/` folder: renamed through tables, plus a few fused-tensor rules:
  `to_q/to_k/to_v` (and `add_*_proj`) stack into `qkv`; single blocks' `to_q/to_k/to_v` and
  `proj_mlp` stack into `linear1`; `norm_out.linear` stores (scale, shift) where BFL's
  `final_layer.adaLN_modulation.1` stores (shift, scale), so its halves are swapped.

`ours_to_diffusers` is the exact inverse (used by tests and for writing diffusers layouts).
"""

from __future__ import annotations

import torch

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.registry import ModelSpec, StateDict, build_config, merge_fields

from ..dit_formats import (
    JSON_FIELDS,
    OWNS_DIFFUSERS,
    OWNS_ORIGINAL,
    dit_layouts,
    fields_from_json,
    fields_from_shapes,
)
from ..key_tables import DiffusersKeyTables, template
from .dit import Flux1DiT, Flux1DiTConfig

PREFIX = "model.diffusion_model."

# diffusers -> ours, for `.weight` and `.bias` alike (suffix appended). `{}` is the block index.
_TOP = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "proj_out": "final_layer.linear",
}
_DOUBLE = {
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
}
_SINGLE = {"norm.linear": "modulation.lin", "proj_out": "linear2"}
_NORMS = {  # weight -> scale
    "transformer_blocks.{}.attn.norm_q.weight": "double_blocks.{}.img_attn.norm.query_norm.scale",
    "transformer_blocks.{}.attn.norm_k.weight": "double_blocks.{}.img_attn.norm.key_norm.scale",
    "transformer_blocks.{}.attn.norm_added_q.weight": "double_blocks.{}.txt_attn.norm.query_norm.scale",
    "transformer_blocks.{}.attn.norm_added_k.weight": "double_blocks.{}.txt_attn.norm.key_norm.scale",
    "single_transformer_blocks.{}.attn.norm_q.weight": "single_blocks.{}.norm.query_norm.scale",
    "single_transformer_blocks.{}.attn.norm_k.weight": "single_blocks.{}.norm.key_norm.scale",
}
DIFFUSERS_TO_OURS: dict[str, str] = {
    **{f"{src}.{s}": f"{dst}.{s}" for src, dst in _TOP.items() for s in ("weight", "bias")},
    **{
        f"transformer_blocks.{{}}.{src}.{s}": f"double_blocks.{{}}.{dst}.{s}"
        for src, dst in _DOUBLE.items()
        for s in ("weight", "bias")
    },
    **{
        f"single_transformer_blocks.{{}}.{src}.{s}": f"single_blocks.{{}}.{dst}.{s}"
        for src, dst in _SINGLE.items()
        for s in ("weight", "bias")
    },
    **_NORMS,
}
# Our fused tensors and the diffusers tensors stacked (dim 0, in this order) to make them.
_FUSED_PARTS = {
    "double_blocks.{}.img_attn.qkv": tuple(f"transformer_blocks.{{}}.attn.to_{n}" for n in "qkv"),
    "double_blocks.{}.txt_attn.qkv": tuple(f"transformer_blocks.{{}}.attn.add_{n}_proj" for n in "qkv"),
    "single_blocks.{}.linear1": (
        *(f"single_transformer_blocks.{{}}.attn.to_{n}" for n in "qkv"),
        "single_transformer_blocks.{}.proj_mlp",
    ),
}
OURS_FUSED: dict[str, tuple[str, ...]] = {
    f"{ours}.{s}": tuple(f"{p}.{s}" for p in parts) for ours, parts in _FUSED_PARTS.items() for s in ("weight", "bias")
}
# Stored as (scale, shift) by diffusers and (shift, scale) by BFL: halves swapped.
SWAPPED = {f"norm_out.linear.{s}": f"final_layer.adaLN_modulation.1.{s}" for s in ("weight", "bias")}


def _linear1_parts(fused: str, index: list[int], value: torch.Tensor, state) -> list[int]:
    """q, k, v of the hidden width, then the rest (the single blocks' `linear1` also holds the MLP input)."""
    if not fused.startswith("single_blocks."):
        return [value.shape[0] // 3] * 3
    hidden = state[f"single_blocks.{index[0]}.linear1.weight"].shape[1]
    return [hidden] * 3 + [value.shape[0] - 3 * hidden]


KEY_TABLES = DiffusersKeyTables("FLUX.1 DiT", DIFFUSERS_TO_OURS, OURS_FUSED, SWAPPED, split=_linear1_parts)
_template = template
diffusers_to_ours = KEY_TABLES.to_ours  # a diffusers `FluxTransformer2DModel` state dict in our (BFL) names
ours_to_diffusers = KEY_TABLES.to_diffusers  # the exact inverse


ORIGINAL_SIGNATURE = (
    "img_in.weight",
    "time_in.in_layer.weight",
    "vector_in.in_layer.weight",
    "txt_in.weight",
    "double_blocks.0.img_mod.lin.weight",
    "double_blocks.0.img_attn.qkv.weight",
    "single_blocks.0.linear1.weight",
    "final_layer.adaLN_modulation.1.weight",
)
DIFFUSERS_SIGNATURE = (
    "x_embedder.weight",
    "context_embedder.weight",
    "time_text_embed.timestep_embedder.linear_1.weight",
    "time_text_embed.text_embedder.linear_1.weight",
    "transformer_blocks.0.attn.to_q.weight",
    "single_transformer_blocks.0.proj_mlp.weight",
    "norm_out.linear.weight",
)
LAYOUTS = dit_layouts(
    ORIGINAL_SIGNATURE,
    DIFFUSERS_SIGNATURE,
    diffusers_to_ours,
    owns_original=(*OWNS_ORIGINAL, "vector_in."),
    owns_diffusers=(*OWNS_DIFFUSERS, "time_text_embed."),
    comfyui_prefix=PREFIX,
)


# ----------------------------------------------------------------------------------- config
def _fields_from_shapes(state: StateDict) -> dict:
    fields = fields_from_shapes(state, pooled=True, swiglu=False)
    if fields["depth"]:
        fields["qkv_bias"] = "double_blocks.0.img_attn.qkv.bias" in state
    return fields


def _fields_from_json(config_json: dict) -> dict:
    if config_json.get("patch_size", 1) != 1:
        raise ConfigError(f"config.json patch_size={config_json['patch_size']}: FLUX.1 DiTs take packed tokens (1)")
    return fields_from_json(config_json, {**JSON_FIELDS, "pooled_projection_dim": "vec_in_dim"})


def config_from_state(state: StateDict, config_json: dict | None = None) -> Flux1DiTConfig:
    """Config from our-named shapes and, when present, the diffusers `config.json` beside the file.

    Shapes give widths, block counts, heads (QK-norm width is head_dim), MLP ratio and whether the
    guidance embedder exists (FLUX.1-schnell has none); RoPE axes and theta come from the json or
    the released defaults. A json value contradicting the shapes is an error naming the field.
    """
    given = _fields_from_json(config_json) if config_json else {}
    derived = _fields_from_shapes(state) if state else {}
    return build_config(Flux1DiTConfig, "FLUX.1 DiT", merge_fields("FLUX.1 DiT", given, derived))


FLUX1_DIT_SPEC = ModelSpec(
    name="flux1_dit",
    role="dit",
    layouts=LAYOUTS,
    config_from_state=config_from_state,
    build=Flux1DiT,
    description="FLUX.1 DiT: dev, Krea, Kontext, schnell, Fill / Canny / Depth (wider img_in) (BFL original files, "
    "ComfyUI single files, diffusers folders)",
)
