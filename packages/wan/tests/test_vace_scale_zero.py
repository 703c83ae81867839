"""`vace_scale` 0 (one number, or 0 for every VACE layer) is the plain call, bit for bit: no VACE input is encoded,
and reference images add no latent frame (DiffSynth-Studio would still denoise them, moving the noise)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch


def _beside(name: str):
    spec = importlib.util.spec_from_file_location(f"wan_vace0_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


P = _beside("test_pipeline")
FAST = dict(P.FAST, output_type="pt")


@pytest.fixture(scope="module")
def vace_pipe(tiny_repo_factory):
    return P.load(tiny_repo_factory("vace"))


@pytest.mark.parametrize("scale", [0.0, 0, (0.0, 0.0)], ids=["zero", "int", "per-layer"])
def test_zero_scale_with_references_is_the_plain_call(vace_pipe, scale):
    plain = vace_pipe(P.PROMPT, seed=0, **FAST)
    with P.Calls(vace_pipe.dit) as calls:
        off = vace_pipe(P.PROMPT, seed=0, vace_reference_image=P.image(5), vace_scale=scale, **FAST)
    assert calls[0][1][0].shape == P.NOISE_SHAPE and calls[0][2].get("vace_context") is None
    torch.testing.assert_close(off, plain, atol=0, rtol=0)
    video = [P.image(i) for i in range(FAST["num_frames"])]
    both = vace_pipe(P.PROMPT, seed=0, vace_video=video, vace_reference_image=P.image(6), vace_scale=scale, **FAST)
    torch.testing.assert_close(both, plain, atol=0, rtol=0)


def test_a_nonzero_layer_scale_keeps_the_references(vace_pipe):
    with P.Calls(vace_pipe.dit) as calls:
        vace_pipe(P.PROMPT, seed=0, vace_reference_image=P.image(5), vace_scale=(0.0, 0.5), **FAST)
    assert calls[0][1][0].shape[2] == P.NOISE_SHAPE[2] + 1  # the reference's latent frame leads
