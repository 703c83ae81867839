"""How LTX-2 latent upsampler checkpoints are recognised and configured.

`ltx-2-spatial-upscaler-x2-1.0.safetensors` and diffusers' `latent_upsampler/` folder hold the same keys
(diffusers' conversion loads the original file strictly), and they are ours: no conversion. Shapes give the
channels, the block count, the conv dimensionality and the kind of upsampling step; the rational
resampler's scale is read from its conv (num^2 x channels: x2 and x4 are exact, num = 3 is taken as the
x1.5 model unless a config says 0.75). A diffusers `config.json` (`rational_spatial_scale`,
`use_rational_resampler`, ...) is read when present.
"""

from __future__ import annotations

import logging
import math
import re

from diffsynth.runtime.errors import CheckpointError
from diffsynth.runtime.registry import KeyLayout, ModelSpec, StateDict, build_config, merge_fields

from .upsampler import LTX2LatentUpsampler, LTX2LatentUpsamplerConfig

logger = logging.getLogger(__name__)

SIGNATURE = ("initial_conv.weight", "res_blocks.0.conv1.weight", "post_upsample_res_blocks.0.conv1.weight")
OWNS = ("initial_conv.", "initial_norm.", "res_blocks.", "upsampler.", "post_upsample_res_blocks.", "final_conv.")
LAYOUTS = (KeyLayout("original", SIGNATURE, owns_prefixes=OWNS),)
_SCALE_OF_NUM = {2: 2.0, 3: 1.5, 4: 4.0}
_DIFFUSERS_CLASS = "LTX2LatentUpsamplerModel"
_JSON_FIELDS = {
    "in_channels": "in_channels",
    "mid_channels": "mid_channels",
    "num_blocks_per_stage": "num_blocks_per_stage",
    "dims": "dims",
    "spatial_upsample": "spatial_upsample",
    "temporal_upsample": "temporal_upsample",
    "rational_spatial_scale": "spatial_scale",
    "use_rational_resampler": "rational_resampler",
    # ltx-core's own header config names
    "spatial_scale": "spatial_scale",
    "rational_resampler": "rational_resampler",
}


def _shape(state: StateDict, key: str) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(f"LTX-2 latent upsampler checkpoint has no {key!r}; cannot derive its config")
    return tuple(state[key].shape)


def _fields_from_shapes(state: StateDict) -> dict:
    stem = _shape(state, "initial_conv.weight")
    mid, in_channels = stem[:2]
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"res_blocks\.(\d+)\.", k))}
    fields = dict(in_channels=in_channels, mid_channels=mid, num_blocks_per_stage=len(blocks), dims=len(stem) - 2)
    if "upsampler.conv.weight" in state:  # rational resampler: conv to num^2 x mid
        ratio = _shape(state, "upsampler.conv.weight")[0] // mid
        num = math.isqrt(ratio)
        if num * num != ratio or num not in _SCALE_OF_NUM:
            raise CheckpointError(
                f"LTX-2 latent upsampler: upsampler.conv has {ratio} x {mid} output channels, not the square of "
                f"a supported factor ({sorted(_SCALE_OF_NUM)})"
            )
        fields.update(spatial_upsample=True, temporal_upsample=False, rational_resampler=True)
        fields["_scale"] = _SCALE_OF_NUM[num]
    else:
        weight = _shape(state, "upsampler.0.weight")
        ratio = weight[0] // mid
        kinds = {(4, 4): (True, False), (5, 2): (False, True), (5, 8): (True, True)}  # (ndim, ratio)
        if (len(weight), ratio) not in kinds:
            raise CheckpointError(
                f"LTX-2 latent upsampler: upsampler.0.weight {weight} is no known upsampling step (a 2-D conv to "
                "4x channels, or a 3-D conv to 2x / 8x)"
            )
        spatial, temporal = kinds[(len(weight), ratio)]
        fields.update(spatial_upsample=spatial, temporal_upsample=temporal, rational_resampler=False)
    return fields


def _fields_from_json(config_json: dict | None) -> dict:
    if not config_json or config_json.get("_class_name", _DIFFUSERS_CLASS) != _DIFFUSERS_CLASS:
        if config_json:
            logger.debug("ignoring config.json of %r: not an LTX-2 latent upsampler", config_json.get("_class_name"))
        return {}
    return {ours: config_json[name] for name, ours in _JSON_FIELDS.items() if config_json.get(name) is not None}


def config_from_state(state: StateDict, config_json: dict | None = None) -> LTX2LatentUpsamplerConfig:
    """Config from the (meta) shapes and, when present, a diffusers `config.json` (an empty `state` uses the
    json alone); a json that disagrees with the shapes is an error naming the field."""
    given = _fields_from_json(config_json)
    derived = _fields_from_shapes(state) if state else {}
    scale = derived.pop("_scale", None)
    if derived.get("temporal_upsample"):  # diffusers writes its rational default even where it has no effect
        given.pop("rational_resampler", None)
    fields = merge_fields("LTX-2 latent upsampler", given, derived)
    if scale is not None and "spatial_scale" not in given:
        fields["spatial_scale"] = scale
    return build_config(LTX2LatentUpsamplerConfig, "LTX-2 latent upsampler", fields)


LTX2_UPSAMPLER_SPEC = ModelSpec(
    name="ltx2_latent_upsampler",
    role="upsampler",
    layouts=LAYOUTS,
    config_from_state=config_from_state,
    build=LTX2LatentUpsampler,
    description="LTX-2 latent upsampler, video latents at 2x width and height for the second stage "
    "(ltx-2-spatial-upscaler-x2-1.0.safetensors; diffusers LTX2LatentUpsamplerModel latent_upsampler/)",
)

__all__ = ["LAYOUTS", "LTX2_UPSAMPLER_SPEC", "SIGNATURE", "config_from_state"]
