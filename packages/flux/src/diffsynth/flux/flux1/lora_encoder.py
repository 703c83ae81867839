"""DiffSynth-Studio's LoRA Encoder for FLUX.1-dev (DiffSynth-Studio/LoRA-Encoder-FLUX.1-Dev, `model.safetensors`):
a LoRA's weights turned into one prompt token, so that a LoRA acts without its trigger words.

For each DiT Linear a LoRA may change (`lora_layers.py`), a learned probe `x` `[1, 16, in]` goes through the
LoRA's weight change (`x (B A)^T`, the LoRA at scale 1, its alpha / rank included) and a LayerNorm, then a Linear
per kind of layer lifts it to the T5 width (4096). The 16 tokens of every layer follow one learned special token
through a CLIP-style encoder layer (pre-LayerNorm, biased attention, quick GELU); the special token's output, after
a LayerNorm and a Linear, is the LoRA's embedding `[1, 1, 4096]`. The pipeline (`lora_encoder_inputs`) appends one
per LoRA, times `lora_encoder_scale`, to the positive prompt's T5 states, as DiffSynth-Studio does.

Where their encoder needs every layer in the LoRA, a layer the LoRA leaves out counts here as no change (a zero
weight change: the LayerNorm of zeros).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from diffsynth.runtime.errors import ConfigError, LoRAError
from diffsynth.runtime.lora import LoRATarget, LoRAWeights
from diffsynth.runtime.registry import KeyLayout, ModelSpec

from .lora_layers import StudioLayer, block_counts, studio_layers


@dataclass(frozen=True)
class LoRAEncoderConfig:
    """Sizes; the defaults are the released FLUX.1-dev model's."""

    double_blocks: int = 19
    single_blocks: int = 38
    hidden: int = 3072  # the DiT's width
    mlp_hidden: int = 12288
    dim: int = 4096  # T5's width: the tokens the DiT reads
    intermediate: int = 8192
    layers: int = 1
    head_dim: int = 128
    tokens_per_layer: int = 16
    special_tokens: int = 1

    def __post_init__(self):
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if "blocks" in name else 1):
                raise ConfigError(f"LoRAEncoderConfig.{name}={value!r} must be a positive integer")
        if self.dim % self.head_dim:
            raise ConfigError(f"LoRAEncoderConfig.dim={self.dim} is not a multiple of head_dim={self.head_dim}")

    def studio_layers(self) -> list[StudioLayer]:
        return studio_layers(self.double_blocks, self.single_blocks, self.hidden, self.mlp_hidden)


class LayerProbe(nn.Module):
    """A layer's learned inputs through the LoRA's weight change, normalised (their `LoRALayerBlock`)."""

    def __init__(self, tokens: int, in_features: int, out_features: int):
        super().__init__()
        self.x = nn.Parameter(torch.zeros(1, tokens, in_features))
        self.layer_norm = nn.LayerNorm(out_features)

    def forward(self, target: LoRATarget | None) -> torch.Tensor:
        x = self.x.float()
        if target is None:
            y = x.new_zeros(*x.shape[:-1], self.layer_norm.normalized_shape[0])
        else:
            if target.magnitude is not None:
                raise LoRAError(
                    "the LoRA Encoder reads a LoRA's weight change; a DoRA's depends on the base weights (not given)"
                )
            y = 0
            if target.down is not None:
                down, up = target.down.to(x.device, torch.float32), target.up.to(x.device, torch.float32)
                y = F.linear(F.linear(x, down), up) * target.factor
            if target.diff is not None:
                y = y + F.linear(x, target.diff.to(x.device, torch.float32))
            if target.factors is not None:
                y = y + target.factors.to(x.device, torch.float32).linear(x)
        return self.layer_norm(y.to(self.layer_norm.weight.dtype))


class LayerProbes(nn.Module):
    """The probes of every layer and the Linear per kind of layer (their `LoRAEmbedder`; its keys)."""

    def __init__(self, config: LoRAEncoderConfig):
        super().__init__()
        self.layers = config.studio_layers()
        self.model_dict = nn.ModuleDict(
            {
                layer.key: LayerProbe(config.tokens_per_layer, layer.in_features, layer.out_features)
                for layer in self.layers
            }
        )
        widths = {layer.kind: layer.out_features for layer in self.layers}
        self.proj_dict = nn.ModuleDict({kind: nn.Linear(width, config.dim) for kind, width in widths.items()})

    def forward(self, targets: Mapping[str, LoRATarget]) -> torch.Tensor:
        tokens = [
            self.proj_dict[layer.kind](self.model_dict[layer.key](targets.get(layer.ours))) for layer in self.layers
        ]
        return torch.cat(tokens, dim=1)


