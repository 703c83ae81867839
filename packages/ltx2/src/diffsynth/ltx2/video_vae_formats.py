"""How LTX-2 video VAE checkpoints are recognised, converted and configured.

Our names are ltx-core's, so the `vae.*` part of `ltx-2-19b-dev.safetensors` and of
`ltx-2.3-22b-dev.safetensors` (and the same keys saved without the prefix) loads as is; the file's three
statistics no pipeline reads (`channel`, `mean-of-stds`, `mean-of-stds_over_std-of-means`) are dropped on
the way in, as ltx-core drops them.

diffusers' `AutoencoderKLLTX2Video` (`vae/` folders) groups the flat stage lists into blocks:

| ours (ltx-core) | diffusers |
|---|---|
| encoder.down_blocks.{2i} (residual stage i) | encoder.down_blocks.{i}.resnets |
| encoder.down_blocks.{2i+1} (downsampler i) | encoder.down_blocks.{i}.downsamplers.0 |
| encoder.down_blocks.{2n} (last stage) | encoder.mid_block.resnets |
| decoder.up_blocks.0 (first stage) | decoder.mid_block.resnets |
| decoder.up_blocks.{2i+1} (upsampler i) | decoder.up_blocks.{i}.upsamplers.0 |
| decoder.up_blocks.{2i+2} (stage after it) | decoder.up_blocks.{i}.resnets |
| res_blocks | resnets |
| per_channel_statistics.mean-of-means / std-of-means | latents_mean / latents_std |

LTX-2.3's decoder has a fourth upsampler and stage (`up_blocks.7` / `.8` <-> `up_blocks.3`); the rules
above are the same. `ours_to_diffusers` is the exact inverse of `diffusers_to_ours`.
"""

from __future__ import annotations

import logging
import math
import re

import torch

from diffsynth.runtime.errors import CheckpointError, ConfigError
from diffsynth.runtime.registry import KeyLayout, ModelSpec, StateDict, build_config, merge_fields

from .latent_statistics import MEAN_KEY, STD_KEY
from .video_vae import STRIDES, LTX2VideoVAE, LTX2VideoVAEConfig

logger = logging.getLogger(__name__)

PREFIX = "vae."
STATS = "per_channel_statistics."
# In the original file, read by no pipeline (ltx-core's PerChannelStatistics does not even hold them).
UNUSED_STATISTICS = tuple(STATS + n for n in ("channel", "mean-of-stds", "mean-of-stds_over_std-of-means"))

_PARAM = r"\.conv\.(weight|bias)"
# (diffusers module, our module, index rule); `{}` is an index; every module ends in `.conv.{weight,bias}`
_TABLE = [
    ("encoder.conv_in", "encoder.conv_in", "same"),
    ("encoder.conv_out", "encoder.conv_out", "same"),
    ("decoder.conv_in", "decoder.conv_in", "same"),
    ("decoder.conv_out", "decoder.conv_out", "same"),
    *[
        (f"encoder.down_blocks.{{}}.resnets.{{}}.{c}", f"encoder.down_blocks.{{}}.res_blocks.{{}}.{c}", "stage")
        for c in ("conv1", "conv2")
    ],
    ("encoder.down_blocks.{}.downsamplers.0.conv", "encoder.down_blocks.{}.conv", "resampler"),
    *[
        (f"encoder.mid_block.resnets.{{}}.{c}", f"encoder.down_blocks.{{}}.res_blocks.{{}}.{c}", "last_stage")
        for c in ("conv1", "conv2")
    ],
    *[
        (f"decoder.mid_block.resnets.{{}}.{c}", f"decoder.up_blocks.{{}}.res_blocks.{{}}.{c}", "first_stage")
        for c in ("conv1", "conv2")
    ],
    ("decoder.up_blocks.{}.upsamplers.0.conv", "decoder.up_blocks.{}.conv", "resampler"),
    *[
        (f"decoder.up_blocks.{{}}.resnets.{{}}.{c}", f"decoder.up_blocks.{{}}.res_blocks.{{}}.{c}", "next_stage")
        for c in ("conv1", "conv2")
    ],
]
DIFFUSERS_STATS = {"latents_mean": STATS + MEAN_KEY, "latents_std": STATS + STD_KEY}

