"""A quantized checkpoint's recorded settings come back with it (`quant_io.py`, `quant.config_from_dict`): the
loaded model's config equals the one it was saved with, backend_config_kwargs included (bitsandbytes' block size,
statistics and storage dtype, torchao's granularity and fp8 dtype), quantizing a fresh model with that restored
config gives the file's packed tensors (while dropping the options does not), saving the loaded model again writes
the same file, a folder holding the file loads the same way, and a header entry that is unknown or ill-typed is
an error naming the file and the key."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.quant import MixedQuantizeConfig, QuantizeConfig, config_from_dict, quantize_config
from diffsynth.runtime.quant_io import HEADER_KEY, save_quantized_model
from diffsynth.runtime.testing.modules import load_beside

pytest.importorskip("bitsandbytes")
pytest.importorskip("torchao")
pytest.importorskip("diffsynth.z_image")

from torchao.quantization import PerGroup  # noqa: E402 - after the importorskip

helpers = load_beside(__file__, "helpers.py", "diffsynth_runtime_test_helpers")

DIT = "transformer/diffusion_pytorch_model.safetensors"
KEEP = ["t_embedder.mlp.0"]
ATTENTION = ["to_q", "to_k", "to_v"]  # 64 inputs: four groups of 16
NF4_128 = QuantizeConfig(method="bitsandbytes_nf4", exclude_modules=KEEP,
                         backend_config_kwargs={"blocksize": 128, "compress_statistics": False})  # fmt: skip
CONFIGS = {
    "nf4_blocks_of_128_uncompressed": NF4_128,
    "fp4_bfloat16_storage": QuantizeConfig(
        method="bitsandbytes_fp4", exclude_modules=KEEP, backend_config_kwargs={"quant_storage": torch.bfloat16}
    ),
    "int8_groups_of_16": QuantizeConfig(
        method="torchao_int8_w8a16", target_modules=ATTENTION, backend_config_kwargs={"granularity": PerGroup(16)}
    ),
    "fp8_e5m2": QuantizeConfig(
        method="torchao_fp8_w8a16", exclude_modules=KEEP, backend_config_kwargs={"weight_dtype": torch.float8_e5m2}
    ),
    "mixed": MixedQuantizeConfig(
        configs=[
            dataclasses.replace(NF4_128, exclude_modules=[*KEEP, *ATTENTION]),
            QuantizeConfig(
                method="torchao_int8_w8a16",
                target_modules=ATTENTION,
                backend_config_kwargs={"granularity": PerGroup(16)},
            ),  # fmt: skip
        ]
    ),
}


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory) -> Path:
    """The tiny random Z-Image repo the z-image package's tests build (one builder, not a copy)."""
    conftest = Path(__file__).parents[2] / "z-image" / "tests" / "conftest.py"
    spec = importlib.util.spec_from_file_location("z_image_tiny_repo_quant_roundtrip", conftest)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    return module.build_tiny_repo(tmp_path_factory.mktemp("tiny-z-image-quant-roundtrip"))


def load_dit(path) -> nn.Module:
    """The DiT of `path` through the pipeline's loader (prequantized by the file's header when it holds one)."""
    from diffsynth.runtime.pipeline import BasePipeline

    class DiTOnly(BasePipeline):
        model_slots = {"dit": "dit"}

    return DiTOnly.from_pretrained(model_configs=[ModelConfig(path=str(path))], device="cpu").dit


