"""The Qwen-Image 2.1 denoiser: a single-stream DiT over one block-causal text/image sequence.

The sequence is the vision-language prompt as the text encoder saw it, with image latents in place of its
image placeholders:

- text tokens are Qwen3-VL hidden states read through `txt_in` (zero-centred RMSNorm, then a GELU MLP);
- each `<|image_pad|>` slot of the prompt stands for a 2x2 group of a condition image's latent tokens, so
  it becomes four `img_in` tokens (the images' tokens in order, each image raster-ordered);
- the target image's tokens come last, as if the prompt ended in one slot per four of them.

Everything before the target ("the prefix") is causal: a text token sees the tokens before it, a condition
image sees everything before it and the whole of itself; the target sees everything. Padded prompt tokens
are never seen. All blocks share one `modulation` (scale and gate, no shift, tanh gates). With
`causal_condition` the prefix is modulated as at sigma 0, so it does not depend on the step: its keys and
values after RoPE can be kept (`PrefixCache`) and later steps run the target tokens alone.

Positions: a text token moves one step along all three RoPE axes; an image stays on the frame position the
text reached, lays its rows and columns out centred on 0, and moves the frame position on by `max(h, w)`.

Module names equal the official diffusers checkpoint (`transformer/` of Qwen/Qwen-Image-2.1); nothing has
a bias. The timestep is sigma in [0, 1] (scaled by 1000 inside); the prediction is the flow velocity.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from diffsynth.runtime.attention import attention
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.layers import add_mul, rope_tables, rotate
from diffsynth.runtime.step_cache import run_blocks

from .. import dit as qwen_image_dit
from ..dit import ImageShape, Rope, axis_angles, centred_positions

TOKENS_PER_SLOT = 4  # one image slot of the prompt = a 2x2 group of latent tokens


@dataclass
class QwenImage21DiTConfig:
    """Sizes of the Qwen-Image 2.1 DiT; defaults are the released checkpoint."""

    patch_size: int = 1
    in_channels: int = 64  # latent channels (times patch_size ** 2 when packed)
    out_channels: int = 64  # the output is packed to patch_size ** 2 * out_channels
    num_layers: int = 32
    attention_head_dim: int = 128
    num_attention_heads: int = 32
    context_in_dim: int = 4096  # width of the text encoder's hidden states
    mlp_ratio: int = 3
    axes_dims_rope: tuple[int, int, int] = (16, 56, 56)
    eps: float = 1e-6
    causal_condition: bool = True  # text and condition images modulated as at sigma 0 (allows PrefixCache)

    def __post_init__(self) -> None:
        self.axes_dims_rope = tuple(int(d) for d in self.axes_dims_rope)
        for name in (
            "patch_size",
            "in_channels",
            "out_channels",
            "num_layers",
            "attention_head_dim",
            "num_attention_heads",
            "context_in_dim",
            "mlp_ratio",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if len(self.axes_dims_rope) != 3 or any(d < 0 or d % 2 for d in self.axes_dims_rope):
            raise ValueError(f"axes_dims_rope={self.axes_dims_rope} must be three even numbers")
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(
                f"axes_dims_rope={self.axes_dims_rope} sums to {sum(self.axes_dims_rope)}, "
                f"but attention_head_dim={self.attention_head_dim}"
            )
        if not self.eps > 0:
            raise ValueError(f"eps={self.eps} must be > 0")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def token_dim(self) -> int:
        return self.patch_size * self.patch_size * self.in_channels

    @property
    def out_dim(self) -> int:
        return self.patch_size * self.patch_size * self.out_channels


class PrefixCache:
    """Keys and values (after RoPE) of the prefix, the text and condition-image tokens, per layer.

    Pass the same cache to every call of one denoising loop (one cache per prompt, e.g. one for the positive
    and one for the negative prompt): the first call fills it, later calls read it and run the target image's
    tokens alone. Their inputs must describe the same prefix (text, masks, slots, condition images, shapes);
    only the target's latents and the timestep may change. `clear()` empties it for a new loop.
    """

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.prefix_len: int | None = None
        self.batch: int | None = None

    @property
    def filled(self) -> bool:
        return self.prefix_len is not None

    def __repr__(self) -> str:
        state = f"{len(self.layers)} layers, {self.batch} x {self.prefix_len} tokens" if self.filled else "empty"
        return f"PrefixCache({state})"


# ------------------------------------------------------------------------------------ sequence layout
@dataclass
class SequencePlan:
    """Where everything sits in the joint sequence `[prefix, target]` (shared by the batch).

    `gather` picks the prefix from `cat([text tokens, condition tokens])`; `segments` are the prefix's
    `(start, end, is_text)` runs (one per text run and per condition image); `positions` are the RoPE
    positions `[prefix_len + target_len, 3]`."""

    gather: torch.Tensor
    segments: list[tuple[int, int, bool]]
    positions: torch.Tensor
    prefix_len: int
    target_len: int


def _shape_list(img_shapes) -> list[ImageShape]:
    if img_shapes is None or isinstance(img_shapes, torch.Tensor) or len(img_shapes) == 0:
        raise ValueError("img_shapes must list (frames, h, w) per image: condition images first, the target last")
    shapes = []
    for index, shape in enumerate(img_shapes):
        try:
            f, h, w = (operator.index(n) for n in shape)
        except (TypeError, ValueError):
            raise ValueError(
                f"img_shapes[{index}]={shape!r} is not (frames, h, w); pass one list of (frames, h, w), "
                "shared by the batch, not one list per sample"
            ) from None
        if f != 1 or h < 1 or w < 1:
            raise ValueError(f"img_shapes[{index}]={shape!r}: Qwen-Image 2.1 takes single images (frames=1, h, w >= 1)")
        if (h * w) % TOKENS_PER_SLOT:
            raise ValueError(
                f"img_shapes[{index}]={shape!r} has {h * w} tokens; each image needs a multiple of "
                f"{TOKENS_PER_SLOT} (one prompt slot per 2x2 tokens: make h and w even)"
            )
        shapes.append((f, h, w))
    return shapes


def plan_sequence(slots: Sequence[bool], shapes: Sequence[ImageShape]) -> SequencePlan:
    """The joint sequence of a prompt whose image slots are `slots` (True at `<|image_pad|>`), for condition
    images `shapes[:-1]` and the target `shapes[-1]`."""
    n_text = len(slots)
    conditions, (_, target_h, target_w) = shapes[:-1], shapes[-1]
    n_slots = sum(bool(s) for s in slots)
    n_cond = sum(h * w for _, h, w in conditions)
    if n_slots * TOKENS_PER_SLOT != n_cond:
        raise ValueError(
            f"image_slots marks {n_slots} slots ({n_slots * TOKENS_PER_SLOT} latent tokens), but the condition "
            f"images of img_shapes {list(conditions)} have {n_cond} tokens"
        )

    gather: list[torch.Tensor] = []
    segments: list[tuple[int, int, bool]] = []
    positions: list[torch.Tensor] = []
    start = pos = 0  # prefix length so far, RoPE frame position so far
    image = cond_start = 0  # next condition image, index of its first token
    j = 0
    while j < n_text:
        run_end = j
        while run_end < n_text and bool(slots[run_end]) == bool(slots[j]):
            run_end += 1
        if not slots[j]:  # a text run
            n = run_end - j
            gather.append(torch.arange(j, run_end))
            segments.append((start, start + n, True))
            positions.append(torch.arange(pos, pos + n)[:, None].expand(n, 3))
            start, pos = start + n, pos + n
        else:  # one or more whole condition images
            tokens = (run_end - j) * TOKENS_PER_SLOT
            while tokens:
                _, h, w = conditions[image]
                if h * w > tokens:
                    raise ValueError(
                        f"condition image {image} ({h}x{w} tokens) does not fill one run of image slots; "
                        "each image's slots must be contiguous and in img_shapes' order"
                    )
                gather.append(n_text + cond_start + torch.arange(h * w))
                segments.append((start, start + h * w, False))
                positions.append(_image_positions(pos, h, w))
                start, pos, tokens = start + h * w, pos + max(h, w), tokens - h * w
                cond_start += h * w
                image += 1
        j = run_end
    if not segments:
        raise ValueError("text has no tokens; Qwen-Image 2.1 needs a prompt")
    positions.append(_image_positions(pos, target_h, target_w))
    return SequencePlan(
        gather=torch.cat(gather),
        segments=segments,
        positions=torch.cat(positions),
        prefix_len=start,
        target_len=target_h * target_w,
    )


def _image_positions(frame: int, h: int, w: int) -> torch.Tensor:
    rows, cols = torch.meshgrid(centred_positions(h, "cpu"), centred_positions(w, "cpu"), indexing="ij")
    return torch.stack([torch.full((h * w,), frame), rows.reshape(-1), cols.reshape(-1)], dim=-1)


def rope_for(positions: torch.Tensor, axes_dims: Sequence[int], device: torch.device) -> Rope:
    """Rotary tables `[1, S, 1, head_dim]` of integer positions `[S, 3]`."""
    positions = positions.to(device)
    angles = torch.cat([axis_angles(positions[:, a], d) for a, d in enumerate(axes_dims)], dim=-1)
    return rope_tables(angles.cos()[None, :, None], angles.sin()[None, :, None])


@dataclass
class AttentionMasks:
    """Bool masks (True = attend) of one forward: per prefix segment (None: attend to every key before its
    end) and of the target's queries over `[prefix, target]` keys (None: everything)."""

    segments: list[tuple[int, int, torch.Tensor | None]]
    target: torch.Tensor | None


