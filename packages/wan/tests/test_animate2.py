"""Wan2.2-Animate-2: the DiT (both token streams, the reference key/value cache), its checkpoint layout, the
pipeline's `animate2_*` arguments and the clip-by-clip long video helper.

The DiT is compared with diffusers' `WanAnimate2Transformer3DModel` (diffusers 0.42, on weights converted by its
own converter; skipped without diffusers) and with DiffSynth-Studio's `WanAnimate2Transformer`, read from its local
git mirror into a package of its own with small stubs for what it imports: its flex-attention call (block mask +
`score_mod`) becomes a dense explicit softmax, itself checked against torch's `flex_attention`. The DiffSynth-Studio
tests skip where the mirror is absent (as in CI); everything else runs anywhere.
"""

from __future__ import annotations

import ast
import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.loading import load_model
from diffsynth.runtime.testing import conformance as cf
from diffsynth.wan import WanVideoPipeline
from diffsynth.wan.animate2 import (
    BIAS_CHANNELS,
    NEGATIVE_SKIP_BLOCK,
    Animate2Config,
    ReferenceInputs,
    ReferenceKV,
    WanAnimate2DiT,
    animate2_long_video,
    config_from_state,
    frame_mask,
    key_bias_channels,
    reference_attention,
)
from diffsynth.wan.formats import ANIMATE2_DIT_SPEC, DIT_SPEC, FAMILY
from diffsynth.wan.presets import PRESETS

from . import conftest as C
from .conftest import studio_source

# the one place the tiny Animate-2 sizes live; DiffSynth-Studio's class fixes the CLIP width at 1280
TINY = dict(dim=32, ffn_dim=64, num_heads=2, num_layers=2, text_dim=32, freq_dim=32, text_len=16, image_dim=1280)
LATENT = (3, 4, 6)  # driving latent frames, latent height, width: patch grid 2 x 3 (6 tokens a frame)


def tiny_config(**overrides) -> Animate2Config:
    return Animate2Config(**{**TINY, **overrides})


def tiny_model(seed: int = 0, **overrides) -> WanAnimate2DiT:
    return C.randomize(WanAnimate2DiT(tiny_config(**overrides)), seed).eval()


def tiny_inputs(batch: int = 1, seed: int = 1, latent=LATENT) -> tuple[tuple, ReferenceInputs]:
    """`(x, timestep, context, clip_feature, y)` of a clip (the reference image's frame + `frames` latent frames)
    and the driving video's `ReferenceInputs` (batch 1)."""
    frames, h, w = latent
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, frames + 1, h, w, generator=g)
    args = (x, torch.rand(batch, generator=g) * 1000, torch.randn(batch, 5, TINY["text_dim"], generator=g))
    args += (torch.randn(batch, 257, 1280, generator=g), torch.randn(batch, 20, frames + 1, h, w, generator=g))
    reference = ReferenceInputs(
        torch.randn(1, 16, frames, h, w, generator=g), torch.randn(1, 20, frames, h, w, generator=g),
        torch.randn(1, 6, TINY["text_dim"], generator=g), torch.randn(1, 257, 1280, generator=g),
    )  # fmt: skip
    return args, reference


# ----------------------------------------------------------------------------------------- DiffSynth-Studio's
ATTENTION_STUB = '''"""Stub of DiffSynth-Studio's attention entry point: SDPA, and flex attention as an explicit dense softmax."""
import torch
import torch.nn.functional as F


def dense_flex(q, k, v, score_mod=None, block_mask=None, scale=None):
    """flex_attention's semantics on [B, H, L, D]: score_mod on every logit, block_mask.mask_mod keeps keys, rows
    with no key give zeros."""
    b, h, lq, lk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    scores = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
    bi, hi = torch.arange(b).view(-1, 1, 1, 1), torch.arange(h).view(1, -1, 1, 1)
    qi, ki = torch.arange(lq).view(1, 1, -1, 1), torch.arange(lk).view(1, 1, 1, -1)
    if score_mod is not None:
        scores = score_mod(scores, bi, hi, qi, ki)
    if block_mask is not None:
        scores = scores.masked_fill(~block_mask.mask_mod(bi, hi, qi, ki).expand_as(scores), float("-inf"))
    return torch.softmax(scores, dim=-1).nan_to_num(0.0) @ v


def attention_forward(q, k, v, q_pattern="b n s d", k_pattern="b n s d", v_pattern="b n s d", out_pattern="b n s d",
                      dims=None, attn_mask=None, scale=None, use_flex=False, score_mod=None, **_):
    assert q_pattern == k_pattern == v_pattern == out_pattern == "b s n d"
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if use_flex or score_mod is not None:
        out = dense_flex(q, k, v, score_mod, attn_mask, scale)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    return out.transpose(1, 2)
'''
GRADIENT_STUB = """def gradient_checkpoint_forward(model, use_gradient_checkpointing, use_gradient_checkpointing_offload, *args,
                                **kwargs):
    return model(*args, **kwargs)
"""


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    """DiffSynth-Studio's `wan_animate_2_dit` module in a package of its own: the helpers it takes from its Wan DiT
    module (`sinusoidal_embedding_1d`, `RMSNorm`, `MLP`, cut from that file), the attention and gradient stubs,
    and block masks built without torch.compile."""
    dit_source = studio_source("diffsynth/models/wan_video_dit.py")
    wanted = {"sinusoidal_embedding_1d", "RMSNorm", "MLP"}
    helpers = [
        ast.get_source_segment(dit_source, node)
        for node in ast.parse(dit_source).body
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in wanted
    ]
    assert len(helpers) == 3
    root = tmp_path_factory.mktemp("studio-animate2")
    pkg = root / "studio_animate2_ref"
    for sub in ("", "models", "core", "core/attention"):
        (pkg / sub).mkdir(parents=True, exist_ok=True)
        (pkg / sub / "__init__.py").write_text("")
    header = "import math\nimport torch\nimport torch.nn as nn\nimport torch.nn.functional as F\n\n\n"
    (pkg / "models" / "wan_video_dit.py").write_text(header + "\n\n\n".join(helpers) + "\n")
    (pkg / "models" / "wan_animate_2_dit.py").write_text(studio_source("diffsynth/models/wan_animate_2_dit.py"))
    (pkg / "core" / "attention" / "attention.py").write_text(ATTENTION_STUB)
    (pkg / "core" / "gradient.py").write_text(GRADIENT_STUB)
    sys.path.insert(0, str(root))
    try:
        module = importlib.import_module("studio_animate2_ref.models.wan_animate_2_dit")
        create = module.create_block_mask

        def eager_block_mask(*args, _compile=False, **kwargs):
            return create(*args, _compile=False, **kwargs)

        module.create_block_mask = eager_block_mask
        yield module
    finally:
        sys.path.remove(str(root))


