"""Wan2.2-Animate-2-14B: a character (the reference image) moved like the person of a driving video.

The DiT is a Wan 2.1 I2V 14B DiT (same blocks, CLIP input, 36 input channels) that runs two token streams:

- the driving video ("reference" stream): its latent with an all-ones mask as `y`, the embedding of timestep 1,
  its own prompt (`animate2_prompt_ref`) and the CLIP features of its first frame. It goes through every block
  once per call; each block's self-attention keys (after the q/k RMSNorm, before RoPE) and values are kept;
- the generated clip: latent frame 0 is the reference image (mask + latent in `y`), frames 1.. the video, whose
  first pixel frames may be given (`animate2_refert_images`, the previous clip's last frames).

In every block the generated tokens attend to all generated tokens and, for latent frame j >= 1, to the kept
reference tokens of driving frame j - 1 (frame 0 sees no driving tokens). RoPE places driving frame i at frame
`refer_offset_t + i * refer_stride`, row `refer_offset_h + r`, column `refer_offset_w + c` (a negative offset
means the generated grid's extent on that axis: by default the driving video sits beside the clip, at the same
frames). `log_scale` (-1.3 for the distilled model) is added to the attention logits of the keys of generated
frame 1.

DiffSynth-Studio writes that attention as one flex-attention call over padded, concatenated sequences with a
block mask and a `score_mod`; here it is one SDPA call per generated frame over [all generated keys, that
frame's driving keys], with `log_scale` as an additive key bias (in half precision: extra head channels, see
`key_bias_channels`): the same softmax, without padding.

Module names are DiffSynth-Studio's (`blocks.N.block.self_attn.q`, ...: each block wraps a Wan block), which is
what `wan_animate_2/wan_animate_2_bf16*.safetensors` hold, so they load strictly without a converter. The
pipeline side (`generate_animate2`) follows DiffSynth-Studio's `WanVideoUnit_Animate2*` units and
`model_fn_wananimate`: the negative branch of classifier-free guidance uses the negative prompt and leaves out
block `NEGATIVE_SKIP_BLOCK`, and shares the reference stream with the positive one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.checkpoint import checkpoint

from diffsynth.runtime.attention import attention
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.layers import MultiAxisRope, rope_tables, rotate

from .dit import (
    Head,
    ImageEmbedding,
    Rope,
    WanBackboneConfig,
    WanBlock,
    WanDiTConfig,
    add_input_layers,
    backbone_fields,
    heads_from_width,
    text_tokens,
    time_modulation,
)

NEGATIVE_SKIP_BLOCK = 9  # DiffSynth-Studio's negative branch runs every block but this one
REFERENCE_TIMESTEP = 1.0  # the reference stream is embedded as (almost) clean
BIAS_CHANNELS = 8  # extra head channels that carry log_scale in half precision (head sizes stay multiples of 8)


@dataclass
class Animate2Config(WanBackboneConfig):
    """Architecture of the Wan2.2-Animate-2 DiT; defaults are the released 14B model (DiffSynth-Studio's
    `WanAnimate2Transformer` defaults). `refer_offset_*` / `refer_stride` place the driving video's tokens for
    RoPE (a negative offset: the generated grid's extent on that axis)."""

    in_dim: int = 36
    image_dim: int = 1280
    refer_offset_t: int = 1
    refer_offset_h: int = 0
    refer_offset_w: int = -1
    refer_stride: int = 1

    def __post_init__(self):
        super().__post_init__()  # the backbone's sizes
        for name in ("image_dim", "refer_stride"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Animate2Config.{name}={value!r} must be a positive integer")
        for name in ("refer_offset_t", "refer_offset_h", "refer_offset_w"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"Animate2Config.{name}={value!r} must be an integer (negative: the video's extent)")
        if self.in_dim <= self.out_dim:
            raise ValueError(
                f"Animate2Config.in_dim={self.in_dim} must exceed out_dim={self.out_dim}: the latents are joined by "
                "the mask and latent channels y"
            )

    def block_config(self) -> WanDiTConfig:
        """The Wan 2.1 I2V config of the shared blocks, head and CLIP projection."""
        return super().block_config(has_image_input=True, image_dim=self.image_dim, model_type="i2v")


@dataclass
class ReferenceInputs:
    """The driving video's inputs to the reference stream: latent `[1, out_dim, R, h, w]`, `y` (mask + latent)
    `[1, in_dim - out_dim, R, h, w]`, UMT5 states of `animate2_prompt_ref` `[1, L, text_dim]` and CLIP features of
    its first frame `[1, N, image_dim]`."""

    latents: torch.Tensor
    y: torch.Tensor
    context: torch.Tensor
    clip_feature: torch.Tensor


@dataclass
class ReferenceKV:
    """What the reference stream leaves for the generation pass: per block the self-attention keys (normalised,
    before RoPE) and values `[1, S_ref, heads, head_dim]` (on the CPU with `offload`), the driving latent's patch
    grid and the RoPE position of its first token."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    grid: tuple[int, int, int]
    origin: tuple[int, int, int]

    def layer(self, index: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[index].to(device, non_blocking=True), self.values[index].to(device, non_blocking=True)


def key_bias_channels(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: slice, log_scale: float, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v `[B, S, H, D]` with `BIAS_CHANNELS` more channels such that `scale * q'.k'` is `scale * q.k` plus
    `log_scale` for the keys `keys` (v' gets zeros: drop the extra output channels).

    This is how a half-precision call gets the score_mod's float32 key bias exactly: SDPA's fused kernels take an
    additive mask only in the query's dtype (bf16 would make -1.3 into -1.296875); here `log_scale / scale` is
    carried by two channels (its bf16 value and the rest), which the kernels multiply by 1 and sum in float32, and
    the call keeps its mask-free (flash / cuDNN) kernels."""
    shift = log_scale / scale
    high = torch.tensor(shift, dtype=q.dtype).item()
    low = torch.tensor(shift - high, dtype=q.dtype).item()
    extra_q = q.new_zeros(*q.shape[:3], BIAS_CHANNELS)
    extra_q[..., :2] = 1
    extra_k = k.new_zeros(*k.shape[:3], BIAS_CHANNELS)
    extra_k[:, keys, :, 0], extra_k[:, keys, :, 1] = high, low
    return torch.cat([q, extra_q], -1), torch.cat([k, extra_k], -1), F.pad(v, (0, BIAS_CHANNELS))


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_ref: torch.Tensor, v_ref: torch.Tensor, frame_tokens: int,
    log_scale: float = 0.0,
) -> torch.Tensor:  # fmt: skip
    """Self-attention of the generated tokens `[B, F * n, H, D]` (RoPE applied) with the driving keys/values
    `[B or 1, (F - 1) * n, H, D]`: frame j's queries see every generated key and, for j >= 1, driving frame
    j - 1's; `log_scale` is added to the logits of generated frame 1's keys (`n = frame_tokens`).

    One SDPA call per generated frame over [generated keys, its driving frame's keys]. The key bias is an additive
    float mask in float32 / float64, and extra head channels (`key_bias_channels`) in half precision."""
    b, s, n = q.shape[0], q.shape[1], frame_tokens
    d, frames, scale = q.shape[-1], s // n, q.shape[-1] ** -0.5
    k_ref, v_ref = k_ref.expand(b, -1, -1, -1), v_ref.expand(b, -1, -1, -1)
    bias = None
    if log_scale and q.dtype in (torch.float16, torch.bfloat16):
        q, k, v = key_bias_channels(q, k, v, slice(n, 2 * n), log_scale, scale)
        k_ref, v_ref = F.pad(k_ref, (0, BIAS_CHANNELS)), F.pad(v_ref, (0, BIAS_CHANNELS))
    elif log_scale:  # SDPA broadcasts it over batch, heads and queries
        bias = torch.zeros(1, 1, 1, s + n, device=q.device, dtype=q.dtype)
        bias[..., n : 2 * n] = log_scale
    out = []
    for j in range(frames):
        rows = q[:, j * n : (j + 1) * n]
        if j == 0:
            out.append(attention(rows, k, v, None if bias is None else bias[..., :s], scale=scale))
            continue
        keys = torch.cat([k, k_ref[:, (j - 1) * n : j * n]], dim=1)
        values = torch.cat([v, v_ref[:, (j - 1) * n : j * n]], dim=1)
        out.append(attention(rows, keys, values, bias, scale=scale))
    return torch.cat(out, dim=1)[..., :d]


def _heads(x: torch.Tensor, n: int) -> torch.Tensor:
    return x.unflatten(-1, (n, -1))


class Animate2Block(nn.Module):
    """A Wan block (`block`, DiffSynth-Studio's name) run on one of the two streams.

    Without `reference` it is the driving video's block: plain self-attention, and the keys and values are
    returned with the output (`(x, k, v)`). With `reference = (k_ref, v_ref, ref_rope)` it is the generated
    clip's block (`reference_attention`) and returns `x`. Numerics as `WanBlock`: float32 residual stream, norms
    and modulation; linear layers and attention in the text context's dtype.
    """

    def __init__(self, config: WanDiTConfig):
        super().__init__()
        self.block = WanBlock(config)

    def forward(
        self,
        x: torch.Tensor,
        e: torch.Tensor,
        index: torch.Tensor,
        context: torch.Tensor,
        context_img: torch.Tensor,
        rope: Rope,
        reference: tuple[torch.Tensor, torch.Tensor, Rope] | None = None,
        frame_tokens: int = 0,
        log_scale: float = 0.0,
    ):
        blk, dtype = self.block, context.dtype
        attn, n = blk.self_attn, blk.self_attn.num_heads
        mod = blk.modulation.float() + e
        shift, scale, gate = (mod[:, i][index] for i in range(3))
        h = (blk.norm1(x) * (1 + scale) + shift).to(dtype)
        q = rotate(_heads(attn.norm_q(attn.q(h)), n), *rope)
        k = _heads(attn.norm_k(attn.k(h)), n)
        v = _heads(attn.v(h), n)
        if reference is None:
            out = attention(q, rotate(k, *rope), v)
        else:
            k_ref, v_ref, ref_rope = reference
            out = reference_attention(
                q, rotate(k, *rope), v, rotate(k_ref.to(dtype), *ref_rope), v_ref.to(dtype), frame_tokens, log_scale
            )
        x = x + attn.o(out.flatten(2)).float() * gate
        x = x + blk.cross_attn(blk.norm3(x).to(dtype), context, context_img).float()
        shift, scale, gate = (mod[:, i][index] for i in range(3, 6))
        x = x + blk.ffn((blk.norm2(x) * (1 + scale) + shift).to(dtype)).float() * gate
        return (x, k, v) if reference is None else x


class WanAnimate2DiT(nn.Module):
    """Wan2.2-Animate-2 DiT. `forward(x, timestep, context, clip_feature, y, reference, log_scale=0.0,
    skip_blocks=()) -> [B, out_dim, F, H, W]`; `reference` is a `ReferenceKV` from `encode_reference` (computed
    once per video, reused at every step) or the `ReferenceInputs` themselves (both streams in one call)."""

    offload_units = ("blocks",)
    compile_units = ("blocks",)
    lora_target_modules = ("q", "k", "v", "o", "ffn.0", "ffn.2")

    def __init__(self, config: Animate2Config | None = None):
        super().__init__()
        self.config = config = config if config is not None else Animate2Config()
        self.gradient_checkpointing = False
        block_config = config.block_config()
        dim, patch = config.dim, config.patch_size
        add_input_layers(self, config)
        self.blocks = nn.ModuleList(Animate2Block(block_config) for _ in range(config.num_layers))
        self.head = Head(dim, config.out_dim * math.prod(patch), config.eps)
        self.img_emb = ImageEmbedding(config.image_dim, dim)
        self.rope = MultiAxisRope(config.rope_theta, block_config.rope_axes_dims, (config.rope_max_len,) * 3)

    # ------------------------------------------------------------------ the two streams
    def encode_reference(
        self, inputs: ReferenceInputs, video_frames: int | None = None, offload: bool = False
    ) -> ReferenceKV:
        """Run the driving video through every block and keep each block's keys and values (on the CPU with
        `offload`: DiffSynth-Studio's `animate2_offload_kv`). `video_frames` is the generated latent's frame count
        (default: the driving latent's + 1, the reference image's frame), used by a negative `refer_offset_t`."""
        cfg = self.config
        x, y = inputs.latents, inputs.y
        dtype = x.dtype
        grid = self._check_latents(x, y, "reference latents")
        b = x.shape[0]
        self._check_text(inputs.context, inputs.clip_feature, b)
        seq = self._tokens(x, y)
        video = (grid[0] + 1 if video_frames is None else int(video_frames), grid[1], grid[2])
        offsets = (cfg.refer_offset_t, cfg.refer_offset_h, cfg.refer_offset_w)
        origin = tuple(o if o >= 0 else extent for o, extent in zip(offsets, video, strict=True))
        rope = self._rope(grid, origin, cfg.refer_stride, x.device)
        t = torch.full((b,), REFERENCE_TIMESTEP, device=x.device)
        e, _ = self._time(t, dtype)
        context, context_img = self._context(inputs.context, inputs.clip_feature, dtype)
        index = torch.arange(b, device=x.device)[:, None]
        keys, values = [], []
        for block in self.blocks:
            seq, k, v = self._run(block, seq, e, index, context, context_img, rope)
            keys.append(k.to("cpu") if offload else k)
            values.append(v.to("cpu") if offload else v)
        return ReferenceKV(keys, values, grid, origin)

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor | float,
        context: torch.Tensor,
        clip_feature: torch.Tensor,
        y: torch.Tensor,
        reference: ReferenceKV | ReferenceInputs,
        log_scale: float = 0.0,
        skip_blocks: Sequence[int] = (),
    ) -> torch.Tensor:
        """Velocity for the latents `x` `[B, out_dim, F, H, W]` (frame 0: the reference image's place);
        computation runs in `x.dtype`.

        `timestep` `[B]` (or a scalar) in [0, 1000]; `context` the UMT5 states `[B, L <= text_len, text_dim]`;
        `clip_feature` `[B, N, image_dim]` (the reference image's); `y` `[B, in_dim - out_dim, F, H, W]` (mask +
        latent of the reference image and of the given first frames); `reference` the driving video's
        `ReferenceKV` (F - 1 latent frames of the same H, W) or its `ReferenceInputs`; `log_scale` is added to the
        attention logits of latent frame 1's keys; `skip_blocks` are left out (DiffSynth-Studio's negative branch
        leaves out block 9).
        """
        cfg = self.config
        grid = self._check_latents(x, y, "x")
        b, dtype, device = x.shape[0], x.dtype, x.device
        self._check_text(context, clip_feature, b)
        if isinstance(reference, ReferenceInputs):
            reference = self.encode_reference(reference, video_frames=x.shape[2] // cfg.patch_size[0])
        self._check_reference(reference, grid)
        skip = {int(i) for i in skip_blocks}
        if any(i < 0 or i >= cfg.num_layers for i in skip):
            raise ValueError(f"skip_blocks={sorted(skip)} must be block indices below num_layers={cfg.num_layers}")

        seq = self._tokens(x, y)
        t = torch.as_tensor(timestep, dtype=torch.float32, device=device).reshape(-1)
        if t.numel() == 1:
            t = t.expand(b)
        if t.numel() != b:
            raise ValueError(f"timestep has {t.numel()} values for a batch of {b}")
        e, temb = self._time(t, dtype)
        context, context_img = self._context(context, clip_feature, dtype)
        rope = self._rope(grid, (0, 0, 0), 1, device)
        ref_rope = self._rope(reference.grid, reference.origin, cfg.refer_stride, device)
        index = torch.arange(b, device=device)[:, None]
        frame_tokens = grid[1] * grid[2]
        for i, block in enumerate(self.blocks):
            if i in skip:
                continue
            k_ref, v_ref = reference.layer(i, device)
            seq = self._run(
                block, seq, e, index, context, context_img, rope, (k_ref, v_ref, ref_rope), frame_tokens, log_scale
            )
        out = self.head(seq, temb.float(), index, dtype)
        return self._unpatchify(out, grid)

    # ------------------------------------------------------------------ pieces
    def _tokens(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Patch tokens `[B, S, dim]` float32 of the latents joined by `y`."""
        return self.patch_embedding(torch.cat([x, y.to(x.dtype)], dim=1)).flatten(2).transpose(1, 2).float()

    def _time(self, t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The modulation table `[B, 6, dim]` float32 and the time embedding `[B, dim]` (for the head)."""
        return time_modulation(self, t, dtype, angle_dtype=torch.float64)

    def _context(self, context: torch.Tensor, clip_feature: torch.Tensor, dtype: torch.dtype):
        return text_tokens(self, context, dtype), self.img_emb(clip_feature, dtype)

    def _rope(self, grid: tuple[int, int, int], origin: tuple[int, int, int], stride: int, device) -> Rope:
        """RoPE tables `[1, S, 1, head_dim]` for a patch grid whose first token sits at `origin` (frames `stride`
        apart), tokens row-major over (frame, row, column)."""
        steps = (stride, 1, 1)
        axes = [o + s * torch.arange(n, device=device) for o, s, n in zip(origin, steps, grid, strict=True)]
        last = max(int(a[-1]) for a in axes)
        if last >= self.config.rope_max_len:
            raise ValueError(f"RoPE position {last} exceeds rope_max_len={self.config.rope_max_len}")
        ids = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)
        cos, sin = self.rope(ids)
        return rope_tables(cos[None, :, None], sin[None, :, None])

    def _unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """`[B, S, pt*ph*pw*C]` (channels fastest within a patch) -> `[B, C, F, H, W]`."""
        (pt, ph, pw), c, (f, h, w) = self.config.patch_size, self.config.out_dim, grid
        x = x.view(x.shape[0], f, h, w, pt, ph, pw, c)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(x.shape[0], c, f * pt, h * ph, w * pw)

    def _run(self, block: nn.Module, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def _check_latents(self, x: torch.Tensor, y: torch.Tensor, name: str) -> tuple[int, int, int]:
        cfg = self.config
        if not isinstance(x, torch.Tensor) or x.dim() != 5 or x.shape[1] != cfg.out_dim:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} has shape {got}; expected [B, out_dim={cfg.out_dim}, F, H, W]")
        expected = (x.shape[0], cfg.in_dim - cfg.out_dim, *x.shape[2:])
        if not isinstance(y, torch.Tensor) or tuple(y.shape) != expected:
            got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"y of {name} has shape {got}; expected {expected} (mask + latent channels)")
        if any(s % p for s, p in zip(x.shape[2:], cfg.patch_size, strict=True)):
            raise ValueError(
                f"{name}: latent size {tuple(x.shape[2:])} must be divisible by the patch {cfg.patch_size}"
            )
        return tuple(s // p for s, p in zip(x.shape[2:], cfg.patch_size, strict=True))

    def _check_text(self, context: torch.Tensor, clip_feature: torch.Tensor, b: int) -> None:
        cfg = self.config
        if context.dim() != 3 or context.shape[0] != b or context.shape[2] != cfg.text_dim:
            raise ValueError(f"context has shape {tuple(context.shape)}; expected [{b}, L, text_dim={cfg.text_dim}]")
        if context.shape[1] > cfg.text_len:
            raise ValueError(f"context has {context.shape[1]} tokens; this DiT takes at most text_len={cfg.text_len}")
        if (
            not isinstance(clip_feature, torch.Tensor)
            or clip_feature.dim() != 3
            or clip_feature.shape[0] != b
            or clip_feature.shape[2] != cfg.image_dim
        ):
            got = tuple(clip_feature.shape) if isinstance(clip_feature, torch.Tensor) else type(clip_feature).__name__
            raise ValueError(f"clip_feature has shape {got}; expected [{b}, N, image_dim={cfg.image_dim}]")

    def _check_reference(self, reference, grid: tuple[int, int, int]) -> None:
        if not isinstance(reference, ReferenceKV):
            raise ValueError(
                f"reference must be a ReferenceKV (encode_reference) or ReferenceInputs, got {type(reference).__name__}"
            )
        if len(reference.keys) != self.config.num_layers:
            raise ValueError(f"reference holds {len(reference.keys)} layers; this DiT has {self.config.num_layers}")
        want = (grid[0] - 1, grid[1], grid[2])
        if tuple(reference.grid) != want:
            raise ValueError(
                f"the driving video's patch grid is {tuple(reference.grid)}; these latents need {want} (one driving "
                "latent frame per generated frame after the first, at the same size)"
            )


# ----------------------------------------------------------------------------------------- config from files
def config_from_state(state, config_json: dict | None = None) -> Animate2Config:
    """The config from the file's shapes; a `config.json` beside it (DiffSynth-Studio's constructor names) may
    add heads, eps, text_len and the RoPE placement of the driving video, and must agree with the shapes."""
    from diffsynth.runtime.registry import build_config, merge_fields

    given = {}
    names = ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "text_dim", "freq_dim", "eps",
             "text_len", "refer_offset_t", "refer_offset_h", "refer_offset_w", "refer_stride")  # fmt: skip
    for name in names:
        if config_json and config_json.get(name) is not None:
            given[name] = config_json[name]
    if config_json and config_json.get("patch_size") is not None:
        given["patch_size"] = tuple(int(p) for p in config_json["patch_size"])
    derived = {}
    if state:
        derived = backbone_fields(state, "blocks.{}.block.")
        derived["image_dim"] = int(state["img_emb.proj.1.weight"].shape[1])
    merged = merge_fields("Wan Animate-2 DiT", given, derived)
    heads_from_width(merged, "Wan Animate-2 DiT")
    return build_config(Animate2Config, "Wan Animate-2 DiT", merged)


