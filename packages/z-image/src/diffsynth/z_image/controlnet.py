"""Z-Image-Turbo Fun ControlNet Union (alibaba-pai / PAI, VideoX-Fun): 1.0, 2.0, 2.1 and 2.1-lite.

A VACE-style side branch of the Z-Image DiT. The control image (VAE latents; for the 2.x nets also an
inpainting mask and the latents of the masked image: 16 + 1 + 16 channels) is patchified like the
latents and embedded (`control_all_x_embedder`) into a stream `c` that runs through copies of the DiT
block (`ControlBlock`: the block plus an `after_proj`, and a `before_proj` on the first, which adds the
DiT's tokens to `c`; the authors zero-initialise both to train). Each control block's `after_proj(c)` is a hint, added (times the
control scale) to the DiT's tokens after the DiT layer it belongs to (`control_layers_places`).

The versions differ in the refiner stage, before the DiT's main layers (`add_control_noise_refiner`,
diffusers' name and values):
- None (1.0): `control_noise_refiner` refines `c` alone (plain modulated blocks); no hints there.
- "control_noise_refiner" (2.1): `control_noise_refiner` control blocks run on `c` and the DiT's
  embedded image tokens; their hints are added after the DiT's noise-refiner layers
  (`control_refiner_layers_places`).
- "control_layers" (2.0): as 2.1, but the refiner stage runs the main `control_layers` (the authors'
  first attempt; the file's `control_noise_refiner` weights are untrained and unused).
2.0 and 2.1 files have the same keys and shapes; like diffusers and ComfyUI we tell them apart by the
values: a loaded 2.x net whose first refiner projection is all zeros is a 2.0 net (`_detect_2_0`).

Hints of the refiner stage are added to the DiT's own tokens, as the authors' model (VideoX-Fun
`ZImageControlTransformer2DModel`) and DiffSynth-Studio do. (diffusers 0.42 adds them only to the
ControlNet's private copy of the DiT's tokens, so its DiT output differs for the 2.x nets.)

Module names equal the official files (`control_layers.N.*`, `control_all_x_embedder.2-1.*`,
`control_noise_refiner.N.*`), which diffusers' `ZImageControlNetModel` also uses.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .dit import BlockSizes, ZImageBlock, ZImageDiT

logger = logging.getLogger(__name__)

REFINER_MODES = ("control_noise_refiner", "control_layers", None)
# VideoX-Fun config/z_image/*.yaml: control layer count -> the DiT layers (of 30) its hints follow
RELEASED_PLACES = {
    15: tuple(range(0, 30, 2)),  # 2.0, 2.1 (z_image_control_2.0.yaml, _2.1.yaml)
    6: tuple(range(0, 30, 5)),  # 1.0 (z_image_control.yaml)
    3: tuple(range(0, 30, 10)),  # 2.1-lite (z_image_control_2.1_lite.yaml)
}


@dataclass
class ZImageControlNetConfig(BlockSizes):
    """Architecture of a Z-Image Fun ControlNet; defaults are the released Union 2.1 file."""

    control_layers_places: tuple[int, ...] = RELEASED_PLACES[15]
    control_refiner_layers_places: tuple[int, ...] = (0, 1)
    control_in_dim: int = 33
    add_control_noise_refiner: str | None = "control_noise_refiner"
    n_refiner_layers: int = 2  # blocks in `control_noise_refiner` (0 in diffusers-saved 2.0 nets)
    patch_size: int = 2
    f_patch_size: int = 1
    dim: int = 3840
    n_heads: int = 30
    norm_eps: float = 1e-5
    qk_norm: bool = True

    def __post_init__(self):
        self.control_layers_places = tuple(int(p) for p in self.control_layers_places)
        self.control_refiner_layers_places = tuple(int(p) for p in self.control_refiner_layers_places)
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"ZImageControlNetConfig.{f.name}={value!r} must be a non-negative integer")
        for name in ("control_in_dim", "patch_size", "f_patch_size", "dim", "n_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"ZImageControlNetConfig.{name}={getattr(self, name)!r} must be at least 1")
        if self.dim % self.n_heads:
            raise ValueError(f"ZImageControlNetConfig.dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.norm_eps <= 0:
            raise ValueError(f"ZImageControlNetConfig.norm_eps={self.norm_eps!r} must be positive")
        places = self.control_layers_places
        if not places or places[0] != 0 or list(places) != sorted(set(places)):
            raise ValueError(
                f"ZImageControlNetConfig.control_layers_places={places} must be increasing and start at 0 "
                "(the first control block takes the DiT's tokens)"
            )
        mode, refiner = self.add_control_noise_refiner, self.control_refiner_layers_places
        if mode not in REFINER_MODES:
            raise ValueError(
                f"ZImageControlNetConfig.add_control_noise_refiner={mode!r} must be one of {REFINER_MODES}"
            )
        if list(refiner) != sorted(set(refiner)) or (refiner and refiner[0] < 0):
            raise ValueError(
                f"ZImageControlNetConfig.control_refiner_layers_places={refiner} must be increasing, from 0 up"
            )
        hints = {None: 0, "control_noise_refiner": self.n_refiner_layers, "control_layers": len(places)}[mode]
        if len(refiner) > hints:
            raise ValueError(
                f"ZImageControlNetConfig.control_refiner_layers_places={refiner} needs {len(refiner)} refiner "
                f"hints but add_control_noise_refiner={mode!r} with n_refiner_layers={self.n_refiner_layers} "
                f"gives {hints}"
            )

    @property
    def patch_dim(self) -> int:
        return self.f_patch_size * self.patch_size**2 * self.control_in_dim


class ControlBlock(ZImageBlock):
    """A modulated DiT block on the control stream `c`; returns `(c, hint)` with `hint = after_proj(c)`.

    The first block of a stack first adds the DiT's tokens: `c = before_proj(c) + x`.
    """

    def __init__(self, config: ZImageControlNetConfig, first: bool):
        super().__init__(config, modulation=True)
        self.before_proj = nn.Linear(config.dim, config.dim) if first else None
        self.after_proj = nn.Linear(config.dim, config.dim)

    def forward(self, c, x, rope, mask, adaln) -> tuple[torch.Tensor, torch.Tensor]:
        if self.before_proj is not None:
            c = self.before_proj(c) + x
        c = super().forward(c, rope, mask, adaln)
        return c, self.after_proj(c)


class ZImageControlNet(nn.Module):
    """The control branch; the DiT drives it (`ZImageDiT.forward(..., controls=[ZImageControl(...)])`).

    `forward` is its first part, called once per DiT call: embed the control patches and run the
    refiner stage (see `forward`). The main control blocks then run one by one, each right after the
    DiT layer it belongs to (`ControlRun`), so that a step the first-block cache skips skips them too.
    """

    offload_units = ("control_layers", "control_noise_refiner")
    compile_units = ("control_layers", "control_noise_refiner")
    lora_target_modules = ZImageDiT.lora_target_modules

    def __init__(self, config: ZImageControlNetConfig | None = None):
        super().__init__()
        self.config = config = config if config is not None else ZImageControlNetConfig()
        self.gradient_checkpointing = False
        n = len(config.control_layers_places)
        self.control_layers = nn.ModuleList(ControlBlock(config, first=k == 0) for k in range(n))
        self.control_all_x_embedder = nn.ModuleDict({config.patch_key: nn.Linear(config.patch_dim, config.dim)})
        if config.add_control_noise_refiner is None:
            refiner = (ZImageBlock(config, modulation=True) for _ in range(config.n_refiner_layers))
        else:
            refiner = (ControlBlock(config, first=k == 0) for k in range(config.n_refiner_layers))
        self.control_noise_refiner = nn.ModuleList(refiner)
        self.register_load_state_dict_post_hook(_detect_2_0)

    @property
    def takes_inpaint(self) -> bool:
        """Whether the condition also holds an inpainting mask and masked-image latents (2.x: 33 channels)."""
        return self.config.add_control_noise_refiner is not None

    def check_fits(self, dit_config) -> None:
        """ValueError unless this net can drive a DiT with config `dit_config` (widths, patch, layer places)."""
        cfg = self.config
        for name in ("dim", "n_heads", "patch_size", "f_patch_size"):
            if getattr(cfg, name) != getattr(dit_config, name):
                raise ValueError(
                    f"this ControlNet has {name}={getattr(cfg, name)} but the DiT has {getattr(dit_config, name)}"
                )
        if cfg.control_layers_places[-1] >= dit_config.n_layers:
            raise ValueError(
                f"this ControlNet adds hints after DiT layers {cfg.control_layers_places} but the DiT has "
                f"{dit_config.n_layers} layers"
            )
        refiner = cfg.control_refiner_layers_places if cfg.add_control_noise_refiner is not None else ()
        if refiner and refiner[-1] >= dit_config.n_refiner_layers:
            raise ValueError(
                f"this ControlNet adds hints after noise-refiner layers {refiner} but the DiT has "
                f"{dit_config.n_refiner_layers}"
            )

    def run_block(self, block: nn.Module, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(
        self, patches: torch.Tensor, img: torch.Tensor, rope, adaln: torch.Tensor, pad_token: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The control stream after the refiner stage, and that stage's hints (unscaled, one per refiner block).

        `patches` `[B, N, patch_dim]` are the control latents patchified like the DiT's; `img` `[B, S, dim]`
        the DiT's embedded image tokens before its noise refiner (`S` >= `N`: the DiT's padding, which the
        control stream fills with the DiT's `pad_token` too); `rope` and `adaln` the DiT's for those tokens.
        """
        c = self.control_all_x_embedder[self.config.patch_key](patches)
        if img.shape[1] > c.shape[1]:
            c = torch.cat([c, pad_token.expand(c.shape[0], img.shape[1] - c.shape[1], -1)], dim=1)
        mode = self.config.add_control_noise_refiner
        if mode is None:
            for block in self.control_noise_refiner:
                c = self.run_block(block, c, rope, None, adaln)
            return c, []
        hints = []
        for block in self.control_noise_refiner if mode == "control_noise_refiner" else self.control_layers:
            c, hint = self.run_block(block, c, img, rope, None, adaln)
            hints.append(hint)
        return c, hints