def studio_model(studio, ours: WanAnimate2DiT):
    cfg = ours.config
    theirs = studio.WanAnimate2Transformer(
        in_dim=cfg.in_dim, dim=cfg.dim, ffn_dim=cfg.ffn_dim, freq_dim=cfg.freq_dim, text_dim=cfg.text_dim,
        out_dim=cfg.out_dim, num_heads=cfg.num_heads, num_layers=cfg.num_layers, text_len=cfg.text_len,
    )  # fmt: skip
    theirs.load_state_dict(ours.state_dict(), strict=True)  # no converter: the file's keys are the module's
    return theirs.eval()


def studio_reference(theirs, reference: ReferenceInputs, clip_frames: int) -> tuple[dict, dict]:
    """DiffSynth-Studio's RefKVCache unit: the driving video through `forward_ref`, keys and values per block."""
    _, h, w = reference.latents.shape[2:]
    keys, values = {}, {}
    theirs.forward_ref(
        reference.latents, grid_sizes=torch.tensor([[clip_frames, h // 2, w // 2]]), k_cache=keys, v_cache=values,
        clip_fea_ref=reference.clip_feature, y_ref=[reference.y[0]], context_ref=[reference.context[0]],
        seq_len_ref=reference.latents[0, 0].numel() // 4, t=torch.tensor([500.0]),
    )  # fmt: skip
    return keys, values


def studio_velocity(theirs, keys, values, args, log_scale: float, negative: bool) -> torch.Tensor:
    """`model_fn_wananimate`'s inference call; `origin_len` / `origin_area` are the clip's pixel frames and size."""
    x, t, context, clip, y = args
    frames, h, w = x.shape[2:]
    out = theirs.forward_gen(
        x=[x[0]], k_cache=keys, v_cache=values, clip_fea=clip, y=[y[0]], context=[context[0]],
        seq_len=x[0, 0].numel() // 4, t=t, grid_sizes_ref=torch.tensor([[frames - 1, h // 2, w // 2]]),
        origin_len=4 * (frames - 2) + 1, origin_area=[8 * w, 8 * h], is_uncondtion=negative, log_scale=log_scale,
    )  # fmt: skip
    return out[0][None]


def test_the_dense_stub_equals_torch_flex_attention(studio):
    """The stub's explicit softmax against torch's own (eager) flex_attention, on DiffSynth-Studio's block mask and
    score_mod for a clip of 9 frames at 48 x 32 pixels (6 tokens a frame), with and without log_scale."""
    from torch.nn.attention.flex_attention import flex_attention

    stub = importlib.import_module("studio_animate2_ref.core.attention.attention")
    model = studio.WanAnimate2Transformer(dim=32, ffn_dim=64, num_heads=2, num_layers=1, freq_dim=32, text_dim=32)
    mask = model.create_mask(9, [48, 32], "cpu")
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 2, 128, 16, generator=g), torch.randn(1, 2, 256, 16, generator=g), torch.randn(1, 2, 256, 16, generator=g)  # fmt: skip
    for log_scale in (0.0, -1.3):
        score_mod = studio._get_score_mod(hw=6, log_scale=log_scale)
        with torch._dynamo.config.patch(specialize_float=True):  # eager flex traces its score_mod; keep the float
            want = flex_attention(q, k, v, score_mod=score_mod, block_mask=mask)
        torch.testing.assert_close(stub.dense_flex(q, k, v, score_mod, mask), want, atol=1e-6, rtol=0)


@pytest.mark.parity
@pytest.mark.parametrize(
    ("layers", "log_scale", "negative", "steps"),
    [(2, 0.0, False, (999.0, 250.3)), (2, -1.3, False, (999.0, 250.3)), (10, -1.3, True, (612.5,))],
)
def test_dit_matches_diffsynth_studio(studio, layers, log_scale, negative, steps):
    """The reference stream's keys/values (computed once) and the generation pass at two timesteps reusing them;
    the negative branch leaves out block 9; the distilled model's log_scale."""
    ours = tiny_model(num_layers=layers)
    theirs = studio_model(studio, ours)
    args, reference = tiny_inputs()
    with torch.no_grad():
        cache = ours.encode_reference(reference)
        keys, values = studio_reference(theirs, reference, args[0].shape[2])
        for i in range(layers):
            assert (cache.keys[i] - keys[i]).abs().max() <= 1e-5
            assert (cache.values[i] - values[i]).abs().max() <= 1e-5
        skip = [NEGATIVE_SKIP_BLOCK] if negative else []
        for t in steps:
            step = (args[0], torch.tensor([t]), *args[2:])
            got = ours(*step, cache, log_scale, skip)
            want = studio_velocity(theirs, keys, values, step, log_scale, negative)
            assert got.shape == want.shape == args[0].shape
            assert (got - want).abs().max().item() <= 1e-5, (got - want).abs().max()


@pytest.mark.parity
def test_one_call_with_both_streams_matches_forward_origin(studio):
    """`forward(..., ReferenceInputs)` (the reference stream computed inside) against DiffSynth-Studio's
    `forward_origin`, which interleaves the two streams block by block (its training path)."""
    ours = tiny_model(num_layers=3)
    theirs = studio_model(studio, ours)
    (x, t, context, clip, y), reference = tiny_inputs()
    frames, h, w = x.shape[2:]
    with torch.no_grad():
        got = ours(x, t, context, clip, y, reference, -1.3)
        want = theirs.forward_origin(
            x=[x[0]], clip_fea=clip, y=[y[0]], context=[context[0]], seq_len=x[0, 0].numel() // 4,
            x_ref=reference.latents, clip_fea_ref=reference.clip_feature, y_ref=[reference.y[0]],
            context_ref=[reference.context[0]], seq_len_ref=reference.latents[0, 0].numel() // 4, t=t,
            origin_len=4 * (frames - 2) + 1, origin_area=[8 * w, 8 * h], log_scale=-1.3,
        )[0]  # fmt: skip
    assert (got[0] - want).abs().max().item() <= 1e-5


# ----------------------------------------------------------------------------------------- diffusers'
@pytest.mark.parity
@pytest.mark.parametrize(("layers", "negative"), [(2, False), (10, True)])
def test_dit_matches_diffusers(layers, negative, monkeypatch):
    """diffusers' `WanAnimate2Transformer3DModel` on the same weights (converted with diffusers' own
    `convert_wan_animate_2_transformer_to_diffusers`): its "extract" pass over the driving video fills the
    key/value cache, its "cached" pass (flex attention) makes the velocity at two timesteps; the negative branch
    leaves out block 9."""
    pytest.importorskip("diffusers")
    theirs_module = pytest.importorskip("diffusers.models.transformers.transformer_wan_animate_2")
    from diffusers.loaders.single_file_utils import convert_wan_animate_2_transformer_to_diffusers
    from diffusers.models.attention_dispatch import attention_backend

    block_mask = theirs_module.create_block_mask  # diffusers compiles the mask builder; eager is enough on CPU
    monkeypatch.setattr(theirs_module, "create_block_mask", lambda *a, **k: block_mask(*a, **{**k, "_compile": False}))
    ours = tiny_model(num_layers=layers)
    cfg = ours.config
    theirs = theirs_module.WanAnimate2Transformer3DModel(
        patch_size=(1, 2, 2), text_len=cfg.text_len, in_dim=36, dim=cfg.dim, ffn_dim=cfg.ffn_dim, freq_dim=cfg.freq_dim,
        text_dim=cfg.text_dim, out_dim=16, num_heads=cfg.num_heads, num_layers=layers,
    ).eval()  # fmt: skip
    state = convert_wan_animate_2_transformer_to_diffusers({k: v.clone() for k, v in ours.state_dict().items()})
    theirs.load_state_dict(state, strict=True)
    (x, _, context, clip, y), reference = tiny_inputs()
    frames, h, w = LATENT
    grid = torch.tensor([[frames, h // 2, w // 2]])
    with torch.no_grad():
        cache = ours.encode_reference(reference)
        for t in (999.0, 250.3):
            got = ours(x, torch.tensor([t]), context, clip, y, cache, 0.0, [NEGATIVE_SKIP_BLOCK] if negative else [])
            kv = theirs_module.WanAnimate2KVCache(layers)
            theirs(
                hidden_states=[reference.latents[0]], timestep=torch.tensor([t]),
                encoder_hidden_states=[reference.context[0]], condition_latents=[reference.y[0]], kv_cache=kv,
                kv_cache_mode="extract", seq_len=frames * (h // 2) * (w // 2),
                encoder_hidden_states_image=reference.clip_feature, offset_grid_sizes=grid,
            )  # fmt: skip
            with attention_backend("flex"):
                want = theirs(
                    hidden_states=[x[0]], timestep=torch.tensor([t]), encoder_hidden_states=[context[0]],
                    condition_latents=[y[0]], kv_cache=kv, kv_cache_mode="cached",
                    seq_len=(frames + 1) * (h // 2) * (w // 2), encoder_hidden_states_image=clip,
                    reference_grid_sizes=grid, origin_len=4 * (frames - 1) + 1, origin_area=[8 * h, 8 * w],
                    is_uncondtion=negative,
                ).sample[0]  # fmt: skip
            assert got.shape[1:] == want.shape
            assert (got[0] - want).abs().max().item() <= 5e-5, (got[0] - want).abs().max()


@pytest.mark.parity
def test_full_size_keys_and_shapes_equal_diffsynth_studio(studio):
    with torch.device("meta"):
        theirs = studio.WanAnimate2Transformer().state_dict()
    assert {k: tuple(v.shape) for k, v in theirs.items()} == expected_14b_shapes()


# ----------------------------------------------------------------------------------------- the attention
def dense_reference_attention(q, k, v, k_ref, v_ref, n: int, log_scale: float) -> torch.Tensor:
    """One softmax over [generated keys, driving keys] with an explicit mask: frame j >= 1 sees driving frame
    j - 1 only; log_scale on generated frame 1's keys."""
    s, r = q.shape[1], k_ref.shape[1]
    frame_q = torch.arange(s) // n
    frame_ref = torch.arange(r) // n + 1
    allowed = torch.cat([torch.ones(s, s, dtype=torch.bool), frame_q[:, None] == frame_ref[None, :]], dim=1)
    bias = torch.zeros(s + r)
    bias[n : 2 * n] = log_scale
    keys = torch.cat([k, k_ref.expand(k.shape[0], -1, -1, -1)], 1).transpose(1, 2)
    values = torch.cat([v, v_ref.expand(v.shape[0], -1, -1, -1)], 1).transpose(1, 2)
    scores = q.transpose(1, 2) @ keys.transpose(-1, -2) / q.shape[-1] ** 0.5 + bias
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ values).transpose(1, 2)


@pytest.mark.parametrize("log_scale", [0.0, -1.3, 2.0])
def test_reference_attention_is_one_masked_softmax(log_scale):
    g = torch.Generator().manual_seed(0)
    n, frames = 6, 4
    q, k, v = (torch.randn(2, frames * n, 2, 8, generator=g) for _ in range(3))
    k_ref, v_ref = (torch.randn(1, (frames - 1) * n, 2, 8, generator=g) for _ in range(2))
    got = reference_attention(q, k, v, k_ref, v_ref, n, log_scale)
    torch.testing.assert_close(got, dense_reference_attention(q, k, v, k_ref, v_ref, n, log_scale), atol=1e-6, rtol=0)


def test_key_bias_channels_add_log_scale_to_the_chosen_keys_only():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 12, 2, 16, generator=g) for _ in range(3))
    scale = 16**-0.5
    q2, k2, v2 = key_bias_channels(q, k, v, slice(4, 8), -1.3, scale)
    assert q2.shape[-1] == k2.shape[-1] == v2.shape[-1] == 16 + BIAS_CHANNELS and not v2[..., 16:].any()
    added = torch.einsum("bqhd,bkhd->bhqk", q2, k2) * scale - torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    torch.testing.assert_close(added[..., 4:8], torch.full_like(added[..., 4:8], -1.3), atol=1e-5, rtol=0)
    assert added[..., :4].abs().max() < 1e-5 and added[..., 8:].abs().max() < 1e-5


def test_half_precision_keeps_the_key_bias_exact():
    """In bfloat16 the bias rides on extra channels (an additive mask would have to be bfloat16 too): the result is
    the exact softmax of the bfloat16 inputs up to the output's own rounding."""
    g = torch.Generator().manual_seed(1)
    n, frames = 6, 4
    q, k, v = (torch.randn(1, frames * n, 2, 16, generator=g).bfloat16() for _ in range(3))
    k_ref, v_ref = (torch.randn(1, (frames - 1) * n, 2, 16, generator=g).bfloat16() for _ in range(2))
    got = reference_attention(q, k, v, k_ref, v_ref, n, -1.3)
    assert got.dtype == torch.bfloat16 and got.shape == q.shape
    want = dense_reference_attention(*(t.double() for t in (q, k, v, k_ref, v_ref)), n, -1.3)
    assert (got.double() - want).abs().max() <= 2**-8 * want.abs().max()


def test_frame_mask_folds_the_given_frames_into_latent_frames():
    mask = frame_mask(5, 9, 4, 2, 3, "cpu")
    assert mask.shape == (4, 3, 2, 3)
    assert mask[:, :, 0, 0].tolist() == [[1, 1, 0], [1, 1, 0], [1, 1, 0], [1, 1, 0]]
    assert frame_mask(0, 9, 4, 1, 1, "cpu").sum() == 0 and frame_mask(9, 9, 4, 1, 1, "cpu").min() == 1


# ----------------------------------------------------------------------------------------- the DiT
def test_reference_cache_is_reused_and_offloading_it_changes_nothing():
    ours = tiny_model()
    args, reference = tiny_inputs(batch=2)
    with torch.no_grad():
        cache = ours.encode_reference(reference)
        offloaded = ours.encode_reference(reference, offload=True)
        assert all(k.device.type == "cpu" for k in offloaded.keys)
        want = ours(*args, reference)
        torch.testing.assert_close(ours(*args, cache), want, atol=0, rtol=0)
        torch.testing.assert_close(ours(*args, offloaded), want, atol=0, rtol=0)
        # the driving video and log_scale reach the output; a skipped block changes it
        other = ReferenceInputs(reference.latents + 1, reference.y, reference.context, reference.clip_feature)
        assert (ours(*args, other) - want).abs().max() > 1e-3
        assert (ours(*args, cache, -1.3) - want).abs().max() > 1e-4
        assert (ours(*args, cache, 0.0, [1]) - want).abs().max() > 1e-3


def test_conformance(tmp_path):
    args, reference = tiny_inputs()
    full = (*args, reference)
    factory = lambda: tiny_model(seed=3)  # noqa: E731
    cf.check_forward(factory, full, expected_shapes=[args[0].shape])
    cf.check_backward(factory, full)
    cf.check_gradient_checkpointing(factory, full, atol=1e-5)
    cf.check_meta_load(factory, full)
    cf.check_declared_units(factory)
    cf.check_streamed(factory, full, tmp_path, min_units=2)
    for layout in ANIMATE2_DIT_SPEC.layouts:
        cf.check_layout_roundtrip(factory, layout)
    assert cf.check_spec_config(ANIMATE2_DIT_SPEC, factory, {"num_heads": 2, "text_len": 16}) == tiny_config()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a, r: ((a[0][:, :4], *a[1:]), r), "x has shape"),
        (lambda a, r: ((*a[:4], a[4][:, :4]), r), "y of x has shape"),
        (lambda a, r: ((*a[:3], a[3][..., :8], a[4]), r), "clip_feature has shape"),
        (lambda a, r: ((*a[:2], a[2][:, :, :8], *a[3:]), r), "context has shape"),
        (
            lambda a, r: (a, ReferenceInputs(r.latents[:, :, :2], r.y[:, :, :2], r.context, r.clip_feature)),
            "patch grid",
        ),
        (lambda a, r: (a, "video"), "ReferenceKV"),
    ],
)
def test_bad_dit_inputs_name_the_argument(change, message):
    args, reference = change(*tiny_inputs())
    with pytest.raises(ValueError, match=message), torch.no_grad():
        tiny_model()(*args, reference)


def test_skip_blocks_must_be_blocks():
    args, reference = tiny_inputs()
    with pytest.raises(ValueError, match="skip_blocks"), torch.no_grad():
        tiny_model()(*args, reference, 0.0, [2])


@pytest.mark.parametrize(
    ("overrides", "field"),
    [({"num_heads": 5}, "num_heads"), ({"in_dim": 16}, "in_dim"), ({"refer_stride": 0}, "refer_stride"),
     ({"refer_offset_w": 1.5}, "refer_offset_w"), ({"patch_size": (1, 2)}, "patch_size")],
)  # fmt: skip
def test_config_refuses_bad_fields(overrides, field):
    with pytest.raises(ValueError, match=f"Animate2Config.*{field}"):
        tiny_config(**overrides)


# ----------------------------------------------------------------------------------------- layout and files
def expected_14b_shapes() -> dict[str, tuple[int, ...]]:
    """Wan2.2-Animate-2-14B's keys and shapes, written out from DiffSynth-Studio's module structure."""
    d, f, t, fq = 5120, 13824, 4096, 256
    linear = lambda name, i, o: {f"{name}.weight": (o, i), f"{name}.bias": (o,)}  # noqa: E731
    shapes = {"patch_embedding.weight": (d, 36, 1, 2, 2), "patch_embedding.bias": (d,)}
    shapes |= linear("text_embedding.0", t, d) | linear("text_embedding.2", d, d)
    shapes |= (
        linear("time_embedding.0", fq, d) | linear("time_embedding.2", d, d) | linear("time_projection.1", d, 6 * d)
    )
    shapes |= {"head.modulation": (1, 2, d)} | linear("head.head", d, 64)
    shapes |= {"img_emb.proj.0.weight": (1280,), "img_emb.proj.0.bias": (1280,), "img_emb.proj.4.weight": (d,)}
    shapes |= {"img_emb.proj.4.bias": (d,)} | linear("img_emb.proj.1", 1280, 1280) | linear("img_emb.proj.3", 1280, d)
    for i in range(40):
        b = f"blocks.{i}.block"
        shapes[f"{b}.modulation"] = (1, 6, d)
        for name in ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                     "cross_attn.v", "cross_attn.o", "cross_attn.k_img", "cross_attn.v_img"):  # fmt: skip
            shapes |= linear(f"{b}.{name}", d, d)
        for name in ("self_attn.norm_q", "self_attn.norm_k", "cross_attn.norm_q", "cross_attn.norm_k",
                     "cross_attn.norm_k_img", "norm3"):  # fmt: skip
            shapes[f"{b}.{name}.weight"] = (d,)
        shapes[f"{b}.norm3.bias"] = (d,)
        shapes |= linear(f"{b}.ffn.0", d, f) | linear(f"{b}.ffn.2", f, d)
    return shapes


