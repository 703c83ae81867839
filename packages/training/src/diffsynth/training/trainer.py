"""The trainer: one flow-matching loop for every family.

    diffsynth-train --config run.yaml                      # train (LoRA by default)
    diffsynth-train --config run.yaml --stage encode --cache_dir cache/   # cached mode, stage 1
    diffsynth-train --config run.yaml --cache_dir cache/   # cached mode, stage 2: no encoders, no VAE
    accelerate launch --num_processes 8 -m diffsynth.training.cli --config run.yaml   # DDP on 8 GPUs
    accelerate launch --config_file $(python -m diffsynth.training.distributed fsdp2) ...   # FSDP2 (distributed.py)
    accelerate launch --config_file $(python -m diffsynth.training.distributed deepspeed_zero2) ...   # DeepSpeed

`train(config)` reads top to bottom: `setup` loads the family's task, the data and the optimizer into a `Run`;
`resume` restores a checkpoint into a `TrainState`; each `train_step` runs one gradient-accumulation group and
one optimizer step; `save` writes the weights and a resume checkpoint every `--save_steps`, at epoch ends and at
the end. The loss is flow matching: `x_sigma = (1 - sigma) x0 + sigma noise`, the target velocity `noise - x0`,
sigmas and loss weights from the family's scheduler, and the prediction from the same per-step model call the
family's pipeline makes (`task.velocity`). `--task direct_distill` swaps the loss (`direct_distill_loss`); `--task
dmd2` swaps the whole step for `dmd2.dmd2_step` (a student, a fake score model and their two optimizers).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import logging
import math
import os
import re
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from diffsynth.runtime.dtypes import parse_dtype
from diffsynth.runtime.errors import ConfigError, preview
from diffsynth.runtime.media import upright
from diffsynth.runtime.pipeline import seeded_noise

from . import dmd2 as dmd2_task
from . import offload, tracking, trajectory, validation_loss
from .captions import augment_rows
from .checkpoint import (
    CHECKPOINTS,
    find_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    refuse_older_run,
    rng_state,
    save_checkpoint,
    save_full_weights,
    save_lora_files,
    set_aside_later,
    set_rng_state,
    step_name,
)
from .config import TrainConfig, dump_yaml
from .data import (
    AUDIO_KEYS,
    TRIGGER_PLACEHOLDER,
    CachedDataset,
    MetadataDataset,
    atomic_write_text,
    batch_plan,
    cache_settings,
    left_out_samples,
    plan_fingerprint,
    plan_keys,
    steps_per_epoch,
    write_cache,
    write_cache_index,
)
from .datasets import (
    LOSS_WEIGHTS_KEY,
    CombinedDataset,
    attach_loss_weights,
    dataset_entries,
    dataset_settings,
    take_loss_weights,
    take_row_weights,
    uses_dataset_config,
    weighted_by_dataset,
)
from .distributed import (
    DEEPSPEED_FOLDER,
    PreparedDenoiser,
    check_mode,
    configure_deepspeed,
    configure_fsdp,
    deepspeed_backward,
    distributed_kind,
    full_optimizer_state,
    full_state,
    is_deepspeed,
    is_sharded,
    load_deepspeed_state,
    load_optimizer,
    load_trainable,
    loading_whole_models,
    parameter_shape,
    save_deepspeed_state,
    zero_stage,
)
from .ema import EMA
from .lora_checkpoint import load_into_lora_layers, read_lora_checkpoint
from .masks import MASK_COLUMN, WEIGHTS_KEY, attach_masks, batch_weights, take_masks, temporal_compression
from .optimizers import make_optimizer
from .quantize import quantized_sources
from .sample_prompts import SamplePrompt, read_prompts_file
from .task import TrainingTask, check_task, model_sources, task_class

logger = logging.getLogger(__name__)
EMA_FILE = "ema.pt"  # in a resume checkpoint: the moving average's state (--ema_decay)
METRICS_FILE = "metrics.jsonl"  # in the output folder: a JSON record per logged step (and validation loss)

# Restored with the optimizer's param groups and the LR schedule's base rates: a changed value is not applied.
_KEPT_FROM_CHECKPOINT = ("learning_rate", "weight_decay", "optimizer_options", "lora_plus_ratio")

# Settings that may change between a checkpoint and the run that resumes it without a warning.
_RESUMABLE_CHANGES = {
    "resume",
    "max_steps",
    "num_epochs",
    "save_steps",
    "keep_last",
    "log_every",
    "dataset_num_workers",
    "report_to",
    "tracker_project_name",
    "validation_prompts",
    "validation_prompts_file",
    "validation_images",
    "validation_steps",
    "validation_seed",
    "validation_height",
    "validation_width",
    "validation_num_inference_steps",
    "sample_at_first",
    "validation_dataset_base_path",
    "validation_dataset_metadata_path",
    "validation_loss_steps",
    "validation_loss_sigmas",
    "output_path",  # a copy of the output folder resumed in another place
    "lora_formats",
    "align_to_opensource_format",  # DiffSynth-Studio's name for --lora_formats kohya
    "save_dtype",
}  # what a resumed run may change without training differently (what it saves, logs and samples)


@dataclass
class TrainState:
    """Progress, passed from step to step and saved in checkpoints."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch in progress
    batches_done: int = 0  # micro-batches of this epoch each process has trained on (all: this x processes)
    loss: float = math.nan  # mean loss of the last step, over micro-batches and processes
    grad_norm: float | None = None  # the last step's gradient norm before clipping (None: not clipped)
    lr: float | None = None  # the learning rate the last step used (the scheduler has moved on to the next)


@dataclass
class Run:
    """What `setup` builds and every step uses."""

    config: TrainConfig
    accelerator: Any  # accelerate.Accelerator
    task: TrainingTask
    dataset: Dataset
    model: nn.Module  # the denoiser as trained: with the LoRA, possibly wrapped (DDP, DeepSpeed)
    trainable: dict[str, nn.Parameter]  # name (in the unwrapped denoiser) -> parameter
    optimizer: Any
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    lora: bool
    cached: bool
    steps_per_epoch: int
    total_steps: int
    output: Path
    validation_references: list | None = None  # --validation_images loaded (PIL, RGB): a list per prompt
    dmd2: dmd2_task.DMD2 | None = None  # --task dmd2: the fake score (and teacher copy) with its optimizer
    ema: EMA | None = None  # --ema_decay: the moving average of the trained weights
    teacher: nn.Module | None = None  # --task trajectory_imitation: the frozen copy (None: the base, LoRA off)
    validation_set: validation_loss.HeldOut | None = None  # --validation_dataset_base_path: its rows, encoded
    # --validation_prompts_file: each line and its reference pictures (loaded; None where it gives none)
    prompt_lines: list[tuple[SamplePrompt, list | None]] = field(default_factory=list)


# ----------------------------------------------------------------------------------- the recipe
def train(config: TrainConfig) -> TrainState:
    """Train as `config` says; returns the final state."""
    if not config.check().resume:
        refuse_older_run(Path(config.output_path) / CHECKPOINTS)
    run = setup(config)
    acc, cfg = run.accelerator, run.config
    state = TrainState()
    if cfg.resume:
        found = find_checkpoint(cfg.resume, run.output)
        if found is None:
            logger.info("--resume latest: no checkpoint in %s yet, starting from scratch", run.output / CHECKPOINTS)
        else:
            state = resume(run, found, state)
            if acc.is_main_process:
                forget_metrics_after(run.output / METRICS_FILE, state.step)
                # a run that went on past this checkpoint is a branch left: its later checkpoints are moved aside
                set_aside_later(run.output / CHECKPOINTS, state.step)
            acc.wait_for_everyone()
    if cfg.report_to:  # accelerate starts them on the main process only
        acc.init_trackers(cfg.tracker_project_name, config=tracking.hyperparameters(dataclasses.asdict(cfg)))
    if cfg.resume and state.step > 0:
        catch_up_validation(run, state)
    capped = run.total_steps < run.steps_per_epoch * cfg.num_epochs
    logger.info(
        "training %s %s: %d steps (%d per epoch x %d epochs%s), from step %d",
        run.task.family,
        "LoRA" if run.lora else "full weights",
        run.total_steps,
        run.steps_per_epoch,
        cfg.num_epochs,
        f", capped by --max_steps {cfg.max_steps}" if capped else "",
        state.step,
    )
    if cfg.sample_at_first and state.step == 0:  # the base model's samples and loss, to compare the run with
        if cfg.samples_validation:
            validate(run, state)
        if run.validation_set is not None:
            validation_loss.validate_loss(run, state)
    progress = _progress(run, state)
    started, since = time.perf_counter(), state.step
    while state.step < run.total_steps and state.epoch < cfg.num_epochs:
        plan = batch_plan(
            plan_keys(run.dataset, cfg.batch_size),
            batch_size=cfg.batch_size,
            repeat=cfg.dataset_repeat,
            seed=cfg.seed,
            epoch=state.epoch,
            rank=acc.process_index,
            world=acc.num_processes,
            accumulation=cfg.gradient_accumulation_steps,
            repeats=run.dataset.repeats,
        )
        if state.batches_done >= len(plan):  # resumed at the very end of an epoch
            state = replace(state, epoch=state.epoch + 1, batches_done=0)
            continue
        loader = DataLoader(
            run.dataset, batch_sampler=plan[state.batches_done :], num_workers=cfg.dataset_num_workers, collate_fn=list
        )
        group: list[list[dict]] = []
        for items in loader:
            group.append(items)
            if len(group) < cfg.gradient_accumulation_steps:
                continue
            state = train_step(run, state, group)
            group = []
            epoch_done = state.batches_done >= len(plan)
            if epoch_done:
                state = replace(state, epoch=state.epoch + 1, batches_done=0)
            progress.update(1)
            progress.set_postfix(loss=f"{state.loss:.4f}", epoch=state.epoch)
            if state.step % cfg.log_every == 0 or state.step == run.total_steps:
                _log(run, state, (time.perf_counter() - started) / max(state.step - since, 1))
            if epoch_done or state.step == run.total_steps or (cfg.save_steps and state.step % cfg.save_steps == 0):
                save(run, state)
            if samples_due(run, state.step):
                validate(run, state)
            if validation_loss.due(run, state.step):  # --validation_dataset_base_path (validation_loss.py)
                validation_loss.validate_loss(run, state)
            if state.step >= run.total_steps:
                break
    progress.close()
    # every rank at the same point before the process group goes: a rank that tears its gloo connections down while
    # another is still finishing can abort that one at exit ("terminate called without an active exception")
    acc.wait_for_everyone()
    acc.end_training()
    return state


