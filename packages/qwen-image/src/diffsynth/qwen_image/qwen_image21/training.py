"""Qwen-Image 2.1's training task, for the DiffSynth trainer (`diffsynth-train --family qwen_image21`).

It implements the trainer's `TrainingTask` protocol structurally (this package does not depend on the trainer):
class attributes `family`, `denoiser_slot`, `size_multiple`, `media`, `conditioning`; a `scheduler`; `models`,
`model_files` and `sample` (the runtime's `PipelineTrainingTask`; validation samples take their references as
`edit_image`); `from_pretrained`, `encode(rows)`, `collate(samples)` and `velocity(dit, batch, noisy, sigma)`.
`image_mode = "RGBA"` asks the trainer's dataset for four channels: the model reads and draws transparency.

A row is `{"prompt": str, "image": [4, H, W] in [-1, 1]}` (a [3, H, W] image is taken as opaque), H and W
multiples of 32, plus optionally `"edit_image"`: one condition image or a list (tensors [4 or 3, h, w] in
[-1, 1] at their own size, as the dataset reads the `conditioning` column; PIL images or paths work too). It is
encoded as `QwenImage21Pipeline` encodes: the image through the VAE (posterior mean, normalised) to
`"latents"` [64, H/16, W/16]; the condition images resized by `pipe.condition_images` to about
`output_resolution`^2 pixels (the pipeline's setting, 1024 unless the model folder or the task option says
otherwise) and VAE-encoded alone to `"cond_0"`, `"cond_1"`, ... [64, h, w]; the prompt read with them by
`pipe.encode_prompt` to `"text"` [L, D] (its own tokens) and `"slots"` bool [L] (the vision slots, each standing
for 2x2 condition tokens). `collate` zero-pads the prompts to the longest with a `text_mask`.

The model call is `qwen_image21_velocity`, the pipeline's per-step call, without the prefix cache: the prompt
and condition tokens run through every block on each call, so the gradient reaches the weights through them
too. Every weight gets a gradient through the target image's tokens (the blocks' weights are shared by the
prefix and target streams), so DDP need not look for unused parameters.

Noise levels and loss weights: the "qwen_image" template at the model's own resolution shift for 1024x1024
(4096 tokens), read from its `scheduler/scheduler_config.json` (an exponential dynamic shift gives mu, a linear
one ln(mu), a static `shift` ln(shift)) with its `shift_terminal`; `--task_options exponential_shift_mu=...`
overrides mu. Rows of one batch must agree on their condition images' count and sizes (`--batch_size 1`
always does).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from diffsynth.runtime.errors import ConfigError, preview
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.media import tensor_to_pil
from diffsynth.runtime.schedulers import FlowMatchScheduler
from diffsynth.runtime.schedulers.templates import linear_mu
from diffsynth.runtime.training_support import PipelineTrainingTask, load_partial_pipeline
from diffsynth.runtime.vram import module_dtype

from .pipeline import (
    COMPRESSION,
    DEFAULT_RESOLUTION,
    PromptEncoding,
    QwenImage21Pipeline,
    fetch_schedule_files,
    latents_to_tokens,
    qwen_image21_velocity,
    tokens_to_latents,
)
from .schedule import ScheduleSettings

logger = logging.getLogger(__name__)

ENCODER_SLOTS = ("vae", "text_encoder")
TRAINING_SEQ_LEN = (DEFAULT_RESOLUTION // COMPRESSION) ** 2  # the shift the model samples 1024x1024 with


def training_mu(settings: ScheduleSettings, image_seq_len: int = TRAINING_SEQ_LEN) -> float:
    """The "qwen_image" template's mu (an exponential shift) that equals the model's schedule at `image_seq_len`
    tokens: a linear time shift by m is the exponential one by ln(m), a static `shift` s is ln(s)."""
    if settings.use_dynamic_shifting:
        mu = linear_mu(
            image_seq_len,
            settings.base_image_seq_len,
            settings.max_image_seq_len,
            settings.base_shift,
            settings.max_shift,
        )
        if settings.time_shift_type == "exponential":
            return mu
        shift, what = mu, f"the linear time shift at {image_seq_len} tokens ({mu})"
    else:
        shift, what = settings.shift, f"shift={settings.shift}"
    if not shift > 0:
        raise ConfigError(f"the model's schedule has {what}, which is not positive; pass exponential_shift_mu=...")
    return math.log(shift)


class QwenImage21TrainingTask(PipelineTrainingTask):
    """Turns rows into Qwen-Image 2.1 inputs and runs the pipeline's per-step DiT call (see the module docstring)."""

    family: ClassVar[str] = "qwen_image21"
    denoiser_slot: ClassVar[str] = "dit"
    size_multiple: ClassVar[int] = QwenImage21Pipeline.size_multiple
    media: ClassVar[tuple[str, ...]] = ("image",)
    conditioning: ClassVar[tuple[str, ...]] = ("edit_image",)
    image_mode: ClassVar[str] = "RGBA"  # the dataset reads the images (and condition images) with their alpha
    loss_options: ClassVar[tuple[str, ...]] = ("exponential_shift_mu",)  # --task_options that leave a cache valid
    validation_references = "optional"  # text-to-image, or editing the --validation_images

    def __init__(
        self,
        pipe: QwenImage21Pipeline,
        *,
        exponential_shift_mu: float | None = None,
        output_resolution: int | None = None,
    ):
        """`exponential_shift_mu` replaces the model's own mu (see `training_mu`); `output_resolution` the
        pipeline's setting (condition images are encoded at about its square in pixels)."""
        self.pipe = pipe
        settings = pipe.schedule
        if exponential_shift_mu is None:
            mu = training_mu(settings)
        elif isinstance(exponential_shift_mu, bool) or not isinstance(exponential_shift_mu, (int, float)):
            raise ConfigError(f"exponential_shift_mu={exponential_shift_mu!r} is not accepted; use a number")
        else:
            mu = float(exponential_shift_mu)
        self.scheduler = FlowMatchScheduler("qwen_image", mu=mu, shift_terminal=settings.shift_terminal)
        if output_resolution is not None:
            if isinstance(output_resolution, bool) or not isinstance(output_resolution, int) or output_resolution < 32:
                raise ConfigError(f"output_resolution={output_resolution!r} is not accepted; use an integer >= 32")
            pipe.defaults["output_resolution"] = output_resolution

    @classmethod
    def from_pretrained(
        cls,
        model_configs: Sequence[ModelConfig],
        *,
        tokenizer_config: ModelConfig | None = None,
        torch_dtype: torch.dtype | str = torch.bfloat16,
        device: str | torch.device | None = None,
        encoders: bool = True,
        denoiser: bool = True,
        **task_options: Any,
    ) -> QwenImage21TrainingTask:
        """Load the models a stage needs: the DiT (`denoiser`) and/or the VAE, Qwen3-VL text encoder and
        processor (`encoders`). Files of models not needed are recognised from their headers and not loaded.
        The schedule files beside the processor set the noise levels; a stage without encoders reads them
        without loading the processor."""
        pipe = load_partial_pipeline(
            QwenImage21Pipeline,
            model_configs,
            ({"dit"} if denoiser else set()) | (set(ENCODER_SLOTS) if encoders else set()),
            tokenizers=("processor",) if encoders else (),
            name="Qwen-Image 2.1",
            tokenizer_config=tokenizer_config if encoders else None,
            torch_dtype=torch_dtype,
            device=device,
        )
        if not encoders:
            pipe.schedule = _schedule_beside(tokenizer_config, model_configs)
        return cls(pipe, **task_options)

    def reference_arguments(self, images: Sequence[Any]) -> dict[str, Any]:
        """A validation sample's references as the pipeline's condition images (`edit_image`, in order)."""
        return {"edit_image": list(images)} if images else {}

    # ------------------------------------------------------------------ the protocol
    def encode(self, rows: list[Mapping[str, Any]]) -> list[dict[str, torch.Tensor]]:
        """`{"latents": [C, H/16, W/16], "text": [L, D], "slots": bool [L]}` per row, with `"cond_0"`,
        `"cond_1"`, ... [C, h, w] for a row with condition images."""
        pixels = [_row_image(row, i) for i, row in enumerate(rows)]
        pipe = self.pipe
        if pipe.vae is None or pipe.text_encoder is None or pipe.processor is None:
            raise ConfigError("encoding rows needs the VAE, text encoder and processor: load the task with encoders")
        sizes = {tuple(p.shape[1:]) for p in pixels}
        if len(sizes) > 1:
            raise ConfigError(f"the rows of one encode call must share an image size, got {sorted(sizes)}")
        tiles = {"tiled": False}
        resolution = pipe.setting("output_resolution", None, DEFAULT_RESOLUTION)
        batch = torch.stack(pixels).to(pipe.device, module_dtype(pipe.vae))
        latents = pipe.vae.encode(batch, **tiles).float()
        samples: list[dict[str, torch.Tensor]] = []
        for i, (row, lat) in enumerate(zip(rows, latents, strict=True)):
            try:
                conditions = pipe.condition_images(_condition_images(row), resolution)
            except ConfigError as exc:
                raise ConfigError(f"row {i} of the batch (prompt {_prompt_preview(row)}): {exc}") from None
            text = pipe.encode_prompt([str(row["prompt"])], conditions)
            tokens, shapes = pipe.encode_conditions(conditions, tiles)
            try:
                pipe.check_slots(text, shapes)
            except ConfigError as exc:
                raise ConfigError(f"row {i} of the batch (prompt {_prompt_preview(row)}): {exc}") from None
            keep = slice(None) if text.mask is None else text.mask[0]
            slots = text.slots if text.slots.dim() == 1 else text.slots[0]
            sample = {"latents": lat, "text": text.embeds[0][keep], "slots": slots[keep].to(torch.bool)}
            start = 0
            for k, (_, h, w) in enumerate(shapes):
                sample[f"cond_{k}"] = tokens_to_latents(tokens[:, start : start + h * w], h, w)[0]
                start += h * w
            samples.append(sample)
        return samples

    def collate(self, samples: list[Mapping[str, torch.Tensor]]) -> dict[str, Any]:
        """Latents stacked; prompts zero-padded to the longest (`text_mask` True on real tokens, `slots` False on
        padding, one `[L]` row for the batch); condition latents stacked per image (`conditions`)."""
        texts = [s["text"] for s in samples]
        length = max(max(t.shape[0] for t in texts), 1)
        text = texts[0].new_zeros(len(texts), length, texts[0].shape[-1])
        mask = torch.zeros(len(texts), length, dtype=torch.bool, device=texts[0].device)
        slots = torch.zeros(len(texts), length, dtype=torch.bool, device=texts[0].device)
        for i, (t, s) in enumerate(zip(texts, samples, strict=True)):
            text[i, : t.shape[0]] = t
            mask[i, : t.shape[0]] = True
            slots[i, : t.shape[0]] = s["slots"].to(torch.bool)
        counts = [sum(name.startswith("cond_") for name in s) for s in samples]
        shapes = [[tuple(s[f"cond_{k}"].shape) for k in range(n)] for s, n in zip(samples, counts, strict=True)]
        if any(shape != shapes[0] for shape in shapes) or not bool((slots == slots[:1]).all()):
            raise ConfigError(
                f"the rows of a batch have different condition images (count and latent sizes {shapes}) or prompt "
                "layouts; one batch needs edit images of one count and size: train with --batch_size 1"
            )
        batch = {"latents": torch.stack([s["latents"] for s in samples]), "text": text, "text_mask": mask}
        batch["slots"] = slots[0]
        batch["conditions"] = [torch.stack([s[f"cond_{k}"] for s in samples]) for k in range(counts[0])]
        return batch

    def velocity(
        self, dit: nn.Module, batch: Mapping[str, Any], noisy_latents: torch.Tensor, sigma: torch.Tensor
    ) -> torch.Tensor:
        """`qwen_image21_velocity` on the batch (no prefix cache), as latents `[B, C, h, w]`."""
        h, w = noisy_latents.shape[-2:]
        conditions = list(batch.get("conditions", ()))
        shapes = [(1, c.shape[-2], c.shape[-1]) for c in conditions]
        tokens = torch.cat([latents_to_tokens(c) for c in conditions], dim=1) if conditions else None
        prompt = PromptEncoding(batch["text"], batch["text_mask"], batch["slots"], None)
        out = qwen_image21_velocity(dit, latents_to_tokens(noisy_latents), sigma, prompt, [*shapes, (1, h, w)], tokens)
        return tokens_to_latents(out, h, w)


