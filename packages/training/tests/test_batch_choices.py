"""A task's per-batch random choices (`draw_choices`, e.g. LTX-2's first-frame conditioning) are drawn from a
generator keyed by the micro-batch: the same with or without gradient accumulation, the same on a rerun, another
stream than the batch's noise, and copied onto a teacher's negative batch."""

import torch
from diffsynth_training_toy import ToyTask, toy_config

from diffsynth.training.config import TrainConfig
from diffsynth.training.data import batch_plan
from diffsynth.training.teacher import negative_rows_batch
from diffsynth.training.trainer import TrainState, micro_batch_noise, setup, train_step

TOY_VELOCITY = ToyTask.velocity  # before any test wraps it


def config(tmp_path, dataset, name: str, **overrides) -> TrainConfig:
    """The toy run with batches of one: each micro-batch draws its own choice."""
    return toy_config(tmp_path, dataset, name, **{"batch_size": 1, **overrides})


def drawn_choices(cfg: TrainConfig, monkeypatch, micro_batches: int = 4) -> list[float]:
    """The `choice` each micro-batch's velocity call saw, in order."""
    seen: list[float] = []

    def draw_choices(self, batch, generator):
        return {"choice": torch.rand((), generator=generator).expand(batch["latents"].shape[0]).clone()}

    def recording_velocity(self, denoiser, batch, noisy, sigma):
        seen.append(float(batch["choice"][0]))
        return TOY_VELOCITY(self, denoiser, batch, noisy, sigma)

    monkeypatch.setattr(ToyTask, "draw_choices", draw_choices, raising=False)
    monkeypatch.setattr(ToyTask, "velocity", recording_velocity)
    run = setup(cfg)
    plan = batch_plan(run.dataset.batch_keys, batch_size=1)[:micro_batches]
    per_step = cfg.gradient_accumulation_steps
    state = TrainState()
    for start in range(0, len(plan), per_step):
        state = train_step(run, state, [[run.dataset[i] for i in b] for b in plan[start : start + per_step]])
    return seen


def test_choices_are_keyed_by_the_micro_batch(tmp_path, dataset, monkeypatch):
    single = drawn_choices(config(tmp_path, dataset, "a"), monkeypatch)
    assert len(single) == 4 and len(set(single)) == 4
    accumulated = drawn_choices(config(tmp_path, dataset, "b", gradient_accumulation_steps=2), monkeypatch)
    assert accumulated == single  # micro-batch i draws alike however the steps group them
    assert drawn_choices(config(tmp_path, dataset, "c"), monkeypatch) == single  # a rerun draws alike
    assert drawn_choices(config(tmp_path, dataset, "d", seed=7), monkeypatch) != single
    noise_first = [float(torch.rand((), generator=micro_batch_noise(0, 0, i))) for i in range(4)]
    assert all(a != b for a, b in zip(single, noise_first, strict=True))  # not the noise stream


def test_a_negative_batch_takes_the_positive_batchs_choices(tmp_path, dataset, monkeypatch):
    monkeypatch.setattr(ToyTask, "batch_choices", ("choice",), raising=False)
    run = setup(config(tmp_path, dataset, "neg"))
    items = [run.dataset[0]]
    positive = {"choice": torch.tensor([True])}
    negative = negative_rows_batch(run, items, "", 2.0, positive)
    assert torch.equal(negative["choice"], positive["choice"])
    assert "choice" not in negative_rows_batch(run, items, "", 2.0)
