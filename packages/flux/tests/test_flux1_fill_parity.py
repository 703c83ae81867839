"""FLUX.1 Fill against diffusers' FluxFillPipeline on a tiny Fill repo (DiT in_channels 384), fp32 on the CPU.

Same weights, prompts and initial noise; decoded images max abs <= 1e-4. diffusers encodes the masked image with
a posterior sample, ours (as DiffSynth-Studio) with its mean: the reference runs with the mean too.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffsynth_flux_test_helpers import (
    latent_noise,
    max_abs,
    our_images,
    our_pipeline,
    random_image,
    reference_components,
    reference_images,
)
from PIL import Image

from diffsynth.runtime.testing.modules import load_beside

pytest.importorskip("diffusers")

tools = load_beside(__file__, "flux1_tools_repo.py", "diffsynth_flux1_tools_repo")
pytestmark = [pytest.mark.parity, pytest.mark.usefixtures("one_thread")]
PROMPTS = ["a red circle on a blue background", "a yellow triangle on a black background"]
TEXT_LEN = 48


@pytest.fixture(scope="module")
def fill_repo(tiny_repo, tmp_path_factory):
    return tools.tools_repo(tiny_repo, tmp_path_factory.mktemp("fill") / "repo", tools.FILL_CHANNELS, seed=5)


def soft_mask(width: int, height: int, seed: int = 1) -> Image.Image:
    """Gray levels everywhere, so the binarisation at 0.5 and the resize both matter."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8), mode="L")


def test_fill_matches_diffusers(fill_repo, posterior_mean):
    import diffusers

    ref = diffusers.FluxFillPipeline(**reference_components(fill_repo)).to(torch.float32)
    ref.set_progress_bar_config(disable=True)
    ours = our_pipeline(fill_repo)
    image, mask = random_image(64, 40, seed=2), soft_mask(64, 40)  # resized to 48x32 on both sides
    noise = latent_noise(2, 32, 48, seed=4)
    size = dict(num_inference_steps=3, height=32, width=48)
    expected = reference_images(
        ref, noise, TEXT_LEN, prompt=list(PROMPTS), image=image, mask_image=mask, guidance_scale=30.0, **size
    )
    got = our_images(ours, PROMPTS, noise, TEXT_LEN, flux_fill_image=image, flux_fill_mask=mask, **size)
    assert max_abs(got, expected) <= 1e-4
    # the condition reached the model: another mask gives another image
    other = our_images(
        ours, PROMPTS, noise, TEXT_LEN, flux_fill_image=image, flux_fill_mask=soft_mask(64, 40, 9), **size
    )
    assert max_abs(other, got) > 1e-3


def test_fill_condition_matches_diffusers_preprocessing(fill_repo, posterior_mean):
    """Our condition tokens (masked-image latents + folded mask) equal diffusers' `prepare_mask_latents` output."""
    import diffusers

    ref = diffusers.FluxFillPipeline(**reference_components(fill_repo)).to(torch.float32)
    ours = our_pipeline(fill_repo)
    image, mask = random_image(48, 32, seed=3), soft_mask(48, 32, seed=4)
    inputs = ours.check_channel_inputs(image, mask, None, None)
    got = ours.encode_channel_condition(inputs, 1, 32, 48)
    pixels = ref.image_processor.preprocess(image, height=32, width=48).float()
    repaint = ref.mask_processor.preprocess(mask, height=32, width=48)
    folded, latents = ref.prepare_mask_latents(
        repaint, pixels * (1 - repaint), 1, 16, 1, 32, 48, torch.float32, "cpu", None
    )
    want = torch.cat([latents, folded], dim=-1)
    assert got.shape == want.shape == (1, 6, 320)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
