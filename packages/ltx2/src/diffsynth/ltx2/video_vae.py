"""The LTX-2 video VAE: 32x spatial / 8x temporal compression into 128 latent channels.

A plain convolutional VAE without attention or norm weights (the norms are parameter-free RMS over
channels), so the whole model is 3x3x3 convolutions plus rearrangements:

- the video is first patchified 4x4 (3 -> 48 channels);
- the encoder alternates residual stages with space-to-depth downsamplers whose skip path averages
  channel groups (no weights); each downsampler halves space, time or both and multiplies the channels
  (by 2 at every stage in LTX-2.0; LTX-2.3's last one keeps the width);
- the decoder mirrors it with depth-to-space upsamplers whose optional skip path repeats channels; each
  divides the channels (LTX-2.0: three residual 2x-all stages halving the width; LTX-2.3: four stages,
  all / all / time / space, none residual, the second keeping the width);
- time is padded by repeating the edge frames (first frame only when causal, both ends otherwise);
  the encoder is causal and the released decoder is not. The first frame is special: temporal
  downsamplers duplicate it before pairing frames and upsamplers drop the extra first frame, so
  `1 + 8k` frames map to `1 + k` latent frames and back.

Module names are ltx-core's (`vae.*` of `ltx-2-19b-dev.safetensors` without the prefix), so the
original file loads as is; `video_vae_formats` converts diffusers' `AutoencoderKLLTX2Video`. Of the five
`per_channel_statistics` vectors in the file only `mean-of-means` / `std-of-means` are used (by
ltx-core and diffusers' pipelines alike): latents are `(z - mean-of-means) / std-of-means`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from diffsynth.runtime.errors import ConfigError

# the Wan VAE's patch order (c, column offset, row offset) is ltx-core's too; `tiled_video` blends spatial tiles
from diffsynth.runtime.models.wan_vae import patchify, tiled_video, unpatchify

from .latent_statistics import PerChannelStatistics

# stride (time, height, width) of each resampling kind
STRIDES = {"space": (1, 2, 2), "time": (2, 1, 1), "all": (2, 2, 2)}
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
DEFAULT_TILE_SIZE = (16, 16)  # latent cells: 512 pixels; the stride defaults to 2 cells less (64-pixel overlaps)


@dataclass
class LTX2VideoVAEConfig:
    """Defaults are the released LTX-2.0 video VAE; `LTX2VideoVAEConfig.ltx23()` is LTX-2.3's.

    The encoder starts at `latent_channels` wide; each of `encoder_downsamples` ("space", "time" or
    "all") multiplies the width by its `encoder_width_multipliers` entry (ltx-core's `multiplier`);
    `encoder_layers` counts the residual blocks of each stage (one more stage than downsamplers). The
    decoder ends at `decoder_base_channels`; each upsampler divides the width by its
    `decoder_width_divisors` entry (diffusers' `upsample_factor`), so it starts at `decoder_base_channels`
    times their product. `decoder_layers` / `decoder_upsamples` / `decoder_upsample_residual` /
    `decoder_width_divisors` are listed from the latent side. Latents are `(z - mean) * scaling_factor / std`.
    """

    in_channels: int = 3
    latent_channels: int = 128
    patch_size: int = 4
    encoder_layers: tuple[int, ...] = (4, 6, 6, 2, 2)
    encoder_downsamples: tuple[str, ...] = ("space", "time", "all", "all")
    encoder_width_multipliers: tuple[int, ...] = (2, 2, 2, 2)
    decoder_base_channels: int = 128
    decoder_layers: tuple[int, ...] = (5, 5, 5, 5)
    decoder_upsamples: tuple[str, ...] = ("all", "all", "all")
    decoder_upsample_residual: tuple[bool, ...] = (True, True, True)
    decoder_width_divisors: tuple[int, ...] = (2, 2, 2)
    encoder_causal: bool = True
    decoder_causal: bool = False
    encoder_padding_mode: str = "zeros"
    decoder_padding_mode: str = "reflect"
    scaling_factor: float = 1.0

    def __post_init__(self):
        for name in ("encoder_layers", "encoder_downsamples", "decoder_layers", "decoder_upsamples", *_RATIOS):
            setattr(self, name, tuple(getattr(self, name)))
        self.decoder_upsample_residual = tuple(bool(r) for r in self.decoder_upsample_residual)
        for name in ("in_channels", "latent_channels", "patch_size", "decoder_base_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"LTX2VideoVAEConfig.{name} must be a positive int, got {value!r}")
        for name in ("encoder_layers", "decoder_layers"):
            value = getattr(self, name)
            if not value or any(not isinstance(n, int) or n < 1 for n in value):
                raise ValueError(f"LTX2VideoVAEConfig.{name} must be positive block counts, got {value!r}")
        for name in _RATIOS:
            value = getattr(self, name)
            if any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in value):
                raise ValueError(f"LTX2VideoVAEConfig.{name} must be positive ints, got {value!r}")
        for name in ("encoder_downsamples", "decoder_upsamples"):
            bad = [k for k in getattr(self, name) if k not in STRIDES]
            if bad:
                raise ValueError(f"LTX2VideoVAEConfig.{name} entries must be in {sorted(STRIDES)}, got {bad!r}")
        if len(self.encoder_layers) != len(self.encoder_downsamples) + 1:
            raise ValueError(
                f"LTX2VideoVAEConfig.encoder_layers has {len(self.encoder_layers)} stages, expected "
                f"len(encoder_downsamples) + 1 = {len(self.encoder_downsamples) + 1}"
            )
        if len(self.decoder_layers) != len(self.decoder_upsamples) + 1:
            raise ValueError(
                f"LTX2VideoVAEConfig.decoder_layers has {len(self.decoder_layers)} stages, expected "
                f"len(decoder_upsamples) + 1 = {len(self.decoder_upsamples) + 1}"
            )
        for name, kinds in (
            ("decoder_upsample_residual", "decoder_upsamples"),
            ("decoder_width_divisors", "decoder_upsamples"),
            ("encoder_width_multipliers", "encoder_downsamples"),
        ):
            if len(getattr(self, name)) != len(getattr(self, kinds)):
                raise ValueError(
                    f"LTX2VideoVAEConfig.{name} has {len(getattr(self, name))} entries, expected one per "
                    f"entry of {kinds} ({len(getattr(self, kinds))})"
                )
        self._check_resamplers()
        for name in ("encoder_padding_mode", "decoder_padding_mode"):
            if getattr(self, name) not in PADDING_MODES:
                raise ValueError(
                    f"LTX2VideoVAEConfig.{name} must be one of {PADDING_MODES}, got {getattr(self, name)!r}"
                )
        if not self.scaling_factor > 0:
            raise ValueError(f"LTX2VideoVAEConfig.scaling_factor must be positive, got {self.scaling_factor!r}")
        enc = _compression(self.encoder_downsamples)
        dec = _compression(self.decoder_upsamples)
        if enc != dec:
            raise ValueError(
                f"LTX2VideoVAEConfig: encoder_downsamples={self.encoder_downsamples} compress (time, space) by {enc} "
                f"but decoder_upsamples={self.decoder_upsamples} expand by {dec}"
            )

    def _check_resamplers(self) -> None:
        """A downsampler's conv gives `C * m / prod(stride)` channels and its skip averages `prod(stride) / m`
        channels; a residual upsampler's skip repeats its input `prod(stride) / d` times: all whole numbers."""
        widths = self.encoder_widths
        for i, (kind, m) in enumerate(zip(self.encoder_downsamples, self.encoder_width_multipliers, strict=True)):
            product = math.prod(STRIDES[kind])
            if product % m or (widths[i] * m) % product:
                raise ValueError(
                    f"LTX2VideoVAEConfig.encoder_width_multipliers[{i}]={m}: a {kind!r} downsampler of width "
                    f"{widths[i]} needs a multiplier dividing {product} and a width times it divisible by {product}"
                )
        for i, (kind, d, residual) in enumerate(
            zip(self.decoder_upsamples, self.decoder_width_divisors, self.decoder_upsample_residual, strict=True)
        ):
            if residual and math.prod(STRIDES[kind]) % d:
                raise ValueError(
                    f"LTX2VideoVAEConfig.decoder_width_divisors[{i}]={d}: a residual {kind!r} upsampler needs a "
                    f"divisor dividing {math.prod(STRIDES[kind])}"
                )

    @classmethod
    def ltx23(cls, **overrides) -> LTX2VideoVAEConfig:
        """The released LTX-2.3 video VAE (`vae.*` of ltx-2.3-22b-dev.safetensors): same latent space,
        encoder widths 128..1024 (last downsampler keeps the width), a four-upsampler decoder without
        residual paths and with zero padding."""
        fields = dict(
            encoder_layers=(4, 6, 4, 2, 2),
            encoder_width_multipliers=(2, 2, 2, 1),
            decoder_layers=(2, 2, 4, 6, 4),
            decoder_upsamples=("all", "all", "time", "space"),
            decoder_upsample_residual=(False, False, False, False),
            decoder_width_divisors=(2, 1, 2, 2),
            decoder_padding_mode="zeros",
        )
        return cls(**{**fields, **overrides})

    @property
    def encoder_widths(self) -> tuple[int, ...]:
        """Channels of each encoder stage, from the pixel side."""
        return tuple(
            self.latent_channels * math.prod(self.encoder_width_multipliers[:i])
            for i in range(len(self.encoder_layers))
        )

    @property
    def decoder_widths(self) -> tuple[int, ...]:
        """Channels of each decoder stage, from the latent side."""
        d = self.decoder_width_divisors
        return tuple(self.decoder_base_channels * math.prod(d[i:]) for i in range(len(self.decoder_layers)))

    @property
    def spatial_compression(self) -> int:
        return self.patch_size * _compression(self.encoder_downsamples)[1]

    @property
    def temporal_compression(self) -> int:
        return _compression(self.encoder_downsamples)[0]


_RATIOS = ("encoder_width_multipliers", "decoder_width_divisors")


def _compression(kinds) -> tuple[int, int]:
    return math.prod(STRIDES[k][0] for k in kinds), math.prod(STRIDES[k][1] for k in kinds)


# ----------------------------------------------------------------------------------- building blocks
class PixelNorm(nn.Module):
    """RMS over channels, no weights (ltx-core's `PixelNorm`, eps 1e-8)."""

    def __init__(self, eps: float = 1e-8):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.square().mean(dim=1, keepdim=True) + self.eps)


class CausalConv3d(nn.Module):
    """3x3x3 conv (`conv.*`) padded in space by the conv itself and in time by repeating edge frames:
    the first frame twice when causal, the first and last once each otherwise."""

    def __init__(self, in_channels: int, out_channels: int, padding_mode: str = "zeros"):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, 3, padding=(0, 1, 1), padding_mode=padding_mode)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        first = x[:, :, :1]
        if causal:
            x = torch.cat([first, first, x], dim=2)
        else:
            x = torch.cat([first, x, x[:, :, -1:]], dim=2)
        return self.conv(x)


