"""File counts in batch keys: aligned and count-only conditioning columns join the keys by their count where rows
differ in it, within one dataset or across the datasets of a `--dataset_config` (`CombinedDataset`); a count-only
column's pictures of other sizes stack, and datasets whose rows agree keep their keys."""

from __future__ import annotations

import json

from PIL import Image

from diffsynth.training.config import TrainConfig
from diffsynth.training.data import MetadataDataset, batch_plan
from diffsynth.training.datasets import CombinedDataset, DatasetEntry


def folder(path, rows, sizes=None):
    """Pictures `p{k}.png` 32x32 (or `sizes[name]`) for every file a row names, and the rows' metadata."""
    path.mkdir()
    for row in rows:
        for value in row.values():
            for name in value if isinstance(value, list) else [value]:
                if name.endswith(".png"):
                    Image.new("RGB", (sizes or {}).get(name, (32, 32)), (200, 0, 0)).save(path / name)
    (path / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def part(path, **columns) -> MetadataDataset:
    return MetadataDataset(path, media=("image",), max_pixels=32 * 32, step=16, **columns)


def combined(tmp_path, parts) -> CombinedDataset:
    cfg = TrainConfig(family="toy", output_path=str(tmp_path / "out"))
    entries = [DatasetEntry(where=f"dataset {i + 1}", config=cfg) for i in range(len(parts))]
    return CombinedDataset(parts, entries, tmp_path / "d.yaml")


def test_two_datasets_with_and_without_an_aligned_column_batch_apart(tmp_path):
    """Dataset a: every row has a control picture; b: none. Each agrees within itself, so alone it keeps its keys,
    but together no batch mixes them; two datasets that agree with each other keep their keys."""
    a = part(folder(tmp_path / "a", [{"image": f"p{k}.png", "prompt": "x", "ctrl": "c.png"} for k in range(2)]),
             aligned=("ctrl",))  # fmt: skip
    b = part(folder(tmp_path / "b", [{"image": f"p{k}.png", "prompt": "x"} for k in range(2)]), aligned=("ctrl",))
    assert a.batch_keys == b.batch_keys == [(32, 32, 1)] * 2  # alone: the keys as before
    both = combined(tmp_path, [a, b])
    assert both.batch_keys == [(32, 32, 1, 1)] * 2 + [(32, 32, 1, 0)] * 2
    assert both.sample_conditioning == [(1,)] * 2 + [(0,)] * 2  # what a cache records, as the keys
    for seed in range(10):
        for batch in batch_plan(both.batch_keys, batch_size=2, seed=seed):
            assert len({i // 2 for i in batch}) == 1, batch
    assert combined(tmp_path, [a, a]).batch_keys == [(32, 32, 1)] * 4


def test_a_dataset_differing_within_itself_joins_one_that_does_not(tmp_path):
    """Dataset a's rows differ (it adds the counts itself); b agrees: b's samples get their counts too, once."""
    rows = [{"image": "p0.png", "prompt": "x", "ctrl": "c.png"}, {"image": "p1.png", "prompt": "x"}]
    a = part(folder(tmp_path / "a", rows), aligned=("ctrl",))
    b = part(folder(tmp_path / "b", [{"image": "p0.png", "prompt": "x"}]), aligned=("ctrl",))
    assert a.batch_keys == [(32, 32, 1, 1), (32, 32, 1, 0)] and b.batch_keys == [(32, 32, 1)]
    assert combined(tmp_path, [a, b]).batch_keys == [(32, 32, 1, 1), (32, 32, 1, 0), (32, 32, 1, 0)]


def test_count_only_references_of_other_sizes_stack_but_not_other_counts(tmp_path):
    """Four rows with one reference each at four sizes: one key, the keys of a dataset without the column; a row with
    two references batches apart. The references are still read at their own size."""
    sizes = {"r0.png": (32, 32), "r1.png": (64, 32), "r2.png": (32, 64), "r3.png": (48, 48)}
    rows = [{"image": f"p{k}.png", "prompt": "x", "ref": f"r{k}.png"} for k in range(4)]
    one = part(folder(tmp_path / "one", rows, sizes), conditioning=("ref",), counted=("ref",))
    assert one.batch_keys == [(32, 32, 1)] * 4
    assert one[1]["ref"].shape == (3, 16, 32)  # its own bucket under max_pixels, not the row's
    two = folder(tmp_path / "two", [*rows, {"image": "p4.png", "prompt": "x", "ref": ["r0.png", "r1.png"]}], sizes)
    assert part(two, conditioning=("ref",), counted=("ref",)).batch_keys == [(32, 32, 1, 1)] * 4 + [(32, 32, 1, 2)]
    sized = part(folder(tmp_path / "sized", rows, sizes), conditioning=("ref",))  # a plain column: sizes split
    assert len(set(sized.batch_keys)) == 3  # 32x32 and 48x48 share a bucket
