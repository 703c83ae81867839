"""SigLIP2-G384 and DINOv3-7B (the i2L image encoders) against transformers' own models and processors.

Tiny configs with seeded random weights, written in the released files' layouts and loaded through our specs;
the released sizes are checked on the meta device against transformers' classes built from DiffSynth-Studio's
configs. The DINOv3 processor comparison needs torchvision (transformers' DINOv3 processor has no PIL backend)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from diffsynth.runtime.errors import CheckpointError, ConfigError, UnknownModelError
from diffsynth.runtime.loading import load_model
from diffsynth.runtime.models.image_encoders import (
    DINOV3_SPEC,
    SIGLIP_SPEC,
    DINOv3ImageEncoder,
    DINOv3ImageEncoderConfig,
    SiglipImageEncoder,
    SiglipImageEncoderConfig,
    dinov3_pixels,
    siglip_pixels,
)
from diffsynth.runtime.testing import conformance as cf
from diffsynth.runtime.testing.image_to_lora import TINY_DINOV3, TINY_SIGLIP, tiny_image_encoders
from diffsynth.runtime.testing.weights import random_weights


def picture(seed: int, size=(97, 61)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def siglip_processor(size: int):
    """transformers' SigLIP processor (PIL backend) with DiffSynth-Studio's settings."""
    from transformers import SiglipImageProcessorPil

    return SiglipImageProcessorPil(
        do_resize=True,
        size={"height": size, "width": size},
        resample=2,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


def dinov3_processor(size: int):
    """transformers' DINOv3 processor (torchvision backend) with DiffSynth-Studio's settings."""
    pytest.importorskip("torchvision", reason="transformers' DINOv3 processor needs torchvision")
    from transformers import DINOv3ViTImageProcessor

    return DINOv3ViTImageProcessor(
        size={"height": size, "width": size},
        resample=2,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )


def tiny_siglip(seed: int = 0):
    """A random transformers `SiglipVisionModel` at the tiny size."""
    from transformers import SiglipVisionModel

    return random_weights(SiglipVisionModel(SiglipImageEncoderConfig(**TINY_SIGLIP).transformers_config()), seed)


def tiny_dinov3(seed: int = 0):
    """A random transformers `DINOv3ViTModel` at the tiny size."""
    from transformers import DINOv3ViTModel

    return random_weights(DINOv3ViTModel(DINOv3ImageEncoderConfig(**TINY_DINOV3).transformers_config()), seed)


def to_transformers4(state: dict) -> dict:
    """transformers 5 DINOv3 names -> the released file's (blocks at the top, as transformers 4.56 saved them)."""
    return {k[len("model.") :] if k.startswith("model.layer.") else k: v.contiguous() for k, v in state.items()}


# ----------------------------------------------------------------------------------------- preprocessing
@pytest.mark.parametrize("size", [(97, 61), (1024, 1024)])
def test_siglip_pixels_equal_the_transformers_processor(size):
    image = picture(1, size)
    want = siglip_processor(384)(images=[image], return_tensors="pt")["pixel_values"]
    assert torch.equal(siglip_pixels([image], 384), want)


@pytest.mark.parametrize("size", [(97, 61), (1024, 1024)])
def test_dinov3_pixels_equal_the_transformers_processor(size):
    processor = dinov3_processor(224)
    image = picture(2, size)
    want = processor(images=[image], return_tensors="pt")["pixel_values"]
    assert torch.equal(dinov3_pixels([image], 224), want)


