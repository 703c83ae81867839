"""`WanVideoPipeline.__call__` refuses bad numbers by name before the text encoder runs: NaN or infinite guidance
and shift (a NaN video with no word why), a shift that is no number, a height that int() used to cut."""

from __future__ import annotations

import pytest

from diffsynth.runtime.errors import ConfigError
from diffsynth.wan import WanVideoPipeline

PROMPT = "a red circle on a blue background"
FAST = {"height": 32, "width": 32, "num_frames": 5, "num_inference_steps": 2, "progress_bar": False, "seed": 0}


def load(repo) -> WanVideoPipeline:
    return WanVideoPipeline.from_pretrained(str(repo), torch_dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def pipe(tiny_repo):
    return load(tiny_repo)


def refused_before_encoding(pipe, monkeypatch, fragment: str, **kwargs) -> None:
    def no_encoding(*args, **kwargs):
        raise AssertionError("the text encoder ran before the arguments were checked")

    monkeypatch.setattr(pipe, "encode_prompt", no_encoding)
    with pytest.raises(ConfigError, match=fragment):
        pipe(PROMPT, **{**FAST, **kwargs})


@pytest.mark.parametrize(
    "name, value",
    [
        ("cfg_scale", float("nan")),
        ("cfg_scale", float("inf")),
        ("sigma_shift", float("nan")),
        ("sigma_shift", float("-inf")),
        ("sigma_shift", "x"),  # float("x") was a bare ValueError
    ],
)
def test_non_finite_guidance_or_shift_is_refused(pipe, monkeypatch, name, value):
    refused_before_encoding(pipe, monkeypatch, f"{name}={value!r} must be a finite number", **{name: value})


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_low_noise_guidance_is_refused(tiny_repo_factory, monkeypatch, value):
    """cfg_scale_2 guides the A14B low-noise expert."""
    pipe = load(tiny_repo_factory("a14b"))
    refused_before_encoding(pipe, monkeypatch, f"cfg_scale_2={value!r} must be a finite number", cfg_scale_2=value)


@pytest.mark.parametrize("name, value", [("height", float("nan")), ("width", 33.7), ("height", "32")])
def test_a_size_that_is_not_an_integer_is_refused_not_truncated(pipe, monkeypatch, name, value):
    """int() ran before check_size: NaN was a bare ValueError, 33.7 became 33 and "32" was taken."""
    refused_before_encoding(pipe, monkeypatch, f"{name}={value!r} is not accepted", **{name: value})
