"""Conditioning columns in the dataset: pixel-aligned ones (`aligned`) read as the target is, a task's setup check of
each row (`check_row`), each sample's conditioning sizes in its batch key, and errors of a batch naming the metadata
rows of its items (`Row.source`, `naming_rows`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffsynth.runtime.errors import ConfigError
from diffsynth.training.data import (
    CachedDataset,
    MetadataDataset,
    Row,
    batch_plan,
    naming_rows,
    plan_fingerprint,
    plan_keys,
    write_cache_index,
)
from diffsynth.training.datasets import LOSS_WEIGHT_KEY
from diffsynth.training.trainer import encode_with_masks


def ramp(path, width: int, height: int) -> str:
    """A horizontal ramp (so a crop or a squeeze shows), saved at `path`; returns its name."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[..., 0] = np.linspace(0, 255, width).astype(np.uint8)[None]
    pixels[..., 1] = np.linspace(0, 255, height).astype(np.uint8)[:, None]
    Image.fromarray(pixels).save(path)
    return path.name


def write_rows(folder, rows) -> None:
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.mark.parametrize("fixed", [(32, 32), None])
def test_an_aligned_column_is_read_as_the_target(tmp_path, fixed):
    """An identity pair (source == target, 64x32) at a fixed smaller square size, and bucketed with a source twice the
    target's size: the aligned source reaches the task as the target; an unaligned one keeps its own size."""
    ramp(tmp_path / "pic.png", 64, 32)
    source = "pic.png" if fixed else ramp(tmp_path / "big.png", 128, 64)
    write_rows(tmp_path, [{"image": "pic.png", "prompt": "keep it", "ref": source}])
    common = {"media": ("image",), "conditioning": ("ref",), "max_pixels": 64 * 32, "step": 16, "fixed": fixed}
    aligned = MetadataDataset(tmp_path, aligned=("ref",), **common)[0]
    assert aligned["image"].shape == ((3, 32, 32) if fixed else (3, 32, 64))
    if fixed:
        torch.testing.assert_close(aligned["ref"], aligned["image"], rtol=0, atol=0)
    else:  # the same picture at twice the size: the same crop, resampled
        assert aligned["ref"].shape == aligned["image"].shape
        assert (aligned["ref"] - aligned["image"]).abs().mean() < 0.05
    own = MetadataDataset(tmp_path, **common)[0]
    assert own["ref"].shape == (3, 32, 64)  # a reference keeps its own bucket under max_pixels


def test_a_task_checks_each_row_at_setup_with_header_sizes(tmp_path):
    for k in range(3):
        ramp(tmp_path / f"p{k}.png", 32 if k < 2 else 48, 32)
    write_rows(tmp_path, [{"image": f"p{k}.png", "prompt": "x", "other": "p2.png"} for k in range(3)])
    seen = []

    def check(row, size):
        seen.append((row["image"], size("image", row["image"])))
        if row["image"] == "p2.png":
            raise ConfigError(f"column image: {row['image']} is {size('image', row['image'])}")

    with pytest.raises(ConfigError, match=r"metadata.jsonl row 3 column image: p2.png is \(48, 32\)"):
        MetadataDataset(tmp_path, media=("image",), check_row=check)
    assert seen == [("p0.png", (32, 32)), ("p1.png", (32, 32)), ("p2.png", (48, 32))]
    (tmp_path / "p1.png").write_text("not a picture")
    with pytest.raises(ConfigError, match=r"metadata.jsonl row 2 column image: .*p1.png cannot be read"):
        MetadataDataset(tmp_path, media=("image",), check_row=lambda row, size: size("image", row["image"]))


