"""`WanVideoPipeline`: Wan 2.1 / 2.2 text-to-video, image-to-video, first-last-frame and video-to-video.

Stages: encode prompts (umT5, zero-padded to 512 tokens) -> image conditions (CLIP features and the
VAE latent of the first/last frame, as the authors build them) -> prepare latents (seeded noise, or
the noised input video) -> denoise (Euler on the Wan sigma template; the Wan 2.2 A14B models hand
over from the high-noise expert `dit` to the low-noise expert `dit2` below `switch_DiT_boundary`)
-> decode (the causal video VAE). `wan_velocity` is the per-step model call; the trainer reuses it.

How each DiT is conditioned follows its `model_type` (the authors' label):
- "t2v": text only;
- "i2v": `y` = 4 mask channels (which frames are given) + the VAE latent of the given frames with
  zeros elsewhere, concatenated to the noise on channels; Wan 2.1 I2V/FLF2V also take CLIP features
  of the given frames (`has_image_input`);
- "ti2v" (Wan2.2-TI2V-5B): an optional first frame replaces the first latent frame, which is given
  timestep 0 token by token and restored after every step.

VACE DiTs (text-to-video with a control branch) also take `vace_video` / `vace_video_mask` /
`vace_reference_image` (see `vace.py`); Wan Fun Control DiTs `control_video` and `reference_image`
(see `fun_control.py`); Wan2.2-Animate DiTs the character `input_image` with `animate_pose_video`,
`animate_face_video` and, to replace a person, `animate_inpaint_video` / `animate_mask_video`, made in
overlapping segments (see `animate.py`); Wan-Dancer DiTs `wantodance_*` (music, keyframes; see `dancer.py`);
the Wan2.2-S2V DiT the person's `input_image` with `input_audio` (or `audio_embeds`), optionally
`s2v_pose_video` and, to continue a video, `motion_video` (see `s2v.py`); with the Video-As-Prompt expert (`vap`)
beside a Wan 2.1 I2V DiT, a reference video `vap_video` with its caption `vap_prompt` (see `video_as_prompt.py`).
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image

from diffsynth.runtime.checkpoint import shard_groups
from diffsynth.runtime.dtypes import parse_device
from diffsynth.runtime.errors import ConfigError, preview
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.media import load_frames, load_image, pil_to_tensor, tensor_to_output
from diffsynth.runtime.parallel import describe_parallel, shared_seed
from diffsynth.runtime.pipeline import (
    WEIGHT_SUFFIXES,
    BasePipeline,
    accepts_tea_cache,
    describe_config,
    finite_number,
    folder_defaults,
    weight_paths,
)
from diffsynth.runtime.schedulers import make_scheduler
from diffsynth.runtime.schedulers.templates import check_steps
from diffsynth.runtime.vram import module_dtype

from .animate import (
    check_animate_inputs,
    fit_character,
    frames_tensor,
    reflect_pad,
    segment_condition,
    segment_noise,
    segment_starts,
)
from .animate2 import WanAnimate2DiT, check_animate2_arguments, generate_animate2
from .camera import camera_control_input, check_direction, check_origin, check_speed
from .dancer import WanDancerDiT, check_dancer_arguments, check_dancer_size, decode_latents, generate_dancer
from .fun_control import control_channels, control_y, encode_control_video, zero_clip
from .image_encoder import encode_image
from .longcat import LongCatVideoDiT, check_longcat_arguments, generate_longcat
from .s2v import WanS2VDiT, check_s2v_call, generate_s2v
from .sliding_window import SlidingWindows, check_conditions
from .text_encoder import encode_prompts
from .vace import VaceControl, check_vace_channels, prepare_vace
from .video_as_prompt import VapInputs, check_vap_call, encode_vap, fit_expert_layers, vap_velocity

logger = logging.getLogger(__name__)

ImageInput = str | os.PathLike | Image.Image
MASK_CHANNELS = 4  # the I2V mask: one channel per frame folded into each latent frame (temporal compression 4)


@dataclass
class WanConditions:
    """What a denoiser call needs besides latents and timestep: text states `[B, 512, 4096]`, CLIP
    features `[B, 257 or 514, 1280]` (Wan 2.1 I2V / FLF2V, Fun), the extra input channels `y` (I2V;
    Fun Control: the control latent first), a VACE DiT's control context `[B, 96, F, H, W]` with its
    scale, a Fun DiT's reference image latent `[B, 16, 1, H, W]`, and an Animate DiT's pose latent
    `[B, 16, F - 1, H, W]` and face crops `[B, 3, 4 (F - 1) - 3, 512, 512]`, and a speed-control model's
    modulation offset `[B, 6, dim]`."""

    context: torch.Tensor
    clip_feature: torch.Tensor | None = None
    y: torch.Tensor | None = None
    vace_context: torch.Tensor | None = None
    vace_scale: float | tuple[float, ...] = 1.0
    reference_latents: torch.Tensor | None = None
    pose_latents: torch.Tensor | None = None
    face_pixel_values: torch.Tensor | None = None
    camera_latents: torch.Tensor | None = None
    motion_modulation: torch.Tensor | None = None
    vap: VapInputs | None = None  # Video-As-Prompt's reference inputs (run through `vap_velocity`, not extras)

    def extras(self) -> dict:
        """The DiT's keyword inputs besides the text (the ones given)."""
        given = {"clip_feature": self.clip_feature, "y": self.y, "reference_latents": self.reference_latents}
        given.update(pose_latents=self.pose_latents, face_pixel_values=self.face_pixel_values)
        given.update(camera_latents=self.camera_latents, motion_modulation=self.motion_modulation)
        if self.vace_context is not None:
            given.update(vace_context=self.vace_context, vace_scale=self.vace_scale)
        return {k: v for k, v in given.items() if v is not None}


def wan_velocity(
    dit,
    x: torch.Tensor,
    timestep: torch.Tensor,
    context: torch.Tensor,
    clip_feature: torch.Tensor | None = None,
    y: torch.Tensor | None = None,
    **extras,
) -> torch.Tensor:
    """Flow velocity (noise - clean) predicted by a Wan DiT, in float32.

    `timestep` is `1000 * sigma`, `[B]` or per token `[B, tokens]` (TI2V); it stays float32 (the
    authors embed it in full precision). Everything else runs in the DiT's weight dtype; `extras` are
    the DiT's other keyword inputs (`vace_context`, `vace_scale`, `reference_latents`).
    """
    dtype = module_dtype(dit)
    inputs = {"clip_feature": clip_feature, "y": y, **extras}
    out = dit(
        x.to(dtype),
        timestep.to(device=x.device, dtype=torch.float32),
        context.to(dtype),
        **{k: v.to(dtype) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()},
    )
    return out.float()


