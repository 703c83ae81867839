"""`BasePipeline`: what every family pipeline shares.

A family pipeline declares its model slots (attribute name -> spec role), its family name (for
presets) and implements `__call__` as a short sequence of named stages. This base class loads the
models (from presets, `ModelConfig`s or a local hub-style folder), moves them between stages,
makes seeded noise, applies classifier-free guidance, shows progress, and converts outputs.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import math
import numbers
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from .dtypes import check_device, dtype_name, parse_device, parse_dtype
from .errors import CheckpointError, ConfigError, preview
from .hub import ModelConfig
from .quant import check_vram_keys, quantize_config

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".gguf")
COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # a pipeline's torch_dtype


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


SEEDS = (-(2**63), 2**64 - 1)  # the seeds torch.Generator.manual_seed takes (a negative one counts modulo 2**64)


def check_seed(seed, what: str = "seed") -> int:
    """`seed` as an int within `SEEDS`; otherwise a ConfigError naming `what` (the argument, or file and line), the
    seed and the range (torch raised a bare "Overflow when unpacking long long" when the noise was drawn)."""
    try:
        value = None if isinstance(seed, bool) else int(seed)  # True is no seed: int() would make it 1
    except (TypeError, ValueError, OverflowError):
        value = None
    if value is None or (not isinstance(seed, str) and value != seed):  # int() cut 1.5 to 1
        raise ConfigError(f"{what} {seed!r} is not a whole number")
    if not SEEDS[0] <= value <= SEEDS[1]:
        raise ConfigError(f"{what} {value}: outside the seeds torch accepts, -2**63 to 2**64 - 1 (64 bits)")
    return value


def finite_number(value, name: str) -> float:
    """`value` as a float, refused (ConfigError naming `name`) unless it is a real finite number: a NaN or infinite
    guidance scale or shift turns every prediction into NaN (a black image), or silently counts as "off"."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ConfigError(f"{name}={value!r} must be a finite number")
    return float(value)


def seeded_generator(
    seed: int | None, rand_device: str | torch.device = "cpu", parallel: bool | None = None
) -> tuple[torch.Generator | None, torch.device]:
    """The generator a call draws its noise from, seeded with `seed` on `rand_device` (None: unseeded draws), and
    that device; anything but cpu, cuda, cuda:N or mps (`disk` places weights, not noise), or a GPU this torch does
    not see (`check_device`), is refused by name, and so is a seed outside -2**63 .. 2**64 - 1 (`check_seed`).
    Under parallel sampling (`enable_parallel` in a process group of several ranks) a call without a seed draws one
    on rank 0 and shares it, so that every rank starts from the same noise (`parallel.shared_seed`): the divided
    denoiser calls must see one latent, not one per rank. `parallel`: whether the calling pipeline is parallel now
    (None: whether any pipeline of this process is); a call that is not draws on its own rank, without waiting."""
    if seed is None:
        from .parallel import shared_seed

        seed = shared_seed(parallel)
    seed = None if seed is None else check_seed(seed)
    try:
        device = parse_device(rand_device)
    except ConfigError:
        device = None
    if not isinstance(device, torch.device):
        raise ConfigError(f"rand_device={rand_device!r} is not accepted; use cpu, cuda, cuda:N or mps")
    check_device(device, "rand_device", given=rand_device)  # a GPU torch does not see: named, not torch's error
    return (None if seed is None else torch.Generator(device).manual_seed(seed)), device


def seeded_noise(
    shape: Sequence[int], seed: int | None, rand_device: str | torch.device = "cpu", parallel: bool | None = None
) -> torch.Tensor:
    """The pipelines' initial noise: float32 standard normal drawn on `rand_device` from `seed` (the trainer's
    direct distillation draws each row's noise with it, so a row's seed means the same noise as in `pipe(...)`);
    `parallel` as for `seeded_generator`."""
    generator, device = seeded_generator(seed, rand_device, parallel)
    return torch.randn(tuple(shape), generator=generator, device=device, dtype=torch.float32)


