"""`TrainConfig`: every setting of a training run, typed, from CLI flags, a YAML file, or Python.

The flags are the field names (`--learning_rate 1e-4`), named like DiffSynth-Studio's training scripts where
those have the setting; a YAML file (`--config run.yaml`) uses the same names as keys, and flags given on the
command line override it. Lists are written comma-separated on the command line (`--lora_target_modules
to_q,to_k`) and as lists or comma-separated strings in YAML. Every check names the flag to change.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from diffsynth.runtime.errors import ConfigError

LORA_FORMATS = ("diffsynth", "peft", "kohya")
LORA_TYPES = ("lora", "dora", "loha", "lokr")


def _arg(default: Any, help: str, group: str):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, "group": group})
    return field(default=default, metadata={"help": help, "group": group})


@dataclass
class TrainConfig:
    """One training run. Groups: model, data, adapter, optimisation, output."""

    # ------------------------------------------------------------------ model
    family: str | None = _arg(
        None,
        "model family to train (e.g. z_image), or 'module:Class' of a training task; default: the family of the "
        "--model preset, or the only installed family with a training task",
        "model",
    )
    model: str | None = _arg(None, "a preset (e.g. Tongyi-MAI/Z-Image-Turbo) or a local hub-style folder", "model")
    model_paths: list[str] = _arg([], "extra weight files or folders to load, comma-separated", "model")
    model_id_with_origin_paths: list[str] = _arg(
        [], "extra hub files as Org/Model:pattern, comma-separated (DiffSynth-Studio style)", "model"
    )
    tokenizer_path: str | None = _arg(None, "tokenizer folder (default: the preset's or the folder's)", "model")
    dtype: str = _arg("bfloat16", "dtype of the frozen models (bfloat16, float16, float32)", "model")
    task_options: dict[str, Any] = _arg(
        {},
        "settings of the family's training task as name=value, comma-separated (e.g. sigma_shift=3 for Z-Image, "
        "embedded_guidance=1 for FLUX.1); a mapping in YAML; an unknown name is an error that lists the task's",
        "model",
    )

    # ------------------------------------------------------------------ data
    dataset_base_path: str | None = _arg(
        None, "dataset folder: metadata.csv/.json/.jsonl and the files it names", "data"
    )
    dataset_metadata_path: str | None = _arg(None, "metadata file (default: metadata.* in the dataset folder)", "data")
    dataset_config: str | None = _arg(
        None,
        "several datasets in one run (in place of --dataset_base_path): a .yaml (or .toml) file listing them, each "
        "with its base_path and optionally metadata_path, repeats, loss_weight, trigger_word and its own sizes and "
        "video clips; musubi-tuner's and kohya's dataset config files read as they are (see datasets.py)",
        "data",
    )
    data_file_keys: list[str] = _arg(["image", "video"], "metadata columns that hold file paths", "data")
    max_pixels: int = _arg(
        1024 * 1024, "largest training size in pixels (height * width); larger images shrink", "data"
    )
    resolutions: list[int] = _arg(
        [],
        "train every picture at each of these sizes, e.g. 512,768,1024 (ai-toolkit's multi-resolution training): "
        "one sample per size, bucketed under size x size pixels; replaces --max_pixels",
        "data",
    )
    height: int | None = _arg(None, "fixed training height (with --width); default: buckets under --max_pixels", "data")
    width: int | None = _arg(None, "fixed training width (with --height)", "data")
    bucket_step: int = _arg(64, "bucket sizes are multiples of this many pixels", "data")
    num_frames: int = _arg(81, "frames of each video clip", "data")
    video_frame_extraction: Literal["head", "chunk", "slide", "uniform", "full"] = _arg(
        "head",
        "the clips a video trains on (musubi-tuner's names): head, its first --num_frames; chunk, all of it cut into "
        "--num_frames pieces; slide, a clip every --video_frame_stride frames; uniform, --video_frame_samples clips "
        "spread evenly from start to end; full, the whole video up to --num_frames frames (its length cut to one the "
        "video VAE encodes)",
        "data",
    )
    video_frame_stride: int | None = _arg(None, "slide: frames from one clip's start to the next's", "data")
    video_frame_samples: int = _arg(1, "uniform: clips per video", "data")
    video_fps: float | None = _arg(
        None,
        "read every video at this frame rate (frames repeated or skipped on its timeline), e.g. 16 for Wan: a 30 fps "
        "clip then moves at its real speed; default: each video's own rate",
        "data",
    )
    dataset_repeat: int = _arg(1, "times each sample is seen per epoch", "data")
    trigger_word: str | None = _arg(
        None,
        "a word every caption should hold (ai-toolkit's): [trigger] in a caption becomes it, a caption without it "
        "starts with it; the validation prompts' [trigger] too",
        "data",
    )
    caption_dropout: float = _arg(
        0.0, "chance that a row trains with an empty prompt (what classifier-free guidance contrasts with)", "data"
    )
    shuffle_caption: bool = _arg(
        False, "shuffle each caption's comma-separated tags every time its row is drawn (kohya's flag)", "data"
    )
    keep_tokens: int = _arg(
        0,
        "with --shuffle_caption / --caption_tag_dropout: a caption's first N tags stay in front, in order (kohya's; "
        "the word --trigger_word puts in front counts as one)",
        "data",
    )
    keep_tokens_separator: str | None = _arg(
        None,
        "a caption holding this (e.g. |||) keeps the tags before it in front, in order, and shuffles or drops only "
        "those after it; it is removed (kohya's)",
        "data",
    )
    caption_tag_dropout: float = _arg(
        0.0,
        "chance that each tag --keep_tokens does not keep is left out of the caption, every time its row is drawn "
        "(kohya's caption_tag_dropout_rate)",
        "data",
    )
    masked_loss: bool = _arg(
        False,
        "the loss counts where each row's mask is white: its loss_mask column (a grayscale picture; for a video "
        "row, a picture or a mask video of its frames) or, in a folder "
        "of captioned pictures, cat-masklabel.png beside cat.png; rows without one count everywhere",
        "data",
    )
    alpha_mask: bool = _arg(
        False,
        "masked loss with each picture's transparency as its mask where a row has no mask file (kohya's flag; "
        "implies --masked_loss)",
        "data",
    )
    unmasked_weight: float = _arg(
        0.0, "with --masked_loss: the loss weight where a mask is black (0: not learned at all)", "data"
    )
    flip_aug: bool = _arg(
        False,
        "mirror each row's pictures (its videos, masks and reference pictures alike) left to right with chance 1/2 "
        "(kohya's flag); the encoders run on the fly, so not with --cache_dir",
        "data",
    )
    dataset_num_workers: int = _arg(0, "data loading worker processes", "data")
    cache_dir: str | None = _arg(
        None, "cached two-stage training: folder of encoded samples (written by --stage encode)", "data"
    )
    stage: Literal["train", "encode"] = _arg(
        "train", "encode: write the encoded dataset to --cache_dir; train: train (from --cache_dir when given)", "data"
    )

    # ------------------------------------------------------------------ adapter
    trainable_models: list[str] = _arg(
        [],
        "full fine-tuning of these models (e.g. dit, or a part of it such as Wan VACE's vace); default: train a LoRA",
        "adapter",
    )
    lora_base_model: str | None = _arg(
        None, "model that gets the LoRA (default: the denoiser; a part of it such as vace)", "adapter"
    )
    lora_target_modules: list[str] = _arg(
        [], "Linear layer names the LoRA adapts, comma-separated (default: the model's own list)", "adapter"
    )
    lora_type: str = _arg(
        "lora",
        "adapter kind: lora, dora (a LoRA with learned row norms), or LyCORIS loha (Hadamard product) / lokr "
        "(Kronecker product)",
        "adapter",
    )
    lora_rank: int = _arg(32, "LoRA rank", "adapter")
    lora_alpha: float | None = _arg(None, "LoRA alpha (default: the rank, i.e. scale 1)", "adapter")
    lora_dropout: float = _arg(
        0.0, "lora / dora: dropout on each LoRA layer's input in training (peft's lora_dropout)", "adapter"
    )
    rank_dropout: float = _arg(
        0.0, "loha / lokr: chance that a rank of the change is dropped in a training step (LyCORIS's)", "adapter"
    )
    module_dropout: float = _arg(
        0.0, "loha / lokr: chance that a whole layer's change is left out of a training step (LyCORIS's)", "adapter"
    )
    lora_plus_ratio: float | None = _arg(
        None, "LoRA+: the LoRA's B (up) matrices learn this many times faster than --learning_rate (e.g. 16)", "adapter"
    )
    lokr_factor: int = _arg(
        -1, "LoKr: the size of the first Kronecker factor's sides (-1: near the square root of each side)", "adapter"
    )
    preset_lora_path: str | None = _arg(
        None, "differential LoRA: fuse this LoRA file into the frozen denoiser before training a new one", "adapter"
    )
    preset_lora_scale: float = _arg(1.0, "scale of --preset_lora_path when fused", "adapter")
    lora_checkpoint: str | None = _arg(
        None,
        "start the LoRA from this LoRA file (any layout the pipeline reads) instead of zero: go on training it "
        "(a fresh optimizer and schedule: not --resume)",
        "adapter",
    )
    lora_formats: list[str] = _arg(
        ["diffsynth"], "LoRA files to write: diffsynth, peft (ComfyUI/diffusers keys), kohya", "adapter"
    )
    trainable_dtype: str = _arg("float32", "dtype of the trained weights (fp32 master weights by default)", "adapter")
    save_dtype: str | None = _arg(None, "dtype of saved full weights (default: --dtype)", "adapter")

    # ------------------------------------------------------------------ optimisation
    optimizer: Literal["adamw", "adamw8bit", "adafactor", "prodigy"] = _arg(
        "adamw",
        "adamw (torch), adamw8bit (bitsandbytes: 8-bit moments, a quarter of AdamW's state), adafactor "
        "(transformers), prodigy (prodigyopt: give --learning_rate 1)",
        "optimisation",
    )
    optimizer_options: dict[str, Any] = _arg(
        {}, "more optimizer arguments as name=value, comma-separated (e.g. betas=0.9:0.99,eps=1e-8)", "optimisation"
    )
    learning_rate: float = _arg(1e-4, "learning rate (the optimizer's)", "optimisation")
    weight_decay: float = _arg(0.01, "weight decay (the optimizer's)", "optimisation")
    ema_decay: float | None = _arg(
        None,
        "keep an exponential moving average of the trained weights with this decay (e.g. 0.999), saved beside "
        "them as *-ema files",
        "optimisation",
    )
    lr_scheduler: Literal["constant", "linear", "cosine", "cosine_with_restarts", "polynomial"] = _arg(
        "constant",
        "learning rate after warm-up: constant, or decaying over the remaining steps (cosine_with_restarts: "
        "--lr_scheduler_num_cycles cosines; polynomial: to the power --lr_scheduler_power)",
        "optimisation",
    )
    lr_scheduler_num_cycles: int = _arg(
        1, "cosine_with_restarts: how many cosine cycles (restarts + 1)", "optimisation"
    )
    lr_scheduler_power: float = _arg(1.0, "polynomial: the power of the decay (1: linear)", "optimisation")
    lr_scheduler_min_lr_ratio: float = _arg(
        0.0, "the decaying schedules end at this fraction of --learning_rate instead of 0", "optimisation"
    )
    lr_warmup_steps: int = _arg(0, "linear warm-up steps", "optimisation")
    max_grad_norm: float = _arg(1.0, "gradient clipping norm (0 disables)", "optimisation")
    batch_size: int = _arg(1, "samples per process per micro-batch (one bucket per batch)", "optimisation")
    gradient_accumulation_steps: int = _arg(1, "micro-batches per optimizer step", "optimisation")
    num_epochs: int = _arg(1, "passes over the dataset (times --dataset_repeat)", "optimisation")
    max_steps: int | None = _arg(None, "stop after this many optimizer steps", "optimisation")
    seed: int = _arg(0, "seed of the data order, LoRA init, noise and timesteps", "optimisation")
    mixed_precision: Literal["no", "bf16", "fp16"] = _arg("bf16", "autocast precision", "optimisation")
    use_gradient_checkpointing: bool = _arg(False, "recompute activations in the backward pass", "optimisation")
    use_gradient_checkpointing_offload: bool = _arg(
        False, "keep the activations saved for the backward pass in CPU memory (pinned) instead of the GPU's",
        "optimisation",
    )  # fmt: skip
    fp8_models: list[str] = _arg(
        [], "frozen models whose weights are stored in float8_e4m3fn, computed in --dtype (e.g. dit for a LoRA)",
        "optimisation",
    )  # fmt: skip
    enable_model_cpu_offload: bool = _arg(
        False, "DiffSynth-Studio's name for --offload_models with the trained model (the denoiser)", "optimisation"
    )
    offload_models: list[str] = _arg(
        [],
        "frozen models loaded into (pinned) CPU memory and never onto the GPU whole: their blocks stream to the GPU "
        "as they run, forward and backward (the VRAM manager; e.g. dit under a LoRA, for a base larger than the "
        "GPU); one process only",
        "optimisation",
    )
    offload_vram_limit: float = _arg(
        0.0, "GiB of an --offload_models model's blocks kept on the GPU (0: every block streams)", "optimisation"
    )
    quantize: list[str] = _arg(
        [],
        "frozen models whose Linears are stored quantized, as [SLOT=]METHOD (bitsandbytes_nf4 / bitsandbytes_fp4, "
        "torchao_int8_w8a16 / torchao_fp8_w8a16; no slot: the denoiser), comma-separated: QLoRA when the denoiser "
        "is the LoRA's base",
        "optimisation",
    )
    quant_options: str | None = _arg(
        None,
        "DiffSynth-Studio's form: MODEL:METHOD[/EXCLUDED,LAYERS], ';'-separated, MODEL being one of the "
        "--model_paths / --model_id_with_origin_paths entries",
        "optimisation",
    )
    task: Literal["sft", "direct_distill", "dmd2", "trajectory_imitation"] = _arg(
        "sft",
        "sft: flow matching on noised data; direct_distill (DiffSynth-Studio's): each row's few-step sampling from "
        "its seed is pulled toward its image (rows: seed, optional num_inference_steps, rand_device); dmd2: "
        "distribution matching distillation into a few-step student (the --dmd2_* settings); trajectory_imitation: "
        "a few-step student follows the many-step teacher's trajectory (the --trajectory_* settings)",
        "optimisation",
    )
    distill_num_inference_steps: int = _arg(
        4, "direct_distill: sampling steps for rows without a num_inference_steps column", "optimisation"
    )
    trajectory_student_steps: int = _arg(8, "trajectory_imitation: the student's sampling steps", "optimisation")
    trajectory_teacher_steps: int = _arg(
        50, "trajectory_imitation: the teacher's sampling steps (its trajectory)", "optimisation"
    )
    trajectory_teacher_cfg_scale: float = _arg(2.0, "trajectory_imitation: the teacher's CFG scale", "optimisation")
    trajectory_negative_prompt: str = _arg("", "trajectory_imitation: the teacher's negative prompt", "optimisation")

    # ------------------------------------------------------------------ dmd2 (DiffSynth-Studio's names)
    dmd2_student_update_freq: int = _arg(5, "dmd2: update the student once every N steps", "dmd2")
    dmd2_student_sample_steps: int = _arg(4, "dmd2: sampling steps of the distilled student", "dmd2")
    dmd2_student_sample_type: Literal["sde", "ode"] = _arg(
        "sde",
        "dmd2: the student's input at its step k: sde, the data latents noised to that step's sigma; ode, the "
        "student's own Euler steps from noise (backward simulation, no gradient)",
        "dmd2",
    )
    dmd2_student_schedule: Literal["uniform", "pipeline"] = _arg(
        "uniform",
        "dmd2: the student's sigmas: uniform, linspace(min(--dmd2_matching_t_max, 0.999), 0); pipeline, the "
        "family's inference schedule for that many steps (what the pipeline samples with)",
        "dmd2",
    )
    dmd2_student_t_list: list[str] = _arg(
        [], "dmd2: explicit student sigmas, comma-separated, --dmd2_student_sample_steps + 1 of them ending with 0",
        "dmd2",
    )  # fmt: skip
    dmd2_matching_t_min: float = _arg(0.001, "dmd2: smallest sigma the student's samples are re-noised to", "dmd2")
    dmd2_matching_t_max: float = _arg(0.999, "dmd2: largest sigma the student's samples are re-noised to", "dmd2")
    dmd2_matching_t_sampling: Literal["uniform", "logitnormal"] = _arg(
        "uniform", "dmd2: how the re-noising sigma is drawn between the two", "dmd2"
    )
    dmd2_matching_t_mean: float = _arg(0.0, "dmd2: mean of the logitnormal re-noising sigma", "dmd2")
    dmd2_matching_t_std: float = _arg(1.0, "dmd2: std of the logitnormal re-noising sigma", "dmd2")
    dmd2_teacher_cfg_scale: float = _arg(
        1.0, "dmd2: CFG scale of the frozen teacher (the real score), against --dmd2_negative_prompt", "dmd2"
    )
    dmd2_negative_prompt: str = _arg("", "dmd2: the teacher's negative prompt (when its CFG scale is not 1)", "dmd2")
    dmd2_fake_score_learning_rate: float | None = _arg(
        None, "dmd2: AdamW learning rate of the fake score model (default: --learning_rate)", "dmd2"
    )
    dmd2_student_grad_clip_norm: float | None = _arg(
        10.0, "dmd2: clip the student's gradients to this norm (0 disables)", "dmd2"
    )
    dmd2_gan_loss_weight: float = _arg(
        0.0,
        "dmd2: weight of the student's GAN term (DiffSynth-Studio's default 0.03, which needs "
        "--dmd2_feature_indices; 0: no discriminator)",
        "dmd2",
    )
    dmd2_feature_indices: list[str] = _arg(
        [], "dmd2: blocks of the fake score model whose hidden features the discriminator reads (e.g. 12)", "dmd2"
    )
    dmd2_gan_r1_reg_weight: float = _arg(0.0, "dmd2: weight of the discriminator's approximate R1 penalty", "dmd2")
    dmd2_gan_r1_reg_alpha: float = _arg(0.1, "dmd2: noise scale of the approximate R1 penalty", "dmd2")
    dmd2_discriminator_learning_rate: float | None = _arg(
        None, "dmd2: AdamW learning rate of the discriminator (default: --learning_rate)", "dmd2"
    )
    loss_type: Literal["mse", "l1", "huber", "smooth_l1"] = _arg(
        "mse",
        "each element's loss: mse, l1, or kohya's pseudo-Huber forms huber / smooth_l1 (square for errors below "
        "about --huber_c, linear above: far-off samples pull less); sft and direct_distill",
        "optimisation",
    )
    huber_c: float = _arg(0.1, "huber / smooth_l1: where the loss turns from square to linear", "optimisation")
    loss_weighting: Literal["scheduler", "none"] = _arg(
        "scheduler", "scheduler: the family's timestep loss weights; none: every timestep alike", "optimisation"
    )
    timestep_sampling: Literal["uniform", "logit_normal"] = _arg(
        "uniform",
        "how noise levels are drawn from the family's grid: uniform (DiffSynth-Studio's), or logit_normal (SD3's "
        "density, kohya's / ai-toolkit's 'sigmoid': the middle levels most)",
        "optimisation",
    )
    logit_mean: float = _arg(0.0, "logit_normal: the mean (> 0 draws noisier levels)", "optimisation")
    logit_std: float = _arg(1.0, "logit_normal: the spread", "optimisation")
    min_timestep_boundary: float = _arg(0.0, "sample timesteps from this fraction of the grid...", "optimisation")
    max_timestep_boundary: float = _arg(1.0, "...up to this one (0 = noisiest end)", "optimisation")
    find_unused_parameters: bool = _arg(False, "DDP: allow parameters that get no gradient", "optimisation")

    # ------------------------------------------------------------------ output
    output_path: str = _arg("./models/train", "folder for LoRA / weights, checkpoints and logs", "output")
    save_steps: int | None = _arg(None, "save every N optimizer steps (always at epoch ends)", "output")
    keep_last: int | None = _arg(None, "keep only the newest N resume checkpoints", "output")
    resume: str | None = _arg(None, "continue from a checkpoint folder, or 'latest' in --output_path", "output")
    log_every: int = _arg(10, "log the loss every N optimizer steps", "output")
    report_to: list[str] = _arg(
        [],
        "also send the logged loss and learning rate, and the validation pictures, to these trackers (accelerate's: "
        "tensorboard, wandb, swanlab, mlflow, ...), comma-separated; the tracker's package must be installed",
        "output",
    )
    tracker_project_name: str = _arg(
        "diffsynth", "the project (run group) name the trackers file the run under", "output"
    )
    validation_prompts: list[str] = _arg(
        [], "prompts sampled with the weights in training (separated by |), written to OUTPUT/validation/", "output"
    )
    validation_images: list[str] = _arg(
        [],
        "reference images of the validation prompts, one item per prompt (separated by |), several for one prompt "
        "joined by , (Kontext references; Wan FLF2V first then last frame; a path that holds a comma is "
        "recognised as long as the file exists); relative paths are read against --dataset_base_path",
        "output",
    )
    validation_prompts_file: str | None = _arg(
        None,
        "a file of validation prompts, one a line, each with its own options in kohya's / musubi-tuner's format "
        "(PROMPT --w 1024 --h 768 --s 28 --d 42 --l 4.0 --n NEGATIVE --f FRAMES --g 3.5 --ss unipc --i REF.png); "
        "sampled after "
        "--validation_prompts",
        "output",
    )
    validation_steps: int | None = _arg(None, "sample the validation prompts every N steps (and at the end)", "output")
    sample_at_first: bool = _arg(
        False,
        "also sample the validation prompts, and take the validation loss, before the first step: the base model's, "
        "to compare the run with (kohya's / musubi-tuner's flag; not when resuming)",
        "output",
    )
    validation_seed: int = _arg(0, "seed of the validation samples (the same each time, to compare)", "output")
    validation_height: int | None = _arg(None, "height of the validation samples (default: the pipeline's)", "output")
    validation_width: int | None = _arg(None, "width of the validation samples (default: the pipeline's)", "output")
    validation_num_inference_steps: int | None = _arg(
        None, "denoising steps of the validation samples (default: the pipeline's)", "output"
    )
    validation_dataset_base_path: str | None = _arg(
        None,
        "held-out dataset folder, read as --dataset_base_path is: its training loss (val_loss in "
        "metrics.jsonl and the trackers) at fixed noise levels and noise, no gradient; encoded once at setup, or by "
        "--stage encode into --cache_dir/validation for training from the cache; --task sft only",
        "output",
    )
    validation_dataset_metadata_path: str | None = _arg(
        None, "metadata file of the held-out dataset (default: metadata.* in its folder)", "output"
    )
    validation_loss_steps: int | None = _arg(
        None, "compute the validation loss every N optimizer steps, and at the last (default: --validation_steps)",
        "output",
    )  # fmt: skip
    validation_loss_sigmas: int = _arg(
        4, "noise levels of the validation loss, spread evenly over the family's training grid (losses averaged)",
        "output",
    )  # fmt: skip

    # ------------------------------------------------------------------ DiffSynth-Studio's other names
    # so its training commands run unchanged: folded into the settings above by `check`
    extra_inputs: list[str] = _arg(
        [],
        "DiffSynth-Studio's list of the rows' extra model inputs (e.g. edit_image): every metadata column reaches the "
        "family's task here, so it is only checked (a name no row has is reported)",
        "DiffSynth-Studio's names",
    )
    remove_prefix_in_ckpt: str | None = _arg(
        None,
        "DiffSynth-Studio's prefix to strip from saved keys (pipe.dit.): files here name the layers as pipelines "
        "load them already",
        "DiffSynth-Studio's names",
    )
    resume_from_checkpoint: str | None = _arg(
        None, "DiffSynth-Studio's: a LoRA file to go on training (--lora_checkpoint)", "DiffSynth-Studio's names"
    )
    enable_tensorboard_log: bool = _arg(
        False, "DiffSynth-Studio's: --report_to tensorboard", "DiffSynth-Studio's names"
    )
    enable_wandb_log: bool = _arg(False, "DiffSynth-Studio's: --report_to wandb", "DiffSynth-Studio's names")
    enable_swanlab_log: bool = _arg(False, "DiffSynth-Studio's: --report_to swanlab", "DiffSynth-Studio's names")
    align_to_opensource_format: bool = _arg(
        False,
        "DiffSynth-Studio's: also write the LoRA in kohya's layout (lora_unet_..., --lora_formats kohya); the "
        "other files name the layers as the official checkpoints already",
        "DiffSynth-Studio's names",
    )
    initialize_model_on_cpu: bool = _arg(
        False,
        "DiffSynth-Studio's: accepted; models are built from their files here (no random initialisation to move)",
        "DiffSynth-Studio's names",
    )
    zero_cond_t: bool = _arg(
        False,
        "DiffSynth-Studio's Qwen-Image-Edit-2511 flag: --task_options zero_cond_t=true (the DiT's config.json says "
        "it when loaded)",
        "DiffSynth-Studio's names",
    )
    audio_processor_path: str | None = _arg(
        None,
        "DiffSynth-Studio's Wan2.2-S2V wav2vec2 processor folder: accepted; its preprocessing (zero mean, unit "
        "variance at 16 kHz) is built in here",
        "DiffSynth-Studio's names",
    )
    framewise_decoding: bool = _arg(
        False,
        "DiffSynth-Studio's Wan-Dancer global-model recipe (one keyframe per latent frame): not trained here; "
        "refused by name",
        "DiffSynth-Studio's names",
    )
    preset_lora_model: str | None = _arg(
        None,
        "DiffSynth-Studio's: the model --preset_lora_path fuses into; here always the trained model (dit)",
        "DiffSynth-Studio's names",
    )
    wandb_project: str | None = _arg(None, "DiffSynth-Studio's: --tracker_project_name", "DiffSynth-Studio's names")
    swanlab_project: str | None = _arg(None, "DiffSynth-Studio's: --tracker_project_name", "DiffSynth-Studio's names")

    # ------------------------------------------------------------------ checks
    def check(self) -> TrainConfig:
        """Raise `ConfigError` naming the flag when a value cannot work; returns self."""
        from diffsynth.runtime.dtypes import parse_dtype

        self._fold_diffsynth_names()

        for f in fields(self):
            _check_type(f, getattr(self, f.name))
        _check_finite(self)
        if not 0 <= self.seed < 2**32:  # numpy's seeds (accelerate's set_seed seeds it too)
            raise ConfigError(f"--seed {self.seed} must be between 0 and 2**32 - 1")
        for name in ("max_pixels", "bucket_step", "num_frames", "dataset_repeat", "lora_rank", "batch_size"):
            _at_least(name, getattr(self, name), 1)
        for name in ("gradient_accumulation_steps", "num_epochs", "log_every"):
            _at_least(name, getattr(self, name), 1)
        for name in (
            "max_steps",
            "save_steps",
            "keep_last",
            "height",
            "width",
            "validation_steps",
            "validation_height",
            "validation_width",
            "validation_num_inference_steps",
        ):
            if getattr(self, name) is not None:
                _at_least(name, getattr(self, name), 1)
        for name in ("dataset_num_workers", "lr_warmup_steps"):
            _at_least(name, getattr(self, name), 0)
        for name in ("dtype", "trainable_dtype", "save_dtype"):
            value = getattr(self, name)
            if value is not None:
                try:
                    parse_dtype(value)
                except ConfigError:
                    raise ConfigError(f"--{name} {value!r} is not a dtype; use bfloat16, float16 or float32") from None
        if (self.height is None) != (self.width is None):
            raise ConfigError(
                f"--height and --width go together (got --height {self.height}, --width {self.width}); "
                "give both for a fixed size, or neither to bucket under --max_pixels"
            )
        if self.learning_rate <= 0:
            raise ConfigError(f"--learning_rate {self.learning_rate} must be > 0")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ConfigError(
                f"--weight_decay {self.weight_decay} and --max_grad_norm {self.max_grad_norm} must be >= 0"
            )
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise ConfigError(f"--lora_alpha {self.lora_alpha} must be > 0")
        from .optimizers import check_optimizer

        check_optimizer(self.optimizer, self.learning_rate, self.weight_decay, self.optimizer_options)
        self._check_lora_type()
        self._check_lora_plus_and_captions()
        self._check_caption_tags()
        self._check_video_clips()
        self._check_schedule_and_loss()
        self._check_task_flags()
        if not 0 <= self.min_timestep_boundary < self.max_timestep_boundary <= 1:
            raise ConfigError(
                f"--min_timestep_boundary {self.min_timestep_boundary} and --max_timestep_boundary "
                f"{self.max_timestep_boundary} must satisfy 0 <= min < max <= 1"
            )
        bad = [f for f in self.lora_formats if f not in LORA_FORMATS]
        if bad or not self.lora_formats:
            raise ConfigError(f"--lora_formats {','.join(self.lora_formats)!r}: choose from {', '.join(LORA_FORMATS)}")
        if self.trainable_models and (self.lora_base_model or self.lora_target_modules):
            raise ConfigError(
                f"--trainable_models {','.join(self.trainable_models)} (full fine-tuning) cannot be combined with "
                "--lora_base_model / --lora_target_modules (LoRA); give one or the other"
            )
        if self.enable_model_cpu_offload and self.trainable_models:
            raise ConfigError(
                "--enable_model_cpu_offload streams the frozen base of a LoRA from CPU memory; with --trainable_models "
                "(full fine-tuning) the trained weights stay on the GPU: drop one of the two"
            )
        both = [m for m in self.offload_models if m in self.trainable_models or m in self.fp8_models]
        if both:
            raise ConfigError(
                f"--offload_models {','.join(both)}: a model trained in full or stored in fp8 (--fp8_models) is not "
                "streamed; offload the frozen base of a LoRA"
            )
        if self.offload_vram_limit < 0:
            raise ConfigError(f"--offload_vram_limit {self.offload_vram_limit} must be >= 0 (GiB)")
        trained_fp8 = [m for m in self.fp8_models if m in self.trainable_models]
        if trained_fp8:
            raise ConfigError(
                f"--fp8_models {','.join(trained_fp8)}: a model trained in full (--trainable_models) keeps its "
                "weights in --trainable_dtype; fp8 storage is for frozen models (e.g. the base of a LoRA)"
            )
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ConfigError(f"--ema_decay {self.ema_decay} must be between 0 and 1 (e.g. 0.999)")
        if self.lora_checkpoint is not None and self.trainable_models:
            raise ConfigError(
                "--lora_checkpoint starts a LoRA from a file; with --trainable_models (full fine-tuning) there is no "
                "LoRA: fuse it into the weights you start from instead"
            )
        if self.preset_lora_path is not None and self.trainable_models:
            raise ConfigError(
                "--preset_lora_path fuses a LoRA into the frozen base of a new LoRA; with --trainable_models (full "
                "fine-tuning) fuse it into the weights you start from instead"
            )
        self._check_validation_samples()
        if self.validation_images and not self.validation_prompts:
            raise ConfigError(
                "--validation_images gives the reference images of --validation_prompts (one item per prompt); "
                "give the prompts too"
            )
        if self.validation_images and len(self.validation_images) != len(self.validation_prompts):
            raise ConfigError(
                f"--validation_images has {len(self.validation_images)} items and --validation_prompts "
                f"{len(self.validation_prompts)} prompts; give one item per prompt, separated by | (several images "
                "for one prompt joined by ,)"
            )
        if self.sample_at_first and not (self.samples_validation or self.validation_dataset_base_path):
            raise ConfigError(
                "--sample_at_first samples the validation prompts before training; give --validation_prompts, "
                "--validation_prompts_file or --validation_dataset_base_path"
            )
        if self.samples_validation and self.cache_dir is not None and self.stage == "train":
            flag = "--validation_prompts" if self.validation_prompts else "--validation_prompts_file"
            raise ConfigError(
                f"{flag} needs the text encoders and the VAE, which training from --cache_dir does not "
                "load; sample the saved LoRA / weights with the pipeline instead"
            )
        from .validation_loss import check as check_validation_loss

        check_validation_loss(self)  # the --validation_dataset_* / --validation_loss_* settings
        if self.task == "direct_distill" and self.cache_dir is not None:
            raise ConfigError(
                "--task direct_distill reads each row's seed and steps, which --cache_dir does not keep; train "
                "without --cache_dir (the encoders run on the fly)"
            )
        if self.task == "dmd2":
            check_dmd2(self)
        if self.task == "trajectory_imitation":
            if self.cache_dir is not None:
                raise ConfigError(
                    "--task trajectory_imitation encodes the negative prompt of the teacher's CFG on the fly, which "
                    "--cache_dir does not keep; train without --cache_dir"
                )
            if not 1 <= self.trajectory_student_steps < self.trajectory_teacher_steps:
                raise ConfigError(
                    f"--trajectory_student_steps {self.trajectory_student_steps} must be >= 1 and fewer than "
                    f"--trajectory_teacher_steps {self.trajectory_teacher_steps}"
                )
        if self.distill_num_inference_steps < 1:
            raise ConfigError(f"--distill_num_inference_steps {self.distill_num_inference_steps} must be >= 1")
        if self.stage == "encode" and self.cache_dir is None:
            raise ConfigError("--stage encode writes the encoded dataset to --cache_dir; give --cache_dir")
        if self.dataset_config is not None and (self.dataset_base_path or self.dataset_metadata_path):
            flag = "--dataset_base_path" if self.dataset_base_path else "--dataset_metadata_path"
            raise ConfigError(
                f"--dataset_config {self.dataset_config} and {flag} both name the data; give one (a dataset's folder "
                "and metadata file are its base_path and metadata_path in the config file)"
            )
        if (
            self.dataset_base_path is None
            and self.dataset_config is None
            and not (self.cache_dir and self.stage == "train")
        ):
            raise ConfigError(
                "--dataset_base_path is required (the folder holding metadata.csv/.json/.jsonl), or --dataset_config"
            )
        if not (self.model or self.model_paths or self.model_id_with_origin_paths or ":" in (self.family or "")):
            raise ConfigError(
                "no model given: pass --model (a preset or a local folder), --model_paths or --model_id_with_origin_paths"
            )
        return self

    def _fold_diffsynth_names(self) -> None:
        """DiffSynth-Studio's flags as ours (idempotent: `check` may run again on the folded settings)."""
        enabled = [n for n in ("tensorboard", "wandb", "swanlab") if getattr(self, f"enable_{n}_log")]
        self.report_to = list(dict.fromkeys([*self.report_to, *enabled]))
        projects = {p for p in (self.wandb_project, self.swanlab_project) if p}
        if len(projects) > 1:
            raise ConfigError(
                f"--wandb_project {self.wandb_project} and --swanlab_project {self.swanlab_project}: one run has one "
                "project name here (--tracker_project_name); give one"
            )
        if projects:
            self.tracker_project_name = projects.pop()
        if self.resume_from_checkpoint is not None:
            if self.trainable_models:
                raise ConfigError(
                    "--resume_from_checkpoint (DiffSynth-Studio's) starts from saved weights: for full fine-tuning "
                    "pass the file as the model's weights (--model_paths, in place of the original transformer), or "
                    "--resume a checkpoint folder of this trainer"
                )
            if self.lora_checkpoint not in (None, self.resume_from_checkpoint):
                raise ConfigError("--resume_from_checkpoint and --lora_checkpoint name two files; give one")
            self.lora_checkpoint = self.resume_from_checkpoint
        if self.align_to_opensource_format and "kohya" not in self.lora_formats:
            self.lora_formats = [*self.lora_formats, "kohya"]
        if self.zero_cond_t:
            self.task_options = {**self.task_options, "zero_cond_t": True}
        if self.framewise_decoding:
            raise ConfigError(
                "--framewise_decoding: Wan-Dancer's global model recipe (a video of one keyframe per latent frame, "
                "each encoded alone) is not trained here; train the local model's recipe on continuous videos"
            )
        if self.preset_lora_model not in (None, "dit", self.lora_base_model):
            raise ConfigError(
                f"--preset_lora_model {self.preset_lora_model}: --preset_lora_path fuses into the trained model "
                "(dit) here; another model cannot take it"
            )
        prefix = self.remove_prefix_in_ckpt
        if prefix and not (prefix.startswith("pipe.") and prefix.endswith(".")):
            raise ConfigError(
                f"--remove_prefix_in_ckpt {prefix!r}: DiffSynth-Studio's form is pipe.<model>. (e.g. pipe.dit.); the "
                "files here carry no prefix anyway"
            )

    def check_data_paths(self) -> None:
        """The dataset folder and metadata file exist: checked before any model loads (a 14B model takes minutes),
        not in `check`, which also reads configs written for another machine."""
        if self.dataset_base_path is not None and not Path(self.dataset_base_path).is_dir():
            raise ConfigError(f"--dataset_base_path {self.dataset_base_path}: no such folder")
        if self.dataset_metadata_path is not None and not Path(self.dataset_metadata_path).is_file():
            raise ConfigError(f"--dataset_metadata_path {self.dataset_metadata_path}: no such file")
        from .datasets import check_paths as check_dataset_paths
        from .validation_loss import check_paths

        check_dataset_paths(self)  # --dataset_config: each dataset's base_path and metadata_path
        check_paths(self)  # --validation_dataset_base_path / --validation_dataset_metadata_path
        if self.validation_prompts_file is not None:
            from .sample_prompts import read_prompts_file

            read_prompts_file(self.validation_prompts_file)  # a bad line fails now, before any model loads

    @property
    def training_pixels(self) -> int | list[int]:
        """The pixel budget of a sample: `--max_pixels`, or one per `--resolutions` size."""
        return [r * r for r in self.resolutions] if self.resolutions else self.max_pixels

    @property
    def samples_validation(self) -> bool:
        """Whether validation samples are drawn: `--validation_prompts` or `--validation_prompts_file`."""
        return bool(self.validation_prompts) or self.validation_prompts_file is not None

    @property
    def uses_loss_masks(self) -> bool:
        """`--masked_loss`, or `--alpha_mask` (which implies it)."""
        return self.masked_loss or self.alpha_mask

    def _check_validation_samples(self) -> None:
        """The settings of the validation samples without prompts to sample (--validation_steps also times the
        validation loss, where --validation_loss_steps does not)."""
        if self.samples_validation:
            return
        prompts = "--validation_prompts or --validation_prompts_file"
        for name in ("validation_height", "validation_width", "validation_num_inference_steps", "validation_seed"):
            value = getattr(self, name)
            if value != (0 if name == "validation_seed" else None):
                raise ConfigError(f"--{name} {value} shapes the validation samples; give {prompts} too")
        times_loss = self.validation_dataset_base_path is not None and self.validation_loss_steps is None
        if self.validation_steps is not None and not times_loss:
            loss = " (--validation_loss_steps times the validation loss)" if self.validation_loss_steps else ""
            raise ConfigError(
                f"--validation_steps {self.validation_steps} times the validation samples{loss}; give {prompts}, or "
                "--validation_dataset_base_path for the validation loss"
            )

    def _check_lora_plus_and_captions(self) -> None:
        if self.lora_plus_ratio is not None:
            if self.lora_plus_ratio <= 0:
                raise ConfigError(f"--lora_plus_ratio {self.lora_plus_ratio} must be > 0 (LoRA+ uses about 16)")
            if self.trainable_models or self.lora_type not in ("lora", "dora"):
                what = "--trainable_models" if self.trainable_models else f"--lora_type {self.lora_type}"
                raise ConfigError(f"--lora_plus_ratio speeds up a LoRA's B matrices; {what} has none")
        if self.logit_std <= 0:
            raise ConfigError(f"--logit_std {self.logit_std} must be > 0")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ConfigError(f"--caption_dropout {self.caption_dropout} must be a probability in [0, 1)")
        if self.caption_dropout and self.cache_dir is not None:
            raise ConfigError(
                "--caption_dropout empties prompts before they are encoded; --cache_dir holds them encoded. Train "
                "without --cache_dir (the encoders run on the fly)"
            )
        if not 0.0 <= self.unmasked_weight < 1.0:
            raise ConfigError(f"--unmasked_weight {self.unmasked_weight} must be in [0, 1) (1 would ignore the masks)")
        if self.unmasked_weight and not self.uses_loss_masks:
            raise ConfigError("--unmasked_weight weighs what the masks leave out; give --masked_loss too")
        if self.uses_loss_masks and self.task not in ("sft", "direct_distill"):
            raise ConfigError(
                "--masked_loss / --alpha_mask weigh the flow-matching and direct-distillation losses; --task "
                f"{self.task} has its own objective"
            )
        if self.resolutions:
            if self.height is not None:
                raise ConfigError("--resolutions buckets each picture at several sizes; --height/--width fix one")
            small = [r for r in self.resolutions if r < self.bucket_step]
            if small or len(set(self.resolutions)) != len(self.resolutions):
                raise ConfigError(
                    f"--resolutions {','.join(map(str, self.resolutions))}: give distinct sizes of at least "
                    f"--bucket_step {self.bucket_step} pixels"
                )
        if self.flip_aug and self.cache_dir is not None:
            raise ConfigError(
                "--flip_aug mirrors pictures before they are encoded; --cache_dir holds them encoded. Train without "
                "--cache_dir (the encoders run on the fly)"
            )
        if self.flip_aug and self.task != "sft":
            raise ConfigError(f"--flip_aug: --task {self.task} learns from the pictures as they are (or none)")
        if self.caption_dropout and self.task != "sft":
            raise ConfigError(f"--caption_dropout {self.caption_dropout}: {_KEEPS_ITS_PROMPTS[self.task]}")

    def _check_video_clips(self) -> None:
        _at_least("video_frame_samples", self.video_frame_samples, 1)
        if self.video_frame_stride is not None:
            _at_least("video_frame_stride", self.video_frame_stride, 1)
        if self.video_fps is not None and not self.video_fps > 0:
            raise ConfigError(f"--video_fps {self.video_fps} must be > 0")
        if self.video_frame_extraction == "slide" and self.video_frame_stride is None:
            raise ConfigError("--video_frame_extraction slide starts a clip every --video_frame_stride frames; give it")
        if self.video_frame_stride is not None and self.video_frame_extraction != "slide":
            raise ConfigError("--video_frame_stride spaces the clips of --video_frame_extraction slide; give that too")
        if self.video_frame_samples > 1 and self.video_frame_extraction != "uniform":
            raise ConfigError(
                "--video_frame_samples spreads the clips of --video_frame_extraction uniform; give that too"
            )

    def _check_caption_tags(self) -> None:
        _at_least("keep_tokens", self.keep_tokens, 0)
        if not 0.0 <= self.caption_tag_dropout < 1.0:
            raise ConfigError(f"--caption_tag_dropout {self.caption_tag_dropout} must be a probability in [0, 1)")
        given = [
            flag
            for flag, on in (
                ("--shuffle_caption", self.shuffle_caption),
                ("--caption_tag_dropout", self.caption_tag_dropout > 0),
                ("--keep_tokens_separator", bool(self.keep_tokens_separator)),
            )
            if on
        ]
        if self.keep_tokens and not (self.shuffle_caption or self.caption_tag_dropout):
            raise ConfigError(
                f"--keep_tokens {self.keep_tokens} keeps tags out of --shuffle_caption and --caption_tag_dropout; "
                "give one of them"
            )
        if given and self.cache_dir is not None:
            raise ConfigError(
                f"{given[0]} rewrites each caption every time its row is drawn, before it is encoded; --cache_dir "
                "holds the prompts encoded once. Train without --cache_dir (the encoders run on the fly)"
            )
        # the distillation tasks learn each row's prompt as it is; --keep_tokens_separator alone only strips itself
        # from the captions (which --task dmd2, encoding its rows' prompts itself, does not do either)
        refused = given if self.task == "dmd2" else [f for f in given if f != "--keep_tokens_separator"]
        if refused and self.task != "sft":
            raise ConfigError(f"{refused[0]}: {_KEEPS_ITS_PROMPTS[self.task]}")

    def _check_schedule_and_loss(self) -> None:
        _at_least("lr_scheduler_num_cycles", self.lr_scheduler_num_cycles, 1)
        if self.lr_scheduler_power <= 0:
            raise ConfigError(f"--lr_scheduler_power {self.lr_scheduler_power} must be > 0")
        if not 0.0 <= self.lr_scheduler_min_lr_ratio < 1.0:
            raise ConfigError(f"--lr_scheduler_min_lr_ratio {self.lr_scheduler_min_lr_ratio} must be in [0, 1)")
        if self.huber_c <= 0:
            raise ConfigError(f"--huber_c {self.huber_c} must be > 0")
        for flag, value, default, needs, on in (
            ("lr_scheduler_num_cycles", self.lr_scheduler_num_cycles, 1, "--lr_scheduler cosine_with_restarts",
             self.lr_scheduler == "cosine_with_restarts"),
            ("lr_scheduler_power", self.lr_scheduler_power, 1.0, "--lr_scheduler polynomial",
             self.lr_scheduler == "polynomial"),
            ("lr_scheduler_min_lr_ratio", self.lr_scheduler_min_lr_ratio, 0.0, "a decaying --lr_scheduler",
             self.lr_scheduler != "constant"),
            ("huber_c", self.huber_c, 0.1, "--loss_type huber or smooth_l1", self.loss_type in ("huber", "smooth_l1")),
            ("logit_mean", self.logit_mean, 0.0, "--timestep_sampling logit_normal",
             self.timestep_sampling == "logit_normal"),
            ("logit_std", self.logit_std, 1.0, "--timestep_sampling logit_normal",
             self.timestep_sampling == "logit_normal"),
        ):  # fmt: skip
            if value != default and not on:
                raise ConfigError(f"--{flag} {value} shapes {needs}; this run has none, so it would do nothing")
        if self.loss_type != "mse" and self.task not in ("sft", "direct_distill"):
            raise ConfigError(
                f"--loss_type {self.loss_type} replaces the flow-matching and direct-distillation losses' squares; "
                f"--task {self.task} has its own objective"
            )

    def _check_task_flags(self) -> None:
        """A setting given (not its default) that this run's --task does not read would do nothing: refused."""
        if self.preset_lora_scale != 1.0 and self.preset_lora_path is None:
            raise ConfigError(
                f"--preset_lora_scale {self.preset_lora_scale} scales --preset_lora_path; this run has none, so it "
                "would do nothing"
            )
        for f in fields(self):
            tasks = _TASKS_READING.get(f.name) or _TASKS_READING.get(f.name.split("_")[0] + "_*")
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            value = getattr(self, f.name)
            if tasks is None or self.task in tasks or value == default:
                continue
            shown = ",".join(map(str, value)) if isinstance(value, list) else value
            raise ConfigError(
                f"--{f.name} {shown} shapes --task {' / '.join(tasks)}; --task {self.task} "
                f"{_DOES_NOT_READ.get(self.task, 'does not read it')}, so it would do nothing"
            )

    def _check_lora_type(self) -> None:
        if self.lora_type not in LORA_TYPES:
            raise ConfigError(f"--lora_type {self.lora_type!r}: choose from {', '.join(LORA_TYPES)}")
        for name in ("lora_dropout", "rank_dropout", "module_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"--{name} {getattr(self, name)} must be a probability in [0, 1)")
        if self.trainable_models and (self.lora_dropout or self.rank_dropout or self.module_dropout):
            raise ConfigError(
                "--lora_dropout / --rank_dropout / --module_dropout act on LoRA layers; --trainable_models trains the "
                "weights in full"
            )
        if self.lora_dropout and self.lora_type not in ("lora", "dora"):
            raise ConfigError(
                f"--lora_dropout is LoRA's (peft's lora_dropout); --lora_type {self.lora_type} takes --rank_dropout "
                "and --module_dropout"
            )
        if (self.lora_dropout or self.rank_dropout or self.module_dropout) and self.task == "dmd2":
            raise ConfigError(
                "--lora_dropout / --rank_dropout / --module_dropout: not with --task dmd2 (its student and fake-score "
                "updates are not seeded per micro-batch, so a resumed run would drop other units)"
            )
        if (self.rank_dropout or self.module_dropout) and self.lora_type not in ("loha", "lokr"):
            raise ConfigError(
                f"--rank_dropout / --module_dropout are LoHa's and LoKr's; --lora_type {self.lora_type} takes "
                "--lora_dropout"
            )
        if self.lokr_factor == 0 or self.lokr_factor < -1:
            raise ConfigError(f"--lokr_factor {self.lokr_factor} must be a positive size, or -1 (automatic)")
        if self.lokr_factor != -1 and (self.lora_type != "lokr" or self.trainable_models):
            what = "--trainable_models trains the weights in full" if self.trainable_models else (
                f"--lora_type {self.lora_type} has none"
            )  # fmt: skip
            raise ConfigError(
                f"--lokr_factor {self.lokr_factor} sizes the Kronecker factors of --lora_type lokr; {what}, so it "
                "would do nothing"
            )
        if self.lora_alpha is not None and self.trainable_models:
            raise ConfigError(
                f"--lora_alpha {self.lora_alpha} scales a LoRA; --trainable_models trains the weights in full, so it "
                "would do nothing"
            )
        if self.lora_type == "lora":
            return
        given = "--lora_type " + self.lora_type
        if self.trainable_models:
            raise ConfigError(f"{given} is an adapter; --trainable_models trains the weights in full. Give one")
        if self.lora_checkpoint is not None:
            raise ConfigError(
                f"{given}: --lora_checkpoint starts down/up LoRA matrices from a file; other adapters start from "
                "peft's initialisation (train with --lora_type lora to go on from a LoRA file)"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_dmd2(cfg: TrainConfig) -> None:
    """The `--dmd2_*` settings of `--task dmd2`, each error naming its flag."""
    if cfg.cache_dir is not None:
        raise ConfigError(
            "--task dmd2 encodes each batch's prompts again with --dmd2_negative_prompt for the teacher and needs "
            "the data latents as encoded now, which --cache_dir does not serve; train without --cache_dir"
        )
    if cfg.mixed_precision == "fp16":
        raise ConfigError(
            "--task dmd2 with --mixed_precision fp16: the fake score's optimizer does not take fp16 loss scaling; "
            "use --mixed_precision bf16 or no"
        )
    for name in ("dmd2_student_update_freq", "dmd2_student_sample_steps"):
        _at_least(name, getattr(cfg, name), 1)
    if not 0 <= cfg.dmd2_matching_t_min <= cfg.dmd2_matching_t_max <= 1:
        raise ConfigError(
            f"--dmd2_matching_t_min {cfg.dmd2_matching_t_min} and --dmd2_matching_t_max {cfg.dmd2_matching_t_max} "
            "must satisfy 0 <= min <= max <= 1"
        )
    if cfg.dmd2_matching_t_std <= 0:
        raise ConfigError(f"--dmd2_matching_t_std {cfg.dmd2_matching_t_std} must be > 0")
    if cfg.dmd2_teacher_cfg_scale <= 0:
        raise ConfigError(f"--dmd2_teacher_cfg_scale {cfg.dmd2_teacher_cfg_scale} must be > 0 (1: no CFG)")
    if cfg.dmd2_fake_score_learning_rate is not None and cfg.dmd2_fake_score_learning_rate <= 0:
        raise ConfigError(f"--dmd2_fake_score_learning_rate {cfg.dmd2_fake_score_learning_rate} must be > 0")
    if cfg.dmd2_student_grad_clip_norm is not None and cfg.dmd2_student_grad_clip_norm < 0:
        raise ConfigError(f"--dmd2_student_grad_clip_norm {cfg.dmd2_student_grad_clip_norm} must be >= 0 (0: off)")
    if cfg.dmd2_gan_loss_weight < 0:
        raise ConfigError(f"--dmd2_gan_loss_weight {cfg.dmd2_gan_loss_weight} must be >= 0 (0: no GAN term)")
    if cfg.dmd2_gan_loss_weight > 0:
        if not cfg.dmd2_feature_indices:
            raise ConfigError(
                f"--dmd2_gan_loss_weight {cfg.dmd2_gan_loss_weight}: the discriminator reads the fake score's hidden "
                "features at --dmd2_feature_indices; give them (e.g. --dmd2_feature_indices 12), or pass "
                "--dmd2_gan_loss_weight 0"
            )
        dmd2_feature_indices(cfg)
    elif cfg.dmd2_feature_indices or cfg.dmd2_gan_r1_reg_weight:
        raise ConfigError(
            "--dmd2_feature_indices / --dmd2_gan_r1_reg_weight set the GAN term, which --dmd2_gan_loss_weight 0 "
            "turns off; give --dmd2_gan_loss_weight > 0 (e.g. 0.03) or drop them"
        )
    if cfg.dmd2_gan_r1_reg_weight < 0 or cfg.dmd2_gan_r1_reg_alpha <= 0:
        raise ConfigError(
            f"--dmd2_gan_r1_reg_weight {cfg.dmd2_gan_r1_reg_weight} must be >= 0 and --dmd2_gan_r1_reg_alpha "
            f"{cfg.dmd2_gan_r1_reg_alpha} > 0"
        )
    if cfg.dmd2_discriminator_learning_rate is not None and cfg.dmd2_discriminator_learning_rate <= 0:
        raise ConfigError(f"--dmd2_discriminator_learning_rate {cfg.dmd2_discriminator_learning_rate} must be > 0")
    if cfg.dmd2_student_t_list:
        sigmas = dmd2_t_list(cfg)
        if len(sigmas) != cfg.dmd2_student_sample_steps + 1:
            raise ConfigError(
                f"--dmd2_student_t_list has {len(sigmas)} sigmas; --dmd2_student_sample_steps "
                f"{cfg.dmd2_student_sample_steps} takes {cfg.dmd2_student_sample_steps + 1} (ending with 0)"
            )
        if (
            sigmas[-1] != 0
            or any(not 0 <= s <= 1 for s in sigmas)
            or any(a <= b for a, b in zip(sigmas[:-1], sigmas[1:], strict=True))
        ):
            raise ConfigError(
                f"--dmd2_student_t_list {','.join(cfg.dmd2_student_t_list)}: give decreasing sigmas in [0, 1] "
                "ending with 0 (e.g. 0.999,0.75,0.5,0.25,0)"
            )


def dmd2_feature_indices(cfg: TrainConfig) -> list[int]:
    """`--dmd2_feature_indices` as distinct block indices, in the order given."""
    try:
        indices = [int(s) for s in cfg.dmd2_feature_indices]
    except ValueError:
        indices = [-1]
    if any(i < 0 for i in indices) or len(set(indices)) != len(indices):
        raise ConfigError(
            f"--dmd2_feature_indices {','.join(cfg.dmd2_feature_indices)!r}: give distinct block indices >= 0, "
            "separated by commas"
        )
    return indices


def dmd2_t_list(cfg: TrainConfig) -> list[float]:
    """`--dmd2_student_t_list` as numbers."""
    try:
        return [float(s) for s in cfg.dmd2_student_t_list]
    except ValueError:
        raise ConfigError(
            f"--dmd2_student_t_list {','.join(cfg.dmd2_student_t_list)!r}: give numbers separated by commas"
        ) from None


# ----------------------------------------------------------------------------------- parsing
def build_parser() -> argparse.ArgumentParser:
    """The `diffsynth-train` parser: `--config FILE` plus one flag per `TrainConfig` field."""
    parser = argparse.ArgumentParser(
        prog="diffsynth-train",
        description="Train a LoRA or fine-tune a diffusion model of any installed DiffSynth family.",
        epilog="YAML keys are the flag names; flags given here override the file. See the diffsynth-training README.",
    )
    parser.add_argument("--config", metavar="FILE", default=None, help="YAML file with any of the settings below")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    groups: dict[str, argparse._ArgumentGroup] = {}
    hints = _hints()
    for f in fields(TrainConfig):
        group = groups.setdefault(f.metadata["group"], parser.add_argument_group(f.metadata["group"]))
        kind, choices = _base_type(hints[f.name])
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        shown = ",".join(default) if isinstance(default, list) else default
        if isinstance(default, dict):
            shown = ",".join(f"{k}={v}" for k, v in default.items()) or "none"
        options: dict[str, Any] = {"default": argparse.SUPPRESS, "help": f"{f.metadata['help']} (default: {shown})"}
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif kind is dict:
            options.update(type=str, metavar="NAME=VALUE,...")  # parsed by from_dict, whose errors name the flag
        elif kind is list:
            sep = _SEPARATORS.get(f.name, ",")
            options.update(type=functools.partial(_split, sep=sep), metavar=f"A{sep}B")
        else:
            options.update(type=kind, choices=choices, metavar=None if choices else kind.__name__.upper())
        group.add_argument(f"--{f.name}", **options)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    """`TrainConfig` from the command line (YAML file first, flags over it), checked."""
    args = build_parser().parse_args(argv)
    values = load_yaml(args.config) if args.config else {}
    values.update({k: v for k, v in vars(args).items() if k not in ("config", "verbose")})
    return from_dict(values, source=args.config).check(), args


def from_dict(values: Mapping[str, Any], source: str | os.PathLike | None = None) -> TrainConfig:
    """A `TrainConfig` from flat `name: value` pairs (a parsed YAML file or flags); unknown names are errors."""
    names = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - names)
    where = f"{source}: " if source else ""
    if unknown:
        raise ConfigError(
            f"{where}unknown setting(s) {', '.join(unknown)}; accepted: {', '.join(sorted(names))} "
            "(YAML keys are the flag names without --)"
        )
    hints = _hints()
    coerced = {name: _coerce(name, hints[name], value, where) for name, value in values.items()}
    return TrainConfig(**coerced)


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    try:
        import yaml
    except ImportError:
        raise ConfigError("--config needs PyYAML: pip install pyyaml") from None
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8-sig")) or {}
    except UnicodeDecodeError as error:
        raise ConfigError(f"--config {path} is not UTF-8 text ({error}); save it as UTF-8") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"--config {path} is not YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of setting: value, got {type(data).__name__}")
    return dict(data)


