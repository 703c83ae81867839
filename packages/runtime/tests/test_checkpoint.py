"""Lazy state dicts: headers only until a tensor is asked for; shards, pickles and broken files."""

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffsynth.runtime import checkpoint
from diffsynth.runtime.checkpoint import open_checkpoint
from diffsynth.runtime.errors import CheckpointError, ConfigError


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(4, 3, generator=gen),
        "a.bias": torch.randn(4, generator=gen).to(torch.bfloat16),
        "b.weight": torch.randn(2, 4, generator=gen).to(torch.float16),
        "ids": torch.arange(5),
        "fp8": torch.randn(3, 2, generator=gen).to(torch.float8_e4m3fn),
    }


def _write_sharded(folder, tensors, *, index: bool = True) -> list[str]:
    keys = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": keys[:2], "model-00002-of-00002.safetensors": keys[2:]}
    for name, part in halves.items():
        save_file({k: tensors[k] for k in part}, str(folder / name))
    if index:
        weight_map = {k: name for name, part in halves.items() for k in part}
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return list(halves)


def test_single_file_lists_and_reads(tmp_path):
    tensors = _tensors()
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    state = open_checkpoint(path)
    assert state.files == [str(path)]
    assert sorted(state) == sorted(tensors) and len(state) == 5 and "a.weight" in state
    assert state.shapes()["a.weight"] == (4, 3)
    assert state.dtypes()["a.bias"] == torch.bfloat16 and state.dtypes()["fp8"] == torch.float8_e4m3fn
    assert state.parameter_count() == sum(t.numel() for t in tensors.values())
    assert state.metadata == {"format": "pt"}
    meta = state.meta_state_dict()
    assert meta["b.weight"].is_meta and meta["b.weight"].shape == (2, 4) and meta["b.weight"].dtype == torch.float16
    for key, tensor in tensors.items():
        assert torch.equal(state[key].view(torch.uint8), tensor.view(torch.uint8)), key


def test_listing_reads_no_tensor_data(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    save_file({"big": torch.zeros(256, 256), "small": torch.ones(2)}, str(path))

    def no_mapping(*args, **kwargs):
        raise AssertionError("tensor data was mapped while only listing")

    monkeypatch.setattr(checkpoint.mmap, "mmap", no_mapping)
    state = open_checkpoint(path)
    assert state.shapes() == {"big": (256, 256), "small": (2,)}
    assert state.parameter_count() == 256 * 256 + 2
    assert state.meta_state_dict()["big"].is_meta
    assert state.nbytes() == (256 * 256 + 2) * 4
    with pytest.raises(AssertionError, match="mapped"):
        state["small"]  # only asking for a tensor touches the data


def test_tensors_are_copy_on_write_views_of_the_file(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.zeros(8)}, str(path))
    tensor = open_checkpoint(path)["w"]
    tensor += 1  # writable, but the file is never changed
    assert torch.equal(load_file(str(path))["w"], torch.zeros(8))


def test_handwritten_header_with_unaligned_offsets(tmp_path):
    """Our own header parser, checked against a file not written by the safetensors library."""
    values = torch.tensor([1.5, -2.0, 3.25])
    header = {
        "flag": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
        "x": {"dtype": "F32", "shape": [3], "data_offsets": [1, 13]},
    }
    raw = json.dumps(header).encode()
    path = tmp_path / "hand.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes([7]) + values.numpy().tobytes())
    state = open_checkpoint(path)
    assert state["flag"].tolist() == [7]
    assert torch.equal(state["x"], values)


def test_folder_with_index_loads_all_shards(tmp_path):
    tensors = _tensors()
    _write_sharded(tmp_path, tensors)
    (tmp_path / "notes.txt").write_text("not a weight file")
    state = open_checkpoint(tmp_path)
    assert len(state.files) == 2 and sorted(state) == sorted(tensors)
    assert torch.equal(state["a.weight"], tensors["a.weight"])
    assert state.file_of("b.weight").endswith("model-00002-of-00002.safetensors")
    assert sorted(open_checkpoint(tmp_path / "model.safetensors.index.json")) == sorted(tensors)


def test_missing_shard_is_named_with_its_index(tmp_path):
    names = _write_sharded(tmp_path, _tensors())
    (tmp_path / names[1]).unlink()
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(tmp_path)
    message = str(info.value)
    assert names[1] in message and "model.safetensors.index.json" in message and "1 of 2" in message


def _index_with(folder, **extra: str) -> Path:
    """The folder's index, rewritten with `extra` keys (key -> shard name) added to its weight_map."""
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"].update(extra)
    index.write_text(json.dumps(data))
    return index


