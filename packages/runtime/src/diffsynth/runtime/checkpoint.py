"""Lazy state dicts over checkpoint files, so a 20B model is identified without reading its weights.

`open_checkpoint` takes one file, several shards, a folder (its `*.index.json` when there is one)
or an index file, and returns a `LazyStateDict`: a read-only `Mapping[str, Tensor]` whose keys,
shapes and dtypes come from headers only. safetensors files are parsed here (the header is JSON)
and tensors are views of a copy-on-write memory map, made only when a key is asked for, so loading
with `assign=True` keeps unchanged weights file-backed (what the VRAM manager's `disk` needs).
`.pth/.pt/.bin/.ckpt` go through `torch.load(weights_only=True, mmap=True)`, which reads the
pickle but not the tensor data.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path

import torch

from .dtypes import dtype_name
from .errors import CheckpointError, ConfigError, DiffSynthError, UnknownModelError, preview

logger = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
GGUF_SUFFIXES = (".gguf",)  # read by `gguf.GGUFFile` (the optional gguf package)
WEIGHT_SUFFIXES = SAFETENSORS_SUFFIXES + TORCH_SUFFIXES + GGUF_SUFFIXES
INDEX_SUFFIX = ".index.json"
NESTED_STATE_KEYS = ("state_dict", "model", "module", "model_state")
_MAX_HEADER = 100_000_000  # the safetensors format's own limit

_ST_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, attr)
    for name, attr in {
        "F64": "float64",
        "F32": "float32",
        "F16": "float16",
        "BF16": "bfloat16",
        "F8_E4M3": "float8_e4m3fn",
        "F8_E5M2": "float8_e5m2",
        "F8_E8M0": "float8_e8m0fnu",
        "I64": "int64",
        "I32": "int32",
        "I16": "int16",
        "I8": "int8",
        "U64": "uint64",
        "U32": "uint32",
        "U16": "uint16",
        "U8": "uint8",
        "BOOL": "bool",
        "C64": "complex64",
    }.items()
    if hasattr(torch, attr)
}


def _corrupt(path: str, detail: str) -> CheckpointError:
    return CheckpointError(
        f"{path} looks truncated or corrupt: {detail}. Re-download it (delete the file and fetch it again)."
    )


class _SafetensorsFile:
    """One safetensors file: its header now, tensors (memory-map views) on demand."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise _corrupt(path, f"the file is {size} bytes, shorter than the 8-byte header length")
            n = int.from_bytes(head, "little")
            if n > _MAX_HEADER or 8 + n > size:
                raise _corrupt(path, f"the header claims {n} bytes but the file holds only {size} bytes")
            raw = f.read(n)
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _corrupt(path, f"the header is not valid JSON ({exc})") from None
        if not isinstance(header, dict):
            raise _corrupt(path, "the header is not a JSON object")
        self.metadata: dict[str, str] = dict(header.pop("__metadata__", None) or {})
        self.data_start = 8 + n
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for key, info in header.items():
            self.entries[key] = self._entry(key, info, size)
        self._map: mmap.mmap | None = None

    def _entry(self, key: str, info, size: int) -> tuple[torch.dtype, tuple[int, ...], int, int]:
        try:
            code, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (TypeError, KeyError, ValueError) as exc:
            raise _corrupt(self.path, f"tensor {key!r} has a malformed header entry ({exc!r})") from None
        if code not in _ST_DTYPES:
            raise CheckpointError(
                f"{self.path}: tensor {key!r} has dtype {code!r}, which this torch cannot hold; "
                f"supported: {', '.join(_ST_DTYPES)}"
            )
        dtype = _ST_DTYPES[code]
        numel = 1
        for d in shape:
            numel *= d
        if min(shape, default=0) < 0 or not 0 <= begin <= end or end - begin != numel * dtype.itemsize:
            raise _corrupt(self.path, f"tensor {key!r} has offsets {[begin, end]} that do not fit shape {list(shape)}")
        if self.data_start + end > size:
            raise _corrupt(
                self.path,
                f"tensor {key!r} ends at byte {self.data_start + end} but the file holds only {size} bytes",
            )
        return dtype, shape, begin, end

    def tensor(self, key: str) -> torch.Tensor:
        dtype, shape, begin, end = self.entries[key]
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        if self._map is None:
            with open(self.path, "rb") as f:  # copy-on-write: writable views, the file is never changed
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        offset = self.data_start + begin
        if offset % dtype.itemsize:  # unaligned data: copy rather than hand kernels a misaligned pointer
            return torch.frombuffer(bytearray(self._map[offset : self.data_start + end]), dtype=dtype).reshape(shape)
        count = (end - begin) // dtype.itemsize
        return torch.frombuffer(self._map, dtype=dtype, count=count, offset=offset).reshape(shape)


