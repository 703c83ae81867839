"""The FLUX.2 VAE: packing + BatchNorm convention and parity with diffusers' `AutoencoderKLFlux2` and the
FLUX.2 pipelines' own latent code; both file layouts at full size (meta) and from tiny files."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from diffsynth.flux.flux2.vae import Flux2VAE, Flux2VAEConfig, pack_latents, unpack_latents
from diffsynth.flux.flux2.vae_formats import FLUX2_VAE_SPEC, bfl_to_ours, config_from_state
from diffsynth.runtime.errors import ConfigError, UnknownModelError
from diffsynth.runtime.loading import load_model, recognise
from diffsynth.runtime.models.autoencoder_kl import AUTOENCODER_KL_SPEC, AutoencoderKL, AutoencoderKLConfig
from diffsynth.runtime.registry import all_specs
from diffsynth.runtime.testing import conformance as cf
from diffsynth.runtime.testing.ldm_vae import diffusers_convert_ldm_vae, diffusers_ldm_vae_kwargs, ldm_vae_state
from diffsynth.runtime.testing.weights import random_weights

KEYS = Path(__file__).parent / "data" / "keys"
# float32 through a deep net, relative to the largest value: standardised latents reach |z| ~ 25 here
TOL = 5e-6
BOTH_SPECS = (AUTOENCODER_KL_SPEC, FLUX2_VAE_SPEC)


# ----------------------------------------------------------------------------------- tiny model
def tiny_config(**overrides) -> Flux2VAEConfig:
    """The one place tiny FLUX.2 VAE sizes live: 4 stages, so one latent cell is 16 pixels as released."""
    fields = dict(block_out_channels=(32, 32, 32, 32), layers_per_block=1, latent_channels=4)
    return Flux2VAEConfig(**{**fields, **overrides})


def _randomize_statistics(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """BatchNorm statistics far from (0, 1), small variances so that eps matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.bn.running_mean.copy_(torch.randn(model.bn.running_mean.shape, generator=g))
        model.bn.running_var.copy_(0.002 + 0.5 * torch.rand(model.bn.running_var.shape, generator=g))
        model.bn.num_batches_tracked.fill_(1234)
    return model


def make_vae(config: Flux2VAEConfig | None = None, seed: int = 0) -> Flux2VAE:
    model = random_weights(Flux2VAE(config or tiny_config()), seed, scale=0.2)
    if not model.bn.running_mean.is_meta:
        _randomize_statistics(model, seed + 1)
    return model.eval()


def _image(batch=2, height=32, width=48, seed=3) -> torch.Tensor:
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference over the reference's largest magnitude (at least 1)."""
    return _max_diff(a, b) / max(1.0, b.abs().max().item())


# ----------------------------------------------------------------------------------- references
def _diffusers_vae(config: Flux2VAEConfig):
    from diffusers import AutoencoderKLFlux2

    return AutoencoderKLFlux2(
        **diffusers_ldm_vae_kwargs(config),
        batch_norm_eps=config.batch_norm_eps,
        patch_size=(config.patch_size, config.patch_size),
    ).eval()


def _reference_encode(vae, image, generator=None, sample=False) -> torch.Tensor:
    """diffusers' FLUX.2 pipelines: `Flux2KleinPipeline._encode_vae_image` (argmax = posterior mode), run as is."""
    from diffusers import Flux2KleinPipeline
    from diffusers.pipelines.flux2 import pipeline_flux2_klein

    pipe = SimpleNamespace(vae=vae, _patchify_latents=Flux2KleinPipeline._patchify_latents)
    if not sample:
        return Flux2KleinPipeline._encode_vae_image(pipe, image, generator)
    original = pipeline_flux2_klein.retrieve_latents  # same code path, drawing from the posterior instead
    try:
        pipeline_flux2_klein.retrieve_latents = lambda out, generator=None, sample_mode="sample": original(
            out, generator, "sample"
        )
        return Flux2KleinPipeline._encode_vae_image(pipe, image, generator)
    finally:
        pipeline_flux2_klein.retrieve_latents = original


def _reference_decode(vae, latents) -> torch.Tensor:
    """The tail of `Flux2KleinPipeline.__call__`: BatchNorm inverse, `_unpatchify_latents`, `vae.decode`."""
    from diffusers import Flux2KleinPipeline

    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    return vae.decode(Flux2KleinPipeline._unpatchify_latents(latents * std + mean), return_dict=False)[0]


