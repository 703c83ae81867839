"""umT5 text encoder: the authors' `.pth` layout through our mapping vs transformers, full-size key checks,
and Wan prompt encoding (real tokens, then zeros up to 512)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffsynth.runtime.errors import CheckpointError, ConfigError
from diffsynth.runtime.loading import load_model
from diffsynth.wan.encoder_formats import UMT5_SPEC, umt5_config_from_state
from diffsynth.wan.text_encoder import WanTextEncoder, clean_prompt, encode_prompts, tokenize

KEYS = Path(__file__).parent / "data" / "keys"


def meta_state(name: str) -> dict[str, torch.Tensor]:
    shapes = json.loads((KEYS / name).read_text())
    return {k: torch.empty(v, dtype=torch.bfloat16, device="meta") for k, v in shapes.items()}


@pytest.fixture(scope="module")
def reference(umt5_tokenizer, tiny_sizes):
    return tiny_sizes.tiny_umt5(len(umt5_tokenizer))


@pytest.fixture(scope="module")
def ours(reference, tiny_sizes):
    return load_model(tiny_sizes.umt5_to_original(reference.state_dict()), specs=[UMT5_SPEC]).eval()


def test_original_layout_matches_transformers(reference, ours, umt5_tokenizer):
    assert isinstance(ours, WanTextEncoder)
    ids, mask = tokenize(umt5_tokenizer, ["a red circle on a blue background", "a cat"])
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_embedding_is_tied_after_a_real_load(ours, tmp_path, reference, tiny_sizes):
    assert ours.encoder.embed_tokens.weight is ours.shared.weight
    path = tmp_path / "models_t5_umt5-xxl-enc-bf16.pth"
    torch.save(tiny_sizes.umt5_to_original(reference.state_dict()), path)
    from_file = load_model(str(path), torch_dtype="bfloat16", specs=[UMT5_SPEC])
    assert from_file.encoder.embed_tokens.weight is from_file.shared.weight
    assert from_file.shared.weight.dtype == torch.bfloat16
    assert sum(1 for _ in from_file.parameters()) == len(from_file.state_dict()) - 1  # one Parameter for both


def test_config_derived_from_shapes(ours, reference):
    for field in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "relative_attention_num_buckets"):
        assert getattr(ours.config, field) == getattr(reference.config, field), field


def test_config_json_contradicting_the_shapes_is_named(reference):
    """A umT5 config.json beside the file is read, but the shapes are the truth: a contradiction names the field."""
    state = reference.state_dict()  # the transformers layout, which the spec's config reads
    given = dict(reference.config.to_dict(), layer_norm_epsilon=1e-5)
    assert umt5_config_from_state(state, given).layer_norm_epsilon == 1e-5
    wrong = dict(given, num_layers=reference.config.num_layers + 1)
    with pytest.raises(ConfigError, match=rf"umT5 config.json says num_layers={wrong['num_layers']} but the weights"):
        umt5_config_from_state(state, wrong)


def test_full_size_original_file_gives_exactly_the_transformers_keys():
    """`models_t5_umt5-xxl-enc-bf16.pth` (242 tensors) -> UMT5EncoderModel keys and shapes (243, tied)."""
    model = load_model(meta_state("umt5_xxl_enc_orig.json"), specs=[UMT5_SPEC])
    expected = json.loads((KEYS / "umt5_xxl_hf_tf5.json").read_text())
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert got == expected
    c = model.config
    assert (c.vocab_size, c.d_model, c.d_kv, c.d_ff, c.num_layers, c.num_heads) == (256384, 4096, 64, 10240, 24, 64)
    assert (c.relative_attention_num_buckets, c.relative_attention_max_distance) == (32, 128)
    assert c.feed_forward_proj == "gated-gelu" and c.layer_norm_epsilon == 1e-6


@pytest.mark.parametrize("drop_tied", [False, True])
def test_full_size_transformers_layout_loads(drop_tied):
    state = meta_state("umt5_xxl_hf_tf5.json")
    if drop_tied:  # what hub files store: the tied copy is implied
        del state["encoder.embed_tokens.weight"]
    model = load_model(state, specs=[UMT5_SPEC])
    assert len(model.state_dict()) == 243


def test_unknown_key_is_named(reference, tiny_sizes):
    state = tiny_sizes.umt5_to_original(reference.state_dict())
    state["blocks.0.attn.extra.weight"] = torch.zeros(2)
    with pytest.raises(CheckpointError, match="blocks.0.attn.extra.weight"):
        load_model(state, specs=[UMT5_SPEC])


def test_unrelated_config_json_beside_the_file_is_ignored(tmp_path, reference, tiny_sizes):
    """Wan repos keep the DiT's config.json next to the .pth: it must not configure the text encoder."""
    torch.save(tiny_sizes.umt5_to_original(reference.state_dict()), tmp_path / "t5.pth")
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "WanModel", "model_type": "t2v", "dim": 1536}))
    model = load_model(str(tmp_path / "t5.pth"), specs=[UMT5_SPEC])
    assert model.config.d_model == reference.config.d_model


