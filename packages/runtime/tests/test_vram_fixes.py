"""VRAM manager regressions: fp8 files on disk, fusing a LoRA into a managed model, plan accounting."""

from __future__ import annotations

import torch
from safetensors.torch import save_file
from torch import nn

from diffsynth.runtime.lora import load_lora
from diffsynth.runtime.vram import UnitSize, enable_vram_management, make_plan
from diffsynth.runtime.vram.disk import DiskReader, DiskUnit, read_header
from diffsynth.runtime.vram.plan import BUFFERS
from diffsynth.runtime.vram.storage import view

FP8 = torch.float8_e4m3fn
STREAM = {"offload_device": "cpu", "onload_device": "cpu"}
DISK = {"offload_device": "disk", "onload_device": "disk"}
X = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))


class Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        return x + self.proj(self.norm(x)).tanh()


class Stack(nn.Module):
    offload_units = ("blocks", "tail")
    vram_activation_gib = 0.0

    def __init__(self, n: int = 4, dim: int = 32):
        super().__init__()
        self.head = nn.Linear(8, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(n))
        self.tail = Block(dim)

    def forward(self, x):
        x = self.head(x)
        for block in self.blocks:
            x = block(x)
        return self.tail(x)


def make(n: int = 4) -> Stack:
    torch.manual_seed(0)
    model = Stack(n)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval().requires_grad_(False)


def _loaded(state: dict) -> Stack:
    model = make()
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model


def test_fp8_file_on_disk_streams_unscaled(tmp_path):
    path = str(tmp_path / "fp8.safetensors")
    state = {k: (v.to(FP8) if v.dim() == 2 else v).contiguous() for k, v in make().state_dict().items()}
    save_file(state, path)
    want = _loaded(state)(X)
    for config in (DISK, {"offload_device": "disk", "onload_device": "cpu"}):
        model = _loaded(state)
        enable_vram_management(model, config, vram_limit=0, device="cpu", checkpoint=[path])
        torch.testing.assert_close(model(X), want, rtol=0, atol=0)


def test_disk_read_into_writes_fp8_scales_into_a_dirty_buffer(tmp_path):
    """The CUDA path reads into reused staging buffers: the scale regions must be written, not assumed."""
    path = str(tmp_path / "fp8.safetensors")
    save_file({"w": torch.randn(4, 8).to(FP8)}, path)
    unit = DiskUnit([read_header(path)["w"]], [None])
    buffer = torch.full((unit.nbytes,), 0x7F, dtype=torch.uint8)  # garbage, as a reused buffer holds
    reader = DiskReader()
    unit.read_into(buffer, reader)
    reader.close()
    data, scale = view(buffer, unit.slots[0])
    assert scale is not None and bool((scale == 1).all())


def _mk16() -> Stack:
    return make(16)


def test_fuse_into_managed_mixed_plan_equals_unmanaged():
    full = enable_vram_management(_mk16(), STREAM, vram_limit=None, device="cpu").plan
    model = _mk16()
    handle = enable_vram_management(model, STREAM, vram_limit=0.5 * full.peak / 2**30, device="cpu")
    resident = int(handle.plan.resident[0].split(".")[1])
    streamed = resident + 1
    assert f"blocks.{streamed}" in handle.plan.streamed
    torch.manual_seed(3)
    lora = {}
    for b in (resident, streamed):
        lora[f"blocks.{b}.proj.lora_A.weight"] = 0.1 * torch.randn(4, 32)
        lora[f"blocks.{b}.proj.lora_B.weight"] = 0.1 * torch.randn(32, 4)
    reference = _mk16()
    load_lora(reference, dict(lora), fuse=True)
    load_lora(model, dict(lora), fuse=True)  # every layer at once, none twice
    torch.testing.assert_close(model(X), reference(X), rtol=0, atol=0)
    with handle.materialized():  # nested (as pipe.load_lora does): applied once more, to every layer
        load_lora(model, dict(lora), fuse=True)
    load_lora(reference, dict(lora), fuse=True)
    torch.testing.assert_close(model(X), reference(X), rtol=0, atol=0)


def test_fused_lora_on_disk_keeps_the_models_dtype(tmp_path):
    path = str(tmp_path / "bf16.safetensors")
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in make().state_dict().items()}
    save_file(state, path)
    torch.manual_seed(5)
    lora = {
        "blocks.1.proj.lora_A.weight": 0.1 * torch.randn(4, 32),
        "blocks.1.proj.lora_B.weight": 0.1 * torch.randn(32, 4),
    }
    reference = _loaded(state)
    load_lora(reference, dict(lora), fuse=True)
    want = reference(X)
    for config in (STREAM, DISK):
        model = _loaded(state)
        handle = enable_vram_management(model, dict(config), vram_limit=0, device="cpu", checkpoint=[path])
        with handle.materialized():  # what pipe.load_lora does
            load_lora(model, dict(lora), fuse=True)
        torch.testing.assert_close(model(X), want, rtol=0, atol=0)


def test_plan_reserves_per_forward_copies_of_converted_resident_units():
    units = [UnitSize(f"u{i}", 100, 400, converted=400) for i in range(4)]
    plan = make_plan(units, 0, 400)  # the stores fit, but not with the dequantised copies
    assert plan.fits or plan.streamed  # no silent overshoot: either it fits, or it says so / streams
    assert plan.peak >= BUFFERS * 400
    ample = make_plan(units, 0, 400 + BUFFERS * 400)
    assert ample.streamed == () and ample.buffers == BUFFERS * 400 and ample.fits


def test_fp8_resident_plan_counts_dequantised_copies():
    model = make()
    unlimited = enable_vram_management(model, {"preparing_dtype": FP8}, vram_limit=None, device="cpu")
    assert unlimited.plan.buffers > 0  # fp8-resident units are dequantised per forward
    limit = unlimited.plan.fixed + unlimited.plan.resident_bytes  # the stores alone fit exactly
    model = make()
    config = {"preparing_dtype": FP8, "offload_device": "cpu", "onload_device": "cpu"}
    handle = enable_vram_management(model, config, vram_limit=limit / 2**30, device="cpu")
    assert handle.plan.peak > limit and not handle.plan.fits  # said, not hidden (buffers were 0 before)


def test_streamed_bytes_are_the_onload_store_bytes():
    for prep, onload in ((FP8, torch.float32), (torch.float32, FP8)):
        model = _mk16()
        config = {**STREAM, "preparing_dtype": prep, "onload_dtype": onload}
        handle = enable_vram_management(model, config, vram_limit=0, device="cpu")
        model(X)
        report = handle.report()
        held = sum(u.source.nbytes for u in handle.units if u.streamed)
        assert report.streamed_bytes == held == report.bytes_per_step
