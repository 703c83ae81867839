"""AutoencoderKL on a tiny config: shapes, tiling, input checks, declared units."""

from __future__ import annotations

import pytest
import torch

from diffsynth.runtime.models.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig, _tiled


def tiny_config(**overrides) -> AutoencoderKLConfig:
    """The only place tiny AutoencoderKL sizes live (2 stages: 2x compression; groups of 32)."""
    kwargs = dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=32)
    kwargs.update(overrides)
    return AutoencoderKLConfig(**kwargs)


def tiny_model(seed: int = 0, **overrides) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(tiny_config(**overrides)).eval()


def smooth_image(size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 8, 8, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def test_default_config_is_flux1():
    config = AutoencoderKLConfig()
    assert config.latent_channels == 16 and config.block_out_channels == (128, 256, 512, 512)
    assert (config.scaling_factor, config.shift_factor) == (0.3611, 0.1159)
    with torch.device("meta"):
        assert AutoencoderKL(config).spatial_compression == 8


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match=r"block_out_channels\[1\]=48.*norm_num_groups=32"):
        tiny_config(block_out_channels=(32, 48))
    with pytest.raises(ValueError, match="latent_channels"):
        tiny_config(latent_channels=0)
    with pytest.raises(ValueError, match="scaling_factor"):
        tiny_config(scaling_factor=0.0)


@pytest.mark.parametrize("quant", [False, True])
def test_encode_decode_shapes(quant):
    model = tiny_model(use_quant_conv=quant, use_post_quant_conv=quant)
    image = torch.rand(2, 3, 16, 24) * 2 - 1
    with torch.no_grad():
        latents = model.encode(image)
        assert latents.shape == (2, 4, 8, 12)
        assert model.decode(latents).shape == (2, 3, 16, 24)
        assert model(image).shape == image.shape


def test_encode_normalises_the_posterior_mean():
    """Latents are (mean - shift) * scale; sampling adds noise scaled by the posterior's std."""
    model = tiny_model(scaling_factor=0.5, shift_factor=0.25)
    image = smooth_image(16)
    with torch.no_grad():
        mean = model.encoder(image)[:, :4]
        assert torch.allclose(model.encode(image), (mean - 0.25) * 0.5)
        a = model.encode(image, sample=True, generator=torch.Generator().manual_seed(1))
        b = model.encode(image, sample=True, generator=torch.Generator().manual_seed(1))
        c = model.encode(image, sample=True, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bfloat16_runs():
    model = tiny_model().to(torch.bfloat16)
    with torch.no_grad():
        out = model.decode(model.encode(smooth_image(16).bfloat16()))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_bad_inputs_name_the_argument():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"image must be a \[B, 3, H, W\] tensor, got \(1, 4, 16, 16\)"):
        model.encode(torch.zeros(1, 4, 16, 16))
    with pytest.raises(ValueError, match=r"image height and width must be multiples of 2, got \(16, 15\)"):
        model.encode(torch.zeros(1, 3, 16, 15))
    with pytest.raises(ValueError, match=r"latents must be a \[B, 4, H/8, W/8\] tensor"):
        model.decode(torch.zeros(1, 16, 8, 8))
    with pytest.raises(ValueError, match="tile_size must be a positive multiple of 2"):
        model.decode(torch.zeros(1, 4, 8, 8), tiled=True, tile_size=7)
    with pytest.raises(ValueError, match="tile_stride=16 must not exceed tile_size=8"):
        model.encode(torch.zeros(1, 3, 16, 16), tiled=True, tile_size=8, tile_stride=16)


@pytest.mark.parametrize("tile_size", [32, 64])  # exactly the image, and larger than it
def test_one_tile_covering_the_image_equals_untiled_exactly(tile_size):
    model = tiny_model()
    image = smooth_image(32)
    with torch.no_grad():
        latents = model.encode(image)
        assert torch.equal(model.encode(image, tiled=True, tile_size=tile_size, tile_stride=16), latents)
        assert torch.equal(
            model.decode(latents, tiled=True, tile_size=tile_size, tile_stride=16), model.decode(latents)
        )


@pytest.mark.parametrize(
    "grid, tile, stride",
    [(20, 8, 8), (20, 8, 6), (20, 8, 3), (17, 5, 4), (9, 9, 1)],  # hard cuts, end-aligned last tile, 3-deep overlap
)
@pytest.mark.parametrize("in_cell, out_cell", [(1, 4), (4, 1)])  # decode-like (upsampling), encode-like
def test_tile_weights_form_a_partition_of_unity(grid, tile, stride, in_cell, out_cell):
    """For a position-wise function tiling must be invisible: every output pixel is covered and
    the blend weights of the tiles covering it sum to one, so only float32 rounding remains."""
    x = torch.randn(2, 3, grid * in_cell, (grid + 3) * in_cell)

    def pointwise(t):  # resample by in_cell -> out_cell, then a position-wise nonlinearity
        t = torch.nn.functional.avg_pool2d(t, in_cell) if in_cell > 1 else t
        return torch.tanh(t.repeat_interleave(out_cell, 2).repeat_interleave(out_cell, 3) * 2)

    out = _tiled(pointwise, x, tile, stride, in_cell=in_cell, out_cell=out_cell)
    assert torch.allclose(out, pointwise(x), atol=1e-6, rtol=0)


def test_tiled_close_to_untiled_on_a_larger_image():
    """Tolerance, justified: a tile's group norms and mid-block attention see only the tile, so a
    tile's output differs from the same region of the untiled output by some amount e_i(p) that
    is the model's own (with random weights it is large: nothing makes an untrained VAE's
    statistics the same in every crop). Blending is a convex combination of the tile outputs, so
    at every pixel the tiled error must lie within the largest e_i(p) of the tiles covering it
    (plus float32 rounding), and on average below it: seams are averaged away, not picked."""
    model = tiny_model()
    f = model.spatial_compression
    image = smooth_image(96)
    spans = [(0, 64), (32, 96)]  # the pixel tiles that tile_size=64, tile_stride=32 give on 96 px
    with torch.no_grad():
        latents = model.encode(image)
        full = model.decode(latents)
        cases = (
            (model.encode, image, latents, 1, f),  # (run, input, untiled output, pixels per input/output sample)
            (model.decode, latents, full, f, 1),
        )
        for run, inp, ref, in_div, out_div in cases:
            envelope = torch.full_like(ref, -1.0)
            for r0, r1 in spans:
                for c0, c1 in spans:
                    tile = run(inp[:, :, r0 // in_div : r1 // in_div, c0 // in_div : c1 // in_div])
                    rows, cols = slice(r0 // out_div, r1 // out_div), slice(c0 // out_div, c1 // out_div)
                    envelope[:, :, rows, cols] = torch.maximum(
                        envelope[:, :, rows, cols], (tile - ref[:, :, rows, cols]).abs()
                    )
            assert (envelope >= 0).all()  # the tiles cover everything
            err = (run(inp, tiled=True, tile_size=64, tile_stride=32) - ref).abs()
            assert (err <= envelope + 1e-5).all()
            assert err.mean() < 0.9 * envelope.mean()


def test_declared_units_exist():
    model = tiny_model()
    for path in (*model.offload_units, *model.compile_units):
        assert isinstance(model.get_submodule(path), torch.nn.Module)
    assert len(model.get_submodule("decoder.up_blocks")) == 2
