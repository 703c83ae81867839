"""Wan training options read from the data: validation samples with the speed-control model are drawn at a
`motion_bucket_id` (the `validation_motion_bucket_id` task option, else the dataset's first row's), and a
Wan-Dancer clip is conditioned at the rate its frames are read at (`wantodance_fps`, else the row's `frame_rate`
from --video_fps or the file, else 30); a `wantodance_fps` that disagrees with --video_fps is refused."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import save_file

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.media import save_video
from diffsynth.wan import WanVideoPipeline
from diffsynth.wan.motion_controller import MotionControllerConfig, WanMotionController
from diffsynth.wan.training import WanTrainingTask

from . import conftest as C
from . import test_dancer as D
from . import test_training_dancer as TD

MetadataDataset = pytest.importorskip("diffsynth.training.data").MetadataDataset  # the wan session runs without it
write_metadata = pytest.importorskip("diffsynth.training.testing").write_metadata

# the Wan-Dancer training tests' tiny model, task, music files and (autouse) seeded stand-in for librosa's features
dancer_repo, task, music_dir, no_librosa = TD.dancer_repo, TD.task, TD.music_dir, TD.no_librosa
row, write_music = TD.row, TD.write_music

PROMPT = C.CAPTIONS[0]


class Rows:
    """What `prepare_dataset` reads of a dataset: its metadata `rows` (or, for a cache, none) and items."""

    def __init__(self, rows=None, items=None, sample_frames=(5,)):
        self.rows, self.items, self.sample_frames = rows, items or rows, list(sample_frames)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return self.items[index]


# ----------------------------------------------------------------------------------------- speed control
@pytest.fixture(scope="module")
def speed_pipe(tiny_repo, tmp_path_factory) -> WanVideoPipeline:
    """The tiny T2V repo with a random speed-control model beside it."""
    root = tmp_path_factory.mktemp("speed-options") / "repo"
    shutil.copytree(tiny_repo, root)
    (root / "speedcontrol").mkdir()
    config = MotionControllerConfig(freq_dim=C.TINY_DIT["freq_dim"], dim=C.TINY_DIT["dim"])
    controller = C.randomize(WanMotionController(config), 11)
    save_file(dict(controller.state_dict()), str(root / "speedcontrol/model.safetensors"))
    return WanVideoPipeline.from_pretrained(str(root), torch_dtype="float32", device="cpu")


def test_a_validation_sample_follows_the_first_rows_speed(speed_pipe, monkeypatch):
    """Training a DiT with the speed-control model: the validation sample's pipeline call gets the first row's
    motion_bucket_id (a CSV cell), and its controller runs with it."""
    task = WanTrainingTask(speed_pipe)
    task.prepare_dataset(Rows([{"prompt": "a", "motion_bucket_id": "30"}, {"prompt": "b", "motion_bucket_id": 85}]))
    assert task.validation_motion_bucket_id == 30.0
    seen = []
    modulation = WanVideoPipeline.motion_modulation

    def spy(self, motion_bucket_id, batch):
        seen.append(motion_bucket_id)
        return modulation(self, motion_bucket_id, batch)

    monkeypatch.setattr(WanVideoPipeline, "motion_modulation", spy)
    (video,) = task.sample(speed_pipe.dit, [PROMPT], seed=0, height=32, width=32, num_inference_steps=1)
    assert seen == [30.0] and len(video) == 5  # at the training clips' length too


def test_the_option_wins_and_a_cache_gives_its_first_samples_speed(speed_pipe, monkeypatch):
    calls = []
    monkeypatch.setattr(WanVideoPipeline, "__call__", lambda self, prompt, **kwargs: calls.append(kwargs) or prompt)
    given = WanTrainingTask(speed_pipe, validation_motion_bucket_id="70")
    given.prepare_dataset(Rows([{"motion_bucket_id": 10}]))
    cached = WanTrainingTask(speed_pipe)
    cached.prepare_dataset(Rows(items=[{"latents": torch.zeros(1), "motion_bucket_id": torch.tensor([85.0])}]))
    given.sample(speed_pipe.dit, [PROMPT], seed=0)
    cached.sample(speed_pipe.dit, [PROMPT], seed=0)
    assert [call["motion_bucket_id"] for call in calls] == [70.0, 85.0]


def test_a_validation_speed_without_the_controller_or_not_a_number_is_refused(speed_pipe, tiny_repo):
    with pytest.raises(ConfigError, match=r"validation_motion_bucket_id='fast' is not a number"):
        WanTrainingTask(speed_pipe, validation_motion_bucket_id="fast")
    plain = WanVideoPipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu")
    with pytest.raises(ConfigError, match=r"validation_motion_bucket_id=50 needs DiffSynth-Studio's speed-control"):
        WanTrainingTask(plain, validation_motion_bucket_id=50)


# ----------------------------------------------------------------------------------------- Wan-Dancer frame rate
def test_a_dancer_clip_without_wantodance_fps_takes_its_frame_rate(task, music_dir):
    """A row without the column (a CSV's empty cell) is conditioned at its `frame_rate` (the dataset's: 15 from
    --video_fps), not at 30; one without either at 30; the column when given."""
    rates = [
        float(sample["wantodance_fps"])
        for sample in task.encode(
            [
                row(music_dir, 0, fps="", frame_rate=15.0),
                row(music_dir, 1, fps=None),
                row(music_dir, 0, fps=7.5, frame_rate=7.5),
            ]
        )
    ]
    assert rates == [15.0, 30.0, 7.5]


def test_a_wantodance_fps_that_disagrees_with_video_fps_is_refused(task, tmp_path):
    save_video(D.keyframes(D.MASK, 3), tmp_path / "clip.mp4", fps=15)
    save_video(D.keyframes(D.MASK, 30), tmp_path / "keys.mp4", fps=15)
    write_music(tmp_path / "music.wav", 10, seed=0)
    columns = {"video": "clip.mp4", "prompt": "a dancer", "wantodance_keyframes": "keys.mp4",
               "wantodance_keyframes_mask": D.MASK, "wantodance_music_path": "music.wav"}  # fmt: skip
    keys = ("video", "wantodance_keyframes", "wantodance_music_path")

    def dataset(**extra) -> MetadataDataset:
        write_metadata(tmp_path, [columns, {**columns, **extra}])
        size = dict(max_pixels=D.HEIGHT * D.WIDTH, step=16, num_frames=5)
        return MetadataDataset(tmp_path, media=("video",), file_keys=keys, fps=15.0, **size)

    agreeing = dataset(wantodance_fps=15)
    task.prepare_dataset(agreeing)
    assert float(task.encode([agreeing[0]])[0]["wantodance_fps"]) == 15.0  # the dataset's frame_rate
    with pytest.raises(ConfigError, match=r"metadata\.jsonl row 2 column wantodance_fps: 30 disagrees with "):
        task.prepare_dataset(dataset(wantodance_fps=30))
