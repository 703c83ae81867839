"""The LTX-2 audio VAE: a stereo log-mel spectrogram <-> 8 latent channels x 16 mel bins, 4x shorter.

A 2-D convolutional VAE over `[B, 2, time, mel]` (an LDM-style encoder/decoder with parameter-free
RMS norms, no attention in the release). Convolutions are causal over time (the height axis): they pad
two rows above and none below, the stride-2 downsamplers pad `(top 2, right 1)`, and the upsamplers
(nearest x2 then a causal conv) drop their first row, so `T` mel frames become `ceil(T / 4)` latent
frames and `L` latent frames decode to `4L - 3` mel frames.

Latents are normalised per (channel, latent mel bin) pair: the 128 `per_channel_statistics` entries
are indexed `c * 16 + f`, as ltx-core and diffusers apply them to the `[B, L, C * F]` token layout the
DiT reads. `encode` returns normalised latents `[B, 8, L, 16]` and `decode` takes them back;
`pack_latents` / `unpack_latents` give the DiT's `[B, L, 128]` tokens. `mel_spectrogram` turns a 16 kHz
waveform into the log-mel input (ltx-core's `AudioProcessor` settings: n_fft 1024, hop 160, Slaney mel).

Module names are ltx-core's (`audio_vae.*` of `ltx-2-19b-dev.safetensors` without the prefix);
`audio_vae_formats` converts diffusers' `AutoencoderKLLTX2Audio`, which differs only in the statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from diffsynth.runtime.errors import ConfigError

from .latent_statistics import PerChannelStatistics

LOG_MEL_FLOOR = 1e-5


@dataclass
class LTX2AudioVAEConfig:
    """Defaults are the released LTX-2 audio VAE.

    The encoder is `len(ch_mult)` stages of `num_res_blocks` residual blocks, `base_channels * ch_mult[i]`
    wide, with a stride-2 downsampler (time and mel) after each stage but the last; the decoder mirrors it
    with one more block per stage. `causal` pads convolutions only on the past side of the time axis
    (the release); False pads both sides. The mel settings describe the spectrogram the VAE was trained on.
    """

    in_channels: int = 2
    out_channels: int = 2
    base_channels: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 2
    latent_channels: int = 8
    mel_bins: int = 64
    causal: bool = True
    sample_rate: int = 16000
    hop_length: int = 160
    n_fft: int = 1024

    def __post_init__(self):
        self.ch_mult = tuple(self.ch_mult)
        for name in (
            "in_channels",
            "out_channels",
            "base_channels",
            "num_res_blocks",
            "latent_channels",
            "mel_bins",
            "sample_rate",
            "hop_length",
            "n_fft",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"LTX2AudioVAEConfig.{name} must be a positive int, got {value!r}")
        if not self.ch_mult or any(not isinstance(m, int) or isinstance(m, bool) or m < 1 for m in self.ch_mult):
            raise ValueError(f"LTX2AudioVAEConfig.ch_mult must be positive ints, got {self.ch_mult!r}")
        if self.mel_bins % self.compression:
            raise ValueError(
                f"LTX2AudioVAEConfig.mel_bins={self.mel_bins} must be a multiple of the compression "
                f"2**(len(ch_mult) - 1) = {self.compression}"
            )

    @property
    def compression(self) -> int:
        """Time and mel downsampling factor (4 in the release)."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def latent_mel_bins(self) -> int:
        return self.mel_bins // self.compression

    @property
    def statistics_size(self) -> int:
        """Entries of each normalisation vector: one per (latent channel, latent mel bin)."""
        return self.latent_channels * self.latent_mel_bins

    @property
    def latents_per_second(self) -> float:
        return self.sample_rate / self.hop_length / self.compression


# ----------------------------------------------------------------------------------- building blocks
def _pixel_norm(x: torch.Tensor) -> torch.Tensor:
    """RMS over channels, no weights (ltx-core's `PixelNorm`, eps 1e-6)."""
    return x * torch.rsqrt(x.square().mean(dim=1, keepdim=True) + 1e-6)


