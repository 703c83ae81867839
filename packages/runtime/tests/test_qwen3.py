"""Qwen3 text encoder: hub-layout load through the spec, parity with transformers, full-size key check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen3Config, Qwen3ForCausalLM

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.models.qwen3 import QWEN3_SPEC, Qwen3TextEncoder, config_from_state
from diffsynth.runtime.testing import conformance as cf
from diffsynth.runtime.testing.weights import random_weights

KEYS = Path(__file__).parent / "data" / "keys"

# `text_encoder/config.json` of Tongyi-MAI/Z-Image-Turbo (= Qwen/Qwen3-4B's config.json)
QWEN3_4B_CONFIG_JSON = {
    "architectures": ["Qwen3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 2560,
    "initializer_range": 0.02,
    "intermediate_size": 9728,
    "max_position_embeddings": 40960,
    "max_window_layers": 36,
    "model_type": "qwen3",
    "num_attention_heads": 32,
    "num_hidden_layers": 36,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": None,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}

# What the weights' shapes determine (the rest comes from config.json or Qwen3-4B's values).
SHAPE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "attention_bias",
)


def tiny_config_json(**overrides) -> dict:
    """The only place tiny Qwen3 sizes live (hub-style config.json)."""
    config = dict(
        QWEN3_4B_CONFIG_JSON,
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_window_layers=2,
        max_position_embeddings=256,
        bos_token_id=None,
        eos_token_id=None,
        torch_dtype="float32",
    )
    config.update(overrides)
    return config


def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Seeded random weights everywhere, norms around 1 (all-ones norms would hide a swapped norm)."""
    return random_weights(module, seed, scale=0.2, is_norm=lambda name, p: "norm" in name)


def reference(config_json: dict, seed: int = 0) -> Qwen3ForCausalLM:
    return randomize(Qwen3ForCausalLM(Qwen3Config(**config_json)), seed).eval()


def meta(state) -> dict[str, torch.Tensor]:
    return {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in state.items()}


def load_through_spec(state: dict[str, torch.Tensor], config_json: dict | None) -> Qwen3TextEncoder:
    """What the loader does: match on shapes, convert, derive the config, build on meta, load strictly."""
    layout = QWEN3_SPEC.match(state.keys())
    assert layout is not None
    config = QWEN3_SPEC.config_from_state(layout.to_ours(meta(state)), config_json)
    with torch.device("meta"):
        model = QWEN3_SPEC.build(config)
    model.load_state_dict(layout.to_ours(state), strict=True, assign=True)
    return model.eval()


@pytest.fixture
def hub_folder(tmp_path) -> Path:
    """A tiny `text_encoder/` folder as on the hub: `model.*` keys, no lm_head (tied), config.json."""
    config_json = tiny_config_json()
    model = reference(config_json)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config_json))
    return tmp_path


def batch(vocab: int = 300, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, 11), generator=generator)
    mask = torch.ones(3, 11, dtype=torch.bool)
    mask[1, 7:] = False
    mask[2, 4:] = False
    return ids, mask


