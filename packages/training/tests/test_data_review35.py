"""Metadata rows that would train on cut or "None" captions, the cache tied to its dataset folder and files,
16-bit masks, kohya folders beside stray ones, the trigger word as a whole word, LTX-2 clips of two frame rates."""

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffsynth_training_toy import toy_config, write_dataset
from PIL import Image

from diffsynth.runtime.errors import ConfigError
from diffsynth.training.data import MetadataDataset, batch_plan, read_metadata, with_trigger


# ----------------------------------------------------------------------------------- metadata rows
@pytest.mark.parametrize(
    ("text", "fields"),
    [
        ("image,prompt\na.png,a cat\nb.png,a cat, fluffy\n", 3),  # an unquoted comma: the caption cut
        ("image,prompt\na.png,a cat\nb.png\n", 1),  # a missing field: the prompt None
    ],
)
def test_a_csv_row_with_more_or_fewer_fields_than_its_header_is_refused(tmp_path, text, fields):
    (tmp_path / "metadata.csv").write_text(text)
    with pytest.raises(ConfigError, match=rf"metadata.csv row 2: {fields} fields for the 2 columns.*double quotes"):
        read_metadata(tmp_path / "metadata.csv")


def test_a_quoted_comma_and_an_empty_field_still_read(tmp_path):
    (tmp_path / "metadata.csv").write_text('image,prompt,extra\na.png,"a cat, fluffy",\n')
    assert read_metadata(tmp_path / "metadata.csv") == [{"image": "a.png", "prompt": "a cat, fluffy", "extra": ""}]


@pytest.mark.parametrize(
    "text",
    [
        "image,prompt\na.png,a cat,\n",  # a row ending with a stray comma
        "image,prompt,\na.png,a cat\n",  # a header ending with one (spreadsheet exports)
        "image,prompt,\na.png,a cat,\n",
    ],
)
def test_a_stray_trailing_comma_in_a_csv_row_or_header_is_ignored(tmp_path, text):
    (tmp_path / "metadata.csv").write_text(text)
    assert read_metadata(tmp_path / "metadata.csv") == [{"image": "a.png", "prompt": "a cat"}]


@pytest.mark.parametrize("prompt", [None, ["a", "list"], 5])
@pytest.mark.parametrize("name", ["metadata.json", "metadata.jsonl"])
def test_a_json_prompt_that_is_not_text_is_refused(tmp_path, prompt, name):
    rows = [{"image": "a.png", "prompt": "a dog"}, {"image": "b.png", "caption": prompt, "sizes": [1, 2]}]
    text = json.dumps(rows) if name.endswith(".json") else "".join(json.dumps(r) + "\n" for r in rows)
    (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError, match=rf"{name} row 2 column prompt: .* is not text"):
        read_metadata(tmp_path / name)


# ----------------------------------------------------------------------------------- masks, kohya, trigger
def test_a_16_bit_mask_is_scaled_not_clipped(tmp_path):
    Image.new("RGB", (64, 64), (100, 100, 100)).save(tmp_path / "a.png")
    mask = np.zeros((64, 64), np.uint16)
    mask[:, :32] = 32768  # mid-grey in 16 bits
    Image.fromarray(mask).save(tmp_path / "m16.png")
    (tmp_path / "metadata.csv").write_text("image,prompt,loss_mask\na.png,x,m16.png\n")
    weights = MetadataDataset(tmp_path, media=("image",), max_pixels=64 * 64, step=16, masked_loss=True)[0]
    assert float(weights["loss_mask"][0, :, :32].mean()) == pytest.approx(128 / 255)
    assert float(weights["loss_mask"][0, :, 32:].max()) == 0.0


@pytest.mark.parametrize("stray", [".ipynb_checkpoints", "logs", "__MACOSX"])
def test_kohya_folders_beside_a_stray_folder_read_and_ignore_it(tmp_path, stray):
    (tmp_path / "10_sks dog").mkdir()
    (tmp_path / stray).mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (64, 64)).save(tmp_path / "10_sks dog" / name)
    if stray != "logs":  # a hidden copy of a picture is ignored too; logs/ holds text only
        Image.new("RGB", (64, 64)).save(tmp_path / stray / "a.png")
    (tmp_path / stray / "notes.txt").write_text("not a caption")
    rows = MetadataDataset(tmp_path, media=("image",), max_pixels=64 * 64, step=16).rows
    assert rows == [{"image": f"10_sks dog/{n}", "prompt": "sks dog", "repeats": 10} for n in ("a.png", "b.png")]


def test_a_numbered_folder_beside_a_folder_of_captioned_pictures_is_no_kohya_folder(tmp_path):
    for folder in ("2024_holiday", "photos"):
        (tmp_path / folder).mkdir()
        Image.new("RGB", (64, 64)).save(tmp_path / folder / "a.png")
        (tmp_path / folder / "a.txt").write_text(f"{folder} picture")
    rows = MetadataDataset(tmp_path, media=("image",), max_pixels=64 * 64, step=16).rows
    assert rows == [{"image": f"{f}/a.png", "prompt": f"{f} picture"} for f in ("2024_holiday", "photos")]


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a street in TOKYO", "TOK, a street in TOKYO"),  # within a word: added
        ("a TOK in a street", "a TOK in a street"),  # a word of its own: kept as it is
        ("[trigger] at night", "TOK at night"),
    ],
)
def test_the_trigger_word_is_added_unless_the_prompt_holds_it_as_a_word(prompt, expected):
    assert with_trigger({"prompt": prompt}, "TOK")["prompt"] == expected