def _pair(config: Flux2VAEConfig | None = None, seed: int = 0):
    """Our tiny VAE and diffusers' with the same weights and statistics."""
    config = config or tiny_config()
    ours = make_vae(config, seed)
    theirs = _diffusers_vae(config)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours, theirs


# ----------------------------------------------------------------------------------- convention
def test_packing_order_and_inverse():
    z = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    packed = pack_latents(z)
    assert packed.shape == (2, 12, 2, 3)
    for c in range(3):  # channel c * 4 + 2 * dy + dx holds pixel (2i + dy, 2j + dx) of channel c
        for dy in range(2):
            for dx in range(2):
                assert torch.equal(packed[:, c * 4 + 2 * dy + dx], z[:, c, dy::2, dx::2])
    assert torch.equal(unpack_latents(packed), z)


def test_encode_decode_shapes_and_normalisation(one_thread):
    vae = make_vae()
    image = _image()
    with torch.no_grad():
        latents = vae.encode(image)
        assert latents.shape == (2, 16, 2, 3) and vae.latent_compression == 16
        raw = AutoencoderKL.encode(vae, image)  # the unpacked posterior mean (scaling 1, shift 0)
        bn = vae.bn.eval()
        assert _rel_diff(latents, bn(pack_latents(raw))) <= TOL  # the stored BatchNorm in eval mode
        assert _rel_diff(vae.denormalize(latents), pack_latents(raw)) <= TOL
        assert vae.decode(latents).shape == image.shape


def test_rejects_sizes_and_configs():
    vae = make_vae()
    with pytest.raises(ConfigError, match="multiples of 16"):
        vae.encode(_image(height=40, width=48))
    with pytest.raises(ConfigError, match=r"packed \[B, 16"):
        vae.decode(torch.zeros(1, 4, 4, 4))
    with pytest.raises(ValueError, match="scaling_factor"):
        tiny_config(scaling_factor=0.3611)
    with pytest.raises(ValueError, match="batch_norm_eps"):
        tiny_config(batch_norm_eps=0.0)
    with pytest.raises(ConfigError, match="Flux2VAEConfig"):
        Flux2VAE(AutoencoderKLConfig())


def test_conformance(one_thread):
    image = _image(batch=1)
    cf.check_declared_units(lambda: make_vae())
    cf.check_meta_load(lambda: make_vae(), (image,))
    config = cf.check_spec_config(FLUX2_VAE_SPEC, lambda: make_vae(tiny_config(patch_size=1)))
    assert config.patch_size == 1  # the BatchNorm width fixes the patch


def test_vram_managed_equals_unmanaged(tmp_path, one_thread):
    """Streaming the stages from cpu or from the file moves the same float32 bytes: bit-identical outputs,
    with the BatchNorm statistics (buffers outside the units) on the compute device too."""
    cf.check_streamed(lambda: make_vae(), (_image(batch=1),), tmp_path, min_units=4)


# ----------------------------------------------------------------------------------- parity
@pytest.mark.parity
@pytest.mark.parametrize("overrides", [{}, dict(batch_norm_eps=1e-2, mid_block_add_attention=False)])
def test_matches_diffusers_pipeline_latents(overrides, one_thread):
    pytest.importorskip("diffusers")
    ours, theirs = _pair(tiny_config(**overrides))
    image = _image()
    with torch.no_grad():
        expected = _reference_encode(theirs, image)
        latents = ours.encode(image)
        assert _rel_diff(latents, expected) <= TOL

        sampled = _reference_encode(theirs, image, torch.Generator().manual_seed(5), sample=True)
        ours_sampled = ours.encode(image, sample=True, generator=torch.Generator().manual_seed(5))
        assert _rel_diff(ours_sampled, sampled) <= TOL
        assert _max_diff(ours_sampled, latents) > 1e-3  # the draw is not the mean

        assert _rel_diff(ours.decode(expected), _reference_decode(theirs, expected)) <= TOL


