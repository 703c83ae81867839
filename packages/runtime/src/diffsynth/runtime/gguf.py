"""GGUF checkpoints (city96's FLUX / Wan / Qwen-Image / Z-Image files, QuantStack's, ...): read lazily, dequantized
by torch code here, their quantized Linears kept packed.

A GGUF file keeps the original checkpoint's key names (BFL names for FLUX, the authors' for Wan) and stores each
tensor as F32/F16/BF16 or as ggml blocks (Q8_0, Q4_0/1, Q5_0/1, Q2_K..Q6_K): a scale or two per block of 32 or 256
values along the last (input) dimension. `GGUFFile` is the `checkpoint.LazyStateDict` reader of such a file: the
`gguf` package parses the header (tensor names, ggml shapes, types, offsets) and memory-maps the data; entries carry
the torch shape (ggml lists dimensions innermost first: reversed here) and `tensor()` dequantizes one tensor when
asked, to float32. So a `.gguf` opens like any checkpoint, and recognition and key conversion work as for safetensors.

Two ways to load a model from one:
- packed (the pipeline's default, `load_gguf`): each quantized 2-D weight of an `nn.Linear` becomes a `GGUFLinear`
  holding the file's blocks (uint8, file-backed on the CPU) and dequantizing them to the input's dtype in each
  forward: a Q4_K 12B DiT costs ~7 GB instead of 24. Every other tensor (norms, biases, embeddings, convolutions,
  weights a layout reshapes) is dequantized at load, in the pipeline dtype. The model reports a `GGUFQuantization`
  through `quant.quantize_config`, so it is moved as a whole rather than block-streamed, and VRAM settings it cannot
  take are refused, as for other quantized models.
- dequantized (`mode="dequantize"`, or `DIFFSYNTH_GGUF_MODE=dequantize`, or the plain `loading.load_model(path)`):
  every tensor dequantized at load; plain Linears, full size, full speed, fuseable LoRAs.

The block formats are ggml's (`ggml-quants.c`); the dequantization below is written from their layouts, checked in
the tests against `gguf.quants.dequantize` (the numpy reference).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .errors import CheckpointError, ConfigError, DiffSynthError, preview
from .quant import _replace

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'gguf>=0.10' (or the extra: pip install 'diffsynth-runtime[quant]')"
MODE_ENV = "DIFFSYNTH_GGUF_MODE"
MODES = ("packed", "dequantize")
ORIG_SHAPE = "comfy.gguf.orig_shape."  # ComfyUI-GGUF's record of a >4-D tensor's true shape (Wan's Conv3d)

# plain types: ggml name -> torch dtype (the data is read as is)
PLAIN = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
}


# ----------------------------------------------------------------------------------- block formats
def _f16(b: torch.Tensor) -> torch.Tensor:
    """Little-endian fp16 from [n, 2] bytes, as float32 [n, 1]."""
    return b.contiguous().view(torch.float16).float()


def _bits(b: torch.Tensor, count: int, width: int = 1) -> torch.Tensor:
    """Fields of `width` bits of each byte of [..., k] bytes, lowest first: [..., count, k]."""
    shifts = torch.arange(0, count * width, width, device=b.device, dtype=torch.uint8).view(count, 1)
    return (b.unsqueeze(-2) >> shifts) & ((1 << width) - 1)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """The 32 4-bit values of 16 bytes: low nibbles first (elements 0..15), then high nibbles (16..31)."""
    return torch.cat([qs & 0xF, qs >> 4], dim=-1)


def _q8_0(b):  # d, 32 x int8
    return _f16(b[:, :2]) * b[:, 2:].view(torch.int8).float()


def _q4_0(b):  # d, 16 bytes of nibbles; x = d * (q - 8)
    return _f16(b[:, :2]) * (_nibbles(b[:, 2:]).float() - 8)


def _q4_1(b):  # d, m, nibbles; x = d * q + m
    return _f16(b[:, :2]) * _nibbles(b[:, 4:]).float() + _f16(b[:, 2:4])


def _q5_high(qh: torch.Tensor) -> torch.Tensor:
    """The fifth bits of Q5_0/Q5_1: bit j of the little-endian uint32 `qh` belongs to element j."""
    return _bits(qh, 8).transpose(-1, -2).reshape(qh.shape[0], 32)


def _q5_0(b):  # d, qh (4 bytes), nibbles; x = d * (q - 16)
    q = _nibbles(b[:, 6:]) | (_q5_high(b[:, 2:6]) << 4)
    return _f16(b[:, :2]) * (q.float() - 16)


def _q5_1(b):  # d, m, qh, nibbles; x = d * q + m
    q = _nibbles(b[:, 8:]) | (_q5_high(b[:, 4:8]) << 4)
    return _f16(b[:, :2]) * q.float() + _f16(b[:, 2:4])


def _k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: eight 6-bit scales and eight 6-bit mins packed in 12 bytes."""
    low_d, low_m, high = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    scales = torch.cat([low_d & 63, (high & 0xF) | ((low_d >> 6) << 4)], dim=-1)
    mins = torch.cat([low_m & 63, (high >> 4) | ((low_m >> 6) << 4)], dim=-1)
    return scales.float(), mins.float()


