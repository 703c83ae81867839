"""`--validation_images`: reference images of the validation samples, checked and loaded once at setup and given
to the task's `sample` with their prompts (the toy task, made to take references and record what it got)."""

import logging

import numpy as np
import pytest
from diffsynth_training_toy import TASK, ToyTask, write_images
from PIL import Image

import diffsynth.training.trainer as trainer
from diffsynth.runtime.errors import ConfigError
from diffsynth.training.config import TrainConfig, parse_args
from diffsynth.training.trainer import TrainState, setup

PROMPTS = ["a red circle", "a blue square"]


def toy_config(tmp_path, dataset, **overrides) -> TrainConfig:
    values = dict(
        family=TASK,
        dataset_base_path=str(dataset),
        output_path=str(tmp_path / "out"),
        max_pixels=64 * 128,
        bucket_step=16,
        batch_size=2,
        mixed_precision="no",
        dtype="float32",
        lora_rank=4,
        max_steps=2,
        validation_prompts=PROMPTS,
    )
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture
def recording(monkeypatch):
    """The toy task taking references; each `sample` call's references are appended to the returned list."""
    calls = []
    toy_sample = ToyTask.sample

    def sample(self, denoiser, prompts, *, seed, references=None, **options):
        calls.append(references)
        return toy_sample(self, denoiser, prompts, seed=seed, **options)

    monkeypatch.setattr(ToyTask, "validation_references", "optional", raising=False)
    monkeypatch.setattr(ToyTask, "sample", sample)
    return calls


@pytest.fixture
def references(dataset):
    """Three RGBA pictures beside the dataset's images (RGBA: the trainer must hand over RGB)."""
    names = write_images(dataset / "refs", [(24, 16), (16, 40), (8, 8)], seed=7)
    for name in names:
        path = dataset / "refs" / name
        Image.open(path).convert("RGBA").save(path)
    return [f"refs/{n}" for n in names]


def test_flag_splits_on_bars_and_keeps_commas(tmp_path, dataset):
    argv = ["--model_paths", "x.safetensors", "--dataset_base_path", str(dataset)]
    argv += ["--validation_prompts", "a cat|a dog", "--validation_images", "a.png,b.png|c.png"]
    config, _ = parse_args(argv)
    assert config.validation_images == ["a.png,b.png", "c.png"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"validation_images": ["a.png"]}, r"--validation_images has 1 items and --validation_prompts 2 prompts"),
        ({"validation_prompts": [], "validation_images": ["a.png"]}, r"--validation_images gives the reference"),
    ],
)
def test_config_errors_name_the_flag(tmp_path, dataset, overrides, message):
    with pytest.raises(ConfigError, match=message):
        toy_config(tmp_path, dataset, **overrides).check()


def test_missing_or_unreadable_files_are_named(tmp_path, dataset, recording, references):
    with pytest.raises(ConfigError, match=r"--validation_images: no such file .*refs/nope\.png.*--dataset_base_path"):
        setup(toy_config(tmp_path, dataset, validation_images=[references[0], f"{references[1]},refs/nope.png"]))
    (dataset / "refs" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ConfigError, match=r"--validation_images: cannot read .*refs/broken\.png as an image"):
        setup(toy_config(tmp_path, dataset, validation_images=[references[0], "refs/broken.png"]))


def test_a_task_that_takes_no_references_refuses_them(tmp_path, dataset, references):
    with pytest.raises(ConfigError, match="the toy training task takes no reference images.*drop the flag"):
        setup(toy_config(tmp_path, dataset, validation_images=references[:2]))


def test_required_and_expected_references(tmp_path, dataset, recording, monkeypatch, caplog):
    monkeypatch.setattr(ToyTask, "validation_references", "required", raising=False)
    with pytest.raises(ConfigError, match=r"the toy model draws its samples from reference images; give --valid"):
        setup(toy_config(tmp_path, dataset))

    def reference_arguments(self, images):
        if not images:
            raise ConfigError("toy I2V validation needs --validation_images")
        if len(images) > 1:
            raise ConfigError("one image only")
        return {"image": images[0]}

    monkeypatch.setattr(ToyTask, "reference_arguments", reference_arguments, raising=False)
    with pytest.raises(ConfigError, match="toy I2V validation needs --validation_images"):  # the family's words
        setup(toy_config(tmp_path, dataset))
    monkeypatch.setattr(ToyTask, "validation_references", "expected", raising=False)
    with caplog.at_level(logging.WARNING, logger="diffsynth.training.trainer"):
        assert setup(toy_config(tmp_path, dataset)).validation_references is None
    assert "samples are drawn without them" in caplog.text


def test_task_checks_each_prompt_references_at_setup(tmp_path, dataset, recording, references, monkeypatch):
    def reference_arguments(self, images):
        if len(images) > 1:
            raise ConfigError(f"{len(images)} reference images; the toy takes one")
        return {}

    monkeypatch.setattr(ToyTask, "reference_arguments", reference_arguments, raising=False)
    item = f"{references[1]},{references[2]}"
    with pytest.raises(ConfigError, match=rf"--validation_images item 2 \({item!r}\): 2 reference images"):
        setup(toy_config(tmp_path, dataset, validation_images=[references[0], item]))


def test_sample_gets_the_loaded_references_of_each_prompt(tmp_path, dataset, recording, references):
    items = [references[0], f"{references[1]}, {references[2]}"]
    run = setup(toy_config(tmp_path, dataset, validation_images=items))
    written = trainer.validate(run, TrainState(step=3))
    assert [p.name for p in written] == ["step-000003-0.png", "step-000003-1.png"]
    (got,) = recording
    assert [len(images) for images in got] == [1, 2]
    files = [references[0], references[1], references[2]]
    for image, name in zip([*got[0], *got[1]], files, strict=True):
        expected = np.asarray(Image.open(dataset / name).convert("RGB"))
        assert image.mode == "RGB" and np.array_equal(np.asarray(image), expected)

    # loaded once: a second validation hands over the same images; without the flag no keyword is passed
    trainer.validate(run, TrainState(step=4))
    assert recording[1] is got
    run = setup(toy_config(tmp_path, dataset))
    trainer.validate(run, TrainState(step=5))
    assert recording[2] is None


def test_absolute_paths_are_read_as_they_are(tmp_path, dataset, recording, references):
    absolute = str(dataset / references[2])
    run = setup(toy_config(tmp_path, dataset, validation_images=[absolute, references[0]]))
    assert run.validation_references[0][0].size == (8, 8)


def test_an_item_naming_a_file_with_a_comma_is_one_path(tmp_path, dataset, recording, references):
    comma = dataset / "refs" / "cat, dog.png"
    (dataset / references[1]).rename(comma)
    items = ["refs/cat, dog.png", f"refs/cat, dog.png,{references[2]}"]
    run = setup(toy_config(tmp_path, dataset, validation_images=items))
    got = run.validation_references
    assert [len(images) for images in got] == [1, 2]
    with Image.open(comma) as first, Image.open(dataset / references[2]) as second:
        assert np.array_equal(np.asarray(got[0][0]), np.asarray(first.convert("RGB")))
        assert np.array_equal(np.asarray(got[1][0]), np.asarray(first.convert("RGB")))
        assert np.array_equal(np.asarray(got[1][1]), np.asarray(second.convert("RGB")))
