"""The Z-Image denoiser: a single-stream DiT (Tongyi-MAI/Z-Image-Turbo, Z-Image).

Image patches and caption tokens are first refined separately (`noise_refiner`: image only,
time-modulated; `context_refiner`: text only, unmodulated), then concatenated as
`[image, caption]` and run through `layers`. Blocks use sandwich RMSNorms (before and after
attention / FFN), SwiGLU, QK-RMSNorm and 3-axis RoPE over (caption index / frame, row, column).

Both streams are padded to multiples of 32 tokens with learned pad tokens (`x_pad_token`,
`cap_pad_token`) that take part in attention like real tokens; only the batch padding of
captions of different lengths is masked, so a sample gives the same result alone or in a batch.

ControlNets (`controlnet.py`) are passed per call (`controls`): their hints are added after the
noise-refiner layers and main layers they belong to; their blocks run as the DiT's layers pass them.

Module names equal the official diffusers checkpoint (`transformer/` folder), so it loads as is.
The timestep is the model's native input, the reversed time `1 - sigma`; the prediction points
from noise to data (the pipeline negates it).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from diffsynth.runtime.attention import attention
from diffsynth.runtime.layers import MultiAxisRope, rope_tables, rotate, timestep_embedding
from diffsynth.runtime.parallel import batch_parallel, shard_sequence
from diffsynth.runtime.step_cache import run_block_list

from . import omni
from .omni import TokenTime, modulation

if TYPE_CHECKING:
    from .controlnet import ControlRun, ZImageControl

logger = logging.getLogger(__name__)

SEQ_MULTIPLE = 32  # both token streams are padded to a multiple of this
ADALN_DIM = 256  # width of the time embedding that drives the modulation (min with dim)
TIME_FREQ_DIM = 256  # sinusoidal features fed to the time MLP
TIME_HIDDEN = 1024  # hidden width of the time MLP
QK_NORM_EPS = 1e-5  # fixed in the official code, independent of norm_eps

Rope = tuple[torch.Tensor, torch.Tensor]  # `rope_tables`: per-channel (cos, signed sin), float32


class BlockSizes:
    """What `ZImageBlock` and the patch embedders read from a config (from `dim`, `n_heads` and the patch sizes),
    derived once for the DiT's and the ControlNet's configs alike."""

    dim: int
    n_heads: int
    patch_size: int
    f_patch_size: int

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_dim(self) -> int:
        """SwiGLU width: 8/3 of dim, truncated as the official code does (3840 -> 10240)."""
        return int(self.dim / 3 * 8)

    @property
    def adaln_dim(self) -> int:
        return min(self.dim, ADALN_DIM)

    @property
    def patch_key(self) -> str:
        """Name of the embedder / final layer in the checkpoint, e.g. `2-1`."""
        return f"{self.patch_size}-{self.f_patch_size}"


@dataclass
class ZImageDiTConfig(BlockSizes):
    """Architecture of the Z-Image DiT; defaults are the released 6B checkpoint."""

    patch_size: int = 2
    f_patch_size: int = 1
    in_channels: int = 16
    dim: int = 3840
    n_layers: int = 30
    n_refiner_layers: int = 2
    n_heads: int = 30
    n_kv_heads: int = 30
    norm_eps: float = 1e-5
    qk_norm: bool = True
    cap_feat_dim: int = 2560
    rope_theta: float = 256.0
    t_scale: float = 1000.0
    axes_dims: tuple[int, ...] = (32, 48, 48)
    axes_lens: tuple[int, ...] = (1536, 512, 512)
    siglip_feat_dim: int | None = None  # Z-Image Omni: width of the SigLIP image features (1152); None otherwise

    def __post_init__(self):
        self.axes_dims = tuple(int(d) for d in self.axes_dims)
        self.axes_lens = tuple(int(n) for n in self.axes_lens)
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and (not isinstance(value, int) or value < 0):
                raise ValueError(f"ZImageDiTConfig.{f.name}={value!r} must be a non-negative integer")
        for name in ("patch_size", "f_patch_size", "in_channels", "dim", "n_heads", "cap_feat_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"ZImageDiTConfig.{name}={getattr(self, name)!r} must be at least 1")
        if self.dim % self.n_heads:
            raise ValueError(f"ZImageDiTConfig.dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.n_kv_heads != self.n_heads:
            raise ValueError(
                f"ZImageDiTConfig.n_kv_heads={self.n_kv_heads} must equal n_heads={self.n_heads}: "
                "the official architecture has no grouped-query attention"
            )
        if len(self.axes_dims) != 3 or len(self.axes_lens) != 3:
            raise ValueError(
                f"ZImageDiTConfig.axes_dims={self.axes_dims} / axes_lens={self.axes_lens} must have 3 entries "
                "(caption/frame, height, width)"
            )
        if sum(self.axes_dims) != self.head_dim or any(d % 2 for d in self.axes_dims):
            raise ValueError(
                f"ZImageDiTConfig.axes_dims={self.axes_dims} must be even and sum to head_dim={self.head_dim} "
                f"(dim {self.dim} / n_heads {self.n_heads})"
            )
        if self.norm_eps <= 0:
            raise ValueError(f"ZImageDiTConfig.norm_eps={self.norm_eps!r} must be positive")
        sd = self.siglip_feat_dim
        if sd is not None and (isinstance(sd, bool) or not isinstance(sd, int) or sd < 1):
            raise ValueError(f"ZImageDiTConfig.siglip_feat_dim={sd!r} must be None or a positive integer")

    @property
    def omni(self) -> bool:
        """Z-Image Omni: takes condition images and their SigLIP features (`siglip_feat_dim` set)."""
        return self.siglip_feat_dim is not None

    @property
    def patch_dim(self) -> int:
        return self.f_patch_size * self.patch_size**2 * self.in_channels


class FeedForward(nn.Module):
    """SwiGLU: `w2(silu(w1 x) * w3 x)`, no biases."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class SelfAttention(nn.Module):
    """Multi-head self-attention with QK-RMSNorm and RoPE (diffusers `Attention` key names)."""

    def __init__(self, dim: int, n_heads: int, qk_norm: bool):
        super().__init__()
        self.n_heads = n_heads
        head_dim = dim // n_heads
        self.norm_q = nn.RMSNorm(head_dim, eps=QK_NORM_EPS) if qk_norm else None
        self.norm_k = nn.RMSNorm(head_dim, eps=QK_NORM_EPS) if qk_norm else None
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim, bias=False)])

    def forward(self, x: torch.Tensor, rope: Rope, mask: torch.Tensor | None) -> torch.Tensor:
        q = self.to_q(x).unflatten(-1, (self.n_heads, -1))
        k = self.to_k(x).unflatten(-1, (self.n_heads, -1))
        v = self.to_v(x).unflatten(-1, (self.n_heads, -1))
        if self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        q, k = rotate(q, *rope), rotate(k, *rope)
        return self.to_out[0](attention(q, k, v, mask, sequence_parallel=True).flatten(2))


