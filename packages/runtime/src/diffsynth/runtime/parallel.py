"""Sampling on several GPUs: Ulysses sequence parallelism and batch (CFG) parallelism.

Launch with `torchrun --nproc_per_node N script.py`; every rank loads the pipeline and calls it with
the same arguments (the seeded noise is the same everywhere; a call without a seed uses one drawn on
rank 0 and shared while the pipeline is parallel, `shared_seed`) and gets the same result.
`pipe.enable_parallel(sequence=S, batch=B)` (S * B = N) splits the work of each denoiser call:
- batch: the samples of a call (the positive and negative halves of a batched CFG call, several
  prompts) are divided over B ranks and gathered afterwards;
- sequence (DeepSpeed-Ulysses): the image/video tokens are divided over S ranks; each
  self-attention exchanges its shards (all-to-all) so that every rank attends over the whole
  sequence with S-th of the heads, then exchanges back (head counts S does not divide: every rank
  gathers all keys and values instead). Per rank, activations and attention work shrink S-fold;
  the weights are not split (combine with the VRAM manager for that).
Ranks are laid out as `rank = batch_index * S + sequence_index`, so a sequence group is S
consecutive ranks (one node's NVLink island when S divides the GPUs per node).

A model supports this by holding a `parallel` attribute (None when off), wrapping its block stack
in `shard_sequence(...)`, and marking the attention calls whose queries, keys and values are all
token shards with `attention(..., sequence_parallel=True)`; `batch_parallel` divides its batch
around a forward. Inference only: collectives here are not differentiable.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import os
import weakref
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass
class ParallelGroups:
    """This rank's process groups (None when that kind of parallelism is off)."""

    sequence_size: int = 1
    sequence_rank: int = 0
    sequence_group: Any = None
    batch_size: int = 1
    batch_rank: int = 0
    batch_group: Any = None


_MADE: dict[tuple[int, int], ParallelGroups] = {}  # (sequence, batch) -> this rank's groups


def init_parallel(sequence: int | None = None, batch: int = 1) -> ParallelGroups:
    """Join (or start, from torchrun's environment) the default process group and make the groups.

    `sequence` defaults to what `batch` leaves of the world size. Every rank must call this with the
    same arguments (group creation is collective); a layout made before is returned as it is."""
    import torch.distributed as dist

    if not dist.is_available():
        raise ConfigError("enable_parallel needs torch.distributed, which this torch build lacks")
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise ConfigError(
                "enable_parallel runs under torchrun (e.g. `torchrun --nproc_per_node 2 script.py`): RANK and "
                "WORLD_SIZE are not set and no process group was initialised"
            )
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
        # we started it, so we end it: a group left to the interpreter's exit can abort the process
        atexit.register(_destroy_process_group)
    world, rank = dist.get_world_size(), dist.get_rank()
    batch = int(batch)
    if batch < 1 or world % batch:
        raise ConfigError(f"batch={batch} must be >= 1 and divide the world size {world}")
    sequence = world // batch if sequence is None else int(sequence)
    if sequence < 1 or sequence * batch != world:
        raise ConfigError(f"sequence={sequence} x batch={batch} must equal the world size {world} (torchrun ranks)")
    made = _MADE.get((sequence, batch))
    if made is not None:  # a second pipeline (or use_usp's second call) shares the communicators
        return made
    groups = _MADE[(sequence, batch)] = ParallelGroups(sequence_size=sequence, batch_size=batch)
    for b in range(batch):  # every rank creates every group, in the same order
        ranks = list(range(b * sequence, (b + 1) * sequence))
        group = dist.new_group(ranks) if sequence > 1 else None
        if rank in ranks:
            groups.sequence_group, groups.sequence_rank = group, ranks.index(rank)
    for s in range(sequence):
        ranks = list(range(s, world, sequence))
        group = dist.new_group(ranks) if batch > 1 else None
        if rank in ranks:
            groups.batch_group, groups.batch_rank = group, ranks.index(rank)
    return groups


_PARALLEL_MODELS: weakref.WeakSet = weakref.WeakSet()  # every model `enable_parallel` divided (None: undone)


