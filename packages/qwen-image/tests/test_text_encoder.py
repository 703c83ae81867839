"""The Qwen2.5-VL text encoder spec: full-size keys on meta, the three layouts, strictness, prompt templates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffsynth.qwen_image.text_encoder import (
    EDIT_TEMPLATE,
    T2I_TEMPLATE,
    TEXT_ENCODER_SPEC,
    edit_image_prefix,
    split_and_pad,
)
from diffsynth.runtime.errors import DiffSynthError
from diffsynth.runtime.loading import load_models

KEYS = Path(__file__).parent / "data" / "keys"


def _file_layout_meta() -> dict[str, torch.Tensor]:
    shapes = json.loads((KEYS / "qwen25vl7b_file_layout.json").read_text())
    return {k: torch.empty(v, device="meta") for k, v in shapes.items()}


def test_full_size_model_matches_every_key_and_shape_of_the_hub_files():
    meta = _file_layout_meta()
    layout = TEXT_ENCODER_SPEC.match(set(meta))
    assert layout is not None and layout.name == "hub"
    ours = layout.to_ours(meta)
    assert "lm_head.weight" in meta and len(ours) == len(meta) - 1  # lm_head dropped on purpose
    config = TEXT_ENCODER_SPEC.config_from_state(ours, None)
    with torch.device("meta"):
        model = TEXT_ENCODER_SPEC.build(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert expected == {k: tuple(v.shape) for k, v in ours.items()}
    text = config.text_config
    assert (text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (28, 28, 4)
    assert config.vision_config.depth == 32 and config.vision_config.out_hidden_size == 3584


def test_full_size_loads_on_meta_through_the_loader():
    (loaded,) = load_models(_file_layout_meta())
    assert loaded.spec == "qwen25vl" and loaded.role == "text_encoder" and loaded.layout == "hub"
    assert loaded.module.language_model.embed_tokens.weight.shape == (152064, 3584)


@pytest.fixture(scope="module")
def tiny_state(tiny_repo):
    from safetensors.torch import load_file

    return load_file(str(tiny_repo / "text_encoder" / "model.safetensors"))


def _rename(state, lm: str, vision: str, head: bool):
    out = {}
    for key, value in state.items():
        if key == "lm_head.weight":
            if head:
                out[key] = value
        elif key.startswith("model."):
            out[lm + key[len("model.") :]] = value
        else:
            out[vision + key[len("visual.") :]] = value
    return out


@pytest.mark.parametrize(
    "lm, vision, head, layout",
    [
        ("model.language_model.", "model.visual.", True, "transformers5"),
        ("language_model.", "visual.", False, "bare"),
    ],
)
def test_other_layouts_load_to_the_same_weights(tiny_repo, tiny_state, lm, vision, head, layout):
    config = json.loads((tiny_repo / "text_encoder" / "config.json").read_text())
    (reference,) = load_models(str(tiny_repo / "text_encoder"), torch_dtype="float32")
    (other,) = load_models(_rename(tiny_state, lm, vision, head), torch_dtype="float32", config=config)
    assert other.layout == layout
    ref_state, other_state = reference.module.state_dict(), other.module.state_dict()
    assert ref_state.keys() == other_state.keys()
    assert all(torch.equal(ref_state[k], other_state[k]) for k in ref_state)
    rotary = other.module.language_model.rotary_emb.inv_freq
    assert rotary.device.type == "cpu" and rotary.dtype == torch.float32


def _config(tiny_repo):
    return json.loads((tiny_repo / "text_encoder" / "config.json").read_text())


def test_an_unknown_key_is_refused_by_name(tiny_repo, tiny_state):
    state = dict(tiny_state, **{"model.layers.0.self_attn.extra.weight": torch.zeros(2)})
    with pytest.raises(DiffSynthError, match="extra"):
        load_models(state, config=_config(tiny_repo))


def test_a_missing_key_is_refused(tiny_repo, tiny_state):
    state = {k: v for k, v in tiny_state.items() if k != "model.norm.weight"}
    with pytest.raises(DiffSynthError, match="norm.weight"):
        load_models(state, config=_config(tiny_repo))


def test_shapes_without_config_json_must_fit_the_7b_heads(tiny_state):
    with pytest.raises(DiffSynthError, match="config.json"):
        load_models(tiny_state)


def test_rotary_stays_float32_under_bfloat16(tiny_repo):
    (loaded,) = load_models(str(tiny_repo / "text_encoder"), torch_dtype="bfloat16")
    module = loaded.module.to(torch.bfloat16)
    assert module.language_model.rotary_emb.inv_freq.dtype == torch.float32
    assert module.language_model.embed_tokens.weight.dtype == torch.bfloat16


def test_templates_are_the_authors():
    assert T2I_TEMPLATE.drop == 34 and EDIT_TEMPLATE.drop == 64
    text = T2I_TEMPLATE.format("a cat")
    assert text.startswith("<|im_start|>system\nDescribe the image by detailing the color")
    assert text.endswith("<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n")
    assert edit_image_prefix(2, numbered=True) == (
        "Picture 1: <|vision_start|><|image_pad|><|vision_end|>Picture 2: <|vision_start|><|image_pad|><|vision_end|>"
    )
    assert edit_image_prefix(1, numbered=False) == "<|vision_start|><|image_pad|><|vision_end|>"


def test_split_and_pad_drops_the_template_and_pads_to_the_longest():
    hidden = torch.arange(2 * 6 * 1, dtype=torch.float32).view(2, 6, 1)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]])
    embeds, keep = split_and_pad(hidden, mask, drop=2, max_sequence_length=512)
    assert embeds[:, :, 0].tolist() == [[2.0, 3.0, 4.0], [8.0, 0.0, 0.0]]
    assert keep.tolist() == [[True, True, True], [True, False, False]]
    embeds, keep = split_and_pad(hidden, mask, drop=2, max_sequence_length=2)
    assert embeds.shape == (2, 2, 1)


def test_conformance_units_and_meta_load(tiny_repo):
    from diffsynth.qwen_image.text_encoder import QwenImageTextEncoder
    from diffsynth.runtime.testing import conformance as cf
    from diffsynth.runtime.testing.weights import random_weights

    config = TEXT_ENCODER_SPEC.config_from_state({}, _config(tiny_repo))

    def factory():
        return random_weights(QwenImageTextEncoder(config), 0)

    cf.check_declared_units(factory)
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    cf.check_meta_load(factory, (ids, mask))


def test_vram_managed_pipeline_equals_unmanaged(tiny_repo):
    from diffsynth.qwen_image import QwenImagePipeline

    kwargs = dict(seed=0, height=32, width=32, num_inference_steps=2, output_type="pt", progress_bar=False)
    plain = QwenImagePipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu")
    managed = QwenImagePipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu", vram_limit=0)
    assert "text_encoder" in managed.vram_handles
    torch.testing.assert_close(managed("a red circle", **kwargs), plain("a red circle", **kwargs), atol=1e-6, rtol=0)
