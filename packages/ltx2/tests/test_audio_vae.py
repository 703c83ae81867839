"""LTX-2 audio VAE: tiny-config behaviour, parity with diffusers' `AutoencoderKLLTX2Audio`, the log-mel front end
against transformers' reference spectrogram, full-size key and shape checks against the released file, and
loading in each layout."""

from __future__ import annotations

import json

import diffsynth_ltx2_release_checks as checks  # loaded by conftest
import pytest
import torch
from safetensors.torch import save_file

from diffsynth.ltx2.audio_vae import (
    LTX2AudioVAE,
    LTX2AudioVAEConfig,
    mel_filterbank,
    mel_spectrogram,
    pack_latents,
    unpack_latents,
)
from diffsynth.ltx2.audio_vae_formats import (
    LAYOUTS,
    LTX2_AUDIO_VAE_SPEC,
    config_from_state,
    diffusers_to_ours,
    ours_to_diffusers,
)
from diffsynth.runtime.errors import CheckpointError, ConfigError, UnknownModelError
from diffsynth.runtime.loading import load_model, recognise
from diffsynth.runtime.testing import conformance as cf

MEAN, STD = "per_channel_statistics.mean-of-means", "per_channel_statistics.std-of-means"


def tiny_config(**overrides) -> LTX2AudioVAEConfig:
    """The only place tiny sizes live. Three levels as released (diffusers hard-codes the 4x factor);
    base 8 = 4 latent channels x 2 latent mel bins, the statistics' length in diffusers' class."""
    kwargs = dict(base_channels=8, latent_channels=4, mel_bins=8, num_res_blocks=1)
    kwargs.update(overrides)
    return LTX2AudioVAEConfig(**kwargs)


def tiny_model(seed: int = 0, **overrides) -> LTX2AudioVAE:
    """Random weights (the release has no norm weights) and statistics away from identity."""
    model = LTX2AudioVAE(tiny_config(**overrides)).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=generator))
        size = model.config.statistics_size
        model.per_channel_statistics.get_buffer("mean-of-means").copy_(0.3 * torch.randn(size, generator=generator))
        model.per_channel_statistics.get_buffer("std-of-means").copy_(0.5 + torch.rand(size, generator=generator))
    return model


def tiny_mel(frames: int = 13, bins: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 2, frames, bins, generator=torch.Generator().manual_seed(seed)) - 4.0


_meta, _shapes = checks.released_meta, checks.shapes


# ----------------------------------------------------------------------------------- config and model
def test_default_config_is_the_release():
    config = LTX2AudioVAEConfig()
    assert (config.latent_channels, config.latent_mel_bins, config.statistics_size) == (8, 16, 128)
    assert (config.compression, config.latents_per_second) == (4, 25.0)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(ch_mult=()), "ch_mult"),
        (dict(ch_mult=(1, 0, 2)), "ch_mult"),
        (dict(mel_bins=10), "mel_bins"),
        (dict(latent_channels=0), "latent_channels"),
        (dict(num_res_blocks=True), "num_res_blocks"),
    ],
)
def test_config_validation_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


@pytest.mark.parametrize(("frames", "latent_frames"), [(1, 1), (4, 1), (5, 2), (13, 4), (16, 4)])
def test_encode_decode_shapes(frames, latent_frames):
    model = tiny_model()
    with torch.no_grad():
        latents = model.encode(tiny_mel(frames))
        assert latents.shape == (1, 4, latent_frames, 2) and model.num_latent_frames(frames) == latent_frames
        mel = model.decode(latents)
    assert mel.shape == (1, 2, max(4 * latent_frames - 3, 1), 8) == (1, 2, model.num_mel_frames(latent_frames), 8)


def test_not_causal_decodes_four_frames_per_latent():
    model = tiny_model(causal=False)
    with torch.no_grad():
        latents = model.encode(tiny_mel(16))
        assert latents.shape == (1, 4, 4, 2)
        assert model.decode(latents).shape == (1, 2, 16, 8)


