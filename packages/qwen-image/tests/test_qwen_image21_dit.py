"""Qwen-Image 2.1 DiT: parity with diffusers' `QwenImage21Transformer2DModel` (fp32, CPU), the prefix KV cache,
conformance suite, checkpoint formats and input checks."""

from __future__ import annotations

import pytest
import torch

from diffsynth.qwen_image.dit import QwenImageDiT, QwenImageDiTConfig
from diffsynth.qwen_image.formats import DIT_SPEC
from diffsynth.qwen_image.qwen_image21.dit import PrefixCache, QwenImage21DiT, QwenImage21DiTConfig, plan_sequence
from diffsynth.qwen_image.qwen_image21.dit_formats import DIT21_SPEC, PREFIX, config_from_state
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.testing import conformance as cf
from diffsynth.runtime.testing.weights import random_weights

TOL = 1e-5


def tiny_config(**overrides) -> QwenImage21DiTConfig:
    """The one place tiny Qwen-Image 2.1 DiT sizes live."""
    fields = dict(
        in_channels=16,
        out_channels=8,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        context_in_dim=32,
        axes_dims_rope=(4, 6, 6),
    )
    return QwenImage21DiTConfig(**{**fields, **overrides})


def make_model(config: QwenImage21DiTConfig | None = None, seed: int = 0) -> QwenImage21DiT:
    return random_weights(QwenImage21DiT(config or tiny_config()), seed)


