"""Metadata files, size buckets, the per-process batch plan and the dataset items."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffsynth_training_toy import write_dataset
from PIL import Image

from diffsynth.runtime.errors import ConfigError
from diffsynth.training.data import MetadataDataset, batch_plan, bucket_for, fit, read_metadata, steps_per_epoch


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((1024, 1024), (1024, 1024)),  # at the limit: unchanged
        ((2048, 2048), (1024, 1024)),  # shrunk to the limit
        ((1000, 600), (960, 576)),  # smaller than the limit: never enlarged, rounded down to the step
        ((4000, 1000), (2048, 512)),  # wide: aspect kept under the limit
        ((5000, 10), (4992, 64)),  # extreme aspect: at least one step each side
        ((100_000, 10), (16384, 64)),  # ... and still under the limit
    ],
)
def test_buckets_keep_aspect_under_max_pixels(size, expected):
    bucket = bucket_for(*size, max_pixels=1024 * 1024, step=64)
    assert bucket == expected
    assert bucket[0] % 64 == 0 and bucket[1] % 64 == 0 and bucket[0] * bucket[1] <= 1024 * 1024


def test_fixed_size_wins():
    assert bucket_for(300, 200, max_pixels=100, step=64, fixed=(512, 256)) == (512, 256)


def test_fit_covers_and_crops_the_centre():
    image = Image.new("RGB", (200, 100), "red")
    image.paste((0, 0, 255), (0, 0, 50, 100))  # a blue left quarter
    out = fit(image, (100, 100))
    assert out.size == (100, 100)
    assert out.getpixel((50, 50)) == (255, 0, 0)  # the middle of a red centre crop
    assert out.getpixel((0, 50))[2] < 128  # the blue quarter was cropped away


@pytest.mark.parametrize("fmt", ["csv", "json", "jsonl"])
def test_metadata_formats_read_alike(tmp_path, fmt):
    folder = write_dataset(tmp_path / fmt, [(64, 64)] * 3, fmt=fmt)
    rows = read_metadata(next(folder.glob("metadata.*")))
    assert [r["image"] for r in rows] == ["img0.png", "img1.png", "img2.png"]
    assert rows[0]["prompt"] == "a red circle"


def caption_folder(folder, dataset):
    """The toy dataset's pictures as a kohya-style folder: each picture with a .txt caption, some in a subfolder."""
    rows = read_metadata(dataset / "metadata.csv")
    for i, row in enumerate(rows):
        where = folder / ("sub" if i % 2 else "") / row["image"]
        where.parent.mkdir(parents=True, exist_ok=True)
        where.write_bytes((dataset / row["image"]).read_bytes())
        where.with_suffix(".txt").write_text(row["prompt"] + "\n")
    return folder, rows


def test_a_folder_of_captioned_pictures_reads_like_its_metadata(tmp_path, dataset):
    folder, rows = caption_folder(tmp_path / "captions", dataset)
    from_captions = MetadataDataset(folder, media=("image",), max_pixels=64 * 128, step=16)
    from_metadata = MetadataDataset(dataset, media=("image",), max_pixels=64 * 128, step=16)
    by_name = {Path(row["image"]).name: row for row in from_captions.rows}
    assert sorted(by_name) == sorted(row["image"] for row in rows)
    for i, row in enumerate(from_metadata.rows):  # same prompt, same picture at the same bucket
        j = from_captions.rows.index(by_name[row["image"]])
        assert from_captions.rows[j]["prompt"] == row["prompt"]
        assert torch.equal(from_captions[j]["image"], from_metadata[i]["image"])
    (folder / "sub" / "img1.txt").unlink()
    with pytest.raises(ConfigError, match=r"1 files have no caption file beside them: .*img1.png"):
        MetadataDataset(folder, media=("image",))