def _detect_2_0(net: ZImageControlNet, incompatible_keys) -> None:
    """After a load: a 2.x net whose refiner projections are all zero is a 2.0 file (same keys as 2.1)."""
    if net.config.add_control_noise_refiner != "control_noise_refiner" or not len(net.control_noise_refiner):
        return
    first = net.control_noise_refiner[0]
    weights = (first.before_proj.weight, first.after_proj.weight)
    if any(w.is_meta for w in weights) or all(bool(torch.count_nonzero(w)) for w in weights):
        return
    logger.info("ControlNet refiner projections are zero: a Union 2.0 file, its refiner stage runs control_layers")
    net.config.add_control_noise_refiner = "control_layers"


@dataclass
class ZImageControl:
    """One control for a DiT call: the net, its condition latents `[B or 1, control_in_dim, (F,) H, W]`
    (the size of the DiT's latents) and the scale of its hints."""

    net: ZImageControlNet
    latents: torch.Tensor
    scale: float = 1.0

    def start(self, patches, img, rope, adaln, pad_token) -> ControlRun:
        """The net's refiner stage (its `forward`, see there) and the run that follows the DiT's layers."""
        c, refiner_hints = self.net(patches, img, rope, adaln, pad_token)
        return ControlRun(self, c, refiner_hints)


