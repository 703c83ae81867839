"""EliGen training for Qwen-Image (DiffSynth-Studio's lora/Qwen-Image-EliGen.sh: rows with `eligen_entity_prompts`
and `eligen_entity_masks`). The encoded entities and the model call are what the pipeline's denoising step gets for
the same prompt, entities and masks; bad rows are refused by name; the trainer trains a DiT LoRA on such rows
(`integration`, as in test_training.py) which the pipeline loads and which changes its EliGen output.
"""

from __future__ import annotations

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

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["a red circle on a blue background", "a small green square in the top left corner"]
ENTITIES = [["a red circle", "a blue background"], ["a small green square"]]  # two rows, two entity counts
FAST = {"height": 64, "width": 64, "num_inference_steps": 1, "cfg_scale": 1.0, "progress_bar": False}


def mask(part: str, size=(64, 64)) -> Image.Image:
    """White (the entity) on the left, top or right half of a black picture."""
    width, height = size
    array = np.zeros((height, width, 3), dtype=np.uint8)
    region = {"left": np.s_[:, : width // 2], "top": np.s_[: height // 2], "right": np.s_[:, width // 2 :]}[part]
    array[region] = 255
    return Image.fromarray(array)


MASKS = [[mask("left"), mask("top")], [mask("right")]]


@pytest.fixture(scope="module")
def tiny_repo(t2i_repo):
    """Qwen/Qwen-Image's layout (no Edit `processor/` folder, which would make the task Edit's)."""
    return t2i_repo


@pytest.fixture(scope="module")
def pipe(tiny_repo):
    return QwenImagePipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def task(tiny_repo):
    configs, tokenizer = configs_from_folder(tiny_repo)
    return QwenImageTrainingTask.from_pretrained(
        configs, tokenizer_config=tokenizer, torch_dtype="float32", device="cpu"
    )


def rows() -> list[dict]:
    """Rows as the dataset reads them: the masks (in --data_file_keys) as [3, H, W] tensors in [-1, 1]."""
    g = torch.Generator().manual_seed(0)
    return [
        {
            "prompt": prompt,
            "image": torch.rand(3, 64, 64, generator=g) * 2 - 1,
            "eligen_entity_prompts": entities,
            "eligen_entity_masks": [pil_to_tensor(m)[0] for m in masks],
        }
        for prompt, entities, masks in zip(PROMPTS, ENTITIES, MASKS, strict=True)
    ]


def pipeline_step(pipe, monkeypatch, k: int):
    """What the pipeline's one denoising step of row `k` (its prompt, entities and masks) passes to
    `qwen_image_velocity`, and the velocity it gets back."""
    calls = []
    original = pipeline_module.qwen_image_velocity

    def spy(*args):
        calls.append((args, original(*args)))
        return calls[-1][1]

    monkeypatch.setattr(pipeline_module, "qwen_image_velocity", spy)
    pipe(PROMPTS[k], eligen_entity_prompts=ENTITIES[k], eligen_entity_masks=MASKS[k], seed=k, **FAST)
    monkeypatch.undo()
    ((args, velocity),) = calls
    return args, velocity


def test_encoded_entities_and_velocity_are_the_pipelines(task, pipe, monkeypatch):
    """Each row's entity prompts, regions and segments are the `entities` the pipeline builds for its positive
    branch, and the task's velocity on a batch of both rows (two entity counts) equals, row by row, the
    pipeline's prediction at the same noisy latents and sigma."""
    samples = task.encode(rows())
    batch = task.collate(samples)
    steps = [pipeline_step(pipe, monkeypatch, k) for k in range(2)]
    for k, (sample, (args, _)) in enumerate(zip(samples, steps, strict=True)):
        references, entities = args[5], args[6]  # qwen_image_velocity(dit, x, sigma, text, mask, refs, entities, ...)
        assert references == [] and sample["eligen_regions"].dtype == torch.bool
        assert sample["eligen_lengths"].shape == (len(ENTITIES[k]),)
        assert entities.segments == [*sample["eligen_lengths"].tolist(), sample["text"].shape[0]]
        assert torch.equal(entities.regions[0], sample["eligen_regions"])
        entity_tokens = int(sample["eligen_lengths"].sum())
        assert torch.equal(entities.text[0, :entity_tokens], sample["eligen_text"])  # each entity encoded alone
        # the prompt: the rows' prompts are encoded together (padded), the pipeline's alone
        torch.testing.assert_close(entities.text[0, entity_tokens:], sample["text"], atol=1e-5, rtol=0)
    regions = samples[0]["eligen_regions"]
    assert regions.shape == (2, 16) and regions[0].sum() == 8 and regions[1].sum() == 8  # left half, top half
    assert not torch.equal(regions[0], regions[1])
    noisy = torch.cat([args[1] for args, _ in steps])
    sigma = torch.cat([args[2] for args, _ in steps])
    with torch.no_grad():
        ours = task.velocity(task.models["dit"], batch, noisy, sigma)
        plain = task.velocity(task.models["dit"], {k: batch[k] for k in ("latents", "text", "text_mask")}, noisy, sigma)
    for k, (_, velocity) in enumerate(steps):
        torch.testing.assert_close(ours[k : k + 1], velocity, atol=1e-5, rtol=0)
    assert (ours - plain).abs().max() > 1e-3  # the entities act


def test_a_batch_may_mix_rows_with_and_without_entities(task, pipe):
    """Rows are run one at a time under EliGen; a row without entities gets the plain per-step call."""
    mixed = rows()
    mixed[1] = {"prompt": mixed[1]["prompt"], "image": mixed[1]["image"]}
    batch = task.collate(task.encode(mixed))
    assert batch["eligen"][1] is None and batch["eligen"][0] is not None
    noisy = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    sigma = torch.tensor([0.6, 0.2])
    with torch.no_grad():
        ours = task.velocity(task.models["dit"], batch, noisy, sigma)
        theirs = pipeline_module.qwen_image_velocity(pipe.dit, noisy[1:], sigma[1:], *pipe.encode_prompt(PROMPTS[1:]))
    torch.testing.assert_close(ours[1:], theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"eligen_entity_prompts": ["a", "b", "c"]}, "row 0 of the batch: eligen_entity_prompts has 3 entries but "),
        ({"eligen_entity_masks": ["masks/0.png", "masks/1.png"]}, "list eligen_entity_masks in --data_file_keys"),
        ({"eligen_entity_masks": None}, "has eligen_entity_prompts but no eligen_entity_masks"),
        ({"eligen_entity_prompts": []}, "has eligen_entity_masks but no eligen_entity_prompts"),
        ({"edit_image": torch.zeros(3, 32, 32)}, "EliGen entities .* and edit_image"),
        ({"context_image": torch.zeros(3, 64, 64)}, "EliGen entities .* and context_image"),
        ({"controlnet_image": torch.zeros(3, 64, 64)}, "EliGen entities .* and controlnet_image"),
        ({"blockwise_controlnet_image": torch.zeros(3, 64, 64)}, "and blockwise_controlnet_image"),
    ],
)
def test_bad_entity_rows_are_named(task, change, match):
    row = {**rows()[0], **change}
    with pytest.raises(ConfigError, match=match):
        task.encode([row])


