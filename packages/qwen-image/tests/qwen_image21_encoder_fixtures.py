"""A tiny random Qwen-Image 2.1 text encoder and processor, built offline, for ours and diffusers' pipeline.

`build_tiny_encoder_and_processor(directory)` writes two folders laid out like `Qwen/Qwen-Image-2.1`:

- `text_encoder/`: `Qwen3VLForConditionalGeneration.save_pretrained` of a tiny random Qwen3-VL (transformers 5
  names `model.language_model.*`, `model.visual.*`, `lm_head.weight`, and its nested `config.json`);
- `processor/`: a tiny Qwen-style tokenizer with the Qwen3-VL special tokens and a Qwen3-VL-style chat template
  (string or list-of-parts content), and a Qwen2-VL image processor with Qwen3-VL's settings (16-pixel
  patches, 2x2 merge, 0.5 mean/std) and few pixels.

Our side loads them with `load_models(text_encoder/)` and `load_processor(processor/)`. transformers'
`Qwen3VLProcessor` needs a torchvision video processor, which this environment lacks: `reference_processor`
builds the real class with no video half, for diffusers' `QwenImage21Pipeline(processor=...)`.

pytest runs in importlib mode, so load this file with
`diffsynth.runtime.testing.modules.load_beside(__file__, "qwen_image21_encoder_fixtures.py", NAME)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch

from diffsynth.runtime.testing.tokenizers import build_tiny_qwen_tokenizer
from diffsynth.runtime.testing.weights import random_weights

VISION_SPECIAL_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")

# Qwen3-VL's chat layout for plain messages: content is a string or a list of text/image parts
QWEN3VL_CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{{- '<|im_start|>' + m.role + '\\n' -}}"
    "{%- if m.content is string -%}{{- m.content -}}"
    "{%- else -%}{%- for part in m.content -%}"
    "{%- if part.type == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part.type == 'text' -%}{{- part.text -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

CORPUS = (
    "Comprehend and analyze the provided prompt.",
    "a red circle on a blue background",
    "a small green square in the top left corner, next to <image1> and <image2>",
    "system user assistant",
)

# tiny Qwen3-VL: 2 text layers (DeepStack feeds layer 0), head_dim 8 with M-RoPE sections 2+1+1
TINY_TEXT = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
    hidden_act="silu", max_position_embeddings=1024, rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [2, 1, 1]},
)  # fmt: skip
TINY_VISION = dict(
    depth=2, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=16, temporal_patch_size=2,
    spatial_merge_size=2, out_hidden_size=32, num_position_embeddings=16, deepstack_visual_indexes=[0],
    hidden_act="gelu_pytorch_tanh",
)  # fmt: skip
# Qwen3-VL's image preprocessing with few pixels: 32x32 to 128x128 (4 to 64 patches of 16)
IMAGE_PROCESSOR = dict(
    patch_size=16,
    temporal_patch_size=2,
    merge_size=2,
    min_pixels=32 * 32,
    max_pixels=128 * 128,
    image_mean=[0.5, 0.5, 0.5],
    image_std=[0.5, 0.5, 0.5],
)


@dataclass(frozen=True)
class TinyEncoder:
    """What `build_tiny_encoder_and_processor` wrote.

    `text_encoder`: folder with `config.json` + `model.safetensors` (a `Qwen3VLForConditionalGeneration` save);
    `processor`: folder with the tokenizer, `chat_template.jinja` and `preprocessor_config.json`;
    `config`: the `config.json` as a dict (nested `text_config` / `vision_config`).
    """

    text_encoder: Path
    processor: Path
    config: dict


def build_tiny_processor(directory: Path):
    """The `processor/` folder; returns the tokenizer."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = build_tiny_qwen_tokenizer(directory, texts=list(CORPUS) * 4)
    tokenizer.add_special_tokens({"additional_special_tokens": list(VISION_SPECIAL_TOKENS)})
    tokenizer.chat_template = QWEN3VL_CHAT_TEMPLATE
    tokenizer.save_pretrained(str(directory))
    Qwen2VLImageProcessorPil(**IMAGE_PROCESSOR).save_pretrained(str(directory))
    return tokenizer


def tiny_config(tokenizer):
    """A tiny `Qwen3VLConfig` whose special token ids are `tokenizer`'s."""
    from transformers import Qwen3VLConfig

    ids = {
        f"{name}_token_id": tokenizer.convert_tokens_to_ids(token)
        for name, token in zip(("vision_start", "vision_end", "image", "video"), VISION_SPECIAL_TOKENS, strict=True)
    }
    text = dict(TINY_TEXT, vocab_size=len(tokenizer))
    return Qwen3VLConfig(text_config=text, vision_config=dict(TINY_VISION), tie_word_embeddings=False, **ids)


def build_tiny_encoder_and_processor(directory, seed: int = 0) -> TinyEncoder:
    """Write `text_encoder/` and `processor/` under `directory` (see the module docstring); seeded random
    weights (every parameter non-trivial, norms near 1)."""
    from transformers import Qwen3VLForConditionalGeneration

    root = Path(directory)
    tokenizer = build_tiny_processor(root / "processor")
    model = random_weights(Qwen3VLForConditionalGeneration(tiny_config(tokenizer)), seed)
    model.save_pretrained(str(root / "text_encoder"))
    config = model.config.to_dict()
    return TinyEncoder(root / "text_encoder", root / "processor", config)


def reference_processor(folder):
    """transformers' `Qwen3VLProcessor` over `folder`, without its (torchvision-only) video processor."""
    import transformers.processing_utils as processing
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen3VLProcessor

    checked = processing.ProcessorMixin.check_argument_for_proper_class

    def check(self, name, value):
        return None if name == "video_processor" and value is None else checked(self, name, value)

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    image_processor = AutoImageProcessor.from_pretrained(str(folder))
    with mock.patch.object(processing.ProcessorMixin, "check_argument_for_proper_class", check):
        return Qwen3VLProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=None,
            chat_template=tokenizer.chat_template,
        )


def reference_encoder(folder) -> torch.nn.Module:
    """transformers' `Qwen3VLForConditionalGeneration` from `folder`, float32, eval mode."""
    from transformers import Qwen3VLForConditionalGeneration

    return Qwen3VLForConditionalGeneration.from_pretrained(str(folder), dtype=torch.float32).eval()
