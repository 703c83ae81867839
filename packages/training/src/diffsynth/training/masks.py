"""Masked loss (`--masked_loss`): a grayscale picture per row saying where the loss counts.

Users train a subject or a style on pictures whose background should not be learned (a product on a cluttered
table, a face in a crowd); kohya, OneTrainer and ai-toolkit call this masked training. A row's mask is its
`loss_mask` metadata column, or in a folder of captioned pictures the file `<name>-masklabel.png` beside
`<name>.png` (OneTrainer's name). White counts fully, black not at all (grays between); a row without a mask
counts everywhere. With `--alpha_mask` (kohya's flag) a picture's transparency is the mask of a row that names no
mask file: opaque counts, transparent does not.

The mask is read at the size of the row's picture (or video), fitted to the row's bucket exactly as the picture
is (so the crop matches), then averaged over each latent cell down to the grid of the encoded latents: what is
stored with an encoded sample (`MASK_KEY`, also in `--cache_dir`). In the loss an element's weight is
`unmasked_weight + (1 - unmasked_weight) * mask`, and each sample's error is the weighted mean (the same mean a
task's own `loss_mask` gives; the two multiply). A video row's mask is one picture, the same on every frame.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.media import upright

MASK_COLUMN = "loss_mask"  # the metadata column of a row's mask file
MASK_FILE_SUFFIX = "-masklabel.png"  # a captioned folder's mask beside its picture (OneTrainer's name)
MASK_KEY = "masked_loss_mask"  # an encoded sample's mask on its latent grid, [1, ..., 1, h, w]
WEIGHTS_KEY = "masked_loss_weights"  # a batch's loss weights, [B, 1, ..., 1, h, w]


def mask_file_for(media: Path) -> Path:
    """Where a captioned folder keeps the mask of `media` (`cat.png` -> `cat-masklabel.png`)."""
    return media.with_name(media.stem + MASK_FILE_SUFFIX)


def is_mask_file(path: Path) -> bool:
    return path.name.lower().endswith(MASK_FILE_SUFFIX)


def read_mask(path: Path, media_size: tuple[int, int], bucket: tuple[int, int], fit) -> torch.Tensor:
    """The mask file `path` as `[1, H, W]` float32 in [0, 1] at the row's `bucket`: stretched to the size of the
    row's media first, then `fit` to the bucket as the media is, so both are cropped alike."""
    try:
        with Image.open(path) as image:
            gray = upright(image).convert("L")
    except (OSError, ValueError) as error:
        raise ConfigError(f"--masked_loss: the mask {path} cannot be read as a picture ({error})") from None
    if gray.size != tuple(media_size):
        gray = gray.resize(tuple(media_size), Image.BILINEAR)
    return _fitted(gray, bucket, fit, f"the mask {path}")


def has_alpha(path: Path) -> bool:
    """Whether the picture `path` has transparency (read from its header)."""
    with Image.open(path) as image:
        return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def alpha_mask(path: Path, bucket: tuple[int, int], fit) -> torch.Tensor:
    """`--alpha_mask`: the picture's transparency as its mask (opaque counts), fitted to `bucket` as the picture."""
    with Image.open(path) as image:
        alpha = upright(image).convert("RGBA").getchannel("A")
    return _fitted(alpha, bucket, fit, f"the transparency of {path}")


def _fitted(gray: Image.Image, bucket: tuple[int, int], fit, what: str) -> torch.Tensor:
    fitted = fit(gray, bucket)
    mask = torch.frombuffer(bytearray(fitted.tobytes()), dtype=torch.uint8).float().div(255.0)
    mask = mask.reshape(1, fitted.height, fitted.width)
    if not mask.any():
        raise ConfigError(
            f"--masked_loss: {what} is black over the training crop ({bucket[0]}x{bucket[1]}): the row would count "
            "nowhere; whiten what the model should learn"
        )
    return mask


def latent_mask(mask: torch.Tensor, latents: torch.Tensor, where: str) -> torch.Tensor:
    """`mask` `[1, H, W]` averaged over each latent cell of one sample's `latents` `[..., h, w]`, shaped
    `[1, ..., 1, h, w]` to broadcast over its channels (and frames)."""
    if latents.dim() < 3:
        raise ConfigError(
            f"--masked_loss: {where} has latents of shape {tuple(latents.shape)}, not a grid of pictures "
            "([channels, (frames,) height, width]); this family's training does not take loss masks"
        )
    h, w = latents.shape[-2:]
    height, width = mask.shape[-2:]
    if height % h or width % w or height // h != width // w:
        raise ConfigError(
            f"--masked_loss: {where}: its {width}x{height} mask does not tile the {w}x{h} latent grid evenly"
        )
    cells = F.avg_pool2d(mask.float()[None], kernel_size=height // h)[0]
    return cells.reshape((1,) * (latents.dim() - 2) + (h, w))


def attach_masks(rows: Sequence[dict[str, Any]], samples: list[dict[str, torch.Tensor]]) -> None:
    """Put each row's mask (`MASK_COLUMN`, loaded by the dataset) on its encoded sample's latent grid."""
    for i, (row, sample) in enumerate(zip(rows, samples, strict=True)):
        mask = row.get(MASK_COLUMN)
        if isinstance(mask, torch.Tensor):
            sample[MASK_KEY] = latent_mask(mask, sample["latents"], f"row {i} of the batch").to(
                sample["latents"].device
            )


def take_masks(samples: list[dict[str, Any]]) -> list[torch.Tensor | None]:
    """Remove the masks from encoded samples (the task's `collate` does not know them) and return them."""
    return [sample.pop(MASK_KEY, None) for sample in samples]


def batch_weights(masks: Sequence[torch.Tensor | None], latents: torch.Tensor, unmasked_weight: float):
    """The loss weights of a batch, broadcastable to `latents` `[B, ...]`: None when no row has a mask."""
    if all(mask is None for mask in masks):
        return None
    shape = (1,) * (latents.dim() - 3) + tuple(latents.shape[-2:])
    rows = [
        torch.ones(shape) if mask is None else unmasked_weight + (1.0 - unmasked_weight) * mask.float().cpu()
        for mask in masks
    ]
    return torch.stack(rows).to(latents.device)


__all__ = [
    "MASK_COLUMN",
    "MASK_FILE_SUFFIX",
    "MASK_KEY",
    "WEIGHTS_KEY",
    "alpha_mask",
    "attach_masks",
    "batch_weights",
    "has_alpha",
    "is_mask_file",
    "latent_mask",
    "mask_file_for",
    "read_mask",
    "take_masks",
]
