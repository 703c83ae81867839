"""`--video_frame_extraction` / `--video_fps`: a video trains on several clips (musubi-tuner's head, chunk, slide,
uniform) read on its timeline at one frame rate; a clip's mask video, conditioning video and sound come from the
same span; the cache records the settings. Videos whose frame k shows the gray level 16 k tell which frames came."""

import json
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffsynth_training_toy import VIDEO_TASK
from PIL import Image

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.media import save_audio, save_video
from diffsynth.training.config import TrainConfig
from diffsynth.training.data import MetadataDataset, batch_plan, plan_keys, read_audio
from diffsynth.training.testing import train_direct_and_cached, write_metadata
from diffsynth.training.trainer import make_dataset, run_stage, setup

FRAMES = 4  # --num_frames of the clips


def numbered_video(path, count: int, fps: int = 8) -> None:
    save_video([Image.new("RGB", (32, 32), (16 * k,) * 3) for k in range(count)], path, fps=fps, lossless=True)


def numbers(video: torch.Tensor) -> list[int]:
    """The frame numbers a loaded `[3, F, H, W]` clip in [-1, 1] shows."""
    return [round(((float(frame.mean()) + 1) * 127.5) / 16) for frame in video.transpose(0, 1)]


def dataset(folder, **options) -> MetadataDataset:
    values = dict(media=("video",), file_keys=("video", "control_video"), max_pixels=32 * 32, step=16)
    return MetadataDataset(folder, **{**values, "num_frames": FRAMES, **options})


@pytest.fixture
def clips(tmp_path):
    """`long.mp4` (12 frames at 8 fps) with a control video numbered alike, and `short.mp4` (5 frames)."""
    numbered_video(tmp_path / "long.mp4", 12)
    numbered_video(tmp_path / "control.mp4", 12)
    numbered_video(tmp_path / "short.mp4", 5)
    rows = [{"video": "long.mp4", "control_video": "control.mp4", "prompt": "a"}, {"video": "short.mp4", "prompt": "b"}]
    return write_metadata(tmp_path, rows)


@pytest.mark.parametrize(
    ("options", "long_starts"),
    [
        ({}, [0]),  # head: today's first clip
        ({"frame_extraction": "chunk"}, [0, 4, 8]),
        ({"frame_extraction": "slide", "frame_stride": 3}, [0, 3, 6]),  # 6 + 4 <= 12, 9 + 4 > 12
        ({"frame_extraction": "uniform", "frame_samples": 3}, [0, 4, 8]),  # first, middle and last clip
        ({"frame_extraction": "uniform", "frame_samples": 2}, [0, 8]),
    ],
)
def test_each_mode_cuts_the_clips_it_says(clips, options, long_starts):
    data = dataset(clips, **options)
    # 5 frames hold one clip of 4, or two overlapping ones where the mode spreads several from start to end
    short_starts = [0, 1] if options.get("frame_extraction") == "uniform" else [0]
    assert data.sample_starts == long_starts + short_starts
    assert data.sample_rows == [0] * len(long_starts) + [1] * len(short_starts)
    for k, start in enumerate(long_starts):
        sample = data[k]
        assert numbers(sample["video"]) == list(range(start, start + FRAMES))
        assert numbers(sample["control_video"]) == numbers(sample["video"])  # the same span of the parallel video


@pytest.mark.parametrize(("longest", "multiple", "lengths"), [(10, 2, [9, 5]), (8, 4, [5, 5]), (20, None, [12, 5])])
def test_full_takes_each_whole_video_up_to_num_frames_at_a_length_the_vae_encodes(clips, longest, multiple, lengths):
    """`full` (musubi-tuner's): one clip per video from its first frame, at most `num_frames` long, cut to
    1 + k x the VAE's temporal compression; the parallel control video gives the same frames."""
    data = dataset(clips, frame_extraction="full", num_frames=longest, frame_multiple=multiple)
    assert data.sample_starts == [0, 0] and data.sample_frames == lengths
    assert data.batch_keys == [(32, 32, n) for n in lengths]
    long, short = data[0], data[1]
    assert numbers(long["video"]) == numbers(long["control_video"]) == list(range(lengths[0]))
    assert numbers(short["video"]) == list(range(lengths[1]))


def test_a_frame_rate_resamples_the_timeline_before_cutting(clips):
    write_metadata(clips, [{"video": "long.mp4", "control_video": "control.mp4", "prompt": "a"}])
    data = dataset(clips, fps=4, frame_extraction="chunk")  # 12 frames at 8 fps are 6 at 4 fps: one clip of 4
    assert data.sample_starts == [0]
    assert numbers(data[0]["video"]) == [0, 2, 4, 6]
    assert data[0]["frame_rate"] == 4  # what the frames now are, for the families that condition on it
    data = dataset(clips, fps=16)  # upsampled: each frame twice
    assert numbers(data[0]["video"]) == [0, 0, 1, 1]


