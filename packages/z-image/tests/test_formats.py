"""Z-Image DiT checkpoint formats: full-size keys on meta, config derivation, layouts and conversion."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.testing import conformance as cf
from diffsynth.z_image.dit import ZImageDiT, ZImageDiTConfig
from diffsynth.z_image.formats import CONTROLNET_SPEC, DIT_SPEC, FAMILY, PREFIX, comfy_to_ours, config_from_state

KEYS_FILE = Path(__file__).parent / "data" / "keys" / "zimage_turbo_diffusers.json"
LAYOUTS = {layout.name: layout for layout in DIT_SPEC.layouts}

# The hub's transformer/config.json of Tongyi-MAI/Z-Image-Turbo (diffusers 0.42 field names).
RELEASED_CONFIG_JSON = {
    "_class_name": "ZImageTransformer2DModel",
    "all_f_patch_size": [1],
    "all_patch_size": [2],
    "axes_dims": [32, 48, 48],
    "axes_lens": [1536, 512, 512],
    "cap_feat_dim": 2560,
    "dim": 3840,
    "in_channels": 16,
    "n_heads": 30,
    "n_kv_heads": 30,
    "n_layers": 30,
    "n_refiner_layers": 2,
    "norm_eps": 1e-05,
    "qk_norm": True,
    "rope_theta": 256.0,
    "t_scale": 1000.0,
}


def _test_dit():
    """`tiny_config` and friends live only in test_dit.py; load that module by path."""
    spec = importlib.util.spec_from_file_location("z_image_test_dit", Path(__file__).with_name("test_dit.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


T = _test_dit()


def released_meta_state() -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return ZImageDiT(ZImageDiTConfig()).state_dict()


def to_comfy(ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of the ComfyUI conversion, written independently of formats.py for the test."""
    out = {}
    for key, value in ours.items():
        if re.search(r"attention\.to_[kv]\.weight$", key):
            continue
        if key.endswith("attention.to_q.weight"):
            stem = key[: -len("to_q.weight")]
            parts = [ours[stem + f"to_{n}.weight"] for n in "qkv"]
            # torch.cat on meta tensors pulls in the Python meta kernels (seconds): build the shape instead
            value = (
                torch.empty(3 * value.shape[0], *value.shape[1:], device="meta") if value.is_meta else torch.cat(parts)
            )
            key = stem + "qkv.weight"
        key = key.replace("all_x_embedder.2-1.", "x_embedder.").replace("all_final_layer.2-1.", "final_layer.")
        key = key.replace("attention.to_out.0.", "attention.out.")
        key = key.replace("attention.norm_q.", "attention.q_norm.").replace("attention.norm_k.", "attention.k_norm.")
        out[key] = value
    return out


# ------------------------------------------------------------------ full size, meta device
def test_released_model_has_exactly_the_official_keys_and_shapes():
    official = json.loads(KEYS_FILE.read_text())
    ours = {k: list(v.shape) for k, v in released_meta_state().items()}
    assert sorted(ours.keys() - official.keys()) == [] and sorted(official.keys() - ours.keys()) == []
    assert ours == official
    assert list(ours) == list(official)  # same order as diffusers' state_dict too


def test_config_from_released_shapes_and_json():
    state = released_meta_state()
    assert config_from_state(state, None) == ZImageDiTConfig()
    assert config_from_state(state, RELEASED_CONFIG_JSON) == ZImageDiTConfig()
    assert config_from_state({}, RELEASED_CONFIG_JSON) == ZImageDiTConfig()


def test_config_json_that_contradicts_the_shapes_is_an_error():
    with pytest.raises(ConfigError, match="n_layers"):
        config_from_state(released_meta_state(), {**RELEASED_CONFIG_JSON, "n_layers": 28})


@pytest.mark.parametrize(
    ("changes", "message"),
    [({"all_patch_size": [2, 4], "all_f_patch_size": [1, 1]}, "all_patch_size")],
)
def test_unsupported_config_json_is_rejected(changes, message):
    with pytest.raises(ConfigError, match=message):
        config_from_state({}, {**RELEASED_CONFIG_JSON, **changes})


