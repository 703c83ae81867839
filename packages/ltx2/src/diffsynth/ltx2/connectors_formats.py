"""How LTX-2 text connector checkpoints are recognised, converted and configured.

In `ltx-2-19b-dev.safetensors` (2.0) and `ltx-2.3-22b-dev.safetensors` (2.3) the connectors are
`model.diffusion_model.video_embeddings_connector.*` and `model.diffusion_model.audio_embeddings_connector.*`
(next to the DiT, whose spec leaves them to us) and the projection is top-level: 2.0's
`text_embedding_projection.aggregate_embed.weight`, 2.3's `text_embedding_projection.video_aggregate_embed.*`
and `...audio_aggregate_embed.*` (weight and bias). This spec owns exactly those keys. Layouts (each
twice: 2.0, and 2.3 with a `_2.3` name, told apart by their projection keys):

- "original": the single file (or its connector keys), prefix stripped from the connectors;
- "original_unprefixed": the same without `model.diffusion_model.` (what our `state_dict()` is);
- "diffusers": the `connectors/` folder (`LTX2TextConnectors`), plain renames: `text_proj_in` ->
  `text_embedding_projection.aggregate_embed` (2.3: `video_text_proj_in` / `audio_text_proj_in` ->
  `...video_aggregate_embed` / `...audio_aggregate_embed`), `video_connector` -> `video_embeddings_connector`,
  `transformer_blocks` -> `transformer_1d_blocks`, `norm_q` / `norm_k` -> `q_norm` / `k_norm`.

Shapes give the widths, block and register counts, the biases and gates, and (2.3, through the gates'
`[heads, width]`) the head split; otherwise the head split comes from the diffusers `config.json` when
there is one, else the released head width (128). 2.3's projections only show caption_channels x
text_proj_in_factor: the json splits it, else Gemma-3-12B's 3840 does.
"""

from __future__ import annotations

import re

import torch

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.registry import KeyLayout, ModelSpec, StateDict, build_config, merge_fields

from .connectors import LTX2ConnectorsConfig, LTX2TextConnectors

PREFIX = "model.diffusion_model."
PROJECTION = "text_embedding_projection.aggregate_embed.weight"
_SIDES = ("video", "audio")
_WB = ("weight", "bias")
# our projection module -> diffusers' (2.0's shared one, then 2.3's per stream)
_PROJECTIONS = {
    "text_embedding_projection.aggregate_embed": "text_proj_in",
    "text_embedding_projection.video_aggregate_embed": "video_text_proj_in",
    "text_embedding_projection.audio_aggregate_embed": "audio_text_proj_in",
}
_OURS_PROJECTION_KEYS = {f"{m}.{p}": f"{d}.{p}" for m, d in _PROJECTIONS.items() for p in _WB}
_DIFFUSERS_PROJECTION_KEYS = {d: m for m, d in _OURS_PROJECTION_KEYS.items()}
_BLOCK_PARAMS = (
    [f"attn1.{n}.weight" for n in ("q_norm", "k_norm")]
    + [f"attn1.{lin}.{p}" for lin in ("to_q", "to_k", "to_v", "to_out.0", "to_gate_logits") for p in _WB]
    + [f"ff.{lin}.{p}" for lin in ("net.0.proj", "net.2") for p in _WB]
)
_OURS_BLOCK = re.compile(r"^(video|audio)_embeddings_connector\.transformer_1d_blocks\.(\d+)\.(.+)$")
_DIFFUSERS_BLOCK = re.compile(r"^(video|audio)_connector\.transformer_blocks\.(\d+)\.(.+)$")


def _block_to_diffusers(rest: str) -> str:
    return rest.replace("attn1.q_norm.", "attn1.norm_q.").replace("attn1.k_norm.", "attn1.norm_k.")


def _block_to_ours(rest: str) -> str:
    return rest.replace("attn1.norm_q.", "attn1.q_norm.").replace("attn1.norm_k.", "attn1.k_norm.")


_DIFFUSERS_BLOCK_PARAMS = frozenset(_block_to_diffusers(p) for p in _BLOCK_PARAMS)


