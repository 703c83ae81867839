"""How LTX's Gemma text encoder files are recognised, converted and configured: Gemma-3-12B (LTX-2.0 to 2.3)
and the Gemma 4 of LTX-2.5 (end of this module).

The released encoder is `google/gemma-3-12b-it-qat-q4_0-unquantized` (`model-*.safetensors`, 1065
tensors): a whole `Gemma3ForConditionalGeneration` (SigLIP vision tower, projector, language model;
no `lm_head`, it is tied). LTX-2 reads hidden states of the language model only, so our module is
transformers' `Gemma3TextModel` (`embed_tokens.*`, `layers.N.*`, `norm.*`) and the vision tower and
projector (and an `lm_head`, where a file stores one) are dropped on purpose. The spec owns the whole
file, so the loader does not stop on the dropped keys; any other key is an error naming it. Layouts:

- hub files (transformers 4.x names): `language_model.model.*`, `vision_tower.vision_model.*`,
  `multi_modal_projector.*`;
- transformers 5 `Gemma3ForConditionalGeneration.state_dict()`: `model.language_model.*`,
  `model.vision_tower.*`, `model.multi_modal_projector.*`, `lm_head.weight`.

Shapes give the widths, layer and head counts (`q_norm` is one head wide). Sliding window, layer
pattern, RoPE and attention scaling come from the `config.json` beside the file (its `text_config`),
else from the released Gemma-3-12B values. Gemma files are told apart from Mistral3 ones by the
Gemma-only `pre_feedforward_layernorm` and `mm_input_projection_weight`.
"""

from __future__ import annotations

from collections.abc import Callable

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.models.text_decoder import LAYER_KEY, language_model_converters
from diffsynth.runtime.registry import KeyLayout, ModelSpec, StateDict, build_config, check_config_facts

# Gemma-3-12B text config values the shapes cannot tell (its config.json `text_config` plus the
# Gemma3TextConfig defaults it relies on), in the legacy form transformers converts.
GEMMA3_12B_DEFAULTS = dict(
    query_pre_attn_scalar=256,
    sliding_window=1024,
    sliding_window_pattern=6,  # every 6th layer attends globally
    rope_theta=1_000_000.0,  # global layers, with linear scaling x8
    rope_scaling={"factor": 8.0, "rope_type": "linear"},
    rope_local_base_freq=10_000.0,  # sliding layers
    rms_norm_eps=1e-6,
    hidden_activation="gelu_pytorch_tanh",
    max_position_embeddings=131072,
    attn_logit_softcapping=None,
    final_logit_softcapping=None,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
)

_LAYER_PARAMS = frozenset(
    [f"self_attn.{p}_proj.{t}" for p in "qkvo" for t in ("weight", "bias")]
    + ["self_attn.q_norm.weight", "self_attn.k_norm.weight"]
    + [f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
    + [f"{n}_layernorm.weight" for n in ("input", "post_attention", "pre_feedforward", "post_feedforward")]
)


_CONVERTERS = language_model_converters("Gemma3", _LAYER_PARAMS)
gemma3_from_hub = _CONVERTERS["hub"]  # the hub file: language_model.model.*, vision_tower.*, ...
gemma3_from_transformers5 = _CONVERTERS["transformers5"]  # model.language_model.*, model.vision_tower.*, ...


_LM_SIGNATURE = (
    "embed_tokens.weight",
    "layers.0.self_attn.q_proj.weight",
    "layers.0.self_attn.q_norm.weight",
    "layers.0.mlp.gate_proj.weight",
    "layers.0.pre_feedforward_layernorm.weight",
    "norm.weight",
)
_PROJECTOR = "multi_modal_projector.mm_input_projection_weight"

LAYOUTS = (
    KeyLayout(
        "hub",
        tuple("language_model.model." + k for k in _LM_SIGNATURE) + (_PROJECTOR,),
        convert=gemma3_from_hub,
        owns_prefixes=("language_model.", "vision_tower.", "multi_modal_projector."),
    ),
    KeyLayout(
        "transformers5",
        tuple("model.language_model." + k for k in _LM_SIGNATURE) + ("model." + _PROJECTOR,),
        convert=gemma3_from_transformers5,
        owns_prefixes=("model.language_model.", "model.vision_tower.", "model.multi_modal_projector.", "lm_head."),
    ),
)

_BOOKKEEPING = ("architectures", "model_type", "torch_dtype", "dtype", "transformers_version")


def _text_json(config_json: dict | None) -> dict | None:
    """The Gemma3 text config inside a Gemma3 `config.json` (or a bare `gemma3_text` one), minus bookkeeping."""
    if not config_json:
        return None
    kind = config_json.get("model_type")
    if isinstance(config_json.get("text_config"), dict):
        text = config_json["text_config"]
    elif kind == "gemma3_text":
        text = config_json
    else:
        raise ConfigError(
            f"Gemma3 text encoder: the config.json beside the file is a {kind!r} config with no text_config; "
            "expected the Gemma3 (model_type 'gemma3') config.json of the text encoder's folder"
        )
    return {k: v for k, v in text.items() if not k.startswith("_") and k not in _BOOKKEEPING}


def _shape_facts(state: StateDict) -> dict[str, object]:
    vocab, hidden = state["embed_tokens.weight"].shape
    head_dim = state["layers.0.self_attn.q_norm.weight"].shape[0]
    layers = {int(m.group(1)) for k in state if (m := LAYER_KEY.fullmatch(k))}
    q_width = state["layers.0.self_attn.q_proj.weight"].shape[0]
    kv_width = state["layers.0.self_attn.k_proj.weight"].shape[0]
    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=max(layers) + 1,
        head_dim=head_dim,
        num_attention_heads=q_width // head_dim,
        num_key_value_heads=kv_width // head_dim,
        intermediate_size=state["layers.0.mlp.gate_proj.weight"].shape[0],
        attention_bias="layers.0.self_attn.q_proj.bias" in state,
    )


