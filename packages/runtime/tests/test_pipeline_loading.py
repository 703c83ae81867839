"""What `from_pretrained` takes from a local folder and from a hub repo's folder: a diffusers-style folder gives the
files `load_model` would pick, and a companion `config.json` is looked for per pattern, locally only when the
weights needed no download (no network, ever: the download function is replaced)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffsynth.runtime import hub
from diffsynth.runtime.errors import CheckpointError
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.pipeline import configs_from_folder, fetch_companion_config
from diffsynth.runtime.testing.modules import load_beside

helpers = load_beside(__file__, "helpers.py", "diffsynth_runtime_test_helpers")
SHARDS = ["diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_pytorch_model-00002-of-00002.safetensors"]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ("DIFFSYNTH_DOWNLOAD_SOURCE", "DIFFSYNTH_MODEL_BASE_PATH", "DIFFSYNTH_SKIP_DOWNLOAD"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def downloads(monkeypatch):
    """Every download asked for (none is made): the hub's folder must be complete for what a test resolves."""
    calls = []
    monkeypatch.setattr(hub, "_download", lambda *args: calls.append(args))
    return calls


def write_variants(folder: Path, state: dict[str, torch.Tensor]) -> None:
    """A diffusers model folder holding the model three ways: .safetensors, .bin, and two shards with an index."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
    torch.save(state, folder / "diffusion_pytorch_model.bin")
    keys = sorted(state)
    parts = {SHARDS[0]: keys[: len(keys) // 2], SHARDS[1]: keys[len(keys) // 2 :]}
    for name, part in parts.items():
        save_file({k: state[k] for k in part}, str(folder / name))
    index = {"weight_map": {k: name for name, part in parts.items() for k in part}}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))


def test_a_folder_gives_the_files_load_model_takes(tmp_path):
    """Every weight file of a subfolder was one ModelConfig: a .bin beside the .safetensors (or a consolidated
    file beside a shard set) then held every key twice, which load_model(subfolder) never sees."""
    state = {"a.weight": torch.ones(2, 2), "b.weight": torch.zeros(2)}
    both = tmp_path / "both" / "transformer"
    both.mkdir(parents=True)
    save_file(state, str(both / "diffusion_pytorch_model.safetensors"))
    torch.save(state, both / "diffusion_pytorch_model.bin")
    (configs, _) = configs_from_folder(both.parent)
    assert [c.path for c in configs] == [[str(both / "diffusion_pytorch_model.safetensors")]]

    sharded = tmp_path / "sharded" / "transformer"
    write_variants(sharded, state)
    (configs, _) = configs_from_folder(sharded.parent)
    assert [c.path for c in configs] == [[str(sharded / name) for name in SHARDS]]


def test_a_folder_keeps_every_model_beside_a_shard_set(tmp_path):
    """Different models in one folder (Wan's root: DiT shards beside CLIP / T5 / VAE .pth files) all stay; only a
    second copy of one model (transformers' pytorch_model.bin beside model.safetensors) is left out."""
    state = {"a.weight": torch.ones(2, 2), "b.weight": torch.zeros(2)}
    write_variants(tmp_path / "root", state)
    torch.save(state, tmp_path / "root" / "Wan2.1_VAE.pth")
    encoder = tmp_path / "root" / "text_encoder"
    encoder.mkdir()
    save_file(state, str(encoder / "model.safetensors"))
    torch.save(state, encoder / "pytorch_model.bin")
    (configs, _) = configs_from_folder(tmp_path / "root")
    root = tmp_path / "root"
    assert [c.path for c in configs] == [
        [str(root / "Wan2.1_VAE.pth"), *(str(root / name) for name in SHARDS)],
        [str(encoder / "model.safetensors")],
    ]


def test_from_pretrained_loads_a_folder_with_bin_and_safetensors_variants(tmp_path):
    ZImagePipeline = pytest.importorskip("diffsynth.z_image").ZImagePipeline  # runs with the z-image package

    repo = helpers.tiny_z_image_repo(tmp_path / "repo")
    expected = load_file(str(repo / "transformer" / "diffusion_pytorch_model.safetensors"))
    (repo / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    write_variants(repo / "transformer", expected)
    pipe = ZImagePipeline.from_pretrained(str(repo), torch_dtype=torch.float32, device="cpu")
    state = pipe.dit.state_dict()
    assert all(torch.equal(state[k], v) for k, v in expected.items())


def hub_folder(tmp_path: Path) -> Path:
    """models/Org/Model as DiffSynth-Studio fills it: the weights, a config.json for the transformer only."""
    root = tmp_path / "models" / "Org" / "Model"
    for sub in ("transformer", "vae"):
        (root / sub).mkdir(parents=True)
        save_file({"w": torch.zeros(1)}, str(root / sub / "diffusion_pytorch_model.safetensors"))
    (root / "transformer" / "config.json").write_text("{}")
    return root


def test_a_list_pattern_gets_the_companion_config_of_each_folder(tmp_path, downloads):
    """A list `origin_file_pattern` (DiffSynth-Studio accepts them) was a bare TypeError in os.path.dirname."""
    root = hub_folder(tmp_path)
    shutil.rmtree(root / "vae")
    config = ModelConfig(
        model_id="Org/Model",
        origin_file_pattern=["transformer/diffusion_pytorch_model.safetensors", "transformer/config.json"],
        local_model_path=str(tmp_path / "models"),
        skip_download=True,
    )
    config.resolve()
    fetch_companion_config(config)
    assert downloads == []


def test_weights_found_locally_mean_no_download_for_their_config(tmp_path, downloads):
    """A complete local folder without vae/config.json went to the network for it on every load (25 s offline)."""
    hub_folder(tmp_path)
    config = ModelConfig(
        model_id="Org/Model", origin_file_pattern="vae/*.safetensors", local_model_path=str(tmp_path / "models")
    )
    config.resolve()
    fetch_companion_config(config)
    assert downloads == []


def test_weights_that_were_downloaded_bring_their_config(tmp_path, downloads):
    root = hub_folder(tmp_path)
    shutil.rmtree(root / "vae")
    config = ModelConfig(
        model_id="Org/Model", origin_file_pattern="vae/*.safetensors", local_model_path=str(tmp_path / "models")
    )
    with pytest.raises(CheckpointError, match="did not bring them"):  # the fake hub brings nothing
        config.resolve()
    fetch_companion_config(config)
    assert [call[3] for call in downloads] == [["vae/*.safetensors"], ["vae/config.json"]]
