"""LTX-2 text encoder (Gemma-3-12B language model): loads of each hub layout, hidden-state parity with
transformers' `Gemma3ForConditionalGeneration`, prompt-embedding parity with diffusers' LTX-2 pipeline
(and through its connectors), and full-size key checks on the meta device.

`data/gemma3_12b_file_layout.json` / `_tf5_layout.json` are `/work/shared/formats/keys/` lists: every key
and shape of `google/gemma-3-12b-it-qat-q4_0-unquantized` as stored (transformers 4.x names) and as
transformers 5 names them.
"""

from __future__ import annotations

import json
from pathlib import Path

import diffsynth_ltx2_test_repo as repo_module  # loaded by conftest
import pytest
import torch
from safetensors.torch import save_file
from transformers import Gemma3Config, Gemma3ForConditionalGeneration

from diffsynth.ltx2.text_encoder import Gemma3TextEncoder, gemma_prompt_embeds, tokenize_prompts
from diffsynth.ltx2.text_encoder_formats import GEMMA3_12B_DEFAULTS, GEMMA3_TEXT_SPEC, gemma3_text_config
from diffsynth.runtime.errors import CheckpointError, ConfigError
from diffsynth.runtime.loading import load_model, recognise
from diffsynth.runtime.models.qwen3 import QWEN3_SPEC
from diffsynth.runtime.testing import conformance as cf
from diffsynth.runtime.testing.tokenizers import build_tiny_gemma_tokenizer
from diffsynth.runtime.testing.weights import random_weights

DATA = Path(__file__).parent / "data"
PROMPTS = ["  a photo of a cat sitting on a red chair ", "an astronaut riding a horse on the moon, high quality"]
LAYOUTS = {layout.name: layout for layout in GEMMA3_TEXT_SPEC.layouts}


# ----------------------------------------------------------------------------------------- tiny models
def tiny_gemma3_json(**text_overrides) -> dict:
    """The one place tiny Gemma 3 sizes live: 4 layers alternating sliding (window 4) and global, linear RoPE
    x8 on the global layers as in Gemma-3-12B, and a SigLIP tower that is there only to be dropped."""
    text = dict(
        model_type="gemma3_text",
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        query_pre_attn_scalar=8,
        sliding_window=4,
        sliding_window_pattern=2,
        rope_scaling={"factor": 8.0, "rope_type": "linear"},
        max_position_embeddings=1024,
    )
    text.update(text_overrides)
    vision = dict(
        model_type="siglip_vision_model",
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    return dict(model_type="gemma3", mm_tokens_per_image=4, text_config=text, vision_config=vision)


def tiny_text_config():
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(**{k: v for k, v in tiny_gemma3_json()["text_config"].items() if k != "model_type"})


def gemma3_reference(config_json: dict, seed: int = 0) -> Gemma3ForConditionalGeneration:
    model = Gemma3ForConditionalGeneration(Gemma3Config(**config_json))
    return random_weights(model, seed, scale=0.2, is_norm=lambda name, p: "norm" in name).eval()


_TO_HUB = (
    ("model.language_model.", "language_model.model."),
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)


def hub_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers 5 state dict in the hub file's (transformers 4.x) names; the tied lm_head is not stored."""
    out = {}
    for key, value in state.items():
        for new, old in _TO_HUB:
            if key.startswith(new):
                out[old + key[len(new) :]] = value.clone()
    return out


def write_folder(folder: Path, state: dict[str, torch.Tensor], config_json: dict | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "model.safetensors"))
    if config_json is not None:
        (folder / "config.json").write_text(json.dumps(config_json))
    return folder / "model.safetensors"


def padded_batch(vocab: int = 300, length: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and mask: one full row, one with 8 prompt tokens, one with 3 (shorter than a window)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, length), generator=generator)
    mask = torch.ones(3, length, dtype=torch.long)
    mask[1, : length - 8] = 0
    mask[2, : length - 3] = 0
    return ids, mask


def meta_state(name: str) -> dict[str, torch.Tensor]:
    keys = json.loads((DATA / name).read_text())
    return {k: torch.empty(v, device="meta") for k, v in keys.items()}


@pytest.fixture(scope="module")
def reference():
    return gemma3_reference(tiny_gemma3_json())


