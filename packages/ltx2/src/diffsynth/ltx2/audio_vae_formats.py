"""How LTX-2 audio VAE checkpoints are recognised, converted and configured.

Our names are ltx-core's, so the `audio_vae.*` part of `ltx-2-19b-dev.safetensors` (and the same keys
saved without the prefix) loads as is. diffusers' `AutoencoderKLLTX2Audio` (`audio_vae/` folders) keeps
every module name and only renames the statistics:

| ours (ltx-core) | diffusers |
|---|---|
| per_channel_statistics.mean-of-means | latents_mean |
| per_channel_statistics.std-of-means | latents_std |

Shapes fix the widths, stage count, block count and latent channels; the mel bins follow from the
statistics' length (latent channels x mel bins / 4). A diffusers `config.json` adds causality and the
mel settings; a value contradicting the shapes is an error naming the field.
"""

from __future__ import annotations

import logging
import re

import torch

from diffsynth.runtime.errors import CheckpointError, ConfigError
from diffsynth.runtime.registry import KeyLayout, ModelSpec, StateDict, build_config, merge_fields

from .audio_vae import LTX2AudioVAE, LTX2AudioVAEConfig
from .latent_statistics import MEAN_KEY, STD_KEY

logger = logging.getLogger(__name__)

PREFIX = "audio_vae."
STATS = "per_channel_statistics."
DIFFUSERS_STATS = {"latents_mean": STATS + MEAN_KEY, "latents_std": STATS + STD_KEY}
_TO_DIFFUSERS = {v: k for k, v in DIFFUSERS_STATS.items()}


def diffusers_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers `AutoencoderKLLTX2Audio` names -> ours (only the statistics differ)."""
    return {DIFFUSERS_STATS.get(k, k): v for k, v in state.items()}


def ours_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our names -> diffusers `AutoencoderKLLTX2Audio` names; inverse of `diffusers_to_ours`."""
    return {_TO_DIFFUSERS.get(k, k): v for k, v in state.items()}


_SHARED_SIGNATURE = (
    "encoder.conv_in.conv.weight",
    "encoder.down.0.block.0.conv1.conv.weight",
    "encoder.mid.block_1.conv1.conv.weight",
    "encoder.conv_out.conv.weight",
    "decoder.conv_in.conv.weight",
    "decoder.mid.block_1.conv1.conv.weight",
    "decoder.up.0.block.0.conv1.conv.weight",
    "decoder.conv_out.conv.weight",
)
ORIGINAL_SIGNATURE = (*_SHARED_SIGNATURE, STATS + MEAN_KEY, STATS + STD_KEY)
DIFFUSERS_SIGNATURE = (*_SHARED_SIGNATURE, "latents_mean", "latents_std")
_OWNS_ORIGINAL = ("encoder.", "decoder.", STATS)
_OWNS_DIFFUSERS = ("encoder.", "decoder.", "latents_mean", "latents_std")
LAYOUTS = (
    # the whole LTX-2 file: only its `audio_vae.*` keys are this model's
    KeyLayout("original", ORIGINAL_SIGNATURE, prefix=PREFIX, owns_prefixes=_OWNS_ORIGINAL),
    # the same names saved on their own (e.g. our `state_dict()`)
    KeyLayout("original (no prefix)", ORIGINAL_SIGNATURE, owns_prefixes=_OWNS_ORIGINAL),
    KeyLayout("diffusers", DIFFUSERS_SIGNATURE, convert=diffusers_to_ours, owns_prefixes=_OWNS_DIFFUSERS),
)


# ----------------------------------------------------------------------------------- config
def _shape(state: StateDict, key: str) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(f"LTX-2 audio VAE checkpoint has no {key!r}; cannot derive its config")
    return tuple(state[key].shape)