class CausalConv2d(nn.Module):
    """Stride-1 conv (`conv.*`) padded by hand: time (height) only on the past side when causal."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, causal: bool):
        super().__init__()
        pad = kernel_size - 1
        self.padding = (pad // 2, pad - pad // 2, pad, 0) if causal else (pad // 2, pad - pad // 2) * 2
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, self.padding) if any(self.padding) else x)


class ResnetBlock(nn.Module):
    """x (through a 1x1 `nin_shortcut` when the width changes) + conv2(SiLU(norm(conv1(SiLU(norm(x))))))."""

    def __init__(self, in_channels: int, out_channels: int, causal: bool):
        super().__init__()
        self.conv1 = CausalConv2d(in_channels, out_channels, 3, causal)
        self.conv2 = CausalConv2d(out_channels, out_channels, 3, causal)
        self.nin_shortcut = CausalConv2d(in_channels, out_channels, 1, causal) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(F.silu(_pixel_norm(self.conv1(F.silu(_pixel_norm(x))))))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class Downsample(nn.Module):
    """Stride-2 3x3 conv; zero padding of 2 rows above (causal) or 1 below, and 1 column on the right."""

    def __init__(self, channels: int, causal: bool):
        super().__init__()
        self.padding = (0, 1, 2, 0) if causal else (0, 1, 0, 1)
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, self.padding))


class Upsample(nn.Module):
    """Nearest x2 then a 3x3 conv; when causal the first row is dropped so `L` rows become `2L - 1`."""

    def __init__(self, channels: int, causal: bool):
        super().__init__()
        self.causal = causal
        self.conv = CausalConv2d(channels, channels, 3, causal)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return x[:, :, 1:] if self.causal else x


class Stage(nn.Module):
    """`down.N` / `up.N`: residual blocks (`block.M`) and an optional resampler."""

    def __init__(self, widths: list[int], causal: bool, resampler: nn.Module | None, name: str):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(a, b, causal) for a, b in zip(widths[:-1], widths[1:], strict=True))
        if resampler is not None:
            self.add_module(name, resampler)
        self.resampler_name = name if resampler is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return getattr(self, self.resampler_name)(x) if self.resampler_name else x


class MidBlock(nn.Module):
    """`mid.block_1` / `mid.block_2` (the release has no mid attention)."""

    def __init__(self, channels: int, causal: bool):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, causal)
        self.block_2 = ResnetBlock(channels, channels, causal)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.block_1(x))


def _run(modules, x: torch.Tensor, checkpointing: bool) -> torch.Tensor:
    for module in modules:
        if checkpointing and torch.is_grad_enabled():
            x = checkpoint(module, x, use_reentrant=False)
        else:
            x = module(x)
    return x


class Encoder(nn.Module):
    """Mel `[B, 2, T, M]` -> `2 * latent_channels` moments `[B, 16, ceil(T/4), M/4]` (means, log-variances)."""

    def __init__(self, config: LTX2AudioVAEConfig):
        super().__init__()
        self.gradient_checkpointing = False
        causal, base = config.causal, config.base_channels
        self.conv_in = CausalConv2d(config.in_channels, base, 3, causal)
        stages, width = [], base
        for level, mult in enumerate(config.ch_mult):
            out = base * mult
            last = level == len(config.ch_mult) - 1
            widths = [width] + [out] * config.num_res_blocks
            stages.append(Stage(widths, causal, None if last else Downsample(out, causal), "downsample"))
            width = out
        self.down = nn.ModuleList(stages)
        self.mid = MidBlock(width, causal)
        self.conv_out = CausalConv2d(width, 2 * config.latent_channels, 3, causal)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = _run([*self.down, self.mid], self.conv_in(mel), self.gradient_checkpointing)
        return self.conv_out(F.silu(_pixel_norm(x)))


class Decoder(nn.Module):
    """Latents `[B, 8, L, F]` -> mel `[B, 2, 4L - 3, 4F]` (`4L` when not causal)."""

    def __init__(self, config: LTX2AudioVAEConfig):
        super().__init__()
        self.gradient_checkpointing = False
        causal, base = config.causal, config.base_channels
        width = base * config.ch_mult[-1]
        self.conv_in = CausalConv2d(config.latent_channels, width, 3, causal)
        self.mid = MidBlock(width, causal)
        stages: list[Stage] = []
        for level in reversed(range(len(config.ch_mult))):
            out = base * config.ch_mult[level]
            widths = [width] + [out] * (config.num_res_blocks + 1)
            stages.insert(0, Stage(widths, causal, Upsample(out, causal) if level else None, "upsample"))
            width = out
        self.up = nn.ModuleList(stages)  # indexed by level: up.0 is the last (widest-resolution) stage
        self.conv_out = CausalConv2d(width, config.out_channels, 3, causal)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = _run([self.mid, *reversed(self.up)], self.conv_in(z), self.gradient_checkpointing)
        return self.conv_out(F.silu(_pixel_norm(x)))


# ----------------------------------------------------------------------------------- the model
class LTX2AudioVAE(nn.Module):
    """Log-mel `[B, 2, T, 64]` <-> normalised latents `[B, 8, ceil(T/4), 16]`."""

    # dotted paths the runtime reads; a ModuleList path means each child is one unit
    offload_units = ("encoder.down", "decoder.up")
    compile_units = ("encoder.down", "decoder.up")

    def __init__(self, config: LTX2AudioVAEConfig | None = None):
        super().__init__()
        self.config = config = config if config is not None else LTX2AudioVAEConfig()
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.per_channel_statistics = PerChannelStatistics(config.statistics_size)

    @property
    def gradient_checkpointing(self) -> bool:
        return self.encoder.gradient_checkpointing and self.decoder.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        self.encoder.gradient_checkpointing = self.decoder.gradient_checkpointing = bool(value)

    @property
    def z_dim(self) -> int:
        return self.config.latent_channels

    def num_latent_frames(self, mel_frames: int) -> int:
        """Latent frames for `mel_frames` spectrogram frames (`ceil(T / 4)`)."""
        return -(-mel_frames // self.config.compression)

    def num_mel_frames(self, latent_frames: int) -> int:
        """Mel frames `decode` returns for `latent_frames` (`4L - 3` causal, `4L` otherwise)."""
        c = self.config.compression
        return max(latent_frames * c - (c - 1), 1) if self.config.causal else latent_frames * c

    def encode(self, mel: torch.Tensor, *, sample: bool = False, generator: torch.Generator | None = None):
        """Normalised latents `(z - mean-of-means) / std-of-means` per (channel, mel bin).

        `z` is the posterior's mode (what ltx-core and diffusers' pipelines use); `sample=True` draws from
        it with `generator`.
        """
        self._check(mel, "mel", self.config.in_channels, self.config.mel_bins, "T", "mel_bins")
        moments = self.encoder(mel)
        z, logvar = moments.chunk(2, dim=1)
        if sample:
            device = generator.device if generator is not None else z.device
            noise = torch.randn(z.shape, generator=generator, device=device, dtype=z.dtype).to(z.device)
            z = z + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * noise
        mean, std = self.per_channel_statistics.stats(z, (1, z.shape[1], 1, z.shape[3]))
        return (z - mean) / std

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Log-mel spectrogram `[B, 2, num_mel_frames(L), 64]` from normalised latents `[B, 8, L, 16]`."""
        c = self.config
        self._check(latents, "latents", c.latent_channels, c.latent_mel_bins, "L", "mel_bins / 4")
        mean, std = self.per_channel_statistics.stats(latents, (1, latents.shape[1], 1, latents.shape[3]))
        mel = self.decoder(latents * std + mean)
        frames, bins = self.num_mel_frames(latents.shape[2]), c.mel_bins
        mel = mel[:, :, :frames, :bins]
        if mel.shape[2] < frames or mel.shape[3] < bins:  # only when a non-causal stack falls short
            mel = F.pad(mel, (0, bins - mel.shape[3], 0, frames - mel.shape[2]))
        return mel

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """Reconstruction through the posterior mode (a smoke path; pipelines call encode/decode)."""
        return self.decode(self.encode(mel))

    def _check(self, x, name: str, channels: int, bins: int, time: str, bins_name: str) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != channels or x.shape[3] != bins:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ConfigError(
                f"{name} must be a [B, {channels}, {time}, {bins}] tensor ({bins_name} = {bins}), got {got}"
            )
        if x.shape[2] < 1:
            raise ConfigError(f"{name} has no frames: {tuple(x.shape)}")


