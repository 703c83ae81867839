"""Dtype and device arguments: every spelling users type, and one clear error for the rest."""

import pytest
import torch

from diffsynth.runtime.dtypes import dtype_name, parse_device, parse_dtype
from diffsynth.runtime.errors import ConfigError


@pytest.mark.parametrize(
    ("name", "dtype"),
    [
        ("bfloat16", torch.bfloat16),
        ("bf16", torch.bfloat16),
        ("torch.bfloat16", torch.bfloat16),
        ("float16", torch.float16),
        ("fp16", torch.float16),
        ("half", torch.float16),
        ("float32", torch.float32),
        ("FP32", torch.float32),
        ("float8_e4m3fn", torch.float8_e4m3fn),
        ("torch.float8_e5m2", torch.float8_e5m2),
        (torch.float16, torch.float16),
        (torch.float8_e4m3fn, torch.float8_e4m3fn),
    ],
)
def test_parse_dtype_accepts_names_and_dtypes(name, dtype):
    assert parse_dtype(name) is dtype


@pytest.mark.parametrize("bad", ["bfloat", "float8", "", None, 16, torch.int64])
def test_bad_dtype_lists_accepted_names(bad):
    with pytest.raises(ConfigError) as info:
        parse_dtype(bad)
    message = str(info.value)
    assert "bfloat16" in message and "float8_e4m3fn" in message


def test_dtype_name():
    assert dtype_name(torch.bfloat16) == "bfloat16"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("cpu", torch.device("cpu")),
        ("cuda", torch.device("cuda")),
        ("cuda:1", torch.device("cuda:1")),
        ("CUDA:0", torch.device("cuda:0")),
        ("mps", torch.device("mps")),
        (torch.device("cpu"), torch.device("cpu")),
    ],
)
def test_parse_device(text, expected):
    assert parse_device(text) == expected


def test_disk_is_kept_as_a_string_for_the_vram_manager():
    assert parse_device("disk") == "disk"


def test_none_means_the_default_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert parse_device(None) == torch.device("cpu")


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "cpu:0", "cuda:-1", "", 0, torch.device("meta")])
def test_bad_device_lists_accepted_ones(bad):
    with pytest.raises(ConfigError) as info:
        parse_device(bad)
    assert "cuda:N" in str(info.value) and "disk" in str(info.value)


@pytest.mark.parametrize("bad", ["tpu", "disk", 3])
def test_noise_is_drawn_on_a_device_that_holds_tensors(bad):
    """`rand_device` draws noise: a bad one (or `disk`, which places weights) is named as the pipelines' argument."""
    from diffsynth.runtime.pipeline import seeded_generator, seeded_noise

    with pytest.raises(ConfigError, match=f"rand_device={bad!r} is not accepted; use cpu, cuda, cuda:N or mps"):
        seeded_generator(0, bad)
    generator, device = seeded_generator(7, "cpu")
    torch.testing.assert_close(seeded_noise((2, 3), 7), torch.randn((2, 3), generator=generator))
    assert device == torch.device("cpu") and seeded_generator(None, "cpu")[0] is None


@pytest.mark.parametrize("bad", [torch.float8_e4m3fn, "float8_e5m2", "float64"])
def test_a_pipeline_computes_in_float32_float16_or_bfloat16(bad):
    """fp8 as a pipeline's torch_dtype crashed deep in the text encoder: it is a storage dtype (the VRAM keys)."""
    from diffsynth.runtime.pipeline import BasePipeline

    with pytest.raises(ConfigError, match=r"torch_dtype=float(8_e4m3fn|8_e5m2|64) is not accepted.*offload_dtype"):
        BasePipeline(device="cpu", torch_dtype=bad)
    assert BasePipeline(device="cpu", torch_dtype="fp16").torch_dtype is torch.float16