def gemma3_text_config(state: StateDict, config_json: dict | None = None):
    """`Gemma3TextConfig` of the language model: shapes, plus the `config.json` (checked against them) or
    the released Gemma-3-12B values."""
    from transformers import Gemma3TextConfig

    given = _text_json(config_json)
    facts = _shape_facts(state)
    if given is None:
        fields = dict(GEMMA3_12B_DEFAULTS)
    else:
        check_config_facts("Gemma3 config.json text_config", given, facts)
        fields = given
    return build_config(Gemma3TextConfig, "Gemma3 text encoder", {**fields, **facts})


def build_gemma3_text(config):
    from .text_encoder import Gemma3TextEncoder

    return Gemma3TextEncoder(config)


GEMMA3_TEXT_SPEC = ModelSpec(
    name="gemma3_text_encoder",
    role="text_encoder",
    layouts=LAYOUTS,
    config_from_state=gemma3_text_config,
    build=build_gemma3_text,
    description="Gemma-3-12B language model (LTX-2 text encoder, gemma-3-12b-it-qat-q4_0-unquantized); hidden states only",
)


# ----------------------------------------------------------------------------------------- Gemma 4 (LTX-2.5)
# LTX-2.5's diffusers folder (`Lightricks/LTX-2.5-Diffusers`) holds its encoder in `text_encoder/` as a
# `Gemma4UnifiedForConditionalGeneration` (config.json `model_type` "gemma4_unified"). That model has no
# vision or audio tower, only light embedders that project patches / waveform frames into the language
# model; LTX reads hidden states of the language model only, so our module is transformers'
# `Gemma4UnifiedTextModel` and this spec owns and drops on purpose:
#
# - `model.vision_embedder.*`, `model.embed_vision.embedding_projection.*`, `model.embed_audio.*`: the
#   embedders as `save_pretrained` writes them (the names in the folder's safetensors);
# - `model.embed_vision.*` (with `multimodal_embedder.`), `lm_head.*`: the same parts under the names
#   `Gemma4UnifiedForConditionalGeneration.state_dict()` gives (the tied lm_head is not saved).
#
# Any other key is an error naming it. The language model's own keys (`embed_tokens.weight`,
# `layers.N.*`, `norm.weight`) also load on their own (layout "text_model"). Gemma 4 layers are told
# apart from Gemma 3 ones by their stored `layer_scalar`. The config is the config.json's `text_config`
# (its per-layer widths, RoPE tables, sliding window and key/value sharing cannot be read from shapes),
# checked against the shapes; a file without one needs `config=` (that config.json, or its text_config).

