"""Qwen-Image 2.1 image-to-image and inpainting (`input_image`, `denoising_strength`, `inpaint_mask`): no
installable library implements them for 2.1, so the tests check what they must equal on the tiny random repo."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffsynth.qwen_image.qwen_image21.pipeline import QwenImage21Pipeline, latents_to_tokens, tokens_to_latents
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.testing.modules import load_beside

R = load_beside(__file__, "qwen_image21_repo.py", "qwen_image21_repo")
SIZE = 64
COMMON = dict(height=SIZE, width=SIZE, output_type="pt", progress_bar=False)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory) -> QwenImage21Pipeline:
    repo: Path = R.build_repo(tmp_path_factory.mktemp("tiny-qwen-image-21-i2i"))
    return QwenImage21Pipeline.from_pretrained(str(repo), torch_dtype=torch.float32, device="cpu")


def picture(seed: int = 3, size=(SIZE, SIZE)) -> Image.Image:
    rng = np.random.default_rng(seed)
    rgba = rng.integers(0, 256, (8, 8, 4), dtype=np.uint8)
    rgba[..., 3] = np.where(rng.random((8, 8)) < 0.3, 0, 255)
    return Image.fromarray(rgba, "RGBA").resize(size, Image.NEAREST)


def noise(seed: int = 5) -> torch.Tensor:
    return torch.randn(1, R.LATENT, SIZE // 16, SIZE // 16, generator=torch.Generator().manual_seed(seed))


def clean_tokens(pipe, image) -> torch.Tensor:
    return pipe.encode_input_images([image], 1, SIZE, SIZE, {"tiled": False})


def test_image_to_image_continues_the_noised_input_on_the_schedule_tail(pipe, one_thread):
    """At strength 0.5 of 4 steps: the input's latent noised to the third sigma, then the last two steps, exactly as
    text-to-image from that start on those sigmas; a lower strength stays nearer the input."""
    image, x = picture(), noise()
    sigmas = [1.0, 0.75, 0.5, 0.25]
    got = pipe("a red fox", input_image=image, denoising_strength=0.5, sigmas=sigmas, latents=x, **COMMON)
    clean = clean_tokens(pipe, image)
    start = 0.5 * clean + 0.5 * latents_to_tokens(x)
    want = pipe("a red fox", sigmas=[0.5, 0.25], latents=tokens_to_latents(start, SIZE // 16, SIZE // 16), **COMMON)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    full = pipe("a red fox", input_image=image, denoising_strength=1.0, sigmas=sigmas, latents=x, **COMMON)
    text_only = pipe("a red fox", sigmas=sigmas, latents=x, **COMMON)
    torch.testing.assert_close(full, text_only, atol=1e-6, rtol=0)  # from sigma 1 the input is all noise
    target = pipe.vae.decode(tokens_to_latents(clean, SIZE // 16, SIZE // 16)).float().clamp(-1, 1) * 0.5 + 0.5
    light = pipe("a red fox", input_image=image, denoising_strength=0.25, sigmas=sigmas, latents=x, **COMMON)
    assert (light - target).abs().mean() < (full - target).abs().mean()


def test_inpainting_keeps_what_the_mask_keeps(pipe, one_thread):
    """A black mask keeps the whole input (the result is its VAE round trip); a white one repaints everything, as
    plain image-to-image; a half mask lies between them."""
    image, x = picture(), noise(6)
    settings = dict(input_image=image, denoising_strength=0.75, num_inference_steps=4, latents=x, **COMMON)
    black, white = Image.new("L", image.size, 0), Image.new("L", image.size, 255)
    kept = pipe("a red fox", inpaint_mask=black, **settings)
    clean = clean_tokens(pipe, image)
    round_trip = pipe.vae.decode(tokens_to_latents(clean, SIZE // 16, SIZE // 16)).float().clamp(-1, 1) * 0.5 + 0.5
    torch.testing.assert_close(kept, round_trip, atol=1e-5, rtol=0)
    repainted = pipe("a red fox", inpaint_mask=white, **settings)
    torch.testing.assert_close(repainted, pipe("a red fox", **settings), atol=1e-6, rtol=0)
    half = Image.fromarray(np.tile(np.array([0, 255], dtype=np.uint8).repeat(SIZE // 2), (SIZE, 1)), "L")
    blurred = pipe("a red fox", inpaint_mask=half, inpaint_blur_size=1, inpaint_blur_sigma=0.5, **settings)
    assert 1e-3 < (blurred - kept).abs().max() and 1e-3 < (blurred - repainted).abs().max()


def test_the_input_image_sets_the_size_and_keeps_its_alpha(pipe, one_thread):
    wide = picture(4, (72, 40))
    out = pipe("a fox", input_image=wide, denoising_strength=0.6, output_resolution=64, num_inference_steps=2, seed=0,
               progress_bar=False)  # fmt: skip
    assert out.mode == "RGBA" and out.size == (96, 32)  # 72x40 at about 64^2 pixels, in multiples of 32
    batch = pipe(["a fox", "an owl"], input_image=[picture(1), picture(2)], denoising_strength=0.6,
                 num_inference_steps=2, seed=0, **COMMON)  # fmt: skip
    assert batch.shape == (2, 4, SIZE, SIZE) and (batch[0] - batch[1]).abs().max() > 1e-3


def test_bad_inputs_are_named(pipe):
    image = picture()
    with pytest.raises(ConfigError, match="denoising_strength < 1 is image-to-image"):
        pipe("a fox", denoising_strength=0.5, **COMMON)
    with pytest.raises(ConfigError, match="denoising_strength=0"):
        pipe("a fox", input_image=image, denoising_strength=0, **COMMON)
    with pytest.raises(ConfigError, match="inpaint_mask needs input_image"):
        pipe("a fox", inpaint_mask=Image.new("L", image.size), **COMMON)
    with pytest.raises(ConfigError, match="the mask must have its input image's size"):
        pipe("a fox", input_image=image, inpaint_mask=Image.new("L", (8, 8)), **COMMON)
    with pytest.raises(ConfigError, match="input_image is a list of 2 images for 3 prompts"):
        pipe(["a", "b", "c"], input_image=[image, image], **COMMON)
    with pytest.raises(ConfigError, match="blur inpaint_mask"):
        pipe("a fox", input_image=image, inpaint_blur_size=1, inpaint_blur_sigma=1.0, **COMMON)