def dump_yaml(config: TrainConfig, path: str | os.PathLike) -> None:
    import yaml

    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


# ----------------------------------------------------------------------------------- helpers
# the settings only some tasks read (`_check_task_flags`); "dmd2_*": every --dmd2_ flag. DMD2's fake score learns
# the flow-matching loss, so it reads the timestep settings too; the trajectory loss is weighted by the scheduler.
_TASKS_READING = {
    "dmd2_*": ("dmd2",),
    "trajectory_*": ("trajectory_imitation",),
    "distill_num_inference_steps": ("direct_distill",),
    **dict.fromkeys(
        ("timestep_sampling", "logit_mean", "logit_std", "min_timestep_boundary", "max_timestep_boundary"),
        ("sft", "dmd2"),
    ),
    "loss_weighting": ("sft", "dmd2", "trajectory_imitation"),
}
_DOES_NOT_READ = {
    "direct_distill": "samples each row from its seed at the pipeline's sigmas (it draws no noise levels)",
    "trajectory_imitation": "trains at the student's sigmas on the family's inference schedule",
}
# why each task but sft refuses the caption augmentations (--caption_dropout, --shuffle_caption, ...)
_KEEPS_ITS_PROMPTS = {
    "dmd2": "--task dmd2 encodes its rows' prompts as they are and draws its own unconditional branch (the "
    "teacher's CFG)",
    "direct_distill": "--task direct_distill pulls each row's sampling from its prompt toward its picture, so the "
    "prompt must stay the one the picture was made from",
    "trajectory_imitation": "--task trajectory_imitation imitates the teacher's sampling from each row's prompt as "
    "it is",
}
_SEPARATORS = {"validation_prompts": "|", "validation_images": "|"}  # list flags whose items may hold commas


