"""Loads `ltx2_repo.py` as the module `diffsynth_ltx2_test_repo` (test modules cannot import each other) and
builds its tiny random LTX-2 model base once per session."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest


def _load_repo_module():
    name = "diffsynth_ltx2_test_repo"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("ltx2_repo.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


ltx2_repo = _load_repo_module()


@pytest.fixture(scope="session")
def tiny_ltx2_base(tmp_path_factory) -> Path:
    """A model base holding a tiny `Lightricks/LTX-2` single file and Gemma repo (see `ltx2_repo.py`)."""
    return ltx2_repo.build_tiny_base(tmp_path_factory.mktemp("tiny-ltx2-models"))


@pytest.fixture(scope="session")
def tiny_ltx2_pipe(tiny_ltx2_base):
    return ltx2_repo.our_pipeline(tiny_ltx2_base)