@pytest.mark.parametrize("given", ["folder", "index"])
def test_index_key_no_shard_holds_is_named_with_its_shard(tmp_path, given):
    """A shard of another version (or a partial download) beside the index lacks keys the index lists: refused by
    name rather than loaded without them."""
    names = _write_sharded(tmp_path, _tensors())
    index = _index_with(tmp_path, **{"c.weight": names[1]})
    with pytest.raises(CheckpointError, match=r"1 key\(s\).*'c\.weight' expected in 'model-00002-of-00002") as info:
        open_checkpoint(tmp_path if given == "folder" else index)
    assert "model.safetensors.index.json" in str(info.value) and "mixed download" in str(info.value)


def test_shard_keys_the_index_does_not_list_are_loaded_with_a_warning(tmp_path, caplog):
    tensors = _tensors()
    _write_sharded(tmp_path, tensors)
    index = tmp_path / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    del data["weight_map"]["ids"]
    index.write_text(json.dumps(data))
    assert sorted(open_checkpoint(tmp_path)) == sorted(tensors)
    assert "does not list" in caplog.text and "'ids'" in caplog.text


def test_shards_without_index_are_loaded_together(tmp_path):
    tensors = _tensors()
    _write_sharded(tmp_path, tensors, index=False)
    assert sorted(open_checkpoint(tmp_path)) == sorted(tensors)


def test_gap_in_numbered_shards_without_index_is_named(tmp_path):
    names = _write_sharded(tmp_path, _tensors(), index=False)
    (tmp_path / names[0]).unlink()
    with pytest.raises(CheckpointError, match=names[0]):
        open_checkpoint(tmp_path)


def test_a_numbered_shard_given_alone_names_the_missing_ones(tmp_path):
    """A `-00001-of-00002` file passed on its own whose sibling is gone is named like a folder with a gap; with
    the sibling there it still opens alone (per-file readers open one shard at a time)."""
    from diffsynth.runtime.checkpoint import shards_not_given

    names = _write_sharded(tmp_path, _tensors(), index=False)
    assert len(open_checkpoint(tmp_path / names[0])) == 2
    assert shards_not_given([str(tmp_path / names[0])]) == [str(tmp_path / names[1])]
    assert shards_not_given([str(tmp_path / n) for n in names]) == []
    (tmp_path / names[1]).unlink()
    with pytest.raises(CheckpointError, match=f"shard '{names[1]}' is missing beside .*{names[0]}.*fetch"):
        open_checkpoint(tmp_path / names[0])


def test_duplicate_key_names_key_and_both_files(tmp_path):
    save_file({"w": torch.zeros(2)}, str(tmp_path / "a.safetensors"))
    save_file({"w": torch.ones(2)}, str(tmp_path / "b.safetensors"))
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(tmp_path)
    message = str(info.value)
    assert "'w'" in message and "a.safetensors" in message and "b.safetensors" in message


