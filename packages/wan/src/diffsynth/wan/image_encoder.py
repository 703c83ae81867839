"""Wan image conditioning: CLIP ViT-H/14 features of the first (and last) frame for the I2V/FLF2V DiTs.

The Wan authors use the vision tower of open-clip's XLM-RoBERTa ViT-H/14 and read the tokens after
31 of its 32 blocks (all 257 of them, class token first), from the image stretched to 224x224 with
bicubic interpolation and normalised with the OpenAI CLIP mean/std. `WanImageEncoder` is
transformers' `CLIPVisionModel`, which that tower maps onto 1:1 (see `encoder_formats.py`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPVisionConfig, CLIPVisionModel

from diffsynth.runtime.media import pil_to_tensor

logger = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class WanImageEncoder(CLIPVisionModel):
    """transformers' `CLIPVisionModel` that stops one block short of the end, as Wan reads it."""

    offload_units = ("encoder.layers",)
    compile_units = ("encoder.layers",)

    def __init__(self, config: CLIPVisionConfig):
        super().__init__(config)
        # `position_ids` is a non-persistent buffer: no checkpoint carries it, so a meta build keeps
        # it on meta after `load_state_dict(assign=True)`. Rebuild it after loads.
        self.register_load_state_dict_post_hook(_rebuild_after_load)

    def materialize_buffers(self) -> None:
        """Loader hook: recompute the position ids a meta build left on meta."""
        device = self.embeddings.class_embedding.device
        if self.embeddings.position_ids.device.type == "meta" and device.type != "meta":
            ids = torch.arange(self.embeddings.num_positions, device=device).expand((1, -1))
            self.embeddings.register_buffer("position_ids", ids, persistent=False)

    def penultimate_hidden_states(self, pixel_values: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """[B, 1 + patches, hidden]: the tokens after all blocks but the last (= `hidden_states[-2]`),
        computed in `dtype` (default: the patch embedding's)."""
        x = self.embeddings(pixel_values.to(dtype or self.embeddings.patch_embedding.weight.dtype))
        x = self.pre_layrnorm(x)
        for layer in self.encoder.layers[:-1]:
            x = layer(x, None)
            if isinstance(x, tuple):  # older transformers returned (hidden, ...)
                x = x[0]
        return x


def _rebuild_after_load(module: WanImageEncoder, incompatible_keys) -> None:
    module.materialize_buffers()


def preprocess(images, size: int, device=None) -> torch.Tensor:
    """CLIP pixels [B, 3, size, size]: images stretched to size x size (bicubic), CLIP mean/std.

    `images` are PIL images, or a float tensor [B, 3, H, W] / [3, H, W] in [-1, 1].
    """
    if isinstance(images, torch.Tensor):
        batch = [images[None] if images.dim() == 3 else images]
        if batch[0].dim() != 4 or batch[0].shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W] in [-1, 1], got shape {tuple(images.shape)}")
    else:
        batch = [pil_to_tensor(im) for im in ([images] if isinstance(images, Image.Image) else list(images))]
    resized = [
        F.interpolate(p.to(device=device, dtype=torch.float32), size=(size, size), mode="bicubic", align_corners=False)
        for p in batch  # images of different sizes are each stretched to the square
    ]
    pixels = torch.cat(resized)
    mean = torch.tensor(CLIP_MEAN, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=pixels.device).view(1, 3, 1, 1)
    return (pixels * 0.5 + 0.5 - mean) / std


@torch.no_grad()
def encode_image(
    image_encoder: WanImageEncoder,
    images: Image.Image | Sequence[Image.Image] | torch.Tensor,
    device=None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """[B, 257, 1280] CLIP features of the images (PIL, or [B, 3, H, W] in [-1, 1]).

    `device` (where the pixels go) defaults to where the encoder's weights are, `dtype` (the compute
    dtype) to theirs; pass both when the encoder's weights are offloaded.
    """
    if device is None:
        device = image_encoder.embeddings.patch_embedding.weight.device
    pixels = preprocess(images, image_encoder.config.image_size, device=device)
    return image_encoder.penultimate_hidden_states(pixels, dtype)


__all__ = ["CLIP_MEAN", "CLIP_STD", "WanImageEncoder", "encode_image", "preprocess"]