# rule -> (diffusers indices, n) -> our indices, and (our indices, n) -> diffusers indices or None when the
# rule does not apply; n = the number of encoder downsamplers (diffusers' encoder down blocks)
_RULES = {
    "same": (lambda idx, n: idx, lambda idx, n: idx),
    "stage": (lambda idx, n: (2 * idx[0], idx[1]), lambda idx, n: (idx[0] // 2, idx[1]) if idx[0] % 2 == 0 and idx[0] < 2 * n else None),
    "resampler": (lambda idx, n: (2 * idx[0] + 1,), lambda idx, n: ((idx[0] - 1) // 2,) if idx[0] % 2 else None),
    "last_stage": (lambda idx, n: (2 * n, idx[0]), lambda idx, n: (idx[1],) if idx[0] == 2 * n else None),
    "first_stage": (lambda idx, n: (0, idx[0]), lambda idx, n: (idx[1],) if idx[0] == 0 else None),
    "next_stage": (
        lambda idx, n: (2 * idx[0] + 2, idx[1]),
        lambda idx, n: (idx[0] // 2 - 1, idx[1]) if idx[0] % 2 == 0 and idx[0] >= 2 else None,
    ),
}  # fmt: skip


def _compile(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(r"\{\}", r"(\d+)") + _PARAM)


_FORWARD = [(_compile(theirs), ours, rule) for theirs, ours, rule in _TABLE]
_BACKWARD = [(_compile(ours), theirs, rule) for theirs, ours, rule in _TABLE]


def _count_stages(keys, pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def diffusers_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers `AutoencoderKLLTX2Video` names -> ours. Raises `KeyError` naming an unmappable key."""
    n = _count_stages(state, r"encoder\.down_blocks\.(\d+)\.")
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in DIFFUSERS_STATS:
            ours = DIFFUSERS_STATS[key]
        else:
            found = next(((m, t, r) for p, t, r in _FORWARD if (m := p.fullmatch(key)) is not None), None)
            if found is None:
                raise KeyError(f"LTX-2 video VAE (diffusers layout): no mapping for key {key!r}")
            match, target, rule = found
            *idx, param = match.groups()
            ours = f"{target.format(*_RULES[rule][0]([int(i) for i in idx], n))}.conv.{param}"
        if ours in out:
            raise KeyError(f"LTX-2 video VAE (diffusers layout): key {key!r} maps onto {ours!r} a second time")
        out[ours] = value
    return out


def ours_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our names -> diffusers `AutoencoderKLLTX2Video` names; inverse of `diffusers_to_ours`."""
    n = _count_stages(state, r"encoder\.down_blocks\.(\d+)\.") // 2
    stats = {v: k for k, v in DIFFUSERS_STATS.items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        theirs = stats.get(key)
        for pattern, target, rule in _BACKWARD if theirs is None else ():
            if (m := pattern.fullmatch(key)) is None:
                continue
            *idx, param = m.groups()
            mapped = _RULES[rule][1]([int(i) for i in idx], n)
            if mapped is not None:
                theirs = f"{target.format(*mapped)}.conv.{param}"
                break
        if theirs is None:
            raise KeyError(f"LTX-2 video VAE: no diffusers name for key {key!r}")
        out[theirs] = value
    return out


def original_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The original (ltx-core) names are ours; only the unused statistics are dropped."""
    return {k: v for k, v in state.items() if k not in UNUSED_STATISTICS}


ORIGINAL_SIGNATURE = (
    "encoder.conv_in.conv.weight",
    "encoder.down_blocks.0.res_blocks.0.conv1.conv.weight",
    "encoder.conv_out.conv.weight",
    "decoder.conv_in.conv.weight",
    "decoder.up_blocks.0.res_blocks.0.conv1.conv.weight",
    "decoder.conv_out.conv.weight",
    STATS + MEAN_KEY,
    STATS + STD_KEY,
)
DIFFUSERS_SIGNATURE = (
    "encoder.conv_in.conv.weight",
    "encoder.down_blocks.0.resnets.0.conv1.conv.weight",
    "encoder.mid_block.resnets.0.conv1.conv.weight",
    "encoder.conv_out.conv.weight",
    "decoder.conv_in.conv.weight",
    "decoder.mid_block.resnets.0.conv1.conv.weight",
    "decoder.conv_out.conv.weight",
    "latents_mean",
    "latents_std",
)
_OWNS_ORIGINAL = ("encoder.", "decoder.", STATS)
_OWNS_DIFFUSERS = ("encoder.", "decoder.", "latents_mean", "latents_std")
LAYOUTS = (
    # the whole LTX-2 file: only its `vae.*` keys are this model's
    KeyLayout("original", ORIGINAL_SIGNATURE, prefix=PREFIX, convert=original_to_ours, owns_prefixes=_OWNS_ORIGINAL),
    # the same names saved on their own (e.g. our `state_dict()`)
    KeyLayout("original (no prefix)", ORIGINAL_SIGNATURE, convert=original_to_ours, owns_prefixes=_OWNS_ORIGINAL),
    KeyLayout("diffusers", DIFFUSERS_SIGNATURE, convert=diffusers_to_ours, owns_prefixes=_OWNS_DIFFUSERS),
)


# ----------------------------------------------------------------------------------- config
_KIND_BY_PRODUCT = {math.prod(s): kind for kind, s in STRIDES.items()}  # 2 time, 4 space, 8 all


def _shape(state: StateDict, key: str) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(f"LTX-2 video VAE checkpoint has no {key!r}; cannot derive its config")
    return tuple(state[key].shape)


def _stages(state: StateDict, side: str, blocks: str, up: bool) -> tuple[list[int], list[str], list[int], list[int]]:
    """(residual blocks per stage, resampler kinds, stage widths, width ratios) of the alternating `blocks` list.

    A resampler between stages of widths `C` and `C'` has a conv to `C' / prod(stride)` channels going down
    and `C' * prod(stride)` going up, so the stage after it gives the stride; the ratio is `C' / C` going down
    (the multiplier) and `C / C'` going up (the divisor)."""
    entries, k = [], 0  # ("stage", layers, width) or ("resampler", name, conv in, conv out)
    while True:
        stage = f"{side}.{blocks}.{k}"
        if f"{stage}.res_blocks.0.conv1.conv.weight" in state:
            count = _count_stages(state, re.escape(f"{stage}.res_blocks.") + r"(\d+)\.")
            entries.append(("stage", count, _shape(state, f"{stage}.res_blocks.0.conv1.conv.weight")[0]))
        elif f"{stage}.conv.conv.weight" in state:
            out, width = _shape(state, f"{stage}.conv.conv.weight")[:2]
            entries.append(("resampler", stage, width, out))
        else:
            break
        k += 1
    kinds = [e[0] for e in entries]
    if kinds != ["stage", "resampler"] * (len(kinds) // 2) + ["stage"]:
        raise CheckpointError(
            f"LTX-2 video VAE checkpoint: {side}.{blocks} must alternate residual stages and resamplers, "
            f"starting and ending with a stage; found {' '.join(kinds) or 'nothing'}"
        )
    layers, widths = [e[1] for e in entries[::2]], [e[2] for e in entries[::2]]
    resampler_kinds, ratios = [], []
    for i, (_, name, width, out) in enumerate(entries[1::2]):
        before, after = widths[i], widths[i + 1]
        product = out / after if up else after / out
        ratio = before / after if up else after / before
        if width != before or product not in _KIND_BY_PRODUCT or ratio != int(ratio) or ratio < 1:
            raise CheckpointError(
                f"LTX-2 video VAE checkpoint: {name} is not a resampler this model knows "
                f"(conv {width} -> {out} channels between stages of {before} and {after} channels)"
            )
        resampler_kinds.append(_KIND_BY_PRODUCT[int(product)])
        ratios.append(int(ratio))
    return layers, resampler_kinds, widths, ratios


# the decoders released, by (upsampler kinds, width divisors), and what their shapes cannot tell: whether the
# upsamplers add the residual path, and the spatial padding (LTX-2.0 is the dataclass default)
_LTX23 = LTX2VideoVAEConfig.ltx23()
_RELEASED_DECODERS = {
    (_LTX23.decoder_upsamples, _LTX23.decoder_width_divisors): dict(
        decoder_upsample_residual=_LTX23.decoder_upsample_residual, decoder_padding_mode=_LTX23.decoder_padding_mode
    ),
}


def _released_decoder_defaults(upsamples: tuple[str, ...], divisors: tuple[int, ...]) -> dict:
    """LTX-2.3's decoder (four upsamplers, one keeping the width) has no residual upsamplers and zero padding;
    any other (LTX-2.0's) has residual upsamplers and reflect padding."""
    found = _RELEASED_DECODERS.get((tuple(upsamples), tuple(divisors)))
    return found if found is not None else dict(decoder_upsample_residual=(True,) * len(upsamples))


def _fields_from_shapes(state: StateDict) -> dict:
    packed = _shape(state, "encoder.conv_in.conv.weight")[1]
    patch = math.isqrt(packed // 3) if packed % 3 == 0 else 1
    in_channels = 3 if packed == 3 * patch * patch else packed
    patch = patch if in_channels == 3 else 1
    latent = _shape(state, "decoder.conv_in.conv.weight")[1]
    moments = _shape(state, "encoder.conv_out.conv.weight")[0]
    if moments != latent + 1:
        raise CheckpointError(
            f"LTX-2 video VAE checkpoint: encoder.conv_out gives {moments} channels; only means plus one shared "
            f"log-variance ({latent} + 1) is supported"
        )
    enc_layers, enc_kinds, enc_widths, multipliers = _stages(state, "encoder", "down_blocks", up=False)
    if enc_widths[0] != latent:
        raise CheckpointError(
            f"LTX-2 video VAE checkpoint: encoder.down_blocks.0 is {enc_widths[0]} channels wide; the encoder "
            f"starts at latent_channels ({latent})"
        )
    dec_layers, dec_kinds, dec_widths, divisors = _stages(state, "decoder", "up_blocks", up=True)
    return dict(
        in_channels=in_channels,
        latent_channels=latent,
        patch_size=patch,
        encoder_layers=tuple(enc_layers),
        encoder_downsamples=tuple(enc_kinds),
        encoder_width_multipliers=tuple(multipliers),
        decoder_base_channels=dec_widths[-1],
        decoder_layers=tuple(dec_layers),
        decoder_upsamples=tuple(dec_kinds),
        decoder_width_divisors=tuple(divisors),
    )


_DIFFUSERS_CLASS = "AutoencoderKLLTX2Video"
_DIFFUSERS_KINDS = {"spatial": "space", "temporal": "time", "spatiotemporal": "all"}
# json field -> value our model has (architecture facts we do not vary)
_FIXED_JSON = {"patch_size_t": 1, "timestep_conditioning": False}
_JSON_FIELDS = {
    "in_channels": "in_channels",
    "latent_channels": "latent_channels",
    "patch_size": "patch_size",
    "encoder_causal": "encoder_causal",
    "decoder_causal": "decoder_causal",
    "encoder_spatial_padding_mode": "encoder_padding_mode",
    "decoder_spatial_padding_mode": "decoder_padding_mode",
    "scaling_factor": "scaling_factor",
}


def _all(value, expected, count: int) -> bool:
    return all(v == expected for v in (value if isinstance(value, (list, tuple)) else [value] * count))


def _fields_from_json(config_json: dict | None) -> dict:
    """Our fields from a diffusers `AutoencoderKLLTX2Video` config; any other json is ignored.

    diffusers lists the decoder's layer counts and residual flags from the pixel side (it reverses
    them), but its `upsample_type` from the latent side, as we list all three."""
    if not config_json or config_json.get("_class_name") != _DIFFUSERS_CLASS:
        if config_json:
            logger.debug("ignoring config.json of %r: not an LTX-2 video VAE config", config_json.get("_class_name"))
        return {}
    label = "LTX-2 video VAE config.json"
    for name, ours in _FIXED_JSON.items():
        if config_json.get(name) is not None and config_json[name] != ours:
            raise ConfigError(f"{label} {name}={config_json[name]!r}: only {ours!r} is supported")
    checks = {
        "decoder_inject_noise": (False, "noise injection"),
        "spatio_temporal_scaling": (True, "encoder stages without downsampling"),
        "decoder_spatio_temporal_scaling": (True, "decoder stages without upsampling"),
    }
    for name, (expected, what) in checks.items():
        if config_json.get(name) is not None and not _all(config_json[name], expected, 1):
            raise ConfigError(f"{label} {name}={config_json[name]!r}: {what} is not supported")
    if config_json.get("out_channels") not in (None, config_json.get("in_channels", 3)):
        raise ConfigError(f"{label} out_channels={config_json['out_channels']!r} must equal in_channels")
    given = {ours: config_json[name] for name, ours in _JSON_FIELDS.items() if config_json.get(name) is not None}
    if config_json.get("layers_per_block") is not None:
        given["encoder_layers"] = tuple(config_json["layers_per_block"])
    if config_json.get("decoder_layers_per_block") is not None:
        given["decoder_layers"] = tuple(reversed(config_json["decoder_layers_per_block"]))
    for name, ours in (("downsample_type", "encoder_downsamples"), ("upsample_type", "decoder_upsamples")):
        if config_json.get(name) is not None:
            unknown = [t for t in config_json[name] if t not in _DIFFUSERS_KINDS]
            if unknown:
                raise ConfigError(f"{label} {name} has unsupported entries {unknown!r}")
            given[ours] = tuple(_DIFFUSERS_KINDS[t] for t in config_json[name])
    count = len(given.get("decoder_upsamples", ())) or 3  # diffusers' default has three upsamplers
    residual = config_json.get("upsample_residual")
    if residual is not None:
        given["decoder_upsample_residual"] = (
            tuple(reversed([bool(r) for r in residual]))
            if isinstance(residual, (list, tuple))
            else (bool(residual),) * count
        )
    factors = config_json.get("upsample_factor")
    if factors is not None:
        factors = list(factors) if isinstance(factors, (list, tuple)) else [factors] * count
        if any(not isinstance(f, int) or isinstance(f, bool) or f < 1 for f in factors):
            raise ConfigError(f"{label} upsample_factor={config_json['upsample_factor']!r} must be positive ints")
        given["decoder_width_divisors"] = tuple(reversed(factors))
    if config_json.get("decoder_block_out_channels") is not None:
        given["decoder_base_channels"] = _decoder_base(label, list(config_json["decoder_block_out_channels"]), factors)
    if config_json.get("block_out_channels") is not None and "latent_channels" in given:
        given["encoder_width_multipliers"] = _encoder_multipliers(
            label, list(config_json["block_out_channels"]), given["latent_channels"]
        )
    return given


def _decoder_base(label: str, widths: list[int], factors: list[int] | None) -> int:
    """diffusers' `decoder_block_out_channels` (pixel side first) is each upsampler's input width; the width
    after it is that over its `upsample_factor`, which must be the next upsampler's input."""
    factors = factors if factors is not None else [2] * len(widths)
    if len(factors) != len(widths) or any(w % f for w, f in zip(widths, factors, strict=True)):
        raise ConfigError(
            f"{label} decoder_block_out_channels={widths!r} must have one width per upsample_factor {factors!r}, "
            "each divisible by it"
        )
    if any(widths[i + 1] // factors[i + 1] != widths[i] for i in range(len(widths) - 1)):
        raise ConfigError(
            f"{label} decoder_block_out_channels={widths!r}: each upsampler's output width (its width over its "
            f"upsample_factor {factors!r}) must be the next one's input width"
        )
    return widths[0] // factors[0]


def _encoder_multipliers(label: str, widths: list[int], latent: int) -> tuple[int, ...]:
    """diffusers' `block_out_channels` are the widths after each downsampler; the encoder starts at `latent`."""
    before = [latent, *widths[:-1]]
    if any(w % b or w < b for w, b in zip(widths, before, strict=True)):
        raise ConfigError(
            f"{label} block_out_channels={widths!r}: starting at latent_channels={latent}, each width must be a "
            "whole multiple of the one before"
        )
    return tuple(w // b for w, b in zip(widths, before, strict=True))


def config_from_state(state: StateDict, config_json: dict | None = None) -> LTX2VideoVAEConfig:
    """Config from our-named (meta) shapes and, when present, the diffusers `config.json` beside the file.

    Shapes fix the widths (so the resamplers' width ratios), stage lengths and resampler kinds; the json
    adds causality, padding modes, the upsamplers' residual flags and the scaling factor, else the released
    values, which differ between LTX-2.0's decoder and LTX-2.3's (told apart by their upsamplers). A json
    value contradicting the shapes is an error naming the field. An empty `state` uses the json alone.
    """
    given = _fields_from_json(config_json)
    derived = _fields_from_shapes(state) if state else {}
    label = "LTX-2 video VAE"
    fields = merge_fields(label, given, derived)
    if "encoder_downsamples" in fields:
        fields.setdefault("encoder_width_multipliers", (2,) * len(fields["encoder_downsamples"]))
    if "decoder_upsamples" in fields:
        fields.setdefault("decoder_width_divisors", (2,) * len(fields["decoder_upsamples"]))
        released = _released_decoder_defaults(fields["decoder_upsamples"], fields["decoder_width_divisors"])
        fields = {**released, **fields}
    return build_config(LTX2VideoVAEConfig, label, fields)


LTX2_VIDEO_VAE_SPEC = ModelSpec(
    name="ltx2_video_vae",
    role="vae",
    layouts=LAYOUTS,
    config_from_state=config_from_state,
    build=LTX2VideoVAE,
    description="LTX-2 video VAE, 32x spatial / 8x temporal, 128 channels (vae.* of ltx-2-19b-*.safetensors; "
    "diffusers AutoencoderKLLTX2Video vae/)",
)

__all__ = [
    "DIFFUSERS_SIGNATURE",
    "LAYOUTS",
    "LTX2_VIDEO_VAE_SPEC",
    "ORIGINAL_SIGNATURE",
    "UNUSED_STATISTICS",
    "config_from_state",
    "diffusers_to_ours",
    "original_to_ours",
    "ours_to_diffusers",
]
