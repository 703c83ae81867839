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

musubi-tuner's and kohya's dataset config files read as they are (`_our_names`): a `[general]` table gives every
dataset its defaults, each of kohya's `[[datasets.subsets]]` is a dataset, and their keys become ours (`image_directory`,
`video_directory`, `image_dir` -> base_path, `num_repeats` -> repeats, `resolution` with `enable_bucket` -> max_pixels
or width + height, `target_frames` -> num_frames, `frame_extraction = "full"` with `max_frames` -> full clips of at
most num_frames, `is_reg` -> loss_weight `prior_loss_weight`, ...). Their options that
are the run's flags here (`batch_size`, kohya's caption options) are taken when they equal the flag; what cannot be
honoured is refused naming the key (`REFUSED`, `INERT`).

Each dataset is a `data.MetadataDataset` of its own settings; `CombinedDataset` puts their samples one after the
other, each with its own bucket (a batch still holds one bucket and frame count, `data.batch_plan`). A sample of a dataset whose
`loss_weight` is not 1 carries it (`LOSS_WEIGHT_KEY`) into its encoded sample and the cache, and the loss multiplies
that sample's error by it (`weighted_by_dataset`); with every weight 1 nothing is added and nothing changes.
"""

from __future__ import annotations

import bisect
import itertools
import json
import logging
import math
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from diffsynth.runtime.errors import ConfigError, preview
from diffsynth.runtime.media import IMAGE_SUFFIXES, VIDEO_SUFFIXES

from .config import TrainConfig, _coerce, _hints
from .data import CAPTION_SUFFIXES, METADATA_NAMES, MetadataDataset, Row, cache_settings, read_text_file
from .masks import MASK_COLUMN, is_mask_file

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
LENGTH_OF_KEY = "_one_length_of"  # set by `_translate` only (a file's own key of this name is unknown there)


@dataclass(frozen=True)
class DatasetEntry:
    """One dataset of `--dataset_config`: where it is in the file, the run's settings with its own, its repeats
    and its loss weight; `one_length_of` names the musubi dataset whose several `target_frames` this is one
    length of (as musubi, its videos too short for that length are left out of it, not refused)."""

    where: str  # "--dataset_config FILE dataset N", for messages
    config: TrainConfig
    repeats: int = 1
    loss_weight: float = 1.0
    one_length_of: str | None = None


def uses_dataset_config(cfg: TrainConfig) -> bool:
    """Whether the run reads `--dataset_config`. A config with a `dataset_base_path` reads that folder: the held-out
    rows' config (`validation_loss.held_out_config`) sets it over the run's."""
    return cfg.dataset_config is not None and cfg.dataset_base_path is None


def dataset_entries(cfg: TrainConfig) -> list[DatasetEntry]:
    """The datasets of `--dataset_config`, checked (none without it)."""
    if not uses_dataset_config(cfg):
        return []
    path = Path(cfg.dataset_config)
    items, general = _read(path)
    return [
        _entry(cfg, ours, where)
        for i, item in enumerate(items)
        for where, ours in _our_names(cfg, general, item, f"--dataset_config {path} dataset {i + 1}")
    ]


def _toml_parser(path: Path):
    """The stdlib `tomllib` (Python 3.11+), else `tomli` (the same parser, for Python 3.10)."""
    try:
        import tomllib
    except ImportError:
        try:
            import tomli as tomllib
        except ImportError:
            raise ConfigError(
                f"--dataset_config {path}: a .toml dataset config needs Python 3.11+ or `pip install tomli` "
                "(or use the .yaml / .json form)"
            ) from None
    return tomllib


def _read(path: Path) -> tuple[list, Mapping]:
    """The file's datasets and its `general` table (musubi-tuner's and kohya's defaults of every dataset)."""
    if not path.is_file():
        raise ConfigError(f"--dataset_config {path}: no such file")
    if path.suffix.lower() == ".toml":
        tomllib = _toml_parser(path)
        try:
            data = tomllib.loads(read_text_file(path, "--dataset_config"))
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"--dataset_config {path}: {error}") from None
    else:
        import yaml

        try:
            data = yaml.safe_load(read_text_file(path, "--dataset_config"))
        except yaml.YAMLError as error:
            raise ConfigError(f"--dataset_config {path}: {error}") from None
    general: Any = {}
    if isinstance(data, Mapping) and "datasets" in data and set(data) <= {"datasets", "general"}:
        data, general = data["datasets"], data.get("general", {})
    if not isinstance(general, Mapping):
        raise ConfigError(f"--dataset_config {path}: general must be a table of key = value, got {general!r}")
    if not isinstance(data, list) or not data:
        got = f"the keys {', '.join(map(str, data))}" if isinstance(data, Mapping) else repr(data)
        raise ConfigError(
            f"--dataset_config {path}: expected a list of datasets under the key datasets (each a mapping with "
            f"base_path), got {got}"
        )
    return data, general