@pytest.mark.parity
def test_tiled_matches_reference_convention(one_thread):
    """Tiling runs on the unpacked latents: a tiled encode/decode equals the pipeline's packing and BatchNorm
    around the runtime AutoencoderKL's tiled pass; a tile covering the image equals diffusers untiled."""
    pytest.importorskip("diffusers")
    from diffusers import Flux2KleinPipeline

    config = tiny_config()
    ours, theirs = _pair(config)
    plain = AutoencoderKL(
        AutoencoderKLConfig(**{k: getattr(config, k) for k in AutoencoderKLConfig.__dataclass_fields__})
    )
    plain.load_state_dict({k: v for k, v in ours.state_dict().items() if not k.startswith("bn.")}, strict=True)
    plain.eval()
    mean = theirs.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(theirs.bn.running_var.view(1, -1, 1, 1) + theirs.config.batch_norm_eps)
    image = _image(batch=1, height=64, width=96)
    tiles = dict(tiled=True, tile_size=32, tile_stride=16)
    with torch.no_grad():
        latents = ours.encode(image, **tiles)
        expected = (Flux2KleinPipeline._patchify_latents(plain.encode(image, **tiles)) - mean) / std
        assert _rel_diff(latents, expected) <= TOL
        assert _max_diff(latents, _reference_encode(theirs, image)) > 1e-3  # the tiles did change something

        decoded = ours.decode(latents, **tiles)
        expected = plain.decode(Flux2KleinPipeline._unpatchify_latents(latents * std + mean), **tiles)
        assert _rel_diff(decoded, expected) <= TOL

        whole = dict(tiled=True, tile_size=96, tile_stride=64)
        assert _rel_diff(ours.encode(image, **whole), _reference_encode(theirs, image)) <= TOL
        assert _rel_diff(ours.decode(latents, **whole), _reference_decode(theirs, latents)) <= TOL


# ----------------------------------------------------------------------------------- BFL layout
def _bfl_state(config: Flux2VAEConfig, seed: int) -> dict[str, torch.Tensor]:
    """Random weights in BFL's `ae.safetensors` layout: the LDM layout with the quant convs inside, plus the
    packed-latent BatchNorm statistics."""
    g = torch.Generator().manual_seed(seed)
    state = ldm_vae_state(config, g, scale=0.2, norm_offset=1.0, norm_scale=0.1, quant_convs_inside=True)
    state["bn.running_mean"] = torch.randn(config.packed_channels, generator=g)
    state["bn.running_var"] = 0.002 + 0.5 * torch.rand(config.packed_channels, generator=g)
    state["bn.num_batches_tracked"] = torch.tensor(77)
    return state


def _diffusers_convert_bfl(state: dict[str, torch.Tensor], num_blocks: int) -> dict[str, torch.Tensor]:
    """diffusers' LDM VAE converter plus the 7 keys it leaves out (formats README 3.3)."""
    out = diffusers_convert_ldm_vae(state, num_blocks)
    for src, dst in (("encoder.quant_conv", "quant_conv"), ("decoder.post_quant_conv", "post_quant_conv")):
        for p in ("weight", "bias"):
            out[f"{dst}.{p}"] = state[f"{src}.{p}"]
    for key in ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked"):
        out[key] = state[key]
    return out


@pytest.mark.parity
def test_bfl_file_loads_and_matches_diffusers(tmp_path, one_thread):
    pytest.importorskip("diffusers")
    config = tiny_config()
    state = _bfl_state(config, seed=7)
    converted = _diffusers_convert_bfl(state, len(config.block_out_channels))
    ours_keys = bfl_to_ours(dict(state))
    assert sorted(ours_keys) == sorted(converted)
    for key, value in converted.items():
        assert torch.equal(ours_keys[key], value), key

    save_file(state, str(tmp_path / "ae.safetensors"))  # no config.json: everything from the shapes
    ours = load_model(tmp_path / "ae.safetensors", specs=BOTH_SPECS)
    assert isinstance(ours, Flux2VAE) and ours.config == config
    theirs = _diffusers_vae(config)
    theirs.load_state_dict(converted, strict=True)
    image = _image()
    with torch.no_grad():
        expected = _reference_encode(theirs, image)
        assert _rel_diff(ours.encode(image), expected) <= TOL
        assert _rel_diff(ours.decode(expected), _reference_decode(theirs, expected)) <= TOL


@pytest.mark.parity
def test_diffusers_folder_loads_with_its_config(tmp_path, one_thread):
    """`save_pretrained` writes diffusers' own `config.json` (patch_size [2, 2], batch_norm_eps, ...)."""
    pytest.importorskip("diffusers")
    config = tiny_config(batch_norm_eps=1e-2)  # not the default: it must come from the json
    _, theirs = _pair(config, seed=4)
    theirs.save_pretrained(str(tmp_path / "vae"))
    specs = [*all_specs(), *([] if FLUX2_VAE_SPEC in all_specs() else [FLUX2_VAE_SPEC])]
    ours = load_model(tmp_path / "vae", specs=specs)
    assert isinstance(ours, Flux2VAE) and ours.config == config
    image = _image()
    with torch.no_grad():
        expected = _reference_encode(theirs, image)
        assert _rel_diff(ours.encode(image), expected) <= TOL
        assert _rel_diff(ours.decode(expected), _reference_decode(theirs, expected)) <= TOL


