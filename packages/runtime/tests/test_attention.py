"""The attention entry point against an explicit softmax computation, with every mask form."""

import math

import pytest
import torch

from diffsynth.runtime.attention import attention, selected_backend
from diffsynth.runtime.errors import ConfigError


def explicit(q, k, v, keep=None):
    """softmax(q k^T / sqrt(d)) v on [B, S, H, D], `keep` a bool [B, H|1, Sq, Sk] mask."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


@pytest.fixture
def qkv():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 5, 3, 8, generator=g) for _ in range(3)]


def test_unmasked_equals_softmax(qkv):
    torch.testing.assert_close(attention(*qkv), explicit(*qkv), atol=1e-5, rtol=1e-5)


def test_key_padding_mask(qkv):
    keep = torch.tensor([[True] * 5, [True, True, True, False, False]])
    expected = explicit(*qkv, keep[:, None, None, :].expand(2, 1, 5, 5))
    torch.testing.assert_close(attention(*qkv, mask=keep), expected, atol=1e-5, rtol=1e-5)
    # padded keys really are ignored: changing them changes nothing
    q, k, v = qkv
    k2, v2 = k.clone(), v.clone()
    k2[1, 3:] += 100
    v2[1, 3:] -= 100
    torch.testing.assert_close(attention(q, k2, v2, mask=keep), attention(q, k, v, mask=keep), atol=1e-5, rtol=1e-5)


def test_three_and_four_dimensional_masks(qkv):
    keep = torch.rand(2, 5, 5, generator=torch.Generator().manual_seed(1)) > 0.3
    keep[..., 0] = True  # every query sees at least one key
    expected = explicit(*qkv, keep[:, None])
    torch.testing.assert_close(attention(*qkv, mask=keep), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attention(*qkv, mask=keep[:, None]), expected, atol=1e-5, rtol=1e-5)


def test_unknown_backend_is_rejected(monkeypatch):
    monkeypatch.setenv("DIFFSYNTH_ATTENTION", "warp-drive")
    with pytest.raises(ConfigError, match="warp-drive"):
        selected_backend()


def test_missing_backend_falls_back_to_sdpa(monkeypatch, qkv):
    monkeypatch.setenv("DIFFSYNTH_ATTENTION", "sage")
    monkeypatch.setattr("diffsynth.runtime.attention._available", lambda name: name == "sdpa")
    assert selected_backend() == "sdpa"
    torch.testing.assert_close(attention(*qkv), explicit(*qkv), atol=1e-5, rtol=1e-5)
