"""`QwenImage21Pipeline` end to end on a tiny random repo in the hub's diffusers layout, against diffusers'
`QwenImage21Pipeline` built from the same folders; preset loading, schedule files and the CLI, offline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffsynth.qwen_image.qwen_image21.pipeline import QwenImage21Pipeline
from diffsynth.qwen_image.qwen_image21.schedule import ScheduleSettings
from diffsynth.runtime.cli import main
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.testing.modules import load_beside

R = load_beside(__file__, "qwen_image21_repo.py", "qwen_image21_repo")
fx, LATENT, SCHEDULER = R.fx, R.LATENT, R.SCHEDULER


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return R.build_repo(tmp_path_factory.mktemp("tiny-qwen-image-21"))


@pytest.fixture(scope="module")
def pipe(repo) -> QwenImage21Pipeline:
    return QwenImage21Pipeline.from_pretrained(str(repo), torch_dtype=torch.float32, device="cpu")


def reference(repo: Path):
    """diffusers' pipeline from the same folders (its processor without the video half, see the fixtures)."""
    from diffusers import (
        AutoencoderKLQwenImage21,
        FlowMatchEulerDiscreteScheduler,
        QwenImage21Pipeline,
        QwenImage21Transformer2DModel,
    )

    return QwenImage21Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(str(repo / "scheduler")),
        vae=AutoencoderKLQwenImage21.from_pretrained(str(repo / "vae")),
        text_encoder=fx.reference_encoder(repo / "text_encoder"),
        processor=fx.reference_processor(repo / "processor"),
        transformer=QwenImage21Transformer2DModel.from_pretrained(str(repo / "transformer")),
    )


def noise(batch: int, height: int, width: int, seed: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, LATENT, height // 16, width // 16, generator=g)


def condition_images() -> list[Image.Image]:
    rng = np.random.default_rng(7)
    rgba = rng.integers(0, 256, (40, 72, 4), dtype=np.uint8)
    rgba[..., 3] = np.where(rng.random((40, 72)) < 0.3, 0, 255)  # some transparent pixels
    rgb = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    return [Image.fromarray(rgba, "RGBA"), Image.fromarray(rgb, "RGB")]


@pytest.mark.parity
@pytest.mark.parametrize("use_kv_cache", [True, False])
def test_text_to_image_matches_diffusers(repo, pipe, use_kv_cache, one_thread):
    """Two prompts of different lengths (a padded batch), the model's shifted schedule, 3 steps."""
    prompts = ["a red fox in the snow", "an owl"]
    x = noise(2, 64, 96)
    ours = pipe(prompts, height=64, width=96, num_inference_steps=3, latents=x, use_kv_cache=use_kv_cache,
                output_type="pt", progress_bar=False)  # fmt: skip
    packed = x.flatten(2).transpose(1, 2)
    theirs = reference(repo)(prompts, height=64, width=96, num_inference_steps=3, latents=packed,
                             use_kv_cache=use_kv_cache, output_type="pt").images  # fmt: skip
    assert ours.shape == (2, 4, 64, 96)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-5)


@pytest.mark.parity
def test_editing_with_two_condition_images_and_cfg_matches_diffusers(repo, pipe, one_thread):
    """An RGBA and an RGB condition image (sizes from `output_resolution`, output from the last one), true CFG with
    a negative prompt, the prefix cache on."""
    images = condition_images()
    common = dict(num_inference_steps=2, output_resolution=64)
    x = noise(1, 64, 64)
    ours = pipe("put the fox in the scene", negative_prompt="blurry", cfg_scale=2.5, edit_image=images,
                latents=x, output_type="pt", progress_bar=False, **common)  # fmt: skip
    theirs = reference(repo)("put the fox in the scene", negative_prompt="blurry", true_cfg_scale=2.5, image=images,
                             latents=x.flatten(2).transpose(1, 2), output_type="pt", **common).images  # fmt: skip
    assert ours.shape == (1, 4, 64, 64)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-5)


def test_cache_and_condition_order_change_what_they_should(pipe, one_thread):
    """The prefix cache changes nothing but rounding; the order of the condition images is read."""
    images = condition_images()
    common = dict(num_inference_steps=2, output_resolution=64, seed=1, output_type="pt", progress_bar=False)
    cached = pipe("a fox", edit_image=images, **common)
    uncached = pipe("a fox", edit_image=images, use_kv_cache=False, **common)
    torch.testing.assert_close(cached, uncached, rtol=0, atol=1e-5)
    swapped = pipe("a fox", edit_image=images[::-1], height=64, width=64, **common)
    assert (swapped - cached).abs().max() > 1e-3


def test_pil_output_is_rgba_and_sizes_follow_the_last_condition_image(pipe, one_thread):
    images = condition_images()
    out = pipe("a fox", edit_image=images[0], output_resolution=64, num_inference_steps=1, seed=0, progress_bar=False)
    assert out.mode == "RGBA" and out.size == (96, 32)  # 72x40 at about 64^2 pixels, in multiples of 32
    square = pipe("a fox", num_inference_steps=1, output_resolution=64, seed=0, progress_bar=False)
    assert square.size == (64, 64)
    # prompts of different lengths share a condition image: the template puts it before the words
    batch = pipe(["a fox", "a fox in the snow at night"], edit_image=images[1], output_resolution=64,
                 num_inference_steps=1, seed=0, progress_bar=False)  # fmt: skip
    assert [image.size for image in batch] == [(64, 64), (64, 64)]


