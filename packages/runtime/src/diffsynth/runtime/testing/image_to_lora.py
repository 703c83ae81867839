"""Tiny i2L image encoders for tests (the one place their sizes live): SigLIP2-G384 and DINOv3-7B at a few
thousand parameters, with seeded random weights, written in the released files' layouts when asked."""

from __future__ import annotations

import json
from pathlib import Path

TINY_SIGLIP = dict(
    hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
)
TINY_DINOV3 = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_register_tokens=2,
    image_size=32,
    patch_size=8,
)
TINY_FEATURES = TINY_SIGLIP["hidden_size"] + TINY_DINOV3["hidden_size"]  # what a tiny i2L model reads


def tiny_image_encoders(seed: int = 0):
    """(SigLIP, DINOv3): our tiny encoders with random weights."""
    from ..models.image_encoders import (
        DINOv3ImageEncoder,
        DINOv3ImageEncoderConfig,
        SiglipImageEncoder,
        SiglipImageEncoderConfig,
    )
    from .weights import random_weights

    siglip = random_weights(SiglipImageEncoder(SiglipImageEncoderConfig(**TINY_SIGLIP)), seed)
    dinov3 = random_weights(DINOv3ImageEncoder(DINOv3ImageEncoderConfig(**TINY_DINOV3)), seed + 1)
    return siglip.eval(), dinov3.eval()


def write_image_encoders(root, seed: int = 0) -> list[Path]:
    """The tiny encoders as `root/SigLIP2-G384/model.safetensors` and `root/DINOv3-7B/model.safetensors` in the
    released layouts (DINOv3's blocks at `layer.N`), each with a config.json naming its head count (which the
    shapes do not tell). Returns the two files."""
    from safetensors.torch import save_file

    siglip, dinov3 = tiny_image_encoders(seed)
    files = []
    for folder, model, config in (("SigLIP2-G384", siglip, TINY_SIGLIP), ("DINOv3-7B", dinov3, TINY_DINOV3)):
        state = {
            k.removeprefix("model.") if k.startswith("model.layer.") else k: v.contiguous()
            for k, v in model.state_dict().items()
        }
        path = Path(root) / folder / "model.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(state, str(path))
        (path.parent / "config.json").write_text(json.dumps(config))
        files.append(path)
    return files


__all__ = ["TINY_DINOV3", "TINY_FEATURES", "TINY_SIGLIP", "tiny_image_encoders", "write_image_encoders"]
