"""`describe_checkpoint` (`diffsynth inspect`) reports what is stored: GGUF block types and their bytes on disk, a
prequantized file's layers by their unpacked shapes, and it reads tensors only when the key names say LoRA; a
bnb-4bit file split between shards keeps each weight's quant state whole (`quant_io.file_quantization`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from diffsynth.runtime import checkpoint
from diffsynth.runtime.checkpoint import describe_checkpoint
from diffsynth.runtime.quant_io import file_quantization
from diffsynth.runtime.testing.modules import load_beside

helpers = load_beside(__file__, "helpers.py", "diffsynth_runtime_test_helpers")
STATE_KEY = "layer.weight.quant_state.bitsandbytes__nf4"


def nf4_tensors() -> dict[str, torch.Tensor]:
    """One [4, 4] Linear weight as bitsandbytes' state dict stores it (packed nibbles and its quant state)."""
    record = {"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [4, 4]}
    return {
        "layer.weight": torch.zeros(8, 1, dtype=torch.uint8),
        "layer.weight.absmax": torch.ones(1),
        "layer.weight.quant_map": torch.linspace(-1, 1, 16),
        STATE_KEY: torch.tensor(list(json.dumps(record).encode()), dtype=torch.uint8),
        "layer.bias": torch.zeros(4),
    }


def test_a_shard_boundary_inside_a_weights_quant_state_keeps_its_parts(tmp_path):
    """The parts of a packed weight were gathered from the shard holding its quant-state record only."""
    tensors = nf4_tensors()
    first, second = tmp_path / "model-00001-of-00002.safetensors", tmp_path / "model-00002-of-00002.safetensors"
    save_file({k: tensors[k] for k in ("layer.weight", "layer.weight.absmax")}, str(first))
    save_file({k: tensors[k] for k in ("layer.weight.quant_map", STATE_KEY, "layer.bias")}, str(second))
    packed = file_quantization([str(first), str(second)])[0]
    assert set(packed) == {"layer.weight"}
    assert set(packed["layer.weight"].parts) == set(tensors) - {"layer.bias"}
    assert packed["layer.weight"].shape == (4, 4)


def test_a_prequantized_file_is_counted_by_its_unpacked_weights(tmp_path):
    """The packed bytes and quant-state records were counted as parameters, each under its storage dtype."""
    path = tmp_path / "nf4.safetensors"
    save_file(nf4_tensors(), str(path))
    info = describe_checkpoint(str(path))
    assert info["parameters"] == 4 * 4 + 4
    assert info["dtypes"] == {
        "bitsandbytes_nf4": {"tensors": 4, "parameters": 16},
        "float32": {"tensors": 1, "parameters": 4},
    }
    assert info["quantized_layers"] == {"bitsandbytes_nf4": 1}
    assert info["bytes"] == sum(t.numel() * t.itemsize for t in nf4_tensors().values())


def q8_file(tmp_path, name: str = "model.gguf"):
    gguf = pytest.importorskip("gguf")
    q8 = gguf.GGMLQuantizationType.Q8_0
    weight = np.random.default_rng(0).standard_normal((32, 64)).astype(np.float32)
    tensors = {"blocks.0.proj.weight": (gguf.quants.quantize(weight, q8), q8), "blocks.0.proj.bias": (weight[0], None)}
    return helpers.write_gguf(tmp_path / name, tensors)


def test_a_gguf_file_is_reported_by_its_block_types_and_stored_bytes(tmp_path):
    """Q8_0 tensors were reported as float32, with the bytes of their dequantized copies."""
    info = describe_checkpoint(str(q8_file(tmp_path)))
    assert info["dtypes"] == {
        "Q8_0": {"tensors": 1, "parameters": 32 * 64},
        "float32": {"tensors": 1, "parameters": 64},
    }
    assert info["parameters"] == 32 * 64 + 64
    assert info["bytes"] == 32 * 64 // 32 * 34 + 64 * 4  # a Q8_0 block: 32 int8 and one float16 scale


def test_an_unrecognised_file_is_not_read_to_ask_whether_it_is_a_lora(tmp_path, monkeypatch):
    """Every tensor of an unrecognised GGUF was dequantized into one dict just to try it as a LoRA."""
    path = q8_file(tmp_path)
    from diffsynth.runtime import gguf as runtime_gguf

    def refuse(*args, **kwargs):
        raise AssertionError("a tensor was dequantized")

    monkeypatch.setattr(runtime_gguf, "dequantize", refuse)
    monkeypatch.setattr(runtime_gguf.GGUFFile, "tensor", refuse)
    info = describe_checkpoint(str(path))
    assert info["models"] == [] and "unrecognised" in info and "lora" not in info


def test_a_lora_file_is_still_described_as_one(tmp_path, monkeypatch):
    path = tmp_path / "lora.safetensors"
    save_file(helpers.lora_state(helpers.tiny()), str(path))
    info = describe_checkpoint(str(path))
    assert info["models"] == [] and info["lora"]["targets"] > 0
    monkeypatch.setattr(checkpoint._SafetensorsFile, "tensor", lambda *args: pytest.fail("a tensor was read"))
    plain = tmp_path / "plain.safetensors"
    save_file({"mystery.weight": torch.zeros(2, 2)}, str(plain))
    assert "unrecognised" in describe_checkpoint(str(plain))
