"""Unit hooks that fetch a unit's weights for its forward, prefetching the next unit meanwhile.

A fetched unit (streamed from host/disk, or resident but stored in another dtype) has placeholders
as parameters. Its forward pre-hook `acquire`s the unit's tensors in the computation dtype on the
computation device and swaps them into the module's `_parameters`; the post-hook swaps the
placeholders back and `release`s them. On CUDA a fetch is one host->device copy of the unit's
packed pinned buffer (plus dequantisation) issued on a side stream; an event makes the compute
stream wait for exactly that copy, and `record_stream` keeps the memory until the compute that
used it is done. Each acquire starts the fetch of the unit predicted next, so unit i+1 moves while
unit i computes; at most `max_in_flight` (2) units have device copies at once, and before a new
allocation the host waits (on an event) until the compute that used the oldest released copy is
done, so a host running ahead of the GPU cannot pile up copies (`plan.BUFFERS`). Disk units are
read by a worker thread into one of two pinned staging buffers, then copied the same way. Without
CUDA every fetch runs synchronously (the same code path, no streams): that is what CPU tests run.

The order is learned: observed transitions replace the declared order, so VAE encode/decode or a
text encoder that stops early are predicted from what they actually do. Inference prefetches the
next call's first unit at the end of a call; a forward that saves for backward keeps its last unit
instead (backward starts there) and backward prefetches in reverse.

Backward through a frozen, streamed model: while a unit computes with grad enabled, a saved-
tensor hook replaces any tensor sharing storage with the fetched weights by a small reference;
backward fetches the unit again (prefetching the unit before it) and rebuilds the same view.
Autograd therefore keeps no weights alive between forward and backward. When an outer hook is
active (non-reentrant gradient checkpointing, `save_on_cpu`) ours is not installed: checkpointing
discards what forward saves and the recomputation fetches the unit again anyway.
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import nn

from .disk import DiskReader, DiskUnit
from .fp8_matmul import SCALE_ATTR
from .parked import ParkedWeightError
from .plan import IN_FLIGHT
from .storage import Packed, dequantize, quantize, view

logger = logging.getLogger(__name__)

Source = Packed | DiskUnit


@dataclass
class Target:
    """One managed parameter: where it sits in the model and what the forward must see."""

    name: str
    owners: list[tuple[nn.Module, str]]
    param: nn.Parameter  # the original object (restored by materialized()/disable())
    placeholder: nn.Parameter
    compute_dtype: torch.dtype  # fp8 only for weights multiplied through _scaled_mm
    fp8_matmul: bool = False

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.placeholder.shape)


@dataclass
class Unit:
    """A block the manager moves as a whole."""

    index: int
    name: str
    module: nn.Module
    targets: list[Target]
    streamed: bool = False  # held off the compute device while the model runs
    fetched: bool = False  # goes through the streamer (streamed, or resident in another dtype)
    source: Source | None = None  # what a fetch reads (set by the manager per state)
    offload: Source | None = None  # the canonical store (host, disk, or the device for models that never park)


@dataclass
class Fetched:
    """A unit's tensors on the compute device (or their fetch still under way)."""

    unit: int
    tensors: list[torch.Tensor] = field(default_factory=list)
    scales: list[tuple[torch.Tensor, bool] | None] = field(default_factory=list)
    bases: list[torch.Tensor] = field(default_factory=list)  # one tensor per distinct storage
    ptrs: dict[int, int] = field(default_factory=dict)  # storage data_ptr -> index in bases
    ready: torch.cuda.Event | None = None
    future: Future | None = None
    nbytes: int = 0
    used: bool = False
    waited: set[int] = field(default_factory=set)  # compute streams already made to wait


