"""Image to LoRA (DiffSynth-Studio's "i2L"): the pipeline part the families share.

An i2L pipeline holds the two general image encoders (`models/image_encoders.py`) and the family's LoRA
generators (`models/lora_generator.py`), and makes a LoRA for the family's DiT from a few images in one pass:

1. each image is scaled to cover 1024x1024 and center-cropped (bilinear, DiffSynth-Studio's `ImageCropAndResize`);
2. its features are SigLIP2-G384's pooled output and DINOv3-7B's CLS token, side by side (5632 wide);
3. every loaded generator makes each image's LoRA (a family may feed a generator more, e.g. Qwen-Image-i2L
   Coarse/Fine read the text encoder's view of the image: `residuals`);
4. all of them are merged by concatenating ranks, each image's down matrices weighted 1/len(images) (the mean of
   the images' deltas, summed over the generators), then a bias LoRA, if any, is appended at weight 1.

The result is a state dict `<module>.lora_A.weight` / `<module>.lora_B.weight` in the DiT's module names, what
`pipe.load_lora` reads (and DiffSynth-Studio's and peft's loaders); `safetensors.torch.save_file` saves it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import ClassVar

import torch
from PIL import Image

from .errors import ConfigError, LoRAError, preview
from .hub import ModelConfig
from .media import load_image
from .pipeline import BasePipeline, fetch_companion_config, lora_file, weight_paths
from .registry import ModelSpec, Preset, PresetFile
from .vram import module_dtype

logger = logging.getLogger(__name__)

GENERATOR_ROLE = "image_to_lora"  # the spec role of every family's i2L model
CROP_SIZE = 1024  # what the encoders are shown (each then resizes to its own input size)


def crop_resize(image: Image.Image, height: int, width: int) -> Image.Image:
    """`image` scaled (bilinear) to cover `width x height`, then its center cut out; the rounding is torchvision's,
    which DiffSynth-Studio's `ImageCropAndResize` uses."""
    scale = max(width / image.width, height / image.height)
    size = (round(image.width * scale), round(image.height * scale))
    scaled = image.resize(size, Image.BILINEAR)
    left, top = int(round((size[0] - width) / 2.0)), int(round((size[1] - height) / 2.0))
    return scaled.crop((left, top, left + width, top + height))


def checked_images(images) -> list[Image.Image]:
    """One image or a list (PIL images or paths) as RGB PIL images; at least one."""
    items = list(images) if isinstance(images, (list, tuple)) else [] if images is None else [images]
    if not items:
        raise ConfigError("image_to_lora needs at least one image (a PIL image, a path, or a list of them)")
    return [load_image(image) for image in items]


def append_lora(lora: dict[str, torch.Tensor], extra, what: str = "bias_lora") -> dict[str, torch.Tensor]:
    """`lora` with the LoRA `extra` (a file, state dict or `LoRAWeights`) appended at weight 1 on the ranks of its
    targets (the sum of both deltas). `extra` may cover fewer targets, never others."""
    from .lora import read_lora

    weights = read_lora(extra)
    targets = {key[: -len(".lora_A.weight")] for key in lora if key.endswith(".lora_A.weight")}
    unknown = sorted(name for name in weights.targets if name not in targets)
    if unknown:
        raise LoRAError(
            f"{what} ({weights.source}) changes {len(unknown)} modules the image LoRA does not: "
            f"{preview(unknown, 4)}; it must be made for the same DiT (e.g. {preview(sorted(targets), 2)})"
        )
    out = dict(lora)
    for name, target in weights.targets.items():
        if target.down is None or target.diff is not None or target.diff_b is not None or target.magnitude is not None:
            raise LoRAError(f"{what} ({weights.source}): {name!r} is not a plain lora_A/lora_B pair")
        down_key, up_key = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
        down, up = out[down_key], out[up_key]
        if target.down.shape[1] != down.shape[1] or target.up.shape[0] != up.shape[0]:
            raise LoRAError(
                f"{what} ({weights.source}): {name!r} has down {tuple(target.down.shape)} / up "
                f"{tuple(target.up.shape)}, the image LoRA down {tuple(down.shape)} / up {tuple(up.shape)}"
            )
        extra_down = target.down if target.factor == 1.0 else target.down.float() * target.factor
        out[down_key] = torch.cat([down, extra_down.to(down.device, down.dtype)])
        out[up_key] = torch.cat([up, target.up.to(up.device, up.dtype)], dim=1)
    return out


