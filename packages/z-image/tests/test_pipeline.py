"""ZImagePipeline behaviour on a tiny random repo: seeding, batching, latents=, img2img, outputs, bad input."""

import numpy as np
import pytest
import torch
from PIL import Image

from diffsynth.runtime.errors import ConfigError
from diffsynth.z_image import ZImagePipeline

PROMPT = "a red circle on a blue background"
FAST = {"height": 64, "width": 64, "num_inference_steps": 2, "progress_bar": False}


@pytest.fixture(scope="module")
def pipe(tiny_repo):
    return ZImagePipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu")


def test_same_seed_same_image_other_seed_differs(pipe):
    a = pipe(PROMPT, seed=1, output_type="np", **FAST)
    b = pipe(PROMPT, seed=1, output_type="np", **FAST)
    c = pipe(PROMPT, seed=2, output_type="np", **FAST)
    assert np.array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


def test_latents_argument_equals_seeded_noise(pipe):
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(7))
    from_seed = pipe(PROMPT, seed=7, output_type="pt", **FAST)
    from_latents = pipe(PROMPT, latents=noise, output_type="pt", **FAST)
    torch.testing.assert_close(from_seed, from_latents, rtol=0, atol=0)


def test_batch_of_prompts_equals_one_by_one(pipe):
    prompts = [PROMPT, "a small green square in the top left corner"]
    noise = torch.randn((2, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(3))
    batch = pipe(prompts, latents=noise, output_type="pt", **FAST)
    for i, prompt in enumerate(prompts):
        single = pipe(prompt, latents=noise[i : i + 1], output_type="pt", **FAST)
        torch.testing.assert_close(batch[i : i + 1], single, atol=1e-5, rtol=1e-5)


def test_cfg_scale_one_ignores_negative_prompt_and_cfg_changes_output(pipe):
    base = pipe(PROMPT, seed=0, output_type="np", **FAST)
    same = pipe(PROMPT, negative_prompt="bad quality", cfg_scale=1.0, seed=0, output_type="np", **FAST)
    guided = pipe(PROMPT, negative_prompt="bad quality", cfg_scale=4.0, seed=0, output_type="np", **FAST)
    assert np.array_equal(base, same)
    assert np.abs(base - guided).max() > 1e-3


def test_output_types(pipe):
    pil = pipe(PROMPT, seed=0, **FAST)
    arr = pipe(PROMPT, seed=0, output_type="np", **FAST)
    ten = pipe(PROMPT, seed=0, output_type="pt", **FAST)
    assert pil.size == (64, 64)
    assert arr.shape == (1, 64, 64, 3) and 0.0 <= arr.min() and arr.max() <= 1.0
    assert ten.shape == (1, 3, 64, 64)
    np.testing.assert_allclose(ten.permute(0, 2, 3, 1).numpy(), arr, atol=1e-6)
    assert np.abs(np.asarray(pil, dtype=np.float32) / 255 - arr[0]).max() <= 1 / 255 + 1e-6


def test_image_to_image_starts_from_the_noised_input(pipe):
    """Strength 0.5 of 4 steps: 2 DiT calls, the first on (1 - s) * encode(image) + s * noise."""
    from diffsynth.runtime.media import pil_to_tensor
    from diffsynth.runtime.schedulers import FlowMatchScheduler

    source = pipe(PROMPT, seed=0, **FAST)
    calls = []
    hook = pipe.dit.register_forward_pre_hook(lambda module, args: calls.append(args[0].clone()))
    try:
        pipe(PROMPT, input_image=source, denoising_strength=0.5, seed=5, **dict(FAST, num_inference_steps=4))
    finally:
        hook.remove()
    scheduler = FlowMatchScheduler("z_image")
    scheduler.set_timesteps(4, denoising_strength=0.5, shift=3.0)
    clean = pipe.vae.encode(pil_to_tensor([source], dtype=torch.float32, device="cpu"))
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(5))
    expected = scheduler.add_noise(clean, noise, scheduler.sigmas[0])
    assert len(calls) == 2 == len(scheduler.timesteps)
    torch.testing.assert_close(calls[0], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"prompt": ""}, "prompt is empty"),
        ({"prompt": PROMPT, "height": 0}, "height=0"),
        ({"prompt": PROMPT, "width": 7}, "width=7"),
        ({"prompt": PROMPT, "output_type": "jpeg"}, "output_type='jpeg'"),
        ({"prompt": PROMPT, "latents": torch.zeros(1, 4, 4, 4)}, "latents must be"),
        ({"prompt": [PROMPT, PROMPT], "negative_prompt": ["a", "b", "c"]}, "negative_prompt has 3"),
        ({"prompt": PROMPT, "num_inference_steps": 2.5}, "num_inference_steps=2.5 is not accepted"),  # not 2
    ],
)
def test_bad_input_names_the_argument(pipe, kwargs, fragment):
    args = dict(FAST, seed=0, **{k: v for k, v in kwargs.items() if k != "prompt"})
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")):
        pipe(kwargs["prompt"], **args)


