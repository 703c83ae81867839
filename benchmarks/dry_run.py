"""Runs the CPU dry run of every ours-vs-diffusers benchmark script in one process (the nox parity session).

The scripts measure on GPUs; a tiny CPU run of each keeps them from rotting. One process pays the imports
(torch, diffusers, transformers) once instead of once per script.

    python benchmarks/dry_run.py
"""

from __future__ import annotations

import runpy
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
TINY = ["--tiny", "--device", "cpu", "--height", "64", "--width", "64", "--caption-len", "7", "--steps", "1"]
RUNS = [
    ("bench_z_image_dit.py", [*TINY, "--warmup", "0"]),
    ("bench_flux.py", [*TINY, "--warmup", "0"]),
    ("bench_flux2.py", [*TINY, "--warmup", "0"]),
    ("bench_ltx2.py", [*TINY, "--warmup", "0"]),
    ("bench_ltx2_diffusion_decoder.py", [*TINY, "--warmup", "0", "--num-frames", "17"]),
    ("bench_qwen_image.py", [*TINY, "--warmup", "0"]),
    ("bench_step_cache.py", [*TINY, "--warmup", "0"]),
    ("bench_training.py", [*TINY, "--warmup", "0"]),
    ("bench_training.py", ["--estimate", *TINY]),
]


def main() -> None:
    sys.path.insert(0, str(HERE))  # the scripts import `common` from beside them
    for script, args in RUNS:
        began = time.perf_counter()
        sys.argv = [str(HERE / script), *args]
        runpy.run_path(str(HERE / script), run_name="__main__")
        print(f"dry run: {script} {' '.join(args[:1])} ok in {time.perf_counter() - began:.1f} s", flush=True)


if __name__ == "__main__":
    main()
