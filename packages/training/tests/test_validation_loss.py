"""`--validation_dataset_base_path`: the flow-matching loss of a held-out dataset at fixed noise levels and noise
(`validation_loss.py`), on the toy family: it is the loss written out by hand, the same for the same weights, it
falls as the LoRA learns the rows, it is logged at the expected steps, two processes give one process's number,
the cached two-stage mode gives the direct run's numbers from held-out rows of its own, and bad settings are
named."""

import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffsynth_training_toy import (
    DISTRIBUTED_SETTINGS,
    TASK,
    ToyTask,
    run_two_processes,
    train_one_process,
    write_dataset,
)
from PIL import Image

from diffsynth.runtime.errors import ConfigError
from diffsynth.training import validation_loss
from diffsynth.training.config import TrainConfig, parse_args
from diffsynth.training.data import MetadataDataset
from diffsynth.training.masks import MASK_KEY
from diffsynth.training.testing import first_losses
from diffsynth.training.trainer import run_stage, setup, train


@pytest.fixture
def held_out(tmp_path) -> Path:
    """Three rows that are not the training rows (other pictures), at two sizes."""
    folder = tmp_path / "held_out"
    write_dataset(folder, [(64, 64), (128, 64), (64, 64)], fmt="jsonl")
    for i, path in enumerate(sorted(folder.glob("img*.png"))):  # other pictures than the training dataset's
        with Image.open(path) as picture:
            picture.rotate(90 * (i + 1)).save(path)
    return folder


def toy_config(tmp_path, dataset, validation, name="out", **overrides) -> TrainConfig:
    values = dict(
        family=TASK, dataset_base_path=str(dataset), output_path=str(tmp_path / name), max_pixels=64 * 128,
        bucket_step=16, batch_size=2, mixed_precision="no", dtype="float32", lora_rank=4, learning_rate=1e-2,
        max_steps=4, num_epochs=10, log_every=1, weight_decay=0.0,
        validation_dataset_base_path=None if validation is None else str(validation),
    )  # fmt: skip
    return TrainConfig(**{**values, **overrides})


def records(output) -> list[dict]:
    return [json.loads(line) for line in (Path(output) / "metrics.jsonl").read_text().splitlines()]


def val_losses(output) -> list[tuple[int, float]]:
    return [(r["step"], r["val_loss"]) for r in records(output) if "val_loss" in r]


def by_hand(run, folder: Path, seed: int, positions: list[int]) -> float:
    """The validation loss written out: each row of `folder`, read as the training data and encoded by the toy's
    encoders, noised at the training grid's `positions` with the noise of (seed, row, level), the denoiser's
    velocity against noise - x0, the squared error's mean times the scheduler's weight, averaged."""
    dataset = MetadataDataset(folder, media=("image",), max_pixels=64 * 128, step=16)
    scheduler = run.task.scheduler
    sigmas = scheduler.train_sigmas[positions]
    denoiser = run.accelerator.unwrap_model(run.model)
    errors = []
    with torch.no_grad():
        for row in range(len(dataset)):
            item = dataset[row]
            x0 = run.task.models["vae"].encode(item["image"][None]).float()
            text = run.task.models["text_encoder"].encode([item["prompt"]])
            for level, sigma in enumerate(sigmas):
                noise = torch.randn(x0.shape, generator=validation_loss.noise_generator(seed, row, level))
                noisy = (1 - sigma) * x0 + sigma * noise
                velocity = denoiser(noisy, sigma.view(1), text)
                error = (velocity - (noise - x0)).pow(2).mean() * scheduler.training_weight(sigma)
                errors.append(float(error))
    return sum(errors) / len(errors)


