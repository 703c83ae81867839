"""The whole pipeline against diffusers' ZImagePipeline on the same tiny repo and the same initial noise."""

import numpy as np
import pytest
import torch

from diffsynth.z_image import ZImagePipeline

pytestmark = pytest.mark.parity
PROMPTS = ["a red circle on a blue background", "a yellow triangle on a black background"]


@pytest.fixture(scope="module")
def both(tiny_repo):
    diffusers = pytest.importorskip("diffusers")
    from transformers import AutoTokenizer, Qwen3Model

    ref = diffusers.ZImagePipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_repo / "scheduler"),
        vae=diffusers.AutoencoderKL.from_pretrained(tiny_repo / "vae"),
        text_encoder=Qwen3Model.from_pretrained(tiny_repo / "text_encoder"),
        tokenizer=AutoTokenizer.from_pretrained(tiny_repo / "tokenizer"),
        transformer=diffusers.ZImageTransformer2DModel.from_pretrained(tiny_repo / "transformer"),
    )
    ref.set_progress_bar_config(disable=True)
    ours = ZImagePipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu")
    return ours, ref


@pytest.mark.parametrize("guidance", [0.0, 2.5])
def test_images_match_diffusers(both, guidance):
    ours, ref = both
    noise = torch.randn((2, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(11))
    negative = ["bad quality, blurry"] * 2
    # diffusers rewrites the prompt lists in place (chat template): give it copies
    expected = ref(
        list(PROMPTS),
        negative_prompt=list(negative),
        guidance_scale=guidance,
        num_inference_steps=4,
        height=64,
        width=64,
        latents=noise.clone(),
        output_type="np",
    ).images
    got = ours(
        PROMPTS,
        negative_prompt=negative,
        cfg_scale=guidance + 1.0,
        num_inference_steps=4,
        height=64,
        width=64,
        latents=noise.clone(),
        output_type="np",
        progress_bar=False,
    )
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-4


def test_image_to_image_start_matches_diffusers(both):
    """The first DiT input of image-to-image: diffusers' ZImageImg2ImgPipeline resizes the input image with Lanczos
    (ours used PIL's default filter: 0.02 apart), then encodes the posterior mean; the schedule's first sigma mixes
    in the noise. The size and resize are the only inputs here that differ between the two pipelines."""
    from diffusers import ZImageImg2ImgPipeline
    from PIL import Image

    from diffsynth.runtime.schedulers import make_scheduler

    ours, ref = both
    img2img = ZImageImg2ImgPipeline(**ref.components)
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (70, 120, 3), dtype=np.uint8))
    height, width = 64, 96
    noise = torch.randn((1, 4, 8, 12), generator=torch.Generator().manual_seed(11))
    calls = []
    hook = ours.dit.register_forward_pre_hook(lambda module, args: calls.append(args[0].clone()))
    try:
        ours(
            PROMPTS[0],
            input_image=image,
            denoising_strength=0.75,
            num_inference_steps=4,
            height=height,
            width=width,
            latents=noise.clone(),
            output_type="np",
            progress_bar=False,
        )
    finally:
        hook.remove()
    with torch.no_grad():
        pixels = img2img.image_processor.preprocess(image, height=height, width=width)
        clean = img2img.vae.encode(pixels).latent_dist.mode()
    clean = (clean - img2img.vae.config.shift_factor) * img2img.vae.config.scaling_factor
    scheduler = make_scheduler("z_image", "euler")
    scheduler.set_timesteps(4, denoising_strength=0.75, shift=3.0)
    sigma = scheduler.sigmas[0]
    torch.testing.assert_close(calls[0], sigma * noise + (1 - sigma) * clean, atol=1e-5, rtol=0)
