"""QwenImagePipeline on the tiny repo: output sizes, seeds, image-to-image, input errors, presets (no diffusers)."""

import numpy as np
import pytest
import torch
from PIL import Image

from diffsynth.qwen_image import QwenImagePipeline
from diffsynth.qwen_image.pipeline import pack, true_cfg, unpack
from diffsynth.runtime.errors import ConfigError

FAST = dict(num_inference_steps=2, height=32, width=48, progress_bar=False)


@pytest.fixture(scope="module")
def pipe(tiny_repo):
    return QwenImagePipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu")


def test_text_to_image_size_and_seed(pipe):
    image = pipe("a red circle", seed=1, **FAST)
    assert isinstance(image, Image.Image) and image.size == (48, 32)
    a = pipe("a red circle", seed=1, output_type="pt", **FAST)
    b = pipe("a red circle", seed=1, output_type="pt", **FAST)
    c = pipe("a red circle", seed=2, output_type="pt", **FAST)
    assert a.shape == (1, 3, 32, 48)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert (a - c).abs().max() > 1e-4


def test_batch_and_five_dimensional_latents(pipe):
    noise = torch.randn(2, 16, 4, 6, generator=torch.Generator().manual_seed(0))
    flat = pipe(["a red circle", "a yellow triangle"], latents=noise, output_type="np", **FAST)
    video = pipe(["a red circle", "a yellow triangle"], latents=noise[:, :, None], output_type="np", **FAST)
    assert flat.shape == (2, 32, 48, 3)
    np.testing.assert_array_equal(flat, video)


def test_image_to_image_starts_from_the_input(pipe):
    source = Image.fromarray(np.full((32, 48, 3), 200, dtype=np.uint8))
    light = pipe("a red circle", input_image=source, denoising_strength=0.3, seed=0, output_type="pt", **FAST)
    full = pipe("a red circle", seed=0, output_type="pt", **FAST)
    assert light.shape == full.shape == (1, 3, 32, 48)
    assert (light - full).abs().max() > 1e-4


def test_cfg_off_ignores_the_negative_prompt(pipe):
    a = pipe("a red circle", negative_prompt="blurry", cfg_scale=1.0, seed=0, output_type="pt", **FAST)
    b = pipe("a red circle", negative_prompt="dark", cfg_scale=1.0, seed=0, output_type="pt", **FAST)
    c = pipe("a red circle", negative_prompt="dark", cfg_scale=4.0, seed=0, output_type="pt", **FAST)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert (a - c).abs().max() > 1e-4


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(height=8), "height=8"),
        (dict(width=0), "width=0"),
        (dict(prompt="  "), "prompt is empty"),
        (dict(prompt=[]), "prompt must be"),
        (dict(negative_prompt=["a", "b"]), "negative_prompt has 2 entries"),
        (dict(output_type="jpeg"), "output_type='jpeg'"),
        (dict(denoising_strength=0.0), "denoising_strength=0.0"),
        (dict(latents=torch.zeros(1, 16, 5, 5)), "latents must be a tensor of shape"),
        (dict(max_sequence_length=0), "max_sequence_length=0"),
        (dict(num_inference_steps=2.5), "num_inference_steps=2.5 is not accepted"),  # not truncated to 2
    ],
)
def test_bad_inputs_name_the_value(pipe, kwargs, match):
    args = dict(prompt="a red circle", num_inference_steps=1, height=32, width=32, progress_bar=False)
    args.update(kwargs)
    with pytest.raises(ConfigError, match=match):
        pipe(**args)


def test_pack_roundtrip_and_true_cfg_keeps_the_conditional_norm():
    x = torch.randn(2, 16, 4, 6)
    torch.testing.assert_close(unpack(pack(x), 4, 6), x, atol=0, rtol=0)
    pos, neg = torch.randn(1, 16, 4, 6), torch.randn(1, 16, 4, 6)
    guided = true_cfg(pos, neg, 4.0)
    torch.testing.assert_close(pack(guided).norm(dim=-1), pack(pos).norm(dim=-1))
    torch.testing.assert_close(true_cfg(pos, neg, 1.0), pos)