# ----------------------------------------------------------------------------------------- prompts
PROMPTS = ["a red circle on a blue background", "a cat", "一只小狗在草地上奔跑"]


def diffusers_style(encoder, tokenizer, prompts, max_length=512):
    """The reference behaviour: pad every prompt to max_length, encode with the mask, zero after the real length."""
    batch = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = encoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    lengths = batch.attention_mask.sum(dim=1)
    return torch.stack(
        [torch.cat([h[:n], h.new_zeros(max_length - n, h.shape[1])]) for h, n in zip(hidden, lengths, strict=True)]
    )


def test_prompts_are_real_tokens_then_zeros(ours, umt5_tokenizer, reference):
    embeds = encode_prompts(ours, umt5_tokenizer, PROMPTS)
    assert embeds.shape == (3, 512, ours.config.d_model) and embeds.dtype == torch.float32
    lengths = [len(umt5_tokenizer(p)["input_ids"]) for p in PROMPTS]
    for e, n in zip(embeds, lengths, strict=True):
        assert e[:n].abs().sum(dim=-1).min() > 0
        assert torch.count_nonzero(e[n:]) == 0
    torch.testing.assert_close(embeds, diffusers_style(reference, umt5_tokenizer, PROMPTS), atol=1e-5, rtol=1e-5)


def test_batch_equals_one_by_one(ours, umt5_tokenizer):
    batch = encode_prompts(ours, umt5_tokenizer, PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        torch.testing.assert_close(batch[i : i + 1], encode_prompts(ours, umt5_tokenizer, prompt), atol=1e-5, rtol=1e-5)


def test_long_prompts_are_truncated_with_the_end_token(ours, umt5_tokenizer):
    embeds = encode_prompts(ours, umt5_tokenizer, ["a red circle " * 40], max_length=16)
    assert embeds.shape == (1, 16, ours.config.d_model)
    ids, _ = tokenize(umt5_tokenizer, ["a red circle " * 40], max_length=16)
    assert ids.shape == (1, 16) and ids[0, -1].item() == umt5_tokenizer.eos_token_id


def test_prompt_cleaning_as_the_authors():
    assert clean_prompt("  a   cat\n\tsits &amp;amp; waits ") == "a cat sits & waits"


@pytest.mark.parametrize("text", ["it\u2019s a \u201ccat\u201d", "caf\u00c3\u00a9 latte", "\ufb01sh  &amp; chips"])
def test_prompt_cleaning_fixes_text_as_diffusers(text):
    """Curly quotes, mojibake and ligatures are made plain as the authors' (and diffusers') ftfy step does: umT5's
    tokenizer does not, so an LLM-written prompt would get other tokens than the model was trained with."""
    wan = pytest.importorskip("diffusers.pipelines.wan.pipeline_wan")
    assert clean_prompt(text) == wan.prompt_clean(text)
    assert "\u2019" not in clean_prompt(text) and "\u00c3" not in clean_prompt(text)


def test_bad_arguments():
    with pytest.raises(ValueError, match="at least one prompt"):
        encode_prompts(None, None, [])
    with pytest.raises(ValueError, match="max_length"):
        encode_prompts(None, None, ["a"], max_length=0)
