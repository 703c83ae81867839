"""FLUX.1 Redux in FLUX.1's training task: a reference picture's tokens after the prompt.

FLUX.1 Redux (DiffSynth-Studio's lora/ and full/FLUX.1-Redux-dev.sh): with the Redux embedder and its SigLIP image
encoder among the model files (`flux1-redux-dev.safetensors` or diffusers' `image_embedder/`; loaded with the
encoders through the pipeline's `load_redux`, frozen), a row's `flux_redux_image` (one picture or a list, read at
its own size: it is one of the `conditioning` columns; optional `flux_redux_scale` / `flux_redux_pooled_scale`,
default 1) is encoded as the pipeline's `prepare_redux` extends the positive prompt: `"t5"` [L + T, D] (the prompt's
states, then the image's T tokens) and `"pooled"` as weighted there. The model call is the plain one with that
prompt. Like the pipeline (and BFL's reference) the prompt is encoded; DiffSynth-Studio's unit puts zeros in its
place. Rows with and without the column share no batch (their prompts differ in length).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.pipeline import weight_paths

from ..flux1.text_encoder import FluxPromptEmbeds
from .rows import picture

if TYPE_CHECKING:
    from ..training import FluxTrainingTask


REDUX_COLUMN = "flux_redux_image"  # FLUX.1 Redux's reference image(s) (DiffSynth-Studio's --extra_inputs)
REDUX_SCALES = ("flux_redux_scale", "flux_redux_pooled_scale")  # the pipeline's optional weights, per row
REDUX_HINT = (
    "add the Redux embedder and its SigLIP image encoder to the models (e.g. --model_id_with_origin_paths "
    "black-forest-labs/FLUX.1-Redux-dev:image_encoder/model.safetensors,black-forest-labs/FLUX.1-Redux-dev:"
    "image_embedder/diffusion_pytorch_model.safetensors)"
)


def encode_redux(
    task: FluxTrainingTask, index: int, row: Mapping[str, Any], sample: Mapping[str, torch.Tensor]
) -> dict:
    """`{"t5": [L + T, D], "pooled": [D']}`: the row's prompt with the Redux tokens of its reference image(s)
    appended, as the pipeline's `prepare_redux` gives the positive prompt (`flux_redux_scale` /
    `flux_redux_pooled_scale` when the row has them, else 1)."""
    where = f"row {index} of the batch (prompt {str(row['prompt'])[:60]!r})"
    pipe = task.pipe
    if pipe.flux_redux is None or pipe.flux_redux_image_encoder is None:
        raise ConfigError(f"{where} has {REDUX_COLUMN}, but FLUX.1 Redux is not among the models: {REDUX_HINT}")
    value = row[REDUX_COLUMN]
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    names = [REDUX_COLUMN] if len(values) == 1 else [f"{REDUX_COLUMN}[{k}]" for k in range(len(values))]
    images = [picture(index, v, name, REDUX_COLUMN) for v, name in zip(values, names, strict=True)]
    scales = [redux_scale(row.get(column), f"{where}: {column}") for column in REDUX_SCALES]
    try:
        checked = pipe.check_redux_inputs(images, *scales)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    text = FluxPromptEmbeds(sample["t5"][None], sample["pooled"][None])
    text = pipe.prepare_redux(text, *checked)
    return {"t5": text.t5[0], "pooled": text.pooled[0]}


def redux_scale(value: Any, where: str) -> float | list[float]:
    """A row's Redux scale as the pipeline takes it: 1 when absent; a number, a CSV cell's text ("0.8", or
    "0.8,0.5" for several images) or a list, one per image."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return 1.0
    if not isinstance(value, str):
        return value  # the pipeline's `check_scales` says what it takes
    try:
        parsed = [float(item) for item in value.strip().strip("[]").replace(",", " ").split()]
    except ValueError:
        raise ConfigError(f"{where} {value!r} is not a number (or a list of numbers, one per image)") from None
    return parsed[0] if len(parsed) == 1 else parsed


def redux_sources(model_configs: Sequence[ModelConfig]) -> tuple[tuple | None, list[ModelConfig]]:
    """The Redux embedder and the SigLIP image encoder listed with it (`(redux, encoder or None)`, None without a
    Redux embedder), and the other model configs, which load as the other slots do."""
    from ..flux1.ip_adapter import source_part
    from ..flux1.redux import is_redux_file

    redux = [is_redux_file(weight_paths(config)) for config in model_configs]
    found = [config for config, is_redux in zip(model_configs, redux, strict=True) if is_redux]
    if not found:
        return None, list(model_configs)
    rest = [config for config, is_redux in zip(model_configs, redux, strict=True) if not is_redux]
    if len(found) > 1:
        raise ConfigError(f"the model files hold {len(found)} FLUX.1 Redux embedders ({found}); give one")
    encoder = [source_part(weight_paths(config)) == "image_encoder" for config in rest]
    encoders = [config for config, is_encoder in zip(rest, encoder, strict=True) if is_encoder]
    if len(encoders) > 1:
        raise ConfigError(
            f"the model files hold {len(encoders)} image encoders for FLUX.1 Redux ({encoders}); give one"
        )
    return (found[0], encoders[0] if encoders else None), [c for c, e in zip(rest, encoder, strict=True) if not e]