def setup(config: TrainConfig) -> Run:
    """Load the task (without encoders when training from a cache), the data, the LoRA or trainable weights, and
    the optimizer."""
    from accelerate.utils import DistributedDataParallelKwargs, set_seed

    cfg = config.check()
    cfg.check_data_paths()
    tracking.check_trackers(cfg.report_to)
    cls = task_class(cfg)
    check_loss_masks(cfg, cls)
    check_video_settings(cfg, cls)
    denoiser = getattr(cls, "denoiser_slot", "dit")
    if cfg.enable_model_cpu_offload and denoiser not in cfg.offload_models:  # DiffSynth-Studio's flag
        cfg = replace(cfg, offload_models=[*cfg.offload_models, denoiser]).check()
    # a family whose denoiser has weights that never get a gradient says so (Qwen-Image's last text stream)
    # a LoHa / LoKr layer --module_dropout leaves out of a step gets no gradient in that step's process
    find_unused = cfg.find_unused_parameters or cfg.module_dropout > 0
    find_unused = find_unused or getattr(cls, "ddp_find_unused_parameters", False)
    acc = make_accelerator(cfg, kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused)])
    offload.check_processes(cfg, acc)
    set_seed(cfg.seed)
    cached = cfg.cache_dir is not None
    with loading_whole_models(acc):
        task = build_task(cls, cfg, acc.device, encoders=not cached, denoiser=True)
    check_video_settings(cfg, task)
    dataset = CachedDataset(cfg.cache_dir, expected=encoding_settings(cfg, task)) if cached else make_dataset(cfg, task)
    prepare = getattr(task, "prepare_dataset", None)  # optional: a task that reads settings from the data up front
    if callable(prepare):
        prepare(dataset)
    report_extra_inputs(cfg, dataset)

    slot = task.denoiser_slot
    module = task.models[slot]
    module.requires_grad_(False)
    lora = not cfg.trainable_models
    _check_slots(cfg, task)
    parts = trained_parts(cfg, task)
    if cfg.task == "direct_distill" and not callable(getattr(task, "inference_sigmas", None)):
        raise ConfigError(
            f"--task direct_distill: the {task.family} training task has no inference schedule to sample with "
            "(inference_sigmas); it trains with --task sft"
        )
    if cfg.task == "dmd2":
        dmd2_task.check_run(cfg, task, acc)
    if cfg.task == "trajectory_imitation":
        trajectory.check_run(cfg, task)
    check_timestep_sampling(cfg, task)
    if cfg.samples_validation and not callable(getattr(task, "sample", None)):
        flag = "--validation_prompts" if cfg.validation_prompts else "--validation_prompts_file"
        raise ConfigError(f"{flag}: the {task.family} training task cannot sample images yet")
    references = validation_references(cfg, task)
    prompt_lines = prompts_file_samples(cfg, task)
    if cfg.use_gradient_checkpointing:
        if not hasattr(module, "gradient_checkpointing"):
            raise ConfigError(f"--use_gradient_checkpointing: {type(module).__name__} has no gradient_checkpointing")
        module.gradient_checkpointing = True
    if lora:
        fuse_preset_lora(module, cfg, task)
    # DMD2's fake score (and, for full fine-tuning, its teacher) copy the denoiser as loaded (with a fused preset);
    # a LoRA started from --lora_checkpoint: the denoiser with that file's LoRA, built once it is in
    dmd2_from_file = cfg.task == "dmd2" and lora and cfg.lora_checkpoint is not None
    dmd2 = dmd2_task.build(cfg, module, lora) if cfg.task == "dmd2" and not dmd2_from_file else None
    if lora:
        start = read_lora_checkpoint(task, module, cfg.lora_checkpoint) if cfg.lora_checkpoint else None
        add_lora(module, cfg, parts, task)
        if start is not None:
            load_into_lora_layers(module, start, cfg.lora_rank, cfg.lora_alpha or cfg.lora_rank, cfg.lora_checkpoint)
    else:  # the whole denoiser in the trainable dtype (its layers run in one dtype); only `parts` learn
        module.to(parse_dtype(cfg.trainable_dtype))
        for path in parts or ("",):
            module.get_submodule(path).requires_grad_(True)
    if dmd2_from_file:
        dmd2 = dmd2_task.build(cfg, module, lora, started_from_file=True)
    teacher = None
    if cfg.task == "trajectory_imitation":  # the model as the run starts (before any step, or a resume)
        teacher = trajectory.make_teacher(module, lora, cfg.lora_checkpoint is not None)
    module.train()
    trainable = {name: p for name, p in module.named_parameters() if p.requires_grad}
    logger.info(
        "training %d tensors, %.2fM parameters", len(trainable), sum(p.numel() for p in trainable.values()) / 1e6
    )

    per_epoch = steps_per_epoch(
        plan_keys(dataset, cfg.batch_size),
        batch_size=cfg.batch_size,
        repeat=cfg.dataset_repeat,
        world=acc.num_processes,
        accumulation=cfg.gradient_accumulation_steps,
        repeats=dataset.repeats,
    )
    if per_epoch == 0:
        raise ConfigError(
            f"{len(dataset)} samples x --dataset_repeat {cfg.dataset_repeat} in batches of --batch_size "
            f"{cfg.batch_size} over {acc.num_processes} processes give less than one step of "
            f"--gradient_accumulation_steps {cfg.gradient_accumulation_steps}; lower those or raise --dataset_repeat"
        )
    if acc.is_main_process:
        report_left_out(cfg, dataset, acc.num_processes)
    total = per_epoch * cfg.num_epochs if cfg.max_steps is None else min(cfg.max_steps, per_epoch * cfg.num_epochs)
    if (is_sharded(acc) or is_deepspeed(acc)) and (cfg.optimizer != "adamw" or cfg.ema_decay is not None):
        raise ConfigError(
            f"--optimizer {cfg.optimizer} / --ema_decay: {distributed_kind(acc)} shards the trained weights and "
            "their optimizer itself; use --optimizer adamw without --ema_decay there (DDP takes every optimizer)"
        )
    optimizer = make_optimizer(
        cfg.optimizer, parameter_groups(cfg, trainable), cfg.learning_rate, cfg.weight_decay, cfg.optimizer_options
    )
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg, total))
    if (is_sharded(acc) or is_deepspeed(acc)) and slot in cfg.fp8_models:
        raise ConfigError(
            f"--fp8_models {slot}: {distributed_kind(acc)} manages the denoiser's weights itself; leave it out of "
            "--fp8_models"
        )
    if is_deepspeed(acc):
        configure_deepspeed(acc, cfg)
    elif is_sharded(acc):
        configure_fsdp(acc, module)
    # --offload_models: the named models are still in CPU memory, the LoRA in them; from here their blocks stream
    streamed = slot in cfg.offload_models
    if streamed:  # copies taken of the denoiser in CPU memory run on the device, as a resident one's do
        offload.to_device(acc.device, dmd2 and dmd2.fake_score, dmd2 and dmd2.teacher, teacher)
    stream_from_cpu(cfg, task, acc.device, all_loaded=not cached)
    # accelerate moves a prepared model to the device whole unless told not to (DeepSpeed, which refuses the
    # argument even unused, never runs with a streamed model: `offload.check_processes`)
    placement = {"device_placement": [False, None]} if streamed else {}
    model, optimizer = acc.prepare(module, optimizer, **placement)
    # FSDP replaces the parameters with sharded ones: name the ones the optimizer now holds (ZeRO-3 keeps the
    # objects and empties them)
    trainable = {name: p for name, p in acc.unwrap_model(model).named_parameters() if p.requires_grad}
    if cfg.module_dropout:
        keep_trained_weights_in_graph(acc.unwrap_model(model), list(trainable.values()))
    store_in_fp8(cfg, task, acc.device, all_loaded=not cached)
    ema = EMA(trainable, cfg.ema_decay) if cfg.ema_decay is not None else None
    # the held-out rows encoded once, now that the encoders are where training runs them (fp8, streamed), or read
    # from --cache_dir
    held_out = validation_loss.build(cfg, task, acc) if cfg.validation_dataset_base_path else None

    output = Path(cfg.output_path)
    if acc.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        dump_yaml(cfg, output / "config.yaml")
    return Run(
        cfg,
        acc,
        task,
        dataset,
        model,
        trainable,
        optimizer,
        lr_scheduler,
        lora,
        cached,
        per_epoch,
        total,
        output,
        references,
        dmd2,
        ema,
        teacher,
        validation_set=held_out,
        prompt_lines=prompt_lines,
    )


def report_left_out(cfg: TrainConfig, dataset: Dataset, world: int) -> None:
    """Say once how many samples each epoch leaves out: batches are trained in whole groups of processes x
    accumulation steps, and the rest of an epoch's batches is dropped."""
    left_out, samples = left_out_samples(
        plan_keys(dataset, cfg.batch_size),
        batch_size=cfg.batch_size,
        repeat=cfg.dataset_repeat,
        seed=cfg.seed,
        world=world,
        accumulation=cfg.gradient_accumulation_steps,
        repeats=dataset.repeats,
    )
    if left_out:
        logger.info(
            "%d of %d samples per epoch are left out (about as many each epoch, other ones each time): the batches "
            "of --batch_size %d are trained in whole groups of %d processes x --gradient_accumulation_steps %d; "
            "another --dataset_repeat or --batch_size may leave fewer out",
            left_out,
            samples,
            cfg.batch_size,
            world,
            cfg.gradient_accumulation_steps,
        )


