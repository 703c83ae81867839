"""Validation samples of EliGen and in-context (`context_image`) training carry their conditions: the entities
(`--task_options validation_eligen_entity_prompts` with the masks as `--validation_images`) and the control map (a
plain model's `--validation_images`). Each sample is the pipeline's own call with those inputs (bit-equal, same
seed), the conditions change it, and wrong counts or clashing modes are refused by name at setup.
"""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from diffsynth.qwen_image import QwenImagePipeline
from diffsynth.qwen_image.training import QwenImageTrainingTask
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.pipeline import configs_from_folder

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "a red circle on a blue background"
ENTITIES = "a red circle|a blue background"
SIZE = {"height": 32, "width": 32, "num_inference_steps": 2, "cfg_scale": 1.0, "output_type": "np"}


def half(part: str, size: int = 32) -> Image.Image:
    """A mask: white (the entity) on the left or right half."""
    array = np.zeros((size, size, 3), dtype=np.uint8)
    if part == "left":
        array[:, : size // 2] = 255
    else:
        array[:, size // 2 :] = 255
    return Image.fromarray(array)


def picture(seed: int, size: int = 32) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def make_task(repo, **options) -> QwenImageTrainingTask:
    configs, tokenizer = configs_from_folder(repo)
    return QwenImageTrainingTask.from_pretrained(
        configs, tokenizer_config=tokenizer, torch_dtype="float32", device="cpu", **options
    )


@pytest.fixture(scope="module")
def repo(tiny_repo, tmp_path_factory):
    """The tiny repo laid out as Qwen/Qwen-Image's (text-to-image: no Edit `processor/` folder)."""
    folder = tmp_path_factory.mktemp("qwen-image-t2i") / "repo"
    return shutil.copytree(tiny_repo, folder, ignore=shutil.ignore_patterns("processor"))


@pytest.fixture(scope="module")
def pipe(repo):
    return QwenImagePipeline.from_pretrained(str(repo), torch_dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def plain(repo):
    return make_task(repo)


@pytest.fixture(scope="module")
def eligen(repo):
    return make_task(repo, validation_eligen_entity_prompts=ENTITIES)


def test_eligen_sample_is_the_pipeline_with_the_entities(eligen, plain, pipe):
    """The entity prompts (split on '|') and one mask each give the pipeline's `eligen_entity_*` arguments; the
    sample equals the pipeline's EliGen call and differs from the sample without entities."""
    masks = [half("left"), half("right")]
    assert eligen.validation_references == "required"
    given = eligen.reference_arguments(masks)
    assert given["eligen_entity_prompts"] == ["a red circle", "a blue background"]
    assert len(given["eligen_entity_masks"]) == 2
    with torch.no_grad():
        (ours,) = eligen.sample(eligen.models["dit"], [PROMPT], seed=5, references=[masks], **SIZE)
        (without,) = plain.sample(plain.models["dit"], [PROMPT], seed=5, **SIZE)
        theirs = pipe(
            PROMPT,
            seed=5,
            eligen_entity_prompts=["a red circle", "a blue background"],
            eligen_entity_masks=masks,
            progress_bar=False,
            **SIZE,
        )
    assert ours.shape == (1, 32, 32, 3) and np.array_equal(ours, theirs)
    assert np.abs(ours - without).max() > 1e-4  # deterministic: the entities change the picture


def test_context_sample_is_the_pipeline_with_the_context_image(plain, pipe):
    """A plain (non-Edit) model's one `--validation_images` picture is the pipeline's `context_image`."""
    control = picture(3)
    assert plain.validation_references == "optional"
    assert plain.reference_arguments([control]) == {"context_image": control}
    with torch.no_grad():
        drawn = plain.sample(plain.models["dit"], [PROMPT, PROMPT], seed=7, references=[[control], []], **SIZE)
        theirs = pipe(PROMPT, seed=7, context_image=control, progress_bar=False, **SIZE)
        bare = pipe(PROMPT, seed=7, progress_bar=False, **SIZE)
    assert np.array_equal(drawn[0], theirs) and np.array_equal(drawn[1], bare)
    assert np.abs(drawn[0] - drawn[1]).max() > 1e-4  # the control map changes the picture


def test_wrong_inputs_are_refused_by_name(tiny_repo, plain, eligen):
    with pytest.raises(ConfigError, match="lists 2 entities.*got 1"):
        eligen.reference_arguments([half("left")])
    with pytest.raises(ConfigError, match="validation_eligen_entity_prompts"):
        eligen.reference_arguments([])
    with pytest.raises(ConfigError, match="one context_image.*got 2"):
        plain.reference_arguments([picture(1), picture(2)])
    for bad in ("a cat||a dog", "", ["a cat", 3]):
        with pytest.raises(ConfigError, match="validation_eligen_entity_prompts"):
            QwenImageTrainingTask(plain.pipe, validation_eligen_entity_prompts=bad)
    with pytest.raises(ConfigError, match="not with an Edit model"):
        QwenImageTrainingTask(plain.pipe, edit=True, validation_eligen_entity_prompts=ENTITIES)
    # with an Edit processor/ beside the tokenizer (the tiny repo's), the pictures stay edit images
    assert make_task(tiny_repo).reference_arguments([picture(1)]).keys() == {"edit_image"}
    listed = QwenImageTrainingTask(plain.pipe, validation_eligen_entity_prompts=["a cat", " a dog "])
    assert listed.validation_entity_prompts == ["a cat", "a dog"]


def test_what_a_user_types_reaches_the_samples(tmp_path, eligen, plain):
    """The trainer's own parsing: `--task_options validation_eligen_entity_prompts=a|b` stays one string, and
    `--validation_images "m0.png,m1.png"` (read against --dataset_base_path) become one prompt's masks; without
    the flag the EliGen task is refused at setup, a plain task's context map is read as one image."""
    trainer = pytest.importorskip("diffsynth.training.trainer")
    from diffsynth.training.config import _parse_options

    assert _parse_options(f"validation_eligen_entity_prompts={ENTITIES},exponential_shift_mu=0.8") == {
        "validation_eligen_entity_prompts": ENTITIES,
        "exponential_shift_mu": 0.8,
    }
    half("left").save(tmp_path / "m0.png")
    half("right").save(tmp_path / "m1.png")
    cfg = SimpleNamespace(validation_prompts=[PROMPT], validation_images=["m0.png,m1.png"], dataset_base_path=tmp_path)
    (masks,) = trainer.validation_references(cfg, eligen)
    assert [np.asarray(m).tolist() for m in masks] == [np.asarray(half(p)).tolist() for p in ("left", "right")]
    with pytest.raises(ConfigError, match="item 1.*lists 2 entities"):
        trainer.validation_references(SimpleNamespace(**{**vars(cfg), "validation_images": ["m0.png"]}), eligen)
    with pytest.raises(ConfigError, match="validation_eligen_entity_prompts"):
        trainer.validation_references(SimpleNamespace(**{**vars(cfg), "validation_images": []}), eligen)
    (context,) = trainer.validation_references(SimpleNamespace(**{**vars(cfg), "validation_images": ["m0.png"]}), plain)
    assert plain.reference_arguments(context).keys() == {"context_image"}


@pytest.mark.integration
def test_eligen_validation_through_the_command_line(repo, tmp_path):
    """`diffsynth-train` with EliGen rows, `--validation_images "m0.png,m1.png"` and `--task_options
    'validation_eligen_entity_prompts=a|b'` as typed: the written sample is the pipeline's EliGen call with the
    trained LoRA (within one 8-bit level: the LoRA in training and the loaded one round differently)."""
    testing = pytest.importorskip("diffsynth.training.testing")
    data = tmp_path / "data"
    data.mkdir()
    masks = [half("left", 64), half("right", 64)]
    for k, m in enumerate(masks):
        m.save(data / f"m{k}.png")
    entities = ENTITIES.split("|")
    extra = [{"eligen_entity_prompts": entities, "eligen_entity_masks": ["m0.png", "m1.png"]}] * 2
    testing.write_caption_dataset(data, [PROMPT, PROMPT], extra=extra)
    flags = ["--data_file_keys", "image,eligen_entity_masks", "--dataset_repeat", "2", "--validation_prompts", PROMPT]
    flags += ["--validation_images", "m0.png,m1.png", "--task_options", f"validation_eligen_entity_prompts={ENTITIES}"]
    flags += ["--validation_height", "64", "--validation_width", "64", "--validation_num_inference_steps", "2"]
    flags += ["--validation_seed", "3"]
    losses = testing.train_with_cli(repo, "qwen_image", data, tmp_path / "out", *flags)
    assert len(losses) == 2 and all(np.isfinite(losses))
    written = np.asarray(Image.open(tmp_path / "out" / "validation" / "step-000002-0.png").convert("RGB"), int)
    pipe = QwenImagePipeline.from_pretrained(str(repo), torch_dtype="float32", device="cpu")
    pipe.load_lora(str(tmp_path / "out" / "step-000002.safetensors"), fuse=False)
    call = dict(eligen_entity_prompts=entities, eligen_entity_masks=masks, height=64, width=64, seed=3)
    expected = np.asarray(pipe(PROMPT, num_inference_steps=2, progress_bar=False, **call), int)
    assert written.shape == expected.shape == (64, 64, 3) and np.abs(written - expected).max() <= 1
