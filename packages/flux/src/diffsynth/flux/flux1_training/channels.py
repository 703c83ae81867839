"""FLUX.1 Tools (Fill, Canny / Depth) and Flex.2 in FLUX.1's training task: the condition concatenated to the noisy
tokens.

FLUX.1 Tools DiTs with a wider input (`flux1/channels.py`) train on rows with their condition, in the pipeline's
argument names (DiffSynth-Studio's for Fill): FLUX.1-Fill-dev `"flux_fill_image"` + `"flux_fill_mask"` (white =
repaint), FLUX.1-Canny-dev / -Depth-dev (or FLUX.1-dev with their control LoRA fused by the trainer's
`--preset_lora_path`, which `read_lora` widens `img_in` for) `"control_image"` (the edge or depth map itself: no
annotator runs). They are pictures aligned with the target, so the dataset reads them at the row's size: list them
in `--data_file_keys` (as DiffSynth-Studio's `image,flux_fill_image,flux_fill_mask`); tensors [3, H, W] in [-1, 1]
(or PIL images) work too. Each is encoded by the pipeline's `encode_channel_condition` at the target's size (8-bit
pictures resized Lanczos, the mask binarised at 0.5, the masked image or the map VAE-encoded and packed, the mask
folded), giving `"condition"` `[H/16 * W/16, 320]` (Fill) or `[.., 64]` (Canny/Depth), which `flux_velocity`
concatenates to every noisy token. The DiT says which condition it takes (`condition_kind`: from the loaded DiT,
or its files' header when only the encoders load) and rows without it are refused naming the column; with no DiT
to ask, the rows' columns decide, and `velocity` refuses a condition the DiT does not take. Validation samples
need `--validation_images`: the image to fill and its mask (`"image.png,mask.png"`), or the control map.
Flex.2 (`flux1/flex.py`) trains on images and prompts alone, as DiffSynth-Studio trains it: its condition is the empty
one (no inpainting image, a mask of ones, no control map), and its validation samples are plain text-to-image calls.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.media import load_image

from ..flux1.channels import CONTROL, FILL, condition_kind, describe_widths
from ..reference_batches import row_references
from .rows import has, row_picture

if TYPE_CHECKING:
    from ..training import FluxTrainingTask


# the row columns of each wider-input DiT's condition (the pipeline's arguments), and the condition's width
CHANNEL_COLUMNS = {FILL: ("flux_fill_image", "flux_fill_mask"), CONTROL: ("control_image",)}
CHANNEL_MODELS = {FILL: "FLUX.1 Fill", CONTROL: "FLUX.1 Canny/Depth"}
CONDITION_WIDTHS = {320: FILL, 64: CONTROL}


def row_channel_kind(task: FluxTrainingTask, index: int, row: Mapping[str, Any]) -> str | None:
    """The wider-input condition a row gives (FILL, CONTROL or None), checked against what the DiT takes."""
    given = {kind for kind, columns in CHANNEL_COLUMNS.items() for c in columns if has(row, c)}
    where = f"row {index} of the batch (prompt {str(row['prompt'])[:60]!r})"
    if len(given) > 1:
        raise ConfigError(
            f"{where} has both flux_fill_image / flux_fill_mask and control_image; they go to different DiTs "
            "(Fill, Canny/Depth): give the columns of the model trained"
        )
    kind = task.channel_kind
    row_kind = given.pop() if given else None
    if kind is not None:
        missing = [c for c in CHANNEL_COLUMNS[kind] if not has(row, c)]
        if missing:
            raise ConfigError(
                f"{where} has no {' and no '.join(missing)}: a {CHANNEL_MODELS[kind]} model trains on rows with "
                f"image, prompt and {', '.join(CHANNEL_COLUMNS[kind])} (list them in --data_file_keys, e.g. "
                f"--data_file_keys image,{','.join(CHANNEL_COLUMNS[kind])}); its columns are {', '.join(row)}"
            )
    elif row_kind == FILL:
        missing = [c for c in CHANNEL_COLUMNS[FILL] if not has(row, c)]
        if missing:
            raise ConfigError(
                f"{where} has no {missing[0]}: a FLUX.1 Fill model trains on flux_fill_image and flux_fill_mask "
                "(white = repaint)"
            )
        config = task.pipe.dit.config if task.pipe.dit is not None else task.dit_config
        if config is not None:  # a plain DiT: no LoRA makes it a Fill one
            raise ConfigError(
                f"{where} has flux_fill_image / flux_fill_mask, which need a FLUX.1 Fill DiT (in_channels 384, "
                f"e.g. black-forest-labs/FLUX.1-Fill-dev); this is {describe_widths(config)}"
            )
    if row_kind is not None and row_references(row, "kontext_images"):
        raise ConfigError(
            f"{where} has kontext_images with {', '.join(CHANNEL_COLUMNS[row_kind])}; "
            "a Fill / Canny / Depth DiT takes no Kontext references"
        )
    return row_kind


def encode_condition(task: FluxTrainingTask, index: int, row: Mapping[str, Any], kind: str) -> torch.Tensor:
    """`[H/16 * W/16, 320 or 64]`: the row's Fill image and mask or control map as the pipeline encodes them
    for an output of the target's size (`encode_channel_condition`)."""
    _, height, width = row["image"].shape
    pictures = [row_picture(index, row, column) for column in CHANNEL_COLUMNS[kind]]
    images = [load_image(pictures[0])]
    masks = [pictures[1].convert("L")] if kind == FILL else []
    return task.pipe.encode_channel_condition((kind, images, masks), 1, height, width)[0]


def check_condition(task: FluxTrainingTask, dit: nn.Module, condition: torch.Tensor | None) -> None:
    """The batch's condition is the one the DiT (as trained: a fused control LoRA widens it) takes."""
    config = getattr(getattr(dit, "module", dit), "config", None)  # DDP wraps the DiT
    config = config if config is not None and hasattr(config, "in_channels") else task.pipe.dit.config
    extra = config.in_channels - config.out_channels
    width = 0 if condition is None else condition.shape[-1]
    if width == extra:
        return
    kind = condition_kind(config)
    if condition is None:
        raise ConfigError(
            f"this is {describe_widths(config)}: its batches need {' + '.join(CHANNEL_COLUMNS.get(kind, ()))} "
            "(a cache encoded for another model has none; encode it again)"
        )
    given = CONDITION_WIDTHS.get(width)
    columns = " + ".join(CHANNEL_COLUMNS[given]) if given else f"a {width}-wide condition"
    hint = (
        "; to train on FLUX.1-dev with a Canny / Depth control LoRA, give it as --preset_lora_path"
        if given == CONTROL and kind is None
        else ""
    )
    raise ConfigError(f"the batch has {columns}, which {describe_widths(config)} does not take{hint}")


def collate_conditions(samples: list[Mapping[str, torch.Tensor]]) -> dict[str, Any]:
    """The rows' Fill / Canny / Depth conditions stacked (none for a batch without); every row has one or none does."""
    batch: dict[str, Any] = {}
    with_condition = sum("condition" in s for s in samples)
    if with_condition == len(samples):
        batch["condition"] = torch.stack([s["condition"] for s in samples])
    elif with_condition:
        raise ConfigError(
            f"a batch mixes {with_condition} rows with a Fill / Canny / Depth condition and "
            f"{len(samples) - with_condition} without; give every row its flux_fill_image + flux_fill_mask or "
            "control_image"
        )
    return batch
