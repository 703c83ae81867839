"""Masked loss (`--masked_loss`): a grayscale picture per row saying where the loss counts.

Users train a subject or a style on pictures whose background should not be learned (a product on a cluttered
table, a face in a crowd); kohya, OneTrainer and ai-toolkit call this masked training. A row's mask is its
`loss_mask` metadata column, or in a folder of captioned pictures the file `<name>-masklabel.png` beside
`<name>.png` (OneTrainer's name; beside a video `<name>.mp4` also a mask video `<name>-masklabel.mp4`). White counts fully, black not at all (grays between); a row without a mask
counts everywhere. With `--alpha_mask` (kohya's flag) a picture's transparency is the mask of a row that names no
mask file: opaque counts, transparent does not.

The mask is read at the size of the row's picture (or video), fitted to the row's bucket exactly as the picture
is (so the crop matches), then averaged over each latent cell down to the grid of the encoded latents: what is
stored with an encoded sample (`MASK_KEY`, also in `--cache_dir`). In the loss an element's weight is
`unmasked_weight + (1 - unmasked_weight) * mask`, and each sample's error is the weighted mean (the same mean a
task's own `loss_mask` gives; the two multiply).

A video row's mask is a picture, the same on every frame, or a mask video (a moving subject): a video file read
with the same frames as the row's video (frame k of the mask weighs frame k of the video; a mask video shorter than
that is an error naming the row and the file), each frame stretched and fitted as the video's frames are, then
averaged over each latent cell in space and, in time, over the frames each latent frame encodes: the first frame
alone, then `temporal_compression` frames at a time (a causal video VAE's chunks, Wan's 1 + 4k). The task says how
many: its optional `temporal_compression` attribute, else its pipeline's VAE's (`task.pipe.vae`); a task that says
neither refuses mask videos. A picture row's mask is a picture.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.media import VIDEO_SUFFIXES, eight_bit, upright

MASK_COLUMN = "loss_mask"  # the metadata column of a row's mask file
MASK_NAME = "-masklabel"  # a captioned folder's mask beside its picture or video (OneTrainer's name)
MASK_FILE_SUFFIX = MASK_NAME + ".png"
MASK_KEY = "masked_loss_mask"  # an encoded sample's mask on its latent grid, [1, ..., 1, h, w]
WEIGHTS_KEY = "masked_loss_weights"  # a batch's loss weights, [B, 1, ..., 1, h, w]


def mask_file_for(media: Path) -> Path:
    """Where a captioned folder keeps the mask of `media`: `cat.png` -> `cat-masklabel.png`; a video's is a mask
    video of its name where one exists (`clip.mp4` -> `clip-masklabel.mp4`, its own suffix first, then the others),
    else a mask picture (`clip-masklabel.png`)."""
    picture = media.with_name(media.stem + MASK_FILE_SUFFIX)
    if media.suffix.lower() not in VIDEO_SUFFIXES:
        return picture
    suffixes = dict.fromkeys((media.suffix, *VIDEO_SUFFIXES))
    return next((v for s in suffixes if (v := media.with_name(media.stem + MASK_NAME + s)).is_file()), picture)


def is_mask_file(path: Path) -> bool:
    """Whether a captioned folder's file is a mask (of a picture or a video), not a training sample."""
    suffix = path.suffix.lower()
    return path.stem.lower().endswith(MASK_NAME) and (suffix == ".png" or suffix in VIDEO_SUFFIXES)


def read_mask(path: Path, media_size: tuple[int, int], bucket: tuple[int, int], fit) -> torch.Tensor:
    """The mask file `path` as `[1, H, W]` float32 in [0, 1] at the row's `bucket`: stretched to the size of the
    row's media first, then `fit` to the bucket as the media is, so both are cropped alike."""
    try:
        with Image.open(path) as image:
            gray = eight_bit(upright(image), f"the mask {path}").convert("L")  # 16-bit grey scaled, not clipped
    except (OSError, ValueError) as error:
        raise ConfigError(f"--masked_loss: the mask {path} cannot be read as a picture ({error})") from None
    return _nonzero(_fitted(gray, media_size, bucket, fit), bucket, f"the mask {path}")


def read_mask_video(
    path: Path, frames: Sequence[Image.Image], media_size: tuple[int, int], bucket: tuple[int, int], fit
) -> torch.Tensor:
    """The mask video `path`, decoded as `frames` (the dataset reads them as it reads the row's video), as
    `[1, F, H, W]` float32 in [0, 1] at the row's `bucket`: each frame gray, stretched to the size of the row's
    video and `fit` to the bucket as the video's frames are."""
    mask = torch.stack([_fitted(frame.convert("L"), media_size, bucket, fit) for frame in frames], dim=1)
    return _nonzero(mask, bucket, f"the mask video {path}")


def has_alpha(path: Path) -> bool:
    """Whether the picture `path` has transparency (read from its header)."""
    with Image.open(path) as image:
        return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def alpha_mask(path: Path, bucket: tuple[int, int], fit) -> torch.Tensor:
    """`--alpha_mask`: the picture's transparency as its mask (opaque counts), fitted to `bucket` as the picture."""
    with Image.open(path) as image:
        alpha = upright(image).convert("RGBA").getchannel("A")
    return _nonzero(_fitted(alpha, alpha.size, bucket, fit), bucket, f"the transparency of {path}")