def masked_folders(tmp_path) -> tuple[Path, Path]:
    """Two captioned folders of two 64x64 pictures each with the same mask (left half white), that differ only where
    the masks are black."""
    rng = np.random.default_rng(7)
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[:, :32] = 255
    base = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    other = base.copy()
    other[:, :, 32:] = rng.integers(0, 256, (2, 64, 32, 3), dtype=np.uint8)  # the right halves, masked out
    folders = []
    for name, pictures in (("a", base), ("b", other)):
        folder = tmp_path / name
        folder.mkdir()
        for i, picture in enumerate(pictures):
            Image.fromarray(picture).save(folder / f"img{i}.png")
            Image.fromarray(mask).save(folder / f"img{i}-masklabel.png")
            (folder / f"img{i}.txt").write_text(f"picture {i}")
        folders.append(folder)
    return folders[0], folders[1]


# ----------------------------------------------------------------------------------- the number
def test_the_validation_loss_is_the_flow_matching_loss_at_fixed_levels_and_noise(tmp_path, dataset, held_out):
    config = toy_config(tmp_path, dataset, held_out, seed=3)
    _, run = first_losses(config, steps=2)  # two steps: the LoRA is no longer zero
    assert run.validation_set.size == 3 and len(run.validation_set.samples) == 3
    positions = [125, 375, 625, 875]  # the middles of four equal slices of the 1000-level grid
    torch.testing.assert_close(run.validation_set.sigmas, run.task.scheduler.train_sigmas[positions])
    got = validation_loss.evaluate(run)
    assert got == pytest.approx(by_hand(run, held_out, 3, positions), rel=1e-6, abs=1e-7)
    assert got != pytest.approx(by_hand(run, held_out, 4, positions), rel=1e-3)  # the noise follows --seed
    unweighted = replace(run, config=replace(run.config, loss_weighting="none"))
    assert validation_loss.evaluate(unweighted) != pytest.approx(got, rel=1e-3)  # the scheduler's weights count


def test_the_levels_follow_the_count_and_the_timestep_boundaries(tmp_path, dataset, held_out):
    run = setup(toy_config(tmp_path, dataset, held_out, validation_loss_sigmas=2, min_timestep_boundary=0.5))
    grid = run.task.scheduler.train_sigmas
    torch.testing.assert_close(run.validation_set.sigmas, grid[[625, 875]])  # 2 slices of positions 500..999
    assert validation_loss.noise_generator(0, 1, 0).initial_seed() not in {
        validation_loss.noise_generator(0, 0, 0).initial_seed(),
        validation_loss.noise_generator(0, 1, 1).initial_seed(),
        validation_loss.noise_generator(1, 1, 0).initial_seed(),
    }


def test_the_same_weights_give_the_same_number_and_learning_lowers_it(tmp_path, dataset, held_out):
    _, run = first_losses(toy_config(tmp_path, dataset, held_out), steps=0)
    first = validation_loss.evaluate(run)
    assert validation_loss.evaluate(run) == first  # bit for bit
    for group in run.optimizer.param_groups:  # --learning_rate 0 (the flag takes > 0): steps that change nothing
        group["lr"] = 0.0
    run.lr_scheduler.base_lrs = [0.0] * len(run.lr_scheduler.base_lrs)
    from diffsynth.training.data import batch_plan
    from diffsynth.training.trainer import TrainState, train_step

    state = TrainState()
    for batch in batch_plan(run.dataset.batch_keys, batch_size=2)[:2]:
        state = train_step(run, state, [[run.dataset[i] for i in batch]])
    assert validation_loss.evaluate(run) == first
    assert run.model.training  # the denoiser is back in training mode

    # trained on the held-out rows themselves, the loss on them falls
    config = toy_config(
        tmp_path, held_out, held_out, "learns", max_steps=30, learning_rate=3e-2, validation_loss_steps=1,
        loss_weighting="none", batch_size=1,
    )  # fmt: skip
    train(config)
    curve = [value for _, value in val_losses(config.output_path)]
    assert len(curve) == 30 and curve[-1] < 0.9 * curve[0], curve
    again = replace(config, output_path=str(tmp_path / "again"), max_steps=3)
    train(again)
    assert [v for _, v in val_losses(again.output_path)] == curve[:3]  # another run, the same numbers


