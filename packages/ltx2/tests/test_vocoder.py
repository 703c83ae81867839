"""LTX-2 vocoder: tiny-config behaviour, parity with diffusers' `LTX2Vocoder`, full-size key and shape checks
against the released file, and loading in each layout (alone and next to the audio VAE in one file)."""

from __future__ import annotations

import json

import diffsynth_ltx2_release_checks as checks  # loaded by conftest
import pytest
import torch
from safetensors.torch import save_file

from diffsynth.ltx2.audio_vae import LTX2AudioVAE, LTX2AudioVAEConfig
from diffsynth.ltx2.audio_vae_formats import LTX2_AUDIO_VAE_SPEC
from diffsynth.ltx2.vocoder import LTX2Vocoder, LTX2VocoderConfig
from diffsynth.ltx2.vocoder_formats import (
    LAYOUTS,
    LTX2_VOCODER_SPEC,
    RENAMES,
    config_from_state,
    diffusers_to_ours,
    ours_to_diffusers,
)
from diffsynth.runtime.errors import CheckpointError, ConfigError, UnknownModelError
from diffsynth.runtime.loading import load_model, recognise
from diffsynth.runtime.testing import conformance as cf

TINY_JSON = {  # tiny_config() in diffusers' names
    "_class_name": "LTX2Vocoder",
    "in_channels": 16,
    "hidden_channels": 32,
    "upsample_factors": [3, 2],
    "upsample_kernel_sizes": [7, 4],
    "resnet_kernel_sizes": [3, 5],
    "resnet_dilations": [[1, 3], [1, 2]],
}


def tiny_config(**overrides) -> LTX2VocoderConfig:
    """The only place tiny sizes live: 2 channels x 8 mel bins, two upsamplers (x3 with an odd kernel, x2),
    two residual blocks per stage with different kernels and dilations, so index mix-ups cannot hide."""
    kwargs = dict(
        in_channels=16,
        hidden_channels=32,
        upsample_rates=(3, 2),
        upsample_kernel_sizes=(7, 4),
        resblock_kernel_sizes=(3, 5),
        resblock_dilations=((1, 3), (1, 2)),
    )
    kwargs.update(overrides)
    return LTX2VocoderConfig(**kwargs)


def tiny_model(seed: int = 0, **overrides) -> LTX2Vocoder:
    model = LTX2Vocoder(tiny_config(**overrides)).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=generator))
    return model


def tiny_mel(frames: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 2, frames, 8, generator=torch.Generator().manual_seed(seed))


_meta, _shapes = checks.released_meta, checks.shapes


# ----------------------------------------------------------------------------------- config and model
def test_default_config_is_the_release():
    config = LTX2VocoderConfig()
    assert (config.in_channels, config.hop_length, config.sampling_rate) == (128, 240, 24000)
    assert config.sampling_rate / config.hop_length == 16000 / 160  # one mel frame per 10 ms, as the audio VAE


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(upsample_rates=(3,)), "upsample_kernel_sizes"),
        (dict(upsample_kernel_sizes=(6, 4)), "upsample_kernel_sizes"),
        (dict(resblock_dilations=((1, 3),)), "resblock_dilations"),
        (dict(hidden_channels=30), "hidden_channels"),
        (dict(final_activation="relu"), "final_activation"),
        (dict(resblock_kernel_sizes=()), "resblock_kernel_sizes"),
    ],
)
def test_config_validation_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


@pytest.mark.parametrize("frames", [1, 2, 9])
def test_waveform_shape_and_range(frames):
    model = tiny_model()
    with torch.no_grad():
        wave = model(tiny_mel(frames))
    assert wave.shape == (2, 2, 6 * frames) and model.hop_length == 6
    assert wave.abs().max() < 1 and wave.abs().max() > 0.05  # tanh, not saturated


