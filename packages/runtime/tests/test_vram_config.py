"""VRAM manager config: the eight keys, their defaults, and clear errors for bad keys and values."""

from __future__ import annotations

import pytest
import torch

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.vram import VRAM_KEYS, VramConfig

E4M3 = torch.float8_e4m3fn


def test_no_keys_means_everything_on_the_computation_device():
    c = VramConfig.resolve({}, device="cpu", dtype="bf16")
    assert c.as_dict() == {key: "bfloat16" if key.endswith("dtype") else "cpu" for key in VRAM_KEYS}
    assert not c.parks and not c.fp8_matmul


def test_a_vram_limit_streams_from_cpu_by_default():
    c = VramConfig.resolve({}, device="cuda", dtype=torch.bfloat16, streaming=True)
    assert (c.offload_device, c.onload_device, c.preparing_device, c.computation_device) == (
        "cpu",
        "cpu",
        "cuda:0",
        "cuda:0",
    )
    assert c.streams and c.parks
    disk = VramConfig.resolve({"offload_device": "disk"}, device="cuda:0", dtype=torch.bfloat16, streaming=True)
    assert (disk.offload_device, disk.onload_device, disk.offload_dtype, disk.onload_dtype) == (
        "disk",
        "disk",
        "disk",
        "disk",
    )


def test_studio_style_configs():
    fp8 = {
        "offload_dtype": E4M3,
        "offload_device": "cpu",
        "onload_dtype": E4M3,
        "onload_device": "cpu",
        "preparing_dtype": E4M3,
        "preparing_device": "cuda",
        "computation_dtype": torch.bfloat16,
        "computation_device": "cuda",
    }
    c = VramConfig.resolve(fp8)
    assert c.preparing_dtype == E4M3 and c.computation_dtype == torch.bfloat16 and c.streams
    disk = dict(fp8, offload_dtype="disk", offload_device="disk", onload_dtype="disk", onload_device="disk")
    assert VramConfig.resolve(disk).onload_dtype == "disk"


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({"offload_dtype": E4M3}, (E4M3, E4M3, E4M3)),  # store fp8 everywhere, compute in the model's dtype
        ({"preparing_dtype": E4M3}, (E4M3, E4M3, E4M3)),
        ({"onload_dtype": E4M3, "preparing_dtype": "bf16"}, (E4M3, E4M3, torch.bfloat16)),
        ({"offload_dtype": "bf16", "preparing_dtype": E4M3}, (torch.bfloat16, torch.bfloat16, E4M3)),
    ],
)
def test_unset_storage_dtypes_take_the_nearest_set_one(keys, expected):
    c = VramConfig.resolve(keys, device="cpu", dtype=torch.float32)
    assert (c.offload_dtype, c.onload_dtype, c.preparing_dtype) == expected
    assert c.computation_dtype == torch.float32


def test_model_config_keys_feed_the_manager():
    mc = ModelConfig(path="x.safetensors", offload_device="cpu", preparing_dtype="fp8_e4m3fn")
    c = VramConfig.resolve(mc.vram_config(), device="cpu", dtype="fp32")
    assert c.preparing_dtype == E4M3 and c.offload_dtype == E4M3


@pytest.mark.parametrize(
    ("keys", "match"),
    [
        ({"offload_dtypes": "bf16"}, r"unknown VRAM config key\(s\) \['offload_dtypes'\]"),
        ({"onload_dtype": "float8"}, r"onload_dtype: unknown dtype 'float8'"),
        ({"onload_device": "gpu"}, r"onload_device: unknown device 'gpu'"),
        ({"computation_device": "disk"}, r"computation_device='disk' is not accepted"),
        ({"preparing_device": "disk"}, r"preparing_device='disk' is not accepted"),
        ({"preparing_dtype": "disk"}, r"preparing_dtype='disk' is not accepted"),
        ({"onload_device": "disk", "offload_device": "cpu"}, r"onload_device='disk' needs offload_device='disk'"),
        ({"offload_device": "disk", "offload_dtype": E4M3}, r"offload_dtype=float8_e4m3fn is not accepted with"),
        ({"offload_dtype": "disk"}, r"offload_dtype='disk' needs offload_device='disk'"),
        ({"preparing_device": "cuda:1", "computation_device": "cuda:0"}, r"preparing_device='cuda:1' must be"),
        ({"offload_device": "cuda:0", "onload_device": "cpu", "computation_device": "cuda:0"}, r"cannot hold it off"),
        ({"onload_device": "cuda:1", "computation_device": "cuda:0"}, r"onload_device='cuda:1' must be"),
    ],
)
def test_bad_keys_and_values_name_the_key(keys, match):
    with pytest.raises(ConfigError, match=match):
        VramConfig.resolve(keys, device="cpu", dtype="bf16")


def test_config_must_be_a_mapping():
    with pytest.raises(ConfigError, match="must be a mapping"):
        VramConfig.resolve(["offload_device"])
