"""Nexus-Gen V2 (DiffSynth-Studio/Nexus-GenV2): a Qwen2.5-VL-7B that predicts image embeddings a FLUX.1 DiT draws.

Files of the repo, as DiffSynth-Studio loads them:

- `model*.safetensors`: the autoregressive model, Qwen2.5-VL-7B-Instruct's causal-LM layout (`model.*`, `visual.*`,
  `lm_head.weight`) plus `vision_head.weight` (hidden -> hidden, read at every position) and
  `image_prefill_embeds.weight` (81 learned input embeddings). Loaded into `NexusGenAutoregressiveModel`
  (transformers' `Qwen2_5_VLModel` + those two); `lm_head` is dropped on purpose (no text is generated);
- `processor/`: its image processor and tokenizer (`NexusGenProcessor`);
- `edit_decoder.bin` / `generation_decoder.bin`: a fine-tuned FLUX.1 DiT under `pipe.dit.` in DiffSynth-Studio's
  own module names (converted here to BFL's, `NEXUS_GEN_DIT_SPEC`; its `final_norm_out.linear` stores
  (scale, shift), swapped into BFL's (shift, scale) as DiffSynth-Studio's converter does) and the editing or
  generation adapter (`nexus_gen_projector.py`).

The image embeddings (DiffSynth-Studio's `get_target_embeddings`): a chat turn asking for an image
("Generate an image according to the following description: ..." / the edit instruction after the reference image)
answered by "Here is ...: <image>", whose image is a white 252 x 252 placeholder (9 x 9 = 81 merged patches). The
reference's vision embeddings fill its slots; the placeholder's 81 slots get `image_prefill_embeds` instead; one
causal forward, and `vision_head` of the hidden state *before* each placeholder slot is that slot's prediction.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from PIL import Image
from torch import nn
from transformers import Qwen2_5_VLConfig

from diffsynth.runtime.errors import ConfigError, DiffSynthError
from diffsynth.runtime.models import qwen25vl
from diffsynth.runtime.models.qwen25vl import Qwen25VLTextEncoder
from diffsynth.runtime.registry import KeyLayout, ModelSpec, StateDict

from ..step1x import vision_size
from .dit import Flux1DiT
from .formats import config_from_state as dit_config_from_state
from .nexus_gen_projector import NEXUS_GEN_EDITING_ADAPTER_SPEC, NEXUS_GEN_GENERATION_ADAPTER_SPEC

REPO = "DiffSynth-Studio/Nexus-GenV2"
TARGET_TOKENS = 81  # merged patches of the placeholder image (and rows of image_prefill_embeds)
PLACEHOLDER_SIZE = 252  # the white placeholder image's side (18 x 18 patches of 14)
# DiffSynth-Studio's `bound_image`: qwen_vl_utils' resize with these limits before the processor's own
REFERENCE_MIN_PIXELS, REFERENCE_MAX_PIXELS = 4 * 28 * 28, 262640
IMAGE = "<image>"
IMAGE_TOKENS = "<|vision_start|><|image_pad|><|vision_end|>"
IMAGE_PAD = "<|image_pad|>"


def generation_messages(prompt: str) -> list[dict]:
    return [
        {"role": "user", "content": f"Generate an image according to the following description: {prompt}"},
        {"role": "assistant", "content": f"Here is an image based on the description: {IMAGE}"},
    ]


def editing_messages(instruction: str) -> list[dict]:
    if IMAGE not in instruction:
        instruction = f"{IMAGE} {instruction}"
    return [{"role": "user", "content": instruction}, {"role": "assistant", "content": f"Here is the image: {IMAGE}"}]


def chat_text(messages: Sequence[dict]) -> str:
    """Qwen2.5-VL's chat template for text messages (default system turn, no generation prompt), with each
    `<image>` made a vision block: what `apply_chat_template` + DiffSynth-Studio's replacement give."""
    text = "" if messages[0]["role"] == "system" else "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    text += "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text.replace(IMAGE, IMAGE_TOKENS)


