"""Qwen-Image-i2L (DiffSynth-Studio/Qwen-Image-i2L): a LoRA for the Qwen-Image DiT made from images in one pass.

Three generators (`diffsynth.runtime.models.lora_generator`) cover the 60 blocks' image- and text-stream
attention, MLP outputs and modulations (12 Linears a block), rank 4 per image:
- Style (`Qwen-Image-i2L-Style.safetensors`): reads the SigLIP2 + DINOv3 features only (narrow width 64);
- Coarse (`-Coarse`): also the Qwen2.5-VL hidden states of a 224x224 crop of the image (71 tokens);
- Fine (`-Fine`): also those of a 1024x1024 crop (1376 tokens; its per-token width is 64).
The text encoder reads the crop with the first Qwen-Image-Edit template and an empty instruction (the template's
64 leading tokens dropped), as DiffSynth-Studio's `QwenImageUnit_Image2LoRAEncode` does; the Qwen2-VL processor of
`Qwen/Qwen-Image-Edit` (`processor/`) prepares it. The released `Qwen-Image-i2L-Bias.safetensors` is a plain LoRA
the authors append to Coarse + Fine's (the `:coarse-fine` preset's `bias_lora`).

`QwenImageI2LPipeline` holds the encoders and any of the three (DiffSynth-Studio's slot names `image2lora_style`,
`image2lora_coarse`, `image2lora_fine`) and the text encoder for the last two; `image_to_lora(images)` returns the
LoRA in the DiT's names (`transformer_blocks.N.attn.to_q.lora_A.weight`, ...), for `QwenImagePipeline.load_lora`.
Files use the released key names (`blocks.{i}.layers.{j}.proj_a.proj_in.weight`, ...); which of the three a file
is comes from its shapes (no residual reader: Style; 71 tokens: Coarse; 1376: Fine), or from `variant` in a
config.json beside it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import ClassVar

import torch

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.image_to_lora import GENERATOR_ROLE, ImageToLoRAPipeline, crop_resize
from diffsynth.runtime.models.lora_generator import LoRAGenerator, TargetLinear
from diffsynth.runtime.registry import KeyLayout, ModelSpec, StateDict, build_config, merge_fields

from .presets import I2L_PRESETS

VARIANTS = ("style", "coarse", "fine")
RESIDUAL_IMAGE_SIZES = {"coarse": 224, "fine": 1024}  # the crop the text encoder reads for each
_RELEASED_LENGTHS = {71: "coarse", 1376: "fine"}  # 8x8 / 37x37 merged patches + 7 template tokens


@dataclass
class QwenImageI2LConfig:
    """A Qwen-Image-i2L generator; defaults are Coarse (`RELEASED` has all three)."""

    variant: str = "coarse"  # "style" (no residual reader), "coarse" or "fine" (which crop the text encoder reads)
    num_blocks: int = 60  # DiT blocks
    dim: int = 3072  # DiT width
    features: int = 1536 + 4096  # SigLIP2-G384 + DINOv3-7B
    compress_dim: int = 128
    rank: int = 4
    residual_length: int = 71  # text-encoder tokens of the crop (Coarse / Fine only)
    residual_dim: int = 3584  # text-encoder width
    residual_mid_dim: int = 1024  # per-token width of the residual reader
    residual_scale: float = 0.05

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"QwenImageI2LConfig.variant={self.variant!r} must be one of {VARIANTS}")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"QwenImageI2LConfig.{f.name}={value!r} must be a positive integer")

    @property
    def reads_residual(self) -> bool:
        return self.variant != "style"

    def groups(self) -> list[list[TargetLinear]]:
        """The Linears of a DiT block it makes LoRAs for, in the released order (image attention, image MLP
        output and modulation, text attention, text MLP output and modulation)."""
        d = self.dim
        return [
            [TargetLinear(f"attn.{n}", d, d) for n in ("to_q", "to_k", "to_v", "to_out.0")],
            [TargetLinear("img_mlp.net.2", 4 * d, d), TargetLinear("img_mod.1", d, 6 * d)],
            [TargetLinear(f"attn.{n}", d, d) for n in ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")],
            [TargetLinear("txt_mlp.net.2", 4 * d, d), TargetLinear("txt_mod.1", d, 6 * d)],
        ]


RELEASED = {
    "style": QwenImageI2LConfig(variant="style", compress_dim=64),
    "coarse": QwenImageI2LConfig(),
    "fine": QwenImageI2LConfig(variant="fine", residual_length=37 * 37 + 7, residual_mid_dim=64),
}


class QwenImageI2L(LoRAGenerator):
    """A Qwen-Image-i2L generator: `forward(features [N, 5632], residual [N, length, 3584] | None)` -> LoRA."""

    offload_units = ("blocks",)

    def __init__(self, config: QwenImageI2LConfig | None = None):
        config = config or QwenImageI2LConfig()
        residual = None
        if config.reads_residual:
            residual = (config.residual_length, config.residual_dim, config.residual_mid_dim)
        super().__init__(
            "transformer_blocks",
            config.groups(),
            config.num_blocks,
            config.features,
            config.compress_dim,
            config.rank,
            residual,
            config.residual_scale,
        )
        self.config = config


# ----------------------------------------------------------------------------------- formats
_BLOCK = re.compile(r"^blocks\.(\d+)\.")
SIGNATURE = (
    "blocks.0.layers.0.proj_a.proj_in.weight",
    "blocks.0.layers.0.proj_a.proj_out.weight",
    "blocks.0.layers.0.proj_b.proj_in.weight",
    "blocks.0.layers.0.proj_b.proj_out.weight",
    "blocks.0.layers.3.proj_b.proj_out.weight",
)
LAYOUTS = (KeyLayout("diffsynth_studio", SIGNATURE, owns_prefixes=("blocks.",)),)


def config_from_state(state: StateDict, config_json: dict | None = None) -> QwenImageI2LConfig:
    """Blocks, widths and the residual reader from the shapes; `rank` (which the shapes only give times the DiT
    width) from the json or the released 4; `variant` from the residual reader's length (or the json)."""
    names = {f.name for f in fields(QwenImageI2LConfig)}
    given = {k: v for k, v in (config_json or {}).items() if k in names}
    derived: dict = {}
    if state:
        blocks = {int(m.group(1)) for k in state if (m := _BLOCK.match(k))}
        groups = len(QwenImageI2LConfig(dim=1).groups())
        if (max(blocks) + 1) % groups:
            raise ConfigError(f"Qwen-Image-i2L has {max(blocks) + 1} blocks, not a multiple of {groups} groups")
        compress, features = state["blocks.0.layers.0.proj_a.proj_in.weight"].shape
        rank = int(given.get("rank", QwenImageI2LConfig.rank))
        dim, left = divmod(state["blocks.0.layers.0.proj_a.proj_out.weight"].shape[0], rank)
        if left:
            raise ConfigError(f"Qwen-Image-i2L: the to_q down head's width is not a multiple of rank={rank}")
        derived = dict(num_blocks=(max(blocks) + 1) // groups, dim=dim, features=features, compress_dim=compress)
        if "blocks.0.proj_residual.proj_in.weight" in state:
            mid, residual_dim = state["blocks.0.proj_residual.proj_in.weight"].shape
            length = state["blocks.0.proj_residual.proj_out.weight"].shape[1] // mid
            derived.update(residual_length=length, residual_dim=residual_dim, residual_mid_dim=mid)
            variant = given.get("variant", _RELEASED_LENGTHS.get(length))
            if variant is None:
                raise ConfigError(
                    f"Qwen-Image-i2L reads {length} text-encoder tokens, neither Coarse's 71 nor Fine's 1376: "
                    "say which it is with 'variant' ('coarse' or 'fine') in a config.json beside the file"
                )
            derived["variant"] = variant
        else:
            derived["variant"] = "style"
    fields_ = merge_fields("Qwen-Image-i2L", given, derived)
    return build_config(QwenImageI2LConfig, "Qwen-Image-i2L", fields_)


I2L_SPEC = ModelSpec(
    name="qwen_image_i2l",
    role=GENERATOR_ROLE,
    layouts=LAYOUTS,
    config_from_state=config_from_state,
    build=QwenImageI2L,
    description="Qwen-Image-i2L Style / Coarse / Fine (DiffSynth-Studio/Qwen-Image-i2L)",
)


# ----------------------------------------------------------------------------------- pipeline
class QwenImageI2LPipeline(ImageToLoRAPipeline):
    """Image to LoRA for Qwen-Image: `QwenImageI2LPipeline.from_pretrained("DiffSynth-Studio/Qwen-Image-i2L:style")`
    (or `:coarse-fine`), then `lora = pipe.image_to_lora(images)`."""

    family = "qwen_image_i2l"
    model_slots: ClassVar[dict[str, str]] = {
        **ImageToLoRAPipeline.model_slots,
        "image2lora_style": GENERATOR_ROLE,
        "image2lora_coarse": GENERATOR_ROLE,
        "image2lora_fine": GENERATOR_ROLE,
        "text_encoder": "text_encoder",
    }
    generator_slots = ("image2lora_style", "image2lora_coarse", "image2lora_fine")
    optional_slots = (*generator_slots, "text_encoder")
    presets = I2L_PRESETS
    dit_pipeline = "QwenImagePipeline"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.processor = None  # VisionPromptProcessor for the text encoder's view of the images

    @classmethod
    def from_pretrained(cls, model_id_or_configs=None, *, processor_config=None, **kwargs):
        """See `ImageToLoRAPipeline.from_pretrained`; `processor_config` (DiffSynth-Studio's name) is the Qwen2-VL
        processor, e.g. `ModelConfig(model_id="Qwen/Qwen-Image-Edit", origin_file_pattern="processor/")`, which
        `tokenizer_config` may name as well."""
        if processor_config is not None:
            kwargs["tokenizer_config"] = processor_config
        return super().from_pretrained(model_id_or_configs, **kwargs)

    def model_specs(self):
        from .text_encoder import TEXT_ENCODER_SPEC

        return (*super().model_specs(), I2L_SPEC, TEXT_ENCODER_SPEC)

    def generator_slot(self, module) -> str:
        return f"image2lora_{module.config.variant}"

    def _load_tokenizer(self, config):
        """The Qwen2-VL processor of a `processor/` folder (or one beside the given folder)."""
        from .text_encoder import VisionPromptProcessor, processor_folder

        folder, processor = processor_folder(config)
        if processor is not None:
            self.processor = VisionPromptProcessor.from_folder(processor)
            return self.processor.tokenizer
        raise ConfigError(
            f"{folder} has no preprocessor_config.json: Qwen-Image-i2L Coarse/Fine need the Qwen2-VL processor, "
            "e.g. ModelConfig(model_id='Qwen/Qwen-Image-Edit', origin_file_pattern='processor/')"
        )

    def check_models(self):
        generators = super().check_models()
        readers = [slot for slot, model in generators if model.config.reads_residual]
        if readers and self.text_encoder is None:
            raise ConfigError(
                f"{readers} read the Qwen2.5-VL text encoder's view of the images: list it among model_configs, "
                "e.g. ModelConfig(model_id='Qwen/Qwen-Image', origin_file_pattern='text_encoder/*.safetensors')"
            )
        if readers and self.processor is None:
            raise ConfigError(
                f"{readers} need the Qwen2-VL processor: processor_config=ModelConfig(model_id='Qwen/Qwen-Image-Edit', "
                "origin_file_pattern='processor/')"
            )
        return generators

    def residuals(self, images, generators) -> dict[str, torch.Tensor | None]:
        """Coarse and Fine: the text encoder's hidden states of each image's 224 / 1024-pixel crop `[N, L, D]`."""
        out: dict[str, torch.Tensor | None] = {slot: None for slot, _ in generators}
        for slot, model in generators:
            if not model.config.reads_residual:
                continue
            self.load_models_to_device(["text_encoder"])
            size = RESIDUAL_IMAGE_SIZES[model.config.variant]
            tokens = torch.stack([self.image_tokens(crop_resize(image, size, size)) for image in images])
            if tokens.shape[1:] != (model.config.residual_length, model.config.residual_dim):
                raise ConfigError(
                    f"the text encoder gives {tuple(tokens.shape[1:])} (tokens, width) for a {size}-pixel image; "
                    f"{slot} reads ({model.config.residual_length}, {model.config.residual_dim}): "
                    "is the processor Qwen-Image-Edit's and the text encoder Qwen-Image's?"
                )
            out[slot] = tokens
        return out

    def image_tokens(self, image) -> torch.Tensor:
        """`[L, D]` final hidden states of the Edit template around `image` with an empty instruction, without
        the template's leading tokens."""
        from .text_encoder import EDIT_TEMPLATE, edit_image_prefix, split_and_pad

        text = EDIT_TEMPLATE.format("", images=edit_image_prefix(1, numbered=False))
        inputs = self.processor(text=[text], images=[image], padding=True, return_tensors="pt")
        ids, mask = inputs["input_ids"].to(self.device), inputs["attention_mask"].to(self.device)
        dtype = next(self.text_encoder.visual.parameters()).dtype
        hidden = self.text_encoder.last_hidden_state(
            ids,
            mask,
            pixel_values=inputs["pixel_values"].to(self.device, dtype),
            image_grid_thw=inputs["image_grid_thw"].to(self.device),
        )
        embeds, _ = split_and_pad(hidden, mask, EDIT_TEMPLATE.drop, ids.shape[1])
        return embeds[0]


__all__ = [
    "I2L_SPEC",
    "RELEASED",
    "QwenImageI2L",
    "QwenImageI2LConfig",
    "QwenImageI2LPipeline",
    "config_from_state",
]
