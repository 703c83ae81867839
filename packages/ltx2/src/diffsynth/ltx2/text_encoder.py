"""LTX-2's text encoder: the language model of Gemma-3-12B (of Gemma 4 in LTX-2.5), read at every layer.

LTX-2 does not take one layer of Gemma: the prompt embedding is all 49 hidden states (the scaled token
embeddings, then the output of each of the 48 layers, the last one after the final norm, as
transformers' `output_hidden_states` gives them), stacked per channel into `[B, L, 3840 * 49]`. The
text connectors (`connectors.py`) normalise and project that.

`Gemma3TextEncoder` is transformers' `Gemma3TextModel` with our capabilities: it is built from the
`text_config` of the `Gemma3ForConditionalGeneration` checkpoint (the vision tower and projector are
dropped by `text_encoder_formats.py`). Gemma 3 differs from the Qwen/Mistral encoders in three ways
that matter for a hand-run forward: the embeddings are multiplied by `sqrt(hidden)` (a non-persistent
buffer a meta build leaves empty), five of every six layers attend in a sliding window, and those
local layers use a different rotary table (theta 1e4) from the global ones (theta 1e6, linear x8).

LTX-2.5 reads Gemma 4 the same way (`gemma4_text_encoder.py`, its own module: older transformers
releases have no Gemma 4, and Gemma 3 must load without it).

`gemma_prompt_embeds` tokenizes as diffusers' `LTX2Pipeline._get_gemma_prompt_embeds` does: prompts
stripped, BOS added, left padding to `max_sequence_length` (1024) tokens; it takes either encoder.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import Gemma3TextModel
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from diffsynth.runtime.models.text_decoder import DecoderTextEncoder

MAX_SEQUENCE_LENGTH = 1024
PADDING_SIDE = "left"  # LTX-2 was trained on left-padded prompts (ltx-core and diffusers both pad left)


class GemmaTextEncoder(DecoderTextEncoder):
    """What Gemma 3 and Gemma 4 language models share as our encoders: runtime capabilities
    (`DecoderTextEncoder`) and the embedding scale, a non-persistent buffer a meta build leaves empty."""

    def materialize_buffers(self) -> None:
        """Loader hook: rebuild what a meta build left on meta (rotary tables, and the embedding scale)."""
        device = self.embed_tokens.weight.device
        if device.type == "meta":
            return
        super().materialize_buffers()
        if self.embed_tokens.embed_scale.device.type == "meta":
            self.embed_tokens.embed_scale = torch.tensor(self.embed_tokens.scalar_embed_scale, device=device)


class Gemma3TextEncoder(GemmaTextEncoder, Gemma3TextModel):
    """Gemma 3's language model (transformers' `Gemma3TextModel`) with a forward that returns the hidden states
    LTX-2 reads (its local and global layers have their own masks and rotary tables)."""

    def hidden_states_at(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        indices: Sequence[int] | None = None,
    ) -> list[torch.Tensor]:
        """Entries `indices` (default: all) of transformers' `output_hidden_states` tuple, running no more
        layers than needed. 0 is the scaled embeddings, i the output of layer i-1, the last one (`-1`) the
        final-normed output."""
        n = len(self.layers)
        wanted = list(range(n + 1)) if indices is None else [resolve_hidden_state_index(i, n) for i in indices]
        stop = max(wanted)
        config = self.config
        x = self.embed_tokens(input_ids)
        position_ids = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
        kinds = config.layer_types[:stop]
        builders = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
        masks, ropes = {}, {}
        for kind in set(kinds):
            masks[kind] = builders[kind](
                config=config, inputs_embeds=x, attention_mask=attention_mask, cache=None, position_ids=position_ids
            )
            ropes[kind] = self.rotary_emb(x, position_ids, kind)
        states = {0: x}
        for i, layer in enumerate(self.layers[: min(stop, n)]):
            x = layer(x, position_embeddings=ropes[kinds[i]], attention_mask=masks[kinds[i]], position_ids=position_ids)
            states[i + 1] = x
        if stop == n:
            states[n] = self.norm(x)
        return [states[i] for i in wanted]


def resolve_hidden_state_index(index: int, n: int) -> int:
    resolved = index + n + 1 if index < 0 else index
    if not 0 <= resolved <= n:
        raise IndexError(f"hidden state index {index} out of range for {n} layers ({-n - 1}..{n})")
    return resolved


# ----------------------------------------------------------------------------------------- prompts
def _prompt_list(prompts: str | Sequence[str]) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("prompt embedding needs at least one prompt")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise ValueError(f"prompts must be strings, got {type(bad[0]).__name__}")
    return prompts


def tokenize_prompts(tokenizer, prompts: str | Sequence[str], max_sequence_length: int = MAX_SEQUENCE_LENGTH):
    """`(input_ids, attention_mask)`, each `[B, max_sequence_length]`: stripped prompts with BOS, left-padded.

    A tokenizer without a pad token gets its EOS token as one (as the references do).
    """
    prompts = _prompt_list(prompts)
    if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) or max_sequence_length < 1:
        raise ValueError(f"max_sequence_length must be an integer >= 1, got {max_sequence_length!r}")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(
        [p.strip() for p in prompts],
        padding="max_length",
        max_length=max_sequence_length,
        truncation=True,
        add_special_tokens=True,
        padding_side=PADDING_SIDE,
        return_tensors="pt",
    )
    return batch["input_ids"], batch["attention_mask"]


@torch.no_grad()
def gemma_prompt_embeds(
    encoder,
    tokenizer,
    prompts: str | Sequence[str],
    max_sequence_length: int = MAX_SEQUENCE_LENGTH,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LTX-2 prompt features: `(embeds [B, L, hidden * (layers + 1)], attention_mask [B, L])`, L = `max_sequence_length`.

    `embeds` stacks every hidden state per channel (channel-major: entry `c * (layers + 1) + k` is channel
    `c` of hidden state `k`), as diffusers' pipeline packs them for `LTX2TextConnectors`; `attention_mask`
    is 1 for prompt tokens, 0 for the left padding. `encoder` is our `Gemma3TextEncoder` / `Gemma4TextEncoder`
    or any transformers model returning `hidden_states` (e.g. the whole `Gemma3ForConditionalGeneration` or
    `Gemma4UnifiedForConditionalGeneration`);
    `tokenizer` is Gemma's (`AutoTokenizer` of the `tokenizer/` folder). Inputs and result go to `device`
    (default: the encoder's weights); the result keeps the encoder's dtype unless `dtype` is given.
    """
    input_ids, attention_mask = tokenize_prompts(tokenizer, prompts, max_sequence_length)
    if device is None:
        device = next(encoder.parameters()).device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    if hasattr(encoder, "hidden_states_at"):
        states = encoder.hidden_states_at(input_ids, attention_mask)
    else:
        out = encoder(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
        states = out.hidden_states
    embeds = torch.stack(states, dim=-1).flatten(2)
    return embeds.to(dtype=dtype if dtype is not None else embeds.dtype), attention_mask


__all__ = [
    "MAX_SEQUENCE_LENGTH",
    "PADDING_SIDE",
    "Gemma3TextEncoder",
    "gemma_prompt_embeds",
    "tokenize_prompts",
]
