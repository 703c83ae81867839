"""Managed == unmanaged on CPU for the models that declare offload units (Z-Image DiT, AutoencoderKL, Qwen3).

Streaming from cpu and reading units from disk move the same float32 bytes, so outputs (and input
gradients) must be bit-identical. fp8 storage must equal the unmanaged model whose unit matrices
went through the same fp8 round trip (the manager adds nothing on top of the rounding); against the
float32 model the error is the rounding itself, propagated: per weight ~2.6% RMS for e4m3 (bounded
per element by 2^-4, see test_vram_storage), amplified by these tiny random models to about 10% of
the output norm, so the sanity bound below is 0.25.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from diffsynth.runtime.testing.weights import random_weights
from diffsynth.runtime.vram import enable_vram_management, find_units, quantize

E4M3 = torch.float8_e4m3fn
STREAM = {"offload_device": "cpu", "onload_device": "cpu"}
DISK = {"offload_device": "disk", "onload_device": "disk"}
FP8 = {"offload_device": "cpu", "preparing_dtype": "float8_e4m3fn"}


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    return random_weights(model, seed).eval().requires_grad_(False)


# ----------------------------------------------------------------------------------- the three models
def dit():
    pytest.importorskip("diffsynth.z_image")
    from diffsynth.z_image.dit import ZImageDiT, ZImageDiTConfig

    config = ZImageDiTConfig(
        in_channels=4, dim=64, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32,
        axes_dims=(8, 12, 12), axes_lens=(256, 64, 64),
    )  # fmt: skip
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 8, 10, generator=g), torch.rand(2, generator=g)
    text = [torch.randn(7, 32, generator=g), torch.randn(40, 32, generator=g)]
    return (lambda: randomize(ZImageDiT(config), 0)), (lambda m, x: m(x, t, text)), x


def vae():
    from diffsynth.runtime.models.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig

    config = AutoencoderKLConfig(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4)
    image = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    return (lambda: randomize(AutoencoderKL(config), 0)), (lambda m, x: m(x)), image


def qwen3():
    from transformers import Qwen3Config

    from diffsynth.runtime.models.qwen3 import Qwen3TextEncoder

    config = Qwen3Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=128, tie_word_embeddings=True,
    )  # fmt: skip
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    return (
        (lambda: randomize(Qwen3TextEncoder(config), 0)),
        (lambda m, x: m.hidden_states_at(x, mask, indices=(-2,))[0]),
        ids,
    )


MODELS = {"z_image_dit": dit, "autoencoder_kl": vae, "qwen3": qwen3}


def fp8_rounded(model: torch.nn.Module) -> torch.nn.Module:
    """The unmanaged model with every unit matrix replaced by its fp8 round trip."""
    with torch.no_grad():
        for _, unit in find_units(model):
            for p in unit.parameters():
                if p.dim() >= 2:
                    p.copy_(quantize(p, E4M3).dequantize(p.dtype))
    return model


def save(model: torch.nn.Module, path, prefix: str = "") -> str:
    save_file({prefix + k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


@pytest.mark.parametrize("kind", list(MODELS))
def test_streamed_disk_and_fp8_equal_their_references(kind, tmp_path):
    factory, call, x = MODELS[kind]()
    reference = call(factory(), x)

    model = factory()
    handle = enable_vram_management(model, STREAM, vram_limit=0, device="cpu")
    assert handle.plan.resident == () and len(handle.units) >= 3
    torch.testing.assert_close(call(model, x), reference, rtol=0, atol=0)
    report = handle.report()
    assert report.bytes_moved > 0 and report.peak_in_flight <= 2

    model = factory()
    path = save(model, tmp_path / "model.safetensors", prefix="model." if kind == "qwen3" else "")
    handle = enable_vram_management(model, DISK, vram_limit=0, device="cpu", checkpoint=[path])
    torch.testing.assert_close(call(model, x), reference, rtol=0, atol=0)
    handle.park()
    handle.activate()
    torch.testing.assert_close(call(model, x), reference, rtol=0, atol=0)

    model = factory()
    enable_vram_management(model, FP8, device="cpu")
    out = call(model, x)
    torch.testing.assert_close(out, call(fp8_rounded(factory()), x), rtol=0, atol=1e-6)
    assert ((out - reference).norm() / reference.norm()) < 0.25


@pytest.mark.parametrize("kind", ["z_image_dit", "autoencoder_kl"])
def test_backward_through_a_frozen_streamed_model_gives_the_same_input_gradients(kind):
    factory, call, x = MODELS[kind]()
    want = x.clone().requires_grad_(True)
    call(factory(), want).square().mean().backward()
    for config in (STREAM, FP8):
        model = factory()
        enable_vram_management(model, config, vram_limit=0, device="cpu")
        got = x.clone().requires_grad_(True)
        call(model, got).square().mean().backward()
        if config is STREAM:
            torch.testing.assert_close(got.grad, want.grad, rtol=0, atol=0)
        else:
            reference = x.clone().requires_grad_(True)
            call(fp8_rounded(factory()), reference).square().mean().backward()
            torch.testing.assert_close(got.grad, reference.grad, rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_and_fp8_matmul_on_the_dit():
    factory, call, x = dit()
    reference = factory()
    reference.gradient_checkpointing = True
    want = x.clone().requires_grad_(True)
    call(reference, want).square().mean().backward()
    model = factory()
    model.gradient_checkpointing = True
    enable_vram_management(model, STREAM, vram_limit=0, device="cpu")
    got = x.clone().requires_grad_(True)
    call(model, got).square().mean().backward()
    torch.testing.assert_close(got.grad, want.grad, rtol=0, atol=0)

    # fp8 matmuls (torch._scaled_mm, CPU kernel here): the input rounding adds to the weight rounding
    model = factory()
    handle = enable_vram_management(model, {"computation_dtype": "float8_e4m3fn"}, device="cpu", dtype=torch.float32)
    assert any(t.fp8_matmul for u in handle.units for t in u.targets)
    out = call(model, x)
    stored = call(fp8_rounded(factory()), x)
    assert ((out - stored).norm() / stored.norm()) < 0.25


def test_unfused_lora_on_managed_dit_layers():
    from diffsynth.runtime.lora import load_lora

    factory, call, x = dit()
    g = torch.Generator().manual_seed(5)
    lora = {}
    for name in ("layers.0.attention.to_q", "noise_refiner.0.feed_forward.w1"):
        lora[f"{name}.lora_A.weight"] = 0.1 * torch.randn(4, 64, generator=g)
        lora[f"{name}.lora_B.weight"] = 0.1 * torch.randn(64 if "to_q" in name else 170, 4, generator=g)
    reference = factory()
    load_lora(reference, dict(lora), fuse=False)
    model = factory()
    enable_vram_management(model, STREAM, vram_limit=0, device="cpu")
    load_lora(model, dict(lora), fuse=False)
    torch.testing.assert_close(call(model, x), call(reference, x), rtol=0, atol=0)
