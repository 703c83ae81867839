"""What the families' training tasks share: a pipeline loaded with only the models a training stage needs.

A trainer's stages need different parts of a pipeline: encoding needs the text encoders, VAE and tokenizers;
training from a cache needs only the denoiser. `load_partial_pipeline` recognises each given file's models from
its header (no weights read), loads the files holding the wanted slots into the family's pipeline with every
slot optional, and fails naming what is missing. `PipelineTrainingTask` gives a task built over such a pipeline
(`self.pipe`) its `models`, `model_files` and validation `sample`; a family whose validation samples take
reference images (Kontext, Edit, image-to-video) says so in `validation_references` and maps them to its
pipeline's arguments in `reference_arguments`. The trainer itself lives in diffsynth-training; families
implement its protocol structurally and import only this.

`models_kept_on_host` lets a trainer that streams some models from CPU memory itself (`--offload_models`) load
any family's task without those models ever being placed on the device whole: every task builds its pipeline
through `from_pretrained`, whose placement (`BasePipeline._place_models`) leaves the named slots as loaded.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, preview
from .hub import ModelConfig
from .pipeline import BasePipeline, source_defaults, weight_paths

_HOST_SLOTS: ContextVar[frozenset[str]] = ContextVar("diffsynth_host_slots", default=frozenset())


@contextmanager
def models_kept_on_host(slots: Iterable[str]) -> Iterator[None]:
    """Pipelines loaded inside leave the models of `slots` in CPU memory exactly as loaded: not moved to the
    device, not put under the VRAM manager (the other models are placed as usual). For a trainer that injects a
    LoRA into the real weights and then streams their blocks itself: a model on the device whole may not fit,
    and peft would build its layers beside a VRAM-managed block's stand-in weights."""
    token = _HOST_SLOTS.set(frozenset(slots))
    try:
        yield
    finally:
        _HOST_SLOTS.reset(token)


def host_slots() -> frozenset[str]:
    """The slots the innermost `models_kept_on_host` names (none outside one)."""
    return _HOST_SLOTS.get()


def model_roles(config: ModelConfig) -> set[str]:
    """The model roles a config's files hold, from their headers (no weights are read)."""
    from .checkpoint import checkpoint_label, open_checkpoint
    from .loading import recognise

    paths = weight_paths(config)  # shard indexes too
    if not paths:
        return set()
    state = open_checkpoint(paths)
    return {rec.spec.role for rec in recognise(state.meta_state_dict(), label=checkpoint_label(state.files))}


@functools.cache
def _partial(pipeline_cls: type[BasePipeline], roles: frozenset[str]) -> type[BasePipeline]:
    """`pipeline_cls` with every model slot optional that loads only the models of `roles`."""
    attributes = {"optional_slots": tuple(pipeline_cls.model_slots), "load_roles": roles}
    return type(pipeline_cls.__name__, (pipeline_cls,), {**attributes, "__module__": pipeline_cls.__module__})


def load_partial_pipeline(
    pipeline_cls: type[BasePipeline],
    model_configs: Sequence[ModelConfig],
    slots: Iterable[str],
    *,
    tokenizers: Iterable[str] = (),
    optional: Iterable[str] = (),
    name: str,
    **from_pretrained: Any,
) -> BasePipeline:
    """`pipeline_cls.from_pretrained` with the models of `slots` only (and of `optional` slots where the files
    hold them); the other slots stay empty and their weights are not read, even from a file that holds
    several models.

    `tokenizers` are the pipeline attributes (e.g. "tokenizer") that must be loaded too; `name` ("Z-Image")
    names the family in errors; `from_pretrained` (torch_dtype, device, tokenizer configs) is passed on.
    """
    slots, optional = sorted(slots), sorted(optional)
    unknown = [s for s in (*slots, *optional) if s not in pipeline_cls.model_slots]
    if unknown:
        raise ConfigError(f"{pipeline_cls.__name__} has no slots {unknown}; it has {list(pipeline_cls.model_slots)}")
    wanted = {pipeline_cls.model_slots[s] for s in (*slots, *optional)}
    configs = [c for c in model_configs if model_roles(c) & wanted]
    if not configs:
        raise ConfigError(f"{name} training needs the {slots} models; none of the given files hold them")
    pipe = _partial(pipeline_cls, frozenset(wanted)).from_pretrained(model_configs=configs, **from_pretrained)
    pipe.defaults.update(source_defaults(pipeline_cls, model_configs))  # validation samples draw as the model's own
    missing = [s for s in slots if getattr(pipe, s) is None] + [t for t in tokenizers if getattr(pipe, t) is None]
    if missing:
        raise ConfigError(
            f"{name} training needs {missing} too; the given files provided "
            f"{[s for s in pipe.model_slots if getattr(pipe, s) is not None]}"
        )
    return pipe


