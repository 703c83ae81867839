"""LTX-2.5 text encoder (the Gemma 4 language model of a `Gemma4UnifiedForConditionalGeneration`): loads of the
diffusers `text_encoder/` folder, of the model's state dict and of the language model's keys alone, hidden-state
parity with transformers' whole model, prompt-embedding parity with diffusers' LTX-2 pipeline, and errors.

The tiny model has what sets Gemma 4 apart from Gemma 3: wider global layers with their own key/value heads and
keys reused as values (`attention_k_eq_v`), the last two layers reusing earlier keys/values with a double-wide
MLP, a stored `layer_scalar` per layer, and the vision / audio embedders that the spec drops.
"""

from __future__ import annotations

import json
from pathlib import Path

import diffsynth_ltx2_test_repo as repo_module  # loaded by conftest
import pytest
import torch
from safetensors.torch import save_file
from transformers import Gemma4UnifiedForConditionalGeneration

from diffsynth.ltx2.gemma4_text_encoder import Gemma4TextEncoder
from diffsynth.ltx2.text_encoder import gemma_prompt_embeds
from diffsynth.ltx2.text_encoder_formats import GEMMA3_TEXT_SPEC, GEMMA4_TEXT_SPEC, gemma4_text_config
from diffsynth.runtime.checkpoint import open_checkpoint
from diffsynth.runtime.errors import CheckpointError, ConfigError
from diffsynth.runtime.loading import load_model, recognise
from diffsynth.runtime.models.qwen3 import QWEN3_SPEC
from diffsynth.runtime.testing import conformance as cf
from diffsynth.runtime.testing.tokenizers import build_tiny_gemma_tokenizer
from diffsynth.runtime.testing.weights import random_weights

PROMPTS = ["  a photo of a cat sitting on a red chair ", "an astronaut riding a horse on the moon, high quality"]
TOWERS = ("vision_embedder", "embed_vision", "embed_audio", "lm_head")


# ----------------------------------------------------------------------------------------- tiny models
tiny_gemma4_json, gemma4_reference = repo_module.tiny_gemma4_json, repo_module.gemma4_reference


def saved_json(reference: Gemma4UnifiedForConditionalGeneration) -> dict:
    """The config.json `save_pretrained` writes (global head widths become `per_layer_config`)."""
    return json.loads(reference.config.to_json_string())


def padded_batch(vocab: int = 300, length: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and mask: one full row, one with 8 prompt tokens, one with 3 (shorter than a window)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, length), generator=generator)
    mask = torch.ones(3, length, dtype=torch.long)
    mask[1, : length - 8] = 0
    mask[2, : length - 3] = 0
    return ids, mask


def write_folder(folder: Path, state: dict[str, torch.Tensor], config_json: dict | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    if config_json is not None:
        (folder / "config.json").write_text(json.dumps(config_json))
    return folder / "model.safetensors"


def language_model_state(reference) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in reference.model.language_model.state_dict().items()}


@pytest.fixture(scope="module")
def reference():
    return gemma4_reference(tiny_gemma4_json())


@pytest.fixture(scope="module")
def folder(reference, tmp_path_factory) -> Path:
    """The diffusers `text_encoder/` folder: what `save_pretrained` writes (tower keys renamed, no lm_head)."""
    folder = tmp_path_factory.mktemp("gemma4") / "text_encoder"
    reference.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def encoder(folder):
    return load_model(folder / "model.safetensors", specs=[GEMMA4_TEXT_SPEC])


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tiny_gemma_tokenizer(tmp_path_factory.mktemp("gemma4_tok"))


def max_diff(want, got) -> float:
    assert len(want) == len(got)
    return max((a - b).abs().max().item() for a, b in zip(want, got, strict=True))


