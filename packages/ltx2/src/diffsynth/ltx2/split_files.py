"""LTX-2.5's split files: the authors publish `Lightricks/LTX-2.5` as one safetensors file per component, in
ComfyUI's folders, and read them with ltx-pipelines' `ModelPaths.from_split`. What each file holds, and where it
goes here:

| file | keys | our models |
|---|---|---|
| `diffusion_models/ltx-2.5-22b-{dev,distilled}-transformer-bf16` | `model.diffusion_model.*`: the DiT and the text connectors' blocks | `dit`, `connectors` (with the next file) |
| `text_encoders/gemma4-12b-with-proj-ltx-2.5-bf16` | Gemma 4 (ComfyUI's flat `model.layers.*`), `text_embedding_projection.*`, the tokenizer | `text_encoder`, `connectors` |
| `vae/ltx-2.5-video-vae-conv-bf16` | bare `encoder.*`, `decoder.*`, `per_channel_statistics.*` | `vae` |
| `vae/ltx-2.5-video-vae-bf16` | the same encoder, a diffusion decoder's `decoder.*` | `vae` (encoder only), `diffusion_decoder` |
| `vae/ltx-2.5-audio-vae-bf16` | `audio_vae.*`, `vocoder.*` (as in the 2.x single files) | `audio_vae`, `vocoder` |
| `latent_upscale_models/ltx-2.5-latent-{spatial,temporal}-upscaler-x2-bf16-1.0` | bare upsampler keys | `upsampler` |
| `model_patches/ltx-2.5-duration-head-bf16` | `duration_head.*` | `duration_head` |
| `loras/ltx-2.5-22b-distilled-lora-450-bf16` | ComfyUI LoRA (`diffusion_model.*.lora_A/B`) | `pipe.load_lora` |

Two things the keys alone do not give, both as ltx-core reads them:

- The text connectors are split over two files: ltx-core builds its `EmbeddingsProcessor` from the transformer
  file (connector blocks) and the text encoder file (the projections), so the two load together, as one source
  (`load_split([transformer, text_encoder])`, or one `ModelConfig` listing both files).
- The configs are in the safetensors metadata: `config` (JSON: `transformer`, `vae`, `audio_vae`, `vocoder`,
  `duration_head` sections, or an upsampler's fields) and, in the text encoder file, `gemma_config` (the whole
  `gemma4_unified` config.json). The tokenizer is the uint8 tensor `tokenizer_json` with the processor's sidecar
  files as `hf_asset__<name>` tensors (older packs: small JSON files as metadata strings). `configs_from_metadata`
  turns that metadata into the config.json-style dicts our specs read (diffusers' names); the runtime's loader
  reads only a `config.json` beside a file, so `load_split` passes them as `config=`.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence

import torch

from diffsynth.runtime.checkpoint import LazyStateDict, open_checkpoint
from diffsynth.runtime.errors import CheckpointError, ConfigError, UnknownModelError, preview
from diffsynth.runtime.registry import KeyLayout

logger = logging.getLogger(__name__)

REPO = "Lightricks/LTX-2.5"
FILES = {  # what the authors' README lists, by what it is
    "transformer_dev": "diffusion_models/ltx-2.5-22b-dev-transformer-bf16.safetensors",
    "transformer_distilled": "diffusion_models/ltx-2.5-22b-distilled-transformer-bf16.safetensors",
    "text_encoder": "text_encoders/gemma4-12b-with-proj-ltx-2.5-bf16.safetensors",
    "video_vae": "vae/ltx-2.5-video-vae-bf16.safetensors",
    "video_vae_conv": "vae/ltx-2.5-video-vae-conv-bf16.safetensors",
    "audio_vae": "vae/ltx-2.5-audio-vae-bf16.safetensors",
    "spatial_upsampler": "latent_upscale_models/ltx-2.5-latent-spatial-upscaler-x2-bf16-1.0.safetensors",
    "temporal_upsampler": "latent_upscale_models/ltx-2.5-latent-temporal-upscaler-x2-bf16-1.0.safetensors",
    "distilled_lora": "loras/ltx-2.5-22b-distilled-lora-450-bf16.safetensors",
    "duration_head": "model_patches/ltx-2.5-duration-head-bf16.safetensors",
}

CONFIG_KEY = "config"  # metadata: the ltx-core config JSON
GEMMA_CONFIG_KEY = "gemma_config"  # metadata of the text encoder file: Gemma's config.json
TOKENIZER_TENSOR = "tokenizer_json"
ASSET_PREFIX = "hf_asset__"
_METADATA_ASSETS = ("tokenizer_config.json", "processor_config.json", "chat_template.jinja", "generation_config.json")
DIT_PREFIX = "model.diffusion_model."
PROJECTION_PREFIX = "text_embedding_projection."
_CONNECTORS = tuple(f"{DIT_PREFIX}{side}_embeddings_connector." for side in ("video", "audio"))
_CONV_VAE_CLASS = "CausalVideoAutoencoder"  # ltx-core's `vae._class_name` of a convolutional decoder

# The roles of the models `load_split` builds from a file of each kind (the connectors from the transformer and
# text encoder files together); the LoRA loads elsewhere (see the table above).
KIND_ROLES = {
    "transformer": ("dit", "connectors"),
    "text_encoder": ("text_encoder", "connectors"),
    "video_vae": ("vae",),
    "video_vae_diffusion": ("vae", "diffusion_decoder"),
    "audio_vae": ("audio_vae", "vocoder"),
    "upsampler": ("upsampler",),
    "duration_head": ("duration_head",),
    "lora": (),
}


# ----------------------------------------------------------------------------------- metadata
def file_metadata(path: str | os.PathLike) -> dict[str, str]:
    """A safetensors file's `__metadata__` strings (header only)."""
    return open_checkpoint(path).metadata


