"""Editing against diffusers' QwenImageEditPlusPipeline (Edit-2509/2511) on the tiny repo, fp32 CPU.

diffusers resizes edit images to 1024x1024 pixels (384x384 for the vision tower); both pipelines read
those areas from module constants, which the tests shrink so a tiny VAE runs in seconds. transformers'
`Qwen2_5_VLProcessor` needs torchvision for its video half, so both pipelines get our
`VisionPromptProcessor` (its token expansion is checked in test_pipeline.py).
"""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")

pytestmark = pytest.mark.parity


@pytest.fixture
def small_areas(monkeypatch):
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as reference

    from diffsynth.qwen_image import pipeline as ours

    for module, vae, vision in (
        (reference, "VAE_IMAGE_SIZE", "CONDITION_IMAGE_SIZE"),
        (ours, "EDIT_AREA", "CONDITION_AREA"),
    ):
        monkeypatch.setattr(module, vae, 64 * 64)
        monkeypatch.setattr(module, vision, 56 * 56)


def _repo(tiny_repo, tmp_path, zero_cond_t: bool):
    if not zero_cond_t:
        return tiny_repo
    repo = tmp_path / "zero-cond"
    shutil.copytree(tiny_repo, repo)
    config = json.loads((repo / "transformer" / "config.json").read_text())
    (repo / "transformer" / "config.json").write_text(json.dumps(dict(config, zero_cond_t=True)))
    return repo


@pytest.mark.parametrize("zero_cond_t", [False, True])
def test_edit_matches_diffusers_edit_plus(tiny_repo, tmp_path, small_areas, zero_cond_t):
    import diffusers
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from diffsynth.qwen_image import QwenImagePipeline

    repo = _repo(tiny_repo, tmp_path, zero_cond_t)
    ours = QwenImagePipeline.from_pretrained(str(repo), torch_dtype="float32", device="cpu")
    assert ours.dit.config.zero_cond_t is zero_cond_t
    ref = diffusers.QwenImageEditPlusPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(repo / "scheduler"),
        vae=diffusers.AutoencoderKLQwenImage.from_pretrained(repo / "vae"),
        text_encoder=Qwen2_5_VLForConditionalGeneration.from_pretrained(repo / "text_encoder"),
        tokenizer=AutoTokenizer.from_pretrained(repo / "tokenizer"),
        processor=ours.processor,
        transformer=diffusers.QwenImageTransformer2DModel.from_pretrained(repo / "transformer"),
    )
    ref.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 255, (64, 48, 3), dtype=np.uint8)),
    ]
    noise = torch.randn((1, 16, 8, 8), generator=torch.Generator().manual_seed(11))
    expected = ref(
        image=images,
        prompt="make it red",
        negative_prompt=" ",
        true_cfg_scale=4.0,
        num_inference_steps=2,
        height=64,
        width=64,
        latents=ref._pack_latents(noise.clone(), 1, 16, 8, 8),
        output_type="np",
    ).images
    got = ours(
        "make it red",
        negative_prompt=" ",
        edit_image=images,
        cfg_scale=4.0,
        num_inference_steps=2,
        height=64,
        width=64,
        latents=noise.clone(),
        output_type="np",
        progress_bar=False,
    )
    assert got.shape == expected.shape == (1, 64, 64, 3)
    assert np.abs(got - expected).max() <= 1e-4


def _first_edit_outputs(repo, monkeypatch, defaults=None, **call):
    """Our pipeline loaded from `repo` (its `defaults` updated) and diffusers' QwenImageEditPipeline, on one image."""
    import diffusers
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as reference
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from diffsynth.qwen_image import QwenImagePipeline
    from diffsynth.qwen_image import pipeline as module

    sizes = reference.calculate_dimensions
    monkeypatch.setattr(reference, "calculate_dimensions", lambda area, ratio: sizes(64 * 64, ratio))
    monkeypatch.setattr(module, "EDIT_AREA", 64 * 64)
    ours = QwenImagePipeline.from_pretrained(str(repo), torch_dtype="float32", device="cpu")
    ours.defaults.update(defaults or {})
    ref = diffusers.QwenImageEditPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(repo / "scheduler"),
        vae=diffusers.AutoencoderKLQwenImage.from_pretrained(repo / "vae"),
        text_encoder=Qwen2_5_VLForConditionalGeneration.from_pretrained(repo / "text_encoder"),
        tokenizer=AutoTokenizer.from_pretrained(repo / "tokenizer"),
        processor=ours.processor,
        transformer=diffusers.QwenImageTransformer2DModel.from_pretrained(repo / "transformer"),
    )
    ref.set_progress_bar_config(disable=True)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 56, 3), dtype=np.uint8))
    noise = torch.randn((1, 16, 8, 8), generator=torch.Generator().manual_seed(5))
    common = dict(negative_prompt=" ", num_inference_steps=2, height=64, width=64, output_type="np")
    expected = ref(
        image=image,
        prompt="make it red",
        true_cfg_scale=4.0,
        latents=ref._pack_latents(noise.clone(), 1, 16, 8, 8),
        **common,
    ).images
    got = ours(
        "make it red", edit_image=image, cfg_scale=4.0, latents=noise.clone(), progress_bar=False, **common, **call
    )
    assert got.shape == expected.shape == (1, 64, 64, 3)
    return got, expected


def test_first_edit_matches_diffusers_edit(tiny_repo, monkeypatch):
    """Qwen-Image-Edit (one image, unnumbered template, the vision tower sees the VAE-sized image)."""
    got, expected = _first_edit_outputs(tiny_repo, monkeypatch, {"edit_template": "edit"})
    assert np.abs(got - expected).max() <= 1e-4
    got, expected = _first_edit_outputs(tiny_repo, monkeypatch, edit_template="edit")  # the call's keyword
    assert np.abs(got - expected).max() <= 1e-6


def test_first_edit_folder_takes_its_template_from_model_index(tiny_repo, tmp_path, monkeypatch):
    """A local snapshot of Qwen/Qwen-Image-Edit (model_index.json: QwenImageEditPipeline) matches no preset, yet
    edits with the first Edit's template; without that file it was Edit-2509's (about 1e-3 off diffusers)."""
    repo = tmp_path / "Qwen-Image-Edit"
    shutil.copytree(tiny_repo, repo)
    (repo / "model_index.json").write_text(json.dumps({"_class_name": "QwenImageEditPipeline"}))
    got, expected = _first_edit_outputs(repo, monkeypatch)
    assert np.abs(got - expected).max() <= 1e-6
