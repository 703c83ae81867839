"""How LTX-2 vocoder checkpoints are recognised, converted and configured.

Our names are ltx-core's, so the `vocoder.*` part of `ltx-2-19b-dev.safetensors` (and the same keys saved
without the prefix) loads as is. diffusers' `LTX2Vocoder` (`vocoder/` folders) renames four modules:

| ours (ltx-core) | diffusers |
|---|---|
| conv_pre | conv_in |
| ups | upsamplers |
| resblocks | resnets |
| conv_post | conv_out |

The LTX-2.3 vocoder (`vocoder.*` of `ltx-2.3-22b-dev.safetensors`, i.e. `vocoder.vocoder.*`,
`vocoder.bwe_generator.*` and `vocoder.mel_stft.*` in the file) holds two such generators; diffusers'
`LTX2VocoderWithBWE` renames inside each (`vocoder.`, `bwe_generator.`) the four modules above and two more,
and keeps `mel_stft.*`:

| ours (ltx-core) | diffusers |
|---|---|
| act_post | act_out |
| ...downsample.lowpass.filter | ...downsample.filter |

Shapes fix the widths, kernel sizes, block counts, activation and STFT sizes; the upsampling rates, dilations,
STFT hop and sampling rates leave no trace in them, so they come from a diffusers `config.json`
(`upsample_factors`, `resnet_dilations`, `bwe_*`, `hop_length`, ...) or are the release's when the kernels are
the release's. Anything else is an error asking for the config.
"""

from __future__ import annotations

import logging
import re

import torch

from diffsynth.runtime.errors import CheckpointError, ConfigError
from diffsynth.runtime.registry import KeyLayout, ModelSpec, StateDict, build_config, merge_fields

from .vocoder import (
    ANTIALIAS_KERNEL,
    ANTIALIAS_RATIO,
    LTX2Vocoder,
    LTX2VocoderConfig,
    LTX2VocoderWithBWE,
    LTX2VocoderWithBWEConfig,
)

logger = logging.getLogger(__name__)

PREFIX = "vocoder."
RENAMES = {"conv_pre.": "conv_in.", "ups.": "upsamplers.", "resblocks.": "resnets.", "conv_post.": "conv_out."}


GENERATOR_RENAMES = {**RENAMES, "act_post.": "act_out."}  # inside each LTX-2.3 generator
GENERATORS = ("vocoder.", "bwe_generator.")  # the LTX-2.3 generators' key parts, the same in both layouts
STFT_PART = "mel_stft."  # LTX-2.3 STFT / mel buffers, the same in both layouts
LOWPASS = (".downsample.lowpass.filter", ".downsample.filter")  # ours, diffusers


def _map_key(key: str, to_diffusers: bool) -> str | None:
    """`key` in the other layout, or None when it has no mapping. A key under `vocoder.` / `bwe_generator.`
    is an LTX-2.3 generator's, under `mel_stft.` its STFT's; any other is an LTX-2.0 vocoder's."""
    if key.startswith(STFT_PART):
        return key
    part = next((p for p in GENERATORS if key.startswith(p)), "")
    table = GENERATOR_RENAMES if part else RENAMES
    if not to_diffusers:
        table = {v: k for k, v in table.items()}
    rest = key[len(part) :]
    head = next((h for h in table if rest.startswith(h)), None)
    if head is None:
        return None
    rest = table[head] + rest[len(head) :]
    if part:
        src, dst = LOWPASS if to_diffusers else LOWPASS[::-1]
        if rest.endswith(dst):  # already the other layout's name: no key of this layout
            return None
        if rest.endswith(src):
            rest = rest[: -len(src)] + dst
    return part + rest


def _rename(state: dict[str, torch.Tensor], to_diffusers: bool, label: str) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        new = _map_key(key, to_diffusers)
        if new is None:
            raise KeyError(f"LTX-2 vocoder ({label}): no mapping for key {key!r}")
        out[new] = value
    return out


def diffusers_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers `LTX2Vocoder` / `LTX2VocoderWithBWE` names -> ours. Raises `KeyError` naming an unmappable key."""
    return _rename(state, False, "diffusers layout")


def ours_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our names -> diffusers `LTX2Vocoder` / `LTX2VocoderWithBWE` names; inverse of `diffusers_to_ours`."""
    return _rename(state, True, "to diffusers")


