"""The Qwen-Image denoiser: an MMDiT of dual-stream blocks (Qwen/Qwen-Image, Qwen-Image-Edit).

Image tokens (packed 2x2 latent patches, 64 channels) and text tokens (Qwen2.5-VL hidden states,
RMS-normalised by `txt_norm`) keep separate weights (`img_*` / `txt_*` modulation, MLPs and
projections) and meet in one joint attention over `[text, image]`, with QK-RMSNorm and MSRoPE:

- image tokens of image `i` in a sample get positions (frame `i + f`, row, column), rows and columns
  centred on 0 (`-(h - h // 2) .. h // 2 - 1`, the "scale_rope" layout);
- text tokens get the same position on all three axes, starting after the largest half-size
  `max(h // 2, w // 2)` of the sample's images.

Edit models append the reference images' tokens to the latent sequence (several `img_shapes`
entries per sample). With `zero_cond_t` (Qwen-Image-Edit-2511) those reference tokens are
modulated with the embedding of timestep 0, the generated image with the real timestep.

Qwen-Image-Layered (`use_layer3d_rope`, `use_additional_t_cond`; see `layered.py`) feeds the frames it
generates (the whole image, then its layers) one after another, and the input image last. The layer-3D
RoPE keeps the frame positions 0, 1, ... of the generated frames and puts the input image at frame -1;
text then starts after the largest half-size or after the frame count, whichever is larger. A learned
two-entry embedding (`time_text_embed.addition_t_embedding`, picked per sample by `additional_t_cond`)
is added to the timestep embedding.

ControlNets (`controlnet.py`) hand the DiT one residual per ControlNet block; they are spread over the
DiT's blocks (block `i` adds sample `i // ceil(blocks / samples)` to its image tokens), as diffusers'
`QwenImageTransformer2DModel(controlnet_block_samples=...)` does.

Module names equal the official diffusers checkpoint (`transformer/` folder), so it loads as is.
The timestep is sigma in [0, 1] (scaled by 1000 inside); the prediction is the flow velocity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from diffsynth.runtime.attention import attention
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.layers import add_mul, rope_inverse_frequencies, rope_tables, rotate, timestep_embedding
from diffsynth.runtime.parallel import batch_parallel, shard_sequence
from diffsynth.runtime.step_cache import run_blocks

TIME_FREQ_DIM = 256  # sinusoidal features fed to the time MLP
TIME_SCALE = 1000.0  # sigma -> diffusers timestep
ROPE_THETA = 10000.0
EPS = 1e-6

ImageShape = tuple[int, int, int]  # (frames, height, width) in patch units
Rope = tuple[torch.Tensor, torch.Tensor]  # per-channel (cos, signed sin) [B, S, 1, head_dim], float32


@dataclass
class QwenImageDiTConfig:
    """Sizes of the Qwen-Image DiT; defaults are the released 20B checkpoint."""

    patch_size: int = 2
    in_channels: int = 64  # packed: latent channels * patch_size ** 2
    out_channels: int = 16  # latent channels; the output is packed to patch_size ** 2 * out_channels
    num_layers: int = 60
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 3584
    axes_dims_rope: tuple[int, int, int] = (16, 56, 56)
    zero_cond_t: bool = False
    guidance_embeds: bool = False
    use_additional_t_cond: bool = False  # Qwen-Image-Layered: a 2-entry embedding added to the timestep's
    use_layer3d_rope: bool = False  # Qwen-Image-Layered: the last image of a sample sits at RoPE frame -1

    def __post_init__(self) -> None:
        self.axes_dims_rope = tuple(int(d) for d in self.axes_dims_rope)
        for name in ("patch_size", "in_channels", "out_channels", "num_layers", "attention_head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.num_attention_heads < 1 or self.joint_attention_dim < 1:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} and joint_attention_dim="
                f"{self.joint_attention_dim} must be >= 1"
            )
        if len(self.axes_dims_rope) != 3 or any(d % 2 for d in self.axes_dims_rope):
            raise ValueError(f"axes_dims_rope={self.axes_dims_rope} must be three even numbers")
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(
                f"axes_dims_rope={self.axes_dims_rope} sums to {sum(self.axes_dims_rope)}, "
                f"but attention_head_dim={self.attention_head_dim}"
            )
        if self.guidance_embeds:
            raise ValueError("guidance_embeds=True is not supported (no released Qwen-Image has guidance weights)")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def out_dim(self) -> int:
        return self.patch_size * self.patch_size * self.out_channels


# ------------------------------------------------------------------------------------ MSRoPE
def axis_angles(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Angles `[N, dim // 2]` in float32 (as the reference computes them) for integer positions."""
    inv = rope_inverse_frequencies(dim, ROPE_THETA).float().to(positions.device)
    return torch.outer(positions.float(), inv)


