"""LTX-2 video VAE: tiny-config behaviour, parity with diffusers' `AutoencoderKLLTX2Video`, full-size key and
shape checks against the released file, and loading in each layout."""

from __future__ import annotations

import json
import math

import diffsynth_ltx2_release_checks as checks  # loaded by conftest
import diffsynth_ltx2_test_repo as repo_module  # loaded by conftest
import pytest
import torch
from safetensors.torch import save_file

from diffsynth.ltx2.video_vae import LTX2VideoVAE, LTX2VideoVAEConfig, depth_to_space, space_to_depth
from diffsynth.ltx2.video_vae_formats import (
    LAYOUTS,
    LTX2_VIDEO_VAE_SPEC,
    UNUSED_STATISTICS,
    config_from_state,
    diffusers_to_ours,
    ours_to_diffusers,
)
from diffsynth.runtime.checkpoint import open_checkpoint
from diffsynth.runtime.errors import CheckpointError, ConfigError, UnknownModelError
from diffsynth.runtime.loading import load_model, recognise
from diffsynth.runtime.testing import conformance as cf

STATS = "per_channel_statistics."


def tiny_config(**overrides) -> LTX2VideoVAEConfig:
    """The only place tiny sizes live. The stage structure is the release's (diffusers' converter hard-codes
    its block indices); widths start at 8 and stage lengths differ so index mix-ups cannot hide."""
    kwargs = dict(
        latent_channels=8, encoder_layers=(2, 1, 1, 1, 1), decoder_base_channels=8, decoder_layers=(1, 2, 1, 1)
    )
    kwargs.update(overrides)
    return LTX2VideoVAEConfig(**kwargs)


def tiny_model(seed: int = 0, **overrides) -> LTX2VideoVAE:
    """Random weights (the release has no norm weights) and statistics away from identity."""
    model = LTX2VideoVAE(tiny_config(**overrides)).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.05 * torch.randn(p.shape, generator=generator))
        c = model.config.latent_channels
        model.per_channel_statistics.get_buffer("mean-of-means").copy_(0.3 * torch.randn(c, generator=generator))
        model.per_channel_statistics.get_buffer("std-of-means").copy_(0.5 + torch.rand(c, generator=generator))
    return model


def tiny_video(frames: int = 9, size: tuple[int, int] = (64, 64), seed: int = 0) -> torch.Tensor:
    return torch.rand(1, 3, frames, *size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _original_file(model: LTX2VideoVAE) -> dict[str, torch.Tensor]:
    """Our state dict as the released file holds it: `vae.` prefix plus the three statistics nobody reads."""
    state = {f"vae.{k}": v.clone() for k, v in model.state_dict().items()}
    c = model.config.latent_channels
    for i, name in enumerate(UNUSED_STATISTICS):
        state[f"vae.{name}"] = torch.full((c,), float(i + 2))
    return state


_meta, _shapes = checks.released_meta, checks.shapes


# ----------------------------------------------------------------------------------- config and model
def test_default_config_is_the_release():
    config = LTX2VideoVAEConfig()
    assert (config.latent_channels, config.patch_size) == (128, 4)
    assert (config.spatial_compression, config.temporal_compression) == (32, 8)
    assert config.encoder_causal and not config.decoder_causal


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(encoder_layers=(1, 1, 1)), "encoder_layers"),
        (dict(decoder_layers=(1, 0, 1, 1)), "decoder_layers"),
        (dict(encoder_downsamples=("space", "time", "all", "sideways")), "encoder_downsamples"),
        (dict(decoder_upsamples=("all", "all", "space")), "decoder_upsamples"),
        (dict(decoder_upsample_residual=(True,)), "decoder_upsample_residual"),
        (dict(decoder_padding_mode="mirror"), "decoder_padding_mode"),
        (dict(latent_channels=0), "latent_channels"),
        (dict(scaling_factor=0.0), "scaling_factor"),
    ],
)
def test_config_validation_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


