"""Step1X-Edit training: the `TrainingTask` of `Step1XEditPipeline` (the preset's `training`).

Rows are (instruction, edited image, source image) triples: `prompt`, `image` (the target) and
`step1x_reference_image` (DiffSynth-Studio's column; `reference_image` works too). The source is pixel-aligned with
the target (`aligned_conditioning`): the trainer's dataset reads it as it reads the target, covering the row's size
and centre-cropped alike (a fixed `--height`/`--width` crops both the same way); a source of another size, given
directly, is resized to the target's as the pipeline resizes it to the generated size. Each row is encoded as the
pipeline encodes a call: the instruction through Qwen2.5-VL with the source image (`encode_instructions`: 217 states
dropped, 640 kept with their mask), the source's VAE latent packed, and the target's VAE latent, giving
`{"latents": [16, H/8, W/8], "states": [640, D], "mask": [640], "reference": [H/16 * W/16, 64]}`.

`velocity` is the pipeline's per-step call (`step1x_velocity`: connector, then the DiT over the noisy tokens and
the source's beside them); the connector stays frozen, the DiT trains (LoRA or full). Noise levels and loss
weights: FLUX.1's training grid (static shift 3), as DiffSynth-Studio trains FLUX.1 models and Step1X-Edit.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import nn

from diffsynth.runtime.errors import ConfigError, preview
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.media import tensor_to_pil
from diffsynth.runtime.schedulers import FlowMatchScheduler
from diffsynth.runtime.training_support import PipelineTrainingTask, load_partial_pipeline
from diffsynth.runtime.vram import module_dtype

from .pipeline import latent_ids, pack_latents, unpack_latents
from .step1x import Step1XEditPipeline, encode_instructions, step1x_velocity

logger = logging.getLogger(__name__)

REFERENCE_COLUMNS = ("step1x_reference_image", "reference_image")  # DiffSynth-Studio's name first


class Step1XTrainingTask(PipelineTrainingTask):
    """Turns edit triples into Step1X-Edit inputs and runs the pipeline's per-step call (see the module docstring)."""

    family: ClassVar[str] = "flux"
    denoiser_slot: ClassVar[str] = "dit"
    size_multiple: ClassVar[int] = Step1XEditPipeline.size_multiple
    media: ClassVar[tuple[str, ...]] = ("image",)
    conditioning: ClassVar[tuple[str, ...]] = REFERENCE_COLUMNS
    aligned_conditioning: ClassVar[tuple[str, ...]] = REFERENCE_COLUMNS  # read at the target's size, cropped alike
    loss_options: ClassVar[tuple[str, ...]] = ("sigma_shift",)
    validation_references = "required"  # a sample edits its image

    def __init__(self, pipe: Step1XEditPipeline, *, sigma_shift: float = 3.0):
        self.pipe = pipe
        self.scheduler = FlowMatchScheduler("flux1", mu=math.log(sigma_shift))

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
    ) -> Step1XTrainingTask:
        """The DiT and its connector (`denoiser`: the per-step call needs both) and/or the VAE, Qwen2.5-VL and its
        processor (`encoders`; `tokenizer_config` is the Qwen2.5-VL-7B-Instruct folder, the preset's)."""
        if encoders and tokenizer_config is None:
            raise ConfigError(
                "Step1X-Edit training encodes with Qwen2.5-VL's processor: give the Qwen2.5-VL-7B-Instruct folder "
                "(--tokenizer_path), or train the stepfun-ai/Step1X-Edit preset"
            )
        pipe = load_partial_pipeline(
            Step1XEditPipeline,
            model_configs,
            ({"dit", "step1x_connector"} if denoiser else set()) | ({"vae", "text_encoder"} if encoders else set()),
            tokenizers=("processor",) if encoders else (),
            name="Step1X-Edit",
            processor_config=tokenizer_config if encoders else None,
            torch_dtype=torch_dtype,
            device=device,
        )
        return cls(pipe, **task_options)

    def reference_arguments(self, images: Sequence[Any]) -> dict[str, Any]:
        """A validation sample's image to edit, as the pipeline's `reference_image`."""
        if len(images) != 1:
            raise ConfigError(
                f"a Step1X-Edit validation sample edits one image (--validation_images src.png); got {len(images)}"
            )
        return {"reference_image": images[0]}

    def read_lora(self, path) -> Any:
        """The trainer's `--preset_lora_path`, read in FLUX.1's LoRA layouts (the authors' sd-scripts LoRAs too)."""
        return self.pipe.read_lora(path, "dit")

    # ------------------------------------------------------------------ the protocol
    def encode(self, rows: list[Mapping[str, Any]]) -> list[dict[str, torch.Tensor]]:
        pipe = self.pipe
        samples = []
        for i, row in enumerate(rows):
            target, source = self._pair(row, i)
            height, width = target.shape[-2:]
            image = tensor_to_pil(source)[0]
            if image.size != (width, height):  # the pipeline edits the source at the generated size
                image = image.resize((width, height), Image.BICUBIC)
            states, mask = encode_instructions(pipe.text_encoder, pipe.processor, [str(row["prompt"])], image)
            dtype = module_dtype(pipe.vae)
            from diffsynth.runtime.media import pil_to_tensor

            reference = pipe.vae.encode(pil_to_tensor([image], dtype=dtype, device=pipe.device)).float()
            latents = pipe.vae.encode(target[None].to(pipe.device, dtype)).float()
            samples.append(
                {
                    "latents": latents[0].cpu(),
                    "states": states[0].cpu(),
                    "mask": mask[0].cpu(),
                    "reference": pack_latents(reference)[0].cpu(),
                }
            )
        return samples

    def collate(self, samples: list[Mapping[str, torch.Tensor]]) -> dict[str, Any]:
        shapes = {tuple(s["latents"].shape) for s in samples}
        if len(shapes) != 1:
            raise ConfigError(f"one batch holds images of several sizes {sorted(shapes)}; use --batch_size 1")
        return {key: torch.stack([s[key] for s in samples]) for key in ("latents", "states", "mask", "reference")}

    def velocity(
        self, dit: nn.Module, batch: Mapping[str, Any], noisy_latents: torch.Tensor, sigma: torch.Tensor
    ) -> torch.Tensor:
        b, _, h, w = noisy_latents.shape
        ids = latent_ids(h, w, device=noisy_latents.device)
        velocity = step1x_velocity(
            dit, self.pipe.step1x_connector, pack_latents(noisy_latents.float()), batch["reference"], ids,
            batch["states"], batch["mask"], sigma,
        )  # fmt: skip
        return unpack_latents(velocity, h, w)

    def inference_sigmas(self, latent_shape: Sequence[int], num_inference_steps: int) -> torch.Tensor:
        """The pipeline's schedule for this size (FLUX.1's shift by its H/16 * W/16 tokens): `--task
        direct_distill` steps along it."""
        scheduler = FlowMatchScheduler("flux1")
        scheduler.set_timesteps(num_inference_steps, image_seq_len=(latent_shape[-2] // 2) * (latent_shape[-1] // 2))
        return scheduler.sigmas

    @staticmethod
    def _pair(row: Mapping[str, Any], index: int) -> tuple[torch.Tensor, torch.Tensor]:
        target = row.get("image")
        source = next((row[c] for c in REFERENCE_COLUMNS if row.get(c) is not None), None)
        if isinstance(source, (list, tuple)):
            source = source[0] if len(source) == 1 else None
        if "prompt" not in row or not isinstance(target, torch.Tensor) or not isinstance(source, torch.Tensor):
            raise ConfigError(
                f"Step1X-Edit trains on rows with a prompt (the instruction), an image (the edited result) and "
                f"step1x_reference_image (the one image it was made from); row {index} of the batch has {preview(row)}"
            )
        return target, source