# ----------------------------------------------------------------------------------------- the trainer
@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """DiffSynth-Studio's EliGen layout: JSON lists of entity prompts and of mask files per row."""
    testing = pytest.importorskip("diffsynth.training.testing")
    folder = tmp_path_factory.mktemp("qwen-eligen-data")
    extra = []
    for i, (entities, masks) in enumerate(zip(ENTITIES, MASKS, strict=True)):
        names = [f"mask{i}_{k}.png" for k in range(len(masks))]
        for name, picture in zip(names, masks, strict=True):
            picture.save(folder / name)
        extra.append({"eligen_entity_prompts": entities, "eligen_entity_masks": names})
    return testing.write_caption_dataset(folder, PROMPTS, extra=extra)


@pytest.mark.integration
def test_lora_training_on_entity_rows(tiny_repo, dataset, tmp_path):
    """Two steps on batches of both rows (two entity counts), trained directly and from the cache (the entities
    stored there) to the same loss; the LoRA loads into the pipeline and changes its EliGen image."""
    from diffsynth.training.testing import CliTrainer, outputs_before_and_after_lora

    train = CliTrainer(
        tiny_repo, "qwen_image", dataset, "--data_file_keys", "image,eligen_entity_masks", "--dataset_repeat", "2"
    )
    direct, cached = train.direct_and_cached(tmp_path)
    assert len(direct) == 2 and all(np.isfinite(direct)) and direct[0] > 0
    assert cached == pytest.approx(direct, rel=1e-6, abs=1e-7)
    pipe = QwenImagePipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu")
    lora = tmp_path / "direct" / "step-000002.safetensors"
    call = dict(eligen_entity_prompts=ENTITIES[0], eligen_entity_masks=MASKS[0], seed=0, output_type="pt")
    base, after = outputs_before_and_after_lora(pipe, lora, PROMPTS[0], **call, **{**FAST, "num_inference_steps": 2})
    assert after.shape == base.shape == (1, 3, 64, 64)
    assert (after - base).abs().max() > 1e-4
