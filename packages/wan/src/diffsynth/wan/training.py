"""Wan's training task, for the DiffSynth trainer (`diffsynth-train`, package diffsynth-training).

It implements the trainer's `TrainingTask` protocol structurally (this package does not depend on the
trainer): class attributes `family`, `denoiser_slot`, `size_multiple`, `media`; a `scheduler`; `models`,
`model_files` and `sample` (the runtime's `PipelineTrainingTask`); `from_pretrained(model_configs, *,
tokenizer_config, torch_dtype, device, encoders, denoiser)`; `encode(rows)`, `collate(samples)` and
`velocity(dit, batch, noisy_latents, sigma)`.

A row is `{"prompt": str, "video": [3, F, H, W] in [-1, 1]}` (F = 1 + 4k, see `--num_frames`) or
`{"prompt": str, "image": [3, H, W]}`, which trains as a one-frame video. It is encoded as the pipeline
encodes: the prompt through `WanVideoPipeline.encode_prompt` (umT5, zero-padded to `max_sequence_length`
tokens) and the video through the causal VAE (posterior mode, normalised latents), giving
`{"latents": [z, 1 + (F - 1) / 4, H / 8, W / 8], "text": [L, D]}`. The model call is `wan_velocity`, the
pipeline's per-step call, with the timestep `1000 * sigma` as the denoise loop gives it; the noise levels and
loss weights come from the "wan" flow-matching template (shift 5).

Text-to-video DiTs (Wan 2.1 T2V, one Wan 2.2 T2V expert) are supported; image-conditioned DiTs (I2V, FLF2V,
TI2V) are refused with a clear error for now.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from diffsynth.runtime.errors import ConfigError, preview
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.schedulers import FlowMatchScheduler
from diffsynth.runtime.training_support import PipelineTrainingTask, load_partial_pipeline, model_roles

from .pipeline import WanVideoPipeline, module_dtype, wan_velocity

logger = logging.getLogger(__name__)

ENCODER_SLOTS = ("vae", "text_encoder")


class WanTrainingTask(PipelineTrainingTask):
    """Turns rows into Wan inputs and runs the pipeline's per-step DiT call (see the module docstring)."""

    family: ClassVar[str] = "wan"
    denoiser_slot: ClassVar[str] = "dit"
    size_multiple: ClassVar[int] = WanVideoPipeline.size_multiple
    media: ClassVar[tuple[str, ...]] = ("video", "image")

    def __init__(self, pipe: WanVideoPipeline, *, sigma_shift: float = 5.0, max_sequence_length: int = 512):
        self.pipe = pipe
        self.scheduler = FlowMatchScheduler("wan", shift=sigma_shift)
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
    ) -> WanTrainingTask:
        """Load the models a stage needs: the DiT (`denoiser`) and/or the VAE, umT5 text encoder and tokenizer
        (`encoders`). Files of models not needed are recognised from their headers and not loaded."""
        configs = _one_model_each(model_configs)
        if any("image_encoder" in model_roles(c) for c in configs):
            raise ConfigError(
                "Wan training supports text-to-video models so far; the given files hold a CLIP image encoder "
                "(an I2V / FLF2V model): train a T2V model, or leave the image encoder out"
            )
        if encoders and tokenizer_config is None:
            tokenizer_config = _tokenizer_beside(model_configs)
        pipe = load_partial_pipeline(
            WanVideoPipeline,
            configs,
            ({"dit"} if denoiser else set()) | (set(ENCODER_SLOTS) if encoders else set()),
            tokenizers=("tokenizer",) if encoders else (),
            name="Wan",
            tokenizer_config=tokenizer_config if encoders else None,
            torch_dtype=torch_dtype,
            device=device,
        )
        if pipe.dit2 is not None:
            raise ConfigError(
                "the given files hold two Wan DiTs (the Wan 2.2 A14B high- and low-noise experts); train one "
                "expert at a time: pass only its files with --model_paths"
            )
        if pipe.dit is not None and pipe.dit.config.model_type != "t2v":
            raise ConfigError(
                f"Wan training supports text-to-video DiTs so far; this DiT is {pipe.dit.config.model_type!r}"
            )
        return cls(pipe, **task_options)

    # ------------------------------------------------------------------ the protocol
    def encode(self, rows: list[Mapping[str, Any]]) -> list[dict[str, torch.Tensor]]:
        """`{"latents": [z, T, H/8, W/8], "text": [L, D]}` per row."""
        pipe = self.pipe
        videos = [self._video(i, row) for i, row in enumerate(rows)]
        context = pipe.encode_prompt([str(row["prompt"]) for row in rows], self.max_sequence_length)
        dtype = module_dtype(pipe.vae)
        latents = [pipe.vae.encode(video[None].to(pipe.device, dtype))[0].float() for video in videos]
        return [{"latents": lat, "text": ctx} for lat, ctx in zip(latents, context, strict=True)]

    def _video(self, index: int, row: Mapping[str, Any]) -> torch.Tensor:
        """The row's video `[3, F, H, W]` (an image is one frame), checked against the VAE."""
        video, image = row.get("video"), row.get("image")
        if "prompt" not in row or not isinstance(video if video is not None else image, torch.Tensor):
            raise ConfigError(
                f"Wan trains on rows with a video (or image) and a prompt; row {index} of the batch has {preview(row)}"
            )
        if video is None:
            video = image[:, None] if image.dim() == 3 else image
        if video.dim() != 4 or video.shape[0] != 3:
            raise ConfigError(f"row {index}: the video must be [3, F, H, W], got {tuple(video.shape)}")
        tc = self.pipe.vae.temporal_compression
        frames = video.shape[1]
        if (frames - 1) % tc:
            raise ConfigError(
                f"row {index}: the video has {frames} frames; Wan needs 1 + {tc}k frames (set --num_frames, e.g. "
                f"{max(1, frames - (frames - 1) % tc)})"
            )
        return video

    def collate(self, samples: list[Mapping[str, torch.Tensor]]) -> dict[str, Any]:
        shapes = {tuple(s["latents"].shape) for s in samples}
        if len(shapes) > 1:
            raise ConfigError(
                f"a Wan batch mixes latent shapes {sorted(shapes)}: use one --num_frames for every video, and "
                "do not mix images and videos in one batch (or use --batch_size 1)"
            )
        return {
            "latents": torch.stack([s["latents"] for s in samples]),
            "text": torch.stack([s["text"] for s in samples]),
        }

    def velocity(
        self, dit: nn.Module, batch: Mapping[str, Any], noisy_latents: torch.Tensor, sigma: torch.Tensor
    ) -> torch.Tensor:
        timestep = sigma.to(device=noisy_latents.device, dtype=torch.float32) * self.scheduler.num_train_timesteps
        context = batch["text"].to(noisy_latents.device)
        return wan_velocity(dit, noisy_latents, timestep.expand(noisy_latents.shape[0]), context)