def test_a_caption_folder_trains(tmp_path, dataset):
    from diffsynth_training_toy import TASK

    from diffsynth.training.config import TrainConfig
    from diffsynth.training.data import cache_settings
    from diffsynth.training.testing import first_losses

    folder, _ = caption_folder(tmp_path / "captions", dataset)
    settings = dict(family=TASK, max_pixels=64 * 128, bucket_step=16, batch_size=2, mixed_precision="no",
                    dtype="float32", lora_rank=4, max_steps=2)  # fmt: skip
    cfg = TrainConfig(dataset_base_path=str(folder), output_path=str(tmp_path / "out"), **settings)
    losses, run = first_losses(cfg, steps=2)
    assert len(losses) == 2 and all(np.isfinite(losses)) and len(run.dataset) == 6
    before = cache_settings(cfg, TASK)["metadata_sha256"]
    (folder / "img0.txt").write_text("another caption")
    assert cache_settings(cfg, TASK)["metadata_sha256"] != before  # an edited caption invalidates a cache


def test_items_are_loaded_at_their_bucket_size(dataset):
    data = MetadataDataset(dataset, media=("image",), max_pixels=64 * 128, step=16)
    assert data.buckets == [(64, 64)] * 4 + [(128, 64)] * 2
    item = data[4]
    assert item["image"].shape == (3, 64, 128) and item["image"].dtype == torch.float32
    assert -1.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert item["prompt"] == "a black line"


def test_missing_files_and_metadata_are_reported(tmp_path, dataset):
    (dataset / "img2.png").unlink()
    with pytest.raises(ConfigError, match=r"names 1 files missing .*'img2.png'"):
        MetadataDataset(dataset, media=("image",))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"--dataset_base_path .*empty has no metadata.csv"):
        MetadataDataset(tmp_path / "empty", media=("image",))
    with pytest.raises(ConfigError, match="has no video column value"):
        MetadataDataset(dataset, media=("video",))


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("img2.png", b"not a picture"),  # a corrupt picture
        ("img2.png", "half"),  # a truncated one: its header reads, its pixels do not
        ("notes.txt", b"a red circle\n"),  # a caption file named in the image column
    ],
)
def test_unreadable_pictures_are_named_with_their_row_and_column(dataset, name, content):
    data = dataset / name
    data.write_bytes(content if isinstance(content, bytes) else data.read_bytes()[:200])
    if name != "img2.png":
        metadata = dataset / "metadata.csv"
        metadata.write_text(metadata.read_text().replace("img2.png", name))
    # ours, or the runtime's ConfigError ("... is not an image PIL can read"), with the row and column
    message = rf"metadata.csv row 3 column image: .*{re.escape(name)} (cannot be read as a picture|is not an image)"
    with pytest.raises(ConfigError, match=message):
        MetadataDataset(dataset, media=("image",), max_pixels=64 * 128, step=16)[2]  # truncated: when loaded
    if name == "img2.png" and content != "half":  # the header fails as the dataset is read, before any training
        with pytest.raises(ConfigError, match=message):
            MetadataDataset(dataset, media=("image",))
    fixed = MetadataDataset(dataset, media=("image",), fixed=(64, 64))  # no header read: named when loaded
    with pytest.raises(ConfigError, match=message):
        fixed[2]


def test_reading_errors_of_the_runtime_get_the_row_and_column(tmp_path):
    from diffsynth.training.data import reading

    with pytest.raises(ConfigError, match=r"^m.csv row 1 column image: x.png is not a picture$"):
        with reading(tmp_path / "x.png", "m.csv row 1 column image"):
            raise ConfigError("x.png is not a picture")
    with pytest.raises(ZeroDivisionError):  # not a reading error: as it is
        with reading(tmp_path / "x.png", "m.csv row 1 column image"):
            _ = 1 / 0


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("metadata.json", '[{"image": "img0.png", "prompt": "a"},\n {"image": }]', r"line 2 column 12: not JSON"),
        ("metadata.jsonl", '{"image": "img0.png", "prompt": "a"}\n\n{image: "img1.png"}\n', "line 3 column 2: not"),
        ("metadata.csv", f"image,prompt\nimg0.png,a\nimg1.png,{'x' * 200_000}\n", r"row 2: not readable as CSV"),
        ("metadata.csv", b"image,prompt\nimg0.png,caf\xe9\n", r"metadata file .*metadata.csv is not UTF-8 text"),
    ],
)
def test_malformed_metadata_is_named_with_its_line(tmp_path, name, text, message):
    write_dataset(tmp_path, [(64, 64)] * 2)
    (tmp_path / "metadata.csv").unlink()
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError, match=rf"{re.escape(str(path)) if 'UTF' not in message else ''}.*{message}"):
        MetadataDataset(tmp_path, media=("image",))