# ----------------------------------------------------------------------------------- tokens and mel
def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """`[B, C, L, F]` -> the DiT's audio tokens `[B, L, C * F]`."""
    return latents.transpose(1, 2).flatten(2, 3)


def unpack_latents(tokens: torch.Tensor, latent_mel_bins: int = 16) -> torch.Tensor:
    """The DiT's audio tokens `[B, L, C * F]` -> `[B, C, L, F]`."""
    if tokens.dim() != 3 or tokens.shape[2] % latent_mel_bins:
        raise ConfigError(
            f"audio tokens must be [B, L, C * {latent_mel_bins}], got {tuple(tokens.shape)} "
            f"(latent_mel_bins={latent_mel_bins})"
        )
    return tokens.unflatten(2, (-1, latent_mel_bins)).transpose(1, 2)


def _hz_to_mel(hz: torch.Tensor) -> torch.Tensor:
    """Slaney mel scale: linear below 1 kHz (3 per 200 Hz), logarithmic above (27 per ln 6.4)."""
    log_part = 15.0 + torch.log(hz.clamp(min=1e-10) / 1000.0) * (27.0 / math.log(6.4))
    return torch.where(hz < 1000.0, hz * 3.0 / 200.0, log_part)


def _mel_to_hz(mel: torch.Tensor) -> torch.Tensor:
    return torch.where(mel < 15.0, mel * 200.0 / 3.0, 1000.0 * torch.exp((mel - 15.0) * math.log(6.4) / 27.0))


