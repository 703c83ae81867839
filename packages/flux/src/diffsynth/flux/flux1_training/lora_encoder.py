"""The LoRA Encoder in FLUX.1's training task: LoRA files as prompt tokens.

LoRA Encoder (DiffSynth-Studio's full/FLUX.1-dev-LoRA-Encoder.sh): with the encoder (DiffSynth-Studio/LoRA-Encoder-
FLUX.1-Dev's `model.safetensors`) among the model files, a row's `lora_encoder_inputs` is a LoRA file of the DiT (a
path, a hub name such as "Org/Repo:file.safetensors", or a list of them; a CSV cell may hold a JSON list), as the
pipeline's argument: relative paths are taken from the working directory, as DiffSynth-Studio's
`ModelConfig(path=...)` takes them (the column is not a `--data_file_keys` one). The encoder is what trains, so
nothing it computes can be cached: the cache keeps the LoRA files' absolute paths (`"lora_encoder_inputs"`, their
JSON as UTF-8 bytes; the files must stay where they are), and `velocity` reads each LoRA as the pipeline's
`prepare_lora_encoding` does (`read_lora` onto the DiT's layers; the last few read are kept in memory), runs the
encoder and appends its tokens (one per LoRA) to the prompt's T5 states. As in DiffSynth-Studio's training the LoRA
is not applied to the DiT: the encoder learns a token that makes the frozen base model draw what the LoRA draws.
`trained_model="lora_encoder"` (`--trainable_models lora_encoder`) trains the encoder in full under the frozen DiT,
saved as `<step>/lora_encoder/diffusion_pytorch_model.safetensors` in the released keys (`embedder.model_dict.
blocks___0___...`), which `load_lora_encoder` reads; a DiT LoRA trains under the frozen encoder. Validation samples
take `--task_options validation_lora_encoder_inputs=FILE`. Rows of one batch share their number of LoRAs.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.hub import ModelConfig

from ..flux1.text_encoder import FluxPromptEmbeds

if TYPE_CHECKING:
    from ..training import FluxTrainingTask


LORA_ENCODER_COLUMN = "lora_encoder_inputs"  # the LoRA Encoder's LoRA file(s) (DiffSynth-Studio's --extra_inputs)
LORA_CACHE = 4  # LoRA files `velocity` keeps read (the rows of a batch, and the next ones, often share them)
LORA_ENCODER_HINT = (
    "add the LoRA Encoder to the models (e.g. --model_id_with_origin_paths "
    "DiffSynth-Studio/LoRA-Encoder-FLUX.1-Dev:model.safetensors)"
)


def encode_lora_inputs(task: FluxTrainingTask, where: str, value: Any) -> torch.Tensor:
    """A row's LoRA file(s) as the cache keeps them: their absolute paths, as JSON in UTF-8 bytes (uint8). Hub
    names are fetched here (`lora_file`, as the pipeline resolves them)."""
    from diffsynth.runtime.pipeline import lora_file

    if not task.lora_encoder:
        raise ConfigError(
            f"{where} has {LORA_ENCODER_COLUMN}, but no LoRA Encoder is among the models: {LORA_ENCODER_HINT}"
        )
    items = value
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            items = json.loads(value)
        except json.JSONDecodeError:
            raise ConfigError(f"{where}: {LORA_ENCODER_COLUMN} {value!r} is not a JSON list of LoRA files") from None
    items = list(items) if isinstance(items, (list, tuple)) else [items]
    if not items:
        raise ConfigError(f"{where}: {LORA_ENCODER_COLUMN} is an empty list; give one LoRA file or several")
    paths = []
    for item in items:
        if isinstance(item, ModelConfig) or (isinstance(item, (str, os.PathLike)) and str(item).strip()):
            path = lora_file(item if isinstance(item, ModelConfig) else str(item).strip())
        else:
            raise ConfigError(f"{where}: {LORA_ENCODER_COLUMN} must name LoRA files, got {item!r}")
        if not os.path.isfile(path):
            raise ConfigError(
                f"{where}: {LORA_ENCODER_COLUMN} {str(item)!r} is no file (relative paths are taken from the "
                f"working directory {os.getcwd()}, as DiffSynth-Studio takes them; give absolute paths)"
            )
        paths.append(os.path.abspath(path))
    return torch.tensor(list(json.dumps(paths).encode("utf-8")), dtype=torch.uint8)


def with_lora_tokens(
    task: FluxTrainingTask, prompt: FluxPromptEmbeds, batch: Mapping[str, Any], encoder: nn.Module | None
) -> FluxPromptEmbeds:
    """The prompt with one LoRA Encoder token per LoRA of each row appended, as the pipeline's
    `prepare_lora_encoding` appends them (scale 1): from the trained `encoder` (with gradients) or the
    pipeline's frozen one; unchanged for a batch without LoRA files."""
    loras = batch.get(LORA_ENCODER_COLUMN)
    if loras is None:
        if encoder is not None:
            raise ConfigError(
                f"training the LoRA Encoder needs batches with {LORA_ENCODER_COLUMN} (a column of the metadata); "
                "a cache encoded without them has none: encode it again"
            )
        return prompt
    frozen = encoder is None
    encoder = task.pipe.lora_encoder if frozen else encoder
    if encoder is None:
        raise ConfigError(
            f"this batch has {LORA_ENCODER_COLUMN}, but no LoRA Encoder is loaded: {LORA_ENCODER_HINT}; or "
            "encode the cache again without them"
        )
    with torch.no_grad() if frozen else contextlib.nullcontext():
        tokens = torch.cat(
            [torch.cat([encoder(read_lora_file(task, path)) for path in paths], dim=1) for paths in loras]
        )
    tokens = tokens.float().to(prompt.t5.device, prompt.t5.dtype)
    return FluxPromptEmbeds(torch.cat([prompt.t5, tokens], dim=1), prompt.pooled)


