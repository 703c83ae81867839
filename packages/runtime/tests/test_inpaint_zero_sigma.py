"""`inpaint_velocity` at sigma 0 (an explicit schedule reaching 0 before its last entry): the clean latent is
already there, so the kept velocity is 0 instead of a division by zero."""

from __future__ import annotations

import torch

from diffsynth.runtime.inpaint import inpaint_velocity


def test_kept_velocity_is_zero_at_sigma_zero():
    gen = torch.Generator().manual_seed(0)
    velocity, clean = torch.randn(2, 4, 3, 5, generator=gen), torch.randn(2, 4, 3, 5, generator=gen)
    mask = torch.zeros(1, 1, 3, 5)
    mask[..., :2] = 1.0
    mask[..., 2] = 0.5
    out = inpaint_velocity(velocity, clean, clean, 0.0, mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, mask * velocity, atol=0, rtol=0)
    # a latent away from clean at sigma 0 still gives a finite step (the kept part does not move)
    out = inpaint_velocity(velocity, clean + 1.0, clean, torch.tensor(0.0), mask)
    torch.testing.assert_close(out, mask * velocity, atol=0, rtol=0)


def test_nonzero_sigma_is_unchanged():
    gen = torch.Generator().manual_seed(1)
    velocity, latents, clean = (torch.randn(1, 4, 3, 5, generator=gen) for _ in range(3))
    mask = torch.rand(1, 1, 3, 5, generator=gen)
    want = mask * velocity + (1 - mask) * (latents - clean) / 0.25
    torch.testing.assert_close(inpaint_velocity(velocity, latents, clean, 0.25, mask), want)
    torch.testing.assert_close(inpaint_velocity(velocity, latents, clean, torch.tensor(0.25), mask), want)
