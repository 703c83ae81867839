"""LTX-2.5 diffusion video decoder: exact neighbourhood attention, decode shapes and seeding, the authors'
file (fused qkv, gates, preview head) loaded strictly, config from shapes and configs; and, marked parity,
the module and full decode against diffusers' `LTX2VideoDiffusionDecoderModel` plus full-size keys/shapes."""

from __future__ import annotations

import re

import diffsynth_ltx2_test_repo as repo  # loaded by conftest
import pytest
import torch
import torch.nn.functional as F

from diffsynth.ltx2 import diffusion_decoder as dd
from diffsynth.ltx2.diffusion_decoder import LTX2DiffusionDecoder, LTX2DiffusionDecoderConfig, neighborhood_attention
from diffsynth.ltx2.diffusion_decoder_formats import (
    LTX2_DIFFUSION_DECODER_SPEC,
    authors_to_ours,
    build_from_state,
    config_from_state,
    diffusers_to_ours,
    is_authors_file,
    load_state_dict,
    ours_to_authors,
    ours_to_diffusers,
)
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.testing import conformance as cf

TINY_JSON = {  # tiny_config() in diffusers' names
    "_class_name": "LTX2VideoDiffusionDecoderModel",
    "out_channels": 3,
    "latent_channels": 8,
    "patch_size": 2,
    "decoder_head_dim": 8,
    "decoder_stage_channels": [32, 16, 16, 16, 16],
    "decoder_stage_depths": [1, 1, 1, 1, 2],
    "decoder_stage_kernels": [[3, 1, 1], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
    "decoder_upsample_strides": [[1, 2, 2], [2, 1, 1], [2, 2, 2], [2, 2, 2]],
    "decoder_upsample_channel_reductions": [2, 1, 1, 1],
    "decoder_stage5_kernel": [3, 5, 5],
    "decoder_t_emb_dim": 32,
    "decoder_timestep_scale_multiplier": 1000.0,
    "decoder_model_output_type": "x0",
    "decoder_num_inference_steps": 1,
    "spatial_compression_ratio": 16,
    "temporal_compression_ratio": 8,
}


def tiny_config(**changes) -> LTX2DiffusionDecoderConfig:
    """The only place tiny sizes live: 8 latent channels, 2x2 patches (16x spatial, 8x temporal), two heads of 8."""
    fields = dict(
        latent_channels=8,
        patch_size=2,
        head_dim=8,
        stage_channels=(32, 16, 16, 16, 16),
        stage_depths=(1, 1, 1, 1, 2),
        stage_kernels=((3, 1, 1), (3, 3, 3), (3, 3, 3), (3, 3, 3)),
        upsample_strides=((1, 2, 2), (2, 1, 1), (2, 2, 2), (2, 2, 2)),
        upsample_reductions=(2, 1, 1, 1),
        stage5_kernel=(3, 5, 5),
        t_emb_dim=32,
    )
    return LTX2DiffusionDecoderConfig(**{**fields, **changes})


randomized = repo.randomized_decoder


def tiny_model(seed: int = 0, **changes) -> LTX2DiffusionDecoder:
    return randomized(LTX2DiffusionDecoder(tiny_config(**changes)), seed)


# ----------------------------------------------------------------------------------- behaviour
def _dense_neighborhood(q, k, v, kernel):
    """Reference: one SDPA over all tokens with NATTEN's window as a full mask."""
    dims = q.shape[1:4]
    masks = []
    for n, kk in zip(dims, kernel, strict=True):
        start = (torch.arange(n) - kk // 2).clamp(0, n - kk)
        rel = torch.arange(n)[None, :] - start[:, None]
        masks.append((rel >= 0) & (rel < kk))
    mask = masks[0][:, None, None, :, None, None] & masks[1][None, :, None, None, :, None]
    mask = (mask & masks[2][None, None, :, None, None, :]).reshape(dims.numel(), dims.numel())
    flat = [x.reshape(x.shape[0], -1, x.shape[4], x.shape[5]).transpose(1, 2) for x in (q, k, v)]
    out = F.scaled_dot_product_attention(*flat, attn_mask=mask, scale=1.0)
    return out.transpose(1, 2).reshape(*q.shape[:4], -1)


@pytest.mark.parametrize(
    "block, grid, kernel, gathered",
    [
        (2, (5, 9, 10), (3, 5, 7), 1 << 27),
        (8, (5, 9, 10), (3, 5, 7), 1 << 27),
        (2, (7, 20, 23), (3, 3, 5), 1 << 27),  # long interior runs: many blocks batched in one call
        (2, (7, 20, 23), (3, 3, 5), 5000),  # ... split over several calls
    ],
)
def test_neighborhood_attention_matches_dense_window(monkeypatch, block, grid, kernel, gathered):
    monkeypatch.setattr(dd, "MIN_QUERY_BLOCK", block)
    monkeypatch.setattr(dd, "MAX_GATHERED", gathered)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, *grid, 2, 8, generator=gen) for _ in range(3))
    got = neighborhood_attention(q, k, v, kernel)
    if grid == (7, 20, 23):  # the height axis: a first block, an interior run of five, a short last block
        assert [r.count for r in dd._axis_runs(20, 3, 3, torch.device("cpu"))] == [1, 5, 1]
    want = _dense_neighborhood(q, k, v, kernel)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="at least"):
        neighborhood_attention(q[:, :2], k[:, :2], v[:, :2], kernel)


