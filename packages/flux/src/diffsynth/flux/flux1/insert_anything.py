"""Insert Anything (song-wensong/insert-anything): put the object of a reference image where a mask says in a
target image, with FLUX.1-Fill-dev, the authors' LoRA and FLUX.1-Redux-dev.

The authors' inference (their `inference.py` / `app.py`, `utils/utils.py`; DiffSynth-Studio's
`FluxImageUnit_InsertAnything` does the same) builds a diptych and inpaints its right half:

- masks are binarised (`> 128`); the target mask is resized to the target image (bilinear) if it differs;
- reference: pixels outside its mask set to white, cut to the mask's box, padded (white) to 1.3x that box around
  it, then to a square (white, centred); resized to 768x768 -- the diptych's left half and the Redux image;
- target: its mask dilated twice by a 7x7 square; the mask's box grown twice by `grow_box` (the area rule
  below) and made square around its centre (clipped at the image borders, so it may stay oblong): the crop;
  the crop padded to a square (white; the mask with black) and resized to 768x768 -- the right half;
- the diptych mask is black on the left, the resized target mask (white = repaint) on the right.

FLUX.1 Fill inpaints the 1536x768 diptych with embedded guidance 30 in 50 steps, the prompt being Redux alone
(zero T5 states and CLIP vector with the masked reference's Redux tokens after them: diffusers'
`FluxPriorReduxPipeline` without text encoders, as the authors load it). Then `paste_back` cuts the right half,
resizes it to the padded crop's size, drops the padding and writes it into the target at the crop's box, all but
a 2-pixel margin.

Two of the authors' details are kept as they are: a box's end (`y2`, `x2`) is the last masked row/column, yet
slices end before it; and `grow_box`'s ratio argument (1.2, then 2) is not used: the box is scaled so that its
share of the image r becomes 0.1 + 1.5 r (r < 0.6; else the whole image).

OpenCV is not needed: `resize_linear` is cv2's `INTER_LINEAR` on uint8 (half-pixel centres, no antialiasing) in
cv2's own fixed-point arithmetic, so that the resized 0/1 masks are the authors' to the pixel (a float bilinear
rounded to nearest differs from cv2 where a value is near one half), and the dilation is a max pooling.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from diffsynth.runtime.errors import ConfigError

SIZE = 768  # the side of each half of the diptych (the authors' `size`)
REFERENCE_PAD = 1.3  # the reference's box is padded to this many times its size
DILATE_KERNEL = 7
DILATE_ITERATIONS = 2
MARGIN = 2  # pixels of the crop's border left as the target had them
_ONE = 2048  # cv2's INTER_RESIZE_COEF_SCALE: interpolation weights in 11-bit fixed point
ARGUMENTS = (
    "insert_anything_source_image",
    "insert_anything_source_mask",
    "insert_anything_ref_image",
    "insert_anything_ref_mask",
)

Box = tuple[int, int, int, int]  # (y1, y2, x1, x2)


@dataclass(frozen=True)
class InsertAnythingCrop:
    """What `paste_back` needs: the target image, the crop's box in it, the crop's size and its padded side."""

    target: np.ndarray  # [H, W, 3] uint8
    box: Box
    crop_size: tuple[int, int]  # (height, width) of the crop
    padded: int  # the side of the square the crop was padded to


@dataclass(frozen=True)
class InsertAnythingInputs:
    """The FLUX.1 Fill + Redux inputs of one insertion and what the output needs afterwards."""

    fill_image: Image.Image  # [masked reference | target crop], RGB, (2 * size) x size
    fill_mask: Image.Image  # black | target mask, RGB like the authors' (white = repaint)
    redux_image: Image.Image  # the masked reference, size x size
    crop: InsertAnythingCrop

    @property
    def height(self) -> int:
        return self.fill_image.height

    @property
    def width(self) -> int:
        return self.fill_image.width


# ----------------------------------------------------------------------------------------- pixel operations
def _taps(src: int, dst: int, clamp: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per output index: the two source indices and their 11-bit weights, as cv2 derives them (float32 source
    positions at half-pixel centres; columns clamp the position at the edges, rows only the indices)."""
    scale = 1.0 / (dst / src)
    pos = ((np.arange(dst, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    first = np.floor(pos).astype(np.int64)
    frac = (pos - first.astype(np.float32)).astype(np.float32)
    if clamp:
        edge = (first < 0) | (first >= src - 1)
        frac[edge] = 0
        first = np.where(first < 0, 0, np.where(first >= src - 1, src - 1, first))
    w0 = np.rint((np.float32(1) - frac) * np.float32(_ONE)).astype(np.int32)
    w1 = np.rint(frac * np.float32(_ONE)).astype(np.int32)
    return np.clip(first, 0, src - 1), np.clip(first + 1, 0, src - 1), w0, w1


def resize_linear(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """`array` ([H, W] or [H, W, C] uint8) resized as cv2.resize(..., INTER_LINEAR) does it, bit for bit: bilinear
    at half-pixel centres in cv2's fixed point (11-bit weights, rows then the SIMD rounding of its vertical pass),
    and an exact halving of both sides as the mean of 2x2 blocks (cv2 switches to INTER_AREA there)."""
    src = np.asarray(array, dtype=np.uint8)
    h, w = src.shape[:2]
    if (h, w) == (height, width):
        return src.copy()
    a = src.astype(np.int32)
    if (h, w) == (2 * height, 2 * width):
        blocks = a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2]
        return ((blocks + 2) >> 2).astype(np.uint8)
    c0, c1, a0, a1 = _taps(w, width, clamp=True)
    r0, r1, b0, b1 = _taps(h, height, clamp=False)
    shape = (1, -1) + (1,) * (a.ndim - 2)

    def rows(index: np.ndarray) -> np.ndarray:  # the horizontal pass of the rows `index`, >> 4 as cv2's SIMD does
        picked = a[index]
        return (picked[:, c0] * a0.reshape(shape) + picked[:, c1] * a1.reshape(shape)) >> 4

    b0, b1 = b0.reshape((-1,) + (1,) * (a.ndim - 1)), b1.reshape((-1,) + (1,) * (a.ndim - 1))
    out = (((rows(r0) * b0) >> 16) + ((rows(r1) * b1) >> 16) + 2) >> 2
    return np.clip(out, 0, 255).astype(np.uint8)


def dilate(mask: np.ndarray, kernel: int = DILATE_KERNEL, iterations: int = DILATE_ITERATIONS) -> np.ndarray:
    """A 0/1 mask dilated by a `kernel` x `kernel` square `iterations` times (cv2.dilate; outside counts as 0)."""
    x = torch.from_numpy(mask.astype(np.float32))[None, None]
    for _ in range(iterations):
        x = F.max_pool2d(x, kernel, stride=1, padding=kernel // 2)
    return x[0, 0].numpy().astype(mask.dtype)


def mask_box(mask: np.ndarray) -> Box:
    """The authors' box of a 0/1 mask: first and last masked row and column (the whole image under 10 pixels)."""
    height, width = mask.shape
    if mask.sum() < 10:
        return 0, height, 0, width
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])


def grow_box(shape: tuple[int, ...], box: Box) -> Box:
    """The box scaled about its centre so its share r of the image becomes 0.1 + 1.5 r (r < 0.6; else 1),
    truncated to integers and clipped to the image (the authors' `expand_bbox`)."""
    y1, y2, x1, x2 = box
    height, width = shape[0], shape[1]
    share = (y2 - y1 + 1) * (x2 - x1 + 1) / (height * width)
    target = 0.1 + (1 - 0.1) / 0.6 * share if share < 0.6 else 1.0
    scale = math.sqrt(target / share)
    yc, xc = 0.5 * (y1 + y2), 0.5 * (x1 + x2)
    h, w = scale * (y2 - y1 + 1), scale * (x2 - x1 + 1)
    top, bottom = max(0, int(yc - h * 0.5)), min(height, int(yc + h * 0.5))
    left, right = max(0, int(xc - w * 0.5)), min(width, int(xc + w * 0.5))
    return top, bottom, left, right


def square_box(shape: tuple[int, ...], box: Box) -> Box:
    """The box widened (or heightened) to a square about its centre, clipped to the image (`box2squre`)."""
    y1, y2, x1, x2 = box
    height, width = shape[0], shape[1]
    cy, cx = (y1 + y2) // 2, (x1 + x2) // 2
    h, w = y2 - y1, x2 - x1
    if h >= w:
        x1, x2 = cx - h // 2, cx + h // 2
    else:
        y1, y2 = cy - w // 2, cy + w // 2
    return max(0, y1), min(height, y2), max(0, x1), min(width, x2)


def pad_square(array: np.ndarray, value: int) -> np.ndarray:
    """`array` padded with `value` on both sides of its shorter axis (the smaller half first) to a square."""
    height, width = array.shape[:2]
    if height == width:
        return array
    extra = abs(height - width)
    before = extra // 2
    pad = [(0, 0)] * array.ndim
    pad[1 if height > width else 0] = (before, extra - before)
    return np.pad(array, pad, mode="constant", constant_values=value)


def pad_around(image: np.ndarray, mask: np.ndarray, ratio: float = REFERENCE_PAD) -> tuple[np.ndarray, np.ndarray]:
    """Image (white) and mask (black) padded about the centre to `int(ratio * size)` on each axis."""
    height, width = image.shape[:2]
    extra_h, extra_w = int(height * ratio) - height, int(width * ratio) - width
    pad_h, pad_w = (extra_h // 2, extra_h - extra_h // 2), (extra_w // 2, extra_w - extra_w // 2)
    image = np.pad(image, (pad_h, pad_w, (0, 0)), mode="constant", constant_values=255)
    return image, np.pad(mask, (pad_h, pad_w), mode="constant", constant_values=0)


# ----------------------------------------------------------------------------------------- inputs and output
def _open(image, name: str) -> Image.Image:
    if isinstance(image, (str, os.PathLike)):
        from diffsynth.runtime.media import load_image

        return load_image(image)
    if not isinstance(image, Image.Image):
        raise ConfigError(f"{name} must be a file path or a PIL.Image, got {type(image).__name__}")
    return image


def _rgb(image, name: str) -> np.ndarray:
    return np.asarray(_open(image, name).convert("RGB"), dtype=np.uint8)


def _binary(mask, name: str) -> np.ndarray:
    """The authors' 0/1 mask: grayscale > 128."""
    binary = (np.asarray(_open(mask, name).convert("L")) > 128).astype(np.uint8)
    if not binary.any():
        raise ConfigError(f"{name} has no white pixel (> 128): white marks the object / where it goes")
    return binary


def prepare_insert_anything(
    source_image: Image.Image | str | os.PathLike,
    source_mask: Image.Image | str | os.PathLike,
    ref_image: Image.Image | str | os.PathLike,
    ref_mask: Image.Image | str | os.PathLike,
    size: int = SIZE,
) -> InsertAnythingInputs:
    """The diptych, its mask and the Redux image for inserting the object `ref_mask` marks in `ref_image` where
    `source_mask` marks in `source_image` (see the module docstring); halves of `size` x `size` pixels."""
    names = dict(zip(("source", "source_mask", "ref", "ref_mask"), ARGUMENTS, strict=True))
    ref, ref_binary = _rgb(ref_image, names["ref"]), _binary(ref_mask, names["ref_mask"])
    target, target_binary = _rgb(source_image, names["source"]), _binary(source_mask, names["source_mask"])
    if ref_binary.shape != ref.shape[:2]:
        raise ConfigError(
            f"{names['ref_mask']} is {ref_binary.shape[1]}x{ref_binary.shape[0]}; it must be the size of "
            f"{names['ref']} ({ref.shape[1]}x{ref.shape[0]})"
        )
    target_binary = resize_linear(target_binary, *target.shape[:2])

    # the reference: the object on white, cut to its box, padded around, then to a square
    y1, y2, x1, x2 = mask_box(ref_binary)
    kept = ref_binary[..., None].astype(bool)
    masked = np.where(kept, ref, np.uint8(255))[y1:y2, x1:x2]
    masked, _ = pad_around(masked, ref_binary[y1:y2, x1:x2])
    masked = resize_linear(pad_square(masked, 255), size, size)

    # the target: the dilated mask's box grown twice and squared is the crop
    target_binary = dilate(target_binary)
    box = grow_box(target.shape, grow_box(target_binary.shape, mask_box(target_binary)))
    y1, y2, x1, x2 = box = square_box(target.shape, box)
    crop, crop_mask = target[y1:y2, x1:x2], target_binary[y1:y2, x1:x2]
    padded = pad_square(crop, 255)
    right = resize_linear(padded, size, size)
    right_mask = resize_linear(pad_square(crop_mask, 0), size, size)

    mask = np.concatenate([np.zeros_like(right_mask), right_mask], axis=1)
    mask = np.repeat((mask == 1)[..., None].astype(np.uint8) * 255, 3, axis=2)
    return InsertAnythingInputs(
        fill_image=Image.fromarray(np.concatenate([masked, right], axis=1)),
        fill_mask=Image.fromarray(mask),
        redux_image=Image.fromarray(masked),
        crop=InsertAnythingCrop(target=target, box=box, crop_size=crop.shape[:2], padded=padded.shape[0]),
    )


def paste_back(diptych: Image.Image | np.ndarray, crop: InsertAnythingCrop, margin: int = MARGIN) -> Image.Image:
    """The generated diptych's right half resized to the padded crop, its padding dropped, written into the
    target at the crop's box except for a `margin`-pixel border (the authors' `crop_back`)."""
    array = np.asarray(diptych.convert("RGB") if isinstance(diptych, Image.Image) else diptych, dtype=np.uint8)
    right = array[:, array.shape[1] // 2 :]
    pred = resize_linear(right, crop.padded, crop.padded)
    height, width = crop.crop_size
    top, left = (crop.padded - height) // 2, (crop.padded - width) // 2
    pred = pred[top : top + height, left : left + width]
    y1, y2, x1, x2 = crop.box
    out = crop.target.copy()
    m = margin
    if m:
        out[y1 + m : y2 - m, x1 + m : x2 - m] = pred[m:-m, m:-m]
    else:
        out[y1:y2, x1:x2] = pred
    return Image.fromarray(out)


def zero_prompt(batch: int, text_len: int, text_dim: int, pooled_dim: int):
    """The text part of the authors' Redux prompt: zero T5 states `[B, text_len, text_dim]` and CLIP vector."""
    from .text_encoder import FluxPromptEmbeds

    return FluxPromptEmbeds(torch.zeros(batch, text_len, text_dim), torch.zeros(batch, pooled_dim))


__all__ = [
    "ARGUMENTS",
    "SIZE",
    "InsertAnythingCrop",
    "InsertAnythingInputs",
    "dilate",
    "grow_box",
    "mask_box",
    "pad_around",
    "pad_square",
    "paste_back",
    "prepare_insert_anything",
    "resize_linear",
    "square_box",
    "zero_prompt",
]