def test_encoder_and_decoder_are_causal_in_time():
    """Changing later mel frames leaves earlier latents unchanged, and the same for decoding; the
    non-causal variant does see the future."""
    model = tiny_model()
    mel = tiny_mel(16)
    later = mel.clone()
    later[:, :, 8:] += 1.0
    with torch.no_grad():
        a, b = model.encode(mel), model.encode(later)
        assert torch.equal(a[:, :, :2], b[:, :, :2]) and (a[:, :, 2:] - b[:, :, 2:]).abs().max() > 1e-3
        changed = a.clone()
        changed[:, :, 2:] += 1.0
        da, db = model.decode(a), model.decode(changed)
        assert torch.equal(da[:, :, :5], db[:, :, :5]) and (da[:, :, 5:] - db[:, :, 5:]).abs().max() > 1e-4
        open_model = tiny_model(causal=False)
        a, b = open_model.encode(mel), open_model.encode(later)
        assert (a[:, :, 1] - b[:, :, 1]).abs().max() > 1e-4


def test_latents_are_normalised_per_channel_and_mel_bin():
    """Statistic `c * F + f` belongs to channel c, latent mel bin f: the DiT token layout `[B, L, C * F]`."""
    model = tiny_model()
    plain = tiny_model()
    plain.per_channel_statistics.get_buffer("mean-of-means").zero_()
    plain.per_channel_statistics.get_buffer("std-of-means").fill_(1.0)
    mel = tiny_mel()
    mean = model.per_channel_statistics.get_buffer("mean-of-means")
    std = model.per_channel_statistics.get_buffer("std-of-means")
    with torch.no_grad():
        raw = plain.encode(mel)
        tokens = (pack_latents(raw) - mean) / std  # what the diffusers pipeline does on packed tokens
        torch.testing.assert_close(model.encode(mel), unpack_latents(tokens, 2))
        latents = model.encode(mel)
        torch.testing.assert_close(
            model.decode(latents), plain.decode(unpack_latents(pack_latents(latents) * std + mean, 2))
        )


def test_pack_and_unpack_are_inverse():
    latents = torch.randn(2, 8, 5, 16)
    tokens = pack_latents(latents)
    assert tokens.shape == (2, 5, 128)
    assert torch.equal(tokens[1, 3, 16 * 2 + 7], latents[1, 2, 3, 7])
    assert torch.equal(unpack_latents(tokens), latents)
    with pytest.raises(ConfigError, match="latent_mel_bins=16"):
        unpack_latents(torch.zeros(1, 5, 100))


def test_encode_samples_the_posterior_reproducibly():
    model, mel = tiny_model(), tiny_mel()
    with torch.no_grad():
        a = model.encode(mel, sample=True, generator=torch.Generator().manual_seed(1))
        b = model.encode(mel, sample=True, generator=torch.Generator().manual_seed(1))
        c = model.encode(mel, sample=True, generator=torch.Generator().manual_seed(2))
        mode = model.encode(mel)
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, mode)


def test_conformance_forward_and_meta_load():
    mel = tiny_mel(9)
    cf.check_forward(tiny_model, (mel,), expected_shapes=[mel.shape])
    cf.check_meta_load(tiny_model, (mel,))


def test_conformance_backward_and_gradient_checkpointing():
    mel = tiny_mel(9)
    cf.check_backward(tiny_model, (mel,))
    cf.check_gradient_checkpointing(tiny_model, (mel,))


def test_conformance_units_spec_config_and_layouts():
    cf.check_declared_units(tiny_model)
    assert cf.check_spec_config(LTX2_AUDIO_VAE_SPEC, tiny_model) == tiny_config()
    assert cf.check_spec_config(LTX2_AUDIO_VAE_SPEC, lambda: tiny_model(ch_mult=(1, 2), mel_bins=4)).mel_bins == 4
    for layout in LAYOUTS:
        cf.check_layout_roundtrip(tiny_model, layout, ours_to_diffusers if layout.name == "diffusers" else None)


def test_vram_managed_equals_unmanaged(tmp_path):
    """Streaming each stage from cpu or from the file moves the same float32 bytes: same spectrogram."""
    from diffsynth.runtime.vram import enable_vram_management

    mel = tiny_mel(9)
    with torch.no_grad():
        reference = tiny_model()(mel)
        model = tiny_model().requires_grad_(False)
        stream = {"offload_device": "cpu", "onload_device": "cpu"}
        handle = enable_vram_management(model, stream, vram_limit=0, device="cpu")
        assert handle.plan.resident == () and len(handle.units) == 3 + 3
        torch.testing.assert_close(model(mel), reference, rtol=0, atol=0)
        assert handle.report().bytes_moved > 0
        model = tiny_model().requires_grad_(False)
        path = tmp_path / "audio_vae.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
        disk = {"offload_device": "disk", "onload_device": "disk"}
        enable_vram_management(model, disk, vram_limit=0, device="cpu", checkpoint=[str(path)])
        torch.testing.assert_close(model(mel), reference, rtol=0, atol=0)


