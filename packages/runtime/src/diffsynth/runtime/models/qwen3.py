"""Qwen3 text encoder (Qwen3-4B for Z-Image-Turbo and FLUX.2-klein) and its checkpoint spec.

The module is transformers' `Qwen3Model` with the attributes our runtime reads, plus
`hidden_states_at`, which runs only the layers needed for the requested hidden states (the image
models read an inner layer, so the last layers are wasted work).

Hub files store the causal-LM layout (`model.*`, sometimes `lm_head.weight`); only hidden states
are used, so `lm_head` is dropped on purpose. The signature requires `q_norm`/`k_norm`, which is
what tells Qwen3 apart from Qwen2/Qwen2.5 files with otherwise identical names.
"""

from __future__ import annotations

import re

import torch
from transformers import Qwen3Config, Qwen3Model

from ..errors import ConfigError
from ..registry import KeyLayout, ModelSpec, StateDict, check_config_facts
from .text_decoder import DecoderTextEncoder


class Qwen3TextEncoder(DecoderTextEncoder, Qwen3Model):
    """transformers' `Qwen3Model`, with runtime capabilities and a partial forward (`DecoderTextEncoder`)."""


# ----------------------------------------------------------------------------- checkpoint layouts

_LAYER_PARAMS = frozenset(
    [f"self_attn.{p}_proj.{t}" for p in "qkvo" for t in ("weight", "bias")]
    + ["self_attn.q_norm.weight", "self_attn.k_norm.weight"]
    + [f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
    + ["input_layernorm.weight", "post_attention_layernorm.weight"]
)
_TOP_PARAMS = frozenset(["embed_tokens.weight", "norm.weight"])
_LAYER_KEY = re.compile(r"layers\.(\d+)\.(.+)")
_DROPPED = frozenset(["lm_head.weight"])  # only hidden states are used


def _check_names(state: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """Reject keys that are not Qwen3 parameters (a Gemma-style norm, MoE experts...)."""
    for key in state:
        m = _LAYER_KEY.fullmatch(key)
        if not (key in _TOP_PARAMS or (m is not None and m.group(2) in _LAYER_PARAMS)):
            raise KeyError(f"Qwen3 ({layout} layout): no mapping for key {key!r}")
    return state


def _from_hub(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if key in _DROPPED:
            continue
        if not key.startswith("model."):
            raise KeyError(f"Qwen3 (hub layout): no mapping for key {key!r}")
        out[key[len("model.") :]] = value
    return _check_names(out, "hub")


def _from_bare(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return _check_names(dict(state), "bare")


_SIGNATURE = (
    "embed_tokens.weight",
    "layers.0.self_attn.q_proj.weight",
    "layers.0.self_attn.q_norm.weight",
    "layers.0.self_attn.k_norm.weight",
    "layers.0.mlp.gate_proj.weight",
    "layers.0.post_attention_layernorm.weight",
    "norm.weight",
)
LAYOUTS = (
    # `Qwen3ForCausalLM` files (hub `text_encoder/model-*.safetensors`, ComfyUI `qwen_3_4b.safetensors`).
    KeyLayout("hub", tuple("model." + k for k in _SIGNATURE), convert=_from_hub, owns_prefixes=("model.", "lm_head.")),
    # A bare `Qwen3Model.state_dict()` (what we save).
    KeyLayout("bare", _SIGNATURE, convert=_from_bare, owns_prefixes=("embed_tokens.", "layers.", "norm.")),
)

# Qwen3-4B released values for what shapes cannot tell.
QWEN3_4B_DEFAULTS = dict(
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    max_position_embeddings=40960,
    tie_word_embeddings=True,
    hidden_act="silu",
)


def _shape_facts(state: StateDict) -> dict[str, object]:
    vocab, hidden = state["embed_tokens.weight"].shape
    head_dim = state["layers.0.self_attn.q_norm.weight"].shape[0]
    layers = {int(m.group(1)) for k in state if (m := _LAYER_KEY.fullmatch(k))}
    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=max(layers) + 1,
        head_dim=head_dim,
        num_attention_heads=state["layers.0.self_attn.q_proj.weight"].shape[0] // head_dim,
        num_key_value_heads=state["layers.0.self_attn.k_proj.weight"].shape[0] // head_dim,
        intermediate_size=state["layers.0.mlp.gate_proj.weight"].shape[0],
        attention_bias="layers.0.self_attn.q_proj.bias" in state,
    )


def config_from_state(state: StateDict, config_json: dict | None = None) -> Qwen3Config:
    """`Qwen3Config` from the repo's config.json when given (checked against the shapes), else from shapes."""
    facts = _shape_facts(state) if "embed_tokens.weight" in state else {}
    if config_json is not None:
        config = Qwen3Config(**config_json)
        check_config_facts("Qwen3 config.json", config, facts)
        return config
    if not facts:
        raise ConfigError("Qwen3: no config.json and no 'embed_tokens.weight' to derive the config from")
    return Qwen3Config(**QWEN3_4B_DEFAULTS, **facts)


def build(config: Qwen3Config) -> Qwen3TextEncoder:
    return Qwen3TextEncoder(config)


QWEN3_SPEC = ModelSpec(
    name="qwen3",
    role="text_encoder",
    layouts=LAYOUTS,
    config_from_state=config_from_state,
    build=build,
    description="Qwen3 text encoder (Qwen3-4B: Z-Image-Turbo, FLUX.2-klein-4B); hidden states only",
)

__all__ = [
    "LAYOUTS",
    "QWEN3_SPEC",
    "Qwen3TextEncoder",
    "config_from_state",
]
