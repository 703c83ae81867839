"""LTX-2 text connectors: conformance suite, behaviour, full-size keys on meta, formats, loading, and parity with
diffusers' `LTX2TextConnectors(rope_type="split")` on the same weights (fp32, CPU), for LTX-2.0 and LTX-2.3
(per-modality projections, per-token RMS norm, gated attention).

`data/ltx2_full.json` lists every key of `ltx-2-19b-dev.safetensors`; `data/ltx2_connectors_diffusers.json`
the diffusers `connectors/` keys (both from `/work/shared/formats/keys/`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from diffsynth.ltx2.connectors import (
    LTX2ConnectorsConfig,
    LTX2TextConnectors,
    normalize_hidden_states,
    rms_normalize_hidden_states,
)
from diffsynth.ltx2.connectors_formats import (
    LTX2_CONNECTORS_SPEC,
    PREFIX,
    config_from_state,
    diffusers_to_ours,
    ours_to_diffusers,
    ours_to_original,
)
from diffsynth.ltx2.dit_formats import LTX2_DIT_SPEC
from diffsynth.runtime.errors import CheckpointError, ConfigError
from diffsynth.runtime.loading import load_model, recognise
from diffsynth.runtime.testing import conformance as cf
from diffsynth.runtime.testing.weights import random_weights

DATA = Path(__file__).parent / "data"
LAYOUTS = {layout.name: layout for layout in LTX2_CONNECTORS_SPEC.layouts}
CONNECTORS = ("video_embeddings_connector.", "audio_embeddings_connector.")
LENGTH = 16


# ------------------------------------------------------------------ tiny models and inputs
def tiny_config(**overrides) -> LTX2ConnectorsConfig:
    """The one place tiny connector sizes live (Appendix A's, with the two streams shaped differently)."""
    fields = dict(
        caption_channels=16,
        text_proj_in_factor=3,
        video_num_heads=2,
        video_head_dim=8,
        video_num_layers=1,
        video_num_registers=8,
        audio_num_heads=4,
        audio_head_dim=4,
        audio_num_layers=2,
        audio_num_registers=4,
    )
    return LTX2ConnectorsConfig(**{**fields, **overrides})


def tiny_config_23(**overrides) -> LTX2ConnectorsConfig:
    """A tiny LTX-2.3: streams wider (video 24) and narrower (audio 8) than the 16 caption channels."""
    fields = dict(
        video_num_heads=3,
        video_head_dim=8,
        video_num_layers=2,
        audio_num_heads=2,
        audio_head_dim=4,
        audio_num_layers=1,
        per_modality_projections=True,
        projection_bias=True,
        video_gated_attention=True,
        audio_gated_attention=True,
    )
    return tiny_config(**{**fields, **overrides})


# diffusers' full-size LTX-2.3 connectors config (its conversion script's `get_ltx2_connectors_config("2.3")`)
DIFFUSERS_23 = dict(
    caption_channels=3840,
    text_proj_in_factor=49,
    video_connector_num_attention_heads=32,
    video_connector_attention_head_dim=128,
    video_connector_num_layers=8,
    video_connector_num_learnable_registers=128,
    video_gated_attn=True,
    audio_connector_num_attention_heads=32,
    audio_connector_attention_head_dim=64,
    audio_connector_num_layers=8,
    audio_connector_num_learnable_registers=128,
    audio_gated_attn=True,
    connector_rope_base_seq_len=4096,
    rope_theta=10000.0,
    rope_double_precision=True,
    causal_temporal_positioning=False,
    rope_type="split",
    per_modality_projections=True,
    video_hidden_dim=4096,
    audio_hidden_dim=2048,
    proj_bias=True,
)


def diffusers_kwargs(config: LTX2ConnectorsConfig) -> dict:
    v2 = dict(
        per_modality_projections=True,
        proj_bias=config.projection_bias,
        video_gated_attn=config.video_gated_attention,
        audio_gated_attn=config.audio_gated_attention,
        video_hidden_dim=config.video_num_heads * config.video_head_dim,
        audio_hidden_dim=config.audio_num_heads * config.audio_head_dim,
    )
    return dict(
        **(v2 if config.per_modality_projections else {}),
        caption_channels=config.caption_channels,
        text_proj_in_factor=config.text_proj_in_factor,
        video_connector_num_attention_heads=config.video_num_heads,
        video_connector_attention_head_dim=config.video_head_dim,
        video_connector_num_layers=config.video_num_layers,
        video_connector_num_learnable_registers=config.video_num_registers,
        audio_connector_num_attention_heads=config.audio_num_heads,
        audio_connector_attention_head_dim=config.audio_head_dim,
        audio_connector_num_layers=config.audio_num_layers,
        audio_connector_num_learnable_registers=config.audio_num_registers,
        rope_type=config.rope_type,
    )


CONFIGS = {"2.0": tiny_config, "2.3": tiny_config_23}


def make_connectors(config: LTX2ConnectorsConfig | None = None, seed: int = 0) -> LTX2TextConnectors:
    return random_weights(LTX2TextConnectors(config or tiny_config()), seed, scale=0.2)


def connector_inputs(batch: int = 3, seed: int = 1, side: str = "left", config=None):
    """Packed hidden states `[B, L, C * K]` and a keep-mask: a full row, then 11 and 4 prompt tokens."""
    cfg = config or tiny_config()
    g = torch.Generator().manual_seed(seed)
    states = 3 * torch.randn(batch, LENGTH, cfg.caption_channels * cfg.text_proj_in_factor, generator=g)
    mask = torch.ones(batch, LENGTH, dtype=torch.long)
    for row, real in zip(range(1, batch), (11, 4), strict=False):
        if side == "left":
            mask[row, : LENGTH - real] = 0
        else:
            mask[row, real:] = 0
    return states, mask


def meta_state_from_keys(name: str) -> dict[str, torch.Tensor]:
    keys = json.loads((DATA / name).read_text())
    return {k: torch.empty(v, device="meta") for k, v in keys.items()}


def connector_keys_of_full_file() -> dict[str, torch.Tensor]:
    full = meta_state_from_keys("ltx2_full.json")
    return {
        k: v
        for k, v in full.items()
        if k.startswith("text_embedding_projection.") or k.startswith(tuple(PREFIX + c for c in CONNECTORS))
    }


# ------------------------------------------------------------------ config and conformance
def test_default_config_is_the_released_19b_connectors():
    full = connector_keys_of_full_file()
    assert len(full) == 59
    with torch.device("meta"):
        model = LTX2TextConnectors()
    ours = LAYOUTS["original"].to_ours(full)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {k: tuple(v.shape) for k, v in ours.items()}
    assert config_from_state(ours) == LTX2ConnectorsConfig()


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(video_num_heads=3), "video_num_heads x video_head_dim"),
        (dict(audio_num_registers=0), "audio_num_registers"),
        (dict(rope_type="spiral"), "rope_type"),
        (dict(video_num_layers=-1), "video_num_layers"),
        (dict(rope_theta=1.0), "rope_theta"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


def test_conformance_suite():
    states, mask = connector_inputs()
    shapes = [(3, LENGTH, 16), (3, LENGTH, 16), (3, LENGTH)]
    cf.check_forward(make_connectors, (states, mask), expected_shapes=shapes)
    cf.check_backward(make_connectors, (states, mask))  # every register is reached: rows 1, 2 are padded
    cf.check_gradient_checkpointing(make_connectors, (states, mask))
    cf.check_meta_load(make_connectors, (states, mask))
    cf.check_declared_units(make_connectors)
    config = cf.check_spec_config(LTX2_CONNECTORS_SPEC, make_connectors, config_json=diffusers_kwargs(tiny_config()))
    assert config == tiny_config()


@pytest.mark.parametrize("version", ["2.0", "2.3"])
def test_bfloat16_keeps_dtype_and_stays_close_to_float32(version):
    states, mask = connector_inputs()
    model = make_connectors(CONFIGS[version]())
    with torch.no_grad():
        full = model(states, mask)
        low = model.to(torch.bfloat16)(states.to(torch.bfloat16), mask)
    for a, b in zip(full[:2], low[:2], strict=True):
        assert b.dtype == torch.bfloat16
        assert ((b.float() - a).norm() / a.norm()).item() < 0.05


# ------------------------------------------------------------------ behaviour
@pytest.mark.parametrize("version", ["2.0", "2.3"])
def test_padding_side_does_not_matter_and_samples_are_independent(version):
    """The same prompts padded on the left or on the right give the same contexts (prompt tokens are moved
    to the front before the registers), and a batch equals each sample run alone."""
    model = make_connectors(CONFIGS[version]()).eval()
    states, left_mask = connector_inputs(side="left")
    _, right_mask = connector_inputs(side="right")
    right_states = states.clone()
    for row in range(3):
        real = int(left_mask[row].sum())
        right_states[row, :real] = states[row, LENGTH - real :]
        right_states[row, real:] = torch.randn(LENGTH - real, states.shape[-1])  # padding content is ignored
    with torch.no_grad():
        left = model(states, left_mask)
        right = model(right_states, right_mask)
        alone = [model(states[i : i + 1], left_mask[i : i + 1]) for i in range(3)]
    for a, b in zip(left, right, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for i in range(3):
        for a, b in zip(left, alone[i], strict=True):
            torch.testing.assert_close(a[i : i + 1], b, atol=1e-5, rtol=1e-5)
    assert left[2].dtype == torch.int64 and bool(left[2].all())


def test_normalisation_uses_only_prompt_tokens():
    states, mask = connector_inputs()
    packed = states.unflatten(2, (16, 3))
    normed = normalize_hidden_states(packed, mask).unflatten(2, (16, 3))
    row = packed[2, mask[2].bool()]  # [4, C, K]
    for k in range(3):
        values = row[..., k]
        want = 8 * (values - values.mean()) / (values.max() - values.min() + 1e-6)
        torch.testing.assert_close(normed[2, mask[2].bool(), :, k], want, atol=1e-5, rtol=1e-5)
    assert (normed[2, ~mask[2].bool()] == 0).all()


@pytest.mark.parametrize("version", ["2.0", "2.3"])
def test_bad_inputs_raise_clear_errors(version):
    model = make_connectors(CONFIGS[version]())
    states, mask = connector_inputs()
    with pytest.raises(ValueError, match=r"expected \[B, L, 48\]"):
        model(states[..., :40], mask)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(states, mask[:, :8])
    with pytest.raises(ValueError, match="multiple of the 8 learnable registers"):
        model(states[:, :12], mask[:, :12])


# ------------------------------------------------------------------ formats
def test_official_file_is_recognised_with_the_dit_owning_the_rest_of_its_prefix():
    full = meta_state_from_keys("ltx2_full.json")
    layout = LTX2_CONNECTORS_SPEC.match(full)
    assert layout is not None and layout.name == "original"
    ours_keys = {k for k in full if layout.owns(k)}
    assert ours_keys == set(connector_keys_of_full_file())
    dit_layout = LTX2_DIT_SPEC.match(full)
    dit_keys = {k for k in full if dit_layout.owns(k)}
    assert not ours_keys & dit_keys
    under_prefix = {k for k in full if k.startswith(PREFIX)}
    assert under_prefix <= ours_keys | dit_keys  # together they take the whole model.diffusion_model.* part


def test_diffusers_folder_converts_to_exactly_our_keys_and_shapes():
    theirs = meta_state_from_keys("ltx2_connectors_diffusers.json")
    assert LTX2_CONNECTORS_SPEC.match(theirs).name == "diffusers"
    ours = diffusers_to_ours(theirs)
    official = LAYOUTS["original"].to_ours(connector_keys_of_full_file())
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in official.items()}


@pytest.mark.parametrize(
    ("name", "from_ours"),
    [("original", ours_to_original), ("original_unprefixed", None), ("diffusers", ours_to_diffusers)],
)
def test_layouts_round_trip(name, from_ours):
    cf.check_layout_roundtrip(make_connectors, LAYOUTS[name], from_ours)


def test_unmapped_keys_are_errors_naming_them():
    state = ours_to_diffusers(make_connectors().state_dict())
    with pytest.raises(KeyError, match="caption_projection.linear_1.weight"):
        diffusers_to_ours({**state, "caption_projection.linear_1.weight": torch.zeros(2)})  # a DiT key
    original = ours_to_original(make_connectors().state_dict())
    rogue = PREFIX + "video_embeddings_connector.transformer_1d_blocks.0.attn1.gate.weight"
    with pytest.raises(CheckpointError, match="attn1.gate.weight"):
        load_model({**original, rogue: torch.zeros(2)}, specs=[LTX2_CONNECTORS_SPEC])


def test_config_json_that_contradicts_the_shapes_or_the_model_is_an_error(tmp_path):
    state = ours_to_diffusers(make_connectors().state_dict())
    folder = tmp_path / "connectors"
    folder.mkdir()
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
    for change, message in (
        (dict(video_connector_num_layers=3), "video_num_layers"),
        (dict(per_modality_projections=True), "per_modality_projections"),
        (dict(audio_connector_num_learnable_registers=None, video_connector_num_learnable_registers=0), "registers"),
    ):
        (folder / "config.json").write_text(json.dumps({**diffusers_kwargs(tiny_config()), **change}))
        with pytest.raises(ConfigError, match=message):
            load_model(folder, specs=[LTX2_CONNECTORS_SPEC])


@pytest.mark.parametrize("layout", ["original", "original_unprefixed", "diffusers"])
def test_runtime_loader_builds_the_same_model_from_a_file_in_each_layout(layout, tmp_path):
    reference = make_connectors().eval()
    state = reference.state_dict()
    written = {"original": ours_to_original, "diffusers": ours_to_diffusers}.get(layout, dict)(state)
    folder = tmp_path / layout
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in written.items()}, str(folder / "model.safetensors"))
    config = diffusers_kwargs(tiny_config())
    if layout == "diffusers":
        (folder / "config.json").write_text(json.dumps({"_class_name": "LTX2TextConnectors", **config}))
        loaded = load_model(folder, specs=[LTX2_CONNECTORS_SPEC])
    else:  # no config.json: the head split is given (the released 128-wide heads do not divide 16)
        loaded = load_model(folder / "model.safetensors", specs=[LTX2_CONNECTORS_SPEC], config=config)
    assert isinstance(loaded, LTX2TextConnectors) and loaded.config == tiny_config()
    states, mask = connector_inputs()
    with torch.no_grad():
        for a, b in zip(reference(states, mask), loaded(states, mask), strict=True):
            assert torch.equal(a, b)


