"""What the FLUX.1 and FLUX.2 DiT formats share: BFL's module layout and its diffusers renaming differ only
in the embedders and modulations, so the three file layouts, the shape-derived config fields and the
diffusers `config.json` reading are written once here and specialised by each generation's `formats.py`."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from diffsynth.runtime.registry import KeyLayout, StateDict

from .key_tables import count_blocks

# Top-level modules both generations have, in BFL's names and in diffusers'.
OWNS_ORIGINAL = ("img_in.", "time_in.", "guidance_in.", "txt_in.", "double_blocks.", "single_blocks.", "final_layer.")
OWNS_DIFFUSERS = (
    "x_embedder.",
    "context_embedder.",
    "transformer_blocks.",
    "single_transformer_blocks.",
    "norm_out.",
    "proj_out.",
)
# diffusers config.json field -> our config field, for the fields both generations read
JSON_FIELDS = {
    "in_channels": "in_channels",
    "out_channels": "out_channels",
    "num_layers": "depth",
    "num_single_layers": "depth_single_blocks",
    "num_attention_heads": "num_heads",
    "joint_attention_dim": "context_in_dim",
    "guidance_embeds": "guidance_embed",
    "axes_dims_rope": "axes_dim",
}


def dit_layouts(
    original_signature: tuple[str, ...],
    diffusers_signature: tuple[str, ...],
    diffusers_to_ours: Callable[[StateDict], StateDict],
    owns_original: tuple[str, ...],
    owns_diffusers: tuple[str, ...],
    comfyui_prefix: str,
) -> tuple[KeyLayout, ...]:
    """BFL's original keys, the same under ComfyUI's `comfyui_prefix`, and the diffusers folder (converted)."""
    return (
        KeyLayout("original", original_signature, owns_prefixes=owns_original),
        KeyLayout("comfyui", original_signature, prefix=comfyui_prefix, owns_prefixes=owns_original),
        KeyLayout("diffusers", diffusers_signature, convert=diffusers_to_ours, owns_prefixes=owns_diffusers),
    )


def fields_from_shapes(state: StateDict, *, pooled: bool, swiglu: bool) -> dict:
    """Widths, block counts, heads (the QK-norm width is head_dim) and MLP ratio from our-named shapes.

    `pooled`: the model has FLUX.1's pooled-text `vector_in`; `swiglu`: the MLP input projection is gated
    (twice the MLP width), as in FLUX.2.
    """
    hidden, in_channels = state["img_in.weight"].shape
    depth = count_blocks(state, "double_blocks.{}.img_attn.qkv.weight")
    single = count_blocks(state, "single_blocks.{}.linear1.weight")
    fields = dict(in_channels=in_channels, out_channels=state["final_layer.linear.weight"].shape[0])
    if pooled:
        fields["vec_in_dim"] = state["vector_in.in_layer.weight"].shape[1]
    fields.update(
        context_in_dim=state["txt_in.weight"].shape[1],
        hidden_size=hidden,
        depth=depth,
        depth_single_blocks=single,
        guidance_embed="guidance_in.in_layer.weight" in state,
    )
    norm = "double_blocks.0.img_attn.norm.query_norm.scale" if depth else "single_blocks.0.norm.query_norm.scale"
    if norm in state:
        fields["num_heads"] = hidden // state[norm].shape[0]
    gate = 2 if swiglu else 1
    if depth:
        fields["mlp_ratio"] = state["double_blocks.0.img_mlp.0.weight"].shape[0] / gate / hidden
    elif single:
        fields["mlp_ratio"] = (state["single_blocks.0.linear1.weight"].shape[0] - 3 * hidden) / gate / hidden
    return fields


def fields_from_json(config_json: Mapping, names: Mapping[str, str]) -> dict:
    """Our config fields from a diffusers `config.json` (`names`: its field -> ours), with diffusers' implicit
    values made explicit: `out_channels` None means `in_channels`; hidden size is heads x `attention_head_dim`."""
    given = {ours: config_json[name] for name, ours in names.items() if config_json.get(name) is not None}
    if "out_channels" not in given and "in_channels" in given:
        given["out_channels"] = given["in_channels"]
    if config_json.get("attention_head_dim") is not None and "num_heads" in given:
        given["hidden_size"] = int(config_json["attention_head_dim"]) * int(given["num_heads"])
    if "axes_dim" in given:
        given["axes_dim"] = tuple(given["axes_dim"])
    return given
