"""Disk offload of a model whose checkpoint keys the loader renamed: the renamed tensors are read from the file,
the ones its conversion computed stay in host memory, and outputs equal the unmanaged model's exactly."""

from __future__ import annotations

import logging
import re

import torch
from safetensors.torch import save_file
from torch import nn

from diffsynth.runtime.loading import load_model
from diffsynth.runtime.registry import KeyLayout, ModelSpec
from diffsynth.runtime.vram import enable_vram_management, vram_handle

DISK = {"offload_device": "disk", "onload_device": "disk"}
DIM = 16


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.proj = nn.Linear(DIM, DIM)

    def forward(self, x):
        return x + self.proj(self.norm(x)).tanh()


class Trunk(nn.Module):
    offload_units = ("blocks", "tail")
    vram_activation_gib = 0.0

    def __init__(self, depth: int):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(depth))
        self.tail = Block()

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.tail(x)


def hub_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`trunk.N.` is renamed `blocks.N.`; a 4-d `conv` weight is viewed as the linear one; the tail's weight is
    stored transposed (computed: it must not be read from the file, although its name and shape match)."""
    out = {}
    for key, value in state.items():
        if key == "tail.proj.weight":
            out[key] = value.t().contiguous()
        elif key.endswith(".conv.weight"):
            out[key.replace("trunk.", "blocks.").replace(".conv.", ".proj.")] = value.flatten(1)
        elif re.match(r"trunk\.\d+\.", key):
            out["blocks." + key[len("trunk.") :]] = value
        elif key.startswith("tail."):
            out[key] = value
        else:
            raise KeyError(key)
    return out


SPEC = ModelSpec(
    name="renamed_trunk",
    role="dit",
    layouts=(KeyLayout("hub", ("trunk.1.proj.weight", "tail.proj.weight"), prefix="model.", convert=hub_to_ours),),
    config_from_state=lambda state, config_json: sum(1 for k in state if k.endswith(".norm.weight")) - 1,
    build=Trunk,
)


def hub_file(path) -> str:
    """A checkpoint in the hub layout: block 0's projection as a 1x1 conv weight, the tail's transposed."""
    gen = torch.Generator().manual_seed(0)
    state = {}
    for i in range(3):
        proj = "conv" if i == 0 else "proj"
        weight = torch.randn(DIM, DIM, generator=gen)
        state[f"model.trunk.{i}.{proj}.weight"] = weight[:, :, None, None] if i == 0 else weight
        state[f"model.trunk.{i}.proj.bias"] = torch.randn(DIM, generator=gen)
        state[f"model.trunk.{i}.norm.weight"] = 1 + 0.1 * torch.randn(DIM, generator=gen)
        state[f"model.trunk.{i}.norm.bias"] = torch.randn(DIM, generator=gen)
    state["model.tail.proj.weight"] = torch.randn(DIM, DIM, generator=gen)
    state["model.tail.proj.bias"] = torch.randn(DIM, generator=gen)
    state["model.tail.norm.weight"] = torch.ones(DIM)
    state["model.tail.norm.bias"] = torch.zeros(DIM)
    file = str(path / "hub.safetensors")
    save_file({k: v.contiguous() for k, v in state.items()}, file)
    return file


def test_renamed_tensors_are_read_from_the_file(tmp_path, caplog):
    file = hub_file(tmp_path)
    x = torch.randn(2, DIM, generator=torch.Generator().manual_seed(1))
    want = load_model(file, specs=[SPEC])(x)
    model = load_model(file, specs=[SPEC]).requires_grad_(False)  # frozen, as pipelines hold it
    with caplog.at_level(logging.WARNING):
        enable_vram_management(model, DISK, vram_limit=0, device="cpu", checkpoint=[file])
    in_host = {
        t.name
        for unit in vram_handle(model).units
        if unit.targets
        for t, ref in zip(unit.targets, unit.offload.refs, strict=True)
        if ref is None
    }
    assert in_host == {"tail.proj.weight"}  # only the tensor the conversion computed
    assert "1 of 16 unit tensors" in caplog.text
    torch.testing.assert_close(model(x), want, rtol=0, atol=0)
    torch.testing.assert_close(model(x), want, rtol=0, atol=0)
