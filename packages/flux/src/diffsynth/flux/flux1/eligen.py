"""EliGen entity control for FLUX.1: regional prompts through a masked joint attention.

Each entity is a prompt and a region of the image (a mask, white = entity). Every entity prompt is
encoded by T5 on its own (at the global prompt's T5 sequence length; its CLIP vector is not used: the
pooled vector stays the global prompt's) and the DiT reads the text sequence
`[entity 0, ..., entity N-1, global]`, all with zero position ids, followed by the image tokens.
Tokens appended to the global prompt's T5 states (Redux, AttriCtrl, LoRA Encoder) belong to its
segment, which is then longer than the entities'. Attention over that joint sequence, in the double
and the single blocks, is restricted so that:

- an entity's text tokens and the image tokens inside its region see each other; image tokens
  outside the region do not see that entity's text (nor does it see them);
- text tokens see only the text of their own prompt (entity to entity and entity to global are cut);
- the global prompt and every image token see each other, and image tokens see all image tokens.

Masks are resized (nearest) to the latent grid, a latent pixel is inside when the mean of its RGB
values is above half, and a packed 2x2 token is inside when any of its four pixels is. Tokens after
the masked image (Kontext references) are treated as outside every region. This follows
DiffSynth-Studio's EliGen (the `DiffSynth-Studio/Eligen` LoRA is applied as an ordinary LoRA).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffsynth.runtime.eligen import check_entity_inputs, entity_regions, segment_attention_mask


@dataclass
class EliGenEntities:
    """Entity prompts prepared for a batch: T5 states `[B or 1, N, L, D]` (L = the T5 sequence length, the
    global prompt's without appended tokens) and token regions `[B or 1, N, L_img]` (bool, True = image token j
    lies in entity i)."""

    t5: torch.Tensor
    regions: torch.Tensor

    def __post_init__(self):
        if self.t5.dim() != 4 or self.regions.dim() != 3 or self.t5.shape[1] != self.regions.shape[1]:
            raise ValueError(
                f"EliGenEntities needs t5 [B, N, L, D] and regions [B, N, L_img] with the same N, got "
                f"{tuple(self.t5.shape)} and {tuple(self.regions.shape)}"
            )

    @property
    def count(self) -> int:
        return self.t5.shape[1]

    def cat(self, other: EliGenEntities, batch: int, other_batch: int) -> EliGenEntities:
        """Both batches (of `batch` and `other_batch` samples) as one, for the batched CFG branches."""
        t5 = torch.cat([self.t5.expand(batch, -1, -1, -1), other.t5.expand(other_batch, -1, -1, -1)])
        if self.regions.shape[0] == other.regions.shape[0] == 1 and torch.equal(self.regions, other.regions):
            return EliGenEntities(t5, self.regions)
        regions = torch.cat([self.regions.expand(batch, -1, -1), other.regions.expand(other_batch, -1, -1)])
        return EliGenEntities(t5, regions)


def joint_text(prompt_t5: torch.Tensor, entities: EliGenEntities) -> torch.Tensor:
    """The DiT's text `[B, N * L + L_global, D]`: the entity prompts in order, then the global prompt (which may
    be longer than L: tokens appended to its T5 states stay in its segment)."""
    b, length, dim = prompt_t5.shape
    if entities.t5.shape[3] != dim or entities.t5.shape[2] > length or entities.t5.shape[0] not in (1, b):
        raise ValueError(
            f"entity T5 states {tuple(entities.t5.shape)} do not fit the prompt's {tuple(prompt_t5.shape)}: "
            "entity prompts must be encoded with the same t5_sequence_length"
        )
    entity = entities.t5.to(prompt_t5.dtype).expand(b, -1, -1, -1).reshape(b, -1, dim)
    return torch.cat([entity, prompt_t5], dim=1)


def attention_mask(
    regions: torch.Tensor, prompt_len: int, image_len: int, entity_len: int | None = None
) -> torch.Tensor:
    """Bool mask `[B or 1, 1, S, S]` (True = may attend) over `[entities, global, image]`, S =
    N * entity_len + prompt_len + image_len (`segment_attention_mask`; `entity_len` defaults to the global
    prompt's length); image tokens past the regions' length (Kontext references) see only the global prompt."""
    entity_len = prompt_len if entity_len is None else entity_len
    return segment_attention_mask(regions, [entity_len] * regions.shape[1] + [prompt_len], image_len)


def joint_inputs(
    prompt_t5: torch.Tensor, entities: EliGenEntities, image_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The DiT's text states and its joint attention mask for a call with `image_len` image tokens."""
    txt = joint_text(prompt_t5, entities)
    regions = entities.regions.to(prompt_t5.device)
    mask = attention_mask(regions, prompt_t5.shape[1], image_len, entity_len=entities.t5.shape[2])
    return txt, mask


def check_attention_mask(mask: torch.Tensor, batch: int, heads: int, length: int) -> None:
    """A joint attention mask for the DiT: bool or float `[B or 1, 1 or heads, S, S]`."""
    if mask.dim() != 4 or mask.shape[0] not in (1, batch) or mask.shape[1] not in (1, heads):
        raise ValueError(
            f"attn_mask has shape {tuple(mask.shape)}; expected [B={batch} or 1, 1 or {heads}, {length}, {length}]"
        )
    if mask.shape[2:] != (length, length):
        raise ValueError(
            f"attn_mask covers {tuple(mask.shape[2:])} tokens; the joint sequence [text, image] has {length}"
        )


__all__ = [
    "EliGenEntities",
    "attention_mask",
    "check_attention_mask",
    "check_entity_inputs",
    "entity_regions",
    "joint_inputs",
    "joint_text",
]
