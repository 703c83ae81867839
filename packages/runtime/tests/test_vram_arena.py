"""The host arena: offloaded units' stores carved from a few power-of-two blocks (torch rounds each pinned
allocation up to a power of two), laid out without overlap, and the VRAM manager's stores living in it."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from diffsynth.runtime.vram import enable_vram_management
from diffsynth.runtime.vram.arena import GRAIN, HostArena, plan_blocks

MB = 1 << 20


def pow2_ceil(n: int) -> int:
    return 1 << (n - 1).bit_length()


def check_layout(sizes: list[int]) -> list[int]:
    blocks, placements = plan_blocks(sizes)
    assert all(b >= GRAIN and b & (b - 1) == 0 for b in blocks)  # powers of two: nothing lost to rounding
    spans: dict[int, list[tuple[int, int]]] = {}
    for size, place in zip(sizes, placements, strict=True):
        assert 0 <= place.offset and place.offset + size <= blocks[place.block]
        spans.setdefault(place.block, []).append((place.offset, place.offset + size))
    for ranges in spans.values():
        ranges.sort()
        assert all(end <= start for (_, end), (start, _) in zip(ranges, ranges[1:], strict=False))
    assert len(spans) == len(blocks)  # no empty block is allocated
    return blocks


@pytest.mark.parametrize(
    ("name", "sizes", "bound"),
    [
        ("FLUX.1 blocks", [340 * MB] * 19 + [170 * MB] * 38, 1.02),
        ("Wan 14B blocks", [350 * MB] * 40, 1.10),
        ("Qwen-Image blocks", [340 * MB] * 60, 1.03),
        ("Z-Image blocks", [200 * MB] * 30, 1.07),
    ],
)
def test_a_transformers_blocks_take_little_more_than_their_size(name, sizes, bound):
    blocks = check_layout(sizes)
    total = sum(sizes)
    assert sum(blocks) <= bound * total, name
    assert sum(pow2_ceil(s) for s in sizes) >= 1.28 * total  # what one pinned buffer per unit would take


def test_random_sizes_never_overlap():
    rng = random.Random(0)
    for _ in range(50):
        sizes = [rng.randint(1, 64 * MB) for _ in range(rng.randint(1, 40))]
        blocks = check_layout(sizes)
        assert sum(blocks) <= 2 * (sum(sizes) + GRAIN * len(blocks))


def test_arena_buffers_are_separate_views_of_exact_size():
    sizes = [3 * MB + 17, 5, 2 * MB, 700_000]
    arena = HostArena(sizes, pin=False)
    buffers = [arena.buffer(i) for i in range(len(sizes))]
    assert [b.numel() for b in buffers] == sizes and all(b.dtype == torch.uint8 for b in buffers)
    for i, b in enumerate(buffers):
        b.fill_(i + 1)
    assert all(bool((b == i + 1).all()) for i, b in enumerate(buffers))  # no buffer wrote over another
    assert arena.nbytes == sum(block.numel() for block in arena.blocks) < 2 * sum(sizes) + GRAIN


class Stack(nn.Module):
    offload_units = ("blocks",)

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(64, 64) for _ in range(6)])

    def forward(self, x):
        for block in self.blocks:
            x = torch.tanh(block(x))
        return x


def test_offloaded_units_live_in_the_arena_and_compute_as_before():
    torch.manual_seed(0)
    model = Stack().requires_grad_(False)  # frozen weights are what the manager offloads
    x = torch.randn(3, 64)
    want = model(x)
    handle = enable_vram_management(model, {"offload_device": "cpu", "onload_device": "cpu"}, device="cpu")
    stores = [u.offload for u in handle.units if u.targets]
    assert len(stores) == 6
    bases = {s.buffer.untyped_storage().data_ptr() for s in stores}
    assert len(bases) < len(stores)  # carved from shared blocks, not one allocation each
    with torch.no_grad():
        assert torch.equal(model(x), want)
