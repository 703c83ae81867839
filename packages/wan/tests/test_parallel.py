"""Multi-rank sampling (`enable_parallel`) of Wan over CPU ranks (gloo) equals one process: the video tokens
divided (Ulysses, an odd count with padding, per-token timesteps), the CFG batch divided, through the A14B
pipeline (both experts) with and without the first-block cache, and on bare I2V and VACE DiTs (see
parallel_worker.py)."""

from __future__ import annotations

from pathlib import Path

from diffsynth.runtime.testing.distributed import run_ranks

WORKER = Path(__file__).with_name("parallel_worker.py")


def test_parallel_sampling_equals_one_process(tiny_repo_factory):
    run_ranks(WORKER, 2, str(tiny_repo_factory("a14b")), "sequence,batch", timeout=300)
