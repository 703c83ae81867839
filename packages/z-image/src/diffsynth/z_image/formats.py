"""How Z-Image checkpoints are recognised, converted and configured.

Our DiT uses the official diffusers names (`transformer/` folder of the hub repos), so that
layout loads as is. Also accepted:

- the same keys under `model.diffusion_model.` (single-file repacks);
- the ComfyUI / Lumina "NextDiT" layout, with or without that prefix: fused
  `attention.qkv` (q, k, v stacked on dim 0), `attention.out`, `q_norm`/`k_norm`, and
  `x_embedder.` / `final_layer.` instead of the per-patch-size `all_*.2-1.` dicts.

Z-Image is told apart from Lumina-Image 2.0 (same names) by `layers.0.adaLN_modulation.0`:
Lumina puts a SiLU first, so its Linear is `adaLN_modulation.1`.

Z-Image Omni's DiT is the same layout plus `siglip_embedder.*`, `siglip_refiner.N.*` and
`siglip_pad_token` (diffusers layouts only); its SigLIP2 image encoder is `image_encoder.py`'s spec.

The Fun ControlNets (`controlnet.py`) load from the official PAI files (also what diffusers'
`ZImageControlNetModel` saves): `control_layers.N.*`, `control_all_x_embedder.P-F.*`,
`control_noise_refiner.N.*`, our names as they are. A file that also holds the DiT (VideoX-Fun's whole
control transformer) gives both models.
"""

from __future__ import annotations

import re

import torch

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.registry import Family, KeyLayout, ModelSpec, StateDict, build_config, merge_fields

from .controlnet import RELEASED_PLACES, ZImageControlNet, ZImageControlNetConfig
from .dit import ZImageDiT, ZImageDiTConfig
from .image_encoder import IMAGE_ENCODER_SPEC

PREFIX = "model.diffusion_model."
_BLOCK_GROUPS = ("noise_refiner", "context_refiner", "layers")
_BLOCK_KEY = re.compile(r"^(noise_refiner|context_refiner|layers)\.(\d+)\.(.+)$")

# ComfyUI/Lumina layout -> ours. Block entries are templates: `{}` is the block index.
_COMFY_TOP = {
    "x_pad_token": "x_pad_token",
    "cap_pad_token": "cap_pad_token",
    "x_embedder.weight": "all_x_embedder.2-1.weight",
    "x_embedder.bias": "all_x_embedder.2-1.bias",
    "final_layer.linear.weight": "all_final_layer.2-1.linear.weight",
    "final_layer.linear.bias": "all_final_layer.2-1.linear.bias",
    "final_layer.adaLN_modulation.1.weight": "all_final_layer.2-1.adaLN_modulation.1.weight",
    "final_layer.adaLN_modulation.1.bias": "all_final_layer.2-1.adaLN_modulation.1.bias",
    "t_embedder.mlp.0.weight": "t_embedder.mlp.0.weight",
    "t_embedder.mlp.0.bias": "t_embedder.mlp.0.bias",
    "t_embedder.mlp.2.weight": "t_embedder.mlp.2.weight",
    "t_embedder.mlp.2.bias": "t_embedder.mlp.2.bias",
    "cap_embedder.0.weight": "cap_embedder.0.weight",
    "cap_embedder.1.weight": "cap_embedder.1.weight",
    "cap_embedder.1.bias": "cap_embedder.1.bias",
}
_COMFY_BLOCK_PARTS = {
    "attention.out.weight": "attention.to_out.0.weight",
    "attention.q_norm.weight": "attention.norm_q.weight",
    "attention.k_norm.weight": "attention.norm_k.weight",
    "feed_forward.w1.weight": "feed_forward.w1.weight",
    "feed_forward.w2.weight": "feed_forward.w2.weight",
    "feed_forward.w3.weight": "feed_forward.w3.weight",
    "attention_norm1.weight": "attention_norm1.weight",
    "attention_norm2.weight": "attention_norm2.weight",
    "ffn_norm1.weight": "ffn_norm1.weight",
    "ffn_norm2.weight": "ffn_norm2.weight",
    "adaLN_modulation.0.weight": "adaLN_modulation.0.weight",
    "adaLN_modulation.0.bias": "adaLN_modulation.0.bias",
}
COMFY_TO_OURS: dict[str, str] = {
    **_COMFY_TOP,
    **{f"{g}.{{}}.{src}": f"{g}.{{}}.{dst}" for g in _BLOCK_GROUPS for src, dst in _COMFY_BLOCK_PARTS.items()},
}
# Fused tensors split on dim 0 into equal parts, in this order.
COMFY_FUSED: dict[str, tuple[str, ...]] = {
    f"{g}.{{}}.attention.qkv.weight": tuple(f"{g}.{{}}.attention.to_{n}.weight" for n in "qkv") for g in _BLOCK_GROUPS
}
# Keys some repacks carry that have no weights in the model (the final norm has no affine).
COMFY_IGNORED = frozenset({"norm_final.weight", "final_layer.norm_final.weight"})


