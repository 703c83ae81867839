"""FLUX.2 inpainting (`inpaint_mask`, `inpaint_blur_size` / `inpaint_blur_sigma`, DiffSynth-Studio's arguments): outside
the mask the latent follows the input image's latent re-noised to each sigma and ends on it, inside the model
repaints; a white mask is plain image-to-image; the blur softens the mask on the token grid; errors name the
argument."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffsynth.flux.flux2.pipeline import Flux2ImagePipeline
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.inpaint import gaussian_blur, mask_grid

H, W = 64, 128  # a 4 x 8 token grid
RUN = dict(num_inference_steps=3, height=H, width=W, progress_bar=False, output_type="pt")


@pytest.fixture(scope="module")
def source() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8))


def left_half_mask() -> Image.Image:
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[:, : W // 2] = 255  # white = repaint
    return Image.fromarray(mask, mode="L")


def token_mask(source) -> torch.Tensor:
    """The left-half mask on the 4 x 8 token grid, as the pipeline resizes it (without blur)."""
    return mask_grid(left_half_mask(), [source], 1, (H // 16, W // 16), "cpu")


def noise() -> torch.Tensor:
    return torch.randn(1, 16, H // 16, W // 16, generator=torch.Generator().manual_seed(3))


class Recorder:
    """Latents and sigma of every DiT call, the input's clean latent (encode) and the final latent (decode)."""

    def __init__(self, pipe, monkeypatch):
        self.steps, self.clean, self.final = [], None, None
        predict, encode, decode = Flux2ImagePipeline.predict, pipe.vae_encode, pipe.vae.decode

        def record_predict(this, x, sigma, *args, **kwargs):
            self.steps.append((x.clone(), float(sigma)))
            return predict(this, x, sigma, *args, **kwargs)

        def record_encode(*args, **kwargs):
            self.clean = encode(*args, **kwargs).clone()
            return self.clean

        def record_decode(latents, **kwargs):
            self.final = latents.float().clone()
            return decode(latents, **kwargs)

        monkeypatch.setattr(Flux2ImagePipeline, "predict", record_predict)
        monkeypatch.setattr(pipe, "vae_encode", record_encode)
        monkeypatch.setattr(pipe.vae, "decode", record_decode)


def test_outside_the_mask_follows_the_renoised_input(tiny_klein_pipe, source, monkeypatch, one_thread):
    rec = Recorder(tiny_klein_pipe, monkeypatch)
    start = noise()
    tiny_klein_pipe(CAPTION, input_image=source, inpaint_mask=left_half_mask(), latents=start, **RUN)
    keep = (token_mask(source) == 0).expand_as(start)  # tokens the mask leaves alone (bicubic: not all of a half)
    assert keep.sum() >= 3 * 16 and (~keep).sum() >= 3 * 16
    for latents, sigma in rec.steps:
        renoised = (1 - sigma) * rec.clean + sigma * start
        assert (latents - renoised)[keep].abs().max().item() <= 1e-5
    assert (rec.final - rec.clean)[keep].abs().max().item() <= 1e-5  # the last step lands on the input latent
    assert (rec.final - rec.clean)[~keep].abs().max().item() > 1e-2  # inside, the model repaints


def test_white_mask_is_image_to_image_and_black_keeps_the_input(tiny_klein_pipe, source, monkeypatch, one_thread):
    start = noise()
    plain = tiny_klein_pipe(CAPTION, input_image=source, denoising_strength=0.8, latents=start, **RUN)
    white = Image.new("L", source.size, 255)
    repainted = tiny_klein_pipe(
        CAPTION, input_image=source, inpaint_mask=white, denoising_strength=0.8, latents=start, **RUN
    )
    torch.testing.assert_close(repainted, plain, atol=0, rtol=0)
    rec = Recorder(tiny_klein_pipe, monkeypatch)
    tiny_klein_pipe(CAPTION, input_image=source, inpaint_mask=Image.new("L", source.size, 0), latents=start, **RUN)
    assert (rec.final - rec.clean).abs().max().item() <= 1e-5


def test_blur_softens_the_mask_on_the_token_grid(tiny_klein_pipe, source, monkeypatch, one_thread):
    """With a blur the blend takes the Gaussian of the token-grid mask: each step's velocity is the model's
    weighted by it and the keeping velocity by the rest, which the recorded latents show step by step."""
    from diffsynth.runtime import inpaint as inpaint_module

    seen = []
    blend = inpaint_module.inpaint_velocity

    def record(velocity, latents, clean, sigma, mask):
        seen.append(mask.clone())
        return blend(velocity, latents, clean, sigma, mask)

    monkeypatch.setattr("diffsynth.flux.flux2.pipeline.inpaint_velocity", record)
    options = dict(input_image=source, inpaint_mask=left_half_mask(), latents=noise(), **RUN)
    soft = tiny_klein_pipe(CAPTION, inpaint_blur_size=1, inpaint_blur_sigma=1.0, **options)
    hard = tiny_klein_pipe(CAPTION, **options)
    grid = token_mask(source)
    torch.testing.assert_close(seen[0], gaussian_blur(grid, 1, 1.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(seen[-1], grid, atol=1e-6, rtol=0)
    assert (soft - hard).abs().max() > 1e-3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(inpaint_mask=Image.new("L", (W, H))), "inpaint_mask needs input_image"),
        (dict(input_image="source", inpaint_mask=Image.new("RGB", (W, H))), "inpaint_mask has mode 'RGB'"),
        (dict(input_image="source", inpaint_mask=Image.new("L", (W, H + 16))), "inpaint_mask is 128x80"),
        (dict(input_image="source", inpaint_blur_size=1, inpaint_blur_sigma=1.0), "give the mask too"),
        (dict(input_image="source", inpaint_mask=Image.new("L", (W, H)), inpaint_blur_size=2), "go together"),
    ],
)
def test_bad_inpaint_arguments_name_them(tiny_klein_pipe, source, kwargs, match):
    kwargs = {k: source if v == "source" else v for k, v in kwargs.items()}
    with pytest.raises(ConfigError, match=match):
        tiny_klein_pipe(CAPTION, seed=0, **kwargs, **RUN)


CAPTION = "a red circle on a blue square"