@pytest.mark.parametrize("frames", [1, 9, 17])
def test_encode_decode_shapes(frames):
    model = tiny_model()
    with torch.no_grad():
        latents = model.encode(tiny_video(frames, (64, 96)))
        assert latents.shape == (1, 8, 1 + (frames - 1) // 8, 2, 3)
        video = model.decode(latents)
    assert video.shape == (1, 3, frames, 64, 96)
    assert video.abs().max() <= 1


def test_conformance_forward_and_meta_load():
    video = tiny_video(1)
    cf.check_forward(tiny_model, (video,), expected_shapes=[video.shape])
    cf.check_meta_load(tiny_model, (video,))


def test_conformance_backward_and_gradient_checkpointing():
    video = tiny_video(1)
    cf.check_backward(tiny_model, (video,))
    cf.check_gradient_checkpointing(tiny_model, (video,))


def test_conformance_units_spec_config_and_layouts():
    cf.check_declared_units(tiny_model)
    cf.check_spec_config(LTX2_VIDEO_VAE_SPEC, tiny_model)
    for layout in LAYOUTS:
        from_ours = ours_to_diffusers if layout.name == "diffusers" else None
        cf.check_layout_roundtrip(tiny_model, layout, from_ours)


def test_declared_units_are_the_stages_and_resamplers():
    with torch.device("meta"):
        model = LTX2VideoVAE()
    assert len(model.get_submodule("encoder.down_blocks")) == 9
    assert len(model.get_submodule("decoder.up_blocks")) == 7


def test_encoder_is_causal_and_decoder_is_not():
    """Latent frame 0 sees video frame 0 only; the (non-causal) decoder's first frame sees later latents."""
    model = tiny_model()
    video = tiny_video(9)
    later = video.clone()
    later[:, :, 1:] = -later[:, :, 1:]
    with torch.no_grad():
        a, b = model.encode(video), model.encode(later)
        torch.testing.assert_close(a[:, :, :1], b[:, :, :1], atol=1e-6, rtol=0)
        assert (a[:, :, 1] - b[:, :, 1]).abs().max() > 1e-3
        changed = a.clone()
        changed[:, :, 1] += 1.0
        first = (model.decode(a, clamp=False) - model.decode(changed, clamp=False))[:, :, 0].abs().max()
        assert first > 1e-4
        causal = tiny_model(decoder_causal=True)
        first = (causal.decode(a, clamp=False) - causal.decode(changed, clamp=False))[:, :, 0].abs().max()
        assert first < 1e-6


def test_latents_are_normalised_with_mean_and_std_of_means():
    model = tiny_model()
    plain = tiny_model()
    plain.per_channel_statistics.get_buffer("mean-of-means").zero_()
    plain.per_channel_statistics.get_buffer("std-of-means").fill_(1.0)
    plain.config.scaling_factor = 2.0
    video = tiny_video()
    mean = model.per_channel_statistics.get_buffer("mean-of-means").view(1, -1, 1, 1, 1)
    std = model.per_channel_statistics.get_buffer("std-of-means").view(1, -1, 1, 1, 1)
    with torch.no_grad():
        raw = plain.encode(video) / 2.0
        torch.testing.assert_close(model.encode(video), (raw - mean) / std)
        latents = model.encode(video)
        torch.testing.assert_close(model.decode(latents), plain.decode((latents * std + mean) * 2.0))


def test_encode_samples_the_posterior_reproducibly():
    model, video = tiny_model(), tiny_video()
    with torch.no_grad():
        a = model.encode(video, sample=True, generator=torch.Generator().manual_seed(1))
        b = model.encode(video, sample=True, generator=torch.Generator().manual_seed(1))
        c = model.encode(video, sample=True, generator=torch.Generator().manual_seed(2))
        mode = model.encode(video)
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, mode)


