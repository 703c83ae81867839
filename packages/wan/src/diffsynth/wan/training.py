"""Wan's training task, for the DiffSynth trainer (`diffsynth-train`, package diffsynth-training).

It implements the trainer's `TrainingTask` protocol structurally (this package does not depend on the
trainer): class attributes `family`, `denoiser_slot`, `size_multiple`, `media`; a `scheduler`; `models`,
`model_files` and `sample` (the runtime's `PipelineTrainingTask`; I2V / TI2V validation samples take their
first (and last) frame as `input_image` / `end_image`); `from_pretrained(model_configs, *,
tokenizer_config, torch_dtype, device, encoders, denoiser)`; `encode(rows)`, `collate(samples)`,
`velocity(dit, batch, noisy_latents, sigma)` and the optional `loss_mask(batch)`.

A row is `{"prompt": str, "video": [3, F, H, W] in [-1, 1]}` (F = 1 + 4k, see `--num_frames`) or
`{"prompt": str, "image": [3, H, W]}`, which trains as a one-frame video; image-conditioned DiTs also read
`"input_image"` / `"end_image"` `[3, H, W]` when the row has them (list them in `--data_file_keys`). Every
row is encoded as the pipeline encodes: the prompt through `WanVideoPipeline.encode_prompt` (umT5,
zero-padded to `max_sequence_length` tokens) and the video through the causal VAE (posterior mode,
normalised latents), giving `{"latents": [z, 1 + (F - 1) / 4, H / 8, W / 8], "text": [L, D]}`, plus what
the DiT's `model_type` asks for, built by the pipeline's own stages at the video's size and frame count:

- "t2v" (Wan 2.1 T2V, a Wan 2.2 T2V A14B expert): nothing more;
- "i2v" (Wan 2.1 I2V / FLF2V, a Wan 2.2 I2V A14B expert): `"y"` `[4 + z, T, h, w]` (`encode_frames`: the
  mask of given frames and the latent of the video holding them) and, for the Wan 2.1 models with CLIP
  input, `"clip_feature"` `[257 or 514, 1280]` (`encode_clip`). The given frames are the row's
  `input_image` (else the video's first frame) and, for FLF2V (a DiT with CLIP positions for two images)
  or a row with an `end_image`, its `end_image` (else the video's last frame), as DiffSynth-Studio's
  `--extra_inputs input_image,end_image` take them from the video;
- "ti2v" (Wan2.2-TI2V-5B, one model for text- and image-to-video): by default nothing more, text-to-video, as
  DiffSynth-Studio trains it without `--extra_inputs input_image` (a row's `input_image` is then ignored, with a
  warning). With the task option `first_frame=true` (image-to-video; a probability in [0, 1] draws it per batch,
  `draw_choices`): `"first_latent"` `[z, 1, h, w]` (`encode_first_latent` of the `input_image`, else of the first
  frame). The model sees it in place of the first noisy latent frame, with timestep 0 on that frame's tokens
  (`timestep_input`), and `loss_mask` leaves that frame out of the loss, as the pipeline keeps the frame fixed
  while it denoises the rest. One-frame rows train as text-to-image.

A VACE DiT (Wan2.1-VACE) also reads a row's `vace_video` (`[3, F, H, W]`, the control video),
`vace_video_mask` (`[3, F, H, W]`, white = generate) and `vace_reference_image` (`[3, H, W]`, or a list),
as DiffSynth-Studio's `--extra_inputs vace_video,vace_reference_image` do (list the files in
`--data_file_keys`): `"vace_context"` is built by the pipeline's `prepare_vace`, and the latents of the
reference images lead the video's latents, as the pipeline denoises them. Rows without them train the
DiT as text-to-video. `--lora_base_model vace` / `--trainable_models vace` train the control branch alone
(the DiT's `trainable_parts`).

A Wan Fun Control DiT (Wan2.1-Fun-V1.1-*-Control, Wan2.2-Fun-A14B-Control) trains on a row's `control_video`
(`[3, F, H, W]`) and optional `reference_image` / `input_image`, as DiffSynth-Studio's
`--extra_inputs control_video,reference_image`: the conditions are the pipeline's (see `fun_control.py`).

Speed control (DiffSynth-Studio's `Wan2.1-1.3b-speedcontrol-v1`, beside Wan2.1-T2V-1.3B): with the speed-control
model among the model files, every row needs a `motion_bucket_id` number (0 slow ... 100 fast), and the model call
adds the controller's offset to the DiT's modulation as the pipeline does. Training the DiT (LoRA or full) keeps the
controller frozen; `trained_model="motion_controller"` (what `--trainable_models motion_controller` asks the
trainer for: the controller is one of the task's `trainable_slots`) trains the controller alone under the frozen DiT: the trainer's model is then
the controller, saved as `<step>/motion_controller/diffusion_pytorch_model.safetensors`, which the pipeline
recognises from its keys like DiffSynth-Studio's `model.safetensors`. Validation samples of a DiT in training follow
the controller too, at `validation_motion_bucket_id` (a task option; default: the dataset's first row's
`motion_bucket_id`, read by `prepare_dataset`).

Video-As-Prompt (ByteDance/Video-As-Prompt-Wan2.1-14B: its `transformer/` files hold the Wan2.1 I2V 14B DiT and the
MoT expert, which load into `dit` and `vap`): with the expert among the model files, every row gives `vap_video`
(the reference video, a file listed in `--data_file_keys`, read at the row's size as DiffSynth-Studio's dataset reads
it), optional `vap_prompt` (its caption; default "", the text DiffSynth-Studio trains with) and `input_image` (else
the video's first frame), as DiffSynth-Studio's `--extra_inputs vap_video,input_image`. The reference inputs are the
pipeline's `encode_vap` at the video's size and frame count (`num_frames` frames spread evenly over the reference,
their VAE latent joined with the I2V conditioning of its first frame, its CLIP features, the caption's umT5 states),
cached per row as `vap_latents`, `vap_context`, `vap_clip_feature`; the model call is the pipeline's, through
`vap_forward`. A DiT LoRA (`--lora_base_model dit`) or the full DiT trains under the frozen expert; or
`trained_model="vap"` (DiffSynth-Studio's `--trainable_models vap`, or `--lora_base_model vap` for a LoRA on it; the
expert is one of the task's `trainable_slots`) trains the expert under the frozen DiT. The expert acts inside the DiT's
call (`block_hook`), not through a forward of its own, so the trainer's model is then `VapExpertInTraining`, which
holds the expert's own modules and runs the whole model call: a DDP-wrapped model sees every use of the expert. Its
full weights are saved as `<step>/vap/diffusion_pytorch_model.safetensors` in the released `*_mot_ref*` keys
(`export_state`), which the pipeline loads as its `vap` model, strictly. Validation samples are refused:
`--validation_images` cannot give a reference video.

A Wan-Dancer DiT (Wan-AI/Wan-Dancer-14B's global_model / local_model.safetensors) trains on DiffSynth-Studio's
columns: `wantodance_music_path` (an audio file as long as the video, read by the task with librosa as the pipeline
reads it: listed in --data_file_keys the dataset hands on its absolute path, as DiffSynth-Studio does; else an
absolute path or one relative to the working directory), `wantodance_keyframes` (a video, or a list of images, of the video's frames:
the keyframes, black elsewhere) with `wantodance_keyframes_mask` (one 0 / 1 a frame), an optional
`wantodance_reference_image` and `wantodance_fps` (default: the rate the clips are read at, the row's `frame_rate`:
`--video_fps`, else a `frame_rate` column or the file's; 30, the pipeline's, only without one; a `wantodance_fps` that
disagrees with `--video_fps` is refused when training starts). The conditions are the pipeline's
(`check_dancer_call`, then `dancer_conditions`) at the video's size and frame count: `clip_feature`, `y`,
`music_feature`, `refimage_feature` and the frame rate, cached per row; the model call is the pipeline's positive
`dancer_velocity` (every block; a batch takes one frame rate and one music length). This is the local model's recipe
(continuous videos); the global model's frame-by-frame one (`framewise_decoding`: one keyframe per latent frame, each
encoded alone, with a keyframe video four times as long) is refused, as are validation samples.

A Wan Fun Control-Camera DiT (Wan2.1-Fun-V1.1-*-Control-Camera) trains on a row's `camera_control_direction`
("Left", "Right", "Up", "Down", "In", "Out" or combinations such as "LeftUp"), optional `camera_control_speed`
and `camera_control_origin`, and its `input_image` (else the video's first frame): `y` and CLIP features as for
I2V, and the camera path of `camera.py`, kept as its poses `[F, 19]` and turned into the adapter's Plücker rays in
`velocity` (the rays, at pixel resolution, are too large to cache).

A Wan2.2-Animate DiT trains on a row's `animate_pose_video` and `animate_face_video` (one pose render and one face
crop per video frame: the first F are used), optional `animate_inpaint_video` with `animate_mask_video`
(replacement) and `input_image` (the character; else the video's first frame). The row's video is one segment of
the pipeline's (its `num_frames` is F + 4): the conditions are the pipeline's `animate_character` and
`animate_conditions`, and the character's latent leads the video's latents, as the pipeline denoises them. The
face crops are read at their own size (the task's `conditioning` column, not fitted to the video's) and kept as
8-bit pixels (`[3, F, 512, 512]` per row). `--trainable_models animate_adapter` trains the
four Animate modules alone (the DiT's `trainable_parts`, named as DiffSynth-Studio names its adapter).

The Wan2.2-Animate-2 DiT trains on a row's `animate2_reference_image` (the character), `animate2_reference_video`
(the driving video: its first F frames) and optional `animate2_prompt_ref` (the driving video's text, default " "),
as DiffSynth-Studio's `--extra_inputs animate2_prompt_ref,animate2_reference_image,animate2_reference_video`. The
row's video is the pipeline's first clip (no `animate2_refert_images`): `y`, the CLIP features and the driving
video's inputs (latent with its mask, text, CLIP features of its first frame) are the pipeline's `animate2_inputs`,
and the character's latent (`y`'s frame 0) leads the video's latents, as the pipeline denoises them. `velocity` runs
both streams in the DiT's one call: the driving video's pass through every block is recomputed at each step rather
than cached, so a LoRA on the self-attention projections (DiffSynth-Studio trains `self_attn.q,self_attn.k,
self_attn.v`) gets its gradient through the driving keys and values too. `animate2_log_scale` stays 0 (the base
model's, as DiffSynth-Studio trains).

The Wan2.2-S2V DiT trains on a row's sound, optional `s2v_pose_video` and `input_image` (the person; else the
video's first frame). The sound is the trainer's `audio` (an `audio` column listed in `--data_file_keys`, else the
video file's own track) at `audio_sample_rate`, or an `input_audio` waveform. The row's video is the pipeline's
clip: its first frame is the context frame, `"latents"` are those of the F - 1 frames after it, and the wav2vec2
features (`audio_clips`, at the row's `frame_rate`, else the pipeline's 16 fps), the reference latent and the pose
latent (`_pose_latents`: the pose video's first F - 1 frames) are built as the pipeline builds them.

Rows lacking a column their model needs are refused naming the row and the column, and so are columns of these
models given to a DiT that cannot use them.

Images reach the pipeline's stages as 8-bit pictures, as a user's `input_image` does (exact for frames
read from image or video files). The model call is the pipeline's per-step `predict` (S2V: `s2v_velocity`,
Animate-2: `animate2_velocity`), with the timestep `1000 * sigma`; the noise levels and loss weights come from the
"wan" flow-matching template (shift 5).

A Wan 2.2 A14B model trains one expert at a time; each expert trains only on its own noise levels: the
high-noise one on `sigma >= boundary`, the low-noise one below (0.875 for T2V, 0.9 for I2V: the presets'
`switch_DiT_boundary`, where the pipeline hands over). The expert is read from the DiT's folder
(`high_noise_model/`, `low_noise_model/`), as the pipeline reads it, or given as `expert="high"|"low"`. A DiT LoRA
records its expert in its header (`diffsynth_wan_expert`: `lora_metadata`), so the pipeline's `load_lora` applies a
low-noise expert's LoRA to `dit2` unless told another slot.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.media import tensor_to_pil
from diffsynth.runtime.pipeline import weight_paths
from diffsynth.runtime.schedulers import FlowMatchScheduler, make_scheduler
from diffsynth.runtime.training_support import PipelineTrainingTask, load_partial_pipeline, model_roles, row_video
from diffsynth.runtime.vram import module_dtype

from .animate import AnimateInputs
from .animate2 import (
    Animate2Conditions,
    Animate2Config,
    ReferenceInputs,
    animate2_inputs,
    animate2_velocity,
    check_animate2_channels,
)
from .audio_encoder import audio_clips, prepare_waveform
from .camera import DEFAULT_SPEED, camera_path, check_direction, check_origin, pack_frames, plucker_embedding
from .dancer import (
    DancerConditions,
    DancerConfig,
    check_dancer_call,
    check_dancer_size,
    dancer_conditions,
    dancer_velocity,
)
from .dit import WanDiTConfig
from .fun_control import control_channels, control_y, encode_control_video, zero_clip
from .pipeline import WanConditions, WanVideoPipeline, sampler_grid
from .presets import PRESETS
from .s2v import S2VConditions, WanS2VConfig, _pose_latents, s2v_velocity
from .vace import check_vace_channels, prepare_vace
from .video_as_prompt import VapInputs, VideoAsPromptExpert, encode_vap, official_keys

logger = logging.getLogger(__name__)

ENCODER_SLOTS = ("vae", "text_encoder")
TRAINING_SHIFT = 5.0  # the "wan" template's shift: the training grid, and the pipeline's default
EXPERTS = ("high", "low")
# Where the pipeline hands a Wan 2.2 A14B model from the high-noise expert to the low-noise one (t / 1000).
EXPERT_BOUNDARY = {
    "t2v": PRESETS["Wan-AI/Wan2.2-T2V-A14B"].defaults["switch_DiT_boundary"],
    "i2v": PRESETS["Wan-AI/Wan2.2-I2V-A14B"].defaults["switch_DiT_boundary"],
}
CONDITION_KEYS = ("input_image", "end_image")
# the row columns an encoded sample's optional entries come from (named when a batch mixes rows with and without)
SAMPLE_COLUMNS = {
    "vace_context": "vace_video / vace_video_mask / vace_reference_image",
    "reference_latents": "reference_image",
    "pose_latents": "s2v_pose_video",
    "refimage_feature": "wantodance_reference_image",
    "clip_feature": "input_image",
}
VACE_KEYS = ("vace_video", "vace_video_mask", "vace_reference_image")
# the columns of the models below, each refused by name for a DiT that cannot use it (see `_check_columns`)
MODEL_COLUMNS = {
    "speed": ("motion_bucket_id",),
    "camera": ("camera_control_direction", "camera_control_speed", "camera_control_origin"),
    "animate": ("animate_pose_video", "animate_face_video", "animate_inpaint_video", "animate_mask_video"),
    "s2v": ("input_audio", "s2v_pose_video"),
    "animate2": (
        "animate2_reference_image",
        "animate2_reference_video",
        "animate2_prompt_ref",
        "animate2_refert_images",
    ),
    "vap": ("vap_video", "vap_prompt"),
    "fun": ("control_video", "reference_image"),
    "dancer": (
        "wantodance_music_path",
        "wantodance_reference_image",
        "wantodance_fps",
        "wantodance_keyframes",
        "wantodance_keyframes_mask",
    ),
}
NOT_FOR = {
    "speed": "motion_bucket_id needs DiffSynth-Studio's speed-control model (DiffSynth-Studio/Wan2.1-1.3b-speedcontrol-v1"
    ", model.safetensors) among the model files, with a text- or image-to-video DiT",
    "camera": "this Wan DiT has no camera adapter (a Wan Fun Control-Camera model, e.g. "
    "PAI/Wan2.1-Fun-V1.1-1.3B-Control-Camera, takes it)",
    "animate": "this Wan DiT has no Animate modules (Wan-AI/Wan2.2-Animate-14B takes it)",
    "s2v": "this Wan DiT is not Wan2.2-S2V (Wan-AI/Wan2.2-S2V-14B takes it)",
    "animate2": "this Wan DiT is not Wan2.2-Animate-2 (Wan-AI/Wan2.2-Animate-2-14B takes it)",
    "dancer": "this Wan DiT is not Wan-Dancer (Wan-AI/Wan-Dancer-14B:global_model / local_model.safetensors takes it)",
    "vap": "it needs the Video-As-Prompt expert among the model files (the `*_mot_ref*` keys of "
    "ByteDance/Video-As-Prompt-Wan2.1-14B:transformer/diffusion_pytorch_model*.safetensors)",
    "fun": "this {kind} Wan DiT is not a Fun Control model (e.g. PAI/Wan2.1-Fun-V1.1-1.3B-Control takes it)",
}
# a row's vap_prompt when it has none: what DiffSynth-Studio's training encodes (its trainer never passes one on)
VAP_DEFAULT_PROMPT = ""
# `trained_model`: what the trainer trains (its "denoiser"); "vap" through `VapExpertInTraining`
TRAINED_MODELS = ("dit", "motion_controller", "vap")


class ExpertScheduler(FlowMatchScheduler):
    """The "wan" scheduler of one Wan 2.2 A14B expert: training sigmas are drawn only from the expert's share
    of the training grid, `sigma >= boundary` for the high-noise expert and below it for the low-noise one.
    `min_boundary` / `max_boundary` (`--min/max_timestep_boundary`, grid fractions counted from the noisy end
    as DiffSynth-Studio counts them) narrow the draw further; a range outside the expert's share is an error.
    """

    def __init__(self, expert: str, boundary: float, **template_defaults):
        if expert not in EXPERTS:
            raise ConfigError(f"expert={expert!r} is not accepted; use one of {EXPERTS}")
        if not 0 < boundary < 1:
            raise ConfigError(f"expert_boundary={boundary!r} is not accepted; use a number in (0, 1)")
        super().__init__("wan", **template_defaults)
        self.expert, self.boundary = expert, float(boundary)

    def expert_span(self) -> tuple[int, int]:
        """The expert's grid positions `[start, stop)` (the grid runs from the noisy end down)."""
        if self.train_sigmas is None:
            self.set_training_grid()
        t, edge = self.train_sigmas * self.num_train_timesteps, self.boundary * self.num_train_timesteps
        high = int((t >= edge).sum())  # the grid decreases: the high-noise share is a prefix
        return (0, high) if self.expert == "high" else (high, len(self.train_sigmas))

    training_span = expert_span  # what `sample_training_sigmas` draws from

    def span_error(self, min_boundary: float, max_boundary: float) -> ConfigError:
        start, stop = self.expert_span()
        return ConfigError(
            f"--min_timestep_boundary {min_boundary} / --max_timestep_boundary {max_boundary} leave no "
            f"timestep of the {self.expert}-noise expert (t {'>=' if self.expert == 'high' else '<'} "
            f"{self.boundary * self.num_train_timesteps:g}: grid positions {start}..{stop - 1} of "
            f"{len(self.train_sigmas)}); widen them or leave them at 0 and 1"
        )

    def __repr__(self) -> str:
        return f"ExpertScheduler({self.expert!r}, boundary={self.boundary:g}; {super().__repr__()})"