class _TorchFile:
    """One pickle checkpoint, loaded with mmap so tensor data stays on disk until used."""

    def __init__(self, path: str):
        self.path = path
        self.metadata: dict[str, str] = {}
        obj = _torch_load(path)
        self.tensors = _unwrap(obj, path)
        self.entries = {k: (v.dtype, tuple(v.shape)) for k, v in self.tensors.items()}

    def tensor(self, key: str) -> torch.Tensor:
        return self.tensors[key]


def _torch_load(path: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc) and "zipfile" not in str(exc):
            raise _load_error(path, exc) from None
        logger.info("%s uses the legacy torch format (no mmap); reading it into memory", path)
    except Exception as exc:
        raise _load_error(path, exc) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise _load_error(path, exc) from None


# what torch's weights-only unpickler says of a real pickle holding objects other than tensors and containers
_OBJECT_REFUSALS = ("Unsupported global", "unrecognized function", "allowlisted", "Unsupported class")


def _load_error(path: str, exc: Exception) -> CheckpointError:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    refused = [line for line in lines if any(word in line for word in _OBJECT_REFUSALS)]
    if refused:
        reason = refused[0].split(" was not an allowed global")[0]
        return CheckpointError(
            f"{path} holds Python objects besides tensors, which are not unpickled for safety "
            f"(torch.load weights_only=True refused: {reason}). Re-save its state dict as .safetensors "
            "with a tool you trust."
        )
    if any("WeightsUnpickler" in line for line in lines) or "Weights only load failed" in lines[0]:
        # not a pickle at all (e.g. "Unsupported operand 110": a byte no pickle starts with), or a broken one
        marker = next((i for i, line in enumerate(lines) if "WeightsUnpickler" in line), None)
        detail = lines[marker].partition("WeightsUnpickler error:")[2].strip() if marker is not None else ""
        if not detail:
            detail = lines[marker + 1] if marker is not None and marker + 1 < len(lines) else lines[0]
        return _corrupt(path, f"it is not a readable torch checkpoint (torch.load could not unpickle it: {detail})")
    return _corrupt(path, f"torch.load failed ({type(exc).__name__}: {lines[0]})")


def _unwrap(obj, path: str) -> dict[str, torch.Tensor]:
    """The flat tensor dict of a pickle: one nested `state_dict`/`model`/`module`/`model_state` is opened."""
    for _ in range(2):
        if not isinstance(obj, Mapping) or any(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        nested = [k for k in NESTED_STATE_KEYS if isinstance(obj.get(k), Mapping)]
        if len(nested) > 1:
            raise CheckpointError(
                f"{path} holds several state dicts ({nested}); save the one you want to load on its own"
            )
        if not nested:
            break
        logger.debug("%s: using the nested %r state dict", path, nested[0])
        obj = obj[nested[0]]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict (a mapping of names to tensors)")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(
            f"{path} holds no tensors; its top-level keys are {preview(map(str, obj.keys()))} "
            f"(nested state dicts are looked for under {list(NESTED_STATE_KEYS)})"
        )
    if len(tensors) < len(obj):
        logger.debug("%s: ignoring %d non-tensor entries", path, len(obj) - len(tensors))
    return tensors


