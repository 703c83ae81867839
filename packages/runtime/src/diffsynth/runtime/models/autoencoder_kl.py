"""The FLUX.1-style `AutoencoderKL` (also Z-Image's VAE, and SD's with 4 latent channels).

An LDM VAE: a convolutional encoder (ResNet stages, 2x downsampling between them, a mid block with
one single-head self-attention) that predicts a diagonal Gaussian over latents, and the mirrored
decoder. Module names are the diffusers ones, so `vae/diffusion_pytorch_model.safetensors` loads
without conversion; the original `ae.safetensors` layout is converted in `autoencoder_kl_formats`.

`encode` / `decode` work on normalised latents, `(z - shift_factor) * scaling_factor`, which is
what the denoisers see. Both can run tiled for large images: overlapping tiles blended with linear
ramps (tile sizes in pixels), so memory stays bounded by the tile size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import attention
from ..errors import ConfigError
from ..registry import ModelSpec, StateDict
from .autoencoder_kl_formats import LAYOUTS, config_fields

DEFAULT_TILE_SIZE = 512  # pixels
DEFAULT_TILE_STRIDE = 384  # pixels: 128 px of overlap between neighbouring tiles


@dataclass
class AutoencoderKLConfig:
    """Defaults are the released FLUX.1 VAE (`black-forest-labs/FLUX.1-dev`, `ae.safetensors`)."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.3611
    shift_factor: float = 0.1159
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False
    mid_block_add_attention: bool = True

    def __post_init__(self):
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        for name in ("in_channels", "out_channels", "latent_channels", "layers_per_block", "norm_num_groups"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"AutoencoderKLConfig.{name} must be a positive int, got {value!r}")
        if not self.block_out_channels:
            raise ValueError("AutoencoderKLConfig.block_out_channels must name at least one stage, got ()")
        for i, c in enumerate(self.block_out_channels):
            if c < 1 or c % self.norm_num_groups:
                raise ValueError(
                    f"AutoencoderKLConfig.block_out_channels[{i}]={c} must be a positive multiple of "
                    f"norm_num_groups={self.norm_num_groups} (group norms split channels evenly)"
                )
        if not self.scaling_factor or self.scaling_factor != self.scaling_factor:
            raise ValueError(
                f"AutoencoderKLConfig.scaling_factor must be a non-zero number, got {self.scaling_factor!r}"
            )