def test_presets_carry_the_authors_defaults():
    from diffsynth.qwen_image.presets import LORA_PRESETS, PRESETS

    assert set(PRESETS) == {
        "Qwen/Qwen-Image",
        "Qwen/Qwen-Image-2512",
        "Qwen/Qwen-Image-Edit",
        "Qwen/Qwen-Image-Edit-2509",
        "Qwen/Qwen-Image-Edit-2511",
        "Qwen/Qwen-Image-Layered",
        "DiffSynth-Studio/Qwen-Image-Distill-Full",
        "DiffSynth-Studio/Qwen-Image-Layered-Control",
        "FireRedTeam/FireRed-Image-Edit-1.0",
        "FireRedTeam/FireRed-Image-Edit-1.1",
        *LORA_PRESETS,
    }
    # the LoRA presets: their base's files and a LoRA file of their own repo (the Lightning ones: lightx2v's repo)
    for name, preset in LORA_PRESETS.items():
        (lora,) = preset.loras
        assert lora.model_id == name.split(":")[0] and lora.origin_file_pattern.endswith(".safetensors")
        assert preset.files and all(f.model_id != lora.model_id for f in preset.files)
    lightning = LORA_PRESETS["lightx2v/Qwen-Image-Lightning:4steps"].defaults
    assert (lightning["num_inference_steps"], lightning["cfg_scale"], lightning["sigma_template"]) == (
        4,
        1.0,
        "lightning",
    )
    dmd2 = LORA_PRESETS["MusePublic/Qwen-Image-Distill"].defaults
    assert (dmd2["num_inference_steps"], dmd2["cfg_scale"]) == (3, 1.0)
    assert dmd2["exponential_shift_mu"] == pytest.approx(0.9162907)  # ln 2.5, DiffSynth-Studio's DMD2 example
    base = PRESETS["Qwen/Qwen-Image"]
    assert base.defaults["cfg_scale"] == 4.0 and base.defaults["num_inference_steps"] == 50
    assert (base.defaults["height"], base.defaults["width"]) == (1328, 1328)
    assert base.tokenizer.origin_file_pattern == "tokenizer/"
    assert {f.origin_file_pattern for f in base.files} >= {"transformer/*.safetensors*", "text_encoder/*.safetensors*"}
    assert PRESETS["Qwen/Qwen-Image-Edit-2509"].defaults["num_inference_steps"] == 40
    distill = PRESETS["DiffSynth-Studio/Qwen-Image-Distill-Full"]
    assert (distill.defaults["num_inference_steps"], distill.defaults["cfg_scale"]) == (15, 1.0)
    shared = {(f.model_id, f.origin_file_pattern) for f in base.files if not f.origin_file_pattern.startswith("trans")}
    assert {(f.model_id, f.origin_file_pattern) for f in distill.files[1:]} == shared


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError, match="Qwen/Qwen-Image"):
        QwenImagePipeline.from_pretrained("Qwen/Qwen-Image-XL")


@pytest.fixture
def small_edit_areas(monkeypatch):
    from diffsynth.qwen_image import pipeline as module

    monkeypatch.setattr(module, "EDIT_AREA", 64 * 64)
    monkeypatch.setattr(module, "CONDITION_AREA", 56 * 56)


@pytest.mark.parametrize("style", ["plus", "edit"])
def test_edit_runs_and_defaults_to_the_last_images_aspect(pipe, small_edit_areas, style):
    pipe.defaults["edit_template"] = style
    try:
        images = [Image.new("RGB", (96, 48), (200, 10, 10)), Image.new("RGB", (40, 80), (10, 200, 10))]
        if style == "edit":
            images = images[-1:]
        out = pipe("make it blue", edit_image=images, num_inference_steps=2, seed=0, progress_bar=False)
        assert out.size == (32, 96)  # ~64x64 pixels, the last image's 1:2 aspect, multiples of 32 (the authors')
        other = pipe(
            "make it blue",
            edit_image=images[-1:],
            num_inference_steps=2,
            seed=0,
            height=48,
            width=48,
            progress_bar=False,
        )
        assert other.size == (48, 48)
    finally:
        pipe.defaults.pop("edit_template")


