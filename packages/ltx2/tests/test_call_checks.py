"""`LTX2Pipeline.__call__` refuses inputs that used to run into wrong output or a late, unnamed error: PCM-scaled
`retake_audio`, regions outside the clip, non-finite scales and rates, clips too short for the mel spectrogram,
and two-stage sizes that are not multiples of 64; numpy frame indexes are accepted."""

from __future__ import annotations

import logging
import math

import diffsynth_ltx2_test_repo as repo_module  # loaded by conftest
import numpy as np
import pytest
import torch
from PIL import Image

from diffsynth.ltx2.pipeline import LTX2Pipeline
from diffsynth.runtime.errors import ConfigError

CAPTIONS = repo_module.CAPTIONS
F, H, W, RATE = repo_module.FRAMES, repo_module.HEIGHT, repo_module.WIDTH, 48000  # 9 frames at 24 fps: 0.375 s
SETTINGS = dict(
    height=H, width=W, num_frames=F, num_inference_steps=1, max_sequence_length=repo_module.MAX_SEQUENCE_LENGTH,
    stg_scale=0.0, modality_scale=1.0, progress_bar=False, seed=0, output_type="pt", audio_sample_rate=RATE,
)  # fmt: skip


def tone(seconds: float = 0.4) -> torch.Tensor:
    """A stereo sine `[2, samples]` at half of full scale."""
    return torch.sin(2 * math.pi * 440 * torch.arange(int(seconds * RATE)) / RATE).expand(2, -1) * 0.5


@pytest.mark.parametrize(
    ("sound", "match"),
    [
        ((tone() * 32767).short(), r"retake_audio is a torch\.int16 tensor"),
        (tone() * 32767, r"retake_audio peaks at 16383"),
        (tone().clone().index_fill_(1, torch.tensor([5]), float("nan")), "retake_audio holds NaN"),
    ],
)
def test_pcm_scaled_sound_is_refused(tiny_ltx2_pipe, sound, match):
    with pytest.raises(ConfigError, match=match):
        tiny_ltx2_pipe(CAPTIONS[0], retake_audio=sound, **SETTINGS)


def test_sound_slightly_past_full_scale_is_accepted(tiny_ltx2_pipe):
    like = torch.zeros(tiny_ltx2_pipe.audio_latent_shape(1, F, 24.0))
    cond = tiny_ltx2_pipe.prepare_audio_condition(tone() * 2.4, RATE, None, F, 24.0, like)  # peak 1.2
    assert cond.latents.shape == like.shape


@pytest.mark.parametrize(
    ("region", "match"),
    [
        ((10.0, 11.0), r"\(10\.0, 11\.0\) overlaps no audio latent frame of the 0\.375 s clip"),
        ((float("nan"), 0.2), r"retake_audio_regions entry \(nan, 0\.2\) is not accepted"),
        ((0.1, float("inf")), r"retake_audio_regions entry \(0\.1, inf\) is not accepted"),
    ],
)
def test_regions_outside_the_clip_or_not_finite_are_refused(tiny_ltx2_pipe, region, match):
    with pytest.raises(ConfigError, match=match):
        tiny_ltx2_pipe(CAPTIONS[0], retake_audio=tone(), retake_audio_regions=[region], **SETTINGS)


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        (dict(frame_rate=float("inf")), "is not accepted; use a positive number"),
        (dict(cfg_scale=float("nan")), "must be a finite number"),
        (dict(audio_cfg_scale=float("nan")), "must be a finite number"),
        (dict(modality_scale=float("nan")), "must be a finite number"),
        (dict(audio_modality_scale=float("inf")), "must be a finite number"),
        (dict(stg_scale=float("nan")), "must be a finite number"),
        (dict(cfg_scale=True), "must be a finite number"),
    ],
)
def test_non_finite_numbers_are_refused_by_name(tiny_ltx2_pipe, kwargs, reason):
    """Guidance scales go through the runtime's `finite_number`, with its message (as the other families)."""
    ((name, value),) = kwargs.items()
    with pytest.raises(ConfigError, match=rf"{name}={value!r} {reason}"):
        tiny_ltx2_pipe(CAPTIONS[0], **{**SETTINGS, **kwargs})


def test_a_clip_too_short_for_the_mel_spectrogram_names_retake_audio(tiny_ltx2_pipe):
    options = {**SETTINGS, "num_frames": 1, "frame_rate": 50.0}
    with pytest.raises(ConfigError, match=r"retake_audio: the clip \(num_frames=1 at frame_rate=50\) lasts 20 ms"):
        tiny_ltx2_pipe(CAPTIONS[0], retake_audio=tone(), **options)


def test_numpy_frame_indexes_are_accepted():
    images = [Image.new("RGB", (W, H), color) for color in ("red", "blue")]
    first, keyframes = LTX2Pipeline.check_input_images(images, np.array([0, 8]), None, 1, F)
    assert first == [images[0]] and keyframes == [(images[1], 8)]
    assert type(keyframes[0][1]) is int
    with pytest.raises(ConfigError, match=r"input_images_indexes=\[0, 2\.0\]"):
        LTX2Pipeline.check_input_images(images, [0, 2.0], None, 1, F)


def test_two_stage_sizes_are_refused_before_rounding(tiny_ltx2_pipe, caplog):
    options = {**SETTINGS, "height": 100, "width": 2 * W}
    with caplog.at_level(logging.WARNING), pytest.raises(ConfigError, match=r"height=100.*multiples of 64"):
        tiny_ltx2_pipe(CAPTIONS[0], use_two_stage_pipeline=True, **options)
    assert "rounded" not in caplog.text