class NexusGenProcessor:
    """Qwen2.5-VL inputs as transformers' `Qwen2_5_VLProcessor` makes them (each `<|image_pad|>` repeated once
    per merged patch of its image), from the repo's `processor/` folder (image processor + tokenizer)."""

    def __init__(self, image_processor, tokenizer):
        self.image_processor = image_processor
        self.tokenizer = tokenizer

    @classmethod
    def from_folder(cls, folder) -> NexusGenProcessor:
        from transformers import AutoImageProcessor, AutoTokenizer

        return cls(AutoImageProcessor.from_pretrained(str(folder)), AutoTokenizer.from_pretrained(str(folder)))

    def __call__(self, prompt: str, reference: Image.Image | None = None) -> dict[str, torch.Tensor]:
        placeholder = Image.new("RGB", (PLACEHOLDER_SIZE, PLACEHOLDER_SIZE), (255, 255, 255))
        if reference is None:
            messages, images = generation_messages(prompt), [placeholder]
        else:
            reference = reference.convert("RGB")
            size = vision_size(reference.width, reference.height, REFERENCE_MIN_PIXELS, REFERENCE_MAX_PIXELS)
            messages, images = editing_messages(prompt), [reference.resize(size, Image.BICUBIC), placeholder]
        text = chat_text(messages)
        if text.count(IMAGE_PAD) != len(images):
            raise ConfigError(
                f"prompt {prompt!r} has {text.count(IMAGE_PAD) - len(images)} extra {IMAGE!r} marks; Nexus-Gen "
                "takes one image (nexus_gen_reference_image)"
            )
        vision = self.image_processor(images=images, return_tensors="pt")
        merge = self.image_processor.merge_size**2
        pieces = text.split(IMAGE_PAD)
        text = pieces[0] + "".join(
            IMAGE_PAD * (int(grid.prod()) // merge) + piece
            for grid, piece in zip(vision["image_grid_thw"], pieces[1:], strict=True)
        )
        input_ids = self.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        return {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "pixel_values": vision["pixel_values"],
            "image_grid_thw": vision["image_grid_thw"],
        }


class NexusGenAutoregressiveModel(Qwen25VLTextEncoder):
    """Qwen2.5-VL-7B (transformers' `Qwen2_5_VLModel`) with Nexus-Gen's image head and prefill embeddings."""

    def __init__(self, config: Qwen2_5_VLConfig):
        super().__init__(config)
        hidden = config.text_config.hidden_size
        self.vision_head = nn.Linear(hidden, hidden, bias=False)
        self.image_prefill_embeds = nn.Embedding(TARGET_TOKENS, hidden)

    @torch.no_grad()
    def image_embeddings(self, inputs: dict[str, torch.Tensor], device=None):
        """(predicted `[81, hidden]`, reference vision embeddings `[N, hidden]`, `image_grid_thw` `[n, 3]`) for
        one sequence of `NexusGenProcessor` whose last image is the placeholder; computed on `device` (default:
        where the image head is)."""
        device = device if device is not None else self.vision_head.weight.device
        input_ids = inputs["input_ids"].to(device)
        mask = inputs["attention_mask"].to(device)
        grid = inputs["image_grid_thw"].to(device)
        embeds = self.language_model.embed_tokens(input_ids)
        pixels = inputs["pixel_values"].to(device, self.visual.dtype)
        vision = torch.cat(self.get_image_features(pixels, grid).pooler_output).to(embeds.dtype)
        slots = input_ids == self.config.image_token_id
        given = vision.shape[0] - TARGET_TOKENS
        inputs_slots = slots & (slots.cumsum(dim=1) <= given)
        target_slots = slots & ~inputs_slots
        if int(target_slots.sum()) != TARGET_TOKENS or given < 0:
            raise ValueError(f"the placeholder image gives {int(target_slots.sum())} tokens; expected {TARGET_TOKENS}")
        embeds = embeds.masked_scatter(inputs_slots[..., None].expand_as(embeds), vision[:given])
        prefill = self.image_prefill_embeds.weight.to(embeds.dtype)
        embeds = embeds.masked_scatter(target_slots[..., None].expand_as(embeds), prefill)
        positions, _ = self.get_rope_index(input_ids, slots.int(), image_grid_thw=grid, attention_mask=mask)
        hidden = self.language_model(
            inputs_embeds=embeds, position_ids=positions, attention_mask=mask, use_cache=False
        ).last_hidden_state
        predicted = self.vision_head(hidden[:, :-1][target_slots[:, 1:]])
        return predicted, vision[:given], grid


# ----------------------------------------------------------------------------------- formats
_AR_EXTRA = ("vision_head.weight", "image_prefill_embeds.weight")


def _ar_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    extra = {k: state.pop(k) for k in _AR_EXTRA if k in state}
    return {**qwen25vl.LAYOUTS[0].convert(state), **extra}  # the Qwen2.5-VL hub layout (drops lm_head)


def _ar_config(state: StateDict, config_json: dict | None = None) -> Qwen2_5_VLConfig:
    return qwen25vl.config_from_state(state, config_json)


NEXUS_GEN_AR_SPEC = ModelSpec(
    name="nexus_gen_autoregressive",
    role="nexus_gen",
    layouts=(
        KeyLayout(
            "diffsynth",
            qwen25vl.LAYOUTS[0].signature + _AR_EXTRA,
            convert=_ar_to_ours,
            owns_prefixes=("model.", "visual.", "lm_head.", *_AR_EXTRA),
        ),
    ),
    config_from_state=_ar_config,
    build=NexusGenAutoregressiveModel,
    description="Nexus-Gen V2 autoregressive model (Qwen2.5-VL-7B with vision_head and image_prefill_embeds)",
)

# DiffSynth-Studio's FluxDiT names -> BFL's (`.weight` / `.bias` appended unless given); `{}` is the block index
_DIT_TOP = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_embedder.timestep_embedder.0": "time_in.in_layer",
    "time_embedder.timestep_embedder.2": "time_in.out_layer",
    "guidance_embedder.timestep_embedder.0": "guidance_in.in_layer",
    "guidance_embedder.timestep_embedder.2": "guidance_in.out_layer",
    "pooled_text_embedder.0": "vector_in.in_layer",
    "pooled_text_embedder.2": "vector_in.out_layer",
    "final_norm_out.linear": "final_layer.adaLN_modulation.1",
    "final_proj_out": "final_layer.linear",
}
_DIT_DOUBLE = {
    "norm1_a.linear": "img_mod.lin",
    "norm1_b.linear": "txt_mod.lin",
    "attn.a_to_qkv": "img_attn.qkv",
    "attn.b_to_qkv": "txt_attn.qkv",
    "attn.a_to_out": "img_attn.proj",
    "attn.b_to_out": "txt_attn.proj",
    "ff_a.0": "img_mlp.0",
    "ff_a.2": "img_mlp.2",
    "ff_b.0": "txt_mlp.0",
    "ff_b.2": "txt_mlp.2",
}
_DIT_SINGLE = {"to_qkv_mlp": "linear1", "proj_out": "linear2", "norm.linear": "modulation.lin"}
_DIT_NORMS = {
    "blocks.{}.attn.norm_q_a.weight": "double_blocks.{}.img_attn.norm.query_norm.scale",
    "blocks.{}.attn.norm_k_a.weight": "double_blocks.{}.img_attn.norm.key_norm.scale",
    "blocks.{}.attn.norm_q_b.weight": "double_blocks.{}.txt_attn.norm.query_norm.scale",
    "blocks.{}.attn.norm_k_b.weight": "double_blocks.{}.txt_attn.norm.key_norm.scale",
    "single_blocks.{}.norm_q_a.weight": "single_blocks.{}.norm.query_norm.scale",
    "single_blocks.{}.norm_k_a.weight": "single_blocks.{}.norm.key_norm.scale",
}
DIFFSYNTH_DIT_TO_OURS: dict[str, str] = {
    **{f"{src}.{s}": f"{dst}.{s}" for src, dst in _DIT_TOP.items() for s in ("weight", "bias")},
    **{f"blocks.{{}}.{src}.{s}": f"double_blocks.{{}}.{dst}.{s}" for src, dst in _DIT_DOUBLE.items() for s in ("weight", "bias")},
    **{f"single_blocks.{{}}.{src}.{s}": f"single_blocks.{{}}.{dst}.{s}" for src, dst in _DIT_SINGLE.items() for s in ("weight", "bias")},
    **_DIT_NORMS,
}  # fmt: skip
_SWAPPED = ("final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias")
_BLOCK = re.compile(r"^((?:single_)?blocks)\.(\d+)\.(.+)$")