def test_whole_file_keys_load_with_the_dit_and_meta_stays_on_meta():
    full = meta_state_from_keys("ltx2_full.json")
    wanted = {k: v for k, v in full.items() if k.startswith(PREFIX) or k.startswith("text_embedding_projection.")}
    found = {rec.spec.name: rec for rec in recognise(wanted, specs=[LTX2_DIT_SPEC, LTX2_CONNECTORS_SPEC])}
    assert set(found) == {"ltx2_dit", "ltx2_connectors"}
    models = load_model(dict(connector_keys_of_full_file()), specs=[LTX2_CONNECTORS_SPEC])
    assert isinstance(models, LTX2TextConnectors) and models.config == LTX2ConnectorsConfig()
    assert models.text_embedding_projection.aggregate_embed.weight.is_meta


# ------------------------------------------------------------------ parity with diffusers
@pytest.mark.parity
@pytest.mark.parametrize("side", ["left", "right"])
def test_parity_with_diffusers(side):
    pytest.importorskip("diffusers")
    from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors as DiffusersConnectors

    ours = make_connectors().eval()
    theirs = DiffusersConnectors(**diffusers_kwargs(tiny_config())).eval()
    theirs.load_state_dict(ours_to_diffusers(ours.state_dict()), strict=True)
    states, mask = connector_inputs(side=side)
    with torch.no_grad():
        got = ours(states, mask)
        want = theirs(states, mask, padding_side=side)
    for name, a, b in zip(("video", "audio", "mask"), got, want, strict=True):
        error = (a.float() - b.float()).abs().max().item()
        print(f"connectors parity ({side} padding) {name}: max abs diff {error:.3g}, scale {b.float().abs().max():.3g}")
        assert a.shape == b.shape and a.dtype == b.dtype and error <= 1e-5


