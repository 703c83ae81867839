"""VRAM plan: units from `offload_units`, the resident/streamed arithmetic, limits and the activation reserve."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.vram import DEFAULT_ACTIVATION_GIB, UnitSize, enable_vram_management, find_units, make_plan
from diffsynth.runtime.vram.plan import BUFFERS, GIB, IN_FLIGHT, activation_bytes

MB = 1 << 20


class Stack(nn.Module):
    """Ten equal blocks (1 MiB of fp32 weights each) and a small head."""

    offload_units = ("blocks",)
    vram_activation_gib = 0.0

    def __init__(self, n: int = 10):
        super().__init__()
        self.head = nn.Linear(16, 512, bias=False)
        self.blocks = nn.ModuleList(nn.Linear(512, 512, bias=False) for _ in range(n))

    def forward(self, x):
        x = self.head(x)
        for block in self.blocks:
            x = x + block(x).tanh()
        return x


def test_units_expand_module_lists_in_order():
    names = [n for n, _ in find_units(Stack(3))]
    assert names == ["blocks.0", "blocks.1", "blocks.2"]


@pytest.mark.parametrize(
    ("units", "match"),
    [
        (("blocks", "missing"), r"names 'missing', which is not a submodule"),
        (("blocks", "blocks.1"), r"overlap: 'blocks.1' and 'blocks.1'"),
        ("blocks", "must be a tuple of dotted module paths"),
    ],
)
def test_bad_units_are_named(units, match):
    model = Stack(3)
    model.offload_units = units
    with pytest.raises(ConfigError, match=match):
        find_units(model)


def test_no_budget_or_ample_budget_keeps_everything_resident():
    units = [UnitSize(f"u{i}", 100, 150) for i in range(4)]
    free = make_plan(units, fixed=50, budget=None)
    assert free.resident == ("u0", "u1", "u2", "u3") and free.streamed == () and free.fits
    ample = make_plan(units, fixed=50, budget=450)
    assert ample.streamed == () and ample.buffers == 0 and ample.peak == 450


def test_tight_budget_spreads_resident_units_and_respects_the_limit():
    units = [UnitSize(f"u{i}", 100, 100) for i in range(10)]
    budget = 50 + BUFFERS * 100 + 500  # room for exactly five resident units
    plan = make_plan(units, fixed=50, budget=budget)
    assert len(plan.resident) == 5 and plan.peak <= budget and plan.fits
    assert plan.resident == ("u1", "u3", "u5", "u7", "u9")  # alternating: each transfer hides behind compute
    assert plan.buffers == BUFFERS * 100 and plan.streamed_bytes == 500


def test_heterogeneous_sizes_never_exceed_the_room():
    sizes = [10, 300, 20, 300, 40, 300, 10, 5]
    units = [UnitSize(f"u{i}", s, s) for i, s in enumerate(sizes)]
    for budget in range(1000, 2000, 37):
        plan = make_plan(units, fixed=0, budget=budget)
        assert plan.resident_bytes + plan.streamed_bytes == sum(sizes)
        assert plan.fits and plan.peak <= budget


@pytest.mark.parametrize("count", [1, 2, 3])
def test_an_exact_fit_keeps_every_block_that_fits(count):
    """Budgets that are exact multiples of the block size: float credit lost the last block (7 blocks with room
    for exactly one kept none)."""
    size = 189_799_856
    units = [UnitSize(f"b{i}", size, size) for i in range(7)]
    budget = BUFFERS * size + count * size
    plan = make_plan(units, fixed=0, budget=budget)
    assert len(plan.resident) == count and plan.peak == budget


def test_zero_budget_streams_everything_and_says_it_does_not_fit(caplog):
    units = [UnitSize(f"u{i}", 100, 100) for i in range(3)]
    with caplog.at_level(logging.WARNING):
        plan = make_plan(units, fixed=10, budget=0)
    assert plan.resident == () and not plan.fits and "running anyway" in caplog.text


def test_activation_reserve_is_declared_by_the_model():
    assert activation_bytes(nn.Linear(2, 2)) == int(DEFAULT_ACTIVATION_GIB * GIB)
    assert activation_bytes(Stack()) == 0
    model = Stack()
    model.vram_activation_gib = -1
    with pytest.raises(ConfigError, match="vram_activation_gib must be a non-negative number"):
        activation_bytes(model)


def test_plan_of_a_model_under_a_limit():
    model = Stack().requires_grad_(False)
    head = 16 * 512 * 4
    limit = (head + BUFFERS * MB + 4 * MB) / GIB  # fixed part, unit buffers, four resident blocks
    handle = enable_vram_management(model, {}, vram_limit=limit, device="cpu", dtype=torch.float32)
    plan = handle.plan
    assert plan.fixed == head and len(plan.resident) == 4 and len(plan.streamed) == 6
    assert plan.peak <= limit * GIB
    x = torch.randn(2, 16)
    with torch.no_grad():
        out = model(x)
        model(x)  # the first call fetches the first streamed block on demand; later ones find it prefetched
    report = handle.report()
    assert report.streamed_units == 6 and report.bytes_per_step == 6 * MB and report.peak_in_flight <= IN_FLIGHT
    assert report.misses == 1 and report.prefetch_hits == 11
    handle.disable()
    torch.testing.assert_close(model(x), out, rtol=0, atol=0)
