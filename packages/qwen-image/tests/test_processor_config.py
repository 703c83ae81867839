"""DiffSynth-Studio's `from_pretrained(processor_config=...)`: the Edit models' `processor/` folder, which also gives
the prompt tokenizer when no `tokenizer_config` is passed (as the Studio Edit examples do)."""

import pytest
from PIL import Image

from diffsynth.qwen_image import QwenImagePipeline
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.hub import ModelConfig

FAST = dict(num_inference_steps=1, height=32, width=32, seed=0, output_type="pt", progress_bar=False)


def model_configs(repo) -> list[ModelConfig]:
    names = ("transformer/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors")
    names += ("vae/diffusion_pytorch_model.safetensors",)
    return [ModelConfig(path=str(repo / name)) for name in names]


def load(repo, **configs) -> QwenImagePipeline:
    return QwenImagePipeline.from_pretrained(
        model_configs=model_configs(repo), torch_dtype="float32", device="cpu", **configs
    )


@pytest.fixture
def small_edit_areas(monkeypatch):
    from diffsynth.qwen_image import pipeline as module

    monkeypatch.setattr(module, "EDIT_AREA", 64 * 64)
    monkeypatch.setattr(module, "CONDITION_AREA", 56 * 56)


def test_processor_config_alone_gives_the_processor_and_the_tokenizer(tiny_repo, small_edit_areas, one_thread):
    from transformers import AutoTokenizer

    pipe = load(tiny_repo, processor_config=ModelConfig(path=str(tiny_repo / "processor")))
    assert pipe.processor is not None and pipe.tokenizer is pipe.processor.tokenizer
    prompt = "a red circle"
    assert pipe.tokenizer(prompt).input_ids == AutoTokenizer.from_pretrained(tiny_repo / "tokenizer")(prompt).input_ids
    edit = Image.new("RGB", (32, 32), (200, 10, 10))
    assert pipe("make it blue", edit_image=edit, **FAST).shape == (1, 3, 32, 32)


def test_processor_config_beside_a_tokenizer_config_and_a_folder_without_a_processor(tiny_repo, tmp_path):
    both = load(
        tiny_repo,
        tokenizer_config=ModelConfig(path=str(tiny_repo / "tokenizer")),
        processor_config=ModelConfig(path=str(tiny_repo / "processor")),
    )
    assert both.processor is not None and both.tokenizer is not both.processor.tokenizer
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"processor_config: .*empty holds no Qwen2-VL processor"):
        load(tiny_repo, processor_config=ModelConfig(path=str(tmp_path / "empty")))
    with pytest.raises(ConfigError, match="processor_config must be a ModelConfig"):
        load(tiny_repo, processor_config=str(tiny_repo / "processor"))