def micro_batch_noise(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator of the timesteps and noise of micro-batch `index` of `epoch`, counted over all processes.

    Keyed by the batch, not drawn from one stream per process: batch `index` is the same data (`batch_plan`) and
    gets the same noise whether one process trains it with gradient accumulation or N processes each train
    one of N consecutive batches, so `--gradient_accumulation_steps N` on one GPU and DDP on N GPUs take the
    same optimizer steps. Resuming needs no generator state either."""
    return micro_batch_generator(seed, epoch, index)


# the streams a micro-batch draws from besides its noise (stream 0): each its own generator, independent of the others
# (a task's choices, --caption_dropout, --flip_aug, the adapter dropouts, --shuffle_caption / --caption_tag_dropout)
CHOICES_STREAM, CAPTIONS_STREAM, FLIPS_STREAM, DROPOUT_STREAM, TAGS_STREAM = 1, 2, 3, 4, 5


def micro_batch_generator(seed: int, epoch: int, index: int, stream: int = 0) -> torch.Generator:
    """The generator of micro-batch `index` of `epoch` for one `stream` of draws (0: timesteps and noise; see
    `micro_batch_noise`); other streams are the key moved by that many steps of a 64-bit LCG."""
    key = ((seed % 2**31) * 1_000_003 + epoch) * 1_000_003 + index
    for _ in range(stream):
        key = (key * 6364136223846793005 + 1442695040888963407) % 2**64
    return torch.Generator().manual_seed(key % 2**63)


def timestep_distribution(cfg: TrainConfig) -> dict[str, Any]:
    """`--timestep_sampling` as `sample_training_sigmas` arguments (none for uniform: every family's default)."""
    if cfg.timestep_sampling == "uniform":
        return {}
    return {"distribution": cfg.timestep_sampling, "logit_mean": cfg.logit_mean, "logit_std": cfg.logit_std}


def check_loss_masks(cfg: TrainConfig, cls: type) -> None:
    """`--masked_loss` / `--alpha_mask` with a task whose latents are no grid of cells (its optional
    `takes_loss_masks = False`, LTX-2's tokens) is refused before any model loads."""
    if cfg.uses_loss_masks and not getattr(cls, "takes_loss_masks", True):
        raise ConfigError(
            f"--masked_loss: the {getattr(cls, 'family', cls.__name__)} training task's latents are a token "
            "sequence, not a grid a picture's mask can weigh; train without --masked_loss / --alpha_mask"
        )


VIDEO_SETTINGS = ("num_frames", "video_frame_extraction", "video_frame_stride", "video_frame_samples", "video_fps")


def check_video_settings(cfg: TrainConfig, task: Any) -> None:
    """A family that trains on pictures only (its `media` lists no "video") reads no clips: a clip setting given
    would do nothing, so it is refused. `task` is the task class, before any model loads, where it states its media
    (else the built task: Qwen-Image's depend on the model)."""
    media = getattr(task, "media", None)
    if not isinstance(media, (tuple, list)) or "video" in media:
        return
    defaults = TrainConfig()
    given = [name for name in VIDEO_SETTINGS if getattr(cfg, name) != getattr(defaults, name)]
    if given:
        family = getattr(task, "family", type(task).__name__)
        raise ConfigError(
            f"--{given[0]} {getattr(cfg, given[0])}: the {family} training task trains on pictures; video clip "
            "settings do nothing there"
        )


def check_timestep_sampling(cfg: TrainConfig, task: TrainingTask) -> None:
    """A family whose scheduler draws its own noise levels (LTX-2's shifted logit-normal) takes no other draw."""
    accepted = inspect.signature(task.scheduler.sample_training_sigmas).parameters
    takes = "distribution" in accepted or any(p.kind is p.VAR_KEYWORD for p in accepted.values())
    if timestep_distribution(cfg) and not takes:
        raise ConfigError(
            f"--timestep_sampling {cfg.timestep_sampling}: the {task.family} task draws its noise levels its own way "
            "(see its --task_options, e.g. LTX-2's timestep_sampling)"
        )


def parameter_groups(cfg: TrainConfig, trainable: Mapping[str, nn.Parameter]) -> list:
    """The optimizer's parameters: one group, or with `--lora_plus_ratio` (LoRA+, Hayou et al. 2024) the LoRA's B
    matrices in a second group at that many times the learning rate (the schedule scales both alike)."""
    if cfg.lora_plus_ratio is None:
        return list(trainable.values())
    fast = [p for name, p in trainable.items() if ".lora_B." in name]
    if not fast:
        raise ConfigError("--lora_plus_ratio: the trained weights hold no LoRA B matrices (lora_B)")
    rest = [p for name, p in trainable.items() if ".lora_B." not in name]
    return [{"params": rest}, {"params": fast, "lr": cfg.learning_rate * cfg.lora_plus_ratio}]


def drop_captions(cfg: TrainConfig, items: list[dict], epoch: int, index: int) -> list[dict]:
    """`--caption_dropout p`: each row's prompt emptied with chance p, drawn from a generator keyed by the
    micro-batch (as its noise, another stream), so reruns, resumes and DDP drop the same rows."""
    if not cfg.caption_dropout:
        return items
    generator = micro_batch_generator(cfg.seed, epoch, index, CAPTIONS_STREAM)
    drops = torch.rand(len(items), generator=generator) < cfg.caption_dropout
    dropped = zip(items, drops.tolist(), strict=True)
    return [{**item, "prompt": ""} if drop and "prompt" in item else item for item, drop in dropped]


def flip_rows(run: Run, items: list[dict], epoch: int, index: int) -> list[dict]:
    """`--flip_aug`: each row's pictures, videos, masks and reference pictures mirrored left to right together
    with chance 1/2, drawn per micro-batch (another stream), so reruns, resumes and DDP flip the same rows. A
    flipped row's stereo sound swaps its channels (what was heard on the left now is on the right), and a task's
    `flip_row(row)` (optional) mirrors what the row's other columns say (Wan Control-Camera's camera direction)."""
    if not run.config.flip_aug:
        return items
    flips = torch.rand(len(items), generator=micro_batch_generator(run.config.seed, epoch, index, FLIPS_STREAM)) < 0.5
    keys = [k for k in (*run.dataset.file_keys, MASK_COLUMN) if k not in AUDIO_KEYS]
    own = getattr(run.task, "flip_row", None)
    return [_flipped(item, keys, own) if flip else item for item, flip in zip(items, flips.tolist(), strict=True)]


def _flipped(item: dict, keys: list[str], own: Any) -> dict:
    """One row mirrored: its `keys` files along their width, its loaded sound's channels swapped, then the task's
    `own` change of its columns."""
    row = {**item, **{k: _mirrored(item[k]) for k in keys if k in item}}
    for key in AUDIO_KEYS:
        if isinstance(row.get(key), torch.Tensor) and row[key].dim() == 2:  # [channels, samples]: left <-> right
            row[key] = row[key].flip(0)
    return own(row) if own is not None else row


def _mirrored(value):
    """A loaded picture or video (`[C, (F,) H, W]`), or a list of them, mirrored along its width."""
    if isinstance(value, torch.Tensor):
        return value.flip(-1)
    if isinstance(value, list):
        return [_mirrored(v) for v in value]
    return value  # a path the task reads itself (a sound file)


def keep_trained_weights_in_graph(module: nn.Module, trained: list[nn.Parameter]) -> None:
    """`--module_dropout` may leave out every LoHa / LoKr layer in a micro-batch: the denoiser's output then holds
    no trained weight and its backward pass would fail. A forward hook adds `0 * sum` of the trained weights to such
    an output (a tensor, or the first of a tuple) inside the call, so the micro-batch gives them zero gradients and
    DDP, which finds the weights an output used as the call returns, reduces them as in any other step (added to the
    loss after the call, DDP would count them unused and then see their gradients: an error)."""

    def hook(mod: nn.Module, args, output):
        many = type(output) in (tuple, list) and len(output) > 0
        first = output[0] if many else output
        if not (mod.training and torch.is_grad_enabled() and isinstance(first, torch.Tensor)) or first.requires_grad:
            return None
        first = first + 0 * sum(p.sum() for p in trained).to(first.dtype)
        return type(output)([first, *output[1:]]) if many else first

    module.register_forward_hook(hook)


def untouched_weights_as_zero(run: Run, loss: torch.Tensor) -> torch.Tensor:
    """`loss` on which a backward pass runs: one that holds no trained weight (`--module_dropout` left out every
    layer of a family call that bypasses the denoiser's forward hook) gets `0 * sum` of them added, zero gradients."""
    if loss.requires_grad or not run.config.module_dropout:
        return loss
    return loss + 0 * sum(p.sum() for p in run.trainable.values()).to(loss.dtype)


def seed_adapter_dropout(cfg: TrainConfig, epoch: int, index: int) -> None:
    """`--lora_dropout` / `--rank_dropout` / `--module_dropout` draw from torch's global generators (peft's layers
    do): seed them from the micro-batch's key (another stream) so reruns and resumes drop the same units."""
    if cfg.lora_dropout or cfg.rank_dropout or cfg.module_dropout:
        generator = micro_batch_generator(cfg.seed, epoch, index, DROPOUT_STREAM)
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))


def draw_batch_choices(run: Run, batch: dict[str, Any], epoch: int, index: int) -> dict[str, Any]:
    """`batch` with the random choices a task makes per batch (its optional `draw_choices(batch, generator)`, e.g.
    LTX-2's first-frame conditioning) drawn from a generator keyed by the micro-batch like its noise (another key:
    the two streams stay independent), so DDP and gradient accumulation draw alike and resuming needs no state."""
    draw = getattr(run.task, "draw_choices", None)
    if not callable(draw):
        return batch
    return {**batch, **draw(batch, micro_batch_generator(run.config.seed, epoch, index, CHOICES_STREAM))}


def train_step(run: Run, state: TrainState, group: list[list[dict]]) -> TrainState:
    """One optimizer step over `group`, a list of micro-batches (each a list of dataset items)."""
    acc, cfg = run.accelerator, run.config
    if run.dmd2 is not None:  # the student's and the fake score's updates (dmd2.py)
        student_stepped = dmd2_task.student_updates(cfg, state.step)
        state = dmd2_task.dmd2_step(run, state, group)
        if run.ema is not None and student_stepped:  # the average moves only when the student does
            run.ema.update(run.trainable)
        return state
    denoiser = PreparedDenoiser(run.model, acc.unwrap_model(run.model))
    losses = []
    for k, items in enumerate(group):
        index = (state.batches_done + k) * acc.num_processes + acc.process_index  # batch_plan's order
        items = augment_rows(cfg, items, micro_batch_generator(cfg.seed, state.epoch, index, TAGS_STREAM))
        items = flip_rows(run, drop_captions(cfg, items, state.epoch, index), state.epoch, index)
        batch = draw_batch_choices(run, prepare_batch(run, items), state.epoch, index)
        last = k == len(group) - 1
        seed_adapter_dropout(cfg, state.epoch, index)
        sync = acc.no_sync(run.model) if not last else contextlib.nullcontext()
        with sync:
            with acc.autocast():
                if cfg.task == "direct_distill":
                    loss = direct_distill_loss(run, denoiser, batch, distill_plan(cfg, items))
                elif cfg.task == "trajectory_imitation":
                    noise = micro_batch_noise(cfg.seed, state.epoch, index)
                    with _saved_activations(cfg, batch["latents"].device):
                        loss = trajectory.trajectory_loss(run, denoiser, items, batch, noise)
                else:
                    loss = flow_matching_loss(run, denoiser, batch, micro_batch_noise(cfg.seed, state.epoch, index))
            loss = untouched_weights_as_zero(run, loss)
            if is_deepspeed(acc):  # DeepSpeed steps (and clips) inside the last backward pass
                deepspeed_backward(acc, loss / len(group), last=last)
            else:
                acc.backward(loss / len(group))
        losses.append(loss.detach().float())
    grad_norm = None
    if not is_deepspeed(acc):
        if cfg.max_grad_norm > 0:  # the total norm before clipping, logged (a spike shows a bad batch or rate)
            grad_norm = float(acc.clip_grad_norm_(list(run.trainable.values()), cfg.max_grad_norm))
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.update(run.trainable)
    lr = run.lr_scheduler.get_last_lr()[0]  # this step's rate, logged
    run.lr_scheduler.step()
    loss = acc.reduce(torch.stack(losses).mean(), reduction="mean")
    if not torch.isfinite(loss):
        logger.warning("step %d: the loss is %s", state.step + 1, float(loss))
    done = state.batches_done + len(group)
    return replace(state, step=state.step + 1, batches_done=done, loss=float(loss), grad_norm=grad_norm, lr=lr)


