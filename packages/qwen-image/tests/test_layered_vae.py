"""Qwen-Image-Layered's RGBA VAE: the runtime's Wan 2.1 VAE with 4 image channels. It loads strictly from a
diffusers `AutoencoderKLQwenImage(input_channels=4)` folder (official names) and matches it (tiny, fp32, CPU)."""

from __future__ import annotations

import pytest
import torch

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.models.wan_vae import WAN21_VAE_SPEC, WanVAE, WanVAEConfig
from diffsynth.runtime.testing.weights import random_weights

MEAN = tuple(0.1 * i - 0.7 for i in range(16))
STD = tuple(0.5 + 0.1 * i for i in range(16))


def test_four_channel_vae_encodes_and_decodes_rgba(one_thread):
    vae = random_weights(WanVAE(WanVAEConfig(base_dim=8, in_channels=4)), seed=1).eval()
    pixels = torch.rand(1, 4, 1, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        z = vae.encode(pixels)
        assert z.shape == (1, 16, 1, 4, 6)
        assert vae.decode(z).shape == (1, 4, 1, 32, 48)
        with pytest.raises(ConfigError, match=r"\[B, 4, F, H, W\]"):
            vae.encode(pixels[:, :3])


def test_four_channel_shapes_are_recognised_as_the_wan21_vae_with_four_channels():
    with torch.device("meta"):
        state = WanVAE(WanVAEConfig(in_channels=4)).state_dict()
    assert tuple(state["encoder.conv1.weight"].shape)[:2] == (96, 4)
    assert WAN21_VAE_SPEC.match(state).name == "original"
    assert WAN21_VAE_SPEC.config_from_state(state, None) == WanVAEConfig(in_channels=4)


@pytest.mark.parity
def test_layered_vae_loads_from_a_diffusers_folder_and_matches_it(tmp_path, one_thread):
    pytest.importorskip("diffusers")
    from diffusers import AutoencoderKLQwenImage

    from diffsynth.runtime.loading import load_model

    torch.manual_seed(0)
    reference = AutoencoderKLQwenImage(
        base_dim=8, num_res_blocks=1, input_channels=4, latents_mean=list(MEAN), latents_std=list(STD)
    )
    with torch.no_grad():  # move the norms off 1 so a swapped gamma would show
        for name, param in reference.named_parameters():
            if name.endswith("gamma"):
                param.add_(0.05 * torch.randn_like(param))
    reference.save_pretrained(tmp_path)
    ours = load_model(tmp_path, torch_dtype="float32", specs=[WAN21_VAE_SPEC])
    assert ours.config.in_channels == 4 and ours.config.latents_mean == pytest.approx(MEAN)
    reference.eval()

    pixels = torch.rand(2, 4, 1, 16, 24, generator=torch.Generator().manual_seed(1)) * 2 - 1
    mean, std = torch.tensor(MEAN).view(1, -1, 1, 1, 1), torch.tensor(STD).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        z = ours.encode(pixels)
        want_z = (reference.encode(pixels).latent_dist.mode() - mean) / std
        decoded = ours.decode(z)
        want_pixels = reference.decode(z * std + mean).sample
    assert (z - want_z).abs().max() <= 1e-5
    assert decoded.shape == want_pixels.shape == (2, 4, 1, 16, 24)
    assert want_pixels.abs().max() > 0.05
    assert (decoded - want_pixels).abs().max() <= 1e-5
