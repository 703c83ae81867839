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

With a Z-Image Fun ControlNet among the model files (the pipeline's `controlnet` slot; one net), rows may carry
`controlnet_image` (DiffSynth-Studio's column: the control map aligned with the target, a [3, H, W] tensor in
[-1, 1] as the dataset reads a `--data_file_keys` column at the row's size, or a PIL image / path), optional
`controlnet_scale` (default 1, as `ControlNetInput`) and, for the 2.x nets, `controlnet_inpaint_image` with
`controlnet_inpaint_mask` (DiffSynth-Studio maps every `controlnet_*` column onto a `ControlNetInput` field). Each is
encoded by the pipeline's `encode_control` at the target's size (`"control"`: [C + 1 + C, H/8, W/8] for the 2.x
nets, the mask channel and masked-image latents filled as the pipeline fills them without a mask; `"control_scale"`)
and the model call is `z_image_velocity` with a `ZImageControl`, the pipeline's per-step call under control. Rows
without a control image train the DiT plainly. The DiT trains (LoRA or full) under the frozen net;
`trained_model="controlnet"` (what `--trainable_models controlnet` or `--lora_base_model controlnet` ask the
trainer for: the net is one of the task's `trainable_slots`) trains the net under the frozen DiT instead: the
trainer's model is then the net, saved as `<step>/controlnet/diffusion_pytorch_model.safetensors` with the official
keys, and every row needs a control. Validation samples take `--validation_images` as the control image.
"""

from __future__ import annotations

import logging
import re
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from diffsynth.runtime.controlnet import ControlNetInput, ControlNetSlot
from diffsynth.runtime.errors import ConfigError, preview
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.media import tensor_to_pil
from diffsynth.runtime.pipeline import weight_paths
from diffsynth.runtime.schedulers import FlowMatchScheduler
from diffsynth.runtime.training_support import PipelineTrainingTask, load_partial_pipeline
from diffsynth.runtime.vram import module_dtype

from .controlnet import ZImageControl, ZImageControlNet
from .pipeline import ZImagePipeline, z_image_omni_velocity, z_image_velocity

logger = logging.getLogger(__name__)

ENCODER_SLOTS = ("vae", "text_encoder")
EDIT_COLUMN = "edit_image"  # DiffSynth-Studio's Z-Image Omni column, the pipeline's argument
SIGLIP_FILE = "Tongyi-MAI/Z-Image-Omni-Base:siglip/model.safetensors"
CONTROL_COLUMN = "controlnet_image"  # DiffSynth-Studio's: `controlnet_<field>` columns fill a `ControlNetInput`
CONTROL_FIELDS = {"controlnet_image": "image", "controlnet_inpaint_image": "inpaint_image"}
CONTROL_MASK = "controlnet_inpaint_mask"
CONTROL_SCALE = "controlnet_scale"
CONTROLNET_FILE = "PAI/Z-Image-Turbo-Fun-Controlnet-Union-2.1:Z-Image-Turbo-Fun-Controlnet-Union-2.1.safetensors"
TRAINED_MODELS = ("dit", "controlnet")  # `trained_model`: what the trainer trains (its "denoiser")


class ZImageTrainingTask(PipelineTrainingTask):
    """Turns rows into Z-Image inputs and runs the pipeline's per-step DiT call (see the module docstring)."""

    family: ClassVar[str] = "z_image"
    denoiser_slot: ClassVar[str] = "dit"
    size_multiple: ClassVar[int] = ZImagePipeline.size_multiple
    media: ClassVar[tuple[str, ...]] = ("image",)
    conditioning: ClassVar[tuple[str, ...]] = (EDIT_COLUMN,)  # Omni's condition images, read as files
    ragged_conditioning: ClassVar[bool] = True  # each row's own list: a batch mixes their counts and sizes
    loss_options: ClassVar[tuple[str, ...]] = ("sigma_shift", "trained_model")  # options that leave a cache valid
    # models the trainer may train in the denoiser's place (`trained_model`, from --trainable_models)
    trainable_slots: ClassVar[tuple[str, ...]] = ("controlnet",)
    # an Omni DiT's SigLIP embedder and refiner get no gradient from text-to-image rows: DDP looks for them
    ddp_find_unused_parameters: ClassVar[bool] = True

    def __init__(
        self,
        pipe: ZImagePipeline,
        *,
        sigma_shift: float = 3.0,
        max_sequence_length: int = 512,
        trained_model: str = "dit",
    ):
        """`trained_model` "controlnet" makes the loaded Fun ControlNet the model the trainer trains (see the
        module docstring)."""
        self.pipe = pipe
        self.scheduler = FlowMatchScheduler("z_image", shift=sigma_shift)
        self.max_sequence_length = max_sequence_length
        # Omni: the loaded DiT says; without it (encoding only) the SigLIP2 encoder (`from_pretrained` reads the
        # DiT file's header instead when it is given)
        self.omni = bool(pipe.dit.config.omni) if pipe.dit is not None else pipe.image_encoder is not None
        self._check_trained_model(trained_model)

    @property
    def controlnet(self) -> ZImageControlNet | None:
        """The loaded Fun ControlNet (the task takes one), or None."""
        nets = self.pipe.controlnets()
        return nets[0] if nets else None

    def _check_trained_model(self, trained_model: str) -> None:
        if trained_model not in TRAINED_MODELS:
            raise ConfigError(f"trained_model={trained_model!r} is not accepted; use one of {TRAINED_MODELS}")
        self.trained_model = trained_model
        nets = self.pipe.controlnets()
        if len(nets) > 1:
            raise ConfigError(
                f"the given files hold {len(nets)} Z-Image ControlNets; training takes one: leave the others out"
            )
        if nets and self.omni:
            raise ConfigError("the Fun ControlNets are not Omni nets: train them with Z-Image-Turbo, not an Omni DiT")
        if trained_model == "dit":
            return
        if not nets:
            raise ConfigError(
                "trained_model='controlnet' (--trainable_models controlnet / --lora_base_model controlnet) trains a "
                f"Z-Image Fun ControlNet: add its file (e.g. {CONTROLNET_FILE}) to the models"
            )
        self.denoiser_slot = "controlnet"  # the trainer trains (and saves) the net, not the DiT
        # --use_gradient_checkpointing sets the net's flag; `velocity` forwards it to the frozen DiT
        nets[0].gradient_checkpointing = False

    @property
    def models(self) -> dict[str, nn.Module]:
        """The loaded models by slot; "controlnet" is the net itself (its state dict has the official keys), not
        the pipeline's slot of nets."""
        models = super().models
        if "controlnet" in models:
            models["controlnet"] = self.controlnet
        return models

    def read_lora(self, path) -> Any:
        """The trainer's `--preset_lora_path`, read as the pipeline reads a LoRA for the trained model (for the
        DiT also ComfyUI's NextDiT names, `lora.convert_z_image_lora`); `--lora_checkpoint` goes through
        `pipe.read_lora` already."""
        return self.pipe.read_lora(path, self.denoiser_slot)

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
            # the ControlNet in both stages: the model call runs it; encoding reads which condition it takes
            optional=("controlnet", "image_encoder") if encoders else ("controlnet",),
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
        """Z-Image Omni's validation samples take `--validation_images` as `edit_image` (or draw from text); with a
        ControlNet they are the control image (needed to see a net in training; without one a DiT trained under
        the net draws from text alone)."""
        if self.controlnet is not None:
            return "required" if self.trained_model == "controlnet" else "expected"
        return "optional" if self.omni else "none"

    def reference_arguments(self, images: Sequence[Any]) -> dict[str, Any]:
        """A validation sample's condition images as the pipeline's `edit_image` (Omni), or its control image as
        `controlnet_inputs` (with a ControlNet)."""
        if self.controlnet is not None:
            if len(images) > 1:
                raise ConfigError(
                    f"{len(images)} images for one validation sample; with a ControlNet it takes one control image"
                )
            if not images:
                if self.trained_model == "controlnet":
                    raise ConfigError(
                        "validation samples of a ControlNet in training need its control image: give "
                        "--validation_images, one control image per --validation_prompts prompt"
                    )
                return {}
            return {"controlnet_inputs": [ControlNetInput(image=images[0])]}
        if not images:
            return {}
        if not self.omni:
            return super().reference_arguments(images)  # refused, naming the flag
        if self.pipe.image_encoder is None:
            raise ConfigError(
                f"validation samples with edit images need Z-Image Omni's SigLIP2 encoder: add {SIGLIP_FILE}"
            )
        return {"edit_image": list(images)}

    def sample(
        self,
        denoiser: nn.Module,
        prompts: Sequence[str],
        *,
        seed: int,
        references: Sequence[Sequence[Any]] | None = None,
        **options: Any,
    ) -> list:
        """Validation samples (see `PipelineTrainingTask.sample`); a ControlNet in training takes the net's place
        in the pipeline and the DiT stays the pipeline's."""
        if self.trained_model != "controlnet":
            return super().sample(denoiser, prompts, seed=seed, references=references, **options)
        with self.pipe.using("controlnet", ControlNetSlot([denoiser])):
            return super().sample(self.pipe.dit, prompts, seed=seed, references=references, **options)

    # ------------------------------------------------------------------ the protocol
    def encode(self, rows: list[Mapping[str, Any]]) -> list[dict[str, torch.Tensor]]:
        """`{"latents": [C, H/8, W/8], "text": [L, D]}` per row; for Z-Image Omni the prompt's segments `"text_k"`
        and per condition image `"edit_k"` / `"siglip_k"`; for a row with a control image `"control"` and
        `"control_scale"` (see the module docstring). Rows of one call share an image size."""
        for i, row in enumerate(rows):
            if "prompt" not in row or not isinstance(row.get("image"), torch.Tensor):
                raise ConfigError(
                    f"Z-Image trains on rows with an image and a prompt; row {i} of the batch has {preview(row)}"
                )
        edits = [self._edit_images(row, i) for i, row in enumerate(rows)]
        controls = [self._control_input(row, i) for i, row in enumerate(rows)]
        pipe = self.pipe
        prompts = [str(row["prompt"]) for row in rows]
        pixels = torch.stack([row["image"] for row in rows]).to(pipe.device, module_dtype(pipe.vae))
        latents = pipe.vae.encode(pixels)
        if not self.omni:
            text = pipe.encode_prompt(prompts, self.max_sequence_length)
            samples = [{"latents": lat, "text": emb} for lat, emb in zip(latents, text, strict=True)]
            for sample, row, item in zip(samples, rows, controls, strict=True):
                if item is not None:
                    sample["control"] = self._encode_control(item, *row["image"].shape[-2:])
                    sample["control_scale"] = torch.tensor(float(item.scale))
            return samples

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
            batch = {"latents": latents, "text": [s["text"] for s in samples]}
            if any("control" in s for s in samples):  # per sample: rows without a control image train plainly
                self._check_control_channels(samples)
                batch["control"] = [s.get("control") for s in samples]
                batch["control_scale"] = [float(s.get("control_scale", 1.0)) for s in samples]
            return batch
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
        controls = batch.get("control") or [None] * noisy_latents.shape[0]
        if self.trained_model == "dit":
            return self._controlled_velocity(dit, self.controlnet, batch, noisy_latents, sigma, controls)
        if any(c is None for c in controls):
            raise ConfigError(
                f"training the ControlNet needs a {CONTROL_COLUMN} in every sample; this batch has "
                f"{sum(c is None for c in controls)} without (list {CONTROL_COLUMN} in --data_file_keys, fill it in "
                "every row, and encode a cache again with the ControlNet among the models)"
            )
        # The net in training: the trainer's `dit` is the net (or DDP's / DeepSpeed's wrapper of it). Its control
        # blocks run after the DiT's layers, outside the net's own forward, where DDP would not see them: the whole
        # model call runs as the net's forward instead, once, through the wrapper (the DiT then calls the net's own
        # forward). The frozen DiT is the pipeline's, with gradient checkpointing as the net was asked for.
        net = self.controlnet
        frozen = self.pipe.dit
        frozen.gradient_checkpointing = bool(getattr(getattr(dit, "module", dit), "gradient_checkpointing", False))

        def whole_call() -> torch.Tensor:
            del net.forward
            return self._controlled_velocity(frozen, net, batch, noisy_latents, sigma, controls)

        net.forward = whole_call
        try:
            return dit()
        finally:
            net.__dict__.pop("forward", None)

    def _check_control_channels(self, samples: list[Mapping[str, torch.Tensor]]) -> None:
        """Control latents (from a cache) encoded for another ControlNet version (Union 2.x: 9 channels, 1.0: 4)
        than the loaded net are refused here, not deep in the DiT's call."""
        net = self.controlnet
        if net is None:
            return  # refused by the model call, which names the missing net
        want = net.config.control_in_dim
        found = sorted({int(s["control"].shape[0]) for s in samples if "control" in s} - {want})
        if found:
            raise ConfigError(
                f"the samples' {CONTROL_COLUMN} latents (the cache in --cache_dir) were encoded for a net taking "
                f"{found[0]} control channels; the loaded ControlNet takes {want}: encode the cache again with this "
                "net (a new --cache_dir, with this net's file among the models)"
            )

    def _controlled_velocity(self, dit, net, batch, noisy_latents, sigma, controls) -> torch.Tensor:
        """`z_image_velocity` with each sample's control; one DiT call per group of samples that share a scale (a
        control's scale is one number) or have no control, put back in batch order."""
        if all(c is None for c in controls):
            return z_image_velocity(dit, noisy_latents, sigma, batch["text"])
        if net is None:
            raise ConfigError(
                f"this batch has {CONTROL_COLUMN} conditions but no Z-Image ControlNet is loaded: add its file to the "
                "models (the one the cache was encoded with)"
            )
        scales = batch["control_scale"]
        groups: dict[float | None, list[int]] = {}
        for i, control in enumerate(controls):
            groups.setdefault(None if control is None else scales[i], []).append(i)
        parts, order = [], []
        for scale, where in groups.items():
            text = [batch["text"][i] for i in where]
            given = () if scale is None else [ZImageControl(net, torch.stack([controls[i] for i in where]), scale)]
            parts.append(z_image_velocity(dit, noisy_latents[where], sigma[where], text, given))
            order += where
        out = torch.cat(parts)
        return out if order == sorted(order) else out[torch.argsort(torch.tensor(order, device=out.device))]

    # ------------------------------------------------------------------ Fun ControlNet
    def _control_input(self, row: Mapping[str, Any], index: int) -> ControlNetInput | None:
        """A row's control (`controlnet_*` columns) as the pipeline's `ControlNetInput`, checked as the pipeline
        checks it; None without one. Dataset tensors go back to PIL images (lossless for 8-bit files)."""
        where = f"row {index} of the batch (prompt {str(row.get('prompt', ''))[:60]!r})"
        for column in (*CONTROL_FIELDS, CONTROL_MASK):
            value = row.get(column)
            if isinstance(value, (list, tuple)):
                raise ConfigError(f"{where}: {column} is a list; a row takes one image there")
            if isinstance(value, str) and _given(value) and not Path(value).is_file():
                raise ConfigError(
                    f"{where}: {column}={value!r} was not read as an image: list {column} in --data_file_keys"
                )
        fields = {
            field: _as_image(row[column])
            for column, field in (*CONTROL_FIELDS.items(), (CONTROL_MASK, "inpaint_mask"))
            if _given(row.get(column))
        }
        if not fields:
            if self.trained_model == "controlnet":
                raise ConfigError(
                    f"{where} has no {CONTROL_COLUMN}: training the ControlNet needs one in every row (list the "
                    "column in --data_file_keys)"
                )
            return None
        named = ", ".join(c for c in (*CONTROL_FIELDS, CONTROL_MASK) if _given(row.get(c)))
        if self.omni:
            raise ConfigError(f"{where} has {named}: the Fun ControlNets are not Omni nets; drop the column")
        if self.controlnet is None:
            raise ConfigError(
                f"{where} has {named}, but no Z-Image ControlNet is loaded: add the net's file to the models (e.g. "
                f"--model_id_with_origin_paths {CONTROLNET_FILE}, or the file in --model_paths), or drop the column"
            )
        scale = row.get(CONTROL_SCALE)
        if _given(scale):
            try:
                fields["scale"] = float(scale)
            except (TypeError, ValueError):
                raise ConfigError(f"{where}: {CONTROL_SCALE}={scale!r} is not a number") from None
        item = ControlNetInput(**fields)
        try:
            self.pipe.check_control_inputs([item])
        except ConfigError as exc:
            message = str(exc).replace("controlnet_inputs[0]", "the row's control").replace(".image", " image")
            raise ConfigError(f"{where}: {message} (columns {', '.join(CONTROL_FIELDS)}, {CONTROL_MASK})") from None
        return item

    def _encode_control(self, item: ControlNetInput, height: int, width: int) -> torch.Tensor:
        """The pipeline's condition latents `[C(, 1 + C), H/8, W/8]` for `item` at the target's size. Encoding
        without the DiT (a cache's first stage) gives `encode_control` the VAE's latent channels for the DiT's."""
        pipe = self.pipe
        if pipe.dit is not None:
            return pipe.encode_control(item, self.controlnet, height, width).control.latents[0]
        shape = types.SimpleNamespace(config=types.SimpleNamespace(in_channels=pipe.vae.config.latent_channels))
        with pipe.using("dit", shape):
            return pipe.encode_control(item, self.controlnet, height, width).control.latents[0]

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


def _given(value: Any) -> bool:
    """Whether a row's column holds something (CSV leaves empty cells as "")."""
    return value is not None and not (isinstance(value, str) and not value.strip())


def _as_image(value: Any):
    """A dataset tensor [3, H, W] in [-1, 1] as the PIL image it was read from; PIL images and paths as given."""
    return tensor_to_pil(value)[0] if isinstance(value, torch.Tensor) else value


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
        paths = weight_paths(config)
        if not paths:
            continue
        state = open_checkpoint(paths)
        for rec in recognise(state.meta_state_dict(), label=checkpoint_label(state.files)):
            if rec.spec.role == "dit":
                return any("siglip_embedder." in key for key in rec.keys)
    return None


__all__ = ["ZImageTrainingTask"]
