"""Multi-rank sampling (`enable_parallel`) over CPU ranks (gloo) equals one process: tokens divided
(Ulysses), the CFG batch divided, and both, with and without the first-block cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.testing.distributed import run_ranks

WORKER = Path(__file__).with_name("parallel_worker.py")


def test_two_ranks_equal_one_process_and_the_cli_writes_its_image(tiny_repo, tmp_path):
    """Tokens divided (2x1), then the CFG batch divided (1x2), then `diffsynth generate --sequence-parallel 2`
    under the same two ranks, whose image must be the one-process CLI's."""
    import numpy as np
    from PIL import Image

    from diffsynth.runtime.cli import main

    options = ["--height", "64", "--width", "48", "--steps", "2", "--device", "cpu", "--dtype", "float32"]
    prompt = "a red circle on a blue background"
    main(["generate", "--model", str(tiny_repo), "--prompt", prompt, "--output", str(tmp_path / "one.png"), *options])
    run_ranks(WORKER, 2, str(tiny_repo), "2x1,1x2", str(tmp_path / "two.png"), timeout=300)
    with Image.open(tmp_path / "one.png") as one, Image.open(tmp_path / "two.png") as two:
        difference = np.abs(np.asarray(one, dtype=np.int16) - np.asarray(two, dtype=np.int16))
    assert difference.max() <= 1  # equal up to a rounding of the 8-bit pixels


def test_four_ranks_divide_tokens_and_batch_together(tiny_repo):
    run_ranks(WORKER, 4, str(tiny_repo), "2x2", timeout=300)


def test_enable_parallel_outside_torchrun_is_a_clear_error(tiny_repo, monkeypatch):
    from diffsynth.z_image import ZImagePipeline

    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    pipe = ZImagePipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu")
    with pytest.raises(ConfigError, match="torchrun"):
        pipe.enable_parallel(sequence=2)
