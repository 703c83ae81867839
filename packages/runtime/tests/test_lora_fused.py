"""`lora_fused`: the parts of a fused Linear merged into one exact LoRA and split back (shared by FLUX and Z-Image)."""

from __future__ import annotations

import pytest
import torch

from diffsynth.runtime.errors import LoRAError
from diffsynth.runtime.lora import LoRATarget
from diffsynth.runtime.lora_fused import FusedPart, merge_parts, split_fused

ROWS, WIDTH = 6, 5
PARTS = {"q": FusedPart(0, ROWS), "k": FusedPart(ROWS, ROWS), "v": FusedPart(2 * ROWS, ROWS)}


def _parts(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "q": LoRATarget(down=torch.randn(2, WIDTH, generator=g), up=torch.randn(ROWS, 2, generator=g), alpha=4.0),
        "v": LoRATarget(down=torch.randn(3, WIDTH, generator=g), up=torch.randn(ROWS, 3, generator=g), alpha=1.0),
    }


def test_merge_equals_the_parts_deltas_stacked_and_split_returns_them():
    parts = _parts()
    merged = merge_parts(3 * ROWS, WIDTH, "qkv", [(PARTS[n], t, n) for n, t in parts.items()], "test", "model")
    want = torch.zeros(3 * ROWS, WIDTH)
    for name, t in parts.items():
        want[PARTS[name].start : PARTS[name].start + ROWS] = t.delta_weight()
    assert merged.rank == 5
    assert float((merged.delta_weight() - want).abs().max()) < 1e-6
    back = split_fused(merged, "qkv.lora_A.weight", "qkv", PARTS, "test")
    assert set(back) == {"q", "v"}  # k: no change, left out
    for name, t in parts.items():
        assert back[name].rank == t.rank
        assert torch.equal(back[name].down, t.down)
        assert float((back[name].delta_weight() - t.delta_weight()).abs().max()) < 1e-6


def test_diff_and_row_norms_go_on_their_rows():
    g = torch.Generator().manual_seed(1)
    k = LoRATarget(diff=torch.randn(ROWS, WIDTH, generator=g), magnitude=torch.rand(ROWS, 1, generator=g))
    merged = merge_parts(3 * ROWS, WIDTH, "qkv", [(PARTS["k"], k, "k")], "test", "model")
    assert torch.equal(merged.diff[ROWS : 2 * ROWS], k.diff) and not merged.diff[:ROWS].any()
    assert torch.isnan(merged.magnitude[:ROWS]).all() and torch.equal(merged.magnitude[ROWS : 2 * ROWS], k.magnitude)
    back = split_fused(merged, "qkv.diff", "qkv", PARTS, "test")
    assert set(back) == {"k"} and torch.equal(back["k"].diff, k.diff) and torch.equal(back["k"].magnitude, k.magnitude)


def test_errors_name_the_keys():
    parts = _parts()
    overlapping = [(FusedPart(0, ROWS), parts["q"], "first"), (FusedPart(ROWS - 1, ROWS), parts["v"], "second")]
    with pytest.raises(LoRAError, match="'first' and 'second' both change rows of 'qkv'"):
        merge_parts(3 * ROWS, WIDTH, "qkv", overlapping, "test", "model")
    with pytest.raises(
        LoRAError, match=r"'q' has down \(2, 5\) / up \(6, 2\) but lands on rows 0:6 of 'qkv'.*\[6, 4\]"
    ):
        merge_parts(3 * ROWS, WIDTH - 1, "qkv", [(PARTS["q"], parts["q"], "q")], "test", "model")
    columns = LoRATarget(down=torch.ones(1, WIDTH), up=torch.ones(3 * ROWS, 1), magnitude=torch.ones(1, WIDTH))
    with pytest.raises(LoRAError, match="'qkv.lora_A' is a DoRA with column norms on the fused layer 'qkv'"):
        split_fused(columns, "qkv.lora_A", "qkv", PARTS, "test")
