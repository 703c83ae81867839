"""How Qwen-Image 2.1 DiT checkpoints are recognised and configured.

Our DiT uses the official diffusers names (`transformer/` folder of Qwen/Qwen-Image-2.1), so that layout
loads as is; the same keys under `model.diffusion_model.` (ComfyUI single files) are accepted too. The
signature holds keys only 2.1 has (the shared `modulation`, the zero-centred text norm, the SwiGLU gate),
and none of Qwen-Image 2.0's (`txt_norm`, `add_q_proj`, `img_mod`), so neither spec claims the other's files.
"""

from __future__ import annotations

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.registry import KeyLayout, ModelSpec, StateDict, build_config, merge_fields

from .dit import QwenImage21DiT, QwenImage21DiTConfig

PREFIX = "model.diffusion_model."

SIGNATURE = (
    "time_text_embed.timestep_embedder.linear_1.weight",
    "txt_in.text_norm.weight",
    "txt_in.in_layer.weight",
    "img_in.weight",
    "modulation.1.weight",
    "transformer_blocks.0.attn.norm_q.weight",
    "transformer_blocks.0.img_mlp.gate_layer.weight",
    "norm_out.linear.weight",
    "proj_out.weight",
)
_OWNS = ("time_text_embed.", "txt_in.", "img_in.", "modulation.", "transformer_blocks.", "norm_out.", "proj_out.")

LAYOUTS = (
    KeyLayout("diffusers", SIGNATURE, owns_prefixes=_OWNS),
    KeyLayout("diffusers_prefixed", SIGNATURE, prefix=PREFIX, owns_prefixes=_OWNS),
)

LABEL = "Qwen-Image 2.1 DiT"

# diffusers config.json fields we read (same names as our config)
_JSON_FIELDS = (
    "patch_size",
    "in_channels",
    "out_channels",
    "num_layers",
    "attention_head_dim",
    "num_attention_heads",
    "context_in_dim",
    "mlp_ratio",
    "axes_dims_rope",
    "eps",
    "causal_condition",
)


def _fields_from_json(config_json: dict) -> dict:
    given = {name: config_json[name] for name in _JSON_FIELDS if config_json.get(name) is not None}
    if "axes_dims_rope" in given:
        given["axes_dims_rope"] = tuple(given["axes_dims_rope"])
    return given


def _divide(total: int, part: int, what: str) -> int:
    if total % part:
        raise ConfigError(f"{LABEL}: {what} ({total}) is not a multiple of {part}")
    return total // part


def _fields_from_shapes(state: StateDict, patch_size: int) -> dict:
    inner, token_dim = state["img_in.weight"].shape
    head_dim = state["transformer_blocks.0.attn.norm_q.weight"].shape[0]
    hidden = state["transformer_blocks.0.img_mlp.gate_layer.weight"].shape[0]
    cells = patch_size * patch_size
    n = 0
    while f"transformer_blocks.{n}.attn.to_q.weight" in state:
        n += 1
    return dict(
        in_channels=_divide(token_dim, cells, "img_in's input width (in_channels * patch_size**2)"),
        out_channels=_divide(
            state["proj_out.weight"].shape[0], cells, "proj_out's width (out_channels * patch_size**2)"
        ),
        num_layers=n,
        attention_head_dim=head_dim,
        num_attention_heads=_divide(inner, head_dim, "the model width over the q-norm width"),
        context_in_dim=state["txt_in.in_layer.weight"].shape[1],
        mlp_ratio=_divide(hidden, inner, "the SwiGLU width over the model width"),
    )


def config_from_state(state: StateDict, config_json: dict | None = None) -> QwenImage21DiTConfig:
    """Config from our-named shapes and, when present, the diffusers `config.json` beside the file.

    Shapes give the channels, the text width, heads (the model width over the q-norm width), the layer count
    and the MLP ratio; the patch size, RoPE axes, eps and `causal_condition` come from the json or the released
    defaults. A json value that contradicts the shapes is an error naming the field. An empty `state` uses
    the json alone.
    """
    given = _fields_from_json(config_json) if config_json else {}
    patch = int(given.get("patch_size", QwenImage21DiTConfig.patch_size))
    derived = _fields_from_shapes(state, patch) if state else {}
    return build_config(QwenImage21DiTConfig, LABEL, merge_fields(LABEL, given, derived))


DIT21_SPEC = ModelSpec(
    name="qwen_image21_dit",
    role="dit",
    layouts=LAYOUTS,
    config_from_state=config_from_state,
    build=QwenImage21DiT,
    description="Qwen-Image 2.1 single-stream block-causal DiT (diffusers `transformer/` folder, prefixed single files)",
)
