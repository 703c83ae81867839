"""FLUX.1 DiT: conformance suite, released config, Kontext-style token lists and input checks."""

from __future__ import annotations

import pytest
import torch
from diffsynth_flux_test_helpers import (
    cached_calls,
    dit_inputs,
    image_ids,
    make_dit,
    reused_call_reference,
    tiny_dit_config,
)

from diffsynth.flux.flux1 import dit as dit_module
from diffsynth.flux.flux1.dit import Flux1DiT, Flux1DiTConfig
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.step_cache import TeaCache
from diffsynth.runtime.testing import conformance as cf


# ------------------------------------------------------------------ config
def test_default_config_is_flux1_dev():
    cfg = Flux1DiTConfig()
    assert (cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.depth, cfg.depth_single_blocks) == (3072, 24, 128, 19, 38)
    assert (cfg.in_channels, cfg.out_channels, cfg.context_in_dim, cfg.vec_in_dim) == (64, 64, 4096, 768)
    assert cfg.mlp_hidden_dim == 12288 and cfg.axes_dim == (16, 56, 56) and cfg.theta == 10000.0
    assert cfg.qkv_bias and cfg.guidance_embed


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"hidden_size": 33}, "hidden_size"),
        ({"axes_dim": (4, 6, 8)}, "axes_dim"),
        ({"axes_dim": (5, 5, 6)}, "axes_dim"),
        ({"depth": -1}, "depth"),
        ({"in_channels": 0}, "in_channels"),
        ({"mlp_ratio": 0.0}, "mlp_ratio"),
        ({"theta": 0.0}, "theta"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_dit_config(**overrides)


# ------------------------------------------------------------------ conformance suite
def test_forward_shape_and_dtype():
    args = dit_inputs()
    cf.check_forward(make_dit, args, expected_shapes=[args[0].shape])


def test_forward_bfloat16_keeps_dtype():
    img, *rest = dit_inputs()
    cf.check_forward(lambda: make_dit().to(torch.bfloat16), (img.bfloat16(), *rest), expected_shapes=[img.shape])


def test_backward_reaches_every_parameter():
    cf.check_backward(make_dit, dit_inputs())


def test_gradient_checkpointing_gives_same_output_and_grads():
    cf.check_gradient_checkpointing(make_dit, dit_inputs(), atol=1e-6)


def test_meta_build_and_assign_load_are_identical():
    cf.check_meta_load(make_dit, dit_inputs())


def test_declared_units_exist():
    cf.check_declared_units(make_dit)
    assert Flux1DiT.offload_units == Flux1DiT.compile_units == ("double_blocks", "single_blocks")


def test_released_model_builds_on_meta_with_12b_parameters():
    with torch.device("meta"):
        model = Flux1DiT()
    cf.check_declared_units(model)
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 2) == 11.90


# ------------------------------------------------------------------ behaviour
def test_batch_equals_each_sample_alone():
    model = make_dit().eval()
    args = dit_inputs(batch=3)
    with torch.no_grad():
        batch = model(*args)
        for i in range(3):
            img, img_ids, txt, txt_ids, t, y, g = args
            alone = model(img[i : i + 1], img_ids, txt[i : i + 1], txt_ids, t[i : i + 1], y[i : i + 1], g[i : i + 1])
            torch.testing.assert_close(batch[i : i + 1], alone, atol=1e-5, rtol=1e-5)


def test_kontext_reference_tokens_of_any_length_and_per_sample_ids():
    """Kontext appends reference-image tokens (ids first axis 1) to `img`; output covers all tokens."""
    model = make_dit().eval()
    img, img_ids, txt, txt_ids, t, y, g = dit_inputs(batch=2, grid=(4, 4))
    ref = torch.randn(2, 3 * 5, 16, generator=torch.Generator().manual_seed(5))
    joint = torch.cat([img, ref], dim=1)
    joint_ids = torch.cat([img_ids, image_ids(3, 5, first=1.0)], dim=1)
    with torch.no_grad():
        out = model(joint, joint_ids, txt, txt_ids, t, y, g)
        per_sample = model(joint, joint_ids.expand(2, -1, -1), txt, txt_ids.expand(2, -1, -1), t, y, g)
        unbatched_ids = model(joint, joint_ids[0], txt, txt_ids[0], t, y, g)
        without_ref = model(img, img_ids, txt, txt_ids, t, y, g)
    assert out.shape == (2, 31, 16)
    assert torch.equal(out, per_sample) and torch.equal(out, unbatched_ids)
    assert (out[:, :16] - without_ref).abs().max() > 1e-4  # the reference tokens are attended to


def test_positions_move_the_output():
    model = make_dit().eval()
    img, img_ids, *rest = dit_inputs()
    with torch.no_grad():
        a = model(img, img_ids, *rest)
        b = model(img, img_ids + torch.tensor([0.0, 1.0, 0.0]), *rest)
    assert (a - b).abs().max() > 1e-4


def test_scalar_timestep_and_guidance_broadcast():
    model = make_dit().eval()
    img, img_ids, txt, txt_ids, _, y, _ = dit_inputs()
    with torch.no_grad():
        per_sample = model(img, img_ids, txt, txt_ids, torch.full((2,), 0.5), y, torch.full((2,), 3.5))
        scalar = model(img, img_ids, txt, txt_ids, 0.5, y, 3.5)
    assert torch.equal(per_sample, scalar)


def test_schnell_style_model_without_guidance_embedder():
    cfg = tiny_dit_config(guidance_embed=False)
    model = make_dit(cfg).eval()
    assert model.guidance_in is None and not any(k.startswith("guidance_in") for k in model.state_dict())
    img, img_ids, txt, txt_ids, t, y, _ = dit_inputs()
    with torch.no_grad():
        assert torch.equal(model(img, img_ids, txt, txt_ids, t, y), model(img, img_ids, txt, txt_ids, t, y, 4.0))


