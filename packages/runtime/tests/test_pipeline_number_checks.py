"""The shared number checks of `diffsynth.runtime.pipeline`: seeds that int() used to cut or take (1.5, True),
guidance and shift values that must be finite (`finite_number`), and initial latents holding NaN."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.pipeline import BasePipeline, check_seed, finite_number, seeded_noise


@pytest.mark.parametrize("seed", [1.5, -0.25, True, False, float("nan"), float("inf"), np.float32(2.5), "x"])
def test_a_seed_that_is_not_a_whole_number_is_refused(seed):
    """1.5 was cut to 1 (the same noise as seed 1), True taken as seed 1, inf a bare OverflowError."""
    with pytest.raises(ConfigError, match=r"seed .* is not a whole number"):
        check_seed(seed)


@pytest.mark.parametrize("seed", [3, np.int64(3), np.uint64(3), 3.0, np.float32(3.0), "3"])
def test_a_whole_seed_of_any_kind_still_draws_its_noise(seed):
    assert check_seed(seed) == 3 and type(check_seed(seed)) is int
    torch.testing.assert_close(seeded_noise((4,), seed), seeded_noise((4,), 3))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), True, "4", None, np.float64("nan")])
def test_finite_number_refuses_anything_but_a_finite_real(value):
    with pytest.raises(ConfigError, match=re.escape(f"cfg_scale={value!r} must be a finite number")):
        finite_number(value, "cfg_scale")


@pytest.mark.parametrize("value", [4, 4.0, np.float32(4.0), np.int64(4)])
def test_finite_number_gives_a_float(value):
    assert finite_number(value, "cfg_scale") == 4.0 and type(finite_number(value, "cfg_scale")) is float


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_latents_holding_nan_or_infinity_are_refused(bad):
    """NaN initial noise decoded to a black image with no word why."""
    pipe = BasePipeline(device="cpu", torch_dtype="float32")
    latents = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    latents[0, 1, 1, 0] = bad
    with pytest.raises(ConfigError, match="latents contain NaN or infinite values"):
        pipe.check_latents(latents, (1, 4, 2, 2))
    latents[0, 1, 1, 0] = 0.0
    torch.testing.assert_close(pipe.check_latents(latents, (1, 4, 2, 2)), latents)
