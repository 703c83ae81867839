"""`--optimizer`: each name builds the library's optimizer with the trainer's learning rate and weight decay; the
8-bit AdamW follows float32 AdamW closely, and every optimizer's state round-trips through `state_dict` (what a
resume checkpoint stores) so a resumed run continues exactly."""

from __future__ import annotations

import pytest
import torch

from diffsynth.runtime.errors import ConfigError
from diffsynth.training.config import from_dict
from diffsynth.training.optimizers import make_optimizer, optimizer_arguments


def params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(64, 128, generator=g)), torch.nn.Parameter(torch.randn(128, generator=g))]


def run(optimizer, weights, steps: int, seed: int = 1) -> None:
    """`steps` steps on a fixed quadratic with seeded noise in the gradients."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for w in weights:
            w.grad = 2 * w.detach() + 0.1 * torch.randn(w.shape, generator=g)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_adamw_is_torchs_with_the_trainers_settings():
    optimizer = make_optimizer("adamw", params(), lr=3e-4, weight_decay=0.02, options={"betas": (0.9, 0.99)})
    assert type(optimizer) is torch.optim.AdamW
    group = optimizer.param_groups[0]
    assert group["lr"] == 3e-4 and group["weight_decay"] == 0.02 and group["betas"] == (0.9, 0.99)


def test_adamw8bit_follows_float32_adamw():
    pytest.importorskip("bitsandbytes")
    reference, eight, slower = params(), params(), params()
    run(torch.optim.AdamW(reference, lr=1e-2, weight_decay=0.01), reference, 30)
    run(torch.optim.AdamW(slower, lr=0.9e-2, weight_decay=0.01), slower, 30)  # what a 10% other lr changes
    optimizer = make_optimizer("adamw8bit", eight, lr=1e-2, weight_decay=0.01)
    assert type(optimizer).__name__ == "AdamW8bit"
    run(optimizer, eight, 30)
    start = params()
    for ours, theirs, other, first in zip(eight, reference, slower, start, strict=True):
        moved = (theirs - first).abs().mean()
        assert moved > 0.1  # the quadratic pulls the weights a long way
        off = (ours - theirs).abs().mean()
        assert off < 0.05 * moved  # measured: 2.4% of the way (8-bit moments)
        assert off < (other - theirs).abs().mean() / 2  # nearer than AdamW with a 10% smaller learning rate


@pytest.mark.parametrize("name", ["adamw", "adamw8bit", "adafactor", "prodigy"])
def test_state_round_trips_so_a_resumed_run_continues_exactly(name):
    pytest.importorskip({"adamw8bit": "bitsandbytes", "prodigy": "prodigyopt"}.get(name, "torch"))
    straight = params()
    optimizer = make_optimizer(name, straight, lr=1e-2, weight_decay=0.01)
    run(optimizer, straight, 5)
    run(optimizer, straight, 5, seed=2)

    first = params()
    optimizer = make_optimizer(name, first, lr=1e-2, weight_decay=0.01)
    run(optimizer, first, 5)
    state = optimizer.state_dict()
    resumed = [torch.nn.Parameter(w.detach().clone()) for w in first]
    again = make_optimizer(name, resumed, lr=1e-2, weight_decay=0.01)
    again.load_state_dict(state)
    run(again, resumed, 5, seed=2)
    for a, b in zip(resumed, straight, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"optimizer": "adafactor", "optimizer_options": "relative_step=true"},
         r"--optimizer_options relative_step=True: Adafactor says Cannot combine manual `lr`"),
        ({"optimizer_options": "eps=-1"}, r"--optimizer_options eps=-1: AdamW says Invalid epsilon value"),
        ({"optimizer_options": "betas=0.9:2.0"}, r"--optimizer_options betas=0.9:2.0: AdamW says"),
    ],
)  # fmt: skip
def test_values_the_optimizer_refuses_are_named_by_the_config_check(values, message):
    """The optimizer is built over a stand-in parameter as the settings are checked, before any model loads."""
    with pytest.raises(ConfigError, match=message):
        from_dict({"model": "m", "dataset_base_path": "d", **values}).check()


def test_options_and_errors(monkeypatch):
    def flag(text):  # --optimizer_options as the trainer's config reads it, then as the optimizer takes it
        return optimizer_arguments(from_dict({"optimizer_options": text}).optimizer_options)

    assert flag("betas=0.9:0.99,eps=1e-8,amsgrad=true,foreach=false") == {
        "betas": (0.9, 0.99),
        "eps": 1e-8,
        "amsgrad": True,
        "foreach": False,
    }
    assert flag("d_coef=2") == {"d_coef": 2}
    with pytest.raises(ConfigError, match="--optimizer_options 'betas': write name=value pairs"):
        flag("betas")
    with pytest.raises(ConfigError, match="eps='small': values are numbers"):
        flag("eps=small")
    with pytest.raises(ConfigError, match="--optimizer 'lion' is not known; optimizers: adamw, adamw8bit"):
        make_optimizer("lion", params(), 1e-4, 0.0)
    with pytest.raises(ConfigError, match=r"--optimizer_options momentum=0.9: AdamW says"):
        make_optimizer("adamw", params(), 1e-4, 0.0, {"momentum": 0.9})
    monkeypatch.setitem(__import__("sys").modules, "prodigyopt", None)
    with pytest.raises(ConfigError, match="--optimizer prodigy needs the prodigyopt package"):  # before any load
        from_dict({"optimizer": "prodigy", "optimizer_options": "d_coef=2"}).check()
    with pytest.raises(ConfigError, match="--optimizer prodigy needs the prodigyopt package: pip install prodigyopt"):
        make_optimizer("prodigy", params(), 1.0, 0.0)
