"""Multi-rank sampling (`enable_parallel`) of LTX-2 over CPU ranks (gloo) equals one process: the video tokens
divided (Ulysses, an odd count with padding; the audio whole, video->audio attention reading gathered video
keys), the rows of a guided call divided (CFG, STG and modality isolation with their attention skips), through
the pipeline with and without the first-block cache and on a bare DiT (see parallel_worker.py)."""

from __future__ import annotations

from pathlib import Path

from diffsynth.runtime.testing.distributed import run_ranks

WORKER = Path(__file__).with_name("parallel_worker.py")


def test_parallel_sampling_equals_one_process(tiny_ltx2_base):
    run_ranks(WORKER, 2, str(tiny_ltx2_base), "sequence,batch", timeout=300)