TWO_IMAGES = [Image.new("RGB", (64, 64), (40, 80, 220)), Image.new("RGB", (64, 64), (220, 40, 40))]


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"prompt": 3}, "prompt must be a string or a non-empty list of strings, got 3"),
        ({"prompt": PROMPT, "cfg_scale": float("nan")}, "cfg_scale=nan must be a finite number"),
        ({"prompt": PROMPT, "cfg_scale": float("inf")}, "cfg_scale=inf must be a finite number"),
        ({"prompt": PROMPT, "cfg_scale": "3"}, "cfg_scale='3' must be a finite number"),
        ({"prompt": PROMPT, "cfg_scale": 3.0, "cfg_normalization": float("nan")}, "cfg_normalization=nan must be"),
        ({"prompt": PROMPT, "cfg_scale": 3.0, "cfg_truncation": float("-inf")}, "cfg_truncation=-inf must be"),
        ({"prompt": PROMPT, "denoising_strength": 0.3}, "denoising_strength=0.3 is how far image-to-image moves"),
        ({"prompt": PROMPT, "input_image": TWO_IMAGES}, "input_image has 2 images for 1 prompts: give 1 or one per"),
        ({"prompt": [PROMPT] * 3, "input_image": TWO_IMAGES}, "input_image has 2 images for 3 prompts"),
        ({"prompt": PROMPT, "input_image": []}, "input_image has 0 images for 1 prompts"),
        (
            {"prompt": PROMPT, "input_image": np.zeros((64, 64, 3), np.uint8), "denoising_strength": 0.5},
            r"^input_image must be a file path or a PIL\.Image, got ndarray",
        ),
        (
            {"prompt": [PROMPT] * 2, "input_image": [TWO_IMAGES[0], torch.zeros(3, 64, 64)]},
            r"^input_image\[1\] must be a file path or a PIL\.Image, got Tensor",
        ),
    ],
)
def test_bad_call_is_refused_before_any_model_runs(pipe, kwargs, fragment):
    """Python-API input the CLI would refuse, or that would fail deep in a model (or give a black image)."""

    def ran(module, args):
        raise AssertionError(f"{type(module).__name__} ran before the input was checked")

    hooks = [m.register_forward_pre_hook(ran) for m in (pipe.text_encoder, pipe.vae, pipe.dit)]
    args = dict(FAST, seed=0, **{k: v for k, v in kwargs.items() if k != "prompt"})
    try:
        with pytest.raises(ConfigError, match=fragment):
            pipe(kwargs["prompt"], **args)
    finally:
        for hook in hooks:
            hook.remove()


def test_one_input_image_or_one_per_prompt(pipe):
    one = pipe([PROMPT, PROMPT], input_image=TWO_IMAGES[:1], denoising_strength=0.6, seed=0, output_type="np", **FAST)
    each = pipe([PROMPT, PROMPT], input_image=TWO_IMAGES, denoising_strength=0.6, seed=0, output_type="np", **FAST)
    assert one.shape == each.shape == (2, 64, 64, 3)


def test_size_off_the_grid_is_rounded_with_warning(pipe, caplog):
    image = pipe(PROMPT, seed=0, **dict(FAST, height=70))
    assert image.size == (64, 64)
    assert "rounded" in caplog.text


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ConfigError, match="Tongyi-MAI/Z-Image-Turbo"):
        ZImagePipeline.from_pretrained("Tongyi-MAI/No-Such-Model")


