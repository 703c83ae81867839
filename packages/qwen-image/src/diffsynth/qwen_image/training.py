"""Qwen-Image's training task, for the DiffSynth trainer (`diffsynth-train`, package diffsynth-training).

It implements the trainer's `TrainingTask` protocol structurally (this package does not depend on the
trainer): class attributes `family`, `denoiser_slot`, `size_multiple`, `media`; a `scheduler`; `models`,
`model_files` and `sample` (the runtime's `PipelineTrainingTask`; an Edit model's validation samples take
their references as `edit_image`); `from_pretrained(model_configs, *,
tokenizer_config, torch_dtype, device, encoders, denoiser)`; `encode(rows)`, `collate(samples)` and
`velocity(dit, batch, noisy_latents, sigma)`.

A row is `{"prompt": str, "image": [3, H, W] in [-1, 1]}` (text-to-image), plus for the Edit models
(Qwen-Image-Edit, -2509, -2511) `"edit_image"`: one image or a list (tensors [3, h, w] in [-1, 1] at their own
size, as the trainer's dataset reads the `conditioning` column; PIL images or paths work too). It is encoded as
the pipeline encodes: the image as a one-frame video through the Wan-style causal VAE (posterior mode, latents
normalised by the per-channel mean/std) and the prompt through `QwenImagePipeline.encode_prompt`: without edit
images the text-to-image template (34 leading tokens dropped); with them `prepare_edit_images` (each resized to
about 1024x1024 pixels for the VAE and, with the "plus" template of 2509/2511, to 384x384 for the vision tower)
and the Edit template with the images through the Qwen2.5-VL vision tower (64 tokens dropped; not cut to
`max_sequence_length`, which would drop the instruction after the vision tokens). That gives `{"latents": [16, H/8,
W/8], "text": [L, D]}` with L the prompt's own token count, and `"edit_0"`, `"edit_1"`, ... ([16, h, w],
`encode_edit_images`) per edit image. `collate` zero-pads the prompts of a batch to the longest with a mask, as the
pipeline's batched encoding does. The model call is `qwen_image_velocity`, the pipeline's per-step call, with the edit
latents appended to the image tokens (Edit-2511's `zero_cond_t` DiT gives them timestep 0 itself). Noise levels and loss
weights: the "qwen_image" template at mu = 0.8 (terminal sigma stretched to 0.02), DiffSynth-Studio's Qwen-Image
training schedule.

Edit images are sized as DiffSynth-Studio's trainer sizes them: the dataset shrinks each under `--max_pixels`
keeping its aspect ratio (not to the target's size), then the pipeline's auto-resize above applies. The prompt
template is the pipeline's `edit_template` setting: the Edit preset's ("edit" for Qwen/Qwen-Image-Edit, "plus"
for 2509/2511) when the tokenizer comes from the hub repo, a local folder's `diffsynth.json` default, else
"plus". An Edit model (a `processor/` tokenizer or one beside it, as a local Edit folder has, or a `zero_cond_t`
DiT) refuses rows without `edit_image`; rows of one batch must agree on their edit images' count and sizes
(`--batch_size 1` always does).

Qwen-Image-Layered (a `use_layer3d_rope` DiT or a 4-channel VAE) trains on DiffSynth-Studio's rows:
`{"prompt": a caption of the input image, "image": [N + 1 RGBA frames], "layer_input_image": the input image}`,
where `image` lists the frames the model draws, the whole image first and then its N layers (DiffSynth-Studio's
noise has `layer_num + 1` frames for its N + 1 `image` latents; an optional `layer_num` column must say N). The
task reads pictures as RGBA (`image_mode`), takes its main size from `layer_input_image` (`media`; its `conditioning`
column, read as files without `--data_file_keys`, and pixel-aligned with the frames, `aligned_conditioning`: the
dataset crops it as it crops the frames, also to a fixed `--height`/`--width`; an input image of another size, given
directly, is resized to the frames' (Lanczos) as `decompose` resizes it). A row's frames and input image must be one
size, and an optional `layer_num` must count its layers: `check_row` checks both at setup, from the file headers. Each
frame is encoded as a one-frame video (posterior mode, normalised), giving `{"latents": [N + 1, 16, H/8, W/8],
"condition": [16, H/8, W/8], "text": [L, D]}` with the text-to-image template. The model call is `layered_velocity`, the
pipeline's per-step call: the N + 1 noisy frames packed frame after frame, the clean input image's tokens after them
(their predictions dropped), the additional timestep embedding's entry 0; the loss counts every generated frame, frame 0
included, as DiffSynth-Studio's does (the clean input image is not among them, so no `loss_mask` is needed). Rows of one
batch need the same layer count (`--batch_size 1` always has it). Validation samples take the input image from
`--validation_images` (required; Layered-Control-V2's `in.png,mask.png` adds the mask as `decompose`'s `context_image`,
with `layer_num=0`) and `layer_num` from `--task_options layer_num=N` (else the pipeline's 4); they are written as one
RGBA picture, the layers side by side. DiffSynth-Studio's Qwen-Image-Layered-Control rows (`layer_num` 0: `image` lists
one frame, the layer the prompt names) train the same way, and its V2 rows' `context_image` (the mask of the region to
pull out, in `--data_file_keys`) is encoded in RGBA as `decompose` encodes it and its tokens go between the frame's
and the input image's (`layered_velocity`'s `context`).

EliGen (DiffSynth-Studio's lora/Qwen-Image-EliGen.sh): a row's `eligen_entity_prompts` (a JSON list of strings) and
`eligen_entity_masks` (a JSON list of mask files, white = the entity, listed in `--data_file_keys`) are checked by the
pipeline's `check_entity_inputs` and encoded as the pipeline prepares its positive branch: each entity prompt on its
own, cut to its real tokens (`"eligen_text"`, `"eligen_lengths"`), the masks as token regions at the target's size
(`entity_regions`, `"eligen_regions"`). The model call runs the rows one at a time, as the pipeline runs EliGen: a
row's segments and joint attention mask come from `entity_text` over its entities and its prompt, so rows with
different entity counts batch together. EliGen goes with no edit images, `context_image` or ControlNet control.
Validation samples take the entities too: `--task_options validation_eligen_entity_prompts="a red apple|a blue cup"`
(one set for every sample; a list in a YAML `--config`) and each prompt's masks from `--validation_images`, one per
entity in that order, joined by ',' (`"apple.png,cup.png"`): the pipeline's `eligen_entity_prompts` /
`eligen_entity_masks`.

In-context control (DiffSynth-Studio's In-Context-Control-Union LoRA): a row's `context_image` (in
`--data_file_keys`) is encoded by the pipeline's `encode_context_image` at the target's size into `"context"`
`[16, H/8, W/8]`, whose clean tokens follow the image's before any edit image's, as the pipeline lays its references
out; rows of one batch all have one or none. Validation samples of a model without an Edit processor take their one
`--validation_images` picture as the pipeline's `context_image` (an Edit model's are its edit images).

ControlNets, with the net's file among the model files (one net; DiffSynth-Studio's columns, its `--extra_inputs`
prefix being the pipeline's slot): a Blockwise ControlNet (DiffSynth-Studio's Qwen-Image-Blockwise-ControlNet-Canny /
-Depth / -Inpaint `model.safetensors`) reads a row's `blockwise_controlnet_image` and, for the Inpaint net,
`blockwise_controlnet_inpaint_mask` (white = repaint); an InstantX ControlNet (Qwen-Image-ControlNet-Union /
-Inpainting) reads `controlnet_image` and `controlnet_inpaint_mask`. The pictures are `[3, H, W]` in [-1, 1], read at
the row's size when listed in `--data_file_keys` (PIL images or paths work too), and are encoded by the pipeline's
`blockwise_latent` / `control_latent` at the target's size into `"<slot>_condition"` `[16 (17 with the mask), H/8,
W/8]`. The model call is the pipeline's per-step call at scale 1: for a Blockwise net `blockwise_velocity` (the
condition packed and embedded as `encode_blockwise` does, the residuals added after each DiT block by
`blockwise_residual`), for an InstantX net `controlnet_velocity` (packed as `encode_controls` does, the net run on the
noisy latents and the prompt by `controlnet_residuals`). Training the DiT (LoRA or full) keeps the net frozen (rows
without the column train it without control); `trained_model="blockwise_controlnet"` or `"controlnet"` (what
`--trainable_models blockwise_controlnet` / `controlnet` asks the trainer for: the task's `trainable_slots`) trains
the net in full under the frozen DiT, saved as `<step>/<slot>/diffusion_pytorch_model.safetensors` in the released
file's keys. An InstantX net is the trainer's model itself (its forward is its whole use in a step); a Blockwise net
acts between the DiT's blocks, so the trainer's model is then `BlockwiseControlNetInTraining`, which holds the net's
own modules (its state dict is the net's) and runs the whole model call, so a DDP-wrapped model sees every use of
the net in one call. `--use_gradient_checkpointing` reaches the frozen DiT through the trained net. Validation
samples take the control image (and an inpainting net's mask, after a comma) from `--validation_images`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from diffsynth.runtime.controlnet import ControlNetInput
from diffsynth.runtime.eligen import check_entity_inputs, entity_regions
from diffsynth.runtime.errors import ConfigError, preview
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.media import load_image, pil_to_tensor, tensor_to_pil
from diffsynth.runtime.pipeline import folder_defaults
from diffsynth.runtime.schedulers import FlowMatchScheduler, make_scheduler
from diffsynth.runtime.training_support import PipelineTrainingTask, load_partial_pipeline, model_roles
from diffsynth.runtime.vram import module_dtype

from .blockwise_controlnet import QwenImageBlockwiseControlNet, blockwise_residual
from .controlnet import ControlCondition
from .eligen import entity_text, real_tokens
from .layered import check_layer_num, check_layer_prompts, layered_velocity
from .pipeline import (
    SIGMA_TEMPLATES,
    QwenImagePipeline,
    controlnet_residuals,
    pack,
    qwen_image_velocity,
    source_edit_template,
)
from .presets import PRESETS

logger = logging.getLogger(__name__)

ENCODER_SLOTS = ("vae", "text_encoder")
TRAINING_MU = 0.8  # DiffSynth-Studio's "Qwen-Image" schedule without a dynamic shift length
EDIT_TEMPLATES = ("plus", "edit")
LATENT_CHANNELS = 16  # a condition with more carries an inpainting mask
BLOCKWISE, CONTROLNET = "blockwise_controlnet", "controlnet"  # the pipeline's slots; what --trainable_models names
CONTROL_SLOTS = (BLOCKWISE, CONTROLNET)
TRAINED_MODELS = ("dit", *CONTROL_SLOTS)  # `trained_model`: what the trainer trains (its "denoiser")
NET_NAMES = {BLOCKWISE: "Blockwise ControlNet", CONTROLNET: "InstantX ControlNet"}
FILE_HINTS = {
    BLOCKWISE: "--model_paths .../model.safetensors, or --model_id_with_origin_paths "
    "DiffSynth-Studio/Qwen-Image-Blockwise-ControlNet-Canny:model.safetensors",
    CONTROLNET: "--model_paths .../diffusion_pytorch_model.safetensors, or --model_id_with_origin_paths "
    "InstantX/Qwen-Image-ControlNet-Union:diffusion_pytorch_model.safetensors",
}
ELIGEN_COLUMNS = ("eligen_entity_prompts", "eligen_entity_masks")  # DiffSynth-Studio's --extra_inputs
CONTEXT_COLUMN = "context_image"  # its In-Context Control (and Layered-Control-V2) LoRAs' control map
TILING = (False, (34, 34), (18, 16))  # the pipeline's defaults: whole-image VAE encoding
INPAINT_NETS = {
    BLOCKWISE: "DiffSynth-Studio/Qwen-Image-Blockwise-ControlNet-Inpaint",
    CONTROLNET: "InstantX/Qwen-Image-ControlNet-Inpainting",
}


def control_columns(slot: str) -> tuple[str, str]:
    """A control's columns, DiffSynth-Studio's (its `--extra_inputs` prefix is the slot): the image and the mask."""
    return f"{slot}_image", f"{slot}_inpaint_mask"


def blockwise_velocity(
    dit: nn.Module,
    net: QwenImageBlockwiseControlNet,
    latents: torch.Tensor,
    sigma: torch.Tensor,
    text: torch.Tensor,
    text_mask: torch.Tensor | None,
    condition: torch.Tensor,
    edit_latents: Sequence[torch.Tensor] = (),
) -> torch.Tensor:
    """`qwen_image_velocity` with one Blockwise ControlNet at scale 1: the condition `[B, 16 or 17, H, W]`
    (`blockwise_latent`) packed and embedded as `encode_blockwise` does, its residuals added after each block by
    `blockwise_residual`. The image tokens reach the net in its own dtype (a float32 net in training under a
    bfloat16 DiT); the DiT casts the residuals back."""
    embedded = net.embed(pack(condition, dit.config.patch_size))
    residual = blockwise_residual([ControlCondition(net, embedded)])
    dtype = module_dtype(net)

    def in_net_dtype(block: int, image: torch.Tensor) -> torch.Tensor:
        return residual(block, image.to(dtype))

    return qwen_image_velocity(
        dit, latents, sigma, text, text_mask, edit_latents, controlnet_block_samples=in_net_dtype
    )


def controlnet_velocity(
    dit: nn.Module,
    net: nn.Module,
    latents: torch.Tensor,
    sigma: torch.Tensor,
    text: torch.Tensor,
    text_mask: torch.Tensor | None,
    condition: torch.Tensor,
    edit_latents: Sequence[torch.Tensor] = (),
) -> torch.Tensor:
    """`qwen_image_velocity` with one InstantX ControlNet at scale 1: the condition `[B, 16 or 17, H, W]`
    (`control_latent`) packed as `encode_controls` does, the net run on the noisy latents and the prompt by
    `controlnet_residuals`, as every denoising step runs it. `net` may be the trainer's prepared model (calling it
    runs DDP's wrapper)."""
    tokens = pack(condition, net.config.patch_size)
    blocks = dit.config.num_layers
    residuals = controlnet_residuals([ControlCondition(net, tokens)], latents, sigma, text, text_mask, blocks)
    return qwen_image_velocity(dit, latents, sigma, text, text_mask, edit_latents, controlnet_block_samples=residuals)