@pytest.fixture(scope="module")
def hub_file(reference, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gemma") / "text_encoder"
    return write_folder(folder, hub_names(reference.state_dict()), tiny_gemma3_json())


@pytest.fixture(scope="module")
def encoder(hub_file):
    return load_model(hub_file, specs=[GEMMA3_TEXT_SPEC])


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tiny_gemma_tokenizer(tmp_path_factory.mktemp("gemma_tok"))


# ----------------------------------------------------------------------------------------- loads and parity
@pytest.mark.parity
@pytest.mark.parametrize("layout", ["hub", "transformers5"])
def test_hidden_states_match_transformers(reference, hub_file, layout):
    if layout == "hub":
        ours = load_model(hub_file, specs=[GEMMA3_TEXT_SPEC])
    else:
        state = {k: v.clone() for k, v in reference.state_dict().items()}
        assert GEMMA3_TEXT_SPEC.match(state).name == "transformers5"
        ours = load_model(state, specs=[GEMMA3_TEXT_SPEC], config=tiny_gemma3_json())
    assert isinstance(ours, Gemma3TextEncoder)
    assert ours.config.layer_types == ["sliding_attention", "full_attention"] * 2
    ids, mask = padded_batch()
    with torch.no_grad():
        want = reference(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        got = ours.hidden_states_at(ids, mask)
    assert len(got) == len(want) == 5  # embeddings + 4 layers (the last one final-normed)
    worst = max((a - b).abs().max().item() for a, b in zip(want, got, strict=True))
    print(f"Gemma3 hidden states ({layout}): max abs diff {worst:.3g}")
    assert worst <= 1e-5


def test_hub_file_keys_are_all_taken_and_the_vision_tower_dropped(hub_file):
    from diffsynth.runtime.checkpoint import open_checkpoint

    state = open_checkpoint(hub_file)
    (rec,) = recognise(state.meta_state_dict(), specs=[GEMMA3_TEXT_SPEC, QWEN3_SPEC])
    assert rec.spec is GEMMA3_TEXT_SPEC and rec.layout.name == "hub" and len(rec.keys) == len(state)
    ours = rec.layout.to_ours(state.meta_state_dict())
    assert not any("vision" in k or "multi_modal" in k for k in ours)
    assert QWEN3_SPEC.match(state.meta_state_dict()) is None


def test_sliding_window_and_local_rope_matter(reference):
    """The invariant the parity test leans on: with prompts longer than the window, the sliding layers and
    their own RoPE table change the result (so a model attending globally everywhere would fail it)."""
    ids, mask = padded_batch()
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    base = load_model(state, specs=[GEMMA3_TEXT_SPEC], config=tiny_gemma3_json())
    wide = load_model(state, specs=[GEMMA3_TEXT_SPEC], config=tiny_gemma3_json(sliding_window=64))
    same_rope = load_model(state, specs=[GEMMA3_TEXT_SPEC], config=tiny_gemma3_json(rope_local_base_freq=1e6))
    with torch.no_grad():
        a, b, c = (m.hidden_states_at(ids, mask, indices=[1]) for m in (base, wide, same_rope))
    assert (a[0] - b[0]).abs().max() > 1e-3
    assert (a[0] - c[0]).abs().max() > 1e-3


def test_embeddings_are_scaled_by_sqrt_hidden(encoder):
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        (embedded,) = encoder.hidden_states_at(ids, indices=[0])
    torch.testing.assert_close(embedded, encoder.embed_tokens.weight[ids] * 32**0.5)


def test_hidden_states_at_picks_and_stops_early(encoder):
    ids, mask = padded_batch()
    calls = []
    hooks = [layer.register_forward_hook(lambda *a, i=i: calls.append(i)) for i, layer in enumerate(encoder.layers)]
    try:
        with torch.no_grad():
            everything = encoder.hidden_states_at(ids, mask)
            calls.clear()
            picked = encoder.hidden_states_at(ids, mask, indices=[2, 0, -4])
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == [0, 1]
    for got, index in zip(picked, (2, 0, 1), strict=True):
        assert torch.equal(got, everything[index])
    with pytest.raises(IndexError, match="out of range"):
        encoder.hidden_states_at(ids, mask, indices=[5])


def test_meta_build_materialises_buffers_and_rotary_stays_float32(encoder):
    assert not [n for n, b in encoder.named_buffers() if b.is_meta]
    assert encoder.embed_tokens.embed_scale.item() == pytest.approx(32**0.5)
    low = Gemma3TextEncoder(encoder.config)
    low.load_state_dict(encoder.state_dict())
    low = low.to(torch.bfloat16)
    for name, buffer in low.rotary_emb.named_buffers():
        assert buffer.dtype == torch.float32, name
    ids, mask = padded_batch()
    with torch.no_grad():
        full = encoder.hidden_states_at(ids, mask, indices=[-1])[0]
        half = low.hidden_states_at(ids, mask, indices=[-1])[0]
    keep = mask.bool()
    error = ((half.float() - full)[keep].norm() / full[keep].norm()).item()
    assert error < 0.05


def test_vram_managed_encoder_equals_the_unmanaged_one(encoder):
    from diffsynth.runtime.vram import enable_vram_management

    ids, mask = padded_batch()
    model = Gemma3TextEncoder(encoder.config).eval().requires_grad_(False)
    model.load_state_dict(encoder.state_dict())
    with torch.no_grad():
        reference = encoder.hidden_states_at(ids, mask)
        handle = enable_vram_management(model, {"offload_device": "cpu", "onload_device": "cpu"}, vram_limit=0,
                                        device="cpu")  # fmt: skip
        assert handle.plan.resident == () and len(handle.units) == 4
        assert all(torch.equal(a, b) for a, b in zip(model.hidden_states_at(ids, mask), reference, strict=True))
        assert handle.report().bytes_moved > 0


def test_sliding_only_model_casts_keeping_float32_rotary_tables():
    config = gemma3_text_config(
        {k: v for k, v in Gemma3TextEncoder(tiny_text_config()).state_dict().items()}, None
    )  # released pattern: 4 layers are all sliding, so there is no global table
    model = Gemma3TextEncoder(config).to(torch.bfloat16)
    assert {b.dtype for b in model.rotary_emb.buffers()} == {torch.float32}
    assert not hasattr(model.rotary_emb, "full_attention_inv_freq")


def test_conformance(encoder):
    config = encoder.config
    ids, mask = padded_batch()

    def factory():
        return random_weights(Gemma3TextEncoder(config), 0, scale=0.2, is_norm=lambda n, p: "norm" in n)

    cf.check_declared_units(factory)
    cf.check_meta_load(factory, (ids, mask))
    derived = cf.check_spec_config(GEMMA3_TEXT_SPEC, factory, config_json=tiny_gemma3_json())
    assert derived.sliding_window == 4 and derived.layer_types == config.layer_types


# ----------------------------------------------------------------------------------------- config and errors
def test_released_values_fill_what_shapes_cannot_tell(reference):
    state = LAYOUTS["transformers5"].to_ours({k: v.to("meta") for k, v in reference.state_dict().items()})
    config = gemma3_text_config(state, None)
    assert (config.hidden_size, config.num_hidden_layers, config.head_dim) == (32, 4, 8)
    assert (config.num_attention_heads, config.num_key_value_heads, config.intermediate_size) == (4, 2, 64)
    assert config.sliding_window == GEMMA3_12B_DEFAULTS["sliding_window"] == 1024
    assert config.rope_parameters["full_attention"] == {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}
    assert config.rope_parameters["sliding_attention"]["rope_theta"] == 1e4
    assert config.layer_types == ["sliding_attention"] * 4  # pattern 6: layer 6 would be the first global one


def test_config_json_contradicting_the_shapes_or_of_another_model_is_an_error(reference, tmp_path):
    state = hub_names(reference.state_dict())
    wrong = tiny_gemma3_json(num_hidden_layers=6)
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        load_model(write_folder(tmp_path / "a", state, wrong), specs=[GEMMA3_TEXT_SPEC])
    with pytest.raises(ConfigError, match="'mistral3'"):
        load_model(write_folder(tmp_path / "b", state, {"model_type": "mistral3"}), specs=[GEMMA3_TEXT_SPEC])


def test_foreign_keys_are_errors_naming_them(reference):
    state = hub_names(reference.state_dict())
    state["language_model.model.layers.0.self_attn.rogue.weight"] = torch.zeros(2)
    with pytest.raises(CheckpointError, match="rogue"):
        load_model(state, specs=[GEMMA3_TEXT_SPEC], config=tiny_gemma3_json())
    del state["language_model.model.layers.0.self_attn.rogue.weight"]
    state["language_model.extra.weight"] = torch.zeros(2)
    with pytest.raises(CheckpointError, match="language_model.extra.weight"):
        load_model(state, specs=[GEMMA3_TEXT_SPEC], config=tiny_gemma3_json())


# ----------------------------------------------------------------------------------------- full size on meta
@pytest.mark.parametrize(
    ("name", "layout", "dropped"),
    [("gemma3_12b_file_layout.json", "hub", 439), ("gemma3_12b_tf5_layout.json", "transformers5", 440)],
)
def test_released_encoder_has_exactly_the_language_model_keys_of_the_official_file(name, layout, dropped):
    full = meta_state(name)
    matched = GEMMA3_TEXT_SPEC.match(full)
    assert matched is not None and matched.name == layout
    assert all(matched.owns(k) for k in full)
    ours = matched.to_ours(full)
    assert len(full) - len(ours) == dropped  # vision tower + projector (+ lm_head in the transformers 5 list)
    config = gemma3_text_config(ours, None)
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (3840, 48, 262208)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (16, 8, 256)
    assert config.intermediate_size == 15360 and config.query_pre_attn_scalar == 256
    assert config.layer_types.count("full_attention") == 8 and config.layer_types[5] == "full_attention"
    with torch.device("meta"):
        model = GEMMA3_TEXT_SPEC.build(config)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.items()} == want


def test_meta_state_dict_source_loads_on_meta():
    model = load_model(meta_state("gemma3_12b_file_layout.json"), specs=[GEMMA3_TEXT_SPEC])
    assert isinstance(model, Gemma3TextEncoder) and model.embed_tokens.weight.is_meta
    assert len(model.layers) == 48


# ----------------------------------------------------------------------------------------- prompts
def test_tokenizer_adds_bos_pads_left_and_truncates(tokenizer):
    ids, mask = tokenize_prompts(tokenizer, PROMPTS, 16)
    assert ids.shape == mask.shape == (2, 16)
    for row in range(2):
        first = int((mask[row] == 0).sum())
        assert mask[row, :first].sum() == 0 and mask[row, first:].all()  # padding on the left only
        assert ids[row, first] == tokenizer.bos_token_id == 2
        assert (ids[row, :first] == tokenizer.pad_token_id).all()
    short_ids, short_mask = tokenize_prompts(tokenizer, "a zebra quietly walks past two yaks", 4)
    assert short_ids.shape == (1, 4) and short_ids[0, 0] == 2 and short_mask.all()  # BOS kept, tail cut
    with pytest.raises(ValueError, match="max_sequence_length"):
        tokenize_prompts(tokenizer, PROMPTS, 0)
    with pytest.raises(ValueError, match="at least one prompt"):
        tokenize_prompts(tokenizer, [], 16)


@pytest.mark.parity
def test_prompt_embeds_match_diffusers(reference, encoder, tokenizer):
    pytest.importorskip("diffusers")
    want, want_mask = repo_module.diffusers_prompt_embeds(reference, tokenizer, PROMPTS, 16)
    got, got_mask = gemma_prompt_embeds(encoder, tokenizer, PROMPTS, 16)
    plain, _ = gemma_prompt_embeds(reference, tokenizer, PROMPTS, 16)  # a transformers model works too
    assert got.shape == want.shape == (2, 16, 32 * 5)
    assert torch.equal(got_mask, want_mask) and 0 < int(got_mask[0].sum()) < 16
    error = (got - want).abs().max().item()
    print(f"gemma_prompt_embeds vs diffusers: max abs diff {error:.3g}")
    assert error <= 1e-5
    torch.testing.assert_close(plain, want, atol=1e-6, rtol=0)
    half, _ = gemma_prompt_embeds(encoder, tokenizer, PROMPTS, 16, dtype=torch.float16)
    assert half.dtype == torch.float16


@pytest.mark.parity
def test_prompt_through_connectors_matches_diffusers(reference, encoder, tokenizer):
    """Tokenizer -> Gemma -> connectors, ours against diffusers' pipeline path on the same weights."""
    pytest.importorskip("diffusers")
    from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors as DiffusersConnectors

    from diffsynth.ltx2.connectors import LTX2ConnectorsConfig, LTX2TextConnectors
    from diffsynth.ltx2.connectors_formats import ours_to_diffusers

    config = LTX2ConnectorsConfig(
        caption_channels=32,
        text_proj_in_factor=5,
        video_num_heads=4,
        video_head_dim=8,
        video_num_layers=1,
        video_num_registers=8,
        audio_num_heads=2,
        audio_head_dim=16,
        audio_num_layers=1,
        audio_num_registers=4,
    )
    ours = random_weights(LTX2TextConnectors(config), 3, scale=0.2).eval()
    theirs = DiffusersConnectors(
        caption_channels=32,
        text_proj_in_factor=5,
        video_connector_num_attention_heads=4,
        video_connector_attention_head_dim=8,
        video_connector_num_layers=1,
        video_connector_num_learnable_registers=8,
        audio_connector_num_attention_heads=2,
        audio_connector_attention_head_dim=16,
        audio_connector_num_layers=1,
        audio_connector_num_learnable_registers=4,
        rope_type="split",
    ).eval()
    theirs.load_state_dict(ours_to_diffusers(ours.state_dict()), strict=True)
    with torch.no_grad():
        embeds, mask = repo_module.diffusers_prompt_embeds(reference, tokenizer, PROMPTS, 16)
        want = theirs(embeds, mask, padding_side="left")
        got = ours(*gemma_prompt_embeds(encoder, tokenizer, PROMPTS, 16))
    for name, a, b in zip(("video", "audio", "mask"), got, want, strict=True):
        error = (a.float() - b.float()).abs().max().item()
        print(f"prompt -> connectors {name}: max abs diff {error:.3g}")
        assert a.shape == b.shape and error <= 1e-5
