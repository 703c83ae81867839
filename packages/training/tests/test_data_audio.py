"""The dataset's sound: a video's own audio track or an `audio` column, read from time 0 over the frames read,
at the file's rate or resampled; the video's frame rate unless the row has one; silence as None."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.media import mux_video_audio, save_audio, save_video
from diffsynth.training.data import MetadataDataset, read_audio

TONE = 440.0


def tone(rate: int, seconds: float, channels: int = 2) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return np.repeat((0.5 * np.sin(2 * math.pi * TONE * t))[None], channels, axis=0).astype(np.float32)


def frames(count: int) -> list[Image.Image]:
    return [Image.new("RGB", (64, 32), (20 * i, 60, 90)) for i in range(count)]


def peak_hz(waveform: torch.Tensor, rate: int) -> float:
    spectrum = torch.fft.rfft(waveform[0].double()).abs()
    return spectrum.argmax().item() * rate / waveform.shape[1]


def test_a_videos_track_is_read_over_its_frames_from_time_zero(tmp_path):
    """Nine frames at 8 fps: 1.125 s of the 2 s track, in time with the tone that was muxed (the AAC priming
    samples dropped), at 48 kHz or resampled to 16 kHz; the row gets the video's frame rate."""
    mux_video_audio(frames(16), tone(48000, 2.0), 48000, tmp_path / "clip.mp4", fps=8)
    (tmp_path / "metadata.csv").write_text("video,prompt\nclip.mp4,a hum\n")
    native = MetadataDataset(tmp_path, media=("video",), max_pixels=64 * 32, step=32, num_frames=9)[0]
    assert native["frame_rate"] == 8.0 and native["audio_sample_rate"] == 48000
    assert native["audio"].shape == (2, 54000) and native["audio"].dtype == torch.float32
    expected = torch.from_numpy(tone(48000, 1.125))
    assert torch.nn.functional.cosine_similarity(native["audio"][0], expected[0], dim=0) > 0.99
    resampled = MetadataDataset(tmp_path, media=("video",), max_pixels=64 * 32, step=32, num_frames=9, audio_rate=16000)
    item = resampled[0]
    assert item["audio_sample_rate"] == 16000 and item["audio"].shape == (2, 18000)
    assert peak_hz(item["audio"], 16000) == pytest.approx(TONE, abs=2)
    assert (
        torch.nn.functional.cosine_similarity(item["audio"][0], torch.from_numpy(tone(16000, 1.125))[0], dim=0) > 0.99
    )


def test_an_audio_column_wins_a_silent_video_gives_none_and_a_frame_rate_column_is_kept(tmp_path):
    save_video(frames(9), tmp_path / "silent.mp4", fps=12)
    save_audio(tone(22050, 1.0, channels=1), tmp_path / "voice.wav", 22050)
    rows = "video,audio,prompt,frame_rate\nsilent.mp4,voice.wav,a voice,24\nsilent.mp4,,quiet,\n"
    (tmp_path / "metadata.csv").write_text(rows)
    data = MetadataDataset(
        tmp_path, media=("video",), file_keys=("video", "audio"), max_pixels=64 * 32, step=32, num_frames=9
    )
    voiced, quiet = data[0], data[1]
    assert voiced["frame_rate"] == "24" and voiced["audio_sample_rate"] == 22050
    assert voiced["audio"].shape == (1, math.ceil(9 / 24 * 22050))  # 9 frames at the row's 24 fps
    assert peak_hz(voiced["audio"], 22050) == pytest.approx(TONE, abs=4)
    assert quiet["frame_rate"] == 12.0 and quiet["audio"] is None and "audio_sample_rate" not in quiet
    assert read_audio(tmp_path / "silent.mp4") is None


def test_diffsynth_studios_input_audio_column_is_read_as_the_rows_audio(tmp_path):
    """`input_audio` (DiffSynth-Studio's name, e.g. `--data_file_keys video,input_audio`) is read like `audio`: the
    waveform is the row's `audio`, and no path is left under its own name."""
    save_video(frames(9), tmp_path / "silent.mp4", fps=12)
    save_audio(tone(22050, 1.0, channels=1), tmp_path / "voice.wav", 22050)
    (tmp_path / "metadata.csv").write_text("video,input_audio,prompt\nsilent.mp4,voice.wav,a voice\n")
    data = MetadataDataset(
        tmp_path, media=("video",), file_keys=("video", "input_audio"), max_pixels=64 * 32, step=32, num_frames=9
    )
    item = data[0]
    assert "input_audio" not in item and item["audio_sample_rate"] == 22050
    assert item["audio"].shape == (1, math.ceil(9 / 12 * 22050))
    assert peak_hz(item["audio"], 22050) == pytest.approx(TONE, abs=4)


