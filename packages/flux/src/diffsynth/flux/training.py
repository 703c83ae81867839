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

The training modes each have a module in `flux1_training/`, whose docstring says which rows and model files they
take, what they cache and what they train:
- Kontext references' sizing: `flux1_training/kontext.py`;
- FLUX.1 Tools (Fill, Canny / Depth) and Flex.2: `flux1_training/channels.py`;
- FLUX.1 ControlNets: `flux1_training/controlnet.py`;
- EliGen: `flux1_training/eligen.py`;
- AttriCtrl (the value controller): `flux1_training/value_controller.py`;
- FLUX.1 Redux: `flux1_training/redux.py`;
- Insert Anything: `flux1_training/insert_anything.py`;
- IP-Adapter: `flux1_training/ip_adapter.py`;
- LoRA Encoder: `flux1_training/lora_encoder.py`;
- InfiniteYou (`InfiniteYouInTraining`, `split_infiniteyou_weights`): `flux1_training/infiniteyou.py`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import nn

from diffsynth.runtime.controlnet import ControlNetInput, ControlNetSlot
from diffsynth.runtime.errors import ConfigError, LoRAError, preview
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.schedulers import FlowMatchScheduler, make_scheduler
from diffsynth.runtime.training_support import PipelineTrainingTask, load_partial_pipeline, model_roles
from diffsynth.runtime.vram import module_dtype

from .flux1.channels import CONTROL, FILL, FLEX, condition_kind, describe_widths, flex_condition
from .flux1.controlnet import Flux1ControlNet, Flux1ControlNetConfig
from .flux1.eligen import EliGenEntities
from .flux1.text_encoder import T5_SEQUENCE_LENGTH, FluxPromptEmbeds
from .flux1_training.channels import CHANNEL_COLUMNS as CHANNEL_COLUMNS
from .flux1_training.channels import (
    CHANNEL_MODELS,
    check_condition,
    collate_conditions,
    encode_condition,
    row_channel_kind,
)
from .flux1_training.channels import CONDITION_WIDTHS as CONDITION_WIDTHS
from .flux1_training.controlnet import (
    CONTROLNET_HINT,
    collate_controls,
    control_arguments,
    control_conditions,
    controlnet_for_encoding,
    encode_control,
)
from .flux1_training.eligen import ELIGEN_COLUMNS as ELIGEN_COLUMNS
from .flux1_training.eligen import check_entity_row, collate_entities, encode_entities
from .flux1_training.infiniteyou import (
    IY_EMBEDDING_COLUMNS,
    IY_HINT,
    IY_IMAGE_COLUMNS,
    IY_SLOT,
    InfiniteYouInTraining,
    collate_identities,
    encode_identity,
    export_infiniteyou_state,
    identity_given,
    identity_inputs,
    infiniteyou_sources,
    split_infiniteyou_weights,
    with_identity,
)
from .flux1_training.infiniteyou import IY_EMBEDS as IY_EMBEDS
from .flux1_training.infiniteyou import IY_GUIDANCE as IY_GUIDANCE
from .flux1_training.infiniteyou import IY_GUIDANCE_COLUMNS as IY_GUIDANCE_COLUMNS
from .flux1_training.insert_anything import INSERT_COLUMNS as INSERT_COLUMNS
from .flux1_training.insert_anything import INSERT_MARK, INSERT_SIZE, REDUX_CONDITIONING, insert_anything_row
from .flux1_training.ip_adapter import (
    IP_ADAPTER_HINT,
    IP_COLUMN,
    IP_EMBEDS,
    collate_ip_embeds,
    encode_ip_images,
    ip_adapter_sources,
    ip_keys,
    load_ip_adapter_parts,
)
from .flux1_training.kontext import names_kontext
from .flux1_training.loading import header_configs, header_dit_config, tokenizer_pair
from .flux1_training.lora_encoder import LORA_CACHE as LORA_CACHE
from .flux1_training.lora_encoder import (
    LORA_ENCODER_COLUMN,
    LORA_ENCODER_HINT,
    collate_lora_paths,
    encode_lora_inputs,
    with_lora_tokens,
)
from .flux1_training.redux import REDUX_COLUMN, REDUX_SCALES, encode_redux, redux_sources
from .flux1_training.redux import REDUX_HINT as REDUX_HINT
from .flux1_training.rows import has
from .flux1_training.value_controller import VALUE_COLUMN, VALUE_ENCODER_HINT, parse_values, with_value_tokens
from .pipeline import ControlCondition, FluxImagePipeline, KontextLatents, flux_velocity, pack_latents
from .reference_batches import collate_references, row_references

logger = logging.getLogger(__name__)

ENCODER_SLOTS = ("vae", "text_encoder_1", "text_encoder_2")
TRAINING_GUIDANCE = 1.0  # DiffSynth-Studio's FLUX.1 training scripts: embedded_guidance=1
TRAINING_SHIFT = 3.0  # DiffSynth-Studio's FLUX.1 training grid: static shift 3
# `trained_model`: what the trainer trains
TRAINED_MODELS = ("dit", "controlnet", "value_controller", "ipadapter", "lora_encoder")
UNDER_FROZEN_DIT = ("value_controller", "ipadapter", "lora_encoder")  # trained models the frozen DiT reads


