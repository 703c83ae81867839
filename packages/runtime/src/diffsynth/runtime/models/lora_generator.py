"""The LoRA generator of DiffSynth-Studio's image-to-LoRA ("i2L") models, shared by the families that have one.

An i2L model turns one image feature vector `x` (SigLIP2-G384 + DINOv3-7B, 5632 wide) into a LoRA for a DiT in
one forward pass. For every target Linear of every DiT block there is a head of two narrow MLPs (`proj_a` for
the down matrix, `proj_b` for the up matrix): `x -> compress_dim -> rank * features`, no biases. Optionally
each block also reads a token-level feature (Qwen-Image-i2L Coarse and Fine: the Qwen2.5-VL hidden states of
the image) through its `proj_residual` MLP, whose `compress_dim` output is added inside both heads.

The generator's blocks are laid out target-group-major, as the released files are: for each group of target
Linears (e.g. a DiT block's image-stream attention), one block per DiT block. The key names are the released
ones: `blocks.{i}.layers.{j}.proj_a.proj_in.weight`, `blocks.{i}.proj_residual.proj_out.weight`, ...

The output covers all images at once: `x` is `[N, features]` and each target's LoRA has rank `N * rank`, the
images' down matrices stacked on the rank dimension (and their up matrices side by side), image by image. That
is the rank-concatenating merge DiffSynth-Studio applies after making one LoRA per image; the pipeline then
scales the down matrices by 1/N (`diffsynth.runtime.image_to_lora`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn


class TargetLinear(NamedTuple):
    """One Linear of the DiT a LoRA is made for: its name inside a block and its shape."""

    name: str
    in_features: int
    out_features: int


class NarrowMLP(nn.Module):
    """`x -> width -> out` without activation or bias; `extra` is added in the narrow width."""

    def __init__(self, in_features: int, width: int, out_features: int):
        super().__init__()
        self.proj_in = nn.Linear(in_features, width, bias=False)
        self.proj_out = nn.Linear(width, out_features, bias=False)

    def forward(self, x: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        h = self.proj_in(x)
        return self.proj_out(h if extra is None else h + extra)


class LoRAHead(nn.Module):
    """The LoRA of one target Linear: down `[rank, in]` from `proj_a`, up `[out, rank]` from `proj_b`."""

    def __init__(self, target: TargetLinear, features: int, width: int, rank: int):
        super().__init__()
        self.target, self.rank = target, rank
        self.proj_a = NarrowMLP(features, width, rank * target.in_features)
        self.proj_b = NarrowMLP(features, width, rank * target.out_features)

    def forward(self, x: torch.Tensor, extra: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """For `x` `[N, features]`: down `[N * rank, in]` and up `[out, N * rank]`, image by image."""
        n, (_, fan_in, fan_out) = x.shape[0], self.target
        down = self.proj_a(x, extra).reshape(n * self.rank, fan_in)
        up = self.proj_b(x, extra).reshape(n, fan_out, self.rank).permute(1, 0, 2).reshape(fan_out, n * self.rank)
        return down, up


class TokenMLP(nn.Module):
    """A fixed-length token sequence `[N, length, dim]` to one narrow vector `[N, out]`: each token through
    `proj_in`, then all of them, flattened, through `proj_out` (no activation, no bias)."""

    def __init__(self, length: int, dim: int, width: int, out_features: int):
        super().__init__()
        self.length = length
        self.proj_in = nn.Linear(dim, width, bias=False)
        self.proj_out = nn.Linear(length * width, out_features, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.proj_out(self.proj_in(tokens).flatten(1))


class LoRABlock(nn.Module):
    """The heads of one group of targets in one DiT block, and the block's residual reader (or None)."""

    def __init__(self, targets: Sequence[TargetLinear], features: int, width: int, rank: int, residual: tuple | None):
        super().__init__()
        self.layers = nn.ModuleList(LoRAHead(t, features, width, rank) for t in targets)
        self.proj_residual = None if residual is None else TokenMLP(*residual, width)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        extra = None if self.proj_residual is None else self.proj_residual(residual)
        return [head(x, extra) for head in self.layers]


class LoRAGenerator(nn.Module):
    """LoRAs for the blocks `{prefix}.0 .. {prefix}.{num_blocks - 1}` of a DiT from image features.

    `groups` are the target groups (each a sequence of `TargetLinear`, names relative to a DiT block);
    `residual` is `(length, dim, width)` of the token feature each block reads, or None. The token feature is
    scaled by `residual_scale` before the blocks read it (0.05 in the released models).
    """

    def __init__(
        self,
        prefix: str,
        groups: Sequence[Sequence[TargetLinear]],
        num_blocks: int,
        features: int,
        width: int,
        rank: int,
        residual: tuple[int, int, int] | None = None,
        residual_scale: float = 0.05,
    ):
        super().__init__()
        self.prefix, self.num_blocks, self.residual_scale = prefix, num_blocks, residual_scale
        self.residual = None if residual is None else tuple(residual)
        self.groups = [tuple(TargetLinear(*t) for t in group) for group in groups]
        self.blocks = nn.ModuleList(
            LoRABlock(group, features, width, rank, residual) for group in self.groups for _ in range(num_blocks)
        )

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """`{"<prefix>.<block>.<target>.lora_A.weight": down, "...lora_B.weight": up}` for image features `x`
        `[N, features]` (or one `[features]`) and, for generators that read one, `residual` `[N, length, dim]`
        (or flattened, `[N, length * dim]`); a generator without a residual reader ignores `residual`."""
        x = x.reshape(-1, x.shape[-1])
        if self.residual is None:
            residual = None
        elif residual is None:
            raise ValueError("this LoRA generator reads a token feature: give residual [N, length, dim]")
        else:
            length, dim, _ = self.residual
            residual = residual.reshape(x.shape[0], length, dim) * self.residual_scale
        lora = {}
        for index, block in enumerate(self.blocks):
            group = self.groups[index // self.num_blocks]
            name = f"{self.prefix}.{index % self.num_blocks}"
            for target, (down, up) in zip(group, block(x, residual), strict=True):
                lora[f"{name}.{target.name}.lora_A.weight"] = down
                lora[f"{name}.{target.name}.lora_B.weight"] = up
        return lora


def merge_loras(loras: Sequence[dict[str, torch.Tensor]], down_scale: float = 1.0) -> dict[str, torch.Tensor]:
    """LoRAs of the same targets as one: ranks concatenated in order (downs stacked, ups side by side), every
    down matrix times `down_scale`. The sum of the parts' deltas, times `down_scale`."""
    if not loras:
        raise ValueError("merge_loras needs at least one LoRA")
    keys = list(loras[0])
    for i, lora in enumerate(loras[1:], 1):
        if set(lora) != set(keys):
            missing, extra = sorted(set(keys) - set(lora)), sorted(set(lora) - set(keys))
            raise ValueError(f"LoRA {i} has other targets than LoRA 0: missing {missing[:3]}, extra {extra[:3]}")
    merged = {}
    for key in keys:
        parts = [lora[key] for lora in loras]
        if ".lora_A." in key:
            merged[key] = torch.cat(parts, dim=0) * down_scale if down_scale != 1.0 else torch.cat(parts, dim=0)
        else:
            merged[key] = torch.cat(parts, dim=1)
    return merged


__all__ = ["LoRABlock", "LoRAGenerator", "LoRAHead", "NarrowMLP", "TargetLinear", "TokenMLP", "merge_loras"]
