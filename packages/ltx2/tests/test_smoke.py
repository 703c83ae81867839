"""Smoke test (also run by the isolation session): the package installs and imports on its own, and its family
is discoverable with the six LTX-2 models and the pipeline."""

import importlib


def test_imports_with_docstring():
    module = importlib.import_module("diffsynth.ltx2")
    assert module.__doc__ and "DiffSynth" in module.__doc__
    assert module.__file__ is not None and module.__file__.endswith("__init__.py")


def test_family_is_discoverable():
    from diffsynth.ltx2 import LTX2Pipeline
    from diffsynth.runtime.registry import find_preset, installed_families

    family = installed_families()["ltx2"]
    roles = {"dit", "connectors", "vae", "audio_vae", "vocoder", "text_encoder", "upsampler", "duration_head"}
    roles |= {"diffusion_decoder"}  # LTX-2.5's
    assert {spec.role for spec in family.specs} == roles
    assert family.pipeline_class() is LTX2Pipeline
    found, preset = find_preset("Lightricks/LTX-2")
    assert found is family and preset.defaults["num_frames"] == 121


def test_studio_import_changes_in_one_line():
    """Studio's `from diffsynth.pipelines.ltx2_audio_video import LTX2AudioVideoPipeline, ModelConfig` becomes
    `from diffsynth.ltx2 import LTX2AudioVideoPipeline, ModelConfig`: the runtime's ModelConfig, re-exported."""
    from diffsynth.runtime import ModelConfig

    family = importlib.import_module("diffsynth.ltx2")
    assert family.ModelConfig is ModelConfig and "ModelConfig" in family.__all__
    from diffsynth.ltx2 import LTX2Pipeline

    assert family.LTX2AudioVideoPipeline is LTX2Pipeline  # DiffSynth-Studio's name
    assert "LTX2AudioVideoPipeline" in family.__all__