def test_same_file_twice_is_read_once(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    assert open_checkpoint([path, str(path)]).files == [str(path)]


@pytest.mark.parametrize("cut", ["data", "header", "length"])
def test_truncated_safetensors_is_named(tmp_path, cut):
    path = tmp_path / "cut.safetensors"
    save_file({"w": torch.zeros(64, 64)}, str(path))
    raw = path.read_bytes()
    header_len = struct.unpack("<Q", raw[:8])[0]
    keep = {"data": len(raw) - 100, "header": 8 + header_len // 2, "length": 5}[cut]
    path.write_bytes(raw[:keep])
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(path)
    message = str(info.value)
    assert "cut.safetensors" in message and "truncated or corrupt" in message and "Re-download" in message


def test_garbage_header_is_corrupt(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{]" + b"\0" * 16)
    with pytest.raises(CheckpointError, match="junk.safetensors looks truncated or corrupt"):
        open_checkpoint(path)


@pytest.mark.parametrize("wrapper", ["state_dict", "model", "module", "model_state"])
def test_pth_with_nested_state_dict(tmp_path, wrapper):
    tensors = {"a.weight": torch.randn(3, 3, generator=torch.Generator().manual_seed(1))}
    path = tmp_path / "m.pth"
    torch.save({wrapper: tensors, "epoch": 3, "global_step": 10}, path)
    state = open_checkpoint(path)
    assert list(state) == ["a.weight"] and state.shapes() == {"a.weight": (3, 3)}
    assert torch.equal(state["a.weight"], tensors["a.weight"])


def test_flat_bin_and_legacy_pickle_format(tmp_path):
    tensors = {"w": torch.arange(6.0).reshape(2, 3)}
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    torch.save(tensors, tmp_path / "old.ckpt", _use_new_zipfile_serialization=False)
    assert torch.equal(open_checkpoint(tmp_path / "pytorch_model.bin")["w"], tensors["w"])
    assert torch.equal(open_checkpoint(tmp_path / "old.ckpt")["w"], tensors["w"])


def test_truncated_pickle_is_named(tmp_path):
    path = tmp_path / "cut.pth"
    torch.save({"w": torch.zeros(64, 64)}, path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(CheckpointError, match="cut.pth looks truncated or corrupt.*Re-download"):
        open_checkpoint(path)


def test_a_file_that_is_no_pickle_is_not_said_to_hold_python_objects(tmp_path):
    """Garbage bytes fail the weights-only unpickler too, but they are no checkpoint, not an unsafe one."""
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"not a pickle at all" * 10)
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(path)
    message = str(info.value)
    assert "garbage.pth looks truncated or corrupt: it is not a readable torch checkpoint" in message
    assert "Python objects" not in message and "Re-download" in message


class _NotAllowed:
    pass


def test_pickle_with_python_objects_is_refused_clearly(tmp_path):
    path = tmp_path / "unsafe.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "callback": _NotAllowed()}, path)
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(path)
    message = str(info.value)
    assert "unsafe.pt" in message and "_NotAllowed" in message and "safetensors" in message


def test_pickle_without_tensors(tmp_path):
    torch.save({"epoch": 1}, tmp_path / "empty.pt")
    with pytest.raises(CheckpointError, match="holds no tensors.*'epoch'"):
        open_checkpoint(tmp_path / "empty.pt")


def test_ambiguous_nested_state_dicts(tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(1)}, "model": {"w": torch.ones(1)}}, tmp_path / "two.pt")
    with pytest.raises(CheckpointError, match="several state dicts"):
        open_checkpoint(tmp_path / "two.pt")


def test_missing_path_lists_the_parent_folder(tmp_path):
    (tmp_path / "flux1-dev.safetensors").write_bytes(b"")
    (tmp_path / "vae").mkdir()
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(tmp_path / "flux1-schnell.safetensors")
    message = str(info.value)
    assert "flux1-schnell.safetensors does not exist" in message
    assert "flux1-dev.safetensors" in message and "vae/" in message


def test_missing_folder_lists_the_nearest_existing_one(tmp_path):
    (tmp_path / "present.txt").write_text("x")
    with pytest.raises(CheckpointError, match="nearest existing folder.*present.txt"):
        open_checkpoint(tmp_path / "no" / "such" / "model.safetensors")


def test_folder_without_weights_lists_its_contents(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="holds no weight files.*config.json"):
        open_checkpoint(tmp_path)


def test_not_a_weight_file(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="not a weight file"):
        open_checkpoint(tmp_path / "config.json")


@pytest.mark.parametrize("bad", [None, [], 3, [None]])
def test_bad_paths_argument(bad):
    with pytest.raises(ConfigError, match="checkpoint paths"):
        open_checkpoint(bad)


def test_shard_groups_keep_numbered_shards_together_and_other_files_apart():
    from diffsynth.runtime.checkpoint import shard_groups

    files = ["m/a-00001-of-00002.safetensors", "m/a-00002-of-00002.safetensors", "m/global_model.safetensors"]
    files += ["m/local_model.safetensors", "m/b-1-of-1.safetensors"]
    assert shard_groups(files) == [files[:2], [files[2]], [files[3]], [files[4]]]
    assert shard_groups(["one.safetensors"]) == [["one.safetensors"]] and shard_groups([]) == []


def test_single_safetensors_keys_only_for_one_readable_file(tmp_path):
    """The keys of a lone `.safetensors` file; None for two files, another format or a broken file."""
    tensors = _tensors()
    save_file(tensors, str(tmp_path / "a.safetensors"))
    save_file(tensors, str(tmp_path / "b.safetensors"))
    torch.save(tensors, tmp_path / "c.bin")
    (tmp_path / "broken.safetensors").write_bytes(b"not a header")
    assert checkpoint.single_safetensors_keys([str(tmp_path / "a.safetensors")]) == set(tensors)
    assert (
        checkpoint.single_safetensors_keys([str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")]) is None
    )
    assert checkpoint.single_safetensors_keys([str(tmp_path / "c.bin")]) is None
    assert checkpoint.single_safetensors_keys([str(tmp_path / "broken.safetensors")]) is None


def test_a_save_killed_while_writing_leaves_no_file_a_rerun_would_keep(tmp_path, monkeypatch):
    """The trainer's cache items, checkpoints and LoRAs, and the demo's stages, are skipped or trusted when their
    file exists: a write cut short leaves only a `.tmp` beside it."""
    import safetensors.torch

    from diffsynth.runtime.checkpoint import save_safetensors

    def torn(state, path, metadata=None):
        Path(path).write_bytes(b"\0" * 10)
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", torn)
    with pytest.raises(KeyboardInterrupt):
        save_safetensors({}, tmp_path / "diffusion_pytorch_model.safetensors")
    assert not (tmp_path / "diffusion_pytorch_model.safetensors").exists()


def test_saved_weights_are_readable_as_any_new_file(tmp_path):
    """safetensors creates 0600 files; an export on a shared server must get the mode the umask gives (0644)."""
    import os

    import torch

    from diffsynth.runtime.checkpoint import save_safetensors

    old = os.umask(0o022)
    try:
        save_safetensors({"w": torch.zeros(2)}, tmp_path / "lora.safetensors")
    finally:
        os.umask(old)
    assert (tmp_path / "lora.safetensors").stat().st_mode & 0o777 == 0o644