class ControlRun:
    """One control through one DiT call: adds the refiner hints, then runs the control blocks as the DiT's
    layers pass their places (`begin_layers` once, then `after_layer` for each layer in order)."""

    def __init__(self, control: ZImageControl, c: torch.Tensor, refiner_hints: list[torch.Tensor]):
        self.net, self.scale, self.c = control.net, float(control.scale), c
        places = self.net.config.control_refiner_layers_places if refiner_hints else ()
        # one hint per refiner place (2.0's refiner stage makes one per control layer: the first ones are used)
        self.refiner_hints = {p: refiner_hints[i] for i, p in enumerate(places)}
        self.places = {p: k for k, p in enumerate(self.net.config.control_layers_places)}

    def after_refiner(self, layer: int, img: torch.Tensor) -> torch.Tensor:
        hint = self.refiner_hints.get(layer)
        return img if hint is None else img + self.scale * hint

    def begin_layers(self, cap: torch.Tensor, x: torch.Tensor, rope, mask, adaln, shards) -> None:
        """`cap` the DiT's refined captions; `x`, `rope`, `mask` its joint sequence (this rank's shard with
        `shards`) before the first main layer; `adaln` its time embedding."""
        c = torch.cat([self.c, cap], dim=1)
        self.c = shards.shard(c) if shards is not None else c
        self.x, self.rope, self.mask, self.adaln = x, rope, mask, adaln

    def after_layer(self, layer: int, seq: torch.Tensor) -> torch.Tensor:
        k = self.places.get(layer)
        if k is None:
            return seq
        self.c, hint = self.net.run_block(self.net.control_layers[k], self.c, self.x, self.rope, self.mask, self.adaln)
        self.x = None  # only the first control block reads the DiT's tokens
        return seq + self.scale * hint


__all__ = ["ControlBlock", "ControlRun", "ZImageControl", "ZImageControlNet", "ZImageControlNetConfig"]
