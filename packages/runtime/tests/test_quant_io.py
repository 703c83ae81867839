"""Quantized checkpoints (`quant_io.py`): a saved model loads back with bit-identical packed weights and the same
image, its quantized layers are built from the packed tensors (the float weights are never read nor rounded
again), a diffusers bnb-4bit file is recognised without being told, and a config that does not fit the file is
a clear error naming the file and the key."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from diffsynth.runtime.checkpoint import LazyStateDict
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.quant import MixedQuantizeConfig, QuantizeConfig, layer_method, quantize_config
from diffsynth.runtime.quant_io import HEADER_KEY, file_quantization, save_quantized_model
from diffsynth.runtime.testing.modules import load_beside

helpers = load_beside(__file__, "helpers.py", "diffsynth_runtime_test_helpers")

pytest.importorskip("bitsandbytes")
pytest.importorskip("torchao")
pytest.importorskip("diffsynth.z_image")

PROMPT = "a red circle on a blue background"
FAST = {"height": 32, "width": 32, "num_inference_steps": 2, "progress_bar": False, "output_type": "pt", "seed": 0}
DIT = "transformer/diffusion_pytorch_model.safetensors"
KEEP = ["t_embedder.mlp.0"]
CONFIGS = {
    "bitsandbytes_nf4": QuantizeConfig(method="bitsandbytes_nf4", exclude_modules=KEEP),
    "torchao_int8_w8a16": QuantizeConfig(method="torchao_int8_w8a16", exclude_modules=KEEP),
    "torchao_fp8_w8a16": QuantizeConfig(method="torchao_fp8_w8a16", exclude_modules=KEEP),
    "mixed": MixedQuantizeConfig(
        configs=[
            QuantizeConfig(method="bitsandbytes_fp4", exclude_modules=KEEP),
            QuantizeConfig(method="torchao_int8_w8a16", target_modules=KEEP),
        ]
    ),
}


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory) -> Path:
    """The tiny random Z-Image repo the z-image package's tests build (one builder, not a copy)."""
    conftest = Path(__file__).parents[2] / "z-image" / "tests" / "conftest.py"
    spec = importlib.util.spec_from_file_location("z_image_tiny_repo_quant_io", conftest)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    return module.build_tiny_repo(tmp_path_factory.mktemp("tiny-z-image-quant-io"))


def pipeline(root: Path, dit: ModelConfig):
    from diffsynth.z_image import ZImagePipeline

    others = [ModelConfig(path=str(root / p)) for p in ("vae/diffusion_pytorch_model.safetensors",
                                                        "text_encoder/model.safetensors")]  # fmt: skip
    return ZImagePipeline.from_pretrained(
        model_configs=[dit, *others], tokenizer_config=ModelConfig(path=str(root / "tokenizer")), device="cpu",
        torch_dtype="bfloat16",
    )  # fmt: skip


def prequantized(config):
    if isinstance(config, MixedQuantizeConfig):
        return MixedQuantizeConfig(configs=config.configs, load_prequantized=True)
    return dataclasses.replace(config, load_prequantized=True)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_save_then_load_gives_the_same_packed_weights_and_image(tiny_repo, tmp_path, name):
    config = CONFIGS[name]
    path = save_quantized_model(ModelConfig(path=str(tiny_repo / DIT), quantize=config), tmp_path / "dit.safetensors",
                                torch_dtype="bfloat16")  # fmt: skip
    assert os.listdir(tmp_path) == ["dit.safetensors"]  # written atomically: no temporary file left
    online = pipeline(tiny_repo, ModelConfig(path=str(tiny_repo / DIT), quantize=config))
    loaded = pipeline(tiny_repo, ModelConfig(path=path, quantize=prequantized(config)))
    methods = {n: layer_method(m) for n, m in loaded.dit.named_modules() if isinstance(m, nn.Linear)}
    assert methods == {n: layer_method(m) for n, m in online.dit.named_modules() if isinstance(m, nn.Linear)}
    assert methods["t_embedder.mlp.0"] == (None if name != "mixed" else "torchao_int8_w8a16")
    a, b = helpers.packed_tensors(online.dit), helpers.packed_tensors(loaded.dit)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    torch.testing.assert_close(loaded(PROMPT, **FAST), online(PROMPT, **FAST), rtol=0, atol=0)
    # the file records its config: it loads quantized without being told
    auto = pipeline(tiny_repo, ModelConfig(path=path))
    assert quantize_config(auto.dit).method == config.method
    torch.testing.assert_close(auto(PROMPT, **FAST), online(PROMPT, **FAST), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["bitsandbytes_nf4", "mixed"])
