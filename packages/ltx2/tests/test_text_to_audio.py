"""Text-to-audio (`LTX2Pipeline.generate_audio`, `text_to_audio.py`): the DiT's audio-only forward against the
audio-video forward with the cross-modal attentions off, the whole run against a plain Euler loop written here,
the guidance passes, the duration, and bad input."""

from __future__ import annotations

import diffsynth_ltx2_test_repo as repo_module  # loaded by conftest
import pytest
import torch

from diffsynth.ltx2.dit import AttentionSkip, LTX2DiT
from diffsynth.ltx2.pipeline import LTX2Pipeline, ltx2_velocity
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.schedulers import FlowMatchScheduler
from diffsynth.runtime.testing.weights import random_weights

CAPTIONS = repo_module.CAPTIONS
FAST = dict(
    num_frames=9, num_inference_steps=2, max_sequence_length=repo_module.MAX_SEQUENCE_LENGTH, progress_bar=False
)


@pytest.mark.parametrize("version", ["2.0", "2.3"])
def test_audio_only_forward_is_the_audio_stream_without_the_video(version):
    """No video tokens: the audio stream is exactly the one an audio-video call computes when both
    audio<->video attentions are off (the video's content then cannot reach the audio)."""
    dit = random_weights(LTX2DiT(repo_module.tiny_configs(version)["dit"]), 0, scale=0.2).eval()
    cfg, g = dit.config, torch.Generator().manual_seed(1)
    widths = (cfg.caption_channels,) * 2 if cfg.caption_projection else (cfg.dim, cfg.audio_dim)
    video = torch.randn(2, 8, cfg.in_channels, generator=g)
    audio = torch.randn(2, 9, cfg.audio_in_channels, generator=g)
    contexts = [torch.randn(2, 5, w, generator=g) for w in widths]
    timestep, sizes = torch.tensor([700.0, 250.0]), dict(num_frames=2, height=2, width=2, fps=24.0)
    cut = [AttentionSkip("a2v", None, None), AttentionSkip("v2a", None, None)]
    with torch.no_grad():
        _, want = dit(video, audio, *contexts, timestep, skips=cut, **sizes)
        _, linked = dit(video, audio, *contexts, timestep, **sizes)
        empty, got = dit(video[:, :0], audio, *contexts, timestep, **dict(sizes, num_frames=0))
    assert empty.shape == (2, 0, cfg.out_channels)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert (linked - want).abs().max() > 1e-4  # with the video attended, the audio differs


def test_generate_audio_is_an_euler_loop_over_the_audio_alone(tiny_ltx2_pipe):
    """Without guidance: noise drawn for the audio alone, the full model's schedule (shifted as for 4096 tokens),
    Euler steps of the audio-only DiT, then the audio VAE and vocoder."""
    pipe = tiny_ltx2_pipe
    got = pipe.generate_audio(CAPTIONS[0], seed=3, audio_cfg_scale=1.0, audio_stg_scale=0.0, **FAST)
    shape = pipe.audio_latent_shape(1, 9, 24.0)
    audio = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    scheduler = FlowMatchScheduler("ltx2")
    scheduler.set_timesteps(2, image_seq_len=4096)
    text = pipe.encode_prompt(CAPTIONS[:1], FAST["max_sequence_length"])
    no_video = torch.zeros(1, pipe.dit.config.in_channels, 0, 1, 1)
    with torch.no_grad():
        for i, sigma in enumerate(scheduler.sigmas[:-1]):
            _, velocity = ltx2_velocity(pipe.dit, no_video, audio, sigma, text, 24.0)
            audio = audio + (scheduler.sigmas[i + 1] - sigma) * velocity
        want = pipe.decode_audio(audio)[0]
    assert got.sample_rate == pipe.sample_rate and got.waveform.shape == want.shape
    torch.testing.assert_close(got.waveform, want, atol=1e-5, rtol=0)


