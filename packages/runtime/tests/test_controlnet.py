"""`diffsynth.runtime.controlnet`: the step rule in both conventions, the shared input checks, the slot's units and
what a ControlNet source resolves to."""

from __future__ import annotations

import pytest
from torch import nn

from diffsynth.runtime.controlnet import ControlNetInput, ControlNetSlot, acts_at, checked_inputs, model_source
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.hub import ModelConfig


@pytest.mark.parametrize(
    ("start", "end", "steps", "active"),
    [
        (0.0, 1.0, 4, [0, 1, 2, 3]),  # diffusers' default: every step
        (0.5, 1.0, 4, [2, 3]),  # the second half
        (0.0, 0.5, 5, [0, 1]),  # (i + 1) / 5 <= 0.5
        (1.0, 0.0, 4, [0, 1, 2, 3]),  # DiffSynth-Studio's default: every step
        (1.0, 0.5, 5, [0, 1, 2]),  # progress 1, .75, .5 (then .25, 0)
        (0.6, 0.2, 6, [2, 3, 4]),  # progress 1, .8, .6, .4, .2, 0 (the 1e-4 slack keeps .6 and .2)
        (1.0, 0.0, 1, [0]),  # one step: progress 1
    ],
)
def test_acts_at_in_both_conventions(start, end, steps, active):
    assert [i for i in range(steps) if acts_at(start, end, i, steps)] == active


class Net(nn.Module):
    offload_units = ("blocks",)
    compile_units = ("blocks",)

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(2, 2)])


def test_slot_collects_each_nets_units_in_load_order():
    slot = ControlNetSlot([Net()])
    assert slot.append(Net()) == 1 and len(slot) == 2
    assert slot.offload_units == slot.compile_units == ("nets.0.blocks", "nets.1.blocks")


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ({"image": "a.png"}, r"controlnet_inputs\[0\] is a dict"),
        (ControlNetInput(controlnet_id=2), r"controlnet_id=2: 2 ControlNet"),
        (ControlNetInput(controlnet_id=True), "controlnet_id=True"),
        (ControlNetInput(scale="big"), "scale='big' must be a number"),
        (ControlNetInput(start=-0.1, end=1.0), r"must be numbers in \[0, 1\]"),
        (ControlNetInput(start="0.5", end=1.0), "start='0.5' must be a number"),
        (ControlNetInput(end=1.5), r"end=1.5 must be in \[0, 1\]"),
    ],
)
def test_checked_inputs_name_the_field(item, message):
    with pytest.raises(ConfigError, match=message):
        checked_inputs([item], 2, "load one")


@pytest.mark.parametrize("field", ["scale", "start", "end"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_checked_inputs_refuse_non_finite_numbers(field, value):
    """NaN slips past the [0, 1] range check (every comparison is False) and makes the image all NaN."""
    with pytest.raises(ConfigError, match=rf"controlnet_inputs\[1\]\.{field}={value!r} must be a finite number"):
        checked_inputs([ControlNetInput(), ControlNetInput(**{field: value})], 2, "load one")


def test_checked_inputs_take_numpy_numbers():
    """A scale or bound read from a numpy array is a number like any other."""
    np = pytest.importorskip("numpy")
    (checked,) = checked_inputs(
        [ControlNetInput(scale=np.float32(0.5), start=np.float64(0.25), end=np.int64(1))], 1, ""
    )
    assert (float(checked.scale), float(checked.start), float(checked.end)) == (0.5, 0.25, 1.0)


def _active(item: ControlNetInput, steps: int) -> list[int]:
    (checked,) = checked_inputs([item], 1, "")
    return [i for i in range(steps) if acts_at(checked.start, checked.end, i, steps)]


@pytest.mark.parametrize(
    ("item", "steps", "active"),
    [
        (ControlNetInput(), 10, list(range(10))),  # neither given: every step
        (ControlNetInput(end=0.3), 10, list(range(7))),  # DiffSynth-Studio: progress 1 down to 0.3
        (ControlNetInput(start=0.7), 10, list(range(3, 10))),  # DiffSynth-Studio: progress 0.7 down to 0
        (ControlNetInput(end=1.0), 4, [0]),  # Studio's start=1.0, end=1.0: progress 1 only
        (ControlNetInput(start=0.0, end=0.3), 10, [0, 1, 2]),  # both given: diffusers' fractions, as before
        (ControlNetInput(start=0.7, end=1.0), 10, [7, 8, 9]),
        (ControlNetInput(start=1.0, end=0.3), 10, list(range(7))),  # both given: Studio's progress, as before
        (ControlNetInput(start=0.7, end=0.0), 10, list(range(3, 10))),
    ],
)
def test_one_bound_reads_as_diffsynth_studio_and_both_as_given(item, steps, active):
    """A Studio script that sets one bound keeps Studio's meaning (the other at its default 1.0 / 0.0)."""
    assert _active(item, steps) == active


def test_bounds_not_given_are_filled_so_every_reader_gets_numbers():
    """Families and trainers read `.start` / `.end` directly (some without `checked_inputs`)."""
    assert (ControlNetInput().start, ControlNetInput().end) == (0.0, 1.0)
    assert (ControlNetInput(end=0.3).start, ControlNetInput(start=0.7).end) == (1.0, 0.0)
    assert ControlNetInput(end=0.3) == ControlNetInput(start=1.0, end=0.3)


def test_checked_inputs_accept_one_input_or_a_list_and_need_a_net():
    one = ControlNetInput(start=1.0, end=0.0)  # DiffSynth-Studio's defaults
    assert checked_inputs(one, 1, "") == [one] and checked_inputs(None, 0, "") == []
    with pytest.raises(ConfigError, match="no ControlNet is loaded: load one"):
        checked_inputs([one], 0, "load one")


def test_model_source(tmp_path):
    given = ModelConfig(path="x")
    assert model_source(given, "controlnet", lambda repo: None, "") is given
    assert model_source(tmp_path, "controlnet", lambda repo: None, "").path == str(tmp_path)
    repo = model_source("Org/Net", "controlnet", lambda repo: "model.safetensors", "")
    assert (repo.model_id, repo.origin_file_pattern) == ("Org/Net", "model.safetensors")
    with pytest.raises(ConfigError, match="controlnet='Org/Unknown' is neither .* nor a known repo"):
        model_source("Org/Unknown", "controlnet", lambda repo: None, "a known repo")
    with pytest.raises(ConfigError, match="must be a path, a hub repo id or a ModelConfig"):
        model_source(3, "controlnet", lambda repo: None, "")


def test_a_copied_input_acts_as_its_original():
    """`dataclasses.replace` passes the filled-in bounds back as if both were given: Studio's `end=1.0` alone (the
    first step only) must stay accepted and act at the same steps."""
    import dataclasses

    one = ControlNetInput(end=1.0)
    copy = dataclasses.replace(one, scale=0.5)
    assert checked_inputs([one, copy], 1, "") == [one, copy]
    steps = [[acts_at(item.start, item.end, i, 10) for i in range(10)] for item in (one, copy)]
    assert steps[0] == steps[1] == [True] + [False] * 9
