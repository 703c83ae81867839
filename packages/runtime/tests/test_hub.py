"""ModelConfig: local folders first, env defaults, and downloads only of what is missing (no network)."""

import json
import sys
import types
from pathlib import Path

import pytest
import torch

from diffsynth.runtime import hub
from diffsynth.runtime.errors import CheckpointError, ConfigError
from diffsynth.runtime.hub import ModelConfig

ENV = ("DIFFSYNTH_DOWNLOAD_SOURCE", "DIFFSYNTH_MODEL_BASE_PATH", "DIFFSYNTH_SKIP_DOWNLOAD")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"download attempted: {args} {kwargs}")

    monkeypatch.setattr(hub, "_download", refuse)


@pytest.fixture
def repo(tmp_path):
    """models/Org/Model with a sharded transformer, a vae file and a tokenizer folder."""
    root = tmp_path / "models" / "Org" / "Model"
    (root / "transformer").mkdir(parents=True)
    shards = [f"diffusion_pytorch_model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    for name in shards:
        (root / "transformer" / name).write_bytes(b"x")
    index = {"weight_map": {f"w{i}": name for i, name in enumerate(shards)}}
    (root / "transformer" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    (root / "vae").mkdir()
    (root / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "tokenizer.json").write_text("{}")
    return root


def test_defaults_and_env(monkeypatch, tmp_path):
    config = ModelConfig(model_id="Org/Model")
    assert (config.download_source, config.local_model_path, config.skip_download) == ("modelscope", "./models", False)
    monkeypatch.setenv("DIFFSYNTH_DOWNLOAD_SOURCE", "HuggingFace")
    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(tmp_path))
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "true")
    config = ModelConfig(model_id="Org/Model")
    assert (config.download_source, config.local_model_path, config.skip_download) == (
        "huggingface",
        str(tmp_path),
        True,
    )
    explicit = ModelConfig(
        model_id="Org/Model", download_source="modelscope", local_model_path="x", skip_download=False
    )
    assert (explicit.download_source, explicit.local_model_path, explicit.skip_download) == ("modelscope", "x", False)


@pytest.mark.parametrize(
    ("env", "value", "match"),
    [
        ("DIFFSYNTH_DOWNLOAD_SOURCE", "civitai", "DIFFSYNTH_DOWNLOAD_SOURCE='civitai'.*modelscope"),
        ("DIFFSYNTH_SKIP_DOWNLOAD", "maybe", "DIFFSYNTH_SKIP_DOWNLOAD='maybe'"),
    ],
)
def test_bad_env_values_are_named(monkeypatch, env, value, match):
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError, match=match):
        ModelConfig(model_id="Org/Model")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "needs path=.* or model_id"),
        ({"model_id": "Org/M", "download_source": "s3"}, "download_source='s3'"),
        ({"model_id": "Org/M", "skip_download": "yes"}, "skip_download must be"),
        ({"model_id": "Org/M", "origin_file_pattern": 3}, "origin_file_pattern"),
        ({"path": 3}, "path must be"),
        ({"path": "x", "offload_dtype": "float8"}, "offload_dtype: unknown dtype 'float8'"),
        ({"path": "x", "onload_device": "gpu"}, "onload_device: unknown device 'gpu'"),
    ],
)
def test_bad_fields(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig(**kwargs)


def test_vram_keys_are_parsed():
    config = ModelConfig(
        path="x",
        offload_dtype="fp8_e4m3fn",
        offload_device="disk",
        onload_dtype=torch.bfloat16,
        onload_device=torch.device("cpu"),
        computation_dtype="torch.bfloat16",
        computation_device="cuda:0",
    )
    assert config.vram_config() == {
        "offload_dtype": torch.float8_e4m3fn,
        "offload_device": "disk",
        "onload_dtype": torch.bfloat16,
        "onload_device": "cpu",
        "preparing_dtype": None,
        "preparing_device": None,
        "computation_dtype": torch.bfloat16,
        "computation_device": "cuda:0",
    }


def test_local_folder_with_skip_download(monkeypatch, repo, no_network):
    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(repo.parents[1]))
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "1")
    config = ModelConfig(model_id="Org/Model", origin_file_pattern="transformer/*.safetensors")
    paths = config.resolve()
    assert [p.rsplit("/", 1)[1] for p in paths] == sorted(p.name for p in (repo / "transformer").glob("*.safetensors"))
    assert config.path is None  # resolve() does not change the config
    tokenizer = ModelConfig(model_id="Org/Model", origin_file_pattern="tokenizer/")
    assert tokenizer.resolve() == [str(repo / "tokenizer")]
    both = ModelConfig(model_id="Org/Model", origin_file_pattern=["vae/*.safetensors", "tokenizer/"])
    assert both.resolve() == [str(repo / "vae" / "diffusion_pytorch_model.safetensors"), str(repo / "tokenizer")]
    assert ModelConfig(model_id="Org/Model").resolve() == [str(repo)]