@pytest.mark.parametrize("fmt", ["csv", "json", "jsonl", "captions"])
def test_a_byte_order_mark_is_not_read_into_the_first_column_or_caption(tmp_path, dataset, fmt):
    """Windows Notepad and Excel's "CSV UTF-8" start a file with a UTF-8 byte-order mark."""
    if fmt == "captions":
        folder, _ = caption_folder(tmp_path / "captions", dataset)
        caption = folder / "img0.txt"
    else:
        folder = write_dataset(tmp_path / fmt, [(64, 64)] * 3, fmt=fmt)
        caption = next(folder.glob("metadata.*"))
    caption.write_bytes(b"\xef\xbb\xbf" + caption.read_bytes())
    rows = MetadataDataset(folder, media=("image",)).rows
    assert rows[0]["prompt"] == "a red circle" and rows[0]["image"] == "img0.png"
    assert all(not key.startswith("\ufeff") for row in rows for key in row)


def test_conditioning_columns_keep_their_own_size_and_may_list_several_files(tmp_path, dataset):
    """A task's reference-image column (here "edit_image") is read whatever --data_file_keys says: one path or a
    JSON list of paths, each image at its own bucket under max_pixels, not the row's bucket."""
    import json

    Image.new("RGB", (200, 100), "red").save(dataset / "wide.png")
    Image.new("RGB", (48, 80), "blue").save(dataset / "tall.png")
    rows = [
        {"image": "img0.png", "prompt": "one", "edit_image": "wide.png"},
        {"image": "img1.png", "prompt": "two", "edit_image": ["tall.png", "wide.png"]},
    ]
    (dataset / "metadata.csv").unlink()
    (dataset / "metadata.json").write_text(json.dumps(rows))
    data = MetadataDataset(dataset, media=("image",), conditioning=("edit_image",), max_pixels=64 * 64, step=16)
    assert data.buckets == [(64, 64)] * 2  # the rows' buckets come from their images only
    first, second = data[0], data[1]
    assert first["image"].shape == (3, 64, 64)
    assert first["edit_image"].shape == (3, 32, 80)  # 200x100 under 64*64 pixels: 90x45 -> 80x32
    assert isinstance(second["edit_image"], list) and [t.shape for t in second["edit_image"]] == [
        (3, 80, 48),  # 48x80 fits: kept
        (3, 32, 80),
    ]
    assert torch.allclose(second["edit_image"][0][2], torch.ones(80, 48))  # blue, in [-1, 1]
    # a task that prepares them itself (`ragged_conditioning`, Z-Image Omni) gets them at their file's size
    ragged = MetadataDataset(
        dataset, media=("image",), conditioning=("edit_image",), max_pixels=64 * 64, step=16, ragged_conditioning=True
    )
    assert ragged[0]["edit_image"].shape == (3, 100, 200) and ragged[0]["image"].shape == (3, 64, 64)
    assert [t.shape for t in ragged[1]["edit_image"]] == [(3, 80, 48), (3, 100, 200)]
    rows[1]["edit_image"] = ["tall.png", "gone.png"]
    (dataset / "metadata.json").write_text(json.dumps(rows))
    with pytest.raises(ConfigError, match=r"names 1 files missing .*'gone.png' \(at row 2 column edit_image\)"):
        MetadataDataset(dataset, media=("image",), conditioning=("edit_image",))


