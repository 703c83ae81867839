"""`LTX2Pipeline.from_pretrained(..., use_usp=True)` and `LTX2HDRPipeline`'s (DiffSynth-Studio's spelling of "divide
every denoiser call over all ranks") reach `BasePipeline.from_pretrained`, which makes the DiT parallel;
`use_usp=False` leaves it whole.

One process here: `init_parallel` (which would join a torchrun process group) is replaced by one returning a
single-rank layout, so the test sees what `use_usp` asks for without launching ranks."""

from __future__ import annotations

import diffsynth_ltx2_test_repo as ltx2_repo  # loaded by conftest
import pytest
import torch

from diffsynth.ltx2.hdr import LTX2HDRPipeline
from diffsynth.ltx2.pipeline import LTX2Pipeline
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.testing.distributed import one_rank_layout as single_rank_layout


@pytest.fixture
def one_rank_layout(monkeypatch) -> list[tuple]:
    return single_rank_layout(monkeypatch)


def load(cls, base, use_usp: bool):
    gemma = base / ltx2_repo.GEMMA_REPO
    configs = [
        ModelConfig(path=str(base / ltx2_repo.LTX_REPO / ltx2_repo.SINGLE_FILE)),
        ModelConfig(path=sorted(str(p) for p in gemma.glob("model*.safetensors"))),
    ]
    tokenizer = ModelConfig(path=str(gemma))
    return cls.from_pretrained(
        configs, tokenizer_config=tokenizer, device="cpu", torch_dtype=torch.float32, use_usp=use_usp
    )


@pytest.mark.parametrize("use_usp", [True, False])
@pytest.mark.parametrize("cls", [LTX2Pipeline, LTX2HDRPipeline])
def test_use_usp_makes_the_ltx2_dit_parallel(tiny_ltx2_base, one_rank_layout, cls, use_usp):
    pipe = load(cls, tiny_ltx2_base, use_usp)
    try:
        assert type(pipe) is cls
        assert (pipe.dit.parallel is not None) is use_usp
        assert bool(one_rank_layout) is use_usp
    finally:
        pipe.disable_parallel()
