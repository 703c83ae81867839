"""Inpainting helpers: the mask on the velocity's grid, its Gaussian blur (torchvision's, which DiffSynth-Studio
uses: `2 * size + 1` taps, borders reflected), the argument checks, and the velocity blend's fixed point."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.inpaint import check_blur, gaussian_blur, inpaint_velocity, mask_grid


def reference_blur(mask: np.ndarray, size: int, sigma: float) -> np.ndarray:
    """The full 2-D Gaussian written out: reflected borders, then each output the weighted sum of its window."""
    taps = np.arange(-size, size + 1, dtype=np.float64)
    g = np.exp(-0.5 * (taps / sigma) ** 2)
    kernel = np.outer(g, g) / np.outer(g, g).sum()
    padded = np.pad(mask, size, mode="reflect")
    out = np.zeros_like(mask, dtype=np.float64)
    for i in range(mask.shape[0]):
        for j in range(mask.shape[1]):
            out[i, j] = (padded[i : i + 2 * size + 1, j : j + 2 * size + 1] * kernel).sum()
    return out


@pytest.mark.parametrize(("size", "sigma"), [(1, 0.5), (2, 1.0), (3, 2.5)])
def test_blur_is_the_reflected_gaussian(size, sigma):
    mask = (np.random.default_rng(size).random((9, 12)) > 0.5).astype(np.float32)
    got = gaussian_blur(torch.from_numpy(mask)[None, None], size, sigma)[0, 0].numpy()
    np.testing.assert_allclose(got, reference_blur(mask, size, sigma), atol=1e-6)


def half_mask(width=64, height=32) -> Image.Image:
    array = np.zeros((height, width), dtype=np.uint8)
    array[:, : width // 2] = 255
    return Image.fromarray(array, mode="L")


def test_mask_grid_resizes_to_the_grid_then_blurs():
    image = Image.new("RGB", (64, 32))
    plain = mask_grid(half_mask(), [image], 1, (4, 8), "cpu")
    assert plain.shape == (1, 1, 4, 8) and plain[..., :3].min() > 0.99 and plain[..., 5:].max() < 0.01
    blurred = mask_grid(half_mask(), [image], 1, (4, 8), "cpu", (1, 1.0))
    torch.testing.assert_close(blurred, gaussian_blur(plain, 1, 1.0))
    assert 0.05 < blurred[0, 0, 0, 4] < 0.95  # the edge is soft now
    with pytest.raises(ConfigError, match="inpaint_blur_size=4 reaches past the 4x8 mask grid; use at most 3"):
        mask_grid(half_mask(), [image], 1, (4, 8), "cpu", (4, 1.0))


@pytest.mark.parametrize(
    ("size", "sigma", "match"),
    [
        (3, None, "go together"),
        (None, 1.0, "go together"),
        (0, 1.0, "inpaint_blur_size=0"),
        (1.5, 1.0, "inpaint_blur_size=1.5"),
        (2, 0.0, "inpaint_blur_sigma=0.0"),
    ],
)
def test_blur_settings_are_checked(size, sigma, match):
    with pytest.raises(ConfigError, match=match):
        check_blur(size, sigma)


def test_blur_settings_pass_through():
    assert check_blur(None, None) is None and check_blur(2, 1) == (2, 1.0)


def test_kept_region_follows_the_renoised_input():
    """Outside the mask an Euler step with the blended velocity lands on the input re-noised to the next sigma."""
    g = torch.Generator().manual_seed(0)
    clean, noise, velocity = (torch.randn(1, 4, 3, 5, generator=g) for _ in range(3))
    mask = torch.zeros(1, 1, 3, 5)
    mask[..., :2] = 1.0
    sigma, following = 0.8, 0.55
    latents = (1 - sigma) * clean + sigma * noise
    stepped = latents + (following - sigma) * inpaint_velocity(velocity, latents, clean, sigma, mask)
    want = (1 - following) * clean + following * noise
    torch.testing.assert_close(stepped[..., 2:], want[..., 2:])
    torch.testing.assert_close(stepped[..., :2], (latents + (following - sigma) * velocity)[..., :2])
