"""Qwen2.5-VL (transformers' `Qwen2_5_VLModel`): the model, its checkpoint layouts and spec, shared by families.

Qwen-Image reads the final-normed hidden states of the language model (its Edit models also run reference images
through the vision tower); Step1X-Edit (FLUX package) reads the same states of Qwen2.5-VL-7B-Instruct. Hub
`text_encoder/` shards and the Instruct repo store the causal-LM layout (`model.layers.*`, `visual.*`,
`lm_head.weight`); transformers 5 saves `model.language_model.*` / `model.visual.*`. Both load strictly into our
names (`language_model.*`, `visual.*`); `lm_head` is dropped on purpose, since no logits are ever computed.
"""

from __future__ import annotations

import re

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLModel

from ..errors import ConfigError
from ..registry import KeyLayout, ModelSpec, StateDict, check_config_facts


class Qwen25VLTextEncoder(Qwen2_5_VLModel):
    """transformers' `Qwen2_5_VLModel` with the capabilities our runtime reads."""

    offload_units = ("language_model.layers", "visual.blocks")
    compile_units = ("language_model.layers",)
    _ROTARY = ("language_model.rotary_emb", "visual.rotary_pos_emb")

    def __init__(self, config: Qwen2_5_VLConfig):
        super().__init__(config)
        # rotary tables are non-persistent buffers: a meta build keeps them on meta after an assign-load
        self.register_load_state_dict_post_hook(lambda module, _keys: module.materialize_buffers())

    def materialize_buffers(self) -> None:
        """Loader hook: recompute the rotary tables (never in a checkpoint) where the weights live."""
        device = self.language_model.embed_tokens.weight.device
        if device.type == "meta":
            return
        for path in self._ROTARY:
            old = self.get_submodule(path)
            with torch.device(device):
                fresh = type(old)(old.config)
            for name, buffer in fresh.named_buffers(recurse=False):
                setattr(old, name, buffer)

    def _apply(self, fn, recurse=True):
        # keep the rotary frequencies in float32 under `.to(bfloat16)`, as `from_pretrained(dtype=...)` does
        super()._apply(fn, recurse)
        inv_freq = self.language_model.rotary_emb.inv_freq
        if inv_freq.dtype != torch.float32 and inv_freq.device.type != "meta":
            self.materialize_buffers()
        return self

    def last_hidden_state(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **vision) -> torch.Tensor:
        """Final-normed hidden states `[B, L, hidden]` (what the authors read as `hidden_states[-1]`).

        `vision` takes `pixel_values` / `image_grid_thw` from the processor for prompts with images.
        """
        out = self(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **vision)
        return out.last_hidden_state


# ----------------------------------------------------------------------------- checkpoint layouts
_LAYER_KEY = re.compile(r"language_model\.layers\.(\d+)\.")
_DROPPED = frozenset(["lm_head.weight"])  # only hidden states are used


def _renamer(rules: tuple[tuple[str, str], ...], layout: str):
    def convert(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for key, value in state.items():
            if key in _DROPPED:
                continue
            for old, new in rules:
                if key.startswith(old):
                    out[new + key[len(old) :]] = value
                    break
            else:
                raise KeyError(f"Qwen2.5-VL ({layout} layout): no mapping for key {key!r}")
        return out

    return convert


# older causal-LM files (Qwen-Image `text_encoder/`, Qwen2.5-VL-7B-Instruct): `model.` is the LM
_HUB_RULES = (("visual.", "visual."), ("model.", "language_model."))
# transformers 5 `Qwen2_5_VLForConditionalGeneration.save_pretrained`
_TF5_RULES = (("model.visual.", "visual."), ("model.language_model.", "language_model."))
_BARE_RULES = (("visual.", "visual."), ("language_model.", "language_model."))

_LM_SIGNATURE = (
    "embed_tokens.weight",
    "layers.0.self_attn.q_proj.weight",
    "layers.0.self_attn.q_proj.bias",
    "layers.0.mlp.gate_proj.weight",
    "norm.weight",
)
_VISION_SIGNATURE = ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "merger.mlp.0.weight")


def _signature(lm: str, vision: str) -> tuple[str, ...]:
    return tuple(lm + k for k in _LM_SIGNATURE) + tuple(vision + k for k in _VISION_SIGNATURE)


