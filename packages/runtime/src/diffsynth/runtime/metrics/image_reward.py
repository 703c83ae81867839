"""ImageReward (Xu et al. 2023): a BLIP text encoder reads the prompt while cross-attending to the ViT image
tokens; an MLP on the first token's output gives a reward, normalised by the training set's mean and std.

As ImageReward and DiffSynth-Studio score: the image is resized bicubically (shorter side to 224), centre-cropped
to 224x224 and normalised with CLIP's mean/std; the prompt is BERT-tokenised and padded to 35 tokens; the BLIP
ViT-L/16 (`vision_model`, its `last_hidden_state`, final LayerNorm included) feeds the text encoder's
cross-attention (transformers' `BlipTextModel`, run bidirectionally: `is_decoder=False`); the MLP (768 -> 1024 ->
128 -> 64 -> 16 -> 1, no activations) maps the first token to the reward; the score is (reward - 0.16717) / 1.03334.

DiffSynth-Studio's `ImageReward/model.safetensors` is ImageReward's own checkpoint: `blip.visual_encoder.*` in timm
ViT names (converted here to transformers' BLIP names, as DiffSynth-Studio converts them), `blip.text_encoder.*`
in BERT names (transformers' `BlipTextModel` uses the same), `blip.vision_proj/text_proj` (BLIP's contrastive heads,
unused by the score and dropped) and `mlp.layers.*`. Files already in transformers' names (DiffSynth-Studio's
`ImageRewardModel` state dict, with its zero `itm_head`) load too. The BLIP config is read from a `config.json`
beside the weights (`vision_config` / `text_config` entries override) or derived from the shapes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import torch

from ..errors import CheckpointError, ConfigError
from ..hub import ModelConfig
from .aesthetic import AestheticMLP
from .base import (
    Metric,
    as_images,
    build_on_meta,
    check_batch_size,
    convert_keys,
    default_config,
    grid_side,
    load_strict,
    pick_device,
    pick_dtype,
    read_json_beside,
    read_state_dict,
    resolve_files,
    resolve_folder,
)
from .lpips import resize_center_crop, to_unit_tensor

SCORE_MEAN = 0.16717362830052426  # ImageReward's published reward statistics
SCORE_STD = 1.0333394966054072
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
VISION_HEADS = {1024: 16, 768: 12}  # BLIP ViT-L / ViT-B

# timm ViT names inside a block -> transformers' BlipEncoderLayer names
_VIT_BLOCK = {
    "norm1.": "layer_norm1.",
    "attn.qkv.": "self_attn.qkv.",
    "attn.proj.": "self_attn.projection.",
    "norm2.": "layer_norm2.",
    "mlp.fc1.": "mlp.fc1.",
    "mlp.fc2.": "mlp.fc2.",
}
IMAGE_REWARD_RULES = (
    ("blip.text_encoder.embeddings.position_ids", None),  # rebuilt by the model
    ("blip.vision_model.", "blip.vision_model."),
    ("blip.text_encoder.", "blip.text_encoder."),
    ("blip.vision_proj.", None),  # BLIP's contrastive and matching heads: not part of the score
    ("blip.text_proj.", None),
    ("blip.itm_head.", None),
    ("mlp.layers.", "mlp.layers."),
)


def timm_vit_to_transformers(key: str) -> str:
    """One `blip.visual_encoder.*` key (BLIP's timm-style ViT) as transformers' `BlipVisionModel` key."""
    rest = key[len("blip.visual_encoder.") :]
    target = "blip.vision_model."
    if rest == "cls_token":
        return target + "embeddings.class_embedding"
    if rest == "pos_embed":
        return target + "embeddings.position_embedding"
    if rest.startswith("patch_embed.proj."):
        return target + "embeddings.patch_embedding." + rest[len("patch_embed.proj.") :]
    if rest.startswith("norm."):
        return target + "post_layernorm." + rest[len("norm.") :]
    if m := re.fullmatch(r"blocks\.(\d+)\.(.+)", rest):
        for source, name in _VIT_BLOCK.items():
            if m.group(2).startswith(source):
                return f"{target}encoder.layers.{m.group(1)}.{name}{m.group(2)[len(source) :]}"
    raise CheckpointError(f"ImageReward key {key!r} is not part of BLIP's ViT")


def convert_image_reward(state: Mapping[str, torch.Tensor], label: str) -> dict[str, torch.Tensor]:
    """ImageReward's checkpoint names (or DiffSynth-Studio's converted ones) -> this module's names."""
    renamed = {}
    for key, value in state.items():
        key = key[len("module.") :] if key.startswith("module.") else key
        if key.startswith("blip.visual_encoder."):
            key = timm_vit_to_transformers(key)
        renamed[key] = value
    return convert_keys(renamed, IMAGE_REWARD_RULES, label)


