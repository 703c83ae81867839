"""Quantized checkpoints (`quant_io.py`) loaded in another dtype than they were saved in, saved from a module (its
config travels in the header), and a GGUF-packed model refused at save (no loader could read the file back)."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.quant import QuantizeConfig, layer_method
from diffsynth.runtime.quant_io import MODULE_CONFIG_KEY, file_quantization, load_prequantized, save_quantized_model
from diffsynth.runtime.testing.modules import load_beside

helpers = load_beside(__file__, "helpers.py", "diffsynth_runtime_test_helpers")

pytest.importorskip("torchao")
pytest.importorskip("diffsynth.z_image")

DIT = "transformer/diffusion_pytorch_model.safetensors"
ATTENTION = ["to_q", "to_k", "to_v"]


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory) -> Path:
    """The tiny random Z-Image repo the z-image package's tests build (one builder, not a copy)."""
    conftest = Path(__file__).parents[2] / "z-image" / "tests" / "conftest.py"
    spec = importlib.util.spec_from_file_location("z_image_tiny_repo_quant_io_dtype", conftest)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    return module.build_tiny_repo(tmp_path_factory.mktemp("tiny-z-image-quant-io-dtype"))


def quantized_dit(root: Path, config: QuantizeConfig, dtype: str) -> nn.Module:
    from diffsynth.runtime.loading import load_models

    return config.quantize_model(load_models(str(root / DIT), torch_dtype=dtype)[0].module)


@pytest.mark.parametrize("method", ["torchao_int8_w8a16", "torchao_fp8_w8a16"])
@pytest.mark.parametrize(("saved", "requested"), [("float32", "bfloat16"), ("bfloat16", "float32")])
def test_a_torchao_file_computes_in_the_requested_dtype(tiny_repo, tmp_path, method, saved, requested):
    """The packed data and scales are the saved ones; the layer reports and computes in `requested`, as a layer
    quantized in memory at that dtype does (torchao's scales are float32 at either dtype)."""
    config = QuantizeConfig(method=method, target_modules=ATTENTION)
    model = quantized_dit(tiny_repo, config, saved)
    path = save_quantized_model(model, tmp_path / "dit.safetensors")
    (loaded,) = load_prequantized([path], dataclasses.replace(config, load_prequantized=True), torch_dtype=requested)
    dtype = getattr(torch, requested)
    in_memory = quantized_dit(tiny_repo, config, requested).get_submodule("layers.0.attention.to_q").weight
    torch.manual_seed(0)
    for name in [f"layers.0.attention.{n}" for n in ATTENTION]:
        layer, source = loaded.module.get_submodule(name), model.get_submodule(name)
        assert layer_method(layer) == method and layer.weight.dtype == dtype == in_memory.dtype
        assert layer.weight.scale.dtype == in_memory.scale.dtype
        assert torch.equal(layer.weight.qdata.float(), source.weight.qdata.float())
        assert torch.equal(layer.weight.scale, source.weight.scale)
        x = torch.randn(3, layer.in_features, dtype=dtype)
        weight = (source.weight.qdata.float() * source.weight.scale).to(dtype)  # per-row scales, no zero point
        expected = nn.functional.linear(x, weight, None)
        tolerance = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}
        out = layer(x)
        assert out.dtype == dtype
        torch.testing.assert_close(out, expected, **tolerance)


def test_a_torchao_file_refuses_a_non_float_compute_dtype(tiny_repo, tmp_path):
    config = QuantizeConfig(method="torchao_int8_w8a16", target_modules=ATTENTION)
    path = save_quantized_model(quantized_dit(tiny_repo, config, "float32"), tmp_path / "dit.safetensors")
    refused = r"dit.safetensors.*key '.*to_.\.weight' is a torchao_int8_w8a16 weight saved in torch.float32; "
    with pytest.raises(ConfigError, match=refused + "it cannot compute in torch_dtype=torch.float64"):
        load_prequantized([path], dataclasses.replace(config, load_prequantized=True), torch_dtype="float64")


def test_a_file_saved_from_a_module_records_its_config_and_loads_from_anywhere(tiny_repo, tmp_path):
    """No config.json lies beside the file and the shapes alone do not give this model's config (RoPE widths):
    the module's config recorded in the header does."""
    config = QuantizeConfig(method="torchao_int8_w8a16", target_modules=ATTENTION)
    model = quantized_dit(tiny_repo, config, "bfloat16")
    path = save_quantized_model(model, tmp_path / "dit.safetensors")
    assert MODULE_CONFIG_KEY in file_quantization([path])[1]
    (loaded,) = load_prequantized([path], dataclasses.replace(config, load_prequantized=True), torch_dtype="bfloat16")
    assert loaded.module.config == model.config and loaded.config == model.config
    a, b = helpers.packed_tensors(model), helpers.packed_tensors(loaded.module)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_gguf_packed_model_is_refused_at_save(tiny_repo, tmp_path):
    gguf = pytest.importorskip("gguf")
    from safetensors.torch import load_file

    from diffsynth.runtime.gguf import load_gguf

    q8 = gguf.GGMLQuantizationType.Q8_0
    tensors = {}
    for key, value in sorted(load_file(str(tiny_repo / DIT)).items()):
        array = value.float().numpy()
        quantizable = value.dim() == 2 and value.shape[1] % 32 == 0
        tensors[key] = (gguf.quants.quantize(array, q8), q8) if quantizable else (array, None)
    (tmp_path / "config.json").write_text((tiny_repo / "transformer" / "config.json").read_text())
    config, (item,) = load_gguf(str(helpers.write_gguf(tmp_path / "dit.gguf", tensors)), torch_dtype="bfloat16")
    assert config is not None and config.method == "gguf"
    with pytest.raises(ConfigError, match=r"the ZImageDiT is GGUF-packed \(Q8_0\); a GGUF-packed model cannot be "
                                          r"saved as safetensors; keep the .gguf, or load it with "
                                          r"DIFFSYNTH_GGUF_MODE=dequantize"):  # fmt: skip
        save_quantized_model(item.module, tmp_path / "dit.safetensors")
    assert not (tmp_path / "dit.safetensors").exists()
