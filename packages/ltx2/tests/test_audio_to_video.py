"""LTX-2 audio-to-video (`retake_audio`, DiffSynth-Studio's arguments; the authors' `A2VidPipelineTwoStage`):
the given sound is encoded as the training task encodes it, seen clean by the DiT and never stepped, in one or
two stages; `retake_audio_regions` re-make only parts of it."""

from __future__ import annotations

import math

import diffsynth_ltx2_test_repo as repo_module  # loaded by conftest
import pytest
import torch

from diffsynth.ltx2.dit import audio_positions
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.media import save_audio

CAPTIONS = repo_module.CAPTIONS
F, H, W = repo_module.FRAMES, repo_module.HEIGHT, repo_module.WIDTH
RATE = 24000
SETTINGS = dict(
    height=H,
    width=W,
    num_frames=F,
    num_inference_steps=2,
    max_sequence_length=repo_module.MAX_SEQUENCE_LENGTH,
    stg_scale=0.0,
    modality_scale=1.0,
    progress_bar=False,
    seed=0,
    output_type="pt",
)


def tone(seconds: float = 0.5, rate: int = RATE, channels: int = 2) -> torch.Tensor:
    """A chord, different in each channel, `[channels, samples]` in [-1, 1]."""
    t = torch.arange(int(seconds * rate)) / rate
    waves = [0.3 * torch.sin(2 * math.pi * f * t) + 0.2 * torch.sin(2 * math.pi * 3 * f * t) for f in (220, 330)]
    return torch.stack(waves[:channels])


class Recorder:
    """Spies on the DiT: the audio tokens and audio timesteps of every call."""

    def __init__(self, monkeypatch, dit):
        self.calls = []
        real = type(dit).forward

        def spy(model, video, audio, video_text, audio_text, timestep, **kwargs):
            self.calls.append((audio.detach().clone(), kwargs["audio_timestep"].detach().clone()))
            return real(model, video, audio, video_text, audio_text, timestep, **kwargs)

        monkeypatch.setattr(type(dit), "forward", spy)


def test_the_given_sound_is_kept_clean_and_returned(tiny_ltx2_pipe, monkeypatch):
    pipe = tiny_ltx2_pipe
    sound = tone()
    expected = pipe.encode_audio(sound, RATE, F, 24.0)
    recorder = Recorder(monkeypatch, pipe.dit)
    frames, audio = pipe(CAPTIONS[0], retake_audio=sound, audio_sample_rate=RATE, cfg_scale=1.0, **SETTINGS)
    from diffsynth.ltx2.audio_vae import pack_latents

    assert len(recorder.calls) == 2
    for tokens, timestep in recorder.calls:  # every step reads the encoded sound, at timestep 0
        torch.testing.assert_close(tokens, pack_latents(expected), rtol=0, atol=0)
        assert timestep.shape == (1, expected.shape[2]) and not timestep.any()
    waveform, sample_rate = audio
    assert sample_rate == RATE
    torch.testing.assert_close(waveform[0], sound[:, : int(F / 24.0 * RATE)])  # the sound as given ("pt": a batch)
    text_only, _ = pipe(CAPTIONS[0], cfg_scale=1.0, **SETTINGS)
    assert (frames - text_only).abs().max() > 1e-3  # the video is made to the sound


def test_a_short_sound_is_returned_zero_padded_to_the_clip(tiny_ltx2_pipe):
    """A sound shorter than the clip is encoded zero-padded, and returned so: as long as the video."""
    sound = tone(seconds=0.1)
    _, audio = tiny_ltx2_pipe(CAPTIONS[0], retake_audio=sound, audio_sample_rate=RATE, cfg_scale=1.0, **SETTINGS)
    expected = torch.nn.functional.pad(sound, (0, int(F / 24.0 * RATE) - sound.shape[1]))
    torch.testing.assert_close(audio.waveform[0], expected, rtol=0, atol=0)


