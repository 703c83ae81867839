"""Our Z-Image DiT against diffusers' `ZImageTransformer2DModel` with the same weights (fp32, CPU)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.parity


def reference_dit(cfg):
    """diffusers' `ZImageTransformer2DModel` at our config's sizes (random weights; the caller loads ours)."""
    from diffusers import ZImageTransformer2DModel

    return ZImageTransformer2DModel(
        all_patch_size=(cfg.patch_size,),
        all_f_patch_size=(cfg.f_patch_size,),
        in_channels=cfg.in_channels,
        dim=cfg.dim,
        n_layers=cfg.n_layers,
        n_refiner_layers=cfg.n_refiner_layers,
        n_heads=cfg.n_heads,
        n_kv_heads=cfg.n_kv_heads,
        norm_eps=cfg.norm_eps,
        qk_norm=cfg.qk_norm,
        cap_feat_dim=cfg.cap_feat_dim,
        siglip_feat_dim=cfg.siglip_feat_dim,  # None: not an Omni model
        rope_theta=cfg.rope_theta,
        t_scale=cfg.t_scale,
        axes_dims=list(cfg.axes_dims),
        axes_lens=list(cfg.axes_lens),
    ).eval()


def _test_dit():
    """`tiny_config` and friends live only in test_dit.py; load that module by path."""
    spec = importlib.util.spec_from_file_location("z_image_test_dit", Path(__file__).with_name("test_dit.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def models():
    pytest.importorskip("diffusers")

    t = _test_dit()
    cfg = t.tiny_config()
    ours = t.make_model(cfg, seed=3).eval()
    reference = reference_dit(cfg)
    reference.load_state_dict(ours.state_dict(), strict=True)
    return ours, reference, t


def _reference_forward(reference, x, t, text):
    """diffusers takes a list of [C, F, H, W] latents and returns a list."""
    out = reference([xi.unsqueeze(1) for xi in x], t, text, return_dict=False)[0]
    return torch.stack([o.squeeze(1) for o in out])


@pytest.mark.parametrize(
    ("lengths", "size"),
    [
        ((1,), (8, 8)),
        ((7,), (8, 8)),
        ((32,), (8, 16)),
        ((33,), (10, 12)),
        ((100,), (6, 14)),
        ((7, 40), (8, 8)),  # batch of 2, different padded caption lengths -> masked
        ((12, 29), (10, 12)),  # batch of 2, same padded length -> no mask
    ],
)
def test_matches_diffusers(models, lengths, size):
    ours, reference, t = models
    x, timestep, text = t.inputs(caption_lengths=lengths, size=size, seed=sum(lengths))
    with torch.no_grad():
        got = ours(x, timestep, text)
        want = _reference_forward(reference, x, timestep, text)
    diff = (got - want).abs().max().item()
    assert want.abs().max() > 0.1  # a vacuous comparison (all zeros) would prove nothing
    assert diff <= 1e-5, f"max abs diff {diff:.3g} vs diffusers for caption lengths {lengths}, latent {size}"