@pytest.mark.parity
def test_parity_with_interleaved_rope_and_fp32_rope():
    pytest.importorskip("diffusers")
    from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors as DiffusersConnectors

    config = tiny_config(rope_type="interleaved", rope_double_precision=False, rope_max_pos=64)
    ours = make_connectors(config).eval()
    theirs = DiffusersConnectors(
        **diffusers_kwargs(config), rope_double_precision=False, connector_rope_base_seq_len=64
    ).eval()
    theirs.load_state_dict(ours_to_diffusers(ours.state_dict()), strict=True)
    states, mask = connector_inputs()
    with torch.no_grad():
        for a, b in zip(ours(states, mask), theirs(states, mask), strict=True):
            assert (a.float() - b.float()).abs().max().item() <= 1e-5


def test_vram_managed_connectors_equal_the_unmanaged_ones():
    from diffsynth.runtime.vram import enable_vram_management

    states, mask = connector_inputs()
    with torch.no_grad():
        reference = make_connectors().eval()(states, mask)
        model = make_connectors().eval().requires_grad_(False)
        handle = enable_vram_management(model, {"offload_device": "cpu", "onload_device": "cpu"}, vram_limit=0,
                                        device="cpu")  # fmt: skip
        assert handle.plan.resident == () and len(handle.units) == 3  # 1 video + 2 audio blocks
        assert all(torch.equal(a, b) for a, b in zip(model(states, mask), reference, strict=True))
        assert handle.report().bytes_moved > 0


