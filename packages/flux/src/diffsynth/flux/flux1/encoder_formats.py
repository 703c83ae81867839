"""How FLUX.1's text encoder files are recognised, converted and configured.

Our modules are the transformers 5 classes (`CLIPTextModel`, `T5EncoderModel`), whose names are:

- CLIP-L: `embeddings.*`, `encoder.layers.N.*`, `final_layer_norm.*`. Hub files
  (`text_encoder/model.safetensors`, transformers 4.x) put everything under `text_model.`, some
  with the `text_model.embeddings.position_ids` buffer, which we drop and rebuild. ComfyUI's
  `clip_l.safetensors` is the same `text_model.*` layout.
- T5-XXL v1.1 encoder: `shared.weight`, `encoder.block.N.layer.{0,1}.*`, `encoder.final_layer_norm`.
  The tied `encoder.embed_tokens.weight` is usually not stored (hub shards hold `shared.weight`
  only); some repacks store only the other one or both. Whichever is absent is filled from the other.

Shapes give every size but CLIP's head count, which follows the released widths (12 heads at 768)
unless a CLIP `config.json` beside the file says otherwise. A `config.json` of another kind of model
is ignored.
"""

from __future__ import annotations

import re

import torch

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.models.t5_shapes import t5_shape_facts
from diffsynth.runtime.registry import KeyLayout, ModelSpec, StateDict, check_config_facts

# ----------------------------------------------------------------------------------------- CLIP text
CLIP_FILE_PREFIX = "text_model."
_CLIP_POSITION_IDS = ("embeddings.position_ids", "text_model.embeddings.position_ids")
_CLIP_LAYER = re.compile(r"encoder\.layers\.(\d+)\.")
_CLIP_HEADS_BY_WIDTH = {512: 8, 768: 12, 1024: 16, 1280: 20}  # CLIP-B, -L, -H, -bigG text towers

# openai/clip-vit-large-patch14 text config, for what shapes cannot tell. eos_token_id 2 is the
# legacy value of the released config: transformers then pools at the highest token id (the end token).
CLIP_L_DEFAULTS = dict(
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    projection_dim=768,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)


