"""How LTX-2 DiT checkpoints are recognised, converted and configured.

Our module names are ltx-core's, so the DiT part of `ltx-2-19b-dev.safetensors` and
`ltx-2.3-22b-dev.safetensors` (keys under `model.diffusion_model.`) loads as is. Those files also hold
the text connectors under the same prefix (`video_embeddings_connector.*`, `audio_embeddings_connector.*`)
and the VAEs and vocoder under other prefixes: this spec owns only the DiT's top-level names and leaves
the rest to their own specs.
Also accepted: the same keys without the prefix (a DiT saved on its own), and the diffusers
`transformer/` folder, whose names differ by plain renames (`patchify_proj` -> `proj_in`,
`adaln_single` -> `time_embed`, `prompt_adaln_single` -> `prompt_adaln`, `q_norm` -> `norm_q`, ...).
`ours_to_diffusers` is the exact inverse of `diffusers_to_ours`. Which version a checkpoint is comes from
its keys and shapes (LTX-2.3: `to_gate_logits`, 9-row block tables, `prompt_adaln_single`, no
`caption_projection`), or from diffusers' `config.json` switches (`gated_attn`, `cross_attn_mod`,
`use_prompt_embeddings`, ...).

Head counts cannot be read from the shapes (the QK norms span all heads): they come from the diffusers
`config.json` when there is one, otherwise from the released head widths (128 video, 64 audio).
"""

from __future__ import annotations

import re

import torch

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.registry import KeyLayout, ModelSpec, StateDict, build_config, merge_fields

from .dit import LTX2DiT, LTX2DiTConfig

PREFIX = "model.diffusion_model."
_BLOCK_KEY = re.compile(r"^transformer_blocks\.(\d+)\.(.+)$")
_WB = ("weight", "bias")

# ---------------------------------------------------------------------------- name tables (ours -> diffusers)
_ADALN = {  # ours -> diffusers module name of each adaln_single embedder
    "adaln_single": "time_embed",
    "audio_adaln_single": "audio_time_embed",
    "av_ca_video_scale_shift_adaln_single": "av_cross_attn_video_scale_shift",
    "av_ca_audio_scale_shift_adaln_single": "av_cross_attn_audio_scale_shift",
    "av_ca_a2v_gate_adaln_single": "av_cross_attn_video_a2v_gate",
    "av_ca_v2a_gate_adaln_single": "av_cross_attn_audio_v2a_gate",
    "prompt_adaln_single": "prompt_adaln",  # LTX-2.3
    "audio_prompt_adaln_single": "audio_prompt_adaln",
}
_LINEARS = {  # ours -> diffusers for the plain top-level linears
    "patchify_proj": "proj_in",
    "audio_patchify_proj": "audio_proj_in",
    "proj_out": "proj_out",
    "audio_proj_out": "audio_proj_out",
    "caption_projection.linear_1": "caption_projection.linear_1",
    "caption_projection.linear_2": "caption_projection.linear_2",
    "audio_caption_projection.linear_1": "audio_caption_projection.linear_1",
    "audio_caption_projection.linear_2": "audio_caption_projection.linear_2",
}
TOP_LEVEL: dict[str, str] = {
    "scale_shift_table": "scale_shift_table",
    "audio_scale_shift_table": "audio_scale_shift_table",
    "keyframes_abs_pos_embedding": "keyframes_abs_pos_embedding",  # LTX-2.5
    **{f"{ours}.{p}": f"{theirs}.{p}" for ours, theirs in _LINEARS.items() for p in _WB},
    **{
        f"{ours}.{part}.{p}": f"{theirs}.{part}.{p}"
        for ours, theirs in _ADALN.items()
        for part in ("emb.timestep_embedder.linear_1", "emb.timestep_embedder.linear_2", "linear")
        for p in _WB
    },
}
_ATTENTIONS = ("attn1", "attn2", "audio_attn1", "audio_attn2", "audio_to_video_attn", "video_to_audio_attn")
BLOCK: dict[str, str] = {  # the part after `transformer_blocks.{i}.`
    "scale_shift_table": "scale_shift_table",
    "audio_scale_shift_table": "audio_scale_shift_table",
    "scale_shift_table_a2v_ca_video": "video_a2v_cross_attn_scale_shift_table",
    "scale_shift_table_a2v_ca_audio": "audio_a2v_cross_attn_scale_shift_table",
    "prompt_scale_shift_table": "prompt_scale_shift_table",  # LTX-2.3
    "audio_prompt_scale_shift_table": "audio_prompt_scale_shift_table",
    **{f"{a}.q_norm.weight": f"{a}.norm_q.weight" for a in _ATTENTIONS},
    **{f"{a}.k_norm.weight": f"{a}.norm_k.weight" for a in _ATTENTIONS},
    **{
        f"{a}.{lin}.{p}": f"{a}.{lin}.{p}"
        for a in _ATTENTIONS
        for lin in ("to_q", "to_k", "to_v", "to_out.0", "to_gate_logits")  # to_gate_logits: LTX-2.3
        for p in _WB
    },
    **{
        f"{ff}.{lin}.{p}": f"{ff}.{lin}.{p}"
        for ff in ("ff", "audio_ff")
        for lin in ("net.0.proj", "net.2")
        for p in _WB
    },
}
_TOP_BACK = {v: k for k, v in TOP_LEVEL.items()}
_BLOCK_BACK = {v: k for k, v in BLOCK.items()}


