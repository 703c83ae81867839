"""Our FLUX.1 DiT against diffusers' `FluxTransformer2DModel` with the same weights (fp32, CPU).

Two routes to the same weights: our own `ours_to_diffusers` on a tiny config (Appendix A sizes),
and diffusers' `convert_flux_transformer_checkpoint_to_diffusers`, which hard-codes hidden 3072 and
MLP ratio 4, so that test runs the released widths with one double and one single block. Tolerance:
max abs diff <= 1e-5 times the output's largest magnitude (at least 1).
"""

from __future__ import annotations

import math

import pytest
import torch
from diffsynth_flux_test_helpers import (
    dit_inputs,
    image_ids,
    make_dit,
    reference_dit,
    reference_dit_output,
    tiny_dit_config,
)

from diffsynth.flux.flux1.dit import Flux1DiT, Flux1DiTConfig

pytestmark = pytest.mark.parity


def _compare(ours, reference, args, guidance_embed=True):
    with torch.no_grad():
        got = ours(*args)
        want = reference_dit_output(reference, args, guidance=guidance_embed)
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
    cfg = tiny_dit_config(depth=1, depth_single_blocks=1, guidance_embed=guidance_embed)  # Appendix A sizes
    ours = make_dit(cfg, seed=3).eval()
    reference = reference_dit(cfg, ours)
    img, img_ids, txt, txt_ids, t, y, g = dit_inputs(batch=2, grid=grid, txt_len=txt_len, seed=txt_len, config=cfg)
    if ref_grid is not None:
        ref = torch.randn(2, ref_grid[0] * ref_grid[1], cfg.in_channels, generator=torch.Generator().manual_seed(9))
        img = torch.cat([img, ref], dim=1)
        img_ids = torch.cat([img_ids, image_ids(*ref_grid, first=1.0)], dim=1)
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
        reference = reference_dit(cfg)
    state = _cheap_random_state(ours, seed=0)
    ours.load_state_dict(state, strict=True, assign=True)
    converted = convert_flux_transformer_checkpoint_to_diffusers(dict(state))
    reference.load_state_dict(converted, strict=True, assign=True)
    ours.eval()

    g = torch.Generator().manual_seed(1)
    img_ids = image_ids(3, 4)
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
