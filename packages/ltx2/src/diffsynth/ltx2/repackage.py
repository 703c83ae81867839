"""DiffSynth-Studio's repack of LTX-2 (`DiffSynth-Studio/LTX-2-Repackage`): `ltx-2-19b-dev.safetensors` cut into one
file a part, every key kept as the single file spells it (Studio's `split_model_statedicts.py` copies the keys under
these prefixes into each file; its loaders strip the prefixes as for the single file):

| file (`.safetensors`) | keys of the single file | our slot |
|---|---|---|
| `transformer`, `transformer_distilled` | `model.diffusion_model.*` but the connectors | `dit` |
| `text_encoder_post_modules` | `text_embedding_projection.*`, the connectors' `model.diffusion_model.*` | connectors |
| `video_vae_encoder` / `_decoder` | `vae.encoder.*` / `vae.decoder.*`, each + `vae.per_channel_statistics.*` | `vae` |
| `audio_vae_encoder` / `_decoder` | the same under `audio_vae.` | `audio_vae` |
| `audio_vocoder` | `vocoder.*` | `vocoder` |

A file is recognised by its keys alone: all under its prefixes, each prefix present. The whole parts load as the
single file's do. The two halves of a VAE load together as the single file's VAE (their statistics must agree); one
half alone is a VAE that refuses the other direction, naming the file it lacks (Studio's examples load the audio
VAE's decoder only: text-to-video needs no encoder).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from diffsynth.runtime.checkpoint import open_checkpoint, weight_files
from diffsynth.runtime.dtypes import parse_dtype
from diffsynth.runtime.errors import ConfigError, DiffSynthError, preview
from diffsynth.runtime.registry import StateDict, build_config

from . import audio_vae as audio
from . import video_vae as video
from .latent_statistics import MEAN_KEY, PerChannelStatistics

REPO = "DiffSynth-Studio/LTX-2-Repackage"
_DIT = "model.diffusion_model."
_CONNECTORS = tuple(f"{_DIT}{side}_embeddings_connector." for side in ("video", "audio"))

# file kind (Studio's file name without `.safetensors`) -> the single file's key prefixes it holds, each present
KIND_PREFIXES = {
    "transformer": (_DIT,),  # without the connectors
    "text_encoder_post_modules": ("text_embedding_projection.", *_CONNECTORS),
    "video_vae_encoder": ("vae.encoder.", "vae.per_channel_statistics."),
    "video_vae_decoder": ("vae.decoder.", "vae.per_channel_statistics."),
    "audio_vae_encoder": ("audio_vae.encoder.", "audio_vae.per_channel_statistics."),
    "audio_vae_decoder": ("audio_vae.decoder.", "audio_vae.per_channel_statistics."),
    "audio_vocoder": ("vocoder.",),
}
# VAE half kind -> (pipeline slot, the half it holds)
VAE_HALVES = {
    "video_vae_encoder": ("vae", "encoder"),
    "video_vae_decoder": ("vae", "decoder"),
    "audio_vae_encoder": ("audio_vae", "encoder"),
    "audio_vae_decoder": ("audio_vae", "decoder"),
}
_SLOT_PREFIX = {"vae": "vae.", "audio_vae": "audio_vae."}


def repack_kind(keys: Sequence[str]) -> str | None:
    """Which repack file holds exactly `keys` (a key of `KIND_PREFIXES`), or None."""
    keys = list(keys)
    if not keys:
        return None
    for kind, prefixes in KIND_PREFIXES.items():
        if kind == "transformer" and any(k.startswith(_CONNECTORS) for k in keys):
            continue
        if all(k.startswith(prefixes) for k in keys) and all(any(k.startswith(p) for k in keys) for p in prefixes):
            return kind
    return None


def repack_kinds(paths: Sequence[str | os.PathLike]) -> dict[str, str] | None:
    """Each weight file among `paths` (folders expanded) -> its repack kind, when every one is a repack file;
    else None (a single file, a diffusers folder, LTX-2.5's split files...). Only headers are read. Two
    transformers (`transformer` and `transformer_distilled`, as `*.safetensors` gives) are refused by name."""
    try:
        files = weight_files([str(p) for p in paths]) if paths else []
    except DiffSynthError:
        return None
    if not files or not all(f.endswith(".safetensors") for f in files):
        return None
    kinds = {}
    for path in files:
        kind = repack_kind(list(open_checkpoint(path)))
        if kind is None:
            return None
        kinds[path] = kind
    for kind in KIND_PREFIXES:
        same = [p for p, k in kinds.items() if k == kind]
        if len(same) > 1:
            raise ConfigError(
                f"{REPO}: {preview(same)} are all {kind} files; give one (e.g. origin_file_pattern="
                f"'{os.path.basename(same[0])}') so the pipeline knows which to use"
            )
    return kinds


# ----------------------------------------------------------------------------------- loading a VAE
def load_vae(halves: Mapping[str, str], torch_dtype: torch.dtype | str | None = None) -> nn.Module:
    """The video or audio VAE from its repack files (`{"encoder": path, "decoder": path}`, either or both), on
    cpu: both give the single file's VAE, one a VAE with that half alone."""
    states = {half: open_checkpoint(path) for half, path in halves.items()}
    return vae_from_halves(states, torch_dtype, " + ".join(str(p) for p in halves.values()))


def vae_from_halves(
    states: Mapping[str, Mapping[str, torch.Tensor]], torch_dtype=None, label: str = "the given halves"
) -> nn.Module:
    """`load_vae` on state dicts in the files' names (real tensors, or meta ones for a module on meta)."""
    if set(states) == {"encoder", "decoder"}:
        return _load_both(states["encoder"], states["decoder"], torch_dtype, label)
    ((half, state),) = states.items()
    return _load_half(state, half, torch_dtype, label)


def _slot_of(state: Mapping[str, torch.Tensor], label: str) -> str:
    kind = repack_kind(list(state))
    if kind not in VAE_HALVES:
        raise ConfigError(f"{label}: not a VAE file of {REPO} (known: {', '.join(VAE_HALVES)})")
    return VAE_HALVES[kind][0]


def _load_both(encoder: Mapping, decoder: Mapping, torch_dtype, label: str) -> nn.Module:
    """The two halves as one state dict in the single file's names, loaded by the VAE's own spec."""
    from diffsynth.runtime.loading import load_models

    from .audio_vae_formats import LTX2_AUDIO_VAE_SPEC
    from .video_vae_formats import LTX2_VIDEO_VAE_SPEC

    slot = _slot_of(encoder, label)
    if _slot_of(decoder, label) != slot:
        raise ConfigError(f"{label}: the encoder and decoder files are of different VAEs")
    shared = sorted(set(encoder) & set(decoder))
    differ = [k for k in shared if not encoder[k].is_meta and not torch.equal(encoder[k], decoder[k])]
    if differ:
        raise ConfigError(f"{label}: not the two halves of one VAE: {preview(differ)} differ")
    state = {**{k: encoder[k] for k in encoder}, **{k: decoder[k] for k in decoder}}
    spec = LTX2_VIDEO_VAE_SPEC if slot == "vae" else LTX2_AUDIO_VAE_SPEC
    try:
        (loaded,) = load_models(state, torch_dtype, "cpu", specs=(spec,))
    except DiffSynthError as exc:
        raise type(exc)(str(exc).replace("the given state dict", label)) from None
    return loaded.module


def _load_half(state: Mapping[str, torch.Tensor], half: str, torch_dtype, label: str) -> nn.Module:
    """One half, strictly: every key of the file is the half model's and the model lacks none."""
    from .video_vae_formats import UNUSED_STATISTICS

    slot = _slot_of(state, label)
    prefix = _SLOT_PREFIX[slot]
    unused = UNUSED_STATISTICS if slot == "vae" else ()
    names = {k[len(prefix) :]: k for k in state if k[len(prefix) :] not in unused}
    shapes = state.meta_state_dict() if hasattr(state, "meta_state_dict") else state
    meta = {ours: torch.empty(shapes[k].shape, device="meta") for ours, k in names.items()}
    config_of, model_class = _HALF_BUILDERS[(slot, half)]
    with torch.device("meta"):
        module = model_class(config_of(meta, label))
    expected = set(module.state_dict())
    missing, extra = sorted(expected - set(names)), sorted(set(names) - expected)
    if missing or extra:
        raise ConfigError(f"{label}: the {slot} {half} does not fit: missing {preview(missing)}; unexpected "
                          f"{preview(extra)}")  # fmt: skip
    dtype = parse_dtype(torch_dtype) if torch_dtype is not None else None
    real = {ours: state[k] for ours, k in names.items()}
    real = {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v for k, v in real.items()}
    module.load_state_dict(real, strict=True, assign=True)
    return module.eval()


# ----------------------------------------------------------------------------------- half VAEs
def _missing(what: str, file: str):
    raise ConfigError(
        f"no {what}: this VAE was loaded from {REPO} without it; add ModelConfig(model_id='{REPO}', "
        f"origin_file_pattern='{file}') to the pipeline's model_configs (or put {file} in the local folder)"
    )


class _OneHalf:
    """A VAE built with one of its halves (`built_half`: "encoder" or "decoder") and its latent statistics, what
    one repack file holds; each class refuses the other direction with `_missing`. (Not named `half`: that is
    `nn.Module.half()`.)"""

    built_half: str

    def _build_half(self, config, half_module: type[nn.Module], statistics_size: int) -> None:
        nn.Module.__init__(self)
        self.config = config
        setattr(self, self.built_half, half_module(config))
        self.per_channel_statistics = PerChannelStatistics(statistics_size)

    @property
    def gradient_checkpointing(self) -> bool:
        return getattr(self, self.built_half).gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        getattr(self, self.built_half).gradient_checkpointing = bool(value)


class LTX2VideoDecoderVAE(_OneHalf, video.LTX2VideoVAE):
    """The video VAE of `video_vae_decoder.safetensors` alone: decodes (text-to-video); encoding (image or video
    conditioning) is refused, naming `video_vae_encoder.safetensors`."""

    built_half = "decoder"
    offload_units = ("decoder.up_blocks",)
    compile_units = ("decoder.up_blocks",)

    def __init__(self, config: video.LTX2VideoVAEConfig | None = None):
        config = config if config is not None else video.LTX2VideoVAEConfig()
        self._build_half(config, video.Decoder, config.latent_channels)

    def encode(self, *args, **kwargs):
        _missing("video VAE encoder (image / video conditioning)", "video_vae_encoder.safetensors")


class LTX2VideoEncoderHalfVAE(_OneHalf, video.LTX2VideoVAE):
    """The video VAE of `video_vae_encoder.safetensors` alone: decoding is refused, naming the decoder file. Not
    LTX-2.5's encoder-only `LTX2VideoEncoderVAE` (the same keys), whose decoder is the diffusion decoder."""

    built_half = "encoder"
    offload_units = ("encoder.down_blocks",)
    compile_units = ("encoder.down_blocks",)

    def __init__(self, config: video.LTX2VideoVAEConfig | None = None):
        config = config if config is not None else video.LTX2VideoVAEConfig()
        self._build_half(config, video.Encoder, config.latent_channels)

    def decode(self, *args, **kwargs):
        _missing("video VAE decoder", "video_vae_decoder.safetensors")


class LTX2AudioDecoderVAE(_OneHalf, audio.LTX2AudioVAE):
    """The audio VAE of `audio_vae_decoder.safetensors` alone (what Studio's examples load): decodes; encoding
    (audio conditioning) is refused, naming `audio_vae_encoder.safetensors`."""

    built_half = "decoder"
    offload_units = ("decoder.up",)
    compile_units = ("decoder.up",)

    def __init__(self, config: audio.LTX2AudioVAEConfig | None = None):
        config = config if config is not None else audio.LTX2AudioVAEConfig()
        self._build_half(config, audio.Decoder, config.statistics_size)

    def encode(self, *args, **kwargs):
        _missing("audio VAE encoder (audio conditioning)", "audio_vae_encoder.safetensors")


class LTX2AudioEncoderVAE(_OneHalf, audio.LTX2AudioVAE):
    """The audio VAE of `audio_vae_encoder.safetensors` alone: decoding is refused, naming the decoder file."""

    built_half = "encoder"
    offload_units = ("encoder.down",)
    compile_units = ("encoder.down",)

    def __init__(self, config: audio.LTX2AudioVAEConfig | None = None):
        config = config if config is not None else audio.LTX2AudioVAEConfig()
        self._build_half(config, audio.Encoder, config.statistics_size)

    def decode(self, *args, **kwargs):
        _missing("audio VAE decoder", "audio_vae_decoder.safetensors")


# ----------------------------------------------------------------------------------- half configs
def _pixels(packed: int) -> dict:
    """in_channels and patch size of a conv packing `in_channels x patch^2` channels (3-channel video)."""
    patch = math.isqrt(packed // 3) if packed % 3 == 0 else 0
    return dict(in_channels=3, patch_size=patch) if packed == 3 * patch * patch else dict(in_channels=packed)


def _video_decoder_config(meta: StateDict, label: str) -> video.LTX2VideoVAEConfig:
    """The decoder's fields from its shapes (as for the single file); the encoder's mirror them (unbuilt)."""
    from .video_vae_formats import _released_decoder_defaults, _shape, _stages

    layers, kinds, widths, divisors = _stages(meta, "decoder", "up_blocks", up=True)
    fields = dict(
        **_pixels(_shape(meta, "decoder.conv_out.conv.weight")[0]),
        latent_channels=_shape(meta, "decoder.conv_in.conv.weight")[1],
        decoder_base_channels=widths[-1],
        decoder_layers=tuple(layers),
        decoder_upsamples=tuple(kinds),
        decoder_width_divisors=tuple(divisors),
        encoder_layers=(1,) * len(layers),
        encoder_downsamples=tuple(reversed(kinds)),
        encoder_width_multipliers=tuple(math.prod(video.STRIDES[k]) for k in reversed(kinds)),
    )
    fields = {**_released_decoder_defaults(fields["decoder_upsamples"], fields["decoder_width_divisors"]), **fields}
    return build_config(video.LTX2VideoVAEConfig, f"LTX-2 video VAE decoder ({label})", fields)


def _video_encoder_config(meta: StateDict, label: str) -> video.LTX2VideoVAEConfig:
    """The encoder's fields from its shapes (as for the single file); the decoder's mirror them (unbuilt)."""
    from .video_vae_formats import _shape, _stages

    layers, kinds, _, multipliers = _stages(meta, "encoder", "down_blocks", up=False)
    fields = dict(
        **_pixels(_shape(meta, "encoder.conv_in.conv.weight")[1]),
        latent_channels=_shape(meta, "encoder.conv_out.conv.weight")[0] - 1,
        encoder_layers=tuple(layers),
        encoder_downsamples=tuple(kinds),
        encoder_width_multipliers=tuple(multipliers),
        decoder_layers=(1,) * len(layers),
        decoder_upsamples=tuple(reversed(kinds)),
        decoder_upsample_residual=(False,) * len(kinds),
        decoder_width_divisors=(1,) * len(kinds),
    )
    return build_config(video.LTX2VideoVAEConfig, f"LTX-2 video VAE encoder ({label})", fields)


def _audio_fields(meta: StateDict, latent: int, levels: int) -> dict:
    from .audio_vae_formats import STATS, _shape

    (size,) = _shape(meta, STATS + MEAN_KEY)
    return dict(latent_channels=latent, mel_bins=size // latent * 2 ** (levels - 1))


def _audio_widths(meta: StateDict, side: str, stages: str) -> tuple[int, tuple[int, ...], int]:
    """(base width, width multipliers, residual blocks per stage) of the encoder's `down` or decoder's `up`."""
    from .audio_vae_formats import _count, _shape

    levels = _count(meta, rf"{side}\.{stages}\.(\d+)\.")
    widths = [_shape(meta, f"{side}.{stages}.{i}.block.0.conv1.conv.weight")[0] for i in range(levels)]
    blocks = _count(meta, rf"{side}\.{stages}\.0\.block\.(\d+)\.")
    base = math.gcd(*widths) if side == "decoder" else _shape(meta, "encoder.conv_in.conv.weight")[0]
    return base, tuple(w // base for w in widths), blocks


def _audio_decoder_config(meta: StateDict, label: str) -> audio.LTX2AudioVAEConfig:
    from .audio_vae_formats import _shape

    base, ch_mult, blocks = _audio_widths(meta, "decoder", "up")
    out = _shape(meta, "decoder.conv_out.conv.weight")[0]
    fields = dict(in_channels=out, out_channels=out, base_channels=base, ch_mult=ch_mult, num_res_blocks=blocks - 1)
    fields.update(_audio_fields(meta, _shape(meta, "decoder.conv_in.conv.weight")[1], len(ch_mult)))
    return build_config(audio.LTX2AudioVAEConfig, f"LTX-2 audio VAE decoder ({label})", fields)


def _audio_encoder_config(meta: StateDict, label: str) -> audio.LTX2AudioVAEConfig:
    from .audio_vae_formats import _shape

    base, ch_mult, blocks = _audio_widths(meta, "encoder", "down")
    channels = _shape(meta, "encoder.conv_in.conv.weight")[1]
    fields = dict(in_channels=channels, out_channels=channels, base_channels=base, ch_mult=ch_mult)
    fields.update(num_res_blocks=blocks, **_audio_fields(meta, _shape(meta, "encoder.conv_out.conv.weight")[0] // 2,
                                                          len(ch_mult)))  # fmt: skip
    return build_config(audio.LTX2AudioVAEConfig, f"LTX-2 audio VAE encoder ({label})", fields)


_HALF_BUILDERS = {  # (slot, half) -> (config from our-named meta shapes, model class)
    ("vae", "decoder"): (_video_decoder_config, LTX2VideoDecoderVAE),
    ("vae", "encoder"): (_video_encoder_config, LTX2VideoEncoderHalfVAE),
    ("audio_vae", "decoder"): (_audio_decoder_config, LTX2AudioDecoderVAE),
    ("audio_vae", "encoder"): (_audio_encoder_config, LTX2AudioEncoderVAE),
}

__all__ = [
    "KIND_PREFIXES",
    "REPO",
    "VAE_HALVES",
    "LTX2AudioDecoderVAE",
    "LTX2AudioEncoderVAE",
    "LTX2VideoDecoderVAE",
    "LTX2VideoEncoderHalfVAE",
    "load_vae",
    "vae_from_halves",
    "repack_kind",
    "repack_kinds",
]