def attention_masks(plan: SequencePlan, key_valid: torch.Tensor | None, device: torch.device) -> AttentionMasks:
    """Block-causal masks with key padding `key_valid` `[B, prefix_len]` (None: no padding). A text query
    always sees itself, so a padded one never has an empty row (no real token reads it)."""
    segments = []
    for start, end, is_text in plan.segments:
        valid = None if key_valid is None else key_valid[:, :end]
        if is_text:
            query = torch.arange(start, end, device=device)[:, None]
            key = torch.arange(end, device=device)[None]
            causal = key <= query  # [n, end]: everything before, and the run itself causally
            mask = causal if valid is None else causal & (valid[:, None] | (key == query))
            segments.append((start, end, mask[None, None] if mask.dim() == 2 else mask[:, None]))
        else:
            segments.append((start, end, valid))
    if key_valid is None:
        return AttentionMasks(segments, None)
    target = F.pad(key_valid, (0, plan.target_len), value=True)
    return AttentionMasks(segments, target)


# ------------------------------------------------------------------------------------ modules
class TimestepEmbedder(qwen_image_dit.TimestepEmbedder):
    """Qwen-Image's time MLP, `linear_2(silu(linear_1(sinusoid(1000 * sigma))))`, without biases."""

    def __init__(self, dim: int):
        super().__init__(dim)
        for layer in (self.linear_1, self.linear_2):
            layer.register_parameter("bias", None)


