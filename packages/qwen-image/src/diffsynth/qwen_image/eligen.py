"""EliGen regional prompts for Qwen-Image (DiffSynth-Studio's `eligen_entity_prompts` / `eligen_entity_masks`).

Each entity prompt is encoded on its own (the text-to-image template) and cut to its real tokens; the DiT
reads the segments `[entity 0, ..., entity N-1, global]` one after another, each with the text positions it
would have alone (`segments`), and a joint attention mask keeps every entity's text with the image tokens
of its region (`diffsynth.runtime.eligen`). With `eligen_enable_on_negative` the negative branch reads the
negative prompt in every entity's place, with the same regions. As DiffSynth-Studio, one prompt at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from diffsynth.runtime.eligen import segment_attention_mask


@dataclass
class QwenEntityText:
    """The DiT's text for an EliGen call: the segments' states one after another `[1, T, D]`, their lengths
    (entities, then the global prompt) and the entities' token regions `[1, N, L_img]`."""

    text: torch.Tensor
    segments: list[int]
    regions: torch.Tensor

    def attention_mask(self, image_len: int) -> torch.Tensor:
        return segment_attention_mask(self.regions.to(self.text.device), self.segments, image_len)


def real_tokens(embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A one-prompt encoding `[1, L, D]` cut to its real tokens (`mask` `[1, L]`)."""
    return embeds[:, mask[0].to(torch.bool)]


def entity_text(
    entities: Sequence[tuple[torch.Tensor, torch.Tensor]], prompt: tuple[torch.Tensor, torch.Tensor], regions
) -> QwenEntityText:
    """`entities` and `prompt` as (states `[1, L, D]`, mask `[1, L]`) pairs, `regions` bool `[N, L_img]`."""
    parts = [real_tokens(*e) for e in entities] + [real_tokens(*prompt)]
    return QwenEntityText(torch.cat(parts, dim=1), [p.shape[1] for p in parts], regions[None])