@pytest.mark.parametrize("edit", [False, True], ids=["text-to-image", "edit"])
def test_first_block_cache_in_the_pipeline(pipe, small_edit_areas, one_thread, edit):
    """Threshold 0 reuses nothing (same image); a loose one reuses the later steps' blocks, each of the
    positive and negative calls against its own last full call; turning it off gives the uncached image.
    Edit references ride in the image stream."""
    extra = {"edit_image": Image.new("RGB", (40, 80), (10, 200, 10))} if edit else {}
    options = {**FAST, "num_inference_steps": 4, "cfg_scale": 4.0, "negative_prompt": "blurry", **extra}
    plain = pipe("a red circle", seed=0, output_type="pt", **options)
    caches = pipe.enable_first_block_cache(0.0)
    try:
        assert list(caches) == ["dit"] and pipe.step_caches() == caches
        exact = pipe("a red circle", seed=0, output_type="pt", **options)
        assert (caches["dit"].calls, caches["dit"].skipped) == (8, 0)  # positive + negative per step
        torch.testing.assert_close(exact, plain, rtol=0, atol=0)
        loose = pipe.enable_first_block_cache(1e9)["dit"]
        approx = pipe("a red circle", seed=0, output_type="pt", **options)
        assert (loose.calls, loose.skipped) == (8, 6)
        assert approx.shape == plain.shape and (approx - plain).abs().max() > 1e-4
    finally:
        pipe.disable_first_block_cache()
    assert pipe.step_caches() == {} and pipe.dit.step_cache is None
    torch.testing.assert_close(pipe("a red circle", seed=0, output_type="pt", **options), plain, rtol=0, atol=0)


def test_first_block_cache_bad_slot_is_a_clear_error(pipe):
    with pytest.raises(ConfigError, match="unknown model slot"):
        pipe.enable_first_block_cache(0.1, slots=["transformer"])
    with pytest.raises(ConfigError, match="supports the first-block cache"):
        pipe.enable_first_block_cache(0.1, slots=["text_encoder"])


def test_edit_errors(pipe):
    with pytest.raises(ConfigError, match="edit_image is an empty list"):
        pipe("a cat", edit_image=[], num_inference_steps=1, height=32, width=32, progress_bar=False)
    pipe.defaults["edit_template"] = "v3"
    try:
        with pytest.raises(ConfigError, match="edit_template='v3'"):
            pipe("a cat", edit_image=Image.new("RGB", (32, 32)), num_inference_steps=1, progress_bar=False)
    finally:
        pipe.defaults.pop("edit_template")


def test_vision_processor_expands_each_image_placeholder(pipe):
    from diffsynth.qwen_image.text_encoder import IMAGE_PAD, edit_image_prefix

    images = [Image.new("RGB", (56, 56)), Image.new("RGB", (112, 56))]
    out = pipe.processor(text=[edit_image_prefix(2, numbered=True) + "a cat"], images=images)
    pad = pipe.processor.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    expected = int(out["image_grid_thw"].prod(dim=1).sum()) // 4
    assert int((out["input_ids"] == pad).sum()) == expected
    assert out["pixel_values"].shape[0] == int(out["image_grid_thw"].prod(dim=1).sum())
    with pytest.raises(ConfigError, match="1 image placeholders for 2 images"):
        pipe.processor(text=[edit_image_prefix(1, numbered=True)], images=images)


