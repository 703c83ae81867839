"""Qwen-Image-Layered through the Qwen-Image training task: its encodings and model call are what
`QwenImagePipeline.decompose` feeds the DiT, rows are checked, and the trainer (`diffsynth-train --family
qwen_image`) trains a LoRA on a tiny RGBA layered dataset (`integration`: it needs diffsynth-training).

The Layered repo is test_layered_pipeline.py's (`build_layered_repo`): the tiny repo with a Layered DiT and a
4-channel VAE.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffsynth.qwen_image import pipeline as pipeline_module
from diffsynth.qwen_image.training import QwenImageTrainingTask
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.media import pil_to_tensor
from diffsynth.runtime.pipeline import configs_from_folder
from diffsynth.runtime.testing.modules import load_beside

L = load_beside(__file__, "test_layered_pipeline.py", "qwen_image_tests_layered_pipeline")
PROMPTS = ["a red circle on a blue background", "a small green square in the top left corner"]


@pytest.fixture(scope="module")
def layered_repo(tiny_repo, tmp_path_factory):
    return L.build_layered_repo(tiny_repo, tmp_path_factory.mktemp("layered-train") / "Qwen-Image-Layered")


@pytest.fixture(scope="module")
def task(layered_repo):
    configs, tokenizer = configs_from_folder(layered_repo)
    return QwenImageTrainingTask.from_pretrained(
        configs, tokenizer_config=tokenizer, torch_dtype="float32", device="cpu"
    )


def frames(count: int, seed: int, size=(32, 32)) -> list[torch.Tensor]:
    return [pil_to_tensor(L.rgba_image(*size, seed=seed + k), mode="RGBA")[0] for k in range(count)]


def rows(layers: int = 2) -> list[dict]:
    """Two rows of `layers + 1` frames; the input images are 48x16 pictures, resized to the frames' 32x32."""
    return [
        {"prompt": p, "image": frames(layers + 1, 10 * i), "layer_input_image": L.rgba_image(48, 16, seed=5 + i)}
        for i, p in enumerate(PROMPTS)
    ]


def test_a_layered_model_makes_a_layered_rgba_task(task):
    assert task.layered and task.image_mode == "RGBA" and task.media == ("layer_input_image",)
    assert task.conditioning == ("layer_input_image",) and task.validation_references == "required"
    assert task.scheduler.template == "qwen_image" and task.scheduler.template_defaults == {"mu": 0.8}
    image = L.rgba_image(32, 32)
    assert task.reference_arguments([image]) == {"layer_input_image": image}
    with pytest.raises(ConfigError, match="one input image"):
        task.reference_arguments([image, image])


def test_encode_collate_and_velocity_are_what_decompose_feeds_the_dit(task, monkeypatch):
    """One step of `decompose` on both prompts: the text, mask and input-image latents it passes to
    `layered_velocity` equal the batch's, and the task's velocity at that step's latents and sigma equals the
    prediction the pipeline got."""
    calls = []

    def spy(dit, x, sigma, text, text_mask, condition, context=None):
        assert context is None  # Layered-Control's context mask is not a training input
        out = layered_velocity(dit, x, sigma, text, text_mask, condition)
        calls.append((x, sigma, text, text_mask, condition, out))
        return out

    layered_velocity = pipeline_module.layered_velocity
    monkeypatch.setattr(pipeline_module, "layered_velocity", spy)
    batch_rows = rows()
    task.pipe.decompose(
        PROMPTS, [r["layer_input_image"] for r in batch_rows], layer_num=2, height=32, width=32,
        num_inference_steps=1, cfg_scale=1.0, seed=0, progress_bar=False, output_type="pt",
    )  # fmt: skip
    (x, sigma, text, text_mask, condition, predicted), = calls  # fmt: skip
    samples = task.encode(batch_rows)
    assert samples[0]["latents"].shape == (3, 16, 4, 4) and samples[0]["condition"].shape == (16, 4, 4)
    batch = task.collate(samples)
    assert torch.equal(batch["text"], text) and torch.equal(batch["text_mask"], text_mask)
    torch.testing.assert_close(batch["condition"], condition, rtol=0, atol=1e-6)
    pixels = torch.stack([f for r in batch_rows for f in r["image"]])[:, :, None]
    expected = task.pipe.vae.encode(pixels)[:, :, 0].float().unflatten(0, (2, 3))
    torch.testing.assert_close(batch["latents"], expected, rtol=0, atol=1e-6)
    assert batch["latents"].shape == x.shape == (2, 3, 16, 4, 4)
    with torch.no_grad():
        ours = task.velocity(task.models["dit"], batch, x, sigma)
    torch.testing.assert_close(ours, predicted, rtol=0, atol=1e-6)


