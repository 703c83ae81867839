"""The whole pipeline against diffusers' FluxPipeline / FluxKontextPipeline on the same tiny repo and noise.

fp32 on the CPU; max abs difference of the decoded images (in [0, 1]) <= 1e-4.
"""

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

from diffsynth.runtime.testing.conformance import full_calls

pytest.importorskip("diffusers")

pytestmark = pytest.mark.parity
PROMPTS = ["a red circle on a blue background", "a yellow triangle on a black background"]
TEXT_LEN = 48  # keeps the tests fast; the padded length is part of the conditioning on both sides


@pytest.fixture(scope="module")
def both(tiny_repo):
    import diffusers

    parts = reference_components(tiny_repo)
    ref = diffusers.FluxPipeline(**parts).to(torch.float32)
    kontext = diffusers.FluxKontextPipeline(**parts).to(torch.float32)
    for pipe in (ref, kontext):
        pipe.set_progress_bar_config(disable=True)
    return our_pipeline(tiny_repo), ref, kontext


@pytest.mark.parametrize("guidance", [3.5, 1.0])
def test_images_match_diffusers(both, guidance):
    ours, ref, _ = both
    noise = latent_noise(2, 64, 48)
    size = dict(num_inference_steps=4, height=64, width=48)
    expected = reference_images(ref, noise, TEXT_LEN, prompt=list(PROMPTS), guidance_scale=guidance, **size)
    got = our_images(ours, PROMPTS, noise, TEXT_LEN, embedded_guidance=guidance, **size)
    assert max_abs(got, expected) <= 1e-4


def test_true_cfg_matches_diffusers(both):
    ours, ref, _ = both
    noise = latent_noise(1, 32, 32, seed=5)
    common = dict(negative_prompt="bad quality, blurry", num_inference_steps=3, height=32, width=32)
    expected = reference_images(
        ref, noise, TEXT_LEN, prompt=PROMPTS[0], true_cfg_scale=3.0, guidance_scale=3.5, **common
    )
    got = our_images(ours, PROMPTS[0], noise, TEXT_LEN, cfg_scale=3.0, embedded_guidance=3.5, **common)
    assert max_abs(got, expected) <= 1e-4


def test_first_block_cache_matches_diffusers(both, one_thread):
    """diffusers' `FirstBlockCacheConfig` on its FluxPipeline and ours at the same threshold: the same steps
    reuse the later blocks and the images agree. Without true CFG: ours runs both branches as one batched
    call where diffusers makes two, so the decisions would be taken on other tensors (our CFG + cache is
    tested against invariants in test_pipeline.py)."""
    from diffusers.hooks import FirstBlockCacheConfig

    ours, ref, _ = both
    threshold = 0.8  # the tiny random model's relative changes are 0.7 to 0.85: this reuses some steps
    noise = latent_noise(1, 32, 32, seed=3)
    common = dict(num_inference_steps=8, height=32, width=32)
    plain = our_images(ours, PROMPTS[0], noise, TEXT_LEN, embedded_guidance=3.5, **common)
    theirs, hooks = full_calls(
        ref.transformer.transformer_blocks[0], ref.transformer.single_transformer_blocks[-1].proj_out
    )
    ref.transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    try:
        expected = reference_images(ref, noise, TEXT_LEN, prompt=PROMPTS[0], guidance_scale=3.5, **common)
    finally:
        ref.transformer.disable_cache()
        for hook in hooks:
            hook.remove()
    mine, hooks = full_calls(ours.dit.double_blocks[0], ours.dit.single_blocks[-1].linear2)
    cache = ours.enable_first_block_cache(threshold)["dit"]
    try:
        got = our_images(ours, PROMPTS[0], noise, TEXT_LEN, embedded_guidance=3.5, **common)
    finally:
        ours.disable_first_block_cache()
        for hook in hooks:
            hook.remove()
    assert 0 < cache.skipped < cache.calls == 8
    assert mine == theirs and mine.count(False) == cache.skipped
    assert max_abs(got, plain) > 1e-2  # the reuse changed the image...
    assert max_abs(got, expected) <= 1e-4  # ...as it changed diffusers'


def test_kontext_matches_diffusers(both):
    _, _, kontext = both
    ours = both[0]
    image = random_image(48, 32)
    noise = latent_noise(1, 32, 48, seed=7)
    expected = reference_images(
        kontext,
        noise,
        TEXT_LEN,
        image=image,
        prompt=PROMPTS[0],
        guidance_scale=2.5,
        num_inference_steps=3,
        height=32,  # diffusers scales the output to max_area (1 MP by default) whatever the image;
        width=48,  # ours takes the reference image's size
        max_area=32 * 48,
        _auto_resize=False,
    )
    got = our_images(
        ours, PROMPTS[0], noise, TEXT_LEN, kontext_images=image, embedded_guidance=2.5, num_inference_steps=3
    )
    assert got.shape == (1, 32, 48, 3)
    assert max_abs(got, expected) <= 1e-4


def test_kontext_auto_resize_matches_diffusers(both):
    """`kontext_auto_resize` (the Kontext preset's default) against diffusers' `_auto_resize`: the same training
    resolutions, the same choice, the same image (a 48x32 reference becomes 1248x832)."""
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    from diffsynth.flux.pipeline import KONTEXT_RESOLUTIONS, kontext_resolution

    assert list(KONTEXT_RESOLUTIONS) == list(PREFERRED_KONTEXT_RESOLUTIONS)
    for w, h in [(48, 32), (32, 48), (1000, 1000), (3000, 1000), (700, 1000), (1333, 1000)]:
        want = min((abs(w / h - pw / ph), pw, ph) for pw, ph in PREFERRED_KONTEXT_RESOLUTIONS)[1:]
        assert kontext_resolution(w, h) == want, (w, h)

    _, _, kontext = both
    ours = both[0]
    image = random_image(48, 32, seed=3)
    noise = latent_noise(1, 32, 48, seed=8)
    common = {"embedded_guidance": 2.5, "height": 32, "width": 48, "num_inference_steps": 2}
    reference = dict(image=image, prompt=PROMPTS[0], guidance_scale=2.5, max_area=32 * 48, _auto_resize=True)
    expected = reference_images(kontext, noise, TEXT_LEN, height=32, width=48, num_inference_steps=2, **reference)
    got = our_images(ours, PROMPTS[0], noise, TEXT_LEN, kontext_images=image, kontext_auto_resize=True, **common)
    plain = our_images(ours, PROMPTS[0], noise, TEXT_LEN, kontext_images=image, **common)
    assert max_abs(got, expected) <= 1e-4
    assert max_abs(got, plain) > 1e-3  # the resize reached the model


def test_text_encoders_match_transformers(both):
    """Our CLIP/T5 modules (loaded from the hub's transformers 4.x file names) equal transformers' own load."""
    ours, ref, _ = both
    from diffsynth.flux.flux1.text_encoder import clip_pooled, t5_states

    got_pooled = clip_pooled(ours.text_encoder_1, ours.tokenizer_1, PROMPTS)
    got_states = t5_states(ours.text_encoder_2, ours.tokenizer_2, PROMPTS, TEXT_LEN)
    want_states, want_pooled, _ = ref.encode_prompt(PROMPTS, PROMPTS, max_sequence_length=TEXT_LEN)
    torch.testing.assert_close(got_pooled, want_pooled, atol=0, rtol=0)
    # transformers picks its attention kernel per load path: T5 states agree to float32 rounding
    torch.testing.assert_close(got_states, want_states, atol=2e-5, rtol=1e-4)