def _count(keys, pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def _fields_from_shapes(state: StateDict) -> dict:
    if any(".attn" in k or k.startswith(("encoder.norm_out.", "decoder.norm_out.")) for k in state):
        bad = next(k for k in state if ".attn" in k or ".norm_out." in k)
        raise CheckpointError(
            f"LTX-2 audio VAE checkpoint has {bad!r}: attention blocks and GroupNorm weights are not supported "
            "(the released model has pixel norms and no attention)"
        )
    base, in_channels = _shape(state, "encoder.conv_in.conv.weight")[:2]
    levels = _count(state, r"encoder\.down\.(\d+)\.")
    blocks = _count(state, r"encoder\.down\.0\.block\.(\d+)\.")
    if not levels or not blocks:
        raise CheckpointError("LTX-2 audio VAE checkpoint has no encoder.down.0.block.0; cannot derive its config")
    ch_mult = []
    for level in range(levels):
        width = _shape(state, f"encoder.down.{level}.block.0.conv1.conv.weight")[0]
        if width % base:
            raise CheckpointError(
                f"LTX-2 audio VAE checkpoint: encoder.down.{level} is {width} wide, not a multiple of conv_in's {base}"
            )
        ch_mult.append(width // base)
    latent = _shape(state, "decoder.conv_in.conv.weight")[1]
    moments = _shape(state, "encoder.conv_out.conv.weight")[0]
    if moments != 2 * latent:
        raise CheckpointError(
            f"LTX-2 audio VAE checkpoint: encoder.conv_out gives {moments} channels; only means plus log-variances "
            f"(2 x {latent} latent channels) are supported"
        )
    decoder_blocks = _count(state, r"decoder\.up\.0\.block\.(\d+)\.")
    if decoder_blocks != blocks + 1:
        raise CheckpointError(
            f"LTX-2 audio VAE checkpoint: decoder.up.0 has {decoder_blocks} blocks, expected one more than the "
            f"encoder's {blocks} per stage"
        )
    (size,) = _shape(state, STATS + MEAN_KEY)
    compression = 2 ** (levels - 1)
    if size % latent:
        raise CheckpointError(
            f"LTX-2 audio VAE checkpoint: {STATS + MEAN_KEY} has {size} entries, not latent channels ({latent}) "
            "x latent mel bins"
        )
    return dict(
        in_channels=in_channels,
        out_channels=_shape(state, "decoder.conv_out.conv.weight")[0],
        base_channels=base,
        ch_mult=tuple(ch_mult),
        num_res_blocks=blocks,
        latent_channels=latent,
        mel_bins=size // latent * compression,
    )


_DIFFUSERS_CLASS = "AutoencoderKLLTX2Audio"
_JSON_FIELDS = {
    "in_channels": "in_channels",
    "output_channels": "out_channels",
    "base_channels": "base_channels",
    "num_res_blocks": "num_res_blocks",
    "latent_channels": "latent_channels",
    "mel_bins": "mel_bins",
    "sample_rate": "sample_rate",
    "mel_hop_length": "hop_length",
}
_CAUSALITY = {"height": True, "none": False}


def _fields_from_json(config_json: dict | None) -> dict:
    """Our fields from a diffusers `AutoencoderKLLTX2Audio` config (or a plain dict of its fields); any other json
    is ignored."""
    if not config_json or config_json.get("_class_name", _DIFFUSERS_CLASS) != _DIFFUSERS_CLASS:
        if config_json:
            logger.debug("ignoring config.json of %r: not an LTX-2 audio VAE config", config_json.get("_class_name"))
        return {}
    label = "LTX-2 audio VAE config.json"
    checks = {
        "norm_type": ("pixel", "norms other than pixel (RMS) norm"),
        "double_z": (True, "a posterior without log-variances"),
        "mid_block_add_attention": (False, "mid-block attention"),
    }
    for name, (expected, what) in checks.items():
        if config_json.get(name) is not None and config_json[name] != expected:
            raise ConfigError(f"{label} {name}={config_json[name]!r}: {what} is not supported")
    if config_json.get("attn_resolutions"):
        raise ConfigError(f"{label} attn_resolutions={config_json['attn_resolutions']!r}: attention is not supported")
    given = {ours: config_json[name] for name, ours in _JSON_FIELDS.items() if config_json.get(name) is not None}
    if config_json.get("ch_mult") is not None:
        given["ch_mult"] = tuple(config_json["ch_mult"])
    axis = config_json.get("causality_axis")
    if axis is not None:
        if axis not in _CAUSALITY:
            raise ConfigError(f"{label} causality_axis={axis!r}: only {sorted(_CAUSALITY)} are supported")
        given["causal"] = _CAUSALITY[axis]
    return given


def config_from_state(state: StateDict, config_json: dict | None = None) -> LTX2AudioVAEConfig:
    """Config from our-named (meta) shapes and, when present, the diffusers `config.json` beside the file
    (an empty `state` uses the json alone)."""
    given = _fields_from_json(config_json)
    derived = _fields_from_shapes(state) if state else {}
    label = "LTX-2 audio VAE"
    return build_config(LTX2AudioVAEConfig, label, merge_fields(label, given, derived))


LTX2_AUDIO_VAE_SPEC = ModelSpec(
    name="ltx2_audio_vae",
    role="audio_vae",
    layouts=LAYOUTS,
    config_from_state=config_from_state,
    build=LTX2AudioVAE,
    description="LTX-2 audio (mel) VAE, 8 latent channels x 16 mel bins, 4x in time (audio_vae.* of "
    "ltx-2-19b-*.safetensors; diffusers AutoencoderKLLTX2Audio audio_vae/)",
)

__all__ = [
    "DIFFUSERS_SIGNATURE",
    "LAYOUTS",
    "LTX2_AUDIO_VAE_SPEC",
    "ORIGINAL_SIGNATURE",
    "config_from_state",
    "diffusers_to_ours",
    "ours_to_diffusers",
]