class ZImageBlock(nn.Module):
    """Sandwich-norm transformer block; time-modulated (scale + tanh gate) when `modulation`."""

    def __init__(self, config: ZImageDiTConfig, modulation: bool):
        super().__init__()
        dim, eps = config.dim, config.norm_eps
        self.attention = SelfAttention(dim, config.n_heads, config.qk_norm)
        self.feed_forward = FeedForward(dim, config.ffn_dim)
        self.attention_norm1 = nn.RMSNorm(dim, eps=eps)
        self.ffn_norm1 = nn.RMSNorm(dim, eps=eps)
        self.attention_norm2 = nn.RMSNorm(dim, eps=eps)
        self.ffn_norm2 = nn.RMSNorm(dim, eps=eps)
        self.modulation = modulation
        if modulation:
            self.adaLN_modulation = nn.Sequential(nn.Linear(config.adaln_dim, 4 * dim))

    def forward(
        self, x: torch.Tensor, rope: Rope, mask: torch.Tensor | None, adaln: torch.Tensor | None = None
    ) -> torch.Tensor:
        if not self.modulation:
            x = x + self.attention_norm2(self.attention(self.attention_norm1(x), rope, mask))
            return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
        scale_attn, gate_attn, scale_ffn, gate_ffn = modulation(self.adaLN_modulation, adaln).chunk(4, dim=-1)
        h = self.attention(self.attention_norm1(x) * (1.0 + scale_attn), rope, mask)
        x = x + gate_attn.tanh() * self.attention_norm2(h)
        h = self.feed_forward(self.ffn_norm1(x) * (1.0 + scale_ffn))
        return x + gate_ffn.tanh() * self.ffn_norm2(h)