def test_channels_are_stacked_before_mel_bins():
    """Input channel `c * M + m` is stereo channel c, mel bin m (ltx-core's `b s c t -> b (s c) t`)."""
    model = tiny_model()
    mel = tiny_mel(4)
    with torch.no_grad():
        bumped = mel.clone()
        bumped[:, 1, :, 3] += 1.0
        weight = model.conv_pre.weight.clone()
        model.conv_pre.weight[:, 8 + 3].zero_()  # channel 1, bin 3 no longer reaches the network
        assert torch.equal(model(mel), model(bumped))
        model.conv_pre.weight.copy_(weight)
        assert not torch.equal(model(mel), model(bumped))


def test_final_activation_choices():
    def loud(final_activation):
        model = tiny_model(final_activation=final_activation)
        model.conv_post.weight.data *= 10.0  # outputs beyond +-1, so tanh and clamp differ
        return model

    mel = tiny_mel()
    with torch.no_grad():
        raw = loud(None)(mel)
        assert raw.abs().max() > 1
        torch.testing.assert_close(loud("tanh")(mel), torch.tanh(raw))
        torch.testing.assert_close(loud("clamp")(mel), raw.clamp(-1, 1))


def test_conformance_forward_and_meta_load():
    mel = tiny_mel()
    cf.check_forward(tiny_model, (mel,), expected_shapes=[(2, 2, 54)])
    cf.check_meta_load(tiny_model, (mel,))


def test_conformance_backward_and_gradient_checkpointing():
    mel = tiny_mel()
    cf.check_backward(tiny_model, (mel,))
    cf.check_gradient_checkpointing(tiny_model, (mel,))


def test_conformance_units_spec_config_and_layouts():
    cf.check_declared_units(tiny_model)
    assert cf.check_spec_config(LTX2_VOCODER_SPEC, tiny_model, TINY_JSON) == tiny_config()
    for layout in LAYOUTS:
        cf.check_layout_roundtrip(tiny_model, layout, ours_to_diffusers if layout.name == "diffusers" else None)


def test_vram_managed_equals_unmanaged():
    from diffsynth.runtime.vram import enable_vram_management

    mel = tiny_mel()
    with torch.no_grad():
        reference = tiny_model()(mel)
        model = tiny_model().requires_grad_(False)
        handle = enable_vram_management(model, {"offload_device": "cpu", "onload_device": "cpu"}, vram_limit=0)
        assert handle.plan.resident == () and len(handle.units) == 2 + 4
        torch.testing.assert_close(model(mel), reference, rtol=0, atol=0)
        assert handle.report().bytes_moved > 0


@pytest.mark.parametrize(
    ("mel", "message"),
    [
        (torch.zeros(1, 2, 9, 6), r"channels \* mel_bins = 16 \(e.g. \[B, 2, T, 8\]\), got \(1, 2, 9, 6\)"),
        (torch.zeros(1, 2, 0, 8), r"got \(1, 2, 0, 8\)"),
        (torch.zeros(16, 9), r"got \(16, 9\)"),
    ],
)
def test_bad_inputs_name_the_argument(mel, message):
    with pytest.raises(ConfigError, match=message):
        tiny_model()(mel)


def test_mono_layout_is_accepted():
    model = tiny_model(in_channels=8, hidden_channels=32)
    with torch.no_grad():
        assert torch.equal(model(torch.ones(1, 3, 8)), model(torch.ones(1, 1, 3, 8)))


# ----------------------------------------------------------------------------------- full-size formats
def test_model_has_the_released_keys_and_shapes():
    """Our module is the `vocoder.*` part of ltx-2-19b-dev.safetensors, key for key."""
    released = _meta("ltx2_full", "vocoder.")
    assert len(released) == 194
    with torch.device("meta"):
        model = LTX2Vocoder()
    ours = _shapes(model.state_dict())
    assert ours == {k.removeprefix("vocoder."): s for k, s in _shapes(released).items()}
    assert _shapes(LAYOUTS[0].to_ours(released)) == ours


def test_diffusers_keys_convert_to_ours_and_back():
    checks.assert_diffusers_round_trip(LTX2Vocoder, "ltx2_vocoder_diffusers", diffusers_to_ours, ours_to_diffusers)