_GEMMA4_LAYER_PARAMS = frozenset(
    [f"self_attn.{p}_proj.{t}" for p in "qkvo" for t in ("weight", "bias")]
    + ["self_attn.q_norm.weight", "self_attn.k_norm.weight", "layer_scalar"]
    + [f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
    + [f"{n}_layernorm.weight" for n in ("input", "post_attention", "pre_feedforward", "post_feedforward")]
)
GEMMA4_LM_PREFIX = "model.language_model."
# The parts of a Gemma4UnifiedForConditionalGeneration file a text encoder does not use (see above).
GEMMA4_DROPPED_PREFIXES = ("model.vision_embedder.", "model.embed_vision.", "model.embed_audio.", "lm_head.")


def _gemma4_converter(layout: str, lm_prefix: str, dropped: tuple[str, ...]) -> Callable:
    """Keep the language model's keys (without `lm_prefix`), drop `dropped`, and name anything else."""

    def convert(state: StateDict) -> dict:
        out = {}
        for key, value in state.items():
            if key.startswith(dropped):
                continue
            name = key[len(lm_prefix) :] if key.startswith(lm_prefix) else None
            m = LAYER_KEY.fullmatch(name) if name is not None else None
            if name is None or not (
                name in ("embed_tokens.weight", "norm.weight") or (m and m.group(2) in _GEMMA4_LAYER_PARAMS)
            ):
                raise KeyError(f"Gemma4 ({layout} layout): no mapping for key {key!r}")
            out[name] = value
        return out

    return convert


# LTX-2.5's own text encoder file (`text_encoders/gemma4-12b-with-proj-ltx-2.5-bf16.safetensors`, see
# `split_files.py`) packs the same model as ComfyUI lays it out: the language model flattened to `model.*` and the
# embedders renamed (`vision_model.`, `multi_modal_projector.`, `audio_projector.`; files packed before that
# rename keep the transformers names), plus the tokenizer and the processor's sidecar files as uint8 tensors
# (`tokenizer_json`, `hf_asset__<file name>`), read by `split_files.gemma_tokenizer`, not by the model: layout
# "ltx_split", or "transformers" (which also drops the tokenizer tensors) for a file packed with transformers'
# names. Its `text_embedding_projection.*` belong to the text connectors (`connectors_formats.py`).
GEMMA4_FLAT_PREFIX = "model."
GEMMA4_FLAT_LM_PREFIXES = ("model.embed_tokens.", "model.layers.", "model.norm.")
GEMMA4_COMFY_DROPPED_PREFIXES = ("vision_model.", "multi_modal_projector.", "audio_projector.")
LTX_TEXT_ENCODER_ASSETS = ("tokenizer_json", "hf_asset__")
_FLAT_DROPPED = GEMMA4_COMFY_DROPPED_PREFIXES + GEMMA4_DROPPED_PREFIXES[:3] + LTX_TEXT_ENCODER_ASSETS
gemma4_from_ltx_flat = _gemma4_converter("ltx_split", GEMMA4_FLAT_PREFIX, _FLAT_DROPPED)
gemma4_from_transformers = _gemma4_converter(
    "transformers", GEMMA4_LM_PREFIX, GEMMA4_DROPPED_PREFIXES + LTX_TEXT_ENCODER_ASSETS
)

_GEMMA4_SIGNATURE = (
    "embed_tokens.weight",
    "layers.0.self_attn.q_proj.weight",
    "layers.0.self_attn.q_norm.weight",
    "layers.0.mlp.gate_proj.weight",
    "layers.0.pre_feedforward_layernorm.weight",
    "layers.0.layer_scalar",
    "norm.weight",
)

GEMMA4_LAYOUTS = (
    KeyLayout(  # also LTX-2.5's text encoder file when packed with these names (its tokenizer tensors dropped)
        "transformers",  # the diffusers text_encoder/ folder (save_pretrained names) or the model's state_dict
        tuple(GEMMA4_LM_PREFIX + k for k in _GEMMA4_SIGNATURE),
        convert=gemma4_from_transformers,
        owns_prefixes=(GEMMA4_LM_PREFIX, *GEMMA4_DROPPED_PREFIXES, *LTX_TEXT_ENCODER_ASSETS),
    ),
    KeyLayout(
        "text_model",  # Gemma4UnifiedTextModel.state_dict(): our names
        _GEMMA4_SIGNATURE,
        convert=_gemma4_converter("text_model", "", ()),
        owns_prefixes=("embed_tokens.", "layers.", "norm."),
    ),
    KeyLayout(
        "ltx_split",  # LTX-2.5's text encoder file: ComfyUI's flat names (`model.layers.N.*`)
        tuple(GEMMA4_FLAT_PREFIX + k for k in _GEMMA4_SIGNATURE),
        convert=gemma4_from_ltx_flat,
        owns_prefixes=GEMMA4_FLAT_LM_PREFIXES + _FLAT_DROPPED,
    ),
)


def _gemma4_text_json(config_json: dict | None) -> dict:
    if not config_json:
        raise ConfigError(
            "Gemma4 text encoder: its config is needed (per-layer widths, RoPE, sliding window and key/value "
            "sharing are not in the weights): load the text_encoder/ folder with its config.json "
            "(model_type 'gemma4_unified'), pass config= with that config.json or its text_config, or load "
            "LTX-2.5's text encoder file with `split_files.load_split` (it reads the file's `gemma_config` metadata)"
        )
    kind = config_json.get("model_type")
    if kind == "gemma4_unified" and isinstance(config_json.get("text_config"), dict):
        text = config_json["text_config"]
    elif kind == "gemma4_unified_text":
        text = config_json
    else:
        raise ConfigError(
            f"Gemma4 text encoder: the config.json is a {kind!r} config; expected the text_encoder/ folder's "
            "Gemma4UnifiedForConditionalGeneration one (model_type 'gemma4_unified', with a text_config) "
            "or its text_config (model_type 'gemma4_unified_text')"
        )
    return {k: v for k, v in text.items() if not k.startswith("_") and k not in _BOOKKEEPING}


def gemma4_text_config(state: StateDict, config_json: dict | None = None):
    """`Gemma4UnifiedTextConfig` from the config.json's `text_config`, checked against the shapes: the
    model-wide sizes first, then each layer's head width (global layers may be wider)."""
    from .gemma4_text_encoder import require_gemma4_transformers

    require_gemma4_transformers()
    from transformers import Gemma4UnifiedTextConfig

    given = _gemma4_text_json(config_json)
    vocab, hidden = state["embed_tokens.weight"].shape
    layers = {int(m.group(1)) for k in state if (m := LAYER_KEY.fullmatch(k))}
    facts = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=max(layers) + 1,
        attention_bias="layers.0.self_attn.q_proj.bias" in state,
    )
    check_config_facts("Gemma4 config.json text_config", given, facts)
    config = build_config(Gemma4UnifiedTextConfig, "Gemma4 text encoder", {**given, **facts})
    for i in range(config.num_hidden_layers):
        key = f"layers.{i}.self_attn.q_norm.weight"
        said = config.per_layer_config[i].head_dim
        if key in state and state[key].shape[0] != said:
            raise ConfigError(
                f"Gemma4 config.json text_config gives layer {i} ({config.layer_types[i]}) head_dim={said} "
                f"but the weights have {state[key].shape[0]} ({key})"
            )
    return config


def build_gemma4_text(config):
    from .gemma4_text_encoder import Gemma4TextEncoder, require_gemma4_transformers

    require_gemma4_transformers()
    return Gemma4TextEncoder(config)


GEMMA4_TEXT_SPEC = ModelSpec(
    name="gemma4_text_encoder",
    role="text_encoder",
    layouts=GEMMA4_LAYOUTS,
    config_from_state=gemma4_text_config,
    build=build_gemma4_text,
    description="Gemma 4 language model of a Gemma4UnifiedForConditionalGeneration (LTX-2.5 text encoder, "
    "Lightricks/LTX-2.5-Diffusers text_encoder/); hidden states only, the vision / audio embedders dropped",
)

__all__ = [
    "GEMMA3_12B_DEFAULTS",
    "GEMMA3_TEXT_SPEC",
    "GEMMA4_LAYOUTS",
    "LTX_TEXT_ENCODER_ASSETS",
    "GEMMA4_TEXT_SPEC",
    "LAYOUTS",
    "gemma3_from_hub",
    "gemma3_from_transformers5",
    "gemma3_text_config",
    "gemma4_from_ltx_flat",
    "gemma4_from_transformers",
    "gemma4_text_config",
]
