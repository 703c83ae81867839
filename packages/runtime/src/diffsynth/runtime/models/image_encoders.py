"""General image encoders of DiffSynth-Studio's image-to-LoRA models: SigLIP2-G384 and DINOv3-7B.

Both are transformers' own classes (`SiglipVisionModel`, `DINOv3ViTModel`) at the sizes of the files in
`DiffSynth-Studio/General-Image-Encoders` (`SigLIP2-G384/model.safetensors`, `DINOv3-7B/model.safetensors`),
so those files keep transformers' key names. What an i2L model reads of an image is one vector per encoder:
SigLIP's attention-pooled output (1536 wide) and DINOv3's normed CLS token (4096 wide).

Preprocessing is ours, as tensors, step for step what the processors DiffSynth-Studio runs do:
- SigLIP2-G384: transformers' SigLIP processor (PIL backend, what transformers 4 used): bilinear PIL resize to
  384x384, `x / 255` in float64 stored as float32, then `(x - 0.5) / 0.5`;
- DINOv3-7B: transformers' DINOv3 processor (torchvision backend): `x / 255` in float32 first, then an
  antialiased bilinear resize to 224x224, then ImageNet mean/std.

Files: SigLIP's is a flat `SiglipVisionTransformer` save (`embeddings.*`, `encoder.layers.*`, `post_layernorm.*`,
`head.*`, what transformers 5's `SiglipVisionModel` names its weights too); a transformers 4 `SiglipVisionModel`
save adds `vision_model.`. DINOv3's is a transformers 4.56 save with the blocks at `layer.N.*`; transformers 5
moved them under `model.layer.N.*` (our names).

The SigLIP spec is not registered in the runtime family on purpose: its key names are also those of the SigLIP2
NaFlex tower Z-Image Omni loads (only the patch embedding's shape tells them apart, and recognition goes by
names). The i2L pipelines name their specs explicitly.

DINOv3's rotary frequencies stay float32 when the model is cast (as transformers' `from_pretrained(dtype=...)`
keeps them); DiffSynth-Studio casts them with the weights, which moves its bfloat16 features by rounding noise.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import DINOv3ViTConfig, DINOv3ViTModel, SiglipVisionConfig, SiglipVisionModel

from ..errors import ConfigError
from ..media import load_image
from ..registry import KeyLayout, ModelSpec, StateDict, build_config, merge_fields

RESCALE = 1 / 255  # 0.00392156862745098, the processors' rescale_factor
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _check_positive(config, names: Sequence[str]) -> None:
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{type(config).__name__}.{name}={value!r} must be a positive integer")


def _check_heads(config) -> None:
    if config.hidden_size % config.num_attention_heads:
        raise ValueError(
            f"{type(config).__name__}.hidden_size={config.hidden_size} is not divisible by "
            f"num_attention_heads={config.num_attention_heads}"
        )


# ----------------------------------------------------------------------------------- SigLIP2-G384
@dataclass
class SiglipImageEncoderConfig:
    """SigLIP vision tower; defaults are SigLIP2-G384 (google/siglip2-giant-opt-patch16-384's tower)."""

    hidden_size: int = 1536
    intermediate_size: int = 6144
    num_hidden_layers: int = 40
    num_attention_heads: int = 16
    image_size: int = 384  # also the preprocessing size
    patch_size: int = 16
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"

    def __post_init__(self):
        _check_positive(self, ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"))
        _check_positive(self, ("image_size", "patch_size"))
        _check_heads(self)
        if self.image_size % self.patch_size:
            raise ValueError(
                f"SiglipImageEncoderConfig.image_size={self.image_size} is not a multiple of "
                f"patch_size={self.patch_size}"
            )

    def transformers_config(self) -> SiglipVisionConfig:
        return SiglipVisionConfig(**asdict(self), num_channels=3, attention_dropout=0.0, vision_use_head=True)


class SiglipImageEncoder(SiglipVisionModel):
    """transformers' `SiglipVisionModel` with the runtime's capabilities; `encode` gives the pooled features."""

    offload_units = ("encoder.layers",)

    def __init__(self, config: SiglipImageEncoderConfig | None = None):
        config = config or SiglipImageEncoderConfig()
        super().__init__(config.transformers_config())
        self.encoder_config = config
        # the position ids are a non-persistent buffer: a meta build keeps them on meta after an assign-load
        self.register_load_state_dict_post_hook(lambda module, _keys: module.materialize_buffers())

    def materialize_buffers(self) -> None:
        """Loader hook: the position ids (never in a file) where the weights are."""
        emb = self.embeddings
        device = emb.position_embedding.weight.device
        if device.type != "meta":
            emb.position_ids = torch.arange(emb.num_positions, device=device).expand((1, -1))

    @torch.no_grad()
    def encode(self, images: Sequence) -> torch.Tensor:
        """Attention-pooled features `[N, hidden]` (the model's dtype) of `images` (PIL images or paths)."""
        weight = self.embeddings.patch_embedding.weight
        pixels = siglip_pixels(images, self.encoder_config.image_size).to(weight.device, weight.dtype)
        return self(pixel_values=pixels).pooler_output


def siglip_pixels(images: Sequence, size: int = 384) -> torch.Tensor:
    """`[N, 3, size, size]` float32 pixels as transformers' SigLIP processor (PIL backend) makes them with
    DiffSynth-Studio's settings (bilinear resize, rescale, mean/std 0.5)."""
    out = []
    for image in images:
        array = np.asarray(load_image(image).resize((size, size), Image.BILINEAR))
        x = torch.from_numpy(array.copy()).permute(2, 0, 1).to(torch.float64) * RESCALE
        out.append(x.to(torch.float32))
    x = torch.stack(out)
    mean = torch.tensor(SIGLIP_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(SIGLIP_STD, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - mean) / std


_SIGLIP_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.")
_SIGLIP_PATCH = "embeddings.patch_embedding.weight"
_SIGLIP_SIGNATURE = (
    _SIGLIP_PATCH,
    "embeddings.position_embedding.weight",
    "encoder.layers.0.self_attn.q_proj.weight",
    "post_layernorm.weight",
    "head.probe",
    "head.attention.in_proj_weight",
)
_SIGLIP_OWNS = ("embeddings.", "encoder.", "post_layernorm.", "head.")


def _conv_patches_only(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our names already; refuse SigLIP2 NaFlex towers, whose patch embedding is a Linear."""
    weight = state.get(_SIGLIP_PATCH)
    if weight is not None and weight.dim() != 4:
        raise KeyError(
            f"{_SIGLIP_PATCH} has shape {tuple(weight.shape)}, a linear patch embedding: a SigLIP2 NaFlex tower, "
            "not SigLIP2-G384 (a convolution [width, 3, patch, patch])"
        )
    return state


SIGLIP_LAYOUTS = (
    KeyLayout("flat", _SIGLIP_SIGNATURE, convert=_conv_patches_only, owns_prefixes=_SIGLIP_OWNS),
    KeyLayout("vision_model", _SIGLIP_SIGNATURE, prefix="vision_model.", convert=_conv_patches_only),
)


def _json_fields(config_json: dict, model_types: tuple[str, ...], wanted, label: str) -> dict:
    """The fields of `wanted` in a transformers config.json (a vision config, or one nested as `vision_config`),
    or in a plain mapping of our field names."""
    given = dict(config_json)
    if isinstance(given.get("vision_config"), dict):
        given = dict(given["vision_config"])
    kind = given.get("model_type")
    if kind is not None and kind not in model_types:
        raise ConfigError(f"the {label}'s config.json has model_type={kind!r}; expected one of {list(model_types)}")
    names = {f.name for f in fields(wanted)}
    return {k: v for k, v in given.items() if k in names}


def siglip_config_from_state(state: StateDict, config_json: dict | None = None) -> SiglipImageEncoderConfig:
    """Widths, layers, patch and image size from the shapes; the head count from the json or SigLIP2-G384's
    96-wide heads."""
    labels = ("siglip_vision_model", "siglip")
    given = _json_fields(config_json, labels, SiglipImageEncoderConfig, "SigLIP") if config_json else {}
    derived = {}
    if state:
        hidden, _, patch, _ = state[_SIGLIP_PATCH].shape
        side = math.isqrt(state["embeddings.position_embedding.weight"].shape[0])
        layers = {int(m.group(1)) for k in state if (m := _SIGLIP_LAYER.match(k))}
        derived = dict(
            hidden_size=hidden,
            patch_size=patch,
            image_size=side * patch,
            num_hidden_layers=max(layers) + 1,
            intermediate_size=state["encoder.layers.0.mlp.fc1.weight"].shape[0],
        )
    fields_ = merge_fields("SigLIP image encoder", given, derived)
    if "num_attention_heads" not in fields_ and "hidden_size" in fields_:
        fields_["num_attention_heads"] = max(1, fields_["hidden_size"] // 96)
    return build_config(SiglipImageEncoderConfig, "SigLIP image encoder", fields_)


SIGLIP_SPEC = ModelSpec(
    name="siglip2_g384",
    role="siglip2_image_encoder",
    layouts=SIGLIP_LAYOUTS,
    config_from_state=siglip_config_from_state,
    build=SiglipImageEncoder,
    description="SigLIP2-G384 image encoder (DiffSynth-Studio/General-Image-Encoders SigLIP2-G384/)",
)


# ----------------------------------------------------------------------------------- DINOv3-7B
@dataclass
class DINOv3ImageEncoderConfig:
    """DINOv3 ViT; defaults are DINOv3-7B (facebook/dinov3-vit7b16, as DiffSynth-Studio ships it)."""

    hidden_size: int = 4096
    intermediate_size: int = 8192
    num_hidden_layers: int = 40
    num_attention_heads: int = 32
    num_register_tokens: int = 4
    image_size: int = 224  # also the preprocessing size
    patch_size: int = 16
    layer_norm_eps: float = 1e-5
    layerscale_value: float = 1.0
    rope_theta: float = 100.0
    pos_embed_rescale: float | None = 2.0  # training-time augmentation only
    hidden_act: str = "silu"
    use_gated_mlp: bool = True
    query_bias: bool = False
    key_bias: bool = False
    value_bias: bool = False
    proj_bias: bool = True
    mlp_bias: bool = True

    def __post_init__(self):
        _check_positive(self, ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"))
        _check_positive(self, ("image_size", "patch_size"))
        _check_heads(self)
        if (self.hidden_size // self.num_attention_heads) % 4:
            raise ValueError(
                f"DINOv3ImageEncoderConfig: head width {self.hidden_size // self.num_attention_heads} must be a "
                "multiple of 4 (its 2-D rotary embedding splits it in four)"
            )

    def transformers_config(self) -> DINOv3ViTConfig:
        return DINOv3ViTConfig(
            **asdict(self), num_channels=3, attention_dropout=0.0, drop_path_rate=0.0, pos_embed_shift=None
        )


class DINOv3ImageEncoder(DINOv3ViTModel):
    """transformers' `DINOv3ViTModel` with the runtime's capabilities; `encode` gives the CLS features."""

    offload_units = ("model.layer",)

    def __init__(self, config: DINOv3ImageEncoderConfig | None = None):
        config = config or DINOv3ImageEncoderConfig()
        super().__init__(config.transformers_config())
        self.encoder_config = config
        # the rotary frequencies are a non-persistent buffer: rebuilt after an assign-load from a meta build
        self.register_load_state_dict_post_hook(lambda module, _keys: module.materialize_buffers())

    def materialize_buffers(self) -> None:
        """Loader hook: the rotary frequencies (never in a file), float32, where the weights are."""
        device = self.embeddings.patch_embeddings.weight.device
        if device.type == "meta":
            return
        rope = self.rope_embeddings
        with torch.device(device):
            fresh = type(rope)(rope.config)
        rope.inv_freq = fresh.inv_freq

    def _apply(self, fn, recurse=True):
        # keep the rotary frequencies in float32 under `.to(bfloat16)`, as `from_pretrained(dtype=...)` does
        super()._apply(fn, recurse)
        inv_freq = self.rope_embeddings.inv_freq
        if inv_freq.dtype != torch.float32 and inv_freq.device.type != "meta":
            self.materialize_buffers()
        return self

    @torch.no_grad()
    def encode(self, images: Sequence) -> torch.Tensor:
        """Normed CLS features `[N, hidden]` (the model's dtype) of `images` (PIL images or paths)."""
        weight = self.embeddings.patch_embeddings.weight
        pixels = dinov3_pixels(images, self.encoder_config.image_size).to(weight.device, weight.dtype)
        return self(pixel_values=pixels).pooler_output


def dinov3_pixels(images: Sequence, size: int = 224) -> torch.Tensor:
    """`[N, 3, size, size]` float32 pixels as transformers' DINOv3 processor makes them: rescale first, then an
    antialiased bilinear resize, then ImageNet mean/std."""
    out = []
    for image in images:
        array = np.asarray(load_image(image))
        x = torch.from_numpy(array.copy()).permute(2, 0, 1)[None].to(torch.float32) * RESCALE
        out.append(F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True))
    x = torch.cat(out)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - mean) / std


_DINO_LAYER = re.compile(r"^model\.layer\.(\d+)\.")
_DINO_BODY = (
    "layer.0.attention.q_proj.weight",
    "layer.0.layer_scale1.lambda1",
    "layer.0.mlp.down_proj.weight",
)
_DINO_TOP = ("embeddings.cls_token", "embeddings.register_tokens", "embeddings.patch_embeddings.weight", "norm.weight")


def _from_transformers4(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 4.56 names (`layer.N.*` at the top) -> ours (`model.layer.N.*`)."""
    return {("model." + k if k.startswith("layer.") else k): v for k, v in state.items()}


DINOV3_LAYOUTS = (
    KeyLayout(
        "transformers4",
        _DINO_TOP + _DINO_BODY,
        convert=_from_transformers4,
        owns_prefixes=("embeddings.", "layer.", "norm."),
    ),
    KeyLayout(
        "transformers5",
        _DINO_TOP + tuple("model." + k for k in _DINO_BODY),
        owns_prefixes=("embeddings.", "model.layer.", "norm."),
    ),
)


def dinov3_config_from_state(state: StateDict, config_json: dict | None = None) -> DINOv3ImageEncoderConfig:
    """Widths, layers, registers, patch size, gated MLP and biases from the shapes; the head count from the json
    or DINOv3-7B's 128-wide heads; the rest from the json or the released model."""
    given = _json_fields(config_json, ("dinov3_vit",), DINOv3ImageEncoderConfig, "DINOv3") if config_json else {}
    derived = {}
    if state:
        hidden = state["embeddings.cls_token"].shape[-1]
        layers = {int(m.group(1)) for k in state if (m := _DINO_LAYER.match(k))}
        block = "model.layer.0."
        gated = block + "mlp.gate_proj.weight" in state
        derived = dict(
            hidden_size=hidden,
            num_hidden_layers=max(layers) + 1,
            num_register_tokens=state["embeddings.register_tokens"].shape[1],
            patch_size=state["embeddings.patch_embeddings.weight"].shape[-1],
            intermediate_size=state[block + "mlp.up_proj.weight"].shape[0],
            use_gated_mlp=gated,
            query_bias=block + "attention.q_proj.bias" in state,
            key_bias=block + "attention.k_proj.bias" in state,
            value_bias=block + "attention.v_proj.bias" in state,
            proj_bias=block + "attention.o_proj.bias" in state,
            mlp_bias=block + "mlp.up_proj.bias" in state,
        )
    fields_ = merge_fields("DINOv3 image encoder", given, derived)
    if "num_attention_heads" not in fields_ and "hidden_size" in fields_:
        fields_["num_attention_heads"] = max(1, fields_["hidden_size"] // 128)
    return build_config(DINOv3ImageEncoderConfig, "DINOv3 image encoder", fields_)


DINOV3_SPEC = ModelSpec(
    name="dinov3_7b",
    role="dinov3_image_encoder",
    layouts=DINOV3_LAYOUTS,
    config_from_state=dinov3_config_from_state,
    build=DINOv3ImageEncoder,
    description="DINOv3-7B image encoder (DiffSynth-Studio/General-Image-Encoders DINOv3-7B/)",
)

__all__ = [
    "DINOV3_SPEC",
    "SIGLIP_SPEC",
    "DINOv3ImageEncoder",
    "DINOv3ImageEncoderConfig",
    "SiglipImageEncoder",
    "SiglipImageEncoderConfig",
    "dinov3_config_from_state",
    "dinov3_pixels",
    "siglip_config_from_state",
    "siglip_pixels",
]
