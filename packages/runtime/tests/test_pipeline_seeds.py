"""Seeds: the range torch.Generator.manual_seed takes, checked where noise is seeded (`seeded_generator`)."""

from __future__ import annotations

import pytest
import torch

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.pipeline import SEEDS, check_seed, seeded_generator, seeded_noise


def test_every_seed_torch_takes_draws_noise():
    """-2**63 .. 2**64 - 1: a negative seed counts modulo 2**64, as torch's own manual_seed does."""
    assert SEEDS == (-(2**63), 2**64 - 1)
    for seed in (SEEDS[0], -1, 0, 2**63, SEEDS[1]):
        torch.testing.assert_close(
            seeded_noise((3,), seed), torch.randn(3, generator=torch.Generator().manual_seed(seed))
        )
    torch.testing.assert_close(seeded_noise((3,), -1), seeded_noise((3,), 2**64 - 1))
    for outside in (SEEDS[0] - 1, SEEDS[1] + 1):  # the bounds are torch's: one past them it refuses too
        with pytest.raises((RuntimeError, ValueError), match="Overflow"):
            torch.Generator().manual_seed(outside)


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, 10**30])
def test_a_seed_outside_64_bits_is_named_with_the_range(seed):
    """It was a bare `ValueError: Overflow when unpacking long long` when the noise was drawn."""
    message = rf"seed {seed}: outside the seeds torch accepts, -2\*\*63 to 2\*\*64 - 1"
    with pytest.raises(ConfigError, match=message):
        seeded_noise((1, 4), seed)
    with pytest.raises(ConfigError, match=message):
        seeded_generator(seed, "cpu")
    with pytest.raises(ConfigError, match=r"--seed 18446744073709551616: outside"):
        check_seed(2**64, "--seed")
    with pytest.raises(ConfigError, match=r"seed 'x' is not a whole number"):
        seeded_noise((1,), "x")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch that sees no CUDA GPU")
@pytest.mark.parametrize("rand_device", ["cuda", "cuda:3", torch.device("cuda")])
def test_a_rand_device_gpu_torch_does_not_see_is_named(rand_device):
    """It was torch's AcceleratorError from torch.Generator(device), deep in the call, where `device=` is named."""
    with pytest.raises(ConfigError, match=r"rand_device='cuda(:3)?': torch .* sees no CUDA GPU here"):
        seeded_generator(0, rand_device)
    with pytest.raises(ConfigError, match="rand_device="):
        seeded_noise((1, 4), None, rand_device)