def test_complete_local_files_need_no_download_even_when_allowed(repo, no_network):
    config = ModelConfig(
        model_id="Org/Model", origin_file_pattern="transformer/*", local_model_path=str(repo.parents[1])
    )
    assert len(config.resolve()) == 4  # three shards and the index


def test_download_if_necessary_sets_path_like_diffsynth_studio(repo, no_network):
    config = ModelConfig(
        model_id="Org/Model", origin_file_pattern="vae/*.safetensors", local_model_path=str(repo.parents[1])
    )
    assert config.download_if_necessary() == [str(repo / "vae" / "diffusion_pytorch_model.safetensors")]
    assert config.path == str(repo / "vae" / "diffusion_pytorch_model.safetensors")


def test_pattern_matching_nothing_is_a_clear_error(repo, no_network):
    config = ModelConfig(
        model_id="Org/Model", origin_file_pattern="text_encoder/*.safetensors", local_model_path=str(repo.parents[1])
    )
    config.skip_download = True
    with pytest.raises(CheckpointError) as info:
        config.resolve()
    message = str(info.value)
    assert "text_encoder/*.safetensors" in message and str(repo) in message
    assert "transformer/" in message and "vae/" in message  # what is there
    assert "DIFFSYNTH_SKIP_DOWNLOAD=0" in message


def test_missing_model_folder_points_at_the_nearest_one(tmp_path, no_network):
    config = ModelConfig(model_id="Org/Nope", origin_file_pattern="*.safetensors", local_model_path=str(tmp_path))
    config.skip_download = True
    with pytest.raises(CheckpointError, match="nearest existing folder"):
        config.resolve()


def test_only_missing_shards_are_downloaded(repo, monkeypatch):
    missing = repo / "transformer" / "diffusion_pytorch_model-00002-of-00003.safetensors"
    missing.unlink()
    calls = []

    def fake_download(source, model_id, local_dir, allow_patterns, ignore_patterns):
        calls.append((source, model_id, local_dir, allow_patterns, ignore_patterns))
        missing.write_bytes(b"x")

    monkeypatch.setattr(hub, "_download", fake_download)
    config = ModelConfig(
        model_id="Org/Model", origin_file_pattern="transformer/*", local_model_path=str(repo.parents[1])
    )
    paths = config.resolve()
    assert str(missing) in paths and len(paths) == 4
    ((source, model_id, local_dir, allow, ignore),) = calls
    assert (source, model_id, local_dir, allow) == ("modelscope", "Org/Model", str(repo), ["transformer/*"])
    assert sorted(ignore) == [
        "transformer/*/*",  # what "transformer/*" matches locally: no deeper files
        "transformer/diffusion_pytorch_model-00001-of-00003.safetensors",
        "transformer/diffusion_pytorch_model-00003-of-00003.safetensors",
        "transformer/diffusion_pytorch_model.safetensors.index.json",
    ]
    config.resolve()
    assert len(calls) == 1  # complete now: no second download


def test_missing_shard_with_downloads_off_names_the_shard(repo, no_network):
    (repo / "transformer" / "diffusion_pytorch_model-00003-of-00003.safetensors").unlink()
    config = ModelConfig(
        model_id="Org/Model",
        origin_file_pattern="transformer/*",
        local_model_path=str(repo.parents[1]),
        skip_download=True,
    )
    with pytest.raises(CheckpointError, match="missing shard .*diffusion_pytorch_model-00003-of-00003.safetensors"):
        config.resolve()


def test_download_that_brings_nothing(repo, monkeypatch):
    monkeypatch.setattr(hub, "_download", lambda *args: None)
    config = ModelConfig(model_id="Org/Model", origin_file_pattern="unet/*", local_model_path=str(repo.parents[1]))
    with pytest.raises(CheckpointError, match="no match for 'unet/\\*'.*did not bring them"):
        config.resolve()


