"""Wan Fun Control-Camera (Alibaba PAI; `camera.py`, the DiT's `control_adapter`): the camera rays, their packing,
the adapter in the DiT, the released layout, and the pipeline's `camera_control_*` arguments.

No installable library implements these models (diffusers has none; VideoX-Fun and DiffSynth-Studio are not
importable here), so the proofs are invariants: the rays against the pinhole-camera geometry computed
independently, the packing against an explicit loop, the adapter against its definition, and the pipeline's
conditions against DiffSynth-Studio's `WanVideoUnit_FunCameraControl` composition.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from diffsynth.runtime.errors import ConfigError
from diffsynth.wan.camera import (
    DEFAULT_ORIGIN,
    camera_control_input,
    camera_path,
    check_direction,
    pack_frames,
    plucker_embedding,
)
from diffsynth.wan.formats import config_from_state


def _beside(name: str):
    spec = importlib.util.spec_from_file_location(f"wan_cam_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


T = _beside("test_dit")
P = _beside("test_pipeline")
FAST = dict(P.FAST)


# ------------------------------------------------------------------ camera rays
def test_paths_move_the_named_axes():
    assert check_direction("LeftUp") == ("Left", "Up") and check_direction("Out") == ("Out",)
    path = camera_path("RightDown", 3, speed=0.5)
    assert path[0] == [float(v) for v in DEFAULT_ORIGIN]
    assert [p[9] for p in path] == [0.0, -0.5, -1.0] and [p[13] for p in path] == [0.0, -0.5, -1.0]
    assert all(p[18] == 0.0 for p in path)
    for bad in ("left", "Sideways", "LeftX", 3):
        with pytest.raises(ConfigError, match="camera_control_direction"):
            check_direction(bad)


def test_rays_are_the_pinhole_cameras():
    """Every pixel's ray, computed here pixel by pixel in float64 numpy: the pinhole direction
    `((u - cx) / fx, (v - cy) / fy, 1)` normalised and turned by the pose relative to the first camera
    (`w2c_0 @ inverse(w2c_k)`), the origin that pose's translation, the moment `origin x direction`. The first
    frame's camera is the identity (moment 0)."""
    import numpy as np

    height, width = 9, 16  # the poses' 16:9: no focal rescaling
    path = camera_path("LeftIn", 3, speed=0.25)
    rays = plucker_embedding(path, height, width)
    assert rays.shape == (3, height, width, 6)
    w2c = [np.vstack([np.array(p[7:]).reshape(3, 4), [0, 0, 0, 1]]) for p in path]
    fx, fy, cx, cy = path[0][1] * width, path[0][2] * height, path[0][3] * width, path[0][4] * height
    for frame in range(3):
        relative = w2c[0] @ np.linalg.inv(w2c[frame])
        for v, u in ((0, 0), (4, 7), (8, 15), (2, 11)):
            d = np.array([(u + 0.5 - cx) / fx, (v + 0.5 - cy) / fy, 1.0])
            d = relative[:3, :3] @ (d / np.linalg.norm(d))
            o = relative[:3, 3]
            want = torch.tensor(np.concatenate([np.cross(o, d), d]), dtype=torch.float32)
            torch.testing.assert_close(rays[frame, v, u], want, atol=1e-5, rtol=0)
    assert rays[0, ..., :3].abs().max() == 0 and rays[2, ..., :3].abs().max() > 0.1


def test_focal_length_follows_the_aspect_ratio():
    """A square frame keeps the poses' vertical field of view: fx is rescaled from 16:9 so that fx = fy in
    pixels (the centre column's rays then fan out as the centre row's)."""
    rays = plucker_embedding(camera_path("In", 1), 8, 8)
    torch.testing.assert_close(rays[0, 4, :, 3:], rays[0, :, 4, 3:][:, [1, 0, 2]], atol=1e-6, rtol=0)