ORIGINAL_SIGNATURE = ("conv_pre.weight", "ups.0.weight", "resblocks.0.convs1.0.weight", "conv_post.weight")
DIFFUSERS_SIGNATURE = ("conv_in.weight", "upsamplers.0.weight", "resnets.0.convs1.0.weight", "conv_out.weight")
_OWNS_ORIGINAL = tuple(RENAMES)
_OWNS_DIFFUSERS = tuple(RENAMES.values())
LAYOUTS = (  # LTX-2.0
    # the whole LTX-2 file: only its `vocoder.*` keys are this model's
    KeyLayout("original", ORIGINAL_SIGNATURE, prefix=PREFIX, owns_prefixes=_OWNS_ORIGINAL),
    KeyLayout("original (no prefix)", ORIGINAL_SIGNATURE, owns_prefixes=_OWNS_ORIGINAL),
    KeyLayout("diffusers", DIFFUSERS_SIGNATURE, convert=diffusers_to_ours, owns_prefixes=_OWNS_DIFFUSERS),
)
BWE_ORIGINAL_SIGNATURE = ("vocoder.conv_pre.weight", "bwe_generator.conv_pre.weight", "mel_stft.mel_basis")
BWE_DIFFUSERS_SIGNATURE = ("vocoder.conv_in.weight", "bwe_generator.conv_in.weight", "mel_stft.mel_basis")
_OWNS_BWE = (*GENERATORS, STFT_PART)
BWE_LAYOUTS = (  # LTX-2.3; the spec tries them first: a 2.3 file without prefix also fits LTX-2.0's "original"
    KeyLayout("original (LTX-2.3)", BWE_ORIGINAL_SIGNATURE, prefix=PREFIX, owns_prefixes=_OWNS_BWE),
    KeyLayout("original (LTX-2.3, no prefix)", BWE_ORIGINAL_SIGNATURE, owns_prefixes=_OWNS_BWE),
    KeyLayout("diffusers (LTX-2.3)", BWE_DIFFUSERS_SIGNATURE, convert=diffusers_to_ours, owns_prefixes=_OWNS_BWE),
)


# ----------------------------------------------------------------------------------- config
_RELEASE = LTX2VocoderConfig()
_RELEASE_23 = LTX2VocoderWithBWEConfig()


def _shape(state: StateDict, key: str, label: str = "LTX-2 vocoder") -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(f"{label} checkpoint has no {key!r}; cannot derive its config")
    return tuple(state[key].shape)