def test_regions_are_remade_and_the_rest_is_kept(tiny_ltx2_pipe, monkeypatch):
    """A latent frame is re-made when its half-open span overlaps a region (the authors' rule): noisy and stepped
    there, given and at timestep 0 elsewhere; the sound is then decoded by the vocoder."""
    pipe = tiny_ltx2_pipe
    sound = tone()
    expected = pipe.encode_audio(sound, RATE, F, 24.0)
    frames = expected.shape[2]
    spans = audio_positions(pipe.dit.config, 1, frames)[0, 0]
    region = (0.1, 0.2)
    inside = (spans[:, 1] > region[0]) & (spans[:, 0] < region[1])
    assert 0 < inside.sum() < frames
    recorder = Recorder(monkeypatch, pipe.dit)
    _, audio = pipe(CAPTIONS[0], retake_audio=sound, audio_sample_rate=RATE, retake_audio_regions=[region], **SETTINGS)
    from diffsynth.ltx2.audio_vae import unpack_latents

    first, last = (
        unpack_latents(tokens[:1], expected.shape[3]) for tokens, _ in (recorder.calls[0], recorder.calls[-1])
    )
    torch.testing.assert_close(first[:, :, ~inside], expected[:, :, ~inside], rtol=0, atol=0)
    torch.testing.assert_close(last[:, :, ~inside], expected[:, :, ~inside], rtol=0, atol=0)
    assert (first[:, :, inside] - expected[:, :, inside]).abs().max() > 0.1  # noise there
    timestep = recorder.calls[0][1]
    assert (timestep[:, inside] == 1000).all() and not timestep[:, ~inside].any()
    assert audio.sample_rate == pipe.sample_rate  # re-synthesised by the vocoder


def test_a_file_works_like_the_waveform(tiny_ltx2_pipe, tmp_path):
    sound = tone(rate=16000)
    path = tmp_path / "voice.wav"
    save_audio(sound, path, 16000)
    from diffsynth.runtime.media import load_audio

    waveform, rate = load_audio(path)
    from_file = tiny_ltx2_pipe(CAPTIONS[1], retake_audio=str(path), **SETTINGS)
    from_tensor = tiny_ltx2_pipe(CAPTIONS[1], retake_audio=waveform, audio_sample_rate=rate, **SETTINGS)
    torch.testing.assert_close(from_file[0], from_tensor[0], rtol=0, atol=0)


def test_the_training_task_encodes_sound_through_the_same_call(tiny_ltx2_pipe):
    """`encode_audio` resamples, cuts to the clip and encodes: a 48 kHz tone encodes like its 16 kHz version
    (libswresample), and a short sound is zero-padded to the clip's length."""
    pipe = tiny_ltx2_pipe
    from diffsynth.runtime.media import resample_audio

    high = tone(rate=48000)
    low = resample_audio(high, 48000, 16000)
    a, b = pipe.encode_audio(high, 48000, F, 24.0), pipe.encode_audio(low, 16000, F, 24.0)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    short = pipe.encode_audio(tone(seconds=0.1, rate=16000), 16000, F, 24.0)
    padded = torch.nn.functional.pad(tone(seconds=0.1, rate=16000), (0, int(F / 24.0 * 16000) - 1600))
    torch.testing.assert_close(short, pipe.encode_audio(padded, 16000, F, 24.0), rtol=0, atol=0)


def test_two_stages_keep_the_sound_in_both(tiny_ltx2_base, tiny_ltx2_pipe, monkeypatch):
    upsampler, _ = repo_module.write_two_stage_files(tiny_ltx2_base / "two-stage-audio", tiny_ltx2_pipe.dit)
    pipe = repo_module.our_pipeline(tiny_ltx2_base, model_configs=[ModelConfig(path=str(upsampler))])
    sound = tone()
    expected = pipe.encode_audio(sound, RATE, F, 24.0)
    recorder = Recorder(monkeypatch, pipe.dit)
    settings = {**SETTINGS, "height": 2 * H, "width": 2 * W}
    settings.pop("num_inference_steps")
    pipe(CAPTIONS[2], retake_audio=sound, audio_sample_rate=RATE, use_distilled_pipeline=True, **settings)
    from diffsynth.ltx2.audio_vae import pack_latents

    assert len(recorder.calls) == 8 + 3
    for tokens, timestep in recorder.calls:
        torch.testing.assert_close(tokens, pack_latents(expected), rtol=0, atol=0)
        assert not timestep.any()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(retake_audio=torch.zeros(3, 8000)), "3 channels"),
        (dict(retake_audio=torch.zeros(2, 2, 8000)), r"\[channels, samples\]"),
        (dict(retake_audio=tone(), retake_audio_regions=[(0.3, 0.1)]), r"\(0.3, 0.1\)"),
        (dict(retake_audio=tone(), audio_sample_rate=0), "sample_rate"),
        (dict(retake_audio_regions=[(0.1, 0.2)]), "retake_audio_regions are regions of retake_audio"),
    ],
)
def test_bad_sound_is_refused(tiny_ltx2_pipe, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        tiny_ltx2_pipe(CAPTIONS[0], **{"audio_sample_rate": RATE, **SETTINGS, **kwargs})
