"""Step caches: skip a denoiser's blocks on steps where its input barely changed.

Adjacent denoising steps often change a DiT's hidden states very little. Two rules decide when the
blocks of a call may be skipped and what they made reused instead:

- `FirstBlockCache` (ParaAttention's, with the rule of diffusers' `FirstBlockCacheConfig`, so a
  threshold means the same thing in both): the first block always runs; its residual (output minus
  input of the first stream, the image/video tokens) is compared with the residual of the last call
  that ran every block. When the relative change `mean|r - r_prev| / mean|r_prev|` is at most
  `threshold`, the remaining blocks are skipped and the difference they made on that full call (per
  stream) is added to the first block's output instead.
- `TeaCache` (DiffSynth-Studio's `tea_cache_l1_thresh`, with its rule): before any block, the model's
  timestep-modulated input (its "indicator") is compared with the previous call's; the relative
  change, mapped through a polynomial fitted per model, is accumulated, and while the sum stays below
  `threshold` every block is skipped and the whole stack's difference from the last full call is
  added to the input. The first call at a position in a loop and the last step always run in full.
  Threshold 0 never skips (some fitted polynomials are negative for small changes, so the sum can
  fall below 0; above 0 the reference's accumulation is kept as it is, negative terms included).

Under sequence or batch parallelism the measured change is summed over every rank's part, so all
ranks take the decision one process would take.

A DiT supports the caches by holding a `step_cache` attribute (None when off) and routing its block
stack through `run_blocks`; it supports TeaCache by also passing its indicator and declaring
`tea_cache_coefficients` (model id -> polynomial). The pipeline's denoising loop
(`BasePipeline.progress`) opens a loop and a step on every cache it enabled; within a step, calls are
told apart by their order (positive, then negative, ...), each with its own state, as diffusers keeps
one per `cache_context` and DiffSynth-Studio one TeaCache per prompt. Outside a denoising loop, and
whenever autograd records (training), every block runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .errors import ConfigError
from .parallel import active_sequence, sum_over_call

Streams = tuple[torch.Tensor, ...]
Indicator = Callable[[], torch.Tensor]


def check_threshold(name: str, threshold: float, usual: str, argument: str = "threshold") -> float:
    """`threshold` as a float >= 0; anything else (NaN, negative, not a number) a ConfigError naming `argument`."""
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} {argument}={threshold!r} is not a number ({usual} are usual)") from None
    if not value >= 0.0:
        raise ConfigError(f"{name} {argument}={value} must be >= 0 ({usual} are usual)")
    return value


def _relative_change(now: torch.Tensor, previous: torch.Tensor) -> float:
    """`sum|now - previous| / sum|previous|` over every rank sharing the call (inf when `previous` is 0)."""
    sums = sum_over_call(torch.stack([(now - previous).abs().float().sum(), previous.abs().float().sum()]))
    return float(sums[0] / sums[1]) if float(sums[1]) > 0 else float("inf")


def _same_layout(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and x.dtype == y.dtype for x, y in zip(a, b, strict=True))


class _StepCache:
    """What both caches share: the loop and step bookkeeping, and the counts."""

    def __init__(self):
        self.calls = 0  # model calls in the current (or last) denoising loop
        self.skipped = 0  # of which reused the cached blocks
        self._states: dict = {}
        self._position: int | None = None  # call index within the step; None outside a loop
        self._step = -1  # index of the current step in the loop
        self._steps: int | None = None  # steps in the loop, when known

    # ------------------------------------------------------------------ loop bookkeeping
    def begin_loop(self, steps: int | None = None) -> None:
        """A new denoising loop (of `steps` steps, when known): forget the previous one's states and counts."""
        self._states.clear()
        self.calls = self.skipped = 0
        self._position, self._step, self._steps = 0, -1, steps

    def begin_step(self) -> None:
        self._position = 0
        self._step += 1

    def end_loop(self) -> None:
        """Free the cached residuals (the counts stay readable)."""
        self._states.clear()
        self._position = None

    def run(
        self,
        streams: Sequence[torch.Tensor],
        first: Callable[[Streams], Streams],
        rest: Callable[[Streams], Streams],
        indicator: Indicator | None = None,
    ) -> Streams:
        """The block stack of one model call: every block outside a loop or with autograd recording, else
        what the cache's rule (`_cached_call`) decides for the call's position in its step."""
        streams = tuple(streams)
        if self._position is None or torch.is_grad_enabled():
            return tuple(rest(tuple(first(streams))))
        key = self._position
        self._position += 1
        self.calls += 1
        return self._cached_call(key, streams, first, rest, indicator)

    def _cached_call(self, key: int, streams: Streams, first, rest, indicator) -> Streams:
        raise NotImplementedError


@dataclass
class _FirstBlockState:
    first_residual: torch.Tensor  # first block's residual of the last full call
    rest_residuals: Streams  # what the remaining blocks added to each stream on that call


