"""The Qwen-Image 2.1 text encoder (Qwen3-VL): spec and layouts, strict loads, config, full-size keys on meta,
the pre-norm readout, our processor against transformers', and prompt encoding against diffusers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffsynth.qwen_image.qwen_image21.text_encoder import (
    PROMPT_TEMPLATE,
    TEXT_ENCODER21_SPEC,
    QwenImage21TextEncoder,
    config_from_state,
    encode_prompts21,
    image_prefix,
    load_processor,
    qwen3vl_8b_config,
    vision_copy,
)
from diffsynth.qwen_image.text_encoder import TEXT_ENCODER_SPEC
from diffsynth.runtime.errors import ConfigError, DiffSynthError
from diffsynth.runtime.loading import load_models, recognise
from diffsynth.runtime.models.qwen3 import QWEN3_SPEC
from diffsynth.runtime.testing.modules import load_beside

fx = load_beside(__file__, "qwen_image21_encoder_fixtures.py", "qwen_image21_encoder_fixtures")

SPECS = [TEXT_ENCODER21_SPEC, TEXT_ENCODER_SPEC, QWEN3_SPEC]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return fx.build_tiny_encoder_and_processor(tmp_path_factory.mktemp("tiny-qwen-image21"))


@pytest.fixture(scope="module")
def file_state(tiny):
    from safetensors.torch import load_file

    return load_file(str(tiny.text_encoder / "model.safetensors"))


@pytest.fixture(scope="module")
def ours(tiny):
    (loaded,) = load_models(str(tiny.text_encoder), torch_dtype="float32", specs=SPECS)
    return loaded


@pytest.fixture(scope="module")
def reference(tiny):
    return fx.reference_encoder(tiny.text_encoder)


def _images():
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 255, (48, 64, 4), dtype=np.uint8)
    rgba[:20, :, 3] = 0  # a transparent band, so the white compositing shows
    return [
        Image.fromarray(rng.integers(0, 255, (64, 40, 3), dtype=np.uint8)),
        Image.fromarray(rgba, "RGBA"),
    ]


# ----------------------------------------------------------------------------- spec, layouts, loading
def test_transformers_save_is_recognised_and_loads_strictly(ours, file_state, reference):
    assert "lm_head.weight" in file_state and any(k.startswith("model.visual.deepstack") for k in file_state)
    assert (ours.spec, ours.role, ours.layout) == ("qwen3vl", "text_encoder", "transformers")
    assert isinstance(ours.module, QwenImage21TextEncoder)
    want = {k[len("model.") :]: v for k, v in reference.state_dict().items() if k != "lm_head.weight"}
    got = ours.module.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_bare_state_dict_round_trips(ours):
    from diffsynth.runtime.testing import conformance as cf

    bare = next(lay for lay in TEXT_ENCODER21_SPEC.layouts if lay.name == "bare")
    cf.check_layout_roundtrip(lambda: ours.module, bare)
    (again,) = load_models(ours.module.state_dict(), config=ours.config, specs=SPECS)
    assert again.layout == "bare"


def test_no_other_qwen_spec_claims_qwen3vl_and_ours_claims_no_qwen25vl(file_state):
    (found,) = recognise(set(file_state), specs=SPECS)
    assert found.spec is TEXT_ENCODER21_SPEC
    assert TEXT_ENCODER_SPEC.match(file_state) is None and QWEN3_SPEC.match(file_state) is None
    keys = json.loads((Path(__file__).parent / "data" / "keys" / "qwen25vl7b_file_layout.json").read_text())
    tf5 = {("model.language_model." + k[6:] if k.startswith("model.") else "model." + k) for k in keys}
    for layout in (set(keys), tf5):
        assert TEXT_ENCODER21_SPEC.match(layout) is None
        assert TEXT_ENCODER_SPEC.match(layout) is not None


def test_an_unknown_or_missing_key_is_refused_by_name(tiny, file_state):
    extra = dict(file_state, **{"model.language_model.layers.0.self_attn.extra.weight": torch.zeros(2)})
    with pytest.raises(DiffSynthError, match="extra"):
        load_models(extra, config=tiny.config, specs=SPECS)
    stray = dict(file_state, **{"model.projector.weight": torch.zeros(2)})
    with pytest.raises(DiffSynthError, match="projector"):
        load_models(stray, config=tiny.config, specs=[TEXT_ENCODER21_SPEC])
    missing = {k: v for k, v in file_state.items() if k != "model.language_model.norm.weight"}
    with pytest.raises(DiffSynthError, match="norm.weight"):
        load_models(missing, config=tiny.config, specs=SPECS)


def test_rotary_stays_float32_under_bfloat16(tiny):
    (loaded,) = load_models(str(tiny.text_encoder), torch_dtype="bfloat16", specs=SPECS)
    module = loaded.module.to(torch.bfloat16)
    assert module.language_model.rotary_emb.inv_freq.dtype == torch.float32
    assert module.visual.rotary_pos_emb.inv_freq.dtype == torch.float32
    assert module.language_model.embed_tokens.weight.dtype == torch.bfloat16


def test_conformance_units_and_meta_load(ours):
    from diffsynth.runtime.testing import conformance as cf
    from diffsynth.runtime.testing.weights import random_weights

    def factory():
        return random_weights(QwenImage21TextEncoder(ours.config), 0)

    cf.check_declared_units(factory)
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    cf.check_meta_load(factory, (ids, torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])))


# ----------------------------------------------------------------------------- config
def test_config_from_json_is_checked_against_the_shapes(tiny, ours):
    meta = {k: torch.empty(v.shape, device="meta") for k, v in ours.module.state_dict().items()}
    config = config_from_state(meta, tiny.config)
    assert config.text_config.num_hidden_layers == 2 and config.vision_config.deepstack_visual_indexes == [0]
    assert config.text_config.rope_parameters["mrope_section"] == [2, 1, 1]
    wrong = json.loads(json.dumps(tiny.config))
    wrong["text_config"]["intermediate_size"] = 48
    with pytest.raises(ConfigError, match="intermediate_size=48"):
        config_from_state(meta, wrong)
    wrong = json.loads(json.dumps(tiny.config))
    wrong["vision_config"]["deepstack_visual_indexes"] = [0, 1]
    with pytest.raises(ConfigError, match="deepstack_visual_indexes"):
        config_from_state(meta, wrong)
    with pytest.raises(ConfigError, match="config.json"):
        config_from_state(meta, None)  # one DeepStack merger does not fit the 8B's three


def test_too_few_layers_for_deepstack_is_refused():
    config = qwen3vl_8b_config()
    config.text_config.num_hidden_layers = 3
    with pytest.raises(ConfigError, match="num_hidden_layers=3"):
        with torch.device("meta"):
            QwenImage21TextEncoder(config)


def _reference_8b_config():
    """Qwen3-VL-8B-Instruct as released (the values of its config.json), built independently of ours."""
    from transformers import Qwen3VLConfig

    text = dict(
        vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, rope_theta=5_000_000, max_position_embeddings=262144,
        rope_scaling={"rope_type": "default", "mrope_section": [24, 20, 20], "mrope_interleaved": True},
    )  # fmt: skip
    vision = dict(
        depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096, patch_size=16,
        deepstack_visual_indexes=[8, 16, 24], num_position_embeddings=2304,
    )  # fmt: skip
    return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False)


def test_full_size_8b_keys_and_shapes_on_meta():
    from transformers import Qwen3VLForConditionalGeneration

    with torch.device("meta"):
        reference = Qwen3VLForConditionalGeneration(_reference_8b_config())
    meta = reference.state_dict()
    layout = TEXT_ENCODER21_SPEC.match(set(meta))
    assert layout is not None and layout.name == "transformers"
    converted = layout.to_ours(meta)
    assert len(converted) == len(meta) - 1  # lm_head dropped on purpose
    config = config_from_state(converted, None)
    default = qwen3vl_8b_config()
    with torch.device("meta"):
        built, from_default = TEXT_ENCODER21_SPEC.build(config), TEXT_ENCODER21_SPEC.build(default)
    want = {k: tuple(v.shape) for k, v in converted.items()}
    assert {k: tuple(v.shape) for k, v in built.state_dict().items()} == want
    assert {k: tuple(v.shape) for k, v in from_default.state_dict().items()} == want
    text, vision = config.text_config, config.vision_config
    assert (text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (36, 32, 8)
    assert text.rope_parameters["rope_theta"] == 5_000_000 and text.rope_parameters["mrope_section"] == [24, 20, 20]
    assert (vision.depth, vision.num_heads, vision.deepstack_visual_indexes) == (27, 16, [8, 16, 24])
    assert vision.hidden_act == "gelu_pytorch_tanh" and config.image_token_id == 151655
    assert sum(v.numel() for v in converted.values()) == sum(v.numel() for v in meta.values()) - 151936 * 4096


# ----------------------------------------------------------------------------- readout and processor
def test_pre_norm_hidden_state_is_the_input_of_the_final_norm(tiny, ours, reference):
    """Against the way diffusers reads it: a forward hook that makes the final norm return its input."""
    processor = fx.reference_processor(tiny.processor)
    texts = [PROMPT_TEMPLATE.format(image_prefix(2) + "make it red")] * 2
    images = [vision_copy(image) for image in _images()] * 2
    inputs = processor(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt")
    norm = reference.model.language_model.norm
    handle = norm.register_forward_hook(lambda module, args, output: args[0])
    try:
        with torch.no_grad():
            want = reference(**inputs, output_hidden_states=True).hidden_states[-1]
    finally:
        handle.remove()
    vision = {k: inputs[k] for k in ("pixel_values", "image_grid_thw", "mm_token_type_ids")}
    with torch.no_grad():
        got = ours.module.pre_norm_hidden_state(inputs["input_ids"], inputs["attention_mask"], **vision)
        normed = ours.module(**inputs, use_cache=False).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert not torch.allclose(got, normed, atol=1e-2)


@pytest.mark.parametrize("with_images", [False, True])
def test_our_processor_gives_the_tensors_of_transformers_qwen3vl_processor(tiny, with_images):
    ours, theirs = load_processor(tiny.processor), fx.reference_processor(tiny.processor)
    lead = image_prefix(2) if with_images else ""
    texts = [PROMPT_TEMPLATE.format(lead + p) for p in ("a", "a small green square in the top left corner")]
    extra = {"images": [vision_copy(image) for image in _images()] * 2} if with_images else {}
    kwargs = dict(text=texts, padding=True, padding_side="left", return_tensors="pt", **extra)
    want, got = theirs(**kwargs), ours(**kwargs)
    assert set(got) == set(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert bool((want["attention_mask"][0] == 0).any()) and want["attention_mask"][0, 0] == 0  # left padding


def test_rgba_is_composited_over_white_for_the_vision_tower():
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    rgba.putpixel((0, 0), (10, 20, 30, 255))
    flat = np.asarray(vision_copy(rgba))
    assert flat.shape == (4, 4, 3) and flat[0, 0].tolist() == [10, 20, 30] and flat[1, 1].tolist() == [255] * 3
    rgb = Image.new("RGB", (4, 4))
    assert vision_copy(rgb) is rgb


def test_templates_are_the_authors():
    assert PROMPT_TEMPLATE.format("a cat") == (
        "<|im_start|>system\nComprehend and analyze the provided prompt.<|im_end|>\n"
        "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n"
    )
    slot = "<|vision_start|><|image_pad|><|vision_end|>"
    assert image_prefix(2) == f"<image1>{slot} <image2>{slot}"


def test_load_processor_names_what_the_folder_holds(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ConfigError, match="tokenizer.json"):
        load_processor(tmp_path)


# ----------------------------------------------------------------------------- parity with diffusers
CASES = {
    "t2i, two prompts of different lengths": (["a red circle", "a small green square in the top left corner"], 0),
    "empty prompt": ([""], 0),
    "one RGBA condition image": (["make it red"], 1),
    "two condition images, two prompts": (["a", "make the first one red and the second blue"], 2),
}


@pytest.fixture(scope="module")
def diffusers_pipe(tiny, reference):
    diffusers = pytest.importorskip("diffusers")
    processor = fx.reference_processor(tiny.processor)
    return diffusers.QwenImage21Pipeline(
        scheduler=None, vae=None, text_encoder=reference, processor=processor, transformer=None
    )


@pytest.mark.parity
@pytest.mark.parametrize("case", list(CASES))
def test_prompt_encoding_matches_diffusers(tiny, ours, diffusers_pipe, case):
    prompts, count = CASES[case]
    images = _images()[-count:] if count else None
    want_embeds, want_mask, want_slots = diffusers_pipe.encode_prompt(prompts, image=images, device=torch.device("cpu"))
    embeds, mask, slots = encode_prompts21(ours.module, load_processor(tiny.processor), prompts, images)
    torch.testing.assert_close(embeds, want_embeds, atol=1e-6, rtol=0)
    assert (mask is None) == (want_mask is None)
    if mask is not None:
        assert mask.dtype == torch.bool and torch.equal(mask, want_mask.bool())
    assert slots.dtype == torch.bool and torch.equal(slots, want_slots)
    assert int(slots.sum()) > 0 if count else not slots.any()
    assert (mask is not None) == (len(prompts) > 1)  # the two-prompt cases differ in length


@pytest.mark.parity
def test_system_turn_length_matches_diffusers(tiny, diffusers_pipe):
    from diffsynth.qwen_image.qwen_image21.text_encoder import system_turn_length

    assert system_turn_length(load_processor(tiny.processor).tokenizer) == diffusers_pipe._drop_idx