@pytest.mark.parametrize(("name", "layout"), [("ltx2_full", "original"), ("ltx2_vocoder_diffusers", "diffusers")])
def test_released_shapes_give_the_default_config(name, layout):
    checks.assert_default_config_from(
        _meta(name, "vocoder." if name == "ltx2_full" else None),
        LTX2_VOCODER_SPEC,
        layout,
        config_from_state,
        LTX2Vocoder,
        LTX2VocoderConfig,
    )


def test_audio_parts_of_the_released_file_are_split_between_the_two_specs():
    state = {**_meta("ltx2_full", "audio_vae."), **_meta("ltx2_full", "vocoder.")}
    found = recognise(state, specs=[LTX2_AUDIO_VAE_SPEC, LTX2_VOCODER_SPEC])
    assert [(r.spec.role, r.layout.name, len(r.keys)) for r in found] == [
        ("audio_vae", "original", 102),
        ("vocoder", "original", 194),
    ]
    models = load_model(state, specs=[LTX2_AUDIO_VAE_SPEC, LTX2_VOCODER_SPEC])
    assert isinstance(models["audio_vae"], LTX2AudioVAE) and isinstance(models["vocoder"], LTX2Vocoder)
    with pytest.raises(UnknownModelError, match="102 keys belong to no known model: 'audio_vae."):
        recognise(state, specs=[LTX2_VOCODER_SPEC])


def test_config_needs_rates_and_dilations_the_shapes_cannot_give():
    state = tiny_model().state_dict()
    with pytest.raises(ConfigError, match="upsample_factors"):
        config_from_state(state)
    with pytest.raises(ConfigError, match="resnet_dilations"):
        config_from_state(state, {"upsample_factors": [3, 2]})
    config = config_from_state(state, {"upsample_factors": [3, 2], "resnet_dilations": [[1, 3], [1, 2]]})
    assert config == tiny_config()  # a plain dict of diffusers fields works like config.json


def test_config_json_is_checked_against_shapes_and_support():
    state = diffusers_to_ours(_meta("ltx2_vocoder_diffusers"))
    config = config_from_state(state, {"_class_name": "LTX2Vocoder", "final_act_fn": None})
    assert config.final_activation is None and config.upsample_rates == (6, 5, 2, 2, 2)
    with pytest.raises(ConfigError, match="hidden_channels=512"):
        config_from_state(state, {"_class_name": "LTX2Vocoder", "hidden_channels": 512})
    with pytest.raises(ConfigError, match="act_fn='snakebeta'"):
        config_from_state(state, {"_class_name": "LTX2Vocoder", "act_fn": "snakebeta"})
    assert config_from_state(state, {"_class_name": "AutoencoderKLLTX2Audio", "in_channels": 2}) == LTX2VocoderConfig()


def test_shapes_that_are_not_this_vocoder_are_refused():
    state = tiny_model().state_dict()
    state["resblocks.0.acts1.0.act.alpha"] = torch.zeros(16)
    with pytest.raises(CheckpointError, match="LTX-2.3"):
        config_from_state(state, TINY_JSON)
    state = {k: v for k, v in tiny_model().state_dict().items() if not k.startswith("resblocks.3.")}
    with pytest.raises(CheckpointError, match="3 residual blocks cannot be shared evenly by 2 upsamplers"):
        config_from_state(state, TINY_JSON)