class _DitShape(nn.Module):
    """Stands in the pipeline's empty "dit" slot while encoding without the DiT: the stages that build image
    conditions read only `dit.config` (read from the DiT file's header, no weights loaded)."""

    def __init__(self, config: WanDiTConfig):
        super().__init__()
        self.config = config


class VapExpertInTraining(nn.Module):
    """The Video-As-Prompt expert as the trainer trains it (`trained_model="vap"`). The expert acts inside the DiT's
    call (`block_hook`), so a DDP-wrapped expert would never see its use; this module's forward is the whole model call
    over the frozen DiT of `pipe`, so one call of the trainer's prepared model covers it. Its children are the expert's
    own modules: its state dict is the expert's (our names; `export_state` writes the released keys), and full weights
    or a LoRA the trainer gives them are the pipeline's expert's. `gradient_checkpointing` is passed on to the DiT,
    whose flag also recomputes the joint layers. Each expert layer with weights computes in their dtype (float32
    master weights under a bfloat16 DiT) and hands back the dtype it was given, as the joint layers expect."""

    def __init__(self, expert: VideoAsPromptExpert, pipe: WanVideoPipeline):
        super().__init__()
        for name, child in expert.named_children():  # the expert keeps every weight in a submodule
            self.add_module(name, child)
        self.config = expert.config
        self.lora_target_modules = expert.lora_target_modules
        self.gradient_checkpointing = False
        self._frozen = (pipe,)  # not a submodule: the DiT is not trained
        for module in expert.modules():
            if isinstance(module, (nn.Linear, nn.Conv3d, nn.RMSNorm)):
                _compute_in_weight_dtype(module)

    def forward(
        self,
        noisy_latents: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        clip_feature: torch.Tensor,
        y: torch.Tensor,
        vap_latents: torch.Tensor,
        vap_context: torch.Tensor,
        vap_clip_feature: torch.Tensor,
    ) -> torch.Tensor:
        """The pipeline's per-step call (`predict`, one branch) with the reference inputs through the expert."""
        (pipe,) = self._frozen
        pipe.dit.gradient_checkpointing = self.gradient_checkpointing
        vap = VapInputs(vap_latents, vap_context, vap_clip_feature)
        conditions = WanConditions(text, clip_feature=clip_feature, y=y, vap=vap)
        return pipe.predict(pipe.dit, noisy_latents, timestep, conditions, None, 1.0, False)


def _compute_in_weight_dtype(module: nn.Module) -> None:
    """Hooks that run `module` on its input cast to its weight's dtype and cast the output back to the input's
    dtype; nothing changes when the two agree (the pipeline's own call)."""
    if getattr(module, "_cast_to_weight_dtype", False):  # one expert, trained by several tasks (tests)
        return
    module._cast_to_weight_dtype = True
    given: list[torch.dtype | None] = [None]

    def before(mod: nn.Module, args: tuple):
        x, dtype = args[0], mod.weight.dtype
        if not x.is_floating_point() or x.dtype == dtype:
            given[0] = None
            return None
        given[0] = x.dtype
        return (x.to(dtype), *args[1:])

    def after(mod: nn.Module, args: tuple, out: torch.Tensor):
        dtype, given[0] = given[0], None
        return out if dtype is None else out.to(dtype)

    module.register_forward_pre_hook(before)
    module.register_forward_hook(after)