class BasePipeline:
    """Shared machinery of the family pipelines (see the module docstring)."""

    family: ClassVar[str] = ""
    model_slots: ClassVar[dict[str, str]] = {}  # attribute -> spec role
    optional_slots: ClassVar[tuple[str, ...]] = ()
    load_roles: ClassVar[frozenset[str] | None] = None  # None: every model the given files hold
    stage_order: ClassVar[tuple[str, ...]] = ()  # model-level offload follows the stages
    # slots holding a `ControlNetSlot`: each net loaded there joins it (in order) instead of replacing it
    controlnet_slots: ClassVar[tuple[str, ...]] = ("controlnet",)
    # slot -> the spec names it accepts: a recognised model of another spec (another family's DiT or VAE of the
    # same role) is refused at load time instead of failing in the call; a slot not listed is not checked
    slot_specs: ClassVar[Mapping[str, tuple[str, ...]]] = {}
    size_multiple: ClassVar[int] = 16

    def __init__(self, device: str | torch.device | None = None, torch_dtype: torch.dtype | str = torch.bfloat16):
        self.device = torch.device(parse_device(device or _default_device()))
        check_device(self.device, "device", device)  # a GPU torch does not see: refused before anything loads
        # the GPU a bare "cuda" meant when the models were placed (enable_parallel checks it is this rank's)
        self.cuda_index = self.device.index
        if self.device.type == "cuda" and self.cuda_index is None and torch.cuda.is_available():
            self.cuda_index = torch.cuda.current_device()
        self.torch_dtype = parse_dtype(torch_dtype)
        if self.torch_dtype not in COMPUTE_DTYPES:
            raise ConfigError(
                f"torch_dtype={dtype_name(self.torch_dtype)} is not accepted: the pipeline loads and computes in "
                "float32, float16 or bfloat16. For fp8 weights keep torch_dtype=torch.bfloat16 and store them in fp8 "
                "with the VRAM keys (ModelConfig(offload_dtype=..., onload_dtype=..., preparing_dtype=...) or "
                "enable_vram_management(preparing_dtype=torch.float8_e4m3fn)), or quantize={'dit': "
                "'torchao_fp8_w8a16'}"
            )
        self.defaults: dict[str, Any] = {}
        self.tokenizer = None
        self.model_configs: dict[str, ModelConfig | None] = {}
        self.model_offload = False
        self.vram_limit: float | None = None  # GiB; set by from_pretrained / enable_vram_management
        self.vram_handles: dict[str, Any] = {}  # slot -> VramHandle of block-managed models
        for slot in self.model_slots:
            setattr(self, slot, None)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        model_id_or_configs: str | os.PathLike | Sequence[ModelConfig] | None = None,
        *,
        torch_dtype: torch.dtype | str = torch.bfloat16,
        device: str | torch.device | None = None,
        model_configs: Sequence[ModelConfig] = (),
        tokenizer_config: ModelConfig | None = None,
        vram_limit: float | None = None,
        use_usp: bool = False,
        controlnet=None,
        quantize: Mapping[str, Any] | None = None,
    ):
        """Build the pipeline from a preset name, a local hub-style folder, or `ModelConfig`s.

        `XPipeline.from_pretrained("Org/Model")` uses the family preset (its files and the
        authors' defaults); a folder path loads `transformer/`, `vae/`, `text_encoder/`,
        `tokenizer/` (or whatever subfolders hold weights); `model_configs=[...]` works like
        DiffSynth-Studio. `use_usp=True` (under torchrun, as DiffSynth-Studio) loads onto this
        rank's GPU and divides every denoiser call's tokens over all ranks (`enable_parallel`).
        `controlnet` loads ControlNets into pipelines that take them (see `load_controlnet`); ControlNet
        files among `model_configs` join them too, in order. `quantize={"dit": "bitsandbytes_nf4"}` (slot ->
        `quant.QuantizeConfig` or method name) quantizes loaded models as `ModelConfig(quantize=...)` does, for
        presets and folders whose `ModelConfig`s are not yours.
        """
        if use_usp:
            from .parallel import init_parallel

            init_parallel()
            if device is None or str(device) == "cuda":
                device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
        configs = list(model_configs)
        defaults: dict[str, Any] = {}
        preset_loras = ()
        if isinstance(model_id_or_configs, (list, tuple)):
            configs = list(model_id_or_configs) + configs
            defaults = studio_defaults(cls, configs)
        elif model_id_or_configs is None:
            defaults = studio_defaults(cls, configs)
        else:
            source = str(model_id_or_configs)
            if Path(source).is_dir():
                found, tok = configs_from_folder(Path(source))
                defaults = folder_defaults(Path(source))
            else:
                preset = cls._preset(source)
                found, tok, defaults = preset_sources(preset)
                preset_loras = preset.loras
            configs += found
            tokenizer_config = tokenizer_config or tok
        if not configs:
            raise ConfigError(
                f"{cls.__name__}.from_pretrained needs a preset name, a folder or model_configs=[ModelConfig(...)]"
            )
        from .vram.manager import check_vram_limit

        check_vram_limit(vram_limit)
        for config in configs:  # a GPU torch does not see, named before anything loads
            for key, value in config.vram_config().items():
                if value is not None and key.endswith("_device"):
                    check_device(value, f"ModelConfig {key}")

        pipe = cls(device=device, torch_dtype=torch_dtype)
        pipe.defaults.update(defaults)
        pipe.vram_limit = vram_limit
        for config in configs:
            pipe._load_config(config)
        missing = [s for s in cls.model_slots if getattr(pipe, s) is None and s not in cls.optional_slots]
        if missing:
            raise ConfigError(
                f"{cls.__name__} needs models for {missing}; the given files provided "
                f"{[s for s in cls.model_slots if getattr(pipe, s) is not None]}"
            )
        if tokenizer_config is not None:
            pipe.tokenizer = pipe._load_tokenizer(tokenizer_config)
        pipe._quantize_slots(quantize or {})
        pipe._place_models()
        if controlnet is not None:
            pipe.load_controlnet(controlnet)
        elif any(pipe.controlnets(s) for s in cls.controlnet_slots if s in cls.model_slots):  # in model_configs
            pipe.controlnets_changed()
        for lora in preset_loras:
            source = ModelConfig(model_id=lora.model_id, origin_file_pattern=lora.origin_file_pattern)
            pipe.load_lora(source, scale=lora.scale, fuse=lora.fuse, slot=lora.slot)
        if use_usp:
            pipe.enable_parallel()
        return pipe

    @classmethod
    def _preset(cls, name: str):
        from .registry import installed_families

        family = installed_families().get(cls.family)
        presets = dict(family.presets) if family else {}
        for key, preset in presets.items():
            if key.lower() == name.lower():
                own = preset.pipeline_class()
                if own is not None and not issubclass(cls, own):  # e.g. LTX-2.3's HDR preset, without a text encoder
                    where = preset.pipeline.replace(":", ".")
                    raise ConfigError(f"{key} needs its own pipeline class: load it with {where}.from_pretrained")
                return preset
        raise ConfigError(
            f"{name!r} is neither a folder nor a known {cls.__name__} preset; presets: {preview(sorted(presets), 30)}"
        )

    def _quantize_slots(self, quantize: Mapping[str, Any]) -> None:
        """`from_pretrained(quantize=...)`: each named slot's loaded model quantized (see `quant.py`)."""
        from .quant import QuantizeConfig

        if not isinstance(quantize, Mapping):
            raise ConfigError(
                f"quantize must map model slots to methods, e.g. {{'dit': 'bitsandbytes_nf4'}}; got {quantize!r}"
            )
        for slot, value in quantize.items():
            model = getattr(self, slot, None) if slot in self.model_slots else None
            if not isinstance(model, torch.nn.Module):
                loaded = [s for s in self.model_slots if isinstance(getattr(self, s), torch.nn.Module)]
                raise ConfigError(f"quantize names slot {slot!r}, which holds no loaded model; loaded: {loaded}")
            config = QuantizeConfig.parse(value)
            model_config = self.model_configs.get(slot)
            if quantize_config(model) is not None:
                raise ConfigError(
                    f"quantize names slot {slot!r}, whose model is quantized already: "
                    f"{_quantized_because(quantize_config(model), model_config)}; drop {slot!r} from quantize"
                )
            check_vram_keys(slot, config, model_config.vram_config() if model_config is not None else {})
            config.quantize_model(model, compute_device=self.device)

    def _load_config(self, config: ModelConfig) -> None:
        """Load the models of one `ModelConfig` into their slots; ControlNet files join their slot (see
        `controlnet_slots`) in order instead of replacing it."""
        slots = [s for s in self.controlnet_slots if s in self.model_slots]
        held = {s: getattr(self, s) for s in slots}
        for slot in slots:
            setattr(self, slot, None)
        try:
            self._load_into_slots(config)
        finally:
            loaded = {s: getattr(self, s) for s in slots}
            for slot, value in held.items():
                setattr(self, slot, value)
        for slot, net in loaded.items():
            if net is not None:
                self._add_controlnet(net, config, slot)

    def _load_into_slots(self, config: ModelConfig) -> None:
        from .gguf import is_gguf, load_gguf
        from .loading import load_models
        from .quant_io import load_prequantized, prequantized_config

        paths = weight_paths(config)
        fetch_companion_config(config)  # the loader reads config.json beside the weights
        prequantized = prequantized_config(paths, config.quantize, describe_config(config))  # a file saved quantized
        if prequantized is None and is_gguf(paths):  # GGUF: its quantized Linears stay packed (`gguf.py`)
            prequantized, loaded = load_gguf(
                paths, config.quantize, torch_dtype=self.torch_dtype, roles=self.load_roles
            )
        elif prequantized is not None:
            loaded = load_prequantized(paths, prequantized, torch_dtype=self.torch_dtype, roles=self.load_roles)
        else:  # in the pipeline dtype: storage dtypes (fp8 with scales, disk) are the VRAM manager's job
            loaded = load_models(paths, torch_dtype=self.torch_dtype, device="cpu", roles=self.load_roles)
        roles = {role: slot for slot, role in self.model_slots.items()}
        for item in loaded:
            slot = roles.get(item.role)
            if slot is None:
                raise ConfigError(
                    f"{describe_config(config)} holds a {item.role!r} model ({item.spec}), which {type(self).__name__} "
                    f"does not use; it takes {sorted(roles)}"
                )
            self._check_slot_spec(config, item, slot)
            if getattr(self, slot) is not None:
                logger.warning("%s replaces an earlier %s model", describe_config(config), slot)
            module = item.module.eval().requires_grad_(False)
            if prequantized is not None:
                check_vram_keys(slot, prequantized, config.vram_config())
            elif config.quantize is not None:  # quantized Linears from here on (`quant.py`), rounded on the device
                check_vram_keys(slot, config.quantize, config.vram_config())
                config.quantize.quantize_model(module, compute_device=self.device)
            setattr(self, slot, module)
            self.model_configs[slot] = config

    def _check_slot_spec(self, config: ModelConfig, item, slot: str) -> None:
        """Refuse a model whose spec `slot_specs` does not list for `slot`: a model of the right role from another
        family (a FLUX.2 DiT in FLUX.1) loads fine and fails only in the call, with a bare AttributeError."""
        accepted = self.slot_specs.get(slot)
        if accepted is None or item.spec in accepted:
            return
        from .registry import installed_families

        families = [f.name for f in installed_families().values() if any(s.name == item.spec for s in f.specs)]
        owner = f" (family {families[0]})" if families else ""
        names = list(getattr(item, "files", None) or []) if config.path is None else []  # a path names them
        files = f" ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})" if names else ""
        raise ConfigError(
            f"{describe_config(config)}{files} holds the {item.spec} model{owner}; {type(self).__name__}'s {slot} slot "
            f"takes {', '.join(accepted)}"
        )

    # ------------------------------------------------------------------ ControlNets
    def controlnet_spec(self):
        """The `ModelSpec` (or specs) this family's ControlNet files load with (families with a `controlnet`
        slot); each loaded net goes to the slot of its spec's role."""
        raise ConfigError(f"{type(self).__name__} takes no ControlNets")

    def controlnet_source(self, item) -> ModelConfig:
        """What a user named a ControlNet by (a file or folder, a hub repo id, a `ModelConfig`), as a
        `ModelConfig`; families know their hub repos (see `controlnet.model_source`)."""
        from .controlnet import model_source

        return model_source(item, "controlnet", lambda repo: "diffusion_pytorch_model.safetensors", "a hub repo id")

    def describe_controlnet(self, net: torch.nn.Module) -> str:
        """One line for the log when a net is loaded."""
        return type(net).__name__

    def controlnets_changed(self) -> None:
        """Called once nets were loaded (e.g. to check they fit the denoiser)."""

    def load_controlnet(self, controlnet) -> list[int]:
        """Load ControlNets (one item or a list: local files or folders, hub repo ids, `ModelConfig`s; see the
        family's README) and return their `controlnet_id`s: positions in load order, after those already
        loaded. Loads are strict; nets load in the pipeline's dtype and are placed like the other models (on
        the device, or under VRAM management)."""
        from .loading import load_models

        specs = self.controlnet_spec()
        specs = list(specs) if isinstance(specs, (list, tuple)) else [specs]
        slot_of = {role: slot for slot, role in self.model_slots.items()}
        items = list(controlnet) if isinstance(controlnet, (list, tuple)) else [controlnet]
        if not items:
            raise ConfigError("load_controlnet got an empty list; give a path, a hub repo id or a ModelConfig")
        ids, touched = [], []
        for item in items:
            config = self.controlnet_source(item)
            for loaded in load_models(weight_paths(config), torch_dtype=self.torch_dtype, device="cpu", specs=specs):
                slot = slot_of[loaded.role]
                ids.append(self._add_controlnet(loaded.module, config, slot))
                touched += [slot] if slot not in touched else []
        self.controlnets_changed()
        if self.vram_handles:
            self.enable_vram_management(slots=touched)
        elif not self.model_offload:
            for slot in touched:
                getattr(self, slot).to(self.device)
        return ids

    def _add_controlnet(self, net: torch.nn.Module, config: ModelConfig | None, slot: str = "controlnet") -> int:
        from .controlnet import ControlNetSlot

        if getattr(self, slot) is None:
            setattr(self, slot, ControlNetSlot())
        self.model_configs.setdefault(slot, config)
        index = getattr(self, slot).append(net.eval().requires_grad_(False))
        logger.info("%s %d: %s", slot, index, self.describe_controlnet(net))
        return index

    def controlnets(self, slot: str = "controlnet") -> list[torch.nn.Module]:
        """The nets loaded in a ControlNet slot, indexed by `ControlNetInput.controlnet_id`."""
        held = getattr(self, slot, None)
        return list(held.nets) if held is not None else []

    def _load_tokenizer(self, config: ModelConfig):
        from transformers import AutoTokenizer

        paths = config.resolve()
        folder = paths[0] if Path(paths[0]).is_dir() else str(Path(paths[0]).parent)
        return AutoTokenizer.from_pretrained(folder)

    def _place_models(self) -> None:
        """Model-level placement after loading.

        Without VRAM settings every model goes to the device. With a `vram_limit` or any of the
        eight VRAM keys in a model's `ModelConfig`, every model is put under the VRAM manager
        (block-granular offload, streaming, fp8, disk) and parked until its stage runs. Slots named
        by `training_support.models_kept_on_host` (a trainer streams them itself) stay in CPU memory
        as loaded, outside both.
        """
        from .training_support import host_slots

        kept = host_slots()
        configs = {
            slot: self.model_configs.get(slot)
            for slot in self.model_slots
            if getattr(self, slot) is not None and slot not in kept
        }
        wants = self.vram_limit is not None or any(
            c is not None and any(v is not None for v in c.vram_config().values()) for c in configs.values()
        )
        self.model_offload = wants
        if not wants:
            for slot in configs:
                getattr(self, slot).to(self.device)
            return
        # quantized models are not block-managed: they move as a whole between stages (`load_models_to_device`)
        self.enable_vram_management(slots=[s for s in configs if quantize_config(getattr(self, s)) is None])

    def enable_vram_management(self, slots: Iterable[str] | None = None, **settings):
        """Put the pipeline's models (all, or `slots`) under the VRAM manager; returns handles by slot.

        `vram_limit=` (GiB; None for no limit; when not given, the one from from_pretrained) bounds
        each model while its stage runs, minus what models that never leave the device hold. The
        eight DiffSynth-Studio keys (`offload_device=`, `preparing_dtype=`, ...) override each
        model's `ModelConfig` keys. Models are parked afterwards; stages activate them. A quantized model is not
        block-managed (it moves as a whole between stages): naming it in `slots`, or giving fp8 or disk keys that
        would reach it, is refused.
        """
        from .vram import VramConfig, enable_vram_management, vram_handle
        from .vram.config import parse_vram_keys
        from .vram.manager import check_vram_limit
        from .vram.plan import GIB
        from .vram.report import device_bytes

        vram_keys = dict(settings)
        limit = vram_keys.pop("vram_limit", self.vram_limit)
        check_vram_limit(limit)
        given = parse_vram_keys(vram_keys)
        for key, value in given.items():  # a GPU torch does not see, named before any model moves
            if key.endswith("_device"):
                check_device(value, key, vram_keys[key])
        named = [slots] if isinstance(slots, str) else None if slots is None else list(slots)
        unknown = [s for s in named or () if s not in self.model_slots]
        if unknown:
            raise ConfigError(f"unknown model slot(s) {unknown}; slots: {list(self.model_slots)}")
        loaded = [s for s in self.model_slots if getattr(self, s, None) is not None]
        empty = [s for s in named or () if s not in loaded]
        if empty:
            raise ConfigError(f"enable_vram_management: slot(s) {empty} hold no loaded model; loaded: {loaded}")
        chosen = loaded if named is None else named
        quantized = {s: q for s in chosen if (q := quantize_config(getattr(self, s))) is not None}
        others = [s for s in chosen if s not in quantized]
        for slot, method in quantized.items():
            every = "" if named is not None else f" for every model (slots={others} leaves {slot} out)"
            check_vram_keys(slot, method, given, f"enable_vram_management{every}")
            if named is not None:
                raise ConfigError(
                    f"enable_vram_management(slots={named}): the {slot} model is quantized ({method.method}), so it "
                    "is not block-managed: it moves to the device as a whole for its stage; leave it out of slots"
                )
        chosen = others
        self.vram_limit = limit
        handles = self.vram_handles
        resolved = {}
        for slot in chosen:
            model_config = self.model_configs.get(slot)
            keys = dict(model_config.vram_config()) if model_config is not None else {}
            keys.update(given)
            resolved[slot] = VramConfig.resolve(
                keys, device=self.device, dtype=self.torch_dtype, streaming=limit is not None
            )
        staying = {s: device_bytes(getattr(self, s), c.computation_dtype) for s, c in resolved.items() if not c.parks}
        for slot, config in resolved.items():
            model = getattr(self, slot)
            if vram_handle(model) is not None:
                vram_handle(model).disable()
            budget = None
            if limit is not None:
                budget = max(0.0, limit - sum(b for s, b in staying.items() if s != slot) / GIB)
            checkpoint = None
            if config.offload_device == "disk" and self.model_configs.get(slot) is not None:
                checkpoint = weight_paths(self.model_configs[slot])
            handles[slot] = enable_vram_management(
                model, config, vram_limit=budget, checkpoint=checkpoint, name=f"{type(self).__name__}.{slot}"
            )
            handles[slot].park()
        self.model_offload = True
        return dict(handles)

    def disable_vram_management(self, slots: Iterable[str] | None = None) -> None:
        """Take the models in `slots` (all managed ones when None) off the VRAM manager: their weights become
        real tensors again (in the computation dtype; weights it stored in fp8 keep that rounding) and their
        handles leave `vram_handles`. Disabling handles one by one (`handle.disable()`) leaves them there, where
        the stages would still drive them; this also resets what enabling set: with no managed model left, the
        models no longer move between stages and go to the device, as in a pipeline loaded without VRAM keys."""
        from .training_support import host_slots
        from .vram import vram_handle

        named = [slots] if isinstance(slots, str) else None if slots is None else list(slots)
        unknown = [s for s in named or () if s not in self.model_slots]
        if unknown:
            raise ConfigError(
                f"disable_vram_management: unknown model slot(s) {unknown}; slots: {list(self.model_slots)}"
            )
        for slot in list(self.vram_handles) if named is None else named:
            handle = self.vram_handles.pop(slot, None)
            if handle is not None:
                handle.disable()
        if self._live_vram_handles():
            return
        self.vram_handles.clear()  # only handles disabled directly were left
        self.model_offload = False
        kept = host_slots()
        for slot in self.model_slots:
            model = getattr(self, slot)
            if model is not None and slot not in kept and vram_handle(model) is None:
                model.to(self.device)

    def _live_vram_handles(self) -> dict:
        """`vram_handles` less those disabled directly (`handle.disable()`): their models are unmanaged again."""
        return {slot: h for slot, h in self.vram_handles.items() if h.state != "disabled"}

    def load_models_to_device(self, slots: Iterable[str]) -> None:
        """Move the models a stage needs to the device and park the others (when offloading). A model VRAM-managed
        from outside the pipeline (a trainer's streamed or fp8 model) is activated by its own handle, never moved
        with `.to` (its weights are the manager's), and left as it is otherwise."""
        from .vram import vram_handle

        slots = set(slots)
        handles = self._live_vram_handles()
        parked = False
        for slot in self.model_slots:  # free memory first, then fill it
            model = getattr(self, slot)
            if model is None or slot in slots:
                continue
            if slot in handles:
                parked |= handles[slot].state == "active"
                handles[slot].park()
            elif self.model_offload and vram_handle(model) is None:
                model.to("cpu")
                parked = True
        for slot in slots:
            model = getattr(self, slot, None)
            if model is None:
                continue
            handle = handles.get(slot) or vram_handle(model)
            if handle is not None:
                handle.activate()
            else:
                model.to(self.device)
        if parked and self.model_offload and self.device.type == "cuda":
            torch.cuda.empty_cache()

    def vram_report(self) -> dict:
        """Per model slot: a `VramReport` (resident bytes on the device, bytes streamed per step,
        seconds waiting on copies, the plan); unmanaged models report their resident bytes only."""
        from .vram import VramReport

        handles = self._live_vram_handles()
        reports = {}
        for slot in self.model_slots:
            model = getattr(self, slot)
            if model is None:
                continue
            if slot in handles:
                reports[slot] = handles[slot].report()
                continue
            reports[slot] = VramReport.unmanaged(f"{type(self).__name__}.{slot}", model, self.device)
        return reports

    # ------------------------------------------------------------------ helpers for __call__
    def setting(self, name: str, value: Any, fallback: Any) -> Any:
        """An explicit argument wins, then the preset's default, then the pipeline's own."""
        if value is not None:
            return value
        return self.defaults.get(name, fallback)

    def check_size(self, height: int, width: int) -> tuple[int, int]:
        """Round sizes to the model's multiple with a warning; reject sizes that cannot work."""
        m = self.size_multiple
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or isinstance(value, bool) or value < m:
                raise ConfigError(f"{name}={value!r} is not accepted: use an integer multiple of {m}, at least {m}")
        new_h, new_w = max(m, round(height / m) * m), max(m, round(width / m) * m)
        if (new_h, new_w) != (height, width):
            logger.warning("height/width %dx%d rounded to %dx%d (multiples of %d)", height, width, new_h, new_w, m)
        return new_h, new_w

    @staticmethod
    def check_prompts(prompt: str | Sequence[str], name: str = "prompt", allow_empty: bool = False) -> list[str]:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else None
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ConfigError(f"{name} must be a string or a non-empty list of strings, got {prompt!r}")
        if not allow_empty and any(not p.strip() for p in prompts):
            raise ConfigError(
                f"{name} is empty; describe the image you want (an empty string is only accepted as negative_prompt)"
            )
        return prompts

    def check_prompt_pair(
        self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str]
    ) -> tuple[list[str], list[str]]:
        """Prompts and one negative prompt each: a single negative is shared by every prompt."""
        prompts = self.check_prompts(prompt)
        negatives = self.check_prompts(negative_prompt, "negative_prompt", allow_empty=True)
        if len(negatives) == 1 and len(prompts) > 1:
            negatives = negatives * len(prompts)
        if len(negatives) != len(prompts):
            raise ConfigError(f"negative_prompt has {len(negatives)} entries for {len(prompts)} prompts")
        return prompts, negatives

    def generate_noise(
        self, shape: Sequence[int], seed: int | None, rand_device: str | torch.device = "cpu"
    ) -> torch.Tensor:
        """Seeded float32 noise drawn on `rand_device`: the same seed gives the same noise on any compute device.
        Without a seed, the ranks share one only while this pipeline is parallel (`samples_in_parallel`)."""
        return seeded_noise(shape, seed, rand_device, self.samples_in_parallel()).to(self.device)

    def check_latents(self, latents: torch.Tensor, expected: Sequence[int]) -> torch.Tensor:
        if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != tuple(expected):
            got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ConfigError(f"latents must be a tensor of shape {tuple(expected)} (unpacked layout), got {got}")
        if not bool(torch.isfinite(latents).all()):  # NaN noise gives a NaN (black) image with no word why
            raise ConfigError("latents contain NaN or infinite values; give finite initial noise")
        return latents.to(device=self.device, dtype=torch.float32)

    @staticmethod
    def guide(positive: torch.Tensor, negative: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        """Classifier-free guidance: cfg_scale 1 returns the positive prediction."""
        return negative + cfg_scale * (positive - negative)

    def progress(self, iterable, enabled: bool = True):
        """The denoising loop's iterator: a progress bar, and the steps of the enabled step caches."""
        from tqdm.auto import tqdm

        bar = tqdm(iterable, disable=not enabled, desc=type(self).__name__)
        caches = list(self.step_caches().values())
        steps = len(iterable) if hasattr(iterable, "__len__") else None
        return _cached_steps(bar, caches, steps) if caches else bar

    # ------------------------------------------------------------------ user-facing extras
    @contextlib.contextmanager
    def using(self, slot: str, model: torch.nn.Module):
        """Run with `model` in `slot` for the duration (a trainer samples with the denoiser it is training,
        which may be wrapped or carry a LoRA); the slot's own model is put back afterwards."""
        if slot not in self.model_slots:
            raise ConfigError(f"no model slot {slot!r}; slots: {list(self.model_slots)}")
        original = getattr(self, slot)
        setattr(self, slot, model)
        try:
            yield self
        finally:
            setattr(self, slot, original)

    def load_lora(
        self,
        path,
        scale: float = 1.0,
        fuse: bool | None = None,
        slot: str = "dit",
        name: str | None = None,
        **diffsynth,
    ):
        """Apply a LoRA (a file, a `ModelConfig` naming one, a state dict or `LoRAWeights`) to one model (the
        denoiser by default), fused into its weights or, with `fuse=False`, kept apart under `name` (returned):
        `pipe.set_lora_scale(name, scale)` changes its strength (0: off), `pipe.list_loras()` lists them and
        `pipe.clear_loras()` removes them, on every model the file reached (a FLUX.1 file's text encoders too).
        By default fused (`default_lora_fuse`), except into weights the VRAM manager stores in fp8, where most of
        the change would round away: there it is kept apart (`fuse=True` fuses anyway, with a warning). A DoRA
        fused onto layers another fused LoRA changed depends on the order of loading (a warning says so).
        DiffSynth-Studio's form `load_lora(pipe.dit,
        lora_config, alpha=1, hotload=None)` is accepted too: the model names the slot, `alpha` is the scale and
        `hotload=True` keeps it apart; `hotload=None` keeps it apart when the model is under VRAM management (as
        Studio does, so its `clear_lora()` restores the base model), else `fuse=None`'s default."""
        if isinstance(path, torch.nn.Module):
            path, scale, fuse, slot = self._diffsynth_lora_call(path, scale, fuse, slot, diffsynth)
        elif diffsynth:
            raise TypeError(f"load_lora() got unexpected keyword arguments {sorted(diffsynth)}")
        if fuse is None:
            fuse = self.default_lora_fuse(slot) and not self._fp8_keeps_lora_apart(slot)
        return self.apply_lora(lora_file(path), scale, fuse, slot, name)

    def _fp8_keeps_lora_apart(self, slot: str) -> bool:
        """Whether a LoRA loaded without `fuse` stays apart because the slot's VRAM manager stores fp8 weights: a
        LoRA's change is mostly below an fp8 step, so fused it would largely vanish."""
        from .lora import stores_fp8

        if not stores_fp8(self.vram_handles.get(slot)):
            return False
        logger.info("%s: a LoRA is kept apart (not fused): its VRAM manager stores the weights in fp8", slot)
        return True

    def default_lora_fuse(self, slot: str) -> bool:
        """Whether `load_lora` fuses a LoRA into the model in `slot` when not told (yes: no cost per step)."""
        return True

    def _diffsynth_lora_call(self, module: torch.nn.Module, second, third, fourth, given: dict) -> tuple:
        """(source, scale, fuse, slot) of DiffSynth-Studio's `load_lora(module, lora_config, alpha, hotload,
        state_dict=, verbose=)`, whose positional values arrive in our `scale`, `fuse`, `slot` places."""
        unknown = sorted(set(given) - {"lora_config", "alpha", "hotload", "state_dict", "verbose"})
        if unknown:
            raise TypeError(f"load_lora() got unexpected keyword arguments {unknown}")
        slots = [s for s in self.model_slots if getattr(self, s, None) is module]
        if not slots:
            raise ConfigError(
                f"load_lora({type(module).__name__}, ...): that module is none of this pipeline's models "
                f"(slots: {list(self.model_slots)}); pass pipe.dit, or a file with slot="
            )
        positional_number = isinstance(third, (int, float)) and not isinstance(third, bool)
        source = given.get("lora_config", None if isinstance(second, (int, float)) else second)
        if source is None:
            source = given.get("state_dict")
        if source is None:
            raise ConfigError("load_lora(module, lora_config): give the LoRA file or ModelConfig (or state_dict=)")
        alpha = given.get("alpha", third if positional_number else 1.0)
        hotload = given.get("hotload", fourth if isinstance(fourth, bool) else None)
        if hotload is None and self.vram_managed(slots[0]):
            hotload = True  # Studio hot-loads onto VRAM-managed modules; a fused LoRA would outlive clear_lora()
        return source, float(alpha), None if hotload is None else not hotload, slots[0]

    def vram_managed(self, slot: str) -> bool:
        """Whether the model in `slot` is under VRAM management (DiffSynth-Studio's `vram_management_enabled`):
        it has a VRAM handle, or its `ModelConfig` carries VRAM keys (offload_dtype, offload_device, ...)."""
        if self.vram_handles.get(slot) is not None:
            return True
        config = self.model_configs.get(slot)
        return config is not None and any(v is not None for v in config.vram_config().values())

    def apply_lora(self, source, scale: float, fuse: bool, slot: str, name: str | None):
        """`load_lora` once its arguments are ours (`source`: a path, state dict or `LoRAWeights`); a family
        whose LoRAs reach several models overrides this."""
        from .lora import load_lora

        model = getattr(self, slot, None)
        if model is None:
            raise ConfigError(f"no model in slot {slot!r}; slots: {list(self.model_slots)}")
        from .controlnet import ControlNetSlot

        if isinstance(model, ControlNetSlot):  # a LoRA trained on a ControlNet names the net's own layers
            if len(model) != 1:
                raise ConfigError(
                    f"slot {slot!r} holds {len(model)} ControlNets; a LoRA goes onto one: load it with "
                    "diffsynth.runtime.lora.load_lora(pipe.controlnets()[i], file)"
                )
            model = model.nets[0]
        path = self.read_lora(source, slot)
        handle = self.vram_handles.get(slot)
        if fuse and handle is not None:  # streamed / fp8 weights: fuse into the real values, stored back
            with handle.materialized():
                return load_lora(model, path, scale=scale, fuse=True, name=name)
        # a fused LoRA marks the weights it changes: disk offload enabled later keeps them (`lora._fuse`)
        return load_lora(model, path, scale=scale, fuse=bool(fuse), name=name)

    def read_lora(self, path, slot: str = "dit"):
        """The LoRA at `path` as `LoRAWeights` for the model in `slot`. The common layouts are read here;
        a family whose LoRAs also come in its own key layouts (split or fused projections, other names)
        overrides this to convert them to its module names."""
        from .lora import read_lora

        return read_lora(path)

    def clear_loras(self, slot: str = "dit") -> None:
        from .lora import clear_loras

        clear_loras(getattr(self, slot))

    def clear_lora(self, verbose: int = 1) -> None:
        """DiffSynth-Studio's name: remove the LoRAs kept apart (`fuse=False`, its `hotload`) from every model."""
        from .lora import clear_loras

        for model in self._lora_models():
            clear_loras(model)

    def _lora_models(self):
        """Every model of the pipeline a LoRA may sit on, one per slot."""
        for slot in self.model_slots:
            model = getattr(self, slot, None)
            if isinstance(model, torch.nn.Module):
                yield model

    def list_loras(self) -> dict[str, float]:
        """The LoRAs kept apart (`load_lora(..., fuse=False)`) on any model of the pipeline: name -> scale."""
        from .lora import list_loras

        found: dict[str, float] = {}
        for model in self._lora_models():
            for name, scale in list_loras(model).items():
                found.setdefault(name, scale)
        return found

    def set_lora_scale(self, name: str, scale: float) -> None:
        """Set the strength of the LoRA kept apart as `name` on every model it reached (a FLUX.1 file's DiT and
        text encoders alike); 0 switches it off without removing it. An unknown name is a `LoRAError`."""
        from .errors import LoRAError
        from .lora import list_loras, set_lora_scale

        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
            raise ConfigError(f"set_lora_scale({name!r}, {scale!r}): the scale must be a finite number")
        holders = [model for model in self._lora_models() if name in list_loras(model)]
        if not holders:
            raise LoRAError(f"no LoRA kept apart is named {name!r}; loaded: {preview(list(self.list_loras()))}")
        for model in holders:
            set_lora_scale(model, name, float(scale))

    def enable_first_block_cache(self, threshold: float = 0.05, slots: Iterable[str] | None = None) -> dict:
        """Skip the denoisers' later blocks on steps where the first block's residual changed by at most
        `threshold` (relative mean absolute change; 0.05 to 0.2 are usual, higher is faster and looser).
        Applies to every model in `slots` (default: all) that supports it; returns the caches by slot,
        whose `calls` / `skipped` counts tell what the last run reused."""
        from .step_cache import FirstBlockCache

        chosen = self._cache_slots(slots)
        models = {s: m for s in chosen if hasattr(m := getattr(self, s, None), "step_cache")}
        if not models:
            raise ConfigError(f"{type(self).__name__}: no model in {chosen} supports the first-block cache")
        for model in models.values():
            model.step_cache = FirstBlockCache(threshold)
        return {slot: model.step_cache for slot, model in models.items()}

    def enable_tea_cache(
        self,
        threshold: float,
        model_id: str | None = None,
        coefficients: Sequence[float] | None = None,
        slots: Iterable[str] | None = None,
    ) -> dict:
        """TeaCache (DiffSynth-Studio's `tea_cache_l1_thresh` / `tea_cache_model_id`): skip every block
        of a denoiser call while the accumulated, rescaled change of its modulated input stays below
        `threshold` (FLUX.1: 0.25 to 0.8, Wan: 0.05 to 0.3; higher is faster and looser). `model_id` picks the
        rescaling polynomial the model declares (`tea_cache_coefficients`; needed where it declares
        several), `coefficients` gives one directly (highest power first). Returns the caches by slot."""
        from .step_cache import TeaCache

        chosen = self._cache_slots(slots)
        models = {
            s: m
            for s in chosen
            if hasattr(m := getattr(self, s, None), "step_cache") and hasattr(m, "tea_cache_coefficients")
        }
        if not models:
            cacheable = [s for s in chosen if hasattr(getattr(self, s, None), "step_cache")]
            fallback = (
                f"enable_first_block_cache works for {cacheable}"
                if cacheable
                else "none supports enable_first_block_cache either"
            )
            raise ConfigError(
                f"{type(self).__name__}: no model in {chosen} supports TeaCache (FLUX.1's and Wan's DiTs do; "
                f"{fallback})"
            )
        caches = {
            slot: TeaCache(threshold, _tea_cache_coefficients(model, model_id, coefficients))
            for slot, model in models.items()
        }
        for slot, cache in caches.items():
            models[slot].step_cache = cache
        return caches

    @contextlib.contextmanager
    def tea_cache_for_call(self, threshold: float, model_id: str | None = None):
        """TeaCache for what runs inside (one generation); the step caches set before come back after."""
        saved = {s: m.step_cache for s in self.model_slots if hasattr(m := getattr(self, s, None), "step_cache")}
        self.enable_tea_cache(threshold, model_id)
        try:
            yield
        finally:
            for slot, cache in saved.items():
                getattr(self, slot).step_cache = cache

    def _cache_slots(self, slots: Iterable[str] | None) -> list[str]:
        chosen = list(self.model_slots) if slots is None else list(slots)
        unknown = [s for s in chosen if s not in self.model_slots]
        if unknown:
            raise ConfigError(f"unknown model slot(s) {unknown}; slots: {list(self.model_slots)}")
        return chosen

    def enable_parallel(self, sequence: int | None = None, batch: int = 1):
        """Divide each denoiser call over the torchrun ranks: `batch` ranks share a call's samples (CFG
        parallelism: positive and negative halves), `sequence` ranks its tokens (Ulysses; default: the
        ranks `batch` leaves). Every rank runs the same script and gets the same result (save it on rank
        0). Returns this rank's `ParallelGroups`. See `diffsynth.runtime.parallel`."""
        from .parallel import init_parallel, register_parallel_models

        # a model divides its calls when it holds a `parallel` attribute; refused before any process group forms
        models = [getattr(self, s) for s in self.model_slots if hasattr(getattr(self, s, None), "parallel")]
        if not models:
            raise ConfigError(
                f"{type(self).__name__}: no model of this pipeline supports parallel sampling (neither sequence "
                "nor batch (CFG) parallelism): sample in one process, without enable_parallel / use_usp / "
                "--sequence-parallel / --cfg-parallel"
            )
        groups = init_parallel(sequence, batch)
        local = int(os.environ.get("LOCAL_RANK", 0))
        if self.device.type == "cuda" and self.cuda_index != local:
            raise ConfigError(
                f"rank {local} holds its models on {self.device}: load the pipeline with device='cuda:{local}' "
                "(or from_pretrained(..., use_usp=True)) so that every rank uses its own GPU"
            )
        for model in models:
            model.parallel = groups
        register_parallel_models(models)
        return groups

    def disable_parallel(self) -> None:
        """Run every denoiser call whole on this rank again (after `enable_parallel`); nothing to do when parallel
        sampling is off. The process group and its communicators stay, for a later `enable_parallel`."""
        for slot in self.model_slots:
            model = getattr(self, slot, None)
            if hasattr(model, "parallel"):
                model.parallel = None

    def samples_in_parallel(self) -> bool:
        """Whether a model of this pipeline divides its calls now (`enable_parallel`, not undone): only then do the
        ranks share an unseeded call's seed, which every rank must draw together."""
        models = (getattr(self, slot, None) for slot in self.model_slots)
        return any(getattr(model, "parallel", None) is not None for model in models)

    def disable_first_block_cache(self) -> None:
        from .step_cache import FirstBlockCache

        self._disable_caches(FirstBlockCache)

    def disable_tea_cache(self) -> None:
        from .step_cache import TeaCache

        self._disable_caches(TeaCache)

    def _disable_caches(self, kind: type) -> None:
        for slot, cache in self.step_caches().items():
            if isinstance(cache, kind):
                getattr(self, slot).step_cache = None

    def step_caches(self) -> dict:
        """The enabled step caches by model slot."""
        caches = {}
        for slot in self.model_slots:
            cache = getattr(getattr(self, slot, None), "step_cache", None)
            if cache is not None:
                caches[slot] = cache
        return caches

    def compile(self, slot: str = "dit", **compile_kwargs) -> None:
        """Regional torch.compile: compile each repeated block once instead of the whole model (its
        `compile_units`); a model that declares none is compiled whole."""
        model = getattr(self, slot, None) if slot in self.model_slots else None
        if not isinstance(model, torch.nn.Module):
            loaded = [s for s in self.model_slots if isinstance(getattr(self, s), torch.nn.Module)]
            raise ConfigError(f"compile: slot {slot!r} holds no loaded model; loaded: {loaded}")
        if slot in self.vram_handles:  # streaming hooks must stay outside the traced graphs
            self.vram_handles[slot].prepare_for_compile()
        units = getattr(model, "compile_units", ())
        if not units:
            model.compile(**compile_kwargs)
        for path in units:
            module = model.get_submodule(path)
            blocks = module if isinstance(module, (torch.nn.ModuleList, torch.nn.Sequential)) else [module]
            for block in blocks:
                block.compile(**compile_kwargs)
        logger.info("%s compiled (%s)", slot, f"{len(units)} block lists" if units else "whole")

    def compile_pipeline(
        self,
        mode: str = "default",
        dynamic: bool = True,
        fullgraph: bool = False,
        compile_models: Sequence[str] | None = None,
        **kwargs,
    ) -> None:
        """DiffSynth-Studio's entry: `compile` for each of `compile_models` (default: the denoiser slots that
        hold a model), with torch.compile's `mode`, `dynamic`, `fullgraph` and other keywords."""
        slots = list(compile_models) if compile_models is not None else self.denoiser_slots()
        for slot in slots:
            self.compile(slot, mode=mode, dynamic=dynamic, fullgraph=fullgraph, **kwargs)

    def denoiser_slots(self) -> list[str]:
        """The slots of the models run at every sampling step that hold one (`dit`, and Wan 2.2's `dit2`)."""
        return [s for s in ("dit", "dit2") if s in self.model_slots and isinstance(getattr(self, s), torch.nn.Module)]


def _cached_steps(bar, caches, steps: int | None):
    """Iterate the loop, opening a step on each cache per iteration (and the loop around them)."""
    for cache in caches:
        cache.begin_loop(steps)
    try:
        for item in bar:
            for cache in caches:
                cache.begin_step()
            yield item
    finally:
        for cache in caches:
            cache.end_loop()


def call_keywords(pipeline) -> set[str] | None:
    """The keyword arguments a pipeline's call takes (a pipeline class or object); None when it takes any
    (`**kwargs`). Lets a prompts file's settings be checked before any model loads."""
    parameters = inspect.signature(pipeline.__call__).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters}