def _json(metadata: Mapping[str, str], key: str, label: str) -> dict | None:
    raw = metadata.get(key)
    if raw is None:
        return None
    try:
        value = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError as exc:
        raise ConfigError(f"{label}: metadata {key!r} is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{label}: metadata {key!r} is a {type(value).__name__}, not a JSON object")
    return value


def split_kind(keys: Iterable[str], metadata: Mapping[str, str], label: str = "checkpoint") -> str | None:
    """Which split file this is (a key of `KIND_ROLES`), from its keys and metadata; None for anything else (a
    2.x single file, a diffusers folder...)."""
    keys = set(keys)
    config = _json(metadata, CONFIG_KEY, label) or {}
    if GEMMA_CONFIG_KEY in metadata or TOKENIZER_TENSOR in keys:
        return "text_encoder"
    prefixes = {k.split(".", 1)[0] + "." for k in keys}
    if prefixes & {"vae.", "audio_vae."}:  # audio_vae.* with vocoder.* alone; with vae.* / model.*: a 2.x file
        return None if prefixes & {"vae.", "model."} else "audio_vae"
    if any(k.startswith(DIT_PREFIX) for k in keys):
        return "transformer"
    if any(k.startswith("duration_head.") for k in keys):
        return "duration_head"
    if "initial_conv.weight" in keys:
        return "upsampler"
    if any(k.endswith((".lora_A.weight", ".lora_down.weight")) for k in keys):
        return "lora"
    if {"encoder.", "decoder.", "per_channel_statistics."} <= prefixes:  # (diffusers' vae/ has latents_mean)
        vae = config.get("vae") if isinstance(config.get("vae"), dict) else {}
        conv = "decoder.conv_in.conv.weight" in keys
        if vae.get("_class_name", _CONV_VAE_CLASS) != _CONV_VAE_CLASS or not conv:
            return "video_vae_diffusion"
        return "video_vae"
    return None


def file_kinds(paths: Sequence[str | os.PathLike]) -> dict[str, str | None]:
    """`split_kind` of each safetensors file among `paths` (None for folders and other files)."""
    kinds = {}
    for path in paths:
        path = str(path)
        if not path.endswith(".safetensors") or os.path.isdir(path):
            kinds[path] = None
            continue
        state = open_checkpoint(path)
        kinds[path] = split_kind(list(state), state.metadata, path)
    return kinds


