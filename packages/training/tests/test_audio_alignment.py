"""A clip's sound is in time with its picture by the streams' timestamps: time 0 is the video's first frame, so a
track that starts later gets silence in front and a video that starts later cuts the track's head; a clip past the
track's end is silence of the clip's length, and a track that ends inside a clip is zero-padded to it."""

from fractions import Fraction

import av
import numpy as np
import pytest
import torch

from diffsynth.runtime.media import mux_video_audio
from diffsynth.training.data import MetadataDataset, read_audio
from diffsynth.training.testing import write_metadata

RATE, FPS, FRAMES = 48000, 24, 24


def click_video(path, *, video_start: float, audio_start: float, click_at: float) -> None:
    """An mp4 of FRAMES frames at FPS whose picture starts at `video_start` s and whose AAC track starts at
    `audio_start` s, silent but for a click at `click_at` s of the file's timeline."""
    with av.open(str(path), mode="w") as container:
        video = container.add_stream("libx264", rate=FPS)
        video.width = video.height = 32
        video.pix_fmt = "yuv420p"
        sound = container.add_stream("aac", rate=RATE, layout="mono")
        first = round(video_start * FPS)
        for k in range(FRAMES):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 8 * k, np.uint8), format="rgb24")
            frame.pts = first + k
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
        wave = np.zeros((1, RATE), np.float32)
        at = round((click_at - audio_start) * RATE)
        wave[0, at : at + 200] = 0.9
        frame = av.AudioFrame.from_ndarray(wave, format="fltp", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = RATE, round(audio_start * RATE), Fraction(1, RATE)
        container.mux(sound.encode(frame))
        container.mux(sound.encode(None))


def click_time(waveform: torch.Tensor) -> float:
    return int(waveform[0].abs().argmax()) / RATE


def dataset(folder, **options) -> MetadataDataset:
    return MetadataDataset(folder, media=("video",), max_pixels=32 * 32, step=16, **options)


def test_a_track_that_starts_after_the_picture_gets_silence_in_front(tmp_path):
    """The track starts 0.25 s into the file with its click (frame 6 at 24 fps): the clip's sound has it at
    0.25 s, within a millisecond, not at the track's first sample; a clip from frame 3 has it at 0.125 s."""
    click_video(tmp_path / "v.mp4", video_start=0.0, audio_start=0.25, click_at=0.25)
    waveform, rate = read_audio(tmp_path / "v.mp4", seconds=1.0)
    assert rate == RATE and waveform.shape == (1, RATE)
    assert click_time(waveform) == pytest.approx(0.25, abs=1e-3)
    assert waveform[0, : int(0.2 * RATE)].abs().max() < 1e-3  # nothing before the track starts
    later, _ = read_audio(tmp_path / "v.mp4", seconds=0.5, offset=3 / FPS)
    assert click_time(later) == pytest.approx(0.125, abs=1e-3)
    write_metadata(tmp_path, [{"video": "v.mp4", "prompt": "a click"}])
    item = dataset(tmp_path, num_frames=17)[0]
    assert item["audio"].shape == (1, round(17 / FPS * RATE))
    assert click_time(item["audio"]) == pytest.approx(0.25, abs=1e-3)


def test_a_picture_that_starts_after_the_track_cuts_the_tracks_head(tmp_path):
    """The picture starts at 0.25 s, the track at 0 with its click at 0.5 s: the clip's first frame is the file's
    0.25 s, so the click is at 0.25 s of the clip."""
    click_video(tmp_path / "v.mp4", video_start=0.25, audio_start=0.0, click_at=0.5)
    with av.open(str(tmp_path / "v.mp4")) as container:  # the file keeps the picture's late start
        stream = container.streams.video[0]
        assert float(stream.start_time * stream.time_base) == pytest.approx(0.25, abs=1e-3)
    waveform, _ = read_audio(tmp_path / "v.mp4", seconds=0.5)
    assert click_time(waveform) == pytest.approx(0.25, abs=1e-3)


def test_a_clip_past_the_tracks_end_is_silence_of_the_clips_length(tmp_path):
    """A 0.2 s track under 18 frames at 24 fps, cut into 9-frame clips: the first clip's sound (0.375 s) is the
    track then zeros, the second (from 0.375 s, after the track) zeros of the same length, not an empty waveform."""
    t = np.arange(int(RATE * 0.2)) / RATE
    tone = np.stack([0.4 * np.sin(2 * np.pi * 300 * t)] * 2).astype(np.float32)
    frames = np.zeros((18, 32, 32, 3), np.uint8)
    mux_video_audio(list(frames), tone, RATE, tmp_path / "v.mp4", fps=FPS)
    write_metadata(tmp_path, [{"video": "v.mp4", "prompt": "a hum"}])
    data = dataset(tmp_path, num_frames=9, frame_extraction="chunk")
    first, second = data[0]["audio"], data[1]["audio"]
    length = round(9 / FPS * RATE)
    assert first.shape == second.shape == (2, length)
    assert first[:, : int(0.15 * RATE)].abs().max() > 0.3 and first[:, int(0.25 * RATE) :].abs().max() == 0
    assert second.abs().max() == 0
