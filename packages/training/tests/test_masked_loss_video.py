"""`--masked_loss` with mask videos: a video row's `loss_mask` naming a video file is read with the row's frames,
fitted as its frames are, and averaged over each latent cell and each latent frame's frames; on a toy video family
(the toy's 8x8 pooling per frame, then the first frame alone and 2 frames a latent frame after it)."""

from pathlib import Path
from types import SimpleNamespace

import diffsynth_training_toy as toy
import numpy as np
import pytest
import torch
from diffsynth_training_toy import TC, ToyVideoTask
from diffsynth_training_toy import VIDEO_TASK as TASK
from PIL import Image

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.media import load_video, save_video
from diffsynth.training.config import TrainConfig
from diffsynth.training.data import MetadataDataset
from diffsynth.training.masks import MASK_KEY, batch_weights, latent_mask, temporal_compression
from diffsynth.training.testing import first_losses, train_direct_and_cached, write_metadata
from diffsynth.training.trainer import encode_with_masks

FRAMES = 5  # --num_frames: 1 + 2 x 2, three latent frames (the toy video VAE's first frame, then TC = 2 a latent frame)


def noise_video(seed: int, frames: int = FRAMES, height: int = 64, width: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (frames, height, width, 3), dtype=np.uint8)


def column_mask_video(frames: int, height: int = 64, width: int = 64) -> np.ndarray:
    """Frame k white only on its own 8-pixel column band k (a subject moving right), black elsewhere."""
    video = np.zeros((frames, height, width, 3), dtype=np.uint8)
    for k in range(frames):
        video[k, :, 8 * k : 8 * k + 8] = 255
    return video


def write_rows(folder: Path, videos: dict[str, np.ndarray], rows: list[dict]) -> Path:
    """`videos` as near-lossless H.264 files (crf 0), `rows` as metadata.csv."""
    for name, frames in videos.items():
        save_video(list(frames), folder / name, fps=8, lossless=True)
    return write_metadata(folder, rows)


def decoded_mask(path: Path, frames: int = FRAMES) -> torch.Tensor:
    """The mask video as the reader decodes it, `[1, F, H, W]` in [0, 1] (gray, at the file's size)."""
    gray = [np.asarray(f.convert("L"), dtype=np.float32) / 255 for f in load_video(path, num_frames=frames)]
    return torch.from_numpy(np.stack(gray))[None]