def diffsynth_dit_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Nexus-Gen decoder's DiT (DiffSynth-Studio's FluxDiT names, `pipe.dit.` stripped) in BFL's names; the final
    modulation's halves swapped to (shift, scale)."""
    out = {}
    for key, value in state.items():
        match = _BLOCK.match(key)
        name = f"{match.group(1)}.{{}}.{match.group(3)}" if match else key
        if name not in DIFFSYNTH_DIT_TO_OURS:
            raise KeyError(f"Nexus-Gen decoder DiT: no mapping for key 'pipe.dit.{key}'")
        ours = DIFFSYNTH_DIT_TO_OURS[name].format(match.group(2)) if match else DIFFSYNTH_DIT_TO_OURS[name]
        if ours in _SWAPPED:
            value = torch.cat(value.chunk(2, dim=0)[::-1])
        out[ours] = value
    return out


NEXUS_GEN_DIT_SPEC = ModelSpec(
    name="nexus_gen_dit",
    role="dit",
    layouts=(
        KeyLayout(
            "diffsynth",
            ("x_embedder.weight", "context_embedder.weight", "blocks.0.attn.a_to_qkv.weight", "final_proj_out.weight"),
            prefix="pipe.dit.",
            convert=diffsynth_dit_to_ours,
        ),
    ),
    config_from_state=dit_config_from_state,
    build=Flux1DiT,
    description="Nexus-Gen V2 decoder DiT (pipe.dit.* of edit_decoder.bin / generation_decoder.bin)",
)
NEXUS_GEN_SPECS = (
    NEXUS_GEN_AR_SPEC,
    NEXUS_GEN_DIT_SPEC,
    NEXUS_GEN_EDITING_ADAPTER_SPEC,
    NEXUS_GEN_GENERATION_ADAPTER_SPEC,
)