def test_full_size_layout_and_config():
    with torch.device("meta"):
        model = WanAnimate2DiT()
    state = model.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == expected_14b_shapes()
    assert len(state) == 1303 and sum(v.numel() for v in state.values()) == 16_394_878_784
    assert ANIMATE2_DIT_SPEC.match(state) is not None and DIT_SPEC.match(state) is None
    assert config_from_state(state) == Animate2Config()


def save_tiny_dit(folder: Path, seed: int = 0, prefix: str = "", **overrides) -> tuple[Path, WanAnimate2DiT]:
    """A tiny DiT as the hub repo stores it (`wan_animate_2/wan_animate_2_bf16.safetensors`), with a config.json
    giving what the shapes cannot (heads, text length)."""
    model = tiny_model(seed, **overrides)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "wan_animate_2_bf16.safetensors"
    save_file({prefix + k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    cfg = model.config
    (folder / "config.json").write_text(json.dumps({"num_heads": cfg.num_heads, "text_len": cfg.text_len}))
    return path, model


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_the_file_is_recognised_and_loads_strictly(tmp_path, prefix):
    path, model = save_tiny_dit(tmp_path / "wan_animate_2", prefix=prefix)
    loaded = load_model(str(path))
    assert isinstance(loaded, WanAnimate2DiT) and loaded.config == model.config
    state = model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())
    args, reference = tiny_inputs()
    with torch.no_grad():  # (CPU kernels may round differently on differently aligned memory maps)
        torch.testing.assert_close(loaded(*args, reference), model(*args, reference), atol=1e-5, rtol=0)


def test_missing_or_misshapen_keys_are_refused(tmp_path):
    state = {k: v.contiguous() for k, v in tiny_model().state_dict().items()}
    (tmp_path / "config.json").write_text(json.dumps({"num_heads": 2, "text_len": 16}))
    missing = {k: v for k, v in state.items() if k != "blocks.1.block.cross_attn.norm_k_img.weight"}
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="blocks.1.block.cross_attn.norm_k_img.weight"):
        load_model(str(tmp_path / "missing.safetensors"), specs=[ANIMATE2_DIT_SPEC])
    wrong = {**state, "blocks.0.block.self_attn.o.bias": torch.zeros(48)}
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(ValueError, match="blocks.0.block.self_attn.o.bias"):
        load_model(str(tmp_path / "wrong.safetensors"), specs=[ANIMATE2_DIT_SPEC])
    with pytest.raises(ConfigError, match="num_heads"):  # a width the released head size does not divide
        config_from_state(state)
    with pytest.raises(ConfigError, match="num_layers"):  # a config.json that contradicts the shapes
        config_from_state(state, {"num_heads": 2, "num_layers": 3})