# ----------------------------------------------------------------------------------- building blocks
def _group_norm(config: AutoencoderKLConfig, channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(config.norm_num_groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """norm-SiLU-conv twice, plus the input (through a 1x1 conv when the width changes)."""

    def __init__(self, config: AutoencoderKLConfig, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _group_norm(config, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(config, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Downsample(nn.Module):
    """Stride-2 3x3 conv; the LDM pads right/bottom only (asymmetric), kept for weight compatibility."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidAttention(nn.Module):
    """Single-head self-attention over all pixels, with a residual (the LDM `attn_1`)."""

    def __init__(self, config: AutoencoderKLConfig, channels: int):
        super().__init__()
        self.group_norm = _group_norm(config, channels)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # `to_out.0`, as in the files

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
        q, k, v = (proj(tokens).unsqueeze(2) for proj in (self.to_q, self.to_k, self.to_v))
        out = self.to_out[0](attention(q, k, v).squeeze(2))
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class MidBlock(nn.Module):
    def __init__(self, config: AutoencoderKLConfig, channels: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(config, channels, channels) for _ in range(2)])
        self.attentions = nn.ModuleList([MidAttention(config, channels)] if config.mid_block_add_attention else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class Stage(nn.Module):
    """One resolution level: ResNet blocks, then an optional down- or upsampler."""

    def __init__(self, config, in_channels: int, out_channels: int, num_layers: int, resample: str | None):
        super().__init__()
        widths = [in_channels] + [out_channels] * num_layers
        self.resnets = nn.ModuleList([ResnetBlock(config, i, o) for i, o in zip(widths[:-1], widths[1:], strict=True)])
        self.resample = resample
        if resample == "down":
            self.downsamplers = nn.ModuleList([Downsample(out_channels)])
        elif resample == "up":
            self.upsamplers = nn.ModuleList([Upsample(out_channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.resample == "down":
            x = self.downsamplers[0](x)
        elif self.resample == "up":
            x = self.upsamplers[0](x)
        return x


class Encoder(nn.Module):
    def __init__(self, config: AutoencoderKLConfig):
        super().__init__()
        chans = config.block_out_channels
        self.conv_in = nn.Conv2d(config.in_channels, chans[0], 3, padding=1)
        last = len(chans) - 1
        self.down_blocks = nn.ModuleList(
            Stage(config, chans[max(i - 1, 0)], c, config.layers_per_block, "down" if i < last else None)
            for i, c in enumerate(chans)
        )
        self.mid_block = MidBlock(config, chans[-1])
        self.conv_norm_out = _group_norm(config, chans[-1])
        self.conv_out = nn.Conv2d(chans[-1], 2 * config.latent_channels, 3, padding=1)  # mean and log-variance

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, config: AutoencoderKLConfig):
        super().__init__()
        chans = tuple(reversed(config.block_out_channels))
        self.conv_in = nn.Conv2d(config.latent_channels, chans[0], 3, padding=1)
        self.mid_block = MidBlock(config, chans[0])
        last = len(chans) - 1
        self.up_blocks = nn.ModuleList(
            Stage(config, chans[max(i - 1, 0)], c, config.layers_per_block + 1, "up" if i < last else None)
            for i, c in enumerate(chans)
        )
        self.conv_norm_out = _group_norm(config, chans[-1])
        self.conv_out = nn.Conv2d(chans[-1], config.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


# ----------------------------------------------------------------------------------- the model
class AutoencoderKL(nn.Module):
    """Image <-> normalised latent. Images are `[B, C, H, W]` in [-1, 1]; H, W multiples of 8."""

    # dotted paths the runtime reads; a ModuleList path means each of its children is one unit
    offload_units = ("encoder.down_blocks", "encoder.mid_block", "decoder.mid_block", "decoder.up_blocks")
    compile_units = ("encoder.down_blocks", "encoder.mid_block", "decoder.mid_block", "decoder.up_blocks")

    def __init__(self, config: AutoencoderKLConfig | None = None):
        super().__init__()
        self.config = config = config if config is not None else AutoencoderKLConfig()
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        c = config.latent_channels
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(c, c, 1) if config.use_post_quant_conv else None

    @property
    def spatial_compression(self) -> int:
        return 2 ** (len(self.config.block_out_channels) - 1)

    def encode(
        self,
        image: torch.Tensor,
        *,
        sample: bool = False,
        generator: torch.Generator | None = None,
        tiled: bool = False,
        tile_size: int = DEFAULT_TILE_SIZE,
        tile_stride: int = DEFAULT_TILE_STRIDE,
    ) -> torch.Tensor:
        """Normalised latents `[B, latent_channels, H/8, W/8]`.

        The posterior's mean by default (deterministic, what img2img and training use);
        `sample=True` draws from it with `generator` (noise drawn on the generator's device).
        `tile_size`/`tile_stride` are in pixels (multiples of `spatial_compression`).
        """
        f = self.spatial_compression
        if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[1] != self.config.in_channels:
            got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ConfigError(f"image must be a [B, {self.config.in_channels}, H, W] tensor, got {got}")
        if image.shape[2] % f or image.shape[3] % f:
            raise ConfigError(f"image height and width must be multiples of {f}, got {tuple(image.shape[2:])}")
        if tiled:
            t, s = self._tile_cells(tile_size, tile_stride)
            moments = _tiled(self._moments, image, t, s, in_cell=f, out_cell=1)
        else:
            moments = self._moments(image)
        mean, logvar = moments.chunk(2, dim=1)
        z = mean
        if sample:
            device = generator.device if generator is not None else mean.device
            noise = torch.randn(mean.shape, generator=generator, device=device, dtype=mean.dtype).to(mean.device)
            z = mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * noise
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def decode(
        self,
        latents: torch.Tensor,
        *,
        tiled: bool = False,
        tile_size: int = DEFAULT_TILE_SIZE,
        tile_stride: int = DEFAULT_TILE_STRIDE,
    ) -> torch.Tensor:
        """Image in [-1, 1] (not clamped) from normalised latents; tile sizes in output pixels."""
        c = self.config.latent_channels
        if not isinstance(latents, torch.Tensor) or latents.dim() != 4 or latents.shape[1] != c:
            got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ConfigError(f"latents must be a [B, {c}, H/8, W/8] tensor, got {got}")
        z = latents / self.config.scaling_factor + self.config.shift_factor
        if not tiled:
            return self._decode_raw(z)
        t, s = self._tile_cells(tile_size, tile_stride)
        return _tiled(self._decode_raw, z, t, s, in_cell=1, out_cell=self.spatial_compression)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Reconstruction through the posterior mean (a smoke path; pipelines call encode/decode)."""
        return self.decode(self.encode(image))

    def _moments(self, image: torch.Tensor) -> torch.Tensor:
        moments = self.encoder(image)
        return self.quant_conv(moments) if self.quant_conv is not None else moments

    def _decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def _tile_cells(self, tile_size: int, tile_stride: int) -> tuple[int, int]:
        """Pixel tile size/stride -> latent cells, checked."""
        f = self.spatial_compression
        for name, value in (("tile_size", tile_size), ("tile_stride", tile_stride)):
            if not isinstance(value, int) or value < f or value % f:
                raise ConfigError(f"{name} must be a positive multiple of {f} pixels, got {value!r}")
        if tile_stride > tile_size:
            raise ConfigError(
                f"tile_stride={tile_stride} must not exceed tile_size={tile_size} (tiles would leave gaps)"
            )
        return tile_size // f, tile_stride // f


# ----------------------------------------------------------------------------------- tiling
def _spans(length: int, tile: int, stride: int, out_cell: int, device) -> tuple[list, torch.Tensor]:
    """Tile spans along one axis (in latent cells) with their blend weights (in output units).

    Tiles have equal size; the last one is aligned to the end. Each tile's weight ramps linearly
    over the part it shares with its neighbour, so two overlapping weights sum to one and seams
    fade instead of cutting. Returns the spans and the per-position sum of weights.
    """
    if length <= tile:
        starts = [0]
    else:
        starts = sorted(set(range(0, length - tile, stride)) | {length - tile})
    ends = [min(s + tile, length) for s in starts]
    spans, total = [], torch.zeros(length * out_cell, device=device)
    for i, (s, e) in enumerate(zip(starts, ends, strict=True)):
        n = (e - s) * out_cell
        pos = torch.arange(n, device=device, dtype=torch.float32)
        w = torch.ones(n, device=device)
        if i > 0:
            left = (ends[i - 1] - s) * out_cell
            w = torch.minimum(w, (pos + 1) / (left + 1))
        if i + 1 < len(starts):
            right = (e - starts[i + 1]) * out_cell
            w = torch.minimum(w, (n - pos) / (right + 1))
        spans.append((s, e, w))
        total[s * out_cell : e * out_cell] += w
    return spans, total


def _tiled(fn, x: torch.Tensor, tile: int, stride: int, *, in_cell: int, out_cell: int) -> torch.Tensor:
    """Run `fn` on overlapping tiles of `x` and blend; `tile`/`stride` in latent cells.

    `in_cell`/`out_cell` are how many input/output pixels one latent cell spans. Only the blended
    output (float32) is held at full size; activations are those of one tile.
    """
    grid_h, grid_w = x.shape[2] // in_cell, x.shape[3] // in_cell
    rows, row_total = _spans(grid_h, tile, stride, out_cell, x.device)
    cols, col_total = _spans(grid_w, tile, stride, out_cell, x.device)
    out, dtype = None, x.dtype
    for r0, r1, wr in rows:
        for c0, c1, wc in cols:
            y = fn(x[:, :, r0 * in_cell : r1 * in_cell, c0 * in_cell : c1 * in_cell])
            if out is None:
                out = y.new_zeros((y.shape[0], y.shape[1], grid_h * out_cell, grid_w * out_cell), dtype=torch.float32)
                dtype = y.dtype
            out[:, :, r0 * out_cell : r1 * out_cell, c0 * out_cell : c1 * out_cell] += y.float() * (
                wr[:, None] * wc[None, :]
            )
    return (out / (row_total[:, None] * col_total[None, :])).to(dtype)


# ----------------------------------------------------------------------------------- loading
def config_from_state(state: StateDict, config_json: dict | None = None) -> AutoencoderKLConfig:
    """Config from our-named (meta) tensors and the diffusers `config.json` beside them, if any.

    Shapes fix the architecture, `config.json` adds what shapes cannot tell (scaling, shift,
    groups); see `autoencoder_kl_formats.config_fields`. An empty `state` builds from the json alone.
    """
    return AutoencoderKLConfig(**config_fields(state, config_json))


AUTOENCODER_KL_SPEC = ModelSpec(
    name="autoencoder_kl",
    role="vae",
    layouts=LAYOUTS,
    config_from_state=config_from_state,
    build=AutoencoderKL,
    description="FLUX.1 / Z-Image AutoencoderKL (diffusers `vae/` folder, original `ae.safetensors`, ComfyUI prefixes)",
)

__all__ = ["AUTOENCODER_KL_SPEC", "AutoencoderKL", "AutoencoderKLConfig", "config_from_state"]