def test_first_block_cache_in_the_pipeline(pipe):
    """Threshold 0 reuses nothing (same image); a loose one reuses later steps' layers, and turning it
    off gives the uncached image again. The batched CFG call is one call per step."""
    options = {**FAST, "num_inference_steps": 6, "cfg_scale": 3.0, "negative_prompt": "blurry"}
    plain = pipe(PROMPT, seed=0, output_type="pt", **options)
    caches = pipe.enable_first_block_cache(0.0)
    try:
        assert list(caches) == ["dit"] and pipe.step_caches() == caches
        exact = pipe(PROMPT, seed=0, output_type="pt", **options)
        assert (caches["dit"].calls, caches["dit"].skipped) == (6, 0)
        torch.testing.assert_close(exact, plain, rtol=0, atol=0)
        loose = pipe.enable_first_block_cache(1e9)["dit"]
        approx = pipe(PROMPT, seed=0, output_type="pt", **options)
        assert (loose.calls, loose.skipped) == (6, 5)
        assert (approx - plain).abs().max() > 1e-4
    finally:
        pipe.disable_first_block_cache()
    assert pipe.step_caches() == {} and pipe.dit.step_cache is None
    torch.testing.assert_close(pipe(PROMPT, seed=0, output_type="pt", **options), plain, rtol=0, atol=0)


def test_first_block_cache_bad_slot_is_a_clear_error(pipe):
    with pytest.raises(ConfigError, match="unknown model slot"):
        pipe.enable_first_block_cache(0.1, slots=["transformer"])
    with pytest.raises(ConfigError, match="supports the first-block cache"):
        pipe.enable_first_block_cache(0.1, slots=["vae"])
    with pytest.raises(ConfigError, match="threshold"):
        pipe.enable_first_block_cache(-1.0)


def test_unipc_sampler_steps_every_step(pipe):
    """`sampler="unipc"`: every step is UniPC's, in order, on the sample the previous one made (the sampler is
    proven in runtime's test_unipc.py); Euler (the default) takes none of them."""
    from diffsynth.runtime.testing.samplers import check_unipc_sampling

    check_unipc_sampling(
        lambda sampler: pipe("a cat", seed=0, output_type="pt", sampler=sampler, **{**FAST, "num_inference_steps": 4})
    )


def img2img_size(pipe, image, **size):
    """The output size and the first DiT call's latents shape of a one-step image-to-image call."""
    shapes = []
    hook = pipe.dit.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    try:
        out = pipe(PROMPT, input_image=image, denoising_strength=0.5, seed=0, num_inference_steps=2, **size)
    finally:
        hook.remove()
    return out.size, shapes[0]


def test_image_to_image_takes_the_input_image_size(pipe, caplog):
    """Without height/width the input image was stretched to 1024x1024; diffusers' ZImageImg2ImgPipeline (and the
    Omni path with edit_image) take its size. Given sizes are kept; an off-grid image size is rounded with a warning."""
    wide = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 160, 3), dtype=np.uint8))
    assert img2img_size(pipe, wide, progress_bar=False) == ((160, 64), (1, 4, 8, 20))
    assert img2img_size(pipe, [wide], progress_bar=False, height=32, width=48) == ((48, 32), (1, 4, 4, 6))
    assert img2img_size(pipe, wide, progress_bar=False, height=32) == ((160, 32), (1, 4, 4, 20))
    assert "rounded" not in caplog.text
    assert img2img_size(pipe, wide.resize((70, 44)), progress_bar=False)[0] == (64, 48)
    assert "44x70 rounded to 48x64" in caplog.text


def test_an_input_image_too_small_to_size_the_output_is_named(pipe):
    with pytest.raises(ConfigError, match=r"width=10 is not accepted.*\(the size of input_image, 10x64; give height"):
        pipe(
            PROMPT,
            input_image=Image.new("RGB", (10, 64)),
            denoising_strength=0.5,
            **{**FAST, "height": None, "width": None},
        )
