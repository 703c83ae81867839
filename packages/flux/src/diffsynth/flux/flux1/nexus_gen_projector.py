"""Nexus-Gen V2's decoder adapters: the autoregressive model's image embeddings -> FLUX.1 text tokens.

DiffSynth-Studio/Nexus-GenV2 ships two decoder files, each a fine-tuned FLUX.1 DiT (`pipe.dit.*`) and one adapter:

- `generation_decoder.bin`: `adapter.*`, `NexusGenAdapter`: Linear 3584 -> 4096, LayerNorm, ReLU, Linear, LayerNorm
  applied to each of the 81 predicted image embeddings (text ids 0, like T5 tokens);
- `edit_decoder.bin`: `embedding_merger.*`, `NexusGenImageEmbeddingMerger`: one Qwen2.5-VL-7B decoder layer over the
  81 predicted embeddings followed by the reference image's vision embeddings (bidirectional attention, no mask),
  then RMSNorm -> Linear 3584 -> 4 * 4096 -> RMSNorm -> SiLU -> Linear -> 4096 -> RMSNorm. Its rotary positions are
  the (t, row, col) of each grid's merged 2x2 patches, rows and columns scaled to a 72 x 72 patch grid (so the
  9 x 9 target grid and a reference of any size span the same range), Qwen2.5-VL's multimodal RoPE
  (sections 16/24/24 of the 64 frequencies, rotate-half channels).

Key names are DiffSynth-Studio's (its converters only strip `embedding_merger.`; `adapter.` stays).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from diffsynth.runtime.attention import attention
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.registry import KeyLayout, ModelSpec, StateDict

HEAD_DIM = 128  # Qwen2.5-VL-7B's head width (the shapes cannot tell heads from width)


@dataclass
class NexusGenMergerConfig:
    """The editing adapter; defaults are Nexus-GenV2's (a Qwen2.5-VL-7B decoder layer, FLUX.1's 4096-wide text)."""

    hidden_size: int = 3584
    num_heads: int = 28
    num_kv_heads: int = 4
    intermediate_size: int = 18944
    num_layers: int = 1
    out_dim: int = 4096
    expand_ratio: int = 4
    rope_theta: float = 1_000_000.0
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    eps: float = 1e-6
    base_grid: tuple[int, int] = (72, 72)  # patch rows / columns every grid is scaled to
    spatial_merge_size: int = 2

    def __post_init__(self):
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"NexusGenMergerConfig: hidden_size={self.hidden_size}, num_heads={self.num_heads} and "
                f"num_kv_heads={self.num_kv_heads} must divide (width by heads, heads by kv heads)"
            )
        if 2 * sum(self.mrope_section) != self.hidden_size // self.num_heads:
            raise ValueError(
                f"NexusGenMergerConfig.mrope_section={self.mrope_section} covers {2 * sum(self.mrope_section)} "
                f"channels; the heads are {self.hidden_size // self.num_heads} wide"
            )


class RMSNorm(nn.Module):
    """Qwen2's RMSNorm: normalised in float32, cast back, then scaled."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class MergerAttention(nn.Module):
    def __init__(self, config: NexusGenMergerConfig):
        super().__init__()
        head_dim = config.hidden_size // config.num_heads
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, head_dim
        self.q_proj = nn.Linear(config.hidden_size, config.num_heads * head_dim)
        self.k_proj = nn.Linear(config.hidden_size, config.num_kv_heads * head_dim)
        self.v_proj = nn.Linear(config.hidden_size, config.num_kv_heads * head_dim)
        self.o_proj = nn.Linear(config.num_heads * head_dim, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, n, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, n, self.num_kv_heads, self.head_dim)
        q = (q * cos + _rotate_half(q) * sin).to(x.dtype)
        k = (k * cos + _rotate_half(k) * sin).to(x.dtype)
        groups = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
        return self.o_proj(attention(q, k, v).reshape(b, n, -1))  # every token sees every other (no mask)


