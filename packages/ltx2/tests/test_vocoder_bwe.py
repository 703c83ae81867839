"""LTX-2.3 vocoder (BigVGAN generators with bandwidth extension, 48 kHz): tiny-config behaviour, parity with
diffusers' `LTX2VocoderWithBWE`, the diffusers converter both ways, config from shapes, full-size key and
shape checks, and loading in each layout through the one vocoder spec."""

from __future__ import annotations

import functools
import json

import diffsynth_ltx2_release_checks as checks  # loaded by conftest
import pytest
import torch
from safetensors.torch import save_file

from diffsynth.ltx2.audio_vae import LTX2AudioVAE, LTX2AudioVAEConfig
from diffsynth.ltx2.audio_vae_formats import LTX2_AUDIO_VAE_SPEC
from diffsynth.ltx2.vocoder import (
    LTX2Vocoder,
    LTX2VocoderConfig,
    LTX2VocoderWithBWE,
    LTX2VocoderWithBWEConfig,
    hann_resample,
    kaiser_sinc_filter,
)
from diffsynth.ltx2.vocoder_formats import (
    BWE_LAYOUTS,
    LTX2_VOCODER_SPEC,
    config_from_state,
    diffusers_to_ours,
    ours_to_diffusers,
)
from diffsynth.runtime.errors import CheckpointError, ConfigError
from diffsynth.runtime.loading import load_model, recognise
from diffsynth.runtime.testing import conformance as cf

TINY_JSON = {  # tiny_config() in diffusers' names
    "_class_name": "LTX2VocoderWithBWE",
    "in_channels": 16,
    "hidden_channels": 32,
    "upsample_factors": [3, 2],
    "upsample_kernel_sizes": [7, 4],
    "resnet_kernel_sizes": [3, 5],
    "resnet_dilations": [[1, 3], [1, 2]],
    "act_fn": "snakebeta",
    "antialias": True,
    "final_act_fn": "clamp",
    "final_bias": False,
    "bwe_in_channels": 16,
    "bwe_hidden_channels": 16,
    "bwe_upsample_factors": [4, 3],
    "bwe_upsample_kernel_sizes": [8, 7],
    "bwe_resnet_kernel_sizes": [3],
    "bwe_resnet_dilations": [[1, 2]],
    "bwe_act_fn": "snakebeta",
    "bwe_final_act_fn": None,
    "bwe_final_bias": True,
    "filter_length": 16,
    "hop_length": 4,
    "window_length": 16,
    "num_mel_channels": 8,
    "input_sampling_rate": 1000,
    "output_sampling_rate": 3000,
}


def tiny_config(final_activation: str | None = "clamp") -> LTX2VocoderWithBWEConfig:
    """The only place tiny sizes live: 2 channels x 8 mel bins. The main generator makes 6 samples per frame
    (x3 with an odd kernel, x2; two blocks of different kernels and dilations), whose 6 T samples are not always
    whole 4-sample STFT hops, so the padding runs; the BWE makes 12 = 3 x 4 per STFT frame (x3 rate)."""
    vocoder = LTX2VocoderConfig(
        in_channels=16,
        hidden_channels=32,
        upsample_rates=(3, 2),
        upsample_kernel_sizes=(7, 4),
        resblock_kernel_sizes=(3, 5),
        resblock_dilations=((1, 3), (1, 2)),
        activation="snakebeta",
        final_activation=final_activation,
        final_bias=False,
        sampling_rate=1000,
    )
    bwe = LTX2VocoderConfig(
        in_channels=16,
        hidden_channels=16,
        upsample_rates=(4, 3),
        upsample_kernel_sizes=(8, 7),
        resblock_kernel_sizes=(3,),
        resblock_dilations=((1, 2),),
        activation="snakebeta",
        final_activation=None,
        final_bias=True,
        sampling_rate=3000,
    )
    return LTX2VocoderWithBWEConfig(vocoder=vocoder, bwe=bwe, mel_bins=8, n_fft=16, stft_hop_length=4)


def tiny_model(seed: int = 0, **overrides) -> LTX2VocoderWithBWE:
    """Random parameters; random STFT bases and a positive random filterbank (the anti-aliasing filters keep
    their computed values, as the checkpoint's)."""
    model = LTX2VocoderWithBWE(tiny_config(**overrides)).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=generator))
        stft = model.mel_stft
        stft.mel_basis.copy_(torch.rand(stft.mel_basis.shape, generator=generator))
        stft.stft_fn.forward_basis.copy_(0.3 * torch.randn(stft.stft_fn.forward_basis.shape, generator=generator))
        stft.stft_fn.inverse_basis.copy_(torch.randn(stft.stft_fn.inverse_basis.shape, generator=generator))
    return model


