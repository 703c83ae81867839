"""VRAM manager on CUDA: streamed == resident, at most two units in flight, backward, disk, fp8; timings printed.

Assertions are on correctness only; step times are printed (`pytest -s -m gpu`) for the record.
"""

from __future__ import annotations

import functools
import time

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from diffsynth.runtime.vram import enable_vram_management, find_units, quantize
from diffsynth.runtime.vram.plan import BUFFERS, GIB

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

STREAM = {"offload_device": "cpu", "onload_device": "cpu"}
DISK = {"offload_device": "disk", "onload_device": "disk"}
DTYPE = torch.bfloat16


class MLPBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.RMSNorm(dim)
        self.up = nn.Linear(dim, 4 * dim, bias=False)
        self.down = nn.Linear(4 * dim, dim, bias=False)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


class Tower(nn.Module):
    """`n` MLP blocks of 8*dim^2 weights each: compute per block grows with tokens, transfer does not."""

    offload_units = ("blocks",)
    vram_activation_gib = 1.0

    def __init__(self, dim: int = 1024, n: int = 12):
        super().__init__()
        self.blocks = nn.ModuleList(MLPBlock(dim) for _ in range(n))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def tower(dim=1024, n=12, seed=0) -> Tower:
    torch.manual_seed(seed)
    model = Tower(dim, n)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    return model.to(DTYPE).eval().requires_grad_(False)


def step_time(fn, steps=5, warmup=2) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def test_streamed_equals_resident_with_at_most_two_units_in_flight():
    x = torch.randn(4096, 1024, device="cuda", dtype=DTYPE)
    resident = tower().cuda()
    with torch.no_grad():
        want = resident(x)
        t_resident = step_time(functools.partial(resident, x))
    del resident
    torch.cuda.empty_cache()

    model = tower()
    handle = enable_vram_management(model, STREAM, vram_limit=0, device="cuda", dtype=DTYPE)
    assert handle.plan.resident == () and handle.pin
    unit_bytes = sum(p.numel() * p.element_size() for p in model.blocks[0].parameters())  # up, down, norm
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.no_grad():
        got = model(x)
        t_streamed = step_time(lambda: model(x))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    report = handle.report()
    assert report.peak_in_flight <= 2 and report.prefetch_hits > 0
    assert report.bytes_per_step == 12 * unit_bytes
    streaming_peak = torch.cuda.max_memory_allocated() - base
    activations = 4 * x.numel() * x.element_size() * 4  # input, output, the 4*dim hidden and its gelu
    assert streaming_peak <= BUFFERS * unit_bytes + activations, (streaming_peak / GIB, report)
    print(
        f"\n[vram] 12 x {unit_bytes / 2**20:.0f} MiB blocks, 4096 tokens: resident {t_resident * 1e3:.1f} ms/step, "
        f"streamed {t_streamed * 1e3:.1f} ms/step, copy wait {report.gpu_wait_s:.3f} s GPU / "
        f"{report.host_wait_s:.3f} s host, streaming peak {streaming_peak / 2**20:.0f} MiB"
    )


