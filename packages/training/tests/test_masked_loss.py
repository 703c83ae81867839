"""`--masked_loss`: rows' masks read, cropped like their pictures, put on the latent grid, and weighting the loss;
on the toy family (8x8 pixels per latent cell, a per-cell denoiser)."""

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffsynth_training_toy import TASK
from PIL import Image

from diffsynth.runtime.errors import ConfigError
from diffsynth.training.config import TrainConfig
from diffsynth.training.data import MetadataDataset
from diffsynth.training.masks import MASK_KEY, WEIGHTS_KEY, batch_weights, latent_mask
from diffsynth.training.testing import first_losses, train_direct_and_cached
from diffsynth.training.trainer import run_stage, weighted_mean


def captioned_folder(folder: Path, pictures: list[np.ndarray], masks: list[np.ndarray | None]) -> Path:
    """`img{i}.png` + `img{i}.txt` (+ `img{i}-masklabel.png` where the mask is given)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (picture, mask) in enumerate(zip(pictures, masks, strict=True)):
        Image.fromarray(picture).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"picture {i}")
        if mask is not None:
            Image.fromarray(mask).save(folder / f"img{i}-masklabel.png")
    return folder


def noise(seed: int, height: int = 64, width: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def left_half_mask(height: int = 64, width: int = 64) -> np.ndarray:
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[:, : width // 2] = 255
    return mask


def toy_config(tmp_path, dataset, name="out", **overrides) -> TrainConfig:
    values = dict(
        family=TASK, dataset_base_path=str(dataset), output_path=str(tmp_path / name), max_pixels=64 * 64,
        bucket_step=16, batch_size=2, mixed_precision="no", dtype="float32", lora_rank=4, learning_rate=1e-2,
        max_steps=2, num_epochs=10, log_every=1, weight_decay=0.0, masked_loss=True,
    )  # fmt: skip
    return TrainConfig(**{**values, **overrides})


# ----------------------------------------------------------------------------------- the latent grid
def test_a_mask_on_the_latent_grid_is_the_mean_of_each_cell():
    torch.manual_seed(0)
    mask = torch.rand(1, 32, 48)
    cells = mask.reshape(1, 4, 8, 6, 8).mean((2, 4))
    image_latents = torch.zeros(16, 4, 6)
    torch.testing.assert_close(latent_mask(mask, image_latents, "row"), cells, rtol=0, atol=1e-6)
    video_latents = torch.zeros(16, 3, 4, 6)  # [channels, frames, h, w]: the same mask on every frame
    assert latent_mask(mask, video_latents, "row").shape == (1, 1, 4, 6)
    with pytest.raises(ConfigError, match="not a grid of pictures"):
        latent_mask(mask, torch.zeros(24, 128), "row 0 of the batch")  # LTX-2's tokens
    with pytest.raises(ConfigError, match="does not tile"):
        latent_mask(mask, torch.zeros(16, 5, 6), "row 0 of the batch")


def test_each_sample_is_the_mean_at_its_weights_and_the_tasks_mask_multiplies_them():
    torch.manual_seed(1)
    squared = torch.rand(3, 4, 2, 2)
    masks = [torch.tensor([[[1.0, 0.0], [0.5, 0.0]]]), None, torch.ones(1, 2, 2)]
    weights = batch_weights(masks, squared, unmasked_weight=0.2)
    assert weights.shape == (3, 1, 2, 2)
    expected_first = torch.tensor([[1.0, 0.2], [0.6, 0.2]])  # 0.2 + 0.8 * mask
    torch.testing.assert_close(weights[0, 0], expected_first)
    batch = {WEIGHTS_KEY: weights}
    plain = SimpleNamespace(task=object())
    got = weighted_mean(plain, batch, squared)
    first = (squared[0] * expected_first).sum() / (4 * expected_first.sum())
    torch.testing.assert_close(got, torch.stack([first, squared[1].mean(), squared[2].mean()]))
    # a task's own mask (e.g. Wan TI2V's given frame) and the row masks multiply
    task_mask = torch.tensor([1.0, 1.0, 0.0, 1.0]).view(1, 4, 1, 1)
    masked_task = SimpleNamespace(task=SimpleNamespace(loss_mask=lambda batch: task_mask))
    both = task_mask * weights
    expected = (squared * both).flatten(1).sum(1) / both.expand_as(squared).flatten(1).sum(1)
    torch.testing.assert_close(weighted_mean(masked_task, batch, squared), expected)
    assert batch_weights([None, None], squared, 0.0) is None


# ----------------------------------------------------------------------------------- the dataset
def test_masks_are_cropped_like_their_pictures(tmp_path):
    """A wide picture whose gray levels are its mask's: after the bucket's resize and centre crop the mask read
    equals the picture read, for a mask at the picture's size and for one half as wide (stretched to it first)."""
    rng = np.random.default_rng(2)
    levels = np.kron(rng.integers(0, 256, (4, 12)), np.ones((16, 16))).astype(np.uint8)  # 64 x 192, blocks
    picture = np.repeat(levels[:, :, None], 3, axis=2)
    narrow = np.asarray(Image.fromarray(levels).resize((96, 64), Image.NEAREST))  # stretched to the picture
    folder = captioned_folder(tmp_path / "data", [picture, picture], [levels, narrow])
    dataset = MetadataDataset(folder, media=("image",), max_pixels=64 * 96, step=16, masked_loss=True)
    assert [row.get("loss_mask") for row in dataset.rows] == ["img0-masklabel.png", "img1-masklabel.png"]
    for index in range(2):
        row = dataset[index]
        gray = (row["image"][0] + 1) / 2
        assert row["loss_mask"].shape == (1, *gray.shape)
        assert dataset.buckets[index] == (128, 32)  # 3:1 to 4:1: the centre crop cuts the sides
        error = (row["loss_mask"][0] - gray).abs()
        assert float(error.max() if index == 0 else error.mean()) < (1e-6 if index == 0 else 0.03)