def test_vram_managed_equals_unmanaged(tmp_path):
    """Streaming each stage/resampler from cpu or from the file moves the same float32 bytes: same video."""
    from diffsynth.runtime.vram import enable_vram_management

    video = tiny_video(1)
    with torch.no_grad():
        reference = tiny_model()(video)
        model = tiny_model().requires_grad_(False)  # frozen parameters are the ones that move
        stream = {"offload_device": "cpu", "onload_device": "cpu"}
        handle = enable_vram_management(model, stream, vram_limit=0, device="cpu")
        assert handle.plan.resident == () and len(handle.units) == 9 + 7
        torch.testing.assert_close(model(video), reference, rtol=0, atol=0)
        assert handle.report().bytes_moved > 0
        model = tiny_model().requires_grad_(False)
        path = tmp_path / "vae.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
        disk = {"offload_device": "disk", "onload_device": "disk"}
        enable_vram_management(model, disk, vram_limit=0, device="cpu", checkpoint=[str(path)])
        torch.testing.assert_close(model(video), reference, rtol=0, atol=0)


def test_space_to_depth_is_inverted_by_depth_to_space():
    x = torch.randn(2, 3, 4, 6, 8)
    for stride in [(1, 2, 2), (2, 1, 1), (2, 2, 2)]:
        assert torch.equal(depth_to_space(space_to_depth(x, stride), stride), x)


def test_one_tile_covering_everything_equals_untiled():
    model, video = tiny_model(), tiny_video(9, (64, 96))
    with torch.no_grad():
        latents = model.encode(video)
        assert torch.equal(model.encode(video, tiled=True, tile_size=(2, 3)), latents)
        assert torch.equal(model.decode(latents, tiled=True, tile_size=(2, 3)), model.decode(latents))


def test_tiles_without_overlap_are_decoded_independently():
    model = tiny_model()
    latents = torch.randn(1, 8, 2, 2, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        tiled = model.decode(latents, tiled=True, tile_size=2, tile_stride=2)
        left, right = model.decode(latents[..., :2]), model.decode(latents[..., 2:])
    torch.testing.assert_close(tiled, torch.cat([left, right], dim=-1), atol=1e-6, rtol=0)
    assert not torch.allclose(tiled, model.decode(latents), atol=1e-4)  # the tiles really were cut


def test_bfloat16_runs():
    model = tiny_model().to(torch.bfloat16)
    with torch.no_grad():
        video = model.decode(model.encode(tiny_video().to(torch.bfloat16)))
    assert video.dtype == torch.bfloat16 and torch.isfinite(video).all()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: m.encode(tiny_video(10)), r"10 frames.*1 \+ 8k frames \(e.g. 9 or 17\)"),
        (lambda m: m.encode(tiny_video(9, (64, 48))), "multiples of 32"),
        (lambda m: m.encode(torch.zeros(1, 4, 9, 64, 64)), r"\[B, 3, F, H, W\]"),
        (lambda m: m.decode(torch.zeros(1, 4, 2, 2, 2)), r"\[B, 8, T, H, W\]"),
        (lambda m: m.decode(torch.zeros(1, 8, 2, 1, 2)), "at least 2"),
        (lambda m: m.decode(torch.zeros(1, 8, 2, 2, 2), tiled=True, tile_size=1), "tile_size"),
        (lambda m: m.encode(tiny_video(), tiled=True, tile_size=2.5), "tile_size"),
        (lambda m: m.decode(torch.zeros(1, 8, 2, 2, 2), tiled=True, tile_size=2, tile_stride=3), "tile_stride"),
    ],
)
def test_bad_inputs_name_the_argument(call, message):
    with pytest.raises(ConfigError, match=message):
        call(tiny_model())


# ----------------------------------------------------------------------------------- full-size formats
def test_model_has_the_released_keys_and_shapes():
    """Our module is the `vae.*` part of ltx-2-19b-dev.safetensors, less the three unused statistics."""
    released = _meta("ltx2_video_vae_original")
    assert len(released) == 187
    with torch.device("meta"):
        model = LTX2VideoVAE()
    ours = _shapes(model.state_dict())
    expected = {k.removeprefix("vae."): s for k, s in _shapes(released).items()}
    assert ours == {k: s for k, s in expected.items() if k not in UNUSED_STATISTICS}
    assert _shapes(LAYOUTS[0].to_ours(released)) == ours
    weights = [s for k, s in expected.items() if not k.startswith(STATS)]
    assert sum(p.numel() for p in model.parameters()) == sum(math.prod(s) for s in weights)  # 1.22B