def _fitted(gray: Image.Image, media_size: tuple[int, int], bucket: tuple[int, int], fit) -> torch.Tensor:
    """A gray picture stretched to `media_size`, then `fit` to `bucket`, as `[1, H, W]` in [0, 1]."""
    if gray.size != tuple(media_size):
        gray = gray.resize(tuple(media_size), Image.BILINEAR)
    fitted = fit(gray, bucket)
    mask = torch.frombuffer(bytearray(fitted.tobytes()), dtype=torch.uint8).float().div(255.0)
    return mask.reshape(1, fitted.height, fitted.width)


def _nonzero(mask: torch.Tensor, bucket: tuple[int, int], what: str) -> torch.Tensor:
    if not mask.any():
        raise ConfigError(
            f"--masked_loss: {what} is black over the training crop ({bucket[0]}x{bucket[1]}): the row would count "
            "nowhere; whiten what the model should learn"
        )
    return mask


def temporal_compression(task) -> int | None:
    """How many video frames each latent frame after the first encodes (the first encodes one) for `task`: its
    optional `temporal_compression` attribute, else its pipeline's VAE's (`task.pipe.vae.temporal_compression`,
    Wan's 4); None when it says neither (the mask videos are then refused)."""
    declared = getattr(task, "temporal_compression", None)
    if declared is None:
        declared = getattr(getattr(getattr(task, "pipe", None), "vae", None), "temporal_compression", None)
    return None if declared is None else int(declared)


def latent_mask(
    mask: torch.Tensor, latents: torch.Tensor, where: str, temporal_compression: int | None = None
) -> torch.Tensor:
    """`mask` averaged over each latent cell of one sample's `latents` `[..., h, w]`. A picture's mask `[1, H, W]`
    is shaped `[1, ..., 1, h, w]` to broadcast over the channels (and frames); a mask video's `[1, F, H, W]`, for
    video latents `[channels, T, h, w]`, is also averaged over the frames of each latent frame (the first alone,
    then `temporal_compression` at a time), shaped `[1, T, h, w]`."""
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
    if mask.dim() == 3:
        cells = F.avg_pool2d(mask.float()[None], kernel_size=height // h)[0]
        return cells.reshape((1,) * (latents.dim() - 2) + (h, w))
    if latents.dim() != 4:
        raise ConfigError(
            f"--masked_loss: {where} has a mask video but latents of shape {tuple(latents.shape)}, not a video's "
            "[channels, frames, height, width]; give the row a mask picture"
        )
    cells = F.avg_pool2d(mask.float(), kernel_size=height // h)  # [1, F, h, w]: each frame's cells
    groups = frame_groups(mask.shape[1], latents.shape[1], temporal_compression, where)
    return torch.stack([cells[:, group.start : group.stop].mean(1) for group in groups], dim=1)


def frame_groups(frames: int, latent_frames: int, temporal_compression: int | None, where: str) -> list[range]:
    """The video frames each latent frame encodes: the first alone, then `temporal_compression` at a time."""
    if temporal_compression is None:
        raise ConfigError(
            f"--masked_loss: {where} has a mask video, but this family's training task does not say how many "
            "frames each latent frame encodes (its `temporal_compression`); give the row a mask picture"
        )
    tc = temporal_compression
    if frames != 1 + (latent_frames - 1) * tc:
        raise ConfigError(
            f"--masked_loss: {where}: its mask video's {frames} frames do not make its {latent_frames} latent "
            f"frames (the first frame alone, then {tc} a latent frame: {1 + (latent_frames - 1) * tc} frames)"
        )
    return [range(0, 1)] + [range(1 + k * tc, 1 + (k + 1) * tc) for k in range(latent_frames - 1)]


def attach_masks(
    rows: Sequence[dict[str, Any]], samples: list[dict[str, torch.Tensor]], temporal_compression: int | None = None
) -> None:
    """Put each row's mask (`MASK_COLUMN`, loaded by the dataset) on its encoded sample's latent grid (a mask
    video's frames grouped by the task's `temporal_compression`, see `latent_mask`)."""
    for i, (row, sample) in enumerate(zip(rows, samples, strict=True)):
        mask = row.get(MASK_COLUMN)
        if isinstance(mask, torch.Tensor):
            where = f"row {i} of the batch"
            sample[MASK_KEY] = latent_mask(mask, sample["latents"], where, temporal_compression).to(
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
    common = torch.broadcast_shapes(*(row.shape for row in rows))  # a mask video's frames, beside pictures' masks
    return torch.stack([row.expand(common) for row in rows]).to(latents.device)


__all__ = [
    "MASK_COLUMN",
    "MASK_FILE_SUFFIX",
    "MASK_NAME",
    "MASK_KEY",
    "WEIGHTS_KEY",
    "alpha_mask",
    "attach_masks",
    "batch_weights",
    "frame_groups",
    "has_alpha",
    "is_mask_file",
    "latent_mask",
    "mask_file_for",
    "read_mask",
    "read_mask_video",
    "take_masks",
    "temporal_compression",
]