def test_released_config():
    cfg = LTX2DiffusionDecoderConfig()
    assert (cfg.spatial_compression, cfg.temporal_compression) == (32, 8)
    assert cfg.min_latent_size == (3, 7, 7)
    assert cfg.ghost_latent_frames == 2
    assert cfg.resolved_rope_split() == (16, 24, 24)
    with pytest.raises(ValueError, match="stage_channels\\[1\\]"):
        LTX2DiffusionDecoderConfig(upsample_reductions=(4, 2, 1, 2))


def test_decode_shape_seed_and_small_latents():
    model = tiny_model()
    z = torch.randn(1, 8, 2, 2, 3)
    with torch.no_grad():
        a = model.decode(z, seed=3)
        b = model.decode(z, generator=torch.Generator().manual_seed(3))
        c = model.decode(z, seed=4)
        two = model.decode(z, seed=3, num_steps=2)
        # smaller than the stage-0 window in time and the stage-1 window in space: edge-padded, then cropped
        small = model.decode(torch.randn(1, 8, 1, 1, 1), seed=0, clamp=False)
    assert a.shape == (1, 3, 9, 32, 48) and two.shape == a.shape
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, two)
    assert a.abs().max() <= 1.0
    assert small.shape == (1, 3, 1, 16, 16) and torch.isfinite(small).all()
    with pytest.raises(ConfigError, match="latents"):
        model.decode(torch.randn(1, 4, 2, 2, 2))
    with pytest.raises(ConfigError, match="not both"):
        model.decode(z, seed=1, generator=torch.Generator())


def test_normalised_latents_are_unnormalised_inside():
    """The decoder takes the DiT's normalised latents: shifting the statistics and the latents together is
    the same decode."""
    model = tiny_model()
    z = torch.randn(1, 8, 2, 2, 2)
    stats = model.per_channel_statistics
    with torch.no_grad():
        ref = model.decode(z, seed=0, clamp=False)
        mean, std = stats.get_buffer("mean-of-means").clone(), stats.get_buffer("std-of-means").clone()
        stats.get_buffer("std-of-means").mul_(2.0)
        stats.get_buffer("mean-of-means").add_(1.0)
        raw = z * std.view(1, -1, 1, 1, 1) + mean.view(1, -1, 1, 1, 1)
        z2 = (raw - (mean + 1.0).view(1, -1, 1, 1, 1)) / (2.0 * std).view(1, -1, 1, 1, 1)
        got = model.decode(z2, seed=0, clamp=False)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------- the authors' file
