"""FLUX.1 ControlNet in the InstantX / diffusers `FluxControlNetModel` design.

A shortened copy of the DiT (a few double-stream and single-stream blocks, the same embedders)
whose image input is the noisy latent tokens plus `controlnet_x_embedder(condition)`, the
condition being the VAE-encoded control image packed like the latents (64 features; alimama's
inpainting net adds the 2x2-packed mask: 68). The image tokens after every block go through a
zero-initialised `controlnet_blocks.N` / `controlnet_single_blocks.N` Linear and come out as the
residuals the DiT adds after its own blocks (`Flux1DiT.forward(controlnet_block_samples=...)`).
Union nets (InstantX Union) prepend a learned control-mode token to the text tokens.

The blocks are our DiT's (`dit.py`, BFL names); `controlnet_formats.py` converts the diffusers
key names of the released files (InstantX Union, alimama inpainting, jasperai upscaler) to ours.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from diffsynth.runtime.layers import rope_tables

from .dit import (
    TIME_FREQ_DIM,
    DoubleStreamBlock,
    Flux1DiTConfig,
    MLPEmbedder,
    SingleStreamBlock,
    check_inputs,
    conditioning_vector,
    rope_from_ids,
)

# InstantX FLUX.1-dev-Controlnet-Union(-alpha) control modes (its model card).
UNION_MODES = {"canny": 0, "tile": 1, "depth": 2, "blur": 3, "pose": 4, "gray": 5, "lq": 6}


@dataclass
class Flux1ControlNetConfig:
    """Architecture of a FLUX.1 ControlNet; defaults are InstantX FLUX.1-dev-Controlnet-Union-alpha.

    `cond_in_channels` is the width of the condition tokens (`controlnet_x_embedder` inputs; None
    means `in_channels`, 68 for alimama's inpainting net: latents plus a packed mask channel).
    `num_modes` is the size of the union control-mode table (None: not a union net).
    """

    in_channels: int = 64
    cond_in_channels: int | None = None
    vec_in_dim: int = 768
    context_in_dim: int = 4096
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 5
    depth_single_blocks: int = 10
    axes_dim: tuple[int, ...] = (16, 56, 56)
    theta: float = 10000.0
    qkv_bias: bool = True
    guidance_embed: bool = True
    num_modes: int | None = 10

    def __post_init__(self):
        if self.cond_in_channels is None:
            self.cond_in_channels = self.in_channels
        for name in ("cond_in_channels", "num_modes"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"Flux1ControlNetConfig.{name}={value!r} must be a positive integer or None")
        try:
            self.axes_dim = self.block_config().axes_dim
        except ValueError as exc:
            raise ValueError(str(exc).replace("Flux1DiTConfig", "Flux1ControlNetConfig")) from None

    def block_config(self) -> Flux1DiTConfig:
        """The DiT config the shared blocks are built from."""
        return Flux1DiTConfig(
            in_channels=self.in_channels,
            out_channels=self.in_channels,
            vec_in_dim=self.vec_in_dim,
            context_in_dim=self.context_in_dim,
            hidden_size=self.hidden_size,
            mlp_ratio=self.mlp_ratio,
            num_heads=self.num_heads,
            depth=self.depth,
            depth_single_blocks=self.depth_single_blocks,
            axes_dim=self.axes_dim,
            theta=self.theta,
            qkv_bias=self.qkv_bias,
            guidance_embed=self.guidance_embed,
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def _zero_linear(dim_in: int, dim_out: int) -> nn.Linear:
    layer = nn.Linear(dim_in, dim_out)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def _embedding(num: int, dim: int) -> nn.Embedding:
    """`nn.Embedding` with N(0, 1) rows; not initialised on the meta device (the first `normal_` there
    costs seconds of lazy set-up, and loading replaces the weights anyway)."""
    table = nn.Embedding(num, dim, _weight=torch.empty(num, dim))
    if not table.weight.is_meta:
        nn.init.normal_(table.weight)
    return table


class Flux1ControlNet(nn.Module):
    """`forward(img, img_ids, txt, txt_ids, timesteps, y, guidance, cond, mode, scale)` ->
    `(double residuals, single residuals)`, lists of `[B, L_img, hidden]` for `Flux1DiT.forward`."""

    offload_units = ("double_blocks", "single_blocks")
    compile_units = ("double_blocks", "single_blocks")

    def __init__(self, config: Flux1ControlNetConfig | None = None):
        super().__init__()
        self.config = config = config if config is not None else Flux1ControlNetConfig()
        blocks = config.block_config()
        self.gradient_checkpointing = False
        dim = config.hidden_size
        self.img_in = nn.Linear(config.in_channels, dim)
        self.time_in = MLPEmbedder(TIME_FREQ_DIM, dim)
        self.vector_in = MLPEmbedder(config.vec_in_dim, dim)
        self.guidance_in = MLPEmbedder(TIME_FREQ_DIM, dim) if config.guidance_embed else None
        self.txt_in = nn.Linear(config.context_in_dim, dim)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(blocks) for _ in range(config.depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(blocks) for _ in range(config.depth_single_blocks))
        self.controlnet_x_embedder = _zero_linear(config.cond_in_channels, dim)
        self.controlnet_blocks = nn.ModuleList(_zero_linear(dim, dim) for _ in range(config.depth))
        self.controlnet_single_blocks = nn.ModuleList(_zero_linear(dim, dim) for _ in range(config.depth_single_blocks))
        self.controlnet_mode_embedder = _embedding(config.num_modes, dim) if config.num_modes else None

    @property
    def is_union(self) -> bool:
        return self.controlnet_mode_embedder is not None

    @property
    def takes_mask(self) -> bool:
        """Whether the condition carries a packed mask channel after the latents (alimama inpainting)."""
        return self.config.cond_in_channels == self.config.in_channels + 4

    def forward(
        self,
        img: torch.Tensor,
        img_ids: torch.Tensor,
        txt: torch.Tensor,
        txt_ids: torch.Tensor,
        timesteps: torch.Tensor | float,
        y: torch.Tensor,
        guidance: torch.Tensor | float | None = None,
        cond: torch.Tensor | None = None,
        mode: torch.Tensor | int | None = None,
        scale: float = 1.0,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Residuals for the DiT, each multiplied by `scale`.

        Inputs as `Flux1DiT.forward`, plus `cond` `[B or 1, L_img, cond_in_channels]` (the packed
        control latents) and, for union nets, `mode` (an int or `[B]` long; see `UNION_MODES`);
        other nets ignore `mode`. `guidance` is ignored by nets without a guidance embedder.
        """
        cfg = self.config
        b, n_img = img.shape[:2]
        img_ids, txt_ids = check_inputs(cfg, img, img_ids, txt, txt_ids, y)
        if (
            cond is None
            or cond.dim() != 3
            or cond.shape[0] not in (1, b)
            or cond.shape[1:]
            != (
                n_img,
                cfg.cond_in_channels,
            )
        ):
            got = None if cond is None else tuple(cond.shape)
            raise ValueError(f"cond has shape {got}; expected [B={b} or 1, {n_img}, {cfg.cond_in_channels}]")
        dtype = img.dtype

        vec = conditioning_vector(self, timesteps, y, guidance, b, dtype)
        img = self.img_in(img) + self.controlnet_x_embedder(cond.to(dtype))
        txt = self.txt_in(txt.to(dtype))
        txt_ids = txt_ids.expand(b, -1, -1)
        if self.is_union:
            token = self.controlnet_mode_embedder(self._mode_tensor(mode, b, img.device))[:, None]
            txt = torch.cat((token.to(dtype), txt), dim=1)
            txt_ids = torch.cat((txt_ids[:, :1], txt_ids), dim=1)
        ids = torch.cat((txt_ids, img_ids.expand(b, -1, -1)), dim=1)
        rope = rope_tables(*rope_from_ids(ids, cfg.axes_dim, cfg.theta))

        double = []
        for block, out in zip(self.double_blocks, self.controlnet_blocks, strict=True):
            img, txt = self._run(block, img, txt, vec, rope)
            double.append(out(img) * scale)
        x = torch.cat((txt, img), dim=1)
        single = []
        for block, out in zip(self.single_blocks, self.controlnet_single_blocks, strict=True):
            x = self._run(block, x, vec, rope)
            single.append(out(x[:, txt.shape[1] :]) * scale)
        return double, single

    def _mode_tensor(self, mode, batch: int, device) -> torch.Tensor:
        n = self.config.num_modes
        if mode is None:
            raise ValueError(
                f"this FLUX.1 ControlNet is a union net ({n} control modes): pass `mode` (an int, e.g. {UNION_MODES})"
            )
        mode = torch.as_tensor(mode, device=device, dtype=torch.long).reshape(-1)
        if mode.numel() not in (1, batch) or bool((mode < 0).any()) or bool((mode >= n).any()):
            raise ValueError(f"mode={mode.tolist()} is not accepted: one or {batch} integers in [0, {n})")
        return mode.expand(batch)

    def _run(self, block: nn.Module, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)


__all__ = ["UNION_MODES", "Flux1ControlNet", "Flux1ControlNetConfig"]
