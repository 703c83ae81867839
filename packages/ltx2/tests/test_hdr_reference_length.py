"""HDR (`hdr.generate_hdr`): a `num_frames` longer than the SDR reference is refused naming both lengths, with and
without `high_quality` (which shows each of the first `num_frames` reference frames twice), from a list of frames
and from a file; a reference as long as `num_frames` still runs."""

from __future__ import annotations

import diffsynth_ltx2_test_repo as repo_module  # loaded by conftest
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from diffsynth.ltx2.hdr import LTX2HDRPipeline
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.media import save_video

ONE_STAGE = dict(use_two_stage_pipeline=False, seed=0, progress_bar=False)


@pytest.fixture(scope="module")
def hdr_pipe(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-hdr-length") / "ltx-2.3-22b-distilled-1.1.safetensors"
    save_file(repo_module.single_file_state(repo_module.tiny_models(0, "2.3")), str(path))
    return LTX2HDRPipeline.from_pretrained([ModelConfig(path=str(path))], device="cpu", torch_dtype=torch.float32)


def reference(frames: int) -> list[Image.Image]:
    rng = np.random.default_rng(frames)
    return [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(frames)]


def contexts(pipe) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    config = pipe.dit.config
    return {
        "video_context": torch.randn(1, 7, config.dim, generator=generator),
        "audio_context": torch.randn(1, 7, config.audio_dim, generator=generator),
    }


@pytest.mark.parametrize("high_quality", [False, True], ids=["plain", "high_quality"])
def test_num_frames_longer_than_the_reference_is_refused(hdr_pipe, high_quality):
    with pytest.raises(ConfigError, match="num_frames=25 needs 25 frames of reference_video, which has 9"):
        hdr_pipe(reference(9), prompt_embeddings=contexts(hdr_pipe), num_frames=25, high_quality=high_quality)
    with pytest.raises(ConfigError, match="num_frames=17 needs 17 frames of reference_video, which has 12"):
        hdr_pipe(reference(12), prompt_embeddings=contexts(hdr_pipe), num_frames=17, high_quality=high_quality)


def test_a_short_reference_file_is_refused(hdr_pipe, tmp_path):
    path = tmp_path / "sdr.mp4"
    save_video(reference(9), path, fps=24)
    with pytest.raises(ConfigError, match="num_frames=17 needs 17 frames of reference_video, which has 9"):
        hdr_pipe(str(path), prompt_embeddings=contexts(hdr_pipe), num_frames=17, **ONE_STAGE)


@pytest.mark.parametrize("high_quality", [False, True], ids=["plain", "high_quality"])
def test_a_reference_as_long_as_num_frames_runs(hdr_pipe, high_quality):
    frames = hdr_pipe(
        reference(9), prompt_embeddings=contexts(hdr_pipe), num_frames=9, high_quality=high_quality, **ONE_STAGE
    )
    assert frames.shape == (1, 3, 9, 64, 64)
