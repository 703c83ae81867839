"""`from_pretrained(model_configs=[...])` as DiffSynth-Studio loads: the hub configs of one preset's repos take that
preset's generation defaults, as its name does (FLUX.1-schnell listed file by file was sampled with dev's 28 steps
and time shift). A toy family; no file is read (the pipeline's `_load_config` makes the model)."""

from __future__ import annotations

import pytest
import torch

from diffsynth.runtime import registry
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.pipeline import BasePipeline
from diffsynth.runtime.registry import Family, Preset, PresetFile

BASE = {"num_inference_steps": 28, "sigma_shift": 3.0}
FAST = {"num_inference_steps": 4, "sigma_shift": 1.0}
FINETUNE = {"num_inference_steps": 50}


class ToyPipeline(BasePipeline):
    family = "toy-studio-family"
    model_slots = {"dit": "dit"}

    def _load_config(self, config):
        self.dit = torch.nn.Linear(2, 2)


@pytest.fixture(autouse=True)
def toy_family(monkeypatch):
    """Org/Base and Org/Fast (each its own files) and Org/Tune (its DiT with Org/Base's encoders)."""
    presets = {
        "Org/Base": Preset(name="Org/Base", files=(PresetFile("Org/Base", "dit.safetensors"),), defaults=BASE),
        "Org/Fast": Preset(name="Org/Fast", files=(PresetFile("Org/Fast", "dit.safetensors"),), defaults=FAST),
        "Org/Tune": Preset(
            name="Org/Tune",
            files=(PresetFile("Org/Tune", "tune.safetensors"), PresetFile("Org/Base", "encoder/*")),
            defaults=FINETUNE,
        ),
    }
    family = Family(name="toy-studio-family", presets=presets)
    monkeypatch.setattr(registry, "installed_families", lambda: {"toy-studio-family": family})


def hub(repo: str, pattern: str = "dit.safetensors") -> ModelConfig:
    return ModelConfig(model_id=repo, origin_file_pattern=pattern)


def loaded_defaults(*configs: ModelConfig) -> dict:
    return ToyPipeline.from_pretrained(model_configs=list(configs), torch_dtype="float32", device="cpu").defaults


def test_configs_of_one_presets_repo_take_its_defaults():
    assert loaded_defaults(hub("Org/Fast"), hub("Org/Fast", "vae/*")) == FAST
    assert loaded_defaults(hub("org/fast")) == FAST  # hub names are not case-sensitive
    listed = ToyPipeline.from_pretrained([hub("Org/Fast")], torch_dtype="float32", device="cpu")
    assert listed.defaults == FAST  # the configs as the first argument, too


def test_a_preset_loading_from_another_repo_is_told_from_that_repos_own():
    """Org/Tune's DiT with Org/Base's encoders (in either order) is Org/Tune, not Org/Base."""
    assert loaded_defaults(hub("Org/Base", "encoder/*"), hub("Org/Tune", "tune.safetensors")) == FINETUNE


def test_configs_no_one_preset_explains_take_no_defaults(tmp_path):
    """A repo no preset loads from (an adapter, another DiT), two presets' own repos, or a local file: none."""
    assert loaded_defaults(hub("Org/Fast"), hub("Someone/Adapter")) == {}
    assert loaded_defaults(hub("Org/Fast"), hub("Org/Base")) == {}
    assert loaded_defaults(hub("Someone/Model")) == {}
    assert loaded_defaults(hub("Org/Fast"), ModelConfig(path=str(tmp_path / "dit.safetensors"))) == {}


def test_a_preset_name_still_takes_its_own_defaults():
    pipe = ToyPipeline.from_pretrained("Org/Base", model_configs=[hub("Org/Fast")], torch_dtype="float32")
    assert pipe.defaults == BASE
