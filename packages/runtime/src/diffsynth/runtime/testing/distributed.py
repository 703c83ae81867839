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