def tiny_mel(frames: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 2, frames, 8, generator=torch.Generator().manual_seed(seed))


_shapes = checks.shapes


# ----------------------------------------------------------------------------------- config and model
def test_default_config_is_the_23_release():
    config = LTX2VocoderWithBWEConfig()
    assert (config.sampling_rate, config.hop_length, config.ratio) == (48000, 480, 3)
    assert (config.vocoder.sampling_rate, config.vocoder.hop_length) == (16000, 160)  # 10 ms mel frames
    assert config.bwe.hop_length == config.ratio * config.stft_hop_length == 240
    assert config.vocoder.activation == config.bwe.activation == "snakebeta"
    assert (config.vocoder.final_activation, config.bwe.final_activation) == ("clamp", None)  # as ltx-core
    assert _release_model().sampling_rate == 48000  # what the pipeline reads


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(stft_hop_length=5), "bwe.upsample_rates give 12 samples per STFT frame"),
        (dict(mel_bins=4), "bwe.in_channels=16"),
        (dict(bwe=dict(vars(tiny_config().bwe), sampling_rate=2500)), "bwe.sampling_rate=2500"),
        (dict(bwe=dict(vars(tiny_config().bwe), out_channels=1)), "bwe.out_channels=1"),
        (dict(n_fft=2), "stft_hop_length=4 must not exceed n_fft=2"),
        (dict(vocoder="big"), "vocoder must be an LTX2VocoderConfig"),
    ],
)
def test_config_validation_names_the_field(overrides, message):
    fields = {**vars(tiny_config()), **overrides}
    with pytest.raises(ValueError, match=message):
        LTX2VocoderWithBWEConfig(**fields)
    with pytest.raises(ValueError, match="activation must be one of"):
        LTX2VocoderConfig(activation="snake")


@pytest.mark.parametrize("frames", [1, 2, 9])
def test_waveform_shape_and_range(frames):
    model = tiny_model()
    with torch.no_grad():
        wave = model(tiny_mel(frames))
    assert wave.shape == (2, 2, 18 * frames) and model.hop_length == 18 and model.sampling_rate == 3000
    assert wave.abs().max() <= 1 and wave.abs().max() > 0.05
    assert (wave.abs() < 1).float().mean() > 0.5  # mostly not clamped


def test_kaiser_filters_and_resampler():
    """The anti-aliasing low-pass sums to 1 and is symmetric; the x3 resampler keeps a slow sine (it only
    interpolates) and its first of each 3 outputs sits on the input sample."""
    taps = kaiser_sinc_filter(2, 12).flatten()
    torch.testing.assert_close(taps.sum(), torch.tensor(1.0))
    torch.testing.assert_close(taps, taps.flip(0))
    t = torch.arange(64, dtype=torch.float32)
    slow = torch.sin(2 * torch.pi * t / 32).view(1, 1, -1)
    up = hann_resample(slow, 3)
    assert up.shape == (1, 1, 192)
    fine = torch.sin(2 * torch.pi * torch.arange(192) / 96).view(1, 1, -1)
    assert (up - fine)[..., 24:-24].abs().max() < 0.02  # away from the replicated edges
    assert (up[..., ::3] - slow)[..., 8:-8].abs().max() < 0.02


def test_conformance_forward_and_meta_load():
    mel = tiny_mel()
    cf.check_forward(tiny_model, (mel,), expected_shapes=[(2, 2, 162)])
    cf.check_meta_load(tiny_model, (mel,))


def test_conformance_backward_and_gradient_checkpointing():
    mel = tiny_mel(4)
    cf.check_backward(tiny_model, (mel,))
    cf.check_gradient_checkpointing(tiny_model, (mel,))


def test_conformance_units_spec_config_and_layouts():
    cf.check_declared_units(tiny_model)
    assert cf.check_spec_config(LTX2_VOCODER_SPEC, tiny_model, TINY_JSON) == tiny_config()
    for layout in BWE_LAYOUTS:
        cf.check_layout_roundtrip(
            tiny_model, layout, ours_to_diffusers if layout.name.startswith("diffusers") else None
        )


def test_vram_managed_equals_unmanaged():
    from diffsynth.runtime.vram import enable_vram_management

    mel = tiny_mel()
    with torch.no_grad():
        reference = tiny_model()(mel)
        model = tiny_model().requires_grad_(False)
        handle = enable_vram_management(model, {"offload_device": "cpu", "onload_device": "cpu"}, vram_limit=0)
        assert handle.plan.resident == () and len(handle.units) == (2 + 4) + (2 + 2)
        torch.testing.assert_close(model(mel), reference, rtol=0, atol=0)
        assert handle.report().bytes_moved > 0