# ----------------------------------------------------------------------------------------- loads and parity
@pytest.mark.parametrize("source", ["folder", "state_dict", "text_model"])
def test_hidden_states_match_transformers(reference, folder, source):
    if source == "folder":
        ours = load_model(folder / "model.safetensors", specs=[GEMMA4_TEXT_SPEC])
    elif source == "state_dict":  # Gemma4UnifiedForConditionalGeneration.state_dict() names, with lm_head
        state = {k: v.clone() for k, v in reference.state_dict().items()}
        assert GEMMA4_TEXT_SPEC.match(state).name == "transformers"
        ours = load_model(state, specs=[GEMMA4_TEXT_SPEC], config=saved_json(reference))
    else:
        state = language_model_state(reference)
        assert GEMMA4_TEXT_SPEC.match(state).name == "text_model"
        ours = load_model(state, specs=[GEMMA4_TEXT_SPEC], config=saved_json(reference)["text_config"])
    assert isinstance(ours, Gemma4TextEncoder)
    assert ours.config.kv_sharing_modes == [None, None, "store", "store", "reuse", "reuse"]
    ids, mask = padded_batch()
    with torch.no_grad():
        want = reference(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        got = ours.hidden_states_at(ids, mask)
    assert len(got) == 7  # embeddings + 6 layers (the last one final-normed)
    worst = max_diff(want, got)
    print(f"Gemma4 hidden states ({source}): max abs diff {worst:.3g}")
    assert worst <= 1e-5


def test_hidden_states_match_without_bidirectional_vision_masks(tmp_path):
    """The masks follow the config's `use_bidirectional_attention` as the multimodal model's do."""
    reference = gemma4_reference(tiny_gemma4_json(use_bidirectional_attention=None), seed=1)
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    ours = load_model(state, specs=[GEMMA4_TEXT_SPEC], config=saved_json(reference))
    ids, mask = padded_batch(seed=1)
    with torch.no_grad():
        want = reference(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        worst = max_diff(want, ours.hidden_states_at(ids, mask))
    print(f"Gemma4 hidden states (no bidirectional vision): max abs diff {worst:.3g}")
    assert worst <= 1e-5


def test_folder_keys_are_all_taken_and_the_embedders_dropped(folder, reference):
    state = open_checkpoint(folder / "model.safetensors").meta_state_dict()
    assert any(k.startswith("model.vision_embedder.") for k in state)  # save_pretrained's names for the towers
    (rec,) = recognise(state, specs=[GEMMA3_TEXT_SPEC, GEMMA4_TEXT_SPEC, QWEN3_SPEC])
    assert rec.spec is GEMMA4_TEXT_SPEC and rec.layout.name == "transformers" and len(rec.keys) == len(state)
    ours = rec.layout.to_ours(state)
    assert not any(tower in k for k in ours for tower in TOWERS)
    assert set(ours) == set(reference.model.language_model.state_dict())
    assert GEMMA3_TEXT_SPEC.match(state) is None


def test_gemma3_files_are_not_taken_by_the_gemma4_spec():
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    text = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8)  # fmt: skip
    vision = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)  # fmt: skip
    with torch.device("meta"):
        gemma3 = Gemma3ForConditionalGeneration(Gemma3Config(text_config=text, vision_config=vision))
    state = gemma3.state_dict()
    assert GEMMA4_TEXT_SPEC.match(state) is None
    assert GEMMA4_TEXT_SPEC.match(gemma3.model.language_model.state_dict()) is None
    (rec,) = recognise(state, specs=[GEMMA3_TEXT_SPEC, GEMMA4_TEXT_SPEC])
    assert rec.spec is GEMMA3_TEXT_SPEC


def test_gemma4_features_change_the_result(reference):
    """The invariants the parity test leans on: the sliding window and the stored layer scalars change the
    hidden states, and the reusing layers have no key/value weights of their own (so they read shared ones)."""
    config = saved_json(reference)
    wide_json = saved_json(reference)
    wide_json["text_config"]["sliding_window"] = 64
    base, wide, unscaled = (
        load_model(language_model_state(reference), specs=[GEMMA4_TEXT_SPEC], config=c["text_config"])
        for c in (config, wide_json, config)
    )  # each its own copy of the weights (loads assign the given tensors)
    for layer in unscaled.layers:
        layer.layer_scalar.fill_(1.0)
    ids, mask = padded_batch()
    with torch.no_grad():
        a, b, c = (m.hidden_states_at(ids, mask, indices=[1]) for m in (base, wide, unscaled))
    assert (a[0] - b[0]).abs().max() > 1e-3
    assert (a[0] - c[0]).abs().max() > 1e-3
    assert not hasattr(base.layers[4].self_attn, "k_proj") and base.layers[1].self_attn.v_proj is None
    assert base.layers[5].mlp.gate_proj.out_features == 128  # double-wide MLP on the reusing layers


def test_hidden_states_at_picks_and_stops_early(encoder):
    ids, mask = padded_batch()
    calls = []
    hooks = [layer.register_forward_hook(lambda *a, i=i: calls.append(i)) for i, layer in enumerate(encoder.layers)]
    try:
        with torch.no_grad():
            everything = encoder.hidden_states_at(ids, mask)
            calls.clear()
            picked = encoder.hidden_states_at(ids, mask, indices=[5, 0, -3])
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == [0, 1, 2, 3, 4]  # layer 4 reuses layer 2's keys/values, computed on the way
    for got, index in zip(picked, (5, 0, 4), strict=True):
        assert torch.equal(got, everything[index])
    with pytest.raises(IndexError, match="out of range"):
        encoder.hidden_states_at(ids, mask, indices=[7])


def test_loaded_buffers_are_real_and_the_layer_scalars_come_from_the_file(encoder, reference):
    assert not [n for n, b in encoder.named_buffers() if b.is_meta]
    assert encoder.embed_tokens.embed_scale.item() == pytest.approx(32**0.5)
    assert [layer.layer_scalar.item() for layer in encoder.layers] == [0.5 + 0.25 * i for i in range(6)]
    low = Gemma4TextEncoder(encoder.config)
    low.load_state_dict(encoder.state_dict())
    low = low.to(torch.bfloat16)
    assert {b.dtype for b in low.rotary_emb.buffers()} == {torch.float32}
    ids, mask = padded_batch()
    with torch.no_grad():
        full = encoder.hidden_states_at(ids, mask, indices=[-1])[0]
        half = low.hidden_states_at(ids, mask, indices=[-1])[0]
    keep = mask.bool()
    # bf16 weights and activations through 6 layers: a few percent; the CPU's bf16 kernels (native AVX512-BF16 or
    # emulated) move it a little (0.053 on an AVX512-BF16 machine, under 0.05 on earlier ones): the bound leaves room
    assert ((half.float() - full)[keep].norm() / full[keep].norm()).item() < 0.1


