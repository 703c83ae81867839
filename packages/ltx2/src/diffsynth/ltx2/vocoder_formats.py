"""How LTX-2 vocoder checkpoints are recognised, converted and configured.

Our names are ltx-core's, so the `vocoder.*` part of `ltx-2-19b-dev.safetensors` (and the same keys saved
without the prefix) loads as is. diffusers' `LTX2Vocoder` (`vocoder/` folders) renames four modules:

| ours (ltx-core) | diffusers |
|---|---|
| conv_pre | conv_in |
| ups | upsamplers |
| resblocks | resnets |
| conv_post | conv_out |

Shapes fix the widths, kernel sizes and block counts; the upsampling rates and dilations leave no trace in
them, so they come from a diffusers `config.json` (`upsample_factors`, `resnet_dilations`) or are the
release's when the kernels are the release's. Anything else is an error asking for the config.
"""

from __future__ import annotations

import logging
import re

import torch

from diffsynth.runtime.errors import CheckpointError, ConfigError
from diffsynth.runtime.registry import KeyLayout, ModelSpec, StateDict, build_config, merge_fields

from .vocoder import LTX2Vocoder, LTX2VocoderConfig

logger = logging.getLogger(__name__)

PREFIX = "vocoder."
RENAMES = {"conv_pre.": "conv_in.", "ups.": "upsamplers.", "resblocks.": "resnets.", "conv_post.": "conv_out."}


def _rename(state: dict[str, torch.Tensor], table: dict[str, str], label: str) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        head = next((h for h in table if key.startswith(h)), None)
        if head is None:
            raise KeyError(f"LTX-2 vocoder ({label}): no mapping for key {key!r}")
        out[table[head] + key[len(head) :]] = value
    return out


def diffusers_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers `LTX2Vocoder` names -> ours. Raises `KeyError` naming an unmappable key."""
    return _rename(state, {v: k for k, v in RENAMES.items()}, "diffusers layout")


def ours_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our names -> diffusers `LTX2Vocoder` names; inverse of `diffusers_to_ours`."""
    return _rename(state, RENAMES, "to diffusers")


ORIGINAL_SIGNATURE = ("conv_pre.weight", "ups.0.weight", "resblocks.0.convs1.0.weight", "conv_post.weight")
DIFFUSERS_SIGNATURE = ("conv_in.weight", "upsamplers.0.weight", "resnets.0.convs1.0.weight", "conv_out.weight")
_OWNS_ORIGINAL = tuple(RENAMES)
_OWNS_DIFFUSERS = tuple(RENAMES.values())
LAYOUTS = (
    # the whole LTX-2 file: only its `vocoder.*` keys are this model's
    KeyLayout("original", ORIGINAL_SIGNATURE, prefix=PREFIX, owns_prefixes=_OWNS_ORIGINAL),
    KeyLayout("original (no prefix)", ORIGINAL_SIGNATURE, owns_prefixes=_OWNS_ORIGINAL),
    KeyLayout("diffusers", DIFFUSERS_SIGNATURE, convert=diffusers_to_ours, owns_prefixes=_OWNS_DIFFUSERS),
)


# ----------------------------------------------------------------------------------- config
_RELEASE = LTX2VocoderConfig()


def _shape(state: StateDict, key: str) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(f"LTX-2 vocoder checkpoint has no {key!r}; cannot derive its config")
    return tuple(state[key].shape)