def test_a_video_too_short_for_one_clip_is_named(tmp_path):
    numbered_video(tmp_path / "tiny.mp4", 3)
    write_metadata(tmp_path, [{"video": "tiny.mp4", "prompt": "a"}])
    for mode in ("head", "chunk"):  # the default mode too, from the file's header, before training
        with pytest.raises(ConfigError, match="row 1 column video: tiny.mp4 has 3 frames, fewer than one clip of"):
            dataset(tmp_path, frame_extraction=mode)
    with pytest.raises(ConfigError, match="tiny.mp4 has 2 frames at 4 fps, fewer than one clip"):
        dataset(tmp_path, frame_extraction="uniform", frame_samples=2, fps=4)
    assert dataset(tmp_path, frame_extraction="chunk", fps=12).sample_starts == [0]  # 3 at 8 fps: 5 at 12 fps


def test_an_unreadable_video_is_named_with_its_row_and_column_before_training(clips):
    (clips / "control.mp4").write_bytes(b"not a video")
    for options in ({}, {"frame_extraction": "chunk"}, {"fps": 4}):  # its header, or its frames' timestamps
        with pytest.raises(ConfigError, match=r"row 1 column control_video: .*control.mp4 cannot be read as a video"):
            dataset(clips, **options)


def test_a_clips_sound_starts_where_its_frames_do(tmp_path):
    rate = 8000
    ramp = torch.arange(rate * 2, dtype=torch.float32)[None] / (rate * 2)  # 2 s: the value tells the time
    save_audio(ramp, tmp_path / "sound.wav", rate)
    whole, _ = read_audio(tmp_path / "sound.wav")
    part, _ = read_audio(tmp_path / "sound.wav", offset=0.5, seconds=0.25)
    torch.testing.assert_close(part, whole[:, rate // 2 : rate // 2 + rate // 4])
    numbered_video(tmp_path / "clip.mp4", 12)
    write_metadata(tmp_path, [{"video": "clip.mp4", "audio": "sound.wav", "prompt": "a"}])
    data = dataset(tmp_path, file_keys=("video", "audio"), frame_extraction="chunk")
    third = data[2]  # frames 8..11 at 8 fps: from 1 s, half a second long
    torch.testing.assert_close(third["audio"], whole[:, rate : rate + rate // 2])


def test_the_trainer_reads_the_flags_and_the_cache_keeps_them(clips, tmp_path):
    cfg = TrainConfig(
        family=VIDEO_TASK, dataset_base_path=str(clips), output_path=str(tmp_path / "out"), max_pixels=32 * 32,
        bucket_step=16, batch_size=1, mixed_precision="no", dtype="float32", lora_rank=4, num_frames=5,
        video_frame_extraction="slide", video_frame_stride=2, cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    task = SimpleNamespace(media=("video", "image"), size_multiple=16, family="toy_video")
    assert make_dataset(cfg, task).sample_starts == [0, 2, 4, 6, 0]  # 12 frames: clips of 5 from 0, 2, 4, 6
    run_stage(replace(cfg, stage="encode"))
    assert setup(cfg).dataset.buckets == [(32, 32)] * 5
    with pytest.raises(ConfigError, match="encoded with --video_frame_extraction 'slide', this run has"):
        setup(replace(cfg, video_frame_extraction="head", video_frame_stride=None))
    with pytest.raises(ConfigError, match="encoded with --video_fps None, this run has --video_fps 4"):
        setup(replace(cfg, video_fps=4.0))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(video_frame_extraction="slide"), "--video_frame_extraction slide starts a clip every"),
        (dict(video_frame_stride=2), "--video_frame_stride spaces the clips of --video_frame_extraction slide"),
        (dict(video_frame_samples=3), "--video_frame_samples spreads the clips"),
        (dict(video_frame_extraction="slide", video_frame_stride=0), "--video_frame_stride"),
        (dict(video_fps=0.0), "--video_fps 0.0 must be > 0"),
    ],
)
def test_bad_settings_name_their_flag(tmp_path, settings, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(family=VIDEO_TASK, dataset_base_path=str(tmp_path), **settings).check()


def test_pictures_are_one_sample_whatever_the_mode(tmp_path):
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "a.png")
    numbered_video(tmp_path / "v.mp4", 8)
    write_metadata(tmp_path, [{"video": "a.png", "prompt": "a"}, {"video": "v.mp4", "prompt": "b"}])
    assert dataset(tmp_path, frame_extraction="chunk").sample_starts == [0, 0, 4]


def test_the_clips_fit_the_rows_shortest_video(tmp_path):
    """A conditioning video shorter than the row's video bounds its clips, and one too short is named by column."""
    numbered_video(tmp_path / "long.mp4", 12)
    numbered_video(tmp_path / "control.mp4", 6)
    write_metadata(tmp_path, [{"video": "long.mp4", "control_video": "control.mp4", "prompt": "a"}])
    data = dataset(tmp_path, frame_extraction="chunk")
    assert data.sample_starts == [0]  # 6 control frames hold one clip of 4, not the video's three
    assert numbers(data[0]["control_video"]) == numbers(data[0]["video"]) == [0, 1, 2, 3]
    numbered_video(tmp_path / "control.mp4", 3)
    with pytest.raises(ConfigError, match="row 1 column control_video: control.mp4 has 3 frames, fewer than one clip"):
        dataset(tmp_path)


def test_pictures_and_videos_of_one_size_train_in_batches_of_their_own(tmp_path):
    """A batch stacks its samples: pictures and videos of one bucket batch apart by frame count, directly and from
    the cache (which records the counts; an older cache without them is grouped by its latents' shapes)."""
    data = tmp_path / "data"
    data.mkdir()
    for k in range(2):
        Image.fromarray(np.full((32, 32, 3), 60 * k, np.uint8)).save(data / f"p{k}.png")
        numbered_video(data / f"v{k}.mp4", 8)
    rows = [{"image": f"p{k}.png", "prompt": "a"} for k in range(2)]
    write_metadata(data, rows + [{"video": f"v{k}.mp4", "prompt": "b"} for k in range(2)])
    cfg = TrainConfig(
        family=VIDEO_TASK, dataset_base_path=str(data), output_path=str(tmp_path / "out"),
        max_pixels=32 * 32, bucket_step=16, batch_size=2, mixed_precision="no", dtype="float32", lora_rank=4,
        num_frames=5, num_epochs=2, log_every=1, learning_rate=1e-2,
    )  # fmt: skip
    keys = setup(cfg).dataset.batch_keys
    assert keys == [(32, 32, 1)] * 2 + [(32, 32, 5)] * 2
    # batches of one stack nothing: their plans group by bucket alone, as before frame counts were keys
    assert plan_keys(setup(replace(cfg, batch_size=1)).dataset, 1) == [(32, 32)] * 4
    for epoch in range(3):
        assert sorted(map(sorted, batch_plan(keys, batch_size=2, seed=cfg.seed, epoch=epoch))) == [[0, 1], [2, 3]]
    runs = train_direct_and_cached(cfg)
    direct, cached = runs.losses()
    assert len(direct) == 4 and all(np.isfinite(direct))
    np.testing.assert_allclose(cached, direct, rtol=0, atol=1e-6)
    index = json.loads((runs.cache / "index.json").read_text())
    assert index["frames"] == [1, 1, 5, 5]
    del index["frames"]
    (runs.cache / "index.json").write_text(json.dumps(index))
    older = setup(runs.config).dataset.batch_keys
    assert older[0] == older[1] != older[2] == older[3]


def test_the_trainer_cuts_full_videos_to_the_tasks_vae_and_batches_them_by_length(clips, tmp_path):
    cfg = TrainConfig(
        family=VIDEO_TASK, dataset_base_path=str(clips), output_path=str(tmp_path / "out"), max_pixels=32 * 32,
        bucket_step=16, batch_size=2, mixed_precision="no", dtype="float32", lora_rank=4, num_frames=10,
        video_frame_extraction="full", cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    run_stage(replace(cfg, stage="encode"))
    assert setup(cfg).dataset.batch_keys == [(32, 32, 9), (32, 32, 5)]  # the toy VAE encodes 2k + 1 frames
    with pytest.raises(ConfigError, match="encoded with --video_frame_extraction 'full', this run has"):
        setup(replace(cfg, video_frame_extraction="head"))


def test_a_clip_length_the_vae_cannot_encode_is_named_before_training(clips, tmp_path):
    """The toy video VAE encodes 2k + 1 frames (Wan's 4k + 1): --num_frames 4 is named at setup, with the lengths
    around it; a dataset of pictures only does not care."""
    cfg = TrainConfig(
        family=VIDEO_TASK, dataset_base_path=str(clips), output_path=str(tmp_path / "out"), max_pixels=32 * 32,
        bucket_step=16, mixed_precision="no", dtype="float32", lora_rank=4, num_frames=4,
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"--num_frames 4: toy_video encodes videos of 2k \+ 1 frames; use 3 or 5"):
        setup(cfg)
    with pytest.raises(ConfigError, match=r"--num_frames 4: toy_video encodes"):
        run_stage(replace(cfg, cache_dir=str(tmp_path / "cache"), stage="encode"))
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(pictures / "a.png")
    write_metadata(pictures, [{"image": "a.png", "prompt": "a"}])
    assert setup(replace(cfg, dataset_base_path=str(pictures))).dataset.sample_frames == [1]
