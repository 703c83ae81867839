"""Z-Image DiT: conformance suite, batching invariance, pad tokens, masks and input checks."""

from __future__ import annotations

import pytest
import torch

from diffsynth.runtime.testing import conformance as cf
from diffsynth.runtime.testing.weights import random_weights
from diffsynth.z_image import dit as dit_module
from diffsynth.z_image.dit import ZImageDiT, ZImageDiTConfig


def tiny_config(**overrides) -> ZImageDiTConfig:
    """The one place tiny Z-Image DiT sizes live (other test modules load it from here)."""
    fields = dict(
        in_channels=4,
        dim=64,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=32,
        axes_dims=(8, 12, 12),
        axes_lens=(256, 64, 64),
    )
    return ZImageDiTConfig(**{**fields, **overrides})


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Seeded random weights everywhere, norm weights near 1 (see `random_weights`)."""
    return random_weights(model, seed)


def make_model(config: ZImageDiTConfig | None = None, seed: int = 0) -> ZImageDiT:
    return randomize(ZImageDiT(config or tiny_config()), seed)


def inputs(caption_lengths=(7, 40), size=(8, 10), seed=1, cap_dim=32, channels=4):
    g = torch.Generator().manual_seed(seed)
    b = len(caption_lengths)
    x = torch.randn(b, channels, *size, generator=g)
    t = torch.rand(b, generator=g)
    text = [torch.randn(n, cap_dim, generator=g) for n in caption_lengths]
    return x, t, text


# ------------------------------------------------------------------ config
def test_default_config_is_the_released_checkpoint():
    cfg = ZImageDiTConfig()
    assert (cfg.dim, cfg.n_heads, cfg.head_dim, cfg.n_layers, cfg.n_refiner_layers) == (3840, 30, 128, 30, 2)
    assert cfg.ffn_dim == 10240 and cfg.adaln_dim == 256 and cfg.patch_key == "2-1" and cfg.patch_dim == 64
    assert cfg.axes_lens == (1536, 512, 512)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"dim": 65}, "dim"),
        ({"n_kv_heads": 1}, "n_kv_heads"),
        ({"axes_dims": (8, 12, 14)}, "axes_dims"),
        ({"axes_dims": (9, 11, 12)}, "axes_dims"),
        ({"patch_size": 0}, "patch_size"),
        ({"n_layers": -1}, "n_layers"),
        ({"norm_eps": 0.0}, "norm_eps"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


# ------------------------------------------------------------------ conformance suite
def test_forward_shape_and_dtype():
    x, t, text = inputs()
    cf.check_forward(make_model, (x, t, text), expected_shapes=[x.shape])


def test_forward_bfloat16_keeps_dtype():
    x, t, text = inputs()
    cf.check_forward(lambda: make_model().to(torch.bfloat16), (x.bfloat16(), t, text), expected_shapes=[x.shape])


def test_backward_reaches_every_parameter():
    cf.check_backward(make_model, inputs())


def test_gradient_checkpointing_gives_same_output_and_grads():
    cf.check_gradient_checkpointing(make_model, inputs(), atol=1e-6)


def test_meta_build_and_assign_load_are_identical():
    cf.check_meta_load(make_model, inputs())


def test_declared_units_exist():
    cf.check_declared_units(make_model)
    assert ZImageDiT.offload_units == ("noise_refiner", "context_refiner", "layers")


def test_rope_tables_follow_the_device_after_a_meta_build():
    with torch.device("meta"):
        model = ZImageDiT(tiny_config())
    model.load_state_dict(make_model().state_dict(), assign=True, strict=True)
    x, t, text = inputs()
    assert torch.isfinite(model(x, t, text)).all()


# ------------------------------------------------------------------ batching and padding
@pytest.mark.parametrize("size", [(8, 8), (10, 12)])  # 16 image tokens (pad 16) / 30 (pad 2)
def test_batch_equals_each_sample_alone(size):
    model = make_model().eval()
    x, t, text = inputs(caption_lengths=(7, 40, 32, 1), size=size)
    with torch.no_grad():
        batch = model(x, t, text)
        for i in range(len(text)):
            alone = model(x[i : i + 1], t[i : i + 1], [text[i]])
            torch.testing.assert_close(batch[i : i + 1], alone, atol=1e-5, rtol=1e-5)


def _record_masks(monkeypatch) -> list:
    masks = []

    def spy(q, k, v, mask=None, scale=None, **options):
        masks.append(mask)
        return original(q, k, v, mask, scale, **options)

    original = dit_module.attention
    monkeypatch.setattr(dit_module, "attention", spy)
    return masks


def test_no_attention_mask_when_padded_lengths_agree(monkeypatch):
    masks = _record_masks(monkeypatch)
    with torch.no_grad():
        make_model()(*inputs(caption_lengths=(5, 30)))  # both pad to 32
    assert masks and all(m is None for m in masks)


def test_mask_only_covers_batch_padding(monkeypatch):
    masks = _record_masks(monkeypatch)
    with torch.no_grad():
        make_model()(*inputs(caption_lengths=(5, 40), size=(8, 8)))  # 32 vs 64 caption tokens
    image_masks, cap_masks, joint_masks = masks[:1], masks[1:2], masks[2:]
    assert image_masks == [None]  # same image size in a batch: the image refiner never needs one
    assert cap_masks[0].tolist() == [[True] * 32 + [False] * 32, [True] * 64]
    assert all(m.tolist() == [[True] * 64 + [False] * 32, [True] * 96] for m in joint_masks)


def test_pad_tokens_take_part_like_tokens():
    """Pad tokens only matter when a stream is not already a multiple of 32 tokens."""
    model = make_model().eval()
    aligned = inputs(caption_lengths=(32,), size=(8, 16))  # 32 caption, 32 image tokens
    ragged = inputs(caption_lengths=(7,), size=(8, 8))  # 25 caption pads, 16 image pads
    with torch.no_grad():
        before = [model(*aligned), model(*ragged)]
        model.x_pad_token.add_(1.0)
        model.cap_pad_token.add_(1.0)
        after = [model(*aligned), model(*ragged)]
    assert torch.equal(before[0], after[0])
    assert (before[1] - after[1]).abs().max() > 1e-3


def test_scalar_timestep_and_video_layout():
    model = make_model().eval()
    x, _, text = inputs(caption_lengths=(9, 9))
    with torch.no_grad():
        per_sample = model(x, torch.full((2,), 0.25), text)
        scalar = model(x, 0.25, text)
        video = model(x.unsqueeze(2), torch.full((2,), 0.25), text)
    assert torch.equal(per_sample, scalar)
    assert torch.equal(video.squeeze(2), per_sample)


# ------------------------------------------------------------------ input errors
@pytest.mark.parametrize(
    ("x_shape", "lengths", "cap_dim", "message"),
    [
        ((1, 3, 8, 8), (4,), 32, "channels"),
        ((1, 4, 7, 8), (4,), 32, "divisible"),
        ((2, 4, 8, 8), (4,), 32, "caption tensors"),
        ((1, 4, 8, 8), (0,), 32, "caption 0"),
        ((1, 4, 8, 8), (4,), 16, "cap_feat_dim"),
        ((1, 4, 8, 8), (300,), 32, "axes_lens"),
        ((1, 4, 8, 130), (4,), 32, "axes_lens"),
    ],
)
def test_bad_inputs_raise_clear_errors(x_shape, lengths, cap_dim, message):
    model = make_model()
    text = [torch.zeros(n, cap_dim) for n in lengths]
    with pytest.raises(ValueError, match=message):
        model(torch.zeros(x_shape), torch.zeros(x_shape[0]), text)


def test_first_block_cache_hook():
    cf.check_first_block_cache(make_model, inputs(), other_args=inputs(seed=2), blocks=("layers",))


def test_first_block_cache_reuses_the_rest_of_the_layers():
    """A reused step = the first main layer's output + what the other layers added on the full step
    (a reference built by hand from the model's own pieces: hooks on the first and last layer)."""
    from diffsynth.runtime.step_cache import FirstBlockCache

    model = make_model(tiny_config(n_layers=3)).eval()
    (x1, t, text), x2 = inputs(), inputs(seed=2)[0]
    seen = {}
    hooks = [
        model.layers[0].register_forward_hook(lambda m, i, o: seen.__setitem__("first", o)),
        model.layers[-1].register_forward_hook(lambda m, i, o: seen.__setitem__("last", o)),
    ]
    with torch.no_grad():
        model(x1, t, text)
        rest_residual = seen["last"] - seen["first"]
        for hook in hooks:
            hook.remove()
        kept = model.layers
        model.layers = kept[:1]
        model.layers[0].register_forward_hook(lambda m, i, o: o + rest_residual)
        want = model(x2, t, text)
        model.layers = kept
        model.layers[0]._forward_hooks.clear()

        cache = model.step_cache = FirstBlockCache(float("inf"))
        cache.begin_loop()
        for x in (x1, x2):
            cache.begin_step()
            got = model(x, t, text)
    assert cache.skipped == 1
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