class BlockwiseControlNetInTraining(nn.Module):
    """The Blockwise ControlNet as the trainer trains it. Its modules are the net's own objects, so its state dict is
    the net's (DiffSynth-Studio's keys) and the pipeline's net trains with it; its forward is the whole model call
    over the frozen DiT of `pipe`, so one call of the trainer's prepared model (DDP's gradient reduction) covers
    every use of the net in a step. `gradient_checkpointing` is passed on to the DiT."""

    def __init__(self, net: QwenImageBlockwiseControlNet, pipe: QwenImagePipeline):
        super().__init__()
        self.img_in, self.controlnet_blocks = net.img_in, net.controlnet_blocks
        self.config = net.config
        self.lora_target_modules = net.lora_target_modules
        self.gradient_checkpointing = False
        self._frozen = (net, pipe)  # not submodules: the DiT is not trained, and the net's modules are ours

    def forward(self, latents, sigma, text, text_mask, condition, edit_latents=()) -> torch.Tensor:
        net, pipe = self._frozen
        pipe.dit.gradient_checkpointing = self.gradient_checkpointing
        return blockwise_velocity(pipe.dit, net, latents, sigma, text, text_mask, condition, edit_latents)


class QwenImageTrainingTask(PipelineTrainingTask):
    """Turns rows into Qwen-Image inputs and runs the pipeline's per-step DiT call (see the module docstring)."""

    family: ClassVar[str] = "qwen_image"
    denoiser_slot: ClassVar[str] = "dit"
    size_multiple: ClassVar[int] = QwenImagePipeline.size_multiple

    loss_options: ClassVar[tuple[str, ...]] = (
        "exponential_shift_mu",
        "layer_num",
        "trained_model",
        "validation_eligen_entity_prompts",
    )  # --task_options that leave a cache valid
    # models the trainer may train in the DiT's place (`trained_model`, from --trainable_models)
    trainable_slots: ClassVar[tuple[str, ...]] = CONTROL_SLOTS
    # the last block's text-stream outputs (attn.to_add_out, txt_mlp) feed nothing, so their weights (or LoRAs)
    # get no gradient: DDP must look for unused parameters
    ddp_find_unused_parameters: ClassVar[bool] = True

    def __init__(
        self,
        pipe: QwenImagePipeline,
        controls: Sequence[str] | None = None,
        *,
        exponential_shift_mu: float = TRAINING_MU,
        max_sequence_length: int = 512,
        edit: bool | None = None,
        edit_template: str | None = None,
        layer_num: int | None = None,
        trained_model: str = "dit",
        validation_eligen_entity_prompts: str | Sequence[str] | None = None,
        zero_cond_t: bool | None = None,
    ):
        """`edit`: True requires `edit_image` in every row, None takes edit images where rows have them.
        `edit_template` ("plus" or "edit") overrides the pipeline's setting. `layer_num`: the layers of a
        Qwen-Image-Layered model's validation samples (None: the pipeline's default). `controls`: the ControlNet
        slots ("blockwise_controlnet", "controlnet") whose files are among the models (default: those `pipe` has
        loaded); `trained_model` names one to make it the model the trainer trains (see the module docstring).
        `validation_eligen_entity_prompts`: the entity prompts of every validation sample ("|"-separated, or a
        list), whose masks are then the samples' `--validation_images`. `zero_cond_t` (DiffSynth-Studio's
        `--zero_cond_t`) marks the DiT as Qwen-Image-Edit-2511's when its `config.json` was not loaded with it (the
        edit images' tokens modulated at timestep 0); None leaves the config as loaded."""
        self.pipe = pipe
        dit, vae = pipe.dit, pipe.vae
        if zero_cond_t is not None and dit is not None:
            dit.config.zero_cond_t = bool(zero_cond_t)
        self.layered = bool(
            (dit is not None and dit.config.use_layer3d_rope) or (vae is not None and vae.config.in_channels == 4)
        )
        if layer_num is not None and not self.layered:
            raise ConfigError("--task_options layer_num belongs to Qwen-Image-Layered; the loaded model is not it")
        self.layer_num = None if layer_num is None else check_layer_num(layer_num)
        self.scheduler = FlowMatchScheduler("qwen_image", mu=exponential_shift_mu)
        self.max_sequence_length = max_sequence_length
        self.edit = edit
        # an Edit model's validation samples are edits of their images: without them they say little
        self.validation_references = "expected" if edit else "optional"
        if self.layered:
            self.validation_references = "required"  # a Layered model decomposes its input image
        if edit_template is not None:
            if edit_template not in EDIT_TEMPLATES:
                raise ConfigError(f"edit_template={edit_template!r} is not known; use one of {EDIT_TEMPLATES}")
            pipe.defaults["edit_template"] = edit_template
        given = [s for s in CONTROL_SLOTS if (pipe.controlnets(s) if controls is None else s in controls)]
        if len(given) > 1:
            raise ConfigError(
                "both a Blockwise and an InstantX ControlNet are among the models; training takes one: leave the "
                "other's file out"
            )
        self.control: str | None = given[0] if given else None  # the ControlNet slot rows may condition
        self._in_training: nn.Module | None = None
        self._check_trained_model(trained_model)
        self.validation_entity_prompts = _entity_prompts(validation_eligen_entity_prompts)
        if self.validation_entity_prompts is not None:
            clash = [
                what
                for what, given in (
                    ("Qwen-Image-Layered", self.layered),
                    ("an Edit model (its --validation_images are edit images)", self.edit),
                    (f"the {NET_NAMES.get(self.control)}", self.control),
                )
                if given
            ]
            if clash:
                raise ConfigError(
                    f"--task_options validation_eligen_entity_prompts: EliGen samples go with the prompt alone, not "
                    f"with {clash[0]}; drop the option"
                )
            self.validation_references = "required"  # the entities' masks

    def _check_trained_model(self, trained_model: str) -> None:
        if trained_model not in TRAINED_MODELS:
            raise ConfigError(f"trained_model={trained_model!r} is not accepted; use one of {TRAINED_MODELS}")
        self.trained_model = trained_model
        if self.control and self.layered:
            raise ConfigError(
                f"the {NET_NAMES[self.control]} goes with Qwen-Image's text-to-image DiT, not Qwen-Image-Layered: "
                "leave its file out of the models"
            )
        net, dit = self._loaded_net(), self.pipe.dit
        if net is not None and self.control == BLOCKWISE and dit is not None:
            if (net.config.num_layers, net.config.dim) != (dit.config.num_layers, dit.config.inner_dim):
                raise ConfigError(
                    f"the Blockwise ControlNet has {net.config.num_layers} blocks of width {net.config.dim}; this "
                    f"DiT has {dit.config.num_layers} of {dit.config.inner_dim}: it belongs to another model"
                )
        if trained_model == "dit":
            if self.control and not self.edit:
                self.validation_references = "optional"  # the control image of each sample
            return
        if self.control != trained_model:
            raise ConfigError(
                f"trained_model={trained_model!r} (--trainable_models {trained_model}) trains a "
                f"{NET_NAMES[trained_model]}: add its file to the models ({FILE_HINTS[trained_model]})"
            )
        self.denoiser_slot = trained_model  # the trainer trains (and saves) the net, not the DiT
        self.validation_references = "required"  # a control net's samples show it following a control image
        if net is not None:
            self._in_training = BlockwiseControlNetInTraining(net, self.pipe) if trained_model == BLOCKWISE else net

    def _loaded_net(self) -> nn.Module | None:
        """The one ControlNet of the task's control slot, None when not loaded (an encoding stage)."""
        nets = self.pipe.controlnets(self.control) if self.control else []
        if len(nets) > 1:
            raise ConfigError(
                f"{len(nets)} {NET_NAMES[self.control]}s are among the models; training reads one (the rows' "
                f"{control_columns(self.control)[0]} is its control image): leave the others out"
            )
        return nets[0] if nets else None

    def _net(self, slot: str) -> nn.Module:
        """The loaded net a batch's `slot` condition needs, or an error that says how to load it."""
        net = self._loaded_net() if slot == self.control else None
        if net is None:
            raise ConfigError(
                f"this batch has a {NET_NAMES[slot]} control ({control_columns(slot)[0]}) but no such net is loaded: "
                f"add its file to the models ({FILE_HINTS[slot]}), or encode the cache again without the column"
            )
        return net

    @property
    def models(self) -> dict[str, nn.Module]:
        """The loaded models by slot; a ControlNet slot holds its one net (the one in training, when trained)."""
        models = super().models
        net = self._loaded_net()
        if net is not None:
            models[self.control] = self._in_training if self._in_training is not None else net
        return models

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
        tokenizer (`encoders`; an Edit model's `processor/` folder brings the vision preprocessing too). Files of
        models not needed are recognised from their headers and not loaded."""
        roles = set().union(*(model_roles(c) for c in model_configs))  # from the headers; nets load with the DiT
        pipe = load_partial_pipeline(
            QwenImagePipeline,
            model_configs,
            ({"dit"} if denoiser else set()) | (set(ENCODER_SLOTS) if encoders else set()),
            optional=CONTROL_SLOTS if denoiser else (),
            tokenizers=("tokenizer",) if encoders else (),
            name="Qwen-Image",
            tokenizer_config=tokenizer_config if encoders else None,
            torch_dtype=torch_dtype,
            device=device,
        )
        pipe.defaults.update(_tokenizer_defaults(tokenizer_config))
        if "edit_template" not in pipe.defaults:  # an encoder-only stage has no DiT for `edit_template` to read
            pipe.defaults.update(_dit_source_defaults(model_configs))
        edit_model = (
            pipe.processor is not None  # a processor/ beside the tokenizer, as a local Edit repo has
            or (tokenizer_config is not None and _is_edit_processor(tokenizer_config))
            or bool(task_options.get("zero_cond_t"))
            or (pipe.dit is not None and pipe.dit.config.zero_cond_t)
        )
        task_options.setdefault("edit", True if edit_model else None)
        return cls(pipe, controls=[s for s in CONTROL_SLOTS if s in roles], **task_options)

    @property
    def media(self) -> tuple[str, ...]:
        """The column a row's size comes from: a Layered row's `image` is a list of frames, so its input image."""
        return ("layer_input_image",) if self.layered else ("image",)

    @property
    def conditioning(self) -> tuple[str, ...]:
        """The reference-image columns the dataset reads as files: `edit_image`, or a Layered model's input image."""
        return ("layer_input_image",) if self.layered else ("edit_image",)

    @property
    def aligned_conditioning(self) -> tuple[str, ...]:
        """The conditioning columns pixel-aligned with the target, which the dataset reads as it reads the target
        (at the row's size, cropped alike): a Layered model's input image, the frames' whole image."""
        return ("layer_input_image",) if self.layered else ()

    def check_row(self, row: Mapping[str, Any], size: Any) -> None:
        """A metadata row checked at setup (the trainer's dataset calls it; `size(column, name)` is a file's
        (width, height) from its header): a Layered row's `layer_num` against its `image` frames and the sizes of
        its frames and input image, which must be one (the dataset crops them alike); an Edit model's row needs
        `edit_image`. Errors start with the column: the dataset puts the metadata file and row in front."""
        if self.layered:
            _check_layered_row(row, size)
        elif self.edit and _empty_cell(row.get("edit_image")):
            raise ConfigError(
                "column edit_image: empty; a Qwen-Image-Edit model trains on rows with image, prompt and edit_image "
                "(one path, or a list of paths in JSON metadata)"
            )

    @property
    def image_mode(self) -> str:
        """ "RGBA" for Qwen-Image-Layered (its VAE reads and draws alpha), else "RGB"."""
        return "RGBA" if self.layered else "RGB"

    def reference_arguments(self, images: Sequence[Any]) -> dict[str, Any]:
        """A validation sample's references as the pipeline's `edit_image` (one or several, for 2509/2511), or
        for Qwen-Image-Layered its `layer_input_image` (with `layer_num` when the task was given one) and, second,
        an optional `context_image` (Layered-Control-V2's mask of the region to pull out, with `layer_num=0`)."""
        if self.layered:
            if len(images) not in (1, 2):
                raise ConfigError(
                    "Qwen-Image-Layered decomposes one input image per validation prompt (with Layered-Control-V2 "
                    f"and layer_num=0, then the mask of the layer to pull out: in.png,mask.png); got {len(images)}"
                )
            if len(images) == 2 and self.layer_num != 0:
                raise ConfigError(
                    "Qwen-Image-Layered decomposes one input image per validation prompt; a second, the mask of the "
                    "layer to pull out (context_image), is Layered-Control-V2's, which draws one layer: add "
                    "--task_options layer_num=0"
                )
            layer_num = {} if self.layer_num is None else {"layer_num": self.layer_num}  # 0: Layered-Control
            context = {CONTEXT_COLUMN: images[1]} if len(images) == 2 else {}
            return {"layer_input_image": images[0], **layer_num, **context}
        if self.validation_entity_prompts is not None:
            return self._entity_references(images)
        if self.control:
            return self._control_references(images)
        if not images:
            return {}
        if not self.edit and self.pipe.processor is None:  # no edit images without it: the in-context control map
            if len(images) != 1:
                raise ConfigError(
                    f"a Qwen-Image validation sample takes one {CONTEXT_COLUMN} (the in-context control map) from "
                    f"--validation_images; got {len(images)} images (EliGen masks need --task_options "
                    "validation_eligen_entity_prompts; edit images need an Edit model's processor/)"
                )
            return {CONTEXT_COLUMN: images[0]}
        if self.pipe.processor is None:
            raise ConfigError(
                "validation samples with edit images need the Qwen2-VL processor of an Edit model: pass its "
                "processor/ folder (--tokenizer_path .../processor, or --model Qwen/Qwen-Image-Edit-2509)"
            )
        return {"edit_image": list(images)}

    def _entity_references(self, images: Sequence[Any]) -> dict[str, Any]:
        """A validation sample's EliGen entities: the task's entity prompts with one mask each from
        `--validation_images`, checked as the pipeline checks them."""
        prompts = self.validation_entity_prompts
        if len(images) != len(prompts):
            raise ConfigError(
                f"--task_options validation_eligen_entity_prompts lists {len(prompts)} entities; give each "
                f"validation prompt as many masks (white = the entity) in --validation_images, in that order and "
                f"joined by ',' (e.g. {','.join(f'mask{k}.png' for k in range(len(prompts)))}); got {len(images)}"
            )
        prompts, masks = check_entity_inputs(list(prompts), list(images))
        return {"eligen_entity_prompts": prompts, "eligen_entity_masks": masks}

    def _control_references(self, images: Sequence[Any]) -> dict[str, Any]:
        """A validation sample's control image (and an inpainting net's mask) as the pipeline's
        `blockwise_controlnet_inputs` or `controlnet_inputs`."""
        if self.edit:
            raise ConfigError(
                f"--validation_images: under a {NET_NAMES[self.control]} they are its control images, which an Edit "
                "model's samples cannot tell from edit images; drop --validation_prompts"
            )
        if not images:
            if self.trained_model != "dit":
                raise ConfigError(
                    f"validation samples of a {NET_NAMES[self.control]} in training follow a control image: give "
                    "--validation_images, one per --validation_prompts prompt (an inpainting net: the image, a "
                    "comma, the mask)"
                )
            return {}
        mask = self._net(self.control).takes_mask
        if len(images) != (2 if mask else 1):
            want = "the image to inpaint and its mask (white = repaint), joined by ','" if mask else "one control image"
            raise ConfigError(f"a {NET_NAMES[self.control]}'s validation sample takes {want}; got {len(images)} images")
        control = ControlNetInput(image=images[0], inpaint_mask=images[1] if mask else None)
        return {f"{self.control}_inputs": [control]}

    def sample(self, denoiser: nn.Module, prompts: Sequence[str], *, seed: int, **options: Any) -> list:
        """The pipeline's validation samples; a Layered model's layers joined side by side in one RGBA picture.
        A ControlNet in training is already the pipeline's (the same modules): the DiT stays."""
        if self.trained_model != "dit":
            denoiser = self.pipe.dit
        samples = super().sample(denoiser, prompts, seed=seed, **options)
        return [_side_by_side(s) for s in samples] if self.layered else samples

    # ------------------------------------------------------------------ the protocol
    def encode(self, rows: list[Mapping[str, Any]]) -> list[dict[str, torch.Tensor]]:
        """`{"latents": [16, H/8, W/8], "text": [L, D]}` per row, with `"edit_0"`, `"edit_1"`, ... [16, h, w]
        for a row with edit images, `"context"` [16, H/8, W/8] for one with `context_image`, and `"eligen_text"`,
        `"eligen_lengths"`, `"eligen_regions"` for one with EliGen entities (`encode_entities`); rows of one call
        share an image size. Qwen-Image-Layered: see `encode_layered`."""
        if self.layered:
            return self.encode_layered(rows)
        entities = [_entity_inputs(row, i) for i, row in enumerate(rows)]
        for i, row in enumerate(rows):
            if row.get("layer_input_image") is not None:
                raise ConfigError(
                    f"row {i} of the batch has layer_input_image, which trains Qwen-Image-Layered; the loaded "
                    "DiT and VAE are another Qwen-Image model's: load Qwen/Qwen-Image-Layered's transformer/ and vae/"
                )
            if "prompt" not in row or not isinstance(row.get("image"), torch.Tensor):
                raise ConfigError(
                    f"Qwen-Image trains on rows with an image and a prompt; row {i} of the batch has {preview(row)}"
                )
            if self.edit and not _edit_images(row):
                filled = [k for k, v in row.items() if not _empty_cell(v)]
                raise ConfigError(
                    f"row {i} of the batch (prompt {str(row['prompt'])[:60]!r}) has no edit_image: a Qwen-Image-Edit "
                    "model trains on rows with image, prompt and edit_image (one path, or a list of paths in JSON "
                    f"metadata); the row has {', '.join(filled)}"
                )
            if entities[i] is not None:
                clash = [CONTEXT_COLUMN] if not _empty(row.get(CONTEXT_COLUMN)) else []
                clash += ["edit_image"] if _edit_images(row) else []
                clash += [control_columns(s)[0] for s in CONTROL_SLOTS if not _empty(row.get(control_columns(s)[0]))]
                if clash:
                    raise ConfigError(
                        f"row {i} of the batch has EliGen entities ({', '.join(ELIGEN_COLUMNS)}) and "
                        f"{', '.join(clash)}: EliGen regions go with the prompt alone (the pipeline takes "
                        "eligen_entity_prompts with no edit_image or context_image, and its entity call has no "
                        "ControlNet); drop one of them"
                    )
        pipe = self.pipe
        pixels = torch.stack([row["image"] for row in rows]).to(pipe.device, module_dtype(pipe.vae))
        latents = pipe.vae.encode(pixels.unsqueeze(2))[:, :, 0].float()
        samples: list[dict[str, torch.Tensor]] = [{"latents": lat} for lat in latents]
        plain = [i for i, row in enumerate(rows) if not _edit_images(row)]
        if plain:
            embeds, mask = pipe.encode_prompt([str(rows[i]["prompt"]) for i in plain], self.max_sequence_length)
            for i, emb, keep in zip(plain, embeds, mask.bool(), strict=True):
                samples[i]["text"] = emb[keep]
        for sample, row in zip(samples, rows, strict=True):
            images = _edit_images(row)
            if not images:
                continue
            if pipe.processor is None:
                raise ConfigError(
                    "rows with edit_image need the Qwen2-VL processor of an Edit model: pass its processor/ folder "
                    "(--tokenizer_path .../processor, or --model Qwen/Qwen-Image-Edit-2509)"
                )
            edits = pipe.prepare_edit_images(images, auto_resize=True)
            embeds, mask = pipe.encode_prompt([str(row["prompt"])], self.max_sequence_length, edits)
            sample["text"] = embeds[0][mask[0].bool()]
            edit_latents = pipe.encode_edit_images(edits, 1, False, (34, 34), (18, 16))
            sample.update({f"edit_{k}": z[0] for k, z in enumerate(edit_latents)})
        for i, (sample, row, given) in enumerate(zip(samples, rows, entities, strict=True)):
            height, width = row["image"].shape[-2:]
            if given is not None:
                sample.update(self.encode_entities(*given, height, width))
            if not _empty(row.get(CONTEXT_COLUMN)):
                context = _picture(row[CONTEXT_COLUMN], CONTEXT_COLUMN, i)
                sample["context"] = pipe.encode_context_image(context, 1, height, width, *TILING)[0]
            for slot in CONTROL_SLOTS:
                control = self._control_input(row, i, slot)
                if control is None:
                    continue
                if slot == BLOCKWISE:
                    z = pipe.blockwise_latent(control, height, width)
                else:
                    z = pipe.control_latent(control.image, control.inpaint_mask, height, width)
                sample[f"{slot}_condition"] = z[0]
        return samples

    def encode_entities(self, prompts: Sequence[str], masks: Sequence, height: int, width: int) -> dict[str, Any]:
        """One row's EliGen entities as the pipeline prepares its positive branch: each entity prompt encoded on
        its own (text-to-image template) and cut to its real tokens, `"eligen_text"` [sum of their lengths, D]
        with `"eligen_lengths"` [N]; the masks' token regions at the target's size, `"eligen_regions"` bool
        [N, H/16 * W/16] (`entity_regions`). `velocity` joins them with the prompt by `entity_text`."""
        encoded = [real_tokens(*self.pipe.encode_prompt([p], self.max_sequence_length))[0] for p in prompts]
        return {
            "eligen_text": torch.cat(encoded),
            "eligen_lengths": torch.tensor([e.shape[0] for e in encoded], dtype=torch.long),
            "eligen_regions": entity_regions(masks, height, width),
        }

    def _control_input(self, row: Mapping[str, Any], index: int, slot: str) -> ControlNetInput | None:
        """A row's control for the `slot` net (its image, and an inpainting net's mask) as the pipeline's input, or
        None without one."""
        image_column, mask_column = control_columns(slot)
        image, mask = row.get(image_column), row.get(mask_column)
        if _empty(image):
            if not _empty(mask):
                raise ConfigError(
                    f"row {index} of the batch has {mask_column} but no {image_column} (the image to inpaint)"
                )
            return None
        if self.control != slot:
            raise ConfigError(
                f"row {index} of the batch has {image_column}, the control image of a {NET_NAMES[slot]}, but none "
                f"is among the models: add its file ({FILE_HINTS[slot]}), or drop the column"
            )
        net = self._loaded_net()
        if net is not None:
            _check_mask(net, slot, not _empty(mask), f"row {index} of the batch")
        pictures = [
            None if _empty(value) else _picture(value, column, index)
            for value, column in ((image, image_column), (mask, mask_column))
        ]
        return ControlNetInput(image=pictures[0], inpaint_mask=pictures[1])

    def encode_layered(self, rows: list[Mapping[str, Any]]) -> list[dict[str, torch.Tensor]]:
        """Qwen-Image-Layered rows (see the module docstring) as `{"latents": [N + 1, 16, H/8, W/8], "condition":
        [16, H/8, W/8], "text": [L, D]}`: each frame, and the input image resized to the frames' size, encoded as
        `decompose` encodes its input image; the prompt with the text-to-image template. A row with
        `context_image` (Layered-Control-V2's mask) adds `"context"` [16, H/8, W/8], encoded in RGBA at the frames'
        size as `decompose` encodes it."""
        frames = [_layer_frames(row, i) for i, row in enumerate(rows)]
        for i, row in enumerate(rows):
            if _entity_inputs(row, i) is not None:
                raise ConfigError(
                    f"row {i} of the batch has EliGen entities ({', '.join(ELIGEN_COLUMNS)}); Qwen-Image-Layered "
                    "takes none: drop the columns"
                )
        check_layer_prompts([str(row["prompt"]) for row in rows])
        pipe = self.pipe
        dtype = module_dtype(pipe.vae)
        counts = [len(f) for f in frames]
        pixels = torch.stack([frame for row_frames in frames for frame in row_frames]).to(pipe.device, dtype)
        latents = pipe.vae.encode(pixels.unsqueeze(2))[:, :, 0].float().split(counts)
        sizes = [tuple(f[0].shape[-2:]) for f in frames]
        inputs = [_input_image(row, size) for row, size in zip(rows, sizes, strict=True)]
        condition = pipe.vae.encode(pil_to_tensor(inputs, dtype, pipe.device, mode="RGBA").unsqueeze(2))
        embeds, mask = pipe.encode_prompt([str(row["prompt"]) for row in rows], self.max_sequence_length)
        samples = [
            {"latents": lat, "condition": cond, "text": emb[keep]}
            for lat, cond, emb, keep in zip(latents, condition[:, :, 0].float(), embeds, mask.bool(), strict=True)
        ]
        for i, (sample, row, (height, width)) in enumerate(zip(samples, rows, sizes, strict=True)):
            if not _empty(row.get(CONTEXT_COLUMN)):  # Layered-Control-V2's mask of the region to pull out
                context = _picture(row[CONTEXT_COLUMN], CONTEXT_COLUMN, i)
                sample["context"] = pipe.encode_context_image(context, 1, height, width, *TILING, "RGBA")[0]
        return samples

    def collate(self, samples: list[Mapping[str, torch.Tensor]]) -> dict[str, Any]:
        """Latents stacked; prompts zero-padded to the longest, `text_mask` True on real tokens. EliGen entities
        (counts and lengths differ row by row) stay per row: `"eligen"`, a list with each row's tensors (None for
        a row without), which `velocity` runs row by row."""
        texts = [s["text"] for s in samples]
        length = max(max(t.shape[0] for t in texts), 1)
        text = texts[0].new_zeros(len(texts), length, texts[0].shape[-1])
        mask = torch.zeros(len(texts), length, dtype=torch.bool, device=texts[0].device)
        for i, t in enumerate(texts):
            text[i, : t.shape[0]] = t
            mask[i, : t.shape[0]] = True
        shapes = [tuple(s["latents"].shape) for s in samples]
        if any(shape != shapes[0] for shape in shapes):
            raise ConfigError(
                f"the rows of a batch have different layer counts (latents {shapes}); one Qwen-Image-Layered batch "
                "needs rows with the same number of image frames: train with --batch_size 1"
            )
        batch = {"latents": torch.stack([s["latents"] for s in samples]), "text": text, "text_mask": mask}
        if "condition" in samples[0]:
            batch["condition"] = torch.stack([s["condition"] for s in samples])
        contexts = [s.get("context") for s in samples]
        if any(c is not None for c in contexts):
            if any(c is None for c in contexts):
                raise ConfigError(
                    f"some rows of the batch have {CONTEXT_COLUMN} and others not; give every row one, or train with "
                    "--batch_size 1"
                )
            batch["context"] = torch.stack(contexts)
        if any("eligen_lengths" in s for s in samples):
            names = ("eligen_text", "eligen_lengths", "eligen_regions")
            batch["eligen"] = [{n: s[n] for n in names} if "eligen_lengths" in s else None for s in samples]
        for slot in CONTROL_SLOTS:
            controls = [s.get(f"{slot}_condition") for s in samples]
            if all(c is None for c in controls):
                continue
            shapes = [None if c is None else tuple(c.shape) for c in controls]
            if any(shape != shapes[0] for shape in shapes):
                image_column, mask_column = control_columns(slot)
                raise ConfigError(
                    f"the rows of a batch differ in their controls (condition shapes {shapes}: rows without "
                    f"{image_column}, or with and without {mask_column}); give every row the same columns, or "
                    "train with --batch_size 1"
                )
            batch[f"{slot}_condition"] = torch.stack(controls)
        counts = [sum(name.startswith("edit_") for name in s) for s in samples]
        if max(counts) == 0:
            return batch
        shapes = [[tuple(s[f"edit_{k}"].shape) for k in range(n)] for s, n in zip(samples, counts, strict=True)]
        if any(shape != shapes[0] for shape in shapes):
            raise ConfigError(
                f"the rows of a batch have different edit images (count and latent sizes {shapes}); every row needs "
                "edit_image, and one batch needs edit images of one count and size: train with --batch_size 1"
            )
        batch["edit_latents"] = [torch.stack([s[f"edit_{k}"] for s in samples]) for k in range(counts[0])]
        return batch

    def velocity(
        self, dit: nn.Module, batch: Mapping[str, Any], noisy_latents: torch.Tensor, sigma: torch.Tensor
    ) -> torch.Tensor:
        if "condition" in batch:  # Qwen-Image-Layered: noisy [B, N + 1, 16, h, w]
            text, text_mask, condition = batch["text"], batch["text_mask"], batch["condition"]
            return layered_velocity(dit, noisy_latents, sigma, text, text_mask, condition, batch.get("context"))
        edits = batch.get("edit_latents", ())
        if "context" in batch:  # before the edit images, as the pipeline lays its references out
            edits = [batch["context"], *edits]
        slot = next((s for s in CONTROL_SLOTS if f"{s}_condition" in batch), None)
        condition = batch[f"{slot}_condition"] if slot else None
        text, text_mask = batch["text"], batch["text_mask"]
        if self.trained_model != "dit":  # `dit` is the trainer's model: the net in training
            if slot != self.trained_model:
                raise ConfigError(
                    f"training the {NET_NAMES[self.trained_model]} needs rows with "
                    f"{control_columns(self.trained_model)[0]} (its control image; list the column in "
                    "--data_file_keys): this batch has none, or its cache was encoded without them"
                )
            _check_mask(self._net(slot), slot, condition.shape[1] > LATENT_CHANNELS, "this batch")
            if slot == BLOCKWISE:  # the net in training runs the whole call
                return dit(noisy_latents, sigma, text, text_mask, condition, edits)
            frozen = self.pipe.dit  # gradient checkpointing as the net was asked for
            frozen.gradient_checkpointing = bool(getattr(dit, "gradient_checkpointing", False))
            return controlnet_velocity(frozen, dit, noisy_latents, sigma, text, text_mask, condition, edits)
        if "eligen" in batch:
            return self._entity_velocity(dit, batch, noisy_latents, sigma)
        if slot is None:
            return qwen_image_velocity(dit, noisy_latents, sigma, text, text_mask, edits)
        net = self._net(slot)
        _check_mask(net, slot, condition.shape[1] > LATENT_CHANNELS, "this batch")
        call = blockwise_velocity if slot == BLOCKWISE else controlnet_velocity
        return call(dit, net, noisy_latents, sigma, text, text_mask, condition, edits)

    def _entity_velocity(
        self, dit: nn.Module, batch: Mapping[str, Any], noisy_latents: torch.Tensor, sigma: torch.Tensor
    ) -> torch.Tensor:
        """`qwen_image_velocity` row by row (one prompt at a time, as the pipeline runs EliGen): a row with entities
        reads the segments `entity_text` builds from its entity prompts and its own prompt, with their regions."""
        sigma = sigma.to(noisy_latents.device).expand(noisy_latents.shape[0])
        out = []
        for b, given in enumerate(batch["eligen"]):
            text, text_mask = batch["text"][b : b + 1], batch["text_mask"][b : b + 1]
            entities = None
            if given is not None:
                parts = given["eligen_text"].split(given["eligen_lengths"].tolist())
                pairs = [(p[None], torch.ones(1, p.shape[0], dtype=torch.bool, device=p.device)) for p in parts]
                entities = entity_text(pairs, (text, text_mask), given["eligen_regions"])
            row = noisy_latents[b : b + 1]
            out.append(qwen_image_velocity(dit, row, sigma[b : b + 1], text, text_mask, (), entities))
        return torch.cat(out)

    def inference_sigmas(self, latent_shape: Sequence[int], num_inference_steps: int) -> torch.Tensor:
        """The pipeline's schedule for this image size (the authors' dynamic shift of its H/16 * W/16 tokens, or
        the preset's `exponential_shift_mu`, `sigma_template` and `sampler`, as the pipeline reads its settings):
        what `--task direct_distill` samples along, as DiffSynth-Studio distilled Qwen-Image-Distill-Full/-LoRA."""
        if self.layered:
            raise ConfigError("--task direct_distill: Qwen-Image-Layered samples on its own schedule; use --task sft")
        pipe = self.pipe
        template = pipe.setting("sigma_template", None, "qwen_image")
        if template not in SIGMA_TEMPLATES:
            raise ConfigError(f"sigma_template={template!r} is not known; use one of {', '.join(SIGMA_TEMPLATES)}")
        scheduler = make_scheduler(SIGMA_TEMPLATES[template], str(pipe.setting("sampler", None, "euler")))
        tokens = (latent_shape[-2] // 2) * (latent_shape[-1] // 2)
        scheduler.set_timesteps(
            num_inference_steps, image_seq_len=tokens, mu=pipe.setting("exponential_shift_mu", None, None)
        )
        return scheduler.sigmas


def _empty(value) -> bool:
    return value is None or (isinstance(value, str) and not value)


def _empty_cell(value) -> bool:
    """Whether a row's cell holds nothing: no value, an empty text, or an empty list."""
    return (
        _empty(value)
        or (isinstance(value, str) and not value.strip())
        or (isinstance(value, (list, tuple)) and not value)
    )


def _check_layered_row(row: Mapping[str, Any], size: Any) -> None:
    """A Layered metadata row (see `QwenImageTrainingTask.check_row`): `image` a list of frames, as many as
    `layer_num` + 1 (one with `layer_num` 0), all of one header size with `layer_input_image`."""
    frames = row.get("image")
    if not isinstance(frames, list) or not frames:
        raise ConfigError(
            f"column image: {str(frames)[:80]!r} is not a list of frames; a Qwen-Image-Layered row lists the whole "
            "image, then its N layers (JSON/JSONL metadata)"
        )
    layer_num = row.get("layer_num")
    if layer_num not in (None, ""):
        try:
            count = int(str(layer_num).strip())
        except ValueError:
            raise ConfigError(f"column layer_num: {layer_num!r} is not a whole number of layers") from None
        if len(frames) != (1 if count == 0 else count + 1):  # Layered-Control: one frame, the layer
            raise ConfigError(
                f"column layer_num: {layer_num} but image lists {len(frames)} frames; layer_num counts the layers "
                f"after the whole image ({len(frames) - 1} here), or is 0 for Layered-Control's one layer"
            )
    elif len(frames) < 2:
        raise ConfigError(
            "column image: lists one frame; a Qwen-Image-Layered row lists the whole image, then its N layers (or "
            "says layer_num 0 for Layered-Control's one layer)"
        )
    inputs = row.get("layer_input_image")
    files = [("image", str(name)) for name in frames] + [
        ("layer_input_image", str(name)) for name in (inputs if isinstance(inputs, list) else [inputs]) if name
    ]
    first = (*files[0], size(*files[0]))
    for column, name in files[1:]:
        found = size(column, name)
        if found != first[2]:
            raise ConfigError(
                f"column {column}: {name} is {found[0]}x{found[1]} where {first[1]} (column {first[0]}) is "
                f"{first[2][0]}x{first[2][1]}; a Qwen-Image-Layered row's frames and input image must be one size "
                "(they are cropped alike to the training size)"
            )


def _picture(value, column: str, index: int):
    """A control column's value as a PIL image: a dataset tensor ([3, H, W] in [-1, 1], lossless for 8-bit files),
    a PIL image, or an existing file."""
    from PIL import Image

    if isinstance(value, torch.Tensor):
        return tensor_to_pil(value)[0]
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, (str, Path)) and Path(value).is_file():
        return load_image(value)
    raise ConfigError(
        f"row {index} of the batch: {column} is {str(value)[:80]!r}, not an image; list {column} in --data_file_keys "
        "so the dataset reads the file (paths relative to --dataset_base_path)"
    )


def _entity_prompts(value: str | Sequence[str] | None) -> list[str] | None:
    """`validation_eligen_entity_prompts` as a list: a string splits on "|" (--task_options splits on commas)."""
    if value is None:
        return None
    where = "--task_options validation_eligen_entity_prompts"
    items = value.split("|") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(p, str) for p in items):
        raise ConfigError(f"{where}={value!r}: give the entity prompts as text separated by '|', or a list of strings")
    prompts = [p.strip() for p in items]
    if not prompts or not all(prompts):
        raise ConfigError(f"{where}={value!r} has an empty entity prompt; e.g. 'a red apple|a blue cup'")
    return prompts


