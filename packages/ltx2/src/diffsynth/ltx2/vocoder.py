"""The LTX-2 vocoder: a HiFi-GAN generator from the audio VAE's stereo log-mel to a 24 kHz stereo waveform.

The two channels' 64 mel bins are stacked into 128 input channels; a 7-tap conv widens them to 1024,
then five transposed-conv upsamplers (x6, x5, x2, x2, x2 = 240 samples per 10 ms mel frame) each halve the
width and feed three parallel multi-receptive-field residual blocks (kernels 3, 7, 11; dilations 1, 3, 5)
whose outputs are averaged. Leaky ReLU (slope 0.1) before each upsampler and inside the blocks; the
final one uses PyTorch's default slope 0.01, as the original does. A tanh bounds the waveform to [-1, 1].

Module names are ltx-core's (`vocoder.*` of `ltx-2-19b-dev.safetensors` without the prefix);
`vocoder_formats` converts diffusers' `LTX2Vocoder`. The LTX-2.3 vocoder with bandwidth extension
(`LTX2VocoderWithBWE`, snake activations) is a different model and is not covered here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from diffsynth.runtime.errors import ConfigError

LEAKY_SLOPE = 0.1
FINAL_ACTIVATIONS = ("tanh", "clamp", None)


@dataclass
class LTX2VocoderConfig:
    """Defaults are the released LTX-2 (2.0) vocoder.

    `in_channels` is input channels x mel bins (2 x 64). Upsampler i goes from `hidden_channels / 2**i`
    to half that with `upsample_kernel_sizes[i]` taps and stride `upsample_rates[i]`; after each, one
    residual block per `resblock_kernel_sizes` entry, with `resblock_dilations` of the same position.
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

    @property
    def hop_length(self) -> int:
        """Output samples per mel frame (240 in the release)."""
        return math.prod(self.upsample_rates)


class ResBlock(nn.Module):
    """`resblocks.N`: for each dilation, x + conv2(lrelu(conv1_dilated(lrelu(x)))), length kept."""

    def __init__(self, channels: int, kernel_size: int, dilations: tuple[int, ...]):
        super().__init__()
        self.convs1 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel_size, dilation=d, padding=d * (kernel_size - 1) // 2)
            for d in dilations
        )
        self.convs2 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel_size, padding=(kernel_size - 1) // 2) for _ in dilations
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv1, conv2 in zip(self.convs1, self.convs2, strict=True):
            x = x + conv2(F.leaky_relu(conv1(F.leaky_relu(x, LEAKY_SLOPE)), LEAKY_SLOPE))
        return x


class LTX2Vocoder(nn.Module):
    """Log-mel `[B, 2, T, 64]` (the audio VAE's output) -> waveform `[B, 2, 240 T]` in [-1, 1] at 24 kHz."""

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
            ResBlock(hidden >> (i + 1), k, d)
            for i in range(len(config.upsample_rates))
            for k, d in zip(config.resblock_kernel_sizes, config.resblock_dilations, strict=True)
        )
        final = hidden >> len(config.upsample_rates)
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
            x = up(F.leaky_relu(x, LEAKY_SLOPE))
            blocks = self.resblocks[i * per_stage : (i + 1) * per_stage]
            if self.gradient_checkpointing and torch.is_grad_enabled():
                outs = [checkpoint(block, x, use_reentrant=False) for block in blocks]
            else:
                outs = [block(x) for block in blocks]
            x = torch.stack(outs).mean(dim=0)
        x = self.conv_post(F.leaky_relu(x))  # default slope 0.01, as in the original
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


__all__ = ["LTX2Vocoder", "LTX2VocoderConfig"]
