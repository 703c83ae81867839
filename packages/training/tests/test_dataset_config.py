"""`--dataset_config`: several datasets in one run (datasets.py)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from diffsynth_training_toy import PROMPTS, TASK, write_dataset, write_images

from diffsynth.runtime.errors import ConfigError
from diffsynth.training.config import TrainConfig
from diffsynth.training.data import batch_plan
from diffsynth.training.datasets import LOSS_WEIGHT_KEY, dataset_entries
from diffsynth.training.testing import first_losses, train_direct_and_cached
from diffsynth.training.trainer import make_dataset, run_stage, setup, train


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
    plan = batch_plan(combined.batch_keys, batch_size=2, seed=0, repeats=combined.repeats)
    assert plan == batch_plan(one.dataset.batch_keys, batch_size=2, seed=0, repeats=one.dataset.repeats)
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
    # the two encode in different batches, so the float sums may round apart in the last bits (as test_trainer's)
    assert len(direct) == 3 and cached == pytest.approx(direct, rel=1e-6)
    want, got = runs.checkpoints(3)
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6)
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


@pytest.mark.parametrize("suffix", [".toml", ".yaml"])
def test_a_config_file_with_a_byte_order_mark_reads(tmp_path, two, suffix):
    """Windows Notepad saves UTF-8 with a byte-order mark first, which TOML's parser refuses."""
    a, _ = two
    path = tmp_path / f"d{suffix}"
    text = (
        f'[[datasets]]\nbase_path = "{a}"\nrepeats = 2\n' if suffix == ".toml" else f"- base_path: {a}\n  repeats: 2\n"
    )
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    (entry,) = dataset_entries(toy_config(tmp_path, dataset_config=str(path)))
    assert (entry.config.dataset_base_path, entry.repeats) == (str(a), 2)
    path.write_bytes(b"\xff\xfe" + text.encode("utf-16-le"))  # "Unicode" in Notepad's list
    with pytest.raises(ConfigError, match=rf"--dataset_config {path} is not UTF-8 text"):
        dataset_entries(toy_config(tmp_path, dataset_config=str(path)))


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


# ----------------------------------------------------------------------------------- musubi-tuner's and kohya's files
def write_toml(path, general, datasets) -> str:
    """A dataset config TOML as musubi-tuner and kohya write them (`subsets` become `[[datasets.subsets]]`)."""

    def table(values, indent=""):
        return "".join(f"{indent}{k} = {json.dumps(v)}\n" for k, v in values.items() if k != "subsets")

    text = f"[general]\n{table(general)}"
    for dataset in datasets:
        text += f"\n[[datasets]]\n{table(dataset)}"
        for subset in dataset.get("subsets", []):
            text += f"\n  [[datasets.subsets]]\n{table(subset, '  ')}"
    path.write_text(text)
    return str(path)


def captioned(folder, count, seed=0, uncaptioned=0):
    """`count` captioned 64x64 pictures (`img{i}.png` + `img{i}.txt`), then `uncaptioned` without a caption."""
    names = write_images(folder, [(64, 64)] * (count + uncaptioned), seed=seed)
    for i, name in enumerate(names[:count]):
        (folder / name).with_suffix(".txt").write_text(PROMPTS[i % len(PROMPTS)])
    return folder


def captioned_videos(folder, frames=(12, 9)):
    """Videos `clip{i}.mp4` (32x32, 8 fps, `frames[i]` frames) each captioned by `clip{i}.txt`."""
    from PIL import Image

    from diffsynth.runtime.media import save_video

    folder.mkdir(parents=True)
    for i, count in enumerate(frames):
        pictures = [Image.new("RGB", (32, 32), (16 * k, 8 * i, 0)) for k in range(count)]
        save_video(pictures, folder / f"clip{i}.mp4", fps=8, lossless=True)
        (folder / f"clip{i}.txt").write_text(PROMPTS[i])
    return folder


def same_datasets(tmp_path, theirs, ours, **run):
    """The entries and the combined datasets of their file and of ours are the same: settings, repeats, loss
    weights, buckets and frame counts, samples; returns their entries."""
    got = dataset_entries(toy_config(tmp_path, dataset_config=theirs, **run))
    want = dataset_entries(toy_config(tmp_path, dataset_config=ours, **run))
    assert [(e.config, e.repeats, e.loss_weight) for e in got] == [(e.config, e.repeats, e.loss_weight) for e in want]
    a, b = (
        setup(toy_config(tmp_path, dataset_config=theirs, **run)),
        setup(toy_config(tmp_path, dataset_config=ours, **run)),
    )
    assert len(a.dataset) == len(b.dataset) and a.dataset.batch_keys == b.dataset.batch_keys
    assert a.dataset.repeats == b.dataset.repeats and a.steps_per_epoch == b.steps_per_epoch
    for i in range(len(a.dataset)):
        x, y = a.dataset[i], b.dataset[i]
        assert x.keys() == y.keys() and x["prompt"] == y["prompt"]
        assert all(torch.equal(x[k], y[k]) for k in x if isinstance(x[k], torch.Tensor))
    return got


