"""LoRA+ (`--lora_plus_ratio`: the B matrices learn faster) and `--caption_dropout` (rows trained with an empty
prompt), on the toy family."""

import pytest
import torch
from diffsynth_training_toy import TASK

from diffsynth.runtime.errors import ConfigError
from diffsynth.training.config import TrainConfig
from diffsynth.training.testing import first_losses

LR = 1e-2


def toy_config(tmp_path, dataset, name="out", **overrides) -> TrainConfig:
    values = dict(
        family=TASK, dataset_base_path=str(dataset), output_path=str(tmp_path / name), max_pixels=64 * 128,
        bucket_step=16, batch_size=2, mixed_precision="no", dtype="float32", lora_rank=4, learning_rate=LR,
        max_steps=4, num_epochs=10, log_every=1, weight_decay=0.0,
    )  # fmt: skip
    return TrainConfig(**{**values, **overrides})


def test_lora_plus_moves_the_b_matrices_ratio_times_faster(tmp_path, dataset):
    """peft starts B at zero, so A gets no gradient in the first step and AdamW's first update of B is the
    learning rate times the sign of its gradient: B's largest entry after one step is its group's rate."""
    _, plain = first_losses(toy_config(tmp_path, dataset, "plain"), steps=1)
    _, plus = first_losses(toy_config(tmp_path, dataset, "plus", lora_plus_ratio=16.0), steps=1)
    groups = plus.optimizer.param_groups
    assert len(groups) == 2 and groups[1]["lr"] == pytest.approx(16 * groups[0]["lr"])
    for run, rate in ((plain, LR), (plus, 16 * LR)):
        b = [p for name, p in run.trainable.items() if ".lora_B." in name]
        a = [p for name, p in run.trainable.items() if ".lora_A." in name]
        assert b and a
        assert max(float(p.detach().abs().max()) for p in b) == pytest.approx(rate, rel=1e-3)
    for name, p in plus.trainable.items():  # A took no step in either run: the same initialisation
        if ".lora_A." in name:
            assert torch.equal(p, plain.trainable[name]), name


def test_caption_dropout_empties_the_same_rows_on_every_run(tmp_path, dataset, encoded_prompts):
    seen = encoded_prompts
    first_losses(toy_config(tmp_path, dataset, "a", caption_dropout=0.5), steps=3)
    first_run, seen[:] = list(seen), []
    first_losses(toy_config(tmp_path, dataset, "b", caption_dropout=0.5), steps=3)
    assert seen == first_run  # drawn from the micro-batch's generator: a rerun drops the same rows
    prompts = [p for batch in first_run for p in batch]
    assert "" in prompts and any(prompts)  # some rows dropped, some kept
    seen[:] = []
    first_losses(toy_config(tmp_path, dataset, "c"), steps=3)
    assert "" not in [p for batch in seen for p in batch]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"lora_plus_ratio": 0.0}, "--lora_plus_ratio 0.0 must be > 0"),
        ({"lora_plus_ratio": 16.0, "lora_type": "lokr"}, "--lora_plus_ratio speeds up a LoRA's B matrices"),
        ({"lora_plus_ratio": 16.0, "trainable_models": ["denoiser"]}, "--trainable_models has none"),
        ({"caption_dropout": 1.0}, r"--caption_dropout 1.0 must be a probability in \[0, 1\)"),
        ({"caption_dropout": 0.1, "cache_dir": "cache"}, "--cache_dir holds them encoded"),
    ],
)
def test_bad_settings_are_named(tmp_path, dataset, overrides, message):
    with pytest.raises(ConfigError, match=message):
        toy_config(tmp_path, dataset, **overrides).check()


def test_logit_normal_timesteps_reach_the_scheduler(tmp_path, dataset, monkeypatch):
    from types import SimpleNamespace

    from diffsynth.runtime.schedulers.flow_match import FlowMatchScheduler
    from diffsynth.training.trainer import check_timestep_sampling

    seen = []
    draw = FlowMatchScheduler.sample_training_sigmas

    def recording(self, batch, generator=None, **kwargs):
        seen.append(kwargs)
        return draw(self, batch, generator, **kwargs)

    monkeypatch.setattr(FlowMatchScheduler, "sample_training_sigmas", recording)
    cfg = toy_config(tmp_path, dataset, timestep_sampling="logit_normal", logit_mean=0.5, logit_std=0.8)
    losses, _ = first_losses(cfg, steps=2)
    assert len(losses) == 2 and all(loss > 0 for loss in losses)
    assert seen and all(
        k["distribution"] == "logit_normal" and k["logit_mean"] == 0.5 and k["logit_std"] == 0.8 for k in seen
    )

    class OwnDraw:  # a scheduler with its own draw (LTX-2's): no other distribution
        def sample_training_sigmas(self, batch, generator=None, *, min_boundary=0.0, max_boundary=1.0):
            raise AssertionError("not called")

    task = SimpleNamespace(scheduler=OwnDraw(), family="own")
    with pytest.raises(ConfigError, match="--timestep_sampling logit_normal: the own task draws its noise levels"):
        check_timestep_sampling(cfg.check(), task)
    check_timestep_sampling(toy_config(tmp_path, dataset).check(), task)  # uniform: every family's default