def _rename(state: dict[str, torch.Tensor], top: dict[str, str], block: dict[str, str], what: str):
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        m = _BLOCK_KEY.match(key)
        if m is not None and m.group(2) in block:
            out[f"transformer_blocks.{m.group(1)}.{block[m.group(2)]}"] = value
        elif m is None and key in top:
            out[top[key]] = value
        else:
            raise KeyError(f"LTX-2 DiT ({what}): no mapping for key {key!r}")
    return out


def diffusers_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers `LTX2VideoTransformer3DModel` state dict (LTX-2.0, 2.3 or 2.5) in our (ltx-core) names;
    `KeyError` names an unknown key."""
    return _rename(state, _TOP_BACK, _BLOCK_BACK, "diffusers layout")


def ours_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our (ltx-core) names -> diffusers `LTX2VideoTransformer3DModel` names; inverse of `diffusers_to_ours`."""
    return _rename(state, TOP_LEVEL, BLOCK, "to diffusers")


# keys every version has (LTX-2.3 has no caption projection)
ORIGINAL_SIGNATURE = (
    "patchify_proj.weight",
    "audio_patchify_proj.weight",
    "adaln_single.linear.weight",
    "av_ca_a2v_gate_adaln_single.linear.weight",
    "av_ca_audio_scale_shift_adaln_single.linear.weight",
    "transformer_blocks.0.audio_to_video_attn.to_q.weight",
    "audio_proj_out.weight",
)
DIFFUSERS_SIGNATURE = (
    "proj_in.weight",
    "audio_proj_in.weight",
    "time_embed.linear.weight",
    "av_cross_attn_video_a2v_gate.linear.weight",
    "av_cross_attn_audio_scale_shift.linear.weight",
    "transformer_blocks.0.audio_to_video_attn.to_q.weight",
    "audio_proj_out.weight",
)
_OWNS_ORIGINAL = tuple(sorted({k.split(".")[0] + ("." if "." in k else "") for k in TOP_LEVEL})) + (
    "transformer_blocks.",
)
_OWNS_DIFFUSERS = tuple(sorted({k.split(".")[0] + ("." if "." in k else "") for k in _TOP_BACK})) + (
    "transformer_blocks.",
)

LAYOUTS = (
    KeyLayout("original", ORIGINAL_SIGNATURE, prefix=PREFIX, owns_prefixes=_OWNS_ORIGINAL),
    KeyLayout("original_unprefixed", ORIGINAL_SIGNATURE, owns_prefixes=_OWNS_ORIGINAL),
    KeyLayout("diffusers", DIFFUSERS_SIGNATURE, convert=diffusers_to_ours, owns_prefixes=_OWNS_DIFFUSERS),
)


# ----------------------------------------------------------------------------------- config
def _count_blocks(state: StateDict) -> int:
    n = 0
    while f"transformer_blocks.{n}.attn1.to_q.weight" in state:
        n += 1
    return n


def _fields_from_shapes(state: StateDict) -> dict:
    dim, in_channels = state["patchify_proj.weight"].shape
    audio_dim, audio_in = state["audio_patchify_proj.weight"].shape
    fields = dict(
        in_channels=in_channels,
        out_channels=state["proj_out.weight"].shape[0],
        audio_in_channels=audio_in,
        audio_out_channels=state["audio_proj_out.weight"].shape[0],
        num_layers=_count_blocks(state),
        dim=dim,
        audio_dim=audio_dim,
        **_version_fields(state),
    )
    if fields["caption_projection"]:
        fields["caption_channels"] = state["caption_projection.linear_1.weight"].shape[1]
    return fields


