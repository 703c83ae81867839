"""Fixtures of the trainer's tests: loads `toy.py` as the module `diffsynth_training_toy` (test modules import
the toy task and dataset writers from it), and a small image dataset."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest


def _load_toy():
    name = "diffsynth_training_toy"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("toy.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


toy = _load_toy()


@pytest.fixture
def dataset(tmp_path) -> Path:
    """Six images in two buckets: four 64x64 and two 128x64 (width x height)."""
    return toy.write_dataset(tmp_path / "data", [(64, 64)] * 4 + [(128, 64)] * 2)
