"""Audio features for Wan2.2-S2V: wav2vec2 (`wav2vec2-large-xlsr-53-english/` in the S2V repo) and the authors'
per-video-frame bucketing.

The encoder is transformers' `Wav2Vec2Model` plus the CTC `lm_head` the file carries (kept so the load is strict;
S2V never uses it), with the file's names (`wav2vec2.*`, `lm_head.*`). Older files store the positional
convolution's weight norm as `weight_g` / `weight_v`; torch's parametrized weight norm names them
`parametrizations.weight.original0/1`, so those two keys are renamed on load.

Features, as the authors' `AudioEncoder` makes them: the 16 kHz waveform normalised to zero mean and unit variance
(what the folder's `Wav2Vec2Processor` does), the hidden states of every layer (embeddings + 24 layers = 25) at
50 per second, linearly resampled (`align_corners=True`) to 30 per second, then one vector per video frame at
`fps`: frame i takes feature `round(i * 30 / fps)` (numpy's round-half-to-even), and frames past the audio's end
get zeros. The frames are cut into clips of `batch_frames`; there is always one clip more than whole clips fit
(`int(T / (batch_frames * 30 / fps)) + 1`), padded with zeros. A waveform too short for two hidden states (under 720
samples, 45 ms, for xlsr-53) is first padded with silence to that length, so the resampling has two to interpolate.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diffsynth.runtime.errors import ConfigError

WAV2VEC_RATE = 50  # hidden states per second (the feature extractor's 320x stride at 16 kHz)
FEATURE_RATE = 30  # the authors resample them to this rate before picking one per video frame
SAMPLE_RATE = 16000
# facebook/wav2vec2-large-xlsr-53 (the english fine-tune keeps it); used when no config.json is beside the file
XLSR_53 = dict(
    hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, vocab_size=33,
    conv_dim=(512,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2), conv_bias=True,
    num_feat_extract_layers=7, feat_extract_norm="layer", do_stable_layer_norm=True, num_conv_pos_embeddings=128,
    num_conv_pos_embedding_groups=16, layer_norm_eps=1e-5, hidden_act="gelu", feat_extract_activation="gelu",
    mask_time_prob=0.05,
)  # fmt: skip
_WEIGHT_NORM = {
    "wav2vec2.encoder.pos_conv_embed.conv.weight_g": "wav2vec2.encoder.pos_conv_embed.conv.parametrizations.weight.original0",
    "wav2vec2.encoder.pos_conv_embed.conv.weight_v": "wav2vec2.encoder.pos_conv_embed.conv.parametrizations.weight.original1",
}


class Wav2VecAudioEncoder(nn.Module):
    """wav2vec2 with the file's module names; `forward(waveform [B, N] at 16 kHz)` -> every layer's hidden states
    `[B, layers + 1, T, hidden]` (T = 50 per second)."""

    def __init__(self, config):
        super().__init__()
        from transformers import Wav2Vec2Model

        self.config = config
        self.wav2vec2 = Wav2Vec2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size)
        self.normalize = True  # the xlsr-53 processor's do_normalize

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        x = waveform.float()
        if self.normalize:  # transformers' zero_mean_unit_var_norm: population variance, eps 1e-7
            x = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, keepdim=True, unbiased=False) + 1e-7)
        dtype = next(self.parameters()).dtype
        out = self.wav2vec2(x.to(dtype), output_hidden_states=True)
        return torch.stack(out.hidden_states, dim=1)


def to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """File names -> our module's: only the weight-norm pair of the positional convolution differs."""
    return {_WEIGHT_NORM.get(k, k): v for k, v in state.items()}


def config_from_state(state, config_json: dict | None = None):
    """A `Wav2Vec2Config`: the folder's config.json when there is one (else xlsr-53's), checked against the shapes."""
    from transformers import Wav2Vec2Config

    from diffsynth.runtime.registry import check_config_facts

    fields = dict(XLSR_53)
    if config_json:
        fields.update({k: v for k, v in config_json.items() if not k.startswith("_")})
    facts = {}
    if state:
        layers = 0
        while f"wav2vec2.encoder.layers.{layers}.attention.q_proj.weight" in state:
            layers += 1
        facts = dict(
            hidden_size=int(state["wav2vec2.encoder.layers.0.attention.q_proj.weight"].shape[0]),
            num_hidden_layers=layers,
            intermediate_size=int(state["wav2vec2.encoder.layers.0.feed_forward.intermediate_dense.weight"].shape[0]),
            vocab_size=int(state["lm_head.weight"].shape[0]),
        )
        check_config_facts("wav2vec2 config.json", fields, facts)
    return Wav2Vec2Config(**{**fields, **facts})


