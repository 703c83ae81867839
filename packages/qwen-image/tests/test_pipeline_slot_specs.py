"""Another family's model of a Qwen-Image role (the Z-Image DiT is a "dit" too) is refused by name when loading:
without `slot_specs` it loaded and failed in the call with a bare AttributeError."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from diffsynth.qwen_image import QwenImagePipeline
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.testing.modules import load_beside

Z_IMAGE_CONFTEST = Path(__file__).parents[2] / "z-image" / "tests" / "conftest.py"


def write_z_image_dit(folder: Path) -> Path:
    """The z-image tests' tiny random DiT (their conftest's config), as a diffusers transformer/ folder."""
    pytest.importorskip("diffsynth.z_image")
    from diffsynth.z_image.formats import DIT_SPEC

    z_image_tests = load_beside(Z_IMAGE_CONFTEST, Z_IMAGE_CONFTEST.name, "qwen_image_tests_z_image_conftest")
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(z_image_tests.DIT_CONFIG))
    torch.manual_seed(0)
    model = z_image_tests.randomize(DIT_SPEC.build(DIT_SPEC.config_from_state({}, z_image_tests.DIT_CONFIG)), 1)
    path = folder / "diffusion_pytorch_model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def test_a_z_image_dit_is_refused_by_the_qwen_image_pipeline(tmp_path, tiny_repo):
    dit = write_z_image_dit(tmp_path / "transformer")
    configs = [ModelConfig(path=str(dit)), ModelConfig(path=str(tiny_repo / "vae"))]
    with pytest.raises(ConfigError) as info:
        QwenImagePipeline.from_pretrained(configs, device="cpu", torch_dtype="float32")
    message = str(info.value)
    assert str(dit) in message and "z_image_dit model (family z_image)" in message
    assert "QwenImagePipeline's dit slot takes qwen_image_dit" in message