def test_bad_rows_and_batches_are_named(task, t2i_repo):
    good = rows()[0]
    with pytest.raises(ConfigError, match="list of N \\+ 1 RGBA frames.*row 0 of the batch"):
        task.encode([{**good, "image": good["image"][0]}])
    with pytest.raises(ConfigError, match="row 1 of the batch"):
        task.encode([good, {"prompt": "x", "image": good["image"]}])
    with pytest.raises(ConfigError, match="at least 2 RGBA frames"):
        task.encode([{**good, "image": good["image"][:1]}])
    with pytest.raises(ConfigError, match="at least 2 RGBA frames"):
        task.encode([{**good, "image": [f[:3] for f in good["image"]]}])
    with pytest.raises(ConfigError, match="layer_num=3 .* 3 frames"):
        task.encode([{**good, "layer_num": 3}])
    with pytest.raises(ConfigError, match="caption"):
        task.encode([{**good, "prompt": " "}])
    three, two = task.encode([rows(2)[0]]), task.encode([rows(1)[1]])
    with pytest.raises(ConfigError, match="--batch_size 1"):
        task.collate(three + two)
    configs, tokenizer = configs_from_folder(t2i_repo)
    plain = QwenImageTrainingTask.from_pretrained(configs, tokenizer_config=tokenizer, denoiser=False)
    assert not plain.layered and plain.image_mode == "RGB" and plain.media == ("image",)
    with pytest.raises(ConfigError, match="Qwen-Image-Layered"):
        plain.encode([{"prompt": "x", "image": torch.zeros(3, 32, 32), "layer_input_image": torch.zeros(3, 32, 32)}])
    with pytest.raises(ConfigError, match="layer_num"):
        QwenImageTrainingTask(plain.pipe, layer_num=2)


# ----------------------------------------------------------------------------------------- the trainer
def write_layered_dataset(folder, layers: int = 2):
    """Two rows of DiffSynth-Studio's layout: `image` lists the whole image then its layers, `layer_input_image`
    the input image (RGBA noise pictures, 32x32)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, prompt in enumerate(PROMPTS):
        names = [f"row{i}_frame{k}.png" for k in range(layers + 1)]
        for k, name in enumerate(names):
            L.rgba_image(32, 32, seed=10 * i + k).save(folder / name)
        L.rgba_image(32, 32, seed=100 + i).save(folder / f"input{i}.png")
        lines.append({"prompt": prompt, "image": names, "layer_input_image": f"input{i}.png", "layer_num": layers})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in lines))
    return folder


@pytest.mark.integration
def test_lora_training_on_layered_rows_writes_a_lora_the_pipeline_loads(layered_repo, tmp_path):
    testing = pytest.importorskip("diffsynth.training.testing")
    from diffsynth.qwen_image import QwenImagePipeline

    dataset = write_layered_dataset(tmp_path / "data")
    out = tmp_path / "out"
    losses = testing.train_with_cli(
        layered_repo, "qwen_image", dataset, out, "--max_pixels", str(32 * 32), "--dataset_repeat", "2",
        "--validation_prompts", PROMPTS[0], "--validation_images", "input0.png", "--validation_height", "32",
        "--validation_width", "32", "--validation_num_inference_steps", "1", "--task_options", "layer_num=2",
    )  # fmt: skip
    assert len(losses) == 2 and all(np.isfinite(losses)) and losses[0] > 0
    sheets = sorted((out / "validation").glob("*.png"))
    assert sheets
    with Image.open(sheets[-1]) as sheet:  # the 2 layers side by side
        assert (sheet.mode, sheet.size) == ("RGBA", (64, 32))
    with Image.open(dataset / "input0.png") as opened:
        image = opened.copy()
    pipe = QwenImagePipeline.from_pretrained(str(layered_repo), torch_dtype="float32", device="cpu")
    base, after = testing.outputs_before_and_after_lora(
        pipe, out / "step-000002.safetensors", PROMPTS[0], layer_input_image=image,
        layer_num=2, height=32, width=32, num_inference_steps=1, cfg_scale=1.0, seed=0, output_type="pt",
        progress_bar=False,
    )  # fmt: skip
    assert after.shape == base.shape == (1, 2, 4, 32, 32)
    assert (after - base).abs().max() > 1e-4  # the LoRA changes the layers