# ----------------------------------------------------------------------------------------- the pipeline
SIZE = 32
FAST = dict(
    height=SIZE, width=SIZE, num_frames=5, num_inference_steps=2, cfg_scale=1.0, progress_bar=False, tiled=False
)
PROMPT = C.CAPTIONS[0]


def image(seed: int, size: int = SIZE) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def frames(count: int, seed: int = 0) -> list[Image.Image]:
    return [image(seed + i) for i in range(count)]


@pytest.fixture(scope="module")
def animate2_repo(tmp_path_factory) -> Path:
    """A tiny Wan2.2-Animate-2-14B-style repo: the I2V repo's umT5, CLIP, VAE and tokenizer, and a 10-block
    Animate-2 DiT of their widths in `wan_animate_2/` (10 blocks: the negative branch leaves out block 9)."""
    root = C.build_tiny_repo(tmp_path_factory.mktemp("tiny-wan-animate2"), "i2v")
    overrides = dict(num_layers=10, text_dim=C.TINY_UMT5["d_model"], image_dim=C.TINY_CLIP["hidden_size"])
    save_tiny_dit(root / "wan_animate_2", seed=5, **{**overrides, "text_len": 512})
    return root


def load_pipe(root: Path, **kwargs) -> WanVideoPipeline:
    """As DiffSynth-Studio's example: one ModelConfig per file."""
    files = ["wan_animate_2/wan_animate_2_bf16.safetensors", C.T5_FILE, C.CLIP_FILE, "Wan2.1_VAE.pth"]
    return WanVideoPipeline.from_pretrained(
        model_configs=[ModelConfig(path=str(root / f)) for f in files],
        tokenizer_config=ModelConfig(path=str(root / C.TOKENIZER_DIR)), torch_dtype="float32", device="cpu",
        **kwargs,
    )  # fmt: skip


