"""Smoke test: the package installs and imports on its own (its models are not built yet)."""

import importlib


def test_imports_with_docstring():
    module = importlib.import_module("diffsynth.training")
    assert module.__doc__ and "DiffSynth" in module.__doc__
    assert module.__file__ is not None and module.__file__.endswith("__init__.py")