def test_the_mask_files_are_not_rows_and_rows_without_one_are_kept(tmp_path):
    folder = captioned_folder(tmp_path / "data", [noise(0), noise(1)], [left_half_mask(), None])
    dataset = MetadataDataset(folder, media=("image",), max_pixels=64 * 64, step=16, masked_loss=True)
    assert len(dataset) == 2 and "loss_mask" not in dataset[1]
    without = MetadataDataset(folder, media=("image",), max_pixels=64 * 64, step=16)
    assert isinstance(without[0]["loss_mask"], str)  # not loaded without --masked_loss


def test_alpha_mask_takes_the_transparency_of_rows_without_a_mask_file(tmp_path):
    """`--alpha_mask`: transparent pictures train as the same pictures with their alpha as mask files."""
    pictures = [np.dstack([noise(i), left_half_mask()]) for i in range(2)]  # RGBA, the right half transparent
    by_alpha = captioned_folder(tmp_path / "alpha", pictures, [None, None])
    by_file = captioned_folder(tmp_path / "file", pictures, [left_half_mask(), left_half_mask()])
    dataset = MetadataDataset(by_alpha, media=("image",), max_pixels=64 * 64, step=16, alpha_mask=True)
    assert dataset.alpha_masked == {0, 1}
    torch.testing.assert_close(dataset[0]["loss_mask"][0], torch.from_numpy(left_half_mask()).float() / 255)
    alpha_losses, _ = first_losses(toy_config(tmp_path, by_alpha, "a", masked_loss=False, alpha_mask=True), steps=2)
    file_losses, _ = first_losses(toy_config(tmp_path, by_file, "b"), steps=2)
    plain_losses, _ = first_losses(toy_config(tmp_path, by_file, "c", masked_loss=False), steps=2)
    assert alpha_losses == file_losses != plain_losses
    opaque = captioned_folder(tmp_path / "opaque", [noise(0)], [None])
    with pytest.raises(ConfigError, match=r"no row of .* has a mask or transparency \(--alpha_mask\)"):
        MetadataDataset(opaque, media=("image",), max_pixels=64 * 64, step=16, alpha_mask=True)


def test_bad_masks_are_named(tmp_path):
    black = np.zeros((64, 64), dtype=np.uint8)
    folder = captioned_folder(tmp_path / "black", [noise(0)], [black])
    with pytest.raises(ConfigError, match=r"img0-masklabel.png is black"):
        MetadataDataset(folder, media=("image",), max_pixels=64 * 64, step=16, masked_loss=True)[0]
    folder = captioned_folder(tmp_path / "none", [noise(0)], [None])
    with pytest.raises(ConfigError, match="no row of .* has a mask"):
        MetadataDataset(folder, media=("image",), max_pixels=64 * 64, step=16, masked_loss=True)
    folder = captioned_folder(tmp_path / "missing", [noise(0)], [None])
    (folder / "metadata.csv").write_text("image,prompt,loss_mask\nimg0.png,a,gone.png\n")
    with pytest.raises(ConfigError, match=r"gone.png.*row 1 column loss_mask"):
        MetadataDataset(folder, media=("image",), max_pixels=64 * 64, step=16, masked_loss=True)
    (folder / "metadata.csv").write_text("image,prompt,loss_mask\nimg0.png,a,img0.txt\n")
    with pytest.raises(ConfigError, match="not one picture file"):
        MetadataDataset(folder, media=("image",), max_pixels=64 * 64, step=16, masked_loss=True)


def test_flags_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="--unmasked_weight .* give --masked_loss"):
        toy_config(tmp_path, tmp_path, masked_loss=False, unmasked_weight=0.5).check()
    with pytest.raises(ConfigError, match=r"--unmasked_weight 1.0 must be in \[0, 1\)"):
        toy_config(tmp_path, tmp_path, unmasked_weight=1.0).check()
    with pytest.raises(ConfigError, match="--task dmd2 has its own objective"):
        toy_config(tmp_path, tmp_path, task="dmd2").check()