def read_lora_file(task: FluxTrainingTask, path: str):
    """A LoRA file read onto the DiT's layers as the pipeline reads it for the encoder (`read_lora`), against a
    meta-device DiT of the same config (a DiT LoRA in training wraps the Linears the reader looks for); the
    last `LORA_CACHE` files read are kept."""
    lora = task._loras.pop(path, None)
    if lora is None:
        if task.pipe.dit is None:
            raise ConfigError(f"{LORA_ENCODER_COLUMN}: reading {path} needs the DiT loaded")
        if not os.path.isfile(path):
            raise ConfigError(
                f"{LORA_ENCODER_COLUMN}: the LoRA file {path} (as the cache was encoded) is gone; put it back or "
                "encode the cache again"
            )
        if task._lora_layout is None:
            with torch.device("meta"):
                task._lora_layout = type(task.pipe.dit)(task.pipe.dit.config)
        with task.pipe.using("dit", task._lora_layout):
            lora = task.pipe.read_lora(path, "dit")
    task._loras[path] = lora
    while len(task._loras) > LORA_CACHE:
        task._loras.pop(next(iter(task._loras)))
    return lora


def collate_lora_paths(samples: list[Mapping[str, torch.Tensor]]) -> dict[str, Any]:
    """Each row's LoRA paths, decoded from the cache's bytes (none for a batch without); one LoRA count per batch."""
    batch: dict[str, Any] = {}
    if LORA_ENCODER_COLUMN in samples[0]:
        loras = [json.loads(bytes(s[LORA_ENCODER_COLUMN].tolist()).decode("utf-8")) for s in samples]
        if len({len(paths) for paths in loras}) > 1:
            raise ConfigError(
                f"the rows of a batch have {[len(p) for p in loras]} LoRA files in {LORA_ENCODER_COLUMN}; rows "
                "with different counts cannot share a batch: train with --batch_size 1"
            )
        batch[LORA_ENCODER_COLUMN] = loras  # each row's LoRA paths: read in `velocity`
    return batch
