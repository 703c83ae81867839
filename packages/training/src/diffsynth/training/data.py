"""Datasets: a folder with `metadata.csv` / `.json` / `.jsonl`, size buckets, batch plans, the encoded cache.

- Without a metadata file, a folder of pictures or videos each with a caption file of the same name
  (`cat_01.png` + `cat_01.txt`, kohya's and ai-toolkit's layout, subfolders included) is read as rows
  `{"image" or "video": file, "prompt": caption}`, with `"loss_mask"` where a `cat_01-masklabel.png` is beside
  it (see `masks.py`). kohya's DreamBooth layout works too: a top-level subfolder `10_sks dog/` repeats its rows
  10 times an epoch, and a picture there without a caption file takes the folder's words (`sks dog`) as prompt.
- musubi-tuner's JSONL rows (`{"image_path" or "video_path": file, "caption": text}`) read as ours (`COLUMN_ALIASES`).
- A row's optional `repeats` column (a whole number >= 1) shows it that many times an epoch (times
  `--dataset_repeat`), e.g. to balance a few pictures of a subject against many regularisation pictures.

- A metadata row names its files in the `--data_file_keys` columns (paths relative to the dataset folder) and
  carries the prompt and any extra inputs in other columns. A JSON/JSONL value may be a list of paths. A sound
  file in another column than the row's sound (e.g. Wan-Dancer's `wantodance_music_path`) becomes its absolute
  path, for the task to read (as DiffSynth-Studio passes such paths on).
- A task's `conditioning` columns (reference images such as `kontext_images`, `edit_image`, or videos such as
  Wan2.2-Animate's face crops) are file columns too; each of their images or videos keeps its own size (its own
  bucket under `--max_pixels`), not the row's. Those of its `aligned_conditioning` columns are pixel-aligned with
  the target (Qwen-Image-Layered's input image, Step1X-Edit's source picture): they are read as the target is,
  covering the sample's size and centre-cropped, so a fixed `--height`/`--width` crops both alike. A task's
  `check_row(row, size)` checks each row at setup, its files' sizes read from their headers (`size(column, name)`).
- Each sample gets a bucket, a (width, height) in multiples of `--bucket_step` with at most `--max_pixels` (the
  image is shrunk keeping its aspect ratio, never enlarged), or the fixed `--height`/`--width`. Images are
  resized to cover the bucket and centre-cropped. Sizes come from the file headers, so planning is cheap.
  Several pixel budgets (`--resolutions`) make each row a sample at each size.
- `batch_plan` gives each process its batches for an epoch: the same seeded shuffle on every process, batches
  drawn from one bucket and frame count (`batch_keys`; with conditioning columns also each of their pictures' size
  as read and their count, so their stacks agree; where rows differ in it, even across the datasets of a
  `--dataset_config`, each aligned or count-only column's file count), cut to the same count on every process and
  to whole gradient-accumulation steps. A task's `conditioning_counts` columns (Wan's reference images, fitted to
  the video by the pipeline) join the keys by their count alone.
  Resuming skips the batches already trained, without loading them.
- Sound: a row's `audio` column, or DiffSynth-Studio's `input_audio` (a file path in `--data_file_keys`: a sound
  file, or a video whose track is meant) or else its video file's own audio track is read with `av` as `"audio"` `[channels, samples]` float32
  in [-1, 1] (None for a video without one) at `"audio_sample_rate"` Hz (the file's own rate unless the dataset
  is given `audio_rate`), covering the frames read. A video row also gets `"frame_rate"`: its own column's
  value if it has one, else the file's rate. Tasks that train without sound ignore the three keys.
- The cache (`--stage encode`) stores each encoded sample as `items/NNNNNN.safetensors` and an `index.json`
  with the buckets and the settings that shaped them; training from it needs neither encoders nor VAE. The
  held-out rows of the validation loss are a cache of their own in its `validation/` (`validation_loss.py`).
- Several datasets in one run (`--dataset_config`), each a `MetadataDataset` of its own settings: `datasets.py`.
"""

from __future__ import annotations

import bisect
import csv
import hashlib
import io
import json
import logging
import math
import os
import re
import struct
import sys
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from diffsynth.runtime.errors import ConfigError, preview
from diffsynth.runtime.media import IMAGE_SUFFIXES, VIDEO_SUFFIXES

from .captions import holds_word
from .masks import MASK_COLUMN, alpha_mask, has_alpha, is_mask_file, mask_file_for, read_mask, read_mask_video

logger = logging.getLogger(__name__)

METADATA_NAMES = ("metadata.csv", "metadata.json", "metadata.jsonl")
CAPTION_SUFFIXES = (".txt", ".caption")  # a picture's caption file (kohya's two extensions), first found wins
SOUND_SUFFIXES = (".wav", ".mp3", ".flac", ".ogg", ".m4a", ".aac")  # file columns handed on as absolute paths
AUDIO_KEY = "audio"  # the metadata column of a row's sound (see `read_audio`), and the loaded row's key for it
AUDIO_KEYS = (AUDIO_KEY, "input_audio")  # the sound's columns: ours, DiffSynth-Studio's
REPEATS_COLUMN = "repeats"  # a row's times per epoch
KOHYA_FOLDER = re.compile(r"(\d+)_(.+)")  # kohya's DreamBooth folder: `<repeats>_<class words>`
COLUMN_ALIASES = {"image_path": "image", "video_path": "video", "caption": "prompt"}  # musubi-tuner's JSONL names
CACHE_VERSION = 1
Bucket = tuple[int, int]  # (width, height) in pixels


# ----------------------------------------------------------------------------------- metadata
def metadata_file(base: Path, explicit: str | None = None) -> Path:
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise ConfigError(f"--dataset_metadata_path {path}: no such file")
        return path
    if not base.is_dir():
        raise ConfigError(f"--dataset_base_path {base}: no such folder")
    for name in METADATA_NAMES:
        if (base / name).is_file():
            return base / name
    if kohya_layout(base) or any(p.suffix.lower() in CAPTION_SUFFIXES for p in base.rglob("*")):
        return base  # captioned files, or kohya's class folders (`caption_rows`)
    listing = preview(sorted(p.name for p in base.iterdir()), 10)
    raise ConfigError(
        f"--dataset_base_path {base} has no {' / '.join(METADATA_NAMES)} and no caption files (it holds {listing}); "
        "add a metadata file with a column per input (e.g. image,prompt), give each picture a caption file of its "
        "name (cat.png + cat.txt), or pass --dataset_metadata_path"
    )


def kohya_layout(base: Path) -> bool:
    """Whether `base` is laid out as kohya's DreamBooth datasets are: subfolders `<repeats>_<words>`, besides which
    only `kohya_strays` (so a `2024_holiday/` beside a folder of pictures is not read as 2024 repeats)."""
    folders = [p for p in base.iterdir() if p.is_dir()]
    repeated = [p for p in folders if _repeats_folder(p.name)]
    return bool(repeated) and len(repeated) + len(kohya_strays(base)) == len(folders)


def _repeats_folder(name: str) -> bool:
    return bool(KOHYA_FOLDER.fullmatch(name)) and int(name.split("_")[0]) >= 1


def kohya_strays(base: Path) -> list[str]:
    """The subfolders of `base` that a kohya layout ignores, as kohya's loader does: not `<repeats>_<words>` and
    hidden (Jupyter's `.ipynb_checkpoints`, a macOS zip's `__MACOSX`) or holding no picture or video (`logs/`)."""
    media = IMAGE_SUFFIXES + VIDEO_SUFFIXES
    return sorted(
        p.name
        for p in base.iterdir()
        if p.is_dir()
        and not _repeats_folder(p.name)
        and (p.name.startswith(".") or p.name == "__MACOSX" or not any(f.suffix.lower() in media for f in p.rglob("*")))
    )