class FinalLayer(nn.Module):
    """LayerNorm (no affine) scaled by the time embedding, then the patch projection."""

    def __init__(self, dim: int, adaln_dim: int, out_dim: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(adaln_dim, dim))

    def forward(self, x: torch.Tensor, adaln: torch.Tensor) -> torch.Tensor:
        scale = 1.0 + modulation(self.adaLN_modulation, adaln)
        return self.linear(self.norm_final(x) * scale)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of `t * t_scale` through a two-layer SiLU MLP."""

    def __init__(self, out_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(TIME_FREQ_DIM, TIME_HIDDEN), nn.SiLU(), nn.Linear(TIME_HIDDEN, out_dim))

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, TIME_FREQ_DIM).to(dtype))


def _round_up(n: int) -> int:
    return n + (-n) % SEQ_MULTIPLE


class ZImageDiT(nn.Module):
    """Z-Image single-stream DiT. `forward(x [B,C,H,W], timestep [B], text [L_i, cap_feat_dim] * B)`."""

    offload_units = ("noise_refiner", "context_refiner", "layers")
    compile_units = ("noise_refiner", "context_refiner", "layers")
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3")

    def __init__(self, config: ZImageDiTConfig | None = None):
        super().__init__()
        self.config = config = config if config is not None else ZImageDiTConfig()
        self.gradient_checkpointing = False
        self.step_cache = None  # a FirstBlockCache over `layers` (BasePipeline.enable_first_block_cache)
        self.parallel = None  # ParallelGroups dividing batch and main-layer tokens (BasePipeline.enable_parallel)
        dim = config.dim
        self.x_pad_token = nn.Parameter(torch.zeros(1, dim))
        self.cap_pad_token = nn.Parameter(torch.zeros(1, dim))
        self.all_x_embedder = nn.ModuleDict({config.patch_key: nn.Linear(config.patch_dim, dim)})
        self.all_final_layer = nn.ModuleDict({config.patch_key: FinalLayer(dim, config.adaln_dim, config.patch_dim)})
        self.noise_refiner = nn.ModuleList(ZImageBlock(config, True) for _ in range(config.n_refiner_layers))
        self.context_refiner = nn.ModuleList(ZImageBlock(config, False) for _ in range(config.n_refiner_layers))
        self.t_embedder = TimestepEmbedder(config.adaln_dim)
        self.cap_embedder = nn.Sequential(
            nn.RMSNorm(config.cap_feat_dim, eps=config.norm_eps), nn.Linear(config.cap_feat_dim, dim)
        )
        self.layers = nn.ModuleList(ZImageBlock(config, True) for _ in range(config.n_layers))
        self.rope = MultiAxisRope(config.rope_theta, config.axes_dims, config.axes_lens)
        self.siglip_embedder = self.siglip_refiner = self.siglip_pad_token = None
        if config.omni:  # Z-Image Omni: SigLIP features get their own embedder, refiner and pad token
            width = config.siglip_feat_dim
            self.siglip_embedder = nn.Sequential(nn.RMSNorm(width, eps=config.norm_eps), nn.Linear(width, dim))
            self.siglip_refiner = nn.ModuleList(ZImageBlock(config, False) for _ in range(config.n_refiner_layers))
            self.siglip_pad_token = nn.Parameter(torch.zeros(1, dim))
            self.offload_units = (*type(self).offload_units, "siglip_refiner")
            self.compile_units = (*type(self).compile_units, "siglip_refiner")

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor | float,
        text: list[torch.Tensor],
        controls: Sequence[ZImageControl] = (),
        *,
        images: Sequence[Sequence[torch.Tensor]] | None = None,
        siglip: Sequence[Sequence[torch.Tensor] | None] | None = None,
    ) -> torch.Tensor:
        """Denoiser output for latents `x` `[B, C, H, W]` (or `[B, C, F, H, W]`).

        `timestep` is `[B]` (or a scalar) in the model's own convention (`1 - sigma`); `text` is one
        `[L_i, cap_feat_dim]` tensor per sample. Computation runs in `x.dtype`. `controls` are
        `ZImageControl`s (a ControlNet, its condition latents, a scale) whose hints are added.

        Omni calls (the joint sequence of `omni.py`) give `text` as a list of caption segments per sample
        and, per sample, `images` (clean condition latents `[C, H, W]` or `[C, F, H, W]`, any size) and
        `siglip` (None, or one `[h, w, siglip_feat_dim]` grid per condition image); see `forward_omni`.
        """
        if images is not None or siglip is not None or (text and isinstance(text[0], (list, tuple))):
            if controls:
                raise ValueError("ControlNets do not take Omni inputs (caption segments, condition images)")
            return self.forward_omni(x, timestep, text, images, siglip)
        controls = list(controls)
        latents = [c.latents for c in controls]  # divided with the batch; the nets are not
        return batch_parallel(
            self.parallel, x.shape[0], self._forward, x, timestep, text, latents, controls=controls, per_sample=(2,)
        )

    def _forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor | float,
        text: list[torch.Tensor],
        control_latents: Sequence[torch.Tensor] = (),
        controls: Sequence[ZImageControl] = (),
    ) -> torch.Tensor:
        cfg = self.config
        video = x.dim() == 5
        x5 = x if video else x.unsqueeze(2)
        b, _, frames, height, width = x5.shape
        grid = self._check_inputs(x5, text)
        lengths = [int(t.shape[0]) for t in text]
        padded = [_round_up(n) for n in lengths]
        dtype, device = x.dtype, x.device

        t = torch.as_tensor(timestep, device=device, dtype=torch.float32).reshape(-1).expand(b)
        adaln = self.t_embedder(t * cfg.t_scale, dtype)

        img = self.all_x_embedder[cfg.patch_key](self._patchify(x5))
        n_img = img.shape[1]
        n_img_pad = (-n_img) % SEQ_MULTIPLE
        if n_img_pad:
            img = torch.cat([img, self.x_pad_token.to(dtype).expand(b, n_img_pad, -1)], dim=1)

        cap, cap_mask = self._embed_captions(text, lengths, padded, dtype, device)
        cos, sin = self.rope(self._positions(grid, n_img_pad, padded, cap.shape[1], device))
        cos, sin = rope_tables(cos.unsqueeze(2), sin.unsqueeze(2))  # broadcast over heads
        s_img = img.shape[1]
        rope_img = (cos[:, :s_img], sin[:, :s_img])
        rope_cap = (cos[:, s_img:], sin[:, s_img:])

        controls = zip(controls, control_latents, strict=True)
        runs = [self._start_control(c, lat, x5, img, rope_img, adaln) for c, lat in controls]
        for i, block in enumerate(self.noise_refiner):
            img = self._run(block, img, rope_img, None, adaln)
            for run in runs:
                img = run.after_refiner(i, img)
        for block in self.context_refiner:
            cap = self._run(block, cap, rope_cap, cap_mask, None)

        seq = torch.cat([img, cap], dim=1)
        mask = None
        if cap_mask is not None:
            mask = torch.cat([cap_mask.new_ones(b, s_img), cap_mask], dim=1)
        with shard_sequence(self.parallel, seq.shape[1]) as shards:
            rope = (cos, sin)
            if shards is not None:  # this rank's tokens; attention exchanges them
                seq, rope, mask = (
                    shards.shard(seq),
                    (shards.shard(cos), shards.shard(sin)),
                    shards.key_mask(mask, b, device),
                )
            for run in runs:
                run.begin_layers(cap, seq, rope, mask, adaln, shards)
            (seq,) = run_block_list(self.step_cache, self.layers, (seq,), self._layer_call(rope, mask, adaln, runs))
            if shards is not None:
                seq = shards.gather(seq)

        out = self.all_final_layer[cfg.patch_key](seq[:, :n_img], adaln)
        out = self._unpatchify(out, frames, height, width)
        return out if video else out.squeeze(2)

    def _layer_call(self, rope: Rope, mask: torch.Tensor | None, adaln: torch.Tensor, runs: list[ControlRun]):
        """One main layer as `run_block_list` calls it; with controls, their hints follow the layer."""
        if not runs:
            return lambda block, s: (self._run(block, s[0], rope, mask, adaln),)
        index = {id(block): i for i, block in enumerate(self.layers)}

        def call(block: nn.Module, s: tuple[torch.Tensor]) -> tuple[torch.Tensor]:
            out = self._run(block, s[0], rope, mask, adaln)
            for run in runs:
                out = run.after_layer(index[id(block)], out)
            return (out,)

        return call

    def _start_control(
        self, control: ZImageControl, latents: torch.Tensor, x: torch.Tensor, img: torch.Tensor, rope: Rope, adaln
    ) -> ControlRun:
        """Check one control against this DiT and its latents `x` `[B, C, F, H, W]`; run its refiner stage."""
        control.net.check_fits(self.config)
        lat = latents if latents.dim() == 5 else latents.unsqueeze(2)
        want = control.net.config.control_in_dim
        if lat.shape[1] != want or lat.shape[2:] != x.shape[2:] or lat.shape[0] not in (1, x.shape[0]):
            raise ValueError(
                f"control latents have shape {tuple(latents.shape)}; this ControlNet takes [{x.shape[0]} or 1, "
                f"{want}, ...] with the latents' size {tuple(x.shape[2:])}"
            )
        patches = self._patchify(lat.to(img.dtype)).expand(img.shape[0], -1, -1)
        return control.start(patches, img, rope, adaln, self.x_pad_token.to(img.dtype))

    def _run(self, block: nn.Module, *args) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def _check_inputs(self, x: torch.Tensor, text: list[torch.Tensor]) -> tuple[int, int, int]:
        cfg = self.config
        b, c, frames, height, width = x.shape
        if c != cfg.in_channels:
            raise ValueError(f"latents have {c} channels; this Z-Image DiT takes in_channels={cfg.in_channels}")
        p, pf = cfg.patch_size, cfg.f_patch_size
        if height % p or width % p or frames % pf:
            raise ValueError(
                f"latent size (frames {frames}, height {height}, width {width}) must be divisible by "
                f"the patch ({pf}, {p}, {p})"
            )
        if len(text) != b:
            raise ValueError(f"got {len(text)} caption tensors for a batch of {b} latents")
        for i, t in enumerate(text):
            if t.dim() != 2 or t.shape[0] == 0 or t.shape[1] != cfg.cap_feat_dim:
                raise ValueError(
                    f"caption {i} has shape {tuple(t.shape)}; expected [length >= 1, cap_feat_dim={cfg.cap_feat_dim}]"
                )
        grid = (frames // pf, height // p, width // p)
        longest = max(_round_up(int(t.shape[0])) for t in text)
        limits = (longest + grid[0], grid[1] - 1, grid[2] - 1)
        for axis, (needed, size) in enumerate(zip(limits, cfg.axes_lens, strict=True)):
            if needed >= size:
                raise ValueError(
                    f"RoPE axis {axis} needs position {needed} but axes_lens[{axis}]={size}: "
                    f"caption (padded length {longest}) or latent grid {grid} too large"
                )
        return grid

    def _patchify(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, C, F, H, W]` -> `[B, F'*H'*W', pF*pH*pW*C]` (tokens row-major, channels last)."""
        p, pf = self.config.patch_size, self.config.f_patch_size
        b, c, frames, height, width = x.shape
        x = x.view(b, c, frames // pf, pf, height // p, p, width // p, p)
        x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)
        return x.reshape(b, (frames // pf) * (height // p) * (width // p), -1)

    def _unpatchify(self, x: torch.Tensor, frames: int, height: int, width: int) -> torch.Tensor:
        p, pf, c = self.config.patch_size, self.config.f_patch_size, self.config.in_channels
        b = x.shape[0]
        x = x.view(b, frames // pf, height // p, width // p, pf, p, p, c)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, c, frames, height, width)

    def _embed_captions(
        self, text: list[torch.Tensor], lengths: list[int], padded: list[int], dtype: torch.dtype, device
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Embedded captions `[B, max padded length, dim]` with pad tokens, and the batch mask.

        Positions past a caption's own length (up to its multiple of 32) hold `cap_pad_token`;
        positions past that exist only for batching and are masked (mask None when all agree).
        """
        width = max(padded)
        feats = torch.nn.utils.rnn.pad_sequence([t.to(device, dtype) for t in text], batch_first=True)
        feats = F.pad(feats, (0, 0, 0, width - feats.shape[1]))
        cap = self.cap_embedder(feats)
        index = torch.arange(width, device=cap.device)
        is_text = index < torch.tensor(lengths, device=cap.device)[:, None]
        cap = torch.where(is_text[..., None], cap, self.cap_pad_token.to(dtype))
        if len(set(padded)) == 1:
            return cap, None
        return cap, index < torch.tensor(padded, device=cap.device)[:, None]

    def _positions(
        self, grid: tuple[int, int, int], n_img_pad: int, padded: list[int], cap_width: int, device
    ) -> torch.LongTensor:
        """RoPE ids `[B, S_img + S_cap, 3]` for the joint `[image, caption]` sequence.

        Caption token j sits at (1 + j, 0, 0); image patch (f, h, w) at (L + 1 + f, h, w), with L
        the sample's padded caption length; image pad tokens at (0, 0, 0).
        """
        b = len(padded)
        axes = [torch.arange(n, device=device) for n in grid]
        img = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(1, -1, 3).repeat(b, 1, 1)
        img[..., 0] += torch.tensor(padded, device=device)[:, None] + 1
        img = F.pad(img, (0, 0, 0, n_img_pad))
        cap = torch.zeros(cap_width, 3, dtype=torch.long, device=device)
        cap[:, 0] = torch.arange(1, cap_width + 1, device=device)
        return torch.cat([img, cap.expand(b, -1, -1)], dim=1)

    # ------------------------------------------------------------------ Omni
    def forward_omni(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor | float,
        text: Sequence[Sequence[torch.Tensor]],
        images: Sequence[Sequence[torch.Tensor]] | None = None,
        siglip: Sequence[Sequence[torch.Tensor] | None] | None = None,
    ) -> torch.Tensor:
        """Z-Image Omni: the target latents `x` `[B, C, H, W]` (or 5-D) with, per sample, caption segments
        `text[i]`, clean condition latents `images[i]` and their SigLIP grids `siglip[i]` (see `omni.py`).

        Sample `i` with `n` condition images needs at least `n + 1` caption segments (the pipeline's template
        gives `n + 2`; without images one). Returns the prediction for `x` only.
        """
        cfg = self.config
        if self.parallel is not None or self.step_cache is not None:
            raise ValueError("Omni calls run without sequence parallelism and step caches; disable them first")
        x5 = x if x.dim() == 5 else x.unsqueeze(2)
        b, dtype, device = x5.shape[0], x.dtype, x.device
        images = [[] for _ in range(b)] if images is None else [list(items) for items in images]
        siglip = [None] * b if siglip is None else list(siglip)
        self._check_omni(x5, text, images, siglip)

        t = torch.as_tensor(timestep, device=device, dtype=torch.float32).reshape(-1).expand(b)
        noisy_time = self.t_embedder(t * cfg.t_scale, dtype)
        clean_time = self.t_embedder(torch.ones_like(t) * cfg.t_scale, dtype)

        caps, imgs, sigs, targets = [], [], [], []
        for i in range(b):
            n = len(images[i])
            cap, ends = omni.caption_stream([s.to(device, dtype) for s in text[i]], n)
            latents = [im.to(device, dtype) for im in images[i]] + [x5[i]]
            latents = [lat if lat.dim() == 4 else lat.unsqueeze(1) for lat in latents]
            grids = [self._token_grid(lat) for lat in latents]
            patches = [self._patchify(lat.unsqueeze(0))[0] for lat in latents]
            img, starts = omni.image_stream(patches, grids, ends, n)
            caps.append(cap)
            imgs.append(img)
            targets.append(starts[-1])
            if siglip[i] is not None and len(siglip[i]):
                sizes = [tuple(lat.shape[2:]) for lat in latents[:-1]]
                grids_sig = [g.to(device, dtype) for g in siglip[i]]
                sigs.append(omni.siglip_stream(grids_sig, sizes, ends, cfg.siglip_feat_dim))
            else:
                sigs.append(None)
        self._check_omni_positions([s for group in (caps, imgs, sigs) for s in group if s is not None])

        img, img_rope, img_mask, img_noisy = self._omni_embed(
            imgs, self.all_x_embedder[cfg.patch_key], self.x_pad_token
        )
        img_time = TokenTime(noisy_time, clean_time, img_noisy)
        for block in self.noise_refiner:
            img = self._run(block, img, img_rope, img_mask, img_time)
        cap, cap_rope, cap_mask, _ = self._omni_embed(caps, self.cap_embedder, self.cap_pad_token)
        for block in self.context_refiner:
            cap = self._run(block, cap, cap_rope, cap_mask, None)
        sig = None
        if any(s is not None for s in sigs):
            if not cfg.omni:
                raise ValueError("SigLIP features need a Z-Image Omni DiT (siglip_feat_dim set); this one has none")
            present = [s for s in sigs if s is not None]
            sig, sig_rope, sig_mask, _ = self._omni_embed(present, self.siglip_embedder, self.siglip_pad_token)
            for block in self.siglip_refiner:
                sig = self._run(block, sig, sig_rope, sig_mask, None)

        # joint sequence per sample: [captions | images | SigLIP], then padded to the batch
        rows, positions, noisy, k = [], [], [], 0
        for i in range(b):
            parts = [cap[i, : len(caps[i])], img[i, : len(imgs[i])]]
            joined = [caps[i], imgs[i]]
            if sigs[i] is not None:
                parts.append(sig[k, : len(sigs[i])])
                joined.append(sigs[i])
                k += 1
            rows.append(torch.cat(parts))
            positions.append(torch.cat([s.positions for s in joined]))
            noisy.append(torch.cat([s.noisy for s in joined]))
        seq = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
        rope, mask, noisy = self._omni_tables(positions, noisy, device)
        time = TokenTime(noisy_time, clean_time, noisy)
        for block in self.layers:
            seq = self._run(block, seq, rope, mask, time)
        out = self.all_final_layer[cfg.patch_key](seq, time)

        frames, height, width = x5.shape[2:]
        grid = self._token_grid(x5[0])
        count = grid[0] * grid[1] * grid[2]
        first = [len(caps[i]) + targets[i] for i in range(b)]
        out = torch.stack([out[i, first[i] : first[i] + count] for i in range(b)])
        out = self._unpatchify(out, frames, height, width)
        return out if x.dim() == 5 else out.squeeze(2)

    def _token_grid(self, latents: torch.Tensor) -> tuple[int, int, int]:
        """Token grid of one `[C, F, H, W]` latent."""
        p, pf = self.config.patch_size, self.config.f_patch_size
        _, frames, height, width = latents.shape
        return frames // pf, height // p, width // p

    def _omni_tables(
        self, positions: list[torch.Tensor], noisy: list[torch.Tensor], device
    ) -> tuple[Rope, torch.Tensor | None, torch.Tensor]:
        """RoPE tables, key mask (None when every sample has the same length) and noisy-row mask of a batch
        of per-sample rows (`positions` `[N_i, 3]`, `noisy` `[N_i]`), padded to the longest."""
        pad = torch.nn.utils.rnn.pad_sequence
        lengths = [len(p) for p in positions]
        cos, sin = self.rope(pad(positions, batch_first=True).to(device))
        rope = rope_tables(cos.unsqueeze(2), sin.unsqueeze(2))
        mask = None
        if len(set(lengths)) > 1:
            mask = torch.arange(max(lengths), device=device) < torch.tensor(lengths, device=device)[:, None]
        return rope, mask, pad(noisy, batch_first=True).to(device)

    def _omni_embed(self, streams: list[omni.Stream], embedder: nn.Module, pad_token: torch.Tensor):
        """Embed one stream of every sample; pad rows take `pad_token`. Returns tokens, RoPE, mask, noisy rows."""
        device = streams[0].feats.device
        feats = torch.nn.utils.rnn.pad_sequence([s.feats for s in streams], batch_first=True)
        is_pad = torch.nn.utils.rnn.pad_sequence([s.is_pad for s in streams], batch_first=True, padding_value=True)
        tokens = embedder(feats)
        tokens = torch.where(is_pad[..., None].to(device), pad_token.to(tokens.dtype), tokens)
        return tokens, *self._omni_tables([s.positions for s in streams], [s.noisy for s in streams], device)

    def _check_omni(self, x: torch.Tensor, text, images: list[list[torch.Tensor]], siglip: list) -> None:
        cfg = self.config
        b, c, frames, height, width = x.shape
        if c != cfg.in_channels:
            raise ValueError(f"latents have {c} channels; this Z-Image DiT takes in_channels={cfg.in_channels}")
        for name, items in (("text", text), ("images", images), ("siglip", siglip)):
            if len(items) != b:
                raise ValueError(f"Omni {name} has {len(items)} entries for a batch of {b} latents (one per sample)")
        p, pf = cfg.patch_size, cfg.f_patch_size
        for i in range(b):
            segments = text[i]
            if not isinstance(segments, (list, tuple)) or len(segments) < len(images[i]) + 1:
                raise ValueError(
                    f"sample {i}: Omni text must be a list of caption segments, at least one more than its "
                    f"{len(images[i])} condition images"
                )
            for j, s in enumerate(segments):
                if s.dim() != 2 or s.shape[0] == 0 or s.shape[1] != cfg.cap_feat_dim:
                    raise ValueError(
                        f"sample {i} caption segment {j} has shape {tuple(s.shape)}; expected "
                        f"[length >= 1, cap_feat_dim={cfg.cap_feat_dim}]"
                    )
            for j, im in enumerate([*images[i], x[i]]):
                dims = tuple(im.shape)
                lat = im if im.dim() == 4 else im.unsqueeze(1)
                if (
                    im.dim() not in (3, 4)
                    or lat.shape[0] != c
                    or lat.shape[2] % p
                    or lat.shape[3] % p
                    or lat.shape[1] % pf
                ):
                    raise ValueError(
                        f"sample {i} condition image {j} has latent shape {dims}; expected [{c}, H, W] or "
                        f"[{c}, F, H, W] with H, W divisible by {p} and F by {pf}"
                    )
            grids = siglip[i]
            if grids is None:
                continue
            if len(grids) and not cfg.omni:
                raise ValueError("SigLIP features need a Z-Image Omni DiT (siglip_feat_dim set); this one has none")
            if len(grids) not in (0, len(images[i])):
                raise ValueError(
                    f"sample {i}: {len(grids)} SigLIP grids for {len(images[i])} condition images (one each)"
                )
            for j, g in enumerate(grids):
                if g.dim() != 3 or g.shape[0] == 0 or g.shape[1] == 0 or g.shape[2] != cfg.siglip_feat_dim:
                    raise ValueError(
                        f"sample {i} SigLIP grid {j} has shape {tuple(g.shape)}; expected "
                        f"[h, w, siglip_feat_dim={cfg.siglip_feat_dim}]"
                    )

    def _check_omni_positions(self, streams: list[omni.Stream]) -> None:
        top = torch.stack([s.positions.max(dim=0).values for s in streams]).max(dim=0).values.tolist()
        for axis, (needed, size) in enumerate(zip(top, self.config.axes_lens, strict=True)):
            if needed >= size:
                raise ValueError(
                    f"RoPE axis {axis} needs position {needed} but axes_lens[{axis}]={size}: the captions or the "
                    "images of this Omni call are too long"
                )
