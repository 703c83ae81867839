"""`--lr_scheduler` (cosine_with_restarts, polynomial, a floor), `--loss_type` (l1, huber, smooth_l1) and the adapter
dropouts (`--lora_dropout`, `--rank_dropout`, `--module_dropout`) with the toy family: the schedules equal
transformers' schedulers step for step, each loss is its formula of the same run's prediction error, and a run
with dropout is reproducible and resumes exactly."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from diffsynth_training_toy import TASK, toy_config
from safetensors.torch import load_file

from diffsynth.runtime.errors import ConfigError
from diffsynth.training import trainer
from diffsynth.training.config import TrainConfig
from diffsynth.training.testing import first_losses, resume_after_crash
from diffsynth.training.trainer import _lr_lambda, elementwise_loss, train


def transformers_factors(name: str, warmup: int, total: int, **kwargs) -> list[float]:
    """The learning-rate factors of transformers' scheduler `name` at steps 0..total-1 (the reference)."""
    import transformers.optimization as schedules

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    make = getattr(schedules, f"get_{name}_schedule_with_warmup")
    schedule = make(optimizer, num_warmup_steps=warmup, num_training_steps=total, **kwargs)
    return [schedule.lr_lambdas[0](step) for step in range(total)]


@pytest.mark.parametrize(
    ("ours", "reference", "kwargs"),
    [
        (dict(lr_scheduler="cosine_with_restarts", lr_scheduler_num_cycles=3), "cosine_with_hard_restarts", dict(num_cycles=3)),
        (dict(lr_scheduler="polynomial", lr_scheduler_power=2.0), "polynomial_decay", dict(power=2.0, lr_end=0.0)),
        (dict(lr_scheduler="polynomial", lr_scheduler_power=0.5, lr_scheduler_min_lr_ratio=0.2), "polynomial_decay", dict(power=0.5, lr_end=0.2)),
        (dict(lr_scheduler="cosine", lr_scheduler_min_lr_ratio=0.1), "cosine_with_min_lr", dict(min_lr_rate=0.1)),
        (dict(lr_scheduler="linear"), "linear", {}),
    ],
)  # fmt: skip
def test_schedules_equal_transformers_after_warm_up(tmp_path, ours, reference, kwargs):
    """After the warm-up (ours starts above 0: `(step + 1) / (warmup + 1)`) every step's factor is transformers'."""
    warmup, total = 3, 40
    config = TrainConfig(family=TASK, dataset_base_path=str(tmp_path), lr_warmup_steps=warmup, **ours).check()
    factor = _lr_lambda(config, total)
    expected = transformers_factors(reference, warmup, total, **kwargs)
    got = [factor(step) for step in range(total)]
    assert got[:warmup] == [(step + 1) / (warmup + 1) for step in range(warmup)]
    torch.testing.assert_close(torch.tensor(got[warmup:]), torch.tensor(expected[warmup:]), atol=1e-7, rtol=0)


def test_restarts_go_back_up_and_the_floor_holds(tmp_path):
    config = TrainConfig(
        family=TASK,
        dataset_base_path=str(tmp_path),
        lr_scheduler="cosine_with_restarts",
        lr_scheduler_num_cycles=2,
        lr_scheduler_min_lr_ratio=0.25,
    ).check()
    factors = [_lr_lambda(config, 20)(step) for step in range(21)]
    assert factors[0] == 1.0 and factors[10] == 1.0  # the second cycle starts at the full rate
    assert min(factors) == pytest.approx(0.25) and factors[20] == pytest.approx(0.25)
    assert factors[9] < factors[5] < factors[1]


def test_the_trainer_logs_the_schedules_rates(tmp_path, dataset):
    config = toy_config(
        tmp_path, dataset, max_steps=6, lr_warmup_steps=1, lr_scheduler="polynomial", lr_scheduler_power=3.0
    )
    train(config)
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    # step N logs the rate it used: factor(N - 1), ours warming up from 1 / 2 where transformers' starts at 0
    expected = [0.5, *transformers_factors("polynomial_decay", 1, 6, power=3.0, lr_end=0.0)[1:]]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    torch.testing.assert_close(torch.tensor([r["lr"] for r in records]), 1e-2 * torch.tensor(expected))


