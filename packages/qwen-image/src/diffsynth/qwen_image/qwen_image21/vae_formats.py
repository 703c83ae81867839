"""How the Qwen-Image 2.1 VAE file is recognised and configured.

The published layout is diffusers' `AutoencoderKLQwenImage21` (`vae/diffusion_pytorch_model.safetensors` of
`Qwen/Qwen-Image-2.1`), whose keys are our module names: no conversion.

Recognition is by key names only (the registry never reads shapes to choose), and the names are those of
diffusers' Wan 2.2 VAE (`AutoencoderKLWan`, residual stages). What tells them apart by name is the fifth
stage: Wan 2.2 has four (`dim_mult` [1, 2, 4, 4]), this VAE five, so the signature asks for
`encoder.down_blocks.4`, `decoder.up_blocks.4` and the fourth upsampler. Wan 2.1 files (flat
`encoder.down_blocks.N` blocks, Qwen-Image's first VAE) and FLUX files (no RMS-norm `gamma`) lack those keys.
The runtime's Wan 2.2 diffusers layout still matches a Qwen-Image 2.1 file (its signature is a subset of
these names); both would own every key, and the loader breaks that tie in favour of the longer signature:
this one. The shapes are checked afterwards: a 5-D (video) convolution is refused with a clear error.
"""

from __future__ import annotations

import logging

from diffsynth.runtime.errors import CheckpointError, ConfigError
from diffsynth.runtime.registry import KeyLayout, ModelSpec, StateDict, build_config, merge_fields

from .vae import QwenImage21VAE, QwenImage21VAEConfig

logger = logging.getLogger(__name__)

LABEL = "Qwen-Image 2.1 VAE"
JSON_CLASS = "AutoencoderKLQwenImage21"

SIGNATURE = (
    "encoder.conv_in.weight",
    "encoder.down_blocks.0.resnets.0.norm1.gamma",
    "encoder.down_blocks.4.resnets.0.conv1.weight",
    "encoder.mid_block.attentions.0.to_qkv.weight",
    "encoder.norm_out.gamma",
    "encoder.conv_out.weight",
    "quant_conv.weight",
    "post_quant_conv.weight",
    "decoder.conv_in.weight",
    "decoder.mid_block.attentions.0.to_qkv.weight",
    "decoder.up_blocks.0.resnets.0.norm1.gamma",
    "decoder.up_blocks.3.upsampler.resample.1.weight",
    "decoder.up_blocks.4.resnets.0.conv1.weight",
    "decoder.norm_out.gamma",
    "decoder.conv_out.weight",
)
_OWNS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")

LAYOUTS = (KeyLayout("diffusers", SIGNATURE, owns_prefixes=_OWNS),)


# ----------------------------------------------------------------------------------- config
# diffusers config.json fields read as they are (their names are ours, but for the spelling of temporal)
_JSON_FIELDS = (
    "base_dim",
    "decoder_base_dim",
    "z_dim",
    "dim_mult",
    "num_res_blocks",
    "in_channels",
    "out_channels",
    "latents_mean",
    "latents_std",
)


def _fields_from_json(config_json: dict | None) -> dict:
    """Our fields from diffusers' `AutoencoderKLQwenImage21` config; values we do not implement are errors.

    Any other json (a `config.json` of another model lying beside the file) is ignored.
    """
    if not config_json:
        return {}
    name = config_json.get("_class_name")
    if name is not None and name != JSON_CLASS:
        logger.debug("ignoring config.json of %r: not a %s config", name, JSON_CLASS)
        return {}
    if config_json.get("attn_scales"):
        raise ConfigError(
            f"{LABEL} config.json attn_scales={config_json['attn_scales']!r}: attention inside the stages is not "
            "supported (the released VAE has none)"
        )
    if config_json.get("is_residual") is False:
        raise ConfigError(
            f"{LABEL} config.json is_residual=False: only the residual stages of the released VAE are supported"
        )
    if config_json.get("patch_size") not in (None, 1):
        raise ConfigError(
            f"{LABEL} config.json patch_size={config_json['patch_size']!r}: pixel patching is not supported "
            "(the released VAE has none)"
        )
    fields = {}
    for key in _JSON_FIELDS:
        value = config_json.get(key)
        if value is not None:
            fields[key] = tuple(value) if isinstance(value, list) else value
    if "base_dim" in fields and "decoder_base_dim" not in fields:
        fields["decoder_base_dim"] = fields["base_dim"]  # diffusers' None: the decoder is as wide as the encoder
    for spelling in ("temperal_downsample", "temporal_downsample"):  # diffusers' spelling, and ours
        if config_json.get(spelling) is not None:
            fields["temporal_downsample"] = tuple(bool(t) for t in config_json[spelling])
    spatial = config_json.get("scale_factor_spatial")
    if spatial is not None and "dim_mult" in fields and spatial != 2 ** (len(fields["dim_mult"]) - 1):
        raise ConfigError(
            f"{LABEL} config.json scale_factor_spatial={spatial!r} but dim_mult={list(fields['dim_mult'])} "
            f"compresses {2 ** (len(fields['dim_mult']) - 1)}x"
        )
    return fields


