"""AutoencoderKL against diffusers: same weights, same numbers; our LDM conversion equals theirs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from diffsynth.runtime.models.autoencoder_kl import AutoencoderKL
from diffsynth.runtime.models.autoencoder_kl_formats import ldm_to_ours
from diffsynth.runtime.testing.ldm_vae import diffusers_convert_ldm_vae, diffusers_ldm_vae_kwargs, ldm_vae_state

pytestmark = pytest.mark.parity
KEYS = Path(__file__).parent / "data" / "keys"


def _tiny_config(**overrides):
    """`tiny_config` of test_autoencoder_kl.py (its one home), loaded by path: test dirs are not packages."""
    spec = importlib.util.spec_from_file_location(
        "_autoencoder_kl_tests", Path(__file__).with_name("test_autoencoder_kl.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.tiny_config(**overrides)


def _diffusers_model(config):
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    return DiffusersAutoencoderKL(
        **diffusers_ldm_vae_kwargs(config), scaling_factor=config.scaling_factor, shift_factor=config.shift_factor
    ).eval()


@pytest.mark.parametrize(
    "overrides",
    [
        dict(scaling_factor=0.3611, shift_factor=0.1159),  # FLUX.1 normalisation
        dict(scaling_factor=0.18215, shift_factor=0.0, use_quant_conv=True, use_post_quant_conv=True),  # SD-style
        dict(mid_block_add_attention=False),
    ],
)
def test_matches_diffusers(overrides):
    pytest.importorskip("diffusers")
    config = _tiny_config(**overrides)
    torch.manual_seed(0)
    theirs = _diffusers_model(config)
    with torch.no_grad():  # random norms and biases too, so every parameter matters
        for p in theirs.parameters():
            p.normal_(0.0, 0.2)
    ours = AutoencoderKL(config).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)

    scale, shift = config.scaling_factor, config.shift_factor
    image = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        posterior = theirs.encode(image).latent_dist
        expected = (posterior.mode() - shift) * scale
        latents = ours.encode(image)
        assert (latents - expected).abs().max().item() <= 1e-5

        sampled = (posterior.sample(generator=torch.Generator().manual_seed(2)) - shift) * scale
        ours_sampled = ours.encode(image, sample=True, generator=torch.Generator().manual_seed(2))
        assert (ours_sampled - sampled).abs().max().item() <= 1e-5

        decoded = theirs.decode(expected / scale + shift).sample
        assert (ours.decode(expected) - decoded).abs().max().item() <= 1e-5


@pytest.mark.parametrize("blocks", [(32, 64), (32, 32, 64)])
def test_ldm_conversion_matches_diffusers(blocks):
    pytest.importorskip("diffusers")
    config = _tiny_config(block_out_channels=blocks, use_quant_conv=True, use_post_quant_conv=True)
    state = ldm_vae_state(config, torch.Generator().manual_seed(0))
    theirs = diffusers_convert_ldm_vae(state, len(blocks))
    ours = ldm_to_ours(dict(state))
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key
    AutoencoderKL(config).load_state_dict(ours, strict=True)


def test_full_size_ldm_conversion_matches_diffusers():
    pytest.importorskip("diffusers")
    shapes = json.loads((KEYS / "flux1_ae_orig.json").read_text())
    state = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
    theirs = {k: tuple(v.shape) for k, v in diffusers_convert_ldm_vae(state, 4).items()}
    assert {k: tuple(v.shape) for k, v in ldm_to_ours(dict(state)).items()} == theirs
