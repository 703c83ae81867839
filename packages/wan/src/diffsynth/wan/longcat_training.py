"""LongCat-Video training (text-to-video, LoRA or full, as DiffSynth-Studio trains its LoRAs): the Wan training task
with the LongCat DiT's model call.

Rows are Wan's text-to-video rows (`prompt` and `video` or `image`), encoded by the same umT5 and Wan 2.1 VAE
(`{"latents": [16, T, H/8, W/8], "text": [L, 4096]}`); condition columns of the other Wan models are refused by
name. `velocity` is the pipeline's per-step call (`generate_longcat`): the timestep 1000 sigma for every latent
frame, the text's mask from its non-zero tokens, no clean frames; the DiT predicts `x0 - noise`, so the velocity
is its negation. Noise levels and loss weights: Wan's training grid at `sigma_shift` (1, the preset's).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.schedulers import FlowMatchScheduler
from diffsynth.runtime.training_support import load_partial_pipeline
from diffsynth.runtime.vram import module_dtype

from .longcat import LongCatConfig, longcat_sigmas
from .pipeline import WanVideoPipeline
from .training import ENCODER_SLOTS, WanTrainingTask, _DitShape, _tokenizer_beside


class LongCatTrainingTask(WanTrainingTask):
    """Wan's rows and encoders, LongCat-Video's DiT call (see the module docstring)."""

    loss_options: ClassVar[tuple[str, ...]] = ("sigma_shift",)
    trainable_slots: ClassVar[tuple[str, ...]] = ()

    def __init__(self, pipe: WanVideoPipeline, dit_config: LongCatConfig, *, sigma_shift: float = 1.0,
                 max_sequence_length: int = 512):  # fmt: skip
        self.pipe, self.dit_config, self.kind = pipe, dit_config, "longcat"
        self.max_sequence_length, self.speed_control, self.trained_model = max_sequence_length, False, "dit"
        self.sigma_shift = float(sigma_shift)
        self.scheduler = FlowMatchScheduler("wan", shift=self.sigma_shift)
        if pipe.vae is not None:
            self.size_multiple = pipe.vae.spatial_compression * max(dit_config.patch_size[1:])
        self._shape = _DitShape(dit_config)
        self.validation_references = "none"  # text-to-video samples

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
    ) -> LongCatTrainingTask:
        """The LongCat DiT (`denoiser`) and/or Wan 2.1's umT5, VAE and tokenizer (`encoders`)."""
        if encoders and tokenizer_config is None:
            tokenizer_config = _tokenizer_beside(model_configs)
        pipe = load_partial_pipeline(
            WanVideoPipeline,
            model_configs,
            ({"dit"} if denoiser else set()) | (set(ENCODER_SLOTS) if encoders else set()),
            tokenizers=("tokenizer",) if encoders else (),
            name="LongCat-Video",
            tokenizer_config=tokenizer_config if encoders else None,
            torch_dtype=torch_dtype,
            device=device,
        )
        given = task_options.pop("dit_config", None)
        config = pipe.dit.config if pipe.dit is not None else given
        if config is None:
            from .training import _dit_config

            dits = [c for c in model_configs if "dit" in _roles(c)]
            config = _dit_config(dits[0]) if dits else None
        if not isinstance(config, LongCatConfig):
            raise ConfigError("LongCat-Video training needs the LongCat-Video DiT's files (dit/*.safetensors)")
        return cls(pipe, config, **task_options)

    def _no_samples(self) -> str | None:
        return None

    def reference_arguments(self, images: Sequence[Any]) -> dict[str, Any]:
        """Text-to-video samples: no reference images."""
        if images:
            raise ConfigError(
                f"LongCat-Video's validation samples are text-to-video (got {len(images)} images); drop "
                "--validation_images"
            )
        return {}

    def _conditions(self, index: int, row: Mapping[str, Any], video: torch.Tensor, latents: torch.Tensor):
        from .training import CONDITION_KEYS

        named = [key for key in CONDITION_KEYS if row.get(key) is not None]
        if named:
            raise ConfigError(
                f"row {index} has {' and '.join(named)}, but LongCat-Video trains text-to-video here; drop the column"
            )
        return latents, {}

    def velocity(
        self, dit: nn.Module, batch: Mapping[str, Any], noisy_latents: torch.Tensor, sigma: torch.Tensor
    ) -> torch.Tensor:
        text = batch["text"].to(noisy_latents.device)
        b, frames = noisy_latents.shape[0], noisy_latents.shape[2]
        t = sigma.to(noisy_latents.device, torch.float32).reshape(-1).expand(b) * self.scheduler.num_train_timesteps
        dtype = module_dtype(dit)
        mask = (text != 0).any(-1).to(dtype)
        prediction = dit(
            noisy_latents.to(dtype), t[:, None].expand(b, frames), text.to(dtype), mask, num_cond_latents=0
        )
        return -prediction.float()  # the DiT predicts x0 - noise

    def inference_sigmas(self, latent_shape: Sequence[int], num_inference_steps: int) -> torch.Tensor:
        """The pipeline's LongCat schedule at the task's shift (`--task direct_distill`)."""
        return longcat_sigmas(num_inference_steps, self.sigma_shift)


def _roles(config: ModelConfig) -> set[str]:
    from diffsynth.runtime.training_support import model_roles

    return model_roles(config)
