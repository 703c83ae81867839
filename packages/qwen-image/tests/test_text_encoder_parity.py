"""Our text encoder and prompt encoding against transformers and diffusers on the tiny repo (fp32, CPU)."""

import pytest
import torch

pytest.importorskip("diffusers")

pytestmark = pytest.mark.parity
PROMPTS = ["a red circle on a blue background", "a yellow triangle", ""]


@pytest.fixture(scope="module")
def both(tiny_repo):
    import diffusers
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from diffsynth.qwen_image import QwenImagePipeline

    ref = diffusers.QwenImagePipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_repo / "scheduler"),
        vae=None,
        text_encoder=Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_repo / "text_encoder").eval(),
        tokenizer=AutoTokenizer.from_pretrained(tiny_repo / "tokenizer"),
        transformer=None,
    )
    ours = QwenImagePipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu")
    return ours, ref


def test_hidden_states_match_transformers(both):
    ours, ref = both
    tokens = ref.tokenizer(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = ref.text_encoder(**tokens, output_hidden_states=True).hidden_states[-1]
        got = ours.text_encoder.last_hidden_state(tokens["input_ids"], tokens["attention_mask"])
    mask = tokens["attention_mask"].bool()
    assert (got[mask] - expected[mask]).abs().max() <= 1e-5


def test_prompt_embeddings_match_diffusers(both):
    ours, ref = both
    expected, expected_mask = ref.encode_prompt(list(PROMPTS), device="cpu")
    got, mask = ours.encode_prompt(PROMPTS)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= 1e-5
    assert torch.equal(mask, expected_mask.bool())