# ------------------------------------------------------------------ LTX-2.3
LAYOUTS_23 = {name: LAYOUTS[f"{name}_2.3"] for name in ("original", "original_unprefixed", "diffusers")}


def test_ltx23_conformance_suite():
    states, mask = connector_inputs()
    shapes = [(3, LENGTH, 24), (3, LENGTH, 8), (3, LENGTH)]
    factory = lambda: make_connectors(tiny_config_23())  # noqa: E731
    cf.check_forward(factory, (states, mask), expected_shapes=shapes)
    cf.check_backward(factory, (states, mask))  # the gates and both projections' biases are reached
    cf.check_gradient_checkpointing(factory, (states, mask))
    cf.check_meta_load(factory, (states, mask))
    cf.check_declared_units(factory)
    config = cf.check_spec_config(LTX2_CONNECTORS_SPEC, factory, config_json=diffusers_kwargs(tiny_config_23()))
    assert config == tiny_config_23()


def test_ltx23_full_size_config_comes_from_the_shapes_alone():
    """The released 2.3's keys: the gates give the head split (32 x 128 video, 32 x 64 audio), the biases
    and the two projections the rest; 188160 input features are Gemma's 3840 x 49."""
    with torch.device("meta"):
        model = LTX2TextConnectors(LTX2ConnectorsConfig.ltx23())
    state = model.state_dict()
    assert tuple(state["text_embedding_projection.video_aggregate_embed.weight"].shape) == (4096, 3840 * 49)
    assert tuple(state["text_embedding_projection.audio_aggregate_embed.bias"].shape) == (2048,)
    assert tuple(state["audio_embeddings_connector.transformer_1d_blocks.7.attn1.to_gate_logits.weight"].shape) == (
        32,
        2048,
    )
    assert config_from_state(state) == LTX2ConnectorsConfig.ltx23()
    written = ours_to_original(state)
    layout = LTX2_CONNECTORS_SPEC.match(written)
    assert layout is not None and layout.name == "original_2.3"
    assert {k for k in written if not k.startswith(PREFIX)} == {
        f"text_embedding_projection.{side}_aggregate_embed.{p}"
        for side in ("video", "audio")
        for p in ("weight", "bias")
    }
    assert config_from_state(layout.to_ours(written)) == LTX2ConnectorsConfig.ltx23()


