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
