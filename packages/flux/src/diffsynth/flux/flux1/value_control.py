"""AttriCtrl (DiffSynth-Studio/AttriCtrl-FLUX.1-Dev): a number in [0, 1] sets an attribute's strength (brightness,
...) of a FLUX.1-dev image.

Each attribute has its own small encoder (`models/<attribute>.safetensors`): the value, times 1000, gets a
256-wide sinusoidal embedding (`[cos, sin]`), a two-layer MLP lifts it to the T5 width, and 32 learned position
vectors are added, giving 32 tokens that are appended to the prompt's T5 states of both CFG branches (after any
Redux tokens; text positions 0, as every FLUX.1 text token). Several encoders append their tokens in load order,
one value each. As DiffSynth-Studio's pipeline does, the value is cast to the encoder's dtype before the scaling
(in bfloat16 a value moves by up to 1/256), so results match theirs in either precision.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.layers import timestep_embedding
from diffsynth.runtime.registry import KeyLayout, ModelSpec

VALUE_SCALE = 1000.0  # values in [0, 1] become "timesteps" in [0, 1000]


@dataclass(frozen=True)
class ValueEncoderConfig:
    """Sizes of one attribute encoder; the defaults are the released FLUX.1-dev ones."""

    embedding_dim: int = 256  # the sinusoidal features
    dim: int = 4096  # FLUX.1's T5 width
    tokens: int = 32

    def __post_init__(self):
        for name in ("embedding_dim", "dim", "tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"ValueEncoderConfig.{name}={value!r} must be an integer >= 1")
        if self.embedding_dim % 2:
            raise ConfigError(f"ValueEncoderConfig.embedding_dim={self.embedding_dim} must be even")


class ValueEncoder(nn.Module):
    """One attribute value -> `[tokens, dim]` (DiffSynth-Studio's `SingleValueEncoder` keys)."""

    def __init__(self, config: ValueEncoderConfig | None = None):
        super().__init__()
        self.config = config = config or ValueEncoderConfig()
        self.prefer_value_embedder = nn.Sequential(
            nn.Linear(config.embedding_dim, config.dim), nn.SiLU(), nn.Linear(config.dim, config.dim)
        )
        self.positional_embedding = nn.Parameter(torch.zeros(config.tokens, config.dim))

    def forward(self, value: float | torch.Tensor) -> torch.Tensor:
        weight = self.prefer_value_embedder[0].weight
        value = torch.as_tensor(value, device=weight.device).reshape(1).to(weight.dtype) * VALUE_SCALE
        features = timestep_embedding(value, self.config.embedding_dim, cos_first=True).to(weight.dtype)
        lifted = self.prefer_value_embedder(features)  # [1, dim]
        return lifted + self.positional_embedding.to(lifted.dtype)


class ValueControllers(nn.Module):
    """The loaded attribute encoders, in load order (the pipeline's `value_controller` slot)."""

    offload_units = ("encoders",)

    def __init__(self, encoders: Sequence[ValueEncoder] = ()):
        super().__init__()
        self.encoders = nn.ModuleList(encoders)

    def forward(self, values: Sequence[float]) -> torch.Tensor:
        """`[1, tokens * len(values), dim]`: each encoder's tokens for its value, concatenated."""
        return torch.cat([encoder(value) for encoder, value in zip(self.encoders, values, strict=True)])[None]


def check_values(values, count: int) -> list[float]:
    """`value_controller_inputs` as a list of `count` numbers in [0, 1] (one number is a list of one)."""
    items = list(values) if isinstance(values, (list, tuple)) else [values]
    if count == 0:
        raise ConfigError(
            "value_controller_inputs needs an AttriCtrl encoder: pipe.load_value_controller(<models/brightness"
            ".safetensors>), or the DiffSynth-Studio/AttriCtrl-FLUX.1-Dev preset"
        )
    if len(items) != count:
        raise ConfigError(
            f"value_controller_inputs has {len(items)} values for {count} loaded AttriCtrl encoders (one each, in "
            "load order)"
        )
    for i, value in enumerate(items):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ConfigError(f"value_controller_inputs[{i}]={value!r} must be a number in [0, 1]")
    return [float(v) for v in items]


# ----------------------------------------------------------------------------------- checkpoint format
SIGNATURE = ("prefer_value_embedder.0.weight", "prefer_value_embedder.2.weight", "positional_embedding")


def config_from_state(state, config_json: dict | None = None) -> ValueEncoderConfig:
    dim, embedding_dim = state["prefer_value_embedder.0.weight"].shape
    return ValueEncoderConfig(
        embedding_dim=int(embedding_dim), dim=int(dim), tokens=int(state["positional_embedding"].shape[0])
    )


VALUE_ENCODER_SPEC = ModelSpec(
    name="flux1_value_encoder",
    role="value_controller",
    layouts=(KeyLayout("diffsynth", SIGNATURE),),
    config_from_state=config_from_state,
    build=ValueEncoder,
    description="AttriCtrl attribute encoder for FLUX.1-dev (DiffSynth-Studio/AttriCtrl-FLUX.1-Dev models/*.safetensors)",
)


def is_value_encoder_file(paths: Sequence[str]) -> bool:
    """Whether the files are one AttriCtrl encoder (its three keys, nothing else)."""
    from diffsynth.runtime.checkpoint import single_safetensors_keys

    keys = single_safetensors_keys(paths)
    return keys == set(SIGNATURE) | {"prefer_value_embedder.0.bias", "prefer_value_embedder.2.bias"}