class ZeroCentredRMSNorm(nn.Module):
    """RMSNorm whose stored weight is the scale minus one (zeros = identity); computed in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), x.shape[-1:], self.weight.float() + 1, self.eps).to(x.dtype)


class TextIn(nn.Module):
    """Text encoder states -> model width: `out_layer(gelu_tanh(in_layer(norm(x))))`."""

    def __init__(self, context_dim: int, dim: int, eps: float):
        super().__init__()
        self.text_norm = ZeroCentredRMSNorm(context_dim, eps)
        self.in_layer = nn.Linear(context_dim, dim, bias=False)
        self.out_layer = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(F.gelu(self.in_layer(self.text_norm(x)), approximate="tanh"))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, hidden, bias=False)
        self.out = nn.Linear(hidden, dim, bias=False)
        self.gate_layer = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.silu(self.gate_layer(x)) * self.proj(x))


class BlockCausalAttention(nn.Module):
    """Self-attention with QK-RMSNorm over `[prefix, target]`, the prefix block-causal (see `AttentionMasks`)."""

    def __init__(self, dim: int, heads: int, head_dim: int, eps: float):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim, bias=False)])
        self.norm_q = nn.RMSNorm(head_dim, eps=eps)
        self.norm_k = nn.RMSNorm(head_dim, eps=eps)

    def _qkv(self, x: torch.Tensor, rope: Rope) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        v = self.to_v(x).unflatten(-1, (self.heads, self.head_dim))
        q = self.norm_q(self.to_q(x).unflatten(-1, (self.heads, self.head_dim))).to(v.dtype)
        k = self.norm_k(self.to_k(x).unflatten(-1, (self.heads, self.head_dim))).to(v.dtype)
        return rotate(q, *rope), rotate(k, *rope), v

    def forward(self, prefix, target, rope_prefix: Rope, rope_target: Rope, masks: AttentionMasks, cached):
        """`prefix` is None when its keys and values are `cached`; returns the outputs of both streams (None
        for a cached prefix) and the prefix's keys and values."""
        q, k, v = self._qkv(target, rope_target)
        out_prefix = None
        if prefix is None:
            prefix_k, prefix_v = cached
        else:
            prefix_q, prefix_k, prefix_v = self._qkv(prefix, rope_prefix)
            parts = [
                attention(prefix_q[:, start:end], prefix_k[:, :end], prefix_v[:, :end], mask=mask)
                for start, end, mask in masks.segments
            ]
            out_prefix = self.to_out[0](torch.cat(parts, dim=1).flatten(2))
        k, v = torch.cat([prefix_k, k], dim=1), torch.cat([prefix_v, v], dim=1)
        out_target = self.to_out[0](attention(q, k, v, mask=masks.target).flatten(2))
        return out_prefix, out_target, (prefix_k, prefix_v)


