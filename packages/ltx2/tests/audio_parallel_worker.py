"""One rank of test_text_to_audio_parallel.py (run as a script by `run_ranks`, 2 ranks): text-to-audio under batch
(CFG) parallelism gives what one process gives; sequence parallelism is refused by name; `disable_parallel`."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

from diffsynth.runtime.errors import ConfigError


def load_repo_module():
    spec = importlib.util.spec_from_file_location("ltx2_repo", Path(__file__).with_name("ltx2_repo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(base: str) -> None:
    repo = load_repo_module()
    pipe = repo.our_pipeline(Path(base))
    options = dict(num_frames=9, num_inference_steps=2, max_sequence_length=repo.MAX_SEQUENCE_LENGTH)
    options.update(negative_prompt=repo.CAPTIONS[3], audio_cfg_scale=4.0, audio_stg_scale=0.0, progress_bar=False)
    rows = []
    pipe.dit.transformer_blocks[0].register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))

    def run():
        return pipe.generate_audio(repo.CAPTIONS[0], seed=0, **options).waveform

    want = run()
    assert rows[-1] == 2, rows  # the positive and negative rows in one call
    pipe.enable_parallel(sequence=1, batch=2)
    got = run()
    assert rows[-1] == 1, rows  # each rank computed one of them
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
    pipe.disable_parallel()
    pipe.disable_parallel()  # a second time changes nothing
    assert pipe.dit.parallel is None
    torch.testing.assert_close(run(), want, atol=0, rtol=0)
    assert rows[-1] == 2, rows
    pipe.enable_parallel(sequence=2)
    try:
        run()
    except ConfigError as error:
        assert "sequence parallelism over 2 ranks" in str(error) and "pipe.disable_parallel()" in str(error), error
    else:
        raise AssertionError("text-to-audio ran under sequence parallelism")


if __name__ == "__main__":
    main(sys.argv[1])