def register_parallel_models(models) -> None:
    """Remember the models `enable_parallel` divides: a seed drawn by code that does not say whose call it serves
    is shared only while one of them is still parallel (`shared_seed(None)`)."""
    _PARALLEL_MODELS.update(models)


def any_model_parallel() -> bool:
    """Whether some model of this process divides its calls now (enabled and not disabled since)."""
    return any(getattr(model, "parallel", None) is not None for model in list(_PARALLEL_MODELS))


def shared_seed(parallel: bool | None = None) -> int | None:
    """A seed for a call made without one: drawn on rank 0 (from torch's default generator, as an unseeded draw
    would be) and broadcast, while the call samples in parallel; None otherwise (draw unseeded). Without it every
    rank would draw its own noise and the divided denoiser calls would mix shards of different latents.

    `parallel` says whether the calling pipeline's models are parallel now (`BasePipeline.generate_noise` passes
    it); None (a caller that does not say) means "while any model of this process is". Only such calls share:
    an unseeded call of a pipeline after `disable_parallel`, or of one never made parallel, may be made by one rank
    alone (a preview on rank 0) and must not wait for the others. Collective when it shares: every rank calls it
    together, as every rank makes the same call of a parallel pipeline."""
    import torch.distributed as dist

    if parallel is None:
        parallel = any_model_parallel()
    if not parallel or not _MADE or not dist.is_available() or not dist.is_initialized():
        return None
    if dist.get_world_size() == 1:
        return None
    seed = [int(torch.randint(0, 2**63 - 1, ())) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(seed, src=0)
    return seed[0]


def saves_outputs() -> bool:
    """Whether this process writes a call's outputs: under torchrun every rank holds the same result and rank 0
    alone writes it (files, previews, logs of what was written); a process run alone always writes."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK") or 0) == 0


def describe_parallel(groups: ParallelGroups) -> str:
    """The parallelism `groups` enable, in the words of `enable_parallel` and of the CLI flags (for refusals)."""
    kinds = []
    if groups.sequence_size > 1:
        n = groups.sequence_size
        kinds.append(f"sequence parallelism over {n} ranks (enable_parallel(sequence={n}), --sequence-parallel {n})")
    if groups.batch_size > 1:
        n = groups.batch_size
        kinds.append(f"batch (CFG) parallelism over {n} ranks (enable_parallel(batch={n}), --cfg-parallel {n})")
    return " and ".join(kinds) or "parallel sampling (enable_parallel)"


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    _MADE.clear()


# ---------------------------------------------------------------------- sequence (Ulysses)
class SequenceShards:
    """The token sequence of one model call, divided over a sequence group.

    The length is padded to a multiple of the group size; padded tokens are masked as keys
    (`key_mask`) and cut off again by `gather`. With a `prefix` (FLUX-style joint attention over
    `[text, image]`), every marked attention call's q/k/v start with that many tokens that are
    whole on every rank (the text): each rank attends with its share of the heads over the text and
    all image tokens, and the text's output heads are gathered again."""

    def __init__(self, groups: ParallelGroups, length: int, prefix: int = 0):
        self.size, self.rank, self.group = groups.sequence_size, groups.sequence_rank, groups.sequence_group
        self.prefix = int(prefix)
        self.length = int(length)
        self.padded = self.length + (-self.length) % self.size
        self.shard_length = self.padded // self.size
        # tokens of this rank's shard that are real (the rest is padding)
        self.valid_tokens = max(0, min(self.shard_length, self.length - self.rank * self.shard_length))

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's part of `x` along `dim` (which holds the full sequence)."""
        if x.shape[dim] != self.length:
            raise ValueError(f"cannot shard a sequence of {x.shape[dim]} tokens as one of {self.length}")
        if self.padded != self.length:
            pad = [0, 0] * (x.dim() - 1 - dim % x.dim()) + [0, self.padded - self.length]
            x = F.pad(x, pad)
        return x.narrow(dim, self.rank * self.shard_length, self.shard_length)

    def key_mask(self, mask: torch.Tensor | None, batch: int, device) -> torch.Tensor | None:
        """The key-padding mask `[B, prefix + padded length]` for the gathered sequence (None when
        nothing is masked); `mask` covers `[B, prefix + length]`."""
        if self.padded == self.length:
            return mask
        if mask is None:
            mask = torch.ones(batch, self.prefix + self.length, dtype=torch.bool, device=device)
        if mask.dim() != 2:
            raise ValueError("sequence parallelism with padding takes key-padding masks [B, S] only")
        return F.pad(mask, (0, self.padded - self.length), value=False)

    def gather(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """The full sequence from every rank's shard along `dim`."""
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim).narrow(dim, 0, self.length)

    def attention(self, q, k, v, mask, scale, attend) -> torch.Tensor:
        """Ulysses: shards of all heads -> all tokens of 1/size of the heads, attend, and back. When the
        head counts do not divide over the group, every rank gathers all keys and values instead and
        attends with its own queries (exact too; more traffic: the whole K/V per attention call)."""
        heads, kv_heads = q.shape[2], k.shape[2]
        if heads % self.size or kv_heads % self.size:
            return self._gathered_kv_attention(q, k, v, mask, scale, attend)
        qkv = (q, k, v)
        n = self.prefix
        if q.shape == k.shape == v.shape:  # one exchange for all three (stacked on the batch dimension)
            q, k, v = self._heads_to_tokens(torch.cat([q[:, n:], k[:, n:], v[:, n:]])).chunk(3)
        else:
            q, k, v = (self._heads_to_tokens(t[:, n:]) for t in (q, k, v))
        if not n:
            return self._tokens_to_heads(attend(q, k, v, mask, scale))
        q, k, v = (torch.cat([self._own_heads(whole[:, :n]), t], 1) for whole, t in zip(qkv, (q, k, v), strict=True))
        out = attend(q, k, v, mask, scale)
        return torch.cat([self._all_heads(out[:, :n]), self._tokens_to_heads(out[:, n:])], 1)

    def _gathered_kv_attention(self, q, k, v, mask, scale, attend) -> torch.Tensor:
        n = self.prefix
        k, v = (torch.cat([t[:, :n], self._all_tokens(t[:, n:])], 1) for t in (k, v))
        return attend(q, k, v, mask, scale)

    def _all_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's shard, padding included (the key mask covers it)."""
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=1)

    def _own_heads(self, x: torch.Tensor) -> torch.Tensor:
        share = x.shape[2] // self.size
        return x[:, :, self.rank * share : (self.rank + 1) * share]

    def _all_heads(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=2)

    def _heads_to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h, d = x.shape
        send = x.reshape(b, s, self.size, h // self.size, d).permute(2, 0, 1, 3, 4).contiguous()
        received = self._all_to_all(send)  # [size, B, s, h/size, D]: every rank's tokens of our heads
        return received.permute(1, 0, 2, 3, 4).reshape(b, self.size * s, h // self.size, d)

    def _tokens_to_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, h, d = x.shape
        send = x.reshape(b, self.size, n // self.size, h, d).permute(1, 0, 2, 3, 4).contiguous()
        received = self._all_to_all(send)  # [size, B, s, h, D]: our tokens of every rank's heads
        return received.permute(1, 2, 0, 3, 4).reshape(b, n // self.size, self.size * h, d)

    def _all_to_all(self, send: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        received = torch.empty_like(send)
        dist.all_to_all_single(received, send, group=self.group)
        return received

    def all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        x = x.clone()
        dist.all_reduce(x, group=self.group)
        return x


_ACTIVE: ContextVar[SequenceShards | None] = ContextVar("diffsynth_sequence_shards", default=None)
_BATCH: ContextVar[ParallelGroups | None] = ContextVar("diffsynth_batch_groups", default=None)


def active_sequence() -> SequenceShards | None:
    """The sequence being divided by the model call now running (None outside one)."""
    return _ACTIVE.get()


@contextlib.contextmanager
def shard_sequence(groups: ParallelGroups | None, length: int, prefix: int = 0) -> Iterator[SequenceShards | None]:
    """Within the block: `attention(..., sequence_parallel=True)` exchanges shards over the group
    (`prefix`: see `SequenceShards`). Yields None (and changes nothing) without sequence parallelism."""
    if groups is None or groups.sequence_size == 1:
        yield None
        return
    if torch.is_grad_enabled():
        raise ConfigError("sequence parallelism is for sampling: run under torch.no_grad()")
    shards = SequenceShards(groups, length, prefix)
    token = _ACTIVE.set(shards)
    try:
        yield shards
    finally:
        _ACTIVE.reset(token)


def sum_over_call(x: torch.Tensor) -> torch.Tensor:
    """`x` summed over every rank sharing the model call now running (itself outside one): a
    decision taken on the sum (the first-block cache's) is then the same on every rank and the
    same as in one process."""
    import torch.distributed as dist

    shards, batch = _ACTIVE.get(), _BATCH.get()
    if shards is not None:
        x = shards.all_reduce_sum(x)
    if batch is not None:
        x = x.clone()
        dist.all_reduce(x, group=batch.batch_group)
    return x


# ---------------------------------------------------------------------- batch (CFG)
def split_batch(groups: ParallelGroups | None, batch: int) -> slice:
    """The samples of a batch of `batch` this rank computes (all of them without batch parallelism).

    A batch the ranks do not divide evenly (an unguided call of one sample, e.g. Wan 2.2's low-noise
    expert at `cfg_scale_2=1`) is computed whole on every rank: the same result, no time saved."""
    if groups is None or groups.batch_size == 1:
        return slice(0, batch)
    if batch % groups.batch_size:
        _note_undivided(batch, groups.batch_size)
        return slice(0, batch)
    part = batch // groups.batch_size
    return slice(groups.batch_rank * part, (groups.batch_rank + 1) * part)


@functools.cache
def _note_undivided(batch: int, ranks: int) -> None:
    logger.info("a batch of %d does not divide over %d ranks: every rank computes all of it", batch, ranks)


def gather_batch(groups: ParallelGroups | None, x: torch.Tensor) -> torch.Tensor:
    """Every rank's part of the batch (dim 0), in rank order."""
    if groups is None or groups.batch_size == 1:
        return x
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(groups.batch_size)]
    dist.all_gather(parts, x.contiguous(), group=groups.batch_group)
    return torch.cat(parts, dim=0)


def batch_parallel(
    groups: ParallelGroups | None, batch: int, forward: Callable, *args, per_sample: tuple = (), **kwargs
):
    """`forward(*args, **kwargs)` on this rank's part of a batch of `batch`, gathered from every rank.

    Tensors whose first dimension is `batch` are divided, also inside lists, tuples and dicts (e.g.
    per-block residuals); the arguments named in `per_sample` (keyword names or positions) are lists
    with one entry per sample and are sliced. Everything else (scalars, size-1 broadcasts, shared
    tables) is passed whole. The output is a tensor or a tuple of tensors batched on dim 0."""
    part = split_batch(groups, batch)
    if part == slice(0, batch):
        return forward(*args, **kwargs)

    def divide(value, key):
        if key in per_sample:
            if len(value) != batch:
                raise ValueError(f"argument {key!r} has {len(value)} entries for a batch of {batch}")
            return value[part]
        if isinstance(value, torch.Tensor):
            return value[part] if value.dim() > 0 and value.shape[0] == batch else value
        if isinstance(value, (list, tuple)):
            return type(value)(divide(v, None) for v in value)
        if isinstance(value, dict):
            return {k: divide(v, None) for k, v in value.items()}
        return value

    args = tuple(divide(a, i) for i, a in enumerate(args))
    kwargs = {k: divide(v, k) for k, v in kwargs.items()}
    token = _BATCH.set(groups)
    try:
        out = forward(*args, **kwargs)
    finally:
        _BATCH.reset(token)
    if isinstance(out, tuple):
        return tuple(gather_batch(groups, o) for o in out)
    return gather_batch(groups, out)
