"""First-block cache: skip a denoiser's remaining blocks on steps where its first block barely changed.

Adjacent denoising steps often change a DiT's hidden states very little. The first block always
runs; its residual (output minus input of the first stream, the image/video tokens) is compared
with the residual of the last call that ran every block. When the relative change
`mean|r - r_prev| / mean|r_prev|` is at most `threshold`, the remaining blocks are skipped and the
difference they made on that full call (per stream) is added to the first block's output instead.
This is ParaAttention's "first block cache" (TeaCache's idea, measured on the first block rather
than through a fitted polynomial per model), with the same rule as diffusers'
`FirstBlockCacheConfig`, so a threshold means the same thing in both. Under sequence or batch
parallelism the change is summed over every rank's part, so all ranks take the decision one
process would take.

A DiT supports it by holding a `step_cache` attribute (None when off) and routing its block stack
through `run_blocks`. The pipeline's denoising loop (`BasePipeline.progress`) opens a loop and a
step on every cache it enabled; within a step, calls are told apart by their order (positive,
then negative, ...), each with its own state, as diffusers keeps one per `cache_context`. Outside
a denoising loop, and whenever autograd records (training), every block runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .errors import ConfigError
from .parallel import active_sequence, sum_over_call

Streams = tuple[torch.Tensor, ...]


@dataclass
class _CallState:
    first_residual: torch.Tensor  # first block's residual of the last full call
    rest_residuals: Streams  # what the remaining blocks added to each stream on that call


class FirstBlockCache:
    """Per-model state of the first-block cache; `threshold` 0 only reuses exactly repeated inputs."""

    def __init__(self, threshold: float = 0.05):
        threshold = float(threshold)
        if not threshold >= 0.0:
            raise ConfigError(f"first-block cache threshold={threshold} must be >= 0 (0.05 to 0.2 are usual)")
        self.threshold = threshold
        self.calls = 0  # model calls in the current (or last) denoising loop
        self.skipped = 0  # of which ran only the first block
        self._states: dict[int, _CallState] = {}
        self._position: int | None = None  # call index within the step; None outside a loop

    # ------------------------------------------------------------------ loop bookkeeping
    def begin_loop(self) -> None:
        """A new denoising loop: forget the previous one's states and counts."""
        self._states.clear()
        self.calls = self.skipped = 0
        self._position = 0

    def begin_step(self) -> None:
        self._position = 0

    def end_loop(self) -> None:
        """Free the cached residuals (the counts stay readable)."""
        self._states.clear()
        self._position = None

    # ------------------------------------------------------------------ the block stack
    def run(
        self, streams: Sequence[torch.Tensor], first: Callable[[Streams], Streams], rest: Callable[[Streams], Streams]
    ) -> Streams:
        streams = tuple(streams)
        if self._position is None or torch.is_grad_enabled():
            return tuple(rest(tuple(first(streams))))
        key = self._position
        self._position += 1
        self.calls += 1
        head = tuple(first(streams))
        residual = head[0] - streams[0]
        state = self._states.get(key)
        if state is not None and self._reusable(state, head, residual):
            self.skipped += 1
            return tuple(h + r for h, r in zip(head, state.rest_residuals, strict=True))
        out = tuple(rest(head))
        rest_residuals = tuple(o - h for o, h in zip(out, head, strict=True))
        self._states[key] = _CallState(first_residual=residual, rest_residuals=rest_residuals)
        return out

    def _reusable(self, state: _CallState, head: Streams, residual: torch.Tensor) -> bool:
        if len(head) != len(state.rest_residuals) or any(
            h.shape != r.shape or h.dtype != r.dtype for h, r in zip(head, state.rest_residuals, strict=True)
        ):
            return False  # another batch or size at this position: not comparable
        previous = state.first_residual
        shards = active_sequence()
        if shards is not None:  # the tokens are divided over ranks: decide on all of them, together
            residual, previous = residual[:, : shards.valid_tokens], previous[:, : shards.valid_tokens]
        sums = sum_over_call(torch.stack([(residual - previous).abs().float().sum(), previous.abs().float().sum()]))
        return float(sums[0] / sums[1]) <= self.threshold

    def __repr__(self) -> str:
        return f"FirstBlockCache(threshold={self.threshold}, calls={self.calls}, skipped={self.skipped})"


def run_blocks(
    cache: FirstBlockCache | None,
    streams: Sequence[torch.Tensor],
    first: Callable[[Streams], Streams],
    rest: Callable[[Streams], Streams],
) -> Streams:
    """A DiT's block stack: `first` runs the first block, `rest` every later one (both take and return
    the streams, the first stream being the image/video tokens). With a cache the rest may be skipped."""
    if cache is None:
        return tuple(rest(tuple(first(tuple(streams)))))
    return cache.run(streams, first, rest)


def run_block_list(
    cache: FirstBlockCache | None,
    blocks: Sequence[torch.nn.Module],
    streams: Sequence[torch.Tensor],
    call: Callable[[torch.nn.Module, Streams], Streams],
) -> Streams:
    """`run_blocks` over one list of blocks, `call(block, streams)` running one of them."""
    if len(blocks) == 0:
        return tuple(streams)

    def rest(state: Streams) -> Streams:
        for block in blocks[1:]:
            state = tuple(call(block, state))
        return state

    return run_blocks(cache, streams, lambda state: tuple(call(blocks[0], state)), rest)
