"""Text-to-audio over two CPU ranks (gloo): batch (CFG) parallelism equals one process, sequence parallelism is
refused naming it, and `disable_parallel` runs the calls whole again (see audio_parallel_worker.py)."""

from __future__ import annotations

from pathlib import Path

from diffsynth.runtime.testing.distributed import run_ranks

WORKER = Path(__file__).with_name("audio_parallel_worker.py")


def test_text_to_audio_divides_its_guidance_rows_and_refuses_a_divided_sequence(tiny_ltx2_base):
    run_ranks(WORKER, 2, str(tiny_ltx2_base), timeout=300)
