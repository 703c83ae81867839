"""`BasePipeline.check_prompts` / `check_prompt_pair`: a string or a list / tuple of strings, anything else refused
with a ConfigError naming the argument (not a bare TypeError from `list(...)`)."""

from __future__ import annotations

import pytest

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.pipeline import BasePipeline


def test_a_string_list_or_tuple_is_taken():
    assert BasePipeline.check_prompts("a cat") == ["a cat"]
    assert BasePipeline.check_prompts(["a cat", "a dog"]) == ["a cat", "a dog"]
    assert BasePipeline.check_prompts(("a cat",)) == ["a cat"]
    assert BasePipeline.check_prompts("", "negative_prompt", allow_empty=True) == [""]


@pytest.mark.parametrize("prompt", [3, 2.5, None, b"a cat", {"a cat": 1}, {"a cat"}, (p for p in ["a cat"]), [], [3]])
def test_anything_else_is_refused(prompt):
    with pytest.raises(ConfigError, match="prompt must be a string or a non-empty list of strings"):
        BasePipeline.check_prompts(prompt)


def test_the_negative_prompt_is_named():
    with pytest.raises(ConfigError, match="^negative_prompt must be a string"):
        BasePipeline.check_prompts(7, "negative_prompt", allow_empty=True)