def test_the_logged_rate_is_the_one_the_step_used(tmp_path, dataset):
    """AdamW's first step from B = 0 moves each entry by the rate (without weight decay): the one logged at step 1."""
    settings = dict(lr_warmup_steps=3, max_steps=1, learning_rate=1e-2, weight_decay=0.0, max_grad_norm=0.0)
    train(toy_config(tmp_path, dataset, **settings))
    (record,) = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    weights = load_file(str(tmp_path / "out" / "step-000001.safetensors"))
    moved = max(float(v.abs().max()) for k, v in weights.items() if ".up" in k or "lora_B" in k)
    assert record["lr"] == pytest.approx(moved, rel=1e-3)


def _float64_loss(kind: str, d: torch.Tensor, c: float) -> torch.Tensor:
    """kohya's losses written out in float64: pseudo-Huber scaled by 2c (huber) or by 2 (smooth_l1)."""
    d = d.double()
    if kind == "l1":
        return d.abs()
    root = (d * d + c * c).sqrt() - c
    return 2 * c * root if kind == "huber" else 2 * root


def test_elementwise_losses_match_torch_and_their_formulas(tmp_path):
    d = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(0)) * 3
    zero = torch.zeros_like(d)

    def losses(kind, c=0.1):
        return elementwise_loss(TrainConfig(family=TASK, dataset_base_path=str(tmp_path), loss_type=kind, huber_c=c), d)

    torch.testing.assert_close(losses("mse"), F.mse_loss(d, zero, reduction="none"))
    torch.testing.assert_close(losses("l1"), F.l1_loss(d, zero, reduction="none"))
    for kind in ("huber", "smooth_l1"):
        torch.testing.assert_close(losses(kind, 0.3).double(), _float64_loss(kind, d, 0.3), rtol=1e-5, atol=1e-6)
    # the shapes that make them robust: huber is the square near 0 and 2c|d| far out; smooth_l1 is 2|d| far out
    small = torch.full((3,), 1e-3, dtype=torch.float64)
    config = TrainConfig(family=TASK, dataset_base_path=str(tmp_path), loss_type="huber", huber_c=1.0)
    torch.testing.assert_close(elementwise_loss(config, small), small.pow(2), rtol=1e-5, atol=0)
    far = torch.full((3,), 1e3, dtype=torch.float64)
    torch.testing.assert_close(elementwise_loss(config, far), 2.0 * far, rtol=2e-3, atol=0)
    config = TrainConfig(family=TASK, dataset_base_path=str(tmp_path), loss_type="smooth_l1", huber_c=0.01)
    torch.testing.assert_close(elementwise_loss(config, far), 2.0 * far, rtol=1e-4, atol=0)


@pytest.mark.parametrize("loss_type", ["l1", "huber", "smooth_l1"])
def test_the_trainer_takes_the_chosen_loss_of_the_same_prediction_error(tmp_path, dataset, monkeypatch, loss_type):
    """The first step's loss of a `--loss_type` run is that loss of the error an mse run sees at its first step
    (the same noise, timesteps and base model: a fresh LoRA adds nothing yet), averaged per sample."""
    seen = []
    real = trainer.elementwise_loss

    def spy(cfg, difference):
        seen.append(difference.detach().clone())
        return real(cfg, difference)

    monkeypatch.setattr(trainer, "elementwise_loss", spy)
    (mse_loss, *_), _ = first_losses(toy_config(tmp_path, dataset, "mse", loss_weighting="none"), steps=1)
    difference = seen[0]
    settings = dict(loss_weighting="none", loss_type=loss_type) | ({} if loss_type == "l1" else {"huber_c": 0.5})
    (loss, *_), _ = first_losses(toy_config(tmp_path, dataset, loss_type, **settings), steps=1)
    torch.testing.assert_close(seen[1], difference)  # the same step, only the loss differs
    assert mse_loss == pytest.approx(difference.double().pow(2).mean().item(), rel=1e-5)
    expected = _float64_loss(loss_type, difference, 0.5).flatten(1).mean(1).mean().item()
    assert loss == pytest.approx(expected, rel=1e-5)
    assert loss != pytest.approx(mse_loss, rel=1e-2)