def _split(text: str, sep: str = ",") -> list[str]:
    return [part.strip() for part in text.split(sep) if part.strip()]


def _parse_options(text: str, name: str = "task_options") -> dict[str, Any]:
    """`a=1,b=true,c=text` -> {"a": 1, "b": True, "c": "text"} (values read as YAML scalars)."""
    import yaml

    options = {}
    for part in _split(text):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--{name} {text!r}: write name=value pairs separated by commas (e.g. sigma_shift=3)")
        options[key.strip()] = yaml.safe_load(value.strip()) if value.strip() else None
    return options


def _base_type(hint) -> tuple[type, tuple | None]:
    """(int/float/str/bool/list, Literal choices) of a field annotation, `X | None` unwrapped."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        hint = args[0]
    if typing.get_origin(hint) is Literal:
        return str, typing.get_args(hint)
    if typing.get_origin(hint) is list:
        return list, None
    if typing.get_origin(hint) is dict:
        return dict, None
    return hint, None


def _list_items(name: str, hint, items: list[str], where: str) -> list:
    """A list setting's items as its element type (`list[int]`: whole numbers; else the strings)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    element = typing.get_args(args[0] if typing.get_origin(hint) in (typing.Union, types.UnionType) else hint)
    if element != (int,):
        return items
    try:
        return [int(item.strip()) for item in items]
    except ValueError:
        raise ConfigError(f"{where}--{name} {','.join(items)}: give whole numbers, comma-separated") from None


