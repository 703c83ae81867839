"""CLIP-L and T5-XXL encoders: full-size keys on meta, hub-layout loads vs transformers, prompt encoding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from diffsynth.flux.flux1.encoder_formats import CLIP_TEXT_SPEC, T5_ENCODER_SPEC
from diffsynth.flux.flux1.text_encoder import (
    FluxCLIPTextEncoder,
    FluxPromptEmbeds,
    FluxT5Encoder,
    clip_pooled,
    encode_prompts,
    t5_states,
)
from diffsynth.runtime.errors import CheckpointError
from diffsynth.runtime.loading import load_model
from diffsynth.runtime.testing import conformance as cf
from diffsynth.runtime.testing.weights import random_weights

KEYS = Path(__file__).parent / "data" / "keys"
PROMPTS = ["a red circle on a blue background", "a cat"]


def meta_state(name: str, prefix: str = "") -> dict[str, torch.Tensor]:
    shapes = json.loads((KEYS / name).read_text())
    return {prefix + k: torch.empty(v, dtype=torch.bfloat16, device="meta") for k, v in shapes.items()}


def shapes_of(model: torch.nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------------------- full size
@pytest.mark.parametrize(
    ("name", "prefix"),
    [("clip_l_text.json", "text_model."), ("clip_l_text.json", ""), ("clip_l_text_with_posids.json", "")],
    ids=["hub-file", "transformers5", "with-position-ids"],
)
def test_full_size_clip_l_gives_exactly_the_reference_keys(name, prefix):
    """`text_encoder/model.safetensors` (196 tensors, `text_model.*`) and the tf5 names -> CLIPTextModel keys."""
    model = load_model(meta_state(name, prefix), specs=[CLIP_TEXT_SPEC])
    assert isinstance(model, FluxCLIPTextEncoder)
    assert shapes_of(model) == json.loads((KEYS / "clip_l_text.json").read_text())
    c = model.config
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads) == (49408, 768, 12, 12)
    assert (c.intermediate_size, c.max_position_embeddings, c.hidden_act) == (3072, 77, "quick_gelu")


@pytest.mark.parametrize("name", ["t5xxl_enc_noembed.json", "t5xxl_enc.json"])
def test_full_size_t5_xxl_gives_exactly_the_reference_keys(name):
    """`text_encoder_2/` shards (219 tensors, `shared.weight` only) -> T5EncoderModel keys (220, tied)."""
    model = load_model(meta_state(name), specs=[T5_ENCODER_SPEC])
    assert isinstance(model, FluxT5Encoder)
    assert shapes_of(model) == json.loads((KEYS / "t5xxl_enc.json").read_text())
    c = model.config
    assert (c.vocab_size, c.d_model, c.d_ff, c.num_layers, c.num_heads, c.d_kv) == (32128, 4096, 10240, 24, 64, 64)
    assert c.is_gated_act and c.dense_act_fn == "gelu_new" and c.relative_attention_num_buckets == 32


def test_only_the_encoder_embedding_is_enough():
    state = meta_state("t5xxl_enc.json")
    del state["shared.weight"]
    assert len(load_model(state, specs=[T5_ENCODER_SPEC]).state_dict()) == 220


# ----------------------------------------------------------------------------------------- tiny, real values
@pytest.fixture(scope="module")
def tiny_clip(tiny_configs):
    config = CLIPTextConfig(
        **dict(tiny_configs["clip"], vocab_size=99, bos_token_id=97, eos_token_id=98, pad_token_id=98)
    )
    return random_weights(CLIPTextModel(config), 3, scale=0.2).eval()


@pytest.fixture(scope="module")
def tiny_t5(tiny_configs):
    return random_weights(T5EncoderModel(T5Config(**dict(tiny_configs["t5"], vocab_size=90))), 4, scale=0.2).eval()


def test_clip_from_a_hub_file_matches_transformers(tiny_clip, tmp_path):
    """The transformers 4.x names with the stored position_ids, loaded in bf16 and fp32."""
    state = {"text_model." + k: v.contiguous() for k, v in tiny_clip.state_dict().items()}
    state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file(state, str(tmp_path / "model.safetensors"))
    tiny_clip.config.to_json_file(str(tmp_path / "config.json"))  # the head count is not in the shapes
    ours = load_model(str(tmp_path / "model.safetensors"), specs=[CLIP_TEXT_SPEC]).eval()
    assert ours.embeddings.position_ids.device.type == "cpu"
    ids = torch.randint(0, 97, (2, 77), generator=torch.Generator().manual_seed(0))
    ids[:, 9:] = 98  # end token, then padding with it (as FLUX's CLIP tokenizer pads)
    with torch.no_grad():
        want = tiny_clip(input_ids=ids)
        got = ours(input_ids=ids)
    torch.testing.assert_close(got.pooler_output, want.pooler_output, atol=0, rtol=0)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, atol=0, rtol=0)
    half = load_model(str(tmp_path / "model.safetensors"), torch_dtype="bfloat16", specs=[CLIP_TEXT_SPEC])
    assert half.embeddings.token_embedding.weight.dtype == torch.bfloat16


def test_t5_from_hub_shards_matches_transformers_and_is_tied(tiny_t5, tmp_path):
    state = {k: v.contiguous() for k, v in tiny_t5.state_dict().items() if k != "encoder.embed_tokens.weight"}
    keys = sorted(state)
    save_file({k: state[k] for k in keys[:10]}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({k: state[k] for k in keys[10:]}, str(tmp_path / "model-00002-of-00002.safetensors"))
    ours = load_model(str(tmp_path), specs=[T5_ENCODER_SPEC]).eval()
    assert ours.encoder.embed_tokens.weight is ours.shared.weight
    assert sum(1 for _ in ours.parameters()) == len(ours.state_dict()) - 1  # one Parameter for both
    ids = torch.randint(0, 90, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(
            ours(input_ids=ids).last_hidden_state, tiny_t5(input_ids=ids).last_hidden_state, atol=1e-6, rtol=1e-6
        )


def test_config_json_beside_the_file_is_used_and_checked(tiny_clip, tiny_configs, tmp_path):
    clip_config = tiny_configs["clip"]
    state = {"text_model." + k: v.contiguous() for k, v in tiny_clip.state_dict().items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(dict(clip_config, vocab_size=99, num_attention_heads=2)))
    assert load_model(str(tmp_path / "model.safetensors"), specs=[CLIP_TEXT_SPEC]).config.num_attention_heads == 2
    (tmp_path / "config.json").write_text(json.dumps(dict(clip_config, vocab_size=1000)))
    with pytest.raises(Exception, match="vocab_size"):
        load_model(str(tmp_path / "model.safetensors"), specs=[CLIP_TEXT_SPEC])


def test_unknown_key_is_named(tiny_t5):
    state = dict(tiny_t5.state_dict())
    state["encoder.block.0.layer.0.SelfAttention.extra.weight"] = torch.zeros(2)
    with pytest.raises(CheckpointError, match="SelfAttention.extra.weight"):
        load_model(state, specs=[T5_ENCODER_SPEC])


def test_declared_units_exist(tiny_clip, tiny_t5):
    clip = load_model(dict(tiny_clip.state_dict()), specs=[CLIP_TEXT_SPEC])
    t5 = load_model(dict(tiny_t5.state_dict()), specs=[T5_ENCODER_SPEC])
    cf.check_declared_units(clip)
    cf.check_declared_units(t5)


# ----------------------------------------------------------------------------------------- prompts
def test_prompt_encoding_pads_and_pools(tiny_repo, tiny_pipe):
    pipe = tiny_pipe
    embeds = encode_prompts(pipe.text_encoder_1, pipe.tokenizer_1, pipe.text_encoder_2, pipe.tokenizer_2, PROMPTS, 40)
    assert isinstance(embeds, FluxPromptEmbeds)
    assert embeds.t5.shape == (2, 40, 32) and embeds.pooled.shape == (2, 32)
    one = t5_states(pipe.text_encoder_2, pipe.tokenizer_2, PROMPTS[1:], 40)
    torch.testing.assert_close(embeds.t5[1:], one, atol=1e-5, rtol=1e-5)
    pooled = clip_pooled(pipe.text_encoder_1, pipe.tokenizer_1, PROMPTS[:1])
    torch.testing.assert_close(embeds.pooled[:1], pooled, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="t5_sequence_length"):
        t5_states(pipe.text_encoder_2, pipe.tokenizer_2, PROMPTS, 0)


@pytest.mark.parametrize(
    ("name", "prefix", "spec"),
    [
        ("t5xxl_enc_noembed.json", "", "t5_encoder"),
        ("clip_l_text.json", "text_model.", "clip_text_encoder"),
        ("clip_l_text_with_posids.json", "", "clip_text_encoder"),
    ],
)
def test_installed_specs_recognise_the_hub_files(name, prefix, spec):
    """Among every installed family's specs, the hub encoder files are ours (and only ours)."""
    from diffsynth.runtime.loading import recognise

    found = recognise(meta_state(name, prefix))
    assert [r.spec.name for r in found] == [spec]