def _template(key: str) -> tuple[str, list[int]]:
    m = _BLOCK_KEY.match(key)
    if m is None:
        return key, []
    return f"{m.group(1)}.{{}}.{m.group(3)}", [int(m.group(2))]


def comfy_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a ComfyUI/Lumina-layout Z-Image state dict (prefix stripped) to our names.

    Raises `KeyError` naming the first key that has no mapping.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        template, index = _template(key)
        if template in COMFY_TO_OURS:
            out[COMFY_TO_OURS[template].format(*index)] = value
        elif template in COMFY_FUSED:
            targets = COMFY_FUSED[template]
            for target, part in zip(targets, value.chunk(len(targets), dim=0), strict=True):
                out[target.format(*index)] = part
        elif key not in COMFY_IGNORED:
            raise KeyError(f"Z-Image DiT (ComfyUI/Lumina layout): no mapping for key {key!r}")
    return out


DIFFUSERS_SIGNATURE = (
    "x_pad_token",
    "cap_pad_token",
    "cap_embedder.1.weight",
    "t_embedder.mlp.0.weight",
    "noise_refiner.0.adaLN_modulation.0.weight",
    "context_refiner.0.attention.to_q.weight",
    "layers.0.attention.to_q.weight",
    "layers.0.adaLN_modulation.0.weight",
)
COMFY_SIGNATURE = (
    "x_pad_token",
    "cap_pad_token",
    "x_embedder.weight",
    "final_layer.linear.weight",
    "cap_embedder.1.weight",
    "noise_refiner.0.adaLN_modulation.0.weight",
    "layers.0.attention.qkv.weight",
    "layers.0.adaLN_modulation.0.weight",
)
_OWNS_DIFFUSERS = (
    "x_pad_token",
    "cap_pad_token",
    "all_x_embedder.",
    "all_final_layer.",
    "t_embedder.",
    "cap_embedder.",
    *(f"{g}." for g in _BLOCK_GROUPS),
    "siglip_embedder.",  # Z-Image Omni
    "siglip_refiner.",
    "siglip_pad_token",
)
_OWNS_COMFY = (
    "x_pad_token",
    "cap_pad_token",
    "x_embedder.",
    "final_layer.",
    "norm_final.",
    "t_embedder.",
    "cap_embedder.",
    *(f"{g}." for g in _BLOCK_GROUPS),
)

LAYOUTS = (
    KeyLayout("diffusers", DIFFUSERS_SIGNATURE, owns_prefixes=_OWNS_DIFFUSERS),
    KeyLayout("diffusers_prefixed", DIFFUSERS_SIGNATURE, prefix=PREFIX),
    KeyLayout("comfyui", COMFY_SIGNATURE, convert=comfy_to_ours, owns_prefixes=_OWNS_COMFY),
    KeyLayout("comfyui_prefixed", COMFY_SIGNATURE, prefix=PREFIX, convert=comfy_to_ours),
)


