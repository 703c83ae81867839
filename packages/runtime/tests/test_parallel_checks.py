"""Parallel sampling's guards: an unseeded call's noise is shared by the ranks, rank 0 alone writes the CLI's
sound, dubbed videos and own-CLI outputs, `disable_parallel`, and the CLI's parallel flags checked before loading."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from diffsynth.runtime.testing.distributed import run_ranks

SEED_WORKER = Path(__file__).with_name("parallel_seed_worker.py")


def test_unseeded_calls_draw_the_same_noise_on_every_rank():
    run_ranks(SEED_WORKER, 2, "shared", timeout=90)


def test_unseeded_call_of_a_pipeline_not_parallel_does_not_wait_for_the_other_ranks():
    """After disable_parallel, or on a pipeline never made parallel, rank 0 alone (a preview) draws without a seed."""
    run_ranks(SEED_WORKER, 2, "alone", timeout=90)


class Voices:
    """An LTX-2-like pipeline for `--audio-only` and `--dub-video` that records its calls."""

    calls: list = []

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        return cls()

    def __call__(self, prompt, seed=None, num_frames=None):
        raise AssertionError("not a picture call")

    def generate_audio(self, prompt, seed=None, **options):
        type(self).calls.append("audio")
        return SimpleNamespace(waveform=torch.zeros(1, 64), sample_rate=8000)

    def dub_video(self, prompt, video, seed=None, **size):
        type(self).calls.append("dub")
        return torch.zeros(1, 3, 8, 8), SimpleNamespace(waveform=torch.zeros(1, 64), sample_rate=8000)


@pytest.mark.parametrize("rank", ["0", "1"])
def test_only_rank_zero_writes_sound_and_dubbed_videos(monkeypatch, tmp_path, rank):
    """Under torchrun every rank makes the same sound or dubbed clip; rank 0 alone writes it (every rank wrote)."""
    from diffsynth.runtime import cli, media

    monkeypatch.setenv("RANK", rank)
    monkeypatch.setattr(cli, "_pipeline_class", lambda model: Voices)
    muxed = []
    monkeypatch.setattr(media, "mux_video_audio", lambda *args, **kwargs: muxed.append(args[3]))
    monkeypatch.setattr(media, "video_frame_rate", lambda path: 24.0)
    Voices.calls = []
    sound = tmp_path / "sound.wav"
    command = ["generate", "--model", "x", "--device", "cpu", "--prompt", "a"]
    assert cli.main([*command, "--audio-only", "--output", str(sound)]) == 0
    assert cli.main([*command, "--dub-video", str(tmp_path / "in.mp4"), "--output", str(tmp_path / "dub.mp4")]) == 0
    assert Voices.calls == ["audio", "dub"]  # every rank computes
    assert sound.exists() == (rank == "0")
    assert muxed == ([str(tmp_path / "dub.mp4")] if rank == "0" else [])


def test_saves_outputs_follows_the_rank(monkeypatch):
    from diffsynth.runtime.parallel import saves_outputs

    monkeypatch.delenv("RANK", raising=False)
    assert saves_outputs()
    monkeypatch.setenv("RANK", "1")
    assert not saves_outputs()


def test_disable_parallel_runs_the_models_whole_again():
    from diffsynth.runtime.parallel import ParallelGroups
    from diffsynth.runtime.pipeline import BasePipeline

    class Divided(torch.nn.Module):
        parallel = None

    class Pipe(BasePipeline):
        model_slots = {"dit": "dit", "vae": "vae"}

    pipe = Pipe(device="cpu", torch_dtype=torch.float32)
    pipe.dit, pipe.vae = Divided(), torch.nn.Identity()
    pipe.dit.parallel = ParallelGroups(batch_size=2)
    pipe.disable_parallel()
    assert pipe.dit.parallel is None and not hasattr(pipe.vae, "parallel")
    pipe.disable_parallel()  # nothing to undo
    assert pipe.dit.parallel is None


class NeverLoaded:
    """A pipeline class whose loading is a failure: the flags must be refused before it."""

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        raise AssertionError("a model loaded before the parallel flags were checked")

    def __call__(self, prompt, seed=None):
        raise AssertionError("called")


@pytest.mark.parametrize(
    ("world", "flags", "message"),
    [
        ("2", ["--cfg-parallel", "0"], "--cfg-parallel 0 must be >= 1"),
        ("2", ["--sequence-parallel", "0"], "--sequence-parallel 0 must be >= 1"),
        ("2", ["--sequence-parallel", "-2", "--cfg-parallel", "-1"], "--sequence-parallel -2 must be >= 1"),
        ("4", ["--sequence-parallel", "2"], r"--sequence-parallel 2 x --cfg-parallel 1 = 2 ranks, .*WORLD_SIZE=4"),
        ("2", ["--sequence-parallel", "2", "--cfg-parallel", "2"], r"= 4 ranks, but torchrun started WORLD_SIZE=2"),
        ("3", ["--cfg-parallel", "2"], "--cfg-parallel 2 does not divide the 3 ranks"),
        (None, ["--sequence-parallel", "2"], r"--sequence-parallel 2 divides .*torchrun --nproc_per_node"),
    ],
)
def test_parallel_flags_are_checked_before_loading(monkeypatch, capsys, world, flags, message):
    """`--cfg-parallel 0` was taken as 1, and a layout the ranks do not make failed after every model loaded."""
    import re

    from diffsynth.runtime import cli

    if world is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world)
    monkeypatch.setattr(cli, "_pipeline_class", lambda model: NeverLoaded)
    assert cli.main(["generate", "--model", "x", "--device", "cpu", "--prompt", "a", *flags]) == 2
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.parametrize(("sequence", "batch"), [(None, None), (2, None), (None, 2), (None, 1), (1, 2), (2, 1)])
def test_parallel_flags_that_fit_the_ranks_pass(monkeypatch, sequence, batch):
    from diffsynth.runtime.cli import check_parallel_layout

    monkeypatch.setenv("WORLD_SIZE", "2")
    check_parallel_layout(sequence, batch)
