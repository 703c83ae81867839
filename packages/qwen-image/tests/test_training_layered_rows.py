"""Qwen-Image rows as the trainer's dataset reads and checks them (`integration`: it needs diffsynth-training): a
Layered row's input image read as its frames are (`aligned_conditioning`), its `layer_num` and file sizes and an Edit
row's `edit_image` checked at setup (`check_row`), a Layered-Control-V2 validation sample's mask, and Edit rows with
edit images of several sizes trained in batches of 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffsynth.qwen_image import pipeline as pipeline_module
from diffsynth.qwen_image import training as qwen_training
from diffsynth.qwen_image.training import QwenImageTrainingTask
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.pipeline import configs_from_folder
from diffsynth.runtime.testing.modules import load_beside

L = load_beside(__file__, "test_layered_pipeline.py", "qwen_image_tests_layered_pipeline")
data = pytest.importorskip("diffsynth.training.data")
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def layered(tiny_repo, tmp_path_factory) -> QwenImageTrainingTask:
    repo = L.build_layered_repo(tiny_repo, tmp_path_factory.mktemp("layered-rows") / "Qwen-Image-Layered")
    configs, tokenizer = configs_from_folder(repo)
    return QwenImageTrainingTask.from_pretrained(configs, tokenizer_config=tokenizer, torch_dtype="float32")


@pytest.fixture(scope="module")
def edit(tiny_repo) -> QwenImageTrainingTask:
    configs, _ = configs_from_folder(tiny_repo)
    processor = ModelConfig(path=str(tiny_repo / "processor"))
    return QwenImageTrainingTask.from_pretrained(configs, tokenizer_config=processor, torch_dtype="float32")


def ramp(path, width: int, height: int) -> str:
    pixels = np.full((height, width, 4), 255, np.uint8)
    pixels[..., 0] = np.linspace(0, 255, width).astype(np.uint8)[None]
    pixels[..., 1] = np.linspace(0, 255, height).astype(np.uint8)[:, None]
    Image.fromarray(pixels, "RGBA").save(path)
    return path.name


def write_rows(folder, rows) -> None:
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def read(task, folder, **options):
    return data.MetadataDataset(
        folder, media=task.media, conditioning=task.conditioning, aligned=task.aligned_conditioning,
        check_row=task.check_row, image_mode=task.image_mode, step=16, **options,
    )  # fmt: skip


def layered_row(folder, k: int, size=(32, 32), **extra) -> dict:
    frames = [ramp(folder / f"r{k}_f{j}.png", *size) for j in range(3)]
    return {"prompt": f"a red circle {k}", "image": frames, "layer_input_image": frames[0], "layer_num": 2, **extra}


def test_a_layered_input_image_reaches_the_task_as_its_whole_image_at_a_fixed_size(layered, tmp_path):
    """The whole image and the input image are one 64x32 file; at a fixed 32x32 both are cropped alike, so the
    input image's latent is frame 0's."""
    write_rows(tmp_path, [layered_row(tmp_path, 0, (64, 32))])
    row = read(layered, tmp_path, fixed=(32, 32))[0]
    assert row["layer_input_image"].shape == row["image"][0].shape == (4, 32, 32)
    torch.testing.assert_close(row["layer_input_image"], row["image"][0], rtol=0, atol=0)
    sample = layered.encode([row])[0]
    torch.testing.assert_close(sample["condition"], sample["latents"][0], rtol=0, atol=1e-6)


def test_bad_layered_rows_are_named_at_setup(layered, tmp_path):
    rows = [layered_row(tmp_path, k) for k in range(3)]
    write_rows(tmp_path, [*rows[:2], {**rows[2], "layer_num": 3}])
    with pytest.raises(ConfigError, match=r"metadata.jsonl row 3 column layer_num: 3 but image lists 3 frames"):
        read(layered, tmp_path)
    big = ramp(tmp_path / "big.png", 48, 32)
    write_rows(tmp_path, [*rows[:2], {**rows[2], "image": [*rows[2]["image"][:2], big]}])
    with pytest.raises(ConfigError, match=r"metadata.jsonl row 3 column image: big.png is 48x32 where r2_f0.png"):
        read(layered, tmp_path)
    write_rows(tmp_path, [*rows[:2], {**rows[2], "layer_input_image": big}])
    with pytest.raises(ConfigError, match=r"row 3 column layer_input_image: big.png is 48x32"):
        read(layered, tmp_path)
    write_rows(tmp_path, [{**rows[0], "image": rows[0]["image"][:1], "layer_num": 0}, rows[1]])
    assert len(read(layered, tmp_path)) == 2  # Layered-Control: one frame


def test_an_edit_row_without_edit_images_is_named_at_setup(edit, tmp_path):
    rows = [
        {"image": ramp(tmp_path / f"i{k}.png", 32, 32), "prompt": f"p{k}", "edit_image": f"i{k}.png"} for k in range(3)
    ]
    write_rows(tmp_path, [*rows[:2], {**rows[2], "edit_image": ""}])
    with pytest.raises(ConfigError, match=r"metadata.jsonl row 3 column edit_image: empty; a Qwen-Image-Edit"):
        read(edit, tmp_path)
    with pytest.raises(ConfigError, match=r"has no edit_image: .*; the row has image, prompt$"):
        edit.encode([{"image": torch.zeros(3, 32, 32), "prompt": "p", "edit_image": ""}])


def test_a_layered_control_v2_validation_sample_takes_its_mask(layered, tmp_path):
    image, mask = L.rgba_image(32, 32), Image.new("L", (32, 32), 255)
    with pytest.raises(ConfigError, match="one input image.*layer_num=0"):
        layered.reference_arguments([image, mask])
    control = QwenImageTrainingTask(layered.pipe, layer_num=0)
    assert control.reference_arguments([image, mask]) == {
        "layer_input_image": image,
        "layer_num": 0,
        "context_image": mask,
    }
    assert control.reference_arguments([image]) == {"layer_input_image": image, "layer_num": 0}
    with pytest.raises(ConfigError, match="one input image"):
        control.reference_arguments([image, mask, mask])


def test_edit_rows_with_edit_images_of_two_sizes_train_in_batches_of_2(tiny_repo, tmp_path, monkeypatch):
    testing = pytest.importorskip("diffsynth.training.testing")
    monkeypatch.setattr(pipeline_module, "EDIT_AREA", 64 * 64)
    monkeypatch.setattr(pipeline_module, "CONDITION_AREA", 56 * 56)
    folder = tmp_path / "data"
    folder.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for k in range(8):
        for name, width in ((f"i{k}.png", 32), (f"e{k}.png", 32 if k < 4 else 64)):
            Image.fromarray(rng.integers(0, 256, (32, width, 3), dtype=np.uint8)).save(folder / name)
        rows.append({"image": f"i{k}.png", "prompt": f"make it red {k}", "edit_image": f"e{k}.png"})
    write_rows(folder, rows)
    seen = []
    encode = QwenImageTrainingTask.encode

    def spy(self, batch):
        seen.append({tuple(row["edit_image"].shape) for row in batch})
        return encode(self, batch)

    monkeypatch.setattr(qwen_training.QwenImageTrainingTask, "encode", spy)
    losses = testing.train_with_cli(
        tiny_repo, "qwen_image", folder, tmp_path / "out", "--tokenizer_path", str(tiny_repo / "processor"),
        "--batch_size", "2", "--max_steps", "4", "--max_pixels", "4096",
    )  # fmt: skip
    assert len(losses) == 4 and all(np.isfinite(losses))
    assert len(seen) == 4 and all(len(shapes) == 1 for shapes in seen)
