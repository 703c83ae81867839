"""The Wan video denoiser: Wan 2.1 (T2V, I2V), Wan 2.2 (T2V/I2V-A14B experts, TI2V-5B).

Video latents `[B, C, F, H, W]` are cut into (1, 2, 2) patches by a Conv3d and run through
`num_layers` blocks of self-attention (3-axis RoPE over frame / row / column, QK-RMSNorm across
all heads), cross-attention to the UMT5 text (and, for Wan 2.1 I2V, a second key/value set over
CLIP image tokens) and a GELU feed-forward. Self-attention and feed-forward are modulated by the
timestep (shift, scale, gate); cross-attention is not.

VACE models (Wan2.1-VACE-1.3B / 14B) add a control branch in the same file: `vace_patch_embedding`
embeds the 96-channel control context (the latents of the kept and the repainted video, the mask
folded to 64 channels) and `vace_blocks`, one Wan block per layer in `vace_layers`, turn it into
hints added to the residual stream after those layers, scaled by `vace_scale`. Each control block
runs right after its main layer (the branch depends only on the DiT's input), so the hints are
never all held at once and a step cache that skips the main blocks skips the branch too.

Alibaba PAI's Wan Fun Control models (Wan2.1-Fun-V1.1-*-Control, Wan2.2-Fun-A14B-Control) are I2V DiTs
whose extra input channels also carry the control video's latent, and may have `ref_conv`: a 2 x 2
convolution that turns a reference image's latent into tokens placed before the video's, as one more
leading latent frame for RoPE, and dropped before the head.

Wan2.2-Animate-14B is a Wan 2.1 I2V DiT with `animate=True`: `pose_patch_embedding` adds the pose video's
latent to the tokens of every latent frame after the first (the character image), and the face crops go
through `motion_encoder` and `face_encoder` into `face_adapter.fuser_blocks`, a per-frame cross-attention
after every `face_adapter_every`-th block (the modules live in `animate.py`).

Module names equal the ORIGINAL Wan checkpoints (`blocks.N.self_attn.q`, `head.head`, ...), which
is what the official hub repos hold even though their files carry diffusers-style names.

Numerics follow the authors where it matters: the residual stream, norms, the modulation tables
and the gates stay in float32 (the authors' code runs them under a float32 autocast), while the
linear layers and attention run in the dtype of the latents passed in. Per-token timesteps
(TI2V-5B gives the first frame t=0) are embedded once per distinct value and gathered per token,
so a `[B, tokens]` timestep never materialises a `[B, tokens, 6, dim]` float32 table.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from diffsynth.runtime.attention import attention
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.layers import MultiAxisRope, rope_tables, rotate, timestep_embedding
from diffsynth.runtime.parallel import batch_parallel, shard_sequence
from diffsynth.runtime.step_cache import run_block_list

from .animate import FaceAdapter, FaceEncoder, MotionEncoder, motion_channels

logger = logging.getLogger(__name__)

MODEL_TYPES = ("t2v", "i2v", "ti2v")
IMAGE_EMBED_EPS = 1e-5  # the CLIP projection uses torch's default LayerNorm eps, not config.eps
# TeaCache's polynomials (highest power first), fitted by the TeaCache authors per Wan 2.1 model on the
# timestep modulation `time_projection(...)`; the ids and values DiffSynth-Studio's `tea_cache_model_id` takes
TEA_CACHE_COEFFICIENTS = {
    "Wan2.1-T2V-1.3B": (-5.21862437e04, 9.23041404e03, -5.28275948e02, 1.36987616e01, -4.99875664e-02),
    "Wan2.1-T2V-14B": (-3.03318725e05, 4.90537029e04, -2.65530556e03, 5.87365115e01, -3.15583525e-01),
    "Wan2.1-I2V-14B-480P": (2.57151496e05, -3.54229917e04, 1.40286849e03, -1.35890334e01, 1.32517977e-01),
    "Wan2.1-I2V-14B-720P": (8.10705460e03, 2.13393892e03, -3.72934672e02, 1.66203073e01, -4.17769401e-02),
}

Rope = tuple[torch.Tensor, torch.Tensor]  # `rope_tables`: per-channel (cos, signed sin), float32


HEAD_DIM = 128  # every released Wan DiT's; heads are not visible in the shapes


def backbone_fields(state, block: str = "blocks.{}.") -> dict:
    """The sizes every Wan DiT's shapes fix (our names; `block` is where block N's modules sit, e.g.
    "blocks.{}.block." for Animate-2): width, channels, patch, output channels, FFN width, depth, text and time
    embedding widths."""
    dim, in_dim, *patch = state["patch_embedding.weight"].shape
    patch = tuple(int(p) for p in patch)
    num_layers = 0
    while block.format(num_layers) + "modulation" in state:
        num_layers += 1
    return dict(
        dim=int(dim),
        in_dim=int(in_dim),
        patch_size=patch,
        out_dim=int(state["head.head.weight"].shape[0]) // math.prod(patch),
        ffn_dim=int(state[block.format(0) + "ffn.0.weight"].shape[0]),
        num_layers=num_layers,
        text_dim=int(state["text_embedding.0.weight"].shape[1]),
        freq_dim=int(state["time_embedding.0.weight"].shape[1]),
    )


def heads_from_width(fields: dict, label: str) -> None:
    """`num_heads` = dim / 128 when neither a config nor the caller gave it (a ConfigError when dim does not split)."""
    if "num_heads" in fields or "dim" not in fields:
        return
    if fields["dim"] % HEAD_DIM:
        raise ConfigError(
            f"{label} dim={fields['dim']} is not a multiple of {HEAD_DIM}: the head count cannot be derived from the "
            "shapes; give num_heads in a config.json beside the file"
        )
    fields["num_heads"] = fields["dim"] // HEAD_DIM


@dataclass
class WanBackboneConfig:
    """The sizes every Wan DiT shares: patch embedding, blocks, text and time embeddings, head and RoPE; defaults
    are the 14B models'. `WanDiTConfig` and the configs of the DiTs built on its blocks (S2V, Animate-2,
    Wan-Dancer) extend it, so these fields and their checks are written once."""

    dim: int = 5120
    ffn_dim: int = 13824
    num_heads: int = 40
    num_layers: int = 40
    in_dim: int = 16
    out_dim: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    text_len: int = 512
    rope_theta: float = 10000.0
    rope_max_len: int = 1024

    def __post_init__(self):
        name = type(self).__name__
        self.patch_size = tuple(int(p) for p in self.patch_size)
        for field in ("dim", "ffn_dim", "num_heads", "in_dim", "out_dim", "text_dim", "freq_dim", "text_len"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}.{field}={value!r} must be a positive integer")
        for field in ("num_layers", "rope_max_len"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name}.{field}={value!r} must be a non-negative integer")
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"{name}.patch_size={self.patch_size} must be three positive integers (t, h, w)")
        if self.dim % self.num_heads:
            raise ValueError(f"{name}.dim={self.dim} is not divisible by num_heads={self.num_heads}")
        if self.head_dim % 2 or self.head_dim < 6:
            raise ValueError(
                f"{name}.head_dim={self.head_dim} (dim {self.dim} / num_heads {self.num_heads}) must be even "
                "and at least 6 to split into frame/row/column rotary axes"
            )
        if self.freq_dim % 2:
            raise ValueError(f"{name}.freq_dim={self.freq_dim} must be even")
        if self.eps <= 0:
            raise ValueError(f"{name}.eps={self.eps!r} must be positive")
        if self.rope_theta <= 0:
            raise ValueError(f"{name}.rope_theta={self.rope_theta!r} must be positive")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def block_config(self, **extra) -> WanDiTConfig:
        """A `WanDiTConfig` of these sizes (and `extra` fields): the config of the Wan blocks, head and CLIP
        projection that a DiT built on them reuses."""
        return WanDiTConfig(**{f.name: getattr(self, f.name) for f in fields(WanBackboneConfig)}, **extra)


def add_input_layers(model: nn.Module, config: WanBackboneConfig) -> None:
    """The input layers every Wan DiT has, under the checkpoints' names: `patch_embedding` (latents to tokens),
    `text_embedding` (umT5 states), `time_embedding` and `time_projection` (the six modulation vectors)."""
    dim, patch = config.dim, config.patch_size
    model.patch_embedding = nn.Conv3d(config.in_dim, dim, kernel_size=patch, stride=patch)
    model.text_embedding = nn.Sequential(
        nn.Linear(config.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim)
    )
    model.time_embedding = nn.Sequential(nn.Linear(config.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
    model.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))


def time_modulation(
    model: nn.Module, t: torch.Tensor, dtype: torch.dtype, angle_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """The modulation table `[N, 6, dim]` (float32) and the time embedding `[N, dim]` of timesteps `t` `[N]`
    (`angle_dtype`: float64 for the models whose authors embed so)."""
    cfg = model.config
    temb = model.time_embedding(timestep_embedding(t, cfg.freq_dim, angle_dtype=angle_dtype).to(dtype))
    return model.time_projection(temb).float().unflatten(-1, (6, cfg.dim)), temb


def text_tokens(model: nn.Module, context: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """umT5 states `[B, L <= text_len, text_dim]` zero-padded to `text_len` and embedded: `[B, text_len, dim]`."""
    pad = model.config.text_len - context.shape[1]
    return model.text_embedding(F.pad(context.to(dtype), (0, 0, 0, pad)))


@dataclass
class WanDiTConfig(WanBackboneConfig):
    """Architecture of a Wan DiT; defaults are Wan2.1-T2V-14B (= each Wan2.2-T2V-A14B expert).

    `in_dim` counts every channel fed to the patch embedding: noise latents plus the I2V
    conditioning `y` (16 + 4 mask + 16 = 36 for the 14B I2V models). `has_image_input` adds the
    CLIP projection `img_emb` and the image keys/values of every cross-attention (Wan 2.1 I2V
    only; Wan2.2-I2V-A14B is `model_type="i2v"` without it). `model_type` is the authors' label,
    used by the pipeline to choose how to condition.
    """

    has_image_input: bool = False
    image_dim: int = 1280
    image_pos_len: int = 0  # FLF2V: learned positions of the 2 x 257 first+last-frame CLIP tokens (514)
    model_type: str = "t2v"
    vace_layers: tuple[int, ...] = ()  # VACE: main layers followed by a control hint (first must be 0)
    vace_in_dim: int = 96  # VACE control context channels: 16 kept + 16 repainted latent + 64 mask
    ref_conv: bool = False  # Wan Fun (V1.1, Wan2.2 A14B) Control: a reference image's latent as leading tokens
    ref_dim: int = 16  # the reference latent's channels (the Wan 2.1 VAE's)
    camera_adapter_dim: int = 0  # Wan Fun Control-Camera: `control_adapter` input channels (24); 0 = none
    animate: bool = False  # Wan2.2-Animate: pose_patch_embedding, motion_encoder, face_encoder, face_adapter
    motion_encoder_size: int = 512  # face crops are this many pixels square
    motion_channels: tuple[int, ...] = ()  # pyramid widths at size, size/2, ..., 4; () = the released ones
    motion_style_dim: int = 512
    motion_dim: int = 20
    motion_encoder_dim: int = 512  # the motion vector fed to the face encoder
    face_encoder_hidden_dim: int = 1024
    face_encoder_num_heads: int = 4
    face_adapter_every: int = 5  # a face block after blocks 0, k, 2k, ... (diffusers' inject_face_latents_blocks)

    def __post_init__(self):
        super().__post_init__()
        self.vace_layers = tuple(int(i) for i in self.vace_layers)
        if not isinstance(self.ref_dim, int) or isinstance(self.ref_dim, bool) or self.ref_dim < 1:
            raise ValueError(f"WanDiTConfig.ref_dim={self.ref_dim!r} must be a positive integer")
        for name in ("image_dim", "image_pos_len", "camera_adapter_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"WanDiTConfig.{name}={value!r} must be a non-negative integer")
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"WanDiTConfig.model_type={self.model_type!r} must be one of {MODEL_TYPES}")
        if self.has_image_input and self.model_type != "i2v":
            raise ValueError(
                f"WanDiTConfig.has_image_input=True needs model_type='i2v', got model_type={self.model_type!r}"
            )
        if self.image_pos_len and not self.has_image_input:
            raise ValueError(f"WanDiTConfig.image_pos_len={self.image_pos_len} needs has_image_input=True (FLF2V)")
        if self.has_image_input and self.image_dim < 1:
            raise ValueError(f"WanDiTConfig.image_dim={self.image_dim} must be positive with has_image_input=True")
        if self.animate:
            self._check_animate()
        if self.vace_layers:
            layers = self.vace_layers
            if layers[0] != 0 or list(layers) != sorted(set(layers)) or layers[-1] >= self.num_layers:
                raise ValueError(
                    f"WanDiTConfig.vace_layers={layers} must be increasing, start at 0 and stay below "
                    f"num_layers={self.num_layers}"
                )
            if isinstance(self.vace_in_dim, bool) or not isinstance(self.vace_in_dim, int) or self.vace_in_dim < 1:
                raise ValueError(f"WanDiTConfig.vace_in_dim={self.vace_in_dim!r} must be a positive integer")

    def _check_animate(self) -> None:
        self.motion_channels = tuple(int(c) for c in self.motion_channels)
        names = ("motion_encoder_size", "motion_style_dim", "motion_dim", "motion_encoder_dim")
        names += ("face_encoder_hidden_dim", "face_encoder_num_heads", "face_adapter_every")
        for name in names:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"WanDiTConfig.{name}={value!r} must be a positive integer")
        size = self.motion_encoder_size
        if size < 4 or size & (size - 1):
            raise ValueError(f"WanDiTConfig.motion_encoder_size={size} must be a power of two, at least 4")
        levels = int(math.log2(size)) - 1
        if self.motion_channels and (len(self.motion_channels) != levels or min(self.motion_channels) < 1):
            raise ValueError(
                f"WanDiTConfig.motion_channels={self.motion_channels} must give {levels} positive widths "
                f"(resolutions {size} down to 4)"
            )
        self.motion_channels = motion_channels(size, self.motion_channels)  # () -> the released widths
        if self.num_layers % self.face_adapter_every:
            raise ValueError(
                f"WanDiTConfig.face_adapter_every={self.face_adapter_every} must divide num_layers={self.num_layers}"
            )
        if self.model_type != "i2v" or self.vace_layers or self.ref_conv:
            raise ValueError(
                "WanDiTConfig.animate=True is an I2V DiT (model_type='i2v') without vace_layers or ref_conv, got "
                f"model_type={self.model_type!r}, vace_layers={self.vace_layers}, ref_conv={self.ref_conv}"
            )

    @property
    def patch(self) -> tuple[int, int, int]:
        """Alias of `patch_size`."""
        return self.patch_size

    @property
    def rope_axes_dims(self) -> tuple[int, int, int]:
        """Head channels rotated by frame, row and column: rows and columns get `2 * (d // 6)`
        each and frames the rest, as the authors split it (128 -> 44, 42, 42)."""
        hw = 2 * (self.head_dim // 6)
        return (self.head_dim - 2 * hw, hw, hw)


class Fp32LayerNorm(nn.LayerNorm):
    """LayerNorm computed and returned in float32 whatever the input and weight dtypes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)