@pytest.mark.parity
@pytest.mark.parametrize("with_config_json", [True, False])
def test_hub_file_matches_transformers(hub_folder, with_config_json):
    state = load_file(str(hub_folder / "model.safetensors"))
    config_json = json.loads((hub_folder / "config.json").read_text())
    assert QWEN3_SPEC.match(state.keys()).name == "hub"
    ours = load_through_spec(state, config_json if with_config_json else None)
    ref = Qwen3ForCausalLM(Qwen3Config(**config_json)).eval()
    ref.model.load_state_dict({k[len("model.") :]: v for k, v in state.items()}, strict=True)

    ids, mask = batch()
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        got_full = ours(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        got_partial = ours.hidden_states_at(ids, mask, indices=range(len(expected)))
    assert len(got_full) == len(expected) == 3
    for e, f, p in zip(expected, got_full, got_partial, strict=True):
        keep = mask[..., None].expand_as(e)  # padded positions are garbage in both
        assert (f - e)[keep].abs().max() <= 1e-5
        assert (p - e)[keep].abs().max() <= 1e-5


def test_meta_build_materialises_rotary_buffers(hub_folder):
    state = load_file(str(hub_folder / "model.safetensors"))
    model = load_through_spec(state, None)
    eager = Qwen3TextEncoder(model.config)
    for name, buffer in eager.named_buffers():
        loaded = model.get_buffer(name)
        assert loaded.device.type == "cpu", name
        assert torch.equal(loaded, buffer), name
    assert not any(p.is_meta for p in model.parameters())


def test_reset_rotary_is_explicit_and_idempotent():
    config = config_from_state({}, tiny_config_json())
    with torch.device("meta"):
        model = Qwen3TextEncoder(config)
    model.reset_rotary()  # weights still on meta: nothing to materialise against
    assert model.rotary_emb.inv_freq.is_meta
    model.reset_rotary("cpu")
    assert torch.equal(model.rotary_emb.inv_freq, Qwen3TextEncoder(config).rotary_emb.inv_freq)


def test_rotary_frequencies_stay_float32_under_dtype_casts():
    config = config_from_state({}, tiny_config_json())
    exact = Qwen3TextEncoder(config).rotary_emb.inv_freq
    model = Qwen3TextEncoder(config).to(torch.bfloat16)
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    for name, buffer in model.rotary_emb.named_buffers():
        assert buffer.dtype == torch.float32 and torch.equal(buffer, exact), name


def test_hidden_states_at_stops_early():
    config = config_from_state({}, tiny_config_json(num_hidden_layers=3))
    model = randomize(Qwen3TextEncoder(config), 1).eval()
    calls = []
    for i, layer in enumerate(model.layers):
        layer.register_forward_hook(lambda *_, i=i: calls.append(i))
    norm_calls = []
    model.norm.register_forward_hook(lambda *_: norm_calls.append(1))
    ids, mask = batch()
    with torch.no_grad():
        (second_last,) = model.hidden_states_at(ids, mask, indices=(-2,))
        assert calls == [0, 1] and not norm_calls
        full = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    assert torch.allclose(second_last, full[-2], atol=1e-6, rtol=0)
    with pytest.raises(IndexError, match="hidden state index 4 out of range for 3 layers"):
        model.hidden_states_at(ids, mask, indices=(4,))


def tiny_encoder() -> Qwen3TextEncoder:
    torch.manual_seed(0)  # same weights on every call (the conformance checks build twice)
    return randomize(Qwen3TextEncoder(config_from_state({}, tiny_config_json())), 0)


def test_conformance():
    ids, mask = batch()
    cf.check_forward(tiny_encoder, (ids,), {"attention_mask": mask}, expected_shapes=[(3, 11, 32)])
    cf.check_backward(tiny_encoder, (ids,), {"attention_mask": mask})
    cf.check_meta_load(tiny_encoder, (ids,), {"attention_mask": mask})
    with torch.device("meta"):
        cf.check_declared_units(tiny_encoder())
    hub, bare = QWEN3_SPEC.layouts
    cf.check_layout_roundtrip(tiny_encoder, hub, lambda state: {"model." + k: v for k, v in state.items()})
    cf.check_layout_roundtrip(tiny_encoder, bare)
    cf.check_spec_config(QWEN3_SPEC, tiny_encoder)


def test_config_from_shapes_equals_real_config_on_what_shapes_tell():
    for config_json in (tiny_config_json(), tiny_config_json(num_key_value_heads=4, attention_bias=True)):
        real = Qwen3Config(**config_json)
        with torch.device("meta"):
            state = Qwen3TextEncoder(real).state_dict()
        derived = config_from_state(state, None)
        for field in SHAPE_FIELDS:
            assert getattr(derived, field) == getattr(real, field), field
        assert derived.rope_parameters["rope_theta"] == 1e6 and derived.rms_norm_eps == 1e-6


def test_config_json_is_checked_against_shapes(hub_folder):
    state = QWEN3_SPEC.layouts[0].to_ours(meta(load_file(str(hub_folder / "model.safetensors"))))
    with pytest.raises(ConfigError, match=r"num_hidden_layers=3 but the weights have 2"):
        config_from_state(state, tiny_config_json(num_hidden_layers=3))
    with pytest.raises(ConfigError, match="no config.json"):
        config_from_state({}, None)


def test_layouts_drop_lm_head_and_reject_foreign_keys():
    config_json = tiny_config_json(tie_word_embeddings=False)
    state = reference(config_json).state_dict()
    assert "lm_head.weight" in state
    layout = QWEN3_SPEC.match(state.keys())
    ours = layout.to_ours(state)
    assert "lm_head.weight" not in ours and "embed_tokens.weight" in ours
    bare = QWEN3_SPEC.match(ours.keys())
    assert bare.name == "bare" and bare.to_ours(ours).keys() == ours.keys()
    # A Gemma-style extra norm matches the signature but has no Qwen3 parameter to go to.
    gemma_like = dict(state, **{"model.layers.0.pre_feedforward_layernorm.weight": torch.ones(32)})
    with pytest.raises(KeyError, match="pre_feedforward_layernorm"):
        layout.to_ours(gemma_like)


def test_qwen2_style_checkpoint_is_not_claimed():
    """Qwen2/Qwen2.5 LLM files share every name except q_norm/k_norm (and carry q/k/v biases)."""
    state = _full_size_state()
    qwen2 = {k: v for k, v in state.items() if ".q_norm." not in k and ".k_norm." not in k}
    qwen2.update(
        {k.replace(".weight", ".bias"): v[:, 0] for k, v in state.items() if "_proj." in k and ".mlp." not in k}
    )
    assert QWEN3_SPEC.match(qwen2.keys()) is None
    assert 0 < QWEN3_SPEC.closeness(qwen2.keys()) < 1


def _full_size_state() -> dict[str, torch.Tensor]:
    shapes = json.loads((KEYS / "qwen3_4B_no_lmhead.json").read_text())
    return {k: torch.empty(shape, dtype=torch.bfloat16, device="meta") for k, shape in shapes.items()}


@pytest.mark.parametrize("with_config_json", [False, True])
def test_full_size_qwen3_4b_on_meta(with_config_json):
    state = _full_size_state()
    assert len(state) == 398
    layout = QWEN3_SPEC.match(state.keys())
    assert layout.name == "hub"
    ours = layout.to_ours(state)
    config = config_from_state(ours, QWEN3_4B_CONFIG_JSON if with_config_json else None)
    expected = Qwen3Config(**QWEN3_4B_CONFIG_JSON)
    for field in SHAPE_FIELDS + ("rms_norm_eps", "max_position_embeddings", "tie_word_embeddings", "hidden_act"):
        assert getattr(config, field) == getattr(expected, field), field
    assert config.rope_parameters["rope_theta"] == expected.rope_parameters["rope_theta"]
    with torch.device("meta"):
        model = QWEN3_SPEC.build(config)
    want = {k: tuple(v.shape) for k, v in ours.items()}
    have = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert have == want


def test_tiny_qwen_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    from diffsynth.runtime.testing.tokenizers import QWEN_SPECIAL_TOKENS, build_tiny_qwen_tokenizer

    built = build_tiny_qwen_tokenizer(tmp_path, texts=["a red circle on a blue background"] * 4, vocab_size=290)
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path))  # offline, from the folder alone
    assert type(tokenizer).__name__ == type(built).__name__ == "Qwen2Tokenizer"
    assert len(tokenizer) <= 290
    assert tokenizer.convert_tokens_to_ids(list(QWEN_SPECIAL_TOKENS)) == list(range(len(tokenizer) - 5, len(tokenizer)))
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.bos_token is None and tokenizer.padding_side == "right"
    text = "a red circle, ünïcode 42"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text  # byte-level: no unknowns, no BOS/EOS added

    user = [{"role": "user", "content": "a cat"}]

    def render(messages, **kwargs):
        return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)

    prompt = "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n"
    assert render(user, add_generation_prompt=True) == prompt
    assert render(user, add_generation_prompt=True, enable_thinking=True) == prompt
    assert render(user, add_generation_prompt=True, enable_thinking=False) == prompt + "<think>\n\n</think>\n\n"
    # Qwen3 wraps the final assistant turn in a (here empty) think block and strips old reasoning.
    chat = [{"role": "system", "content": "be brief"}, *user, {"role": "assistant", "content": "<think>hm</think>ok"}]
    assert render(chat) == (
        "<|im_start|>system\nbe brief<|im_end|>\n" + prompt + "<think>\nhm\n</think>\n\nok<|im_end|>\n"
    )
    two_turns = [*user, {"role": "assistant", "content": "<think>hm</think>ok"}, {"role": "user", "content": "more"}]
    assert render(two_turns) == prompt + "ok<|im_end|>\n<|im_start|>user\nmore<|im_end|>\n"
