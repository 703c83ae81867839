"""How LTX-2 video VAE checkpoints are recognised, converted and configured.

Our names are ltx-core's, so the `vae.*` part of `ltx-2-19b-dev.safetensors` (and the same keys saved
without the prefix) loads as is; the file's three statistics no pipeline reads (`channel`,
`mean-of-stds`, `mean-of-stds_over_std-of-means`) are dropped on the way in, as ltx-core drops them.

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

`ours_to_diffusers` is the exact inverse of `diffusers_to_ours`.
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


def _stages(state: StateDict, side: str, blocks: str, up: bool) -> tuple[list[int], list[str], list[int]]:
    """(residual blocks per stage, resampler kinds, stage widths) of the alternating `blocks` list.
    A resampler's conv gives `2C / prod(stride)` channels going down, `C * prod(stride) / 2` going up."""
    layers, kinds, widths, k = [], [], [], 0
    while True:
        stage = f"{side}.{blocks}.{k}"
        if f"{stage}.res_blocks.0.conv1.conv.weight" in state:
            count = _count_stages(state, re.escape(f"{stage}.res_blocks.") + r"(\d+)\.")
            layers.append(count)
            widths.append(_shape(state, f"{stage}.res_blocks.0.conv1.conv.weight")[0])
        elif f"{stage}.conv.conv.weight" in state:
            out, width = _shape(state, f"{stage}.conv.conv.weight")[:2]
            product = 2 * out / width if up else 2 * width / out
            if product not in _KIND_BY_PRODUCT or len(kinds) != len(layers) - 1:
                raise CheckpointError(
                    f"LTX-2 video VAE checkpoint: {stage} is not a resampler this model knows "
                    f"(conv {width} -> {out} channels, after {len(layers)} stages and {len(kinds)} resamplers)"
                )
            kinds.append(_KIND_BY_PRODUCT[int(product)])
        else:
            break
        k += 1
    if len(layers) != len(kinds) + 1:
        raise CheckpointError(
            f"LTX-2 video VAE checkpoint: {side}.{blocks} must alternate residual stages and resamplers, "
            f"starting and ending with a stage; found {len(layers)} stages and {len(kinds)} resamplers"
        )
    return layers, kinds, widths


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
    enc_layers, enc_kinds, _ = _stages(state, "encoder", "down_blocks", up=False)
    dec_layers, dec_kinds, dec_widths = _stages(state, "decoder", "up_blocks", up=True)
    return dict(
        in_channels=in_channels,
        latent_channels=latent,
        patch_size=patch,
        encoder_layers=tuple(enc_layers),
        encoder_downsamples=tuple(enc_kinds),
        decoder_base_channels=dec_widths[-1],
        decoder_layers=tuple(dec_layers),
        decoder_upsamples=tuple(dec_kinds),
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
        "upsample_factor": (2, "channel reductions other than 2"),
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
    residual = config_json.get("upsample_residual")
    if residual is not None:
        count = len(given.get("decoder_upsamples", ())) or 3
        given["decoder_upsample_residual"] = (
            tuple(reversed([bool(r) for r in residual])) if isinstance(residual, list) else (bool(residual),) * count
        )
    if config_json.get("decoder_block_out_channels") is not None:
        widths = list(config_json["decoder_block_out_channels"])
        base = widths[0] // 2
        if widths != [base * 2 ** (i + 1) for i in range(len(widths))]:
            raise ConfigError(f"{label} decoder_block_out_channels={widths!r} must double at each stage")
        given["decoder_base_channels"] = base
    if config_json.get("block_out_channels") is not None and "latent_channels" in given:
        widths = list(config_json["block_out_channels"])
        expected = [given["latent_channels"] * 2 ** (i + 1) for i in range(len(widths))]
        if widths != expected:
            raise ConfigError(
                f"{label} block_out_channels={widths!r}: the encoder doubles latent_channels at each stage ({expected})"
            )
    return given


def config_from_state(state: StateDict, config_json: dict | None = None) -> LTX2VideoVAEConfig:
    """Config from our-named (meta) shapes and, when present, the diffusers `config.json` beside the file.

    Shapes fix the widths, stage lengths and resampler kinds; the json adds causality, padding modes,
    the upsamplers' residual flags and the scaling factor (else the released values). A json value
    contradicting the shapes is an error naming the field. An empty `state` uses the json alone.
    """
    given = _fields_from_json(config_json)
    derived = _fields_from_shapes(state) if state else {}
    label = "LTX-2 video VAE"
    fields = merge_fields(label, given, derived)
    if "decoder_upsample_residual" not in fields and "decoder_upsamples" in fields:
        fields["decoder_upsample_residual"] = (True,) * len(fields["decoder_upsamples"])  # the released value
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
