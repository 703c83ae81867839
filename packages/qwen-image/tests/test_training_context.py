"""In-context control training for Qwen-Image (DiffSynth-Studio's lora/Qwen-Image-In-Context-Control-Union.sh: rows
with a `context_image`, the control map whose clean latent tokens follow the image's) and its Layered-Control-V2 case
(lora/Qwen-Image-Layered-Control-V2.sh: a Layered DiT, `layer_num=0`, one frame, the mask as `context_image`).
The encoded context and the model call are what the pipeline's denoising step gets for the same inputs; bad rows are
refused by name; the trainer trains a DiT LoRA on such rows (`integration`) which the pipeline loads and which changes
what it draws with that context image.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffsynth.qwen_image import QwenImagePipeline
from diffsynth.qwen_image import pipeline as pipeline_module
from diffsynth.qwen_image.training import QwenImageTrainingTask
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.media import pil_to_tensor
from diffsynth.runtime.pipeline import configs_from_folder
from diffsynth.runtime.testing.modules import load_beside

L = load_beside(__file__, "test_layered_pipeline.py", "qwen_image_tests_layered_pipeline_context")
pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["Context_Control. a red circle on a blue background", "Context_Control. a small green square"]
FAST = {"height": 64, "width": 64, "num_inference_steps": 1, "cfg_scale": 1.0, "progress_bar": False}


def picture(seed: int, size=(64, 64)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def tiny_repo(t2i_repo):
    """Qwen/Qwen-Image's layout (no Edit `processor/` folder, which would make the task Edit's)."""
    return t2i_repo


@pytest.fixture(scope="module")
def pipe(tiny_repo):
    return QwenImagePipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu")


def make_task(repo) -> QwenImageTrainingTask:
    configs, tokenizer = configs_from_folder(repo)
    return QwenImageTrainingTask.from_pretrained(
        configs, tokenizer_config=tokenizer, torch_dtype="float32", device="cpu"
    )


@pytest.fixture(scope="module")
def task(tiny_repo):
    return make_task(tiny_repo)


def spy_on(monkeypatch, name: str) -> list:
    """Records each call of the pipeline module's `name` (its arguments) with what it returned."""
    calls, original = [], getattr(pipeline_module, name)

    def spy(*args, **kwargs):
        calls.append(((args, kwargs), original(*args, **kwargs)))
        return calls[-1][1]

    monkeypatch.setattr(pipeline_module, name, spy)
    return calls


CONTEXTS = [picture(1), picture(2, (80, 48))]  # the second is resized to the target, as the pipeline resizes it


def rows() -> list[dict]:
    """The first context as the dataset reads a --data_file_keys column (a [3, H, W] tensor at the row's size), the
    second as a PIL image of another size."""
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 64, generator=g) * 2 - 1 for _ in PROMPTS]
    contexts = [pil_to_tensor(CONTEXTS[0])[0], CONTEXTS[1]]
    return [{"prompt": p, "image": i, "context_image": c} for p, i, c in zip(PROMPTS, images, contexts, strict=True)]


# ----------------------------------------------------------------------------------------- In-Context Control
def test_encoded_context_and_velocity_are_the_pipelines(task, pipe, monkeypatch):
    """Each row's context latent is the reference the pipeline builds from the same picture at 64x64, and the
    task's velocity on the batch equals, row by row, the pipeline's prediction at the same latents and sigma."""
    samples = task.encode(rows())
    batch = task.collate(samples)
    calls = spy_on(monkeypatch, "qwen_image_velocity")
    for k, prompt in enumerate(PROMPTS):
        pipe(prompt, context_image=CONTEXTS[k], seed=k, **FAST)
    monkeypatch.undo()
    assert len(calls) == 2
    for sample, ((args, _), _) in zip(samples, calls, strict=True):
        (context,) = args[5]  # the references: the context latent alone
        assert sample["context"].shape == (16, 8, 8)
        assert torch.equal(sample["context"], context[0])
    noisy = torch.cat([args[1] for (args, _), _ in calls])
    sigma = torch.cat([args[2] for (args, _), _ in calls])
    with torch.no_grad():
        ours = task.velocity(task.models["dit"], batch, noisy, sigma)
        plain = task.velocity(task.models["dit"], {k: batch[k] for k in ("latents", "text", "text_mask")}, noisy, sigma)
    for k, (_, velocity) in enumerate(calls):
        torch.testing.assert_close(ours[k : k + 1], velocity, atol=1e-5, rtol=0)
    assert (ours - plain).abs().max() > 1e-3  # the context acts


