"""The half-precision path of the FLUX.1 DiT: `add_mul` and `rotate` (`diffsynth.runtime.layers`) fuse their
passes only for bfloat16/float16 activations, which the float32 parity tests do not reach, so the whole model in
bfloat16 is checked against itself in float32 (the functions themselves: `runtime/tests/test_layers.py`)."""

from __future__ import annotations

import torch

from diffsynth.flux.flux1.dit import Flux1DiT, Flux1DiTConfig


def test_bfloat16_model_follows_the_float32_model():
    cfg = Flux1DiTConfig(
        in_channels=16, out_channels=16, vec_in_dim=24, context_in_dim=32, hidden_size=64, num_heads=4,
        depth=2, depth_single_blocks=2, axes_dim=(4, 6, 6),
    )  # fmt: skip
    torch.manual_seed(0)
    model = Flux1DiT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, p.shape[-1] ** -0.5 if p.dim() > 1 else 0.1)
    g = torch.Generator().manual_seed(2)
    rows, cols = torch.meshgrid(torch.arange(6), torch.arange(6), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(1, -1, 3).float()
    img, txt, y = (
        torch.randn(1, 36, 16, generator=g),
        torch.randn(1, 7, 32, generator=g),
        torch.randn(1, 24, generator=g),
    )
    t, guidance, txt_ids = torch.tensor([0.5]), torch.tensor([4.0]), torch.zeros(1, 7, 3)
    with torch.no_grad():
        want = model(img, img_ids, txt, txt_ids, t, y, guidance)
        got = model.bfloat16()(img.bfloat16(), img_ids, txt.bfloat16(), txt_ids, t, y.bfloat16(), guidance)
    assert got.dtype == torch.bfloat16
    scale = want.abs().max().item()
    err = (got.float() - want).abs().max().item()
    print(f"bf16 vs fp32: max abs {err:.3g}, output scale {scale:.3g}")
    assert scale > 0.1 and err <= 0.03 * scale
