"""On-disk layouts of the Wan causal video VAE and the conversion of diffusers' names to ours.

Our names are the original Wan ones, so `Wan2.1_VAE.pth` / `Wan2.2_VAE.pth` (and ComfyUI repacks,
which keep them) load as they are. diffusers' `AutoencoderKLWan` — and Qwen-Image's `vae/`, which
has the same keys as the 2.1 one — renames modules (tables below, `{}` = an index) and regroups:

- 2.1: the encoder list is flat in both; the decoder's flat `upsamples.N` is diffusers'
  `up_blocks.I.resnets.J` / `up_blocks.I.upsamplers.0` with N = I*(R+2) + J, because every stage
  holds R+1 residual blocks and one upsampler (R = num_res_blocks);
- 2.2: stages are nested in both; a stage's last entry (`downsamples.I.downsamples.R`,
  `upsamples.I.upsamples.R+1`) is diffusers' `downsampler` / `upsampler`.

The 2.1 and 2.2 signatures exclude each other (flat vs nested first block), and none of them
matches an `AutoencoderKL` (FLUX) file: those have no RMS-norm `gamma`.
"""

from __future__ import annotations

import logging
import math
import re

import torch

from ..errors import CheckpointError, ConfigError
from ..registry import KeyLayout, StateDict

logger = logging.getLogger(__name__)

# Per-channel latent statistics of the released checkpoints (applied outside the network;
# Wan's `Wan2_1_VAE`/`Wan2_2_VAE`, diffusers' `AutoencoderKLWan` configs).
WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip
WAN22_LATENTS_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)  # fmt: skip
WAN22_LATENTS_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)  # fmt: skip

_RESNET = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6"}
_RESNET = {**_RESNET, "conv_shortcut": "shortcut"}
_ATTENTION = {"norm": "norm", "to_qkv": "to_qkv", "proj": "proj"}
_RESAMPLE = {"resample.1": "resample.1", "time_conv": "time_conv"}
_WHOLE = {"": ""}

# (diffusers module, our module, index rule, parts); the rule maps diffusers' indices to ours
_COMMON = [
    ("encoder.conv_in", "encoder.conv1", "same", _WHOLE),
    ("encoder.mid_block.resnets.0", "encoder.middle.0", "same", _RESNET),
    ("encoder.mid_block.attentions.0", "encoder.middle.1", "same", _ATTENTION),
    ("encoder.mid_block.resnets.1", "encoder.middle.2", "same", _RESNET),
    ("encoder.norm_out", "encoder.head.0", "same", _WHOLE),
    ("encoder.conv_out", "encoder.head.2", "same", _WHOLE),
    ("quant_conv", "conv1", "same", _WHOLE),
    ("post_quant_conv", "conv2", "same", _WHOLE),
    ("decoder.conv_in", "decoder.conv1", "same", _WHOLE),
    ("decoder.mid_block.resnets.0", "decoder.middle.0", "same", _RESNET),
    ("decoder.mid_block.attentions.0", "decoder.middle.1", "same", _ATTENTION),
    ("decoder.mid_block.resnets.1", "decoder.middle.2", "same", _RESNET),
    ("decoder.norm_out", "decoder.head.0", "same", _WHOLE),
    ("decoder.conv_out", "decoder.head.2", "same", _WHOLE),
]
DIFFUSERS_21 = [
    *_COMMON,
    ("encoder.down_blocks.{}", "encoder.downsamples.{}", "same", {**_RESNET, **_RESAMPLE}),
    ("decoder.up_blocks.{}.resnets.{}", "decoder.upsamples.{}", "flat_block", _RESNET),
    ("decoder.up_blocks.{}.upsamplers.0", "decoder.upsamples.{}", "flat_upsampler", _RESAMPLE),
]
DIFFUSERS_22 = [
    *_COMMON,
    ("encoder.down_blocks.{}.resnets.{}", "encoder.downsamples.{}.downsamples.{}", "same", _RESNET),
    ("encoder.down_blocks.{}.downsampler", "encoder.downsamples.{}.downsamples.{}", "downsampler", _RESAMPLE),
    ("decoder.up_blocks.{}.resnets.{}", "decoder.upsamples.{}.upsamples.{}", "same", _RESNET),
    ("decoder.up_blocks.{}.upsampler", "decoder.upsamples.{}.upsamples.{}", "upsampler", _RESAMPLE),
]
_INDEX_RULES = {  # (diffusers indices, R) -> our indices
    "same": lambda idx, r: idx,
    "flat_block": lambda idx, r: (idx[0] * (r + 2) + idx[1],),
    "flat_upsampler": lambda idx, r: (idx[0] * (r + 2) + r + 1,),
    "downsampler": lambda idx, r: (idx[0], r),
    "upsampler": lambda idx, r: (idx[0], r + 1),
}


