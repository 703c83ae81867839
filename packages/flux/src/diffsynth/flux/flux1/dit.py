"""The FLUX.1 denoiser (dev, Krea, Kontext, schnell), with Black Forest Labs' original key names.

Image tokens (2x2-packed 16-channel latents, 64 features) and T5 text tokens first run through
double-stream blocks (separate weights per stream, joint attention over `[text, image]`), then the
concatenated sequence runs through single-stream blocks (attention and MLP in parallel from one
fused projection). Every block is modulated (shift, scale, gate) by a vector built from the
timestep, the distilled guidance and the pooled CLIP embedding. RoPE over 3-axis ids (t, h, w).

Module names equal `flux1-dev.safetensors`, so original files load as is. Conventions follow
BFL's `Flux.forward`: timesteps and guidance are given in [0, 1] and multiplied by 1000 inside.
Kontext is the same model with the reference image's tokens appended to `img` (ids first axis 1);
the caller keeps the first (noisy) tokens of the output. ControlNet residuals (`controlnet.py`) are
added to the image tokens after the blocks, spread over the blocks as diffusers does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from diffsynth.runtime.attention import attention
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.layers import add_mul, rope_inverse_frequencies, rope_tables, rotate, timestep_embedding
from diffsynth.runtime.parallel import SequenceShards, active_sequence, batch_parallel, shard_sequence
from diffsynth.runtime.step_cache import run_blocks

from .eligen import check_attention_mask

if TYPE_CHECKING:
    from .ip_adapter import IPAdapterKV

TIME_FREQ_DIM = 256  # sinusoidal features fed to time_in / guidance_in
TIME_FACTOR = 1000.0  # timesteps and guidance arrive in [0, 1]
NORM_EPS = 1e-6
# TeaCache's polynomial for FLUX.1 (highest power first): the relative change of the first block's
# modulated image input -> the output's, as fitted by the TeaCache authors and used by DiffSynth-Studio
TEA_CACHE_COEFFICIENTS = {"FLUX.1": (4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00, 2.64230861e-01)}

Rope = tuple[torch.Tensor, torch.Tensor]  # `rope_tables`: per-channel (cos, signed sin), float32


@dataclass
class Flux1DiTConfig:
    """Architecture of the FLUX.1 DiT (BFL `FluxParams` names); defaults are FLUX.1-dev."""

    in_channels: int = 64
    out_channels: int = 64
    vec_in_dim: int = 768
    context_in_dim: int = 4096
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    axes_dim: tuple[int, ...] = (16, 56, 56)
    theta: float = 10000.0
    qkv_bias: bool = True
    guidance_embed: bool = True

    def __post_init__(self):
        self.axes_dim = tuple(int(d) for d in self.axes_dim)
        check_dit_config(
            self, ("in_channels", "out_channels", "vec_in_dim", "context_in_dim", "hidden_size", "num_heads")
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


def check_dit_config(config, positive: tuple[str, ...]) -> None:
    """The checks every FLUX DiT config shares (FLUX.1 and FLUX.2): `positive` fields are integers >= 1, block
    counts >= 0, heads divide the width, RoPE axes are even and sum to the head width, ratio and theta > 0."""
    name = type(config).__name__
    for field in positive:
        value = getattr(config, field)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}.{field}={value!r} must be a positive integer")
    for field in ("depth", "depth_single_blocks"):
        value = getattr(config, field)
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name}.{field}={value!r} must be a non-negative integer")
    if config.hidden_size % config.num_heads:
        raise ValueError(f"{name}.hidden_size={config.hidden_size} is not divisible by num_heads={config.num_heads}")
    if sum(config.axes_dim) != config.head_dim or any(d % 2 for d in config.axes_dim):
        raise ValueError(
            f"{name}.axes_dim={config.axes_dim} must be even and sum to head_dim={config.head_dim} "
            f"(hidden_size {config.hidden_size} / num_heads {config.num_heads})"
        )
    if config.mlp_ratio <= 0 or config.mlp_hidden_dim < 1:
        raise ValueError(f"{name}.mlp_ratio={config.mlp_ratio!r} must be positive")
    if config.theta <= 0:
        raise ValueError(f"{name}.theta={config.theta!r} must be positive")


class MLPEmbedder(nn.Module):
    """`out_layer(silu(in_layer(x)))`: the time, guidance and pooled-text embedders (FLUX.2's have no `bias`)."""

    def __init__(self, in_dim: int, hidden: int, bias: bool = True):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden, bias=bias)
        self.out_layer = nn.Linear(hidden, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class ScaleRMSNorm(nn.Module):
    """RMSNorm over the last axis with a `scale` parameter (BFL's name).

    One `F.rms_norm` call with the scale as its weight: it accumulates in float32 and rounds once
    (as diffusers' `nn.RMSNorm` does), and on CUDA it is a single fused kernel instead of an upcast
    copy, a float32 norm, a downcast and a multiply over every query and key.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.scale.to(x.dtype), NORM_EPS)


class QKNorm(nn.Module):
    def __init__(self, head_dim: int):
        super().__init__()
        self.query_norm = ScaleRMSNorm(head_dim)
        self.key_norm = ScaleRMSNorm(head_dim)


class SelfAttention(nn.Module):
    """Fused qkv projection, QK-norm and output projection of one stream (attention runs jointly); FLUX.2's
    have no biases (`qkv_bias`, `proj_bias` False)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, proj_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`[B, L, dim]` -> q, k, v each `[B, L, H, D]`, q and k normalised."""
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, -1)).unbind(2)
        return self.norm.query_norm(q), self.norm.key_norm(k), v


class Modulation(nn.Module):
    """`lin(silu(vec))` split into (shift, scale, gate) triples, one (single) or two (double), each `[B, 1, dim]`.

    FLUX.1 has one per block; FLUX.2 one per model and stream kind (without `bias`), shared by its blocks."""

    def __init__(self, dim: int, double: bool, bias: bool = True):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim, bias=bias)

    def forward(self, vec: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.lin(F.silu(vec))[:, None].chunk(self.multiplier, dim=-1)


def _mlp(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`(1 + scale) * x + shift` (AdaLN modulation)."""
    return add_mul(shift, x, 1 + scale)


def _joint_attention(q, k, v, rope: Rope, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate q and k (`rope`: `rope_tables` of `rope_from_ids`) and attend. Under sequence parallelism
    the tokens are `[text (whole), this rank's image shard]` (the DiT's `shard_sequence` prefix)."""
    q, k = rotate(q, *rope), rotate(k, *rope)
    return attention(q, k, v, attn_mask, sequence_parallel=True).flatten(2)


class DoubleStreamBlock(nn.Module):
    """Separate image/text weights, joint attention over the concatenated `[text, image]` tokens."""

    def __init__(self, config: Flux1DiTConfig):
        super().__init__()
        dim, mlp = config.hidden_size, config.mlp_hidden_dim
        self.img_mod = Modulation(dim, double=True)
        self.img_norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)
        self.img_attn = SelfAttention(dim, config.num_heads, config.qkv_bias)
        self.img_norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)
        self.img_mlp = _mlp(dim, mlp)
        self.txt_mod = Modulation(dim, double=True)
        self.txt_norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)
        self.txt_attn = SelfAttention(dim, config.num_heads, config.qkv_bias)
        self.txt_norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)
        self.txt_mlp = _mlp(dim, mlp)

    def forward(self, img, txt, vec, rope: Rope, attn_mask=None, ip=None, with_modulated_input: bool = False):
        """`(img, txt)`; `with_modulated_input` adds the modulated image input of the attention (TeaCache's
        indicator, which exists only inside the block, where a streamed block's weights are present)."""
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = self.img_mod(vec)
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = self.txt_mod(vec)
        modulated = modulate(self.img_norm1(img), i_shift1, i_scale1)
        iq, ik, iv = self.img_attn.qkv_heads(modulated)
        tq, tk, tv = self.txt_attn.qkv_heads(modulate(self.txt_norm1(txt), t_shift1, t_scale1))
        q, k, v = torch.cat((tq, iq), 1), torch.cat((tk, ik), 1), torch.cat((tv, iv), 1)
        out = _joint_attention(q, k, v, rope, attn_mask)
        txt_out, img_out = out[:, : txt.shape[1]], out[:, txt.shape[1] :]
        ip_out = ip.attend(iq) if ip is not None else None  # IP-Adapter (`ip_adapter.py`)
        if ip_out is not None and not ip.after_mlp:
            img_out = img_out + ip_out
        img = add_mul(img, i_gate1, self.img_attn.proj(img_out))
        img = add_mul(img, i_gate2, self.img_mlp(modulate(self.img_norm2(img), i_shift2, i_scale2)))
        if ip_out is not None and ip.after_mlp:
            img = img + ip_out
        txt = add_mul(txt, t_gate1, self.txt_attn.proj(txt_out))
        txt = add_mul(txt, t_gate2, self.txt_mlp(modulate(self.txt_norm2(txt), t_shift2, t_scale2)))
        return (img, txt, modulated) if with_modulated_input else (img, txt)


