"""FLUX.2's training task, for the DiffSynth trainer (`diffsynth-train --family flux2`, package diffsynth-training).

It implements the trainer's `TrainingTask` protocol structurally (this package does not depend on the
trainer): class attributes `family`, `denoiser_slot`, `size_multiple`, `media`; a `scheduler`; `models`,
`model_files` and `sample` (the runtime's `PipelineTrainingTask`; validation samples take their references as
`edit_image`); `from_pretrained(model_configs, *, tokenizer_config, torch_dtype, device, encoders, denoiser)`;
`encode(rows)`, `collate(samples)` and `velocity(dit, batch, noisy_latents, sigma)`. One task serves
FLUX.2-dev (Mistral-Small-3.1) and FLUX.2-klein / klein-base (Qwen3): the pipeline picks the prompt encoder
from the text encoder it loaded.

A row is `{"prompt": str, "image": [3, H, W] in [-1, 1]}`, plus for editing `"edit_image"`: one reference
image or a list (tensors [3, h, w] in [-1, 1] at their own size, as the trainer's dataset reads the
`conditioning` column; PIL images or paths work too). It is encoded as the pipeline encodes: the prompt through
`Flux2ImagePipeline.encode_prompt` (three inner layers of the text encoder side by side, padded to
`max_sequence_length` tokens: the DiT reads the padding too), the image through the FLUX.2 VAE (posterior mode,
packed 2x2, BatchNorm-normalised, as `vae_encode`) and the references through `load_edit_images` +
`encode_references` (each scaled down to at most 1024x1024 pixels of area and cut to multiples of 16, encoded,
ids (10 * (i + 1), row, col, 0)). That gives `{"latents": [128, H/16, W/16], "prompt_embeds": [L, D]}` and,
with references, `"references": [N, 128]`, `"reference_ids": [N, 4]`. The model call is `flux2_velocity`, the
pipeline's per-step call (reference tokens appended after the image's and cut from the output).

Noise levels and loss weights follow DiffSynth-Studio, whose FLUX.2 recipes (`examples/flux2/model_training/`)
are the published ones for these models (BFL ships no training code; diffusers' DreamBooth scripts draw
timesteps uniformly over their scheduler without the FLUX.2 shift): its "FLUX.2" template on a 1000-step
training grid, `linspace(1, 1/1000, 1000)` shifted exponentially at mu = 0.8 (no token-count shift: it sets
the template up without an image size when training), with its Gaussian loss weights peaked at t = 500. Our
"flux2" template with `mu` fixed gives exactly that grid. FLUX.2-dev's distilled guidance is embedded at
`embedded_guidance` = 1.0 during training, as DiffSynth-Studio's FLUX.2 `train.py` does; the klein models have
no guidance embedder and ignore it.

References are sized as DiffSynth-Studio's trainer sizes them before the pipeline sees them: the dataset
shrinks each under `--max_pixels` keeping its aspect ratio; then the pipeline's rule above applies. Every
FLUX.2 model edits, so rows may come with or without references, but the rows of one batch must agree on having
them and on their sizes (`--batch_size 1` always does).

LoRA: the trainer wraps `Flux2DiT.lora_target_modules` (BFL's module names: fused `img_attn.qkv`, `linear1`,
...). `--lora_formats diffsynth` (the default) is what our pipeline's `load_lora` reads; add `kohya` for a file
diffusers' `Flux2Pipeline.load_lora_weights` / `Flux2KleinPipeline.load_lora_weights` and ComfyUI load (diffusers
splits the fused qkv LoRAs into its to_q / to_k / to_v itself).

Full fine-tuning: the trainer's `step-N/dit/` file is in the layout of the DiT file it trained from
(`export_state`): diffusers' `Flux2Transformer2DModel` names beside the `transformer/` folder's `config.json`, so
it replaces that folder's weights for diffusers and our pipeline alike; BFL's names for a BFL single file.
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
from diffsynth.runtime.vram import module_dtype

from ..reference_batches import collate_references, row_references
from .dit import Flux2DiT
from .formats import DIFFUSERS_SIGNATURE, ours_to_diffusers
from .pipeline import Flux2ImagePipeline, ReferenceLatents, flux2_velocity
from .text_encoder import MAX_SEQUENCE_LENGTH
from .vae import Flux2VAE

logger = logging.getLogger(__name__)

ENCODER_SLOTS = ("vae", "text_encoder")
TRAINING_MU = 0.8  # DiffSynth-Studio's "FLUX.2" template set up for training (no dynamic shift length)
TRAINING_GUIDANCE = 1.0  # DiffSynth-Studio's FLUX.2 train.py: embedded_guidance=1.0


class Flux2TrainingTask(PipelineTrainingTask):
    """Turns rows into FLUX.2 inputs and runs the pipeline's per-step DiT call (see the module docstring)."""

    family: ClassVar[str] = "flux2"
    denoiser_slot: ClassVar[str] = "dit"
    size_multiple: ClassVar[int] = Flux2ImagePipeline.size_multiple
    media: ClassVar[tuple[str, ...]] = ("image",)
    conditioning: ClassVar[tuple[str, ...]] = ("edit_image",)

    loss_options: ClassVar[tuple[str, ...]] = (
        "exponential_shift_mu",
        "embedded_guidance",
    )  # --task_options that leave a cache valid
    validation_references: str = "optional"  # every FLUX.2 model draws with or without references

    def __init__(
        self,
        pipe: Flux2ImagePipeline,
        *,
        exponential_shift_mu: float = TRAINING_MU,
        embedded_guidance: float = TRAINING_GUIDANCE,
        max_sequence_length: int = MAX_SEQUENCE_LENGTH,
    ):
        """`exponential_shift_mu` bends the training noise levels towards high noise (DiffSynth-Studio: 0.8);
        `embedded_guidance` is what FLUX.2-dev's guidance embedder sees; `max_sequence_length` is the padded
        prompt length (the pipeline's 512)."""
        if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) or max_sequence_length < 1:
            raise ConfigError(f"max_sequence_length={max_sequence_length!r} is not accepted; use an integer >= 1")
        self.pipe = pipe
        self.scheduler = FlowMatchScheduler("flux2", mu=float(exponential_shift_mu))
        self.embedded_guidance = float(embedded_guidance)
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
    ) -> Flux2TrainingTask:
        """Load the models a stage needs: the DiT (`denoiser`) and/or the VAE, text encoder and tokenizer
        (`encoders`). Without `tokenizer_config` the `tokenizer/` folder beside the model files is used (a
        hub-style folder). Files of models not needed are recognised from their headers and not loaded.

        The prompt length is the pipeline's 512 unless the model folder's `diffsynth.json` (or `task_options`)
        says otherwise; validation samples use the same length."""
        if encoders and tokenizer_config is None:
            tokenizer_config = _tokenizer_beside(model_configs)
        pipe = load_partial_pipeline(
            Flux2ImagePipeline,
            model_configs,
            ({"dit"} if denoiser else set()) | (set(ENCODER_SLOTS) if encoders else set()),
            tokenizers=("tokenizer",) if encoders else (),
            name="FLUX.2",
            tokenizer_config=tokenizer_config if encoders else None,
            torch_dtype=torch_dtype,
            device=device,
        )
        _check_models(pipe)
        task_options.setdefault("max_sequence_length", pipe.defaults.get("max_sequence_length", MAX_SEQUENCE_LENGTH))
        return cls(pipe, **task_options)

    def reference_arguments(self, images: Sequence[Any]) -> dict[str, Any]:
        """A validation sample's references as the pipeline's `edit_image`."""
        return {"edit_image": list(images)} if images else {}

    def sample(self, denoiser: nn.Module, prompts: Sequence[str], *, seed: int, references=None, **options: Any):
        """The runtime's validation samples, with prompts padded to this task's length (the pipeline's own
        default is 512)."""
        options.setdefault("max_sequence_length", self.max_sequence_length)
        return super().sample(denoiser, prompts, seed=seed, references=references, **options)

    # ------------------------------------------------------------------ the protocol
    def encode(self, rows: list[Mapping[str, Any]]) -> list[dict[str, torch.Tensor]]:
        """`{"latents": [128, H/16, W/16], "prompt_embeds": [L, D]}` per row, with `"references"` [N, 128] and
        `"reference_ids"` [N, 4] for a row with edit images; rows of one call share an image size."""
        for i, row in enumerate(rows):
            if "prompt" not in row or not isinstance(row.get("image"), torch.Tensor):
                raise ConfigError(
                    f"FLUX.2 trains on rows with an image and a prompt; row {i} of the batch has {preview(row)}"
                )
        pipe = self.pipe
        if pipe.vae is None or pipe.text_encoder is None:
            raise ConfigError(
                "this FLUX.2 training task was built without its encoders (encoders=False): it cannot encode"
            )
        prompt_embeds = pipe.encode_prompt([str(row["prompt"]) for row in rows], self.max_sequence_length)
        pixels = torch.stack([row["image"] for row in rows]).to(pipe.device, module_dtype(pipe.vae))
        latents = pipe.vae.encode(pixels).float()  # what `vae_encode` does after its PIL -> tensor step
        samples = [{"latents": lat, "prompt_embeds": emb} for lat, emb in zip(latents, prompt_embeds, strict=True)]
        for i, (sample, row) in enumerate(zip(samples, rows, strict=True)):
            references = row_references(row, "edit_image")
            if references:
                try:
                    images = pipe.load_edit_images(references)
                except ConfigError as exc:
                    raise ConfigError(f"row {i} of the batch (prompt {str(row['prompt'])[:60]!r}): {exc}") from None
                encoded = pipe.encode_references(images)
                sample.update(references=encoded.tokens[0], reference_ids=encoded.ids)
        return samples

    def collate(self, samples: list[Mapping[str, torch.Tensor]]) -> dict[str, Any]:
        """Stacked; the reference tokens too, with the ids they share (one reference layout per batch)."""
        return collate_references(samples, ("latents", "prompt_embeds"), "references", "reference_ids", "edit_image")

    def velocity(
        self, dit: nn.Module, batch: Mapping[str, Any], noisy_latents: torch.Tensor, sigma: torch.Tensor
    ) -> torch.Tensor:
        references = ReferenceLatents(batch["references"], batch["reference_ids"]) if "references" in batch else None
        return flux2_velocity(dit, noisy_latents, sigma, batch["prompt_embeds"], self.embedded_guidance, references)

    def export_state(self, slot: str, state: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """A full fine-tune's DiT in the layout of the file it was trained from, so the export replaces it: diffusers'
        `Flux2Transformer2DModel` names (fused qkv split into to_q / to_k / to_v, ...) for a `transformer/` folder,
        whose `config.json` the trainer copies beside; our (BFL) names, as they are, for BFL's single files."""
        if slot != "dit" or not loaded_from_diffusers_layout(self.model_files.get(slot), DIFFUSERS_SIGNATURE[0]):
            return state
        return ours_to_diffusers(dict(state))

    def inference_sigmas(self, latent_shape: Sequence[int], num_inference_steps: int) -> torch.Tensor:
        """FLUX.2's sampling schedule for this size (BFL's empirical shift of its H/16 * W/16 tokens and the step
        count, the pipeline's): what `--task direct_distill` steps along, at the task's embedded guidance."""
        scheduler = FlowMatchScheduler("flux2")
        scheduler.set_timesteps(num_inference_steps, image_seq_len=latent_shape[-2] * latent_shape[-1])
        return scheduler.sigmas

    def hidden_features(
        self, dit: nn.Module, batch: Mapping[str, Any], noisy_latents: torch.Tensor, sigma: torch.Tensor, indices
    ) -> list[torch.Tensor]:
        """The image tokens' hidden states after the DiT blocks `indices` (double blocks first, then single ones,
        as DiffSynth-Studio's DMD2 counts them) as `[B, hidden, H/16, W/16]` maps, for `--task dmd2`'s
        discriminator. The call is `velocity`'s, with forward hooks on those blocks (the first call of each:
        not a KV model's reference pass, nor a gradient-checkpointing recompute, which runs after the hooks
        are gone)."""
        blocks = [*dit.double_blocks, *dit.single_blocks]
        bad = [i for i in indices if not 0 <= i < len(blocks)]
        if bad:
            raise ConfigError(
                f"--dmd2_feature_indices {','.join(map(str, bad))}: this FLUX.2 DiT has {len(blocks)} blocks (0 to "
                f"{len(blocks) - 1}: {len(dit.double_blocks)} double-stream, then single-stream)"
            )
        b, _, h, w = noisy_latents.shape
        n_txt, n_double, found = batch["prompt_embeds"].shape[1], len(dit.double_blocks), {}

        def keeper(index: int):
            def keep(module, args, output):
                if index in found:
                    return
                if index < n_double:
                    if not isinstance(output[1], torch.Tensor):  # a KV model's reference pass: (img, (k, v))
                        return
                    tokens = output[0][:, : h * w]  # references, when appended, come after the image
                elif isinstance(output, tuple):  # a KV model's reference pass
                    return
                else:
                    tokens = output[:, n_txt : n_txt + h * w]
                found[index] = tokens.transpose(1, 2).reshape(b, -1, h, w)

            return keep

        handles = [blocks[i].register_forward_hook(keeper(i)) for i in set(indices)]
        try:
            self.velocity(dit, batch, noisy_latents, sigma)
        finally:
            for handle in handles:
                handle.remove()
        return [found[i] for i in indices]


def loaded_from_diffusers_layout(files: Sequence[str] | None, signature_key: str) -> bool:
    """Whether a model's files hold diffusers' names (`signature_key`, e.g. `x_embedder.weight`), read from their
    headers: the trainer's full-weight export is written back in that layout."""
    if not files:
        return False
    from diffsynth.runtime.checkpoint import open_checkpoint

    return signature_key in open_checkpoint(list(files))


def _check_models(pipe: Flux2ImagePipeline) -> None:
    """FLUX.1 files also hold a 'dit' and a 'vae': refuse them here rather than fail inside the first step."""
    for slot, expected in (("dit", Flux2DiT), ("vae", Flux2VAE)):
        model = getattr(pipe, slot)
        if model is not None and not isinstance(model, expected):
            config = pipe.model_configs[slot]
            raise ConfigError(
                f"the {slot} given to FLUX.2 training ({config.path or config.model_id}) is a {type(model).__name__}, "
                f"not a {expected.__name__}: it belongs to another family (FLUX.1 trains with --family flux)"
            )


def _tokenizer_beside(model_configs: Sequence[ModelConfig]) -> ModelConfig | None:
    """The `tokenizer/` folder beside the model files (a hub-style folder: `transformer/`, `tokenizer/`, ...)."""
    for config in model_configs:
        for path in [config.path] if isinstance(config.path, str) else list(config.path or ()):
            for root in (Path(path).parent, Path(path).parent.parent):
                if (root / "tokenizer" / "tokenizer_config.json").is_file():
                    return ModelConfig(path=str(root / "tokenizer"))
    return None


__all__ = ["Flux2TrainingTask"]