def test_ltx23_config_shapes_and_json_disagreeing_are_errors_naming_the_field():
    state = make_connectors(tiny_config_23()).state_dict()
    with torch.device("meta"):
        assert config_from_state(state, diffusers_kwargs(tiny_config_23())) == tiny_config_23()
        assert config_from_state(state, {"caption_channels": 16}) == tiny_config_23()  # the gates split the heads
        for change, message in (
            (dict(video_hidden_dim=32), "video_hidden_dim"),
            (dict(audio_connector_num_attention_heads=4), "audio_num_heads"),
            (dict(per_modality_projections=False), "per_modality_projections"),
            (dict(proj_bias=False), "projection_bias"),
            (dict(caption_channels=10, text_proj_in_factor=None), "caption_channels=10"),
        ):
            json_config = {k: v for k, v in {**diffusers_kwargs(tiny_config_23()), **change}.items() if v is not None}
            with pytest.raises(ConfigError, match=message):
                config_from_state(state, json_config)
        missing = {k: v for k, v in state.items() if not k.startswith("text_embedding_projection.audio")}
        with pytest.raises(ConfigError, match="audio_aggregate_embed.weight"):
            config_from_state(missing, diffusers_kwargs(tiny_config_23()))
        with pytest.raises(ConfigError, match="caption_channels=3840"):  # 48 features: not Gemma-3-12B's
            config_from_state(state)


