"""Wan causal video VAE on tiny configs: shapes, causality, chunking, tiling, input checks."""

from __future__ import annotations

import pytest
import torch

from diffsynth.runtime.models.wan_vae import (
    WAN21_LATENTS_MEAN,
    WAN22_LATENTS_STD,
    WanVAE,
    WanVAEConfig,
    patchify,
    tiled_video,
    unpatchify,
)
from diffsynth.runtime.testing import conformance as cf

VARIANTS = ("2.1", "2.2")


def tiny_config(variant: str = "2.1", **overrides) -> WanVAEConfig:
    """The only place tiny Wan VAE sizes live. Four stages and two residual blocks per stage, as
    diffusers' 2.1 converter hard-codes those indices; 2.2 keeps the release's channel ratios."""
    if variant == "2.1":
        kwargs = dict(base_dim=8, z_dim=4, latents_mean=(0.3, -0.2, 0.1, 0.0), latents_std=(1.5, 0.5, 2.0, 1.0))
    else:
        kwargs = dict(
            variant="2.2",
            base_dim=16,
            decoder_base_dim=16,
            z_dim=8,
            latents_mean=tuple(0.1 * i - 0.3 for i in range(8)),
            latents_std=tuple(0.5 + 0.1 * i for i in range(8)),
        )
    kwargs.update(overrides)
    return WanVAEConfig(**kwargs)


def tiny_model(variant: str = "2.1", seed: int = 0, **overrides) -> WanVAE:
    torch.manual_seed(seed)
    model = WanVAE(tiny_config(variant, **overrides)).eval()
    with torch.no_grad():  # norms away from 1, so every parameter matters
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
    return model


def tiny_video(variant: str = "2.1", frames: int = 5, seed: int = 0, size: tuple[int, int] | None = None):
    h, w = size or ((32, 24) if variant == "2.1" else (32, 48))
    return torch.rand(1, 3, frames, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_default_configs_are_the_releases():
    c21, c22 = WanVAEConfig(), WanVAEConfig(variant="2.2")
    assert (c21.base_dim, c21.decoder_base_dim, c21.z_dim, c21.is_residual, c21.patch_size) == (96, 96, 16, False, 1)
    assert (c22.base_dim, c22.decoder_base_dim, c22.z_dim, c22.is_residual, c22.patch_size) == (160, 256, 48, True, 2)
    assert c21.latents_mean == WAN21_LATENTS_MEAN and c22.latents_std == WAN22_LATENTS_STD
    assert len(c21.latents_std) == 16 and len(c22.latents_mean) == 48
    assert WanVAEConfig(variant="2.1", base_dim=96, z_dim=16, temporal_downsample=[False, True, True]) == c21
    with torch.device("meta"):
        m21, m22 = WanVAE(c21), WanVAE(c22)
    assert (m21.spatial_compression, m21.temporal_compression, m21.z_dim) == (8, 4, 16)
    assert (m22.spatial_compression, m22.temporal_compression, m22.z_dim) == (16, 4, 48)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match=r"variant must be one of \['2.1', '2.2'\], got '2.3'"):
        WanVAEConfig(variant="2.3")
    with pytest.raises(ValueError, match=r"latents_mean must be given for z_dim=4 .*z_dim=16"):
        WanVAEConfig(z_dim=4)
    with pytest.raises(ValueError, match=r"latents_std has 3 values, expected z_dim=4"):
        tiny_config(latents_std=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="latents_std must be positive"):
        tiny_config(latents_std=(1.0, 0.0, 1.0, 1.0))
    with pytest.raises(ValueError, match=r"temporal_downsample has 2 entries but dim_mult=\(1, 2, 4, 4\) has 3"):
        tiny_config(temporal_downsample=(True, True))
    with pytest.raises(ValueError, match="base_dim must be a positive int, got 0"):
        tiny_config(base_dim=0)
    with pytest.raises(ValueError, match=r"encoder widths 16->48 do not divide"):
        tiny_config("2.2", dim_mult=(1, 3, 4, 4))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("frames", [1, 9])
