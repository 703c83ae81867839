"""Wan training rows the trainer must keep apart or change: `--flip_aug` on a Control-Camera row mirrors its camera
path with its video; rows whose reference images differ in count, or that have a VACE control video and rows that
have none, batch apart; a row without the column its DiT needs is refused at setup, naming its metadata row."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffsynth.training")

from diffsynth.runtime.errors import ConfigError  # noqa: E402
from diffsynth.runtime.media import save_video  # noqa: E402
from diffsynth.training.data import MetadataDataset  # noqa: E402
from diffsynth.training.trainer import flip_rows  # noqa: E402
from diffsynth.wan import WanVideoPipeline  # noqa: E402
from diffsynth.wan.camera import DEFAULT_ORIGIN, camera_path  # noqa: E402
from diffsynth.wan.training import WanTrainingTask  # noqa: E402


def task_of(repo) -> WanTrainingTask:
    return WanTrainingTask(WanVideoPipeline.from_pretrained(str(repo), torch_dtype="float32", device="cpu"))


def video(path, seed: int) -> None:
    save_video(list(np.random.default_rng(seed).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)), path, fps=16)


def dataset(folder, rows, task, keys) -> MetadataDataset:
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return MetadataDataset(
        folder, media=task.media, file_keys=keys, conditioning=task.conditioning,
        aligned=getattr(task, "aligned_conditioning", ()), counted=getattr(task, "conditioning_counts", ()),
        check_row=getattr(task, "check_row", None),
        max_pixels=32 * 32, step=16, num_frames=5,
    )  # fmt: skip


def test_flip_aug_mirrors_a_control_camera_rows_camera_path(tiny_repo_factory):
    task = task_of(tiny_repo_factory("fun_camera"))
    origin = list(DEFAULT_ORIGIN)
    origin[3], origin[10] = 0.4, 0.25  # off centre, moved right
    row = {"prompt": "p", "video": torch.rand(3, 5, 4, 8), "camera_control_direction": "LeftUp",
           "camera_control_origin": origin}  # fmt: skip
    run = types.SimpleNamespace(
        config=types.SimpleNamespace(flip_aug=True, seed=0), dataset=types.SimpleNamespace(file_keys=("video",)),
        task=task,
    )  # fmt: skip
    flipped = next(out for i in range(20) for out in flip_rows(run, [row], 0, i) if out is not row)
    assert torch.equal(flipped["video"], row["video"].flip(-1))
    assert flipped["camera_control_direction"] == "RightUp"
    ours = torch.tensor(camera_path("RightUp", 3, 0.1, flipped["camera_control_origin"]), dtype=torch.float64)
    theirs = torch.tensor(camera_path("LeftUp", 3, 0.1, origin), dtype=torch.float64)
    mirror = torch.diag(torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64))
    for a, b in zip(ours, theirs, strict=True):  # each pose is the original seen in a mirror: S w2c S
        w2c_a, w2c_b = a[7:].reshape(3, 4), b[7:].reshape(3, 4)
        torch.testing.assert_close(w2c_a[:, :3], mirror @ w2c_b[:, :3] @ mirror)
        torch.testing.assert_close(w2c_a[:, 3], mirror @ w2c_b[:, 3])
        assert a[3] == pytest.approx(1 - b[3])
    assert task_of(tiny_repo_factory("vace")).flip_row(row) is row  # no camera: the row as it is


def test_vace_rows_with_other_reference_counts_or_no_control_video_batch_apart(tiny_repo_factory, tmp_path):
    task = task_of(tiny_repo_factory("vace"))
    for i in range(4):
        video(tmp_path / f"v{i}.mp4", i)
    Image.new("RGB", (32, 32), (255, 0, 0)).save(tmp_path / "r.png")
    rows = [
        {"video": "v0.mp4", "prompt": "a", "vace_reference_image": ["r.png"]},
        {"video": "v1.mp4", "prompt": "b", "vace_reference_image": ["r.png", "r.png"]},
        {"video": "v2.mp4", "prompt": "c", "vace_video": "v0.mp4"},
        {"video": "v3.mp4", "prompt": "d"},
    ]
    data = dataset(tmp_path, rows, task, ("video",))
    assert len(set(data.batch_keys)) == 4
    samples = task.encode([data[2], data[3]])
    with pytest.raises(ConfigError, match="mixes rows with and without vace_video / vace_video_mask"):
        task.collate(samples)


def test_fun_control_rows_batch_apart_by_reference_and_need_a_control_video(tiny_repo_factory, tmp_path):
    task = task_of(tiny_repo_factory("fun_control"))
    for i in range(3):
        video(tmp_path / f"v{i}.mp4", i)
    Image.new("RGB", (32, 32), (255, 0, 0)).save(tmp_path / "r.png")
    rows = [
        {"video": "v0.mp4", "prompt": "a", "control_video": "v1.mp4", "reference_image": "r.png"},
        {"video": "v1.mp4", "prompt": "b", "control_video": "v0.mp4"},
    ]
    keys = ("video", "control_video")
    data = dataset(tmp_path, rows, task, keys)
    assert len(set(data.batch_keys)) == 2
    with pytest.raises(ConfigError, match="mixes rows with and without reference_image"):
        task.collate(task.encode([data[0], data[1]]))
    with pytest.raises(ConfigError, match=r"metadata.jsonl row 3 has no control_video"):
        dataset(tmp_path, [*rows, {"video": "v2.mp4", "prompt": "c"}], task, keys)


def test_control_camera_rows_are_checked_at_setup_naming_the_metadata_row(tiny_repo_factory, tmp_path):
    task = task_of(tiny_repo_factory("fun_camera"))
    video(tmp_path / "v.mp4", 0)
    rows = [{"video": "v.mp4", "prompt": "a", "camera_control_direction": "Left"}]
    assert len(dataset(tmp_path, rows, task, ("video",))) == 1
    with pytest.raises(ConfigError, match=r"metadata.jsonl row 2 has no camera_control_direction"):
        dataset(tmp_path, [*rows, {"video": "v.mp4", "prompt": "b"}], task, ("video",))
    with pytest.raises(ConfigError, match=r"metadata.jsonl row 1 camera_control_origin='x' is not a number"):
        dataset(tmp_path, [{**rows[0], "camera_control_origin": "0, x"}], task, ("video",))


def test_vace_references_of_other_sizes_stack_and_keep_the_keys_a_dataset_had(tiny_repo_factory, tmp_path):
    """One reference each at four sizes (the pipeline fits each to the video's): one batch key, the key of rows
    without references (as before they were conditioning columns); one row with two references batches apart."""
    task = task_of(tiny_repo_factory("vace"))
    rows = []
    for i, size in enumerate([(32, 32), (64, 32), (32, 64), (48, 48)]):
        video(tmp_path / f"v{i}.mp4", i)
        Image.new("RGB", size, (255, 0, 0)).save(tmp_path / f"r{i}.png")
        rows.append({"video": f"v{i}.mp4", "prompt": "p", "vace_reference_image": f"r{i}.png"})
    data = dataset(tmp_path, rows, task, ("video",))
    assert data.batch_keys == [(32, 32, 5)] * 4
    batch = task.collate(task.encode([data[0], data[1]]))
    assert batch["vace_context"].shape[0] == 2
    more = dataset(tmp_path, [*rows, {**rows[0], "vace_reference_image": ["r0.png", "r1.png"]}], task, ("video",))
    assert more.batch_keys == [(32, 32, 5, 0, 0, 1)] * 4 + [(32, 32, 5, 0, 0, 2)]


def test_two_vace_datasets_with_and_without_a_control_video_batch_apart(tiny_repo_factory, tmp_path):
    """--dataset_config with a dataset whose rows all have a vace_video and one whose rows have none: each agrees
    within itself, but their samples encode apart, so no batch of the run mixes them."""
    from diffsynth.training.config import TrainConfig
    from diffsynth.training.data import batch_plan
    from diffsynth.training.datasets import CombinedDataset, DatasetEntry

    task = task_of(tiny_repo_factory("vace"))
    parts = []
    for name, control in (("a", True), ("b", False)):
        (tmp_path / name).mkdir()
        for i in range(2):
            video(tmp_path / name / f"v{i}.mp4", i)
        rows = [{"video": f"v{i}.mp4", "prompt": "p", **({"vace_video": f"v{1 - i}.mp4"} if control else {})}
                for i in range(2)]  # fmt: skip
        parts.append(dataset(tmp_path / name, rows, task, ("video",)))
    assert parts[0].batch_keys == parts[1].batch_keys == [(32, 32, 5)] * 2  # each alone: its keys as before
    entries = [DatasetEntry(f"dataset {i}", TrainConfig(family="wan", output_path=str(tmp_path))) for i in (1, 2)]
    both = CombinedDataset(parts, entries, tmp_path / "d.yaml")
    assert both.batch_keys == [(32, 32, 5, 1, 0, 0)] * 2 + [(32, 32, 5, 0, 0, 0)] * 2
    for seed in range(10):
        for batch in batch_plan(both.batch_keys, batch_size=2, seed=seed):
            assert len({i // 2 for i in batch}) == 1, batch