class SingleStreamBlock(nn.Module):
    """Parallel attention + MLP: `linear1` gives q, k, v and the MLP input; `linear2` merges both."""

    def __init__(self, config: Flux1DiTConfig):
        super().__init__()
        dim = config.hidden_size
        self.num_heads = config.num_heads
        self.mlp_hidden_dim = config.mlp_hidden_dim
        self.linear1 = nn.Linear(dim, 3 * dim + self.mlp_hidden_dim)
        self.linear2 = nn.Linear(dim + self.mlp_hidden_dim, dim)
        self.norm = QKNorm(config.head_dim)
        self.pre_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)
        self.modulation = Modulation(dim, double=False)

    def forward(self, x, vec, rope: Rope, attn_mask=None, ip=None) -> torch.Tensor:
        shift, scale, gate = self.modulation(vec)
        qkv, mlp = self.linear1(modulate(self.pre_norm(x), shift, scale)).split(
            [3 * x.shape[-1], self.mlp_hidden_dim], dim=-1
        )
        q, k, v = qkv.unflatten(-1, (3, self.num_heads, -1)).unbind(2)
        out = _joint_attention(self.norm.query_norm(q), self.norm.key_norm(k), v, rope, attn_mask)
        if ip is not None:  # IP-Adapter: every token's query attends to the image tokens
            out = out + ip.attend(self.norm.query_norm(q))
        return add_mul(x, gate, self.linear2(torch.cat((out, F.gelu(mlp, approximate="tanh")), dim=-1)))