def prompt_layout(runs):
    """`image_slots` `[L_txt]` from runs: an int is that many text tokens, `(h, w)` a condition image's slots."""
    slots = []
    for run in runs:
        slots += [False] * run if isinstance(run, int) else [True] * (run[0] * run[1] // 4)
    return torch.tensor(slots)


def inputs(runs, target=(4, 6), lengths=None, batch=2, seed=0, channels=16, text_dim=32):
    """Inputs as the pipeline builds them: right-padded text of real `lengths` (None: no mask), the condition
    images in `runs` order, the target last."""
    g = torch.Generator().manual_seed(seed)
    slots = prompt_layout(runs)
    shapes = [(1, *run) for run in runs if not isinstance(run, int)] + [(1, *target)]
    n_img = sum(h * w for _, h, w in shapes)
    latents = torch.randn(batch, n_img, channels, generator=g)
    text = torch.randn(batch, len(slots), text_dim, generator=g)
    t = torch.rand(batch, generator=g)
    mask = None
    if lengths is not None:
        mask = torch.arange(len(slots))[None] < torch.tensor(lengths)[:, None]
        text = text * mask[..., None]  # padded positions hold zeros, as the pipeline's
    return latents, t, text, shapes, slots, mask


def reference_dit(cfg: QwenImage21DiTConfig):
    from diffusers import QwenImage21Transformer2DModel

    return QwenImage21Transformer2DModel(
        patch_size=cfg.patch_size,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        num_layers=cfg.num_layers,
        attention_head_dim=cfg.attention_head_dim,
        num_attention_heads=cfg.num_attention_heads,
        context_in_dim=cfg.context_in_dim,
        mlp_ratio=cfg.mlp_ratio,
        axes_dims_rope=tuple(cfg.axes_dims_rope),
        eps=cfg.eps,
        causal_condition=cfg.causal_condition,
    ).eval()


def reference_call(reference, latents, t, text, shapes, slots, mask, **cache):
    """diffusers' prediction for the target's tokens (its `img_mask` spans the target's slots too)."""
    n_target = shapes[-1][1] * shapes[-1][2]
    img_mask = torch.cat([slots, torch.ones(n_target // 4, dtype=torch.bool)])
    out = reference(
        hidden_states=latents,
        encoder_hidden_states=text,
        timestep=t,
        img_shapes=[list(shapes)] * latents.shape[0],
        img_mask=img_mask[None].expand(latents.shape[0], -1),
        encoder_hidden_states_mask=mask,
        return_dict=False,
        **cache,
    )[0]
    return out[:, -n_target:]


def _pair(**overrides):
    pytest.importorskip("diffusers")
    cfg = tiny_config(**overrides)
    ours = make_model(cfg, seed=3).eval()
    reference = reference_dit(cfg)
    reference.load_state_dict(ours.state_dict(), strict=True)
    return ours, reference


@pytest.fixture(scope="module")
def models():
    return _pair()


CASES = {
    "t2i_unmasked": dict(runs=[9], target=(4, 6), lengths=None),
    "t2i_batch2_padded": dict(runs=[12], target=(6, 4), lengths=[5, 12]),
    "two_conditions_text_around": dict(runs=[3, (2, 4), 2, (4, 6), 5], target=(4, 6), lengths=[18, 15]),
    "adjacent_conditions": dict(runs=[2, (2, 2), (2, 6), 4], target=(2, 8), lengths=[10, 8]),
    "condition_first": dict(runs=[(4, 2), 6], target=(6, 2), lengths=[3, 6]),
}


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert b.abs().max() > 0.1  # a vacuous comparison (all zeros) proves nothing
    return (a - b).abs().max().item()


@pytest.mark.parity
@pytest.mark.parametrize("case", list(CASES))
def test_matches_diffusers(models, case):
    ours, reference = models
    args = inputs(**CASES[case], seed=len(case))
    with torch.no_grad():
        got = ours(*args)
        want = reference_call(reference, *args)
    assert got.shape == want.shape
    assert _diff(got, want) <= TOL, f"{case}: max abs diff {_diff(got, want):.3g} vs diffusers"


@pytest.mark.parity
def test_without_causal_condition_matches_diffusers():
    ours, reference = _pair(causal_condition=False)
    args = inputs(**CASES["two_conditions_text_around"], seed=5)
    with torch.no_grad():
        diff = _diff(ours(*args), reference_call(reference, *args))
    assert diff <= TOL, f"causal_condition=False: max abs diff {diff:.3g}"


@pytest.mark.parity
def test_prefix_cache_matches_diffusers_and_uncached(models):
    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21KVCache

    ours, reference = models
    latents, t, text, shapes, slots, mask = inputs(**CASES["two_conditions_text_around"], seed=11)
    n_target = shapes[-1][1] * shapes[-1][2]
    g = torch.Generator().manual_seed(12)
    cache, ref_cache = PrefixCache(), QwenImage21KVCache(ours.config.num_layers)
    steps = [(latents, t)]
    for sigma in ([0.6, 0.45], [0.2, 0.05]):  # later steps: new target latents and timesteps, same prefix
        step_latents = latents.clone()
        step_latents[:, -n_target:] = torch.randn(latents.shape[0], n_target, latents.shape[2], generator=g)
        steps.append((step_latents, torch.tensor(sigma)))
    with torch.no_grad():
        for i, (x, sigma) in enumerate(steps):
            mode = "extract" if i == 0 else "cached"
            got = ours(x, sigma, text, shapes, slots, mask, cache=cache)
            want = reference_call(
                reference, x, sigma, text, shapes, slots, mask, kv_cache=ref_cache, kv_cache_mode=mode
            )
            plain = ours(x, sigma, text, shapes, slots, mask)
            assert cache.filled and len(cache.layers) == ours.config.num_layers
            assert _diff(got, want) <= TOL, f"step {i} ({mode}): max abs diff {_diff(got, want):.3g} vs diffusers"
            assert _diff(got, plain) <= TOL, f"step {i}: cached differs from uncached by {_diff(got, plain):.3g}"


@pytest.mark.parity
def test_full_size_keys_and_shapes_equal_diffusers():
    pytest.importorskip("diffusers")
    from diffusers import QwenImage21Transformer2DModel

    with torch.device("meta"):
        reference = QwenImage21Transformer2DModel()
        ours = QwenImage21DiT()
    want = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert got == want, f"missing {sorted(want.keys() - got.keys())[:8]}, extra {sorted(got.keys() - want.keys())[:8]}"
    assert config_from_state(ours.state_dict(), dict(reference.config)) == QwenImage21DiTConfig()


# ------------------------------------------------------------------------------------ cache and masks
def test_prefix_cache_equals_uncached_and_clears():
    model = make_model().eval()
    latents, t, text, shapes, slots, mask = inputs(**CASES["adjacent_conditions"], seed=2)
    cache = PrefixCache()
    assert not cache.filled and "empty" in repr(cache)
    with torch.no_grad():
        first = model(latents, t, text, shapes, slots, mask, cache=cache)
        assert cache.filled and cache.prefix_len == 2 + 4 + 12 + 4
        again = model(latents, t * 0.5, text, shapes, slots, mask, cache=cache)
        assert torch.equal(first, model(latents, t, text, shapes, slots, mask))
        torch.testing.assert_close(again, model(latents, t * 0.5, text, shapes, slots, mask), atol=TOL, rtol=0)
        cache.clear()
        assert not cache.filled and cache.layers == []
        t2i = inputs(runs=[5], target=(2, 2), lengths=None, seed=3)
        model(*t2i, cache=cache)  # a cleared cache fills again, with another prefix
        assert cache.prefix_len == 5


def test_padded_text_is_never_seen():
    model = make_model().eval()
    latents, t, text, shapes, slots, mask = inputs(**CASES["two_conditions_text_around"], seed=4)
    other = torch.where(mask[..., None], text, torch.randn_like(text) * 5)
    with torch.no_grad():
        want = model(latents, t, text, shapes, slots, mask)
        got = model(latents, t, other, shapes, slots, mask)
        cache = PrefixCache()
        model(latents, t, other, shapes, slots, mask, cache=cache)
        cached = model(latents, t, other, shapes, slots, mask, cache=cache)
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)
    torch.testing.assert_close(cached, want, atol=TOL, rtol=0)


def test_all_true_mask_equals_no_mask():
    model = make_model().eval()
    latents, t, text, shapes, slots, _ = inputs(**CASES["two_conditions_text_around"], seed=6)
    with torch.no_grad():
        a = model(latents, t, text, shapes, slots, None)
        b = model(latents, t, text, shapes, slots, torch.ones(text.shape[:2], dtype=torch.bool))
    assert torch.equal(a, b)


def test_plan_sequence_layout():
    plan = plan_sequence(prompt_layout([3, (2, 4), 2, (4, 6), 5]).tolist(), [(1, 2, 4), (1, 4, 6), (1, 4, 6)])
    assert plan.segments == [(0, 3, True), (3, 11, False), (11, 13, True), (13, 37, False), (37, 42, True)]
    assert plan.prefix_len == 42 and plan.target_len == 24
    n_text = 3 + 2 + 2 + 6 + 5
    assert plan.gather[:3].tolist() == [0, 1, 2] and plan.gather[3:11].tolist() == list(range(n_text, n_text + 8))
    frame = plan.positions[:, 0].tolist()
    # text 0..2; image 0 at frame 3, moves on by max(2, 4); text 7, 8; image 1 at 9 (+6); text 15..19; target 20
    assert frame[:3] == [0, 1, 2] and set(frame[3:11]) == {3} and frame[11:13] == [7, 8]
    assert set(frame[13:37]) == {9} and frame[37:42] == [15, 16, 17, 18, 19] and set(frame[42:]) == {20}
    assert plan.positions[3:11, 1].tolist() == [-1] * 4 + [0] * 4 and plan.positions[3:7, 2].tolist() == [-2, -1, 0, 1]


# ------------------------------------------------------------------------------------ conformance
SMALL = dict(runs=[2, (2, 2), 3], target=(2, 4), lengths=[6, 4])


def test_conformance_forward_backward_meta_load():
    args = inputs(**SMALL, seed=8)
    cf.check_declared_units(make_model)
    cf.check_forward(make_model, args, expected_shapes=[(2, 8, 8)])
    cf.check_backward(make_model, args)
    cf.check_meta_load(make_model, args)


def test_gradient_checkpointing():
    cf.check_gradient_checkpointing(make_model, inputs(**SMALL, seed=9))


def test_first_block_cache():
    cf.check_first_block_cache(
        make_model, inputs(**SMALL, seed=10), other_args=inputs(**SMALL, seed=11), blocks=("transformer_blocks",)
    )


def test_lora_targets_cover_the_blocks():
    with torch.device("meta"):
        model = QwenImage21DiT(tiny_config())
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("transformer_")}
    covered = {n for n in linears if any(n.endswith("." + t) for t in model.lora_target_modules)}
    assert covered == linears


# ------------------------------------------------------------------------------------ formats
def test_spec_recognises_both_layouts_and_round_trips():
    state = make_model().state_dict()
    assert DIT21_SPEC.match(state).name == "diffusers"
    assert DIT21_SPEC.match({PREFIX + k: v for k, v in state.items()}).name == "diffusers_prefixed"
    for layout in DIT21_SPEC.layouts:
        cf.check_layout_roundtrip(make_model, layout)
    assert DIT21_SPEC.name == "qwen_image21_dit" and DIT21_SPEC.role == "dit"


def test_specs_do_not_claim_each_other():
    with torch.device("meta"):
        v20 = QwenImageDiT(QwenImageDiTConfig(num_layers=2)).state_dict()
        v21 = QwenImage21DiT().state_dict()
    for keys in (v20, {PREFIX + k: v for k, v in v20.items()}):
        assert DIT21_SPEC.match(keys) is None
    for keys in (v21, {PREFIX + k: v for k, v in v21.items()}):
        assert DIT_SPEC.match(keys) is None


def test_spec_config_from_shapes():
    tiny = tiny_config()
    json = {"axes_dims_rope": list(tiny.axes_dims_rope), "_class_name": "QwenImage21Transformer2DModel"}
    assert cf.check_spec_config(DIT21_SPEC, make_model, json) == tiny
    assert cf.check_spec_config(DIT21_SPEC, lambda: make_model(tiny_config(mlp_ratio=2)), json).mlp_ratio == 2
    with torch.device("meta"):
        state = QwenImage21DiT(tiny).state_dict()
    assert config_from_state(state, {**json, "causal_condition": False}).causal_condition is False
    for field, value in (("num_layers", 3), ("num_attention_heads", 4), ("mlp_ratio", 4), ("context_in_dim", 64)):
        with pytest.raises(ConfigError, match=field):
            config_from_state(state, {**json, field: value})
    with pytest.raises(ConfigError, match="axes_dims_rope"):
        config_from_state(state, {"axes_dims_rope": [16, 56, 56]})
    assert config_from_state({}, {}) == QwenImage21DiTConfig()


# ------------------------------------------------------------------------------------ errors
def test_config_validation():
    with pytest.raises(ValueError, match="axes_dims_rope"):
        QwenImage21DiTConfig(axes_dims_rope=(16, 56, 54))
    with pytest.raises(ValueError, match="mlp_ratio"):
        QwenImage21DiTConfig(mlp_ratio=0)


@pytest.fixture(scope="module")
def tiny():
    return make_model().eval()


def _call(model, **changes):
    latents, t, text, shapes, slots, mask = inputs(**SMALL, seed=1)
    kwargs = dict(latents=latents, timestep=t, text=text, img_shapes=shapes, image_slots=slots, text_mask=mask)
    kwargs.update(changes)
    with torch.no_grad():
        return model(**kwargs)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        (dict(image_slots=prompt_layout([1, (2, 4), 3])), "slots"),  # 2 slots for a 2x2 condition image
        (dict(img_shapes=[(1, 2, 2), (1, 2, 2)]), "covers"),
        (dict(img_shapes=[(1, 2, 2), (1, 3, 3)], latents=torch.randn(2, 13, 16)), "multiple of 4"),
        (dict(img_shapes=[(1, 2, 2), (2, 2, 2)]), "frames=1"),
        (dict(img_shapes=[[(1, 2, 2), (1, 2, 4)]] * 2), "shared by the batch"),
        (dict(text=torch.randn(1, 8, 32)), "text has shape"),
        (dict(text=torch.randn(2, 8, 16)), "context_in_dim"),
        (dict(latents=torch.randn(2, 12, 8)), "latents have shape"),
        (dict(timestep=torch.rand(3)), "timestep"),
        (dict(text_mask=torch.ones(2, 5, dtype=torch.bool)), "text_mask"),
        (dict(image_slots=prompt_layout([2, (2, 2), 3]).float()), "bool"),
        (dict(image_slots=torch.stack([prompt_layout([2, (2, 2), 3]), prompt_layout([3, (2, 2), 2])])), "share"),
        (dict(image_slots=prompt_layout([2, (2, 2), 2])), "L_txt"),
    ],
)
def test_bad_inputs(tiny, changes, match):
    with pytest.raises(ValueError, match=match):
        _call(tiny, **changes)


