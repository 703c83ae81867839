"""FLUX.1's training task, for the DiffSynth trainer (`diffsynth-train`, package diffsynth-training).

It implements the trainer's `TrainingTask` protocol structurally (this package does not depend on the
trainer): class attributes `family`, `denoiser_slot`, `size_multiple`, `media`; a `scheduler`; `models`,
`model_files` and `sample` (the runtime's `PipelineTrainingTask`; a Kontext model's validation samples take
their references as `kontext_images`); `from_pretrained(model_configs, *,
tokenizer_config, torch_dtype, device, encoders, denoiser)`; `encode(rows)`, `collate(samples)` and
`velocity(dit, batch, noisy_latents, sigma)`.

A row is `{"prompt": str, "image": [3, H, W] in [-1, 1]}` (text-to-image), plus for FLUX.1 Kontext
`"kontext_images"`: one reference image or a list (tensors [3, h, w] in [-1, 1] at their own size, as the
trainer's dataset reads the `conditioning` column; PIL images or paths work too). It is encoded as the
pipeline encodes: the prompt through `FluxImagePipeline.encode_prompt` (CLIP-L pooled output, T5 states padded
to `t5_sequence_length`, the pipeline's setting: 512 for dev), the image through the FLUX.1 AutoencoderKL
(posterior mean, shifted and scaled latents) and the references through `load_kontext_images` +
`encode_kontext` (each rounded down to multiples of 16, or with `kontext_auto_resize` moved to the nearest
Kontext resolution; VAE-encoded, packed, ids (1, row, col)), giving `{"latents": [16, H/8, W/8], "t5": [512, D],
"pooled": [D']}` and with references `"kontext": [N, 64]`, `"kontext_ids": [N, 3]`. The model call is
`flux_velocity`, the pipeline's per-step call (2x2 packing, position ids, the reference tokens appended and the
output cut back to the image's), with the distilled guidance embedded at `embedded_guidance` = 1.0 as
DiffSynth-Studio trains FLUX.1-dev and Kontext-dev (models without a guidance embedder ignore it). Noise levels
and loss weights: the "flux1" template at a static shift 3 (`mu = ln 3`), DiffSynth-Studio's FLUX.1 training
schedule (it spans sigma 1 .. 0.003 where ours spans 1 .. 0.001; the shift is the same).

References are sized as DiffSynth-Studio's trainer sizes them: the dataset shrinks each under `--max_pixels`
keeping its aspect ratio (not to the target's size); the pipeline's own Kontext auto-resize is off unless asked.
A Kontext model (a file, folder or hub repo named "Kontext", or `kontext=True`) refuses rows without references;
rows of one batch must agree on having references and on their sizes (`--batch_size 1` always does).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from diffsynth.runtime.errors import ConfigError, preview
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.schedulers import FlowMatchScheduler
from diffsynth.runtime.training_support import PipelineTrainingTask, load_partial_pipeline
from diffsynth.runtime.vram import module_dtype

from .flux1.text_encoder import T5_SEQUENCE_LENGTH, FluxPromptEmbeds
from .pipeline import FluxImagePipeline, KontextLatents, flux_velocity
from .reference_batches import collate_references, row_references

logger = logging.getLogger(__name__)

ENCODER_SLOTS = ("vae", "text_encoder_1", "text_encoder_2")
TRAINING_GUIDANCE = 1.0  # DiffSynth-Studio's FLUX.1 training scripts: embedded_guidance=1


class FluxTrainingTask(PipelineTrainingTask):
    """Turns rows into FLUX.1 inputs and runs the pipeline's per-step DiT call (see the module docstring)."""

    family: ClassVar[str] = "flux"
    denoiser_slot: ClassVar[str] = "dit"
    size_multiple: ClassVar[int] = FluxImagePipeline.size_multiple
    media: ClassVar[tuple[str, ...]] = ("image",)
    conditioning: ClassVar[tuple[str, ...]] = ("kontext_images",)

    loss_options: ClassVar[tuple[str, ...]] = (
        "sigma_shift",
        "embedded_guidance",
    )  # --task_options that leave a cache valid

    def __init__(
        self,
        pipe: FluxImagePipeline,
        *,
        sigma_shift: float = 3.0,
        embedded_guidance: float = TRAINING_GUIDANCE,
        t5_sequence_length: int = T5_SEQUENCE_LENGTH,
        kontext: bool | None = None,
        kontext_auto_resize: bool = False,
    ):
        """`kontext`: True requires `kontext_images` in every row, None takes them where rows have them."""
        self.pipe = pipe
        self.scheduler = FlowMatchScheduler("flux1", mu=math.log(sigma_shift))
        self.embedded_guidance = embedded_guidance
        self.t5_sequence_length = t5_sequence_length
        self.kontext = kontext
        self.kontext_auto_resize = kontext_auto_resize
        # a Kontext model's validation samples are edits of their references: without them they say little
        self.validation_references = "expected" if kontext else "optional"

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
    ) -> FluxTrainingTask:
        """Load the models a stage needs: the DiT (`denoiser`) and/or the VAE, CLIP-L and T5 encoders and their
        tokenizers (`encoders`). `tokenizer_config` names either tokenizer folder (`tokenizer/`, CLIP, or
        `tokenizer_2/`, T5); the other is taken beside it. Without one, the tokenizers are looked for beside the
        model files. Files of models not needed are recognised from their headers and not loaded.

        The T5 length is the pipeline's: the preset's or the model folder's `diffsynth.json` setting (schnell:
        256), else 512. A Kontext preset, or model files named like one (`flux1-kontext-dev.safetensors`, a
        `FLUX.1-Kontext-dev` folder or repo), makes a Kontext task unless `kontext` is given."""
        tokenizers = _tokenizer_pair(tokenizer_config, model_configs) if encoders else (None, None)
        pipe = load_partial_pipeline(
            FluxImagePipeline,
            model_configs,
            ({"dit"} if denoiser else set()) | (set(ENCODER_SLOTS) if encoders else set()),
            tokenizers=("tokenizer_1", "tokenizer_2") if encoders else (),
            name="FLUX.1",
            tokenizer_1_config=tokenizers[0],
            tokenizer_2_config=tokenizers[1],
            torch_dtype=torch_dtype,
            device=device,
        )
        defaults = pipe.defaults  # the preset's or the model folder's (load_partial_pipeline)
        task_options.setdefault("t5_sequence_length", defaults.get("t5_sequence_length", T5_SEQUENCE_LENGTH))
        kontext = "kontext_auto_resize" in defaults or any(map(_names_kontext, model_configs))
        task_options.setdefault("kontext", True if kontext else None)
        return cls(pipe, **task_options)

    def reference_arguments(self, images: Sequence[Any]) -> dict[str, Any]:
        """A validation sample's references as the pipeline's `kontext_images`, sized as training sizes them
        (`kontext_auto_resize` of this task, not the pipeline's default)."""
        if not images:
            return {}
        return {"kontext_images": list(images), "kontext_auto_resize": self.kontext_auto_resize}

    # ------------------------------------------------------------------ the protocol
    def encode(self, rows: list[Mapping[str, Any]]) -> list[dict[str, torch.Tensor]]:
        """`{"latents": [16, H/8, W/8], "t5": [L, D], "pooled": [D']}` per row, with `"kontext"` [N, 64] and
        `"kontext_ids"` [N, 3] for a row with references; rows of one call share an image size."""
        for i, row in enumerate(rows):
            if "prompt" not in row or not isinstance(row.get("image"), torch.Tensor):
                raise ConfigError(
                    f"FLUX.1 trains on rows with an image and a prompt; row {i} of the batch has {preview(row)}"
                )
            if self.kontext and not row_references(row, "kontext_images"):
                raise ConfigError(
                    f"row {i} of the batch (prompt {str(row['prompt'])[:60]!r}) has no kontext_images: a FLUX.1 "
                    "Kontext model trains on rows with image, prompt and kontext_images (one path, or a list of "
                    f"paths in JSON metadata); its columns are {', '.join(row)}"
                )
        pipe = self.pipe
        text = pipe.encode_prompt([str(row["prompt"]) for row in rows], self.t5_sequence_length)
        pixels = torch.stack([row["image"] for row in rows]).to(pipe.device, module_dtype(pipe.vae))
        latents = pipe.vae.encode(pixels).float()
        samples = [
            {"latents": lat, "t5": t5, "pooled": pooled}
            for lat, t5, pooled in zip(latents, text.t5, text.pooled, strict=True)
        ]
        for sample, row in zip(samples, rows, strict=True):
            references = row_references(row, "kontext_images")
            if references:
                kontext = pipe.encode_kontext(pipe.load_kontext_images(references, self.kontext_auto_resize))
                sample.update(kontext=kontext.tokens[0], kontext_ids=kontext.ids)
        return samples

    def collate(self, samples: list[Mapping[str, torch.Tensor]]) -> dict[str, Any]:
        """Stacked; the reference tokens too, with the ids they share (one reference layout per batch)."""
        return collate_references(samples, ("latents", "t5", "pooled"), "kontext", "kontext_ids", "kontext_images")

    def velocity(
        self, dit: nn.Module, batch: Mapping[str, Any], noisy_latents: torch.Tensor, sigma: torch.Tensor
    ) -> torch.Tensor:
        prompt = FluxPromptEmbeds(batch["t5"], batch["pooled"])
        kontext = KontextLatents(batch["kontext"], batch["kontext_ids"]) if "kontext" in batch else None
        return flux_velocity(dit, noisy_latents, sigma, prompt, self.embedded_guidance, kontext)