def _one_model_each(configs: Sequence[ModelConfig]) -> list[ModelConfig]:
    """Local configs split as the Wan hub layout means them: each `.pth`/`.bin`/`.ckpt` is one model, the
    `.safetensors` of one folder one (sharded) model. The trainer's `--model <folder>` gives all the files at
    a folder's root as one config, which in a Wan repo holds the VAE, the umT5 encoder and the DiT together."""
    out: list[ModelConfig] = []
    for config in configs:
        paths = [config.path] if isinstance(config.path, str) else list(config.path or ())
        if len(paths) < 2 or config.model_id is not None:
            out.append(config)
            continue
        shards: dict[str, list[str]] = {}
        for path in paths:
            if str(path).endswith(".safetensors"):
                shards.setdefault(str(Path(path).parent), []).append(str(path))
            else:
                out.append(replace(config, path=str(path)))
        out += [replace(config, path=files) for files in shards.values()]
    return out


def _tokenizer_beside(configs: Sequence[ModelConfig]) -> ModelConfig | None:
    """The umT5 tokenizer of a local Wan repo (`google/umt5-xxl/` beside the umT5 file), when one is there."""
    for config in configs:
        for path in [config.path] if isinstance(config.path, str) else list(config.path or ()):
            folder = Path(path).parent / "google" / "umt5-xxl"
            if (folder / "tokenizer_config.json").is_file():
                return ModelConfig(path=str(folder))
    return None


__all__ = ["WanTrainingTask"]
