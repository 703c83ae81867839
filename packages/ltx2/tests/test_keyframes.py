"""LTX-2 keyframe conditioning (`input_images` at video frames other than the first): parity with diffusers'
`LTX2ConditionPipeline`, the tokens' positions against ltx-core's rule, and behaviour."""

from __future__ import annotations

import diffsynth_ltx2_test_repo as repo_module  # loaded by conftest
import numpy as np
import pytest
import torch
from PIL import Image

from diffsynth.ltx2.dit import keyframe_positions, video_positions
from diffsynth.ltx2.pipeline import LTX2Pipeline

CAPTIONS = repo_module.CAPTIONS
H, W = repo_module.HEIGHT, repo_module.WIDTH
F = 17  # three latent frames: the first, and two more a keyframe can fall on
OFF = dict(stg_scale=0.0, modality_scale=1.0, guidance_rescale=0.0)
SETTINGS = dict(
    height=H,
    width=W,
    num_frames=F,
    max_sequence_length=repo_module.MAX_SEQUENCE_LENGTH,
    image_crf=0,
    progress_bar=False,
    **OFF,
)


def picture(seed: int) -> Image.Image:
    """A smooth random RGB picture of the video's size (no resizing on either side)."""
    small = np.random.default_rng(seed).integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((W, H), Image.BILINEAR)


