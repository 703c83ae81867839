"""LTX-2 latent upsampler: parity with diffusers' `LTX2LatentUpsamplerModel` in every upsampling variant, the
released configuration's keys and shapes on the meta device, config from shapes, and loading files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from diffsynth.ltx2.upsampler import LTX2LatentUpsampler, LTX2LatentUpsamplerConfig, pixel_shuffle
from diffsynth.ltx2.upsampler_formats import LAYOUTS, LTX2_UPSAMPLER_SPEC, config_from_state
from diffsynth.runtime.errors import CheckpointError, ConfigError
from diffsynth.runtime.loading import load_model
from diffsynth.runtime.testing import conformance as cf

VARIANTS = {  # name -> config overrides of tiny_config()
    "rational x2": {},
    "rational x1.5": {"spatial_scale": 1.5},
    "shuffle x2": {"rational_resampler": False},
    "shuffle x2, 2-D convs": {"rational_resampler": False, "dims": 2},
    "rational x2, 2-D convs": {"dims": 2},
    "temporal x2": {"spatial_upsample": False, "temporal_upsample": True},
    "spatio-temporal x2": {"temporal_upsample": True},
}


def tiny_config(**overrides) -> LTX2LatentUpsamplerConfig:
    return LTX2LatentUpsamplerConfig(**{"in_channels": 8, "mid_channels": 32, "num_blocks_per_stage": 2, **overrides})


def tiny_model(seed: int = 0, **overrides) -> LTX2LatentUpsampler:
    model = LTX2LatentUpsampler(tiny_config(**overrides)).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(
                (1.0 if "norm" in name and name.endswith("weight") else 0.0)
                + 0.1 * torch.randn(p.shape, generator=generator)
            )
    return model


def tiny_latents(frames: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 8, frames, 4, 6, generator=torch.Generator().manual_seed(seed))


def _shapes(state) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


# ----------------------------------------------------------------------------------- model
@pytest.mark.parametrize(
    ("overrides", "shape"),
    [
        ({}, (2, 8, 3, 8, 12)),
        ({"spatial_scale": 1.5}, (2, 8, 3, 6, 9)),
        ({"rational_resampler": False, "dims": 2}, (2, 8, 3, 8, 12)),
        ({"spatial_upsample": False, "temporal_upsample": True}, (2, 8, 5, 4, 6)),  # 2F - 1: the first new frame goes
        ({"temporal_upsample": True}, (2, 8, 5, 8, 12)),
    ],
)
def test_output_shapes(overrides, shape):
    with torch.no_grad():
        assert tiny_model(**overrides)(tiny_latents()).shape == shape


def test_pixel_shuffle_places_channel_blocks():
    """Channel c * 4 + 2i + j of the input becomes pixel (2y + i, 2x + j) of output channel c."""
    x = torch.arange(2 * 4 * 2 * 3, dtype=torch.float32).reshape(1, 8, 2, 3)
    out = pixel_shuffle(x, (2, 2))
    assert out.shape == (1, 2, 4, 6)
    for c, i, j, y, xx in [(0, 0, 0, 0, 0), (1, 1, 0, 1, 2), (0, 1, 1, 0, 1)]:
        assert out[0, c, 2 * y + i, 2 * xx + j] == x[0, c * 4 + 2 * i + j, y, xx]
    assert torch.equal(pixel_shuffle(x, (2, 2)), torch.nn.functional.pixel_shuffle(x, 2))


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"mid_channels": 48}, "mid_channels"),
        ({"dims": 1}, "dims"),
        ({"spatial_upsample": False}, "temporal_upsample"),
        ({"spatial_scale": 3.0}, "spatial_scale"),
        ({"dims": 2, "temporal_upsample": True}, "dims=3"),
    ],
)
def test_config_validation_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


def test_bad_latents_name_the_expected_shape():
    with pytest.raises(ConfigError, match=r"\[B, 8, F, h, w\], got \(2, 4, 3, 4, 6\)"):
        tiny_model()(torch.zeros(2, 4, 3, 4, 6))


def test_conformance():
    latents = tiny_latents()
    cf.check_forward(tiny_model, (latents,), expected_shapes=[(2, 8, 3, 8, 12)])
    cf.check_meta_load(tiny_model, (latents,))
    cf.check_declared_units(tiny_model)
    cf.check_layout_roundtrip(tiny_model, LAYOUTS[0])


def test_vram_managed_equals_unmanaged():
    from diffsynth.runtime.vram import enable_vram_management

    latents = tiny_latents()
    with torch.no_grad():
        reference = tiny_model()(latents)
        model = tiny_model().requires_grad_(False)
        handle = enable_vram_management(model, {"offload_device": "cpu", "onload_device": "cpu"}, vram_limit=0)
        assert handle.plan.resident == () and len(handle.units) == 4
        torch.testing.assert_close(model(latents), reference, rtol=0, atol=0)


# ----------------------------------------------------------------------------------- config and files
@pytest.mark.parametrize("name", list(VARIANTS))
def test_config_from_shapes(name):
    config = tiny_config(**VARIANTS[name])
    assert cf.check_spec_config(LTX2_UPSAMPLER_SPEC, lambda: LTX2LatentUpsampler(config)) == config


def test_released_configuration_is_the_default():
    """ltx-2-spatial-upscaler-x2-1.0: 128 -> 1024 channels, 4 blocks a stage, 3-D convs, rational x2."""
    with torch.device("meta"):
        model = LTX2LatentUpsampler()
    state = model.state_dict()
    # stem conv + norm 4, 8 residual blocks x 8, resampler conv 2 + blur kernel, final conv 2
    assert len(state) == 4 + 8 * 8 + 3 + 2 and state["upsampler.conv.weight"].shape == (4096, 1024, 3, 3)
    assert state["upsampler.blur_down.kernel"].shape == (1, 1, 5, 5)
    assert config_from_state(state) == LTX2LatentUpsamplerConfig()
    conv3d = lambda c_in, c_out: c_in * c_out * 27 + c_out  # noqa: E731
    expected = conv3d(128, 1024) + 2048 + 8 * (2 * conv3d(1024, 1024) + 2 * 2048)
    expected += 1024 * 4096 * 9 + 4096 + conv3d(1024, 128)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_a_num_of_three_reads_as_x1_5_unless_the_config_says_0_75():
    state = tiny_model(spatial_scale=1.5).state_dict()
    assert config_from_state(state).spatial_scale == 1.5
    config = config_from_state(state, {"_class_name": "LTX2LatentUpsamplerModel", "rational_spatial_scale": 0.75})
    assert config.spatial_scale == 0.75 and config.spatial_factor == 0.75


def test_unknown_upsampling_steps_are_refused():
    state = tiny_model(rational_resampler=False).state_dict()
    state["upsampler.0.weight"] = torch.zeros(3 * 32, 32, 3, 3)
    with pytest.raises(CheckpointError, match=r"upsampler.0.weight \(96, 32, 3, 3\) is no known upsampling step"):
        config_from_state(state)
    state = tiny_model().state_dict()
    state["upsampler.conv.weight"] = torch.zeros(5 * 32, 32, 3, 3)
    with pytest.raises(CheckpointError, match="not the square of a supported factor"):
        config_from_state(state)


def test_load_the_original_file_and_a_diffusers_folder(tmp_path):
    model = tiny_model(spatial_scale=1.5)
    path = tmp_path / "ltx-2-spatial-upscaler-tiny.safetensors"
    save_file(model.state_dict(), path)
    folder = tmp_path / "latent_upsampler"
    folder.mkdir()
    save_file(model.state_dict(), folder / "diffusion_pytorch_model.safetensors")
    (folder / "config.json").write_text(
        json.dumps({"_class_name": "LTX2LatentUpsamplerModel", "mid_channels": 32, "rational_spatial_scale": 1.5})
    )
    latents = tiny_latents()
    with torch.no_grad():
        expected = model(latents)
        for source in (path, folder):
            loaded = load_model(source, specs=[LTX2_UPSAMPLER_SPEC])
            assert loaded.config == model.config
            assert torch.equal(loaded(latents), expected)
    (folder / "config.json").write_text(json.dumps({"_class_name": "LTX2LatentUpsamplerModel", "mid_channels": 64}))
    with pytest.raises(ConfigError, match="mid_channels=64"):
        load_model(folder, specs=[LTX2_UPSAMPLER_SPEC])


# ----------------------------------------------------------------------------------- parity with diffusers
def _diffusers_model(config: LTX2LatentUpsamplerConfig):
    from diffusers.pipelines.ltx2.latent_upsampler import LTX2LatentUpsamplerModel

    return LTX2LatentUpsamplerModel(
        in_channels=config.in_channels,
        mid_channels=config.mid_channels,
        num_blocks_per_stage=config.num_blocks_per_stage,
        dims=config.dims,
        spatial_upsample=config.spatial_upsample,
        temporal_upsample=config.temporal_upsample,
        rational_spatial_scale=config.spatial_scale,
        use_rational_resampler=config.rational_resampler,
    ).eval()


@pytest.mark.parity
@pytest.mark.parametrize("name", list(VARIANTS))
def test_matches_diffusers(name):
    """Same weights loaded strictly into diffusers' model (the keys are the same), same output."""
    pytest.importorskip("diffusers")
    ours = tiny_model(**VARIANTS[name])
    theirs = _diffusers_model(ours.config)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    latents = tiny_latents()
    with torch.no_grad():
        expected, got = theirs(latents), ours(latents)
    assert got.shape == expected.shape
    assert expected.abs().max() > 0.1
    assert (got - expected).abs().max().item() <= 1e-5


@pytest.mark.parity
def test_release_keys_match_diffusers_conversion_config():
    """diffusers converts ltx-2-spatial-upscaler-x2-1.0 by a strict load into `LTX2LatentUpsamplerModel` with
    its "2.0" config, so that model's keys and shapes are the file's: ours must equal them."""
    pytest.importorskip("diffusers")
    with torch.device("meta"):
        theirs = _diffusers_model(
            LTX2LatentUpsamplerConfig(in_channels=128, mid_channels=1024, num_blocks_per_stage=4, spatial_scale=2.0)
        )
        ours = LTX2LatentUpsampler()
    assert _shapes(ours.state_dict()) == _shapes(theirs.state_dict())