@pytest.fixture(scope="module")
def pipe(animate2_repo):
    return load_pipe(animate2_repo)


def call(pipe, **kwargs):
    given = dict(animate2_reference_image=image(90), animate2_reference_video=frames(5), seed=1, output_type="pt")
    return pipe(PROMPT, **{**FAST, **given, **kwargs})


class DitCalls:
    """Records the DiT's generation calls (their positional inputs) through a forward pre-hook."""

    def __init__(self, dit):
        self.calls = []
        self.handle = dit.register_forward_pre_hook(lambda module, args: self.calls.append(args))

    def __enter__(self):
        return self.calls

    def __exit__(self, *exc):
        self.handle.remove()


def test_pipeline_makes_a_clip_of_num_frames_and_is_seeded(pipe):
    pil = call(pipe, output_type="pil")
    assert len(pil) == 5 and pil[0].size == (SIZE, SIZE)
    out = call(pipe)
    assert out.shape == (1, 3, 5, SIZE, SIZE) and torch.isfinite(out).all()
    assert np.abs(np.asarray(pil[2]) / 255.0 - out[0, :, 2].permute(1, 2, 0).numpy()).max() <= 1 / 255
    assert (call(pipe, seed=2) - out).abs().max() > 1e-3
    assert (call(pipe, animate2_reference_video=frames(5, seed=40)) - out).abs().max() > 1e-3


