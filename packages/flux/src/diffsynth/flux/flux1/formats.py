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
from diffsynth.runtime.registry import KeyLayout, ModelSpec, StateDict, build_config, merge_fields

from ..key_tables import DiffusersKeyTables, count_blocks, template
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
_OWNS_ORIGINAL = (
    "img_in.",
    "time_in.",
    "vector_in.",
    "guidance_in.",
    "txt_in.",
    "double_blocks.",
    "single_blocks.",
    "final_layer.",
)
_OWNS_DIFFUSERS = (
    "x_embedder.",
    "context_embedder.",
    "time_text_embed.",
    "transformer_blocks.",
    "single_transformer_blocks.",
    "norm_out.",
    "proj_out.",
)

LAYOUTS = (
    KeyLayout("original", ORIGINAL_SIGNATURE, owns_prefixes=_OWNS_ORIGINAL),
    KeyLayout("comfyui", ORIGINAL_SIGNATURE, prefix=PREFIX, owns_prefixes=_OWNS_ORIGINAL),
    KeyLayout("diffusers", DIFFUSERS_SIGNATURE, convert=diffusers_to_ours, owns_prefixes=_OWNS_DIFFUSERS),
)


# ----------------------------------------------------------------------------------- config
def _fields_from_shapes(state: StateDict) -> dict:
    hidden, in_channels = state["img_in.weight"].shape
    depth = count_blocks(state, "double_blocks.{}.img_attn.qkv.weight")
    single = count_blocks(state, "single_blocks.{}.linear1.weight")
    norm = "double_blocks.0.img_attn.norm.query_norm.scale" if depth else "single_blocks.0.norm.query_norm.scale"
    fields = dict(
        in_channels=in_channels,
        out_channels=state["final_layer.linear.weight"].shape[0],
        vec_in_dim=state["vector_in.in_layer.weight"].shape[1],
        context_in_dim=state["txt_in.weight"].shape[1],
        hidden_size=hidden,
        depth=depth,
        depth_single_blocks=single,
        guidance_embed="guidance_in.in_layer.weight" in state,
    )
    if norm in state:
        fields["num_heads"] = hidden // state[norm].shape[0]
    if depth:
        fields["mlp_ratio"] = state["double_blocks.0.img_mlp.0.weight"].shape[0] / hidden
        fields["qkv_bias"] = "double_blocks.0.img_attn.qkv.bias" in state
    elif single:
        fields["mlp_ratio"] = (state["single_blocks.0.linear1.weight"].shape[0] - 3 * hidden) / hidden
    return fields


def _fields_from_json(config_json: dict) -> dict:
    if config_json.get("patch_size", 1) != 1:
        raise ConfigError(f"config.json patch_size={config_json['patch_size']}: FLUX.1 DiTs take packed tokens (1)")
    names = {
        "in_channels": "in_channels",
        "out_channels": "out_channels",
        "num_layers": "depth",
        "num_single_layers": "depth_single_blocks",
        "num_attention_heads": "num_heads",
        "joint_attention_dim": "context_in_dim",
        "pooled_projection_dim": "vec_in_dim",
        "guidance_embeds": "guidance_embed",
        "axes_dims_rope": "axes_dim",
    }
    given = {ours: config_json[name] for name, ours in names.items() if config_json.get(name) is not None}
    if "out_channels" not in given and "in_channels" in given:
        given["out_channels"] = given["in_channels"]  # diffusers: out_channels None means in_channels
    if config_json.get("attention_head_dim") is not None and "num_heads" in given:
        given["hidden_size"] = int(config_json["attention_head_dim"]) * int(given["num_heads"])
    if "axes_dim" in given:
        given["axes_dim"] = tuple(given["axes_dim"])
    return given


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