def _entity_inputs(row: Mapping[str, Any], index: int) -> tuple[list[str], list] | None:
    """A row's EliGen entities as the pipeline's checked inputs (prompts, RGB mask images), or None without any:
    the masks must have been read as images (the column in --data_file_keys)."""
    prompts, masks = (row.get(column) for column in ELIGEN_COLUMNS)
    given = [not (_empty(v) or (isinstance(v, (list, tuple)) and not v)) for v in (prompts, masks)]
    if not any(given):
        return None
    where = f"row {index} of the batch"
    if not all(given):
        have, lack = ELIGEN_COLUMNS if given[0] else ELIGEN_COLUMNS[::-1]
        raise ConfigError(
            f"{where} has {have} but no {lack}: EliGen trains on one mask (white = the entity's region) per entity "
            "prompt; give both columns (JSON/JSONL metadata: two lists of one length)"
        )
    items = list(masks) if isinstance(masks, (list, tuple)) else [masks]
    pictures = [_picture(item, ELIGEN_COLUMNS[1], index) for item in items]
    try:
        return check_entity_inputs(prompts, pictures)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _check_mask(net: nn.Module, slot: str, has_mask: bool, where: str) -> None:
    """An inpainting net needs the mask column; the others take none."""
    image_column, mask_column = control_columns(slot)
    if net.takes_mask and not has_mask:
        raise ConfigError(
            f"{where}: the {NET_NAMES[slot]} is an inpainting net: rows need {mask_column} (white = repaint) beside "
            f"{image_column}"
        )
    if has_mask and not net.takes_mask:
        raise ConfigError(
            f"{where} has {mask_column}, but the {NET_NAMES[slot]} takes no mask; drop the column, or train "
            f"{INPAINT_NETS[slot]}"
        )