def test_conditions_are_those_diffsynth_studio_composes(pipe):
    """y: the reference image's latent with a mask of ones as frame 0, then the given first frames' latent
    (zeros after) with their mask; the latents have the reference image's frame first; the driving frames beyond
    num_frames are not used."""
    vae = pipe.vae
    given = frames(1, seed=70)
    with DitCalls(pipe.dit) as calls:
        call(pipe, animate2_refert_images=given, animate2_reference_video=frames(7))
    x, t, context, clip, y, reference, log_scale, skip = calls[0]
    assert x.shape == (1, 16, 3, 4, 4) and y.shape == (1, 20, 3, 4, 4) and skip == ()
    assert isinstance(reference, ReferenceKV) and reference.grid == (2, 2, 2) and log_scale == 0.0
    with torch.no_grad():
        pixels = pipe._pixels([image(90)], SIZE, SIZE, torch.float32)[:, :, None]
        torch.testing.assert_close(y[:, 4:, :1], vae.encode(pixels).float(), atol=1e-5, rtol=0)
        video = torch.zeros(1, 3, 5, SIZE, SIZE)
        video[:, :, :1] = pipe._pixels(given, SIZE, SIZE, torch.float32)[:, :, None]
        torch.testing.assert_close(y[:, 4:, 1:], vae.encode(video).float(), atol=1e-5, rtol=0)
    assert y[0, :4, 0].min() == 1 and y[0, :4, 1].min() == 1 and y[0, :4, 2].max() == 0
    # without given frames the clip's mask is all zeros; the two frames past num_frames change nothing
    with DitCalls(pipe.dit) as again:
        call(pipe, animate2_reference_video=frames(5))
    assert again[0][4][0, :4, 1:].max() == 0
    assert all(torch.equal(a, b) for a, b in zip(again[0][5].keys, reference.keys, strict=True))