# ----------------------------------------------------------------------------------- training
def test_what_the_masks_leave_out_teaches_nothing(tmp_path):
    """Two datasets differing only in the pictures' right halves, masked out: the toy denoiser predicts each
    latent cell from that cell, so the trained LoRA is the same; with `--unmasked_weight` it is not."""
    pictures = [noise(0), noise(1)]
    changed = [p.copy() for p in pictures]
    for p, seed in zip(changed, (5, 6), strict=True):
        p[:, 32:] = noise(seed)[:, 32:]
    masks = [left_half_mask(), left_half_mask()]
    runs = {}
    for name, data, weight in (("a", pictures, 0.0), ("b", changed, 0.0), ("c", changed, 0.1)):
        folder = captioned_folder(tmp_path / f"data_{name}", data, masks)
        losses, run = first_losses(toy_config(tmp_path, folder, name, unmasked_weight=weight), steps=2)
        runs[name] = (losses, {k: v.detach().clone() for k, v in run.trainable.items()})
    (loss_a, weights_a), (loss_b, weights_b), (loss_c, weights_c) = runs["a"], runs["b"], runs["c"]
    assert loss_a == loss_b
    for name, value in weights_a.items():
        torch.testing.assert_close(weights_b[name], value, rtol=0, atol=0)
    assert loss_c != loss_b and any(not torch.equal(weights_c[n], v) for n, v in weights_b.items())
    unmasked_losses, _ = first_losses(toy_config(tmp_path, tmp_path / "data_b", "d", masked_loss=False), steps=2)
    assert unmasked_losses != loss_b


def test_the_cache_keeps_the_masks(tmp_path):
    folder = captioned_folder(tmp_path / "data", [noise(0), noise(1), noise(2)], [left_half_mask(), None, None])
    runs = train_direct_and_cached(toy_config(tmp_path, folder, "runs", max_steps=3, batch_size=1))
    direct, cached = runs.losses()
    assert len(direct) == 3 and direct == pytest.approx(cached, abs=1e-6)
    stored = runs.cached_item(0)[MASK_KEY]
    torch.testing.assert_close(stored, torch.tensor([[1.0] * 4 + [0.0] * 4] * 8)[None])  # 64 px -> 8 cells
    assert MASK_KEY not in runs.cached_item(1)
    plain = toy_config(tmp_path, folder, "plain", masked_loss=False, cache_dir=str(tmp_path / "plain_cache"))
    run_stage(replace(plain, stage="encode"))
    with pytest.raises(ConfigError, match="encoded with --masked_loss False, this run has --masked_loss True"):
        first_losses(replace(plain, masked_loss=True), steps=1)  # a cache without masks


def test_a_cache_of_transparency_masks_is_refused_by_a_run_with_mask_files(tmp_path):
    pictures = [np.dstack([noise(i), left_half_mask()]) for i in range(2)]
    folder = captioned_folder(tmp_path / "data", pictures, [None, None])
    cfg = toy_config(tmp_path, folder, "run", masked_loss=False, alpha_mask=True, cache_dir=str(tmp_path / "cache"))
    run_stage(replace(cfg, stage="encode"))
    first_losses(cfg, steps=1)  # the same settings: taken
    with pytest.raises(ConfigError, match="encoded with --alpha_mask True, this run has --alpha_mask False"):
        first_losses(replace(cfg, alpha_mask=False, masked_loss=True), steps=1)


def test_a_task_without_a_latent_grid_refuses_masks_before_loading(tmp_path, monkeypatch):
    from diffsynth_training_toy import ToyTask

    from diffsynth.training import trainer

    monkeypatch.setattr(ToyTask, "takes_loss_masks", False, raising=False)
    monkeypatch.setattr(trainer, "build_task", lambda *a, **k: pytest.fail("models were loaded"))
    folder = captioned_folder(tmp_path / "data", [noise(0)], [left_half_mask()])
    with pytest.raises(ConfigError, match="latents are a token sequence"):
        trainer.setup(toy_config(tmp_path, folder, "run"))


@pytest.mark.integration
def test_ltx2_refuses_masks(tmp_path):
    """LTX-2's latents are video + audio tokens: its task says so, and `--masked_loss` is refused by name."""
    from diffsynth.training.trainer import check_loss_masks

    ltx2 = pytest.importorskip("diffsynth.ltx2.training")
    with pytest.raises(ConfigError, match="the ltx2 training task's latents are a token sequence"):
        check_loss_masks(toy_config(tmp_path, tmp_path, "run"), ltx2.LTX2TrainingTask)
    check_loss_masks(toy_config(tmp_path, tmp_path, "run", masked_loss=False), ltx2.LTX2TrainingTask)