Modulation = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # 1 + scale1, gate1, 1 + scale2, gate2


class QwenImage21Block(nn.Module):
    """Single-stream block over the prefix and target streams (same weights, their own modulation rows)."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_ratio: int, eps: float):
        super().__init__()
        self.eps = eps
        self.attn = BlockCausalAttention(dim, heads, head_dim, eps)
        self.img_mlp = SwiGLU(dim, dim * mlp_ratio)

    def _norm(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], eps=self.eps) * scale

    def _mlp(self, x: torch.Tensor, mod: Modulation) -> torch.Tensor:
        x = add_mul(x, self.img_mlp(self._norm(x, mod[2])), mod[3])
        return x.clip(-65504, 65504) if x.dtype == torch.float16 else x

    def forward(
        self, prefix, target, mod_prefix: Modulation, mod_target: Modulation, rope_prefix, rope_target, masks, cached
    ):
        out_prefix, out_target, kv = self.attn(
            None if prefix is None else self._norm(prefix, mod_prefix[0]),
            self._norm(target, mod_target[0]),
            rope_prefix,
            rope_target,
            masks,
            cached,
        )
        target = self._mlp(add_mul(target, out_target, mod_target[1]), mod_target)
        if prefix is not None:
            prefix = self._mlp(add_mul(prefix, out_prefix, mod_prefix[1]), mod_prefix)
        return prefix, target, kv


class OutputNorm(nn.Module):
    """Scale-only AdaLN before the output projection: `norm(x) * (1 + linear(silu(temb)))`."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.linear = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale = self.linear(F.silu(temb).to(x.dtype)).unsqueeze(1)
        return F.layer_norm(x, x.shape[-1:], eps=self.eps) * (1 + scale)