class EncoderAttention(nn.Module):
    def __init__(self, dim: int, head_dim: int):
        super().__init__()
        self.heads = dim // head_dim
        self.to_q, self.to_k, self.to_v, self.to_out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (proj(x).view(b, n, self.heads, -1).transpose(1, 2) for proj in (self.to_q, self.to_k, self.to_v))
        return self.to_out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1))


class EncoderLayer(nn.Module):
    """Pre-LayerNorm attention and quick-GELU MLP, each added back (CLIP's layer; their `CLIPEncoderLayer`)."""

    def __init__(self, dim: int, intermediate: int, head_dim: int):
        super().__init__()
        self.attn = EncoderAttention(dim, head_dim)
        self.layer_norm1, self.layer_norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, intermediate), nn.Linear(intermediate, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.layer_norm1(x))
        h = self.fc1(self.layer_norm2(x))
        return x + self.fc2(h * torch.sigmoid(1.702 * h))


class FluxLoRAEncoder(nn.Module):
    """A LoRA (resolved onto `Flux1DiT`'s layers) -> `[1, special_tokens, dim]` (the pipeline's `lora_encoder`)."""

    def __init__(self, config: LoRAEncoderConfig | None = None):
        super().__init__()
        self.config = config = config or LoRAEncoderConfig()
        self.embedder = LayerProbes(config)
        self.encoders = nn.ModuleList(
            EncoderLayer(config.dim, config.intermediate, config.head_dim) for _ in range(config.layers)
        )
        self.special_embeds = nn.Parameter(torch.zeros(1, config.special_tokens, config.dim))
        self.final_layer_norm = nn.LayerNorm(config.dim)
        self.final_linear = nn.Linear(config.dim, config.dim)

    def forward(self, lora: LoRAWeights | Mapping[str, LoRATarget]) -> torch.Tensor:
        targets = lora.targets if isinstance(lora, LoRAWeights) else lora
        known = {layer.ours for layer in self.embedder.layers}
        if not known & set(targets):
            raise ConfigError(
                "the LoRA changes none of the DiT layers the LoRA Encoder reads (attention, MLP and modulation "
                "Linears of the double and single blocks)"
            )
        tokens = self.embedder(targets)
        x = torch.cat([self.special_embeds.to(tokens.dtype).expand(tokens.shape[0], -1, -1), tokens], dim=1)
        for layer in self.encoders:
            x = layer(x)
        return self.final_linear(self.final_layer_norm(x[:, : self.config.special_tokens]))


# ----------------------------------------------------------------------------------- checkpoint format
SIGNATURE = ("special_embeds", "final_linear.weight", "encoders.0.attn.to_q.weight", "encoders.0.fc1.weight")
PROBE = "embedder.model_dict."


def config_from_state(state, config_json: dict | None = None) -> LoRAEncoderConfig:
    double, single = block_counts(state.keys(), PROBE)
    if double == 0:
        raise ConfigError(
            "the LoRA Encoder's checkpoint has no double-block probes (embedder.model_dict.blocks___N___)"
        )
    dim = int(state["special_embeds"].shape[2])
    return LoRAEncoderConfig(
        double_blocks=double,
        single_blocks=single,
        hidden=int(state[f"{PROBE}blocks___0___attn___a_to_out.x"].shape[2]),
        mlp_hidden=int(state[f"{PROBE}blocks___0___ff_a___2.x"].shape[2]),
        dim=dim,
        intermediate=int(state["encoders.0.fc1.weight"].shape[0]),
        layers=len({k.split(".")[1] for k in state.keys() if k.startswith("encoders.")}),
        head_dim=128 if dim % 128 == 0 else dim,  # the released model: 32 heads of 128
        tokens_per_layer=int(state[f"{PROBE}blocks___0___attn___a_to_out.x"].shape[1]),
        special_tokens=int(state["special_embeds"].shape[1]),
    )


LORA_ENCODER_SPEC = ModelSpec(
    name="flux1_lora_encoder",
    role="lora_encoder",
    layouts=(KeyLayout("diffsynth", SIGNATURE),),
    config_from_state=config_from_state,
    build=FluxLoRAEncoder,
    description="DiffSynth-Studio's LoRA Encoder for FLUX.1-dev (DiffSynth-Studio/LoRA-Encoder-FLUX.1-Dev)",
)


def is_lora_encoder_file(paths) -> bool:
    """Whether the files are a LoRA Encoder checkpoint (its special token and probes)."""
    from diffsynth.runtime.checkpoint import single_safetensors_keys

    keys = single_safetensors_keys(paths) or set()
    return set(SIGNATURE) <= keys and any(k.startswith(PROBE) for k in keys)