def _count(keys, pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def _generator_fields(state: StateDict, label: str) -> dict:
    """Fields one generator's (prefix-stripped) shapes fix, with `_convs`: dilated convs per block."""
    hidden, in_channels = _shape(state, "conv_pre.weight", label)[:2]
    ups = _count(state, r"ups\.(\d+)\.")
    blocks = _count(state, r"resblocks\.(\d+)\.")
    if not ups or blocks % ups:
        raise CheckpointError(
            f"{label} checkpoint: {blocks} residual blocks cannot be shared evenly by {ups} upsamplers"
        )
    per_stage = blocks // ups
    kernels = tuple(_shape(state, f"ups.{i}.weight", label)[2] for i in range(ups))
    resblock_kernels = tuple(_shape(state, f"resblocks.{j}.convs1.0.weight", label)[2] for j in range(per_stage))
    convs = tuple(_count(state, rf"resblocks\.{j}\.convs1\.(\d+)\.") for j in range(per_stage))
    snake = any(k.startswith("act_post.") or ".acts1." in k for k in state)
    if snake:
        for key in ("act_post.act.beta", "resblocks.0.acts1.0.act.beta"):
            if key not in state:
                raise CheckpointError(
                    f"{label} checkpoint has snake activations but no {key!r}: only SnakeBeta (alpha and beta) "
                    "activations are supported"
                )
        wanted = (1, 1, ANTIALIAS_KERNEL)
        for key in ("act_post.upsample.filter", "act_post.downsample.lowpass.filter"):
            if (got := _shape(state, key, label)) != wanted:
                raise CheckpointError(
                    f"{label} checkpoint: {key!r} has shape {got}; anti-aliased activations have {wanted} "
                    f"(x{ANTIALIAS_RATIO}, {ANTIALIAS_KERNEL} taps)"
                )
    return dict(
        in_channels=in_channels,
        hidden_channels=hidden,
        out_channels=_shape(state, "conv_post.weight", label)[0],
        upsample_kernel_sizes=kernels,
        resblock_kernel_sizes=resblock_kernels,
        final_bias="conv_post.bias" in state,
        activation="snakebeta" if snake else "leaky_relu",
        _convs=convs,
    )


def _fields_from_shapes(state: StateDict) -> dict:
    if any(".alpha" in k or ".beta" in k or k.startswith("act_post.") for k in state):
        raise CheckpointError(
            "LTX-2 vocoder checkpoint has snake activation parameters but no bandwidth-extension stage "
            "('bwe_generator.*', 'mel_stft.*'): BigVGAN generators load only as the whole LTX-2.3 vocoder "
            "(LTX2VocoderWithBWE)"
        )
    return _generator_fields(state, "LTX-2 vocoder")


def _rates_and_dilations(fields: dict, convs, release: LTX2VocoderConfig, label: str, json_prefix: str = "") -> None:
    """Fill in the release's upsampling rates and dilations where the kernels and conv counts are the
    release's; otherwise they must have been given (ConfigError naming the diffusers field)."""
    kernels = fields.get("upsample_kernel_sizes")
    if "upsample_rates" not in fields and kernels is not None:
        if kernels != release.upsample_kernel_sizes:
            raise ConfigError(
                f"{label}: upsample kernels {kernels} are not the release's {release.upsample_kernel_sizes}, and the "
                f"rates cannot be read from shapes; pass them as config={{'{json_prefix}upsample_factors': [...]}} "
                "(diffusers names)"
            )
        fields["upsample_rates"] = release.upsample_rates
    if "resblock_dilations" not in fields and convs is not None:
        if any(n != len(release.resblock_dilations[0]) for n in convs):
            raise ConfigError(
                f"{label}: residual blocks with {convs} dilated convs need their dilations; pass "
                f"config={{'{json_prefix}resnet_dilations': [[...], ...]}} (diffusers names)"
            )
        fields["resblock_dilations"] = (release.resblock_dilations[0],) * len(convs)


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


def _generator_json(config_json: dict, prefix: str, fields: dict[str, str]) -> dict:
    """One generator's fields from diffusers' names (`prefix` + name)."""

    def has(name: str) -> bool:
        return config_json.get(prefix + name) is not None

    given = {ours: config_json[prefix + n] for n, ours in fields.items() if has(n)}
    given.update({ours: tuple(config_json[prefix + n]) for n, ours in _JSON_TUPLES.items() if has(n)})
    if has("resnet_dilations"):
        given["resblock_dilations"] = tuple(tuple(d) for d in config_json[prefix + "resnet_dilations"])
    if prefix + "final_act_fn" in config_json:
        given["final_activation"] = config_json[prefix + "final_act_fn"]
    return given


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
    return _generator_json(config_json, "", _JSON_FIELDS)


def _is_bwe(state: StateDict, config_json: dict | None) -> bool:
    if state:
        return any(k.startswith(("bwe_generator.", STFT_PART)) for k in state)
    return bool(config_json) and config_json.get("_class_name") == _BWE_CLASS


def config_from_state(
    state: StateDict, config_json: dict | None = None
) -> LTX2VocoderConfig | LTX2VocoderWithBWEConfig:
    """Config from our-named (meta) shapes and, when present, the diffusers `config.json` beside the file
    (an empty `state` uses the json alone). Rates and dilations default to the release's only where the
    shapes are the release's. An LTX-2.3 state (`bwe_generator.*`, `mel_stft.*`) gives an
    `LTX2VocoderWithBWEConfig`."""
    if _is_bwe(state, config_json):
        return _bwe_config(state, config_json)
    given = _fields_from_json(config_json)
    derived = _fields_from_shapes(state) if state else {}
    convs = derived.pop("_convs", None)
    label = "LTX-2 vocoder"
    fields = merge_fields(label, given, derived)
    _rates_and_dilations(fields, convs, _RELEASE, label)
    return build_config(LTX2VocoderConfig, label, fields)


# ----------------------------------------------------------------------------------- config (LTX-2.3)
_BWE_CLASS = "LTX2VocoderWithBWE"
_BWE_GENERATOR_JSON = {  # per generator, with "bwe_" before each name for the second one
    "in_channels": "in_channels",
    "hidden_channels": "hidden_channels",
    "out_channels": "out_channels",
    "final_bias": "final_bias",
}
_BWE_RATES = {"vocoder": "input_sampling_rate", "bwe": "output_sampling_rate"}
_BWE_JSON = {"filter_length": "n_fft", "hop_length": "stft_hop_length", "num_mel_channels": "mel_bins"}


def _bwe_generator_json(config_json: dict, name: str, label: str) -> dict:
    prefix = "bwe_" if name == "bwe" else ""
    given = _generator_json(config_json, prefix, _BWE_GENERATOR_JSON)
    act = config_json.get(prefix + "act_fn")
    if act is not None:
        if act not in ("snakebeta", "leaky_relu"):
            raise ConfigError(f"{label} {prefix}act_fn={act!r}: only 'snakebeta' (or 'leaky_relu') is supported")
        given["activation"] = act
    antialias = config_json.get(prefix + "antialias")
    if antialias is not None and act is not None and antialias != (act == "snakebeta"):
        raise ConfigError(f"{label} {prefix}antialias={antialias!r} with {prefix}act_fn={act!r} is not supported")
    for field, value in (("antialias_ratio", ANTIALIAS_RATIO), ("antialias_kernel_size", ANTIALIAS_KERNEL)):
        if config_json.get(prefix + field) is not None and config_json[prefix + field] != value:
            raise ConfigError(
                f"{label} {prefix}{field}={config_json[prefix + field]!r}: only {value} is supported (LTX-2.3)"
            )
    if config_json.get(_BWE_RATES[name]) is not None:
        given["sampling_rate"] = config_json[_BWE_RATES[name]]
    return given


def _bwe_config(state: StateDict, config_json: dict | None) -> LTX2VocoderWithBWEConfig:
    label = "LTX-2.3 vocoder"
    if config_json and config_json.get("_class_name", _BWE_CLASS) != _BWE_CLASS:
        logger.debug("ignoring config.json of %r: not an LTX-2.3 vocoder config", config_json.get("_class_name"))
        config_json = None
    config_json = config_json or {}
    parts = {}
    for name, part in zip(("vocoder", "bwe"), GENERATORS, strict=True):
        part_label = f"{label} ({part}*)"
        sub = {k[len(part) :]: v for k, v in state.items() if k.startswith(part)}
        derived = _generator_fields(sub, part_label) if state else {}
        convs = derived.pop("_convs", None)
        fields = merge_fields(part_label, _bwe_generator_json(config_json, name, label), derived)
        release = getattr(_RELEASE_23, name)
        _rates_and_dilations(fields, convs, release, part_label, "bwe_" if name == "bwe" else "")
        parts[name] = build_config(LTX2VocoderConfig, part_label, {**vars(release), **fields})
    derived = {}
    if state:
        n_fft = _shape(state, "mel_stft.stft_fn.forward_basis", label)[-1]
        mel_bins, freqs = _shape(state, "mel_stft.mel_basis", label)
        for key in ("mel_stft.stft_fn.forward_basis", "mel_stft.stft_fn.inverse_basis"):
            if (got := _shape(state, key, label)) != (2 * freqs, 1, n_fft) or freqs != n_fft // 2 + 1:
                raise CheckpointError(
                    f"{label} checkpoint: {key!r} has shape {got} but 'mel_stft.mel_basis' has {freqs} frequencies "
                    f"(expected ({2 * (n_fft // 2 + 1)}, 1, {n_fft}) and {n_fft // 2 + 1})"
                )
        derived = dict(n_fft=n_fft, mel_bins=mel_bins)
    given = {ours: config_json[n] for n, ours in _BWE_JSON.items() if config_json.get(n) is not None}
    fields = merge_fields(label, given, derived)
    window = config_json.get("window_length")
    if window is not None and window != fields.get("n_fft", _RELEASE_23.n_fft):
        raise ConfigError(
            f"{label} config.json window_length={window!r}: only a window as long as filter_length "
            f"({fields.get('n_fft', _RELEASE_23.n_fft)}) is supported, as in ltx-core"
        )
    return build_config(LTX2VocoderWithBWEConfig, label, {**parts, **fields})


def build_vocoder(config: LTX2VocoderConfig | LTX2VocoderWithBWEConfig) -> LTX2Vocoder | LTX2VocoderWithBWE:
    """The LTX-2.0 vocoder, or the LTX-2.3 one for an `LTX2VocoderWithBWEConfig`."""
    if isinstance(config, LTX2VocoderWithBWEConfig):
        return LTX2VocoderWithBWE(config)
    return LTX2Vocoder(config)


LTX2_VOCODER_SPEC = ModelSpec(
    name="ltx2_vocoder",
    role="vocoder",
    layouts=(*BWE_LAYOUTS, *LAYOUTS),
    config_from_state=config_from_state,
    build=build_vocoder,
    description="LTX-2 vocoder, stereo log-mel -> stereo waveform: HiFi-GAN at 24 kHz (vocoder.* of "
    "ltx-2-19b-*.safetensors; diffusers LTX2Vocoder vocoder/) or BigVGAN with bandwidth extension at 48 kHz "
    "(vocoder.* of ltx-2.3-22b-*.safetensors; diffusers LTX2VocoderWithBWE)",
)

__all__ = [
    "BWE_DIFFUSERS_SIGNATURE",
    "BWE_LAYOUTS",
    "BWE_ORIGINAL_SIGNATURE",
    "DIFFUSERS_SIGNATURE",
    "LAYOUTS",
    "LTX2_VOCODER_SPEC",
    "ORIGINAL_SIGNATURE",
    "build_vocoder",
    "config_from_state",
    "diffusers_to_ours",
    "ours_to_diffusers",
]
