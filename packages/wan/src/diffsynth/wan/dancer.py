"""Wan-Dancer-14B: a dance video for a piece of music, from a reference image of the dancer.

Two DiTs of one architecture are released (`Wan-AI/Wan-Dancer-14B`): `global_model.safetensors` makes the dance's
keyframes, one image per latent frame at a low frame rate (7.5 fps), and `local_model.safetensors` makes the 30 fps
video between given keyframes. Each is a Wan 2.1 I2V 14B DiT (same blocks, CLIP input, 36 input channels) with:

- `music_projection` + `music_encoder`: the music features (35 per frame at 30 frames a second of audio: onset
  strength, 20 MFCCs, 12 chroma CENS, onsets, beats) through two pre-norm transformer layers of width 256; their
  queries and keys (not their values) are rotated by one RoPE over the whole width, in the interleaved layout;
- `music_injector.injector.N`: after the blocks of `music_inject_layers`, a cross-attention from the video tokens
  to the music. The encoded music is stretched (two bilinear resizes, as DiffSynth-Studio does) to 8 vectors per
  latent frame; each latent frame's tokens, in raster order, are cut into 8 equal runs, and each run attends to
  its one vector only. Attention to one key returns its value, so the injection is `o(v(music))` added to every
  token of the run: q, k and their norms are in the file (and loaded) but do not change the output;
- `img_emb_refimage`: CLIP features of the reference image, projected like `img_emb` and used as the
  cross-attention's image tokens, while the keyframe's CLIP tokens join the text tokens (DiffSynth-Studio puts
  them before the image split of 257 tokens, so this is where they land);
- `patch_embedding_global` / `head_global`: used instead of `patch_embedding` / `head` when the frame rate
  (`fps`, DiffSynth-Studio's `wantodance_fps`) rounds to anything but 30. Then the frames' RoPE positions are
  spread over the 30 fps time line (frame i at `i * 30 / fps`, the last at `round(frames * 30 / fps) - 1`), the
  rotations interpolated linearly between whole positions as the reference does (dynamic-fps RoPE);
- `ref_conv` (Wan Fun's reference-image convolution): in the file, not used by the dancer pipeline.

The conditioning `y` is Wan I2V's: 4 mask channels marking the keyframes and the VAE latent of the keyframe video
(the given keyframes, solid black frames between them). DiffSynth-Studio's negative guidance branch leaves out
block `NEGATIVE_SKIP_BLOCK`. The global model's latent frames are decoded one by one (`framewise_decoding`): each
is one keyframe image.

Module names are DiffSynth-Studio's `WanModel` with its `wantodance_*` options, which is what both released files
hold, so they load strictly without a converter. Only DiffSynth-Studio implements the model; its numerics are
followed, including its music encoder running in the DiT's dtype (the rotary angles too).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from diffsynth.runtime.attention import attention
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.layers import MultiAxisRope, rope_inverse_frequencies, rope_tables

from .dit import (
    Fp32LayerNorm,
    Head,
    ImageEmbedding,
    WanBackboneConfig,
    WanBlock,
    WanDiTConfig,
    add_input_layers,
    backbone_fields,
    text_tokens,
    time_modulation,
)

logger = logging.getLogger(__name__)

NEGATIVE_SKIP_BLOCK = 9  # DiffSynth-Studio's negative branch runs every block but this one
BASE_FPS = 30  # music features per second, and the frame rate of the local model's RoPE time line
MUSIC_SLOTS = 8  # music vectors per latent frame (each drives 1/8 of the frame's tokens)
MUSIC_RESAMPLE = (149, 4800)  # the reference's first resize of the encoded music (time, channels)
RELEASED_INJECT_LAYERS = (0, 4, 8, 12, 16, 20, 24, 27)
MUSIC_FEATURES = 35  # onset strength, 20 MFCC, 12 chroma CENS, onset and beat flags


@dataclass
class DancerConfig(WanBackboneConfig):
    """Architecture of the Wan-Dancer DiT; defaults are the released 14B files (both have this layout).

    The backbone is Wan 2.1 I2V 14B's. `music_*` size the music encoder (DiffSynth-Studio fixes them: 35 features,
    width 256, 4 heads, FFN 1024, 2 layers); `music_inject_layers` are the blocks followed by a music injection.
    `rope_max_len` is DiffSynth-Studio's RoPE table length for this model (149 frames x 30 fps x 5 s / 8)."""

    in_dim: int = 36
    rope_max_len: int = 2794
    image_dim: int = 1280
    ref_conv: bool = True
    ref_dim: int = 16
    music_inject_layers: tuple[int, ...] = RELEASED_INJECT_LAYERS
    music_dim: int = MUSIC_FEATURES
    music_width: int = 256
    music_heads: int = 4
    music_ffn_dim: int = 1024
    music_layers: int = 2

    def __post_init__(self):
        super().__post_init__()  # the backbone's sizes
        self.music_inject_layers = tuple(int(i) for i in self.music_inject_layers)
        names = ("image_dim", "ref_dim", "music_dim", "music_width", "music_heads", "music_ffn_dim", "music_layers")
        for name in names:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"DancerConfig.{name}={value!r} must be a positive integer")
        if self.in_dim <= self.out_dim:
            raise ValueError(
                f"DancerConfig.in_dim={self.in_dim} must exceed out_dim={self.out_dim}: the latents are joined by "
                "the mask and keyframe latent channels y"
            )
        if self.music_width % self.music_heads or (self.music_width // self.music_heads) % 2:
            raise ValueError(
                f"DancerConfig.music_width={self.music_width} must split into music_heads={self.music_heads} heads of "
                "an even size"
            )
        layers = self.music_inject_layers
        if not layers or list(layers) != sorted(set(layers)) or layers[0] < 0 or layers[-1] >= self.num_layers:
            raise ValueError(
                f"DancerConfig.music_inject_layers={layers} must be increasing block indices below "
                f"num_layers={self.num_layers}"
            )

    def block_config(self) -> WanDiTConfig:
        """The Wan 2.1 I2V config of the shared blocks, heads and CLIP projections."""
        return super().block_config(
            has_image_input=True, image_dim=self.image_dim, model_type="i2v", ref_conv=self.ref_conv,
            ref_dim=self.ref_dim,
        )  # fmt: skip


def uses_global_modules(fps: float) -> bool:
    """Whether a call at `fps` runs the global model's patch embedding, head and spread RoPE time line
    (DiffSynth-Studio: when `int(fps + 0.5) != 30`)."""
    return int(fps + 0.5) != BASE_FPS


def frame_positions(frames: int, fps: float) -> list[tuple[int, int, float]]:
    """Per latent frame `(low, high, w)`: its RoPE rotation is `(1 - w) * R(low) + w * R(high)`.

    Frame i sits at `i * 30 / fps` on the 30 fps time line, the last one at `round(frames * 30 / fps) - 1` and the
    first at 0, as DiffSynth-Studio's `wantodance_get_single_freqs` places them (with its 1e-6 guard on fps)."""
    step = BASE_FPS / (fps + 1e-6)
    total = int(step * frames + 0.5)
    out = []
    for i in range(frames):
        if i == frames - 1:
            out.append((total - 1, total - 1, 0.0))
        elif i == 0:
            out.append((0, 0, 0.0))
        else:
            position = i * step
            low = int(position)
            out.append((low, min(low + 1, total - 1), position - low))
    return out


# ----------------------------------------------------------------------------------------- music encoder
def music_rotation(length: int, width: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """`rope_tables` `[length, width]` of the music encoder's RoPE (positions 0.., theta 10000, every channel
    pair). DiffSynth-Studio casts its frequency buffer with the module, so the inverse frequencies, positions and
    angles are formed in `dtype`, as there (in bfloat16 that rounds them; in float32 it is exact)."""
    inverse = (1.0 / 10000 ** (torch.arange(0, width, 2, device=device).float() / width)).to(dtype)
    angles = torch.outer(torch.arange(length, device=device).to(dtype), inverse)
    return rope_tables(angles.cos(), angles.sin())


class MusicSelfAttention(nn.Module):
    """Multi-head self-attention with torch's `nn.MultiheadAttention` parameters (`in_proj_weight` = q|k|v rows,
    `in_proj_bias`, `out_proj`); queries/keys and values come from different inputs."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, qk: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)
        q, k = F.linear(qk, wq, bq), F.linear(qk, wk, bk)
        heads = [t.unflatten(-1, (self.heads, -1)) for t in (q, k, F.linear(v, wv, bv))]
        return self.out_proj(attention(*heads).flatten(2))


class MusicEncoderLayer(nn.Module):
    """A pre-norm transformer layer (torch's `TransformerEncoderLayer` with `norm_first`, GELU), whose attention
    queries and keys are the RoPE-rotated normed input and whose values are the normed input itself. Inference
    only: the reference's dropout (0.1) is left out."""

    def __init__(self, width: int, heads: int, ffn_dim: int):
        super().__init__()
        self.self_attn = MusicSelfAttention(width, heads)
        self.linear1 = nn.Linear(width, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, width)
        self.norm1 = Fp32LayerNorm(width, eps=1e-5)
        self.norm2 = Fp32LayerNorm(width, eps=1e-5)

    def forward(self, x: torch.Tensor, rotation: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        h = self.norm1(x).to(x.dtype)
        cos, signed_sin = rotation
        swapped = h.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
        x = x + self.self_attn((h * cos + swapped * signed_sin).to(x.dtype), h)
        return x + self.linear2(F.gelu(self.linear1(self.norm2(x).to(x.dtype))))


class MusicCrossAttention(nn.Module):
    """One music injection, with a Wan cross-attention's modules (DiffSynth-Studio's names). Each run of video tokens
    attends to exactly one music vector, and softmax over one key is 1: the output is `o(v(music))` whatever the
    queries, so `forward` takes only the music. `q`, `k`, `norm_q`, `norm_k` are held so the file loads strictly."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)

    def forward(self, music: torch.Tensor) -> torch.Tensor:
        return self.o(self.v(music))


class MusicInjector(nn.Module):
    def __init__(self, config: DancerConfig):
        super().__init__()
        count = len(config.music_inject_layers)
        self.injector = nn.ModuleList(MusicCrossAttention(config.dim, config.eps) for _ in range(count))


# ----------------------------------------------------------------------------------------- the DiT
class WanDancerDiT(nn.Module):
    """Wan-Dancer DiT. `forward(x, timestep, context, clip_feature, y, music_feature, refimage_feature=None,
    fps=30.0, skip_blocks=()) -> [B, out_dim, F, H, W]`."""

    offload_units = ("blocks", "music_injector.injector")
    compile_units = ("blocks",)
    lora_target_modules = ("q", "k", "v", "o", "ffn.0", "ffn.2")

    def __init__(self, config: DancerConfig | None = None):
        super().__init__()
        self.config = config = config if config is not None else DancerConfig()
        self.gradient_checkpointing = False
        block_config = config.block_config()
        dim, patch = config.dim, config.patch_size
        add_input_layers(self, config)
        self.patch_embedding_global = nn.Conv3d(config.in_dim, dim, kernel_size=patch, stride=patch)
        self.blocks = nn.ModuleList(WanBlock(block_config) for _ in range(config.num_layers))
        self.head = Head(dim, config.out_dim * math.prod(patch), config.eps)
        self.head_global = Head(dim, config.out_dim * math.prod(patch), config.eps)
        self.img_emb = ImageEmbedding(config.image_dim, dim)
        self.img_emb_refimage = ImageEmbedding(config.image_dim, dim)
        if config.ref_conv:  # Wan Fun's reference input: in the released files, not used by the dancer pipeline
            self.ref_conv = nn.Conv2d(config.ref_dim, dim, kernel_size=patch[1:], stride=patch[1:])
        self.music_projection = nn.Linear(config.music_dim, config.music_width)
        self.music_encoder = nn.ModuleList(
            MusicEncoderLayer(config.music_width, config.music_heads, config.music_ffn_dim)
            for _ in range(config.music_layers)
        )
        self.music_injector = MusicInjector(config)
        self.rope = MultiAxisRope(config.rope_theta, block_config.rope_axes_dims, (config.rope_max_len,) * 3)

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor | float,
        context: torch.Tensor,
        clip_feature: torch.Tensor,
        y: torch.Tensor,
        music_feature: torch.Tensor,
        refimage_feature: torch.Tensor | None = None,
        fps: float = 30.0,
        skip_blocks: Sequence[int] = (),
    ) -> torch.Tensor:
        """Velocity for the latents `x` `[B, out_dim, F, H, W]`; computation runs in `x.dtype`.

        `timestep` `[B]` (or a scalar) in [0, 1000]; `context` the UMT5 states `[B, L <= text_len, text_dim]`;
        `clip_feature` `[B, N, image_dim]` (the first keyframe's); `y` `[B, in_dim - out_dim, F, H, W]` (keyframe mask
        + latent); `music_feature` `[T, music_dim]` or `[B or 1, T, music_dim]` (30 per second of music);
        `refimage_feature` `[B, N, image_dim]` (the reference image's CLIP features, optional); `fps` the video's
        frame rate (not rounding to 30: the global modules and spread RoPE); `skip_blocks` are left out (the
        reference's negative branch leaves out block 9).
        """
        cfg = self.config
        grid = self._check_inputs(x, y, context, clip_feature, refimage_feature, music_feature)
        b, dtype, device = x.shape[0], x.dtype, x.device
        skip = {int(i) for i in skip_blocks}
        if any(i < 0 or i >= cfg.num_layers for i in skip):
            raise ValueError(f"skip_blocks={sorted(skip)} must be block indices below num_layers={cfg.num_layers}")
        spread = uses_global_modules(float(fps))
        embed = self.patch_embedding_global if spread else self.patch_embedding
        seq = embed(torch.cat([x, y.to(dtype)], dim=1)).flatten(2).transpose(1, 2).float()
        t = torch.as_tensor(timestep, dtype=torch.float32, device=device).reshape(-1)
        t = t.expand(b) if t.numel() == 1 else t
        if t.numel() != b:
            raise ValueError(f"timestep has {t.numel()} values for a batch of {b}")
        e, temb = time_modulation(self, t, dtype, angle_dtype=torch.float64)
        text = text_tokens(self, context, dtype)
        clip_tokens = self.img_emb(clip_feature, dtype)
        if refimage_feature is None:
            context, context_img = text, clip_tokens
        else:  # the reference image's tokens are the image tokens; the keyframe's join the text
            context, context_img = torch.cat([clip_tokens, text], dim=1), self.img_emb_refimage(refimage_feature, dtype)
        rope = self._rope(grid, float(fps), device)
        music = self.encode_music(music_feature, grid[0], dtype, device)
        index = torch.arange(b, device=device)[:, None]
        injections = {layer: n for n, layer in enumerate(cfg.music_inject_layers)}
        for i, block in enumerate(self.blocks):
            if i in skip:
                continue
            seq = self._run(block, seq, e, index, context, context_img, rope)
            if i in injections:
                residual = self._run(self.music_injector.injector[injections[i]], music).float()
                seq = (seq.unflatten(1, (residual.shape[1], -1)) + residual[:, :, None]).flatten(1, 2)
        head = self.head_global if spread else self.head
        return self._unpatchify(head(seq, temb.float(), index, dtype), grid)

    def encode_music(self, music_feature: torch.Tensor, frames: int, dtype: torch.dtype, device) -> torch.Tensor:
        """Music features `[T, music_dim]` / `[B, T, music_dim]` -> `[B, MUSIC_SLOTS * frames, dim]` in `dtype`:
        the encoder's output resized to `MUSIC_RESAMPLE` and then to 8 vectors per latent frame by `dim` channels
        (bilinear, as DiffSynth-Studio; in float32 here)."""
        h = music_feature.to(device=device, dtype=dtype)
        h = self.music_projection(h[None] if h.dim() == 2 else h)
        rotation = music_rotation(h.shape[1], self.config.music_width, dtype, device)
        for layer in self.music_encoder:
            h = self._run(layer, h, rotation)
        h = F.interpolate(h.float()[:, None], size=MUSIC_RESAMPLE, mode="bilinear")
        h = F.interpolate(h, size=(MUSIC_SLOTS * frames, self.config.dim), mode="bilinear")
        return h[:, 0].to(dtype)

    # ------------------------------------------------------------------ pieces
    def _rope(self, grid: tuple[int, int, int], fps: float, device) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables `[1, S, 1, head_dim]`, tokens row-major over (frame, row, column); frames on the spread time
        line when `fps` does not round to 30."""
        f, h, w = grid
        (frame_cos, frame_sin), (row_cos, row_sin), (col_cos, col_sin) = self.rope.tables(device)
        if uses_global_modules(fps):
            frame_cos, frame_sin = self._spread_frames(f, fps, device)
        else:
            frame_cos, frame_sin = frame_cos[:f], frame_sin[:f]
        shape = (f, h, w, -1)
        cos = torch.cat(
            [frame_cos[:, None, None].expand(shape), row_cos[:h][None, :, None].expand(shape),
             col_cos[:w][None, None].expand(shape)], dim=-1,
        )  # fmt: skip
        sin = torch.cat(
            [frame_sin[:, None, None].expand(shape), row_sin[:h][None, :, None].expand(shape),
             col_sin[:w][None, None].expand(shape)], dim=-1,
        )  # fmt: skip
        return rope_tables(cos.reshape(1, f * h * w, 1, -1), sin.reshape(1, f * h * w, 1, -1))

    def _spread_frames(self, frames: int, fps: float, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The frame axis' (cos, sin) `[frames, d/2]` float32 at `frame_positions`: rotations interpolated as
        complex numbers (so not of unit length between whole positions), in float64 as the reference."""
        places = frame_positions(frames, fps)
        last = max(high for _, high, _ in places)
        if last >= self.config.rope_max_len:
            raise ValueError(
                f"{frames} latent frames at fps={fps} reach RoPE position {last}; rope_max_len is "
                f"{self.config.rope_max_len}"
            )
        inverse = rope_inverse_frequencies(self.rope.axes_dims[0], self.config.rope_theta)
        low = torch.tensor([p[0] for p in places], dtype=torch.float64)[:, None] * inverse
        high = torch.tensor([p[1] for p in places], dtype=torch.float64)[:, None] * inverse
        weight = torch.tensor([p[2] for p in places], dtype=torch.float64)[:, None]
        cos = (1 - weight) * low.cos() + weight * high.cos()
        sin = (1 - weight) * low.sin() + weight * high.sin()
        return cos.float().to(device), sin.float().to(device)

    def _unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """`[B, S, pt*ph*pw*C]` (channels fastest within a patch) -> `[B, C, F, H, W]`."""
        (pt, ph, pw), c, (f, h, w) = self.config.patch_size, self.config.out_dim, grid
        x = x.view(x.shape[0], f, h, w, pt, ph, pw, c)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(x.shape[0], c, f * pt, h * ph, w * pw)

    def _run(self, block: nn.Module, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def _check_inputs(self, x, y, context, clip_feature, refimage_feature, music_feature) -> tuple[int, int, int]:
        cfg = self.config
        if not isinstance(x, torch.Tensor) or x.dim() != 5 or x.shape[1] != cfg.out_dim:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x has shape {got}; expected [B, out_dim={cfg.out_dim}, F, H, W]")
        b = x.shape[0]
        expected = (b, cfg.in_dim - cfg.out_dim, *x.shape[2:])
        if not isinstance(y, torch.Tensor) or tuple(y.shape) != expected:
            got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"y has shape {got}; expected {expected} (keyframe mask + latent channels)")
        if any(s % p for s, p in zip(x.shape[2:], cfg.patch_size, strict=True)):
            raise ValueError(f"latent size {tuple(x.shape[2:])} must be divisible by the patch {cfg.patch_size}")
        grid = tuple(s // p for s, p in zip(x.shape[2:], cfg.patch_size, strict=True))
        if max(grid[1:]) > cfg.rope_max_len or grid[0] > cfg.rope_max_len:
            raise ValueError(f"patch grid {grid} exceeds rope_max_len={cfg.rope_max_len} positions on an axis")
        if (grid[1] * grid[2]) % MUSIC_SLOTS:
            raise ValueError(
                f"a latent frame has {grid[1]} x {grid[2]} patch tokens; the music injection cuts them into "
                f"{MUSIC_SLOTS} equal runs, so their number must be a multiple of {MUSIC_SLOTS}"
            )
        if context.dim() != 3 or context.shape[0] != b or context.shape[2] != cfg.text_dim:
            raise ValueError(f"context has shape {tuple(context.shape)}; expected [{b}, L, text_dim={cfg.text_dim}]")
        if context.shape[1] > cfg.text_len:
            raise ValueError(f"context has {context.shape[1]} tokens; this DiT takes at most text_len={cfg.text_len}")
        for name, value in (("clip_feature", clip_feature), ("refimage_feature", refimage_feature)):
            if value is None and name == "refimage_feature":
                continue
            if not isinstance(value, torch.Tensor) or value.dim() != 3 or value.shape[::2] != (b, cfg.image_dim):
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"{name} has shape {got}; expected [{b}, N, image_dim={cfg.image_dim}]")
        m = music_feature
        ok = isinstance(m, torch.Tensor) and m.dim() in (2, 3) and m.shape[-1] == cfg.music_dim and m.shape[-2] > 0
        if ok and m.dim() == 3 and m.shape[0] not in (1, b):
            ok = False
        if not ok:
            got = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
            raise ValueError(
                f"music_feature has shape {got}; expected [T, {cfg.music_dim}] or [{b}, T, {cfg.music_dim}]"
            )
        return grid


# ----------------------------------------------------------------------------------------- config from files
STUDIO_JSON = {"wantodance_music_inject_layers": "music_inject_layers", "has_ref_conv": "ref_conv"}


def config_from_state(state, config_json: dict | None = None) -> DancerConfig:
    """The config from the file's shapes. A `config.json` beside it (DiffSynth-Studio's `WanModel` argument names,
    or ours) may add heads, eps, text_len and the injection layers, and must agree with the shapes. The shapes give
    the number of injections, not their blocks: without a json, 8 injections are the released blocks
    (0, 4, ..., 24, 27)."""
    from diffsynth.runtime.registry import build_config, merge_fields

    from .dit import heads_from_width

    config_json = dict(config_json or {})
    for theirs, ours in STUDIO_JSON.items():
        if config_json.get(theirs) is not None:
            config_json.setdefault(ours, config_json[theirs])
    names = ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "text_dim", "freq_dim", "eps",
             "text_len", "image_dim", "rope_max_len", "ref_conv", "music_heads")  # fmt: skip
    given = {name: config_json[name] for name in names if config_json.get(name) is not None}
    if config_json.get("patch_size") is not None:
        given["patch_size"] = tuple(int(p) for p in config_json["patch_size"])
    derived: dict = {}
    injections = None
    if state:
        derived = backbone_fields(state)
        derived["image_dim"] = int(state["img_emb.proj.1.weight"].shape[1])
        derived["ref_conv"] = "ref_conv.weight" in state
        if derived["ref_conv"]:
            derived["ref_dim"] = int(state["ref_conv.weight"].shape[1])
        derived["music_width"], derived["music_dim"] = (int(n) for n in state["music_projection.weight"].shape)
        derived["music_layers"] = _count(state, "music_encoder.{}.linear1.weight")
        derived["music_ffn_dim"] = int(state["music_encoder.0.linear1.weight"].shape[0])
        injections = _count(state, "music_injector.injector.{}.v.weight")
    merged = merge_fields("Wan-Dancer DiT", given, derived)
    layers = config_json.get("music_inject_layers")
    if layers is not None:
        layers = tuple(int(i) for i in layers)
        if injections is not None and len(layers) != injections:
            raise ConfigError(
                f"Wan-Dancer DiT config.json says music_inject_layers={list(layers)} ({len(layers)} blocks) but the "
                f"checkpoint has {injections} music injectors"
            )
        merged["music_inject_layers"] = layers
    elif injections is not None and injections != len(RELEASED_INJECT_LAYERS):
        raise ConfigError(
            f"Wan-Dancer DiT: the checkpoint has {injections} music injectors, not the released "
            f"{len(RELEASED_INJECT_LAYERS)}; give their blocks as music_inject_layers in a config.json beside it"
        )
    heads_from_width(merged, "Wan-Dancer DiT")
    return build_config(DancerConfig, "Wan-Dancer DiT", merged)


def _count(state, template: str) -> int:
    n = 0
    while template.format(n) in state:
        n += 1
    return n


# ----------------------------------------------------------------------------------------- music features
def music_features_from_file(path: str | os.PathLike) -> torch.Tensor:
    """`[frames, 35]` float32 music features of an audio file, 30 frames a second, as DiffSynth-Studio computes
    them with librosa: onset strength, 20 MFCCs, 12 chroma CENS, onset and beat flags (the beat tracker started
    at the tempo librosa estimates). Its quirks are kept: the audio is loaded at 30 x 512 Hz and then analysed as
    if it were at 22050 Hz (so the frames are 1/30 s of the music), the tempo from a second load at 22050 Hz."""
    try:
        import librosa
        import numpy as np
    except ImportError as exc:
        raise ConfigError(
            "wantodance_music_path needs librosa to compute the music features: pip install librosa (or "
            "pip install 'diffsynth-wan[dance]'); or pass wantodance_music_feature, a [frames, 35] tensor"
        ) from exc
    if not Path(path).is_file():
        raise ConfigError(f"wantodance_music_path={str(path)!r} is not a file")
    hop = 512
    data, _ = librosa.load(str(path), sr=BASE_FPS * hop)
    sr = 22050  # what DiffSynth-Studio tells every feature, whatever the loaded rate
    envelope = librosa.onset.onset_strength(y=data, sr=sr)
    mfcc = librosa.feature.mfcc(y=data, sr=sr, n_mfcc=20).T
    chroma = librosa.feature.chroma_cens(y=data, sr=sr, hop_length=hop, n_chroma=12).T
    peaks = librosa.onset.onset_detect(onset_envelope=envelope.flatten(), sr=sr, hop_length=hop)
    rhythm = getattr(librosa.feature, "rhythm", None)  # librosa >= 0.10 moved `tempo` there
    tempo = rhythm.tempo if rhythm is not None else librosa.beat.tempo
    start_bpm = tempo(y=librosa.load(str(path))[0])[0]
    _, beats = librosa.beat.beat_track(
        onset_envelope=envelope, sr=sr, hop_length=hop, start_bpm=start_bpm, tightness=100
    )
    peak_flags = np.zeros_like(envelope, dtype=np.float32)
    peak_flags[peaks] = 1.0
    beat_flags = np.zeros_like(envelope, dtype=np.float32)
    beat_flags[beats] = 1.0
    columns = [envelope[:, None], mfcc, chroma, peak_flags[:, None], beat_flags[:, None]]
    return torch.from_numpy(np.concatenate(columns, axis=-1).astype(np.float32))


# ----------------------------------------------------------------------------------------- pipeline
@dataclass
class DancerConditions:
    """A dance call's inputs besides latents, timestep and text: the first keyframe's CLIP features `[B, 257,
    1280]`, `y` (keyframe mask + latent) `[B, 20, T, h, w]`, the music features `[T_music, 35]`, the reference
    image's CLIP features (or None) and the frame rate."""

    clip_feature: torch.Tensor
    y: torch.Tensor
    music_feature: torch.Tensor
    refimage_feature: torch.Tensor | None
    fps: float


def dancer_velocity(dit: WanDancerDiT, x, timestep, context, cond: DancerConditions, skip_blocks=()) -> torch.Tensor:
    """Flow velocity of the Wan-Dancer DiT in float32 (the per-step model call); inputs in the DiT's weight dtype."""
    from diffsynth.runtime.vram import module_dtype

    dtype = module_dtype(dit)
    ref = cond.refimage_feature.to(dtype) if cond.refimage_feature is not None else None
    out = dit(
        x.to(dtype), timestep.to(device=x.device, dtype=torch.float32), context.to(dtype), cond.clip_feature.to(dtype),
        cond.y.to(dtype), cond.music_feature.to(dtype), ref, cond.fps, skip_blocks,
    )  # fmt: skip
    return out.float()


def check_dancer_size(height, width, multiple: int) -> None:
    """Refuse (rather than round) a size that is not a multiple of `multiple` (16), or whose latent frames do not
    split into the 8 runs of tokens the music drives."""
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < multiple or value % multiple:
            raise ConfigError(f"{name}={value!r}: Wan-Dancer takes a height and width that are multiples of {multiple}")
    tokens = (height // multiple) * (width // multiple)
    if tokens % MUSIC_SLOTS:
        raise ConfigError(
            f"height={height}, width={width}: a latent frame has {height // multiple} x {width // multiple} = {tokens} "
            f"tokens, which the music injection cuts into {MUSIC_SLOTS} equal runs: use a size whose "
            f"(height / {multiple}) * (width / {multiple}) is a multiple of {MUSIC_SLOTS} (e.g. 1280 x 720)"
        )


def check_dancer_arguments(pipe, dancer: list[str], others: dict, cfg_merge: bool) -> None:
    """Refuse, by name, dancer arguments (`dancer`: the names given) for another DiT, and for a dancer DiT the other
    models' arguments that were given (`others`) and `cfg_merge` (the negative branch leaves out a block)."""
    if not isinstance(pipe.dit, WanDancerDiT):
        raise ConfigError(f"{', '.join(dancer)} need a Wan-Dancer model (Wan-AI/Wan-Dancer-14B); this DiT is not one")
    refused = [name for name, value in others.items() if value is not None]
    if refused:
        raise ConfigError(f"Wan-Dancer takes no {', '.join(refused)}")
    if cfg_merge:
        raise ConfigError(
            "Wan-Dancer runs the guidance branches one after the other (the negative one leaves out a block): "
            "cfg_merge=True is not supported"
        )


def check_dancer_call(pipe, music_path, music_feature, reference_image, fps, keyframes, mask, frames: int):
    """The music features `[T, 35]`, the reference image (or None), the keyframes (RGB images, one per frame), the
    keyframe flags and the frame rate; refused by name when they cannot serve (before any model runs)."""
    from diffsynth.runtime.media import load_frames, load_image

    if pipe.dit2 is not None:
        raise ConfigError("Wan-Dancer is one DiT: remove the second DiT (dit2) from the pipeline")
    if pipe.image_encoder is None:
        raise ConfigError(
            "Wan-Dancer needs the CLIP image encoder: add ModelConfig(model_id='Wan-AI/Wan-Dancer-14B', "
            "origin_file_pattern='models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth')"
        )
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0:
        raise ConfigError(f"wantodance_fps={fps!r} must be a positive number (7.5 for the global model, 30 local)")
    if music_path is not None and music_feature is not None:
        raise ConfigError("give wantodance_music_path or wantodance_music_feature, not both")
    if music_path is None and music_feature is None:
        raise ConfigError(
            "Wan-Dancer needs the music: give wantodance_music_path (an audio file as long as the video) or "
            f"wantodance_music_feature (a [frames, {MUSIC_FEATURES}] tensor, 30 frames a second)"
        )
    if music_feature is not None:
        if not isinstance(music_feature, torch.Tensor):
            music_feature = torch.as_tensor(music_feature)
        m = music_feature
        if m.dim() != 2 or m.shape[1] != MUSIC_FEATURES or m.shape[0] < 1 or not m.is_floating_point():
            raise ConfigError(
                f"wantodance_music_feature has shape {tuple(m.shape)} ({m.dtype}); expected float [frames, "
                f"{MUSIC_FEATURES}] (30 frames a second: onset strength, 20 MFCC, 12 chroma, onset, beat)"
            )
    if keyframes is None:
        raise ConfigError(
            f"Wan-Dancer needs wantodance_keyframes: num_frames={frames} frames (a list or a video file), the given "
            "keyframes where wantodance_keyframes_mask is 1 and solid black elsewhere (for the global model: the "
            "reference image first, then black frames)"
        )
    keyframes = load_frames(keyframes, "wantodance_keyframes")
    if len(keyframes) != frames:
        raise ConfigError(
            f"wantodance_keyframes has {len(keyframes)} frames; num_frames={frames} needs {frames} (one per video "
            "frame, black where there is no keyframe)"
        )
    if mask is None:
        raise ConfigError(
            f"Wan-Dancer needs wantodance_keyframes_mask: {frames} values, 1 where wantodance_keyframes holds a "
            "keyframe, else 0"
        )
    flags = mask.tolist() if isinstance(mask, torch.Tensor) else list(mask)
    if len(flags) != frames:
        raise ConfigError(
            f"wantodance_keyframes_mask has {len(flags)} values; num_frames={frames} needs {frames} (one per frame)"
        )
    if any(v not in (0, 1) for v in flags):
        raise ConfigError("wantodance_keyframes_mask must hold only 0 and 1 (1 marks a keyframe)")
    if isinstance(reference_image, (list, tuple)):  # DiffSynth-Studio takes the first of a list
        reference_image = reference_image[0] if reference_image else None
    reference = load_image(reference_image) if reference_image is not None else None
    if music_feature is None:  # last: the slow part
        music_feature = music_features_from_file(music_path)
    expected = frames * BASE_FPS / fps
    if abs(music_feature.shape[0] - expected) > max(2.0, 0.05 * expected):
        logger.warning(
            "the music has %d feature frames (%.2f s) but %d video frames at %g fps last %.2f s: Wan-Dancer stretches "
            "the music over the video", music_feature.shape[0], music_feature.shape[0] / BASE_FPS, frames, fps,
            frames / fps,
        )  # fmt: skip
    return music_feature.float(), reference, keyframes, [int(v) for v in flags], float(fps)


def decode_latents(vae, latents: torch.Tensor, framewise: bool, **vae_kwargs) -> torch.Tensor:
    """The VAE's video of `latents`; `framewise` decodes each latent frame on its own (one image each: the global
    dance model's keyframes, DiffSynth-Studio's `framewise_decoding`)."""
    if not framewise:
        return vae.decode(latents, **vae_kwargs)
    return torch.cat([vae.decode(latents[:, :, i : i + 1], tiled=False) for i in range(latents.shape[2])], dim=2)


def dancer_conditions(pipe, music, reference, keyframes, flags, fps, height, width, vae_kwargs) -> DancerConditions:
    """One sample's conditions (batch 1) from `check_dancer_call`'s results: the CLIP features of the first keyframe
    and of the reference image (resized to the video size), and `y`, the keyframe video's VAE latent with the I2V
    mask of its keyframes. Shared by `generate_dancer` and the training task, so both condition alike."""
    from diffsynth.runtime.vram import module_dtype

    from .animate import frames_tensor, i2v_mask
    from .image_encoder import encode_image

    pipe.load_models_to_device(["image_encoder"])
    clip_dtype = module_dtype(pipe.image_encoder)

    def clip_of(image):
        pixels = pipe._pixels([image], height, width, torch.float32)
        return encode_image(pipe.image_encoder, pixels, pipe.device, clip_dtype).float()

    clip = clip_of(keyframes[0])
    refimage = clip_of(reference) if reference is not None else None

    pipe.load_models_to_device(["vae"])
    vae = pipe.vae
    latent = vae.encode(frames_tensor(keyframes, height, width, module_dtype(vae), pipe.device), **vae_kwargs).float()
    given = torch.tensor(flags, dtype=torch.float32, device=pipe.device)[None, :, None, None]
    mask = i2v_mask(given.expand(1, len(flags), *latent.shape[3:]), vae.temporal_compression)
    y = torch.cat([mask, latent], dim=1)
    return DancerConditions(clip, y, music.to(pipe.device), refimage, fps)


def generate_dancer(
    pipe, prompts, negatives, music_path, music_feature, reference_image, fps, keyframes, keyframes_mask, size, seed,
    rand_device, latents, max_sequence_length, schedule, scale, vae_kwargs, framewise: bool, progress_bar,
) -> torch.Tensor:  # fmt: skip
    """A dance video `[B, 3, F, H, W]` in [-1, 1] (with `framewise`, the keyframes: `[B, 3, T, H, W]`, one per
    latent frame), as DiffSynth-Studio's `WanToDance` units compose it.

    `y`: the keyframe video's VAE latent with the I2V mask of its keyframes; the first keyframe's CLIP features and
    the reference image's (resized to the video size) are the image conditions; the music features go to the DiT
    as they are. Guidance: the negative prompt, without block 9. `latents` is the initial noise `[B, z, T, h, w]`."""
    from diffsynth.runtime.schedulers import make_scheduler
    from diffsynth.runtime.vram import module_dtype

    from .pipeline import sampler_grid

    height, width, frames = size
    steps, shift, sigmas, sampler = schedule
    dit, vae, batch = pipe.dit, pipe.vae, len(prompts)
    s, tc, z = vae.spatial_compression, vae.temporal_compression, vae.z_dim
    music, reference, keyframes, flags, fps = check_dancer_call(
        pipe, music_path, music_feature, reference_image, fps, keyframes, keyframes_mask, frames
    )
    if dit.config.in_dim != dit.config.out_dim + tc + z or dit.config.out_dim != z:
        raise ConfigError(
            f"the Wan-Dancer DiT takes {dit.config.in_dim} channels; this VAE gives {z} latent + {tc} mask channels: "
            "use the Wan 2.1 VAE (Wan2.1_VAE.pth)"
        )
    shape = (batch, z, (frames - 1) // tc + 1, height // s, width // s)
    noise = pipe.check_latents(latents, shape) if latents is not None else pipe.generate_noise(shape, seed, rand_device)
    use_cfg = scale != 1.0
    pipe.load_models_to_device(["text_encoder"])
    context = pipe.encode_prompt(prompts, max_sequence_length)
    negative_context = pipe.encode_prompt(negatives, max_sequence_length) if use_cfg else None

    one = dancer_conditions(pipe, music, reference, keyframes, flags, fps, height, width, vae_kwargs)
    refimage, vae_dtype = one.refimage_feature, module_dtype(vae)
    cond = DancerConditions(
        one.clip_feature.expand(batch, -1, -1), one.y.expand(batch, -1, -1, -1, -1), one.music_feature,
        None if refimage is None else refimage.expand(batch, -1, -1), fps,
    )  # fmt: skip

    scheduler = make_scheduler("wan", sampler)
    scheduler.set_timesteps(steps, sigmas=sigmas, shift=shift, **sampler_grid(sampler))
    pipe.load_models_to_device(["dit"])
    x = noise
    skip = [NEGATIVE_SKIP_BLOCK] if NEGATIVE_SKIP_BLOCK < dit.config.num_layers else []
    for i in pipe.progress(range(len(scheduler.timesteps)), progress_bar):
        timestep = scheduler.timesteps[i].to(device=x.device, dtype=torch.float32).expand(batch)
        velocity = dancer_velocity(dit, x, timestep, context, cond)
        if use_cfg:
            negative = dancer_velocity(dit, x, timestep, negative_context, cond, skip)
            velocity = pipe.guide(velocity, negative, scale)
        x = scheduler.step(velocity, i, x)

    pipe.load_models_to_device(["vae"])
    video = decode_latents(vae, x.to(vae_dtype), framewise, **vae_kwargs).float()
    pipe.load_models_to_device([])
    return video


__all__ = [
    "BASE_FPS",
    "MUSIC_FEATURES",
    "MUSIC_RESAMPLE",
    "MUSIC_SLOTS",
    "NEGATIVE_SKIP_BLOCK",
    "RELEASED_INJECT_LAYERS",
    "DancerConditions",
    "DancerConfig",
    "MusicCrossAttention",
    "MusicEncoderLayer",
    "WanDancerDiT",
    "check_dancer_arguments",
    "check_dancer_call",
    "check_dancer_size",
    "config_from_state",
    "dancer_conditions",
    "dancer_velocity",
    "decode_latents",
    "frame_positions",
    "generate_dancer",
    "music_features_from_file",
    "music_rotation",
    "uses_global_modules",
]
