"""The `TrainingTask` protocol: the only thing a model family writes to be trainable.

A family's task turns dataset rows into model inputs with its frozen encoders, and runs the same per-step
model call its pipeline uses. Everything else (data, noise, loss, LoRA, optimizer, checkpoints, multi-GPU) is
the trainer's. Families declare their task in `Family(training="module:Class")` and implement the protocol
structurally: a family package never imports `diffsynth.training`.

The trainer, per micro-batch:

    samples = task.encode(rows)                 # frozen encoders, no grad; or read back from the cache
    batch = task.collate(samples)               # batch["latents"]: clean latents x0 [B, C, ...]
    sigma = task.scheduler.sample_training_sigmas(B, generator)
    noisy = (1 - sigma) * x0 + sigma * noise
    loss = weight(sigma) * mse(task.velocity(denoiser, batch, noisy, sigma), noise - x0)   # over loss_mask, if any

`encode` returns one `dict[str, Tensor]` per row (no batch dimension), so the cached two-stage mode can
store each sample as a safetensors file and training from the cache sees exactly what encoding on the fly
gives. `velocity` gets the denoiser from the trainer (possibly wrapped for DDP or carrying a LoRA), never
`self`'s copy, so gradients flow through the wrapper.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from diffsynth.runtime.errors import ConfigError, preview
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.schedulers import FlowMatchScheduler

from .config import TrainConfig

logger = logging.getLogger(__name__)

Row = dict[str, Any]  # one metadata row: "prompt": str, "image": Tensor [3, H, W] in [-1, 1], "video": [3, F, H, W]
Sample = dict[str, torch.Tensor]  # one encoded row


@runtime_checkable
class TrainingTask(Protocol):
    """What a family supplies (see the module docstring). Attributes:

    - `family`: the family name (recorded in caches and checkpoints);
    - `denoiser_slot`: the model the per-step call runs ("dit"); LoRA goes there by default;
    - `size_multiple`: training sizes in pixels are multiples of this;
    - `media`: the metadata columns the task reads its main input from, in order of preference ("image",);
    - `scheduler`: a `FlowMatchScheduler` with the family's template: training timesteps and loss weights;
    - `models`: the loaded models by slot (the encoders are absent when built with `encoders=False`);
    - `model_files`: the files each model was loaded from (full fine-tuning copies the `config.json` beside them).
    """

    family: ClassVar[str]
    denoiser_slot: ClassVar[str]
    size_multiple: ClassVar[int]
    media: ClassVar[tuple[str, ...]]
    scheduler: FlowMatchScheduler

    @property
    def models(self) -> Mapping[str, nn.Module]: ...

    @property
    def model_files(self) -> Mapping[str, list[str]]: ...

    @classmethod
    def from_pretrained(
        cls,
        model_configs: Sequence[ModelConfig],
        *,
        tokenizer_config: ModelConfig | None = None,
        torch_dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device | None = None,
        encoders: bool = True,
        denoiser: bool = True,
    ) -> TrainingTask:
        """Load what a stage needs: `encoders` (text encoders, VAE, tokenizer) and/or the `denoiser`."""
        ...

    def encode(self, rows: list[Row]) -> list[Sample]:
        """One dict of tensors per row, holding `"latents"` (clean, normalised, no batch dim)."""
        ...

    def collate(self, samples: list[Sample]) -> dict[str, Any]:
        """The model inputs of a batch; `"latents"` is the stacked clean latents."""
        ...

    def velocity(
        self, denoiser: nn.Module, batch: dict[str, Any], noisy_latents: torch.Tensor, sigma: torch.Tensor
    ) -> torch.Tensor:
        """The flow velocity (noise - x0) the denoiser predicts at noise level `sigma` [B]."""
        ...


# Optional: `sample(denoiser, prompts, *, seed, references=None, **options) -> list[PIL.Image | list[PIL.Image]]`
# draws one picture (or video, a list of frames; or `(frames, (waveform [C, N], sample_rate))` for a video with
# sound, written as one mp4 at the task's optional `sample_fps`) per prompt with the family's pipeline, the given denoiser in
# place of the loaded one, `options` (height, width, num_inference_steps) over the pipeline's defaults; the
# trainer calls it for `--validation_prompts` (a task without it refuses that flag). `references` (passed only
# with `--validation_images`) holds each prompt's reference images, a list of PIL images per prompt (RGB, or the
# task's `image_mode`).
# `validation_references: str` says what the samples do with them: "none" (the default: the flag is refused),
# "optional", "expected" (the model is conditioned on them: sampling without them is allowed with a warning) or
# "required" (Wan I2V: `--validation_prompts` without `--validation_images` is refused). Optional:
# `reference_arguments(images) -> dict`, the pipeline arguments of one prompt's references, raising
# `ConfigError` for a count the model cannot take; the trainer calls it at setup to check each prompt's.
#
# Optional: `ddp_find_unused_parameters: ClassVar[bool]`, True when some of the denoiser's weights never get a
# gradient (Qwen-Image's last text stream): DDP then looks for them instead of waiting for their reduction.
#
# Optional: `loss_mask(batch) -> Tensor | None`, 1 where the loss counts and 0 where it does not, broadcastable to
# `batch["latents"]` (at least one counted element per sample); each sample's MSE is then the mean over the counted
# elements. For latents the model is given rather than asked for: Wan2.2-TI2V's clean first frame, which its
# `velocity` puts in place of the noisy one. Without the method (or when it returns None) every element counts.
#
# Optional: `takes_loss_masks: ClassVar[bool]` (default True), False when the latents are no `[..., h, w]` grid of
# latent cells (LTX-2's token sequence): `--masked_loss` is then refused before any model loads.
#
# Optional: `draw_choices(batch, generator) -> dict` and `batch_choices: ClassVar[tuple[str, ...]]`, the random
# choices a task makes per batch (LTX-2's first-frame conditioning draw), drawn from `generator`, which the trainer
# keys by the micro-batch (like its noise), and added to the batch under the `batch_choices` keys; a teacher's
# negative batch (DMD2, trajectory imitation) is given the same entries.
#
# Optional: `conditioning: ClassVar[tuple[str, ...]]`, metadata columns of reference images (FLUX.1 Kontext's
# "kontext_images", Qwen-Image-Edit's "edit_image"): the dataset reads them as file columns whatever
# `--data_file_keys` says, one path or a JSON list of paths per row, each image at its own size (see `data.py`).
#
# Optional: `aligned_conditioning: tuple[str, ...]`, those of them pixel-aligned with the target (Qwen-Image-
# Layered's input image, Step1X-Edit's source): read as the target is, at the sample's size and crop.
# `ragged_conditioning: ClassVar[bool]` (default False), True when a batch may mix rows whose conditioning pictures
# differ in count and size (Z-Image Omni's lists); otherwise such rows batch apart.
# `check_row(row, size) -> None`, a check of each metadata row at setup (`size(column, name)`: a file's header
# size), raising `ConfigError` ("column c: ...") that the dataset prefixes with the file and row.
#
# Optional: `lora_target_names(names, module) -> list[str]`, `--lora_target_modules` in the family's own names
# (FLUX.1 takes DiffSynth-Studio's); `lora_layout(format, weights) -> (weights, prefix)`, the names and prefix a
# saved LoRA layout is written in (FLUX.1's peft file in diffusers' names).
#
# Optional: `image_mode: ClassVar[str]`, "RGB" (the default) or "RGBA": the mode the dataset and
# `--validation_images` read pictures in; Qwen-Image 2.1 trains on RGBA ([4, H, W] rows, alpha kept).

# Optional: `saved_full_weights(slot, path) -> list[Path]`, called after full weights were written to `path`
# (`<step>/<slot>/diffusion_pytorch_model.safetensors`): a model released as several files writes them beside it
# (FLUX.1 InfiniteYou: InfuseNet's folder and the projector's file) and returns their paths.

# Optional: `inference_sigmas(latent_shape, num_inference_steps) -> Tensor` [N + 1], the schedule the family's
# pipeline samples `latent_shape` (the batch's clean latents) with in that many steps, ending with 0: what
# `--task direct_distill` steps along (a task without it refuses that mode), and `--task dmd2`'s student sigmas
# with `--dmd2_student_schedule pipeline`.
#
# Optional: `hidden_features(denoiser, batch, noisy_latents, sigma, indices) -> list[Tensor]`, the denoiser's
# hidden states after its blocks `indices` (the family's block order) for the image tokens, one
# `[B, hidden, h, w]` map per index, from the same call as `velocity` (gradients flow to `noisy_latents`): what
# `--task dmd2`'s discriminator reads with `--dmd2_gan_loss_weight > 0` (a task without it refuses the GAN term).
# An index the denoiser does not have is a `ConfigError` naming `--dmd2_feature_indices`.

# Task options (`--task_options name=value,...`): keyword-only arguments of the task's constructor, which
# `from_pretrained(..., **options)` passes on (e.g. `sigma_shift`). Optional: `loss_options: ClassVar[tuple[str,
# ...]]`, those that act only in the loss or the model call; the others shape the encoded samples, so a cache
# written with other values is refused.

_REQUIRED = ("family", "denoiser_slot", "size_multiple", "media", "from_pretrained", "encode", "collate", "velocity")


# ----------------------------------------------------------------------------------- finding the task
def trainable_families() -> dict[str, str]:
    """Installed family name -> its "module:Class" training task."""
    from diffsynth.runtime.registry import installed_families

    return {name: fam.training for name, fam in installed_families().items() if fam.training}


def task_class(config: TrainConfig) -> type:
    """The task class for `--family` (a family name or "module:Class"), else the preset's own task or its
    family's, else the only installed family that has one."""
    name = config.family
    if name is None and config.model and not Path(config.model).is_dir():
        from diffsynth.runtime.registry import find_preset

        family, preset = find_preset(config.model)
        name = preset.training or family.name  # a preset with its own pipeline may have its own task (Step1X-Edit)
    families = trainable_families()
    if name is None and config.model and Path(config.model).is_dir():
        name = _folder_family(Path(config.model), families)
    if name is None:
        if len(families) != 1:
            raise ConfigError(f"pass --family: installed families with a training task are {preview(sorted(families))}")
        name = next(iter(families))
    target = families.get(name, name if ":" in name else None)
    if target is None:
        raise _no_training_task(name, families)
    module, _, attr = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"--family {name!r}: cannot import the training task {target!r} ({exc})") from None
    missing = [a for a in _REQUIRED if not hasattr(cls, a)]
    if missing:
        raise ConfigError(f"training task {target!r} does not implement {', '.join(missing)} (see TrainingTask)")
    return cls


