"""Sliding windows over Wan's latent frames (`sliding_window.py`, DiffSynth-Studio's `sliding_window_size` /
`sliding_window_stride`): the windows and their weights by hand, a frame-local velocity kept exactly, the windows'
DiT calls in the pipeline (frames, per-token timesteps, `y`), a window as long as the clip changing nothing, and
the refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffsynth.runtime.errors import ConfigError
from diffsynth.wan import WanVideoPipeline
from diffsynth.wan.pipeline import WanConditions
from diffsynth.wan.sliding_window import SlidingWindows, check_conditions

PROMPT = "a red circle on a blue background"
FAST = {"height": 32, "width": 32, "num_frames": 17, "num_inference_steps": 2, "cfg_scale": 1.0, "progress_bar": False}


def load(repo) -> WanVideoPipeline:
    return WanVideoPipeline.from_pretrained(str(repo), torch_dtype="float32", device="cpu")


def image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8))


class Windows:
    """Records each DiT call's latents, timestep and `y` through a forward pre-hook."""

    def __init__(self, dit):
        self.calls = []
        self.hook = dit.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        self.calls.append((args[0].clone(), args[1].clone(), kwargs.get("y")))

    def __enter__(self):
        return self.calls

    def __exit__(self, *exc):
        self.hook.remove()


# ----------------------------------------------------------------------------------------- the windows
def test_spans_and_weights_by_hand():
    windows = SlidingWindows(4, 2)
    assert windows.spans(6) == [(0, 4), (2, 6)]  # a third at 4 would add nothing: the second reached the end
    assert SlidingWindows(8, 4).spans(21) == [(0, 8), (4, 12), (8, 16), (12, 20), (16, 21)]
    assert SlidingWindows(8, 4).spans(5) == [(0, 5)]
    assert windows.weights(4, first=True, last=False).tolist() == [1.0, 1.0, 0.75, 0.25]
    assert windows.weights(4, first=False, last=True).tolist() == [0.25, 0.75, 1.0, 1.0]
    assert SlidingWindows(4, 4).weights(4, first=False, last=False).tolist() == [1.0] * 4  # no overlap


def test_blend_of_window_constant_velocities_by_hand():
    """Window 1 predicts 10 everywhere, window 2 predicts 20: the shared frames 2 and 3 cross-fade by the ramps."""
    x = torch.zeros(1, 1, 6, 1, 1)
    seen = []

    def velocity(xs, t, cond, uncond):
        seen.append(xs.shape[2])
        return torch.full_like(xs, 10.0 * len(seen))

    out = SlidingWindows(4, 2).predict(velocity, x, torch.tensor([500.0]), None, None)
    assert seen == [4, 4]
    assert out.flatten().tolist() == [10.0, 10.0, 12.5, 17.5, 20.0, 20.0]