@pytest.mark.parity
@pytest.mark.parametrize(
    ("first", "strength"),
    [(False, 1.0), (True, 1.0), (True, 0.6)],
    ids=["keyframe", "first-and-keyframe", "first-at-strength-0.6-and-keyframe"],
)
def test_matches_diffusers_condition_pipeline(tiny_ltx2_base, tiny_ltx2_pipe, first, strength):
    """diffusers' `LTX2ConditionPipeline` with a condition at latent index 2 (video frame 8 * (2 - 1) + 1 = 9)
    and optionally one at index 0 (at a `strength`: our `input_images_strength`): same weights, seed, sigmas
    and CFG. Both draw the video noise in token layout over the video's and the keyframe's tokens, as ltx-core
    does. `use_cross_timestep=False` is LTX-2.0's audio<->video modulation, as in our DiT."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.pipelines.ltx2.pipeline_ltx2_condition import LTX2VideoCondition

    reference, sigmas = repo_module.conditioned_reference(
        tiny_ltx2_pipe, tiny_ltx2_base, diffusers.LTX2ConditionPipeline
    )
    images, indexes = [picture(2)], [9]
    conditions = [LTX2VideoCondition(frames=picture(2), index=2, crf=0)]
    if first:
        images, indexes = [picture(1), *images], [0, *indexes]
        conditions.insert(0, LTX2VideoCondition(frames=picture(1), index=0, strength=strength, crf=0))
    common = dict(negative_prompt=CAPTIONS[3], seed=3, output_type="np", sigmas=sigmas, cfg_scale=3.0)
    given = dict(input_images=images, input_images_indexes=indexes, input_images_strength=strength)
    frames, audio = tiny_ltx2_pipe(CAPTIONS[0], **given, audio_cfg_scale=5.0, **common, **SETTINGS)
    expected_frames, expected_audio = reference(
        conditions=conditions,
        **repo_module.diffusers_call(F),
    )
    assert frames.shape == expected_frames.shape == (1, F, H, W, 3)
    assert expected_frames.std() > 0.05
    frame_diff = np.abs(frames - expected_frames).max()
    audio_diff = (repo_module.decoded_sound(audio.waveform, expected_audio) - expected_audio).abs().max().item()
    without, _ = tiny_ltx2_pipe(CAPTIONS[0], audio_cfg_scale=5.0, **common, **SETTINGS)
    gap = np.abs(without - expected_frames).max()
    print(f"keyframe parity ({indexes}): frames {frame_diff:.3g}, audio {audio_diff:.3g} (unconditioned gap {gap:.3g})")
    assert frame_diff <= 1e-5 and audio_diff <= 1e-5
    assert gap > 1e-2
    if strength < 1:  # the strength is seen: the first frame kept exactly gives another video
        kept, _ = tiny_ltx2_pipe(
            CAPTIONS[0], **{**given, "input_images_strength": 1.0}, audio_cfg_scale=5.0, **common, **SETTINGS
        )
        assert np.abs(kept - frames).max() > 1e-2


def test_keyframe_positions_follow_ltx_core():
    """A one-image keyframe at video frame k spans [k, k + 1) / fps in time (ltx-core narrows a single pixel
    frame to one frame, without the causal shift of the video's first latent frame) and the same rows and
    columns as the video's tokens."""
    config = repo_module.tiny_configs()["dit"]
    coords = keyframe_positions(config, 2, 3, 40, 25.0)
    video = video_positions(config, 1, 1, 2, 3, 25.0)
    assert coords.shape == (1, 3, 6, 2)
    torch.testing.assert_close(coords[:, 0], torch.tensor([40 / 25.0, 41 / 25.0]).expand(1, 6, 2))
    assert torch.equal(coords[:, 1:], video[:, 1:])


def test_keyframe_tokens_are_read_and_the_video_keeps_its_size(tiny_ltx2_pipe, monkeypatch):
    """The DiT gets the keyframe's tokens after the video's, at timestep 0, and returns the video's only."""
    seen = []
    real = type(tiny_ltx2_pipe.dit).forward

    def spy(self, video, audio, video_text, audio_text, timestep, **kwargs):
        seen.append((video.shape[1], timestep.shape, kwargs["video_coords"].shape[2], timestep[0, -1].item()))
        return real(self, video, audio, video_text, audio_text, timestep, **kwargs)

    monkeypatch.setattr(type(tiny_ltx2_pipe.dit), "forward", spy)
    frames, _ = tiny_ltx2_pipe(
        CAPTIONS[1], seed=0, input_images=[picture(3)], input_images_indexes=[16], num_inference_steps=2,
        output_type="pt", **SETTINGS,
    )  # fmt: skip
    tokens = 3 * (H // 32) * (W // 32)
    keyframe = (H // 32) * (W // 32)
    assert frames.shape == (1, 3, F, H, W)
    assert {(n, c, t) for n, _, c, t in seen} == {(tokens + keyframe, tokens + keyframe, 0.0)}


def test_first_block_cache_with_keyframes(tiny_ltx2_pipe):
    """Keyframe tokens run in the video stream the cache decides on: threshold 0 gives the uncached video, a
    loose one reuses the later steps and changes it."""
    kwargs = dict(
        seed=0, input_images=[picture(3)], input_images_indexes=[16], num_inference_steps=3, output_type="pt",
        **SETTINGS,
    )  # fmt: skip
    plain, _ = tiny_ltx2_pipe(CAPTIONS[1], **kwargs)
    try:
        cache = tiny_ltx2_pipe.enable_first_block_cache(0.0)["dit"]
        exact, _ = tiny_ltx2_pipe(CAPTIONS[1], **kwargs)
        assert (cache.calls, cache.skipped) == (3, 0)
        cache = tiny_ltx2_pipe.enable_first_block_cache(1e9)["dit"]
        approx, _ = tiny_ltx2_pipe(CAPTIONS[1], **kwargs)
        assert (cache.calls, cache.skipped) == (3, 2)
    finally:
        tiny_ltx2_pipe.disable_first_block_cache()
    torch.testing.assert_close(exact, plain, atol=0, rtol=0)
    assert (approx - plain).abs().max() > 1e-4


def test_two_stage_places_the_keyframes_at_full_size(tiny_ltx2_base, tiny_ltx2_pipe, monkeypatch):
    from diffsynth.runtime.hub import ModelConfig

    upsampler, lora = repo_module.write_two_stage_files(tiny_ltx2_base / "two-stage-keyframes", tiny_ltx2_pipe.dit)
    pipe = repo_module.our_pipeline(
        tiny_ltx2_base, model_configs=[ModelConfig(path=str(upsampler))], stage2_lora_config=str(lora)
    )
    sizes = []
    real = LTX2Pipeline.prepare_keyframes

    def spy(self, images, height, width, crf, fps):
        sizes.append((len(images), height, width))
        return real(self, images, height, width, crf, fps)

    monkeypatch.setattr(LTX2Pipeline, "prepare_keyframes", spy)
    settings = {**SETTINGS, "height": 2 * H, "width": 2 * W}
    frames, _ = pipe(
        CAPTIONS[1], seed=0, input_images=[picture(3)], input_images_indexes=[16], use_distilled_pipeline=True,
        output_type="pt", **settings,
    )  # fmt: skip
    assert frames.shape == (1, 3, F, 2 * H, 2 * W)
    assert sizes == [(1, H, W), (1, 2 * H, 2 * W)]


def test_first_frame_strength_zero_is_text_to_video_and_bad_values_are_refused(tiny_ltx2_pipe):
    """At strength 0 the first frame starts as pure noise and is never pulled towards the image: the video is
    the text-to-video one; values outside [0, 1], or a strength without a first frame, are refused by name."""
    from diffsynth.runtime.errors import ConfigError

    common = dict(seed=5, output_type="np", num_inference_steps=2, **SETTINGS)
    plain, plain_audio = tiny_ltx2_pipe(CAPTIONS[0], **common)
    free, free_audio = tiny_ltx2_pipe(CAPTIONS[0], input_images=[picture(1)], input_images_strength=0.0, **common)
    np.testing.assert_allclose(free, plain, atol=1e-5, rtol=0)
    torch.testing.assert_close(free_audio.waveform, plain_audio.waveform, atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="input_images_strength"):
        tiny_ltx2_pipe(CAPTIONS[0], input_images=[picture(1)], input_images_strength=1.5, **common)
    with pytest.raises(ConfigError, match="input_images_strength"):
        tiny_ltx2_pipe(CAPTIONS[0], input_images_strength=0.5, **common)


@pytest.mark.parametrize("strength", [[1.0, 0.5], (0.5,), "0.5", float("inf")], ids=["list", "tuple", "str", "inf"])
def test_first_frame_strength_must_be_one_finite_number(tiny_ltx2_pipe, strength):
    """A list of per-image strengths failed in float() with a bare TypeError; it is refused by name, saying the
    strength is one number for the first frame (keyframes are kept exactly)."""
    from diffsynth.runtime.errors import ConfigError

    given = dict(input_images=[picture(1), picture(2)], input_images_indexes=[0, 16], input_images_strength=strength)
    message = "one number, the first frame's" if isinstance(strength, (list, tuple)) else "must be a finite number"
    with pytest.raises(ConfigError, match=f"input_images_strength=.*{message}"):
        tiny_ltx2_pipe(CAPTIONS[0], seed=0, num_inference_steps=1, **given, **SETTINGS)