def configs_from_metadata(metadata: Mapping[str, str], label: str = "checkpoint") -> dict[str, dict]:
    """The config.json-style dict (the names our specs read) of every role the metadata describes: `dit` and
    `connectors` from `config.transformer` (the connectors' input width from `gemma_config`), `text_encoder` from
    `gemma_config`, `vae` from a convolutional `config.vae`, `upsampler` from an upsampler's flat config,
    `duration_head` from `config.duration_head`. Fields the metadata leaves out are left to the shapes."""
    config = _json(metadata, CONFIG_KEY, label) or {}
    gemma = _json(metadata, GEMMA_CONFIG_KEY, label)
    out: dict[str, dict] = {}
    if gemma is not None:
        out["text_encoder"] = gemma
    transformer = config.get("transformer")
    if isinstance(transformer, dict):
        out["dit"] = dit_fields(transformer)
        out["connectors"] = connector_fields(transformer, gemma)
    elif gemma is not None:
        out["connectors"] = connector_fields({}, gemma)
    if isinstance(config.get("vae"), dict) and config["vae"].get("_class_name", _CONV_VAE_CLASS) == _CONV_VAE_CLASS:
        out["vae"] = vae_fields(config["vae"])
    if isinstance(config.get("duration_head"), dict):
        out["duration_head"] = {"config": config}
    if "mid_channels" in config:  # an upsampler's own fields, ltx-core's names (which its spec reads)
        names = ("in_channels", "mid_channels", "num_blocks_per_stage", "dims", "spatial_upsample")
        names += ("temporal_upsample", "spatial_scale", "rational_resampler")
        out["upsampler"] = {k: config[k] for k in names if config.get(k) is not None}
    return out


# ltx-core `config.transformer` name -> diffusers' config.json name (which `dit_formats` reads)
_DIT_SAME = (
    "in_channels",
    "out_channels",
    "num_attention_heads",
    "attention_head_dim",
    "audio_in_channels",
    "audio_out_channels",
    "audio_num_attention_heads",
    "audio_attention_head_dim",
    "num_layers",
    "cross_attention_dim",
    "audio_cross_attention_dim",
    "norm_eps",
    "rope_type",
    "timestep_scale_multiplier",
    "use_prompt_adaln_single",
    "ff_bias",
    "audio_ff_bias",
    "use_keyframes_abs_pos_embedding",
)
_DIT_RENAMED = {
    "positional_embedding_theta": "rope_theta",
    "av_ca_timestep_scale_multiplier": "cross_attn_timestep_scale_multiplier",
}
_DIT_BOTH_STREAMS = {  # one ltx-core switch -> diffusers' per-stream pair
    "apply_gated_attention": ("gated_attn", "audio_gated_attn"),
    "cross_attention_adaln": ("cross_attn_mod", "audio_cross_attn_mod"),
}


def _precision(transformer: Mapping, out: dict, name: str) -> None:
    if "frequencies_precision" in transformer:
        out[name] = transformer["frequencies_precision"] == "float64"


def dit_fields(transformer: Mapping) -> dict:
    """diffusers `LTX2VideoTransformer3DModel` config.json fields of ltx-core's `config.transformer`."""
    out = {k: transformer[k] for k in _DIT_SAME if transformer.get(k) is not None}
    out.update({new: transformer[old] for old, new in _DIT_RENAMED.items() if transformer.get(old) is not None})
    for old, pair in _DIT_BOTH_STREAMS.items():
        if transformer.get(old) is not None:
            out.update(dict.fromkeys(pair, bool(transformer[old])))
    _precision(transformer, out, "rope_double_precision")
    grid = transformer.get("positional_embedding_max_pos")
    if grid is not None:
        out.update(zip(("pos_embed_max_pos", "base_height", "base_width"), grid, strict=True))
    audio_grid = transformer.get("audio_positional_embedding_max_pos")
    if audio_grid is not None:
        out["audio_pos_embed_max_pos"] = audio_grid[0]
    return out