def weight_paths(config: ModelConfig) -> list[str]:
    """The weight files (and weight folders) a `ModelConfig` resolves to. Files named by `path=` are all kept: a
    shard index (`*.index.json`) stands for its shards, and any other file is refused by name; a hub pattern's
    matches are filtered to the weight files (a repo folder also holds configs and READMEs)."""
    from .checkpoint import INDEX_SUFFIX, shards_not_given, weight_files

    paths = config.resolve()
    if config.path is None:
        return [p for p in paths if p.endswith(WEIGHT_SUFFIXES) or Path(p).is_dir()]
    paths = [str(p) for p in paths]
    for p in paths:
        if not (p.endswith(WEIGHT_SUFFIXES + (INDEX_SUFFIX,)) or Path(p).is_dir()):
            raise ConfigError(
                f"ModelConfig(path=...): {p} is not a weight file; give {', '.join(WEIGHT_SUFFIXES)} files, a "
                f"shard index (*{INDEX_SUFFIX}) or a folder holding them"
            )
    left_out = shards_not_given(weight_files(paths))
    if left_out:
        folder = Path(left_out[0]).parent
        raise ConfigError(
            f"ModelConfig(path=...) gives part of a sharded checkpoint: shard {Path(left_out[0]).name!r} is not "
            f"among {preview(paths, 3)} (left out: {preview(Path(p).name for p in left_out)}); pass the folder "
            f"{folder}, its *{INDEX_SUFFIX}, or every shard"
        )
    return paths