# ----------------------------------------------------------------------------------------- pipeline
@dataclass
class Animate2Conditions:
    """A generated clip's inputs besides latents, timestep and text: the reference image's CLIP features
    `[B, 257, 1280]`, `y` `[B, 20, T + 1, h, w]` and the driving video's `ReferenceKV`."""

    clip_feature: torch.Tensor
    y: torch.Tensor
    reference: ReferenceKV


def animate2_velocity(
    dit: WanAnimate2DiT, x, timestep, context, cond: Animate2Conditions, log_scale: float, skip_blocks=()
) -> torch.Tensor:
    """Flow velocity of the Animate-2 DiT in float32 (the per-step model call); inputs in the DiT's weight dtype."""
    from diffsynth.runtime.vram import module_dtype

    dtype = module_dtype(dit)
    out = dit(
        x.to(dtype), timestep.to(device=x.device, dtype=torch.float32), context.to(dtype),
        cond.clip_feature.to(dtype), cond.y.to(dtype), cond.reference, log_scale, skip_blocks,
    )  # fmt: skip
    return out.float()


def frame_mask(given: int, frames: int, temporal: int, h: int, w: int, device) -> torch.Tensor:
    """The I2V mask channels `[temporal, 1 + (frames - 1) / temporal, h, w]`: 1 for the first `given` of
    `frames` pixel frames, the first frame standing for a whole latent frame (repeated `temporal` times)."""
    flags = torch.zeros(frames, device=device)
    flags[:given] = 1
    flags = torch.cat([flags[:1].expand(temporal), flags[1:]])
    return flags.view(-1, temporal).transpose(0, 1)[:, :, None, None].expand(-1, -1, h, w)