def _shape(state: StateDict, key: str) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(f"{LABEL} checkpoint has no {key!r}; cannot derive its config")
    return tuple(state[key].shape)


def _count(state: StateDict, template: str) -> int:
    n = 0
    while template.format(n) in state:
        n += 1
    return n


def _fields_from_shapes(state: StateDict) -> dict:
    conv_in = _shape(state, "encoder.conv_in.weight")
    if len(conv_in) != 4:
        raise ConfigError(
            f"{LABEL}: encoder.conv_in.weight has shape {list(conv_in)}, not a 2D convolution; a 5-D weight is a Wan "
            "video VAE (load it with the wan22_vae spec)"
        )
    base, in_channels = conv_in[:2]
    stages = _count(state, "encoder.down_blocks.{}.resnets.0.conv1.weight")
    if stages < 1:
        raise CheckpointError(f"{LABEL} checkpoint has no encoder.down_blocks.0.resnets.0.*; cannot derive its config")
    widths = [_shape(state, f"encoder.down_blocks.{i}.resnets.0.conv1.weight")[0] for i in range(stages)]
    if any(w % base for w in widths):
        raise CheckpointError(f"{LABEL} checkpoint: stage widths {widths} are not multiples of base_dim={base}")
    dim_mult = tuple(w // base for w in widths)
    temporal = tuple(f"encoder.down_blocks.{i}.downsampler.time_conv.weight" in state for i in range(stages - 1))
    upsampled = tuple(f"decoder.up_blocks.{i}.upsampler.time_conv.weight" in state for i in range(stages - 1))
    if upsampled != temporal[::-1]:
        raise CheckpointError(
            f"{LABEL} checkpoint: the encoder downsamples time at stages {temporal} but the decoder upsamples "
            f"it at {upsampled} (expected the reverse)"
        )
    conv_out = _shape(state, "decoder.conv_out.weight")
    return dict(
        base_dim=base,
        decoder_base_dim=conv_out[1] // dim_mult[0],
        z_dim=_shape(state, "post_quant_conv.weight")[0],
        dim_mult=dim_mult,
        num_res_blocks=_count(state, "encoder.down_blocks.0.resnets.{}.conv1.weight"),
        temporal_downsample=temporal,
        in_channels=in_channels,
        out_channels=conv_out[0],
    )


def config_from_state(state: StateDict, config_json: dict | None = None) -> QwenImage21VAEConfig:
    """Config from the (meta) tensors and diffusers' `config.json` beside them, if any.

    Shapes fix the architecture; the json adds the latent statistics (else the released ones, which exist
    for z_dim 64 only). A json value contradicting the shapes is an error naming the field. An empty
    `state` builds from the json alone.
    """
    given = _fields_from_json(config_json)
    derived = _fields_from_shapes(state) if state else {}
    return build_config(QwenImage21VAEConfig, LABEL, merge_fields(LABEL, given, derived))


QWEN_IMAGE21_VAE_SPEC = ModelSpec(
    name="qwen_image21_vae",
    role="vae",
    layouts=LAYOUTS,
    config_from_state=config_from_state,
    build=QwenImage21VAE,
    description="Qwen-Image 2.1 image VAE (RGBA, 64 channels, 16x; diffusers AutoencoderKLQwenImage21 `vae/`)",
)

__all__ = ["LAYOUTS", "QWEN_IMAGE21_VAE_SPEC", "SIGNATURE", "config_from_state"]
