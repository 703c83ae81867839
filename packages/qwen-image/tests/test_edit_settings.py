"""Edit settings on the tiny repo: the prompt template the loaded DiT implies (`edit_template`), the output side
an edit takes from its last image, and the edit inputs refused with a ConfigError naming them."""

import json

import pytest
from PIL import Image

from diffsynth.qwen_image import QwenImagePipeline
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.hub import ModelConfig

FAST = dict(num_inference_steps=1, cfg_scale=1.0, seed=0, progress_bar=False)


@pytest.fixture(scope="module")
def pipe(tiny_repo):
    return QwenImagePipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu")


@pytest.fixture
def small_edit_areas(monkeypatch):
    from diffsynth.qwen_image import pipeline as module

    monkeypatch.setattr(module, "EDIT_AREA", 64 * 64)
    monkeypatch.setattr(module, "CONDITION_AREA", 56 * 56)


def _hub(repo: str) -> ModelConfig:
    return ModelConfig(model_id=repo, origin_file_pattern="transformer/diffusion_pytorch_model*.safetensors")


def test_edit_template_of_a_hub_dit_matches_exact_repo_names():
    from diffsynth.qwen_image.pipeline import source_edit_template

    assert source_edit_template(_hub("Qwen/Qwen-Image-Edit")) == "edit"
    assert source_edit_template(_hub("qwen/QWEN-IMAGE-EDIT")) == "edit"
    assert source_edit_template(_hub("Qwen/Qwen-Image-Edit-2509")) == "plus"
    assert source_edit_template(_hub("Qwen/Qwen-Image-Edit-2511")) == "plus"
    for other in ("Qwen/Qwen-Image", "Qwen/Qwen-Image-Edit-2512-Preview", "Someone/Qwen-Image-Edit"):
        assert source_edit_template(_hub(other)) is None
    assert source_edit_template(None) is None


def test_edit_template_of_a_diffusers_folder_reads_model_index(tmp_path):
    from diffsynth.qwen_image.pipeline import source_edit_template

    weights = tmp_path / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(b"")
    config = ModelConfig(path=str(weights))
    assert source_edit_template(config) is None  # no model_index.json
    for name, style in (("QwenImageEditPipeline", "edit"), ("QwenImageEditPlusPipeline", "plus"), ("X", None)):
        (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": name}))
        assert source_edit_template(config) == style
    (tmp_path / "model_index.json").write_text("not json")
    assert source_edit_template(config) is None


def test_studio_model_configs_of_the_first_edit_take_its_template(pipe, monkeypatch):
    """DiffSynth-Studio's Qwen-Image-Edit example: its DiT with Qwen-Image's text encoder and VAE, no preset."""
    assert pipe.edit_template() == "plus"  # the tiny folder says nothing
    monkeypatch.setitem(pipe.model_configs, "dit", _hub("Qwen/Qwen-Image-Edit"))
    assert pipe.edit_template() == "edit"
    monkeypatch.setitem(pipe.defaults, "edit_template", "plus")  # a preset's (or folder's) default comes first
    assert pipe.edit_template() == "plus"
    assert pipe.edit_template("edit") == "edit"  # and the call's before it


def test_edit_template_keyword(pipe, small_edit_areas, monkeypatch):
    image = Image.new("RGB", (40, 80), (10, 200, 10))
    run = dict(FAST, output_type="pt", height=32, width=32)
    keyword = pipe("make it blue", edit_image=image, edit_template="edit", **run)
    monkeypatch.setitem(pipe.defaults, "edit_template", "edit")
    assert (pipe("make it blue", edit_image=image, **run) - keyword).abs().max() == 0
    plus = pipe("make it blue", edit_image=image, edit_template="plus", **run)
    assert (plus - keyword).abs().max() > 0
    with pytest.raises(ConfigError, match="edit_template='v3'"):
        pipe("make it blue", edit_image=image, edit_template="v3", **run)
    with pytest.raises(ConfigError, match="edit_template='edit'.*give edit_image"):
        pipe("a cat", edit_template="edit", **run)


def test_edit_with_one_side_takes_the_other_from_the_last_edit_image(pipe, small_edit_areas):
    image = Image.new("RGB", (64, 64), (10, 200, 10))  # about 64x64 pixels: 64x64
    assert pipe("make it blue", edit_image=image, width=96, **FAST).size == (96, 64)
    assert pipe("make it blue", edit_image=image, height=48, **FAST).size == (64, 48)


def test_edit_image_auto_resize_must_be_a_bool(pipe, small_edit_areas):
    with pytest.raises(ConfigError, match="edit_image_auto_resize='no'"):
        pipe("make it blue", edit_image=Image.new("RGB", (64, 64)), edit_image_auto_resize="no", **FAST)


def test_edit_rope_interpolation_must_be_a_bool(pipe, small_edit_areas):
    with pytest.raises(ConfigError, match="edit_rope_interpolation='no' must be True, False or None"):
        pipe("make it blue", edit_image=Image.new("RGB", (64, 64)), edit_rope_interpolation="no", **FAST)


def test_a_bad_edit_image_item_is_named_by_index(pipe):
    with pytest.raises(ConfigError, match=r"edit_image\[1\] must be a file path or a PIL.Image, got NoneType"):
        pipe("make it blue", edit_image=[Image.new("RGB", (64, 64)), None], height=32, width=32, **FAST)


def test_too_elongated_edit_image_is_refused_by_index(pipe):
    """At the real areas a 10x6000 picture's 384x384 vision image would be 0 pixels wide (a bare PIL error)."""
    thin = Image.new("RGB", (10, 6000))
    with pytest.raises(ConfigError, match=r"edit_image\[1\] is 10x6000: too elongated for 384x384"):
        pipe("make it blue", edit_image=[Image.new("RGB", (64, 64)), thin], height=32, width=32, **FAST)
    with pytest.raises(ConfigError, match=r"edit_image\[0\] is 4x6000: too elongated for the vision tower"):
        pipe("make it blue", edit_image=Image.new("RGB", (4, 6000)), edit_template="edit", height=32, width=32, **FAST)
    with pytest.raises(ConfigError, match=r"edit_image\[0\] is 10x60000: too elongated for 1024x1024"):
        pipe(
            "make it blue", edit_image=Image.new("RGB", (10, 60000)), edit_template="edit", height=32, width=32, **FAST
        )