def _heads(x: torch.Tensor, n: int) -> torch.Tensor:
    return x.unflatten(-1, (n, -1))


class SelfAttention(nn.Module):
    """Self-attention with RMSNorm on the full q/k width (across heads) and 3-axis RoPE."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, rope: Rope, mask: torch.Tensor | None = None) -> torch.Tensor:
        """`mask` `[B, S]` hides the padding that divides a token count over sequence-parallel ranks."""
        n = self.num_heads
        q = rotate(_heads(self.norm_q(self.q(x)), n), *rope)
        k = rotate(_heads(self.norm_k(self.k(x)), n), *rope)
        return self.o(attention(q, k, _heads(self.v(x), n), mask, sequence_parallel=True).flatten(2))


class CrossAttention(nn.Module):
    """Attention to the text tokens; with `image_input`, plus a separate attention over the CLIP
    image tokens (own keys/values, same queries), summed before the output projection."""

    def __init__(self, dim: int, num_heads: int, eps: float, image_input: bool):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)
        self.image_input = image_input
        if image_input:
            self.k_img = nn.Linear(dim, dim)
            self.v_img = nn.Linear(dim, dim)
            self.norm_k_img = nn.RMSNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_img: torch.Tensor | None) -> torch.Tensor:
        n = self.num_heads
        q = _heads(self.norm_q(self.q(x)), n)
        out = attention(q, _heads(self.norm_k(self.k(context)), n), _heads(self.v(context), n))
        if self.image_input:
            k_img = _heads(self.norm_k_img(self.k_img(context_img)), n)
            out = out + attention(q, k_img, _heads(self.v_img(context_img), n))
        return self.o(out.flatten(2))


class WanBlock(nn.Module):
    """Modulated self-attention, unmodulated cross-attention, modulated GELU feed-forward."""

    def __init__(self, config: WanDiTConfig):
        super().__init__()
        dim, eps = config.dim, config.eps
        self.norm1 = Fp32LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.self_attn = SelfAttention(dim, config.num_heads, eps)
        self.norm3 = Fp32LayerNorm(dim, eps=eps, elementwise_affine=True)
        self.cross_attn = CrossAttention(dim, config.num_heads, eps, config.has_image_input)
        self.norm2 = Fp32LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.ffn = nn.Sequential(
            nn.Linear(dim, config.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(config.ffn_dim, dim)
        )
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(
        self,
        x: torch.Tensor,
        e: torch.Tensor,
        index: torch.Tensor,
        context: torch.Tensor,
        context_img: torch.Tensor | None,
        rope: Rope,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`x` `[B, S, dim]` float32 residual; `e` `[U, 6, dim]` float32 per distinct timestep;
        `index` `[B, 1]` or `[B, S]` picks each sample's (or token's) row of `e`; `mask` is the
        self-attention key mask (sequence parallelism's padding)."""
        dtype = context.dtype
        mod = self.modulation.float() + e
        shift, scale, gate = (mod[:, i][index] for i in range(3))
        y = self.self_attn((self.norm1(x) * (1 + scale) + shift).to(dtype), rope, mask)
        x = x + y.float() * gate
        x = x + self.cross_attn(self.norm3(x).to(dtype), context, context_img).float()
        shift, scale, gate = (mod[:, i][index] for i in range(3, 6))
        y = self.ffn((self.norm2(x) * (1 + scale) + shift).to(dtype))
        return x + y.float() * gate


