"""Multi-rank sampling (`enable_parallel`) over CPU ranks (gloo) equals one process for FLUX.1 and FLUX.2:
image tokens divided (Ulysses, text whole on every rank) or the CFG batch divided, with Kontext / reference
tokens, ControlNet residuals, attention masks, IP-Adapter keys and the first-block cache."""

from __future__ import annotations

from pathlib import Path

from diffsynth.runtime.testing.distributed import run_ranks

WORKER = Path(__file__).with_name("parallel_worker.py")


def test_parallel_equals_one_process(tiny_repo, tiny_klein_repo):
    run_ranks(WORKER, 2, str(tiny_repo), str(tiny_klein_repo), "2x1,1x2", timeout=300)
