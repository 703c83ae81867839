"""`FluxImagePipeline.from_pretrained(..., use_usp=True)` (DiffSynth-Studio's spelling of "divide every denoiser call
over all ranks") reaches `BasePipeline.from_pretrained`, which makes the DiT parallel; `use_usp=False` leaves it whole.

One process here: `init_parallel` (which would join a torchrun process group) is replaced by one returning a
single-rank layout, so the test sees what `use_usp` asks for without launching ranks."""

from __future__ import annotations

import pytest
from diffsynth_flux_test_helpers import our_pipeline

from diffsynth.runtime.testing.distributed import one_rank_layout as single_rank_layout


@pytest.fixture
def one_rank_layout(monkeypatch) -> list[tuple]:
    return single_rank_layout(monkeypatch)


@pytest.mark.parametrize("use_usp", [True, False])
def test_use_usp_makes_the_flux1_dit_parallel(tiny_repo, one_rank_layout, use_usp):
    pipe = our_pipeline(tiny_repo, use_usp=use_usp)
    try:
        assert (pipe.dit.parallel is not None) is use_usp
        assert bool(one_rank_layout) is use_usp
        assert pipe.tokenizer_1 is not None and pipe.tokenizer_2 is not None  # the rest of FLUX.1's load still ran
    finally:
        pipe.disable_parallel()