def test_ltx23_rms_normalisation_is_per_token_and_zeroes_padding():
    states, mask = connector_inputs()
    packed = states.unflatten(2, (16, 3))
    normed = rms_normalize_hidden_states(packed, mask).unflatten(2, (16, 3))
    keep = mask.bool()
    rms = normed[keep].square().mean(dim=1).sqrt()  # [tokens, K]
    torch.testing.assert_close(rms, torch.ones_like(rms), atol=1e-4, rtol=0)
    torch.testing.assert_close(normed[keep], packed[keep] / packed[keep].square().mean(1, keepdim=True).sqrt())
    assert (normed[~keep] == 0).all()
    # the 2.0 path is untouched by the 2.3 one: its normalisation still sees whole samples
    assert not torch.allclose(normalize_hidden_states(packed, mask), normed.flatten(2))


@pytest.mark.parametrize(
    ("name", "from_ours"),
    [("original", ours_to_original), ("original_unprefixed", None), ("diffusers", ours_to_diffusers)],
)
def test_ltx23_layouts_round_trip_and_only_the_23_layout_matches(name, from_ours):
    factory = lambda: make_connectors(tiny_config_23())  # noqa: E731
    cf.check_layout_roundtrip(factory, LAYOUTS_23[name], from_ours)
    written = (from_ours or dict)(factory().state_dict())
    assert LTX2_CONNECTORS_SPEC.match(written).name == f"{name}_2.3"
    assert not LAYOUTS[name].matches(written)


def test_ltx23_diffusers_names():
    theirs = ours_to_diffusers(make_connectors(tiny_config_23()).state_dict())
    assert {"video_text_proj_in.weight", "video_text_proj_in.bias", "audio_text_proj_in.weight"} <= set(theirs)
    assert "video_connector.transformer_blocks.1.attn1.to_gate_logits.bias" in theirs
    assert "audio_connector.transformer_blocks.0.attn1.norm_q.weight" in theirs
    assert not any("aggregate_embed" in k or "embeddings_connector" in k for k in theirs)
    assert diffusers_to_ours(theirs).keys() == make_connectors(tiny_config_23()).state_dict().keys()


