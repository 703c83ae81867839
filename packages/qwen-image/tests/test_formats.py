"""Qwen-Image DiT checkpoint formats: full-size keys on meta, config derivation and layouts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import qwen_image_test_dit as T  # loaded by conftest
import torch

from diffsynth.qwen_image.dit import QwenImageDiT, QwenImageDiTConfig
from diffsynth.qwen_image.formats import DIT_SPEC, FAMILY, PREFIX, config_from_state
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.testing import conformance as cf

KEYS_FILE = Path(__file__).parent / "data" / "keys" / "qwenimage_diffusers.json"
LAYOUTS = {layout.name: layout for layout in DIT_SPEC.layouts}

# The hub's transformer/config.json of Qwen/Qwen-Image (diffusers field names).
RELEASED_CONFIG_JSON = {
    "_class_name": "QwenImageTransformer2DModel",
    "attention_head_dim": 128,
    "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": False,
    "in_channels": 64,
    "joint_attention_dim": 3584,
    "num_attention_heads": 24,
    "num_layers": 60,
    "out_channels": 16,
    "patch_size": 2,
}


def released_meta_state() -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return QwenImageDiT(QwenImageDiTConfig()).state_dict()


# ------------------------------------------------------------------ full size, meta device
def test_released_model_has_exactly_the_official_keys_and_shapes():
    official = json.loads(KEYS_FILE.read_text())
    ours = {k: list(v.shape) for k, v in released_meta_state().items()}
    assert sorted(ours.keys() - official.keys()) == [] and sorted(official.keys() - ours.keys()) == []
    assert ours == official
    assert list(ours) == list(official)  # same order as diffusers' state_dict too


def test_config_from_released_shapes_and_json():
    state = released_meta_state()
    assert config_from_state(state, None) == QwenImageDiTConfig()
    assert config_from_state(state, RELEASED_CONFIG_JSON) == QwenImageDiTConfig()
    assert config_from_state({}, RELEASED_CONFIG_JSON) == QwenImageDiTConfig()


def test_edit_2511_json_turns_on_zero_cond_t():
    cfg = config_from_state(released_meta_state(), {**RELEASED_CONFIG_JSON, "zero_cond_t": True})
    assert cfg.zero_cond_t is True


def test_config_json_that_contradicts_the_shapes_is_an_error():
    with pytest.raises(ConfigError, match="num_layers"):
        config_from_state(released_meta_state(), {**RELEASED_CONFIG_JSON, "num_layers": 40})


@pytest.mark.parametrize("field", ["use_layer3d_rope", "use_additional_t_cond"])
def test_layered_fields_are_read_from_the_json(field):  # Qwen-Image-Layered: test_layered_dit.py
    assert getattr(config_from_state({}, {**RELEASED_CONFIG_JSON, field: True}), field) is True


def test_layouts_are_recognised_at_full_size():
    state = released_meta_state()
    assert DIT_SPEC.match(state).name == "diffusers"
    prefixed = {PREFIX + k: v for k, v in state.items()}
    layout = DIT_SPEC.match(prefixed)
    assert layout.name == "diffusers_prefixed"
    assert {k: v.shape for k, v in layout.to_ours(prefixed).items()} == {k: v.shape for k, v in state.items()}


# ------------------------------------------------------------------ tiny
@pytest.mark.parametrize("name", ["diffusers", "diffusers_prefixed"])
def test_layouts_round_trip(name):
    cf.check_layout_roundtrip(T.make_model, LAYOUTS[name])


def test_diffusers_layout_owns_only_dit_keys():
    layout = LAYOUTS["diffusers"]
    assert layout.owns("transformer_blocks.3.attn.to_q.weight") and layout.owns("txt_norm.weight")
    assert not layout.owns("vae.encoder.conv_in.weight") and not layout.owns("model.layers.0.mlp.up_proj.weight")


def test_spec_config_from_tiny_shapes_rebuilds_the_same_model():
    tiny = T.tiny_config()
    assert cf.check_spec_config(DIT_SPEC, T.make_model, {"axes_dims_rope": list(tiny.axes_dims_rope)}) == tiny


def test_shapes_that_need_other_rope_axes_say_so():
    with torch.device("meta"):
        state = T.make_model().state_dict()
    with pytest.raises(ConfigError, match="axes_dims_rope"):
        config_from_state(state, None)


def test_family_declares_the_dit_text_encoder_controlnet_presets_and_pipeline():
    from diffsynth.qwen_image.blockwise_controlnet import BLOCKWISE_CONTROLNET_SPEC
    from diffsynth.qwen_image.controlnet_formats import CONTROLNET_SPEC
    from diffsynth.qwen_image.text_encoder import TEXT_ENCODER_SPEC

    assert FAMILY.name == "qwen_image" and FAMILY.pipeline == "diffsynth.qwen_image.pipeline:QwenImagePipeline"
    assert FAMILY.specs == (DIT_SPEC, TEXT_ENCODER_SPEC, CONTROLNET_SPEC, BLOCKWISE_CONTROLNET_SPEC)
    assert DIT_SPEC.name == "qwen_image_dit" and DIT_SPEC.role == "dit"
    assert TEXT_ENCODER_SPEC.role == "text_encoder" and CONTROLNET_SPEC.role == "controlnet"
    assert "Qwen/Qwen-Image" in FAMILY.presets and FAMILY.pipeline_class().__name__ == "QwenImagePipeline"