class MergerMLP(nn.Module):
    def __init__(self, config: NexusGenMergerConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MergerLayer(nn.Module):
    """A Qwen2.5-VL decoder layer (pre-norm attention and gated MLP, residuals), key names as Qwen's."""

    def __init__(self, config: NexusGenMergerConfig):
        super().__init__()
        self.self_attn = MergerAttention(config)
        self.mlp = MergerMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class NexusGenImageEmbeddingMerger(nn.Module):
    """Editing adapter: `[B, 81, hidden]` predicted embeddings (+ `[B, N, hidden]` reference embeddings) ->
    `[B, 81 + N, out_dim]` DiT text tokens."""

    offload_units = ("layers",)

    def __init__(self, config: NexusGenMergerConfig | None = None):
        super().__init__()
        self.config = config = config if config is not None else NexusGenMergerConfig()
        wide = config.out_dim * config.expand_ratio
        self.layers = nn.ModuleList([MergerLayer(config) for _ in range(config.num_layers)])
        self.projector = nn.Sequential(
            RMSNorm(config.hidden_size, config.eps),
            nn.Linear(config.hidden_size, wide),
            RMSNorm(wide, config.eps),
            nn.SiLU(),
            nn.Linear(wide, config.out_dim),
            RMSNorm(config.out_dim, config.eps),
        )

    def grid_positions(self, grid_thw) -> torch.Tensor:
        """`[3, L]` float (t, row, col) of a `(t, h, w)` patch grid's merged patches, rows and columns scaled to
        `base_grid` (t is 0 for images)."""
        t, h, w = (int(v) for v in grid_thw)
        m = self.config.spatial_merge_size
        rows = torch.arange(h // m, dtype=torch.float32) * (self.config.base_grid[0] / h)
        cols = torch.arange(w // m, dtype=torch.float32) * (self.config.base_grid[1] / w)
        tt, rr, cc = torch.meshgrid(torch.zeros(t), rows, cols, indexing="ij")
        return torch.stack([tt.flatten(), rr.flatten(), cc.flatten()])

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """`(cos, sin)` `[L, 1, head_dim]` (broadcast over heads) of Qwen2.5-VL's multimodal RoPE."""
        cfg = self.config
        head_dim = cfg.hidden_size // cfg.num_heads
        inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
        angles = positions.float()[..., None] * inv_freq.to(positions.device)  # [3, L, head_dim / 2]
        axis = torch.cat([torch.full((n,), i % 3) for i, n in enumerate(cfg.mrope_section)]).to(positions.device)
        angles = angles.gather(0, axis[None, None, :].expand(1, angles.shape[1], -1))[0]  # each frequency its axis
        angles = torch.cat([angles, angles], dim=-1)[:, None, :]
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def forward(self, embeds, grid_thw, ref_embeds=None, ref_grid_thw=None) -> torch.Tensor:
        positions = self.grid_positions(grid_thw)
        x = embeds
        if ref_embeds is not None:
            positions = torch.cat([positions, self.grid_positions(ref_grid_thw)], dim=1)
            x = torch.cat([embeds, ref_embeds], dim=1)
        if positions.shape[1] != x.shape[1]:
            raise ValueError(f"{x.shape[1]} embeddings for grids of {positions.shape[1]} merged patches")
        x = x.to(self.projector[1].weight.dtype)
        cos, sin = self.rope(positions.to(x.device), x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.projector(x)


@dataclass
class NexusGenAdapterConfig:
    """The generation adapter; defaults are Nexus-GenV2's."""

    input_dim: int = 3584
    output_dim: int = 4096


class NexusGenAdapter(nn.Module):
    """Generation adapter: `[B, 81, input_dim]` predicted embeddings -> `[B, 81, output_dim]` DiT text tokens."""

    def __init__(self, config: NexusGenAdapterConfig | None = None):
        super().__init__()
        self.config = config = config if config is not None else NexusGenAdapterConfig()
        self.adapter = nn.Sequential(
            nn.Linear(config.input_dim, config.output_dim),
            nn.LayerNorm(config.output_dim),
            nn.ReLU(),
            nn.Linear(config.output_dim, config.output_dim),
            nn.LayerNorm(config.output_dim),
        )

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.adapter(embeds.to(self.adapter[0].weight.dtype))


# ----------------------------------------------------------------------------------- formats
MERGER_SIGNATURE = (
    "layers.0.self_attn.q_proj.weight",
    "layers.0.self_attn.o_proj.weight",
    "layers.0.mlp.gate_proj.weight",
    "projector.1.weight",
    "projector.4.weight",
    "projector.5.weight",
)
ADAPTER_SIGNATURE = ("adapter.0.weight", "adapter.1.weight", "adapter.3.weight", "adapter.4.weight")


def merger_config(state: StateDict, config_json: dict | None = None) -> NexusGenMergerConfig:
    """Widths and layer count from the shapes; heads from Qwen2.5-VL-7B's 128-wide heads."""
    hidden = state["projector.0.weight"].shape[0]
    out_dim = state["projector.5.weight"].shape[0]
    wide = state["projector.1.weight"].shape[0]
    q, k = state["layers.0.self_attn.q_proj.weight"].shape[0], state["layers.0.self_attn.k_proj.weight"].shape[0]
    if q % HEAD_DIM or k % HEAD_DIM or wide % out_dim:
        raise ConfigError(
            f"Nexus-Gen editing adapter: q_proj gives {q}, k_proj {k} features (expected multiples of "
            f"{HEAD_DIM}) and projector.1 {wide} (expected a multiple of projector.5's {out_dim})"
        )
    layers = {int(key.split(".")[1]) for key in state if key.startswith("layers.")}
    return NexusGenMergerConfig(
        hidden_size=hidden,
        num_heads=q // HEAD_DIM,
        num_kv_heads=k // HEAD_DIM,
        intermediate_size=state["layers.0.mlp.gate_proj.weight"].shape[0],
        num_layers=max(layers) + 1,
        out_dim=out_dim,
        expand_ratio=wide // out_dim,
    )


def adapter_config(state: StateDict, config_json: dict | None = None) -> NexusGenAdapterConfig:
    output_dim, input_dim = state["adapter.0.weight"].shape
    return NexusGenAdapterConfig(input_dim=input_dim, output_dim=output_dim)


NEXUS_GEN_EDITING_ADAPTER_SPEC = ModelSpec(
    name="nexus_gen_editing_adapter",
    role="nexus_gen_editing_adapter",
    layouts=(KeyLayout("diffsynth", MERGER_SIGNATURE, prefix="embedding_merger."),),
    config_from_state=merger_config,
    build=NexusGenImageEmbeddingMerger,
    description="Nexus-Gen V2 editing adapter (embedding_merger.* of edit_decoder.bin)",
)
NEXUS_GEN_GENERATION_ADAPTER_SPEC = ModelSpec(
    name="nexus_gen_generation_adapter",
    role="nexus_gen_generation_adapter",
    layouts=(KeyLayout("diffsynth", ADAPTER_SIGNATURE, owns_prefixes=("adapter.",)),),
    config_from_state=adapter_config,
    build=NexusGenAdapter,
    description="Nexus-Gen V2 generation adapter (adapter.* of generation_decoder.bin)",
)
