"""One rank of test_parallel_checks.py (run as a script by `run_ranks`): calls without a seed draw the same noise on
every rank while the pipeline is parallel (`shared`), and one rank alone may draw unseeded noise for a pipeline that
is not parallel, after `disable_parallel` or never made parallel, without waiting for the others (`alone`)."""

from __future__ import annotations

import os
import sys
import threading

import torch
import torch.distributed as dist

from diffsynth.runtime.pipeline import BasePipeline, seeded_generator, seeded_noise

HANG_SECONDS = 15.0  # an unseeded draw on one rank that takes longer waits for a collective the others never join


class Divided(torch.nn.Module):
    """A denoiser that supports parallel sampling (it holds `parallel`) and is never run."""

    parallel = None


class Pipe(BasePipeline):
    model_slots = {"dit": "dit"}


def tiny_pipe() -> Pipe:
    pipe = Pipe(device="cpu", torch_dtype=torch.float32)
    pipe.dit = Divided()
    return pipe


def gathered(x: torch.Tensor) -> list[torch.Tensor]:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return parts


def check_shared(pipe: Pipe) -> None:
    first = pipe.generate_noise((16,), None)
    assert torch.equal(*gathered(first)), "seed=None drew different noise on the ranks"
    second = pipe.generate_noise((16,), None)
    assert not torch.equal(first, second), "two unseeded calls drew the same noise"
    assert torch.equal(*gathered(second))
    generator, _ = seeded_generator(None)  # a caller that does not name its pipeline: shared while one is parallel
    assert generator is not None
    draws = torch.randn(8, generator=generator)
    assert torch.equal(*gathered(draws))  # later draws from the call's generator (ancestral steps) agree too
    torch.testing.assert_close(seeded_noise((4,), 7), seeded_noise((4,), 7), atol=0, rtol=0)  # a seed is kept


def returns_alone(what: str, draw) -> None:
    """`draw()` on this rank alone must return: it shares no seed, so it waits for no other rank."""
    done = []
    thread = threading.Thread(target=lambda: done.append(draw()), daemon=True)
    thread.start()
    thread.join(HANG_SECONDS)
    if not done:
        print(f"{what}: an unseeded draw on rank 0 alone waited {HANG_SECONDS} s for the other ranks", flush=True)
        os._exit(1)  # the blocked collective would keep the process alive


def check_alone(pipe: Pipe) -> None:
    other = tiny_pipe()  # never made parallel, while `pipe` still is
    if dist.get_rank() == 0:
        returns_alone("a pipeline never made parallel", lambda: other.generate_noise((4,), None))
    dist.barrier()
    pipe.disable_parallel()
    if dist.get_rank() == 0:
        returns_alone("generate_noise after disable_parallel", lambda: pipe.generate_noise((4,), None))
        returns_alone("seeded_generator after disable_parallel", lambda: seeded_generator(None))
    dist.barrier()


def main(mode: str) -> None:
    pipe = tiny_pipe()
    pipe.enable_parallel(sequence=2)
    torch.manual_seed(1234 + dist.get_rank())  # each rank's own default generator differs
    {"shared": check_shared, "alone": check_alone}[mode](pipe)


if __name__ == "__main__":
    main(sys.argv[1])
