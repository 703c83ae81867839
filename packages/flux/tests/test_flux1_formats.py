"""FLUX.1 DiT checkpoint formats: full-size keys on meta, config derivation, layouts and conversion."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffsynth_flux_test_helpers import dit_inputs, make_dit, tiny_dit_config

from diffsynth.flux.flux1.dit import Flux1DiT, Flux1DiTConfig
from diffsynth.flux.flux1.formats import (
    FLUX1_DIT_SPEC,
    PREFIX,
    config_from_state,
    diffusers_to_ours,
    ours_to_diffusers,
)
from diffsynth.flux.formats import FAMILY
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.testing import conformance as cf

KEYS = Path(__file__).parent / "data" / "keys"
LAYOUTS = {layout.name: layout for layout in FLUX1_DIT_SPEC.layouts}

# transformer/config.json of black-forest-labs/FLUX.1-dev (diffusers field names).
RELEASED_CONFIG_JSON = {
    "_class_name": "FluxTransformer2DModel",
    "attention_head_dim": 128,
    "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": True,
    "in_channels": 64,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 19,
    "num_single_layers": 38,
    "patch_size": 1,
    "pooled_projection_dim": 768,
}


def released_meta_state() -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return Flux1DiT(Flux1DiTConfig()).state_dict()


def meta_state_from_keys(name: str) -> dict[str, torch.Tensor]:
    shapes = json.loads((KEYS / name).read_text())
    return {k: torch.empty(v, device="meta") for k, v in shapes.items()}


def shapes(state) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in state.items()}


# ------------------------------------------------------------------ full size, meta device
def test_released_model_has_exactly_the_original_keys_and_shapes():
    official = json.loads((KEYS / "flux1_dev_orig.json").read_text())
    ours = shapes(released_meta_state())
    assert sorted(ours.keys() - official.keys()) == [] and sorted(official.keys() - ours.keys()) == []
    assert ours == official


def test_diffusers_folder_converts_to_exactly_our_keys_and_shapes():
    diffusers = meta_state_from_keys("flux1_dev_diffusers.json")
    layout = FLUX1_DIT_SPEC.match(diffusers)
    assert layout.name == "diffusers"
    assert shapes(layout.to_ours(diffusers)) == shapes(released_meta_state())


def test_ours_to_diffusers_gives_exactly_the_diffusers_keys_and_shapes():
    assert shapes(ours_to_diffusers(released_meta_state())) == json.loads(
        (KEYS / "flux1_dev_diffusers.json").read_text()
    )


@pytest.mark.parametrize("name", ["flux1_dev_orig.json", "flux1_dev_diffusers.json"])
def test_config_derived_from_each_released_layout_is_flux1_dev(name):
    state = meta_state_from_keys(name)
    ours = FLUX1_DIT_SPEC.match(state).to_ours(state)
    assert config_from_state(ours, None) == Flux1DiTConfig()
    assert config_from_state(ours, RELEASED_CONFIG_JSON) == Flux1DiTConfig()


def test_config_from_json_alone():
    assert config_from_state({}, RELEASED_CONFIG_JSON) == Flux1DiTConfig()
    schnell = config_from_state({}, {**RELEASED_CONFIG_JSON, "guidance_embeds": False})
    assert schnell == Flux1DiTConfig(guidance_embed=False)


def test_schnell_shapes_have_no_guidance_embedder():
    state = {k: v for k, v in released_meta_state().items() if not k.startswith("guidance_in.")}
    assert FLUX1_DIT_SPEC.match(state).name == "original"
    assert config_from_state(state, None) == Flux1DiTConfig(guidance_embed=False)


def test_config_json_that_contradicts_the_shapes_is_an_error():
    with pytest.raises(ConfigError, match="depth"):
        config_from_state(released_meta_state(), {**RELEASED_CONFIG_JSON, "num_layers": 18})
    with pytest.raises(ConfigError, match="patch_size"):
        config_from_state({}, {**RELEASED_CONFIG_JSON, "patch_size": 2})


def test_layouts_are_recognised_at_full_size():
    state = released_meta_state()
    assert FLUX1_DIT_SPEC.match(state).name == "original"
    prefixed = {PREFIX + k: v for k, v in state.items()}
    layout = FLUX1_DIT_SPEC.match(prefixed)
    assert layout.name == "comfyui"
    assert shapes(layout.to_ours(prefixed)) == shapes(state)


def test_flux2_style_files_are_not_taken_for_flux1():
    """FLUX.2 shares many names but has no `vector_in` / per-block `img_mod`, and fuses `proj_mlp` away."""
    original = released_meta_state()
    flux2_like = {k: v for k, v in original.items() if not k.startswith("vector_in.") and "_mod.lin" not in k}
    assert FLUX1_DIT_SPEC.match(flux2_like) is None
    diffusers = ours_to_diffusers(original)
    fused_single = {k: v for k, v in diffusers.items() if ".proj_mlp." not in k}
    assert FLUX1_DIT_SPEC.match(fused_single) is None


# ------------------------------------------------------------------ tiny: conversions round trip
@pytest.mark.parametrize("name", ["original", "comfyui"])
def test_original_layouts_round_trip(name):
    cf.check_layout_roundtrip(make_dit, LAYOUTS[name])


@pytest.mark.parametrize("guidance_embed", [True, False])
def test_diffusers_layout_inverts_ours_to_diffusers_exactly(guidance_embed):
    factory = lambda: make_dit(tiny_dit_config(guidance_embed=guidance_embed))  # noqa: E731
    cf.check_layout_roundtrip(factory, LAYOUTS["diffusers"], from_ours=ours_to_diffusers)
    diffusers = ours_to_diffusers(factory().state_dict())
    back = ours_to_diffusers(diffusers_to_ours(diffusers))
    assert back.keys() == diffusers.keys() and all(torch.equal(back[k], diffusers[k]) for k in diffusers)


def test_final_modulation_halves_are_swapped():
    ours = make_dit().state_dict()
    theirs = ours_to_diffusers(ours)["norm_out.linear.weight"]
    shift, scale = ours["final_layer.adaLN_modulation.1.weight"].chunk(2)
    assert torch.equal(theirs, torch.cat([scale, shift]))


def test_unmapped_and_incomplete_keys_are_errors_naming_them():
    diffusers = ours_to_diffusers(make_dit().state_dict())
    with pytest.raises(KeyError, match="transformer_blocks.0.attn.rogue.weight"):
        diffusers_to_ours({**diffusers, "transformer_blocks.0.attn.rogue.weight": torch.zeros(1)})
    without_v = {k: v for k, v in diffusers.items() if k != "single_transformer_blocks.1.attn.to_v.weight"}
    with pytest.raises(KeyError, match="single_transformer_blocks.1.attn.to_v.weight"):
        diffusers_to_ours(without_v)
    with pytest.raises(KeyError, match="rogue"):
        ours_to_diffusers({"rogue.weight": torch.zeros(1)})


def test_layouts_own_only_dit_keys():
    assert LAYOUTS["original"].owns("double_blocks.3.img_attn.qkv.weight")
    assert not LAYOUTS["original"].owns("encoder.conv_in.weight")
    assert LAYOUTS["diffusers"].owns("single_transformer_blocks.0.proj_mlp.weight")
    assert not LAYOUTS["diffusers"].owns("text_model.embeddings.token_embedding.weight")


def test_spec_config_from_tiny_shapes_rebuilds_the_same_model():
    """Shapes give widths, counts, heads, MLP ratio; RoPE axes come from the json (or released defaults)."""
    tiny = tiny_dit_config()
    json_rope = {"axes_dims_rope": list(tiny.axes_dim)}
    assert cf.check_spec_config(FLUX1_DIT_SPEC, make_dit, json_rope) == tiny


def test_shapes_that_need_other_rope_axes_say_so():
    with torch.device("meta"):
        state = make_dit().state_dict()
    with pytest.raises(ConfigError, match="axes_dim"):
        config_from_state(state, None)


def test_family_declares_the_dit_encoders_presets_and_pipeline():
    from diffsynth.flux.flux1.controlnet_formats import FLUX1_CONTROLNET_SPEC
    from diffsynth.flux.flux1.encoder_formats import CLIP_TEXT_SPEC, T5_ENCODER_SPEC
    from diffsynth.flux.flux1.lora_encoder import LORA_ENCODER_SPEC
    from diffsynth.flux.flux1.lora_fusion import LORA_FUSION_SPEC
    from diffsynth.flux.flux1.step1x_connector import STEP1X_CONNECTOR_SPEC
    from diffsynth.flux.flux1.value_control import VALUE_ENCODER_SPEC

    specs = (
        FLUX1_DIT_SPEC, CLIP_TEXT_SPEC, T5_ENCODER_SPEC, FLUX1_CONTROLNET_SPEC, STEP1X_CONNECTOR_SPEC,
        VALUE_ENCODER_SPEC, LORA_ENCODER_SPEC, LORA_FUSION_SPEC,
    )  # fmt: skip
    assert FAMILY.name == "flux" and FAMILY.specs == specs
    assert FLUX1_DIT_SPEC.name == "flux1_dit" and FLUX1_DIT_SPEC.role == "dit"
    assert FAMILY.pipeline == "diffsynth.flux.pipeline:FluxImagePipeline"
    assert sorted(FAMILY.presets) == [
        "ByteDance/InfiniteYou",
        "ByteDance/InfiniteYou:sim",
        "DiffSynth-Studio/ArtAug-lora-FLUX.1dev-v1",
        "DiffSynth-Studio/AttriCtrl-FLUX.1-Dev",
        "DiffSynth-Studio/Eligen",
        "DiffSynth-Studio/LoRA-Encoder-FLUX.1-Dev",
        "DiffSynth-Studio/LoRAFusion-preview-FLUX.1-dev",
        "DiffSynth-Studio/Nexus-GenV2",
        "DiffSynth-Studio/Nexus-GenV2:generation",
        "HuanJue/Insert-Anything",
        "black-forest-labs/FLUX.1-Canny-dev",
        "black-forest-labs/FLUX.1-Depth-dev",
        "black-forest-labs/FLUX.1-Fill-dev",
        "black-forest-labs/FLUX.1-Kontext-dev",
        "black-forest-labs/FLUX.1-Krea-dev",
        "black-forest-labs/FLUX.1-dev",
        "black-forest-labs/FLUX.1-schnell",
        "ostris/Flex.2-preview",
        "stepfun-ai/Step1X-Edit",
        "stepfun-ai/Step1X-Edit:v1.1",
    ]


@pytest.mark.parity
def test_original_to_diffusers_matches_the_diffusers_converter_at_full_size():
    pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    state = meta_state_from_keys("flux1_dev_orig.json")
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(state))
    assert shapes(ours_to_diffusers(state)) == shapes(theirs)


@pytest.mark.parametrize("layout", ["original", "comfyui", "diffusers"])
def test_runtime_loader_builds_the_same_model_from_each_layout(layout):
    from diffsynth.runtime.loading import load_model

    reference = make_dit().eval()
    state = reference.state_dict()
    if layout == "comfyui":
        state = {PREFIX + k: v for k, v in state.items()}
    elif layout == "diffusers":
        state = ours_to_diffusers(state)
    rope = {"axes_dims_rope": list(tiny_dit_config().axes_dim)}
    model = load_model(state, specs=[FLUX1_DIT_SPEC], config=rope)
    assert isinstance(model, Flux1DiT) and model.config == tiny_dit_config()
    args = dit_inputs()
    with torch.no_grad():
        assert torch.equal(model(*args), reference(*args))