def centred_positions(n: int, device: torch.device) -> torch.Tensor:
    return torch.arange(n, device=device) - (n - n // 2)


def msrope_angles(
    shapes: Sequence[ImageShape],
    text_len: int | Sequence[int],
    axes_dims: Sequence[int],
    device: torch.device,
    layer3d: bool = False,
    interpolate_references: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary angles of one sample: `(image [L_img, D/2], text [L_txt, D/2])`, axes concatenated. Text of
    several segments (EliGen's entity prompts, then the global one) places each as if it were alone.

    `layer3d` (Qwen-Image-Layered): the last entry of `shapes` is the input image, at frame -1 (one frame);
    the text starts at least at `len(shapes) - 1`, the number of generated frames.
    `interpolate_references` (DiffSynth-Studio's `edit_rope_interpolation`, for its Edit-Lowres-Fix LoRA): each
    reference after the first entry takes rows and columns spread evenly over the first entry's (a small edit
    image then spans the generated image's positions), keeping its own frame index."""
    parts = []
    last = len(shapes) - 1
    _, target_h, target_w = shapes[0]
    for index, (f, h, w) in enumerate(shapes):
        if layer3d and index == last:
            if f != 1:
                raise ValueError(f"the layered input image has {f} frames in img_shapes; it must have one")
            frames = torch.full((1,), -1, device=device)
        else:
            frames = torch.arange(index, index + f, device=device)
        rows, cols = centred_positions(h, device), centred_positions(w, device)
        if interpolate_references and index > 0:
            rows = centred_positions(target_h, device)[_spread(target_h, h, device)]
            cols = centred_positions(target_w, device)[_spread(target_w, w, device)]
        axes = (frames, rows, cols)
        grids = torch.meshgrid(*axes, indexing="ij")
        parts.append(torch.cat([axis_angles(g.reshape(-1), d) for g, d in zip(grids, axes_dims, strict=True)], -1))
    start = max(max(h // 2, w // 2) for _, h, w in shapes)
    if layer3d:
        start = max(start, last)
    lengths = [text_len] if isinstance(text_len, int) else list(text_len)
    text_pos = torch.cat([torch.arange(start, start + n, device=device) for n in lengths])
    text = torch.cat([axis_angles(text_pos, d) for d in axes_dims], dim=-1)
    return torch.cat(parts, dim=0), text


def _spread(source: int, n: int, device) -> torch.Tensor:
    """`n` indices evenly over `range(source)`, rounded down (DiffSynth-Studio's float32 linspace, truncated)."""
    return torch.linspace(0, source - 1, n, device=device).long()


def check_img_shapes(img_shapes, batch: int) -> list[list[ImageShape]]:
    """`img_shapes` as one list of `(frames, h, w)` per sample (a single list is shared by the batch)."""
    if img_shapes is None:
        raise ValueError("img_shapes is required: one list of (frames, h, w) per sample")
    if len(img_shapes) and isinstance(img_shapes[0][0], int):
        img_shapes = [img_shapes] * batch
    if len(img_shapes) != batch:
        raise ValueError(f"img_shapes has {len(img_shapes)} entries for a batch of {batch}")
    return [[tuple(int(n) for n in s) for s in shapes] for shapes in img_shapes]


def joint_rope(
    img_shapes,
    n_img: int,
    n_txt: int | Sequence[int],
    axes_dims: Sequence[int],
    device,
    layer3d: bool = False,
    interpolate_references: bool = False,
) -> Rope:
    """Rotary tables of the joint `[text, image]` sequence, `[B, L_txt + L_img, 1, head_dim]` (`n_txt`: the
    text's length, or its segments' lengths; `layer3d`, `interpolate_references`: see `msrope_angles`)."""
    img_angles, txt_angles = [], []
    for b, shapes in enumerate(img_shapes):
        total = sum(math.prod(s) for s in shapes)
        if total != n_img:
            raise ValueError(f"img_shapes[{b}]={list(shapes)} covers {total} tokens, but latents have {n_img}")
        img, txt = msrope_angles(shapes, n_txt, axes_dims, device, layer3d, interpolate_references)
        img_angles.append(img)
        txt_angles.append(txt)
    angles = torch.cat([torch.stack(txt_angles), torch.stack(img_angles)], dim=1)[:, :, None]  # [B, S, 1, D/2]
    return rope_tables(angles.cos(), angles.sin())


def joint_key_mask(text_mask: torch.Tensor | None, n_img: int) -> torch.Tensor | None:
    """Key mask `[B, L_txt + L_img]` of the joint sequence (image tokens always seen); None without a text mask."""
    if text_mask is None:
        return None
    b = text_mask.shape[0]
    return torch.cat([text_mask.to(torch.bool), text_mask.new_ones(b, n_img, dtype=torch.bool)], dim=1)


def check_residuals(
    samples: Sequence[torch.Tensor] | None, batch: int, n_img: int, dim: int
) -> list[torch.Tensor] | None:
    """ControlNet residuals `[B or 1, L <= n_img, dim]`, each zero-padded to the `n_img` image tokens (the
    generated image's tokens come first; edit references get none)."""
    if samples is None or callable(samples):  # a Blockwise ControlNet's residual, computed block by block
        return samples
    samples = list(samples)
    if not samples:
        raise ValueError("controlnet_block_samples is empty; pass None for no ControlNet residuals")
    for r in samples:
        if r.dim() != 3 or r.shape[0] not in (1, batch) or r.shape[1] > n_img or r.shape[2] != dim:
            raise ValueError(
                f"a ControlNet residual has shape {tuple(r.shape)}; expected [B={batch} or 1, L <= {n_img}, {dim}]"
            )
    return [F.pad(r, (0, 0, 0, n_img - r.shape[1])) if r.shape[1] < n_img else r for r in samples]


def residual_index(block: int, blocks: int, samples: int) -> int:
    """Which of `samples` ControlNet residuals block `block` of `blocks` adds: `block // ceil(blocks / samples)`
    (diffusers' rule; a list as long as the blocks gives each block its own)."""
    return block // math.ceil(blocks / samples)


# ------------------------------------------------------------------------------------ modules
class TimestepEmbedder(nn.Module):
    """`linear_2(silu(linear_1(sinusoid(1000 * sigma))))`."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(TIME_FREQ_DIM, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, sigma: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        freqs = timestep_embedding(sigma, TIME_FREQ_DIM, scale=TIME_SCALE, cos_first=True)
        return self.linear_2(F.silu(self.linear_1(freqs.to(dtype))))


class TimeTextEmbed(nn.Module):
    """The timestep embedder; with `additional` (Qwen-Image-Layered) also a 2-entry embedding that the DiT
    adds to the timestep embedding, one entry per sample."""

    def __init__(self, dim: int, additional: bool = False):
        super().__init__()
        self.timestep_embedder = TimestepEmbedder(dim)
        if additional:
            self.addition_t_embedding = nn.Embedding(2, dim)


class FeedForward(nn.Module):
    """GELU (tanh) MLP with the diffusers names `net.0.proj` / `net.2`."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        proj = nn.Module()
        proj.proj = nn.Linear(dim, hidden)
        self.net = nn.ModuleList([proj, nn.Identity(), nn.Linear(hidden, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](F.gelu(self.net[0].proj(x), approximate="tanh"))


class JointAttention(nn.Module):
    """Joint attention of the text (`add_*`) and image (`to_*`) streams."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        # registration order follows the diffusers state dict
        self.norm_q, self.norm_k = nn.RMSNorm(head_dim, eps=EPS), nn.RMSNorm(head_dim, eps=EPS)
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, inner), nn.Linear(dim, inner), nn.Linear(dim, inner)
        self.add_k_proj, self.add_v_proj = nn.Linear(dim, inner), nn.Linear(dim, inner)
        self.add_q_proj = nn.Linear(dim, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])
        self.to_add_out = nn.Linear(inner, dim)
        self.norm_added_q, self.norm_added_k = nn.RMSNorm(head_dim, eps=EPS), nn.RMSNorm(head_dim, eps=EPS)

    def forward(self, img, txt, rope: Rope, mask):
        """`rope` covers the joint `[text, image]` sequence: both streams are rotated in one pass. Under
        sequence parallelism `img` is this rank's shard of the image tokens (the text is whole)."""

        def heads(x):
            return x.unflatten(-1, (self.heads, self.head_dim))

        q = torch.cat([self.norm_added_q(heads(self.add_q_proj(txt))), self.norm_q(heads(self.to_q(img)))], dim=1)
        k = torch.cat([self.norm_added_k(heads(self.add_k_proj(txt))), self.norm_k(heads(self.to_k(img)))], dim=1)
        v = torch.cat([heads(self.add_v_proj(txt)), heads(self.to_v(img))], dim=1)
        out = attention(rotate(q, *rope), rotate(k, *rope), v, mask=mask, sequence_parallel=True).flatten(2)
        n_txt = txt.shape[1]
        return self.to_out[0](out[:, n_txt:]), self.to_add_out(out[:, :n_txt])


def _layer_norm(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=EPS)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return add_mul(shift, _layer_norm(x), 1 + scale)


class QwenImageBlock(nn.Module):
    """One dual-stream block: AdaLN-modulated joint attention and per-stream MLPs."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.img_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.attn = JointAttention(dim, heads, head_dim)
        self.img_mlp = FeedForward(dim, 4 * dim)
        self.txt_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.txt_mlp = FeedForward(dim, 4 * dim)

    def forward(self, img, txt, temb, rope: Rope, mask, cond_index):
        """`temb` is `[B, D]`, or `[2B, D]` (real, zero timestep) when `cond_index` `[B, L_img]` is given."""
        img_params = self.img_mod(temb)
        if cond_index is not None:
            real, zero = img_params.unsqueeze(1).chunk(2, dim=0)
            img_params = torch.where(cond_index.unsqueeze(-1), zero, real)  # [B, L_img, 6D]
            txt_params = self.txt_mod(temb.chunk(2, dim=0)[0]).unsqueeze(1)
        else:
            img_params = img_params.unsqueeze(1)
            txt_params = self.txt_mod(temb).unsqueeze(1)
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = img_params.chunk(6, dim=-1)
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = txt_params.chunk(6, dim=-1)

        img_attn, txt_attn = self.attn(
            _modulate(img, i_shift1, i_scale1), _modulate(txt, t_shift1, t_scale1), rope, mask
        )
        img = add_mul(img, i_gate1, img_attn)
        txt = add_mul(txt, t_gate1, txt_attn)
        img = add_mul(img, i_gate2, self.img_mlp(_modulate(img, i_shift2, i_scale2)))
        txt = add_mul(txt, t_gate2, self.txt_mlp(_modulate(txt, t_shift2, t_scale2)))
        if img.dtype == torch.float16:
            img, txt = img.clip(-65504, 65504), txt.clip(-65504, 65504)
        return img, txt


class OutputNorm(nn.Module):
    """AdaLN before the output projection: `norm(x) * (1 + scale) + shift`, scale first."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(F.silu(temb)).unsqueeze(1).chunk(2, dim=-1)
        return _modulate(x, shift, scale)


# ------------------------------------------------------------------------------------ model
class QwenImageDiT(nn.Module):
    """Qwen-Image MMDiT with the official diffusers module names."""

    offload_units = ("transformer_blocks",)
    compile_units = ("transformer_blocks",)
    lora_target_modules = (
        "to_q",
        "to_k",
        "to_v",
        "add_q_proj",
        "add_k_proj",
        "add_v_proj",
        "to_out.0",
        "to_add_out",
        "img_mlp.net.2",
        "img_mod.1",
        "txt_mlp.net.2",
        "txt_mod.1",
    )

    def __init__(self, config: QwenImageDiTConfig | None = None):
        super().__init__()
        self.config = config = config or QwenImageDiTConfig()
        dim = config.inner_dim
        self.time_text_embed = TimeTextEmbed(dim, additional=config.use_additional_t_cond)
        self.txt_norm = nn.RMSNorm(config.joint_attention_dim, eps=EPS)
        self.img_in = nn.Linear(config.in_channels, dim)
        self.txt_in = nn.Linear(config.joint_attention_dim, dim)
        self.transformer_blocks = nn.ModuleList(
            QwenImageBlock(dim, config.num_attention_heads, config.attention_head_dim) for _ in range(config.num_layers)
        )
        self.norm_out = OutputNorm(dim)
        self.proj_out = nn.Linear(dim, config.out_dim)
        self.gradient_checkpointing = False
        self.step_cache = None  # a FirstBlockCache over `transformer_blocks` (BasePipeline.enable_first_block_cache)
        self.parallel = None  # ParallelGroups dividing batch and image tokens (BasePipeline.enable_parallel)

    def forward(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor | None = None,
        img_shapes: Sequence[Sequence[ImageShape]] | Sequence[ImageShape] | None = None,
        segments: Sequence[int] | None = None,
        attn_mask: torch.Tensor | None = None,
        controlnet_block_samples: Sequence[torch.Tensor] | None = None,
        additional_t_cond: torch.Tensor | None = None,
        edit_rope_interpolation: bool = False,
    ) -> torch.Tensor:
        """`latents` `[B, L_img, in_channels]` packed tokens, `timestep` `[B]` sigma, `text`
        `[B, L_txt, joint_attention_dim]`, `text_mask` `[B, L_txt]` (True = real token),
        `img_shapes` one list of `(frames, h, w)` per sample (target image first, then edit
        references; a single list is shared by the batch). Returns `[B, L_img, out_dim]`.

        EliGen (`eligen.py`): `text` holds several prompts one after another, of `segments` lengths (each gets
        its text positions as if alone) and `attn_mask` (bool `[B or 1, 1, S, S]` over `[text, image]`) limits
        who sees whom; `text_mask` is then not used.

        `controlnet_block_samples` are ControlNet residuals `[B or 1, L, inner_dim]` added to the first `L`
        image tokens (the generated image's; edit references get none) after the blocks; a list shorter than
        the blocks is spread over them (see `residual_index`). It may instead be a callable
        `(block index, image tokens after that block) -> residual` (Blockwise ControlNets), in one process.

        `additional_t_cond` (required by, and only accepted by, `use_additional_t_cond` models) picks the
        additional timestep embedding per sample: integers in {0, 1}, `[B]` or one for all (Qwen-Image-Layered's
        pipeline passes 0).

        With `parallel` set, the batch and the image tokens (edit references included) are divided over
        the ranks (`enable_parallel`). `edit_rope_interpolation` spreads each reference's rotary positions over
        the generated image's grid (`msrope_angles`; DiffSynth-Studio's Qwen-Image-Edit-Lowres-Fix)."""
        b, n_img = latents.shape[:2]
        img_shapes = check_img_shapes(img_shapes, b)
        additional_t_cond = self._check_additional(additional_t_cond, b, latents.device)
        residuals = check_residuals(controlnet_block_samples, b, n_img, self.config.inner_dim)
        if callable(residuals) and self.parallel is not None:
            raise ConfigError("Blockwise ControlNets are not divided over ranks: sample with them in one process")
        if attn_mask is not None:
            if self.parallel is not None:
                raise ConfigError("EliGen's attention mask is not divided over ranks: sample it in one process")
            if segments is None or sum(segments) != text.shape[1]:
                raise ValueError(f"segments={segments} must add up to the text's {text.shape[1]} tokens")
            length = text.shape[1] + latents.shape[1]
            if attn_mask.dim() != 4 or attn_mask.shape[0] not in (1, b) or attn_mask.shape[2:] != (length, length):
                raise ValueError(
                    f"attn_mask has shape {tuple(attn_mask.shape)}; expected [B or 1, 1, {length}, {length}]"
                )
            return self._forward(
                latents, timestep, text, None, img_shapes, segments, attn_mask, residuals, additional_t_cond,
                edit_rope_interpolation,
            )  # fmt: skip
        return batch_parallel(
            self.parallel,
            b,
            self._forward,
            latents,
            timestep,
            text,
            text_mask,
            img_shapes,
            None,
            None,
            residuals,
            additional_t_cond,
            edit_rope_interpolation,
            per_sample=(4,),
        )

    def _check_additional(self, index, batch: int, device) -> torch.Tensor | None:
        """`additional_t_cond` as a `[B]` long tensor (None for models without the embedding)."""
        if not self.config.use_additional_t_cond:
            if index is not None:
                raise ValueError("additional_t_cond is given, but this DiT has no additional timestep embedding")
            return None
        if index is None:
            raise ValueError(
                "this DiT (use_additional_t_cond, Qwen-Image-Layered) needs additional_t_cond: 0 or 1 per sample"
            )
        index = torch.as_tensor(index, device=device).long().reshape(-1)
        if index.numel() == 1:
            index = index.expand(batch)
        if index.numel() != batch or bool(((index < 0) | (index > 1)).any()):
            raise ValueError(
                f"additional_t_cond={index.tolist()} must hold 0 or 1, once or for each of {batch} samples"
            )
        return index

    def _forward(
        self,
        latents,
        timestep,
        text,
        text_mask,
        img_shapes,
        segments=None,
        attn_mask=None,
        residuals=None,
        additional_t_cond=None,
        edit_rope_interpolation=False,
    ) -> torch.Tensor:
        cfg = self.config
        b, n_img, _ = latents.shape

        img = self.img_in(latents)
        txt = self.txt_in(self.txt_norm(text))
        timestep = timestep.to(img.dtype).reshape(b)

        cond_index = None
        if cfg.zero_cond_t:  # (after batch division: each rank doubles its own part)
            timestep = torch.cat([timestep, torch.zeros_like(timestep)])
            first = [math.prod(shapes[0]) for shapes in img_shapes]
            cond_index = torch.arange(n_img, device=img.device)[None] >= torch.tensor(first, device=img.device)[:, None]
            if additional_t_cond is not None:
                additional_t_cond = torch.cat([additional_t_cond, additional_t_cond])
        temb = self.time_text_embed.timestep_embedder(timestep, img.dtype)
        if additional_t_cond is not None:
            temb = temb + self.time_text_embed.addition_t_embedding(additional_t_cond).to(img.dtype)

        axes, layer3d = self.config.axes_dims_rope, self.config.use_layer3d_rope
        n_text = txt.shape[1] if segments is None else segments
        rope = joint_rope(img_shapes, n_img, n_text, axes, img.device, layer3d, edit_rope_interpolation)
        mask = attn_mask if text_mask is None else joint_key_mask(text_mask, n_img)

        n_txt = txt.shape[1]
        with shard_sequence(self.parallel, n_img, prefix=n_txt) as shards:
            if shards is not None:  # this rank's image tokens and their per-token inputs; the text stays whole
                img = shards.shard(img)
                rope = tuple(torch.cat((t[:, :n_txt], shards.shard(t[:, n_txt:])), dim=1) for t in rope)
                mask = shards.key_mask(mask, b, img.device)
                cond_index = None if cond_index is None else shards.shard(cond_index)
                residuals = (
                    residuals if residuals is None or callable(residuals) else [shards.shard(r) for r in residuals]
                )
            img, txt = self._blocks(img, txt, temb, rope, mask, cond_index, residuals)
            if shards is not None:
                img = shards.gather(img)

        if cfg.zero_cond_t:
            temb = temb.chunk(2, dim=0)[0]
        return self.proj_out(self.norm_out(img, temb))

    def _blocks(self, img, txt, temb, rope, mask, cond_index, residuals) -> tuple[torch.Tensor, torch.Tensor]:
        """The block stack through the step cache, each block's ControlNet residual added after it. The cache
        measures the first block alone; its residual belongs to the rest, so a reused call reuses every block's
        residual of the last full call along with the blocks' own work."""

        def run(block: nn.Module, img: torch.Tensor, txt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            args = (img, txt, temb, rope, mask, cond_index)
            if self.gradient_checkpointing and torch.is_grad_enabled():
                return checkpoint(block, *args, use_reentrant=False)
            return block(*args)

        def first(streams):
            return run(self.transformer_blocks[0], *streams)

        blocks = len(self.transformer_blocks)

        def rest(streams):
            img, txt = streams
            for i, block in enumerate(self.transformer_blocks):
                if i:
                    img, txt = run(block, img, txt)
                if callable(residuals):  # block i's residual from the image tokens it left (Blockwise ControlNets)
                    r = residuals(i, img)
                    img = torch.cat([img[:, : r.shape[1]] + r.to(img.dtype), img[:, r.shape[1] :]], dim=1)
                elif residuals is not None:
                    img = img + residuals[residual_index(i, blocks, len(residuals))].to(img.dtype)
            return img, txt

        return run_blocks(self.step_cache, (img, txt), first, rest)
