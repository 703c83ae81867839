"""The causal 3D video VAE of Wan 2.1 / Wan 2.2 (also Qwen-Image's VAE, which is the 2.1 one).

Convolutions are causal in time (frame t sees frames <= t), so a video is encoded in chunks — the
first frame alone, then `temporal_compression` frames at a time — and decoded one latent frame at a
time, with each causal layer keeping the last input frames of the previous chunk in a `cache` dict
(keyed by the layer). Memory is bounded by one chunk, and the result equals a one-shot pass
(`encoder(x)` / `decoder(z)` with no cache) because zero history and a cold cache pad alike.

The first frame is special on purpose: it is encoded on its own (an image is a 1-frame video), the
temporal downsamplers pass it through, and the temporal upsamplers do not double it. Hence
`frames = 1 + 4k` in, `1 + k` latent frames out.

Module names are the original Wan ones (`Wan2.1_VAE.pth`, `Wan2.2_VAE.pth` load as they are);
diffusers' `AutoencoderKLWan` / Qwen-Image `vae/` layouts are converted in `wan_vae_formats`.
Wan 2.2 adds residual stages with parameter-free shortcuts (channel-averaging space-to-depth down,
channel-repeating depth-to-space up) and a 2x2 pixel (un)shuffle around the whole model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import attention
from ..errors import ConfigError
from ..registry import ModelSpec, StateDict
from .autoencoder_kl import _spans
from .wan_vae_formats import (
    LAYOUTS_21,
    LAYOUTS_22,
    WAN21_LATENTS_MEAN,
    WAN21_LATENTS_STD,
    WAN22_LATENTS_MEAN,
    WAN22_LATENTS_STD,
    config_fields,
)

Cache = dict  # layer -> what it keeps between chunks; a fresh dict per video (and per tile)

# What a field left as None means for each variant (the released checkpoints).
RELEASED = {
    "2.1": dict(base_dim=96, z_dim=16, is_residual=False, patch_size=1),
    "2.2": dict(base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True, patch_size=2),
}
_RELEASED_STATS = {"2.1": (WAN21_LATENTS_MEAN, WAN21_LATENTS_STD), "2.2": (WAN22_LATENTS_MEAN, WAN22_LATENTS_STD)}

DEFAULT_TILE_SIZE = (34, 34)  # latent cells (DiffSynth-Studio's Wan VAE defaults)
DEFAULT_TILE_STRIDE = (18, 16)


@dataclass
class WanVAEConfig:
    """`variant` picks the released defaults for fields left as None: "2.1" (Wan2.1_VAE.pth, Qwen-Image:
    base 96, z 16, 8x spatial) or "2.2" (Wan2.2_VAE.pth: encoder base 160, decoder base 256, z 48,
    residual stages, patch 2, 16x spatial). `decoder_base_dim` None means `base_dim` in 2.1.
    `latents_mean/std` None means the released statistics, which exist only for the released z_dim.
    """

    variant: str = "2.1"
    base_dim: int | None = None
    decoder_base_dim: int | None = None
    z_dim: int | None = None
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    is_residual: bool | None = None
    patch_size: int | None = None
    in_channels: int = 3
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None

    def __post_init__(self):
        if self.variant not in RELEASED:
            raise ValueError(f"WanVAEConfig.variant must be one of {sorted(RELEASED)}, got {self.variant!r}")
        released = RELEASED[self.variant]
        for name, value in released.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.decoder_base_dim is None:
            self.decoder_base_dim = self.base_dim
        self.dim_mult = tuple(int(m) for m in self.dim_mult)
        self.temporal_downsample = tuple(bool(t) for t in self.temporal_downsample)
        self.is_residual = bool(self.is_residual)
        for name in ("base_dim", "decoder_base_dim", "z_dim", "num_res_blocks", "patch_size", "in_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"WanVAEConfig.{name} must be a positive int, got {value!r}")
        if not self.dim_mult or min(self.dim_mult) < 1:
            raise ValueError(f"WanVAEConfig.dim_mult must be positive multipliers, got {self.dim_mult!r}")
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"WanVAEConfig.temporal_downsample has {len(self.temporal_downsample)} entries but "
                f"dim_mult={self.dim_mult} has {len(self.dim_mult) - 1} downsampling stages"
            )
        mean, std = _RELEASED_STATS[self.variant]
        for name, values in (("latents_mean", mean), ("latents_std", std)):
            given = getattr(self, name)
            if given is None:
                if self.z_dim != len(values):
                    raise ValueError(
                        f"WanVAEConfig.{name} must be given for z_dim={self.z_dim} "
                        f"(the released {self.variant} values are for z_dim={len(values)})"
                    )
                given = values
            given = tuple(float(v) for v in given)
            if len(given) != self.z_dim:
                raise ValueError(f"WanVAEConfig.{name} has {len(given)} values, expected z_dim={self.z_dim}")
            setattr(self, name, given)
        if min(self.latents_std) <= 0:
            raise ValueError(f"WanVAEConfig.latents_std must be positive, got {self.latents_std!r}")
        if self.is_residual:
            self._check_residual_widths()

    def _check_residual_widths(self):
        """The parameter-free shortcuts regroup channels, so widths must divide evenly."""
        enc = [self.base_dim * m for m in (1, *self.dim_mult)]
        dec = [self.decoder_base_dim * m for m in (self.dim_mult[-1], *reversed(self.dim_mult))]
        ups = tuple(reversed(self.temporal_downsample))
        for i in range(len(self.dim_mult) - 1):
            down = 4 * (2 if self.temporal_downsample[i] else 1)
            if enc[i] * down % enc[i + 1]:
                raise ValueError(f"WanVAEConfig: encoder widths {enc[i]}->{enc[i + 1]} do not divide (base_dim)")
            up = 4 * (2 if ups[i] else 1)
            if dec[i + 1] * up % dec[i]:
                raise ValueError(
                    f"WanVAEConfig: decoder widths {dec[i]}->{dec[i + 1]} do not divide (decoder_base_dim)"
                )


# ----------------------------------------------------------------------------------- building blocks
class CausalConv3d(nn.Conv3d):
    """Conv3d padded in time on the past side only (twice the symmetric padding), zeros in space.

    With a `cache`, the last frames of the input are kept for the next chunk, so chunked input gives
    the same output as the whole sequence at once.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride)
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else padding
        self.space_pad = (pw, pw, ph, ph)
        self.past = 2 * pt

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        history = 0
        if self.past and cache is not None:
            prev = cache.get(self)
            if prev is not None:
                x = torch.cat([prev.to(x.dtype), x], dim=2)
                history = prev.shape[2]
            cache[self] = x[:, :, -self.past :].clone()
        if any(self.space_pad) or self.past > history:
            x = F.pad(x, (*self.space_pad, self.past - history, 0))
        return super().forward(x)


