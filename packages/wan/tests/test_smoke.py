"""Smoke test (also run by the isolation session): the family installs, loads a tiny hub-style repo and
draws a short video."""

import importlib

import numpy as np


def test_family_is_discoverable():
    from diffsynth.runtime.registry import installed_families
    from diffsynth.wan import WanVideoPipeline

    module = importlib.import_module("diffsynth.wan")
    assert module.__doc__ and "DiffSynth" in module.__doc__
    family = installed_families()["wan"]
    assert "Wan-AI/Wan2.1-T2V-1.3B" in family.presets and "Wan-AI/Wan2.2-T2V-A14B" in family.presets
    assert family.pipeline_class() is WanVideoPipeline
    assert {"dit", "text_encoder", "image_encoder"} <= {spec.role for spec in family.specs}


def test_tiny_repo_generates_a_video(tiny_repo):
    from diffsynth.wan import WanVideoPipeline

    pipe = WanVideoPipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu")
    frames = pipe(
        "a red circle on a blue background",
        height=32,
        width=32,
        num_frames=5,
        num_inference_steps=2,
        cfg_scale=1.0,
        seed=0,
        progress_bar=False,
    )
    assert len(frames) == 5 and all(f.size == (32, 32) for f in frames)
    pixels = np.stack([np.asarray(f) for f in frames])
    assert pixels.dtype == np.uint8 and pixels.std() > 0


def test_studio_import_changes_in_one_line():
    """DiffSynth-Studio's `from diffsynth.pipelines.wan_video import WanVideoPipeline, ModelConfig` becomes
    `from diffsynth.wan import WanVideoPipeline, ModelConfig`: the family re-exports the runtime's ModelConfig."""
    from diffsynth.runtime import ModelConfig

    family = importlib.import_module("diffsynth.wan")
    assert family.ModelConfig is ModelConfig and "ModelConfig" in family.__all__
