"""LTX-2.5's Gemma 4 text encoder on a transformers older than 5.23 (the packages allow >=5.0): the module still
imports and using the encoder raises a ConfigError naming the transformers release it needs."""

from __future__ import annotations

import importlib
import sys

import pytest
import transformers.cache_utils

import diffsynth.ltx2
import diffsynth.ltx2.gemma4_text_encoder  # noqa: F401  (the module the tests re-import, restored afterwards)
from diffsynth.ltx2.text_encoder_formats import build_gemma4_text, gemma4_text_config
from diffsynth.runtime.errors import ConfigError

MODULE = "diffsynth.ltx2.gemma4_text_encoder"
NEEDS = r"needs transformers>=5\.23 \(installed .+\): pip install -U transformers"


@pytest.fixture
def old_transformers(monkeypatch):
    """`from transformers.cache_utils import KVSharingDict` fails, as on transformers < 5.23."""
    monkeypatch.delattr(transformers.cache_utils, "KVSharingDict")


def test_building_the_encoder_names_the_transformers_needed(old_transformers):
    with pytest.raises(ConfigError, match=NEEDS):
        gemma4_text_config({}, None)
    with pytest.raises(ConfigError, match=NEEDS):
        build_gemma4_text(None)


def test_module_imports_on_old_transformers(old_transformers, monkeypatch):
    monkeypatch.setattr(diffsynth.ltx2, "gemma4_text_encoder", sys.modules[MODULE])  # put back after the test
    monkeypatch.delitem(sys.modules, MODULE)
    module = importlib.import_module(MODULE)
    with pytest.raises(ConfigError, match=NEEDS):
        module.Gemma4TextEncoder(None)
