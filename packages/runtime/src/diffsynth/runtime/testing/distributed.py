"""Run a script as the ranks of a CPU process group, the way torchrun would launch it (tests only).

Each rank is a `python script args...` process with torchrun's environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT) on a free local port; torch.distributed then uses gloo.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path


def one_rank_layout(monkeypatch) -> list[tuple]:
    """Replace `parallel.init_parallel` (which would join a torchrun process group) by one returning a single-rank
    layout, so one process sees what `enable_parallel` / `use_usp` ask for; returns the (sequence, batch) calls."""
    from .. import parallel

    calls = []

    def init_parallel(sequence=None, batch=1):
        calls.append((sequence, batch))
        return parallel.ParallelGroups()

    monkeypatch.setattr(parallel, "init_parallel", init_parallel)
    return calls


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(script: str | Path, world: int, *args: str, timeout: float = 180.0) -> None:
    """Run `script` as `world` ranks and wait for all; a failing rank raises with its output."""
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "CUDA_VISIBLE_DEVICES": "",
            "OMP_NUM_THREADS": "1",
        }
        cmd = [sys.executable, str(script), *map(str, args)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    failures = []
    for rank, proc in enumerate(procs):
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            output = proc.communicate()[0]
            failures.append(f"rank {rank} timed out after {timeout} s:\n{output[-3000:]}")
            continue
        if proc.returncode != 0:
            failures.append(f"rank {rank} exited with {proc.returncode}:\n{output[-3000:]}")
    if failures:
        raise AssertionError("\n\n".join(failures))


def check_parallel_pipeline(pipe, run, threshold: float, sequence: int, batch: int, close, check_shards=None):
    """The rank's side of a pipeline test (in a `run_ranks` script): `run()` under `enable_parallel(sequence,
    batch)` gives what one process gives, without and with a first-block cache of `threshold`, which must reuse
    some calls and not all, and the same ones on every rank. `close(got, want, what)` compares;
    `check_shards()` (optional) runs after the plain parallel call, to check what this rank computed.
    Returns the `ParallelGroups` and one process's output; the pipeline is left parallel, without a cache."""
    want = run()
    cache = pipe.enable_first_block_cache(threshold)["dit"]
    want_cached, want_reused = run(), cache.skipped
    pipe.disable_first_block_cache()

    groups = pipe.enable_parallel(sequence=sequence, batch=batch)
    assert (groups.sequence_size, groups.batch_size) == (sequence, batch), groups
    close(run(), want, "parallel pipeline")
    if check_shards is not None:
        check_shards()
    # the cache decides on every rank's part together: the same calls are reused as in one process
    cache = pipe.enable_first_block_cache(threshold)["dit"]
    got = run()
    assert cache.skipped == want_reused and 0 < want_reused < cache.calls, (cache, want_reused)
    close(got, want_cached, "parallel pipeline, first-block cache")
    pipe.disable_first_block_cache()
    return groups, want
