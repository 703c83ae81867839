"""UniPC for flow matching (`schedulers/unipc.py`): the trajectory of diffusers' `UniPCMultistepScheduler` with flow
sigmas (the Wan authors' sampler) for the same model and sigmas, and an ODE with a known solution, on which it is far
more accurate than Euler at the same step count."""

from __future__ import annotations

import pytest
import torch

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.schedulers import FlowMatchScheduler
from diffsynth.runtime.schedulers.unipc import UniPCScheduler

MU, SCALE = 0.7, 0.3  # the data: N(MU, SCALE^2) per element


def gaussian_velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """dx/dsigma of the flow from N(MU, SCALE^2) data (sigma 0) to N(0, 1) noise (sigma 1): each point keeps its
    standardised position z, x = (1 - sigma) MU + std(sigma) z with std^2 = (1 - sigma)^2 SCALE^2 + sigma^2."""
    var = (1 - sigma) ** 2 * SCALE**2 + sigma**2
    return -MU + (x - (1 - sigma) * MU) / var * (sigma - (1 - sigma) * SCALE**2)


def sample(scheduler, steps: int, noise: torch.Tensor, **schedule) -> torch.Tensor:
    scheduler.set_timesteps(steps, **schedule)
    x = noise.clone()
    for i in range(steps):
        x = scheduler.step(gaussian_velocity(x, float(scheduler.sigmas[i])), i, x)
    return x


@pytest.mark.parametrize("order", [2, 3])
def test_unipc_solves_the_flow_ode_far_better_than_euler(order):
    """10 steps of the linear grid: UniPC's endpoints are 3x closer to the exact ones than Euler's; 4x the steps
    bring them 10x closer (Euler: 4x), as a method of order 2 or more does."""
    noise = torch.randn(4096, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = MU + SCALE * noise  # where each noise sample's trajectory ends

    def error(scheduler, steps: int) -> float:
        return float((sample(scheduler, steps, noise, shift=1.0) - exact).abs().max())

    euler, unipc = error(FlowMatchScheduler("wan"), 10), error(UniPCScheduler("wan", solver_order=order), 10)
    assert unipc < euler / 3, (unipc, euler)
    assert error(UniPCScheduler("wan", solver_order=order), 40) < unipc / 10
    assert error(FlowMatchScheduler("wan"), 40) > euler / 5  # Euler: first order


def test_steps_run_in_order_and_restart_at_zero():
    scheduler = UniPCScheduler("wan")
    with pytest.raises(ConfigError, match="before set_timesteps"):
        scheduler.step(torch.zeros(2), 0, torch.zeros(2))
    scheduler.set_timesteps(4)
    x = torch.ones(2)
    x = scheduler.step(gaussian_velocity(x, 1.0), 0, x)
    with pytest.raises(ConfigError, match="step 1 is next, not 2"):
        scheduler.step(x, 2, x)
    with pytest.raises(ConfigError, match="solver_order=4"):
        UniPCScheduler("wan", solver_order=4)
    noise = torch.randn(64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    first, again = sample(scheduler, 6, noise), sample(scheduler, 6, noise)  # the second run starts afresh
    torch.testing.assert_close(first, again, rtol=0, atol=0)


@pytest.mark.parity
@pytest.mark.parametrize("order", [1, 2, 3])
def test_trajectory_matches_diffusers_unipc_with_flow_sigmas(order):
    """The same sigmas (diffusers' flow grid with shift 5, as the Wan authors' UniPC), the same model: every
    sample along the way equals diffusers' `UniPCMultistepScheduler` (bh2, data prediction, lower order final)."""
    diffusers = pytest.importorskip("diffusers")
    theirs = diffusers.UniPCMultistepScheduler(
        num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0,
        solver_order=order,
    )  # fmt: skip
    steps = 12
    theirs.set_timesteps(steps)
    ours = UniPCScheduler("wan", solver_order=order)
    ours.set_timesteps(steps, sigmas=theirs.sigmas.tolist())
    torch.testing.assert_close(ours.sigmas, theirs.sigmas.float(), rtol=0, atol=0)
    x_ours = x_theirs = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(2))
    weight = torch.randn(8, 8, generator=torch.Generator().manual_seed(3)) / 3
    for i, t in enumerate(theirs.timesteps):
        sigma = float(ours.sigmas[i])
        x_ours = ours.step(torch.tanh(x_ours @ weight) * (1 + sigma) - x_ours, i, x_ours)
        x_theirs = theirs.step(torch.tanh(x_theirs @ weight) * (1 + sigma) - x_theirs, t, x_theirs).prev_sample
        torch.testing.assert_close(x_ours, x_theirs, rtol=1e-5, atol=1e-5)


def test_make_scheduler_picks_the_sampler_by_name():
    from diffsynth.runtime.schedulers import make_scheduler

    assert type(make_scheduler("wan")) is FlowMatchScheduler
    unipc = make_scheduler("wan", "unipc", shift=3.0)
    assert isinstance(unipc, UniPCScheduler) and unipc.template_defaults == {"shift": 3.0}
    with pytest.raises(ConfigError, match="sampler='dpm' is not known; use one of euler, unipc"):
        make_scheduler("wan", "dpm")


@pytest.mark.parametrize(
    ("sigmas", "position"),
    [([1.0, 0.5, 0.5, 0.2], 2), ([0.9, 0.6, 0.3, 0.0, 0.0], 4), ([1.0, 1.0, 0.5], 1)],
)
def test_a_repeated_sigma_is_refused_naming_its_position(sigmas, position):
    """UniPC divides by the log-SNR step, which a repeated sigma makes 0 (ZeroDivisionError or NaN before)."""
    with pytest.raises(ConfigError, match=rf"sigmas=.*sigmas\[{position}\]"):
        UniPCScheduler("wan").set_timesteps(len(sigmas), sigmas=sigmas)


@pytest.mark.parametrize(("template", "setting"), [("qwen_image", "shift_terminal"), ("ltx2", "terminal")])
def test_unipc_runs_a_template_with_terminal_zero(template, setting):
    """A terminal of 0 is no stretch (as diffusers' shift_terminal=0): no repeated sigma 0 for UniPC to trip on."""
    scheduler = UniPCScheduler(template, **{setting: 0.0})
    x = sample(scheduler, 4, torch.randn(64, generator=torch.Generator().manual_seed(0)))
    assert torch.isfinite(x).all()
