"""What several runtime test files share (tests only; loaded with `load_beside`): the tiny Linear stack the
quantization tests round, its LoRA, a quantized model's stored tensors, the tiny Z-Image repo of the tests that
run a real pipeline, and the GGUF file writer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from diffsynth.runtime.testing.modules import load_beside


class Tiny(nn.Module):
    """Two residual Linear-GELU-Linear blocks and a head; with `embedding`, an (unused) Embedding too, built
    first, for tests of what quantization leaves alone."""

    def __init__(self, embedding: bool = False):
        super().__init__()
        if embedding:
            self.embed = nn.Embedding(10, 64)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"proj": nn.Linear(64, 128), "out": nn.Linear(128, 64)}) for _ in range(2)
        )
        self.head = nn.Linear(64, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block["out"](torch.nn.functional.gelu(block["proj"](x)))
        return self.head(x)


def tiny(dtype=torch.float32, *, embedding: bool = False) -> Tiny:
    """A frozen `Tiny` in eval mode, seeded (the same weights on every call)."""
    torch.manual_seed(0)
    return Tiny(embedding).to(dtype).eval().requires_grad_(False)


def lora_state(model: nn.Module, rank: int = 4) -> dict[str, torch.Tensor]:
    """A seeded rank-`rank` LoRA (diffusers/PEFT names) on every Linear of `model`."""
    g = torch.Generator().manual_seed(7)
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            state[f"{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=g) * 0.1
            state[f"{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=g) * 0.1
    return state


def tiny_z_image_repo(root: Path) -> Path:
    """The tiny random Z-Image repo the z-image package's tests build (its conftest's builder, not a copy), at
    `root`; skips without the z-image package."""
    pytest.importorskip("diffsynth.z_image")
    conftest = Path(__file__).parents[2] / "z-image" / "tests" / "conftest.py"
    module = load_beside(conftest, conftest.name, "diffsynth_runtime_tests_z_image_conftest")
    torch.manual_seed(0)
    return module.build_tiny_repo(root)


def packed_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every stored tensor of `model`, torchao's as their parts (int8 / fp8 data and scales)."""
    out = {}
    for key, value in model.state_dict().items():
        if type(value).__module__.startswith("torchao."):
            for part in value.__tensor_flatten__()[0]:
                out[f"{key}:{part}"] = getattr(value, part)
        else:
            out[key] = value
    return out


def write_gguf(path: Path, tensors: dict, fields: dict | None = None) -> Path:
    """A .gguf of `tensors` (name -> (data, ggml type)); quantized data is given packed, as gguf.quants makes it.
    Needs the `gguf` package (the callers skip without it)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch="test")
    for key, value in (fields or {}).items():
        writer.add_array(key, value) if isinstance(value, list) else writer.add_string(key, value)
    for name, (data, qtype) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
