"""The FLUX.2 VAE: FLUX.1's LDM `AutoencoderKL` with 32 latent channels, and a BatchNorm over packed latents.

The convolutional part is the runtime's `AutoencoderKL` unchanged (quant / post-quant convs on), so it is
subclassed, not copied. What FLUX.2 adds is the latent convention its DiT is trained on:

- packing: each 2x2 patch of the 32-channel latent becomes 128 channels at half the resolution, channel
  `c * 4 + 2 * dy + dx` (BFL's `(c pi pj)` rearrange, diffusers' `_patchify_latents`);
- normalisation: each packed channel is standardised with the running statistics of a BatchNorm stored in
  the checkpoint, `(z - running_mean) / sqrt(running_var + eps)`, eps 1e-4 (BFL's `bn_eps`, diffusers'
  `batch_norm_eps`). This replaces FLUX.1's scaling/shift factors, which stay 1 and 0 here.

`encode` returns the posterior mean by default, as both BFL (`encode` takes the mean) and diffusers' FLUX.2
pipelines (`sample_mode="argmax"`) do for reference images. Module names are the diffusers `vae/` ones plus
`bn.*`; BFL's `ae.safetensors` is converted in `vae_formats`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.models.autoencoder_kl import (
    DEFAULT_TILE_SIZE,
    DEFAULT_TILE_STRIDE,
    AutoencoderKL,
    AutoencoderKLConfig,
)


@dataclass
class Flux2VAEConfig(AutoencoderKLConfig):
    """Defaults are the released FLUX.2 VAE (`black-forest-labs/FLUX.2-dev` `ae.safetensors`, the klein `vae/`).

    `patch_size` is the side of the square patch folded into channels before the BatchNorm; the
    BatchNorm has `latent_channels * patch_size**2` channels. `scaling_factor` / `shift_factor` are
    inherited from `AutoencoderKLConfig` and must stay 1 and 0: the BatchNorm does that job.
    """

    latent_channels: int = 32
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    patch_size: int = 2
    batch_norm_eps: float = 1e-4

    def __post_init__(self):
        super().__post_init__()
        if self.scaling_factor != 1.0 or self.shift_factor != 0.0:
            raise ValueError(
                f"Flux2VAEConfig.scaling_factor/shift_factor must be 1.0/0.0 (the BatchNorm normalises FLUX.2 "
                f"latents), got {self.scaling_factor!r}/{self.shift_factor!r}"
            )
        if not isinstance(self.patch_size, int) or self.patch_size < 1:
            raise ValueError(f"Flux2VAEConfig.patch_size must be a positive int, got {self.patch_size!r}")
        if not self.batch_norm_eps > 0:
            raise ValueError(f"Flux2VAEConfig.batch_norm_eps must be a positive number, got {self.batch_norm_eps!r}")

    @property
    def packed_channels(self) -> int:
        return self.latent_channels * self.patch_size**2


# ----------------------------------------------------------------------------------- packing
def pack_latents(latents: torch.Tensor, patch_size: int = 2) -> torch.Tensor:
    """`[B, C, H, W]` -> `[B, C * p * p, H / p, W / p]`, channel `c * p * p + p * dy + dx`."""
    b, c, h, w = latents.shape
    p = patch_size
    x = latents.reshape(b, c, h // p, p, w // p, p).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * p * p, h // p, w // p)


def unpack_latents(latents: torch.Tensor, patch_size: int = 2) -> torch.Tensor:
    """The inverse of `pack_latents`: `[B, C * p * p, h, w]` -> `[B, C, h * p, w * p]`."""
    b, cp, h, w = latents.shape
    p = patch_size
    x = latents.reshape(b, cp // (p * p), p, p, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, cp // (p * p), h * p, w * p)


# ----------------------------------------------------------------------------------- the model
class Flux2VAE(AutoencoderKL):
    """Image `[B, 3, H, W]` in [-1, 1] <-> packed, normalised latents `[B, 128, H/16, W/16]`.

    Offload / compile units are `AutoencoderKL`'s (the encoder and decoder stages); `bn` holds only
    statistics (never run as a layer, so its train/eval mode does not matter).
    """

    def __init__(self, config: Flux2VAEConfig | None = None):
        config = config if config is not None else Flux2VAEConfig()
        if not isinstance(config, Flux2VAEConfig):
            raise ConfigError(f"Flux2VAE needs a Flux2VAEConfig, got {type(config).__name__}")
        super().__init__(config)
        # the checkpoint's `bn.running_mean/running_var/num_batches_tracked`; affine-free, as in the files
        self.bn = nn.BatchNorm2d(config.packed_channels, eps=config.batch_norm_eps, affine=False)

    @property
    def latent_compression(self) -> int:
        """Image pixels per packed latent cell along each side (16: 8x by the convs, 2x by the packing)."""
        return self.spatial_compression * self.config.patch_size

    # ------------------------------------------------------------------ latent convention
    def normalize(self, packed: torch.Tensor) -> torch.Tensor:
        """Packed raw latents -> what the DiT sees (statistics applied in float32)."""
        mean, std = self._statistics()
        return ((packed.float() - mean) / std).to(packed.dtype)

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """The inverse of `normalize`."""
        mean, std = self._statistics()
        return (latents.float() * std + mean).to(latents.dtype)

    def _statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.bn.running_mean.float().view(1, -1, 1, 1)
        std = torch.sqrt(self.bn.running_var.float().view(1, -1, 1, 1) + self.config.batch_norm_eps)
        return mean, std

    # ------------------------------------------------------------------ encode / decode
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
        """Packed, normalised latents `[B, 4 * latent_channels, H/16, W/16]`.

        The posterior's mean by default (what the FLUX.2 pipelines use for reference images);
        `sample=True` draws from it with `generator`. Tiling (sizes in pixels, multiples of 8) runs on
        the unpacked latents, before packing and normalising.
        """
        f = self.latent_compression
        if isinstance(image, torch.Tensor) and image.dim() == 4 and (image.shape[2] % f or image.shape[3] % f):
            raise ConfigError(
                f"image height and width must be multiples of {f} for the FLUX.2 VAE "
                f"(8x convolutions, then 2x2 packing), got {tuple(image.shape[2:])}"
            )
        raw = super().encode(
            image, sample=sample, generator=generator, tiled=tiled, tile_size=tile_size, tile_stride=tile_stride
        )
        return self.normalize(pack_latents(raw, self.config.patch_size))

    def decode(
        self,
        latents: torch.Tensor,
        *,
        tiled: bool = False,
        tile_size: int = DEFAULT_TILE_SIZE,
        tile_stride: int = DEFAULT_TILE_STRIDE,
    ) -> torch.Tensor:
        """Image in [-1, 1] (not clamped) from packed, normalised latents; tile sizes in output pixels."""
        c = self.config.packed_channels
        if not isinstance(latents, torch.Tensor) or latents.dim() != 4 or latents.shape[1] != c:
            got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ConfigError(f"latents must be a packed [B, {c}, H/16, W/16] tensor, got {got}")
        raw = unpack_latents(self.denormalize(latents), self.config.patch_size)
        return super().decode(raw, tiled=tiled, tile_size=tile_size, tile_stride=tile_stride)


__all__ = ["Flux2VAE", "Flux2VAEConfig", "pack_latents", "unpack_latents"]
