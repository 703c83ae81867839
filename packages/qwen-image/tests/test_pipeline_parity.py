"""The whole pipeline against diffusers' QwenImagePipeline on the same tiny repo and the same initial noise."""

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

pytestmark = pytest.mark.parity
PROMPTS = ["a red circle on a blue background", "a yellow triangle on a black background"]


@pytest.fixture(scope="module")
def both(tiny_repo):
    import diffusers
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from diffsynth.qwen_image import QwenImagePipeline

    ref = diffusers.QwenImagePipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_repo / "scheduler"),
        vae=diffusers.AutoencoderKLQwenImage.from_pretrained(tiny_repo / "vae"),
        text_encoder=Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_repo / "text_encoder"),
        tokenizer=AutoTokenizer.from_pretrained(tiny_repo / "tokenizer"),
        transformer=diffusers.QwenImageTransformer2DModel.from_pretrained(tiny_repo / "transformer"),
    )
    ref.set_progress_bar_config(disable=True)
    ours = QwenImagePipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu")
    return ours, ref


@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_images_match_diffusers(both, cfg_scale):
    ours, ref = both
    noise = torch.randn((2, 16, 8, 8), generator=torch.Generator("cpu").manual_seed(11))
    negative = ["bad quality, blurry"] * 2
    expected = ref(
        list(PROMPTS),
        negative_prompt=list(negative) if cfg_scale > 1 else None,
        true_cfg_scale=cfg_scale,
        num_inference_steps=4,
        height=64,
        width=64,
        latents=ref._pack_latents(noise.clone(), 2, 16, 8, 8),
        output_type="np",
    ).images
    got = ours(
        PROMPTS,
        negative_prompt=negative,
        cfg_scale=cfg_scale,
        num_inference_steps=4,
        height=64,
        width=64,
        latents=noise.clone(),
        output_type="np",
        progress_bar=False,
    )
    assert got.shape == expected.shape == (2, 64, 64, 3)
    assert np.abs(got - expected).max() <= 1e-4


def test_schedule_matches_diffusers(both):
    from diffsynth.runtime.schedulers import FlowMatchScheduler

    _, ref = both
    for steps, size in ((4, 64), (50, 1328)):
        seq = (size // 16) ** 2
        sched = ref.scheduler
        mu = 0.5 + (0.9 - 0.5) / (8192 - 256) * (seq - 256)
        sigmas = np.linspace(1.0, 1 / steps, steps)
        sched.set_timesteps(sigmas=sigmas, mu=mu)
        ours = FlowMatchScheduler("qwen_image")
        ours.set_timesteps(steps, image_seq_len=seq)
        assert torch.allclose(ours.sigmas, sched.sigmas.float(), atol=1e-6)