def _edit_images(row: Mapping[str, Any]) -> list:
    """A row's edit images: dataset tensors back to PIL (lossless for 8-bit files)."""
    value = row.get("edit_image")
    if value is None or (isinstance(value, (str, list, tuple)) and not value):
        return []
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    return [tensor_to_pil(item)[0] if isinstance(item, torch.Tensor) else item for item in items]


def _layer_frames(row: Mapping[str, Any], index: int) -> list[torch.Tensor]:
    """A Layered row's frames ([4, H, W] each, one size), checked, with a message naming the row."""
    frames = row.get("image")
    if "prompt" not in row or row.get("layer_input_image") is None or not isinstance(frames, (list, tuple)):
        raise ConfigError(
            f"Qwen-Image-Layered trains on rows with prompt, image (a list of N + 1 RGBA frames: the whole image, "
            f"then its N layers; JSON/JSONL metadata) and layer_input_image; row {index} of the batch has "
            f"{preview(row)}"
        )
    layer_num = row.get("layer_num")
    control = layer_num not in (None, "") and str(layer_num).strip() == "0"  # Layered-Control: one frame, the layer
    if len(frames) < (1 if control else 2) or any(
        not isinstance(f, torch.Tensor) or f.dim() != 3 or f.shape[0] != 4 for f in frames
    ):
        shapes = [tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__ for f in frames]
        raise ConfigError(
            f"row {index} of the batch: image must list at least 2 RGBA frames [4, H, W] (the whole image, then "
            f"the layers; or, with layer_num=0 for Qwen-Image-Layered-Control, the one layer), got {shapes}"
        )
    if len({tuple(f.shape) for f in frames}) > 1:
        raise ConfigError(
            f"row {index} of the batch: the image frames differ in size: {[tuple(f.shape) for f in frames]}"
        )
    if layer_num not in (None, "") and int(layer_num) != len(frames) - 1:
        raise ConfigError(
            f"row {index} of the batch says layer_num={layer_num} but its image lists {len(frames)} frames: "
            f"layer_num counts the layers after the whole image ({len(frames) - 1} here)"
        )
    return list(frames)