class ResBlock(nn.Module):
    """x + conv2(SiLU(norm(conv1(SiLU(norm(x)))))), width kept."""

    def __init__(self, channels: int, padding_mode: str):
        super().__init__()
        self.norm = PixelNorm()
        self.conv1 = CausalConv3d(channels, channels, padding_mode)
        self.conv2 = CausalConv3d(channels, channels, padding_mode)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm(x)), causal)
        return x + self.conv2(F.silu(self.norm(h)), causal)


class ResStage(nn.Module):
    """`res_blocks.N`: residual blocks of one width (ltx-core's `UNetMidBlock3D`)."""

    def __init__(self, channels: int, num_layers: int, padding_mode: str):
        super().__init__()
        self.res_blocks = nn.ModuleList(ResBlock(channels, padding_mode) for _ in range(num_layers))

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        for block in self.res_blocks:
            x = block(x, causal)
        return x


def space_to_depth(x: torch.Tensor, stride: tuple[int, int, int]) -> torch.Tensor:
    """[B, C, T*st, H*sh, W*sw] -> [B, C*st*sh*sw, T, H, W], channel order (c, t, h, w offsets)."""
    st, sh, sw = stride
    b, c, t, h, w = x.shape
    x = x.reshape(b, c, t // st, st, h // sh, sh, w // sw, sw).permute(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(b, c * st * sh * sw, t // st, h // sh, w // sw)


def depth_to_space(x: torch.Tensor, stride: tuple[int, int, int]) -> torch.Tensor:
    """Inverse of `space_to_depth`."""
    st, sh, sw = stride
    b, c, t, h, w = x.shape
    x = x.reshape(b, c // (st * sh * sw), st, sh, sw, t, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(b, c // (st * sh * sw), t * st, h * sh, w * sw)


class Downsample(nn.Module):
    """Multiplies the width by `multiplier` and halves `kind`'s axes: a conv to `mC / prod(stride)` channels,
    space-to-depth, plus the input space-to-depth'd with channel groups averaged (ltx-core's
    `SpaceToDepthDownsample`). Halving time first duplicates the first frame, so `1 + 2k` frames become `1 + k`."""

    def __init__(self, channels: int, kind: str, padding_mode: str, multiplier: int = 2):
        super().__init__()
        self.stride = STRIDES[kind]
        self.multiplier = multiplier
        self.conv = CausalConv3d(channels, multiplier * channels // math.prod(self.stride), padding_mode)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        if self.stride[0] == 2:
            x = torch.cat([x[:, :, :1], x], dim=2)
        skip = space_to_depth(x, self.stride)
        b, c, t, h, w = skip.shape
        width = self.multiplier * x.shape[1]
        skip = skip.view(b, width, c // width, t, h, w).mean(dim=2)
        return space_to_depth(self.conv(x, causal), self.stride) + skip


class Upsample(nn.Module):
    """Divides the width by `divisor` and doubles `kind`'s axes: a conv to `C * prod(stride) / divisor`
    channels and depth-to-space, plus (when `residual`) the input depth-to-space'd with its channels tiled
    `prod(stride) / divisor` times (ltx-core's `DepthToSpaceUpsample`). Doubling time drops the first output
    frame: `1 + k` -> `1 + 2k`."""

    def __init__(self, channels: int, kind: str, residual: bool, padding_mode: str, divisor: int = 2):
        super().__init__()
        self.stride = STRIDES[kind]
        self.residual = residual
        self.conv = CausalConv3d(channels, channels * math.prod(self.stride) // divisor, padding_mode)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        out = depth_to_space(self.conv(x, causal), self.stride)
        if self.residual:
            skip = depth_to_space(x, self.stride)
            out = out + skip.repeat(1, out.shape[1] // skip.shape[1], 1, 1, 1)
        return out[:, :, 1:] if self.stride[0] == 2 else out


def _run_blocks(blocks: nn.ModuleList, x: torch.Tensor, causal: bool, checkpointing: bool) -> torch.Tensor:
    for block in blocks:
        if checkpointing and torch.is_grad_enabled():
            x = checkpoint(block, x, causal, use_reentrant=False)
        else:
            x = block(x, causal)
    return x


class Encoder(nn.Module):
    """Patchified video -> `latent_channels + 1` channels: the posterior means and one shared log-variance."""

    def __init__(self, config: LTX2VideoVAEConfig):
        super().__init__()
        self.causal = config.encoder_causal
        self.gradient_checkpointing = False
        mode, widths = config.encoder_padding_mode, config.encoder_widths
        self.conv_in = CausalConv3d(config.in_channels * config.patch_size**2, widths[0], mode)
        blocks: list[nn.Module] = []
        for i, num_layers in enumerate(config.encoder_layers):
            blocks.append(ResStage(widths[i], num_layers, mode))
            if i < len(config.encoder_downsamples):
                kind, multiplier = config.encoder_downsamples[i], config.encoder_width_multipliers[i]
                blocks.append(Downsample(widths[i], kind, mode, multiplier))
        self.down_blocks = nn.ModuleList(blocks)
        self.conv_norm_out = PixelNorm()
        self.conv_out = CausalConv3d(widths[-1], config.latent_channels + 1, mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x, self.causal)
        x = _run_blocks(self.down_blocks, x, self.causal, self.gradient_checkpointing)
        return self.conv_out(F.silu(self.conv_norm_out(x)), self.causal)


class Decoder(nn.Module):
    """Latents -> patchified video (no timestep conditioning or noise injection in LTX-2)."""

    def __init__(self, config: LTX2VideoVAEConfig):
        super().__init__()
        self.causal = config.decoder_causal
        self.gradient_checkpointing = False
        mode, widths = config.decoder_padding_mode, config.decoder_widths
        self.conv_in = CausalConv3d(config.latent_channels, widths[0], mode)
        blocks: list[nn.Module] = []
        for i, num_layers in enumerate(config.decoder_layers):
            blocks.append(ResStage(widths[i], num_layers, mode))
            if i < len(config.decoder_upsamples):
                kind, residual = config.decoder_upsamples[i], config.decoder_upsample_residual[i]
                blocks.append(Upsample(widths[i], kind, residual, mode, config.decoder_width_divisors[i]))
        self.up_blocks = nn.ModuleList(blocks)
        self.conv_norm_out = PixelNorm()
        self.conv_out = CausalConv3d(widths[-1], config.in_channels * config.patch_size**2, mode)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(z, self.causal)
        x = _run_blocks(self.up_blocks, x, self.causal, self.gradient_checkpointing)
        return self.conv_out(F.silu(self.conv_norm_out(x)), self.causal)


# ----------------------------------------------------------------------------------- the model
class LTX2VideoVAE(nn.Module):
    """Video `[B, 3, 1+8k, H, W]` in [-1, 1] <-> normalised latents `[B, 128, 1+k, H/32, W/32]`."""

    # dotted paths the runtime reads; a ModuleList path means each child is one unit
    offload_units = ("encoder.down_blocks", "decoder.up_blocks")
    compile_units = ("encoder.down_blocks", "decoder.up_blocks")

    def __init__(self, config: LTX2VideoVAEConfig | None = None):
        super().__init__()
        self.config = config = config if config is not None else LTX2VideoVAEConfig()
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.per_channel_statistics = PerChannelStatistics(config.latent_channels)

    @property
    def gradient_checkpointing(self) -> bool:
        return self.encoder.gradient_checkpointing and self.decoder.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        self.encoder.gradient_checkpointing = self.decoder.gradient_checkpointing = bool(value)

    @property
    def spatial_compression(self) -> int:
        return self.config.spatial_compression

    @property
    def temporal_compression(self) -> int:
        return self.config.temporal_compression

    @property
    def z_dim(self) -> int:
        return self.config.latent_channels

    def encode(
        self,
        video: torch.Tensor,
        *,
        tiled: bool = False,
        tile_size: int | tuple[int, int] = DEFAULT_TILE_SIZE,
        tile_stride: int | tuple[int, int] | None = None,
        sample: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Normalised latents `(z - mean-of-means) * scaling_factor / std-of-means`.

        `z` is the posterior's mode by default (what the authors' and diffusers' pipelines use);
        `sample=True` draws from it with `generator`. Tiles are `(height, width)` in latent cells (an
        int means square; `tile_stride` None means 2 cells less), each encoded whole in time; overlaps
        are blended linearly.
        """
        self._check_video(video)
        if tiled:
            cells = _tile_cells(tile_size, tile_stride)
            moments = tiled_video(self._moments, video, *cells, in_cell=self.spatial_compression, out_cell=1)
        else:
            moments = self._moments(video)
        z, logvar = moments[:, :-1], moments[:, -1:]
        if sample:
            device = generator.device if generator is not None else z.device
            noise = torch.randn(z.shape, generator=generator, device=device, dtype=z.dtype).to(z.device)
            z = z + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * noise
        mean, std = self.per_channel_statistics.stats(z, (1, -1, 1, 1, 1))
        return (z - mean) * self.config.scaling_factor / std

    def decode(
        self,
        latents: torch.Tensor,
        *,
        tiled: bool = False,
        tile_size: int | tuple[int, int] = DEFAULT_TILE_SIZE,
        tile_stride: int | tuple[int, int] | None = None,
        clamp: bool = True,
    ) -> torch.Tensor:
        """Video `[B, 3, 1 + 8(T-1), 32H, 32W]` from normalised latents, clamped to [-1, 1] (as the
        pipelines do) unless `clamp=False`; tiles as in `encode` (latent cells, at least 2 each)."""
        self._check_latents(latents)
        mean, std = self.per_channel_statistics.stats(latents, (1, -1, 1, 1, 1))
        z = latents * std / self.config.scaling_factor + mean
        if tiled:
            cells = _tile_cells(tile_size, tile_stride)
            video = tiled_video(self._decode_raw, z, *cells, in_cell=1, out_cell=self.spatial_compression)
        else:
            video = self._decode_raw(z)
        return video.clamp(-1.0, 1.0) if clamp else video

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """Reconstruction through the posterior mode (a smoke path; pipelines call encode/decode)."""
        return self.decode(self.encode(video))

    def _moments(self, video: torch.Tensor) -> torch.Tensor:
        return self.encoder(patchify(video, self.config.patch_size))

    def _decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        return unpatchify(self.decoder(z), self.config.patch_size)

    def _check_video(self, video) -> None:
        s, tc, c = self.spatial_compression, self.temporal_compression, self.config.in_channels
        if not isinstance(video, torch.Tensor) or video.dim() != 5 or video.shape[1] != c:
            got = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
            raise ConfigError(f"video must be a [B, {c}, F, H, W] tensor, got {got}")
        frames, height, width = video.shape[2:]
        if frames % tc != 1 % tc:
            below = max(1, frames - (frames - 1) % tc)
            raise ConfigError(
                f"video has {frames} frames; the LTX-2 VAE needs 1 + {tc}k frames (e.g. {below} or {below + tc})"
            )
        if height % s or width % s or not height or not width:
            raise ConfigError(f"video height and width must be positive multiples of {s}, got {(height, width)}")

    def _check_latents(self, latents) -> None:
        z = self.config.latent_channels
        if not isinstance(latents, torch.Tensor) or latents.dim() != 5 or latents.shape[1] != z:
            got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ConfigError(f"latents must be a [B, {z}, T, H, W] tensor, got {got}")
        if self.config.decoder_padding_mode == "reflect" and min(latents.shape[3:]) < 2:
            raise ConfigError(
                f"latents of height x width {tuple(latents.shape[3:])} are too small for the decoder's reflect "
                f"padding: each must be at least 2 (a video at least {2 * self.spatial_compression} pixels)"
            )


class LTX2VideoEncoderVAE(LTX2VideoVAE):
    """The video VAE without its convolutional decoder: LTX-2.5's diffusion-VAE file (`ltx-2.5-video-vae-bf16`)
    pairs this encoder with the diffusion decoder (`diffusion_decoder.py`), which decodes instead. Encodes as
    `LTX2VideoVAE`; `decode` is refused, naming the file that has the convolutional decoder."""

    offload_units = ("encoder.down_blocks",)
    compile_units = ("encoder.down_blocks",)

    def __init__(self, config: LTX2VideoVAEConfig | None = None):
        nn.Module.__init__(self)
        self.config = config = config if config is not None else LTX2VideoVAEConfig()
        self.encoder = Encoder(config)
        self.per_channel_statistics = PerChannelStatistics(config.latent_channels)

    @property
    def gradient_checkpointing(self) -> bool:
        return self.encoder.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        self.encoder.gradient_checkpointing = bool(value)

    def decode(self, latents: torch.Tensor, **kwargs) -> torch.Tensor:
        raise ConfigError(
            "this video VAE is the encoder of LTX-2.5's diffusion-VAE file, whose decoder is the diffusion decoder "
            "(use_diffusion_decoder); for the convolutional decoder load vae/ltx-2.5-video-vae-conv-bf16.safetensors"
        )


def _tile_cells(tile_size, tile_stride) -> tuple[tuple[int, int], tuple[int, int]]:
    pairs = []
    for name, value in (("tile_size", tile_size), ("tile_stride", tile_stride)):
        pair = (value, value) if isinstance(value, int) else tuple(value) if isinstance(value, (tuple, list)) else ()
        if len(pair) != 2 or not all(isinstance(v, int) and v >= 1 for v in pair):
            raise ConfigError(f"{name} must be a positive int or (height, width) in latent cells, got {value!r}")
        pairs.append(pair)
        if tile_stride is None:  # 2 cells of overlap
            pairs.append(tuple(max(1, v - 2) for v in pair))
            break
    size, stride = pairs
    if min(size) < 2:
        raise ConfigError(f"tile_size={size} must be at least 2 latent cells (the decoder pads by reflection)")
    if stride[0] > size[0] or stride[1] > size[1]:
        raise ConfigError(f"tile_stride={stride} must not exceed tile_size={size} (tiles would leave gaps)")
    return size, stride


__all__ = ["LTX2VideoEncoderVAE", "LTX2VideoVAE", "LTX2VideoVAEConfig", "depth_to_space", "space_to_depth"]
