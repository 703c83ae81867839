"""Several datasets in one run: `--dataset_config datasets.yaml`, as musubi-tuner's and kohya's dataset config files.

    datasets:
      - base_path: data/subject        # required: a folder read as --dataset_base_path is
        repeats: 10                    # its rows count 10 times an epoch (times their own `repeats` column)
        trigger_word: sks dog
      - base_path: data/regularization
        metadata_path: data/regularization/captions.csv
        max_pixels: 262144             # its own size, in place of the run's
        loss_weight: 0.5               # each of its samples weighs its loss by this (kohya's prior_loss_weight)

A `.toml` file holds the same as `[[datasets]]` tables; a bare YAML list of the entries works too. An entry may give
`metadata_path`, `repeats` (a whole number, default 1), `loss_weight` (> 0, default 1), the sizes `max_pixels` /
`resolutions` / `height` + `width` (any of them replaces the run's size settings), `num_frames`, the clips
`video_frame_extraction` / `video_frame_stride` / `video_frame_samples` (any of them replaces the run's three) and
`video_fps`, and `trigger_word`; what it leaves out is the run's. Relative paths are read as on the command line.

Each dataset is a `data.MetadataDataset` of its own settings; `CombinedDataset` puts their samples one after the
other, each with its own bucket (a batch still holds one bucket, `data.batch_plan`). A sample of a dataset whose
`loss_weight` is not 1 carries it (`LOSS_WEIGHT_KEY`) into its encoded sample and the cache, and the loss multiplies
that sample's error by it (`weighted_by_dataset`); with every weight 1 nothing is added and nothing changes.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from diffsynth.runtime.errors import ConfigError

from .config import TrainConfig, _coerce, _hints
from .data import MetadataDataset, cache_settings
from .masks import MASK_COLUMN

logger = logging.getLogger(__name__)

SIZE_KEYS = ("max_pixels", "resolutions", "height", "width")  # one given: the dataset's sizes replace the run's
CLIP_KEYS = ("video_frame_extraction", "video_frame_stride", "video_frame_samples")  # likewise the clips
SETTINGS = {  # an entry's keys that are the run's settings, and those settings' names
    "base_path": "dataset_base_path",
    "metadata_path": "dataset_metadata_path",
    **{name: name for name in (*SIZE_KEYS, "num_frames", *CLIP_KEYS, "video_fps", "trigger_word")},
}
KEYS = (*SETTINGS, "repeats", "loss_weight")
LOSS_WEIGHT_KEY = "dataset_loss_weight"  # a row's and its encoded sample's loss weight (only where it is not 1)
LOSS_WEIGHTS_KEY = "dataset_loss_weights"  # a batch's, [B]


@dataclass(frozen=True)
class DatasetEntry:
    """One dataset of `--dataset_config`: where it is in the file, the run's settings with its own, its repeats
    and its loss weight."""

    where: str  # "--dataset_config FILE dataset N", for messages
    config: TrainConfig
    repeats: int = 1
    loss_weight: float = 1.0


def uses_dataset_config(cfg: TrainConfig) -> bool:
    """Whether the run reads `--dataset_config`. A config with a `dataset_base_path` reads that folder: the held-out
    rows' config (`validation_loss.held_out_config`) sets it over the run's."""
    return cfg.dataset_config is not None and cfg.dataset_base_path is None


def dataset_entries(cfg: TrainConfig) -> list[DatasetEntry]:
    """The datasets of `--dataset_config`, checked (none without it)."""
    if not uses_dataset_config(cfg):
        return []
    path = Path(cfg.dataset_config)
    items = _read(path)
    return [_entry(cfg, item, f"--dataset_config {path} dataset {i + 1}") for i, item in enumerate(items)]


def _read(path: Path) -> list:
    if not path.is_file():
        raise ConfigError(f"--dataset_config {path}: no such file")
    if path.suffix.lower() == ".toml":
        import tomllib

        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"--dataset_config {path}: {error}") from None
    else:
        import yaml

        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as error:
            raise ConfigError(f"--dataset_config {path}: {error}") from None
    if isinstance(data, Mapping) and set(data) == {"datasets"}:
        data = data["datasets"]
    if not isinstance(data, list) or not data:
        got = f"the keys {', '.join(map(str, data))}" if isinstance(data, Mapping) else repr(data)
        raise ConfigError(
            f"--dataset_config {path}: expected a list of datasets under the key datasets (each a mapping with "
            f"base_path), got {got}"
        )
    return data


def _entry(cfg: TrainConfig, item: Any, where: str) -> DatasetEntry:
    if not isinstance(item, Mapping):
        raise ConfigError(f"{where}: expected a mapping of key: value (base_path: ...), got {item!r}")
    for key in item:
        if key not in KEYS:
            raise ConfigError(f"{where}: unknown key {key!r}; the known keys are {', '.join(KEYS)}")
    if item.get("base_path") in (None, ""):
        raise ConfigError(f"{where}: base_path is required (the dataset's folder)")
    overrides: dict[str, Any] = {}
    if any(key in item for key in SIZE_KEYS):
        overrides.update(resolutions=[], height=None, width=None)
    if any(key in item for key in CLIP_KEYS):
        overrides.update(video_frame_extraction="head", video_frame_stride=None, video_frame_samples=1)
    hints = _hints()
    for key, name in SETTINGS.items():
        if key in item:
            overrides[name] = _coerce(key, hints[name], item[key], f"{where}: ")
    try:
        config = replace(cfg, dataset_config=None, **overrides).check()
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None
    repeats = item.get("repeats", 1)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ConfigError(f"{where}: repeats {repeats!r} is not a whole number >= 1")
    weight = item.get("loss_weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (weight > 0 and math.isfinite(weight)):
        raise ConfigError(f"{where}: loss_weight {weight!r} is not a number > 0")
    if weight != 1 and cfg.task not in ("sft", "direct_distill"):
        raise ConfigError(
            f"{where}: loss_weight weighs the flow-matching and direct-distillation losses; --task {cfg.task} has its "
            "own objective"
        )
    return DatasetEntry(where, config, repeats, float(weight))


def check_paths(cfg: TrainConfig) -> None:
    """Each dataset's folder and metadata file exist (from `TrainConfig.check_data_paths`, before any model loads)."""
    for entry in dataset_entries(cfg):
        base, metadata = entry.config.dataset_base_path, entry.config.dataset_metadata_path
        if not Path(base).is_dir():
            raise ConfigError(f"{entry.where}: base_path {base}: no such folder")
        if metadata is not None and not Path(metadata).is_file():
            raise ConfigError(f"{entry.where}: metadata_path {metadata}: no such file")