def _version_fields(state: StateDict) -> dict:
    """The LTX-2.3 / 2.5 switches, read from which keys exist and the block tables' row count."""
    block = "transformer_blocks.0."
    fields = dict(
        caption_projection="caption_projection.linear_1.weight" in state,
        keyframes_abs_pos_embedding="keyframes_abs_pos_embedding" in state,
    )
    if block + "attn1.to_q.weight" not in state:  # no blocks: nothing more to read
        return fields
    rows = state[block + "scale_shift_table"].shape[0]
    if rows not in (6, 9):
        raise ConfigError(
            f"LTX-2 DiT: {block}scale_shift_table has {rows} rows; expected 6 (LTX-2.0) or 9 (LTX-2.3 text "
            f"cross-attention AdaLN)"
        )
    fields.update(
        gated_attention=block + "attn1.to_gate_logits.weight" in state,
        cross_attention_adaln=rows == 9,
        ff_bias=block + "ff.net.0.proj.bias" in state,
        audio_ff_bias=block + "audio_ff.net.0.proj.bias" in state,
    )
    if rows == 9:
        fields["prompt_adaln_single"] = "prompt_adaln_single.linear.weight" in state
    return fields


# diffusers config.json field -> our config field
_JSON_FIELDS = {
    "in_channels": "in_channels",
    "out_channels": "out_channels",
    "num_attention_heads": "num_heads",
    "attention_head_dim": "head_dim",
    "audio_in_channels": "audio_in_channels",
    "audio_out_channels": "audio_out_channels",
    "audio_num_attention_heads": "audio_num_heads",
    "audio_attention_head_dim": "audio_head_dim",
    "num_layers": "num_layers",
    "caption_channels": "caption_channels",
    "norm_eps": "norm_eps",
    "rope_type": "rope_type",
    "rope_theta": "rope_theta",
    "rope_double_precision": "rope_double_precision",
    "audio_pos_embed_max_pos": "audio_rope_max_pos",
    "timestep_scale_multiplier": "timestep_scale_multiplier",
    "cross_attn_timestep_scale_multiplier": "av_ca_timestep_scale_multiplier",
    "vae_scale_factors": "vae_scale_factors",
    "causal_offset": "causal_offset",
    "audio_sampling_rate": "audio_sampling_rate",
    "audio_hop_length": "audio_hop_length",
    "audio_scale_factor": "audio_scale_factor",
    "use_prompt_embeddings": "caption_projection",
    "use_prompt_adaln_single": "prompt_adaln_single",
    "ff_bias": "ff_bias",
    "audio_ff_bias": "audio_ff_bias",
    "use_keyframes_abs_pos_embedding": "keyframes_abs_pos_embedding",
}
# diffusers' per-stream switches (video, audio) -> our one field for both streams (they agree in every release)
_PAIRED_JSON = {
    "gated_attention": ("gated_attn", "audio_gated_attn"),
    "cross_attention_adaln": ("cross_attn_mod", "audio_cross_attn_mod"),
}
# Architecture facts the json may state but that no released version varies: value we have.
_FIXED_JSON = {
    "patch_size": 1,
    "patch_size_t": 1,
    "audio_patch_size": 1,
    "audio_patch_size_t": 1,
    "activation_fn": "gelu-approximate",
    "qk_norm": "rms_norm_across_heads",
    "norm_elementwise_affine": False,
    "attention_bias": True,
    "attention_out_bias": True,
}
_RELEASED_HEAD_DIM = {"head_dim": 128, "audio_head_dim": 64}


def diffusers_config(config: LTX2DiTConfig) -> dict:
    """The `config.json` fields (= constructor arguments) of diffusers' `LTX2VideoTransformer3DModel` with
    `config`'s sizes and settings: what `config_from_state` reads back (a round trip), and how tests and
    benchmarks build the reference model."""
    fields = {name: getattr(config, ours) for name, ours in _JSON_FIELDS.items()}
    for ours, names in _PAIRED_JSON.items():
        fields.update(dict.fromkeys(names, getattr(config, ours)))
    fields["vae_scale_factors"] = tuple(config.vae_scale_factors)
    fields.update(zip(("pos_embed_max_pos", "base_height", "base_width"), config.rope_max_pos, strict=True))
    return {**fields, "cross_attention_dim": config.dim, "audio_cross_attention_dim": config.audio_dim}