def test_loading_builds_layers_from_the_packed_tensors_only(tiny_repo, tmp_path, monkeypatch, name):
    """No rounding runs at load, and no float [out, in] weight of a quantized layer is ever read from the file."""
    import bitsandbytes
    import torchao.quantization

    path = save_quantized_model(ModelConfig(path=str(tiny_repo / DIT), quantize=CONFIGS[name]),
                                tmp_path / "dit.safetensors", torch_dtype="bfloat16")  # fmt: skip
    packed, _, _ = file_quantization([path])
    shapes = {p.shape for p in packed.values()}
    read = []
    original = LazyStateDict.__getitem__

    def spy(self, key):
        tensor = original(self, key)
        if str(path) in self.files:  # the DiT's file (the text encoder's reads are its own)
            read.append((key, tensor))
        return tensor

    def forbidden(*args, **kwargs):
        raise AssertionError("quantized again at load")

    monkeypatch.setattr(LazyStateDict, "__getitem__", spy)
    monkeypatch.setattr(bitsandbytes.functional, "quantize_4bit", forbidden)
    monkeypatch.setattr(torchao.quantization, "quantize_", forbidden)
    pipe = pipeline(tiny_repo, ModelConfig(path=path, quantize=prequantized(CONFIGS[name])))
    dit_reads = [(k, t) for k, t in read if k in {part for p in packed.values() for part in p.parts}]
    assert len(dit_reads) >= len(packed) > 0
    floats = (torch.float16, torch.bfloat16, torch.float32)
    assert not [k for k, t in read if t.dtype in floats and t.dim() == 2 and tuple(t.shape) in shapes]
    assert all(layer_method(pipe.dit.get_submodule(k.split("._weight_")[0].removesuffix(".weight")))
               for k in packed)  # fmt: skip


