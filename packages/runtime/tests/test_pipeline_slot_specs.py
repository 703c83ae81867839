"""`BasePipeline.slot_specs`: a recognised model whose spec a slot does not take (another family's VAE or DiT of
the same role) is refused by name when loading, not left to fail in the call; an unlisted slot takes any spec."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import pytest
import torch
from safetensors.torch import save_file

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.models.wan_vae import WanVAE, WanVAEConfig
from diffsynth.runtime.pipeline import BasePipeline


class ImageVAEPipeline(BasePipeline):
    """A toy pipeline whose VAE slot takes only the image AutoencoderKL."""

    model_slots: ClassVar[dict[str, str]] = {"vae": "vae"}
    slot_specs: ClassVar[dict[str, tuple[str, ...]]] = {"vae": ("autoencoder_kl",)}


class AnyVAEPipeline(BasePipeline):
    """The same slot, unchecked (no `slot_specs`): third-party pipelines keep loading what they did."""

    model_slots: ClassVar[dict[str, str]] = {"vae": "vae"}


@pytest.fixture(scope="module")
def wan_vae_file(tmp_path_factory) -> Path:
    """A small Wan 2.1 VAE file (recognised as `wan21_vae`), random weights."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("wan_vae") / "vae.safetensors"
    state = WanVAE(WanVAEConfig(base_dim=8)).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def test_a_model_of_a_spec_the_slot_does_not_take_is_named(wan_vae_file):
    with pytest.raises(ConfigError) as info:
        ImageVAEPipeline.from_pretrained([ModelConfig(path=str(wan_vae_file))], device="cpu", torch_dtype="float32")
    message = str(info.value)
    assert str(wan_vae_file) in message and "wan21_vae" in message and "(family runtime)" in message
    assert "ImageVAEPipeline's vae slot takes autoencoder_kl" in message


def test_a_slot_without_specs_takes_any_model_of_its_role(wan_vae_file):
    pipe = AnyVAEPipeline.from_pretrained([ModelConfig(path=str(wan_vae_file))], device="cpu", torch_dtype="float32")
    assert isinstance(pipe.vae, WanVAE)