def test_bfloat16_runs():
    model = tiny_model().to(torch.bfloat16)
    with torch.no_grad():
        mel = model.decode(model.encode(tiny_mel().to(torch.bfloat16)))
    assert mel.dtype == torch.bfloat16 and torch.isfinite(mel).all()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: m.encode(tiny_mel(13, bins=6)), r"mel must be a \[B, 2, T, 8\] tensor"),
        (lambda m: m.encode(torch.zeros(1, 1, 13, 8)), r"\[B, 2, T, 8\]"),
        (lambda m: m.encode(torch.zeros(2, 13, 8)), r"\[B, 2, T, 8\].*got \(2, 13, 8\)"),
        (lambda m: m.decode(torch.zeros(1, 4, 3, 3)), r"latents must be a \[B, 4, L, 2\]"),
        (lambda m: m.decode(torch.zeros(1, 4, 0, 2)), "no frames"),
    ],
)
def test_bad_inputs_name_the_argument(call, message):
    with pytest.raises(ConfigError, match=message):
        call(tiny_model())


# ----------------------------------------------------------------------------------- waveform -> log-mel
def test_mel_spectrogram_matches_the_transformers_reference():
    """ltx-core computes torchaudio's MelSpectrogram(n_fft 1024, hop 160, Slaney scale and norm, power 1,
    centred, reflect) then log(max(., 1e-5)); transformers' numpy (float64) `spectrogram` is the same recipe."""
    audio_utils = pytest.importorskip("transformers.audio_utils")
    import numpy as np

    config = LTX2AudioVAEConfig()
    generator = torch.Generator().manual_seed(0)
    t = torch.arange(4000) / 16000
    waveform = torch.stack([torch.sin(2 * torch.pi * 440 * t), 0.3 * torch.randn(4000, generator=generator)])[None]
    reference_bank = audio_utils.mel_filter_bank(
        num_frequency_bins=513,
        num_mel_filters=64,
        min_frequency=0.0,
        max_frequency=8000.0,
        sampling_rate=16000,
        norm="slaney",
        mel_scale="slaney",
    )
    bank = mel_filterbank(16000, 1024, 64)
    assert bank.shape == (64, 513)
    assert np.abs(bank.T.numpy() - reference_bank).max() < 1e-6
    mel = mel_spectrogram(waveform, 16000, config)
    assert mel.shape == (1, 2, 1 + 4000 // 160, 64)
    for channel in range(2):
        expected = audio_utils.spectrogram(
            waveform[0, channel].double().numpy(),
            audio_utils.window_function(1024, "hann", periodic=True),
            frame_length=1024,
            hop_length=160,
            power=1.0,
            center=True,
            pad_mode="reflect",
            mel_filters=reference_bank,
            mel_floor=1e-5,
            log_mel="log",
        )  # [mel, frames]
        # in linear magnitude: near the 1e-5 floor float32 STFT noise moves the log by ~1e-2 (measured 2e-6 abs)
        np.testing.assert_allclose(np.exp(mel[0, channel].T.double().numpy()), np.exp(expected), rtol=1e-4, atol=1e-5)
    assert (mel[0, 0] > np.log(1e-5) + 1).any()  # the tone is above the floor: the comparison means something


def test_mel_spectrogram_shapes_and_errors():
    mono = torch.randn(3200)[None]
    mel = mel_spectrogram(mono, 16000)
    assert mel.shape == (1, 2, 21, 64) and torch.equal(mel[:, 0], mel[:, 1])
    with pytest.raises(ConfigError, match="sample_rate=44100.*resample"):
        mel_spectrogram(mono, 44100)
    with pytest.raises(ConfigError, match="3 channels"):
        mel_spectrogram(torch.randn(1, 3, 3200), 16000)
    with pytest.raises(ConfigError, match="at least 513"):
        mel_spectrogram(torch.randn(2, 100), 16000)
    with pytest.raises(ConfigError, match="waveform must be"):
        mel_spectrogram(torch.randn(3200), 16000)


# ----------------------------------------------------------------------------------- full-size formats
def test_model_has_the_released_keys_and_shapes():
    """Our module is the `audio_vae.*` part of ltx-2-19b-dev.safetensors, key for key."""
    released = _meta("ltx2_full", "audio_vae.")
    assert len(released) == 102
    with torch.device("meta"):
        model = LTX2AudioVAE()
    ours = _shapes(model.state_dict())
    assert ours == {k.removeprefix("audio_vae."): s for k, s in _shapes(released).items()}
    assert _shapes(LAYOUTS[0].to_ours(released)) == ours


def test_diffusers_keys_convert_to_ours_and_back():
    checks.assert_diffusers_round_trip(LTX2AudioVAE, "ltx2_audio_vae_diffusers", diffusers_to_ours, ours_to_diffusers)


@pytest.mark.parametrize(("name", "layout"), [("ltx2_full", "original"), ("ltx2_audio_vae_diffusers", "diffusers")])
def test_released_shapes_give_the_default_config(name, layout):
    checks.assert_default_config_from(
        _meta(name, "audio_vae." if name == "ltx2_full" else None),
        LTX2_AUDIO_VAE_SPEC,
        layout,
        config_from_state,
        LTX2AudioVAE,
        LTX2AudioVAEConfig,
    )


def test_only_audio_vae_keys_are_taken_from_the_single_file():
    state = {**_meta("ltx2_full", "audio_vae."), "vae.encoder.conv_in.conv.weight": torch.empty(1, device="meta")}
    (found,) = recognise({k: v for k, v in state.items() if k.startswith("audio_vae.")}, specs=[LTX2_AUDIO_VAE_SPEC])
    assert found.layout.name == "original"
    with pytest.raises(UnknownModelError, match="vae.encoder.conv_in.conv.weight"):
        recognise(state, specs=[LTX2_AUDIO_VAE_SPEC])


def test_config_json_refines_and_is_checked_against_shapes():
    state = diffusers_to_ours(_meta("ltx2_audio_vae_diffusers"))
    given = {"_class_name": "AutoencoderKLLTX2Audio", "causality_axis": "none", "sample_rate": 22050}
    config = config_from_state(state, given)
    assert not config.causal and config.sample_rate == 22050 and config.mel_bins == 64
    assert config_from_state(state, {"causality_axis": "none"}).causal is False  # a plain dict of the same fields
    cls = {"_class_name": "AutoencoderKLLTX2Audio"}
    with pytest.raises(ConfigError, match="mel_bins=32"):
        config_from_state(state, {**cls, "mel_bins": 32})
    with pytest.raises(ConfigError, match="norm_type"):
        config_from_state(state, {**cls, "norm_type": "group"})
    with pytest.raises(ConfigError, match="attn_resolutions"):
        config_from_state(state, {**cls, "attn_resolutions": [8]})
    with pytest.raises(ConfigError, match="causality_axis='width'"):
        config_from_state(state, {**cls, "causality_axis": "width"})
    assert config_from_state(state, {"_class_name": "LTX2Vocoder", "mel_bins": 7}) == LTX2AudioVAEConfig()


def test_shapes_that_are_not_an_ltx2_audio_vae_are_refused():
    state = tiny_model().state_dict()
    state["encoder.conv_out.conv.weight"] = torch.zeros(4, 32, 3, 3)
    with pytest.raises(CheckpointError, match="log-variances"):
        config_from_state(state)
    state = tiny_model().state_dict()
    state["encoder.mid.attn_1.q.weight"] = torch.zeros(32, 32, 1, 1)
    with pytest.raises(CheckpointError, match="attention"):
        config_from_state(state)
    state = tiny_model().state_dict()
    state = {k: v for k, v in state.items() if not k.startswith("decoder.up.0.block.1.")}
    with pytest.raises(CheckpointError, match="decoder.up.0 has 1 blocks"):
        config_from_state(state)


# ----------------------------------------------------------------------------------- loading files
def test_load_model_from_the_original_single_file(tmp_path):
    model = tiny_model()
    path = tmp_path / "ltx-2-tiny.safetensors"
    save_file({f"audio_vae.{k}": v.contiguous() for k, v in model.state_dict().items()}, path)
    loaded = load_model(path, specs=[LTX2_AUDIO_VAE_SPEC])
    assert loaded.config == model.config
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_load_model_from_a_diffusers_folder(tmp_path):
    model = tiny_model(causal=False)
    folder = tmp_path / "audio_vae"
    folder.mkdir()
    save_file(ours_to_diffusers(model.state_dict()), folder / "diffusion_pytorch_model.safetensors")
    config = {
        "_class_name": "AutoencoderKLLTX2Audio",
        "base_channels": 8,
        "latent_channels": 4,
        "mel_bins": 8,
        "num_res_blocks": 1,
        "causality_axis": "none",
    }
    (folder / "config.json").write_text(json.dumps(config))
    loaded = load_model(folder, torch_dtype="bfloat16", specs=[LTX2_AUDIO_VAE_SPEC])
    assert loaded.config == model.config
    assert all(torch.equal(loaded.state_dict()[k], v.to(torch.bfloat16)) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------------- parity with diffusers
def _diffusers_model(config: LTX2AudioVAEConfig):
    from diffusers import AutoencoderKLLTX2Audio

    assert config.base_channels == config.statistics_size, "diffusers sizes the statistics by base_channels"
    return AutoencoderKLLTX2Audio(
        base_channels=config.base_channels,
        output_channels=config.out_channels,
        ch_mult=config.ch_mult,
        num_res_blocks=config.num_res_blocks,
        in_channels=config.in_channels,
        latent_channels=config.latent_channels,
        mel_bins=config.mel_bins,
        causality_axis="height" if config.causal else "none",
    ).eval()


@pytest.mark.parity
@pytest.mark.parametrize("causal", [True, False])
def test_matches_diffusers(causal):
    """Encode (mode and sample) and decode against diffusers with its pipeline's normalisation (on packed
    tokens), weights through our converter, strict load."""
    pytest.importorskip("diffusers")
    ours = tiny_model(num_res_blocks=2, causal=causal)
    theirs = _diffusers_model(ours.config)
    theirs.load_state_dict(ours_to_diffusers(ours.state_dict()), strict=True)
    mel = tiny_mel(13 if causal else 16)
    mean, std = theirs.latents_mean, theirs.latents_std
    with torch.no_grad():
        posterior = theirs.encode(mel).latent_dist
        expected = unpack_latents((pack_latents(posterior.mode()) - mean) / std, 2)
        latents = ours.encode(mel)
        assert latents.shape == expected.shape == (1, 4, 4, 2)
        assert (latents - expected).abs().max().item() <= 1e-5

        sampled = unpack_latents((pack_latents(posterior.sample(torch.Generator().manual_seed(2))) - mean) / std, 2)
        ours_sampled = ours.encode(mel, sample=True, generator=torch.Generator().manual_seed(2))
        assert (ours_sampled - sampled).abs().max().item() <= 1e-5

        decoded = theirs.decode(unpack_latents(pack_latents(expected) * std + mean, 2)).sample
        assert decoded.shape == (1, 2, 13, 8) and decoded.abs().max() > 0.1
        mel_out = ours.decode(expected)
        # diffusers crops to 4L - 3 frames even without causality; ltx-core (and we) keep all 4L there
        assert mel_out.shape == (1, 2, 13 if causal else 16, 8)
        assert (mel_out[:, :, :13] - decoded).abs().max().item() <= 1e-5


@pytest.mark.parity
def test_original_file_through_the_diffusers_converter():
    """The released layout (`audio_vae.` prefix) through diffusers' own converter loads strictly and gives the
    same tensors as our converter."""
    pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_ltx2_audio_vae_to_diffusers

    ours = tiny_model(seed=1)
    theirs = _diffusers_model(ours.config)
    converted = convert_ltx2_audio_vae_to_diffusers({f"audio_vae.{k}": v for k, v in ours.state_dict().items()})
    theirs.load_state_dict(converted, strict=True)
    mine = ours_to_diffusers(ours.state_dict())
    assert converted.keys() == mine.keys() and all(torch.equal(converted[k], v) for k, v in mine.items())
