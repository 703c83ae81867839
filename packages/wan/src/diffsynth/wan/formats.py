"""How Wan DiT checkpoints are recognised, converted and configured.

Our DiT uses the ORIGINAL Wan names. The official hub repos (`Wan-AI/Wan2.1-*`, `Wan-AI/Wan2.2-*`)
store exactly those keys, in files that only look like diffusers files
(`diffusion_pytorch_model*.safetensors` beside a `config.json` whose `_class_name` is `WanModel`),
so they load as is. Also accepted:

- the same keys under `model.diffusion_model.` (ComfyUI / single-file repacks), or under `model.` (the
  `krea/krea-realtime-video` file, as DiffSynth-Studio's converter reads it);
- the diffusers names of the `*-Diffusers` repos (`condition_embedder.*`, `blocks.N.attn1.to_q`,
  `scale_shift_table`, ...), renamed by the tables below (no tensor changes shape or value).

Wan2.2-Animate's extra modules keep the authors' names too; diffusers' `WanAnimateTransformer3DModel` names them
differently and stores two things otherwise: the face blocks' key/value projection as two linears (`to_k`,
`to_v`; ours is one `linear1_kv`) and the motion encoder's activation biases flat (ours `[1, C, 1, 1]`), and it
regenerates the fixed blur kernels that the authors' file holds (added back here).

The config comes from the repo's `config.json` when there is one (the original `WanModel` fields
or diffusers' `WanTransformer3DModel` fields), checked against and completed from the shapes.
"""

from __future__ import annotations

import math
import re

import torch

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.registry import Family, KeyLayout, ModelSpec, StateDict, build_config, merge_fields

from . import animate2, audio_encoder, dancer, longcat, s2v, video_as_prompt
from .animate import Blur
from .dit import WanDiT, WanDiTConfig, backbone_fields, heads_from_width
from .motion_controller import MOTION_CONTROLLER_SPEC
from .video_as_prompt import DiTKeyLayout

PREFIX = "model.diffusion_model."
MODEL_PREFIX = "model."  # krea/krea-realtime-video's file (DiffSynth-Studio's converter strips this prefix for it)
FLF2V_CLIP_TOKENS = 2 * 257  # first- and last-frame CLIP tokens, each with a learned position
_BLOCK_KEY = re.compile(r"^(blocks|vace_blocks)\.(\d+)\.(.+)$")

# ----------------------------------------------------------------------------------- diffusers names
# Module paths, diffusers -> ours; `.weight` / `.bias` are appended below.
_DIFFUSERS_TOP_MODULES = {
    "patch_embedding": "patch_embedding",
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.image_embedder.norm1": "img_emb.proj.0",
    "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",
    "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3",
    "condition_embedder.image_embedder.norm2": "img_emb.proj.4",
    "proj_out": "head.head",
    "vace_patch_embedding": "vace_patch_embedding",
}
_DIFFUSERS_BLOCK_MODULES = {
    "attn1.to_q": "self_attn.q",
    "attn1.to_k": "self_attn.k",
    "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn1.norm_q": "self_attn.norm_q",
    "attn1.norm_k": "self_attn.norm_k",
    "norm2": "norm3",  # the affine cross-attention pre-norm; diffusers' norm1/norm3 have no weights
    "attn2.to_q": "cross_attn.q",
    "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "attn2.norm_q": "cross_attn.norm_q",
    "attn2.norm_k": "cross_attn.norm_k",
    "attn2.add_k_proj": "cross_attn.k_img",
    "attn2.add_v_proj": "cross_attn.v_img",
    "attn2.norm_added_k": "cross_attn.norm_k_img",
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
}
# VACE control blocks: a main block's modules plus their input / output projections.
_DIFFUSERS_VACE_BLOCK_MODULES = {**_DIFFUSERS_BLOCK_MODULES, "proj_in": "before_proj", "proj_out": "after_proj"}
# Full key templates, diffusers -> ours; `{}` is the block index.
DIFFUSERS_TO_OURS: dict[str, str] = {
    "scale_shift_table": "head.modulation",
    "condition_embedder.image_embedder.pos_embed": "img_emb.emb_pos",
    **{f"{group}.{{}}.scale_shift_table": f"{group}.{{}}.modulation" for group in ("blocks", "vace_blocks")},
    **{f"{src}.{p}": f"{dst}.{p}" for src, dst in _DIFFUSERS_TOP_MODULES.items() for p in ("weight", "bias")},
    **{
        f"{group}.{{}}.{src}.{p}": f"{group}.{{}}.{dst}.{p}"
        for group, table in (("blocks", _DIFFUSERS_BLOCK_MODULES), ("vace_blocks", _DIFFUSERS_VACE_BLOCK_MODULES))
        for src, dst in table.items()
        for p in ("weight", "bias")
    },
}
OURS_TO_DIFFUSERS: dict[str, str] = {ours: theirs for theirs, ours in DIFFUSERS_TO_OURS.items()}
# Present in some diffusers-format I2V files, unused by the model (diffusers ignores it too).
DIFFUSERS_IGNORED = frozenset({"blocks.{}.attn2.norm_added_q.weight"})