def test_bad_inputs_are_named(pipe):
    with pytest.raises(ConfigError, match="edit_image is an empty list"):
        pipe("a fox", edit_image=[], num_inference_steps=1)
    with pytest.raises(ConfigError, match=r"edit_image\[0\] is a list"):
        pipe("a fox", edit_image=[[condition_images()[0]]], num_inference_steps=1)
    with pytest.raises(ConfigError, match="output_resolution=16"):
        pipe("a fox", output_resolution=16)
    with pytest.raises(ConfigError, match=r"latents must be a tensor of shape \(1, 4, 4, 4\)"):
        pipe("a fox", height=64, width=64, latents=torch.zeros(1, 8, 2, 2), num_inference_steps=1)
    with pytest.raises(ConfigError, match="gave the condition images 16 vision slots.*need 1024"):  # 1024^2 pixels
        pipe("a fox", edit_image=condition_images()[1], output_resolution=1024, num_inference_steps=1)
    with pytest.raises(ConfigError, match="use_kv_cache='no' is not accepted; use True or False"):
        pipe("a fox", use_kv_cache="no", num_inference_steps=1)  # a non-empty string would turn the cache on


def test_preset_loads_offline_with_the_schedule_beside_the_processor(repo, tmp_path, monkeypatch, one_thread):
    """`from_pretrained("Qwen/Qwen-Image-2.1-Turbo")` from the model base path: its `sample_sigmas` fix the steps."""
    base = tmp_path / "models"
    folder = base / "Qwen" / "Qwen-Image-2.1-Turbo"
    shutil.copytree(repo, folder)
    levels = [1.0, 0.9, 0.6]
    (folder / "model_index.json").write_text(json.dumps({"sample_sigmas": levels}))
    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(base))
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "1")
    turbo = QwenImage21Pipeline.from_pretrained("Qwen/Qwen-Image-2.1-Turbo", torch_dtype="float32", device="cpu")
    assert turbo.schedule == ScheduleSettings.from_configs(SCHEDULER, {"sample_sigmas": levels})
    steps = []
    turbo.dit.register_forward_pre_hook(lambda module, args: steps.append(float(args[1][0])))
    turbo("a fox", height=64, width=64, seed=0, progress_bar=False)
    expected = turbo.schedule.sigmas(3, 16)[:-1].tolist()
    assert steps == pytest.approx(expected, abs=1e-6)


def test_cli_edit_image_writes_the_python_api_image(repo, tmp_path, one_thread):
    """`--edit-image` through the CLI; the folder's `diffsynth.json` sets `output_resolution` (defaults, as presets)."""
    images = condition_images()
    images[1].save(tmp_path / "scene.png")
    folder = tmp_path / "model"
    shutil.copytree(repo, folder)
    (folder / "diffsynth.json").write_text(json.dumps({"defaults": {"output_resolution": 96}}))
    out = tmp_path / "out.png"
    args = ["generate", "--model", str(folder), "--prompt", "a fox", "--edit-image", str(tmp_path / "scene.png")]
    args += ["--steps", "2", "--seed", "4", "--device", "cpu", "--dtype", "float32", "--output", str(out)]
    assert main(args) == 0
    pipe = QwenImage21Pipeline.from_pretrained(str(folder), torch_dtype=torch.float32, device="cpu")
    assert pipe.defaults["output_resolution"] == 96
    image = pipe("a fox", edit_image=str(tmp_path / "scene.png"), num_inference_steps=2, seed=4, progress_bar=False)
    with Image.open(out) as written:
        assert written.mode == "RGBA" and np.array_equal(np.asarray(written), np.asarray(image))


def test_vram_managed_pipeline_gives_the_same_image(repo, pipe, one_thread):
    """Every model streamed block by block (`vram_limit=0`) draws the unmanaged pipeline's image."""
    managed = QwenImage21Pipeline.from_pretrained(str(repo), torch_dtype=torch.float32, device="cpu", vram_limit=0)
    common = dict(edit_image=condition_images()[1], output_resolution=64, num_inference_steps=2, seed=2,
                  output_type="pt", progress_bar=False)  # fmt: skip
    torch.testing.assert_close(managed("a fox", **common), pipe("a fox", **common), rtol=0, atol=1e-6)


@pytest.mark.parity
def test_lora_matches_diffusers(repo, random_lora, one_thread):
    """A LoRA on every Linear of the DiT (diffusers/peft file layout): ours fused, diffusers' `load_lora_weights`."""
    pytest.importorskip("peft")
    ours = QwenImage21Pipeline.from_pretrained(str(repo), torch_dtype=torch.float32, device="cpu")
    theirs = reference(repo)
    state = random_lora(theirs.transformer, "peft", seed=3)
    ours.load_lora(state, scale=0.7)
    theirs.load_lora_weights(dict(state), adapter_name="test")
    theirs.set_adapters(["test"], adapter_weights=[0.7])
    x = noise(1, 64, 64)
    got = ours("a fox", height=64, width=64, num_inference_steps=2, latents=x, output_type="pt", progress_bar=False)
    want = theirs("a fox", height=64, width=64, num_inference_steps=2, latents=x.flatten(2).transpose(1, 2),
                  output_type="pt").images  # fmt: skip
    plain = QwenImage21Pipeline.from_pretrained(str(repo), torch_dtype=torch.float32, device="cpu")
    base = plain("a fox", height=64, width=64, num_inference_steps=2, latents=x, output_type="pt", progress_bar=False)
    assert (got - base).abs().max() > 1e-3  # the LoRA changes the picture
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