def _weights(output, step) -> dict[str, torch.Tensor]:
    return load_file(str(output / "checkpoints" / f"step-{step:06d}" / "trainable.safetensors"))


@pytest.mark.parametrize(
    "settings",
    [dict(lora_dropout=0.5), dict(lora_type="loha", rank_dropout=0.5, module_dropout=0.3)],
    ids=["lora", "loha"],
)
def test_dropout_changes_training_reproducibly_and_resumes_exactly(tmp_path, dataset, settings):
    plain = {**settings, "lora_dropout": 0.0, "rank_dropout": 0.0, "module_dropout": 0.0}
    common = dict(max_steps=4, save_steps=2)
    train(toy_config(tmp_path, dataset, "plain", **common, **plain))
    train(toy_config(tmp_path, dataset, "a", **common, **settings))
    train(toy_config(tmp_path, dataset, "b", **common, **settings))
    a, b, without = (_weights(tmp_path / name, 4) for name in ("a", "b", "plain"))
    assert a.keys() == without.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # seeded per micro-batch: a rerun drops the same units
    assert any(not torch.equal(a[k], without[k]) for k in a)  # and dropping units changes what is learned

    resume_after_crash(toy_config(tmp_path, dataset, "resumed", **common, **settings))
    resumed = _weights(tmp_path / "resumed", 4)
    assert all(torch.equal(a[k], resumed[k]) for k in a)


@pytest.mark.parametrize("lora_type", ["loha", "lokr"])
def test_a_micro_batch_that_drops_every_module_gives_zero_gradients(tmp_path, dataset, monkeypatch, lora_type):
    """With one adapter layer and a high --module_dropout many micro-batches drop all of it: the output then holds
    no trained weight, and the step takes zero gradients (it must not fail in backward)."""
    grads = []
    step = torch.optim.AdamW.step

    def recording(self, *args, **kwargs):
        grads.append([None if p.grad is None else p.grad.clone() for g in self.param_groups for p in g["params"]])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording)
    settings = dict(lora_type=lora_type, module_dropout=0.6, lora_target_modules=["proj_out"], max_steps=6)
    train(toy_config(tmp_path, dataset, **settings))
    dropped = [g for g in grads if all(x is not None and not x.any() for x in g)]
    assert len(grads) == 6 and dropped  # some steps had every layer left out: zero gradients, no error
    assert len(dropped) < 6  # and some did not


