"""Wan DiT: conformance suite for T2V / I2V / TI2V, timestep and context conventions, input checks."""

from __future__ import annotations

import pytest
import torch

from diffsynth.runtime.testing import conformance as cf
from diffsynth.runtime.testing.weights import random_weights
from diffsynth.wan.dit import WanDiT, WanDiTConfig

LATENT_SIZE = (3, 4, 6)  # (F, H, W): a 3 x 2 x 3 patch grid, every axis a different length
KINDS = ("t2v", "i2v", "ti2v")


def tiny_config(kind: str = "t2v", **overrides) -> WanDiTConfig:
    """The one place tiny Wan DiT sizes live (other test modules load it from here).

    `i2v` is Wan 2.1 I2V (y channels + CLIP input); `i2v_noclip` is Wan2.2-I2V-A14B (y only);
    `ti2v` has the T2V architecture (its difference is per-token timesteps).
    """
    fields = dict(dim=32, ffn_dim=64, num_heads=2, num_layers=2, in_dim=4, out_dim=4, text_dim=32, freq_dim=32)
    if kind in ("i2v", "i2v_noclip"):
        fields.update(in_dim=8, model_type="i2v", has_image_input=kind == "i2v")
        if kind == "i2v":
            fields["image_dim"] = 24
    elif kind == "ti2v":
        fields.update(model_type="ti2v")
    return WanDiTConfig(**{**fields, **overrides})


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Seeded random weights everywhere, norm weights near 1 (see `random_weights`)."""
    return random_weights(model, seed)


def make_model(config: WanDiTConfig | str | None = None, seed: int = 0) -> WanDiT:
    if isinstance(config, str) or config is None:
        config = tiny_config(config or "t2v")
    return randomize(WanDiT(config), seed)


def inputs(kind: str = "t2v", batch: int = 2, size=LATENT_SIZE, context_len: int = 7, seed: int = 1):
    """`(args, kwargs)` for a forward call: timesteps in [0, 1000]; TI2V gets t=0 on the first frame."""
    cfg = tiny_config(kind)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.out_dim, *size, generator=g)
    t = torch.rand(batch, generator=g) * 1000
    context = torch.randn(batch, context_len, cfg.text_dim, generator=g)
    kwargs = {}
    if kind in ("i2v", "i2v_noclip"):
        kwargs["y"] = torch.randn(batch, cfg.in_dim - cfg.out_dim, *size, generator=g)
    if kind == "i2v":
        kwargs["clip_feature"] = torch.randn(batch, 5, cfg.image_dim, generator=g)
    if kind == "ti2v":
        grid = [s // p for s, p in zip(size, cfg.patch_size, strict=True)]
        tokens, first_frame = grid[0] * grid[1] * grid[2], grid[1] * grid[2]
        t = t[:, None].repeat(1, tokens)
        t[:, :first_frame] = 0
    return (x, t, context), kwargs


# ------------------------------------------------------------------ config
def test_default_config_is_wan21_t2v_14b():
    cfg = WanDiTConfig()
    assert (cfg.dim, cfg.ffn_dim, cfg.num_heads, cfg.num_layers, cfg.head_dim) == (5120, 13824, 40, 40, 128)
    assert (cfg.in_dim, cfg.out_dim, cfg.text_dim, cfg.freq_dim, cfg.text_len) == (16, 16, 4096, 256, 512)
    assert cfg.patch_size == cfg.patch == (1, 2, 2) and cfg.eps == 1e-6 and cfg.rope_theta == 10000.0
    assert cfg.model_type == "t2v" and not cfg.has_image_input
    assert cfg.rope_axes_dims == (44, 42, 42)
    assert tiny_config().rope_axes_dims == (8, 4, 4)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"dim": 33}, "dim"),
        ({"num_heads": 0}, "num_heads"),
        ({"num_heads": 8}, "head_dim"),  # head_dim 4: too small for three even rotary axes
        ({"num_layers": -1}, "num_layers"),
        ({"patch_size": (1, 2)}, "patch_size"),
        ({"model_type": "flf2v"}, "model_type"),
        ({"has_image_input": True}, "has_image_input"),  # image input on a t2v model
        ({"eps": 0.0}, "eps"),
        ({"freq_dim": 33}, "freq_dim"),
        ({"text_len": 0}, "text_len"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


# ------------------------------------------------------------------ conformance suite
@pytest.mark.parametrize("kind", [*KINDS, "i2v_noclip"])
def test_forward_shape_and_dtype(kind):
    args, kwargs = inputs(kind)
    cf.check_forward(lambda: make_model(kind), args, kwargs, expected_shapes=[args[0].shape])


def test_forward_bfloat16_keeps_dtype():
    (x, t, context), kwargs = inputs("i2v")
    kwargs = {k: v.bfloat16() for k, v in kwargs.items()}
    factory = lambda: make_model("i2v").to(torch.bfloat16)  # noqa: E731
    cf.check_forward(factory, (x.bfloat16(), t, context.bfloat16()), kwargs, expected_shapes=[x.shape])


@pytest.mark.parametrize("kind", ["i2v", "ti2v"])
def test_backward_reaches_every_parameter(kind):
    args, kwargs = inputs(kind)
    cf.check_backward(lambda: make_model(kind), args, kwargs)


@pytest.mark.parametrize("kind", ["i2v", "ti2v"])
def test_gradient_checkpointing_gives_same_output_and_grads(kind):
    args, kwargs = inputs(kind)
    cf.check_gradient_checkpointing(lambda: make_model(kind), args, kwargs, atol=1e-6)


@pytest.mark.parametrize("kind", ["i2v", "ti2v"])
def test_meta_build_and_assign_load_are_identical(kind):
    args, kwargs = inputs(kind)
    cf.check_meta_load(lambda: make_model(kind), args, kwargs)


def test_declared_units_exist():
    cf.check_declared_units(lambda: make_model("i2v"))
    assert WanDiT.offload_units == WanDiT.compile_units == ("blocks",)
    assert WanDiT.lora_target_modules == ("q", "k", "v", "o", "ffn.0", "ffn.2")
    assert make_model().gradient_checkpointing is False


def test_image_input_decides_the_clip_modules():
    assert "img_emb.proj.1.weight" in make_model("i2v").state_dict()
    assert "blocks.0.cross_attn.k_img.weight" in make_model("i2v").state_dict()
    noclip = make_model("i2v_noclip").state_dict()
    assert not any("img" in k for k in noclip) and noclip["patch_embedding.weight"].shape[1] == 8


# ------------------------------------------------------------------ first-block cache
@pytest.mark.parametrize("kind", KINDS)
def test_first_block_cache_hook(kind):
    args, kwargs = inputs(kind)
    other = inputs(kind, seed=2)[0]
    cf.check_first_block_cache(lambda: make_model(kind), args, kwargs, other_args=other, blocks=("blocks",))


@pytest.mark.parametrize("kind", KINDS)
def test_tea_cache_hook(kind):
    """The indicator (the time modulation) is computed before the blocks: a reused call runs none."""
    args, kwargs = inputs(kind)
    other = inputs(kind, seed=2)[0]
    cf.check_tea_cache(lambda: make_model(kind), args, kwargs, other_args=other, blocks=("blocks",))


def test_tea_cache_indicator_weighs_each_modulation_row_by_its_tokens():
    """Per-token timesteps (TI2V: the first frame at 0) are embedded once per value; the indicator's relative
    change equals that of the `[B, tokens, 6, dim]` table DiffSynth-Studio compares."""
    from diffsynth.wan.dit import tea_cache_indicator

    g = torch.Generator().manual_seed(0)
    e1, e2 = torch.randn(3, 6, 4, generator=g), torch.randn(3, 6, 4, generator=g)
    index = torch.tensor([[0, 1, 1, 1, 1, 1], [0, 2, 2, 2, 2, 2]])  # rows used 2, 5 and 5 times
    full1, full2 = e1[index], e2[index]
    want = (full2 - full1).abs().mean() / full1.abs().mean()
    w1, w2 = tea_cache_indicator(e1, index), tea_cache_indicator(e2, index)
    got = (w2 - w1).abs().sum() / w1.abs().sum()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert (got - (e2 - e1).abs().mean() / e1.abs().mean()).abs() > 1e-3  # unweighted rows would differ


def test_first_block_cache_reuses_the_rest_of_the_blocks():
    """A reused call = the first block's output + what the other blocks added on the full call (a reference
    built by hand from the model's own pieces: hooks on the first and last block), with the I2V extras."""
    from diffsynth.runtime.step_cache import FirstBlockCache

    model = make_model(tiny_config("i2v", num_layers=3)).eval()
    (x1, t, context), kwargs = inputs("i2v")
    x2 = inputs("i2v", seed=2)[0][0]
    seen = {}
    hooks = [
        model.blocks[0].register_forward_hook(lambda m, i, o: seen.__setitem__("first", o)),
        model.blocks[-1].register_forward_hook(lambda m, i, o: seen.__setitem__("last", o)),
    ]
    with torch.no_grad():
        model(x1, t, context, **kwargs)
        rest_residual = seen["last"] - seen["first"]
        for hook in hooks:
            hook.remove()
        kept = model.blocks
        model.blocks = kept[:1]
        hook = model.blocks[0].register_forward_hook(lambda m, i, o: o + rest_residual)
        want = model(x2, t, context, **kwargs)
        hook.remove()
        model.blocks = kept
        full = model(x2, t, context, **kwargs)

        cache = model.step_cache = FirstBlockCache(float("inf"))
        cache.begin_loop()
        for x in (x1, x2):
            cache.begin_step()
            got = model(x, t, context, **kwargs)
    assert (cache.calls, cache.skipped) == (2, 1)
    assert (got - full).abs().max() > 1e-4  # the reuse is an approximation, not the full call
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