def test_diffusers_keys_convert_to_ours_and_back():
    checks.assert_diffusers_round_trip(LTX2VideoVAE, "ltx2_video_vae_diffusers", diffusers_to_ours, ours_to_diffusers)


@pytest.mark.parametrize(
    ("name", "layout"), [("ltx2_video_vae_original", "original"), ("ltx2_video_vae_diffusers", "diffusers")]
)
def test_released_shapes_give_the_default_config(name, layout):
    checks.assert_default_config_from(
        _meta(name), LTX2_VIDEO_VAE_SPEC, layout, config_from_state, LTX2VideoVAE, LTX2VideoVAEConfig
    )


def test_only_vae_keys_are_taken_from_the_single_file():
    state = {**_meta("ltx2_video_vae_original"), "audio_vae.encoder.conv_in.conv.weight": torch.empty(1, device="meta")}
    with pytest.raises(UnknownModelError, match="audio_vae.encoder.conv_in.conv.weight"):
        recognise(state, specs=[LTX2_VIDEO_VAE_SPEC])


def test_config_json_refines_and_is_checked_against_shapes():
    state = diffusers_to_ours(_meta("ltx2_video_vae_diffusers"))
    given = {"_class_name": "AutoencoderKLLTX2Video", "decoder_causal": True, "upsample_residual": [False, True, True]}
    config = config_from_state(state, given)
    assert config.decoder_causal and config.decoder_upsample_residual == (
        True,
        True,
        False,
    )  # diffusers lists from pixels
    with pytest.raises(ConfigError, match="latent_channels=64"):
        config_from_state(state, {"_class_name": "AutoencoderKLLTX2Video", "latent_channels": 64})
    with pytest.raises(ConfigError, match="timestep_conditioning"):
        config_from_state(state, {"_class_name": "AutoencoderKLLTX2Video", "timestep_conditioning": True})
    with pytest.raises(ConfigError, match="block_out_channels"):
        config_from_state(
            state, {"_class_name": "AutoencoderKLLTX2Video", "latent_channels": 128, "block_out_channels": [8]}
        )
    assert (
        config_from_state(state, {"_class_name": "LTX2VideoTransformer3DModel", "in_channels": 7})
        == LTX2VideoVAEConfig()
    )