def _count(keys, pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def _fields_from_shapes(state: StateDict) -> dict:
    if any(".alpha" in k or ".beta" in k or k.startswith("act_post.") for k in state):
        raise CheckpointError(
            "LTX-2 vocoder checkpoint has snake activation parameters: that is the LTX-2.3 (BigVGAN / bandwidth "
            "extension) vocoder, which this model does not cover"
        )
    hidden, in_channels = _shape(state, "conv_pre.weight")[:2]
    ups = _count(state, r"ups\.(\d+)\.")
    blocks = _count(state, r"resblocks\.(\d+)\.")
    if not ups or blocks % ups:
        raise CheckpointError(
            f"LTX-2 vocoder checkpoint: {blocks} residual blocks cannot be shared evenly by {ups} upsamplers"
        )
    per_stage = blocks // ups
    kernels = tuple(_shape(state, f"ups.{i}.weight")[2] for i in range(ups))
    resblock_kernels = tuple(_shape(state, f"resblocks.{j}.convs1.0.weight")[2] for j in range(per_stage))
    convs = tuple(_count(state, rf"resblocks\.{j}\.convs1\.(\d+)\.") for j in range(per_stage))
    return dict(
        in_channels=in_channels,
        hidden_channels=hidden,
        out_channels=_shape(state, "conv_post.weight")[0],
        upsample_kernel_sizes=kernels,
        resblock_kernel_sizes=resblock_kernels,
        final_bias="conv_post.bias" in state,
        _convs=convs,
    )


_DIFFUSERS_CLASS = "LTX2Vocoder"
_JSON_FIELDS = {
    "in_channels": "in_channels",
    "hidden_channels": "hidden_channels",
    "out_channels": "out_channels",
    "final_bias": "final_bias",
    "output_sampling_rate": "sampling_rate",
}
_JSON_TUPLES = {
    "upsample_factors": "upsample_rates",
    "upsample_kernel_sizes": "upsample_kernel_sizes",
    "resnet_kernel_sizes": "resblock_kernel_sizes",
}


def _fields_from_json(config_json: dict | None) -> dict:
    """Our fields from a diffusers `LTX2Vocoder` config (or a plain dict of its fields); any other json is ignored."""
    if not config_json or config_json.get("_class_name", _DIFFUSERS_CLASS) != _DIFFUSERS_CLASS:
        if config_json:
            logger.debug("ignoring config.json of %r: not an LTX-2 vocoder config", config_json.get("_class_name"))
        return {}
    label = "LTX-2 vocoder config.json"
    fixed = {"act_fn": "leaky_relu", "antialias": False, "leaky_relu_negative_slope": 0.1}
    for name, expected in fixed.items():
        if config_json.get(name) is not None and config_json[name] != expected:
            raise ConfigError(f"{label} {name}={config_json[name]!r}: only {expected!r} is supported (LTX-2.0 vocoder)")
    given = {ours: config_json[name] for name, ours in _JSON_FIELDS.items() if config_json.get(name) is not None}
    given.update({ours: tuple(config_json[n]) for n, ours in _JSON_TUPLES.items() if config_json.get(n) is not None})
    if config_json.get("resnet_dilations") is not None:
        given["resblock_dilations"] = tuple(tuple(d) for d in config_json["resnet_dilations"])
    if "final_act_fn" in config_json:
        given["final_activation"] = config_json["final_act_fn"]
    return given


def config_from_state(state: StateDict, config_json: dict | None = None) -> LTX2VocoderConfig:
    """Config from our-named (meta) shapes and, when present, the diffusers `config.json` beside the file
    (an empty `state` uses the json alone). Rates and dilations default to the release's only where the
    shapes are the release's."""
    given = _fields_from_json(config_json)
    derived = _fields_from_shapes(state) if state else {}
    convs = derived.pop("_convs", None)
    label = "LTX-2 vocoder"
    fields = merge_fields(label, given, derived)
    kernels = fields.get("upsample_kernel_sizes")
    if "upsample_rates" not in fields and kernels is not None:
        if kernels != _RELEASE.upsample_kernel_sizes:
            raise ConfigError(
                f"{label}: upsample kernels {kernels} are not the release's {_RELEASE.upsample_kernel_sizes}, and the "
                "rates cannot be read from shapes; pass them as config={'upsample_factors': [...]} (diffusers names)"
            )
        fields["upsample_rates"] = _RELEASE.upsample_rates
    if "resblock_dilations" not in fields and convs is not None:
        if any(n != len(_RELEASE.resblock_dilations[0]) for n in convs):
            raise ConfigError(
                f"{label}: residual blocks with {convs} dilated convs need their dilations; pass "
                "config={'resnet_dilations': [[...], ...]} (diffusers names)"
            )
        fields["resblock_dilations"] = (_RELEASE.resblock_dilations[0],) * len(convs)
    return build_config(LTX2VocoderConfig, label, fields)


LTX2_VOCODER_SPEC = ModelSpec(
    name="ltx2_vocoder",
    role="vocoder",
    layouts=LAYOUTS,
    config_from_state=config_from_state,
    build=LTX2Vocoder,
    description="LTX-2 HiFi-GAN vocoder, stereo log-mel -> 24 kHz stereo waveform (vocoder.* of "
    "ltx-2-19b-*.safetensors; diffusers LTX2Vocoder vocoder/)",
)

__all__ = [
    "DIFFUSERS_SIGNATURE",
    "LAYOUTS",
    "LTX2_VOCODER_SPEC",
    "ORIGINAL_SIGNATURE",
    "config_from_state",
    "diffusers_to_ours",
    "ours_to_diffusers",
]