def kohya_folder(relative: Path) -> tuple[int, str] | None:
    """(repeats, class words) of a file in a kohya DreamBooth folder (`10_sks dog/cat.png` -> (10, "sks dog")),
    None elsewhere. Only for a `kohya_layout` folder."""
    if len(relative.parts) < 2:
        return None
    match = KOHYA_FOLDER.fullmatch(relative.parts[0])
    return (int(match[1]), match[2].strip()) if match and int(match[1]) >= 1 else None


def caption_rows(base: Path) -> list[dict[str, Any]]:
    """Rows of a folder of captioned pictures or videos: each media file (subfolders included, in name order)
    with the text of the `.txt` file of its name as its prompt, and its `-masklabel.png` mask (a video's may be a
    `-masklabel.mp4` mask video) if it has one. In a
    kohya `N_words/` folder a row repeats N times and a file without a caption takes the words; elsewhere a media
    file without a caption is an error naming it."""
    rows, uncaptioned = [], []
    kohya_dataset = kohya_layout(base)
    strays = set(kohya_strays(base)) if kohya_dataset else set()
    if strays:
        logger.info(
            "kohya folders: ignoring %s beside them (hidden, or no pictures or videos)", ", ".join(sorted(strays))
        )
    for path in sorted(p for p in base.rglob("*") if p.is_file()):
        suffix = path.suffix.lower()
        if (suffix not in IMAGE_SUFFIXES and suffix not in VIDEO_SUFFIXES) or is_mask_file(path):
            continue
        relative = path.relative_to(base)
        if len(relative.parts) > 1 and relative.parts[0] in strays:
            continue
        kohya = kohya_folder(relative) if kohya_dataset else None
        caption = next((c for c in map(path.with_suffix, CAPTION_SUFFIXES) if c.is_file()), None)
        if caption is not None:
            prompt = read_text_file(caption, "caption file").strip()
        elif kohya is not None:
            prompt = kohya[1]
        else:
            uncaptioned.append(str(relative))
            continue
        key = "video" if suffix in VIDEO_SUFFIXES else "image"
        rows.append({key: str(relative), "prompt": prompt})
        if kohya is not None and kohya[0] != 1:
            rows[-1][REPEATS_COLUMN] = kohya[0]
        if mask_file_for(path).is_file():
            rows[-1][MASK_COLUMN] = str(mask_file_for(path).relative_to(base))
    if uncaptioned:
        raise ConfigError(
            f"--dataset_base_path {base}: {len(uncaptioned)} files have no caption file beside them: "
            f"{preview(uncaptioned, 5)} (give each a .txt of its name, an empty one for no prompt)"
        )
    if not rows:
        raise ConfigError(f"--dataset_base_path {base}: its caption files name no picture or video")
    if kohya_dataset:
        counts = {Path(r.get("image") or r.get("video")).parts[0]: r.get(REPEATS_COLUMN, 1) for r in rows}
        logger.info("kohya folders (repeats): %s", ", ".join(f"{name} ({n})" for name, n in sorted(counts.items())))
    return rows


def read_text_file(path: Path, what: str = "file") -> str:
    """The text of a user's UTF-8 file (a metadata or caption file), without the byte-order mark some editors
    write first (Windows Notepad, Excel's "CSV UTF-8"); a file in another encoding is an error naming it."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{what} {path} is not UTF-8 text ({error}); save it as UTF-8") from None


def read_metadata(path: Path) -> list[dict[str, Any]]:
    """The rows of a metadata file: CSV with a header, a JSON list of objects, or JSON lines; a folder's rows
    are its captioned files (`caption_rows`). A line that is not JSON is an error naming the file and line."""
    if path.is_dir():
        return caption_rows(path)
    if path.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(read_text_file(path, "metadata file"), newline=""))
        rows = []
        try:
            rows.extend(reader)
        except csv.Error as error:
            raise ConfigError(f"{path} row {len(rows) + 1}: not readable as CSV ({error})") from None
        rows = _fit_csv_fields(path, rows, reader.fieldnames or [])
    elif path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(read_text_file(path, "metadata file").splitlines(), start=1):
            try:
                rows += [json.loads(line)] if line.strip() else []
            except json.JSONDecodeError as error:
                raise ConfigError(
                    f"{path} line {number} column {error.colno}: not JSON ({error.msg}); each line holds one row, "
                    'a JSON object such as {"image": "cat.png", "prompt": "a cat"}'
                ) from None
    elif path.suffix == ".json":
        try:
            rows = json.loads(read_text_file(path, "metadata file"))
        except json.JSONDecodeError as error:
            raise ConfigError(
                f"{path} line {error.lineno} column {error.colno}: not JSON ({error.msg}); the file holds a JSON "
                "list of rows, each an object"
            ) from None
    else:
        raise ConfigError(f"metadata file {path} must be .csv, .json or .jsonl")
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ConfigError(f"{path} must hold a list of objects (one per sample)")
    if not rows:
        raise ConfigError(f"{path} holds no samples")
    rows = [_our_columns(row) for row in rows]
    _check_prompts(path, rows)
    return rows


def _fit_csv_fields(path: Path, rows: list[dict[str, Any]], header: Sequence[str]) -> list[dict[str, Any]]:
    """Each CSV row has a field per named column: an unquoted comma in a prompt would put its end in no column
    (`csv` keys it None) and a short row would leave a column None, training on a cut or "None" caption. A stray
    trailing comma is harmless (spreadsheet exports): empty fields past the header and unnamed columns a row
    leaves empty are dropped."""
    fitted = []
    for number, row in enumerate(rows, start=1):
        extra = [field for field in row.get(None) or [] if field.strip()]  # non-empty fields past the header
        short = [key for key, value in row.items() if key is not None and key.strip() and value is None]
        if extra or short:
            count = len(header) + len(row.get(None) or []) - sum(value is None for value in row.values())
            raise ConfigError(
                f"{path} row {number}: {count} fields for the {len(header)} columns of its header "
                f"({', '.join(map(str, header))}); put a value holding commas in double quotes "
                '(a,"a cat, fluffy") and give every row a field per column (an empty one: a,,c)'
            )
        fitted.append({k: v for k, v in row.items() if k is not None and (k.strip() or v not in (None, ""))})
    return fitted


def _check_prompts(path: Path, rows: list[dict[str, Any]]) -> None:
    """A row's prompt is text: a JSON null, number or list would be trained on as "None", "5" or "['a', 'b']"."""
    for number, row in enumerate(rows, start=1):
        prompt = row.get("prompt", "")
        if not isinstance(prompt, str):
            raise ConfigError(
                f"{path} row {number} column prompt: {prompt!r} is not text; give the prompt as a JSON string "
                '("" for none)'
            )


def _our_columns(row: dict[str, Any]) -> dict[str, Any]:
    """A row with musubi-tuner's column names (`image_path`, `video_path`, `caption`) under ours, where it does not
    also have ours."""
    if not any(alias in row and name not in row for alias, name in COLUMN_ALIASES.items()):
        return row
    return {(COLUMN_ALIASES[k] if COLUMN_ALIASES.get(k) not in (None, *row) else k): v for k, v in row.items()}