# ------------------------------------------------------------------------------------ model
class QwenImage21DiT(nn.Module):
    """Qwen-Image 2.1 single-stream DiT with the official diffusers module names."""

    offload_units = ("transformer_blocks",)
    compile_units = ("transformer_blocks",)
    lora_target_modules = (
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "img_mlp.proj",
        "img_mlp.gate_layer",
        "img_mlp.out",
        "modulation.1",
    )

    def __init__(self, config: QwenImage21DiTConfig | None = None):
        super().__init__()
        self.config = config = config or QwenImage21DiTConfig()
        dim = config.inner_dim
        self.time_text_embed = nn.Module()
        self.time_text_embed.timestep_embedder = TimestepEmbedder(dim)
        self.txt_in = TextIn(config.context_in_dim, dim, config.eps)
        self.img_in = nn.Linear(config.token_dim, dim, bias=False)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 4 * dim, bias=False))  # shared by all blocks
        self.transformer_blocks = nn.ModuleList(
            QwenImage21Block(dim, config.num_attention_heads, config.attention_head_dim, config.mlp_ratio, config.eps)
            for _ in range(config.num_layers)
        )
        self.norm_out = OutputNorm(dim, config.eps)
        self.proj_out = nn.Linear(dim, config.out_dim, bias=False)
        self.gradient_checkpointing = False
        self.step_cache = None  # a FirstBlockCache over `transformer_blocks` (BasePipeline.enable_first_block_cache)
        # no `parallel` attribute: neither sequence nor batch (CFG) parallelism is built for this model, so
        # `BasePipeline.enable_parallel` refuses the pipeline at once

    def forward(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        img_shapes: Sequence[ImageShape],
        image_slots: torch.Tensor,
        text_mask: torch.Tensor | None = None,
        cache: PrefixCache | None = None,
    ) -> torch.Tensor:
        """`latents` `[B, L_img, token_dim]`: the condition images' tokens, then the target's (each image in
        raster order); `timestep` `[B]` sigma in [0, 1]; `text` `[B, L_txt, context_in_dim]` the prompt's hidden
        states; `img_shapes` `(frames, h, w)` per image in tokens, condition images first, shared by the batch;
        `image_slots` bool `[L_txt]` (or `[B, L_txt]`, equal rows) True at the prompt's image slots, each of
        which stands for 4 condition tokens; `text_mask` bool `[B, L_txt]` True at real tokens (slots count
        as real). Returns the target's prediction `[B, L_target, out_dim]`.

        `cache`: a `PrefixCache` (needs `causal_condition`); filled by the first call, then read: later calls
        compute the target's tokens only (their prefix inputs must not change)."""
        cfg = self.config
        if getattr(self, "parallel", None) is not None:  # groups set by hand: nothing here divides the call
            raise ConfigError(
                "Qwen-Image 2.1 DiT does not support parallel sampling (sequence parallelism or batch (CFG) "
                "parallelism) yet; sample in one process"
            )
        if cache is not None:
            if not cfg.causal_condition:
                raise ConfigError(
                    "a PrefixCache needs causal_condition=True: only then are the text and condition tokens "
                    "independent of the timestep"
                )
            if not isinstance(cache, PrefixCache):
                raise TypeError(f"cache must be a PrefixCache, got {type(cache).__name__}")
        b = self._check_inputs(latents, timestep, text, text_mask)
        shapes = _shape_list(img_shapes)
        plan = plan_sequence(_shared_slots(image_slots, b, text.shape[1]), shapes)
        n_img, n_target = latents.shape[1], plan.target_len
        if sum(h * w for _, h, w in shapes) != n_img:
            raise ValueError(
                f"img_shapes={shapes} covers {sum(h * w for _, h, w in shapes)} tokens, latents have {n_img}"
            )
        reading = cache is not None and cache.filled
        if reading and (cache.prefix_len, cache.batch, len(cache.layers)) != (plan.prefix_len, b, cfg.num_layers):
            raise ValueError(
                f"the PrefixCache holds {cache.batch} x {cache.prefix_len} prefix tokens over {len(cache.layers)} "
                f"layers, this call has {b} x {plan.prefix_len} over {cfg.num_layers}: clear() it for new inputs"
            )

        target = self.img_in(latents[:, n_img - n_target :])
        dtype, device = target.dtype, target.device
        sigma = timestep.to(dtype).reshape(-1).expand(b)
        if cfg.causal_condition:
            sigma = torch.cat([sigma, sigma.new_zeros(1)])  # the last row: sigma 0, for the prefix
        temb = self.time_text_embed.timestep_embedder(sigma, dtype)
        scale1, gate1, scale2, gate2 = self.modulation(temb).unsqueeze(1).chunk(4, dim=-1)
        mods = (1 + scale1, gate1.tanh(), 1 + scale2, gate2.tanh())
        mod_target = tuple(m[:b] for m in mods)
        mod_prefix = tuple(m[b:] for m in mods) if cfg.causal_condition else mod_target

        key_valid = None
        if text_mask is not None and not bool(text_mask.all()):
            conditions = text_mask.new_ones(b, n_img - n_target, dtype=torch.bool)
            key_valid = torch.cat([text_mask.to(torch.bool), conditions], dim=1)[:, plan.gather.to(device)]
        rope = rope_for(plan.positions, cfg.axes_dims_rope, device)
        rope_prefix = tuple(t[:, : plan.prefix_len] for t in rope)
        rope_target = tuple(t[:, plan.prefix_len :] for t in rope)

        if reading:
            prefix = None
            masks = AttentionMasks([], None if key_valid is None else F.pad(key_valid, (0, n_target), value=True))
        else:
            tokens = torch.cat([self.txt_in(text).to(dtype), self.img_in(latents[:, : n_img - n_target])], dim=1)
            prefix = tokens[:, plan.gather.to(device)]
            masks = attention_masks(plan, key_valid, device)

        filling = cache is not None and not reading
        layers: list = list(cache.layers) if reading else [None] * cfg.num_layers
        args = (mod_prefix, mod_target, rope_prefix, rope_target, masks)

        def run(index: int, prefix, target):
            block = self.transformer_blocks[index]
            call = (prefix, target, *args, layers[index])
            if self.gradient_checkpointing and torch.is_grad_enabled():
                prefix, target, kv = checkpoint(block, *call, use_reentrant=False)
            else:
                prefix, target, kv = block(*call)
            if filling:  # (otherwise dropped: every layer's prefix keys held to the end would cost memory)
                layers[index] = kv
            return prefix, target

        def streams(state):  # the step cache sees the target first, then the prefix (when computed)
            return state[0], (state[1] if len(state) > 1 else None)

        def pack(prefix, target):
            return (target,) if prefix is None else (target, prefix)

        def first(state):
            target, prefix = streams(state)
            return pack(*run(0, prefix, target))

        def rest(state):
            target, prefix = streams(state)
            for index in range(1, cfg.num_layers):
                prefix, target = run(index, prefix, target)
            return pack(prefix, target)

        step_cache = None if filling else self.step_cache  # a skipped block would leave the cache unfilled
        target, _ = streams(run_blocks(step_cache, pack(prefix, target), first, rest))
        if filling:
            cache.layers, cache.prefix_len, cache.batch = layers, plan.prefix_len, b
        return self.proj_out(self.norm_out(target, temb[:b]))

    def _check_inputs(self, latents, timestep, text, text_mask) -> int:
        cfg = self.config
        if latents.dim() != 3 or latents.shape[2] != cfg.token_dim:
            raise ValueError(f"latents have shape {tuple(latents.shape)}; expected [B, L_img, {cfg.token_dim}]")
        b = latents.shape[0]
        if text.dim() != 3 or text.shape[0] != b or text.shape[2] != cfg.context_in_dim:
            raise ValueError(
                f"text has shape {tuple(text.shape)}; expected [B={b}, L_txt, context_in_dim={cfg.context_in_dim}]"
            )
        if timestep.numel() not in (1, b):
            raise ValueError(f"timestep has shape {tuple(timestep.shape)}; expected [B={b}] (or one value)")
        if text_mask is not None and tuple(text_mask.shape) != tuple(text.shape[:2]):
            raise ValueError(
                f"text_mask has shape {tuple(text_mask.shape)}; expected [B, L_txt]={tuple(text.shape[:2])}"
            )
        return b


def _shared_slots(image_slots: torch.Tensor, batch: int, n_text: int) -> list[bool]:
    """`image_slots` `[L_txt]` or `[B, L_txt]` (rows equal) as one list of bools."""
    slots = torch.as_tensor(image_slots)
    if slots.dtype != torch.bool:
        raise ValueError(f"image_slots must be a bool tensor (True at image slots), got {slots.dtype}")
    if slots.dim() == 2 and slots.shape[0] == batch:
        if not bool((slots == slots[:1]).all()):
            raise ValueError("image_slots differ between samples; every sample must share the prompt's image layout")
        slots = slots[0]
    if slots.dim() != 1 or slots.shape[0] != n_text:
        raise ValueError(f"image_slots has shape {tuple(slots.shape)}; expected [L_txt={n_text}] or [B={batch}, L_txt]")
    return slots.tolist()
