"""`--dataset_config` with kohya's and musubi-tuner's values as their files hold them (datasets.py): their
defaults read, and a refusal names the file's key and a command line the CLI takes."""

from __future__ import annotations

import json
import re
import shlex

import pytest
from diffsynth_training_toy import PROMPTS, TASK, write_images

from diffsynth.runtime.errors import ConfigError
from diffsynth.training.config import TrainConfig, build_parser
from diffsynth.training.datasets import dataset_entries


def toy_config(tmp_path, **data) -> TrainConfig:
    values = dict(
        family=TASK, output_path=str(tmp_path / "out"), max_pixels=64 * 64, bucket_step=16, batch_size=2,
        mixed_precision="no", dtype="float32", lora_rank=4, max_steps=1,
    )  # fmt: skip
    return TrainConfig(**{**values, **data})


def kohya_file(tmp_path, **values) -> str:
    """One `[[datasets]]` of two captioned 64x64 pictures with `values`, as kohya writes it (TOML)."""
    folder = tmp_path / "pictures"
    for i, name in enumerate(write_images(folder, [(64, 64)] * 2)):
        (folder / name).with_suffix(".txt").write_text(PROMPTS[i])
    lines = [f"image_directory = {json.dumps(str(folder))}"] + [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    path = tmp_path / "d.toml"
    path.write_text("[[datasets]]\n" + "\n".join(lines) + "\n")
    return str(path)


def refusal(tmp_path, run=None, **values) -> str:
    with pytest.raises(ConfigError) as caught:
        dataset_entries(toy_config(tmp_path, dataset_config=kohya_file(tmp_path, **values), **(run or {})))
    return str(caught.value)


def test_kohyas_default_keep_tokens_separator_reads_as_none(tmp_path):
    """kohya writes `keep_tokens_separator = ""` (its default: no separator), which is the run's unset flag."""
    (entry,) = dataset_entries(toy_config(tmp_path, dataset_config=kohya_file(tmp_path, keep_tokens_separator="")))
    assert entry.repeats == 1
    assert "keep_tokens_separator '|||' is the run's" in refusal(tmp_path, keep_tokens_separator="|||")


@pytest.mark.parametrize(
    ("run", "values", "hint"),
    [
        ({}, {"shuffle_caption": True}, "--shuffle_caption"),
        ({"shuffle_caption": True}, {"shuffle_caption": False}, "--no-shuffle_caption"),
        ({}, {"flip_aug": True}, "--flip_aug"),
        ({}, {"keep_tokens_separator": "|||"}, "--keep_tokens_separator '|||'"),
        ({}, {"batch_size": 4}, "--batch_size 4"),
    ],
)
def test_the_refusal_suggests_a_command_line_the_cli_takes(tmp_path, run, values, hint):
    message = refusal(tmp_path, run, **values)
    suggested = re.search(r"; pass (.*) or leave", message).group(1)
    assert suggested == hint
    [(key, value)] = values.items()  # these keys are the flags' names
    assert getattr(build_parser().parse_args(shlex.split(suggested)), key) == value


@pytest.mark.parametrize("key", ["enable_bucket", "bucket_no_upscale"])
@pytest.mark.parametrize("value", ["false", 1])
def test_bucket_switches_must_be_true_or_false(tmp_path, key, value):
    message = refusal(tmp_path, resolution=64, **{"enable_bucket": True, key: value})
    assert f"{key} {value!r} must be true or false" in message


@pytest.mark.parametrize("value", [0, "10", 1.5, True])
def test_a_bad_num_repeats_is_named_as_the_file_names_it(tmp_path, value):
    message = refusal(tmp_path, num_repeats=value)
    assert f"num_repeats {value!r} is not a whole number >= 1" in message
    assert "dataset 1: repeats" not in message