def test_a_musubi_file_reads_as_the_same_datasets_in_our_names(tmp_path):
    from diffsynth_training_toy import VIDEO_TASK

    pictures, videos = captioned(tmp_path / "pictures", 3), captioned_videos(tmp_path / "videos")
    general = {"resolution": [32, 32], "caption_extension": ".txt", "batch_size": 2, "enable_bucket": True}
    general |= {"bucket_no_upscale": True, "num_repeats": 2}
    musubi = [
        {"image_directory": str(pictures), "cache_directory": str(tmp_path / "cache")},
        {"video_directory": str(videos), "cache_directory": str(tmp_path / "cache2"), "target_frames": [3]}
        | {"frame_extraction": "chunk", "num_repeats": 3, "enable_bucket": False, "resolution": [32, 16]},
    ]
    ours = [
        {"base_path": str(pictures), "repeats": 2, "max_pixels": 32 * 32},
        {"base_path": str(videos), "repeats": 3, "width": 32, "height": 16, "num_frames": 3}
        | {"video_frame_extraction": "chunk"},
    ]
    theirs = write_toml(tmp_path / "musubi.toml", general, musubi)
    entries = same_datasets(tmp_path, theirs, write_config(tmp_path / "ours.yaml", ours), family=VIDEO_TASK)
    assert [e.repeats for e in entries] == [2, 3]  # and the clips: 12 frames in 4 chunks of 3, 9 in 3
    assert len(setup(toy_config(tmp_path, dataset_config=theirs, family=VIDEO_TASK)).dataset) == 3 + 4 + 3
    musubi[1]["target_frames"] = [4]  # the toy video VAE encodes 2k + 1 frames: named with its dataset
    four = write_toml(tmp_path / "four.toml", general, musubi)
    with pytest.raises(ConfigError, match=rf"{four} dataset 2: num_frames 4: toy_video encodes videos of 2k \+ 1"):
        setup(toy_config(tmp_path, dataset_config=four, family=VIDEO_TASK))
    # several target_frames: the dataset once per length, each length in batches of its own
    several = write_toml(tmp_path / "several.toml", {}, [{"video_directory": str(videos), "target_frames": [1, 3]}])
    ours = [{"base_path": str(videos), "num_frames": n} for n in (1, 3)]
    same_datasets(tmp_path, several, write_config(tmp_path / "o.yaml", ours), family=VIDEO_TASK, batch_size=2)
    # frame_extraction full: each whole video up to max_frames, its length cut to what the VAE encodes (2k + 1 here)
    full = write_toml(tmp_path / "full.toml", {}, [{"video_directory": str(videos), "frame_extraction": "full"}
                                                   | {"max_frames": 10, "target_frames": [3]}])  # fmt: skip
    ours = [{"base_path": str(videos), "num_frames": 10, "video_frame_extraction": "full"}]
    same_datasets(tmp_path, full, write_config(tmp_path / "f.yaml", ours), family=VIDEO_TASK, batch_size=2)
    assert setup(toy_config(tmp_path, dataset_config=full, family=VIDEO_TASK)).dataset.sample_frames == [9, 9]