def connector_fields(transformer: Mapping, gemma: Mapping | None) -> dict:
    """diffusers `LTX2TextConnectors` config.json fields: heads, layers, RoPE and gates from ltx-core's
    `config.transformer` (`connector_*`, the audio stream falling back to the video one, as ltx-core does), and
    the projections' input split from Gemma's config (hidden size x (layers + 1) hidden states)."""
    out: dict = {}
    for part in ("num_attention_heads", "attention_head_dim", "num_layers"):
        video = transformer.get(f"connector_{part}")
        audio = transformer.get(f"audio_connector_{part}", video)
        if video is not None:
            out[f"video_connector_{part}"] = video
        if audio is not None:
            out[f"audio_connector_{part}"] = audio
    grid = transformer.get("connector_positional_embedding_max_pos")
    if grid is not None:
        out["connector_rope_base_seq_len"] = grid[0]
    if transformer.get("rope_type") is not None:
        out["rope_type"] = transformer["rope_type"]
    _precision(transformer, out, "rope_double_precision")
    if transformer.get("connector_apply_gated_attention") is not None:
        out["video_gated_attn"] = out["audio_gated_attn"] = bool(transformer["connector_apply_gated_attention"])
    text = gemma.get("text_config", gemma) if gemma is not None else None
    if isinstance(text, Mapping) and text.get("hidden_size") and text.get("num_hidden_layers"):
        out["caption_channels"] = text["hidden_size"]
        out["text_proj_in_factor"] = text["num_hidden_layers"] + 1
    return out


def vae_fields(vae: Mapping) -> dict:
    """diffusers `AutoencoderKLLTX2Video` config.json fields of ltx-core's convolutional `config.vae`, with
    ltx-core's defaults where it leaves a field out (they are what the authors' loader builds)."""
    out = {
        "_class_name": "AutoencoderKLLTX2Video",
        "decoder_causal": bool(vae.get("causal_decoder", False)),
        "decoder_spatial_padding_mode": vae.get("spatial_padding_mode", "reflect"),
        "encoder_spatial_padding_mode": vae.get("encoder_spatial_padding_mode", "zeros"),
        "timestep_conditioning": bool(vae.get("timestep_conditioning", True)),
    }
    for name in ("latent_channels", "patch_size"):
        if vae.get(name) is not None:
            out[name] = vae[name]
    blocks = vae.get("decoder_blocks")
    if blocks:  # ltx-core lists them from the pixel side, as diffusers does its residual flags
        out["upsample_residual"] = [
            name == "compress_all" and bool((params if isinstance(params, dict) else {}).get("residual", False))
            for name, params in blocks
            if name in ("compress_time", "compress_space", "compress_all")
        ]
    return out


# ----------------------------------------------------------------------------------- Gemma version
GEMMA_SOURCE_KEY = "gemma_source_checkpoint"  # metadata of a transformer file: the Gemma it was trained with
MODEL_VERSION_KEY = "model_version"
_GEMMA_SOURCE_REQUIRED_SINCE = (2, 4, 0)  # ltx-core: from here a checkpoint must name its Gemma
_GEMMA3_TYPES = ("gemma3", "gemma3_text")


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", str(version))[:3])