def test_rgba_images_keep_their_alpha_when_the_task_reads_them(tmp_path):
    """`image_mode="RGBA"` (a task's `image_mode`) reads the images and conditioning images as [4, H, W] with their
    alpha, an RGB file with an opaque one; the default reads RGB as before."""
    folder = tmp_path / "rgba"
    folder.mkdir()
    pixels = np.zeros((64, 64, 4), dtype=np.uint8)
    pixels[..., 0], pixels[:32, :, 3], pixels[32:, :, 3] = 255, 255, 0  # red, the lower half transparent
    Image.fromarray(pixels, "RGBA").save(folder / "cut.png")
    Image.new("RGB", (32, 32), "blue").save(folder / "scene.png")
    (folder / "metadata.csv").write_text("image,prompt,edit_image\ncut.png,a cut-out,scene.png\n")
    common = dict(media=("image",), conditioning=("edit_image",), max_pixels=64 * 64, step=16)
    item = MetadataDataset(folder, image_mode="RGBA", **common)[0]
    assert item["image"].shape == (4, 64, 64) and item["edit_image"].shape == (4, 32, 32)
    alpha = item["image"][3]
    assert torch.equal(alpha[:32], torch.ones(32, 64)) and torch.equal(alpha[32:], -torch.ones(32, 64))
    assert torch.equal(item["edit_image"][3], torch.ones(32, 32))  # no alpha in the file: opaque
    plain = MetadataDataset(folder, **common)[0]
    assert plain["image"].shape == (3, 64, 64) and plain["edit_image"].shape == (3, 32, 32)
    assert torch.equal(plain["image"], item["image"][:3])  # the colour channels as before
    with pytest.raises(ConfigError, match="image_mode='LA'"):
        MetadataDataset(folder, image_mode="LA", **common)


BUCKETS = [(64, 64)] * 5 + [(128, 64)] * 3 + [(64, 128)] * 2


def test_a_plan_batches_one_bucket_at_a_time_and_covers_every_repeat():
    plan = batch_plan(BUCKETS, batch_size=2, repeat=3, seed=1, epoch=0)
    assert all(len({BUCKETS[i] for i in batch}) == 1 for batch in plan)
    assert sorted(i for batch in plan for i in batch) == sorted(list(range(10)) * 3)
    assert len(plan) == steps_per_epoch(BUCKETS, batch_size=2, repeat=3, world=1, accumulation=1)


def test_rows_with_repeats_are_planned_that_many_times():
    repeats = [1, 3, 1, 1, 2, 1, 1, 4, 1, 1]
    plan = batch_plan(BUCKETS, batch_size=2, repeat=2, seed=3, repeats=repeats)
    counts = torch.bincount(torch.tensor([i for batch in plan for i in batch]), minlength=10).tolist()
    assert counts == [2 * r for r in repeats]
    assert all(len({BUCKETS[i] for i in batch}) == 1 for batch in plan)
    assert len(plan) == steps_per_epoch(BUCKETS, batch_size=2, repeat=2, world=1, accumulation=1, repeats=repeats)
    # all ones is the plan without repeats, batch for batch (runs started before keep their order)
    assert batch_plan(BUCKETS, batch_size=2, seed=3, repeats=[1] * 10) == batch_plan(BUCKETS, batch_size=2, seed=3)


def test_kohya_folders_repeat_their_rows_and_caption_them_with_their_words(tmp_path):
    folder = tmp_path / "train"
    for sub, names in (("10_sks dog", ["a.png", "b.png"]), ("1_dog", ["c.png"])):
        (folder / sub).mkdir(parents=True)
        for name in names:
            Image.new("RGB", (64, 64), "red").save(folder / sub / name)
    (folder / "10_sks dog" / "b.txt").write_text("sks dog on a sofa")
    dataset = MetadataDataset(folder, media=("image",), max_pixels=64 * 64, step=16)
    by_name = {Path(row["image"]).name: (row["prompt"], dataset.repeats[i]) for i, row in enumerate(dataset.rows)}
    assert by_name == {
        "a.png": ("sks dog", 10),  # no caption file: the folder's words
        "b.png": ("sks dog on a sofa", 10),
        "c.png": ("dog", 1),
    }
    # a folder beside them that is not `<repeats>_<words>`: not kohya's layout, so no repeats and no folder captions
    (folder / "extra").mkdir()
    Image.new("RGB", (64, 64), "blue").save(folder / "extra" / "d.png")
    (folder / "extra" / "d.txt").write_text("a plain dog")
    with pytest.raises(ConfigError, match=r"2 files have no caption file beside them: .*a.png.*c.png"):
        MetadataDataset(folder, media=("image",), max_pixels=64 * 64, step=16)
    for name in ("a", "c"):
        (folder / ("10_sks dog" if name == "a" else "1_dog") / f"{name}.txt").write_text(f"picture {name}")
    dataset = MetadataDataset(folder, media=("image",), max_pixels=64 * 64, step=16)
    assert dataset.repeats == [1, 1, 1, 1]  # `10_sks dog/` is an ordinary subfolder now


