"""On CUDA: GGUF blocks dequantize there as on the CPU, a packed GGUF Linear runs there, and the host arena's pinned
blocks hold little more than the units they carry (torch's caching host allocator rounds each pinned allocation up
to a power of two; `vram/arena.py`). Sizes are printed (`pytest -s -m gpu`) for the record."""

from __future__ import annotations

import pytest
import torch

from diffsynth.runtime.gguf import FORMATS, GGUFLinear, dequantize
from diffsynth.runtime.vram.arena import HostArena

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
MB = 1 << 20


def random_blocks(qtype: str, blocks: int, seed: int) -> torch.Tensor:
    """Random packed blocks with every fp16 scale field a small finite value (the block layouts keep them at
    fixed byte offsets; random bytes there could be inf / NaN)."""
    fmt = FORMATS[qtype]
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (blocks, fmt.nbytes), generator=g, dtype=torch.uint8)
    scale = torch.full((blocks, 1), 0.01, dtype=torch.float16).view(torch.uint8)
    offsets = {"Q6_K": [208], "Q3_K": [108], "Q2_K": [80, 82]}.get(qtype, [0, 2] if qtype[-1] in "1K" else [0])
    for offset in offsets:
        data[:, offset : offset + 2] = scale
    return data


@pytest.mark.parametrize("qtype", sorted(FORMATS))
def test_gguf_blocks_dequantize_on_cuda_as_on_the_cpu(qtype):
    packed = random_blocks(qtype, 64, seed=1)
    shape = (4, 16 * FORMATS[qtype].values)
    want = dequantize(packed, qtype, shape)
    got = dequantize(packed.cuda(), qtype, shape)
    assert torch.equal(got.cpu(), want), qtype
    assert torch.equal(dequantize(packed.cuda(), qtype, shape, torch.bfloat16).cpu(), want.to(torch.bfloat16))


def test_a_packed_gguf_linear_runs_on_cuda():
    layer = GGUFLinear(256, 8, bias=True, qtype="Q4_K")
    with torch.no_grad():
        layer.weight.copy_(random_blocks("Q4_K", 8, seed=2).reshape(layer.weight.shape))
        layer.bias.normal_()
    x = torch.randn(3, 256)
    want = torch.nn.functional.linear(x, layer.dequantized_weight(), layer.bias)
    got = layer.cuda()(x.cuda())
    assert (got.cpu() - want).abs().max().item() < 1e-4


def test_pinned_arena_holds_little_more_than_its_units():
    stats = getattr(torch.cuda, "host_memory_stats", None)
    if stats is None or "reserved_bytes.all.current" not in stats():
        pytest.skip("this torch reports no pinned host memory statistics")
    sizes = [34 * MB] * 19 + [17 * MB] * 38  # FLUX.1's block sizes scaled down by 10
    reserved = stats()["reserved_bytes.all.current"]
    arena = HostArena(sizes, pin=True)
    assert all(block.is_pinned() for block in arena.blocks)
    arena_bytes = stats()["reserved_bytes.all.current"] - reserved
    per_unit = [torch.empty(s, dtype=torch.uint8, pin_memory=True) for s in sizes]
    unit_bytes = stats()["reserved_bytes.all.current"] - reserved - arena_bytes
    total = sum(sizes)
    print(
        f"units {total / MB:.0f} MB: arena {arena_bytes / MB:.0f} MB, one pinned buffer each {unit_bytes / MB:.0f} MB"
    )
    assert arena_bytes <= 1.05 * total
    del per_unit
