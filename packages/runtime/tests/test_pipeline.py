"""`BasePipeline` loading what `ModelConfig(path=...)` names: shard indexes, part of a shard set, files that are
no weights, broken files; and the pipeline's own arguments."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffsynth.runtime.errors import CheckpointError, ConfigError
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.testing.modules import load_beside

pytest.importorskip("diffsynth.z_image")
from diffsynth.z_image import ZImagePipeline  # noqa: E402

helpers = load_beside(__file__, "helpers.py", "diffsynth_runtime_test_helpers")
DIT = "transformer/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory) -> Path:
    return helpers.tiny_z_image_repo(tmp_path_factory.mktemp("tiny-z-image-paths"))


@pytest.fixture(scope="module")
def shards(tiny_repo, tmp_path_factory) -> Path:
    """The tiny DiT as two numbered shards with an index and its config.json."""
    folder = tmp_path_factory.mktemp("sharded-dit")
    state = load_file(str(tiny_repo / DIT))
    keys = sorted(state)
    names = ["diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_pytorch_model-00002-of-00002.safetensors"]
    parts = {names[0]: keys[: len(keys) // 2], names[1]: keys[len(keys) // 2 :]}
    for name, part in parts.items():
        save_file({k: state[k] for k in part}, str(folder / name))
    weight_map = {k: name for name, part in parts.items() for k in part}
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    shutil.copy(tiny_repo / "transformer" / "config.json", folder / "config.json")
    return folder


def load(tiny_repo: Path, dit) -> ZImagePipeline:
    configs = [ModelConfig(path=dit if isinstance(dit, list) else str(dit))]
    configs += [ModelConfig(path=str(tiny_repo / f)) for f in ("text_encoder", "vae")]
    return ZImagePipeline.from_pretrained(
        model_configs=configs,
        tokenizer_config=ModelConfig(path=str(tiny_repo / "tokenizer")),
        torch_dtype="float32",
        device="cpu",
    )


def test_a_shard_index_loads_its_shards(tiny_repo, shards):
    """`path=` a `*.index.json` was filtered out ("... got []"); open_checkpoint reads it like the folder."""
    pipe = load(tiny_repo, shards / "diffusion_pytorch_model.safetensors.index.json")
    expected = load_file(str(tiny_repo / DIT))
    state = pipe.dit.state_dict()
    assert all(torch.equal(state[k], v) for k, v in expected.items())


def test_the_trainer_reads_the_roles_of_a_shard_index(shards):
    """The trainer tells a config's models from their headers (`model_roles`), through the same path filter."""
    from diffsynth.runtime.hub import ModelConfig
    from diffsynth.runtime.training_support import model_roles

    index = ModelConfig(path=str(shards / "diffusion_pytorch_model.safetensors.index.json"))
    assert model_roles(index) == {"dit"} == model_roles(ModelConfig(path=str(shards)))


def test_part_of_a_shard_set_is_named(tiny_repo, shards):
    """One shard of two gave an UnknownModelError (half the keys); the folder, the index or all shards load."""
    first = str(shards / "diffusion_pytorch_model-00001-of-00002.safetensors")
    with pytest.raises(ConfigError, match=r"part of a sharded checkpoint: shard '.*-00002-of-00002.safetensors'"):
        load(tiny_repo, first)
    load(tiny_repo, [first, first.replace("00001-of", "00002-of")])


def test_a_file_that_is_no_weights_is_named(tiny_repo, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not weights")
    with pytest.raises(ConfigError, match=r"notes.txt is not a weight file.*\.index\.json"):
        load(tiny_repo, notes)


def test_a_truncated_safetensors_file_is_named(tiny_repo, tmp_path):
    """The prequantized-file check read the header with safetensors' own reader, whose Rust error said nothing
    of the file; the checked reader names it and says to fetch it again."""
    cut = tmp_path / "cut.safetensors"
    raw = (tiny_repo / DIT).read_bytes()
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match=r"cut.safetensors looks truncated or corrupt.*Re-download"):
        load(tiny_repo, cut)
