"""On-disk layouts of the FLUX.1-style `AutoencoderKL` and the conversion of the original one.

Our module names are the diffusers ones (`vae/diffusion_pytorch_model.safetensors` loads as is).
The original LDM layout (BFL `ae.safetensors`, SD `.ckpt` VAEs, ComfyUI full checkpoints under
`first_stage_model.`) differs in three ways, handled here as data plus two rules:

- names: `down.N.block.M` -> `down_blocks.N.resnets.M`, `mid.block_1` -> `mid_block.resnets.0`,
  `nin_shortcut` -> `conv_shortcut`, `norm_out` -> `conv_norm_out`, attention `q/k/v/proj_out` ->
  `to_q/to_k/to_v/to_out.0`, `norm` -> `group_norm` (tables below, `{}` = a block index);
- rule 1: the decoder's `up.N` counts from the full-resolution stage, diffusers' `up_blocks.N` from
  the latent side, so the index is reversed;
- rule 2: LDM attention projections are 1x1 convs `[C, C, 1, 1]`; ours are Linear `[C, C]`.

`config_fields` derives the config from our-named shapes and a diffusers `config.json`.
"""

from __future__ import annotations

import logging
import re

import torch

from ..errors import CheckpointError, ConfigError
from ..registry import KeyLayout, StateDict

logger = logging.getLogger(__name__)

_PARAMS = ("weight", "bias")

_LDM_RESNETS = {
    "encoder.down.{}.block.{}": "encoder.down_blocks.{}.resnets.{}",
    "encoder.mid.block_1": "encoder.mid_block.resnets.0",
    "encoder.mid.block_2": "encoder.mid_block.resnets.1",
    "decoder.mid.block_1": "decoder.mid_block.resnets.0",
    "decoder.mid.block_2": "decoder.mid_block.resnets.1",
    "decoder.up.{}.block.{}": "decoder.up_blocks.{}.resnets.{}",
}
_RESNET_PARTS = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "nin_shortcut": "conv_shortcut",
}

_LDM_ATTENTIONS = {
    "encoder.mid.attn_1": "encoder.mid_block.attentions.0",
    "decoder.mid.attn_1": "decoder.mid_block.attentions.0",
}
_ATTENTION_PARTS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}

_LDM_MODULES = {
    "encoder.conv_in": "encoder.conv_in",
    "encoder.down.{}.downsample.conv": "encoder.down_blocks.{}.downsamplers.0.conv",
    "encoder.norm_out": "encoder.conv_norm_out",
    "encoder.conv_out": "encoder.conv_out",
    "quant_conv": "quant_conv",
    "post_quant_conv": "post_quant_conv",
    "decoder.conv_in": "decoder.conv_in",
    "decoder.up.{}.upsample.conv": "decoder.up_blocks.{}.upsamplers.0.conv",
    "decoder.norm_out": "decoder.conv_norm_out",
    "decoder.conv_out": "decoder.conv_out",
}


def _expand(modules: dict[str, str], parts: dict[str, str] | None) -> dict[str, str]:
    table = {}
    for src, dst in modules.items():
        for part_src, part_dst in (parts or {"": ""}).items():
            for p in _PARAMS:
                s = f"{src}.{part_src}.{p}" if part_src else f"{src}.{p}"
                d = f"{dst}.{part_dst}.{p}" if part_dst else f"{dst}.{p}"
                table[s] = d
    return table


# Full LDM key template -> our key template (`{}` = block index, filled in order).
LDM_TO_OURS: dict[str, str] = {
    **_expand(_LDM_MODULES, None),
    **_expand(_LDM_RESNETS, _RESNET_PARTS),
    **_expand(_LDM_ATTENTIONS, _ATTENTION_PARTS),
}
_CONV_TO_LINEAR = {t for t in LDM_TO_OURS if ".attn_1." in t and t.endswith(".weight") and ".norm." not in t}
_INDEX = re.compile(r"(?<=\.)\d+(?=\.)")
_UP_INDEX = re.compile(r"decoder\.up\.(\d+)\.")


