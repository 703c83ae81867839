"""Multi-rank sampling (`enable_parallel`) over CPU ranks (gloo) equals one process for Qwen-Image: image tokens
divided (Ulysses, text whole on every rank) or each call's prompts divided, with text masks, edit reference
tokens, `zero_cond_t`, ControlNet residuals and the first-block cache."""

from __future__ import annotations

from pathlib import Path

from diffsynth.runtime.testing.distributed import run_ranks

WORKER = Path(__file__).with_name("parallel_worker.py")


def test_parallel_equals_one_process(tiny_repo):
    run_ranks(WORKER, 2, str(tiny_repo), "2x1,1x2", timeout=300)