def _template(key: str) -> tuple[str, list[int]]:
    m = _BLOCK_KEY.match(key)
    if m is None:
        return key, []
    return f"{m.group(1)}.{{}}.{m.group(3)}", [int(m.group(2))]


def _rename(state: dict[str, torch.Tensor], table: dict[str, str], ignored: frozenset, what: str):
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        template, index = _template(key)
        if template in table:
            out[table[template].format(*index)] = value
        elif template not in ignored:
            raise KeyError(f"Wan DiT ({what}): no mapping for key {key!r}")
    return out


# ----------------------------------------------------------------------------------- Wan2.2-Animate
ANIMATE_PREFIXES = ("pose_patch_embedding.", "motion_encoder.", "face_encoder.", "face_adapter.")
_NET_APP = "motion_encoder.enc.net_app.convs"
# diffusers -> ours, `{}` a motion-network linear or a face block index
_DIFFUSERS_ANIMATE = {
    "motion_encoder.conv_in.weight": f"{_NET_APP}.0.0.weight",
    "motion_encoder.conv_in.act_fn.bias": f"{_NET_APP}.0.1.bias",
    "motion_encoder.motion_synthesis_weight": "motion_encoder.dec.direction.weight",
    "face_encoder.padding_tokens": "face_encoder.padding_tokens",
    **{f"motion_encoder.motion_network.{{}}.{p}": f"motion_encoder.enc.fc.{{}}.{p}" for p in ("weight", "bias")},
    **{
        f"{src}.{p}": f"{dst}.{p}"
        for src, dst in (
            ("pose_patch_embedding", "pose_patch_embedding"),
            ("face_encoder.conv1_local", "face_encoder.conv1_local.conv"),
            ("face_encoder.conv2", "face_encoder.conv2.conv"),
            ("face_encoder.conv3", "face_encoder.conv3.conv"),
            ("face_encoder.out_proj", "face_encoder.out_proj"),
            ("face_adapter.{}.to_q", "face_adapter.fuser_blocks.{}.linear1_q"),
            ("face_adapter.{}.to_out", "face_adapter.fuser_blocks.{}.linear2"),
        )
        for p in ("weight", "bias")
    },
    "face_adapter.{}.norm_q.weight": "face_adapter.fuser_blocks.{}.q_norm.weight",
    "face_adapter.{}.norm_k.weight": "face_adapter.fuser_blocks.{}.k_norm.weight",
}
# a residual block's keys (diffusers `res_blocks.N.` -> ours `convs.N+1.`)
_DIFFUSERS_RES_BLOCK = {
    "conv1.weight": "conv1.0.weight",
    "conv1.act_fn.bias": "conv1.1.bias",
    "conv2.weight": "conv2.1.weight",
    "conv2.act_fn.bias": "conv2.2.bias",
    "conv_skip.weight": "skip.1.weight",
}
_DIFFUSERS_KV = re.compile(r"^face_adapter\.(\d+)\.to_([kv])\.(weight|bias)$")
_DIFFUSERS_RES = re.compile(r"^motion_encoder\.res_blocks\.(\d+)\.(.+)$")
_INDEXED = re.compile(r"^(motion_encoder\.motion_network|face_adapter)\.(\d+)\.(.+)$")


