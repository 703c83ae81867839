"""One rank of test_parallel_checks.py (run as a script by `run_ranks`): calls without a seed draw the same noise on
every rank once parallel sampling is on."""

from __future__ import annotations

import torch
import torch.distributed as dist

from diffsynth.runtime.parallel import init_parallel
from diffsynth.runtime.pipeline import seeded_generator, seeded_noise


def gathered(x: torch.Tensor) -> list[torch.Tensor]:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return parts


def main() -> None:
    init_parallel(sequence=2)
    torch.manual_seed(1234 + dist.get_rank())  # each rank's own default generator differs
    first = seeded_noise((16,), None)
    parts = gathered(first)
    assert torch.equal(parts[0], parts[1]), "seed=None drew different noise on the ranks"
    second = seeded_noise((16,), None)
    assert not torch.equal(first, second), "two unseeded calls drew the same noise"
    assert torch.equal(*gathered(second))
    generator, _ = seeded_generator(None)
    assert generator is not None
    draws = torch.randn(8, generator=generator)
    assert torch.equal(*gathered(draws))  # later draws from the call's generator (ancestral steps) agree too
    torch.testing.assert_close(seeded_noise((4,), 7), seeded_noise((4,), 7), atol=0, rtol=0)  # a seed is kept


if __name__ == "__main__":
    main()