LAYOUTS = (
    KeyLayout(
        "hub",
        _signature("model.", "visual."),
        convert=_renamer(_HUB_RULES, "hub"),
        owns_prefixes=("model.", "visual.", "lm_head."),
    ),
    KeyLayout(
        "transformers5",
        _signature("model.language_model.", "model.visual."),
        convert=_renamer(_TF5_RULES, "transformers5"),
        owns_prefixes=("model.language_model.", "model.visual.", "lm_head."),
    ),
    KeyLayout(
        "bare",
        _signature("language_model.", "visual."),
        convert=_renamer(_BARE_RULES, "bare"),
        owns_prefixes=("language_model.", "visual."),
    ),
)

# Qwen2.5-VL-7B-Instruct (Qwen-Image `text_encoder/config.json`) for what shapes cannot tell
QWEN25VL_7B_TEXT = dict(
    rms_norm_eps=1e-6,
    max_position_embeddings=128000,
    hidden_act="silu",
    rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]},
    tie_word_embeddings=False,
)
QWEN25VL_7B_VISION = dict(
    hidden_act="silu",
    num_heads=16,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31],
    tokens_per_second=2,
)


def _shape_facts(state: StateDict) -> dict[str, object]:
    vocab, hidden = state["language_model.embed_tokens.weight"].shape
    q = state["language_model.layers.0.self_attn.q_proj.weight"].shape[0]
    k = state["language_model.layers.0.self_attn.k_proj.weight"].shape[0]
    layers = {int(m.group(1)) for key in state if (m := _LAYER_KEY.match(key))}
    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=max(layers) + 1,
        intermediate_size=state["language_model.layers.0.mlp.gate_proj.weight"].shape[0],
        kv_fraction=(q, k),
    )


def _vision_facts(state: StateDict) -> dict[str, object]:
    hidden = state["visual.patch_embed.proj.weight"].shape[0]
    blocks = {int(m.group(1)) for key in state if (m := re.match(r"visual\.blocks\.(\d+)\.", key))}
    return dict(
        hidden_size=hidden,
        depth=max(blocks) + 1,
        intermediate_size=state["visual.blocks.0.mlp.gate_proj.weight"].shape[0],
        out_hidden_size=state["visual.merger.mlp.2.weight"].shape[0],
        in_channels=state["visual.patch_embed.proj.weight"].shape[1],
    )


def config_from_state(state: StateDict, config_json: dict | None = None) -> Qwen2_5_VLConfig:
    """`Qwen2_5_VLConfig` from the repo's config.json (checked against the shapes), else from shapes
    and the Qwen2.5-VL-7B values (heads from the 7B's 128-wide heads)."""
    facts = _shape_facts(state) if "language_model.embed_tokens.weight" in state else {}
    if config_json is not None:
        json_fields = {k: v for k, v in config_json.items() if not k.startswith("_")}
        config = Qwen2_5_VLConfig(**json_fields)
        text = config.text_config
        checked = ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size")
        check_config_facts("Qwen2.5-VL config.json", text, {f: facts[f] for f in checked if f in facts})
        return config
    if not facts:
        raise ConfigError("Qwen2.5-VL: no config.json and no 'language_model.embed_tokens.weight' to derive it from")
    q, k = facts.pop("kv_fraction")
    head_dim = 128
    if q % head_dim or k % head_dim or k > q:
        raise ConfigError(
            f"Qwen2.5-VL: q_proj has {q} outputs and k_proj {k}, not multiples of the 7B's 128-wide heads; "
            "put the model's config.json beside the weights"
        )
    text = dict(QWEN25VL_7B_TEXT, **facts, num_attention_heads=q // head_dim, num_key_value_heads=k // head_dim)
    vision = dict(QWEN25VL_7B_VISION, **_vision_facts(state))
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision)


def build(config: Qwen2_5_VLConfig) -> Qwen25VLTextEncoder:
    return Qwen25VLTextEncoder(config)


TEXT_ENCODER_SPEC = ModelSpec(
    name="qwen25vl",
    role="text_encoder",
    layouts=LAYOUTS,
    config_from_state=config_from_state,
    build=build,
    description="Qwen2.5-VL text encoder (Qwen2.5-VL-7B: Qwen-Image, Qwen-Image-Edit, Step1X-Edit); hidden states only",
)

QwenImageTextEncoder = Qwen25VLTextEncoder  # the name Qwen-Image code and checkpoints-in-tests use
