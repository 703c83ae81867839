"""Qwen-Image-Layered DiT (layer-3D RoPE, additional timestep embedding): config, formats and input checks;
parity with diffusers' `QwenImageTransformer2DModel(use_layer3d_rope=True, use_additional_t_cond=True)` (tiny,
fp32, CPU) and its full-size keys and shapes on the meta device."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import qwen_image_test_dit as T  # loaded by conftest
import torch

from diffsynth.qwen_image.dit import QwenImageDiT, QwenImageDiTConfig, msrope_angles
from diffsynth.qwen_image.formats import ADDITIONAL_T_KEY, DIT_SPEC, config_from_state
from diffsynth.runtime.errors import ConfigError

KEYS_FILE = Path(__file__).parent / "data" / "keys" / "qwenimage_diffusers.json"
LAYERED = {"use_layer3d_rope": True, "use_additional_t_cond": True}

# Qwen/Qwen-Image-Layered transformer/config.json (diffusers field names)
LAYERED_CONFIG_JSON = {
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
    "use_additional_t_cond": True,
    "use_layer3d_rope": True,
    "zero_cond_t": False,
}


def layered_model(seed: int = 3, **overrides) -> QwenImageDiT:
    return T.make_model(T.tiny_config(**{**LAYERED, **overrides}), seed=seed).eval()


def layered_shapes(frames: int, h: int, w: int) -> list[tuple[int, int, int]]:
    """What the Layered pipeline passes: the generated frames (whole image, then layers), then the input image."""
    return [(1, h, w)] * frames + [(1, h, w)]


# ------------------------------------------------------------------ config and formats
def test_defaults_leave_the_layered_parts_off():
    cfg = QwenImageDiTConfig()
    assert cfg.use_additional_t_cond is False and cfg.use_layer3d_rope is False
    assert ADDITIONAL_T_KEY not in dict(QwenImageDiT(T.tiny_config()).named_parameters())


def test_additional_embedding_has_the_diffusers_name_and_shape():
    model = layered_model()
    assert tuple(model.state_dict()[ADDITIONAL_T_KEY].shape) == (2, model.config.inner_dim)


def test_released_layered_shapes_and_json_give_the_layered_config():
    with torch.device("meta"):
        state = QwenImageDiT(QwenImageDiTConfig(**LAYERED)).state_dict()
    assert DIT_SPEC.match(state).name == "diffusers"
    assert config_from_state(state, LAYERED_CONFIG_JSON) == QwenImageDiTConfig(**LAYERED)
    assert config_from_state({}, LAYERED_CONFIG_JSON) == QwenImageDiTConfig(**LAYERED)
    # no json (e.g. a ComfyUI single file): the embedding brings the layer-3D RoPE with it
    assert config_from_state(state, None) == QwenImageDiTConfig(**LAYERED)
    plain = {k: v for k, v in state.items() if k != ADDITIONAL_T_KEY}
    assert config_from_state(plain, None) == QwenImageDiTConfig()


def test_json_that_denies_the_embedding_is_an_error():
    with torch.device("meta"):
        state = QwenImageDiT(QwenImageDiTConfig(**LAYERED)).state_dict()
    with pytest.raises(ConfigError, match="use_additional_t_cond"):
        config_from_state(state, {**LAYERED_CONFIG_JSON, "use_additional_t_cond": False})


def test_full_size_layered_keys_are_qwen_image_plus_the_embedding():
    """The recorded official Qwen-Image keys, and the one tensor Layered adds (diffusers' names)."""
    official = json.loads(KEYS_FILE.read_text())
    with torch.device("meta"):
        ours = {k: list(v.shape) for k, v in QwenImageDiT(QwenImageDiTConfig(**LAYERED)).state_dict().items()}
    assert ours == {**official, ADDITIONAL_T_KEY: [2, 3072]}


# ------------------------------------------------------------------ RoPE and inputs
def test_layer3d_rope_puts_the_input_image_at_frame_minus_one_and_text_after_the_frames():
    axes = (4, 6, 6)
    shapes = layered_shapes(5, 2, 2)  # 5 generated frames of 2x2 tokens: the frame count beats the half size
    img, txt = msrope_angles(shapes, 3, axes, torch.device("cpu"), layer3d=True)
    frame = img[:, :2]  # the frame axis' lowest frequency (1.0): the angle is the position itself
    assert frame[:, 0].reshape(6, 4)[:, 0].tolist() == [0, 1, 2, 3, 4, -1]
    assert txt[:, 0].tolist() == [5, 6, 7]  # starts at max(half size 1, 5 generated frames)
    plain_img, plain_txt = msrope_angles(shapes, 3, axes, torch.device("cpu"))
    assert plain_img[:, 0].reshape(6, 4)[:, 0].tolist() == [0, 1, 2, 3, 4, 5] and plain_txt[0, 0] == 1


def test_layered_input_image_must_be_one_frame():
    with pytest.raises(ValueError, match="one"):
        msrope_angles([(1, 2, 2), (2, 2, 2)], 3, (4, 6, 6), torch.device("cpu"), layer3d=True)


def test_additional_t_cond_is_required_checked_and_refused_elsewhere():
    x, t, text, mask, _ = T.inputs(text_lengths=(5,), shapes=layered_shapes(2, 2, 2))
    shapes = layered_shapes(2, 2, 2)
    with torch.no_grad():
        with pytest.raises(ValueError, match="needs additional_t_cond"):
            layered_model()(x, t, text, mask, shapes)
        with pytest.raises(ValueError, match="0 or 1"):
            layered_model()(x, t, text, mask, shapes, additional_t_cond=torch.tensor([2]))
        with pytest.raises(ValueError, match="no additional timestep embedding"):
            T.make_model()(x, t, text, mask, shapes, additional_t_cond=torch.tensor([0]))
        zero, one = (layered_model()(x, t, text, mask, shapes, additional_t_cond=c) for c in (0, 1))
    assert (zero - one).abs().max() > 1e-3  # the embedding matters


def test_the_additional_embedding_trains():
    model = layered_model()
    x, t, text, mask, _ = T.inputs(text_lengths=(5,), shapes=layered_shapes(2, 2, 2))
    model(x, t, text, mask, layered_shapes(2, 2, 2), additional_t_cond=torch.tensor([1])).square().mean().backward()
    grad = model.time_text_embed.addition_t_embedding.weight.grad
    assert grad[0].abs().max() == 0 and grad[1].abs().max() > 0  # only the entry used


# ------------------------------------------------------------------ parity with diffusers
CASES = [
    ((7,), layered_shapes(3, 4, 4), (0,)),  # 2 layers (+ the whole image) and the input image
    ((4, 9), layered_shapes(5, 2, 2), (0, 1)),  # frame count above the half size; padded text; both entries
    ((6,), layered_shapes(2, 4, 6), (1,)),  # one layer, a non-square grid
]


@pytest.mark.parity
@pytest.mark.parametrize(("text_lengths", "shapes", "cond"), CASES)
def test_layered_dit_matches_diffusers(one_thread, text_lengths, shapes, cond):
    pytest.importorskip("diffusers")
    ours = layered_model()
    reference = T.reference_dit(ours.config, **LAYERED)
    reference.load_state_dict(ours.state_dict(), strict=True)
    x, t, text, mask, img_shapes = T.inputs(text_lengths=text_lengths, shapes=shapes, seed=4)
    additional = torch.tensor(cond)
    with torch.no_grad():
        got = ours(x, t, text, mask, img_shapes, additional_t_cond=additional)
        want = reference(
            hidden_states=x,
            encoder_hidden_states=text,
            encoder_hidden_states_mask=mask,
            timestep=t,
            img_shapes=img_shapes,
            additional_t_cond=additional,
            return_dict=False,
        )[0]
    assert want.abs().max() > 0.1
    assert (got - want).abs().max().item() <= 1e-5


@pytest.mark.parity
def test_full_size_layered_keys_and_shapes_match_diffusers_on_meta():
    pytest.importorskip("diffusers")
    from diffusers import QwenImageTransformer2DModel

    fields = {k: v for k, v in LAYERED_CONFIG_JSON.items() if not k.startswith("_")}
    with torch.device("meta"):
        reference = QwenImageTransformer2DModel(**fields)
        ours = QwenImageDiT(config_from_state({}, LAYERED_CONFIG_JSON))
    theirs = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == theirs
    assert list(ours.state_dict()) == list(theirs)
