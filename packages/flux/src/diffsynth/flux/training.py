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

FLUX.1 Tools DiTs with a wider input (`flux1/channels.py`) train on rows with their condition, in the pipeline's
argument names (DiffSynth-Studio's for Fill): FLUX.1-Fill-dev `"flux_fill_image"` + `"flux_fill_mask"` (white =
repaint), FLUX.1-Canny-dev / -Depth-dev (or FLUX.1-dev with their control LoRA fused by the trainer's
`--preset_lora_path`, which `read_lora` widens `img_in` for) `"control_image"` (the edge or depth map itself: no
annotator runs). They are pictures aligned with the target, so the dataset reads them at the row's size: list them
in `--data_file_keys` (as DiffSynth-Studio's `image,flux_fill_image,flux_fill_mask`); tensors [3, H, W] in [-1, 1]
(or PIL images) work too. Each is encoded by the pipeline's `encode_channel_condition` at the target's size (8-bit
pictures resized Lanczos, the mask binarised at 0.5, the masked image or the map VAE-encoded and packed, the mask
folded), giving `"condition"` `[H/16 * W/16, 320]` (Fill) or `[.., 64]` (Canny/Depth), which `flux_velocity`
concatenates to every noisy token. The DiT says which condition it takes (`condition_kind`: from the loaded DiT,
or its files' header when only the encoders load) and rows without it are refused naming the column; with no DiT
to ask, the rows' columns decide, and `velocity` refuses a condition the DiT does not take. Validation samples
need `--validation_images`: the image to fill and its mask (`"image.png,mask.png"`), or the control map.
Flex.2 (`flux1/flex.py`) trains on images and prompts alone, as DiffSynth-Studio trains it: its condition is the empty
one (no inpainting image, a mask of ones, no control map), and its validation samples are plain text-to-image calls.

ControlNets (`flux1/controlnet.py`: InstantX Union, alimama inpainting, jasperai upscaler, ...): with one among the
model files (the pipeline's `controlnet` slot), rows may carry DiffSynth-Studio's `--extra_inputs` columns
`controlnet_image` (the control picture, aligned with the target: list it in `--data_file_keys`), for a Union net
`controlnet_processor_id` (its control mode: canny, tile, depth, blur, pose, gray, lq, or an index) and for the
inpainting net `controlnet_inpaint_mask` (white = repaint). Each row's `ControlNetInput` is encoded by the
pipeline's `prepare_controls` at the target's size (resized Lanczos, VAE-encoded and packed; the inpainting net's
masked image plus the folded mask), giving `"controlnet"` `[H/16 * W/16, 64 or 68]` and `"controlnet_mode"` `[1]`;
`velocity` hands them to `flux_velocity` as a `ControlCondition` at scale 1, so the net's residuals enter the DiT
as in the pipeline's denoise loop. Training the DiT (LoRA or full) keeps the net frozen; rows without
`controlnet_image` train it without. `trained_model="controlnet"` (what `--trainable_models controlnet` asks the
trainer for: the net is one of the task's `trainable_slots`) trains the net in full under the frozen DiT, saved as
`<step>/controlnet/diffusion_pytorch_model.safetensors` in diffusers' `FluxControlNetModel` keys (`export_state`:
the hub files' layout, which the pipeline's ControlNet spec reads). One net at a time.
Validation samples take `--validation_images` as the control image (the inpainting net: `"image.png,mask.png"`) and
a Union net's mode from `--task_options validation_processor_id=NAME`.

EliGen (DiffSynth-Studio's lora/FLUX.1-dev-EliGen.sh; its `--extra_inputs` are not needed: every column reaches
the task): a row's `eligen_entity_prompts` (a JSON list of strings) and `eligen_entity_masks` (a JSON list of mask
files, white = the entity, listed in `--data_file_keys` so the dataset reads them at the row's size) are encoded by
the pipeline's `prepare_eligen` for its positive branch at the target's size: each entity prompt's T5 states
(`"eligen_t5"` [N, L, D], the prompt's length) and the masks' token regions (`"eligen_regions"` [N, H/16 * W/16],
bool). `velocity` hands them to `flux_velocity` as the pipeline's `EliGenEntities` (entity text before the prompt's,
the joint attention mask). Rows of one batch stack only with the same entity count (DiffSynth-Studio trains with
`--batch_size 1`). EliGen rows take no AttriCtrl values (the pipeline does not combine the two).

AttriCtrl (DiffSynth-Studio/AttriCtrl-FLUX.1-Dev; its `--extra_inputs value_controller_inputs`): with the attribute
encoder file(s) among the model files (the pipeline's `value_controller` slot), a row's `value_controller_inputs` (a
number in [0, 1], a CSV cell's text too, or a list: one value per encoder, in load order) is cached as the values
alone (`"value_controller_inputs"` [n]); `velocity` runs the encoders on them and appends their tokens to the
prompt's T5 states as the pipeline's `prepare_value_control` does, so a trained encoder gets gradients. Training the
DiT (LoRA) keeps the encoders frozen. `trained_model="value_controller"` (`--trainable_models value_controller`, one
encoder loaded) trains that encoder in full under the frozen DiT, saved as
`<step>/value_controller/diffusion_pytorch_model.safetensors` in the released keys, which `load_value_controller`
reads; its validation samples take `--task_options validation_value_controller_inputs=0.7`.

FLUX.1 Redux (DiffSynth-Studio's lora/ and full/FLUX.1-Redux-dev.sh): with the Redux embedder and its SigLIP image
encoder among the model files (`flux1-redux-dev.safetensors` or diffusers' `image_embedder/`; loaded with the
encoders through the pipeline's `load_redux`, frozen), a row's `flux_redux_image` (one picture or a list, read at
its own size: it is one of the `conditioning` columns; optional `flux_redux_scale` / `flux_redux_pooled_scale`,
default 1) is encoded as the pipeline's `prepare_redux` extends the positive prompt: `"t5"` [L + T, D] (the prompt's
states, then the image's T tokens) and `"pooled"` as weighted there. The model call is the plain one with that
prompt. Like the pipeline (and BFL's reference) the prompt is encoded; DiffSynth-Studio's unit puts zeros in its
place. Rows with and without the column share no batch (their prompts differ in length).

Insert Anything (DiffSynth-Studio's lora/Insert-Anything.sh, on FLUX.1-Fill-dev + Redux): a row's
`insert_anything_source_image`, `_source_mask`, `_ref_image` and `_ref_mask` (each read at its own size) become the
pipeline's Insert Anything inputs (`flux1.insert_anything.prepare_insert_anything`, halves of
`insert_anything_size` = 768 pixels): the diptych [masked reference | source crop] with its mask as the Fill
condition, the masked reference's Redux tokens after zero text states as the prompt. The target is the whole
unmasked diptych, as DiffSynth-Studio's unit sets the input image in training (the source image already shows the
object in place): the row's own `image` and prompt are not read. The pipeline's `insert_anything_*` call uses a
LoRA trained so in the place of the authors' one (which the HuanJue/Insert-Anything preset fuses). Validation
samples are not drawn for it (the call takes four pictures and no prompt).

IP-Adapter (DiffSynth-Studio's lora/ and full/FLUX.1-dev-IP-Adapter.sh): with the adapter file (InstantX's
`ip-adapter.bin`, or an XLabs `ip_adapter.safetensors`) and its image encoder (SigLIP so400m; CLIP-L for XLabs)
among the model files, as DiffSynth-Studio lists them, a row's `ipadapter_images` (one picture or a list, each read
at its own size: a `conditioning` column) is encoded as the pipeline's `prepare_ip_adapter` encodes it (resized and
normalised by `flux1.ip_adapter.preprocess`, then the encoder's pooled vector): `"ipadapter_embeds"` [N, E], one
vector per picture. Only the image encoder is frozen in every mode, so the cache holds its output and nothing the
adapter computes (1152 floats per picture, where the IP tokens are 128 x 4096 and the per-block keys/values some
45 M numbers): the adapter loads with the denoiser and `velocity` turns each row's vectors into its per-block keys
and values at scale 1 (`FluxIPAdapter.forward`, as the pipeline), handed to `flux_velocity` as the pipeline's
denoise step hands them. Training the DiT (LoRA) keeps the adapter frozen; `trained_model="ipadapter"`
(`--trainable_models ipadapter`, DiffSynth-Studio's name) trains the adapter in full under the frozen DiT (its image
projection and every block's `to_k_ip` / `to_v_ip`), saved as `<step>/ipadapter/diffusion_pytorch_model.safetensors`
in the released file's keys (`image_proj.*`, `ip_adapter.N.*`: `ip-adapter.bin`'s two groups flattened; XLabs'
names for an XLabs adapter), which `load_ip_adapter` reads strictly. Validation samples take `--validation_images`
as their `ipadapter_images` (the image encoder must be loaded: not from a cache).

LoRA Encoder (DiffSynth-Studio's full/FLUX.1-dev-LoRA-Encoder.sh): with the encoder (DiffSynth-Studio/LoRA-Encoder-
FLUX.1-Dev's `model.safetensors`) among the model files, a row's `lora_encoder_inputs` is a LoRA file of the DiT (a
path, a hub name such as "Org/Repo:file.safetensors", or a list of them; a CSV cell may hold a JSON list), as the
pipeline's argument: relative paths are taken from the working directory, as DiffSynth-Studio's
`ModelConfig(path=...)` takes them (the column is not a `--data_file_keys` one). The encoder is what trains, so
nothing it computes can be cached: the cache keeps the LoRA files' absolute paths (`"lora_encoder_inputs"`, their
JSON as UTF-8 bytes; the files must stay where they are), and `velocity` reads each LoRA as the pipeline's
`prepare_lora_encoding` does (`read_lora` onto the DiT's layers; the last few read are kept in memory), runs the
encoder and appends its tokens (one per LoRA) to the prompt's T5 states. As in DiffSynth-Studio's training the LoRA
is not applied to the DiT: the encoder learns a token that makes the frozen base model draw what the LoRA draws.
`trained_model="lora_encoder"` (`--trainable_models lora_encoder`) trains the encoder in full under the frozen DiT,
saved as `<step>/lora_encoder/diffusion_pytorch_model.safetensors` in the released keys (`embedder.model_dict.
blocks___0___...`), which `load_lora_encoder` reads; a DiT LoRA trains under the frozen encoder. Validation samples
take `--task_options validation_lora_encoder_inputs=FILE`. Rows of one batch share their number of LoRAs.

InfiniteYou (DiffSynth-Studio's lora/ and full/FLUX.1-dev-InfiniteYou.sh): with the id projector
(`image_proj_model.bin`, loaded with both stages through the pipeline's `load_infiniteyou`) and InfuseNet (a FLUX.1
ControlNet: `InfuseNetModel/`) among the model files, a row's face photo `infinityou_id_image` (DiffSynth-Studio's
column; `infiniteyou_id_image` too; read at its own size: a `conditioning` column, list it in `--data_file_keys`)
is encoded as the pipeline's `prepare_infiniteyou` encodes it: the largest face through the face encoder
(insightface + facexlib, the `diffsynth-flux[infiniteyou]` extra; its `models/antelopev2/` root from
`--task_options infiniteyou_insightface_root=DIR`, else the hub's). A row may give the ArcFace embedding instead,
`infiniteyou_id_embedding` (or `infinityou_id_embedding`): a `.safetensors` (one tensor), `.npy` or `.pt` file of
`[512]` or `[N, 512]`, absolute or relative to the working directory (not a `--data_file_keys` column), or a
tensor. Only the face encoder is frozen in every mode, so the cache holds its embedding (`"infiniteyou_embedding"`
[N, 512]) and the row's `infinityou_guidance` (InfuseNet's own guidance, default 1; `"infiniteyou_guidance"` [1]);
the row's `controlnet_image` (default: a black picture of the target's size, as the pipeline's) is encoded as for
any ControlNet. `velocity` projects the embedding into InfuseNet's text tokens and hands InfuseNet to
`flux_velocity` as the pipeline's positive branch does (`ControlCondition` with the id tokens as its text at
position 0 and its guidance; the DiT keeps the prompt). Rows of one batch share their guidance. A DiT LoRA trains
under the frozen InfuseNet and projector. `--trainable_models controlnet,image_proj_model` (DiffSynth-Studio's
names; `controlnet` alone trains InfuseNet under the frozen projector) trains the two together: the trainer's model
is then `InfiniteYouInTraining` (slot "infiniteyou"), whose parts are the two models and whose forward is the whole
model call; it is saved as `<step>/infiniteyou/diffusion_pytorch_model.safetensors` holding InfuseNet in diffusers'
`FluxControlNetModel` keys under `controlnet.` and the projector in the authors' keys under `image_proj_model.`
(with InfuseNet's `config.json` beside it); `split_infiniteyou_weights` writes them as the released layout
(`InfuseNetModel/diffusion_pytorch_model.safetensors` + `config.json`, `image_proj_model.safetensors`), which the
pipeline loads strictly. Validation samples take `--validation_images` as the face photo (and optionally the control
image after it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import nn

from diffsynth.runtime.controlnet import ControlNetInput, ControlNetSlot
from diffsynth.runtime.errors import ConfigError, preview
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.media import load_image, pil_to_tensor, tensor_to_pil
from diffsynth.runtime.pipeline import WEIGHT_SUFFIXES, weight_paths
from diffsynth.runtime.schedulers import FlowMatchScheduler
from diffsynth.runtime.training_support import PipelineTrainingTask, load_partial_pipeline, model_roles
from diffsynth.runtime.vram import module_dtype

from .flux1.channels import CONTROL, FILL, FLEX, condition_kind, describe_widths, flex_condition
from .flux1.controlnet import UNION_MODES, Flux1ControlNet, Flux1ControlNetConfig
from .flux1.eligen import EliGenEntities, check_entity_inputs
from .flux1.ip_adapter import IPAdapterKV
from .flux1.text_encoder import T5_SEQUENCE_LENGTH, FluxPromptEmbeds
from .pipeline import ControlCondition, FluxImagePipeline, KontextLatents, flux_velocity, pack_latents
from .reference_batches import collate_references, row_references

logger = logging.getLogger(__name__)

ENCODER_SLOTS = ("vae", "text_encoder_1", "text_encoder_2")
TRAINING_GUIDANCE = 1.0  # DiffSynth-Studio's FLUX.1 training scripts: embedded_guidance=1
# the row columns of each wider-input DiT's condition (the pipeline's arguments), and the condition's width
CHANNEL_COLUMNS = {FILL: ("flux_fill_image", "flux_fill_mask"), CONTROL: ("control_image",)}
CHANNEL_MODELS = {FILL: "FLUX.1 Fill", CONTROL: "FLUX.1 Canny/Depth"}
CONDITION_WIDTHS = {320: FILL, 64: CONTROL}
# `trained_model`: what the trainer trains
TRAINED_MODELS = ("dit", "controlnet", "value_controller", "ipadapter", "lora_encoder")
UNDER_FROZEN_DIT = ("value_controller", "ipadapter", "lora_encoder")  # trained models the frozen DiT reads
ELIGEN_COLUMNS = ("eligen_entity_prompts", "eligen_entity_masks")  # DiffSynth-Studio's --extra_inputs
VALUE_COLUMN = "value_controller_inputs"  # AttriCtrl's values (DiffSynth-Studio's --extra_inputs)
REDUX_COLUMN = "flux_redux_image"  # FLUX.1 Redux's reference image(s) (DiffSynth-Studio's --extra_inputs)
IP_COLUMN = "ipadapter_images"  # the IP-Adapter's reference picture(s) (DiffSynth-Studio's --extra_inputs)
IP_EMBEDS = "ipadapter_embeds"  # an encoded row's image-encoder vectors [N, E]
LORA_ENCODER_COLUMN = "lora_encoder_inputs"  # the LoRA Encoder's LoRA file(s) (DiffSynth-Studio's --extra_inputs)
LORA_CACHE = 4  # LoRA files `velocity` keeps read (the rows of a batch, and the next ones, often share them)
REDUX_SCALES = ("flux_redux_scale", "flux_redux_pooled_scale")  # the pipeline's optional weights, per row
# Insert Anything's four pictures (DiffSynth-Studio's --extra_inputs; the pipeline's arguments)
INSERT_COLUMNS = (
    "insert_anything_source_image",
    "insert_anything_source_mask",
    "insert_anything_ref_image",
    "insert_anything_ref_mask",
)
INSERT_SIZE = 768  # the side of each half of the diptych (the authors', `flux1.insert_anything.SIZE`)
REDUX_CONDITIONING = (REDUX_COLUMN, *INSERT_COLUMNS)  # Redux's and Insert Anything's pictures: each at its own size
INSERT_MARK = "_insert_anything"  # an encoded row's mark: its prompt is the authors' zero text states
REDUX_HINT = (
    "add the Redux embedder and its SigLIP image encoder to the models (e.g. --model_id_with_origin_paths "
    "black-forest-labs/FLUX.1-Redux-dev:image_encoder/model.safetensors,black-forest-labs/FLUX.1-Redux-dev:"
    "image_embedder/diffusion_pytorch_model.safetensors)"
)
IP_ADAPTER_HINT = (
    "add the adapter and its image encoder to the models (e.g. --model_id_with_origin_paths "
    "InstantX/FLUX.1-dev-IP-Adapter:ip-adapter.bin,google/siglip-so400m-patch14-384:model.safetensors)"
)
LORA_ENCODER_HINT = (
    "add the LoRA Encoder to the models (e.g. --model_id_with_origin_paths "
    "DiffSynth-Studio/LoRA-Encoder-FLUX.1-Dev:model.safetensors)"
)
VALUE_ENCODER_HINT = (
    "add the attribute encoder to the models (e.g. --model_id_with_origin_paths "
    "DiffSynth-Studio/AttriCtrl-FLUX.1-Dev:models/brightness.safetensors, or --model_paths FILE)"
)
CONTROLNET_HINT = (
    "add its diffusion_pytorch_model.safetensors to the models (e.g. --model_paths, or --model_id_with_origin_paths "
    "InstantX/FLUX.1-dev-Controlnet-Union-alpha:diffusion_pytorch_model.safetensors)"
)
# InfiniteYou's row columns (DiffSynth-Studio's `infinityou_*` spelling first, then ours) and cached entries
IY_IMAGE_COLUMNS = ("infinityou_id_image", "infiniteyou_id_image")
IY_EMBEDDING_COLUMNS = ("infinityou_id_embedding", "infiniteyou_id_embedding")
IY_GUIDANCE_COLUMNS = ("infinityou_guidance", "infiniteyou_guidance")
IY_EMBEDS = "infiniteyou_embedding"  # an encoded row's ArcFace embedding(s) [N, 512]
IY_GUIDANCE = "infiniteyou_guidance"  # an encoded row's InfuseNet guidance [1]
IY_SLOT = "infiniteyou"  # the trainer's model when InfuseNet is trained: `InfiniteYouInTraining`
IY_HINT = (
    "add InfiniteYou's id projector and InfuseNet to the models (e.g. --model_id_with_origin_paths "
    "ByteDance/InfiniteYou:infu_flux_v1.0/aes_stage2/image_proj_model.bin,"
    "ByteDance/InfiniteYou:infu_flux_v1.0/aes_stage2/InfuseNetModel/*.safetensors)"
)


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
        sigma_shift: float = 3.0,
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
        `validation_processor_id` is a Union net's control mode for validation samples (see the module docstring).
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
        self.scheduler = FlowMatchScheduler("flux1", mu=math.log(sigma_shift))
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
            self.validation_values = _parse_values(
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
        projector, model_configs = _infiniteyou_sources(model_configs)
        ip, model_configs = _ip_adapter_sources(model_configs)
        redux, model_configs = _redux_sources(model_configs)
        tokenizers = _tokenizer_pair(tokenizer_config, model_configs) if encoders else (None, None)
        controlnets = _header_configs(model_configs, "controlnet")
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
            _load_ip_adapter(pipe, *ip, encoders=encoders, denoiser=denoiser)
        if projector is not None:
            if not controlnets:
                raise ConfigError(
                    f"InfiniteYou's id projector {projector} steers InfuseNet, a FLUX.1 ControlNet, which is not among "
                    f"the model files: {IY_HINT}"
                )
            pipe.load_infiniteyou(projector)
        defaults = pipe.defaults  # the preset's or the model folder's (load_partial_pipeline)
        task_options.setdefault("t5_sequence_length", defaults.get("t5_sequence_length", T5_SEQUENCE_LENGTH))
        kontext = "kontext_auto_resize" in defaults or any(map(_names_kontext, model_configs))
        task_options.setdefault("kontext", True if kontext else None)
        roles = [model_roles(config) for config in model_configs]
        value_encoders = sum("value_controller" in found for found in roles)
        lora_encoder = any("lora_encoder" in found for found in roles)
        net = controlnets[0] if controlnets else None
        task = cls(pipe, net, value_encoders, ip is not None, lora_encoder, projector is not None, **task_options)
        task.dit_config = pipe.dit.config if pipe.dit is not None else _dit_config(model_configs)
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
            return self._control_arguments(images)
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

    def _control_arguments(self, images: Sequence[Any]) -> dict[str, Any]:
        """A ControlNet validation sample's `controlnet_inputs`: the control image, the inpainting net's mask, a
        Union net's mode (`validation_processor_id`)."""
        config = self.controlnet_config
        if self.channel_kind is not None or self.kontext:
            raise ConfigError(
                "validation samples of a Fill / Canny / Depth or Kontext DiT with a ControlNet take two kinds of "
                "images, which --validation_images cannot tell apart; drop --validation_prompts"
            )
        if _takes_mask(config):
            if len(images) != 2:
                raise ConfigError(
                    "an inpainting ControlNet's validation sample takes two images, the image to repaint and its mask "
                    f"(white = repaint), e.g. --validation_images 'cup.png,cup_mask.png'; got {len(images)}"
                )
            mask = images[1]
        else:
            if len(images) != 1:
                raise ConfigError(
                    "a ControlNet's validation sample takes one image, its control image (a canny / depth / pose "
                    f"map, the low-resolution image for an upscaler), e.g. --validation_images pose.png; got {len(images)}"
                )
            mask = None
        mode = _union_mode(config, self.validation_processor_id, "--task_options validation_processor_id")
        return {"controlnet_inputs": [ControlNetInput(image=images[0], processor_id=mode, inpaint_mask=mask)]}

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
        names (the layout its hub files have), an XLabs IP-Adapter in XLabs' names; the DiT, an AttriCtrl encoder,
        an InstantX IP-Adapter (`ip-adapter.bin`'s groups flattened) and the LoRA Encoder as they are (our names
        are BFL's and the released files'); InfiniteYou's InfuseNet and projector each in its released keys under
        its part's name (`export_infiniteyou_state`)."""
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

    # ------------------------------------------------------------------ the protocol
    def encode(self, rows: list[Mapping[str, Any]]) -> list[dict[str, torch.Tensor]]:
        """`{"latents": [16, H/8, W/8], "t5": [L, D], "pooled": [D']}` per row, with `"kontext"` [N, 64] and
        `"kontext_ids"` [N, 3] for a row with references, and the add-ons' entries the module docstring lists (e.g.
        `"ipadapter_embeds"` [N, E], `"lora_encoder_inputs"` the LoRA paths' bytes); rows of one call share an
        image size."""
        rows = [self._insert_anything_row(i, row) for i, row in enumerate(rows)]
        kinds = []
        for i, row in enumerate(rows):
            if "prompt" not in row or not isinstance(row.get("image"), torch.Tensor):
                raise ConfigError(
                    f"FLUX.1 trains on rows with an image and a prompt; row {i} of the batch has {preview(row)}"
                )
            kinds.append(self._row_channel_kind(i, row))
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
                sample["condition"] = self._encode_condition(i, row, kind)
            if _has(row, REDUX_COLUMN):
                sample.update(self._encode_redux(i, row, sample))
            elif any(_has(row, column) for column in REDUX_SCALES):
                raise ConfigError(
                    f"row {i} of the batch (prompt {str(row['prompt'])[:60]!r}) has "
                    f"{' / '.join(c for c in REDUX_SCALES if _has(row, c))} but no {REDUX_COLUMN} to weigh"
                )
        identities = {i: self._encode_identity(i, row) for i, row in enumerate(rows) if _identity_given(row)}
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
            if i in identities and not _has(row, "controlnet_image")
            else row
            for i, row in enumerate(rows)
        ]
        controlled = [i for i, row in enumerate(rows) if _has(row, "controlnet_image")]
        if self.trained_model == "controlnet" and len(controlled) < len(rows):
            i = next(i for i in range(len(rows)) if i not in controlled)
            raise ConfigError(
                f"row {i} of the batch (prompt {str(rows[i]['prompt'])[:60]!r}) has no controlnet_image: training the "
                "ControlNet needs every row's control image (list it in --data_file_keys, e.g. "
                f"--data_file_keys image,controlnet_image); its columns are {', '.join(rows[i])}"
            )
        if controlled:
            with self._controlnet_for_encoding():
                for i in controlled:
                    samples[i].update(self._encode_control(i, rows[i]))
        for i, identity in identities.items():
            samples[i].update(identity)
        for i, (sample, row) in enumerate(zip(samples, rows, strict=True)):
            sample.update(self._encode_entities(i, row))
            where = f"row {i} of the batch (prompt {str(row['prompt'])[:60]!r})"
            if _has(row, VALUE_COLUMN):
                values = _parse_values(row[VALUE_COLUMN], self.value_encoders, f"{where}: {VALUE_COLUMN}")
                sample[VALUE_COLUMN] = torch.tensor(values, dtype=torch.float32)  # tokens: in `velocity`
            elif self.trained_model == "value_controller":
                raise ConfigError(
                    f"{where} has no {VALUE_COLUMN}: training the AttriCtrl encoder needs every row's value (a number "
                    f"in [0, 1] in a {VALUE_COLUMN} column); its columns are {', '.join(row)}"
                )
            if _has(row, IP_COLUMN):
                sample[IP_EMBEDS] = self._encode_ip_images(i, row)
            elif self.trained_model == "ipadapter":
                raise ConfigError(
                    f"{where} has no {IP_COLUMN}: training the IP-Adapter needs every row's reference picture(s) "
                    f"(listed in --data_file_keys, e.g. --data_file_keys image,{IP_COLUMN}); its columns are "
                    f"{', '.join(row)}"
                )
            if _has(row, LORA_ENCODER_COLUMN):
                sample[LORA_ENCODER_COLUMN] = self._encode_lora_inputs(where, row[LORA_ENCODER_COLUMN])
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

    def _insert_anything_row(self, index: int, row: Mapping[str, Any]) -> Mapping[str, Any]:
        """A row with Insert Anything's four pictures as the Fill + Redux row the pipeline's preparation makes of
        them (`prepare_insert_anything`): the diptych [masked reference | source crop] as `flux_fill_image` and as
        the target `image` (DiffSynth-Studio trains on the diptych itself: the source image already holds the
        object), its mask, and the masked reference as `flux_redux_image`; the row's own image and prompt are not
        read (zero text states, as the pipeline's). Other rows as they are."""
        from .flux1.insert_anything import prepare_insert_anything

        given = [column for column in INSERT_COLUMNS if _has(row, column)]
        if not given:
            return row
        where = f"row {index} of the batch"
        if len(given) < len(INSERT_COLUMNS):
            missing = [column for column in INSERT_COLUMNS if column not in given]
            raise ConfigError(
                f"{where} has {', '.join(given)} but no {', '.join(missing)}: Insert Anything trains on all four "
                f"(list them in --data_file_keys, e.g. --data_file_keys image,{','.join(INSERT_COLUMNS)})"
            )
        others = [c for c in (*CHANNEL_COLUMNS[FILL], REDUX_COLUMN, "control_image", "kontext_images") if _has(row, c)]
        if others:
            raise ConfigError(
                f"{where} has insert_anything_* with {', '.join(others)}; Insert Anything makes the Fill and Redux "
                "inputs itself: drop them"
            )
        config = self.pipe.dit.config if self.pipe.dit is not None else self.dit_config
        if config is not None and condition_kind(config) != FILL:
            raise ConfigError(
                f"{where} has insert_anything_*, which need a FLUX.1 Fill DiT (black-forest-labs/FLUX.1-Fill-dev: "
                f"flux1-fill-dev.safetensors); this is {describe_widths(config)}"
            )
        if self.pipe.flux_redux is None or self.pipe.flux_redux_image_encoder is None:
            raise ConfigError(
                f"{where}: insert_anything_ref_image is read by FLUX.1 Redux, which is not among the models: "
                f"{REDUX_HINT}"
            )
        pictures = [_row_picture(index, row, column) for column in INSERT_COLUMNS]
        try:
            insert = prepare_insert_anything(*pictures, size=self.insert_anything_size)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        out = {k: v for k, v in row.items() if k not in INSERT_COLUMNS}
        return {
            **out,
            "prompt": "",
            "image": pil_to_tensor(insert.fill_image)[0],
            CHANNEL_COLUMNS[FILL][0]: insert.fill_image,
            CHANNEL_COLUMNS[FILL][1]: insert.fill_mask,
            REDUX_COLUMN: insert.redux_image,
            INSERT_MARK: True,
        }

    def _encode_redux(self, index: int, row: Mapping[str, Any], sample: Mapping[str, torch.Tensor]) -> dict:
        """`{"t5": [L + T, D], "pooled": [D']}`: the row's prompt with the Redux tokens of its reference image(s)
        appended, as the pipeline's `prepare_redux` gives the positive prompt (`flux_redux_scale` /
        `flux_redux_pooled_scale` when the row has them, else 1)."""
        where = f"row {index} of the batch (prompt {str(row['prompt'])[:60]!r})"
        pipe = self.pipe
        if pipe.flux_redux is None or pipe.flux_redux_image_encoder is None:
            raise ConfigError(f"{where} has {REDUX_COLUMN}, but FLUX.1 Redux is not among the models: {REDUX_HINT}")
        value = row[REDUX_COLUMN]
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        names = [REDUX_COLUMN] if len(values) == 1 else [f"{REDUX_COLUMN}[{k}]" for k in range(len(values))]
        images = [_picture(index, v, name, REDUX_COLUMN) for v, name in zip(values, names, strict=True)]
        scales = [_redux_scale(row.get(column), f"{where}: {column}") for column in REDUX_SCALES]
        try:
            checked = pipe.check_redux_inputs(images, *scales)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        text = FluxPromptEmbeds(sample["t5"][None], sample["pooled"][None])
        text = pipe.prepare_redux(text, *checked)
        return {"t5": text.t5[0], "pooled": text.pooled[0]}

    def _encode_ip_images(self, index: int, row: Mapping[str, Any]) -> torch.Tensor:
        """`[N, E]` (float32): the image encoder's vectors of the row's reference picture(s), as the pipeline's
        `prepare_ip_adapter` computes them (`preprocess` to the encoder's input, then `image_embeds`)."""
        from .flux1.ip_adapter import preprocess

        where = f"row {index} of the batch (prompt {str(row['prompt'])[:60]!r})"
        encoder = self.pipe.ipadapter_image_encoder
        if encoder is None:
            missing = "its image encoder is not loaded" if self.ip_adapter else "no IP-Adapter is among the models"
            raise ConfigError(f"{where} has {IP_COLUMN}, but {missing}: {IP_ADAPTER_HINT}")
        value = row[IP_COLUMN]
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        names = [IP_COLUMN] if len(values) == 1 else [f"{IP_COLUMN}[{k}]" for k in range(len(values))]
        images = [load_image(_picture(index, v, n, IP_COLUMN)) for v, n in zip(values, names, strict=True)]
        pixels = preprocess(images, encoder.kind, encoder.config.image_size)
        with torch.no_grad():
            return encoder.image_embeds(pixels.to(self.pipe.device, module_dtype(encoder))).float()

    def _encode_lora_inputs(self, where: str, value: Any) -> torch.Tensor:
        """A row's LoRA file(s) as the cache keeps them: their absolute paths, as JSON in UTF-8 bytes (uint8). Hub
        names are fetched here (`lora_file`, as the pipeline resolves them)."""
        from diffsynth.runtime.pipeline import lora_file

        if not self.lora_encoder:
            raise ConfigError(
                f"{where} has {LORA_ENCODER_COLUMN}, but no LoRA Encoder is among the models: {LORA_ENCODER_HINT}"
            )
        items = value
        if isinstance(value, str) and value.strip().startswith("["):
            try:
                items = json.loads(value)
            except json.JSONDecodeError:
                raise ConfigError(
                    f"{where}: {LORA_ENCODER_COLUMN} {value!r} is not a JSON list of LoRA files"
                ) from None
        items = list(items) if isinstance(items, (list, tuple)) else [items]
        if not items:
            raise ConfigError(f"{where}: {LORA_ENCODER_COLUMN} is an empty list; give one LoRA file or several")
        paths = []
        for item in items:
            if isinstance(item, ModelConfig) or (isinstance(item, (str, os.PathLike)) and str(item).strip()):
                path = lora_file(item if isinstance(item, ModelConfig) else str(item).strip())
            else:
                raise ConfigError(f"{where}: {LORA_ENCODER_COLUMN} must name LoRA files, got {item!r}")
            if not os.path.isfile(path):
                raise ConfigError(
                    f"{where}: {LORA_ENCODER_COLUMN} {str(item)!r} is no file (relative paths are taken from the "
                    f"working directory {os.getcwd()}, as DiffSynth-Studio takes them; give absolute paths)"
                )
            paths.append(os.path.abspath(path))
        return torch.tensor(list(json.dumps(paths).encode("utf-8")), dtype=torch.uint8)

    def _encode_identity(self, index: int, row: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """`{"infiniteyou_embedding": [N, 512], "infiniteyou_guidance": [1]}` (float32): the row's face as the
        pipeline's `prepare_infiniteyou` embeds it before its projector (the face encoder's output for a photo, or
        the given embedding), checked as it checks them; the guidance as given (default 1)."""
        from .flux1.infiniteyou import check_embedding

        where = f"row {index} of the batch (prompt {str(row['prompt'])[:60]!r})"
        image_column = _one_spelling(row, IY_IMAGE_COLUMNS, where)
        embedding_column = _one_spelling(row, IY_EMBEDDING_COLUMNS, where)
        guidance_column = _one_spelling(row, IY_GUIDANCE_COLUMNS, where)
        given = image_column or embedding_column or guidance_column
        projector = self.pipe.infiniteyou_projector
        if projector is None:
            raise ConfigError(f"{where} has {given}, but InfiniteYou's id projector is not among the models: {IY_HINT}")
        if self.controlnet_config is None:
            raise ConfigError(
                f"{where} has {given}, but InfuseNet (a FLUX.1 ControlNet) is not among the models: {IY_HINT}"
            )
        if image_column and embedding_column:
            raise ConfigError(
                f"{where} has {image_column} and {embedding_column}; give the face photo or its embedding"
            )
        if not (image_column or embedding_column):
            raise ConfigError(
                f"{where} has {guidance_column} but no face to guide: give {IY_IMAGE_COLUMNS[0]} (a photo) or "
                f"{IY_EMBEDDING_COLUMNS[1]} (its ArcFace embedding)"
            )
        if image_column:
            embedding = self._face_embedding(where, _row_picture(index, row, image_column))
        else:
            embedding = _read_embedding(row[embedding_column], f"{where}: {embedding_column}")
        try:
            embedding = check_embedding(embedding, projector.config.embedding_dim)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        guidance = _iy_guidance(row.get(guidance_column) if guidance_column else None, f"{where}: {guidance_column}")
        return {IY_EMBEDS: embedding[0], IY_GUIDANCE: torch.tensor([guidance], dtype=torch.float32)}

    def _face_embedding(self, where: str, photo: Image.Image) -> torch.Tensor:
        """The `[512]` embedding of the largest face in `photo`: the pipeline's face encoder, built as the pipeline
        builds it at its first photo (the install command first when the extra is missing)."""
        from .flux1.infiniteyou import FaceEncoder, face_libraries

        pipe = self.pipe
        if pipe.infiniteyou_face_encoder is None:
            face_libraries()
            pipe.infiniteyou_face_encoder = FaceEncoder.from_insightface(pipe.infiniteyou_insightface_root, pipe.device)
        try:
            return pipe.infiniteyou_face_encoder(load_image(photo))
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None

    def _encode_entities(self, index: int, row: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """`{"eligen_t5": [N, L, D], "eligen_regions": [N, H/16 * W/16]}` for a row with EliGen entities (none
        without): the pipeline's `prepare_eligen` for its positive branch at the target's size."""
        entities = _row_entities(index, row)
        if entities is None:
            return {}
        _, height, width = row["image"].shape
        positive, _ = self.pipe.prepare_eligen(*entities, None, False, height, width, self.t5_sequence_length)
        return {"eligen_t5": positive.t5[0], "eligen_regions": positive.regions[0]}

    @contextlib.contextmanager
    def _controlnet_for_encoding(self):
        """The pipeline with a ControlNet in its slot for `prepare_controls`: the loaded net, or (the encoding stage
        of a cached run loads none) one of the header's config built on the meta device: only its config is read."""
        if self.pipe.controlnet is not None:
            yield
            return
        if self._shape_net is None:
            with torch.device("meta"):
                self._shape_net = Flux1ControlNet(self.controlnet_config)
        with self.pipe.using("controlnet", ControlNetSlot([self._shape_net])):
            yield

    def _encode_control(self, index: int, row: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """`{"controlnet": [H/16 * W/16, 64 or 68]}` (+ `"controlnet_mode"` `[1]` for a Union net): the row's
        `ControlNetInput` as the pipeline's `prepare_controls` encodes it for an output of the target's size."""
        where = f"row {index} of the batch (prompt {str(row['prompt'])[:60]!r})"
        config = self.controlnet_config
        if config is None:
            raise ConfigError(
                f"{where} has controlnet_image, but no FLUX.1 ControlNet is among the models: {CONTROLNET_HINT}"
            )
        has_mask = _has(row, "controlnet_inpaint_mask")
        if _takes_mask(config) and not has_mask:
            raise ConfigError(
                f"{where} has no controlnet_inpaint_mask: this ControlNet is an inpainting net (condition width "
                f"{config.cond_in_channels}) and trains on controlnet_image with controlnet_inpaint_mask (white = "
                "repaint; --data_file_keys image,controlnet_image,controlnet_inpaint_mask)"
            )
        if has_mask and not _takes_mask(config):
            raise ConfigError(
                f"{where} has controlnet_inpaint_mask, but this ControlNet takes no mask (condition width "
                f"{config.cond_in_channels}; alimama's inpainting net takes one): drop the column"
            )
        mode = _union_mode(config, row.get("controlnet_processor_id"), f"{where}: controlnet_processor_id")
        control = ControlNetInput(
            image=_row_picture(index, row, "controlnet_image"),
            processor_id=mode,
            inpaint_mask=_row_picture(index, row, "controlnet_inpaint_mask") if has_mask else None,
        )
        _, height, width = row["image"].shape
        prepared = self.pipe.prepare_controls([control], height, width)[0]
        sample = {"controlnet": prepared.tokens[0]}
        if prepared.mode is not None:
            sample["controlnet_mode"] = torch.tensor([prepared.mode], dtype=torch.long)
        return sample

    def _row_channel_kind(self, index: int, row: Mapping[str, Any]) -> str | None:
        """The wider-input condition a row gives (FILL, CONTROL or None), checked against what the DiT takes."""
        given = {kind for kind, columns in CHANNEL_COLUMNS.items() for c in columns if _has(row, c)}
        where = f"row {index} of the batch (prompt {str(row['prompt'])[:60]!r})"
        if len(given) > 1:
            raise ConfigError(
                f"{where} has both flux_fill_image / flux_fill_mask and control_image; they go to different DiTs "
                "(Fill, Canny/Depth): give the columns of the model trained"
            )
        kind = self.channel_kind
        row_kind = given.pop() if given else None
        if kind is not None:
            missing = [c for c in CHANNEL_COLUMNS[kind] if not _has(row, c)]
            if missing:
                raise ConfigError(
                    f"{where} has no {' and no '.join(missing)}: a {CHANNEL_MODELS[kind]} model trains on rows with "
                    f"image, prompt and {', '.join(CHANNEL_COLUMNS[kind])} (list them in --data_file_keys, e.g. "
                    f"--data_file_keys image,{','.join(CHANNEL_COLUMNS[kind])}); its columns are {', '.join(row)}"
                )
        elif row_kind == FILL:
            missing = [c for c in CHANNEL_COLUMNS[FILL] if not _has(row, c)]
            if missing:
                raise ConfigError(
                    f"{where} has no {missing[0]}: a FLUX.1 Fill model trains on flux_fill_image and flux_fill_mask "
                    "(white = repaint)"
                )
            config = self.pipe.dit.config if self.pipe.dit is not None else self.dit_config
            if config is not None:  # a plain DiT: no LoRA makes it a Fill one
                raise ConfigError(
                    f"{where} has flux_fill_image / flux_fill_mask, which need a FLUX.1 Fill DiT (in_channels 384, "
                    f"e.g. black-forest-labs/FLUX.1-Fill-dev); this is {describe_widths(config)}"
                )
        if row_kind is not None and row_references(row, "kontext_images"):
            raise ConfigError(
                f"{where} has kontext_images with {', '.join(CHANNEL_COLUMNS[row_kind])}; "
                "a Fill / Canny / Depth DiT takes no Kontext references"
            )
        return row_kind

    def _encode_condition(self, index: int, row: Mapping[str, Any], kind: str) -> torch.Tensor:
        """`[H/16 * W/16, 320 or 64]`: the row's Fill image and mask or control map as the pipeline encodes them
        for an output of the target's size (`encode_channel_condition`)."""
        _, height, width = row["image"].shape
        pictures = [_row_picture(index, row, column) for column in CHANNEL_COLUMNS[kind]]
        images = [load_image(pictures[0])]
        masks = [pictures[1].convert("L")] if kind == FILL else []
        return self.pipe.encode_channel_condition((kind, images, masks), 1, height, width)[0]

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
        present = sum(IY_EMBEDS in s for s in samples)
        if present and present < len(samples):
            raise ConfigError(
                f"a batch mixes {present} rows with {IY_IMAGE_COLUMNS[0]} and {len(samples) - present} without; give "
                "every row its own (or none), or train with --batch_size 1"
            )
        if present:
            counts = [s[IY_EMBEDS].shape[0] for s in samples]
            guidances = [float(s[IY_GUIDANCE]) for s in samples]
            if len(set(counts)) > 1 or len(set(guidances)) > 1:
                raise ConfigError(
                    f"the rows of a batch have {counts} face embeddings and {IY_GUIDANCE_COLUMNS[0]} {guidances}; "
                    "InfuseNet takes one count and one guidance per batch: train with --batch_size 1"
                )
            batch[IY_EMBEDS] = torch.stack([s[IY_EMBEDS] for s in samples])
            batch[IY_GUIDANCE] = torch.stack([s[IY_GUIDANCE] for s in samples])
        with_condition = sum("condition" in s for s in samples)
        if with_condition == len(samples):
            batch["condition"] = torch.stack([s["condition"] for s in samples])
        elif with_condition:
            raise ConfigError(
                f"a batch mixes {with_condition} rows with a Fill / Canny / Depth condition and "
                f"{len(samples) - with_condition} without; give every row its flux_fill_image + flux_fill_mask or "
                "control_image"
            )
        for key in ("controlnet", "controlnet_mode"):
            present = sum(key in s for s in samples)
            if present == len(samples):
                batch[key] = torch.stack([s[key] for s in samples])
            elif present:
                raise ConfigError(
                    f"a batch mixes {present} rows with controlnet_image and {len(samples) - present} without; give "
                    "every row its controlnet_image (or none), or train with --batch_size 1"
                )
        for key, what in (("eligen_t5", "EliGen entities"), (VALUE_COLUMN, VALUE_COLUMN)):
            present = sum(key in s for s in samples)
            if present and present < len(samples):
                raise ConfigError(
                    f"a batch mixes {present} rows with {what} and {len(samples) - present} without; give every row "
                    "its own (or none), or train with --batch_size 1"
                )
        if "eligen_t5" in samples[0]:
            counts = [s["eligen_t5"].shape[0] for s in samples]
            if len(set(counts)) > 1:
                raise ConfigError(
                    f"the rows of a batch have {counts} EliGen entities; rows with different entity counts cannot "
                    "share a batch: train with --batch_size 1 (as DiffSynth-Studio does)"
                )
            batch["eligen_t5"] = torch.stack([s["eligen_t5"] for s in samples])
            batch["eligen_regions"] = torch.stack([s["eligen_regions"] for s in samples])
        if VALUE_COLUMN in samples[0]:
            batch[VALUE_COLUMN] = torch.stack([s[VALUE_COLUMN] for s in samples])
        for key, column in ((IP_EMBEDS, IP_COLUMN), (LORA_ENCODER_COLUMN, LORA_ENCODER_COLUMN)):
            present = sum(key in s for s in samples)
            if present and present < len(samples):
                raise ConfigError(
                    f"a batch mixes {present} rows with {column} and {len(samples) - present} without; give every "
                    "row its own (or none), or train with --batch_size 1"
                )
        if IP_EMBEDS in samples[0]:
            counts = [s[IP_EMBEDS].shape[0] for s in samples]
            if len(set(counts)) > 1:
                raise ConfigError(
                    f"the rows of a batch have {counts} {IP_COLUMN}; rows with different picture counts cannot share "
                    "a batch: train with --batch_size 1"
                )
            batch[IP_EMBEDS] = torch.stack([s[IP_EMBEDS] for s in samples])
        if LORA_ENCODER_COLUMN in samples[0]:
            loras = [json.loads(bytes(s[LORA_ENCODER_COLUMN].tolist()).decode("utf-8")) for s in samples]
            if len({len(paths) for paths in loras}) > 1:
                raise ConfigError(
                    f"the rows of a batch have {[len(p) for p in loras]} LoRA files in {LORA_ENCODER_COLUMN}; rows "
                    "with different counts cannot share a batch: train with --batch_size 1"
                )
            batch[LORA_ENCODER_COLUMN] = loras  # each row's LoRA paths: read in `velocity`
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
            identity = self._identity_inputs(batch, trained=False)  # checked first: the faces name what is missing
            dit, controls = self._controls(dit, batch)
            controls = self._with_identity(controls, identity)
        prompt = FluxPromptEmbeds(batch["t5"], batch["pooled"])
        prompt = self._with_value_tokens(prompt, batch, model["value_controller"])
        prompt = self._with_lora_tokens(prompt, batch, model["lora_encoder"])
        ip_adapter = self._ip_keys(batch, model["ipadapter"])
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
        self._check_condition(dit, condition)

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
        tokens, mode, embeds, guidance = self._identity_inputs(batch, trained=True)
        return infiniteyou(embeds, tokens, mode, guidance, call)

    def _identity_inputs(self, batch: Mapping[str, Any], trained: bool) -> tuple:
        """The batch's InfuseNet condition tokens, mode, face embeddings `[B, N, 512]` and guidance (one number), checked
        against the loaded projector; None for a batch without faces, which training InfuseNet refuses."""
        embeds = batch.get(IY_EMBEDS)
        if embeds is None:
            if trained:
                raise ConfigError(
                    f"training InfuseNet needs batches with {IY_IMAGE_COLUMNS[0]} (or {IY_EMBEDDING_COLUMNS[1]}); a "
                    "cache encoded without them has none: encode it again"
                )
            return None
        projector = self.pipe.infiniteyou_projector
        if projector is None:
            raise ConfigError(
                f"this batch has {IY_IMAGE_COLUMNS[0]}, but InfiniteYou's id projector is not loaded: {IY_HINT}; or "
                "encode the cache again without them"
            )
        if embeds.shape[-1] != projector.config.embedding_dim:
            raise ConfigError(
                f"this batch's face embeddings are {embeds.shape[-1]} wide, and InfiniteYou's projector takes "
                f"{projector.config.embedding_dim}: encode the cache again"
            )
        tokens, mode = batch.get("controlnet"), batch.get("controlnet_mode")
        width = self.controlnet_config.cond_in_channels if self.controlnet_config is not None else None
        if tokens is None or tokens.shape[-1] != width:
            raise ConfigError(
                f"this batch's InfuseNet condition ({'none' if tokens is None else tokens.shape[-1]} features) was not "
                f"encoded for this InfuseNet ({width}): encode the cache again"
            )
        guidances = batch[IY_GUIDANCE].reshape(-1).tolist()
        if len(set(guidances)) > 1:
            raise ConfigError(f"this batch's rows have {IY_GUIDANCE_COLUMNS[0]} {guidances}: one per batch")
        return tokens, None if mode is None else mode.reshape(-1), embeds, guidances[0]

    def _with_identity(self, controls: list[ControlCondition], inputs: tuple | None) -> list[ControlCondition]:
        """The frozen InfuseNet's condition with the batch's id tokens (of `_identity_inputs`) as its text and its
        guidance, as the pipeline's positive branch runs it; unchanged for a batch without faces."""
        if inputs is None:
            return controls
        projector = self.pipe.infiniteyou_projector
        embeds, guidance = inputs[2], inputs[3]
        with torch.no_grad():
            identity = projector(embeds.to(self.pipe.device, module_dtype(projector))).float()
        return [replace(control, text=identity, guidance=guidance) for control in controls]

    def _ip_keys(self, batch: Mapping[str, Any], adapter: nn.Module | None) -> IPAdapterKV | None:
        """Each row's IP-Adapter keys/values at scale 1, from the trained `adapter` (with gradients) or the
        pipeline's frozen one, as `prepare_ip_adapter` makes them of the row's image vectors; rows side by side
        on the batch axis. None for a batch without reference pictures."""
        embeds = batch.get(IP_EMBEDS)
        if embeds is None:
            if adapter is not None:
                raise ConfigError(
                    f"training the IP-Adapter needs batches with {IP_COLUMN}; a cache encoded without them has none: "
                    "encode it again"
                )
            return None
        frozen = adapter is None
        adapter = self.pipe.ipadapter if frozen else adapter
        if adapter is None:
            raise ConfigError(
                f"this batch has {IP_COLUMN}, but no IP-Adapter is loaded: {IP_ADAPTER_HINT}; or encode the cache "
                "again without them"
            )
        config = getattr(adapter, "module", adapter).config  # DDP wraps a trained adapter
        if embeds.shape[-1] != config.image_embed_dim:
            raise ConfigError(
                f"this batch's {IP_COLUMN} were encoded into {embeds.shape[-1]}-wide vectors, and the IP-Adapter "
                f"takes {config.image_embed_dim}: the cache was encoded with another image encoder; encode it again"
            )
        heads = self.pipe.dit.config.num_heads
        with torch.no_grad() if frozen else contextlib.nullcontext():
            rows = [adapter(row, heads, 1.0) for row in embeds]
        if len(rows) == 1:
            return rows[0]

        def stack(layers):
            return [
                tuple(torch.cat(parts) for parts in zip(*pairs, strict=True)) for pairs in zip(*layers, strict=True)
            ]

        first = rows[0]
        return IPAdapterKV(
            stack([r.double for r in rows]), stack([r.single for r in rows]), first.scale, first.after_mlp
        )

    def _with_lora_tokens(
        self, prompt: FluxPromptEmbeds, batch: Mapping[str, Any], encoder: nn.Module | None
    ) -> FluxPromptEmbeds:
        """The prompt with one LoRA Encoder token per LoRA of each row appended, as the pipeline's
        `prepare_lora_encoding` appends them (scale 1): from the trained `encoder` (with gradients) or the
        pipeline's frozen one; unchanged for a batch without LoRA files."""
        loras = batch.get(LORA_ENCODER_COLUMN)
        if loras is None:
            if encoder is not None:
                raise ConfigError(
                    f"training the LoRA Encoder needs batches with {LORA_ENCODER_COLUMN} (a column of the metadata); "
                    "a cache encoded without them has none: encode it again"
                )
            return prompt
        frozen = encoder is None
        encoder = self.pipe.lora_encoder if frozen else encoder
        if encoder is None:
            raise ConfigError(
                f"this batch has {LORA_ENCODER_COLUMN}, but no LoRA Encoder is loaded: {LORA_ENCODER_HINT}; or "
                "encode the cache again without them"
            )
        with torch.no_grad() if frozen else contextlib.nullcontext():
            tokens = torch.cat(
                [torch.cat([encoder(self._read_lora(path)) for path in paths], dim=1) for paths in loras]
            )
        tokens = tokens.float().to(prompt.t5.device, prompt.t5.dtype)
        return FluxPromptEmbeds(torch.cat([prompt.t5, tokens], dim=1), prompt.pooled)

    def _read_lora(self, path: str):
        """A LoRA file read onto the DiT's layers as the pipeline reads it for the encoder (`read_lora`), against a
        meta-device DiT of the same config (a DiT LoRA in training wraps the Linears the reader looks for); the
        last `LORA_CACHE` files read are kept."""
        lora = self._loras.pop(path, None)
        if lora is None:
            if self.pipe.dit is None:
                raise ConfigError(f"{LORA_ENCODER_COLUMN}: reading {path} needs the DiT loaded")
            if not os.path.isfile(path):
                raise ConfigError(
                    f"{LORA_ENCODER_COLUMN}: the LoRA file {path} (as the cache was encoded) is gone; put it back or "
                    "encode the cache again"
                )
            if self._lora_layout is None:
                with torch.device("meta"):
                    self._lora_layout = type(self.pipe.dit)(self.pipe.dit.config)
            with self.pipe.using("dit", self._lora_layout):
                lora = self.pipe.read_lora(path, "dit")
        self._loras[path] = lora
        while len(self._loras) > LORA_CACHE:
            self._loras.pop(next(iter(self._loras)))
        return lora

    def _with_value_tokens(
        self, prompt: FluxPromptEmbeds, batch: Mapping[str, Any], encoder: nn.Module | None
    ) -> FluxPromptEmbeds:
        """The prompt with each row's AttriCtrl tokens appended, as `prepare_value_control` appends them: from the
        trained `encoder` (with gradients) or the pipeline's frozen encoders; unchanged for a batch without values."""
        values = batch.get(VALUE_COLUMN)
        if values is None:
            if encoder is not None:
                raise ConfigError(
                    f"training the AttriCtrl encoder needs batches with {VALUE_COLUMN} (a column of the metadata); "
                    "a cache encoded without them has none: encode it again"
                )
            return prompt
        controllers = self.pipe.value_controller
        count = 1 if encoder is not None else len(controllers.encoders) if controllers is not None else 0
        if values.shape[-1] != count:
            raise ConfigError(
                f"this batch has {values.shape[-1]} {VALUE_COLUMN} per row, for {count} loaded AttriCtrl encoders: "
                + (VALUE_ENCODER_HINT if not count else "encode the cache again for these encoders")
            )
        if encoder is not None:
            tokens = torch.stack([encoder(value) for value in values[:, 0]])
        else:
            tokens = torch.cat([controllers(row.tolist()) for row in values])
        tokens = tokens.float().to(prompt.t5.device, prompt.t5.dtype)
        return FluxPromptEmbeds(torch.cat([prompt.t5, tokens], dim=1), prompt.pooled)

    def _controls(self, model: nn.Module, batch: Mapping[str, Any]) -> tuple[nn.Module, list[ControlCondition]]:
        """The DiT to run and the batch's ControlNet condition (none for a batch without controlnet_image)."""
        tokens = batch.get("controlnet")
        if self.trained_model != "controlnet":
            if tokens is None:
                return model, []
            net = self.pipe.controlnet.nets[0] if self.pipe.controlnet is not None else None
            if net is None:
                raise ConfigError(
                    "this batch has a ControlNet condition (controlnet_image), but no FLUX.1 ControlNet is loaded: "
                    f"{CONTROLNET_HINT}; or encode the cache again without it"
                )
            dit = model
        else:
            if tokens is None:
                raise ConfigError(
                    "training the ControlNet needs batches with controlnet_image (list it in --data_file_keys, e.g. "
                    "image,controlnet_image); a cache encoded without the ControlNet has none: encode it again"
                )
            net, dit = model, self.pipe.dit
            dit.gradient_checkpointing = bool(getattr(getattr(net, "module", net), "gradient_checkpointing", False))
        config = getattr(net, "module", net).config  # DDP wraps a trained net
        mode = batch.get("controlnet_mode")
        if tokens.shape[-1] != config.cond_in_channels or (mode is None) != (config.num_modes is None):
            raise ConfigError(
                f"this batch's ControlNet condition ({tokens.shape[-1]} features, "
                f"{'no mode' if mode is None else 'a mode'}) was encoded for another net than this one "
                f"({config.cond_in_channels}, {'a Union net' if config.num_modes else 'no modes'}): encode it again"
            )
        return dit, [ControlCondition(net, tokens, None if mode is None else mode.reshape(-1))]

    def inference_sigmas(self, latent_shape: Sequence[int], num_inference_steps: int) -> torch.Tensor:
        """FLUX.1's sampling schedule for this image size (BFL's shift by its H/16 * W/16 tokens, what the
        pipeline uses): what `--task direct_distill` steps along. The DiT call keeps the task's
        `embedded_guidance` (1; give `--task_options embedded_guidance=3.5` to distill FLUX.1-dev as it samples)."""
        scheduler = FlowMatchScheduler("flux1")
        scheduler.set_timesteps(num_inference_steps, image_seq_len=(latent_shape[-2] // 2) * (latent_shape[-1] // 2))
        return scheduler.sigmas

    def _check_condition(self, dit: nn.Module, condition: torch.Tensor | None) -> None:
        """The batch's condition is the one the DiT (as trained: a fused control LoRA widens it) takes."""
        config = getattr(getattr(dit, "module", dit), "config", None)  # DDP wraps the DiT
        config = config if config is not None and hasattr(config, "in_channels") else self.pipe.dit.config
        extra = config.in_channels - config.out_channels
        width = 0 if condition is None else condition.shape[-1]
        if width == extra:
            return
        kind = condition_kind(config)
        if condition is None:
            raise ConfigError(
                f"this is {describe_widths(config)}: its batches need {' + '.join(CHANNEL_COLUMNS.get(kind, ()))} "
                "(a cache encoded for another model has none; encode it again)"
            )
        given = CONDITION_WIDTHS.get(width)
        columns = " + ".join(CHANNEL_COLUMNS[given]) if given else f"a {width}-wide condition"
        hint = (
            "; to train on FLUX.1-dev with a Canny / Depth control LoRA, give it as --preset_lora_path"
            if given == CONTROL and kind is None
            else ""
        )
        raise ConfigError(f"the batch has {columns}, which {describe_widths(config)} does not take{hint}")


def _has(row: Mapping[str, Any], column: str) -> bool:
    value = row.get(column)
    return value is not None and not (isinstance(value, (str, list, tuple)) and not value)


def _row_picture(index: int, row: Mapping[str, Any], column: str):
    """A row's condition picture as PIL: the dataset's tensor [3, H, W] in [-1, 1] back to 8 bits (lossless for
    8-bit files), or a PIL image as given; a path means the column was not read as a file."""
    value = row[column]
    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]
    return _picture(index, value, column, column)


def _picture(index: int, value: Any, what: str, column: str):
    """One picture of a row (`what`: its name in errors, e.g. "eligen_entity_masks[1]") as PIL (see `_row_picture`)."""
    if isinstance(value, (str, os.PathLike)):
        raise ConfigError(
            f"row {index}: {what} is the path {str(value)!r}, not a loaded image; add {column} to --data_file_keys "
            "(it is read at the row's size, aligned with its image)"
        )
    if isinstance(value, torch.Tensor):
        if value.dim() != 3 or value.shape[0] not in (1, 3):
            raise ConfigError(f"row {index}: {what} must be one image [3, H, W], got {tuple(value.shape)}")
        return tensor_to_pil(value.expand(3, -1, -1))[0]
    if isinstance(value, Image.Image):
        return value
    raise ConfigError(f"row {index}: {what} must be one image (a [3, H, W] tensor or PIL image), got {preview(value)}")


def _redux_scale(value: Any, where: str) -> float | list[float]:
    """A row's Redux scale as the pipeline takes it: 1 when absent; a number, a CSV cell's text ("0.8", or
    "0.8,0.5" for several images) or a list, one per image."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return 1.0
    if not isinstance(value, str):
        return value  # the pipeline's `check_scales` says what it takes
    try:
        parsed = [float(item) for item in value.strip().strip("[]").replace(",", " ").split()]
    except ValueError:
        raise ConfigError(f"{where} {value!r} is not a number (or a list of numbers, one per image)") from None
    return parsed[0] if len(parsed) == 1 else parsed


def _redux_sources(model_configs: Sequence[ModelConfig]) -> tuple[tuple | None, list[ModelConfig]]:
    """The Redux embedder and the SigLIP image encoder listed with it (`(redux, encoder or None)`, None without a
    Redux embedder), and the other model configs, which load as the other slots do."""
    from .flux1.ip_adapter import source_part
    from .flux1.redux import is_redux_file

    redux = [is_redux_file(weight_paths(config)) for config in model_configs]
    found = [config for config, is_redux in zip(model_configs, redux, strict=True) if is_redux]
    if not found:
        return None, list(model_configs)
    rest = [config for config, is_redux in zip(model_configs, redux, strict=True) if not is_redux]
    if len(found) > 1:
        raise ConfigError(f"the model files hold {len(found)} FLUX.1 Redux embedders ({found}); give one")
    encoder = [source_part(weight_paths(config)) == "image_encoder" for config in rest]
    encoders = [config for config, is_encoder in zip(rest, encoder, strict=True) if is_encoder]
    if len(encoders) > 1:
        raise ConfigError(
            f"the model files hold {len(encoders)} image encoders for FLUX.1 Redux ({encoders}); give one"
        )
    return (found[0], encoders[0] if encoders else None), [c for c, e in zip(rest, encoder, strict=True) if not e]


def _ip_adapter_sources(model_configs: Sequence[ModelConfig]) -> tuple[tuple | None, list[ModelConfig]]:
    """The IP-Adapter file and the image encoder listed with it (`(adapter, encoder or None)`, None without an
    adapter), and the configs other than the adapter (the encoder stays among them: Redux may share it)."""
    from .flux1.ip_adapter import source_part

    parts = [source_part(weight_paths(config)) for config in model_configs]
    adapters = [config for config, part in zip(model_configs, parts, strict=True) if part == "adapter"]
    if not adapters:
        return None, list(model_configs)
    if len(adapters) > 1:
        raise ConfigError(f"the model files hold {len(adapters)} IP-Adapters ({adapters}); give one")
    encoders = [config for config, part in zip(model_configs, parts, strict=True) if part == "image_encoder"]
    if len(encoders) > 1:
        raise ConfigError(f"the model files hold {len(encoders)} image encoders ({encoders}); give the adapter's one")
    rest = [config for config, part in zip(model_configs, parts, strict=True) if part != "adapter"]
    return (adapters[0], encoders[0] if encoders else None), rest


def _load_ip_adapter(
    pipe: FluxImagePipeline, adapter: ModelConfig, encoder: ModelConfig | None, *, encoders: bool, denoiser: bool
) -> None:
    """The IP-Adapter's parts a stage needs, frozen: the image encoder for encoding, the adapter for the model
    call; both through the pipeline's `load_ip_adapter` when a stage loads both."""
    from .flux1.ip_adapter import check_fits, load_image_encoder, load_ip_adapter_model

    if encoders and encoder is None:
        raise ConfigError(
            f"the IP-Adapter {adapter} needs its image encoder among the models to encode ipadapter_images: "
            f"{IP_ADAPTER_HINT}"
        )
    if encoders and denoiser:
        pipe.load_ip_adapter(adapter, image_encoder=encoder)
        return
    if denoiser:
        model = load_ip_adapter_model(weight_paths(adapter), pipe.torch_dtype, double_blocks=pipe.dit.config.depth)
        check_fits(model, pipe.dit)
        pipe.ipadapter = model.eval().requires_grad_(False).to(pipe.device)
        pipe.model_configs["ipadapter"] = adapter
    if encoders:
        tower = load_image_encoder(weight_paths(encoder), pipe.torch_dtype)
        pipe.ipadapter_image_encoder = tower.eval().requires_grad_(False).to(pipe.device)
        pipe.model_configs["ipadapter_image_encoder"] = encoder


def _row_entities(index: int, row: Mapping[str, Any]) -> tuple[list[str], list[Image.Image]] | None:
    """A row's EliGen entity prompts and masks (RGB pictures at the row's size) as the pipeline checks them, or None
    for a row without any; one column without the other, or counts that differ, are errors naming the row."""
    given = [_has(row, column) for column in ELIGEN_COLUMNS]
    if not any(given):
        return None
    where = f"row {index} of the batch (prompt {str(row['prompt'])[:60]!r})"
    if not all(given):
        have, lack = ELIGEN_COLUMNS if given[0] else ELIGEN_COLUMNS[::-1]
        raise ConfigError(
            f"{where} has {have} but no {lack}: EliGen trains on one mask (white = the entity's region) per entity "
            "prompt (the masks listed in --data_file_keys, e.g. --data_file_keys image,eligen_entity_masks)"
        )
    prompts, masks = (row[column] for column in ELIGEN_COLUMNS)
    prompts = [prompts] if isinstance(prompts, str) else prompts
    masks = list(masks) if isinstance(masks, (list, tuple)) else [masks]
    if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
        raise ConfigError(f"{where}: eligen_entity_prompts must be a list of strings, got {preview(prompts)}")
    if len(prompts) != len(masks):
        raise ConfigError(
            f"{where} has {len(prompts)} eligen_entity_prompts and {len(masks)} eligen_entity_masks; give one mask "
            "per entity prompt, in the same order"
        )
    pictures = [_picture(index, m, f"eligen_entity_masks[{k}]", "eligen_entity_masks") for k, m in enumerate(masks)]
    return check_entity_inputs(list(prompts), pictures)


def _parse_values(value: Any, count: int, where: str) -> list[float]:
    """AttriCtrl values as the pipeline takes them (`check_values`): a number, a CSV cell's text ("0.3", or
    "0.3,0.8" / "[0.3, 0.8]" for several encoders) or a list, one per encoder in load order, each in [0, 1]."""
    from .flux1.value_control import check_values

    items = value if isinstance(value, (list, tuple)) else [value]
    if isinstance(value, str):
        items = value.strip().strip("[]").replace(",", " ").split()
    try:
        items = [float(item) if isinstance(item, str) else item for item in items]
    except ValueError:
        raise ConfigError(
            f"{where} {value!r} is not a number in [0, 1] (or a list of them, one per AttriCtrl encoder)"
        ) from None
    if count == 0:
        raise ConfigError(f"{where} needs an AttriCtrl encoder among the models: {VALUE_ENCODER_HINT}")
    try:
        return check_values(items, count)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _takes_mask(config: Flux1ControlNetConfig) -> bool:
    """Whether a ControlNet's condition carries the packed inpainting mask (alimama's: `Flux1ControlNet.takes_mask`)."""
    return config.cond_in_channels == config.in_channels + 4


def _union_mode(config: Flux1ControlNetConfig, value: Any, where: str) -> str | int | None:
    """`value` as the pipeline's `processor_id` for a Union net: a mode name (DiffSynth-Studio's, `UNION_MODES`) or an
    index (a CSV cell's digits too); None for other nets, which have no modes."""
    n = config.num_modes
    if not n:
        return None
    names = [name for name, index in UNION_MODES.items() if index < n]
    if isinstance(value, str):
        value = int(value) if value.strip().isdigit() else value.strip().lower()
    if isinstance(value, str) and value in names:
        return value
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < n:
        return value
    given = "is missing" if value is None or value == "" else f"{value!r} is not one of its modes"
    raise ConfigError(
        f"{where} {given}: this Union ControlNet ({n} modes) needs its control mode, one of {', '.join(names)} "
        f"(DiffSynth-Studio's names) or an index in [0, {n})"
    )


def _dit_config(model_configs: Sequence[ModelConfig]):
    """The FLUX.1 DiT's config from its files' header (and the `config.json` beside them), without reading weights;
    None when no given file holds the DiT."""
    configs = _header_configs(model_configs, "dit")
    return configs[0] if configs else None


def _header_configs(model_configs: Sequence[ModelConfig], slot: str) -> list:
    """The configs of the models for the pipeline's `slot` among the files, from their headers (and the
    `config.json` beside them), without reading weights: one per file set holding such a model."""
    from diffsynth.runtime.checkpoint import checkpoint_label, open_checkpoint
    from diffsynth.runtime.loading import config_json_beside, derive_config, recognise

    role = FluxImagePipeline.model_slots[slot]
    found = []
    for config in model_configs:
        if role not in model_roles(config):
            continue
        paths = [p for p in config.resolve() if p.endswith(WEIGHT_SUFFIXES) or Path(p).is_dir()]
        state = open_checkpoint(paths)
        label = checkpoint_label(state.files)
        meta = state.meta_state_dict()
        for rec in recognise(meta, label=label):
            if rec.spec.role == role:
                found.append(derive_config(rec, meta, config_json_beside(state.files), label))
                break
    return found


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


# ------------------------------------------------------------------ InfiniteYou
class InfiniteYouInTraining(nn.Module):
    """InfuseNet and InfiniteYou's id projector as the trainer trains them (`--trainable_models
    controlnet,image_proj_model`: its `trainable_parts`, DiffSynth-Studio's names). The projector's tokens are
    InfuseNet's text, so both act in one model call; this module's forward is that whole call over the frozen DiT of
    `pipe`, so a DDP-wrapped model sees both. Its children are the pipeline's own InfuseNet and projector, so what the
    trainer changes is what the pipeline runs; `gradient_checkpointing` is handed to InfuseNet and the DiT."""

    trainable_parts: ClassVar[dict[str, tuple[str, ...]]] = {
        "controlnet": ("controlnet",),
        "image_proj_model": ("image_proj_model",),
    }

    def __init__(self, controlnet: Flux1ControlNet, projector: nn.Module, pipe: FluxImagePipeline):
        super().__init__()
        self.controlnet = controlnet
        self.image_proj_model = projector
        self.gradient_checkpointing = False
        self._frozen = (pipe,)  # not a submodule: the DiT is not trained here

    def forward(
        self,
        embeddings: torch.Tensor,
        tokens: torch.Tensor,
        mode: torch.Tensor | None,
        guidance: float,
        call: Callable[[list[ControlCondition]], torch.Tensor],
    ) -> torch.Tensor:
        """`call` (the task's `flux_velocity` over the frozen DiT) with InfuseNet steered by the id tokens the
        projector makes of `embeddings` `[B, N, 512]` (its text at position 0) and `guidance`, as the pipeline's
        positive branch runs it."""
        (pipe,) = self._frozen
        pipe.dit.gradient_checkpointing = self.controlnet.gradient_checkpointing = self.gradient_checkpointing
        identity = self.image_proj_model(embeddings.to(module_dtype(self.image_proj_model))).float()
        return call([ControlCondition(self.controlnet, tokens, mode, text=identity, guidance=guidance)])


def export_infiniteyou_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`InfiniteYouInTraining`'s weights in the released keys, each under its part's name: InfuseNet's in diffusers'
    `FluxControlNetModel` names (`controlnet.`), the projector's in the authors' `image_proj_model.bin` names
    (`image_proj_model.`)."""
    from .flux1.controlnet_formats import ours_to_diffusers

    parts: dict[str, dict[str, torch.Tensor]] = {name: {} for name in InfiniteYouInTraining.trainable_parts}
    for key, value in state.items():
        name, _, rest = key.partition(".")
        if name not in parts:
            raise ConfigError(f"InfiniteYou's trained weights hold {key!r}, of neither InfuseNet nor the id projector")
        parts[name][rest] = value
    exported = {f"controlnet.{k}": v for k, v in ours_to_diffusers(parts["controlnet"]).items()}
    return exported | {f"image_proj_model.{k}": v for k, v in parts["image_proj_model"].items()}


def split_infiniteyou_weights(path: str | os.PathLike, folder: str | os.PathLike) -> tuple[Path, Path]:
    """The trainer's `<step>/infiniteyou/diffusion_pytorch_model.safetensors` written as InfiniteYou's released
    layout in `folder`: `InfuseNetModel/diffusion_pytorch_model.safetensors` (with the `config.json` found beside
    `path`) and `image_proj_model.safetensors`, which `FluxImagePipeline` loads (`load_controlnet`,
    `load_infiniteyou`, or both as `model_configs`). Returns (InfuseNet folder, projector file)."""
    import shutil

    from safetensors.torch import load_file, save_file

    path, folder = Path(path), Path(folder)
    state = load_file(str(path))
    parts: dict[str, dict[str, torch.Tensor]] = {"controlnet": {}, "image_proj_model": {}}
    for key, value in state.items():
        name, _, rest = key.partition(".")
        if name not in parts:
            raise ConfigError(
                f"{path} holds {key!r}: not InfiniteYou's trained weights (keys under controlnet. and "
                "image_proj_model.)"
            )
        parts[name][rest] = value
    empty = [name for name, part in parts.items() if not part]
    if empty:
        raise ConfigError(f"{path} holds no {' and no '.join(empty)} weights: not InfiniteYou's trained weights")
    net = folder / "InfuseNetModel"
    net.mkdir(parents=True, exist_ok=True)
    save_file(parts["controlnet"], str(net / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    if (path.parent / "config.json").is_file():
        shutil.copyfile(path.parent / "config.json", net / "config.json")
    projector = folder / "image_proj_model.safetensors"
    save_file(parts["image_proj_model"], str(projector), metadata={"format": "pt"})
    return net, projector


def _infiniteyou_sources(model_configs: Sequence[ModelConfig]) -> tuple[ModelConfig | None, list[ModelConfig]]:
    """InfiniteYou's id projector among the model configs (None without one; its `.bin` is no registered model,
    so it is taken out before the others are recognised), and the other configs."""
    from .flux1.infiniteyou import is_projector_file

    found = [is_projector_file(weight_paths(config)) for config in model_configs]
    projectors = [config for config, is_projector in zip(model_configs, found, strict=True) if is_projector]
    if len(projectors) > 1:
        raise ConfigError(f"the model files hold {len(projectors)} InfiniteYou id projectors ({projectors}); give one")
    rest = [config for config, is_projector in zip(model_configs, found, strict=True) if not is_projector]
    return (projectors[0] if projectors else None), rest


def _identity_given(row: Mapping[str, Any]) -> bool:
    return any(_has(row, c) for c in (*IY_IMAGE_COLUMNS, *IY_EMBEDDING_COLUMNS, *IY_GUIDANCE_COLUMNS))


def _one_spelling(row: Mapping[str, Any], columns: tuple[str, str], where: str) -> str | None:
    """The one of DiffSynth-Studio's `infinityou_*` and our `infiniteyou_*` columns a row gives (None: neither)."""
    given = [column for column in columns if _has(row, column)]
    if len(given) > 1:
        raise ConfigError(f"{where} has {given[0]} and {given[1]}: the same input twice; give one")
    return given[0] if given else None


def _read_embedding(value: Any, where: str) -> torch.Tensor:
    """A row's ArcFace embedding: a tensor (or array), or a file holding one: `.safetensors` (one tensor), `.npy`,
    `.pt` / `.pth` (a tensor), absolute or relative to the working directory."""
    import numpy as np

    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if isinstance(value, torch.Tensor):
        return value
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        raise ConfigError(f"{where} must be a tensor or a .safetensors / .npy / .pt file, got {preview(value)}")
    path = Path(str(value).strip())
    if not path.is_file():
        raise ConfigError(
            f"{where} {str(value)!r} is no file (relative paths are taken from the working directory {os.getcwd()}; "
            "give absolute paths)"
        )
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(path))
            if len(tensors) != 1:
                raise ConfigError(f"{where} {path} holds {len(tensors)} tensors ({preview(sorted(tensors))}); give one")
            return next(iter(tensors.values()))
        if suffix == ".npy":
            return torch.from_numpy(np.load(path, allow_pickle=False))
        if suffix in (".pt", ".pth"):
            loaded = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(loaded, torch.Tensor):
                raise ConfigError(f"{where} {path} holds a {type(loaded).__name__}, not one tensor")
            return loaded
    except (OSError, ValueError, RuntimeError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"{where} {path} cannot be read ({reason})") from None
    raise ConfigError(f"{where} {path}: use a .safetensors, .npy or .pt file of the [512] ArcFace embedding")


def _iy_guidance(value: Any, where: str) -> float:
    """InfuseNet's guidance of a row: 1 when absent (the pipeline's default); a number or a CSV cell's text."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return 1.0
    try:
        guidance = float(value) if isinstance(value, str) and not isinstance(value, bool) else value
    except ValueError:
        raise ConfigError(f"{where} {value!r} is not a number (InfuseNet's guidance, 1 by default)") from None
    if isinstance(guidance, torch.Tensor) and guidance.numel() == 1:
        guidance = guidance.item()
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance):
        raise ConfigError(f"{where} {value!r} is not a number (InfuseNet's guidance, 1 by default)")
    return float(guidance)


__all__ = ["FluxTrainingTask", "InfiniteYouInTraining", "export_infiniteyou_state", "split_infiniteyou_weights"]
