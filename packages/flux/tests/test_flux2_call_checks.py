"""`Flux2ImagePipeline.__call__` argument handling on tiny klein repos: a step-distilled model ignores cfg_scale
(with a warning, as diffusers' `Flux2KleinPipeline` does), `denoising_strength` without `input_image` and
`embedded_guidance` on a DiT without guidance embedder are refused, and inpainting survives a schedule that
reaches 0 before its end."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from diffsynth_flux2_test_repo import CAPTIONS, build_tiny_dev_repo, our_pipeline
from diffsynth_flux_test_helpers import max_abs, random_image
from PIL import Image

from diffsynth.flux.flux2.formats import released_as_distilled
from diffsynth.runtime.errors import ConfigError

H = W = 64
STEPS = 3
LOGGER = "diffsynth.flux.flux2.pipeline"


@pytest.fixture(scope="module")
def distilled_pipe(tiny_klein_repo, tmp_path_factory):
    """The tiny klein repo as klein-4B/9B ship it: `model_index.json` says `"is_distilled": true`."""
    root = tmp_path_factory.mktemp("tiny-flux2-klein-distilled") / "repo"
    shutil.copytree(tiny_klein_repo, root)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "Flux2KleinPipeline", "is_distilled": True}))
    return our_pipeline(root)


@pytest.fixture(scope="module")
def tiny_dev_pipe(tmp_path_factory):
    """A tiny FLUX.2-dev: its DiT embeds the distilled guidance."""
    return our_pipeline(build_tiny_dev_repo(tmp_path_factory.mktemp("tiny-flux2-dev") / "repo"))


def noise(seed: int = 5) -> torch.Tensor:
    return torch.randn(1, 16, H // 16, W // 16, generator=torch.Generator().manual_seed(seed))


def ours(pipe, **kwargs) -> np.ndarray:
    kwargs = {"height": H, "width": W, "num_inference_steps": STEPS, "progress_bar": False, **kwargs}
    return pipe(CAPTIONS[0], latents=noise(), output_type="np", **kwargs)


def test_step_distilled_klein_ignores_cfg_with_a_warning(distilled_pipe, one_thread, caplog):
    assert distilled_pipe.step_distilled
    plain = ours(distilled_pipe)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        guided = ours(distilled_pipe, cfg_scale=4.0)
    assert max_abs(plain, guided) == 0
    assert any("cfg_scale=4.0 is ignored for step-distilled" in r.getMessage() for r in caplog.records)


def test_base_klein_still_runs_cfg(tiny_klein_pipe, one_thread, caplog):
    assert not tiny_klein_pipe.step_distilled
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        guided = ours(tiny_klein_pipe, cfg_scale=4.0)
    assert max_abs(ours(tiny_klein_pipe), guided) > 1e-3
    assert not any("is ignored" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("repo", "distilled"),
    [
        ("black-forest-labs/FLUX.2-klein-4B", True),
        ("black-forest-labs/FLUX.2-klein-9B", True),
        ("black-forest-labs/FLUX.2-klein-9b-kv", True),
        ("black-forest-labs/FLUX.2-klein-base-4B", False),
        ("black-forest-labs/FLUX.2-klein-base-9B", False),
    ],
)
def test_presets_mark_the_step_distilled_repos(repo, distilled, tiny_klein_repo, tmp_path, monkeypatch):
    """The hub layout the presets fetch has no `model_index.json`: the repo id tells."""
    from diffsynth.flux.flux2.pipeline import Flux2ImagePipeline

    base = tmp_path / "models"
    shutil.copytree(tiny_klein_repo, base / repo)
    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(base))
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "1")
    pipe = Flux2ImagePipeline.from_pretrained(repo, device="cpu", torch_dtype=torch.float32)
    assert pipe.step_distilled is distilled


@pytest.mark.parametrize(
    ("index", "distilled"),
    [
        ({"_class_name": "Flux2KleinPipeline", "is_distilled": True}, True),
        ({"_class_name": "Flux2KleinPipeline", "is_distilled": False}, False),
        ({"_class_name": "Flux2KleinPipeline"}, False),  # diffusers' default
        ({"_class_name": "Flux2KleinKVPipeline"}, True),  # the KV pipeline's default
        ({"_class_name": "Flux2KleinKVPipeline", "is_distilled": False}, False),
    ],
)
def test_is_distilled_is_read_from_model_index(index, distilled, tmp_path):
    (tmp_path / "transformer").mkdir()
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    assert released_as_distilled(None, [str(tmp_path / "transformer" / "model.safetensors")]) is distilled
    assert not released_as_distilled(None, [str(tmp_path / "elsewhere" / "deeper" / "model.safetensors")])


@pytest.mark.parametrize("strength", [0.3, -7])
def test_denoising_strength_without_input_image_is_refused(tiny_klein_pipe, strength):
    with pytest.raises(ConfigError, match=rf"denoising_strength={strength}.*input_image"):
        ours(tiny_klein_pipe, denoising_strength=strength)


def test_invalid_denoising_strength_with_input_image_is_refused(tiny_klein_pipe):
    with pytest.raises(ConfigError, match="denoising_strength=-7"):
        ours(tiny_klein_pipe, input_image=random_image(W, H, seed=9), denoising_strength=-7)


def test_embedded_guidance_on_klein_is_refused(tiny_klein_pipe):
    assert not tiny_klein_pipe.dit.config.guidance_embed
    with pytest.raises(ConfigError, match=r"embedded_guidance=9.0.*no guidance embedder.*cfg_scale"):
        ours(tiny_klein_pipe, embedded_guidance=9.0)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), True, "4"])
def test_non_finite_cfg_scale_is_refused_by_name(tiny_klein_pipe, value):
    """NaN or infinite guidance made every prediction NaN: a black image and no error."""
    with pytest.raises(ConfigError, match=rf"cfg_scale={value!r} must be a finite number"):
        ours(tiny_klein_pipe, cfg_scale=value)


@pytest.mark.parametrize("value", [float("nan"), float("-inf")])
def test_non_finite_embedded_guidance_on_dev_is_refused_by_name(tiny_dev_pipe, value):
    assert tiny_dev_pipe.dit.config.guidance_embed
    with pytest.raises(ConfigError, match=rf"embedded_guidance={value!r} must be a finite number"):
        ours(tiny_dev_pipe, embedded_guidance=value)


@pytest.mark.parametrize("sigmas", [[1.0, 0.5, 0.0, 0.0], [1.0, 0.5, 0.0]])
def test_inpainting_with_a_schedule_reaching_zero_early_is_finite(tiny_klein_pipe, sigmas, one_thread):
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[:, : W // 2] = 255
    decoded = []
    decode = tiny_klein_pipe.vae.decode

    def keep(x, **kwargs):
        decoded.append(x.clone())
        return decode(x, **kwargs)

    tiny_klein_pipe.vae.decode = keep
    try:
        out = ours(
            tiny_klein_pipe, input_image=random_image(W, H, seed=9), inpaint_mask=Image.fromarray(mask), sigmas=sigmas
        )
    finally:
        del tiny_klein_pipe.vae.decode
    assert torch.isfinite(decoded[0]).all()
    assert np.isfinite(out).all()


def image_to_image(pipe, source, **kwargs) -> torch.Tensor:
    """One step of image-to-image from `source`, sizes left to the pipeline unless given."""
    options = {"denoising_strength": 0.5, "num_inference_steps": 1, "progress_bar": False, "seed": 0, **kwargs}
    return pipe(CAPTIONS[0], input_image=source, output_type="pt", **options)


def test_image_to_image_without_a_size_takes_the_input_image_size(tiny_klein_pipe, one_thread):
    """As diffusers' Flux2KleinInpaintPipeline: not the 1024x1024 default, which stretched the input."""
    source = random_image(96, 64, seed=3)
    assert image_to_image(tiny_klein_pipe, source).shape[-2:] == (64, 96)
    assert image_to_image(tiny_klein_pipe, source, height=48).shape[-2:] == (48, 96)
    mask = Image.new("L", source.size, 255)
    assert image_to_image(tiny_klein_pipe, source, inpaint_mask=mask, width=64).shape[-2:] == (64, 64)
    # the input image decides ahead of a reference image
    out = image_to_image(tiny_klein_pipe, source, edit_image=random_image(64, 64, seed=4))
    assert out.shape[-2:] == (64, 96)