def test_a_musubi_jsonl_file_reads_its_image_path_and_caption(tmp_path):
    folder = captioned(tmp_path / "pictures", 3)
    rows = [{"image_path": str(folder / f"img{i}.png"), "caption": PROMPTS[i]} for i in range(3)]
    (tmp_path / "musubi.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    theirs = write_toml(tmp_path / "m.toml", {}, [{"image_jsonl_file": str(tmp_path / "musubi.jsonl")}])
    got = setup(toy_config(tmp_path, dataset_config=theirs)).dataset
    want = setup(toy_config(tmp_path, dataset_config=write_config(tmp_path / "o.yaml", [{"base_path": str(folder)}])))
    assert [got[i]["prompt"] for i in range(3)] == PROMPTS[:3] and got.buckets == want.dataset.buckets
    assert all(torch.equal(got[i]["image"], want.dataset[i]["image"]) for i in range(3))
    rows[1]["control_path"] = rows[1]["image_path"]
    (tmp_path / "musubi.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ConfigError, match=r"dataset 1: image_jsonl_file .*musubi.jsonl row 2 has control_path"):
        dataset_entries(toy_config(tmp_path, dataset_config=theirs))


def test_a_kohya_file_reads_its_subsets_repeats_and_regularization(tmp_path):
    subject, reg = captioned(tmp_path / "subject", 2), captioned(tmp_path / "reg", 6, seed=1)
    general = {"caption_extension": ".txt", "shuffle_caption": False, "keep_tokens": 0, "resolution": 64}
    general |= {"enable_bucket": True, "bucket_no_upscale": True}
    kohya = [
        {"batch_size": 2, "prior_loss_weight": 0.5, "resolution": [64, 32]}
        | {
            "subsets": [
                {"image_dir": str(subject), "num_repeats": 3, "class_tokens": "sks dog"},
                {"image_dir": str(reg), "is_reg": True, "class_tokens": "dog", "cache_info": True},
            ]
        },
        {"subsets": [{"image_dir": str(subject)}]},  # general's resolution, one repeat, a weight of 1
    ]
    ours = [
        {"base_path": str(subject), "repeats": 3, "max_pixels": 64 * 32},
        {"base_path": str(reg), "loss_weight": 0.5, "max_pixels": 64 * 32},
        {"base_path": str(subject), "max_pixels": 64 * 64},
    ]
    theirs = write_toml(tmp_path / "kohya.toml", general, kohya)
    entries = same_datasets(tmp_path, theirs, write_config(tmp_path / "ours.yaml", ours))
    assert [(e.repeats, e.loss_weight) for e in entries] == [(3, 1.0), (1, 0.5), (1, 1.0)]
    assert entries[1].where == f"--dataset_config {theirs} dataset 1 subset 2"
    # kohya fits 6 regularization pictures to 2 x 3 training ones; with 4 repeats they would not fit: refused
    kohya[0]["subsets"][0]["num_repeats"] = 4
    write_toml(tmp_path / "kohya.toml", general, kohya)
    with pytest.raises(
        ConfigError, match=r"dataset 1: its regularization subsets \(is_reg\) give 6 .*training subsets 8"
    ):
        dataset_entries(toy_config(tmp_path, dataset_config=theirs))


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"frame_extraction": "full", "max_frames": 0}, r"max_frames 0 must be a whole number of frames >= 1"),
        ({"frame_extraction": "full", "max_frames": 9, "num_frames": 9}, r"max_frames and num_frames both bound"),
        ({"source_fps": 30.0}, r"source_fps is not supported here: .* give video_fps .* or --video_fps"),
        ({"control_directory": "c"}, r"control_directory is not supported here"),
        ({"metadata_file": "m.json"}, r"metadata_file is not supported here: kohya's fine-tuning metadata"),
        ({"fp_latent_window_size": 9}, r"fp_latent_window_size is not supported here: FramePack's"),
        ({"caption_extension": ".md"}, r"caption_extension '.md' is not read here; captions are .txt or .caption"),
        ({"batch_size": 4}, r"batch_size 4 is the run's --batch_size here, which is 2 .*pass --batch_size 4"),
        ({"shuffle_caption": True}, r"shuffle_caption True is the run's --shuffle_caption here, which is False"),
        ({"caption_dropout_rate": 0.1}, r"caption_dropout_rate 0.1 is the run's --caption_dropout here"),
        ({"keep_tokens": 1}, r"keep_tokens 1 is the run's --keep_tokens here"),
        ({"color_aug": True}, r"color_aug True is not supported here \(only color_aug = False\)"),
        ({"resolution": [64]}, r"resolution \[64\] must be a number of pixels or \[width, height\]"),
        ({"num_repeats": 2, "repeats": 2}, r"num_repeats and repeats both give the dataset's repeats"),
        ({"is_reg": True, "loss_weight": 2}, r"is_reg and loss_weight both give"),
        ({"class_tokens": "dog"}, r"class_tokens 'dog' would caption 1 pictures without a caption file \('img3.png'\)"),
        ({"repeet": 2}, r"unknown key 'repeet'; the known keys are base_path, .* and of musubi-tuner's and kohya's "),
    ],
)
def test_what_their_files_cannot_mean_here_is_refused_by_name(tmp_path, values, message):
    folder = captioned(tmp_path / "pictures", 3, uncaptioned=1 if "class_tokens" in values else 0)
    path = write_toml(tmp_path / "d.toml", {}, [{"image_directory": str(captioned(tmp_path / "a", 1))},
                                                {"image_directory": str(folder), **values}])  # fmt: skip
    with pytest.raises(ConfigError, match=rf"--dataset_config {path} dataset 2: {message}"):
        toy_config(tmp_path, dataset_config=path).check().check_data_paths()


