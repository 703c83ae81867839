"""EliGen for Qwen-Image (`eligen_entity_prompts` / `eligen_entity_masks`, DiffSynth-Studio's): each text segment
placed as if alone, entities with empty regions changing nothing, and the pipeline's checks. The joint mask itself
is checked against DiffSynth-Studio's construction in the runtime's tests."""

from __future__ import annotations

import numpy as np
import pytest
import qwen_image_test_dit as T  # loaded by conftest
import torch
from PIL import Image

from diffsynth.qwen_image import QwenImagePipeline
from diffsynth.runtime.eligen import segment_attention_mask
from diffsynth.runtime.errors import ConfigError

H, W = 32, 64  # 2 x 4 packed image tokens
RUN = dict(num_inference_steps=2, height=H, width=W, progress_bar=False, output_type="pt")


def test_entities_with_empty_regions_change_nothing():
    """An entity no image token may see (and that sees only itself) leaves the image and the global prompt as
    they are in a plain call: which also shows the global segment keeps the text positions it has alone."""
    model = T.make_model().eval()
    x, t, text, _, shapes = T.inputs(text_lengths=(6,))
    entity = torch.randn(1, 4, text.shape[-1], generator=torch.Generator().manual_seed(5))
    n_img = x.shape[1]
    mask = segment_attention_mask(torch.zeros(1, 1, n_img, dtype=torch.bool), [4, 6], n_img)
    with torch.no_grad():
        plain = model(x, t, text, None, shapes)
        isolated = model(x, t, torch.cat([entity, text], dim=1), None, shapes, [4, 6], mask)
        seen = model(
            x, t, torch.cat([entity, text], dim=1), None, shapes, [4, 6],
            segment_attention_mask(torch.ones(1, 1, n_img, dtype=torch.bool), [4, 6], n_img),
        )  # fmt: skip
    torch.testing.assert_close(isolated, plain, atol=1e-5, rtol=0)
    assert (seen - plain).abs().max() > 1e-3  # an entity over the whole image does change it


def test_segments_start_their_text_positions_afresh():
    from diffsynth.qwen_image.dit import msrope_angles

    shapes, axes = [(1, 4, 6)], (4, 6, 6)
    _, joint = msrope_angles(shapes, [3, 5], axes, torch.device("cpu"))
    _, three = msrope_angles(shapes, 3, axes, torch.device("cpu"))
    _, five = msrope_angles(shapes, 5, axes, torch.device("cpu"))
    assert torch.equal(joint, torch.cat([three, five]))


@pytest.fixture(scope="module")
def pipe(tiny_repo):
    return QwenImagePipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu")


def mask_image(left: bool) -> Image.Image:
    array = np.zeros((H, W, 3), dtype=np.uint8)
    if left:
        array[:, : W // 2] = 255
    return Image.fromarray(array)


@pytest.mark.parametrize("on_negative", [False, True])
def test_pipeline_regions(pipe, on_negative):
    """With CFG: black masks give the plain image (the entities are seen by nothing), a region changes it; with
    `eligen_enable_on_negative` the negative branch gets the regions too, which changes it again."""
    options = dict(seed=0, cfg_scale=3.0, negative_prompt="blurry", eligen_enable_on_negative=on_negative, **RUN)
    plain = pipe("a cat and a dog", **{k: v for k, v in options.items() if k != "eligen_enable_on_negative"})
    blind = pipe("a cat and a dog", eligen_entity_prompts=["a cat", "a dog"],
                 eligen_entity_masks=[mask_image(False)] * 2, **options)  # fmt: skip
    torch.testing.assert_close(blind, plain, atol=1e-5, rtol=0)
    regional = pipe("a cat and a dog", eligen_entity_prompts=["a cat"], eligen_entity_masks=[mask_image(True)],
                    **options)  # fmt: skip
    assert (regional - plain).abs().max() > 1e-4  # 10x what the blind run may differ by
    if on_negative:
        positive_only = pipe("a cat and a dog", eligen_entity_prompts=["a cat"],
                             eligen_entity_masks=[mask_image(True)], **{**options, "eligen_enable_on_negative": False})  # fmt: skip
        assert (regional - positive_only).abs().max() > 1e-4, (regional - positive_only).abs().max()


@pytest.mark.parametrize(
    ("prompt", "kwargs", "match"),
    [
        ("a cat", dict(eligen_entity_prompts=["a cat"]), "without eligen_entity_masks"),
        ("a cat", dict(eligen_entity_prompts=["a", "b"], eligen_entity_masks=[mask_image(True)]), "one mask per"),
        (["a", "b"], dict(eligen_entity_prompts=["a"], eligen_entity_masks=[mask_image(True)]), "one prompt at a"),
        (
            "a cat",
            dict(eligen_entity_prompts=["a"], eligen_entity_masks=[mask_image(True)], eligen_enable_on_negative="yes"),
            "eligen_enable_on_negative='yes'",
        ),  # fmt: skip
    ],
)
def test_bad_eligen_inputs_name_the_argument(pipe, prompt, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        pipe(prompt, seed=0, **kwargs, **RUN)
