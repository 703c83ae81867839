"""Loads `ltx2_repo.py` as the module `diffsynth_ltx2_test_repo` and `release_checks.py` as
`diffsynth_ltx2_release_checks` (test modules cannot import each other), and builds the tiny random LTX-2
model base once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffsynth.runtime.testing.modules import load_beside

ltx2_repo = load_beside(__file__, "ltx2_repo.py", "diffsynth_ltx2_test_repo")
load_beside(__file__, "release_checks.py", "diffsynth_ltx2_release_checks")


@pytest.fixture(scope="session")
def tiny_ltx2_base(tmp_path_factory) -> Path:
    """A model base holding a tiny `Lightricks/LTX-2` single file and Gemma repo (see `ltx2_repo.py`)."""
    return ltx2_repo.build_tiny_base(tmp_path_factory.mktemp("tiny-ltx2-models"))


@pytest.fixture(scope="session")
def tiny_ltx2_pipe(tiny_ltx2_base):
    return ltx2_repo.our_pipeline(tiny_ltx2_base)


@pytest.fixture(scope="session")
def tiny_ltx23_base(tmp_path_factory) -> Path:
    """A model base holding a tiny `Lightricks/LTX-2.3` single file and its Gemma repo (see `ltx2_repo.py`)."""
    return ltx2_repo.build_tiny_base(tmp_path_factory.mktemp("tiny-ltx23-models"), version="2.3")


@pytest.fixture(scope="session")
def tiny_ltx23_pipe(tiny_ltx23_base):
    return ltx2_repo.our_pipeline(tiny_ltx23_base, version="2.3")