def _names_kontext(config: ModelConfig) -> bool:
    """Whether a model config names a Kontext model: its hub repo, or its file or the two folders above it."""
    names = [config.model_id or "", config.origin_file_pattern or ""]
    for path in [config.path] if isinstance(config.path, str) else list(config.path or ()):
        names += [part for part in Path(path).parts[-3:]]
    return any("kontext" in name.lower() for name in names)


def _tokenizer_pair(
    tokenizer_config: ModelConfig | None, model_configs: Sequence[ModelConfig]
) -> tuple[ModelConfig | None, ModelConfig | None]:
    """The CLIP (`tokenizer/`) and T5 (`tokenizer_2/`) tokenizer configs of a FLUX.1 repo.

    From a hub repo's `tokenizer/` pattern, the same repo's `tokenizer_2/`; from a local folder named either,
    its sibling; without one, the two folders beside the model files (a hub-style folder or the BFL layout)."""
    names = ("tokenizer", "tokenizer_2")
    if tokenizer_config is not None and tokenizer_config.model_id is not None:
        pattern = (tokenizer_config.origin_file_pattern or "tokenizer/").rstrip("/")
        root = pattern.rsplit("/", 1)[0] + "/" if "/" in pattern else ""
        return tuple(
            ModelConfig(
                model_id=tokenizer_config.model_id,
                origin_file_pattern=f"{root}{name}/",
                download_source=tokenizer_config.download_source,
                local_model_path=tokenizer_config.local_model_path,
                skip_download=tokenizer_config.skip_download,
            )
            for name in names
        )
    candidates: list[Path] = []
    if tokenizer_config is not None and tokenizer_config.path is not None:
        path = Path(tokenizer_config.path if isinstance(tokenizer_config.path, str) else tokenizer_config.path[0])
        folder = path if path.is_dir() else path.parent
        if folder.name not in names:
            raise ConfigError(
                f"FLUX.1 needs two tokenizers (CLIP in tokenizer/, T5 in tokenizer_2/); --tokenizer_path {folder} "
                "is neither: pass the repo's tokenizer/ folder, with tokenizer_2/ beside it"
            )
        candidates.append(folder.parent)
    for config in model_configs:
        for path in [config.path] if isinstance(config.path, str) else list(config.path or ()):
            candidates += [Path(path).parent, Path(path).parent.parent]
    for root in candidates:
        if all((root / name / "tokenizer_config.json").is_file() for name in names):
            return tuple(ModelConfig(path=str(root / name)) for name in names)
    return None, None


__all__ = ["FluxTrainingTask"]
