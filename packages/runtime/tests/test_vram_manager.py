"""VRAM manager behaviour on a small block stack: states, real values, trainable parameters, errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.lora import load_lora
from diffsynth.runtime.vram import ParkedWeightError, enable_vram_management, module_dtype, vram_handle

STREAM = {"offload_device": "cpu", "onload_device": "cpu"}
DISK = {"offload_device": "disk", "onload_device": "disk"}


class Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, dim)
        self.gain = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x):
        return x + self.proj(self.norm(x)).tanh() * self.gain


class Stack(nn.Module):
    offload_units = ("blocks", "tail")
    vram_activation_gib = 0.0

    def __init__(self, dim: int = 32, n: int = 4):
        super().__init__()
        self.head = nn.Linear(8, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(n))
        self.tail = Block(dim)

    def forward(self, x):
        x = self.head(x)
        for block in self.blocks:
            x = block(x)
        return self.tail(x)


def make(seed: int = 0) -> Stack:
    torch.manual_seed(seed)
    model = Stack()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval().requires_grad_(False)


X = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))


def managed(config, **kwargs):
    model = make()
    handle = enable_vram_management(model, config, vram_limit=kwargs.pop("vram_limit", 0), device="cpu", **kwargs)
    return model, handle


def test_states_and_auto_activation(tmp_path):
    path = tmp_path / "stack.safetensors"
    save_file({k: v.contiguous() for k, v in make().state_dict().items()}, str(path))
    model, handle = managed(DISK, checkpoint=[str(path)])
    reference = make()(X)
    assert handle.state == "active" and handle.config.parks
    torch.testing.assert_close(model(X), reference, rtol=0, atol=0)
    handle.park()
    assert handle.state == "parked" and handle.resident_bytes() == 0
    torch.testing.assert_close(model(X), reference, rtol=0, atol=0)  # forward activates a parked model
    assert handle.state == "active"


def test_parked_weights_fail_loudly_outside_forward():
    model, handle = managed(STREAM)
    weight = model.blocks[0].proj.weight
    assert isinstance(weight, nn.Parameter) and weight.shape == (32, 32) and weight.dtype == torch.float32
    assert "blocks.0.proj.weight" in repr(weight)
    with pytest.raises(ParkedWeightError, match=r"'blocks.0.norm.weight' is held by the VRAM manager"):
        model.to(torch.float64)
    with pytest.raises(ParkedWeightError, match="apply LoRAs unfused"):
        weight.copy_(torch.zeros(32, 32))
    assert model.head.weight.device.type == "cpu"  # outside units: a real parameter


def test_state_dict_materialized_and_disable_give_real_values():
    original = make().state_dict()
    model, handle = managed(STREAM)
    state = handle.state_dict()
    assert list(state) == list(original)
    for key, value in original.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0)
    with handle.materialized():
        torch.testing.assert_close(model.blocks[1].proj.weight, original["blocks.1.proj.weight"], rtol=0, atol=0)
        model.blocks[1].proj.weight.mul_(2)  # kept: written back on exit
    edited = make()
    with torch.no_grad():
        edited.blocks[1].proj.weight.mul_(2)
    torch.testing.assert_close(model(X), edited(X), rtol=0, atol=0)
    assert handle.disable() is model and vram_handle(model) is None
    assert not any(type(p).__name__ == "ParkedWeight" for p in model.parameters())
    torch.testing.assert_close(model(X), edited(X), rtol=0, atol=0)


def test_fused_lora_goes_through_materialized_unfused_lora_just_works():
    lora = {
        "blocks.2.proj.lora_A.weight": 0.1 * torch.randn(4, 32),
        "blocks.2.proj.lora_B.weight": 0.1 * torch.randn(32, 4),
    }
    reference = make()
    load_lora(reference, dict(lora), fuse=True)
    model, handle = managed(STREAM)
    load_lora(model, dict(lora), fuse=True)  # fuses inside handle.materialized() by itself
    torch.testing.assert_close(model(X), reference(X), rtol=0, atol=1e-6)
    model, handle = managed(STREAM)
    with handle.materialized():  # explicitly (as pipe.load_lora does): the nested block is not entered twice
        load_lora(model, dict(lora), fuse=True)
    torch.testing.assert_close(model(X), reference(X), rtol=0, atol=1e-6)

    plain = make()
    load_lora(plain, dict(lora), fuse=False, name="style")
    model, _ = managed(STREAM)
    load_lora(model, dict(lora), fuse=False, name="style")
    torch.testing.assert_close(model(X), plain(X), rtol=0, atol=0)


def test_trainable_parameters_stay_resident_and_get_the_same_gradients():
    def train_model():
        model = make()
        model.blocks[1].gain.requires_grad_(True)  # e.g. an adapter being trained inside a unit
        return model

    reference = train_model()
    x = X.clone().requires_grad_(True)
    reference(x).square().sum().backward()
    model = train_model()
    handle = enable_vram_management(model, STREAM, vram_limit=0, device="cpu")
    assert "blocks.1.gain" not in [t.name for u in handle.units for t in u.targets]
    y = X.clone().requires_grad_(True)
    fetches = handle.report().fetches
    model(y).square().sum().backward()
    assert handle.report().fetches - fetches >= 2 * len(handle.units) - 1  # forward, then again for backward
    torch.testing.assert_close(y.grad, x.grad, rtol=0, atol=0)
    torch.testing.assert_close(model.blocks[1].gain.grad, reference.blocks[1].gain.grad, rtol=0, atol=0)


def test_disk_keeps_unmatched_tensors_in_memory(tmp_path, caplog):
    state = {k: v.contiguous() for k, v in make().state_dict().items()}
    state["blocks.0.proj.renamed"] = state.pop("blocks.0.proj.weight")  # a converted key: not findable
    path = tmp_path / "stack.safetensors"
    save_file(state, str(path))
    model, handle = managed(DISK, checkpoint=str(path))
    assert "1 of 25 unit tensors are not stored unchanged" in caplog.text
    torch.testing.assert_close(model(X), make()(X), rtol=0, atol=0)


def test_units_whose_weights_all_train_stay_resident_and_run():
    """A model left trainable (requires_grad) has nothing to stream: its units run untouched, not as 'parked'."""
    model = make().requires_grad_(True)
    handle = enable_vram_management(model, STREAM, vram_limit=0, device="cpu")
    assert all(not u.targets for u in handle.units)
    torch.testing.assert_close(model(X), make()(X), rtol=0, atol=0)


def test_errors_name_the_problem():
    model, _ = managed(STREAM)
    with pytest.raises(ConfigError, match="already VRAM-managed"):
        enable_vram_management(model, STREAM, device="cpu")
    with pytest.raises(ConfigError, match="offload_device='disk' reads weights from the checkpoint files"):
        managed(DISK)
    with pytest.raises(ConfigError, match="vram_limit must be a number of GiB >= 0"):
        enable_vram_management(make(), STREAM, vram_limit=-1, device="cpu")
    for limit in (float("nan"), float("inf")):  # NaN compared false with everything and ran as 0
        with pytest.raises(ConfigError, match=r"got (nan|inf) \(not a finite number\)"):
            enable_vram_management(make(), STREAM, vram_limit=limit, device="cpu")
    with pytest.raises(ConfigError, match="fp8_granularity='rows'"):
        enable_vram_management(make(), STREAM, device="cpu", fp8_granularity="rows")
    with pytest.raises(ConfigError, match="takes a torch.nn.Module"):
        enable_vram_management("model", STREAM)


def test_prefetch_follows_the_forward_then_the_backward_order():
    model, handle = managed(STREAM)
    with torch.no_grad():
        model(X)
        model(X)
    first = handle.report()
    assert first.misses == 1 and first.prefetch_hits == 9  # only the very first block was fetched on demand
    x = X.clone().requires_grad_(True)
    model(x).square().sum().backward()
    second = handle.report()
    # forward finds block 0 prefetched, keeps the last block for backward, which prefetches in reverse
    assert second.misses == first.misses and second.peak_in_flight <= 2
    assert second.fetches - first.fetches == 2 * len(handle.units) - 2
    assert not handle.streamer.live  # everything released when backward ends


def test_module_dtype_is_the_compute_dtype_when_weights_are_stored_in_fp8():
    """Pipelines cast their inputs to `module_dtype(dit)`: a model whose weights the manager keeps in fp8 still
    computes in its own dtype, and says so."""

    class Blocks(nn.Module):
        offload_units = ("blocks",)
        vram_activation_gib = 0.0

        def __init__(self):
            super().__init__()
            self.blocks = make().blocks

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return x

    model = Blocks()
    assert module_dtype(model) == torch.float32
    handle = enable_vram_management(model, {"preparing_dtype": "float8_e4m3fn"}, device="cpu", dtype=torch.float32)
    handle.activate()
    assert handle.state == "active" and handle.config.preparing_dtype == torch.float8_e4m3fn
    assert module_dtype(model) == torch.float32
    handle.disable()
    assert module_dtype(model) == torch.float32 and vram_handle(model) is None


def test_weights_stored_in_fp8_keep_their_rounding_after_disable_even_on_disk(tmp_path, caplog):
    """Disabling an fp8 store leaves its rounded values as the model's weights: it says so, and a disk store
    enabled afterwards keeps them (it silently read the file's full-precision values back)."""
    path = tmp_path / "stack.safetensors"
    save_file({k: v.contiguous() for k, v in make().state_dict().items()}, str(path))
    model, handle = managed({**STREAM, "offload_dtype": "float8_e4m3fn"}, name="dit")
    with caplog.at_level("WARNING"):
        handle.disable()
    assert "dit: VRAM management is off" in caplog.text and "rounding of their float8_e4m3fn store" in caplog.text
    rounded = model(X)
    assert (rounded - make()(X)).abs().max() > 1e-4
    enable_vram_management(model, DISK, vram_limit=0, device="cpu", checkpoint=str(path), name="dit")
    torch.testing.assert_close(model(X), rounded, rtol=0, atol=0)