class FirstBlockCache(_StepCache):
    """Per-model state of the first-block cache; `threshold` 0 only reuses exactly repeated inputs."""

    usual = "0.05 to 0.2"  # thresholds, for messages

    def __init__(self, threshold: float = 0.05):
        super().__init__()
        self.threshold = check_threshold("first-block cache", threshold, self.usual)

    def _cached_call(self, key: int, streams: Streams, first, rest, indicator) -> Streams:
        head = tuple(first(streams))
        residual = head[0] - streams[0]
        state = self._states.get(key)
        if state is not None and self._reusable(state, head, residual):
            self.skipped += 1
            return tuple(h + r for h, r in zip(head, state.rest_residuals, strict=True))
        out = tuple(rest(head))
        rest_residuals = tuple(o - h for o, h in zip(out, head, strict=True))
        self._states[key] = _FirstBlockState(first_residual=residual, rest_residuals=rest_residuals)
        return out

    def _reusable(self, state: _FirstBlockState, head: Streams, residual: torch.Tensor) -> bool:
        if not _same_layout(head, state.rest_residuals):
            return False  # another batch or size at this position: not comparable
        previous = state.first_residual
        shards = active_sequence()
        if shards is not None:  # the tokens are divided over ranks: decide on all of them, together
            residual, previous = residual[:, : shards.valid_tokens], previous[:, : shards.valid_tokens]
        return _relative_change(residual, previous) <= self.threshold

    def __repr__(self) -> str:
        return f"FirstBlockCache(threshold={self.threshold}, calls={self.calls}, skipped={self.skipped})"


@dataclass
class _TeaState:
    indicator: torch.Tensor  # the indicator of the previous call at this position
    accumulated: float  # rescaled change summed since the last full call
    residuals: Streams  # what the whole block stack added to each stream on the last full call


class TeaCache(_StepCache):
    """Per-model state of TeaCache. `coefficients` (highest power first, as `numpy.poly1d` takes them)
    map the indicator's relative change to an estimate of the output's; a call is skipped while their
    sum since the last full call stays below `threshold` (DiffSynth-Studio's `tea_cache_l1_thresh`).
    `threshold` 0 runs every call in full, even where the polynomial (Wan2.1 T2V-1.3B, T2V-14B,
    I2V-720P) makes the sum negative, so its outputs equal the uncached ones."""

    usual = "0.05 to 0.3"  # thresholds, for messages

    def __init__(self, threshold: float, coefficients: Sequence[float]):
        super().__init__()
        self.threshold = check_threshold("TeaCache", threshold, self.usual)
        self.coefficients = tuple(float(c) for c in coefficients)
        if not self.coefficients:
            raise ConfigError("TeaCache needs at least one rescaling coefficient")

    def rescale(self, change: float) -> float:
        value = 0.0
        for c in self.coefficients:
            value = value * change + c
        return value

    def _cached_call(self, key: int, streams: Streams, first, rest, indicator) -> Streams:
        """`indicator()` gives this call's modulated input (only the rows this rank holds, padding left
        out); it is asked before any block runs."""
        if indicator is None:
            raise ConfigError("TeaCache needs the model's modulated input, which this model does not give")
        now = indicator().detach()
        state = self._states.get(key)
        reuse = False
        if state is not None and _same_layout(streams, state.residuals) and not self._last_step():
            if state.indicator.shape == now.shape:
                state.accumulated += self.rescale(_relative_change(now, state.indicator))
                reuse = self.threshold > 0.0 and state.accumulated < self.threshold
        if reuse:
            state.indicator = now
            self.skipped += 1
            return tuple(s + r for s, r in zip(streams, state.residuals, strict=True))
        out = tuple(rest(tuple(first(streams))))
        residuals = tuple(o - s for o, s in zip(out, streams, strict=True))
        self._states[key] = _TeaState(indicator=now, accumulated=0.0, residuals=residuals)
        return out

    def _last_step(self) -> bool:
        return self._steps is not None and self._step >= self._steps - 1

    def __repr__(self) -> str:
        return f"TeaCache(threshold={self.threshold}, calls={self.calls}, skipped={self.skipped})"


StepCache = FirstBlockCache | TeaCache


def run_blocks(
    cache: StepCache | None,
    streams: Sequence[torch.Tensor],
    first: Callable[[Streams], Streams],
    rest: Callable[[Streams], Streams],
    indicator: Indicator | None = None,
) -> Streams:
    """A DiT's block stack: `first` runs the first block, `rest` every later one (both take and return
    the streams, the first stream being the image/video tokens). With a cache blocks may be skipped;
    `indicator` gives TeaCache the model's modulated input (see `TeaCache.run`)."""
    if cache is None:
        return tuple(rest(tuple(first(tuple(streams)))))
    return cache.run(streams, first, rest, indicator)


def run_block_list(
    cache: StepCache | None,
    blocks: Sequence[torch.nn.Module],
    streams: Sequence[torch.Tensor],
    call: Callable[[torch.nn.Module, Streams], Streams],
    indicator: Indicator | None = None,
) -> Streams:
    """`run_blocks` over one list of blocks, `call(block, streams)` running one of them."""
    if len(blocks) == 0:
        return tuple(streams)

    def rest(state: Streams) -> Streams:
        for block in blocks[1:]:
            state = tuple(call(block, state))
        return state

    return run_blocks(cache, streams, lambda state: tuple(call(blocks[0], state)), rest, indicator)