def _optional(hint) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)


def _coerce(name: str, hint, value, where: str):
    kind, choices = _base_type(hint)
    if value is None and _optional(hint):
        return None
    if kind is list:
        if isinstance(value, str):
            return _list_items(name, hint, _split(value, _SEPARATORS.get(name, ",")), where)
        if isinstance(value, (list, tuple)) and all(isinstance(v, (str, int, float)) for v in value):
            return _list_items(name, hint, [str(v) for v in value], where)
    elif kind is dict:
        if isinstance(value, str):
            return _parse_options(value, name)
        if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
            return dict(value)
    elif kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif kind is str:
        if isinstance(value, (str, os.PathLike)):
            value = os.fspath(value)
            if choices and value not in choices:
                raise ConfigError(f"{where}--{name} {value!r}: choose from {', '.join(choices)}")
            return value
    wanted = {
        list: "a list or comma-separated string",
        dict: "a mapping or name=value pairs",
        bool: "true or false",
        int: "an integer",
    }.get(kind, "a number" if kind is float else "a string")
    raise ConfigError(f"{where}--{name} must be {wanted}, got {value!r}")


def _check_type(f: dataclasses.Field, value) -> None:
    _coerce(f.name, _hints()[f.name], value, "")


@functools.cache
def _hints() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _check_finite(cfg: TrainConfig) -> None:
    """A float setting that is inf or nan (which YAML and the command line both accept) is refused by name: it would
    train to NaN, or be blamed on another flag later."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"--{f.name} {value}: give a finite number")


def _at_least(name: str, value, low: int) -> None:
    if value < low:
        raise ConfigError(f"--{name} {value} must be >= {low}")


__all__ = [
    "LORA_FORMATS",
    "TrainConfig",
    "build_parser",
    "check_dmd2",
    "dmd2_t_list",
    "dump_yaml",
    "from_dict",
    "load_yaml",
    "parse_args",
]
