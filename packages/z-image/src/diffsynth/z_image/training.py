"""Z-Image's training task, for the DiffSynth trainer (`diffsynth-train`, package diffsynth-training).

It implements the trainer's `TrainingTask` protocol structurally (this package does not depend on the
trainer): class attributes `family`, `denoiser_slot`, `size_multiple`, `media`; a `scheduler`; `models`,
`model_files` and `sample` (the runtime's `PipelineTrainingTask`; a Z-Image Omni model's validation samples take
their references as `edit_image`); `from_pretrained(model_configs, *, tokenizer_config, torch_dtype, device,
encoders, denoiser)`; `encode(rows)`, `collate(samples)` and `velocity(dit, batch, noisy_latents, sigma)`.

A row is `{"prompt": str, "image": [3, H, W] in [-1, 1]}`. It is encoded as the pipeline encodes: the prompt
through `encode_prompts` (Qwen3, second-to-last hidden states of the chat-templated prompt) and the image
through the VAE (posterior mean, normalised latents), giving `{"latents": [16, H/8, W/8], "text": [L, 2560]}`.
The model call is `z_image_velocity`, the pipeline's per-step call; the noise levels and loss weights come from
the "z_image" flow-matching template (shift 3).

Z-Image Omni (a DiT with `siglip_feat_dim`, Tongyi-MAI/Z-Image-Omni-Base) trains on the same rows, text-to-image,
and on rows with `"edit_image"` (DiffSynth-Studio's column and the pipeline's argument): one condition image or a
list (tensors [3, h, w] in [-1, 1] at their own size, as the trainer's dataset reads the `conditioning` column;
PIL images or paths work too). Each row is encoded as the pipeline encodes it: the prompt with the Omni template
split around its images (`encode_omni_prompt`: one tensor per segment, 1 without images, n + 2 with n), and each
condition image prepared by `prepare_edit_images` (over 1024x1024 pixels scaled down, centre-cropped to multiples
of 16) then `encode_edit_images` (VAE latents of the bfloat16-rounded pixels, SigLIP2 grid). That gives
`{"latents": [16, H/8, W/8], "text_0": .., "text_{S-1}": [L_k, 2560], "edit_0": [16, h, w], "siglip_0": [rows,
cols, 1152], ...}`. The model call is `z_image_omni_velocity`, the pipeline's per-step Omni call, each sample with
its own segments, condition latents and SigLIP grids, so the rows of a batch may differ in their images (count
and size) and mix editing with text-to-image. Whether a model is Omni comes from its DiT (its file's header when
the DiT is not loaded, as in the cached mode's encoding stage); rows with `edit_image` need it and the SigLIP2
encoder (`siglip/model.safetensors`), and a cache encoded for one layout is refused by a DiT of the other.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from diffsynth.runtime.errors import ConfigError, preview
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.media import tensor_to_pil
from diffsynth.runtime.pipeline import WEIGHT_SUFFIXES
from diffsynth.runtime.schedulers import FlowMatchScheduler
from diffsynth.runtime.training_support import PipelineTrainingTask, load_partial_pipeline
from diffsynth.runtime.vram import module_dtype

from .pipeline import ZImagePipeline, z_image_omni_velocity, z_image_velocity

logger = logging.getLogger(__name__)

ENCODER_SLOTS = ("vae", "text_encoder")
EDIT_COLUMN = "edit_image"  # DiffSynth-Studio's Z-Image Omni column, the pipeline's argument
SIGLIP_FILE = "Tongyi-MAI/Z-Image-Omni-Base:siglip/model.safetensors"


class ZImageTrainingTask(PipelineTrainingTask):
    """Turns rows into Z-Image inputs and runs the pipeline's per-step DiT call (see the module docstring)."""

    family: ClassVar[str] = "z_image"
    denoiser_slot: ClassVar[str] = "dit"
    size_multiple: ClassVar[int] = ZImagePipeline.size_multiple
    media: ClassVar[tuple[str, ...]] = ("image",)
    conditioning: ClassVar[tuple[str, ...]] = (EDIT_COLUMN,)  # Omni's condition images, read as files
    loss_options: ClassVar[tuple[str, ...]] = ("sigma_shift",)  # --task_options that leave a cache valid
    # an Omni DiT's SigLIP embedder and refiner get no gradient from text-to-image rows: DDP looks for them
    ddp_find_unused_parameters: ClassVar[bool] = True

    def __init__(self, pipe: ZImagePipeline, *, sigma_shift: float = 3.0, max_sequence_length: int = 512):
        self.pipe = pipe
        self.scheduler = FlowMatchScheduler("z_image", shift=sigma_shift)
        self.max_sequence_length = max_sequence_length
        # Omni: the loaded DiT says; without it (encoding only) the SigLIP2 encoder (`from_pretrained` reads the
        # DiT file's header instead when it is given)
        self.omni = bool(pipe.dit.config.omni) if pipe.dit is not None else pipe.image_encoder is not None

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
        """Load the models a stage needs: the DiT (`denoiser`) and/or the VAE, text encoder and tokenizer, and
        Z-Image Omni's SigLIP2 image encoder where a file holds it (`encoders`). Files of models not needed are
        recognised from their headers and not loaded."""
        pipe = load_partial_pipeline(
            ZImagePipeline,
            model_configs,
            ({"dit"} if denoiser else set()) | (set(ENCODER_SLOTS) if encoders else set()),
            tokenizers=("tokenizer",) if encoders else (),
            optional=("image_encoder",) if encoders else (),
            name="Z-Image",
            tokenizer_config=tokenizer_config if encoders else None,
            torch_dtype=torch_dtype,
            device=device,
        )
        task = cls(pipe, **task_options)
        if pipe.dit is None and (omni := _omni_dit_in(model_configs)) is not None:
            task.omni = omni
        return task

    @property
    def validation_references(self) -> str:
        """Z-Image Omni's validation samples take `--validation_images` as `edit_image` (or draw from text)."""
        return "optional" if self.omni else "none"

    def reference_arguments(self, images: Sequence[Any]) -> dict[str, Any]:
        """A validation sample's condition images as the pipeline's `edit_image` (Omni only)."""
        if not images:
            return {}
        if not self.omni:
            return super().reference_arguments(images)  # refused, naming the flag
        if self.pipe.image_encoder is None:
            raise ConfigError(
                f"validation samples with edit images need Z-Image Omni's SigLIP2 encoder: add {SIGLIP_FILE}"
            )
        return {"edit_image": list(images)}

    # ------------------------------------------------------------------ the protocol
    def encode(self, rows: list[Mapping[str, Any]]) -> list[dict[str, torch.Tensor]]:
        """`{"latents": [C, H/8, W/8], "text": [L, D]}` per row; for Z-Image Omni the prompt's segments `"text_k"`
        and per condition image `"edit_k"` / `"siglip_k"` (see the module docstring). Rows of one call share an
        image size."""
        for i, row in enumerate(rows):
            if "prompt" not in row or not isinstance(row.get("image"), torch.Tensor):
                raise ConfigError(
                    f"Z-Image trains on rows with an image and a prompt; row {i} of the batch has {preview(row)}"
                )
        edits = [self._edit_images(row, i) for i, row in enumerate(rows)]
        pipe = self.pipe
        prompts = [str(row["prompt"]) for row in rows]
        pixels = torch.stack([row["image"] for row in rows]).to(pipe.device, module_dtype(pipe.vae))
        latents = pipe.vae.encode(pixels)
        if not self.omni:
            text = pipe.encode_prompt(prompts, self.max_sequence_length)
            return [{"latents": lat, "text": emb} for lat, emb in zip(latents, text, strict=True)]

        samples: list[dict[str, torch.Tensor]] = [{"latents": lat} for lat in latents]
        for count in sorted({len(images) for images in edits}):  # the template depends on the image count
            where = [i for i, images in enumerate(edits) if len(images) == count]
            segments = pipe.encode_omni_prompt([prompts[i] for i in where], count, self.max_sequence_length)
            for i, parts in zip(where, segments, strict=True):
                samples[i].update({f"text_{k}": part for k, part in enumerate(parts)})
        for i, images in enumerate(edits):
            if not images:
                continue
            try:
                prepared, _ = pipe.prepare_edit_images(images, None, None)
            except ConfigError as exc:
                raise ConfigError(f"row {i} of the batch (prompt {prompts[i][:60]!r}): {exc}") from None
            condition = pipe.encode_edit_images(prepared)
            samples[i].update({f"edit_{k}": z for k, z in enumerate(condition.latents)})
            samples[i].update({f"siglip_{k}": grid for k, grid in enumerate(condition.siglip)})
        return samples

    def collate(self, samples: list[Mapping[str, torch.Tensor]]) -> dict[str, Any]:
        """Latents stacked; the prompt (and Omni's segments, condition latents and SigLIP grids) per sample."""
        latents = torch.stack([s["latents"] for s in samples])
        kinds = {"text_0" in s for s in samples}  # Omni samples hold the prompt's segments
        if kinds != {self.omni}:
            encoded = "Z-Image Omni (prompt segments)" if True in kinds else "plain Z-Image (one prompt tensor)"
            loaded = "a Z-Image Omni DiT" if self.omni else "a plain Z-Image DiT"
            raise ConfigError(
                f"the samples were encoded for {encoded} and the loaded model is {loaded}: encode them again with "
                "this model (a new --cache_dir, with the DiT file among the models)"
            )
        if not self.omni:
            return {"latents": latents, "text": [s["text"] for s in samples]}
        grids = [_numbered(s, "siglip") for s in samples]
        return {
            "latents": latents,
            "segments": [_numbered(s, "text") for s in samples],
            "edit_latents": [_numbered(s, "edit") for s in samples],
            "siglip": [g or None for g in grids],
        }

    def velocity(
        self, dit: nn.Module, batch: Mapping[str, Any], noisy_latents: torch.Tensor, sigma: torch.Tensor
    ) -> torch.Tensor:
        if "segments" in batch:
            images, grids = batch["edit_latents"], batch["siglip"]
            return z_image_omni_velocity(dit, noisy_latents, sigma, batch["segments"], images, grids)
        return z_image_velocity(dit, noisy_latents, sigma, batch["text"])

    def inference_sigmas(self, latent_shape: Sequence[int], num_inference_steps: int) -> torch.Tensor:
        """The pipeline's schedule at the task's `sigma_shift` (3, every preset's): what `--task direct_distill`
        samples along."""
        scheduler = FlowMatchScheduler("z_image", **self.scheduler.template_defaults)
        scheduler.set_timesteps(num_inference_steps)
        return scheduler.sigmas

    # ------------------------------------------------------------------ Z-Image Omni
    def _edit_images(self, row: Mapping[str, Any], index: int) -> list:
        """A row's condition images (dataset tensors back to PIL, lossless for 8-bit files), refused where the
        loaded models cannot take them."""
        value = row.get(EDIT_COLUMN)
        if value is None or (isinstance(value, (str, list, tuple)) and not value):
            return []
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        where = f"row {index} of the batch (prompt {str(row.get('prompt', ''))[:60]!r}) has {EDIT_COLUMN}"
        if not self.omni:
            raise ConfigError(
                f"{where}, which trains Z-Image Omni; the loaded DiT is a plain Z-Image one: train "
                "Tongyi-MAI/Z-Image-Omni-Base (--model Tongyi-MAI/Z-Image-Omni-Base, or its transformer/ and siglip/ "
                f"files), or drop the {EDIT_COLUMN} column"
            )
        if self.pipe.image_encoder is None:
            raise ConfigError(
                f"{where}: Z-Image Omni encodes its condition images with the SigLIP2 image encoder too; add "
                f"{SIGLIP_FILE} (--model_id_with_origin_paths, or the file in --model_paths)"
            )
        return [tensor_to_pil(item)[0] if isinstance(item, torch.Tensor) else item for item in items]


def _numbered(sample: Mapping[str, torch.Tensor], stem: str) -> list[torch.Tensor]:
    """`sample[stem_0]`, `sample[stem_1]`, ... (as many as it holds)."""
    pattern = re.compile(rf"{stem}_(\d+)")
    count = sum(pattern.fullmatch(name) is not None for name in sample)
    return [sample[f"{stem}_{k}"] for k in range(count)]


def _omni_dit_in(model_configs: Sequence[ModelConfig]) -> bool | None:
    """Whether the DiT among `model_configs` is Z-Image Omni's (its SigLIP embedder's keys), from the file headers
    (no weights are read); None when no file holds a DiT."""
    from diffsynth.runtime.checkpoint import checkpoint_label, open_checkpoint
    from diffsynth.runtime.loading import recognise

    for config in model_configs:
        paths = [p for p in config.resolve() if p.endswith(WEIGHT_SUFFIXES) or Path(p).is_dir()]
        if not paths:
            continue
        state = open_checkpoint(paths)
        for rec in recognise(state.meta_state_dict(), label=checkpoint_label(state.files)):
            if rec.spec.role == "dit":
                return any("siglip_embedder." in key for key in rec.keys)
    return None


__all__ = ["ZImageTrainingTask"]
