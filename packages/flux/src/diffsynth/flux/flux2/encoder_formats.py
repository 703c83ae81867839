"""How FLUX.2's text encoder files are recognised, converted and configured.

FLUX.2-dev (`text_encoder/`, 585 tensors) is a whole `Mistral3ForConditionalGeneration`
(Mistral-Small-3.1 24B: Pixtral vision tower, projector, language model, `lm_head`). The prompt
embedding reads hidden states of the language model only, so our module is transformers'
`MistralModel` (`embed_tokens.*`, `layers.N.*`, `norm.*`) and the vision tower, the projector and
`lm_head` are dropped on purpose. The spec owns the whole file, so the loader does not stop on the
dropped keys, and a key of any other kind is an error naming it. Two layouts:

- hub files (transformers 4.x names): `language_model.model.*`, `language_model.lm_head.weight`,
  `vision_tower.*`, `multi_modal_projector.*`;
- transformers 5 `Mistral3ForConditionalGeneration.state_dict()`: `model.language_model.*`,
  `lm_head.weight`, `model.vision_tower.*`, `model.multi_modal_projector.*`.

Shapes give every size but `head_dim` (32 heads x 128 = 4096 is not the 5120 hidden width); it comes
from the `config.json` beside the file (its `text_config`), else from the released value (128), and
the head counts follow from the projection widths. FLUX.2-klein's Qwen3 encoders (4B, and 8B with its
untied `lm_head`) load through the runtime's `QWEN3_SPEC`.
"""

from __future__ import annotations

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.models.text_decoder import LAYER_KEY, language_model_converters
from diffsynth.runtime.registry import KeyLayout, ModelSpec, StateDict, build_config, check_config_facts

# Mistral-Small-3.1-24B text config, for what shapes cannot tell (transformers' Mistral3Config
# defaults, which are that release's values). sliding_window None: every layer attends fully.
MISTRAL_SMALL_DEFAULTS = dict(
    head_dim=128,
    hidden_act="silu",
    rms_norm_eps=1e-5,
    rope_theta=1_000_000_000.0,
    max_position_embeddings=131072,
    sliding_window=None,
    attention_dropout=0.0,
    tie_word_embeddings=False,
)

_LAYER_PARAMS = frozenset(
    [f"self_attn.{p}_proj.weight" for p in "qkvo"]
    + [f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
    + ["input_layernorm.weight", "post_attention_layernorm.weight"]
)


_CONVERTERS = language_model_converters("Mistral3", _LAYER_PARAMS)
mistral3_from_hub = _CONVERTERS["hub"]  # the hub file: language_model.model.*, vision_tower.*, ...
mistral3_from_transformers5 = _CONVERTERS["transformers5"]  # model.language_model.*, model.vision_tower.*, ...


# The language model's own keys plus one key each of the Pixtral tower and the Mistral3 projector:
# other `language_model.model.*` files (Gemma3 for LTX-2) have neither `patch_conv` nor `patch_merger`.
_LM_SIGNATURE = (
    "embed_tokens.weight",
    "layers.0.self_attn.q_proj.weight",
    "layers.0.self_attn.k_proj.weight",
    "layers.0.mlp.gate_proj.weight",
    "layers.0.post_attention_layernorm.weight",
    "norm.weight",
)
_VISION_SIGNATURE = ("vision_tower.patch_conv.weight", "multi_modal_projector.patch_merger.merging_layer.weight")

LAYOUTS = (
    KeyLayout(
        "hub",
        tuple("language_model.model." + k for k in _LM_SIGNATURE) + _VISION_SIGNATURE,
        convert=mistral3_from_hub,
        owns_prefixes=("language_model.", "vision_tower.", "multi_modal_projector."),
    ),
    KeyLayout(
        "transformers5",
        tuple("model.language_model." + k for k in _LM_SIGNATURE) + tuple("model." + k for k in _VISION_SIGNATURE),
        convert=mistral3_from_transformers5,
        owns_prefixes=("model.language_model.", "model.vision_tower.", "model.multi_modal_projector.", "lm_head."),
    ),
)


def _text_json(config_json: dict | None) -> dict:
    """The Mistral text config inside a Mistral3 `config.json` (or a bare Mistral one), minus bookkeeping."""
    if not config_json:
        return {}
    kind = config_json.get("model_type")
    if isinstance(config_json.get("text_config"), dict):
        text = config_json["text_config"]
    elif kind == "mistral":
        text = config_json
    else:
        raise ConfigError(
            f"Mistral3 text encoder: the config.json beside the file is a {kind!r} config with no text_config; "
            "expected the Mistral3 (model_type 'mistral3') config.json of the text_encoder/ folder"
        )
    drop = ("architectures", "model_type", "torch_dtype", "dtype", "transformers_version")
    return {k: v for k, v in text.items() if not k.startswith("_") and k not in drop}


def _shape_facts(state: StateDict, head_dim: int) -> dict[str, object]:
    vocab, hidden = state["embed_tokens.weight"].shape
    layers = {int(m.group(1)) for k in state if (m := LAYER_KEY.fullmatch(k))}
    q_width = state["layers.0.self_attn.q_proj.weight"].shape[0]
    kv_width = state["layers.0.self_attn.k_proj.weight"].shape[0]
    if q_width % head_dim or kv_width % head_dim:
        raise ConfigError(
            f"Mistral3 text encoder: head_dim={head_dim} does not divide the q/k projection widths "
            f"{q_width}/{kv_width}; put the text_encoder/config.json beside the file"
        )
    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=max(layers) + 1,
        intermediate_size=state["layers.0.mlp.gate_proj.weight"].shape[0],
        num_attention_heads=q_width // head_dim,
        num_key_value_heads=kv_width // head_dim,
    )


def mistral3_text_config(state: StateDict, config_json: dict | None = None):
    """`MistralConfig` of the language model: shapes, plus the `config.json` (checked against them) or the 24B values."""
    from transformers import MistralConfig

    given = _text_json(config_json)
    fields = {**MISTRAL_SMALL_DEFAULTS, **{k: v for k, v in given.items() if v is not None or k == "sliding_window"}}
    facts = _shape_facts(state, int(fields["head_dim"]))
    check_config_facts("Mistral3 config.json text_config", given, facts)
    return build_config(MistralConfig, "Mistral3 text encoder", {**fields, **facts})


def build_mistral3_text(config):
    from .text_encoder import Mistral3TextEncoder

    return Mistral3TextEncoder(config)


MISTRAL3_TEXT_SPEC = ModelSpec(
    name="mistral3_text_encoder",
    role="text_encoder",
    layouts=LAYOUTS,
    config_from_state=mistral3_text_config,
    build=build_mistral3_text,
    description="Mistral-Small-3.1 language model (FLUX.2-dev text_encoder/); hidden states only",
)

__all__ = [
    "LAYOUTS",
    "MISTRAL3_TEXT_SPEC",
    "MISTRAL_SMALL_DEFAULTS",
    "mistral3_from_hub",
    "mistral3_from_transformers5",
    "mistral3_text_config",
]