class WanVideoPipeline(BasePipeline):
    """Wan video generation, API compatible with DiffSynth-Studio's `WanVideoPipeline`."""

    family = "wan"
    # Both Wan 2.2 A14B experts have the role "dit": `_load_config` sends the low-noise one to `dit2`.
    model_slots = {
        "dit": "dit",
        "dit2": "dit",
        "vae": "vae",
        "text_encoder": "text_encoder",
        "image_encoder": "image_encoder",
        "audio_encoder": "audio_encoder",  # Wan2.2-S2V's wav2vec2
        "motion_controller": "motion_controller",  # DiffSynth-Studio's speed control
        "vap": "vap",  # Video-As-Prompt's MoT expert (beside the Wan2.1-I2V-14B DiT)
    }
    optional_slots = ("dit2", "image_encoder", "audio_encoder", "motion_controller", "vap")
    slot_specs = {
        "dit": ("wan_dit", "wan_s2v_dit", "wan_animate2_dit", "wan_dancer_dit", "longcat_video_dit"),
        "dit2": ("wan_dit", "wan_s2v_dit", "wan_animate2_dit", "wan_dancer_dit", "longcat_video_dit"),
        "vae": ("wan21_vae", "wan22_vae"),
        "text_encoder": ("umt5_encoder",),
        "image_encoder": ("clip_vision",),
    }
    stage_order = (
        "audio_encoder", "text_encoder", "image_encoder", "vae", "motion_controller", "dit", "vap", "dit2", "vae"
    )  # fmt: skip
    size_multiple = 16  # set per model after loading: VAE compression x patch size

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, model_id_or_configs=None, **kwargs):
        """As `BasePipeline.from_pretrained`; a local folder in the Wan hub layout is also accepted.

        In a folder (e.g. `./models/Wan-AI/Wan2.1-T2V-1.3B`), each `.pth` at the root is one model,
        the `.safetensors` of a folder one (possibly sharded) model, subfolders such as
        `high_noise_model/` and `low_noise_model/` (or diffusers-style `transformer/`, `vae/`, ...)
        hold one model each, and the tokenizer is `google/umt5-xxl/` (or `tokenizer/`). A folder
        named like a preset (`Org/Name`) gets that preset's defaults. DiffSynth-Studio's `audio_processor_config`
        (Wan2.2-S2V's wav2vec2 preprocessor folder) is accepted and not needed: the waveform normalisation it
        configures is done by `audio_encoder.py`.
        """
        kwargs.pop("audio_processor_config", None)
        if isinstance(model_id_or_configs, (str, os.PathLike)) and Path(model_id_or_configs).is_dir():
            folder = Path(model_id_or_configs)
            configs, tokenizer = folder_model_configs(folder)
            kwargs["model_configs"] = [*configs, *kwargs.get("model_configs", ())]
            kwargs["tokenizer_config"] = kwargs.get("tokenizer_config") or tokenizer
            pipe = super().from_pretrained(None, **kwargs)
            pipe.defaults.update(cls._folder_preset_defaults(folder))
            pipe.defaults.update(folder_defaults(folder))
            return pipe
        return super().from_pretrained(model_id_or_configs, **kwargs)

    @classmethod
    def _folder_preset_defaults(cls, folder: Path) -> dict:
        name = f"{folder.resolve().parent.name}/{folder.resolve().name}"
        try:
            return dict(cls._preset(name).defaults)
        except ConfigError:
            return {}

    def _load_config(self, config: ModelConfig) -> None:
        """Load as the base class does, routing a DiT to `dit` or `dit2` (the A14B low-noise expert).

        A DiT from a `low_noise_model/` (or diffusers `transformer_2/`) folder goes to `dit2`, one
        from `high_noise_model/` to `dit`; otherwise the first DiT is `dit` and the next `dit2`, as
        in DiffSynth-Studio (list the high-noise expert first).
        """
        slot = self._dit_slot(config)
        self.model_slots = {s: r for s, r in type(self).model_slots.items() if r != "dit" or s == slot}
        try:
            super()._load_config(config)
        finally:
            del self.model_slots  # back to the class mapping
        if self.vap is not None and self.model_configs.get("vap") is config:  # its DiT layers are in the key names
            fit_expert_layers(self.vap, weight_paths(config), self.dit)
        one_model = (WanDancerDiT, WanAnimate2DiT, WanS2VDiT)
        if self.dit2 is not None and (isinstance(self.dit, one_model) or isinstance(self.dit2, one_model)):
            raise ConfigError(
                f"two DiTs were given ({type(self.dit).__name__}, {type(self.dit2).__name__}): only Wan 2.2 A14B "
                "runs two (its experts). Wan-Dancer's global and local DiTs, and Animate-2 and its distilled DiT, "
                "are separate models: load one (e.g. the presets Wan-AI/Wan-Dancer-14B:global / :local, "
                "Wan-AI/Wan2.2-Animate-2-14B / :distilled, or ModelConfigs naming one file)"
            )
        self._check_latent_channels()

    def _check_latent_channels(self) -> None:
        """Refuse a VAE whose latents the DiT does not make (Wan 2.1's 16 channels vs Wan2.2-TI2V-5B's 48) when
        loading, not at the call, where the mismatch would read as a missing `y`."""
        if self.vae is None:
            return
        z_dim = getattr(self.vae, "z_dim", None)
        for slot in ("dit", "dit2"):
            made = _latent_channels(getattr(self, slot))
            if z_dim is None or made is None or made == z_dim:
                continue
            variant = getattr(getattr(self.vae, "config", None), "variant", None)
            whose = f"Wan {variant}'s" if variant else "a Wan VAE"
            raise ConfigError(
                f"the VAE ({describe_config(self.model_configs['vae'])}) is {whose} ({z_dim} latent channels) but the "
                f"{slot} ({describe_config(self.model_configs[slot])}) makes {made}-channel latents"
                f"{_VAE_FOR_CHANNELS.get(made, f' (use a VAE with {made} latent channels)')}"
            )

    def _dit_slot(self, config: ModelConfig) -> str:
        if config.path is not None:
            places = [Path(p).parent.name for p in ([config.path] if isinstance(config.path, str) else config.path)]
        else:
            pattern = config.origin_file_pattern
            places = [os.path.dirname(p) for p in ([pattern] if isinstance(pattern, str) else pattern or [])]
        where = " ".join(places)
        if re.search(r"low_noise|transformer_2", where):
            return "dit2"
        if "high_noise" in where:
            return "dit"
        return "dit" if self.dit is None else "dit2"

    # ------------------------------------------------------------------ generation
    @accepts_tea_cache
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        input_image: ImageInput | Sequence[ImageInput] | None = None,
        end_image: ImageInput | Sequence[ImageInput] | None = None,
        input_video: Sequence[ImageInput] | None = None,
        denoising_strength: float = 1.0,
        seed: int | None = None,
        rand_device: str = "cpu",
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        cfg_scale: float | None = None,
        cfg_scale_2: float | None = None,
        cfg_merge: bool = False,
        switch_DiT_boundary: float | None = None,
        num_inference_steps: int | None = None,
        sigma_shift: float | None = None,
        sigmas: Sequence[float] | torch.Tensor | None = None,
        sampler: str | None = None,
        latents: torch.Tensor | None = None,
        max_sequence_length: int = 512,
        tiled: bool | None = None,
        tile_size: int | tuple[int, int] | None = None,
        tile_stride: int | tuple[int, int] | None = None,
        output_type: str = "pil",
        progress_bar: bool = True,
        tea_cache_l1_thresh: float | None = None,
        tea_cache_model_id: str = "",
        vace_video: Sequence[ImageInput] | str | os.PathLike | None = None,
        vace_video_mask: Sequence[ImageInput] | str | os.PathLike | Image.Image | None = None,
        vace_reference_image: ImageInput | Sequence[ImageInput] | None = None,
        vace_scale: float | Sequence[float] = 1.0,
        control_video: Sequence[ImageInput] | str | os.PathLike | None = None,
        reference_image: ImageInput | None = None,
        animate_pose_video: Sequence[ImageInput] | str | os.PathLike | None = None,
        animate_face_video: Sequence[ImageInput] | str | os.PathLike | None = None,
        animate_inpaint_video: Sequence[ImageInput] | str | os.PathLike | None = None,
        animate_mask_video: Sequence[ImageInput] | str | os.PathLike | None = None,
        animate_overlap_frames: int = 1,
        camera_control_direction: str | None = None,
        camera_control_speed: float | None = None,
        camera_control_origin: Sequence[float] | None = None,
        input_audio=None,
        audio_sample_rate: int = 16000,
        audio_embeds: torch.Tensor | None = None,
        s2v_pose_video: Sequence[ImageInput] | str | os.PathLike | None = None,
        s2v_pose_latents: torch.Tensor | None = None,
        motion_video: torch.Tensor | Sequence[ImageInput] | str | os.PathLike | None = None,
        sliding_window_size: int | None = None,
        sliding_window_stride: int | None = None,
        motion_bucket_id: float | None = None,
        animate2_reference_image: ImageInput | None = None,
        animate2_reference_video: Sequence[ImageInput] | str | os.PathLike | None = None,
        animate2_prompt_ref: str | None = None,
        animate2_refert_images: Sequence[ImageInput] | str | os.PathLike | None = None,
        animate2_offload_kv: bool | None = None,
        animate2_log_scale: float | None = None,
        wantodance_music_path: str | os.PathLike | None = None,
        wantodance_music_feature: torch.Tensor | None = None,
        wantodance_reference_image: ImageInput | None = None,
        wantodance_fps: float | None = None,
        wantodance_keyframes: Sequence[ImageInput] | str | os.PathLike | None = None,
        wantodance_keyframes_mask: Sequence[int] | torch.Tensor | None = None,
        framewise_decoding: bool | None = None,
        longcat_video: Sequence[ImageInput] | str | os.PathLike | None = None,
        longcat_distill: bool | None = None,
        vap_video: Sequence[ImageInput] | str | os.PathLike | None = None,
        vap_prompt: str | Sequence[str] | None = None,
        negative_vap_prompt: str | Sequence[str] | None = None,
    ):
        """Generate videos: a list of PIL frames for one prompt (a list of such lists for a list of
        prompts); "np" gives `[B, F, H, W, 3]` and "pt" `[B, 3, F, H, W]`, floats in [0, 1].

        `negative_prompt` None means the preset's (the authors' negative prompt), else "" (no text).
        `input_image` is the first frame (I2V, TI2V), `end_image` the last (FLF2V); `input_video` (a video file
        or a list of frames) with `denoising_strength` < 1 starts from that video noised (video-to-video) and runs
        the last `int(num_inference_steps * denoising_strength)` steps, as diffusers' `WanVideoToVideoPipeline`.
        `num_frames` is rounded to 4k + 1 and height/width to the model's multiple, with a warning. `cfg_scale`
        guides the (high-noise) `dit`, `cfg_scale_2` the low-noise expert `dit2` (default: `cfg_scale` when that
        is given, else the preset's). `switch_DiT_boundary` is the t / 1000 below which `dit2` takes over, in
        [0, 1] (without a preset: 0.9 for Wan2.2-I2V-A14B's experts, else 0.875).
        `cfg_merge` runs the two guidance branches as one batch (always so under batch parallelism).
        `latents` is the initial noise `[B, z, 1 + (F-1)/4, H/s, W/s]`; `sigmas` an explicit schedule (N
        values, the terminal 0 is appended). `sampler` "euler" (default, as DiffSynth-Studio) or "unipc" (the
        authors' multistep solver, on their UniPC grid from 1 - 1/1000). `tiled`, `tile_size`, `tile_stride`
        (latent cells) are passed to the VAE. `tea_cache_l1_thresh` turns on TeaCache for this call with the polynomial of
        `tea_cache_model_id` (DiffSynth-Studio's arguments; see `enable_tea_cache`).
        VACE DiTs: `vace_video` (frames or a file) is the control video, `vace_video_mask` (frames, a
        file, or one image for all frames; white = generate, black = keep) says what to repaint,
        `vace_reference_image` (one or several) shows subjects to put in the video, and `vace_scale`
        (one number or one per VACE layer) weighs the control. Wan Fun Control DiTs: `control_video`
        (frames or a file: pose, depth, edges...) is followed, `reference_image` shows the subject (DiTs
        with `ref_conv`); `input_image` is optional there. Wan2.2-Animate DiTs: `input_image` is the character,
        `animate_pose_video` and `animate_face_video` (frames or files, one face crop per pose frame) drive it,
        and `animate_inpaint_video` (the background) with `animate_mask_video` (white = the person to replace)
        switch to replacement; the video has the pose video's length, made in segments of `num_frames - 4`
        frames, each later one continuing from the last `animate_overlap_frames` frames of the one before.
        Wan Fun Control-Camera DiTs animate `input_image` along a camera move (DiffSynth-Studio's arguments, see
        `camera.py`): `camera_control_direction` ("Left", "Right", "Up", "Down", "In", "Out" or combinations such
        as "LeftUp"), `camera_control_speed` (per frame, default 1/54) and `camera_control_origin` (the first pose).
        Wan2.2-S2V: `input_image` is the person, `input_audio` (a waveform `[N]` / `[C, N]` at `audio_sample_rate`,
        or an audio file) drives the clip, or `audio_embeds` (one clip's features from `audio_encoder.audio_clips`);
        `s2v_pose_video` (frames or a file) or `s2v_pose_latents` adds a pose; `motion_video` (the frames before
        the clip: a list / file, or DiffSynth-Studio's `[1, 3, T, H, W]` tensor in [-1, 1]) continues a video. The
        clip has `num_frames` frames: the context frame (the image, or motion_video's last) and `num_frames - 1`
        new ones.
        `sliding_window_size` / `sliding_window_stride` (latent frames, DiffSynth-Studio's arguments) run the DiT on
        overlapping windows of the latents, blended where they overlap (`sliding_window.py`): for videos longer than
        the DiTs were trained on. Text-, image-to-video and Fun Control; not with VACE, Animate, Control-Camera,
        S2V or a step cache.
        `motion_bucket_id` sets the speed of the motion with DiffSynth-Studio's speed-control model
        (`DiffSynth-Studio/Wan2.1-1.3b-speedcontrol-v1`, loaded beside Wan2.1-T2V-1.3B): 0 slow, 100 fast.
        Wan2.2-Animate-2 (DiffSynth-Studio's arguments, see `animate2.py`): `animate2_reference_image` (the character)
        moves like the person of `animate2_reference_video` (frames or a file, at least `num_frames` long), described
        by `animate2_prompt_ref` (default " "); `animate2_refert_images` are the clip's given first frames (the
        previous clip's last ones); `animate2_offload_kv` keeps the driving video's keys/values on the CPU;
        `animate2_log_scale` (the distilled preset's -1.3) weighs attention to the first video frame.
        Wan-Dancer (DiffSynth-Studio's arguments, see `dancer.py`): `wantodance_music_path` (an audio file as long as
        the video; needs librosa) or `wantodance_music_feature` (its `[frames, 35]` features, 30 a second) is the
        music, `wantodance_reference_image` the dancer, `wantodance_keyframes` (`num_frames` frames: the keyframes,
        black elsewhere) with `wantodance_keyframes_mask` (1 at the keyframes) the given frames, `wantodance_fps` the
        frame rate (7.5: the global model's keyframes; 30: the local model's video). `framewise_decoding` decodes each
        latent frame on its own (the global model's keyframes: one image per latent frame). `tiled` (default True, or
        the preset's) tiles the VAE.
        LongCat-Video (see `longcat.py`): `input_image` is the first frame (I2V); `longcat_video` (4n + 1 frames or a
        file) opens the clip, which continues it to `num_frames`. `longcat_distill` (the `:distill` preset's
        default) samples on the distilled grid, for the authors' cfg_step LoRA (16 steps, `cfg_scale` 1).
        Video-As-Prompt (the `vap` expert, preset ByteDance/Video-As-Prompt-Wan2.1-14B; see `video_as_prompt.py`):
        `vap_video` (frames or a file; `num_frames` of them spread evenly over it, resized to the output size) is the
        reference whose semantics (effect, motion, style, camera) the video of `input_image` takes on, `vap_prompt`
        its caption (default " "), `negative_vap_prompt` the negative branch's (default: the negative prompt).
        """
        negative = self.setting("negative_prompt", negative_prompt, "")
        prompts, negatives = self.check_prompt_pair(prompt, negative)
        if output_type not in ("pil", "np", "pt"):
            raise ConfigError(f"output_type={output_type!r} is not accepted; use 'pil', 'np' or 'pt'")
        steps = check_steps(self.setting("num_inference_steps", num_inference_steps, 50))
        if input_video is None and denoising_strength != 1.0:  # an input_image is a first frame, never noised
            raise ConfigError(
                f"denoising_strength={denoising_strength!r} is how far video-to-video moves from input_video, and "
                "none is given: pass input_video or leave denoising_strength at 1.0"
            )
        text_len = getattr(self.dit.config, "text_len", None) or 512  # the DiT pads the prompt to it
        if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int):
            raise ConfigError(f"max_sequence_length={max_sequence_length!r} is not accepted; use an integer")
        if not 1 <= max_sequence_length <= text_len:
            raise ConfigError(
                f"max_sequence_length={max_sequence_length} must be in 1..{text_len} (the DiT's text_len)"
            )
        shift = finite_number(self.setting("sigma_shift", sigma_shift, 5.0), "sigma_shift")
        scale = finite_number(self.setting("cfg_scale", cfg_scale, 5.0), "cfg_scale")
        expert = {"cfg_scale_2": cfg_scale_2, "switch_DiT_boundary": switch_DiT_boundary}
        if self.dit2 is None and any(value is not None for value in expert.values()):
            given = " and ".join(name for name, value in expert.items() if value is not None)
            raise ConfigError(
                f"{given}: only a Wan 2.2 A14B pipeline has the low-noise expert (dit2) it sets, and this one has one "
                "DiT; drop the argument"
            )
        if cfg_scale_2 is None:  # an explicit cfg_scale applies to both experts, as in DiffSynth-Studio
            cfg_scale_2 = scale if cfg_scale is not None else self.defaults.get("cfg_scale_2", scale)
        scale_2 = finite_number(cfg_scale_2, "cfg_scale_2")
        boundary = check_boundary(self.setting("switch_DiT_boundary", switch_DiT_boundary, self.default_boundary()))
        sampler = str(self.setting("sampler", sampler, "euler"))
        make_scheduler("wan", sampler)  # an unknown sampler is refused before any work
        self.size_multiple = self.vae.spatial_compression * max(self.dit.config.patch_size[1:])
        if isinstance(self.dit, WanDancerDiT):  # refused rather than rounded: the keyframes are at the video's size
            check_dancer_size(
                self.setting("height", height, 480), self.setting("width", width, 832), self.size_multiple
            )
        height, width = self.check_size(self.setting("height", height, 480), self.setting("width", width, 832))
        frames = self.check_num_frames(self.setting("num_frames", num_frames, 81))
        vae_kwargs = {"tiled": bool(self.setting("tiled", tiled, True))}
        framewise = bool(self.setting("framewise_decoding", framewise_decoding, False))
        vae_kwargs.update({k: v for k, v in (("tile_size", tile_size), ("tile_stride", tile_stride)) if v is not None})
        animate = (animate_pose_video, animate_face_video, animate_inpaint_video, animate_mask_video)
        s2v = dict(input_audio=input_audio, audio_embeds=audio_embeds, s2v_pose_video=s2v_pose_video,
                   s2v_pose_latents=s2v_pose_latents, motion_video=motion_video)  # fmt: skip
        windows = SlidingWindows.from_arguments(sliding_window_size, sliding_window_stride)
        if windows is not None and self.step_caches():
            raise ConfigError(
                "sliding windows change the DiT's input from call to call, which a step cache (TeaCache, first-block "
                "cache) compares: disable it for this call"
            )
        animate2 = dict(animate2_reference_image=animate2_reference_image, animate2_prompt_ref=animate2_prompt_ref,
                        animate2_reference_video=animate2_reference_video, animate2_log_scale=animate2_log_scale,
                        animate2_refert_images=animate2_refert_images, animate2_offload_kv=animate2_offload_kv)  # fmt: skip
        dancer = dict(wantodance_music_path=wantodance_music_path, wantodance_music_feature=wantodance_music_feature,
                      wantodance_reference_image=wantodance_reference_image, wantodance_fps=wantodance_fps,
                      wantodance_keyframes=wantodance_keyframes, wantodance_keyframes_mask=wantodance_keyframes_mask)  # fmt: skip
        # the inputs of the other modes, which a one-mode DiT (Wan-Dancer, Animate-2) refuses by name
        others = dict(input_image=input_image, end_image=end_image, input_video=input_video, vace_video=vace_video,
                      vace_video_mask=vace_video_mask, vace_reference_image=vace_reference_image,
                      control_video=control_video, reference_image=reference_image,
                      camera_control_direction=camera_control_direction, motion_bucket_id=motion_bucket_id,
                      sliding_window_size=sliding_window_size, sliding_window_stride=sliding_window_stride, **s2v,
                      **dict(zip(("animate_pose_video", "animate_face_video", "animate_inpaint_video",
                                  "animate_mask_video"), animate, strict=True)))  # fmt: skip
        vap_refused = dict(others, input_video=None, longcat_video=longcat_video, longcat_distill=longcat_distill,
                           **animate2, **dancer)  # fmt: skip
        vap_refused.pop("input_image")
        use_vap = check_vap_call(self, vap_video, vap_prompt, negative_vap_prompt, vap_refused, input_image)
        if isinstance(self.dit, LongCatVideoDiT) or longcat_video is not None or longcat_distill:
            taken = {k: v for k, v in {**others, **animate2, **dancer}.items() if k != "input_image"}
            taken["framewise_decoding"] = framewise_decoding or None
            check_longcat_arguments(self, taken, sampler, cfg_merge, frames)
            video = generate_longcat(
                self, prompts, negatives, input_image, longcat_video, (height, width, frames), seed, rand_device,
                latents, max_sequence_length, (steps, shift, sigmas, bool(self.setting("longcat_distill",
                longcat_distill, False))), scale, vae_kwargs, progress_bar,
            )  # fmt: skip
            return finished(video, prompt, output_type)
        if isinstance(self.dit, WanDancerDiT) or any(v is not None for v in dancer.values()):
            given = [k for k, v in dancer.items() if v is not None]
            check_dancer_arguments(self, given, {**others, **animate2}, cfg_merge)
            video = generate_dancer(
                self, prompts, negatives, wantodance_music_path, wantodance_music_feature, wantodance_reference_image,
                self.setting("wantodance_fps", wantodance_fps, 30.0), wantodance_keyframes, wantodance_keyframes_mask,
                (height, width, frames), seed, rand_device, latents, max_sequence_length, (steps, shift, sigmas, sampler), scale,
                vae_kwargs, framewise, progress_bar,
            )  # fmt: skip
            return finished(video, prompt, output_type)
        segmented = isinstance(self.dit, (WanAnimate2DiT, WanS2VDiT)) or getattr(self.dit.config, "animate", False)
        if framewise and (segmented or any(v is not None for v in (*animate2.values(), *s2v.values(), *animate))):
            raise ConfigError("framewise_decoding is for Wan-Dancer and the text / image-to-video DiTs, not Animate, "
                              "Animate-2 or S2V")  # fmt: skip
        if isinstance(self.dit, WanAnimate2DiT) or any(v is not None for v in animate2.values()):
            check_animate2_arguments(self, [k for k, v in animate2.items() if v is not None], others, cfg_merge)
            video = generate_animate2(
                self, prompts, negatives, animate2_reference_image, animate2_reference_video, animate2_prompt_ref,
                animate2_refert_images, bool(self.setting("animate2_offload_kv", animate2_offload_kv, False)),
                float(self.setting("animate2_log_scale", animate2_log_scale, 0.0)), (height, width, frames), seed,
                rand_device, latents, max_sequence_length, (steps, shift, sigmas, sampler), scale, vae_kwargs, progress_bar,
            )  # fmt: skip
            return finished(video, prompt, output_type)
        motion = self.motion_modulation(motion_bucket_id, len(prompts))
        if motion is not None and (isinstance(self.dit, WanS2VDiT) or self.dit.config.animate):
            raise ConfigError(
                "motion_bucket_id (speed control) is for text- and image-to-video DiTs, not S2V or Animate"
            )
        if isinstance(self.dit, WanS2VDiT) or any(v is not None for v in s2v.values()):
            if windows is not None:
                raise ConfigError(
                    "Wan2.2-S2V makes long videos clip by clip (motion_video): it takes no sliding windows"
                )
            if not isinstance(self.dit, WanS2VDiT):
                given = ", ".join(name for name, value in s2v.items() if value is not None)
                raise ConfigError(f"{given} need a Wan2.2-S2V model (Wan-AI/Wan2.2-S2V-14B); this DiT is not one")
            others = dict(end_image=end_image, input_video=input_video, vace_video=vace_video,
                          vace_video_mask=vace_video_mask, vace_reference_image=vace_reference_image,
                          control_video=control_video, reference_image=reference_image,
                          camera_control_direction=camera_control_direction)  # fmt: skip
            others.update(zip(("animate_pose_video", "animate_face_video", "animate_inpaint_video",
                               "animate_mask_video"), animate, strict=True))  # fmt: skip
            refused = [name for name, value in others.items() if value is not None]
            if refused:
                raise ConfigError(f"Wan2.2-S2V takes no {', '.join(refused)}")
            check_s2v_call(self, input_image, input_audio, audio_embeds, s2v_pose_video, s2v_pose_latents,
                           motion_video, frames)  # fmt: skip
            video = generate_s2v(
                self, prompts, negatives, input_image, input_audio, audio_sample_rate, audio_embeds, s2v_pose_video,
                s2v_pose_latents, motion_video, (height, width, frames), seed, rand_device, latents,
                max_sequence_length, (steps, shift, sigmas, sampler), scale, vae_kwargs, progress_bar,
            )  # fmt: skip
            return finished(video, prompt, output_type)
        if self.dit.config.animate or any(a is not None for a in animate):
            others = dict(end_image=end_image, input_video=input_video, vace_video=vace_video,
                          vace_video_mask=vace_video_mask, vace_reference_image=vace_reference_image,
                          control_video=control_video, reference_image=reference_image)  # fmt: skip
            others.update(sliding_window_size=sliding_window_size, sliding_window_stride=sliding_window_stride)
            refused = [name for name, value in others.items() if value is not None]
            if refused:
                raise ConfigError(f"Wan2.2-Animate takes no {', '.join(refused)}")
            inputs = self.check_animate(input_image, *animate, animate_overlap_frames, frames)
            video = self.generate_animate(
                inputs, input_image, prompts, negatives, height, width, frames, seed, rand_device, latents,
                max_sequence_length, (steps, shift, sigmas, sampler), (scale, scale_2, boundary, cfg_merge),
                vae_kwargs, progress_bar,
            )  # fmt: skip
            return finished(video, prompt, output_type)
        first, last = self.check_images(input_image, end_image, len(prompts), control_video)
        camera = self.check_camera(camera_control_direction, first, camera_control_speed, camera_control_origin)
        reference = self.check_reference(reference_image)
        vace_scale = self.check_vace(vace_video, vace_video_mask, vace_reference_image, vace_scale)
        use_cfg = scale != 1.0 or (self.dit2 is not None and scale_2 != 1.0)

        # 1. prompts
        self.load_models_to_device(["text_encoder"])
        context = self.encode_prompt(prompts, max_sequence_length)
        negative_context = self.encode_prompt(negatives, max_sequence_length) if use_cfg else None

        # 2. image conditions (CLIP features, I2V channels, the TI2V first-frame latent; Fun: the control
        # latent in y, the reference image's CLIP features and latent)
        clip_images = ([reference] * len(prompts), None) if reference is not None else (first, last)
        clip_feature = self.encode_clip(*clip_images, height, width)
        if first is not None or control_video is not None or reference is not None:
            self.load_models_to_device(["vae"])
        y = self.encode_frames(first, last, len(prompts), frames, height, width, vae_kwargs)
        if control_video is not None:
            control = encode_control_video(self, control_video, len(prompts), frames, height, width, vae_kwargs)
            y = control_y(control, y, self.dit.config.in_dim - self.dit.config.out_dim - control.shape[1])
            if clip_feature is None and self.dit.config.has_image_input:
                clip_feature = zero_clip(len(prompts), self.dit.config, self.device)
        reference_latents = self.encode_reference(reference, len(prompts), height, width, vae_kwargs)
        first_latent = self.encode_first_latent(first, len(prompts), height, width, vae_kwargs)
        vace = None
        if vace_scale is not None:
            self.load_models_to_device(["vae"])
            vace = prepare_vace(
                self, vace_video, vace_video_mask, vace_reference_image, vace_scale, frames, height, width, vae_kwargs
            )
        cond = WanConditions(context, clip_feature, y, reference_latents=reference_latents, motion_modulation=motion)
        if camera is not None:
            rays = camera_control_input(camera_control_direction, frames, height, width, *camera)
            cond = replace(cond, camera_latents=rays.to(self.device).expand(len(prompts), -1, -1, -1, -1))
        if vace is not None:
            cond = replace(cond, vace_context=vace.context.expand(len(prompts), -1, -1, -1, -1), vace_scale=vace.scale)
        uncond = replace(cond, context=negative_context) if use_cfg else None
        if use_vap:
            vap_texts = (" " if vap_prompt is None else vap_prompt, negatives if negative_vap_prompt is None
                         else negative_vap_prompt)  # fmt: skip
            vap, negative_vap = encode_vap(
                self, vap_video, *vap_texts, len(prompts), (height, width, frames), vae_kwargs, use_cfg,
                max_sequence_length,
            )  # fmt: skip
            cond = replace(cond, vap=vap)
            uncond = replace(uncond, vap=negative_vap) if use_cfg else None
        if windows is not None:
            check_conditions(cond)

        # 3. schedule and latents
        scheduler = make_scheduler("wan", sampler)
        scheduler.set_timesteps(steps, sigmas=sigmas, shift=shift, **sampler_grid(sampler))
        if input_video is not None:
            keep_video_to_video_steps(scheduler, denoising_strength)
        x = self.prepare_latents(
            len(prompts), frames, height, width, seed, rand_device, latents, input_video, scheduler, vae_kwargs, vace
        )

        # 4. denoise (VACE reference frames lead the latents and are dropped after)
        x = self.denoise(
            x, scheduler, cond, uncond, scale, scale_2, boundary, first_latent, cfg_merge, progress_bar, windows
        )
        if vace is not None:
            x = x[:, :, vace.num_references :]

        # 5. decode
        self.load_models_to_device(["vae"])
        video = decode_latents(self.vae, x.to(module_dtype(self.vae)), framewise, **vae_kwargs)
        self.load_models_to_device([])
        return finished(video, prompt, output_type)

    # ------------------------------------------------------------------ checks
    LORA_EXPERT_KEY = "diffsynth_wan_expert"  # a LoRA header's Wan 2.2 A14B expert: "high" (dit) or "low" (dit2)

    def load_lora(
        self,
        path,
        scale: float = 1.0,
        fuse: bool | None = None,
        slot: str | None = None,
        name: str | None = None,
        **diffsynth,
    ):
        """The base class's `load_lora`, with the slot of a LoRA trained on one Wan 2.2 A14B expert taken from its
        header (`diffsynth_wan_expert`, which the trainer writes): without `slot`, a low-noise expert's LoRA goes to
        `dit2` (when loaded), any other to `dit`; a `slot` naming the other expert is obeyed with a warning."""
        from diffsynth.runtime.pipeline import lora_file

        if not isinstance(path, torch.nn.Module):  # DiffSynth-Studio's form: the module given names the slot
            path = lora_file(path)
            slot = self._lora_expert_slot(path, slot)
        return super().load_lora(path, scale, fuse, "dit" if slot is None else slot, name, **diffsynth)

    def _lora_expert_slot(self, path, slot: str | None) -> str | None:
        """The slot for a LoRA whose header names the expert it was trained on (`slot` when it names none)."""
        from diffsynth.runtime.lora import read_lora_header

        expert = read_lora_header(path).get(self.LORA_EXPERT_KEY)
        if expert not in ("high", "low"):
            return slot
        trained = "dit2" if expert == "low" and self.dit2 is not None else "dit"
        if slot is None:
            return trained
        if slot in ("dit", "dit2") and slot != trained:
            logger.warning(
                "%s was trained on the %s-noise expert (%s), but load_lora(slot=%r) applies it to the other one",
                path, expert, trained, slot,
            )  # fmt: skip
        return slot

    def read_lora(self, path, slot: str = "dit"):
        """The common LoRA layouts (diffusers' module names renamed to ours: `lora.convert_wan_lora`), and
        LongCat-Video's own (`longcat.longcat_lora_to_standard`: the authors' `lora/cfg_step_lora.safetensors`; their
        refinement stage, which its other LoRA is for, is not implemented)."""
        from diffsynth.runtime.lora import read_lora, read_lora_state

        from .longcat import is_longcat_lora, longcat_lora_to_standard
        from .lora import convert_wan_lora

        if not isinstance(path, (str, os.PathLike, Mapping)):
            return convert_wan_lora(super().read_lora(path, slot))
        state, source = read_lora_state(path)
        if is_longcat_lora(state):
            state = longcat_lora_to_standard(state, source)
        return convert_wan_lora(read_lora(state, source=source))

    def cli_options(self, options: dict) -> dict:
        """The `diffsynth generate` inputs under this pipeline's names, for Wan-Dancer (other DiTs: as given).
        `--input-image` is the dancer and `--input-audio` the music file. The global model (the preset's 7.5 fps)
        starts its keyframes from the dancer, the rest black, as DiffSynth-Studio's example; the local model (30
        fps) takes the global model's keyframes as `--control-video`, one per latent frame of 7.5 fps, placed every
        `4 * 30 / 7.5` = 16th frame (the first clip; cut the music to it)."""
        if not isinstance(self.dit, WanDancerDiT):
            return options
        options = dict(options)
        if "input_image" in options:
            options["wantodance_reference_image"] = load_image(options.pop("input_image"))
        if "retake_audio" in options:  # --input-audio
            options["wantodance_music_path"] = options.pop("retake_audio")
        frames = self.check_num_frames(int(options.get("num_frames", self.defaults.get("num_frames", 81))))
        size = (
            int(options.get("width", self.defaults.get("width", 832))),
            int(options.get("height", self.defaults.get("height", 480))),
        )
        black = Image.new("RGB", size)
        fps = float(self.defaults.get("wantodance_fps", 30.0))
        if "control_video" in options:  # the local model: the global model's keyframes
            from diffsynth.runtime.media import load_video

            keys = [frame.convert("RGB").resize(size) for frame in load_video(options.pop("control_video"))]
            every = round(4 * 30.0 / 7.5)
            mask = [1 if i % every == 0 and i // every < len(keys) else 0 for i in range(frames)]
            options["wantodance_keyframes"] = [keys[i // every] if m else black for i, m in enumerate(mask)]
            options["wantodance_keyframes_mask"] = mask
        elif round(fps) != 30 and "wantodance_reference_image" in options:  # the global model
            dancer = options["wantodance_reference_image"].convert("RGB").resize(size)
            options["wantodance_keyframes"] = [dancer] + [black] * (frames - 1)
            options["wantodance_keyframes_mask"] = [1] + [0] * (frames - 1)
        return options

    def check_num_frames(self, num_frames) -> int:
        """Round to the nearest 1 + 4k (the VAE's temporal compression) with a warning."""
        tc = self.vae.temporal_compression
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
            raise ConfigError(f"num_frames={num_frames!r} is not accepted: use 1 + {tc}k frames, e.g. 81")
        rounded = max(1, (num_frames - 1 + tc // 2) // tc * tc + 1)
        if rounded != num_frames:
            logger.warning("num_frames=%d rounded to %d (1 + %dk frames)", num_frames, rounded, tc)
        return rounded

    def motion_modulation(self, motion_bucket_id, batch: int) -> torch.Tensor | None:
        """The speed-control model's modulation offset `[batch, 6, dim]` for `motion_bucket_id` (None without one)."""
        if motion_bucket_id is None:
            return None
        if isinstance(motion_bucket_id, bool) or not isinstance(motion_bucket_id, (int, float)):
            raise ConfigError(f"motion_bucket_id={motion_bucket_id!r} is not a number (0 slow ... 100 fast)")
        if self.motion_controller is None:
            raise ConfigError(
                "motion_bucket_id needs the speed-control model: add ModelConfig(model_id="
                "'DiffSynth-Studio/Wan2.1-1.3b-speedcontrol-v1', origin_file_pattern='model.safetensors')"
            )
        width, dits = self.motion_controller.config.dim, [d for d in (self.dit, self.dit2) if d is not None]
        if any(getattr(d.config, "dim", width) != width for d in dits):
            raise ConfigError(
                f"the speed-control model is for DiTs of width {width}; this DiT has dim={self.dit.config.dim} "
                "(DiffSynth-Studio/Wan2.1-1.3b-speedcontrol-v1 goes with Wan2.1-T2V-1.3B)"
            )
        self.load_models_to_device(["motion_controller"])
        ids = torch.full((batch,), float(motion_bucket_id), device=self.device)
        return self.motion_controller(ids).float()

    def check_images(self, input_image, end_image, batch: int, control_video=None):
        """The first/last frames as lists of RGB images (one per prompt), checked against the DiT's kind (and
        for `control_video`, whether the DiT is a Fun Control one)."""
        kind = self.dit.config.model_type
        fun_control = control_channels(self.dit.config) > 0
        if control_video is not None and not fun_control:
            raise ConfigError(
                "control_video needs a Wan Fun Control model (e.g. PAI/Wan2.1-Fun-V1.1-1.3B-Control); this DiT's "
                f"inputs ({self.dit.config.in_dim} channels, {kind!r}) have no place for it"
            )
        if fun_control and control_video is None:
            raise ConfigError("this Wan model is a Fun Control model: pass control_video (e.g. a pose or depth video)")
        if kind == "t2v" and (input_image is not None or end_image is not None):
            raise ConfigError(
                "this Wan model is text-to-video: it takes no input_image or end_image (use an I2V/TI2V model, "
                "or input_video with denoising_strength for video-to-video)"
            )
        if kind == "i2v" and input_image is None and not fun_control:
            raise ConfigError("this Wan model is image-to-video: pass input_image (the first frame)")
        if kind == "ti2v" and end_image is not None:
            raise ConfigError("Wan2.2-TI2V takes an input_image (first frame) but no end_image")
        if end_image is not None and self.dit.config.camera_adapter_dim:  # its y holds the first frame only
            raise ConfigError(
                "a Wan Fun Control-Camera DiT takes no end_image: it moves the camera over input_image alone"
            )
        if end_image is not None and input_image is None:  # Fun Control: y holds both frames or neither
            raise ConfigError("end_image needs input_image: the last frame is placed after a given first frame")
        if self.dit.config.image_pos_len and end_image is None:
            raise ConfigError(
                "this Wan model is first-last-frame-to-video (FLF2V): pass end_image (the last frame) too"
            )
        if self.dit.config.has_image_input and self.image_encoder is None:
            raise ConfigError(
                "this Wan I2V model needs the CLIP image encoder: add "
                "ModelConfig(..., origin_file_pattern='models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth')"
            )
        return self._image_list(input_image, batch, "input_image"), self._image_list(end_image, batch, "end_image")

    def check_vace(self, video, mask, references, scale) -> float | tuple[float, ...] | None:
        """The VACE scale (one number, or one per VACE layer) when VACE control is asked for, else None (also when
        every scale is 0: the plain call, without the reference frames DiffSynth-Studio would still denoise);
        refused for DiTs without the control branch."""
        if video is None and mask is None and references is None:
            return None
        for slot in ("dit", "dit2"):
            dit = getattr(self, slot)
            if dit is not None and not dit.config.vace_layers:
                raise ConfigError(
                    f"vace_video / vace_video_mask / vace_reference_image need a VACE model (e.g. "
                    f"Wan-AI/Wan2.1-VACE-1.3B); the loaded {slot} has no VACE blocks"
                )
        layers = len(self.dit.config.vace_layers)
        scales = list(scale) if isinstance(scale, Sequence) and not isinstance(scale, str) else [scale]
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in scales)
        if not numbers or len(scales) not in (1, layers):
            raise ConfigError(f"vace_scale={scale!r} must be a number or {layers} numbers (one per VACE layer)")
        if not all(math.isfinite(v) for v in scales):  # a NaN or infinite scale turns the whole video into NaN
            raise ConfigError(f"vace_scale={scale!r} must be finite (no NaN or infinity)")
        check_vace_channels(self.dit.config, self.vae)
        if not any(scales):  # no hint reaches the DiT: no VACE inputs at all, so the video is the plain model's
            return None
        return float(scales[0]) if len(scales) == 1 else tuple(float(v) for v in scales)

    def check_animate(self, character, pose, faces, background, mask, overlap, frames: int):
        """The Animate inputs (see `animate.check_animate_inputs`); refused for DiTs without the Animate modules."""
        if not self.dit.config.animate:
            raise ConfigError(
                "animate_pose_video / animate_face_video / animate_inpaint_video / animate_mask_video need a "
                "Wan2.2-Animate model (Wan-AI/Wan2.2-Animate-14B); this DiT has no Animate modules"
            )
        if self.dit2 is not None:
            raise ConfigError("Wan2.2-Animate is one DiT: remove the second DiT (dit2) from the pipeline")
        groups = getattr(self.dit, "parallel", None)
        if groups is not None and groups.sequence_size > 1:  # refused before the encoders run, not in the DiT
            raise ConfigError(
                f"Wan2.2-Animate does not run under {describe_parallel(groups)}: its face and motion inputs are not "
                "divided over ranks; use batch (CFG) parallelism alone (enable_parallel(sequence=1, batch=2), "
                "--cfg-parallel 2) or pipe.disable_parallel()"
            )
        if character is None or isinstance(character, (list, tuple)):
            raise ConfigError("Wan2.2-Animate needs input_image: one image of the character to animate")
        if self.image_encoder is None:
            raise ConfigError(
                "Wan2.2-Animate needs the CLIP image encoder: add "
                "ModelConfig(..., origin_file_pattern='models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth')"
            )
        segment = frames - self.vae.temporal_compression
        if segment < 1:
            raise ConfigError(
                f"num_frames={frames}: Wan2.2-Animate makes segments of num_frames - 4 frames; use at least 5 (81)"
            )
        return check_animate_inputs(pose, faces, background, mask, overlap, segment)

    def generate_animate(
        self, inputs, character, prompts, negatives, height, width, frames, seed, rand_device, latents,
        max_sequence_length, schedule, guidance, vae_kwargs, progress_bar,
    ) -> torch.Tensor:  # fmt: skip
        """Wan2.2-Animate: the video `[B, 3, F, H, W]` (F = the pose video's length), segment by segment.

        Each segment's latents are one character frame then `(num_frames - 4 - 1) / 4 + 1` video frames; the
        noise of segment k is the k-th draw of one generator seeded with `seed`, each prompt's drawn on its own
        (`segment_noise`: batching leaves a prompt's video as it is alone; `latents` gives the first segment's, for
        a one-segment video). The negative branch sees the negative prompt and blank (-1) face crops, as the
        authors'."""
        steps, shift, sigmas, sampler = schedule
        scale, scale_2, boundary, cfg_merge = guidance
        batch, segment, overlap = len(prompts), frames - self.vae.temporal_compression, inputs.overlap
        s, tc, z = self.vae.spatial_compression, self.vae.temporal_compression, self.vae.z_dim
        use_cfg = scale != 1.0
        self.load_models_to_device(["text_encoder"])
        context = self.encode_prompt(prompts, max_sequence_length)
        negative_context = self.encode_prompt(negatives, max_sequence_length) if use_cfg else None

        clip, ref_y = self.animate_character(character, batch, height, width, vae_kwargs)
        vae_dtype = module_dtype(self.vae)

        starts = segment_starts(inputs.frames, segment, overlap)
        if latents is not None and len(starts) > 1:
            raise ConfigError(f"latents gives one segment's noise; this video needs {len(starts)} segments: use seed")
        length = starts[-1] + segment
        pose, faces = reflect_pad(inputs.pose, length), reflect_pad(inputs.faces, length)
        if inputs.background is not None:
            inputs = replace(
                inputs, background=reflect_pad(inputs.background, length), mask=reflect_pad(inputs.mask, length)
            )
        shape = (batch, z, (segment - 1) // tc + 2, height // s, width // s)
        if seed is None:  # under parallel sampling every rank draws the same noise
            seed = shared_seed(self.samples_in_parallel())
        noises = segment_noise(shape, len(starts), seed, parse_device(rand_device))
        scheduler = make_scheduler("wan", sampler)
        scheduler.set_timesteps(steps, sigmas=sigmas, shift=shift, **sampler_grid(sampler))
        pieces, previous = [], None
        for start in starts:
            segment_inputs = (inputs, pose, faces, start, segment, previous)
            cond = self.animate_conditions(context, clip, ref_y, segment_inputs, batch, height, width, vae_kwargs)
            uncond = None
            if use_cfg:
                uncond = replace(
                    cond, context=negative_context, face_pixel_values=torch.full_like(cond.face_pixel_values, -1)
                )
            noise = self.check_latents(latents, shape) if latents is not None else next(noises)
            x = self.denoise(
                noise.to(self.device), scheduler, cond, uncond, scale, scale_2, boundary, None, cfg_merge, progress_bar
            )
            self.load_models_to_device(["vae"])
            previous = self.vae.decode(x[:, :, 1:].to(vae_dtype), **vae_kwargs).float()
            pieces.append(previous if start == 0 else previous[:, :, overlap:])
        self.load_models_to_device([])
        return torch.cat(pieces, dim=2)[:, :, : inputs.frames]

    def animate_character(self, character, batch: int, height: int, width: int, vae_kwargs) -> tuple:
        """Wan2.2-Animate's character conditions: its CLIP features `[B, 257, 1280]` and the first latent frame of
        `y` `[B, 4 + z, 1, h, w]` (all-given mask channels, then its latent), the image fitted to the frame."""
        character = fit_character(character, height, width)
        self.load_models_to_device(["image_encoder"])
        clip = encode_image(
            self.image_encoder, self._pixels([character], height, width, torch.float32), self.device,
            module_dtype(self.image_encoder),
        ).expand(batch, -1, -1)  # fmt: skip
        self.load_models_to_device(["vae"])
        tc = self.vae.temporal_compression
        pixels = self._pixels([character], height, width, module_dtype(self.vae))[:, :, None]
        ref_latent = self.vae.encode(pixels, **vae_kwargs)
        ref_y = torch.cat([torch.ones_like(ref_latent[:, :tc]), ref_latent], dim=1).float()
        return clip, ref_y.expand(batch, -1, -1, -1, -1)

    def animate_conditions(self, context, clip, ref_y, segment_inputs, batch, height, width, vae_kwargs):
        """One Animate segment's `WanConditions`: `segment_inputs` is (inputs, pose frames, face frames, start,
        segment, previous), the frame lists long enough for the segment; the pose latent and face crops of frames
        `start .. start + segment`, and `y` = the character frame `ref_y` then `segment_condition`."""
        inputs, pose, faces, start, segment, previous = segment_inputs
        self.load_models_to_device(["vae"])
        size = self.dit.config.motion_encoder_size
        pose_pixels = frames_tensor(pose[start : start + segment], height, width, module_dtype(self.vae), self.device)
        pose_latents = self.vae.encode(pose_pixels, **vae_kwargs).float().expand(batch, -1, -1, -1, -1)
        face_pixels = frames_tensor(faces[start : start + segment], size, size, torch.float32, self.device)
        y = segment_condition(self, inputs, start, segment, previous, batch, height, width, vae_kwargs)
        return WanConditions(
            context, clip, torch.cat([ref_y, y], dim=2), pose_latents=pose_latents,
            face_pixel_values=face_pixels.expand(batch, -1, -1, -1, -1),
        )  # fmt: skip

    def check_reference(self, reference_image) -> Image.Image | None:
        """The Fun reference image as an RGB image; refused for DiTs without `ref_conv`."""
        if reference_image is None:
            return None
        if not self.dit.config.ref_conv:
            raise ConfigError(
                "reference_image needs a Wan Fun model with a reference input (ref_conv: e.g. "
                "PAI/Wan2.1-Fun-V1.1-1.3B-Control); for VACE models use vace_reference_image"
            )
        if self.dit2 is not None and not self.dit2.config.ref_conv:
            raise ConfigError("reference_image: the low-noise expert dit2 has no ref_conv")
        return load_image(reference_image)

    @staticmethod
    def _image_list(images, batch: int, name: str) -> list[Image.Image] | None:
        if images is None:
            return None
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        if len(items) == 1:
            items = items * batch
        if len(items) != batch:
            raise ConfigError(f"{name} has {len(items)} images for {batch} prompts; give one, or one per prompt")
        return [load_image(im) for im in items]

    # ------------------------------------------------------------------ stages
    def encode_prompt(self, prompts: list[str], max_sequence_length: int = 512) -> torch.Tensor:
        if self.tokenizer is None:
            raise ConfigError(
                "WanVideoPipeline has no tokenizer: pass tokenizer_config=ModelConfig(model_id='Wan-AI/Wan2.1-T2V-1.3B', "
                "origin_file_pattern='google/umt5-xxl/')"
            )
        return encode_prompts(
            self.text_encoder, self.tokenizer, prompts, max_length=max_sequence_length, device=self.device
        )

    def _pixels(self, images: list[Image.Image], height: int, width: int, dtype: torch.dtype) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1], each image resized to the video size."""
        return pil_to_tensor(
            [im.resize((width, height), Image.BICUBIC) for im in images], dtype=dtype, device=self.device
        )

    def encode_clip(self, first, last, height: int, width: int) -> torch.Tensor | None:
        """CLIP features of the first frame `[B, 257, 1280]`, with the last frame's appended for FLF2V (the DiTs
        with CLIP positions for two images, `image_pos_len`); other I2V DiTs see the last frame in `y` only, as
        DiffSynth-Studio's `WanVideoUnit_ImageEmbedderCLIP` (`has_image_pos_emb`)."""
        if first is None or not self.dit.config.has_image_input:
            return None
        self.load_models_to_device(["image_encoder"])
        frames = [first] if last is None or not self.dit.config.image_pos_len else [first, last]
        dtype = module_dtype(self.image_encoder)
        features = [
            encode_image(self.image_encoder, self._pixels(f, height, width, torch.float32), self.device, dtype)
            for f in frames
        ]
        return torch.cat(features, dim=1)

    def encode_frames(
        self, first, last, batch: int, frames: int, height: int, width: int, vae_kwargs
    ) -> torch.Tensor | None:
        """I2V channels `y` `[B, 4 + z, T, h, w]`: which frames are given, and the latent of the video
        that holds them (zeros elsewhere), as the authors' image2video / first_last_frame2video build it."""
        if self.dit.config.model_type != "i2v" or first is None:
            return None
        expected = self.dit.config.in_dim - self.dit.config.out_dim
        if self.dit.config.camera_adapter_dim and expected == self.vae.z_dim:  # Control-Camera V1.1: no mask
            return self.first_frame_y(first, batch, frames, height, width, vae_kwargs)
        dtype = module_dtype(self.vae)
        video = torch.zeros(batch, 3, frames, height, width, dtype=dtype, device=self.device)
        video[:, :, 0] = self._pixels(first, height, width, dtype)
        given = torch.zeros(frames, device=self.device)
        given[0] = 1
        if last is not None:
            video[:, :, -1] = self._pixels(last, height, width, dtype)
            given[-1] = 1
        latent = self.vae.encode(video, **vae_kwargs).float()
        tc, (t, h, w) = self.vae.temporal_compression, latent.shape[2:]
        # the first frame stands for a whole latent frame: repeat it, then fold tc frames into channels
        given = torch.cat([given[:1].repeat(tc), given[1:]]).view(t, tc).transpose(0, 1)
        mask = given[None, :, :, None, None].expand(batch, tc, t, h, w)
        y = torch.cat([mask, latent], dim=1)
        if control_channels(self.dit.config):  # Fun Control: y is completed by `control_y`
            return y
        if y.shape[1] != expected:
            raise ConfigError(
                f"the I2V conditioning has {y.shape[1]} channels ({tc} mask + {latent.shape[1]} latent) but the DiT "
                f"takes {expected}: the VAE does not fit this DiT"
            )
        return y

    def first_frame_y(self, first, batch: int, frames: int, height: int, width: int, vae_kwargs) -> torch.Tensor:
        """`y` of the Control-Camera V1.1 DiTs (16 extra channels, no mask): the first image encoded alone as the
        first latent frame, zeros after (DiffSynth-Studio's `WanVideoUnit_FunCameraControl`)."""
        latent = self.vae.encode(self._pixels(first, height, width, module_dtype(self.vae))[:, :, None], **vae_kwargs)
        s, tc = self.vae.spatial_compression, self.vae.temporal_compression
        y = torch.zeros(batch, latent.shape[1], (frames - 1) // tc + 1, height // s, width // s, device=self.device)
        y[:, :, :1] = latent.float()
        return y

    def check_camera(self, direction, first, speed, origin) -> tuple | None:
        """A camera move for a Control-Camera DiT (which needs one, and an `input_image`); refused for others."""
        adapter = self.dit.config.camera_adapter_dim
        if direction is None:
            if speed is not None or origin is not None:
                raise ConfigError("camera_control_speed / camera_control_origin need camera_control_direction")
            if adapter:
                raise ConfigError(
                    "this Wan Fun Control-Camera DiT moves the camera along camera_control_direction: give one "
                    "('Left', 'Right', 'Up', 'Down', 'In', 'Out' or a combination such as 'LeftUp')"
                )
            return None
        if not adapter:
            raise ConfigError(
                "camera_control_direction needs a Wan Fun Control-Camera DiT (with control_adapter), e.g. "
                "PAI/Wan2.1-Fun-V1.1-1.3B-Control-Camera"
            )
        check_direction(direction)
        if first is None:
            raise ConfigError("a Wan Fun Control-Camera DiT animates input_image: give the first frame")
        return check_speed(speed), check_origin(origin)  # refused by name before any encoder runs

    def encode_reference(self, reference, batch: int, height: int, width: int, vae_kwargs) -> torch.Tensor | None:
        """A Fun reference image's latent `[B, z, 1, h, w]` (resized to the video's size), or None."""
        if reference is None:
            return None
        pixels = self._pixels([reference], height, width, module_dtype(self.vae))
        return self.vae.encode(pixels[:, :, None], **vae_kwargs).float().expand(batch, -1, -1, -1, -1)

    def encode_first_latent(self, first, batch: int, height: int, width: int, vae_kwargs) -> torch.Tensor | None:
        """TI2V: the VAE latent of the first frame `[B, z, 1, h, w]`, which replaces the first latent frame."""
        if first is None or self.dit.config.model_type != "ti2v":
            return None
        pixels = self._pixels(first, height, width, module_dtype(self.vae))
        return self.vae.encode(pixels[:, :, None], **vae_kwargs).float()

    def prepare_latents(
        self,
        batch,
        frames,
        height,
        width,
        seed,
        rand_device,
        latents,
        input_video,
        scheduler,
        vae_kwargs,
        vace: VaceControl | None = None,
    ) -> torch.Tensor:
        """Seeded noise `[B, z, R + T, h, w]` (`R` VACE reference frames first), or `input_video`'s latents
        noised to the schedule's first sigma. With references the seed's noise is drawn for `T + R` frames
        and its last `R` frames moved to the front, as DiffSynth-Studio does."""
        s, tc = self.vae.spatial_compression, self.vae.temporal_compression
        refs = 0 if vace is None else vace.num_references
        shape = (batch, self.vae.z_dim, (frames - 1) // tc + 1 + refs, height // s, width // s)
        if latents is not None:
            noise = self.check_latents(latents, shape)
        else:
            noise = self.generate_noise(shape, seed, rand_device)
            noise = torch.cat([noise[:, :, noise.shape[2] - refs :], noise[:, :, : noise.shape[2] - refs]], dim=2)
        if input_video is None:
            return noise
        video = (
            load_frames(input_video, "input_video")
            if isinstance(input_video, (str, os.PathLike))
            else list(input_video)
        )
        if len(video) < frames:
            raise ConfigError(f"input_video has {len(video)} frames, fewer than num_frames={frames}")
        self.load_models_to_device(["vae"])
        pixels = self._pixels([load_image(f) for f in video[:frames]], height, width, module_dtype(self.vae))
        clean = self.vae.encode(pixels.transpose(0, 1)[None], **vae_kwargs).float()
        if refs:
            clean = torch.cat([vace.references.to(clean.device), clean], dim=2)
        return scheduler.add_noise(clean.expand(batch, -1, -1, -1, -1), noise, scheduler.sigmas[0])

    def default_boundary(self) -> float:
        """The hand-over when no preset sets one (models loaded from ModelConfigs): 0.9 for Wan2.2-I2V-A14B's
        experts (an I2V DiT without Wan Fun's reference or camera inputs), else Wan2.2-T2V-A14B's 0.875."""
        config = self.dit.config if self.dit2 is not None else None
        if getattr(config, "model_type", None) != "i2v":
            return 0.875
        return 0.875 if getattr(config, "ref_conv", False) or getattr(config, "camera_adapter_dim", 0) else 0.9

    def denoise(
        self, x, scheduler, cond, uncond, scale, scale_2, boundary, first_latent, cfg_merge, progress_bar, windows=None
    ) -> torch.Tensor:
        """Euler steps; the high-noise `dit` runs while t >= boundary * 1000, then `dit2` (if loaded). With
        `windows` (`SlidingWindows`) each velocity is blended from the DiT's on overlapping windows of frames."""
        dit, guidance = self.dit, scale
        self.load_models_to_device(["dit", "vap"] if cond.vap is not None else ["dit"])
        if first_latent is not None:
            x = x.clone()
            x[:, :, :1] = first_latent
        for i in self.progress(range(len(scheduler.timesteps)), progress_bar):
            t = scheduler.timesteps[i]
            if self.dit2 is not None and dit is not self.dit2 and float(t) < boundary * scheduler.num_train_timesteps:
                self.load_models_to_device(["dit2"])
                dit, guidance = self.dit2, scale_2
            timestep = self.timestep_input(dit, x, t, first_latent is not None)
            negative = uncond if guidance != 1.0 else None
            if windows is None:
                velocity = self.predict(dit, x, timestep, cond, negative, guidance, cfg_merge)
            else:

                def window_velocity(xs, ts, c, u, dit=dit, guidance=guidance):
                    return self.predict(dit, xs, ts, c, u, guidance, cfg_merge)

                velocity = windows.predict(window_velocity, x, timestep, cond, negative)
            x = scheduler.step(velocity, i, x)
            if first_latent is not None:
                x[:, :, :1] = first_latent
        return x

    @staticmethod
    def timestep_input(dit, x: torch.Tensor, t: torch.Tensor, fixed_first_frame: bool) -> torch.Tensor:
        """`[B]`, or per token `[B, tokens]` with 0 on the first latent frame's tokens (TI2V with an image)."""
        batch = x.shape[0]
        t = t.to(device=x.device, dtype=torch.float32)
        if not fixed_first_frame:
            return t.expand(batch)
        pt, ph, pw = dit.config.patch_size  # pt is 1 in every Wan model: one latent frame per token frame
        per_frame = (x.shape[3] // ph) * (x.shape[4] // pw)
        tokens = torch.full((batch, (x.shape[2] // pt) * per_frame), float(t), device=x.device)
        tokens[:, :per_frame] = 0.0
        return tokens

    def predict(self, dit, x, timestep, cond: WanConditions, uncond: WanConditions | None, scale, cfg_merge):
        """One guided velocity; the negative branch uses the same image conditions as the positive one.

        Under batch parallelism (`enable_parallel(batch=2)`) the two branches always run as one batch,
        which the ranks then divide."""
        if uncond is None:
            return self.velocity(dit, x, timestep, cond)
        groups = getattr(dit, "parallel", None)
        if not cfg_merge and (groups is None or groups.batch_size == 1):
            positive = self.velocity(dit, x, timestep, cond)
            negative = self.velocity(dit, x, timestep, uncond)
            return self.guide(positive, negative, scale)

        def twice(a, b=None):
            return torch.cat([a, a if b is None else b]) if isinstance(a, torch.Tensor) else a

        negative = uncond.extras()  # the same as the positive ones but for Animate's blank face crops
        extras = {k: twice(v, negative.get(k)) for k, v in cond.extras().items()}
        context = torch.cat([cond.context, uncond.context])
        if cond.vap is not None:
            both = vap_velocity(
                dit, self.vap, twice(x), twice(timestep), context, cond.vap.merged(uncond.vap), **extras
            )
        else:
            both = wan_velocity(dit, twice(x), twice(timestep), context, **extras)
        positive, negative = both.chunk(2)
        return self.guide(positive, negative, scale)

    def velocity(self, dit, x, timestep, cond: WanConditions) -> torch.Tensor:
        """One branch's velocity: `wan_velocity`, or through the Video-As-Prompt expert when `cond.vap` is given."""
        if cond.vap is None:
            return wan_velocity(dit, x, timestep, cond.context, **cond.extras())
        return vap_velocity(dit, self.vap, x, timestep, cond.context, cond.vap, **cond.extras())


_VAE_FOR_CHANNELS = {
    16: " (Wan 2.1 and the Wan 2.2 A14B DiTs: use Wan2.1_VAE.pth)",
    48: " (Wan2.2-TI2V-5B: use Wan2.2_VAE.pth)",
}


def _latent_channels(dit) -> int | None:
    """The channels of the latents a loaded DiT denoises (None when not loaded or not known)."""
    config = getattr(dit, "config", None)
    return getattr(config, "out_dim", None) or getattr(config, "out_channels", None)


def check_boundary(value) -> float:
    """`switch_DiT_boundary` as a float in [0, 1]: t / 1000 cannot leave it, so a value outside (875 for 0.875)
    would silently run one expert for the whole schedule."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"switch_DiT_boundary={value!r} must be a number in [0, 1] (t / 1000, e.g. 0.875)")
    if not 0.0 <= value <= 1.0:  # also refuses NaN
        raise ConfigError(
            f"switch_DiT_boundary={value!r} must be in [0, 1]: the t / 1000 below which dit2 takes over (e.g. 0.875)"
        )
    return float(value)


def finished(video: torch.Tensor, prompt, output_type: str):
    """A decoded batch `[B, 3, F, H, W]` in [-1, 1] as the call returns it: frames (one video for one prompt), or
    the "np" / "pt" batch."""
    out = tensor_to_output(video.float(), output_type)
    return out[0] if isinstance(prompt, str) and output_type == "pil" else out


def keep_video_to_video_steps(scheduler, denoising_strength) -> None:
    """Keep the last `int(N * denoising_strength)` of the scheduler's N steps, as diffusers' `WanVideoToVideoPipeline`
    (`get_timesteps`) does; the runtime's image-to-image rule (skip `int(N - N * strength)`) runs one step more when
    `N * strength` is not whole. A strength that keeps no step is refused."""
    strength = denoising_strength
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not 0 < strength <= 1:
        raise ConfigError(f"denoising_strength={strength!r} is not accepted; use a number in (0, 1]")
    total = scheduler.num_inference_steps
    kept = int(total * strength)
    if kept == 0:
        raise ConfigError(
            f"denoising_strength={strength!r} with num_inference_steps={total} runs int({total} * {strength}) = 0 "
            "steps of video-to-video (diffusers' Wan rule); raise denoising_strength or num_inference_steps"
        )
    if kept < total:  # the same sigmas, as given: the tail of the full schedule
        scheduler.set_timesteps(kept, sigmas=scheduler.sigmas[total - kept :])


# ----------------------------------------------------------------------------------------- folders
def sampler_grid(sampler: str) -> dict:
    """The template settings `sampler` runs with: UniPC on the authors' UniPC grid (from 1 - 1/1000, as their
    `FlowUniPCMultistepScheduler`), Euler on the grid from 1 (their DPM++ path and DiffSynth-Studio's)."""
    return {"sigma_max": 0.999} if sampler == "unipc" else {}


def folder_model_configs(folder: Path) -> tuple[list[ModelConfig], ModelConfig | None]:
    """ModelConfigs for a local Wan repo: each `.pth`/`.bin`/`.ckpt` is one model, the `.safetensors` of one
    folder one model when they are shards (`-0000i-of-0000N` names) or the only one, else one model each; the
    tokenizer is `google/umt5-xxl/`, else a folder holding a tokenizer config."""
    configs: list[ModelConfig] = []
    for sub in [folder] + sorted(p for p in folder.iterdir() if p.is_dir()):
        files = sorted(p for p in sub.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
        for group in shard_groups([p for p in files if p.name.endswith(".safetensors")]):
            configs.append(ModelConfig(path=group if len(group) > 1 else group[0]))
        configs += [ModelConfig(path=str(p)) for p in files if not p.name.endswith(".safetensors")]
    if not configs:
        raise ConfigError(
            f"{folder} holds no weight files ({', '.join(WEIGHT_SUFFIXES)}); it contains "
            f"{preview(sorted(p.name for p in folder.iterdir()))}"
        )
    candidates = [folder / "google" / "umt5-xxl", folder / "tokenizer"]
    candidates += sorted(p.parent for p in folder.glob("*/tokenizer_config.json"))
    candidates += sorted(p.parent for p in folder.glob("*/*/tokenizer_config.json"))
    tokenizers = [p for p in candidates if (p / "tokenizer_config.json").is_file() and "xlm-roberta" not in p.name]
    return configs, ModelConfig(path=str(tokenizers[0])) if tokenizers else None


__all__ = ["WanConditions", "WanVideoPipeline", "folder_model_configs", "module_dtype", "wan_velocity"]