def is_nexus_gen_file(paths) -> bool:
    """Whether the files hold Nexus-Gen's autoregressive model or one of its decoders (told from the keys)."""
    from diffsynth.runtime.checkpoint import open_checkpoint

    try:
        keys = set(open_checkpoint(paths))
    except DiffSynthError:
        return False  # not a state dict this reads; the pipeline's own loading names the problem
    return NEXUS_GEN_AR_SPEC.match(keys) is not None or NEXUS_GEN_DIT_SPEC.match(keys) is not None


def editing_text_ids(latent_height: int, latent_width: int, target_grid, reference_grid) -> torch.Tensor:
    """`[81 + N, 3]` DiT position ids of the editing adapter's tokens (DiffSynth-Studio's `get_editing_text_ids`):
    each grid's merged patches at (index, row, col), rows and columns scaled by latent size / patch-grid size;
    index 0 for the predicted image, 1 for the reference."""

    def grid_ids(grid, index: float) -> torch.Tensor:
        h, w = int(grid[1]), int(grid[2])
        ids = torch.zeros(h // 2, w // 2, 3)
        ids[..., 0] = index
        ids[..., 1] = torch.arange(h // 2)[:, None] * (latent_height / h)
        ids[..., 2] = torch.arange(w // 2)[None, :] * (latent_width / w)
        return ids.reshape(-1, 3)

    return torch.cat([grid_ids(target_grid, 0.0), grid_ids(reference_grid, 1.0)])
