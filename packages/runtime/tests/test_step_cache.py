"""FirstBlockCache and TeaCache: the skip rules, the reused residuals, per-position states, and when they must not
act."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.step_cache import FirstBlockCache, TeaCache, run_blocks


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


@pytest.mark.parametrize("threshold", [-0.1, float("nan"), "abc", None])
def test_bad_threshold_is_rejected(threshold):
    """Not a number is a ConfigError naming the argument, like NaN (torch's bare ValueError before)."""
    with pytest.raises(ConfigError, match="first-block cache threshold="):
        FirstBlockCache(threshold)
    with pytest.raises(ConfigError, match="TeaCache threshold="):
        TeaCache(threshold, IDENTITY)


def test_tea_cache_call_arguments_are_checked_before_the_call():
    """`tea_cache_model_id` alone did nothing (even a bogus id), and `tea_cache_l1_thresh="abc"` raised float()'s
    ValueError: both are ConfigErrors naming the arguments, before the pipeline runs."""
    import contextlib

    from diffsynth.runtime.pipeline import accepts_tea_cache

    class Toy:
        used = []

        @contextlib.contextmanager
        def tea_cache_for_call(self, threshold, model_id):
            self.used.append((threshold, model_id))
            yield

        @accepts_tea_cache
        def __call__(self, prompt, tea_cache_l1_thresh=None, tea_cache_model_id=""):
            return prompt

    toy = Toy()
    assert toy("a") == "a" and toy("a", tea_cache_model_id="") == "a" and toy.used == []
    assert toy("a", tea_cache_l1_thresh="0.2", tea_cache_model_id="m") == "a" and toy.used == [(0.2, "m")]
    with pytest.raises(ConfigError, match=r"tea_cache_model_id='no-such-model' .* without tea_cache_l1_thresh"):
        toy("a", tea_cache_model_id="no-such-model")
    with pytest.raises(ConfigError, match=r"TeaCache tea_cache_l1_thresh='abc' is not a number"):
        toy("a", tea_cache_l1_thresh="abc")
    with pytest.raises(ConfigError, match=r"tea_cache_l1_thresh=nan must be >= 0"):
        toy("a", tea_cache_l1_thresh=float("nan"))
    assert toy.used == [(0.2, "m")]


# ----------------------------------------------------------------------------------------- TeaCache
IDENTITY = (1.0, 0.0)  # rescaled change = relative change


def tea_loop(cache, inputs_per_step, stack, indicator=lambda x: x[0]):
    """Run one loop of len(inputs_per_step) steps; each step's entries are the calls at its positions."""
    cache.begin_loop(len(inputs_per_step))
    outs = []
    for step in inputs_per_step:
        cache.begin_step()
        outs.append([cache.run(x, stack.first, stack.rest, lambda x=x: indicator(x)) for x in step])
    cache.end_loop()
    return outs


def rel(a, b):
    return float((b[0] - a[0]).abs().mean() / a[0].abs().mean())


def test_tea_cache_accumulates_the_rescaled_change_and_reuses_the_whole_stack():
    """Changes of 0.3 each against a threshold of 0.7 (identity polynomial): step 1 reuses (0.3), step 2 reuses
    (0.6), step 3 runs (0.9, reset), step 4 reuses (0.3), the last step runs whatever the sum. A reused call is
    the input plus the whole stack's residual of the last full call, on every stream."""
    stack = Stack()
    base = inputs(1)
    xs = [base]
    for _ in range(5):  # each step's indicator is 30% (in mean absolute terms) away from the previous one
        prev = xs[-1]
        xs.append((prev[0] * 1.3, prev[1] + 0.1))
    changes = [rel(a, b) for a, b in zip(xs, xs[1:], strict=False)]
    assert all(abs(c - 0.3) < 1e-6 for c in changes)
    cache = TeaCache(0.7, IDENTITY)
    outs = tea_loop(cache, [[x] for x in xs], stack)
    full = [False, True, True, False, True, False]  # reused?
    assert (cache.calls, cache.skipped, stack.rest_calls) == (6, 3, 3)
    last_full = None
    for x, out, reused in zip(xs, outs, full, strict=True):
        if not reused:
            last_full = x, stack.plain(x)
            for got, want in zip(out[0], last_full[1], strict=True):
                torch.testing.assert_close(got, want, rtol=0, atol=0)
        else:
            (x0, y0) = last_full
            for got, xi, x0i, y0i in zip(out[0], x, x0, y0, strict=True):
                torch.testing.assert_close(got, xi + (y0i - x0i), rtol=0, atol=1e-6)


def test_tea_cache_rescales_with_the_polynomial_numpy_evaluates():
    coefficients = (4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00, 2.64230861e-01)
    cache = TeaCache(0.5, coefficients)
    for change in (0.0, 0.01, 0.15, 0.4, 1.3):
        assert cache.rescale(change) == pytest.approx(float(np.polyval(coefficients, change)), rel=1e-12)


def test_tea_cache_first_and_last_steps_run_and_positions_keep_their_states():
    """With an infinite threshold every call in between is reused, per position (positive, negative); the
    first call at each position and the loop's last step run in full; so does a loop of unknown length's
    every step after the first (no last step to protect)."""
    stack = Stack()
    pos, neg = inputs(1), inputs(2)
    cache = TeaCache(float("inf"), IDENTITY)
    tea_loop(cache, [[pos, neg]] * 4, stack)
    assert (cache.calls, cache.skipped, stack.rest_calls) == (8, 4, 4)
    cache.begin_loop()  # length unknown
    for _ in range(3):
        cache.begin_step()
        cache.run(pos, stack.first, stack.rest, lambda: pos[0])
    assert (cache.calls, cache.skipped) == (3, 2)


# Wan2.1's published TeaCache polynomials that are negative for small changes (diffsynth.wan.dit holds them too).
NEGATIVE_NEAR_ZERO = {
    "Wan2.1-T2V-1.3B": (-5.21862437e04, 9.23041404e03, -5.28275948e02, 1.36987616e01, -4.99875664e-02),
    "Wan2.1-T2V-14B": (-3.03318725e05, 4.90537029e04, -2.65530556e03, 5.87365115e01, -3.15583525e-01),
    "Wan2.1-I2V-14B-720P": (8.10705460e03, 2.13393892e03, -3.72934672e02, 1.66203073e01, -4.17769401e-02),
}


@pytest.mark.parametrize("model_id", sorted(NEGATIVE_NEAR_ZERO))
def test_tea_cache_threshold_zero_never_reuses_even_with_negative_polynomials(model_id):
    """These polynomials are negative for small changes, so the accumulated sum drops below 0; threshold 0 must
    still run every call in full and give exactly the uncached outputs."""
    coefficients = NEGATIVE_NEAR_ZERO[model_id]
    assert TeaCache(0.0, coefficients).rescale(0.001) < 0
    stack = Stack()
    base = inputs(1)
    xs = [(base[0] * (1 + 0.001 * i), base[1]) for i in range(6)]  # slowly changing indicator
    cache = TeaCache(0.0, coefficients)
    outs = tea_loop(cache, [[x] for x in xs], stack)
    assert (cache.calls, cache.skipped, stack.rest_calls) == (6, 0, 6)
    for x, out in zip(xs, outs, strict=True):
        for got, want in zip(out[0], stack.plain(x), strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_tea_cache_negative_polynomial_values_still_accumulate_above_threshold_zero():
    """Above 0 the rule is DiffSynth-Studio's (`sum < threshold`, negative terms included): a polynomial negative at
    0 change reuses identical inputs at a tiny threshold; a positive one does not; at 0 neither does."""
    stack = Stack()
    a = inputs(1)
    for threshold, constant, reused in ((1e-6, -0.05, 1), (1e-6, 0.05, 0), (0.0, -0.05, 0)):
        cache = TeaCache(threshold, (1.0, constant))
        tea_loop(cache, [[a], [a], [a]], stack)
        assert cache.skipped == reused


def test_tea_cache_never_acts_outside_a_loop_or_with_grad_and_needs_an_indicator():
    stack = Stack()
    a = inputs(1)
    cache = TeaCache(float("inf"), IDENTITY)
    for _ in range(2):
        cache.run(a, stack.first, stack.rest)  # no loop: no indicator needed, every block runs
    assert (cache.calls, stack.rest_calls) == (0, 2)
    cache.begin_loop(5)
    with torch.enable_grad():
        for _ in range(3):
            cache.begin_step()
            cache.run(a, stack.first, stack.rest, lambda: a[0])
    assert cache.skipped == 0 and stack.rest_calls == 5
    cache.begin_step()
    with pytest.raises(ConfigError, match="modulated input"):
        cache.run(a, stack.first, stack.rest)


def test_tea_cache_other_shapes_run_in_full_and_bad_settings_are_refused():
    stack = Stack()
    small = inputs(1)
    big = (torch.cat([small[0], small[0]], 1), small[1])
    cache = TeaCache(float("inf"), IDENTITY)
    tea_loop(cache, [[small], [big], [big], [big]], stack)
    assert cache.skipped == 1  # step 2 (big) is a first call of its shape; step 3 reuses; step 4 is last
    with pytest.raises(ConfigError, match="threshold"):
        TeaCache(-0.1, IDENTITY)
    with pytest.raises(ConfigError, match="coefficient"):
        TeaCache(0.1, ())


def test_tea_cache_refusal_suggests_the_first_block_cache_only_where_a_model_supports_it():
    """The refusal said "enable_first_block_cache works for every DiT", also for DiTs (e.g. Wan-Dancer's) that
    have no step cache at all: it names the slots that do, or says none does."""
    from diffsynth.runtime.pipeline import BasePipeline

    class Pipe(BasePipeline):
        model_slots = {"dit": "dit", "text_encoder": "text_encoder"}

    class CacheableDiT(torch.nn.Module):
        step_cache = None

    pipe = Pipe(device="cpu", torch_dtype=torch.float32)
    pipe.dit, pipe.text_encoder = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    with pytest.raises(ConfigError, match="supports TeaCache") as refused:
        pipe.enable_tea_cache(0.2)
    assert "none supports enable_first_block_cache either" in str(refused.value)
    assert "every DiT" not in str(refused.value)
    pipe.dit = CacheableDiT()
    with pytest.raises(ConfigError, match=r"enable_first_block_cache works for \['dit'\]"):
        pipe.enable_tea_cache(0.2)
