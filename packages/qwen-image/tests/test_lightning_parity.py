"""The Qwen-Image-Lightning recipe against diffusers: lightx2v's scheduler config (fixed mu = ln 3, no terminal
stretch), 4 steps, cfg 1, with and without a (random) LoRA in the Lightning files' `diffusion_model.` layout."""

import math

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

pytestmark = pytest.mark.parity
PROMPTS = ["a red circle on a blue background", "a yellow triangle on a black background"]

# lightx2v/Qwen-Image-Lightning README: "We use shift=3 in distillation"
LIGHTNING_SCHEDULER_CONFIG = {
    "base_image_seq_len": 256,
    "base_shift": math.log(3),
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": math.log(3),
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": None,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}


def _pipelines(tiny_repo):
    import diffusers
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from diffsynth.qwen_image import QwenImagePipeline

    ref = diffusers.QwenImagePipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler.from_config(LIGHTNING_SCHEDULER_CONFIG),
        vae=diffusers.AutoencoderKLQwenImage.from_pretrained(tiny_repo / "vae"),
        text_encoder=Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_repo / "text_encoder"),
        tokenizer=AutoTokenizer.from_pretrained(tiny_repo / "tokenizer"),
        transformer=diffusers.QwenImageTransformer2DModel.from_pretrained(tiny_repo / "transformer"),
    )
    ref.set_progress_bar_config(disable=True)
    ours = QwenImagePipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu")
    return ours, ref


@pytest.mark.parametrize("with_lora", [False, True])
def test_lightning_images_match_diffusers(tiny_repo, random_lora, with_lora):
    ours, ref = _pipelines(tiny_repo)
    if with_lora:
        state = random_lora(ref.transformer, "diffusion_model", seed=7)
        ref.load_lora_weights(dict(state))
        ours.load_lora(state)
    noise = torch.randn((2, 16, 8, 8), generator=torch.Generator("cpu").manual_seed(12))
    expected = ref(
        list(PROMPTS),
        true_cfg_scale=1.0,
        num_inference_steps=4,
        height=64,
        width=64,
        latents=ref._pack_latents(noise.clone(), 2, 16, 8, 8),
        output_type="np",
    ).images
    assert np.allclose(ref.scheduler.sigmas.numpy(), [1.0, 0.9, 0.75, 0.5, 0.0], atol=1e-6)  # shift 3, no stretch
    got = ours(
        PROMPTS,
        cfg_scale=1.0,
        sigma_template="lightning",
        num_inference_steps=4,
        height=64,
        width=64,
        latents=noise.clone(),
        output_type="np",
        progress_bar=False,
    )
    assert got.shape == expected.shape == (2, 64, 64, 3)
    diff = np.abs(got - expected).max()
    assert diff <= 1e-4, f"lightning (lora={with_lora}): max abs diff {diff:.3g} vs diffusers"


@pytest.mark.parametrize("steps", [4, 8])
@pytest.mark.parametrize("size", [64, 1024, 1328])
def test_lightning_schedule_matches_diffusers(steps, size):
    import diffusers

    from diffsynth.runtime.schedulers import FlowMatchScheduler

    seq = (size // 16) ** 2
    ref = diffusers.FlowMatchEulerDiscreteScheduler.from_config(LIGHTNING_SCHEDULER_CONFIG)
    mu = math.log(3)  # QwenImagePipeline's calculate_shift(seq, ...) with base_shift = max_shift = ln 3
    ref.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    ours = FlowMatchScheduler("qwen_image_lightning")
    ours.set_timesteps(steps, image_seq_len=seq)
    assert (ours.sigmas.double() - ref.sigmas.double()).abs().max().item() <= 1e-6
