"""EliGen entity control for FLUX.1: regional prompts through a masked joint attention.

Each entity is a prompt and a region of the image (a mask, white = entity). Every entity prompt is
encoded by T5 on its own (same length as the global prompt; its CLIP vector is not used: the
pooled vector stays the global prompt's) and the DiT reads the text sequence
`[entity 0, ..., entity N-1, global]`, all with zero position ids, followed by the image tokens.
Attention over that joint sequence, in the double and the single blocks, is restricted so that:

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

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from diffsynth.runtime.errors import ConfigError


@dataclass
class EliGenEntities:
    """Entity prompts prepared for a batch: T5 states `[B or 1, N, L, D]` (L = the global prompt's
    length) and token regions `[B or 1, N, L_img]` (bool, True = image token j lies in entity i)."""

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


def check_entity_inputs(prompts, masks) -> tuple[list[str], list[Image.Image]]:
    """`eligen_entity_prompts` / `eligen_entity_masks` as lists of strings and RGB images (paths are
    opened); both None or both empty means no entities."""
    if prompts is None and masks is None:
        return [], []
    if prompts is None or masks is None:
        given, missing = ("eligen_entity_prompts", "eligen_entity_masks")
        if prompts is None:
            given, missing = missing, given
        raise ConfigError(f"{given} is given without {missing}: EliGen needs one mask per entity prompt")
    prompts = [prompts] if isinstance(prompts, str) else prompts
    masks = [masks] if isinstance(masks, (Image.Image, str, os.PathLike)) else masks
    if not isinstance(prompts, Sequence):
        raise ConfigError(f"eligen_entity_prompts must be a list of strings, got {type(prompts).__name__}")
    if not isinstance(masks, Sequence):
        raise ConfigError(f"eligen_entity_masks must be a list of PIL images, got {type(masks).__name__}")
    if len(prompts) != len(masks):
        raise ConfigError(
            f"eligen_entity_prompts has {len(prompts)} entries but eligen_entity_masks has {len(masks)}; "
            "give one mask per entity prompt"
        )
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise ConfigError(f"eligen_entity_prompts[{i}] is a {type(prompt).__name__}; use a string")
    images = []
    for i, mask in enumerate(masks):
        if isinstance(mask, (str, os.PathLike)):
            if not os.path.isfile(mask):
                raise ConfigError(f"eligen_entity_masks[{i}]={str(mask)!r} is not an existing image file")
            with Image.open(mask) as opened:
                mask = opened.convert("RGB")
        if not isinstance(mask, Image.Image):
            raise ConfigError(
                f"eligen_entity_masks[{i}] is a {type(mask).__name__}; use a PIL.Image (white = entity) or a path"
            )
        images.append(mask.convert("RGB"))
    return list(prompts), images


def entity_regions(masks: Sequence[Image.Image], height: int, width: int) -> torch.Tensor:
    """Bool `[N, (height/16) * (width/16)]`: which packed image tokens each mask covers."""
    latent_h, latent_w = height // 8, width // 8
    regions = []
    for mask in masks:
        small = mask.convert("RGB").resize((latent_w, latent_h), Image.NEAREST)
        inside = torch.from_numpy(np.asarray(small, dtype=np.float32).mean(axis=-1) > 127.5)
        tokens = inside.view(latent_h // 2, 2, latent_w // 2, 2).any(dim=3).any(dim=1)
        regions.append(tokens.reshape(-1))
    return torch.stack(regions)


def joint_text(prompt_t5: torch.Tensor, entities: EliGenEntities) -> torch.Tensor:
    """The DiT's text `[B, (N + 1) * L, D]`: the entity prompts in order, then the global prompt."""
    b, length, dim = prompt_t5.shape
    if entities.t5.shape[2:] != (length, dim) or entities.t5.shape[0] not in (1, b):
        raise ValueError(
            f"entity T5 states {tuple(entities.t5.shape)} do not fit the prompt's {tuple(prompt_t5.shape)}: "
            "entity prompts must be encoded with the same t5_sequence_length"
        )
    entity = entities.t5.to(prompt_t5.dtype).expand(b, -1, -1, -1).reshape(b, -1, dim)
    return torch.cat([entity, prompt_t5], dim=1)


def attention_mask(regions: torch.Tensor, prompt_len: int, image_len: int) -> torch.Tensor:
    """Bool mask `[B or 1, 1, S, S]` (True = may attend) over `[entities, global, image]`, S =
    (N + 1) * prompt_len + image_len; image tokens past the regions' length see only the global prompt."""
    b, n, covered = regions.shape
    if covered > image_len:
        raise ValueError(f"entity regions cover {covered} image tokens but the image has {image_len}")
    device = regions.device
    text_len = (n + 1) * prompt_len
    prompt_of = torch.arange(n + 1, device=device).repeat_interleave(prompt_len)
    sees = torch.ones(b, n + 1, image_len, dtype=torch.bool, device=device)  # row n: the global prompt
    sees[:, :n, :covered] = regions
    sees[:, :n, covered:] = False
    text_image = sees.repeat_interleave(prompt_len, dim=1)  # [B, text_len, image_len]
    mask = torch.ones(b, text_len + image_len, text_len + image_len, dtype=torch.bool, device=device)
    mask[:, :text_len, :text_len] = prompt_of[:, None] == prompt_of[None, :]
    mask[:, :text_len, text_len:] = text_image
    mask[:, text_len:, :text_len] = text_image.transpose(1, 2)
    return mask[:, None]


def joint_inputs(
    prompt_t5: torch.Tensor, entities: EliGenEntities, image_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The DiT's text states and its joint attention mask for a call with `image_len` image tokens."""
    txt = joint_text(prompt_t5, entities)
    mask = attention_mask(entities.regions.to(prompt_t5.device), prompt_t5.shape[1], image_len)
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
