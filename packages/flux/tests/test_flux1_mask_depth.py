"""FLUX.1 inpaint masks deeper than 8 bits: a 16-bit grey mask (a PNG from a compositing tool) must read as its
8-bit twin, not clip to white under PIL's `convert("L")` (a soft mask would then repaint everything)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffsynth_flux_test_helpers import random_image
from PIL import Image

from diffsynth.flux.pipeline import _load_mask
from diffsynth.runtime.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


def ramp_masks(width: int = 32, height: int = 32) -> tuple[Image.Image, Image.Image]:
    """A left-to-right black-to-white ramp, as 8-bit (mode L) and as the same values in 16 bits (mode I;16)."""
    ramp8 = np.tile(np.linspace(0, 255, width).round().astype(np.uint8), (height, 1))
    return Image.fromarray(ramp8), Image.fromarray(ramp8.astype(np.uint16) * 257)


def test_sixteen_bit_fill_mask_reads_as_its_eight_bit_twin(tmp_path):
    mask8, mask16 = ramp_masks()
    path = tmp_path / "mask16.png"
    mask16.save(path)
    want = np.asarray(_load_mask(mask8, "flux_fill_mask"))
    assert np.array_equal(np.asarray(_load_mask(mask16, "flux_fill_mask")), want)
    assert np.array_equal(np.asarray(_load_mask(path, "flux_fill_mask")), want)


def test_missing_mask_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nowhere.png"):
        _load_mask(tmp_path / "nowhere.png", "flux_fill_mask")


def test_sixteen_bit_inpaint_control_mask_matches_eight_bit(tiny_pipe, tmp_path):
    image = random_image(32, 32, seed=3)
    mask8, mask16 = ramp_masks()
    path = tmp_path / "mask16.png"
    mask16.save(path)
    want = tiny_pipe.encode_inpaint_control(image, mask8)
    torch.testing.assert_close(tiny_pipe.encode_inpaint_control(image, mask16), want, atol=0, rtol=0)
    torch.testing.assert_close(tiny_pipe.encode_inpaint_control(image, path), want, atol=0, rtol=0)
