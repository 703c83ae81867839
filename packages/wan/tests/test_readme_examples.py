"""This package's README examples name things that exist (`diffsynth.runtime.testing.readme`): imports, presets,
pipeline arguments and methods, `diffsynth` / `diffsynth-train` flags. What needs a package that is not installed
here (e.g. `diffsynth-train` lines without diffsynth-training) is skipped by the checker, not failed."""

from __future__ import annotations

from pathlib import Path

from diffsynth.runtime.testing.readme import check_file

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_examples():
    report = check_file(README, "packages/wan/README.md")
    assert not report.findings, report.text()