def _preset_lora(value):
    """A bias LoRA named in a preset (`PresetFile`) as the `ModelConfig` that fetches it; anything else as given."""
    if isinstance(value, PresetFile):
        return ModelConfig(model_id=value.model_id, origin_file_pattern=value.origin_file_pattern)
    return value


class ImageToLoRAPipeline(BasePipeline):
    """Shared part of the families' i2L pipelines (see the module docstring). A family adds its generator slots
    (`generator_slots`, in merge order; their role is `GENERATOR_ROLE`), its specs, presets, and where a loaded
    generator goes (`generator_slot`)."""

    model_slots: ClassVar[dict[str, str]] = {
        "siglip2_image_encoder": "siglip2_image_encoder",
        "dinov3_image_encoder": "dinov3_image_encoder",
    }
    generator_slots: ClassVar[tuple[str, ...]] = ()
    presets: ClassVar[Mapping[str, Preset]] = {}
    dit_pipeline: ClassVar[str] = "the family's pipeline"  # named in messages
    # the `diffsynth generate` flags `run_cli` reads (dests; --prompt only to warn): the CLI refuses others
    cli_flags: ClassVar[frozenset[str]] = frozenset({"lora_image", "prompt"})

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, model_id_or_configs=None, **kwargs):
        """As `BasePipeline.from_pretrained` (a preset name, a folder or `model_configs=[ModelConfig(...)]`),
        checking that the models an image LoRA needs are all there."""
        pipe = super().from_pretrained(model_id_or_configs, **kwargs)
        pipe.check_models()
        return pipe

    @classmethod
    def _preset(cls, name: str) -> Preset:
        for key, preset in cls.presets.items():
            if key.lower() == name.lower():
                return preset
        raise ConfigError(
            f"{name!r} is neither a folder nor a known {cls.__name__} preset; presets: {preview(sorted(cls.presets))}"
        )

    def model_specs(self) -> tuple[ModelSpec, ...]:
        """The specs this pipeline's files load with: the two encoders and the family's (named explicitly: see
        `models/image_encoders.py` on why SigLIP2-G384 is not registered)."""
        from .models.image_encoders import DINOV3_SPEC, SIGLIP_SPEC

        return (SIGLIP_SPEC, DINOV3_SPEC)

    def generator_slot(self, module: torch.nn.Module) -> str:
        """The slot a loaded generator goes to (families with several kinds tell them apart by config)."""
        return self.generator_slots[0]

    def _load_into_slots(self, config: ModelConfig) -> None:
        from .loading import load_models

        paths = weight_paths(config)
        fetch_companion_config(config)
        roles = {role: slot for slot, role in self.model_slots.items() if role != GENERATOR_ROLE}
        for item in load_models(paths, torch_dtype=self.torch_dtype, device="cpu", specs=self.model_specs()):
            slot = self.generator_slot(item.module) if item.role == GENERATOR_ROLE else roles.get(item.role)
            if slot is None:
                where = config.path or f"{config.model_id}:{config.origin_file_pattern}"
                raise ConfigError(f"{where} holds a {item.role!r} model, which {type(self).__name__} does not use")
            if getattr(self, slot) is not None:
                logger.warning("%s replaces an earlier %s model", item.files, slot)
            setattr(self, slot, item.module.eval().requires_grad_(False))
            self.model_configs[slot] = config

    def check_models(self) -> list[tuple[str, torch.nn.Module]]:
        """The loaded generators as (slot, model), in merge order; an error when one is missing or an encoder is."""
        for slot in self.model_slots:
            if slot not in self.generator_slots and slot not in self.optional_slots and getattr(self, slot) is None:
                raise ConfigError(f"{type(self).__name__} has no {slot}: list its file among model_configs")
        generators = [(slot, getattr(self, slot)) for slot in self.generator_slots if getattr(self, slot) is not None]
        if not generators:
            raise ConfigError(
                f"{type(self).__name__} has no image-to-LoRA model ({', '.join(self.generator_slots)}): list its "
                f"file among model_configs, or use a preset: {preview(sorted(self.presets))}"
            )
        return generators

    # ------------------------------------------------------------------ stages
    def image_features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """`[N, 1536 + 4096]`: SigLIP2's pooled output and DINOv3's CLS features of each 1024x1024 crop."""
        crops = [crop_resize(image, CROP_SIZE, CROP_SIZE) for image in images]
        parts = []
        for slot in ("siglip2_image_encoder", "dinov3_image_encoder"):
            self.load_models_to_device([slot])
            encoder = getattr(self, slot)
            parts.append(torch.cat([encoder.encode([crop]) for crop in crops]))
        dtype = torch.promote_types(parts[0].dtype, parts[1].dtype)
        return torch.cat([p.to(dtype) for p in parts], dim=-1)

    def residuals(self, images: Sequence[Image.Image], generators) -> dict[str, torch.Tensor | None]:
        """What else each generator reads of the images (slot -> tensor, or None): nothing, by default."""
        return {slot: None for slot, _ in generators}

    @torch.no_grad()
    def image_to_lora(self, images, bias_lora=None) -> dict[str, torch.Tensor]:
        """A LoRA for the family's DiT from `images` (one image or a list; PIL images or paths).

        Every loaded i2L model makes each image's LoRA; they are merged with the images' down matrices weighted
        1/len(images), ranks concatenated. `bias_lora` (a file, `ModelConfig`, state dict; default: the preset's,
        e.g. Qwen-Image-i2L's Bias LoRA for Coarse + Fine; False: none) is appended at weight 1. Returns CPU
        tensors `<module>.lora_A.weight` / `.lora_B.weight`: `pipe.load_lora(lora)` on the DiT's pipeline, or
        `safetensors.torch.save_file(lora, path)`."""
        images = checked_images(images)
        generators = self.check_models()
        features = self.image_features(images)
        extras = self.residuals(images, generators)
        loras = []
        for slot, generator in generators:
            self.load_models_to_device([slot])
            dtype = module_dtype(generator)
            extra = extras.get(slot)
            extra = None if extra is None else extra.to(self.device, dtype)
            loras.append(generator(features.to(self.device, dtype), extra))
        self.load_models_to_device([])
        lora = _merge(loras, 1.0 / len(images))
        bias = self.setting("bias_lora", bias_lora, None)
        if bias is not None and bias is not False:
            lora = append_lora(lora, lora_file(_preset_lora(bias), "bias_lora's ModelConfig"))
        return {key: value.detach().to("cpu").contiguous() for key, value in lora.items()}

    def run_cli(self, args) -> int:
        """`diffsynth generate --model <an i2L preset> --lora-image a.jpg --lora-image b.jpg --output style.safetensors`:
        the LoRA of the images, saved as a safetensors file (`--prompt` is not read)."""
        from safetensors.torch import save_file

        if not args.lora_image:
            raise ConfigError(f"{args.model} makes a LoRA from images: give them with --lora-image (repeatable)")
        if args.prompt is not None:
            logger.warning("--prompt is not read: %s makes a LoRA from --lora-image alone", type(self).__name__)
        output = Path(args.output or "lora.safetensors")
        if output.suffix.lower() != ".safetensors":
            raise ConfigError(f"--output is the LoRA file, a .safetensors file, not {output}")
        lora = self.image_to_lora(args.lora_image)
        output.parent.mkdir(parents=True, exist_ok=True)
        save_file(lora, str(output))
        logger.info("wrote the LoRA of %d image(s) to %s (%d tensors)", len(args.lora_image), output, len(lora))
        return 0

    def __call__(self, *args, **kwargs):
        raise ConfigError(
            f"{type(self).__name__} makes LoRAs, not images: lora = pipe.image_to_lora(images), then "
            f"load_lora(lora) on {self.dit_pipeline}"
        )


def _merge(loras, down_scale: float) -> dict[str, torch.Tensor]:
    from .models.lora_generator import merge_loras

    try:
        return merge_loras(loras, down_scale)
    except ValueError as exc:
        raise ConfigError(f"the loaded image-to-LoRA models make LoRAs for different modules: {exc}") from None


__all__ = [
    "CROP_SIZE",
    "GENERATOR_ROLE",
    "ImageToLoRAPipeline",
    "append_lora",
    "checked_images",
    "crop_resize",
]
