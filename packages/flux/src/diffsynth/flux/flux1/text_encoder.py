"""FLUX.1 prompt encoding: CLIP-L pooled vector and T5-XXL token states.

FLUX.1 reads two encoders, as BFL's `HFEmbedder` and diffusers' `FluxPipeline` do:

- CLIP-L (`text_encoder/`): the prompt padded to 77 tokens, `pooler_output` (the state at the end
  token) feeds the DiT's `vector_in`;
- T5-XXL v1.1 encoder (`text_encoder_2/`): the prompt padded to `t5_sequence_length` tokens (512 for
  dev) and `last_hidden_state` feeds `txt_in`.

Neither encoder gets an attention mask: the DiT was trained on states of the padded sequence, so
padding tokens are encoded (and attended to) exactly as the references do. Both modules are the
transformers classes, loaded from our specs (see `encoder_formats.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

CLIP_MAX_LENGTH = 77  # CLIP-L positions
T5_SEQUENCE_LENGTH = 512  # FLUX.1-dev / Krea / Kontext (schnell: 256)


class FluxCLIPTextEncoder(CLIPTextModel):
    """transformers' `CLIPTextModel` with the capabilities our runtime reads.

    `position_ids` is a non-persistent buffer that no checkpoint carries, so a meta build keeps it
    on meta after `load_state_dict(assign=True)`: it is rebuilt after every load.
    """

    offload_units = ("encoder.layers",)
    compile_units = ("encoder.layers",)

    def __init__(self, config: CLIPTextConfig):
        super().__init__(config)
        self.register_load_state_dict_post_hook(_rebuild_after_load)

    def materialize_buffers(self) -> None:
        """Loader hook: recompute the position ids a meta build left on meta."""
        embeddings = self.embeddings
        device = embeddings.token_embedding.weight.device
        if embeddings.position_ids.device.type == "meta" and device.type != "meta":
            ids = torch.arange(embeddings.position_embedding.num_embeddings, device=device).expand((1, -1))
            embeddings.register_buffer("position_ids", ids, persistent=False)


def _rebuild_after_load(module: FluxCLIPTextEncoder, incompatible_keys) -> None:
    module.materialize_buffers()


class FluxT5Encoder(T5EncoderModel):
    """transformers' `T5EncoderModel` with our capabilities.

    `shared` and `encoder.embed_tokens` are one tensor; the loader gives every key its own
    Parameter, so a load hook ties them again (one copy of the 0.5 GB embedding).
    """

    offload_units = ("encoder.block",)
    compile_units = ("encoder.block",)

    def __init__(self, config: T5Config):
        super().__init__(config)
        self.register_load_state_dict_post_hook(_tie_after_load)

    def tie_embeddings(self) -> None:
        self.encoder.embed_tokens.weight = self.shared.weight


def _tie_after_load(module: FluxT5Encoder, incompatible_keys) -> None:
    module.tie_embeddings()


@dataclass
class FluxPromptEmbeds:
    """What the FLUX.1 DiT reads from a batch of prompts: T5 states `[B, L, 4096]` and CLIP pooled `[B, 768]`."""

    t5: torch.Tensor
    pooled: torch.Tensor

    def __post_init__(self):
        if self.t5.dim() != 3 or self.pooled.dim() != 2 or self.t5.shape[0] != self.pooled.shape[0]:
            raise ValueError(
                f"FluxPromptEmbeds needs t5 [B, L, D] and pooled [B, D'] with the same B, got "
                f"{tuple(self.t5.shape)} and {tuple(self.pooled.shape)}"
            )

    @property
    def batch(self) -> int:
        return self.t5.shape[0]

    def cat(self, other: FluxPromptEmbeds) -> FluxPromptEmbeds:
        """Both batches as one (the conditional and unconditional CFG branches run together)."""
        return FluxPromptEmbeds(torch.cat([self.t5, other.t5]), torch.cat([self.pooled, other.pooled]))


def _device_of(module: torch.nn.Module, device):
    return device if device is not None else next(module.parameters()).device


def _pad_ids(tokenizer, prompts: Sequence[str], max_length: int) -> torch.Tensor:
    batch = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=max_length,
        truncation=True,
        return_attention_mask=False,
        return_tensors="pt",
    )
    return batch["input_ids"]


@torch.no_grad()
def clip_pooled(text_encoder, tokenizer, prompts: Sequence[str], device=None) -> torch.Tensor:
    """CLIP `pooler_output` `[B, hidden]` of prompts padded to the tokenizer's length (77)."""
    max_length = min(int(getattr(tokenizer, "model_max_length", CLIP_MAX_LENGTH)), CLIP_MAX_LENGTH)
    ids = _pad_ids(tokenizer, prompts, max_length).to(_device_of(text_encoder, device))
    return text_encoder(input_ids=ids, output_hidden_states=False).pooler_output


@torch.no_grad()
def t5_states(text_encoder, tokenizer, prompts: Sequence[str], max_length: int = T5_SEQUENCE_LENGTH, device=None):
    """T5 `last_hidden_state` `[B, max_length, d_model]` of prompts padded (unmasked) to `max_length`."""
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"t5_sequence_length must be an integer >= 1, got {max_length!r}")
    ids = _pad_ids(tokenizer, prompts, max_length).to(_device_of(text_encoder, device))
    return text_encoder(input_ids=ids, output_hidden_states=False).last_hidden_state


def encode_prompts(
    clip,
    clip_tokenizer,
    t5,
    t5_tokenizer,
    prompts: str | Sequence[str],
    t5_sequence_length=T5_SEQUENCE_LENGTH,
    device=None,
) -> FluxPromptEmbeds:
    """Both encodings of `prompts`, left where the encoders are (or moved to `device`) in their dtypes."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("encode_prompts needs at least one prompt")
    pooled = clip_pooled(clip, clip_tokenizer, prompts)
    states = t5_states(t5, t5_tokenizer, prompts, t5_sequence_length)
    if device is not None:
        pooled, states = pooled.to(device), states.to(device)
    return FluxPromptEmbeds(states, pooled)


__all__ = [
    "CLIP_MAX_LENGTH",
    "T5_SEQUENCE_LENGTH",
    "FluxCLIPTextEncoder",
    "FluxPromptEmbeds",
    "FluxT5Encoder",
    "clip_pooled",
    "encode_prompts",
    "t5_states",
]
