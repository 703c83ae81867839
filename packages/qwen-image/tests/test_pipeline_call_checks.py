"""`QwenImagePipeline.__call__` refuses arguments it would otherwise ignore: image-to-image's `denoising_strength`
without `input_image`, `edit_rope_interpolation` without an edit image, and (with `layer_input_image`) every input
of the other modes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from diffsynth.qwen_image import QwenImagePipeline
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.testing.modules import load_beside

L = load_beside(__file__, "test_layered_pipeline.py", "qwen_image_test_layered_pipeline")  # build_layered_repo

FAST = dict(num_inference_steps=2, height=32, width=48, seed=0, progress_bar=False, output_type="np")


@pytest.fixture(scope="module")
def pipe(tiny_repo):
    return QwenImagePipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def layered(tiny_repo, tmp_path_factory):
    root = L.build_layered_repo(tiny_repo, tmp_path_factory.mktemp("layered-checks") / "Qwen-Image-Layered")
    return QwenImagePipeline.from_pretrained(str(root), torch_dtype="float32", device="cpu")


def picture(seed: int, size=(48, 32), mode="RGB") -> Image.Image:
    channels = 4 if mode == "RGBA" else 3
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(pixels, mode)


@pytest.mark.parametrize("strength", [0.5, 0.1])
def test_denoising_strength_below_one_needs_an_input_image(pipe, monkeypatch, strength):
    def no_encoding(*args, **kwargs):
        raise AssertionError("the text encoder ran before the arguments were checked")

    monkeypatch.setattr(pipe, "encode_prompt", no_encoding)
    with pytest.raises(ConfigError, match=rf"denoising_strength={strength} is image-to-image.*give input_image"):
        pipe("a red circle", denoising_strength=strength, **FAST)


def test_denoising_strength_still_works_with_an_input_image(pipe, one_thread):
    source = picture(1)
    light = pipe("a red circle", input_image=source, denoising_strength=0.3, **FAST)
    full = pipe("a red circle", input_image=source, **FAST)
    assert np.abs(light - full).max() > 0


def test_edit_rope_interpolation_needs_an_edit_image(pipe, monkeypatch):
    def no_encoding(*args, **kwargs):
        raise AssertionError("the text encoder ran before the arguments were checked")

    monkeypatch.setattr(pipe, "encode_prompt", no_encoding)
    with pytest.raises(ConfigError, match="edit_rope_interpolation=True .* give edit_image"):
        pipe("a red circle", edit_rope_interpolation=True, **FAST)


def test_a_preset_default_of_edit_rope_interpolation_does_not_refuse_text_to_image(pipe, monkeypatch, one_thread):
    """The Edit-Lowres-Fix preset turns it on by default; a call without an edit image then just has no references."""
    monkeypatch.setitem(pipe.defaults, "edit_rope_interpolation", True)
    out = pipe("a red circle", **FAST)
    assert out.shape == (1, 32, 48, 3)
    pipe("a red circle", edit_rope_interpolation=False, **FAST)  # an explicit False is never refused


@pytest.mark.parametrize(
    "kwargs",
    [
        {"eligen_entity_masks": [Image.new("L", (32, 32), 255)]},
        {"inpaint_blur_size": 2, "inpaint_blur_sigma": 1.0},
        {"inpaint_blur_size": 2},
        {"inpaint_blur_sigma": 1.0},
        {"zero_cond_t": True},
        {"zero_cond_t": False},
        {"edit_image_auto_resize": False},
        {"edit_image_auto_resize": True},
        {"eligen_enable_on_negative": True},
    ],
    ids=lambda kwargs: ",".join(kwargs),
)
def test_layered_refuses_the_other_modes_inputs(layered, monkeypatch, kwargs):
    def no_encoding(*args, **options):
        raise AssertionError("the text encoder ran before the arguments were checked")

    monkeypatch.setattr(layered, "encode_prompt", no_encoding)
    with pytest.raises(ConfigError, match=rf"{', '.join(kwargs)} cannot be combined with layer_input_image"):
        layered("a red circle", layer_input_image=picture(0, (32, 16), "RGBA"), layer_num=2, **kwargs, **FAST)


def test_layered_takes_the_defaults_of_those_inputs(layered, one_thread):
    common = dict(layer_input_image=picture(0, (32, 16), "RGBA"), layer_num=2, num_inference_steps=1, seed=0)
    common.update(height=32, width=32, progress_bar=False, output_type="np")
    plain = layered("a red circle", **common)
    spelled = layered(
        "a red circle",
        eligen_entity_masks=None,
        eligen_enable_on_negative=False,
        inpaint_blur_size=None,
        inpaint_blur_sigma=None,
        zero_cond_t=None,
        edit_image_auto_resize=None,
        **common,
    )
    np.testing.assert_array_equal(plain, spelled)
