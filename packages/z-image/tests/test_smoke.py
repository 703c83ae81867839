"""Smoke test (also run by the isolation session): the family installs, loads a tiny repo and draws."""

import importlib

import numpy as np

import diffsynth.z_image
from diffsynth.z_image import ZImagePipeline


def test_family_is_discoverable():
    from diffsynth.runtime.registry import installed_families

    family = installed_families()["z_image"]
    assert "Tongyi-MAI/Z-Image-Turbo" in family.presets
    assert family.pipeline_class() is ZImagePipeline
    assert diffsynth.z_image.__doc__


def test_tiny_repo_generates_an_image(tiny_repo):
    pipe = ZImagePipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu")
    image = pipe(
        "a red circle on a blue background", height=64, width=64, num_inference_steps=2, seed=0, progress_bar=False
    )
    assert image.size == (64, 64)
    pixels = np.asarray(image)
    assert pixels.dtype == np.uint8 and pixels.std() > 0


def test_studio_import_changes_in_one_line():
    """DiffSynth-Studio's `from diffsynth.pipelines.z_image import ZImagePipeline, ModelConfig` becomes
    `from diffsynth.z_image import ZImagePipeline, ModelConfig`: the family re-exports the runtime's ModelConfig."""
    from diffsynth.runtime import ModelConfig

    family = importlib.import_module("diffsynth.z_image")
    assert family.ModelConfig is ModelConfig and "ModelConfig" in family.__all__
