"""A bnb-4bit file saved by `save_quantized_model` and split into shards (in key order, as diffusers splits a state
dict) loads with a shard boundary inside one weight's quant state; `inspect` reports its model's real config, and
load errors name the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from diffsynth.runtime.checkpoint import describe_checkpoint
from diffsynth.runtime.errors import DiffSynthError
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.quant import QuantizeConfig
from diffsynth.runtime.quant_io import load_prequantized, prequantized_config, save_quantized_model
from diffsynth.runtime.testing.modules import load_beside

pytest.importorskip("bitsandbytes")
helpers = load_beside(__file__, "helpers.py", "diffsynth_runtime_test_helpers")
NAMES = ["diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_pytorch_model-00002-of-00002.safetensors"]


@pytest.fixture(scope="module")
def nf4_file(tmp_path_factory) -> Path:
    repo = helpers.tiny_z_image_repo(tmp_path_factory.mktemp("tiny-z-image-nf4"))
    path = repo / "dit-nf4.safetensors"
    config = ModelConfig(path=str(repo / "transformer"), quantize=QuantizeConfig(method="bitsandbytes_nf4"))
    return Path(save_quantized_model(config, str(path), torch_dtype=torch.float32, device="cpu"))


def split(source: Path, folder: Path, drop: str | None = None) -> Path:
    """`source` as two shards with an index, cut right after the first packed weight's `.absmax`."""
    with safe_open(str(source), "pt") as f:
        metadata, keys = f.metadata(), list(f.keys())
        tensors = {k: f.get_tensor(k) for k in keys if k != drop}
    cut = keys.index(next(k for k in keys if k.endswith(".absmax"))) + 1
    parts = {NAMES[0]: keys[:cut], NAMES[1]: [k for k in keys[cut:] if k != drop]}
    folder.mkdir()
    for name, part in parts.items():
        save_file({k: tensors[k] for k in part}, str(folder / name), metadata=metadata)
    index = {"weight_map": {k: name for name, part in parts.items() for k in part}}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def test_a_shard_boundary_after_absmax_loads(nf4_file, tmp_path):
    folder = split(nf4_file, tmp_path / "sharded")
    (single,) = load_prequantized([str(nf4_file)], prequantized_config([str(nf4_file)], None, "single"))
    (sharded,) = load_prequantized([str(folder)], prequantized_config([str(folder)], None, "sharded"))
    a, b = single.module.state_dict(), sharded.module.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_load_error_names_the_file(nf4_file, tmp_path):
    """Errors of the meta build said "the given state dict"."""
    with safe_open(str(nf4_file), "pt") as f:
        plain = next(k for k in f.keys() if k.endswith("norm.weight") or k.endswith("norm1.weight"))
    folder = split(nf4_file, tmp_path / "sharded", drop=plain)
    with pytest.raises(DiffSynthError) as info:
        load_prequantized([str(folder)], prequantized_config([str(folder)], None, "sharded"))
    assert NAMES[0] in str(info.value) and "the given state dict" not in str(info.value)


def test_inspect_reports_the_models_config_from_its_unpacked_shapes(nf4_file, tmp_path):
    """The config was derived from the packed shapes (in_channels=0: a config_error) and the packed bytes were
    counted as parameters."""
    info = describe_checkpoint(str(nf4_file))
    original = load_file(str(nf4_file.parent / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert info["parameters"] == sum(t.numel() for t in original.values())
    ((model,),) = [info["models"]]
    assert "config_error" not in model and model["config"]["in_channels"] == 4
