"""The fused elementwise helpers the DiTs share: RoPE as the complex multiplication it stands for, and
`add_mul`, in float32 (the references' op order) and in bfloat16 (one rounding)."""

from __future__ import annotations

import torch

from diffsynth.runtime.layers import add_mul, apply_rope, rope_tables, rotate


def _within_one_bf16_step(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Both are roundings of (nearly) the same float32 value: at most one bfloat16 step apart."""
    return bool(((got.float() - want.float()).abs() <= want.float().abs() * 2**-7 + 1e-30).all())


def _complex_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """The convention of FLUX, Wan, Z-Image and Qwen-Image: channel pairs as complex numbers times e^(i angle)."""
    pairs = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(pairs * torch.polar(torch.ones_like(angles.double()), angles.double())).flatten(-2)


def test_rotate_is_the_complex_multiplication_and_apply_rope_is_rotate():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 10, 3, 16, generator=g)
    angles = torch.randn(2, 10, 1, 8, generator=g) * 20
    cos, sin = angles.cos(), angles.sin()
    tables = rope_tables(cos, sin)
    assert tables[0].shape == tables[1].shape == (2, 10, 1, 16)
    got = rotate(x, *tables)
    torch.testing.assert_close(got.double(), _complex_rope(x, angles), atol=1e-5, rtol=0)
    assert torch.equal(apply_rope(x, cos, sin), got)

    half = rotate(x.bfloat16(), *tables)
    assert half.dtype == torch.bfloat16
    assert _within_one_bf16_step(half, _complex_rope(x.bfloat16(), angles).bfloat16())


def test_add_mul_keeps_the_two_op_form_in_float32_and_rounds_once_in_bfloat16():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 64, 32, generator=g), torch.randn(2, 64, 32, generator=g)
    c = torch.randn(2, 1, 32, generator=g)  # a modulation vector, broadcast over tokens
    assert torch.equal(add_mul(a, b, c), a + b * c)
    got = add_mul(a.bfloat16(), b.bfloat16(), c.bfloat16())
    assert got.dtype == torch.bfloat16
    exact = a.bfloat16().double() + b.bfloat16().double() * c.bfloat16().double()
    assert _within_one_bf16_step(got, exact.bfloat16())
