"""How Qwen-Image DiT checkpoints are recognised and configured.

Our DiT uses the official diffusers names (`transformer/` folder of the hub repos), so that
layout loads as is; the same keys under `model.diffusion_model.` (ComfyUI single files) are
accepted too. `FAMILY` also declares the Qwen2.5-VL text encoder (`text_encoder.py`), the InstantX
ControlNets (`controlnet_formats.py`), the presets and the pipeline; the VAE is the runtime's Wan 2.1 VAE
spec, which reads Qwen's `vae/` folder (Qwen-Image-Layered's 4-channel RGBA one too: its channel count comes
from the shapes of `encoder.conv_in` / `decoder.conv_out`).

Qwen-Image-Layered's DiT has one more tensor, `time_text_embed.addition_t_embedding.weight` [2, dim]; its
`config.json` says `use_additional_t_cond` and `use_layer3d_rope`. The embedding's presence decides the first
(a json that says otherwise is an error); a file without a json (ComfyUI) gets the layer-3D RoPE with it, as
the released Layered model pairs the two.
"""

from __future__ import annotations

import logging

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.registry import Family, KeyLayout, ModelSpec, StateDict, build_config, merge_fields

from .dit import QwenImageDiT, QwenImageDiTConfig

logger = logging.getLogger(__name__)

PREFIX = "model.diffusion_model."

SIGNATURE = (
    "time_text_embed.timestep_embedder.linear_1.weight",
    "txt_norm.weight",
    "img_in.weight",
    "txt_in.weight",
    "transformer_blocks.0.img_mod.1.weight",
    "transformer_blocks.0.attn.add_q_proj.weight",
    "transformer_blocks.0.attn.norm_added_q.weight",
    "norm_out.linear.weight",
    "proj_out.weight",
)
_OWNS = ("time_text_embed.", "txt_norm.", "img_in.", "txt_in.", "transformer_blocks.", "norm_out.", "proj_out.")

LAYOUTS = (
    KeyLayout("diffusers", SIGNATURE, owns_prefixes=_OWNS),
    KeyLayout("diffusers_prefixed", SIGNATURE, prefix=PREFIX, owns_prefixes=_OWNS),
)

# diffusers config.json fields we read (same names as our config)
_JSON_FIELDS = (
    "patch_size",
    "in_channels",
    "out_channels",
    "num_layers",
    "attention_head_dim",
    "num_attention_heads",
    "joint_attention_dim",
    "guidance_embeds",
    "axes_dims_rope",
    "zero_cond_t",
    "use_additional_t_cond",
    "use_layer3d_rope",
)
ADDITIONAL_T_KEY = "time_text_embed.addition_t_embedding.weight"


def _fields_from_json(config_json: dict) -> dict:
    given = {name: config_json[name] for name in _JSON_FIELDS if config_json.get(name) is not None}
    if "axes_dims_rope" in given:
        given["axes_dims_rope"] = tuple(given["axes_dims_rope"])
    return given


def _fields_from_shapes(state: StateDict, patch_size: int) -> dict:
    inner, in_channels = state["img_in.weight"].shape
    head_dim = state["transformer_blocks.0.attn.norm_q.weight"].shape[0]
    out_dim = state["proj_out.weight"].shape[0]
    if out_dim % (patch_size * patch_size):
        raise ConfigError(f"Qwen-Image DiT proj_out has {out_dim} outputs, not a multiple of patch_size**2")
    n = 0
    while f"transformer_blocks.{n}.img_mod.1.weight" in state:
        n += 1
    return dict(
        in_channels=in_channels,
        out_channels=out_dim // (patch_size * patch_size),
        num_layers=n,
        attention_head_dim=head_dim,
        num_attention_heads=inner // head_dim,
        joint_attention_dim=state["txt_in.weight"].shape[1],
        use_additional_t_cond=ADDITIONAL_T_KEY in state,
    )


def config_from_state(state: StateDict, config_json: dict | None = None) -> QwenImageDiTConfig:
    """Config from our-named shapes and, when present, the diffusers `config.json` beside the file.

    Shapes give channels, widths, heads (from the QK-norm width) and the layer count; the patch
    size, RoPE axes, `zero_cond_t` and `use_layer3d_rope` come from the json or the released defaults
    (`use_layer3d_rope` defaults to whether the Layered embedding is there). A json value that contradicts
    the shapes is an error naming the field. An empty `state` uses the json alone.
    """
    given = _fields_from_json(config_json) if config_json else {}
    patch = int(given.get("patch_size", QwenImageDiTConfig.patch_size))
    derived = _fields_from_shapes(state, patch) if state else {}
    fields = merge_fields("Qwen-Image DiT", given, derived)
    if "use_layer3d_rope" not in given and fields.get("use_additional_t_cond"):
        logger.info("Qwen-Image DiT has the Layered additional timestep embedding: using the layer-3D RoPE")
        fields["use_layer3d_rope"] = True
    return build_config(QwenImageDiTConfig, "Qwen-Image DiT", fields)


DIT_SPEC = ModelSpec(
    name="qwen_image_dit",
    role="dit",
    layouts=LAYOUTS,
    config_from_state=config_from_state,
    build=QwenImageDiT,
    description="Qwen-Image / Qwen-Image-Edit / Qwen-Image-Layered MMDiT (diffusers `transformer/` folder, "
    "prefixed single files)",
)

from .blockwise_controlnet import BLOCKWISE_CONTROLNET_SPEC  # noqa: E402
from .controlnet_formats import CONTROLNET_SPEC  # noqa: E402
from .presets import PRESETS  # noqa: E402  (presets import nothing from here)
from .text_encoder import TEXT_ENCODER_SPEC  # noqa: E402

FAMILY = Family(
    name="qwen_image",
    specs=(DIT_SPEC, TEXT_ENCODER_SPEC, CONTROLNET_SPEC, BLOCKWISE_CONTROLNET_SPEC),
    presets=PRESETS,
    pipeline="diffsynth.qwen_image.pipeline:QwenImagePipeline",
    training="diffsynth.qwen_image.training:QwenImageTrainingTask",
    description="Qwen-Image, Qwen-Image-Edit and Qwen-Image-Layered: 20B MMDiT (60 dual-stream blocks), "
    "Qwen2.5-VL-7B text encoder",
)

from .image_to_lora import I2L_SPEC  # noqa: E402
from .presets import I2L_PRESETS  # noqa: E402
from .qwen_image21.formats import FAMILY as QWEN_IMAGE21_FAMILY  # noqa: E402

# Qwen-Image-i2L (image_to_lora.py): its own pipeline, which loads the encoders and i2L models only
I2L_FAMILY = Family(
    name="qwen_image_i2l",
    specs=(I2L_SPEC,),
    presets=I2L_PRESETS,
    pipeline="diffsynth.qwen_image.image_to_lora:QwenImageI2LPipeline",
    description="Qwen-Image-i2L: LoRAs for Qwen-Image made from images (SigLIP2-G384 + DINOv3-7B features)",
)

FAMILIES = (FAMILY, QWEN_IMAGE21_FAMILY, I2L_FAMILY)
