"""Qwen2.5-VL-7B text encoder of Qwen-Image, its checkpoint spec, and the authors' prompt templates.

The module is transformers' `Qwen2_5_VLModel` (vision tower + language model, no `lm_head`):
Qwen-Image reads the final-normed hidden states of the language model, and the Edit models also
run reference images through the vision tower. Hub `text_encoder/` shards store the older
causal-LM layout (`model.layers.*`, `visual.*`, `lm_head.weight`); transformers 5 saves
`model.language_model.*` / `model.visual.*`. Both load strictly into our names (`language_model.*`,
`visual.*`); `lm_head` is dropped on purpose, since no logits are ever computed.

Prompts are wrapped in a chat template with a fixed system turn; the hidden states of the template's
leading tokens are dropped (34 for text-to-image, 64 for the Edit templates), as in the authors' code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLModel

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.registry import KeyLayout, ModelSpec, StateDict, check_config_facts


class QwenImageTextEncoder(Qwen2_5_VLModel):
    """transformers' `Qwen2_5_VLModel` with the capabilities our runtime reads."""

    offload_units = ("language_model.layers", "visual.blocks")
    compile_units = ("language_model.layers",)
    _ROTARY = ("language_model.rotary_emb", "visual.rotary_pos_emb")

    def __init__(self, config: Qwen2_5_VLConfig):
        super().__init__(config)
        # rotary tables are non-persistent buffers: a meta build keeps them on meta after an assign-load
        self.register_load_state_dict_post_hook(lambda module, _keys: module.materialize_buffers())

    def materialize_buffers(self) -> None:
        """Loader hook: recompute the rotary tables (never in a checkpoint) where the weights live."""
        device = self.language_model.embed_tokens.weight.device
        if device.type == "meta":
            return
        for path in self._ROTARY:
            old = self.get_submodule(path)
            with torch.device(device):
                fresh = type(old)(old.config)
            for name, buffer in fresh.named_buffers(recurse=False):
                setattr(old, name, buffer)

    def _apply(self, fn, recurse=True):
        # keep the rotary frequencies in float32 under `.to(bfloat16)`, as `from_pretrained(dtype=...)` does
        super()._apply(fn, recurse)
        inv_freq = self.language_model.rotary_emb.inv_freq
        if inv_freq.dtype != torch.float32 and inv_freq.device.type != "meta":
            self.materialize_buffers()
        return self

    def last_hidden_state(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **vision) -> torch.Tensor:
        """Final-normed hidden states `[B, L, hidden]` (what the authors read as `hidden_states[-1]`).

        `vision` takes `pixel_values` / `image_grid_thw` from the processor for prompts with images.
        """
        out = self(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **vision)
        return out.last_hidden_state


# ----------------------------------------------------------------------------- checkpoint layouts
_LAYER_KEY = re.compile(r"language_model\.layers\.(\d+)\.")
_DROPPED = frozenset(["lm_head.weight"])  # only hidden states are used


def _renamer(rules: tuple[tuple[str, str], ...], layout: str):
    def convert(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for key, value in state.items():
            if key in _DROPPED:
                continue
            for old, new in rules:
                if key.startswith(old):
                    out[new + key[len(old) :]] = value
                    break
            else:
                raise KeyError(f"Qwen2.5-VL ({layout} layout): no mapping for key {key!r}")
        return out

    return convert


# older causal-LM files (Qwen-Image `text_encoder/`, Qwen2.5-VL-7B-Instruct): `model.` is the LM
_HUB_RULES = (("visual.", "visual."), ("model.", "language_model."))
# transformers 5 `Qwen2_5_VLForConditionalGeneration.save_pretrained`
_TF5_RULES = (("model.visual.", "visual."), ("model.language_model.", "language_model."))
_BARE_RULES = (("visual.", "visual."), ("language_model.", "language_model."))

_LM_SIGNATURE = (
    "embed_tokens.weight",
    "layers.0.self_attn.q_proj.weight",
    "layers.0.self_attn.q_proj.bias",
    "layers.0.mlp.gate_proj.weight",
    "norm.weight",
)
_VISION_SIGNATURE = ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "merger.mlp.0.weight")


def _signature(lm: str, vision: str) -> tuple[str, ...]:
    return tuple(lm + k for k in _LM_SIGNATURE) + tuple(vision + k for k in _VISION_SIGNATURE)


LAYOUTS = (
    KeyLayout(
        "hub",
        _signature("model.", "visual."),
        convert=_renamer(_HUB_RULES, "hub"),
        owns_prefixes=("model.", "visual.", "lm_head."),
    ),
    KeyLayout(
        "transformers5",
        _signature("model.language_model.", "model.visual."),
        convert=_renamer(_TF5_RULES, "transformers5"),
        owns_prefixes=("model.language_model.", "model.visual.", "lm_head."),
    ),
    KeyLayout(
        "bare",
        _signature("language_model.", "visual."),
        convert=_renamer(_BARE_RULES, "bare"),
        owns_prefixes=("language_model.", "visual."),
    ),
)

