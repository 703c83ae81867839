"""When a LoRA is kept apart instead of fused (fp8-stored VRAM weights), the pipeline-wide LoRA controls
(`set_lora_scale`, `list_loras`), the warnings about stacked fused DoRAs and ignored names, and a LoRA hook on a
Linear called with a keyword input."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from diffsynth.runtime.errors import ConfigError, LoRAError
from diffsynth.runtime.lora import list_loras, load_lora
from diffsynth.runtime.pipeline import BasePipeline
from diffsynth.runtime.vram import enable_vram_management

FP8 = torch.float8_e4m3fn
DIM = 32
X = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(DIM, DIM)

    def forward(self, x):
        return x + self.proj(x).tanh()


class Stack(nn.Module):
    """Three blocks the VRAM manager moves one at a time."""

    offload_units = ("blocks",)
    vram_activation_gib = 0.0

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(8, DIM)
        self.blocks = nn.ModuleList(Block() for _ in range(3))

    def forward(self, x):
        x = self.head(x)
        for block in self.blocks:
            x = block(x)
        return x


def make() -> Stack:
    torch.manual_seed(0)
    return Stack().eval().requires_grad_(False)


def small_lora(model: nn.Module, seed: int = 3) -> dict[str, torch.Tensor]:
    """A LoRA whose change is far below an fp8 step of the weights (what real LoRAs are like)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, layer in model.named_modules():
        if isinstance(layer, nn.Linear):
            state[f"{name}.lora_A.weight"] = 0.02 * torch.randn(4, layer.in_features, generator=g)
            state[f"{name}.lora_B.weight"] = 0.02 * torch.randn(layer.out_features, 4, generator=g)
    return state


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


FP8_HOST = {"offload_device": "cpu", "onload_device": "cpu", "offload_dtype": FP8, "onload_dtype": FP8}


@torch.no_grad()
def test_a_lora_on_fp8_stored_vram_weights_is_kept_apart_unless_fuse_is_asked(caplog):
    """Fused into fp8-stored weights most of a LoRA's change rounds away (cosine ~0.6 to the exact change); by
    default it is kept apart (the change is exact), and an explicit fuse=True fuses with a warning."""
    lora = small_lora(make())
    exact = make()
    load_lora(exact, dict(lora), fuse=True)
    want = exact(X) - make()(X)
    model = make()
    enable_vram_management(model, dict(FP8_HOST), vram_limit=0, device="cpu")
    plain = model(X)
    with caplog.at_level(logging.INFO, logger="diffsynth.runtime.lora"):
        name = load_lora(model, dict(lora))
    assert name is not None and list_loras(model) == {name: 1.0}
    assert "kept apart (not fused)" in caplog.text and "fp8" in caplog.text
    assert cosine(model(X) - plain, want) > 0.99
    forced = make()
    enable_vram_management(forced, dict(FP8_HOST), vram_limit=0, device="cpu")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="diffsynth.runtime.lora"):
        assert load_lora(forced, dict(lora), fuse=True) is None
    assert "fuse=True" in caplog.text and "fp8" in caplog.text


@torch.no_grad()
def test_an_fp8_file_streamed_from_disk_keeps_the_lora_apart(tmp_path):
    """No fp8 in the VRAM config, but the weights are read from an fp8 file as stored: still fp8."""
    path = str(tmp_path / "fp8.safetensors")
    model = make()
    state = {k: (v.to(FP8) if v.dim() == 2 else v).contiguous() for k, v in model.state_dict().items()}
    save_file(state, path)
    config = {"offload_device": "disk", "onload_device": "disk"}
    handle = enable_vram_management(model, config, vram_limit=0, device="cpu", checkpoint=[path])
    assert load_lora(model, small_lora(make())) is not None
    from diffsynth.runtime.lora import stores_fp8

    assert stores_fp8(handle) and not stores_fp8(None)


class Pipe(BasePipeline):
    model_slots = {"dit": "dit", "dit2": "dit2"}


def fresh_pipe() -> Pipe:
    pipe = Pipe(device="cpu", torch_dtype=torch.float32)
    pipe.dit, pipe.dit2 = make(), make()
    return pipe


@torch.no_grad()
def test_pipe_load_lora_keeps_it_apart_on_an_fp8_vram_slot():
    pipe = fresh_pipe()
    pipe.vram_handles["dit"] = enable_vram_management(pipe.dit, dict(FP8_HOST), vram_limit=0, device="cpu")
    name = pipe.load_lora(small_lora(make()))
    assert name is not None and list_loras(pipe.dit) == {name: 1.0}
    assert pipe.load_lora(small_lora(make()), slot="dit2") is None  # not VRAM-managed: fused, as before
    assert list_loras(pipe.dit2) == {}


@torch.no_grad()
def test_pipe_set_lora_scale_and_list_loras_act_on_every_slot_holding_the_name():
    pipe = fresh_pipe()
    plain = make()(X)
    lora = {k: 50 * v for k, v in small_lora(make()).items()}
    pipe.load_lora(dict(lora), fuse=False, name="style")
    pipe.load_lora(dict(lora), fuse=False, name="style", slot="dit2")
    pipe.load_lora(dict(lora), scale=0.5, fuse=False, name="other", slot="dit2")
    assert pipe.list_loras() == {"style": 1.0, "other": 0.5}
    pipe.set_lora_scale("style", 0)
    assert list_loras(pipe.dit) == {"style": 0.0} and list_loras(pipe.dit2) == {"style": 0.0, "other": 0.5}
    assert torch.equal(pipe.dit(X), plain)
    pipe.set_lora_scale("other", 0.0)
    assert torch.equal(pipe.dit2(X), plain)
    with pytest.raises(LoRAError, match="'nope'.*style"):
        pipe.set_lora_scale("nope", 1.0)
    with pytest.raises(ConfigError, match="finite"):
        pipe.set_lora_scale("style", float("nan"))


def dora(model: nn.Linear, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    magnitude = model.weight.norm(dim=1) * (1 + 0.5 * torch.rand(model.out_features, generator=g))
    return {
        "0.lora_A.weight": 0.3 * torch.randn(2, model.in_features, generator=g),
        "0.lora_B.weight": 0.3 * torch.randn(model.out_features, 2, generator=g),
        "0.lora_magnitude_vector": magnitude,
    }


def test_a_dora_fused_onto_a_layer_another_fused_lora_changed_warns(caplog):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 16))
    first, second = dora(base[0], 1), dora(base[0], 2)
    model = copy.deepcopy(base)
    with caplog.at_level(logging.WARNING, logger="diffsynth.runtime.lora"):
        load_lora(model, first)
        assert "already changed" not in caplog.text  # the first one sees the base weight
        load_lora(model, second)
    assert "already changed by another fused LoRA" in caplog.text and "order" in caplog.text


def test_an_unfused_lora_works_on_a_linear_called_with_input_as_keyword(caplog):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 12))
    lora = {"0.lora_A.weight": torch.randn(2, 16), "0.lora_B.weight": torch.randn(12, 2)}
    fused, unfused = copy.deepcopy(base), copy.deepcopy(base)
    load_lora(fused, dict(lora))
    load_lora(unfused, dict(lora), fuse=False)
    x = torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(unfused[0](input=x), fused[0](x))
    with caplog.at_level(logging.WARNING, logger="diffsynth.runtime.lora"):
        assert load_lora(copy.deepcopy(base), dict(lora), fuse=True, name="x") is None
    assert "'x' is ignored" in caplog.text
