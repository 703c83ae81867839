"""The Qwen-Image 2.1 VAE: parity with diffusers' `AutoencoderKLQwenImage21` and the QwenImage21Pipeline's latent
code on tiny configs, tiling, the runtime conformance checks, the full-size keys (meta) and the spec."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from diffsynth.qwen_image.qwen_image21.vae import (
    QWEN_IMAGE21_LATENTS_MEAN,
    QWEN_IMAGE21_LATENTS_STD,
    QwenImage21VAE,
    QwenImage21VAEConfig,
)
from diffsynth.qwen_image.qwen_image21.vae_formats import QWEN_IMAGE21_VAE_SPEC, config_from_state
from diffsynth.runtime.errors import ConfigError, UnknownModelError
from diffsynth.runtime.loading import load_model, recognise
from diffsynth.runtime.models.autoencoder_kl import AUTOENCODER_KL_SPEC, AutoencoderKL
from diffsynth.runtime.models.wan_vae import WAN21_VAE_SPEC, WAN22_VAE_SPEC, WanVAE, WanVAEConfig
from diffsynth.runtime.testing import conformance as cf
from diffsynth.runtime.testing.weights import random_weights

KEYS = Path(__file__).parent / "data" / "keys"
TOL = 1e-5  # float32, absolute; latents and images here are O(1)
SPECS = (AUTOENCODER_KL_SPEC, WAN21_VAE_SPEC, WAN22_VAE_SPEC, QWEN_IMAGE21_VAE_SPEC)

# `vae/config.json` of Qwen/Qwen-Image-2.1 (diffusers writes its defaults, which are the release's)
RELEASED_JSON = {
    "_class_name": "AutoencoderKLQwenImage21",
    "attn_scales": [],
    "base_dim": 96,
    "decoder_base_dim": 144,
    "dim_mult": [1, 2, 4, 8, 8],
    "dropout": 0.0,
    "in_channels": 4,
    "is_residual": True,
    "latents_mean": list(QWEN_IMAGE21_LATENTS_MEAN),
    "latents_std": list(QWEN_IMAGE21_LATENTS_STD),
    "num_res_blocks": 2,
    "out_channels": 4,
    "patch_size": None,
    "scale_factor_spatial": 16,
    "scale_factor_temporal": 8,
    "temperal_downsample": [False, True, True, True],
    "z_dim": 64,
}


# ----------------------------------------------------------------------------------- tiny model
def tiny_config(**overrides) -> QwenImage21VAEConfig:
    """The one place tiny sizes live: five stages (16x, as released), statistics far from (0, 1)."""
    fields = dict(
        base_dim=8,
        decoder_base_dim=12,
        z_dim=4,
        latents_mean=(0.4, -1.3, 0.2, 2.1),
        latents_std=(1.7, 0.6, 2.4, 1.1),
    )
    return QwenImage21VAEConfig(**{**fields, **overrides})


# a second shape: one residual block per stage, time halved at other stages (the first stage's shortcut
# averages over a zero frame, the last upsampling stage keeps one frame of two)
OTHER = dict(num_res_blocks=1, temporal_downsample=(True, False, True, False), decoder_base_dim=None)


def make_vae(config: QwenImage21VAEConfig | None = None, seed: int = 0) -> QwenImage21VAE:
    model = random_weights(QwenImage21VAE(config or tiny_config()), seed, scale=0.2)
    if not model.decoder.conv_out.weight.is_meta:
        with torch.no_grad():  # outputs well past [-1, 1], so that the clamp matters
            model.decoder.conv_out.weight.mul_(20.0)
    return model.eval()


def _image(batch=2, height=64, width=64, seed=3) -> torch.Tensor:
    return torch.rand(batch, 4, height, width, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


# ----------------------------------------------------------------------------------- references
def _diffusers_vae(config: QwenImage21VAEConfig):
    from diffusers import AutoencoderKLQwenImage21

    return AutoencoderKLQwenImage21(
        base_dim=config.base_dim,
        decoder_base_dim=config.decoder_base_dim,
        z_dim=config.z_dim,
        dim_mult=list(config.dim_mult),
        num_res_blocks=config.num_res_blocks,
        temperal_downsample=list(config.temporal_downsample),
        latents_mean=list(config.latents_mean),
        latents_std=list(config.latents_std),
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        scale_factor_spatial=2 ** (len(config.dim_mult) - 1),
    ).eval()


def _pair(config: QwenImage21VAEConfig | None = None, seed: int = 0):
    """Our tiny VAE and diffusers' with the same weights (a strict load of our state dict)."""
    config = config or tiny_config()
    ours = make_vae(config, seed)
    theirs = _diffusers_vae(config)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours, theirs