def _q4_k(b):  # d, dmin, scales[12], qs[128]: 8 sub-blocks of 32, x = d * sc * q - dmin * m
    n = b.shape[0]
    scales, mins = _k_scales(b[:, 4:16])
    qs = b[:, 16:].reshape(n, 4, 32)
    q = torch.stack([qs & 0xF, qs >> 4], dim=2).reshape(n, 8, 32)
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    return ((d * scales).unsqueeze(-1) * q.float() - (dmin * mins).unsqueeze(-1)).reshape(n, 256)


def _q5_k(b):  # d, dmin, scales[12], qh[32], qs[128]; sub-block s takes bit s of qh[l] as element l's fifth bit
    n = b.shape[0]
    scales, mins = _k_scales(b[:, 4:16])
    qs = b[:, 48:].reshape(n, 4, 32)
    q = torch.stack([qs & 0xF, qs >> 4], dim=2).reshape(n, 8, 32) | (_bits(b[:, 16:48], 8) << 4)
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    return ((d * scales).unsqueeze(-1) * q.float() - (dmin * mins).unsqueeze(-1)).reshape(n, 256)


def _q6_k(b):  # ql[128], qh[64], int8 scales[16], d; two halves of 128, one scale per 16 values
    n = b.shape[0]
    ql = b[:, :128].reshape(n, 2, 64)
    low = torch.cat([ql & 0xF, ql >> 4], dim=-1)  # [n, 2, 128]: ql[0:32], ql[32:64] low, then high nibbles
    high = _bits(b[:, 128:192].reshape(n, 2, 32), 4, 2).reshape(n, 2, 128)  # 2 bits per 32-value segment
    q = ((low | (high << 4)).float() - 32).reshape(n, 16, 16)
    scales = b[:, 192:208].view(torch.int8).float()
    return (_f16(b[:, 208:210]) * scales).unsqueeze(-1).mul(q).reshape(n, 256)


def _low2(qs: torch.Tensor) -> torch.Tensor:
    """Q2_K/Q3_K: 2-bit values of 64 bytes, value e = 128h + 32j + l at bits 2j of byte 32h + l: [n, 256]."""
    n = qs.shape[0]
    return _bits(qs.reshape(n, 2, 32), 4, 2).reshape(n, 256)


