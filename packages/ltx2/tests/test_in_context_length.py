"""IC-LoRA control videos (`in_context_videos`) shorter than the clip are refused, naming the entry and both
lengths, whatever the reference downscale factor (it scales rows and columns, not time)."""

from __future__ import annotations

import diffsynth_ltx2_test_repo as repo_module  # loaded by conftest
import numpy as np
import pytest
from PIL import Image

from diffsynth.runtime.errors import ConfigError

H, W, F = repo_module.HEIGHT, repo_module.WIDTH, 17
OPTIONS = dict(
    height=H, width=W, num_frames=F, seed=0, num_inference_steps=1, cfg_scale=1.0, stg_scale=0.0,
    modality_scale=1.0, max_sequence_length=repo_module.MAX_SEQUENCE_LENGTH, progress_bar=False, output_type="pt",
)  # fmt: skip


def control(frames: int, size=(W, H)) -> list[Image.Image]:
    rng = np.random.default_rng(frames)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(frames)]


@pytest.mark.parametrize("factor", [1, 2])
@pytest.mark.parametrize("frames", [9, 16])
def test_a_control_video_shorter_than_the_clip_is_refused(tiny_ltx2_pipe, factor, frames):
    videos = [control(F), control(frames)]
    message = rf"in_context_videos\[1\] has {frames} frames, fewer than the clip's num_frames={F}"
    with pytest.raises(ConfigError, match=message):
        tiny_ltx2_pipe(
            repo_module.CAPTIONS[1], in_context_videos=videos, in_context_downsample_factor=factor, **OPTIONS
        )


def test_a_control_video_as_long_as_the_clip_runs(tiny_ltx2_pipe):
    frames, _ = tiny_ltx2_pipe(repo_module.CAPTIONS[1], in_context_videos=[control(F)], **OPTIONS)
    assert frames.shape == (1, 3, F, H, W)