def test_the_input_image_size_is_capped_and_cut_as_a_reference_is(tiny_klein_pipe, caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert tiny_klein_pipe.output_size(None, None, [Image.new("RGB", (2048, 1024))], []) == (720, 1440)
        assert tiny_klein_pipe.output_size(None, None, [Image.new("RGB", (100, 70))], []) == (64, 96)
    assert "input_image 100x70 used at 96x64" in caplog.text
    assert tiny_klein_pipe.output_size(80, 48, [Image.new("RGB", (100, 70))], []) == (80, 48)
    with pytest.raises(ConfigError, match="input_image, 10x40"):
        tiny_klein_pipe.output_size(None, None, [Image.new("RGB", (10, 40))], [])


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(edit_image=[random_image(W, H, seed=1), None]), r"edit_image\[1\] must be a file path"),
        (dict(edit_image=[random_image(W, H, seed=1), np.zeros((H, W, 3), np.uint8)]), r"edit_image\[1\] .*ndarray"),
        (dict(input_image=np.zeros((H, W, 3), np.uint8), denoising_strength=0.5), r"input_image must be a file"),
        (dict(input_image=[random_image(W, H, seed=1), None], denoising_strength=0.5), r"input_image\[1\] must"),
    ],
)
def test_bad_items_in_image_arguments_are_named(tiny_klein_pipe, kwargs, name):
    with pytest.raises(ConfigError, match=name):
        ours(tiny_klein_pipe, **kwargs)
