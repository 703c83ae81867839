"""Prompt-image scores from a CLIP model: CLIP score, PickScore, HPSv2.

All three are `logit_scale.exp() * cos(text embedding, image embedding)` of one CLIP model, as DiffSynth-Studio
computes them; they differ in the weights. PickScore (Kirstain et al. 2023) defines exactly this score (a CLIP-H
fine-tuned on Pick-a-Pic). For CLIP score we keep DiffSynth-Studio's definition, the scaled cosine *without* the
`max(cos, 0)` clamp of torchmetrics' CLIPScore; with LAION's CLIP-ViT-H-14 (logit_scale = ln 100) it is `100 * cos`.
HPSv2's own package reports the plain cosine; DiffSynth-Studio (and we) report `logit_scale.exp()` times it.

The model is transformers' `CLIPModel`. Its config is read from a `config.json` beside the weights or in the
processor folder, else derived from the weight shapes (head counts: 64-wide text heads, the released CLIP vision
widths' head counts; activation `hidden_act`, GELU by default as in LAION's open_clip models and PickScore).
HPSv2 files are in open_clip's layout and are converted to transformers' names.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

import torch

from ..errors import CheckpointError, ConfigError
from ..hub import ModelConfig
from .base import (
    Metric,
    build_on_meta,
    check_batch_size,
    convert_keys,
    default_config,
    grid_side,
    load_strict,
    pair_prompts,
    pick_device,
    pick_dtype,
    read_json_beside,
    read_state_dict,
    resolve_files,
    resolve_folder,
)

logger = logging.getLogger(__name__)

# transformers' CLIPModel layout (PickScore/, CLIP-ViT-H-14-laion2B-s32B-b79K/); position ids are rebuilt
HF_CLIP_RULES = (
    ("text_model.embeddings.position_ids", None),
    ("vision_model.embeddings.position_ids", None),
    ("text_model.", "text_model."),
    ("vision_model.", "vision_model."),
    ("text_projection.", "text_projection."),
    ("visual_projection.", "visual_projection."),
    ("logit_scale", "logit_scale"),
)
# head counts of the released CLIP vision towers by width (B: 12, L: 16, H: 16 of 80, bigG: 16 of 104)
VISION_HEADS = {768: 12, 1024: 16, 1280: 16, 1664: 16}


def _layers(shapes: Mapping[str, tuple], prefix: str) -> int:
    found = {int(m.group(1)) for k in shapes if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    if not found:
        raise CheckpointError(f"no {prefix}<i> keys: the file is not a CLIP model")
    return max(found) + 1


def vision_config_from_shapes(shapes: Mapping[str, tuple], prefix: str, hidden_act: str) -> dict:
    """A `CLIPVisionConfig` dict for the vision tower whose keys start with `prefix` ("vision_model.")."""
    try:
        hidden = shapes[prefix + "embeddings.class_embedding"][0]
        patch = shapes[prefix + "embeddings.patch_embedding.weight"][-1]
        positions = shapes[prefix + "embeddings.position_embedding.weight"][0]
        inner = shapes[prefix + "encoder.layers.0.mlp.fc1.weight"][0]
    except KeyError as exc:
        raise CheckpointError(f"the CLIP vision tower has no {exc.args[0]!r}") from None
    side = grid_side(positions)
    return {
        "hidden_size": hidden,
        "intermediate_size": inner,
        "num_hidden_layers": _layers(shapes, prefix + "encoder.layers."),
        "num_attention_heads": VISION_HEADS.get(hidden, max(1, hidden // 64)),
        "image_size": side * patch,
        "patch_size": patch,
        "hidden_act": hidden_act,
        "layer_norm_eps": 1e-5,
    }


def clip_config_from_shapes(shapes: Mapping[str, tuple], tokenizer, hidden_act: str) -> dict:
    """A `CLIPConfig` dict from a transformers-layout CLIP's shapes; token ids come from its tokenizer."""
    try:
        vocab, width = shapes["text_model.embeddings.token_embedding.weight"]
        projection = shapes["text_projection.weight"][0]
        text = {
            "vocab_size": vocab,
            "hidden_size": width,
            "intermediate_size": shapes["text_model.encoder.layers.0.mlp.fc1.weight"][0],
            "num_hidden_layers": _layers(shapes, "text_model.encoder.layers."),
            "num_attention_heads": max(1, width // 64),
            "max_position_embeddings": shapes["text_model.embeddings.position_embedding.weight"][0],
            "hidden_act": hidden_act,
            "layer_norm_eps": 1e-5,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
    except KeyError as exc:
        raise CheckpointError(f"the CLIP text tower has no {exc.args[0]!r}") from None
    vision = vision_config_from_shapes(shapes, "vision_model.", hidden_act)
    return {"text_config": text, "vision_config": vision, "projection_dim": projection}


def open_clip_to_transformers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip's CLIP names (HPSv2's file) -> transformers' `CLIPModel` names; fused qkv is split.

    Projections are stored `[width, embed]` in open_clip (x @ proj) and `[embed, width]` in a Linear.
    """
    single = {
        "logit_scale": "logit_scale",
        "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "positional_embedding": "text_model.embeddings.position_embedding.weight",
        "ln_final.weight": "text_model.final_layer_norm.weight",
        "ln_final.bias": "text_model.final_layer_norm.bias",
        "visual.class_embedding": "vision_model.embeddings.class_embedding",
        "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
        "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
        "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
        "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
        "visual.ln_post.weight": "vision_model.post_layernorm.weight",
        "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    }
    block = {
        "attn.out_proj.": "self_attn.out_proj.",
        "ln_1.": "layer_norm1.",
        "ln_2.": "layer_norm2.",
        "mlp.c_fc.": "mlp.fc1.",
        "mlp.c_proj.": "mlp.fc2.",
    }
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in single:
            out[single[key]] = value
        elif key == "text_projection":
            out["text_projection.weight"] = value.T.contiguous()
        elif key == "visual.proj":
            out["visual_projection.weight"] = value.T.contiguous()
        elif m := re.fullmatch(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)", key):
            tower = "vision_model" if m.group(1) else "text_model"
            head, rest = f"{tower}.encoder.layers.{m.group(2)}.", m.group(3)
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = rest.rpartition("_")[2]
                for name, part in zip(("q", "k", "v"), value.chunk(3, dim=0), strict=True):
                    out[f"{head}self_attn.{name}_proj.{kind}"] = part.contiguous()
                continue
            source = next((s for s in block if rest.startswith(s)), None)
            if source is None:
                raise CheckpointError(f"open_clip key {key!r} has no transformers CLIP counterpart")
            out[head + block[source] + rest[len(source) :]] = value
        elif key == "attn_mask":
            continue  # open_clip's causal mask buffer; transformers builds its own
        else:
            raise CheckpointError(f"open_clip key {key!r} has no transformers CLIP counterpart")
    return out


class CLIPMetric(Metric):
    """CLIP score: `logit_scale.exp() * cos(text, image)` for each (prompt, image) pair (100 * cos for LAION CLIP-H)."""

    default_model = "CLIP-ViT-H-14-laion2B-s32B-b79K/model.safetensors"
    default_processor = "CLIP-ViT-H-14-laion2B-s32B-b79K/"
    open_clip_layout = False  # HPSv2's file is an open_clip state dict

    def __init__(self, model, processor, max_length: int = 77, batch_size: int = 16):
        super().__init__()
        self.model = model
        self.processor = processor
        self.max_length = max_length
        self.batch_size = check_batch_size(batch_size)

    @classmethod
    def from_pretrained(
        cls,
        model_config: ModelConfig | None = None,
        processor_config: ModelConfig | None = None,
        torch_dtype: torch.dtype | str | None = None,
        device: str | torch.device | None = None,
        max_length: int = 77,
        processor_kwargs: dict | None = None,
        hidden_act: str = "gelu",
        batch_size: int = 16,
    ):
        """Load the weights (`model_config`) and the CLIP processor folder (`processor_config`).

        Defaults are DiffSynth-Studio's files in the `DiffSynth-Studio/ImageMetrics` repo. `hidden_act` is used
        only when no `config.json` is found ("quick_gelu" for OpenAI's CLIP weights).
        """
        check_batch_size(batch_size)
        from transformers import AutoProcessor, CLIPConfig, CLIPModel

        model_config = model_config or default_config(cls.default_model)
        processor_config = processor_config or default_config(cls.default_processor)
        files = resolve_files(model_config, "model_config")
        folder = resolve_folder(processor_config, "processor_config")
        # the PIL image processor, the released models' own preprocessing, whether torchvision is installed or not
        # (transformers picks its torchvision one when it can, whose resize moves scores by ~1e-3)
        processor = AutoProcessor.from_pretrained(folder, **{"backend": "pil", **(processor_kwargs or {})})
        state = read_state_dict(files)
        label = ", ".join(files)
        if cls.open_clip_layout:
            state = open_clip_to_transformers(state)
        state = convert_keys(state, HF_CLIP_RULES, label)
        config_json = read_json_beside(files, folder)
        if config_json is None or "text_config" not in config_json:
            shapes = {k: tuple(v.shape) for k, v in state.items()}
            tokenizer = getattr(processor, "tokenizer", processor)
            config = CLIPConfig(**clip_config_from_shapes(shapes, tokenizer, hidden_act))
        else:
            config = CLIPConfig(**config_json)
        model = build_on_meta(lambda: CLIPModel(config))
        load_strict(model, state, label)
        metric = cls(model, processor, max_length=max_length, batch_size=batch_size)
        return metric._ready(pick_device(device), pick_dtype(torch_dtype))

    # ------------------------------------------------------------------ features
    @torch.no_grad()
    def text_features(self, prompts: list[str]) -> torch.Tensor:
        """L2-normalised projected text embeddings, float32, one row per prompt."""
        tokens = self.processor(
            text=prompts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        out = self.model.text_model(
            input_ids=tokens["input_ids"].to(self.device),
            attention_mask=tokens["attention_mask"].to(self.device) if "attention_mask" in tokens else None,
        )
        return torch.nn.functional.normalize(self.model.text_projection(out.pooler_output).float(), dim=-1)

    @torch.no_grad()
    def image_features(self, images) -> torch.Tensor:
        """L2-normalised projected image embeddings, float32, one row per image."""
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        out = self.model.vision_model(pixel_values=pixels.to(self.device, self.dtype))
        return torch.nn.functional.normalize(self.model.visual_projection(out.pooler_output).float(), dim=-1)

    # ------------------------------------------------------------------ scores
    @torch.no_grad()
    def score(self, prompt: str | list[str], images) -> list[float]:
        """One score per image: a single prompt scores every image, a list pairs prompts with images."""
        prompts, images = pair_prompts(prompt, images)
        scale = self.model.logit_scale.float().exp()
        shared = self.text_features([prompt]) if isinstance(prompt, str) else None
        scores = []
        for start in range(0, len(images), self.batch_size):
            chunk = slice(start, start + self.batch_size)
            text = shared if shared is not None else self.text_features(prompts[chunk])
            scores.append(scale * (text * self.image_features(images[chunk])).sum(dim=-1))
        return self.tensor_to_list(torch.cat(scores))

    @torch.no_grad()
    def similarity_matrix(self, prompt: str | list[str], images) -> list[list[float]]:
        """`logit_scale.exp() * cos` of every prompt (rows) with every image (columns)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        _, images = pair_prompts(prompts[0], images)
        matrix = self.text_features(prompts) @ self.image_features(images).T
        return (self.model.logit_scale.float().exp() * matrix).cpu().tolist()

    def compute(self, prompt: str | list[str], images) -> list[float]:
        return self.score(prompt, images)

    def forward(self, prompt: str | list[str], images) -> list[float]:
        return self.score(prompt, images)


class PickScoreMetric(CLIPMetric):
    """PickScore (Pick-a-Pic's preference model): `logit_scale.exp() * cos(text, image)` of its CLIP-H."""

    default_model = "PickScore/model.safetensors"
    default_processor = "PickScore/"

    @torch.no_grad()
    def probabilities(self, prompt: str, images) -> list[float]:
        """Softmax of one prompt's scores over the images: PickScore's chance each image is preferred."""
        if not isinstance(prompt, str):
            raise ConfigError("probabilities() takes one prompt (a string): it compares images for that prompt")
        return self.tensor_to_list(torch.tensor(self.score(prompt, images)).softmax(dim=-1))

    def calc_probs(self, prompt: str, images) -> list[float]:
        """PickScore's own name for `probabilities`."""
        return self.probabilities(prompt, images)


class HPSv2Metric(CLIPMetric):
    """HPSv2 (Human Preference Score v2): an open_clip ViT-H-14 fine-tuned on HPD v2; `logit_scale.exp() * cos`.

    HPSv2's package reports the plain cosine; divide by `logit_scale.exp()` (100) to compare with its numbers.
    """

    default_model = "HPSv2/model.safetensors"
    default_processor = "HPSv2/"
    open_clip_layout = True
