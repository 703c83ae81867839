"""DiffSynth-Studio's Wan speed control (`motion_bucket_id`): the motion controller against DiffSynth-Studio's
module (read from its git mirror; skipped where the mirror is absent), the DiT's modulation offset, loading,
the pipeline call and bad input."""

from __future__ import annotations

import ast
import importlib
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.testing import conformance as cf
from diffsynth.wan import WanVideoPipeline
from diffsynth.wan.dit import WanDiT, WanDiTConfig
from diffsynth.wan.formats import FAMILY
from diffsynth.wan.motion_controller import (
    MOTION_CONTROLLER_SPEC,
    MotionControllerConfig,
    WanMotionController,
    config_from_state,
)
from diffsynth.wan.presets import PRESETS

from .conftest import TINY_DIT, TINY_UMT5, randomize, studio_source

PROMPT = "a red circle on a blue background"
FAST = {"height": 32, "width": 32, "num_frames": 5, "num_inference_steps": 2, "progress_bar": False}
TINY = MotionControllerConfig(freq_dim=TINY_DIT["freq_dim"], dim=TINY_DIT["dim"])


def controller(seed: int = 11, config: MotionControllerConfig = TINY) -> WanMotionController:
    return randomize(WanMotionController(config), seed).eval()


def tiny_dit(seed: int = 1) -> WanDiT:
    fields = dict(TINY_DIT, in_dim=16, out_dim=16, text_dim=TINY_UMT5["d_model"], model_type="t2v")
    return randomize(WanDiT(WanDiTConfig(**fields)), seed).eval()


# ----------------------------------------------------------------------------------------- DiffSynth-Studio's
@pytest.fixture(scope="module")
def studio_controller(tmp_path_factory):
    """DiffSynth-Studio's `WanMotionControllerModel`, with the one helper it imports from its Wan DiT module
    (`sinusoidal_embedding_1d`, taken from that file) in a package of its own."""
    dit_source = studio_source("diffsynth/models/wan_video_dit.py")
    helper = next(
        node
        for node in ast.parse(dit_source).body
        if isinstance(node, ast.FunctionDef) and node.name == "sinusoidal_embedding_1d"
    )
    root = tmp_path_factory.mktemp("studio-speed-control")
    pkg = root / "studio_speed_ref"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "wan_video_dit.py").write_text("import torch\n\n" + ast.get_source_segment(dit_source, helper) + "\n")
    (pkg / "wan_video_motion_controller.py").write_text(
        studio_source("diffsynth/models/wan_video_motion_controller.py")
    )
    sys.path.insert(0, str(root))
    try:
        yield importlib.import_module("studio_speed_ref.wan_video_motion_controller").WanMotionControllerModel
    finally:
        sys.path.remove(str(root))


def test_controller_matches_diffsynth_studio(studio_controller):
    ours = controller()
    theirs = studio_controller(freq_dim=TINY.freq_dim, dim=TINY.dim).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)  # the file's keys are the module's
    ids = torch.tensor([0.0, 37.0, 100.0])
    with torch.no_grad():
        want = theirs(ids).unflatten(1, (6, TINY.dim))  # as DiffSynth-Studio's model_fn adds it
        got = ours(ids)
    assert got.shape == (3, 6, TINY.dim)
    # they embed in float64 and cast, we in float32: 4e-6 apart here
    assert (got - want).abs().max() < 5e-5, (got - want).abs().max()


# ----------------------------------------------------------------------------------------- the DiT's offset
def test_offset_enters_as_the_timestep_modulation():
    """An offset is the same as shifting `time_projection`'s bias by it: it lands where the modulation does."""
    torch.manual_seed(0)
    dit, x, context = tiny_dit(), torch.randn(2, 16, 2, 4, 4), torch.randn(2, 5, TINY_UMT5["d_model"])
    offset = torch.randn(1, 6, TINY_DIT["dim"])
    shifted = tiny_dit()
    with torch.no_grad():
        shifted.time_projection[1].bias += offset.flatten()
        got = dit(x, torch.tensor([900.0, 300.0]), context, motion_modulation=offset.expand(2, -1, -1))
        want = shifted(x, torch.tensor([900.0, 300.0]), context)
        plain = dit(x, torch.tensor([900.0, 300.0]), context)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert (got - plain).abs().max() > 1e-3


