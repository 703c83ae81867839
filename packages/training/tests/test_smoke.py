"""Smoke test: the package installs and imports on its own, without any model family."""

import importlib


def test_imports_with_docstring():
    module = importlib.import_module("diffsynth.training")
    assert module.__doc__ and "DiffSynth" in module.__doc__
    assert module.__file__ is not None and module.__file__.endswith("__init__.py")


def test_public_names_resolve():
    import diffsynth.training as training

    for name in training.__all__:
        assert getattr(training, name) is not None, name
