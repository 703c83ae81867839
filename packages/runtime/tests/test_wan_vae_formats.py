"""Full-size Wan VAE layouts on the meta device: the official files' keys and shapes, recognition."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.loading import load_model, recognise
from diffsynth.runtime.models.autoencoder_kl import AUTOENCODER_KL_SPEC
from diffsynth.runtime.models.specs import FAMILY
from diffsynth.runtime.models.wan_vae import (
    WAN21_VAE_SPEC,
    WAN22_VAE_SPEC,
    WanVAE,
    WanVAEConfig,
    config_from_state,
)
from diffsynth.runtime.models.wan_vae_formats import LAYOUTS_21, LAYOUTS_22, diffusers21_to_ours, diffusers22_to_ours
from diffsynth.runtime.testing import conformance as cf
from diffsynth.runtime.testing.hub_configs import QWEN_IMAGE_VAE_CONFIG_JSON

KEYS = Path(__file__).parent / "data" / "keys"
SPECS = (AUTOENCODER_KL_SPEC, WAN21_VAE_SPEC, WAN22_VAE_SPEC)

# the DiT's `config.json` that sits next to `Wan2.1_VAE.pth` in the Wan2.1 repos: not ours to read
WAN_DIT_CONFIG_JSON = {"_class_name": "WanModel", "dim": 1536, "in_dim": 16, "model_type": "t2v", "num_layers": 30}


def _meta_state(name: str, prefix: str = "") -> dict[str, torch.Tensor]:
    shapes = json.loads((KEYS / f"{name}.json").read_text())
    return {prefix + k: torch.empty(v, device="meta") for k, v in shapes.items()}


def _shapes(state) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def _ours_at_release(variant: str) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return _shapes(WanVAE(WanVAEConfig(variant=variant)).state_dict())


def _tiny_config(variant: str):
    """`tiny_config` of test_wan_vae.py (its one home), loaded by path: test dirs are not packages."""
    spec = importlib.util.spec_from_file_location("_wan_vae_tests", Path(__file__).with_name("test_wan_vae.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.tiny_config(variant)


@pytest.mark.parametrize("variant, name", [("2.1", "wan21_vae_orig"), ("2.2", "wan22_vae_orig")])
def test_model_has_the_original_keys_and_shapes(variant, name):
    assert _ours_at_release(variant) == _shapes(_meta_state(name))


@pytest.mark.parametrize(
    "variant, name, convert",
    [
        ("2.1", "wan21_vae_diffusers", diffusers21_to_ours),
        ("2.1", "qwenimage_vae_diffusers", diffusers21_to_ours),
        ("2.2", "wan22_vae_diffusers", diffusers22_to_ours),
    ],
)
def test_diffusers_files_convert_to_our_keys_and_shapes(variant, name, convert):
    converted = convert(_meta_state(name))
    assert _shapes(converted) == _ours_at_release(variant)
    with torch.device("meta"):
        WanVAE(WanVAEConfig(variant=variant)).load_state_dict(converted, strict=True, assign=True)


@pytest.mark.parametrize(
    "name, spec, layout_name, variant",
    [
        ("wan21_vae_orig", WAN21_VAE_SPEC, "original", "2.1"),
        ("wan21_vae_diffusers", WAN21_VAE_SPEC, "diffusers", "2.1"),
        ("qwenimage_vae_diffusers", WAN21_VAE_SPEC, "diffusers", "2.1"),
        ("wan22_vae_orig", WAN22_VAE_SPEC, "original", "2.2"),
        ("wan22_vae_diffusers", WAN22_VAE_SPEC, "diffusers", "2.2"),
    ],
)
def test_exactly_one_spec_recognises_each_file(name, spec, layout_name, variant):
    state = _meta_state(name)
    (rec,) = recognise(state.keys(), SPECS, label=name)
    assert rec.spec is spec and rec.layout.name == layout_name and len(rec.keys) == len(state)
    assert [s.name for s in SPECS if s.match(state) is not None] == [spec.name]
    ours = rec.layout.to_ours(state)
    assert config_from_state(ours, None) == WanVAEConfig(variant=variant)


@pytest.mark.parametrize("name", ["flux1_ae_orig", "flux1_vae_diffusers", "qwen3_4B_no_lmhead"])
def test_wan_specs_reject_other_checkpoints(name):
    state = _meta_state(name)
    assert WAN21_VAE_SPEC.match(state) is None and WAN22_VAE_SPEC.match(state) is None


def test_specs_are_registered_with_the_runtime_family():
    assert WAN21_VAE_SPEC in FAMILY.specs and WAN22_VAE_SPEC in FAMILY.specs


def test_load_model_builds_the_release_from_shapes():
    model = load_model(_meta_state("wan22_vae_orig"), specs=SPECS)
    assert isinstance(model, WanVAE) and model.config == WanVAEConfig(variant="2.2")
    model = load_model(_meta_state("qwenimage_vae_diffusers"), specs=SPECS, config=QWEN_IMAGE_VAE_CONFIG_JSON)
    assert model.config == WanVAEConfig()
    assert _shapes(model.state_dict()) == _ours_at_release("2.1")


def test_unmapped_diffusers_key_is_named():
    state = _meta_state("wan21_vae_diffusers")
    state["encoder.mid_block.attentions.1.proj.weight"] = torch.empty(384, 384, 1, 1, device="meta")
    with pytest.raises(KeyError, match=r"encoder\.mid_block\.attentions\.1\.proj\.weight"):
        diffusers21_to_ours(state)
    state = _meta_state("wan22_vae_diffusers")
    state["decoder.up_blocks.0.upsampler.resample.1.gamma"] = torch.empty(4, device="meta")  # norms only hold gamma
    with pytest.raises(KeyError, match=r"upsampler\.resample\.1\.gamma"):
        diffusers22_to_ours(state)


def test_config_json_refines_and_is_checked_against_shapes():
    ours = _meta_state("wan21_vae_orig")
    stats = dict(QWEN_IMAGE_VAE_CONFIG_JSON, latents_mean=[0.0] * 16, latents_std=[2.0] * 16)
    config = config_from_state(ours, stats)
    assert config.latents_mean == (0.0,) * 16 and config.latents_std == (2.0,) * 16
    assert config_from_state(ours, WAN_DIT_CONFIG_JSON) == WanVAEConfig()  # someone else's config.json
    with pytest.raises(ConfigError, match=r"z_dim=48 .* shapes give 16"):
        config_from_state(ours, dict(QWEN_IMAGE_VAE_CONFIG_JSON, z_dim=48))
    with pytest.raises(ConfigError, match="attn_scales"):
        config_from_state(ours, dict(QWEN_IMAGE_VAE_CONFIG_JSON, attn_scales=[0.25]))


def test_config_from_json_alone_builds_fresh_models():
    """An empty state means "from config.json only" (diffusers' in_channels counts the 2x2 unshuffle)."""
    assert config_from_state({}, QWEN_IMAGE_VAE_CONFIG_JSON) == WanVAEConfig()
    wan22 = dict(QWEN_IMAGE_VAE_CONFIG_JSON, _class_name="AutoencoderKLWan", base_dim=160, decoder_base_dim=256)
    wan22.update(z_dim=48, is_residual=True, in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=16)
    wan22.update(latents_mean=None, latents_std=None)
    assert config_from_state({}, wan22) == WanVAEConfig(variant="2.2")
    assert config_from_state({}, None) == WanVAEConfig()


@pytest.mark.parametrize("variant", ["2.1", "2.2"])
def test_spec_config_and_original_layout_roundtrip_on_tiny_models(variant):
    config = _tiny_config(variant)

    def factory():
        return WanVAE(config)

    stats = {"_class_name": "AutoencoderKLWan", "latents_mean": config.latents_mean, "latents_std": config.latents_std}
    spec = WAN21_VAE_SPEC if variant == "2.1" else WAN22_VAE_SPEC
    assert cf.check_spec_config(spec, factory, stats) == config
    cf.check_layout_roundtrip(factory, (LAYOUTS_21 if variant == "2.1" else LAYOUTS_22)[0])
