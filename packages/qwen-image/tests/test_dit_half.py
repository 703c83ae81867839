"""The half-precision path of the Qwen-Image DiT: `add_mul` and `rotate` (`diffsynth.runtime.layers`) fuse their
passes only for bfloat16/float16 activations, which the float32 parity tests do not reach, so the whole model in
bfloat16 is checked against itself in float32 (the functions themselves: `runtime/tests/test_layers.py`)."""

from __future__ import annotations

import torch

from diffsynth.qwen_image.dit import QwenImageDiT, QwenImageDiTConfig


def test_bfloat16_model_follows_the_float32_model():
    cfg = QwenImageDiTConfig(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=4,
        joint_attention_dim=32, axes_dims_rope=(4, 6, 6),
    )  # fmt: skip
    torch.manual_seed(0)
    model = QwenImageDiT(cfg).eval()
    with torch.no_grad():  # activations of unit scale, so bfloat16 rounding is all that differs
        for name, p in model.named_parameters():
            p.normal_(0, p.shape[-1] ** -0.5) if p.dim() > 1 else p.normal_(1.0 if "norm" in name else 0.0, 0.1)
    g = torch.Generator().manual_seed(2)
    x, text, t = (
        torch.randn(1, 30, 16, generator=g),
        torch.randn(1, 7, 32, generator=g),
        torch.tensor([0.5]),
    )  # exact in bfloat16 (the timestep is cast to the model dtype)
    mask, shapes = torch.ones(1, 7, dtype=torch.bool), [(1, 5, 6)]
    with torch.no_grad():
        want = model(x, t, text, mask, shapes)
        got = model.bfloat16()(x.bfloat16(), t, text.bfloat16(), mask, shapes)
    assert got.dtype == torch.bfloat16
    scale = want.abs().max().item()
    err = (got.float() - want).abs().max().item()
    print(f"bf16 vs fp32: max abs {err:.3g}, output scale {scale:.3g}")
    assert scale > 0.1 and err <= 0.03 * scale