def authors_file(model: LTX2DiffusionDecoder, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Our weights saved as the authors' file: `vae.` prefix, fused qkv, `t_embedder.mlp`, unit gates, a
    preview head, the unused statistics and encoder keys."""
    state = ours_to_authors(model.state_dict(), prefix="vae.")
    width = model.config.stage5_width
    for i in range(len(model.diff_blocks)):
        for gate in ("gate_msa", "gate_mlp", "gate_ctx"):
            state[f"vae.decoder.diff_blocks.{i}.{gate}"] = torch.ones(width)
    state["vae.decoder.coarse_head.weight"] = torch.randn(4, 4, generator=gen)
    state["vae.per_channel_statistics.mean-of-stds"] = torch.ones(8)
    state["vae.encoder.conv_in.conv.weight"] = torch.randn(4, 3, 1, 1, 1, generator=gen)
    return state


def test_authors_file_loads_strictly_and_folds_gates():
    gen = torch.Generator().manual_seed(0)
    model = tiny_model()
    state = authors_file(model, gen)
    assert "vae.decoder.det_stages.0.0.attn.qkv.weight" in state
    assert "vae.decoder.t_embedder.mlp.0.weight" in state
    assert is_authors_file(state) and not is_authors_file(ours_to_diffusers(model.state_dict()))
    assert is_authors_file([], {"vae": {"_class_name": "CausalDiffusionVAE"}})
    assert not is_authors_file(state, {"vae": {"_class_name": "CausalVideoAutoencoder"}})
    assert LTX2_DIFFUSION_DECODER_SPEC.match(state).name == "original"

    loaded = build_from_state(state, TINY_JSON)
    assert loaded.config == model.config
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, atol=0, rtol=0, msg=key)

    # gates scale each output channel of the linear they follow
    gate = torch.rand(model.config.stage5_width, generator=gen) + 0.5
    state["vae.decoder.diff_blocks.1.gate_mlp"] = gate
    state["vae.decoder.diff_blocks.0.gate_ctx"] = gate
    ours = authors_to_ours({k[4:]: v for k, v in state.items() if k.startswith("vae.decoder.") or "statistics" in k})
    w_down = model.diff_blocks[1].mlp.w_down.weight
    torch.testing.assert_close(ours["diff_blocks.1.mlp.w_down.weight"], gate[:, None] * w_down)
    torch.testing.assert_close(ours["diff_blocks.0.context_proj.bias"], gate * model.diff_blocks[0].context_proj.bias)
    torch.testing.assert_close(ours["diff_blocks.0.attn.proj.weight"], model.diff_blocks[0].attn.proj.weight)


def test_authors_file_errors_name_the_key():
    gen = torch.Generator().manual_seed(0)
    model = tiny_model()
    state = authors_file(model, gen)
    target = LTX2DiffusionDecoder(model.config)
    bad = dict(state)
    bad["vae.decoder.diff_blocks.1.attn.qkv.weight"] = torch.zeros(47, 16)
    with pytest.raises(ConfigError, match=re.escape("'vae.decoder.diff_blocks.1.attn.qkv.weight'")):
        load_state_dict(target, bad)
    bad = dict(state)
    del bad["vae.decoder.norm_out.weight"]
    with pytest.raises(ConfigError, match="missing keys.*norm_out"):
        load_state_dict(target, bad)
    bad = dict(state, **{"vae.decoder.diff_blocks.0.extra.weight": torch.zeros(1)})
    with pytest.raises(ConfigError, match="unexpected keys.*extra"):
        load_state_dict(target, bad)
    bad = dict(state, **{"vae.decoder.diff_blocks.0.gate_msa": torch.ones(5)})
    with pytest.raises(ConfigError, match="gate_msa"):
        load_state_dict(target, bad)
    load_state_dict(target, state)  # the intact file loads
    torch.testing.assert_close(target.conv_out.weight, model.conv_out.weight, atol=0, rtol=0)


def test_config_from_shapes_and_configs():
    model = tiny_model()
    meta = {k: torch.empty(v.shape, device="meta") for k, v in model.state_dict().items()}
    assert config_from_state(meta, TINY_JSON) == model.config
    # without a config: kernels and timing are the released ones, strides follow the stride products
    plain = config_from_state(meta)
    assert plain.upsample_strides == model.config.upsample_strides
    assert plain.stage5_kernel == (11, 11, 11) and plain.stage_channels == model.config.stage_channels
    authors = {
        "vae": {
            "_class_name": "CausalDiffusionVAE",
            "model_output_type": "x0",
            "decoder": {
                "stage_kernels": [[3, 1, 1], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
                "upsamples": [[[1, 2, 2], 2], [[2, 1, 1], 1], [[2, 2, 2], 1], [[2, 2, 2], 1]],
                "stage5_kernel": [3, 5, 5],
                "head_dim": 8,
                "default_num_inference_steps": 1,
                "timestep_scale_multiplier": 1000.0,
            },
        }
    }
    assert config_from_state(meta, authors) == model.config
    with pytest.raises(ConfigError, match="decoder_head_dim|head_dim"):
        config_from_state(meta, {**TINY_JSON, "decoder_head_dim": 16})
    with pytest.raises(ConfigError, match="upsample_strides"):
        config_from_state(meta, {**TINY_JSON, "decoder_upsample_strides": [[1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2]]})
    with pytest.raises(ConfigError, match="spatial_compression_ratio"):
        config_from_state(meta, {**TINY_JSON, "spatial_compression_ratio": 32})


# ----------------------------------------------------------------------------------- parity with diffusers
def _diffusers_model(state_ours: dict[str, torch.Tensor]):
    from diffusers import LTX2VideoDiffusionDecoderModel

    config = {k: v for k, v in TINY_JSON.items() if not k.startswith("_")}
    ref = LTX2VideoDiffusionDecoderModel(**config).eval()
    ref.load_state_dict(ours_to_diffusers(state_ours), strict=True)
    return ref


@pytest.mark.parity
def test_parity_with_diffusers_module_and_decode():
    model = tiny_model(seed=1)
    ref = _diffusers_model(model.state_dict())
    stats = model.per_channel_statistics
    # three latent frames: the fewest where ltx-core (whose rules we follow) adds no edge padding, so
    # diffusers, which never pads, decodes the same thing
    z = torch.randn(1, 8, 3, 2, 2, generator=torch.Generator().manual_seed(2))
    raw = z * stats.get_buffer("std-of-means").view(1, -1, 1, 1, 1) + stats.get_buffer("mean-of-means").view(
        1, -1, 1, 1, 1
    )
    with torch.no_grad():
        ctx_ref = ref.decoder.forward_stage_4(ref.decoder.forward_stages_1_to_3(raw))
        ctx = model.context(raw)
        x_t = torch.randn(1, 3, ctx.shape[1], ctx.shape[2] * 2, ctx.shape[3] * 2)
        t = torch.tensor([0.7])
        pred_ref = ref.decoder.forward_diffusion_step(ctx_ref, x_t, t)
        pred = model.predict(ctx, x_t, t)
        diffs = {"context": (ctx - ctx_ref).abs().max().item(), "step": (pred - pred_ref).abs().max().item()}
        for steps in (1, 2):
            want = ref.decode(raw, generator=torch.Generator().manual_seed(5), num_inference_steps=steps)
            got = model.decode(z, generator=torch.Generator().manual_seed(5), num_steps=steps, clamp=False)
            assert got.shape == want.sample.shape == (1, 3, 17, 32, 32)
            diffs[f"decode_{steps}"] = (got - want.sample).abs().max().item()
    print("max abs differences vs diffusers:", diffs)
    assert max(diffs.values()) <= 1e-5, diffs


@pytest.mark.parity
def test_diffusers_converter_both_ways():
    state = tiny_model().state_dict()
    theirs = ours_to_diffusers(state)
    assert "decoder.diff_blocks.0.attn.to_out.0.weight" in theirs and "latents_std" in theirs
    back = diffusers_to_ours(theirs)
    assert back.keys() == state.keys() and all(back[k] is state[k] for k in state)
    with pytest.raises(KeyError, match="encoder"):
        diffusers_to_ours({"encoder.conv_in.weight": torch.zeros(1)})
    loaded = build_from_state(theirs, TINY_JSON)
    torch.testing.assert_close(loaded.conv_in.weight, state["conv_in.weight"], atol=0, rtol=0)


@pytest.mark.parity
def test_full_size_keys_and_shapes_match_diffusers():
    from diffusers import LTX2VideoDiffusionDecoderModel

    with torch.device("meta"):
        ours = LTX2DiffusionDecoder(LTX2DiffusionDecoderConfig())
        ref = LTX2VideoDiffusionDecoderModel()
    mine = {k: tuple(v.shape) for k, v in ours_to_diffusers(ours.state_dict()).items()}
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert sorted(set(mine) ^ set(theirs)) == []
    assert mine == theirs
    meta = {k: torch.empty(v, device="meta") for k, v in theirs.items()}
    json = {"_class_name": "LTX2VideoDiffusionDecoderModel", **dict(ref.config)}
    assert config_from_state(diffusers_to_ours(meta), json) == LTX2DiffusionDecoderConfig()
    assert config_from_state(diffusers_to_ours(meta)) == LTX2DiffusionDecoderConfig()


@pytest.mark.parity
@pytest.mark.parametrize("steps", [1, 2])
def test_tiled_decode_matches_diffusers(steps):
    """Two tiles in each axis (frames 12/8, pixels 32/24: cells of 2 frames and 4x4 pixels; the short last
    temporal tile merged into the one before) against diffusers' tiled decode: the same tiles, noise drawn in
    the same order, the same blends."""
    model = tiny_model(seed=3)
    ref = _diffusers_model(model.state_dict())
    ref.enable_tiling(
        tile_sample_min_num_frames=12,
        tile_sample_stride_num_frames=8,
        tile_sample_min_height=32,
        tile_sample_stride_height=24,
        tile_sample_min_width=32,
        tile_sample_stride_width=24,
    )
    tiles = dd.DecoderTiles(frames=12, frame_stride=8, height=32, height_stride=24, width=32, width_stride=24)
    z = torch.randn(1, 8, 3, 3, 3, generator=torch.Generator().manual_seed(4))
    stats = model.per_channel_statistics
    raw = z * stats.get_buffer("std-of-means").view(1, -1, 1, 1, 1) + stats.get_buffer("mean-of-means").view(
        1, -1, 1, 1, 1
    )
    with torch.no_grad():
        want = ref.decode(raw, generator=torch.Generator().manual_seed(6), num_inference_steps=steps).sample
        got = model.decode(z, generator=torch.Generator().manual_seed(6), num_steps=steps, clamp=False, tiles=tiles)
        whole = model.decode(z, generator=torch.Generator().manual_seed(6), num_steps=steps, clamp=False)
    assert got.shape == want.shape == whole.shape == (1, 3, 17, 48, 48)
    diff = (got - want).abs().max().item()
    print(f"tiled decode, {steps} step(s): max abs difference vs diffusers {diff:.2e}")
    assert diff <= 1e-5
    assert (got - whole).abs().max() > 1e-3  # the tiled path really ran


# ----------------------------------------------------------------------------------- conformance
class SeededDecoder(LTX2DiffusionDecoder):
    """The decoder with its noise drawn from a fresh seeded generator each call, so repeated calls compare."""

    def forward(self, latents, generator=None):
        return self.decode(latents, generator=torch.Generator().manual_seed(0), clamp=False)


def seeded_model() -> SeededDecoder:
    return randomized(SeededDecoder(tiny_config()), seed=2)


def test_conformance(tmp_path):
    """Units declared (each block of each stage; the VRAM manager streams them all from cpu and disk with the same
    output), meta build + strict load bit-identical, the spec's config from shapes, the diffusers layout round trip."""
    z = torch.randn(1, 8, 3, 2, 2, generator=torch.Generator().manual_seed(1))
    cf.check_declared_units(seeded_model)
    cf.check_forward(seeded_model, (z,), expected_shapes=[(1, 3, 17, 32, 32)])
    cf.check_meta_load(seeded_model, (z,))
    cf.check_streamed(seeded_model, (z,), tmp_path, min_units=sum(tiny_config().stage_depths))
    assert cf.check_spec_config(LTX2_DIFFUSION_DECODER_SPEC, seeded_model, TINY_JSON) == tiny_config()
    diffusers_layout = next(lay for lay in LTX2_DIFFUSION_DECODER_SPEC.layouts if lay.name == "diffusers")
    cf.check_layout_roundtrip(seeded_model, diffusers_layout, ours_to_diffusers)
