"""Step1X-Edit's source picture is pixel-aligned with its target (`aligned_conditioning`): the trainer's dataset
reads it as it reads the target, so at a fixed training size an identity pair (source == target, not square)
reaches the model as the target, not squeezed (`integration`: it needs diffsynth-training)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffsynth.flux.pipeline import pack_latents
from diffsynth.flux.step1x_training import REFERENCE_COLUMNS, Step1XTrainingTask
from diffsynth.runtime.hub import ModelConfig

data = pytest.importorskip("diffsynth.training.data")
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def task(step1x_base):
    repo, qwen = step1x_base / "stepfun-ai" / "Step1X-Edit", step1x_base / "Qwen" / "Qwen2.5-VL-7B-Instruct"
    configs = [ModelConfig(path=str(repo / n)) for n in ("step1x-edit-i1258.safetensors", "vae.safetensors")]
    configs.append(ModelConfig(path=str(qwen / "model-00001-of-00001.safetensors")))
    return Step1XTrainingTask.from_pretrained(
        configs, tokenizer_config=ModelConfig(path=str(qwen)), torch_dtype="float32", device="cpu"
    )


@pytest.mark.parametrize("column", REFERENCE_COLUMNS)
def test_an_identity_pair_reaches_the_model_as_its_target_at_a_fixed_size(task, tmp_path, column):
    pixels = np.zeros((32, 64, 3), np.uint8)
    pixels[..., 0] = np.linspace(0, 255, 64).astype(np.uint8)[None]
    pixels[..., 1] = 100
    Image.fromarray(pixels).save(tmp_path / "pic.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"image": "pic.png", "prompt": "keep it", column: "pic.png"}))
    assert Step1XTrainingTask.aligned_conditioning == REFERENCE_COLUMNS
    dataset = data.MetadataDataset(
        tmp_path, media=task.media, conditioning=task.conditioning, aligned=task.aligned_conditioning,
        max_pixels=64 * 64, step=16, fixed=(32, 32),
    )  # fmt: skip
    row = dataset[0]
    assert row[column].shape == row["image"].shape == (3, 32, 32)
    torch.testing.assert_close(row[column], row["image"], rtol=0, atol=0)
    sample = task.encode([row])[0]
    torch.testing.assert_close(sample["reference"], pack_latents(sample["latents"][None])[0], rtol=0, atol=1e-4)
