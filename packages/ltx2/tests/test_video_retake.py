"""LTX-2 video retake (`retake_video`, `retake_video_regions`): parity with diffusers' `LTX2ConditionPipeline` given
the kept frames as a video condition, what is kept and re-made, video-to-audio, and errors."""

from __future__ import annotations

import diffsynth_ltx2_test_repo as repo_module  # loaded by conftest
import numpy as np
import pytest
import torch
from PIL import Image

from diffsynth.runtime.errors import ConfigError

CAPTIONS = repo_module.CAPTIONS
H, W, F = repo_module.HEIGHT, repo_module.WIDTH, 17  # 3 latent frames: [0, 1), [1, 9), [9, 17) pixel frames
OFF = dict(stg_scale=0.0, modality_scale=1.0, guidance_rescale=0.0)
SETTINGS = dict(
    height=H, width=W, num_frames=F, max_sequence_length=repo_module.MAX_SEQUENCE_LENGTH, progress_bar=False, **OFF
)
LAST = [(0.4, 1.0)]  # at 24 fps only the last latent frame ([9, 17) / 24 s) overlaps this


def clip(seed: int, frames: int = F) -> list[Image.Image]:
    """Smooth random frames of the video's size (a picture fading into another)."""
    rng = np.random.default_rng(seed)
    start, end = rng.integers(0, 256, size=(2, 6, 6, 3))
    return [
        Image.fromarray(((1 - k / frames) * start + k / frames * end).astype(np.uint8)).resize((W, H), Image.BILINEAR)
        for k in range(frames)
    ]


@pytest.mark.parity
def test_matches_diffusers_condition_pipeline_with_the_kept_frames(tiny_ltx2_base, tiny_ltx2_pipe):
    """Re-making the last latent frame of a 17-frame video keeps its first two, which encode (causal VAE) as
    diffusers' video condition of the first 9 frames at index 0 does: same weights, seed, sigmas and CFG, both
    drawing the noise in token layout."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.pipelines.ltx2.pipeline_ltx2_condition import LTX2VideoCondition

    reference, sigmas = repo_module.conditioned_reference(
        tiny_ltx2_pipe, tiny_ltx2_base, diffusers.LTX2ConditionPipeline
    )
    given = clip(5)
    expected_frames, expected_audio = reference(
        conditions=[LTX2VideoCondition(frames=given[:9], index=0, crf=0)],
        **repo_module.diffusers_call(F),
    )
    common = dict(negative_prompt=CAPTIONS[3], seed=3, output_type="np", sigmas=sigmas, cfg_scale=3.0)
    frames, audio = tiny_ltx2_pipe(
        CAPTIONS[0], retake_video=given, retake_video_regions=LAST, audio_cfg_scale=5.0, **common, **SETTINGS
    )
    assert frames.shape == expected_frames.shape == (1, F, H, W, 3) and expected_frames.std() > 0.05
    frame_diff = np.abs(frames - expected_frames).max()
    audio_diff = (repo_module.decoded_sound(audio.waveform, expected_audio) - expected_audio).abs().max().item()
    print(f"retake parity: frames {frame_diff:.3g}, audio {audio_diff:.3g}")
    assert frame_diff <= 1e-5 and audio_diff <= 1e-5


def decoded_latents(pipe, monkeypatch) -> list[torch.Tensor]:
    seen = []
    real = type(pipe.vae).decode

    def spy(self, latents, **kwargs):
        seen.append(latents.clone())
        return real(self, latents, **kwargs)

    monkeypatch.setattr(type(pipe.vae), "decode", spy)
    return seen


def test_kept_frames_stay_and_the_regions_are_remade(tiny_ltx2_pipe, monkeypatch):
    """The latent frames outside the regions leave the loop as the given video's latents, the ones inside do
    not; the DiT sees the kept ones at timestep 0."""
    from diffsynth.runtime.media import pil_to_tensor

    given = clip(6)
    pixels = pil_to_tensor(given, dtype=torch.float32, device=tiny_ltx2_pipe.device).transpose(0, 1)[None]
    encoded = tiny_ltx2_pipe.vae.encode(pixels)
    seen = decoded_latents(tiny_ltx2_pipe, monkeypatch)
    timesteps = []
    real = type(tiny_ltx2_pipe.dit).forward

    def spy(self, video, audio, video_text, audio_text, timestep, **kwargs):
        timesteps.append(timestep.clone())
        return real(self, video, audio, video_text, audio_text, timestep, **kwargs)

    monkeypatch.setattr(type(tiny_ltx2_pipe.dit), "forward", spy)
    options = dict(seed=0, num_inference_steps=2, cfg_scale=1.0, output_type="pt", **SETTINGS)
    tiny_ltx2_pipe(CAPTIONS[1], retake_video=given, retake_video_regions=LAST, **options)
    torch.testing.assert_close(seen[-1][:, :, :2], encoded[:, :, :2], rtol=0, atol=1e-6)
    assert (seen[-1][:, :, 2] - encoded[:, :, 2]).abs().max() > 1e-2
    per_frame = (H // 32) * (W // 32)
    assert all(torch.all(t[:, : 2 * per_frame] == 0) and torch.all(t[:, 2 * per_frame :] > 0) for t in timesteps)


def test_without_regions_the_video_is_kept_and_only_the_sound_is_made(tiny_ltx2_pipe, monkeypatch):
    """Video-to-audio: every latent frame is the given video's; the sound depends on the seed."""
    from diffsynth.runtime.media import pil_to_tensor

    given = clip(7)
    pixels = pil_to_tensor(given, dtype=torch.float32, device=tiny_ltx2_pipe.device).transpose(0, 1)[None]
    encoded = tiny_ltx2_pipe.vae.encode(pixels)
    seen = decoded_latents(tiny_ltx2_pipe, monkeypatch)
    options = dict(num_inference_steps=2, cfg_scale=1.0, output_type="pt", **SETTINGS)
    _, sound = tiny_ltx2_pipe(CAPTIONS[2], seed=0, retake_video=given, **options)
    _, other = tiny_ltx2_pipe(CAPTIONS[2], seed=1, retake_video=given, **options)
    for latents in seen:
        torch.testing.assert_close(latents, encoded, rtol=0, atol=1e-6)
    assert (sound.waveform - other.waveform).abs().max() > 1e-4


def test_retake_errors_name_the_argument(tiny_ltx2_pipe):
    options = dict(seed=0, num_inference_steps=1, cfg_scale=1.0, **SETTINGS)
    with pytest.raises(ConfigError, match="retake_video has 9 frames; num_frames=17"):
        tiny_ltx2_pipe(CAPTIONS[1], retake_video=clip(1, 9), **options)
    with pytest.raises(ConfigError, match="retake_video_regions are regions of retake_video"):
        tiny_ltx2_pipe(CAPTIONS[1], retake_video_regions=LAST, **options)
    with pytest.raises(ConfigError, match="takes no input_images"):
        tiny_ltx2_pipe(CAPTIONS[1], retake_video=clip(1), input_image=clip(1)[0], **options)
    with pytest.raises(ConfigError, match=r"retake_video_regions entry \(2.0, 1.0\)"):
        tiny_ltx2_pipe(CAPTIONS[1], retake_video=clip(1), retake_video_regions=[(2.0, 1.0)], **options)
    with pytest.raises(ConfigError, match="retake_video must be a video file or a non-empty list"):
        tiny_ltx2_pipe(CAPTIONS[1], retake_video=[], **options)