def dataset_settings(cfg: TrainConfig, family: str) -> list[dict[str, Any]] | None:
    """What shapes each dataset's encoded samples (`data.cache_settings` of its settings, its metadata's hash among
    them) with its repeats and loss weight, for the cache to record; None without `--dataset_config`."""
    if not uses_dataset_config(cfg):
        return None
    return [
        {
            "base_path": entry.config.dataset_base_path,
            **{k: v for k, v in cache_settings(entry.config, family).items() if k != "family"},
            "repeats": entry.repeats,
            "loss_weight": entry.loss_weight,
        }
        for entry in dataset_entries(cfg)
    ]


def changed_dataset(cache_dir: Path, recorded: list | None, expected: list | None) -> str:
    """The message refusing a cache whose datasets' recorded settings (`dataset_settings`) are not this run's,
    naming the first dataset that changed and how."""
    again = "use the same datasets or encode again into a new --cache_dir"
    if not recorded:
        return f"--cache_dir {cache_dir} was encoded from --dataset_base_path, not a --dataset_config; {again}"
    if not expected:
        return f"--cache_dir {cache_dir} was encoded from a --dataset_config, this run has --dataset_base_path; {again}"
    if len(recorded) != len(expected):
        return (
            f"--cache_dir {cache_dir} was encoded from {len(recorded)} datasets, this run's --dataset_config has "
            f"{len(expected)}; {again}"
        )
    for i, (old, new) in enumerate(zip(recorded, expected, strict=True)):
        keys = [key for key in dict.fromkeys((*new, *old)) if old.get(key) != new.get(key)]
        if keys:
            what = "its metadata changed" if keys[0] == "metadata_sha256" else f"{keys[0]} {old.get(keys[0])!r}"
            now = "" if keys[0] == "metadata_sha256" else f", now {new.get(keys[0])!r}"
            return (
                f"--cache_dir {cache_dir} was encoded with another dataset {i + 1} of --dataset_config (base_path "
                f"{new['base_path']}): {what}{now}; {again}"
            )
    return f"--cache_dir {cache_dir} was encoded from other datasets; {again}"


