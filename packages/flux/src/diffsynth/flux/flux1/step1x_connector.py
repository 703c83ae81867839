"""Step1X-Edit's connector: Qwen2.5-VL hidden states -> the FLUX.1 DiT's text tokens and pooled vector.

Step1X-Edit (stepfun-ai) replaces FLUX.1's T5 + CLIP inputs by Qwen2.5-VL-7B's last hidden states (3584 wide)
over a chat prompt that shows the reference image. The connector turns them into

- `txt` `[B, L, 4096]`: a token refiner (input projection, then transformer blocks whose gates come from a
  vector of the timestep and the masked mean of the states; self-attention restricted to real tokens, every
  query may see token 0 so padded rows stay finite);
- `y` `[B, 768]`: a projection of the masked mean, scaled by `1 + scale_factor` (a learned scalar).

It runs at every denoising step (the refiner is timestep-conditioned). Module names are the released file's
(`step1x-edit-i1258.safetensors` keys under `connector.`, the DiT's beside them), so that file loads strictly.
The timestep arrives in [0, 1] as the DiT's does and is multiplied by 1000 inside, as the authors' code does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from diffsynth.runtime.attention import attention
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.registry import KeyLayout, ModelSpec

TIME_FREQ_DIM = 256
TIME_FACTOR = 1000.0
LN_EPS = 1e-6
POOLED_DIM = 768  # FLUX.1's `vec_in_dim` (CLIP-L's pooled width)
SCALE_FACTOR_INIT = -0.91  # the authors initialise `scale_factor` to -(1 - 0.09)


@dataclass
class Step1XConnectorConfig:
    """Sizes of the connector; defaults are the released Step1X-Edit v1.0's."""

    in_channels: int = 3584  # Qwen2.5-VL-7B hidden size
    hidden_size: int = 4096  # the DiT's `context_in_dim`
    num_heads: int = 32
    depth: int = 2
    mlp_ratio: float = 4.0
    pooled_dim: int = POOLED_DIM

    def __post_init__(self):
        for name in ("in_channels", "hidden_size", "num_heads", "depth", "pooled_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"Step1XConnectorConfig.{name}={value!r} must be an integer >= 1")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"Step1XConnectorConfig: hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}"
            )
        if not self.mlp_ratio > 0:
            raise ConfigError(f"Step1XConnectorConfig.mlp_ratio={self.mlp_ratio!r} must be > 0")


def sinusoid(t: torch.Tensor, dim: int = TIME_FREQ_DIM, max_period: float = 10000.0) -> torch.Tensor:
    """`[cos, sin]` features of `t` (float32), frequencies max_period^(-i / half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    out = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(out, (0, 1)) if dim % 2 else out


class _TwoLayer(nn.Sequential):
    """Linear -> SiLU -> Linear with the checkpoint's `mlp.0` / `mlp.2` indices."""

    def __init__(self, d_in: int, hidden: int, d_out: int):
        super().__init__(nn.Linear(d_in, hidden), nn.SiLU(), nn.Linear(hidden, d_out))