def test_bad_context_rows_are_named(task):
    unread = rows()
    unread[0]["context_image"] = "control/0.png"  # a path the dataset was not told to read
    with pytest.raises(ConfigError, match="list context_image in --data_file_keys"):
        task.encode(unread)
    mixed = rows()
    del mixed[1]["context_image"]
    with pytest.raises(ConfigError, match="some rows of the batch have context_image.*--batch_size 1"):
        task.collate(task.encode(mixed))


# ----------------------------------------------------------------------------------------- Layered-Control-V2
@pytest.fixture(scope="module")
def layered_repo(tiny_repo, tmp_path_factory):
    return L.build_layered_repo(tiny_repo, tmp_path_factory.mktemp("layered-context") / "Layered")


@pytest.fixture(scope="module")
def layered_task(layered_repo):
    return make_task(layered_repo)


def half_mask(half: int) -> Image.Image:
    """A 32x32 RGB mask, white (the region to pull out) on the left (0) or right (1) half."""
    mask = np.zeros((32, 32, 3), dtype=np.uint8)
    mask[:, 16 * half : 16 * half + 16] = 255
    return Image.fromarray(mask)


def layered_row() -> dict:
    """DiffSynth-Studio's Layered-Control-V2 row, as the RGBA dataset reads it: `image` lists the one layer,
    `layer_num` 0, the input image (48x16, resized to 32x32) and the mask of the region to pull out."""
    return {
        "prompt": PROMPTS[0],
        "image": [pil_to_tensor(L.rgba_image(32, 32, seed=0), mode="RGBA")[0]],
        "layer_num": 0,
        "layer_input_image": L.rgba_image(48, 16, seed=1),
        "context_image": pil_to_tensor(half_mask(0), mode="RGBA")[0],
    }


def test_layered_control_v2_is_what_decompose_feeds_the_dit(layered_task, monkeypatch):
    """`decompose(layer_num=0, context_image=mask)`'s one step: the task's context latent (RGBA) equals the one it
    passes to `layered_velocity`, and the task's velocity at that step's latents and sigma equals its prediction."""
    row = layered_row()
    calls = spy_on(monkeypatch, "layered_velocity")
    layered_task.pipe.decompose(
        PROMPTS[0], row["layer_input_image"], layer_num=0, context_image=half_mask(0), height=32, width=32,
        num_inference_steps=1, cfg_scale=1.0, seed=0, progress_bar=False, output_type="pt",
    )  # fmt: skip
    monkeypatch.undo()
    (((_, x, sigma, _, _, _), kwargs), predicted), *_ = calls
    (sample,) = layered_task.encode([row])
    assert sample["latents"].shape == x.shape[1:] == (1, 16, 4, 4)
    assert torch.equal(sample["context"], kwargs["context"][0])
    batch = layered_task.collate([sample])
    with torch.no_grad():
        ours = layered_task.velocity(layered_task.models["dit"], batch, x, sigma)
        without = layered_task.velocity(
            layered_task.models["dit"], {k: v for k, v in batch.items() if k != "context"}, x, sigma
        )
    torch.testing.assert_close(ours, predicted, atol=1e-5, rtol=0)
    assert (ours - without).abs().max() > 1e-3  # the mask acts
    with pytest.raises(ConfigError, match="at least 2 RGBA frames.*layer_num=0"):
        layered_task.encode([{**row, "layer_num": None}])  # one frame is Layered-Control's: it says layer_num=0
    with pytest.raises(ConfigError, match="Qwen-Image-Layered takes none"):
        layered_task.encode([{**row, "eligen_entity_prompts": ["a"], "eligen_entity_masks": [row["context_image"]]}])


