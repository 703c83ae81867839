"""Z-Image's training task, for the DiffSynth trainer (`diffsynth-train`, package diffsynth-training).

It implements the trainer's `TrainingTask` protocol structurally (this package does not depend on the
trainer): class attributes `family`, `denoiser_slot`, `size_multiple`, `media`; a `scheduler`; `models`,
`model_files` and `sample` (the runtime's `PipelineTrainingTask`); `from_pretrained(model_configs, *,
tokenizer_config, torch_dtype, device, encoders, denoiser)`; `encode(rows)`, `collate(samples)` and
`velocity(dit, batch, noisy_latents, sigma)`.

A row is `{"prompt": str, "image": [3, H, W] in [-1, 1]}`. It is encoded as the pipeline encodes: the prompt
through `encode_prompts` (Qwen3, second-to-last hidden states of the chat-templated prompt) and the image
through the VAE (posterior mean, normalised latents), giving `{"latents": [16, H/8, W/8], "text": [L, 2560]}`.
The model call is `z_image_velocity`, the pipeline's per-step call; the noise levels and loss weights come from
the "z_image" flow-matching template (shift 3).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from diffsynth.runtime.errors import ConfigError, preview
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.schedulers import FlowMatchScheduler
from diffsynth.runtime.training_support import PipelineTrainingTask, load_partial_pipeline
from diffsynth.runtime.vram import module_dtype

from .pipeline import ZImagePipeline, z_image_velocity

logger = logging.getLogger(__name__)

ENCODER_SLOTS = ("vae", "text_encoder")


class ZImageTrainingTask(PipelineTrainingTask):
    """Turns rows into Z-Image inputs and runs the pipeline's per-step DiT call (see the module docstring)."""

    family: ClassVar[str] = "z_image"
    denoiser_slot: ClassVar[str] = "dit"
    size_multiple: ClassVar[int] = ZImagePipeline.size_multiple
    media: ClassVar[tuple[str, ...]] = ("image",)
    loss_options: ClassVar[tuple[str, ...]] = ("sigma_shift",)  # --task_options that leave a cache valid

    def __init__(self, pipe: ZImagePipeline, *, sigma_shift: float = 3.0, max_sequence_length: int = 512):
        self.pipe = pipe
        self.scheduler = FlowMatchScheduler("z_image", shift=sigma_shift)
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
    ) -> ZImageTrainingTask:
        """Load the models a stage needs: the DiT (`denoiser`) and/or the VAE, text encoder and tokenizer
        (`encoders`). Files of models not needed are recognised from their headers and not loaded."""
        pipe = load_partial_pipeline(
            ZImagePipeline,
            model_configs,
            ({"dit"} if denoiser else set()) | (set(ENCODER_SLOTS) if encoders else set()),
            tokenizers=("tokenizer",) if encoders else (),
            name="Z-Image",
            tokenizer_config=tokenizer_config if encoders else None,
            torch_dtype=torch_dtype,
            device=device,
        )
        return cls(pipe, **task_options)

    # ------------------------------------------------------------------ the protocol
    def encode(self, rows: list[Mapping[str, Any]]) -> list[dict[str, torch.Tensor]]:
        """`{"latents": [C, H/8, W/8], "text": [L, D]}` per row; rows of one call share an image size."""
        for i, row in enumerate(rows):
            if "prompt" not in row or not isinstance(row.get("image"), torch.Tensor):
                raise ConfigError(
                    f"Z-Image trains on rows with an image and a prompt; row {i} of the batch has {preview(row)}"
                )
        pipe = self.pipe
        text = pipe.encode_prompt([str(row["prompt"]) for row in rows], self.max_sequence_length)
        pixels = torch.stack([row["image"] for row in rows]).to(pipe.device, module_dtype(pipe.vae))
        latents = pipe.vae.encode(pixels)
        return [{"latents": lat, "text": emb} for lat, emb in zip(latents, text, strict=True)]

    def collate(self, samples: list[Mapping[str, torch.Tensor]]) -> dict[str, Any]:
        return {"latents": torch.stack([s["latents"] for s in samples]), "text": [s["text"] for s in samples]}

    def velocity(
        self, dit: nn.Module, batch: Mapping[str, Any], noisy_latents: torch.Tensor, sigma: torch.Tensor
    ) -> torch.Tensor:
        return z_image_velocity(dit, noisy_latents, sigma, batch["text"])


__all__ = ["ZImageTrainingTask"]