def test_bad_mel_names_the_argument():
    with pytest.raises(ConfigError, match=r"channels \* mel_bins = 16 .*got \(1, 2, 9, 6\)"):
        tiny_model()(torch.zeros(1, 2, 9, 6))


# ----------------------------------------------------------------------------------- formats and config
def test_diffusers_names_convert_both_ways():
    ours = tiny_model().state_dict()
    theirs = ours_to_diffusers(ours)
    assert "vocoder.act_out.downsample.filter" in theirs and "bwe_generator.upsamplers.1.weight" in theirs
    assert "mel_stft.stft_fn.forward_basis" in theirs and not any("lowpass" in k for k in theirs)
    back = diffusers_to_ours(theirs)
    assert list(back) == list(ours) and all(back[k] is ours[k] for k in ours)


@pytest.mark.parametrize(
    ("convert", "key"),
    [
        (diffusers_to_ours, "vocoder.resnets.0.acts1.0.downsample.lowpass.filter"),  # ours, not diffusers'
        (diffusers_to_ours, "bwe_generator.mystery.weight"),
        (ours_to_diffusers, "vocoder.act_out.act.alpha"),  # diffusers', not ours
        (ours_to_diffusers, "vocoder.resblocks.0.acts1.0.downsample.filter"),
    ],
)
def test_unmappable_keys_are_named(convert, key):
    with pytest.raises(KeyError, match=key.replace(".", r"\.")):
        convert({key: torch.zeros(1)})


def test_config_needs_what_the_shapes_cannot_give():
    state = tiny_model().state_dict()
    with pytest.raises(ConfigError, match="'upsample_factors'"):
        config_from_state(state)
    with pytest.raises(ConfigError, match="'bwe_upsample_factors'"):
        config_from_state(state, {"upsample_factors": [3, 2], "resnet_dilations": [[1, 3], [1, 2]]})
    plain = {k: v for k, v in TINY_JSON.items() if k != "_class_name"}  # a plain dict works like config.json
    assert config_from_state(state, plain) == tiny_config()
    assert config_from_state(state, {**TINY_JSON, "final_act_fn": None}) == tiny_config(final_activation=None)


def test_config_json_is_checked_against_shapes_and_support():
    state = tiny_model().state_dict()
    with pytest.raises(ConfigError, match="hidden_channels=64"):
        config_from_state(state, {**TINY_JSON, "bwe_hidden_channels": 64})
    with pytest.raises(ConfigError, match="num_mel_channels|mel_bins=4"):
        config_from_state(state, {**TINY_JSON, "num_mel_channels": 4})
    with pytest.raises(ConfigError, match="bwe_act_fn='snake'"):
        config_from_state(state, {**TINY_JSON, "bwe_act_fn": "snake"})
    with pytest.raises(ConfigError, match="antialias_kernel_size=8"):
        config_from_state(state, {**TINY_JSON, "antialias_kernel_size": 8})
    with pytest.raises(ConfigError, match="window_length=12"):
        config_from_state(state, {**TINY_JSON, "window_length": 12})
    with pytest.raises(ConfigError, match="stft_hop_length|samples per STFT frame"):
        config_from_state(state, {**TINY_JSON, "hop_length": 5})


@pytest.mark.parametrize(
    ("key", "shape", "message"),
    [
        ("vocoder.act_post.upsample.filter", (1, 1, 8), r"'act_post.upsample.filter' has shape \(1, 1, 8\)"),
        ("mel_stft.stft_fn.inverse_basis", (18, 1, 14), r"'mel_stft.stft_fn.inverse_basis' has shape \(18, 1, 14\)"),
        ("mel_stft.mel_basis", (8, 7), "'mel_stft.mel_basis' has 7 frequencies"),
    ],
)
def test_bad_shapes_are_named(key, shape, message):
    state = {k: v.to("meta") for k, v in tiny_model().state_dict().items()}
    state[key] = torch.empty(shape, device="meta")
    with pytest.raises(CheckpointError, match=message):
        config_from_state(state, TINY_JSON)


def test_snake_without_beta_is_refused():
    state = {k: v for k, v in tiny_model().state_dict().items() if not k.endswith("act.beta")}
    with pytest.raises(CheckpointError, match=r"\(vocoder\.\*\) checkpoint has snake activations but no 'act_post"):
        config_from_state(state, TINY_JSON)


# ----------------------------------------------------------------------------------- full size
@functools.cache
def _release_model() -> LTX2VocoderWithBWE:
    with torch.device("meta"):
        return LTX2VocoderWithBWE()


