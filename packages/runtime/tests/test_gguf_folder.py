"""A folder holding one .gguf is read as that file (`checkpoint.weight_files`, `gguf.is_gguf`): a plain folder, a
Hugging Face style download (README, config.json, .gitattributes beside it) and a hub cache snapshot (symlinks
into blobs/) load through the pipeline's path to the same packed model as the file's own path; the shards of one
split GGUF are one model; several .gguf files in one folder are an error listing them and asking for the path."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from torch import nn

from diffsynth.runtime.checkpoint import open_checkpoint, weight_files
from diffsynth.runtime.errors import CheckpointError
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.testing.modules import load_beside

gguf = pytest.importorskip("gguf")
pytest.importorskip("diffsynth.flux")

from diffsynth.runtime.gguf import MODE_ENV, GGUFLinear, is_gguf  # noqa: E402 - after the importorskip

helpers = load_beside(__file__, "helpers.py", "diffsynth_runtime_test_helpers")

T = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def flux_tensors() -> dict[str, tuple[object, object]]:
    """A tiny FLUX.1 DiT in BFL names (city96's files keep them): Linears with rows of whole blocks as Q8_0."""
    from diffsynth.flux.flux1.dit import Flux1DiT, Flux1DiTConfig
    from diffsynth.runtime.testing.weights import random_weights

    config = Flux1DiTConfig(in_channels=16, out_channels=16, vec_in_dim=24, context_in_dim=32, hidden_size=128,
                            num_heads=1, depth=1, depth_single_blocks=1, axes_dim=(16, 56, 56))  # fmt: skip
    model = random_weights(Flux1DiT(config), 3, scale=0.2, is_norm=lambda name, p: name.endswith(".scale"))
    tensors = {}
    for key, value in model.state_dict().items():
        array = value.float().numpy()
        if value.dim() == 2 and value.shape[1] % 32 == 0:
            tensors[key] = (gguf.quants.quantize(array, T.Q8_0), T.Q8_0)
        else:
            tensors[key] = (array, None)
    return tensors


def load_dit(path) -> nn.Module:
    """The DiT of `path` through the pipeline's loader (GGUF detected there, Linears kept packed)."""
    from diffsynth.runtime.pipeline import BasePipeline

    class DiTOnly(BasePipeline):
        model_slots = {"dit": "dit"}

    return DiTOnly.from_pretrained(model_configs=[ModelConfig(path=str(path))], device="cpu",
                                   torch_dtype=torch.float32).dit  # fmt: skip


def assert_same_model(a: nn.Module, b: nn.Module) -> None:
    packed = {n for n, m in a.named_modules() if isinstance(m, GGUFLinear)}
    assert packed and packed == {n for n, m in b.named_modules() if isinstance(m, GGUFLinear)}
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def test_a_folder_with_one_gguf_loads_as_that_file(flux_tensors, tmp_path, monkeypatch):
    monkeypatch.delenv(MODE_ENV, raising=False)
    reference = load_dit(helpers.write_gguf(tmp_path / "flux1-dev-Q8_0.gguf", flux_tensors))

    plain = tmp_path / "plain"
    plain.mkdir()
    file = helpers.write_gguf(plain / "flux1-dev-Q8_0.gguf", flux_tensors)
    assert weight_files(str(plain)) == [str(file)] and is_gguf([str(plain)])
    assert_same_model(load_dit(plain), reference)

    # a Hugging Face style download: the model card, attributes and a config beside the one .gguf
    hf = tmp_path / "FLUX.1-dev-gguf"
    hf.mkdir()
    (hf / "README.md").write_text("---\nlicense: other\n---\n")
    (hf / ".gitattributes").write_text("*.gguf filter=lfs diff=lfs merge=lfs -text\n")
    (hf / "config.json").write_text("{}")  # not a diffsynth config; the file's shapes give the model's
    shutil.copy(file, hf / "flux1-dev-Q8_0.gguf")
    assert is_gguf([str(hf)])
    assert_same_model(load_dit(hf), reference)

    # a hub cache snapshot: the names are symlinks into blobs/ (whose names have no suffix)
    blobs, snapshot = tmp_path / "cache" / "blobs", tmp_path / "cache" / "snapshots" / "0123abcd"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    shutil.copy(file, blobs / "9f86d081884c7d65")
    os.symlink(blobs / "9f86d081884c7d65", snapshot / "flux1-dev-Q8_0.gguf")
    assert is_gguf([str(snapshot)])
    assert_same_model(load_dit(snapshot), reference)


def test_the_shards_of_one_split_gguf_are_one_model(flux_tensors, tmp_path):
    keys = sorted(flux_tensors)
    half = len(keys) // 2
    folder = tmp_path / "split"
    folder.mkdir()
    for i, part in enumerate((keys[:half], keys[half:]), start=1):
        helpers.write_gguf(folder / f"flux1-dev-Q8_0-0000{i}-of-00002.gguf", {k: flux_tensors[k] for k in part})
    assert len(weight_files(str(folder))) == 2 and is_gguf([str(folder)])
    assert sorted(open_checkpoint(str(folder))) == keys


def test_several_ggufs_in_one_folder_are_an_error_listing_them(flux_tensors, tmp_path):
    folder = tmp_path / "FLUX.1-dev-gguf"
    folder.mkdir()
    (folder / "README.md").write_text("variants")
    for name in ("flux1-dev-Q4_0.gguf", "flux1-dev-Q8_0.gguf"):
        helpers.write_gguf(folder / name, flux_tensors)
    message = (rf"{folder} holds several GGUF files \['flux1-dev-Q4_0.gguf', 'flux1-dev-Q8_0.gguf'\]; pass the path "
               rf"of the one to load, e.g. {folder}/flux1-dev-Q4_0.gguf")  # fmt: skip
    with pytest.raises(CheckpointError, match=message):
        weight_files(str(folder))
    assert not is_gguf([str(folder)])  # detection leaves the error to the loader, which says it
    with pytest.raises(CheckpointError, match=message):
        load_dit(folder)
    assert load_dit(folder / "flux1-dev-Q8_0.gguf") is not None  # the path it asks for loads