def _entry(cfg: TrainConfig, item: Any, where: str) -> DatasetEntry:
    if not isinstance(item, Mapping):
        raise ConfigError(f"{where}: expected a mapping of key: value (base_path: ...), got {item!r}")
    item = dict(item)
    one_length_of = item.pop(LENGTH_OF_KEY, None)
    for key in item:
        if key not in KEYS:
            raise ConfigError(f"{where}: unknown key {key!r}; {_known_keys()}")
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
    repeats = _whole_repeats(item.get("repeats", 1), "repeats", where)
    weight = item.get("loss_weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (weight > 0 and math.isfinite(weight)):
        raise ConfigError(f"{where}: loss_weight {weight!r} is not a number > 0")
    if weight != 1 and cfg.task not in ("sft", "direct_distill"):
        raise ConfigError(
            f"{where}: loss_weight weighs the flow-matching and direct-distillation losses; --task {cfg.task} has its "
            "own objective"
        )
    return DatasetEntry(where, config, repeats, float(weight), one_length_of)


# ----------------------------------------------------------------------------------- musubi-tuner's and kohya's files
FOLDER_KEYS = ("image_directory", "video_directory", "image_dir")  # -> base_path, a folder of captioned files
JSONL_KEYS = ("image_jsonl_file", "video_jsonl_file")  # -> metadata_path (rows {"image_path", "caption"}, data.py)
RUN_FLAGS = {  # their per-dataset options that are the run's flags here: taken when they equal the flag
    "batch_size": "batch_size",
    "bucket_reso_steps": "bucket_step",
    "shuffle_caption": "shuffle_caption",
    "keep_tokens": "keep_tokens",
    "keep_tokens_separator": "keep_tokens_separator",
    "caption_dropout_rate": "caption_dropout",
    "caption_tag_dropout_rate": "caption_tag_dropout",
    "flip_aug": "flip_aug",
    "alpha_mask": "alpha_mask",
}
INERT = {  # their options taken at the value that does nothing (their default), refused at any other
    "caption_separator": ",",
    "caption_prefix": "",
    "caption_suffix": "",
    "enable_wildcard": False,
    "color_aug": False,
    "random_crop": False,
    "caption_dropout_every_n_epochs": 0,
    "token_warmup_min": 1,
    "token_warmup_step": 0,
    "validation_split": 0.0,
    "network_multiplier": 1.0,
    "multiple_target": False,
    "no_resize_control": False,
}
IGNORED = {  # their options that change nothing here, with why (logged)
    "cache_directory": "the encoded cache is the run's --cache_dir",
    "cache_info": "kohya's record of the pictures' sizes",
    "validation_seed": "it seeds validation_split, which is 0",
    "min_bucket_reso": "buckets keep each picture's aspect ratio under the pixel budget, sides not bounded",
    "max_bucket_reso": "buckets keep each picture's aspect ratio under the pixel budget, sides not bounded",
}
REFUSED = {  # their options this trainer cannot honour, with what to do instead
    "source_fps": "musubi drops frames to the model's rate from this assumed file rate; give video_fps (the rate to "
    "train at, e.g. 16 for Wan, read from each file's own timestamps) in the dataset or --video_fps for the run",
    "control_directory": "control images or videos are not read from a folder; list them in a metadata file column "
    "the family's task reads (e.g. edit_image) and give metadata_path",
    "control_resolution": "control images are not read from a folder",
    "metadata_file": "kohya's fine-tuning metadata (one JSON object keyed by picture) is not read; write a "
    "metadata.jsonl of rows {image, prompt} and give metadata_path",
    "conditioning_data_dir": "kohya's ControlNet datasets are not read",
    "face_crop_aug_range": "there is no face-crop augmentation",
    "resize_interpolation": "pictures are resized bicubic",
    "custom_attributes": "kohya's custom attributes are not read",
    **{
        key: "FramePack's settings; there is no FramePack training here"
        for key in (
            "fp_latent_window_size",
            "fp_1f_clean_indices",
            "fp_1f_target_index",
            "fp_1f_no_post",
        )
    },  # fmt: skip
}
FOREIGN_KEYS = (
    *FOLDER_KEYS, *JSONL_KEYS, "subsets", "num_repeats", "resolution", "enable_bucket", "bucket_no_upscale",
    "caption_extension", "target_frames", "frame_extraction", "frame_stride", "frame_sample", "max_frames",
    "class_tokens", "is_reg", "prior_loss_weight", *RUN_FLAGS, *INERT, *IGNORED,
)  # fmt: skip


def _known_keys() -> str:
    return f"the known keys are {', '.join(KEYS)}, and of musubi-tuner's and kohya's files {', '.join(FOREIGN_KEYS)}"


def _our_names(cfg: TrainConfig, general: Mapping, item: Any, where: str) -> list[tuple[str, dict[str, Any]]]:
    """(where, entry in our names) of one dataset of the file: itself with the `general` defaults, or each of a
    kohya dataset's `subsets` with the dataset's then the general settings; musubi-tuner's and kohya's keys become
    ours (`_translate`)."""
    if not isinstance(item, Mapping):
        raise ConfigError(f"{where}: expected a mapping of key: value (base_path: ...), got {item!r}")
    if "subsets" not in item:
        return _translate(cfg, {**general, **item}, where)
    subsets = item["subsets"]
    if not isinstance(subsets, list) or not subsets or not all(isinstance(s, Mapping) for s in subsets):
        raise ConfigError(f"{where}: subsets must be a list of tables ([[datasets.subsets]]), got {subsets!r}")
    shared = {**general, **{k: v for k, v in item.items() if k != "subsets"}}
    merged = [(f"{where} subset {j + 1}", {**shared, **subset}) for j, subset in enumerate(subsets)]
    _check_regularization(merged, where)
    return [entry for at, values in merged for entry in _translate(cfg, values, at)]


def _translate(cfg: TrainConfig, values: Mapping, where: str) -> list[tuple[str, dict[str, Any]]]:
    """One dataset's keys in our names (several entries for several musubi `target_frames`)."""
    rest = dict(values)
    ours = {key: rest.pop(key) for key in list(rest) if key in KEYS}

    def take(key: str, name: str, value: Any) -> None:
        if name in ours:
            raise ConfigError(f"{where}: {key} and {name} both give the dataset's {name}; give one")
        ours[name] = value

    for key in FOLDER_KEYS:
        if key in rest:
            take(key, "base_path", rest.pop(key))
            _check_caption_folder(ours["base_path"], key, where)
    for key in JSONL_KEYS:
        if key in rest:
            take(key, "metadata_path", rest.pop(key))
            _check_musubi_rows(ours["metadata_path"], key, where)
            ours.setdefault("base_path", ".")  # musubi's rows name their files as on its command line
    if "num_repeats" in rest:  # checked here, so an error names the file's key
        take("num_repeats", "repeats", _whole_repeats(rest.pop("num_repeats"), "num_repeats", where))
    prior = rest.pop("prior_loss_weight", 1.0)  # kohya's --prior_loss_weight, here in the file
    is_reg = rest.pop("is_reg", False)
    if not isinstance(is_reg, bool):
        raise ConfigError(f"{where}: is_reg {is_reg!r} must be true or false")
    if is_reg:
        take("is_reg", "loss_weight", prior)
    if "class_tokens" in rest:
        _check_class_tokens(ours.get("base_path"), rest.pop("class_tokens"), where)
    if "caption_extension" in rest:
        _check_caption_extension(ours.get("base_path"), rest.pop("caption_extension"), where)
    _take_resolution(rest, ours, where)
    frames = _take_clips(rest, ours, where)
    for key, flag in RUN_FLAGS.items():
        if key in rest and not _same_run_value(rest[key], getattr(cfg, flag)):
            raise ConfigError(
                f"{where}: {key} {rest[key]!r} is the run's --{flag} here, which is {getattr(cfg, flag)!r} (one "
                f"value for every dataset); pass {_flag_for(flag, rest[key], getattr(cfg, flag))} or leave {key} out"
            )
        rest.pop(key, None)
    for key, inert in INERT.items():
        if key in rest and rest.pop(key) != inert:
            raise ConfigError(f"{where}: {key} {values[key]!r} is not supported here (only {key} = {inert!r})")
    for key, why in IGNORED.items():
        if key in rest:
            logger.info("%s: %s %r is not used (%s)", where, key, rest.pop(key), why)
    for key in rest:
        if key in REFUSED:
            raise ConfigError(f"{where}: {key} is not supported here: {REFUSED[key]}")
        raise ConfigError(f"{where}: unknown key {key!r}; {_known_keys()}")
    if len(frames) > 1:  # each length batches apart (`data.batch_keys`); a video trains at the lengths it holds
        return [(f"{where} (target_frames {n})", {**ours, "num_frames": n, LENGTH_OF_KEY: where}) for n in frames]
    return [(where, {**ours, **({"num_frames": frames[0]} if frames else {})})]


def _whole_repeats(value: Any, key: str, where: str) -> int:
    """A dataset's repeat count (`key`: the file's name for it), checked."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}: {key} {value!r} is not a whole number >= 1")
    return value


def _same_run_value(value: Any, run: Any) -> bool:
    """Whether a file's per-dataset value is the run's flag value; an empty string is no value (kohya's
    `keep_tokens_separator = ""` default is the run's unset --keep_tokens_separator)."""
    return value == run or (value in ("", None) and run in ("", None))


def _flag_for(flag: str, value: Any, run: Any) -> str:
    """The command-line spelling that sets --`flag` to `value`: `--flag` / `--no-flag` for a switch, a quoted
    string (an empty one too), else the value."""
    if isinstance(value, bool) and isinstance(run, bool):
        return f"--{flag}" if value else f"--no-{flag}"
    return f"--{flag} {shlex.quote(value) if isinstance(value, str) else value}"


def _take_resolution(rest: dict[str, Any], ours: dict[str, Any], where: str) -> None:
    """`resolution` (W or [W, H]) with `enable_bucket` (their default: false) as our sizes: bucketing under W x H
    pixels, or the fixed W x H."""
    resolution = rest.pop("resolution", None)
    bucket, no_upscale = rest.pop("enable_bucket", False), rest.pop("bucket_no_upscale", False)
    for key, value in (("enable_bucket", bucket), ("bucket_no_upscale", no_upscale)):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {key} {value!r} must be true or false")
    if resolution is None:
        return  # the run's sizes
    if isinstance(resolution, int) and not isinstance(resolution, bool):
        resolution = [resolution, resolution]
    if not (isinstance(resolution, list) and len(resolution) == 2 and all(type(v) is int for v in resolution)):
        raise ConfigError(f"{where}: resolution {resolution!r} must be a number of pixels or [width, height]")
    if any(key in ours for key in SIZE_KEYS):
        raise ConfigError(f"{where}: resolution and {', '.join(k for k in SIZE_KEYS if k in ours)} both give sizes")
    width, height = resolution
    if not bucket:
        ours.update(width=width, height=height)
        return
    ours["max_pixels"] = width * height
    if not no_upscale:
        logger.warning(
            "%s: enable_bucket without bucket_no_upscale enlarges small pictures to %d pixels there; here a picture "
            "is never enlarged (it trains at its own size, as with bucket_no_upscale = true)",
            where,
            width * height,
        )


def _take_clips(rest: dict[str, Any], ours: dict[str, Any], where: str) -> list[int]:
    """musubi's `frame_extraction`, `frame_stride`, `frame_sample` as our clips; its `target_frames`, returned."""
    frames = rest.pop("target_frames", [])
    frames = [frames] if isinstance(frames, int) else frames
    if not isinstance(frames, list) or not all(type(n) is int and n >= 1 for n in frames):
        raise ConfigError(f"{where}: target_frames {frames!r} must be a list of frame counts")
    if frames and "num_frames" in ours:
        raise ConfigError(f"{where}: target_frames and num_frames both give the clips' length; give one")
    mode = rest.pop("frame_extraction", None)
    stride, samples = rest.pop("frame_stride", None), rest.pop("frame_sample", None)
    longest = rest.pop("max_frames", None)
    if longest is not None and mode != "full":
        logger.info("%s: max_frames is not used (it is for frame_extraction full)", where)
    if mode == "full":  # each whole video up to max_frames (musubi's default: 129), not target_frames' lengths
        if longest is not None and (type(longest) is not int or longest < 1):
            raise ConfigError(f"{where}: max_frames {longest!r} must be a whole number of frames >= 1")
        if "num_frames" in ours and longest is not None:
            raise ConfigError(f"{where}: max_frames and num_frames both bound the videos of frame_extraction full")
        if frames:
            logger.info("%s: target_frames is not used (frame_extraction full trains each whole video)", where)
            frames = []
        ours.setdefault("num_frames", 129 if longest is None else longest)
    if mode is not None:
        ours["video_frame_extraction"] = mode  # checked with the run's settings
        if mode == "slide":
            ours["video_frame_stride"] = 1 if stride is None else stride  # musubi's default stride: 1
        if mode == "uniform" and samples is not None:
            ours["video_frame_samples"] = samples
    for key, value, used in (("frame_stride", stride, "slide"), ("frame_sample", samples, "uniform")):
        if value is not None and mode != used:
            logger.info("%s: %s is not used (it is for frame_extraction %s)", where, key, used)
    return frames


def _check_caption_folder(base: Any, key: str, where: str) -> None:
    """A musubi or kohya folder is read by its caption files: a metadata file there would be read instead."""
    folder = Path(str(base))
    for name in METADATA_NAMES if folder.is_dir() else ():
        if (folder / name).is_file():
            raise ConfigError(
                f"{where}: {key} {base} holds {name}, which is read here in place of the caption files; move it "
                "out, or give it as metadata_path"
            )


def _check_musubi_rows(path: Any, key: str, where: str) -> None:
    """musubi's JSONL rows: control images and several targets are not read."""
    file = Path(str(path))
    lines = read_text_file(file, "metadata file").splitlines() if file.is_file() else []
    for n, line in enumerate(lines):
        try:
            row = json.loads(line) if line.strip() else {}
        except json.JSONDecodeError:
            return  # named when the rows are read
        odd = [k for k in row if k.startswith("control_path") or re.fullmatch(r"image_path_\d+", k)]
        if odd:
            raise ConfigError(
                f"{where}: {key} {path} row {n + 1} has {', '.join(odd)}: musubi's control images and several "
                "targets are not read here"
            )


def _media_files(base: Path) -> list[Path]:
    """The pictures and videos a folder of captioned files trains on (`data.caption_rows`)."""
    suffixes = (*IMAGE_SUFFIXES, *VIDEO_SUFFIXES)
    return [p for p in sorted(base.rglob("*")) if p.suffix.lower() in suffixes and not is_mask_file(p)]


def _check_class_tokens(base: Any, tokens: Any, where: str) -> None:
    """kohya's `class_tokens` caption the pictures without a caption file: taken where every picture has one."""
    folder = Path(str(base))
    if base is None or not folder.is_dir():
        return
    bare = [p for p in _media_files(folder) if not any(p.with_suffix(s).is_file() for s in CAPTION_SUFFIXES)]
    if bare:
        raise ConfigError(
            f"{where}: class_tokens {tokens!r} would caption {len(bare)} pictures without a caption file "
            f"({preview([str(p.relative_to(folder)) for p in bare], 3)}); that is not supported in a listed folder: "
            f"give each a .txt holding {tokens!r}, or put them in a folder named 1_{tokens} inside base_path "
            "(kohya's folder layout: its words caption the uncaptioned pictures)"
        )


def _check_caption_extension(base: Any, extension: Any, where: str) -> None:
    """Folders are read by their `.txt` or `.caption` files (`data.CAPTION_SUFFIXES`, the first found): a file
    naming one is taken where no picture would be captioned by the other."""
    if extension not in CAPTION_SUFFIXES:
        raise ConfigError(
            f"{where}: caption_extension {extension!r} is not read here; captions are {' or '.join(CAPTION_SUFFIXES)} "
            "files"
        )
    folder = Path(str(base))
    if base is None or not folder.is_dir():
        return
    read = {p: next((s for s in CAPTION_SUFFIXES if p.with_suffix(s).is_file()), None) for p in _media_files(folder)}
    found = [p for p, suffix in read.items() if suffix not in (None, extension)]
    if found:
        raise ConfigError(
            f"{where}: caption_extension {extension!r}, but {len(found)} pictures "
            f"({preview([str(p.relative_to(folder)) for p in found], 3)}) would be captioned here by their "
            f"{' / '.join(s for s in CAPTION_SUFFIXES if s != extension)} file; keep one extension in the folder"
        )


def _check_regularization(subsets: list[tuple[str, dict[str, Any]]], where: str) -> None:
    """kohya fits a dataset's regularization pictures (`is_reg`) to its training pictures' count an epoch
    (repeating or leaving out some); here each counts its num_repeats times, so the two counts must agree."""
    counts = {True: 0, False: 0}
    for _, values in subsets:
        folder = values.get("image_dir", values.get("base_path"))
        repeats = values.get("num_repeats", values.get("repeats", 1))
        if folder is None or not Path(str(folder)).is_dir() or type(repeats) is not int:
            return  # checked with the entry
        counts[values.get("is_reg") is True] += repeats * len(_media_files(Path(str(folder))))
    if counts[True] and counts[True] != counts[False]:
        raise ConfigError(
            f"{where}: its regularization subsets (is_reg) give {counts[True]} pictures an epoch (pictures x "
            f"num_repeats), its training subsets {counts[False]}; kohya repeats or leaves out regularization pictures "
            "to match, here each counts num_repeats times: set num_repeats so the counts agree, or write the "
            "datasets in our names (repeats, loss_weight) to keep them as they are"
        )


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
    `buckets`, `batch_keys`, `repeats` (each dataset's times its entry's), `file_keys`, `rows`, `metadata` (the config file) and
    the samples, a dataset's with its `loss_weight` (`LOSS_WEIGHT_KEY`) where that is not 1."""

    def __init__(self, parts: Sequence[MetadataDataset], entries: Sequence[DatasetEntry], source: str | Path):
        self.parts, self.entries = list(parts), list(entries)
        self.metadata = Path(source)
        self.starts = list(itertools.accumulate((len(part) for part in self.parts), initial=0))
        self.buckets = [bucket for part in self.parts for bucket in part.buckets]
        self.sample_frames = [count for part in self.parts for count in part.sample_frames]
        self.sample_conditioning = [sizes for part in self.parts for sizes in part.sample_conditioning]
        self.batch_keys = [key for part in self.parts for key in part.batch_keys]
        if _counts_differ(self.parts):
            self.sample_conditioning = _joined(self.parts, "sample_conditioning")
            self.batch_keys = _joined(self.parts, "batch_keys")
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
        _check_some_length(self.parts, self.entries)
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
        return row if weight == 1 else Row({**row, LOSS_WEIGHT_KEY: weight}, source=row.source)


def _counts_differ(parts: Sequence[MetadataDataset]) -> bool:
    """Whether the datasets' samples differ in their aligned / count-only file counts (`sample_counts`): a Wan VACE
    dataset whose rows all have a control video beside one whose rows have none, each agreeing within itself."""
    return len({counts for part in parts for counts in part.sample_counts}) > 1


def _joined(parts: Sequence[MetadataDataset], name: str) -> list[tuple]:
    """The parts' `name` (batch keys or conditioning sizes), each sample's file counts added where its dataset has
    not added them itself (it does when its own rows differ), so samples of other counts batch apart."""
    return [
        item if part.counts_joined else (*item, *counts)
        for part in parts
        for item, counts in zip(getattr(part, name), part.sample_counts, strict=True)
    ]


def _check_some_length(parts: Sequence[MetadataDataset], entries: Sequence[DatasetEntry]) -> None:
    """A musubi dataset of several `target_frames` whose videos are all too short for every length gives nothing to
    train on: refused, naming it and its lengths."""
    groups: dict[str, list[MetadataDataset]] = {}
    for part, entry in zip(parts, entries, strict=True):
        if entry.one_length_of is not None:
            groups.setdefault(entry.one_length_of, []).append(part)
    for where, lengths in groups.items():
        if any(len(part) for part in lengths):
            continue
        raise ConfigError(
            f"{where}: every video is shorter than each of its target_frames "
            f"{[part.num_frames for part in lengths]}, so it gives no clip to train on; give a shorter length"
        )


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
