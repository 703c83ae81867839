"""BFL names <-> diffusers names for the FLUX DiTs (FLUX.1 and FLUX.2, and the FLUX.1 ControlNet's blocks).

Both generations keep BFL's fused layers where diffusers splits them, so one converter serves both,
driven by a family's tables: plain renames, fused tensors (diffusers parts stacked along dim 0 make
ours) and tensors whose two halves are stored the other way round ((scale, shift) in diffusers,
(shift, scale) in BFL). Keys of repeated blocks are handled as templates with `{}` for the block index.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

_BLOCK_KEY = re.compile(r"^(double_blocks|single_blocks|transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")

# (our fused template, block index, the fused tensor, the whole state) -> sizes of its parts along dim 0
SplitSizes = Callable[[str, list[int], torch.Tensor, Mapping[str, torch.Tensor]], list[int]]


def template(key: str) -> tuple[str, list[int]]:
    """`double_blocks.3.img_attn.qkv.weight` -> (`double_blocks.{}.img_attn.qkv.weight`, [3])."""
    m = _BLOCK_KEY.match(key)
    if m is None:
        return key, []
    return f"{m.group(1)}.{{}}.{m.group(3)}", [int(m.group(2))]


def count_blocks(state: Mapping, template: str) -> int:
    """How many blocks `template` (`{}` = index) finds in `state`, counting from 0 until one is missing."""
    n = 0
    while template.format(n) in state:
        n += 1
    return n


def cat_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    """`torch.cat(parts, 0)`, building only the shape for meta tensors (concatenating them is slow)."""
    if any(p.is_meta for p in parts):
        rows = sum(p.shape[0] for p in parts)
        return torch.empty(rows, *parts[0].shape[1:], dtype=parts[0].dtype, device="meta")
    return torch.cat(parts, dim=0)


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return cat_rows([b, a])


@dataclass(frozen=True)
class DiffusersKeyTables:
    """How one BFL-named model maps to diffusers names.

    `renames`: diffusers template -> ours; `fused`: our template -> the diffusers templates stacked to
    make it; `swapped`: diffusers key -> ours, halves swapped; `split(template, index, value, state)`
    gives the part sizes of one of our fused tensors (default: equal parts).
    """

    model: str
    renames: Mapping[str, str]
    fused: Mapping[str, tuple[str, ...]]
    swapped: Mapping[str, str]
    split: SplitSizes | None = None
    _parts: dict[str, tuple[str, int]] = field(init=False, repr=False, compare=False)
    _back: dict[str, str] = field(init=False, repr=False, compare=False)
    _swapped_back: dict[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        parts = {part: (ours, i) for ours, names in self.fused.items() for i, part in enumerate(names)}
        object.__setattr__(self, "_parts", parts)
        object.__setattr__(self, "_back", {v: k for k, v in self.renames.items()})
        object.__setattr__(self, "_swapped_back", {v: k for k, v in self.swapped.items()})

    def to_ours(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A diffusers state dict in our (BFL) names.

        Raises `KeyError` naming the first key without a mapping, or a fused tensor missing a part.
        """
        out: dict[str, torch.Tensor] = {}
        pending: dict[str, dict[int, torch.Tensor]] = {}
        for key, value in state.items():
            name, index = template(key)
            if name in self.renames:
                out[self.renames[name].format(*index)] = value
            elif name in self._parts:
                target, position = self._parts[name]
                pending.setdefault(target.format(*index), {})[position] = value
            elif key in self.swapped:
                out[self.swapped[key]] = swap_halves(value)
            else:
                raise KeyError(f"{self.model} (diffusers layout): no mapping for key {key!r}")
        for target, parts in pending.items():
            name, index = template(target)
            names = self.fused[name]
            missing = [names[i].format(*index) for i in range(len(names)) if i not in parts]
            if missing:
                raise KeyError(f"{self.model} (diffusers layout): {target!r} needs {missing} as well")
            out[target] = cat_rows([parts[i] for i in range(len(names))])
        return out

    def to_diffusers(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Our (BFL) names -> diffusers names; the inverse of `to_ours`."""
        out: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            name, index = template(key)
            if name in self._back:
                out[self._back[name].format(*index)] = value
            elif name in self.fused:
                names = self.fused[name]
                sizes = (
                    self.split(name, index, value, state) if self.split else [value.shape[0] // len(names)] * len(names)
                )
                for part_name, part in zip(names, value.split(sizes, dim=0), strict=True):
                    out[part_name.format(*index)] = part
            elif key in self._swapped_back:
                out[self._swapped_back[key]] = swap_halves(value)
            else:
                raise KeyError(f"{self.model}: no diffusers name for key {key!r}")
        return out