def check_animate2_arguments(pipe, animate2: list[str], others: dict, cfg_merge: bool) -> None:
    """Refuse, by name, Animate-2 arguments (`animate2`: the names given) for another DiT, and for an Animate-2 DiT
    the other models' arguments that were given (`others`) and `cfg_merge` (the negative branch leaves out a
    block, so the two branches are not one batch)."""
    if not isinstance(pipe.dit, WanAnimate2DiT):
        raise ConfigError(
            f"{', '.join(animate2)} need a Wan2.2-Animate-2 model (Wan-AI/Wan2.2-Animate-2-14B); this DiT is not one"
        )
    refused = [name for name, value in others.items() if value is not None]
    if refused:
        raise ConfigError(f"Wan2.2-Animate-2 takes no {', '.join(refused)}")
    if cfg_merge:
        raise ConfigError(
            "Wan2.2-Animate-2 runs the guidance branches one after the other (the negative one leaves out a block): "
            "cfg_merge=True is not supported"
        )


def check_animate2_call(pipe, reference_image, reference_video, refert_images, frames: int):
    """The reference image, the driving frames (the first `frames`) and the given first frames as RGB images;
    refused by name when they cannot serve."""
    from diffsynth.runtime.media import load_frames, load_image

    if pipe.dit2 is not None:
        raise ConfigError("Wan2.2-Animate-2 is one DiT: remove the second DiT (dit2) from the pipeline")
    if reference_image is None or isinstance(reference_image, (list, tuple)):
        raise ConfigError("Wan2.2-Animate-2 needs animate2_reference_image: one image of the character (its identity)")
    if reference_video is None:
        raise ConfigError(
            "Wan2.2-Animate-2 needs animate2_reference_video: the driving video (frames or a file) whose motion the "
            "character follows"
        )
    if pipe.image_encoder is None:
        raise ConfigError(
            "Wan2.2-Animate-2 needs the CLIP image encoder: add ModelConfig(model_id='Wan-AI/Wan2.2-Animate-2-14B', "
            "origin_file_pattern='videomodel/Wan-AI/models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth')"
        )
    driving = load_frames(reference_video, "animate2_reference_video")
    if len(driving) < frames:
        raise ConfigError(
            f"animate2_reference_video has {len(driving)} frames; num_frames={frames} needs at least {frames} (one "
            "driving frame per generated frame: lower num_frames, or use animate2_long_video, which extends it)"
        )
    given = [] if refert_images is None else load_frames(refert_images, "animate2_refert_images")
    if len(given) > frames:
        raise ConfigError(
            f"animate2_refert_images has {len(given)} frames; a clip of num_frames={frames} takes at most {frames}"
        )
    return load_image(reference_image), driving[:frames], given