def test_conditioning_sizes_split_batches_and_batch_one_plans_stay(tmp_path):
    """Edit rows of one target size with edit images of two sizes (and one row with two): batches of 2 hold one
    conditioning size and count; batch-1 plans and datasets without conditioning keep their keys."""
    rows = []
    for k in range(8):
        image, edit = ramp(tmp_path / f"i{k}.png", 32, 32), ramp(tmp_path / f"e{k}.png", 32 if k < 4 else 64, 32)
        rows.append({"image": image, "prompt": f"edit {k}", "edit_image": [edit, edit] if k == 7 else edit})
    write_rows(tmp_path, rows)
    dataset = MetadataDataset(tmp_path, media=("image",), conditioning=("edit_image",), max_pixels=64 * 64, step=16)
    assert dataset.sample_conditioning[0] == (1, 32, 32) and dataset.sample_conditioning[4] == (1, 64, 32)
    assert dataset.sample_conditioning[7] == (2, 64, 32, 64, 32)
    assert plan_keys(dataset, 1) == [(32, 32)] * 8  # batch 1: the buckets alone, as before
    plain = MetadataDataset(tmp_path, media=("image",), max_pixels=64 * 64, step=16)
    assert plain.batch_keys == [(32, 32, 1)] * 8  # no conditioning columns: the keys as before
    assert plan_fingerprint(plan_keys(dataset, 1), dataset.repeats) == plan_fingerprint(
        plan_keys(plain, 1), plain.repeats
    )
    for epoch in range(4):
        for batch in batch_plan(dataset.batch_keys, batch_size=2, seed=0, epoch=epoch):
            shapes = {tuple(tuple(e.shape) for e in _edits(dataset[i])) for i in batch}
            assert len(shapes) == 1, batch


def _edits(row):
    value = row["edit_image"]
    return value if isinstance(value, list) else [value]


def test_the_cache_keeps_the_conditioning_keys(tmp_path):
    from safetensors.torch import save_file

    data, cache = tmp_path / "data", tmp_path / "cache"
    data.mkdir()
    rows = [
        {
            "image": ramp(data / f"i{k}.png", 32, 32),
            "prompt": "x",
            "edit_image": ramp(data / f"e{k}.png", 32 * (k + 1), 32),
        }
        for k in range(2)
    ]
    write_rows(data, rows)
    dataset = MetadataDataset(data, media=("image",), conditioning=("edit_image",), max_pixels=64 * 64, step=16)
    (cache / "items").mkdir(parents=True)
    for i in range(len(dataset)):
        save_file({"latents": torch.zeros(16, 4, 4)}, str(cache / "items" / f"{i:06d}.safetensors"))
    write_cache_index(cache, dataset, {})
    assert CachedDataset(cache).batch_keys == dataset.batch_keys == [(32, 32, 1, 1, 32, 32), (32, 32, 1, 1, 64, 32)]


def test_items_name_their_rows_and_a_batch_error_names_them(tmp_path):
    for k in range(2):
        ramp(tmp_path / f"p{k}.png", 32, 32)
    write_rows(tmp_path, [{"image": f"p{k}.png", "prompt": "x"} for k in range(2)])
    dataset = MetadataDataset(tmp_path, media=("image",))
    items = [dataset[1], dataset[0]]
    assert isinstance(items[0], Row) and items[0].source == f"{dataset.metadata} row 2"

    class Task:
        def encode(self, rows):
            raise ConfigError("row 1 of the batch has no edit_image")

    with pytest.raises(ConfigError) as error:
        encode_with_masks(Task(), items)
    assert str(error.value) == f"{dataset.metadata} row 1 (row 1 of the batch) has no edit_image"
    with pytest.raises(ConfigError, match=r"the batch has odd sizes \(the batch holds .*row 2, .*row 1\)"):
        with naming_rows([item.source for item in items]):
            raise ConfigError("the batch has odd sizes")
    with pytest.raises(ConfigError, match="^row 0 of the batch: bad$"):  # items of no metadata row: as raised
        with naming_rows([None]):
            raise ConfigError("row 0 of the batch: bad")
    weighted = [Row({**item, LOSS_WEIGHT_KEY: 2.0}, source=item.source) for item in items]  # --dataset_config
    with pytest.raises(ConfigError, match=r"metadata.jsonl row 1 \(row 1 of the batch\)"):
        encode_with_masks(Task(), weighted)
