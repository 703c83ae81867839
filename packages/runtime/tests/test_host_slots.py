"""`models_kept_on_host`: a pipeline loaded inside leaves the named slots in CPU memory exactly as loaded (never
moved with `.to`, no VRAM handle) and places the other models as it always does, with or without VRAM settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from diffsynth.runtime.pipeline import BasePipeline
from diffsynth.runtime.testing.modules import load_beside
from diffsynth.runtime.training_support import host_slots, models_kept_on_host
from diffsynth.runtime.vram import vram_handle
from diffsynth.runtime.vram.parked import ParkedWeight

pytest.importorskip("diffsynth.z_image")
from diffsynth.z_image import ZImagePipeline  # noqa: E402

helpers = load_beside(__file__, "helpers.py", "diffsynth_runtime_test_helpers")


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory) -> Path:
    return helpers.tiny_z_image_repo(tmp_path_factory.mktemp("tiny-z-image-host"))


@pytest.fixture
def moves(monkeypatch) -> list[nn.Module]:
    """Every module `.to(...)` was called on with a device while a pipeline placed its models (the loader itself
    builds each model in CPU memory first), in order."""
    called: list[nn.Module] = []
    placing = []
    to, place = nn.Module.to, BasePipeline._place_models

    def spy_to(self, *args, **kwargs):
        if placing and torch._C._nn._parse_to(*args, **kwargs)[0] is not None:
            called.append(self)
        return to(self, *args, **kwargs)

    def spy_place(self):
        placing.append(True)
        try:
            return place(self)
        finally:
            placing.clear()

    monkeypatch.setattr(nn.Module, "to", spy_to)
    monkeypatch.setattr(BasePipeline, "_place_models", spy_place)
    return called


def _moved(module: nn.Module, moves: list[nn.Module]) -> bool:
    inside = {id(m) for m in module.modules()}
    return any(id(m) in inside for m in moves)


def _real_cpu(module: nn.Module) -> bool:
    tensors = [*module.parameters(), *module.buffers()]
    return all(t.device.type == "cpu" and not isinstance(t, ParkedWeight) for t in tensors)


@pytest.mark.parametrize("vram_limit", [None, 1e-6], ids=["resident", "vram-managed"])
def test_kept_slot_stays_as_loaded_and_the_others_are_placed(tiny_repo, moves, vram_limit):
    reference = ZImagePipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu")
    moves.clear()
    with models_kept_on_host(["dit"]):
        assert host_slots() == {"dit"}
        pipe = ZImagePipeline.from_pretrained(
            str(tiny_repo), torch_dtype="float32", device="cpu", vram_limit=vram_limit
        )
    assert host_slots() == frozenset()

    assert not _moved(pipe.dit, moves) and vram_handle(pipe.dit) is None and "dit" not in pipe.vram_handles
    assert _real_cpu(pipe.dit)
    for name, value in reference.dit.state_dict().items():
        assert torch.equal(pipe.dit.state_dict()[name], value), name
    if vram_limit is None:  # as before: moved to the device, unmanaged
        assert _moved(pipe.text_encoder, moves) and _moved(pipe.vae, moves)
        assert not pipe.vram_handles and not pipe.model_offload
    else:  # as before: every other model under the VRAM manager
        assert set(pipe.vram_handles) == {"text_encoder", "vae"} and pipe.model_offload
        assert all(vram_handle(getattr(pipe, s)) is h for s, h in pipe.vram_handles.items())


def test_the_slots_apply_only_inside_and_nest():
    with models_kept_on_host(["dit"]):
        with models_kept_on_host(["vae", "text_encoder"]):
            assert host_slots() == {"vae", "text_encoder"}
        assert host_slots() == {"dit"}
    assert host_slots() == frozenset()


def test_stages_activate_a_model_managed_from_outside_instead_of_moving_it(tiny_repo):
    """A model a trainer put under the VRAM manager itself (not through the pipeline) is activated by its own
    handle when a stage needs it, and never moved with `.to` (its weights are parked placeholders)."""
    from diffsynth.runtime.vram import enable_vram_management

    pipe = ZImagePipeline.from_pretrained(str(tiny_repo), torch_dtype=torch.float32, device="cpu")
    pixels = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        want = pipe.vae.encode(pixels)
    handle = enable_vram_management(pipe.vae, {"offload_device": "cpu", "onload_device": "cpu"}, device="cpu")
    handle.park()
    assert "vae" not in pipe.vram_handles
    pipe.load_models_to_device(["vae"])
    assert handle.state == "active"
    with torch.no_grad():
        assert torch.equal(pipe.vae.encode(pixels), want)
    pipe.load_models_to_device(["dit"])  # not the pipeline's to park: left as the trainer has it
    assert handle.state == "active"