class PipelineTrainingTask:
    """The parts of a training task that only read its pipeline `self.pipe` (see the module docstring)."""

    pipe: BasePipeline

    @property
    def models(self) -> dict[str, nn.Module]:
        """The loaded models by slot."""
        return {
            slot: getattr(self.pipe, slot) for slot in self.pipe.model_slots if getattr(self.pipe, slot) is not None
        }

    @property
    def model_files(self) -> dict[str, list[str]]:
        """The files each loaded model came from."""
        return {slot: config.resolve() for slot, config in self.pipe.model_configs.items() if config is not None}

    # How validation samples use reference images (the trainer's --validation_images): "none" (refused),
    # "optional" (taken when given), "expected" (the model is conditioned on them: sampling without them warns),
    # "required" (sampling needs them: the trainer refuses --validation_prompts without --validation_images).
    validation_references: str = "none"

    def reference_arguments(self, images: Sequence[Any]) -> dict[str, Any]:
        """The pipeline keyword arguments that give one validation sample its reference images (PIL, in the
        order given). Families that take references override this; here, none are taken."""
        if images:
            family = getattr(self, "family", type(self).__name__)
            raise ConfigError(
                f"the {family} training task takes no reference images for its validation samples "
                f"(got {len(images)}); drop --validation_images"
            )
        return {}

    def sample(
        self,
        denoiser: nn.Module,
        prompts: Sequence[str],
        *,
        seed: int,
        references: Sequence[Sequence[Any]] | None = None,
        **options: Any,
    ) -> list:
        """Validation samples for a trainer: the pipeline with `denoiser` (the weights in training) as its DiT,
        one picture (or video) per prompt at the pipeline's defaults unless `options` (height, width, ...) say
        otherwise. `references` holds each prompt's reference images (a list per prompt), which
        `reference_arguments` turns into the pipeline's arguments."""
        if references is None:
            references = [[] for _ in prompts]
        if len(references) != len(prompts):
            raise ConfigError(f"{len(references)} lists of reference images for {len(prompts)} prompts; give one each")
        arguments = [self.reference_arguments(list(images)) for images in references]
        with self.pipe.using("dit", denoiser), _stages_drive(self.pipe, "dit", denoiser):
            return [
                self.pipe(prompt, seed=seed, progress_bar=False, **extra, **options)
                for prompt, extra in zip(prompts, arguments, strict=True)
            ]


@contextmanager
def _stages_drive(pipe: BasePipeline, slot: str, model: nn.Module) -> Iterator[None]:
    """A model VRAM-managed outside the pipeline (a trainer's streamed or fp8 base) is activated and parked by
    the pipeline's stages for the duration, never moved with `.to` (its weights are the manager's); it is active
    again afterwards, as the trainer left it."""
    from .vram import vram_handle

    handle, held = vram_handle(model), pipe.vram_handles.get(slot)
    if handle is None or handle is held:
        yield
        return
    active = handle.state == "active"
    pipe.vram_handles[slot] = handle
    try:
        yield
    finally:
        if held is None:
            del pipe.vram_handles[slot]
        else:
            pipe.vram_handles[slot] = held
        if active:
            handle.activate()


def row_video(row: Mapping[str, Any], index: int, family: str, temporal_compression: int) -> torch.Tensor:
    """A video model's training row as `[3, F, H, W]` (an image row is one frame), with F = 1 + k x the VAE's
    `temporal_compression`; a row without it, or with another frame count, is an error naming the row."""
    video, image = row.get("video"), row.get("image")
    if "prompt" not in row or not isinstance(video if video is not None else image, torch.Tensor):
        raise ConfigError(
            f"{family} trains on rows with a video (or image) and a prompt; row {index} of the batch has {preview(row)}"
        )
    if video is None:
        video = image[:, None] if image.dim() == 3 else image
    if video.dim() != 4 or video.shape[0] != 3:
        raise ConfigError(f"row {index}: the video must be [3, F, H, W], got {tuple(video.shape)}")
    frames, tc = video.shape[1], temporal_compression
    if (frames - 1) % tc:
        raise ConfigError(
            f"row {index}: the video has {frames} frames; {family} needs {tc}k + 1 frames (set --num_frames, e.g. "
            f"{max(1, frames - (frames - 1) % tc)})"
        )
    return video


__all__ = [
    "PipelineTrainingTask",
    "host_slots",
    "load_partial_pipeline",
    "model_roles",
    "models_kept_on_host",
    "row_video",
]
