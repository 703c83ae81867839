"""Smoke test (also run by the isolation session): the family installs alone, is discoverable, its DiT runs."""

import importlib

import torch


def test_imports_with_docstring():
    module = importlib.import_module("diffsynth.qwen_image")
    assert module.__doc__ and "DiffSynth" in module.__doc__
    assert module.__file__ is not None and module.__file__.endswith("__init__.py")


def test_family_is_discoverable_and_a_tiny_dit_runs():
    from diffsynth.qwen_image.dit import QwenImageDiT, QwenImageDiTConfig
    from diffsynth.runtime.registry import installed_families

    assert "qwen_image_dit" in [spec.name for spec in installed_families()["qwen_image"].specs]
    config = QwenImageDiTConfig(
        in_channels=16,
        out_channels=4,
        num_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=8,
        axes_dims_rope=(4, 6, 6),
    )
    torch.manual_seed(0)
    model = QwenImageDiT(config).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 16, 16), torch.tensor([0.5]), torch.randn(1, 5, 8), None, [(1, 4, 4)])
    assert out.shape == (1, 16, 16) and torch.isfinite(out).all()


def test_studio_import_changes_in_one_line():
    """Studio's `from diffsynth.pipelines.qwen_image import QwenImagePipeline, ModelConfig` becomes
    `from diffsynth.qwen_image import QwenImagePipeline, ModelConfig`: the runtime's ModelConfig, re-exported."""
    from diffsynth.runtime import ModelConfig

    family = importlib.import_module("diffsynth.qwen_image")
    assert family.ModelConfig is ModelConfig and "ModelConfig" in family.__all__