@pytest.mark.parametrize("value", ["0", "two", "1.5", "-3"])
def test_a_bad_repeats_cell_is_named(tmp_path, dataset, value):
    (dataset / "metadata.csv").write_text(f"image,prompt,repeats\nimg0.png,a,{value}\n")
    with pytest.raises(ConfigError, match=rf"row 1 column repeats: '{re.escape(value)}' is not a whole number >= 1"):
        MetadataDataset(dataset, media=("image",), max_pixels=64 * 128, step=16)


def test_plans_are_seeded_per_epoch():
    assert batch_plan(BUCKETS, batch_size=2, seed=1, epoch=0) == batch_plan(BUCKETS, batch_size=2, seed=1, epoch=0)
    assert batch_plan(BUCKETS, batch_size=2, seed=1, epoch=0) != batch_plan(BUCKETS, batch_size=2, seed=1, epoch=1)


def test_processes_get_disjoint_equal_shares_in_whole_accumulation_groups():
    shares = [batch_plan(BUCKETS, batch_size=1, seed=0, rank=r, world=3, accumulation=2) for r in range(3)]
    assert [len(s) for s in shares] == [2, 2, 2]  # 10 batches -> 3 each -> 2 each in whole groups of 2
    taken = [tuple(b) for s in shares for b in s]
    assert len(taken) == len(set(taken))
    assert steps_per_epoch(BUCKETS, batch_size=1, repeat=1, world=3, accumulation=2) == 1


def test_videos_are_read_to_num_frames_at_their_bucket(tmp_path):
    from diffsynth.runtime.media import save_video

    folder = tmp_path / "videos"
    frames = [Image.new("RGB", (64, 48), (40 * i, 0, 0)) for i in range(6)]
    save_video(frames, folder / "clip.mp4", fps=8)
    (folder / "metadata.csv").write_text("video,prompt\nclip.mp4,a red fade\n")
    data = MetadataDataset(folder, media=("video",), max_pixels=64 * 48, step=16, num_frames=4)
    assert data.buckets == [(64, 48)]
    item = data[0]
    assert item["video"].shape == (3, 4, 48, 64) and item["prompt"] == "a red fade"
    assert item["video"][0, 3].mean() > item["video"][0, 0].mean()  # frames in order: red grows


def test_conditioning_videos_keep_their_own_size(tmp_path):
    """A conditioning video column (Wan2.2-Animate's face crops) is read at its own bucket, whole, while the other
    video columns of the row are fitted (covered and centre-cropped) to the row's."""
    from diffsynth.runtime.media import save_video

    folder = tmp_path / "videos"
    face = [Image.fromarray(np.tile(np.arange(32, dtype=np.uint8)[None, :, None] * 8, (32, 1, 3))) for _ in range(4)]
    save_video([Image.new("RGB", (64, 32), "red")] * 4, folder / "clip.mp4", fps=8)
    save_video(face, folder / "face.mp4", fps=8)
    (folder / "metadata.csv").write_text("video,face,pose,prompt\nclip.mp4,face.mp4,face.mp4,a dancer\n")
    common = dict(media=("video",), file_keys=("video", "face", "pose"), max_pixels=64 * 64, step=16, num_frames=4)
    item = MetadataDataset(folder, conditioning=("face",), **common)[0]
    assert item["video"].shape == (3, 4, 32, 64) and item["pose"].shape == (3, 4, 32, 64)  # the row's size
    assert item["face"].shape == (3, 4, 32, 32)  # its own: every column of the gradient kept
    assert item["face"][0, 0, :, 0].mean() < -0.9 and item["face"][0, 0, :, -1].mean() > 0.7