def mel_filterbank(sample_rate: int, n_fft: int, mel_bins: int) -> torch.Tensor:
    """`[mel_bins, n_fft // 2 + 1]` triangular filters from 0 Hz to Nyquist on the Slaney mel scale, each
    scaled to unit area (Slaney norm), as torchaudio's `MelSpectrogram(mel_scale="slaney", norm="slaney")`."""
    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    edges = _mel_to_hz(torch.linspace(0.0, float(_hz_to_mel(torch.tensor(sample_rate / 2.0))), mel_bins + 2).double())
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (freqs - lower) / (centre - lower)
    falling = (upper - freqs) / (upper - centre)
    bank = torch.clamp(torch.minimum(rising, falling), min=0.0)
    return (bank * (2.0 / (upper - lower))).float()


def mel_spectrogram(waveform: torch.Tensor, sample_rate: int, config: LTX2AudioVAEConfig | None = None) -> torch.Tensor:
    """The audio VAE's input: log-mel `[B, C, 1 + samples // hop, mel_bins]` of `waveform` `[B, C, samples]`
    (or `[C, samples]`), magnitude STFT with a periodic Hann window, centred with reflect padding,
    `log(max(mel, 1e-5))`. A mono waveform is repeated to the VAE's `in_channels`. The waveform must
    already be at the VAE's rate (16 kHz); resampling is the caller's job.
    """
    config = config if config is not None else LTX2AudioVAEConfig()
    if sample_rate != config.sample_rate:
        raise ConfigError(
            f"sample_rate={sample_rate}: the LTX-2 audio VAE reads {config.sample_rate} Hz audio; resample the "
            "waveform first"
        )
    if not isinstance(waveform, torch.Tensor) or waveform.dim() not in (2, 3):
        got = tuple(waveform.shape) if isinstance(waveform, torch.Tensor) else type(waveform).__name__
        raise ConfigError(f"waveform must be a [B, channels, samples] or [channels, samples] tensor, got {got}")
    if waveform.dim() == 2:
        waveform = waveform[None]
    if waveform.shape[1] == 1 and config.in_channels > 1:
        waveform = waveform.expand(-1, config.in_channels, -1)
    if waveform.shape[1] != config.in_channels:
        raise ConfigError(
            f"waveform has {waveform.shape[1]} channels; the audio VAE takes {config.in_channels} (or 1, repeated)"
        )
    if waveform.shape[2] <= config.n_fft // 2:
        raise ConfigError(
            f"waveform has {waveform.shape[2]} samples; at least {config.n_fft // 2 + 1} are needed (reflect padding)"
        )
    b, c, n = waveform.shape
    signal = waveform.reshape(b * c, n).float()
    window = torch.hann_window(config.n_fft, periodic=True, device=signal.device)
    spec = torch.stft(
        signal, config.n_fft, config.hop_length, window=window, center=True, pad_mode="reflect", return_complex=True
    ).abs()
    bank = mel_filterbank(config.sample_rate, config.n_fft, config.mel_bins).to(signal.device)
    mel = torch.log(torch.clamp(bank @ spec, min=LOG_MEL_FLOOR))  # [B * C, mel_bins, frames]
    return mel.reshape(b, c, config.mel_bins, -1).transpose(2, 3).to(waveform.dtype)


__all__ = [
    "LTX2AudioVAE",
    "LTX2AudioVAEConfig",
    "mel_filterbank",
    "mel_spectrogram",
    "pack_latents",
    "unpack_latents",
]