# ----------------------------------------------------------------------------------- config
_JSON_FIELDS = {  # diffusers config.json name -> ours
    "in_channels": "in_channels",
    "dim": "dim",
    "n_layers": "n_layers",
    "n_refiner_layers": "n_refiner_layers",
    "n_heads": "n_heads",
    "n_kv_heads": "n_kv_heads",
    "norm_eps": "norm_eps",
    "qk_norm": "qk_norm",
    "cap_feat_dim": "cap_feat_dim",
    "siglip_feat_dim": "siglip_feat_dim",
    "rope_theta": "rope_theta",
    "t_scale": "t_scale",
    "axes_dims": "axes_dims",
    "axes_lens": "axes_lens",
}
_EMBEDDER_KEY = re.compile(r"^all_x_embedder\.(\d+)-(\d+)\.weight$")


def _fields_from_json(config_json: dict) -> dict:
    given = {ours: config_json[name] for name, ours in _JSON_FIELDS.items() if config_json.get(name) is not None}
    for name, ours in (("all_patch_size", "patch_size"), ("all_f_patch_size", "f_patch_size")):
        sizes = config_json.get(name)
        if sizes is None:
            continue
        sizes = list(sizes) if isinstance(sizes, (list, tuple)) else [sizes]
        if len(sizes) != 1:
            raise ConfigError(f"config.json {name}={sizes}: only single-patch-size Z-Image models are supported")
        given[ours] = int(sizes[0])
    for name in ("axes_dims", "axes_lens"):
        if name in given:
            given[name] = tuple(given[name])
    return given


def _count(state: StateDict, group: str) -> int:
    n = 0
    while f"{group}.{n}.attention.to_q.weight" in state:
        n += 1
    return n


def _fields_from_shapes(state: StateDict) -> dict:
    embedders = [m for k in state if (m := _EMBEDDER_KEY.match(k))]
    if len(embedders) != 1:
        raise ConfigError(
            f"Z-Image DiT checkpoint has {len(embedders)} `all_x_embedder.P-F.weight` entries; expected exactly 1"
        )
    patch, f_patch = int(embedders[0].group(1)), int(embedders[0].group(2))
    dim, patch_dim = state[embedders[0].group(0)].shape
    fields = dict(
        patch_size=patch,
        f_patch_size=f_patch,
        in_channels=patch_dim // (patch * patch * f_patch),
        dim=dim,
        n_layers=_count(state, "layers"),
        n_refiner_layers=_count(state, "noise_refiner"),
        qk_norm="layers.0.attention.norm_q.weight" in state,
        cap_feat_dim=state["cap_embedder.1.weight"].shape[1],
        # Z-Image Omni: its SigLIP embedder gives the feature width
        siglip_feat_dim=state["siglip_embedder.1.weight"].shape[1] if "siglip_embedder.1.weight" in state else None,
    )
    if fields["qk_norm"]:
        fields["n_heads"] = dim // state["layers.0.attention.norm_q.weight"].shape[0]
        fields["n_kv_heads"] = fields["n_heads"]
    return fields


def config_from_state(state: StateDict, config_json: dict | None = None) -> ZImageDiTConfig:
    """Config from our-named shapes and, when present, the diffusers `config.json` beside the file.

    Shapes give patch sizes (from the embedder's name), widths, layer counts and the head count
    (from the QK-norm width); RoPE, eps and time scale come from the json or the released
    defaults. A json value that contradicts the shapes is an error naming the field. An empty
    `state` uses the json alone.
    """
    given = _fields_from_json(config_json) if config_json else {}
    derived = _fields_from_shapes(state) if state else {}
    return build_config(ZImageDiTConfig, "Z-Image DiT", merge_fields("Z-Image DiT", given, derived))