def test_guidance_runs_the_negative_prompt_without_block_9(pipe):
    with DitCalls(pipe.dit) as calls:
        out = call(pipe, cfg_scale=3.0, negative_prompt="bad quality")
    assert len(calls) == 4  # 2 steps x (positive, negative)
    assert [c[7] for c in calls] == [(), [NEGATIVE_SKIP_BLOCK]] * 2
    assert not torch.equal(calls[0][2], calls[1][2])  # the negative prompt
    assert calls[0][5] is calls[1][5]  # one reference cache for both branches and every step
    assert (out - call(pipe)).abs().max() > 1e-4


def test_offloaded_kv_and_vram_managed_dit_give_the_same_clip(pipe, animate2_repo):
    want = call(pipe)
    torch.testing.assert_close(call(pipe, animate2_offload_kv=True), want, atol=0, rtol=0)
    managed = load_pipe(animate2_repo, vram_limit=0)
    torch.testing.assert_close(call(managed), want, atol=1e-5, rtol=0)


def test_batch_of_prompts_equals_one_by_one(pipe):
    both = pipe([PROMPT, C.CAPTIONS[1]], **FAST, animate2_reference_image=image(90), seed=1, output_type="pt",
                animate2_reference_video=frames(5), latents=torch.randn(2, 16, 3, 4, 4, generator=torch.Generator().manual_seed(0)))  # fmt: skip
    noise = torch.randn(2, 16, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    for i, prompt in enumerate([PROMPT, C.CAPTIONS[1]]):
        one = pipe(prompt, **FAST, animate2_reference_image=image(90), animate2_reference_video=frames(5),
                   latents=noise[i : i + 1], output_type="pt")  # fmt: skip
        torch.testing.assert_close(both[i : i + 1], one, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"animate2_reference_image": None}, "needs animate2_reference_image"),
        ({"animate2_reference_video": None}, "needs animate2_reference_video"),
        ({"animate2_reference_video": frames(4)}, "has 4 frames; num_frames=5 needs at least 5"),
        ({"animate2_refert_images": frames(6)}, "takes at most 5"),
        ({"input_image": image(1)}, "Animate-2 takes no input_image"),
        ({"animate_pose_video": frames(5)}, "takes no animate_pose_video"),
        ({"sliding_window_size": 2, "sliding_window_stride": 1}, "takes no sliding_window_size"),
        ({"cfg_merge": True, "cfg_scale": 2.0}, "cfg_merge"),
        ({"latents": torch.zeros(1, 16, 2, 4, 4)}, "latents must be a tensor of shape \\(1, 16, 3, 4, 4\\)"),
        ({"animate2_reference_video": 3}, "animate2_reference_video must be a video file"),
    ],
)
def test_bad_arguments_name_the_argument(pipe, change, message):
    with pytest.raises(ConfigError, match=message):
        call(pipe, **change)