def test_encode_decode_shapes(variant, frames):
    model = tiny_model(variant)
    video = tiny_video(variant, frames)
    s = model.spatial_compression
    with torch.no_grad():
        latents = model.encode(video)
        assert latents.shape == (1, model.z_dim, 1 + (frames - 1) // 4, video.shape[3] // s, video.shape[4] // s)
        decoded = model.decode(latents)
    assert decoded.shape == video.shape
    assert decoded.abs().max() <= 1.0  # clamped, as the authors do


@pytest.mark.parametrize("variant", VARIANTS)
def test_conformance(variant):
    video = tiny_video(variant, 5)

    def factory():
        return tiny_model(variant)

    cf.check_forward(factory, (video,), expected_shapes=[video.shape])
    cf.check_meta_load(factory, (video,))
    cf.check_declared_units(factory)
    cf.check_backward(factory, (video,))


def test_first_latent_frame_sees_only_the_first_frame():
    """Causality, exactly: latent frame k depends on input frames <= 4k only, and decoded frames
    up to 4k depend on latent frames <= k only (chunks before a change are computed the same)."""
    model = tiny_model()
    video = tiny_video(frames=9)
    changed = video.clone()
    changed[:, :, 1:] = torch.rand_like(changed[:, :, 1:])
    later = video.clone()
    later[:, :, 5:] = -later[:, :, 5:]
    with torch.no_grad():
        latents = model.encode(video)
        assert torch.equal(model.encode(changed)[:, :, :1], latents[:, :, :1])
        from_later = model.encode(later)
        assert torch.equal(from_later[:, :, :2], latents[:, :, :2]) and not torch.equal(from_later, latents)
        decoded = model.decode(latents)
        edited = latents.clone()
        edited[:, :, 2] += 1.0
        redecoded = model.decode(edited)
    assert torch.equal(redecoded[:, :, :5], decoded[:, :, :5]) and not torch.equal(redecoded, decoded)


@pytest.mark.parametrize("variant", VARIANTS)
def test_chunked_pass_equals_one_shot(variant):
    """The feature cache makes chunked processing the same function as one pass over all frames
    (only the float rounding of differently-shaped convolutions differs)."""
    model = tiny_model(variant)
    video = tiny_video(variant, 9)
    p = model.config.patch_size
    with torch.no_grad():
        one_shot = model.conv1(model.encoder(patchify(video, p)))
        assert torch.allclose(model._moments(video), one_shot, atol=1e-5, rtol=0)
        z = torch.randn(1, model.z_dim, 3, 2, 3, generator=torch.Generator().manual_seed(1))
        one_shot = unpatchify(model.decoder(model.conv2(z)), p)
        assert torch.allclose(model._decode_raw(z), one_shot, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_one_tile_covering_the_video_equals_untiled_exactly(variant):
    model = tiny_model(variant)
    video = tiny_video(variant, 5)
    grid = (video.shape[3] // model.spatial_compression, video.shape[4] // model.spatial_compression)
    with torch.no_grad():
        latents = model.encode(video)
        for tile in (grid, (8, 8)):  # exactly the latent grid, and larger than it
            assert torch.equal(model.encode(video, tiled=True, tile_size=tile, tile_stride=(1, 1)), latents)
            assert torch.equal(model.decode(latents, tiled=True, tile_size=tile, tile_stride=2), model.decode(latents))


@pytest.mark.parametrize("in_cell, out_cell", [(1, 4), (4, 1)])  # decode-like, encode-like
def test_tile_weights_form_a_partition_of_unity(in_cell, out_cell):
    """For a position-wise function tiling is invisible: only float32 rounding remains."""
    x = torch.randn(1, 2, 3, 11 * in_cell, 9 * in_cell)

    def pointwise(t):
        t = torch.nn.functional.avg_pool3d(t, (1, in_cell, in_cell)) if in_cell > 1 else t
        return torch.tanh(2 * t.repeat_interleave(out_cell, 3).repeat_interleave(out_cell, 4))

    out = tiled_video(pointwise, x, (5, 4), (3, 2), in_cell=in_cell, out_cell=out_cell)
    assert torch.allclose(out, pointwise(x), atol=1e-6, rtol=0)


def test_tiled_decode_runs_on_several_tiles():
    model = tiny_model()
    with torch.no_grad():
        latents = model.encode(tiny_video(frames=5, size=(48, 48)))
        full = model.decode(latents)
        tiled = model.decode(latents, tiled=True, tile_size=4, tile_stride=2)
    assert tiled.shape == full.shape and torch.isfinite(tiled).all() and tiled.abs().max() <= 1.0


def test_tiled_decode_stays_within_the_envelope_of_its_tiles():
    """The documented bound: a tile decoded alone differs from the same region of the untiled
    decode by some e_i(p) (its convolutions and mid-block attention see only the tile; with
    random weights that is large). Blending is a convex combination and the clamp to [-1, 1] is
    monotone, so at every pixel the tiled error is at most the largest e_i(p) of the tiles
    covering it (plus float32 rounding), and on average below it (seams are averaged away)."""
    model = tiny_model()
    s = model.spatial_compression
    with torch.no_grad():
        latents = model.encode(tiny_video(frames=5, size=(48, 48)))
        assert latents.shape[-2:] == (48 // s, 48 // s) == (6, 6)
        full = model.decode(latents)
        envelope = torch.full_like(full, -1.0)
        spans = [(0, 4), (2, 6)]  # the latent tiles that tile_size=4, tile_stride=2 give on 6 cells
        for r0, r1 in spans:
            for c0, c1 in spans:
                tile = model.decode(latents[..., r0:r1, c0:c1])
                region = (..., slice(r0 * s, r1 * s), slice(c0 * s, c1 * s))
                envelope[region] = torch.maximum(envelope[region], (tile - full[region]).abs())
        err = (model.decode(latents, tiled=True, tile_size=4, tile_stride=2) - full).abs()
    assert (envelope >= 0).all()  # the tiles cover everything
    assert (err <= envelope + 1e-5).all()
    assert err.mean() < envelope.mean()


def test_encode_samples_the_posterior_reproducibly():
    model = tiny_model()
    video = tiny_video(frames=1)
    with torch.no_grad():
        a = model.encode(video, sample=True, generator=torch.Generator().manual_seed(1))
        b = model.encode(video, sample=True, generator=torch.Generator().manual_seed(1))
        c = model.encode(video, sample=True, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_latents_are_normalised_with_the_config_statistics():
    model = tiny_model()
    video = tiny_video(frames=1)
    mean = torch.tensor(model.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(model.config.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        raw = model._moments(video)[:, : model.z_dim]
        latents = model.encode(video)
        assert torch.allclose(latents, (raw - mean) / std, atol=1e-6)
        assert torch.allclose(model.decode(latents), model._decode_raw(raw).clamp(-1, 1), atol=1e-5)


def test_patchify_channel_order_is_the_release_one():
    """Channel c*4 + 2*column_offset + row_offset, as in the released 2.2 weights."""
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).view(1, 2, 3, 4, 6)
    packed = patchify(x, 2)
    assert packed.shape == (1, 8, 3, 2, 3)
    assert torch.equal(packed[:, 1], x[:, 0, :, 1::2, 0::2])
    assert torch.equal(packed[:, 2], x[:, 0, :, 0::2, 1::2])
    assert torch.equal(packed[:, 7], x[:, 1, :, 1::2, 1::2])
    assert torch.equal(unpatchify(packed, 2), x)


def test_bfloat16_runs():
    model = tiny_model("2.2").to(torch.bfloat16)
    with torch.no_grad():
        out = model.decode(model.encode(tiny_video("2.2", 5).bfloat16()))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_bad_inputs_name_the_argument():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"video has 4 frames; this VAE needs 1 \+ 4k frames \(e.g. 1 or 5\)"):
        model.encode(torch.zeros(1, 3, 4, 16, 16))
    with pytest.raises(ValueError, match=r"video has 83 frames; .*\(e.g. 81 or 85\)"):
        model.encode(torch.zeros(1, 3, 83, 8, 8))
    with pytest.raises(ValueError, match=r"video must be a \[B, 3, F, H, W\] tensor, got \(1, 3, 16, 16\)"):
        model.encode(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"video height and width must be multiples of 8, got \(16, 12\)"):
        model.encode(torch.zeros(1, 3, 1, 16, 12))
    with pytest.raises(ValueError, match=r"latents must be a \[B, 4, T, H, W\] tensor, got \(1, 16, 1, 2, 2\)"):
        model.decode(torch.zeros(1, 16, 1, 2, 2))
    with pytest.raises(ValueError, match="tile_size must be a positive int or"):
        model.decode(torch.zeros(1, 4, 1, 2, 2), tiled=True, tile_size=(0, 4))
    with pytest.raises(ValueError, match=r"tile_stride=\(8, 8\) must not exceed tile_size=\(4, 4\)"):
        model.decode(torch.zeros(1, 4, 1, 2, 2), tiled=True, tile_size=4, tile_stride=8)


def test_declared_units_are_stages():
    model = tiny_model("2.2")
    assert [type(m).__name__ for m in model.get_submodule("encoder.downsamples")] == ["DownStage"] * 4
    assert [type(m).__name__ for m in model.get_submodule("decoder.upsamples")] == ["UpStage"] * 4
    assert len(tiny_model().get_submodule("decoder.upsamples")) == 15  # 2.1: a flat list, as in the file
