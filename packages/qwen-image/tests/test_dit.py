"""Qwen-Image DiT: conformance suite, config validation, masks, edit sequences and input checks."""

from __future__ import annotations

import pytest
import torch

from diffsynth.qwen_image.dit import QwenImageDiT, QwenImageDiTConfig, msrope_angles
from diffsynth.runtime.testing import conformance as cf
from diffsynth.runtime.testing.weights import random_weights


def tiny_config(**overrides) -> QwenImageDiTConfig:
    """The one place tiny Qwen-Image DiT sizes live (other test modules load it from here)."""
    fields = dict(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        axes_dims_rope=(4, 6, 6),
    )
    return QwenImageDiTConfig(**{**fields, **overrides})


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Seeded random weights everywhere, norm weights near 1 (see `random_weights`)."""
    return random_weights(model, seed)


def reference_dit(cfg: QwenImageDiTConfig, **extra):
    """diffusers' `QwenImageTransformer2DModel` at `cfg`'s sizes (random weights; the caller loads ours)."""
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel(
        patch_size=cfg.patch_size,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        num_layers=cfg.num_layers,
        attention_head_dim=cfg.attention_head_dim,
        num_attention_heads=cfg.num_attention_heads,
        joint_attention_dim=cfg.joint_attention_dim,
        axes_dims_rope=tuple(cfg.axes_dims_rope),
        **extra,
    ).eval()


def make_model(config: QwenImageDiTConfig | None = None, seed: int = 0) -> QwenImageDiT:
    return randomize(QwenImageDiT(config or tiny_config()), seed)


def inputs(text_lengths=(5, 9), shapes=((1, 4, 6),), seed=1, channels=16, text_dim=32):
    """Packed latents, sigma, padded text, its mask and per-sample img_shapes."""
    g = torch.Generator().manual_seed(seed)
    b, n_txt = len(text_lengths), max(text_lengths)
    n_img = sum(f * h * w for f, h, w in shapes)
    x = torch.randn(b, n_img, channels, generator=g)
    t = torch.rand(b, generator=g)
    text = torch.randn(b, n_txt, text_dim, generator=g)
    mask = torch.arange(n_txt)[None] < torch.tensor(text_lengths)[:, None]
    return x, t, text, mask, [list(shapes)] * b


# ------------------------------------------------------------------ config
def test_default_config_is_the_released_checkpoint():
    cfg = QwenImageDiTConfig()
    assert (cfg.patch_size, cfg.in_channels, cfg.out_channels, cfg.num_layers) == (2, 64, 16, 60)
    assert (cfg.attention_head_dim, cfg.num_attention_heads, cfg.joint_attention_dim) == (128, 24, 3584)
    assert cfg.axes_dims_rope == (16, 56, 56) and cfg.zero_cond_t is False
    assert cfg.inner_dim == 3072 and cfg.out_dim == 64


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"axes_dims_rope": (16, 56, 50)}, "axes_dims_rope"),
        ({"num_layers": 0}, "num_layers"),
        ({"guidance_embeds": True}, "guidance_embeds"),
    ],
)
def test_invalid_config_names_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        QwenImageDiTConfig(**changes)


# ------------------------------------------------------------------ conformance
@pytest.mark.parametrize("zero_cond_t", [False, True])
def test_forward_shapes(zero_cond_t):
    cfg = tiny_config(zero_cond_t=zero_cond_t)
    x, t, text, mask, shapes = inputs(shapes=((1, 4, 6), (1, 2, 4)))
    cf.check_forward(lambda: make_model(cfg), (x, t, text, mask, shapes), expected_shapes=[(2, x.shape[1], 16)])


def test_backward_and_gradient_checkpointing():
    args = inputs()
    last = tiny_config().num_layers - 1
    # the last block's text stream output is discarded (as in the reference)
    unused = [
        f"transformer_blocks.{last}.{m}.{p}"
        for m in ("attn.to_add_out", "txt_mlp.net.0.proj", "txt_mlp.net.2")
        for p in ("weight", "bias")
    ]
    cf.check_backward(make_model, args, allow_unused=unused)
    cf.check_gradient_checkpointing(make_model, args)


def test_meta_load_and_declared_units():
    cf.check_meta_load(make_model, inputs())
    cf.check_declared_units(make_model)


@pytest.mark.parametrize("edit", [False, True], ids=["text-to-image", "edit-zero-cond-t"])
def test_first_block_cache_hook(edit):
    """Over `transformer_blocks`; edit references ride in the image stream, and the two call positions
    (positive, negative prompt) keep their own states even with texts of other lengths."""
    shapes = ((1, 4, 6), (1, 2, 4)) if edit else ((1, 4, 6),)
    cf.check_first_block_cache(
        lambda: make_model(tiny_config(zero_cond_t=edit, num_layers=3)),
        inputs(shapes=shapes),
        other_args=inputs(text_lengths=(3, 12), shapes=shapes, seed=2),
        blocks=("transformer_blocks",),
    )


# ------------------------------------------------------------------ behaviour
def test_padded_text_does_not_change_a_sample():
    """A sample alone equals the same sample inside a batch with longer (masked) text."""
    model = make_model().eval()
    x, t, text, mask, shapes = inputs(text_lengths=(5, 9))
    with torch.no_grad():
        batched = model(x, t, text, mask, shapes)
        alone = model(x[:1], t[:1], text[:1], mask[:1], shapes[:1])
    # RoPE text positions depend on the padded length only through tokens that are masked out
    torch.testing.assert_close(batched[:1, :], alone, atol=1e-5, rtol=0)


def test_zero_cond_t_only_matters_for_reference_tokens():
    """With one image per sample there are no reference tokens, so zero_cond_t changes nothing."""
    args = inputs()
    with torch.no_grad():
        plain = make_model(tiny_config()).eval()(*args)
        zero = make_model(tiny_config(zero_cond_t=True)).eval()(*args)
    torch.testing.assert_close(zero, plain, atol=1e-6, rtol=0)


def test_msrope_positions():
    """Rows/columns centred on zero, edit image on frame 1, text after max(h, w) // 2."""
    img, txt = msrope_angles([(1, 2, 4), (1, 2, 2)], 3, (2, 2, 2), torch.device("cpu"))
    # with one frequency per axis (theta**0 = 1) the angles are the positions themselves
    assert img[:8, 0].tolist() == [0] * 8
    assert img[:8, 1].tolist() == [-1] * 4 + [0] * 4
    assert img[:4, 2].tolist() == [-2, -1, 0, 1]
    assert img[8:, 0].tolist() == [1] * 4 and img[8:, 2].tolist() == [-1, 0, -1, 0]
    assert txt.tolist() == [[2, 2, 2], [3, 3, 3], [4, 4, 4]]


def test_img_shapes_must_cover_the_latents():
    x, t, text, mask, _ = inputs()
    with pytest.raises(ValueError, match="img_shapes"):
        make_model()(x, t, text, mask, [[(1, 4, 5)]] * 2)
    with pytest.raises(ValueError, match="img_shapes"):
        make_model()(x, t, text, mask, None)
