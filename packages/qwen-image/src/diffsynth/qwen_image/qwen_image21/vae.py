"""The Qwen-Image 2.1 image VAE: Wan 2.2's residual autoencoder, cut down to one RGBA image.

The network is the Wan 2.2 design (RMS norms, residual stages whose shortcuts carry no weights: a
channel-averaging space-to-depth on the way down, a channel-repeating depth-to-space on the way up)
with every causal 3D convolution reduced to a 2D one, 4 pixel channels (RGBA), 64 latent channels
and 16x spatial compression. An image is what Wan calls the first chunk of a video, so that is the
only path kept here, with these consequences:

- the temporal resamplers never run their `time_conv` (the first frame passes through them); their
  weights are still in the checkpoint and are kept so that it loads strictly;
- a temporally downsampling stage's averaging shortcut sees the image plus a zero frame in front
  (it averages over time too), so that half of what it averages is zeros;
- a temporally upsampling stage's repeating shortcut keeps only the last of the two frames it makes.

Module names are diffusers' `AutoencoderKLQwenImage21` state-dict keys (the hub's `vae/` folder),
so the official file loads without conversion. `encode`/`decode` speak normalised latents: the
posterior mean standardised with the per-channel `latents_mean`/`latents_std` of the config, as the
Qwen-Image 2.1 pipelines do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.models.wan_vae import AttentionBlock, RMSNorm, avg_down, dup_up, tiled_video

# Per-channel statistics of the released latents (Qwen/Qwen-Image-2.1 `vae/config.json`).
QWEN_IMAGE21_LATENTS_MEAN = (
    0.5126, 0.7721, -0.0631, 1.3506, -0.7855, -2.1025, -0.3458, 1.3722,
    1.8873, -1.7177, -0.6510, 0.2732, 0.7562, -0.6163, -1.0277, 3.8363,
    2.0210, 0.0472, 0.9320, 2.0087, 2.4954, -0.1391, -1.4249, 1.8464,
    -0.5236, 1.2826, 3.7046, -1.3035, 2.7286, -1.4518, -1.9036, -1.9955,
    -0.0342, -1.0265, -0.7636, 3.0555, 0.0746, -3.0751, -0.1076, 1.7376,
    -1.0914, -1.9435, -0.2784, -1.3680, 0.4809, -0.4433, 0.3764, 0.5729,
    -2.0595, 1.0960, -1.3260, -2.0211, -5.0179, 0.5275, 4.0162, 1.8505,
    0.3026, 1.9373, 1.4937, 0.2632, 0.5547, -1.7121, -0.1562, 0.0304,
)  # fmt: skip
QWEN_IMAGE21_LATENTS_STD = (
    3.2001, 3.2936, 3.4321, 3.0091, 3.1061, 4.0379, 4.0705, 3.7910,
    3.0785, 3.6500, 3.9308, 3.0904, 2.8778, 3.7675, 3.7320, 5.0756,
    3.2864, 4.0397, 3.1317, 4.0443, 2.9249, 3.9454, 3.0988, 4.2489,
    3.4896, 3.8513, 3.9323, 3.4719, 3.7498, 4.2830, 3.5694, 4.2467,
    3.9037, 3.2947, 5.0770, 3.5075, 3.2700, 3.4767, 2.8063, 5.1125,
    3.5327, 4.7833, 3.1286, 4.1819, 3.8527, 3.8312, 3.5605, 4.3875,
    3.9624, 4.0168, 3.5643, 4.0550, 5.5614, 4.2963, 4.4080, 3.4959,
    3.8747, 3.7608, 3.5735, 3.1490, 3.7662, 3.6746, 3.4563, 3.8161,
)  # fmt: skip

DEFAULT_TILE_SIZE = (32, 32)  # latent cells (512 pixels), as the runtime AutoencoderKL's 512-pixel tiles
DEFAULT_TILE_STRIDE = (24, 24)  # 128 pixels of overlap


@dataclass
class QwenImage21VAEConfig:
    """Defaults are the released VAE (`Qwen/Qwen-Image-2.1` `vae/`).

    `dim_mult` gives each encoder stage's width in units of `base_dim` (the decoder mirrors it in
    units of `decoder_base_dim`, None meaning `base_dim`); every stage but the last halves the
    resolution, so the spatial compression is `2 ** (len(dim_mult) - 1)`. `temporal_downsample`
    marks the stages that were trained to also halve time: for an image this only changes the
    averaging/repeating shortcuts (see the module docstring) and which stages carry a `time_conv`.
    """

    base_dim: int = 96
    decoder_base_dim: int | None = 144
    z_dim: int = 64
    dim_mult: tuple[int, ...] = (1, 2, 4, 8, 8)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True, True)
    in_channels: int = 4
    out_channels: int = 4
    latents_mean: tuple[float, ...] = QWEN_IMAGE21_LATENTS_MEAN
    latents_std: tuple[float, ...] = QWEN_IMAGE21_LATENTS_STD

    def __post_init__(self):
        if self.decoder_base_dim is None:
            self.decoder_base_dim = self.base_dim
        for name in ("base_dim", "decoder_base_dim", "z_dim", "num_res_blocks", "in_channels", "out_channels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"QwenImage21VAEConfig.{name} must be a positive int, got {value!r}")
        self.dim_mult = tuple(self.dim_mult)
        if not self.dim_mult or not all(isinstance(m, int) and m >= 1 for m in self.dim_mult):
            raise ValueError(f"QwenImage21VAEConfig.dim_mult must be positive int multipliers, got {self.dim_mult!r}")
        self.temporal_downsample = tuple(bool(t) for t in self.temporal_downsample)
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"QwenImage21VAEConfig.temporal_downsample has {len(self.temporal_downsample)} entries but "
                f"dim_mult={self.dim_mult} has {len(self.dim_mult) - 1} downsampling stages"
            )
        for name in ("latents_mean", "latents_std"):
            values = tuple(float(v) for v in getattr(self, name))
            if len(values) != self.z_dim:
                raise ValueError(
                    f"QwenImage21VAEConfig.{name} has {len(values)} values but z_dim={self.z_dim} "
                    f"(pass {name} for a z_dim other than the released 64)"
                )
            setattr(self, name, values)
        if min(self.latents_std) <= 0:
            raise ValueError(f"QwenImage21VAEConfig.latents_std must be positive, got {self.latents_std!r}")
        self._check_shortcut_widths()

    def _check_shortcut_widths(self):
        """The weight-free shortcuts regroup channels: a stage's widths must divide evenly."""
        last = len(self.dim_mult) - 1
        for i, (cin, cout) in enumerate(zip(self.encoder_widths, self.encoder_widths[1:], strict=False)):
            factor = (4 if i < last else 1) * (2 if i < last and self.temporal_downsample[i] else 1)
            if cin * factor % cout:
                raise ValueError(
                    f"QwenImage21VAEConfig: encoder stage {i} goes {cin}->{cout} channels, which its averaging "
                    f"shortcut cannot regroup ({cin}x{factor} is not a multiple of {cout}); check base_dim/dim_mult"
                )
        ups = self.temporal_upsample
        for i, (cin, cout) in enumerate(zip(self.decoder_widths[:last], self.decoder_widths[1:], strict=False)):
            factor = 4 * (2 if ups[i] else 1)
            if cout * factor % cin:
                raise ValueError(
                    f"QwenImage21VAEConfig: decoder stage {i} goes {cin}->{cout} channels, which its repeating "
                    f"shortcut cannot regroup ({cout}x{factor} is not a multiple of {cin}); "
                    "check decoder_base_dim/dim_mult"
                )

    @property
    def encoder_widths(self) -> tuple[int, ...]:
        """Channels entering the first stage, then after each stage."""
        return tuple(self.base_dim * m for m in (1, *self.dim_mult))

    @property
    def decoder_widths(self) -> tuple[int, ...]:
        """Channels entering the first decoder stage, then after each stage."""
        return tuple(self.decoder_base_dim * m for m in (self.dim_mult[-1], *reversed(self.dim_mult)))

    @property
    def temporal_upsample(self) -> tuple[bool, ...]:
        return tuple(reversed(self.temporal_downsample))