class WanTrainingTask(PipelineTrainingTask):
    """Turns rows into Wan inputs and runs the pipeline's per-step DiT call (see the module docstring)."""

    family: ClassVar[str] = "wan"
    denoiser_slot: ClassVar[str] = "dit"
    size_multiple: ClassVar[int] = WanVideoPipeline.size_multiple
    media: ClassVar[tuple[str, ...]] = ("video", "image")
    # --task_options that leave a cache valid: they act only on the noise levels drawn or on the model call
    loss_options: ClassVar[tuple[str, ...]] = (
        "sigma_shift",
        "expert",
        "expert_boundary",
        "trained_model",
        "validation_motion_bucket_id",
    )
    # models the trainer may train in the denoiser's place (`trained_model`, from --trainable_models)
    trainable_slots: ClassVar[tuple[str, ...]] = ("motion_controller", "vap")
    # TI2V's per-batch draw with a first-frame probability (`draw_choices`): whether the batch trains from its frame
    batch_choices: ClassVar[tuple[str, ...]] = ("first_frame",)
    first_frame_p: float = 0.0  # TI2V: the chance a batch trains image-to-video (the `first_frame` option)
    vap: bool = False  # whether the Video-As-Prompt expert is among the model files (set per task in __init__)
    _in_training: VapExpertInTraining | None = None  # the trainer's model with trained_model="vap"

    def __init__(
        self,
        pipe: WanVideoPipeline,
        dit_config: WanDiTConfig | WanS2VConfig | Animate2Config | DancerConfig | None = None,
        speed_control: bool | None = None,
        vap: bool | None = None,
        *,
        sigma_shift: float | None = None,
        max_sequence_length: int = 512,
        expert: str | None = None,
        expert_boundary: float | None = None,
        trained_model: str = "dit",
        validation_motion_bucket_id: float | str | None = None,
        first_frame: bool | float | None = None,
    ):
        """`speed_control`: whether the speed-control model is among the model files (default: whether `pipe` has
        it loaded); `trained_model` "motion_controller" makes it the model the trainer trains (see the module
        docstring); `vap` likewise, whether the Video-As-Prompt expert is (default: whether `pipe.vap` is loaded).
        `validation_motion_bucket_id`: the speed of validation samples with the speed-control model (default: the
        dataset's first row's, see `prepare_dataset`). `first_frame` (Wan2.2-TI2V-5B): true trains image-to-video
        from each clip's `input_image` (else its first frame), a probability in [0, 1] draws that per batch, false
        (the default, as DiffSynth-Studio without `--extra_inputs input_image`) trains text-to-video."""
        self.pipe = pipe
        self.dit_config = dit_config if dit_config is not None else pipe.dit.config
        own = {Animate2Config: "animate2", DancerConfig: "dancer"}  # one-mode DiTs without a model_type
        self.kind = own.get(type(self.dit_config)) or self.dit_config.model_type
        self.max_sequence_length = max_sequence_length
        self.speed_control = pipe.motion_controller is not None if speed_control is None else bool(speed_control)
        self.vap = pipe.vap is not None if vap is None else bool(vap)
        self._in_training = None
        self._check_trained_model(trained_model)
        self.validation_motion_bucket_id = self._validation_speed(validation_motion_bucket_id)
        if self.vap:
            self._check_vap(expert)
        if trained_model == "vap" and pipe.vap is not None:
            self._in_training = VapExpertInTraining(pipe.vap, pipe)
        self.sigma_shift = sigma_shift  # given: the training grid's and `inference_sigmas`' shift
        if sigma_shift is None:
            sigma_shift = TRAINING_SHIFT
        if expert is None:
            if expert_boundary is not None:
                raise ConfigError("expert_boundary needs expert='high' or 'low' (which Wan 2.2 A14B expert this is)")
            self.scheduler = FlowMatchScheduler("wan", shift=sigma_shift)
        else:
            if self.kind not in EXPERT_BOUNDARY:
                raise ConfigError(f"expert={expert!r}: a {self.kind!r} Wan DiT is not a Wan 2.2 A14B expert")
            boundary = EXPERT_BOUNDARY[self.kind] if expert_boundary is None else expert_boundary
            self.scheduler = ExpertScheduler(expert, boundary, shift=sigma_shift)
        if pipe.vae is not None:  # VAE compression x patch size: 16, or 32 for Wan2.2-TI2V-5B
            self.size_multiple = pipe.vae.spatial_compression * max(self.dit_config.patch_size[1:])
        self._shape = _DitShape(self.dit_config)
        self.first_frame_p = self._first_frame_chance(first_frame)
        self._ignored_input_image = False  # warned once: TI2V trains text-to-video past a row's input_image
        # validation samples: I2V / FLF2V cannot draw without their frames; TI2V trained on a first frame expects one
        self.validation_references = {"i2v": "required"}.get(self.kind, "none")
        if self.kind == "ti2v":
            self.validation_references = "expected" if self.first_frame_p == 1.0 else "optional"
        if self._field("vace_layers"):  # VACE: optional reference images of the subjects
            self.validation_references = "optional"
        if self._no_samples() is not None or isinstance(self.scheduler, ExpertScheduler):
            self.validation_references = "required"  # refused at setup, in the family's words (`reference_arguments`)

    def _first_frame_chance(self, first_frame: bool | float | None) -> float:
        """The `first_frame` option as the chance a batch trains image-to-video: TI2V's choice (unset, it trains
        text-to-video as DiffSynth-Studio does by default). The other image DiTs always take their frames: true is
        accepted there and changes nothing (what `--extra_inputs input_image` means for them)."""
        if self.kind != "ti2v":
            if first_frame is not None and not (first_frame is True and self.kind != "t2v"):
                raise ConfigError(
                    f"first_frame={first_frame!r} picks text- or image-to-video training for Wan2.2-TI2V-5B; this "
                    f"{self.kind!r} Wan DiT takes no such choice: drop the task option"
                )
            return 0.0
        if first_frame is None:
            logger.info(
                "Wan2.2-TI2V-5B trains text-to-video, as DiffSynth-Studio without --extra_inputs input_image; "
                "--task_options first_frame=true trains image-to-video (each clip's input_image, else its first "
                "frame), first_frame=0.5 half the batches"
            )
            return 0.0
        if isinstance(first_frame, int) and not isinstance(first_frame, bool) and first_frame in (0, 1):
            first_frame = bool(first_frame)
        if not isinstance(first_frame, (bool, float)) or not 0.0 <= first_frame <= 1.0:
            raise ConfigError(
                f"first_frame={first_frame!r} is not accepted; use true (image-to-video), false (text-to-video) or "
                "a probability in [0, 1] that a batch trains image-to-video"
            )
        return float(first_frame)

    def draw_choices(self, batch: Mapping[str, Any], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """TI2V with a first-frame probability: one draw per batch, whether all its rows train from their first
        frame (`"first_frame"`, one bool per row), so `velocity` and `loss_mask` agree; nothing otherwise."""
        if not 0.0 < self.first_frame_p < 1.0:
            return {}
        drawn = torch.rand((), generator=generator) < self.first_frame_p
        return {"first_frame": drawn.expand(batch["latents"].shape[0]).clone()}

    def _first_latent(self, batch: Mapping[str, Any]) -> torch.Tensor | None:
        """TI2V's clean first latent frames `[B, z, 1, h, w]` when this batch trains image-to-video, else None."""
        first = batch.get("first_latent")
        if first is None:
            return None
        drawn = batch.get("first_frame")
        if drawn is None:
            if 0.0 < self.first_frame_p < 1.0:
                raise ConfigError(
                    f"first_frame={self.first_frame_p:g} draws per batch (draw_choices, which the trainer calls); "
                    "this batch has no draw"
                )
            return first
        return first if bool(drawn.bool().all()) else None

    @property
    def conditioning(self) -> tuple[str, ...]:
        """Columns the dataset reads at their own size, not the video's: an Animate DiT's face crops (square, and
        taken whole by the pipeline at 512 x 512; fitted to a wide video they would lose their top and bottom), and
        the reference images of `conditioning_counts`."""
        columns = ("animate_face_video",) if self._field("animate") else ()
        return columns + self.conditioning_counts

    @property
    def conditioning_counts(self) -> tuple[str, ...]:
        """A VACE DiT's and a Fun Control DiT's reference images: the pipeline fits them to the video's size itself,
        so rows with one reference each of any size stack, but not rows with 1 and 2 references (or none): the
        trainer's dataset adds their count alone to the batch keys, where rows differ in it (a dataset whose rows
        agree keeps the keys it had before they were conditioning columns)."""
        columns: tuple[str, ...] = ()
        if self._field("vace_layers"):
            columns += ("vace_reference_image",)
        if self._fun_control():
            columns += ("reference_image",)
        return columns

    @property
    def aligned_conditioning(self) -> tuple[str, ...]:
        """A VACE DiT's control video and mask, read as the video is (pixel-aligned with it); a row with them and a
        row without encode apart (`vace_context`), so the dataset batches them apart."""
        return ("vace_video", "vace_video_mask") if self._field("vace_layers") else ()

    def _fun_control(self) -> bool:
        """Whether this is a Fun Control DiT (control video channels, not Animate)."""
        return self.kind == "i2v" and not self._field("animate") and bool(control_channels(self.dit_config))

    def check_row(self, row: Mapping[str, Any], size: Any = None) -> None:
        """The trainer's check of each metadata row at setup: a row without a column this DiT needs (Fun Control's
        control_video, Control-Camera's camera_control_direction, ...) is refused before any step, naming it."""
        for key, need in self._required_columns().items():
            if not _given(row.get(key)):
                raise ConfigError(f"has no {key}: {need}")
        if self._field("camera_adapter_dim"):
            direction, origin = row.get("camera_control_direction"), row.get("camera_control_origin")
            check_direction(direction)
            try:
                check_origin(_numbers(0, "camera_control_origin", origin) if _given(origin) else None)
            except ConfigError as error:  # the dataset names the metadata row
                raise ConfigError(str(error).removeprefix("row 0: ")) from None

    def _required_columns(self) -> dict[str, str]:
        """Column -> why this DiT needs it in every row."""
        needs = {}
        if self._fun_control():
            needs["control_video"] = "a Wan Fun Control model trains on a control video (add it to --data_file_keys)"
        if self._field("camera_adapter_dim"):
            needs["camera_control_direction"] = "a Wan Fun Control-Camera model learns to move the camera along one"
        if self.speed_control:
            needs["motion_bucket_id"] = "with the speed-control model every row gives the speed of its motion"
        if self.vap:
            needs["vap_video"] = "with the Video-As-Prompt expert every row gives its reference video"
        if self._field("animate"):
            for key in ("animate_pose_video", "animate_face_video"):
                needs[key] = "a Wan2.2-Animate model trains on a pose video and a face video"
        if self.kind == "dancer":
            for key in ("wantodance_music_path", "wantodance_keyframes", "wantodance_keyframes_mask"):
                needs[key] = "a Wan-Dancer model trains on music, keyframes and their mask"
        return needs

    def flip_row(self, row: dict[str, Any]) -> dict[str, Any]:
        """`--flip_aug` mirrored this row's pictures: a Control-Camera row's camera path is mirrored with them
        ("Left" and "Right" swapped, the origin pose reflected), so the clip is taught the motion it now shows."""
        if not self._field("camera_adapter_dim"):
            return row
        row = dict(row)
        direction, origin = row.get("camera_control_direction"), row.get("camera_control_origin")
        if isinstance(direction, str) and direction:
            row["camera_control_direction"] = mirrored_direction(direction)
        if _given(origin):
            row["camera_control_origin"] = mirrored_origin(_numbers(0, "camera_control_origin", origin))
        return row

    def _field(self, name: str):
        """A `WanDiTConfig` field of the DiT, or None for a DiT whose config has no such field (S2V)."""
        return getattr(self.dit_config, name, None)

    def _check_trained_model(self, trained_model: str) -> None:
        if trained_model not in TRAINED_MODELS:
            raise ConfigError(f"trained_model={trained_model!r} is not accepted; use one of {TRAINED_MODELS}")
        self.trained_model = trained_model
        if self.speed_control and (self.kind not in ("t2v", "i2v", "ti2v") or self._field("animate")):
            raise ConfigError(
                "the speed-control model (motion_bucket_id) is for text- and image-to-video Wan DiTs, not S2V or "
                "Animate: leave its file out of the models"
            )
        controller = self.pipe.motion_controller
        if controller is not None and controller.config.dim != self.dit_config.dim:
            raise ConfigError(
                f"the speed-control model is for DiTs of width {controller.config.dim}; this DiT has dim="
                f"{self.dit_config.dim} (DiffSynth-Studio/Wan2.1-1.3b-speedcontrol-v1 goes with Wan2.1-T2V-1.3B)"
            )
        if trained_model == "dit":
            return
        if trained_model == "vap":
            if not self.vap:
                raise ConfigError(
                    "trained_model='vap' (--trainable_models vap / --lora_base_model vap) trains the Video-As-Prompt "
                    "expert, but it is not among the model files: add ByteDance/Video-As-Prompt-Wan2.1-14B's "
                    "transformer/diffusion_pytorch_model*.safetensors (the DiT with the expert's `*_mot_ref*` keys)"
                )
            self.denoiser_slot = "vap"  # the trainer trains (and saves) the expert, not the DiT
            return
        if not self.speed_control:
            raise ConfigError(
                "trained_model='motion_controller' trains DiffSynth-Studio's speed-control model: add its file "
                "(DiffSynth-Studio/Wan2.1-1.3b-speedcontrol-v1:model.safetensors) to the models"
            )
        self.denoiser_slot = "motion_controller"  # the trainer trains (and saves) the controller, not the DiT
        if controller is not None:  # --use_gradient_checkpointing reaches the DiT through it (see `velocity`)
            controller.gradient_checkpointing = False

    def _validation_speed(self, value: float | str | None) -> float | None:
        """The `validation_motion_bucket_id` task option as a number; refused without the speed-control model."""
        if not _given(value):
            return None
        if not self.speed_control:
            raise ConfigError(
                f"--task_options validation_motion_bucket_id={value!r} needs DiffSynth-Studio's speed-control model "
                "(DiffSynth-Studio/Wan2.1-1.3b-speedcontrol-v1:model.safetensors) among the models: add its file or "
                "drop the option"
            )
        try:
            return _number(0, "validation_motion_bucket_id", value, None)
        except ConfigError:
            raise ConfigError(
                f"--task_options validation_motion_bucket_id={value!r} is not a number (0 slow ... 100 fast)"
            ) from None

    def _check_vap(self, expert: str | None) -> None:
        """The Video-As-Prompt expert runs beside a plain Wan 2.1 I2V DiT with CLIP input, as the pipeline's
        `check_vap_call` requires, and with nothing else in the model call."""
        cfg = self.dit_config
        plain = isinstance(cfg, WanDiTConfig) and cfg.model_type == "i2v" and cfg.has_image_input
        extras = [name for name in ("vace_layers", "animate", "ref_conv", "camera_adapter_dim", "image_pos_len")
                  if plain and getattr(cfg, name)]  # fmt: skip
        if not plain or extras or control_channels(cfg):
            what = type(cfg).__name__ if not isinstance(cfg, WanDiTConfig) else f"model_type {cfg.model_type!r}"
            raise ConfigError(
                f"the Video-As-Prompt expert is among the model files, but this DiT ({what}"
                f"{', with ' + ', '.join(extras) if extras else ''}) is not the plain Wan 2.1 I2V DiT it runs beside "
                "(ByteDance/Video-As-Prompt-Wan2.1-14B's transformer/ holds both): leave the expert's files out"
            )
        if expert is not None:
            raise ConfigError(f"expert={expert!r}: the Video-As-Prompt expert goes with a Wan 2.1 I2V DiT, not A14B")
        if self.speed_control:
            raise ConfigError(
                "the speed-control model and the Video-As-Prompt expert were both given; the pipeline runs them "
                "apart (vap_video takes no motion_bucket_id): leave one out of the models"
            )
        if self.pipe.vap is not None:
            self.pipe.vap.requires_grad_(False)  # frozen unless the trainer trains it (trained_model="vap")
            if self.pipe.dit is not None:
                self.pipe.vap.check_dit(self.pipe.dit)

    @property
    def models(self) -> dict[str, nn.Module]:
        """The loaded models by slot; with trained_model="vap", "vap" is the expert in training
        (`VapExpertInTraining`: the expert's modules, running the whole model call)."""
        models = super().models
        if self._in_training is not None:
            models["vap"] = self._in_training
        return models

    def export_state(self, slot: str, state: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """Trained full weights as they are saved: the expert's in the released file's keys (`blocks.N.*_mot_ref*`,
        N the DiT layer), which the pipeline loads strictly; any other model's unchanged."""
        if slot != "vap":
            return state
        released = {ours: official for official, ours in official_keys(self.pipe.vap.config).items()}
        unknown = sorted(set(state) - set(released))
        if unknown:
            raise ConfigError(f"the Video-As-Prompt expert's weights {unknown[:5]} have no released key")
        return {released[key]: value for key, value in state.items()}

    def lora_metadata(self) -> dict[str, str]:
        """For a DiT LoRA trained on one Wan 2.2 A14B expert, that expert ("high" / "low") in its file's header, so
        `WanVideoPipeline.load_lora` applies it to that expert (`dit` / `dit2`) by default; nothing otherwise."""
        if self.denoiser_slot != "dit" or not isinstance(self.scheduler, ExpertScheduler):
            return {}
        return {WanVideoPipeline.LORA_EXPERT_KEY: self.scheduler.expert}

    def prepare_dataset(self, dataset: Any) -> None:
        """The trainer's hook before any step: validation samples are as long as the longest training clip (its
        `sample_frames`; a cache from before they were recorded says none), not the pipeline's 81 frames."""
        clips = [frames for frames in getattr(dataset, "sample_frames", None) or () if frames > 1]
        self.sample_frames = max(clips) if clips else None
        if self.kind == "dancer":
            self._check_dancer_rates(dataset)
        if self.speed_control and self.validation_motion_bucket_id is None and len(dataset):
            # the speed of validation samples: the first row's (a metadata row, or a cached sample's id)
            rows = getattr(dataset, "rows", None)
            value = rows[0].get("motion_bucket_id") if rows else dataset[0].get("motion_bucket_id")
            if isinstance(value, torch.Tensor):
                value = float(value.flatten()[0])
            if _given(value):
                self.validation_motion_bucket_id = _number(0, "motion_bucket_id", value, None)

    @staticmethod
    def _check_dancer_rates(dataset: Any) -> None:
        """Refuse, before any step, a Wan-Dancer row whose `wantodance_fps` disagrees with `--video_fps` (the rate
        its clips are read at): the DiT would be told another frame rate than its frames have."""
        for part in getattr(dataset, "parts", None) or [dataset]:  # several datasets (--dataset_config), or one
            fps, rows = getattr(part, "fps", None), getattr(part, "rows", None)
            for i, row in enumerate(rows if fps is not None and rows is not None else ()):
                value = row.get("wantodance_fps")
                if not _given(value):
                    continue
                where = f"{getattr(part, 'metadata', 'the metadata')} row {i + 1} column wantodance_fps"
                try:
                    rate = _number(i, "wantodance_fps", value, None)
                except ConfigError:
                    raise ConfigError(f"{where}: {value!r} is not a number of frames per second") from None
                if abs(rate - float(fps)) > 1e-6:
                    raise ConfigError(
                        f"{where}: {value!r} disagrees with --video_fps {float(fps):g}, the rate the clips are read "
                        "at; drop the column (the row then takes --video_fps) or make the two agree"
                    )

    def sample(
        self, denoiser: nn.Module, prompts: Sequence[str], *, seed: int, references=None, **options: Any
    ) -> list:
        """`PipelineTrainingTask.sample` at the training clips' length unless a prompts-file line gives its own,
        and with the speed-control model at `validation_motion_bucket_id`."""
        if getattr(self, "sample_frames", None) and options.get("num_frames") is None:
            options = {**options, "num_frames": self.sample_frames}
        speed = getattr(self, "validation_motion_bucket_id", None)
        if self.speed_control and speed is not None and options.get("motion_bucket_id") is None:
            options = {**options, "motion_bucket_id": speed}  # the controller on, as the DiT trains with it
        return super().sample(denoiser, prompts, seed=seed, references=references, **options)

    def _no_samples(self) -> str | None:
        """Why validation samples cannot be drawn from --validation_prompts / --validation_images, or None."""
        if self.vap:
            return "a Video-As-Prompt model follow a reference video (vap_video)"
        if self.kind == "dancer":
            return "a Wan-Dancer model follow music and keyframes (wantodance_music_path, wantodance_keyframes)"
        if self.trained_model == "motion_controller":
            return "a speed-control model in training need a motion_bucket_id"
        if self.kind == "s2v":
            return "a Wan2.2-S2V model follow a sound"
        if self.kind == "animate2":
            return "a Wan2.2-Animate-2 model follow a driving video"
        if self._field("animate"):
            return "a Wan2.2-Animate model follow a pose and a face video"
        if self._field("camera_adapter_dim"):
            return "a Wan Fun Control-Camera model follow a camera_control_direction"
        if control_channels(self.dit_config):
            return "a Wan Fun Control model follow a control video"
        return None

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
        and, for a DiT with CLIP input, the CLIP image encoder (`encoders`). Files of models not needed are
        recognised from their headers and not loaded; the DiT's header alone says how to condition it.
        `task_options`: `sigma_shift`, `max_sequence_length`, `expert` ("high" / "low", read from the DiT's
        folder when not given), `expert_boundary` (the preset's by default), `trained_model`,
        `validation_motion_bucket_id` and `first_frame` (TI2V). The S2V DiT's
        wav2vec2 audio encoder is an encoder; the speed-control model loads with the denoiser."""
        configs = _one_model_each(model_configs)
        roles = [model_roles(c) for c in configs]
        dits = [c for c, r in zip(configs, roles, strict=True) if "dit" in r]
        if len(dits) > 1:
            raise ConfigError(
                "the given files hold two Wan DiTs (the Wan 2.2 A14B high- and low-noise experts); train one "
                "expert at a time: pass only its files with --model_paths (e.g. high_noise_model/*.safetensors)"
            )
        if not dits:
            raise ConfigError(
                "Wan training needs the DiT's files (diffusion_pytorch_model*.safetensors), also to encode: its "
                "header says how the DiT is conditioned (text, image or first frame)"
            )
        dit_config = _dit_config(dits[0])
        from .longcat import LongCatConfig

        if isinstance(dit_config, LongCatConfig):  # its own model call (`longcat_training.py`)
            from .longcat_training import LongCatTrainingTask

            return LongCatTrainingTask.from_pretrained(
                configs, tokenizer_config=tokenizer_config, torch_dtype=torch_dtype, device=device,
                encoders=encoders, denoiser=denoiser, dit_config=dit_config, **task_options,
            )  # fmt: skip
        if not isinstance(dit_config, (WanDiTConfig, WanS2VConfig, Animate2Config, DancerConfig)):
            raise ConfigError(
                f"the DiT ({type(dit_config).__name__}) is one Wan training does not cover yet: it trains T2V, I2V / "
                "FLF2V, TI2V, VACE, Fun Control / Control-Camera, Animate, Animate-2, S2V, Wan-Dancer, LongCat-Video "
                "and speed control"
            )
        expert = task_options.get("expert", _expert_of(dits[0]))
        # the pipeline routes a DiT from a low-noise expert's folder to "dit2"; here it is the one denoiser
        dit_slot = "dit2" if _expert_of(dits[0], folders=False) == "low" else "dit"
        slots = {dit_slot} if denoiser else set()
        speed_control = any("motion_controller" in r for r in roles)
        if denoiser and speed_control:  # the controller's offset is part of the model call
            slots.add("motion_controller")
        vap = any("vap" in r for r in roles)  # the Video-As-Prompt expert (beside the DiT in transformer/)
        if denoiser and vap:  # it runs inside the model call
            slots.add("vap")
        if encoders:
            slots |= set(ENCODER_SLOTS)
            if isinstance(dit_config, WanS2VConfig):
                if not any("audio_encoder" in r for r in roles):
                    raise ConfigError(
                        "Wan2.2-S2V training encodes each row's sound with the wav2vec2 audio encoder: add "
                        "wav2vec2-large-xlsr-53-english/model.safetensors (e.g. with --model_paths)"
                    )
                slots.add("audio_encoder")
            if getattr(dit_config, "has_image_input", False) or isinstance(dit_config, (Animate2Config, DancerConfig)):
                if not any("image_encoder" in r for r in roles):
                    raise ConfigError(
                        "this Wan DiT takes CLIP image features: add the image encoder "
                        "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth (e.g. with --model_paths)"
                    )
                slots.add("image_encoder")
            if tokenizer_config is None:
                tokenizer_config = _tokenizer_beside(model_configs)
        pipe = load_partial_pipeline(
            WanVideoPipeline,
            configs,
            slots,
            tokenizers=("tokenizer",) if encoders else (),
            name="Wan",
            tokenizer_config=tokenizer_config if encoders else None,
            torch_dtype=torch_dtype,
            device=device,
        )
        if dit_slot == "dit2":
            pipe.dit, pipe.dit2 = pipe.dit2, None
            pipe.model_configs["dit"] = pipe.model_configs.pop("dit2")
        if expert is not None:
            logger.info("training the %s-noise expert of a Wan 2.2 A14B model", expert)
        task_options["expert"] = expert
        config = pipe.dit.config if pipe.dit is not None else dit_config
        return cls(pipe, dit_config=config, speed_control=speed_control, vap=vap, **task_options)

    def reference_arguments(self, images: Sequence[Any]) -> dict[str, Any]:
        """A validation sample's frames as the pipeline's `input_image` (the first frame) and, when two are
        given, `end_image` (the last, FLF2V)."""
        images = list(images)
        if isinstance(self.scheduler, ExpertScheduler):  # as --task direct_distill (`inference_sigmas`)
            raise ConfigError(
                "--validation_prompts: a Wan 2.2 A14B expert samples only part of the schedule, so its validation "
                "samples would be drawn by the one expert at every step; drop --validation_prompts (sample with both "
                "experts after training)"
            )
        reason = self._no_samples()
        if reason is not None:
            raise ConfigError(
                f"validation samples of {reason}, which --validation_images cannot give; drop --validation_prompts"
            )
        if self._field("vace_layers"):  # VACE: the images are the subjects to put in the video
            return {"vace_reference_image": images} if images else {}
        if self.kind == "t2v":
            if images:
                raise ConfigError(
                    f"this Wan DiT is text-to-video and takes no reference images (got {len(images)}); "
                    "drop --validation_images"
                )
            return {}
        if not images:
            if self.kind == "i2v":
                raise ConfigError(
                    "Wan I2V validation needs --validation_images: the first frame of each sample, one item per "
                    "--validation_prompts prompt (for FLF2V the first and the last frame, joined by ',')"
                )
            return {}
        most = 2 if self.kind == "i2v" else 1
        if len(images) > most:
            what = "a first and a last frame" if most == 2 else "a first frame only (Wan2.2-TI2V)"
            raise ConfigError(f"{len(images)} reference images for one Wan validation sample; it takes {what}")
        if self.dit_config.image_pos_len and len(images) != 2:
            raise ConfigError(
                "this Wan FLF2V DiT draws each sample between a first and a last frame: give both, joined by ',' "
                f"(got {len(images)} image)"
            )
        return {"input_image": images[0], **({"end_image": images[1]} if len(images) == 2 else {})}

    # ------------------------------------------------------------------ the protocol
    def encode(self, rows: list[Mapping[str, Any]]) -> list[dict[str, torch.Tensor]]:
        """`{"latents": [z, T, H/8, W/8], "text": [L, D]}` per row, plus the conditions of the DiT."""
        pipe = self.pipe
        videos = [self._video(i, row) for i, row in enumerate(rows)]
        for i, row in enumerate(rows):
            self._check_columns(i, row)
        context = pipe.encode_prompt([str(row["prompt"]) for row in rows], self.max_sequence_length)
        dtype = module_dtype(pipe.vae)
        samples = []
        with pipe.using("dit", pipe.dit if pipe.dit is not None else self._shape):
            for i, (row, video, ctx) in enumerate(zip(rows, videos, context, strict=True)):
                latents = pipe.vae.encode(video[None].to(pipe.device, dtype))[0].float()
                reference = self._vap(i, row, video) if self.vap else {}  # checks the row before its I2V conditions
                latents, conditions = self._conditions(i, row, video, latents)
                conditions.update(reference)
                vace = self._vace(i, row, video)
                if vace is not None:
                    if vace.references is not None:  # reference frames lead, as the pipeline denoises them
                        latents = torch.cat([vace.references[0].to(latents), latents], dim=1)
                    conditions["vace_context"] = vace.context[0].float()
                if self.speed_control:  # the id, not the offset: the controller may be the model in training
                    value = _number(i, "motion_bucket_id", row.get("motion_bucket_id"), None)
                    conditions["motion_bucket_id"] = torch.tensor([value], dtype=torch.float32)
                samples.append({"latents": latents, "text": ctx, **conditions})
        return samples

    def _check_columns(self, index: int, row: Mapping[str, Any]) -> None:
        """Refuse a column of a model this DiT is not, by name; a speed-control row needs its motion_bucket_id."""
        takes = {
            "speed": self.speed_control,
            "camera": bool(self._field("camera_adapter_dim")),
            "animate": bool(self._field("animate")),
            "s2v": self.kind == "s2v",
            "animate2": self.kind == "animate2",
            "vap": self.vap,
            "fun": self.kind == "i2v" and not self._field("animate") and bool(control_channels(self.dit_config)),
            "dancer": self.kind == "dancer",
        }
        for model, keys in MODEL_COLUMNS.items():
            named = [key for key in keys if _given(row.get(key))]
            if named and not takes[model]:
                reason = NOT_FOR[model].format(kind=repr(self.kind))
                raise ConfigError(f"row {index} has {', '.join(named)}, but {reason}; drop the column")
        if self.speed_control and not _given(row.get("motion_bucket_id")):
            raise ConfigError(
                f"row {index} has no motion_bucket_id: with the speed-control model every row gives the speed of "
                "its motion (0 slow ... 100 fast), as DiffSynth-Studio's --extra_inputs motion_bucket_id"
            )

    def _vap(self, index: int, row: Mapping[str, Any], video: torch.Tensor) -> dict[str, torch.Tensor]:
        """A Video-As-Prompt row's reference inputs: the pipeline's `encode_vap` of its `vap_video` and `vap_prompt`
        at the video's size and frame count (see the module docstring)."""
        if _given(row.get("end_image")):
            raise ConfigError(
                f"row {index} has an end_image; Video-As-Prompt animates an input_image only (the pipeline takes no "
                "end_image with vap_video): drop the column"
            )
        reference = self._frames(index, row, "vap_video", None)
        if reference is None:
            raise ConfigError(
                f"row {index} has no vap_video: with the Video-As-Prompt expert every row gives its reference video "
                "(a file listed in --data_file_keys, e.g. --data_file_keys video,vap_video), as DiffSynth-Studio's "
                "--extra_inputs vap_video,input_image"
            )
        caption = row.get("vap_prompt")
        caption = str(caption) if _given(caption) else VAP_DEFAULT_PROMPT
        _, frames, height, width = video.shape
        size = (height, width, frames)
        inputs, _ = encode_vap(self.pipe, reference, caption, None, 1, size, {}, False, self.max_sequence_length)
        latents, context, clip = (t[0].float() for t in inputs.astuple())
        return {"vap_latents": latents, "vap_context": context, "vap_clip_feature": clip}

    def _vap_inputs(self, batch: Mapping[str, Any], device) -> VapInputs | None:
        """The batch's Video-As-Prompt reference inputs for the pipeline's model call, or None without them."""
        expert = self.pipe.vap
        if "vap_latents" not in batch:
            if expert is not None:
                raise ConfigError(
                    "the Video-As-Prompt expert is loaded, but this batch was encoded without vap_video: encode the "
                    "cache again with the expert among the model files"
                )
            return None
        if expert is None:
            raise ConfigError(
                "this batch was encoded with vap_video, but the Video-As-Prompt expert is not loaded: add "
                "ByteDance/Video-As-Prompt-Wan2.1-14B's transformer/ files to the models"
            )
        return VapInputs(*(batch[key].to(device) for key in ("vap_latents", "vap_context", "vap_clip_feature")))

    def _dancer(self, index: int, row: Mapping[str, Any], video: torch.Tensor) -> dict[str, torch.Tensor]:
        """A Wan-Dancer row's conditions at the video's size and frame count, as `generate_dancer` builds them
        (`check_dancer_call`, then `dancer_conditions`): the first keyframe's and the reference image's CLIP
        features, `y` (keyframe mask + latent), the music features and the frame rate."""
        pipe, cfg = self.pipe, self.dit_config
        _, frames, height, width = video.shape
        if _given(row.get("framewise_decoding")) and str(row["framewise_decoding"]).lower() not in ("0", "false"):
            raise ConfigError(
                f"row {index} has framewise_decoding: the global model's frame-by-frame recipe (a video of one "
                "keyframe per latent frame, each encoded alone) is not trained here; train on continuous videos "
                "(the local model's recipe), or drop the column"
            )
        tc, z = pipe.vae.temporal_compression, pipe.vae.z_dim
        if cfg.in_dim != cfg.out_dim + tc + z or cfg.out_dim != z:
            raise ConfigError(
                f"the Wan-Dancer DiT takes {cfg.in_dim} channels; this VAE gives {z} latent + {tc} mask channels: "
                "use the Wan 2.1 VAE (Wan2.1_VAE.pth)"
            )
        check_dancer_size(height, width, self.size_multiple)
        music = row.get("wantodance_music_path")
        if not _given(music):
            raise ConfigError(
                f"row {index} has no wantodance_music_path: a Wan-Dancer model trains on the music of each video (an "
                "audio file as long as the video), as DiffSynth-Studio's --extra_inputs wantodance_music_path,..."
            )
        if not isinstance(music, (str, os.PathLike)) or not Path(music).is_file():
            raise ConfigError(
                f"row {index}: wantodance_music_path={music!r} is not a file. List the column in --data_file_keys "
                "(a path under the dataset folder, e.g. --data_file_keys video,wantodance_keyframes,"
                "wantodance_music_path), or give the path absolute"
            )
        keyframes = row.get("wantodance_keyframes")
        if not _given(keyframes):
            raise ConfigError(
                f"row {index} has no wantodance_keyframes: a Wan-Dancer model trains on a keyframe video of the "
                "video's frames (the given keyframes, black elsewhere; add it to --data_file_keys) with "
                "wantodance_keyframes_mask, as DiffSynth-Studio's --extra_inputs"
            )
        if isinstance(keyframes, list) and all(isinstance(k, torch.Tensor) for k in keyframes):  # a list of images
            keyframes = torch.stack([self._checked_image(index, "wantodance_keyframes", k) for k in keyframes], 1)
        keyframes = self._frames(index, {"wantodance_keyframes": keyframes}, "wantodance_keyframes", frames)
        flags = row.get("wantodance_keyframes_mask")
        if not _given(flags):
            raise ConfigError(
                f"row {index} has no wantodance_keyframes_mask: {frames} values, 1 where wantodance_keyframes holds "
                "a keyframe, else 0"
            )
        flags = _numbers(index, "wantodance_keyframes_mask", flags)
        reference = row.get("wantodance_reference_image")
        if isinstance(reference, list):  # DiffSynth-Studio takes the first of a list
            reference = reference[0] if reference else None
        reference = self._image(index, {"wantodance_reference_image": reference}, "wantodance_reference_image")
        reference = None if reference is None else tensor_to_pil(reference)[0]
        # the column, else the rate the clip's frames are at (--video_fps, a frame_rate column, the file's), else 30
        column = "wantodance_fps" if _given(row.get("wantodance_fps")) else "frame_rate"
        fps = _number(index, column, row.get(column), 30.0)
        try:
            music, reference, keyframes, flags, fps = check_dancer_call(
                pipe, str(music), None, reference, fps, keyframes, flags, frames
            )
        except ConfigError as exc:
            raise ConfigError(f"row {index}: {exc}") from None
        cond = dancer_conditions(pipe, music, reference, keyframes, flags, fps, height, width, {})
        sample = {"clip_feature": cond.clip_feature[0], "y": cond.y[0], "music_feature": cond.music_feature}
        if cond.refimage_feature is not None:
            sample["refimage_feature"] = cond.refimage_feature[0]
        return {**sample, "wantodance_fps": torch.tensor([fps], dtype=torch.float32)}

    def _camera(self, index: int, row: Mapping[str, Any], frames: int, height: int, width: int) -> dict:
        """A Control-Camera row's camera path: the poses `[F, 19]` (float64, `camera.py`'s numbers exactly) and
        the pixel size `[2]` its rays are drawn at (`velocity` draws them, as `camera_control_input` does)."""
        direction = row.get("camera_control_direction")
        if not _given(direction):
            raise ConfigError(
                f"row {index} has no camera_control_direction: a Wan Fun Control-Camera model learns to move the "
                "camera along one ('Left', 'Right', 'Up', 'Down', 'In', 'Out' or a combination such as 'LeftUp'), "
                "as DiffSynth-Studio's --extra_inputs input_image,camera_control_direction,camera_control_speed"
            )
        speed = _number(index, "camera_control_speed", row.get("camera_control_speed"), DEFAULT_SPEED)
        origin = row.get("camera_control_origin")
        origin = _numbers(index, "camera_control_origin", origin) if _given(origin) else None
        try:
            poses = camera_path(direction, frames, speed, origin)
        except ConfigError as exc:
            raise ConfigError(f"row {index}: {exc}") from None
        return {
            "camera_poses": torch.tensor(poses, dtype=torch.float64),
            "camera_size": torch.tensor([height, width], dtype=torch.int64),
        }

    @staticmethod
    def _camera_rays(batch: Mapping[str, Any], device) -> torch.Tensor:
        """The Control-Camera adapter's input `[B, 24, T, H, W]` for the batch's camera paths."""
        paths = zip(batch["camera_poses"].tolist(), batch["camera_size"].tolist(), strict=True)
        return torch.cat([pack_frames(plucker_embedding(poses, h, w)) for poses, (h, w) in paths]).to(device)

    def _frames(self, index: int, row: Mapping[str, Any], key: str, frames: int | None) -> list | None:
        """The row's `key` video as RGB frames (its first `frames`, which it must have), or None without one."""
        value = row.get(key)
        if not _given(value):
            return None
        if isinstance(value, (str, os.PathLike)):
            raise ConfigError(
                f"row {index}: {key} is the path {str(value)!r}, not a loaded video; add {key} to --data_file_keys"
            )
        if not isinstance(value, torch.Tensor) or value.dim() != 4 or value.shape[0] != 3:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ConfigError(f"row {index}: {key} must be a video [3, F, H, W] in [-1, 1], got {shape}")
        if frames is not None and value.shape[1] < frames:
            raise ConfigError(
                f"row {index}: {key} has {value.shape[1]} frames, fewer than the video's {frames} (one per frame)"
            )
        return tensor_to_pil(value[:, :frames].transpose(0, 1))

    def _animate(
        self, index: int, row: Mapping[str, Any], video: torch.Tensor, latents: torch.Tensor, character: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """An Animate row as one segment of the pipeline's (see the module docstring): the character's latent
        leads the video's latents; `y`, CLIP features, pose latent and 8-bit face crops are the pipeline's."""
        pipe = self.pipe
        _, frames, height, width = video.shape
        driving = {key: self._frames(index, row, key, frames) for key in MODEL_COLUMNS["animate"]}
        for key in ("animate_pose_video", "animate_face_video"):
            if driving[key] is None:
                raise ConfigError(
                    f"row {index} has no {key}: a Wan2.2-Animate model trains on a pose video and a face video, one "
                    "frame per video frame (add both to --data_file_keys), as DiffSynth-Studio's --extra_inputs "
                    "input_image,animate_pose_video,animate_face_video"
                )
        background, mask = driving["animate_inpaint_video"], driving["animate_mask_video"]
        if (background is None) != (mask is None):
            raise ConfigError(
                f"row {index}: replacement trains on both animate_inpaint_video (the background) and "
                "animate_mask_video; the row has only one"
            )
        inputs = AnimateInputs(driving["animate_pose_video"], driving["animate_face_video"], background, mask, 1)
        clip, ref_y = pipe.animate_character(tensor_to_pil(character)[0], 1, height, width, {})
        segment = (inputs, inputs.pose, inputs.faces, 0, frames, None)
        cond = pipe.animate_conditions(None, clip, ref_y, segment, 1, height, width, {})
        mask_channels = pipe.vae.temporal_compression  # ref_y: the all-given mask, then the character's latent
        latents = torch.cat([ref_y[0, mask_channels:].to(latents), latents], dim=1)
        faces = ((cond.face_pixel_values[0] + 1) * 127.5).round().to(torch.uint8)  # pil_to_tensor's pixels, undone
        conditions = {"y": cond.y[0].float(), "clip_feature": cond.clip_feature[0].float()}
        return latents, {**conditions, "pose_latents": cond.pose_latents[0].float(), "face_pixels": faces}

    def _animate2(
        self, index: int, row: Mapping[str, Any], video: torch.Tensor, latents: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """An Animate-2 row as the pipeline's first clip (see the module docstring): `animate2_inputs` of its
        character, driving frames and `animate2_prompt_ref`; the character's latent (y's frame 0) leads the
        video's latents."""
        pipe = self.pipe
        _, frames, height, width = video.shape
        check_animate2_channels(pipe)
        if _given(row.get("animate2_refert_images")):
            raise ConfigError(
                f"row {index} has animate2_refert_images: Wan2.2-Animate-2 trains on a video's first clip, with no "
                "given first frames; drop the column"
            )
        character = row.get("animate2_reference_image")
        if not _given(character):
            raise ConfigError(
                f"row {index} has no animate2_reference_image: a Wan2.2-Animate-2 model trains on the character's "
                "image and a driving video (add both to --data_file_keys), as DiffSynth-Studio's --extra_inputs "
                "animate2_prompt_ref,animate2_reference_image,animate2_reference_video"
            )
        character = self._image(index, row, "animate2_reference_image")
        driving = self._frames(index, row, "animate2_reference_video", frames)
        if driving is None:
            raise ConfigError(
                f"row {index} has no animate2_reference_video: a Wan2.2-Animate-2 model trains on a driving video of "
                "at least the video's frames (add it to --data_file_keys), as DiffSynth-Studio's --extra_inputs "
                "animate2_prompt_ref,animate2_reference_image,animate2_reference_video"
            )
        prompt_ref = row.get("animate2_prompt_ref")
        prompt_ref = str(prompt_ref) if _given(prompt_ref) else None
        size = (height, width, frames)
        image = tensor_to_pil(character)[0]
        clip, y, ref = animate2_inputs(pipe, image, driving, [], prompt_ref, size, self.max_sequence_length, {})
        mask_channels = pipe.vae.temporal_compression  # y: the mask, then the latents; frame 0 the character's
        latents = torch.cat([y[0, mask_channels:, :1].to(latents), latents], dim=1)
        return latents, {
            "y": y[0].float(),
            "clip_feature": clip[0].float(),
            "driving_latents": ref.latents[0].float(),
            "driving_y": ref.y[0].float(),
            "context_ref": ref.context[0].float(),
            "clip_ref": ref.clip_feature[0].float(),
        }

    def _s2v(
        self, index: int, row: Mapping[str, Any], video: torch.Tensor, latents: torch.Tensor, person: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """An S2V row as the pipeline's clip (see the module docstring): the latents after the context frame; the
        reference latent, wav2vec2 features and pose latent as `generate_s2v` builds them."""
        pipe = self.pipe
        _, frames, height, width = video.shape
        if frames < 5:
            raise ConfigError(
                f"row {index}: a Wan2.2-S2V clip is a context frame and 4k new frames; this video has {frames} "
                "frame(s): use --num_frames 5 or more (81)"
            )
        waveform, rate = self._sound(index, row)
        fps = _number(index, "frame_rate", row.get("frame_rate"), pipe.defaults.get("fps", 16))
        try:
            wave = prepare_waveform(waveform, rate)
        except ConfigError as exc:
            raise ConfigError(f"row {index}: {exc}") from None
        pipe.load_models_to_device(["audio_encoder"])
        features = audio_clips(pipe.audio_encoder, wave, fps, frames - 1, pipe.device)[0]
        pipe.load_models_to_device(["vae"])
        reference = pipe.encode_reference(tensor_to_pil(person)[0], 1, height, width, {})
        conditions = {"ref_latents": reference[0], "audio_embeds": features[0].float()}
        pose = self._frames(index, row, "s2v_pose_video", None)  # any length: the pipeline pads it with black
        if pose is not None:
            conditions["pose_latents"] = _pose_latents(pipe, pose, frames - 1, height, width, {})[0]
        return latents[:, 1:], conditions

    @staticmethod
    def _sound(index: int, row: Mapping[str, Any]) -> tuple[Any, float]:
        """An S2V row's waveform and sample rate: its `input_audio`, else the trainer's `audio`."""
        key, value = "input_audio", row.get("input_audio")
        if not _given(value):
            key, value = "audio", row.get("audio")
        if isinstance(value, (str, os.PathLike)):
            raise ConfigError(
                f"row {index}: {key} is the path {str(value)!r}, not a loaded waveform; the trainer reads a row's "
                "sound from an audio column listed in --data_file_keys (e.g. --data_file_keys video,audio), else "
                "from the video file's own track"
            )
        if not _given(value):
            raise ConfigError(
                f"row {index} has no sound: Wan2.2-S2V trains on one; give the row an audio column (a sound file, "
                "listed in --data_file_keys) or a video with an audio track"
            )
        return value, _number(index, "audio_sample_rate", row.get("audio_sample_rate"), 16000)

    def _fun_conditions(
        self, index: int, row: Mapping[str, Any], video: torch.Tensor, first: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """A Fun Control DiT's conditions, as the pipeline builds them: `y` from the row's `control_video` (and
        its `input_image` when it has one: DiffSynth-Studio's recipe trains without), CLIP features of the
        `reference_image` (else the input image, else zeros) and the reference's latent when the DiT has
        `ref_conv`."""
        pipe = self.pipe
        _, frames, height, width = video.shape
        control = row.get("control_video")
        if not isinstance(control, torch.Tensor) or control.dim() != 4 or control.shape[0] != 3:
            what = tuple(control.shape) if isinstance(control, torch.Tensor) else repr(control)
            raise ConfigError(
                f"row {index}: a Wan Fun Control model trains on a control_video [3, F, H, W] (add the column to "
                f"--data_file_keys); got {what}"
            )
        control_latent = encode_control_video(
            pipe, tensor_to_pil(control.transpose(0, 1)), 1, frames, height, width, {}
        )
        first_pil = None if first is None else tensor_to_pil(first)
        image_y = None if first_pil is None else pipe.encode_frames(first_pil, None, 1, frames, height, width, {})
        extra = self.dit_config.in_dim - self.dit_config.out_dim - control_latent.shape[1]
        conditions = {"y": control_y(control_latent, image_y, extra)[0].float()}
        reference = row.get("reference_image")
        reference_pil = (
            None if reference is None else tensor_to_pil(self._checked_image(index, "reference_image", reference))
        )
        if reference_pil is not None:
            if not self.dit_config.ref_conv:
                raise ConfigError(f"row {index} has a reference_image, but this Wan Fun DiT has no ref_conv")
            conditions["reference_latents"] = pipe.encode_reference(reference_pil[0], 1, height, width, {})[0]
        if self.dit_config.has_image_input:
            clip = pipe.encode_clip(reference_pil or first_pil, None, height, width)
            conditions["clip_feature"] = (clip if clip is not None else zero_clip(1, self.dit_config, pipe.device))[
                0
            ].float()
        return conditions

    def _vace(self, index: int, row: Mapping[str, Any], video: torch.Tensor):
        """A VACE DiT's control for one row (`prepare_vace` at the video's size), or None without VACE columns."""
        given = {key: row.get(key) for key in VACE_KEYS if row.get(key) is not None}
        if not given:
            return None
        if not self._field("vace_layers"):
            raise ConfigError(
                f"row {index} has {', '.join(given)}, but this Wan DiT has no VACE blocks: train a VACE model "
                "(e.g. Wan-AI/Wan2.1-VACE-1.3B), or drop the column"
            )
        check_vace_channels(self.dit_config, self.pipe.vae)
        for key, value in given.items():
            if isinstance(value, (str, os.PathLike)):
                raise ConfigError(
                    f"row {index}: {key} is the path {str(value)!r}, not loaded; add {key} to --data_file_keys"
                )
        _, frames, height, width = video.shape

        def frames_of(key):
            value = given.get(key)
            if value is None:
                return None
            if not isinstance(value, torch.Tensor) or value.dim() != 4 or value.shape[0] != 3:
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ConfigError(f"row {index}: {key} must be a video [3, F, H, W] in [-1, 1], got {shape}")
            return tensor_to_pil(value.transpose(0, 1))

        references = given.get("vace_reference_image")
        if references is not None:
            items = references if isinstance(references, list) else [references]
            references = [tensor_to_pil(self._checked_image(index, "vace_reference_image", r))[0] for r in items]
        return prepare_vace(
            self.pipe,
            frames_of("vace_video"),
            frames_of("vace_video_mask"),
            references,
            1.0,
            frames,
            height,
            width,
            {},
        )

    def _video(self, index: int, row: Mapping[str, Any]) -> torch.Tensor:
        """The row's video `[3, F, H, W]` (an image is one frame), checked against the VAE."""
        return row_video(row, index, "Wan", self.pipe.vae.temporal_compression)

    def _conditions(
        self, index: int, row: Mapping[str, Any], video: torch.Tensor, latents: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The latents to learn and the conditions of one row, from the pipeline's stages (see the module
        docstring)."""
        pipe, kind = self.pipe, self.kind
        given = {key: self._image(index, row, key) for key in CONDITION_KEYS}
        if kind == "dancer":
            named = [key for key, value in given.items() if value is not None]
            if named:
                raise ConfigError(
                    f"row {index} has {' and '.join(named)}, but Wan-Dancer takes its dancer as "
                    "wantodance_reference_image and its given frames as wantodance_keyframes: rename the column, or "
                    "drop it"
                )
            return latents, self._dancer(index, row, video)
        if kind == "animate2":
            named = [key for key, value in given.items() if value is not None]
            if named:
                raise ConfigError(
                    f"row {index} has {' and '.join(named)}, but Wan2.2-Animate-2 takes its character as "
                    "animate2_reference_image: rename the column, or drop it"
                )
            return self._animate2(index, row, video, latents)
        if kind == "t2v":
            named = [key for key, value in given.items() if value is not None]
            if named:
                raise ConfigError(
                    f"row {index} has {' and '.join(named)}, but this Wan DiT is text-to-video and takes no "
                    "image: train an I2V / TI2V model, or drop the column"
                )
            return latents, {}
        _, frames, height, width = video.shape
        image = given["input_image"] if given["input_image"] is not None else video[:, 0]
        first = tensor_to_pil(image)
        if kind == "ti2v":
            if given["end_image"] is not None:
                raise ConfigError(f"row {index} has an end_image; Wan2.2-TI2V takes a first frame only")
            if self.first_frame_p == 0.0:  # text-to-video (the `first_frame` option)
                self._warn_input_image_ignored(index, given["input_image"])
                return latents, {}
            if latents.shape[1] == 1:  # one frame: nothing after the first to learn; train it as text-to-image
                if given["input_image"] is not None:
                    raise ConfigError(
                        f"row {index} is a single frame with an input_image: TI2V learns the frames after the "
                        "given first one; give it a video (--num_frames 5 or more) or drop the input_image"
                    )
                return latents, {}
            first_latent = pipe.encode_first_latent(first, 1, height, width, {})
            return latents, {"first_latent": first_latent[0].float()}
        if kind == "s2v" or self._field("animate"):
            if given["end_image"] is not None:
                name = "Wan2.2-S2V" if kind == "s2v" else "Wan2.2-Animate"
                raise ConfigError(f"row {index} has an end_image; {name} takes one input_image only")
            build = self._s2v if kind == "s2v" else self._animate
            return build(index, row, video, latents, image)
        if control_channels(self.dit_config):
            return latents, self._fun_conditions(index, row, video, given["input_image"])
        last = given["end_image"]
        if last is not None and self.dit_config.camera_adapter_dim:  # as the pipeline: its y holds the first frame
            raise ConfigError(
                f"row {index} has an end_image; a Wan Fun Control-Camera DiT moves the camera over input_image alone "
                "(the pipeline takes no end_image): drop the column"
            )
        if last is None and self.dit_config.image_pos_len:  # FLF2V: the last frame is the second condition
            last = video[:, -1]
        last = None if last is None else tensor_to_pil(last)
        conditions = {"y": pipe.encode_frames(first, last, 1, frames, height, width, {})[0].float()}
        clip = pipe.encode_clip(first, last, height, width)
        if clip is not None:
            conditions["clip_feature"] = clip[0].float()
        if self.dit_config.camera_adapter_dim:
            conditions.update(self._camera(index, row, frames, height, width))
        return latents, conditions

    def _warn_input_image_ignored(self, index: int, image: torch.Tensor | None) -> None:
        """Once: a TI2V row's input_image is not used when the task trains text-to-video."""
        if image is None or self._ignored_input_image:
            return
        self._ignored_input_image = True
        logger.warning(
            "row %d has an input_image, which Wan2.2-TI2V-5B training ignores: it trains text-to-video unless "
            "--task_options first_frame=true (DiffSynth-Studio's --extra_inputs input_image) asks for image-to-video",
            index,
        )

    @staticmethod
    def _image(index: int, row: Mapping[str, Any], key: str) -> torch.Tensor | None:
        """The row's `key` image `[3, H, W]` in [-1, 1], or None when the row has none."""
        value = row.get(key)
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        if isinstance(value, (str, os.PathLike)):
            raise ConfigError(
                f"row {index}: {key} is the path {str(value)!r}, not a loaded image; add {key} to --data_file_keys "
                f"(e.g. --data_file_keys video,{key})"
            )
        return WanTrainingTask._checked_image(index, key, value)

    @staticmethod
    def _checked_image(index: int, key: str, value: Any) -> torch.Tensor:
        if not isinstance(value, torch.Tensor) or value.dim() != 3 or value.shape[0] != 3:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ConfigError(f"row {index}: {key} must be an image [3, H, W] in [-1, 1], got {shape}")
        return value

    def collate(self, samples: list[Mapping[str, torch.Tensor]]) -> dict[str, Any]:
        shapes = {tuple(s["latents"].shape) for s in samples}
        if len(shapes) > 1:
            cause = "use one --num_frames for every video, and do not mix images and videos in one batch"
            if any("vace_context" in s for s in samples):  # VACE reference frames lead the latents
                cause = f"the rows differ in their vace_reference_image count or their frames; {cause}"
            raise ConfigError(f"a Wan batch mixes latent shapes {sorted(shapes)}: {cause} (or use --batch_size 1)")
        keys = {tuple(sorted(s)) for s in samples}
        if len(keys) > 1:
            some = sorted(set().union(*keys) - set.intersection(*(set(k) for k in keys)))
            columns = sorted({SAMPLE_COLUMNS.get(key, key) for key in some})
            raise ConfigError(
                f"a Wan batch mixes rows with and without {', '.join(columns)} (encoded as {', '.join(some)}): give "
                "every row of a batch the same inputs, or use --batch_size 1"
            )
        for key in samples[0]:
            shapes = {tuple(s[key].shape) for s in samples}
            if len(shapes) > 1:  # CLIP features of one image or two (rows with and without an end_image)
                fix = "give every row an end_image or none"
                if key == "music_feature":  # Wan-Dancer: 30 feature frames a second of each row's music
                    fix = "give every row music of one length (as long as its video)"
                raise ConfigError(f"a Wan batch mixes {key} shapes {sorted(shapes)}: {fix}, or use --batch_size 1")
        return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}

    def inference_sigmas(self, latent_shape: Sequence[int], num_inference_steps: int) -> torch.Tensor:
        """Wan's sampling schedule as the pipeline resolves it: at the task's `sigma_shift` when given, else the
        preset's (`pipe.defaults`, e.g. Wan2.1-I2V-480P's 3, FLF2V's 16), else 5, with the preset's sampler. What
        `--task direct_distill` steps along. A Wan 2.2 A14B expert samples only its half of the schedule: refused."""
        if isinstance(self.scheduler, ExpertScheduler):
            raise ConfigError(
                "--task direct_distill: a Wan 2.2 A14B expert samples only part of the schedule; distil a one-DiT "
                "Wan model, or train the expert with --task sft"
            )
        pipe = self.pipe
        shift = pipe.setting("sigma_shift", self.sigma_shift, TRAINING_SHIFT)
        sampler = str(pipe.setting("sampler", None, "euler"))
        scheduler = make_scheduler("wan", sampler)
        scheduler.set_timesteps(num_inference_steps, shift=shift, **sampler_grid(sampler))
        return scheduler.sigmas

    def velocity(
        self, dit: nn.Module, batch: Mapping[str, Any], noisy_latents: torch.Tensor, sigma: torch.Tensor
    ) -> torch.Tensor:
        device = noisy_latents.device
        t = sigma.to(device=device, dtype=torch.float32) * self.scheduler.num_train_timesteps
        t = t.expand(noisy_latents.shape[0])

        def given(key):
            return batch[key].to(device) if key in batch else None

        if self.kind == "s2v":  # the pipeline's S2V model call, a first clip (no motion frames)
            cond = S2VConditions(given("ref_latents"), given("audio_embeds"), None, given("pose_latents"))
            return s2v_velocity(dit, noisy_latents, t, given("text"), cond)
        if self.kind == "dancer":  # the pipeline's positive call: every block, one frame rate for the batch
            rates = batch["wantodance_fps"].flatten().tolist()
            if len(set(rates)) > 1:
                raise ConfigError(
                    f"a Wan-Dancer batch mixes wantodance_fps {sorted(set(rates))}: the DiT takes one frame rate a "
                    "call; give every row one wantodance_fps, or use --batch_size 1"
                )
            cond = DancerConditions(
                given("clip_feature"), given("y"), given("music_feature"), given("refimage_feature"), rates[0]
            )
            return dancer_velocity(dit, noisy_latents, t, given("text"), cond)
        if self.kind == "animate2":  # one clip: both streams in the DiT's call (see `_animate2`)
            dtype = module_dtype(dit)
            names = ("driving_latents", "driving_y", "context_ref", "clip_ref")
            reference = ReferenceInputs(*(given(key).to(dtype) for key in names))
            cond = Animate2Conditions(given("clip_feature"), given("y"), reference)
            return animate2_velocity(dit, noisy_latents, t, given("text"), cond, 0.0)
        if self.trained_model == "vap":  # the trainer's model is the expert in training: it runs the whole call
            vap = self._vap_inputs(batch, device)
            _check_unused_parameters_found(dit)
            inputs = (given("text"), given("clip_feature"), given("y"), *vap.astuple())
            return dit(noisy_latents, t, *inputs)
        dit, motion = self._motion(dit, batch, device)
        faces = given("face_pixels")
        conditions = WanConditions(
            given("text"),
            given("clip_feature"),
            given("y"),
            given("vace_context"),
            reference_latents=given("reference_latents"),
            pose_latents=given("pose_latents"),
            face_pixel_values=None if faces is None else faces.float() / 127.5 - 1.0,  # as pil_to_tensor gives them
            camera_latents=self._camera_rays(batch, device) if "camera_poses" in batch else None,
            motion_modulation=motion,
            vap=self._vap_inputs(batch, device),  # run through the expert by the pipeline's `velocity`
        )
        if (self.kind == "i2v") != (conditions.y is not None):
            raise ConfigError(
                f"this batch was encoded for another kind of Wan model than this {self.kind!r} DiT (I2V conditions "
                f"{'missing' if conditions.y is None else 'present'}): encode the cache again with this model"
            )
        first = self._first_latent(batch)
        if first is None:
            timestep = t
        else:  # TI2V: the clean first frame in place, at timestep 0 token by token, as the pipeline denoises
            noisy_latents = torch.cat([first.to(device, noisy_latents.dtype), noisy_latents[:, :, 1:]], dim=2)
            timestep = torch.cat(
                [self.pipe.timestep_input(self._shape, noisy_latents[k : k + 1], t[k], True) for k in range(len(t))]
            )
        return self.pipe.predict(dit, noisy_latents, timestep, conditions, None, 1.0, False)

    def _motion(self, model: nn.Module, batch: Mapping[str, Any], device) -> tuple[nn.Module, torch.Tensor | None]:
        """The DiT to run and the speed-control offset `[B, 6, dim]` of the batch's motion_bucket_id (None without
        one). With `trained_model="motion_controller"` the trainer's `model` is the controller and the DiT is the
        pipeline's (frozen; gradient checkpointing as the controller was asked for)."""
        ids = batch.get("motion_bucket_id")
        if self.trained_model == "dit":
            if ids is None:
                return model, None
            if self.pipe.motion_controller is None:
                raise ConfigError(
                    "this batch has motion_bucket_id, but the speed-control model is not loaded: add its file to the "
                    "models, or encode the cache again without it"
                )
            return model, self.pipe.motion_controller(ids.to(device)[:, 0]).float()
        if ids is None:
            raise ConfigError(
                "training the speed-control model needs samples encoded with motion_bucket_id: encode the cache "
                "again with the speed-control model among the models"
            )
        dit = self.pipe.dit
        dit.gradient_checkpointing = bool(getattr(getattr(model, "module", model), "gradient_checkpointing", False))
        return dit, model(ids.to(device)[:, 0]).float()

    def loss_mask(self, batch: Mapping[str, Any]) -> torch.Tensor | None:
        """TI2V trained from the first frame: 0 on that latent frame (given, not learned), 1 on the rest; None (all
        count) otherwise."""
        if self._first_latent(batch) is None:
            return None
        latents = batch["latents"]
        mask = torch.ones(latents.shape[0], 1, latents.shape[2], 1, 1, device=latents.device)
        mask[:, :, 0] = 0
        return mask


def _check_unused_parameters_found(model: nn.Module) -> None:
    """A DDP-wrapped expert must be told that some of its weights get no gradient: the reference tokens stop at
    the last joint layer, so its expert block's output projection, cross-attention and feed-forward feed nothing.
    The trainer passes its `PreparedDenoiser`, whose `prepared` is the DDP wrapper."""
    from torch.nn.parallel import DistributedDataParallel

    wrapper = getattr(model, "prepared", model)
    if isinstance(wrapper, DistributedDataParallel) and not wrapper.find_unused_parameters:
        raise ConfigError(
            "training the Video-As-Prompt expert on several processes needs --find_unused_parameters: the last "
            "expert block's cross-attention and feed-forward feed no output, so their weights get no gradient"
        )


def _given(value: Any) -> bool:
    """Whether a row's column holds a value (a CSV row's empty cell does not)."""
    return value is not None and not (isinstance(value, str) and not value.strip())


def _number(index: int, key: str, value: Any, default: float | None) -> float:
    """A row's numeric column (a JSON number or a CSV string) as a float; `default` when empty."""
    if not _given(value) and default is not None:
        return float(default)
    try:
        if isinstance(value, bool):
            raise ValueError
        number = float(value.strip() if isinstance(value, str) else value)
        if number != number or number in (float("inf"), float("-inf")):
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(f"row {index}: {key}={value!r} is not a number") from None
    return number


def mirrored_direction(direction: str) -> str:
    """A camera direction seen in a mirror: "Left" and "Right" swapped ("LeftUp" -> "RightUp")."""
    swap = {"Left": "Right", "Right": "Left"}
    return "".join(swap.get(move, move) for move in check_direction(direction))


# the pose entries a left-right mirror negates: w2c (0, 1), (0, 2), (1, 0), (2, 0) and the x translation (0, 3)
MIRRORED_POSE_ENTRIES = (8, 9, 11, 15, 10)


def mirrored_origin(origin: Sequence[float]) -> list[float]:
    """A CameraCtrl starting pose (see `camera.py`) seen in a mirror: x flipped in the camera's frame (w2c' = S w2c S,
    S = diag(-1, 1, 1)) and the principal point cx moved to 1 - cx."""
    pose = list(check_origin(origin))
    for entry in MIRRORED_POSE_ENTRIES:
        pose[entry] = -pose[entry]
    pose[3] = 1.0 - pose[3]
    return pose


def _numbers(index: int, key: str, value: Any) -> list[float]:
    """A row's list of numbers: a JSON list, or a CSV string of numbers separated by commas or spaces."""
    items = re.split(r"[\s,]+", value.strip(" []")) if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise ConfigError(f"row {index}: {key}={value!r} is not a list of numbers")
    return [_number(index, key, item, None) for item in items if not (isinstance(item, str) and not item)]


def _dit_config(config: ModelConfig) -> WanDiTConfig | WanS2VConfig | Animate2Config | DancerConfig:
    """The DiT's config from its files' header (and the `config.json` beside them); no weights are read."""
    from diffsynth.runtime.checkpoint import checkpoint_label, open_checkpoint
    from diffsynth.runtime.loading import config_json_beside, derive_config, recognise

    paths = weight_paths(config)
    state = open_checkpoint(paths)
    label = checkpoint_label(state.files)
    meta = state.meta_state_dict()
    found = [rec for rec in recognise(meta, label=label) if rec.spec.role == "dit"]
    return derive_config(found[0], meta, config_json_beside(state.files), label)


def _expert_of(config: ModelConfig, *, folders: bool = True) -> str | None:
    """ "high" / "low" when the DiT's files sit in a Wan 2.2 A14B expert folder (`high_noise_model/`,
    `low_noise_model/`, diffusers' `transformer_2/` for the low one), as the pipeline routes them; else None.
    With `folders`, a path that is itself such a folder counts too (the pipeline's routing looks only at the
    folders holding files)."""
    if config.path is not None:
        paths = [config.path] if isinstance(config.path, str) else list(config.path)
        places = [Path(p).parent.name for p in paths]
        places += [Path(p).name for p in paths if folders and Path(p).is_dir()]
    else:
        pattern = config.origin_file_pattern
        places = [os.path.dirname(p) for p in ([pattern] if isinstance(pattern, str) else pattern or [])]
    where = " ".join(places)
    if re.search(r"low_noise|transformer_2", where):
        return "low"
    return "high" if "high_noise" in where else None


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


__all__ = ["EXPERT_BOUNDARY", "ExpertScheduler", "WanTrainingTask"]