class TimestepMLP(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.mlp = _TwoLayer(TIME_FREQ_DIM, dim, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoid(t).to(self.mlp[0].weight.dtype))


class ContextProjection(nn.Module):
    def __init__(self, d_in: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(d_in, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(x)))


class RefinerBlock(nn.Module):
    """Pre-norm self-attention and MLP, each residual gated by a vector of the conditioning."""

    def __init__(self, config: Step1XConnectorConfig):
        super().__init__()
        dim = config.hidden_size
        self.num_heads = config.num_heads
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.self_attn_qkv = nn.Linear(dim, 3 * dim)
        self.self_attn_proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = FeedForward(dim, int(dim * config.mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        gate_attn, gate_mlp = self.adaLN_modulation(c).unsqueeze(1).chunk(2, dim=-1)
        b, n, _ = x.shape
        q, k, v = self.self_attn_qkv(self.norm1(x)).view(b, n, 3, self.num_heads, -1).unbind(2)
        out = attention(q, k, v, mask=attn_mask)  # [B, L, heads, head_dim]
        x = x + self.self_attn_proj(out.reshape(b, n, -1)) * gate_attn
        return x + self.mlp(self.norm2(x)) * gate_mlp


class TokenRefiner(nn.Module):
    """The authors' `SingleTokenRefiner` (module `S`): projection, conditioning vector, refiner blocks."""

    def __init__(self, config: Step1XConnectorConfig):
        super().__init__()
        self.input_embedder = nn.Linear(config.in_channels, config.hidden_size)
        self.t_embedder = TimestepMLP(config.hidden_size)
        self.c_embedder = ContextProjection(config.in_channels, config.hidden_size)
        self.individual_token_refiner = nn.Module()
        self.individual_token_refiner.blocks = nn.ModuleList(RefinerBlock(config) for _ in range(config.depth))

    def forward(self, x: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        c = self.t_embedder(t) + self.c_embedder(masked_mean(x, mask))
        x = self.input_embedder(x)
        real = mask.bool()
        allowed = real[:, None, :, None] & real[:, None, None, :]  # [B, 1, L, L]: both tokens real
        allowed[..., 0] = True  # padded queries still attend to something (no NaN rows)
        for block in self.individual_token_refiner.blocks:
            x = block(x, c, allowed)
        return x


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `x` `[B, L, D]` over the tokens where `mask` `[B, L]` is set."""
    weights = mask.to(x.dtype).unsqueeze(-1)
    return (x * weights).sum(dim=1) / weights.sum(dim=1)


class Step1XConnector(nn.Module):
    """`forward(states, timesteps, mask)` -> (`txt` `[B, L, hidden_size]`, `y` `[B, pooled_dim]`)."""

    def __init__(self, config: Step1XConnectorConfig | None = None):
        super().__init__()
        self.config = config = config if config is not None else Step1XConnectorConfig()
        self.S = TokenRefiner(config)
        self.global_proj_out = nn.Linear(config.in_channels, config.pooled_dim)
        self.scale_factor = nn.Parameter(torch.full((1,), SCALE_FACTOR_INIT))

    def forward(
        self, states: torch.Tensor, timesteps: torch.Tensor | float, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`states` `[B, L, in_channels]` (Qwen2.5-VL hidden states, zero past each prompt's end), `mask` `[B, L]`
        (nonzero = real token; every row needs one), `timesteps` `[B]` or a scalar in [0, 1]."""
        cfg = self.config
        if states.dim() != 3 or states.shape[-1] != cfg.in_channels:
            raise ValueError(f"states has shape {tuple(states.shape)}; expected [B, L, in_channels={cfg.in_channels}]")
        if tuple(mask.shape) != tuple(states.shape[:2]):
            raise ValueError(f"mask has shape {tuple(mask.shape)}; expected {tuple(states.shape[:2])} (as states)")
        if not bool(mask.bool().any(dim=1).all()):
            raise ValueError("mask has a row without any real token; every prompt needs at least one")
        dtype = self.global_proj_out.weight.dtype
        states = states.to(dtype)
        b = states.shape[0]
        t = torch.as_tensor(timesteps, device=states.device, dtype=torch.float32).reshape(-1).expand(b)
        y = self.global_proj_out(masked_mean(states, mask) * (1 + self.scale_factor.to(dtype)))
        return self.S(states, t * TIME_FACTOR, mask), y


# ----------------------------------------------------------------------------------- checkpoint format
PREFIX = "connector."  # in `step1x-edit-i1258.safetensors`, beside the DiT's own (FLUX.1 original) keys
SIGNATURE = (
    "S.input_embedder.weight",
    "S.t_embedder.mlp.0.weight",
    "S.c_embedder.linear_1.weight",
    "S.individual_token_refiner.blocks.0.self_attn_qkv.weight",
    "S.individual_token_refiner.blocks.0.adaLN_modulation.1.weight",
    "global_proj_out.weight",
    "scale_factor",
)


def config_from_state(state, config_json: dict | None = None) -> Step1XConnectorConfig:
    """Widths and depth from the shapes; heads are not in the shapes (128-wide heads, the released 32 x 128)."""
    hidden, in_channels = state["S.input_embedder.weight"].shape
    blocks = {int(k.split(".")[3]) for k in state if k.startswith("S.individual_token_refiner.blocks.")}
    head_dim = 128
    if hidden % head_dim:
        raise ConfigError(f"Step1X connector: hidden size {hidden} is not a multiple of the released 128-wide heads")
    mlp = state["S.individual_token_refiner.blocks.0.mlp.fc1.weight"].shape[0]
    return Step1XConnectorConfig(
        in_channels=int(in_channels),
        hidden_size=int(hidden),
        num_heads=int(hidden) // head_dim,
        depth=max(blocks) + 1,
        mlp_ratio=mlp / hidden,
        pooled_dim=int(state["global_proj_out.weight"].shape[0]),
    )


STEP1X_CONNECTOR_SPEC = ModelSpec(
    name="step1x_connector",
    role="step1x_connector",
    layouts=(KeyLayout("step1x", SIGNATURE, prefix=PREFIX),),
    config_from_state=config_from_state,
    build=Step1XConnector,
    description="Step1X-Edit connector (Qwen2.5-VL states -> FLUX.1 text tokens), the `connector.` keys of "
    "step1x-edit-i1258.safetensors",
)