def test_vram_managed_encoder_equals_the_unmanaged_one(encoder):
    """Offloaded layer by layer, the reusing layers still read the keys/values the earlier layers left."""
    from diffsynth.runtime.vram import enable_vram_management

    ids, mask = padded_batch()
    model = Gemma4TextEncoder(encoder.config).eval().requires_grad_(False)
    model.load_state_dict(encoder.state_dict())
    with torch.no_grad():
        reference = encoder.hidden_states_at(ids, mask)
        handle = enable_vram_management(model, {"offload_device": "cpu", "onload_device": "cpu"}, vram_limit=0,
                                        device="cpu")  # fmt: skip
        assert handle.plan.resident == () and len(handle.units) == 6
        assert all(torch.equal(a, b) for a, b in zip(model.hidden_states_at(ids, mask), reference, strict=True))
        assert handle.report().bytes_moved > 0


def test_conformance(encoder, reference):
    config = encoder.config
    ids, mask = padded_batch()

    def factory():
        return random_weights(Gemma4TextEncoder(config), 0, scale=0.2, is_norm=lambda n, p: "norm" in n)

    cf.check_declared_units(factory)
    cf.check_meta_load(factory, (ids, mask))
    derived = cf.check_spec_config(GEMMA4_TEXT_SPEC, factory, config_json=saved_json(reference))
    assert derived.layer_types == config.layer_types and derived.num_kv_shared_layers == 2


# ----------------------------------------------------------------------------------------- config and errors
def test_config_is_the_text_config_of_the_folder(encoder, reference):
    config = encoder.config
    assert type(config).__name__ == "Gemma4UnifiedTextConfig"
    assert (config.hidden_size, config.num_hidden_layers, config.sliding_window) == (32, 6, 4)
    assert [config.per_layer_config[i].head_dim for i in range(6)] == [8, 16] * 3
    assert config.rope_parameters == reference.config.text_config.rope_parameters


def test_missing_or_foreign_config_is_an_error_naming_it(reference, tmp_path):
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    with pytest.raises(ConfigError, match="config.json"):
        load_model(write_folder(tmp_path / "a", state, None), specs=[GEMMA4_TEXT_SPEC])
    with pytest.raises(ConfigError, match="'gemma3'"):
        load_model(state, specs=[GEMMA4_TEXT_SPEC], config={"model_type": "gemma3", "text_config": {}})


def test_config_contradicting_the_shapes_is_an_error_naming_the_field(reference):
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    wrong = saved_json(reference)
    wrong["text_config"]["num_hidden_layers"] = 8
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        load_model(state, specs=[GEMMA4_TEXT_SPEC], config=wrong)
    narrow = saved_json(reference)
    narrow["text_config"]["per_layer_config"] = {}  # global layers as wide as the sliding ones
    with pytest.raises(ConfigError, match=r"layer 1 .*head_dim=8.*layers\.1\.self_attn\.q_norm\.weight"):
        gemma4_text_config(GEMMA4_TEXT_SPEC.layouts[0].to_ours(state), narrow)


def test_foreign_keys_are_errors_naming_them(reference):
    config = saved_json(reference)
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    state["model.language_model.layers.0.self_attn.rogue.weight"] = torch.zeros(2)
    with pytest.raises(CheckpointError, match="rogue"):
        load_model(state, specs=[GEMMA4_TEXT_SPEC], config=config)
    del state["model.language_model.layers.0.self_attn.rogue.weight"]
    state["model.language_model.embed_tokens_per_layer.weight"] = torch.zeros(2)  # dense Gemma 4's, not ours
    with pytest.raises(CheckpointError, match="embed_tokens_per_layer"):
        load_model(state, specs=[GEMMA4_TEXT_SPEC], config=config)


# ----------------------------------------------------------------------------------------- prompts
@pytest.mark.parity
def test_prompt_embeds_match_diffusers(reference, encoder, tokenizer):
    pytest.importorskip("diffusers")
    want, want_mask = repo_module.diffusers_prompt_embeds(reference, tokenizer, PROMPTS, 16)
    got, got_mask = gemma_prompt_embeds(encoder, tokenizer, PROMPTS, 16)
    plain, _ = gemma_prompt_embeds(reference, tokenizer, PROMPTS, 16)  # the whole transformers model works too
    assert got.shape == want.shape == (2, 16, 32 * 7)
    assert torch.equal(got_mask, want_mask) and 0 < int(got_mask[0].sum()) < 16
    error = (got - want).abs().max().item()
    print(f"gemma_prompt_embeds (Gemma 4) vs diffusers: max abs diff {error:.3g}")
    assert error <= 1e-5
    torch.testing.assert_close(plain, want, atol=1e-6, rtol=0)