class LastLayer(nn.Module):
    """Modulated LayerNorm (shift, scale from `adaLN_modulation`) and the output projection (FLUX.2: no `bias`)."""

    def __init__(self, dim: int, out_channels: int, bias: bool = True):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)
        self.linear = nn.Linear(dim, out_channels, bias=bias)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim, bias=bias))

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None].chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def rope_from_ids(ids: torch.Tensor, axes_dim: tuple[int, ...], theta: float) -> Rope:
    """`(cos, sin)` `[B, L, 1, head_dim / 2]` for float position ids `[B, L, n_axes]`.

    Ids may be any real values (Kontext offsets, fractional positions), so angles are computed per
    call in float64 (float32 on backends without it) and rounded after cos/sin, as diffusers does.
    """
    wide = torch.float32 if ids.device.type == "mps" else torch.float64
    angles = torch.cat(
        [
            ids[..., a].to(wide)[..., None] * rope_inverse_frequencies(dim, theta).to(ids.device, wide)
            for a, dim in enumerate(axes_dim)
        ],
        dim=-1,
    )
    return angles.cos().float().unsqueeze(2), angles.sin().float().unsqueeze(2)


class Flux1DiT(nn.Module):
    """FLUX.1 DiT. `forward(img, img_ids, txt, txt_ids, timesteps, y, guidance)` -> `[B, L_img, out]`."""

    offload_units = ("double_blocks", "single_blocks")
    compile_units = ("double_blocks", "single_blocks")
    lora_target_modules = (
        "img_attn.qkv",
        "img_attn.proj",
        "txt_attn.qkv",
        "txt_attn.proj",
        "img_mlp.0",
        "img_mlp.2",
        "txt_mlp.0",
        "txt_mlp.2",
        "img_mod.lin",
        "txt_mod.lin",
        "linear1",
        "linear2",
        "modulation.lin",
    )
    tea_cache_coefficients = TEA_CACHE_COEFFICIENTS

    def __init__(self, config: Flux1DiTConfig | None = None):
        super().__init__()
        self.config = config = config if config is not None else Flux1DiTConfig()
        self.gradient_checkpointing = False
        # a FirstBlockCache or TeaCache over double_blocks + single_blocks (BasePipeline.enable_*_cache)
        self.step_cache = None
        self.parallel = None  # ParallelGroups dividing batch and image tokens (BasePipeline.enable_parallel)
        dim = config.hidden_size
        self.img_in = nn.Linear(config.in_channels, dim)
        self.time_in = MLPEmbedder(TIME_FREQ_DIM, dim)
        self.vector_in = MLPEmbedder(config.vec_in_dim, dim)
        self.guidance_in = MLPEmbedder(TIME_FREQ_DIM, dim) if config.guidance_embed else None
        self.txt_in = nn.Linear(config.context_in_dim, dim)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(config) for _ in range(config.depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(config) for _ in range(config.depth_single_blocks))
        self.final_layer = LastLayer(dim, config.out_channels)

    def forward(
        self,
        img: torch.Tensor,
        img_ids: torch.Tensor,
        txt: torch.Tensor,
        txt_ids: torch.Tensor,
        timesteps: torch.Tensor | float,
        y: torch.Tensor,
        guidance: torch.Tensor | float | None = None,
        controlnet_block_samples: Sequence[torch.Tensor] | None = None,
        controlnet_single_block_samples: Sequence[torch.Tensor] | None = None,
        attn_mask: torch.Tensor | None = None,
        ip_adapter: IPAdapterKV | None = None,
    ) -> torch.Tensor:
        """Velocity for packed image tokens `img` `[B, L_img, in_channels]`.

        `img_ids` / `txt_ids` are `[B or 1, L, 3]` (or `[L, 3]`) positions of any length, `txt` is
        `[B, L_txt, context_in_dim]`, `timesteps` `[B]` (or a scalar) in [0, 1], `y` the pooled CLIP
        embedding `[B, vec_in_dim]`, `guidance` `[B]` in BFL's units (needed by guidance-distilled
        models, ignored by the others). Computation runs in `img.dtype`.

        `controlnet_block_samples` / `controlnet_single_block_samples` are ControlNet residuals
        `[B or 1, L, hidden_size]` added to the first `L` image tokens after the double / single
        blocks; a list shorter than the blocks is spread over them (block `i` takes sample
        `i // ceil(blocks / samples)`), as diffusers' `FluxTransformer2DModel` does.

        `attn_mask` (bool, True = attend, or additive float) `[B or 1, 1 or heads, S, S]` restricts the
        joint attention over `[txt, img]` (S = L_txt + L_img) in every block (EliGen, `eligen.py`).

        `ip_adapter` holds an IP-Adapter's per-block image keys/values and scale (`ip_adapter.py`).

        With `parallel` set, the batch and the image tokens are divided over the ranks (`enable_parallel`).
        """
        cfg = self.config
        b, n_img = img.shape[:2]
        img_ids, txt_ids = check_inputs(cfg, img, img_ids, txt, txt_ids, y)  # ids now [B or 1, L, axes]
        if attn_mask is not None:
            check_attention_mask(attn_mask, b, cfg.num_heads, txt.shape[1] + n_img)
        # the IP keys/values travel as lists so that batch parallelism divides their batched ones
        ip_kv = None if ip_adapter is None else (ip_adapter.double, ip_adapter.single)
        return batch_parallel(
            self.parallel,
            b,
            self._forward,
            img,
            img_ids,
            txt,
            txt_ids,
            timesteps,
            y,
            guidance,
            controlnet_block_samples,
            controlnet_single_block_samples,
            attn_mask,
            ip_adapter,
            ip_kv,
        )

    def _forward(
        self,
        img,
        img_ids,
        txt,
        txt_ids,
        timesteps,
        y,
        guidance,
        controlnet_block_samples,
        controlnet_single_block_samples,
        attn_mask,
        ip_adapter,
        ip_kv,
    ) -> torch.Tensor:
        cfg = self.config
        b, n_img = img.shape[:2]
        if ip_adapter is not None:
            ip_adapter = replace(ip_adapter, double=list(ip_kv[0]), single=list(ip_kv[1]))
        n_double, n_single = len(self.double_blocks), len(self.single_blocks)
        ip_double, ip_single = [None] * n_double, [None] * n_single
        if ip_adapter is not None:
            ip_double, ip_single = ip_adapter.blocks(n_double, n_single, b)
        double_res = residual_per_block(controlnet_block_samples, len(self.double_blocks), "controlnet_block_samples")
        single_res = residual_per_block(
            controlnet_single_block_samples, len(self.single_blocks), "controlnet_single_block_samples"
        )
        dtype = img.dtype

        vec = conditioning_vector(self, timesteps, y, guidance, b, dtype)
        img = self.img_in(img)
        txt = self.txt_in(txt.to(dtype))
        ids = torch.cat((txt_ids.expand(b, -1, -1), img_ids.expand(b, -1, -1)), dim=1)
        rope = rope_tables(*rope_from_ids(ids, cfg.axes_dim, cfg.theta))

        n_txt = txt.shape[1]
        with shard_sequence(self.parallel, n_img, prefix=n_txt) as shards:
            if shards is not None:  # this rank's image tokens (and what follows them); the text stays whole
                img, rope = shards.shard(img), tuple(shard_after(shards, t, n_txt) for t in rope)
                attn_mask = joint_mask_shard(shards, attn_mask, b, n_txt, cfg.num_heads, img.device)
                double_res = residual_shards(shards, double_res, n_img)
                single_res = residual_shards(shards, single_res, n_img)
            img, txt = self._blocks(img, txt, vec, rope, attn_mask, ip_double, ip_single, double_res, single_res)
            if shards is not None:
                img = shards.gather(img)
        return self.final_layer(img, vec)

    def _blocks(self, img, txt, vec, rope, attn_mask, ip_double, ip_single, double_res, single_res):
        """Both block lists (through the step cache) on the image and text streams."""
        n_txt, n_double, n_single = txt.shape[1], len(self.double_blocks), len(self.single_blocks)

        def double(i: int, img: torch.Tensor, txt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self._run(self.double_blocks[i], img, txt, vec, rope, attn_mask, ip_double[i])

        def single(i: int, x: torch.Tensor) -> torch.Tensor:
            return self._run(self.single_blocks[i], x, vec, rope, attn_mask, ip_single[i])

        def control_double(i: int, img: torch.Tensor) -> torch.Tensor:
            return img if double_res is None else add_residual(img, double_res[i], 0)

        def control_single(i: int, x: torch.Tensor) -> torch.Tensor:
            return x if single_res is None else add_residual(x, single_res[i], n_txt)

        # The step cache spans both lists (as diffusers' does): its first block is the first double block
        # (the first single one without double blocks); the first block's ControlNet residual belongs to
        # the rest, so the cache measures the block alone and a reused step reuses every residual.
        # TeaCache's indicator is the first double block's modulated image input (DiffSynth-Studio's):
        # the block is run to get it, and its output handed on to `first` when the call runs in full.
        first_output = []

        def indicator() -> torch.Tensor:
            if not n_double:
                raise ConfigError("TeaCache on FLUX.1 needs a double block (depth >= 1)")
            *out, modulated = self._run(self.double_blocks[0], img, txt, vec, rope, attn_mask, ip_double[0], True)
            first_output.append(tuple(out))
            shards = active_sequence()
            return modulated if shards is None else modulated[:, : shards.valid_tokens]

        def first(streams):
            img, txt = streams
            if first_output:
                return first_output.pop()
            if n_double:
                return double(0, img, txt)
            x = single(0, torch.cat((txt, img), dim=1))
            return x[:, n_txt:], x[:, :n_txt]

        def rest(streams):
            img, txt = streams
            for i in range(n_double):
                if i:
                    img, txt = double(i, img, txt)
                img = control_double(i, img)
            x = torch.cat((txt, img), dim=1)
            for i in range(n_single):
                if i or n_double:
                    x = single(i, x)
                x = control_single(i, x)
            return x[:, n_txt:], x[:, :n_txt]

        if n_double + n_single:
            img, txt = run_blocks(self.step_cache, (img, txt), first, rest, indicator)
        return img, txt

    def _run(self, block: nn.Module, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)


def check_inputs(cfg, img, img_ids, txt, txt_ids, y) -> tuple[torch.Tensor, torch.Tensor]:
    """Shapes of a FLUX.1 DiT / ControlNet call (`cfg` has in_channels, context_in_dim, vec_in_dim, axes_dim);
    returns the ids as `[B or 1, L, axes]`."""
    if img.dim() != 3 or img.shape[-1] != cfg.in_channels:
        raise ValueError(f"img has shape {tuple(img.shape)}; expected [B, L_img, in_channels={cfg.in_channels}]")
    b = img.shape[0]
    if txt.dim() != 3 or txt.shape[0] != b or txt.shape[-1] != cfg.context_in_dim:
        raise ValueError(
            f"txt has shape {tuple(txt.shape)}; expected [B={b}, L_txt, context_in_dim={cfg.context_in_dim}]"
        )
    if y.dim() != 2 or y.shape[0] != b or y.shape[-1] != cfg.vec_in_dim:
        raise ValueError(f"y has shape {tuple(y.shape)}; expected [B={b}, vec_in_dim={cfg.vec_in_dim}]")
    checked = []
    for name, ids, tokens in (("img_ids", img_ids, img), ("txt_ids", txt_ids, txt)):
        ids = ids.unsqueeze(0) if ids.dim() == 2 else ids
        if ids.dim() != 3 or ids.shape[0] not in (1, b) or ids.shape[1] != tokens.shape[1]:
            raise ValueError(
                f"{name} has shape {tuple(ids.shape)}; expected [B={b} or 1, {tokens.shape[1]}, {len(cfg.axes_dim)}]"
            )
        if ids.shape[2] != len(cfg.axes_dim):
            raise ValueError(f"{name} has {ids.shape[2]} axes; axes_dim={cfg.axes_dim} needs {len(cfg.axes_dim)}")
        checked.append(ids)
    return checked[0], checked[1]


def conditioning_vector(model: nn.Module, timesteps, y: torch.Tensor, guidance, batch: int, dtype) -> torch.Tensor:
    """The modulation vector `[B, hidden]` from `model.time_in`, `guidance_in` (when not None) and `vector_in`."""
    device = y.device
    t = torch.as_tensor(timesteps, device=device, dtype=torch.float32).reshape(-1).expand(batch)
    vec = model.time_in(timestep_embedding(t * TIME_FACTOR, TIME_FREQ_DIM).to(dtype))
    if model.guidance_in is not None:
        if guidance is None:
            raise ValueError(
                f"this {type(model).__name__} is guidance-distilled (guidance_embed=True): pass `guidance`"
            )
        g = torch.as_tensor(guidance, device=device, dtype=torch.float32).reshape(-1).expand(batch)
        vec = vec + model.guidance_in(timestep_embedding(g * TIME_FACTOR, TIME_FREQ_DIM).to(dtype))
    return vec + model.vector_in(y.to(dtype))


def residual_per_block(samples: Sequence[torch.Tensor] | None, blocks: int, name: str) -> list[torch.Tensor] | None:
    """ControlNet residuals spread over `blocks` blocks: block `i` takes `samples[i // ceil(blocks / n)]`."""
    if samples is None:
        return None
    samples = list(samples)
    if not samples:
        raise ValueError(f"{name} is empty; pass None for no residuals")
    interval = max(1, math.ceil(blocks / len(samples)))
    return [samples[i // interval] for i in range(blocks)]


def shard_after(shards: SequenceShards, x: torch.Tensor, prefix: int) -> torch.Tensor:
    """`x` `[B, prefix + L, ...]` with its first `prefix` tokens whole and the rest this rank's shard."""
    return torch.cat((x[:, :prefix], shards.shard(x[:, prefix:])), dim=1)


def joint_mask_shard(
    shards: SequenceShards, mask: torch.Tensor | None, batch: int, prefix: int, heads: int, device
) -> torch.Tensor | None:
    """The joint attention mask `[B or 1, 1 or heads, S, S]` as a sequence-parallel attention call sees it.

    Keys cover the whole padded `[text, image]` sequence (padded image tokens masked). With `heads`
    divisible by the group (Ulysses) the queries are every token too and a per-head mask keeps this
    rank's share of the heads; otherwise (the runtime then gathers keys and values) the queries are
    the text and this rank's image shard."""
    if mask is None:
        return shards.key_mask(None, batch, device)
    pad = shards.padded - shards.length
    if pad:
        if mask.dtype == torch.bool:  # padded queries see every real key, so their rows never go empty (NaN)
            mask = F.pad(mask, (0, pad, 0, pad), value=True)
            mask[..., prefix + shards.length :] = False
        else:
            mask = F.pad(mask, (0, pad, 0, pad), value=0.0)
            mask[..., prefix + shards.length :] = float("-inf")
    if heads % shards.size:
        rows = mask[:, :, prefix:]
        start = shards.rank * shards.shard_length
        return torch.cat((mask[:, :, :prefix], rows[:, :, start : start + shards.shard_length]), dim=2)
    if mask.shape[1] > 1:
        share = heads // shards.size
        mask = mask.narrow(1, shards.rank * share, share)
    return mask


def residual_shards(shards: SequenceShards, residuals: list[torch.Tensor] | None, n_img: int):
    """ControlNet residuals (of the first image tokens) as this rank's image shard: zero past their end."""
    if residuals is None:
        return None
    done: dict[int, torch.Tensor] = {}  # residual_per_block repeats one tensor over several blocks
    for r in residuals:
        if id(r) not in done:
            if r.dim() != 3 or r.shape[1] > n_img:
                raise ValueError(
                    f"a ControlNet residual has shape {tuple(r.shape)}; expected [B or 1, L <= {n_img}, hidden]"
                )
            done[id(r)] = shards.shard(F.pad(r, (0, 0, 0, n_img - r.shape[1])))
    return [done[id(r)] for r in residuals]


def add_residual(x: torch.Tensor, residual: torch.Tensor, start: int) -> torch.Tensor:
    """`x` with `residual` `[B or 1, L, D]` added to tokens `start:start + L` (out of place)."""
    end = start + residual.shape[1]
    if residual.dim() != 3 or residual.shape[0] not in (1, x.shape[0]) or residual.shape[2] != x.shape[2]:
        raise ValueError(
            f"a ControlNet residual has shape {tuple(residual.shape)}; expected [B={x.shape[0]} or 1, L, {x.shape[2]}]"
        )
    if end > x.shape[1]:
        raise ValueError(f"a ControlNet residual has {residual.shape[1]} tokens; the image has {x.shape[1] - start}")
    residual = residual.to(x.dtype)
    if start == 0 and end == x.shape[1]:
        return x + residual
    return torch.cat((x[:, :start], x[:, start:end] + residual, x[:, end:]), dim=1)
