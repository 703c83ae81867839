"""Full-size AutoencoderKL layouts on the meta device: the official files' keys and shapes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.models.autoencoder_kl import (
    AUTOENCODER_KL_SPEC,
    AutoencoderKL,
    AutoencoderKLConfig,
    config_from_state,
)
from diffsynth.runtime.models.autoencoder_kl_formats import ldm_to_ours

KEYS = Path(__file__).parent / "data" / "keys"

# `vae/config.json` of black-forest-labs/FLUX.1-dev (Z-Image-Turbo's is the same config)
FLUX1_VAE_CONFIG_JSON = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 16,
    "latents_mean": None,
    "latents_std": None,
    "layers_per_block": 2,
    "mid_block_add_attention": True,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "use_post_quant_conv": False,
    "use_quant_conv": False,
}


def _meta_state(name: str, prefix: str = "") -> dict[str, torch.Tensor]:
    shapes = json.loads((KEYS / f"{name}.json").read_text())
    return {prefix + k: torch.empty(v, device="meta") for k, v in shapes.items()}


def _shapes(state) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def _ours_at_released_config() -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return _shapes(AutoencoderKL(AutoencoderKLConfig()).state_dict())


def test_model_has_the_official_diffusers_keys_and_shapes():
    assert _ours_at_released_config() == _shapes(_meta_state("flux1_vae_diffusers"))


def test_original_ae_converts_to_our_keys_and_shapes():
    converted = ldm_to_ours(_meta_state("flux1_ae_orig"))
    assert _shapes(converted) == _ours_at_released_config()
    with torch.device("meta"):
        AutoencoderKL().load_state_dict(converted, strict=True, assign=True)


@pytest.mark.parametrize("name", ["flux1_vae_diffusers", "flux1_ae_orig"])
def test_config_derived_from_shapes_is_the_released_one(name):
    state = _meta_state(name)
    layout = AUTOENCODER_KL_SPEC.match(state)
    ours = layout.to_ours(state)
    assert config_from_state(ours, None) == AutoencoderKLConfig()
    assert config_from_state(ours, FLUX1_VAE_CONFIG_JSON) == AutoencoderKLConfig()


@pytest.mark.parametrize(
    "name, prefix, layout_name",
    [
        ("flux1_vae_diffusers", "", "diffusers"),
        ("flux1_ae_orig", "", "ldm"),
        ("flux1_ae_orig", "first_stage_model.", "ldm_comfyui"),
        ("flux1_ae_orig", "vae.", "ldm_vae_prefix"),
    ],
)
def test_spec_recognises_each_layout(name, prefix, layout_name):
    state = _meta_state(name, prefix)
    state["model.diffusion_model.img_in.weight"] = torch.empty(8, 4, device="meta")  # another model in the file
    layout = AUTOENCODER_KL_SPEC.match(state)
    assert layout is not None and layout.name == layout_name
    assert _shapes(layout.to_ours(state)) == _ours_at_released_config()


def test_spec_rejects_other_checkpoints():
    assert AUTOENCODER_KL_SPEC.match(_meta_state("qwen3_4B_no_lmhead")) is None
    assert AUTOENCODER_KL_SPEC.match(_meta_state("flux1_ae_orig", "model.")) is None


def test_unmapped_original_key_is_named():
    state = _meta_state("flux1_ae_orig")
    state["encoder.mid.attn_2.q.weight"] = torch.empty(512, 512, 1, 1, device="meta")
    with pytest.raises(KeyError, match=r"encoder\.mid\.attn_2\.q\.weight"):
        ldm_to_ours(state)


def test_config_json_refines_and_is_checked_against_shapes():
    ours = _meta_state("flux1_vae_diffusers")
    sd_like = dict(FLUX1_VAE_CONFIG_JSON, scaling_factor=1.5305, shift_factor=0.0609)  # an SD3-style file
    config = config_from_state(ours, sd_like)
    assert (config.scaling_factor, config.shift_factor) == (1.5305, 0.0609)
    with pytest.raises(ConfigError, match=r"latent_channels=4 .* shapes give 16"):
        config_from_state(ours, dict(FLUX1_VAE_CONFIG_JSON, latent_channels=4))


def test_sd_normalisation_for_four_latent_channels():
    with torch.device("meta"):
        state = AutoencoderKL(
            AutoencoderKLConfig(latent_channels=4, use_quant_conv=True, use_post_quant_conv=True)
        ).state_dict()
    config = config_from_state(state, None)
    assert (config.latent_channels, config.scaling_factor, config.shift_factor) == (4, 0.18215, 0.0)
    assert config.use_quant_conv and config.use_post_quant_conv


def test_config_from_json_alone_builds_fresh_models():
    """An empty state means "from config.json only" (how tests and trainers create new models)."""
    assert config_from_state({}, FLUX1_VAE_CONFIG_JSON) == AutoencoderKLConfig()
    assert config_from_state({}, None) == AutoencoderKLConfig()
    sd = dict(FLUX1_VAE_CONFIG_JSON, latent_channels=4, scaling_factor=0.18215, shift_factor=None, use_quant_conv=True)
    config = config_from_state({}, sd)
    assert (config.latent_channels, config.scaling_factor, config.shift_factor, config.use_quant_conv) == (
        4,
        0.18215,
        0.0,
        True,
    )
