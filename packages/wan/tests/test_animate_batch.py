"""Wan2.2-Animate's noise over several segments (`animate.segment_noise`): a prompt's video does not depend on the
batch it is in, and the one-prompt noise is the one generator's draws in order (what the pipeline always drew)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from diffsynth.runtime.errors import ConfigError
from diffsynth.wan.animate import segment_noise


def _beside(name: str):
    spec = importlib.util.spec_from_file_location(f"wan_animate_batch_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


A = _beside("test_animate")
animate_repo, animate_pipe = A.animate_repo, A.animate_pipe  # the tiny Animate repo and its pipeline
CPU = torch.device("cpu")
ONE = (1, 4, 3, 4, 4)


def test_segment_noise_draws_each_prompt_on_its_own():
    generator = torch.Generator().manual_seed(5)
    sequential = [torch.randn(ONE, generator=generator) for _ in range(3)]
    alone = list(segment_noise(ONE, 3, 5, CPU))
    batch = list(segment_noise((2, *ONE[1:]), 3, 5, CPU))
    for k in range(3):
        assert torch.equal(alone[k], sequential[k])  # one prompt: the generator's k-th draw, as before
        assert torch.equal(batch[k][:1], alone[k])  # prompt 0 of a batch: the same noise
    later = torch.cat([torch.randn(ONE, generator=generator) for _ in range(3)])  # prompt 1: draws 3, 4, 5
    assert torch.equal(torch.cat([b[1:] for b in batch]), later)
    (whole,) = segment_noise((2, *ONE[1:]), 1, 5, CPU)  # one segment: one draw of the batch
    assert torch.equal(whole, torch.randn((2, *ONE[1:]), generator=torch.Generator().manual_seed(5)))


@pytest.mark.parametrize(
    ("seed", "rand_device", "message"),
    [
        (1.5, CPU, r"seed 1\.5 is not a whole number"),
        (True, CPU, r"seed True is not a whole number"),
        (2**64, CPU, r"seed 18446744073709551616: outside the seeds torch accepts"),
        (1, "disk", r"rand_device='disk' is not accepted"),
    ],
)
def test_segment_noise_checks_the_seed_and_rand_device_as_every_mode(seed, rand_device, message):
    """Animate seeded its own generator with int(seed): 1.5 and True drew seed 1's noise, 2**64 and disk were bare
    torch errors; now the runtime's `seeded_generator` names them, before a segment is drawn."""
    for segments in (1, 3):
        with pytest.raises(ConfigError, match=message):
            list(segment_noise(ONE, segments, seed, rand_device))


def test_an_animate_call_with_a_fractional_seed_is_refused(animate_pipe):
    inputs = dict(input_image=A.P.image(9, (32, 32)), output_type="pt", **A.FAST, **A.driving(5))
    with pytest.raises(ConfigError, match=r"seed 1\.5 is not a whole number"):
        animate_pipe(A.P.PROMPT, seed=1.5, **inputs)
    with pytest.raises(ConfigError, match=r"rand_device='disk' is not accepted"):
        animate_pipe(A.P.PROMPT, seed=1, rand_device="disk", **inputs)


def test_batch_of_three_segments_gives_each_prompt_its_own_video(animate_pipe):
    """13 pose frames in segments of num_frames - 4 = 5 overlapping by one: three segments. Prompt 0 of a batch
    is the one-prompt call (the batch drew each segment's noise for both prompts from one stream before)."""
    inputs = dict(input_image=A.P.image(9, (32, 32)), seed=0, output_type="pt", **A.FAST, **A.driving(13))
    alone = animate_pipe(A.P.PROMPT, **inputs)
    batch = animate_pipe([A.P.PROMPT, A.P.PROMPT], **inputs)
    assert alone.shape == (1, 3, 13, 32, 32) and batch.shape == (2, 3, 13, 32, 32)
    torch.testing.assert_close(batch[:1], alone, atol=1e-4, rtol=0)  # batched matmuls round differently
    assert (batch[1] - batch[0]).abs().max() > 1e-4  # the second prompt's noise is its own


def test_segment_noise_never_shares_an_unseeded_call_itself(monkeypatch):
    """The pipeline shares an unseeded call's seed when it is parallel; segment_noise's own draw must not broadcast
    (a rank-0-alone call would wait for ranks that never come while another pipeline of the process is parallel)."""
    import diffsynth.runtime.parallel as parallel
    from diffsynth.wan.animate import segment_noise

    asked = []
    monkeypatch.setattr(parallel, "shared_seed", lambda flag=None: asked.append(flag))
    draws = list(segment_noise((1, 2, 3), 2, None, torch.device("cpu")))
    assert asked == [False] and len(draws) == 2