# ----------------------------------------------------------------------------------------- the trainer
@pytest.mark.integration
def test_lora_training_on_context_rows(tiny_repo, tmp_path):
    """DiffSynth-Studio's In-Context-Control-Union recipe (`--data_file_keys image,context_image`), two steps on
    batches of both rows: the LoRA loads into the pipeline and changes what it draws with a context image."""
    testing = pytest.importorskip("diffsynth.training.testing")
    folder = tmp_path / "data"
    folder.mkdir()
    for k in range(2):
        picture(10 + k).save(folder / f"control{k}.png")
    extra = [{"context_image": f"control{k}.png"} for k in range(2)]
    dataset = testing.write_caption_dataset(folder, PROMPTS, extra=extra)
    out = tmp_path / "out"
    flags = ("--data_file_keys", "image,context_image", "--dataset_repeat", "2")
    losses = testing.train_with_cli(tiny_repo, "qwen_image", dataset, out, *flags)
    assert len(losses) == 2 and all(np.isfinite(losses)) and losses[0] > 0
    pipe = QwenImagePipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu")
    call = dict(context_image=picture(10), seed=0, output_type="pt", **{**FAST, "num_inference_steps": 2})
    base, after = testing.outputs_before_and_after_lora(pipe, out / "step-000002.safetensors", PROMPTS[0], **call)
    assert after.shape == base.shape == (1, 3, 64, 64)
    assert (after - base).abs().max() > 1e-4


@pytest.mark.integration
def test_lora_training_on_layered_control_v2_rows(layered_repo, tmp_path):
    """DiffSynth-Studio's Layered-Control-V2 recipe (`--data_file_keys image,layer_input_image,context_image`,
    rows with `layer_num` 0): two steps; the LoRA changes the layer `decompose` pulls out with the mask."""
    testing = pytest.importorskip("diffsynth.training.testing")
    folder = tmp_path / "data"
    folder.mkdir()
    lines = []
    for i in range(2):
        L.rgba_image(32, 32, seed=10 + i).save(folder / f"layer{i}.png")
        L.rgba_image(32, 32, seed=20 + i).save(folder / f"input{i}.png")
        half_mask(i).save(folder / f"mask{i}.png")
        names = {"image": [f"layer{i}.png"], "layer_input_image": f"input{i}.png", "context_image": f"mask{i}.png"}
        lines.append({"prompt": PROMPTS[i], "layer_num": 0, **names})
    (folder / "metadata.json").write_text(json.dumps(lines))
    out = tmp_path / "out"
    flags = ["--data_file_keys", "image,layer_input_image,context_image", "--max_pixels", str(32 * 32)]
    losses = testing.train_with_cli(layered_repo, "qwen_image", folder, out, *flags, "--dataset_repeat", "2")
    assert len(losses) == 2 and all(np.isfinite(losses)) and losses[0] > 0
    pipe = QwenImagePipeline.from_pretrained(str(layered_repo), torch_dtype="float32", device="cpu")
    with Image.open(folder / "input0.png") as opened:
        image = opened.copy()
    base, after = testing.outputs_before_and_after_lora(
        pipe, out / "step-000002.safetensors", PROMPTS[0], layer_input_image=image, layer_num=0,
        context_image=half_mask(0), height=32, width=32, num_inference_steps=1, cfg_scale=1.0, seed=0, output_type="pt",
        progress_bar=False,
    )  # fmt: skip
    assert after.shape == base.shape == (1, 1, 4, 32, 32)
    assert (after - base).abs().max() > 1e-4