# Qwen2.5-VL-7B-Instruct (Qwen-Image `text_encoder/config.json`) for what shapes cannot tell
QWEN25VL_7B_TEXT = dict(
    rms_norm_eps=1e-6,
    max_position_embeddings=128000,
    hidden_act="silu",
    rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]},
    tie_word_embeddings=False,
)
QWEN25VL_7B_VISION = dict(
    hidden_act="silu",
    num_heads=16,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31],
    tokens_per_second=2,
)


def _shape_facts(state: StateDict) -> dict[str, object]:
    vocab, hidden = state["language_model.embed_tokens.weight"].shape
    q = state["language_model.layers.0.self_attn.q_proj.weight"].shape[0]
    k = state["language_model.layers.0.self_attn.k_proj.weight"].shape[0]
    layers = {int(m.group(1)) for key in state if (m := _LAYER_KEY.match(key))}
    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=max(layers) + 1,
        intermediate_size=state["language_model.layers.0.mlp.gate_proj.weight"].shape[0],
        kv_fraction=(q, k),
    )


def _vision_facts(state: StateDict) -> dict[str, object]:
    hidden = state["visual.patch_embed.proj.weight"].shape[0]
    blocks = {int(m.group(1)) for key in state if (m := re.match(r"visual\.blocks\.(\d+)\.", key))}
    return dict(
        hidden_size=hidden,
        depth=max(blocks) + 1,
        intermediate_size=state["visual.blocks.0.mlp.gate_proj.weight"].shape[0],
        out_hidden_size=state["visual.merger.mlp.2.weight"].shape[0],
        in_channels=state["visual.patch_embed.proj.weight"].shape[1],
    )


def config_from_state(state: StateDict, config_json: dict | None = None) -> Qwen2_5_VLConfig:
    """`Qwen2_5_VLConfig` from the repo's config.json (checked against the shapes), else from shapes
    and the Qwen2.5-VL-7B values (heads from the 7B's 128-wide heads)."""
    facts = _shape_facts(state) if "language_model.embed_tokens.weight" in state else {}
    if config_json is not None:
        json_fields = {k: v for k, v in config_json.items() if not k.startswith("_")}
        config = Qwen2_5_VLConfig(**json_fields)
        text = config.text_config
        checked = ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size")
        check_config_facts("Qwen2.5-VL config.json", text, {f: facts[f] for f in checked if f in facts})
        return config
    if not facts:
        raise ConfigError("Qwen2.5-VL: no config.json and no 'language_model.embed_tokens.weight' to derive it from")
    q, k = facts.pop("kv_fraction")
    head_dim = 128
    if q % head_dim or k % head_dim or k > q:
        raise ConfigError(
            f"Qwen2.5-VL: q_proj has {q} outputs and k_proj {k}, not multiples of the 7B's 128-wide heads; "
            "put the model's config.json beside the weights"
        )
    text = dict(QWEN25VL_7B_TEXT, **facts, num_attention_heads=q // head_dim, num_key_value_heads=k // head_dim)
    vision = dict(QWEN25VL_7B_VISION, **_vision_facts(state))
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision)


def build(config: Qwen2_5_VLConfig) -> QwenImageTextEncoder:
    return QwenImageTextEncoder(config)


TEXT_ENCODER_SPEC = ModelSpec(
    name="qwen25vl",
    role="text_encoder",
    layouts=LAYOUTS,
    config_from_state=config_from_state,
    build=build,
    description="Qwen2.5-VL text encoder (Qwen2.5-VL-7B: Qwen-Image, Qwen-Image-Edit); hidden states only",
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
    hidden: torch.Tensor, mask: torch.Tensor, drop: int, max_sequence_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per prompt: keep the real tokens after the first `drop`, cut to `max_sequence_length`,
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
    if not 1 <= max_sequence_length <= TOKENIZER_MAX_LENGTH:
        raise ConfigError(f"max_sequence_length={max_sequence_length} must be in 1..{TOKENIZER_MAX_LENGTH}")
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
    tower should get) through the Qwen2-VL `processor`; the Edit template's 64 tokens are dropped."""
    if not 1 <= max_sequence_length <= TOKENIZER_MAX_LENGTH:
        raise ConfigError(f"max_sequence_length={max_sequence_length} must be in 1..{TOKENIZER_MAX_LENGTH}")
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
    return split_and_pad(hidden, mask, template.drop, max_sequence_length)


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
