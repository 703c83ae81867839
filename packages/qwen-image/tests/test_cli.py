"""`diffsynth generate` with a local Qwen-Image folder and through the preset name, offline."""

import shutil

import numpy as np
from PIL import Image

from diffsynth.qwen_image import QwenImagePipeline
from diffsynth.runtime.cli import main

FAST = ["--height", "32", "--width", "32", "--steps", "2", "--device", "cpu", "--dtype", "float32"]


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_generate_from_a_folder_matches_the_python_api(tiny_repo, tmp_path):
    out = tmp_path / "cli.png"
    args = ["generate", "--model", str(tiny_repo), "--prompt", "a red circle", "--seed", "3", "--output", str(out)]
    assert main([*args, *FAST]) == 0
    pipe = QwenImagePipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu")
    image = pipe("a red circle", seed=3, height=32, width=32, num_inference_steps=2, progress_bar=False)
    assert np.array_equal(pixels(out), np.asarray(image))


def test_preset_name_resolves_offline_from_the_model_base_path(tiny_repo, tmp_path, monkeypatch):
    """`--model Qwen/Qwen-Image` through the preset: files found under DIFFSYNTH_MODEL_BASE_PATH."""
    base = tmp_path / "models"
    shutil.copytree(tiny_repo, base / "Qwen" / "Qwen-Image")
    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(base))
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "1")
    out = tmp_path / "qwen.png"
    args = ["generate", "--model", "Qwen/Qwen-Image", "--prompt", "a red circle", "--output", str(out)]
    assert main([*args, *FAST]) == 0
    assert pixels(out).shape == (32, 32, 3)