# ------------------------------------------------------------------ conventions
@pytest.mark.parametrize("kind", ["t2v", "i2v"])
def test_batch_equals_each_sample_alone(kind):
    model = make_model(kind).eval()
    (x, t, context), kwargs = inputs(kind, batch=3)
    with torch.no_grad():
        batch = model(x, t, context, **kwargs)
        for i in range(3):
            alone = model(
                x[i : i + 1], t[i : i + 1], context[i : i + 1], **{k: v[i : i + 1] for k, v in kwargs.items()}
            )
            torch.testing.assert_close(batch[i : i + 1], alone, atol=1e-5, rtol=1e-5)


def test_timestep_forms_agree():
    """A scalar, a `[B]` vector and a constant per-token `[B, tokens]` table are the same call."""
    model = make_model("ti2v").eval()
    (x, _, context), _ = inputs("ti2v")
    tokens = 3 * 2 * 3
    with torch.no_grad():
        per_sample = model(x, torch.full((2,), 321.0), context)
        scalar = model(x, 321.0, context)
        per_token = model(x, torch.full((2, tokens), 321.0), context)
    assert torch.equal(scalar, per_sample)
    torch.testing.assert_close(per_token, per_sample, atol=1e-6, rtol=0)


def test_per_token_timesteps_reach_only_their_tokens_modulation():
    """Per-token t is embedded once per distinct value; changing the first frame's t changes the output."""
    model = make_model("ti2v").eval()
    (x, t, context), _ = inputs("ti2v")
    values, index = WanDiT._timestep_index(t, 2, t.shape[1], t.device)
    assert values.numel() == 3 and index.shape == t.shape  # 0 and one t per sample
    torch.testing.assert_close(values[index], t)
    with torch.no_grad():
        a = model(x, t, context)
        b = model(x, torch.where(t == 0, torch.full_like(t, 5.0), t), context)
    assert (a - b).abs().max() > 1e-3


