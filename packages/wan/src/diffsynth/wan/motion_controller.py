"""Speed control for Wan 2.1 T2V-1.3B (DiffSynth-Studio's `Wan2.1-1.3b-speedcontrol-v1`, `motion_bucket_id`).

A small MLP maps a motion bucket id (0 = slow, 100 = fast, as in DiffSynth-Studio's example) to an offset of the
DiT's six timestep modulation vectors; the DiT adds it to the modulation of every block and call (both CFG
branches). The file `model.safetensors` holds `linear.{0,2,4}.{weight,bias}`, which are our names too. Its last
layer was zero-initialised before training, so an untrained controller leaves the video as it was.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.layers import timestep_embedding
from diffsynth.runtime.registry import KeyLayout, ModelSpec, StateDict, build_config

BUCKET_SCALE = 10.0  # the id is embedded as `10 * motion_bucket_id`, the range of the DiT's timesteps
SIGNATURE = ("linear.0.weight", "linear.2.weight", "linear.4.weight", "linear.4.bias")


@dataclass
class MotionControllerConfig:
    freq_dim: int = 256  # the DiT's `freq_dim`
    dim: int = 1536  # the DiT's width (Wan2.1-T2V-1.3B)

    def __post_init__(self):
        for name in ("freq_dim", "dim"):
            value = getattr(self, name)
            if value <= 0:
                raise ValueError(f"MotionControllerConfig.{name}={value} must be positive")
        if self.freq_dim % 2:
            raise ValueError(f"MotionControllerConfig.freq_dim={self.freq_dim} must be even (cos and sin halves)")


class WanMotionController(nn.Module):
    """`motion_bucket_id` `[B]` -> an offset `[B, 6, dim]` of the DiT's timestep modulation."""

    offload_units = ()  # a few MB: stays resident
    lora_target_modules = ("linear.0", "linear.2", "linear.4")

    def __init__(self, config: MotionControllerConfig | None = None):
        super().__init__()
        self.config = config = config or MotionControllerConfig()
        self.linear = nn.Sequential(
            nn.Linear(config.freq_dim, config.dim),
            nn.SiLU(),
            nn.Linear(config.dim, config.dim),
            nn.SiLU(),
            nn.Linear(config.dim, 6 * config.dim),
        )

    def forward(self, motion_bucket_id: torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(motion_bucket_id, device=self.linear[0].weight.device).reshape(-1)
        emb = timestep_embedding(ids.float() * BUCKET_SCALE, self.config.freq_dim)
        emb = emb.to(self.linear[0].weight.dtype)
        return self.linear(emb).unflatten(-1, (6, self.config.dim))


def config_from_state(state: StateDict, config_json: dict | None = None) -> MotionControllerConfig:
    """Sizes from the shapes; the layers must agree with each other (a `[6 dim, dim]` last layer)."""
    dim, freq_dim = state["linear.0.weight"].shape
    fields = {"dim": int(dim), "freq_dim": int(freq_dim)}
    last = tuple(state["linear.4.weight"].shape)
    if last != (6 * dim, dim):
        raise ConfigError(
            f"Wan speed-control model: linear.4.weight has shape {last}; expected {(6 * dim, dim)} "
            f"(six modulation vectors of the width {dim} that linear.0.weight gives)"
        )
    return build_config(MotionControllerConfig, "Wan speed-control model", fields)


MOTION_CONTROLLER_SPEC = ModelSpec(
    name="wan_motion_controller",
    role="motion_controller",
    layouts=(KeyLayout("diffsynth_studio", SIGNATURE),),
    config_from_state=config_from_state,
    build=WanMotionController,
    description="Wan 2.1 speed control (DiffSynth-Studio/Wan2.1-1.3b-speedcontrol-v1, model.safetensors)",
)
