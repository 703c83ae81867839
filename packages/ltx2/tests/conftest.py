"""Loads `ltx2_repo.py` as the module `diffsynth_ltx2_test_repo` and `release_checks.py` as
`diffsynth_ltx2_release_checks` (test modules cannot import each other), and builds the tiny random LTX-2
model base once per session."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest


def _load(name: str, filename: str):
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(filename))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


ltx2_repo = _load("diffsynth_ltx2_test_repo", "ltx2_repo.py")
_load("diffsynth_ltx2_release_checks", "release_checks.py")


@pytest.fixture(scope="session")
def tiny_ltx2_base(tmp_path_factory) -> Path:
    """A model base holding a tiny `Lightricks/LTX-2` single file and Gemma repo (see `ltx2_repo.py`)."""
    return ltx2_repo.build_tiny_base(tmp_path_factory.mktemp("tiny-ltx2-models"))


@pytest.fixture(scope="session")
def tiny_ltx2_pipe(tiny_ltx2_base):
    return ltx2_repo.our_pipeline(tiny_ltx2_base)
