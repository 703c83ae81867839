"""Input checks around retakes and other pipelines' arguments: video regions that select nothing, empty or reversed
regions, a retake file's own frame rate, text-to-audio's guidance scales, and the DFR pipeline's detailing LoRA."""

from __future__ import annotations

import diffsynth_ltx2_test_repo as repo_module  # loaded by conftest
import numpy as np
import pytest
import torch
from PIL import Image

from diffsynth.runtime.errors import ConfigError

CAPTIONS = repo_module.CAPTIONS
H, W, F = repo_module.HEIGHT, repo_module.WIDTH, 17  # 3 latent frames: [0, 1), [1, 9), [9, 17) pixel frames
SETTINGS = dict(
    height=H, width=W, num_frames=F, max_sequence_length=repo_module.MAX_SEQUENCE_LENGTH, progress_bar=False,
    seed=0, num_inference_steps=1, cfg_scale=1.0, stg_scale=0.0, modality_scale=1.0, guidance_rescale=0.0,
)  # fmt: skip


def clip(frames: int = F) -> list[Image.Image]:
    """Random frames of the video's size."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)) for _ in range(frames)]


@pytest.mark.parametrize("region", [(5.0, 6.0), (-3.0, -1.0)])
def test_a_video_region_outside_the_clip_is_refused(tiny_ltx2_pipe, region):
    """It would select no latent frame and the call would silently become video-to-audio."""
    with pytest.raises(ConfigError, match=r"retake_video_regions entry \(.*\) overlaps no video latent frame of the"):
        tiny_ltx2_pipe(CAPTIONS[1], retake_video=clip(), retake_video_regions=[region], **SETTINGS)


@pytest.mark.parametrize("name", ["retake_video_regions", "retake_audio_regions"])
def test_an_empty_region_is_refused(tiny_ltx2_pipe, name):
    given = {"retake_video": clip()} if name == "retake_video_regions" else {"retake_audio": torch.zeros(2, 48000)}
    with pytest.raises(ConfigError, match=rf"{name} entry \(0.2, 0.2\) is not accepted.*start < end"):
        tiny_ltx2_pipe(CAPTIONS[1], **given, **{name: [(0.2, 0.2)]}, **SETTINGS)


def test_a_retake_file_gives_its_frame_rate_unless_the_call_does(tiny_ltx2_pipe, tmp_path):
    """The sound lasts the clip's `num_frames / frame_rate` seconds: a 30 fps file is timed at 30 fps, as the same
    frames given with frame_rate=30; an explicit frame_rate still wins."""
    from diffsynth.runtime.media import save_video

    path = tmp_path / "clip30.mp4"
    save_video(clip(), path, fps=30)
    options = dict(output_type="pt", **SETTINGS)

    def samples(video, **extra) -> int:
        return tiny_ltx2_pipe(CAPTIONS[1], retake_video=video, **options, **extra)[1].waveform.shape[-1]

    at_30, at_24 = samples(clip(), frame_rate=30), samples(clip(), frame_rate=24)
    assert at_30 != at_24
    assert samples(path) == at_30
    assert samples(path, frame_rate=24) == at_24


@pytest.mark.parametrize("name", ["audio_cfg_scale", "audio_stg_scale"])
@pytest.mark.parametrize("value", [float("nan"), "7"])
def test_text_to_audio_refuses_a_scale_that_is_not_a_finite_number(tiny_ltx2_pipe, name, value):
    with pytest.raises(ConfigError, match=rf"{name}=.* must be a finite number"):
        tiny_ltx2_pipe.generate_audio(
            CAPTIONS[1], num_frames=F, num_inference_steps=1, seed=0, progress_bar=False,
            max_sequence_length=repo_module.MAX_SEQUENCE_LENGTH, **{name: value},
        )  # fmt: skip


@pytest.mark.parametrize(
    "given, name",
    [
        ({"detailing_lora": "detailer.safetensors"}, "detailing_lora"),
        ({"detailing_lora_strength": 0.5}, "detailing_lora_strength"),
        ({"temporal_upsample_rounds": 1}, "temporal_upsample_rounds"),
    ],
)
def test_the_dfr_pipelines_arguments_are_refused_without_it(tiny_ltx2_pipe, given, name):
    with pytest.raises(ConfigError, match=f"{name} belongs to the DFR pipeline: pass use_dfr_pipeline=True"):
        tiny_ltx2_pipe(CAPTIONS[1], **given, **SETTINGS)
