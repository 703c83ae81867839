"""Qwen2.5-VL-7B text encoder of Qwen-Image, its checkpoint spec, and the authors' prompt templates.

The module is transformers' `Qwen2_5_VLModel` (vision tower + language model, no `lm_head`):
Qwen-Image reads the final-normed hidden states of the language model, and the Edit models also
run reference images through the vision tower. Hub `text_encoder/` shards store the older
causal-LM layout (`model.layers.*`, `visual.*`, `lm_head.weight`); transformers 5 saves
`model.language_model.*` / `model.visual.*`. Both load strictly into our names (`language_model.*`,
`visual.*`); `lm_head` is dropped on purpose, since no logits are ever computed.

Prompts are wrapped in a chat template with a fixed system turn; the hidden states of the template's
leading tokens are dropped (34 for text-to-image, 64 for the Edit templates), as in the authors' code.

The model class, its layouts and spec live in `diffsynth.runtime.models.qwen25vl` (Step1X-Edit uses them too);
they are re-exported here under their old names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.models.qwen25vl import (  # noqa: F401 (re-exported: the model now lives in the runtime)
    _DROPPED,
    _LAYER_KEY,
    LAYOUTS,
    QWEN25VL_7B_TEXT,
    QWEN25VL_7B_VISION,
    TEXT_ENCODER_SPEC,
    QwenImageTextEncoder,
    _renamer,
    build,
    config_from_state,
)


# ----------------------------------------------------------------------------- prompt templates
@dataclass(frozen=True)
class PromptTemplate:
    """A chat template around the user's prompt and how many leading tokens' states are dropped."""

    text: str
    drop: int

    def format(self, prompt: str, images: str = "") -> str:
        return self.text.format(images + prompt)


_T2I_SYSTEM = (
    "Describe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:"
)
_EDIT_SYSTEM = (
    "Describe the key features of the input image (color, shape, size, texture, objects, background), "
    "then explain how the user's text instruction should alter or modify the image. Generate a new image "
    "that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate."
)
T2I_TEMPLATE = PromptTemplate(
    f"<|im_start|>system\n{_T2I_SYSTEM}<|im_end|>\n<|im_start|>user\n{{}}<|im_end|>\n<|im_start|>assistant\n", 34
)
EDIT_TEMPLATE = PromptTemplate(
    f"<|im_start|>system\n{_EDIT_SYSTEM}<|im_end|>\n<|im_start|>user\n{{}}<|im_end|>\n<|im_start|>assistant\n", 64
)
VISION_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"


def edit_image_prefix(count: int, numbered: bool) -> str:
    """What precedes the instruction for `count` edit images: Edit (one image, unnumbered) or
    Edit-2509/2511 ("Picture N: " before each image)."""
    if not numbered:
        return VISION_PLACEHOLDER * count
    return "".join(f"Picture {i + 1}: {VISION_PLACEHOLDER}" for i in range(count))


def split_and_pad(
    hidden: torch.Tensor, mask: torch.Tensor, drop: int, max_sequence_length: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per prompt: keep the real tokens after the first `drop`, cut to `max_sequence_length` (None: no cut),
    zero-pad to the longest; returns `[B, L, D]` states and the `[B, L]` bool mask."""
    rows = [h[m.bool()][drop:][:max_sequence_length] for h, m in zip(hidden, mask, strict=True)]
    length = max(max(r.shape[0] for r in rows), 1)
    embeds = hidden.new_zeros(len(rows), length, hidden.shape[-1])
    keep = torch.zeros(len(rows), length, dtype=torch.bool, device=hidden.device)
    for i, row in enumerate(rows):
        embeds[i, : row.shape[0]] = row
        keep[i, : row.shape[0]] = True
    return embeds, keep


TOKENIZER_MAX_LENGTH = 1024  # the authors tokenize up to 1024 prompt tokens past the template


def check_max_sequence_length(max_sequence_length) -> None:
    """Refuse a prompt length outside 1..1024 or not an integer ("a" and 1.5 failed deep in the slicing)."""
    value = max_sequence_length
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= TOKENIZER_MAX_LENGTH:
        raise ConfigError(f"max_sequence_length={value!r} is not accepted; use an integer in 1..{TOKENIZER_MAX_LENGTH}")


