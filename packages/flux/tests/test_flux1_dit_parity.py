"""Our FLUX.1 DiT against diffusers' `FluxTransformer2DModel` with the same weights (fp32, CPU).

Two routes to the same weights: our own `ours_to_diffusers` on a tiny config (Appendix A sizes),
and diffusers' `convert_flux_transformer_checkpoint_to_diffusers`, which hard-codes hidden 3072 and
MLP ratio 4, so that test runs the released widths with one double and one single block. Tolerance:
max abs diff <= 1e-5 times the output's largest magnitude (at least 1).
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from diffsynth.flux.flux1.dit import Flux1DiT, Flux1DiTConfig
from diffsynth.flux.flux1.formats import ours_to_diffusers

pytestmark = pytest.mark.parity


def _test_dit():
    """`tiny_config` and friends live only in test_flux1_dit.py; load that module by path."""
    path = Path(__file__).with_name("test_flux1_dit.py")
    spec = importlib.util.spec_from_file_location("flux1_test_dit", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


T = _test_dit()


def _reference(cfg: Flux1DiTConfig):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        num_layers=cfg.depth,
        num_single_layers=cfg.depth_single_blocks,
        attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.num_heads,
        joint_attention_dim=cfg.context_in_dim,
        pooled_projection_dim=cfg.vec_in_dim,
        guidance_embeds=cfg.guidance_embed,
        axes_dims_rope=cfg.axes_dim,
    ).eval()


def _compare(ours, reference, args, guidance_embed=True):
    img, img_ids, txt, txt_ids, t, y, g = args
    with torch.no_grad():
        got = ours(*args)
        want = reference(
            hidden_states=img,
            encoder_hidden_states=txt,
            pooled_projections=y,
            timestep=t,
            img_ids=img_ids[0],  # diffusers takes 2-D ids
            txt_ids=txt_ids[0],
            guidance=g if guidance_embed else None,
            return_dict=False,
        )[0]
    scale = want.abs().max().item()
    print(f"parity: max abs diff {(got - want).abs().max().item():.3g}, output scale {scale:.3g}")
    assert scale > 0.1  # a vacuous comparison (all zeros) would prove nothing
    return (got - want).abs().max().item(), scale


@pytest.mark.parametrize(
    ("guidance_embed", "grid", "txt_len", "ref_grid"),
    [
        (True, (4, 4), 7, None),
        (True, (3, 5), 1, None),
        (True, (4, 4), 9, (2, 3)),  # Kontext-style reference tokens with first id 1
        (False, (4, 4), 7, None),  # schnell-style: no guidance embedder
    ],
)
def test_tiny_matches_diffusers_through_ours_to_diffusers(guidance_embed, grid, txt_len, ref_grid):
    pytest.importorskip("diffusers")
    cfg = T.tiny_config(depth=1, depth_single_blocks=1, guidance_embed=guidance_embed)  # Appendix A sizes
    ours = T.make_model(cfg, seed=3).eval()
    reference = _reference(cfg)
    reference.load_state_dict(ours_to_diffusers(ours.state_dict()), strict=True)
    img, img_ids, txt, txt_ids, t, y, g = T.inputs(batch=2, grid=grid, txt_len=txt_len, seed=txt_len, config=cfg)
    if ref_grid is not None:
        ref = torch.randn(2, ref_grid[0] * ref_grid[1], cfg.in_channels, generator=torch.Generator().manual_seed(9))
        img = torch.cat([img, ref], dim=1)
        img_ids = torch.cat([img_ids, T.image_ids(*ref_grid, first=1.0)], dim=1)
    diff, scale = _compare(ours, reference, (img, img_ids, txt, txt_ids, t, y, g), guidance_embed)
    assert diff <= 1e-5 * max(1.0, scale), f"max abs diff {diff:.3g} (output scale {scale:.3g}) vs diffusers"


def _cheap_random_state(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Full-rank pseudo-random weights without drawing 500M random numbers (seconds on 2 cores).

    Each tensor is a window, at a random offset, of a repeated random base whose length is prime,
    so rows never repeat; weights are scaled by 1/sqrt(fan_in), norm scales sit around 1.
    """
    g = torch.Generator().manual_seed(seed)
    period = 1_000_003
    base = torch.randn(period, generator=g)
    state = {}
    for name, p in model.state_dict().items():
        n = p.numel()
        offset = int(torch.randint(period, (1,), generator=g))
        flat = base.repeat(math.ceil((n + offset) / period))[offset : offset + n]
        if name.endswith(".scale"):
            state[name] = 1.0 + 0.1 * flat.view(p.shape)
        elif p.dim() == 1:
            state[name] = 0.02 * flat.view(p.shape)
        else:
            state[name] = flat.view(p.shape) / math.sqrt(p.shape[1])
    return state


def test_released_widths_match_diffusers_through_the_diffusers_converter():
    pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    cfg = Flux1DiTConfig(depth=1, depth_single_blocks=1)
    with torch.device("meta"):
        ours = Flux1DiT(cfg)
        reference = _reference(cfg)
    state = _cheap_random_state(ours, seed=0)
    ours.load_state_dict(state, strict=True, assign=True)
    converted = convert_flux_transformer_checkpoint_to_diffusers(dict(state))
    reference.load_state_dict(converted, strict=True, assign=True)
    ours.eval()

    g = torch.Generator().manual_seed(1)
    img_ids = T.image_ids(3, 4)
    args = (
        torch.randn(1, 12, cfg.in_channels, generator=g),
        img_ids,
        torch.randn(1, 5, cfg.context_in_dim, generator=g),
        torch.zeros(1, 5, 3),
        torch.tensor([0.7]),
        torch.randn(1, cfg.vec_in_dim, generator=g),
        torch.tensor([3.5]),
    )
    diff, scale = _compare(ours, reference, args)
    assert diff <= 1e-5 * max(1.0, scale), f"max abs diff {diff:.3g} (output scale {scale:.3g}) vs diffusers"
