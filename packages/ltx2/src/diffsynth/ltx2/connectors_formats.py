"""How LTX-2 text connector checkpoints are recognised, converted and configured.

In `ltx-2-19b-dev.safetensors` the connectors are `model.diffusion_model.video_embeddings_connector.*` and
`model.diffusion_model.audio_embeddings_connector.*` (next to the DiT, whose spec leaves them to us) and
the projection is the top-level `text_embedding_projection.aggregate_embed.weight`. This spec owns
exactly those keys. Layouts:

- "original": the single file (or its connector keys), prefix stripped from the connectors;
- "original_unprefixed": the same without `model.diffusion_model.` (what our `state_dict()` is);
- "diffusers": the `connectors/` folder (`LTX2TextConnectors`), plain renames: `text_proj_in` ->
  `text_embedding_projection.aggregate_embed`, `video_connector` -> `video_embeddings_connector`,
  `transformer_blocks` -> `transformer_1d_blocks`, `norm_q` / `norm_k` -> `q_norm` / `k_norm`.

Shapes give the widths, block and register counts; the head split comes from the diffusers
`config.json` when there is one, else the released head width (128).
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
_BLOCK_PARAMS = (
    [f"attn1.{n}.weight" for n in ("q_norm", "k_norm")]
    + [f"attn1.{lin}.{p}" for lin in ("to_q", "to_k", "to_v", "to_out.0") for p in _WB]
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
        if key == PROJECTION or key in {f"{s}_embeddings_connector.learnable_registers" for s in _SIDES}:
            continue
        raise KeyError(f"LTX-2 connectors ({layout} layout): no mapping for key {key!r}")
    return state


def original_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The single file's connector keys (connectors under `model.diffusion_model.`) in our names."""
    out = {k[len(PREFIX) :] if k.startswith(PREFIX) else k: v for k, v in state.items()}
    return _check_ours(out, "original")


def diffusers_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers `LTX2TextConnectors` state dict in our (ltx-core) names; `KeyError` names an unknown key
    (e.g. LTX-2.3's per-modality projections, which LTX-2.0 lacks)."""
    out = {}
    for key, value in state.items():
        m = _DIFFUSERS_BLOCK.match(key)
        if m is not None and m.group(3) in _DIFFUSERS_BLOCK_PARAMS:
            out[
                f"{m.group(1)}_embeddings_connector.transformer_1d_blocks.{m.group(2)}.{_block_to_ours(m.group(3))}"
            ] = value
        elif key == "text_proj_in.weight":
            out[PROJECTION] = value
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
        elif key == PROJECTION:
            out["text_proj_in.weight"] = value
        else:
            out[key.replace("_embeddings_connector.", "_connector.")] = value
    return out


def ours_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our names -> the single file's names (connectors under `model.diffusion_model.`)."""
    return {(k if k == PROJECTION else PREFIX + k): v for k, v in _check_ours(dict(state), "to original").items()}


_SIGNATURE = (
    PROJECTION,
    "model.diffusion_model.video_embeddings_connector.learnable_registers",
    "model.diffusion_model.video_embeddings_connector.transformer_1d_blocks.0.attn1.to_q.weight",
    "model.diffusion_model.audio_embeddings_connector.learnable_registers",
    "model.diffusion_model.audio_embeddings_connector.transformer_1d_blocks.0.attn1.to_q.weight",
)
_CONNECTOR_PREFIXES = ("video_embeddings_connector.", "audio_embeddings_connector.")
DIFFUSERS_SIGNATURE = (
    "text_proj_in.weight",
    "video_connector.learnable_registers",
    "video_connector.transformer_blocks.0.attn1.to_q.weight",
    "audio_connector.learnable_registers",
    "audio_connector.transformer_blocks.0.attn1.to_q.weight",
)

LAYOUTS = (
    KeyLayout(
        "original",
        _SIGNATURE,
        convert=original_to_ours,
        owns_prefixes=("text_embedding_projection.",) + tuple(PREFIX + p for p in _CONNECTOR_PREFIXES),
    ),
    KeyLayout(
        "original_unprefixed",
        tuple(k[len(PREFIX) :] if k.startswith(PREFIX) else k for k in _SIGNATURE),
        convert=lambda state: _check_ours(dict(state), "original_unprefixed"),
        owns_prefixes=("text_embedding_projection.",) + _CONNECTOR_PREFIXES,
    ),
    KeyLayout(
        "diffusers",
        DIFFUSERS_SIGNATURE,
        convert=diffusers_to_ours,
        owns_prefixes=("text_proj_in.", "video_connector.", "audio_connector."),
    ),
)


# ----------------------------------------------------------------------------------- config
def _count_blocks(state: StateDict, side: str) -> int:
    n = 0
    while f"{side}_embeddings_connector.transformer_1d_blocks.{n}.attn1.to_q.weight" in state:
        n += 1
    return n


def _fields_from_shapes(state: StateDict) -> dict:
    out_dim, in_dim = state[PROJECTION].shape
    fields = dict(caption_channels=out_dim)
    if in_dim % out_dim:
        raise ConfigError(
            f"LTX-2 connectors: {PROJECTION} has shape {tuple(state[PROJECTION].shape)}; its input width must be "
            "a multiple of its output width (hidden states x caption channels)"
        )
    fields["text_proj_in_factor"] = in_dim // out_dim
    for side in _SIDES:
        registers = state[f"{side}_embeddings_connector.learnable_registers"]
        if registers.shape[1] != out_dim:
            raise ConfigError(
                f"LTX-2 connectors: {side} registers are {registers.shape[1]} wide but the projection gives {out_dim}"
            )
        fields[f"{side}_num_registers"] = registers.shape[0]
        fields[f"{side}_num_layers"] = _count_blocks(state, side)
    return fields


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
}
# What LTX-2.0 does not vary: a json stating another value describes a model we do not build.
_FIXED_JSON = {
    "per_modality_projections": False,
    "proj_bias": False,
    "video_gated_attn": False,
    "audio_gated_attn": False,
    "causal_temporal_positioning": False,
}
_RELEASED_HEAD_DIM = 128


def _fields_from_json(config_json: dict) -> dict:
    for name, ours in _FIXED_JSON.items():
        if config_json.get(name) is not None and config_json[name] != ours:
            raise ConfigError(
                f"LTX-2 connectors config.json {name}={config_json[name]!r}: only {ours!r} is supported (LTX-2.0)"
            )
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


def config_from_state(state: StateDict, config_json: dict | None = None) -> LTX2ConnectorsConfig:
    """Config from our-named shapes and, when present, the diffusers `config.json` beside the file (a value
    contradicting the shapes is an error naming the field)."""
    given = _fields_from_json(config_json) if config_json else {}
    fields = merge_fields("LTX-2 connectors", given, _fields_from_shapes(state))
    width = fields["caption_channels"]
    for side in _SIDES:
        heads, head_dim = f"{side}_num_heads", f"{side}_head_dim"
        if heads in fields and head_dim not in fields:
            fields[head_dim] = width // fields[heads]
        fields.setdefault(head_dim, _RELEASED_HEAD_DIM)
        fields.setdefault(heads, width // fields[head_dim])
    return build_config(LTX2ConnectorsConfig, "LTX-2 connectors", fields)


LTX2_CONNECTORS_SPEC = ModelSpec(
    name="ltx2_connectors",
    role="connectors",
    layouts=LAYOUTS,
    config_from_state=config_from_state,
    build=LTX2TextConnectors,
    description="LTX-2 text projection + video/audio text connectors: ltx-2-19b-*.safetensors, diffusers connectors/",
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
