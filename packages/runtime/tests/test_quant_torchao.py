"""torchao weight-only int8 / fp8 (`quant.py`) and `MixedQuantizeConfig`: the rounding stays within each format's
bound of the original weights, a torchao layer computes what a plain Linear holding its dequantized weights
computes, LoRAs stay apart from it and equal the LoRA on the dequantized layer, gradients reach the input, a
Z-Image pipeline loads and draws with a torchao DiT, and the parts of a mixed config quantize disjoint layers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.lora import apply_lora, list_loras
from diffsynth.runtime.quant import (
    MixedQuantizeConfig,
    QuantizeConfig,
    is_quantized_linear,
    layer_method,
    linear_weight,
    quantize_config,
)
from diffsynth.runtime.testing.modules import load_beside

pytest.importorskip("torchao")

helpers = load_beside(__file__, "helpers.py", "diffsynth_runtime_test_helpers")

INT8 = "torchao_int8_w8a16"
FP8 = "torchao_fp8_w8a16"


def tiny(dtype=torch.float32) -> nn.Module:
    return helpers.tiny(dtype)


def originals(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def test_int8_rounding_is_within_half_a_step_of_each_row():
    model = tiny()
    before = originals(model)
    QuantizeConfig(method=INT8).quantize_model(model)
    for name, weight in before.items():
        layer = model.get_submodule(name)
        assert type(layer) is nn.Linear and is_quantized_linear(layer) and layer_method(layer) == INT8
        assert layer.weight.qdata.dtype == torch.int8 and tuple(layer.weight.shape) == tuple(weight.shape)
        rounded = linear_weight(layer)
        assert rounded.dtype == weight.dtype and rounded.shape == weight.shape
        half_step = weight.abs().amax(1, keepdim=True) / 127 / 2  # symmetric per-row int8
        error = (rounded - weight).abs()
        assert (error <= half_step * (1 + 1e-5)).all(), (error / half_step).max()
        assert error.max() > 0


def test_fp8_rounding_is_within_e4m3s_relative_bound():
    model = tiny()
    before = originals(model)
    QuantizeConfig(method=FP8).quantize_model(model)
    for name, weight in before.items():
        layer = model.get_submodule(name)
        assert layer_method(layer) == FP8 and layer.weight.qdata.dtype == torch.float8_e4m3fn
        error = (linear_weight(layer) - weight).abs()
        scale = weight.abs().amax(1, keepdim=True) / 448  # e4m3's largest value
        # 3 mantissa bits: half an ulp is at most 2^-4 of the value; subnormals' step is 2^-9 of the scale
        bound = torch.maximum(weight.abs() * 2**-4, scale * 2**-10) * (1 + 1e-5)
        assert (error <= bound).all(), (error / bound).max()
        assert error.max() > 0


@pytest.mark.parametrize("method", [INT8, FP8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torchao_layers_compute_what_plain_layers_with_the_dequantized_weights_compute(method, dtype):
    model = QuantizeConfig(method=method).quantize_model(tiny(dtype))
    plain = QuantizeConfig(method=method, mode="dequant_once").quantize_model(tiny(dtype))
    assert all(type(m.weight) is nn.Parameter for m in plain.modules() if isinstance(m, nn.Linear))
    assert not any(is_quantized_linear(m) for m in plain.modules())
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    out = model(x)
    assert out.dtype == dtype
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(out, plain(x), rtol=0, atol=tol)
    reference = tiny(dtype)(x)
    assert 0 < (out - reference).abs().max() < 0.05 * reference.abs().max()
    assert quantize_config(model).method == method


def test_a_lora_on_torchao_layers_is_kept_apart_and_equals_it_on_the_dequantized_weights():
    model = QuantizeConfig(method=INT8).quantize_model(tiny())
    plain = QuantizeConfig(method=INT8, mode="dequant_once").quantize_model(tiny())
    state = helpers.lora_state(model)
    assert apply_lora(model, state, scale=0.8) is not None  # fuse=True asked: attached instead
    assert list(list_loras(model)) == ["lora_0"]
    assert model.head.weight.qdata.dtype == torch.int8  # the int8 weights are untouched
    apply_lora(plain, state, scale=0.8, fuse=False)
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(model(x), plain(x), rtol=0, atol=1e-5)
    assert (model(x) - QuantizeConfig(method=INT8).quantize_model(tiny())(x)).abs().max() > 1e-3


@pytest.mark.parametrize("method", [INT8, FP8])
def test_gradients_reach_the_input_through_frozen_torchao_layers(method):
    model = QuantizeConfig(method=method).quantize_model(tiny())
    plain = QuantizeConfig(method=method, mode="dequant_once").quantize_model(tiny())
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(3))
    grads = []
    for net in (model, plain):
        leaf = x.clone().requires_grad_(True)
        net(leaf).pow(2).sum().backward()
        grads.append(leaf.grad)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)


def test_backend_options_reach_torchao_and_unknown_ones_are_refused(monkeypatch):
    from torchao.quantization import PerGroup

    model = QuantizeConfig(method=INT8, backend_config_kwargs={"granularity": PerGroup(32)}).quantize_model(tiny())
    assert list(model.head.weight.scale.shape) == [32, 2]  # two groups of 32 per row
    with pytest.raises(ConfigError, match=r"torchao_int8_w8a16\) backend_config_kwargs .*torchao says: .*PerGroup"):
        QuantizeConfig(method=INT8, backend_config_kwargs={"group_size": 32})  # torchao's own check, at once
    with pytest.raises(ConfigError, match=r"\['blocksize'\] are not fields of torchao's Int8WeightOnlyConfig"):
        QuantizeConfig(method=INT8, backend_config_kwargs={"blocksize": 64})
    with pytest.raises(ConfigError, match="version=1: only torchao's version 2"):
        QuantizeConfig(method=FP8, backend_config_kwargs={"version": 1})
    with pytest.raises(ConfigError, match="torchao_int8_w8a8.* not supported here; weight-only methods: .*torchao_fp8"):
        QuantizeConfig(method="torchao_int8_w8a8")
    with pytest.raises(ConfigError, match="not supported here"):
        ModelConfig(path="model.safetensors", quantize="torchao_nvfp4_w4a16")
    with pytest.raises(ConfigError, match="float8_e4m3fn Linear .* cannot be quantized"):
        QuantizeConfig(method=INT8).quantize_model(tiny().to(torch.float8_e4m3fn))
    monkeypatch.setitem(sys.modules, "torchao", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"torchao_int8_w8a16 needs the torchao package: pip install 'torchao>=0.16'"):
        QuantizeConfig(method=INT8).quantize_model(tiny())


# ----------------------------------------------------------------------------------- mixed
def test_mixed_config_quantizes_disjoint_layer_sets_each_by_its_method():
    mixed = MixedQuantizeConfig(
        configs=[
            QuantizeConfig(method="bitsandbytes_nf4", exclude_modules=["head"]),
            QuantizeConfig(method=INT8, target_modules=["head"]),
        ]
    )
    assert ModelConfig(path="model.safetensors", quantize=mixed).quantize is mixed
    model = mixed.quantize_model(tiny())
    assert layer_method(model.head) == INT8 and layer_method(model.blocks[1]["out"]) == "bitsandbytes_nf4"
    assert quantize_config(model) is mixed and mixed.method == "mixed(bitsandbytes_nf4, torchao_int8_w8a16)"
    # each layer as its method alone rounds it
    alone = QuantizeConfig(method=INT8, target_modules=["head"]).quantize_model(tiny())
    torch.testing.assert_close(linear_weight(model.head), linear_weight(alone.head), rtol=0, atol=0)
    nf4 = QuantizeConfig(method="bitsandbytes_nf4", exclude_modules=["head"]).quantize_model(tiny())
    torch.testing.assert_close(linear_weight(model.blocks[0]["proj"]), linear_weight(nf4.blocks[0]["proj"]))

    with pytest.raises(ConfigError, match="layer 'head' is matched by both bitsandbytes_nf4 and torchao_int8_w8a16"):
        MixedQuantizeConfig(configs=[QuantizeConfig(method="bitsandbytes_nf4"), QuantizeConfig(method=INT8,
                            target_modules=["head"])]).quantize_model(tiny())  # fmt: skip
    with pytest.raises(ConfigError, match="must share one mode"):
        MixedQuantizeConfig(configs=[QuantizeConfig(method=INT8, mode="dequant_once"), QuantizeConfig(method=FP8)])
    with pytest.raises(ConfigError, match="set load_prequantized on the MixedQuantizeConfig"):
        MixedQuantizeConfig(configs=[QuantizeConfig(method=INT8, load_prequantized=True)])
    with pytest.raises(ConfigError, match="non-empty list of QuantizeConfig"):
        MixedQuantizeConfig(configs=[])


# ----------------------------------------------------------------------------------- through a pipeline
PROMPT = "a red circle on a blue background"
FAST = {"height": 32, "width": 32, "num_inference_steps": 2, "progress_bar": False, "output_type": "pt", "seed": 0}


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory) -> Path:
    return helpers.tiny_z_image_repo(tmp_path_factory.mktemp("tiny-z-image-torchao"))


def test_a_pipeline_draws_with_an_int8_dit(tiny_repo):
    from diffsynth.z_image import ZImagePipeline

    def load(quantize):
        return ZImagePipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu", quantize=quantize)

    pipe = load({"dit": INT8})
    linears = [m for m in pipe.dit.modules() if isinstance(m, nn.Linear)]
    assert linears and all(layer_method(m) == INT8 for m in linears)
    assert quantize_config(pipe.text_encoder) is None
    out = pipe(PROMPT, **FAST)
    rounded = load({"dit": QuantizeConfig(method=INT8, mode="dequant_once")})(PROMPT, **FAST)
    torch.testing.assert_close(out, rounded, rtol=0, atol=1e-4)
    plain = load(None)
    full, other_seed = plain(PROMPT, **FAST), plain(PROMPT, **{**FAST, "seed": 1})
    assert 0 < (out - full).abs().mean() < (other_seed - full).abs().mean() / 10
