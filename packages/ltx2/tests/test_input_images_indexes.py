"""`input_images_indexes` are the video frames of `input_images` (default `[0]`): given without `input_images`
(beside `input_image`, or alone) they are refused by name, not ignored; without them `input_images` behaves as at
`[0]`."""

from __future__ import annotations

import diffsynth_ltx2_test_repo as repo_module  # loaded by conftest
import numpy as np
import pytest
import torch
from PIL import Image

from diffsynth.runtime.errors import ConfigError

F, H, W = repo_module.FRAMES, repo_module.HEIGHT, repo_module.WIDTH
OPTIONS = dict(
    height=H, width=W, num_frames=F, seed=0, num_inference_steps=2, cfg_scale=1.0, stg_scale=0.0,
    modality_scale=1.0, max_sequence_length=repo_module.MAX_SEQUENCE_LENGTH, progress_bar=False, output_type="pt",
    image_crf=0,
)  # fmt: skip


def picture(seed: int) -> Image.Image:
    small = np.random.default_rng(seed).integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((W, H), Image.BILINEAR)


@pytest.mark.parametrize("indexes", [[8], [0]])
def test_indexes_beside_input_image_are_refused(tiny_ltx2_pipe, indexes):
    with pytest.raises(ConfigError, match=r"input_images_indexes=\[\d\] are the video frames of input_images"):
        tiny_ltx2_pipe(repo_module.CAPTIONS[0], input_image=picture(1), input_images_indexes=indexes, **OPTIONS)


def test_indexes_alone_are_refused(tiny_ltx2_pipe):
    with pytest.raises(ConfigError, match="input_images_indexes=.*give input_images too"):
        tiny_ltx2_pipe(repo_module.CAPTIONS[0], input_images_indexes=[0], **OPTIONS)


def test_input_images_default_to_the_first_frame(tiny_ltx2_pipe):
    """Without indexes `input_images=[image]` is `input_images_indexes=[0]` and `input_image=image`."""
    image = picture(2)
    plain, _ = tiny_ltx2_pipe(repo_module.CAPTIONS[0], input_images=[image], **OPTIONS)
    at_zero, _ = tiny_ltx2_pipe(repo_module.CAPTIONS[0], input_images=[image], input_images_indexes=[0], **OPTIONS)
    first, _ = tiny_ltx2_pipe(repo_module.CAPTIONS[0], input_image=image, **OPTIONS)
    torch.testing.assert_close(plain, at_zero, rtol=0, atol=0)
    torch.testing.assert_close(plain, first, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="input_images has 2 images but input_images_indexes=\\[0\\]"):
        tiny_ltx2_pipe(repo_module.CAPTIONS[0], input_images=[image, picture(3)], **OPTIONS)