class CombinedDataset(Dataset):
    """The samples of several `MetadataDataset`s one after the other, with what the trainer reads of a dataset:
    `buckets`, `repeats` (each dataset's times its entry's), `file_keys`, `rows`, `metadata` (the config file) and
    the samples, a dataset's with its `loss_weight` (`LOSS_WEIGHT_KEY`) where that is not 1."""

    def __init__(self, parts: Sequence[MetadataDataset], entries: Sequence[DatasetEntry], source: str | Path):
        self.parts, self.entries = list(parts), list(entries)
        self.metadata = Path(source)
        self.starts = list(itertools.accumulate((len(part) for part in self.parts), initial=0))
        self.buckets = [bucket for part in self.parts for bucket in part.buckets]
        self.repeats = [
            r * entry.repeats for part, entry in zip(self.parts, self.entries, strict=True) for r in part.repeats
        ]
        self.file_keys = tuple(dict.fromkeys(key for part in self.parts for key in part.file_keys))
        masked = [any(row.get(MASK_COLUMN) for row in part.rows) or part.alpha_masked for part in self.parts]
        if any(part.masked_loss for part in self.parts) and not any(masked):
            raise ConfigError(
                f"--masked_loss: no dataset of --dataset_config {source} has a mask; give rows a {MASK_COLUMN!r} "
                "column (a grayscale picture, white where the loss counts) or put cat-masklabel.png beside cat.png"
            )
        for part, entry in zip(self.parts, self.entries, strict=True):
            logger.info(
                "%s (%s): %d samples x repeats %d, loss weight %g",
                entry.where,
                entry.config.dataset_base_path,
                len(part),
                entry.repeats,
                entry.loss_weight,
            )

    @property
    def rows(self) -> list[dict[str, Any]]:
        return [row for part in self.parts for row in part.rows]

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, index: int) -> dict[str, Any]:
        k = bisect.bisect_right(self.starts, index) - 1
        row = self.parts[k][index - self.starts[k]]
        weight = self.entries[k].loss_weight
        return row if weight == 1 else {**row, LOSS_WEIGHT_KEY: weight}


# ----------------------------------------------------------------------------------- loss weights
def take_row_weights(rows: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[float | None]]:
    """The rows without their loss weights (a task's `encode` does not know them), and the weights."""
    weights = [row.get(LOSS_WEIGHT_KEY) for row in rows]
    if all(weight is None for weight in weights):
        return list(rows), weights
    return [{k: v for k, v in row.items() if k != LOSS_WEIGHT_KEY} for row in rows], weights


def attach_loss_weights(weights: Sequence[float | None], samples: list[dict[str, torch.Tensor]]) -> None:
    """Each encoded sample with its row's loss weight (a 0-d float32 tensor, cached with it), where it has one."""
    for weight, sample in zip(weights, samples, strict=True):
        if weight is not None:
            sample[LOSS_WEIGHT_KEY] = torch.tensor(float(weight), dtype=torch.float32)


def take_loss_weights(samples: list[dict[str, Any]], device) -> torch.Tensor | None:
    """Remove the loss weights from encoded samples (the task's `collate` does not know them) and return them as
    the batch's `[B]` (1 where a sample has none); None when no sample has one."""
    weights = [sample.pop(LOSS_WEIGHT_KEY, None) for sample in samples]
    if all(weight is None for weight in weights):
        return None
    return torch.tensor([1.0 if w is None else float(w) for w in weights], dtype=torch.float32, device=device)


def weighted_by_dataset(batch: Mapping[str, Any], error: torch.Tensor) -> torch.Tensor:
    """Each sample's `error` `[B]` times its dataset's `loss_weight` (as it is without weights in the batch)."""
    weights = batch.get(LOSS_WEIGHTS_KEY)
    return error if weights is None else error * weights.to(error)


__all__ = [
    "KEYS",
    "LOSS_WEIGHTS_KEY",
    "LOSS_WEIGHT_KEY",
    "CombinedDataset",
    "DatasetEntry",
    "attach_loss_weights",
    "changed_dataset",
    "check_paths",
    "dataset_entries",
    "dataset_settings",
    "take_loss_weights",
    "take_row_weights",
    "uses_dataset_config",
    "weighted_by_dataset",
]
