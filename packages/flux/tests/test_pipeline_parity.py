"""The whole pipeline against diffusers' FluxPipeline / FluxKontextPipeline on the same tiny repo and noise.

fp32 on the CPU; max abs difference of the decoded images (in [0, 1]) <= 1e-4.
"""

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")

from diffsynth.flux.pipeline import FluxImagePipeline, pack_latents  # noqa: E402

pytestmark = pytest.mark.parity
PROMPTS = ["a red circle on a blue background", "a yellow triangle on a black background"]
TEXT_LEN = 48  # keeps the tests fast; the padded length is part of the conditioning on both sides


def _components(repo):
    import diffusers
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    return dict(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(repo / "scheduler"),
        vae=diffusers.AutoencoderKL.from_pretrained(repo / "vae"),
        text_encoder=CLIPTextModel.from_pretrained(repo / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(repo / "tokenizer"),
        text_encoder_2=T5EncoderModel.from_pretrained(repo / "text_encoder_2"),
        tokenizer_2=T5TokenizerFast.from_pretrained(repo / "tokenizer_2"),
        transformer=diffusers.FluxTransformer2DModel.from_pretrained(repo / "transformer"),
    )


@pytest.fixture(scope="module")
def both(tiny_repo):
    import diffusers

    parts = _components(tiny_repo)
    ref = diffusers.FluxPipeline(**parts).to(torch.float32)
    kontext = diffusers.FluxKontextPipeline(**parts).to(torch.float32)
    for pipe in (ref, kontext):
        pipe.set_progress_bar_config(disable=True)
    ours = FluxImagePipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu")
    return ours, ref, kontext


def _noise(batch, height, width, seed=11):
    return torch.randn((batch, 16, height // 8, width // 8), generator=torch.Generator("cpu").manual_seed(seed))


def _max_abs(got, expected) -> float:
    assert got.shape == expected.shape
    return float(np.abs(got - expected).max())


@pytest.mark.parametrize("guidance", [3.5, 1.0])
def test_images_match_diffusers(both, guidance):
    ours, ref, _ = both
    noise = _noise(2, 64, 48)
    expected = ref(
        list(PROMPTS),
        guidance_scale=guidance,
        num_inference_steps=4,
        height=64,
        width=48,
        latents=pack_latents(noise.clone()),
        max_sequence_length=TEXT_LEN,
        output_type="np",
    ).images
    got = ours(
        PROMPTS,
        embedded_guidance=guidance,
        num_inference_steps=4,
        height=64,
        width=48,
        latents=noise.clone(),
        t5_sequence_length=TEXT_LEN,
        output_type="np",
        progress_bar=False,
    )
    assert _max_abs(got, expected) <= 1e-4


def test_true_cfg_matches_diffusers(both):
    ours, ref, _ = both
    noise = _noise(1, 32, 32, seed=5)
    expected = ref(
        PROMPTS[0],
        negative_prompt="bad quality, blurry",
        true_cfg_scale=3.0,
        guidance_scale=3.5,
        num_inference_steps=3,
        height=32,
        width=32,
        latents=pack_latents(noise.clone()),
        max_sequence_length=TEXT_LEN,
        output_type="np",
    ).images
    got = ours(
        PROMPTS[0],
        negative_prompt="bad quality, blurry",
        cfg_scale=3.0,
        embedded_guidance=3.5,
        num_inference_steps=3,
        height=32,
        width=32,
        latents=noise.clone(),
        t5_sequence_length=TEXT_LEN,
        output_type="np",
        progress_bar=False,
    )
    assert _max_abs(got, expected) <= 1e-4


def _reference_image(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_kontext_matches_diffusers(both):
    _, _, kontext = both
    ours = both[0]
    image = _reference_image(48, 32)
    noise = _noise(1, 32, 48, seed=7)
    expected = kontext(
        image=image,
        prompt=PROMPTS[0],
        guidance_scale=2.5,
        num_inference_steps=3,
        height=32,  # diffusers scales the output to max_area (1 MP by default) whatever the image;
        width=48,  # ours takes the reference image's size
        max_area=32 * 48,
        latents=pack_latents(noise.clone()),
        max_sequence_length=TEXT_LEN,
        output_type="np",
        _auto_resize=False,
    ).images
    got = ours(
        PROMPTS[0],
        kontext_images=image,
        embedded_guidance=2.5,
        num_inference_steps=3,
        latents=noise.clone(),
        t5_sequence_length=TEXT_LEN,
        output_type="np",
        progress_bar=False,
    )
    assert got.shape == (1, 32, 48, 3)
    assert _max_abs(got, expected) <= 1e-4


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
    image = _reference_image(48, 32, seed=3)
    noise = _noise(1, 32, 48, seed=8)
    common = {"num_inference_steps": 2, "output_type": "np"}
    expected = kontext(
        image=image, prompt=PROMPTS[0], guidance_scale=2.5, height=32, width=48, max_area=32 * 48,
        latents=pack_latents(noise.clone()), max_sequence_length=TEXT_LEN, _auto_resize=True, **common,
    ).images  # fmt: skip
    got = ours(
        PROMPTS[0], kontext_images=image, kontext_auto_resize=True, embedded_guidance=2.5, height=32, width=48,
        latents=noise.clone(), t5_sequence_length=TEXT_LEN, progress_bar=False, **common,
    )  # fmt: skip
    plain = ours(
        PROMPTS[0], kontext_images=image, embedded_guidance=2.5, height=32, width=48, latents=noise.clone(),
        t5_sequence_length=TEXT_LEN, progress_bar=False, **common,
    )  # fmt: skip
    assert _max_abs(got, expected) <= 1e-4
    assert _max_abs(got, plain) > 1e-3  # the resize reached the model


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
