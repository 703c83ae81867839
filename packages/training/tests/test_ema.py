"""`--ema_decay`: the shadow follows `decay * shadow + (1 - decay) * weight` (with the warm-up decay), the average
swaps in and out of the model exactly, and its state round-trips for resume."""

from __future__ import annotations

import pytest
import torch

from diffsynth.runtime.errors import ConfigError
from diffsynth.training.ema import EMA


def weights() -> dict[str, torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return {
        "a": torch.nn.Parameter(torch.randn(8, 4, generator=g)),
        "b": torch.nn.Parameter(torch.randn(4, generator=g)),
    }


def nudge(params, step: int) -> None:
    with torch.no_grad():
        for k, p in enumerate(params.values()):
            p.add_(0.1 * (step + k + 1))


@pytest.mark.parametrize("warmup", [False, True])
def test_the_average_is_the_recurrence_written_out(warmup):
    params = weights()
    ema = EMA(params, decay=0.9, warmup=warmup)
    expected = {name: p.detach().clone() for name, p in params.items()}
    for step in range(6):
        nudge(params, step)
        decay = min(0.9, (1 + step) / (10 + step)) if warmup else 0.9
        assert ema.current_decay() == pytest.approx(decay)
        ema.update(params)
        for name, p in params.items():
            expected[name] = decay * expected[name] + (1 - decay) * p.detach()
    for name in params:
        torch.testing.assert_close(ema.shadow[name], expected[name], rtol=1e-6, atol=1e-6)
    assert ema.updates == 6


def test_applied_swaps_the_average_in_and_the_weights_back_exactly():
    params = weights()
    ema = EMA(params, decay=0.5, warmup=False)
    nudge(params, 0)
    ema.update(params)
    trained = {name: p.detach().clone() for name, p in params.items()}
    with ema.applied(params):
        for name, p in params.items():
            assert torch.equal(p, ema.shadow[name]) and not torch.equal(p, trained[name])
    assert all(torch.equal(params[name], trained[name]) for name in params)


def test_state_round_trips_and_errors():
    params = weights()
    ema = EMA(params, decay=0.99)
    for step in range(3):
        nudge(params, step)
        ema.update(params)
    again = EMA(weights(), decay=0.99)
    again.load_state_dict(ema.state_dict())
    assert again.updates == 3 and all(torch.equal(again.shadow[n], ema.shadow[n]) for n in params)
    nudge(params, 3)
    ema.update(params)
    again.update(params)
    assert all(torch.equal(again.shadow[n], ema.shadow[n]) for n in params)
    with pytest.raises(ConfigError, match="--ema_decay 1.0 must be between 0 and 1"):
        EMA(params, decay=1.0)
    with pytest.raises(ConfigError, match=r"the checkpoint's EMA has no average for \['b'\]"):
        EMA(params, decay=0.9).load_state_dict({"updates": 1, "shadow": {"a": params["a"].detach()}})