# ----------------------------------------------------------------------------------- logging
@pytest.mark.parametrize(
    ("overrides", "steps"),
    [
        ({"validation_loss_steps": 2}, [2, 4, 5]),
        ({"validation_steps": 3}, [3, 5]),  # --validation_steps is the default interval
        ({"validation_steps": 3, "validation_loss_steps": 4, "validation_prompts": ["a cat"]}, [4, 5]),  # samples: 3
        ({}, [5]),  # neither: the last step only
    ],
)
def test_val_loss_is_logged_at_the_expected_steps(tmp_path, dataset, held_out, caplog, overrides, steps):
    config = toy_config(tmp_path, dataset, held_out, max_steps=5, **overrides)
    with caplog.at_level(logging.INFO, logger="diffsynth.training.validation_loss"):
        train(config)
    logged = val_losses(config.output_path)
    assert [step for step, _ in logged] == steps
    assert all(set(r) == {"step", "val_loss", "time"} for r in records(config.output_path) if "val_loss" in r)
    lines = [m for m in caplog.messages if "val_loss" in m]
    assert [f"step {step}: val_loss {value:.5f}" for step, value in logged] == [m.split(" (")[0] for m in lines]


def test_tensorboard_gets_the_val_loss(tmp_path, dataset, held_out):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = toy_config(tmp_path, dataset, held_out, max_steps=3, validation_loss_steps=2, report_to=["tensorboard"])
    train(config)
    events = EventAccumulator(str(Path(config.output_path) / "logs"), size_guidance={"scalars": 0})
    runs = [p.parent for p in (Path(config.output_path) / "logs").rglob("events.out.tfevents.*")]
    scalars = []
    for folder in runs:
        events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
        events.Reload()
        if "val_loss" in events.Tags()["scalars"]:
            scalars += [(e.step, e.value) for e in events.Scalars("val_loss")]
    expected = val_losses(config.output_path)
    assert [(step, pytest.approx(value, rel=1e-6)) for step, value in expected] == scalars


def test_two_processes_give_one_process_number(tmp_path, dataset, held_out):
    settings = {**DISTRIBUTED_SETTINGS, "validation_dataset_base_path": held_out, "validation_loss_steps": 1}
    train_one_process(tmp_path, dataset, accumulation=2, validation_dataset_base_path=str(held_out),
                      validation_loss_steps=1)  # fmt: skip
    run_two_processes(tmp_path, {**settings, "dataset_base_path": dataset, "output_path": tmp_path / "ddp"})
    one, two = val_losses(tmp_path / "one"), val_losses(tmp_path / "ddp")
    assert [s for s, _ in one] == [s for s, _ in two] == [1, 2, 3]
    assert [v for _, v in two] == pytest.approx(
        [v for _, v in one], rel=1e-6
    )  # 3 rows: 2 on one process, 1 on the other
    assert len({v for _, v in one}) == 3  # the weights changed between the steps


# ----------------------------------------------------------------------------------- settings
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"validation_dataset_metadata_path": "m.csv"}, "--validation_dataset_metadata_path belongs to"),
        ({"validation_loss_steps": 5}, "--validation_loss_steps belongs to"),
        ({"validation_dataset_base_path": "v", "validation_loss_steps": 0}, "--validation_loss_steps 0 must be >= 1"),
        ({"validation_dataset_base_path": "v", "validation_loss_sigmas": 0}, "--validation_loss_sigmas 0 must be >= 1"),
        ({"validation_dataset_base_path": "v", "task": "dmd2"}, "--task dmd2 does not learn"),
        ({"validation_dataset_base_path": "v", "task": "direct_distill"}, "--task direct_distill does not learn"),
        ({"validation_dataset_base_path": "v", "task": "trajectory_imitation"}, "--task trajectory_imitation does"),
    ],
)
def test_bad_settings_name_the_flag(tmp_path, dataset, overrides, message):
    config = toy_config(tmp_path, dataset, None, **overrides)
    with pytest.raises(ConfigError, match=message):
        config.check()


