"""`end_image` on the image-to-video DiTs, as DiffSynth-Studio's `WanVideoUnit_ImageEmbedderCLIP` /
`WanVideoUnit_ImageEmbedderVAE` / `WanVideoUnit_FunCameraControl` use it: the last frame goes into `y` for every
DiT that builds `y` from the given frames; its CLIP tokens are appended only for DiTs with CLIP positions for two
images (FLF2V, `image_pos_len`); a DiT that has no place for it (Control-Camera) or no first frame to put it after
(Fun Control without `input_image`) refuses it by name instead of dropping it."""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from diffsynth.runtime.errors import ConfigError


def _beside(name: str):
    spec = importlib.util.spec_from_file_location(f"wan_end_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


P = _beside("test_pipeline")
FAST = dict(P.FAST)


def dit_inputs(pipe, **arguments) -> dict:
    with P.Calls(pipe.dit) as calls:
        pipe(P.PROMPT, seed=0, **arguments, **FAST)
    return calls[0][2]


def test_i2v_end_image_is_in_y_not_in_clip(tiny_repo_factory):
    """Wan2.1-I2V / Fun-InP (no image positions): the end frame changes y (its mask and latent), not the CLIP
    tokens, which are the first frame's alone."""
    pipe = P.load(tiny_repo_factory("i2v"))
    assert not pipe.dit.config.image_pos_len
    first = dit_inputs(pipe, input_image=P.image(1))
    both = dit_inputs(pipe, input_image=P.image(1), end_image=P.image(2))
    assert both["clip_feature"].shape == (1, 5, 128)
    torch.testing.assert_close(both["clip_feature"], first["clip_feature"], atol=0, rtol=0)
    assert torch.equal(both["y"][:, :4, 1, 0, 0], torch.tensor([[0.0, 0.0, 0.0, 1.0]]))
    assert (both["y"][:, 4:, -1] - first["y"][:, 4:, -1]).abs().max() > 1e-4


def test_flf2v_appends_the_end_image_clip_tokens(tiny_repo_factory):
    pipe = P.load(tiny_repo_factory("i2v"))
    first, last = [P.image(1)], [P.image(2)]
    plain = pipe.encode_clip(first, last, 32, 32)
    pipe.dit.config = replace(pipe.dit.config, image_pos_len=10)  # an FLF2V DiT: CLIP positions for two images
    flf2v = pipe.encode_clip(first, last, 32, 32)
    assert plain.shape == (1, 5, 128) and flf2v.shape == (1, 10, 128)
    torch.testing.assert_close(flf2v[:, :5], plain, atol=0, rtol=0)
    torch.testing.assert_close(flf2v[:, 5:], pipe.encode_clip(last, None, 32, 32), atol=0, rtol=0)


def test_control_camera_refuses_end_image(tiny_repo_factory):
    pipe = P.load(tiny_repo_factory("fun_camera"))
    with pytest.raises(ConfigError, match="Control-Camera DiT takes no end_image"):
        pipe(P.PROMPT, input_image=P.image(1), end_image=P.image(2), camera_control_direction="Left", **FAST)


def test_fun_control_end_image_needs_input_image(tiny_repo_factory):
    pipe = P.load(tiny_repo_factory("fun_control"))
    control = [P.image(i) for i in range(FAST["num_frames"])]
    with pytest.raises(ConfigError, match="end_image needs input_image"):
        pipe(P.PROMPT, control_video=control, end_image=P.image(2), **FAST)
    first = dit_inputs(pipe, control_video=control, input_image=P.image(1))
    both = dit_inputs(pipe, control_video=control, input_image=P.image(1), end_image=P.image(2))
    assert (both["y"] - first["y"]).abs().max() > 1e-4  # with a first frame, the last one is placed in y