class FluxTrainingTask(PipelineTrainingTask):
    """Turns rows into FLUX.1 inputs and runs the pipeline's per-step DiT call (see the module docstring)."""

    family: ClassVar[str] = "flux"
    denoiser_slot: ClassVar[str] = "dit"
    size_multiple: ClassVar[int] = FluxImagePipeline.size_multiple
    media: ClassVar[tuple[str, ...]] = ("image",)
    # reference pictures read at their own size (under --max_pixels), not the target's; a task with FLUX.1 Redux
    # among its models reads its pictures so too (`REDUX_CONDITIONING`)
    conditioning: tuple[str, ...] = ("kontext_images",)

    loss_options: ClassVar[tuple[str, ...]] = (
        "sigma_shift",
        "embedded_guidance",
        "trained_model",
        "validation_processor_id",
        "validation_value_controller_inputs",
        "validation_lora_encoder_inputs",
    )  # --task_options that leave a cache valid
    # models the trainer may train in the denoiser's place (`trained_model`, from --trainable_models)
    trainable_slots: ClassVar[tuple[str, ...]] = ("controlnet", "value_controller", "ipadapter", "lora_encoder")

    def __init__(
        self,
        pipe: FluxImagePipeline,
        controlnet_config: Flux1ControlNetConfig | None = None,
        value_encoders: int = 0,
        ip_adapter: bool = False,
        lora_encoder: bool = False,
        infiniteyou: bool = False,
        *,
        sigma_shift: float | None = None,
        embedded_guidance: float = TRAINING_GUIDANCE,
        t5_sequence_length: int = T5_SEQUENCE_LENGTH,
        kontext: bool | None = None,
        kontext_auto_resize: bool = False,
        trained_model: str = "dit",
        validation_processor_id: str | int | None = None,
        validation_value_controller_inputs: float | str | Sequence[float] | None = None,
        validation_lora_encoder_inputs: str | Sequence[str] | None = None,
        insert_anything_size: int = INSERT_SIZE,
        infiniteyou_insightface_root: str | None = None,
    ):
        """`kontext`: True requires `kontext_images` in every row, None takes them where rows have them.
        `controlnet_config`: the ControlNet's, read from its file's header when the stage loads no net (default: the
        net `pipe` holds). `trained_model` "controlnet" makes the net the model the trainer trains;
        `validation_processor_id` is a Union net's control mode for validation samples (see
        `flux1_training/controlnet.py`).
        `value_encoders`: how many AttriCtrl encoders the model files hold, read from their headers when the stage
        loads none (default: those `pipe` holds); `trained_model` "value_controller" trains the one encoder, and
        `validation_value_controller_inputs` gives validation samples their values. `insert_anything_size`: the side
        of each half of an Insert Anything row's diptych (the pipeline's `height` for it; 768, the authors').
        `ip_adapter` / `lora_encoder`: whether the model files hold an IP-Adapter / a LoRA Encoder (a stage may
        load neither; default: whether `pipe` holds one); `trained_model` "ipadapter" / "lora_encoder" trains it,
        and `validation_lora_encoder_inputs` is the LoRA file validation samples encode. `infiniteyou`: whether
        InfiniteYou's id projector is among the models (default: whether `pipe` holds it); with it, `trained_model`
        "controlnet" trains InfuseNet and the projector through `InfiniteYouInTraining`;
        `infiniteyou_insightface_root` is the folder holding `models/antelopev2/` for face photos."""
        self.pipe = pipe
        if isinstance(insert_anything_size, bool) or not isinstance(insert_anything_size, int):
            raise ConfigError(f"insert_anything_size={insert_anything_size!r} must be an integer (768, the authors')")
        if insert_anything_size < 16 or insert_anything_size % 16:
            raise ConfigError(f"insert_anything_size={insert_anything_size} must be a multiple of 16 (768)")
        self.insert_anything_size = insert_anything_size
        self.sigma_shift = sigma_shift  # given: the training grid's and `inference_sigmas`' shift
        self.scheduler = FlowMatchScheduler(
            "flux1", mu=math.log(TRAINING_SHIFT if sigma_shift is None else sigma_shift)
        )
        self.embedded_guidance = embedded_guidance
        self.t5_sequence_length = t5_sequence_length
        self.kontext = kontext
        self.kontext_auto_resize = kontext_auto_resize
        nets = pipe.controlnets()
        if len(nets) > 1:
            raise ConfigError(f"the models hold {len(nets)} FLUX.1 ControlNets; training takes one at a time")
        self.controlnet_config = nets[0].config if nets else controlnet_config
        self.validation_processor_id = validation_processor_id
        self._shape_net: Flux1ControlNet | None = None
        if trained_model not in TRAINED_MODELS:
            raise ConfigError(f"trained_model={trained_model!r} is not accepted; use one of {TRAINED_MODELS}")
        self.trained_model = trained_model
        if trained_model == "controlnet":
            if self.controlnet_config is None:
                raise ConfigError(
                    "trained_model='controlnet' (--trainable_models controlnet) trains a FLUX.1 ControlNet, and none "
                    f"is among the model files: {CONTROLNET_HINT}"
                )
            self.denoiser_slot = "controlnet"  # the trainer trains (and saves) the net, not the DiT
        encoders = pipe.value_controller.encoders if pipe.value_controller is not None else None
        self.value_encoders = len(encoders) if encoders is not None else value_encoders
        self.validation_values = None
        if validation_value_controller_inputs is not None:
            self.validation_values = parse_values(
                validation_value_controller_inputs,
                self.value_encoders,
                "--task_options validation_value_controller_inputs",
            )
        if trained_model == "value_controller":
            if self.value_encoders != 1:
                raise ConfigError(
                    "trained_model='value_controller' (--trainable_models value_controller) trains one AttriCtrl "
                    f"encoder, and the model files hold {self.value_encoders}: "
                    + (VALUE_ENCODER_HINT if not self.value_encoders else "pass only the one to train")
                )
            self.denoiser_slot = "value_controller"  # the trainer trains (and saves) the encoder, not the DiT
            if encoders is not None and not hasattr(encoders[0], "gradient_checkpointing"):
                # the trainer's --use_gradient_checkpointing sets it; `velocity` hands it to the frozen DiT
                encoders[0].gradient_checkpointing = False
        self.ip_adapter = ip_adapter or pipe.ipadapter is not None
        self.lora_encoder = lora_encoder or pipe.lora_encoder is not None
        self.validation_lora_encoder_inputs = validation_lora_encoder_inputs
        self._loras: dict[str, Any] = {}  # LoRA files read for the LoRA Encoder, the latest last
        self._lora_layout: nn.Module | None = None  # the DiT's layers on the meta device, to read them onto
        for name, given, hint, what in (
            ("ipadapter", self.ip_adapter, IP_ADAPTER_HINT, "a FLUX.1 IP-Adapter"),
            ("lora_encoder", self.lora_encoder, LORA_ENCODER_HINT, "the LoRA Encoder"),
        ):
            if trained_model != name:
                continue
            if not given:
                raise ConfigError(
                    f"trained_model={name!r} (--trainable_models {name}) trains {what}, and none is among the model "
                    f"files: {hint}"
                )
            self.denoiser_slot = name  # the trainer trains (and saves) it, not the DiT
            model = getattr(pipe, name)
            if model is not None and not hasattr(model, "gradient_checkpointing"):
                model.gradient_checkpointing = False  # set by --use_gradient_checkpointing; handed to the DiT
        self.infiniteyou = infiniteyou or pipe.infiniteyou_projector is not None
        if infiniteyou_insightface_root is not None:
            pipe.infiniteyou_insightface_root = infiniteyou_insightface_root
        self._iy_model: InfiniteYouInTraining | None = None
        if trained_model == "controlnet" and self.infiniteyou:
            self.denoiser_slot = IY_SLOT  # InfuseNet and the projector: `--trainable_models` names its parts

    @property
    def models(self) -> dict[str, nn.Module]:
        """The loaded models by slot; "controlnet" is the one net itself (the pipeline's slot holds a list), so a
        trained net saves under its own names; "value_controller" likewise the one AttriCtrl encoder (several stay
        in the pipeline's `ValueControllers`)."""
        models = super().models
        if "controlnet" in models:
            models["controlnet"] = models["controlnet"].nets[0]
        if "value_controller" in models and len(models["value_controller"].encoders) == 1:
            models["value_controller"] = models["value_controller"].encoders[0]  # saved in the released keys
        projector = self.pipe.infiniteyou_projector
        if self.denoiser_slot == IY_SLOT and "controlnet" in models and projector is not None:
            net = models.pop("controlnet")  # trained inside the wrapper, not beside it
            held = self._iy_model
            if held is None or held.controlnet is not net or held.image_proj_model is not projector:
                self._iy_model = InfiniteYouInTraining(net, projector, self.pipe)
            models[IY_SLOT] = self._iy_model
        return models

    @property
    def model_files(self) -> dict[str, list[str]]:
        """The files each loaded model came from; the InfiniteYou wrapper's are InfuseNet's (its `config.json` is
        written beside the trained weights)."""
        files = super().model_files
        if self.denoiser_slot == IY_SLOT and "controlnet" in files:
            files[IY_SLOT] = files["controlnet"]
        return files

    # the DiT's config read from its files' header when the DiT itself is not loaded (`from_pretrained`)
    dit_config: Any = None
    redux: bool = False  # FLUX.1 Redux is among the model files (loaded with the encoders)

    @property
    def channel_kind(self) -> str | None:
        """FILL or CONTROL for a DiT with a wider input, None for a plain one or when no DiT is known (the rows'
        columns decide). Read from the loaded DiT each time: a control LoRA fused by the trainer widens it."""
        config = self.pipe.dit.config if self.pipe.dit is not None else self.dit_config
        kind = condition_kind(config) if config is not None else None
        return kind if kind in (FILL, CONTROL) else None

    @property
    def validation_references(self) -> str:
        """Fill / Canny / Depth samples need their condition, ControlNet ones their control image; a Kontext model's
        are edits of their references: without them they say little."""
        if self.channel_kind is not None or self.controlnet_config is not None:
            return "required"
        expected = self.kontext or self.redux or self.pipe.flux_redux is not None or self.ip_adapter
        return "expected" if expected else "optional"

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
        `FLUX.1-Kontext-dev` folder or repo), makes a Kontext task unless `kontext` is given.

        A FLUX.1 ControlNet among the files loads with the denoiser (its residuals are part of the model call); the
        encoding stage reads its config from the file's header (whether it is a Union or an inpainting net).
        AttriCtrl encoders load with the denoiser too (their tokens are computed in the model call); the encoding
        stage only counts them.

        FLUX.1 Redux (its embedder and the SigLIP image encoder listed with it, as DiffSynth-Studio lists them) loads
        with the encoders through the pipeline's `load_redux`: its tokens are part of the cached prompt.

        An IP-Adapter's image encoder loads with the encoders (its vectors are cached), the adapter with the
        denoiser (`load_ip_adapter` when a stage loads both); a LoRA Encoder loads with the denoiser.

        InfiniteYou's id projector (`image_proj_model.bin`) loads in both stages (`load_infiniteyou`: the encoding
        stage checks the embeddings' width against it); InfuseNet is the ControlNet among the files."""
        projector, model_configs = infiniteyou_sources(model_configs)
        ip, model_configs = ip_adapter_sources(model_configs)
        redux, model_configs = redux_sources(model_configs)
        if ip is not None and ip[1] is not None:  # the IP-Adapter's image encoder loads with it (not by role)
            model_configs = [config for config in model_configs if config is not ip[1]]
        tokenizers = tokenizer_pair(tokenizer_config, model_configs) if encoders else (None, None)
        controlnets = header_configs(model_configs, "controlnet")
        if len(controlnets) > 1:
            raise ConfigError(
                f"the model files hold {len(controlnets)} FLUX.1 ControlNets; training takes one at a time: pass only "
                "the one to train with"
            )
        pipe = load_partial_pipeline(
            FluxImagePipeline,
            model_configs,
            ({"dit"} if denoiser else set()) | (set(ENCODER_SLOTS) if encoders else set()),
            optional={"controlnet", "value_controller", "lora_encoder"} if denoiser else (),
            tokenizers=("tokenizer_1", "tokenizer_2") if encoders else (),
            name="FLUX.1",
            tokenizer_1_config=tokenizers[0],
            tokenizer_2_config=tokenizers[1],
            torch_dtype=torch_dtype,
            device=device,
        )
        if redux is not None and encoders:
            pipe.load_redux(redux[0], image_encoder=redux[1])
        if ip is not None:
            load_ip_adapter_parts(pipe, *ip, encoders=encoders, denoiser=denoiser)
        if projector is not None:
            if not controlnets:
                raise ConfigError(
                    f"InfiniteYou's id projector {projector} steers InfuseNet, a FLUX.1 ControlNet, which is not among "
                    f"the model files: {IY_HINT}"
                )
            pipe.load_infiniteyou(projector)
        defaults = pipe.defaults  # the preset's or the model folder's (load_partial_pipeline)
        task_options.setdefault("t5_sequence_length", defaults.get("t5_sequence_length", T5_SEQUENCE_LENGTH))
        kontext = "kontext_auto_resize" in defaults or any(map(names_kontext, model_configs))
        task_options.setdefault("kontext", True if kontext else None)
        roles = [model_roles(config) for config in model_configs]
        value_encoders = sum("value_controller" in found for found in roles)
        lora_encoder = any("lora_encoder" in found for found in roles)
        net = controlnets[0] if controlnets else None
        task = cls(pipe, net, value_encoders, ip is not None, lora_encoder, projector is not None, **task_options)
        task.dit_config = pipe.dit.config if pipe.dit is not None else header_dit_config(model_configs)
        task.redux = redux is not None
        if task.redux:
            task.conditioning = (*task.conditioning, *REDUX_CONDITIONING)
        if ip is not None:
            task.conditioning = (*task.conditioning, IP_COLUMN)  # reference pictures: each at its own size
        if projector is not None:
            task.conditioning = (*task.conditioning, *IY_IMAGE_COLUMNS)  # face photos: each at its own size
        if task.dit_config is not None and condition_kind(task.dit_config) == "unknown":
            raise ConfigError(
                f"{describe_widths(task.dit_config)}: its input is neither FLUX.1's, Fill's (384) nor Canny/Depth's "
                "(128), so the task cannot tell what to concatenate to the noisy latents"
            )
        return task

    def reference_arguments(self, images: Sequence[Any]) -> dict[str, Any]:
        """A validation sample's references as the pipeline's arguments: a Fill model's image to fill and its mask
        (`flux_fill_image`, `flux_fill_mask`), a Canny/Depth model's `control_image`, else `kontext_images`, sized
        as training sizes them (`kontext_auto_resize` of this task, not the pipeline's default). With a ControlNet:
        its control image (and the inpainting net's mask) as `controlnet_inputs`. With FLUX.1 Redux among the
        models (and no Kontext DiT): the images as `flux_redux_image`; with an IP-Adapter, as `ipadapter_images`.
        With InfiniteYou: the face photo as `infinityou_id_image`, then optionally InfuseNet's control image."""
        if self.infiniteyou:
            if len(images) not in (1, 2):
                raise ConfigError(
                    "an InfiniteYou validation sample takes the face photo, optionally followed by InfuseNet's control "
                    f"image (black without one), e.g. --validation_images face.png; got {len(images)}"
                )
            arguments: dict[str, Any] = {IY_IMAGE_COLUMNS[0]: images[0]}
            if len(images) == 2:
                arguments["controlnet_inputs"] = [ControlNetInput(image=images[1])]
            return arguments
        if self.controlnet_config is not None:
            return control_arguments(self, images)
        kind = self.channel_kind
        if kind == FILL:
            if len(images) != 2:
                raise ConfigError(
                    f"a {CHANNEL_MODELS[FILL]} model's validation sample takes two images, the image to fill and "
                    f"its mask (white = repaint), e.g. --validation_images 'cup.png,cup_mask.png'; got {len(images)}"
                )
            return {"flux_fill_image": images[0], "flux_fill_mask": images[1]}
        if kind == CONTROL:
            if len(images) != 1:
                raise ConfigError(
                    f"a {CHANNEL_MODELS[CONTROL]} model's validation sample takes one image, the control map (canny "
                    f"edges or depth), e.g. --validation_images depth.png; got {len(images)}"
                )
            return {"control_image": images[0]}
        if not images:
            return {}
        if not self.kontext and (self.redux or self.pipe.flux_redux is not None):
            return {REDUX_COLUMN: list(images)}  # a Redux model's samples take the reference as the rows do
        if not self.kontext and self.ip_adapter:
            return {IP_COLUMN: list(images)}
        return {"kontext_images": list(images), "kontext_auto_resize": self.kontext_auto_resize}

    def sample(self, denoiser: nn.Module, prompts: Sequence[str], **options: Any) -> list:
        """Validation samples with the weights in training: the DiT's, or the ControlNet's (in the pipeline's slot
        for the duration) under the pipeline's DiT, or the AttriCtrl encoder's (`validation_value_controller_inputs`
        gives the samples their values), the IP-Adapter's or the LoRA Encoder's (`validation_lora_encoder_inputs`
        gives the samples their LoRA)."""
        if self.validation_values is not None:
            options.setdefault("value_controller_inputs", self.validation_values)
        if self.validation_lora_encoder_inputs is not None:
            options.setdefault(LORA_ENCODER_COLUMN, self.validation_lora_encoder_inputs)
        if self.trained_model in ("ipadapter", "lora_encoder"):
            with self.pipe.using(self.trained_model, getattr(denoiser, "module", denoiser)):
                return super().sample(self.pipe.dit, prompts, **options)
        if self.trained_model == "value_controller":
            from .flux1.value_control import ValueControllers

            with self.pipe.using("value_controller", ValueControllers([getattr(denoiser, "module", denoiser)])):
                return super().sample(self.pipe.dit, prompts, **options)
        if self.trained_model != "controlnet":
            return super().sample(denoiser, prompts, **options)
        trained = getattr(denoiser, "module", denoiser)
        if isinstance(trained, InfiniteYouInTraining):  # InfuseNet and the projector in the pipeline's places
            projector, self.pipe.infiniteyou_projector = self.pipe.infiniteyou_projector, trained.image_proj_model
            try:
                with self.pipe.using("controlnet", ControlNetSlot([trained.controlnet])):
                    return super().sample(self.pipe.dit, prompts, **options)
            finally:
                self.pipe.infiniteyou_projector = projector
        with self.pipe.using("controlnet", ControlNetSlot([trained])):
            return super().sample(self.pipe.dit, prompts, **options)

    def export_state(self, slot: str, state: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """The trainer's full weights in the official keys: a trained ControlNet in diffusers' `FluxControlNetModel`
        names (the layout its hub files have), an XLabs IP-Adapter in XLabs' names; the DiT in the layout of the
        file it was trained from (diffusers' `FluxTransformer2DModel` names for a `transformer/` folder, whose
        `config.json` the trainer copies beside; BFL's, ours, for a single file); an AttriCtrl encoder, an InstantX
        IP-Adapter (`ip-adapter.bin`'s groups flattened) and the LoRA Encoder as they are (our names are BFL's and
        the released files'); InfiniteYou's InfuseNet and projector each in its released keys under its part's name
        (`export_infiniteyou_state`)."""
        if slot == "dit":
            return self._export_dit(state)
        if slot == IY_SLOT:
            return export_infiniteyou_state(state)
        if slot == "ipadapter":
            from .flux1.ip_adapter import XLABS, ours_to_xlabs

            adapter = self.pipe.ipadapter
            return ours_to_xlabs(dict(state)) if adapter is not None and adapter.config.format == XLABS else state
        if slot != "controlnet":
            return state
        from .flux1.controlnet_formats import ours_to_diffusers

        return ours_to_diffusers(dict(state))

    def _export_dit(self, state: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """The DiT in diffusers' names when it was loaded from them (fused qkv / linear1 split), else as it is."""
        from .flux1.formats import DIFFUSERS_SIGNATURE, ours_to_diffusers
        from .flux2.training import loaded_from_diffusers_layout

        if not loaded_from_diffusers_layout(self.model_files.get("dit"), DIFFUSERS_SIGNATURE[0]):
            return state
        return ours_to_diffusers(dict(state))

    def saved_full_weights(self, slot: str, path: Path) -> list[Path]:
        """After the trainer wrote full weights to `path`: InfiniteYou's two trained models also as their released
        pair beside it (`split_infiniteyou_weights`: `InfuseNetModel/` and `image_proj_model.safetensors`)."""
        if slot != IY_SLOT:
            return []
        return list(split_infiniteyou_weights(path, Path(path).parent))

    def read_lora(self, path) -> Any:
        """The trainer's `--preset_lora_path`, read in FLUX.1's LoRA layouts (BFL, kohya, diffusers, XLabs). A control
        LoRA (FLUX.1-Canny-dev-lora, -Depth-dev-lora) first widens the DiT's `img_in` and replaces its QK-norm scales,
        as `FluxImagePipeline.load_lora` does; the widened `img_in` stays frozen, and the trainer then fuses the
        LoRA's deltas, so the new LoRA trains on FLUX.1-dev + the control LoRA with `control_image` rows."""
        from .flux1.lora import Flux1LoRAWeights, prepare_model

        dit = self.pipe.dit
        if dit is None:
            raise ConfigError("--preset_lora_path needs the DiT loaded")
        lora = self.pipe.read_lora(path, "dit")
        if isinstance(lora, Flux1LoRAWeights) and lora.changes_model:
            prepare_model(dit, lora)  # the widened img_in keeps the frozen base's requires_grad
            logger.info("%s is a control LoRA: the DiT is now %s", lora.source, describe_widths(dit.config))
        return lora

    def lora_target_names(self, names: Sequence[str], module: nn.Module) -> list[str]:
        """The trainer's `--lora_target_modules` on `module`: DiffSynth-Studio's FLUX.1 layer names (its default
        and example list `a_to_qkv,b_to_qkv,ff_a.0,...,to_qkv_mlp`) become ours, so they select the Linears they
        select in DiffSynth-Studio; a name that ends one of `module`'s Linears stays as given."""
        from .flux1.lora_layers import studio_target_names

        linears = [name for name, m in module.named_modules() if isinstance(m, nn.Linear)]
        return studio_target_names(names, linears)

    def lora_layout(self, fmt: str, lora: Any) -> tuple[Any, str | None]:
        """The trained LoRA as the trainer writes it in `--lora_formats fmt`, with the key prefix (None: the
        format's own): a DiT LoRA's `peft` file in diffusers' names under `transformer.` (fused layers split
        exactly), which diffusers' FLUX.1 loader and ComfyUI read; every other file in our (BFL) names. A LoRA
        diffusers' names cannot hold (a LoHa / LoKr or DoRA on a fused layer) stays in BFL names (ComfyUI's)."""
        if fmt != "peft" or self.denoiser_slot != "dit" or self.pipe.dit is None:
            return lora, None
        from .flux1.dit import Flux1DiT
        from .flux1.lora import FLUX1_NAMING, rename_lora

        with torch.device("meta"):
            layout = Flux1DiT(self.pipe.dit.config)
        try:
            return rename_lora(lora, layout, FLUX1_NAMING, "diffusers"), "transformer."
        except LoRAError as error:
            logger.warning("the peft LoRA file keeps BFL names (diffusers' FLUX.1 loader skips them): %s", error)
            return lora, None

    def check_row(self, row: Mapping[str, Any], size: Any) -> None:
        """A metadata row checked at setup (the trainer's dataset calls it; `size(column, name)` is a file's
        (width, height) from its header), so that a bad row stops the run before training, not when its batch
        comes: a Kontext model's row needs `kontext_images`, and EliGen columns come together, one readable mask
        per entity prompt. `encode` checks the same of each batch. The dataset puts the file and row in front."""
        if self.kontext and not has(row, "kontext_images"):
            raise ConfigError(
                "column kontext_images: empty; a FLUX.1 Kontext model trains on rows with image, prompt and "
                "kontext_images (one path, or a list of paths in JSON metadata)"
            )
        check_entity_row(row, size)

    # ------------------------------------------------------------------ the protocol
    def encode(self, rows: list[Mapping[str, Any]]) -> list[dict[str, torch.Tensor]]:
        """`{"latents": [16, H/8, W/8], "t5": [L, D], "pooled": [D']}` per row, with `"kontext"` [N, 64] and
        `"kontext_ids"` [N, 3] for a row with references, and the add-ons' entries their `flux1_training` modules
        list (e.g. `"ipadapter_embeds"` [N, E], `"lora_encoder_inputs"` the LoRA paths' bytes); rows of one call
        share an image size."""
        rows = [insert_anything_row(self, i, row) for i, row in enumerate(rows)]
        kinds = []
        for i, row in enumerate(rows):
            if "prompt" not in row or not isinstance(row.get("image"), torch.Tensor):
                raise ConfigError(
                    f"FLUX.1 trains on rows with an image and a prompt; row {i} of the batch has {preview(row)}"
                )
            kinds.append(row_channel_kind(self, i, row))
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
            if row.get(INSERT_MARK):  # the authors' text states: zeros, the Redux tokens after them
                sample.update(t5=torch.zeros_like(sample["t5"]), pooled=torch.zeros_like(sample["pooled"]))
        for i, (sample, row, kind) in enumerate(zip(samples, rows, kinds, strict=True)):
            references = row_references(row, "kontext_images")
            if references:
                kontext = pipe.encode_kontext(pipe.load_kontext_images(references, self.kontext_auto_resize))
                sample.update(kontext=kontext.tokens[0], kontext_ids=kontext.ids)
            if kind is not None:
                sample["condition"] = encode_condition(self, i, row, kind)
            if has(row, REDUX_COLUMN):
                sample.update(encode_redux(self, i, row, sample))
            elif any(has(row, column) for column in REDUX_SCALES):
                raise ConfigError(
                    f"row {i} of the batch (prompt {str(row['prompt'])[:60]!r}) has "
                    f"{' / '.join(c for c in REDUX_SCALES if has(row, c))} but no {REDUX_COLUMN} to weigh"
                )
        identities = {i: encode_identity(self, i, row) for i, row in enumerate(rows) if identity_given(row)}
        if self.denoiser_slot == IY_SLOT and len(identities) < len(rows):
            i = next(i for i in range(len(rows)) if i not in identities)
            raise ConfigError(
                f"row {i} of the batch (prompt {str(rows[i]['prompt'])[:60]!r}) has no {IY_IMAGE_COLUMNS[0]}: training "
                f"InfuseNet needs every row's face photo (list it in --data_file_keys, e.g. --data_file_keys "
                f"image,{IY_IMAGE_COLUMNS[0]}) or its {IY_EMBEDDING_COLUMNS[1]}; its columns are {', '.join(rows[i])}"
            )
        # an InfiniteYou row without a control image gets the pipeline's default: a black one of the target's size
        rows = [
            {**row, "controlnet_image": Image.new("RGB", tuple(row["image"].shape[:0:-1]))}
            if i in identities and not has(row, "controlnet_image")
            else row
            for i, row in enumerate(rows)
        ]
        controlled = [i for i, row in enumerate(rows) if has(row, "controlnet_image")]
        if self.trained_model == "controlnet" and len(controlled) < len(rows):
            i = next(i for i in range(len(rows)) if i not in controlled)
            raise ConfigError(
                f"row {i} of the batch (prompt {str(rows[i]['prompt'])[:60]!r}) has no controlnet_image: training the "
                "ControlNet needs every row's control image (list it in --data_file_keys, e.g. "
                f"--data_file_keys image,controlnet_image); its columns are {', '.join(rows[i])}"
            )
        if controlled:
            with controlnet_for_encoding(self):
                for i in controlled:
                    samples[i].update(encode_control(self, i, rows[i]))
        for i, identity in identities.items():
            samples[i].update(identity)
        for i, (sample, row) in enumerate(zip(samples, rows, strict=True)):
            sample.update(encode_entities(self, i, row))
            where = f"row {i} of the batch (prompt {str(row['prompt'])[:60]!r})"
            if has(row, VALUE_COLUMN):
                values = parse_values(row[VALUE_COLUMN], self.value_encoders, f"{where}: {VALUE_COLUMN}")
                sample[VALUE_COLUMN] = torch.tensor(values, dtype=torch.float32)  # tokens: in `velocity`
            elif self.trained_model == "value_controller":
                raise ConfigError(
                    f"{where} has no {VALUE_COLUMN}: training the AttriCtrl encoder needs every row's value (a number "
                    f"in [0, 1] in a {VALUE_COLUMN} column); its columns are {', '.join(row)}"
                )
            if has(row, IP_COLUMN):
                sample[IP_EMBEDS] = encode_ip_images(self, i, row)
            elif self.trained_model == "ipadapter":
                raise ConfigError(
                    f"{where} has no {IP_COLUMN}: training the IP-Adapter needs every row's reference picture(s) "
                    f"(listed in --data_file_keys, e.g. --data_file_keys image,{IP_COLUMN}); its columns are "
                    f"{', '.join(row)}"
                )
            if has(row, LORA_ENCODER_COLUMN):
                sample[LORA_ENCODER_COLUMN] = encode_lora_inputs(self, where, row[LORA_ENCODER_COLUMN])
            elif self.trained_model == "lora_encoder":
                raise ConfigError(
                    f"{where} has no {LORA_ENCODER_COLUMN}: training the LoRA Encoder needs every row's LoRA file (a "
                    f"path in a {LORA_ENCODER_COLUMN} column); its columns are {', '.join(row)}"
                )
            if "eligen_t5" in sample and VALUE_COLUMN in sample:
                raise ConfigError(
                    f"{where} has EliGen entities and {VALUE_COLUMN}: the pipeline takes the entity prompts with no "
                    "AttriCtrl tokens after the prompt; give one or the other"
                )
        return samples

    def collate(self, samples: list[Mapping[str, torch.Tensor]]) -> dict[str, Any]:
        """Stacked; the reference tokens too, with the ids they share (one reference layout per batch)."""
        lengths = [s["t5"].shape[0] for s in samples]
        if len(set(lengths)) > 1:
            raise ConfigError(
                f"the rows of a batch have prompts of {lengths} T5 tokens: rows with {REDUX_COLUMN} (whose Redux "
                "tokens follow the prompt's) cannot share a batch with rows without it; give every row its "
                f"{REDUX_COLUMN} (or none), or train with --batch_size 1"
            )
        batch = collate_references(samples, ("latents", "t5", "pooled"), "kontext", "kontext_ids", "kontext_images")
        # InfiniteYou rows first: their control image is InfuseNet's (black when not given)
        batch.update(collate_identities(samples))
        batch.update(collate_conditions(samples))
        batch.update(collate_controls(samples))
        for key, what in (("eligen_t5", "EliGen entities"), (VALUE_COLUMN, VALUE_COLUMN)):
            present = sum(key in s for s in samples)
            if present and present < len(samples):
                raise ConfigError(
                    f"a batch mixes {present} rows with {what} and {len(samples) - present} without; give every row "
                    "its own (or none), or train with --batch_size 1"
                )
        batch.update(collate_entities(samples))
        if VALUE_COLUMN in samples[0]:
            batch[VALUE_COLUMN] = torch.stack([s[VALUE_COLUMN] for s in samples])
        for key, column in ((IP_EMBEDS, IP_COLUMN), (LORA_ENCODER_COLUMN, LORA_ENCODER_COLUMN)):
            present = sum(key in s for s in samples)
            if present and present < len(samples):
                raise ConfigError(
                    f"a batch mixes {present} rows with {column} and {len(samples) - present} without; give every "
                    "row its own (or none), or train with --batch_size 1"
                )
        batch.update(collate_ip_embeds(samples))
        batch.update(collate_lora_paths(samples))
        return batch

    def velocity(
        self, dit: nn.Module, batch: Mapping[str, Any], noisy_latents: torch.Tensor, sigma: torch.Tensor
    ) -> torch.Tensor:
        """The pipeline's per-step call (`flux_velocity`). With `trained_model="controlnet"` (or "value_controller",
        "ipadapter", "lora_encoder"), `dit` is the trainer's model, the ControlNet (the AttriCtrl encoder, the
        IP-Adapter, the LoRA Encoder), and the DiT is the pipeline's (frozen; gradient checkpointing as the trained
        model was asked). EliGen entities, AttriCtrl and LoRA Encoder tokens and IP-Adapter keys/values enter as the
        pipeline's denoise step gives them."""
        trained = None
        if self.trained_model in UNDER_FROZEN_DIT:
            trained, dit = dit, self.pipe.dit
            dit.gradient_checkpointing = bool(
                getattr(getattr(trained, "module", trained), "gradient_checkpointing", False)
            )
        model = {name: trained if self.trained_model == name else None for name in UNDER_FROZEN_DIT}
        infiniteyou = None  # the trained InfuseNet + projector (`InfiniteYouInTraining`, maybe DDP-wrapped)
        if self.denoiser_slot == IY_SLOT:
            infiniteyou, dit, controls = dit, self.pipe.dit, []
        else:
            identity = identity_inputs(self, batch, trained=False)  # checked first: the faces name what is missing
            dit, controls = control_conditions(self, dit, batch)
            controls = with_identity(self, controls, identity)
        prompt = FluxPromptEmbeds(batch["t5"], batch["pooled"])
        prompt = with_value_tokens(self, prompt, batch, model["value_controller"])
        prompt = with_lora_tokens(self, prompt, batch, model["lora_encoder"])
        ip_adapter = ip_keys(self, batch, model["ipadapter"])
        entities = None
        if "eligen_t5" in batch:
            if VALUE_COLUMN in batch:
                raise ConfigError(
                    f"this batch has EliGen entities and {VALUE_COLUMN}: the pipeline takes one or the other"
                )
            entities = EliGenEntities(batch["eligen_t5"], batch["eligen_regions"])
        kontext = KontextLatents(batch["kontext"], batch["kontext_ids"]) if "kontext" in batch else None
        condition = batch.get("condition")
        config = getattr(getattr(dit, "module", dit), "config", None)  # DDP wraps the DiT
        if condition is None and config is not None and condition_kind(config) == FLEX:
            # Flex.2 learns from images and prompts with its empty condition (DiffSynth-Studio trains it so)
            condition = pack_latents(flex_condition(None, None, None, noisy_latents.float()))
        check_condition(self, dit, condition)

        def call(controls: list[ControlCondition]) -> torch.Tensor:
            return flux_velocity(
                dit,
                noisy_latents,
                sigma,
                prompt,
                self.embedded_guidance,
                kontext,
                controls=controls,
                eligen=entities,
                ip_adapter=ip_adapter,
                condition=condition,
            )

        if infiniteyou is None:
            return call(controls)
        tokens, mode, embeds, guidance = identity_inputs(self, batch, trained=True)
        return infiniteyou(embeds, tokens, mode, guidance, call)

    def inference_sigmas(self, latent_shape: Sequence[int], num_inference_steps: int) -> torch.Tensor:
        """FLUX.1's sampling schedule for this image size, as the pipeline resolves it: the task's `sigma_shift` when
        given, else the preset's (`pipe.defaults`: schnell's 1), else unshifted for a DiT without guidance embedding
        (schnell), else BFL's shift by its H/16 * W/16 tokens. What `--task direct_distill` steps along. The DiT
        call keeps the task's `embedded_guidance` (1; give `--task_options embedded_guidance=3.5` to distill
        FLUX.1-dev as it samples)."""
        pipe = self.pipe
        scheduler = make_scheduler("flux1", str(pipe.setting("sampler", None, "euler")))
        shift = pipe.setting("sigma_shift", self.sigma_shift, None)
        if shift is not None:
            shape = {"mu": math.log(shift)}  # the pipeline's static shift by e^mu
        elif not getattr(getattr(pipe.dit, "config", None), "guidance_embed", True):
            shape = {"mu": 0.0}  # schnell: BFL and diffusers sample it unshifted
        else:
            shape = {"image_seq_len": (latent_shape[-2] // 2) * (latent_shape[-1] // 2)}
        scheduler.set_timesteps(num_inference_steps, **shape)
        return scheduler.sigmas


__all__ = ["FluxTrainingTask", "InfiniteYouInTraining", "export_infiniteyou_state", "split_infiniteyou_weights"]
