"""DiffSynth-Studio's LoRA Fusion for FLUX.1-dev (DiffSynth-Studio/LoRAFusion-preview-FLUX.1-dev, `model.safetensors`):
learned gates that let several LoRAs act together with less interference than summing them.

For each DiT Linear a LoRA may change (`lora_layers.py`) a merger takes the layer's output without the LoRAs
(`base`) and each kept-apart LoRA's output (`lora_i`, at its scale), and returns
`base + sum_i w_out * sigmoid(LN(base) w_base + LN(lora_i) w_lora + LN(base) LN(lora_i) w_cross + bias) * lora_i`
(element-wise weights per output feature; two LayerNorms). The pipeline's `enable_lora_merger()` attaches them
(`diffsynth.runtime.lora.set_lora_merger`); only LoRAs loaded with `fuse=False` pass through them, which
`load_lora` then does by default. Fused LoRAs are part of `base`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.registry import KeyLayout, ModelSpec

from .lora_layers import StudioLayer, block_counts, studio_layers


@dataclass(frozen=True)
class LoRAFusionConfig:
    """Sizes; the defaults are the released FLUX.1-dev model's."""

    double_blocks: int = 19
    single_blocks: int = 38
    hidden: int = 3072
    mlp_hidden: int = 12288

    def __post_init__(self):
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if "blocks" in name else 1):
                raise ConfigError(f"LoRAFusionConfig.{name}={value!r} must be a positive integer")

    def studio_layers(self) -> list[StudioLayer]:
        return studio_layers(self.double_blocks, self.single_blocks, self.hidden, self.mlp_hidden)


class LoRAMerger(nn.Module):
    """One layer's gate (their `LoraMerger`; its parameter names)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight_base = nn.Parameter(torch.zeros(dim))
        self.weight_lora = nn.Parameter(torch.zeros(dim))
        self.weight_cross = nn.Parameter(torch.zeros(dim))
        self.weight_out = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.norm_base = nn.LayerNorm(dim)
        self.norm_lora = nn.LayerNorm(dim)

    def forward(self, base: torch.Tensor, loras: torch.Tensor) -> torch.Tensor:
        """`base` `[..., dim]`, `loras` `[n, ..., dim]` (one output per LoRA) -> `[..., dim]`."""
        norm_base, norm_loras = self.norm_base(base), self.norm_lora(loras)
        gate = torch.sigmoid(
            norm_base * self.weight_base
            + norm_loras * self.weight_lora
            + norm_base * norm_loras * self.weight_cross
            + self.bias
        )
        return base + (self.weight_out * gate * loras).sum(dim=0)


class FluxLoRAFusion(nn.Module):
    """The mergers of every layer (the pipeline's `lora_fusion`), keyed as DiffSynth-Studio's `FluxLoraPatcher`."""

    def __init__(self, config: LoRAFusionConfig | None = None):
        super().__init__()
        self.config = config = config or LoRAFusionConfig()
        self.layers = config.studio_layers()
        self.model_dict = nn.ModuleDict({layer.key: LoRAMerger(layer.out_features) for layer in self.layers})

    def mergers(self) -> dict[str, LoRAMerger]:
        """Our DiT module name -> its merger."""
        return {layer.ours: self.model_dict[layer.key] for layer in self.layers}


# ----------------------------------------------------------------------------------- checkpoint format
PREFIX = "model_dict."
SIGNATURE = (
    f"{PREFIX}blocks___0___attn___a_to_qkv.weight_base",
    f"{PREFIX}blocks___0___attn___a_to_qkv.weight_cross",
    f"{PREFIX}blocks___0___attn___a_to_qkv.norm_lora.weight",
)


def config_from_state(state, config_json: dict | None = None) -> LoRAFusionConfig:
    double, single = block_counts(state.keys(), PREFIX)
    hidden = int(state[f"{PREFIX}blocks___0___attn___a_to_out.bias"].shape[0])
    return LoRAFusionConfig(
        double_blocks=double,
        single_blocks=single,
        hidden=hidden,
        mlp_hidden=int(state[f"{PREFIX}blocks___0___ff_a___0.bias"].shape[0]),
    )


LORA_FUSION_SPEC = ModelSpec(
    name="flux1_lora_fusion",
    role="lora_fusion",
    layouts=(KeyLayout("diffsynth", SIGNATURE),),
    config_from_state=config_from_state,
    build=FluxLoRAFusion,
    description="DiffSynth-Studio's LoRA Fusion for FLUX.1-dev (DiffSynth-Studio/LoRAFusion-preview-FLUX.1-dev)",
)


def is_lora_fusion_file(paths) -> bool:
    """Whether the files are a LoRA Fusion checkpoint."""
    from diffsynth.runtime.checkpoint import single_safetensors_keys

    return set(SIGNATURE) <= (single_safetensors_keys(paths) or set())
