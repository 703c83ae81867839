"""A VAE and a DiT of different Wan generations (Wan 2.1's 16-channel VAE with Wan2.2-TI2V-5B's 48-channel DiT, or
the reverse) are refused when loading, naming both files and the VAE to use, instead of failing at the call with
advice about `y`."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.hub import ModelConfig
from diffsynth.wan.pipeline import WanVideoPipeline

from . import conftest as C


def load(dit_repo: Path, vae_file: Path) -> WanVideoPipeline:
    files = [dit_repo / "diffusion_pytorch_model.safetensors", dit_repo / C.T5_FILE, vae_file]
    return WanVideoPipeline.from_pretrained(
        model_configs=[ModelConfig(path=str(f)) for f in files],
        tokenizer_config=ModelConfig(path=str(dit_repo / C.TOKENIZER_DIR)), torch_dtype="float32", device="cpu",
    )  # fmt: skip


def test_wan21_vae_with_ti2v_dit_is_refused(tiny_repo_factory):
    ti2v, t2v = tiny_repo_factory("ti2v"), tiny_repo_factory("t2v")
    with pytest.raises(ConfigError, match=r"Wan 2\.1's \(16 latent channels\).*48-channel.*Wan2\.2_VAE\.pth") as info:
        load(ti2v, t2v / "Wan2.1_VAE.pth")
    assert "Wan2.1_VAE.pth" in str(info.value) and str(ti2v / "diffusion_pytorch_model.safetensors") in str(info.value)


def test_wan22_vae_with_wan21_dit_is_refused(tiny_repo_factory):
    ti2v, t2v = tiny_repo_factory("ti2v"), tiny_repo_factory("t2v")
    with pytest.raises(ConfigError, match=r"Wan 2\.2's \(48 latent channels\).*16-channel.*Wan2\.1_VAE\.pth"):
        load(t2v, ti2v / "Wan2.2_VAE.pth")


def test_matching_vae_loads(tiny_repo_factory):
    ti2v = tiny_repo_factory("ti2v")
    pipe = load(ti2v, ti2v / "Wan2.2_VAE.pth")
    assert pipe.vae.z_dim == pipe.dit.config.out_dim == 48
