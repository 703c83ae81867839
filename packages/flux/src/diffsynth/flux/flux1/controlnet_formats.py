"""How FLUX.1 ControlNet checkpoints are recognised, converted and configured.

The released nets (InstantX FLUX.1-dev-Controlnet-Union(-alpha), alimama-creative
FLUX.1-dev-Controlnet-Inpainting-Beta, jasperai Flux.1-dev-Controlnet-Upscaler, and the other
InstantX/Shakker nets) are diffusers `FluxControlNetModel` files: the DiT part in diffusers names
(`x_embedder`, `context_embedder`, `time_text_embed.*`, `transformer_blocks.N.*`,
`single_transformer_blocks.N.*`), converted by the DiT's tables (`formats.py`), and the ControlNet
part (`controlnet_x_embedder`, `controlnet_blocks.N`, `controlnet_single_blocks.N`,
`controlnet_mode_embedder`), whose names we keep. Our own state dicts load as they are.
XLabs-style nets with an `input_hint_block` (pixel-space condition) are not supported.
"""

from __future__ import annotations

import torch

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.registry import KeyLayout, ModelSpec, StateDict, build_config, merge_fields

from ..key_tables import count_blocks
from . import formats as dit_formats
from .controlnet import Flux1ControlNet, Flux1ControlNetConfig

OWN_PREFIXES = (
    "controlnet_x_embedder.",
    "controlnet_blocks.",
    "controlnet_single_blocks.",
    "controlnet_mode_embedder.",
)
UNSUPPORTED_PREFIXES = ("input_hint_block.",)


def _split(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    own = {k: v for k, v in state.items() if k.startswith(OWN_PREFIXES)}
    return own, {k: v for k, v in state.items() if k not in own}


def diffusers_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers `FluxControlNetModel` state dict in our names (the DiT part renamed, the rest kept).

    Raises `KeyError` naming the first key without a mapping.
    """
    hint = [k for k in state if k.startswith(UNSUPPORTED_PREFIXES)]
    if hint:
        raise KeyError(
            f"{hint[0]} (XLabs-style ControlNet with an input_hint_block, which the FLUX.1 ControlNet does not take)"
        )
    own, shared = _split(state)
    try:
        converted = dit_formats.diffusers_to_ours(shared)
    except KeyError as exc:
        raise KeyError(str(exc.args[0]).replace("FLUX.1 DiT", "FLUX.1 ControlNet")) from None
    return {**converted, **own}


def ours_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our names -> diffusers `FluxControlNetModel` names; the exact inverse of `diffusers_to_ours`."""
    own, shared = _split(state)
    try:
        converted = dit_formats.ours_to_diffusers(shared)
    except KeyError as exc:
        raise KeyError(str(exc.args[0]).replace("FLUX.1 DiT", "FLUX.1 ControlNet")) from None
    return {**converted, **own}


DIFFUSERS_SIGNATURE = (
    "x_embedder.weight",
    "context_embedder.weight",
    "time_text_embed.timestep_embedder.linear_1.weight",
    "time_text_embed.text_embedder.linear_1.weight",
    "controlnet_x_embedder.weight",
)
OURS_SIGNATURE = (
    "img_in.weight",
    "txt_in.weight",
    "time_in.in_layer.weight",
    "vector_in.in_layer.weight",
    "controlnet_x_embedder.weight",
)
LAYOUTS = (
    KeyLayout("diffusers", DIFFUSERS_SIGNATURE, convert=diffusers_to_ours),
    KeyLayout("ours", OURS_SIGNATURE),
)

# diffusers FluxControlNetModel.__init__ defaults: what a config.json without a key means.
DIFFUSERS_DEFAULTS = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": False,
    "axes_dims_rope": (16, 56, 56),
    "num_mode": None,
    "conditioning_embedding_channels": None,
}


# ----------------------------------------------------------------------------------- config


