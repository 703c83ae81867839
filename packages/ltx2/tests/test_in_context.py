"""IC-LoRA reference videos (`in_context_videos`): parity with diffusers' `LTX2InContextPipeline`, the reference
tokens' positions against ltx-core's rule, the factor an IC-LoRA file declares, and errors."""

from __future__ import annotations

import diffsynth_ltx2_test_repo as repo_module  # loaded by conftest
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from diffsynth.ltx2.dit import video_positions
from diffsynth.runtime.errors import ConfigError

CAPTIONS = repo_module.CAPTIONS
H, W, F = repo_module.HEIGHT, repo_module.WIDTH, 17  # 3 latent frames
OFF = dict(stg_scale=0.0, modality_scale=1.0, guidance_rescale=0.0)
SETTINGS = dict(
    height=H, width=W, num_frames=F, max_sequence_length=repo_module.MAX_SEQUENCE_LENGTH, progress_bar=False, **OFF
)


def control_video(seed: int, size: tuple[int, int], frames: int = F) -> list[Image.Image]:
    """Smooth random frames (a slowly changing picture) of `size` (width, height)."""
    rng = np.random.default_rng(seed)
    start, end = rng.integers(0, 256, size=(2, 4, 4, 3))
    return [
        Image.fromarray(((1 - k / frames) * start + k / frames * end).astype(np.uint8)).resize(size, Image.BILINEAR)
        for k in range(frames)
    ]