def test_the_command_line_takes_the_flags(tmp_path, dataset, held_out):
    argv = ["--family", TASK, "--dataset_base_path", str(dataset), "--validation_dataset_base_path", str(held_out)]
    config, _ = parse_args([*argv, "--validation_loss_steps", "50", "--validation_loss_sigmas", "8"])
    assert (config.validation_loss_steps, config.validation_loss_sigmas) == (50, 8)
    with pytest.raises(ConfigError, match="--validation_loss_sigmas -1 must be >= 1"):
        parse_args([*argv, "--validation_loss_sigmas", "-1"])


def test_missing_paths_are_named_before_any_model_loads(tmp_path, dataset, held_out):
    builds = len(ToyTask.builds)
    with pytest.raises(ConfigError, match=r"--validation_dataset_base_path .*nowhere: no such folder"):
        train(toy_config(tmp_path, dataset, tmp_path / "nowhere"))
    missing = str(tmp_path / "nothing.csv")
    with pytest.raises(ConfigError, match=r"--validation_dataset_metadata_path .*nothing.csv: no such file"):
        train(toy_config(tmp_path, dataset, held_out, validation_dataset_metadata_path=missing))
    assert len(ToyTask.builds) == builds  # refused before the task was built
    with pytest.raises(ConfigError, match="--validation_loss_sigmas 20: the training grid has 10 noise levels"):
        setup(toy_config(tmp_path, dataset, held_out, validation_loss_sigmas=20, max_timestep_boundary=0.01))


def test_an_unreadable_held_out_picture_is_named_with_the_flag_before_training(tmp_path, dataset, held_out):
    picture = next(held_out.glob("*.png"))
    picture.write_bytes(b"not a picture")
    message = rf"--validation_dataset_base_path .*: .*row \d column image: .*{picture.name} cannot be read as a picture"
    with pytest.raises(ConfigError, match=message):
        setup(toy_config(tmp_path, dataset, held_out))


def test_the_masks_of_held_out_rows_weigh_their_loss(tmp_path):
    """Two held-out folders that differ only where their masks are black give the same loss with --masked_loss,
    and different losses without."""
    a, b = masked_folders(tmp_path)

    def value(held_out, **overrides):
        return validation_loss.evaluate(setup(toy_config(tmp_path, a, held_out, max_pixels=64 * 64, **overrides)))

    assert value(a, masked_loss=True) == value(b, masked_loss=True)
    assert value(a) != value(b)  # the right halves count without the masks
    plain = tmp_path / "plain"  # folder a without its masks: held-out rows without one count everywhere
    plain.mkdir()
    for source in a.iterdir():
        if not source.name.endswith("-masklabel.png"):
            (plain / source.name).write_bytes(source.read_bytes())
    assert value(plain, masked_loss=True) == value(plain) != value(a, masked_loss=True)


# ----------------------------------------------------------------------------------- the cached two-stage mode
def encode_and_train(config: TrainConfig, cache: Path) -> None:
    """`--stage encode` into `cache`, then training from it (the two commands of the cached mode)."""
    run_stage(replace(config, cache_dir=str(cache), stage="encode"))
    run_stage(replace(config, cache_dir=str(cache)))