def test_unmappable_keys_are_named():
    with pytest.raises(KeyError, match="mystery.weight"):
        diffusers_to_ours({"conv_in.weight": torch.zeros(1), "mystery.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="act_out.weight"):
        ours_to_diffusers({"act_out.weight": torch.zeros(1)})
    assert set(RENAMES) == {"conv_pre.", "ups.", "resblocks.", "conv_post."}


# ----------------------------------------------------------------------------------- loading files
def test_load_both_audio_models_from_one_original_file(tmp_path):
    """The released file's audio part: `audio_vae.*` and `vocoder.*` keys in one file, one spec each."""
    # test modules cannot import each other: a small audio VAE whose mel (2 x 8 bins) feeds tiny_config()
    vae, vocoder = LTX2AudioVAE(LTX2AudioVAEConfig(base_channels=8, latent_channels=4, mel_bins=8)).eval(), tiny_model()
    path = tmp_path / "ltx-2-tiny.safetensors"
    state = {f"audio_vae.{k}": v for k, v in vae.state_dict().items()}
    state.update({f"vocoder.{k}": v for k, v in vocoder.state_dict().items()})
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    models = load_model(path, specs=[LTX2_AUDIO_VAE_SPEC, LTX2_VOCODER_SPEC], config={"vocoder": TINY_JSON})
    assert models["vocoder"].config == vocoder.config and models["audio_vae"].config == vae.config
    assert all(torch.equal(models["vocoder"].state_dict()[k], v) for k, v in vocoder.state_dict().items())
    mel = vae.decode(torch.randn(1, 4, 3, 2, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        torch.testing.assert_close(models["vocoder"](models["audio_vae"].decode(vae.encode(mel))), vocoder(vae(mel)))


def test_load_model_from_a_diffusers_folder(tmp_path):
    model = tiny_model(final_bias=False, final_activation="clamp")
    folder = tmp_path / "vocoder"
    folder.mkdir()
    save_file(ours_to_diffusers(model.state_dict()), folder / "diffusion_pytorch_model.safetensors")
    (folder / "config.json").write_text(json.dumps({**TINY_JSON, "final_bias": False, "final_act_fn": "clamp"}))
    loaded = load_model(folder, torch_dtype="bfloat16", specs=[LTX2_VOCODER_SPEC])
    assert loaded.config == model.config
    assert all(torch.equal(loaded.state_dict()[k], v.to(torch.bfloat16)) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------------- parity with diffusers
def _diffusers_model(config: LTX2VocoderConfig):
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder as DiffusersVocoder

    return DiffusersVocoder(
        in_channels=config.in_channels,
        hidden_channels=config.hidden_channels,
        out_channels=config.out_channels,
        upsample_kernel_sizes=list(config.upsample_kernel_sizes),
        upsample_factors=list(config.upsample_rates),
        resnet_kernel_sizes=list(config.resblock_kernel_sizes),
        resnet_dilations=[list(d) for d in config.resblock_dilations],
        final_act_fn=config.final_activation,
        final_bias=config.final_bias,
    ).eval()


@pytest.mark.parity
@pytest.mark.parametrize("final_activation", ["tanh", None])
def test_matches_diffusers(final_activation):
    """Waveform against diffusers' `LTX2Vocoder`, weights through our converter, strict load; without the
    final tanh too, so saturation cannot hide a difference."""
    pytest.importorskip("diffusers")
    ours = tiny_model(final_activation=final_activation)
    theirs = _diffusers_model(ours.config)
    theirs.load_state_dict(ours_to_diffusers(ours.state_dict()), strict=True)
    mel = tiny_mel()
    with torch.no_grad():
        expected = theirs(mel)
        got = ours(mel)
    assert got.shape == expected.shape == (2, 2, 54)
    assert expected.abs().max() > 0.05
    assert (got - expected).abs().max().item() <= 1e-6


@pytest.mark.parity
def test_release_config_matches_diffusers_defaults():
    """Our defaults build the same network as diffusers' `LTX2Vocoder()` (the release): same names after the
    renames, same shapes (meta device, no weights)."""
    pytest.importorskip("diffusers")
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder as DiffusersVocoder

    with torch.device("meta"):
        ours, theirs = LTX2Vocoder(), DiffusersVocoder()
    assert _shapes(ours_to_diffusers(ours.state_dict())) == _shapes(theirs.state_dict())
    assert theirs.config.output_sampling_rate == ours.sampling_rate and theirs.total_upsample_factor == ours.hop_length