# Trainable family name -> the package that installs it: a --family whose package is missing names what to install
FAMILY_PACKAGES = {
    "z_image": "diffsynth-z-image",
    "flux": "diffsynth-flux",
    "flux2": "diffsynth-flux",
    "qwen_image": "diffsynth-qwen-image",
    "qwen_image21": "diffsynth-qwen-image",
    "wan": "diffsynth-wan",
    "ltx2": "diffsynth-ltx2",
}


def _no_training_task(name: str, families: Mapping[str, str]) -> ConfigError:
    """The error for a --family without a task: a known family not installed names its package."""
    package = FAMILY_PACKAGES.get(name.replace("-", "_"))
    if package and name.replace("-", "_") not in families:
        return ConfigError(f"--family {name} needs the {package} package: pip install {package}")
    return ConfigError(
        f"--family {name!r} has no training task; installed families with one: {preview(sorted(families))} "
        "(or pass 'module:Class' of your own task)"
    )


def _folder_family(folder: Path, families: Mapping[str, str]) -> str | None:
    """The trainable family a local model folder's weights belong to (None: the only family is taken)."""
    from diffsynth.runtime.registry import family_for_folder

    try:
        return family_for_folder(folder, kind="training").name
    except ConfigError as exc:
        if len(families) == 1:
            return None
        raise ConfigError(f"--model {folder}: {exc}; or pass --family ({preview(sorted(families))})") from None


