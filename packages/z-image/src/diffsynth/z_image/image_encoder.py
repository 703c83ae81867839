"""Z-Image Omni's image encoder: the SigLIP2 NaFlex vision tower (`siglip/` folder of Tongyi-MAI/Z-Image-Omni-Base).

The model is transformers' `Siglip2VisionModel` (so400m: width 1152, 27 layers, 16 heads, patch 16, at most 256
patches), used as diffusers' `ZImageOmniPipeline` uses it: the image goes through the SigLIP2 processor (resized
to keep its aspect ratio within the patch budget, scaled to [-1, 1], cut into patches), and the post-norm
hidden states of the real patches, laid out as their `[rows, cols, width]` grid, are the DiT's SigLIP features.
The attention-pooling head is loaded when the file has it but its output is not used.

Files: the hub file is a transformers 4 save (`vision_model.` prefix); transformers 5 saves without it. Both
are SigLIP-family key names, shared with SigLIP (v1) and CLIP towers: those have a convolutional patch
embedding (4-D), ours a linear one over flattened patches (2-D), which the conversion checks.
"""

from __future__ import annotations

import math
import re
from functools import cache

import torch
from torch import nn

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.registry import KeyLayout, ModelSpec, StateDict, merge_fields

# siglip/config.json of Tongyi-MAI/Z-Image-Omni-Base (google/siglip2-so400m-patch16-naflex's vision tower)
RELEASED_CONFIG = dict(
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=27,
    num_attention_heads=16,
    num_patches=256,
    patch_size=16,
    hidden_act="gelu_pytorch_tanh",
    layer_norm_eps=1e-6,
    attention_dropout=0.0,
    num_channels=3,
)
PATCH_KEY = "embeddings.patch_embedding.weight"
_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.")


@cache
def encoder_class() -> type[nn.Module]:
    """`ZImageImageEncoder`, built on transformers' `Siglip2VisionModel` (imported on first use)."""
    from transformers import Siglip2VisionModel

    class ZImageImageEncoder(Siglip2VisionModel):
        """transformers' `Siglip2VisionModel` with its processor; `encode(image)` gives the DiT's SigLIP grid."""

        offload_units = ("encoder.layers",)

        def processor(self):
            """The SigLIP2 NaFlex processor for this tower: its patch size, its position table as the patch budget
            (256 for the released model, as the repo's processor), mean/std 0.5, bilinear resize."""
            if getattr(self, "_processor", None) is None:
                self._processor = make_processor(self.config.patch_size, self.config.num_patches)
            return self._processor

        @torch.no_grad()
        def encode(self, image) -> torch.Tensor:
            """`[rows, cols, hidden]` post-norm features of the image's patches (float32)."""
            inputs = self.processor()(images=[image], return_tensors="pt")
            rows, cols = (int(n) for n in inputs["spatial_shapes"][0])
            device = self.embeddings.patch_embedding.weight.device
            hidden = self(
                pixel_values=inputs["pixel_values"].to(device),
                pixel_attention_mask=inputs["pixel_attention_mask"].to(device),
                spatial_shapes=inputs["spatial_shapes"].to(device),
            ).last_hidden_state
            return hidden[0, : rows * cols].reshape(rows, cols, -1).float()

    return ZImageImageEncoder


def make_processor(patch_size: int = 16, max_num_patches: int = 256):
    """transformers' SigLIP2 image processor, PIL backend (what transformers 4, which the model was released
    with, always used; transformers 5 picks torchvision when installed, which resizes slightly differently)."""
    try:
        from transformers import Siglip2ImageProcessorPil as processor_class
    except ImportError:  # pragma: no cover - older transformers: the PIL processor under its plain name
        from transformers import Siglip2ImageProcessor as processor_class
    return processor_class(patch_size=patch_size, max_num_patches=max_num_patches)