DIT_SPEC = ModelSpec(
    name="z_image_dit",
    role="dit",
    layouts=LAYOUTS,
    config_from_state=config_from_state,
    build=ZImageDiT,
    description="Z-Image / Z-Image-Turbo / Z-Image-Omni DiT (diffusers `transformer/` folder, prefixed and "
    "ComfyUI single files; Omni in the diffusers layouts)",
)

# ----------------------------------------------------------------------------------- ControlNet
CONTROLNET_SIGNATURE = (
    "control_layers.0.before_proj.weight",
    "control_layers.0.after_proj.weight",
    "control_layers.0.attention.to_q.weight",
    "control_layers.0.adaLN_modulation.0.weight",
)
CONTROLNET_LAYOUTS = (
    KeyLayout(
        "pai",
        CONTROLNET_SIGNATURE,
        owns_prefixes=("control_layers.", "control_all_x_embedder.", "control_noise_refiner."),
    ),
)
_CONTROL_EMBEDDER_KEY = re.compile(r"^control_all_x_embedder\.(\d+)-(\d+)\.weight$")
# diffusers ZImageControlNetModel config.json fields with our meaning (n_refiner_layers: see below)
_CONTROL_JSON_FIELDS = ("control_in_dim", "dim", "n_heads", "norm_eps", "qk_norm")


def _controlnet_fields_from_json(config_json: dict, json_only: bool) -> dict:
    given = {name: config_json[name] for name in _CONTROL_JSON_FIELDS if config_json.get(name) is not None}
    for name in ("control_layers_places", "control_refiner_layers_places"):
        if config_json.get(name) is not None:
            given[name] = tuple(config_json[name])
    if "add_control_noise_refiner" in config_json:  # null is a value here (1.0)
        given["add_control_noise_refiner"] = config_json["add_control_noise_refiner"]
    for name, ours in (("all_patch_size", "patch_size"), ("all_f_patch_size", "f_patch_size")):
        sizes = config_json.get(name)
        if sizes is not None:
            sizes = list(sizes) if isinstance(sizes, (list, tuple)) else [sizes]
            if len(sizes) != 1:
                raise ConfigError(f"config.json {name}={sizes}: only single-patch-size ControlNets are supported")
            given[ours] = int(sizes[0])
    heads, kv = config_json.get("n_heads"), config_json.get("n_kv_heads")
    if heads is not None and kv is not None and kv != heads:
        raise ConfigError(f"config.json n_kv_heads={kv} must equal n_heads={heads}")
    if json_only and config_json.get("n_refiner_layers") is not None:
        # diffusers' n_refiner_layers is the DiT's; it builds no refiner blocks for 2.0 ("control_layers")
        mode = given.get("add_control_noise_refiner", "control_noise_refiner")
        given["n_refiner_layers"] = 0 if mode == "control_layers" else int(config_json["n_refiner_layers"])
    return given


def _controlnet_fields_from_shapes(state: StateDict) -> dict:
    embedders = [m for k in state if (m := _CONTROL_EMBEDDER_KEY.match(k))]
    if len(embedders) != 1:
        raise ConfigError(
            f"Z-Image ControlNet has {len(embedders)} `control_all_x_embedder.P-F.weight` entries; expected exactly 1"
        )
    patch, f_patch = int(embedders[0].group(1)), int(embedders[0].group(2))
    dim, patch_dim = state[embedders[0].group(0)].shape
    refiner = _count(state, "control_noise_refiner")
    fields = dict(
        patch_size=patch,
        f_patch_size=f_patch,
        control_in_dim=patch_dim // (patch * patch * f_patch),
        dim=dim,
        n_refiner_layers=refiner,
        qk_norm="control_layers.0.attention.norm_q.weight" in state,
    )
    if fields["qk_norm"]:
        fields["n_heads"] = dim // state["control_layers.0.attention.norm_q.weight"].shape[0]
    # 2.0 and 2.1 have the same shapes (the loaded values tell them apart); these two cases shapes decide
    if refiner == 0:
        fields["add_control_noise_refiner"] = "control_layers"  # a diffusers-saved 2.0 net
    elif "control_noise_refiner.0.before_proj.weight" not in state:
        fields["add_control_noise_refiner"] = None  # 1.0: plain refiner blocks
    return fields