def _fields_from_json(config_json: dict) -> dict:
    for name, ours in _FIXED_JSON.items():
        if config_json.get(name) is not None and config_json[name] != ours:
            raise ConfigError(f"LTX-2 DiT config.json {name}={config_json[name]!r}: only {ours!r} is supported")
    given = {ours: config_json[name] for name, ours in _JSON_FIELDS.items() if config_json.get(name) is not None}
    for ours, (video, audio) in _PAIRED_JSON.items():
        if config_json.get(video) is None and config_json.get(audio) is None:
            continue
        values = [bool(config_json.get(name) or False) for name in (video, audio)]  # diffusers' default: False
        if values[0] != values[1]:
            raise ConfigError(
                f"LTX-2 DiT config.json {video}={values[0]} but {audio}={values[1]}: only equal values are supported"
            )
        given[ours] = values[0]
    for side in ("", "audio_"):
        if f"{side}out_channels" not in given and f"{side}in_channels" in given:
            given[f"{side}out_channels"] = given[f"{side}in_channels"]  # diffusers: None means in_channels
    if any(config_json.get(k) is not None for k in ("pos_embed_max_pos", "base_height", "base_width")):
        default = LTX2DiTConfig.__dataclass_fields__["rope_max_pos"].default
        given["rope_max_pos"] = tuple(
            config_json.get(k) if config_json.get(k) is not None else d
            for k, d in zip(("pos_embed_max_pos", "base_height", "base_width"), default, strict=True)
        )
    if "vae_scale_factors" in given:
        given["vae_scale_factors"] = tuple(given["vae_scale_factors"])
    # the text cross-attention reads the projected caption, so its width is the stream width
    for name, heads, head_dim in (
        ("cross_attention_dim", "num_heads", "head_dim"),
        ("audio_cross_attention_dim", "audio_num_heads", "audio_head_dim"),
    ):
        value = config_json.get(name)
        if value is not None and heads in given and head_dim in given and value != given[heads] * given[head_dim]:
            raise ConfigError(
                f"LTX-2 DiT config.json {name}={value} must equal {heads} x {head_dim} = "
                f"{given[heads] * given[head_dim]} (the stream width)"
            )
    return given


def _split_width(fields: dict, derived: dict, side: str) -> None:
    """Turn the stream width the shapes give into (num_heads, head_dim), from the json or the released head width."""
    width = derived.get(f"{side}dim")
    heads_name, head_dim_name = f"{side}num_heads", f"{side}head_dim"
    if width is None:
        return
    if heads_name in fields and head_dim_name not in fields:
        fields[head_dim_name] = width // fields[heads_name]
    fields.setdefault(head_dim_name, _RELEASED_HEAD_DIM[head_dim_name])
    fields.setdefault(heads_name, width // fields[head_dim_name])
    if fields[heads_name] * fields[head_dim_name] != width:
        raise ConfigError(
            f"LTX-2 DiT: the checkpoint's {side or 'video '}stream width is {width} but {heads_name}="
            f"{fields[heads_name]} x {head_dim_name}={fields[head_dim_name]} gives "
            f"{fields[heads_name] * fields[head_dim_name]}; give both in the config"
        )


def config_from_state(state: StateDict, config_json: dict | None = None) -> LTX2DiTConfig:
    """Config from our-named shapes and, when present, the diffusers `config.json` beside the file.

    Shapes give channels, block count, caption width, the two stream widths and the version switches
    (gate logits, 9-row tables, prompt AdaLN, caption projection, feed-forward biases); the json gives
    head counts, RoPE and timestep settings (else the released ones). A json value contradicting the
    shapes is an error naming the field.
    """
    given = _fields_from_json(config_json) if config_json else {}
    derived = _fields_from_shapes(state) if state else {}
    counts = {k: v for k, v in derived.items() if k not in ("dim", "audio_dim")}
    fields = merge_fields("LTX-2 DiT", given, counts)
    for side in ("", "audio_"):
        _split_width(fields, derived, side)
    return build_config(LTX2DiTConfig, "LTX-2 DiT", fields)


LTX2_DIT_SPEC = ModelSpec(
    name="ltx2_dit",
    role="dit",
    layouts=LAYOUTS,
    config_from_state=config_from_state,
    build=LTX2DiT,
    description=(
        "LTX-2 / LTX-2.3 audio-video DiT (19B / 22B): ltx-2-19b-*.safetensors, ltx-2.3-22b-*.safetensors "
        "(model.diffusion_model.*), diffusers transformer/"
    ),
)