def flow_matching_loss(
    run: Run, model: nn.Module, batch: dict[str, Any], noise_rng: torch.Generator, sigma: torch.Tensor | None = None
) -> torch.Tensor:
    """Weighted loss (`--loss_type`; MSE by default) between the predicted and the true velocity at sigmas drawn
    from the family's training grid (or the given `sigma`, one per sample: the validation loss's fixed levels).
    Sigmas and noise are drawn on the CPU from `noise_rng`, so a run is reproducible on any device. Each sample's
    error is the mean over the elements a task's `loss_mask` and the `--masked_loss` masks count (`weighted_mean`)."""
    cfg, scheduler = run.config, run.task.scheduler
    x0 = batch["latents"].float()
    if sigma is None:
        sigma = scheduler.sample_training_sigmas(
            x0.shape[0],
            noise_rng,
            min_boundary=cfg.min_timestep_boundary,
            max_boundary=cfg.max_timestep_boundary,
            **timestep_distribution(cfg),
        )
    noise = torch.randn(x0.shape, generator=noise_rng).to(x0.device)
    noisy = scheduler.add_noise(x0, noise, sigma.to(x0.device))
    with _saved_activations(cfg, x0.device):
        predicted = run.task.velocity(model, batch, noisy, sigma.to(x0.device))
    error = weighted_mean(run, batch, elementwise_loss(cfg, predicted.float() - scheduler.training_target(x0, noise)))
    if cfg.loss_weighting == "scheduler":
        error = error * scheduler.training_weight(sigma).to(x0.device)
    return weighted_by_dataset(batch, error).mean()  # --dataset_config loss_weight


@dataclass(frozen=True)
class DistillPlan:
    """What direct distillation reads from a micro-batch's rows: each row's seed and noise device, and the
    sampling steps they share."""

    seeds: tuple[int, ...]
    rand_devices: tuple[str, ...]
    steps: int


def distill_plan(cfg: TrainConfig, rows: Sequence[Mapping[str, Any]]) -> DistillPlan:
    """The rows' `seed` (required: the seed their image was generated with), `rand_device` (default cpu) and
    `num_inference_steps` (default `--distill_num_inference_steps`; one value per micro-batch), as DiffSynth-Studio's
    metadata columns; a `cfg_scale` column, if any, must be 1 (the few-step sampling runs without CFG)."""
    seeds, devices, steps = [], [], set()
    for i, row in enumerate(rows):
        where = f"--task direct_distill: row {i} of the batch (prompt {str(row.get('prompt', ''))[:40]!r})"
        value = row.get("seed")
        try:
            seeds.append(int(str(value).strip()))
        except ValueError:
            raise ConfigError(
                f"{where} has seed {value!r}: each row needs the integer seed its image was generated with"
            ) from None
        devices.append(str(row.get("rand_device") or "cpu").strip())
        value = row.get("num_inference_steps")
        try:
            steps.add(cfg.distill_num_inference_steps if value in (None, "") else int(str(value).strip()))
        except ValueError:
            raise ConfigError(f"{where} has num_inference_steps {value!r}; give an integer >= 1") from None
        value = row.get("cfg_scale")
        if value not in (None, "") and _number(value) != 1.0:
            raise ConfigError(
                f"{where} has cfg_scale {value}: the distilled sampling runs without CFG (1), as DiffSynth-Studio's"
            )
    if len(steps) != 1 or min(steps) < 1:
        raise ConfigError(
            f"--task direct_distill: the rows of one batch need one num_inference_steps >= 1, got {sorted(steps)}; "
            "use --batch_size 1 or one value"
        )
    return DistillPlan(tuple(seeds), tuple(devices), steps.pop())