class RMSNorm(nn.Module):
    """Unit-length over channels times sqrt(C) and a learned gain (`gamma` shaped to broadcast)."""

    def __init__(self, dim: int, frames: bool = True):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1, 1) if frames else torch.ones(dim, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x.float(), dim=1).to(x.dtype) * self.scale * self.gamma


def _per_frame(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2D module to every frame of [B, C, T, H, W]."""
    b, _, t = x.shape[:3]
    y = module(x.transpose(1, 2).flatten(0, 1))
    return y.unflatten(0, (b, t)).transpose(1, 2)


class ResidualBlock(nn.Module):
    """(norm, SiLU, causal conv) twice plus the input; `residual.{0,2,3,6}` hold the weights."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(in_dim),
            nn.SiLU(),
            CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim),
            nn.SiLU(),
            nn.Identity(),  # the released models' dropout slot (rate 0)
            CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        return self.shortcut(x) + _run(self.residual, x, cache)


class AttentionBlock(nn.Module):
    """Single-head self-attention within each frame (no mixing across time), with a residual."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, frames=False)
        self.to_qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        return x + _per_frame(self._attend, x)

    def _attend(self, frames: torch.Tensor) -> torch.Tensor:
        n, c, h, w = frames.shape
        qkv = self.to_qkv(self.norm(frames)).flatten(2).transpose(1, 2).unsqueeze(2)  # [N, HW, 1, 3C]
        q, k, v = qkv.chunk(3, dim=-1)
        out = attention(q.contiguous(), k.contiguous(), v.contiguous())
        return self.proj(out.squeeze(2).transpose(1, 2).reshape(n, c, h, w))


class Resample(nn.Module):
    """2x spatial down/up per frame (`resample.1`), optionally 2x in time (`time_conv`).

    Time down: the first frame passes through; each following pair of frames becomes one, seeing the
    frame before the pair (stride-2 conv). Time up: the first frame stays single; every later frame
    becomes two, from one causal conv producing both frames' channels.
    """

    def __init__(self, dim: int, mode: str, out_dim: int | None = None):
        super().__init__()
        self.mode = mode
        if mode in ("up2d", "up3d"):
            self.resample = nn.Sequential(
                nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(dim, out_dim, 3, padding=1)
            )
            if mode == "up3d":
                self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), padding=(1, 0, 0))
        elif mode in ("down2d", "down3d"):
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
            if mode == "down3d":
                self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))
        else:
            raise ValueError(f"Resample mode must be up2d, up3d, down2d or down3d, got {mode!r}")

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        if self.mode == "up3d":
            x = self._double_frames(x, cache)
        x = _per_frame(self.resample, x)
        if self.mode == "down3d":
            x = self._halve_frames(x, cache)
        return x

    def _halve_frames(self, x: torch.Tensor, cache: Cache | None) -> torch.Tensor:
        prev = None if cache is None else cache.get(self)
        if cache is not None:
            cache[self] = x[:, :, -1:].clone()
        head, context, rest = (x[:, :, :1], x[:, :, :1], x[:, :, 1:]) if prev is None else (None, prev, x)
        if rest.shape[2] % 2:
            raise ConfigError(
                f"temporal downsampling needs an even number of frames after the first, got {rest.shape[2]}"
            )
        if rest.shape[2]:
            rest = self.time_conv(torch.cat([context.to(x.dtype), rest], dim=2))
            return rest if head is None else torch.cat([head, rest], dim=2)
        return head

    def _double_frames(self, x: torch.Tensor, cache: Cache | None) -> torch.Tensor:
        first = cache is None or cache.get(self) is None
        if cache is not None:
            cache[self] = True
        head, rest = (x[:, :, :1], x[:, :, 1:]) if first else (None, x)
        if rest.shape[2]:
            y = self.time_conv(rest, cache)  # [B, 2C, T, H, W]: channels of frame 2t, then of frame 2t+1
            b, c2, t, h, w = y.shape
            rest = y.view(b, 2, c2 // 2, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c2 // 2, 2 * t, h, w)
        return rest if head is None else torch.cat([head, rest], dim=2)


def avg_down(x: torch.Tensor, out_channels: int, ft: int, fs: int) -> torch.Tensor:
    """Space/time-to-depth, then average groups of channels down to `out_channels` (no weights).
    Time is zero-padded in front to a multiple of `ft` (the lone first frame)."""
    pad = -x.shape[2] % ft
    if pad:
        x = F.pad(x, (0, 0, 0, 0, pad, 0))
    b, c, t, h, w = x.shape
    x = x.reshape(b, c, t // ft, ft, h // fs, fs, w // fs, fs).permute(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(b, out_channels, -1, t // ft, h // fs, w // fs).mean(dim=2)


def dup_up(x: torch.Tensor, out_channels: int, ft: int, fs: int) -> torch.Tensor:
    """Repeat channels, then depth-to-space/time: the inverse layout of `avg_down` (no weights)."""
    b, c, t, h, w = x.shape
    x = x.repeat_interleave(out_channels * ft * fs * fs // c, dim=1)
    x = x.reshape(b, out_channels, ft, fs, fs, t, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(b, out_channels, t * ft, h * fs, w * fs)


class DownStage(nn.Module):
    """Wan 2.2 encoder stage: residual blocks and a downsampler, plus an averaging shortcut."""

    def __init__(self, in_dim: int, out_dim: int, num_blocks: int, temporal: bool, spatial: bool):
        super().__init__()
        self.out_dim, self.ft, self.fs = out_dim, 2 if temporal else 1, 2 if spatial else 1
        blocks: list[nn.Module] = [ResidualBlock(in_dim if j == 0 else out_dim, out_dim) for j in range(num_blocks)]
        if spatial:
            blocks.append(Resample(out_dim, "down3d" if temporal else "down2d"))
        self.downsamples = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        return avg_down(x, self.out_dim, self.ft, self.fs) + _run(self.downsamples, x, cache)


class UpStage(nn.Module):
    """Wan 2.2 decoder stage: residual blocks and an upsampler, plus a repeating shortcut whose
    first frame stays single, as the upsampler's does."""

    def __init__(self, in_dim: int, out_dim: int, num_blocks: int, temporal: bool, spatial: bool):
        super().__init__()
        self.out_dim, self.ft, self.spatial = out_dim, 2 if temporal else 1, spatial
        blocks: list[nn.Module] = [ResidualBlock(in_dim if j == 0 else out_dim, out_dim) for j in range(num_blocks)]
        if spatial:
            blocks.append(Resample(out_dim, "up3d" if temporal else "up2d", out_dim))
        self.upsamples = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        main = _run(self.upsamples, x, cache)
        if not self.spatial:
            return main
        shortcut = dup_up(x, self.out_dim, self.ft, 2)
        first = cache is None or cache.get(self) is None
        if cache is not None:
            cache[self] = True
        if first and self.ft > 1:
            shortcut = shortcut[:, :, self.ft - 1 :]
        return main + shortcut