class LazyStateDict(Mapping):
    """A read-only state dict over checkpoint files; tensors are read only when asked for."""

    def __init__(self, files: Sequence[str]):
        self.files: list[str] = list(files)
        self._readers: list = []  # _SafetensorsFile, _TorchFile, gguf.GGUFFile
        self._where: dict[str, int] = {}
        for path in self.files:
            if path.endswith(GGUF_SUFFIXES):
                from .gguf import GGUFFile

                reader = GGUFFile(path)
            else:
                reader = _SafetensorsFile(path) if path.endswith(SAFETENSORS_SUFFIXES) else _TorchFile(path)
            for key in reader.entries:
                if key in self._where:
                    other = self.files[self._where[key]]
                    raise CheckpointError(
                        f"key {key!r} is in both {other} and {path}; pass only one of them "
                        "(two variants of a model in one folder, e.g. fp16 and full precision?)"
                    )
                self._where[key] = len(self._readers)
            self._readers.append(reader)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._readers[self._where[key]].tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key) -> bool:
        return key in self._where

    def __repr__(self) -> str:
        return f"LazyStateDict({len(self)} tensors in {preview(self.files, 3)})"

    def _entry(self, key: str):
        return self._readers[self._where[key]].entries[key]

    def file_of(self, key: str) -> str:
        return self.files[self._where[key]]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: self._entry(k)[1] for k in self._where}

    def dtypes(self) -> dict[str, torch.dtype]:
        return {k: self._entry(k)[0] for k in self._where}

    def meta_state_dict(self) -> dict[str, torch.Tensor]:
        """Meta tensors of the right shape and dtype: enough to recognise, configure and check a model."""
        return {k: torch.empty(shape, dtype=dtype, device="meta") for k, (dtype, shape, *_) in self._entries()}

    def parameter_count(self) -> int:
        return sum(_numel(shape) for _, (_, shape, *_) in self._entries())

    def nbytes(self) -> int:
        return sum(_numel(shape) * dtype.itemsize for _, (dtype, shape, *_) in self._entries())

    @property
    def metadata(self) -> dict[str, str]:
        """safetensors `__metadata__` of all files, merged (empty for pickles)."""
        merged: dict[str, str] = {}
        for reader in self._readers:
            merged.update(reader.metadata)
        return merged

    def _entries(self):
        return ((k, self._entry(k)) for k in self._where)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# ----------------------------------------------------------------------------------- paths