# ----------------------------------------------------------------------------------- sizes
def bucket_for(width: int, height: int, *, max_pixels: int, step: int, fixed: Bucket | None = None) -> Bucket:
    """The training size of a `width` x `height` image: `fixed`, or shrunk under `max_pixels` (aspect kept,
    never enlarged) and rounded down to multiples of `step` (at least one step)."""
    if fixed is not None:
        return fixed
    scale = min(1.0, math.sqrt(max_pixels / (width * height)))
    w = max(step, int(width * scale) // step * step)
    h = max(step, int(height * scale) // step * step)
    if w * h > max_pixels:  # the one-step floor of a very thin image: trim its long side instead
        if w >= h:
            w = max(step, max_pixels // h // step * step)
        else:
            h = max(step, max_pixels // w // step * step)
    return w, h


def fit(image: Image.Image, size: Bucket) -> Image.Image:
    """Resize to cover `size` (aspect kept), then crop the centre."""
    width, height = size
    scale = max(width / image.width, height / image.height)
    resized = image.resize(
        (max(width, round(image.width * scale)), max(height, round(image.height * scale))), Image.BICUBIC
    )
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    return resized.crop((left, top, left + width, top + height))


@contextmanager
def reading(path: Path, where: str, what: str | None = None) -> Iterator[None]:
    """Reads of the file `path` (a picture, video or sound file of a row) whose failure is an error naming it and
    `where` (the metadata file, row and column): a corrupt or truncated picture or video, a text file named as a
    picture. `what` is what the file was read as ("a sound file"; default: by its suffix). A `ConfigError` the
    runtime raises about the file gets `where` in front (one that starts with it already passes as it is)."""
    try:
        yield
    except ConfigError as error:
        if str(error).startswith(where):
            raise
        raise ConfigError(f"{where}: {error}") from None
    except Exception as error:
        av = sys.modules.get("av")  # PyAV's errors, where a video was read
        # PIL's UnidentifiedImageError and "image file is truncated" are OSErrors; its broken chunks SyntaxErrors
        unreadable = (OSError, ValueError, EOFError, SyntaxError, struct.error, Image.DecompressionBombError)
        if not isinstance(error, unreadable) and not (av is not None and isinstance(error, av.error.FFmpegError)):
            raise
        suffix = path.suffix.lower()
        if what is None:
            what = (
                "a video" if suffix in VIDEO_SUFFIXES else "a sound file" if suffix in SOUND_SUFFIXES else "a picture"
            )
        raise ConfigError(f"{where}: {path} cannot be read as {what} ({type(error).__name__}: {error})") from None


def media_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header, upright as the frames are read (a phone's portrait picture or video is
    stored sideways, tagged: EXIF, or a display matrix, which needs a video's first frame decoded)."""
    from diffsynth.runtime.media import upright_size, video_size

    if path.suffix.lower() in VIDEO_SUFFIXES:
        return video_size(path)

    with Image.open(path) as image:
        return upright_size(image)


def video_frame_rate(path: Path) -> float:
    """The frames per second a video file declares (its stream's average rate), from the header."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate:
        raise ConfigError(f"{path} declares no frame rate; give the row a frame_rate column")
    return float(rate)


def read_audio(
    path: str | os.PathLike, *, seconds: float | None = None, rate: int | None = None, offset: float = 0.0
) -> tuple[torch.Tensor, int] | None:
    """The first audio stream of `path` (a sound file or a video) as (float32 `[channels, samples]` in [-1, 1],
    sample rate), from time `offset`, resampled to `rate` Hz when given. Time 0 is a video's first frame (by the
    streams' timestamps: a track that starts after the picture gets silence before it, one that starts before is
    cut) or a sound file's first sample (an AAC encoder's priming samples before time 0 are dropped). With `seconds`
    exactly that long: zeros where the track has no sound (past its end, or a clip wholly after it). None when the
    file has no audio stream."""
    import av
    import numpy as np

    chunks: list[np.ndarray] = []
    with av.open(str(path)) as container:
        if not container.streams.audio:
            return None
        stream = container.streams.audio[0]
        video = container.streams.video[0] if container.streams.video else None
        picture = None  # the time of the video's first frame, time 0 of its clips
        if video is not None and video.start_time is not None and video.time_base:
            picture = float(video.start_time * video.time_base)
        out_rate = int(rate or stream.rate)
        resampler = av.AudioResampler(format="fltp", rate=out_rate)
        limit = None if seconds is None else math.ceil(seconds * out_rate)
        skip, total = None, 0  # skip: the track's samples before the clip (negative: the silence before the track)
        for frame in container.decode(stream):
            if skip is None:
                first = float(frame.pts * frame.time_base) if frame.pts is not None and frame.time_base else 0.0
                lead = max(0.0, -first) if picture is None else picture - first
                skip = round((lead + offset) * out_rate)
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray())
                total += chunks[-1].shape[1]
            if limit is not None and total >= skip + limit:
                break
        else:
            chunks += [out.to_ndarray() for out in resampler.resample(None)]  # what the resampler holds back
        skip = skip or 0
    if not chunks:
        return None
    waveform = torch.from_numpy(np.concatenate(chunks, axis=1).astype(np.float32))
    waveform = waveform[:, skip:] if skip >= 0 else torch.nn.functional.pad(waveform, (-skip, 0))
    if limit is not None:
        waveform = torch.nn.functional.pad(waveform[:, :limit], (0, max(0, limit - waveform.shape[1])))
    return waveform.contiguous(), out_rate


# ----------------------------------------------------------------------------------- datasets
class Row(dict):
    """A dataset item: a metadata row with its files loaded, and `source`, the metadata file and row it came from
    ("metadata.csv row 3"), which an error about its batch names (`naming_rows`)."""

    def __init__(self, *args, source: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.source = source


BATCH_ROW = re.compile(r"\brow (\d+) of the batch\b")  # how a task's `encode` names a row in its errors


@contextmanager
def naming_rows(sources: Sequence[str | None]) -> Iterator[None]:
    """A `ConfigError` raised about a batch of items (a task's `encode`) with its "row k of the batch" replaced by
    the item's metadata file and row (`Row.source`), or those of the batch's items added when it names none."""
    try:
        yield
    except ConfigError as error:
        message, known = str(error), [s for s in sources if s]
        if not known:
            raise

        def named(match: re.Match) -> str:
            k = int(match[1])
            return f"{sources[k]} (row {k} of the batch)" if k < len(sources) and sources[k] else match[0]

        renamed = BATCH_ROW.sub(named, message)
        if renamed == message:
            renamed = f"{message} (the batch holds {', '.join(known)})"
        raise ConfigError(renamed) from None


class MetadataDataset(Dataset):
    """Rows of a metadata file with their files loaded: images as [3, H, W] and videos as [3, F, H, W] float32
    tensors in [-1, 1] at the row's bucket size (a list of paths gives a list); other columns as they are.
    `conditioning` columns hold images (and videos) loaded at their own bucket (`bucket_for` their size), not the
    row's; `aligned` columns (pixel-aligned with the target: a task's `aligned_conditioning`) are file columns
    loaded at the row's bucket as its media are, whatever `file_keys` says. With `ragged_conditioning` the task
    takes rows whose conditioning pictures differ in count and size in one batch, so they do not split batches,
    and prepares those pictures itself: they are read at their file's size (no bucket, no crop).
    `check_row(row, size)`, a task's check of a metadata row, runs on every row at setup; `size(column, name)` is
    the header size of one of its files.
    Items are `Row`s, which name their metadata file and row.
    `image_mode="RGBA"` reads the images and conditioning images as [4, H, W] with their alpha (an image without
    one gets an opaque alpha); video frames stay RGB.
    A video row also carries its sound and frame rate (see the module docstring; `audio_rate` resamples).
    With `masked_loss` a row's `loss_mask` file is loaded as `[1, H, W]` in [0, 1] cropped as its media
    (`masks.read_mask`), a video row's mask video as `[1, F, H, W]` from the same frames as its video
    (`masks.read_mask_video`); without it the column is left as it is. `alpha_mask` (which implies `masked_loss`) takes
    a maskless row's picture transparency as its mask. A dataset with no mask at all is an error unless not
    `require_masks` (one of several datasets, `datasets.CombinedDataset`, where another has them).
    With `skip_short` a video too short for one clip of `num_frames` gives no sample (`short_rows` lists those rows)
    rather than being refused: one length of a musubi `target_frames` list, where it trains at the shorter ones."""

    def __init__(
        self,
        base: str | os.PathLike,
        *,
        media: Sequence[str],
        file_keys: Sequence[str] = ("image", "video"),
        conditioning: Sequence[str] = (),
        aligned: Sequence[str] = (),
        counted: Sequence[str] = (),
        ragged_conditioning: bool = False,
        check_row: Callable[[dict[str, Any], Callable[[str, str], tuple[int, int]]], None] | None = None,
        metadata_path: str | None = None,
        max_pixels: int | Sequence[int] = 1024 * 1024,
        step: int = 64,
        fixed: Bucket | None = None,
        num_frames: int = 81,
        audio_rate: int | None = None,
        image_mode: str = "RGB",
        masked_loss: bool = False,
        alpha_mask: bool = False,
        trigger_word: str | None = None,
        frame_extraction: str = "head",
        frame_stride: int | None = None,
        frame_samples: int = 1,
        fps: float | None = None,
        require_masks: bool = True,
        frame_multiple: int | None = None,
        skip_short: bool = False,
    ):
        if image_mode not in ("RGB", "RGBA"):
            raise ConfigError(f"image_mode={image_mode!r} is not accepted; use 'RGB' or 'RGBA'")
        self.image_mode = image_mode
        self.base = Path(base)
        self.media = tuple(media)
        self.audio_rate = audio_rate  # None: each file's own rate
        self.metadata = metadata_file(self.base, metadata_path)
        self.rows = read_metadata(self.metadata)
        if trigger_word:
            self.rows = [with_trigger(row, trigger_word) for row in self.rows]
        self.aligned = tuple(aligned)  # read at the row's bucket, as its media
        self.ragged = ragged_conditioning  # conditioning pictures at their own size: the task prepares them
        self.conditioning = tuple(c for c in conditioning if c not in self.aligned)  # each at its own bucket
        self.count_only = tuple(c for c in counted if c in self.conditioning)  # by their file count, not size
        self.counted = (*self.aligned, *self.count_only)  # their file counts join the keys where rows differ
        self.file_keys = tuple(dict.fromkeys([*file_keys, *conditioning, *self.aligned]))
        self.masked_loss = masked_loss or alpha_mask
        self.alpha_masked: set[int] = set()  # rows whose mask is their picture's transparency
        checked = (*self.file_keys, MASK_COLUMN) if self.masked_loss else self.file_keys
        self.num_frames = num_frames
        self.frame_extraction, self.frame_stride, self.frame_samples = frame_extraction, frame_stride, frame_samples
        self.frame_multiple = frame_multiple  # `full` clips are 1 + k x this many frames (the video VAE's chunks)
        self.fps = fps  # None: each video at its own frame rate
        self.skip_short = skip_short
        sizes = (max_pixels,) if isinstance(max_pixels, int) else tuple(max_pixels)
        self.step = step
        self.buckets: list[Bucket] = []
        row_repeat = [row_repeats(row, i, self.metadata) for i, row in enumerate(self.rows)]
        dims: list[tuple[int, int]] = []
        missing: list[str] = []
        where: list[str] = []
        for i, row in enumerate(self.rows):
            main = next((k for k in media if row.get(k)), None)
            if main is None:
                raise ConfigError(
                    f"{self.metadata} row {i + 1} has no {' or '.join(media)} column value; this model trains on "
                    f"{', '.join(media)} (columns found: {', '.join(map(str, row))})"
                )
            if main not in self.file_keys:
                raise ConfigError(f"--data_file_keys {','.join(self.file_keys)} must include {main!r}")
            for key in checked:
                for name in _paths(row.get(key)):
                    if not (self.base / name).is_file():
                        missing.append(name)
                        where.append(f"row {i + 1} column {key}")
            if fixed is None and not missing:
                with reading(self.base / str(row[main]), f"{self.metadata} row {i + 1} column {main}"):
                    dims.append(media_size(self.base / str(row[main])))
            if check_row is not None and not missing:
                self._check_row(check_row, i)
        if missing:
            raise ConfigError(
                f"{self.metadata} names {len(missing)} files missing from {self.base}: {preview(missing, 5)} "
                f"(at {', '.join(where[:5])})"
            )
        # a sample is a row at one of the training sizes (several with `--resolutions`) and, for a video, one of its
        # clips (several with --video_frame_extraction), rows in order
        clips = [self._clips(i) for i in range(len(self.rows))]
        self.short_rows = [i for i, row_clips in enumerate(clips) if not row_clips]  # only with `skip_short`
        if self.short_rows:
            self._log_short_rows()
        self.sample_rows = [i for i in range(len(self.rows)) for _ in sizes for _ in clips[i]]
        self.sample_pixels = [pixels for i in range(len(self.rows)) for pixels in sizes for _ in clips[i]]
        self.sample_starts = [start for i in range(len(self.rows)) for _ in sizes for start, _ in clips[i]]
        # the frames of each sample: a video row's clip length, a picture's one; a batch holds one size and count
        self.sample_frames = [frames for i in range(len(self.rows)) for _ in sizes for _, frames in clips[i]]
        self.max_pixels = sizes[0]
        for i, pixels in zip(self.sample_rows, self.sample_pixels, strict=True):
            bucket = fixed if fixed is not None else bucket_for(*dims[i], max_pixels=pixels, step=step)
            self.buckets.append(bucket)
        self.repeats = [row_repeat[i] for i in self.sample_rows]
        # each sample's conditioning pictures as read (their count and sizes): one batch stacks them, unless the
        # task takes each row's own list (`ragged_conditioning`: Z-Image Omni)
        self.sample_conditioning = [
            () if ragged_conditioning else self._conditioning_sizes(i, p)
            for i, p in zip(self.sample_rows, self.sample_pixels, strict=True)
        ]
        # where rows differ in it, the file count of each aligned and count-only column too (Wan VACE rows with a
        # control video and rows without encode apart); datasets whose rows agree keep their keys (and resumed runs
        # their plans). `CombinedDataset` adds them where its datasets differ from one another.
        self.sample_counts = [() if ragged_conditioning else self._file_counts(i) for i in self.sample_rows]
        self.counts_joined = len(set(self.sample_counts)) > 1
        if self.counts_joined:
            self.sample_conditioning = with_counts(self.sample_conditioning, self.sample_counts)
        self.batch_keys = batch_keys(self.buckets, self.sample_frames, self.sample_conditioning)
        logger.info(
            "dataset %s: %d samples in %d buckets %s",
            self.metadata,
            len(self.buckets),
            len(set(self.buckets)),
            preview(sorted(set(self.buckets)), 6),
        )
        if self.masked_loss:
            self._check_masks(alpha_mask, require_masks)

    def _log_short_rows(self) -> None:
        """Name the videos left out of this length (`skip_short`) once, so a missing length is not a surprise."""
        at = "" if self.fps is None else f" at {self.fps:g} fps"
        names = [str(self.rows[i][next(k for k in self.media if self.rows[i].get(k))]) for i in self.short_rows]
        logger.warning(
            "%s: %d of %d rows have a video of fewer than %d frames%s (%s), left out of the %d-frame clips "
            "(musubi's target_frames: a video trains at the lengths it holds, none if it is shorter than all)",
            self.metadata,
            len(self.short_rows),
            len(self.rows),
            self.num_frames,
            at,
            preview(names, 5),
            self.num_frames,
        )

    def _header_size(self, index: int, column: str, name: str) -> tuple[int, int]:
        """(width, height) of the file `name` of row `index`'s `column`, from its header (errors name them)."""
        path = self.base / name
        with reading(path, f"{self.metadata} row {index + 1} column {column}"):
            return media_size(path)

    def _check_row(self, check: Callable, index: int) -> None:
        """A task's `check_row` on row `index`, its errors ("column c: ...") naming the metadata file and row."""
        where = f"{self.metadata} row {index + 1}"
        try:
            check(dict(self.rows[index]), lambda column, name: self._header_size(index, column, name))
        except ConfigError as error:
            raise ConfigError(str(error) if str(error).startswith(str(self.metadata)) else f"{where} {error}") from None

    def _conditioning_sizes(self, index: int, pixels: int) -> tuple[int, ...]:
        """The pictures and videos of row `index`'s conditioning columns as a sample at `pixels` reads them: per
        column their count, then each one's bucket (width, height), from the headers; () without such columns."""
        sizes: list[int] = []
        for column in (c for c in self.conditioning if c not in self.count_only):
            names = [n for n in _paths(self.rows[index].get(column)) if Path(n).suffix.lower() not in SOUND_SUFFIXES]
            sizes.append(len(names))
            for name in names:
                width, height = self._header_size(index, column, name)
                sizes += bucket_for(width, height, max_pixels=pixels, step=self.step)
        return tuple(sizes)

    def _file_counts(self, index: int) -> tuple[int, ...]:
        """How many files row `index` gives each aligned and count-only conditioning column (`counted`)."""
        return tuple(len(_paths(self.rows[index].get(column))) for column in self.counted)

    def _check_masks(self, alpha: bool, required: bool = True) -> None:
        """`--masked_loss` needs some rows with a mask file (each one picture, or a video for a video row) or, with
        `--alpha_mask`, a transparent picture."""
        masked = [i for i, row in enumerate(self.rows) if row.get(MASK_COLUMN)]
        if alpha:
            for i, row in enumerate(self.rows):
                main = next(k for k in self.media if row.get(k))
                path = self.base / str(row[main])
                if row.get(MASK_COLUMN) or path.suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                with reading(path, f"{self.metadata} row {i + 1} column {main}"):
                    if has_alpha(path):
                        self.alpha_masked.add(i)
        if not masked and not self.alpha_masked and required:
            transparency = " or transparency (--alpha_mask)" if alpha else ""
            raise ConfigError(
                f"--masked_loss: no row of {self.metadata} has a mask{transparency}; give rows a {MASK_COLUMN!r} "
                "column (a grayscale picture, white where the loss counts) or put cat-masklabel.png beside cat.png"
            )
        for i in masked:
            value = self.rows[i][MASK_COLUMN]
            suffix = Path(str(value)).suffix.lower()
            if isinstance(value, list) or suffix not in IMAGE_SUFFIXES + VIDEO_SUFFIXES:
                raise ConfigError(
                    f"{self.metadata} row {i + 1} column {MASK_COLUMN}: {value!r} is not one picture file "
                    f"({', '.join(IMAGE_SUFFIXES)}) or, for a video row, one video file ({', '.join(VIDEO_SUFFIXES)})"
                )
            main = next(k for k in self.media if self.rows[i].get(k))
            if suffix in VIDEO_SUFFIXES and Path(str(self.rows[i][main])).suffix.lower() not in VIDEO_SUFFIXES:
                raise ConfigError(
                    f"{self.metadata} row {i + 1} column {MASK_COLUMN}: the mask video {value!r} is for a video row; "
                    f"this row's {main} is a picture, so give it a mask picture ({', '.join(IMAGE_SUFFIXES)})"
                )
        logger.info(
            "--masked_loss: %d of %d rows have a mask, %d their transparency (the others count everywhere)",
            len(masked),
            len(self.rows),
            len(self.alpha_masked),
        )

    def __len__(self) -> int:
        return len(self.buckets)

    def __getitem__(self, index: int) -> dict[str, Any]:
        size, pixels = self.buckets[index], self.sample_pixels[index]
        start, count = self.sample_starts[index], self.sample_frames[index]  # the sample's clip
        index = self.sample_rows[index]  # the metadata row of the sample
        row = Row(self.rows[index], source=f"{self.metadata} row {index + 1}")
        for key in self.file_keys:
            value = row.get(key)
            if not value or key in AUDIO_KEYS or (key == MASK_COLUMN and self.masked_loss):
                continue
            loaded = []
            for name in _paths(value):
                path = self.base / name
                if path.suffix.lower() in SOUND_SUFFIXES:  # the task reads it (e.g. music features)
                    loaded.append(str(path.resolve()))
                    continue
                with reading(path, f"{self.metadata} row {index + 1} column {key}"):
                    loaded.append(self._load(path, key, size, pixels, start, count))
            row[key] = loaded if isinstance(value, list) else loaded[0]
        if self.masked_loss and (row.get(MASK_COLUMN) or index in self.alpha_masked):
            main = next(k for k in self.media if self.rows[index].get(k))
            source = self.base / str(self.rows[index][main])
            mask = self.base / str(row.get(MASK_COLUMN))
            if index in self.alpha_masked:
                with reading(source, f"{self.metadata} row {index + 1} column {main}"):
                    row[MASK_COLUMN] = alpha_mask(source, size, fit)
            elif mask.suffix.lower() in VIDEO_SUFFIXES:  # a mask video: the frames the row's video is read with
                where = f"{self.metadata} row {index + 1} column {MASK_COLUMN}"
                with reading(mask, where):
                    try:
                        frames = self._frames(mask, start, count)
                    except ConfigError as error:
                        raise ConfigError(
                            f"{where}: the mask video {mask} must give the {count} frames its row's video is read "
                            f"with (--num_frames): {error}"
                        ) from None
                row[MASK_COLUMN] = read_mask_video(mask, frames, media_size(source), size, fit)
            else:
                row[MASK_COLUMN] = read_mask(mask, media_size(source), size, fit)
        self._add_sound(row, index, start)
        return row

    def _load(self, path: Path, key: str, size: Bucket, pixels: int, start: int, count: int) -> torch.Tensor:
        """A row's picture as `[C, H, W]` or video clip (`count` frames from `start`) as `[3, F, H, W]` at the
        sample's `size` (a conditioning column's at its own bucket under `pixels`; an aligned column's at `size`).
        With `ragged_conditioning` a conditioning picture keeps its file's size: the task resizes it as its
        pipeline does at inference (Z-Image Omni's `prepare_edit_images`), which a bucket crop would not match."""
        from diffsynth.runtime.media import load_image, pil_to_tensor

        if path.suffix.lower() in VIDEO_SUFFIXES:
            at = size
            if key in self.conditioning:  # e.g. square face crops beside a wide video
                at = bucket_for(*media_size(path), max_pixels=pixels, step=self.step)
            frames = [fit(f, at) for f in self._frames(path, start, count)]
            return pil_to_tensor(frames).transpose(0, 1)  # [3, F, H, W]
        image = load_image(path, self.image_mode)
        if key in self.conditioning and self.ragged:  # as the file is: the task prepares it as its pipeline does
            return pil_to_tensor(image, mode=self.image_mode)[0]
        if key in self.conditioning:
            size = bucket_for(*image.size, max_pixels=pixels, step=self.step)
        return pil_to_tensor(fit(image, size), mode=self.image_mode)[0]

    def _frames(self, path: Path, start: int, count: int) -> list[Image.Image]:
        """The frames a video is trained on (a row's video, a conditioning video, a mask video alike): the `count`
        of a clip from frame `start`, at `fps` when given."""
        from diffsynth.runtime.media import load_video

        return load_video(path, num_frames=count, start=start, fps=self.fps)

    def _clips(self, index: int) -> list[tuple[int, int]]:
        """The (first frame, frame count) of a row's clips (`--video_frame_extraction`, on the `fps` timeline):
        one frame for a picture; `head`, the first `num_frames`; `chunk` cuts the video into `num_frames` pieces,
        `slide` starts one every `frame_stride` frames, `uniform` spreads `frame_samples` clips evenly from start to
        end; `full` is the whole video up to `num_frames`, its length cut to 1 + k x `frame_multiple` frames. The
        clips fit the shortest of the row's videos (its video, conditioning videos and mask video), frames counted
        from their timestamps; for `head` at the files' own rates only from the frame counts their headers state
        (a long file is not read through then; one without a count fails when read, naming it)."""
        videos = self._row_videos(index)
        if not videos:
            return [(0, 1)]
        counted = []
        for column, name, path in videos:
            with reading(path, f"{self.metadata} row {index + 1} column {column}"):
                counted.append((self._frame_count(path), column, name))
        counted = [entry for entry in counted if entry[0] is not None]
        if not counted:
            return [(0, self.num_frames)]
        count, column, name = min(counted)
        if self.frame_extraction == "full":
            frames = min(count, self.num_frames)
            return [(0, frames - (frames - 1) % self.frame_multiple if self.frame_multiple else frames)]
        return [(start, self.num_frames) for start in self._clip_starts(count, column, name, index)]

    def _clip_starts(self, count: int, column: str, name: str, index: int) -> list[int]:
        """The first frames of the clips of `num_frames` in `count` frames (row `index`'s shortest video, `name`
        in `column`)."""
        room = count - self.num_frames  # the last start that leaves a whole clip
        if room < 0 and self.skip_short:
            return []  # this length is left out for the row (`short_rows`)
        if room < 0:
            at = "" if self.fps is None else f" at {self.fps:g} fps"
            raise ConfigError(
                f"{self.metadata} row {index + 1} column {column}: {name} has {count} frames{at}, fewer than one "
                f"clip of --num_frames {self.num_frames}"
            )
        if self.frame_extraction == "head":
            return [0]
        if self.frame_extraction == "chunk":
            return list(range(0, room + 1, self.num_frames))
        if self.frame_extraction == "slide":
            return list(range(0, room + 1, self.frame_stride or self.num_frames))
        samples = self.frame_samples
        return sorted({round(k * room / (samples - 1)) for k in range(samples)}) if samples > 1 else [0]

    def _row_videos(self, index: int) -> list[tuple[str, str, Path]]:
        """(column, name, path) of each video file a video row's sample reads with its frames: its video,
        conditioning videos and (with --masked_loss) mask video; lists of files are left out (each is read alone)."""
        row = self.rows[index]
        main = row[next(k for k in self.media if row.get(k))]
        if not isinstance(main, str) or Path(main).suffix.lower() not in VIDEO_SUFFIXES:
            return []  # a picture row: one sample (its mask is checked as a picture's)
        columns = [*self.file_keys, *([MASK_COLUMN] if self.masked_loss else [])]
        videos = []
        for column in dict.fromkeys(columns):
            value = row.get(column)
            if column in AUDIO_KEYS or not isinstance(value, str) or Path(value).suffix.lower() not in VIDEO_SUFFIXES:
                continue
            videos.append((column, value, self.base / value))
        return videos

    def _frame_count(self, path: Path) -> int | None:
        """The frames a video gives a clip: all its frames, or those of its timeline at `fps`; for `head` at its own
        rate the header's count (None where it states none)."""
        from diffsynth.runtime.media import resampled_length, video_frame_times, video_header_frames

        if self.frame_extraction == "head" and self.fps is None:
            return video_header_frames(path)
        times, end = video_frame_times(path)
        return len(times) if self.fps is None else resampled_length(end, self.fps)

    def _add_sound(self, row: dict[str, Any], index: int, start: int = 0) -> None:
        """A video row's `frame_rate` (`fps` when the videos are resampled) and `audio` / `audio_sample_rate` (see
        the module docstring), the sound of the clip from frame `start`."""
        source = self.rows[index]
        main = next((k for k in self.media if source.get(k)), None)
        video = self.base / str(source[main]) if main is not None else None
        if video is None or isinstance(source[main], list) or video.suffix.lower() not in VIDEO_SUFFIXES:
            return
        if self.fps is not None:
            row["frame_rate"] = self.fps
        elif row.get("frame_rate") in (None, ""):
            with reading(video, f"{self.metadata} row {index + 1} column {main}"):
                row["frame_rate"] = video_frame_rate(video)
        try:
            seconds, offset = row[main].shape[1] / float(row["frame_rate"]), start / float(row["frame_rate"])
        except (TypeError, ValueError, ZeroDivisionError):
            raise ConfigError(
                f"{self.metadata} row {index + 1}: frame_rate {row['frame_rate']!r} is not a number of frames per second"
            ) from None
        column = next((key for key in AUDIO_KEYS if source.get(key)), AUDIO_KEY)
        own = source.get(column)
        if own and column not in self.file_keys:
            return  # a path the task cannot read: it says to list the column in --data_file_keys
        sound = self.base / str(own) if own else video
        what = "a sound file" if own else None  # an `audio` column's file is read for its sound, whatever its suffix
        with reading(sound, f"{self.metadata} row {index + 1} column {column if own else main}", what):
            track = read_audio(sound, seconds=seconds, rate=self.audio_rate, offset=offset)
        if own and track is None:  # a silent video alone means no sound; a file named for its sound must hold one
            raise ConfigError(f"{self.metadata} row {index + 1} column {column}: {sound} holds no audio stream")
        row.pop(column, None)  # DiffSynth-Studio's `input_audio` path: loaded as the row's `audio`
        row[AUDIO_KEY] = None if track is None else track[0]
        if track is not None:
            row["audio_sample_rate"] = track[1]


def with_counts(conditioning: Sequence[tuple[int, ...]], counts: Sequence[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """Each sample's conditioning sizes followed by its file counts (`MetadataDataset.sample_counts`)."""
    return [(*sizes, *n) for sizes, n in zip(conditioning, counts, strict=True)]


def _paths(value) -> list[str]:
    """The file names a metadata cell holds: none, one path, or a list of paths (JSON metadata)."""
    if not value:
        return []
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


TRIGGER_PLACEHOLDER = "[trigger]"  # ai-toolkit's placeholder for the trigger word in captions


def with_trigger(row: dict[str, Any], word: str) -> dict[str, Any]:
    """`--trigger_word` (ai-toolkit's): `[trigger]` in a row's prompt becomes the word, and a prompt without the
    word starts with it (`word, prompt`), so every caption names what the LoRA learns."""
    prompt = row.get("prompt")
    if not isinstance(prompt, str):
        return row
    prompt = prompt.replace(TRIGGER_PLACEHOLDER, word)
    if not holds_word(prompt, word):  # as a whole word: "TOK" is not in "a street in TOKYO"
        prompt = f"{word}, {prompt}" if prompt.strip() else word
    return {**row, "prompt": prompt}


def row_repeats(row: dict[str, Any], index: int, metadata: Path) -> int:
    """A row's `repeats` column (default 1), checked."""
    value = row.get(REPEATS_COLUMN)
    if value in (None, ""):
        return 1
    try:
        repeats = int(str(value).strip())
    except ValueError:
        repeats = 0
    if repeats < 1 or str(value).strip() != str(repeats):
        raise ConfigError(f"{metadata} row {index + 1} column {REPEATS_COLUMN}: {value!r} is not a whole number >= 1")
    return repeats


class CachedDataset(Dataset):
    """Encoded samples written by `--stage encode` (see `write_cache`)."""

    def __init__(self, cache_dir: str | os.PathLike, expected: dict[str, Any] | None = None):
        self.root = Path(cache_dir)
        index_path = self.root / "index.json"
        if not index_path.is_file():
            raise ConfigError(
                f"--cache_dir {self.root} holds no finished cache (index.json); write it first with the same "
                "settings and --stage encode"
            )
        index = json.loads(index_path.read_text())
        if index.get("version") != CACHE_VERSION:
            raise ConfigError(f"--cache_dir {self.root} was written by another version; encode it again")
        datasets = index["settings"].get("datasets")  # --dataset_config: each dataset's settings (datasets.py)
        if expected is not None and datasets != expected.get("datasets"):
            from .datasets import changed_dataset

            raise ConfigError(changed_dataset(self.root, datasets, expected.get("datasets")))
        sources = index.get("sources")
        for name, value in (expected or {}).items():
            if name == "datasets" or (name == "dataset_base_path" and name not in index["settings"]):
                continue  # a cache written before the folder was recorded: its metadata's hash is checked
            if name == "dataset_base_path" and value is not None and index["settings"][name] not in (None, value):
                sources = moved_sources(self.root, index["settings"][name], value, sources)
                continue
            if name == "metadata_sha256" and value is not None and index["settings"].get(name) != value:
                raise ConfigError(
                    f"--cache_dir {self.root} was encoded from another version of the dataset's metadata; "
                    "encode again into a new --cache_dir"
                )
            recorded = index["settings"].get(name, UNRECORDED.get(name))  # what older caches did not record
            if (value is not None or name in UNRECORDED) and recorded != value:
                recorded = False if recorded is None and isinstance(value, bool) else recorded  # a flag left off
                raise ConfigError(
                    f"--cache_dir {self.root} was encoded with --{name} {recorded!r}, this run has --{name} "
                    f"{value!r}; use the same setting or encode again into a new --cache_dir"
                )
        self.settings = index["settings"]
        check_sources(self.root, sources)
        self.buckets = [tuple(b) for b in index["buckets"]]
        self.repeats = list(index.get("repeats") or [1] * len(self.buckets))  # older caches: none
        self.files = [self.root / "items" / f"{i:06d}.safetensors" for i in range(len(self.buckets))]
        missing = [f.name for f in self.files if not f.is_file()]
        if missing:
            raise ConfigError(
                f"--cache_dir {self.root} lacks {len(missing)} samples ({preview(missing, 5)}); encode again"
            )
        # older caches did not record the frame counts: their latents' shapes tell which samples stack
        self.sample_frames = index.get("frames")  # each sample's frames, as `MetadataDataset.sample_frames`
        conditioning = index.get("conditioning")  # its conditioning pictures' sizes (older caches: none recorded)
        frames = self.sample_frames or [_latents_shape(p) for p in self.files]
        self.batch_keys = batch_keys(self.buckets, frames, conditioning and [tuple(c) for c in conditioning])

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.files[index]))


def _latents_shape(path: Path) -> tuple[int, ...]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return tuple(f.get_slice("latents").get_shape())


# settings a cache written before they existed did not record, as they were then (a run's value is compared even
# when it is the default: a cache made with --resolutions is refused by a run without)
UNRECORDED: dict[str, Any] = {
    "task_options": {},
    "resolutions": [],
    "trigger_word": None,
    "alpha_mask": False,
    "video_frame_extraction": "head",
    "video_frame_stride": None,
    "video_frame_samples": 1,
    "video_fps": None,
}


def cache_settings(config, family: str) -> dict[str, Any]:
    """What shapes the encoded samples: a cache is reused only with the same values. The dataset folder is one
    (resolved): another folder's metadata may be byte for byte the same, its pictures not."""
    metadata_sha256 = base = None
    if config.dataset_base_path:
        path = metadata_file(Path(config.dataset_base_path), config.dataset_metadata_path)
        data = json.dumps(caption_rows(path)).encode() if path.is_dir() else path.read_bytes()
        metadata_sha256 = hashlib.sha256(data).hexdigest()
        base = str(Path(config.dataset_base_path).resolve())
    return {
        "dataset_base_path": base,
        "resolutions": list(config.resolutions),
        "trigger_word": config.trigger_word,
        "family": family,
        "metadata_sha256": metadata_sha256,
        "max_pixels": config.max_pixels,
        "bucket_step": config.bucket_step,
        "height": config.height,
        "width": config.width,
        "num_frames": config.num_frames,
        "video_frame_extraction": config.video_frame_extraction,
        "video_frame_stride": config.video_frame_stride,
        "video_frame_samples": config.video_frame_samples,
        "video_fps": config.video_fps,
    }


def write_cache(
    encode,
    dataset: MetadataDataset,
    cache_dir: Path,
    *,
    batch_size: int,
    rank: int = 0,
    world: int = 1,
    num_workers: int = 0,
) -> int:
    """Encode this process's share of `dataset` (samples `i % world == rank`) into `cache_dir/items`, skipping
    samples already there whose files are unchanged (each item records its `source_stamps`); returns how many were
    encoded. `encode(rows)` gives one tensor dict per row.
    The caller writes the index (`write_cache_index`) once every process is done."""
    from torch.utils.data import DataLoader

    from diffsynth.runtime.checkpoint import save_safetensors

    items = cache_dir / "items"
    items.mkdir(parents=True, exist_ok=True)
    stamps = {i: source_stamps(dataset, i) for i in range(rank, len(dataset), world)}
    todo = [i for i in stamps if not _item_current(items / f"{i:06d}.safetensors", stamps[i])]
    by_key: dict[Hashable, list[int]] = {}
    for i in todo:
        by_key.setdefault(dataset.batch_keys[i], []).append(i)
    batches = [group[k : k + batch_size] for group in by_key.values() for k in range(0, len(group), batch_size)]
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, collate_fn=list)
    for indices, rows in zip(batches, loader, strict=True):
        with torch.no_grad():
            samples = encode(rows)
        for i, sample in zip(indices, samples, strict=True):
            _check_sample(sample, i)
            save_safetensors(
                {k: v.detach().cpu().contiguous() for k, v in sample.items()},
                items / f"{i:06d}.safetensors",
                metadata={SOURCES_KEY: json.dumps(stamps[i])},
            )
    return len(todo)


SOURCES_KEY = "sources"  # an item's header entry (and the index's list): its files' `source_stamps`


def sample_sources(dataset, index: int) -> list[Path]:
    """The files sample `index` of `dataset` is read from: its row's file columns and, with `--masked_loss`, its
    mask (a `datasets.CombinedDataset`'s from the dataset that holds it; none for a dataset of another kind)."""
    parts = getattr(dataset, "parts", None)
    if parts is not None:
        k = bisect.bisect_right(dataset.starts, index) - 1
        return sample_sources(parts[k], index - dataset.starts[k])
    if not hasattr(dataset, "sample_rows"):
        return []
    row = dataset.rows[dataset.sample_rows[index]]
    columns = (*dataset.file_keys, MASK_COLUMN) if dataset.masked_loss else dataset.file_keys
    return [dataset.base / name for column in dict.fromkeys(columns) for name in _paths(row.get(column))]


def source_stamps(dataset, index: int) -> list[list]:
    """[path, size, modification time (ns)] of each file of sample `index`: a file replaced since it was encoded
    (another picture under the same name) shows as another stamp."""
    stamps = []
    for path in sample_sources(dataset, index):
        stat = path.stat()
        stamps.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    return stamps


def _item_stamps(path: Path) -> str | None:
    """The `source_stamps` an encoded item records (None: no item, or one from before items recorded them)."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get(SOURCES_KEY)


def moved_sources(root: Path, recorded: str, base: str, sources: list | None) -> list:
    """The cache's `source_stamps` with the dataset folder moved from `recorded` to `base`: accepted only if each
    file is under `base` at its old relative path with its recorded size and modification time (a copy that kept
    them); another folder with the same metadata but other pictures is refused, naming a differing file."""
    moved, differing = [], None
    for sample in sources or []:
        stamps = [_moved_stamp(stamp, Path(recorded), Path(base)) for stamp in sample]
        pairs = zip(sample, stamps, strict=True)
        bad = [(new or old)[0] for old, new in pairs if not _stamp_holds(new)]  # not under `recorded`: as recorded
        differing = differing or next(iter(bad), None)
        moved.append(stamps)
    if not sources or differing is not None:
        found = f" ({differing} is not the file encoded)" if differing else ""
        raise ConfigError(
            f"--cache_dir {root} was encoded with --dataset_base_path {recorded!r}, this run has "
            f"--dataset_base_path {base!r}{found}; use the same folder or encode again into a new --cache_dir"
        )
    logger.info("--cache_dir %s: the dataset moved from %s to %s (its files unchanged)", root, recorded, base)
    return moved


def _moved_stamp(stamp: list, recorded: Path, base: Path) -> list | None:
    """`stamp` with its file at the same path under `base` as under `recorded` (None: not under `recorded`)."""
    path = Path(stamp[0])
    if not path.is_relative_to(recorded):
        return None
    return [str(base / path.relative_to(recorded)), *stamp[1:]]


def _stamp_holds(stamp: list | None) -> bool:
    if stamp is None:
        return False
    path = Path(stamp[0])
    return path.is_file() and [path.stat().st_size, path.stat().st_mtime_ns] == list(stamp[1:])


def _item_current(path: Path, stamps: list[list]) -> bool:
    """Whether the encoded item at `path` is of its sample's files as they are: its recorded stamps are theirs or,
    an item written before items recorded them, no file is newer than it (its stamps are then left unrecorded:
    the index records them, and rewriting the item's header would rewrite the item)."""
    recorded = _item_stamps(path)
    if recorded is not None:
        return recorded == json.dumps(stamps)
    return path.is_file() and all(mtime_ns <= path.stat().st_mtime_ns for _, _, mtime_ns in stamps)


def check_sources(root: Path, sources: list | None) -> None:
    """Training from a cache whose samples' files changed since they were encoded is refused, naming the first
    such file; files no longer there are a warning (the cache may be used without its dataset). Older caches
    recorded no stamps and are read as they are."""
    changed, missing = [], []
    for stamp in {tuple(s) for sample in sources or [] for s in sample}:
        path = Path(stamp[0])
        if not path.is_file():
            missing.append(stamp[0])
        elif [path.stat().st_size, path.stat().st_mtime_ns] != list(stamp[1:]):
            changed.append(stamp[0])
    if changed:
        raise ConfigError(
            f"--cache_dir {root}: {len(changed)} dataset files changed since they were encoded "
            f"({preview(sorted(changed), 3)}); run --stage encode again into this --cache_dir (it re-encodes "
            "the samples of changed files) before training from it"
        )
    if missing:
        logger.warning(
            "--cache_dir %s: %d files it was encoded from are gone (%s); training on the samples as encoded",
            root,
            len(missing),
            preview(sorted(missing), 3),
        )


def write_cache_index(cache_dir: Path, dataset: MetadataDataset, settings: dict) -> None:
    index = {
        "version": CACHE_VERSION,
        "count": len(dataset),
        "buckets": [list(b) for b in dataset.buckets],
        "frames": list(dataset.sample_frames),
        "conditioning": [list(c) for c in dataset.sample_conditioning],
        "repeats": list(dataset.repeats),
        SOURCES_KEY: [source_stamps(dataset, i) for i in range(len(dataset))],
        "settings": settings,
        "metadata": str(dataset.metadata),
    }
    atomic_write_text(cache_dir / "index.json", json.dumps(index, indent=1))


def _check_sample(sample, index: int) -> None:
    if not isinstance(sample, dict) or "latents" not in sample:
        raise TypeError(f"the task's encode() must return dicts with 'latents' (sample {index})")
    bad = [k for k, v in sample.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise TypeError(f"the task's encode() returned non-tensor values {bad} (sample {index}); only tensors cache")


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------- batch plans
def batch_keys(
    buckets: Sequence[Bucket], frames: Sequence[Any], conditioning: Sequence[tuple[int, ...]] | None = None
) -> list[tuple]:
    """What samples must share to stack into one batch: the bucket (width, height) and the frame count. With
    pictures beside videos of one size (or videos of two `num_frames`) each count batches apart, as musubi-tuner's
    buckets do. `conditioning`: each sample's conditioning pictures as read (`MetadataDataset.sample_conditioning`:
    count and sizes per column), which a task stacks too (edit images of 2 sizes batch apart)."""
    extra = conditioning if conditioning is not None else [()] * len(buckets)
    return [(*bucket, count, *more) for bucket, count, more in zip(buckets, frames, extra, strict=True)]


def plan_keys(dataset, batch_size: int) -> list:
    """The keys `batch_plan` groups `dataset`'s samples by: bucket and frame count (`batch_keys`); with batches of
    one nothing is stacked, so the buckets alone, whose plans runs from before frame counts were keys resume."""
    return list(dataset.batch_keys) if batch_size > 1 else [tuple(b) for b in dataset.buckets]


def plan_fingerprint(keys: Sequence[Hashable], repeats: Sequence[int] | None) -> str:
    """What fixes an epoch's plan besides the run's settings (seed, batch size, processes): each sample's key and
    repeats, hashed. A resume compares it: another dataset draws other batches from the same position."""
    text = json.dumps([list(keys), list(repeats or [])])  # tuples as lists
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def batch_plan(
    keys: Sequence[Hashable],
    *,
    batch_size: int,
    repeat: int = 1,
    seed: int = 0,
    epoch: int = 0,
    rank: int = 0,
    world: int = 1,
    accumulation: int = 1,
    repeats: Sequence[int] | None = None,
) -> list[list[int]]:
    """This process's batches (lists of sample indices) for `epoch`.

    Every process computes the same seeded plan: the `repeat`-times dataset (each sample `repeats[i]` times
    more, the rows' `repeats`) is shuffled, grouped by key (a dataset's `batch_keys`: bucket and frame count) into
    batches of at most `batch_size`, the batches
    shuffled; process `rank` takes every `world`-th batch, all processes the same count, cut to whole multiples
    of `accumulation` (the rest is dropped)."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    each = repeats if repeats is not None else [1] * len(keys)
    samples = [i for _ in range(repeat) for i in range(len(keys)) for _ in range(each[i])]
    order = torch.randperm(len(samples), generator=generator).tolist()
    groups: dict[Hashable, list[int]] = {}
    for j in order:
        groups.setdefault(_hashable(keys[samples[j]]), []).append(samples[j])
    batches = [g[k : k + batch_size] for g in groups.values() for k in range(0, len(g), batch_size)]
    batches = [batches[j] for j in torch.randperm(len(batches), generator=generator).tolist()]
    per_process = len(batches) // world
    mine = batches[rank : per_process * world : world]
    return mine[: len(mine) // accumulation * accumulation]


def left_out_samples(
    keys: Sequence[Hashable],
    *,
    batch_size: int,
    repeat: int,
    seed: int,
    world: int,
    accumulation: int,
    repeats: Sequence[int] | None = None,
) -> tuple[int, int]:
    """(samples left out, samples) of the first epoch's plan: `batch_plan` deals the batches out in whole groups of
    `world` processes x `accumulation` steps, so the batches past the last whole group are not trained on."""
    batches = batch_plan(keys, batch_size=batch_size, repeat=repeat, seed=seed, repeats=repeats)
    used = len(batches) // (world * accumulation) * world * accumulation
    return sum(len(b) for b in batches[used:]), sum(len(b) for b in batches)


def steps_per_epoch(
    keys: Sequence[Hashable],
    *,
    batch_size: int,
    repeat: int,
    world: int,
    accumulation: int,
    repeats: Sequence[int] | None = None,
) -> int:
    """Optimizer steps per epoch (the same for every epoch: only the order changes)."""
    counts: dict[Hashable, int] = {}
    for i, key in enumerate(keys):
        key = _hashable(key)
        counts[key] = counts.get(key, 0) + repeat * (repeats[i] if repeats is not None else 1)
    batches = sum(math.ceil(n / batch_size) for n in counts.values())
    return batches // world // accumulation


def _hashable(key):
    return tuple(key) if isinstance(key, list) else key


__all__ = [
    "AUDIO_KEY",
    "AUDIO_KEYS",
    "Bucket",
    "CachedDataset",
    "MetadataDataset",
    "Row",
    "batch_keys",
    "batch_plan",
    "bucket_for",
    "cache_settings",
    "fit",
    "left_out_samples",
    "metadata_file",
    "naming_rows",
    "plan_fingerprint",
    "plan_keys",
    "read_audio",
    "read_metadata",
    "steps_per_epoch",
    "video_frame_rate",
    "write_cache",
    "write_cache_index",
]
