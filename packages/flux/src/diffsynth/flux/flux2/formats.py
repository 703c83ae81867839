"""How FLUX.2 DiT checkpoints are recognised, converted and configured.

Our module names are BFL's originals (`flux2-dev.safetensors`, `flux-2-klein-4b.safetensors`, klein-9B
and the klein base models), so that layout loads as is. Also accepted:

- the same keys under `model.diffusion_model.` (ComfyUI single files);
- the diffusers `transformer/` folder: renamed through tables, plus two tensor rules: the double
  blocks' `to_q/to_k/to_v` (and `add_{q,k,v}_proj`) stack into `qkv`, and `norm_out.linear` stores
  (scale, shift) where BFL's `final_layer.adaLN_modulation.1` stores (shift, scale), so its halves are
  swapped. The single blocks' `to_qkv_mlp_proj` is already fused like BFL's `linear1`.

FLUX.1 files are told apart by their keys: FLUX.1 has `vector_in` and per-block `img_mod` / `modulation`,
FLUX.2 the shared `*_stream_modulation*` layers (and `time_guidance_embed` / `to_qkv_mlp_proj` in
diffusers names). `ours_to_diffusers` is the exact inverse of `diffusers_to_ours`.

KV checkpoints (FLUX.2-klein-9B-KV) have klein-9B's keys and shapes, and diffusers' transformer config has no
field for them: nothing in the files tells them apart. `released_as_kv` recognises their release instead (the hub repo, or the diffusers
folder's `model_index.json` naming `Flux2KleinKVPipeline`); a config dict may also state our own
`causal_references` field (e.g. `load_model(file, config={"causal_references": True})`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.registry import ModelSpec, StateDict, build_config, merge_fields

from ..dit_formats import (
    JSON_FIELDS,
    OWNS_DIFFUSERS,
    OWNS_ORIGINAL,
    dit_layouts,
    fields_from_json,
    fields_from_shapes,
)
from ..key_tables import DiffusersKeyTables, template
from .dit import TIME_FREQ_DIM, Flux2DiT, Flux2DiTConfig

PREFIX = "model.diffusion_model."
_MODULATIONS = ("double_stream_modulation_img", "double_stream_modulation_txt", "single_stream_modulation")

# diffusers -> ours (FLUX.2 has no biases: every key is a weight or a norm scale). `{}` is the block index.
DIFFUSERS_TO_OURS: dict[str, str] = {
    "x_embedder.weight": "img_in.weight",
    "context_embedder.weight": "txt_in.weight",
    "time_guidance_embed.timestep_embedder.linear_1.weight": "time_in.in_layer.weight",
    "time_guidance_embed.timestep_embedder.linear_2.weight": "time_in.out_layer.weight",
    "time_guidance_embed.guidance_embedder.linear_1.weight": "guidance_in.in_layer.weight",
    "time_guidance_embed.guidance_embedder.linear_2.weight": "guidance_in.out_layer.weight",
    **{f"{m}.linear.weight": f"{m}.lin.weight" for m in _MODULATIONS},
    "proj_out.weight": "final_layer.linear.weight",
    **{
        f"transformer_blocks.{{}}.{src}": f"double_blocks.{{}}.{dst}"
        for src, dst in {
            "attn.norm_q.weight": "img_attn.norm.query_norm.scale",
            "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
            "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
            "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale",
            "attn.to_out.0.weight": "img_attn.proj.weight",
            "attn.to_add_out.weight": "txt_attn.proj.weight",
            "ff.linear_in.weight": "img_mlp.0.weight",
            "ff.linear_out.weight": "img_mlp.2.weight",
            "ff_context.linear_in.weight": "txt_mlp.0.weight",
            "ff_context.linear_out.weight": "txt_mlp.2.weight",
        }.items()
    },
    **{
        f"single_transformer_blocks.{{}}.{src}": f"single_blocks.{{}}.{dst}"
        for src, dst in {
            "attn.to_qkv_mlp_proj.weight": "linear1.weight",
            "attn.to_out.weight": "linear2.weight",
            "attn.norm_q.weight": "norm.query_norm.scale",
            "attn.norm_k.weight": "norm.key_norm.scale",
        }.items()
    },
}
# Our fused qkv tensors and the diffusers tensors stacked (dim 0, q, k, v) to make them.
OURS_FUSED: dict[str, tuple[str, ...]] = {
    "double_blocks.{}.img_attn.qkv.weight": tuple(f"transformer_blocks.{{}}.attn.to_{n}.weight" for n in "qkv"),
    "double_blocks.{}.txt_attn.qkv.weight": tuple(f"transformer_blocks.{{}}.attn.add_{n}_proj.weight" for n in "qkv"),
}
# Stored as (scale, shift) by diffusers and (shift, scale) by BFL: halves swapped.
SWAPPED = {"norm_out.linear.weight": "final_layer.adaLN_modulation.1.weight"}


KEY_TABLES = DiffusersKeyTables("FLUX.2 DiT", DIFFUSERS_TO_OURS, OURS_FUSED, SWAPPED)
_template = template
diffusers_to_ours = KEY_TABLES.to_ours  # a diffusers `Flux2Transformer2DModel` state dict in our (BFL) names
ours_to_diffusers = KEY_TABLES.to_diffusers  # the exact inverse


ORIGINAL_SIGNATURE = (
    "img_in.weight",
    "time_in.in_layer.weight",
    "txt_in.weight",
    "double_stream_modulation_img.lin.weight",
    "double_stream_modulation_txt.lin.weight",
    "single_stream_modulation.lin.weight",
    "double_blocks.0.img_attn.qkv.weight",
    "single_blocks.0.linear1.weight",
    "final_layer.adaLN_modulation.1.weight",
)
DIFFUSERS_SIGNATURE = (
    "x_embedder.weight",
    "context_embedder.weight",
    "time_guidance_embed.timestep_embedder.linear_1.weight",
    "double_stream_modulation_img.linear.weight",
    "single_stream_modulation.linear.weight",
    "transformer_blocks.0.attn.to_q.weight",
    "single_transformer_blocks.0.attn.to_qkv_mlp_proj.weight",
    "norm_out.linear.weight",
)
LAYOUTS = dit_layouts(
    ORIGINAL_SIGNATURE,
    DIFFUSERS_SIGNATURE,
    diffusers_to_ours,
    owns_original=(*OWNS_ORIGINAL, *(f"{m}." for m in _MODULATIONS)),
    owns_diffusers=(*OWNS_DIFFUSERS, "time_guidance_embed.", *(f"{m}." for m in _MODULATIONS)),
    comfyui_prefix=PREFIX,
)


# ----------------------------------------------------------------------------------- config
def _fields_from_shapes(state: StateDict) -> dict:
    return fields_from_shapes(state, pooled=False, swiglu=True)


# diffusers config.json field -> our config field
_JSON_FIELDS = {**JSON_FIELDS, "rope_theta": "theta", "mlp_ratio": "mlp_ratio"}
# Our own fields a config dict may state (the diffusers json has no such field).
_OWN_JSON_FIELDS = ("causal_references",)
# Architecture facts the json may state but that we do not vary: value our model has.
_FIXED_JSON = {"patch_size": 1, "timestep_guidance_channels": TIME_FREQ_DIM, "eps": 1e-6}


def _fields_from_json(config_json: dict) -> dict:
    for name, ours in _FIXED_JSON.items():
        if config_json.get(name) is not None and config_json[name] != ours:
            raise ConfigError(f"FLUX.2 DiT config.json {name}={config_json[name]!r}: only {ours!r} is supported")
    given = fields_from_json(config_json, _JSON_FIELDS)
    given.update({name: config_json[name] for name in _OWN_JSON_FIELDS if config_json.get(name) is not None})
    return given


def config_from_state(state: StateDict, config_json: dict | None = None) -> Flux2DiTConfig:
    """Config from our-named shapes and, when present, the diffusers `config.json` beside the file.

    Shapes give widths, block counts, heads (QK-norm width is head_dim), MLP ratio and whether the
    guidance embedder exists (klein has none); RoPE axes and theta come from the json or the released
    defaults. A json value contradicting the shapes is an error naming the field.
    """
    given = _fields_from_json(config_json) if config_json else {}
    derived = _fields_from_shapes(state) if state else {}
    return build_config(Flux2DiTConfig, "FLUX.2 DiT", merge_fields("FLUX.2 DiT", given, derived))


KV_PIPELINE_CLASS = "Flux2KleinKVPipeline"  # model_index.json `_class_name` of the KV releases' diffusers folders
KV_REPOS = ("black-forest-labs/FLUX.2-klein-9b-kv",)  # hub repos of KV DiTs
# hub repos of step-distilled DiTs (their model_index.json says `"is_distilled": true`)
DISTILLED_REPOS = ("black-forest-labs/FLUX.2-klein-4B", "black-forest-labs/FLUX.2-klein-9B", *KV_REPOS)


def _model_indexes(files: Sequence[str]) -> list[dict]:
    """The readable `model_index.json` files beside `files` or one folder up (a diffusers `transformer/` folder)."""
    found = []
    for folder in {folder for f in files for folder in (Path(f).parent, Path(f).parent.parent)}:
        index = folder / "model_index.json"
        try:
            data = json.loads(index.read_text()) if index.is_file() else {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(data, dict) and data:
            found.append(data)
    return found


def _is_repo(model_id: str | None, repos: Sequence[str]) -> bool:
    return model_id is not None and model_id.lower() in {repo.lower() for repo in repos}


def released_as_kv(model_id: str | None, files: Sequence[str]) -> bool:
    """Whether DiT weights come from a FLUX.2 KV release: `model_id` is a KV repo, or a `model_index.json` beside
    `files` or one folder up (a diffusers `transformer/` folder) names the KV pipeline."""
    if _is_repo(model_id, KV_REPOS):
        return True
    return any(data.get("_class_name") == KV_PIPELINE_CLASS for data in _model_indexes(files))


def released_as_distilled(model_id: str | None, files: Sequence[str]) -> bool:
    """Whether DiT weights come from a step-distilled FLUX.2 release (klein-4B, klein-9B, klein-9B-KV): `model_id`
    is one of their repos, or a `model_index.json` beside `files` or one folder up says `"is_distilled": true`
    (diffusers' `Flux2KleinPipeline` reads the same field; its KV pipeline assumes true when the field is absent)."""
    if _is_repo(model_id, DISTILLED_REPOS):
        return True
    for data in _model_indexes(files):
        default = data.get("_class_name") == KV_PIPELINE_CLASS
        if data.get("is_distilled", default) is True:
            return True
    return False


FLUX2_DIT_SPEC = ModelSpec(
    name="flux2_dit",
    role="dit",
    layouts=LAYOUTS,
    config_from_state=config_from_state,
    build=Flux2DiT,
    description="FLUX.2 DiT: dev, klein-4B, klein-9B, klein base (BFL original files, ComfyUI single files, "
    "diffusers folders)",
)
