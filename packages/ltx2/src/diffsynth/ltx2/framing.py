"""Fitting a user's picture to the frame size the pipeline generates at."""

from __future__ import annotations

from PIL import Image


def fit_image(image: Image.Image, height: int, width: int) -> Image.Image:
    """`image` cropped at its centre to the aspect ratio `width / height`, then resized bilinearly to it."""
    src_w, src_h = image.size
    scale = max(height / src_h, width / src_w)
    crop_w, crop_h = min(src_w, round(width / scale)), min(src_h, round(height / scale))
    left, top = (src_w - crop_w) // 2, (src_h - crop_h) // 2
    if (crop_w, crop_h) != (src_w, src_h):
        image = image.crop((left, top, left + crop_w, top + crop_h))
    return image if image.size == (width, height) else image.resize((width, height), Image.BILINEAR)
