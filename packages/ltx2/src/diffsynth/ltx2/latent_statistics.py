"""The latent normalisation both LTX-2 VAEs store: `per_channel_statistics.mean-of-means` / `std-of-means`.

Latents the DiT sees are `(z - mean) / std` per entry; the video VAE keeps one entry per latent channel,
the audio VAE one per (channel, mel bin). The file's other statistics are read by no pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

MEAN_KEY, STD_KEY = "mean-of-means", "std-of-means"


class PerChannelStatistics(nn.Module):
    """The two buffers, named as in the file."""

    def __init__(self, size: int):
        super().__init__()
        self.register_buffer(MEAN_KEY, torch.zeros(size))
        self.register_buffer(STD_KEY, torch.ones(size))

    def stats(self, like: torch.Tensor, shape: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) in `like`'s device and dtype, viewed as `shape` to broadcast over it."""
        mean = self.get_buffer(MEAN_KEY).to(device=like.device, dtype=like.dtype).view(tuple(shape))
        std = self.get_buffer(STD_KEY).to(device=like.device, dtype=like.dtype).view(tuple(shape))
        return mean, std
