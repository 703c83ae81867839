"""`diffsynth generate --model Lightricks/LTX-2.3:hdr` under torchrun: every rank makes the frames, rank 0 alone
writes the EXR frames and the preview."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from diffsynth.ltx2 import hdr


@pytest.mark.parametrize("rank", ["0", "1"])
def test_only_rank_zero_writes_the_hdr_outputs(monkeypatch, tmp_path, rank):
    monkeypatch.setenv("RANK", rank)
    written = []
    monkeypatch.setattr(hdr, "save_exr_frames", lambda frames, folder: written.append(folder) or [folder / "f.exr"])
    monkeypatch.setattr(hdr, "save_hdr_preview", lambda frames, path, fps: written.append(path))
    calls = []

    def pipe(video, seed=None, **options):  # stands for the pipeline's call: every rank makes the frames
        calls.append(video)
        return torch.zeros(1, 3, 2, 8, 8)

    args = SimpleNamespace(model="Lightricks/LTX-2.3:hdr", input_video="sdr.mp4", prompt=None, seed=2, fps=12.0)
    args.__dict__.update(output=str(tmp_path / "hdr.mp4"), height=None, width=None, num_frames=None)
    assert hdr.LTX2HDRPipeline.run_cli(pipe, args) == 0
    assert calls == ["sdr.mp4"]
    assert written == ([tmp_path / "hdr_exr", tmp_path / "hdr.mp4"] if rank == "0" else [])