# ----------------------------------------------------------------------------------------- parity
def test_siglip_loads_the_released_layout_and_matches_transformers(tmp_path):
    reference = tiny_siglip().eval()
    for layout, prefix in (("flat", ""), ("vision_model", "vision_model.")):
        path = tmp_path / f"{layout}.safetensors"
        save_file({prefix + k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
        ours = load_model(path, specs=[SIGLIP_SPEC], config={"num_attention_heads": 2})
        assert isinstance(ours, SiglipImageEncoder) and ours.encoder_config == SiglipImageEncoderConfig(**TINY_SIGLIP)
        image = picture(3)
        pixels = siglip_processor(32)(images=[image], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            want = reference(pixel_values=pixels).pooler_output
        torch.testing.assert_close(ours.encode([image]), want, atol=1e-6, rtol=0)


def test_dinov3_loads_the_released_layout_and_matches_transformers(tmp_path):
    reference = tiny_dinov3().eval()
    path = tmp_path / "model.safetensors"
    save_file(to_transformers4(reference.state_dict()), str(path))
    ours = load_model(path, specs=[DINOV3_SPEC], config={"num_attention_heads": 2, "image_size": 32})
    assert isinstance(ours, DINOv3ImageEncoder) and ours.encoder_config == DINOv3ImageEncoderConfig(**TINY_DINOV3)
    assert ours.rope_embeddings.inv_freq.device.type == "cpu"  # rebuilt after the meta build
    image = picture(4)
    with torch.no_grad():
        want = reference(pixel_values=dinov3_pixels([image], 32)).pooler_output
    torch.testing.assert_close(ours.encode([image]), want, atol=1e-6, rtol=0)
    # the rotary frequencies stay float32 under a cast, as transformers' from_pretrained(dtype=...) keeps them
    assert ours.to(torch.bfloat16).rope_embeddings.inv_freq.dtype == torch.float32


def tiny_ours(cls, seed: int = 0):
    """Our encoder at the tiny size, random weights."""
    return tiny_image_encoders(seed)[0 if cls is SiglipImageEncoder else 1]


@pytest.mark.parametrize("cls", [SiglipImageEncoder, DINOv3ImageEncoder])
def test_encoders_pass_the_conformance_checks(cls, tmp_path):
    pixels = torch.randn(1, 3, 32, 32)

    def factory():
        return tiny_ours(cls)

    cf.check_declared_units(factory)
    cf.check_meta_load(factory, (pixels,))
    cf.check_streamed(factory, (pixels,), tmp_path, min_units=2)


# ----------------------------------------------------------------------------------------- released sizes
def test_released_sizes_have_transformers_keys_on_meta():
    """DiffSynth-Studio's configs built with transformers' classes give our keys and shapes (DINOv3's blocks
    under `model.`, the released file's `layer.N` converted), and our specs derive the released config back."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel, SiglipVisionConfig, SiglipVisionModel

    siglip = SiglipVisionConfig(
        hidden_size=1536,
        intermediate_size=6144,
        num_hidden_layers=40,
        num_attention_heads=16,
        image_size=384,
        patch_size=16,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
    )
    dinov3 = DINOv3ViTConfig(
        hidden_size=4096,
        intermediate_size=8192,
        num_hidden_layers=40,
        num_attention_heads=32,
        num_register_tokens=4,
        patch_size=16,
        layer_norm_eps=1e-5,
        hidden_act="silu",
        use_gated_mlp=True,
        query_bias=False,
        key_bias=False,
        value_bias=False,
        proj_bias=True,
        mlp_bias=True,
        rope_theta=100.0,
    )
    with torch.device("meta"):  # 8 billion parameters: never allocated
        pairs = (
            (SiglipVisionModel(siglip), SiglipImageEncoder(), SIGLIP_SPEC, SiglipImageEncoderConfig()),
            (DINOv3ViTModel(dinov3), DINOv3ImageEncoder(), DINOV3_SPEC, DINOv3ImageEncoderConfig()),
        )
        for theirs, ours, spec, released in pairs:
            want = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
            assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == want
            assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
            stored = to_transformers4(ours.state_dict()) if spec is DINOV3_SPEC else ours.state_dict()
            layout = spec.match(stored)
            assert layout is not None and spec.config_from_state(layout.to_ours(stored), None) == released


# ----------------------------------------------------------------------------------------- errors
def test_strict_loads_name_what_is_wrong(tmp_path):
    state = {k: v.contiguous() for k, v in tiny_siglip().state_dict().items()}
    missing = dict(state)
    del missing["encoder.layers.1.mlp.fc2.weight"]
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing keys .*encoder\.layers\.1\.mlp\.fc2\.weight"):
        load_model(tmp_path / "missing.safetensors", specs=[SIGLIP_SPEC], config={"num_attention_heads": 2})
    naflex = dict(state, **{"embeddings.patch_embedding.weight": torch.zeros(32, 3 * 8 * 8)})
    save_file(naflex, str(tmp_path / "naflex.safetensors"))
    with pytest.raises(CheckpointError, match="linear patch embedding"):
        load_model(tmp_path / "naflex.safetensors", specs=[SIGLIP_SPEC])
    save_file(to_transformers4(tiny_dinov3().state_dict()), str(tmp_path / "dinov3.safetensors"))
    with pytest.raises(UnknownModelError, match="siglip2_g384"):
        load_model(tmp_path / "dinov3.safetensors", specs=[SIGLIP_SPEC])
    with pytest.raises(ConfigError, match="num_attention_heads"):
        load_model(tmp_path / "dinov3.safetensors", specs=[DINOV3_SPEC], config={"num_attention_heads": 3})