def lora_file(source, what: str = "the LoRA's ModelConfig"):
    """A `ModelConfig` naming one LoRA file, or a hub name (`hub_lora`) -> that file's path (fetched if needed);
    anything else as given."""
    if isinstance(source, (str, os.PathLike)) and (hub := hub_lora(str(source))) is not None:
        try:
            return lora_file(hub, f"the LoRA {str(source)!r}")
        except CheckpointError as error:
            raise ConfigError(f"LoRA {str(source)!r} is no local file, nor found on the hub: {error}") from None
    if not isinstance(source, ModelConfig):
        return source
    files = [p for p in source.resolve() if p.endswith(WEIGHT_SUFFIXES)]
    if len(files) != 1:
        names = [os.path.relpath(p, source.local_folder) if source.model_id else p for p in files]
        hint = f"; name one: {source.model_id}/<file>" if source.model_id and files else "; name one"
        raise ConfigError(f"{what} resolves to {len(files)} weight files {names}{hint}")
    return files[0]


def hub_lora(text: str) -> ModelConfig | None:
    """A LoRA named by its hub repo: "Org/Name" (the repo's one `.safetensors` file) or "Org/Name/path/file"
    (that file), for a name that is no local path; None for anything else."""
    if os.path.exists(text) or text.startswith((".", "/", "~")) or "\\" in text or ":" in text:
        return None
    parts = text.split("/")
    if len(parts) == 2 and all(parts) and not text.endswith(WEIGHT_SUFFIXES):
        return ModelConfig(model_id=text, origin_file_pattern="*.safetensors")
    if len(parts) > 2 and all(parts) and text.endswith(WEIGHT_SUFFIXES):
        return ModelConfig(model_id="/".join(parts[:2]), origin_file_pattern="/".join(parts[2:]))
    return None


