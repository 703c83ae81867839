"""fp8 storage: error bounds per tensor vs per channel, the auto choice, packing, and the fp8 matmul."""

from __future__ import annotations

import pytest
import torch

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.vram import quantize
from diffsynth.runtime.vram.fp8_matmul import SCALE_ATTR, install
from diffsynth.runtime.vram.storage import Packed, fp8_error_bound, layout

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def gaussian(rows=256, cols=512, seed=0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.02


def spread_rows(spread: float, rows=256, cols=512, seed=0) -> torch.Tensor:
    """Rows whose magnitudes span `spread` (log-uniform): what per-channel scales are for."""
    g = torch.Generator().manual_seed(seed)
    magnitude = torch.exp(torch.rand(rows, 1, generator=g) * torch.log(torch.tensor(spread))) / spread
    return torch.randn(rows, cols, generator=g) * magnitude


def rel_err(a: torch.Tensor, b: torch.Tensor, dim=None) -> torch.Tensor:
    if dim is None:
        return (a - b).norm() / b.norm()
    return (a - b).norm(dim=dim) / b.norm(dim=dim)


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_every_element_within_half_an_ulp(dtype, granularity):
    """|w - deq(q(w))| <= 2^-(m+1)|w| + half the smallest subnormal step of the scale (m: mantissa bits)."""
    w = spread_rows(64.0)
    q = quantize(w, dtype, granularity)
    err = (q.dequantize(torch.float32) - w).abs()
    assert bool((err <= fp8_error_bound(w, q) * (1 + 1e-6)).all())
    # the RMS relative error sits at the format's rounding: 2^-4/sqrt(3) ~ 0.036 (e4m3), 2^-3/sqrt(3) (e5m2)
    assert rel_err(q.dequantize(torch.float32), w) < {E4M3: 0.036, E5M2: 0.072}[dtype]


def test_per_channel_helps_only_where_rows_differ_by_orders_of_magnitude():
    # Gaussian weights: both granularities give the same ~2.6% error (fp8 is floating point)
    w = gaussian()
    by_tensor, by_channel = quantize(w, E4M3, "tensor"), quantize(w, E4M3, "channel")
    e_t, e_c = rel_err(by_tensor.dequantize(torch.float32), w), rel_err(by_channel.dequantize(torch.float32), w)
    assert abs(e_t - e_c) < 0.002 and e_t < 0.03
    assert not quantize(w, E4M3, "auto").per_channel
    # rows spanning 2^16: per-tensor scaling pushes the small rows into e4m3's subnormals
    w = spread_rows(65536.0)
    worst_t = rel_err(quantize(w, E4M3, "tensor").dequantize(torch.float32), w, dim=1).max()
    worst_c = rel_err(quantize(w, E4M3, "channel").dequantize(torch.float32), w, dim=1).max()
    assert worst_t > 0.2 and worst_c < 0.035
    auto = quantize(w, E4M3, "auto")
    assert auto.per_channel and torch.equal(auto.data, quantize(w, E4M3, "channel").data)
    assert not quantize(w, E5M2, "auto").per_channel  # e5m2's range covers 2^16 easily


def test_special_inputs():
    zeros = quantize(torch.zeros(4, 16), E4M3)
    assert torch.equal(zeros.dequantize(torch.float32), torch.zeros(4, 16)) and bool((zeros.scale == 1).all())
    already = gaussian().to(E4M3)
    kept = quantize(already, E4M3)
    assert kept.data is already and bool((kept.scale == 1).all())
    vector = quantize(torch.linspace(-3, 3, 7), E4M3)
    assert vector.scale.shape == (1,)
    with pytest.raises(ConfigError, match="needs an fp8 dtype"):
        quantize(gaussian(), torch.bfloat16)
    with pytest.raises(ConfigError, match="fp8_granularity='row'"):
        quantize(gaussian(), E4M3, "row")


def test_packing_roundtrip_mixed_dtypes():
    w, b, n = gaussian(32, 48), torch.randn(32), torch.randn(48)
    shapes, dtypes = [w.shape, b.shape, n.shape], [E4M3, torch.bfloat16, torch.float32]
    packed = Packed.pack([w, b, n], shapes, dtypes)
    slots, total = layout(shapes, dtypes)
    assert packed.nbytes == total and all(s.offset % 64 == 0 for s in slots)
    (wq, ws), (bq, bs), (nq, ns) = packed.views()
    assert wq.dtype == E4M3 and ws.shape == (32, 1) and bs is None and ns is None
    back = list(packed.values([torch.float32] * 3))
    torch.testing.assert_close(back[0], quantize(w, E4M3).dequantize(torch.float32), rtol=0, atol=0)
    assert torch.equal(back[1], b.to(torch.bfloat16).float()) and torch.equal(back[2], n)
    packed.update(2, torch.zeros(48))
    assert torch.equal(list(packed.values([torch.float32] * 3))[2], torch.zeros(48))
    with pytest.raises(ValueError, match="more tensors"):
        Packed.pack([w, b, n, n], shapes, dtypes)


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_fp8_matmul_linear(granularity):
    """`_scaled_mm` with the input quantised to e4m3: error ~ the rounding of both operands (< 2 x 2^-4)."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32).to(torch.bfloat16).requires_grad_(False)
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16, requires_grad=True)
    reference = linear(x)
    q = quantize(linear.weight, E4M3, granularity)
    dequantized = torch.nn.functional.linear(x, q.dequantize(torch.bfloat16), linear.bias)
    install(linear)
    linear._parameters["weight"] = q.data
    linear.__dict__[SCALE_ATTR] = (q.scale, q.per_channel)
    out = linear(x)
    assert out.dtype == torch.bfloat16 and out.shape == (3, 5, 32)
    assert rel_err(out.float(), reference.float()) < 0.06
    assert rel_err(out.float(), dequantized.float()) < 0.05  # only the input's rounding differs
    out.float().square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    with torch.no_grad():  # inference skips the autograd node, not the math; a zero input gives zeros
        assert torch.equal(linear(x), out.detach())
        zero = linear(torch.zeros(2, 64, dtype=torch.bfloat16))
    assert torch.equal(zero, linear.bias.expand(2, -1))
