"""The LTX-2 vocoders: HiFi-GAN / BigVGAN generators from the audio VAE's stereo log-mel to a stereo waveform.

LTX-2.0 (`LTX2Vocoder`, 24 kHz):

The two channels' 64 mel bins are stacked into 128 input channels; a 7-tap conv widens them to 1024,
then five transposed-conv upsamplers (x6, x5, x2, x2, x2 = 240 samples per 10 ms mel frame) each halve the
width and feed three parallel multi-receptive-field residual blocks (kernels 3, 7, 11; dilations 1, 3, 5)
whose outputs are averaged. Leaky ReLU (slope 0.1) before each upsampler and inside the blocks; the
final one uses PyTorch's default slope 0.01, as the original does. A tanh bounds the waveform to [-1, 1].

LTX-2.3 (`LTX2VocoderWithBWE`, 48 kHz): the same generator in its BigVGAN-v2 form (`activation="snakebeta"`:
no leaky ReLU; each residual conv and the output conv are preceded by a SnakeBeta activation evaluated at twice
the rate between Kaiser-windowed sinc up/down-sampling filters, so it adds no aliasing) makes a 16 kHz waveform;
a causal STFT log-mel of that waveform feeds a second, smaller generator whose output is a residual added to the
16 kHz waveform resampled x3 (Hann-windowed sinc, as torchaudio's resample), which restores the band above 8 kHz.

Module names are ltx-core's (`vocoder.*` of `ltx-2-19b-dev.safetensors` / `ltx-2.3-22b-dev.safetensors` without
the prefix); `vocoder_formats` converts diffusers' `LTX2Vocoder` and `LTX2VocoderWithBWE`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from diffsynth.runtime.errors import ConfigError

LEAKY_SLOPE = 0.1
FINAL_ACTIVATIONS = ("tanh", "clamp", None)
ACTIVATIONS = ("leaky_relu", "snakebeta")
ANTIALIAS_RATIO = 2  # SnakeBeta runs at twice the rate (BigVGAN v2; fixed in ltx-core)
ANTIALIAS_KERNEL = 12  # taps of its Kaiser up/down-sampling filters


@dataclass
class LTX2VocoderConfig:
    """Defaults are the released LTX-2 (2.0) vocoder.

    `in_channels` is input channels x mel bins (2 x 64). Upsampler i goes from `hidden_channels / 2**i`
    to half that with `upsample_kernel_sizes[i]` taps and stride `upsample_rates[i]`; after each, one
    residual block per `resblock_kernel_sizes` entry, with `resblock_dilations` of the same position.
    `activation="snakebeta"` is the BigVGAN-v2 generator of LTX-2.3 (anti-aliased SnakeBeta, see the module
    docstring); it only appears inside `LTX2VocoderWithBWEConfig`.
    """

    in_channels: int = 128
    hidden_channels: int = 1024
    out_channels: int = 2
    upsample_rates: tuple[int, ...] = (6, 5, 2, 2, 2)
    upsample_kernel_sizes: tuple[int, ...] = (16, 15, 8, 4, 4)
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilations: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    final_activation: str | None = "tanh"
    final_bias: bool = True
    sampling_rate: int = 24000
    activation: str = "leaky_relu"

    def __post_init__(self):
        self.upsample_rates = tuple(self.upsample_rates)
        self.upsample_kernel_sizes = tuple(self.upsample_kernel_sizes)
        self.resblock_kernel_sizes = tuple(self.resblock_kernel_sizes)
        self.resblock_dilations = tuple(tuple(d) for d in self.resblock_dilations)
        for name in ("in_channels", "hidden_channels", "out_channels", "sampling_rate"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"LTX2VocoderConfig.{name} must be a positive int, got {value!r}")
        for name in ("upsample_rates", "upsample_kernel_sizes", "resblock_kernel_sizes"):
            value = getattr(self, name)
            if not value or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in value):
                raise ValueError(f"LTX2VocoderConfig.{name} must be positive ints, got {value!r}")
        if len(self.upsample_rates) != len(self.upsample_kernel_sizes):
            raise ValueError(
                f"LTX2VocoderConfig.upsample_kernel_sizes has {len(self.upsample_kernel_sizes)} entries but "
                f"upsample_rates has {len(self.upsample_rates)}"
            )
        bad = [
            (k, s) for k, s in zip(self.upsample_kernel_sizes, self.upsample_rates, strict=True) if k < s or (k - s) % 2
        ]
        if bad:
            raise ValueError(
                f"LTX2VocoderConfig.upsample_kernel_sizes: each kernel must be at least its rate and differ from "
                f"it by an even number (exact x rate output), got (kernel, rate) {bad}"
            )
        if len(self.resblock_dilations) != len(self.resblock_kernel_sizes):
            raise ValueError(
                f"LTX2VocoderConfig.resblock_dilations has {len(self.resblock_dilations)} entries but "
                f"resblock_kernel_sizes has {len(self.resblock_kernel_sizes)}"
            )
        if any(not d or any(not isinstance(v, int) or v < 1 for v in d) for d in self.resblock_dilations):
            raise ValueError(
                f"LTX2VocoderConfig.resblock_dilations must be positive ints, got {self.resblock_dilations}"
            )
        if self.hidden_channels % 2 ** len(self.upsample_rates):
            raise ValueError(
                f"LTX2VocoderConfig.hidden_channels={self.hidden_channels} must be divisible by "
                f"2**len(upsample_rates) = {2 ** len(self.upsample_rates)}"
            )
        if self.final_activation not in FINAL_ACTIVATIONS:
            raise ValueError(
                f"LTX2VocoderConfig.final_activation must be one of {FINAL_ACTIVATIONS}, got {self.final_activation!r}"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"LTX2VocoderConfig.activation must be one of {ACTIVATIONS}, got {self.activation!r}")

    @property
    def hop_length(self) -> int:
        """Output samples per mel frame (240 in the release)."""
        return math.prod(self.upsample_rates)


def kaiser_sinc_filter(ratio: int, kernel_size: int) -> torch.Tensor:
    """BigVGAN's low-pass filter for x`ratio` resampling, `[1, 1, kernel_size]`, summing to 1: a sinc cut at
    0.5/ratio of the rate under a Kaiser window whose beta gives a 0.6/ratio transition half-width."""
    cutoff, half_width = 0.5 / ratio, 0.6 / ratio
    half = kernel_size // 2
    attenuation = 2.285 * (half - 1) * math.pi * 4 * half_width + 7.95  # Kaiser's estimate, in dB
    if attenuation > 50.0:
        beta = 0.1102 * (attenuation - 8.7)
    elif attenuation >= 21.0:
        beta = 0.5842 * (attenuation - 21) ** 0.4 + 0.07886 * (attenuation - 21.0)
    else:
        beta = 0.0
    window = torch.kaiser_window(kernel_size, periodic=False, beta=beta)
    # taps sit between samples for an even length, on them for an odd one
    t = torch.arange(-half, half) + 0.5 if kernel_size % 2 == 0 else torch.arange(kernel_size) - half
    taps = 2 * cutoff * window * torch.sinc(2 * cutoff * t)
    return (taps / taps.sum()).view(1, 1, kernel_size)


class KaiserUpsample(nn.Module):
    """`upsample`: x`ratio` by zero-stuffing and the Kaiser low-pass (edges replicated), length exactly x`ratio`."""

    def __init__(self, ratio: int = ANTIALIAS_RATIO, kernel_size: int = ANTIALIAS_KERNEL):
        super().__init__()
        self.ratio, self.kernel_size = ratio, kernel_size
        self.register_buffer("filter", kaiser_sinc_filter(ratio, kernel_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r, k = self.ratio, self.kernel_size
        pad = k // r - 1
        x = F.pad(x, (pad, pad), mode="replicate")
        x = r * F.conv_transpose1d(x, self.filter.expand(x.shape[1], -1, -1), stride=r, groups=x.shape[1])
        return x[..., pad * r + (k - r) // 2 : -(pad * r + (k - r + 1) // 2)]


class LowPass(nn.Module):
    """`downsample.lowpass`: the Kaiser low-pass taking every `ratio`-th sample (edges replicated)."""

    def __init__(self, ratio: int = ANTIALIAS_RATIO, kernel_size: int = ANTIALIAS_KERNEL):
        super().__init__()
        self.ratio, self.kernel_size = ratio, kernel_size
        self.register_buffer("filter", kaiser_sinc_filter(ratio, kernel_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.kernel_size
        x = F.pad(x, (k // 2 - (k % 2 == 0), k // 2), mode="replicate")
        return F.conv1d(x, self.filter.expand(x.shape[1], -1, -1), stride=self.ratio, groups=x.shape[1])


class KaiserDownsample(nn.Module):
    """`downsample`: only a holder, so the filter's key is ltx-core's `downsample.lowpass.filter`."""

    def __init__(self, ratio: int = ANTIALIAS_RATIO, kernel_size: int = ANTIALIAS_KERNEL):
        super().__init__()
        self.lowpass = LowPass(ratio, kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lowpass(x)


class SnakeBeta(nn.Module):
    """`act`: x + sin^2(a x) / b per channel, with a = exp(alpha) and b = exp(beta) (log-scale parameters)."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha, beta = self.alpha.exp()[:, None], self.beta.exp()[:, None]
        return x + torch.sin(x * alpha).pow(2) / (beta + 1e-9)


