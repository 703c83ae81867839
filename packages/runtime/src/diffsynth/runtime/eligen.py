"""EliGen regional prompts, what every family shares: the inputs, the regions, the joint attention mask.

Each entity is a prompt and a region of the image (a mask, white = entity). The DiT reads the text
segments `[entity 0, ..., entity N-1, global]` followed by the image tokens, and attention over that
joint sequence is restricted so that:

- an entity's text tokens and the image tokens inside its region see each other; image tokens outside
  the region do not see that entity's text (nor does it see them);
- text tokens see only the text of their own segment (entity to entity and entity to global are cut);
- the global prompt and every image token see each other, and image tokens see all image tokens.

Masks are resized (nearest) to the latent grid (1/8 of the image), a latent pixel is inside when the
mean of its RGB values is above half, and a packed 2x2 token is inside when any of its four pixels is.
This is DiffSynth-Studio's EliGen (its EliGen LoRAs are ordinary LoRAs); `diffsynth.flux.flux1.eligen`
and `diffsynth.qwen_image.eligen` place the text segments for their DiTs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from .errors import ConfigError


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


def segment_attention_mask(regions: torch.Tensor, segment_lengths: Sequence[int], image_len: int) -> torch.Tensor:
    """Bool mask `[B or 1, 1, S, S]` (True = may attend) over `[segments, image]`: `regions` `[B or 1, N, L]`
    for the first N segments (the entities), the last segment the global prompt, S = sum(segment_lengths) +
    image_len. Image tokens past the regions' `L` (reference images) see only the global prompt."""
    b, n, covered = regions.shape
    if len(segment_lengths) != n + 1:
        raise ValueError(f"{len(segment_lengths)} text segments for {n} entities: give one per entity and the global")
    if covered > image_len:
        raise ValueError(f"entity regions cover {covered} image tokens but the image has {image_len}")
    device = regions.device
    lengths = torch.tensor(list(segment_lengths), device=device)
    text_len = int(lengths.sum())
    segment_of = torch.arange(n + 1, device=device).repeat_interleave(lengths)
    sees = torch.ones(b, n + 1, image_len, dtype=torch.bool, device=device)  # row n: the global prompt
    sees[:, :n, :covered] = regions
    sees[:, :n, covered:] = False
    text_image = sees.repeat_interleave(lengths, dim=1)  # [B, text_len, image_len]
    mask = torch.ones(b, text_len + image_len, text_len + image_len, dtype=torch.bool, device=device)
    mask[:, :text_len, :text_len] = segment_of[:, None] == segment_of[None, :]
    mask[:, :text_len, text_len:] = text_image
    mask[:, text_len:, :text_len] = text_image.transpose(1, 2)
    return mask[:, None]


__all__ = ["check_entity_inputs", "entity_regions", "segment_attention_mask"]
