"""How LTX-2.5 diffusion video decoder checkpoints are recognised, converted and configured.

Our names are ltx-core's module names. The authors' file (`ltx-2.5-video-vae-bf16`, safetensors metadata
`config.vae._class_name == "CausalDiffusionVAE"`) stores the decoder under `vae.decoder.` (or bare
`decoder.` in split files) with four differences that ltx-core undoes on load, and so do we:

| the authors' file | ours (ltx-core) |
|---|---|
| `...attn.qkv.{weight,bias}` (fused, q then k then v) | `...attn.qkv.to_q` / `to_k` / `to_v` |
| `t_embedder.mlp.0` / `.2` | `t_embedder.timestep_embedder.linear_1` / `linear_2` |
| `diff_blocks.N.gate_msa` / `gate_mlp` / `gate_ctx` | folded (per output channel) into `attn.proj`, `mlp.w_down`, `context_proj` |
| `coarse_*` (a preview head no decode uses) | dropped |
| `vae.per_channel_statistics.*` | `per_channel_statistics.mean-of-means` / `std-of-means` (the rest dropped) |

The file's `vae.encoder.*` (LTX-2.5's convolutional encoder) is not this model's.

diffusers' `LTX2VideoDiffusionDecoderModel` puts everything under `decoder.` and renames the attention:

| ours | diffusers |
|---|---|
| X (any module) | decoder.X |
| attn.qkv.to_q / to_k / to_v | attn.to_q / to_k / to_v |
| attn.proj | attn.to_out.0 |
| attn.q_norm / k_norm | attn.norm_q / norm_k |
| per_channel_statistics.mean-of-means / std-of-means | latents_mean / latents_std |

`ours_to_diffusers` is the exact inverse of `diffusers_to_ours`; `ours_to_authors` writes the file's names
without gates (folding cannot be undone; a gate of ones is the same model).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Mapping

import torch

from diffsynth.runtime.errors import CheckpointError, ConfigError
from diffsynth.runtime.registry import KeyLayout, ModelSpec, StateDict, build_config, merge_fields

from .diffusion_decoder import LTX2DiffusionDecoder, LTX2DiffusionDecoderConfig
from .latent_statistics import MEAN_KEY, STD_KEY

logger = logging.getLogger(__name__)

LABEL = "LTX-2.5 diffusion video decoder"
PREFIX = "vae."
DECODER = "decoder."
STATS = "per_channel_statistics."
AUTHORS_CLASS_NAME = "CausalDiffusionVAE"
DIFFUSERS_CLASS_NAME = "LTX2VideoDiffusionDecoderModel"
# read by no decoder (ltx-core's PerChannelStatistics holds only the two it uses)
UNUSED_STATISTICS = tuple(STATS + n for n in ("channel", "mean-of-stds", "mean-of-stds_over_std-of-means"))
COARSE_PREFIX = "coarse_"
# gate -> the linears whose outputs it scales
GATE_TARGETS = {"gate_msa": "attn.proj", "gate_mlp": "mlp.w_down", "gate_ctx": "context_proj"}
_QKV = re.compile(r"(.*\.attn\.qkv)\.(weight|bias)")
_QKV_OURS = re.compile(r"(.*\.attn\.qkv)\.to_([qkv])\.(weight|bias)")
_GATE = re.compile(r"(diff_blocks\.\d+)\.(gate_msa|gate_mlp|gate_ctx)")
_T_EMBEDDER = {"t_embedder.mlp.0.": "t_embedder.timestep_embedder.linear_1.", "t_embedder.mlp.2.": "t_embedder.timestep_embedder.linear_2."}  # fmt: skip


# ----------------------------------------------------------------------------------- the authors' file
def _fold(value: torch.Tensor, gate: torch.Tensor, key: str, gate_key: str) -> torch.Tensor:
    if tuple(gate.shape) not in ((), (1,), (value.shape[0],)):
        raise ConfigError(
            f"{LABEL}: gate {gate_key!r} has shape {tuple(gate.shape)}; it scales {key!r} of {value.shape[0]} outputs"
        )
    g = gate.float().reshape(-1, *([1] * (value.dim() - 1))) if gate.dim() else gate.float()
    return (g * value.float()).to(value.dtype)


def authors_to_ours(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The authors' names (without `vae.`) -> ours: fused qkv split, gates folded, `coarse_*` and unused
    statistics dropped. Raises `KeyError` naming a key it cannot place."""
    out: dict[str, torch.Tensor] = {}
    gates: dict[str, tuple[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key in UNUSED_STATISTICS:
            continue
        if key.startswith(STATS):
            if key not in (STATS + MEAN_KEY, STATS + STD_KEY):
                raise KeyError(key)
            out[key] = value
            continue
        if not key.startswith(DECODER):
            raise KeyError(key)
        rest = key[len(DECODER) :]
        if rest.startswith(COARSE_PREFIX):
            continue
        if (m := _GATE.fullmatch(rest)) is not None:
            gates[f"{m.group(1)}.{GATE_TARGETS[m.group(2)]}"] = (key, value)
            continue
        for theirs, ours in _T_EMBEDDER.items():
            if rest.startswith(theirs):
                rest = ours + rest[len(theirs) :]
        if (m := _QKV.fullmatch(rest)) is not None:
            if value.shape[0] % 3:
                raise ConfigError(f"{LABEL}: fused {key!r} has {value.shape[0]} rows, not three equal parts")
            for name, part in zip("qkv", value.chunk(3, dim=0), strict=True):
                out[f"{m.group(1)}.to_{name}.{m.group(2)}"] = part
            continue
        out[rest] = value
    for target, (gate_key, gate) in gates.items():
        if f"{target}.weight" not in out:
            raise KeyError(gate_key)
        for leaf in ("weight", "bias"):
            if f"{target}.{leaf}" in out:
                out[f"{target}.{leaf}"] = _fold(out[f"{target}.{leaf}"], gate, f"{target}.{leaf}", gate_key)
    return out


def ours_to_authors(state: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Our names -> the authors' (under `prefix`, e.g. "vae."): qkv fused, no gates."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key.startswith(STATS):
            out[prefix + key] = value
            continue
        if (m := _QKV_OURS.fullmatch(key)) is not None:
            fused.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
            continue
        for theirs, ours in _T_EMBEDDER.items():
            if key.startswith(ours):
                key = theirs + key[len(ours) :]
        out[prefix + DECODER + key] = value
    for (module, leaf), parts in fused.items():
        if set(parts) != set("qkv"):
            raise KeyError(f"{module}.to_{{q,k,v}}.{leaf}")
        out[f"{prefix}{DECODER}{module}.{leaf}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


# ----------------------------------------------------------------------------------- diffusers
_DIFFUSERS_STATS = {"latents_mean": STATS + MEAN_KEY, "latents_std": STATS + STD_KEY}
_DIFFUSERS_ATTN = [  # (ours, diffusers) inside `.attn.`
    ("qkv.to_q.", "to_q."),
    ("qkv.to_k.", "to_k."),
    ("qkv.to_v.", "to_v."),
    ("proj.", "to_out.0."),
    ("q_norm.", "norm_q."),
    ("k_norm.", "norm_k."),
]


def _swap_attn(key: str, pairs: Iterable[tuple[str, str]]) -> str:
    head, sep, tail = key.partition(".attn.")
    if not sep:
        return key
    for old, new in pairs:
        if tail.startswith(old):
            return head + sep + new + tail[len(old) :]
    raise KeyError(key)


def diffusers_to_ours(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers `LTX2VideoDiffusionDecoderModel` names -> ours. Raises `KeyError` naming an unmappable key."""
    out = {}
    for key, value in state.items():
        if key in _DIFFUSERS_STATS:
            out[_DIFFUSERS_STATS[key]] = value
        elif key.startswith(DECODER):
            out[_swap_attn(key[len(DECODER) :], [(b, a) for a, b in _DIFFUSERS_ATTN])] = value
        else:
            raise KeyError(key)
    return out


def ours_to_diffusers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our names -> diffusers'; the inverse of `diffusers_to_ours`."""
    stats = {v: k for k, v in _DIFFUSERS_STATS.items()}
    out = {}
    for key, value in state.items():
        if key in stats:
            out[stats[key]] = value
        elif key.startswith(STATS):
            raise KeyError(key)
        else:
            out[DECODER + _swap_attn(key, _DIFFUSERS_ATTN)] = value
    return out


# ----------------------------------------------------------------------------------- recognition
AUTHORS_SIGNATURE = (
    "decoder.conv_in.weight",
    "decoder.det_stages.0.0.attn.qkv.weight",
    "decoder.upsamples.0.proj.weight",
    "decoder.conv_in_x_t.weight",
    "decoder.shared_adaln.proj.weight",
    "decoder.diff_blocks.0.attn.qkv.weight",
    "decoder.conv_out.weight",
    STATS + MEAN_KEY,
    STATS + STD_KEY,
)
DIFFUSERS_SIGNATURE = (
    "decoder.conv_in.weight",
    "decoder.det_stages.0.0.attn.to_q.weight",
    "decoder.conv_in_x_t.weight",
    "decoder.shared_adaln.proj.weight",
    "decoder.diff_blocks.0.attn.to_out.0.weight",
    "latents_mean",
    "latents_std",
)
OURS_SIGNATURE = (
    "conv_in.weight",
    "det_stages.0.0.attn.qkv.to_q.weight",
    "conv_in_x_t.weight",
    "shared_adaln.proj.weight",
    "diff_blocks.0.attn.qkv.to_q.weight",
    STATS + MEAN_KEY,
    STATS + STD_KEY,
)
_OWNS_AUTHORS = (DECODER, STATS)
LAYOUTS = (
    # the authors' file: its `vae.encoder.*` is the convolutional encoder's, not ours
    KeyLayout("original", AUTHORS_SIGNATURE, prefix=PREFIX, convert=authors_to_ours, owns_prefixes=_OWNS_AUTHORS),
    KeyLayout("original (no prefix)", AUTHORS_SIGNATURE, convert=authors_to_ours, owns_prefixes=_OWNS_AUTHORS),
    KeyLayout("diffusers", DIFFUSERS_SIGNATURE, convert=diffusers_to_ours),
    KeyLayout("ours", OURS_SIGNATURE),
)


def is_authors_file(keys: Iterable[str], metadata: Mapping | None = None) -> bool:
    """Whether a checkpoint is the authors' diffusion decoder: by its keys (with or without `vae.`), or,
    given the safetensors metadata's parsed `config`, by `vae._class_name` as ltx-core decides."""
    if metadata is not None:
        vae = metadata.get("vae", metadata) if isinstance(metadata, Mapping) else {}
        if isinstance(vae, Mapping) and vae.get("_class_name") is not None:
            return vae.get("_class_name") == AUTHORS_CLASS_NAME
    keys = set(keys)
    return any(lay.matches(keys) for lay in LAYOUTS[:2])


# ----------------------------------------------------------------------------------- config
# the released upsamplers, told apart by how many outputs each input gives
_STRIDE_BY_PRODUCT = {4: (1, 2, 2), 2: (2, 1, 1), 8: (2, 2, 2)}


def _shape(state: StateDict, key: str) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(f"{LABEL} checkpoint has no {key!r}; cannot derive its config")
    return tuple(state[key].shape)


def _count(keys: Iterable[str], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def _fields_from_shapes(state: StateDict) -> tuple[dict, tuple[int, ...]]:
    """Fields the shapes fix, and each upsampler's stride product (the stride itself is not in the shapes)."""
    latent = _shape(state, "conv_in.weight")[1]
    n = _count(state, "det_stages.")
    if n == 0 or _count(state, "upsamples.") != n:
        raise CheckpointError(f"{LABEL} checkpoint: expected as many det_stages as upsamples, found none or a mismatch")
    widths = [_shape(state, f"det_stages.{i}.0.norm1.weight")[0] for i in range(n)]
    context = _shape(state, "diff_blocks.0.context_proj.weight")[1]
    widths.append(context)
    reductions, products = [], []
    for i in range(n):
        out, width = _shape(state, f"upsamples.{i}.proj.weight")
        if width != widths[i] or out % widths[i + 1] or widths[i] % widths[i + 1]:
            raise CheckpointError(
                f"{LABEL} checkpoint: upsamples.{i}.proj maps {width} -> {out} channels between stages of "
                f"{widths[i]} and {widths[i + 1]} channels"
            )
        reductions.append(widths[i] // widths[i + 1])
        products.append(out // widths[i + 1])
    head_dim = _shape(state, "det_stages.0.0.attn.q_norm.weight")[0]
    stage5, pixels = _shape(state, "conv_in_x_t.weight")
    patch = math.isqrt(pixels // 3)
    if 3 * patch * patch != pixels:
        raise CheckpointError(f"{LABEL} checkpoint: conv_in_x_t takes {pixels} channels, not 3 x patch^2")
    hidden = _shape(state, "diff_blocks.0.mlp.w_up.weight")[0]
    fields = dict(
        latent_channels=latent,
        out_channels=3,
        patch_size=patch,
        head_dim=head_dim,
        stage_channels=tuple(widths),
        stage_depths=(*(_count(state, f"det_stages.{i}.") for i in range(n)), _count(state, "diff_blocks.")),
        upsample_reductions=tuple(reductions),
        stage5_channels=None if stage5 == context else stage5,
        t_emb_dim=_shape(state, "shared_adaln.proj.weight")[1],
    )
    if (int(stage5 * 4.0) + 15) // 16 * 16 != hidden:
        fields["mlp_ratio"] = hidden / stage5
    return fields, tuple(products)


_DIFFUSERS_FIELDS = {
    "latent_channels": "latent_channels",
    "out_channels": "out_channels",
    "patch_size": "patch_size",
    "decoder_head_dim": "head_dim",
    "decoder_stage_channels": "stage_channels",
    "decoder_stage_depths": "stage_depths",
    "decoder_stage_kernels": "stage_kernels",
    "decoder_upsample_strides": "upsample_strides",
    "decoder_upsample_channel_reductions": "upsample_reductions",
    "decoder_stage5_kernel": "stage5_kernel",
    "decoder_t_emb_dim": "t_emb_dim",
    "decoder_timestep_scale_multiplier": "timestep_scale_multiplier",
    "decoder_model_output_type": "model_output_type",
    "decoder_num_inference_steps": "num_steps",
}
_AUTHORS_FIELDS = {
    "in_channels": "latent_channels",
    "out_channels": "out_channels",
    "patch_size": "patch_size",
    "head_dim": "head_dim",
    "na_head_dim": "head_dim",
    "stage_channels": "stage_channels",
    "stage_depths": "stage_depths",
    "stage5_kernel": "stage5_kernel",
    "stage5_channels": "stage5_channels",
    "t_emb_dim": "t_emb_dim",
    "default_num_inference_steps": "num_steps",
    "timestep_scale_multiplier": "timestep_scale_multiplier",
}


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def _fields_from_json(config_json: Mapping | None) -> dict:
    """Our fields from a diffusers `config.json`, or from the authors' `config["vae"]` metadata (its
    `decoder` dict); anything else is ignored."""
    if not config_json:
        return {}
    label = f"{LABEL} config"
    if config_json.get("_class_name") == DIFFUSERS_CLASS_NAME:
        if config_json.get("scaling_factor", 1.0) != 1.0:
            raise ConfigError(f"{label} scaling_factor={config_json['scaling_factor']!r}: only 1.0 is supported")
        given = {
            ours: _tuples(config_json[k]) for k, ours in _DIFFUSERS_FIELDS.items() if config_json.get(k) is not None
        }
        for name in ("spatial_compression_ratio", "temporal_compression_ratio"):
            if config_json.get(name) is not None:
                given[f"_{name}"] = config_json[name]
        return given
    vae = config_json.get("vae", config_json)
    if not isinstance(vae, Mapping) or vae.get("_class_name") != AUTHORS_CLASS_NAME:
        logger.debug("ignoring config of %r: not an LTX-2.5 diffusion decoder config", config_json.get("_class_name"))
        return {}
    decoder = vae.get("decoder", vae)
    given = {ours: _tuples(decoder[k]) for k, ours in _AUTHORS_FIELDS.items() if decoder.get(k) is not None}
    if decoder.get("stage_kernels") is not None:  # one per stage: the last (stage 5's slot) is stage5_kernel's
        given["stage_kernels"] = _tuples(decoder["stage_kernels"])[: len(decoder["stage_kernels"]) - 1]
    if decoder.get("upsamples") is not None:
        given["upsample_strides"] = tuple(_tuples(stride) for stride, _ in decoder["upsamples"])
        given["upsample_reductions"] = tuple(int(r) for _, r in decoder["upsamples"])
    if vae.get("model_output_type") is not None:
        given["model_output_type"] = vae["model_output_type"]
    return given


def config_from_state(state: StateDict, config_json: Mapping | None = None) -> LTX2DiffusionDecoderConfig:
    """Config from our-named (meta) shapes and, when given, a diffusers `config.json` or the authors'
    metadata config. Shapes fix the widths, depths, head size, patch and embedding sizes; the kernels,
    timestep scale, output type and step count (not in the shapes) come from the config or are the released
    values. An upsampler's stride is read from the config, else from its output count (2: time, 4: space,
    8: both). A config value contradicting the shapes is a ConfigError naming the field."""
    given = _fields_from_json(config_json)
    checks = {k: given.pop(k) for k in list(given) if k.startswith("_")}
    derived, products = _fields_from_shapes(state) if state else ({}, ())
    fields = merge_fields(LABEL, given, derived)
    if products:
        strides = fields.get("upsample_strides")
        if strides is None:
            unknown = [p for p in products if p not in _STRIDE_BY_PRODUCT]
            if unknown:
                raise CheckpointError(f"{LABEL} checkpoint: upsamplers multiplying tokens by {unknown} need a config")
            fields["upsample_strides"] = tuple(_STRIDE_BY_PRODUCT[p] for p in products)
        elif tuple(math.prod(s) for s in strides) != products:
            raise ConfigError(
                f"{LABEL} config says upsample_strides={strides!r} but the upsamplers' shapes give stride "
                f"products {products!r}"
            )
    config = build_config(LTX2DiffusionDecoderConfig, LABEL, fields)
    facts = {
        "_spatial_compression_ratio": config.spatial_compression,
        "_temporal_compression_ratio": config.temporal_compression,
    }
    for name, value in checks.items():
        if value != facts[name]:
            raise ConfigError(f"{LABEL} config says {name[1:]}={value!r} but the model has {facts[name]!r}")
    return config


# ----------------------------------------------------------------------------------- strict loading
def load_state_dict(
    model: LTX2DiffusionDecoder, state: Mapping[str, torch.Tensor], *, assign: bool = False
) -> LTX2DiffusionDecoder:
    """Load a state dict in any of `LAYOUTS` (the authors' with or without `vae.`, diffusers', ours)
    strictly: a missing, unexpected or wrong-shaped tensor is a ConfigError naming the key as the state dict
    spells it. Keys of the authors' file that are not the decoder's (`vae.encoder.*`) are ignored."""
    keys = set(state)
    layout = next((lay for lay in LAYOUTS if lay.matches(keys)), None)
    if layout is None:
        raise ConfigError(
            f"{LABEL}: the state dict is in no known layout ({', '.join(lay.name for lay in LAYOUTS)}); "
            f"e.g. it lacks {sorted(set(AUTHORS_SIGNATURE) - keys)[:3]!r}"
        )
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if layout.convert is authors_to_ours:  # compare in the file's names, ignoring what we drop
        theirs = {k: v for k, v in ours_to_authors(model.state_dict(), layout.prefix).items()}
        expected = {k: tuple(v.shape) for k, v in theirs.items()}
        dropped = re.compile(re.escape(layout.prefix + DECODER) + r"(coarse_.*|diff_blocks\.\d+\.gate_(msa|mlp|ctx))")
        extra = {k for k in state if layout.owns(k) and k not in expected and dropped.fullmatch(k)}
        extra |= {layout.prefix + k for k in UNUSED_STATISTICS if layout.prefix + k in state}
        given = {k for k in state if layout.owns(k) and k not in extra}
    else:
        if layout.convert is diffusers_to_ours:
            expected = {k: tuple(v.shape) for k, v in ours_to_diffusers(model.state_dict()).items()}
        given = set(state)
    missing = sorted(set(expected) - given)
    unexpected = sorted(given - set(expected))
    if missing or unexpected:
        raise ConfigError(
            f"{LABEL} ({layout.name} layout) does not fit the model: missing keys {missing[:5]!r}, "
            f"unexpected keys {unexpected[:5]!r}"
        )
    for key in sorted(given):
        if tuple(state[key].shape) != expected[key]:
            raise ConfigError(
                f"{LABEL} ({layout.name} layout): {key!r} has shape {tuple(state[key].shape)}, "
                f"the model expects {expected[key]}"
            )
    try:
        ours = layout.to_ours(state)
    except KeyError as exc:
        raise ConfigError(f"{LABEL} ({layout.name} layout): no place for key {exc.args[0]!r}") from None
    model.load_state_dict(ours, strict=True, assign=assign)
    return model


def build_from_state(state: Mapping[str, torch.Tensor], config_json: Mapping | None = None) -> LTX2DiffusionDecoder:
    """Recognise, configure (from shapes plus `config_json`, e.g. the file's metadata config), build on the
    meta device and load strictly."""
    layout = next((lay for lay in LAYOUTS if lay.matches(state)), None)
    if layout is None:
        raise ConfigError(f"{LABEL}: the state dict is in no known layout")
    meta = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in state.items() if layout.owns(k)}
    config = config_from_state(layout.to_ours(meta), config_json)
    with torch.device("meta"):
        model = LTX2DiffusionDecoder(config)
    return load_state_dict(model, state, assign=True).eval()


LTX2_DIFFUSION_DECODER_SPEC = ModelSpec(
    name="ltx2_diffusion_decoder",
    role="diffusion_decoder",
    layouts=LAYOUTS,
    config_from_state=config_from_state,
    build=LTX2DiffusionDecoder,
    description="LTX-2.5 diffusion video decoder (vae.decoder.* of ltx-2.5-video-vae-bf16; diffusers "
    "LTX2VideoDiffusionDecoderModel diffusion_decoder/)",
)

__all__ = [
    "AUTHORS_CLASS_NAME",
    "AUTHORS_SIGNATURE",
    "DIFFUSERS_SIGNATURE",
    "LAYOUTS",
    "LTX2_DIFFUSION_DECODER_SPEC",
    "authors_to_ours",
    "build_from_state",
    "config_from_state",
    "diffusers_to_ours",
    "is_authors_file",
    "load_state_dict",
    "ours_to_authors",
    "ours_to_diffusers",
]
