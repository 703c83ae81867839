"""`--flip_aug`: rows mirrored left to right with chance 1/2, drawn per micro-batch, their masks alike; on the toy
family."""

import numpy as np
import pytest
import torch
from diffsynth_training_toy import TASK, ToyTask
from PIL import Image

from diffsynth.runtime.errors import ConfigError
from diffsynth.training.config import TrainConfig
from diffsynth.training.testing import first_losses


def masked_folder(folder, count: int = 4):
    """Noise pictures with a mask white on their left quarter (`-masklabel.png`), captioned."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[:, :16] = 255
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        Image.fromarray(mask).save(folder / f"img{i}-masklabel.png")
        (folder / f"img{i}.txt").write_text(f"picture {i}")
    return folder


def toy_config(tmp_path, dataset, name, **overrides) -> TrainConfig:
    values = dict(
        family=TASK, dataset_base_path=str(dataset), output_path=str(tmp_path / name), max_pixels=64 * 64,
        bucket_step=16, batch_size=2, mixed_precision="no", dtype="float32", lora_rank=4, learning_rate=1e-2,
        max_steps=2, num_epochs=10, log_every=1, weight_decay=0.0, flip_aug=True, masked_loss=True,
    )  # fmt: skip
    return TrainConfig(**{**values, **overrides})


def test_rows_are_mirrored_with_their_masks_the_same_way_on_every_run(tmp_path, monkeypatch):
    seen: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
    encode = ToyTask.encode

    def recording(self, rows):
        seen.append([(row["image"].clone(), row["loss_mask"].clone()) for row in rows])
        return encode(self, rows)

    monkeypatch.setattr(ToyTask, "encode", recording)
    data = masked_folder(tmp_path / "data")
    _, run = first_losses(toy_config(tmp_path, data, "a"), steps=2)
    first, seen[:] = list(seen), []
    first_losses(toy_config(tmp_path, data, "b"), steps=2)
    for batch, again in zip(first, seen, strict=True):  # drawn per micro-batch: a rerun flips the same rows
        for (image, mask), (image2, mask2) in zip(batch, again, strict=True):
            assert torch.equal(image, image2) and torch.equal(mask, mask2)
    originals = [run.dataset[i]["image"] for i in range(len(run.dataset))]
    flipped = 0
    for image, mask in (pair for batch in first for pair in batch):
        source = next(o for o in originals if torch.equal(o, image) or torch.equal(o.flip(-1), image))
        mirrored = not torch.equal(source, image)
        flipped += mirrored
        assert bool(mask[0, :, -16:].all()) == mirrored and bool(mask[0, :, :16].all()) != mirrored  # the mask too
    assert 0 < flipped < 4  # some rows flipped, some kept
    seen[:] = []
    first_losses(toy_config(tmp_path, data, "c", flip_aug=False), steps=2)
    assert all(any(torch.equal(o, image) for o in originals) for batch in seen for image, _ in batch)


def test_flip_aug_needs_the_encoders_and_plain_training(tmp_path):
    with pytest.raises(ConfigError, match="--flip_aug mirrors pictures before they are encoded"):
        toy_config(tmp_path, tmp_path, "x", cache_dir=str(tmp_path / "cache")).check()
    with pytest.raises(ConfigError, match="--flip_aug: --task direct_distill"):
        toy_config(tmp_path, tmp_path, "x", task="direct_distill", masked_loss=False).check()


def test_a_flipped_rows_stereo_sound_swaps_channels_and_the_task_mirrors_its_own_columns():
    import types

    from diffsynth.training.trainer import flip_rows

    task = types.SimpleNamespace(flip_row=lambda row: {**row, "side": "right"})
    run = types.SimpleNamespace(
        config=types.SimpleNamespace(flip_aug=True, seed=0), dataset=types.SimpleNamespace(file_keys=("video",)),
        task=task,
    )  # fmt: skip
    sound = torch.stack([torch.ones(8), torch.zeros(8)])  # heard on the left
    row = {"video": torch.rand(3, 1, 4, 8), "audio": sound, "side": "left"}
    flipped = next(out for i in range(20) for out in flip_rows(run, [row], 0, i) if out is not row)
    assert torch.equal(flipped["audio"], sound.flip(0)) and flipped["side"] == "right"  # now on the right
    assert torch.equal(flipped["video"], row["video"].flip(-1))