def test_packing_folds_four_frames_onto_channels():
    """The first frame is repeated four times, then each group of four frames goes to channels `4 c + i`."""
    embedding = torch.randn(9, 3, 5, 6)
    packed = pack_frames(embedding)
    assert packed.shape == (1, 24, 3, 3, 5)
    frames = [embedding[0]] * 4 + list(embedding[1:])
    for group in range(3):
        for c in range(6):
            for i in range(4):
                assert torch.equal(packed[0, 4 * c + i, group], frames[4 * group + i][..., c])
    assert camera_control_input("Up", 9, 32, 48).shape == (1, 24, 3, 32, 48)


# ------------------------------------------------------------------ the DiT
def camera_model(seed: int = 3):
    """A tiny Control-Camera DiT: noise + first-frame latent (2 x 4), CLIP input, the camera adapter."""
    return T.make_model(T.tiny_config("i2v", in_dim=8, camera_adapter_dim=24), seed)


def test_adapter_adds_to_the_patch_embedding():
    """The camera's effect is exactly the adapter's output added to the patch embedding: the DiT with camera
    input equals the DiT without it whose patch embedding returns that sum; a zero adapter changes nothing."""
    model = camera_model().eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(1, 4, 2, 4, 6, generator=g), torch.randn(1, 4, 2, 4, 6, generator=g)
    t, context, clip = torch.tensor([700.0]), torch.randn(1, 7, 32, generator=g), torch.randn(1, 5, 24, generator=g)
    camera = torch.randn(1, 24, 2, 4 * 8, 6 * 8, generator=g)  # the video's pixel size (latents 4 x 6)
    with torch.no_grad():
        got = model(x, t, context, clip_feature=clip, y=y, camera_latents=camera)
        adapter = model.control_adapter
        frames = F.pixel_unshuffle(camera[0].transpose(0, 1), 8)
        conv = adapter.conv(frames)
        block = adapter.residual_blocks[0]
        expected_tokens = (conv + block.conv2(F.relu(block.conv1(conv)))).transpose(0, 1)[None]
        hook = model.patch_embedding.register_forward_hook(lambda m, a, out: out + expected_tokens)
        want = model(x, t, context, clip_feature=clip, y=y)
        hook.remove()
        plain = model(x, t, context, clip_feature=clip, y=y)
        for p in adapter.parameters():
            p.zero_()
        zeroed = model(x, t, context, clip_feature=clip, y=y, camera_latents=camera)
    assert (got - plain).abs().max() > 1e-3
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(zeroed, plain, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="camera_latents has shape"):
        model(x, t, context, clip_feature=clip, y=y, camera_latents=camera[:, :, :, :8])
    with pytest.raises(ValueError, match="no control_adapter"):
        T.make_model(T.tiny_config("i2v", in_dim=8), 0)(x, t, context, clip_feature=clip, y=y, camera_latents=camera)


def test_released_control_camera_layout_is_recognised():
    """PAI's Wan2.1-Fun-V1.1-1.3B-Control-Camera names (on the meta device): the adapter's keys and shapes come
    from the released config (32 input channels, 1536 wide, 24 camera channels folded 8 x 8), and the config is
    derived back from them."""
    from diffsynth.wan.dit import WanDiT, WanDiTConfig

    config = WanDiTConfig(
        dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, in_dim=32, out_dim=16, model_type="i2v",
        has_image_input=True, camera_adapter_dim=24,
    )  # fmt: skip
    with torch.device("meta"):
        model = WanDiT(config)
    state = model.state_dict()
    adapter = {k: tuple(v.shape) for k, v in state.items() if k.startswith("control_adapter.")}
    assert adapter == {
        "control_adapter.conv.weight": (1536, 24 * 64, 2, 2),
        "control_adapter.conv.bias": (1536,),
        "control_adapter.residual_blocks.0.conv1.weight": (1536, 1536, 3, 3),
        "control_adapter.residual_blocks.0.conv1.bias": (1536,),
        "control_adapter.residual_blocks.0.conv2.weight": (1536, 1536, 3, 3),
        "control_adapter.residual_blocks.0.conv2.bias": (1536,),
    }
    derived = config_from_state(state)
    assert derived.camera_adapter_dim == 24 and derived.in_dim == 32 and derived.has_image_input


