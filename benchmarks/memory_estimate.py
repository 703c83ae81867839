"""Peak memory of a training step predicted without a GPU: the step runs on fake tensors (shapes and dtypes, no
data, no compute) and every storage an op creates is counted while it lives.

This is the allocator-free lower bound of what `torch.cuda.max_memory_allocated` reports for the same step: it
leaves out the caching allocator's rounding and fragmentation, cuBLAS/attention workspaces and the CUDA context.
It answers "does this configuration fit the card" in seconds on a CPU machine; the GPU run measures the real
figure.
"""

from __future__ import annotations

import warnings
import weakref

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary


class PeakTracker(TorchDispatchMode):
    """Live bytes of the storages that ops create (plus those `add`ed before), and their peak."""

    def __init__(self):
        super().__init__()
        self.live = WeakIdKeyDictionary()
        self.current = 0
        self.peak = 0

    def add(self, tensor) -> None:
        if not isinstance(tensor, torch.Tensor):
            return
        storage = tensor.untyped_storage()
        if storage in self.live:
            return
        size = storage.nbytes()
        self.live[storage] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, size)

    def _free(self, size: int) -> None:
        self.current -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            self.add(tensor)
        return out


def fake_parameters(model: torch.nn.Module, mode: FakeTensorMode) -> torch.nn.Module:
    """Give every meta-device parameter of `model` (built under accelerate's `init_empty_weights`, LoRA layers
    included) a fake CPU tensor of the same shape, dtype and `requires_grad`. Real buffers (RoPE tables) stay."""
    with mode:
        for module in model.modules():
            for name, p in list(module.named_parameters(recurse=False)):
                fake = torch.empty(p.shape, dtype=p.dtype, device="cpu")
                module._parameters[name] = torch.nn.Parameter(fake, requires_grad=p.requires_grad)
    return model


def estimate_peak_gib(model: torch.nn.Module, mode: FakeTensorMode, step, inputs, steps: int = 2, setup=None) -> float:
    """Peak GiB over `steps` calls of `step()` (two, so the optimizer's state is created and then held), counting
    `model`'s parameters and buffers and `inputs` as live from the start. `setup()` runs first, counted (e.g. the
    VRAM manager storing the weights in fp8 frees the bf16 ones); its own transient peak is not the step's."""
    tracker = PeakTracker()
    for tensor in [*model.parameters(), *model.buffers(), *inputs]:
        tracker.add(tensor)
    with mode, tracker, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")  # fake storages
        if setup is not None:
            setup()
            tracker.peak = tracker.current
        for _ in range(steps):
            step()
    return tracker.peak / 2**30


__all__ = ["PeakTracker", "estimate_peak_gib", "fake_parameters"]