def _prompt_preview(row: Mapping[str, Any]) -> str:
    return repr(str(row.get("prompt", ""))[:60])


def _row_image(row: Mapping[str, Any], index: int) -> torch.Tensor:
    """A row's target image as `[4, H, W]` (a 3-channel image gains an opaque alpha), checked."""
    image = row.get("image")
    if "prompt" not in row or not isinstance(image, torch.Tensor):
        raise ConfigError(
            f"Qwen-Image 2.1 trains on rows with an image and a prompt; row {index} of the batch has {preview(row)}"
        )
    if image.dim() != 3 or image.shape[0] not in (3, 4):
        raise ConfigError(f"row {index}: the image must be [4, H, W] (RGBA) or [3, H, W], got {tuple(image.shape)}")
    multiple = QwenImage21Pipeline.size_multiple
    if image.shape[1] % multiple or image.shape[2] % multiple:
        raise ConfigError(
            f"row {index}: the image is {image.shape[2]}x{image.shape[1]} pixels; Qwen-Image 2.1 needs sides in "
            f"multiples of {multiple} (--bucket_step / --height / --width)"
        )
    if image.shape[0] == 3:
        image = torch.cat([image, image.new_ones(1, *image.shape[1:])])
    return image


def _condition_images(row: Mapping[str, Any]) -> list | None:
    """A row's condition images (dataset tensors back to PIL, lossless for 8-bit files), None without."""
    value = row.get("edit_image")
    if value is None or (isinstance(value, (str, list, tuple)) and not value):
        return None
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    return [tensor_to_pil(item)[0] if isinstance(item, torch.Tensor) else item for item in items]