# ----------------------------------------------------------------------------------- formats
def _linear_patches_only(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our names already; refuse SigLIP (v1) / CLIP towers, whose patch embedding is a convolution."""
    weight = state.get(PATCH_KEY)
    if weight is not None and weight.dim() != 2:
        raise KeyError(
            f"{PATCH_KEY} has shape {tuple(weight.shape)}, a convolution: a SigLIP (v1) or CLIP vision tower, not "
            "the SigLIP2 NaFlex encoder of Z-Image Omni (a linear patch embedding [width, 3 * patch * patch])"
        )
    return state


SIGNATURE = (
    PATCH_KEY,
    "embeddings.position_embedding.weight",
    "encoder.layers.0.self_attn.q_proj.weight",
    "post_layernorm.weight",
)
LAYOUTS = (
    # the hub file (a transformers 4 `Siglip2VisionModel` save)
    KeyLayout("transformers4", SIGNATURE, prefix="vision_model.", convert=_linear_patches_only),
    # a transformers 5 save
    KeyLayout(
        "transformers5",
        SIGNATURE,
        convert=_linear_patches_only,
        owns_prefixes=("embeddings.", "encoder.", "post_layernorm.", "head."),
    ),
)


def _fields_from_json(config_json: dict) -> dict:
    given = dict(config_json)
    if given.get("model_type") == "siglip2" and isinstance(given.get("vision_config"), dict):
        given = dict(given["vision_config"])
    elif given.get("model_type") not in (None, "siglip2_vision_model"):
        raise ConfigError(
            f"the image encoder's config.json has model_type={given.get('model_type')!r}; Z-Image Omni's encoder is "
            "a SigLIP2 vision tower (siglip2_vision_model)"
        )
    return {k: v for k, v in given.items() if k in RELEASED_CONFIG or k == "vision_use_head"}


def _fields_from_shapes(state: StateDict) -> dict:
    hidden, patch_dim = state[PATCH_KEY].shape
    patch = math.isqrt(patch_dim // 3)
    if 3 * patch * patch != patch_dim:
        raise ConfigError(f"{PATCH_KEY} has {patch_dim} inputs, not 3 * patch * patch")
    layers = {int(m.group(1)) for k in state if (m := _LAYER.match(k))}
    return dict(
        hidden_size=hidden,
        patch_size=patch,
        num_patches=state["embeddings.position_embedding.weight"].shape[0],
        num_hidden_layers=max(layers) + 1,
        intermediate_size=state["encoder.layers.0.mlp.fc1.weight"].shape[0],
        vision_use_head="head.probe" in state,
    )


def config_from_state(state: StateDict, config_json: dict | None = None):
    """`Siglip2VisionConfig` from the shapes and, when present, the `config.json` beside the file (a vision
    config or a whole SigLIP2 config); the head count, activation and eps come from it or the released model."""
    from transformers import Siglip2VisionConfig

    given = _fields_from_json(config_json) if config_json else {}
    fields = merge_fields("Z-Image image encoder", given, _fields_from_shapes(state) if state else {})
    for name, value in RELEASED_CONFIG.items():
        fields.setdefault(name, value)
    if fields["hidden_size"] % fields["num_attention_heads"]:
        raise ConfigError(
            f"Z-Image image encoder: hidden_size={fields['hidden_size']} is not divisible by "
            f"num_attention_heads={fields['num_attention_heads']}; give the head count in a config.json beside the file"
        )
    return Siglip2VisionConfig(**fields)


IMAGE_ENCODER_SPEC = ModelSpec(
    name="z_image_siglip2",
    role="image_encoder",
    layouts=LAYOUTS,
    config_from_state=config_from_state,
    build=lambda config: encoder_class()(config),
    description="Z-Image Omni image encoder: SigLIP2 so400m NaFlex vision tower (Z-Image-Omni-Base siglip/)",
)

__all__ = ["IMAGE_ENCODER_SPEC", "RELEASED_CONFIG", "config_from_state", "encoder_class", "make_processor"]