def _reference_encode(vae, image: torch.Tensor) -> torch.Tensor:
    """`QwenImage21Pipeline._encode_vae_image` as is (argmax: the posterior mean, then standardised)."""
    from diffusers import QwenImage21Pipeline

    pipe = SimpleNamespace(vae=vae, latent_channels=vae.config.z_dim)
    return QwenImage21Pipeline._encode_vae_image(pipe, image.unsqueeze(2), None)[:, :, 0]


def _reference_stats(vae) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1)
    return mean, torch.tensor(vae.config.latents_std).view(1, -1, 1, 1)


def _reference_decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """The tail of `QwenImage21Pipeline.__call__`: de-standardise, `vae.decode`, take the frame."""
    mean, std = _reference_stats(vae)
    return vae.decode((latents * std + mean).unsqueeze(2), return_dict=False)[0][:, :, 0]


# ----------------------------------------------------------------------------------- parity
@pytest.mark.parity
@pytest.mark.parametrize("overrides", [{}, OTHER], ids=["released_shape", "other_shape"])
def test_matches_diffusers(overrides, one_thread):
    pytest.importorskip("diffusers")
    ours, theirs = _pair(tiny_config(**overrides))
    image = _image()
    with torch.no_grad():
        expected = _reference_encode(theirs, image)
        latents = ours.encode(image)
        assert latents.shape == (2, 4, 4, 4)
        assert _max_diff(latents, expected) <= TOL
        assert expected.abs().max() > 0.5  # not a trivially small comparison

        decoded = ours.decode(expected)
        reference = _reference_decode(theirs, expected)
        assert decoded.shape == image.shape
        assert _max_diff(decoded, reference) <= TOL
        assert (reference.abs() == 1).float().mean() > 0.05 and (reference.abs() < 1).float().mean() > 0.05


@pytest.mark.parity
def test_default_config_is_diffusers_default():
    pytest.importorskip("diffusers")
    from diffusers import AutoencoderKLQwenImage21

    params = inspect.signature(AutoencoderKLQwenImage21.__init__).parameters
    defaults = {name: p.default for name, p in params.items() if name != "self"}
    assert {"_class_name": "AutoencoderKLQwenImage21", **defaults} == RELEASED_JSON
    assert config_from_state({}, RELEASED_JSON) == QwenImage21VAEConfig()


@pytest.mark.parity
def test_full_size_keys_and_shapes_equal_diffusers():
    """The official checkpoint's keys: diffusers' default model, built on meta, state dict for state dict."""
    pytest.importorskip("diffusers")
    from diffusers import AutoencoderKLQwenImage21

    with torch.device("meta"):
        theirs = {k: tuple(v.shape) for k, v in AutoencoderKLQwenImage21().state_dict().items()}
        ours = {k: tuple(v.shape) for k, v in QwenImage21VAE().state_dict().items()}
    assert sorted(ours) == sorted(theirs)
    assert ours == theirs
    assert ours["encoder.conv_in.weight"] == (96, 4, 3, 3)
    assert ours["decoder.up_blocks.0.upsampler.time_conv.weight"] == (2304, 1152, 1, 1)


@pytest.mark.parity
def test_diffusers_folder_loads_with_its_config(tmp_path, one_thread):
    """`save_pretrained` output (its own config.json), recognised among every VAE spec, Wan 2.2 included."""
    pytest.importorskip("diffusers")
    config = tiny_config(**OTHER)  # not the defaults: everything comes from the file and its json
    _, theirs = _pair(config, seed=4)
    theirs.save_pretrained(str(tmp_path / "vae"))
    for specs in (SPECS, SPECS[::-1]):
        ours = load_model(tmp_path / "vae", specs=specs)
        assert isinstance(ours, QwenImage21VAE) and ours.config == config
    image = _image(batch=1)
    with torch.no_grad():
        expected = _reference_encode(theirs, image)
        assert _max_diff(ours.encode(image), expected) <= TOL
        assert _max_diff(ours.decode(expected), _reference_decode(theirs, expected)) <= TOL


@pytest.mark.parity
def test_wan22_diffusers_file_is_not_claimed():
    pytest.importorskip("diffusers")
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):
        state = AutoencoderKLWan(
            base_dim=160,
            decoder_base_dim=256,
            z_dim=48,
            is_residual=True,
            in_channels=12,
            out_channels=12,
            patch_size=2,
            latents_mean=[0.0] * 48,
            latents_std=[1.0] * 48,
        ).state_dict()
    with pytest.raises(UnknownModelError):
        recognise(state, specs=[QWEN_IMAGE21_VAE_SPEC])
    for specs in (SPECS, SPECS[::-1]):
        (rec,) = recognise(state, specs=specs)
        assert rec.spec.name == "wan22_vae"