def _blur_kernel(like: torch.Tensor) -> torch.Tensor:
    return Blur((0, 0)).kernel.to(device=like.device, dtype=like.dtype)


def _animate_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' Animate-only keys -> ours (kv joined, biases reshaped, blur kernels added)."""
    res_blocks = {int(m.group(1)) for k in state if (m := _DIFFUSERS_RES.match(k))}
    out: dict[str, torch.Tensor] = {}
    kv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if (m := _DIFFUSERS_KV.match(key)) is not None:
            kv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
            continue
        if (m := _DIFFUSERS_RES.match(key)) is not None and m.group(2) in _DIFFUSERS_RES_BLOCK:
            ours = f"{_NET_APP}.{int(m.group(1)) + 1}.{_DIFFUSERS_RES_BLOCK[m.group(2)]}"
        elif key == "motion_encoder.conv_out.weight":
            ours = f"{_NET_APP}.{len(res_blocks) + 1}.weight"
        elif (m := _INDEXED.match(key)) is not None and f"{m.group(1)}.{{}}.{m.group(3)}" in _DIFFUSERS_ANIMATE:
            ours = _DIFFUSERS_ANIMATE[f"{m.group(1)}.{{}}.{m.group(3)}"].format(m.group(2))
        elif key in _DIFFUSERS_ANIMATE:
            ours = _DIFFUSERS_ANIMATE[key]
        else:
            raise KeyError(f"Wan DiT (diffusers layout): no mapping for Wan2.2-Animate key {key!r}")
        out[ours] = value.reshape(1, -1, 1, 1) if key.endswith("act_fn.bias") else value
    for (index, param), pair in kv.items():
        if set(pair) != {"k", "v"}:
            raise KeyError(f"Wan DiT (diffusers layout): face_adapter.{index}.to_k/to_v.{param} must come in pairs")
        out[f"face_adapter.fuser_blocks.{index}.linear1_kv.{param}"] = torch.cat([pair["k"], pair["v"]])
    for i in sorted(res_blocks):
        like = state[f"motion_encoder.res_blocks.{i}.conv2.weight"]
        for part in ("conv2", "skip"):
            out[f"{_NET_APP}.{i + 1}.{part}.0.kernel"] = _blur_kernel(like)
    return out


def _animate_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our Animate-only keys -> diffusers' (the inverse of `_animate_to_ours`; blur kernels dropped)."""
    inverse = {ours: theirs for theirs, ours in _DIFFUSERS_ANIMATE.items()}
    res_inverse = {ours: theirs for theirs, ours in _DIFFUSERS_RES_BLOCK.items()}
    last = max((int(k.split(".")[4]) for k in state if k.startswith(_NET_APP + ".")), default=0)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        template, index = key, None
        if m := re.match(r"^(motion_encoder\.enc\.fc|face_adapter\.fuser_blocks)\.(\d+)\.(.+)$", key):
            template, index = f"{m.group(1)}.{{}}.{m.group(3)}", m.group(2)
        if m := re.match(rf"^{re.escape(_NET_APP)}\.(\d+)\.(.+)$", key):
            i, rest = int(m.group(1)), m.group(2)
            if rest.endswith(".kernel"):
                continue
            if i == last and rest == "weight":
                out["motion_encoder.conv_out.weight"] = value
                continue
            if i > 0 and rest in res_inverse:
                theirs = f"motion_encoder.res_blocks.{i - 1}.{res_inverse[rest]}"
                out[theirs] = value.flatten() if theirs.endswith("act_fn.bias") else value
                continue
        if template.endswith(".linear1_kv.weight") or template.endswith(".linear1_kv.bias"):
            param = template.rsplit(".", 1)[1]
            k, v = value.chunk(2)
            out[f"face_adapter.{index}.to_k.{param}"], out[f"face_adapter.{index}.to_v.{param}"] = k, v
        elif template in inverse:
            theirs = inverse[template].format(index) if index is not None else inverse[template]
            out[theirs] = value.flatten() if theirs.endswith("act_fn.bias") else value
        else:
            raise KeyError(f"Wan DiT (original layout): no diffusers name for Wan2.2-Animate key {key!r}")
    return out


