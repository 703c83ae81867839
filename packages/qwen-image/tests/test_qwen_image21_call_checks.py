"""`QwenImage21Pipeline.__call__` argument handling: when true CFG runs, and `cfg_scale` and explicit `sigmas`
checked before any model runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffsynth.qwen_image.qwen_image21.pipeline import QwenImage21Pipeline
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.testing.modules import load_beside

R = load_beside(__file__, "qwen_image21_repo.py", "qwen_image21_repo")

FAST = dict(num_inference_steps=2, height=64, width=64, seed=0, progress_bar=False, output_type="pt")


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return R.build_repo(tmp_path_factory.mktemp("tiny-qwen-image-21"))


@pytest.fixture(scope="module")
def pipe(repo) -> QwenImage21Pipeline:
    return QwenImage21Pipeline.from_pretrained(str(repo), torch_dtype=torch.float32, device="cpu")


@pytest.mark.parametrize("cfg_scale", [0.0, 0.5, 1.0])
def test_cfg_scale_at_or_below_one_runs_no_cfg(pipe, monkeypatch, one_thread, cfg_scale):
    """As the README and diffusers (`true_cfg_scale > 1`): the negative prompt is not even encoded."""
    off = pipe("a red fox in the snow", **FAST)
    encoded = []
    encode = pipe.encode_prompt
    monkeypatch.setattr(
        pipe, "encode_prompt", lambda prompts, *a, **k: encoded.append(prompts) or encode(prompts, *a, **k)
    )
    got = pipe("a red fox in the snow", negative_prompt="an owl", cfg_scale=cfg_scale, **FAST)
    assert encoded == [["a red fox in the snow"]]
    torch.testing.assert_close(got, off, rtol=0, atol=0)


def test_cfg_scale_above_one_reads_the_negative_prompt(pipe, one_thread):
    plain = pipe("a red fox in the snow", negative_prompt="an owl", cfg_scale=1.0, **FAST)
    guided = pipe("a red fox in the snow", negative_prompt="an owl", cfg_scale=2.0, **FAST)
    assert (guided - plain).abs().max() > 0


@pytest.mark.parametrize("cfg_scale", [float("nan"), float("inf"), "abc", "4", True], ids=str)
def test_cfg_scale_that_is_not_a_finite_number_is_named_before_the_encoders_run(pipe, monkeypatch, cfg_scale):
    """NaN would compare as "no CFG" and inf make a NaN image; a string was a bare ValueError (or read as a number)."""

    def no_encoding(*args, **kwargs):
        raise AssertionError("the text encoder ran before cfg_scale was checked")

    monkeypatch.setattr(pipe, "encode_prompt", no_encoding)
    with pytest.raises(ConfigError, match=r"cfg_scale=.* must be a finite number"):
        pipe("a fox", negative_prompt="an owl", cfg_scale=cfg_scale, **FAST)


@pytest.mark.parametrize(
    "sigmas", [[], [0.5, 0.8], [1.5, 0.5], [float("nan")], torch.zeros(0)], ids=["empty", "up", "big", "nan", "t0"]
)
def test_bad_sigmas_are_named_before_the_encoders_run(pipe, monkeypatch, sigmas):
    def no_encoding(*args, **kwargs):
        raise AssertionError("the text encoder ran before sigmas were checked")

    monkeypatch.setattr(pipe, "encode_prompt", no_encoding)
    with pytest.raises(ConfigError, match=r"sigmas=.* is not accepted"):
        pipe("a fox", sigmas=sigmas, height=64, width=64, seed=0, progress_bar=False)


@pytest.mark.parametrize("sigmas", [[1.0, 0.5], [1.0, 0.5, 0.0], [0.7]])
def test_good_sigmas_still_set_the_step_count(pipe, sigmas):
    scheduler = pipe.scheduler(None, sigmas, 16)
    expected = len(sigmas) - (1 if sigmas[-1] == 0 and len(sigmas) > 1 else 0)
    assert len(scheduler.timesteps) == expected
    assert float(scheduler.sigmas[-1]) == 0.0