def check_gemma_version(transformer_metadata: Mapping[str, str], gemma_config: Mapping, transformer: str, encoder: str):
    """ltx-core's rule (`_check_gemma_version`), so a text encoder the DiT was not trained on is refused at load
    rather than giving wrong contexts: a transformer whose metadata names `gemma_source_checkpoint.gemma_version`
    needs a text encoder whose config has that `gemma_version`; one from 2.4 on that names none needs a text
    encoder without a version (a warning); older ones need Gemma 3. `transformer` / `encoder` name the sources."""
    source = _json(transformer_metadata, GEMMA_SOURCE_KEY, transformer)
    actual = gemma_config.get("gemma_version")
    if source is not None:
        expected = source.get("gemma_version")
        if expected != actual:
            raise ConfigError(
                f"Gemma version mismatch: {transformer} was trained with gemma_version={expected!r} "
                f"({GEMMA_SOURCE_KEY}), but the text encoder {encoder} has gemma_version={actual!r}; load the text "
                f"encoder file released with it ({FILES['text_encoder']} for LTX-2.5)"
            )
        return
    version = transformer_metadata.get(MODEL_VERSION_KEY)
    if version is not None and _version_tuple(version) >= _GEMMA_SOURCE_REQUIRED_SINCE:
        if actual is None:
            logger.warning("%s (model_version=%r) names no Gemma version, nor does %s: not checked", transformer,
                           version, encoder)  # fmt: skip
            return
        raise ConfigError(
            f"{transformer}: model_version={version!r} must name {GEMMA_SOURCE_KEY}.gemma_version to be checked "
            f"against the text encoder {encoder} (gemma_version={actual!r}), and does not"
        )
    kind = gemma_config.get("model_type")
    if kind not in _GEMMA3_TYPES:
        raise ConfigError(
            f"{transformer} names no {GEMMA_SOURCE_KEY} (model_version={version!r}): it takes a Gemma 3 text "
            f"encoder, but {encoder} is model_type={kind!r}"
        )


def has_ltx_core_metadata(metadata: Mapping[str, str]) -> bool:
    """Whether a file carries ltx-core's metadata (the authors' files do; diffusers' and tiny test files not)."""
    return any(key in metadata for key in (CONFIG_KEY, GEMMA_SOURCE_KEY, MODEL_VERSION_KEY))


# ----------------------------------------------------------------------------------- tokenizer
def gemma_assets(path: str | os.PathLike) -> tuple[dict, bytes, dict[str, bytes]]:
    """(Gemma's config.json, tokenizer.json bytes, sidecar files by name) packed in LTX-2.5's text encoder file."""
    state = open_checkpoint(path)
    label = str(path)
    config = _json(state.metadata, GEMMA_CONFIG_KEY, label)
    if config is None:
        raise ConfigError(f"{label}: no {GEMMA_CONFIG_KEY!r} metadata; not LTX-2.5's text encoder file")
    if TOKENIZER_TENSOR not in state:
        raise ConfigError(f"{label}: no {TOKENIZER_TENSOR!r} tensor; LTX-2.5's text encoder file packs its tokenizer")
    tokenizer = _bytes(state[TOKENIZER_TENSOR])
    sidecars = {k[len(ASSET_PREFIX) :]: _bytes(state[k]) for k in state if k.startswith(ASSET_PREFIX)}
    for name in _METADATA_ASSETS:
        if name not in sidecars and name in state.metadata:
            sidecars[name] = state.metadata[name].encode()
    return config, tokenizer, sidecars


def _bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().cpu().to(torch.uint8).numpy().tobytes()


# tokenizer_config.json entries that are not constructor arguments of a fast tokenizer
_TOKENIZER_SKIP = frozenset(
    {"tokenizer_class", "auto_map", "model_max_length", "backend", "processor_class", "added_tokens_decoder"}
)


