"""How Qwen-Image ControlNet checkpoints are recognised and configured.

The released nets (InstantX/Qwen-Image-ControlNet-Union, InstantX/Qwen-Image-ControlNet-Inpainting) are
diffusers `QwenImageControlNetModel` files: the DiT's front in the DiT's names (`time_text_embed.*`,
`txt_norm`, `img_in`, `txt_in`, `transformer_blocks.N.*`) and the ControlNet part (`controlnet_blocks.N`,
`controlnet_x_embedder`), which are our module names too, so they load as they are. Sizes come from the
shapes (the inpainting net's extra condition channels from `controlnet_x_embedder`'s input width); the
RoPE axes and patch size from the `config.json` beside the file, or the released values.
"""

from __future__ import annotations

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.registry import KeyLayout, ModelSpec, StateDict, build_config, merge_fields

from .controlnet import QwenImageControlNet, QwenImageControlNetConfig

SIGNATURE = (
    "time_text_embed.timestep_embedder.linear_1.weight",
    "txt_norm.weight",
    "img_in.weight",
    "txt_in.weight",
    "transformer_blocks.0.attn.add_q_proj.weight",
    "controlnet_blocks.0.weight",
    "controlnet_x_embedder.weight",
)
LAYOUTS = (KeyLayout("diffusers", SIGNATURE),)

# diffusers QwenImageControlNetModel.__init__ defaults: what a config.json without a key means
DIFFUSERS_DEFAULTS = {
    "patch_size": 2,
    "in_channels": 64,
    "num_layers": 60,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 3584,
    "axes_dims_rope": (16, 56, 56),
    "extra_condition_channels": 0,
}
# `out_channels` is in the files' config.json but the ControlNet has no output head: not read


def fields_from_json(config_json: dict, defaults: bool = True) -> dict:
    """Our config fields (diffusers' names) from a `QwenImageControlNetModel` config.json; with `defaults`
    diffusers' defaults fill the keys it lacks (a json-only build), without only its own keys are read."""
    given = {k: v for k, v in config_json.items() if k in DIFFUSERS_DEFAULTS and v is not None}
    fields = {**(DIFFUSERS_DEFAULTS if defaults else {}), **given}
    if "axes_dims_rope" in fields:
        fields["axes_dims_rope"] = tuple(fields["axes_dims_rope"])
    return fields


def _fields_from_shapes(state: StateDict) -> dict:
    inner, in_channels = state["img_in.weight"].shape
    head_dim = state["transformer_blocks.0.attn.norm_q.weight"].shape[0]
    n = 0
    while f"transformer_blocks.{n}.img_mod.1.weight" in state:
        n += 1
    cond = state["controlnet_x_embedder.weight"].shape[1]
    if cond < in_channels:
        raise ConfigError(
            f"Qwen-Image ControlNet controlnet_x_embedder takes {cond} features, fewer than img_in's {in_channels}"
        )
    return dict(
        in_channels=in_channels,
        extra_condition_channels=cond - in_channels,
        num_layers=n,
        attention_head_dim=head_dim,
        num_attention_heads=inner // head_dim,
        joint_attention_dim=state["txt_in.weight"].shape[1],
    )


def config_from_state(state: StateDict, config_json: dict | None = None) -> QwenImageControlNetConfig:
    """Config from our-named shapes and, when present, the diffusers `config.json` beside the file.

    Shapes give widths, heads (from the QK-norm width), the block count and the extra condition
    channels; the patch size and RoPE axes come from the json or the released values. A json value
    contradicting the shapes is an error naming the field. Without shapes the json is read with
    diffusers' defaults for the keys it lacks.
    """
    given = fields_from_json(config_json, defaults=not state) if config_json else {}
    derived = _fields_from_shapes(state) if state else {}
    fields = merge_fields("Qwen-Image ControlNet", given, derived)
    return build_config(QwenImageControlNetConfig, "Qwen-Image ControlNet", fields)


CONTROLNET_SPEC = ModelSpec(
    name="qwen_image_controlnet",
    role="controlnet",
    layouts=LAYOUTS,
    config_from_state=config_from_state,
    build=QwenImageControlNet,
    description="Qwen-Image ControlNet (diffusers QwenImageControlNetModel files: InstantX Union, Inpainting)",
)