def clip_drop_position_ids(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The stored `position_ids` buffer is not a weight: we rebuild it, so it is dropped here."""
    return {k: v for k, v in state.items() if k not in _CLIP_POSITION_IDS}


def _clip_facts(state: StateDict) -> dict[str, object]:
    vocab, hidden = state["embeddings.token_embedding.weight"].shape
    layers = {int(m.group(1)) for k in state if (m := _CLIP_LAYER.match(k))}
    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        max_position_embeddings=state["embeddings.position_embedding.weight"].shape[0],
        num_hidden_layers=max(layers) + 1 if layers else 0,
        intermediate_size=state["encoder.layers.0.mlp.fc1.weight"].shape[0],
    )


def _clip_json(config_json: dict | None) -> dict | None:
    if not config_json:
        return None
    if isinstance(config_json.get("text_config"), dict):  # a whole CLIPConfig
        return config_json["text_config"]
    if config_json.get("model_type") == "clip_text_model":
        return config_json
    return None


def clip_config_from_state(state: StateDict, config_json: dict | None = None):
    """`CLIPTextConfig` from shapes; a CLIP text `config.json` adds heads, activation, token ids and is checked."""
    from transformers import CLIPTextConfig

    facts = _clip_facts(state)
    given = _clip_json(config_json) or {}
    fields = {k: v for k, v in given.items() if not k.startswith("_") and k not in ("architectures", "model_type")}
    hidden = facts["hidden_size"]
    heads = _CLIP_HEADS_BY_WIDTH.get(hidden, max(1, hidden // 64))
    config = CLIPTextConfig(**{**CLIP_L_DEFAULTS, "num_attention_heads": heads, **facts, **fields})
    check_config_facts("CLIP text config.json", config, facts)
    if hidden % config.num_attention_heads:
        raise ConfigError(
            f"CLIP text: hidden_size={hidden} is not divisible by num_attention_heads={config.num_attention_heads}"
        )
    return config


def build_clip(config):
    from .text_encoder import FluxCLIPTextEncoder

    return FluxCLIPTextEncoder(config)


_CLIP_SIGNATURE = (
    "embeddings.token_embedding.weight",
    "embeddings.position_embedding.weight",
    "encoder.layers.0.self_attn.q_proj.weight",
    "encoder.layers.0.mlp.fc1.weight",
    "final_layer_norm.weight",
)
_CLIP_OWNS = ("embeddings.", "encoder.layers.", "final_layer_norm.", "text_model.embeddings.position_ids")

CLIP_TEXT_SPEC = ModelSpec(
    name="clip_text_encoder",
    role="clip_text_encoder",
    layouts=(
        # hub `text_encoder/model.safetensors` (transformers 4.x names), ComfyUI `clip_l.safetensors`
        KeyLayout("transformers4", _CLIP_SIGNATURE, prefix=CLIP_FILE_PREFIX, convert=clip_drop_position_ids),
        # transformers 5 `CLIPTextModel.state_dict()`
        KeyLayout("transformers5", _CLIP_SIGNATURE, convert=clip_drop_position_ids, owns_prefixes=_CLIP_OWNS),
    ),
    config_from_state=clip_config_from_state,
    build=build_clip,
    description="CLIP text encoder (FLUX.1 text_encoder/: CLIP-L, pooled output)",
)

# ----------------------------------------------------------------------------------------- T5 encoder
_T5_EMBED_KEYS = ("shared.weight", "encoder.embed_tokens.weight")

# google/t5-v1_1-xxl values for what shapes cannot tell (FLUX.1 text_encoder_2/config.json).
T5_XXL_DEFAULTS = dict(
    feed_forward_proj="gated-gelu",
    layer_norm_epsilon=1e-6,
    relative_attention_max_distance=128,
    dropout_rate=0.0,
    tie_word_embeddings=False,
    is_encoder_decoder=False,
    use_cache=False,
)


def t5_fill_embeddings(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fill in whichever of the two tied embedding keys the file left out."""
    out = dict(state)
    present = [k for k in _T5_EMBED_KEYS if k in out]
    if not present:
        raise KeyError(_T5_EMBED_KEYS[0])
    for key in _T5_EMBED_KEYS:
        out.setdefault(key, out[present[0]])
    return out


def t5_config_from_state(state: StateDict, config_json: dict | None = None):
    """`T5Config` from shapes (and a T5 `config.json` beside the file, checked against them)."""
    from transformers import T5Config

    facts = t5_shape_facts(state)
    given = config_json if config_json and config_json.get("model_type") == "t5" else {}
    drop = ("architectures", "model_type", "num_decoder_layers")
    fields = {k: v for k, v in given.items() if not k.startswith("_") and k not in drop}
    config = T5Config(**{**T5_XXL_DEFAULTS, **fields, "num_decoder_layers": 0})
    check_config_facts("T5 config.json", fields, facts)
    for field, value in facts.items():
        setattr(config, field, value)
    if not config.is_gated_act:
        raise ConfigError(
            f"T5 config feed_forward_proj={config.feed_forward_proj!r}: the weights have wi_0/wi_1 (gated, T5 v1.1)"
        )
    return config


def build_t5(config):
    from .text_encoder import FluxT5Encoder

    return FluxT5Encoder(config)


# Only block 0 holds a relative position bias in T5 (umT5 has one per block; Wan's spec asks for
# block 1's and its longer signature wins on umT5 files). wi_0 marks the gated v1.1 feed-forward.
_T5_SIGNATURE = (
    "encoder.block.0.layer.0.SelfAttention.q.weight",
    "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
    "encoder.block.0.layer.1.DenseReluDense.wi_0.weight",
    "encoder.final_layer_norm.weight",
)

T5_ENCODER_SPEC = ModelSpec(
    name="t5_encoder",
    role="t5_text_encoder",
    layouts=(
        # hub `text_encoder_2/` shards, transformers 4.x/5 `T5EncoderModel`, ComfyUI `t5xxl_*.safetensors`
        KeyLayout("transformers", _T5_SIGNATURE, convert=t5_fill_embeddings, owns_prefixes=("shared.", "encoder.")),
    ),
    config_from_state=t5_config_from_state,
    build=build_t5,
    description="T5 v1.1 encoder (FLUX.1 text_encoder_2/: T5-XXL)",
)

__all__ = [
    "CLIP_TEXT_SPEC",
    "T5_ENCODER_SPEC",
    "clip_config_from_state",
    "clip_drop_position_ids",
    "t5_config_from_state",
    "t5_fill_embeddings",
]