def test_partial_residency_fp8_and_disk_equal_their_references(tmp_path):
    x = torch.randn(512, 1024, device="cuda", dtype=DTYPE)
    with torch.no_grad():
        want = tower().cuda()(x)

        model = tower()
        limit = (1.0 * GIB + 6 * 16 * 2**20 + 3 * 16 * 2**20) / GIB  # activations, 6 resident, buffers
        handle = enable_vram_management(model, STREAM, vram_limit=limit, device="cuda", dtype=DTYPE)
        assert 0 < len(handle.plan.resident) < 12
        torch.testing.assert_close(model(x), want, rtol=0, atol=0)
        handle.park()
        assert handle.resident_bytes() == 0
        torch.testing.assert_close(model(x), want, rtol=0, atol=0)

        path = tmp_path / "tower.safetensors"
        save_file({k: v.contiguous() for k, v in tower().state_dict().items()}, str(path))
        model = tower()
        handle = enable_vram_management(model, DISK, vram_limit=0, device="cuda", dtype=DTYPE, checkpoint=[str(path)])
        torch.testing.assert_close(model(x), want, rtol=0, atol=0)
        assert handle.report().host_wait_s >= 0 and handle.report().peak_in_flight <= 2

        rounded = tower()
        for _, unit in find_units(rounded):
            for p in unit.parameters():
                if p.dim() >= 2:
                    p.copy_(quantize(p, torch.float8_e4m3fn).dequantize(p.dtype))
        want8 = rounded.cuda()(x)
        model = tower()
        fp8 = {"offload_dtype": "float8_e4m3fn", "offload_device": "cpu", "onload_device": "cpu"}
        enable_vram_management(model, fp8, vram_limit=limit, device="cuda", dtype=DTYPE)
        torch.testing.assert_close(model(x), want8, rtol=0, atol=0)


def test_backward_on_cuda_gives_the_same_input_gradients():
    x = torch.randn(256, 1024, device="cuda", dtype=torch.float32)
    reference = tower().float().cuda()
    want = x.clone().requires_grad_(True)
    reference(want).square().mean().backward()
    model = tower().float()
    handle = enable_vram_management(model, STREAM, vram_limit=0, device="cuda", dtype=torch.float32)
    got = x.clone().requires_grad_(True)
    model(got).square().mean().backward()
    torch.testing.assert_close(got.grad, want.grad, rtol=1e-6, atol=1e-7)
    assert handle.report().peak_in_flight <= 2 and not handle.streamer.live  # released at the end of backward


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9), reason="fp8 matmuls need sm_89+"
)
def test_fp8_matmul_is_close_to_the_dequantized_model():
    x = torch.randn(1024, 1024, device="cuda", dtype=DTYPE)
    model = tower()
    handle = enable_vram_management(model, {"computation_dtype": "float8_e4m3fn"}, device="cuda", dtype=DTYPE)
    assert all(t.fp8_matmul for u in handle.units for t in u.targets if t.name.endswith(("up.weight", "down.weight")))
    rounded = tower()
    with torch.no_grad():
        for _, unit in find_units(rounded):
            for p in unit.parameters():
                if p.dim() >= 2:
                    p.copy_(quantize(p, torch.float8_e4m3fn).dequantize(p.dtype))
        want = rounded.cuda()(x)
        got = model(x)
        t_fp8 = step_time(lambda: model(x))
        t_bf16 = step_time(lambda: rounded(x))
    assert ((got.float() - want.float()).norm() / want.float().norm()) < 0.1
    print(f"\n[vram] fp8 matmul {t_fp8 * 1e3:.2f} ms/step vs bf16 {t_bf16 * 1e3:.2f} ms/step")


def test_tiny_z_image_dit_streams_on_cuda():
    pytest.importorskip("diffsynth.z_image")
    from diffsynth.z_image.dit import ZImageDiT, ZImageDiTConfig

    config = ZImageDiTConfig(
        in_channels=4, dim=64, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32,
        axes_dims=(8, 12, 12), axes_lens=(256, 64, 64),
    )  # fmt: skip
    torch.manual_seed(0)
    reference = ZImageDiT(config).eval().requires_grad_(False)
    with torch.no_grad():
        for p in reference.parameters():
            p.normal_(0, 0.1)
    model = ZImageDiT(config).eval().requires_grad_(False)
    model.load_state_dict(reference.state_dict())
    x = torch.randn(2, 4, 8, 10, device="cuda")
    t = torch.rand(2, device="cuda")
    text = [torch.randn(7, 32, device="cuda"), torch.randn(40, 32, device="cuda")]
    with torch.no_grad():
        want = reference.cuda()(x, t, text)
        enable_vram_management(model, STREAM, vram_limit=0, device="cuda", dtype=torch.float32)
        torch.testing.assert_close(model(x, t, text), want, rtol=0, atol=0)