def test_dropout_reaches_peft_layers_and_is_off_outside_training(tmp_path, dataset):
    from diffsynth.training.trainer import setup

    run = setup(toy_config(tmp_path, dataset, lora_dropout=0.4))
    rates = {m.lora_dropout["default"].p for m in run.model.modules() if hasattr(m, "lora_dropout")}
    assert rates == {0.4}
    run.model.eval()
    layer = next(m for m in run.model.modules() if hasattr(m, "lora_B"))
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    x = torch.randn(3, layer.in_features)
    torch.testing.assert_close(layer(x), layer(x))  # eval: no dropout
    layer.train()
    assert not torch.equal(layer(x), layer(x))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(lr_scheduler_num_cycles=0), "--lr_scheduler_num_cycles"),
        (dict(lr_scheduler_power=0.0), "--lr_scheduler_power"),
        (dict(lr_scheduler_min_lr_ratio=1.0), "--lr_scheduler_min_lr_ratio"),
        (dict(huber_c=0.0), "--huber_c"),
        (dict(huber_c=0.5), "--huber_c 0.5 shapes --loss_type huber or smooth_l1; this run has none"),
        (dict(lr_scheduler_num_cycles=3, lr_scheduler="cosine"), "--lr_scheduler_num_cycles 3 shapes --lr_scheduler"),
        (dict(lr_scheduler_power=2.0, lr_scheduler="linear"), "--lr_scheduler_power 2.0 shapes --lr_scheduler poly"),
        (dict(lr_scheduler_min_lr_ratio=0.1), "--lr_scheduler_min_lr_ratio 0.1 shapes a decaying --lr_scheduler"),
        (dict(loss_type="l1", task="dmd2"), "--loss_type l1"),
        (dict(lora_dropout=1.0), "--lora_dropout 1.0"),
        (dict(lora_dropout=0.1, lora_type="loha"), "--lora_type loha takes --rank_dropout"),
        (dict(rank_dropout=0.1), "--lora_type lora takes --lora_dropout"),
        (dict(module_dropout=0.1, trainable_models=["dit"]), "--trainable_models"),
    ],
)
def test_bad_settings_name_their_flag(tmp_path, settings, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(family=TASK, dataset_base_path=str(tmp_path), **settings).check()


def test_a_resumed_optimizer_has_no_state_for_parameters_that_had_none():
    """torch's `set_optimizer_state_dict` gives every parameter a state before loading the saved ones; one with no
    gradient yet (a layer a module dropout left out) must resume without one, or Adam counts a step too many."""
    from diffsynth.training.distributed import full_optimizer_state, load_optimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):  # only the first and last layers' weights learn
        (model[0].weight.sum() + model[2].weight.pow(2).sum()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    saved = copy.deepcopy(full_optimizer_state(model, optimizer))  # as read back from the checkpoint file
    twin = torch.nn.Sequential(*(torch.nn.Linear(3, 3) for _ in range(3)))
    twin.load_state_dict(model.state_dict())
    resumed = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    load_optimizer(twin, resumed, saved)
    names = dict(twin.named_parameters())
    assert {n for n, p in names.items() if p in resumed.state} == {"0.weight", "2.weight"}
    for model_, optimizer_ in ((model, optimizer), (twin, resumed)):  # the next steps agree exactly
        (model_[1].weight.sum() + model_[2].weight.pow(2).sum()).backward()
        optimizer_.step()
    for name, param in model.named_parameters():
        assert torch.equal(param, names[name]), name


@pytest.mark.parametrize("max_grad_norm", [1e9, 1e-3])
def test_the_logged_gradient_norm_is_the_norm_before_clipping(tmp_path, dataset, max_grad_norm):
    """The optimizer's spy sees the gradients after clipping: unclipped (a huge limit) their norm is the logged one;
    clipped, it is the limit, while the logged norm stays the one before clipping."""
    from diffsynth.training.data import batch_plan
    from diffsynth.training.trainer import TrainState, setup, train_step

    run = setup(toy_config(tmp_path, dataset, max_grad_norm=max_grad_norm))
    seen, real_step = [], run.optimizer.step

    def spy(*args, **kwargs):
        grads = [p.grad.flatten() for p in run.trainable.values() if p.grad is not None]
        seen.append(float(torch.cat(grads).norm()))
        return real_step(*args, **kwargs)

    run.optimizer.step = spy
    batch = batch_plan(run.dataset.batch_keys, batch_size=2)[0]
    state = train_step(run, TrainState(), [[run.dataset[i] for i in batch]])
    if max_grad_norm > 1:
        assert state.grad_norm == pytest.approx(seen[0], rel=1e-5) and state.grad_norm > 1e-3
    else:
        assert seen[0] == pytest.approx(max_grad_norm, rel=1e-3) and state.grad_norm > 10 * max_grad_norm
    train(toy_config(tmp_path, dataset, "logged", max_steps=2, max_grad_norm=max_grad_norm))
    records = [json.loads(line) for line in (tmp_path / "logged" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["grad_norm"] == pytest.approx(state.grad_norm, rel=1e-6)  # the same first step, logged
    assert "grad_norm" not in json.loads(  # no clipping, no norm
        train_and_read_first_record(tmp_path, dataset, max_grad_norm=0.0)
    )


def train_and_read_first_record(tmp_path, dataset, **settings) -> str:
    train(toy_config(tmp_path, dataset, "unclipped", max_steps=1, **settings))
    return (tmp_path / "unclipped" / "metrics.jsonl").read_text().splitlines()[0]
