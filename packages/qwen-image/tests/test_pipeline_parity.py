"""The whole pipeline against diffusers' QwenImagePipeline on the same tiny repo and the same initial noise."""

import numpy as np
import pytest
import torch

from diffsynth.runtime.testing.conformance import full_calls

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


@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_first_block_cache_matches_diffusers(both, one_thread, cfg_scale):
    """diffusers' `FirstBlockCacheConfig` and ours at the same threshold: the same calls reuse the later
    blocks and the images agree. With CFG both sides make a positive and a negative call per step, each
    judged against its own last full call (diffusers' `cache_context("cond" / "uncond")`)."""
    from diffusers.hooks import FirstBlockCacheConfig

    ours, ref = both
    threshold = 1.1  # the tiny random model's relative changes are 0.6 to 1.4: this reuses some calls
    noise = torch.randn((1, 16, 8, 8), generator=torch.Generator("cpu").manual_seed(11))
    negative = "bad quality, blurry"
    common = dict(num_inference_steps=8, height=64, width=64, output_type="np")

    def run_ours():
        options = dict(negative_prompt=negative, cfg_scale=cfg_scale, latents=noise.clone(), progress_bar=False)
        return ours(PROMPTS[0], **options, **common)

    plain = run_ours()
    theirs, hooks = full_calls(ref.transformer.transformer_blocks[0], ref.transformer.transformer_blocks[-1].img_mlp)
    ref.transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    try:
        expected = ref(
            PROMPTS[0],
            negative_prompt=negative if cfg_scale > 1 else None,
            true_cfg_scale=cfg_scale,
            latents=ref._pack_latents(noise.clone(), 1, 16, 8, 8),
            **common,
        ).images
    finally:
        ref.transformer.disable_cache()
        for hook in hooks:
            hook.remove()
    mine, hooks = full_calls(ours.dit.transformer_blocks[0], ours.dit.transformer_blocks[-1].img_mlp)
    cache = ours.enable_first_block_cache(threshold)["dit"]
    try:
        got = run_ours()
    finally:
        ours.disable_first_block_cache()
        for hook in hooks:
            hook.remove()
    calls = 16 if cfg_scale > 1 else 8
    assert 0 < cache.skipped < cache.calls == calls
    assert mine == theirs and mine.count(False) == cache.skipped
    assert np.abs(got - plain).max() > 1e-3  # the reuse changed the image...
    assert np.abs(got - expected).max() <= 1e-5  # ...as it changed diffusers'


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