def check_animate2_channels(pipe) -> None:
    """Refuse a VAE whose latent and mask channels do not add up to the Animate-2 DiT's input channels."""
    cfg, vae = pipe.dit.config, pipe.vae
    tc, z = vae.temporal_compression, vae.z_dim
    if cfg.in_dim != cfg.out_dim + tc + z or cfg.out_dim != z:
        raise ConfigError(
            f"the Animate-2 DiT takes {cfg.in_dim} channels; this VAE gives {z} latent + {tc} mask channels: "
            "use the Wan 2.1 VAE (Wan2.1_VAE.pth)"
        )


def animate2_inputs(
    pipe, image, driving, given, prompt_ref, size, max_sequence_length, vae_kwargs
) -> tuple[torch.Tensor, torch.Tensor, ReferenceInputs]:
    """What DiffSynth-Studio's Animate-2 units build for one clip besides its prompt (the checked images of
    `check_animate2_call`; `size` is (height, width, num_frames)): the reference image's CLIP features
    `[1, N, image_dim]`, `y` `[1, in_dim - out_dim, T + 1, h, w]` (float32) and the driving video's
    `ReferenceInputs` (float32 latent and `y`; text and CLIP features as encoded). Training encodes rows with it.

    `y`: the reference image's latent (with a mask of ones) as latent frame 0, then the latent of the given first
    frames (`given`) followed by zeros (mid-grey pixels), with a mask of the given frames. The driving frames are
    encoded with a mask of ones, with the CLIP features of the first one and `prompt_ref` (default " ")."""
    from diffsynth.runtime.vram import module_dtype

    from .animate import frames_tensor
    from .image_encoder import encode_image

    height, width, frames = size
    vae = pipe.vae
    s, tc = vae.spatial_compression, vae.temporal_compression
    pipe.load_models_to_device(["text_encoder"])
    context_ref = pipe.encode_prompt([" " if prompt_ref is None else prompt_ref], max_sequence_length)

    pipe.load_models_to_device(["image_encoder"])
    clip_dtype = module_dtype(pipe.image_encoder)
    clip = encode_image(
        pipe.image_encoder, pipe._pixels([image], height, width, torch.float32), pipe.device, clip_dtype
    )
    clip_ref = encode_image(
        pipe.image_encoder, pipe._pixels(driving[:1], height, width, torch.float32), pipe.device, clip_dtype
    )

    pipe.load_models_to_device(["vae"])
    vae_dtype = module_dtype(vae)
    h, w = height // s, width // s
    ref_latent = vae.encode(pipe._pixels([image], height, width, vae_dtype)[:, :, None], **vae_kwargs).float()
    clip_pixels = torch.zeros(1, 3, frames, height, width, dtype=vae_dtype, device=pipe.device)
    if given:
        clip_pixels[:, :, : len(given)] = frames_tensor(given, height, width, vae_dtype, pipe.device)
    clip_latent = vae.encode(clip_pixels, **vae_kwargs).float()
    y = torch.cat(
        [
            torch.cat([frame_mask(1, 1, tc, h, w, pipe.device)[None], ref_latent], dim=1),
            torch.cat([frame_mask(len(given), frames, tc, h, w, pipe.device)[None], clip_latent], dim=1),
        ],
        dim=2,
    )
    driving_latent = vae.encode(frames_tensor(driving, height, width, vae_dtype, pipe.device), **vae_kwargs).float()
    driving_y = torch.cat([frame_mask(frames, frames, tc, h, w, pipe.device)[None], driving_latent], dim=1)
    return clip, y, ReferenceInputs(driving_latent, driving_y, context_ref, clip_ref)