def _schedule_beside(tokenizer_config: ModelConfig | None, model_configs: Sequence[ModelConfig]) -> ScheduleSettings:
    """The model's schedule without its processor: read from the repo the processor config points into (its
    schedule files fetched from a hub repo), else from the repo folder above the DiT's files."""
    if tokenizer_config is not None:
        if tokenizer_config.model_id is not None and tokenizer_config.path is None:
            fetch_schedule_files(tokenizer_config)
            return ScheduleSettings.from_folder(Path(tokenizer_config.local_folder))
        paths = _paths(tokenizer_config)
        if paths:
            folder = Path(paths[0]) if Path(paths[0]).is_dir() else Path(paths[0]).parent
            return ScheduleSettings.from_folder(folder.parent)
    for config in model_configs:
        for path in _paths(config):
            repo = Path(path).parent.parent
            if (repo / "scheduler").is_dir() or (repo / "model_index.json").is_file():
                return ScheduleSettings.from_folder(repo)
    logger.warning("no scheduler/scheduler_config.json beside the model files: training with the default schedule")
    return ScheduleSettings()


def _paths(config: ModelConfig) -> list[str]:
    if config.path is None:
        return []
    return [os.fspath(config.path)] if isinstance(config.path, (str, os.PathLike)) else list(config.path)


__all__ = ["QwenImage21TrainingTask", "training_mu"]