def _input_image(row: Mapping[str, Any], size: tuple[int, int]):
    """A Layered row's input image as an RGBA PIL image of the frames' (height, width): the dataset reads it so
    (`aligned_conditioning`); another size (a row given directly) is resized (Lanczos) as `decompose` resizes it."""
    from PIL import Image

    value = row["layer_input_image"]
    image = tensor_to_pil(value)[0] if isinstance(value, torch.Tensor) else value
    image = image if image.mode == "RGBA" else image.convert("RGBA")
    height, width = size
    return image if image.size == (width, height) else image.resize((width, height), Image.LANCZOS)


def _side_by_side(layers):
    """A Layered sample (a list of RGBA layers) as one RGBA picture, the layers left to right."""
    from PIL import Image

    if not isinstance(layers, (list, tuple)):
        return layers
    width, height = layers[0].size
    sheet = Image.new("RGBA", (width * len(layers), height))
    for k, layer in enumerate(layers):
        sheet.paste(layer, (k * width, 0))
    return sheet


def _tokenizer_defaults(config: ModelConfig | None) -> dict[str, Any]:
    """The pipeline settings (`edit_template`) a tokenizer source implies: its preset's, or its folder's."""
    if config is None:
        return {}
    if config.model_id is not None:
        preset = next((p for name, p in PRESETS.items() if name.lower() == config.model_id.lower()), None)
        return {k: v for k, v in (preset.defaults if preset else {}).items() if k == "edit_template"}
    paths = [config.path] if isinstance(config.path, str) else list(config.path or ())
    if not paths:
        return {}
    folder = Path(paths[0]) if Path(paths[0]).is_dir() else Path(paths[0]).parent
    return {k: v for k, v in folder_defaults(folder.parent).items() if k == "edit_template"}