# ----------------------------------------------------------------------------------------- features
def resample_features(features: torch.Tensor, rate_in: float = WAV2VEC_RATE, rate_out: float = FEATURE_RATE):
    """`[L, T, D]` at `rate_in` per second -> `[L, int(T / rate_in * rate_out), D]` (at least 1), linear with aligned
    corners."""
    length = max(int(features.shape[1] / float(rate_in) * rate_out), 1)
    out = F.interpolate(features.transpose(1, 2).float(), size=length, mode="linear", align_corners=True)
    return out.transpose(1, 2)


def frame_indices(num_frames: int, fps: float, rate: float = FEATURE_RATE) -> np.ndarray:
    """The feature index of each video frame: `round(i / fps * rate)` (half to even, as numpy rounds), with the
    times made as the authors make them (`linspace` over the clip's duration) so ties round the same way."""
    times = np.linspace(0, num_frames / fps, num_frames, endpoint=False)
    return np.round(times * rate).astype(np.int64)


def bucket_features(
    features: torch.Tensor, fps: float = 16, batch_frames: int = 80, rate: float = FEATURE_RATE
) -> list[torch.Tensor]:
    """`[L, T, D]` features at `rate` per second -> clips `[1, L, D, batch_frames]`, one feature vector per video
    frame (zeros past the audio's end); `int(T / (batch_frames * rate / fps)) + 1` clips (the authors' count)."""
    layers, length, dim = features.shape
    clips = int(length / (batch_frames * rate / fps)) + 1
    index = torch.from_numpy(frame_indices(clips * batch_frames, fps, rate)).to(features.device)
    inside = index < length
    picked = features[:, index.clamp(max=length - 1)] * inside[None, :, None].to(features.dtype)
    picked = picked.permute(0, 2, 1)[None]  # [1, L, D, clips * batch_frames]
    return list(picked.split(batch_frames, dim=-1))


def prepare_waveform(audio, sample_rate: int) -> torch.Tensor:
    """A path, or a waveform `[N]` / `[C, N]` (numpy or torch, any rate) -> mono float32 `[1, N]` at 16 kHz."""
    from diffsynth.runtime.media import load_audio, resample_audio

    if isinstance(audio, (str, bytes)) or hasattr(audio, "__fspath__"):
        audio, sample_rate = load_audio(audio)
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float)) or sample_rate <= 0:
        raise ConfigError(f"audio_sample_rate={sample_rate!r} must be a positive number of samples per second")
    wave = torch.as_tensor(np.asarray(audio) if not isinstance(audio, torch.Tensor) else audio).float().cpu()
    if wave.dim() == 1:
        wave = wave[None]
    if wave.dim() != 2 or wave.shape[-1] == 0 or not torch.isfinite(wave).all():
        raise ConfigError(
            f"input_audio must be a path or a finite waveform [N] or [C, N], got shape {tuple(wave.shape)}"
        )
    if wave.shape[0] > wave.shape[1]:  # [N, C] from soundfile-style readers
        wave = wave.T
    wave = wave.mean(0, keepdim=True)
    return resample_audio(wave, int(sample_rate), SAMPLE_RATE)


def min_waveform_length(config, states: int = 2) -> int:
    """The fewest 16 kHz samples from which the feature extractor's convolutions (each `(n - kernel) // stride + 1`
    long) make `states` hidden states: 720 for xlsr-53's two."""
    length = states
    for kernel, stride in reversed(list(zip(config.conv_kernel, config.conv_stride, strict=True))):
        length = (length - 1) * stride + kernel
    return length


def pad_waveform(waveform: torch.Tensor, length: int) -> torch.Tensor:
    """`[B, N]` with zeros (silence) appended up to `length` samples; a long enough waveform is returned as is."""
    return F.pad(waveform, (0, length - waveform.shape[-1])) if waveform.shape[-1] < length else waveform


@torch.no_grad()
def audio_clips(
    encoder: Wav2VecAudioEncoder, waveform: torch.Tensor, fps: float, batch_frames: int, device
) -> list[torch.Tensor]:
    """The S2V DiT's `audio_embeds` for each clip of `batch_frames` video frames: `[1, 25, 1024, batch_frames]`."""
    waveform = pad_waveform(waveform, min_waveform_length(encoder.config))
    hidden = encoder(waveform.to(device))[0]  # [L, T, D]
    return bucket_features(resample_features(hidden), fps, batch_frames)


__all__ = [
    "Wav2VecAudioEncoder",
    "audio_clips",
    "bucket_features",
    "config_from_state",
    "frame_indices",
    "min_waveform_length",
    "pad_waveform",
    "prepare_waveform",
    "resample_features",
    "to_ours",
]