def _release_meta(prefix: str = "vocoder.") -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in _release_model().state_dict().items()}


def test_release_state_is_recognised_and_gives_the_default_config():
    """Our release-size keys with the single file's `vocoder.` prefix: recognised by the LTX-2.3 layout (not
    by LTX-2.0's, whose signature the unprefixed 2.3 keys also carry), default config, loads on meta."""
    for prefix, layout in (("vocoder.", "original (LTX-2.3)"), ("", "original (LTX-2.3, no prefix)")):
        checks.assert_default_config_from(
            _release_meta(prefix), LTX2_VOCODER_SPEC, layout, config_from_state, LTX2VocoderWithBWE,
            LTX2VocoderWithBWEConfig,
        )  # fmt: skip
    state = _release_meta()
    assert len(state) == 667 + 557 + 3  # main, BWE generator, STFT


def test_both_audio_models_of_a_23_file_are_split_between_the_two_specs():
    with torch.device("meta"):
        vae = LTX2AudioVAE()
    state = {**{f"audio_vae.{k}": v for k, v in vae.state_dict().items()}, **_release_meta()}
    found = recognise(state, specs=[LTX2_AUDIO_VAE_SPEC, LTX2_VOCODER_SPEC])
    assert [(r.spec.role, r.layout.name) for r in found] == [
        ("audio_vae", "original"),
        ("vocoder", "original (LTX-2.3)"),
    ]


# ----------------------------------------------------------------------------------- loading files
def test_load_both_audio_models_from_one_original_file(tmp_path):
    vae = LTX2AudioVAE(LTX2AudioVAEConfig(base_channels=8, latent_channels=4, mel_bins=8)).eval()
    vocoder = tiny_model()
    path = tmp_path / "ltx-2.3-tiny.safetensors"
    state = {f"audio_vae.{k}": v for k, v in vae.state_dict().items()}
    state.update({f"vocoder.{k}": v for k, v in vocoder.state_dict().items()})
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    models = load_model(path, specs=[LTX2_AUDIO_VAE_SPEC, LTX2_VOCODER_SPEC], config={"vocoder": TINY_JSON})
    assert isinstance(models["vocoder"], LTX2VocoderWithBWE) and models["vocoder"].config == vocoder.config
    assert all(torch.equal(models["vocoder"].state_dict()[k], v) for k, v in vocoder.state_dict().items())
    mel = tiny_mel(3)
    with torch.no_grad():
        torch.testing.assert_close(models["vocoder"](mel), vocoder(mel), rtol=0, atol=0)


def test_load_model_from_a_diffusers_folder(tmp_path):
    model = tiny_model(final_activation=None)
    folder = tmp_path / "vocoder"
    folder.mkdir()
    save_file(ours_to_diffusers(model.state_dict()), folder / "diffusion_pytorch_model.safetensors")
    (folder / "config.json").write_text(json.dumps({**TINY_JSON, "final_act_fn": None}))
    loaded = load_model(folder, torch_dtype="bfloat16", specs=[LTX2_VOCODER_SPEC])
    assert isinstance(loaded, LTX2VocoderWithBWE) and loaded.config == model.config
    assert all(torch.equal(loaded.state_dict()[k], v.to(torch.bfloat16)) for k, v in model.state_dict().items())


def test_spec_builds_the_class_of_the_config():
    with torch.device("meta"):
        assert type(LTX2_VOCODER_SPEC.build(LTX2VocoderWithBWEConfig())) is LTX2VocoderWithBWE
        assert type(LTX2_VOCODER_SPEC.build(LTX2VocoderConfig())) is LTX2Vocoder


# ----------------------------------------------------------------------------------- parity with diffusers
# get_ltx2_vocoder_config("2.3") of diffusers' conversion script (scripts/convert_ltx2_to_diffusers.py)
DIFFUSERS_23 = {
    "in_channels": 128,
    "hidden_channels": 1536,
    "out_channels": 2,
    "upsample_kernel_sizes": [11, 4, 4, 4, 4, 4],
    "upsample_factors": [5, 2, 2, 2, 2, 2],
    "resnet_kernel_sizes": [3, 7, 11],
    "resnet_dilations": [[1, 3, 5], [1, 3, 5], [1, 3, 5]],
    "act_fn": "snakebeta",
    "leaky_relu_negative_slope": 0.1,
    "antialias": True,
    "antialias_ratio": 2,
    "antialias_kernel_size": 12,
    "final_act_fn": None,
    "final_bias": False,
    "bwe_in_channels": 128,
    "bwe_hidden_channels": 512,
    "bwe_out_channels": 2,
    "bwe_upsample_kernel_sizes": [12, 11, 4, 4, 4],
    "bwe_upsample_factors": [6, 5, 2, 2, 2],
    "bwe_resnet_kernel_sizes": [3, 7, 11],
    "bwe_resnet_dilations": [[1, 3, 5], [1, 3, 5], [1, 3, 5]],
    "bwe_act_fn": "snakebeta",
    "bwe_leaky_relu_negative_slope": 0.1,
    "bwe_antialias": True,
    "bwe_antialias_ratio": 2,
    "bwe_antialias_kernel_size": 12,
    "bwe_final_act_fn": None,
    "bwe_final_bias": False,
    "filter_length": 512,
    "hop_length": 80,
    "window_length": 512,
    "num_mel_channels": 64,
    "input_sampling_rate": 16000,
    "output_sampling_rate": 48000,
}