def _compile(table) -> list[tuple[re.Pattern, str, str]]:
    """Full-key regexes: `{}` -> an index; norms hold `gamma`, everything else `weight`/`bias`."""
    rules = []
    for src, dst, rule, parts in table:
        for src_part, dst_part in parts.items():
            s = f"{src}.{src_part}" if src_part else src
            d = f"{dst}.{dst_part}" if dst_part else dst
            params = "gamma" if "norm" in s.rsplit(".", 1)[-1] else "weight|bias"
            pattern = re.escape(s).replace(r"\{\}", r"(\d+)") + rf"\.({params})"
            rules.append((re.compile(pattern), d, rule))
    return rules


def _num_res_blocks(state: StateDict, layout: str) -> int:
    """R from the decoder's first stage (it holds R+1 residual blocks)."""
    count = 0
    while f"decoder.up_blocks.0.resnets.{count}.conv1.weight" in state:
        count += 1
    if count < 2:
        raise KeyError(f"Wan VAE ({layout}): cannot count residual blocks, no 'decoder.up_blocks.0.resnets.1.*'")
    return count - 1


def _converter(table, layout: str):
    rules = _compile(table)

    def convert(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        r = _num_res_blocks(state, layout)
        out: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            found = next(((m, t, rule) for p, t, rule in rules if (m := p.fullmatch(key)) is not None), None)
            if found is None:
                raise KeyError(f"Wan VAE ({layout} layout): no mapping for key {key!r}")
            match, target, rule = found
            *idx, param = match.groups()
            ours = f"{target.format(*_INDEX_RULES[rule]([int(i) for i in idx], r))}.{param}"
            if ours in out:
                raise KeyError(f"Wan VAE ({layout} layout): key {key!r} maps onto {ours!r} a second time")
            out[ours] = value
        return out

    convert.__name__ = f"{layout.replace(' ', '').replace('.', '')}_to_ours"
    return convert


diffusers21_to_ours = _converter(DIFFUSERS_21, "diffusers 2.1")
diffusers22_to_ours = _converter(DIFFUSERS_22, "diffusers 2.2")

_SHARED_ORIGINAL = ("encoder.conv1.weight", "encoder.middle.1.to_qkv.weight", "encoder.head.2.weight")
_SHARED_ORIGINAL += ("conv1.weight", "conv2.weight", "decoder.conv1.weight", "decoder.middle.1.to_qkv.weight")
_SHARED_ORIGINAL += ("decoder.head.2.weight",)
ORIGINAL_21_SIGNATURE = (
    *_SHARED_ORIGINAL,
    "encoder.downsamples.0.residual.0.gamma",
    "decoder.upsamples.0.residual.0.gamma",
)
ORIGINAL_22_SIGNATURE = (
    *_SHARED_ORIGINAL,
    "encoder.downsamples.0.downsamples.0.residual.0.gamma",
    "decoder.upsamples.0.upsamples.0.residual.0.gamma",
)
_SHARED_DIFFUSERS = ("encoder.conv_in.weight", "encoder.mid_block.attentions.0.to_qkv.weight", "encoder.norm_out.gamma")
_SHARED_DIFFUSERS += ("quant_conv.weight", "post_quant_conv.weight", "decoder.conv_in.weight", "decoder.norm_out.gamma")
_SHARED_DIFFUSERS += ("decoder.mid_block.attentions.0.to_qkv.weight", "decoder.up_blocks.0.resnets.0.norm1.gamma")
DIFFUSERS_21_SIGNATURE = (*_SHARED_DIFFUSERS, "encoder.down_blocks.0.norm1.gamma")
DIFFUSERS_22_SIGNATURE = (*_SHARED_DIFFUSERS, "encoder.down_blocks.0.resnets.0.norm1.gamma")

_OWNS_ORIGINAL = ("encoder.", "decoder.", "conv1.", "conv2.")
_OWNS_DIFFUSERS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
LAYOUTS_21 = (
    KeyLayout("original", ORIGINAL_21_SIGNATURE, owns_prefixes=_OWNS_ORIGINAL),
    KeyLayout("diffusers", DIFFUSERS_21_SIGNATURE, convert=diffusers21_to_ours, owns_prefixes=_OWNS_DIFFUSERS),
)
LAYOUTS_22 = (
    KeyLayout("original", ORIGINAL_22_SIGNATURE, owns_prefixes=_OWNS_ORIGINAL),
    KeyLayout("diffusers", DIFFUSERS_22_SIGNATURE, convert=diffusers22_to_ours, owns_prefixes=_OWNS_DIFFUSERS),
)


# ----------------------------------------------------------------------------------- config
_DIFFUSERS_CLASSES = ("AutoencoderKLWan", "AutoencoderKLQwenImage")
_STRUCTURAL = (
    "base_dim",
    "decoder_base_dim",
    "z_dim",
    "dim_mult",
    "num_res_blocks",
    "temporal_downsample",
    "is_residual",
    "patch_size",
    "in_channels",
)


def _shape(state: StateDict, key: str) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(f"Wan VAE checkpoint has no {key!r}; cannot derive its config")
    return tuple(state[key].shape)


def _encoder_stages(state: StateDict, residual: bool) -> tuple[list[int], list[bool], int]:
    """Stage widths, temporal downsampling per downsampler, residual blocks per stage."""
    if residual:
        stage = "encoder.downsamples.{}.downsamples.{}"
        widths, r = [], 0
        while f"{stage.format(len(widths), 0)}.residual.2.weight" in state:
            widths.append(_shape(state, f"{stage.format(len(widths), 0)}.residual.2.weight")[0])
        while f"{stage.format(0, r)}.residual.2.weight" in state:
            r += 1
        temporal = [f"{stage.format(i, r)}.time_conv.weight" in state for i in range(len(widths) - 1)]
        return widths, temporal, r
    widths, temporal, counts, count, width, k = [], [], [], 0, None, 0
    while True:  # the flat 2.1 list: R residual blocks, then a downsampler, per stage
        if f"encoder.downsamples.{k}.residual.2.weight" in state:
            width, count = _shape(state, f"encoder.downsamples.{k}.residual.2.weight")[0], count + 1
        elif f"encoder.downsamples.{k}.resample.1.weight" in state:
            widths.append(width), counts.append(count)
            temporal.append(f"encoder.downsamples.{k}.time_conv.weight" in state)
            count = 0
        else:
            break
        k += 1
    widths.append(width), counts.append(count)
    if width is None or len(set(counts)) != 1:
        raise CheckpointError(f"Wan VAE checkpoint: unexpected encoder layout (residual blocks per stage {counts})")
    return widths, temporal, counts[0]


def _fields_from_shapes(state: StateDict) -> dict:
    base, packed = _shape(state, "encoder.conv1.weight")[:2]
    residual = "encoder.downsamples.0.downsamples.0.residual.0.gamma" in state
    widths, temporal, r = _encoder_stages(state, residual)
    if any(w % base for w in widths):
        raise CheckpointError(f"Wan VAE checkpoint: stage widths {widths} are not multiples of base_dim={base}")
    dim_mult = tuple(w // base for w in widths)
    head = _shape(state, "decoder.head.2.weight")
    patch = math.isqrt(packed // 3) if packed % 3 == 0 else 1
    in_channels = 3 if packed == 3 * patch * patch else packed
    patch = patch if in_channels == 3 else 1
    if head[0] != packed:
        raise CheckpointError(f"Wan VAE checkpoint: encoder takes {packed} channels but the decoder gives {head[0]}")
    return dict(
        variant="2.2" if residual else "2.1",
        base_dim=base,
        decoder_base_dim=head[1] // dim_mult[0],
        z_dim=_shape(state, "conv2.weight")[0],
        dim_mult=dim_mult,
        num_res_blocks=r,
        temporal_downsample=tuple(temporal),
        is_residual=residual,
        patch_size=patch,
        in_channels=in_channels,
    )


def _fields_from_json(config_json: dict | None) -> dict:
    """Our fields from a diffusers `AutoencoderKLWan`/`AutoencoderKLQwenImage` config; any other
    json (e.g. the Wan DiT's `config.json` next to `Wan2.1_VAE.pth`) is ignored."""
    if not config_json:
        return {}
    name = config_json.get("_class_name")
    if name not in _DIFFUSERS_CLASSES and not (name is None and "base_dim" in config_json and "z_dim" in config_json):
        logger.debug("ignoring config.json of %r: not a Wan VAE config", name)
        return {}
    if config_json.get("attn_scales"):
        raise ConfigError(
            f"config.json attn_scales={config_json['attn_scales']!r}: attention inside stages is unsupported"
        )
    fields = {}
    for spelling in ("temperal_downsample", "temporal_downsample"):  # diffusers' spelling, and ours
        if config_json.get(spelling) is not None:
            fields["temporal_downsample"] = tuple(bool(t) for t in config_json[spelling])
    for key in ("base_dim", "z_dim", "num_res_blocks", "is_residual", "dim_mult", "latents_mean", "latents_std"):
        if config_json.get(key) is not None:
            value = config_json[key]
            fields[key] = tuple(value) if isinstance(value, list) else value
    if "base_dim" in fields:
        fields["decoder_base_dim"] = config_json.get("decoder_base_dim") or fields["base_dim"]
    patch = config_json.get("patch_size") or 1
    if "patch_size" in config_json or "base_dim" in fields:
        fields["patch_size"] = patch
    if config_json.get("in_channels") is not None:  # diffusers counts the pixel-unshuffled channels
        fields["in_channels"] = config_json["in_channels"] // (patch * patch)
    fields["variant"] = "2.2" if fields.get("is_residual") else "2.1"
    return fields


def config_fields(state: StateDict, config_json: dict | None = None) -> dict:
    """`WanVAEConfig` keyword arguments from our-named shapes and a diffusers `config.json`.

    Shapes fix the architecture; the json adds the latent statistics (else the released ones for
    the variant's z_dim). A json value that contradicts the shapes is an error naming the field.
    An empty `state` uses the json alone.
    """
    given = _fields_from_json(config_json)
    if not state:
        return given
    derived = _fields_from_shapes(state)
    for name in _STRUCTURAL:
        if name in given and given[name] != derived[name]:
            raise ConfigError(
                f"config.json says {name}={given[name]!r} but the checkpoint's shapes give {derived[name]!r}"
            )
    return {**derived, **{k: given[k] for k in ("latents_mean", "latents_std") if k in given}}
