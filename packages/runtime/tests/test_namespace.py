"""`diffsynth` is a PEP 420 namespace shared by every package: nobody may own it."""

from pathlib import Path

import diffsynth
import diffsynth.runtime

REPO = Path(__file__).resolve().parents[3]


def test_no_package_defines_the_namespace():
    stray = sorted(REPO.glob("packages/*/src/diffsynth/__init__.py"))
    assert stray == [], f"{stray} would break the diffsynth namespace"


def test_diffsynth_is_a_namespace_package():
    assert getattr(diffsynth, "__file__", None) is None
    assert diffsynth.runtime.__file__.endswith("__init__.py")