# ------------------------------------------------------------------ sigma templates
@pytest.fixture
def sigmas_seen(pipe, monkeypatch):
    """The sigma of every DiT call of the next pipeline run."""
    from diffsynth.qwen_image import pipeline as module

    seen, velocity = [], module.qwen_image_velocity

    def record(dit, latents, sigma, *args, **kwargs):
        seen.append(round(float(sigma[0]), 6))
        return velocity(dit, latents, sigma, *args, **kwargs)

    monkeypatch.setattr(module, "qwen_image_velocity", record)
    return seen


def test_lightning_template_is_shift_3_without_terminal_stretch(pipe, sigmas_seen):
    pipe("a red circle", seed=0, sigma_template="lightning", cfg_scale=1.0, **dict(FAST, num_inference_steps=4))
    assert sigmas_seen == [1.0, 0.9, 0.75, 0.5]  # 3t / (1 + 2t) on 1, 3/4, 1/2, 1/4 at any size


def test_exponential_shift_mu_overrides_either_template(pipe, sigmas_seen):
    run = dict(FAST, num_inference_steps=4, cfg_scale=1.0, seed=0)
    pipe("a red circle", sigma_template="lightning", exponential_shift_mu=0.0, **run)
    pipe("a red circle", exponential_shift_mu=0.0, **run)
    assert sigmas_seen[:4] == [1.0, 0.75, 0.5, 0.25]  # mu = 0: no shift
    assert sigmas_seen[4:8] == [1.0, 0.673333, 0.346667, 0.02]  # the default still stretches to 0.02


def test_sigma_template_from_the_preset_defaults(pipe, sigmas_seen, monkeypatch):
    monkeypatch.setitem(pipe.defaults, "sigma_template", "lightning")
    pipe("a red circle", seed=0, cfg_scale=1.0, **dict(FAST, num_inference_steps=2))
    assert sigmas_seen == [1.0, 0.75]


def test_unknown_sigma_template_names_the_argument(pipe):
    with pytest.raises(ConfigError, match=r"sigma_template='turbo' is not known; use one of qwen_image, lightning"):
        pipe("a red circle", sigma_template="turbo", **FAST)


def test_unipc_sampler_steps_every_step(pipe):
    """`sampler="unipc"` (see runtime's test_unipc.py for the sampler): every step is UniPC's, in order."""
    from diffsynth.runtime.testing.samplers import check_unipc_sampling

    check_unipc_sampling(
        lambda sampler: pipe("a cat", seed=0, output_type="pt", sampler=sampler, **{**FAST, "num_inference_steps": 4})
    )


def test_zero_cond_t_overrides_the_dits_config_for_one_call(pipe, small_edit_areas):
    """DiffSynth-Studio's `zero_cond_t=True` (Edit-2511) on a DiT whose config says False gives the image the DiT
    makes with the flag in its config (the edit image's tokens modulated at timestep 0), differs from the plain
    call, and leaves the config as it was; `None` keeps the config's value; other values are refused."""
    options = dict(edit_image=Image.new("RGB", (40, 80), (10, 200, 10)), seed=0, output_type="pt", **FAST)
    assert pipe.dit.config.zero_cond_t is False
    plain = pipe("make it blue", **options)
    overridden = pipe("make it blue", zero_cond_t=True, **options)
    assert pipe.dit.config.zero_cond_t is False
    pipe.dit.config.zero_cond_t = True
    try:
        configured = pipe("make it blue", **options)
        torch.testing.assert_close(pipe("make it blue", zero_cond_t=None, **options), configured, rtol=0, atol=0)
        torch.testing.assert_close(pipe("make it blue", zero_cond_t=False, **options), plain, rtol=0, atol=0)
    finally:
        pipe.dit.config.zero_cond_t = False
    torch.testing.assert_close(overridden, configured, rtol=0, atol=0)
    assert (overridden - plain).abs().max() > 1e-6  # the runs are bit-reproducible: any change is the flag's
    with pytest.raises(ConfigError, match="zero_cond_t='yes'"):
        pipe("make it blue", zero_cond_t="yes", **options)
