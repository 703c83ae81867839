"""Z-Image prompt encoding on a tiny Qwen3 encoder and a tiny offline Qwen tokenizer."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import Qwen3Config, Qwen3Model

from diffsynth.runtime.models.qwen3 import Qwen3TextEncoder
from diffsynth.runtime.testing.tokenizers import build_tiny_qwen_tokenizer
from diffsynth.z_image.text_encoder import encode_prompts, tokenize

PROMPTS = [
    "a red circle on a blue background",
    "a cat",
    "",
    "close-up portrait of an old man with a white beard, oil painting, dramatic light",
]


def tiny_text_config(vocab_size: int) -> Qwen3Config:
    """The only place tiny Qwen3 sizes live in these tests."""
    return Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=1024,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
    )


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tiny_qwen_tokenizer(tmp_path_factory.mktemp("tokenizer"), texts=PROMPTS * 4)


@pytest.fixture(scope="module")
def encoder(tokenizer) -> Qwen3TextEncoder:
    model = Qwen3TextEncoder(tiny_text_config(len(tokenizer)))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1.0 + 0.1 * noise if "norm" in name else 0.2 * noise)
    return model.eval()


def template_ids(tokenizer, prompt: str) -> list[int]:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True, enable_thinking=True
    )
    return tokenizer(text)["input_ids"]


def full_forward(encoder, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        out = encoder(input_ids=torch.tensor([ids]), output_hidden_states=True)
    return out.hidden_states


def test_one_variable_length_tensor_per_prompt(tokenizer, encoder):
    embeds = encode_prompts(encoder, tokenizer, PROMPTS)
    assert len(embeds) == len(PROMPTS)
    for prompt, e in zip(PROMPTS, embeds, strict=True):
        assert e.shape == (len(template_ids(tokenizer, prompt)), 32)
        assert e.dtype == torch.float32
    assert len({e.shape[0] for e in embeds}) == len(PROMPTS)


def test_template_is_qwen3_thinking_prompt(tokenizer):
    ids, mask = tokenize(tokenizer, ["a cat"], max_length=512)
    text = tokenizer.decode(ids[0][mask[0]])
    assert text == "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n"


def test_batch_equals_each_prompt_alone(tokenizer, encoder):
    batched = encode_prompts(encoder, tokenizer, PROMPTS)
    for prompt, b in zip(PROMPTS, batched, strict=True):
        (alone,) = encode_prompts(encoder, tokenizer, [prompt])
        assert torch.allclose(alone, b, atol=1e-5, rtol=0)


def test_second_to_last_layer(tokenizer, encoder):
    (embeds,) = encode_prompts(encoder, tokenizer, [PROMPTS[0]])
    hidden = full_forward(encoder, template_ids(tokenizer, PROMPTS[0]))
    assert len(hidden) == 4  # embeddings + 3 layers (last one normed)
    assert torch.allclose(embeds, hidden[-2][0], atol=1e-5, rtol=0)
    assert not torch.allclose(embeds, hidden[-1][0], atol=1e-2)


def test_truncation_at_max_length(tokenizer, encoder):
    full_length = len(template_ids(tokenizer, PROMPTS[3]))
    (full,) = encode_prompts(encoder, tokenizer, [PROMPTS[3]])
    short, other = encode_prompts(encoder, tokenizer, [PROMPTS[3], "a cat"], max_length=10)
    assert full_length > 10 and short.shape == (10, 32) and other.shape[0] == 10
    # causal attention: a truncated prompt encodes like the start of the full one
    assert torch.allclose(short, full[:10], atol=1e-5, rtol=0)


def test_padding_to_longest_equals_padding_to_max_length(tokenizer, encoder):
    """The authors pad to 512; right padding + causal attention make that equal to padding to the longest."""
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True, enable_thinking=True
        )
        for p in PROMPTS
    ]
    inputs = tokenizer(texts, padding="max_length", max_length=512, truncation=True, return_tensors="pt")
    mask = inputs.attention_mask.bool()
    with torch.no_grad():
        hidden = encoder(input_ids=inputs.input_ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
    ours = encode_prompts(encoder, tokenizer, PROMPTS)
    for h, m, e in zip(hidden, mask, ours, strict=True):
        assert torch.allclose(h[m], e, atol=1e-5, rtol=0)


def test_plain_transformers_model_and_device(tokenizer, encoder):
    plain = Qwen3Model(encoder.config).eval()
    plain.load_state_dict(encoder.state_dict())
    a = encode_prompts(plain, tokenizer, PROMPTS[:2], device="cpu")
    b = encode_prompts(encoder, tokenizer, PROMPTS[:2])
    for x, y in zip(a, b, strict=True):
        assert x.device.type == "cpu" and torch.allclose(x, y, atol=1e-5, rtol=0)
    assert encode_prompts(encoder, tokenizer, []) == []


@pytest.mark.parity
def test_matches_diffusers_encode_prompt(tokenizer, encoder):
    pytest.importorskip("diffusers")
    from diffusers.pipelines.z_image.pipeline_z_image import ZImagePipeline

    reference_encoder = Qwen3Model(encoder.config).eval()  # what diffusers loads for text_encoder/
    reference_encoder.load_state_dict(encoder.state_dict())
    stand_in = SimpleNamespace(
        tokenizer=tokenizer, text_encoder=reference_encoder, _execution_device=torch.device("cpu")
    )
    with torch.no_grad():
        expected = ZImagePipeline._encode_prompt(stand_in, list(PROMPTS), device=torch.device("cpu"))
    got = encode_prompts(encoder, tokenizer, PROMPTS)
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert g.shape == e.shape
        assert (g - e).abs().max() <= 1e-5