def _diffusers_class():
    from diffusers.pipelines.ltx2.vocoder import LTX2VocoderWithBWE as DiffusersVocoder

    return DiffusersVocoder


@pytest.mark.parity
@pytest.mark.parametrize("final_activation", ["clamp", None])
def test_matches_diffusers(final_activation):
    """Waveform against diffusers' `LTX2VocoderWithBWE`, weights (and STFT / filter buffers) through our
    converter, strict load; the main generator clamped (ltx-core) and not (diffusers' release config)."""
    pytest.importorskip("diffusers")
    ours = tiny_model(final_activation=final_activation)
    fields = {k: v for k, v in TINY_JSON.items() if k != "_class_name"}
    theirs = _diffusers_class()(**{**fields, "final_act_fn": final_activation}).eval()
    fresh = ours_to_diffusers(LTX2VocoderWithBWE(ours.config).state_dict())
    for key, value in theirs.state_dict().items():  # our computed anti-aliasing filters are diffusers'
        if key.endswith(".filter"):
            torch.testing.assert_close(fresh[key], value, rtol=0, atol=1e-7)
    theirs.load_state_dict(ours_to_diffusers(ours.state_dict()), strict=True)
    mel = tiny_mel()
    for dtype, tolerance in ((torch.float32, 1e-6), (torch.float64, 1e-12)):  # float64: no rounding to hide in
        with torch.no_grad():
            expected = theirs.to(dtype)(mel.to(dtype))
            got = ours.to(dtype)(mel.to(dtype))
        assert got.shape == expected.shape == (2, 2, 162) and got.dtype == dtype
        assert expected.abs().max() > 0.05
        error = (got - expected).abs().max().item()
        print(f"LTX-2.3 vocoder tiny parity ({final_activation=}, {dtype}): max abs error {error:.3g}")
        assert error <= tolerance


@pytest.mark.parity
def test_release_config_matches_diffusers_full_size():
    """Our default model is diffusers' full-size 2.3 vocoder (its conversion script's config) key for key
    after the renames (meta device), and that model's diffusers keys give our default config."""
    pytest.importorskip("diffusers")
    ours = _release_model()
    with torch.device("meta"):
        theirs = _diffusers_class()(**DIFFUSERS_23)
    theirs_state = theirs.state_dict()
    assert _shapes(ours_to_diffusers(ours.state_dict())) == _shapes(theirs_state)
    assert _shapes(diffusers_to_ours(theirs_state)) == _shapes(ours.state_dict())
    (found,) = recognise(theirs_state, specs=[LTX2_VOCODER_SPEC])
    assert found.layout.name == "diffusers (LTX-2.3)"
    config = config_from_state(
        found.layout.to_ours(theirs_state), {"_class_name": "LTX2VocoderWithBWE", **DIFFUSERS_23}
    )
    assert config == LTX2VocoderWithBWEConfig(
        vocoder=dict(vars(LTX2VocoderWithBWEConfig().vocoder), final_activation=None)
    )
    assert config_from_state(found.layout.to_ours(theirs_state)) == LTX2VocoderWithBWEConfig()  # shapes alone
    assert theirs.config.output_sampling_rate == ours.sampling_rate


def test_bfloat16_weights_compute_in_float32():
    """As ltx-core: bf16 weights run in float32 (the output equals a float32 copy of the same rounded weights),
    and the weights are bf16 again after the call."""
    import copy

    model = tiny_model().to(torch.bfloat16)
    as_float = copy.deepcopy(model).float()
    mel = tiny_mel().to(torch.bfloat16)
    with torch.no_grad():
        got, expected = model(mel), as_float(mel.float())
    assert got.dtype == torch.float32 and all(p.dtype == torch.bfloat16 for p in model.parameters())
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