class AntiAliasedSnakeBeta(nn.Module):
    """SnakeBeta at twice the rate: its harmonics above the original band are filtered out before decimation."""

    def __init__(self, channels: int):
        super().__init__()
        self.act = SnakeBeta(channels)
        self.upsample = KaiserUpsample()
        self.downsample = KaiserDownsample()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample(self.act(self.upsample(x)))


class ResBlock(nn.Module):
    """`resblocks.N`: for each dilation, x + conv2(act(conv1_dilated(act(x)))), length kept. The activation is
    leaky ReLU, or (`snakebeta`) an anti-aliased SnakeBeta of its own per conv (`acts1`, `acts2`)."""

    def __init__(self, channels: int, kernel_size: int, dilations: tuple[int, ...], activation: str = "leaky_relu"):
        super().__init__()
        self.convs1 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel_size, dilation=d, padding=d * (kernel_size - 1) // 2)
            for d in dilations
        )
        self.convs2 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel_size, padding=(kernel_size - 1) // 2) for _ in dilations
        )
        self.snake = activation == "snakebeta"
        if self.snake:
            self.acts1 = nn.ModuleList(AntiAliasedSnakeBeta(channels) for _ in dilations)
            self.acts2 = nn.ModuleList(AntiAliasedSnakeBeta(channels) for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, (conv1, conv2) in enumerate(zip(self.convs1, self.convs2, strict=True)):
            if self.snake:
                x = x + conv2(self.acts2[i](conv1(self.acts1[i](x))))
            else:
                x = x + conv2(F.leaky_relu(conv1(F.leaky_relu(x, LEAKY_SLOPE)), LEAKY_SLOPE))
        return x


class LTX2Vocoder(nn.Module):
    """Log-mel `[B, 2, T, 64]` (the audio VAE's output) -> waveform `[B, 2, 240 T]` in [-1, 1] at 24 kHz
    (LTX-2.0); with `activation="snakebeta"`, a BigVGAN-v2 generator of `LTX2VocoderWithBWE`."""

    offload_units = ("ups", "resblocks")
    compile_units = ("resblocks",)

    def __init__(self, config: LTX2VocoderConfig | None = None):
        super().__init__()
        self.config = config = config if config is not None else LTX2VocoderConfig()
        self.gradient_checkpointing = False
        hidden = config.hidden_channels
        self.conv_pre = nn.Conv1d(config.in_channels, hidden, 7, padding=3)
        self.ups = nn.ModuleList(
            nn.ConvTranspose1d(hidden >> i, hidden >> (i + 1), k, stride=s, padding=(k - s) // 2)
            for i, (s, k) in enumerate(zip(config.upsample_rates, config.upsample_kernel_sizes, strict=True))
        )
        self.resblocks = nn.ModuleList(
            ResBlock(hidden >> (i + 1), k, d, config.activation)
            for i in range(len(config.upsample_rates))
            for k, d in zip(config.resblock_kernel_sizes, config.resblock_dilations, strict=True)
        )
        final = hidden >> len(config.upsample_rates)
        self.snake = config.activation == "snakebeta"
        if self.snake:
            self.act_post = AntiAliasedSnakeBeta(final)
        self.conv_post = nn.Conv1d(final, config.out_channels, 7, padding=3, bias=config.final_bias)

    @property
    def sampling_rate(self) -> int:
        return self.config.sampling_rate

    @property
    def hop_length(self) -> int:
        return self.config.hop_length

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """`mel` `[B, C, T, M]` with `C * M = in_channels` (channels stacked before bins), or `[B, T, M]`."""
        x = self._flatten(mel)
        x = self.conv_pre(x)
        per_stage = len(self.config.resblock_kernel_sizes)
        for i, up in enumerate(self.ups):
            x = up(x if self.snake else F.leaky_relu(x, LEAKY_SLOPE))  # snake activations sit in the blocks
            blocks = self.resblocks[i * per_stage : (i + 1) * per_stage]
            if self.gradient_checkpointing and torch.is_grad_enabled():
                outs = [checkpoint(block, x, use_reentrant=False) for block in blocks]
            else:
                outs = [block(x) for block in blocks]
            x = torch.stack(outs).mean(dim=0)
        x = self.act_post(x) if self.snake else F.leaky_relu(x)  # leaky: default slope 0.01, as the original
        x = self.conv_post(x)
        if self.config.final_activation == "tanh":
            return torch.tanh(x)
        return x.clamp(-1.0, 1.0) if self.config.final_activation == "clamp" else x

    def _flatten(self, mel) -> torch.Tensor:
        c = self.config.in_channels
        if isinstance(mel, torch.Tensor) and mel.dim() == 3:
            mel = mel[:, None]
        if not isinstance(mel, torch.Tensor) or mel.dim() != 4 or mel.shape[1] * mel.shape[3] != c or not mel.shape[2]:
            got = tuple(mel.shape) if isinstance(mel, torch.Tensor) else type(mel).__name__
            raise ConfigError(
                f"mel must be a [B, channels, T, mel_bins] tensor with channels * mel_bins = {c} (e.g. [B, 2, T, "
                f"{c // 2}]), got {got}"
            )
        return mel.transpose(2, 3).flatten(1, 2)


# ----------------------------------------------------------------------------------- LTX-2.3: bandwidth extension
def release_23_vocoder() -> LTX2VocoderConfig:
    """LTX-2.3's main generator: log-mel -> 16 kHz (160 samples per 10 ms frame), clamped as ltx-core does."""
    return LTX2VocoderConfig(
        hidden_channels=1536,
        upsample_rates=(5, 2, 2, 2, 2, 2),
        upsample_kernel_sizes=(11, 4, 4, 4, 4, 4),
        activation="snakebeta",
        final_activation="clamp",
        final_bias=False,
        sampling_rate=16000,
    )


def release_23_bwe() -> LTX2VocoderConfig:
    """LTX-2.3's bandwidth-extension generator: log-mel of the 16 kHz waveform (80-sample hop) -> 48 kHz
    residual (240 samples per frame), unbounded (the sum with the resampled waveform is clamped)."""
    return LTX2VocoderConfig(
        hidden_channels=512,
        upsample_rates=(6, 5, 2, 2, 2),
        upsample_kernel_sizes=(12, 11, 4, 4, 4),
        activation="snakebeta",
        final_activation=None,
        final_bias=False,
        sampling_rate=48000,
    )


@dataclass
class LTX2VocoderWithBWEConfig:
    """Defaults are the released LTX-2.3 vocoder.

    `vocoder` makes the waveform at its `sampling_rate`; `bwe` turns a causal STFT log-mel of it (`n_fft`-point
    Hann window and DFT, hop `stft_hop_length`, `mel_bins` bins per channel) into a residual at its own, integer
    multiple `sampling_rate`, so one STFT frame must make `bwe.hop_length = ratio * stft_hop_length` samples.
    """

    vocoder: LTX2VocoderConfig = field(default_factory=release_23_vocoder)
    bwe: LTX2VocoderConfig = field(default_factory=release_23_bwe)
    mel_bins: int = 64
    n_fft: int = 512
    stft_hop_length: int = 80

    def __post_init__(self):
        for name in ("vocoder", "bwe"):
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, LTX2VocoderConfig(**value))
            elif not isinstance(value, LTX2VocoderConfig):
                raise ValueError(f"LTX2VocoderWithBWEConfig.{name} must be an LTX2VocoderConfig, got {value!r}")
        for name in ("mel_bins", "n_fft", "stft_hop_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"LTX2VocoderWithBWEConfig.{name} must be a positive int, got {value!r}")
        if self.stft_hop_length > self.n_fft:
            raise ValueError(
                f"LTX2VocoderWithBWEConfig.stft_hop_length={self.stft_hop_length} must not exceed n_fft={self.n_fft}"
            )
        low, high = self.vocoder.sampling_rate, self.bwe.sampling_rate
        if high % low:
            raise ValueError(
                f"LTX2VocoderWithBWEConfig: bwe.sampling_rate={high} must be a multiple of vocoder.sampling_rate={low}"
            )
        if self.bwe.in_channels != self.vocoder.out_channels * self.mel_bins:
            raise ValueError(
                f"LTX2VocoderWithBWEConfig: bwe.in_channels={self.bwe.in_channels} must be vocoder.out_channels x "
                f"mel_bins = {self.vocoder.out_channels * self.mel_bins}"
            )
        if self.bwe.out_channels != self.vocoder.out_channels:
            raise ValueError(
                f"LTX2VocoderWithBWEConfig: bwe.out_channels={self.bwe.out_channels} must equal "
                f"vocoder.out_channels={self.vocoder.out_channels} (the residual adds to the resampled waveform)"
            )
        if self.bwe.hop_length != self.ratio * self.stft_hop_length:
            raise ValueError(
                f"LTX2VocoderWithBWEConfig: bwe.upsample_rates give {self.bwe.hop_length} samples per STFT frame, "
                f"but a hop of {self.stft_hop_length} at x{self.ratio} the rate needs "
                f"{self.ratio * self.stft_hop_length}"
            )

    @property
    def ratio(self) -> int:
        """Output samples per sample of the main generator (3 in the release)."""
        return self.bwe.sampling_rate // self.vocoder.sampling_rate

    @property
    def sampling_rate(self) -> int:
        return self.bwe.sampling_rate

    @property
    def hop_length(self) -> int:
        """Output samples per input mel frame (480 in the release)."""
        return self.vocoder.hop_length * self.ratio


class CausalSTFT(nn.Module):
    """`stft_fn`: STFT magnitude as one strided conv with the stored (window x DFT) basis, the window ending at
    each hop (left padding only). `inverse_basis` is stored in the checkpoint but not used for inference."""

    def __init__(self, n_fft: int, hop_length: int):
        super().__init__()
        self.n_fft, self.hop_length = n_fft, hop_length
        freqs = n_fft // 2 + 1
        self.register_buffer("forward_basis", torch.zeros(2 * freqs, 1, n_fft))
        self.register_buffer("inverse_basis", torch.zeros(2 * freqs, 1, n_fft))

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        """`wave` `[N, samples]` -> magnitude `[N, n_fft // 2 + 1, samples // hop]` (samples a multiple of hop)."""
        x = F.pad(wave[:, None], (self.n_fft - self.hop_length, 0))
        real, imag = F.conv1d(x, self.forward_basis, stride=self.hop_length).chunk(2, dim=1)
        return torch.sqrt(real**2 + imag**2)


class MelSTFT(nn.Module):
    """`mel_stft`: natural-log mel magnitude (floor 1e-5) with the stored filterbank `mel_basis` `[mels, freqs]`.
    The bases are loaded, not computed: they are the exact (bfloat16) ones the BWE generator was trained on."""

    def __init__(self, n_fft: int, hop_length: int, mel_bins: int):
        super().__init__()
        self.stft_fn = CausalSTFT(n_fft, hop_length)
        self.register_buffer("mel_basis", torch.zeros(mel_bins, n_fft // 2 + 1))

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        magnitude = self.stft_fn(wave)
        return torch.log(torch.matmul(self.mel_basis.to(magnitude.dtype), magnitude).clamp(min=1e-5))


@cache
def _hann_resample_filter(ratio: int) -> tuple[torch.Tensor, int]:
    """torchaudio-style x`ratio` interpolation filter (sinc, 6 zero crossings, rolloff 0.99, Hann-squared-cosine
    window), `[1, 1, 2 * width * ratio + 1]`, and its half width in input samples. Computed on the CPU in float32,
    as ltx-core does; nothing in the checkpoint holds it."""
    rolloff, zeros = 0.99, 6
    width = math.ceil(zeros / rolloff)
    t = (torch.arange(2 * width * ratio + 1, device="cpu") / ratio - width) * rolloff  # cached: never meta
    window = torch.cos(t.clamp(-zeros, zeros) * math.pi / zeros / 2) ** 2
    return (torch.sinc(t) * window * rolloff / ratio).view(1, 1, -1), width


def hann_resample(x: torch.Tensor, ratio: int) -> torch.Tensor:
    """`x` `[B, C, n]` -> `[B, C, ratio * n]` band-limited interpolation (edges replicated)."""
    taps, width = _hann_resample_filter(ratio)
    taps = taps.to(device=x.device, dtype=x.dtype).expand(x.shape[1], -1, -1)
    y = ratio * F.conv_transpose1d(F.pad(x, (width, width), mode="replicate"), taps, stride=ratio, groups=x.shape[1])
    return y[..., 2 * width * ratio : -(taps.shape[-1] - ratio)]


class LTX2VocoderWithBWE(nn.Module):
    """LTX-2.3: log-mel `[B, 2, T, 64]` -> waveform `[B, 2, 480 T]` in [-1, 1] at 48 kHz.

    `vocoder` makes 16 kHz; `bwe_generator` predicts, from the log-mel (`mel_stft`) of that waveform, a 48 kHz
    residual added to its x3 resampling. Module names are ltx-core's `VocoderWithBWE`. It computes in float32
    whatever the weights' dtype, as ltx-core does: its ~100 convolutions in a row lose measurably in bfloat16.
    On CUDA an fp32 autocast upcasts each op's weights (no full-size copy); elsewhere the weights are cast to
    float32 for the call and back after it.
    """

    offload_units = ("vocoder.ups", "vocoder.resblocks", "bwe_generator.ups", "bwe_generator.resblocks")
    compile_units = ("vocoder.resblocks", "bwe_generator.resblocks")

    def __init__(self, config: LTX2VocoderWithBWEConfig | None = None):
        super().__init__()
        self.config = config = config if config is not None else LTX2VocoderWithBWEConfig()
        self.vocoder = LTX2Vocoder(config.vocoder)
        self.bwe_generator = LTX2Vocoder(config.bwe)
        self.mel_stft = MelSTFT(config.n_fft, config.stft_hop_length, config.mel_bins)

    @property
    def gradient_checkpointing(self) -> bool:
        return self.vocoder.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        self.vocoder.gradient_checkpointing = self.bwe_generator.gradient_checkpointing = bool(value)

    @property
    def sampling_rate(self) -> int:
        return self.config.sampling_rate

    @property
    def hop_length(self) -> int:
        return self.config.hop_length

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """`mel` as `LTX2Vocoder.forward` takes it; returns `[B, channels, hop_length * T]`, in float32 (float64
        for float64 weights)."""
        dtype = next(self.parameters()).dtype
        if dtype.itemsize >= 4:  # float32 / float64 weights run as they are
            return self._waveform(mel.to(dtype))
        if mel.device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.float32):
                return self._waveform(mel.float())
        self.float()
        try:
            return self._waveform(mel.float())
        finally:
            self.to(dtype)

    def _waveform(self, mel: torch.Tensor) -> torch.Tensor:
        low = self.vocoder(mel)
        samples = low.shape[-1]
        low = F.pad(low, (0, -samples % self.config.stft_hop_length))  # whole STFT frames
        b, c, n = low.shape
        bwe_mel = self.mel_stft(low.reshape(b * c, n)).unflatten(0, (b, c))  # [B, C, mels, frames]
        residual = self.bwe_generator(bwe_mel.transpose(2, 3))
        wave = residual + hann_resample(low, self.config.ratio)
        return wave.clamp(-1.0, 1.0)[..., : samples * self.config.ratio]


__all__ = ["LTX2Vocoder", "LTX2VocoderConfig", "LTX2VocoderWithBWE", "LTX2VocoderWithBWEConfig"]