def test_a_folder_with_a_metadata_file_or_two_caption_extensions_is_refused(tmp_path):
    folder = captioned(tmp_path / "pictures", 2)
    (folder / "img0.caption").write_text("another caption")  # read after img0.txt: .txt is taken as it is
    dataset_entries(toy_config(tmp_path, dataset_config=write_toml(tmp_path / "t.toml", {}, [{"image_dir": str(folder)}
        | {"caption_extension": ".txt"}])))  # fmt: skip
    path = write_toml(tmp_path / "d.toml", {"caption_extension": ".caption"}, [{"image_dir": str(folder)}])
    with pytest.raises(
        ConfigError,
        match=r"'.caption', but 2 pictures \('img0.png', 'img1.png'\) would be captioned here by their .txt",
    ):
        dataset_entries(toy_config(tmp_path, dataset_config=path))
    write_dataset(folder, [(64, 64)])  # metadata.csv, which would be read in place of the captions
    path = write_toml(tmp_path / "d.toml", {}, [{"image_dir": str(folder)}])
    with pytest.raises(ConfigError, match=r"dataset 1: image_dir .* holds metadata.csv, which is read here in place"):
        dataset_entries(toy_config(tmp_path, dataset_config=path))


def test_the_readme_toml_example_reads(tmp_path, monkeypatch):
    from diffsynth.runtime.testing.readme import blocks

    readme = Path(__file__).parents[1] / "README.md"
    (example,) = [b.code for b in blocks(readme.read_text()) if b.lang == "toml" and "[[datasets]]" in b.code]
    monkeypatch.chdir(tmp_path)
    captioned(tmp_path / "data" / "subject", 2)
    (tmp_path / "data" / "clips").mkdir()
    (tmp_path / "datasets.toml").write_text(example)
    config = toy_config(tmp_path, dataset_config="datasets.toml", batch_size=1).check()
    config.check_data_paths()
    entries = dataset_entries(config)
    assert [(e.config.dataset_base_path, e.repeats, e.config.max_pixels) for e in entries] == [
        ("data/subject", 10, 960 * 544),
        ("data/clips", 1, 960 * 544),
    ]
    assert (entries[1].config.num_frames, entries[1].config.video_frame_extraction) == (33, "chunk")


def test_several_musubi_target_frames_leave_out_the_lengths_a_video_is_too_short_for(tmp_path, caplog):
    from diffsynth_training_toy import VIDEO_TASK

    videos = captioned_videos(tmp_path / "videos", frames=(4, 6))  # musubi: 4 frames give 1 and 3, 6 give 1, 3, 5
    several = write_toml(tmp_path / "s.toml", {}, [{"video_directory": str(videos), "target_frames": [1, 3, 5]}])
    run = setup(toy_config(tmp_path, dataset_config=several, family=VIDEO_TASK, batch_size=1))
    dataset = run.dataset
    assert len(dataset) == 5 and dataset.sample_frames == [1, 1, 3, 3, 5]
    assert [dataset[i]["prompt"] for i in range(5)] == [PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[1], PROMPTS[1]]
    assert [dataset[i]["video"].shape[1] for i in range(5)] == [1, 1, 3, 3, 5]  # [3, F, H, W]
    assert [len(part) for part in dataset.parts] == [2, 2, 1] and run.steps_per_epoch == 5
    plan = batch_plan(dataset.batch_keys, batch_size=1, seed=0, repeats=dataset.repeats)
    assert sorted(i for batch in plan for i in batch) == list(range(5))
    assert "1 of 2 rows have a video of fewer than 5 frames ('clip0.mp4')" in caplog.text
    task = SimpleNamespace(media=("video", "image"), size_multiple=16, family=VIDEO_TASK)  # the data's settings
    # one length (and --num_frames) still refuses a video too short for it
    one = write_toml(tmp_path / "one.toml", {}, [{"video_directory": str(videos), "target_frames": [5]}])
    with pytest.raises(ConfigError, match=r"clip0.mp4 has 4 frames, fewer than one clip of --num_frames 5"):
        make_dataset(toy_config(tmp_path, dataset_config=one, family=VIDEO_TASK), task)
    # a dataset whose videos are all too short for every length gives nothing: refused, naming it
    long = write_toml(tmp_path / "long.toml", {}, [{"video_directory": str(videos), "target_frames": [7, 9]}])
    with pytest.raises(ConfigError, match=rf"{long} dataset 1: every video is shorter than each of its target_frames"):
        make_dataset(toy_config(tmp_path, dataset_config=long, family=VIDEO_TASK), task)