@torch.no_grad()
def encode_prompts(
    text_encoder: QwenImageTextEncoder,
    tokenizer,
    prompts: list[str],
    *,
    max_sequence_length: int = 512,
    template: PromptTemplate = T2I_TEMPLATE,
    device=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Text-to-image prompt embeddings `[B, L, 3584]` and mask `[B, L]` (True = real token)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    check_max_sequence_length(max_sequence_length)
    device = device if device is not None else next(text_encoder.parameters()).device
    tokens = tokenizer(
        [template.format(p) for p in prompts],
        max_length=TOKENIZER_MAX_LENGTH + template.drop,
        padding=True,
        truncation=True,
        return_tensors="pt",
    )
    ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
    hidden = text_encoder.last_hidden_state(ids, mask)
    return split_and_pad(hidden, mask, template.drop, max_sequence_length)


IMAGE_PAD = "<|image_pad|>"


def processor_folder(config) -> tuple[Path, Path | None]:
    """(the tokenizer config's folder, the Qwen2-VL `processor/` folder: that folder itself or a `processor/` beside
    it, None without one), as the hub repos lay them out."""
    paths = config.resolve()
    folder = Path(paths[0]) if Path(paths[0]).is_dir() else Path(paths[0]).parent
    found = [c for c in (folder, folder.parent / "processor") if (c / "preprocessor_config.json").exists()]
    return folder, found[0] if found else None


class VisionPromptProcessor:
    """Prompts with images for the Qwen2.5-VL encoder: transformers' image processor (resize to a
    multiple of 28, normalise, 14-pixel patches) plus the expansion of each `<|image_pad|>` to one
    token per merged 2x2 patch group, which the language model fills with the vision tower's output.

    This is what transformers' `Qwen2_5_VLProcessor` does for images; that class also insists on a
    video processor, which needs torchvision, so we do the image part ourselves.
    """

    def __init__(self, image_processor, tokenizer):
        self.image_processor = image_processor
        self.tokenizer = tokenizer

    @classmethod
    def from_folder(cls, folder) -> VisionPromptProcessor:
        """From a `processor/` folder (`preprocessor_config.json` and the tokenizer files)."""
        from transformers import AutoImageProcessor, AutoTokenizer

        return cls(AutoImageProcessor.from_pretrained(str(folder)), AutoTokenizer.from_pretrained(str(folder)))

    def __call__(self, text: list[str], images: list, padding=True, return_tensors="pt"):
        from transformers import BatchFeature

        vision = self.image_processor(images=images, return_tensors="pt")
        merge = self.image_processor.merge_size**2
        counts = [int(grid.prod()) // merge for grid in vision["image_grid_thw"]]
        placeholders = sum(t.count(IMAGE_PAD) for t in text)
        if placeholders != len(counts):
            raise ConfigError(f"the prompts hold {placeholders} image placeholders for {len(counts)} images")
        counts_iter = iter(counts)
        expanded = []
        for t in text:
            head, *rest = t.split(IMAGE_PAD)
            expanded.append(head + "".join(IMAGE_PAD * next(counts_iter) + part for part in rest))
        tokens = self.tokenizer(expanded, padding=padding, return_tensors=return_tensors)
        return BatchFeature({**tokens, **vision})


@torch.no_grad()
def encode_prompts_with_images(
    text_encoder: QwenImageTextEncoder,
    processor,
    prompts: list[str],
    images: list,
    *,
    numbered: bool = True,
    max_sequence_length: int = 512,
    template: PromptTemplate = EDIT_TEMPLATE,
    device=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Edit prompt embeddings: every prompt sees all `images` (PIL, already at the size the vision
    tower should get) through the Qwen2-VL `processor`; the Edit template's 64 tokens are dropped.

    `max_sequence_length` is checked (1..1024) but cuts nothing: the sequence holds the images' vision tokens
    (1369 for one 1024x1024 image at Qwen-Image-Edit's size) before the instruction, and the authors' Edit
    pipelines (diffusers' `QwenImageEditPipeline` / `QwenImageEditPlusPipeline`) keep it whole."""
    check_max_sequence_length(max_sequence_length)
    device = device if device is not None else next(text_encoder.parameters()).device
    prefix = edit_image_prefix(len(images), numbered)
    texts = [template.format(p, images=prefix) for p in prompts]
    inputs = processor(text=texts, images=list(images) * len(prompts), padding=True, return_tensors="pt")
    ids, mask = inputs["input_ids"].to(device), inputs["attention_mask"].to(device)
    dtype = next(text_encoder.visual.parameters()).dtype
    hidden = text_encoder.last_hidden_state(
        ids,
        mask,
        pixel_values=inputs["pixel_values"].to(device, dtype),
        image_grid_thw=inputs["image_grid_thw"].to(device),
    )
    return split_and_pad(hidden, mask, template.drop, None)


__all__ = [
    "EDIT_TEMPLATE",
    "LAYOUTS",
    "T2I_TEMPLATE",
    "TEXT_ENCODER_SPEC",
    "VisionPromptProcessor",
    "PromptTemplate",
    "QwenImageTextEncoder",
    "config_from_state",
    "edit_image_prefix",
    "encode_prompts",
    "encode_prompts_with_images",
    "split_and_pad",
]
