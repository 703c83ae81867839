"""`--dataset_config`: several datasets in one run (datasets.py)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from diffsynth_training_toy import PROMPTS, TASK, write_dataset, write_images

from diffsynth.runtime.errors import ConfigError
from diffsynth.training.config import TrainConfig
from diffsynth.training.data import batch_plan
from diffsynth.training.datasets import LOSS_WEIGHT_KEY, dataset_entries
from diffsynth.training.testing import first_losses, train_direct_and_cached
from diffsynth.training.trainer import run_stage, setup, train


def toy_config(tmp_path, name="out", **data) -> TrainConfig:
    values = dict(
        family=TASK, output_path=str(tmp_path / name), max_pixels=64 * 128, bucket_step=16, batch_size=2,
        mixed_precision="no", dtype="float32", lora_rank=4, learning_rate=1e-2, max_steps=3, num_epochs=10,
        log_every=1, seed=0,
    )  # fmt: skip
    return TrainConfig(**{**values, **data})


def write_config(path, datasets) -> str:
    path.write_text(yaml.safe_dump({"datasets": datasets}))
    return str(path)


@pytest.fixture
def two(tmp_path):
    """Dataset a: three 64x64 pictures. Dataset b: two 64x64 (the second with its own `repeats` 2) and two 128x64."""
    a = write_dataset(tmp_path / "a", [(64, 64)] * 3)
    b = tmp_path / "b"
    names = write_images(b, [(64, 64)] * 2 + [(128, 64)] * 2, seed=1)
    rows = [{"image": n, "prompt": PROMPTS[i], **({"repeats": 2} if i == 1 else {})} for i, n in enumerate(names)]
    (b / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return a, b


def test_datasets_repeats_plan_the_samples_and_steps_of_their_rows_written_out(tmp_path, two):
    a, b = two
    config = write_config(
        tmp_path / "d.yaml", [{"base_path": str(a), "repeats": 3}, {"base_path": str(b), "repeats": 2}]
    )
    combined = setup(toy_config(tmp_path, dataset_config=config)).dataset
    # the same rows in one metadata file, each dataset's repeats written into its rows' `repeats` column
    rows = [{"image": f"../a/img{i}.png", "prompt": PROMPTS[i], "repeats": 3} for i in range(3)]
    rows += [{"image": f"../b/img{i}.png", "prompt": PROMPTS[i], "repeats": 4 if i == 1 else 2} for i in range(4)]
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    one = setup(toy_config(tmp_path, "one_out", dataset_base_path=str(tmp_path / "one")))
    assert len(combined) == 7 and combined.repeats == [3, 3, 3, 2, 4, 2, 2] == one.dataset.repeats
    assert combined.buckets == one.dataset.buckets
    # 64x64: 3 x 3 + 2 + 4 = 15 samples, 8 batches of 2; 128x64: 2 x 2 = 4 samples, 2 batches
    run = setup(toy_config(tmp_path, "combined_out", dataset_config=config, max_steps=None, num_epochs=2))
    assert run.steps_per_epoch == one.steps_per_epoch == 10 and run.total_steps == 20
    plan = batch_plan(combined.buckets, batch_size=2, seed=0, repeats=combined.repeats)
    assert plan == batch_plan(one.dataset.buckets, batch_size=2, seed=0, repeats=one.dataset.repeats)
    for i in range(7):
        assert torch.equal(combined[i]["image"], one.dataset[i]["image"])


def test_a_datasets_own_size_and_trigger_word_reach_its_samples(tmp_path, two):
    a, b = two
    entries = [{"base_path": str(a), "trigger_word": "sks"}, {"base_path": str(b), "max_pixels": 32 * 32}]
    dataset = setup(toy_config(tmp_path, dataset_config=write_config(tmp_path / "d.yaml", entries))).dataset
    assert dataset.buckets == [(64, 64)] * 3 + [(32, 32)] * 2 + [(32, 16)] * 2
    assert [dataset[i]["prompt"] for i in range(3)] == [f"sks, {p}" for p in PROMPTS[:3]]
    assert [dataset[i]["prompt"] for i in range(3, 7)] == PROMPTS[:4]
    assert dataset[3]["image"].shape == (3, 32, 32) and dataset[6]["image"].shape == (3, 16, 32)


def test_loss_weight_2_doubles_the_loss_and_weights_1_train_as_the_plain_dataset(tmp_path, two):
    a, _ = two
    first = {}
    for weight in (1, 2):
        config = write_config(tmp_path / f"w{weight}.yaml", [{"base_path": str(a), "loss_weight": weight}])
        first[weight], _ = first_losses(toy_config(tmp_path, f"w{weight}", dataset_config=config), steps=1)
    assert first[2][0] == 2 * first[1][0] and first[1][0] > 0
    # with every weight 1 the run is the plain run of the same folder, bit for bit
    train(toy_config(tmp_path, "plain", dataset_base_path=str(a)))
    train(toy_config(tmp_path, "listed", dataset_config=str(tmp_path / "w1.yaml")))
    plain, listed = (
        (tmp_path / "plain" / "metrics.jsonl").read_text(),
        (tmp_path / "listed" / "metrics.jsonl").read_text(),
    )
    assert [json.loads(line)["loss"] for line in plain.splitlines()] == [
        json.loads(line)["loss"] for line in listed.splitlines()
    ]
    from safetensors.torch import load_file

    name = "checkpoints/step-000003/trainable.safetensors"
    want, got = load_file(str(tmp_path / "plain" / name)), load_file(str(tmp_path / "listed" / name))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_a_cached_run_equals_the_direct_run_and_keeps_the_loss_weights(tmp_path, two):
    a, b = two
    entries = [{"base_path": str(a)}, {"base_path": str(b), "repeats": 2, "loss_weight": 2.0, "max_pixels": 32 * 32}]
    config = toy_config(tmp_path / "runs", dataset_config=write_config(tmp_path / "d.yaml", entries))
    runs = train_direct_and_cached(config)
    direct, cached = runs.losses()
    assert len(direct) == 3 and direct == cached
    want, got = runs.checkpoints(3)
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert LOSS_WEIGHT_KEY not in runs.cached_item(0) and float(runs.cached_item(3)[LOSS_WEIGHT_KEY]) == 2.0


def test_a_changed_dataset_refuses_the_cache(tmp_path, two):
    a, b = two
    path = tmp_path / "d.yaml"
    entries = [{"base_path": str(a)}, {"base_path": str(b), "repeats": 2}]
    config = toy_config(tmp_path, dataset_config=write_config(path, entries), cache_dir=str(tmp_path / "cache"))
    run_stage(replace(config, stage="encode"))
    setup(config)  # the same datasets: accepted
    write_config(path, [{"base_path": str(a)}, {"base_path": str(b), "repeats": 3}])
    with pytest.raises(
        ConfigError, match=rf"another dataset 2 of --dataset_config \(base_path {b}\): repeats 2, now 3"
    ):
        setup(config)
    write_config(path, entries)
    (b / "metadata.jsonl").write_text((b / "metadata.jsonl").read_text().replace(PROMPTS[0], "another caption"))
    with pytest.raises(ConfigError, match=r"another dataset 2 of --dataset_config .*: its metadata changed"):
        setup(config)
    with pytest.raises(ConfigError, match="encoded from a --dataset_config, this run has --dataset_base_path"):
        setup(replace(config, dataset_config=None, dataset_base_path=str(a)))


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"repeat": 2}, r"dataset 2: unknown key 'repeat'; the known keys are base_path, metadata_path, "),
        ({"base_path": None}, r"dataset 2: base_path is required"),
        ({"repeats": 0}, r"dataset 2: repeats 0 is not a whole number >= 1"),
        ({"repeats": 1.5}, r"dataset 2: repeats 1.5 is not a whole number >= 1"),
        ({"loss_weight": 0}, r"dataset 2: loss_weight 0 is not a number > 0"),
        ({"loss_weight": "heavy"}, r"dataset 2: loss_weight 'heavy' is not a number > 0"),
        ({"max_pixels": "big"}, r"dataset 2: --max_pixels must be an integer, got 'big'"),
        ({"height": 64}, r"dataset 2: --height and --width go together"),
        ({"video_frame_stride": 4}, r"dataset 2: --video_frame_stride spaces the clips"),
        ({"base_path": "nowhere"}, r"dataset 2: base_path nowhere: no such folder"),
        ({"metadata_path": "none.csv"}, r"dataset 2: metadata_path none.csv: no such file"),
    ],
)
def test_bad_entries_name_the_file_the_dataset_and_the_key(tmp_path, two, entry, message):
    a, b = two
    path = write_config(tmp_path / "d.yaml", [{"base_path": str(a)}, {"base_path": str(b), **entry}])
    with pytest.raises(ConfigError, match=rf"--dataset_config {tmp_path / 'd.yaml'} {message}"):
        config = toy_config(tmp_path, dataset_config=path).check()
        config.check_data_paths()


def test_the_config_file_is_checked_and_exclusive_with_dataset_base_path(tmp_path, two):
    a, b = two
    path = write_config(tmp_path / "d.yaml", [{"base_path": str(a)}])
    with pytest.raises(ConfigError, match=r"--dataset_config .*d.yaml and --dataset_base_path both name the data"):
        toy_config(tmp_path, dataset_config=path, dataset_base_path=str(a)).check()
    from diffsynth.training.config import parse_args

    parsed, _ = parse_args(["--family", TASK, "--dataset_config", path, "--output_path", str(tmp_path / "out")])
    assert parsed.dataset_config == path and parsed.dataset_base_path is None
    (tmp_path / "bad.yaml").write_text("base_path: a\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: expected a list of datasets under the key datasets"):
        toy_config(tmp_path, dataset_config=str(tmp_path / "bad.yaml")).check().check_data_paths()
    with pytest.raises(ConfigError, match=r"--dataset_config .*absent.yaml: no such file"):
        toy_config(tmp_path, dataset_config=str(tmp_path / "absent.yaml")).check().check_data_paths()
    toml = tmp_path / "d.toml"
    toml.write_text(
        f'[[datasets]]\nbase_path = "{a}"\nrepeats = 2\n\n[[datasets]]\nbase_path = "{b}"\nloss_weight = 0.5\n'
    )
    entries = dataset_entries(toy_config(tmp_path, dataset_config=str(toml)))
    assert [(e.config.dataset_base_path, e.repeats, e.loss_weight) for e in entries] == [
        (str(a), 2, 1.0),
        (str(b), 1, 0.5),
    ]


def test_the_readme_example_reads(tmp_path, monkeypatch):
    from diffsynth.runtime.testing.readme import blocks

    readme = Path(__file__).parents[1] / "README.md"
    (example,) = [b.code for b in blocks(readme.read_text()) if b.lang == "yaml" and "datasets:" in b.code]
    monkeypatch.chdir(tmp_path)
    write_dataset(tmp_path / "data" / "subject", [(64, 64)] * 2)
    write_dataset(tmp_path / "data" / "regularization", [(64, 64)] * 3)
    (tmp_path / "datasets.yaml").write_text(example)
    config = toy_config(tmp_path, dataset_config="datasets.yaml").check()
    config.check_data_paths()
    entries = dataset_entries(config)
    assert [(e.repeats, e.loss_weight, e.config.trigger_word) for e in entries] == [
        (10, 1.0, "sks dog"),
        (1, 0.5, None),
    ]
    assert setup(config).dataset.repeats == [10, 10, 1, 1, 1]


def test_the_held_out_folder_is_read_alone_beside_the_datasets(tmp_path, two):
    a, b = two
    config = write_config(tmp_path / "d.yaml", [{"base_path": str(a), "trigger_word": "sks", "loss_weight": 2}])
    cfg = toy_config(tmp_path, dataset_config=config, validation_dataset_base_path=str(b))
    run = setup(cfg)
    assert len(run.dataset) == 3 and run.validation_set.size == 4
    assert all(LOSS_WEIGHT_KEY not in sample for sample in run.validation_set.samples)
    run_stage(replace(cfg, cache_dir=str(tmp_path / "c"), stage="encode"))
    cached = setup(replace(cfg, cache_dir=str(tmp_path / "c")))
    assert len(cached.dataset) == 3 and cached.validation_set.size == 4


def test_masked_loss_needs_masks_in_some_dataset_not_each(tmp_path, two):
    from PIL import Image

    a, b = two
    rows = [json.loads(line) for line in (b / "metadata.jsonl").read_text().splitlines()]
    Image.new("L", (64, 64), 255).save(b / "mask0.png")
    rows[0]["loss_mask"] = "mask0.png"
    (b / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    both = write_config(tmp_path / "both.yaml", [{"base_path": str(a)}, {"base_path": str(b)}])
    dataset = setup(toy_config(tmp_path, dataset_config=both, masked_loss=True)).dataset
    assert "loss_mask" not in dataset[0] and dataset[3]["loss_mask"].shape == (1, 64, 64)
    alone = write_config(tmp_path / "alone.yaml", [{"base_path": str(a)}])
    with pytest.raises(ConfigError, match=r"--masked_loss: no dataset of --dataset_config .*alone.yaml has a mask"):
        setup(toy_config(tmp_path, dataset_config=alone, masked_loss=True))


def test_direct_distillation_weighs_each_sample_by_its_dataset(tmp_path):
    from diffsynth.training.trainer import direct_distill_loss, distill_plan, prepare_batch

    data = write_images(tmp_path / "d", [(64, 64)] * 2)
    rows = [{"image": name, "prompt": f"picture {i}", "seed": 7 + i} for i, name in enumerate(data)]
    (tmp_path / "d" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    entries = [{"base_path": str(tmp_path / "d")}, {"base_path": str(tmp_path / "d"), "loss_weight": 3}]
    config = write_config(tmp_path / "d.yaml", entries)
    run = setup(toy_config(tmp_path, dataset_config=config, task="direct_distill", max_pixels=64 * 64))

    def loss(indices):
        items = [run.dataset[i] for i in indices]
        with torch.no_grad():
            return direct_distill_loss(run, run.model, prepare_batch(run, items), distill_plan(run.config, items))

    first, second = loss([0]), loss([1])  # rows 0 and 1 at weight 1
    assert loss([2]) == 3 * first and first > 0
    torch.testing.assert_close(loss([0, 3]), (first + 3 * second) / 2, rtol=1e-6, atol=0)
