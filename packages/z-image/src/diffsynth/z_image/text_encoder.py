"""Z-Image prompt encoding: Qwen3 chat template, second-to-last hidden states, one tensor per prompt.

The authors pad every prompt to 512 tokens. With right padding and causal attention, padding never
reaches a real token, so we pad only to the longest prompt of the batch (same result, far less
work) and stop one layer short of the end, since the last layer's output is never read.
"""

from __future__ import annotations

import torch

from diffsynth.runtime.errors import ConfigError

HIDDEN_STATE_INDEX = -2  # Z-Image reads the output of the second-to-last layer


def check_max_length(max_length, name: str = "max_length") -> None:
    """Refuse a prompt length the tokenizer cannot cut to (0, -5, "a", 1.5) with a ConfigError naming `name`."""
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ConfigError(f"{name}={max_length!r} is not accepted; use an integer >= 1")


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
    return _padded(tokenizer, tokenizer(chat_prompts(tokenizer, prompts), truncation=True, max_length=max_length))


def _padded(tokenizer, encoded) -> tuple[torch.Tensor, torch.Tensor]:
    ids = encoded["input_ids"]
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
    check_max_length(max_length)
    if device is None:
        device = next(text_encoder.parameters()).device
    input_ids, mask = tokenize(tokenizer, list(prompts), max_length)
    return _hidden_states(text_encoder, input_ids.to(device), mask.to(device))


def _hidden_states(text_encoder, input_ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    if hasattr(text_encoder, "hidden_states_at"):
        (hidden,) = text_encoder.hidden_states_at(input_ids, mask, indices=(HIDDEN_STATE_INDEX,))
    else:
        out = text_encoder(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
        hidden = out.hidden_states[HIDDEN_STATE_INDEX]
    return [h[m] for h, m in zip(hidden, mask, strict=True)]


# ----------------------------------------------------------------------------------- Z-Image Omni
def omni_segments(prompt: str, n_images: int) -> list[str]:
    """The Omni prompt template, split where the images go: without images one user turn; with `n` images the
    user turn opens with `n` vision slots, then the prompt, then the assistant turn opens on one more vision slot
    (the image to make). Segment `j < n` precedes condition image `j`; segment `n` the target; `n + 1` closes."""
    if n_images == 0:
        return [f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"]
    return [
        "<|im_start|>user\n<|vision_start|>",
        *["<|vision_end|><|vision_start|>"] * (n_images - 1),
        f"<|vision_end|>{prompt}<|im_end|>\n<|im_start|>assistant\n<|vision_start|>",
        "<|vision_end|><|im_end|>",
    ]


@torch.no_grad()
def encode_omni_prompts(
    text_encoder, tokenizer, prompts: list[str], n_images: int, *, max_length: int = 512, device=None
) -> list[list[torch.Tensor]]:
    """Per prompt, one `[L, hidden]` tensor per segment of `omni_segments` (each segment is encoded on its own,
    as plain text: the template's special tokens are written out, no chat template is applied)."""
    check_max_length(max_length)
    if device is None:
        device = next(text_encoder.parameters()).device
    per_prompt = [omni_segments(p, n_images) for p in prompts]
    flat = [segment for segments in per_prompt for segment in segments]
    input_ids, mask = _padded(tokenizer, tokenizer(flat, truncation=True, max_length=max_length))
    hidden = iter(_hidden_states(text_encoder, input_ids.to(device), mask.to(device)))
    return [[next(hidden) for _ in segments] for segments in per_prompt]


__all__ = ["chat_prompts", "encode_omni_prompts", "encode_prompts", "omni_segments", "tokenize"]