def _split_animate(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    animate = {k: v for k, v in state.items() if k.startswith(ANIMATE_PREFIXES)}
    return animate, {k: v for k, v in state.items() if k not in animate}


def diffusers_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a diffusers-layout Wan DiT state dict to the original names; `KeyError` names any
    key without a mapping."""
    animate, rest = _split_animate(state)
    out = _rename(rest, DIFFUSERS_TO_OURS, DIFFUSERS_IGNORED, "diffusers layout")
    return {**out, **_animate_to_ours(animate)} if animate else out


def ours_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our (original) names -> diffusers names (for exports such as LoRA files)."""
    animate, rest = _split_animate(state)
    out = _rename(rest, OURS_TO_DIFFUSERS, frozenset(), "original layout")
    return {**out, **_animate_to_diffusers(animate)} if animate else out


ORIGINAL_SIGNATURE = (
    "patch_embedding.weight",
    "text_embedding.0.weight",
    "time_embedding.0.weight",
    "time_projection.1.weight",
    "blocks.0.modulation",
    "blocks.0.self_attn.q.weight",
    "blocks.0.cross_attn.q.weight",
    "head.modulation",
    "head.head.weight",
)
DIFFUSERS_SIGNATURE = (
    "patch_embedding.weight",
    "condition_embedder.time_embedder.linear_1.weight",
    "condition_embedder.text_embedder.linear_1.weight",
    "condition_embedder.time_proj.weight",
    "blocks.0.scale_shift_table",
    "blocks.0.attn1.to_q.weight",
    "blocks.0.attn2.to_q.weight",
    "scale_shift_table",
    "proj_out.weight",
)
_OWNS_ORIGINAL = (
    "patch_embedding.",
    "text_embedding.",
    "time_embedding.",
    "time_projection.",
    "blocks.",
    "head.",
    "img_emb.",
    "vace_blocks.",
    "vace_patch_embedding.",
    "ref_conv.",
    "control_adapter.",
    *ANIMATE_PREFIXES,
)
_OWNS_DIFFUSERS = (
    "patch_embedding.",
    "condition_embedder.",
    "blocks.",
    "scale_shift_table",
    "proj_out.",
    "vace_blocks.",
    "vace_patch_embedding.",
    *ANIMATE_PREFIXES,
)

# the unprefixed layouts leave Video-As-Prompt's `*_mot_ref*` keys (in the same files) to its expert's spec
LAYOUTS = (
    DiTKeyLayout("original", ORIGINAL_SIGNATURE, owns_prefixes=_OWNS_ORIGINAL),
    KeyLayout("original_prefixed", ORIGINAL_SIGNATURE, prefix=PREFIX),
    KeyLayout("original_model_prefixed", ORIGINAL_SIGNATURE, prefix=MODEL_PREFIX),
    DiTKeyLayout("diffusers", DIFFUSERS_SIGNATURE, convert=diffusers_to_ours, owns_prefixes=_OWNS_DIFFUSERS),
)


# ----------------------------------------------------------------------------------- config
_ORIGINAL_JSON = (  # WanModel config.json fields with the same name and meaning as ours
    "model_type",
    "dim",
    "ffn_dim",
    "num_heads",
    "num_layers",
    "in_dim",
    "out_dim",
    "text_dim",
    "text_len",
    "freq_dim",
    "eps",
    "patch_size",
    "has_image_input",  # not written by the authors; accepted so a json alone can describe Wan2.2-I2V
    "image_dim",  # likewise (the authors fix the CLIP width at 1280)
    "vace_layers",  # VACE (`"model_type": "vace"`)
    "vace_in_dim",
    "motion_encoder_dim",  # Wan2.2-Animate (`WanAnimateModel`)
)
_FUN_JSON = {"add_ref_conv": "ref_conv", "has_ref_conv": "ref_conv", "in_dim_ref_conv": "ref_dim"}  # Wan Fun
_DIFFUSERS_JSON = {  # WanTransformer3DModel config.json -> ours
    "num_attention_heads": "num_heads",
    "in_channels": "in_dim",
    "out_channels": "out_dim",
    "text_dim": "text_dim",
    "freq_dim": "freq_dim",
    "ffn_dim": "ffn_dim",
    "num_layers": "num_layers",
    "eps": "eps",
    "patch_size": "patch_size",
    "rope_max_seq_len": "rope_max_len",
    "pos_embed_seq_len": "image_pos_len",
    "vace_layers": "vace_layers",  # WanVACETransformer3DModel
    "vace_in_channels": "vace_in_dim",
    "motion_encoder_size": "motion_encoder_size",  # WanAnimateTransformer3DModel
    "motion_style_dim": "motion_style_dim",
    "motion_dim": "motion_dim",
    "motion_encoder_dim": "motion_encoder_dim",
    "face_encoder_hidden_dim": "face_encoder_hidden_dim",
    "face_encoder_num_heads": "face_encoder_num_heads",
    "inject_face_latents_blocks": "face_adapter_every",
}


_DIFFUSERS_CLASSES = ("WanTransformer3DModel", "WanVACETransformer3DModel", "WanAnimateTransformer3DModel")
_ANIMATE_CLASSES = ("WanAnimateModel", "WanAnimateTransformer3DModel")


def _check_supported(config_json: dict) -> None:
    window = config_json.get("window_size")
    if window is not None and tuple(window) != (-1, -1):
        raise ConfigError(f"config.json window_size={window}: local attention windows are not supported")
    accepted = {"qk_norm": (True, "rms_norm_across_heads"), "cross_attn_norm": (True,)}
    for name, values in accepted.items():
        if name in config_json and config_json[name] not in values:
            raise ConfigError(
                f"config.json {name}={config_json[name]!r}: only {values} (the released layout) is supported"
            )


def _fields_from_json(config_json: dict) -> dict:
    _check_supported(config_json)
    diffusers = config_json.get("_class_name") in _DIFFUSERS_CLASSES or "num_attention_heads" in config_json
    if not diffusers:
        given = {name: config_json[name] for name in _ORIGINAL_JSON if config_json.get(name) is not None}
        given.update({ours: config_json[name] for name, ours in _FUN_JSON.items() if config_json.get(name) is not None})
    else:
        given = {ours: config_json[name] for name, ours in _DIFFUSERS_JSON.items() if config_json.get(name) is not None}
        if config_json.get("attention_head_dim") is not None and "num_heads" in given:
            given["dim"] = int(config_json["attention_head_dim"]) * int(given["num_heads"])
        if "image_dim" in config_json:
            given["has_image_input"] = config_json["image_dim"] is not None
            if config_json["image_dim"] is not None:
                given["image_dim"] = config_json["image_dim"]
    if config_json.get("_class_name") in _ANIMATE_CLASSES:
        given.update(animate=True, model_type="i2v")
        given.setdefault("has_image_input", config_json.get("use_img_emb", True) is not False)
        sizes = config_json.get("motion_encoder_channel_sizes")
        if sizes:
            size = int(given.get("motion_encoder_size", WanDiTConfig.motion_encoder_size))
            given["motion_channels"] = tuple(int(sizes[str(size >> i)]) for i in range(int(math.log2(size)) - 1))
    if "patch_size" in given:
        given["patch_size"] = tuple(int(p) for p in given["patch_size"])
    if "vace_layers" in given:
        given["vace_layers"] = tuple(int(i) for i in given["vace_layers"])
    if given.get("model_type") == "vace":  # a text-to-video DiT with the control branch
        given["model_type"] = "t2v"
    if given.get("model_type") == "flf2v":  # the authors' label; conditioned like I2V, plus CLIP positions
        given["model_type"] = "i2v"
        given.setdefault("image_pos_len", FLF2V_CLIP_TOKENS)
    return given


def _count_blocks(state: StateDict, group: str = "blocks") -> int:
    n = 0
    while f"{group}.{n}.modulation" in state:
        n += 1
    return n


def _fields_from_shapes(state: StateDict) -> dict:
    """Everything the shapes fix exactly (not the head count, text_len, eps or rope)."""
    fields = backbone_fields(state)
    fields["has_image_input"] = "img_emb.proj.1.weight" in state
    if fields["has_image_input"]:
        fields["image_dim"] = int(state["img_emb.proj.1.weight"].shape[1])
    if "img_emb.emb_pos" in state:
        fields["image_pos_len"] = int(state["img_emb.emb_pos"].shape[1])
    if "control_adapter.conv.weight" in state:  # Fun Control-Camera: the adapter folds 8 x 8 pixels onto channels
        fields["camera_adapter_dim"] = int(state["control_adapter.conv.weight"].shape[1]) // 64
    fields["ref_conv"] = "ref_conv.weight" in state
    if fields["ref_conv"]:
        fields["ref_dim"] = int(state["ref_conv.weight"].shape[1])
    if "vace_patch_embedding.weight" in state:
        fields["vace_in_dim"] = int(state["vace_patch_embedding.weight"].shape[1])
    fields["animate"] = "pose_patch_embedding.weight" in state
    if fields["animate"]:
        fields.update(_animate_fields(state, fields["num_layers"]))
    return fields


def _animate_fields(state: StateDict, num_layers: int) -> dict:
    """The Animate modules' sizes from their shapes: the conv pyramid's depth gives the face crop size."""
    net = "motion_encoder.enc.net_app.convs"
    res_blocks = 0
    while f"{net}.{res_blocks + 1}.conv1.0.weight" in state:
        res_blocks += 1
    channels = [int(state[f"{net}.0.0.weight"].shape[0])]
    channels += [int(state[f"{net}.{i}.conv2.1.weight"].shape[0]) for i in range(1, res_blocks + 1)]
    hidden = int(state["face_encoder.conv2.conv.weight"].shape[0])
    adapters = _count_blocks_with(state, "face_adapter.fuser_blocks", "linear1_q.weight")
    if not adapters or num_layers % adapters:
        raise ConfigError(
            f"Wan2.2-Animate DiT: {adapters} face_adapter blocks do not divide the {num_layers} DiT blocks evenly"
        )
    return dict(
        model_type="i2v",
        motion_encoder_size=2 ** (res_blocks + 2),
        motion_channels=tuple(channels),
        motion_style_dim=int(state[f"{net}.{res_blocks + 1}.weight"].shape[0]),
        motion_dim=int(state["motion_encoder.dec.direction.weight"].shape[1]),
        motion_encoder_dim=int(state["motion_encoder.dec.direction.weight"].shape[0]),
        face_encoder_hidden_dim=hidden,
        face_encoder_num_heads=int(state["face_encoder.conv1_local.conv.weight"].shape[0]) // hidden,
        face_adapter_every=num_layers // adapters,
    )


def _count_blocks_with(state: StateDict, group: str, leaf: str) -> int:
    n = 0
    while f"{group}.{n}.{leaf}" in state:
        n += 1
    return n


def _vace_layers(state: StateDict, merged: dict) -> None:
    """The shapes fix how many control blocks there are, not which layers they follow: a json's
    `vace_layers` must have that many; without one, the released DiTs' even spacing from layer 0
    (every 2nd layer of 30 in VACE-1.3B, every 5th of 40 in VACE-14B) is assumed."""
    count = _count_blocks(state, "vace_blocks")
    given = merged.get("vace_layers")
    if given is not None and len(given) != count:
        raise ConfigError(
            f"Wan DiT config.json says vace_layers={list(given)} ({len(given)} layers) but the checkpoint has "
            f"{count} vace_blocks"
        )
    if given is None and count:
        step = max(1, merged["num_layers"] // count)
        merged["vace_layers"] = tuple(range(0, step * count, step))


def _guess_model_type(fields: dict) -> str:
    """The authors' label from the shapes: CLIP input or extra conditioning channels -> i2v,
    the Wan2.2 VAE's 48 channels -> ti2v, else t2v."""
    defaults = WanDiTConfig()
    in_dim, out_dim = fields.get("in_dim", defaults.in_dim), fields.get("out_dim", defaults.out_dim)
    if fields.get("has_image_input") or in_dim != out_dim:
        return "i2v"
    return "ti2v" if in_dim == 48 else "t2v"


def config_from_state(state: StateDict, config_json: dict | None = None) -> WanDiTConfig:
    """Config from our-named shapes and, when present, the `config.json` beside the file.

    The json may be the original `WanModel` one (`model_type, dim, ffn_dim, num_heads, ...`) or
    diffusers' `WanTransformer3DModel` one. A json value that contradicts the shapes is an error
    naming the field. Without a json, heads are `dim / 128` and the model type is guessed from
    the channels. An empty `state` uses the json alone; then an `i2v` json means Wan 2.1 I2V (with
    CLIP input) unless it says `"has_image_input": false`.
    """
    given = _fields_from_json(config_json) if config_json else {}
    merged = merge_fields("Wan DiT", given, _fields_from_shapes(state) if state else {})
    if state:
        _vace_layers(state, merged)
    else:
        merged.setdefault("has_image_input", merged.get("model_type") == "i2v")
    merged.setdefault("model_type", _guess_model_type(merged))
    heads_from_width(merged, "Wan DiT")
    return build_config(WanDiTConfig, "Wan DiT", merged)


DIT_SPEC = ModelSpec(
    name="wan_dit",
    role="dit",
    layouts=LAYOUTS,
    config_from_state=config_from_state,
    build=WanDiT,
    description="Wan 2.1 / 2.2 video DiT (original keys as on the hub, ComfyUI-prefixed, or diffusers names)",
)

# ----------------------------------------------------------------------------------- Wan2.2-S2V
# The S2V DiT's own modules (`s2v.py`) keep the authors' names; its file owns every key, so it wins over the
# plain DiT spec, which would take only the shared ones.
S2V_SIGNATURE = (
    "patch_embedding.weight",
    "blocks.0.modulation",
    "head.head.weight",
    "cond_encoder.weight",
    "casual_audio_encoder.weights",
    "audio_injector.injector.0.q.weight",
    "trainable_cond_mask.weight",
    "frame_packer.proj.weight",
)
S2V_DIT_SPEC = ModelSpec(
    name="wan_s2v_dit",
    role="dit",
    layouts=(KeyLayout("original", S2V_SIGNATURE), KeyLayout("original_prefixed", S2V_SIGNATURE, prefix=PREFIX)),
    config_from_state=s2v.config_from_state,
    build=s2v.WanS2VDiT,
    description="Wan2.2-S2V speech-to-video DiT (the authors' keys, as in Wan-AI/Wan2.2-S2V-14B)",
)
# ----------------------------------------------------------------------------------- Wan2.2-Animate-2
# DiffSynth-Studio's `WanAnimate2Transformer` names (`blocks.N.block.*`: no converter); its file has no plain
# `blocks.N.modulation`, so the plain DiT spec does not match it.
ANIMATE2_SIGNATURE = (
    "patch_embedding.weight",
    "text_embedding.0.weight",
    "time_projection.1.weight",
    "blocks.0.block.modulation",
    "blocks.0.block.self_attn.q.weight",
    "blocks.0.block.cross_attn.k_img.weight",
    "img_emb.proj.1.weight",
    "head.head.weight",
)
ANIMATE2_DIT_SPEC = ModelSpec(
    name="wan_animate2_dit",
    role="dit",
    layouts=(
        KeyLayout("original", ANIMATE2_SIGNATURE),
        KeyLayout("original_prefixed", ANIMATE2_SIGNATURE, prefix=PREFIX),
    ),
    config_from_state=animate2.config_from_state,
    build=animate2.WanAnimate2DiT,
    description="Wan2.2-Animate-2 DiT (wan_animate_2/wan_animate_2_bf16*.safetensors, DiffSynth-Studio's keys)",
)
# ----------------------------------------------------------------------------------- Wan-Dancer-14B
# DiffSynth-Studio's `WanModel` names with its `wantodance_*` modules (`dancer.py`), as both released files
# (`global_model.safetensors`, `local_model.safetensors`) hold them. The plain DiT spec takes only the shared keys of
# an unprefixed file, but every key of a prefixed one, as this spec does: the longer signature wins that tie.
DANCER_SIGNATURE = (
    "patch_embedding.weight",
    "patch_embedding_global.weight",
    "text_embedding.0.weight",
    "time_projection.1.weight",
    "blocks.0.modulation",
    "blocks.0.cross_attn.k_img.weight",
    "head.head.weight",
    "head_global.head.weight",
    "img_emb_refimage.proj.1.weight",
    "music_projection.weight",
    "music_encoder.0.self_attn.in_proj_weight",
    "music_injector.injector.0.v.weight",
)
DANCER_DIT_SPEC = ModelSpec(
    name="wan_dancer_dit",
    role="dit",
    layouts=(KeyLayout("original", DANCER_SIGNATURE), KeyLayout("original_prefixed", DANCER_SIGNATURE, prefix=PREFIX)),
    config_from_state=dancer.config_from_state,
    build=dancer.WanDancerDiT,
    description="Wan-Dancer-14B music-to-dance DiT (global_model / local_model.safetensors, DiffSynth-Studio's keys)",
)
# ----------------------------------------------------------------------------------- LongCat-Video
# The authors' `LongCatVideoTransformer3DModel` names (`longcat.py`), as the sharded `dit/` files hold them.
LONGCAT_DIT_SPEC = ModelSpec(
    name="longcat_video_dit",
    role="dit",
    layouts=(
        KeyLayout("original", longcat.SIGNATURE),
        KeyLayout("original_prefixed", longcat.SIGNATURE, prefix=PREFIX),
    ),
    config_from_state=longcat.config_from_state,
    build=longcat.LongCatVideoDiT,
    description="LongCat-Video 13.6B DiT (meituan-longcat/LongCat-Video dit/diffusion_pytorch_model*.safetensors)",
)
# ----------------------------------------------------------------------------------- Video-As-Prompt
# ByteDance/Video-As-Prompt-Wan2.1-14B's `transformer/` files: the Wan2.1-I2V-14B DiT (diffusers names, taken by
# DIT_SPEC) and the MoT expert (`*_mot_ref*` keys, taken here) in one file set (`video_as_prompt.py`).
VAP_SPEC = ModelSpec(
    name="wan_video_as_prompt",
    role="vap",
    layouts=(
        video_as_prompt.ExpertKeyLayout(
            "diffusers_mot", video_as_prompt.EXPERT_SIGNATURE, convert=video_as_prompt.layout_to_ours
        ),
    ),
    config_from_state=video_as_prompt.spec_config,
    build=video_as_prompt.VideoAsPromptExpert,
    description="Video-As-Prompt MoT expert (ByteDance/Video-As-Prompt-Wan2.1-14B transformer/, `_mot_ref` keys)",
)
WAV2VEC_SIGNATURE = (
    "wav2vec2.feature_extractor.conv_layers.0.conv.weight",
    "wav2vec2.encoder.layers.0.attention.q_proj.weight",
)
WAV2VEC_SPEC = ModelSpec(
    name="wan_s2v_wav2vec2",
    role="audio_encoder",
    layouts=(KeyLayout("transformers", WAV2VEC_SIGNATURE, convert=audio_encoder.to_ours),),
    config_from_state=audio_encoder.config_from_state,
    build=audio_encoder.Wav2VecAudioEncoder,
    description="wav2vec2 (CTC) audio encoder of Wan2.2-S2V (wav2vec2-large-xlsr-53-english/model.safetensors)",
)

from .encoder_formats import ENCODER_SPECS  # noqa: E402  (written by the encoder modules; import nothing from here)
from .presets import PRESETS  # noqa: E402

FAMILY = Family(
    name="wan",
    specs=(
        DIT_SPEC,
        S2V_DIT_SPEC,
        ANIMATE2_DIT_SPEC,
        DANCER_DIT_SPEC,
        LONGCAT_DIT_SPEC,
        WAV2VEC_SPEC,
        MOTION_CONTROLLER_SPEC,
        VAP_SPEC,
        *ENCODER_SPECS,
    ),
    presets=PRESETS,
    pipeline="diffsynth.wan.pipeline:WanVideoPipeline",
    training="diffsynth.wan.training:WanTrainingTask",
    lora_converter="diffsynth.wan.lora:convert_wan_naming",
    description="Wan 2.1 / 2.2 video generation (Wan-AI): T2V, I2V, TI2V, VACE, Fun, Animate, Animate-2, S2V and Dancer DiTs, speed control, UMT5-XXL text encoder, "
    "open-clip XLM-R image encoder, causal 3D VAEs",
)