def test_download_failure_is_one_clear_error(repo, monkeypatch):
    def offline(*args):
        raise OSError("network is unreachable")

    monkeypatch.setattr(hub, "_download", offline)
    config = ModelConfig(model_id="Org/Model", origin_file_pattern="unet/*", local_model_path=str(repo.parents[1]))
    with pytest.raises(CheckpointError, match="from modelscope failed: OSError: network is unreachable.*huggingface"):
        config.resolve()


@pytest.mark.parametrize(
    ("source", "module", "first_arg"),
    [("modelscope", "modelscope", "model_id"), ("huggingface", "huggingface_hub", "repo_id")],
)
def test_hub_clients_get_local_dir_and_patterns(tmp_path, monkeypatch, source, module, first_arg):
    seen = {}

    def snapshot_download(*args, **kwargs):
        seen.update(kwargs, args=args)
        (tmp_path / "Org" / "Model").mkdir(parents=True, exist_ok=True)
        (tmp_path / "Org" / "Model" / "model.safetensors").write_bytes(b"x")

    monkeypatch.setitem(sys.modules, module, types.SimpleNamespace(snapshot_download=snapshot_download))
    config = ModelConfig(
        model_id="Org/Model",
        origin_file_pattern="*.safetensors",
        local_model_path=str(tmp_path),
        download_source=source,
    )
    assert config.resolve() == [str(tmp_path / "Org" / "Model" / "model.safetensors")]
    assert seen["local_dir"] == str(tmp_path / "Org" / "Model")
    assert seen["allow_patterns"] == ["*.safetensors"] and seen["ignore_patterns"] == ["*/*"]  # root files only
    assert "Org/Model" in (*seen["args"], seen.get(first_arg))


def test_explicit_path(tmp_path, no_network):
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"x")
    assert ModelConfig(path=file).resolve() == [str(file)]
    assert ModelConfig(path=[str(file), tmp_path]).resolve() == [str(file), str(tmp_path)]
    with pytest.raises(CheckpointError, match="other.safetensors does not exist.*model.safetensors"):
        ModelConfig(path=str(tmp_path / "other.safetensors")).resolve()


REMOTE = {
    "README.md": b"x",
    "config.json": b"{}",
    "lora.safetensors": b"lora",
    "full_model/diffusion_pytorch_model.safetensors": b"big",
    "checkpoints/step-1000/lora.safetensors": b"old",
    "vae/diffusion_pytorch_model.safetensors": b"vae",
    "vae/old/diffusion_pytorch_model.safetensors": b"old vae",
}


@pytest.fixture
def fake_hub(monkeypatch):
    """A hub holding REMOTE that filters as both hubs do (fnmatch, where '*' crosses '/'); records each call."""
    import fnmatch

    calls = []

    def fake_download(source, model_id, local_dir, allow_patterns, ignore_patterns):
        calls.append((allow_patterns, ignore_patterns))
        for name, data in REMOTE.items():
            if allow_patterns is not None and not any(fnmatch.fnmatch(name, p) for p in allow_patterns):
                continue
            if any(fnmatch.fnmatch(name, p) for p in ignore_patterns or []):
                continue
            target = Path(local_dir) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)

    monkeypatch.setattr(hub, "_download", fake_download)
    return calls


def downloaded(root) -> list[str]:
    return sorted(f.relative_to(root).as_posix() for f in root.rglob("*") if f.is_file())


def test_a_root_pattern_downloads_root_files_only(tmp_path, fake_hub):
    """ "*.safetensors" (what `load_lora("Org/Name")` asks for) brought every .safetensors of the repo's subfolders
    too, since the hubs' fnmatch lets '*' cross '/', while only the root file is used."""
    config = ModelConfig(model_id="Org/Lora", origin_file_pattern="*.safetensors", local_model_path=str(tmp_path))
    assert config.resolve() == [str(tmp_path / "Org" / "Lora" / "lora.safetensors")]
    assert downloaded(tmp_path / "Org" / "Lora") == ["lora.safetensors"]
    mixed = ModelConfig(
        model_id="Org/Mixed", origin_file_pattern=["*.json", "vae/*.safetensors"], local_model_path=str(tmp_path)
    )
    mixed.resolve()
    assert downloaded(tmp_path / "Org" / "Mixed") == ["config.json", "vae/diffusion_pytorch_model.safetensors"]
    assert fake_hub[-2:] == [(["vae/*.safetensors"], ["vae/*/*"]), (["*.json"], ["*/*"])]


