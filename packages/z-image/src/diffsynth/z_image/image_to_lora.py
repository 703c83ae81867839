"""Z-Image-i2L (DiffSynth-Studio/Z-Image-i2L, Z-Image-Omni-Base-i2L): a style LoRA for Z-Image from images.

One LoRA generator per block list of the Z-Image DiT (`diffsynth.runtime.models.lora_generator`): the 30
`layers`, the 2 `context_refiner` and the 2 `noise_refiner` blocks, each covering a block's attention
projections and SwiGLU Linears (7 a block), rank 4 per image, from the SigLIP2-G384 + DINOv3-7B features alone.
Files use the released key names (`layers_lora.blocks.{i}.layers.{j}.proj_a.proj_in.weight`, ...).

`ZImageI2LPipeline` holds the encoders and the generator; `image_to_lora(images)` returns the LoRA in the DiT's
names (`layers.N.attention.to_q.lora_A.weight`, ...). The authors apply it to the positive branch of guidance
only: `ZImagePipeline(..., positive_only_lora=lora)` (with Z-Image's base model, CFG 4, sigma shift 8, as their
example); `load_lora(lora)` applies it to both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import ClassVar

import torch
from torch import nn

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.image_to_lora import GENERATOR_ROLE, ImageToLoRAPipeline
from diffsynth.runtime.models.lora_generator import LoRAGenerator, TargetLinear
from diffsynth.runtime.registry import KeyLayout, ModelSpec, StateDict, build_config, merge_fields

from .presets import I2L_PRESETS

# the DiT's block lists, in the released order: (our generator attribute, the DiT's block list)
BLOCK_LISTS = (
    ("layers_lora", "layers"),
    ("context_refiner_lora", "context_refiner"),
    ("noise_refiner_lora", "noise_refiner"),
)


@dataclass
class ZImageI2LConfig:
    """The Z-Image-i2L generator; defaults are the released model."""

    num_layers: int = 30  # DiT main blocks
    num_refiner_layers: int = 2  # DiT context / noise refiner blocks each
    dim: int = 3840  # DiT width
    ffn_dim: int = 10240  # DiT SwiGLU width
    features: int = 1536 + 4096  # SigLIP2-G384 + DINOv3-7B
    compress_dim: int = 128
    rank: int = 4

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ZImageI2LConfig.{f.name}={value!r} must be a positive integer")

    def groups(self) -> list[list[TargetLinear]]:
        """The Linears of a DiT block it makes LoRAs for: attention, then the SwiGLU."""
        d, h = self.dim, self.ffn_dim
        return [
            [TargetLinear(f"attention.{n}", d, d) for n in ("to_q", "to_k", "to_v", "to_out.0")],
            [
                TargetLinear("feed_forward.w1", d, h),
                TargetLinear("feed_forward.w2", h, d),
                TargetLinear("feed_forward.w3", d, h),
            ],
        ]


class ZImageI2L(nn.Module):
    """The Z-Image-i2L generator: `forward(features [N, 5632])` -> the LoRA of all three block lists."""

    offload_units = tuple(f"{name}.blocks" for name, _ in BLOCK_LISTS)

    def __init__(self, config: ZImageI2LConfig | None = None):
        super().__init__()
        self.config = config = config or ZImageI2LConfig()
        for name, prefix in BLOCK_LISTS:
            count = config.num_layers if prefix == "layers" else config.num_refiner_layers
            generator = LoRAGenerator(prefix, config.groups(), count, config.features, config.compress_dim, config.rank)
            setattr(self, name, generator)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """`x` `[N, features]`; no generator reads a residual (accepted and ignored, as the authors' class)."""
        lora = {}
        for name, _ in BLOCK_LISTS:
            lora.update(getattr(self, name)(x))
        return lora


# ----------------------------------------------------------------------------------- formats
_BLOCK = re.compile(r"^(layers_lora|context_refiner_lora|noise_refiner_lora)\.blocks\.(\d+)\.")
_HEAD = "layers_lora.blocks.0.layers.0"
SIGNATURE = (
    f"{_HEAD}.proj_a.proj_in.weight",
    f"{_HEAD}.proj_a.proj_out.weight",
    f"{_HEAD}.proj_b.proj_out.weight",
    "context_refiner_lora.blocks.0.layers.0.proj_a.proj_in.weight",
    "noise_refiner_lora.blocks.0.layers.0.proj_a.proj_in.weight",
)
LAYOUTS = (KeyLayout("diffsynth_studio", SIGNATURE, owns_prefixes=tuple(f"{n}." for n, _ in BLOCK_LISTS)),)


def config_from_state(state: StateDict, config_json: dict | None = None) -> ZImageI2LConfig:
    """Block counts and widths from the shapes; `rank` (which the shapes only give times the DiT widths) from the
    json or the released 4."""
    names = {f.name for f in fields(ZImageI2LConfig)}
    given = {k: v for k, v in (config_json or {}).items() if k in names}
    derived: dict = {}
    if state:
        counts: dict[str, int] = {}
        for key in state:
            if m := _BLOCK.match(key):
                counts[m.group(1)] = max(counts.get(m.group(1), 0), int(m.group(2)) + 1)
        groups = len(ZImageI2LConfig(dim=1, ffn_dim=1).groups())
        blocks = {name: counts.get(name, 0) // groups for name, _ in BLOCK_LISTS}
        uneven = any(counts.get(name, 0) % groups for name, _ in BLOCK_LISTS)
        if uneven or blocks["context_refiner_lora"] != blocks["noise_refiner_lora"]:
            raise ConfigError(f"Z-Image-i2L block counts {counts} are not {groups} groups of the DiT's block lists")
        rank = int(given.get("rank", ZImageI2LConfig.rank))
        compress, features = state[f"{_HEAD}.proj_a.proj_in.weight"].shape
        dim, left = divmod(state[f"{_HEAD}.proj_a.proj_out.weight"].shape[0], rank)
        w1_up = f"layers_lora.blocks.{blocks['layers_lora']}.layers.0.proj_b.proj_out.weight"  # first SwiGLU head
        ffn, left_ffn = divmod(state[w1_up].shape[0], rank)
        if left or left_ffn:
            raise ConfigError(f"Z-Image-i2L: head widths are not multiples of rank={rank}")
        derived = dict(
            num_layers=blocks["layers_lora"],
            num_refiner_layers=blocks["context_refiner_lora"],
            dim=dim,
            ffn_dim=ffn,
            features=features,
            compress_dim=compress,
        )
    return build_config(ZImageI2LConfig, "Z-Image-i2L", merge_fields("Z-Image-i2L", given, derived))


I2L_SPEC = ModelSpec(
    name="z_image_i2l",
    role=GENERATOR_ROLE,
    layouts=LAYOUTS,
    config_from_state=config_from_state,
    build=ZImageI2L,
    description="Z-Image-i2L style generator (DiffSynth-Studio/Z-Image-i2L, Z-Image-Omni-Base-i2L)",
)


# ----------------------------------------------------------------------------------- pipeline
class ZImageI2LPipeline(ImageToLoRAPipeline):
    """Image to LoRA for Z-Image: `ZImageI2LPipeline.from_pretrained("DiffSynth-Studio/Z-Image-i2L")`, then
    `lora = pipe.image_to_lora(images)`."""

    family = "z_image_i2l"
    model_slots: ClassVar[dict[str, str]] = {**ImageToLoRAPipeline.model_slots, "image2lora_style": GENERATOR_ROLE}
    generator_slots = ("image2lora_style",)
    optional_slots = generator_slots
    presets = I2L_PRESETS
    dit_pipeline = "ZImagePipeline (positive_only_lora=lora, as the authors use it)"

    def model_specs(self):
        return (*super().model_specs(), I2L_SPEC)


__all__ = ["I2L_SPEC", "ZImageI2L", "ZImageI2LConfig", "ZImageI2LPipeline", "config_from_state"]
