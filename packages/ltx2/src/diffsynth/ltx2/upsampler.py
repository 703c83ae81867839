"""The LTX-2 latent upsampler: the video VAE's latents at twice the width and height, for the second stage.

The authors' two-stage pipelines denoise at half the target size, enlarge the latents with this network
(`ltx-2-spatial-upscaler-x2-1.0.safetensors`), then refine them at full size in a few distilled steps.
It works on raw latents (the VAE's per-channel statistics undone) and returns raw latents.

Shape: a conv + GroupNorm + SiLU stem, `num_blocks_per_stage` residual blocks, the upsampling step, as
many residual blocks again, and a conv back to the latent channels. The released x2 model steps up with a
"rational" resampler: a conv to `num**2` times the channels, a pixel shuffle by `num`, then a fixed
binomial blur with stride `den` (scale num/den: 2 = 2/1, 1.5 = 3/2). Older layouts shuffle directly
(`upsampler.0`, a conv and a pixel shuffle), spatially x2, temporally x2 (dropping the first new frame), or
both. Module names are the file's (ltx-core's, which diffusers keeps), so it loads as is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from diffsynth.runtime.errors import ConfigError

RATIONAL_SCALES = {0.75: (3, 4), 1.5: (3, 2), 2.0: (2, 1), 4.0: (4, 1)}  # scale -> (num, den)
BLUR_TAPS = 5
GROUPS = 32


@dataclass
class LTX2LatentUpsamplerConfig:
    """Defaults are the released `ltx-2-spatial-upscaler-x2-1.0` (ltx-core's file header and diffusers'
    conversion agree: 1024 channels, 4 blocks a stage, 3-D convs, rational x2)."""

    in_channels: int = 128
    mid_channels: int = 1024
    num_blocks_per_stage: int = 4
    dims: int = 3
    spatial_upsample: bool = True
    temporal_upsample: bool = False
    spatial_scale: float = 2.0
    rational_resampler: bool = True

    def __post_init__(self):
        for name in ("in_channels", "mid_channels", "num_blocks_per_stage"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"LTX2LatentUpsamplerConfig.{name} must be a positive int, got {value!r}")
        if self.mid_channels % GROUPS:
            raise ValueError(
                f"LTX2LatentUpsamplerConfig.mid_channels={self.mid_channels} must be a multiple of {GROUPS} "
                "(GroupNorm groups)"
            )
        if self.dims not in (2, 3):
            raise ValueError(f"LTX2LatentUpsamplerConfig.dims must be 2 or 3, got {self.dims!r}")
        if not (self.spatial_upsample or self.temporal_upsample):
            raise ValueError("LTX2LatentUpsamplerConfig: spatial_upsample or temporal_upsample must be True")
        self.spatial_scale = float(self.spatial_scale)
        if self.temporal_upsample:  # the rational resampler is a spatial-only step
            self.rational_resampler = False
        if self.rational_resampler and self.spatial_upsample:
            if self.spatial_scale not in RATIONAL_SCALES:
                raise ValueError(
                    f"LTX2LatentUpsamplerConfig.spatial_scale={self.spatial_scale} is not a rational resampler "
                    f"scale; use one of {sorted(RATIONAL_SCALES)}"
                )
        if self.temporal_upsample and self.dims != 3:
            raise ValueError("LTX2LatentUpsamplerConfig: temporal upsampling needs dims=3")

    @property
    def uses_rational_resampler(self) -> bool:
        return self.rational_resampler and self.spatial_upsample

    @property
    def spatial_factor(self) -> float:
        """How much wider and taller the output latents are."""
        if not self.spatial_upsample:
            return 1.0
        return self.spatial_scale if self.uses_rational_resampler else 2.0


def _conv(dims: int, c_in: int, c_out: int) -> nn.Module:
    return (nn.Conv3d if dims == 3 else nn.Conv2d)(c_in, c_out, kernel_size=3, padding=1)


def _frames_to_batch(x: torch.Tensor) -> torch.Tensor:
    """[B, C, F, H, W] -> [B * F, C, H, W]."""
    return x.transpose(1, 2).flatten(0, 1)


def _batch_to_frames(x: torch.Tensor, batch: int) -> torch.Tensor:
    """[B * F, C, H, W] -> [B, C, F, H, W]."""
    return x.unflatten(0, (batch, -1)).transpose(1, 2)


def pixel_shuffle(x: torch.Tensor, factors: tuple[int, ...]) -> torch.Tensor:
    """Move channel sub-blocks into the trailing `len(factors)` axes: channel `c * prod(f) + i` holds the
    value at offset `i` (row-major over `factors`) of output cell `c`. Works for 1, 2 or 3 axes."""
    n = len(factors)
    lead, channels, sizes = x.shape[: -n - 1], x.shape[-n - 1], x.shape[-n:]
    x = x.reshape(*lead, channels // math.prod(factors), *factors, *sizes)
    base = len(lead) + 1  # index of the first factor axis
    order = list(range(base))
    for i in range(n):  # interleave each size axis with its factor axis
        order += [base + n + i, base + i]
    x = x.permute(*order)
    return x.reshape(*lead, channels // math.prod(factors), *(s * f for s, f in zip(sizes, factors, strict=True)))


class ResBlock(nn.Module):
    """conv, norm, SiLU, conv, norm, then SiLU of the sum with the input."""

    def __init__(self, channels: int, dims: int):
        super().__init__()
        self.conv1 = _conv(dims, channels, channels)
        self.norm1 = nn.GroupNorm(GROUPS, channels)
        self.conv2 = _conv(dims, channels, channels)
        self.norm2 = nn.GroupNorm(GROUPS, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm1(self.conv1(x)))
        return F.silu(self.norm2(self.conv2(h)) + x)


class BlurDownsample(nn.Module):
    """Anti-aliased stride-`stride` downsampling of H and W: a fixed 5-tap binomial kernel (1 4 6 4 1, outer
    product, normalised) applied per channel. The kernel is part of the released file."""

    def __init__(self, stride: int, taps: int = BLUR_TAPS):
        super().__init__()
        self.stride = stride
        row = torch.tensor([math.comb(taps - 1, k) for k in range(taps)], dtype=torch.float32)
        kernel = row[:, None] * row[None, :]
        self.register_buffer("kernel", (kernel / kernel.sum())[None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, C, H, W]
        if self.stride == 1:
            return x
        channels, taps = x.shape[1], self.kernel.shape[-1]
        weight = self.kernel.to(x.dtype).expand(channels, 1, taps, taps)
        return F.conv2d(x, weight, stride=self.stride, padding=taps // 2, groups=channels)


class RationalResampler(nn.Module):
    """Scale H and W by num/den, frame by frame: conv to num^2 x channels, pixel shuffle by num, blur down by den."""

    def __init__(self, channels: int, scale: float):
        super().__init__()
        self.num, self.den = RATIONAL_SCALES[float(scale)]
        self.conv = nn.Conv2d(channels, self.num**2 * channels, kernel_size=3, padding=1)
        self.blur_down = BlurDownsample(self.den)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, C, H, W]
        return self.blur_down(pixel_shuffle(self.conv(x), (self.num, self.num)))


class LTX2LatentUpsampler(nn.Module):
    """Raw video latents `[B, C, F, h, w]` -> `[B, C, F, 2h, 2w]` (the released spatial x2 model)."""

    offload_units = ("res_blocks", "post_upsample_res_blocks")
    compile_units = ("res_blocks", "post_upsample_res_blocks")

    def __init__(self, config: LTX2LatentUpsamplerConfig | None = None):
        super().__init__()
        self.config = config = config or LTX2LatentUpsamplerConfig()
        mid, dims = config.mid_channels, config.dims
        self.initial_conv = _conv(dims, config.in_channels, mid)
        self.initial_norm = nn.GroupNorm(GROUPS, mid)
        self.res_blocks = nn.ModuleList([ResBlock(mid, dims) for _ in range(config.num_blocks_per_stage)])
        if config.uses_rational_resampler:
            self.upsampler = RationalResampler(mid, config.spatial_scale)
        else:  # conv + pixel shuffle, as `upsampler.0`
            factor = (2 if config.temporal_upsample else 1) * (4 if config.spatial_upsample else 1)
            conv = nn.Conv3d if config.temporal_upsample else nn.Conv2d
            self.upsampler = nn.Sequential(conv(mid, factor * mid, kernel_size=3, padding=1))
        self.post_upsample_res_blocks = nn.ModuleList([ResBlock(mid, dims) for _ in range(config.num_blocks_per_stage)])
        self.final_conv = _conv(dims, mid, config.in_channels)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if latents.dim() != 5 or latents.shape[1] != cfg.in_channels or latents.shape[2] < 1:
            raise ConfigError(
                f"LTX2LatentUpsampler takes video latents [B, {cfg.in_channels}, F, h, w], got {tuple(latents.shape)}"
            )
        batch = latents.shape[0]
        x = _frames_to_batch(latents) if cfg.dims == 2 else latents
        x = F.silu(self.initial_norm(self.initial_conv(x)))
        for block in self.res_blocks:
            x = block(x)
        x = self._upsample(x, batch)
        for block in self.post_upsample_res_blocks:
            x = block(x)
        x = self.final_conv(x)
        return _batch_to_frames(x, batch) if cfg.dims == 2 else x

    def _upsample(self, x: torch.Tensor, batch: int) -> torch.Tensor:
        cfg = self.config
        if cfg.temporal_upsample:  # [B, C, F, H, W], 3-D conv; the first new frame is dropped (causal first frame)
            factors = (2, 2, 2) if cfg.spatial_upsample else (2,)
            x = self.upsampler(x)
            x = pixel_shuffle(x, factors) if cfg.spatial_upsample else self._shuffle_frames(x)
            return x[:, :, 1:]
        framewise = cfg.dims == 3
        x = _frames_to_batch(x) if framewise else x
        if cfg.uses_rational_resampler:
            x = self.upsampler(x)
        else:
            x = pixel_shuffle(self.upsampler(x), (2, 2))
        return _batch_to_frames(x, batch) if framewise else x

    @staticmethod
    def _shuffle_frames(x: torch.Tensor) -> torch.Tensor:
        """[B, 2C, F, H, W] -> [B, C, 2F, H, W] (channel `2c + i` is frame offset i of channel c)."""
        b, c2, f, h, w = x.shape
        return x.reshape(b, c2 // 2, 2, f, h, w).permute(0, 1, 3, 2, 4, 5).reshape(b, c2 // 2, 2 * f, h, w)


__all__ = ["LTX2LatentUpsampler", "LTX2LatentUpsamplerConfig", "RATIONAL_SCALES", "pixel_shuffle"]