def float_dit(root: Path) -> nn.Module:
    from diffsynth.runtime.loading import load_models

    return load_models(str(root / DIT), torch_dtype="bfloat16")[0].module.eval().requires_grad_(False)


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Bit-identical tensors (by their bytes: 4-bit data stored as bfloat16 holds NaN patterns)."""

    def raw(t: torch.Tensor) -> torch.Tensor:
        return t.detach().contiguous().reshape(-1).view(torch.uint8)

    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(raw(a[k]), raw(b[k])) for k in a
    )


def header(path) -> dict:
    with safe_open(str(path), framework="pt") as handle:
        return json.loads(handle.metadata()[HEADER_KEY])


def for_quantizing(config):
    """A restored (prequantized) config as one that quantizes a float model."""
    if isinstance(config, MixedQuantizeConfig):
        return MixedQuantizeConfig(configs=config.configs)
    return dataclasses.replace(config, load_prequantized=False)


def without_options(config):
    """The config as loads restored it before: the same layers and methods, no backend_config_kwargs."""
    if isinstance(config, MixedQuantizeConfig):
        return MixedQuantizeConfig(configs=[without_options(c) for c in config.configs])
    return dataclasses.replace(config, backend_config_kwargs={})


@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_saved_settings_come_back_and_rebuild_the_files_layers(tiny_repo, tmp_path, name):
    config = CONFIGS[name]
    folder = tmp_path / "saved"
    path = save_quantized_model(ModelConfig(path=str(tiny_repo / DIT), quantize=config),
                                folder / "dit.safetensors", torch_dtype="bfloat16")  # fmt: skip
    loaded = load_dit(folder)  # a folder holding the file is read as the file, prequantized by its header
    restored = quantize_config(loaded)
    assert restored.load_prequantized and restored.to_dict() == {**config.to_dict(), "load_prequantized": True}
    parts = restored.configs
    # as the objects they were (torch dtypes, torchao granularities), not their records
    assert [c.backend_config_kwargs for c in parts] == [c.backend_config_kwargs for c in config.configs]
    file_tensors = helpers.packed_tensors(loaded)

    # the restored options rebuild the file's layers from the float weights; without them the layers differ
    assert same(helpers.packed_tensors(for_quantizing(restored).quantize_model(float_dit(tiny_repo))), file_tensors)
    plain = helpers.packed_tensors(without_options(config).quantize_model(float_dit(tiny_repo)))
    assert not same(plain, file_tensors)

    # the loaded model saves again to the same header and tensors (a module carries no config.json: put it beside)
    again = save_quantized_model(loaded, tmp_path / "again" / "dit.safetensors")
    shutil.copy(tiny_repo / "transformer" / "config.json", tmp_path / "again" / "config.json")
    assert header(again) == header(path)
    assert same(helpers.packed_tensors(load_dit(again)), file_tensors)


def test_the_built_layers_follow_the_restored_options(tiny_repo, tmp_path):
    """What each option changes in a layer, read off the loaded model (the file's own packing)."""
    paths = {}
    for name in ("nf4_blocks_of_128_uncompressed", "int8_groups_of_16", "fp8_e5m2"):
        paths[name] = save_quantized_model(ModelConfig(path=str(tiny_repo / DIT), quantize=CONFIGS[name]),
                                           tmp_path / f"{name}.safetensors", torch_dtype="bfloat16")  # fmt: skip
    nf4 = load_dit(paths["nf4_blocks_of_128_uncompressed"]).get_submodule("layers.0.attention.to_q")
    assert nf4.weight.quant_state.blocksize == 128 and nf4.weight.quant_state.state2 is None
    int8 = load_dit(paths["int8_groups_of_16"]).get_submodule("layers.0.attention.to_q")
    assert int8.weight.scale.shape[-1] == int8.in_features // 16
    fp8 = load_dit(paths["fp8_e5m2"]).get_submodule("layers.0.attention.to_q")
    assert fp8.weight.qdata.dtype == torch.float8_e5m2


def rewrite_header(path: Path, target: Path, change) -> Path:
    """A copy of a saved file whose recorded config `change` edits (the tensors as they were)."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata())
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    record = json.loads(metadata[HEADER_KEY])
    change(record)
    metadata[HEADER_KEY] = json.dumps(record)
    save_file(tensors, str(target), metadata=metadata)
    return target


def test_older_files_repr_strings_are_read_as_the_objects_they_name(tiny_repo, tmp_path):
    """Files written before the options were recorded as tagged records hold their repr."""
    mixed = save_quantized_model(ModelConfig(path=str(tiny_repo / DIT), quantize=CONFIGS["mixed"]),
                                 tmp_path / "mixed.safetensors", torch_dtype="bfloat16")  # fmt: skip

    def as_repr(record):
        record["configs"][0]["backend_config_kwargs"]["quant_storage"] = "torch.uint8"
        record["configs"][1]["backend_config_kwargs"]["granularity"] = "PerGroup(group_size=16)"

    old = rewrite_header(Path(mixed), tmp_path / "old.safetensors", as_repr)
    parts = quantize_config(load_dit(old)).configs
    assert parts[0].backend_config_kwargs == {"blocksize": 128, "compress_statistics": False,
                                              "quant_storage": torch.uint8}  # fmt: skip
    assert parts[1].backend_config_kwargs == {"granularity": PerGroup(16)}


BAD = {
    "blocksize as text": ({"blocksize": "128"}, r"blocksize='128': bitsandbytes takes 32, 64"),
    "statistics as text": ({"compress_statistics": "no"}, r"compress_statistics='no' must be True or False"),
    "unknown option": ({"group_size": 32}, r"backend_config_kwargs \['group_size'\] are not bitsandbytes options"),
    "unknown dtype": (
        {"quant_storage": {"torch.dtype": "uint99"}},
        r"backend_config_kwargs\['quant_storage'\] names no torch dtype: 'uint99'",
    ),  # fmt: skip
    "unknown record": (
        {"quant_storage": {"numpy": "uint8"}},
        r"backend_config_kwargs\['quant_storage'\] is a record this version cannot read",
    ),  # fmt: skip
    "not a dict": ([128], r"backend_config_kwargs must be a dict, got \[128\]"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_an_unknown_or_ill_typed_entry_is_an_error_naming_the_file_and_the_key(tiny_repo, tmp_path, case):
    options, message = BAD[case]
    path = save_quantized_model(ModelConfig(path=str(tiny_repo / DIT), quantize=NF4_128),
                                tmp_path / "dit.safetensors", torch_dtype="bfloat16")  # fmt: skip

    def change(record):
        record["backend_config_kwargs"] = options

    bad = rewrite_header(Path(path), tmp_path / "bad.safetensors", change)
    with pytest.raises(ConfigError, match=rf"bad\.safetensors \(header 'diffsynth_quantize'\): .*{message}"):
        load_dit(bad)


def test_torchao_and_record_level_errors_name_the_key():
    source = "x.safetensors (header 'diffsynth_quantize')"
    int8 = {"method": "torchao_int8_w8a16", "load_prequantized": True}
    cases = [
        ({**int8, "backend_config_kwargs": {"granularity": {"torchao.granularity": "PerNothing", "fields": {}}}},
         r"backend_config_kwargs\['granularity'\] names no torchao granularity: 'PerNothing'"),
        ({**int8, "backend_config_kwargs": {"granularity": {"torchao.granularity": "PerGroup", "fields": {}}}},
         r"backend_config_kwargs\['granularity'\] is no valid PerGroup"),
        ({**int8, "backend_config_kwargs": {"set_inductor_config": "yes"}},
         r"set_inductor_config='yes' is not a <class 'bool'>"),
        ({**int8, "backend_config_kwargs": {"blocksize": 64}},
         r"\['blocksize'\] are not fields of torchao's Int8WeightOnlyConfig"),
        ({**int8, "colour": "red"}, r"key 'colour' is not a QuantizeConfig field"),
        ({"configs": [int8, {**int8, "backend_config_kwargs": {"group_size": "8"}}], "load_prequantized": True},
         r"configs\[1\] .*group_size='8' is not a"),
        ("nf4", r"the recorded quantization config must be a dict"),
    ]  # fmt: skip
    for record, message in cases:
        with pytest.raises(ConfigError, match=rf"^x\.safetensors \(header 'diffsynth_quantize'\): .*{message}"):
            config_from_dict(record, source)
    with pytest.raises(ConfigError, match=r"compress_statistics=1 must be True or False"):  # the user's too
        QuantizeConfig(method="bitsandbytes_nf4", backend_config_kwargs={"compress_statistics": 1})