# ----------------------------------------------------------------------------------- full size (meta)
def _meta_state(name: str, prefix: str = "") -> dict[str, torch.Tensor]:
    shapes = json.loads((KEYS / f"{name}.json").read_text())
    return {prefix + k: torch.empty(v, device="meta") for k, v in shapes.items()}


def _shapes(state) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def _released_json() -> dict:
    """The `vae/config.json` diffusers writes for the released model: `AutoencoderKLFlux2`'s defaults."""
    from diffusers import AutoencoderKLFlux2

    params = inspect.signature(AutoencoderKLFlux2.__init__).parameters.values()
    return {
        "_class_name": "AutoencoderKLFlux2",
        **{p.name: list(p.default) if isinstance(p.default, tuple) else p.default for p in params if p.name != "self"},
    }


def test_full_size_keys_of_both_layouts():
    with torch.device("meta"):
        ours = _shapes(Flux2VAE().state_dict())
    assert ours == _shapes(_meta_state("flux2_vae_diffusers"))
    converted = bfl_to_ours(_meta_state("flux2_ae_orig"))
    assert _shapes(converted) == ours
    with torch.device("meta"):
        Flux2VAE().load_state_dict(converted, strict=True, assign=True)


@pytest.mark.parity
def test_full_size_bfl_conversion_matches_diffusers():
    pytest.importorskip("diffusers")
    state = _meta_state("flux2_ae_orig")
    assert _shapes(bfl_to_ours(dict(state))) == _shapes(_diffusers_convert_bfl(state, 4))


@pytest.mark.parametrize(
    ("name", "prefix", "layout"),
    [
        ("flux2_vae_diffusers", "", "diffusers"),
        ("flux2_ae_orig", "", "bfl"),
        ("flux2_ae_orig", "first_stage_model.", "bfl_comfyui"),
        ("flux2_ae_orig", "vae.", "bfl_vae_prefix"),
    ],
)
def test_flux2_files_are_ours_whatever_the_spec_order(name, prefix, layout):
    state = _meta_state(name, prefix)
    for specs in (BOTH_SPECS, BOTH_SPECS[::-1]):
        (rec,) = recognise(state, specs=specs)
        assert (rec.spec.name, rec.layout.name, len(rec.keys)) == ("flux2_vae", layout, 251)
    ours = rec.layout.to_ours(state)
    assert config_from_state(ours, None) == Flux2VAEConfig()


@pytest.mark.parametrize(
    ("name", "prefix"), [("flux1_vae_diffusers", ""), ("flux1_ae_orig", ""), ("flux1_ae_orig", "vae.")]
)
def test_flux1_and_z_image_files_are_not_claimed(name, prefix):
    state = _meta_state(name, prefix)
    with pytest.raises(UnknownModelError):
        recognise(state, specs=[FLUX2_VAE_SPEC])
    (rec,) = recognise(state, specs=BOTH_SPECS[::-1])
    assert rec.spec.name == "autoencoder_kl"


@pytest.mark.parity
def test_config_from_the_released_json():
    pytest.importorskip("diffusers")
    released = _released_json()
    ours = FLUX2_VAE_SPEC.layouts[0].to_ours(_meta_state("flux2_vae_diffusers"))
    assert config_from_state(ours, released) == Flux2VAEConfig()
    assert config_from_state({}, released) == Flux2VAEConfig()
    with pytest.raises(ConfigError, match="patch_size"):
        config_from_state(ours, {**released, "patch_size": [1, 1]})
    with pytest.raises(ConfigError, match="decoder_block_out_channels"):
        config_from_state(ours, {**released, "decoder_block_out_channels": [64, 128, 256, 256]})
    with pytest.raises(ConfigError, match="latent_channels"):
        config_from_state(ours, {**released, "latent_channels": 16})


def test_bfl_conversion_names_an_unknown_key():
    state = _meta_state("flux2_ae_orig")
    state["bn.weight"] = torch.empty(128, device="meta")
    with pytest.raises(KeyError, match="bn.weight"):
        bfl_to_ours(state)