def _q3_k(b):  # hmask[32], qs[64], scales[12] (16 x 6 bits, minus 32), d; x = d * sc * (q - 4 * (1 - hbit))
    n = b.shape[0]
    s = b[:, 96:108]
    low = torch.cat([s[:, 0:8] & 0xF, s[:, 0:8] >> 4], dim=-1)
    high = _bits(s[:, 8:12], 4, 2).reshape(n, 16)
    scales = (low | (high << 4)).float() - 32
    hbit = _bits(b[:, 0:32], 8).reshape(n, 256)  # value 128h + 32j + l: bit 4h + j of hmask[l]
    q = (_low2(b[:, 32:96]).float() - 4 * (1 - hbit.float())).reshape(n, 16, 16)
    return (_f16(b[:, 108:110]) * scales).unsqueeze(-1).mul(q).reshape(n, 256)


def _q2_k(b):  # scales[16] (low nibble scale, high nibble min), qs[64], d, dmin; x = d * sc * q - dmin * m
    n = b.shape[0]
    s = b[:, :16]
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    q = _low2(b[:, 16:80]).float().reshape(n, 16, 16)
    return ((d * (s & 0xF).float()).unsqueeze(-1) * q - (dmin * (s >> 4).float()).unsqueeze(-1)).reshape(n, 256)


@dataclass(frozen=True)
class BlockFormat:
    values: int  # per block, along the last dimension
    nbytes: int
    dequantize: Callable[[torch.Tensor], torch.Tensor]  # uint8 [n, nbytes] -> float32 [n, values]


FORMATS: dict[str, BlockFormat] = {
    "Q8_0": BlockFormat(32, 34, _q8_0),
    "Q4_0": BlockFormat(32, 18, _q4_0),
    "Q4_1": BlockFormat(32, 20, _q4_1),
    "Q5_0": BlockFormat(32, 22, _q5_0),
    "Q5_1": BlockFormat(32, 24, _q5_1),
    "Q2_K": BlockFormat(256, 84, _q2_k),
    "Q3_K": BlockFormat(256, 110, _q3_k),
    "Q4_K": BlockFormat(256, 144, _q4_k),
    "Q5_K": BlockFormat(256, 176, _q5_k),
    "Q6_K": BlockFormat(256, 210, _q6_k),
}


def packed_row_bytes(qtype: str, columns: int) -> int:
    """Bytes of one packed row of `columns` values."""
    fmt = FORMATS[qtype]
    if columns % fmt.values:
        raise ValueError(f"{qtype} packs rows in blocks of {fmt.values} values; a row of {columns} is not whole blocks")
    return columns // fmt.values * fmt.nbytes


def dequantize(
    packed: torch.Tensor, qtype: str, shape: Sequence[int], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The `shape` tensor stored as `qtype` blocks in the uint8 `packed` (any shape holding them in order), in
    `dtype`, on `packed`'s device. The arithmetic is float32, as ggml's; the cast comes last."""
    if qtype in PLAIN:
        return packed.contiguous().view(PLAIN[qtype]).reshape(tuple(shape)).to(dtype)
    if qtype not in FORMATS:
        raise ConfigError(f"GGUF type {qtype} is not supported; supported: {sorted(FORMATS)} and {sorted(PLAIN)}")
    fmt = FORMATS[qtype]
    blocks = packed.reshape(-1, fmt.nbytes)
    return fmt.dequantize(blocks).to(dtype).reshape(tuple(shape))


# ----------------------------------------------------------------------------------- the quantized Linear
class GGUFLinear(nn.Linear):
    """An `nn.Linear` whose weight is the file's ggml blocks (uint8 [out, packed bytes per row], as bitsandbytes'
    weight is packed), dequantized to the input's dtype in each forward. `qtype` names the format; `in_features`
    / `out_features` are the true ones (what LoRA code checks against)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, qtype: str, device=None):
        nn.Module.__init__(self)  # not nn.Linear's: no float weight is made
        self.in_features, self.out_features, self.qtype = in_features, out_features, qtype
        row = packed_row_bytes(qtype, in_features)
        self.weight = nn.Parameter(torch.empty(out_features, row, dtype=torch.uint8, device=device), False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The [out, in] weight in `dtype` (what `quant.linear_weight` should return for this layer)."""
        return dequantize(self.weight, self.qtype, (self.out_features, self.in_features), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, qtype={self.qtype}"


def dequantized_linear(layer: GGUFLinear, dtype: torch.dtype | None = None) -> nn.Linear:
    """A plain Linear holding `layer`'s dequantized weight (in `dtype`, default its bias' or float32)."""
    dtype = dtype or (layer.bias.dtype if layer.bias is not None else torch.float32)
    plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    plain.weight = nn.Parameter(layer.dequantized_weight(dtype), requires_grad=False)
    if layer.bias is not None:
        plain.bias = nn.Parameter(layer.bias.detach().to(dtype), requires_grad=False)
    return plain


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Every `GGUFLinear` of `model` replaced by a plain Linear with its dequantized weight, one layer at a time
    (the packed model's memory plus one layer at the peak); `model` no longer reports a quantization."""
    names = [name for name, module in model.named_modules() if isinstance(module, GGUFLinear)]
    for name in names:
        parent, _, child = name.rpartition(".")
        holder = model.get_submodule(parent) if parent else model
        setattr(holder, child, dequantized_linear(getattr(holder, child), dtype))
    if isinstance(getattr(model, "_diffsynth_quantize", None), GGUFQuantization):
        del model._diffsynth_quantize
    return model


