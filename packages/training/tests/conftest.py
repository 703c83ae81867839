"""Fixtures of the trainer's tests: loads `toy.py` as the module `diffsynth_training_toy` (test modules import
the toy task and dataset writers from it), a small image dataset, and the z-image tests' tiny repo with a captioned
dataset for the trainer tests that run a real family (skipped where diffsynth-z-image is not installed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffsynth.runtime.testing.modules import load_beside

toy = load_beside(__file__, "toy.py", "diffsynth_training_toy")


@pytest.fixture
def dataset(tmp_path) -> Path:
    """Six images in two buckets: four 64x64 and two 128x64 (width x height)."""
    return toy.write_dataset(tmp_path / "data", [(64, 64)] * 4 + [(128, 64)] * 2)


@pytest.fixture
def encoded_prompts(monkeypatch) -> list[list[str]]:
    """The prompts the toy task encodes, one list per `encode` call (each micro-batch's, as the trainer gives them)."""
    seen: list[list[str]] = []
    encode = toy.ToyTask.encode

    def recording(self, rows):
        seen.append([row["prompt"] for row in rows])
        return encode(self, rows)

    monkeypatch.setattr(toy.ToyTask, "encode", recording)
    return seen


def _z_image_test_helpers():
    pytest.importorskip("diffsynth.z_image")
    from diffsynth.training.testing import load_module

    return load_module(Path(__file__).parents[2] / "z-image" / "tests" / "conftest.py", "z_image_tiny_repo")


@pytest.fixture(scope="module")
def z_image_repo(tmp_path_factory) -> Path:
    """The tiny random Z-Image repo of the z-image tests (hub layout: transformer/, vae/, text_encoder/, ...)."""
    return _z_image_test_helpers().build_tiny_repo(tmp_path_factory.mktemp("tiny-z-image"))


@pytest.fixture(scope="module")
def z_image_dataset(tmp_path_factory) -> Path:
    """Four noise pictures captioned with the z-image tests' captions."""
    from diffsynth.training.testing import write_caption_dataset

    captions = _z_image_test_helpers().CAPTIONS
    return write_caption_dataset(tmp_path_factory.mktemp("data"), [captions[i % 3] for i in range(4)], seed=1)