# ----------------------------------------------------------------------------------- model
def test_shapes_properties_and_input_errors(one_thread):
    vae = make_vae()
    assert (vae.latent_channels, vae.z_dim, vae.spatial_compression) == (4, 4, 16)
    image = _image(batch=1, height=32, width=48)
    with torch.no_grad():
        latents = vae.encode(image)
        assert latents.shape == (1, 4, 2, 3)
        out = vae.decode(latents)
    assert out.shape == image.shape and out.abs().max() <= 1.0
    with pytest.raises(ConfigError, match=r"\[B, 4, H, W\]"):
        vae.encode(image[:, :3])
    with pytest.raises(ConfigError, match="multiples of 16"):
        vae.encode(_image(batch=1, height=40, width=48))
    with pytest.raises(ConfigError, match=r"\[B, 4, h, w\]"):
        vae.decode(latents.unsqueeze(2))
    with pytest.raises(ConfigError, match="tile_stride"):
        vae.encode(image, tiled=True, tile_size=2, tile_stride=3)
    with pytest.raises(ConfigError, match="tile_size"):
        vae.decode(latents, tiled=True, tile_size=(2, 0), tile_stride=1)
    with pytest.raises(ConfigError, match="QwenImage21VAEConfig"):
        QwenImage21VAE(WanVAEConfig())