def _count(shapes: Mapping[str, tuple], prefix: str) -> int:
    found = {int(m.group(1)) for k in shapes if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    if not found:
        raise CheckpointError(f"no {prefix}<i> keys: the file is not an ImageReward BLIP")
    return max(found) + 1


def blip_config_from_shapes(shapes: Mapping[str, tuple]) -> dict:
    """`vision_config` / `text_config` dicts (transformers' BLIP) for this module's key shapes.

    Head counts are not in the shapes: BLIP ViT-L has 16 (ViT-B 12, others width / 64), BERT width / 64; the rest
    (epsilons, GELU, 0 = [PAD]) are BLIP's. For the released file this is DiffSynth-Studio's default BLIP config.
    """
    v, t = "blip.vision_model.", "blip.text_encoder."
    try:
        width = shapes[v + "embeddings.class_embedding"][-1]
        patch = shapes[v + "embeddings.patch_embedding.weight"][-1]
        positions = shapes[v + "embeddings.position_embedding"][1]
        vocab, text_width = shapes[t + "embeddings.word_embeddings.weight"]
        text_positions = shapes[t + "embeddings.position_embeddings.weight"][0]
        vision_inner = shapes[v + "encoder.layers.0.mlp.fc1.weight"][0]
        text_inner = shapes[t + "encoder.layer.0.intermediate.dense.weight"][0]
        encoder_width = shapes[t + "encoder.layer.0.crossattention.self.key.weight"][1]
    except KeyError as exc:
        raise CheckpointError(f"the ImageReward BLIP has no {exc.args[0]!r}") from None
    side = grid_side(positions)
    vision = {
        "hidden_size": width,
        "intermediate_size": vision_inner,
        "num_hidden_layers": _count(shapes, v + "encoder.layers."),
        "num_attention_heads": VISION_HEADS.get(width, max(1, width // 64)),
        "image_size": side * patch,
        "patch_size": patch,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-6,
    }
    text = {
        "vocab_size": vocab,
        "hidden_size": text_width,
        "intermediate_size": text_inner,
        "num_hidden_layers": _count(shapes, t + "encoder.layer."),
        "num_attention_heads": max(1, text_width // 64),
        "max_position_embeddings": text_positions,
        "encoder_hidden_size": encoder_width,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0,
        "is_decoder": True,  # transformers builds the cross-attention layers only for a decoder config
    }
    return {"vision_config": vision, "text_config": text}


class BlipReward(torch.nn.Module):
    """The parts of BLIP the reward uses: the ViT and the cross-attending text encoder (transformers' modules)."""

    def __init__(self, vision_config: dict, text_config: dict):
        super().__init__()
        from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

        self.vision_model = BlipVisionModel(BlipVisionConfig(**vision_config))
        self.text_encoder = BlipTextModel(BlipTextConfig(**text_config), add_pooling_layer=False)


class RewardHead(torch.nn.Module):
    """ImageReward's MLP (`layers.0/2/4/6/7`: width -> 1024 -> 128 -> 64 -> 16 -> 1), the aesthetic predictor's."""

    def __init__(self, width: int):
        super().__init__()
        self.layers = AestheticMLP(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def image_reward_pixels(image, size: int = 224) -> torch.Tensor:
    """[3, size, size]: bicubic resize of the shorter side, centre crop, CLIP normalisation (ImageReward's)."""
    pixels = to_unit_tensor(resize_center_crop(image, size))
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    return (pixels - mean) / std


def pair_prompts_and_images(prompt, images) -> tuple[list[str], list]:
    """As ImageReward: one prompt scores every image, one image is scored for every prompt, else one per image."""
    images = as_images(images)
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ConfigError(f"prompt must be a string or a non-empty list of strings, got {prompt!r:.80}")
    prompts = list(prompts)
    if len(prompts) == 1:
        prompts = prompts * len(images)
    elif len(images) == 1:
        images = images * len(prompts)
    if len(prompts) != len(images):
        raise ConfigError(
            f"prompt has {len(prompts)} entries but images has {len(images)}: give one prompt per image, a single "
            "prompt for every image, or a single image for every prompt"
        )
    return prompts, images


class ImageRewardMetric(Metric):
    """ImageReward score of each (prompt, image) pair; higher means more preferred by people (about N(0, 1))."""

    def __init__(
        self,
        blip: BlipReward,
        mlp: RewardHead,
        tokenizer,
        max_length: int = 35,
        batch_size: int = 16,
        mean: float = SCORE_MEAN,
        std: float = SCORE_STD,
    ):
        super().__init__()
        self.blip = blip
        self.mlp = mlp
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = check_batch_size(batch_size)
        self.score_mean = mean
        self.score_std = std
        self.image_size = blip.vision_model.config.image_size

    @classmethod
    def from_pretrained(
        cls,
        model_config: ModelConfig | str | os.PathLike | None = None,
        tokenizer_config: ModelConfig | str | os.PathLike | None = None,
        torch_dtype: torch.dtype | str | None = None,
        device: str | torch.device | None = None,
        max_length: int = 35,
        tokenizer_kwargs: dict | None = None,
        batch_size: int = 16,
    ):
        """Load the weights (`ImageReward/model.safetensors`) and the BERT tokenizer folder (`ImageReward/`)."""
        check_batch_size(batch_size)
        from transformers import BertTokenizer

        files = resolve_files(model_config or default_config("ImageReward/model.safetensors"), "model_config")
        folder = resolve_folder(tokenizer_config or default_config("ImageReward/"), "tokenizer_config")
        tokenizer = BertTokenizer.from_pretrained(folder, **(tokenizer_kwargs or {}))
        # BLIP's tokenizer: [DEC] as BOS and [ENC] (30522, 30523 in bert-base-uncased; the embedding has 30524 rows)
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
        tokenizer.add_tokens(["[ENC]"], special_tokens=True)
        label = ", ".join(files)
        state = convert_image_reward(read_state_dict(files), label)
        config = blip_config_from_shapes({k: tuple(v.shape) for k, v in state.items()})
        special = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id}
        config["text_config"].update(special, sep_token_id=tokenizer.sep_token_id)  # BLIP's ids are the tokenizer's
        given = read_json_beside(files, folder) or {}
        for part in ("vision_config", "text_config"):
            config[part].update(given.get(part) or {})
        if "blip.text_encoder.embeddings.word_embeddings.weight" in state:
            vocab = state["blip.text_encoder.embeddings.word_embeddings.weight"].shape[0]
            if len(tokenizer) > vocab:
                raise ConfigError(
                    f"tokenizer_config {folder} has {len(tokenizer)} tokens with [DEC]/[ENC], more than the "
                    f"{vocab} rows of the text embedding in {label}: it is not ImageReward's tokenizer"
                )
        width = config["text_config"]["hidden_size"]
        metric = build_on_meta(
            lambda: cls(
                BlipReward(config["vision_config"], config["text_config"]),
                RewardHead(width),
                tokenizer,
                max_length=max_length,
                batch_size=batch_size,
            )
        )
        load_strict(metric, state, label)
        return metric._ready(pick_device(device), pick_dtype(torch_dtype), keep_float32=lambda m: m.mlp.float())

    @property
    def dtype(self) -> torch.dtype:
        return self.blip.vision_model.embeddings.class_embedding.dtype

    @torch.no_grad()
    def rewards(self, prompts: list[str], images: list) -> torch.Tensor:
        """Normalised rewards (float32, [N]) of paired prompts and RGB PIL images, in one forward pass."""
        tokens = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        pixels = torch.stack([image_reward_pixels(image, self.image_size) for image in images])
        image_embeds = self.blip.vision_model(pixel_values=pixels.to(self.device, self.dtype)).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        text = self.blip.text_encoder(
            input_ids=tokens["input_ids"].to(self.device),
            attention_mask=tokens["attention_mask"].to(self.device),
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
            is_decoder=False,
        ).last_hidden_state
        reward = self.mlp(text[:, 0, :].float()).squeeze(-1)
        return (reward - self.score_mean) / self.score_std

    @torch.no_grad()
    def score(self, prompt: str | list[str], images) -> list[float]:
        """One score per (prompt, image) pair; see `pair_prompts_and_images` for how they are paired."""
        prompts, images = pair_prompts_and_images(prompt, images)
        out = [
            self.rewards(prompts[i : i + self.batch_size], images[i : i + self.batch_size])
            for i in range(0, len(images), self.batch_size)
        ]
        return self.tensor_to_list(torch.cat(out))

    def compute(self, prompt: str | list[str], images) -> list[float]:
        return self.score(prompt, images)

    def forward(self, prompt: str | list[str], images) -> list[float]:
        return self.score(prompt, images)