@dataclass
class StreamStats:
    """Counters of one streamer (see VramReport for their meaning)."""

    fetches: int = 0
    prefetches: int = 0
    hits: int = 0
    misses: int = 0
    bytes_moved: int = 0
    peak_in_flight: int = 0
    host_wait_s: float = 0.0
    gpu_wait_s: float = 0.0
    pending: list = field(default_factory=list)  # (start, end) CUDA timing events of compute-stream waits

    def resolve(self, block: bool = True) -> None:
        keep = []
        for start, end in self.pending:
            if block:
                end.synchronize()
            elif not end.query():
                keep.append((start, end))
                continue
            self.gpu_wait_s += start.elapsed_time(end) / 1000.0
        self.pending = keep


@dataclass(frozen=True)
class _Ref:
    """What autograd keeps instead of a fetched weight (or a view of one)."""

    unit: int
    base: int
    dtype: torch.dtype
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int


class Streamer:
    """Fetches, prefetches and releases the fetched units of one model (see the module docstring)."""

    def __init__(
        self,
        units: list[Unit],
        device: torch.device | str,
        *,
        max_in_flight: int = IN_FLIGHT,
        granularity: str = "auto",
    ):
        self.units = units
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.max_in_flight = max(1, int(max_in_flight))
        self.granularity = granularity
        self.stats = StreamStats()
        self.live: OrderedDict[int, Fetched] = OrderedDict()
        self.next_of: dict[int, int] = {}
        self.prev_of: dict[int, int] = {}
        self._last: int | None = None
        self._new_call = True
        self._lock = threading.RLock()
        self._reader = DiskReader()
        self._worker_reader = DiskReader()
        self._handles: list = []
        self._contexts: dict[int, object] = {}
        self._copy_stream: torch.cuda.Stream | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._staging: list[list] = []  # [pinned buffer, event of its last copy] x 2
        self._futures: list[Future] = []
        self._released: deque[torch.cuda.Event] = deque()  # compute done with a released unit's memory
        self._staging_next = 0
        self._backward_callback = False

    # ------------------------------------------------------------------ hooks
    def install(self) -> None:
        for unit in self.units:
            if unit.fetched:
                pre = _compiler_disabled(functools.partial(self._pre, unit))
                post = _compiler_disabled(functools.partial(self._post, unit))
                self._handles.append(unit.module.register_forward_pre_hook(pre))
                self._handles.append(unit.module.register_forward_hook(post, always_call=True))

    def uninstall(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def begin_call(self) -> None:
        """A new model call starts: the next transition is learned as a wrap-around, not a predecessor."""
        self._new_call = True

    def _pre(self, unit: Unit, module: nn.Module, args) -> None:
        saving = torch.is_grad_enabled() and not _outer_saved_tensor_hooks()
        fetched = self.acquire(unit.index, backward=_in_backward(), saving=saving)
        self._swap_in(unit, fetched)
        if saving:
            context = torch.autograd.graph.saved_tensors_hooks(self._packer(unit.index, fetched), self._unpack)
            context.__enter__()
            self._contexts[unit.index] = context

    def _post(self, unit: Unit, module: nn.Module, args, output) -> None:
        context = self._contexts.pop(unit.index, None)
        if context is not None:
            context.__exit__(None, None, None)
        self._swap_out(unit)
        if context is not None and self._wraps(unit.index):
            return  # the last unit of a forward that backward will need first: keep it
        self.release(unit.index)

    @staticmethod
    def _swap_in(unit: Unit, fetched: Fetched) -> None:
        for target, tensor, scale in zip(unit.targets, fetched.tensors, fetched.scales, strict=True):
            for owner, attr in target.owners:
                owner._parameters[attr] = tensor
                if scale is not None:
                    owner.__dict__[SCALE_ATTR] = scale

    @staticmethod
    def _swap_out(unit: Unit) -> None:
        for target in unit.targets:
            for owner, attr in target.owners:
                owner._parameters[attr] = target.placeholder
                owner.__dict__.pop(SCALE_ATTR, None)

    # ------------------------------------------------------------------ acquire / release
    def acquire(self, index: int, backward: bool = False, saving: bool = False) -> Fetched:
        """The unit's tensors, ready for the current stream; starts the predicted next fetch (not a
        wrap-around to the next call's first unit when `saving` for a backward, which starts here)."""
        with self._lock:
            fetched = self.live.get(index)
            if fetched is not None and fetched.used:  # repeated use (backward unpacks)
                self.live.move_to_end(index)
                self._wait(fetched)
                if backward:  # e.g. the last forward unit, kept: backward starts with it
                    self._prefetch(index, backward, saving)
                return fetched
            for k in [k for k in self.live if k != index]:  # a new unit runs: the others are done with
                self._retire(self.live.pop(k))  # (or were mispredicted); backward refetches any still needed
            if fetched is None:
                self._make_room()
                fetched = self.live[index] = self._start(index)
                self.stats.misses += 1
            else:
                self.stats.hits += 1
            fetched.used = True
            self._wait(fetched)
            if not backward:
                self._learn(index)
            self._prefetch(index, backward, saving)
            return fetched

    def _prefetch(self, index: int, backward: bool, saving: bool) -> None:
        following = self._predict(index, backward)
        if saving and not backward and self._wraps(index):
            following = None
        if following is not None and following not in self.live and len(self.live) < self.max_in_flight:
            self.live[following] = self._start(following)
            self.stats.prefetches += 1
        self.stats.peak_in_flight = max(self.stats.peak_in_flight, len(self.live))

    def release(self, index: int) -> None:
        with self._lock:
            self._retire(self.live.pop(index, None))

    def _retire(self, fetched: Fetched | None) -> None:
        """Note when the compute stream is done with a unit we drop (its memory is reusable then)."""
        if fetched is not None and self.cuda and fetched.waited:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self._released.append(event)

    def _throttle(self) -> None:
        """Before allocating a fetch: at most BUFFERS unit copies may exist, counting released ones the
        GPU still computes with. The CUDA caching allocator only reuses their memory once that compute
        is done, so without this a host running ahead of the GPU would allocate one copy per unit."""
        while self._released and self._released[0].query():
            self._released.popleft()
        while self._released and len(self.live) + len(self._released) > self.max_in_flight:
            began = time.perf_counter()
            self._released.popleft().synchronize()
            self.stats.host_wait_s += time.perf_counter() - began

    def reset(self) -> None:
        """Drop everything in flight and forget the position (the model is parked or reconfigured)."""
        with self._lock:
            for future in self._futures:
                future.exception()  # wait; errors of dropped prefetches do not matter here
            self._futures.clear()
            self.live.clear()
            self._released.clear()
            self._last = None
            self._new_call = True
            if self._copy_stream is not None:
                self._copy_stream.synchronize()
            self._staging.clear()
            self.stats.resolve(block=True)

    def follow_compute(self) -> None:
        """Order later fetches after what the compute stream has queued so far (stores just built there)."""
        if self.cuda:
            self._stream().wait_stream(torch.cuda.current_stream(self.device))

    def close(self) -> None:
        self.reset()
        self.uninstall()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._reader.close()
        self._worker_reader.close()

    def _make_room(self) -> None:
        while len(self.live) >= self.max_in_flight:
            self._retire(self.live.popitem(last=False)[1])

    def _learn(self, index: int) -> None:
        last, self._last = self._last, index
        if last is None or last == index:
            self._new_call = False
            return
        self.next_of[last] = index
        if not self._new_call:
            self.prev_of[index] = last
        self._new_call = False

    def _wraps(self, index: int) -> bool:
        """Whether the unit predicted after `index` starts over (`index` ends a forward)."""
        following = self._predict(index, backward=False)
        return following is None or following <= index

    def _predict(self, index: int, backward: bool) -> int | None:
        n = len(self.units)
        j = index
        for _ in range(n):
            if backward:
                j = self.prev_of.get(j, j - 1)
                if j < 0:
                    return None
            else:
                j = self.next_of.get(j, (j + 1) % n)
            if j == index:
                return None
            if self.units[j].fetched:
                return j
        return None

    # ------------------------------------------------------------------ fetching
    def _start(self, index: int) -> Fetched:
        unit = self.units[index]
        self.stats.fetches += 1
        if unit.source is None:
            raise ParkedWeightError(
                f"unit {unit.name!r} was called while its model is parked; activate it first "
                "(pipe.load_models_to_device([...]) or handle.activate(); calling the model itself does this)"
            )
        if not self.cuda:
            began = time.perf_counter()
            fetched = self._fetch_sync(unit)
            self.stats.host_wait_s += time.perf_counter() - began
            self.stats.bytes_moved += fetched.nbytes
            return fetched
        self._throttle()
        if isinstance(unit.source, DiskUnit):
            self._futures = [f for f in self._futures if not f.done()]
            future = self._executor().submit(self._fetch_disk_cuda, unit)
            self._futures.append(future)
            return Fetched(index, future=future)
        return self._fetch_cuda(unit, unit.source)

    def _fetch_sync(self, unit: Unit) -> Fetched:
        source = unit.source
        with torch.no_grad(), torch.inference_mode(False):
            if isinstance(source, DiskUnit):
                raw = torch.empty(source.nbytes, dtype=torch.uint8)
                source.read_into(raw, self._reader)
                moved = source.nbytes
            elif unit.streamed:  # a copy stands for the transfer a GPU would make
                raw, moved = source.buffer.clone(), source.nbytes
            else:
                raw, moved = source.buffer, 0
            return self._finish(unit, raw, moved, None)

    def _fetch_cuda(self, unit: Unit, source: Packed) -> Fetched:
        stream = self._stream()
        with torch.no_grad(), torch.inference_mode(False), torch.cuda.device(self.device), torch.cuda.stream(stream):
            if source.device == self.device:
                raw, moved = source.buffer, 0
            else:
                raw = torch.empty(source.nbytes, dtype=torch.uint8, device=self.device)
                raw.copy_(source.buffer, non_blocking=True)
                moved = source.nbytes
            fetched = self._finish(unit, raw, moved, stream)
        self.stats.bytes_moved += moved
        return fetched

    def _fetch_disk_cuda(self, unit: Unit) -> Fetched:
        """Runs in the worker thread: read into a staging buffer, then copy on the side stream."""
        source: DiskUnit = unit.source
        staging, done = self._staging_buffer(source.nbytes)
        done.synchronize()  # the previous copy out of this staging buffer has finished
        source.read_into(staging, self._worker_reader)
        stream = self._stream()
        with torch.no_grad(), torch.inference_mode(False), torch.cuda.device(self.device), torch.cuda.stream(stream):
            raw = torch.empty(source.nbytes, dtype=torch.uint8, device=self.device)
            raw.copy_(staging[: source.nbytes], non_blocking=True)
            done.record(stream)
            return self._finish(unit, raw, source.nbytes, stream)

    def _finish(self, unit: Unit, raw: torch.Tensor, moved: int, stream) -> Fetched:
        """Convert the raw unit bytes into the tensors forward sees; note their storages."""
        source = unit.source
        fetched = Fetched(unit.index, nbytes=moved)
        for target, slot, per_channel in zip(unit.targets, source.slots, source.per_channel, strict=True):
            data, scale = view(raw, slot)
            if target.fp8_matmul:
                if scale is None or data.dtype != target.compute_dtype:
                    value = data if scale is None else dequantize(data, scale, torch.float32)
                    q = quantize(value, target.compute_dtype, self.granularity)
                    data, scale, per_channel = q.data, q.scale, q.per_channel
                fetched.tensors.append(data)
                fetched.scales.append((scale, per_channel))
            else:
                value = dequantize(data, scale, target.compute_dtype) if scale is not None else data
                fetched.tensors.append(value.to(target.compute_dtype))
                fetched.scales.append(None)
        for tensor in fetched.tensors + [s[0] for s in fetched.scales if s is not None]:
            ptr = tensor.untyped_storage().data_ptr()
            if ptr not in fetched.ptrs:
                fetched.ptrs[ptr] = len(fetched.bases)
                fetched.bases.append(tensor)
        if stream is not None:
            fetched.ready = torch.cuda.Event()
            fetched.ready.record(stream)
        return fetched

    def _wait(self, fetched: Fetched) -> None:
        if fetched.future is not None:
            began = time.perf_counter()
            result = fetched.future.result()
            self.stats.host_wait_s += time.perf_counter() - began
            self.stats.bytes_moved += result.nbytes
            fetched.tensors, fetched.scales, fetched.bases = result.tensors, result.scales, result.bases
            fetched.ptrs, fetched.ready, fetched.nbytes, fetched.future = result.ptrs, result.ready, result.nbytes, None
        if fetched.ready is None:
            return
        stream = torch.cuda.current_stream(self.device)
        if stream.cuda_stream in fetched.waited:
            return
        if not fetched.ready.query():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            stream.wait_event(fetched.ready)
            end.record(stream)
            self.stats.pending.append((start, end))
            if len(self.stats.pending) > 512:
                self.stats.resolve(block=False)
        for base in fetched.bases:
            base.record_stream(stream)
        fetched.waited.add(stream.cuda_stream)

    def _stream(self) -> torch.cuda.Stream:
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(self.device)
        return self._copy_stream

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="diffsynth-vram-disk")
        return self._pool

    def _staging_buffer(self, nbytes: int) -> tuple[torch.Tensor, torch.cuda.Event]:
        """One of two pinned host buffers, used in turn (only the worker thread calls this)."""
        if not self._staging:
            self._staging = [[torch.empty(0, dtype=torch.uint8), torch.cuda.Event()] for _ in range(2)]
        entry = self._staging[self._staging_next]
        self._staging_next = 1 - self._staging_next
        if entry[0].numel() < nbytes:
            entry[1].synchronize()
            entry[0] = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        return entry[0], entry[1]

    # ------------------------------------------------------------------ backward
    def _packer(self, index: int, fetched: Fetched):
        ptrs = dict(fetched.ptrs)

        def pack(tensor: torch.Tensor):
            try:
                ptr = tensor.untyped_storage().data_ptr()
            except (RuntimeError, NotImplementedError, TypeError):
                return tensor
            base = ptrs.get(ptr) if ptr else None
            if base is None:
                return tensor
            return _Ref(index, base, tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()), tensor.storage_offset())

        return pack

    def _unpack(self, packed):
        if not isinstance(packed, _Ref):
            return packed
        self._queue_backward_end()
        fetched = self.acquire(packed.unit, backward=True)
        base = fetched.bases[packed.base]
        out = torch.empty(0, dtype=packed.dtype, device=base.device)
        return out.set_(base.untyped_storage(), packed.offset, packed.size, packed.stride)

    def _queue_backward_end(self) -> None:
        if self._backward_callback:
            return
        try:
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_end)
            self._backward_callback = True
        except (AttributeError, RuntimeError):  # not inside a backward pass after all
            pass

    def _backward_end(self) -> None:
        with self._lock:
            self._backward_callback = False
            for fetched in self.live.values():
                self._retire(fetched)
            self.live.clear()


def _in_backward() -> bool:
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


def _outer_saved_tensor_hooks() -> bool:
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is None:
        return False
    return top(False) is not None


def _compiler_disabled(fn):
    """Hooks with side effects must not be traced by torch.compile. Importing dynamo costs seconds, so
    this only wraps when it is already loaded (compile the model, or import torch._dynamo, first)."""
    if "torch._dynamo" not in sys.modules:
        return fn
    return torch.compiler.disable(fn, recursive=False)


__all__ = ["Fetched", "StreamStats", "Streamer", "Target", "Unit"]
