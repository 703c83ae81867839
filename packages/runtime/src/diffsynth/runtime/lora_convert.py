"""`diffsynth lora convert`: a LoRA file written back out in another naming.

Our loaders read every naming people share (diffusers / peft, kohya, XLabs, ComfyUI) and convert it to our module
names, which are the official checkpoint names. This goes the other way for files: `to="official"` writes those
names (what ComfyUI, the original repos and kohya-style tools read), `to="diffusers"` diffusers' module names under
`transformer.` (what diffusers' `load_lora_weights` reads), `to="comfyui"` the names ComfyUI's own model uses, in peft
keys under `diffusion_model.` by default (for FLUX and Wan the official names; Z-Image's is Lumina's NextDiT layout,
with a fused `attention.qkv`). The renaming is the family's own (fused layers, swapped
halves), reached through its registry entry (`Family.lora_converter`): the runtime imports no family package.
The file keeps the input's safetensors header (less what the rewrite makes wrong, `lora_tools.carried_header`:
diffusers' alphas are folded into the tensors) and its dtype; text-encoder entries are refused unless dropped.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace

import torch

from .errors import ConfigError, LoRAError
from .lora import SAVE_FORMATS, LoRAWeights, read_lora_header, save_lora
from .registry import installed_families

logger = logging.getLogger(__name__)

NAMINGS = ("official", "diffusers", "comfyui")
DIFFUSERS_PREFIX = "transformer."  # diffusers' pipelines hand `transformer.*` keys to the denoiser


def convert_lora_naming(lora: str | os.PathLike, family: str, to: str = "official") -> LoRAWeights:
    """The LoRA file `lora` read by `family`'s converter and renamed to the naming `to` (one of `NAMINGS`)."""
    if to not in NAMINGS:
        raise ConfigError(f"--to {to!r} is not a LoRA naming; accepted: {', '.join(NAMINGS)}")
    families = installed_families()
    with_converter = sorted(name for name, fam in families.items() if fam.lora_converter is not None)
    if family not in families:
        raise ConfigError(
            f"--family {family!r} is not an installed model family; installed: {', '.join(sorted(families))} "
            f"(LoRA conversion: {', '.join(with_converter)})"
        )
    if families[family].lora_converter is None:
        raise ConfigError(
            f"--family {family!r} has no LoRA naming converter (its LoRAs are read in our names as they are); "
            f"families with one: {', '.join(with_converter)}"
        )
    return families[family].lora_converter_function()(lora, to=to)


def convert_lora_file(
    lora: str | os.PathLike,
    output: str | os.PathLike,
    family: str,
    to: str = "official",
    format: str | None = None,
    *,
    dtype: torch.dtype | None = None,
    drop_text_encoder: bool = False,
) -> LoRAWeights:
    """Write `lora` in the naming `to` as `output`, in the key layout `format` (`save_lora`'s; default diffsynth
    for official names, peft with the `transformer.` prefix for diffusers names, peft with `diffusion_model.` for
    ComfyUI's), in `dtype` (default the input's). A file that also changes text encoders is refused unless
    `drop_text_encoder`. Returns what was written."""
    from .lora_tools import carried_header, cast_targets, lora_dtype, refuse_text_encoder

    if format is not None and format not in SAVE_FORMATS:
        raise ConfigError(f"--format {format!r} is not a LoRA key layout; accepted: {', '.join(SAVE_FORMATS)}")
    prefix = None
    if to == "diffusers":
        format = format or "peft"
        if format == "kohya":
            raise ConfigError(
                "--format kohya writes official names (lora_unet_double_blocks_0_...); with --to diffusers use "
                "--format peft (transformer.<name>, what diffusers loads) or diffsynth (no prefix)"
            )
        prefix = DIFFUSERS_PREFIX if format == "peft" else ""
    elif to == "comfyui":
        format = format or "peft"  # save_lora's peft prefix is `diffusion_model.`, ComfyUI's
    converted = convert_lora_naming(lora, family, to)
    if not drop_text_encoder:
        refuse_text_encoder(converted, "lora convert")
    if not converted.targets:
        raise LoRAError(f"{converted.source} has no LoRA targets left to write")
    written_dtype = dtype or lora_dtype(converted)
    converted = LoRAWeights(
        cast_targets({name: replace(t) for name, t in converted.targets.items()}, written_dtype),
        converted.source,
        keys=dict(converted.keys),
        header=carried_header(read_lora_header(lora)),
    )
    save_lora(converted, output, format=format or "diffsynth", prefix=prefix, metadata=converted.header)
    return converted
