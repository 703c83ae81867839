"""Host memory for all of a model's offloaded units in a few blocks whose sizes are powers of two.

torch's pinned allocations go through its caching host allocator, which rounds every request up to the next power
of two: one pinned buffer per unit (a 340 MB FLUX block takes 512 MB) holds up to twice the model in host memory.
Blocks of exactly a power of two lose nothing to that rounding, so the units are laid out in such blocks ahead of
allocation (first fit, largest units first) and each unit's buffer is a view of its block. What is left unused is
the tail of the blocks, a small part of the total for a transformer's many equal blocks (see `plan_blocks`).
Pinned or not, the layout is the same; unpinned (CPU computation) it only groups allocations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

GRAIN = 1 << 20  # the smallest block (1 MiB), and what the planned total is rounded up to
ALIGN = 512  # bytes between units inside a block


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _pow2_ceil(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@dataclass(frozen=True)
class Placement:
    block: int
    offset: int


def plan_blocks(sizes: Sequence[int]) -> tuple[list[int], list[Placement]]:
    """(block sizes, each unit's placement) for units of `sizes` bytes: every block a power of two of at least
    `GRAIN`, no two units overlapping, each unit inside one block.

    The blocks are the binary digits of the total (rounded up to `GRAIN`), largest first; units go largest first
    into the first block with room; a unit that fits nowhere gets a block of its own size's power of two. Blocks
    are then shrunk to the power of two of what they hold."""
    aligned = [_aligned(max(int(s), 1)) for s in sizes]
    total = -(-sum(aligned) // GRAIN) * GRAIN
    blocks = [1 << bit for bit in range(total.bit_length() - 1, -1, -1) if total >> bit & 1 and 1 << bit >= GRAIN]
    used = [0] * len(blocks)
    placements: list[Placement | None] = [None] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda k: -aligned[k]):
        k = next((b for b, size in enumerate(blocks) if size - used[b] >= aligned[i]), None)
        if k is None:
            blocks.append(max(GRAIN, _pow2_ceil(aligned[i])))
            used.append(0)
            k = len(blocks) - 1
        placements[i] = Placement(k, used[k])
        used[k] += aligned[i]
    kept = [b for b in range(len(blocks)) if used[b] > 0]
    renumber = {b: n for n, b in enumerate(kept)}
    sizes_out = [max(GRAIN, _pow2_ceil(used[b])) for b in kept]
    return sizes_out, [Placement(renumber[p.block], p.offset) for p in placements]


class HostArena:
    """The host buffers of units of known sizes, carved from `plan_blocks`' blocks (allocated here, pinned when
    `pin`). `buffer(i)` is unit i's flat uint8 buffer of exactly `sizes[i]` bytes."""

    def __init__(self, sizes: Sequence[int], *, pin: bool):
        self.sizes = [int(s) for s in sizes]
        block_sizes, self.placements = plan_blocks(self.sizes)
        self.blocks = [torch.empty(n, dtype=torch.uint8, pin_memory=pin) for n in block_sizes]

    @property
    def nbytes(self) -> int:
        """The bytes allocated (the blocks)."""
        return sum(b.numel() for b in self.blocks)

    def buffer(self, i: int) -> torch.Tensor:
        place = self.placements[i]
        return self.blocks[place.block][place.offset : place.offset + self.sizes[i]]


__all__ = ["HostArena", "Placement", "plan_blocks"]