def accepts_tea_cache(method):
    """For a pipeline's `__call__` that takes DiffSynth-Studio's `tea_cache_l1_thresh` (and, where the
    model declares several polynomials, `tea_cache_model_id`): TeaCache for that call only. A model id without
    a threshold is refused (it would do nothing)."""
    signature = inspect.signature(method)

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        from .step_cache import TeaCache, check_threshold

        arguments = signature.bind(self, *args, **kwargs).arguments
        threshold = arguments.get("tea_cache_l1_thresh")
        model_id = arguments.get("tea_cache_model_id") or None
        if threshold is None:
            if model_id is not None:
                raise ConfigError(
                    f"tea_cache_model_id={model_id!r} picks TeaCache's polynomial, but TeaCache is off without "
                    "tea_cache_l1_thresh: give tea_cache_l1_thresh=THRESHOLD with it, or leave both out"
                )
            return method(self, *args, **kwargs)
        threshold = check_threshold("TeaCache", threshold, TeaCache.usual, "tea_cache_l1_thresh")
        with self.tea_cache_for_call(threshold, model_id):
            return method(self, *args, **kwargs)

    return call


def _tea_cache_coefficients(model, model_id: str | None, coefficients: Sequence[float] | None) -> Sequence[float]:
    """The rescaling polynomial for `model`: `coefficients`, else its table's entry for `model_id` (or its only one)."""
    if coefficients is not None:
        return coefficients
    table = model.tea_cache_coefficients
    ids = ", ".join(table)
    if model_id is None:
        if len(table) == 1:
            return next(iter(table.values()))
        raise ConfigError(f"{type(model).__name__}: TeaCache needs a model id (tea_cache_model_id), one of: {ids}")
    if model_id not in table:
        raise ConfigError(
            f"tea_cache_model_id={model_id!r} is not a TeaCache model id of {type(model).__name__}; use one of: {ids}"
        )
    return table[model_id]


