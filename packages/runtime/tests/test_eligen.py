"""EliGen's shared parts: the joint attention mask against DiffSynth-Studio's construction written out loop by loop
(`process_entity_masks` of its Qwen-Image DiT), and the token regions of a mask."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from diffsynth.runtime.eligen import entity_regions, segment_attention_mask


def diffsynth_mask(segment_lengths, region_masks, image_len) -> torch.Tensor:
    """DiffSynth-Studio's `process_entity_masks` mask, loop by loop: all True, then per segment (entities, then
    the global prompt with a full region) its rows/columns against the image, then segment-to-segment cut."""
    total = sum(segment_lengths) + image_len
    mask = torch.ones(total, total, dtype=torch.bool)
    starts = np.cumsum([0, *segment_lengths])
    regions = [*region_masks, torch.ones(image_len, dtype=torch.bool)]
    image_start = starts[-1]
    for i, region in enumerate(regions):
        rows = slice(starts[i], starts[i + 1])
        mask[rows, image_start:] = region[None].expand(segment_lengths[i], -1)
        mask[image_start:, rows] = region[:, None].expand(-1, segment_lengths[i])
    for i in range(len(regions)):
        for j in range(len(regions)):
            if i != j:
                mask[starts[i] : starts[i + 1], starts[j] : starts[j + 1]] = False
    return mask


def test_mask_is_diffsynth_studios():
    g = torch.Generator().manual_seed(0)
    regions = torch.rand(2, 8, generator=g) > 0.5
    got = segment_attention_mask(regions[None], [3, 5, 4], 8)
    assert torch.equal(got[0, 0], diffsynth_mask([3, 5, 4], list(regions), 8))


def test_regions_follow_the_latent_grid_and_the_packing():
    """A mask's latent cell (1/8) is inside when its RGB mean is above half; a 2x2 token when any cell is."""
    array = np.zeros((32, 64, 3), dtype=np.uint8)
    array[:8, :8] = 255  # one latent cell of the top-left token
    regions = entity_regions([Image.fromarray(array)], 32, 64)
    assert regions.shape == (1, 2 * 4) and regions[0].tolist() == [True] + [False] * 7