# ----------------------------------------------------------------------------------- building blocks
class ImageRMSNorm(RMSNorm):
    """The runtime's Wan RMS norm on `[B, C, H, W]`; its gain keeps the `[C, 1, 1, 1]` shape of the file."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.unsqueeze(2)).squeeze(2)


class ResBlock(nn.Module):
    """norm, SiLU, 3x3 conv, twice, plus the input (through a 1x1 conv when the width changes)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.norm1 = ImageRMSNorm(in_dim)
        self.conv1 = nn.Conv2d(in_dim, out_dim, 3, padding=1)
        self.norm2 = ImageRMSNorm(out_dim)
        self.conv2 = nn.Conv2d(out_dim, out_dim, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return self.conv_shortcut(x) + self.conv2(F.silu(self.norm2(h)))


class Resample(nn.Module):
    """2x down (pad right/bottom, stride-2 3x3 conv) or 2x up (nearest, 3x3 conv) in space.

    `temporal` stages also hold the 1x1 `time_conv` that mixes frames in the video model; a single
    image never goes through it, it is here so that the released weights load strictly.
    """

    def __init__(self, dim: int, up: bool, temporal: bool):
        super().__init__()
        if up:
            self.resample = nn.Sequential(
                nn.Upsample(scale_factor=2.0, mode="nearest-exact"), nn.Conv2d(dim, dim, 3, padding=1)
            )
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        if temporal:
            self.time_conv = nn.Conv2d(dim, 2 * dim if up else dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resample(x)


class DownBlock(nn.Module):
    """Encoder stage: residual blocks and a downsampler, plus a weight-free averaging shortcut."""

    def __init__(self, in_dim: int, out_dim: int, num_blocks: int, temporal: bool, spatial: bool):
        super().__init__()
        self.out_dim, self.ft, self.fs = out_dim, 2 if temporal else 1, 2 if spatial else 1
        self.resnets = nn.ModuleList(ResBlock(in_dim if j == 0 else out_dim, out_dim) for j in range(num_blocks))
        self.downsampler = Resample(out_dim, up=False, temporal=temporal) if spatial else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the image is a one-frame video: a temporal factor puts a zero frame in front of it
        shortcut = avg_down(x.unsqueeze(2), self.out_dim, self.ft, self.fs).squeeze(2)
        for block in self.resnets:
            x = block(x)
        if self.downsampler is not None:
            x = self.downsampler(x)
        return x + shortcut


class UpBlock(nn.Module):
    """Decoder stage: residual blocks and an upsampler, plus a weight-free repeating shortcut."""

    def __init__(self, in_dim: int, out_dim: int, num_blocks: int, temporal: bool, spatial: bool):
        super().__init__()
        self.out_dim, self.ft, self.spatial = out_dim, 2 if temporal else 1, spatial
        self.resnets = nn.ModuleList(ResBlock(in_dim if j == 0 else out_dim, out_dim) for j in range(num_blocks))
        self.upsampler = Resample(out_dim, up=True, temporal=temporal) if spatial else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        for block in self.resnets:
            x = block(x)
        if self.upsampler is None:
            return x
        # of the frames a temporal factor makes, the first chunk of a video keeps only the last
        return self.upsampler(x) + dup_up(shortcut.unsqueeze(2), self.out_dim, self.ft, 2)[:, :, -1]


class MidBlock(nn.Module):
    """Residual block, single-head self-attention over all pixels, residual block."""

    def __init__(self, dim: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResBlock(dim, dim), ResBlock(dim, dim)])
        self.attentions = nn.ModuleList([AttentionBlock(dim)])  # the runtime's, on a one-frame video

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        x = self.attentions[0](x.unsqueeze(2)).squeeze(2)
        return self.resnets[1](x)


class Encoder(nn.Module):
    """Image -> `2 * z_dim` posterior moments (mean, log-variance) at 1/16 the size."""

    def __init__(self, config: QwenImage21VAEConfig):
        super().__init__()
        dims, last = config.encoder_widths, len(config.dim_mult) - 1
        self.conv_in = nn.Conv2d(config.in_channels, dims[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownBlock(
                dims[i],
                dims[i + 1],
                config.num_res_blocks,
                temporal=i < last and config.temporal_downsample[i],
                spatial=i < last,
            )
            for i in range(last + 1)
        )
        self.mid_block = MidBlock(dims[-1])
        self.norm_out = ImageRMSNorm(dims[-1])
        self.conv_out = nn.Conv2d(dims[-1], 2 * config.z_dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    """`z_dim` latents -> image (unclamped); each stage holds `num_res_blocks + 1` residual blocks."""

    def __init__(self, config: QwenImage21VAEConfig):
        super().__init__()
        dims, last, ups = config.decoder_widths, len(config.dim_mult) - 1, config.temporal_upsample
        self.conv_in = nn.Conv2d(config.z_dim, dims[0], 3, padding=1)
        self.mid_block = MidBlock(dims[0])
        self.up_blocks = nn.ModuleList(
            UpBlock(dims[i], dims[i + 1], config.num_res_blocks + 1, temporal=i < last and ups[i], spatial=i < last)
            for i in range(last + 1)
        )
        self.norm_out = ImageRMSNorm(dims[-1])
        self.conv_out = nn.Conv2d(dims[-1], config.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.norm_out(x)))


# ----------------------------------------------------------------------------------- the model
class QwenImage21VAE(nn.Module):
    """Image `[B, 4, H, W]` in [-1, 1] <-> normalised latents `[B, 64, H/16, W/16]`."""

    # dotted paths the runtime reads; a ModuleList path means each of its children is one unit
    offload_units = ("encoder.down_blocks", "encoder.mid_block", "decoder.mid_block", "decoder.up_blocks")
    compile_units = ("encoder.down_blocks", "encoder.mid_block", "decoder.mid_block", "decoder.up_blocks")

    def __init__(self, config: QwenImage21VAEConfig | None = None):
        super().__init__()
        self.config = config = config if config is not None else QwenImage21VAEConfig()
        if not isinstance(config, QwenImage21VAEConfig):
            raise ConfigError(f"QwenImage21VAE needs a QwenImage21VAEConfig, got {type(config).__name__}")
        self.encoder = Encoder(config)
        self.quant_conv = nn.Conv2d(2 * config.z_dim, 2 * config.z_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder(config)

    @property
    def latent_channels(self) -> int:
        return self.config.z_dim

    @property
    def z_dim(self) -> int:
        """Same as `latent_channels` (the name the Wan VAE uses)."""
        return self.config.z_dim

    @property
    def spatial_compression(self) -> int:
        return 2 ** (len(self.config.dim_mult) - 1)

    def encode(
        self,
        pixels: torch.Tensor,
        *,
        tiled: bool = False,
        tile_size: int | tuple[int, int] = DEFAULT_TILE_SIZE,
        tile_stride: int | tuple[int, int] = DEFAULT_TILE_STRIDE,
    ) -> torch.Tensor:
        """Normalised latents `(z - latents_mean) / latents_std`, `[B, z_dim, H/16, W/16]`.

        `z` is the posterior's mean (what the Qwen-Image 2.1 pipelines take; the log-variance half of
        the moments is dropped). Tiles are `(height, width)` in latent cells (an int means square);
        overlapping tiles are blended linearly.
        """
        s, c = self.spatial_compression, self.config.in_channels
        if not isinstance(pixels, torch.Tensor) or pixels.dim() != 4 or pixels.shape[1] != c:
            got = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
            raise ConfigError(f"pixels must be a [B, {c}, H, W] tensor (RGBA in [-1, 1]), got {got}")
        if pixels.shape[2] % s or pixels.shape[3] % s:
            raise ConfigError(f"image height and width must be multiples of {s}, got {tuple(pixels.shape[2:])}")
        if tiled:
            moments = _tiled_image(self._moments, pixels, tile_size, tile_stride, in_cell=s, out_cell=1)
        else:
            moments = self._moments(pixels)
        z = moments[:, : self.config.z_dim]
        shift, scale = self._latent_stats(z)
        return (z - shift) / scale

    def decode(
        self,
        latents: torch.Tensor,
        *,
        tiled: bool = False,
        tile_size: int | tuple[int, int] = DEFAULT_TILE_SIZE,
        tile_stride: int | tuple[int, int] = DEFAULT_TILE_STRIDE,
    ) -> torch.Tensor:
        """Image `[B, out_channels, 16h, 16w]` clamped to [-1, 1] from normalised latents; tile sizes as
        in `encode` (latent cells)."""
        z = self.config.z_dim
        if not isinstance(latents, torch.Tensor) or latents.dim() != 4 or latents.shape[1] != z:
            got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ConfigError(f"latents must be a [B, {z}, h, w] tensor, got {got}")
        shift, scale = self._latent_stats(latents)
        raw = latents * scale + shift
        if tiled:
            s = self.spatial_compression
            image = _tiled_image(self._decode_raw, raw, tile_size, tile_stride, in_cell=1, out_cell=s)
        else:
            image = self._decode_raw(raw)
        return image.clamp(-1.0, 1.0)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Reconstruction through the posterior mean (a smoke path; pipelines call encode/decode)."""
        return self.decode(self.encode(pixels))

    def _moments(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(pixels))

    def _decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(self.config.latents_mean, device=like.device, dtype=like.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.config.latents_std, device=like.device, dtype=like.dtype).view(1, -1, 1, 1)
        return mean, std


def _tiled_image(fn, x: torch.Tensor, tile_size, tile_stride, *, in_cell: int, out_cell: int) -> torch.Tensor:
    """The runtime's video tiling (`wan_vae.tiled_video`) on an image seen as a one-frame video."""
    cells = []
    for name, value in (("tile_size", tile_size), ("tile_stride", tile_stride)):
        pair = (value, value) if isinstance(value, int) else tuple(value)
        if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in pair):
            raise ConfigError(f"{name} must be a positive int or (height, width) in latent cells, got {value!r}")
        cells.append(pair)
    (th, tw), (sh, sw) = cells
    if sh > th or sw > tw:
        raise ConfigError(f"tile_stride={(sh, sw)} must not exceed tile_size={(th, tw)} (tiles would leave gaps)")
    out = tiled_video(
        lambda frame: fn(frame.squeeze(2)).unsqueeze(2),
        x.unsqueeze(2),
        (th, tw),
        (sh, sw),
        in_cell=in_cell,
        out_cell=out_cell,
    )
    return out.squeeze(2)


__all__ = [
    "DEFAULT_TILE_SIZE",
    "DEFAULT_TILE_STRIDE",
    "QWEN_IMAGE21_LATENTS_MEAN",
    "QWEN_IMAGE21_LATENTS_STD",
    "QwenImage21VAE",
    "QwenImage21VAEConfig",
]