def _fields_from_shapes(state: StateDict) -> dict:
    hidden, in_channels = state["img_in.weight"].shape
    depth = count_blocks(state, "double_blocks.{}.img_attn.qkv.weight")
    single = count_blocks(state, "single_blocks.{}.linear1.weight")
    fields = dict(
        in_channels=in_channels,
        cond_in_channels=state["controlnet_x_embedder.weight"].shape[1],
        vec_in_dim=state["vector_in.in_layer.weight"].shape[1],
        context_in_dim=state["txt_in.weight"].shape[1],
        hidden_size=hidden,
        depth=depth,
        depth_single_blocks=single,
        guidance_embed="guidance_in.in_layer.weight" in state,
        num_modes=state["controlnet_mode_embedder.weight"].shape[0]
        if "controlnet_mode_embedder.weight" in state
        else None,
    )
    norm = "double_blocks.0.img_attn.norm.query_norm.scale" if depth else "single_blocks.0.norm.query_norm.scale"
    if norm in state:
        fields["num_heads"] = hidden // state[norm].shape[0]
    if depth:
        fields["mlp_ratio"] = state["double_blocks.0.img_mlp.0.weight"].shape[0] / hidden
        fields["qkv_bias"] = "double_blocks.0.img_attn.qkv.bias" in state
    elif single:
        fields["mlp_ratio"] = (state["single_blocks.0.linear1.weight"].shape[0] - 3 * hidden) / hidden
    return fields


def fields_from_json(config_json: dict, defaults: bool = True) -> dict:
    """Our config fields from a diffusers `FluxControlNetModel` config.json.

    With `defaults`, diffusers' defaults fill the keys the json lacks (a json-only build); without,
    only the keys it has are read (the shapes decide the rest).
    """
    cfg = {**(DIFFUSERS_DEFAULTS if defaults else {}), **{k: v for k, v in config_json.items() if v is not None}}
    if cfg.get("patch_size", 1) != 1:
        raise ConfigError(f"config.json patch_size={cfg['patch_size']}: FLUX.1 ControlNets take packed tokens (1)")
    if cfg.get("conditioning_embedding_channels") is not None:
        raise ConfigError(
            f"config.json conditioning_embedding_channels={cfg['conditioning_embedding_channels']}: ControlNets "
            "with an input_hint_block (XLabs-style, pixel-space condition) are not supported"
        )
    names = {
        "in_channels": "in_channels",
        "pooled_projection_dim": "vec_in_dim",
        "joint_attention_dim": "context_in_dim",
        "num_attention_heads": "num_heads",
        "num_layers": "depth",
        "num_single_layers": "depth_single_blocks",
        "guidance_embeds": "guidance_embed",
        "num_mode": "num_modes",
    }
    fields = {ours: cfg[name] for name, ours in names.items() if name in cfg}
    if "num_mode" not in config_json and defaults:
        fields["num_modes"] = None  # diffusers: no num_mode, no union
    if "guidance_embed" in fields:
        fields["guidance_embed"] = bool(fields["guidance_embed"])
    if "axes_dims_rope" in cfg:
        fields["axes_dim"] = tuple(cfg["axes_dims_rope"])
    if "attention_head_dim" in cfg and "num_heads" in fields:
        fields["hidden_size"] = int(cfg["attention_head_dim"]) * int(fields["num_heads"])
    if cfg.get("extra_condition_channels") is not None:  # alimama's own FluxControlNetModel class
        fields["cond_in_channels"] = int(cfg.get("in_channels", 64)) + int(cfg["extra_condition_channels"])
    return fields


def config_from_state(state: StateDict, config_json: dict | None = None) -> Flux1ControlNetConfig:
    """Config from our-named shapes and, when present, the diffusers `config.json` beside the file.

    Shapes give widths, block counts, heads, the condition width, the union mode count and whether
    there is a guidance embedder; RoPE axes come from the json or FLUX.1's. A json value
    contradicting the shapes is an error naming the field. Without shapes the json is read with
    diffusers' defaults for the keys it lacks.
    """
    given = fields_from_json(config_json, defaults=not state) if config_json else {}
    derived = _fields_from_shapes(state) if state else {}
    return build_config(Flux1ControlNetConfig, "FLUX.1 ControlNet", merge_fields("FLUX.1 ControlNet", given, derived))


FLUX1_CONTROLNET_SPEC = ModelSpec(
    name="flux1_controlnet",
    role="controlnet",
    layouts=LAYOUTS,
    config_from_state=config_from_state,
    build=Flux1ControlNet,
    description="FLUX.1 ControlNet (diffusers FluxControlNetModel files: InstantX Union, alimama inpainting, "
    "jasperai upscaler, ...)",
)
