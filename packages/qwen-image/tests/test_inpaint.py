"""`inpaint_mask` (DiffSynth-Studio semantics): outside the mask the latent follows the input image's latent
re-noised to each sigma and ends on it; the mask is validated; without it nothing changes."""

import numpy as np
import pytest
import torch
from PIL import Image

from diffsynth.qwen_image import QwenImagePipeline
from diffsynth.qwen_image import pipeline as module
from diffsynth.runtime.errors import ConfigError

H, W = 32, 64  # latent 4 x 8
RUN = dict(num_inference_steps=2, height=H, width=W, progress_bar=False, output_type="pt")


@pytest.fixture(scope="module")
def pipe(tiny_repo):
    return QwenImagePipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def source():
    g = np.random.default_rng(0)
    return Image.fromarray(g.integers(0, 256, (H, W, 3), dtype=np.uint8))


def left_half_mask(size=(W, H)) -> Image.Image:
    mask = np.zeros((size[1], size[0]), dtype=np.uint8)
    mask[:, : size[0] // 2] = 255  # white = repaint
    return Image.fromarray(mask, mode="L")


def noise(batch=1):
    return torch.randn(batch, 16, H // 8, W // 8, generator=torch.Generator().manual_seed(3))


class Recorder:
    """Latents and sigma of every DiT call, the clean input latent (VAE encode) and the final latent (decode)."""

    def __init__(self, pipe, monkeypatch):
        self.steps, self.clean, self.final = [], None, None
        velocity, encode, decode = module.qwen_image_velocity, pipe.vae.encode, pipe.vae.decode

        def record_velocity(dit, latents, sigma, *args, **kwargs):
            self.steps.append((latents.clone(), float(sigma[0])))
            return velocity(dit, latents, sigma, *args, **kwargs)

        def record_encode(*args, **kwargs):
            out = encode(*args, **kwargs)
            self.clean = out[:, :, 0].float().clone()
            return out

        def record_decode(latents, **kwargs):
            self.final = latents[:, :, 0].float().clone()
            return decode(latents, **kwargs)

        monkeypatch.setattr(module, "qwen_image_velocity", record_velocity)
        monkeypatch.setattr(pipe.vae, "encode", record_encode)
        monkeypatch.setattr(pipe.vae, "decode", record_decode)


@pytest.mark.parametrize("strength", [1.0, 0.5])  # 0.5 of 2 steps: the last one only
def test_outside_the_mask_follows_the_renoised_input(pipe, source, monkeypatch, strength):
    rec = Recorder(pipe, monkeypatch)
    start = noise()
    pipe("a red circle", input_image=source, inpaint_mask=left_half_mask(), denoising_strength=strength,
         latents=start, **RUN)  # fmt: skip
    keep = pipe.prepare_inpaint_mask(left_half_mask(), source, 1, H, W) == 0  # cells the mask leaves alone
    assert keep.sum() >= 8 and (~keep).sum() >= 8
    keep = keep.expand_as(start)
    for latents, sigma in rec.steps:
        renoised = (1 - sigma) * rec.clean + sigma * start
        assert (latents - renoised)[keep].abs().max().item() <= 1e-5
    assert (rec.final - rec.clean)[keep].abs().max().item() <= 1e-5  # the last step lands on the input latent
    repainted = (rec.final - rec.clean)[~keep].abs().max().item()
    assert repainted > 1e-2  # inside the mask the model repaints


def test_white_mask_is_plain_image_to_image_and_black_keeps_the_input(pipe, source, monkeypatch):
    start = noise()
    plain = pipe("a red circle", input_image=source, denoising_strength=0.8, latents=start, **RUN)
    white = Image.new("L", source.size, 255)
    repaint_all = pipe("a red circle", input_image=source, inpaint_mask=white, denoising_strength=0.8, latents=start,
                       **RUN)  # fmt: skip
    torch.testing.assert_close(repaint_all, plain, atol=0, rtol=0)
    rec = Recorder(pipe, monkeypatch)
    black = Image.new("L", source.size, 0)
    pipe("a red circle", input_image=source, inpaint_mask=black, latents=start, **RUN)
    assert (rec.final - rec.clean).abs().max().item() <= 1e-5


def test_batch_with_one_mask_per_image(pipe, source):
    flipped = source.transpose(Image.FLIP_LEFT_RIGHT)
    masks = [left_half_mask(), left_half_mask().transpose(Image.FLIP_LEFT_RIGHT)]
    out = pipe(["a red circle", "a blue square"], input_image=[source, flipped], inpaint_mask=masks,
               latents=noise(2), **RUN)  # fmt: skip
    assert out.shape == (2, 3, H, W)


def _blank(mode="L", size=(W, H)):
    return Image.new(mode, size)


@pytest.mark.parametrize(
    "images, mask, match",
    [
        (None, _blank(), "inpaint_mask needs input_image"),
        (1, _blank("RGB"), r"inpaint_mask has mode 'RGB'.*mode 'L'"),
        (1, _blank(size=(W, H + 8)), r"inpaint_mask is 64x40 but input_image is 64x32"),
        (1, np.zeros((H, W)), r"inpaint_mask must be a PIL image"),
        (1, [_blank(), _blank()], r"inpaint_mask is a list of 2 masks for 1 input images"),
        (2, [_blank(), _blank("1")], r"inpaint_mask\[1\] has mode '1'"),
    ],
)
def test_bad_masks_name_the_argument(pipe, source, monkeypatch, images, mask, match):
    monkeypatch.setattr(pipe, "encode_prompt", lambda *a: pytest.fail("the mask is checked before any model runs"))
    input_image = None if images is None else source if images == 1 else [source] * images
    with pytest.raises(ConfigError, match=match):
        pipe(["a red circle"] * (images or 1), input_image=input_image, inpaint_mask=mask, seed=0, **RUN)


def test_blur_softens_the_mask_on_the_latent_grid(pipe, source):
    """`inpaint_blur_size` / `inpaint_blur_sigma` (DiffSynth-Studio's) blur the latent-grid mask; the image changes."""
    from diffsynth.runtime.inpaint import gaussian_blur

    plain = pipe.prepare_inpaint_mask(left_half_mask(), source, 1, H, W)
    soft = pipe.prepare_inpaint_mask(left_half_mask(), source, 1, H, W, (1, 1.0))
    torch.testing.assert_close(soft, gaussian_blur(plain, 1, 1.0))
    options = dict(input_image=source, inpaint_mask=left_half_mask(), latents=noise(), **RUN)
    blurred = pipe("a red circle", inpaint_blur_size=1, inpaint_blur_sigma=1.0, **options)
    assert (blurred - pipe("a red circle", **options)).abs().max() > 1e-3
    with pytest.raises(ConfigError, match="go together"):
        pipe("a red circle", inpaint_blur_size=1, **options)
    with pytest.raises(ConfigError, match="give the mask too"):
        pipe("a red circle", input_image=source, inpaint_blur_size=1, inpaint_blur_sigma=1.0, latents=noise(), **RUN)
