"""Wan (text-to-video) trained end to end by the trainer on the tiny random hub-style repo of the wan tests.

Integration: needs diffsynth-wan installed (the `integration` nox session installs every package).
"""

from pathlib import Path

import pytest

pytest.importorskip("diffsynth.wan")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from diffsynth.training.config import TrainConfig  # noqa: E402
from diffsynth.training.testing import (  # noqa: E402
    assert_overfits,
    assert_same_training,
    load_module,
    logged_losses,
    outputs_before_and_after_lora,
    overfit_config,
    resume_after_crash,
    tiny_config,
    train_and_log,
    train_direct_and_cached,
    write_video_dataset,
)
from diffsynth.training.trainer import train  # noqa: E402
from diffsynth.wan import WanVideoPipeline  # noqa: E402
from diffsynth.wan.pipeline import wan_velocity  # noqa: E402

pytestmark = pytest.mark.integration

PROMPTS = ["a red circle on a blue background", "a small green square in the top left corner"]
FAST = {"height": 32, "width": 32, "num_frames": 5, "num_inference_steps": 2, "cfg_scale": 1.0, "progress_bar": False}


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    wan_tests = load_module(Path(__file__).parents[2] / "wan" / "tests" / "conftest.py", "wan_tiny_repo")
    return wan_tests.build_tiny_repo(tmp_path_factory.mktemp("tiny-wan"), "t2v")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Two 5-frame 32x32 mp4 videos of a square moving across a plain background."""
    videos = []
    for background, square in [((20, 40, 200), (230, 30, 30)), ((10, 10, 10), (40, 220, 60))]:
        frames = np.empty((5, 32, 32, 3), dtype=np.uint8)
        frames[:] = background
        for f in range(5):
            frames[f, 8:20, 4 + 4 * f : 16 + 4 * f] = square
        videos.append(frames)
    return write_video_dataset(tmp_path_factory.mktemp("videos"), PROMPTS, videos)


def config(tiny_repo, dataset, output, **overrides) -> TrainConfig:
    values = dict(num_frames=5, max_pixels=32 * 32, max_steps=4, seed=0, num_epochs=1000)
    return tiny_config(tiny_repo, "wan", dataset, output, **{**values, **overrides})


def test_full_finetune_overfits_two_videos(tiny_repo, dataset, tmp_path):
    """Full fine-tuning at a narrow noise band (less noise in the loss) halves the loss in 12 steps."""
    settings = dict(num_frames=5, max_pixels=32 * 32, trainable_models=["dit"], max_steps=12)
    state, curve = train_and_log(overfit_config(tiny_repo, "wan", dataset, tmp_path, noise=(0.45, 0.55), **settings))
    assert_overfits(state, curve, steps=12, last=4)  # seeded: 5.06 -> 2.39 (mean of the last 4)


def test_cached_two_stage_training_equals_direct_training_and_the_lora_loads(tiny_repo, dataset, tmp_path):
    runs = train_direct_and_cached(config(tiny_repo, dataset, tmp_path))
    assert runs.state.step == 4
    direct_losses, cached_losses = runs.losses()
    assert cached_losses == pytest.approx(direct_losses, rel=1e-5)
    assert_same_training(runs, step=4, atol=1e-6)

    # the trained LoRA loads in the pipeline and changes its prediction and its video
    pipe = WanVideoPipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu")
    g = torch.Generator().manual_seed(3)
    latents, t = torch.randn(1, 16, 2, 4, 4, generator=g), torch.tensor([600.0])
    context = pipe.encode_prompt([PROMPTS[0]])
    before = wan_velocity(pipe.dit, latents, t, context)
    lora, load = tmp_path / "direct" / "step-000004.safetensors", dict(fuse=False, name="trained")
    base, after = outputs_before_and_after_lora(pipe, lora, PROMPTS[0], load, seed=0, output_type="pt", **FAST)
    assert (wan_velocity(pipe.dit, latents, t, context) - before).abs().max() > 1e-4
    assert after.shape == base.shape == (1, 3, 5, 32, 32) and (after - base).abs().max() > 1e-4


def test_resume_gives_the_uninterrupted_loss_sequence(tiny_repo, dataset, tmp_path):
    settings = dict(max_steps=4, save_steps=2, lr_scheduler="cosine", lr_warmup_steps=1)
    train(config(tiny_repo, dataset, tmp_path / "straight", **settings))
    state = resume_after_crash(config(tiny_repo, dataset, tmp_path / "resumed", **settings))
    assert state.step == 4
    # steps 1-2, then 3-4 after the resume
    assert logged_losses(tmp_path / "resumed") == logged_losses(tmp_path / "straight")
    step = "checkpoints/step-000004/trainable.safetensors"
    straight, resumed = load_file(str(tmp_path / "straight" / step)), load_file(str(tmp_path / "resumed" / step))
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


def test_validation_samples_are_as_long_as_the_training_clips(tiny_repo, dataset, tmp_path):
    """Validation videos, from the first one (--sample_at_first) on, have the clips' 5 frames, not the pipeline's
    81; a prompts-file line's --f still wins."""
    from diffsynth.runtime.media import load_video

    size = {"validation_height": 32, "validation_width": 32, "validation_num_inference_steps": 2}
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPTS[1]} --f 9\n")
    train(config(tiny_repo, dataset, tmp_path / "out", max_steps=1, validation_prompts=[PROMPTS[0]], **size,
                 sample_at_first=True))  # fmt: skip
    folder = tmp_path / "out" / "validation"
    assert [len(load_video(folder / f"step-00000{k}-0.mp4")) for k in (0, 1)] == [5, 5]
    train(config(tiny_repo, dataset, tmp_path / "file", max_steps=1, validation_prompts_file=str(prompts), **size))
    assert len(load_video(tmp_path / "file" / "validation" / "step-000001-0.mp4")) == 9