def gemma_tokenizer(path: str | os.PathLike, model_max_length: int = 1024):
    """The fast tokenizer packed in LTX-2.5's text encoder file (`tokenizer_json` with its
    `tokenizer_config.json` and chat template), built in memory."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    _, tokenizer_json, sidecars = gemma_assets(path)
    if "tokenizer_config.json" not in sidecars:
        raise ConfigError(f"{path}: no tokenizer_config.json packed beside {TOKENIZER_TENSOR!r}")
    settings = json.loads(sidecars["tokenizer_config.json"])
    kwargs = {k: v for k, v in settings.items() if k not in _TOKENIZER_SKIP}
    if "chat_template.jinja" in sidecars:
        kwargs.setdefault("chat_template", sidecars["chat_template.jinja"].decode())
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_buffer(tokenizer_json), model_max_length=model_max_length, **kwargs
    )


# ----------------------------------------------------------------------------------- connector layouts
def _connectors_apart(where: str, other: str):
    def convert(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise ConfigError(
            f"LTX-2.5 text connectors: the {where} holds only part of them ({preview(sorted(state), 3)}); the "
            f"rest is in the {other}. Load both files together (one ModelConfig listing both, or "
            "split_files.load_split([transformer, text_encoder])), or load only the other roles"
        )

    return convert


_TRANSFORMER_FILE = f"transformer file ({FILES['transformer_dev'].split('/')[0]}/)"
_TEXT_ENCODER_FILE = f"text encoder file ({FILES['text_encoder']})"
# Added to the connectors spec by formats.py, after its own layouts (which match when both files are loaded
# together): each file alone is recognised whole, so its other models load with `roles=`, and building the
# connectors from it says where the rest is.
SPLIT_CONNECTOR_LAYOUTS = (
    KeyLayout(
        "ltx2.5_split_transformer_only",
        tuple(
            f"{p}{k}" for p in _CONNECTORS for k in ("learnable_registers", "transformer_1d_blocks.0.attn1.to_q.weight")
        ),
        convert=_connectors_apart(_TRANSFORMER_FILE, _TEXT_ENCODER_FILE),
        owns_prefixes=_CONNECTORS,
    ),
    KeyLayout(
        "ltx2.5_split_text_encoder_only",
        tuple(f"{PROJECTION_PREFIX}{side}_aggregate_embed.weight" for side in ("video", "audio")),
        convert=_connectors_apart(_TEXT_ENCODER_FILE, _TRANSFORMER_FILE),
        owns_prefixes=(PROJECTION_PREFIX,),
    ),
)


# ----------------------------------------------------------------------------------- loading
def load_split(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    torch_dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = "cpu",
    *,
    roles: Iterable[str] | None = None,
):
    """The models in LTX-2.5 split files (one file, or several loaded as one source: the transformer and text
    encoder files together give the text connectors), as the runtime's `LoadedModel`s, strictly, with the
    configs their metadata gives. `roles` builds only those models. A key no model takes, or a model key the
    files lack, is a `ConfigError` naming the file(s) and the key."""
    from diffsynth.runtime.loading import load_models, recognise

    from .formats import FAMILY

    state = open_checkpoint(paths)
    label = _label(state)
    kinds = {f: split_kind(_keys_of(state, f), open_checkpoint(f).metadata, f) for f in state.files}
    plain = [f for f, kind in kinds.items() if kind is None]
    if plain:
        raise ConfigError(
            f"{preview(plain)} is not an LTX-2.5 split file (known: {', '.join(FILES.values())}); load 2.x single "
            "files and diffusers folders with the runtime's load_models"
        )
    for path, kind in kinds.items():
        if kind == "lora":
            raise ConfigError(f"{path} is a LoRA: apply it with the pipeline's load_lora")
        if kind == "video_vae_diffusion":
            if len(kinds) > 1:
                raise ConfigError(f"{path} is the diffusion-decoder video VAE: load it on its own")
            wanted = _check_roles(roles)
            return _load_diffusion_vae(path, torch_dtype, device, KIND_ROLES[kind] if wanted is None else wanted)
    wanted = _check_roles(roles)
    _check_gemma_configs(kinds)
    _check_connectors(kinds, wanted)
    _check_pair_versions(kinds)
    configs = configs_from_metadata(state.metadata, label)
    try:
        found = [rec.spec.role for rec in recognise(state.meta_state_dict(), FAMILY.specs, label)]
        found = [role for role in found if wanted is None or role in wanted]
        given = {role: configs[role] for role in found if role in configs}
        config = given.get(found[0]) if len(found) == 1 else given or None  # one model: its config itself
        return load_models(state, torch_dtype, device, specs=FAMILY.specs, config=config, roles=wanted)
    except (CheckpointError, UnknownModelError) as exc:
        raise ConfigError(f"LTX-2.5 split file(s) {', '.join(state.files)}: {exc}") from exc


def _load_diffusion_vae(path, torch_dtype, device, roles) -> list:
    """The models of `ltx-2.5-video-vae-bf16` as `LoadedModel`s: as `vae`, its encoder (`LTX2VideoEncoderVAE`; the
    convolutional VAE's encoder, byte for byte) and, as `diffusion_decoder`, its `decoder.*` with the shared latent
    statistics, loaded strictly with the metadata's config."""
    from diffsynth.runtime.dtypes import parse_dtype
    from diffsynth.runtime.loading import LoadedModel

    from . import diffusion_decoder_formats as formats
    from .video_vae import LTX2VideoEncoderVAE

    loaded = []
    if "vae" in roles:
        parts, config = load_video_encoder(path, torch_dtype, device)
        with torch.device("meta"):
            vae = LTX2VideoEncoderVAE(config)
        vae.encoder, vae.per_channel_statistics = parts["encoder"], parts["per_channel_statistics"]
        loaded.append(LoadedModel("ltx2_video_vae", "vae", vae.eval(), config, "original (encoder only)", [str(path)]))
    if "diffusion_decoder" in roles:
        state = open_checkpoint(path)
        config_json = _json(state.metadata, CONFIG_KEY, str(path))
        try:
            module = formats.build_from_state({k: state[k] for k in state if not k.startswith("encoder.")}, config_json)
        except (CheckpointError, UnknownModelError) as exc:
            raise ConfigError(f"{path}: {exc}") from exc
        if torch_dtype is not None:
            module = module.to(parse_dtype(torch_dtype))
        name, layout = formats.LTX2_DIFFUSION_DECODER_SPEC.name, "original (no prefix)"
        loaded.append(
            LoadedModel(name, "diffusion_decoder", module.to(device).eval(), module.config, layout, [str(path)])
        )
    return loaded


def _check_roles(roles: Iterable[str] | None) -> set[str] | None:
    """`roles` as a set, refusing a name no split file gives (a typo would otherwise load nothing)."""
    if roles is None:
        return None
    wanted = {roles} if isinstance(roles, str) else set(roles)
    known = {role for kind_roles in KIND_ROLES.values() for role in kind_roles}
    unknown = sorted(wanted - known, key=str)
    if unknown:
        raise ConfigError(f"roles={sorted(wanted, key=str)}: {unknown} is not a role of LTX-2.5's split files; "
                          f"use {sorted(known)}")  # fmt: skip
    return wanted


def _check_gemma_configs(kinds: dict[str, str | None]) -> None:
    """A text encoder file must carry Gemma's config (the encoder and the connectors' input width come from it)."""
    for path, kind in kinds.items():
        if kind == "text_encoder" and _json(open_checkpoint(path).metadata, GEMMA_CONFIG_KEY, path) is None:
            raise ConfigError(
                f"{path}: no {GEMMA_CONFIG_KEY!r} metadata (Gemma's config.json); LTX-2.5's text encoder file "
                f"({FILES['text_encoder']}) carries it"
            )


def _check_pair_versions(kinds: dict[str, str | None]) -> None:
    """The transformer and text encoder files given together: the text encoder's Gemma version checked."""
    transformers = [f for f, kind in kinds.items() if kind == "transformer"]
    encoders = [f for f, kind in kinds.items() if kind == "text_encoder"]
    for transformer in transformers:
        for encoder in encoders:
            gemma = _json(open_checkpoint(encoder).metadata, GEMMA_CONFIG_KEY, encoder) or {}
            check_gemma_version(open_checkpoint(transformer).metadata, gemma, transformer, encoder)


def _keys_of(state: LazyStateDict, path: str) -> list[str]:
    return [k for k in state if state.file_of(k) == path]


def _label(state: LazyStateDict) -> str:
    return ", ".join(state.files)


def _check_connectors(kinds: dict[str, str | None], wanted: set[str] | None) -> None:
    """The connectors need the transformer and the text encoder files together: name the one given alone."""
    if wanted is not None and "connectors" not in wanted:
        return
    present = set(kinds.values())
    for kind, other in (("transformer", "text_encoder"), ("text_encoder", "transformer")):
        if kind in present and other not in present:
            path = next(f for f, k in kinds.items() if k == kind)
            raise ConfigError(
                f"{path}: LTX-2.5's text connectors are split between the transformer file and the text encoder "
                f"file ({FILES['text_encoder']}); pass both (the {other.replace('_', ' ')} file is missing), or "
                f"roles= without 'connectors'"
            )


# ----------------------------------------------------------------------------------- video encoder
def load_video_encoder(
    path: str | os.PathLike, torch_dtype: torch.dtype | str | None = None, device: str | torch.device | None = "cpu"
):
    """The video encoder and latent statistics of a split video VAE file (`encoder.*`, `per_channel_statistics.*`;
    the diffusion decoder's `decoder.*` of `ltx-2.5-video-vae-bf16` are left to its own model) as a
    `ModuleDict` named like the file, loaded strictly, and the `LTX2VideoVAEConfig` whose encoder it is (its
    decoder fields are the defaults and mean nothing). Shapes give the encoder; the metadata's
    `config.vae.encoder` its padding mode."""
    from torch import nn

    from diffsynth.runtime.dtypes import parse_dtype

    from .latent_statistics import PerChannelStatistics
    from .video_vae import Encoder, LTX2VideoVAEConfig
    from .video_vae_formats import UNUSED_STATISTICS, _stages

    state = open_checkpoint(path)
    label = str(path)
    ours = {k: state[k] for k in state if k.startswith(("encoder.", "per_channel_statistics."))}
    ours = {k: v for k, v in ours.items() if k not in UNUSED_STATISTICS}
    if "encoder.conv_in.conv.weight" not in ours or "encoder.conv_out.conv.weight" not in ours:
        raise ConfigError(f"{label}: no video encoder (encoder.conv_in / encoder.conv_out) in this file")
    packed = ours["encoder.conv_in.conv.weight"].shape[1]
    patch = int(round((packed / 3) ** 0.5))
    layers, kinds, _, multipliers = _stages(ours, "encoder", "down_blocks", up=False)
    vae = (_json(state.metadata, CONFIG_KEY, label) or {}).get("vae", {})
    encoder_json = vae.get("encoder", vae) if isinstance(vae, dict) else {}
    config = LTX2VideoVAEConfig(
        latent_channels=ours["encoder.conv_out.conv.weight"].shape[0] - 1,
        patch_size=patch,
        encoder_layers=tuple(layers),
        encoder_downsamples=tuple(kinds),
        encoder_width_multipliers=tuple(multipliers),
        encoder_padding_mode=encoder_json.get("spatial_padding_mode", vae.get("encoder_spatial_padding_mode", "zeros")),
    )
    with torch.device("meta"):
        module = nn.ModuleDict(
            {"encoder": Encoder(config), "per_channel_statistics": PerChannelStatistics(config.latent_channels)}
        )
    expected = module.state_dict()
    missing, extra = sorted(set(expected) - set(ours)), sorted(set(ours) - set(expected))
    if missing or extra:
        raise ConfigError(
            f"{label}: the video encoder does not fit: missing {preview(missing)}; unexpected {preview(extra)}"
        )
    dtype = parse_dtype(torch_dtype) if torch_dtype is not None else None
    real = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in ours.items()}
    module.load_state_dict(real, strict=True, assign=True)
    return module.to(device).eval(), config


__all__ = [
    "FILES",
    "KIND_ROLES",
    "check_gemma_version",
    "REPO",
    "SPLIT_CONNECTOR_LAYOUTS",
    "configs_from_metadata",
    "connector_fields",
    "dit_fields",
    "file_kinds",
    "file_metadata",
    "gemma_assets",
    "gemma_tokenizer",
    "has_ltx_core_metadata",
    "load_split",
    "load_video_encoder",
    "split_kind",
    "vae_fields",
]
