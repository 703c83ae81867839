"""`enable_vram_management`: put one model under the VRAM manager and get a handle that drives it.

The handle owns the model's weights from then on. Each unit has an offload store (packed in
host memory, pinned when computing on CUDA; or its ranges in the safetensors files for `disk`;
or packed on the GPU when the model never leaves it). `activate()` (the model's stage starts)
moves the parameters outside units and the resident units to the compute device in the preparing
dtype, and makes the streamed units' onload store; `park()` (the stage ends) frees all of it.
Parameters of resident units whose preparing dtype is the computation dtype are real device
tensors ("plain"); every other unit parameter is a `ParkedWeight` between forwards.

Calling the model's forward while it is parked activates it; pipelines call activate/park at
their stage boundaries (`BasePipeline.load_models_to_device`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from contextlib import contextmanager

import torch
from torch import nn

from ..dtypes import DISK, dtype_name
from ..errors import ConfigError
from . import fp8_matmul
from .arena import HostArena
from .config import VramConfig, is_fp8, is_host
from .disk import DiskIndex, DiskReader, DiskUnit, is_changed, mark_changed, stored_places
from .parked import parked_parameter
from .plan import GIB, IN_FLIGHT, Plan, UnitSize, activation_bytes, make_plan
from .report import VramReport
from .storage import Packed, check_granularity, layout
from .streaming import Streamer, Target, Unit
from .units import collect, floating_dtype

logger = logging.getLogger(__name__)

HANDLE_ATTR = "_vram_handle"


def enable_vram_management(
    model: nn.Module,
    config: Mapping | VramConfig | None = None,
    *,
    vram_limit: float | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    checkpoint=None,
    name: str | None = None,
    fp8_granularity: str = "auto",
    max_in_flight: int = IN_FLIGHT,
    pin_memory: bool | None = None,
) -> VramHandle:
    """Manage `model`'s weights per `config` (the eight keys; a mapping, a `VramConfig` or a
    `ModelConfig`) within `vram_limit` GiB of the computation device; returns the active handle.

    `device`/`dtype` are the defaults of the computation keys (the pipeline's). `checkpoint` (the
    model's files, or a `LazyStateDict`) is needed for offload to "disk". Frozen weights only:
    parameters that require grad stay resident, untouched.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"enable_vram_management takes a torch.nn.Module, got {type(model).__name__}")
    if model.__dict__.get(HANDLE_ATTR) is not None:
        raise ConfigError(
            f"{name or type(model).__name__} is already VRAM-managed; call its handle's disable() before "
            "enabling it again with other settings"
        )
    check_vram_limit(vram_limit)
    if not isinstance(max_in_flight, int) or max_in_flight < 1:
        raise ConfigError(f"max_in_flight must be a positive integer, got {max_in_flight!r}")
    check_granularity(fp8_granularity)
    model_dtype = floating_dtype(model) or torch.bfloat16
    if hasattr(config, "vram_config") and callable(config.vram_config):
        config = config.vram_config()
    if not isinstance(config, VramConfig):
        config = VramConfig.resolve(
            config, device=device, dtype=dtype if dtype is not None else model_dtype, streaming=vram_limit is not None
        )
    return VramHandle(
        model, config, vram_limit, name or type(model).__name__, checkpoint, fp8_granularity, max_in_flight, pin_memory
    )


def check_vram_limit(vram_limit) -> None:
    """Refuse a `vram_limit` other than None (no limit) or a finite number of GiB >= 0: NaN compares false with
    everything, so it would run as 0; infinity is not documented as "no limit" (None is)."""
    if vram_limit is None:
        return
    number = isinstance(vram_limit, (int, float)) and not isinstance(vram_limit, bool)
    if number and math.isfinite(vram_limit) and vram_limit >= 0:
        return
    why = " (not a finite number)" if number and not math.isfinite(vram_limit) else ""
    raise ConfigError(
        f"vram_limit must be a number of GiB >= 0 (0 streams everything; None for no limit), got {vram_limit!r}{why}"
    )


