"""What every benchmark script shares: GPU timing with peak memory, and the recorded result line."""

from __future__ import annotations

import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def require_cuda() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")


@torch.inference_mode()
def timed(fn, steps: int, warmup: int) -> tuple[float, float]:
    """Mean seconds per call over `steps` calls after `warmup`, and peak GiB allocated during them."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps, torch.cuda.max_memory_allocated() / 2**30


def record(name: str, fields: dict) -> dict:
    """Print and append one JSON line to results/<name>.jsonl with the card, torch version and command."""
    entry = {
        "benchmark": name,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "card": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": "python " + " ".join(sys.argv),
        **fields,
    }
    print(json.dumps(entry, indent=2))
    RESULTS.mkdir(exist_ok=True)
    with (RESULTS / f"{name}.jsonl").open("a") as f:
        f.write(json.dumps(entry) + "\n")
    return entry