class Head(nn.Module):
    """Final LayerNorm modulated by the time embedding (shift, scale), then the patch projection."""

    def __init__(self, dim: int, out_features: int, eps: float):
        super().__init__()
        self.norm = Fp32LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.head = nn.Linear(dim, out_features)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        mod = self.modulation.float() + temb[:, None]
        shift, scale = mod[:, 0][index], mod[:, 1][index]
        return self.head((self.norm(x) * (1 + scale) + shift).to(dtype))


class ImageEmbedding(nn.Module):
    """CLIP image tokens -> model width: LayerNorm, Linear, GELU, Linear, LayerNorm (`img_emb.proj`)."""

    def __init__(self, in_dim: int, dim: int, pos_len: int = 0):
        super().__init__()
        # FLF2V adds learned positions so the first- and last-frame CLIP tokens stay distinguishable
        self.emb_pos = nn.Parameter(torch.zeros(1, pos_len, in_dim)) if pos_len else None
        self.proj = nn.Sequential(
            Fp32LayerNorm(in_dim, eps=IMAGE_EMBED_EPS),
            nn.Linear(in_dim, in_dim),
            nn.GELU(),
            nn.Linear(in_dim, dim),
            Fp32LayerNorm(dim, eps=IMAGE_EMBED_EPS),
        )

    def forward(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        norm_in, fc1, act, fc2, norm_out = self.proj
        if self.emb_pos is not None:
            if x.shape[1] != self.emb_pos.shape[1]:
                raise ValueError(
                    f"clip_feature has {x.shape[1]} tokens; this FLF2V DiT takes {self.emb_pos.shape[1]} "
                    "(first and last frame CLIP tokens joined)"
                )
            x = x.float() + self.emb_pos.float()
        h = fc2(act(fc1(norm_in(x).to(dtype))))
        return norm_out(h).to(dtype)


class VaceBlock(WanBlock):
    """A block of the VACE control branch: a Wan block over the control stream `c`, whose output
    projection `after_proj` is the hint for the main stream. The first one also projects the
    embedded control context (`before_proj`) and adds the DiT's embedded input to it."""

    def __init__(self, config: WanDiTConfig, first: bool):
        super().__init__(config)
        self.before_proj = nn.Linear(config.dim, config.dim) if first else None
        self.after_proj = nn.Linear(config.dim, config.dim)

    def forward(self, c: torch.Tensor, x: torch.Tensor | None, *args) -> tuple[torch.Tensor, torch.Tensor]:
        """`c` `[B, S, dim]` float32 control stream (the embedded context for the first block), `x` the
        DiT's embedded input (first block only); `args` as `WanBlock.forward` after `x`. Returns the
        new control stream and the hint, both float32."""
        dtype = args[2].dtype  # the text context: the dtype the linear layers run in
        if self.before_proj is not None:
            c = self.before_proj(c.to(dtype)).float() + x
        c = super().forward(c, *args)
        return c, self.after_proj(c.to(dtype)).float()


def tea_cache_indicator(e: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """TeaCache's indicator: the modulation table `[U, 6, dim]`, each row weighted by how many samples or
    tokens use it, so its relative change equals that of the per-token table DiffSynth-Studio compares."""
    counts = torch.bincount(index.flatten(), minlength=e.shape[0]).to(e.dtype)
    return e * counts[:, None, None]


class _VaceBranch:
    """One forward's VACE control stream: `add_hint(block, x_in, x_out)` runs the control block of a
    main layer listed in `vace_layers` (the first one from that layer's input) and adds its hint."""

    def __init__(self, dit: WanDiT, control: torch.Tensor, scales: tuple[float, ...], shared: tuple):
        self.dit, self.control, self.shared = dit, control, shared
        self.scales = scales
        self.index = {id(dit.blocks[layer]): n for n, layer in enumerate(dit.config.vace_layers)}

    def add_hint(self, block: nn.Module, x_in: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
        n = self.index.get(id(block))
        if n is None:
            return x_out
        self.control, hint = self.dit._run(
            self.dit.vace_blocks[n], self.control, x_in if n == 0 else None, *self.shared
        )
        return x_out + hint * self.scales[n]


class CameraResidualBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(dim, dim, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(x)))


class CameraAdapter(nn.Module):
    """Wan Fun Control-Camera's `control_adapter` (PAI's names): per frame, the camera rays at pixel resolution are
    folded 8 x 8 onto channels (to the VAE's latent grid), patch-embedded by a strided conv and refined by one
    residual block; the result `[B, dim, F, h, w]` is added to the DiT's patch embedding."""

    def __init__(self, in_dim: int, dim: int, patch: tuple[int, int]):
        super().__init__()
        self.conv = nn.Conv2d(in_dim * 64, dim, kernel_size=patch, stride=patch)
        self.residual_blocks = nn.Sequential(CameraResidualBlock(dim))

    def forward(self, camera: torch.Tensor) -> torch.Tensor:
        b, f = camera.shape[0], camera.shape[2]
        frames = F.pixel_unshuffle(camera.transpose(1, 2).flatten(0, 1), 8)  # [B * F, in_dim * 64, H / 8, W / 8]
        out = self.residual_blocks(self.conv(frames))
        return out.unflatten(0, (b, f)).transpose(1, 2)


class WanDiT(nn.Module):
    """Wan DiT. `forward(x [B,C,F,H,W], timestep [B] | [B,tokens], context [B,L,text_dim],
    clip_feature=None, y=None, vace_context=None, vace_scale=1.0) -> [B, out_dim, F, H, W]`."""

    offload_units = ("blocks",)  # with VACE, per instance: ("blocks", "vace_blocks")
    compile_units = ("blocks",)
    lora_target_modules = ("q", "k", "v", "o", "ffn.0", "ffn.2")
    tea_cache_coefficients = TEA_CACHE_COEFFICIENTS

    def __init__(self, config: WanDiTConfig | None = None):
        super().__init__()
        self.config = config = config if config is not None else WanDiTConfig()
        self.gradient_checkpointing = False
        self.step_cache = None  # a FirstBlockCache or TeaCache over `blocks` (BasePipeline.enable_*_cache)
        self.parallel = None  # ParallelGroups dividing batch and video tokens (BasePipeline.enable_parallel)
        dim = config.dim
        add_input_layers(self, config)
        self.blocks = nn.ModuleList(WanBlock(config) for _ in range(config.num_layers))
        self.head = Head(dim, config.out_dim * math.prod(config.patch_size), config.eps)
        if config.has_image_input:
            self.img_emb = ImageEmbedding(config.image_dim, dim, config.image_pos_len)
        if config.ref_conv:
            self.ref_conv = nn.Conv2d(
                config.ref_dim, dim, kernel_size=config.patch_size[1:], stride=config.patch_size[1:]
            )
        if config.camera_adapter_dim:
            self.control_adapter = CameraAdapter(config.camera_adapter_dim, dim, config.patch_size[1:])
        if config.vace_layers:
            self.vace_blocks = nn.ModuleList(VaceBlock(config, first=n == 0) for n in range(len(config.vace_layers)))
            self.vace_patch_embedding = nn.Conv3d(
                config.vace_in_dim, dim, kernel_size=config.patch_size, stride=config.patch_size
            )
            self.offload_units = ("blocks", "vace_blocks")
            self.compile_units = ("blocks", "vace_blocks")
            # what the trainer's --trainable_models / --lora_base_model "vace" train (DiffSynth-Studio's name)
            self.trainable_parts = {"vace": ("vace_blocks", "vace_patch_embedding")}
        if config.animate:
            self.pose_patch_embedding = nn.Conv3d(
                config.out_dim, dim, kernel_size=config.patch_size, stride=config.patch_size
            )
            self.motion_encoder = MotionEncoder(
                config.motion_encoder_size,
                motion_channels(config.motion_encoder_size, config.motion_channels),
                config.motion_style_dim,
                config.motion_dim,
                config.motion_encoder_dim,
            )
            self.face_encoder = FaceEncoder(
                config.motion_encoder_dim, config.face_encoder_hidden_dim, config.face_encoder_num_heads, dim
            )
            self.face_adapter = FaceAdapter(dim, config.num_heads, config.num_layers // config.face_adapter_every)
            self.motion_encoder_batch_size = 8  # face crops per motion-encoder call (memory vs speed)
            # --trainable_models / --lora_base_model "animate_adapter": DiffSynth-Studio's name for these four modules
            self.trainable_parts = {
                "animate_adapter": ("pose_patch_embedding", "motion_encoder", "face_encoder", "face_adapter")
            }
        self.rope = MultiAxisRope(config.rope_theta, config.rope_axes_dims, (config.rope_max_len,) * 3)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor | float,
        context: torch.Tensor,
        clip_feature: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        vace_context: torch.Tensor | None = None,
        vace_scale: float | tuple[float, ...] = 1.0,
        reference_latents: torch.Tensor | None = None,
        pose_latents: torch.Tensor | None = None,
        face_pixel_values: torch.Tensor | None = None,
        camera_latents: torch.Tensor | None = None,
        motion_modulation: torch.Tensor | None = None,
        block_hook=None,
    ) -> torch.Tensor:
        """Velocity prediction for latents `x` `[B, C, F, H, W]`; computation runs in `x.dtype`.

        `timestep` is in [0, 1000]: `[B]` (or a scalar), or `[B, tokens]` per patch token
        (`tokens = F/pt * H/ph * W/pw`, row-major over frame, row, column) for TI2V.
        `context` is the UMT5 output `[B, L <= text_len, text_dim]`; shorter context is zero-padded
        to `text_len` as the authors do (the padding is attended, so it changes the result).
        `clip_feature` `[B, N, image_dim]` is required exactly when `has_image_input`; `y` (I2V
        conditioning) is concatenated to `x` on channels before the patch embedding.
        `vace_context` `[B, vace_in_dim, F', H, W]` (VACE models; `F' <= F`, the missing frames count
        as zeros) drives the control branch; `vace_scale` multiplies its hints (one number, or one per
        entry of `vace_layers`). `reference_latents` `[B, ref_dim, 1, H, W]` (a DiT with `ref_conv`)
        is the latent of a reference image, seen as tokens of a frame before the video's.
        Animate DiTs take both `pose_latents` `[B, out_dim, F - 1, H, W]` (the pose video's latent, for the
        frames after the first) and `face_pixel_values` `[B, 3, 4 (F - 1) - 3, size, size]` in [-1, 1] (the
        face crops of the same frames). Control-Camera DiTs (`camera_adapter_dim`) add `camera_latents`
        `[B, camera_adapter_dim, F, 8 H, 8 W]` (a camera path's Plücker rays, `camera.py`) through their
        `control_adapter` to the patch embedding. `motion_modulation` `[B, 6, dim]` (a speed-control model's
        output, `motion_controller.py`) is added to the timestep modulation; it needs one timestep per sample.
        `block_hook(block, x, shared) -> x`, when given, runs each main block instead of the block itself
        (`shared` = modulation, timestep index, text, CLIP tokens, RoPE, key mask): Video-As-Prompt's
        expert runs beside some layers this way (`video_as_prompt.py`).

        Under parallelism (`self.parallel`) the samples are divided over the batch ranks and the video
        tokens over the sequence ranks (the text and CLIP keys stay whole).
        """
        scales = self._vace_scales(vace_context, vace_scale)
        return batch_parallel(
            self.parallel,
            x.shape[0],
            self._forward,
            x,
            timestep,
            context,
            clip_feature,
            y,
            vace_context,
            scales,
            reference_latents,
            pose_latents,
            face_pixel_values,
            camera_latents,
            motion_modulation,
            block_hook,
        )

    def _forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor | float,
        context: torch.Tensor,
        clip_feature: torch.Tensor | None,
        y: torch.Tensor | None,
        vace_context: torch.Tensor | None,
        vace_scales: tuple[float, ...],
        reference_latents: torch.Tensor | None,
        pose_latents: torch.Tensor | None = None,
        face_pixel_values: torch.Tensor | None = None,
        camera_latents: torch.Tensor | None = None,
        motion_modulation: torch.Tensor | None = None,
        block_hook=None,
    ) -> torch.Tensor:
        cfg = self.config
        if y is not None:
            if y.shape[0] != x.shape[0] or y.shape[2:] != x.shape[2:]:
                raise ValueError(f"y has shape {tuple(y.shape)}; it must match x {tuple(x.shape)} except on channels")
            x = torch.cat([x, y.to(x.dtype)], dim=1)
        grid = self._check_inputs(x, context, clip_feature)
        b, dtype, device = x.shape[0], x.dtype, x.device

        patches = self.patch_embedding(x)
        if camera_latents is not None:
            patches = patches + self._camera_tokens(camera_latents, patches.shape, dtype)
        motion = None
        if pose_latents is not None or face_pixel_values is not None or cfg.animate:
            patches, motion = self._animate_inputs(patches, pose_latents, face_pixel_values, grid, dtype)
        seq = patches.flatten(2).transpose(1, 2).float()
        values, index = self._timestep_index(timestep, b, seq.shape[1], device)
        leading = 0  # reference tokens before the video's
        if reference_latents is not None:
            ref = self._reference_tokens(reference_latents, b, grid, dtype)
            if (index.shape[1] == seq.shape[1] and index.shape[1] > 1) or vace_context is not None:
                raise ValueError("reference_latents cannot be combined with per-token timesteps or vace_context")
            seq, leading = torch.cat([ref, seq], dim=1), ref.shape[1]
            grid = (grid[0] + 1, grid[1], grid[2])
        e, temb = time_modulation(self, values, dtype)
        if motion_modulation is not None:
            e = e + self._motion_offset(motion_modulation, e, index)
        context = text_tokens(self, context, dtype)
        context_img = self.img_emb(clip_feature, dtype) if cfg.has_image_input else None
        rope = self._rope(grid, device)
        control = self._vace_tokens(vace_context, seq, grid, dtype) if vace_context is not None else None

        # sequence parallelism: each rank runs the blocks on its share of the video tokens (with their
        # RoPE rows and, for per-token timesteps, their modulation rows); the text stays whole
        with shard_sequence(self.parallel, seq.shape[1]) as shards:
            tokens, token_rope, token_index, mask = seq, rope, index, None
            if shards is not None:
                tokens, token_rope = shards.shard(seq), (shards.shard(rope[0]), shards.shard(rope[1]))
                token_index = shards.shard(index) if index.shape[1] == seq.shape[1] else index
                mask = shards.key_mask(None, b, device)
                control = shards.shard(control) if control is not None else None
                if motion is not None:
                    raise ValueError("Wan2.2-Animate inputs are not supported under sequence parallelism")
            shared = (e, token_index, context, context_img, token_rope, mask)
            branch = _VaceBranch(self, control, vace_scales, shared) if control is not None else None
            faces = {id(self.blocks[i * cfg.face_adapter_every]): f for i, f in enumerate(self._face_blocks())}

            def call(block: nn.Module, s: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor]:
                out = block_hook(block, s[0], shared) if block_hook is not None else self._run(block, s[0], *shared)
                out = branch.add_hint(block, s[0], out) if branch is not None else out
                face = faces.get(id(block)) if motion is not None else None
                return (out + self._run(face, out, motion) if face is not None else out,)

            (tokens,) = run_block_list(
                self.step_cache, self.blocks, (tokens,), call, lambda: tea_cache_indicator(e, index)
            )
            seq = shards.gather(tokens) if shards is not None else tokens

        out = self.head(seq[:, leading:], temb.float(), index, dtype)
        return self._unpatchify(out, (grid[0] - (1 if leading else 0), grid[1], grid[2]))

    def _camera_tokens(self, camera: torch.Tensor, shape, dtype: torch.dtype) -> torch.Tensor:
        """The control adapter's output `[B, dim, F, h, w]` for `camera_latents`, checked against the patches'."""
        cfg = self.config
        if not cfg.camera_adapter_dim:
            raise ValueError("camera_latents were given but this Wan DiT has no control_adapter (a Control-Camera DiT)")
        b, _, f, h, w = shape
        expected = (b, cfg.camera_adapter_dim, f, h * cfg.patch_size[1] * 8, w * cfg.patch_size[2] * 8)
        if tuple(camera.shape) != expected and tuple(camera.shape) != (1, *expected[1:]):
            raise ValueError(f"camera_latents has shape {tuple(camera.shape)}; expected {expected} (pixel resolution)")
        return self.control_adapter(camera.to(dtype)).expand(b, -1, -1, -1, -1)

    def _face_blocks(self) -> list[nn.Module]:
        return list(self.face_adapter.fuser_blocks) if self.config.animate else []

    def _animate_inputs(
        self,
        patches: torch.Tensor,
        pose: torch.Tensor | None,
        faces: torch.Tensor | None,
        grid: tuple[int, int, int],
        dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The patch embedding `[B, dim, F, h, w]` with the pose tokens added to frames 1.., and the face
        tokens `[B, F, heads + 1, dim]` (a zero frame first, for the character image's frame)."""
        cfg = self.config
        if not cfg.animate:
            raise ValueError(
                "pose_latents / face_pixel_values were given but this Wan DiT is not a Wan2.2-Animate DiT "
                "(animate=False)"
            )
        if pose is None or faces is None:
            raise ValueError("this Wan DiT is Wan2.2-Animate: pass both pose_latents and face_pixel_values")
        b, frames = patches.shape[0], grid[0]
        pt, ph, pw = cfg.patch_size
        expected = (b, cfg.out_dim, (frames - 1) * pt, grid[1] * ph, grid[2] * pw)
        if tuple(pose.shape) != expected:
            raise ValueError(
                f"pose_latents has shape {tuple(pose.shape)}; expected {expected} (every latent frame but the first)"
            )
        size = cfg.motion_encoder_size
        if faces.dim() != 5 or faces.shape[0] != b or faces.shape[1] != 3 or faces.shape[3:] != (size, size):
            raise ValueError(f"face_pixel_values has shape {tuple(faces.shape)}; expected [{b}, 3, F, {size}, {size}]")
        if FaceEncoder.frames_out(faces.shape[2]) != frames - 1:
            raise ValueError(
                f"face_pixel_values has {faces.shape[2]} frames; {4 * (frames - 1) - 3} face frames make the "
                f"{frames - 1} latent frames after the first"
            )
        patches = torch.cat([patches[:, :, :1], patches[:, :, 1:] + self.pose_patch_embedding(pose.to(dtype))], 2)
        crops = faces.to(dtype).transpose(1, 2).flatten(0, 1)  # [B * F, 3, size, size]
        step = self.motion_encoder_batch_size
        vectors = torch.cat([self.motion_encoder(crops[i : i + step]) for i in range(0, crops.shape[0], step)])
        motion = self.face_encoder(vectors.unflatten(0, (b, -1)))
        return patches, torch.cat([torch.zeros_like(motion[:, :1]), motion], dim=1)

    def _reference_tokens(
        self, reference: torch.Tensor, b: int, grid: tuple[int, int, int], dtype: torch.dtype
    ) -> torch.Tensor:
        """`ref_conv` tokens `[B, h * w, dim]` float32 of one reference latent frame `[B, ref_dim, 1, H, W]`."""
        cfg = self.config
        if not cfg.ref_conv:
            raise ValueError("reference_latents were given but this Wan DiT has no ref_conv (a Wan Fun Control DiT)")
        _, ph, pw = cfg.patch_size
        expected = (b, cfg.ref_dim, 1, grid[1] * ph, grid[2] * pw)
        if tuple(reference.shape) != expected:
            raise ValueError(f"reference_latents has shape {tuple(reference.shape)}; expected {expected}")
        return self.ref_conv(reference[:, :, 0].to(dtype)).flatten(2).transpose(1, 2).float()

    def _vace_scales(self, vace_context: torch.Tensor | None, vace_scale) -> tuple[float, ...]:
        n = len(self.config.vace_layers)
        if vace_context is None:
            return ()
        if not n:
            raise ValueError("vace_context was given but this Wan DiT has no VACE blocks (vace_layers is empty)")
        if isinstance(vace_scale, torch.Tensor):
            vace_scale = vace_scale.tolist()
        scales = [vace_scale] * n if isinstance(vace_scale, (int, float)) else list(vace_scale)
        if len(scales) != n or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in scales):
            raise ValueError(f"vace_scale={vace_scale!r} must be a number or {n} numbers (one per VACE layer)")
        if not all(math.isfinite(v) for v in scales):  # a NaN or infinite scale makes every token NaN
            raise ValueError(f"vace_scale={vace_scale!r} must be finite")
        return tuple(float(v) for v in scales)

    def _vace_tokens(
        self, vace_context: torch.Tensor, seq: torch.Tensor, grid: tuple[int, int, int], dtype: torch.dtype
    ) -> torch.Tensor:
        """The embedded control context `[B, S, dim]` float32, zero tokens after its last frame."""
        cfg = self.config
        c = vace_context
        if c.dim() != 5 or c.shape[0] != seq.shape[0] or c.shape[1] != cfg.vace_in_dim:
            raise ValueError(
                f"vace_context has shape {tuple(c.shape)}; expected [{seq.shape[0]}, vace_in_dim={cfg.vace_in_dim}, "
                "F, H, W]"
            )
        pt, ph, pw = cfg.patch_size
        if c.shape[3] != grid[1] * ph or c.shape[4] != grid[2] * pw or c.shape[2] > grid[0] * pt or c.shape[2] % pt:
            raise ValueError(
                f"vace_context has shape {tuple(c.shape)}; its (H, W) must equal the latents' "
                f"{(grid[1] * ph, grid[2] * pw)} and its frames be at most {grid[0] * pt}"
            )
        tokens = self.vace_patch_embedding(c.to(dtype))
        tokens = tokens.flatten(2).transpose(1, 2).float()
        return F.pad(tokens, (0, 0, 0, seq.shape[1] - tokens.shape[1]))

    def _motion_offset(self, motion: torch.Tensor, e: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """A speed-control offset `[B, 6, dim]` (or `[1, 6, dim]`) for the per-sample modulation `e` `[B, 6, dim]`."""
        b = index.shape[0]
        if index.shape[1] != 1:
            raise ValueError("motion_modulation needs one timestep per sample, not per-token timesteps")
        if motion.dim() != 3 or motion.shape[0] not in (1, b) or motion.shape[1:] != e.shape[1:]:
            raise ValueError(
                f"motion_modulation has shape {tuple(motion.shape)}; expected [{b}, 6, {self.config.dim}] "
                "(a speed-control model of this DiT's width)"
            )
        return motion.float()

    def _run(self, block: nn.Module, *args) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def _check_inputs(
        self, x: torch.Tensor, context: torch.Tensor, clip_feature: torch.Tensor | None
    ) -> tuple[int, int, int]:
        cfg = self.config
        if x.dim() != 5:
            raise ValueError(f"x has shape {tuple(x.shape)}; expected [B, C, F, H, W]")
        b, c, *size = x.shape
        if c != cfg.in_dim:
            raise ValueError(
                f"x (with y) has {c} channels; this Wan DiT takes in_dim={cfg.in_dim} "
                f"(model_type {cfg.model_type!r}{', pass y' if c < cfg.in_dim else ''})"
            )
        if any(s % p for s, p in zip(size, cfg.patch_size, strict=True)):
            raise ValueError(f"latent size (F, H, W)={tuple(size)} must be divisible by the patch {cfg.patch_size}")
        grid = tuple(s // p for s, p in zip(size, cfg.patch_size, strict=True))
        if max(grid) > cfg.rope_max_len:
            raise ValueError(f"patch grid {grid} exceeds rope_max_len={cfg.rope_max_len} positions on an axis")
        if context.dim() != 3 or context.shape[0] != b or context.shape[2] != cfg.text_dim:
            raise ValueError(f"context has shape {tuple(context.shape)}; expected [{b}, L, text_dim={cfg.text_dim}]")
        if context.shape[1] > cfg.text_len:
            raise ValueError(
                f"context has {context.shape[1]} tokens; this Wan DiT takes at most text_len={cfg.text_len}"
            )
        if cfg.has_image_input:
            if clip_feature is None:
                raise ValueError("this Wan DiT has image input (Wan 2.1 I2V): pass clip_feature [B, N, image_dim]")
            if clip_feature.dim() != 3 or clip_feature.shape[0] != b or clip_feature.shape[2] != cfg.image_dim:
                raise ValueError(
                    f"clip_feature has shape {tuple(clip_feature.shape)}; expected [{b}, N, image_dim={cfg.image_dim}]"
                )
        elif clip_feature is not None:
            raise ValueError("clip_feature was given but this Wan DiT has no image input (has_image_input=False)")
        return grid

    @staticmethod
    def _timestep_index(
        timestep: torch.Tensor | float, b: int, tokens: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Distinct timesteps `[U]` and, per sample or token, the row to use (`[B, 1]` or `[B, S]`)."""
        t = torch.as_tensor(timestep, dtype=torch.float32, device=device)
        if t.dim() <= 1:
            t = t.reshape(-1)
            if t.numel() == 1:
                t = t.expand(b)
            if t.numel() != b:
                raise ValueError(f"timestep has {t.numel()} values for a batch of {b}")
            return t, torch.arange(b, device=device)[:, None]
        if t.shape != (b, tokens):
            raise ValueError(
                f"timestep has shape {tuple(t.shape)}; expected [{b}] or per token [{b}, {tokens}] "
                "(tokens = F/pt * H/ph * W/pw)"
            )
        values, index = torch.unique(t, return_inverse=True)
        return values, index

    def _rope(self, grid: tuple[int, int, int], device: torch.device) -> Rope:
        """`rope_tables` `[1, S, 1, head_dim]` of the patch grid, tokens row-major over (frame, row, column)."""
        axes = [torch.arange(n, device=device) for n in grid]
        ids = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)
        cos, sin = self.rope(ids)
        return rope_tables(cos[None, :, None], sin[None, :, None])

    def _unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """`[B, S, pt*ph*pw*C]` (channels fastest within a patch) -> `[B, C, F, H, W]`."""
        pt, ph, pw = self.config.patch_size
        f, h, w = grid
        b = x.shape[0]
        x = x.view(b, f, h, w, pt, ph, pw, self.config.out_dim)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, self.config.out_dim, f * pt, h * ph, w * pw)
