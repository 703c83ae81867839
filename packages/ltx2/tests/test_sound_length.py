"""The sound returned with a video lasts as long as the video: `round(num_frames / frame_rate * sample_rate)`
samples for text-to-video, video-to-audio (`retake_video` without regions), audio retake regions and
audio-to-video. The causal audio VAE decodes `4 L - 3` mel frames (the authors return that, a few tens of
milliseconds short); the end is zero-padded, the samples before it are the decoder's."""

from __future__ import annotations

import diffsynth_ltx2_test_repo as repo_module  # loaded by conftest
import numpy as np
import pytest
import torch
from PIL import Image

H, W = repo_module.HEIGHT, repo_module.WIDTH
OPTIONS = dict(
    height=H, width=W, seed=0, num_inference_steps=1, cfg_scale=1.0, stg_scale=0.0, modality_scale=1.0,
    max_sequence_length=repo_module.MAX_SEQUENCE_LENGTH, progress_bar=False, output_type="pt",
)  # fmt: skip
CLIPS = [(17, 24.0), (41, 25.0), (49, 30.0), (9, 23.976)]


def clip(frames: int) -> list[Image.Image]:
    rng = np.random.default_rng(frames)
    return [Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)) for _ in range(frames)]


@pytest.mark.parametrize(("frames", "fps"), CLIPS)
def test_video_to_audio_sound_lasts_as_long_as_the_video(tiny_ltx2_pipe, frames, fps):
    pipe = tiny_ltx2_pipe
    _, audio = pipe(repo_module.CAPTIONS[0], retake_video=clip(frames), num_frames=frames, frame_rate=fps, **OPTIONS)
    assert audio.waveform.shape == (1, 2, round(frames / fps * audio.sample_rate))


@pytest.mark.parametrize(("frames", "fps"), CLIPS[:2])
def test_text_to_video_sound_is_the_decoders_then_zeros(tiny_ltx2_pipe, monkeypatch, frames, fps):
    pipe = tiny_ltx2_pipe
    seen = []
    real = pipe.decode_audio
    monkeypatch.setattr(pipe, "decode_audio", lambda latents: seen.append(real(latents)) or seen[-1])
    _, audio = pipe(repo_module.CAPTIONS[0], num_frames=frames, frame_rate=fps, **OPTIONS)
    decoded = seen[-1]
    samples = round(frames / fps * pipe.sample_rate)
    assert audio.waveform.shape == (1, 2, samples) and decoded.shape[-1] < samples
    torch.testing.assert_close(audio.waveform[..., : decoded.shape[-1]], decoded, rtol=0, atol=0)
    assert not audio.waveform[..., decoded.shape[-1] :].any()


def test_audio_retake_and_audio_to_video_sounds_last_as_long_as_the_video(tiny_ltx2_pipe):
    pipe = tiny_ltx2_pipe
    frames, fps, rate = 17, 24.0, 16000
    sound = 0.1 * torch.randn(2, rate, generator=torch.Generator().manual_seed(0))
    common = dict(num_frames=frames, frame_rate=fps, retake_audio=sound, audio_sample_rate=rate, **OPTIONS)
    _, remade = pipe(repo_module.CAPTIONS[0], retake_audio_regions=[(0.2, 0.4)], **common)
    assert remade.waveform.shape == (1, 2, round(frames / fps * pipe.sample_rate))
    _, kept = pipe(repo_module.CAPTIONS[0], **common)
    assert kept.sample_rate == rate and kept.waveform.shape == (1, 2, round(frames / fps * rate))