def _check_ours(state: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    for key in state:
        m = _OURS_BLOCK.match(key)
        if m is not None and m.group(3) in _BLOCK_PARAMS:
            continue
        if key in _OURS_PROJECTION_KEYS or key in {f"{s}_embeddings_connector.learnable_registers" for s in _SIDES}:
            continue
        raise KeyError(f"LTX-2 connectors ({layout} layout): no mapping for key {key!r}")
    return state


def original_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The single file's connector keys (connectors under `model.diffusion_model.`) in our names."""
    out = {k[len(PREFIX) :] if k.startswith(PREFIX) else k: v for k, v in state.items()}
    return _check_ours(out, "original")


def diffusers_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers `LTX2TextConnectors` state dict (2.0 or 2.3) in our (ltx-core) names; `KeyError` names an
    unknown key."""
    out = {}
    for key, value in state.items():
        m = _DIFFUSERS_BLOCK.match(key)
        if m is not None and m.group(3) in _DIFFUSERS_BLOCK_PARAMS:
            out[
                f"{m.group(1)}_embeddings_connector.transformer_1d_blocks.{m.group(2)}.{_block_to_ours(m.group(3))}"
            ] = value
        elif key in _DIFFUSERS_PROJECTION_KEYS:
            out[_DIFFUSERS_PROJECTION_KEYS[key]] = value
        elif key in ("video_connector.learnable_registers", "audio_connector.learnable_registers"):
            out[key.replace("_connector.", "_embeddings_connector.")] = value
        else:
            raise KeyError(f"LTX-2 connectors (diffusers layout): no mapping for key {key!r}")
    return out


def ours_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our names -> diffusers `LTX2TextConnectors` names; inverse of `diffusers_to_ours`."""
    out = {}
    for key, value in _check_ours(dict(state), "to diffusers").items():
        m = _OURS_BLOCK.match(key)
        if m is not None:
            out[f"{m.group(1)}_connector.transformer_blocks.{m.group(2)}.{_block_to_diffusers(m.group(3))}"] = value
        elif key in _OURS_PROJECTION_KEYS:
            out[_OURS_PROJECTION_KEYS[key]] = value
        else:
            out[key.replace("_embeddings_connector.", "_connector.")] = value
    return out


def ours_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our names -> the single file's names (connectors under `model.diffusion_model.`)."""
    checked = _check_ours(dict(state), "to original")
    return {(k if k in _OURS_PROJECTION_KEYS else PREFIX + k): v for k, v in checked.items()}


_CONNECTOR_SIGNATURE = (
    "model.diffusion_model.video_embeddings_connector.learnable_registers",
    "model.diffusion_model.video_embeddings_connector.transformer_1d_blocks.0.attn1.to_q.weight",
    "model.diffusion_model.audio_embeddings_connector.learnable_registers",
    "model.diffusion_model.audio_embeddings_connector.transformer_1d_blocks.0.attn1.to_q.weight",
)
_SIGNATURE = (PROJECTION, *_CONNECTOR_SIGNATURE)
_SIGNATURE_23 = (
    "text_embedding_projection.video_aggregate_embed.weight",
    "text_embedding_projection.audio_aggregate_embed.weight",
    *_CONNECTOR_SIGNATURE,
)
_CONNECTOR_PREFIXES = ("video_embeddings_connector.", "audio_embeddings_connector.")
_DIFFUSERS_CONNECTOR_SIGNATURE = (
    "video_connector.learnable_registers",
    "video_connector.transformer_blocks.0.attn1.to_q.weight",
    "audio_connector.learnable_registers",
    "audio_connector.transformer_blocks.0.attn1.to_q.weight",
)
DIFFUSERS_SIGNATURE = ("text_proj_in.weight", *_DIFFUSERS_CONNECTOR_SIGNATURE)
DIFFUSERS_SIGNATURE_23 = ("video_text_proj_in.weight", "audio_text_proj_in.weight", *_DIFFUSERS_CONNECTOR_SIGNATURE)


def _unprefixed(signature: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(k[len(PREFIX) :] if k.startswith(PREFIX) else k for k in signature)


def _layouts(suffix: str, signature: tuple[str, ...], diffusers_signature: tuple[str, ...]) -> tuple[KeyLayout, ...]:
    projections = tuple(k.split(".")[0] + "." for k in diffusers_signature if "proj_in" in k)
    return (
        KeyLayout(
            "original" + suffix,
            signature,
            convert=original_to_ours,
            owns_prefixes=("text_embedding_projection.",) + tuple(PREFIX + p for p in _CONNECTOR_PREFIXES),
        ),
        KeyLayout(
            "original_unprefixed" + suffix,
            _unprefixed(signature),
            convert=lambda state: _check_ours(dict(state), "original_unprefixed" + suffix),
            owns_prefixes=("text_embedding_projection.",) + _CONNECTOR_PREFIXES,
        ),
        KeyLayout(
            "diffusers" + suffix,
            diffusers_signature,
            convert=diffusers_to_ours,
            owns_prefixes=projections + ("video_connector.", "audio_connector."),
        ),
    )


# 2.0 first: its layouts are exactly as before; 2.3 files lack `aggregate_embed` and match the `_2.3` ones.
LAYOUTS = _layouts("", _SIGNATURE, DIFFUSERS_SIGNATURE) + _layouts("_2.3", _SIGNATURE_23, DIFFUSERS_SIGNATURE_23)


# ----------------------------------------------------------------------------------- config
def _count_blocks(state: StateDict, side: str) -> int:
    n = 0
    while f"{side}_embeddings_connector.transformer_1d_blocks.{n}.attn1.to_q.weight" in state:
        n += 1
    return n


def _shape(state: StateDict, key: str) -> tuple[int, ...]:
    if key not in state:
        raise ConfigError(f"LTX-2 connectors: the checkpoint has no {key!r}")
    return tuple(state[key].shape)


def _fields_from_shapes(state: StateDict) -> tuple[dict, dict[str, int], int]:
    """(config fields the shapes fix, each stream's width, the projections' input width)."""
    per_modality = PROJECTION not in state and "text_embedding_projection.video_aggregate_embed.weight" in state
    fields: dict = dict(per_modality_projections=per_modality)
    if per_modality:
        names = {side: f"text_embedding_projection.{side}_aggregate_embed" for side in _SIDES}
        shapes = {side: _shape(state, f"{names[side]}.weight") for side in _SIDES}
        if shapes["video"][1] != shapes["audio"][1]:
            raise ConfigError(
                f"LTX-2 connectors: the video and audio projections read {shapes['video'][1]} and "
                f"{shapes['audio'][1]} features; both read the same hidden states"
            )
        widths = {side: shapes[side][0] for side in _SIDES}
        in_dim = shapes["video"][1]
        biases = {side: f"{names[side]}.bias" in state for side in _SIDES}
        if biases["video"] != biases["audio"]:
            raise ConfigError("LTX-2 connectors: only one of the two projections has a bias")
        fields["projection_bias"] = biases["video"]
    else:
        out_dim, in_dim = _shape(state, PROJECTION)
        if in_dim % out_dim:
            raise ConfigError(
                f"LTX-2 connectors: {PROJECTION} has shape {(out_dim, in_dim)}; its input width must be "
                "a multiple of its output width (hidden states x caption channels)"
            )
        fields.update(caption_channels=out_dim, text_proj_in_factor=in_dim // out_dim)
        fields["projection_bias"] = "text_embedding_projection.aggregate_embed.bias" in state
        widths = {side: out_dim for side in _SIDES}
    for side in _SIDES:
        registers = _shape(state, f"{side}_embeddings_connector.learnable_registers")
        if registers[1] != widths[side]:
            raise ConfigError(
                f"LTX-2 connectors: {side} registers are {registers[1]} wide but the projection gives {widths[side]}"
            )
        fields[f"{side}_num_registers"] = registers[0]
        fields[f"{side}_num_layers"] = _count_blocks(state, side)
        gate = f"{side}_embeddings_connector.transformer_1d_blocks.0.attn1.to_gate_logits.weight"
        fields[f"{side}_gated_attention"] = gate in state
        if gate in state:  # one gate logit per head: the gates give the head split
            heads = _shape(state, gate)[0]
            if widths[side] % heads:
                raise ConfigError(f"LTX-2 connectors: {gate} gives {heads} heads, which do not divide {widths[side]}")
            fields[f"{side}_num_heads"], fields[f"{side}_head_dim"] = heads, widths[side] // heads
    return fields, widths, in_dim


# diffusers config.json field -> our config field
_JSON_FIELDS = {
    "caption_channels": "caption_channels",
    "text_proj_in_factor": "text_proj_in_factor",
    "video_connector_num_attention_heads": "video_num_heads",
    "video_connector_attention_head_dim": "video_head_dim",
    "video_connector_num_layers": "video_num_layers",
    "video_connector_num_learnable_registers": "video_num_registers",
    "audio_connector_num_attention_heads": "audio_num_heads",
    "audio_connector_attention_head_dim": "audio_head_dim",
    "audio_connector_num_layers": "audio_num_layers",
    "audio_connector_num_learnable_registers": "audio_num_registers",
    "connector_rope_base_seq_len": "rope_max_pos",
    "rope_theta": "rope_theta",
    "rope_double_precision": "rope_double_precision",
    "rope_type": "rope_type",
    "per_modality_projections": "per_modality_projections",
    "proj_bias": "projection_bias",
    "video_gated_attn": "video_gated_attention",
    "audio_gated_attn": "audio_gated_attention",
}
# What LTX-2 does not vary: a json stating another value describes a model we do not build.
_FIXED_JSON = {"causal_temporal_positioning": False}
_RELEASED_HEAD_DIM = 128
_RELEASED_CAPTION_CHANNELS = 3840  # Gemma-3-12B's hidden size


def _fields_from_json(config_json: dict) -> dict:
    for name, ours in _FIXED_JSON.items():
        if config_json.get(name) is not None and config_json[name] != ours:
            raise ConfigError(f"LTX-2 connectors config.json {name}={config_json[name]!r}: only {ours!r} is supported")
    for side in _SIDES:
        if (
            f"{side}_connector_num_learnable_registers" in config_json
            and not config_json[f"{side}_connector_num_learnable_registers"]
        ):
            raise ConfigError(
                f"LTX-2 connectors config.json {side}_connector_num_learnable_registers must be a positive count "
                "(connectors without registers are not supported)"
            )
    return {ours: config_json[name] for name, ours in _JSON_FIELDS.items() if config_json.get(name) is not None}


def _split_projection_input(fields: dict, in_dim: int) -> None:
    """2.3: the projections read caption_channels x text_proj_in_factor features; split that product."""
    if "caption_channels" not in fields:
        factor = fields.get("text_proj_in_factor")
        fields["caption_channels"] = in_dim // factor if factor else _RELEASED_CAPTION_CHANNELS
    channels = fields["caption_channels"]
    fields.setdefault("text_proj_in_factor", in_dim // channels)
    if channels * fields["text_proj_in_factor"] != in_dim:
        raise ConfigError(
            f"LTX-2 connectors: the projections read {in_dim} features, not caption_channels={channels} x "
            f"text_proj_in_factor={fields['text_proj_in_factor']} (give both in the config)"
        )


def config_from_state(state: StateDict, config_json: dict | None = None) -> LTX2ConnectorsConfig:
    """Config from our-named shapes and, when present, the diffusers `config.json` beside the file (a value
    contradicting the shapes is an error naming the field)."""
    given = _fields_from_json(config_json) if config_json else {}
    derived, widths, in_dim = _fields_from_shapes(state)
    fields = merge_fields("LTX-2 connectors", given, derived)
    if fields["per_modality_projections"]:
        _split_projection_input(fields, in_dim)
        for side in _SIDES:  # diffusers names the projections' widths too
            said = (config_json or {}).get(f"{side}_hidden_dim")
            if said is not None and said != widths[side]:
                raise ConfigError(
                    f"LTX-2 connectors config.json says {side}_hidden_dim={said!r} but the checkpoint's "
                    f"shapes give {widths[side]!r}"
                )
    for side in _SIDES:
        heads, head_dim = f"{side}_num_heads", f"{side}_head_dim"
        if heads in fields and head_dim not in fields:
            fields[head_dim] = widths[side] // fields[heads]
        fields.setdefault(head_dim, _RELEASED_HEAD_DIM)
        fields.setdefault(heads, widths[side] // fields[head_dim])
    return build_config(LTX2ConnectorsConfig, "LTX-2 connectors", fields)


LTX2_CONNECTORS_SPEC = ModelSpec(
    name="ltx2_connectors",
    role="connectors",
    layouts=LAYOUTS,
    config_from_state=config_from_state,
    build=LTX2TextConnectors,
    description="LTX-2 text projection + video/audio text connectors: ltx-2-19b-*.safetensors, "
    "ltx-2.3-22b-*.safetensors, diffusers connectors/",
)

__all__ = [
    "LAYOUTS",
    "LTX2_CONNECTORS_SPEC",
    "PREFIX",
    "config_from_state",
    "diffusers_to_ours",
    "original_to_ours",
    "ours_to_diffusers",
    "ours_to_original",
]
