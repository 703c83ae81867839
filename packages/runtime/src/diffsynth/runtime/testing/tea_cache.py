"""DiffSynth-Studio's TeaCache rule re-enacted with hooks on an uncached model, to test `TeaCache` against.

The model runs every block on every call; hooks capture the block stack's input (the image/video
tokens entering the first block) and the indicator, and on the last block's output take the
decision DiffSynth-Studio's `TeaCache.check` takes (per call position, counted by the caller's
calls per step): the first and the last step run in full; otherwise the relative L1 change of the
indicator (mean over mean), mapped through `numpy.poly1d(coefficients)`, is accumulated and a call
is reused while the sum stays below the threshold. A reused call's image tokens are replaced by the
stack's input plus the residual of the last full call; a full call stores that residual. The image
tokens are the last `L` tokens of the last block's output, `L` being the first block's token count
(FLUX.1's single blocks put the text first; Wan's blocks carry the video tokens alone).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn


@dataclass
class _Position:
    previous: torch.Tensor | None = None
    accumulated: float = 0.0
    residual: torch.Tensor | None = None


@dataclass
class TeaCacheReference:
    """Hooks on `first_block` / `last_block`; `indicator_from` is `(module, take)`: a forward hook on
    `module` whose `take(args, output)` gives the indicator of the current call."""

    coefficients: Sequence[float]
    threshold: float
    steps: int
    calls_per_step: int
    first_block: nn.Module
    last_block: nn.Module
    indicator_from: tuple[nn.Module, Callable[[tuple, torch.Tensor], torch.Tensor]]
    reused: list[bool] = field(default_factory=list)  # per call: whether it was reused

    def __post_init__(self):
        self._positions = [_Position() for _ in range(self.calls_per_step)]
        self._input: torch.Tensor | None = None
        self._indicator: torch.Tensor | None = None
        module, take = self.indicator_from
        self._hooks = [
            self.first_block.register_forward_pre_hook(self._enter),
            module.register_forward_hook(lambda m, args, out: setattr(self, "_indicator", take(args, out).detach())),
            self.last_block.register_forward_hook(self._leave),
        ]

    def _enter(self, module, args):
        self._input = args[0].detach().clone()

    def _leave(self, module, args, output):
        step, position = divmod(len(self.reused), self.calls_per_step)
        state = self._positions[position]
        now = self._indicator.float()
        if step == 0 or step == self.steps - 1:
            reuse = False
        else:
            change = ((now - state.previous).abs().mean() / state.previous.abs().mean()).item()
            state.accumulated += float(np.poly1d(self.coefficients)(change))
            reuse = state.accumulated < self.threshold
        if not reuse:
            state.accumulated = 0.0
        state.previous = now
        self.reused.append(reuse)
        tokens = self._input.shape[1]
        if reuse:
            output = output.clone()
            output[:, -tokens:] = self._input + state.residual
            return output
        state.residual = output[:, -tokens:] - self._input
        return None

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
