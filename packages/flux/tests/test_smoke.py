"""Smoke test (also run by the isolation session): the family installs alone, is discoverable, its DiT runs."""

import importlib

import torch


def test_imports_with_docstring():
    module = importlib.import_module("diffsynth.flux")
    assert module.__doc__ and "DiffSynth" in module.__doc__
    assert module.__file__ is not None and module.__file__.endswith("__init__.py")


def test_family_is_discoverable_and_a_tiny_dit_runs():
    from diffsynth.flux.flux1 import Flux1DiT, Flux1DiTConfig
    from diffsynth.runtime.registry import installed_families

    assert "flux1_dit" in [spec.name for spec in installed_families()["flux"].specs]
    config = Flux1DiTConfig(
        in_channels=16,
        out_channels=16,
        hidden_size=32,
        num_heads=2,
        depth=1,
        depth_single_blocks=1,
        context_in_dim=8,
        vec_in_dim=8,
        axes_dim=(4, 6, 6),
    )
    torch.manual_seed(0)
    model = Flux1DiT(config).eval()
    img, txt = torch.randn(1, 4, 16), torch.randn(1, 3, 8)
    ids = torch.zeros(4, 3)
    ids[:, 1], ids[:, 2] = torch.tensor([0.0, 0, 1, 1]), torch.tensor([0.0, 1, 0, 1])
    with torch.no_grad():
        out = model(img, ids, txt, torch.zeros(3, 3), torch.tensor([0.5]), torch.randn(1, 8), torch.tensor([3.5]))
    assert out.shape == (1, 4, 16) and torch.isfinite(out).all()


def test_flux2_family_is_discoverable_beside_flux1():
    from diffsynth.flux import Flux2ImagePipeline
    from diffsynth.runtime.registry import find_preset, installed_families

    family = installed_families()["flux2"]
    assert {"flux2_dit", "flux2_vae", "mistral3_text_encoder"} <= {spec.name for spec in family.specs}
    assert family.pipeline_class() is Flux2ImagePipeline
    found, preset = find_preset("black-forest-labs/FLUX.2-klein-4B")
    assert found is family and preset.defaults["num_inference_steps"] == 4


def test_studio_import_changes_in_one_line():
    """DiffSynth-Studio's `from diffsynth.pipelines.flux_image import FluxImagePipeline, ModelConfig` becomes
    `from diffsynth.flux import FluxImagePipeline, ModelConfig`: the family re-exports the runtime's ModelConfig."""
    from diffsynth.runtime import ModelConfig

    family = importlib.import_module("diffsynth.flux")
    assert family.ModelConfig is ModelConfig and "ModelConfig" in family.__all__