def test_offset_is_per_sample():
    torch.manual_seed(0)
    dit, x, context = tiny_dit(), torch.randn(2, 16, 2, 4, 4), torch.randn(2, 5, TINY_UMT5["d_model"])
    offsets = torch.randn(2, 6, TINY_DIT["dim"])
    with torch.no_grad():
        both = dit(x, torch.tensor([500.0, 500.0]), context, motion_modulation=offsets)
        first = dit(x[:1], torch.tensor([500.0]), context[:1], motion_modulation=offsets[:1])
        second = dit(x[1:], torch.tensor([500.0]), context[1:], motion_modulation=offsets[1:])
    assert torch.allclose(both, torch.cat([first, second]), atol=1e-5)


def test_offset_shape_and_per_token_timesteps_are_refused():
    dit, x, context = tiny_dit(), torch.randn(1, 16, 2, 4, 4), torch.randn(1, 5, TINY_UMT5["d_model"])
    with pytest.raises(ValueError, match=r"motion_modulation has shape \(1, 6, 8\)"):
        dit(x, torch.tensor([500.0]), context, motion_modulation=torch.zeros(1, 6, 8))
    with pytest.raises(ValueError, match="one timestep per sample"):
        dit(x, torch.full((1, 8), 500.0), context, motion_modulation=torch.zeros(1, 6, TINY_DIT["dim"]))


# ----------------------------------------------------------------------------------------- the model and its file
def test_conformance():
    cf.check_declared_units(lambda: WanMotionController(TINY))
    cf.check_meta_load(lambda: controller(), (torch.tensor([3.0, 50.0]),))
    cf.check_layout_roundtrip(lambda: controller(), MOTION_CONTROLLER_SPEC.layouts[0])
    assert cf.check_spec_config(MOTION_CONTROLLER_SPEC, lambda: WanMotionController(TINY)) == TINY
    assert MOTION_CONTROLLER_SPEC in FAMILY.specs and MOTION_CONTROLLER_SPEC.role == "motion_controller"


def test_released_size_and_bad_shapes():
    with torch.device("meta"):
        released = WanMotionController()  # DiffSynth-Studio/Wan2.1-1.3b-speedcontrol-v1: Wan2.1-T2V-1.3B's width
        state = released.state_dict()
    assert config_from_state(state) == MotionControllerConfig(freq_dim=256, dim=1536)
    assert sorted(state) == [f"linear.{i}.{p}" for i in (0, 2, 4) for p in ("bias", "weight")]
    assert tuple(state["linear.4.weight"].shape) == (6 * 1536, 1536)
    bad = dict(state, **{"linear.4.weight": torch.empty(6 * 1536, 1024, device="meta")})
    with pytest.raises(ConfigError, match=r"linear.4.weight has shape \(9216, 1024\)"):
        config_from_state(bad)
    with pytest.raises(ValueError, match="freq_dim=7 must be even"):
        MotionControllerConfig(freq_dim=7)


def test_preset_adds_the_controller_to_t2v_1_3b():
    preset = PRESETS["DiffSynth-Studio/Wan2.1-1.3b-speedcontrol-v1"]
    files = {(f.model_id, f.origin_file_pattern) for f in preset.files}
    base = {(f.model_id, f.origin_file_pattern) for f in PRESETS["Wan-AI/Wan2.1-T2V-1.3B"].files}
    assert files == base | {("DiffSynth-Studio/Wan2.1-1.3b-speedcontrol-v1", "model.safetensors")}


# ----------------------------------------------------------------------------------------- the pipeline
@pytest.fixture(scope="module")
def speed_repo(tiny_repo, tmp_path_factory) -> Path:
    """The tiny T2V repo with a speed-control model in a folder of its own (as DiffSynth-Studio's repo)."""
    root = tmp_path_factory.mktemp("tiny-wan-speed") / "repo"
    shutil.copytree(tiny_repo, root)
    (root / "speedcontrol").mkdir()
    save_file(dict(controller().state_dict()), str(root / "speedcontrol" / "model.safetensors"))
    return root


@pytest.fixture(scope="module")
def speed_pipe(speed_repo):
    return WanVideoPipeline.from_pretrained(str(speed_repo), torch_dtype="float32", device="cpu")


