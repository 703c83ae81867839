"""Wan DiT checkpoint formats: full-size keys on meta, config derivation, layouts and conversion."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.testing import conformance as cf
from diffsynth.wan.dit import WanDiT, WanDiTConfig
from diffsynth.wan.formats import (
    DIFFUSERS_TO_OURS,
    DIT_SPEC,
    FAMILY,
    PREFIX,
    config_from_state,
    diffusers_to_ours,
    ours_to_diffusers,
)

KEYS = Path(__file__).parent / "data" / "keys"
LAYOUTS = {layout.name: layout for layout in DIT_SPEC.layouts}

# The released DiTs, keyed by their key/shape list, with the config each must derive to.
RELEASED = {
    "wan21_t2v_1_3b_orig": WanDiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "wan21_t2v_14b_orig": WanDiTConfig(),
    "wan21_i2v_14b_orig": WanDiTConfig(in_dim=36, model_type="i2v", has_image_input=True),
    "wan22_ti2v_5b_orig": WanDiTConfig(
        dim=3072, ffn_dim=14336, num_heads=24, num_layers=30, in_dim=48, out_dim=48, model_type="ti2v"
    ),
    "wan22_t2v_a14b_orig": WanDiTConfig(),
    "wan22_i2v_a14b_orig": WanDiTConfig(in_dim=36, model_type="i2v"),
}
# config.json of the hub repos: Wan 2.1 writes the short form, Wan 2.2 every WanModel argument.
HUB_CONFIG_JSON = {
    "wan21_t2v_1_3b_orig": {
        "_class_name": "WanModel",
        "_diffusers_version": "0.30.0",
        "dim": 1536,
        "eps": 1e-06,
        "ffn_dim": 8960,
        "freq_dim": 256,
        "in_dim": 16,
        "model_type": "t2v",
        "num_heads": 12,
        "num_layers": 30,
        "out_dim": 16,
        "text_len": 512,
    },
    "wan22_i2v_a14b_orig": {
        "_class_name": "WanModel",
        "_diffusers_version": "0.33.0",
        "cross_attn_norm": True,
        "dim": 5120,
        "eps": 1e-06,
        "ffn_dim": 13824,
        "freq_dim": 256,
        "in_dim": 36,
        "model_type": "i2v",
        "num_heads": 40,
        "num_layers": 40,
        "out_dim": 16,
        "patch_size": [1, 2, 2],
        "qk_norm": True,
        "text_dim": 4096,
        "text_len": 512,
        "window_size": [-1, -1],
    },
}
# diffusers' transformer/config.json of Wan-AI/Wan2.1-I2V-14B-480P-Diffusers.
DIFFUSERS_I2V_JSON = {
    "_class_name": "WanTransformer3DModel",
    "added_kv_proj_dim": 5120,
    "attention_head_dim": 128,
    "cross_attn_norm": True,
    "eps": 1e-06,
    "ffn_dim": 13824,
    "freq_dim": 256,
    "image_dim": 1280,
    "in_channels": 36,
    "num_attention_heads": 40,
    "num_layers": 40,
    "out_channels": 16,
    "patch_size": [1, 2, 2],
    "qk_norm": "rms_norm_across_heads",
    "rope_max_seq_len": 1024,
    "text_dim": 4096,
}


def _test_dit():
    """`tiny_config` and friends live only in test_dit.py; load that module by path."""
    spec = importlib.util.spec_from_file_location("wan_test_dit", Path(__file__).with_name("test_dit.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


T = _test_dit()


def listed(name: str) -> dict[str, list[int]]:
    return json.loads((KEYS / f"{name}.json").read_text())


def meta_state(name: str) -> dict[str, torch.Tensor]:
    return {k: torch.empty(shape, device="meta") for k, shape in listed(name).items()}


# ------------------------------------------------------------------ full size, meta device
@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_files_derive_a_model_with_exactly_their_keys(name):
    state = meta_state(name)
    assert DIT_SPEC.match(state).name == "original"
    config = config_from_state(state, None)
    assert config == RELEASED[name]
    with torch.device("meta"):
        model = DIT_SPEC.build(config)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    official = listed(name)
    assert sorted(ours.keys() - official.keys()) == [] and sorted(official.keys() - ours.keys()) == []
    assert ours == official
    assert list(ours) == list(official)  # same order as the authors' state_dict too


@pytest.mark.parametrize("name", sorted(HUB_CONFIG_JSON))
def test_hub_config_json_agrees_with_the_shapes(name):
    assert config_from_state(meta_state(name), HUB_CONFIG_JSON[name]) == RELEASED[name]


def test_config_json_alone():
    assert config_from_state({}, HUB_CONFIG_JSON["wan21_t2v_1_3b_orig"]) == RELEASED["wan21_t2v_1_3b_orig"]
    # an i2v json alone means Wan 2.1 I2V (CLIP input) unless it says otherwise
    i2v = {**HUB_CONFIG_JSON["wan22_i2v_a14b_orig"]}
    assert config_from_state({}, i2v) == RELEASED["wan21_i2v_14b_orig"]
    assert config_from_state({}, {**i2v, "has_image_input": False}) == RELEASED["wan22_i2v_a14b_orig"]


def test_diffusers_config_json():
    state = diffusers_to_ours(meta_state("wan21_i2v_14b_diffusers"))
    assert config_from_state(state, DIFFUSERS_I2V_JSON) == RELEASED["wan21_i2v_14b_orig"]
    assert config_from_state({}, DIFFUSERS_I2V_JSON) == RELEASED["wan21_i2v_14b_orig"]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"num_layers": 30}, "num_layers"),
        ({"in_dim": 16}, "in_dim"),
        ({"window_size": [256, 256]}, "window_size"),
        ({"qk_norm": False}, "qk_norm"),
        ({"model_type": "flf2v"}, "FLF2V"),  # FLF2V needs CLIP input, which this checkpoint lacks
    ],
)
def test_config_json_that_contradicts_the_shapes_or_is_unsupported(changes, message):
    json_ = {**HUB_CONFIG_JSON["wan22_i2v_a14b_orig"], **changes}
    with pytest.raises(ConfigError, match=message):
        config_from_state(meta_state("wan22_i2v_a14b_orig"), json_)


@pytest.mark.parametrize(("prefix", "name"), [(PREFIX, "original_prefixed"), ("model.", "original_model_prefixed")])
def test_prefixed_layouts_are_recognised_at_full_size(prefix, name):
    """ComfyUI's `model.diffusion_model.` and krea-realtime-video's `model.` (Wan2.1-T2V-14B's keys under it)."""
    state = meta_state("wan21_t2v_14b_orig" if prefix == "model." else "wan21_i2v_14b_orig")
    prefixed = {prefix + k: v for k, v in state.items()}
    layout = DIT_SPEC.match(prefixed)
    assert layout.name == name
    assert layout.to_ours(prefixed).keys() == state.keys()


@pytest.mark.parametrize(
    ("diffusers", "original"),
    [
        ("wan21_t2v_1_3b_diffusers", "wan21_t2v_1_3b_orig"),
        ("wan21_i2v_14b_diffusers", "wan21_i2v_14b_orig"),
        ("wan22_ti2v_5b_diffusers", "wan22_ti2v_5b_orig"),
    ],
)
def test_diffusers_names_convert_to_the_original_file_at_full_size(diffusers, original):
    state = meta_state(diffusers)
    layout = DIT_SPEC.match(state)
    assert layout.name == "diffusers"
    converted = {k: list(v.shape) for k, v in layout.to_ours(state).items()}
    assert converted == listed(original)
    back = ours_to_diffusers(meta_state(original))
    assert {k: list(v.shape) for k, v in back.items()} == listed(diffusers)


# ------------------------------------------------------------------ tiny: conversions round trip
@pytest.mark.parametrize("name", ["original", "original_prefixed", "original_model_prefixed"])
def test_original_layouts_round_trip(name):
    cf.check_layout_roundtrip(lambda: T.make_model("i2v"), LAYOUTS[name])


@pytest.mark.parametrize("kind", ["t2v", "i2v"])
def test_diffusers_layout_restores_our_state_exactly(kind):
    cf.check_layout_roundtrip(lambda: T.make_model(kind), LAYOUTS["diffusers"], from_ours=ours_to_diffusers)


def test_diffusers_conversion_rejects_unknown_keys_and_ignores_the_unused_norm():
    theirs = ours_to_diffusers(T.make_model("i2v").state_dict())
    extra = {**theirs, "blocks.1.attn2.norm_added_q.weight": torch.ones(32)}
    assert diffusers_to_ours(extra).keys() == diffusers_to_ours(theirs).keys()
    with pytest.raises(KeyError, match="blocks.0.attn1.rogue.weight"):
        diffusers_to_ours({**theirs, "blocks.0.attn1.rogue.weight": torch.zeros(1)})
    assert all(k.count("{}") <= 1 for k in DIFFUSERS_TO_OURS)


def test_original_layout_owns_only_dit_keys():
    layout = LAYOUTS["original"]
    assert layout.owns("blocks.3.self_attn.q.weight") and layout.owns("img_emb.proj.0.weight")
    assert not layout.owns("encoder.conv1.weight") and not layout.owns("vae.decoder.conv1.weight")


@pytest.mark.parametrize("kind", ["t2v", "i2v", "i2v_noclip"])
def test_spec_config_from_tiny_shapes_rebuilds_the_same_model(kind):
    """Tiny widths are not multiples of 128: the head count comes from the json."""
    config = cf.check_spec_config(DIT_SPEC, lambda: T.make_model(kind), {"num_heads": 2})
    assert config == T.tiny_config(kind)


def test_tiny_shapes_without_a_head_count_say_so():
    with torch.device("meta"):
        state = WanDiT(T.tiny_config()).state_dict()
    with pytest.raises(ConfigError, match="num_heads"):
        config_from_state(state, None)


def test_family_declares_the_dit_and_the_pipeline():
    assert FAMILY.name == "wan"
    assert FAMILY.specs[0] is DIT_SPEC and DIT_SPEC.name == "wan_dit" and DIT_SPEC.role == "dit"
    assert FAMILY.pipeline == "diffsynth.wan.pipeline:WanVideoPipeline"


def test_flf2v_config_from_shapes_and_from_the_authors_json():
    """FLF2V = I2V-14B plus `img_emb.emb_pos` [1, 514, 1280]; the authors label it model_type 'flf2v'."""
    import json

    from diffsynth.wan.formats import DIT_SPEC

    keys = json.loads((Path(__file__).parent / "data" / "keys" / "wan21_i2v_14b_orig.json").read_text())
    state = {k: torch.empty(v, device="meta") for k, v in keys.items()}
    state["img_emb.emb_pos"] = torch.empty(1, 514, 1280, device="meta")
    from_shapes = DIT_SPEC.config_from_state(state, None)
    assert from_shapes.image_pos_len == 514 and from_shapes.has_image_input and from_shapes.model_type == "i2v"
    authors = {
        "model_type": "flf2v",
        "dim": 5120,
        "ffn_dim": 13824,
        "num_heads": 40,
        "num_layers": 40,
        "in_dim": 36,
        "out_dim": 16,
        "text_len": 512,
        "freq_dim": 256,
        "eps": 1e-6,
    }
    assert DIT_SPEC.config_from_state(state, authors) == from_shapes
    with torch.device("meta"):
        model = DIT_SPEC.build(from_shapes)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {k: tuple(v.shape) for k, v in state.items()}
