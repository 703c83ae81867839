"""LongCat-Video (meituan-longcat/LongCat-Video): the 13.6B single-stream video DiT and its generation.

The DiT keeps the authors' module names (`x_embedder`, `t_embedder`, `y_embedder`, `blocks.N.attn.qkv`,
`blocks.N.cross_attn.kv_linear`, `blocks.N.ffn.w1`, `final_layer`, ...), so the sharded `dit/` files load strictly.
Each block: AdaLN-modulated self-attention with per-head RMS norms and a 3D rotary embedding (frames, rows,
columns), cross-attention to the umT5 states (no modulation, its own affine LayerNorm), and a modulated SwiGLU
feed-forward. The time embedding is per latent frame: conditioning frames (the image of I2V, the given clip of a
continuation) carry t = 0 and stay clean; their tokens attend only to themselves and skip cross-attention, while
the noisy tokens attend to all tokens. The model predicts `x0 - noise` (the negated flow velocity).

Generation (`generate_longcat`) follows the authors' `pipeline_longcat_video.py`: sigmas `linspace(1, 0.001, N)`
(shifted by `sigma_shift`), Euler steps on the noisy frames only, and their CFG-Zero* guidance
`u * s + cfg * (c - u * s)` with `s = <c, u> / |u|^2` per sample. Their distilled sampling (the cfg_step LoRA in
their LoRA layout, read by `longcat_lora_to_standard`; 16 steps on the distilled grid, no CFG) is `longcat_distill`.
The authors' block-sparse attention (their 720p refinement stage) and KV cache of the clean frames are not
implemented.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from diffsynth.runtime.attention import attention
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.layers import MultiAxisRope, rope_tables, rotate, timestep_embedding
from diffsynth.runtime.quant import linear_weight

logger = logging.getLogger(__name__)

ATTENTION_MODES = ("full",)


@dataclass(frozen=True)
class LongCatConfig:
    """Sizes of the LongCat-Video DiT; the defaults are the released `dit/config.json`'s."""

    in_channels: int = 16
    out_channels: int = 16
    hidden_size: int = 4096
    depth: int = 48
    num_heads: int = 32
    caption_channels: int = 4096
    mlp_ratio: float = 4.0
    adaln_tembed_dim: int = 512
    frequency_embedding_size: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_tokens_zero_pad: bool = True  # padded text tokens become zero vectors and are attended to
    attention_mode: str = "full"  # the authors' "bsa" (block-sparse, 720p refinement) is not implemented
    rope_theta: float = 10000.0
    eps: float = 1e-6

    def __post_init__(self):
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        for name in ("in_channels", "out_channels", "hidden_size", "depth", "num_heads", "caption_channels",
                     "adaln_tembed_dim", "frequency_embedding_size"):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LongCatConfig.{name}={value!r} must be a positive integer")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"LongCatConfig.hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}"
            )
        if self.head_dim % 8:
            raise ValueError(f"LongCatConfig: head_dim={self.head_dim} must be a multiple of 8 (3D RoPE)")
        if len(self.patch_size) != 3 or self.patch_size[0] != 1 or min(self.patch_size) < 1:
            raise ValueError(f"LongCatConfig.patch_size={self.patch_size} must be (1, p, p): frames are not merged")
        if self.frequency_embedding_size % 2:
            raise ValueError(f"LongCatConfig.frequency_embedding_size={self.frequency_embedding_size} must be even")
        if not self.mlp_ratio > 0:
            raise ValueError(f"LongCatConfig.mlp_ratio={self.mlp_ratio} must be positive")
        if self.attention_mode == "bsa":
            raise ConfigError(
                "LongCatConfig.attention_mode='bsa': the authors' block-sparse attention (their 720p refinement "
                "stage with refinement_lora) is not implemented; use attention_mode='full'"
            )
        if self.attention_mode not in ATTENTION_MODES:
            raise ValueError(f"LongCatConfig.attention_mode={self.attention_mode!r}; accepted: {ATTENTION_MODES}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def ffn_dim(self) -> int:
        """SwiGLU width: 2/3 of `hidden_size * mlp_ratio`, rounded up to a multiple of 256 (11008 released)."""
        inner = int(2 * int(self.hidden_size * self.mlp_ratio) / 3)
        return 256 * ((inner + 255) // 256)

    @property
    def rope_axes_dims(self) -> tuple[int, int, int]:
        """Rotary channels of (frame, row, column): rows and columns 2 * (head_dim // 6) each, frames the rest."""
        hw = 2 * (self.head_dim // 6)
        return self.head_dim - 2 * hw, hw, hw


class RMSNormFP32(nn.Module):
    """RMS norm computed in float32, cast back, then scaled (the authors' order)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        return (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def _layer_norm32(x: torch.Tensor, eps: float, norm: nn.LayerNorm | None = None) -> torch.Tensor:
    weight = None if norm is None else norm.weight.float()
    bias = None if norm is None else norm.bias.float()
    return F.layer_norm(x.float(), (x.shape[-1],), weight, bias, eps)


def _linear32(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A linear layer in float32 whatever the weights' dtype (the authors' fp32 autocast regions; a 4-bit
    layer's weights dequantized)."""
    bias = None if layer.bias is None else layer.bias.float()
    return F.linear(x.float(), linear_weight(layer).float(), bias)


def _modulate(x: torch.Tensor, frames: int, shift, scale, eps: float) -> torch.Tensor:
    """LayerNorm (no affine) then `* (1 + scale) + shift`, per latent frame, in float32; back to x's dtype."""
    b, n, c = x.shape
    y = _layer_norm32(x, eps).view(b, frames, -1, c)
    return (y * (scale + 1) + shift).view(b, n, c).to(x.dtype)


def _gated(x: torch.Tensor, gate: torch.Tensor, frames: int, y: torch.Tensor) -> torch.Tensor:
    b, n, c = x.shape
    return (x + (gate * y.view(b, frames, -1, c)).view(b, n, c)).to(x.dtype)


class SelfAttention(nn.Module):
    def __init__(self, config: LongCatConfig):
        super().__init__()
        dim, self.heads = config.hidden_size, config.num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = RMSNormFP32(config.head_dim, config.eps)
        self.k_norm = RMSNormFP32(config.head_dim, config.eps)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cond_tokens: int) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, -1).unbind(2)
        q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotate(q.float(), *rope).to(x.dtype), rotate(k.float(), *rope).to(x.dtype)
        if cond_tokens:  # clean frames see only themselves; noisy frames see everything
            out = torch.cat(
                [
                    attention(q[:, :cond_tokens], k[:, :cond_tokens], v[:, :cond_tokens]),
                    attention(q[:, cond_tokens:], k, v),
                ],
                dim=1,
            )
        else:
            out = attention(q, k, v)
        return self.proj(out.flatten(2))


class CrossAttention(nn.Module):
    def __init__(self, config: LongCatConfig):
        super().__init__()
        dim, self.heads = config.hidden_size, config.num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.q_norm = RMSNormFP32(config.head_dim, config.eps)
        self.k_norm = RMSNormFP32(config.head_dim, config.eps)

    def forward(self, x: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None) -> torch.Tensor:
        b, n, c = x.shape
        q = self.q_norm(self.q_linear(x).view(b, n, self.heads, -1))
        k, v = self.kv_linear(text).view(b, text.shape[1], 2, self.heads, -1).unbind(2)
        out = attention(q, self.k_norm(k), v, mask=text_mask)
        return self.proj(out.flatten(2))


class FeedForward(nn.Module):
    def __init__(self, config: LongCatConfig):
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.ffn_dim, bias=False)
        self.w2 = nn.Linear(config.ffn_dim, config.hidden_size, bias=False)
        self.w3 = nn.Linear(config.hidden_size, config.ffn_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class LongCatBlock(nn.Module):
    def __init__(self, config: LongCatConfig):
        super().__init__()
        self.eps = config.eps
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(config.adaln_tembed_dim, 6 * config.hidden_size))
        self.pre_crs_attn_norm = nn.LayerNorm(config.hidden_size, eps=config.eps)
        self.attn = SelfAttention(config)
        self.cross_attn = CrossAttention(config)
        self.ffn = FeedForward(config)

    def forward(self, x, text, text_mask, t, rope, frames: int, cond_tokens: int) -> torch.Tensor:
        """`x` `[B, N, C]`, `t` the per-frame time embedding `[B, T, C_t]` (float32)."""
        mod = _linear32(self.adaLN_modulation[1], F.silu(t)).unsqueeze(2).chunk(6, dim=-1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
        x = _gated(
            x, gate_msa, frames, self.attn(_modulate(x, frames, shift_msa, scale_msa, self.eps), rope, cond_tokens)
        )
        h = _layer_norm32(x, self.eps, self.pre_crs_attn_norm).to(x.dtype)
        if cond_tokens:  # clean frames take no text
            crossed = self.cross_attn(h[:, cond_tokens:], text, text_mask)
            x = x + torch.cat([torch.zeros_like(x[:, :cond_tokens]), crossed.to(x.dtype)], dim=1)
        else:
            x = x + self.cross_attn(h, text, text_mask)
        return _gated(x, gate_mlp, frames, self.ffn(_modulate(x, frames, shift_mlp, scale_mlp, self.eps)))


class PatchEmbed(nn.Module):
    def __init__(self, config: LongCatConfig):
        super().__init__()
        p = config.patch_size
        self.proj = nn.Conv3d(config.in_channels, config.hidden_size, kernel_size=p, stride=p)


class TimestepEmbedder(nn.Module):
    def __init__(self, config: LongCatConfig):
        super().__init__()
        self.dim = config.frequency_embedding_size
        d = config.adaln_tembed_dim
        self.mlp = nn.Sequential(nn.Linear(self.dim, d), nn.SiLU(), nn.Linear(d, d))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """`t` `[N]` -> `[N, adaln_tembed_dim]` in float32."""
        h = _linear32(self.mlp[0], timestep_embedding(t.float(), self.dim, cos_first=True))
        return _linear32(self.mlp[2], F.silu(h))


class CaptionEmbedder(nn.Module):
    def __init__(self, config: LongCatConfig):
        super().__init__()
        c = config.hidden_size
        self.y_proj = nn.Sequential(nn.Linear(config.caption_channels, c), nn.GELU(approximate="tanh"), nn.Linear(c, c))


class FinalLayer(nn.Module):
    def __init__(self, config: LongCatConfig):
        super().__init__()
        self.eps = config.eps
        c = config.hidden_size
        self.linear = nn.Linear(c, math.prod(config.patch_size) * config.out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(config.adaln_tembed_dim, 2 * c))

    def forward(self, x: torch.Tensor, t: torch.Tensor, frames: int) -> torch.Tensor:
        shift, scale = _linear32(self.adaLN_modulation[1], F.silu(t)).unsqueeze(2).chunk(2, dim=-1)
        return _linear32(self.linear, _modulate(x.float(), frames, shift, scale, self.eps))


class LongCatVideoDiT(nn.Module):
    """LongCat-Video DiT. `forward(x, timestep, context, context_mask=None, num_cond_latents=0) -> [B, C, T, H, W]`
    float32: the predicted `x0 - noise` (the negated flow velocity)."""

    offload_units = ("blocks",)
    compile_units = ("blocks",)
    lora_target_modules = ("qkv", "proj", "q_linear", "kv_linear", "w1", "w2", "w3")

    def __init__(self, config: LongCatConfig | None = None):
        super().__init__()
        self.config = config = config if config is not None else LongCatConfig()
        self.gradient_checkpointing = False
        self.x_embedder = PatchEmbed(config)
        self.t_embedder = TimestepEmbedder(config)
        self.y_embedder = CaptionEmbedder(config)
        self.blocks = nn.ModuleList(LongCatBlock(config) for _ in range(config.depth))
        self.final_layer = FinalLayer(config)
        self.rope = MultiAxisRope(config.rope_theta, config.rope_axes_dims, (1024, 1024, 1024))

    def _rope(self, grid: tuple[int, int, int], device) -> tuple[torch.Tensor, torch.Tensor]:
        f, h, w = grid
        ids = torch.stack(
            torch.meshgrid(torch.arange(f), torch.arange(h), torch.arange(w), indexing="ij"), dim=-1
        ).reshape(-1, 3)
        cos, sin = self.rope(ids.to(device))
        cos, sin = rope_tables(cos, sin)
        return cos[None, :, None], sin[None, :, None]

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor | float,
        context: torch.Tensor,
        context_mask: torch.Tensor | None = None,
        num_cond_latents: int = 0,
    ) -> torch.Tensor:
        """`x` `[B, in_channels, T, H, W]`; `timestep` in [0, 1000], a scalar, `[B]` or per latent frame `[B, T]`
        (rounded to the weights' dtype, as the authors do); `context` the umT5 states `[B, L, caption_channels]`
        with `context_mask` `[B, L]` (1 = a real token; None: all real); the first `num_cond_latents` latent frames
        are clean conditioning (t = 0, attending only among themselves, no text)."""
        cfg = self.config
        if x.dim() != 5 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x has shape {tuple(x.shape)}; expected [B, {cfg.in_channels}, T, H, W]")
        b, _, frames, height, width = x.shape
        p = cfg.patch_size
        if height % p[1] or width % p[2]:
            raise ValueError(f"x has height {height} and width {width}; both must be multiples of {p[1:]}")
        if context.dim() != 3 or context.shape[0] != b or context.shape[2] != cfg.caption_channels:
            raise ValueError(f"context has shape {tuple(context.shape)}; expected [{b}, L, {cfg.caption_channels}]")
        if context_mask is not None and tuple(context_mask.shape) != tuple(context.shape[:2]):
            raise ValueError(f"context_mask has shape {tuple(context_mask.shape)}; expected {tuple(context.shape[:2])}")
        cond = int(num_cond_latents)
        if not 0 <= cond < frames:
            raise ValueError(f"num_cond_latents={num_cond_latents} must be in [0, {frames}) for {frames} latent frames")
        dtype = self.x_embedder.proj.weight.dtype
        t = torch.as_tensor(timestep, device=x.device).to(dtype).float()
        t = t.reshape(1, 1).expand(b, frames) if t.numel() == 1 else t
        t = t[:, None].expand(b, frames) if t.dim() == 1 else t
        if tuple(t.shape) != (b, frames):
            raise ValueError(f"timestep has shape {tuple(t.shape)}; expected a scalar, [{b}] or [{b}, {frames}]")
        t = t.clone()
        t[:, :cond] = 0
        grid = (frames, height // p[1], width // p[2])
        seq = self.x_embedder.proj(x.to(dtype)).flatten(2).transpose(1, 2)
        temb = self.t_embedder(t.flatten()).view(b, frames, -1)
        proj = self.y_embedder.y_proj
        text = proj(context.to(dtype))
        text_mask = None
        if context_mask is not None:
            if cfg.text_tokens_zero_pad:  # padding tokens become zeros, and every token is attended to
                text = text * context_mask[:, :, None].to(text.dtype)
            else:
                text_mask = context_mask.bool()
        rope = self._rope(grid, x.device)
        cond_tokens = cond * grid[1] * grid[2]
        for block in self.blocks:
            args = (seq, text, text_mask, temb, rope, frames, cond_tokens)
            if self.gradient_checkpointing and torch.is_grad_enabled():
                seq = checkpoint(block, *args, use_reentrant=False)
            else:
                seq = block(*args)
        out = self.final_layer(seq, temb, frames)
        return self.unpatchify(out, grid)

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        f, h, w = grid
        pf, ph, pw = self.config.patch_size
        c = self.config.out_channels
        x = x.view(x.shape[0], f, h, w, pf, ph, pw, c).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(x.shape[0], c, f * pf, h * ph, w * pw).float()


# ----------------------------------------------------------------------------------------- format
def config_from_state(state, config_json: dict | None = None) -> LongCatConfig:
    """The config from the shapes of the authors' keys and, when present, the `dit/config.json` beside them."""
    given = {k: v for k, v in (config_json or {}).items() if k in {f.name for f in fields(LongCatConfig)}}
    if config_json and config_json.get("enable_bsa"):
        logger.info("LongCat-Video config.json enables block-sparse attention: full attention is used instead")
    derived: dict = {}
    if state:
        conv = tuple(state["x_embedder.proj.weight"].shape)
        derived.update(hidden_size=conv[0], in_channels=conv[1], patch_size=tuple(conv[2:]))
        derived["depth"] = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
        derived["caption_channels"] = state["y_embedder.y_proj.0.weight"].shape[1]
        derived["adaln_tembed_dim"] = state["t_embedder.mlp.2.weight"].shape[0]
        derived["frequency_embedding_size"] = state["t_embedder.mlp.0.weight"].shape[1]
        derived["out_channels"] = state["final_layer.linear.weight"].shape[0] // math.prod(derived["patch_size"])
        head_dim = state["blocks.0.attn.q_norm.weight"].shape[0]
        derived["num_heads"] = derived["hidden_size"] // head_dim
    for name, value in derived.items():
        if name in given:
            have = tuple(given[name]) if isinstance(value, tuple) else given[name]
            if have != value:
                raise ConfigError(f"LongCat-Video config.json has {name}={given[name]!r}; the weights say {value!r}")
    config = LongCatConfig(**{**given, **derived})
    if state:
        ffn = state["blocks.0.ffn.w1.weight"].shape[0]
        if ffn != config.ffn_dim:
            raise ConfigError(
                f"LongCat-Video blocks.0.ffn.w1.weight has {ffn} rows; mlp_ratio={config.mlp_ratio} gives "
                f"{config.ffn_dim}: give the mlp_ratio in config.json"
            )
    return config


SIGNATURE = (
    "x_embedder.proj.weight",
    "t_embedder.mlp.0.weight",
    "y_embedder.y_proj.0.weight",
    "blocks.0.adaLN_modulation.1.weight",
    "blocks.0.attn.qkv.weight",
    "blocks.0.cross_attn.kv_linear.weight",
    "blocks.0.ffn.w1.weight",
    "final_layer.linear.weight",
)


# ----------------------------------------------------------------------------------------- LoRA files
LORA_PREFIX, LORA_DOT = "lora___lorahyphen___", "___lorahyphen___"  # the authors' escaped module paths
LORA_ALPHA_SCALE = 64 / 128  # their `load_lora` network alpha / rank, for a file without `alpha_scale`
_LORA_KEY = re.compile(r"^(.+?)\.(lora_down\.weight|lora_up\.weight|lora_up\.blocks\.(\d+)\.weight|alpha_scale)$")


def is_longcat_lora(state) -> bool:
    """Whether a LoRA state dict is in the authors' layout (`cfg_step_lora.safetensors`, `refinement_lora...`)."""
    return any(LORA_DOT in key for key in state)


def longcat_lora_to_standard(state, source: str = "<state dict>") -> dict[str, torch.Tensor]:
    """The authors' LoRA layout (their `lora_utils.LoRANetwork` state: `lora___lorahyphen___blocks___lorahyphen___
    0___lorahyphen___attn___lorahyphen___qkv.lora_down.weight`, the up matrix split per output chunk as
    `lora_up.blocks.N.weight` for the fused qkv / kv projections, the scale as `alpha_scale`) as `<module>.lora_down
    .weight` / `.lora_up.weight` / `.alpha` of our (their) module names. A split up matrix becomes one block-diagonal
    matrix (chunk N of the output reads chunk N of the down projection's rows, as their forward does)."""
    from diffsynth.runtime.errors import LoRAError

    groups: dict[str, dict] = {}
    for key, tensor in state.items():
        match = _LORA_KEY.match(key)
        if match is None or LORA_DOT not in match.group(1):
            raise LoRAError(f"{source}: key {key!r} is not in the LongCat-Video LoRA layout (lora___lorahyphen___...)")
        group = groups.setdefault(match.group(1), {"blocks": {}})
        if match.group(3) is not None:
            group["blocks"][int(match.group(3))] = tensor
        else:
            group[match.group(2)] = tensor
    out: dict[str, torch.Tensor] = {}
    for name, group in groups.items():
        module = name.replace(LORA_PREFIX, "").replace(LORA_DOT, ".")
        blocks = group["blocks"]
        if blocks and sorted(blocks) != list(range(len(blocks))):
            raise LoRAError(
                f"{source}: {name}.lora_up.blocks has chunks {sorted(blocks)}; expected 0..{len(blocks) - 1}"
            )
        up = torch.block_diag(*(blocks[i] for i in range(len(blocks)))) if blocks else group.get("lora_up.weight")
        down = group.get("lora_down.weight")
        if up is None or down is None:
            raise LoRAError(f"{source}: {name} lacks its {'up' if up is None else 'down'} matrix")
        scale = group.get("alpha_scale")
        scale = LORA_ALPHA_SCALE if scale is None else float(scale.float().reshape(-1)[0])
        out[f"{module}.lora_down.weight"] = down
        out[f"{module}.lora_up.weight"] = up
        out[f"{module}.alpha"] = torch.tensor(scale * down.shape[0])  # our factor alpha / rank is their scale
    return out


# ----------------------------------------------------------------------------------------- generation
DISTILL_TEACHER_STEPS = 50  # the distilled model's grid: 50 evenly spaced of the 1000 training timesteps
TRAIN_TIMESTEPS = 1000


def longcat_sigmas(steps: int, shift: float, distill: bool = False) -> torch.Tensor:
    """The authors' schedule: `linspace(1, 0.001, steps)`, or with `distill` (their `use_distill`, for the
    cfg_step LoRA) `steps` picks at even strides of the 50-step grid 1, 0.98, ..., 0.02; then the flow shift
    `s * σ / (1 + (s - 1) σ)` and the terminal 0 (N + 1 values)."""
    if distill:
        if not 1 <= steps <= DISTILL_TEACHER_STEPS:
            raise ConfigError(
                f"num_inference_steps={steps}: the distilled LongCat-Video samples at most {DISTILL_TEACHER_STEPS} "
                "steps of its grid (16 is the authors' choice)"
            )
        stride = TRAIN_TIMESTEPS // DISTILL_TEACHER_STEPS
        grid = torch.arange(DISTILL_TEACHER_STEPS, 0, -1, dtype=torch.float32) * stride / TRAIN_TIMESTEPS
        picks = [math.floor(i * DISTILL_TEACHER_STEPS / steps) for i in range(steps)]
        sigmas = grid[picks]
    else:
        sigmas = torch.linspace(1.0, 0.001, steps, dtype=torch.float32)
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return torch.cat([sigmas, torch.zeros(1)])


def cfg_zero_star(positive: torch.Tensor, negative: torch.Tensor, scale: float) -> torch.Tensor:
    """The authors' guidance (CFG-Zero*): the negative prediction is first scaled by its optimal projection
    `s = <c, u> / (|u|^2 + 1e-8)` per sample, then `u * s + scale * (c - u * s)`."""
    b = positive.shape[0]
    c, u = positive.reshape(b, -1), negative.reshape(b, -1)
    s = ((c * u).sum(1, keepdim=True) / ((u * u).sum(1, keepdim=True) + 1e-8)).view(b, *[1] * (positive.dim() - 1))
    return negative * s + scale * (positive - negative * s)


def longcat_step(x, prediction, sigma: float, sigma_next: float, cond: int) -> torch.Tensor:
    """One Euler step of the noisy frames (the model predicts `x0 - noise`, the negated velocity); the first
    `cond` latent frames are kept as they are."""
    out = x.clone()
    out[:, :, cond:] = x[:, :, cond:] - (sigma_next - sigma) * prediction[:, :, cond:]
    return out


def check_longcat_arguments(pipe, given: dict, sampler: str, cfg_merge: bool, frames: int) -> None:
    """Refuse, by name, options LongCat-Video cannot take, and a `longcat_video` for another DiT."""
    if not isinstance(pipe.dit, LongCatVideoDiT):
        raise ConfigError(
            "longcat_video and longcat_distill need a LongCat-Video DiT (meituan-longcat/LongCat-Video); this DiT "
            "is not one"
        )
    refused = [name for name, value in given.items() if value is not None]
    if refused:
        raise ConfigError(
            f"LongCat-Video takes no {', '.join(refused)}: it makes text-to-video, image-to-video (input_image) "
            "and video continuation (longcat_video)"
        )
    if pipe.dit2 is not None:
        raise ConfigError("LongCat-Video is one DiT: remove the second DiT (dit2) from the pipeline")
    if sampler != "euler":
        raise ConfigError(f"sampler={sampler!r}: LongCat-Video samples with the authors' Euler steps ('euler')")
    if cfg_merge:
        raise ConfigError("cfg_merge=True is not supported by LongCat-Video (its guidance runs the branches in turn)")
    if pipe.vae.z_dim != pipe.dit.config.in_channels:
        raise ConfigError(
            f"the LongCat-Video DiT takes {pipe.dit.config.in_channels} latent channels; this VAE gives "
            f"{pipe.vae.z_dim}: use the Wan 2.1 VAE (Wan2.1_VAE.pth)"
        )


def _condition_frames(pipe, input_image, longcat_video, frames: int) -> list | None:
    from diffsynth.runtime.media import load_frames, load_image

    if input_image is not None and longcat_video is not None:
        raise ConfigError("give input_image (image-to-video) or longcat_video (continuation), not both")
    if input_image is not None:
        if isinstance(input_image, (list, tuple)):
            if len(input_image) != 1:
                raise ConfigError(f"LongCat-Video takes one input_image, got {len(input_image)}")
            input_image = input_image[0]
        return [load_image(input_image)]
    if longcat_video is None:
        return None
    clip = load_frames(longcat_video, "longcat_video")
    tc = pipe.vae.temporal_compression
    if len(clip) % tc != 1:
        raise ConfigError(
            f"longcat_video has {len(clip)} frames; it must have {tc}n + 1 (e.g. 13 or 17) to fill whole latent frames"
        )
    if len(clip) >= frames:
        raise ConfigError(f"longcat_video has {len(clip)} frames; num_frames={frames} must be longer to add any")
    return clip


def generate_longcat(
    pipe, prompts, negatives, input_image, longcat_video, size, seed, rand_device, latents, max_sequence_length,
    schedule, scale, vae_kwargs, progress_bar,
) -> torch.Tensor:  # fmt: skip
    """A LongCat-Video clip `[B, 3, F, H, W]` in [-1, 1]: text-to-video, image-to-video (`input_image`, the first
    frame) or continuation (`longcat_video`, 4n + 1 frames that open the clip). The conditioning latents replace
    the first latent frames of the noise and stay fixed; `schedule` is (steps, shift, sigmas or None, distill)."""
    from diffsynth.runtime.vram import module_dtype

    from .animate import frames_tensor

    height, width, frames = size
    steps, shift, sigmas, distill = schedule
    dit, vae, batch = pipe.dit, pipe.vae, len(prompts)
    s, tc, z = vae.spatial_compression, vae.temporal_compression, vae.z_dim
    given = _condition_frames(pipe, input_image, longcat_video, frames)
    shape = (batch, z, (frames - 1) // tc + 1, height // s, width // s)
    noise = pipe.check_latents(latents, shape) if latents is not None else pipe.generate_noise(shape, seed, rand_device)
    use_cfg = scale > 1.0
    pipe.load_models_to_device(["text_encoder"])
    context = pipe.encode_prompt(prompts, max_sequence_length).float()
    negative_context = pipe.encode_prompt(negatives, max_sequence_length).float() if use_cfg else None

    cond = 0
    x = noise.clone()
    pipe.load_models_to_device(["vae"])
    vae_dtype = module_dtype(vae)
    if given is not None:
        encoded = vae.encode(frames_tensor(given, height, width, vae_dtype, pipe.device), **vae_kwargs).float()
        cond = encoded.shape[2]
        x[:, :, :cond] = encoded.to(x.device)

    if sigmas is None:
        sigmas = longcat_sigmas(steps, shift, distill)
    else:
        sigmas = torch.cat([torch.as_tensor(sigmas, dtype=torch.float32).flatten().cpu(), torch.zeros(1)])
    pipe.load_models_to_device(["dit"])
    dtype = module_dtype(dit)

    def predict(text):
        mask = (text != 0).any(-1).to(dtype)
        timestep = torch.full((batch, shape[2]), float(sigma) * 1000, device=x.device)
        return dit(x.to(dtype), timestep, text.to(dtype), mask, num_cond_latents=cond).float()

    for i in pipe.progress(range(len(sigmas) - 1), progress_bar):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        prediction = predict(context)
        if use_cfg:
            prediction = cfg_zero_star(prediction, predict(negative_context), scale)
        x = longcat_step(x, prediction, sigma, sigma_next, cond)

    pipe.load_models_to_device(["vae"])
    video = vae.decode(x.to(vae_dtype), **vae_kwargs).float()
    pipe.load_models_to_device([])
    return video


__all__ = [
    "SIGNATURE",
    "CrossAttention",
    "LongCatBlock",
    "LongCatConfig",
    "LongCatVideoDiT",
    "SelfAttention",
    "cfg_zero_star",
    "check_longcat_arguments",
    "config_from_state",
    "generate_longcat",
    "is_longcat_lora",
    "longcat_lora_to_standard",
    "longcat_sigmas",
    "longcat_step",
]
