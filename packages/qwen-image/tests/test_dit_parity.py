"""Our Qwen-Image DiT against diffusers' `QwenImageTransformer2DModel` with the same weights (fp32, CPU)."""

from __future__ import annotations

import inspect

import pytest
import qwen_image_test_dit as T  # loaded by conftest
import torch

pytestmark = pytest.mark.parity


def _pair(zero_cond_t: bool):
    pytest.importorskip("diffusers")
    from diffusers import QwenImageTransformer2DModel

    if zero_cond_t and "zero_cond_t" not in inspect.signature(QwenImageTransformer2DModel.__init__).parameters:
        pytest.skip("this diffusers has no zero_cond_t")
    cfg = T.tiny_config(zero_cond_t=zero_cond_t)
    ours = T.make_model(cfg, seed=3).eval()
    extra = {"zero_cond_t": True} if zero_cond_t else {}
    reference = T.reference_dit(cfg, **extra)
    reference.load_state_dict(ours.state_dict(), strict=True)
    return ours, reference


@pytest.fixture(scope="module")
def models():
    return _pair(False)


@pytest.fixture(scope="module")
def models_zero_cond():
    return _pair(True)


def _compare(ours, reference, text_lengths, shapes, seed, masked=True):
    x, t, text, mask, img_shapes = T.inputs(text_lengths=text_lengths, shapes=shapes, seed=seed)
    mask = mask if masked else None
    with torch.no_grad():
        got = ours(x, t, text, mask, img_shapes)
        want = reference(
            hidden_states=x,
            encoder_hidden_states=text,
            encoder_hidden_states_mask=mask,
            timestep=t,
            img_shapes=img_shapes,
            return_dict=False,
        )[0]
    assert want.abs().max() > 0.1  # a vacuous comparison (all zeros) would prove nothing
    return (got - want).abs().max().item()


CASES = [
    ((7,), ((1, 4, 4),), False),  # single image, no mask
    ((7,), ((1, 6, 10),), True),  # single image, all-true mask
    ((3, 12), ((1, 5, 7),), True),  # batch of 2, padded text of different lengths
    ((9, 4), ((1, 4, 6), (1, 6, 4)), True),  # edit: target + one reference image
    ((6,), ((1, 4, 4), (1, 2, 2), (1, 8, 6)), True),  # edit: two reference images
]


@pytest.mark.parametrize(("text_lengths", "shapes", "masked"), CASES)
def test_matches_diffusers(models, text_lengths, shapes, masked):
    diff = _compare(*models, text_lengths, shapes, seed=sum(text_lengths), masked=masked)
    assert diff <= 1e-5, f"max abs diff {diff:.3g} vs diffusers for text {text_lengths}, images {shapes}"


@pytest.mark.parametrize(("text_lengths", "shapes", "masked"), CASES[2:])
def test_zero_cond_t_matches_diffusers(models_zero_cond, text_lengths, shapes, masked):
    diff = _compare(*models_zero_cond, text_lengths, shapes, seed=sum(text_lengths) + 1, masked=masked)
    assert diff <= 1e-5, f"zero_cond_t: max abs diff {diff:.3g} vs diffusers for text {text_lengths}, images {shapes}"
