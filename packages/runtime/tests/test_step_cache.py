"""FirstBlockCache: the skip rule, the reused residuals, per-position states, and when it must not act."""

from __future__ import annotations

import pytest
import torch

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.step_cache import FirstBlockCache, run_blocks


@pytest.fixture(autouse=True)
def inference():
    """Denoising loops run under no_grad (pipelines' __call__); the grad case is tested on its own."""
    with torch.no_grad():
        yield


class Stack:
    """Two streams through a first block and a rest, with recorded calls; the rest mixes both streams."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.w_first = torch.randn(8, 8, generator=g) / 3
        self.w_rest = torch.randn(8, 8, generator=g) / 3
        self.rest_calls = 0

    def first(self, streams):
        img, txt = streams
        return img + torch.tanh(img @ self.w_first), txt * 1.5

    def rest(self, streams):
        self.rest_calls += 1
        img, txt = streams
        return img + torch.sin(img @ self.w_rest) + txt.mean(), txt - img.mean()

    def plain(self, streams):
        return self.rest(self.first(streams))


def inputs(seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 5, 8, generator=g) * scale, torch.randn(2, 3, 8, generator=g)


def relative_change(stack, a, b):
    ra = stack.first(a)[0] - a[0]
    rb = stack.first(b)[0] - b[0]
    return float((rb - ra).abs().mean() / ra.abs().mean())


def test_skip_rule_and_reused_value_follow_the_definition():
    stack = Stack()
    a = inputs(1)
    b = (a[0] * 1.01, a[1] + 0.05)  # a small change: relative first-block change well under 0.1
    c = inputs(2)  # unrelated: far over
    change_b, change_c = relative_change(stack, a, b), relative_change(stack, a, c)
    assert change_b < 0.1 < change_c
    cache = FirstBlockCache(threshold=0.1)
    cache.begin_loop()
    results = []
    for x in (a, b, c):
        cache.begin_step()
        results.append(cache.run(x, stack.first, stack.rest))
    assert (cache.calls, cache.skipped, stack.rest_calls) == (3, 1, 2)
    # step 1 and 3 ran in full; step 2 = its first block's output + what the rest added on step 1
    for got, want in zip(results[0], stack.plain(a), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    head_a, head_b = stack.first(a), stack.first(b)
    full_a = stack.plain(a)
    for got, h_b, h_a, f_a in zip(results[1], head_b, head_a, full_a, strict=True):
        torch.testing.assert_close(got, h_b + (f_a - h_a), rtol=0, atol=1e-6)
    assert (results[1][0] - stack.plain(b)[0]).abs().max() > 1e-4  # it is an approximation, not the full call
    for got, want in zip(results[2], stack.plain(c), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_reference_residual_is_the_last_full_call():
    """Skipped calls do not replace the compared residual (diffusers and ParaAttention keep the full call's)."""
    stack = Stack()
    a = inputs(1)
    drift = [(a[0] * (1 + 0.004 * k), a[1]) for k in range(1, 30)]
    threshold = relative_change(stack, a, drift[3]) * 1.001  # drift[0..3] are within it, later ones are not
    cache = FirstBlockCache(threshold)
    cache.begin_loop()
    for x in [a, *drift[:5]]:
        cache.begin_step()
        cache.run(x, stack.first, stack.rest)
    # a, then drift[0..3] reused against a, then drift[4] is too far from a (not from drift[3]) -> full
    assert (cache.calls, cache.skipped, stack.rest_calls) == (6, 4, 2)


def test_positions_in_a_step_keep_their_own_states():
    stack = Stack()
    pos, neg = inputs(1), inputs(2)
    cache = FirstBlockCache(threshold=1e9)
    cache.begin_loop()
    outs = []
    for _ in range(2):
        cache.begin_step()
        outs.append([cache.run(pos, stack.first, stack.rest), cache.run(neg, stack.first, stack.rest)])
    assert cache.skipped == 2
    for step in outs:
        for got, want in zip(step[0] + step[1], stack.plain(pos) + stack.plain(neg), strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_threshold_zero_outside_a_loop_and_with_grad_run_everything():
    stack = Stack()
    a = inputs(1)
    cache = FirstBlockCache(threshold=1e9)
    for _ in range(3):  # never opened: no loop
        out = cache.run(a, stack.first, stack.rest)
    assert (cache.calls, cache.skipped, stack.rest_calls) == (0, 0, 3)
    cache.begin_loop()
    x = (a[0].clone().requires_grad_(), a[1])
    with torch.enable_grad():
        for _ in range(3):
            cache.begin_step()
            out = cache.run(x, stack.first, stack.rest)
    assert stack.rest_calls == 6 and out[0].requires_grad
    cache = FirstBlockCache(threshold=0.0)
    cache.begin_loop()
    for _ in range(3):
        cache.begin_step()
        cache.run((a[0] + 1e-3 * torch.rand(1).item(), a[1]), stack.first, stack.rest)
    assert cache.skipped == 0
    assert run_blocks(None, a, stack.first, stack.rest)[0].shape == a[0].shape


def test_other_shapes_at_a_position_are_not_reused_and_end_loop_frees():
    stack = Stack()
    cache = FirstBlockCache(threshold=1e9)
    cache.begin_loop()
    small = inputs(1)
    big = (torch.cat([small[0], small[0]], 1), small[1])
    for x in (small, big):
        cache.begin_step()
        out = cache.run(x, stack.first, stack.rest)
    assert cache.skipped == 0 and out[0].shape == big[0].shape
    cache.end_loop()
    assert not cache._states and cache.calls == 2  # counts stay readable after the loop


@pytest.mark.parametrize("threshold", [-0.1, float("nan")])
def test_bad_threshold_is_rejected(threshold):
    with pytest.raises(ConfigError, match="threshold"):
        FirstBlockCache(threshold)