def test_the_trainer_and_its_cache_count_the_repeats(tmp_path, dataset):
    from dataclasses import replace

    from diffsynth_training_toy import TASK

    from diffsynth.training.config import TrainConfig
    from diffsynth.training.data import CachedDataset
    from diffsynth.training.trainer import run_stage, setup

    lines = (dataset / "metadata.csv").read_text().splitlines()
    rows = [lines[0] + ",repeats"] + [f"{line},{3 if i == 0 else 1}" for i, line in enumerate(lines[1:])]
    (dataset / "metadata.csv").write_text("\n".join(rows) + "\n")
    cfg = TrainConfig(
        family=TASK, dataset_base_path=str(dataset), output_path=str(tmp_path / "out"), max_pixels=64 * 128,
        bucket_step=16, batch_size=1, mixed_precision="no", dtype="float32", lora_rank=4,
    )  # fmt: skip
    assert setup(cfg).total_steps == 6 + 2  # six rows, the first three times
    run_stage(replace(cfg, cache_dir=str(tmp_path / "cache"), stage="encode"))
    assert CachedDataset(tmp_path / "cache").repeats == [3, 1, 1, 1, 1, 1]
    assert setup(replace(cfg, cache_dir=str(tmp_path / "cache"))).total_steps == 8


def test_several_resolutions_make_a_sample_of_each_row_at_each_size(tmp_path):
    """`--resolutions 32,64`: every row twice, bucketed under 32 x 32 and 64 x 64 pixels, its mask and its
    reference pictures at the sample's size; the row's repeats hold for both."""
    folder = tmp_path / "data"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, size in (("wide.png", (128, 64)), ("square.png", (64, 64)), ("ref.png", (64, 64))):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / name)
    Image.new("L", (128, 64), 255).save(folder / "mask.png")
    (folder / "metadata.csv").write_text(
        "image,prompt,loss_mask,edit_image,repeats\nwide.png,a,mask.png,ref.png,2\nsquare.png,b,,ref.png,1\n"
    )
    dataset = MetadataDataset(
        folder, media=("image",), conditioning=("edit_image",), max_pixels=[32 * 32, 64 * 64], step=16,
        masked_loss=True,
    )  # fmt: skip
    assert len(dataset) == 4 and dataset.repeats == [2, 2, 1, 1]
    assert dataset.buckets == [(32, 16), (80, 32), (32, 32), (64, 64)]
    for index, (width, height) in enumerate(dataset.buckets):
        item = dataset[index]
        assert item["image"].shape == (3, height, width) and item["prompt"] == "ab"[index // 2]
        reference = 32 if index % 2 == 0 else 64  # the square reference at the sample's size
        assert item["edit_image"].shape == (3, reference, reference)
        if index < 2:
            assert item["loss_mask"].shape == (1, height, width)
    fitted = fit(Image.open(folder / "wide.png").convert("RGB"), (80, 32))
    expected = torch.from_numpy(np.array(fitted)).permute(2, 0, 1).float() / 127.5 - 1
    torch.testing.assert_close(dataset[1]["image"], expected)


def test_resolutions_are_checked_and_change_the_step_count(tmp_path, dataset):
    from diffsynth_training_toy import TASK

    from diffsynth.training.config import TrainConfig
    from diffsynth.training.trainer import setup

    base = dict(family=TASK, dataset_base_path=str(dataset), output_path=str(tmp_path / "out"), bucket_step=16,
                batch_size=1, mixed_precision="no", dtype="float32", lora_rank=4)  # fmt: skip
    assert setup(TrainConfig(**base, resolutions=[32, 64])).total_steps == 12  # six rows at two sizes
    with pytest.raises(ConfigError, match="--resolutions buckets each picture at several sizes"):
        TrainConfig(**base, resolutions=[32, 64], height=64, width=64).check()
    with pytest.raises(ConfigError, match="--resolutions 8,64: give distinct sizes of at least --bucket_step 16"):
        TrainConfig(**base, resolutions=[8, 64]).check()


def test_kohya_class_folders_without_any_caption_file_and_caption_extension(tmp_path):
    folder = tmp_path / "train"
    (folder / "5_ohwx cat").mkdir(parents=True)
    (folder / "1_cat").mkdir()
    Image.new("RGB", (64, 64), "red").save(folder / "5_ohwx cat" / "a.png")
    dataset = MetadataDataset(folder, media=("image",), max_pixels=64 * 64, step=16)  # no .txt anywhere
    assert [(row["prompt"], n) for row, n in zip(dataset.rows, dataset.repeats, strict=True)] == [("ohwx cat", 5)]
    Image.new("RGB", (64, 64), "blue").save(folder / "1_cat" / "b.png")
    (folder / "1_cat" / "b.caption").write_text("a blue square")  # kohya's default caption extension
    dataset = MetadataDataset(folder, media=("image",), max_pixels=64 * 64, step=16)
    assert sorted(row["prompt"] for row in dataset.rows) == ["a blue square", "ohwx cat"]


def test_phone_photos_are_bucketed_and_read_upright(tmp_path):
    """A portrait photo stored sideways with an EXIF orientation is a portrait sample: its bucket, its pixels and
    its mask (drawn on the upright picture) agree."""
    from diffsynth.training.masks import MASK_FILE_SUFFIX

    folder = tmp_path / "photos"
    folder.mkdir()
    stored = Image.new("RGB", (128, 64), (255, 0, 0))
    stored.paste((0, 0, 255), (64, 0, 128, 64))  # stored: red left, blue right; upright: red top, blue bottom
    exif = Image.Exif()
    exif[0x0112] = 6  # turn 90 degrees clockwise to view
    stored.save(folder / "cat.jpg", exif=exif, quality=100)
    (folder / "cat.txt").write_text("a cat")
    mask = Image.new("L", (64, 128), 0)
    mask.paste(255, (0, 0, 64, 64))  # the upright picture's top half (the red one)
    mask.save(folder / f"cat{MASK_FILE_SUFFIX}")
    dataset = MetadataDataset(folder, media=("image",), max_pixels=64 * 128, step=16, masked_loss=True)
    assert dataset.buckets == [(64, 128)]  # portrait
    item = dataset[0]
    assert item["image"].shape == (3, 128, 64)
    red = item["image"][0] > 0.5
    assert red[:60].all() and not red[68:].any()
    assert (item["loss_mask"][0, :60] == 1).all() and (item["loss_mask"][0, 68:] == 0).all()  # on the red half


def test_the_trigger_word_is_in_every_caption(tmp_path):
    from diffsynth.training.config import TrainConfig
    from diffsynth.training.trainer import validation_prompts

    folder = tmp_path / "data"
    folder.mkdir()
    captions = {"a": "a photo of [trigger] on a sofa", "b": "ohwx cat asleep", "c": "a garden", "d": ""}
    for name, caption in captions.items():
        Image.new("RGB", (64, 64), "red").save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(caption)
    dataset = MetadataDataset(folder, media=("image",), max_pixels=64 * 64, step=16, trigger_word="ohwx cat")
    assert [row["prompt"] for row in dataset.rows] == [
        "a photo of ohwx cat on a sofa",  # the placeholder filled
        "ohwx cat asleep",  # already there
        "ohwx cat, a garden",  # put first
        "ohwx cat",  # an empty caption: the word alone
    ]
    assert dataset[2]["prompt"] == "ohwx cat, a garden"
    cfg = TrainConfig(trigger_word="ohwx cat", validation_prompts=["[trigger] in the snow", "a dog"])
    assert validation_prompts(cfg) == ["ohwx cat in the snow", "a dog"]


def test_a_cache_is_refused_by_a_run_with_other_sizes_or_trigger(tmp_path, dataset):
    from dataclasses import replace

    from diffsynth_training_toy import TASK

    from diffsynth.training.config import TrainConfig
    from diffsynth.training.trainer import run_stage, setup

    cfg = TrainConfig(
        family=TASK, dataset_base_path=str(dataset), output_path=str(tmp_path / "out"), bucket_step=16,
        batch_size=1, mixed_precision="no", dtype="float32", lora_rank=4, resolutions=[32, 64],
        cache_dir=str(tmp_path / "cache"), trigger_word="ohwx",
    )  # fmt: skip
    run_stage(replace(cfg, stage="encode"))
    assert setup(cfg).total_steps == 12
    with pytest.raises(ConfigError, match=r"encoded with --resolutions \[32, 64\], this run has --resolutions \[\]"):
        setup(replace(cfg, resolutions=[]))
    with pytest.raises(ConfigError, match="encoded with --trigger_word 'ohwx', this run has --trigger_word None"):
        setup(replace(cfg, trigger_word=None))