def configs_from_folder(folder: Path) -> tuple[list[ModelConfig], ModelConfig | None]:
    """ModelConfigs for each subfolder (or the folder itself) that holds weight files, as `checkpoint.folder_weights`
    picks them (an index's shards, not the consolidated file beside them; .safetensors over a .bin of one model)."""
    from .checkpoint import folder_weights

    configs: list[ModelConfig] = []
    tokenizer = None
    candidates = [folder] + sorted(p for p in folder.iterdir() if p.is_dir())
    for sub in candidates:
        weights = folder_weights(sub)
        if weights:
            configs.append(ModelConfig(path=weights))
        if sub != folder and (sub / "tokenizer_config.json").exists():
            tokenizer = ModelConfig(path=str(sub))
    if not configs:
        listing = preview(sorted(p.name for p in folder.iterdir()))
        raise ConfigError(f"{folder} holds no weight files ({', '.join(WEIGHT_SUFFIXES)}); it contains {listing}")
    return configs, tokenizer


def preset_sources(preset) -> tuple[list[ModelConfig], ModelConfig | None, dict[str, Any]]:
    """A preset's model configs, tokenizer config and generation defaults: its hub files, or the folder
    shipped with its package (loaded like any local folder, its `diffsynth.json` under the preset's defaults)."""
    configs: list[ModelConfig] = []
    tokenizer = None
    defaults: dict[str, Any] = {}
    if preset.folder is not None:
        folder = Path(preset.folder)
        if not folder.is_dir():
            raise ConfigError(f"preset {preset.name!r}: its model folder {folder} is missing; reinstall its package")
        configs, tokenizer = configs_from_folder(folder)
        defaults = folder_defaults(folder)
    configs += [ModelConfig(model_id=f.model_id, origin_file_pattern=f.origin_file_pattern) for f in preset.files]
    if tokenizer is None and preset.tokenizer is not None:
        tokenizer = ModelConfig(
            model_id=preset.tokenizer.model_id, origin_file_pattern=preset.tokenizer.origin_file_pattern
        )
    return configs, tokenizer, {**defaults, **preset.defaults}


