"""What our runtime adds to a transformers decoder (Qwen3, Mistral, Gemma-3) used as a text encoder.

The image and video models read hidden states of inner layers, so `hidden_states_at` runs only the
layers needed. Rotary tables are non-persistent buffers that no checkpoint carries: a meta-built model
would keep them on meta after `load_state_dict(assign=True)`, so they are rebuilt after loads, and kept
in float32 through `.to(bfloat16)` as transformers' own loading does (rounded frequencies move the
angles of late tokens by radians).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Sequence

import torch
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask


class DecoderTextEncoder:
    """Mixed in before a transformers decoder model class (`class X(DecoderTextEncoder, Qwen3Model)`)."""

    offload_units = ("layers",)
    compile_units = ("layers",)

    def __init__(self, config):
        super().__init__(config)
        self.register_load_state_dict_post_hook(_rebuild_buffers_after_load)

    def reset_rotary(self, device: torch.device | str | None = None) -> None:
        """Recompute the rotary buffers on `device` (default: where the embeddings live)."""
        reset_rotary(self, device)

    def materialize_buffers(self) -> None:
        """Loader hook: rebuild what a meta build left on meta (the rotary tables)."""
        if any(b.device.type == "meta" for b in self.rotary_emb.buffers()):
            self.reset_rotary()

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        tables = list(self.rotary_emb.buffers())
        if tables and tables[0].dtype != torch.float32 and tables[0].device.type != "meta":
            self.reset_rotary(tables[0].device)
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
        output, as in `model(..., output_hidden_states=True).hidden_states`.
        """
        return partial_hidden_states(self, input_ids, attention_mask, indices)


def _rebuild_buffers_after_load(module: DecoderTextEncoder, incompatible_keys) -> None:
    module.materialize_buffers()


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


# ------------------------------------------------------------------ multimodal checkpoints, text part only
LAYER_KEY = re.compile(r"layers\.(\d+)\.(.+)")  # a decoder layer's parameter: (index, name within the layer)
_TOP_PARAMS = frozenset(["embed_tokens.weight", "norm.weight"])
# `XForConditionalGeneration` files: the hub's (transformers 4.x) names and transformers 5's, each with the
# language model's prefix and the parts a text encoder drops (vision tower, projector, lm_head).
MULTIMODAL_LAYOUTS = {
    "hub": ("language_model.model.", ("language_model.lm_head.", "vision_tower.", "multi_modal_projector.")),
    "transformers5": ("model.language_model.", ("lm_head.", "model.vision_tower.", "model.multi_modal_projector.")),
}


def language_model_converters(model: str, layer_params: frozenset[str]) -> dict[str, Callable]:
    """Per layout of `MULTIMODAL_LAYOUTS`, a converter keeping the language model of a multimodal checkpoint
    (Mistral-Small-3.1 for FLUX.2-dev, Gemma-3 for LTX-2) under its own names.

    The vision tower, projector and lm_head are dropped on purpose (only hidden states are used); any
    other key that is not a known language-model parameter (`layer_params` per layer) is a `KeyError`
    naming it, so a file of another architecture is not half-loaded.
    """

    def converter(layout: str) -> Callable:
        lm_prefix, dropped = MULTIMODAL_LAYOUTS[layout]

        def convert(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            out = {}
            for key, value in state.items():
                if key.startswith(dropped):
                    continue
                name = key[len(lm_prefix) :] if key.startswith(lm_prefix) else None
                m = LAYER_KEY.fullmatch(name) if name is not None else None
                if name is None or not (name in _TOP_PARAMS or (m is not None and m.group(2) in layer_params)):
                    raise KeyError(f"{model} ({layout} layout): no mapping for key {key!r}")
                out[name] = value
            return out

        return convert

    return {layout: converter(layout) for layout in MULTIMODAL_LAYOUTS}