def test_guidance_distilled_model_needs_guidance():
    img, img_ids, txt, txt_ids, t, y, _ = dit_inputs()
    with pytest.raises(ValueError, match="guidance"):
        make_dit()(img, img_ids, txt, txt_ids, t, y)


def test_attention_goes_through_the_runtime_entry_point(monkeypatch):
    calls = []

    def spy(q, k, v, mask=None, scale=None, **options):
        calls.append(tuple(q.shape))
        return original(q, k, v, mask, scale, **options)

    original = dit_module.attention
    monkeypatch.setattr(dit_module, "attention", spy)
    with torch.no_grad():
        make_dit()(*dit_inputs())
    assert calls == [(2, 7 + 16, 2, 16)] * 4  # 2 double + 2 single blocks, joint [text, image] sequence


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({0: torch.zeros(2, 16, 15)}, "img has shape"),
        ({2: torch.zeros(2, 7, 31)}, "txt has shape"),
        ({5: torch.zeros(2, 23)}, "y has shape"),
        ({1: torch.zeros(1, 15, 3)}, "img_ids"),
        ({3: torch.zeros(1, 7, 2)}, "txt_ids"),
    ],
)
def test_bad_inputs_raise_clear_errors(change, message):
    args = list(dit_inputs())
    for index, value in change.items():
        args[index] = value
    with pytest.raises(ValueError, match=message):
        make_dit()(*args)


# ------------------------------------------------------------------ first-block cache
def controlnet_samples(cfg, seed=3, tokens=16) -> dict:
    """ControlNet residuals for every block list the config has (fewer samples than blocks: they are spread)."""
    g = torch.Generator().manual_seed(seed)
    samples = {}
    if cfg.depth:
        samples["controlnet_block_samples"] = [torch.randn(2, tokens, cfg.hidden_size, generator=g)]
    if cfg.depth_single_blocks:
        samples["controlnet_single_block_samples"] = [torch.randn(1, tokens, cfg.hidden_size, generator=g)]
    return samples


@pytest.mark.parametrize(
    ("overrides", "controlnet"),
    [({}, False), ({}, True), ({"depth": 0}, True)],
    ids=["double+single", "controlnet", "single-only"],
)
def test_first_block_cache_hook(overrides, controlnet):
    """The cache spans both block lists (head: the first double block, or the first single one without them).
    With ControlNet residuals a reused call reuses the residuals of the blocks it skips: fed the same input it
    gives the full call's output (adding this step's residuals again would count them twice)."""
    cfg = tiny_dit_config(**overrides)
    cf.check_first_block_cache(
        lambda: make_dit(cfg),
        dit_inputs(config=cfg),
        controlnet_samples(cfg) if controlnet else None,
        other_args=dit_inputs(seed=2, config=cfg),
        blocks=("double_blocks", "single_blocks"),
    )


@pytest.mark.parametrize("controlnet", [False, True], ids=["plain", "controlnet"])
def test_tea_cache_hook(controlnet):
    """The indicator is the first double block's modulated image input, which exists only inside that block:
    a reused call runs that block alone (for the indicator) and reuses every block's residual, ControlNet's
    included."""
    cfg = tiny_dit_config()
    cf.check_tea_cache(
        lambda: make_dit(cfg),
        dit_inputs(config=cfg),
        controlnet_samples(cfg) if controlnet else None,
        other_args=dit_inputs(seed=2, config=cfg),
        blocks=("double_blocks", "single_blocks"),
        indicator_blocks=1,
    )


def test_tea_cache_needs_a_double_block():
    cfg = tiny_dit_config(depth=0)
    model = make_dit(cfg).eval()
    model.step_cache = cache = TeaCache(1.0, (1.0, 0.0))
    cache.begin_loop(3)
    cache.begin_step()
    with torch.no_grad(), pytest.raises(ConfigError, match="TeaCache on FLUX.1 needs a double block"):
        model(*dit_inputs(config=cfg))


def test_first_block_cache_reuses_what_the_later_blocks_added():
    model = make_dit().eval()
    full, reused = dit_inputs(), dit_inputs(seed=2)
    want = reused_call_reference(model, full, reused, n_txt=full[2].shape[1])
    (_, got), cache = cached_calls(model, float("inf"), [full, reused])
    assert (cache.calls, cache.skipped) == (2, 1)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    with torch.no_grad():
        assert (got - model(*reused)).abs().max() > 1e-3  # the reuse did change the output


def test_first_block_cache_with_kontext_tokens_and_an_attention_mask():
    """Kontext's reference tokens ride in the image stream and an EliGen-style mask reaches the first block:
    same shapes as uncached, and a repeated input is reused exactly."""
    img, ids, txt, txt_ids, t, y, g = dit_inputs()
    ref = torch.randn(2, 6, img.shape[-1], generator=torch.Generator().manual_seed(4))
    args = (torch.cat([img, ref], 1), torch.cat([ids, image_ids(2, 3, first=1.0)], 1), txt, txt_ids, t, y, g)
    mask = torch.rand(1, 1, 7 + 22, 7 + 22, generator=torch.Generator().manual_seed(5)) > 0.2
    model = make_dit().eval()
    with torch.no_grad():
        plain = model(*args, attn_mask=mask)
    outs, cache = cached_calls(model, 0.0, [(*args, None, None, mask)] * 2)
    assert (cache.calls, cache.skipped) == (2, 1)  # an identical input is reused even at threshold 0
    for out in outs:
        assert out.shape == (2, 22, 16)
        torch.testing.assert_close(out, plain, atol=1e-5, rtol=0)
