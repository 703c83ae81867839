"""Retake regions at exact latent-frame boundaries: a latent frame's span is half-open `[s, e)`, so it is re-made
only when `e > start` and `s < end` (the authors' `TemporalRegionMask`); a span that only touches a region's edge
is kept, for video (`retake_video_regions`) and audio (`retake_audio_regions`)."""

from __future__ import annotations

import diffsynth_ltx2_test_repo as repo_module  # loaded by conftest
import numpy as np
import pytest
import torch
from PIL import Image

from diffsynth.ltx2.dit import audio_positions
from diffsynth.ltx2.retake import region_mask

CAPTIONS = repo_module.CAPTIONS
H, W, F, FPS = repo_module.HEIGHT, repo_module.WIDTH, 17, 24.0  # latent frames [0, 1), [1, 9), [9, 17) / 24 s


def remade_video(pipe, region) -> list[int]:
    mask = region_mask(pipe.dit.config, (3, 1, 1), FPS, [region], pipe._region, "cpu")
    return mask[0, 0, :, 0, 0].nonzero().flatten().tolist()


@pytest.mark.parametrize(
    ("frames", "expected"),
    [
        ((9, 17), [2]),  # starts where latent 1 ends
        ((0, 9), [0, 1]),  # ends where latent 2 starts
        ((1, 9), [1]),  # exactly latent 1
        ((0, 1), [0]),  # exactly latent 0
        ((8.5, 9), [1]),  # inside latent 1, ending at its end
        ((9, 9.5), [2]),
    ],
)
def test_video_regions_touching_a_span_do_not_remake_it(tiny_ltx2_pipe, frames, expected):
    assert remade_video(tiny_ltx2_pipe, (frames[0] / FPS, frames[1] / FPS)) == expected


def test_audio_regions_touching_a_span_do_not_remake_it(tiny_ltx2_pipe):
    pipe = tiny_ltx2_pipe
    like = torch.zeros(1, 8, 18, 16)
    spans = audio_positions(pipe.dit.config, 1, like.shape[2])[0, 0]
    start, end = float(spans[4, 0]), float(spans[6, 1])  # latent 4's start (= latent 3's end), latent 6's end

    def remade(region):
        cond = pipe.prepare_audio_condition(torch.zeros(2, 16000), 16000, [region], 17, FPS, like)
        return cond.mask[0, 0, :, 0].nonzero().flatten().tolist()

    assert remade((start, end)) == [4, 5, 6]
    assert remade((start, start + 0.001)) == [4]
    assert remade((float(spans[2, 0]), start)) == [2, 3]


def test_a_region_starting_at_a_span_end_keeps_that_frame_in_the_pipeline(tiny_ltx2_pipe, monkeypatch):
    """Re-making video frames [9, 17) of a 17-frame clip keeps latent frames 0 and 1 as given."""
    rng = np.random.default_rng(1)
    given = [Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)) for _ in range(F)]
    seen = []
    real = type(tiny_ltx2_pipe.vae).decode
    monkeypatch.setattr(
        type(tiny_ltx2_pipe.vae), "decode", lambda self, z, **k: seen.append(z.clone()) or real(self, z, **k)
    )
    options = dict(
        height=H, width=W, num_frames=F, seed=0, num_inference_steps=2, cfg_scale=1.0, output_type="pt",
        max_sequence_length=repo_module.MAX_SEQUENCE_LENGTH, progress_bar=False, stg_scale=0.0, modality_scale=1.0,
    )  # fmt: skip
    tiny_ltx2_pipe(CAPTIONS[1], retake_video=given, **options)  # nothing re-made
    tiny_ltx2_pipe(CAPTIONS[1], retake_video=given, retake_video_regions=[(9 / FPS, 17 / FPS)], **options)
    kept, remade = seen
    torch.testing.assert_close(remade[:, :, :2], kept[:, :, :2], rtol=0, atol=1e-6)
    assert (remade[:, :, 2] - kept[:, :, 2]).abs().max() > 1e-2
