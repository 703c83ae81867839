"""Where the time of the VRAM manager's fp8 matmul path goes, on a CUDA GPU with fp8 matmuls (sm_89+).

The GPU test printed 9.5 ms per step for the fp8 path against 1.2 ms for bf16 on the same shapes (12 blocks of
two Linears, 1024 tokens, width 1024). This script times, on the same shapes: bf16 `F.linear`; bare
`torch._scaled_mm` with per-tensor and with rowwise scales (pre-quantised inputs); our whole fp8 Linear (input
quantisation included); and prints the CUDA kernels of one fp8 step from the profiler, so the next GPU session
can tell a slow kernel from a slow wrapper.

    python benchmarks/profile_fp8_matmul.py [--tokens 1024] [--dim 1024]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from diffsynth.runtime.vram import enable_vram_management
from diffsynth.runtime.vram.fp8_matmul import INPUT_DTYPE


class OneLinear(torch.nn.Module):
    """One Linear as the manager's only unit."""

    offload_units = ("blocks",)
    vram_activation_gib = 0.0

    def __init__(self, k: int, n: int):
        super().__init__()
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(k, n, bias=False)])

    def forward(self, x):
        return self.blocks[0](x)


def per_call_ms(fn, calls: int = 50, warmup: int = 10) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=1024)
    args = parser.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        raise SystemExit("this profile needs a CUDA GPU with fp8 matmuls (sm_89+)")
    m, k, n = args.tokens, args.dim, 4 * args.dim
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k**-0.5
    xq, wq = x.to(INPUT_DTYPE), w.to(INPUT_DTYPE)
    one = torch.ones((), device="cuda")
    rows, cols = torch.ones(m, 1, device="cuda"), torch.ones(1, n, device="cuda")
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}; x [{m}, {k}] @ w.T [{k}, {n}]")
    print(f"bf16 F.linear                 {per_call_ms(lambda: F.linear(x, w)):.4f} ms")
    tensorwise = per_call_ms(lambda: torch._scaled_mm(xq, wq.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16))
    print(f"_scaled_mm per-tensor scales  {tensorwise:.4f} ms")
    rowwise = per_call_ms(lambda: torch._scaled_mm(xq, wq.t(), scale_a=rows, scale_b=cols, out_dtype=torch.bfloat16))
    print(f"_scaled_mm rowwise scales     {rowwise:.4f} ms")

    linear = OneLinear(k, n).to(torch.bfloat16).requires_grad_(False)  # frozen: trainable weights are not managed
    handle = enable_vram_management(linear, {"computation_dtype": "float8_e4m3fn"}, device="cuda", dtype=torch.bfloat16)
    print("fp8 matmul targets:", [(t.name, t.fp8_matmul) for u in handle.units for t in u.targets])
    with torch.no_grad():
        print(f"our fp8 Linear (with hooks)   {per_call_ms(lambda: linear(x)):.4f} ms")
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                linear(x)
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20))


if __name__ == "__main__":
    main()
