"""Qwen3-VL-8B text encoder of Qwen-Image 2.1, its checkpoint spec, and the prompt encoding.

The module is transformers' `Qwen3VLModel` (vision tower with DeepStack mergers + language model, no
`lm_head`). Qwen-Image 2.1 reads the output of the last decoder layer *before* the language model's final
RMSNorm, for the whole chat-formatted prompt, with the condition images placed in the prompt's vision slots.
Hub `text_encoder/` files are `Qwen3VLForConditionalGeneration` saves (`model.language_model.*`,
`model.visual.*`, `lm_head.weight`); they load strictly into our names (`language_model.*`, `visual.*`), and
`lm_head` is dropped on purpose, since no logits are ever computed.

Prompt encoding follows the authors' pipeline: a raw chat string (not the processor's chat template) with a
fixed system turn whose tokens are dropped afterwards, one `<imageN>` vision slot per condition image, RGBA
images flattened onto white for the vision tower, left padding, then each prompt's real tokens right-padded
with zeros to the longest.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import Qwen3VLConfig, Qwen3VLModel

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.registry import KeyLayout, ModelSpec, StateDict, check_config_facts

from ..text_encoder import IMAGE_PAD, VISION_PLACEHOLDER, QwenImageTextEncoder, VisionPromptProcessor, split_and_pad


class QwenImage21TextEncoder(Qwen3VLModel):
    """transformers' `Qwen3VLModel` with the capabilities our runtime reads and a pre-norm readout."""

    offload_units = ("language_model.layers", "visual.blocks")
    compile_units = ("language_model.layers", "visual.blocks")
    # the same two rotary modules as Qwen2.5-VL (text M-RoPE, vision 2D RoPE): rebuilt the same way
    _ROTARY = ("language_model.rotary_emb", "visual.rotary_pos_emb")
    materialize_buffers = QwenImageTextEncoder.materialize_buffers

    def __init__(self, config: Qwen3VLConfig):
        deepstack = list(config.vision_config.deepstack_visual_indexes)
        if config.text_config.num_hidden_layers <= len(deepstack):
            raise ConfigError(
                f"Qwen3-VL: num_hidden_layers={config.text_config.num_hidden_layers} must exceed the "
                f"{len(deepstack)} layers that take DeepStack features (deepstack_visual_indexes={deepstack}), "
                "so that the last layer's output is what enters the final norm"
            )
        super().__init__(config)
        # transformers 5 reports the final-normed state as the last entry of `hidden_states` unless told not to;
        # the 2.1 DiT was trained on the last layer's raw output
        self.language_model.config.tie_last_hidden_states = False
        # rotary tables are non-persistent buffers: a meta build keeps them on meta after an assign-load
        self.register_load_state_dict_post_hook(lambda module, _keys: module.materialize_buffers())

    def _apply(self, fn, recurse=True):
        # `.to(bfloat16)` would round the rotary frequencies; `from_pretrained(dtype=...)` keeps them float32
        super()._apply(fn, recurse)
        tables = [self.get_submodule(path).inv_freq for path in self._ROTARY]
        if tables[0].device.type != "meta" and any(t.dtype != torch.float32 for t in tables):
            self.materialize_buffers()
        return self

    def pre_norm_hidden_state(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`[B, L, hidden]`: the last decoder layer's output, before the final RMSNorm.

        Images come as the processor gives them (`pixel_values`, `image_grid_thw`); `mm_token_type_ids`
        (1 on image tokens) lets the model place the images' 3D rotary positions. Only the last layer's
        state is kept (`output_hidden_states=[-1]`).
        """
        out = self(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            mm_token_type_ids=mm_token_type_ids,
            use_cache=False,
            output_hidden_states=[-1],
        )
        return out.hidden_states[-1]


# ----------------------------------------------------------------------------- checkpoint layouts
# Qwen3-VL shipped with transformers 4.57, after the VLM re-nesting: its files use the nested names only
# (no `_checkpoint_conversion_mapping` exists for it). `bare` is `QwenImage21TextEncoder.state_dict()`.
_PREFIXES = {
    "transformers": {"model.language_model.": "language_model.", "model.visual.": "visual."},
    "bare": {"language_model.": "language_model.", "visual.": "visual."},
}
_DROPPED = frozenset(["lm_head.weight"])  # only hidden states are used


def _converter(layout: str):
    renames = _PREFIXES[layout]

    def convert(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for key, value in state.items():
            old = next((p for p in renames if key.startswith(p)), None)
            if old is not None:
                out[renames[old] + key[len(old) :]] = value
            elif key not in _DROPPED:
                raise KeyError(f"Qwen3-VL ({layout} layout): no mapping for key {key!r}")
        return out

    return convert


# q_norm tells Qwen3 from Qwen2.5 layers; the DeepStack merger and the learned position table are Qwen3-VL's
_LM_KEYS = (
    "embed_tokens.weight",
    "layers.0.self_attn.q_proj.weight",
    "layers.0.self_attn.q_norm.weight",
    "layers.0.mlp.gate_proj.weight",
    "norm.weight",
)
_VISION_KEYS = (
    "patch_embed.proj.weight",
    "pos_embed.weight",
    "blocks.0.attn.qkv.weight",
    "merger.linear_fc1.weight",
    "deepstack_merger_list.0.linear_fc1.weight",
)


def _layout(name: str, owns: tuple[str, ...]) -> KeyLayout:
    lm, vision = _PREFIXES[name]
    signature = tuple(lm + k for k in _LM_KEYS) + tuple(vision + k for k in _VISION_KEYS)
    return KeyLayout(name, signature, convert=_converter(name), owns_prefixes=owns)


LAYOUTS = (
    _layout("transformers", ("model.language_model.", "model.visual.", "lm_head.")),
    _layout("bare", ("language_model.", "visual.")),
)

# Qwen3-VL-8B-Instruct's config.json (the Qwen-Image 2.1 text encoder) for what shapes cannot tell
QWEN3VL_8B_TEXT = dict(
    vocab_size=151936,
    hidden_size=4096,
    intermediate_size=12288,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    hidden_act="silu",
    max_position_embeddings=262144,
    rms_norm_eps=1e-6,
    attention_bias=False,
    rope_parameters={
        "rope_type": "default",
        "rope_theta": 5_000_000.0,
        "mrope_section": [24, 20, 20],
        "mrope_interleaved": True,
    },
)
QWEN3VL_8B_VISION = dict(
    depth=27,
    hidden_size=1152,
    intermediate_size=4304,
    num_heads=16,
    in_channels=3,
    patch_size=16,
    temporal_patch_size=2,
    spatial_merge_size=2,
    out_hidden_size=4096,
    num_position_embeddings=2304,
    deepstack_visual_indexes=[8, 16, 24],
    hidden_act="gelu_pytorch_tanh",
)
QWEN3VL_TOKENS = dict(
    image_token_id=151655,
    video_token_id=151656,
    vision_start_token_id=151652,
    vision_end_token_id=151653,
    tie_word_embeddings=False,
)


def qwen3vl_8b_config() -> Qwen3VLConfig:
    """The released Qwen3-VL-8B configuration."""
    return Qwen3VLConfig(text_config=dict(QWEN3VL_8B_TEXT), vision_config=dict(QWEN3VL_8B_VISION), **QWEN3VL_TOKENS)


_DEEPSTACK_KEY = r"visual\.deepstack_merger_list\.(\d+)\."


def _count(state: StateDict, pattern: str) -> int:
    found = {int(m.group(1)) for key in state if (m := re.match(pattern, key))}
    return max(found) + 1 if found else 0


def _text_facts(state: StateDict) -> dict[str, int]:
    vocab, hidden = state["language_model.embed_tokens.weight"].shape
    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=_count(state, r"language_model\.layers\.(\d+)\."),
        intermediate_size=state["language_model.layers.0.mlp.gate_proj.weight"].shape[0],
        head_dim=state["language_model.layers.0.self_attn.q_norm.weight"].shape[0],
    )


def _vision_facts(state: StateDict) -> dict[str, int]:
    hidden, channels, temporal, patch, _ = state["visual.patch_embed.proj.weight"].shape
    merged = state["visual.merger.linear_fc1.weight"].shape[1]
    return dict(
        hidden_size=hidden,
        in_channels=channels,
        temporal_patch_size=temporal,
        patch_size=patch,
        depth=_count(state, r"visual\.blocks\.(\d+)\."),
        intermediate_size=state["visual.blocks.0.mlp.linear_fc1.weight"].shape[0],
        out_hidden_size=state["visual.merger.linear_fc2.weight"].shape[0],
        num_position_embeddings=state["visual.pos_embed.weight"].shape[0],
        spatial_merge_size=round((merged // hidden) ** 0.5),
    )


def _heads(state: StateDict, head_dim: int) -> dict[str, int]:
    q = state["language_model.layers.0.self_attn.q_proj.weight"].shape[0]
    k = state["language_model.layers.0.self_attn.k_proj.weight"].shape[0]
    if q % head_dim or k % head_dim:
        raise ConfigError(f"Qwen3-VL: q_proj has {q} outputs and k_proj {k}, not multiples of head_dim={head_dim}")
    return dict(num_attention_heads=q // head_dim, num_key_value_heads=k // head_dim)


def _from_json(config_json: dict, state: StateDict) -> Qwen3VLConfig:
    fields = {k: v for k, v in config_json.items() if not k.startswith("_")}
    for part in ("text_config", "vision_config"):
        if not isinstance(fields.get(part), dict):
            raise ConfigError(f"Qwen3-VL config.json: '{part}' must be an object, got {fields.get(part)!r}")
    config = Qwen3VLConfig(**fields)
    if "language_model.embed_tokens.weight" in state:
        check_config_facts("Qwen3-VL config.json text_config", config.text_config, _text_facts(state))
    if "visual.patch_embed.proj.weight" in state:
        said = list(config.vision_config.deepstack_visual_indexes)
        if len(said) != (got := _count(state, _DEEPSTACK_KEY)):
            raise ConfigError(
                f"Qwen3-VL config.json vision_config says deepstack_visual_indexes={said} "
                f"but the weights have {got} DeepStack mergers"
            )
        check_config_facts("Qwen3-VL config.json vision_config", config.vision_config, _vision_facts(state))
    return config


def _from_shapes(state: StateDict) -> Qwen3VLConfig:
    for key in ("language_model.embed_tokens.weight", "visual.patch_embed.proj.weight"):
        if key not in state:
            raise ConfigError(f"Qwen3-VL: no config.json and no {key!r} to derive the config from")
    text = _text_facts(state)
    text = dict(QWEN3VL_8B_TEXT, **text, **_heads(state, text["head_dim"]))
    vision = dict(QWEN3VL_8B_VISION, **_vision_facts(state))
    indexes, mergers = vision["deepstack_visual_indexes"], _count(state, _DEEPSTACK_KEY)
    if mergers != len(indexes) or vision["depth"] <= max(indexes):
        raise ConfigError(
            f"Qwen3-VL: {mergers} DeepStack mergers over {vision['depth']} vision blocks do not fit the 8B's "
            f"deepstack_visual_indexes={indexes}; put the model's config.json beside the weights"
        )
    if vision["hidden_size"] % vision["num_heads"]:
        raise ConfigError(
            f"Qwen3-VL: vision hidden_size={vision['hidden_size']} does not split into the 8B's "
            f"num_heads={vision['num_heads']}; put the model's config.json beside the weights"
        )
    return Qwen3VLConfig(text_config=text, vision_config=vision, **QWEN3VL_TOKENS)


def config_from_state(state: StateDict, config_json: dict | None = None) -> Qwen3VLConfig:
    """`Qwen3VLConfig` from the repo's config.json (checked against the shapes), else from the shapes and the
    released Qwen3-VL-8B values (vision heads, DeepStack layers, rotary settings, special token ids)."""
    if config_json is not None:
        return _from_json(config_json, state)
    return _from_shapes(state)


TEXT_ENCODER21_SPEC = ModelSpec(
    name="qwen3vl",
    role="text_encoder",
    layouts=LAYOUTS,
    config_from_state=config_from_state,
    build=QwenImage21TextEncoder,
    description="Qwen3-VL text encoder (Qwen3-VL-8B: Qwen-Image 2.1); pre-final-norm hidden states only",
)


# ----------------------------------------------------------------------------- prompt encoding
SYSTEM_PROMPT = "Comprehend and analyze the provided prompt."
SYSTEM_TURN = f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"
# the authors' raw chat string; condition images go in front of the prompt in the user turn
PROMPT_TEMPLATE = SYSTEM_TURN + "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"


def image_prefix(count: int) -> str:
    """The user turn's lead for `count` condition images: `<imageN>` and a vision slot each, space-separated."""
    return " ".join(f"<image{i + 1}>{VISION_PLACEHOLDER}" for i in range(count))


def vision_copy(image) -> Image.Image:
    """What the vision tower sees of a condition image (PIL or array): RGBA is composited over white."""
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    if image.mode != "RGBA":
        return image
    flat = Image.new("RGB", image.size, (255, 255, 255))
    flat.paste(image, mask=image.getchannel("A"))
    return flat


class QwenImage21Processor(VisionPromptProcessor):
    """Prompts (and images) for the Qwen3-VL encoder, as transformers' `Qwen3VLProcessor` prepares them.

    Same image preprocessing and `<|image_pad|>` expansion as Qwen2.5-VL's (Qwen3-VL only changes the
    image processor's settings: 16-pixel patches, 0.5 mean/std), plus `mm_token_type_ids` (1 on image
    tokens) for the 3D rotary positions, and prompts without images. transformers' class insists on a
    video processor, which needs torchvision; this one gives the same tensors without it. Each call sets
    the tokenizer's `padding_side` (left by default, as the 2.1 encoder was trained).
    """

    def __call__(self, text, images=None, padding=True, padding_side="left", return_tensors="pt"):
        from transformers import BatchFeature

        self.tokenizer.padding_side = padding_side
        if images:
            batch = super().__call__(text, list(images), padding=padding, return_tensors=return_tensors)
        else:
            batch = BatchFeature(dict(self.tokenizer(text, padding=padding, return_tensors=return_tensors)))
        image_id = self.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        batch["mm_token_type_ids"] = (batch["input_ids"] == image_id).long()
        return batch


def load_processor(folder) -> QwenImage21Processor:
    """The processor of a repo's `processor/` folder (`preprocessor_config.json` and the tokenizer files)."""
    folder = Path(folder)
    if not (folder / "preprocessor_config.json").is_file():
        present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else "(no such folder)"
        raise ConfigError(
            f"{folder} is not a Qwen3-VL processor folder: no preprocessor_config.json (found: {present}); "
            "point at the repo's processor/ folder"
        )
    return QwenImage21Processor.from_folder(folder)


def system_turn_length(tokenizer) -> int:
    """How many leading tokens (the system turn) are dropped from the encoder's states."""
    return len(tokenizer(SYSTEM_TURN)["input_ids"])


@torch.no_grad()
def encode_prompts21(
    encoder: QwenImage21TextEncoder,
    processor,
    prompts: list[str] | str,
    images: list | None = None,
    *,
    device=None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Prompt embeddings for Qwen-Image 2.1: `(embeds [B, L, D], mask [B, L] bool or None, image_slots [B, L])`.

    Every prompt sees all `images` (PIL or arrays, already at the size the vision tower should get; None or
    empty for text-to-image). `embeds` holds each prompt's tokens after the system turn, zero-padded on the
    right to the longest; `mask` is True on real tokens and None when no prompt is padded; `image_slots` is
    True where a token is an image placeholder the vision tower filled. `processor` is ours or transformers'
    `Qwen3VLProcessor`.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    prompts = [p or " " for p in prompts]  # no BOS in Qwen: an empty prompt would leave nothing to read
    images = [vision_copy(image) for image in images or ()]
    lead = image_prefix(len(images))
    texts = [PROMPT_TEMPLATE.format(lead + p) for p in prompts]
    extra = {"images": images * len(prompts)} if images else {}
    inputs = processor(text=texts, padding=True, padding_side="left", return_tensors="pt", **extra)
    device = device if device is not None else next(encoder.parameters()).device
    ids, mask = inputs["input_ids"].to(device), inputs["attention_mask"].to(device)
    vision = {k: inputs[k].to(device) for k in ("pixel_values", "image_grid_thw", "mm_token_type_ids") if k in inputs}
    hidden = encoder.pre_norm_hidden_state(ids, mask, **vision)

    drop, longest = system_turn_length(processor.tokenizer), ids.shape[1]
    embeds, keep = split_and_pad(hidden, mask, drop, longest)
    is_image = (ids == processor.tokenizer.convert_tokens_to_ids(IMAGE_PAD)).unsqueeze(-1)
    slots, _ = split_and_pad(is_image, mask, drop, longest)
    return embeds, (None if bool(keep.all()) else keep), slots[..., 0]


__all__ = [
    "LAYOUTS",
    "PROMPT_TEMPLATE",
    "QWEN3VL_8B_TEXT",
    "QWEN3VL_8B_VISION",
    "SYSTEM_PROMPT",
    "TEXT_ENCODER21_SPEC",
    "QwenImage21Processor",
    "QwenImage21TextEncoder",
    "config_from_state",
    "encode_prompts21",
    "image_prefix",
    "load_processor",
    "qwen3vl_8b_config",
    "system_turn_length",
    "vision_copy",
]
