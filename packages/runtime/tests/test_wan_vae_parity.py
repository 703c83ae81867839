"""Wan VAE against diffusers' `AutoencoderKLWan`: same weights, same numbers; same key mappings.

diffusers returns raw posterior moments and leaves the per-channel normalisation to its pipelines,
so its latents are normalised here with the same statistics before comparing.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from diffsynth.runtime.models.wan_vae import WanVAE, WanVAEConfig
from diffsynth.runtime.models.wan_vae_formats import diffusers21_to_ours, diffusers22_to_ours

pytestmark = pytest.mark.parity
KEYS = Path(__file__).parent / "data" / "keys"


def _tests():
    """test_wan_vae.py (home of `tiny_config`, `tiny_model`, `tiny_video`), loaded by path."""
    spec = importlib.util.spec_from_file_location("_wan_vae_tests", Path(__file__).with_name("test_wan_vae.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _diffusers_model(config):
    from diffusers import AutoencoderKLWan

    kwargs = dict(
        base_dim=config.base_dim,
        decoder_base_dim=config.decoder_base_dim,
        z_dim=config.z_dim,
        dim_mult=list(config.dim_mult),
        num_res_blocks=config.num_res_blocks,
        temperal_downsample=list(config.temporal_downsample),
        latents_mean=list(config.latents_mean),
        latents_std=list(config.latents_std),
        is_residual=config.is_residual,
    )
    if config.patch_size > 1:  # the Wan 2.2 arguments of formats/README Appendix A
        packed = config.in_channels * config.patch_size**2
        kwargs.update(in_channels=packed, out_channels=packed, patch_size=config.patch_size, scale_factor_spatial=16)
    return AutoencoderKLWan(**kwargs).eval()


def _ours_to_diffusers_22(ours: dict, their_keys) -> dict:
    """Test-side inverse of our 2.2 table (the library converter does not handle 2.2): run our
    converter on diffusers' own key names and invert the result. A wrong table cannot pass the
    strict load and the numeric comparison below."""
    names = diffusers22_to_ours({k: k for k in their_keys})
    inverse = {our_key: their_key for our_key, their_key in names.items()}
    return {inverse[k]: v for k, v in ours.items()}


def _to_diffusers(variant: str, ours: dict, theirs) -> dict:
    if variant == "2.1":
        from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

        return convert_wan_vae_to_diffusers(dict(ours))  # it may pop from its input: give it a copy
    return _ours_to_diffusers_22(ours, theirs.state_dict().keys())


@pytest.mark.parametrize("variant", ["2.1", "2.2"])
def test_matches_diffusers(variant):
    pytest.importorskip("diffusers")
    tests = _tests()
    ours = tests.tiny_model(variant, seed=0)
    theirs = _diffusers_model(ours.config)
    theirs.load_state_dict(_to_diffusers(variant, ours.state_dict(), theirs), strict=True)

    video = tests.tiny_video(variant, frames=5, size=(32, 32) if variant == "2.1" else (64, 64))
    mean = torch.tensor(ours.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(ours.config.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        posterior = theirs.encode(video).latent_dist
        expected = (posterior.mode() - mean) / std
        latents = ours.encode(video)
        assert latents.shape == expected.shape == (1, ours.z_dim, 2, 4, 4)
        assert (latents - expected).abs().max().item() <= 1e-4

        sampled = (posterior.sample(generator=torch.Generator().manual_seed(2)) - mean) / std
        ours_sampled = ours.encode(video, sample=True, generator=torch.Generator().manual_seed(2))
        assert (ours_sampled - sampled).abs().max().item() <= 1e-4

        decoded = theirs.decode(expected * std + mean).sample
        assert (decoded.abs() < 1).float().mean() > 0.9  # mostly unclamped: the comparison means something
        assert decoded.shape == video.shape
        assert (ours.decode(expected) - decoded).abs().max().item() <= 1e-4


@pytest.mark.parametrize("variant", ["2.1", "2.2"])
def test_diffusers_state_dict_converts_back_exactly(variant):
    """diffusers names -> ours gives back our exact tensors (2.1 through the library's converter)."""
    pytest.importorskip("diffusers")
    tests = _tests()
    ours = tests.tiny_model(variant).state_dict()
    theirs = _diffusers_model(tests.tiny_config(variant))
    converted = _to_diffusers(variant, ours, theirs)
    back = (diffusers21_to_ours if variant == "2.1" else diffusers22_to_ours)(converted)
    assert back.keys() == ours.keys()
    assert all(torch.equal(back[k], v) for k, v in ours.items())


def _meta_state(name: str) -> dict[str, torch.Tensor]:
    shapes = json.loads((KEYS / f"{name}.json").read_text())
    return {k: torch.empty(v, device="meta") for k, v in shapes.items()}


def _shapes(state) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def test_full_size_library_conversion_is_inverted_by_ours():
    """Each tensor of `Wan2.1_VAE.pth` goes through diffusers' converter and our table back to its
    own name (the same tensor object: neither side copies)."""
    pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    original = _meta_state("wan21_vae_orig")
    converted = convert_wan_vae_to_diffusers(dict(original))
    assert _shapes(converted) == _shapes(_meta_state("wan21_vae_diffusers"))
    back = diffusers21_to_ours(converted)
    assert back.keys() == original.keys()
    assert all(back[k] is original[k] for k in original)


def test_full_size_diffusers_22_model_has_the_listed_keys():
    """The 2.2 diffusers names we convert from are those of `AutoencoderKLWan` built with the
    Wan2.2 config."""
    pytest.importorskip("diffusers")
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):
        theirs = AutoencoderKLWan(
            base_dim=160,
            decoder_base_dim=256,
            z_dim=48,
            is_residual=True,
            in_channels=12,
            out_channels=12,
            patch_size=2,
            scale_factor_spatial=16,
            latents_mean=[0.0] * 48,
            latents_std=[1.0] * 48,
        )
    listed = _meta_state("wan22_vae_diffusers")
    assert _shapes(theirs.state_dict()) == _shapes(listed)
    with torch.device("meta"):
        WanVAE(WanVAEConfig(variant="2.2")).load_state_dict(diffusers22_to_ours(listed), strict=True, assign=True)
