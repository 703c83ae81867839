"""Qwen-Image's training task, for the DiffSynth trainer (`diffsynth-train`, package diffsynth-training).

It implements the trainer's `TrainingTask` protocol structurally (this package does not depend on the
trainer): class attributes `family`, `denoiser_slot`, `size_multiple`, `media`; a `scheduler`; `models`,
`model_files` and `sample` (the runtime's `PipelineTrainingTask`); `from_pretrained(model_configs, *,
tokenizer_config, torch_dtype, device, encoders, denoiser)`; `encode(rows)`, `collate(samples)` and
`velocity(dit, batch, noisy_latents, sigma)`.

A row is `{"prompt": str, "image": [3, H, W] in [-1, 1]}` (text-to-image). It is encoded as the pipeline
encodes: the prompt through `QwenImagePipeline.encode_prompt` (Qwen2.5-VL last hidden states of the
text-to-image template, its 34 leading tokens dropped, at most `max_sequence_length` tokens) and the image as a
one-frame video through the Wan-style causal VAE (posterior mode, latents normalised by the per-channel
mean/std), giving `{"latents": [16, H/8, W/8], "text": [L, D]}` with L the prompt's own token count. `collate`
zero-pads the prompts of a batch to the longest with a mask, as the pipeline's batched encoding does. The model
call is `qwen_image_velocity`, the pipeline's per-step call. Noise levels and loss weights: the "qwen_image"
template at mu = 0.8 (terminal sigma stretched to 0.02), DiffSynth-Studio's Qwen-Image training schedule.

Text-to-image models (Qwen/Qwen-Image, Qwen/Qwen-Image-2512) are supported; the Edit models (their
`processor/` tokenizer, Edit-2511's `zero_cond_t` DiT) and rows with an `edit_image` are refused for now.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from diffsynth.runtime.errors import ConfigError, preview
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.schedulers import FlowMatchScheduler
from diffsynth.runtime.training_support import PipelineTrainingTask, load_partial_pipeline

from .pipeline import QwenImagePipeline, dit_dtype, qwen_image_velocity

logger = logging.getLogger(__name__)

ENCODER_SLOTS = ("vae", "text_encoder")
TRAINING_MU = 0.8  # DiffSynth-Studio's "Qwen-Image" schedule without a dynamic shift length

_EDIT_REFUSAL = (
    "Qwen-Image training supports the text-to-image models (--model Qwen/Qwen-Image or Qwen/Qwen-Image-2512) so "
    "far; {what} belongs to an Edit model (--model Qwen/Qwen-Image-Edit, -Edit-2509, -Edit-2511), whose training "
    "(edit images in the DiT and the prompt encoding) is not supported yet"
)


class QwenImageTrainingTask(PipelineTrainingTask):
    """Turns rows into Qwen-Image inputs and runs the pipeline's per-step DiT call (see the module docstring)."""

    family: ClassVar[str] = "qwen_image"
    denoiser_slot: ClassVar[str] = "dit"
    size_multiple: ClassVar[int] = QwenImagePipeline.size_multiple
    media: ClassVar[tuple[str, ...]] = ("image",)

    def __init__(
        self, pipe: QwenImagePipeline, *, exponential_shift_mu: float = TRAINING_MU, max_sequence_length: int = 512
    ):
        self.pipe = pipe
        self.scheduler = FlowMatchScheduler("qwen_image", mu=exponential_shift_mu)
        self.max_sequence_length = max_sequence_length

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
    ) -> QwenImageTrainingTask:
        """Load the models a stage needs: the DiT (`denoiser`) and/or the VAE, Qwen2.5-VL text encoder and
        tokenizer (`encoders`). Files of models not needed are recognised from their headers and not loaded."""
        if tokenizer_config is not None and _is_edit_processor(tokenizer_config):
            raise ConfigError(_EDIT_REFUSAL.format(what="the tokenizer (a processor/ folder)"))
        pipe = load_partial_pipeline(
            QwenImagePipeline,
            model_configs,
            ({"dit"} if denoiser else set()) | (set(ENCODER_SLOTS) if encoders else set()),
            tokenizers=("tokenizer",) if encoders else (),
            name="Qwen-Image",
            tokenizer_config=tokenizer_config if encoders else None,
            torch_dtype=torch_dtype,
            device=device,
        )
        if pipe.dit is not None and pipe.dit.config.zero_cond_t:
            raise ConfigError(_EDIT_REFUSAL.format(what="this DiT (zero_cond_t, Qwen-Image-Edit-2511)"))
        return cls(pipe, **task_options)

    # ------------------------------------------------------------------ the protocol
    def encode(self, rows: list[Mapping[str, Any]]) -> list[dict[str, torch.Tensor]]:
        """`{"latents": [16, H/8, W/8], "text": [L, D]}` per row; rows of one call share an image size."""
        for i, row in enumerate(rows):
            if row.get("edit_image") is not None:
                raise ConfigError(
                    f"row {i} has an edit_image: "
                    + _EDIT_REFUSAL.format(what="editing data")
                    + "; drop edit_image from --data_file_keys and the metadata to train text-to-image"
                )
            if "prompt" not in row or not isinstance(row.get("image"), torch.Tensor):
                raise ConfigError(
                    f"Qwen-Image trains on rows with an image and a prompt; row {i} of the batch has {preview(row)}"
                )
        pipe = self.pipe
        embeds, mask = pipe.encode_prompt([str(row["prompt"]) for row in rows], self.max_sequence_length)
        pixels = torch.stack([row["image"] for row in rows]).to(pipe.device, dit_dtype(pipe.vae))
        latents = pipe.vae.encode(pixels.unsqueeze(2))[:, :, 0].float()
        return [
            {"latents": lat, "text": emb[keep]} for lat, emb, keep in zip(latents, embeds, mask.bool(), strict=True)
        ]

    def collate(self, samples: list[Mapping[str, torch.Tensor]]) -> dict[str, Any]:
        """Latents stacked; prompts zero-padded to the longest, `text_mask` True on real tokens."""
        texts = [s["text"] for s in samples]
        length = max(max(t.shape[0] for t in texts), 1)
        text = texts[0].new_zeros(len(texts), length, texts[0].shape[-1])
        mask = torch.zeros(len(texts), length, dtype=torch.bool, device=texts[0].device)
        for i, t in enumerate(texts):
            text[i, : t.shape[0]] = t
            mask[i, : t.shape[0]] = True
        return {"latents": torch.stack([s["latents"] for s in samples]), "text": text, "text_mask": mask}

    def velocity(
        self, dit: nn.Module, batch: Mapping[str, Any], noisy_latents: torch.Tensor, sigma: torch.Tensor
    ) -> torch.Tensor:
        return qwen_image_velocity(dit, noisy_latents, sigma, batch["text"], batch["text_mask"])


def _is_edit_processor(config: ModelConfig) -> bool:
    """Whether a tokenizer config is an Edit repo's `processor/` (a hub pattern or a local folder)."""
    if config.model_id is not None:
        return (config.origin_file_pattern or "").rstrip("/").rsplit("/", 1)[-1] == "processor"
    paths = [config.path] if isinstance(config.path, str) else list(config.path or ())
    if not paths:
        return False
    folder = Path(paths[0]) if Path(paths[0]).is_dir() else Path(paths[0]).parent
    return (folder / "preprocessor_config.json").is_file()


__all__ = ["QwenImageTrainingTask"]