def source_defaults(pipeline_cls: type[BasePipeline], model_configs: Sequence[ModelConfig]) -> dict[str, Any]:
    """The generation defaults `from_pretrained` would have taken for models given as `ModelConfig`s: those of
    the first config whose hub repo is one of the family's presets, or of the `diffsynth.json` in the folder of a
    config's files (or one folder up, a hub-style model folder). Used where a pipeline is built from the configs a
    preset or folder expanded to (the trainer), so its samples keep the model's own steps and guidance."""
    for config in model_configs:
        if config.model_id is not None:
            try:
                return preset_sources(pipeline_cls._preset(config.model_id))[2]
            except ConfigError:
                pass
        for path in [config.path] if isinstance(config.path, (str, os.PathLike)) else list(config.path or ()):
            for folder in (Path(path).parent, Path(path).parent.parent):
                if (folder / "diffsynth.json").is_file():
                    return folder_defaults(folder)
    return {}


def studio_defaults(pipeline_cls: type[BasePipeline], model_configs: Sequence[ModelConfig]) -> dict[str, Any]:
    """The generation defaults of a load given as hub `ModelConfig`s only (DiffSynth-Studio's way): those of the one
    preset whose repo is among them and which loads from every repo they name (FLUX.1-schnell's own files, Flex.2's
    with FLUX.1-dev's encoders), so the model samples with its own steps and shift as under its preset name. A local
    file, or a repo no such preset loads from (an adapter, another model's DiT), may change the model: none then."""
    if not model_configs or any(config.model_id is None for config in model_configs):
        return {}
    repos = {config.model_id.lower() for config in model_configs}
    matches = []
    for repo in sorted(repos):
        try:
            preset = pipeline_cls._preset(repo)
        except ConfigError:  # not a preset, or one needing another pipeline class
            continue
        if repos <= {preset.name.lower(), *(file.model_id.lower() for file in preset.files)}:
            matches.append(preset)
    return preset_sources(matches[0])[2] if len(matches) == 1 else {}