def _number(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def direct_distill_loss(run: Run, model: nn.Module, batch: dict[str, Any], plan: DistillPlan) -> torch.Tensor:
    """DiffSynth-Studio's direct distillation: sample each row in `plan.steps` Euler steps from its seed's noise
    (the pipeline's `seeded_noise`) on the family's inference schedule for that size (`task.inference_sigmas`),
    without CFG and with gradients through every step, and take the MSE between the result and the row's
    latents (an image the model made with many steps from the same seed); `--loss_type` other than mse in its place."""
    difference = distill_sample(run, model, batch, plan) - batch["latents"].float()
    error = weighted_mean(run, batch, elementwise_loss(run.config, difference))
    return weighted_by_dataset(batch, error).mean()  # --dataset_config loss_weight


def elementwise_loss(cfg: TrainConfig, difference: torch.Tensor) -> torch.Tensor:
    """Each element's loss for a prediction's `difference` from its target (`--loss_type`): mse (the square), l1
    (the absolute value), or kohya's pseudo-Huber forms, which are square near 0 and grow linearly beyond about
    `--huber_c`, so a few far-off elements (a noisy sample, a badly cropped picture) pull the weights less:
    huber `2c(sqrt(d^2 + c^2) - c)` and smooth_l1 `2(sqrt(d^2 + c^2) - c)`."""
    if cfg.loss_type == "mse":
        return difference.pow(2)
    if cfg.loss_type == "l1":
        return difference.abs()
    c = cfg.huber_c
    pseudo_huber = torch.sqrt(difference.pow(2) + c * c) - c
    return 2 * c * pseudo_huber if cfg.loss_type == "huber" else 2 * pseudo_huber


def weighted_mean(run: Run, batch: dict[str, Any], losses: torch.Tensor) -> torch.Tensor:
    """Each sample's mean of `losses` over the elements that count: the task's `loss_mask` (Wan TI2V leaves out
    its given first frame) times the `--masked_loss` weights, each element at its weight."""
    mask = run.task.loss_mask(batch) if callable(getattr(run.task, "loss_mask", None)) else None
    weights = batch.get(WEIGHTS_KEY)
    if weights is not None:
        mask = weights if mask is None else mask.to(weights) * weights
    if mask is None:
        return losses.flatten(1).mean(1)
    mask = mask.to(losses).expand_as(losses).flatten(1)
    return (losses.flatten(1) * mask).sum(1) / mask.sum(1)


def distill_sample(run: Run, model: nn.Module, batch: dict[str, Any], plan: DistillPlan) -> torch.Tensor:
    """The latents `model` samples for the batch's rows in `plan.steps` Euler steps from their seeds' noise,
    without CFG: what the family's pipeline makes with those seeds and steps at `cfg_scale` 1."""
    x0 = batch["latents"]
    noise = [seeded_noise(x0.shape[1:], seed, dev) for seed, dev in zip(plan.seeds, plan.rand_devices, strict=True)]
    x = torch.stack(noise).to(x0.device)
    sigmas = run.task.inference_sigmas(tuple(x0.shape), plan.steps).to(x0.device)
    with _saved_activations(run.config, x0.device):
        for i in range(plan.steps):
            velocity = run.task.velocity(model, batch, x, sigmas[i].expand(x0.shape[0]))
            x = x + (sigmas[i + 1] - sigmas[i]) * velocity.float()
    return x


def validate(run: Run, state: TrainState) -> list[Path]:
    """Sample `--validation_prompts` with the weights as they are now (main process; the same seed each time;
    `--validation_height/width/num_inference_steps` when given, each prompt's `--validation_images` as its
    references), then each line of `--validation_prompts_file` with its own settings over those, into
    OUTPUT/validation/step-N-K.png (or .mp4 for a video family, with its sound when the
    family makes one, at the task's `sample_fps` when it has one)."""
    from diffsynth.runtime.media import mux_video_audio, save_image, save_video

    acc, cfg = run.accelerator, run.config
    options = {
        name: value
        for name in ("height", "width", "num_inference_steps")
        if (value := getattr(cfg, f"validation_{name}")) is not None
    }
    written: list[Path] = []
    if acc.is_main_process or is_sharded(run.accelerator):  # a sharded model's forward needs every process
        module = acc.unwrap_model(run.model)
        module.eval()
        try:
            with torch.no_grad():
                samples = []
                if cfg.validation_prompts:
                    given = {} if run.validation_references is None else {"references": run.validation_references}
                    prompts = validation_prompts(cfg)
                    samples += run.task.sample(module, prompts, seed=cfg.validation_seed, **options, **given)
                for line, references in run.prompt_lines:  # --validation_prompts_file: one call a line
                    given = {} if references is None else {"references": [references]}
                    seed = cfg.validation_seed if line.seed is None else line.seed
                    prompt = with_trigger(cfg, line.prompt)
                    samples += run.task.sample(module, [prompt], seed=seed, **{**options, **line.options}, **given)
        finally:
            module.train()
    if acc.is_main_process:
        folder = run.output / "validation"
        folder.mkdir(parents=True, exist_ok=True)
        fps = getattr(run.task, "sample_fps", None) or 16
        for k, sample in enumerate(samples):
            if isinstance(sample, tuple) and len(sample) == 2 and isinstance(sample[0], list):  # frames and sound
                path = folder / f"{step_name(state.step)}-{k}.mp4"
                frames, (waveform, sample_rate) = sample
                mux_video_audio(frames, waveform, sample_rate, path, fps=fps)
            elif isinstance(sample, (list, tuple)):  # video frames
                path = folder / f"{step_name(state.step)}-{k}.mp4"
                save_video(sample, path, fps=fps)
            else:
                path = folder / f"{step_name(state.step)}-{k}.png"
                save_image(sample, path)
            written.append(path)
        logger.info("step %d: validation samples in %s", state.step, folder)
        if cfg.report_to:
            tracking.log_pictures(acc, samples, state.step)
    acc.wait_for_everyone()
    return written


def samples_due(run: Run, step: int) -> bool:
    """Whether validation samples are drawn after optimizer step `step`: every `--validation_steps` and at the last."""
    cfg = run.config
    every = cfg.validation_steps
    return cfg.samples_validation and (step == run.total_steps or bool(every and step % every == 0))


def catch_up_validation(run: Run, state: TrainState) -> None:
    """A run stopped between writing a checkpoint and validating it (a crash in the sampling or the loss) left that
    step without its samples or validation loss for good: the resumed run starts after it. Run what was due there
    and is missing now, with the random states put back afterwards, so training goes on as from the checkpoint."""
    samples, loss = _missing_validation(run, state.step)
    if not (samples or loss):
        return
    logger.info("step %d: validation due at the resumed checkpoint was not done; running it now", state.step)
    saved = rng_state()
    try:
        if samples:
            validate(run, state)
        if loss:
            validation_loss.validate_loss(run, state)
    finally:
        set_rng_state(saved)


def _missing_validation(run: Run, step: int) -> list[bool]:
    """[samples missing, validation loss missing] for `step`, as the main process sees the output folder (every
    process takes its answer: sampling and the loss may need them all)."""
    missing = [
        samples_due(run, step) and not _has_samples(run, step),
        validation_loss.due(run, step) and not _has_validation_loss(run.output / METRICS_FILE, step),
    ]
    if run.accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(missing)
    return missing


def _has_samples(run: Run, step: int) -> bool:
    """Whether OUTPUT/validation holds every picture (or video) `validate` writes for `step`."""
    folder, count = run.output / "validation", len(run.config.validation_prompts or []) + len(run.prompt_lines)
    names = (f"{step_name(step)}-{k}" for k in range(count))
    return all((folder / f"{name}.png").is_file() or (folder / f"{name}.mp4").is_file() for name in names)


def _has_validation_loss(metrics: Path, step: int) -> bool:
    """Whether `metrics` (OUTPUT/metrics.jsonl) holds a validation loss record of `step`."""
    if not metrics.is_file():
        return False
    for line in metrics.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a torn last line from the crash
            continue
        if isinstance(record, dict) and record.get("step") == step and validation_loss.METRIC in record:
            return True
    return False


def validation_prompts(cfg: TrainConfig) -> list[str]:
    """`--validation_prompts`, with `--trigger_word` in place of their `[trigger]`."""
    return [with_trigger(cfg, p) for p in cfg.validation_prompts]


def with_trigger(cfg: TrainConfig, prompt: str) -> str:
    """A validation prompt with `--trigger_word` in place of its `[trigger]`."""
    return prompt.replace(TRIGGER_PLACEHOLDER, cfg.trigger_word) if cfg.trigger_word else prompt


def prompts_file_samples(cfg: TrainConfig, task: TrainingTask) -> list[tuple[SamplePrompt, list | None]]:
    """`--validation_prompts_file`'s lines, each with its `--i` pictures loaded (as `validation_references` loads
    `--validation_images`, None where a line gives none) and checked against the task now: a task that takes no
    references, one that requires them, a count its model cannot take, and an option its pipeline has no
    setting for (e.g. `--f` frames for a picture family) fail at setup, naming the line."""
    if cfg.validation_prompts_file is None:
        return []
    kind = getattr(task, "validation_references", "none")
    check = getattr(task, "reference_arguments", None)
    accepted = _pipeline_settings(task)
    mode = getattr(task, "image_mode", "RGB")
    lines = []
    for line in read_prompts_file(cfg.validation_prompts_file):
        unknown = [name for name in line.options if accepted is not None and name not in accepted]
        if unknown:
            raise ConfigError(f"{line.where}: the {task.family} pipeline has no setting {unknown[0]!r}")
        if line.images and kind == "none":
            raise ConfigError(f"{line.where}: --i: the {task.family} training task samples without reference images")
        if not line.images and kind == "required":
            raise ConfigError(f"{line.where}: the {task.family} model samples from reference images; give --i IMAGE")
        references = [_validation_image(Path("."), str(path), mode) for path in line.images] or None
        if references is not None and callable(check):
            try:
                check(references)
            except ConfigError as exc:
                raise ConfigError(f"{line.where}: --i: {exc}") from None
        lines.append((line, references))
    return lines


def _pipeline_settings(task: TrainingTask) -> set[str] | None:
    """The keyword arguments the task's pipeline call takes; None when it takes any (or the task has no pipeline)."""
    from diffsynth.runtime.pipeline import call_keywords

    pipe = getattr(task, "pipe", None)
    return None if pipe is None else call_keywords(pipe)


def validation_references(cfg: TrainConfig, task: TrainingTask) -> list[list] | None:
    """`--validation_images` loaded once (PIL in the task's optional `image_mode`, "RGB" unless it says "RGBA";
    relative paths read against --dataset_base_path), a list per prompt; None without the flag. The task's
    `validation_references` says what its samples do with references ("none": refused, "optional", "expected":
    warned about when missing, "required": refused when missing) and its optional `reference_arguments(images)`
    checks each prompt's, so a bad flag fails now, not at the first validation step (see `task.py`)."""
    if not cfg.validation_prompts:
        return None
    kind = getattr(task, "validation_references", "none")
    check = getattr(task, "reference_arguments", None)
    if not cfg.validation_images:
        if kind == "required":
            if callable(check):
                check([])  # the family's own words
            raise ConfigError(
                f"--validation_prompts: the {task.family} model draws its samples from reference images; give "
                "--validation_images, one item per prompt"
            )
        if kind == "expected":
            logger.warning(
                "--validation_prompts without --validation_images: the %s model is conditioned on reference "
                "images, but its validation samples are drawn without them",
                task.family,
            )
        return None
    if kind == "none":
        raise ConfigError(
            f"--validation_images: the {task.family} training task takes no reference images for its validation "
            "samples; drop the flag"
        )
    base = Path(cfg.dataset_base_path or ".")
    references, mode = [], getattr(task, "image_mode", "RGB")
    for k, item in enumerate(cfg.validation_images):
        images = [_validation_image(base, name, mode) for name in _reference_names(base, item)]
        if callable(check):
            try:
                check(images)
            except ConfigError as exc:
                raise ConfigError(f"--validation_images item {k + 1} ({item!r}): {exc}") from None
        references.append(images)
    return references


def _reference_names(base: Path, item: str) -> list[str]:
    """One prompt's reference files: the item split on commas, where the pieces that together name a file (a
    path holding a comma) are joined back. Pieces that name nothing are kept apart, for the error to name."""
    names, pending = [], []
    for piece in item.split(","):
        pending.append(piece)
        joined = ",".join(pending).strip()
        if joined and (base / joined).is_file():
            names.append(joined)
            pending = []
    return names + [piece.strip() for piece in pending if piece.strip()]


def _validation_image(base: Path, name: str, mode: str = "RGB"):
    from PIL import Image

    path = base / name  # an absolute name stays as it is
    if not path.is_file():
        raise ConfigError(
            f"--validation_images: no such file {path}"
            + ("" if Path(name).is_absolute() else f" (relative paths are read against --dataset_base_path {base})")
        )
    try:
        with Image.open(path) as image:
            return upright(image).convert(mode)
    except OSError as exc:  # PIL's UnidentifiedImageError is one
        raise ConfigError(f"--validation_images: cannot read {path} as an image ({exc})") from None


def _saved_activations(cfg: TrainConfig, device: torch.device):
    """`--use_gradient_checkpointing_offload`: what autograd saves for the backward pass (with gradient
    checkpointing, each block's input) goes to CPU memory, pinned on CUDA, and comes back for the backward."""
    if not cfg.use_gradient_checkpointing_offload:
        return contextlib.nullcontext()
    return torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda")


def training_metadata(run: Run, state: TrainState) -> dict[str, str]:
    """What a saved LoRA's header says of its training, in kohya's `ss_*` keys (which ComfyUI, the model hubs and
    LoRA tools show) plus ours: the adapter kind, rank and alpha, base model, steps, learning rate, data size."""
    cfg = run.config
    lycoris = cfg.lora_type in ("loha", "lokr")
    values = {
        "ss_network_module": "lycoris.kohya" if lycoris else "networks.lora",
        "ss_network_dim": cfg.lora_rank,
        "ss_network_alpha": cfg.lora_alpha or cfg.lora_rank,
        "ss_network_args": json.dumps({"algo": cfg.lora_type} if lycoris else {"dora_wd": cfg.lora_type == "dora"}),
        "ss_base_model_version": run.task.family,
        "ss_sd_model_name": cfg.model or ",".join([*cfg.model_paths, *cfg.model_id_with_origin_paths]),
        "ss_steps": state.step,
        "ss_epoch": state.epoch,
        "ss_learning_rate": cfg.learning_rate,
        "ss_num_train_images": len(run.dataset),
        "ss_seed": cfg.seed,
        "diffsynth_lora_type": cfg.lora_type,
    }
    return {key: str(value) for key, value in values.items()}


def save(run: Run, state: TrainState) -> None:
    """Write the trained weights (LoRA file(s) or full weights) and a resume checkpoint; prune old ones."""
    acc, cfg = run.accelerator, run.config
    module = acc.unwrap_model(run.model)
    name = step_name(state.step)
    # every process takes part (FSDP and ZeRO-3 gather the shards); a full fine-tune gathers the model once and
    # the resume checkpoint's trained weights are the same tensors, so host memory holds one copy of the model
    if run.lora:
        weights = trained = full_state(module, trainable_only=True)
    else:
        weights = full_state(module, trainable_only=False)
        trained = {name: weights[name] for name in run.trainable} if weights else {}
    if is_deepspeed(acc):  # DeepSpeed writes its optimizer partitions and master weights itself
        optimizer_state = {"deepspeed": {"zero_stage": zero_stage(acc), "processes": acc.num_processes}}
    else:
        optimizer_state = full_optimizer_state(module, run.optimizer)
    if acc.is_main_process:
        if run.lora:
            # how it was trained, and what a task knows the LoRA needs at inference (an IC-LoRA's reference
            # factor: `lora_metadata()`)
            metadata = getattr(run.task, "lora_metadata", None)
            header = {**training_metadata(run, state), **(metadata() if metadata is not None else {})}
            written = save_lora_files(module, run.output, name, cfg.lora_formats, weights, header, run.task)
            if run.ema is not None:  # the average, beside: step-N-ema.safetensors
                averaged = {k: run.ema.shadow.get(k, v) for k, v in weights.items()}
                written += save_lora_files(
                    module, run.output, f"{name}-ema", cfg.lora_formats, averaged, header, run.task
                )
        else:
            dtype = parse_dtype(cfg.save_dtype or cfg.dtype)
            slot = run.task.denoiser_slot
            files = run.task.model_files.get(slot)
            # a task whose module names differ from its model's official keys renames them (`export_state`)
            export = getattr(run.task, "export_state", None)
            exported = export(slot, weights) if export is not None else weights
            written = [save_full_weights(exported, run.output / name / slot, dtype, files)]
            # a task whose model is released as several files writes them from the saved one (`saved_full_weights`)
            finish = getattr(run.task, "saved_full_weights", None)
            written += list(finish(slot, written[0]) or []) if finish is not None else []
            if run.ema is not None:  # the average, beside: step-N-ema/<slot>/
                averaged = {k: run.ema.shadow[k] if k in run.ema.shadow else v for k, v in weights.items()}
                averaged = export(slot, averaged) if export is not None else averaged
                written.append(save_full_weights(averaged, run.output / f"{name}-ema" / slot, dtype, files))
        logger.info("step %d: wrote %s", state.step, ", ".join(str(p) for p in written))
    progress = {"step": state.step, "epoch": state.epoch, "batches_done": state.batches_done}
    # the position over all processes, so that a resume by another number of processes finds it (`_resumed_position`)
    progress.update(processes=acc.num_processes, all_batches_done=state.batches_done * acc.num_processes)
    progress.update(total_steps=run.total_steps, plan=_plan_fingerprint(run))  # what a resume compares
    saved_state = {
        "optimizer": optimizer_state,
        "lr_scheduler": run.lr_scheduler.state_dict(),
        "progress": progress,
        "config": cfg.to_dict(),
        "family": run.task.family,
    }
    save_checkpoint(
        run.output / CHECKPOINTS,
        state.step,
        trainable=trained,
        state=saved_state,
        rng=rng_state(),
        rank=acc.process_index,
        barrier=acc.wait_for_everyone,
        write_more=lambda folder: _write_more(run, folder),
    )
    if acc.is_main_process:
        prune_checkpoints(run.output / CHECKPOINTS, cfg.keep_last)


def _write_more(run: Run, folder: Path) -> None:
    """What a checkpoint holds besides the trained weights and `state.pt` (every process calls it): DeepSpeed's
    own files; DMD2's fake score and its optimizer."""
    if is_deepspeed(run.accelerator):
        save_deepspeed_state(run.accelerator, folder / DEEPSPEED_FOLDER)
    if run.dmd2 is not None and run.accelerator.is_main_process:
        dmd2_task.save_state(run.dmd2, folder)
    if run.ema is not None and run.accelerator.is_main_process:
        torch.save(run.ema.state_dict(), folder / EMA_FILE)


def resume(run: Run, folder: Path, state: TrainState) -> TrainState:
    """Restore the trained weights, optimizer, LR schedule, random states and data position of `folder`."""
    trainable, saved, rng = load_checkpoint(folder, run.accelerator.process_index)
    missing, extra = sorted(set(run.trainable) - set(trainable)), sorted(set(trainable) - set(run.trainable))
    if missing or extra:
        raise ConfigError(
            f"--resume {folder} does not fit this run: it lacks {preview(missing)} and has extra {preview(extra)} "
            "(was it saved with other --lora_rank / --lora_target_modules / --trainable_models?)"
        )
    for name, param in run.trainable.items():
        if parameter_shape(param) != trainable[name].shape:  # a sharded parameter's shape is the full one
            raise ConfigError(
                f"--resume {folder}: {name} has shape {tuple(trainable[name].shape)} there, "
                f"{tuple(parameter_shape(param))} here (another --lora_rank?)"
            )
    acc = run.accelerator
    written_by = saved["optimizer"].get("deepspeed")
    here = {"zero_stage": zero_stage(acc), "processes": acc.num_processes} if is_deepspeed(acc) else None
    if written_by != here:
        raise ConfigError(
            f"--resume {folder}: written {_mode_name(written_by)}, resumed {_mode_name(here)}; DeepSpeed keeps its "
            "own optimizer files, so resume a DeepSpeed checkpoint with the same stage and number of processes "
            "(other modes resume each other's checkpoints)"
        )
    _check_same_optimizer(folder, saved["config"], run.config)
    module = acc.unwrap_model(run.model)
    if is_deepspeed(acc):  # the weights come back from DeepSpeed's fp32 masters, with its optimizer partitions
        load_deepspeed_state(acc, folder / DEEPSPEED_FOLDER)
    else:
        load_trainable(module, trainable, sharded=is_sharded(acc))
        load_optimizer(module, run.optimizer, saved["optimizer"])
    if run.dmd2 is not None:
        dmd2_task.load_state(run.dmd2, folder, run.config)
    if run.ema is not None:
        if (folder / EMA_FILE).is_file():
            run.ema.load_state_dict(torch.load(folder / EMA_FILE, map_location="cpu", weights_only=True))
        else:  # the average set up before the weights came back: it starts over from the resumed ones
            run.ema = EMA(run.trainable, run.config.ema_decay)
            logger.warning(
                "--ema_decay: %s holds no average (trained without it): it starts from the resumed weights", folder
            )
    run.lr_scheduler.load_state_dict(saved["lr_scheduler"])
    set_rng_state(rng)
    before, now = saved["config"], run.config.to_dict()
    progress = saved["progress"]
    batches_done = _resumed_position(run, folder, progress, before)
    defaults = TrainConfig().to_dict()  # a setting newer than the checkpoint took its default there
    resumable = set(_RESUMABLE_CHANGES)
    if progress.get("processes", acc.num_processes) != acc.num_processes:  # the same global batch: the same steps
        resumable.add("gradient_accumulation_steps")
    changed = [k for k in now if k not in resumable and before.get(k, defaults[k]) != now[k]]
    kept = [k for k in changed if k in _KEPT_FROM_CHECKPOINT]
    applied = [k for k in changed if k not in _KEPT_FROM_CHECKPOINT]
    if applied:
        logger.warning(
            "resuming with changed settings (the run will not match an uninterrupted one): %s",
            ", ".join(f"--{k} {before.get(k, defaults[k])!r} -> {now[k]!r}" for k in applied),
        )
    if kept:
        logger.warning(
            "resuming: %s changed but NOT applied: the optimizer's settings and the LR schedule's base rates are "
            "kept from the checkpoint (%s); to train with new ones, start a new run from the trained weights "
            "(--lora_checkpoint for a LoRA)",
            ", ".join(f"--{k}" for k in kept),
            ", ".join(f"--{k} {before.get(k, defaults[k])!r}" for k in kept),
        )
    _warn_of_another_plan(run, progress)
    logger.info("resumed from %s: step %d, epoch %d", folder, progress["step"], progress["epoch"] + 1)
    return replace(state, step=progress["step"], epoch=progress["epoch"], batches_done=batches_done)


def _check_same_optimizer(folder: Path, before: Mapping[str, Any], cfg: TrainConfig) -> None:
    """A checkpoint's optimizer state fits only the optimizer that wrote it (another one fails deep inside its
    `load_state_dict`, e.g. Prodigy's missing group settings). Checkpoints without the record pass."""
    there = before.get("optimizer")
    if there is not None and there != cfg.optimizer:
        raise ConfigError(
            f"--resume {folder}: trained with --optimizer {there}, resumed with --optimizer {cfg.optimizer}; its "
            f"saved optimizer state fits {there} only: resume with --optimizer {there}, or start a new run from "
            "the trained weights (--lora_checkpoint for a LoRA)"
        )


def _resumed_position(run: Run, folder: Path, progress: Mapping[str, Any], before: Mapping[str, Any]) -> int:
    """The micro-batches of the checkpoint's epoch each process of this run has done. Batches are dealt out to the
    processes in turn, so a checkpoint written by N processes resumes on M when the global batch (processes x
    --gradient_accumulation_steps x --batch_size) is the same: its position over all processes, divided by M.
    Otherwise the plan and the steps differ and the run is refused. Checkpoints from before the process count was
    recorded are taken as written by as many processes as this run."""
    here = run.accelerator.num_processes
    there = progress.get("processes", here)
    if there == here:
        return progress["batches_done"]
    cfg = run.config
    global_batch = here * cfg.gradient_accumulation_steps * cfg.batch_size
    saved_batch = there * before.get("gradient_accumulation_steps", 1) * before.get("batch_size", 1)
    done = progress.get("all_batches_done", progress["batches_done"] * there)
    if saved_batch != global_batch or done % here:
        raise ConfigError(
            f"--resume {folder}: written by {there} processes, resumed by {here}; the global batch (processes x "
            f"--gradient_accumulation_steps x --batch_size) was {saved_batch} there and is {global_batch} here: "
            "resume with the same global batch (e.g. raise --gradient_accumulation_steps as processes go) or "
            f"with {there} processes"
        )
    logger.info("resumed by %d processes a checkpoint of %d: %d batches of the epoch done in all", here, there, done)
    return done // here


def forget_metrics_after(path: Path, step: int) -> None:
    """Drop the records of steps after `step` from `path` (`metrics.jsonl`): a run killed after its last checkpoint
    logged steps that the resumed run trains and logs again."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if _record_step(line) <= step]
    if len(kept) < len(lines):
        atomic_write_text(path, "".join(kept))
        logger.info("%s: dropped %d records of steps after %d (trained again now)", path, len(lines) - len(kept), step)


def _record_step(line: str) -> float:
    try:
        return float(json.loads(line).get("step", 0))
    except (ValueError, AttributeError, TypeError):  # a torn last line from the kill, or a stray one: kept out
        return math.inf


def _plan_fingerprint(run: Run) -> str:
    return plan_fingerprint(plan_keys(run.dataset, run.config.batch_size), run.dataset.repeats)


def _warn_of_another_plan(run: Run, progress: Mapping[str, Any]) -> None:
    """A checkpoint's position is an index into its epoch's batch plan and its LR curve: a dataset that changed
    (rows added, other sizes or repeats) or a new total of steps under a decaying schedule is said, since the run
    then goes on differently from an uninterrupted one (checkpoints from before these were recorded say nothing)."""
    plan = progress.get("plan")
    if plan is not None and plan != _plan_fingerprint(run):
        logger.warning(
            "resuming on another dataset (its samples, sizes or repeats changed since the checkpoint): the rest of "
            "epoch %d is drawn from a new batch plan, so some samples may repeat or be skipped in it",
            progress["epoch"] + 1,
        )
    total = progress.get("total_steps")
    if total is not None and total != run.total_steps and run.config.lr_scheduler != "constant":
        logger.warning(
            "resuming with %d steps in all where the checkpoint's run had %d: the --lr_scheduler %s curve is "
            "stretched to the new total, so the learning rate jumps from here",
            run.total_steps,
            total,
            run.config.lr_scheduler,
        )


def _mode_name(deepspeed: dict[str, int] | None) -> str:
    if deepspeed is None:
        return "without DeepSpeed"
    return f"under DeepSpeed ZeRO-{deepspeed['zero_stage']} by {deepspeed['processes']} processes"


# ----------------------------------------------------------------------------------- cached mode, stage 1
def encode_dataset(config: TrainConfig) -> Path:
    """Stage 1 of cached training: encode every sample into `--cache_dir` (resumable: finished samples are
    kept), and the `--validation_dataset_base_path` rows into its `validation/` (`validation_loss.rows_to_cache`).
    Loads the encoders and the VAE, not the denoiser."""
    cfg = config.check()
    cfg.check_data_paths()
    cls = task_class(cfg)
    acc = make_accelerator(cfg)
    check_video_settings(cfg, cls)
    with loading_whole_models(acc):
        task = build_task(cls, cfg, acc.device, encoders=True, denoiser=False)
    check_video_settings(cfg, task)
    store_in_fp8(cfg, task, acc.device, all_loaded=False)
    stream_from_cpu(cfg, task, acc.device, all_loaded=False)
    dataset = make_dataset(cfg, task)
    cache = Path(cfg.cache_dir)
    settings = encoding_settings(cfg, task)
    recorded = cache / "settings.json"
    if recorded.is_file() and json.loads(recorded.read_text()) != settings:
        raise ConfigError(
            f"--cache_dir {cache} holds samples encoded with other settings ({recorded}); use a new --cache_dir"
        )
    held_out = validation_loss.rows_to_cache(cfg, task) if cfg.validation_dataset_base_path else None
    write_encoded(cfg, acc, task, dataset, cache, settings, batch_size=cfg.batch_size)
    if held_out is not None:  # one at a time, as `validation_loss.build` encodes them: the same samples
        write_encoded(cfg, acc, task, *held_out, batch_size=1)
    return cache


def write_encoded(
    cfg: TrainConfig,
    acc,
    task: TrainingTask,
    dataset: MetadataDataset,
    folder: Path,
    settings: dict[str, Any],
    *,
    batch_size: int,
) -> None:
    """Record `settings` in `folder`, encode `dataset` into it over every process (`write_cache`), then write its
    index (`write_cache_index`)."""
    acc.wait_for_everyone()
    if acc.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / "settings.json", json.dumps(settings, indent=1))
    acc.wait_for_everyone()
    count = write_cache(
        functools.partial(encode_with_masks, task),
        dataset,
        folder,
        batch_size=batch_size,
        rank=acc.process_index,
        world=acc.num_processes,
        num_workers=cfg.dataset_num_workers,
    )
    count = int(acc.reduce(torch.tensor(count, device=acc.device), reduction="sum"))  # every process's share
    logger.info("encoded %d samples into %s", count, folder)
    acc.wait_for_everyone()
    if acc.is_main_process:
        write_cache_index(folder, dataset, settings)
    acc.wait_for_everyone()


def run_stage(config: TrainConfig) -> TrainState | Path:
    """What `diffsynth-train` does: `--stage encode` writes the cache, otherwise train."""
    return encode_dataset(config) if config.stage == "encode" else train(config)


# ----------------------------------------------------------------------------------- helpers
def store_in_fp8(cfg: TrainConfig, task: TrainingTask, device, *, all_loaded: bool) -> None:
    """`--fp8_models`: the frozen weights of these models stored in float8_e4m3fn (per-tensor scales) on the
    device and cast to the computation dtype block by block as they run (the VRAM manager), about half the
    memory of bf16. Trainable parameters (a LoRA's) are left as they are. Models not loaded for this stage
    (encoders when training from the cache, the denoiser when encoding) are skipped; with `all_loaded` a name
    that is not one of the models is an error."""
    from diffsynth.runtime.vram import enable_vram_management

    for slot, model in _named_models(task, "fp8_models", cfg.fp8_models, all_loaded):
        dtype = parse_dtype(cfg.dtype)
        enable_vram_management(model, {"preparing_dtype": "float8_e4m3fn"}, device=device, dtype=dtype, name=slot)
        logger.info("%s: frozen weights stored in float8_e4m3fn, computed in %s", slot, cfg.dtype)


def stream_from_cpu(cfg: TrainConfig, task: TrainingTask, device, *, all_loaded: bool) -> None:
    """`--offload_models` (see `offload.py`): these models, loaded into CPU memory and never onto the device whole
    (`build_task`), put under the VRAM manager: their frozen block weights held in pinned CPU memory and copied to
    `device` as they run (the next block on a side stream while one computes), in the forward pass and again in the
    backward pass; `--offload_vram_limit` GiB of blocks stay resident. What lives on the device moves there now:
    the trainable parameters (a LoRA's, injected in CPU memory) and the parameters and buffers outside the blocks.
    Models not loaded for this stage are skipped; with `all_loaded` an unknown name is an error."""
    from diffsynth.runtime.quant import quantize_config
    from diffsynth.runtime.vram import enable_vram_management

    for slot, model in _named_models(task, "offload_models", cfg.offload_models, all_loaded):
        if quantize_config(model) is not None:
            raise ConfigError(f"--offload_models {slot}: the model is quantized (--quantize), which is not streamed")
        keys = {"offload_device": "cpu", "onload_device": "cpu"}
        dtype = parse_dtype(cfg.dtype)
        handle = enable_vram_management(
            model, keys, device=device, dtype=dtype, vram_limit=cfg.offload_vram_limit, name=slot
        )
        logger.info("%s: frozen blocks streamed from CPU memory (%s)", slot, handle.plan.describe())


def _named_models(task: TrainingTask, flag: str, names: list[str], all_loaded: bool) -> list[tuple[str, nn.Module]]:
    """(slot, model) of the models a `--<flag>` names that this stage loaded; with `all_loaded` (every model is
    loaded) a name that is none of them is an error."""
    missing = [m for m in names if m not in task.models]
    if missing and all_loaded:
        raise ConfigError(f"--{flag} {','.join(missing)}: no such model; models here: {', '.join(task.models)}")
    return [(slot, task.models[slot]) for slot in names if slot in task.models]


def make_accelerator(cfg: TrainConfig, **kwargs):
    """The `Accelerator` of a run. Without CUDA it is told so (`cpu=True`): only then does accelerate join the
    processes `torchrun` / `accelerate launch` started into one CPU (gloo) group, instead of running each alone.
    DDP, FSDP2 and DeepSpeed run; FSDP1 and DeepSpeed's CPU offload are refused (`distributed.check_mode`)."""
    from accelerate import Accelerator

    trackers = tracking.accelerator_options(cfg.report_to, cfg.output_path)
    acc = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available(), **trackers, **kwargs)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and acc.num_processes != launched:
        raise ConfigError(
            f"this run was launched as {launched} processes (WORLD_SIZE) but accelerate joined {acc.num_processes}; "
            "they would each train alone and overwrite each other's output (check the accelerate config)"
        )
    check_mode(acc)
    return acc


def build_task(cls: type, cfg: TrainConfig, device, *, encoders: bool, denoiser: bool) -> TrainingTask:
    """The family's task for this stage; the `--offload_models` models stay in CPU memory (`stream_from_cpu`)."""
    check_task_options(cls, cfg.task_options)
    if denoiser:
        note_first_frame_option(cls, cfg)
    options = {**trained_model_option(cls, cfg), **cfg.task_options}
    configs, tokenizer = model_sources(cfg)
    configs = quantized_sources(cfg, configs, getattr(cls, "denoiser_slot", "dit"))
    with offload.kept_on_host(cfg):
        task = cls.from_pretrained(
            configs,
            tokenizer_config=tokenizer,
            torch_dtype=parse_dtype(cfg.dtype),
            device=device,
            encoders=encoders,
            denoiser=denoiser,
            **options,
        )
    if denoiser:
        check_task(task, f"{cls.__module__}:{cls.__qualname__}")
    return task


def note_first_frame_option(cls: type, cfg: TrainConfig) -> None:
    """DiffSynth-Studio switches image-to-video training on by naming `input_image` in `--extra_inputs`; the tasks
    with a `first_frame` setting (Wan2.2-TI2V, LTX-2) take it from `--task_options first_frame=true` instead."""
    takes = "first_frame" in inspect.signature(cls.__init__).parameters
    if takes and "input_image" in cfg.extra_inputs and "first_frame" not in cfg.task_options:
        logger.warning(
            "--extra_inputs input_image does not switch image-to-video training on for the %s task: pass "
            "--task_options first_frame=true (or a probability such as 0.1)",
            getattr(cls, "family", cls.__name__),
        )


def trained_model_option(cls: type, cfg: TrainConfig) -> dict[str, str]:
    """`{"trained_model": name}` when `--trainable_models` / `--lora_base_model` name a model the task can train
    in place of its denoiser (its `trainable_slots`, e.g. Wan's speed-control "motion_controller"), else {}."""
    slots = getattr(cls, "trainable_slots", ())
    named = list(dict.fromkeys(n for n in (*cfg.trainable_models, cfg.lora_base_model) if n in slots))
    if len(named) > 1:
        raise ConfigError(f"--trainable_models / --lora_base_model name {', '.join(named)}: train one at a time")
    if named and cfg.task_options.get("trained_model", named[0]) != named[0]:
        raise ConfigError(
            f"--task_options trained_model={cfg.task_options['trained_model']} contradicts --trainable_models / "
            f"--lora_base_model {named[0]}"
        )
    return {"trained_model": named[0]} if named else {}


def check_task_options(cls: type, options: dict[str, Any]) -> None:
    """`--task_options` names must be keyword settings of the task's constructor."""
    params = inspect.signature(cls.__init__).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    accepted = [p.name for p in params if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(
            f"--task_options {', '.join(unknown)}: the {getattr(cls, 'family', cls.__name__)} training task takes "
            f"{', '.join(accepted) or 'no options'}"
        )


def encoding_settings(cfg: TrainConfig, task: TrainingTask) -> dict[str, Any]:
    """What a cache must have been encoded with: `cache_settings` plus the task options that shape the encoded
    samples (all but the ones the task lists in `loss_options`, which act only in the loss)."""
    loss_only = set(getattr(task, "loss_options", ()))
    options = {k: v for k, v in sorted(cfg.task_options.items()) if k not in loss_only}
    masked = {"masked_loss": True} if cfg.uses_loss_masks else {}  # a cache without masks is refused then
    masked["alpha_mask"] = cfg.alpha_mask  # the masks a cache holds: files, or the pictures' transparency
    datasets = dataset_settings(cfg, task.family)  # --dataset_config: each dataset's settings and metadata
    listed = {} if datasets is None else {"datasets": datasets}
    return {**cache_settings(cfg, task.family), "task_options": options, **masked, **listed}


def make_dataset(
    cfg: TrainConfig, task: TrainingTask, *, require_masks: bool = True, where: str = "", skip_short: bool = False
) -> MetadataDataset | CombinedDataset:
    """The run's dataset: `--dataset_base_path`, or each dataset of `--dataset_config` with its own settings, one
    after the other (`datasets.CombinedDataset`; with `--masked_loss` some dataset, not each, must have masks).
    `where` names a config's dataset in messages; `skip_short` leaves out the videos too short for a clip (one
    length of a musubi dataset's several `target_frames`) rather than refusing them."""
    if uses_dataset_config(cfg):
        entries = dataset_entries(cfg)
        parts = [
            make_dataset(e.config, task, require_masks=False, where=e.where, skip_short=e.one_length_of is not None)
            for e in entries
        ]
        return CombinedDataset(parts, entries, cfg.dataset_config)
    m = task.size_multiple
    for name in ("height", "width", "bucket_step"):
        value = getattr(cfg, name)
        if value is not None and value % m:
            raise ConfigError(f"--{name} {value} must be a multiple of {m} for {task.family}")
    fixed = (cfg.width, cfg.height) if cfg.height is not None else None
    dataset = MetadataDataset(
        cfg.dataset_base_path,
        media=task.media,
        file_keys=cfg.data_file_keys,
        conditioning=getattr(task, "conditioning", ()),  # a task's reference-image columns (optional attribute)
        aligned=getattr(task, "aligned_conditioning", ()),  # those pixel-aligned with the target: read as it is
        counted=getattr(task, "conditioning_counts", ()),  # those whose count, not size, must agree in a batch
        ragged_conditioning=getattr(task, "ragged_conditioning", False),  # a batch may mix their sizes
        check_row=getattr(task, "check_row", None),  # a task's setup check of each metadata row (optional)
        metadata_path=cfg.dataset_metadata_path,
        max_pixels=cfg.training_pixels,
        step=cfg.bucket_step,
        fixed=fixed,
        num_frames=cfg.num_frames,
        image_mode=getattr(task, "image_mode", "RGB"),  # "RGBA" for the families that read transparency
        masked_loss=cfg.masked_loss,
        alpha_mask=cfg.alpha_mask,
        trigger_word=cfg.trigger_word,
        frame_extraction=cfg.video_frame_extraction,
        frame_stride=cfg.video_frame_stride,
        frame_samples=cfg.video_frame_samples,
        fps=cfg.video_fps,
        require_masks=require_masks,
        frame_multiple=temporal_compression(task),
        skip_short=skip_short,
    )
    check_clip_length(dataset, task, f"{where}: num_frames" if where else "--num_frames")
    return dataset


def check_clip_length(dataset: MetadataDataset, task: TrainingTask, flag: str) -> None:
    """A video VAE encodes its first frame alone and then `temporal_compression` frames at a time (Wan's 4k + 1,
    LTX-2's 8k + 1): a clip of another length is named before any model runs, not at its first batch."""
    tc = temporal_compression(task)
    wrong = sorted({frames for frames in dataset.sample_frames if tc and (frames - 1) % tc})
    if wrong:
        frames = wrong[0]
        raise ConfigError(
            f"{flag} {frames}: {task.family} encodes videos of {tc}k + 1 frames; use {frames - (frames - 1) % tc} "
            f"or {frames - (frames - 1) % tc + tc}"
        )


def report_extra_inputs(cfg: TrainConfig, dataset) -> None:
    """DiffSynth-Studio's `--extra_inputs`: every metadata column reaches the task here anyway; a name no row
    carries is reported (a family may take it from elsewhere, e.g. Wan I2V's `input_image` from the video)."""
    rows = getattr(dataset, "rows", None)
    if not cfg.extra_inputs or rows is None:
        return
    absent = [name for name in cfg.extra_inputs if not any(row.get(name) not in (None, "") for row in rows)]
    if absent:
        logger.warning(
            "--extra_inputs %s: no row of the dataset has these columns; the family takes them from the picture or "
            "video if it can (e.g. Wan I2V's input_image, the first frame), else they are not used",
            ",".join(absent),
        )


def prepare_batch(run: Run, items: list[dict]) -> dict[str, Any]:
    """Model inputs on the device: encoded now (frozen encoders, no grad) or read from the cache."""
    if run.cached:
        samples = [dict(item) for item in items]
    else:
        samples = encode_with_masks(run.task, items)
    masks = take_masks(samples)
    loss_weights = take_loss_weights(samples, run.accelerator.device)  # --dataset_config loss_weight
    batch = _to_device(run.task.collate(samples), run.accelerator.device)
    if loss_weights is not None:
        batch[LOSS_WEIGHTS_KEY] = loss_weights
    if run.config.uses_loss_masks:
        weights = batch_weights(masks, batch["latents"], run.config.unmasked_weight)
        if weights is not None:
            batch[WEIGHTS_KEY] = weights
    return batch


def encode_with_masks(task: TrainingTask, rows: list[dict]) -> list[dict]:
    """The task's encoded samples (no grad), with the rows' `--masked_loss` masks on their latent grids (a mask
    video's frames grouped as the task says, `masks.temporal_compression`). A `ConfigError` of `encode` names the
    items' metadata rows (`data.naming_rows`)."""
    from .data import naming_rows

    sources = [getattr(row, "source", None) for row in rows]  # each item's metadata file and row (`data.Row`)
    rows, loss_weights = take_row_weights(rows)  # --dataset_config loss_weight: kept with the encoded sample
    with torch.no_grad(), naming_rows(sources):
        samples = task.encode(rows)
    attach_masks(rows, samples, temporal_compression(task))
    attach_loss_weights(loss_weights, samples)
    return samples


def fuse_preset_lora(module: nn.Module, cfg: TrainConfig, task: TrainingTask) -> None:
    """`--preset_lora_path` (differential LoRA, as DiffSynth-Studio calls it): fuse a LoRA into the frozen
    denoiser, so the new LoRA learns only what differs from it. A task with a `read_lora(path)` method (a family
    whose LoRAs come in its own key layouts) reads the file; otherwise the runtime's common layouts do."""
    if cfg.preset_lora_path is None:
        return
    from diffsynth.runtime.lora import apply_lora, read_lora

    reader = getattr(task, "read_lora", None)
    lora = reader(cfg.preset_lora_path) if callable(reader) else read_lora(cfg.preset_lora_path)
    apply_lora(module, lora, scale=cfg.preset_lora_scale, fuse=True)
    logger.info("fused --preset_lora_path %s (scale %g) into the base", cfg.preset_lora_path, cfg.preset_lora_scale)


def add_lora(module: nn.Module, cfg: TrainConfig, parts: Sequence[str] = (), task: Any = None) -> None:
    """Inject peft LoRA layers (LoHa / LoKr with `--lora_type`) into `module`'s target Linears (module replacement;
    names keep our keys); with
    `parts` (submodule paths, see `trained_parts`) only into the targets inside them. A task with
    `lora_target_names(names, module)` translates `--lora_target_modules` first (FLUX.1: DiffSynth-Studio's
    layer names to ours)."""
    from peft import inject_adapter_in_model

    targets = cfg.lora_target_modules or list(getattr(module, "lora_target_modules", ()))
    if not targets:
        raise ConfigError(
            f"--lora_target_modules: {type(module).__name__} declares no default lora_target_modules; name its "
            "Linear layers (e.g. --lora_target_modules to_q,to_k,to_v)"
        )
    given = list(targets)
    translate = getattr(task, "lora_target_names", None) if cfg.lora_target_modules else None
    wanted = translate(given, module) if callable(translate) else given
    if wanted != given:
        logger.info("--lora_target_modules %s: %s's layers %s", ",".join(given), task.family, ",".join(wanted))
    names = "|".join(re.escape(t) for t in wanted)
    # a target name at the end of a module path (inside one of the parts, when given); only Linear layers: a name
    # such as "proj" may also end a convolution's path (LongCat-Video's x_embedder.proj), which LoRA files do not take
    within = "|".join(re.escape(p) for p in parts)
    pattern = re.compile(rf"(?:{within})(?:\..+)?\.(?:{names})" if parts else rf"(?:.+\.)?(?:{names})")
    targets = [n for n, m in module.named_modules() if isinstance(m, nn.Linear) and pattern.fullmatch(n)]
    if not targets:
        raise ConfigError(
            f"--lora_target_modules {','.join(given)}: no Linear layer of {type(module).__name__} ends with these names"
        )
    torch.manual_seed(cfg.seed)
    try:
        with warnings.catch_warnings():
            # peft on torchao layers (--quantize dit=torchao_int8_w8a16) warns that merge() cannot work: the trainer
            # never merges (the LoRA is saved apart and the pipeline keeps it apart on quantized layers)
            warnings.filterwarnings("ignore", message=".*without `get_apply_tensor_subclass`", category=UserWarning)
            inject_adapter_in_model(adapter_config(module, cfg, targets), module)
    except ValueError as exc:
        raise ConfigError(f"--lora_target_modules {','.join(targets)}: {exc}") from None
    dtype = parse_dtype(cfg.trainable_dtype)
    for name, param in module.named_parameters():
        if any(tag in name for tag in (".lora_", ".hada_", ".lokr_")):
            param.data = param.data.to(dtype)
            param.requires_grad_(True)


def adapter_config(module: nn.Module, cfg: TrainConfig, targets: list[str]):
    """peft's config for `--lora_type`: LoRA or DoRA (`--lora_dropout`), or LyCORIS LoHa / LoKr (`--rank_dropout`,
    `--module_dropout`); their change starts at zero, a DoRA's magnitudes at the base weight's row norms."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    from diffsynth.runtime.quant import is_quantized_linear

    rank, alpha = cfg.lora_rank, cfg.lora_alpha or cfg.lora_rank
    if cfg.lora_type in ("lora", "dora"):
        use_dora = cfg.lora_type == "dora"
        return LoraConfig(
            r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=cfg.lora_dropout, use_dora=use_dora
        )
    packed = [name for name in targets if is_quantized_linear(module.get_submodule(name))]
    if packed:
        raise ConfigError(
            f"--lora_type {cfg.lora_type}: {packed[0]} is a quantized layer (--quantize); peft's LoHa / LoKr layers "
            "build their change from the base weight, which quantized storage packs. Train --lora_type lora on it"
        )
    dropout = dict(rank_dropout=cfg.rank_dropout, module_dropout=cfg.module_dropout)
    if cfg.lora_type == "loha":
        return LoHaConfig(r=rank, alpha=alpha, target_modules=targets, **dropout)
    return LoKrConfig(r=rank, alpha=alpha, target_modules=targets, decompose_factor=cfg.lokr_factor, **dropout)


def _check_slots(cfg: TrainConfig, task: TrainingTask) -> None:
    slot = task.denoiser_slot
    parts = dict(getattr(task.models[slot], "trainable_parts", {}))
    for flag, names in (("trainable_models", cfg.trainable_models), ("lora_base_model", [cfg.lora_base_model])):
        bad = [n for n in names if n is not None and n != slot and n not in parts]
        if bad:
            extra = f"; parts of it: {', '.join(parts)}" if parts else ""
            raise ConfigError(
                f"--{flag} {','.join(bad)}: only the denoiser {slot!r} is trained (the encoders stay frozen, "
                f"which the cached mode relies on){extra}; models here: {', '.join(task.models)}"
            )
    named = [n for n in (*cfg.trainable_models, cfg.lora_base_model) if n is not None]
    if slot in named and any(n in parts for n in named):
        raise ConfigError(f"--trainable_models / --lora_base_model name both the denoiser {slot!r} and a part of it")


def trained_parts(cfg: TrainConfig, task: TrainingTask) -> tuple[str, ...]:
    """Submodule paths of the denoiser to train when `--trainable_models` / `--lora_base_model` name parts of
    it (its `trainable_parts`, e.g. Wan VACE's "vace": the control branch, as DiffSynth-Studio names it); empty
    for the whole denoiser."""
    parts = dict(getattr(task.models[task.denoiser_slot], "trainable_parts", {}))
    named = [n for n in (*cfg.trainable_models, cfg.lora_base_model) if n in parts]
    return tuple(path for name in named for path in parts[name])


def _lr_lambda(cfg: TrainConfig, total: int):
    """The learning rate's factor at each optimizer step: a linear warm-up over `--lr_warmup_steps`, then
    `--lr_scheduler` over the remaining steps, decaying to `--lr_scheduler_min_lr_ratio` of the rate."""
    warmup, kind, floor = cfg.lr_warmup_steps, cfg.lr_scheduler, cfg.lr_scheduler_min_lr_ratio

    def decay(progress: float) -> float:  # 1 at the start of the decay, 0 at its end
        if kind == "linear":
            return 1.0 - progress
        if kind == "polynomial":
            return (1.0 - progress) ** cfg.lr_scheduler_power
        if kind == "cosine_with_restarts":  # each of the cycles a full cosine from 1 to 0, the last ending at 0
            phase = 1.0 if progress >= 1.0 else (cfg.lr_scheduler_num_cycles * progress) % 1.0
            return 0.5 * (1.0 + math.cos(math.pi * phase))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant" or total <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / (total - warmup))
        return floor + (1.0 - floor) * decay(progress)

    return factor


def _to_device(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    return value


def _progress(run: Run, state: TrainState):
    from tqdm.auto import tqdm

    return tqdm(total=run.total_steps, initial=state.step, desc="train", disable=not run.accelerator.is_main_process)


def _log(run: Run, state: TrainState, seconds_per_step: float) -> None:
    if not run.accelerator.is_main_process:
        return
    lr = state.lr if state.lr is not None else run.lr_scheduler.get_last_lr()[0]
    logger.info(
        "step %d/%d (%d epochs done) loss %.5f lr %.3g (%.2f s/step)",
        state.step,
        run.total_steps,
        state.epoch,
        state.loss,
        lr,
        seconds_per_step,
    )
    record = {"step": state.step, "epoch": state.epoch, "loss": state.loss, "lr": lr, "time": time.time()}
    if state.grad_norm is not None:
        record["grad_norm"] = state.grad_norm
    record.update(dmd2_task.log_record(run.dmd2))  # --task dmd2: the fake score's and the student's losses
    with (run.output / METRICS_FILE).open("a") as f:
        f.write(json.dumps(record) + "\n")
    if run.config.report_to:
        run.accelerator.log({k: v for k, v in record.items() if k not in ("step", "time")}, step=state.step)


__all__ = [
    "Run",
    "TrainState",
    "add_lora",
    "encode_dataset",
    "flow_matching_loss",
    "resume",
    "run_stage",
    "save",
    "setup",
    "train",
    "train_step",
]
