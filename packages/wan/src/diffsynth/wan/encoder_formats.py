"""How Wan's text and image encoder files are recognised, converted and configured.

Our modules are transformers classes (`UMT5EncoderModel`, `CLIPVisionModel`), so the transformers
layouts load as they are. The files Wan's hub repos ship are the authors' own layouts:

- `models_t5_umt5-xxl-enc-bf16.pth`: the umT5-XXL encoder, one relative position bias per layer.
  Renamed 1:1; the token embedding fills both `shared` and the tied `encoder.embed_tokens`.
- `models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`: the whole open-clip model. Only the
  vision tower (`visual.*`) is used; its fused `to_qkv` is split into q/k/v. The XLM-R text tower
  (`textual.*`), the projection head `visual.head` and `log_scale` are dropped on purpose.

Shapes give every size except the CLIP head count, which follows the released models (16 heads for
ViT-H/L widths) unless a config says otherwise. A `config.json` beside the file is used only when it
describes the same kind of model: Wan repos keep the DiT's `config.json` next to these `.pth` files.
"""

from __future__ import annotations

import re

import torch

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.models.t5_shapes import t5_shape_facts
from diffsynth.runtime.registry import KeyLayout, ModelSpec, StateDict, check_config_facts

# ----------------------------------------------------------------------------------------- umT5 encoder
_T5_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")
_T5_TOP = {
    "norm.weight": "encoder.final_layer_norm.weight",
}
_T5_BLOCK_PARTS = {  # authors' name in block {} -> transformers' name
    "norm1.weight": "encoder.block.{}.layer.0.layer_norm.weight",
    "attn.q.weight": "encoder.block.{}.layer.0.SelfAttention.q.weight",
    "attn.k.weight": "encoder.block.{}.layer.0.SelfAttention.k.weight",
    "attn.v.weight": "encoder.block.{}.layer.0.SelfAttention.v.weight",
    "attn.o.weight": "encoder.block.{}.layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "encoder.block.{}.layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "encoder.block.{}.layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "encoder.block.{}.layer.1.DenseReluDense.wi_0.weight",  # gelu(gate(x)) * fc1(x)
    "ffn.fc1.weight": "encoder.block.{}.layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "encoder.block.{}.layer.1.DenseReluDense.wo.weight",
}
_EMBED_KEYS = ("shared.weight", "encoder.embed_tokens.weight")


def umt5_from_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key == "token_embedding.weight":
            out.update(dict.fromkeys(_EMBED_KEYS, value))
        elif key in _T5_TOP:
            out[_T5_TOP[key]] = value
        elif (m := _T5_BLOCK.fullmatch(key)) and m.group(2) in _T5_BLOCK_PARTS:
            out[_T5_BLOCK_PARTS[m.group(2)].format(m.group(1))] = value
        else:
            raise KeyError(key)
    return out