def test_an_audio_column_outside_the_file_keys_stays_a_path_and_images_get_no_sound(tmp_path):
    save_video(frames(9), tmp_path / "clip.mp4", fps=12)
    Image.new("RGB", (64, 32)).save(tmp_path / "still.png")
    save_audio(tone(16000, 1.0), tmp_path / "a.wav", 16000)
    (tmp_path / "metadata.csv").write_text("video,image,audio,prompt\nclip.mp4,,a.wav,x\n,still.png,,y\n")
    data = MetadataDataset(tmp_path, media=("video", "image"), max_pixels=64 * 32, step=32, num_frames=9)
    assert data[0]["audio"] == "a.wav"  # the task says to list the column in --data_file_keys
    assert data[1]["audio"] == "" and "frame_rate" not in data[1]  # an image: no sound read, no frame rate


def test_a_bad_frame_rate_column_is_named(tmp_path):
    save_video(frames(9), tmp_path / "clip.mp4", fps=12)
    (tmp_path / "metadata.csv").write_text("video,prompt,frame_rate\nclip.mp4,x,fast\n")
    data = MetadataDataset(tmp_path, media=("video",), max_pixels=64 * 32, step=32, num_frames=9)
    with pytest.raises(ConfigError, match="row 1: frame_rate 'fast' is not a number"):
        data[0]


def test_a_sound_file_in_another_column_becomes_its_absolute_path(tmp_path):
    """A sound file listed in `--data_file_keys` under a column that is not the row's sound (Wan-Dancer's
    `wantodance_music_path`) is handed on as an absolute path, for the task to read; a missing one is named."""
    save_video(frames(9), tmp_path / "dance.mp4", fps=12)
    (tmp_path / "music").mkdir()
    save_audio(tone(16000, 1.0), tmp_path / "music" / "song.wav", 16000)
    (tmp_path / "metadata.csv").write_text("video,wantodance_music_path,prompt\ndance.mp4,music/song.wav,x\n")
    keys = ("video", "wantodance_music_path")
    data = MetadataDataset(tmp_path, media=("video",), file_keys=keys, max_pixels=64 * 32, step=32, num_frames=9)
    assert data[0]["wantodance_music_path"] == str((tmp_path / "music" / "song.wav").resolve())
    assert data[0]["video"].shape == (3, 9, 32, 64)
    (tmp_path / "metadata.csv").write_text("video,wantodance_music_path,prompt\ndance.mp4,music/none.wav,y\n")
    with pytest.raises(ConfigError, match="'music/none.wav' .at row 1 column wantodance_music_path"):
        MetadataDataset(tmp_path, media=("video",), file_keys=keys, max_pixels=64 * 32, step=32, num_frames=9)


def test_a_file_in_the_audio_column_that_is_no_sound_is_named_as_one(tmp_path):
    """A text file in the `audio` column is read for its sound, so the error says it cannot be read as a sound file
    (it said "a picture", from its suffix)."""
    save_video(frames(9), tmp_path / "clip.mp4", fps=12)
    (tmp_path / "notes.txt").write_text("not a sound")
    (tmp_path / "metadata.csv").write_text("video,audio,prompt\nclip.mp4,notes.txt,a voice\n")
    data = MetadataDataset(
        tmp_path, media=("video",), file_keys=("video", "audio"), max_pixels=64 * 32, step=32, num_frames=9
    )
    with pytest.raises(ConfigError, match=r"row 1 column audio: .*notes.txt cannot be read as a sound file"):
        data[0]


def test_a_file_named_for_its_sound_must_hold_one(tmp_path):
    """A silent video in the `audio` column is refused (it trained video-only without a word); a silent video row
    without an `audio` column still gets no sound."""
    save_video(frames(9), tmp_path / "clip.mp4", fps=12)
    save_video(frames(9), tmp_path / "mute.mp4", fps=12)
    (tmp_path / "metadata.csv").write_text("video,audio,prompt\nclip.mp4,mute.mp4,a voice\nclip.mp4,,quiet\n")
    data = MetadataDataset(
        tmp_path, media=("video",), file_keys=("video", "audio"), max_pixels=64 * 32, step=32, num_frames=9
    )
    with pytest.raises(ConfigError, match=r"row 1 column audio: .*mute.mp4 holds no audio stream"):
        data[0]
    assert data[1]["audio"] is None
