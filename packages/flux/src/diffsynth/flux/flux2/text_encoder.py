"""FLUX.2 prompt encoding: three inner layers of a decoder LLM, side by side per token.

- FLUX.2-dev reads Mistral-Small-3.1 24B (`text_encoder/`, a `Mistral3ForConditionalGeneration` file of
  which only the language model is kept: `Mistral3TextEncoder`, the transformers 5 `MistralModel`).
  Prompts are a system turn (the fixed `SYSTEM_MESSAGE`) and a user turn, rendered by the tokenizer's
  chat template with no generation prompt; layers 10, 20, 30 give `[B, L, 3 x 5120]`.
- FLUX.2-klein reads Qwen3 (4B for klein-4B, 8B for klein-9B; the runtime's `Qwen3TextEncoder`).
  Prompts are a single user turn with the generation prompt and thinking disabled; layers 9, 18, 27
  give `[B, L, 3 x hidden]`.

Every prompt is padded (or truncated) to `max_sequence_length` tokens and the DiT reads all of them,
padding included, so the length is part of the result, unlike Z-Image's trimmed states. The padding
mask goes to the encoder as the references pass it. Layer `k` means entry `k` of transformers'
`output_hidden_states` (0 is the embeddings), and our encoders stop after the last layer needed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import MistralModel

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.models.text_decoder import DecoderTextEncoder

MAX_SEQUENCE_LENGTH = 512
MISTRAL_LAYERS = (10, 20, 30)  # FLUX.2-dev: context 15360 = 3 x 5120
QWEN3_LAYERS = (9, 18, 27)  # FLUX.2-klein: context 7680 (4B) / 12288 (8B) = 3 x hidden

# The system turn of every FLUX.2-dev prompt (BFL `flux2/system_messages.py`, diffusers `SYSTEM_MESSAGE`).
# It is model input the DiT was trained with, so it must stay exactly as released, line break included
# (BFL's main branch and diffusers have it; DiffSynth-Studio follows an unmerged BFL change without it).
SYSTEM_MESSAGE = (
    "You are an AI that reasons about image descriptions. You give structured responses focusing on object "
    "relationships, object\nattribution and actions without speculation."
)


class Mistral3TextEncoder(DecoderTextEncoder, MistralModel):
    """The language model of Mistral-Small-3.1 (transformers' `MistralModel`), with our capabilities
    (`DecoderTextEncoder`: units, rotary rebuild, partial forward; rope_theta is 1e9 here, so float32 rotary
    frequencies matter).

    Built from the `text_config` of the Mistral3 checkpoint; the vision tower, projector and
    `lm_head` are not part of it (see `encoder_formats.py`).
    """


# ----------------------------------------------------------------------------------------- prompts
def _prompt_list(prompts: str | Sequence[str]) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("prompt embedding needs at least one prompt")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise ValueError(f"prompts must be strings, got {type(bad[0]).__name__}")
    return prompts


def _check_length(max_sequence_length) -> None:
    if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) or max_sequence_length < 1:
        raise ValueError(f"max_sequence_length must be an integer >= 1, got {max_sequence_length!r}")


def _token_lists(ids) -> list[list[int]]:
    return [list(row) for row in (ids.tolist() if hasattr(ids, "tolist") else ids)]


def _prompt_span(ids: list[int], empty: list[int]) -> tuple[int, int]:
    """Where a prompt's own tokens lie in its rendered chat `ids`: between what it shares with the chat of an
    empty prompt `empty` at the start and at the end (the template: FLUX.2-dev's system turn, the chat markers)."""
    start = 0
    while start < min(len(ids), len(empty)) and ids[start] == empty[start]:
        start += 1
    tail = 0
    while tail < len(empty) - start and len(ids) - tail > start and ids[-1 - tail] == empty[-1 - tail]:
        tail += 1
    return start, len(ids) - tail


def _check_prompts_kept(ids: list[list[int]], empty: list[int], max_sequence_length: int, side: str) -> None:
    """Refuse a `max_sequence_length` that cuts away all of a prompt's own tokens, keeping only the template:
    the prompt would silently change nothing. `ids` are the untruncated chats, `side` the tokenizer's
    truncation side."""
    for i, row in enumerate(ids):
        start, end = _prompt_span(row, empty)
        first = len(row) - max_sequence_length if side == "left" else 0
        if start < end and (end <= first or start >= first + max_sequence_length):
            raise ConfigError(
                f"max_sequence_length={max_sequence_length} keeps none of prompt {i}'s own tokens: the chat template "
                f"(with FLUX.2-dev's system prompt) alone takes {len(empty)} tokens, {start} of them before the "
                f"prompt; use max_sequence_length > {start} (the whole chat of this prompt is {len(row)} tokens)"
            )


def _stacked_states(encoder, input_ids, attention_mask, layers: Sequence[int], dtype, device) -> torch.Tensor:
    """Hidden states of `layers` concatenated per token: `[B, L, len(layers) * hidden]`, layer-major."""
    layers = tuple(layers)
    if not layers:
        raise ValueError("layers must name at least one hidden state")
    if device is None:
        device = next(encoder.parameters()).device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    if hasattr(encoder, "hidden_states_at"):
        states = encoder.hidden_states_at(input_ids, attention_mask, indices=layers)
    else:  # a plain transformers model (e.g. the whole Mistral3ForConditionalGeneration)
        out = encoder(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
        states = [out.hidden_states[k] for k in layers]
    embeds = torch.cat(states, dim=-1)
    return embeds.to(device=device, dtype=dtype if dtype is not None else embeds.dtype)


def mistral_chat(prompts: Sequence[str], system_message: str = SYSTEM_MESSAGE) -> list[list[dict]]:
    """One conversation per prompt: the system turn, then the prompt as the user turn.

    `[IMG]` is removed from prompts: the Pixtral processor counts image tokens against the images
    it was given and refuses a prompt that names one.
    """
    return [
        [
            {"role": "system", "content": [{"type": "text", "text": system_message}]},
            {"role": "user", "content": [{"type": "text", "text": prompt.replace("[IMG]", "")}]},
        ]
        for prompt in prompts
    ]


def load_mistral_tokenizer(folder: str | Path):
    """FLUX.2-dev's `tokenizer/` folder as a tokenizer that renders the processor's chat template.

    diffusers and BFL load the folder with `AutoProcessor` (a `PixtralProcessor`, which needs torchvision).
    For text the processor only renders its own chat template and tokenizes the result without adding
    special tokens, which is what a tokenizer does once it carries that template. So this loads
    `AutoTokenizer` and gives it the template the processor would read: `chat_template.json` (legacy,
    read first by transformers), else `chat_template.jinja`, else the tokenizer's own.
    """
    from transformers import AutoTokenizer

    folder = Path(folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    legacy, raw = folder / "chat_template.json", folder / "chat_template.jinja"
    if legacy.is_file():
        tokenizer.chat_template = json.loads(legacy.read_text(encoding="utf-8"))["chat_template"]
    elif raw.is_file():
        tokenizer.chat_template = raw.read_text(encoding="utf-8")
    if not tokenizer.chat_template:
        found = sorted(p.name for p in folder.iterdir())
        raise ConfigError(f"{folder} holds no chat template (files: {found}); FLUX.2-dev prompts need the Mistral one")
    return tokenizer


@torch.no_grad()
def mistral_prompt_embeds(
    encoder,
    tokenizer,
    prompts: str | Sequence[str],
    max_sequence_length: int = MAX_SEQUENCE_LENGTH,
    *,
    system_message: str = SYSTEM_MESSAGE,
    layers: Sequence[int] = MISTRAL_LAYERS,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """FLUX.2-dev prompt embeddings `[B, max_sequence_length, 3 x hidden]`.

    `tokenizer` is FLUX.2-dev's `tokenizer/` folder loaded by `load_mistral_tokenizer` or as the
    Pixtral processor (`AutoProcessor`, needs torchvision): both render the processor's chat template
    into the same ids. `encoder` is our `Mistral3TextEncoder` or any transformers model
    returning `hidden_states`. Inputs and result go to `device` (default: the encoder's weights);
    the result keeps the dtype the encoder computes in unless `dtype` is given. A `max_sequence_length` that
    leaves none of a prompt's own tokens after the system turn is a ConfigError naming the length it needs.
    """
    prompts = _prompt_list(prompts)
    _check_length(max_sequence_length)
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"the FLUX.2-dev tokenizer ({type(tokenizer).__name__}) has no chat template: load the tokenizer/ "
            "folder with load_mistral_tokenizer(folder) or transformers.AutoProcessor"
        )
    batch = tokenizer.apply_chat_template(
        mistral_chat(prompts, system_message),
        add_generation_prompt=False,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        padding="max_length",
        truncation=True,
        max_length=max_sequence_length,
    )
    full = tokenizer.apply_chat_template(
        mistral_chat([*prompts, ""], system_message), add_generation_prompt=False, tokenize=True, return_dict=True
    )
    *ids, empty = _token_lists(full["input_ids"])
    _check_prompts_kept(ids, empty, max_sequence_length, getattr(tokenizer, "truncation_side", "right"))
    return _stacked_states(encoder, batch["input_ids"], batch["attention_mask"], layers, dtype, device)


def qwen3_chat(tokenizer, prompts: Sequence[str]) -> list[str]:
    """Each prompt as a user turn followed by the assistant prompt, thinking disabled (an empty think block)."""
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True, enable_thinking=False
        )
        for prompt in prompts
    ]


@torch.no_grad()
def qwen3_prompt_embeds(
    encoder,
    tokenizer,
    prompts: str | Sequence[str],
    max_sequence_length: int = MAX_SEQUENCE_LENGTH,
    *,
    layers: Sequence[int] = QWEN3_LAYERS,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """FLUX.2-klein prompt embeddings `[B, max_sequence_length, 3 x hidden]` from Qwen3 (`AutoTokenizer`).

    `encoder` is the runtime's `Qwen3TextEncoder` or any transformers model returning
    `hidden_states`; `device` and `dtype` as in `mistral_prompt_embeds`, and so is a too short `max_sequence_length`.
    """
    prompts = _prompt_list(prompts)
    _check_length(max_sequence_length)
    chats = qwen3_chat(tokenizer, [*prompts, ""])
    batch = tokenizer(
        chats[:-1], return_tensors="pt", padding="max_length", truncation=True, max_length=max_sequence_length
    )
    *ids, empty = _token_lists(tokenizer(chats)["input_ids"])
    _check_prompts_kept(ids, empty, max_sequence_length, getattr(tokenizer, "truncation_side", "right"))
    return _stacked_states(encoder, batch["input_ids"], batch["attention_mask"], layers, dtype, device)


__all__ = [
    "MAX_SEQUENCE_LENGTH",
    "MISTRAL_LAYERS",
    "QWEN3_LAYERS",
    "SYSTEM_MESSAGE",
    "Mistral3TextEncoder",
    "load_mistral_tokenizer",
    "mistral_chat",
    "mistral_prompt_embeds",
    "qwen3_chat",
    "qwen3_prompt_embeds",
]