def test_short_context_is_zero_padded_to_text_len():
    model = make_model().eval()
    (x, t, context), _ = inputs()
    padded = torch.nn.functional.pad(context, (0, 0, 0, 512 - context.shape[1]))
    with torch.no_grad():
        assert torch.equal(model(x, t, context), model(x, t, padded))
        shorter = model(x, t, context[:, :5])
    assert (shorter - model(x, t, padded)).abs().max() > 1e-4  # padding is attended: not a no-op


def test_rope_tables_follow_the_device_after_a_meta_build():
    with torch.device("meta"):
        model = WanDiT(tiny_config())
    model.load_state_dict(make_model().state_dict(), assign=True, strict=True)
    args, _ = inputs()
    assert torch.isfinite(model(*args)).all()


# ------------------------------------------------------------------ input errors
def _call(kind="t2v", **changes):
    (x, t, context), kwargs = inputs(kind)
    call = dict(x=x, timestep=t, context=context, **kwargs)
    call.update(changes)
    return make_model(kind)(**call)


@pytest.mark.parametrize(
    ("kind", "changes", "message"),
    [
        ("t2v", {"x": torch.zeros(2, 3, 3, 4, 6)}, "in_dim=4"),
        ("i2v_noclip", {"y": None}, "pass y"),
        ("i2v_noclip", {"y": torch.zeros(2, 4, 3, 4, 4)}, "must match x"),
        ("t2v", {"x": torch.zeros(2, 4, 3, 5, 6)}, "divisible"),
        ("t2v", {"x": torch.zeros(2, 4, 3, 4)}, "F, H, W"),
        ("t2v", {"timestep": torch.zeros(3)}, "batch of 2"),
        ("t2v", {"timestep": torch.zeros(2, 17)}, "per token"),
        ("t2v", {"context": torch.zeros(2, 513, 32)}, "text_len=512"),
        ("t2v", {"context": torch.zeros(2, 7, 16)}, "text_dim=32"),
        ("t2v", {"clip_feature": torch.zeros(2, 5, 24)}, "no image input"),
        ("i2v", {"clip_feature": None}, "pass clip_feature"),
        ("i2v", {"clip_feature": torch.zeros(2, 5, 12)}, "image_dim=24"),
    ],
)
def test_bad_inputs_raise_clear_errors(kind, changes, message):
    with pytest.raises(ValueError, match=message):
        _call(kind, **changes)
