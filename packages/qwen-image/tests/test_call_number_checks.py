"""`QwenImagePipeline.__call__` refuses bad numbers by name before the text encoder runs: a NaN guidance scale (it
silently turned guidance off) or mu, a height that int() used to cut, a prompt length the slicing failed on."""

from __future__ import annotations

import pytest

from diffsynth.qwen_image import QwenImagePipeline
from diffsynth.qwen_image.text_encoder import encode_prompts
from diffsynth.runtime.errors import ConfigError

FAST = dict(num_inference_steps=2, height=32, width=48, seed=0, progress_bar=False, output_type="np")


@pytest.fixture(scope="module")
def pipe(tiny_repo):
    return QwenImagePipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu")


def refused_before_encoding(pipe, monkeypatch, fragment: str, **kwargs) -> None:
    def no_encoding(*args, **kwargs):
        raise AssertionError("the text encoder ran before the arguments were checked")

    monkeypatch.setattr(pipe, "encode_prompt", no_encoding)
    with pytest.raises(ConfigError, match=fragment):
        pipe("a red circle", **{**FAST, **kwargs})


@pytest.mark.parametrize(
    "name, value",
    [
        ("cfg_scale", float("nan")),
        ("cfg_scale", float("inf")),
        ("cfg_scale", "4"),
        ("exponential_shift_mu", float("nan")),
        ("exponential_shift_mu", float("-inf")),
    ],
)
def test_non_finite_guidance_or_mu_is_refused(pipe, monkeypatch, name, value):
    """cfg_scale=nan compared False with 1 and ran without guidance; a NaN mu made every sigma NaN."""
    refused_before_encoding(pipe, monkeypatch, f"{name}={value!r} must be a finite number", **{name: value})


@pytest.mark.parametrize("name, value", [("height", float("nan")), ("width", 33.7), ("height", "32")])
def test_a_size_that_is_not_an_integer_is_refused_not_truncated(pipe, monkeypatch, name, value):
    """int() ran before check_size: NaN was a bare ValueError, 33.7 became 33 and "32" was taken."""
    refused_before_encoding(pipe, monkeypatch, f"{name}={value!r} is not accepted", **{name: value})


@pytest.mark.parametrize("value", [0, 1025, "a", 1.5, True])
def test_a_bad_max_sequence_length_is_refused_by_name(pipe, monkeypatch, value):
    """ "a" was a bare TypeError from the text encoder's range check, 1.5 one from slicing the states."""
    fragment = rf"max_sequence_length={value!r} is not accepted; use an integer in 1\.\.1024"
    refused_before_encoding(pipe, monkeypatch, fragment, max_sequence_length=value)


def test_the_text_encoder_names_a_bad_max_sequence_length(pipe):
    with pytest.raises(ConfigError, match="max_sequence_length='a' is not accepted"):
        encode_prompts(pipe.text_encoder, pipe.tokenizer, ["a red circle"], max_sequence_length="a")
