"""Qwen3 text encoder (Qwen3-4B for Z-Image-Turbo and FLUX.2-klein) and its checkpoint spec.

The module is transformers' `Qwen3Model` with the attributes our runtime reads, plus
`hidden_states_at`, which runs only the layers needed for the requested hidden states (the image
models read an inner layer, so the last layers are wasted work).

Hub files store the causal-LM layout (`model.*`, sometimes `lm_head.weight`); only hidden states
are used, so `lm_head` is dropped on purpose. The signature requires `q_norm`/`k_norm`, which is
what tells Qwen3 apart from Qwen2/Qwen2.5 files with otherwise identical names.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Sequence

import torch
from transformers import Qwen3Config, Qwen3Model
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from ..errors import ConfigError
from ..registry import KeyLayout, ModelSpec, StateDict, check_config_facts


class Qwen3TextEncoder(Qwen3Model):
    """transformers' `Qwen3Model`, with runtime capabilities and a partial forward."""

    offload_units = ("layers",)
    compile_units = ("layers",)

    def __init__(self, config: Qwen3Config):
        super().__init__(config)
        # Rotary tables are non-persistent buffers: no checkpoint carries them, so a meta-built
        # model would keep them on meta after `load_state_dict(assign=True)`. Rebuild after loads.
        self.register_load_state_dict_post_hook(_rebuild_rotary_after_load)

    def reset_rotary(self, device: torch.device | str | None = None) -> None:
        """Recompute the rotary buffers on `device` (default: where the embeddings live)."""
        reset_rotary(self, device)

    def materialize_buffers(self) -> None:
        """Loader hook: rebuild what a meta build left on meta (the rotary tables)."""
        if self.rotary_emb.inv_freq.device.type == "meta":
            self.reset_rotary()

    def _apply(self, fn, recurse=True):
        # `.to(bfloat16)` would also round the rotary frequencies; `from_pretrained(dtype=...)`
        # keeps them in float32, and so do we (bf16 angles drift by radians at 512 tokens).
        super()._apply(fn, recurse)
        inv_freq = self.rotary_emb.inv_freq
        if inv_freq.dtype != torch.float32 and inv_freq.device.type != "meta":
            self.reset_rotary(inv_freq.device)
        return self

    def hidden_states_at(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        indices: Sequence[int] = (-1,),
    ) -> list[torch.Tensor]:
        """Entries `indices` of transformers' `output_hidden_states` tuple, computing no more layers than needed.

        Index 0 is the embeddings, i the output of layer i-1, and the last (`-1`) the final-normed
        output, as in `Qwen3Model(..., output_hidden_states=True).hidden_states`.
        """
        return partial_hidden_states(self, input_ids, attention_mask, indices)


def reset_rotary(model: torch.nn.Module, device: torch.device | str | None = None) -> None:
    """Recompute a transformers decoder's rotary buffers (`model.rotary_emb`) on `device`.

    Default device: where `model.embed_tokens` lives. Shared by the decoder-only text encoders
    (Qwen3 here, Mistral for FLUX.2-dev), whose rotary tables no checkpoint carries.
    """
    device = torch.device(device) if device is not None else model.embed_tokens.weight.device
    if device.type == "meta":
        return
    with torch.device(device):
        fresh = type(model.rotary_emb)(config=model.config)
    for name, buffer in fresh.named_buffers(recurse=False):
        setattr(model.rotary_emb, name, buffer)


def _layer_mask_kinds(config, n: int) -> list[str]:
    """The mask each layer reads: per-layer `layer_types` (Qwen3), else one kind for all (Mistral: sliding
    only when `sliding_window` is set), as the transformers models choose."""
    kinds = getattr(config, "layer_types", None)
    if kinds:
        return list(kinds)
    return ["sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"] * n


def partial_hidden_states(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    indices: Sequence[int],
) -> list[torch.Tensor]:
    """`hidden_states_at` for a transformers decoder with `embed_tokens`, `layers`, `norm`, `rotary_emb`."""
    n = len(model.layers)
    wanted = []
    for index in indices:
        resolved = index + n + 1 if index < 0 else index
        if not 0 <= resolved <= n:
            raise IndexError(f"hidden state index {index} out of range for {n} layers ({-n - 1}..{n})")
        wanted.append(resolved)
    stop = max(wanted)

    config = model.config
    x = model.embed_tokens(input_ids)
    position_ids = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
    kinds = _layer_mask_kinds(config, n)
    builders = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
    masks = {kind: _mask(builders[kind], config, x, attention_mask, position_ids) for kind in set(kinds[:stop])}
    rope = model.rotary_emb(x, position_ids)
    states = {0: x}
    for i, layer in enumerate(model.layers[: min(stop, n)]):
        x = layer(x, attention_mask=masks[kinds[i]], position_ids=position_ids, position_embeddings=rope)
        if isinstance(x, tuple):  # older transformers returned (hidden, ...)
            x = x[0]
        states[i + 1] = x
    if stop == n:
        states[n] = model.norm(x)
    return [states[i] for i in wanted]


def _mask(make_mask, config, x: torch.Tensor, attention_mask, position_ids) -> object:
    """Call a transformers mask builder without a cache (its argument names changed across 4.5x and 5.x)."""
    params = inspect.signature(make_mask).parameters
    kwargs = {"config": config, "attention_mask": attention_mask, "position_ids": position_ids}
    kwargs["inputs_embeds" if "inputs_embeds" in params else "input_embeds"] = x
    if "cache_position" in params:
        kwargs["cache_position"] = torch.arange(x.shape[1], device=x.device)
    for name in ("cache", "past_key_values"):
        if name in params:
            kwargs[name] = None
    return make_mask(**kwargs)


def _rebuild_rotary_after_load(module: Qwen3TextEncoder, incompatible_keys) -> None:
    module.materialize_buffers()


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
    "partial_hidden_states",
    "reset_rotary",
]