def test_a_cached_run_logs_the_direct_runs_val_loss(tmp_path, dataset, held_out):
    """The same val_loss at the same steps with and without the cache, to 1e-6 relative: the held-out rows are
    encoded alone in both (so the samples are equal bit for bit, checked below), but the training samples are
    encoded in other batches (the cache's by bucket, a direct run's by the shuffled plan), so the weights, and with
    them the loss, may differ in the last bits; the stage that trains from the cache loads no encoders."""
    config = toy_config(tmp_path, dataset, held_out, "direct", max_steps=4, validation_loss_steps=2, seed=5)
    train(config)
    ToyTask.builds.clear()
    cache = tmp_path / "cache"
    encode_and_train(replace(config, output_path=str(tmp_path / "cached")), cache)
    assert ToyTask.builds == [{"encoders": True, "denoiser": False}, {"encoders": False, "denoiser": True}]
    direct, cached = val_losses(tmp_path / "direct"), val_losses(tmp_path / "cached")
    assert [s for s, _ in cached] == [s for s, _ in direct] == [2, 4]
    assert [v for _, v in cached] == pytest.approx([v for _, v in direct], rel=1e-6, abs=0)
    assert direct[0][1] != pytest.approx(direct[1][1], rel=1e-4)  # the weights changed between the two

    # the held-out rows have their own place, index and recorded settings beside the training samples
    index = json.loads((cache / "validation" / "index.json").read_text())
    assert index["count"] == 3 and json.loads((cache / "index.json").read_text())["count"] == 6
    assert sorted(p.name for p in (cache / "validation" / "items").iterdir()) == [
        f"{i:06d}.safetensors" for i in range(3)
    ]
    assert index["settings"] == json.loads((cache / "validation" / "settings.json").read_text())
    assert (
        index["settings"]["metadata_sha256"]
        != json.loads((cache / "index.json").read_text())["settings"]["metadata_sha256"]
    )
    stored = setup(replace(config, cache_dir=str(cache))).validation_set
    encoded = setup(config).validation_set
    assert stored.rows == encoded.rows == [0, 1, 2]
    for a, b in zip(stored.samples, encoded.samples, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_cached_held_out_set_keeps_its_masks(tmp_path):
    """With --masked_loss the cached held-out rows carry their masks, and give the direct numbers."""
    a, b = masked_folders(tmp_path)
    cache = tmp_path / "cache"
    config = toy_config(tmp_path, a, b, max_pixels=64 * 64, masked_loss=True)
    run_stage(replace(config, cache_dir=str(cache), stage="encode"))
    cached = setup(replace(config, cache_dir=str(cache)))
    assert all(MASK_KEY in sample for sample in cached.validation_set.samples)
    direct = setup(config)
    assert validation_loss.evaluate(cached) == validation_loss.evaluate(direct)  # the same weights: bit for bit


def test_a_cache_without_the_held_out_rows_is_refused_and_the_encode_stage_adds_them(tmp_path, dataset, held_out):
    config = toy_config(tmp_path, dataset, held_out, max_steps=1)
    cache = tmp_path / "cache"
    run_stage(replace(config, cache_dir=str(cache), stage="encode", validation_dataset_base_path=None))
    assert not (cache / "validation").exists()
    with pytest.raises(
        ConfigError,
        match=r"--validation_dataset_base_path .*held_out: --cache_dir .*cache holds no encoded held-out rows .*"
        r"run --stage encode with --validation_dataset_base_path .*held_out into this --cache_dir",
    ):
        train(replace(config, cache_dir=str(cache)))
    items = {p.name: p.stat().st_mtime_ns for p in (cache / "items").iterdir()}
    encode_and_train(config, cache)  # the training samples kept, the held-out rows added
    assert {p.name: p.stat().st_mtime_ns for p in (cache / "items").iterdir()} == items
    assert [s for s, _ in val_losses(config.output_path)] == [1]


def test_a_cache_of_another_held_out_folder_is_refused(tmp_path, dataset, held_out):
    """As a cache of other settings is: by the training stage and by an encode stage into the same --cache_dir."""
    other = write_dataset(tmp_path / "other", [(64, 64)] * 2, fmt="jsonl")  # other rows, other metadata
    config = toy_config(tmp_path, dataset, held_out, max_steps=1)
    cache = tmp_path / "cache"
    run_stage(replace(config, cache_dir=str(cache), stage="encode", validation_dataset_base_path=str(other)))
    with pytest.raises(
        ConfigError,
        match=r"--validation_dataset_base_path .*held_out: the held-out rows in .*validation were encoded from "
        "another held-out folder",
    ):
        setup(replace(config, cache_dir=str(cache)))
    with pytest.raises(
        ConfigError, match=r"--validation_dataset_base_path .*held_out: --cache_dir .* holds held-out rows encoded from"
    ):
        run_stage(replace(config, cache_dir=str(cache), stage="encode"))
    assert json.loads((cache / "validation" / "index.json").read_text())["count"] == 2  # left as it was
    setup(replace(config, cache_dir=str(cache), validation_dataset_base_path=str(other)))  # its own folder: taken