def ldm_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an LDM-layout VAE state dict (prefix already stripped) to our names.

    Raises `KeyError` naming the first key that has no mapping.
    """
    ups = [int(m.group(1)) for k in state if (m := _UP_INDEX.match(k))]
    num_up = max(ups, default=-1) + 1
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        template = _INDEX.sub("{}", key)
        target = LDM_TO_OURS.get(template)
        if target is None:
            raise KeyError(f"AutoencoderKL (LDM layout): no mapping for key {key!r}")
        indices = [int(i) for i in _INDEX.findall(key)]
        if template.startswith("decoder.up.{}."):  # rule 1
            indices[0] = num_up - 1 - indices[0]
        if template in _CONV_TO_LINEAR and value.dim() == 4:  # rule 2
            value = value.flatten(1)
        out[target.format(*indices)] = value
    return out


_OWNS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
DIFFUSERS_SIGNATURE = (
    "encoder.conv_in.weight",
    "encoder.down_blocks.0.resnets.0.conv1.weight",
    "encoder.mid_block.resnets.0.conv1.weight",
    "encoder.conv_norm_out.weight",
    "decoder.conv_in.weight",
    "decoder.mid_block.resnets.0.conv1.weight",
    "decoder.up_blocks.0.resnets.0.conv1.weight",
    "decoder.conv_norm_out.weight",
)
LDM_SIGNATURE = (
    "encoder.conv_in.weight",
    "encoder.down.0.block.0.conv1.weight",
    "encoder.mid.block_1.conv1.weight",
    "encoder.norm_out.weight",
    "decoder.conv_in.weight",
    "decoder.mid.block_1.conv1.weight",
    "decoder.up.0.block.0.conv1.weight",
    "decoder.norm_out.weight",
)

LAYOUTS = (
    KeyLayout("diffusers", DIFFUSERS_SIGNATURE, owns_prefixes=_OWNS),
    KeyLayout("ldm", LDM_SIGNATURE, convert=ldm_to_ours, owns_prefixes=_OWNS),
    KeyLayout("ldm_comfyui", LDM_SIGNATURE, prefix="first_stage_model.", convert=ldm_to_ours, owns_prefixes=_OWNS),
    KeyLayout("ldm_vae_prefix", LDM_SIGNATURE, prefix="vae.", convert=ldm_to_ours, owns_prefixes=_OWNS),
)


# ----------------------------------------------------------------------------------- config
_LATENT_NORMALISATION = {16: (0.3611, 0.1159), 4: (0.18215, 0.0)}  # FLUX.1 / Z-Image; SD 1.x-2.x
_STRUCTURAL = (
    "in_channels",
    "out_channels",
    "latent_channels",
    "block_out_channels",
    "layers_per_block",
    "use_quant_conv",
    "use_post_quant_conv",
    "mid_block_add_attention",
)
_JSON_FIELDS = (*_STRUCTURAL, "norm_num_groups", "scaling_factor", "shift_factor")


def _shape(state: StateDict, key: str) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(f"AutoencoderKL checkpoint has no {key!r}; cannot derive its config")
    return tuple(state[key].shape)


def _fields_from_shapes(state: StateDict) -> dict:
    blocks, layers = [], 0
    while f"encoder.down_blocks.{len(blocks)}.resnets.0.conv1.weight" in state:
        blocks.append(_shape(state, f"encoder.down_blocks.{len(blocks)}.resnets.0.conv1.weight")[0])
    while f"encoder.down_blocks.0.resnets.{layers}.conv1.weight" in state:
        layers += 1
    return dict(
        in_channels=_shape(state, "encoder.conv_in.weight")[1],
        out_channels=_shape(state, "decoder.conv_out.weight")[0],
        latent_channels=_shape(state, "decoder.conv_in.weight")[1],
        block_out_channels=tuple(blocks),
        layers_per_block=layers,
        use_quant_conv="quant_conv.weight" in state,
        use_post_quant_conv="post_quant_conv.weight" in state,
        mid_block_add_attention="encoder.mid_block.attentions.0.to_q.weight" in state,
    )


def config_fields(state: StateDict, config_json: dict | None = None) -> dict:
    """`AutoencoderKLConfig` keyword arguments from our-named shapes and a diffusers `config.json`.

    Without a scaling factor in the json, 16 latent channels get FLUX.1's normalisation and 4 get
    SD's (shapes cannot tell FLUX.1 from SD3, which share the architecture). A json value that
    contradicts the shapes is an error naming the field. An empty `state` uses the json alone.
    """
    given = {}
    for name in _JSON_FIELDS:
        value = (config_json or {}).get(name)
        if value is not None:  # diffusers writes `null` for "no shift"
            given[name] = tuple(value) if name == "block_out_channels" else value
    merged = dict(given)
    if state:
        derived = _fields_from_shapes(state)
        for name in _STRUCTURAL:
            if name in given and given[name] != derived[name]:
                raise ConfigError(
                    f"config.json says {name}={given[name]!r} but the checkpoint's shapes give {derived[name]!r}"
                )
        merged = {**derived, **given}
    if "scaling_factor" not in merged:
        latent = merged.get("latent_channels", 16)
        if latent not in _LATENT_NORMALISATION:
            logger.warning("AutoencoderKL with %d latent channels and no scaling_factor: using 1.0, shift 0.0", latent)
        merged["scaling_factor"], shift = _LATENT_NORMALISATION.get(latent, (1.0, 0.0))
        merged.setdefault("shift_factor", shift)
    merged.setdefault("shift_factor", 0.0)
    return merged