class VramHandle:
    """Drives one managed model: `activate`, `park`, `report`, `materialized`, `state_dict`, `disable`."""

    def __init__(self, model, config: VramConfig, vram_limit, name, checkpoint, granularity, max_in_flight, pin):
        self.model = model
        self.config = config
        self.name = name
        self.vram_limit = vram_limit
        self.granularity = granularity
        self.device = torch.device(config.computation_device)
        self.act_dtype = self._activation_dtype(config, model)
        self.pin = (self.device.type == "cuda") if pin is None else bool(pin and torch.cuda.is_available())
        self.state = "parked"
        self._reader = DiskReader()
        fp8_ok = config.fp8_matmul and fp8_matmul.fp8_matmul_supported(self.device)
        if config.fp8_matmul and not fp8_ok:
            logger.warning(
                "%s: computation_dtype=%s needs fp8 matmuls, which %s does not have; computing in %s instead",
                name,
                dtype_name(config.computation_dtype),
                self.device,
                dtype_name(self.act_dtype),
            )
        split = collect(model)
        self._resident_params = split.resident
        self._buffers = split.buffers
        self.units = self._make_units(split.units, fp8_ok)
        self._attach_offload_stores(checkpoint)
        self.plan = self._make_plan(model)
        resident = set(self.plan.resident)
        for unit in self.units:
            unit.streamed = unit.name not in resident
            # a unit whose weights all train stays resident, untouched: there is nothing to fetch for it
            unit.fetched = bool(unit.targets) and (unit.streamed or not self._plain(unit))
        self.streamer = Streamer(self.units, self.device, max_in_flight=max_in_flight, granularity=granularity)
        self.streamer.install()
        self._prepared: dict[int, Packed] = {}
        self._versions: dict[int, list[int]] = {}
        self._calls = 0
        self._last_call_bytes = 0
        self._call_start = 0
        self._materialized = False  # inside materialized()
        self._window = (0, 0)  # bytes moved when the model was last activated, and during its last stage
        self._hooks = [
            model.register_forward_pre_hook(self._before_call),
            model.register_forward_hook(self._after_call, always_call=True),
        ]
        model.__dict__[HANDLE_ATTR] = self
        logger.info("%s: VRAM management %s; %s", name, config.as_dict(), self.plan.describe())
        self.activate()

    # ------------------------------------------------------------------ setup
    @staticmethod
    def _activation_dtype(config: VramConfig, model: nn.Module) -> torch.dtype:
        if not is_fp8(config.computation_dtype):
            return config.computation_dtype
        return floating_dtype(model) or torch.bfloat16

    def _make_units(self, unit_params, fp8_ok: bool) -> list[Unit]:
        units = []
        for index, up in enumerate(unit_params):
            targets = []
            for name, (param, owners) in up.params.items():
                owner, attr = owners[0]
                matmul = fp8_ok and len(owners) == 1 and attr == "weight" and fp8_matmul.eligible(owner)
                compute = self.config.computation_dtype if matmul else self.act_dtype
                placeholder = parked_parameter(param.shape, self.act_dtype, name, self._where())
                targets.append(Target(name, owners, param, placeholder, compute, matmul))
                if matmul:
                    fp8_matmul.install(owner)
            units.append(Unit(index, up.name, up.module, targets))
        return units

    def _where(self) -> str:
        c = self.config
        return f"offload {c.offload_device}/{_show(c.offload_dtype)}, onload {c.onload_device}/{_show(c.onload_dtype)}"

    def _storage_dtypes(self, unit: Unit, dtype) -> list[torch.dtype]:
        """What each tensor is stored as in a state whose dtype is `dtype` (fp8 only for matrices)."""
        out = []
        for t in unit.targets:
            if is_fp8(dtype) and len(t.shape) < 2:
                out.append(self.act_dtype)
            else:
                out.append(dtype)
        return out

    def _attach_offload_stores(self, checkpoint) -> None:
        """Build each unit's offload store from the model's current weights (or locate them on disk)."""
        c = self.config
        index = None
        if c.offload_device == DISK:
            index = self._disk_index(checkpoint)
            shapes = {t.name: tuple(t.param.shape) for u in self.units for t in u.targets}
            found = index.locate(shapes)
            # changed in memory since loading (a fused LoRA): the file no longer holds their values
            changed = [t for u in self.units for t in u.targets if t.name in found and is_changed(t.param)]
            for t in changed:
                del found[t.name]
            if changed:
                logger.info(
                    "%s: %d unit tensors were changed in memory (e.g. a fused LoRA: %r) and are not read from %s; "
                    "they stay in host memory (%.2f GiB)",
                    self.name,
                    len(changed),
                    changed[0].name,
                    index.files[0],
                    sum(t.param.numel() * t.param.element_size() for t in changed) / GIB,
                )
            skipped = {t.name for t in changed}
            missing = [n for n in shapes if n not in found and n not in skipped]
            if missing:
                size = sum(
                    t.param.numel() * t.param.element_size()
                    for u in self.units
                    for t in u.targets
                    if t.name not in found and t.name not in skipped
                )
                logger.warning(
                    "%s: %d of %d unit tensors are not stored unchanged in %s (e.g. %r); they stay in host memory "
                    "(%.2f GiB)",
                    self.name,
                    len(missing),
                    len(shapes),
                    index.files[0],
                    missing[0],
                    size / GIB,
                )
        arena, slot_of = self._host_arena(index)
        for unit in self.units:
            if not unit.targets:
                continue
            if index is not None:
                refs = [found.get(t.name) for t in unit.targets]
                hosts = [
                    None if r is not None else t.param.data.to(self.act_dtype)
                    for r, t in zip(refs, unit.targets, strict=True)
                ]
                unit.offload = DiskUnit(refs, hosts)
            else:
                where = torch.device(c.offload_device)
                dtypes = self._storage_dtypes(unit, c.offload_dtype)
                shapes = [t.shape for t in unit.targets]
                values = (t.param.data for t in unit.targets)
                unit.offload = Packed.pack(
                    values,
                    shapes,
                    dtypes,
                    device=where,
                    pin=self.pin and where.type == "cpu",
                    granularity=self.granularity,
                    work_device=self.device if self.device.type == "cuda" else None,
                    buffer=arena.buffer(slot_of[unit.index]) if arena is not None else None,
                )
            for t in unit.targets:
                t.param.data = torch.empty(0, dtype=t.param.dtype)
                for owner, attr in t.owners:
                    owner._parameters[attr] = t.placeholder

    def _host_arena(self, index) -> tuple[HostArena | None, dict[int, int]]:
        """The host memory of every unit's offload store in a few power-of-two blocks (`arena.py`: one pinned
        buffer per unit would be rounded up to a power of two each), and each unit's place in it; None when the
        store is not in host memory (disk, or an offload device other than the CPU)."""
        c = self.config
        if index is not None or torch.device(c.offload_device).type != "cpu":
            return None, {}
        sizes, slot_of = [], {}
        for unit in self.units:
            if unit.targets:
                slot_of[unit.index] = len(sizes)
                shapes = [t.shape for t in unit.targets]
                sizes.append(layout(shapes, self._storage_dtypes(unit, c.offload_dtype))[1])
        if not sizes:
            return None, {}
        arena = HostArena(sizes, pin=self.pin)
        logger.debug("%s: %d unit stores in %d host blocks (%.2f GiB)", self.name, len(sizes), len(arena.blocks),
                     arena.nbytes / GIB)  # fmt: skip
        return arena, slot_of

    def _disk_index(self, checkpoint) -> DiskIndex:
        if checkpoint is None:
            raise ConfigError(
                f"{self.name}: offload_device='disk' reads weights from the checkpoint files; pass them: "
                "enable_vram_management(model, config, checkpoint=[paths]) (pipelines do this for you)"
            )
        files = getattr(checkpoint, "files", checkpoint)
        # where the loader read each parameter: keys a format conversion renamed are found through it
        stored = stored_places((t.name, t.param) for u in self.units for t in u.targets)
        return DiskIndex([files] if isinstance(files, str) else list(files), stored)

    def _make_plan(self, model: nn.Module) -> Plan:
        c = self.config
        sizes = []
        for unit in self.units:
            prep_dtypes = self._storage_dtypes(unit, c.preparing_dtype)
            prep = layout([t.shape for t in unit.targets], prep_dtypes)[1]
            onload_dtypes = (
                [s.dtype for s in unit.offload.slots]
                if c.onload_dtype == DISK and unit.targets
                else self._storage_dtypes(unit, c.onload_dtype)
            )
            raw = layout([t.shape for t in unit.targets], onload_dtypes)[1]
            converted = sum(
                math.prod(t.shape) * t.compute_dtype.itemsize
                for t, d in zip(unit.targets, onload_dtypes, strict=True)
                if d != t.compute_dtype
            )
            # a resident unit that is not plain is converted to what the forward sees on each forward
            per_forward = sum(
                math.prod(t.shape) * t.compute_dtype.itemsize
                for t, d in zip(unit.targets, prep_dtypes, strict=True)
                if d != t.compute_dtype
            )
            sizes.append(UnitSize(unit.name, prep, raw + converted, held=raw, converted=per_forward))
        fixed = activation_bytes(model)
        fixed += sum(
            p.numel() * (self.act_dtype.itemsize if _castable(p) else p.element_size())
            for _, p in self._resident_params
        )
        fixed += sum(getattr(m, a).numel() * getattr(m, a).element_size() for m, a in self._buffers)
        budget = None
        if self.vram_limit is not None:
            if c.streams:
                budget = int(self.vram_limit * GIB)
            else:
                logger.info(
                    "%s: vram_limit does not apply with onload_device=%r (the whole model sits on the device "
                    "while its stage runs); set onload_device='cpu' to stream units",
                    self.name,
                    c.onload_device,
                )
        return make_plan(sizes, fixed, budget)

    def _plain(self, unit: Unit) -> bool:
        """Resident in the computation dtype with nothing to convert: parameters are real device tensors."""
        c = self.config
        if torch.device(c.preparing_device) != self.device:
            return False
        dtypes = self._storage_dtypes(unit, c.preparing_dtype)
        return all(d == t.compute_dtype and not t.fp8_matmul for d, t in zip(dtypes, unit.targets, strict=True))

    # ------------------------------------------------------------------ states
    def activate(self) -> None:
        """The model's stage starts: resident parts onto the compute device, streamed units ready to stream.
        A disabled handle does nothing: the model is unmanaged again (its weights are real tensors)."""
        if self.state in ("active", "disabled"):
            return
        with torch.no_grad(), torch.inference_mode(False):
            for _, p in self._resident_params:
                p.data = p.data.to(self.device, self.act_dtype if _castable(p) else p.dtype, non_blocking=True)
            for module, attr in self._buffers:
                module._buffers[attr] = module._buffers[attr].to(self.device)
            self._prepare_units()
        self.streamer.follow_compute()
        self.state = "active"
        self._window = (self.streamer.stats.bytes_moved, self._window[1])

    def park(self) -> None:
        """The model's stage ends: free its device memory (a model offloaded to the device stays). A disabled
        handle does nothing (it no longer owns the weights)."""
        if self.state in ("parked", "disabled") or not self.config.parks:
            return
        self._window = (self._window[0], self.streamer.stats.bytes_moved - self._window[0])
        self._release_units()
        host = "cpu" if is_host(self.config.offload_device) else self.config.offload_device
        with torch.no_grad():
            for _, p in self._resident_params:
                p.data = p.data.to(host)
            for module, attr in self._buffers:
                module._buffers[attr] = module._buffers[attr].to(host)
        self.state = "parked"

    def _prepare_units(self) -> None:
        c = self.config
        for unit in self.units:
            if not unit.targets:
                continue
            if unit.streamed:
                unit.source = self._store_like(unit, c.onload_device, c.onload_dtype)
                continue
            prepared = self._store_like(unit, c.preparing_device, c.preparing_dtype)
            self._prepared[unit.index] = prepared
            if unit.fetched:
                unit.source = prepared
                continue
            versions = []
            for t, (data, _) in zip(unit.targets, prepared.views(), strict=True):
                t.param.data = data
                for owner, attr in t.owners:
                    owner._parameters[attr] = t.param
                versions.append(t.param._version)
            self._versions[unit.index] = versions

    def _release_units(self) -> None:
        self.streamer.reset()
        for unit in self.units:
            versions = self._versions.pop(unit.index, None)
            if versions is not None:  # plain: keep edits made in place (e.g. a fused LoRA)
                for i, (t, version) in enumerate(zip(unit.targets, versions, strict=True)):
                    if t.param._version != version:
                        unit.offload.update(i, t.param.data, self.granularity)
                        mark_changed(t.param)
                    t.param.data = torch.empty(0, dtype=t.param.dtype)
                    for owner, attr in t.owners:
                        owner._parameters[attr] = t.placeholder
            unit.source = None
            self._prepared.pop(unit.index, None)

    def _store_like(self, unit: Unit, device, dtype):
        """The unit's weights on `device` stored as `dtype`: the offload store itself when it already is."""
        c = self.config
        if device == DISK:
            return unit.offload
        dtypes = self._storage_dtypes(unit, dtype) if dtype != DISK else [s.dtype for s in unit.offload.slots]
        where = torch.device(device)
        source = unit.offload
        if isinstance(source, Packed) and [s.dtype for s in source.slots] == dtypes:
            return source.to(where, pin=self.pin)
        wide = [torch.float32 if is_fp8(d) else d for d in dtypes]
        values = self._values(source, wide, where)
        shapes = [t.shape for t in unit.targets]
        pin = self.pin and where.type == "cpu" and c.computation_device != "cpu"
        return Packed.pack(values, shapes, dtypes, device=where, pin=pin, granularity=self.granularity)

    def _values(self, source, dtypes, device):
        if isinstance(source, DiskUnit):
            return source.values(dtypes, self._reader, device)
        return source.values(dtypes, device)

    # ------------------------------------------------------------------ model calls
    def _before_call(self, module, args) -> None:
        if self.state == "parked":
            self.activate()
        self.streamer.begin_call()
        self._call_start = self.streamer.stats.bytes_moved

    def _after_call(self, module, args, output) -> None:
        self._calls += 1
        self._last_call_bytes = self.streamer.stats.bytes_moved - self._call_start

    # ------------------------------------------------------------------ observability
    def report(self) -> VramReport:
        stats = self.streamer.stats
        stats.resolve(block=True)
        return VramReport(
            name=self.name,
            state=self.state,
            device=str(self.device),
            units=len(self.units),
            resident_units=len(self.plan.resident),
            streamed_units=len(self.plan.streamed),
            resident_bytes=self.resident_bytes(),
            streamed_bytes=self.plan.streamed_bytes,
            bytes_per_step=self._bytes_per_step(),
            bytes_moved=stats.bytes_moved,
            forward_calls=self._calls,
            copy_wait_s=stats.gpu_wait_s + stats.host_wait_s,
            gpu_wait_s=stats.gpu_wait_s,
            host_wait_s=stats.host_wait_s,
            fetches=stats.fetches,
            prefetch_hits=stats.hits,
            misses=stats.misses,
            peak_in_flight=stats.peak_in_flight,
            plan=self.plan.describe(),
            config=self.config.as_dict(),
        )

    def _bytes_per_step(self) -> int:
        """Bytes moved by the last forward call; for models used through other methods (VAE decode,
        text encoding) the bytes moved during the current (or last) stage."""
        if self._calls:
            return self._last_call_bytes
        if self.state == "active":
            return self.streamer.stats.bytes_moved - self._window[0]
        return self._window[1]

    def resident_bytes(self) -> int:
        """Bytes of this model's weights and buffers on the compute device now (0 while parked)."""
        if self.state != "active":
            return 0
        total = 0
        for _, p in self._resident_params:
            total += p.numel() * p.element_size() if p.device == self.device else 0
        for module, attr in self._buffers:
            b = module._buffers[attr]
            total += b.numel() * b.element_size() if b.device == self.device else 0
        for unit in self.units:
            store = self._prepared.get(unit.index)
            if store is None and self.state == "active" and not unit.streamed:
                store = unit.offload if isinstance(unit.offload, Packed) else None
            if store is not None and store.device == self.device:
                total += store.nbytes
        return total

    def reset_stats(self) -> None:
        self.streamer.stats = type(self.streamer.stats)()
        self._calls = 0
        self._last_call_bytes = 0
        self._window = (0, 0)

    def prepare_for_compile(self) -> None:
        """Register the unit hooks again, now excluded from torch.compile tracing (they have side
        effects). Enabling does this by itself only when torch._dynamo is already imported."""
        import torch._dynamo  # noqa: F401  (the import is the point: seconds, so not done by default)

        self.streamer.uninstall()
        self.streamer.install()

    # ------------------------------------------------------------------ real values
    @contextmanager
    def materialized(self):
        """Every managed parameter holds its real value (CPU, computation dtype) inside the block;
        in-place changes (e.g. fusing a LoRA) are stored back on exit. Re-entrant: a nested block
        (e.g. `apply_lora` inside `pipe.load_lora`'s) just uses the outer one's values."""
        if self._materialized:
            yield self.model
            return
        self._materialized = True
        try:
            with self._materialized_once():
                yield self.model
        finally:
            self._materialized = False

    @contextmanager
    def _materialized_once(self):
        was_active = self.state == "active"
        self._release_units()
        restored = self._materialize()
        try:
            yield self.model
        finally:
            for unit in self.units:
                for i, t in enumerate(unit.targets):
                    if t.param._version != restored[t.name]:
                        unit.offload.update(i, t.param.data, self.granularity)
                        mark_changed(t.param)
                    t.param.data = torch.empty(0, dtype=t.param.dtype)
                    for owner, attr in t.owners:
                        owner._parameters[attr] = t.placeholder
            if was_active:
                with torch.no_grad(), torch.inference_mode(False):
                    self._prepare_units()
                self.streamer.follow_compute()

    def _materialize(self) -> dict[str, int]:
        versions = {}
        with torch.no_grad(), torch.inference_mode(False):
            for unit in self.units:
                if not unit.targets:
                    continue
                values = self._values(unit.offload, [self.act_dtype] * len(unit.targets), "cpu")
                for t, value in zip(unit.targets, values, strict=True):
                    t.param.data = value.to("cpu").contiguous()
                    for owner, attr in t.owners:
                        owner._parameters[attr] = t.param
                    versions[t.name] = t.param._version
        return versions

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The model's state dict with real values (CPU) for the managed weights."""
        out = {}
        placeholders = {id(t.placeholder): (u, i) for u in self.units for i, t in enumerate(u.targets)}
        params = dict(self.model.named_parameters(remove_duplicate=False))
        for unit in self.units:
            if not unit.targets:
                continue
            values = self._values(unit.offload, [self.act_dtype] * len(unit.targets), "cpu")
            for t, value in zip(unit.targets, values, strict=True):
                out[t.name] = value.to("cpu")
        for key, p in params.items():
            if id(p) in placeholders:
                unit, i = placeholders[id(p)]
                out[key] = out[unit.targets[i].name]
            elif key not in out:
                out[key] = p.detach().to("cpu")
        for key, b in self.model.named_buffers():
            out[key] = b.detach().to("cpu")
        return {k: out[k] for k in self.model.state_dict(keep_vars=True)}

    def disable(self) -> nn.Module:
        """Stop managing: every parameter real again (CPU, computation dtype); returns the model. Weights the
        offload store kept narrower than the model's dtype (fp8) keep that rounding: see `_keep_rounding`."""
        if self.state == "disabled":
            return self.model
        self._release_units()
        rounded = self._rounded_targets()
        self._materialize()
        self._keep_rounding(rounded)
        self.streamer.close()
        for unit in self.units:
            for t in unit.targets:
                if t.fp8_matmul:
                    fp8_matmul.uninstall(t.owners[0][0])
            unit.offload = None
        for hook in self._hooks:
            hook.remove()
        with torch.no_grad():
            for _, p in self._resident_params:
                p.data = p.data.to("cpu")
            for module, attr in self._buffers:
                module._buffers[attr] = module._buffers[attr].to("cpu")
        self._reader.close()
        self.model.__dict__.pop(HANDLE_ATTR, None)
        self.state = "disabled"
        return self.model

    def _rounded_targets(self) -> list[tuple[Target, torch.dtype]]:
        """Unit tensors whose offload store holds them narrower than the model's own dtype (e.g. fp8), with that
        dtype: their full-precision values are gone, as the store was all that held them."""
        rounded = []
        for unit in self.units:
            if isinstance(unit.offload, Packed):
                pairs = zip(unit.targets, unit.offload.slots, strict=True)
                rounded += [(t, s.dtype) for t, s in pairs if _narrows(s.dtype, t.param.dtype)]
        return rounded

    def _keep_rounding(self, rounded: list[tuple[Target, torch.dtype]]) -> None:
        """The materialised weights of `rounded` are the store's rounded values: say so once, and mark them changed
        so a later disk store keeps them (rather than silently reading the file's full-precision values)."""
        if not rounded:
            return
        for t, _ in rounded:
            mark_changed(t.param)
        logger.warning(
            "%s: VRAM management is off (disabled or enabled again), and %d weights (e.g. %r) keep the rounding "
            "of their %s store in memory; load the model again for its full-precision weights",
            self.name,
            len(rounded),
            rounded[0][0].name,
            "/".join(sorted({dtype_name(d) for _, d in rounded})),
        )


def _narrows(stored: torch.dtype, original: torch.dtype) -> bool:
    """Whether storing a tensor of dtype `original` as `stored` loses precision or range."""
    if stored == original:
        return False
    if is_fp8(stored) or is_fp8(original):
        return is_fp8(stored)  # a wider store holds fp8 values exactly
    return torch.promote_types(stored, original) != stored


def vram_handle(model: nn.Module) -> VramHandle | None:
    """The handle of a managed model (None when it is not managed)."""
    return model.__dict__.get(HANDLE_ATTR)


def _castable(p: torch.Tensor) -> bool:
    return p.is_floating_point() and not p.requires_grad


def _show(value) -> str:
    return dtype_name(value) if isinstance(value, torch.dtype) else str(value)


__all__ = ["VramHandle", "check_vram_limit", "enable_vram_management", "vram_handle"]