def test_config_validation():
    assert QwenImage21VAEConfig().latents_mean == QWEN_IMAGE21_LATENTS_MEAN
    assert tiny_config(decoder_base_dim=None).decoder_base_dim == 8
    with pytest.raises(ValueError, match="latents_mean has 64 values but z_dim=4"):
        QwenImage21VAEConfig(z_dim=4)
    with pytest.raises(ValueError, match="latents_std must be positive"):
        tiny_config(latents_std=(1.0, 0.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="temporal_downsample has 3 entries"):
        tiny_config(temporal_downsample=(False, True, True))
    with pytest.raises(ValueError, match="encoder stage 4 goes 32->64"):
        tiny_config(dim_mult=(1, 2, 4, 4, 8))
    with pytest.raises(ValueError, match="base_dim must be a positive int"):
        tiny_config(base_dim=0)


def test_tiles_blend_untiled_crops(one_thread):
    """Where one tile alone covers the output it equals the untiled pass over that tile's crop; a tile over
    the whole input is the untiled pass; overlaps are blends, so tiling does change the result there."""
    vae = make_vae()
    image = _image(batch=1, height=96, width=128)  # 6 x 8 latent cells
    tiles = dict(tiled=True, tile_size=(4, 4), tile_stride=(2, 3))
    with torch.no_grad():
        whole = vae.encode(image)
        tiled = vae.encode(image, **tiles)
        first = vae.encode(image[:, :, :64, :64])  # the tile at the origin, 4 x 4 cells
        assert _max_diff(tiled[..., :2, :1], first[..., :2, :1]) <= 1e-6  # cells only it covers
        assert _max_diff(tiled, whole) > 1e-3
        assert _max_diff(vae.encode(image, tiled=True, tile_size=(6, 8), tile_stride=(6, 8)), whole) <= 1e-6

        latents = whole
        decoded = vae.decode(latents, **tiles)
        first = vae.decode(latents[..., :4, :4])
        assert _max_diff(decoded[..., :32, :16], first[..., :32, :16]) <= 1e-6
        assert _max_diff(decoded, vae.decode(latents)) > 1e-3
        assert _max_diff(vae.decode(latents, tiled=True, tile_size=8, tile_stride=8), vae.decode(latents)) <= 1e-6


def test_conformance(one_thread):
    image = _image(batch=1, height=32, width=32)
    cf.check_declared_units(lambda: make_vae())
    cf.check_meta_load(lambda: make_vae(), (image,))
    stats = {"latents_mean": list(tiny_config().latents_mean), "latents_std": list(tiny_config().latents_std)}
    assert cf.check_spec_config(QWEN_IMAGE21_VAE_SPEC, lambda: make_vae(), stats) == tiny_config()
    config = tiny_config(**OTHER)
    assert cf.check_spec_config(QWEN_IMAGE21_VAE_SPEC, lambda: make_vae(config), stats) == config
    cf.check_layout_roundtrip(lambda: make_vae(), QWEN_IMAGE21_VAE_SPEC.layouts[0])


def test_vram_managed_equals_unmanaged(tmp_path, one_thread):
    """Streaming the stages from cpu or from the file gives bit-identical outputs."""
    cf.check_streamed(lambda: make_vae(), (_image(batch=1, height=32, width=32),), tmp_path, min_units=4)


# ----------------------------------------------------------------------------------- the spec
def _meta_ours(config: QwenImage21VAEConfig | None = None) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return QwenImage21VAE(config).state_dict()


def _meta_state(name: str) -> dict[str, torch.Tensor]:
    shapes = json.loads((KEYS / f"{name}.json").read_text())
    return {k: torch.empty(v, device="meta") for k, v in shapes.items()}


def test_full_size_file_is_ours_whatever_the_spec_order():
    """The Wan 2.2 diffusers signature is a subset of ours: both own the file, the longer signature wins."""
    state = _meta_ours()
    assert WAN22_VAE_SPEC.match(state) is not None and WAN21_VAE_SPEC.match(state) is None
    for specs in (SPECS, SPECS[::-1]):
        (rec,) = recognise(state, specs=specs)
        assert (rec.spec.name, rec.layout.name, len(rec.keys)) == ("qwen_image21_vae", "diffusers", len(state))
    assert config_from_state(rec.layout.to_ours(state), None) == QwenImage21VAEConfig()
    assert config_from_state(state, RELEASED_JSON) == QwenImage21VAEConfig()
    assert config_from_state({}, RELEASED_JSON) == QwenImage21VAEConfig()


def test_other_vae_files_are_not_claimed():
    with torch.device("meta"):
        wan22_original = WanVAE(WanVAEConfig(variant="2.2")).state_dict()
        flux = AutoencoderKL().state_dict()
    others = {
        "wan21_vae": _meta_state("qwenimage_vae_diffusers"),  # Qwen-Image's VAE: diffusers' Wan 2.1 layout
        "wan22_vae": wan22_original,
        "autoencoder_kl": flux,
    }
    for name, state in others.items():
        with pytest.raises(UnknownModelError):
            recognise(state, specs=[QWEN_IMAGE21_VAE_SPEC])
        (rec,) = recognise(state, specs=SPECS[::-1])
        assert rec.spec.name == name


def test_config_json_against_shapes():
    state = _meta_ours(tiny_config())
    stats = dict(latents_mean=[0.4, -1.3, 0.2, 2.1], latents_std=[1.7, 0.6, 2.4, 1.1])
    small = {**RELEASED_JSON, "base_dim": 8, "decoder_base_dim": 12, "z_dim": 4, **stats}
    assert config_from_state(state, small) == tiny_config()
    with pytest.raises(ConfigError, match="latents_mean has 64 values but z_dim=4"):
        config_from_state(state, None)  # no statistics for a z_dim other than the released one
    for field, wrong in [
        ("base_dim", 16),
        ("decoder_base_dim", 8),
        ("z_dim", 8),
        ("dim_mult", [1, 2, 4, 4, 8]),
        ("num_res_blocks", 3),
        ("in_channels", 3),
        ("out_channels", 3),
    ]:
        with pytest.raises(ConfigError, match=f"{field}="):
            config_from_state(state, {**small, field: wrong})
    with pytest.raises(ConfigError, match="temporal_downsample="):
        config_from_state(state, {**small, "temperal_downsample": [False, True, True, False]})
    for field, value in [("attn_scales", [0.5]), ("is_residual", False), ("patch_size", 2)]:
        with pytest.raises(ConfigError, match=f"{field}="):
            config_from_state(state, {**small, field: value})
    with pytest.raises(ConfigError, match="scale_factor_spatial=8"):
        config_from_state(state, {**small, "scale_factor_spatial": 8})
    # another model's config.json beside the file is not read
    assert config_from_state(_meta_ours(), {"_class_name": "QwenImageTransformer2DModel", "z_dim": 3}).z_dim == 64


def test_video_convolutions_are_refused():
    state = dict(_meta_ours())
    state["encoder.conv_in.weight"] = torch.empty(96, 4, 3, 3, 3, device="meta")
    with pytest.raises(ConfigError, match="5-D weight is a Wan video VAE"):
        config_from_state(state, None)


def test_tiny_folder_loads(tmp_path, one_thread):
    """Our own state dict and a diffusers-style config.json, loaded through the registry's recognition."""
    model = make_vae(tiny_config(**OTHER), seed=2)
    folder = tmp_path / "vae"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    small = {
        **RELEASED_JSON,
        "base_dim": 8,
        "decoder_base_dim": None,
        "z_dim": 4,
        "num_res_blocks": 1,
        "temperal_downsample": [True, False, True, False],
        "latents_mean": list(model.config.latents_mean),
        "latents_std": list(model.config.latents_std),
    }
    (folder / "config.json").write_text(json.dumps(small))
    loaded = load_model(folder, specs=SPECS)
    assert isinstance(loaded, QwenImage21VAE) and loaded.config == model.config
    image = _image(batch=1, height=32, width=32)
    with torch.no_grad():
        assert torch.equal(loaded(image), model(image))