def test_layouts_are_recognised_at_full_size():
    state = released_meta_state()
    assert DIT_SPEC.match(state).name == "diffusers"
    prefixed = {PREFIX + k: v for k, v in state.items()}
    assert DIT_SPEC.match(prefixed).name == "diffusers_prefixed"
    comfy = to_comfy(state)
    assert DIT_SPEC.match(comfy).name == "comfyui"
    comfy_prefixed = {PREFIX + k: v for k, v in comfy.items()}
    layout = DIT_SPEC.match(comfy_prefixed)
    assert layout.name == "comfyui_prefixed"
    converted = layout.to_ours(comfy_prefixed)
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in state.items()}


def test_lumina2_is_not_taken_for_z_image():
    """Lumina-Image 2.0 shares the ComfyUI names but modulates through SiLU + Linear (`adaLN_modulation.1`)."""
    comfy = to_comfy(released_meta_state())
    lumina = {re.sub(r"adaLN_modulation\.0\.", "adaLN_modulation.1.", k): v for k, v in comfy.items()}
    assert DIT_SPEC.match(lumina) is None


# ------------------------------------------------------------------ tiny: conversions round trip
@pytest.mark.parametrize("name", ["diffusers", "diffusers_prefixed"])
def test_diffusers_layouts_round_trip(name):
    cf.check_layout_roundtrip(T.make_model, LAYOUTS[name])


@pytest.mark.parametrize("name", ["comfyui", "comfyui_prefixed"])
def test_comfyui_layouts_restore_our_state_exactly(name):
    cf.check_layout_roundtrip(T.make_model, LAYOUTS[name], from_ours=to_comfy)


def test_comfyui_ignores_the_weightless_final_norm_and_rejects_unknown_keys():
    comfy = to_comfy(T.make_model().state_dict())
    with_norm = {**comfy, "norm_final.weight": torch.ones(T.tiny_config().dim)}
    assert comfy_to_ours(with_norm).keys() == comfy_to_ours(comfy).keys()
    with pytest.raises(KeyError, match="layers.0.attention.rogue.weight"):
        comfy_to_ours({**comfy, "layers.0.attention.rogue.weight": torch.zeros(1)})


def test_diffusers_layout_owns_only_dit_keys():
    """A file that also carries other models' weights leaves those to their own specs."""
    layout = LAYOUTS["diffusers"]
    assert layout.owns("layers.3.attention.to_q.weight") and layout.owns("x_pad_token")
    assert not layout.owns("vae.encoder.conv_in.weight") and not layout.owns("text_encoders.qwen3.weight")


def test_spec_config_from_tiny_shapes_rebuilds_the_same_model():
    """Shapes give widths, counts, heads and patch; RoPE axes come from the json (or released defaults)."""
    tiny = T.tiny_config()
    rope = {"axes_dims": list(tiny.axes_dims), "axes_lens": list(tiny.axes_lens)}
    assert cf.check_spec_config(DIT_SPEC, T.make_model, rope) == tiny


def test_shapes_that_need_other_rope_axes_say_so():
    with torch.device("meta"):
        state = T.make_model().state_dict()
    with pytest.raises(ConfigError, match="axes_dims"):
        config_from_state(state, None)


def test_family_declares_the_dit_controlnet_and_the_pipeline():
    from diffsynth.z_image.image_encoder import IMAGE_ENCODER_SPEC

    assert FAMILY.name == "z_image"
    assert FAMILY.specs == (DIT_SPEC, CONTROLNET_SPEC, IMAGE_ENCODER_SPEC) and DIT_SPEC.role == "dit"
    assert IMAGE_ENCODER_SPEC.role == "image_encoder"
    assert CONTROLNET_SPEC.role == "controlnet"
    assert FAMILY.pipeline == "diffsynth.z_image.pipeline:ZImagePipeline"


@pytest.mark.parity
@pytest.mark.parametrize("prefixed", [False, True])
def test_comfyui_conversion_equals_diffusers_converter(prefixed):
    pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

    comfy = to_comfy(T.make_model().state_dict())
    if prefixed:
        comfy = {PREFIX + k: v for k, v in comfy.items()}
    theirs = convert_z_image_transformer_checkpoint_to_diffusers(dict(comfy))
    ours = LAYOUTS["comfyui_prefixed" if prefixed else "comfyui"].to_ours(comfy)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
