"""Validation loss (`--validation_dataset_base_path`): the flow-matching loss of a held-out dataset, comparable
from one evaluation to the next.

Every `--validation_loss_steps` optimizer steps (default `--validation_steps`) and at the last step, each held-out
row is noised at `--validation_loss_sigmas` fixed noise levels, spread evenly over the family's training grid (the
midpoints of that many equal slices of the positions a training draw may take, `--min/max_timestep_boundary`
included), with noise from a generator keyed by (`--seed`, the row, the level): the same sigmas and the same noise
at every evaluation, so the number moves only with the weights. The loss of each (row, level) is the trainer's own
`flow_matching_loss` (the task's `velocity`, its `loss_mask` and the `--masked_loss` masks, the scheduler's loss
weights with `--loss_weighting scheduler`), computed without gradients under the run's autocast, with the denoiser
in eval mode; the value logged is their mean.

The rows are read as `--dataset_base_path` is (a metadata file or a folder of captioned pictures, the same sizes,
`--trigger_word` and masks; no `--caption_dropout`, no `--flip_aug`), encoded once at setup with the task's
encoders and kept in memory (CPU): a held-out set is small. In the cached mode `--stage encode` encodes them too,
one at a time as here, into `--cache_dir`'s own `validation/` (its `items/` and `index.json`, written as the
training samples are, with the held-out folder's settings: `read_cached` refuses a cache encoded without them or
from another held-out folder), and training from the cache reads them from there, masks included: the same
samples, so the same numbers. Over several processes each takes every N-th row and the sums are added up, so the
number is one process's.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from diffsynth.runtime.errors import ConfigError

if TYPE_CHECKING:  # the trainer and the config import this module; the trainer's functions are imported where used
    from .config import TrainConfig
    from .data import CachedDataset, MetadataDataset
    from .task import TrainingTask
    from .trainer import Run, TrainState

logger = logging.getLogger(__name__)
METRIC = "val_loss"  # the key in OUTPUT/metrics.jsonl and in the trackers
DEFAULT_SIGMAS = 4  # --validation_loss_sigmas' default
CACHE_FOLDER = "validation"  # the held-out rows' place in --cache_dir (`--stage encode`)


@dataclass
class HeldOut:
    """The encoded validation rows this process evaluates, and the fixed noise levels."""

    rows: list[int]  # dataset index of each sample (a process short of rows repeats one: `counted` False)
    samples: list[dict[str, Any]]  # each row encoded (CPU tensors, with its `--masked_loss` mask if any)
    counted: list[bool]  # False for the repeats that keep every process's model calls in step (FSDP, ZeRO-3)
    sigmas: torch.Tensor  # [--validation_loss_sigmas] float32
    size: int  # rows in the held-out dataset


def every(cfg: TrainConfig) -> int | None:
    """The interval of the evaluations: `--validation_loss_steps`, else `--validation_steps` (None: the last step
    only)."""
    return cfg.validation_loss_steps if cfg.validation_loss_steps is not None else cfg.validation_steps


def due(run: Run, step: int) -> bool:
    """Whether the loss is evaluated after optimizer step `step`: every `every` steps and at the last."""
    if run.validation_set is None:
        return False
    interval = every(run.config)
    return step == run.total_steps or bool(interval and step % interval == 0)


def fixed_sigmas(cfg: TrainConfig, scheduler) -> torch.Tensor:
    """`--validation_loss_sigmas` noise levels from the scheduler's training grid: of the grid positions a training
    draw may take (`training_span`, narrowed by `--min/max_timestep_boundary` as `sample_training_sigmas` does),
    the middle one of each of that many equal slices, from the noisy end (the quantiles of a uniform draw)."""
    start, stop = scheduler.training_span()
    size = len(scheduler.train_sigmas)
    low = max(start, int(cfg.min_timestep_boundary * size))
    high = min(stop, int(cfg.max_timestep_boundary * size))
    count, span = cfg.validation_loss_sigmas, high - low
    if span < count:
        raise ConfigError(
            f"--validation_loss_sigmas {count}: the training grid has {max(span, 0)} noise levels between "
            "--min_timestep_boundary and --max_timestep_boundary; ask for at most that many"
        )
    positions = [low + (2 * k + 1) * span // (2 * count) for k in range(count)]
    return scheduler.train_sigmas[positions].float().clone()


def noise_generator(seed: int, row: int, level: int, stream: int = 0) -> torch.Generator:
    """The generator of row `row` at noise level `level` (other `stream`s: the task's per-batch choices): keyed like
    a training micro-batch's (`micro_batch_generator`) with epoch `-1 - level`, which training never has."""
    from .trainer import micro_batch_generator

    return micro_batch_generator(seed, -1 - level, row, stream)


def held_out_config(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with the held-out folder as its dataset (read and encoded with the same settings)."""
    return replace(
        cfg,
        dataset_base_path=cfg.validation_dataset_base_path,
        dataset_metadata_path=cfg.validation_dataset_metadata_path,
        dataset_config=None,
    )


def cache_folder(cfg: TrainConfig) -> Path:
    """Where `--stage encode` writes the held-out rows: `--cache_dir`/validation."""
    return Path(cfg.cache_dir) / CACHE_FOLDER


def read_rows(cfg: TrainConfig, task: TrainingTask) -> MetadataDataset:
    """The rows of `--validation_dataset_base_path`, read as the training dataset is; errors name the flag."""
    from .trainer import make_dataset

    flag = f"--validation_dataset_base_path {cfg.validation_dataset_base_path}"
    try:
        dataset = make_dataset(held_out_config(cfg), task, require_masks=False)  # rows without masks count fully
    except ConfigError as error:
        raise ConfigError(f"{flag}: {error}") from None
    if len(dataset) == 0:
        raise ConfigError(f"{flag}: no rows")
    return dataset


def rows_to_cache(cfg: TrainConfig, task: TrainingTask) -> tuple[MetadataDataset, Path, dict[str, Any]]:
    """For `--stage encode`: the held-out rows, their folder in the cache and the settings to record there (the
    training samples' with the held-out folder's metadata), refused when the folder holds rows encoded with others
    (another held-out folder) before anything is written."""
    from .trainer import encoding_settings

    dataset, folder = read_rows(cfg, task), cache_folder(cfg)
    settings = encoding_settings(held_out_config(cfg), task)
    recorded = folder / "settings.json"
    if recorded.is_file() and json.loads(recorded.read_text()) != settings:
        raise ConfigError(
            f"--validation_dataset_base_path {cfg.validation_dataset_base_path}: --cache_dir {cfg.cache_dir} holds "
            f"held-out rows encoded from another held-out folder or with other settings ({recorded}); delete "
            f"{folder} to encode these in its place, or use a new --cache_dir"
        )
    return dataset, folder, settings


def read_cached(cfg: TrainConfig, task: TrainingTask) -> CachedDataset:
    """The held-out rows `--stage encode` wrote into `--cache_dir` (`rows_to_cache`), refused when it wrote none
    or encoded them from another held-out folder (its metadata) or with other settings."""
    from .data import CachedDataset
    from .trainer import encoding_settings

    flag = f"--validation_dataset_base_path {cfg.validation_dataset_base_path}"
    folder = cache_folder(cfg)
    index = folder / "index.json"
    if not index.is_file():
        raise ConfigError(
            f"{flag}: --cache_dir {cfg.cache_dir} holds no encoded held-out rows ({index}); run --stage encode with "
            f"{flag} into this --cache_dir first (the training samples encoded there are kept)"
        )
    expected = encoding_settings(held_out_config(cfg), task)
    if json.loads(index.read_text()).get("settings", {}).get("metadata_sha256") != expected["metadata_sha256"]:
        raise ConfigError(
            f"{flag}: the held-out rows in {folder} were encoded from another held-out folder (or another version of "
            f"its metadata); delete {folder} and run --stage encode with {flag} into this --cache_dir again, or use "
            "a new --cache_dir"
        )
    try:
        return CachedDataset(folder, expected=expected)
    except ConfigError as error:
        raise ConfigError(f"{flag}: {error}") from None


def build(cfg: TrainConfig, task: TrainingTask, accelerator) -> HeldOut:
    """Read `--validation_dataset_base_path` and encode this process's rows (every `num_processes`-th from its
    index) with the task's encoders, once (call it when the encoders are where training runs them), or, training
    from `--cache_dir`, read them from there as `--stage encode` wrote them."""
    from .trainer import _to_device, encode_with_masks

    cached = cfg.cache_dir is not None
    dataset = read_cached(cfg, task) if cached else read_rows(cfg, task)
    size, world, rank = len(dataset), accelerator.num_processes, accelerator.process_index
    share = [rank + world * j for j in range(math.ceil(size / world))]
    counted = [i < size for i in share]
    rows = [i if i < size else i % size for i in share]
    samples = []
    for index in rows:
        if cached:  # CPU tensors, with the mask where the cache has one
            samples.append(dataset[index])
            continue
        (sample,) = encode_with_masks(task, [dataset[index]])
        samples.append(_to_device(sample, "cpu"))
    sigmas = fixed_sigmas(cfg, task.scheduler)
    logger.info(
        "validation loss: %d held-out rows at %d noise levels (%s)",
        size,
        len(sigmas),
        ", ".join(f"{s:.3f}" for s in sigmas.tolist()),
    )
    return HeldOut(rows, samples, counted, sigmas, size)


def losses(run: Run) -> tuple[torch.Tensor, torch.Tensor]:
    """This process's loss of each of its samples at each level, `[samples, levels]` float64 (no gradient, the
    denoiser in eval mode, the run's autocast), and which samples count."""
    from .trainer import CHOICES_STREAM, flow_matching_loss, prepare_batch

    acc, cfg, held = run.accelerator, run.config, run.validation_set
    module = acc.unwrap_model(run.model)
    encoded = replace(run, cached=True)  # the samples are encoded already: `prepare_batch` only collates them
    values = torch.zeros(len(held.samples), len(held.sigmas), dtype=torch.float64)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            for i, (row, sample) in enumerate(zip(held.rows, held.samples, strict=True)):
                for level, sigma in enumerate(held.sigmas):
                    batch = prepare_batch(encoded, [sample])  # the samples are copied there: the stored ones are kept
                    draw = getattr(run.task, "draw_choices", None)
                    if callable(draw):  # a task's per-batch choices (LTX-2's), fixed like the noise
                        batch = {**batch, **draw(batch, noise_generator(cfg.seed, row, level, CHOICES_STREAM))}
                    with acc.autocast():
                        noise = noise_generator(cfg.seed, row, level)
                        loss = flow_matching_loss(encoded, module, batch, noise, sigma=sigma.view(1))
                    values[i, level] = loss.detach().double().cpu()
    finally:
        module.train(was_training)
    return values, torch.tensor(held.counted, dtype=torch.bool)


def evaluate(run: Run) -> float:
    """The mean validation loss over every held-out row and noise level, all processes together (each adds the
    rows it holds; every process must call this)."""
    acc = run.accelerator
    values, counted = losses(run)
    totals = torch.tensor([values[counted].sum().item(), values[counted].numel()], dtype=torch.float64)
    if acc.num_processes > 1:
        totals = acc.reduce(totals.to(acc.device), reduction="sum").cpu()
    return float(totals[0] / totals[1])


def log(run: Run, state: TrainState, value: float) -> None:
    """`val_loss` in the log, OUTPUT/metrics.jsonl (a record of its own: step, val_loss, time) and the trackers."""
    if not run.accelerator.is_main_process:
        return
    held = run.validation_set
    logger.info("step %d: %s %.5f (%d rows x %d noise levels)", state.step, METRIC, value, held.size, len(held.sigmas))
    with (run.output / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": state.step, METRIC: value, "time": time.time()}) + "\n")
    if run.config.report_to:
        run.accelerator.log({METRIC: value}, step=state.step)


def validate_loss(run: Run, state: TrainState) -> float:
    """Evaluate and log the validation loss after `state.step` (every process calls it)."""
    value = evaluate(run)
    log(run, state, value)
    return value


def check(cfg: TrainConfig) -> None:
    """The `--validation_dataset_*` / `--validation_loss_*` settings, each error naming its flag (from
    `TrainConfig.check`)."""
    given = cfg.validation_dataset_base_path is not None
    for name in ("validation_dataset_metadata_path", "validation_loss_steps", "validation_loss_sigmas"):
        default = DEFAULT_SIGMAS if name == "validation_loss_sigmas" else None
        if getattr(cfg, name) != default and not given:
            raise ConfigError(f"--{name} belongs to the validation loss; give --validation_dataset_base_path too")
    for name in ("validation_loss_steps", "validation_loss_sigmas"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name} {value} must be >= 1")
    if not given:
        return
    if cfg.task not in ("sft",):
        raise ConfigError(
            f"--validation_dataset_base_path: --task {cfg.task} does not learn the flow-matching loss this measures; "
            "use it with --task sft"
        )


def check_paths(cfg: TrainConfig) -> None:
    """The validation folder and metadata file exist (before any model loads, as `check_data_paths`)."""
    folder = cfg.validation_dataset_base_path
    if folder is not None and not Path(folder).is_dir():
        raise ConfigError(f"--validation_dataset_base_path {folder}: no such folder")
    metadata = cfg.validation_dataset_metadata_path
    if metadata is not None and not Path(metadata).is_file():
        raise ConfigError(f"--validation_dataset_metadata_path {metadata}: no such file")


__all__ = [
    "CACHE_FOLDER",
    "METRIC",
    "HeldOut",
    "build",
    "cache_folder",
    "check",
    "check_paths",
    "due",
    "evaluate",
    "every",
    "fixed_sigmas",
    "held_out_config",
    "log",
    "losses",
    "noise_generator",
    "read_cached",
    "read_rows",
    "rows_to_cache",
    "validate_loss",
]