@pytest.mark.parametrize("pattern", [None, "", ".", "./", ["./"]])
def test_diffsynth_studio_whole_repo_patterns_download_the_repo(tmp_path, fake_hub, pattern):
    """DiffSynth-Studio treats None, "" and "./" alike (the whole repo); "./" downloaded nothing ("no match")."""
    config = ModelConfig(model_id="Org/Repo", origin_file_pattern=pattern, local_model_path=str(tmp_path))
    assert config.resolve() == [str(tmp_path / "Org" / "Repo")]
    assert fake_hub == [(None, None)] and downloaded(tmp_path / "Org" / "Repo") == sorted(REMOTE)


def test_a_leading_dot_slash_is_dropped(tmp_path, fake_hub):
    config = ModelConfig(model_id="Org/Repo", origin_file_pattern="./vae/", local_model_path=str(tmp_path))
    assert config.resolve() == [str(tmp_path / "Org" / "Repo" / "vae")]
    assert fake_hub == [(["vae/*"], None)]


def test_a_tilde_in_paths_is_the_home_folder(tmp_path, monkeypatch, no_network):
    """`~` from a .env file or a config (no shell to expand it) was taken literally: files under ~ were not found
    and downloads went into a './~' folder."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "models" / "Org" / "M").mkdir(parents=True)
    (tmp_path / "models" / "Org" / "M" / "a.safetensors").write_bytes(b"x")
    expected = [str(tmp_path / "models" / "Org" / "M" / "a.safetensors")]
    given = ModelConfig(model_id="Org/M", origin_file_pattern="a.safetensors", local_model_path="~/models")
    assert given.local_model_path == str(tmp_path / "models") and given.resolve() == expected
    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", "~/models")
    assert ModelConfig(model_id="Org/M", origin_file_pattern="a.safetensors").resolve() == expected
    assert ModelConfig(path="~/models/Org/M/a.safetensors").resolve() == expected
    assert ModelConfig(path=["~/models/Org/M/a.safetensors"]).resolve() == expected


def test_a_subfolder_pattern_downloads_that_folder_s_files_only(tmp_path, fake_hub):
    """ "vae/*.safetensors" also brought vae/old/... (the hubs' '*' crosses '/'), which the local glob never uses."""
    config = ModelConfig(model_id="Org/Vae", origin_file_pattern="vae/*.safetensors", local_model_path=str(tmp_path))
    assert config.resolve() == [str(tmp_path / "Org" / "Vae" / "vae" / "diffusion_pytorch_model.safetensors")]
    assert downloaded(tmp_path / "Org" / "Vae") == ["vae/diffusion_pytorch_model.safetensors"]
    assert fake_hub == [(["vae/*.safetensors"], ["vae/*/*"])]
    both = ["vae/*.safetensors", "vae/old/*.safetensors"]  # the deeper one must not be ignored by the first
    ModelConfig(model_id="Org/Both", origin_file_pattern=both, local_model_path=str(tmp_path)).resolve()
    assert downloaded(tmp_path / "Org" / "Both") == [
        "vae/diffusion_pytorch_model.safetensors",
        "vae/old/diffusion_pytorch_model.safetensors",
    ]


def test_a_modelscope_incomplete_file_is_no_download(repo, monkeypatch):
    """ModelScope writes `<file>.incomplete` while downloading: "transformer/*.safetensors*" matched it, so the
    cut-off download counted as done, and a stale shard's .incomplete invented a shard set."""
    transformer = repo / "transformer"
    for shard in transformer.glob("*-of-00003.safetensors"):
        (transformer / (shard.name + ".incomplete")).write_bytes(b"stale")
    config = ModelConfig(
        model_id="Org/Model", origin_file_pattern="transformer/*.safetensors*", local_model_path=str(repo.parents[1])
    )
    config.skip_download = True
    assert sorted(Path(p).name for p in config.resolve()) == sorted(
        p.name for p in transformer.glob("*") if not p.name.endswith(".incomplete")
    )
    (repo / "vae" / "diffusion_pytorch_model.safetensors").rename(repo / "vae" / "model.safetensors.incomplete")
    calls = []

    def fake_download(source, model_id, local_dir, allow, ignore):
        calls.append(allow)
        (Path(local_dir) / "vae" / "model.safetensors").write_bytes(b"x")

    monkeypatch.setattr(hub, "_download", fake_download)
    vae = ModelConfig(
        model_id="Org/Model", origin_file_pattern="vae/*.safetensors*", local_model_path=str(repo.parents[1])
    )
    assert vae.resolve() == [str(repo / "vae" / "model.safetensors")] and calls == [["vae/*.safetensors*"]]


@pytest.mark.parametrize("pattern", ["tokenizer/", None])
def test_an_interrupted_folder_download_is_resumed(tmp_path, monkeypatch, pattern):
    """A folder (or whole repo) counted as present once any file was there: a download cut off between files was
    never completed. Our pending marker tells it from a folder copied by hand."""
    remote = {"tokenizer/tokenizer.json": b"{}", "tokenizer/vocab.json": b"{}", "tokenizer/merges.txt": b"x"}
    calls = []

    def cut_off(source, model_id, local_dir, allow, ignore):
        calls.append(ignore)
        (Path(local_dir) / "tokenizer").mkdir(parents=True, exist_ok=True)
        (Path(local_dir) / "tokenizer" / "tokenizer.json").write_bytes(b"{}")
        raise ConnectionError("connection reset")

    def complete(source, model_id, local_dir, allow, ignore):
        calls.append(ignore)
        for name, data in remote.items():
            if name not in (ignore or []):
                (Path(local_dir) / name).write_bytes(data)

    root = tmp_path / "Org" / "Tok"
    monkeypatch.setattr(hub, "_download", cut_off)
    config = ModelConfig(model_id="Org/Tok", origin_file_pattern=pattern, local_model_path=str(tmp_path))
    with pytest.raises(CheckpointError, match="connection reset"):
        config.resolve()
    config.skip_download = True
    with pytest.raises(CheckpointError, match="not fully downloaded .*download marker"):
        config.resolve()
    config.skip_download = False
    monkeypatch.setattr(hub, "_download", complete)
    assert config.resolve() == [str(root / "tokenizer" if pattern else root)]
    assert calls[-1] == ["tokenizer/tokenizer.json"]  # the present file is not fetched again
    assert downloaded(root) == sorted(remote)  # the marker is gone
    config.resolve()
    assert len(calls) == 2


def test_a_folder_copied_by_hand_is_used_as_is_but_temp_files_mean_cut_off(repo, monkeypatch, no_network):
    config = ModelConfig(model_id="Org/Model", origin_file_pattern="tokenizer/", local_model_path=str(repo.parents[1]))
    assert config.resolve() == [str(repo / "tokenizer")]  # no marker: no network asked
    (repo / "tokenizer" / "vocab.json.incomplete").write_bytes(b"x")
    config.skip_download = True
    with pytest.raises(CheckpointError, match="not fully downloaded .*vocab.json.incomplete is there: delete it if"):
        config.resolve()


def test_another_hub_s_temp_files_are_removed_once_a_download_succeeds(tmp_path, monkeypatch):
    """A ModelScope download cut off leaves `vocab.json.incomplete`; Hugging Face then completes the folder. The stale
    temp file (no client removes it) kept the folder 'cut off' for ever: each resolve asked the hub and failed."""
    remote = {"tokenizer/tokenizer.json": b"{}", "tokenizer/vocab.json": b"{}", "tokenizer/merges.txt": b"x"}
    root = tmp_path / "Org" / "Tok"
    hf_temp = root / ".cache" / "huggingface" / "download" / "tokenizer" / "abc.merges.txt.incomplete"
    calls = []

    def modelscope_cut_off(source, model_id, local_dir, allow, ignore):
        calls.append(source)
        (root / "tokenizer").mkdir(parents=True)
        (root / "tokenizer" / "tokenizer.json").write_bytes(b"{}")
        (root / "tokenizer" / "vocab.json.incomplete").write_bytes(b"{")
        hf_temp.parent.mkdir(parents=True)
        hf_temp.write_bytes(b"x")
        raise ConnectionError("connection reset")

    def huggingface_ok(source, model_id, local_dir, allow, ignore):
        calls.append(source)
        for name, data in remote.items():
            (root / name).write_bytes(data)

    config = dict(model_id="Org/Tok", origin_file_pattern="tokenizer/", local_model_path=str(tmp_path))
    monkeypatch.setattr(hub, "_download", modelscope_cut_off)
    with pytest.raises(CheckpointError, match="connection reset"):
        ModelConfig(**config).resolve()
    monkeypatch.setattr(hub, "_download", huggingface_ok)
    assert ModelConfig(**config, download_source="huggingface").resolve() == [str(root / "tokenizer")]
    assert not hf_temp.exists() and sorted(p.name for p in (root / "tokenizer").iterdir()) == [
        "merges.txt",
        "tokenizer.json",
        "vocab.json",
    ]
    assert ModelConfig(**config, skip_download=True).resolve() == [str(root / "tokenizer")]
    assert calls == ["modelscope", "huggingface"]


@pytest.mark.parametrize("error", [ConfigError("pip install modelscope"), OSError("unknown repo")])
def test_a_download_that_brought_nothing_leaves_no_marker(tmp_path, monkeypatch, error):
    """A failed call that fetched nothing (no client, unknown repo, no network) left its pending marker: a complete
    folder copied there by hand later was refused offline and downloaded again online."""

    def fail(*args):
        raise error

    monkeypatch.setattr(hub, "_download", fail)
    config = dict(
        model_id="Org/Tok", origin_file_pattern=["tokenizer/", "text_encoder/"], local_model_path=str(tmp_path)
    )
    with pytest.raises((ConfigError, CheckpointError)):
        ModelConfig(**config).resolve()
    root = tmp_path / "Org" / "Tok"
    assert not (root / hub.MARKER_FOLDER).exists()
    for folder in ("tokenizer", "text_encoder"):
        (root / folder).mkdir()
        (root / folder / "config.json").write_text("{}")
    monkeypatch.setattr(hub, "_download", lambda *args: pytest.fail("a folder copied by hand was downloaded again"))
    expected = [str(root / "tokenizer"), str(root / "text_encoder")]
    assert ModelConfig(**config, skip_download=True).resolve() == expected
    assert ModelConfig(**config).resolve() == expected


def test_markers_of_pending_downloads_are_not_loaded(repo):
    """A whole-repo config returns the folder: the marker folder of another pattern's cut-off download is no file
    the loader reads."""
    from safetensors.torch import save_file

    from diffsynth.runtime.checkpoint import weight_files

    save_file({"w": torch.zeros(2)}, str(repo / "model.safetensors"))
    whole = ModelConfig(model_id="Org/Model", local_model_path=str(repo.parents[1]), skip_download=True)
    ModelConfig(
        model_id="Org/Model", origin_file_pattern="text_encoder/", local_model_path=str(repo.parents[1])
    )._mark_pending(["text_encoder/"])
    assert list((repo / hub.MARKER_FOLDER).iterdir())
    assert whole.resolve() == [str(repo)]
    assert weight_files(whole.resolve()) == [str(repo / "model.safetensors")]


@pytest.mark.parametrize(
    ("source", "module", "model_id", "asked"),
    [
        ("huggingface", "huggingface_hub", "PAI/Wan2.1-Fun-1.3B-InP", "alibaba-pai/Wan2.1-Fun-1.3B-InP"),
        ("huggingface", "huggingface_hub", "pai/X", "alibaba-pai/X"),
        ("huggingface", "huggingface_hub", "alibaba-pai/X", "alibaba-pai/X"),  # Z-Image's CONTROLNET_FILES names
        ("modelscope", "modelscope", "PAI/Wan2.1-Fun-1.3B-InP", "PAI/Wan2.1-Fun-1.3B-InP"),
    ],
)
def test_modelscope_org_ids_are_renamed_for_hugging_face(tmp_path, monkeypatch, source, module, model_id, asked):
    """`PAI/...` (ModelScope) is `alibaba-pai/...` on Hugging Face; the local folder keeps the id as given."""
    seen = []

    def snapshot_download(*args, **kwargs):
        seen.append(kwargs.get("repo_id") or kwargs.get("model_id") or args[0])
        raise OSError("offline")

    monkeypatch.setitem(sys.modules, module, types.SimpleNamespace(snapshot_download=snapshot_download))
    config = ModelConfig(
        model_id=model_id, origin_file_pattern="*.safetensors", local_model_path=str(tmp_path), download_source=source
    )
    with pytest.raises(CheckpointError, match=f"downloading '{asked}'"):
        config.resolve()
    assert seen == [asked] and config.local_folder == str(tmp_path / model_id)