def folder_defaults(folder: Path) -> dict[str, Any]:
    """Generation defaults a local folder may carry in `diffsynth.json` (e.g. the bundled demo model)."""
    import json

    path = folder / "diffsynth.json"
    return dict(json.loads(path.read_text()).get("defaults", {})) if path.exists() else {}


def _quantized_because(recorded, config: ModelConfig | None) -> str:
    """Why a loaded model is quantized, for messages: a GGUF file, a file saved quantized, or its config."""
    from .gguf import GGUFQuantization

    where = describe_config(config) if config is not None else "its file"
    if isinstance(recorded, GGUFQuantization):
        return f"{where} is a GGUF file, whose Linears stay packed as stored ({', '.join(recorded.types)})"
    method = getattr(recorded, "method", type(recorded).__name__)
    if config is not None and config.quantize is not None:
        return f"{where} asks for quantize ({method})"
    return f"{where} was saved quantized ({method}) and loads prequantized"


def describe_config(config: ModelConfig) -> str:
    """A `ModelConfig` as messages name it: its path, or its repo and file pattern."""
    if config.path is not None:
        return f"ModelConfig(path={config.path!r})"
    return f"ModelConfig(model_id={config.model_id!r}, origin_file_pattern={config.origin_file_pattern!r})"


def fetch_companion_config(config: ModelConfig) -> None:
    """Fetch the `config.json` beside a model's weights (in the folder of each of its patterns) when they come from
    a hub repo. Called after the weights were resolved: when they were all found locally, the config is looked for
    locally only (a folder filled once loads offline; without the config, shapes decide)."""
    if config.model_id is None or config.path is not None:
        return
    folders = dict.fromkeys(os.path.dirname(p) for p in config._patterns() if not p.endswith("/"))
    for folder in filter(None, folders):
        companion = ModelConfig(
            model_id=config.model_id,
            origin_file_pattern=f"{folder}/config.json",
            download_source=config.download_source,
            local_model_path=config.local_model_path,
            skip_download=config.skip_download or not config._downloaded,
        )
        try:
            companion.resolve()
        except Exception as exc:  # the config is optional: shapes decide when it is absent
            logger.info("no %s/config.json for %s (%s); deriving the config from shapes", folder, config.model_id, exc)