def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata=None) -> None:
    """Write `tensors` to the safetensors file `path` whole or not at all: under `path.tmp`, renamed into place once
    complete (a run killed while writing leaves no torn file for a rerun to trust)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(dict(tensors), str(tmp), metadata=metadata)
    os.chmod(tmp, new_file_mode())  # safetensors writes 0600: others on a shared server could not read the export
    os.replace(tmp, path)


def new_file_mode() -> int:
    """The mode `open(path, "w")` gives a new file here: 0666 less the process umask (0644 under umask 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def open_checkpoint(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> LazyStateDict:
    """A lazy state dict over a file, shards, a folder of weight files, or a `*.index.json`."""
    return LazyStateDict(weight_files(paths))


def single_safetensors_keys(paths: Sequence[str | os.PathLike]) -> set[str] | None:
    """The keys of a model given as one `.safetensors` file; None for anything else (several files, another format,
    an unreadable file). Small add-on models are told apart by their keys with this."""
    if len(paths) != 1 or not str(paths[0]).endswith(".safetensors"):
        return None
    try:
        return set(open_checkpoint(str(paths[0])).keys())
    except Exception:
        return None


def weight_files(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """The weight files `paths` stands for (folders and index files expanded, duplicates removed)."""
    if isinstance(paths, (str, os.PathLike)):
        items = [paths]
    elif isinstance(paths, (list, tuple)) and paths and all(isinstance(p, (str, os.PathLike)) for p in paths):
        items = list(paths)
    else:
        raise ConfigError(
            f"checkpoint paths must be a path or a non-empty list of paths (files, folders, *.index.json), got {paths!r}"
        )
    files: list[str] = []
    seen: set[str] = set()
    for item in items:
        for path in _expand(Path(item)):
            real = os.path.realpath(path)
            if real not in seen:
                seen.add(real)
                files.append(path)
    return files


def _expand(path: Path) -> list[str]:
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; {folder_listing(path.parent)}")
    if path.is_dir():
        return _expand_dir(path)
    if path.name.endswith(INDEX_SUFFIX):
        return _shards_of(path)
    if not path.name.endswith(WEIGHT_SUFFIXES):
        raise CheckpointError(
            f"{path} is not a weight file; accepted: {', '.join(WEIGHT_SUFFIXES)}, a *{INDEX_SUFFIX} or a folder"
        )
    gaps = missing_shards([path])
    if gaps:
        raise CheckpointError(
            f"shard {Path(gaps[0]).name!r} is missing beside {path} (its name says the set has more shards; "
            f"missing: {preview(Path(g).name for g in gaps)}); fetch the missing shards again"
        )
    return [str(path)]


def _expand_dir(folder: Path) -> list[str]:
    indexes = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(INDEX_SUFFIX))
    preferred = [p for p in indexes if p.name.endswith(".safetensors" + INDEX_SUFFIX)] or indexes
    if len(preferred) > 1:
        raise CheckpointError(
            f"{folder} holds several shard indexes ({[p.name for p in preferred]}); pass the index you want"
        )
    if preferred:
        return _shards_of(preferred[0])
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    if not files:
        raise CheckpointError(
            f"{folder} holds no weight files ({', '.join(WEIGHT_SUFFIXES)}); it contains "
            f"{preview(sorted(p.name for p in folder.iterdir()))}"
        )
    safetensors = [p for p in files if p.name.endswith(SAFETENSORS_SUFFIXES)]
    if safetensors and len(safetensors) < len(files):
        ignored = [p.name for p in files if p not in safetensors]
        logger.info("%s: using the .safetensors files, ignoring %s", folder, ignored)
        files = safetensors
    ggufs = [p for p in files if p.name.endswith(GGUF_SUFFIXES)]
    if len(shard_groups(ggufs)) > 1:  # a GGUF repo's quantization variants (Q4_K_S, Q8_0, ...): one is wanted
        raise CheckpointError(
            f"{folder} holds several GGUF files {[p.name for p in ggufs]}; pass the path of the one to load, "
            f"e.g. {ggufs[0]}"
        )
    gaps = missing_shards(files)
    if gaps:
        raise CheckpointError(
            f"shard {Path(gaps[0]).name!r} is missing from {folder} (the file names say the set has more "
            f"shards; missing: {preview(Path(g).name for g in gaps)}); fetch the missing shards again"
        )
    return [str(p) for p in files]


def folder_weights(folder: Path) -> list[str]:
    """The weight files of a model folder as `from_pretrained(folder)` takes them: per model name (the file name
    without its format suffix and shard numbers; transformers' `pytorch_model` is `model`), the shards its index
    lists (the .safetensors index first), else its .safetensors files, else its other files. As `load_model(folder)`
    for one model (no .bin beside the .safetensors of the same model, no consolidated file beside its shard set);
    files of different names are different models, all kept (Wan's DiT shards beside CLIP, T5 and VAE .pth files)."""
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    groups: dict[str, list[str]] = {}
    for name in names:
        if name.endswith(WEIGHT_SUFFIXES):
            groups.setdefault(_model_name(name), []).append(name)
    indexes = [n for n in names if n.endswith(INDEX_SUFFIX)]
    chosen: list[str] = []
    for model, group in groups.items():
        mine = [n for n in indexes if _model_name(n[: -len(INDEX_SUFFIX)]) == model]
        preferred = [n for n in mine if n.endswith(".safetensors" + INDEX_SUFFIX)] or mine
        if preferred:
            chosen += [s for s in _shards_of(folder / preferred[0]) if s not in chosen]
            continue
        safetensors = [n for n in group if n.endswith(SAFETENSORS_SUFFIXES)]
        chosen += [str(folder / n) for n in safetensors or group]
    return chosen


def _model_name(file_name: str) -> str:
    found = _SHARD_NAME.match(file_name)
    stem = found["stem"] if found else file_name
    for suffix in WEIGHT_SUFFIXES:
        stem = stem.removesuffix(suffix)
    return "model" if stem == "pytorch_model" else stem


def read_index(index: Path) -> dict[str, str]:
    """The `weight_map` (key -> shard file name) of a `*.index.json`."""
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
        raise _corrupt(str(index), f"it is not a JSON shard index ({exc})") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise _corrupt(str(index), "it has no 'weight_map' (tensor name -> shard file)")
    return {str(k): str(v) for k, v in weight_map.items()}


def _shards_of(index: Path) -> list[str]:
    weight_map = read_index(index)
    names = sorted(set(weight_map.values()))
    missing = [n for n in names if not (index.parent / n).is_file()]
    if missing:
        raise CheckpointError(
            f"shard {missing[0]!r} listed in {index} is missing from {index.parent} "
            f"({len(names) - len(missing)} of {len(names)} shards present; missing: {preview(missing)}); "
            "the download is incomplete: fetch the missing shards again"
        )
    _check_index_keys(index, weight_map)
    return [str(index.parent / n) for n in names]


def _check_index_keys(index: Path, weight_map: dict[str, str]) -> None:
    """Refuse an index naming keys its .safetensors shards lack (they would be left out silently): shards of another
    version or a partial download beside it. Only headers are read; pickle shards are not opened twice."""
    names = sorted(set(weight_map.values()))
    if not all(n.endswith(SAFETENSORS_SUFFIXES) for n in names):
        return
    held = {n: set(_SafetensorsFile(str(index.parent / n)).entries) for n in names}
    every = set().union(*held.values())
    absent = [(k, n) for k, n in weight_map.items() if k not in every]
    if absent:
        raise CheckpointError(
            f"{index} lists {len(absent)} key(s) that none of its shards holds, e.g. {absent[0][0]!r} expected in "
            f"{absent[0][1]!r} (missing: {preview(f'{k} in {n}' for k, n in absent)}); the shards do not match "
            "the index (a partial or mixed download): fetch the index and its shards again"
        )
    unlisted = sorted(every - weight_map.keys())
    if unlisted:
        logger.warning(
            "%s: the shards hold %d keys its weight_map does not list (%s); they are loaded too",
            index, len(unlisted), preview(unlisted),
        )  # fmt: skip


_SHARD_NAME = re.compile(r"^(?P<stem>.*)-(?P<i>\d+)-of-(?P<n>\d+)(?P<ext>\.[^/]+)$")


def missing_shards(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Shards absent beside `paths`: those listed by an index among them, and gaps in `-0000i-of-0000N` names."""
    missing: list[str] = []
    for path in map(Path, paths):
        if path.name.endswith(INDEX_SUFFIX) and path.is_file():
            missing += [str(path.parent / n) for n in sorted(set(read_index(path).values()))]
            continue
        missing += _numbered_set(path)
    return sorted({p for p in missing if not Path(p).is_file()})


def shards_not_given(files: Sequence[str | os.PathLike]) -> list[str]:
    """The shards of the numbered sets among `files` (`<stem>-0000i-of-0000N<ext>`) that `files` leaves out
    (present beside them or not): a model given as some of its shards only."""
    given = {os.path.realpath(f) for f in files}
    expected = {p for path in map(Path, files) for p in _numbered_set(path)}
    return sorted(p for p in expected if os.path.realpath(p) not in given)


def _numbered_set(path: Path) -> list[str]:
    """Every shard of the set a `-0000i-of-0000N` file name belongs to ([] for other names)."""
    found = _SHARD_NAME.match(path.name)
    if not found:
        return []
    width, total = len(found["i"]), int(found["n"])
    return [
        str(path.parent / f"{found['stem']}-{i:0{width}d}-of-{found['n']}{found['ext']}") for i in range(1, total + 1)
    ]


def shard_groups(paths: Sequence[str | os.PathLike]) -> list[list[str]]:
    """`paths` (weight files of one folder) grouped into models: files named `<stem>-0000i-of-0000N<ext>` with
    the same stem are the shards of one; any other file is a model of its own (two DiTs side by side, such as
    Wan-Dancer's `global_model.safetensors` and `local_model.safetensors`, are not shards of one)."""
    groups: dict[str, list[str]] = {}
    for path in map(str, paths):
        found = _SHARD_NAME.match(Path(path).name)
        key = f"shards:{found['stem']}{found['ext']}" if found else f"file:{path}"
        groups.setdefault(key, []).append(path)
    return list(groups.values())


def folder_listing(folder: Path) -> str:
    """What `folder` (or its nearest existing parent) contains, for "not found" messages."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return f"{folder} does not exist either"
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in probe.iterdir())
    where = f"{probe} (the nearest existing folder)" if probe != folder else str(probe)
    return f"{where} contains {preview(names, 20)}"


# ----------------------------------------------------------------------------------- inspect
def describe_checkpoint(paths, *, specs=None) -> dict:
    """What `diffsynth inspect` prints: files, counts, storage types and the models recognised in them. Counts are
    of the model's parameters (a packed weight counts its unpacked shape), `bytes` and the `dtypes` keys are as
    stored: a GGUF block type ("Q8_0"), a prequantized layer's method ("bitsandbytes_nf4") or a dtype."""
    from .loading import config_json_beside, derive_config, recognise
    from .quant_io import CONFIG_KEY, file_quantization

    state = open_checkpoint(paths)
    label = checkpoint_label(state.files)
    info: dict = {"files": state.files, "tensors": len(state)}
    try:  # a file saved quantized: its packed weights, as `quant_io.load_prequantized` reads them
        packed = file_quantization(state.files)[0]
    except DiffSynthError as exc:  # inspect reports, it does not stop
        packed, info["quantization_error"] = {}, str(exc)
    method_of = {part: p.method for p in packed.values() for part in p.parts}
    histogram: dict[str, dict[str, int]] = {}
    stored = 0
    for key, (dtype, shape, *_) in state._entries():
        kind, size = _storage(state, key)
        stored += size
        slot = histogram.setdefault(method_of.get(key) or kind or dtype_name(dtype), {"tensors": 0, "parameters": 0})
        slot["tensors"] += 1
        slot["parameters"] += 0 if key in method_of else _numel(shape)
    for p in packed.values():
        histogram[p.method]["parameters"] += _numel(p.shape)
    info.update(parameters=sum(s["parameters"] for s in histogram.values()), bytes=stored, dtypes=histogram)
    if packed:
        layers: dict[str, int] = {}
        for p in packed.values():
            layers[p.method] = layers.get(p.method, 0) + 1
        info["quantized_layers"] = layers
    if state.metadata:
        info["metadata"] = {k: v if len(v) <= 120 else v[:120] + "..." for k, v in state.metadata.items()}
    meta = {k: v for k, v in state.meta_state_dict().items() if k not in method_of}
    meta.update({p.key: torch.empty(p.shape, dtype=p.dtype, device="meta") for p in packed.values()})
    try:
        found = recognise(meta, specs=specs, label=label)
    except UnknownModelError as exc:
        info["models"] = []
        lora = _lora_description(state)
        if lora is not None:  # a LoRA (or LyCORIS / DoRA) file: say what it holds instead
            info["lora"] = lora
        else:
            info["unrecognised"] = str(exc)
        return info
    config_json = config_json_beside(state.files) if len(found) == 1 else None
    if config_json is None and len(found) == 1 and packed and CONFIG_KEY in state.metadata:
        config_json = json.loads(state.metadata[CONFIG_KEY])  # recorded by save_quantized_model
    if config_json is not None and packed:
        config_json = {k: v for k, v in config_json.items() if k != "quantization_config"}
    models = []
    for item in found:
        entry = {"spec": item.spec.name, "role": item.spec.role, "layout": item.layout.name, "keys": len(item.keys)}
        try:
            config = derive_config(item, meta, config_json, label)
            entry["config"] = asdict(config) if is_dataclass(config) and not isinstance(config, type) else repr(config)
        except Exception as exc:  # inspect reports, it does not stop
            entry["config_error"] = str(exc)
        models.append(entry)
    info["models"] = models
    return info


def _storage(state: LazyStateDict, key: str) -> tuple[str | None, int]:
    """How `key` is stored, without reading it: a GGUF block type (None for a plain dtype) and its bytes on disk."""
    reader = state._readers[state._where[key]]
    if hasattr(reader, "storage"):  # gguf.GGUFFile
        return reader.storage(key)
    dtype, shape, *_ = reader.entries[key]
    return None, _numel(shape) * dtype.itemsize


def _lora_description(state) -> dict | None:
    """`describe_lora` of a checkpoint that reads as a LoRA, else None. Decided from the key names first: only a
    file whose every key is a LoRA key (LoRA files are small) has its tensors loaded."""
    from .errors import LoRAError
    from .lora import _parse_key, describe_lora, read_lora

    parsed = [_parse_key(key) for key in state]
    if not parsed or None in parsed or all(p[0] is None for p in parsed):
        return None
    try:
        return describe_lora(read_lora({key: state[key] for key in state}, source=checkpoint_label(state.files)))
    except LoRAError:
        return None


def checkpoint_label(files: Sequence[str]) -> str:
    """How messages name a checkpoint: its file, or its first shard and how many more."""
    return files[0] if len(files) == 1 else f"{files[0]} (+{len(files) - 1} more shards)"