def test_guidance_passes_and_defaults(tiny_ltx2_pipe, monkeypatch):
    """The authors' audio guidance by default (CFG 7, rescale 0.7 on the audio, STG on the audio self-attention of
    the STG block): prompt, negative prompt and perturbed rows in one DiT call with no video tokens, no modality
    isolation. Guidance changes the sound."""
    pipe, calls = tiny_ltx2_pipe, []
    real = LTX2Pipeline.predict

    def spy(self, *args, **kwargs):
        calls.append((args[5:9], kwargs["guidance"]))
        return real(self, *args, **kwargs)

    hook = pipe.dit.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append((args[0].shape, args[1].shape, kwargs["skips"])), with_kwargs=True
    )
    monkeypatch.setattr(LTX2Pipeline, "predict", spy)
    try:
        guided = pipe.generate_audio(CAPTIONS[0], CAPTIONS[3], seed=3, spatio_temporal_guidance_blocks=[1], **FAST)
    finally:
        hook.remove()
    (scales, guidance), (video_shape, audio_shape, skips) = calls[:2]
    assert scales == (True, 1.0, 7.0, (0.0, 0.7)) and guidance.audio_stg_scale == 1.0 and guidance.stg_scale == 0.0
    assert not guidance.isolation and guidance.blocks == (1,)
    assert video_shape[:2] == (3, 0) and audio_shape[0] == 3  # prompt, negative prompt, perturbed prompt
    assert skips == [AttentionSkip("audio_self", (1,), (2,))]
    plain = pipe.generate_audio(CAPTIONS[0], CAPTIONS[3], seed=3, audio_cfg_scale=1.0, audio_stg_scale=0.0, **FAST)
    assert (guided.waveform - plain.waveform).abs().max() > 1e-4


def test_duration_seeds_and_batches(tiny_ltx2_pipe):
    """The sound lasts num_frames / frame_rate (as the video's would): L = round(F / fps * 25) latent frames."""
    pipe, fast = tiny_ltx2_pipe, dict(FAST, num_inference_steps=1, audio_cfg_scale=1.0, audio_stg_scale=0.0)
    short = pipe.generate_audio(CAPTIONS[0], seed=1, **fast)
    slow = pipe.generate_audio(CAPTIONS[0], seed=1, frame_rate=8.0, **fast)
    assert short.waveform.shape == (2, (9 * 4 - 3) * 240) and slow.waveform.shape == (2, (28 * 4 - 3) * 240)
    again = pipe.generate_audio(CAPTIONS[0], seed=1, **fast)
    other = pipe.generate_audio(CAPTIONS[0], seed=2, **fast)
    torch.testing.assert_close(again.waveform, short.waveform, atol=0, rtol=0)
    assert (other.waveform - short.waveform).abs().max() > 1e-4
    batch = pipe.generate_audio(CAPTIONS[:2], seed=1, **fast)
    assert batch.waveform.shape == (2, *short.waveform.shape)


def test_given_noise_and_bad_input(tiny_ltx2_pipe):
    pipe = tiny_ltx2_pipe
    fast = dict(FAST, num_inference_steps=1, audio_cfg_scale=1.0, audio_stg_scale=0.0)
    noise = torch.randn(pipe.audio_latent_shape(1, 9, 24.0), generator=torch.Generator().manual_seed(4))
    seeded = pipe.generate_audio(CAPTIONS[0], seed=4, **fast)
    given = pipe.generate_audio(CAPTIONS[0], audio_latents=noise, **fast)
    torch.testing.assert_close(given.waveform, seeded.waveform, atol=0, rtol=0)
    with pytest.raises(ConfigError, match="audio_latents"):
        pipe.generate_audio(CAPTIONS[0], audio_latents=noise[:, :, :3], **fast)
    with pytest.raises(ConfigError, match="audio_guidance_rescale=1.5"):
        pipe.generate_audio(CAPTIONS[0], audio_guidance_rescale=1.5, **fast)
    with pytest.raises(ConfigError, match="max_sequence_length=0"):
        pipe.generate_audio(CAPTIONS[0], **dict(fast, max_sequence_length=0))
    with pytest.raises(ConfigError, match="rand_device='tpu'"):
        pipe.generate_audio(CAPTIONS[0], rand_device="tpu", **fast)
    pipe.enable_first_block_cache(0.1)
    try:
        with pytest.raises(ConfigError, match="disable_first_block_cache"):
            pipe.generate_audio(CAPTIONS[0], **fast)
    finally:
        pipe.disable_first_block_cache()


def test_cli_audio_only_writes_a_wav(tiny_ltx2_base, tmp_path, monkeypatch, capsys):
    """`--audio-only` makes sound alone: a stereo .wav at the vocoder's rate, as long as --num-frames / --fps."""
    from diffsynth.runtime.cli import main
    from diffsynth.runtime.media import load_audio

    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(tiny_ltx2_base))
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "1")
    args = ["generate", "--model", "Lightricks/LTX-2", "--prompt", CAPTIONS[0], "--audio-only", "--num-frames", "9"]
    args += ["--fps", "8", "--steps", "1", "--device", "cpu", "--dtype", "float32"]
    assert main([*args, "--output", str(tmp_path / "sound.wav")]) == 0
    waveform, rate = load_audio(tmp_path / "sound.wav")
    assert rate == 24000 and waveform.shape == (2, (28 * 4 - 3) * 240)
    assert main([*args, "--output", str(tmp_path / "sound.mp4")]) == 2
    assert "--output must name a .wav file" in capsys.readouterr().err