# ----------------------------------------------------------------------------------- the cache
@pytest.fixture
def encoded(tmp_path):
    """A toy dataset encoded into a cache: (folder, cache, config of the encode stage)."""
    from diffsynth.training.trainer import encode_dataset

    torch.manual_seed(0)
    folder = write_dataset(tmp_path / "a", [(64, 64)] * 2)
    cfg = toy_config(tmp_path, folder, cache_dir=str(tmp_path / "cache"), max_steps=1, stage="encode")
    encode_dataset(cfg)
    return folder, tmp_path / "cache", cfg


def _latents(cache: Path, index: int) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(cache / "items" / f"{index:06d}.safetensors"))["latents"]


def _replace_picture(path: Path) -> None:
    Image.new("RGB", (64, 64), (0, 0, 255)).save(path)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a second later, whatever the clock's grain


def test_a_cache_of_another_folder_with_the_same_metadata_is_refused(encoded, tmp_path):
    from diffsynth.training.trainer import setup

    folder, cache, cfg = encoded
    other = write_dataset(tmp_path / "b", [(32, 32)] * 2)  # other pictures under the same names
    (other / "metadata.csv").write_bytes((folder / "metadata.csv").read_bytes())
    with pytest.raises(ConfigError, match=r"encoded with --dataset_base_path .*/a'.* this run has .*/b'"):
        setup(replace(cfg, dataset_base_path=str(other), stage="train"))


def test_a_replaced_picture_is_refused_in_training_and_re_encoded_by_the_encode_stage(encoded):
    from diffsynth.training.trainer import encode_dataset, setup

    folder, cache, cfg = encoded
    before = [_latents(cache, i) for i in range(2)]
    _replace_picture(folder / "img0.png")
    with pytest.raises(ConfigError, match=r"1 dataset files changed since they were encoded \(.*img0.png"):
        setup(replace(cfg, stage="train"))
    encode_dataset(cfg)
    assert not torch.equal(_latents(cache, 0), before[0])  # re-encoded from the new picture
    assert torch.equal(_latents(cache, 1), before[1])  # kept
    assert setup(replace(cfg, stage="train")).dataset is not None


def test_a_cache_written_before_the_folder_and_files_were_recorded_still_trains(encoded):
    from diffsynth.training.trainer import setup

    _, cache, cfg = encoded
    index = json.loads((cache / "index.json").read_text())
    del index["sources"], index["settings"]["dataset_base_path"]
    (cache / "index.json").write_text(json.dumps(index))
    assert len(setup(replace(cfg, stage="train")).dataset) == 2


def test_a_cache_of_its_dataset_moved_with_its_files_unchanged_trains(encoded, tmp_path, caplog):
    import shutil

    from diffsynth.training.trainer import setup

    folder, _, cfg = encoded
    moved = tmp_path / "moved"
    shutil.copytree(folder, moved)  # copy2: sizes and modification times kept
    shutil.rmtree(folder)
    with caplog.at_level("INFO", logger="diffsynth.training.data"):
        assert len(setup(replace(cfg, dataset_base_path=str(moved), stage="train")).dataset) == 2
    assert "the dataset moved" in caplog.text
    assert "gone" not in caplog.text  # its files are found under the new folder


def test_an_unchanged_cache_from_before_items_recorded_their_files_is_not_re_encoded(encoded, monkeypatch):
    from safetensors.torch import load_file, save_file

    import diffsynth.training.trainer as trainer

    folder, cache, cfg = encoded
    for item in (cache / "items").iterdir():  # as items were written before they recorded their files
        save_file(load_file(str(item)), str(item))
    later = (cache / "items" / "000000.safetensors").stat().st_mtime_ns + 10**9
    os.utime(folder / "img0.png", ns=(later, later))  # a picture newer than its encoded sample
    counts = []
    write_cache = trainer.write_cache
    monkeypatch.setattr(trainer, "write_cache", lambda *a, **k: counts.append(write_cache(*a, **k)) or counts[-1])
    trainer.encode_dataset(cfg)
    assert counts == [1]  # the sample of the newer picture only


# ----------------------------------------------------------------------------------- LTX-2 frame rates
def test_ltx2_clips_of_two_frame_rates_never_share_a_batch(tmp_path):
    pytest.importorskip("diffsynth.ltx2")
    from diffsynth.ltx2.training import rates_batch_apart
    from diffsynth.runtime.media import save_video

    rows = []
    for i, fps in enumerate((24, 25, 24, 25)):
        save_video([np.full((32, 32, 3), 60 * i, np.uint8)] * 5, tmp_path / f"clip{i}.mp4", fps=fps)
        rows.append({"video": f"clip{i}.mp4", "prompt": "a clip"})
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    dataset = MetadataDataset(tmp_path, media=("video",), max_pixels=32 * 32, step=16, num_frames=5)
    assert len(set(dataset.batch_keys)) == 1  # one size and frame count
    rates_batch_apart(dataset)
    assert [key[-1] for key in dataset.batch_keys] == [24.0, 25.0, 24.0, 25.0]
    for epoch in range(3):
        batches = batch_plan(dataset.batch_keys, batch_size=2, epoch=epoch)
        assert sorted(map(sorted, batches)) == [[0, 2], [1, 3]]
    one_rate = MetadataDataset(tmp_path, media=("video",), max_pixels=32 * 32, step=16, num_frames=5, fps=24)
    keys = list(one_rate.batch_keys)
    rates_batch_apart(one_rate)
    assert one_rate.batch_keys == keys  # one rate: the keys (and a resumed run's plan) as they were