@pytest.mark.parity
@pytest.mark.parametrize("factor", [1, 2])
def test_matches_diffusers_in_context_pipeline(tiny_ltx2_base, tiny_ltx2_pipe, factor):
    """diffusers' `LTX2InContextPipeline` with one reference video at `reference_downscale_factor` and our
    `in_context_videos` at the same factor: same weights, seed, sigmas and CFG; both draw the video noise over
    the video's and the reference's tokens. The frames are given at the reference size, so neither resizes."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.pipelines.ltx2.pipeline_ltx2_ic_lora import LTX2ReferenceCondition

    reference, sigmas = repo_module.conditioned_reference(
        tiny_ltx2_pipe, tiny_ltx2_base, diffusers.LTX2InContextPipeline
    )
    control = control_video(4, (W // factor, H // factor))
    expected_frames, expected_audio = reference(
        reference_conditions=[LTX2ReferenceCondition(frames=control)],
        reference_downscale_factor=factor,
        **repo_module.diffusers_call(F),
    )
    common = dict(negative_prompt=CAPTIONS[3], seed=3, output_type="np", sigmas=sigmas, cfg_scale=3.0)
    frames, audio = tiny_ltx2_pipe(
        CAPTIONS[0], in_context_videos=[control], in_context_downsample_factor=factor, audio_cfg_scale=5.0,
        **common, **SETTINGS,
    )  # fmt: skip
    without, _ = tiny_ltx2_pipe(CAPTIONS[0], audio_cfg_scale=5.0, **common, **SETTINGS)
    assert frames.shape == expected_frames.shape == (1, F, H, W, 3) and expected_frames.std() > 0.05
    frame_diff = np.abs(frames - expected_frames).max()
    audio_diff = (repo_module.decoded_sound(audio.waveform, expected_audio) - expected_audio).abs().max().item()
    gap = np.abs(without - expected_frames).max()
    print(f"in-context parity (factor {factor}): frames {frame_diff:.3g}, audio {audio_diff:.3g} (gap {gap:.3g})")
    assert frame_diff <= 1e-5 and audio_diff <= 1e-5
    assert gap > 1e-2  # the reference is seen


def spy_dit(pipe, monkeypatch) -> list:
    """Records, per DiT call: the video tokens it got, the timesteps of the appended ones and their positions."""
    seen = []
    real = type(pipe.dit).forward

    def spy(self, video, audio, video_text, audio_text, timestep, **kwargs):
        seen.append((video.shape[1], timestep.clone(), kwargs["video_coords"].clone()))
        return real(self, video, audio, video_text, audio_text, timestep, **kwargs)

    monkeypatch.setattr(type(pipe.dit), "forward", spy)
    return seen


def test_reference_tokens_follow_ltx_core(tiny_ltx2_pipe, monkeypatch):
    """Two references (one longer: 25 frames, cut to the clip's 17) at factor 2 join the video's tokens in order, clean
    (timestep 0), at the positions of their own latent grid (time at the video's frame rate, as ltx-core's
    `VideoConditionByReferenceLatent`) with rows and columns scaled by 2; the video keeps its size."""
    seen = spy_dit(tiny_ltx2_pipe, monkeypatch)
    small = (W // 2, H // 2)
    videos = [control_video(1, small), control_video(2, small, frames=25)]
    frames, _ = tiny_ltx2_pipe(
        CAPTIONS[1], seed=0, in_context_videos=videos, in_context_downsample_factor=2, num_inference_steps=2,
        frame_rate=25.0, output_type="pt", cfg_scale=1.0, **SETTINGS,
    )  # fmt: skip
    config = tiny_ltx2_pipe.dit.config
    own = 3 * (H // 32) * (W // 32)
    grid = (H // 64) * (W // 64)
    first = video_positions(config, 1, 3, H // 64, W // 64, 25.0)
    want = torch.cat([first, first], dim=2)
    want[:, 1:] *= 2
    assert frames.shape == (1, 3, F, H, W) and len(seen) == 2
    for tokens, timestep, coords in seen:
        assert tokens == own + 3 * grid + 3 * grid
        assert torch.all(timestep[:, own:] == 0) and torch.all(timestep[:, :own] > 0)
        torch.testing.assert_close(coords[:, :, own:], want.expand(coords.shape[0], -1, -1, -1), rtol=0, atol=0)


def test_ic_lora_metadata_sets_the_default_factor(tiny_ltx2_base, monkeypatch, tmp_path):
    """An IC-LoRA file's `reference_downscale_factor` metadata is the factor when none is given (as the authors'
    `ICLoraPipeline` reads it); a given factor wins; without either it is 1."""
    pipe = repo_module.our_pipeline(tiny_ltx2_base)
    seen = spy_dit(pipe, monkeypatch)
    own, full = 3 * (H // 32) * (W // 32), 3 * (H // 32) * (W // 32)
    options = dict(seed=0, num_inference_steps=1, cfg_scale=1.0, output_type="pt", **SETTINGS)
    pipe(CAPTIONS[1], in_context_videos=[control_video(1, (W, H))], **options)
    assert seen[-1][0] == own + full  # factor 1: the reference at the video's size
    path = tmp_path / "ic-lora.safetensors"
    state = {k: torch.zeros_like(v) for k, v in repo_module.lora_state(pipe.dit).items()}
    save_file(state, str(path), metadata={"reference_downscale_factor": "2"})
    pipe.load_lora(str(path), fuse=False)
    assert pipe.reference_downscale_factor == 2
    pipe(CAPTIONS[1], in_context_videos=[control_video(1, (W // 2, H // 2))], **options)
    assert seen[-1][0] == own + full // 4
    pipe(CAPTIONS[1], in_context_videos=[control_video(1, (W, H))], in_context_downsample_factor=1, **options)
    assert seen[-1][0] == own + full


def test_in_context_errors_name_the_argument(tiny_ltx2_pipe):
    options = dict(seed=0, num_inference_steps=1, cfg_scale=1.0, **SETTINGS)
    video = control_video(1, (W, H))
    with pytest.raises(ConfigError, match="in_context_downsample_factor=0"):
        tiny_ltx2_pipe(CAPTIONS[1], in_context_videos=[video], in_context_downsample_factor=0, **options)
    with pytest.raises(ConfigError, match="in_context_downsample_factor=4: 64x64 / 4 must be a multiple of 32"):
        tiny_ltx2_pipe(CAPTIONS[1], in_context_videos=[video], in_context_downsample_factor=4, **options)
    with pytest.raises(ConfigError, match="in_context_videos is a list of videos"):
        tiny_ltx2_pipe(CAPTIONS[1], in_context_videos="control.mp4", **options)
    with pytest.raises(ConfigError, match="each in_context_videos entry"):
        tiny_ltx2_pipe(CAPTIONS[1], in_context_videos=[[]], **options)
    with pytest.raises(ConfigError, match="clear_lora_before_state_two applies to the two-stage pipeline"):
        tiny_ltx2_pipe(CAPTIONS[1], clear_lora_before_state_two=True, **options)
