"""EliGen in FLUX.1's training task: entity prompts and their regions.

EliGen (DiffSynth-Studio's lora/FLUX.1-dev-EliGen.sh; its `--extra_inputs` are not needed: every column reaches
the task): a row's `eligen_entity_prompts` (a JSON list of strings) and `eligen_entity_masks` (a JSON list of mask
files, white = the entity, listed in `--data_file_keys` so the dataset reads them at the row's size) are encoded by
the pipeline's `prepare_eligen` for its positive branch at the target's size: each entity prompt's T5 states
(`"eligen_t5"` [N, L, D], the prompt's length) and the masks' token regions (`"eligen_regions"` [N, H/16 * W/16],
bool). `velocity` hands them to `flux_velocity` as the pipeline's `EliGenEntities` (entity text before the prompt's,
the joint attention mask). Rows of one batch stack only with the same entity count (DiffSynth-Studio trains with
`--batch_size 1`). EliGen rows take no AttriCtrl values (the pipeline does not combine the two).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from diffsynth.runtime.errors import ConfigError, preview

from ..flux1.eligen import check_entity_inputs
from .rows import has, picture

if TYPE_CHECKING:
    from ..training import FluxTrainingTask


ELIGEN_COLUMNS = ("eligen_entity_prompts", "eligen_entity_masks")  # DiffSynth-Studio's --extra_inputs


def encode_entities(task: FluxTrainingTask, index: int, row: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """`{"eligen_t5": [N, L, D], "eligen_regions": [N, H/16 * W/16]}` for a row with EliGen entities (none
    without): the pipeline's `prepare_eligen` for its positive branch at the target's size."""
    entities = row_entities(index, row)
    if entities is None:
        return {}
    _, height, width = row["image"].shape
    positive, _ = task.pipe.prepare_eligen(*entities, None, False, height, width, task.t5_sequence_length)
    return {"eligen_t5": positive.t5[0], "eligen_regions": positive.regions[0]}


def row_entities(index: int, row: Mapping[str, Any]) -> tuple[list[str], list[Image.Image]] | None:
    """A row's EliGen entity prompts and masks (RGB pictures at the row's size) as the pipeline checks them, or None
    for a row without any; one column without the other, or counts that differ, are errors naming the row."""
    entities = entity_columns(row, f"row {index} of the batch (prompt {str(row['prompt'])[:60]!r})")
    if entities is None:
        return None
    prompts, masks = entities
    pictures = [picture(index, m, f"eligen_entity_masks[{k}]", "eligen_entity_masks") for k, m in enumerate(masks)]
    return check_entity_inputs(prompts, pictures)


def check_entity_row(row: Mapping[str, Any], size: Any) -> None:
    """A metadata row's EliGen columns checked at setup (the task's `check_row`): both or neither, one mask per
    entity prompt, each mask a readable picture (`size(column, name)` reads its header), so that a bad row stops
    the run before training rather than when its batch comes. The dataset puts the file and row in front."""
    entities = entity_columns(row, "")
    for mask in entities[1] if entities is not None else ():
        if isinstance(mask, (str, os.PathLike)):
            size(ELIGEN_COLUMNS[1], str(mask))


def entity_columns(row: Mapping[str, Any], where: str) -> tuple[list[str], list[Any]] | None:
    """A row's entity prompts and masks (as given: paths or pictures), None for a row without either; one column
    without the other, prompts that are not strings, or counts that differ are errors starting with `where` (empty
    at setup, where the dataset names the metadata file and row)."""
    given = [has(row, column) for column in ELIGEN_COLUMNS]
    if not any(given):
        return None
    lead = f"{where} " if where else ""
    if not all(given):
        have, lack = ELIGEN_COLUMNS if given[0] else ELIGEN_COLUMNS[::-1]
        raise ConfigError(
            f"{lead}has {have} but no {lack}: EliGen trains on one mask (white = the entity's region) per entity "
            "prompt (the masks listed in --data_file_keys, e.g. --data_file_keys image,eligen_entity_masks)"
        )
    prompts, masks = (row[column] for column in ELIGEN_COLUMNS)
    prompts = [prompts] if isinstance(prompts, str) else prompts
    masks = list(masks) if isinstance(masks, (list, tuple)) else [masks]
    if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
        raise ConfigError(f"{lead}eligen_entity_prompts must be a list of strings, got {preview(prompts)}")
    if len(prompts) != len(masks):
        raise ConfigError(
            f"{lead}has {len(prompts)} eligen_entity_prompts and {len(masks)} eligen_entity_masks; give one mask "
            "per entity prompt, in the same order"
        )
    return list(prompts), masks


def collate_entities(samples: list[Mapping[str, torch.Tensor]]) -> dict[str, Any]:
    """The rows' EliGen entity states and regions stacked (none for a batch without); one entity count per batch."""
    batch: dict[str, Any] = {}
    if "eligen_t5" in samples[0]:
        counts = [s["eligen_t5"].shape[0] for s in samples]
        if len(set(counts)) > 1:
            raise ConfigError(
                f"the rows of a batch have {counts} EliGen entities; rows with different entity counts cannot "
                "share a batch: train with --batch_size 1 (as DiffSynth-Studio does)"
            )
        batch["eligen_t5"] = torch.stack([s["eligen_t5"] for s in samples])
        batch["eligen_regions"] = torch.stack([s["eligen_regions"] for s in samples])
    return batch
