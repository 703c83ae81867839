"""How LTX-2.5 duration head checkpoints are recognised and configured.

The authors' `ltx-2.5-duration-head-bf16.safetensors` holds the head under `duration_head.` with ltx-core's module
names (ours). diffusers' `LTX2DurationHead` (a `duration_head/` folder) names the pooler's projections `to_q`,
`to_k`, `to_v`, `to_out`; they are packed into `in_proj_*` / renamed here. Widths come from the shapes; the
head count, which shapes cannot give, from diffusers' `config.json` or the authors' file metadata
(`config.duration_head.num_pooler_heads`), else the released 4.
"""

from __future__ import annotations

import json

import torch

from diffsynth.runtime.errors import CheckpointError
from diffsynth.runtime.registry import KeyLayout, ModelSpec, StateDict, build_config, merge_fields

from .duration_head import LTX2DurationHead, LTX2DurationHeadConfig

PREFIX = "duration_head."
SIGNATURE = ("video_input_proj.weight", "audio_input_proj.weight", "mlp_out.weight")
_POOLER = "attention_pooler."
_DIFFUSERS_ONLY = tuple(f"{_POOLER}{p}.weight" for p in ("to_q", "to_k", "to_v"))
_JSON_FIELDS = {
    "video_cross_attention_dim": "video_dim",
    "audio_cross_attention_dim": "audio_dim",
    "pooler_hidden_dim": "hidden_dim",
    "num_queries": "num_queries",
    "num_pooler_heads": "num_heads",
    "mlp_hidden_dim": "mlp_dim",
    "mlp_hidden": "mlp_dim",  # ltx-core's metadata name
}


def diffusers_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' separate q/k/v projections packed into `cross_attn.in_proj_*`; other names are ours."""
    out = {k: v for k, v in state.items() if not k.startswith(_POOLER) or k == f"{_POOLER}query_tokens"}
    for kind in ("weight", "bias"):
        parts = [f"{_POOLER}to_{p}.{kind}" for p in ("q", "k", "v")]
        missing = [k for k in parts if k not in state]
        if missing:
            raise KeyError(f"diffusers duration head has no {missing[0]!r}")
        out[f"{_POOLER}cross_attn.in_proj_{kind}"] = torch.cat([state[k] for k in parts])
        out[f"{_POOLER}cross_attn.out_proj.{kind}"] = state[f"{_POOLER}to_out.{kind}"]
    extra = [k for k in state if k.startswith(_POOLER) and k not in out and not k.startswith(tuple(
        f"{_POOLER}to_{p}." for p in ("q", "k", "v", "out")))]  # fmt: skip
    if extra:
        raise KeyError(f"diffusers duration head key {extra[0]!r} has no counterpart")
    return out


def ours_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `diffusers_to_ours` (tests write diffusers' layout with it)."""
    out = {k: v for k, v in state.items() if not k.startswith(f"{_POOLER}cross_attn.")}
    for kind in ("weight", "bias"):
        for name, part in zip("qkv", state[f"{_POOLER}cross_attn.in_proj_{kind}"].chunk(3), strict=True):
            out[f"{_POOLER}to_{name}.{kind}"] = part
        out[f"{_POOLER}to_out.{kind}"] = state[f"{_POOLER}cross_attn.out_proj.{kind}"]
    return out


LAYOUTS = (
    KeyLayout("original", SIGNATURE, prefix=PREFIX),
    KeyLayout("diffusers", (*SIGNATURE, *_DIFFUSERS_ONLY), convert=diffusers_to_ours),
)


def _shape(state: StateDict, key: str) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(f"LTX-2.5 duration head checkpoint has no {key!r}; cannot derive its config")
    return tuple(state[key].shape)


def _fields_from_json(config_json: dict | None) -> dict:
    """diffusers' `config.json`, or the authors' file metadata (`{"config": {"duration_head": {...}}}`)."""
    if not config_json:
        return {}
    nested = config_json.get("config")
    if isinstance(nested, str):
        try:
            nested = json.loads(nested)
        except ValueError:
            nested = None
    source = nested.get("duration_head", {}) if isinstance(nested, dict) else config_json
    return {ours: source[name] for name, ours in _JSON_FIELDS.items() if source.get(name) is not None}


def config_from_state(state: StateDict, config_json: dict | None = None) -> LTX2DurationHeadConfig:
    given = _fields_from_json(config_json)
    derived = {}
    if state:
        hidden, video = _shape(state, "video_input_proj.weight")
        queries = _shape(state, f"{_POOLER}query_tokens")[0]
        derived = dict(
            video_dim=video,
            audio_dim=_shape(state, "audio_input_proj.weight")[1],
            hidden_dim=hidden,
            num_queries=queries,
            mlp_dim=_shape(state, "mlp_hidden.weight")[0],
        )
    return build_config(
        LTX2DurationHeadConfig, "LTX-2.5 duration head", merge_fields("LTX-2.5 duration head", given, derived)
    )


LTX2_DURATION_HEAD_SPEC = ModelSpec(
    name="ltx2_duration_head",
    role="duration_head",
    layouts=LAYOUTS,
    config_from_state=config_from_state,
    build=LTX2DurationHead,
    description="LTX-2.5 duration head: the shot's length from the prompt (ltx-2.5-duration-head-bf16.safetensors; "
    "diffusers LTX2DurationHead duration_head/)",
)

__all__ = ["LAYOUTS", "LTX2_DURATION_HEAD_SPEC", "config_from_state", "diffusers_to_ours", "ours_to_diffusers"]
