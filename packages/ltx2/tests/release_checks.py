"""Checks every LTX-2 component's tests make against the released key lists in `data/` (loaded by conftest
as `diffsynth_ltx2_release_checks`: test modules cannot import each other): meta tensors of a released file,
the diffusers layout converted to ours and back, and the released shapes giving the default config."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from diffsynth.runtime.loading import load_model, recognise

DATA = Path(__file__).parent / "data"


def released_meta(name: str, prefix: str | None = None) -> dict[str, torch.Tensor]:
    """Meta tensors of `data/<name>.json` (every key and shape of a released file), only `prefix`'s if given."""
    shapes = json.loads((DATA / f"{name}.json").read_text())
    if prefix is not None:
        shapes = {k: v for k, v in shapes.items() if k.startswith(prefix)}
    return {k: torch.empty(v, device="meta") for k, v in shapes.items()}


def shapes(state) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def assert_diffusers_round_trip(model_cls, diffusers_name: str, diffusers_to_ours, ours_to_diffusers) -> None:
    """The released diffusers keys convert to exactly our default model's keys and shapes, and back."""
    theirs = released_meta(diffusers_name)
    with torch.device("meta"):
        ours = shapes(model_cls().state_dict())
    converted = diffusers_to_ours(theirs)
    assert shapes(converted) == ours
    assert shapes(ours_to_diffusers(converted)) == shapes(theirs)


def assert_default_config_from(state, spec, layout: str, config_from_state, model_cls, config_cls) -> None:
    """`state` (released meta tensors) is recognised whole in `layout`, its shapes give the default config, and
    the runtime loader builds the default model from it."""
    (found,) = recognise(state, specs=[spec])
    assert found.layout.name == layout and len(found.keys) == len(state)
    assert config_from_state(found.layout.to_ours(state)) == config_cls()
    model = load_model(state, specs=[spec])
    assert isinstance(model, model_cls) and model.config == config_cls()