def controlnet_config_from_state(state: StateDict, config_json: dict | None = None) -> ZImageControlNetConfig:
    """Config from the file's shapes and, when present, a diffusers `config.json` beside it.

    Shapes give widths, heads, patch, the condition channels and the refiner variant where shapes
    can tell it; which DiT layers the control layers follow is not in the file: a `config.json`
    gives it, else the released nets' rule for their layer count (`RELEASED_PLACES`).
    """
    given = _controlnet_fields_from_json(config_json, json_only=not state) if config_json else {}
    fields = merge_fields("Z-Image ControlNet", given, _controlnet_fields_from_shapes(state) if state else {})
    n = _count(state, "control_layers") if state else None
    if "control_layers_places" not in fields:
        if n not in RELEASED_PLACES:
            raise ConfigError(
                f"Z-Image ControlNet with {n} control layers: which DiT layers they follow is known only for the "
                f"released nets ({sorted(RELEASED_PLACES)} layers); give control_layers_places in a config.json "
                "beside the file"
            )
        fields["control_layers_places"] = RELEASED_PLACES[n]
    elif n is not None and len(fields["control_layers_places"]) != n:
        raise ConfigError(
            f"Z-Image ControlNet config.json control_layers_places={list(fields['control_layers_places'])} names "
            f"{len(fields['control_layers_places'])} layers but the file has {n}"
        )
    if "control_refiner_layers_places" not in fields:
        mode = fields.get("add_control_noise_refiner", "control_noise_refiner")
        refiner = fields.get("n_refiner_layers", 2)
        fields["control_refiner_layers_places"] = (
            () if mode is None else tuple(range(refiner if mode == "control_noise_refiner" else 2))
        )
    return build_config(ZImageControlNetConfig, "Z-Image ControlNet", fields)


CONTROLNET_SPEC = ModelSpec(
    name="z_image_controlnet",
    role="controlnet",
    layouts=CONTROLNET_LAYOUTS,
    config_from_state=controlnet_config_from_state,
    build=ZImageControlNet,
    description="Z-Image-Turbo Fun ControlNet Union 1.0 / 2.0 / 2.1 (alibaba-pai, PAI; VideoX-Fun)",
)

from .presets import PRESETS  # noqa: E402  (presets import nothing from here; kept last on purpose)

FAMILY = Family(
    name="z_image",
    specs=(DIT_SPEC, CONTROLNET_SPEC, IMAGE_ENCODER_SPEC),
    presets=PRESETS,
    pipeline="diffsynth.z_image.pipeline:ZImagePipeline",
    training="diffsynth.z_image.training:ZImageTrainingTask",
    lora_converter="diffsynth.z_image.lora:convert_z_image_naming",
    description="Z-Image-Turbo, Z-Image and Z-Image-Omni (Tongyi-MAI): 6B single-stream DiT, Qwen3-4B text encoder, "
    "FLUX.1 VAE; Omni adds a SigLIP2 image encoder for editing",
)

from .image_to_lora import I2L_SPEC  # noqa: E402
from .presets import I2L_PRESETS  # noqa: E402

# Z-Image-i2L (image_to_lora.py): its own pipeline, which loads the encoders and the i2L model only. Registered
# once the package's entry point names FAMILIES; ZImageI2LPipeline needs no registration (it names its specs).
I2L_FAMILY = Family(
    name="z_image_i2l",
    specs=(I2L_SPEC,),
    presets=I2L_PRESETS,
    pipeline="diffsynth.z_image.image_to_lora:ZImageI2LPipeline",
    description="Z-Image-i2L: style LoRAs for Z-Image made from images (SigLIP2-G384 + DINOv3-7B features)",
)

FAMILIES = (FAMILY, I2L_FAMILY)