@dataclass(frozen=True)
class GGUFQuantization:
    """What `quant.quantize_config` reports for a model loaded packed from a GGUF file (the fields the runtime
    reads from a `QuantizeConfig`): its Linears are quantized already and cannot be re-quantized, streamed or
    stored in fp8."""

    types: tuple[str, ...]
    method: str = "gguf"
    mode: str = "dynamic"
    load_prequantized: bool = True
    target_modules: None = None
    exclude_modules: None = None

    @property
    def configs(self) -> list[GGUFQuantization]:
        return [self]

    def to_dict(self) -> dict:
        return {"method": self.method, "types": list(self.types), "mode": self.mode}


# ----------------------------------------------------------------------------------- reading
def _gguf():
    try:
        import gguf
    except ImportError:
        raise ConfigError(f"reading .gguf checkpoints needs the gguf package: {INSTALL_HINT}") from None
    return gguf


class GGUFFile:
    """One .gguf file as a `LazyStateDict` reader: `entries` (key -> (dtype, torch shape)) from the header,
    `tensor(key)` dequantized on demand (float32 for block types), `packed(key)` the raw blocks."""

    def __init__(self, path: str):
        gguf = _gguf()
        self.path = path
        try:
            reader = gguf.GGUFReader(path, mode="c")  # copy-on-write map: writable views, the file never changes
        except (ValueError, OSError, IndexError, KeyError, UnicodeDecodeError) as exc:
            raise CheckpointError(
                f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc}); a ggml type this gguf package "
                f"does not know, or a truncated download (delete it and fetch it again), or: {INSTALL_HINT}"
            ) from None
        self.metadata: dict[str, str] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        for name, field in reader.fields.items():
            if name.startswith("GGUF."):
                continue
            try:
                value = field.contents()
            except Exception:  # noqa: BLE001 - a field we cannot render is left out of the metadata
                continue
            if name.startswith(ORIG_SHAPE):
                shapes[name[len(ORIG_SHAPE) :]] = tuple(int(d) for d in value)
            elif isinstance(value, (str, int, float, bool)):
                self.metadata[name] = str(value)
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        self._tensors: dict[str, tuple[str, tuple[int, ...], object]] = {}
        for t in reader.tensors:
            qtype = t.tensor_type.name
            if qtype not in PLAIN and qtype not in FORMATS:
                raise CheckpointError(
                    f"{path}: tensor {t.name!r} is stored as {qtype}, which is not supported; supported types: "
                    f"{', '.join([*FORMATS, *PLAIN])}. Use a file quantized with one of those (e.g. Q4_K_S, Q8_0)"
                )
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            if t.name in shapes:
                true = shapes[t.name]
                if _numel(true) != _numel(shape):
                    raise CheckpointError(
                        f"{path}: tensor {t.name!r} has {_numel(shape)} values {list(shape)}, but its recorded "
                        f"original shape {list(true)} needs {_numel(true)}; the file is corrupt"
                    )
                shape = true
            self._tensors[t.name] = (qtype, shape, t.data)
            self.entries[t.name] = (PLAIN.get(qtype, torch.float32), shape)

    def qtype(self, key: str) -> str:
        return self._tensors[key][0]

    def is_quantized(self, key: str) -> bool:
        return self._tensors[key][0] in FORMATS

    def storage(self, key: str) -> tuple[str | None, int]:
        """How `key` is stored, without reading it: its block type ("Q8_0"; None for a plain dtype, which `entries`
        gives) and its bytes in the file."""
        qtype, shape, data = self._tensors[key]
        if qtype in FORMATS:
            return qtype, int(data.nbytes)
        return None, _numel(shape) * PLAIN[qtype].itemsize

    def packed(self, key: str) -> torch.Tensor:
        """The raw uint8 data of `key` (a view of the file map), one row per leading index."""
        qtype, shape, data = self._tensors[key]
        raw = torch.from_numpy(data)
        if qtype in PLAIN:
            raw = raw.reshape(-1).view(torch.uint8)
        return raw.reshape(-1, raw.shape[-1]) if raw.dim() > 1 else raw

    def tensor(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        qtype, shape, data = self._tensors[key]
        if qtype in PLAIN:
            value = torch.from_numpy(data)
            if qtype == "BF16":  # numpy has no bfloat16: the reader gives its bytes
                value = value.reshape(-1).view(torch.bfloat16)
            value = value.reshape(shape)
            return value if dtype is None else value.to(dtype)
        try:
            return dequantize(torch.from_numpy(data), qtype, shape, dtype or torch.float32)
        except RuntimeError as exc:
            raise CheckpointError(
                f"{self.path}: tensor {key!r} ({qtype}, {list(shape)}) cannot be read: {exc}"
            ) from None


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def is_gguf(paths) -> bool:
    """Whether the weight files `paths` stands for are GGUF files. A folder stands for its weight files: one
    .gguf there (a hub download beside its README and config.json) is that file; several (a repo's quantization
    variants) are refused by `checkpoint.weight_files`, naming them, as the loader that follows reports."""
    from .checkpoint import weight_files

    try:
        return any(str(f).endswith(".gguf") for f in weight_files(paths))
    except DiffSynthError:  # missing files: the loader that follows says so
        return False


# ----------------------------------------------------------------------------------- loading
def load_gguf(paths, quantize=None, *, torch_dtype=None, roles=None, mode: str | None = None):
    """The models of GGUF `paths` as (`GGUFQuantization` or None, [`loading.LoadedModel`]): packed (quantized
    Linears as `GGUFLinear`, the rest in `torch_dtype`) or, with `mode="dequantize"` (default from the
    DIFFSYNTH_GGUF_MODE environment variable, else "packed"), every tensor dequantized at load (None: plain
    models, which a `quantize=` config may then quantize as any file)."""
    from .checkpoint import checkpoint_label, open_checkpoint
    from .dtypes import parse_dtype
    from .loading import _convert, _materialize_buffers, config_json_beside, load_models, load_on_meta, recognise

    mode = mode or os.environ.get(MODE_ENV) or "packed"
    if mode not in MODES:
        raise ConfigError(f"GGUF mode {mode!r} (argument or {MODE_ENV}) must be one of {MODES}")
    state = open_checkpoint(paths)
    files = list(state.files)
    label = checkpoint_label(files)
    if mode == "dequantize":
        return None, load_models(state, torch_dtype, "cpu", roles=roles)
    if quantize is not None:
        raise ConfigError(
            f"{label} is a GGUF file, quantized already ({_types(state)}); drop quantize={quantize.method!r}, or load "
            f"it dequantized ({MODE_ENV}=dequantize) to quantize it another way"
        )
    dtype = None if torch_dtype is None else parse_dtype(torch_dtype)
    meta = state.meta_state_dict()
    found = recognise(meta, label=label)
    if roles is not None:
        found = [rec for rec in found if rec.spec.role in set(roles)]
    config_json = config_json_beside(files)
    built = load_on_meta(meta, found, dtype, config_json, label)
    types: set[str] = set()
    for rec, item in zip(found, built, strict=True):
        module = item.module
        source = {k: meta[k] for k in rec.keys}
        by_identity = {id(v): k for k, v in source.items()}
        layers: dict[str, str] = {}  # module name -> file key of its packed weight
        for ours_key, value in _convert(rec, source, label).items():
            file_key = by_identity.get(id(value))  # renamed only: a reshaped or split tensor is dequantized
            if (
                file_key is None
                or not ours_key.endswith(".weight")
                or not _reader(state, file_key).is_quantized(file_key)
            ):
                continue
            name = ours_key[: -len(".weight")]
            layer = module.get_submodule(name) if name else None
            if type(layer) is nn.Linear and tuple(value.shape) == (layer.out_features, layer.in_features):
                layers[name] = file_key
        packed_keys = set(layers.values())
        rest = {k: meta[k] if k in packed_keys else _read(state, k, dtype) for k in rec.keys}
        real = {k: v for k, v in _convert(rec, rest, label).items() if k[: -len(".weight")] not in layers}
        for name, file_key in layers.items():
            shell = module.get_submodule(name)
            reader = _reader(state, file_key)
            layer = GGUFLinear(shell.in_features, shell.out_features, shell.bias is not None, reader.qtype(file_key),
                               device="meta")  # fmt: skip
            layer.weight = nn.Parameter(reader.packed(file_key), requires_grad=False)
            _replace(module, name, layer)
            types.add(reader.qtype(file_key))
        missing, unexpected = module.load_state_dict(real, strict=False, assign=True)
        missing = [k for k in missing if k[: -len(".weight")] not in layers]
        if missing or unexpected:  # pragma: no cover - the meta load above checked the keys
            raise CheckpointError(f"{label}: missing keys {preview(missing)}; unexpected {preview(unexpected)}")
        _materialize_buffers(module, rec, label)
        on_meta = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.device.type == "meta"]
        if on_meta:
            raise CheckpointError(f"{label}: the {rec.spec.name!r} model lacks tensors {preview(on_meta)}")
        module.requires_grad_(False)
        logger.info("loaded %s from %s: %d Linears packed (%s)", rec.spec.name, label, len(layers), sorted(types))
    config = GGUFQuantization(tuple(sorted(types))) if types else None
    for item in built:
        if config is not None and any(isinstance(m, GGUFLinear) for m in item.module.modules()):
            item.module._diffsynth_quantize = config  # noqa: SLF001 - read by `quant.quantize_config`
    return config, built


def _reader(state, key: str) -> GGUFFile:
    reader = state._readers[state._where[key]]  # noqa: SLF001 - the reader behind one key of a LazyStateDict
    if not isinstance(reader, GGUFFile):
        raise ConfigError(f"{state.file_of(key)} is not a GGUF file; load GGUF files and others in separate configs")
    return reader


def _read(state, key: str, dtype: torch.dtype | None) -> torch.Tensor:
    value = state[key]
    return value.to(dtype) if dtype is not None and value.is_floating_point() and value.dtype != dtype else value


def _types(state) -> str:
    found = sorted({r.qtype(k) for r in state._readers if isinstance(r, GGUFFile) for k in r.entries})  # noqa: SLF001
    return ", ".join(found)


__all__ = [
    "FORMATS",
    "GGUFFile",
    "GGUFLinear",
    "GGUFQuantization",
    "dequantize",
    "dequantize_model",
    "dequantized_linear",
    "is_gguf",
    "load_gguf",
]