_STREAMING = (CausalConv3d, ResidualBlock, AttentionBlock, Resample, DownStage, UpStage)


def _run(layers, x: torch.Tensor, cache: Cache | None) -> torch.Tensor:
    for layer in layers:
        x = layer(x, cache) if isinstance(layer, _STREAMING) else layer(x)
    return x


def _middle(dim: int) -> nn.Sequential:
    return nn.Sequential(ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim))


def _head(dim: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(RMSNorm(dim), nn.SiLU(), CausalConv3d(dim, out_channels, 3, padding=1))


class Encoder3d(nn.Module):
    """Video -> 2*z_dim moments. 2.1 keeps its stages as one flat list (`downsamples.N`), 2.2 nests
    them (`downsamples.I.downsamples.J`), as the released files do."""

    def __init__(self, config: WanVAEConfig):
        super().__init__()
        dims = [config.base_dim * m for m in (1, *config.dim_mult)]
        last = len(config.dim_mult) - 1
        self.conv1 = CausalConv3d(config.in_channels * config.patch_size**2, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []
        for i in range(last + 1):
            cin, cout, temporal = dims[i], dims[i + 1], i < last and config.temporal_downsample[i]
            if config.is_residual:
                blocks.append(DownStage(cin, cout, config.num_res_blocks, temporal, spatial=i < last))
                continue
            blocks += [ResidualBlock(cin if j == 0 else cout, cout) for j in range(config.num_res_blocks)]
            if i < last:
                blocks.append(Resample(cout, "down3d" if temporal else "down2d"))
        self.downsamples = nn.Sequential(*blocks)
        self.middle = _middle(dims[-1])
        self.head = _head(dims[-1], 2 * config.z_dim)

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        x = self.conv1(x, cache)
        x = _run(self.downsamples, x, cache)
        return _run(self.head, _run(self.middle, x, cache), cache)


class Decoder3d(nn.Module):
    """z_dim latents -> video (patchified channels for 2.2). In 2.1 an upsampler halves the width."""

    def __init__(self, config: WanVAEConfig):
        super().__init__()
        mult = config.dim_mult
        dims = [config.decoder_base_dim * m for m in (mult[-1], *reversed(mult))]
        ups = tuple(reversed(config.temporal_downsample))
        last = len(mult) - 1
        self.conv1 = CausalConv3d(config.z_dim, dims[0], 3, padding=1)
        self.middle = _middle(dims[0])
        blocks: list[nn.Module] = []
        for i in range(last + 1):
            cin, cout, temporal = dims[i], dims[i + 1], i < last and ups[i]
            if config.is_residual:
                blocks.append(UpStage(cin, cout, config.num_res_blocks + 1, temporal, spatial=i < last))
                continue
            cin = cin // 2 if i > 0 else cin
            blocks += [ResidualBlock(cin if j == 0 else cout, cout) for j in range(config.num_res_blocks + 1)]
            if i < last:
                blocks.append(Resample(cout, "up3d" if temporal else "up2d", cout // 2))
        self.upsamples = nn.Sequential(*blocks)
        self.head = _head(dims[-1], config.in_channels * config.patch_size**2)

    def forward(self, z: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        x = _run(self.middle, self.conv1(z, cache), cache)
        return _run(self.head, _run(self.upsamples, x, cache), cache)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, F, H, W] -> [B, C*p*p, F, H/p, W/p]; channel order (c, column offset, row offset),
    which the released 2.2 weights expect."""
    if p == 1:
        return x
    b, c, f, h, w = x.shape
    x = x.reshape(b, c, f, h // p, p, w // p, p).permute(0, 1, 6, 4, 2, 3, 5)
    return x.reshape(b, c * p * p, f, h // p, w // p)


def unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """Inverse of `patchify`."""
    if p == 1:
        return x
    b, cpp, f, h, w = x.shape
    x = x.reshape(b, cpp // (p * p), p, p, f, h, w).permute(0, 1, 4, 5, 3, 6, 2)
    return x.reshape(b, cpp // (p * p), f, h * p, w * p)


# ----------------------------------------------------------------------------------- the model
class WanVAE(nn.Module):
    """Video `[B, 3, 1+4k, H, W]` in [-1, 1] <-> normalised latents `[B, z_dim, 1+k, H/s, W/s]`."""

    # dotted paths the runtime reads; a Sequential/ModuleList path means each child is one unit
    offload_units = ("encoder.downsamples", "encoder.middle", "decoder.middle", "decoder.upsamples")
    compile_units = ("encoder.downsamples", "encoder.middle", "decoder.middle", "decoder.upsamples")

    def __init__(self, config: WanVAEConfig | None = None):
        super().__init__()
        self.config = config = config if config is not None else WanVAEConfig()
        self.encoder = Encoder3d(config)
        self.conv1 = CausalConv3d(2 * config.z_dim, 2 * config.z_dim, 1)  # moments -> moments
        self.conv2 = CausalConv3d(config.z_dim, config.z_dim, 1)  # latents -> decoder input
        self.decoder = Decoder3d(config)

    @property
    def spatial_compression(self) -> int:
        return 2 ** (len(self.config.dim_mult) - 1) * self.config.patch_size

    @property
    def temporal_compression(self) -> int:
        return 2 ** sum(self.config.temporal_downsample)

    @property
    def z_dim(self) -> int:
        return self.config.z_dim

    def encode(
        self,
        video: torch.Tensor,
        *,
        tiled: bool = False,
        tile_size: int | tuple[int, int] = DEFAULT_TILE_SIZE,
        tile_stride: int | tuple[int, int] = DEFAULT_TILE_STRIDE,
        sample: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Normalised latents `(z - latents_mean) / latents_std`.

        `z` is the posterior's mode by default (what the authors' pipelines and training use);
        `sample=True` draws from it with `generator`. Tiles are `(height, width)` in latent cells
        (an int means square): each tile runs the full chunked pass, overlaps are blended linearly.
        """
        s, tc, c = self.spatial_compression, self.temporal_compression, self.config.in_channels
        if not isinstance(video, torch.Tensor) or video.dim() != 5 or video.shape[1] != c:
            got = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
            raise ConfigError(f"video must be a [B, {c}, F, H, W] tensor, got {got}")
        frames, height, width = video.shape[2:]
        if frames % tc != 1 % tc:
            below = max(1, frames - (frames - 1) % tc)
            raise ConfigError(
                f"video has {frames} frames; this VAE needs 1 + {tc}k frames (e.g. {below} or {below + tc})"
            )
        if height % s or width % s:
            raise ConfigError(f"video height and width must be multiples of {s}, got {(height, width)}")
        if tiled:
            moments = tiled_video(
                self._moments, video, *self._tile_cells(tile_size, tile_stride), in_cell=s, out_cell=1
            )
        else:
            moments = self._moments(video)
        mean, logvar = moments.chunk(2, dim=1)
        z = mean
        if sample:
            device = generator.device if generator is not None else mean.device
            noise = torch.randn(mean.shape, generator=generator, device=device, dtype=mean.dtype).to(mean.device)
            z = mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * noise
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
        """Video `[B, 3, 1 + 4(T-1), H*s, W*s]` clamped to [-1, 1] (as the authors do), from
        normalised latents; tile sizes as in `encode` (latent cells)."""
        z = self.config.z_dim
        if not isinstance(latents, torch.Tensor) or latents.dim() != 5 or latents.shape[1] != z:
            got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ConfigError(f"latents must be a [B, {z}, T, H, W] tensor, got {got}")
        shift, scale = self._latent_stats(latents)
        latents = latents * scale + shift
        if tiled:
            cells = self._tile_cells(tile_size, tile_stride)
            video = tiled_video(self._decode_raw, latents, *cells, in_cell=1, out_cell=self.spatial_compression)
        else:
            video = self._decode_raw(latents)
        return video.clamp(-1.0, 1.0)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """Reconstruction through the posterior mode (a smoke path; pipelines call encode/decode)."""
        return self.decode(self.encode(video))

    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, -1, 1, 1, 1)
        mean = torch.tensor(self.config.latents_mean, device=like.device, dtype=like.dtype).view(shape)
        std = torch.tensor(self.config.latents_std, device=like.device, dtype=like.dtype).view(shape)
        return mean, std

    def _moments(self, video: torch.Tensor) -> torch.Tensor:
        """Raw posterior moments, chunk by chunk: the first frame, then `temporal_compression` at a time."""
        x = patchify(video, self.config.patch_size)
        tc, cache = self.temporal_compression, self._new_cache()
        chunks = [x[:, :, :1]] + [x[:, :, i : i + tc] for i in range(1, x.shape[2], tc)]
        return self.conv1(torch.cat([self.encoder(chunk, cache) for chunk in chunks], dim=2))

    def _decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        """Unclamped video from raw latents, one latent frame at a time."""
        x, cache = self.conv2(z), self._new_cache()
        out = torch.cat([self.decoder(x[:, :, i : i + 1], cache) for i in range(x.shape[2])], dim=2)
        return unpatchify(out, self.config.patch_size)

    def _new_cache(self) -> Cache:
        """Every stateful layer present from the start, so the dict never changes size (compiled
        units guard on it and would otherwise recompile as it grows)."""
        return dict.fromkeys(m for m in self.modules() if isinstance(m, (CausalConv3d, Resample, UpStage)))

    @staticmethod
    def _tile_cells(tile_size, tile_stride) -> tuple[tuple[int, int], tuple[int, int]]:
        pairs = []
        for name, value in (("tile_size", tile_size), ("tile_stride", tile_stride)):
            pair = (value, value) if isinstance(value, int) else tuple(value)
            if len(pair) != 2 or not all(isinstance(v, int) and v >= 1 for v in pair):
                raise ConfigError(f"{name} must be a positive int or (height, width) in latent cells, got {value!r}")
            pairs.append(pair)
        size, stride = pairs
        if stride[0] > size[0] or stride[1] > size[1]:
            raise ConfigError(f"tile_stride={stride} must not exceed tile_size={size} (tiles would leave gaps)")
        return size, stride


def tiled_video(fn, x: torch.Tensor, tile, stride, *, in_cell: int, out_cell: int) -> torch.Tensor:
    """Run `fn` on overlapping spatial tiles of a video `[B, C, T, H, W]` and blend them.

    `tile`/`stride` are (h, w) in latent cells; `in_cell`/`out_cell` are how many input/output
    pixels one latent cell spans. Tile weights ramp linearly over overlaps and sum to one
    (`autoencoder_kl._spans`); only the blended float32 output is held at full size.
    """
    grid_h, grid_w = x.shape[3] // in_cell, x.shape[4] // in_cell
    rows, row_total = _spans(grid_h, tile[0], stride[0], out_cell, x.device)
    cols, col_total = _spans(grid_w, tile[1], stride[1], out_cell, x.device)
    out, dtype = None, x.dtype
    for r0, r1, wr in rows:
        for c0, c1, wc in cols:
            y = fn(x[..., r0 * in_cell : r1 * in_cell, c0 * in_cell : c1 * in_cell])
            if out is None:
                shape = (*y.shape[:3], grid_h * out_cell, grid_w * out_cell)
                out, dtype = y.new_zeros(shape, dtype=torch.float32), y.dtype
            out[..., r0 * out_cell : r1 * out_cell, c0 * out_cell : c1 * out_cell] += y.float() * (
                wr[:, None] * wc[None, :]
            )
    return (out / (row_total[:, None] * col_total[None, :])).to(dtype)


# ----------------------------------------------------------------------------------- loading
def config_from_state(state: StateDict, config_json: dict | None = None) -> WanVAEConfig:
    """Config from our-named (meta) tensors and a diffusers `config.json` (AutoencoderKLWan /
    AutoencoderKLQwenImage) beside them, if any; see `wan_vae_formats.config_fields`."""
    return WanVAEConfig(**config_fields(state, config_json))


WAN21_VAE_SPEC = ModelSpec(
    name="wan21_vae",
    role="vae",
    layouts=LAYOUTS_21,
    config_from_state=config_from_state,
    build=WanVAE,
    description="Wan 2.1 causal video VAE (Wan2.1_VAE.pth; diffusers AutoencoderKLWan; Qwen-Image vae/)",
)
WAN22_VAE_SPEC = ModelSpec(
    name="wan22_vae",
    role="vae",
    layouts=LAYOUTS_22,
    config_from_state=config_from_state,
    build=WanVAE,
    description="Wan 2.2 causal video VAE, 16x spatial, 48 channels (Wan2.2_VAE.pth; diffusers AutoencoderKLWan)",
)

__all__ = [
    "WAN21_LATENTS_MEAN",
    "WAN21_LATENTS_STD",
    "WAN22_LATENTS_MEAN",
    "WAN22_LATENTS_STD",
    "WAN21_VAE_SPEC",
    "WAN22_VAE_SPEC",
    "WanVAE",
    "WanVAEConfig",
    "config_from_state",
    "patchify",
    "unpatchify",
]