def umt5_from_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Files usually store only `shared.weight` (the tied copy is implied); fill in whichever is absent."""
    out = dict(state)
    present = [k for k in _EMBED_KEYS if k in out]
    if not present:
        raise KeyError(_EMBED_KEYS[0])
    for key in _EMBED_KEYS:
        out.setdefault(key, out[present[0]])
    return out


# umT5-XXL released values for what shapes cannot tell (google/umt5-xxl config; Wan's t5.py).
UMT5_XXL_DEFAULTS = dict(
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
    layer_norm_epsilon=1e-6,
    tie_word_embeddings=True,
    dropout_rate=0.0,
)


def umt5_config_from_state(state: StateDict, config_json: dict | None = None):
    """`UMT5Config` from shapes (and a umT5/T5 `config.json` when one is beside the file)."""
    from transformers import UMT5Config

    facts = t5_shape_facts(state)
    given = config_json if config_json and config_json.get("model_type") in ("umt5", "t5") else None
    if given is None:
        return UMT5Config(**UMT5_XXL_DEFAULTS, **facts)
    fields = {k: v for k, v in given.items() if not k.startswith("_") and k not in ("architectures",)}
    config = UMT5Config(**{**UMT5_XXL_DEFAULTS, **fields})
    check_config_facts("umT5 config.json", config, facts)
    return config


def build_umt5(config):
    from .text_encoder import WanTextEncoder

    return WanTextEncoder(config)


_UMT5_ORIGINAL_SIGNATURE = (
    "token_embedding.weight",
    "blocks.0.attn.q.weight",
    "blocks.0.pos_embedding.embedding.weight",
    "blocks.0.ffn.gate.0.weight",
    "blocks.0.ffn.fc1.weight",
    "norm.weight",
)
# Per-layer relative position biases (block 1 has one too) tell umT5 from T5 v1.1, which has only block 0's.
_UMT5_TRANSFORMERS_SIGNATURE = (
    "shared.weight",
    "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
    "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight",
    "encoder.block.0.layer.1.DenseReluDense.wi_0.weight",
    "encoder.final_layer_norm.weight",
)

UMT5_SPEC = ModelSpec(
    name="umt5_encoder",
    role="text_encoder",
    layouts=(
        # The authors' `models_t5_umt5-xxl-enc-bf16.pth`.
        KeyLayout(
            "wan_original",
            _UMT5_ORIGINAL_SIGNATURE,
            convert=umt5_from_original,
            owns_prefixes=("token_embedding.", "blocks.", "norm."),
        ),
        # transformers' `UMT5EncoderModel` (diffusers-format Wan repos: `text_encoder/`).
        KeyLayout(
            "transformers",
            _UMT5_TRANSFORMERS_SIGNATURE,
            convert=umt5_from_transformers,
            owns_prefixes=("shared.", "encoder."),
        ),
    ),
    config_from_state=umt5_config_from_state,
    build=build_umt5,
    description="umT5-XXL encoder (Wan 2.1 / 2.2 text encoder)",
)

# ----------------------------------------------------------------------------------------- CLIP vision
_CLIP_LAYER = re.compile(r"visual\.transformer\.(\d+)\.(.+)")
_CLIP_TOP = {
    "visual.patch_embedding.weight": "embeddings.patch_embedding.weight",
    "visual.pre_norm.weight": "pre_layrnorm.weight",
    "visual.pre_norm.bias": "pre_layrnorm.bias",
    "visual.post_norm.weight": "post_layernorm.weight",
    "visual.post_norm.bias": "post_layernorm.bias",
}
_CLIP_LAYER_PARTS = {
    "norm1.weight": "encoder.layers.{}.layer_norm1.weight",
    "norm1.bias": "encoder.layers.{}.layer_norm1.bias",
    "attn.proj.weight": "encoder.layers.{}.self_attn.out_proj.weight",
    "attn.proj.bias": "encoder.layers.{}.self_attn.out_proj.bias",
    "norm2.weight": "encoder.layers.{}.layer_norm2.weight",
    "norm2.bias": "encoder.layers.{}.layer_norm2.bias",
    "mlp.0.weight": "encoder.layers.{}.mlp.fc1.weight",
    "mlp.0.bias": "encoder.layers.{}.mlp.fc1.bias",
    "mlp.2.weight": "encoder.layers.{}.mlp.fc2.weight",
    "mlp.2.bias": "encoder.layers.{}.mlp.fc2.bias",
}
_CLIP_QKV = {"attn.to_qkv.weight": "weight", "attn.to_qkv.bias": "bias"}  # rows are [q; k; v]
_CLIP_DROPPED = re.compile(r"textual\..*|log_scale|visual\.head")  # text tower, its logit scale, the projection


def clip_from_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if _CLIP_DROPPED.fullmatch(key):
            continue
        if key == "visual.cls_embedding":  # [1, 1, D]
            out["embeddings.class_embedding"] = value.reshape(value.shape[-1])
        elif key == "visual.pos_embedding":  # [1, 1 + patches, D]
            out["embeddings.position_embedding.weight"] = value.reshape(value.shape[-2], value.shape[-1])
        elif key in _CLIP_TOP:
            out[_CLIP_TOP[key]] = value
        elif (m := _CLIP_LAYER.fullmatch(key)) and m.group(2) in _CLIP_LAYER_PARTS:
            out[_CLIP_LAYER_PARTS[m.group(2)].format(m.group(1))] = value
        elif (m := _CLIP_LAYER.fullmatch(key)) and m.group(2) in _CLIP_QKV:
            for name, part in zip("qkv", value.chunk(3, dim=0), strict=True):
                out[f"encoder.layers.{m.group(1)}.self_attn.{name}_proj.{_CLIP_QKV[m.group(2)]}"] = part
        else:
            raise KeyError(key)
    return out


def clip_from_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5 names, or the 4.x / hub-file names under `vision_model.` (projection dropped)."""
    out = {}
    for key, value in state.items():
        if key == "visual_projection.weight":
            continue
        name = key[len("vision_model.") :] if key.startswith("vision_model.") else key
        if name == "embeddings.position_ids":  # a buffer that older files stored; we rebuild it
            continue
        out[name] = value
    return out


_CLIP_NUM_LAYER = re.compile(r"encoder\.layers\.(\d+)\.")
_CLIP_HEADS_BY_WIDTH = {768: 12, 1024: 16, 1280: 16, 1664: 16}  # ViT-B, -L, -H, -bigG released head counts