def test_another_dit_refuses_the_animate2_arguments(tiny_repo):
    from diffsynth.wan import WanVideoPipeline as Pipe

    other = Pipe.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu")
    with pytest.raises(ConfigError, match="animate2_reference_video, animate2_log_scale need a Wan2.2-Animate-2"):
        other(PROMPT, **FAST, animate2_reference_video=frames(5), animate2_log_scale=-1.3)


def test_presets_have_diffsynth_studios_settings():
    base, distilled = PRESETS["Wan-AI/Wan2.2-Animate-2-14B"], PRESETS["Wan-AI/Wan2.2-Animate-2-14B:distilled"]
    for preset, steps, scale, log_scale in ((base, 40, 3.0, 0.0), (distilled, 10, 1.0, -1.3)):
        d = preset.defaults
        assert (d["num_inference_steps"], d["cfg_scale"], d["animate2_log_scale"]) == (steps, scale, log_scale)
        assert (d["num_frames"], d["height"], d["width"], d["sigma_shift"]) == (81, 1280, 720, 5.0)
        assert preset.tokenizer.origin_file_pattern == "videomodel/Wan-AI/umt5-xxl/"
        assert [(f.model_id, f.origin_file_pattern) for f in preset.files[1:]] == [
            ("Wan-AI/Wan2.2-Animate-2-14B", "videomodel/Wan-AI/models_t5_umt5-xxl-enc-bf16.pth"),
            ("Wan-AI/Wan2.2-Animate-2-14B", "videomodel/Wan-AI/models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"),
            ("Wan-AI/Wan2.1-T2V-14B", "Wan2.1_VAE.pth"),
        ]  # fmt: skip
        assert preset.name in FAMILY.presets
    assert base.files[0].origin_file_pattern == "wan_animate_2/wan_animate_2_bf16.safetensors"
    assert distilled.files[0].origin_file_pattern == "wan_animate_2/wan_animate_2_bf16_distillation.safetensors"


def test_the_preset_defaults_reach_the_call(animate2_repo):
    """A pipeline with the distilled preset's defaults passes log_scale -1.3 to the DiT and runs no negative branch;
    the base preset's guidance runs one."""
    pipe = load_pipe(animate2_repo)
    pipe.defaults.update(PRESETS["Wan-AI/Wan2.2-Animate-2-14B:distilled"].defaults)
    with DitCalls(pipe.dit) as calls:
        call(pipe, cfg_scale=None, num_inference_steps=1)
    assert len(calls) == 1 and calls[0][6] == -1.3
    pipe.defaults.update(PRESETS["Wan-AI/Wan2.2-Animate-2-14B"].defaults)
    with DitCalls(pipe.dit) as calls:
        call(pipe, cfg_scale=None, num_inference_steps=1)
    assert len(calls) == 2 and [c[6] for c in calls] == [0.0, 0.0]


# ----------------------------------------------------------------------------------------- long videos
class FakePipe:
    """Stands for the pipeline: returns frames numbered by call, records the arguments."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompt, **kwargs):
        self.calls.append(kwargs)
        return [(len(self.calls), i) for i in range(kwargs["num_frames"])]


def test_long_video_loop_as_diffsynth_studios_example():
    fake = FakePipe()
    driving = [image(i, 2) for i in range(12)]
    number = {id(f): i for i, f in enumerate(driving)}
    out = animate2_long_video(fake, "a dance", "character", driving, clip_frames=5, overlap_frames=1, seed=3)
    # clips start every 4 frames; the last one runs past the video, which is extended back and forth
    given = [[number[id(f)] for f in c["animate2_reference_video"]] for c in fake.calls]
    assert given == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8], [8, 9, 10, 11, 10]]
    assert [c["animate2_refert_images"] for c in fake.calls] == [None, [(1, 4)], [(2, 4)]]
    assert all(c["seed"] == 3 and c["num_frames"] == 5 and c["output_type"] == "pil" for c in fake.calls)
    assert len(out) == 12 and out[:6] == [(1, 0), (1, 1), (1, 2), (1, 3), (1, 4), (2, 1)]
    short = FakePipe()
    assert len(animate2_long_video(short, "a dance", "character", driving[:3], clip_frames=5)) == 3
    assert [number[id(f)] for f in short.calls[0]["animate2_reference_video"]] == [0, 1, 2, 1, 0]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"clip_frames": 6}, "1 \\+ 4k"),
        ({"overlap_frames": 0}, "overlap_frames"),
        ({"num_frames": 9}, "sets num_frames"),
    ],
)
def test_long_video_refuses_bad_arguments(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        animate2_long_video(FakePipe(), "a dance", "character", [image(i, 2) for i in range(9)], **kwargs)


def test_long_video_with_the_tiny_pipeline(pipe):
    options = {k: v for k, v in FAST.items() if k != "num_frames"}
    out = animate2_long_video(pipe, PROMPT, image(90), frames(7), clip_frames=5, overlap_frames=1, seed=1, **options)
    assert len(out) == 7 and out[0].size == (SIZE, SIZE)


def test_unipc_sampler_steps_every_step(pipe):
    """`sampler="unipc"`: every step is UniPC's, in order (the sampler: runtime's test_unipc.py)."""
    from diffsynth.runtime.testing.samplers import check_unipc_sampling

    check_unipc_sampling(lambda sampler: call(pipe, sampler=sampler, num_inference_steps=3))