@pytest.mark.parametrize("size, stride", [(3, 1), (3, 2), (4, 3), (5, 5)])
def test_a_frame_local_velocity_is_kept_exactly(size, stride):
    """Where every window predicts the same thing for a frame, the normalised blend is that prediction."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 11, 2, 2, generator=gen)
    y = torch.randn(2, 4, 11, 2, 2, generator=gen)
    cond = WanConditions(context=torch.zeros(2, 1, 1), y=y)

    def velocity(xs, t, c, u):
        return xs * 3.0 + c.y[:, :3] + t.view(-1, 1, 1, 1, 1) / 1000  # reads only the window's own frames

    t = torch.tensor([300.0, 600.0])
    out = SlidingWindows(size, stride).predict(velocity, x, t, cond, None)
    torch.testing.assert_close(out, velocity(x, t, cond, None), rtol=1e-6, atol=1e-6)


def test_arguments_and_conditions_are_checked():
    assert SlidingWindows.from_arguments(None, None) is None
    with pytest.raises(ConfigError, match="go together"):
        SlidingWindows.from_arguments(8, None)
    with pytest.raises(ConfigError, match="sliding_window_stride=9 is larger"):
        SlidingWindows.from_arguments(8, 9)
    with pytest.raises(ConfigError, match="sliding_window_size=0"):
        SlidingWindows.from_arguments(0, 1)
    vace = WanConditions(context=torch.zeros(1), vace_context=torch.zeros(1))
    with pytest.raises(ConfigError, match="do not take vace_context"):
        check_conditions(vace)
    check_conditions(WanConditions(context=torch.zeros(1), y=torch.zeros(1), clip_feature=torch.zeros(1)))


# ----------------------------------------------------------------------------------------- in the pipeline
def test_windows_in_the_t2v_pipeline(tiny_repo):
    """17 frames are 5 latent frames: windows of 3 every 2 make two DiT calls a step, on frames 0-2 and 2-4. A
    window as long as the clip is the plain call exactly; a seeded windowed call repeats, and differs from it."""
    pipe = load(tiny_repo)
    plain = pipe(PROMPT, seed=3, output_type="pt", **FAST)
    whole = pipe(PROMPT, seed=3, output_type="pt", sliding_window_size=5, sliding_window_stride=5, **FAST)
    torch.testing.assert_close(whole, plain, rtol=0, atol=0)
    with Windows(pipe.dit) as calls:
        windowed = pipe(PROMPT, seed=3, output_type="pt", sliding_window_size=3, sliding_window_stride=2, **FAST)
    assert [x.shape[2] for x, _, _ in calls] == [3, 3, 3, 3]
    assert windowed.shape == plain.shape and (windowed - plain).abs().max() > 1e-4
    again = pipe(PROMPT, seed=3, output_type="pt", sliding_window_size=3, sliding_window_stride=2, **FAST)
    torch.testing.assert_close(again, windowed, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="step cache"):
        pipe(PROMPT, seed=3, sliding_window_size=3, sliding_window_stride=2, tea_cache_l1_thresh=0.05,
             tea_cache_model_id="Wan2.1-T2V-1.3B", **FAST)  # fmt: skip


def test_windows_cut_y_and_per_token_timesteps(tiny_repo_factory):
    """TI2V: only the window holding the clip's first frame sees that frame's tokens at timestep 0, and an I2V
    DiT's `y` (mask and image latents) is cut with the latents."""
    ti2v = load(tiny_repo_factory("ti2v"))
    settings = dict(FAST, output_type="pt", sliding_window_size=3, sliding_window_stride=2, seed=0)
    with Windows(ti2v.dit) as calls:
        ti2v(PROMPT, input_image=image(3), **settings)
    tokens = (32 // 16 // 2) ** 2
    first, second = calls[0][1], calls[1][1]
    assert first.shape == second.shape == (1, 3 * tokens)
    assert torch.count_nonzero(first[:, :tokens]) == 0 and (second > 0).all()

    i2v = load(tiny_repo_factory("i2v"))
    with Windows(i2v.dit) as calls:
        i2v(PROMPT, input_image=image(1), **settings)
    (_, _, y_first), (_, _, y_second) = calls[:2]
    assert y_first.shape[2] == y_second.shape[2] == 3
    assert torch.equal(y_first[:, :4, 0], torch.ones_like(y_first[:, :4, 0]))  # the given first frame's mask
    assert torch.count_nonzero(y_second[:, :4]) == 0  # frames 2-4: nothing given


def test_cli_sliding_window_flag(tiny_repo, tmp_path, capsys):
    """`--sliding-window SIZE:STRIDE` reaches the pipeline; a malformed value is refused by name."""
    from diffsynth.runtime.cli import main

    args = ["generate", "--model", str(tiny_repo), "--prompt", PROMPT, "--device", "cpu", "--dtype", "float32"]
    args += ["--num-frames", "17", "--height", "32", "--width", "32", "--steps", "1", "--cfg", "1"]
    assert main([*args, "--output", str(tmp_path / "w.mp4"), "--sliding-window", "3:2"]) == 0
    assert (tmp_path / "w.mp4").exists()
    assert main([*args, "--output", str(tmp_path / "x.mp4"), "--sliding-window", "3"]) == 2
    assert "--sliding-window '3': give SIZE:STRIDE" in capsys.readouterr().err
    assert main([*args, "--output", str(tmp_path / "y.mp4"), "--sliding-window", "2:3"]) == 2
    assert "sliding_window_stride=3 is larger" in capsys.readouterr().err
