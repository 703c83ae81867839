"""Insert Anything in FLUX.1's training task: four pictures made into a Fill + Redux row.

Insert Anything (DiffSynth-Studio's lora/Insert-Anything.sh, on FLUX.1-Fill-dev + Redux): a row's
`insert_anything_source_image`, `_source_mask`, `_ref_image` and `_ref_mask` (each read at its own size) become the
pipeline's Insert Anything inputs (`flux1.insert_anything.prepare_insert_anything`, halves of
`insert_anything_size` = 768 pixels): the diptych [masked reference | source crop] with its mask as the Fill
condition, the masked reference's Redux tokens after zero text states as the prompt. The target is the whole
unmasked diptych, as DiffSynth-Studio's unit sets the input image in training (the source image already shows the
object in place): the row's own `image` and prompt are not read. The pipeline's `insert_anything_*` call uses a
LoRA trained so in the place of the authors' one (which the HuanJue/Insert-Anything preset fuses). Validation
samples are not drawn for it (the call takes four pictures and no prompt).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.media import pil_to_tensor

from ..flux1.channels import FILL, condition_kind, describe_widths
from .channels import CHANNEL_COLUMNS
from .redux import REDUX_COLUMN, REDUX_HINT
from .rows import has, row_picture

if TYPE_CHECKING:
    from ..training import FluxTrainingTask


# Insert Anything's four pictures (DiffSynth-Studio's --extra_inputs; the pipeline's arguments)
INSERT_COLUMNS = (
    "insert_anything_source_image",
    "insert_anything_source_mask",
    "insert_anything_ref_image",
    "insert_anything_ref_mask",
)
INSERT_SIZE = 768  # the side of each half of the diptych (the authors', `flux1.insert_anything.SIZE`)
REDUX_CONDITIONING = (REDUX_COLUMN, *INSERT_COLUMNS)  # Redux's and Insert Anything's pictures: each at its own size
INSERT_MARK = "_insert_anything"  # an encoded row's mark: its prompt is the authors' zero text states


def insert_anything_row(task: FluxTrainingTask, index: int, row: Mapping[str, Any]) -> Mapping[str, Any]:
    """A row with Insert Anything's four pictures as the Fill + Redux row the pipeline's preparation makes of
    them (`prepare_insert_anything`): the diptych [masked reference | source crop] as `flux_fill_image` and as
    the target `image` (DiffSynth-Studio trains on the diptych itself: the source image already holds the
    object), its mask, and the masked reference as `flux_redux_image`; the row's own image and prompt are not
    read (zero text states, as the pipeline's). Other rows as they are."""
    from ..flux1.insert_anything import prepare_insert_anything

    given = [column for column in INSERT_COLUMNS if has(row, column)]
    if not given:
        return row
    where = f"row {index} of the batch"
    if len(given) < len(INSERT_COLUMNS):
        missing = [column for column in INSERT_COLUMNS if column not in given]
        raise ConfigError(
            f"{where} has {', '.join(given)} but no {', '.join(missing)}: Insert Anything trains on all four "
            f"(list them in --data_file_keys, e.g. --data_file_keys image,{','.join(INSERT_COLUMNS)})"
        )
    others = [c for c in (*CHANNEL_COLUMNS[FILL], REDUX_COLUMN, "control_image", "kontext_images") if has(row, c)]
    if others:
        raise ConfigError(
            f"{where} has insert_anything_* with {', '.join(others)}; Insert Anything makes the Fill and Redux "
            "inputs itself: drop them"
        )
    config = task.pipe.dit.config if task.pipe.dit is not None else task.dit_config
    if config is not None and condition_kind(config) != FILL:
        raise ConfigError(
            f"{where} has insert_anything_*, which need a FLUX.1 Fill DiT (black-forest-labs/FLUX.1-Fill-dev: "
            f"flux1-fill-dev.safetensors); this is {describe_widths(config)}"
        )
    if task.pipe.flux_redux is None or task.pipe.flux_redux_image_encoder is None:
        raise ConfigError(
            f"{where}: insert_anything_ref_image is read by FLUX.1 Redux, which is not among the models: {REDUX_HINT}"
        )
    pictures = [row_picture(index, row, column) for column in INSERT_COLUMNS]
    try:
        insert = prepare_insert_anything(*pictures, size=task.insert_anything_size)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    out = {k: v for k, v in row.items() if k not in INSERT_COLUMNS}
    return {
        **out,
        "prompt": "",
        "image": pil_to_tensor(insert.fill_image)[0],
        CHANNEL_COLUMNS[FILL][0]: insert.fill_image,
        CHANNEL_COLUMNS[FILL][1]: insert.fill_mask,
        REDUX_COLUMN: insert.redux_image,
        INSERT_MARK: True,
    }
