"""A training row's pictures and columns, as every FLUX.1 training mode reads them."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from PIL import Image

from diffsynth.runtime.errors import ConfigError, preview
from diffsynth.runtime.media import tensor_to_pil


def has(row: Mapping[str, Any], column: str) -> bool:
    """Whether a row gives `column`: not missing or None, nor an empty string, list or tuple (a blank CSV cell)."""
    value = row.get(column)
    return value is not None and not (isinstance(value, (str, list, tuple)) and not value)


def row_picture(index: int, row: Mapping[str, Any], column: str):
    """A row's condition picture as PIL: the dataset's tensor [3, H, W] in [-1, 1] back to 8 bits (lossless for
    8-bit files), or a PIL image as given; a path means the column was not read as a file."""
    value = row[column]
    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]
    return picture(index, value, column, column)


def picture(index: int, value: Any, what: str, column: str):
    """One picture of a row (`what`: its name in errors, e.g. "eligen_entity_masks[1]") as PIL (see `row_picture`)."""
    if isinstance(value, (str, os.PathLike)):
        raise ConfigError(
            f"row {index}: {what} is the path {str(value)!r}, not a loaded image; add {column} to --data_file_keys "
            "(it is read at the row's size, aligned with its image)"
        )
    if isinstance(value, torch.Tensor):
        if value.dim() != 3 or value.shape[0] not in (1, 3):
            raise ConfigError(f"row {index}: {what} must be one image [3, H, W], got {tuple(value.shape)}")
        return tensor_to_pil(value.expand(3, -1, -1))[0]
    if isinstance(value, Image.Image):
        return value
    raise ConfigError(f"row {index}: {what} must be one image (a [3, H, W] tensor or PIL image), got {preview(value)}")
