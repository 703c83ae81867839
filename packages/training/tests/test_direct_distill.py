"""`--task direct_distill` (DiffSynth-Studio's direct distillation) with the toy family: the loss is the few-step
sampling from each row's seed, written out here, against the row's latents; training lowers it; the rows' columns
and the refused combinations are named."""

import csv

import pytest
import torch
from diffsynth_training_toy import TASK, write_images

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.pipeline import seeded_noise
from diffsynth.training.config import TrainConfig
from diffsynth.training.data import batch_plan
from diffsynth.training.trainer import (
    DistillPlan,
    TrainState,
    direct_distill_loss,
    distill_plan,
    prepare_batch,
    setup,
    train_step,
)


def distill_dataset(folder, rows):
    """Two 64x64 images with `rows`' extra columns (seed, num_inference_steps, ...)."""
    names = write_images(folder, [(64, 64)] * len(rows))
    columns = ["image", "prompt", *sorted({k for r in rows for k in r})]
    with (folder / "metadata.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for i, (name, extra) in enumerate(zip(names, rows, strict=True)):
            writer.writerow({"image": name, "prompt": f"picture {i}", **extra})
    return folder


def distill_config(tmp_path, dataset, **overrides) -> TrainConfig:
    values = dict(
        family=TASK, dataset_base_path=str(dataset), output_path=str(tmp_path / "out"), max_pixels=64 * 64,
        bucket_step=16, batch_size=2, mixed_precision="no", dtype="float32", lora_rank=4, learning_rate=1e-2,
        max_steps=4, num_epochs=50, log_every=1, task="direct_distill",
    )  # fmt: skip
    values.update(overrides)
    return TrainConfig(**values)


def test_the_loss_is_the_seeded_few_step_sampling_against_the_rows_latents(tmp_path):
    data = distill_dataset(tmp_path / "data", [{"seed": 7, "num_inference_steps": 3}, {"seed": 11}])
    run = setup(distill_config(tmp_path, data, distill_num_inference_steps=3))
    items = [run.dataset[i] for i in range(2)]
    plan = distill_plan(run.config, items)
    assert plan == DistillPlan(seeds=(7, 11), rand_devices=("cpu", "cpu"), steps=3)
    batch = prepare_batch(run, items)
    x0 = batch["latents"].float()
    with torch.no_grad():
        got = direct_distill_loss(run, run.model, batch, plan)
        x = torch.stack([torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(s)) for s in (7, 11)])
        sigmas = run.task.inference_sigmas(tuple(x0.shape), 3)
        assert len(sigmas) == 4 and sigmas[0] == 1 and sigmas[-1] == 0
        for i in range(3):
            x = x + (sigmas[i + 1] - sigmas[i]) * run.task.velocity(run.model, batch, x, sigmas[i].expand(2))
        want = ((x - x0) ** 2).mean()
    torch.testing.assert_close(got, want)
    assert torch.equal(seeded_noise((2, 3), 7), torch.randn(2, 3, generator=torch.Generator().manual_seed(7)))


def test_training_pulls_the_few_step_samples_toward_the_images(tmp_path):
    """A LoRA trained with direct distillation on two rows lowers their few-step loss (the same noise each
    time: the rows' seeds), with gradients through every sampling step."""
    data = distill_dataset(tmp_path / "data", [{"seed": 1}, {"seed": 2}])
    run = setup(distill_config(tmp_path, data, max_steps=30, lora_rank=8, learning_rate=2e-2))
    items = [run.dataset[i] for i in range(2)]
    batch, plan = prepare_batch(run, items), distill_plan(run.config, items)

    def loss():
        with torch.no_grad():
            return float(direct_distill_loss(run, run.model, batch, plan))

    before = loss()
    state = TrainState()
    for step in range(30):
        (group,) = batch_plan(run.dataset.batch_keys, batch_size=2)
        state = train_step(run, state, [[run.dataset[i] for i in group]])
        if step == 0:
            assert state.loss == pytest.approx(before, rel=1e-5)  # the logged loss is this loss
    after = loss()
    assert after < 0.5 * before, (before, after)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"seed": ""}, {"seed": 2}], "row 0 of the batch .* has seed '': each row needs the integer seed"),
        ([{"seed": 1, "cfg_scale": 4}, {"seed": 2, "cfg_scale": 4}], "cfg_scale 4: the distilled sampling"),
        ([{"seed": 1, "num_inference_steps": 4}, {"seed": 2, "num_inference_steps": 8}], "one num_inference_steps"),
        ([{"seed": 1, "num_inference_steps": "x"}, {"seed": 2}], "num_inference_steps 'x'"),
    ],
)
def test_row_columns_are_checked_by_name(tmp_path, rows, message):
    data = distill_dataset(tmp_path / "data", rows)
    run = setup(distill_config(tmp_path, data))
    with pytest.raises(ConfigError, match=message):
        distill_plan(run.config, [run.dataset[i] for i in range(2)])


def test_refused_combinations_name_the_flag(tmp_path, monkeypatch):
    import diffsynth_training_toy

    data = distill_dataset(tmp_path / "data", [{"seed": 1}, {"seed": 2}])
    with pytest.raises(ConfigError, match="--cache_dir does not keep"):
        distill_config(tmp_path, data, cache_dir=str(tmp_path / "cache")).check()
    with pytest.raises(ConfigError, match="--distill_num_inference_steps 0"):
        distill_config(tmp_path, data, distill_num_inference_steps=0).check()
    monkeypatch.delattr(diffsynth_training_toy.ToyTask, "inference_sigmas")
    with pytest.raises(ConfigError, match="has no inference schedule to sample with"):
        setup(distill_config(tmp_path, data))


def test_the_cli_takes_the_task(tmp_path):
    from diffsynth.training.config import parse_args

    data = distill_dataset(tmp_path / "data", [{"seed": 1}, {"seed": 2}])
    cfg, _ = parse_args(["--family", TASK, "--dataset_base_path", str(data), "--task", "direct_distill",
                      "--distill_num_inference_steps", "8"])  # fmt: skip
    assert (cfg.task, cfg.distill_num_inference_steps) == ("direct_distill", 8)