def generate_animate2(
    pipe, prompts, negatives, reference_image, reference_video, prompt_ref, refert_images, offload_kv: bool,
    log_scale: float, size, seed, rand_device, latents, max_sequence_length, schedule, scale, vae_kwargs,
    progress_bar,
) -> torch.Tensor:  # fmt: skip
    """One Animate-2 clip `[B, 3, num_frames, H, W]` in [-1, 1], as DiffSynth-Studio's Animate-2 units compose it.

    The conditions are `animate2_inputs`' (the given first frames are `refert_images`); the driving video (its
    first `num_frames` frames) is run once through the reference stream (`encode_reference`). `latents` is the
    initial noise `[B, z, 2 + (num_frames - 1) / 4, h, w]` (frame 0 is the reference image's place, dropped
    before decoding)."""
    from diffsynth.runtime.schedulers import make_scheduler
    from diffsynth.runtime.vram import module_dtype

    from .pipeline import sampler_grid

    height, width, frames = size
    steps, shift, sigmas, sampler = schedule
    dit, vae, batch = pipe.dit, pipe.vae, len(prompts)
    s, z = vae.spatial_compression, vae.z_dim
    image, driving, given = check_animate2_call(pipe, reference_image, reference_video, refert_images, frames)
    check_animate2_channels(pipe)
    use_cfg = scale != 1.0
    pipe.load_models_to_device(["text_encoder"])
    context = pipe.encode_prompt(prompts, max_sequence_length)
    negative_context = pipe.encode_prompt(negatives, max_sequence_length) if use_cfg else None
    clip, y, inputs = animate2_inputs(pipe, image, driving, given, prompt_ref, size, max_sequence_length, vae_kwargs)

    pipe.load_models_to_device(["dit"])
    dtype = module_dtype(dit)
    inputs = ReferenceInputs(
        inputs.latents.to(dtype), inputs.y.to(dtype), inputs.context.to(dtype), inputs.clip_feature.to(dtype)
    )
    reference = dit.encode_reference(inputs, video_frames=y.shape[2] // dit.config.patch_size[0], offload=offload_kv)
    cond = Animate2Conditions(clip.expand(batch, -1, -1), y.expand(batch, -1, -1, -1, -1), reference)

    h, w = height // s, width // s
    shape = (batch, z, y.shape[2], h, w)
    noise = pipe.check_latents(latents, shape) if latents is not None else pipe.generate_noise(shape, seed, rand_device)
    scheduler = make_scheduler("wan", sampler)
    scheduler.set_timesteps(steps, sigmas=sigmas, shift=shift, **sampler_grid(sampler))
    x = noise
    for i in pipe.progress(range(len(scheduler.timesteps)), progress_bar):
        timestep = scheduler.timesteps[i].to(device=x.device, dtype=torch.float32).expand(batch)
        velocity = animate2_velocity(dit, x, timestep, context, cond, float(log_scale))
        if use_cfg:
            skip = [NEGATIVE_SKIP_BLOCK] if NEGATIVE_SKIP_BLOCK < dit.config.num_layers else []
            negative = animate2_velocity(dit, x, timestep, negative_context, cond, float(log_scale), skip)
            velocity = pipe.guide(velocity, negative, scale)
        x = scheduler.step(velocity, i, x)

    pipe.load_models_to_device(["vae"])
    video = vae.decode(x[:, :, 1:].to(module_dtype(vae)), **vae_kwargs).float()
    pipe.load_models_to_device([])
    return video


def animate2_long_video(
    pipe, prompt: str, reference_image, reference_video, clip_frames: int = 81, overlap_frames: int = 1, **kwargs
) -> list[Image.Image]:
    """A video as long as `reference_video`, made clip by clip (DiffSynth-Studio's example loop): clips of
    `clip_frames` driving frames, each after the first starting `overlap_frames` frames before the previous one
    ends and given the previous clip's last `overlap_frames` output frames (`animate2_refert_images`), which it
    then drops. A driving video shorter than the clips need is extended back and forth. `kwargs` go to every
    call (`seed`, `animate2_prompt_ref`, `height`, ...). Returns the PIL frames."""
    from diffsynth.runtime.media import load_frames

    from .animate import reflect_pad, segment_starts

    if not isinstance(prompt, str):
        raise ConfigError("animate2_long_video makes one video: give one prompt (a string)")
    if isinstance(clip_frames, bool) or not isinstance(clip_frames, int) or clip_frames < 5 or (clip_frames - 1) % 4:
        raise ConfigError(f"clip_frames={clip_frames!r} must be 1 + 4k frames, at least 5 (81)")
    if isinstance(overlap_frames, bool) or not isinstance(overlap_frames, int) or not 1 <= overlap_frames < clip_frames:
        raise ConfigError(f"overlap_frames={overlap_frames!r} must be at least 1 and below clip_frames={clip_frames}")
    taken = {"animate2_reference_video", "animate2_refert_images", "num_frames", "output_type"} & kwargs.keys()
    if taken:
        raise ConfigError(f"animate2_long_video sets {', '.join(sorted(taken))} itself")
    driving = load_frames(reference_video, "reference_video")
    length = len(driving)
    starts = segment_starts(length, clip_frames, overlap_frames)
    driving = reflect_pad(driving, max(len(driving), starts[-1] + clip_frames))
    out: list[Image.Image] = []
    tail = None
    for start in starts:
        clip = pipe(
            prompt, animate2_reference_image=reference_image, animate2_reference_video=driving[start : start + clip_frames],
            animate2_refert_images=tail, num_frames=clip_frames, output_type="pil", **kwargs,
        )  # fmt: skip
        tail = clip[-overlap_frames:]
        out += clip if start == 0 else clip[overlap_frames:]
    return out[:length]


__all__ = [
    "BIAS_CHANNELS",
    "NEGATIVE_SKIP_BLOCK",
    "Animate2Block",
    "Animate2Conditions",
    "Animate2Config",
    "ReferenceInputs",
    "ReferenceKV",
    "WanAnimate2DiT",
    "animate2_inputs",
    "animate2_long_video",
    "animate2_velocity",
    "check_animate2_arguments",
    "check_animate2_call",
    "check_animate2_channels",
    "config_from_state",
    "frame_mask",
    "generate_animate2",
    "key_bias_channels",
    "reference_attention",
]