def model_sources(config: TrainConfig) -> tuple[list[ModelConfig], ModelConfig | None]:
    """The `ModelConfig`s and tokenizer config that --model, --model_paths, --model_id_with_origin_paths and
    --tokenizer_path name."""
    configs: list[ModelConfig] = []
    tokenizer = tokenizer_source(config.tokenizer_path) if config.tokenizer_path else None
    if config.model:
        if Path(config.model).is_dir():
            from diffsynth.runtime.pipeline import configs_from_folder

            found, folder_tokenizer = configs_from_folder(Path(config.model))
            configs += found
            tokenizer = tokenizer or folder_tokenizer
        else:
            from diffsynth.runtime.pipeline import preset_sources
            from diffsynth.runtime.registry import find_preset

            preset = find_preset(config.model)[1]
            if getattr(preset, "loras", ()):
                lora = preset.loras[0]
                raise ConfigError(
                    f"--model {config.model} is a LoRA preset (a base model with {lora.model_id}'s "
                    f"{lora.origin_file_pattern} applied on load); the trainer does not apply preset LoRAs: train on "
                    "the base model (its preset, or --model_id_with_origin_paths)"
                )
            found, preset_tokenizer, _ = preset_sources(preset)
            configs += found
            tokenizer = tokenizer or preset_tokenizer
    configs += [ModelConfig(path=p) for p in config.model_paths]
    for item in config.model_id_with_origin_paths:
        source = hub_source(item)
        if source is None:
            raise ConfigError(
                f"--model_id_with_origin_paths entry {item!r} must look like Org/Model:path/pattern*.safetensors"
            )
        configs.append(source)
    return configs, tokenizer


def hub_source(spec: str) -> ModelConfig | None:
    """DiffSynth-Studio's hub form `Org/Model:pattern` (the files of a hub repo the pattern matches) as a
    `ModelConfig`; None when `spec` is not in that form."""
    model_id, sep, pattern = spec.partition(":")
    if sep and model_id.count("/") == 1 and all(model_id.split("/")) and pattern:
        return ModelConfig(model_id=model_id, origin_file_pattern=pattern)
    return None


def tokenizer_source(spec: str) -> ModelConfig:
    """`--tokenizer_path`: a local folder, or DiffSynth-Studio's hub form `Org/Model:tokenizer/`."""
    if Path(spec).exists():
        return ModelConfig(path=spec)
    source = hub_source(spec)
    if source is None:
        raise ConfigError(f"--tokenizer_path {spec}: no such folder (or give the hub form Org/Model:tokenizer/)")
    return source


def check_task(task, target: str) -> None:
    """Fail early, naming what is wrong, when a built task does not hold what the trainer reads."""
    if not isinstance(task.scheduler, FlowMatchScheduler):
        raise ConfigError(f"{target}.scheduler must be a FlowMatchScheduler, got {type(task.scheduler).__name__}")
    if task.denoiser_slot not in task.models:
        raise ConfigError(
            f"{target} was built without its denoiser {task.denoiser_slot!r}; it holds {preview(task.models)}"
        )


__all__ = ["Row", "Sample", "TrainingTask", "check_task", "model_sources", "task_class", "trainable_families"]
