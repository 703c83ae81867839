"""IC-LoRA validation samples and the authors' first-frame conditioning probability, on the tiny random repo.

`--task_options validation_ic_video=control.mp4` gives every validation sample its control video: the sample is the
pipeline's own IC call (`in_context_videos`, at the factor the rows trained at), bit-equal frames and sound, and the
control changes it. `first_frame=p` (Lightricks' `first_frame_conditioning_p`) makes one draw per batch from the
trainer's generator (`draw_choices`); a conditioned batch is exactly the `first_frame=true` model call and loss mask, an unconditioned one the
plain call.
"""

from __future__ import annotations

import diffsynth_ltx2_test_repo as repo_module  # loaded by conftest
import numpy as np
import pytest
import torch

from diffsynth.ltx2.training import LTX2TrainingTask
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.media import save_video

CAPTIONS = repo_module.CAPTIONS
F, H, W = repo_module.FRAMES, repo_module.HEIGHT, repo_module.WIDTH  # 9 frames, 64 x 64
MAX_LEN = repo_module.MAX_SEQUENCE_LENGTH
GUIDANCE_OFF = dict(cfg_scale=1.0, stg_scale=0.0, modality_scale=1.0, max_sequence_length=MAX_LEN)
SIZE = dict(height=H, width=W, num_frames=F, num_inference_steps=2)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def control(tmp_path_factory) -> str:
    """A 9-frame 64 x 64 control video file (seeded noise), as a user passes it."""
    g = np.random.default_rng(5)
    path = tmp_path_factory.mktemp("ltx2-ic-validation") / "control.mp4"
    save_video(list(g.integers(0, 256, (F, H, W, 3), dtype=np.uint8)), path, fps=24)
    return str(path)


def same(drawn, frames, sound) -> bool:
    """A sample's frames and sound equal the pipeline's exactly."""
    ours, (waveform, rate) = drawn
    equal = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(ours, frames, strict=True))
    return equal and len(ours) == len(frames) and rate == sound.sample_rate and torch.equal(waveform, sound.waveform)


@pytest.mark.parametrize("factor", [1, 2])
def test_ic_sample_is_the_pipelines_ic_call(tiny_ltx2_pipe, control, factor):
    """The control video reaches the pipeline as `in_context_videos` at the factor the rows trained at (here 2
    after a batch at 2; 1, the option's, before any); the sample equals that call and differs from the plain one."""
    pipe = tiny_ltx2_pipe
    task = LTX2TrainingTask(pipe, validation_ic_video=control, max_sequence_length=MAX_LEN)
    if factor != 1:
        task.reference_factors.add(factor)  # what `velocity` records from the rows' references
    assert task.validation_factor == factor
    prompts = [CAPTIONS[0]]
    (drawn,) = task.sample(pipe.dit, prompts, seed=4, **SIZE)
    frames, sound = pipe(
        prompts[0], seed=4, in_context_videos=[control], in_context_downsample_factor=factor, progress_bar=False,
        **GUIDANCE_OFF, **SIZE,
    )  # fmt: skip
    assert same(drawn, frames, sound)
    plain, _ = pipe(prompts[0], seed=4, progress_bar=False, **GUIDANCE_OFF, **SIZE)
    assert (
        max(np.abs(np.asarray(a, float) - np.asarray(b, float)).max() for a, b in zip(drawn[0], plain, strict=True)) > 0
    )


def test_validation_ic_video_errors_name_the_option(tiny_ltx2_pipe, control, tmp_path):
    with pytest.raises(ConfigError, match="validation_ic_video: no such file 'missing.mp4'"):
        LTX2TrainingTask(tiny_ltx2_pipe, validation_ic_video="missing.mp4")
    with pytest.raises(ConfigError, match="validation_ic_video=3"):
        LTX2TrainingTask(tiny_ltx2_pipe, validation_ic_video=3)
    both = LTX2TrainingTask(tiny_ltx2_pipe, validation_ic_video=f"{control}|{control}")
    assert both.validation_ic_video == [control, control]
    task = LTX2TrainingTask(tiny_ltx2_pipe, validation_ic_video=control, in_context_downsample_factor=2)
    task.reference_factors.update({1, 2})  # rows at several factors: the option's
    assert task.validation_factor == 2


