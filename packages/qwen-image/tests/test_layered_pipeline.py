"""Layer decomposition (Qwen-Image-Layered) through `QwenImagePipeline(layer_input_image=..., layer_num=...)` on a
tiny random Layered repo: outputs, sizes, schedule, refusals, the preset, and parity with diffusers'
`QwenImageLayeredPipeline` (fp32, CPU).

The Layered repo is the session's tiny Qwen-Image repo with a Layered DiT (layer-3D RoPE, additional timestep
embedding), a 4-channel VAE and the Layered scheduler config, all written by our own classes in the hub's
layout. diffusers sizes the layers from `resolution` (640 or 1024) through its `calculate_dimensions`; the
parity tests shrink that area (on both sides) so the tiny models run in about a second.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.testing.modules import load_beside
from diffsynth.runtime.testing.weights import random_weights

C = load_beside(__file__, "conftest.py", "qwen_image_tests_conftest")  # tiny repo configs and key renaming

LAYERED_DIT = {**C.DIT_CONFIG, "use_additional_t_cond": True, "use_layer3d_rope": True, "zero_cond_t": False}
LAYERED_VAE = {**C.VAE_CONFIG, "input_channels": 4}
# Qwen/Qwen-Image-Layered scheduler/scheduler_config.json
LAYERED_SCHEDULER = {
    **C.SCHEDULER_CONFIG,
    "shift_terminal": None,
    "time_shift_type": "linear",
}
PROMPT = "a red circle on a blue background"
SMALL_AREA = 64 * 64  # the resolution buckets' area, shrunk for the tiny models


def build_layered_repo(tiny_repo, root):
    from diffsynth.qwen_image.formats import DIT_SPEC
    from diffsynth.runtime.models.wan_vae import WAN21_VAE_SPEC

    shutil.copytree(tiny_repo, root)
    dit = random_weights(DIT_SPEC.build(DIT_SPEC.config_from_state({}, LAYERED_DIT)), 5)
    vae_config = dataclasses.replace(WAN21_VAE_SPEC.config_from_state({}, LAYERED_VAE), in_channels=4)
    vae = random_weights(WAN21_VAE_SPEC.build(vae_config), 6)
    for folder, config, state in (
        ("transformer", LAYERED_DIT, dit.state_dict()),
        ("vae", LAYERED_VAE, C.vae_ours_to_diffusers(vae.state_dict())),
    ):
        (root / folder / "config.json").write_text(json.dumps(config, indent=2))
        save_file(
            {k: v.contiguous() for k, v in state.items()}, str(root / folder / "diffusion_pytorch_model.safetensors")
        )
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(LAYERED_SCHEDULER))
    return root


@pytest.fixture(scope="module")
def layered_repo(tiny_repo, tmp_path_factory):
    return build_layered_repo(tiny_repo, tmp_path_factory.mktemp("layered") / "Qwen-Image-Layered")


@pytest.fixture(scope="module")
def pipe(layered_repo):
    from diffsynth.qwen_image import QwenImagePipeline

    return QwenImagePipeline.from_pretrained(str(layered_repo), torch_dtype="float32", device="cpu")


@pytest.fixture
def small_area(monkeypatch):
    from diffsynth.qwen_image import layered
    from diffsynth.runtime.media import area_size

    monkeypatch.setattr(layered, "area_size", lambda w, h, area: area_size(w, h, SMALL_AREA))


def rgba_image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 4), dtype=np.uint8)
    return Image.fromarray(pixels, "RGBA")


def run(pipe, **kwargs):
    options = dict(layer_num=2, num_inference_steps=2, progress_bar=False, seed=0)
    return pipe(PROMPT, layer_input_image=rgba_image(32, 16), **{**options, **kwargs})


# ------------------------------------------------------------------ loading, outputs
def test_layered_repo_loads_the_layered_dit_and_the_rgba_vae(pipe):
    assert pipe.dit.config.use_layer3d_rope and pipe.dit.config.use_additional_t_cond
    assert pipe.vae.config.in_channels == 4


def test_returns_layer_num_rgba_layers_per_prompt(pipe, small_area, one_thread):
    layers = run(pipe, height=32, width=48)
    assert len(layers) == 2 and all(im.mode == "RGBA" and im.size == (48, 32) for im in layers)
    batch = pipe([PROMPT, "a yellow triangle on a black background"], layer_input_image=rgba_image(32, 16),
                 layer_num=1, num_inference_steps=1, output_type="np", progress_bar=False)  # fmt: skip
    assert batch.shape == (2, 1, 32, 96, 4) and batch.min() >= 0 and batch.max() <= 1  # 2:1 at the small area


def test_same_seed_same_layers_and_explicit_noise(pipe, one_thread):
    noise = torch.randn((1, 3, 16, 2, 4), generator=torch.Generator().manual_seed(0))
    first = run(pipe, height=16, width=32, output_type="pt")
    again = run(pipe, height=16, width=32, output_type="pt", latents=noise)
    assert first.shape == (1, 2, 4, 16, 32)
    torch.testing.assert_close(first, again)  # seed 0 draws exactly this noise on the CPU
    with pytest.raises(ConfigError, match=r"\(1, 3, 16, 2, 4\)"):
        run(pipe, height=16, width=32, latents=noise[:, :2])


def test_layered_schedule_is_the_linear_shift_of_sqrt_tokens():
    from diffsynth.qwen_image.layered import layered_sigmas

    sigmas = layered_sigmas(4, 1600)  # 640 x 640: 40 x 40 tokens, shift 2.5
    grid = torch.tensor([1.0, 0.75, 0.5, 0.25], dtype=torch.float64)
    expected = 2.5 * grid / (1 + 1.5 * grid)
    torch.testing.assert_close(sigmas, torch.cat([expected, torch.zeros(1, dtype=torch.float64)]).float())
    assert math.isclose(float(layered_sigmas(2, 1024, mu=3.0)[1]), 3.0 * 0.5 / (1 + 2.0 * 0.5), rel_tol=1e-6)


def test_layered_size_follows_the_resolution_bucket():
    from diffsynth.qwen_image.layered import layered_size

    assert layered_size(1920, 1080, 640) == (864, 480)
    assert layered_size(1000, 1000, 1024) == (1024, 1024)
    with pytest.raises(ConfigError, match="640"):
        layered_size(100, 100, 512)


# ------------------------------------------------------------------ refusals
def test_an_empty_prompt_asks_for_a_caption(pipe):
    with pytest.raises(ConfigError, match="caption"):
        pipe("", layer_input_image=rgba_image(32, 16))
    with pytest.raises(ConfigError, match="lm_head"):
        pipe(" ", layer_input_image=rgba_image(32, 16))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"edit_image": rgba_image(16, 16)}, "edit_image cannot be combined"),
        ({"input_image": rgba_image(16, 16)}, "input_image cannot be combined"),
        ({"denoising_strength": 0.5}, "denoising_strength"),
        ({"layer_num": -1}, "layer_num"),
        ({"layer_num": 1.5}, "layer_num"),
        ({"layer_resolution": 512}, "640"),
        ({"height": 32}, "together"),
        ({"height": 32, "width": 32, "layer_resolution": 640}, "not both"),
        ({"cfg_normalize": "yes"}, "cfg_normalize"),
        ({"sigma_template": "lightning"}, "qwen_image_layered"),
        ({"layer_input_image": [rgba_image(16, 16)] * 2}, "2 images for 1 prompts"),
    ],
)
def test_inputs_of_other_modes_and_bad_values_are_refused(pipe, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        pipe(PROMPT, **{"layer_input_image": rgba_image(32, 16), "num_inference_steps": 1, **kwargs})


def test_the_layered_dit_needs_an_image_and_other_dits_refuse_one(pipe, tiny_repo):
    from diffsynth.qwen_image import QwenImagePipeline

    with pytest.raises(ConfigError, match="layer_input_image"):
        pipe(PROMPT)
    plain = QwenImagePipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu")
    with pytest.raises(ConfigError, match="Qwen-Image-Layered DiT"):
        plain(PROMPT, layer_input_image=rgba_image(32, 16))
    for kwargs in ({"layer_num": 3}, {"cfg_normalize": True}):
        with pytest.raises(ConfigError, match="Qwen-Image-Layered"):
            plain(PROMPT, **kwargs)


def test_the_layered_dit_refuses_a_three_channel_vae(layered_repo, tiny_repo, tmp_path):
    from diffsynth.qwen_image import QwenImagePipeline

    mixed = tmp_path / "mixed"
    shutil.copytree(layered_repo, mixed)
    shutil.rmtree(mixed / "vae")
    shutil.copytree(tiny_repo / "vae", mixed / "vae")
    pipe = QwenImagePipeline.from_pretrained(str(mixed), torch_dtype="float32", device="cpu")
    with pytest.raises(ConfigError, match="RGBA VAE"):
        pipe(PROMPT, layer_input_image=rgba_image(32, 16))


def test_preset_carries_the_authors_defaults():
    from diffsynth.qwen_image.presets import PRESETS

    preset = PRESETS["Qwen/Qwen-Image-Layered"]
    assert preset.defaults == {
        "num_inference_steps": 50,
        "cfg_scale": 4.0,
        "negative_prompt": " ",
        "layer_num": 4,
        "layer_resolution": 640,
        "cfg_normalize": True,
    }
    patterns = {f.origin_file_pattern for f in preset.files}
    assert {"transformer/*.safetensors*", "vae/diffusion_pytorch_model.safetensors"} <= patterns
    assert all(f.model_id == "Qwen/Qwen-Image-Layered" for f in preset.files)


# ------------------------------------------------------------------ parity with diffusers
@pytest.fixture(scope="module")
def reference(layered_repo, pipe):
    diffusers = pytest.importorskip("diffusers")
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    ref = diffusers.QwenImageLayeredPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(layered_repo / "scheduler"),
        vae=diffusers.AutoencoderKLQwenImage.from_pretrained(layered_repo / "vae"),
        text_encoder=Qwen2_5_VLForConditionalGeneration.from_pretrained(layered_repo / "text_encoder"),
        tokenizer=AutoTokenizer.from_pretrained(layered_repo / "tokenizer"),
        processor=pipe.processor,
        transformer=diffusers.QwenImageTransformer2DModel.from_pretrained(layered_repo / "transformer"),
    )
    ref.set_progress_bar_config(disable=True)
    return ref


@pytest.fixture
def small_reference_area(monkeypatch, small_area):
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_layered as module

    sizes = module.calculate_dimensions
    monkeypatch.setattr(module, "calculate_dimensions", lambda area, ratio: sizes(SMALL_AREA, ratio))


@pytest.mark.parity
@pytest.mark.parametrize(
    ("prompts", "cfg_scale", "normalize"),
    [([PROMPT], 4.0, True), ([PROMPT, "a yellow triangle on a black background"], 3.0, False)],
)
def test_layers_match_diffusers(
    pipe, reference, small_reference_area, one_thread, monkeypatch, prompts, cfg_scale, normalize
):
    """The decoded layers, and the denoised layer latents before decoding (the tiny VAE squeezes differences)."""
    image = rgba_image(56, 28, seed=3)  # 2:1 -> 96 x 32 pixels at the small area: 6 x 2 tokens a frame
    layers, batch = 2, len(prompts)
    noise = torch.randn((batch, layers + 1, 16, 4, 12), generator=torch.Generator().manual_seed(7))
    seen = {}

    def keep_latents(_pipe, _step, _t, tensors):
        seen["reference"] = tensors["latents"]
        return {}

    expected = reference(
        image=image,
        prompt=list(prompts),
        negative_prompt=["bad quality, blurry"] * batch,
        true_cfg_scale=cfg_scale,
        layers=layers,
        resolution=640,
        cfg_normalize=normalize,
        latents=reference._pack_latents(noise.clone(), batch, 16, 4, 12, layers + 1),
        num_inference_steps=3,
        output_type="np",
        callback_on_step_end=keep_latents,
    ).images
    decode = pipe.vae.decode

    def keep_and_decode(latents, **kwargs):
        seen["ours"] = latents
        return decode(latents, **kwargs)

    monkeypatch.setattr(pipe.vae, "decode", keep_and_decode)
    got = pipe(
        list(prompts),
        layer_input_image=image,
        negative_prompt="bad quality, blurry",
        cfg_scale=cfg_scale,
        layer_num=layers,
        layer_resolution=640,
        cfg_normalize=normalize,
        latents=noise.clone(),
        num_inference_steps=3,
        output_type="np",
        progress_bar=False,
    )
    unpacked = reference._unpack_latents(seen["reference"], 32, 96, layers, 8)  # [B, 16, frames, h, w]
    want_latents = unpacked[:, :, 1:].permute(0, 2, 1, 3, 4).reshape(batch * layers, 16, 1, 4, 12)
    assert (seen["ours"] - want_latents).abs().max() <= 1e-5
    # diffusers cuts its flat list of B * layers images into chunks of layers + 1 (the frame count before the
    # whole-image frame is dropped), so for several prompts its per-prompt lists are shifted: compare flat
    want = np.concatenate(expected)
    assert got.shape == (batch, layers, 32, 96, 4) and want.shape == (batch * layers, 32, 96, 4)
    assert np.abs(got.reshape(want.shape) - want).max() <= 1e-4


def test_cli_writes_one_picture_per_layer(layered_repo, pipe, small_area, tmp_path, one_thread):
    """`--layer-input-image` / `--layer-num`: `out.png` becomes `out_0.png`, `out_1.png`, the Python API's layers."""
    from diffsynth.runtime.cli import main

    rgba_image(32, 16).save(tmp_path / "poster.png")
    args = ["generate", "--model", str(layered_repo), "--prompt", PROMPT, "--output", str(tmp_path / "out.png")]
    args += ["--layer-input-image", str(tmp_path / "poster.png"), "--layer-num", "2", "--steps", "2", "--seed", "0"]
    assert main([*args, "--height", "32", "--width", "48", "--device", "cpu", "--dtype", "float32"]) == 0
    layers = pipe(PROMPT, layer_input_image=str(tmp_path / "poster.png"), layer_num=2, num_inference_steps=2,
                  seed=0, height=32, width=48, progress_bar=False)  # fmt: skip
    for i, layer in enumerate(layers):
        with Image.open(tmp_path / f"out_{i}.png") as written:
            assert written.mode == "RGBA" and np.array_equal(np.asarray(written), np.asarray(layer))
    assert not (tmp_path / "out.png").exists() and not (tmp_path / "out_2.png").exists()
