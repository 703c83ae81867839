"""CLIP vision encoder: the authors' open-clip file through our mapping vs transformers' CLIPVisionModel
(`hidden_states[-2]`), full-size key checks, the hub layouts, and Wan's preprocessing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diffsynth.runtime.loading import load_model
from diffsynth.wan.encoder_formats import CLIP_VISION_SPEC
from diffsynth.wan.image_encoder import CLIP_MEAN, CLIP_STD, WanImageEncoder, encode_image, preprocess

KEYS = Path(__file__).parent / "data" / "keys"


def meta_state(name: str) -> dict[str, torch.Tensor]:
    shapes = json.loads((KEYS / name).read_text())
    return {k: torch.empty(v, dtype=torch.float16, device="meta") for k, v in shapes.items()}


@pytest.fixture(scope="module")
def reference(tiny_sizes):
    return tiny_sizes.tiny_clip()


@pytest.fixture(scope="module")
def ours(reference, tiny_sizes):
    return load_model(tiny_sizes.clip_to_original(reference.state_dict()), specs=[CLIP_VISION_SPEC])


def test_original_layout_matches_transformers_penultimate_layer(reference, ours):
    assert isinstance(ours, WanImageEncoder)
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        got = ours.penultimate_hidden_states(pixels)
    assert got.shape == (2, 5, 128)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_position_ids_are_rebuilt_after_a_real_load(ours):
    ids = ours.embeddings.position_ids
    assert ids.device.type == "cpu" and ids.tolist() == [list(range(5))]


def test_encode_image_preprocesses_like_the_authors(ours, reference):
    """Stretch to image_size x image_size (bicubic), [-1, 1] -> [0, 1], CLIP mean/std; 257 tokens at full size."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 64, 3), dtype=np.uint8))
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 127.5 - 1
    resized = F.interpolate(pixels, size=(28, 28), mode="bicubic", align_corners=False)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    expected_pixels = (resized * 0.5 + 0.5 - mean) / std
    torch.testing.assert_close(preprocess(image, 28), expected_pixels)
    torch.testing.assert_close(preprocess(pixels, 28), expected_pixels)
    with torch.no_grad():
        expected = reference(pixel_values=expected_pixels, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(encode_image(ours, image), expected, rtol=1e-5, atol=1e-5)
    assert encode_image(ours, [image, image.resize((30, 30))]).shape == (2, 5, 128)


def test_full_size_original_file_gives_exactly_the_transformers_keys():
    """The open-clip XLM-R ViT-H/14 file (784 tensors): only `visual.*` is kept, as CLIPVisionModel's 519 keys."""
    model = load_model(meta_state("wan21_clip_xlmr_vith14_orig.json"), specs=[CLIP_VISION_SPEC])
    expected = json.loads((KEYS / "clip_vith14_vision_hf_tf5.json").read_text())
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == expected
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size) == (1280, 32, 16, 5120)
    assert (c.patch_size, c.image_size, c.hidden_act, c.layer_norm_eps) == (14, 224, "gelu", 1e-5)


@pytest.mark.parametrize("hub_names", [False, True])
def test_transformers_layouts_load(hub_names):
    state = meta_state("clip_vith14_vision_hf_tf5.json")
    if hub_names:  # CLIPVisionModelWithProjection files: `vision_model.*` and a projection we drop
        state = {"vision_model." + k: v for k, v in state.items()}
        state["visual_projection.weight"] = torch.empty(1024, 1280, device="meta")
        state["vision_model.embeddings.position_ids"] = torch.empty(1, 257, dtype=torch.long, device="meta")
    model = load_model(state, specs=[CLIP_VISION_SPEC])
    assert len(model.state_dict()) == 519


def test_head_count_from_the_released_widths_or_a_config(tmp_path, ours, reference, tiny_sizes):
    """Heads are not visible in the shapes: released widths give theirs (16 for 1280), others one per 64
    channels; a CLIP config.json beside a transformers-layout file decides (and is checked against the shapes)."""
    from safetensors.torch import save_file

    assert ours.config.num_attention_heads == tiny_sizes.clip["num_attention_heads"] == 128 // 64
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(dict(reference.config.to_dict(), num_attention_heads=4)))
    model = load_model(str(tmp_path / "model.safetensors"), specs=[CLIP_VISION_SPEC])
    assert model.config.num_attention_heads == 4