def test_unmappable_keys_are_named():
    state = ours_to_diffusers(tiny_model().state_dict())
    state["decoder.up_blocks.0.conv_in.conv1.conv.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match="decoder.up_blocks.0.conv_in.conv1.conv.weight"):
        diffusers_to_ours(state)
    with pytest.raises(KeyError, match="decoder.mystery.weight"):
        ours_to_diffusers({"decoder.mystery.weight": torch.zeros(1)})


def test_shapes_that_are_not_an_ltx2_vae_are_refused():
    state = tiny_model().state_dict()
    state["encoder.conv_out.conv.weight"] = torch.zeros(16, 128, 3, 3, 3)
    with pytest.raises(CheckpointError, match="log-variance"):
        config_from_state(state)
    state = tiny_model().state_dict()
    state["encoder.down_blocks.1.conv.conv.weight"] = torch.zeros(5, 8, 3, 3, 3)
    with pytest.raises(CheckpointError, match="encoder.down_blocks.1"):
        config_from_state(state)


# ----------------------------------------------------------------------------------- loading files
def test_load_model_from_the_original_single_file(tmp_path):
    model = tiny_model()
    path = tmp_path / "ltx-2-tiny.safetensors"
    save_file(_original_file(model), path)
    loaded = load_model(path, specs=[LTX2_VIDEO_VAE_SPEC])
    assert loaded.config == model.config
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_load_the_vae_part_of_a_file_holding_other_models(tmp_path):
    """The README recipe for reading only the VAE: the VAE spec alone refuses the other keys; select `vae.*`."""
    model = tiny_model()
    path = tmp_path / "ltx-2-tiny.safetensors"
    save_file({**_original_file(model), "audio_vae.encoder.conv_in.conv.weight": torch.zeros(4, 2, 3, 3)}, path)
    with pytest.raises(UnknownModelError, match="audio_vae"):
        load_model(path, specs=[LTX2_VIDEO_VAE_SPEC])
    state = open_checkpoint(path)
    loaded = load_model({k: state[k] for k in state if k.startswith("vae.")}, specs=[LTX2_VIDEO_VAE_SPEC])
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_load_model_from_a_diffusers_folder(tmp_path):
    model = tiny_model(decoder_upsample_residual=(False, True, True))
    folder = tmp_path / "vae"
    folder.mkdir()
    save_file(ours_to_diffusers(model.state_dict()), folder / "diffusion_pytorch_model.safetensors")
    config = {
        "_class_name": "AutoencoderKLLTX2Video",
        "latent_channels": 8,
        "block_out_channels": [16, 32, 64, 128],
        "decoder_block_out_channels": [16, 32, 64],
        "layers_per_block": [2, 1, 1, 1, 1],
        "decoder_layers_per_block": [1, 1, 2, 1],
        "upsample_residual": [True, True, False],
        "decoder_causal": False,
    }
    (folder / "config.json").write_text(json.dumps(config))
    loaded = load_model(folder, torch_dtype="bfloat16", specs=[LTX2_VIDEO_VAE_SPEC])
    assert loaded.config == model.config
    assert all(torch.equal(loaded.state_dict()[k], v.to(torch.bfloat16)) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------------- parity with diffusers
def _diffusers_model(config: LTX2VideoVAEConfig):
    from diffusers import AutoencoderKLLTX2Video

    return AutoencoderKLLTX2Video(**repo_module.diffusers_vae_config(config)).eval()


@pytest.mark.parity
def test_matches_diffusers():
    """Encode (mode and sample) and decode against diffusers, weights through our converter, strict load;
    one upsampler without its residual path (diffusers lists those flags from the pixel side)."""
    pytest.importorskip("diffusers")
    ours = tiny_model(decoder_upsample_residual=(False, True, True))
    theirs = _diffusers_model(ours.config)
    theirs.load_state_dict(ours_to_diffusers(ours.state_dict()), strict=True)
    video = tiny_video(9, (64, 96))
    mean, std = theirs.latents_mean.view(1, -1, 1, 1, 1), theirs.latents_std.view(1, -1, 1, 1, 1)
    with torch.no_grad():
        posterior = theirs.encode(video).latent_dist
        expected = (posterior.mode() - mean) / std
        latents = ours.encode(video)
        assert latents.shape == expected.shape == (1, 8, 2, 2, 3)
        assert (latents - expected).abs().max().item() <= 1e-5

        sampled = (posterior.sample(generator=torch.Generator().manual_seed(2)) - mean) / std
        ours_sampled = ours.encode(video, sample=True, generator=torch.Generator().manual_seed(2))
        assert (ours_sampled - sampled).abs().max().item() <= 5e-5  # exp(logvar / 2) * noise: ~9e-6 measured

        decoded = theirs.decode(expected * std + mean).sample
        assert decoded.shape == video.shape
        assert (decoded.abs() < 1).float().mean() > 0.9  # mostly inside the clamp: the comparison means something
        assert (ours.decode(expected, clamp=False) - decoded).abs().max().item() <= 1e-5
        assert (ours.decode(expected) - decoded.clamp(-1, 1)).abs().max().item() <= 1e-5


@pytest.mark.parity
def test_original_file_through_the_diffusers_converter():
    """The released layout (`vae.` prefix, five statistics) through diffusers' own converter loads strictly
    and gives the same tensors as our converter, and the same video as our model."""
    pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_ltx2_vae_to_diffusers

    ours = tiny_model(seed=1)
    theirs = _diffusers_model(ours.config)
    converted = convert_ltx2_vae_to_diffusers(_original_file(ours))
    theirs.load_state_dict(converted, strict=True)
    mine = ours_to_diffusers(ours.state_dict())
    assert converted.keys() == mine.keys() and all(torch.equal(converted[k], v) for k, v in mine.items())
    latents = torch.randn(1, 8, 2, 2, 2, generator=torch.Generator().manual_seed(4))
    mean, std = theirs.latents_mean.view(1, -1, 1, 1, 1), theirs.latents_std.view(1, -1, 1, 1, 1)
    with torch.no_grad():
        decoded = theirs.decode(latents * std + mean).sample
        assert (ours.decode(latents, clamp=False) - decoded).abs().max().item() <= 1e-5


# ----------------------------------------------------------------------------------- LTX-2.3
# diffusers' `AutoencoderKLLTX2Video` config of the released LTX-2.3 video VAE (as its conversion script writes it)
DIFFUSERS_LTX23_CONFIG = {
    "_class_name": "AutoencoderKLLTX2Video",
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 128,
    "block_out_channels": [256, 512, 1024, 1024],
    "down_block_types": ["LTX2VideoDownBlock3D"] * 4,
    "decoder_block_out_channels": [256, 512, 512, 1024],
    "layers_per_block": [4, 6, 4, 2, 2],
    "decoder_layers_per_block": [4, 6, 4, 2, 2],
    "spatio_temporal_scaling": [True] * 4,
    "decoder_spatio_temporal_scaling": [True] * 4,
    "decoder_inject_noise": [False] * 5,
    "downsample_type": ["spatial", "temporal", "spatiotemporal", "spatiotemporal"],
    "upsample_type": ["spatiotemporal", "spatiotemporal", "temporal", "spatial"],
    "upsample_residual": [False] * 4,
    "upsample_factor": [2, 2, 1, 2],
    "timestep_conditioning": False,
    "patch_size": 4,
    "patch_size_t": 1,
    "resnet_norm_eps": 1e-6,
    "encoder_causal": True,
    "decoder_causal": False,
    "encoder_spatial_padding_mode": "zeros",
    "decoder_spatial_padding_mode": "zeros",
    "spatial_compression_ratio": 32,
    "temporal_compression_ratio": 8,
}


def tiny_ltx23_model(seed: int = 0, **overrides) -> LTX2VideoVAE:
    """LTX-2.3's stage structure (last downsampler keeps the width; four upsamplers, the second keeping the
    width, none residual; zero padding) at widths 8..64, stage lengths differing."""
    kwargs = dict(latent_channels=8, encoder_layers=(2, 1, 1, 1, 1), decoder_base_channels=8)
    kwargs.update(decoder_layers=(1, 2, 1, 1, 2), **overrides)
    return tiny_model(seed, **LTX2VideoVAEConfig.ltx23(**kwargs).__dict__)


def _ltx23_meta() -> LTX2VideoVAE:
    with torch.device("meta"):
        return LTX2VideoVAE(LTX2VideoVAEConfig.ltx23())


def _renamed_like_the_conversion_script(key: str) -> str:
    """diffusers' LTX-2.3 conversion renames original keys by substring, in this order (our names are the original's)."""
    renames = {f"down_blocks.{2 * i}": f"down_blocks.{i}" for i in range(4)}
    renames = {**renames, **{f"down_blocks.{2 * i + 1}": f"down_blocks.{i}.downsamplers.0" for i in range(4)}}
    renames = dict(sorted(renames.items(), key=lambda kv: int(kv[0].split(".")[1])))
    renames["down_blocks.8"] = "mid_block"
    renames["up_blocks.0"] = "mid_block"
    for i in range(4):
        renames[f"up_blocks.{2 * i + 1}"] = f"up_blocks.{i}.upsamplers.0"
        renames[f"up_blocks.{2 * i + 2}"] = f"up_blocks.{i}"
    renames.update(
        {"res_blocks": "resnets", STATS + "mean-of-means": "latents_mean", STATS + "std-of-means": "latents_std"}
    )
    for old, new in renames.items():
        key = key.replace(old, new)
    return key


def test_ltx23_config_is_the_release():
    config = LTX2VideoVAEConfig.ltx23()
    assert config.encoder_widths == (128, 256, 512, 1024, 1024)
    assert config.decoder_widths == (1024, 512, 512, 256, 128)
    assert (config.spatial_compression, config.temporal_compression, config.latent_channels) == (32, 8, 128)
    assert config.decoder_padding_mode == "zeros" and not any(config.decoder_upsample_residual)
    with torch.device("meta"):
        model = LTX2VideoVAE(config)
    conv = model.decoder.up_blocks[3].conv.conv.weight  # all, keeps the width: 512 -> 512 * 8
    assert conv.shape[:2] == (4096, 512) and len(model.decoder.up_blocks) == 9
    assert model.encoder.down_blocks[7].conv.conv.weight.shape[:2] == (128, 1024)  # all, keeps 1024


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(encoder_width_multipliers=(2, 2, 2)), "encoder_width_multipliers"),
        (dict(encoder_width_multipliers=(2, 3, 2, 1)), r"encoder_width_multipliers\[1\]=3"),
        (dict(decoder_width_divisors=(2, 0, 2, 2)), "decoder_width_divisors"),
        (dict(decoder_upsample_residual=(False, False, False, True), decoder_width_divisors=(2, 1, 2, 3)), r"\[3\]=3"),
    ],
)
def test_ltx23_config_validation_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        LTX2VideoVAEConfig.ltx23(latent_channels=8, decoder_base_channels=8, **overrides)


