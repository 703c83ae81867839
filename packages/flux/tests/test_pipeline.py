"""FluxImagePipeline on the tiny repo: outputs, seeds, image-to-image, Kontext, input errors, presets, CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffsynth_flux_test_helpers import check_pipeline_first_block_cache
from PIL import Image

from diffsynth.flux.pipeline import (
    FluxImagePipeline,
    flux_velocity,
    latent_ids,
    pack_latents,
    unpack_latents,
)
from diffsynth.runtime.cli import main
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.schedulers import FlowMatchScheduler

FAST = dict(height=32, width=32, num_inference_steps=2, t5_sequence_length=16, progress_bar=False)


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _image(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_packing_round_trip_and_ids():
    x = torch.randn(2, 16, 6, 4)
    tokens = pack_latents(x)
    assert tokens.shape == (2, 6, 64)
    torch.testing.assert_close(unpack_latents(tokens, 6, 4), x, atol=0, rtol=0)
    ids = latent_ids(6, 4, index=1.0)
    assert ids.shape == (6, 3)
    assert ids[:, 0].eq(1).all() and ids[-1].tolist() == [1.0, 2.0, 1.0]


def test_text_to_image_size_and_seed(tiny_pipe):
    first = tiny_pipe("a red circle", seed=3, output_type="pt", **{**FAST, "width": 48})
    again = tiny_pipe("a red circle", seed=3, output_type="pt", **{**FAST, "width": 48})
    other = tiny_pipe("a red circle", seed=4, output_type="pt", **{**FAST, "width": 48})
    assert first.shape == (1, 3, 32, 48) and 0 <= first.min() and first.max() <= 1
    torch.testing.assert_close(first, again, atol=0, rtol=0)
    assert (first - other).abs().max() > 1e-3
    image = tiny_pipe("a red circle", seed=3, **FAST)
    assert isinstance(image, Image.Image) and image.size == (32, 32)
    batch = tiny_pipe(["a red circle", "a cat"], seed=3, **FAST)
    assert isinstance(batch, list) and len(batch) == 2


def test_given_latents_replace_the_seed(tiny_pipe):
    noise = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    a = tiny_pipe("a cat", latents=noise, seed=1, output_type="pt", **FAST)
    b = tiny_pipe("a cat", latents=noise, seed=2, output_type="pt", **FAST)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    with pytest.raises(ConfigError, match="latents must be a tensor of shape"):
        tiny_pipe("a cat", latents=torch.zeros(1, 16, 8, 8), **FAST)


def test_guidance_and_cfg_change_the_image(tiny_pipe):
    base = tiny_pipe("a cat", seed=0, output_type="pt", **FAST)
    guided = tiny_pipe("a cat", seed=0, embedded_guidance=1.0, output_type="pt", **FAST)
    cfg = tiny_pipe("a cat", negative_prompt="blurry", cfg_scale=2.0, seed=0, output_type="pt", **FAST)
    assert (base - guided).abs().max() > 1e-4
    assert (base - cfg).abs().max() > 1e-4


def test_image_to_image_keeps_the_input_at_low_strength(tiny_pipe):
    source = _image(32, 32)
    low = tiny_pipe("a cat", input_image=source, denoising_strength=0.3, seed=0, output_type="pt", **FAST)
    full = tiny_pipe("a cat", input_image=source, denoising_strength=1.0, seed=0, output_type="pt", **FAST)
    t2i = tiny_pipe("a cat", seed=0, output_type="pt", **FAST)
    assert low.shape == (1, 3, 32, 32)
    torch.testing.assert_close(full, t2i, atol=1e-5, rtol=0)  # strength 1: (almost) pure noise
    assert (low - t2i).abs().max() > 1e-3
    with pytest.raises(ConfigError, match="denoising_strength"):
        tiny_pipe("a cat", input_image=source, denoising_strength=0.0, **FAST)


def test_kontext_images_condition_the_output(tiny_pipe):
    fast = {k: v for k, v in FAST.items() if k not in ("height", "width")}
    one = tiny_pipe("make it red", kontext_images=_image(48, 32), seed=0, output_type="pt", **fast)
    assert one.shape == (1, 3, 32, 48)  # the reference's size
    other = tiny_pipe("make it red", kontext_images=_image(48, 32, seed=1), seed=0, output_type="pt", **fast)
    assert (one - other).abs().max() > 1e-4
    odd = tiny_pipe("make it red", kontext_images=[_image(50, 35), _image(32, 32)], seed=0, output_type="pt", **fast)
    assert odd.shape == (1, 3, 32, 48)  # 50x35 rounded down to 48x32
    sized = tiny_pipe("make it red", kontext_images=_image(48, 32), seed=0, output_type="pt", **FAST)
    assert sized.shape == (1, 3, 32, 32)
    with pytest.raises(ConfigError, match="kontext_images\\[0\\]"):
        tiny_pipe("make it red", kontext_images=_image(8, 8), **fast)


def test_flux_velocity_is_the_per_step_call(tiny_pipe):
    pipe = tiny_pipe
    text = pipe.encode_prompt(["a cat", "a dog"], 16)
    x = torch.randn(2, 16, 4, 6, generator=torch.Generator().manual_seed(0))
    v = flux_velocity(pipe.dit, x, torch.tensor([0.7, 0.3]), text, 3.5)
    assert v.shape == x.shape and v.dtype == torch.float32
    single = flux_velocity(pipe.dit, x[:1], torch.tensor([0.7]), type(text)(text.t5[:1], text.pooled[:1]), 3.5)
    torch.testing.assert_close(v[:1], single, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "extra",
    [{}, {"kontext_images": "reference"}, {"negative_prompt": "blurry", "cfg_scale": 2.0}],
    ids=["text-to-image", "kontext", "true-cfg"],
)
def test_first_block_cache_in_the_pipeline(tiny_pipe, extra, one_thread):
    """Kontext's reference tokens ride in the image stream; true CFG runs both branches as one batch,
    so one DiT call per step."""
    extra = {k: _image(32, 32) if v == "reference" else v for k, v in extra.items()}
    options = {**FAST, "num_inference_steps": 4}
    check_pipeline_first_block_cache(
        tiny_pipe, lambda: tiny_pipe("a cat", seed=0, output_type="pt", **options, **extra), steps=4
    )


def test_first_block_cache_bad_slot_and_threshold_are_clear_errors(tiny_pipe):
    with pytest.raises(ConfigError, match="supports the first-block cache"):
        tiny_pipe.enable_first_block_cache(0.1, slots=["vae"])
    with pytest.raises(ConfigError, match="threshold"):
        tiny_pipe.enable_first_block_cache(-1.0)
    assert tiny_pipe.step_caches() == {}


@pytest.mark.parametrize("extra", [{}, {"kontext_images": "reference"}], ids=["text-to-image", "kontext"])
def test_tea_cache_follows_diffsynth_studio(tiny_pipe, extra, one_thread):
    """`tea_cache_l1_thresh` (DiffSynth-Studio's call argument) gives the image its TeaCache rule gives,
    re-enacted with hooks on the uncached DiT: the first double block's modulated image input as indicator,
    the FLUX.1 polynomial, the image tokens' residual over both block lists reused. This tiny model's
    indicator changes 0.16 to 0.2 per step (0.25 rescaled), so 0.6 reuses some calls and not others."""
    from diffsynth.flux.flux1.dit import TEA_CACHE_COEFFICIENTS
    from diffsynth.runtime.testing.tea_cache import TeaCacheReference

    extra = {k: _image(32, 32) if v == "reference" else v for k, v in extra.items()}
    options = {**FAST, "num_inference_steps": 10, **extra}
    dit = tiny_pipe.dit
    plain = tiny_pipe("a cat", seed=0, output_type="pt", **options)
    reference = TeaCacheReference(
        TEA_CACHE_COEFFICIENTS["FLUX.1"], 0.6, 10, 1, dit.double_blocks[0], dit.single_blocks[-1],
        (dit.double_blocks[0].img_attn.qkv, lambda args, out: args[0]),
    )  # fmt: skip
    try:
        expected = tiny_pipe("a cat", seed=0, output_type="pt", **options)
    finally:
        reference.remove()
    ran = []
    hook = dit.single_blocks[-1].register_forward_hook(lambda m, i, o: ran.append(1))
    try:
        got = tiny_pipe("a cat", seed=0, output_type="pt", tea_cache_l1_thresh=0.6, **options)
    finally:
        hook.remove()
    reused = reference.reused
    assert len(reused) == 10 and 3 <= sum(reused) <= 6 and not reused[0] and not reused[-1], reused
    assert len(ran) == reused.count(False) and dit.step_cache is None
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert (got - plain).abs().max() > 1e-4  # reusing changed the image: the test can tell


def test_tea_cache_enable_disable_and_errors(tiny_pipe, tiny_klein_pipe):
    """`enable_tea_cache` gives the call argument's image (FLUX.1 has one polynomial: no model id needed);
    a wrong model id, a slot without a DiT and FLUX.2 (no TeaCache polynomial) are clear errors."""
    options = {**FAST, "num_inference_steps": 6}
    per_call = tiny_pipe("a cat", seed=0, output_type="pt", tea_cache_l1_thresh=0.6, **options)
    caches = tiny_pipe.enable_tea_cache(0.6)
    try:
        enabled = tiny_pipe("a cat", seed=0, output_type="pt", **options)
        assert caches["dit"].calls == 6 and 0 < caches["dit"].skipped < 4
        torch.testing.assert_close(enabled, per_call, rtol=0, atol=0)
    finally:
        tiny_pipe.disable_tea_cache()
    assert tiny_pipe.step_caches() == {}
    with pytest.raises(ConfigError, match="'FLUX.2' is not a TeaCache model id.*FLUX.1"):
        tiny_pipe.enable_tea_cache(0.6, model_id="FLUX.2")
    with pytest.raises(ConfigError, match="supports TeaCache"):
        tiny_pipe.enable_tea_cache(0.6, slots=["vae"])
    with pytest.raises(ConfigError, match="supports TeaCache.*enable_first_block_cache"):
        tiny_klein_pipe.enable_tea_cache(0.6)
    assert tiny_pipe.step_caches() == {} and tiny_klein_pipe.step_caches() == {}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(height=40), "height=40 is not a multiple of 16; use 32 or 48"),
        (dict(width=70), "width=70 is not a multiple of 16; use 64 or 80"),
        (dict(height=8), "height=8 is not accepted"),
        (dict(t5_sequence_length=0), "t5_sequence_length=0"),
        (dict(sigma_shift=-1.0), "sigma_shift=-1.0"),
        (dict(sigma_shift=float("inf")), "sigma_shift=inf must be a finite number"),
        (dict(cfg_scale=float("nan")), "cfg_scale=nan must be a finite number"),
        (dict(cfg_scale=float("inf")), "cfg_scale=inf must be a finite number"),
        (dict(cfg_scale=True), "cfg_scale=True must be a finite number"),
        (
            dict(infiniteyou_id_embedding=torch.zeros(512), infiniteyou_guidance=float("nan")),
            "infiniteyou_guidance=nan must be a finite number",
        ),
        (dict(output_type="jpg"), "output_type='jpg'"),
        (dict(num_inference_steps=0), "num_inference_steps=0"),
    ],
)
def test_bad_inputs_name_the_value(tiny_pipe, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        tiny_pipe("a cat", **{**FAST, **kwargs})


@pytest.mark.parametrize("prompt", ["", "   ", [], None])
def test_empty_prompt_is_refused(tiny_pipe, prompt):
    with pytest.raises(ConfigError, match="prompt"):
        tiny_pipe(prompt, **FAST)


def test_sigma_shift_and_sigmas(tiny_pipe):
    shifted = tiny_pipe("a cat", seed=0, sigma_shift=3.0, output_type="pt", **FAST)
    default = tiny_pipe("a cat", seed=0, output_type="pt", **FAST)
    explicit = tiny_pipe("a cat", seed=0, sigmas=[1.0, 0.5], output_type="pt", **FAST)
    assert (shifted - default).abs().max() > 1e-5
    assert explicit.shape == default.shape


def test_model_configs_with_tokenizer_configs(tiny_repo):
    configs = [
        ModelConfig(path=str(tiny_repo / "transformer" / "diffusion_pytorch_model.safetensors")),
        ModelConfig(path=str(tiny_repo / "vae" / "diffusion_pytorch_model.safetensors")),
        ModelConfig(path=str(tiny_repo / "text_encoder" / "model.safetensors")),
        ModelConfig(path=sorted(str(p) for p in (tiny_repo / "text_encoder_2").glob("*.safetensors"))),
    ]
    pipe = FluxImagePipeline.from_pretrained(
        model_configs=configs,
        torch_dtype="float32",
        device="cpu",
        tokenizer_1_config=ModelConfig(path=str(tiny_repo / "tokenizer")),
        tokenizer_2_config=ModelConfig(path=str(tiny_repo / "tokenizer_2")),
    )
    assert pipe("a cat", seed=0, **FAST).size == (32, 32)
    bare = FluxImagePipeline.from_pretrained(
        model_configs=configs, torch_dtype="float32", device="cpu", tokenizer_1_config=None, tokenizer_2_config=None
    )  # explicit None: none loaded (left out, they are FLUX.1-dev's: test_studio_model_configs.py)
    with pytest.raises(ConfigError, match="tokenizer_2_config"):
        bare("a cat", **FAST)


def test_missing_text_encoder_is_reported(tiny_repo):
    configs = [
        ModelConfig(path=str(tiny_repo / "transformer" / "diffusion_pytorch_model.safetensors")),
        ModelConfig(path=str(tiny_repo / "vae" / "diffusion_pytorch_model.safetensors")),
        ModelConfig(path=str(tiny_repo / "text_encoder" / "model.safetensors")),
    ]
    with pytest.raises(ConfigError, match="text_encoder_2"):
        FluxImagePipeline.from_pretrained(model_configs=configs, torch_dtype="float32", device="cpu")


# ----------------------------------------------------------------------------------------- presets and CLI
def test_presets_are_registered_with_the_authors_defaults():
    from diffsynth.runtime.registry import find_preset

    family, dev = find_preset("black-forest-labs/FLUX.1-dev")
    assert family.name == "flux" and family.pipeline_class() is FluxImagePipeline
    assert dev.defaults["num_inference_steps"] == 28 and dev.defaults["embedded_guidance"] == 3.5
    patterns = [f.origin_file_pattern for f in dev.files]
    assert patterns == [
        "flux1-dev.safetensors",
        "ae.safetensors",
        "text_encoder/model.safetensors",
        "text_encoder_2/*.safetensors*",
    ]
    assert find_preset("black-forest-labs/FLUX.1-Krea-dev")[1].defaults["embedded_guidance"] == 4.5
    kontext = find_preset("black-forest-labs/flux.1-kontext-dev")[1]
    assert kontext.files[0].origin_file_pattern == "flux1-kontext-dev.safetensors" and "height" not in kontext.defaults
    assert kontext.defaults["kontext_auto_resize"] is True  # references go to the Kontext training resolutions
    with pytest.raises(ConfigError, match="FLUX.1-dev"):
        FluxImagePipeline.from_pretrained("black-forest-labs/FLUX.1-pro")


def test_schnell_preset_samples_four_unshifted_steps_with_short_prompts(tiny_repo):
    """FLUX.1-schnell: BFL samples it with `shift=False`; diffusers' schnell scheduler (shift 1, no dynamic
    shifting) gives the same linear sigmas 1, 0.75, 0.5, 0.25, 0."""
    from diffsynth.runtime.registry import find_preset

    schnell = find_preset("black-forest-labs/FLUX.1-schnell")[1]
    assert schnell.files[0].origin_file_pattern == "flux1-schnell.safetensors"
    pipe = FluxImagePipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu")
    pipe.defaults = dict(schnell.defaults)
    seen = {}
    original = FlowMatchScheduler.set_timesteps

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        seen["sigmas"] = self.sigmas.clone()

    encode = pipe.encode_prompt

    def encode_spy(prompts, length):
        seen["t5_length"] = length
        return encode(prompts, length)

    pipe.encode_prompt = encode_spy
    FlowMatchScheduler.set_timesteps = spy
    try:
        pipe("a cat", seed=0, height=32, width=32, progress_bar=False)
    finally:
        FlowMatchScheduler.set_timesteps = original
    torch.testing.assert_close(seen["sigmas"], torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]), atol=1e-6, rtol=0)
    assert seen["t5_length"] == 256


def test_preset_loads_offline_and_cli_generates(bfl_repo_base, tmp_path, monkeypatch):
    """`--model black-forest-labs/FLUX.1-dev`: BFL single file + ae.safetensors found under the base path."""
    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(bfl_repo_base))
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "1")
    out = tmp_path / "out" / "flux.png"
    args = ["generate", "--model", "black-forest-labs/FLUX.1-dev", "--prompt", "a red circle", "--seed", "3"]
    fast = ["--height", "32", "--width", "48", "--steps", "2", "--device", "cpu", "--dtype", "float32"]
    assert main([*args, "--output", str(out), *fast]) == 0
    assert pixels(out).shape == (32, 48, 3)

    pipe = FluxImagePipeline.from_pretrained("black-forest-labs/FLUX.1-dev", torch_dtype="float32", device="cpu")
    assert pipe.defaults["embedded_guidance"] == 3.5 and pipe.tokenizer_2 is not None
    image = pipe("a red circle", seed=3, height=32, width=48, num_inference_steps=2, progress_bar=False)
    assert np.array_equal(pixels(out), np.asarray(image))


def test_preset_with_missing_files_names_them(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(tmp_path))
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "1")
    with pytest.raises(Exception, match="flux1-dev.safetensors"):
        FluxImagePipeline.from_pretrained("black-forest-labs/FLUX.1-dev", torch_dtype="float32", device="cpu")


def test_vram_managed_pipeline_gives_the_same_image(tiny_repo, tiny_pipe):
    """Every model (text encoders included) under the VRAM manager, all units streamed: same output, with
    TeaCache too."""
    managed = FluxImagePipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu", vram_limit=0)
    assert sorted(managed.vram_handles) == ["dit", "text_encoder_1", "text_encoder_2", "vae"]
    kwargs = dict(seed=0, output_type="pt", **FAST)
    torch.testing.assert_close(managed("a cat", **kwargs), tiny_pipe("a cat", **kwargs), atol=0, rtol=0)
    # TeaCache's indicator is taken inside the first (streamed) double block: same image, same reuse
    kwargs |= {"num_inference_steps": 6, "tea_cache_l1_thresh": 0.6}
    torch.testing.assert_close(managed("a cat", **kwargs), tiny_pipe("a cat", **kwargs), atol=0, rtol=0)


@pytest.mark.parametrize(
    ("preset", "file", "settings"),
    [
        ("DiffSynth-Studio/Eligen", "model_bf16.safetensors", (50, 3.0)),
        ("DiffSynth-Studio/ArtAug-lora-FLUX.1dev-v1", "merged_lora.safetensors", (28, 1.0)),
    ],
)
def test_lora_presets_are_flux1_dev_with_the_lora(bfl_repo_base, tmp_path, monkeypatch, preset, file, settings):
    """`DiffSynth-Studio/Eligen` / `ArtAug-lora-FLUX.1dev-v1`: FLUX.1-dev's files with the repo's LoRA fused and
    the example's settings; the DiT equals FLUX.1-dev's after `load_lora` of that file."""
    import shutil

    from diffsynth.runtime.lora import LoRATarget, LoRAWeights, save_lora

    base = tmp_path / "models"
    shutil.copytree(bfl_repo_base, base)
    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(base))
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "1")
    plain = FluxImagePipeline.from_pretrained("black-forest-labs/FLUX.1-dev", torch_dtype="float32", device="cpu")
    g = torch.Generator().manual_seed(5)
    targets = {}
    for name in ("double_blocks.0.img_attn.qkv", "single_blocks.0.linear1"):
        out_features, in_features = plain.dit.get_submodule(name).weight.shape
        targets[name] = LoRATarget(torch.randn(2, in_features, generator=g), torch.randn(out_features, 2, generator=g))
    lora = base / preset / file
    lora.parent.mkdir(parents=True)
    save_lora(LoRAWeights(targets), lora)
    eligen = FluxImagePipeline.from_pretrained(preset, torch_dtype="float32", device="cpu")
    assert (eligen.defaults["num_inference_steps"], eligen.defaults.get("cfg_scale", 1.0)) == settings
    plain.load_lora(str(lora))
    ours, theirs = eligen.dit.state_dict(), plain.dit.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    fresh = FluxImagePipeline.from_pretrained("black-forest-labs/FLUX.1-dev", torch_dtype="float32", device="cpu")
    assert not torch.equal(
        ours["single_blocks.0.linear1.weight"], fresh.dit.state_dict()["single_blocks.0.linear1.weight"]
    )


def test_unipc_sampler_steps_every_step(tiny_pipe):
    """`sampler="unipc"` (see runtime's test_unipc.py for the sampler): every step is UniPC's, in order."""
    from diffsynth.runtime.testing.samplers import check_unipc_sampling

    check_unipc_sampling(
        lambda sampler: tiny_pipe(
            "a cat", seed=0, output_type="pt", sampler=sampler, **{**FAST, "num_inference_steps": 4}
        )
    )
