"""Z-Image prompt encoding: Qwen3 chat template, second-to-last hidden states, one tensor per prompt.

The authors pad every prompt to 512 tokens. With right padding and causal attention, padding never
reaches a real token, so we pad only to the longest prompt of the batch (same result, far less
work) and stop one layer short of the end, since the last layer's output is never read.
"""

from __future__ import annotations

import torch

HIDDEN_STATE_INDEX = -2  # Z-Image reads the output of the second-to-last layer


def chat_prompts(tokenizer, prompts: list[str]) -> list[str]:
    """Each prompt as a user turn followed by the assistant prompt, thinking mode on (nothing pre-filled)."""
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True, enable_thinking=True
        )
        for p in prompts
    ]


def tokenize(tokenizer, prompts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Templated token ids [B, L] right-padded to the longest prompt (at most `max_length`) and the mask."""
    ids = tokenizer(chat_prompts(tokenizer, prompts), truncation=True, max_length=max_length)["input_ids"]
    length = max(len(x) for x in ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(ids), length), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), length), dtype=torch.bool)
    for i, row in enumerate(ids):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = True
    return input_ids, mask


@torch.no_grad()
def encode_prompts(
    text_encoder, tokenizer, prompts: list[str], *, max_length: int = 512, device=None
) -> list[torch.Tensor]:
    """One [L_i, hidden] tensor per prompt: the Qwen3 second-to-last hidden states of its real tokens.

    `text_encoder` is our `Qwen3TextEncoder` (the final layer is skipped) or any transformers
    decoder that returns `hidden_states`. `device` defaults to where the encoder's weights are.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        return []
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if device is None:
        device = next(text_encoder.parameters()).device
    input_ids, mask = tokenize(tokenizer, list(prompts), max_length)
    input_ids, mask = input_ids.to(device), mask.to(device)
    if hasattr(text_encoder, "hidden_states_at"):
        (hidden,) = text_encoder.hidden_states_at(input_ids, mask, indices=(HIDDEN_STATE_INDEX,))
    else:
        out = text_encoder(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
        hidden = out.hidden_states[HIDDEN_STATE_INDEX]
    return [h[m] for h, m in zip(hidden, mask, strict=True)]


__all__ = ["encode_prompts", "tokenize", "chat_prompts"]