@pytest.mark.parametrize("layout", ["original", "original_unprefixed", "diffusers"])
def test_ltx23_runtime_loader_builds_the_same_model_from_a_file_in_each_layout(layout, tmp_path):
    reference = make_connectors(tiny_config_23()).eval()
    written = {"original": ours_to_original, "diffusers": ours_to_diffusers}.get(layout, dict)(reference.state_dict())
    folder = tmp_path / layout
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in written.items()}, str(folder / "model.safetensors"))
    if layout == "diffusers":
        config = {"_class_name": "LTX2TextConnectors", **diffusers_kwargs(tiny_config_23())}
        (folder / "config.json").write_text(json.dumps(config))
        loaded = load_model(folder, specs=[LTX2_CONNECTORS_SPEC])
    else:  # the gates give the heads; only the 16 x 3 split of the 48 input features is given
        loaded = load_model(folder / "model.safetensors", specs=[LTX2_CONNECTORS_SPEC], config={"caption_channels": 16})
    assert isinstance(loaded, LTX2TextConnectors) and loaded.config == tiny_config_23()
    states, mask = connector_inputs()
    with torch.no_grad():
        for a, b in zip(reference(states, mask), loaded(states, mask), strict=True):
            assert torch.equal(a, b)


def test_ltx23_config_rejects_bad_flags():
    with pytest.raises(ValueError, match="per_modality_projections"):
        tiny_config_23(per_modality_projections="yes")
    with pytest.raises(ValueError, match="video_num_heads x video_head_dim = 24"):
        tiny_config_23(per_modality_projections=False)  # one shared projection: widths must be 16


@pytest.mark.parity
@pytest.mark.parametrize("side", ["left", "right"])
def test_ltx23_parity_with_diffusers(side):
    pytest.importorskip("diffusers")
    from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors as DiffusersConnectors

    ours = make_connectors(tiny_config_23()).eval()
    theirs = DiffusersConnectors(**diffusers_kwargs(tiny_config_23())).eval()
    theirs.load_state_dict(ours_to_diffusers(ours.state_dict()), strict=True)
    states, mask = connector_inputs(batch=2, side=side)  # a full row and an 11-token prompt
    with torch.no_grad():
        got = ours(states, mask)
        want = theirs(states, mask, padding_side=side)
    for name, a, b in zip(("video", "audio", "mask"), got, want, strict=True):
        error = (a.float() - b.float()).abs().max().item()
        print(
            f"2.3 connectors parity ({side} padding) {name}: max abs diff {error:.3g}, scale {b.float().abs().max():.3g}"
        )
        assert a.shape == b.shape and a.dtype == b.dtype and error <= 1e-5


@pytest.mark.parity
def test_ltx23_full_size_keys_and_shapes_equal_diffusers():
    pytest.importorskip("diffusers")
    from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors as DiffusersConnectors

    with torch.device("meta"):
        theirs = DiffusersConnectors(**DIFFUSERS_23)
        ours = LTX2TextConnectors(LTX2ConnectorsConfig.ltx23())
    their_state = theirs.state_dict()
    assert LTX2_CONNECTORS_SPEC.match(their_state).name == "diffusers_2.3"
    converted = diffusers_to_ours(their_state)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {
        k: tuple(v.shape) for k, v in ours.state_dict().items()
    }
    assert {k: tuple(v.shape) for k, v in ours_to_diffusers(converted).items()} == {
        k: tuple(v.shape) for k, v in their_state.items()
    }
    assert config_from_state(converted, DIFFUSERS_23) == LTX2ConnectorsConfig.ltx23()
    assert config_from_state(converted) == LTX2ConnectorsConfig.ltx23()
