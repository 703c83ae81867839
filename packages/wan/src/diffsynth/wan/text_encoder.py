"""Wan prompt encoding: umT5-XXL encoder states, zeroed after each prompt's real tokens, padded to 512.

The Wan authors tokenize to a fixed 512 tokens, run the encoder with the padding masked out, keep
each prompt's real tokens and pad them back with zeros (the DiT was trained on exactly that). The
encoder is bidirectional but masked, so padding never changes a real token's state: we pad only to
the longest prompt of the batch (same result, far less work) and write the zeros ourselves.

`WanTextEncoder` is transformers' `UMT5EncoderModel`; the official `.pth` maps onto it 1:1
(see `encoder_formats.py`).
"""

from __future__ import annotations

import html
import logging
import re
from collections.abc import Sequence

import torch
from transformers import UMT5Config, UMT5EncoderModel

logger = logging.getLogger(__name__)

TEXT_LEN = 512  # the context length every Wan DiT was trained with


class WanTextEncoder(UMT5EncoderModel):
    """transformers' `UMT5EncoderModel` with the capabilities our runtime reads.

    `shared` and `encoder.embed_tokens` are one tensor. The loader assigns every key its own
    Parameter, which would keep two copies of the 2 GB embedding: a load hook ties them again.
    """

    offload_units = ("encoder.block",)
    compile_units = ("encoder.block",)

    def __init__(self, config: UMT5Config):
        super().__init__(config)
        self.register_load_state_dict_post_hook(_tie_after_load)

    def tie_embeddings(self) -> None:
        """Point the encoder's input embedding back at `shared` (one Parameter, one copy)."""
        self.encoder.embed_tokens.weight = self.shared.weight


def _tie_after_load(module: WanTextEncoder, incompatible_keys) -> None:
    module.tie_embeddings()


def clean_prompt(text: str) -> str:
    """The authors' prompt cleaning: ftfy's fixes (curly quotes made straight, mojibake undone), HTML unescaped,
    spaces collapsed; the model was trained on text cleaned so."""
    import ftfy

    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def tokenize(tokenizer, prompts: Sequence[str], max_length: int = TEXT_LEN) -> tuple[torch.Tensor, torch.Tensor]:
    """Cleaned prompts as token ids [B, L] (with the closing `</s>`) right-padded to the longest, and the 0/1 mask."""
    batch = tokenizer(
        [clean_prompt(p) for p in prompts],
        padding="longest",
        truncation=True,
        max_length=max_length,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    return batch["input_ids"], batch["attention_mask"]


@torch.no_grad()
def encode_prompts(
    text_encoder, tokenizer, prompts: str | Sequence[str], max_length: int = TEXT_LEN, device=None
) -> torch.Tensor:
    """[B, max_length, d_model] encoder states: each prompt's real tokens, then zeros.

    `text_encoder` is a `WanTextEncoder` or any transformers encoder returning `last_hidden_state`;
    `device` defaults to where its weights are, and the result stays there in the encoder's dtype.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("encode_prompts needs at least one prompt")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be an integer >= 1, got {max_length!r}")
    if device is None:
        device = next(text_encoder.parameters()).device
    input_ids, mask = tokenize(tokenizer, prompts, max_length)
    input_ids, mask = input_ids.to(device), mask.to(device)
    hidden = text_encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
    out = hidden.new_zeros(len(prompts), max_length, hidden.shape[-1])
    for i, length in enumerate(mask.sum(dim=1).tolist()):
        out[i, :length] = hidden[i, :length]
    return out


__all__ = ["TEXT_LEN", "WanTextEncoder", "clean_prompt", "encode_prompts", "tokenize"]
