"""Control-Camera's `camera_control_*` arguments are checked by name before any model runs: the origin is a pose of
19 real numbers, the speed a number, and the direction names at least one move ("" would be a static camera)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from diffsynth.runtime.errors import ConfigError
from diffsynth.wan.camera import DEFAULT_ORIGIN, camera_control_input, check_direction, check_origin


def _beside(name: str):
    spec = importlib.util.spec_from_file_location(f"wan_camargs_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


P = _beside("test_pipeline")
BAD_ORIGINS = [["a"] * 19, [[0.0] * 19], 0.5, "0" * 19, [0.0] * 18, [*DEFAULT_ORIGIN[:-1], True], [float("nan")] * 19]


@pytest.fixture(scope="module")
def camera_pipe(tiny_repo_factory):
    return P.load(tiny_repo_factory("fun_camera"))


@pytest.mark.parametrize("origin", BAD_ORIGINS, ids=range(len(BAD_ORIGINS)))
def test_bad_origins_are_refused_by_name(origin):
    with pytest.raises(ConfigError, match="camera_control_origin.* a pose has 19|give a pose of 19 numbers"):
        check_origin(origin)


def test_origins_as_arrays_and_the_default():
    assert check_origin(None) == tuple(float(v) for v in DEFAULT_ORIGIN)
    assert check_origin(np.array(DEFAULT_ORIGIN)) == check_origin(list(DEFAULT_ORIGIN))
    assert check_origin(torch.tensor(DEFAULT_ORIGIN, dtype=torch.float64)) == check_origin(DEFAULT_ORIGIN)
    torch.testing.assert_close(
        camera_control_input("Left", 5, 8, 8, origin=np.array(DEFAULT_ORIGIN)), camera_control_input("Left", 5, 8, 8)
    )


def test_an_empty_direction_names_no_move():
    with pytest.raises(ConfigError, match="camera_control_direction=''"):
        check_direction("")


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (dict(camera_control_origin=["a"] * 19), "camera_control_origin="),
        (dict(camera_control_origin=[[0.0] * 19]), "camera_control_origin="),
        (dict(camera_control_origin=0.5), "camera_control_origin=0.5"),
        (dict(camera_control_speed="fast"), "camera_control_speed='fast'"),
        (dict(camera_control_direction=""), "camera_control_direction=''"),
    ],
)
def test_the_pipeline_refuses_them_before_any_model_runs(camera_pipe, monkeypatch, arguments, message):
    def encoder_ran(*args, **kwargs):
        raise AssertionError("a model ran before the refusal")

    monkeypatch.setattr(camera_pipe, "encode_prompt", encoder_ran)
    call = dict(input_image=P.image(1), seed=0, camera_control_direction="Left", **P.FAST)
    with pytest.raises(ConfigError, match=message):
        camera_pipe(P.PROMPT, **{**call, **arguments})