def cell_and_group_means(mask: torch.Tensor, cell: int, tc: int) -> torch.Tensor:
    """Directly: each latent cell's mean over its `cell` x `cell` pixels of the frames of its latent frame."""
    _, f, height, width = mask.shape
    groups = [[0]] + [list(range(1 + k * tc, 1 + (k + 1) * tc)) for k in range((f - 1) // tc)]
    out = torch.zeros(1, len(groups), height // cell, width // cell, dtype=torch.float64)
    for t, group in enumerate(groups):
        for i in range(height // cell):
            for j in range(width // cell):
                pixels = [mask[0, k, i * cell : (i + 1) * cell, j * cell : (j + 1) * cell] for k in group]
                out[0, t, i, j] = torch.stack(pixels).double().mean()
    return out.float()


def video_dataset(folder: Path, **overrides) -> MetadataDataset:
    values = dict(media=("video", "image"), file_keys=("video", "image"), max_pixels=64 * 64, step=16)
    return MetadataDataset(folder, num_frames=FRAMES, masked_loss=True, **{**values, **overrides})


def toy_config(tmp_path, dataset, name="out", **overrides) -> TrainConfig:
    values = dict(
        family=TASK, dataset_base_path=str(dataset), output_path=str(tmp_path / name), max_pixels=64 * 64,
        bucket_step=16, batch_size=2, mixed_precision="no", dtype="float32", lora_rank=4, learning_rate=1e-2,
        max_steps=2, num_epochs=10, log_every=1, weight_decay=0.0, masked_loss=True, num_frames=FRAMES,
    )  # fmt: skip
    return TrainConfig(**{**values, **overrides})


# ----------------------------------------------------------------------------------- the latent grid
def test_a_mask_video_on_the_latent_grid_is_the_mean_of_each_cell_and_latent_frame():
    torch.manual_seed(0)
    mask = torch.rand(1, 7, 32, 48)  # 7 frames: the first alone, then 3 latent frames of 2
    latents = torch.zeros(16, 4, 4, 6)
    got = latent_mask(mask, latents, "row 0", temporal_compression=2)
    torch.testing.assert_close(got, cell_and_group_means(mask, 8, 2), rtol=0, atol=1e-6)
    assert got.shape == (1, 4, 4, 6)
    with pytest.raises(ConfigError, match="task does not say how many frames each latent frame encodes"):
        latent_mask(mask, latents, "row 0")
    with pytest.raises(ConfigError, match=r"row 0: its mask video's 7 frames do not make its 4 latent frames"):
        latent_mask(mask, latents, "row 0", temporal_compression=4)  # Wan's grouping would need 13 frames
    with pytest.raises(ConfigError, match="has a mask video but latents of shape"):
        latent_mask(mask, torch.zeros(16, 4, 6), "row 0", temporal_compression=2)  # a picture's latents


def test_a_batch_mixes_mask_videos_mask_pictures_and_rows_without_a_mask():
    video_mask = torch.tensor([0.0, 0.5, 1.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2)  # [1, T, h, w]
    picture_mask = torch.tensor([[1.0, 0.0], [0.0, 0.0]]).view(1, 1, 2, 2)  # [1, 1, h, w]: every latent frame
    weights = batch_weights([video_mask, picture_mask, None], torch.zeros(3, 4, 3, 2, 2), unmasked_weight=0.5)
    assert weights.shape == (3, 1, 3, 2, 2)
    torch.testing.assert_close(weights[0, 0, :, 0, 0], torch.tensor([0.5, 0.75, 1.0]))
    torch.testing.assert_close(weights[1, 0, :, 0], torch.tensor([[1.0, 0.5]] * 3))
    assert bool((weights[2] == 1).all())


def test_the_temporal_compression_is_the_tasks_or_its_vaes():
    assert temporal_compression(ToyVideoTask) == TC
    wan_like = SimpleNamespace(pipe=SimpleNamespace(vae=SimpleNamespace(temporal_compression=4)))
    assert temporal_compression(wan_like) == 4
    assert temporal_compression(toy.ToyTask) is None and temporal_compression(None) is None


# ----------------------------------------------------------------------------------- the dataset
def test_a_mask_video_is_read_with_the_rows_frames_and_cropped_like_them(tmp_path):
    """A wide gray video is its own mask: after the bucket's resize and centre crop, the mask read equals the gray
    of each video frame read (to rounding), frame by frame, from a file with more frames than the row reads."""
    rng = np.random.default_rng(3)
    levels = np.kron(rng.integers(0, 256, (7, 4, 6)), np.ones((1, 16, 16))).astype(np.uint8)  # 7 frames, 64 x 96
    gray = np.repeat(levels[..., None], 3, axis=3)
    folder = write_rows(tmp_path, {"clip.mp4": gray}, [{"video": "clip.mp4", "prompt": "p", "loss_mask": "clip.mp4"}])
    row = video_dataset(folder)[0]
    assert row["loss_mask"].shape == (1, FRAMES, 48, 64) == (1, *row["video"].shape[1:])  # 96 x 64 -> 64 x 48
    video = ((row["video"] + 1) / 2).mul(255).round()
    luma = (video[0] * 19595 + video[1] * 38470 + video[2] * 7471 + 32768).div(65536).floor() / 255
    assert float((row["loss_mask"][0] - luma).abs().max()) <= 2 / 255
    assert float((row["loss_mask"][0, 1:] - luma[:-1]).abs().mean()) > 0.1  # one frame off would not match


def test_frame_k_of_the_mask_weighs_frame_k_of_the_video_and_its_latent_frame(tmp_path):
    """The video's frame k and the mask's frame k are bright on the same band k (both files hold 9 frames, the row
    reads 5): the loaded mask's frames follow the video's, and on the latent grid latent frame 0 holds band 0 and
    latent frame j > 0 half of bands 2j - 1 and 2j, equal to the means computed here from the decoded mask."""
    marked = column_mask_video(9)
    video = np.maximum(noise_video(1, 9) // 4, marked)  # dim noise, band k bright on frame k
    rows = [{"video": "clip.mp4", "prompt": "p", "loss_mask": "mask.mp4"}]
    folder = write_rows(tmp_path, {"clip.mp4": video, "mask.mp4": marked}, rows)
    dataset = video_dataset(folder)
    row = dataset[0]
    bands = [row["video"][:, k].mean((0, 1)).reshape(8, 8).mean(1).argmax().item() for k in range(FRAMES)]
    mask_bands = [row["loss_mask"][0, k].mean(0).reshape(8, 8).mean(1).argmax().item() for k in range(FRAMES)]
    assert bands == mask_bands == list(range(FRAMES))
    (sample,) = encode_with_masks(ToyVideoTask.from_pretrained([]), [row])
    got = sample[MASK_KEY]
    assert got.shape == (1, 3, 8, 8) == (1, *sample["latents"].shape[1:])
    torch.testing.assert_close(got, cell_and_group_means(decoded_mask(folder / "mask.mp4"), 8, TC), rtol=0, atol=1e-6)
    expected = torch.zeros(1, 3, 8, 8)
    expected[0, 0, :, 0] = 1.0
    expected[0, 1, :, 1:3] = 0.5
    expected[0, 2, :, 3:5] = 0.5
    torch.testing.assert_close(got, expected, rtol=0, atol=0.02)  # the codec's rounding only


def test_a_mask_picture_on_a_video_row_holds_for_every_frame_as_before(tmp_path):
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[:, :32] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    folder = write_rows(
        tmp_path, {"clip.mp4": noise_video(2)}, [{"video": "clip.mp4", "prompt": "p", "loss_mask": "mask.png"}]
    )
    row = video_dataset(folder)[0]
    torch.testing.assert_close(row["loss_mask"], torch.from_numpy(mask).float()[None] / 255)
    (sample,) = encode_with_masks(ToyVideoTask.from_pretrained([]), [row])
    torch.testing.assert_close(sample[MASK_KEY], torch.tensor([[1.0] * 4 + [0.0] * 4] * 8)[None, None])


def test_too_short_or_black_mask_videos_and_a_picture_rows_mask_video_are_named(tmp_path):
    rows = [{"video": "clip.mp4", "prompt": "p", "loss_mask": "short.mp4"}]
    folder = write_rows(tmp_path, {"clip.mp4": noise_video(3), "short.mp4": column_mask_video(3)}, rows)
    with pytest.raises(  # named when the dataset is read, before training
        ConfigError, match=r"row 1 column loss_mask: short\.mp4 has 3 frames, fewer than one clip of --num_frames 5"
    ):
        video_dataset(folder)
    save_video([np.zeros((64, 64, 3), dtype=np.uint8)] * FRAMES, tmp_path / "black.mp4", fps=8, lossless=True)
    write_metadata(tmp_path, [{"video": "clip.mp4", "prompt": "p", "loss_mask": "black.mp4"}])
    with pytest.raises(ConfigError, match=r"the mask video .*black\.mp4 is black over the training crop"):
        video_dataset(folder)[0]
    Image.fromarray(noise_video(4)[0]).save(tmp_path / "still.png")
    write_metadata(tmp_path, [{"image": "still.png", "prompt": "p", "loss_mask": "short.mp4"}])
    with pytest.raises(ConfigError, match=r"row 1 column loss_mask: the mask video 'short\.mp4' is for a video row"):
        video_dataset(tmp_path)


def test_an_unreadable_mask_video_is_named_before_training(tmp_path):
    rows = [{"video": "clip.mp4", "prompt": "p", "loss_mask": "mask.mp4"}]
    folder = write_rows(tmp_path, {"clip.mp4": noise_video(3, frames=FRAMES)}, rows)
    (folder / "mask.mp4").write_bytes(b"not a video")
    with pytest.raises(ConfigError, match=r"row 1 column loss_mask: .*mask\.mp4 cannot be read as a video"):
        video_dataset(folder)


# ----------------------------------------------------------------------------------- training
def moving_mask_dataset(folder: Path, videos: list[np.ndarray]) -> Path:
    """Videos with the moving band mask (`column_mask_video`), one row each."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {f"clip{i}.mp4": v for i, v in enumerate(videos)} | {"mask.mp4": column_mask_video(FRAMES)}
    rows = [{"video": f"clip{i}.mp4", "prompt": f"clip {i}", "loss_mask": "mask.mp4"} for i in range(len(videos))]
    return write_rows(folder, files, rows)


def test_what_a_mask_video_leaves_out_in_time_teaches_nothing(tmp_path):
    """Two datasets differing only where the mask video is black on every frame of a latent frame (frame 0 outside
    band 0, frames 1 and 2 outside bands 1 and 2, ...) train the same LoRA, bit for bit; with the mask picture of
    band 0 on every frame they do not."""
    videos = [noise_video(5), noise_video(6)]
    changed = [v.copy() for v in videos]
    bands = column_mask_video(FRAMES) > 0
    pairs = np.concatenate([bands[:1], bands[1::2] | bands[2::2]])  # latent frame j's bands: 0; 1 and 2; 3 and 4
    outside = ~np.concatenate([pairs[:1], np.repeat(pairs[1:], TC, axis=0)])  # back to the frames
    for v, seed in zip(changed, (7, 8), strict=True):
        v[outside] = noise_video(seed)[outside]
    trained = {}
    for name, data in (("a", videos), ("b", changed)):
        losses, run = first_losses(toy_config(tmp_path, moving_mask_dataset(tmp_path / name, data), name), steps=2)
        trained[name] = (losses, {k: v.detach().clone() for k, v in run.trainable.items()})
    assert trained["a"][0] == trained["b"][0]
    for key, value in trained["a"][1].items():
        torch.testing.assert_close(trained["b"][1][key], value, rtol=0, atol=0)
    Image.fromarray(column_mask_video(1)[0, :, :, 0]).save(tmp_path / "b" / "band0.png")
    write_metadata(
        tmp_path / "b", [{"video": f"clip{i}.mp4", "prompt": f"clip {i}", "loss_mask": "band0.png"} for i in range(2)]
    )
    still, _ = first_losses(toy_config(tmp_path, tmp_path / "b", "still"), steps=2)
    assert still != trained["b"][0]


def test_a_mask_video_mirrors_with_its_video(tmp_path, monkeypatch):
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    encode = ToyVideoTask.encode

    def recording(self, rows):
        seen.extend((row["video"].clone(), row["loss_mask"].clone()) for row in rows)
        return encode(self, rows)

    monkeypatch.setattr(ToyVideoTask, "encode", recording)
    folder = moving_mask_dataset(tmp_path / "data", [noise_video(i) for i in range(4)])
    _, run = first_losses(toy_config(tmp_path, folder, flip_aug=True), steps=2)
    originals = [run.dataset[i] for i in range(len(run.dataset))]
    flipped = 0
    for video, mask in seen:
        source = next(o for o in originals if torch.equal(o["video"], video) or torch.equal(o["video"].flip(-1), video))
        mirrored = not torch.equal(source["video"], video)
        flipped += mirrored
        assert mask.shape == (1, FRAMES, 64, 64)
        assert torch.equal(mask, source["loss_mask"].flip(-1) if mirrored else source["loss_mask"])
    assert 0 < flipped < len(seen)


def test_the_cache_stores_a_mask_videos_latent_grid(tmp_path):
    folder = moving_mask_dataset(tmp_path / "data", [noise_video(9), noise_video(10)])
    runs = train_direct_and_cached(toy_config(tmp_path, folder, "runs", max_steps=2, batch_size=1))
    direct, cached = runs.losses()
    assert len(direct) == 2 and direct == pytest.approx(cached, abs=1e-6)
    expected = cell_and_group_means(decoded_mask(folder / "mask.mp4"), 8, TC)
    torch.testing.assert_close(runs.cached_item(0)[MASK_KEY], expected, rtol=0, atol=1e-6)
    assert runs.cached_item(1)[MASK_KEY].shape == (1, 3, 8, 8)


# ----------------------------------------------------------------------------------- Wan
@pytest.mark.integration
def test_wan_groups_a_mask_video_as_its_vae_groups_frames(tmp_path):
    """The tiny Wan repo of the wan tests: the task's VAE says 4 frames a latent frame after the first, so a 5-frame
    mask video lands on Wan's 2 latent frames as frame 0 and the mean of frames 1-4, per 8x8 cell; a training step
    weighs Wan's latents with it."""
    pytest.importorskip("diffsynth.wan")
    from diffsynth.training.testing import load_module, tiny_config

    wan_tests = load_module(Path(__file__).parents[2] / "wan" / "tests" / "conftest.py", "wan_tiny_repo")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        repo = wan_tests.build_tiny_repo(tmp_path / "repo", "t2v")
    bands = column_mask_video(FRAMES, 32, 48)  # frame k white on band k
    rows = [{"video": "clip.mp4", "prompt": "a clip", "loss_mask": "mask.mp4"}]
    data = write_rows(tmp_path, {"clip.mp4": noise_video(11, FRAMES, 32, 48), "mask.mp4": bands}, rows)
    config = tiny_config(repo, "wan", data, tmp_path / "out", num_frames=FRAMES, max_pixels=32 * 48, masked_loss=True)
    losses, run = first_losses(config, steps=1, batch_size=1)
    assert temporal_compression(run.task) == 4 and np.isfinite(losses).all()
    (sample,) = encode_with_masks(run.task, [run.dataset[0]])
    assert sample["latents"].shape[1:] == (2, 4, 6)
    expected = cell_and_group_means(decoded_mask(data / "mask.mp4"), 8, 4)
    torch.testing.assert_close(sample[MASK_KEY], expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(expected[0, 1, 0], torch.tensor([0.0, 0.25, 0.25, 0.25, 0.25, 0.0]), rtol=0, atol=0.02)


def test_a_captioned_folder_finds_a_mask_video_beside_its_video(tmp_path):
    """`clip-masklabel.mp4` beside `clip.mp4` is the clip's mask (not a sample); a picture keeps its `-masklabel.png`;
    a video without a mask video takes a `-masklabel.png`."""
    folder = tmp_path / "data"
    folder.mkdir()
    for name, seed in (("clip", 1), ("still", 2)):
        save_video(list(noise_video(seed)), folder / f"{name}.mp4", fps=8, lossless=True)
        (folder / f"{name}.txt").write_text(f"a {name}")
    save_video(list(column_mask_video(FRAMES)), folder / "clip-masklabel.mp4", fps=8, lossless=True)
    Image.fromarray(column_mask_video(1)[0]).save(folder / "still-masklabel.png")
    Image.fromarray(noise_video(3, frames=1)[0]).save(folder / "photo.png")
    (folder / "photo.txt").write_text("a photo")
    Image.fromarray(column_mask_video(1)[0]).save(folder / "photo-masklabel.png")
    dataset = video_dataset(folder)
    masks = {row.get("video", row.get("image")): row.get("loss_mask") for row in dataset.rows}
    assert masks == {
        "clip.mp4": "clip-masklabel.mp4",
        "photo.png": "photo-masklabel.png",
        "still.mp4": "still-masklabel.png",
    }
    index = next(i for i, k in enumerate(dataset.sample_rows) if dataset.rows[k].get("video") == "clip.mp4")
    torch.testing.assert_close(dataset[index]["loss_mask"], decoded_mask(folder / "clip-masklabel.mp4"))