def test_condition_image_split_by_text(tiny):
    slots = prompt_layout([1, (2, 2), 1, (2, 2), 1])  # one slot, text, one slot: but one 2x4 image
    latents = torch.randn(2, 8 + 8, 16)
    text = torch.randn(2, 5, 32)
    with pytest.raises(ValueError, match="contiguous"), torch.no_grad():
        tiny(latents, torch.rand(2), text, [(1, 2, 4), (1, 2, 4)], slots)


def test_batch_shared_slots_accepted(tiny):
    slots = prompt_layout(SMALL["runs"])
    torch.testing.assert_close(_call(tiny, image_slots=slots[None].expand(2, -1)), _call(tiny), atol=0, rtol=0)


def test_cache_errors(tiny):
    with pytest.raises(ConfigError, match="causal_condition"):
        _call(make_model(tiny_config(causal_condition=False)), cache=PrefixCache())
    with pytest.raises(TypeError, match="PrefixCache"):
        _call(tiny, cache={})
    cache = PrefixCache()
    _call(tiny, cache=cache)
    longer = inputs(runs=[4, (2, 2), 3], target=(2, 4), lengths=None, seed=1)
    with pytest.raises(ValueError, match="clear"), torch.no_grad():
        tiny(*longer, cache=cache)


def test_parallel_is_refused():
    model = make_model()
    model.parallel = object()
    with pytest.raises(ConfigError, match="sequence parallelism"):
        _call(model)


@pytest.mark.parametrize("layout", [{"sequence": 1, "batch": 2}, {"sequence": 2}, {}])
def test_enable_parallel_refuses_the_pipeline_at_once(monkeypatch, layout):
    """Neither kind of parallelism is built for Qwen-Image 2.1: `enable_parallel` refuses it before any process
    group forms (batch parallelism was accepted, then the first DiT call named sequence parallelism)."""
    from diffsynth.qwen_image import QwenImage21Pipeline

    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    pipe = QwenImage21Pipeline(device="cpu", torch_dtype=torch.float32)
    pipe.dit = make_model()
    with pytest.raises(ConfigError, match="no model of this pipeline supports parallel sampling .*batch"):
        pipe.enable_parallel(**layout)
