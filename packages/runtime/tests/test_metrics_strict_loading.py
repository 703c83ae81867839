"""Every metric's `from_pretrained` loads strictly (`metrics/base.load_strict`): a file whose tensor does not have
the built model's shape is refused naming the file, the key and both shapes, before any weight is assigned (FID's
fixed Inception, CLIP with its config.json, the aesthetic MLP's fixed widths)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from diffsynth.runtime.errors import CheckpointError
from diffsynth.runtime.metrics import AestheticMetric, CLIPMetric, FIDMetric


def helper(name: str):
    """Another test module's builders (tiny random models), loaded once by path."""
    spec = importlib.util.spec_from_file_location(f"{name}_strict_helpers", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fid, clip, aesthetic = helper("test_metrics_fid"), helper("test_metrics_clip"), helper("test_metrics_aesthetic")
aesthetic_files = aesthetic.aesthetic_files  # the fixture, shared


def shape_error(path: Path, key: str, file_shape, model_shape, model: str) -> str:
    return rf"{path}: {key} has shape \({file_shape}\) in the file, \({model_shape}\) in {model}"


def test_fid_refuses_a_tensor_of_another_shape(tmp_path):
    model = fid.random_inception(8)
    fid.save_fid_file(model, tmp_path / "good.safetensors")
    FIDMetric.from_pretrained(model_config=str(tmp_path / "good.safetensors"), device="cpu")  # the control
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    key = "Mixed_5b.branch1x1.conv.weight"
    assert tuple(state[key].shape) == (64, 192, 1, 1)
    state[key] = torch.zeros(64, 160, 1, 1)  # another graph's width
    save_file(state, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(CheckpointError, match=shape_error(tmp_path / "wrong.safetensors", key, "64, 160, 1, 1",
                                                          "64, 192, 1, 1", "FIDInceptionV3")):  # fmt: skip
        FIDMetric.from_pretrained(model_config=str(tmp_path / "wrong.safetensors"), device="cpu")


def test_clip_refuses_a_tensor_that_does_not_fit_its_config_json(tmp_path):
    """(The same files unchanged load: test_metrics_clip.py's config.json test.)"""
    processor = clip.build_processor(tmp_path)
    config = clip.tiny_config(processor.tokenizer)
    model = clip.random_clip(config, seed=4)
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    key = "visual_projection.weight"
    rows, columns = state[key].shape
    state[key] = state[key][:, : columns // 2].contiguous()
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=shape_error(tmp_path / "model.safetensors", key,
                                                          f"{rows}, {columns // 2}", f"{rows}, {columns}",
                                                          "CLIPModel")):  # fmt: skip
        CLIPMetric.from_pretrained(model_config=str(tmp_path / "model.safetensors"), processor_config=str(tmp_path))


def test_aesthetic_refuses_an_mlp_of_other_widths(tmp_path, aesthetic_files):
    folder, tower, mlp = aesthetic_files
    state = {k: v.contiguous() for k, v in {**tower.state_dict(), **mlp}.items()}
    save_file(state, str(tmp_path / "good.safetensors"))
    AestheticMetric.from_pretrained(model_config=str(tmp_path / "good.safetensors"), processor_config=str(folder))
    state["layers.2.weight"] = torch.zeros(100, 1024)  # the released MLP's second Linear is 1024 -> 128
    save_file(state, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(CheckpointError, match=shape_error(tmp_path / "wrong.safetensors", "layers.2.weight",
                                                          "100, 1024", "128, 1024", "AestheticMetric")):  # fmt: skip
        AestheticMetric.from_pretrained(model_config=str(tmp_path / "wrong.safetensors"), processor_config=str(folder))
