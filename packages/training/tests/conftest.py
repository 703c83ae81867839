"""Fixtures of the trainer's tests: loads `toy.py` as the module `diffsynth_training_toy` (test modules import
the toy task and dataset writers from it), and a small image dataset."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffsynth.runtime.testing.modules import load_beside

toy = load_beside(__file__, "toy.py", "diffsynth_training_toy")


@pytest.fixture
def dataset(tmp_path) -> Path:
    """Six images in two buckets: four 64x64 and two 128x64 (width x height)."""
    return toy.write_dataset(tmp_path / "data", [(64, 64)] * 4 + [(128, 64)] * 2)
