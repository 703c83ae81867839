"""Qwen-Image ControlNet in the InstantX design (diffusers `QwenImageControlNetModel` checkpoints).

The net is a short copy of the DiT's front: the same timestep embedder, text norm and projections and a
few dual-stream blocks (`dit.py`'s, same names), with no output head. Its image input is the noisy
latent tokens plus `controlnet_x_embedder(condition)`, the condition being the control image's VAE
latents packed 2x2 like the latents (64 features). InstantX's inpainting net appends the kept region
(1 - mask, on the latent grid) as a 17th latent channel before packing: 68 features, a config with
`extra_condition_channels=4`. After every block the image tokens go through a zero-initialised
`controlnet_blocks.N` Linear and come out, times the control's scale, as the residuals the DiT adds
after its own blocks (`QwenImageDiT.forward(controlnet_block_samples=...)`, spread over its 60 blocks).

The Union net has no control-mode input: the kind of control (canny, soft edge, depth, pose) is read
from the image. The timestep embedding is taken from the float32 sigma (the DiT rounds sigma to its
dtype first), as diffusers' ControlNet does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import reduce

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from diffsynth.runtime.controlnet import acts_at

from .dit import (
    EPS,
    QwenImageBlock,
    QwenImageDiT,
    QwenImageDiTConfig,
    TimeTextEmbed,
    check_img_shapes,
    joint_key_mask,
    joint_rope,
)


@dataclass
class QwenImageControlNetConfig:
    """Sizes of a Qwen-Image ControlNet; defaults are InstantX/Qwen-Image-ControlNet-Union (5 blocks).

    `extra_condition_channels` are the condition features beyond the packed latents (diffusers' name):
    0 for control-image nets (Union), `patch_size ** 2` (4) for InstantX/Qwen-Image-ControlNet-Inpainting,
    whose condition carries one mask channel packed with the latents.
    """

    patch_size: int = 2
    in_channels: int = 64
    extra_condition_channels: int = 0
    num_layers: int = 5
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 3584
    axes_dims_rope: tuple[int, int, int] = (16, 56, 56)

    def __post_init__(self) -> None:
        try:
            self.axes_dims_rope = self.block_config().axes_dims_rope
        except ValueError as exc:
            raise ValueError(f"QwenImageControlNetConfig: {exc}") from None
        extra, mask = self.extra_condition_channels, self.patch_size**2
        if isinstance(extra, bool) or not isinstance(extra, int) or extra not in (0, mask):
            raise ValueError(
                f"QwenImageControlNetConfig.extra_condition_channels={extra!r}: use 0 (control image latents) or "
                f"{mask} (latents plus one mask channel packed {self.patch_size}x{self.patch_size}, the inpainting net)"
            )

    def block_config(self) -> QwenImageDiTConfig:
        """The DiT config the shared blocks are checked against (the output width is unused here)."""
        return QwenImageDiTConfig(
            patch_size=self.patch_size,
            in_channels=self.in_channels,
            out_channels=self.in_channels,
            num_layers=self.num_layers,
            attention_head_dim=self.attention_head_dim,
            num_attention_heads=self.num_attention_heads,
            joint_attention_dim=self.joint_attention_dim,
            axes_dims_rope=self.axes_dims_rope,
        )

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def cond_channels(self) -> int:
        """Width of the condition tokens (`controlnet_x_embedder` inputs)."""
        return self.in_channels + self.extra_condition_channels


def _zero_linear(dim_in: int, dim_out: int) -> nn.Linear:
    layer = nn.Linear(dim_in, dim_out)
    if not layer.weight.is_meta:
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
    return layer


class QwenImageControlNet(nn.Module):
    """`forward(latents, timestep, text, text_mask, img_shapes, cond, scale)` -> one residual
    `[B, L_img, inner_dim]` per block, for `QwenImageDiT.forward(controlnet_block_samples=...)`."""

    offload_units = ("transformer_blocks",)
    compile_units = ("transformer_blocks",)
    lora_target_modules = QwenImageDiT.lora_target_modules

    def __init__(self, config: QwenImageControlNetConfig | None = None):
        super().__init__()
        self.config = config = config if config is not None else QwenImageControlNetConfig()
        dim = config.inner_dim
        # registration order follows the diffusers state dict
        self.time_text_embed = TimeTextEmbed(dim)
        self.txt_norm = nn.RMSNorm(config.joint_attention_dim, eps=EPS)
        self.img_in = nn.Linear(config.in_channels, dim)
        self.txt_in = nn.Linear(config.joint_attention_dim, dim)
        self.transformer_blocks = nn.ModuleList(
            QwenImageBlock(dim, config.num_attention_heads, config.attention_head_dim) for _ in range(config.num_layers)
        )
        self.controlnet_blocks = nn.ModuleList(_zero_linear(dim, dim) for _ in range(config.num_layers))
        self.controlnet_x_embedder = _zero_linear(config.cond_channels, dim)
        self.gradient_checkpointing = False

    @property
    def takes_mask(self) -> bool:
        """Whether the condition carries the packed inpainting mask after the latents."""
        return self.config.extra_condition_channels > 0

    def forward(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor | None = None,
        img_shapes=None,
        cond: torch.Tensor | None = None,
        scale: float = 1.0,
    ) -> list[torch.Tensor]:
        """Residuals for the DiT, each multiplied by `scale`.

        Inputs as `QwenImageDiT.forward` (`latents` the noisy packed tokens, `timestep` sigma `[B]`, the
        prompt's `text` and `text_mask`, `img_shapes`), plus `cond` `[B or 1, L_img, cond_channels]`, the
        packed condition tokens. Computation runs in `latents.dtype`.
        """
        cfg = self.config
        b, n_img = latents.shape[:2]
        if latents.dim() != 3 or latents.shape[-1] != cfg.in_channels:
            raise ValueError(
                f"latents have shape {tuple(latents.shape)}; expected [B, L_img, in_channels={cfg.in_channels}]"
            )
        if (
            cond is None
            or cond.dim() != 3
            or cond.shape[0] not in (1, b)
            or cond.shape[1:] != (n_img, cfg.cond_channels)
        ):
            got = None if cond is None else tuple(cond.shape)
            raise ValueError(f"cond has shape {got}; expected [B={b} or 1, {n_img}, {cfg.cond_channels}]")
        img_shapes = check_img_shapes(img_shapes, b)
        dtype = latents.dtype

        img = self.img_in(latents) + self.controlnet_x_embedder(cond.to(dtype))
        sigma = torch.as_tensor(timestep, device=img.device).float().reshape(-1).expand(b)
        temb = self.time_text_embed.timestep_embedder(sigma, dtype)
        txt = self.txt_in(self.txt_norm(text.to(dtype)))
        rope = joint_rope(img_shapes, n_img, txt.shape[1], cfg.axes_dims_rope, img.device)
        mask = joint_key_mask(text_mask, n_img)

        residuals = []
        for block, out in zip(self.transformer_blocks, self.controlnet_blocks, strict=True):
            args = (img, txt, temb, rope, mask, None)
            if self.gradient_checkpointing and torch.is_grad_enabled():
                img, txt = checkpoint(block, *args, use_reentrant=False)
            else:
                img, txt = block(*args)
            residuals.append(out(img) * scale)
        return residuals


@dataclass
class ControlCondition:
    """A control prepared for the denoising loop: its net, the packed condition tokens `[1 or B, L, C]` (for a
    Blockwise net already embedded), its scale and the steps where it acts (`ControlNetInput.start` / `end`)."""

    model: nn.Module  # a QwenImageControlNet or a QwenImageBlockwiseControlNet
    tokens: torch.Tensor
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0

    def active(self, step: int, steps: int) -> bool:
        return acts_at(self.start, self.end, step, steps)


def sum_residuals(lists: Sequence[Sequence[torch.Tensor]], blocks: int) -> list[torch.Tensor] | None:
    """The residual lists of several controls as one list for a DiT of `blocks` blocks.

    Lists of one length are summed entry by entry (diffusers' multi-ControlNet); lists of different
    lengths (nets of different depths) are each spread over the blocks first and summed per block,
    each distinct combination once.
    """
    lists = [list(items) for items in lists if items]
    if not lists:
        return None
    if len({len(items) for items in lists}) == 1:
        return [reduce(torch.add, parts) for parts in zip(*lists, strict=True)]
    intervals = [math.ceil(blocks / len(items)) for items in lists]
    sums: dict[tuple[int, ...], torch.Tensor] = {}
    out = []
    for i in range(blocks):
        key = tuple(i // k for k in intervals)
        if key not in sums:
            sums[key] = reduce(torch.add, (items[j] for items, j in zip(lists, key, strict=True)))
        out.append(sums[key])
    return out


__all__ = [
    "ControlCondition",
    "QwenImageControlNet",
    "QwenImageControlNetConfig",
    "sum_residuals",
]