# ------------------------------------------------------------------ the pipeline
@pytest.fixture(scope="module")
def camera_pipe(tiny_repo_factory):
    return P.load(tiny_repo_factory("fun_camera"))


def test_conditions_are_diffsynth_studios_composition(camera_pipe):
    """y: the input image encoded alone as the first latent frame, zeros after; the camera input is the packed
    rays at the video's size, for every prompt."""
    from diffsynth.runtime.media import pil_to_tensor

    first = P.image(3)
    calls = []
    hook = camera_pipe.dit.register_forward_pre_hook(lambda m, a, kw: calls.append(dict(kw)), with_kwargs=True)
    try:
        camera_pipe([P.PROMPT, P.PROMPT], input_image=first, seed=1, camera_control_direction="Left",
                    camera_control_speed=0.1, **FAST)  # fmt: skip
    finally:
        hook.remove()
    kwargs = calls[0]
    latent = camera_pipe.vae.encode(pil_to_tensor(first)[:, :, None], tiled=True).float()
    assert kwargs["y"].shape == (2, 16, 2, 4, 4)
    torch.testing.assert_close(kwargs["y"][:, :, :1], latent.expand(2, -1, -1, -1, -1), atol=1e-5, rtol=0)
    assert torch.all(kwargs["y"][:, :, 1:] == 0)
    want = camera_control_input("Left", FAST["num_frames"], FAST["height"], FAST["width"], 0.1)
    assert kwargs["camera_latents"].shape == (2, 24, 2, 32, 32)
    torch.testing.assert_close(kwargs["camera_latents"], want.expand(2, -1, -1, -1, -1), atol=0, rtol=0)


def test_the_camera_move_changes_the_video(camera_pipe):
    first = P.image(4)
    common = dict(input_image=first, seed=2, output_type="pt", **FAST)
    left = camera_pipe(P.PROMPT, camera_control_direction="Left", camera_control_speed=0.2, **common)
    right = camera_pipe(P.PROMPT, camera_control_direction="Right", camera_control_speed=0.2, **common)
    again = camera_pipe(P.PROMPT, camera_control_direction="Left", camera_control_speed=0.2, **common)
    assert left.shape == (1, 3, 5, 32, 32) and (left - right).abs().max() > 1e-3
    torch.testing.assert_close(left, again, atol=0, rtol=0)


def test_bad_camera_inputs_name_the_argument(camera_pipe, tiny_repo_factory):
    first = P.image(5)
    with pytest.raises(ConfigError, match="give one"):
        camera_pipe(P.PROMPT, input_image=first, **FAST)
    with pytest.raises(ConfigError, match="pass input_image"):
        camera_pipe(P.PROMPT, camera_control_direction="Up", **FAST)
    with pytest.raises(ConfigError, match="camera_control_direction='Diagonal'"):
        camera_pipe(P.PROMPT, input_image=first, camera_control_direction="Diagonal", **FAST)
    with pytest.raises(ConfigError, match="need camera_control_direction"):
        camera_pipe(P.PROMPT, input_image=first, camera_control_speed=0.1, **FAST)
    plain = P.load(tiny_repo_factory("i2v"))
    with pytest.raises(ConfigError, match="needs a Wan Fun Control-Camera DiT"):
        plain(P.PROMPT, input_image=first, camera_control_direction="Left", **FAST)


def test_cli_camera_flags(tiny_repo_factory, tmp_path, monkeypatch):
    """`--camera-direction` / `--camera-speed` reach the pipeline as `camera_control_direction` / `..._speed`."""
    from diffsynth.runtime.media import load_video

    P.image(6).save(tmp_path / "first.png")
    flags = ["--input-image", str(tmp_path / "first.png"), "--camera-direction", "RightUp", "--camera-speed", "0.05"]
    seen, _, out = P.run_cli(tiny_repo_factory("fun_camera"), tmp_path, monkeypatch, *flags)
    assert seen["camera_control_direction"] == "RightUp" and seen["camera_control_speed"] == 0.05
    assert len(load_video(out)) == 5