# open-clip XLM-RoBERTa ViT-H/14 as Wan uses it (wan/modules/clip.py): exact GELU, LayerNorm eps 1e-5.
CLIP_VIT_H_DEFAULTS = dict(hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=1024, num_channels=3)


def _clip_facts(state: StateDict) -> dict[str, object]:
    hidden = state["embeddings.class_embedding"].shape[0]
    patch = state["embeddings.patch_embedding.weight"].shape[-1]
    positions = state["embeddings.position_embedding.weight"].shape[0]
    side = round((positions - 1) ** 0.5)
    if side * side != positions - 1:
        raise ConfigError(f"CLIP vision: {positions} position embeddings are not 1 + a square number of patches")
    layers = {int(m.group(1)) for k in state if (m := _CLIP_NUM_LAYER.match(k))}
    return dict(
        hidden_size=hidden,
        patch_size=patch,
        image_size=patch * side,
        num_hidden_layers=max(layers) + 1,
        intermediate_size=state["encoder.layers.0.mlp.fc1.weight"].shape[0],
    )


def clip_config_from_state(state: StateDict, config_json: dict | None = None):
    """`CLIPVisionConfig` from shapes; a CLIP(-vision) `config.json` supplies the head count and checks the rest."""
    from transformers import CLIPVisionConfig

    facts = _clip_facts(state)
    given = None
    if config_json:
        if isinstance(config_json.get("vision_config"), dict):  # a whole CLIPConfig
            given = config_json["vision_config"]
        elif config_json.get("model_type") == "clip_vision_model":
            given = config_json
        elif "model_type" not in config_json and "_class_name" not in config_json:  # a bare dict of fields
            given = config_json
    hidden = facts["hidden_size"]
    heads = _CLIP_HEADS_BY_WIDTH.get(hidden, max(1, hidden // 64))
    fields = {
        k: v for k, v in (given or {}).items() if not k.startswith("_") and k not in ("architectures", "model_type")
    }
    config = CLIPVisionConfig(**{**CLIP_VIT_H_DEFAULTS, "num_attention_heads": heads, **facts, **fields})
    check_config_facts("CLIP vision config", config, facts)
    if hidden % config.num_attention_heads:
        raise ConfigError(
            f"CLIP vision: hidden_size={hidden} is not divisible by num_attention_heads={config.num_attention_heads}"
        )
    return config


def build_clip(config):
    from .image_encoder import WanImageEncoder

    return WanImageEncoder(config)


_CLIP_ORIGINAL_SIGNATURE = (
    "visual.cls_embedding",
    "visual.pos_embedding",
    "visual.patch_embedding.weight",
    "visual.pre_norm.weight",
    "visual.transformer.0.attn.to_qkv.weight",
    "visual.post_norm.weight",
)
_CLIP_TRANSFORMERS_SIGNATURE = (
    "embeddings.class_embedding",
    "embeddings.patch_embedding.weight",
    "embeddings.position_embedding.weight",
    "pre_layrnorm.weight",
    "encoder.layers.0.self_attn.q_proj.weight",
    "post_layernorm.weight",
)

CLIP_VISION_SPEC = ModelSpec(
    name="clip_vision",
    role="image_encoder",
    layouts=(
        # The authors' open-clip file: all of it is taken (the text tower is dropped, not left over).
        KeyLayout(
            "wan_open_clip",
            _CLIP_ORIGINAL_SIGNATURE,
            convert=clip_from_original,
            owns_prefixes=("visual.", "textual.", "log_scale"),
        ),
        # transformers 5 `CLIPVisionModel.state_dict()`.
        KeyLayout(
            "transformers",
            _CLIP_TRANSFORMERS_SIGNATURE,
            convert=clip_from_transformers,
            owns_prefixes=("embeddings.", "pre_layrnorm.", "encoder.layers.", "post_layernorm."),
        ),
        # Hub files (`CLIPVisionModel(WithProjection)` saved by transformers 4.x, diffusers Wan `image_encoder/`).
        KeyLayout(
            "transformers_hub",
            tuple("vision_model." + k for k in _CLIP_TRANSFORMERS_SIGNATURE),
            convert=clip_from_transformers,
            owns_prefixes=("vision_model.", "visual_projection."),
        ),
    ),
    config_from_state=clip_config_from_state,
    build=build_clip,
    description="CLIP ViT-H/14 vision tower (Wan 2.1 I2V / FLF2V image encoder)",
)

ENCODER_SPECS = (UMT5_SPEC, CLIP_VISION_SPEC)

__all__ = [
    "CLIP_VISION_SPEC",
    "ENCODER_SPECS",
    "UMT5_SPEC",
    "clip_config_from_state",
    "clip_from_original",
    "clip_from_transformers",
    "umt5_config_from_state",
    "umt5_from_original",
    "umt5_from_transformers",
]
