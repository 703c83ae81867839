"""Checks that a pipeline steps with the sampler it was asked for (the samplers themselves are proven in
`runtime/tests/test_unipc.py`)."""

from __future__ import annotations

from collections.abc import Callable
from unittest import mock

import torch

from diffsynth.runtime.schedulers import UniPCScheduler


def check_unipc_sampling(run: Callable[..., torch.Tensor]) -> None:
    """`run(sampler=...)` samples one image with a fixed seed. With "unipc" every step is `UniPCScheduler`'s, taken
    in order, each on the sample the previous step made; "euler" takes none of them; the results differ."""
    steps: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    real = UniPCScheduler.step

    def spy(self, model_output, step_index, sample):
        out = real(self, model_output, step_index, sample)
        steps.append((int(step_index), sample.clone(), out.clone()))
        return out

    with mock.patch.object(UniPCScheduler, "step", spy):
        unipc = run(sampler="unipc")
        count = len(steps)
        euler = run(sampler="euler")
    assert count >= 2 and len(steps) == count, "UniPC took no steps, or Euler sampling went through UniPC"
    assert [i for i, _, _ in steps] == list(range(count))
    for (_, _, made), (_, given, _) in zip(steps, steps[1:], strict=False):
        torch.testing.assert_close(given, made, rtol=0, atol=0)
    assert (unipc.float() - euler.float()).abs().max() > 1e-4, "the sampler changed nothing"