@pytest.mark.parametrize("frames", [1, 9])
def test_ltx23_encode_decode_shapes(frames):
    model = tiny_ltx23_model()
    with torch.no_grad():
        latents = model.encode(tiny_video(frames, (64, 96)))
        assert latents.shape == (1, 8, 1 + (frames - 1) // 8, 2, 3)
        video = model.decode(latents)
    assert video.shape == (1, 3, frames, 64, 96) and video.abs().max() <= 1


def test_ltx23_tiles():
    """One tile covering everything equals the untiled result; tiles without overlap decode independently."""
    model, video = tiny_ltx23_model(), tiny_video(1, (64, 96))
    with torch.no_grad():
        latents = model.encode(video)
        assert torch.equal(model.encode(video, tiled=True, tile_size=(2, 3)), latents)
        assert torch.equal(model.decode(latents, tiled=True, tile_size=(2, 3)), model.decode(latents))
        latents = torch.randn(1, 8, 1, 2, 4, generator=torch.Generator().manual_seed(3))
        tiled = model.decode(latents, tiled=True, tile_size=2, tile_stride=2)
        left, right = model.decode(latents[..., :2]), model.decode(latents[..., 2:])
    torch.testing.assert_close(tiled, torch.cat([left, right], dim=-1), atol=1e-6, rtol=0)
    assert not torch.allclose(tiled, model.decode(latents), atol=1e-4)  # the tiles really were cut


def test_ltx23_conformance_units_spec_config_and_layouts():
    """Config from a tiny LTX-2.3 state's shapes round-trips (residual flags and padding are LTX-2.3's), in
    every layout; each stage and resampler is an offload unit."""
    cf.check_declared_units(tiny_ltx23_model)
    cf.check_spec_config(LTX2_VIDEO_VAE_SPEC, tiny_ltx23_model)
    for layout in LAYOUTS:
        cf.check_layout_roundtrip(tiny_ltx23_model, layout, ours_to_diffusers if layout.name == "diffusers" else None)
    assert len(tiny_ltx23_model().get_submodule("decoder.up_blocks")) == 9


def test_ltx23_full_size_shapes_give_its_config():
    """The full-size LTX-2.3 `vae.*` keys (with the unused statistics) are recognised and give `ltx23()`;
    the loader builds that model, and the converter maps its keys as diffusers' conversion script does."""
    model = _ltx23_meta()
    state = {f"vae.{k}": v for k, v in model.state_dict().items()}
    state.update({f"vae.{name}": torch.empty(128, device="meta") for name in UNUSED_STATISTICS})
    assert _shapes(LAYOUTS[0].to_ours(state)) == _shapes(model.state_dict())
    (found,) = recognise(state, specs=[LTX2_VIDEO_VAE_SPEC])
    assert found.layout.name == "original" and len(found.keys) == len(state)
    assert config_from_state(found.layout.to_ours(state)) == LTX2VideoVAEConfig.ltx23()
    assert load_model(state, specs=[LTX2_VIDEO_VAE_SPEC]).config == LTX2VideoVAEConfig.ltx23()
    ours = model.state_dict()
    theirs = ours_to_diffusers(ours)
    assert list(theirs) == [_renamed_like_the_conversion_script(k) for k in ours]
    assert _shapes(diffusers_to_ours(theirs)) == _shapes(ours)


def test_ltx23_config_json_gives_its_config_and_is_checked():
    config_json = json.loads(json.dumps(DIFFUSERS_LTX23_CONFIG))
    assert config_from_state({}, config_json) == LTX2VideoVAEConfig.ltx23()
    state = _ltx23_meta().state_dict()
    assert config_from_state(state, config_json) == LTX2VideoVAEConfig.ltx23()
    with pytest.raises(ConfigError, match="decoder_width_divisors"):
        config_from_state(state, {**config_json, "upsample_factor": [2, 2, 2, 2], "decoder_block_out_channels": None})
    with pytest.raises(ConfigError, match="decoder_block_out_channels"):
        config_from_state(state, {**config_json, "decoder_block_out_channels": [256, 512, 1024, 1024]})
    with pytest.raises(ConfigError, match="encoder_width_multipliers"):
        config_from_state(state, {**config_json, "block_out_channels": [256, 512, 1024, 2048]})


def test_ltx23_bad_shapes_name_the_key():
    state = tiny_ltx23_model().state_dict()
    state["decoder.up_blocks.3.conv.conv.weight"] = torch.zeros(96, 32, 3, 3, 3)  # 32 -> 96: no stride gives 32 * 3
    with pytest.raises(CheckpointError, match="decoder.up_blocks.3 "):
        config_from_state(state)
    state = tiny_ltx23_model().state_dict()
    state = {k: v for k, v in state.items() if not k.startswith("decoder.up_blocks.8.")}  # ends on an upsampler
    with pytest.raises(CheckpointError, match="decoder.up_blocks must alternate"):
        config_from_state(state)


@pytest.mark.parity
def test_ltx23_matches_diffusers():
    """Encode (mode) and decode of a tiny LTX-2.3-shaped VAE against diffusers, weights through our converter."""
    pytest.importorskip("diffusers")
    ours = tiny_ltx23_model(seed=3)
    theirs = _diffusers_model(ours.config)
    theirs.load_state_dict(ours_to_diffusers(ours.state_dict()), strict=True)
    video = tiny_video(9, (64, 96), seed=1)
    mean, std = theirs.latents_mean.view(1, -1, 1, 1, 1), theirs.latents_std.view(1, -1, 1, 1, 1)
    with torch.no_grad():
        expected = (theirs.encode(video).latent_dist.mode() - mean) / std
        latents = ours.encode(video)
        assert latents.shape == expected.shape == (1, 8, 2, 2, 3)
        assert (latents - expected).abs().max().item() <= 1e-5
        decoded = theirs.decode(expected * std + mean).sample
        assert decoded.shape == video.shape
        assert (decoded.abs() < 1).float().mean() > 0.9  # mostly inside the clamp: the comparison means something
        assert (ours.decode(expected, clamp=False) - decoded).abs().max().item() <= 1e-5


@pytest.mark.parity
def test_ltx23_full_size_keys_and_shapes_match_diffusers():
    """Our LTX-2.3 config's keys and shapes equal diffusers' full-size LTX-2.3 model's through the converter,
    both ways; our config from diffusers' config equals the one from its shapes."""
    pytest.importorskip("diffusers")
    from diffusers import AutoencoderKLLTX2Video

    config = {k: v for k, v in DIFFUSERS_LTX23_CONFIG.items() if not k.startswith("_")}
    with torch.device("meta"):
        theirs = AutoencoderKLLTX2Video(**config).state_dict()
    ours = _ltx23_meta().state_dict()
    assert _shapes(diffusers_to_ours(theirs)) == _shapes(ours)
    assert _shapes(ours_to_diffusers(ours)) == _shapes(theirs)
    assert config_from_state(diffusers_to_ours(theirs), DIFFUSERS_LTX23_CONFIG) == LTX2VideoVAEConfig.ltx23()
    (found,) = recognise(theirs, specs=[LTX2_VIDEO_VAE_SPEC])
    assert found.layout.name == "diffusers"
