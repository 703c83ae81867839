"""Edit prompts are not cut at max_sequence_length: the edit images' vision tokens come before the instruction,
and the authors' Edit pipelines (diffusers' QwenImageEditPipeline / QwenImageEditPlusPipeline) keep them whole."""

import numpy as np
import pytest
import torch
from PIL import Image

from diffsynth.qwen_image import QwenImagePipeline

FAST = dict(num_inference_steps=2, height=32, width=32, progress_bar=False, output_type="np", cfg_scale=1.0, seed=0)


@pytest.fixture(scope="module")
def pipe(tiny_repo):
    return QwenImagePipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu")


def _images(count: int) -> list[Image.Image]:
    rng = np.random.default_rng(3)
    return [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(count)]


@pytest.mark.parametrize("style", ["plus", "edit"])
def test_the_instruction_survives_more_vision_tokens_than_max_sequence_length(pipe, monkeypatch, style):
    monkeypatch.setitem(pipe.defaults, "edit_template", style)
    edits = pipe.prepare_edit_images(_images(3), False)
    whole, whole_mask = pipe.encode_prompt(["make the circle blue"], 1024, edits)
    assert int(whole_mask.sum()) > 8  # the vision tokens alone are longer than the cut tried below
    short, short_mask = pipe.encode_prompt(["make the circle blue"], 8, edits)
    torch.testing.assert_close(short, whole, atol=0, rtol=0)
    assert torch.equal(short_mask, whole_mask)
    other, _ = pipe.encode_prompt(["a yellow triangle on a black background"], 8, edits)
    assert other.shape != short.shape or (other - short).abs().max() > 0


def test_text_to_image_prompts_are_still_cut(pipe):
    whole, whole_mask = pipe.encode_prompt(["a red circle on a blue background"], 1024)
    short, short_mask = pipe.encode_prompt(["a red circle on a blue background"], 3)
    assert int(whole_mask.sum()) > 3 and short.shape[1] == 3 and bool(short_mask.all())
    torch.testing.assert_close(short, whole[:, :3], atol=0, rtol=0)


def test_two_instructions_with_many_edit_images_give_different_images(pipe):
    common = dict(edit_image=_images(6), edit_image_auto_resize=False, max_sequence_length=16, **FAST)
    a = pipe("make the circle blue", **common)
    b = pipe("a yellow triangle on a black background", **common)
    assert np.abs(a - b).max() > 0


@pytest.mark.parity
def test_edit_plus_embeddings_equal_diffusers_encode_prompt(pipe, tiny_repo):
    pytest.importorskip("diffusers")
    import diffusers
    from transformers import Qwen2_5_VLForConditionalGeneration

    edits = pipe.prepare_edit_images(_images(3), False)
    vision = [edit[0] for edit in edits]
    ours, ours_mask = pipe.encode_prompt(["make it red"], 8, edits)
    ref = diffusers.QwenImageEditPlusPipeline(
        scheduler=None,
        vae=None,
        text_encoder=Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_repo / "text_encoder"),
        tokenizer=pipe.processor.tokenizer,
        processor=pipe.processor,
        transformer=None,
    )
    expected, expected_mask = ref.encode_prompt(["make it red"], image=vision, device="cpu")
    assert ours.shape == expected.shape
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    assert expected_mask is None and bool(ours_mask.all())  # diffusers drops an all-True mask