def test_motion_bucket_id_drives_the_video(speed_pipe, tiny_repo):
    assert isinstance(speed_pipe.motion_controller, WanMotionController)
    plain = WanVideoPipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu")
    base = plain(PROMPT, seed=3, output_type="pt", cfg_scale=1.0, **FAST)
    unused = speed_pipe(PROMPT, seed=3, output_type="pt", cfg_scale=1.0, **FAST)
    slow = speed_pipe(PROMPT, seed=3, output_type="pt", cfg_scale=1.0, motion_bucket_id=0, **FAST)
    fast = speed_pipe(PROMPT, seed=3, output_type="pt", cfg_scale=1.0, motion_bucket_id=100, **FAST)
    assert torch.equal(unused, base)  # loaded but not asked for: no effect, as in DiffSynth-Studio
    assert (slow - base).abs().max() > 1e-4 and (fast - slow).abs().max() > 1e-4


@pytest.mark.parametrize("cfg_merge", [False, True])
def test_both_guidance_branches_get_the_offset(speed_pipe, cfg_merge):
    seen = []
    hook = speed_pipe.dit.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs.get("motion_modulation")), with_kwargs=True
    )
    try:
        speed_pipe(PROMPT, seed=3, output_type="pt", cfg_scale=3.0, cfg_merge=cfg_merge, motion_bucket_id=42, **FAST)
    finally:
        hook.remove()
    with torch.no_grad():
        want = speed_pipe.motion_controller(torch.tensor([42.0]))
    assert len(seen) == (2 if cfg_merge else 4)  # two steps, merged or one call per branch
    for got in seen:
        assert got.shape[0] == (2 if cfg_merge else 1)
        assert torch.allclose(got.float(), want.expand_as(got), atol=1e-6)


def test_zero_initialised_controller_changes_nothing(speed_pipe):
    """DiffSynth-Studio starts training from a zeroed last layer: such a controller is the identity."""
    untrained = controller()
    with torch.no_grad():
        untrained.linear[4].weight.zero_()
        untrained.linear[4].bias.zero_()
    trained, speed_pipe.motion_controller = speed_pipe.motion_controller, untrained
    try:
        base = speed_pipe(PROMPT, seed=4, output_type="pt", cfg_scale=1.0, **FAST)
        zeroed = speed_pipe(PROMPT, seed=4, output_type="pt", cfg_scale=1.0, motion_bucket_id=100, **FAST)
    finally:
        speed_pipe.motion_controller = trained
    assert torch.equal(base, zeroed)


def test_bad_input(speed_pipe, tiny_repo):
    plain = WanVideoPipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu")
    with pytest.raises(ConfigError, match="Wan2.1-1.3b-speedcontrol-v1"):
        plain(PROMPT, seed=0, motion_bucket_id=50, **FAST)
    with pytest.raises(ConfigError, match="motion_bucket_id='fast' is not a number"):
        speed_pipe(PROMPT, seed=0, motion_bucket_id="fast", **FAST)
    loaded, speed_pipe.motion_controller = (
        speed_pipe.motion_controller,
        controller(config=MotionControllerConfig(32, 64)),
    )
    try:
        with pytest.raises(ConfigError, match="for DiTs of width 64; this DiT has dim=32"):
            speed_pipe(PROMPT, seed=0, motion_bucket_id=50, **FAST)
    finally:
        speed_pipe.motion_controller = loaded


def test_cli_motion_bucket_id(speed_repo, tiny_repo, tmp_path, capsys):
    """`--motion-bucket-id` reaches the pipeline; without the speed-control model it is refused with the fix."""
    from diffsynth.runtime.cli import main

    args = ["generate", "--prompt", PROMPT, "--device", "cpu", "--dtype", "float32", "--num-frames", "5"]
    args += ["--height", "32", "--width", "32", "--steps", "1", "--cfg", "1", "--motion-bucket-id", "100"]
    assert main([*args, "--model", str(speed_repo), "--output", str(tmp_path / "fast.mp4")]) == 0
    assert (tmp_path / "fast.mp4").stat().st_size > 0
    assert main([*args, "--model", str(tiny_repo), "--output", str(tmp_path / "none.mp4")]) == 2
    assert "motion_bucket_id needs the speed-control model" in capsys.readouterr().err