def clip(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    video = torch.randint(0, 256, (3, F, H, W), generator=g, dtype=torch.uint8).float() / 127.5 - 1
    return {"prompt": CAPTIONS[seed % 3], "video": video}


class Rows(list):
    """A dataset as the trainer gives `prepare_dataset`: its items, and its metadata `rows`."""

    def __init__(self, items, rows):
        super().__init__(items)
        self.rows = rows


def ic_clip(seed: int, factor=None) -> dict:
    """A 12 fps clip with a control video, at `factor` (else the task option's)."""
    out = {**clip(seed), "frame_rate": 12.0, "in_context_videos": [clip(seed + 50)["video"]]}
    return out if factor is None else {**out, "in_context_downsample_factor": factor}


def metadata(item: dict) -> dict:
    """`item`'s metadata row: file columns still paths."""
    return {**item, "video": "clip.mp4", "in_context_videos": "control.mp4"}


def trained(task, items) -> None:
    """One training step's model call per item."""
    for item in items:
        batch = task.collate(task.encode([item]))
        noisy = torch.randn(batch["latents"].shape, generator=torch.Generator().manual_seed(0))
        task.velocity(task.pipe.dit, batch, noisy, torch.tensor([0.5]))


def test_samples_before_any_step_follow_the_dataset(tiny_ltx2_pipe, control, monkeypatch):
    """`--sample_at_first`: samples at step 0 (before any batch) take the clip length, frame rate and IC factor
    the rows train at, as the samples after a step do, once the trainer gave the task its dataset."""
    from diffsynth.runtime.training_support import PipelineTrainingTask

    calls = []
    monkeypatch.setattr(
        PipelineTrainingTask, "sample", lambda self, dit, prompts, **options: calls.append(options) or []
    )
    task = LTX2TrainingTask(tiny_ltx2_pipe, validation_ic_video=control, max_sequence_length=MAX_LEN)
    items = [ic_clip(1, "2"), ic_clip(2, 2)]
    task.prepare_dataset(Rows(items, [metadata(item) for item in items]))
    task.sample(tiny_ltx2_pipe.dit, [CAPTIONS[0]], seed=4)  # step 0
    trained(task, items)
    task.sample(tiny_ltx2_pipe.dit, [CAPTIONS[0]], seed=4)  # after a step
    keys = ("num_frames", "frame_rate", "in_context_downsample_factor")
    assert [[call[k] for k in keys] for call in calls] == [[F, 12.0, 2]] * 2
    assert task.sample_fps == 12.0


def test_the_lora_header_factor_follows_the_dataset_not_the_batches_seen(tiny_ltx2_pipe):
    """The IC-LoRA header's `reference_downscale_factor` is the rows' factor, whatever rows a process trained
    (a resumed run, one DDP process): rows at one factor declare it, rows at several declare none."""
    from diffsynth.ltx2.in_context import METADATA_KEY

    def header(items, seen):
        task = LTX2TrainingTask(tiny_ltx2_pipe, max_sequence_length=MAX_LEN)
        task.prepare_dataset(Rows(items, [metadata(item) for item in items]))
        trained(task, seen)
        return task.lora_metadata()

    mixed = [ic_clip(1, 2), ic_clip(2)]  # the second at the option's factor 1
    assert header(mixed, mixed) == header(mixed, mixed[1:]) == header(mixed, mixed[:1]) == {}
    halves = [ic_clip(1, 2), ic_clip(2, "2")]
    assert header(halves, halves) == header(halves, halves[1:]) == header(halves, []) == {METADATA_KEY: "2"}


def test_first_frame_probability_draws_per_batch(tiny_ltx2_pipe):
    """`first_frame=0.5`: each batch gets one draw (all rows alike) from the generator it is given, the same for
    the same generator; a conditioned batch's velocity and loss mask are `first_frame=true`'s, an unconditioned
    one's the plain task's. About half the batches are conditioned; 0.0 and 1.0 draw nothing."""
    pipe = tiny_ltx2_pipe
    p = LTX2TrainingTask(pipe, first_frame=0.5, max_sequence_length=MAX_LEN)
    always = LTX2TrainingTask(pipe, first_frame=True, max_sequence_length=MAX_LEN)
    never = LTX2TrainingTask(pipe, max_sequence_length=MAX_LEN)
    assert p.validation_references == "optional" and always.validation_references == "expected"
    samples = p.encode([clip(1), clip(2)])
    base = always.collate(samples)
    assert "first_frame" not in p.collate(samples)  # drawn by the trainer, not in collate

    def draw(task, seed):
        return task.draw_choices(base, torch.Generator().manual_seed(seed))

    draws = [draw(p, seed)["first_frame"] for seed in range(200)]
    assert all(d.shape == (2,) and d[0] == d[1] for d in draws)
    assert 70 < sum(bool(d[0]) for d in draws) < 130
    assert [bool(d[0]) for d in draws] == [bool(draw(p, seed)["first_frame"][0]) for seed in range(200)]
    assert draw(always, 0) == {} and draw(never, 0) == {}

    noisy = torch.randn(base["latents"].shape, generator=torch.Generator().manual_seed(3))
    sigma = torch.tensor([0.6, 0.3])
    for drawn, reference in ((True, always), (False, never)):
        batch = {**base, "first_frame": torch.tensor([drawn, drawn])}
        got, want = p.velocity(pipe.dit, batch, noisy, sigma), reference.velocity(pipe.dit, base, noisy, sigma)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.testing.assert_close(p.loss_mask(batch), reference.loss_mask(base), rtol=0, atol=0)
    assert (always.loss_mask(base)[:, :4] == 0).all() and (never.loss_mask(base)[:, :4] > 0).all()
    with pytest.raises(ConfigError, match=r"first_frame=0.5 draws per batch \(draw_choices"):
        p.loss_mask(base)
    for bad in (1.5, -0.1, "yes", 2):
        with pytest.raises(ConfigError, match="is not accepted; use true, false or a probability"):
            LTX2TrainingTask(pipe, first_frame=bad)
    assert LTX2TrainingTask(pipe, first_frame=1).first_frame is True


@pytest.mark.integration
def test_ic_validation_through_the_command_line(tiny_ltx2_base, control, tmp_path, monkeypatch):
    """`diffsynth-train` on IC rows at factor 2 with `--task_options validation_ic_video=PATH,first_frame=0.5` as
    typed: training runs, the validation video is written, and its samples follow the control at the factor the
    rows trained at."""
    testing = pytest.importorskip("diffsynth.training.testing")
    from diffsynth.training import trainer

    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(tiny_ltx2_base))
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "1")
    made, setup = [], trainer.setup
    monkeypatch.setattr(trainer, "setup", lambda config: made.append(setup(config)) or made[-1])
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(1)
    rows = []
    for i in range(2):
        for name in (f"clip{i}.mp4", f"depth{i}.mp4"):
            save_video(list(rng.integers(0, 256, (F, H, W, 3), dtype=np.uint8)), data / name, fps=24)
        rows.append({"video": f"clip{i}.mp4", "prompt": CAPTIONS[i], "in_context_videos": f"depth{i}.mp4"})
        rows[-1]["in_context_downsample_factor"] = 2
    dataset = testing.write_metadata(data, rows)
    options = f"max_sequence_length={MAX_LEN},validation_ic_video={control},first_frame=0.5"
    flags = ["--data_file_keys", "video,in_context_videos", "--num_frames", str(F), "--bucket_step", "32"]
    flags += ["--num_epochs", "9", "--task_options", options, "--validation_prompts", CAPTIONS[0]]
    flags += ["--validation_num_inference_steps", "2"]
    losses = testing.train_with_cli("Lightricks/LTX-2", "ltx2", dataset, tmp_path / "out", *flags)
    assert len(losses) == 2 and all(np.isfinite(losses))
    (run,) = made
    assert run.task.first_frame_p == 0.5 and run.task.validation_ic_video == [control]
    assert run.task.validation_factor == 2
    assert (tmp_path / "out" / "validation" / "step-000002-0.mp4").is_file()