def test_a_diffusers_bnb_4bit_checkpoint_is_recognised_and_loads_prequantized(tiny_repo, tmp_path):
    """diffusers writes bitsandbytes' own `Linear4bit` keys, no header of ours, and `quantization_config` in its
    config.json: the file loads as NF4 layers without `quantize=`, computing what the online NF4 model computes."""
    from diffsynth.runtime.loading import load_models

    model = load_models(str(tiny_repo / DIT), torch_dtype="bfloat16")[0].module
    QuantizeConfig(method="bitsandbytes_nf4", exclude_modules=KEEP).quantize_model(model)
    folder = tmp_path / "transformer"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    config_json = json.loads((tiny_repo / "transformer" / "config.json").read_text())
    config_json["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                          "bnb_4bit_quant_type": "nf4", "llm_int8_skip_modules": KEEP}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config_json))
    pipe = pipeline(tiny_repo, ModelConfig(path=str(folder / "model.safetensors")))
    assert quantize_config(pipe.dit).method == "bitsandbytes_nf4" and layer_method(pipe.dit.t_embedder.mlp[0]) is None
    online = pipeline(tiny_repo, ModelConfig(path=str(tiny_repo / DIT), quantize=CONFIGS["bitsandbytes_nf4"]))
    torch.testing.assert_close(pipe(PROMPT, **FAST), online(PROMPT, **FAST), rtol=0, atol=0)


def test_a_config_that_does_not_fit_the_file_is_a_clear_error(tiny_repo, tmp_path):
    path = save_quantized_model(ModelConfig(path=str(tiny_repo / DIT), quantize=CONFIGS["bitsandbytes_nf4"]),
                                tmp_path / "dit.safetensors", torch_dtype="bfloat16")  # fmt: skip
    assert json.loads(file_quantization([path])[1][HEADER_KEY])["exclude_modules"] == KEEP
    wrong_method = QuantizeConfig(method="torchao_int8_w8a16", exclude_modules=KEEP, load_prequantized=True)
    with pytest.raises(ConfigError, match=r"dit.safetensors: key '.*\.weight' is stored as bitsandbytes_nf4, but the "
                                          "QuantizeConfig asks torchao_int8_w8a16"):  # fmt: skip
        pipeline(tiny_repo, ModelConfig(path=path, quantize=wrong_method))
    no_excludes = QuantizeConfig(method="bitsandbytes_nf4", load_prequantized=True)
    with pytest.raises(ConfigError, match=r"dit.safetensors: key 't_embedder.mlp.0.weight' is stored unquantized, "
                                          "but the QuantizeConfig targets it"):  # fmt: skip
        pipeline(tiny_repo, ModelConfig(path=path, quantize=no_excludes))
    more_excludes = QuantizeConfig(method="bitsandbytes_nf4", exclude_modules=[*KEEP, "cap_embedder.1"],
                                   load_prequantized=True)  # fmt: skip
    with pytest.raises(ConfigError, match=r"key 'cap_embedder.1.weight' is stored quantized "
                                          r"\(bitsandbytes_nf4\), but the QuantizeConfig leaves"):  # fmt: skip
        pipeline(tiny_repo, ModelConfig(path=path, quantize=more_excludes))
    with pytest.raises(ConfigError, match=r"dit.safetensors'\) holds quantized layers \(key .*\); load it with "
                                          r"QuantizeConfig\(method=..., load_prequantized=True\)"):  # fmt: skip
        pipeline(tiny_repo, ModelConfig(path=path, quantize="bitsandbytes_nf4"))
    with pytest.raises(ConfigError, match="diffusion_pytorch_model.safetensors'\\) holds no quantized layers"):
        pipeline(tiny_repo, ModelConfig(path=str(tiny_repo / DIT), quantize=no_excludes))


def test_save_refuses_what_it_cannot_write_and_leaves_an_old_file_whole(tiny_repo, tmp_path, monkeypatch):
    from diffsynth.runtime.loading import load_models

    plain = load_models(str(tiny_repo / DIT))[0].module
    with pytest.raises(ConfigError, match="the ZImageDiT is not quantized"):
        save_quantized_model(plain, tmp_path / "a.safetensors")
    with pytest.raises(ConfigError, match="mode='dequant_once'.*quantize with mode='dynamic'"):
        save_quantized_model(QuantizeConfig(method="torchao_int8_w8a16", mode="dequant_once").quantize_model(plain),
                             tmp_path / "a.safetensors")  # fmt: skip
    with pytest.raises(ConfigError, match="writes .safetensors; got path"):
        save_quantized_model(ModelConfig(path=str(tiny_repo / DIT), quantize="bitsandbytes_nf4"), tmp_path / "a.bin")
    target = tmp_path / "old.safetensors"
    target.write_bytes(b"old")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        save_quantized_model(ModelConfig(path=str(tiny_repo / DIT), quantize="bitsandbytes_nf4"), target)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["old.safetensors"]


def test_a_file_saved_with_torchao_options_loads_back_by_its_header(tiny_repo, tmp_path):
    """Options that shaped the rounding (int8 groups of 16 here) travel in the packed tensors: the file loads back
    without them, by its header, to the same grouped scales."""
    from torchao.quantization import PerGroup

    from diffsynth.runtime.loading import load_models

    options = {"granularity": PerGroup(16)}
    with pytest.raises(ConfigError, match=r"ZImageDiT layer .*: torchao_int8_w8a16 cannot quantize a Linear\(170, "
                                          r".*torchao says: .*not divisible by group size 16"):  # fmt: skip
        QuantizeConfig(method="torchao_int8_w8a16", backend_config_kwargs=options).quantize_model(
            load_models(str(tiny_repo / DIT))[0].module
        )
    attention = ["to_q", "to_k", "to_v"]  # 64 inputs: four groups of 16
    grouped = QuantizeConfig(method="torchao_int8_w8a16", target_modules=attention, backend_config_kwargs=options)
    path = save_quantized_model(ModelConfig(path=str(tiny_repo / DIT), quantize=grouped), tmp_path / "g.safetensors",
                                torch_dtype="bfloat16")  # fmt: skip
    online = pipeline(tiny_repo, ModelConfig(path=str(tiny_repo / DIT), quantize=grouped))
    auto = pipeline(tiny_repo, ModelConfig(path=path))
    layer = auto.dit.get_submodule("layers.0.attention.to_q")
    assert layer.weight.scale.shape[-1] == layer.in_features // 16
    a, b = helpers.packed_tensors(online.dit), helpers.packed_tensors(auto.dit)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