def _dit_source_defaults(configs: Sequence[ModelConfig]) -> dict[str, Any]:
    """The `edit_template` the DiT's source implies (`source_edit_template`: the first Qwen-Image-Edit's hub repo
    or diffusers folder), read from the given files whether or not this stage loads the DiT, so an encoder-only
    stage prompts with the template the DiT's stage (and a one-process run) uses."""
    dits = [c for c in configs if "dit" in model_roles(c)]
    template = source_edit_template(dits[0]) if len(dits) == 1 else None
    return {"edit_template": template} if template is not None else {}


def _is_edit_processor(config: ModelConfig) -> bool:
    """Whether a tokenizer config is an Edit repo's `processor/` (a hub pattern), or a local folder that is one or
    has one beside it (an Edit repo's `tokenizer/`, which a local folder's configs name): read without downloads,
    for the DiT's stage, which loads no tokenizer."""
    if config.model_id is not None:
        return (config.origin_file_pattern or "").rstrip("/").rsplit("/", 1)[-1] == "processor"
    paths = [config.path] if isinstance(config.path, str) else list(config.path or ())
    if not paths:
        return False
    folder = Path(paths[0]) if Path(paths[0]).is_dir() else Path(paths[0]).parent
    return any((f / "preprocessor_config.json").is_file() for f in (folder, folder.parent / "processor"))


__all__ = ["BlockwiseControlNetInTraining", "QwenImageTrainingTask", "blockwise_velocity", "controlnet_velocity"]
