"""`disk`: units read straight from the safetensors files, so host RAM holds only a few units.

safetensors stores each tensor as one contiguous byte range after a JSON header, so a unit is
read with one `pread` per tensor into a (pinned) staging buffer and copied to the device from
there. Reading with `pread` rather than through a memory map keeps the pages out of our address
space: the kernel's page cache may keep them, but they are never counted as the process's memory
and are dropped under pressure. Only the header is parsed here (the loader validated the files).

The loader notes on each parameter the file key whose bytes it holds unchanged (`mark_stored`), so a
tensor a format conversion only renamed (or viewed in another shape) is read from its own key. Other
names are matched to file keys through one common prefix (e.g. `model.` for a causal-LM text
encoder), with the shape checked. Tensors a conversion changed (split, concatenated, transposed,
cast) are not in the file as the model uses them: those stay in host memory, as do tensors of
`.pth/.bin/.ckpt` files, with a warning saying how many bytes that is.
So do tensors changed in memory since they were loaded (a fused LoRA): `mark_changed` notes them.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch

from ..errors import CheckpointError, ConfigError
from .storage import Slot, layout, view

logger = logging.getLogger(__name__)

_FLOAT_CODES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class DiskTensor:
    """One tensor's bytes in a safetensors file."""

    path: str
    offset: int  # absolute byte offset in the file
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def read_header(path: str) -> dict[str, DiskTensor]:
    """The floating tensors of a safetensors file, from its header only."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: the safetensors header is not valid JSON ({exc})") from None
    header.pop("__metadata__", None)
    found = {}
    for key, info in header.items():
        dtype = _FLOAT_CODES.get(info.get("dtype"))
        if dtype is not None:
            found[key] = DiskTensor(path, 8 + n + int(info["data_offsets"][0]), dtype, tuple(info["shape"]))
    return found


CHANGED_ATTR = "_diffsynth_changed"


def mark_changed(param: torch.Tensor) -> None:
    """Note that `param` no longer holds what its checkpoint file stores (e.g. a LoRA was fused into it):
    a disk store keeps its current value in host memory instead of reading the file."""
    setattr(param, CHANGED_ATTR, True)


def is_changed(param: torch.Tensor) -> bool:
    """Whether `mark_changed` noted `param`."""
    return bool(getattr(param, CHANGED_ATTR, False))


STORED_ATTR = "_diffsynth_stored_at"


def mark_stored(param: torch.Tensor, where: tuple[str, str] | None) -> None:
    """Note what the loader put in `param`: the bytes of tensor `key` of the safetensors file `path`
    (`where` = (path, key), even when the model's name for it is another), or, with None, a tensor its
    format conversion computed (not in the file as the model uses it, whatever its name)."""
    setattr(param, STORED_ATTR, None if where is None else (os.path.realpath(where[0]), where[1]))


def stored_places(named: Iterable[tuple[str, torch.Tensor]]) -> dict[str, tuple[str, str] | None]:
    """name -> what `mark_stored` noted, for the parameters it noted (others were not loaded from files)."""
    return {name: getattr(p, STORED_ATTR) for name, p in named if hasattr(p, STORED_ATTR)}


class DiskIndex:
    """The tensors of a checkpoint's safetensors files, and where a model's parameters are in them.

    `stored` (`stored_places` of the model) says which file key each parameter was loaded from unchanged,
    and which ones the loader computed; parameters it does not name are matched by a common prefix."""

    def __init__(self, files: Sequence[str], stored: Mapping[str, tuple[str, str] | None] | None = None):
        from ..checkpoint import weight_files

        self.files = weight_files(list(files))
        self.entries: dict[str, DiskTensor] = {}
        self.skipped = [f for f in self.files if not f.endswith(".safetensors")]
        for path in self.files:
            if path not in self.skipped:
                self.entries.update(read_header(path))
        self.stored = dict(stored or {})
        self._real_files = {os.path.realpath(f) for f in self.files}

    def locate(self, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, DiskTensor]:
        """name -> file tensor for the parameters found unchanged: where the loader read them, else (same shape)
        under one common prefix."""
        found = {n: e for n, s in shapes.items() if (e := self._recorded(n, s)) is not None}
        guess = {n: s for n, s in shapes.items() if n not in found and not self._computed(n)}
        prefix = self._prefix(guess) if guess else None
        for name, shape in guess.items():
            entry = self.entries.get(prefix + name) if prefix is not None else None
            if entry is not None and entry.shape == tuple(shape):
                found[name] = entry
        return found

    def _computed(self, name: str) -> bool:
        """Whether the loader computed `name` from these files (or read it from a key not found there)."""
        if name not in self.stored:
            return False
        where = self.stored[name]
        return where is None or where[0] in self._real_files

    def _recorded(self, name: str, shape: tuple[int, ...]) -> DiskTensor | None:
        """The file tensor `name` was loaded from unchanged, read in the model's shape (the bytes are the same)."""
        where = self.stored.get(name)
        entry = self.entries.get(where[1]) if where is not None else None
        if entry is None or os.path.realpath(entry.path) != where[0] or math.prod(entry.shape) != math.prod(shape):
            return None
        return replace(entry, shape=tuple(shape))

    def _prefix(self, shapes: Mapping[str, tuple[int, ...]]) -> str | None:
        names = list(shapes)
        candidates: Counter[str] = Counter()
        for name in names[:: max(1, len(names) // 32)]:
            for key in self.entries:
                if key.endswith(name):
                    prefix = key[: len(key) - len(name)]
                    if not prefix or prefix.endswith("."):
                        candidates[prefix] += 1
        best, hits = None, 0
        for prefix, _ in candidates.most_common(8):
            count = sum(1 for n in names if (e := self.entries.get(prefix + n)) is not None and e.shape == shapes[n])
            if count > hits:
                best, hits = prefix, count
        return best


class DiskReader:
    """Reads file byte ranges into CPU tensors with pread, keeping each file open once."""

    def __init__(self):
        self._fds: dict[str, int] = {}

    def read(self, ref: DiskTensor, out: torch.Tensor) -> None:
        """Fill the contiguous CPU tensor `out` (exactly `ref.nbytes` bytes) from the file."""
        target = out.reshape(-1).view(torch.uint8).numpy()
        if target.nbytes != ref.nbytes:
            raise ValueError(f"read {ref.nbytes} bytes into a buffer of {target.nbytes}")
        fd = self._fds.get(ref.path)
        if fd is None:
            fd = self._fds[ref.path] = os.open(ref.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        view_ = memoryview(target)
        done = 0
        while done < ref.nbytes:
            n = _pread_into(fd, view_[done:], ref.offset + done)
            if n <= 0:
                raise CheckpointError(f"{ref.path} ended early at byte {ref.offset + done} (file changed on disk?)")
            done += n

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _pread_into(fd: int, buffer: memoryview, offset: int) -> int:
    if hasattr(os, "preadv"):
        return os.preadv(fd, [buffer], offset)
    os.lseek(fd, offset, os.SEEK_SET)  # platforms without preadv (Windows)
    with os.fdopen(os.dup(fd), "rb", buffering=0) as f:
        return f.readinto(buffer)


class DiskUnit:
    """A unit whose tensors are read from the files (a few, not in the files, from host memory).

    `slots` lay the tensors out in a flat buffer in their file dtypes, the same layout `Packed`
    uses, so the streaming code moves and converts both the same way.
    """

    def __init__(self, refs: Sequence[DiskTensor | None], fallbacks: Sequence[torch.Tensor | None]):
        self.refs = list(refs)
        self.fallbacks = [None if t is None else t.detach().contiguous() for t in fallbacks]
        shapes = [r.shape if r is not None else tuple(t.shape) for r, t in zip(self.refs, self.fallbacks, strict=True)]
        dtypes = [r.dtype if r is not None else t.dtype for r, t in zip(self.refs, self.fallbacks, strict=True)]
        if any(r is None and t is None for r, t in zip(self.refs, self.fallbacks, strict=True)):
            raise ConfigError("DiskUnit: every tensor needs a file location or a host copy")
        self.slots: list[Slot]
        self.slots, self.nbytes = layout(shapes, dtypes)
        self.per_channel = [False] * len(self.slots)

    @property
    def host_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.fallbacks if t is not None)

    def read_into(self, buffer: torch.Tensor, reader: DiskReader) -> int:
        """Fill the flat uint8 CPU `buffer` (at least `nbytes`); returns the bytes read from disk.

        An fp8 tensor here is stored unscaled (the file's own values), so its scale region gets ones:
        the buffer may be new (`torch.empty`) or a reused staging buffer, never zeroed."""
        from_disk = 0
        for slot, ref, host in zip(self.slots, self.refs, self.fallbacks, strict=True):
            data, scale = view(buffer, slot)
            if scale is not None:
                scale.fill_(1.0)
            if ref is not None:
                reader.read(ref, data)
                from_disk += ref.nbytes
            else:
                data.copy_(host)
        return from_disk

    def values(self, dtypes: Sequence[torch.dtype], reader: DiskReader, device: torch.device | str = "cpu"):
        """Each tensor in `dtypes[i]` on `device`, read one at a time."""
        for ref, host, dtype in zip(self.refs, self.fallbacks, dtypes, strict=True):
            if ref is None:
                yield host.to(device=device, dtype=dtype)
                continue
            tmp = torch.empty(ref.shape, dtype=ref.dtype)
            reader.read(ref, tmp)
            yield tmp.to(device=device, dtype=dtype)

    def update(self, i: int, tensor: torch.Tensor, granularity: str = "auto") -> None:
        """Replace tensor i by a host copy in its own dtype (the file is never written, and a changed value,
        e.g. a fused LoRA, is not rounded to the file's dtype); `granularity` is unused."""
        self.refs[i] = None
        self.fallbacks[i] = tensor.detach().to(device="cpu").contiguous()
        shapes = [s.shape for s in self.slots]
        dtypes = [s.dtype for s in self.slots]
        dtypes[i] = self.fallbacks[i].dtype
        self.slots, self.nbytes = layout(shapes, dtypes)


__all__ = [
    "DiskIndex",
    "DiskReader",
    "DiskTensor",
    "DiskUnit",
    "is_changed",
    "mark_changed",
    "mark_stored",
    "read_header",
    "stored_places",
]
