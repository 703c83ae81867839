"""`ModelConfig`: where a model's files are, fetching only what is missing (DiffSynth-Studio compatible).

Files live under `local_model_path/model_id/` (as DiffSynth-Studio lays them out), so a folder
filled once works offline. Downloads go through modelscope (default) or huggingface_hub, imported
only when something is missing; a shard set is complete only when every shard its `*.index.json`
(or its `-0000i-of-0000N` names) lists is present. Hub temp files (a ModelScope `*.incomplete`, anything under
`.cache/`) never count as present; a folder or whole-repo pattern whose download was cut off (its pending marker
under `.diffsynth_download/` is still there, or temp files lie in it) is fetched again.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import logging
import os
import posixpath
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import folder_listing, missing_shards
from .dtypes import parse_device, parse_dtype
from .errors import CheckpointError, ConfigError, DiffSynthError

logger = logging.getLogger(__name__)

ENV_DOWNLOAD_SOURCE = "DIFFSYNTH_DOWNLOAD_SOURCE"
ENV_MODEL_BASE_PATH = "DIFFSYNTH_MODEL_BASE_PATH"
ENV_SKIP_DOWNLOAD = "DIFFSYNTH_SKIP_DOWNLOAD"
DOWNLOAD_SOURCES = ("modelscope", "huggingface")
VRAM_KEYS = (
    "offload_dtype",
    "offload_device",
    "onload_dtype",
    "onload_device",
    "preparing_dtype",
    "preparing_device",
    "computation_dtype",
    "computation_device",
)
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")
MARKER_FOLDER = ".diffsynth_download"  # a dot folder: loaders and globs skip it
# folders the hubs (and we) keep bookkeeping in: nothing under them is a model file
HUB_FOLDERS = (".cache", "._____temp", MARKER_FOLDER)
HUB_TEMP_SUFFIXES = (".incomplete", ".parallel_tmp", ".tmp")  # files still being written by a hub client
# orgs spelled differently on a hub than on ModelScope (the local folder keeps the id as given, as DiffSynth-Studio)
HUB_ORGS = {"huggingface": {"pai": "alibaba-pai"}}


@dataclass
class ModelConfig:
    """One model's files (`path`, or `model_id` + `origin_file_pattern`) and where its weights live.

    Unset `download_source`, `local_model_path` and `skip_download` are read from
    DIFFSYNTH_DOWNLOAD_SOURCE, DIFFSYNTH_MODEL_BASE_PATH and DIFFSYNTH_SKIP_DOWNLOAD when the config
    is made. VRAM dtypes are stored as torch dtypes, devices as strings ("cuda:0", "cpu", "disk").
    """

    path: str | list[str] | None = None
    model_id: str | None = None
    origin_file_pattern: str | list[str] | None = None
    download_source: str | None = None
    local_model_path: str | None = None
    skip_download: bool | None = None
    offload_device: str | torch.device | None = None
    offload_dtype: torch.dtype | str | None = None
    onload_device: str | torch.device | None = None
    onload_dtype: torch.dtype | str | None = None
    preparing_device: str | torch.device | None = None
    preparing_dtype: torch.dtype | str | None = None
    computation_device: str | torch.device | None = None
    computation_dtype: torch.dtype | str | None = None
    clear_parameters: bool = False  # accepted for DiffSynth-Studio compatibility
    # weight-only quantization of the model's Linears once loaded (`quant.QuantizeConfig`, or a method name)
    quantize: Any = None

    def __post_init__(self) -> None:
        self.path = _check_path(self.path)
        if self.path is None and not (isinstance(self.model_id, str) and self.model_id.strip()):
            raise ConfigError(
                f"ModelConfig needs path='...' or model_id='Org/Name' (with origin_file_pattern); "
                f"got path=None, model_id={self.model_id!r}"
            )
        self.origin_file_pattern = _check_patterns(self.origin_file_pattern)
        self.download_source = _download_source(self.download_source)
        if self.local_model_path is None:
            self.local_model_path = os.environ.get(ENV_MODEL_BASE_PATH) or "./models"
        elif not isinstance(self.local_model_path, (str, os.PathLike)):
            raise ConfigError(f"local_model_path must be a folder path, got {self.local_model_path!r}")
        self.local_model_path = os.path.expanduser(os.fspath(self.local_model_path))
        self.skip_download = _skip_download(self.skip_download)
        self._downloaded = False  # set once `resolve` had to fetch files (companion configs follow it)
        if self.quantize is not None:
            from .quant import QuantizeConfig

            self.quantize = QuantizeConfig.parse(self.quantize)
        for key in VRAM_KEYS:
            value = getattr(self, key)
            if value is None:
                continue
            if key.endswith("_dtype") and value == "disk":  # DiffSynth-Studio's spelling of "stays in the file"
                continue
            try:
                parsed = parse_dtype(value) if key.endswith("_dtype") else str(parse_device(value))
            except ConfigError as exc:
                raise ConfigError(f"ModelConfig {key}: {exc}") from None
            setattr(self, key, parsed)

    # ------------------------------------------------------------------ public
    @property
    def local_folder(self) -> str:
        """`local_model_path/model_id`: where this model's repo files are (or will be) kept."""
        return os.path.join(self.local_model_path, self.model_id or "")

    def vram_config(self) -> dict:
        """The eight VRAM keys, as the VRAM manager takes them."""
        return {key: getattr(self, key) for key in VRAM_KEYS}

    def resolve(self) -> list[str]:
        """The local paths of this model's files, fetching only those missing (unless skip_download)."""
        if self.path is not None:
            paths = [self.path] if isinstance(self.path, str) else list(self.path)
            for p in paths:
                if not os.path.exists(p):
                    raise CheckpointError(
                        f"ModelConfig(path=...): {p} does not exist; {folder_listing(Path(p).parent)}"
                    )
            return paths
        patterns = self._patterns()
        found = self._find(patterns)
        gaps = self._gaps(patterns, found)
        if gaps and not self.skip_download:
            self._fetch(patterns, found)
            self._downloaded = True
            found = self._find(patterns)
            gaps = self._gaps(patterns, found)
        if gaps:
            raise CheckpointError(self._gap_message(gaps))
        return [p for group in found.values() for p in group]

    def download_if_necessary(self) -> list[str]:
        """DiffSynth-Studio's name for `resolve()`; like it, also sets `path` (a str when one file)."""
        paths = self.resolve()
        self.path = paths[0] if len(paths) == 1 else paths
        return paths

    # ------------------------------------------------------------------ internals
    def _patterns(self) -> list[str]:
        """The patterns, "" standing for the whole repo (DiffSynth-Studio's None, "", "." and "./");
        a leading "./" is dropped ("./vae/" is "vae/")."""
        pattern = self.origin_file_pattern
        patterns = [pattern] if isinstance(pattern, str) else list(pattern or [])
        patterns = [_strip_dot(p) for p in patterns]
        return [p for p in patterns if p] or [""]

    def _find(self, patterns: list[str]) -> dict[str, list[str]]:
        """Local matches per pattern: "" is the repo folder, "dir/" the folder itself, else a glob."""
        root = self.local_folder
        found: dict[str, list[str]] = {}
        for pattern in patterns:
            if _is_folder_pattern(pattern):
                hits = [h for h in self._folders(pattern) if _finished_files(h, root)]
            else:
                hits = glob.glob(os.path.join(glob.escape(root), pattern))
                hits = [h for h in hits if not _is_hub_file(h, root)]
            found[pattern] = sorted(hits)
        return found

    def _folders(self, pattern: str) -> list[str]:
        """The local folders a folder pattern ("dir/", a glob allowed) or the whole repo ("") stands for."""
        root = self.local_folder
        if not pattern:
            return [root] if os.path.isdir(root) else []
        hits = [h.rstrip("/\\") for h in glob.glob(os.path.join(glob.escape(root), pattern))]
        return [h for h in hits if os.path.isdir(h) and not _is_hub_file(h, root)]

    def _gaps(self, patterns: list[str], found: dict[str, list[str]]) -> list[str]:
        """What is missing: patterns with no match, then shards missing beside the matches."""
        gaps = [f"no match for {p!r}" for p in patterns if not found[p]]
        gaps += [f"{p or 'the whole repo'!r} was not fully downloaded ({why})" for p, why in self._cut_off(found)]
        files = []
        for hits in found.values():
            for hit in hits:
                if os.path.isdir(hit):
                    files += [str(f) for f in Path(hit).iterdir() if f.is_file() and not _is_hub_file(f, hit)]
                else:
                    files.append(hit)
        return gaps + [f"missing shard {m}" for m in missing_shards(files)]

    def _cut_off(self, found: dict[str, list[str]]) -> list[tuple[str, str]]:
        """(pattern, why) for present folder / whole-repo patterns whose download was interrupted: our pending
        marker is still there, or hub temp files lie in them. A folder without either (copied by hand) is kept."""
        cut = []
        for pattern, hits in found.items():
            if not hits or not _is_folder_pattern(pattern):
                continue
            marker = self._marker(pattern)
            temps = [t for hit in hits for t in _hub_temp_files(hit, self.local_folder)]
            if os.path.isfile(marker):
                cut.append(
                    (pattern, f"the download marker {marker} is still there: delete it if the files are complete")
                )
            elif temps:
                more = f" (and {len(temps) - 1} more)" if len(temps) > 1 else ""
                cut.append((pattern, f"hub temp file {temps[0]}{more} is there: delete it if the files are complete"))
        return cut

    def _marker(self, pattern: str) -> str:
        """Where the pending-download marker of a folder / whole-repo pattern lives."""
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", pattern).strip("_.") or "whole_repo"
        digest = hashlib.sha1(pattern.encode()).hexdigest()[:8]
        return os.path.join(self.local_folder, MARKER_FOLDER, f"{slug}-{digest}.pending")

    def _mark_pending(self, patterns: list[str]) -> list[str]:
        """Write (atomically) the pending markers of `patterns`; removed once the hub call succeeds."""
        markers = [self._marker(p) for p in patterns]
        for marker in markers:
            os.makedirs(os.path.dirname(marker), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(marker), suffix=".tmp")
            with os.fdopen(fd, "w") as out:
                out.write(f"{self.model_id}\n")
            os.replace(tmp, marker)
        return markers

    def _fetch(self, patterns: list[str], found: dict[str, list[str]]) -> None:
        root = self.local_folder
        calls = [(None, [])] if "" in patterns else _download_calls(patterns)
        allow = None if "" in patterns else [p + "*" if p.endswith("/") else p for p in patterns]
        present = []
        for hits in found.values():
            for hit in hits:
                targets = _finished_files(hit, root) if os.path.isdir(hit) else [Path(hit)]
                present += [glob.escape(f.relative_to(root).as_posix()) for f in targets]
        # folder / whole-repo patterns not complete now: marked pending until the hub calls succeed
        cut_off = {p for p, _ in self._cut_off(found)}
        pending = [p for p in patterns if _is_folder_pattern(p) and (not found[p] or p in cut_off)]
        hub_id = _hub_id(self.download_source, self.model_id)
        logger.info(
            "fetching %s %s from %s into %s (%d files already there)",
            hub_id,
            allow or "(whole repo)",
            self.download_source,
            root,
            len(present),
        )
        markers = self._mark_pending(pending)
        try:
            self._call_hub(hub_id, calls, present, allow)
        except BaseException:
            self._unmark_untouched(pending)
            raise
        _clear_markers(markers)
        self._remove_stale_temp_files(patterns)

    def _call_hub(self, hub_id: str, calls, present: list[str], allow) -> None:
        """The hub calls of one fetch; a failure other than ours is one CheckpointError saying what to try."""
        try:
            for allow_patterns, ignore in calls:
                ignore_patterns = sorted(set(present)) + ignore
                _download(self.download_source, hub_id, self.local_folder, allow_patterns, ignore_patterns or None)
        except DiffSynthError:
            raise
        except Exception as exc:  # network, auth, unknown repo: one clear message
            other = _other(self.download_source)
            asked = f" (model_id {self.model_id!r})" if hub_id != self.model_id else ""
            raise CheckpointError(
                f"downloading {hub_id!r}{asked} ({allow or 'whole repo'}) from {self.download_source} failed: "
                f"{type(exc).__name__}: {exc}. Check model_id and your connection, try "
                f"download_source='{other}' (asks it for {_hub_id(other, self.model_id)!r}), or set "
                f"{ENV_SKIP_DOWNLOAD}=1 to use local files only"
            ) from exc

    def _unmark_untouched(self, pending: list[str]) -> None:
        """After a failed fetch, drop the markers of folders that still hold no finished file (nothing arrived:
        no repo, no network, no client), so a folder copied there by hand later is used as is."""
        found = self._find(pending)
        _clear_markers([self._marker(p) for p in pending if not found[p]])

    def _remove_stale_temp_files(self, patterns: list[str]) -> None:
        """After the hub calls succeeded, hub temp files left in the patterns' folders (another client's, or an
        earlier cut-off's) are stale: removed, so they do not mark the complete folder as cut off."""
        root = self.local_folder
        for pattern in filter(_is_folder_pattern, patterns):
            for folder in self._folders(pattern):
                for temp in _hub_temp_files(folder, root):
                    Path(temp).unlink(missing_ok=True)

    def _gap_message(self, gaps: list[str]) -> str:
        head = (
            f"ModelConfig(model_id={self.model_id!r}, origin_file_pattern={self.origin_file_pattern!r}): "
            f"{'; '.join(gaps[:5])}{f' (and {len(gaps) - 5} more)' if len(gaps) > 5 else ''} in "
            f"{self.local_folder}; {folder_listing(Path(self.local_folder))}. "
        )
        if self.skip_download:
            return head + (
                f"Downloads are off (skip_download=True or {ENV_SKIP_DOWNLOAD}=1): set {ENV_SKIP_DOWNLOAD}=0 to fetch "
                f"the files, or check model_id, origin_file_pattern and local_model_path ({ENV_MODEL_BASE_PATH})"
            )
        return head + (
            f"The download from {self.download_source} did not bring them: check model_id and origin_file_pattern "
            "(globs relative to the repo root, e.g. 'transformer/*.safetensors'; 'tokenizer/' for a folder)"
        )


def _download(source: str, model_id: str, local_dir: str, allow_patterns, ignore_patterns) -> None:
    """Fetch files of a hub repo into `local_dir` (the one place that touches the network)."""
    if source == "modelscope":
        try:
            from modelscope import snapshot_download
        except ImportError:
            raise ConfigError(
                "download_source='modelscope' needs the modelscope package: pip install modelscope"
            ) from None
        snapshot_download(model_id, local_dir=local_dir, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns)
    else:
        from huggingface_hub import snapshot_download

        snapshot_download(
            repo_id=model_id, local_dir=local_dir, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns
        )


def _hub_id(source: str, model_id: str) -> str:
    """The repo id `source` knows `model_id` by (ModelScope's `PAI/...` is `alibaba-pai/...` on Hugging Face)."""
    org, slash, name = model_id.partition("/")
    renamed = HUB_ORGS.get(source, {}).get(org.lower())
    return f"{renamed}/{name}" if slash and renamed else model_id


def _is_folder_pattern(pattern: str) -> bool:
    return not pattern or pattern.endswith("/")


def _is_hub_file(path, root) -> bool:
    """A hub client's bookkeeping or unfinished file (or folder), never a model file."""
    parts = Path(os.path.relpath(path, root)).parts
    return any(part in HUB_FOLDERS for part in parts) or parts[-1].endswith(HUB_TEMP_SUFFIXES)


def _finished_files(folder, root) -> list[Path]:
    """The finished files under `folder` (hub bookkeeping and temp files left out)."""
    if not os.path.isdir(folder):
        return []
    return [f for f in Path(folder).rglob("*") if f.is_file() and not _is_hub_file(f, root)]


def _hub_temp_files(folder, root) -> list[str]:
    """Unfinished downloads under `folder`, and those Hugging Face keeps for it under `root/.cache/`."""
    places = [Path(folder)]
    relative = os.path.relpath(folder, root)
    places.append(Path(root, ".cache", "huggingface", "download", "" if relative == "." else relative))
    files = [f for place in places if place.is_dir() for f in place.rglob("*") if f.is_file()]
    return sorted(str(f) for f in files if f.name.endswith(HUB_TEMP_SUFFIXES) or "._____temp" in f.parts)


def _clear_markers(markers: list[str]) -> None:
    for marker in markers:
        Path(marker).unlink(missing_ok=True)
    if markers:
        try:
            os.rmdir(os.path.dirname(markers[0]))  # only when empty: another pattern may still be pending
        except OSError:
            pass


def _strip_dot(pattern: str) -> str:
    while pattern.startswith("./"):
        pattern = pattern[2:]
    return "" if pattern == "." else pattern


def _download_calls(patterns: list[str]) -> list[tuple[list[str], list[str]]]:
    """(allow_patterns, extra ignore_patterns) per hub call. Locally a glob's '*' stays in one folder, but both hubs
    match allow patterns with fnmatch, where '*' crosses '/': a pattern without '/' goes in a call ignoring every
    file below a subfolder ("*/*"), and `dir/glob` (no '**') in one ignoring `dir/*/*`, so each brings the files
    it matches locally only. Folder patterns ("dir/": all of it) and '**' patterns go in a call without these."""
    flat = [p for p in patterns if "/" in p and not p.endswith("/") and "**" not in p]
    deeper = {p: posixpath.dirname(p) + "/*/*" for p in flat}
    flat = [p for p in flat if not any(fnmatch.fnmatch(p, deeper[q]) for q in flat if q != p)]
    rest = [p + "*" if p.endswith("/") else p for p in patterns if "/" in p and p not in flat]
    root = [p for p in patterns if "/" not in p]
    calls = ((flat, sorted({deeper[p] for p in flat})), (rest, []), (root, ["*/*"]))
    return [(allow, ignore) for allow, ignore in calls if allow]


def _other(source: str) -> str:
    return DOWNLOAD_SOURCES[1 - DOWNLOAD_SOURCES.index(source)]


def _check_path(path):
    if path is None:
        return path
    if isinstance(path, (str, os.PathLike)):
        return os.path.expanduser(os.fspath(path))
    if isinstance(path, (list, tuple)) and path and all(isinstance(p, (str, os.PathLike)) for p in path):
        return [os.path.expanduser(os.fspath(p)) for p in path]
    raise ConfigError(f"ModelConfig path must be a path or a non-empty list of paths, got {path!r}")


def _check_patterns(pattern) -> list[str] | str | None:
    if pattern is None or isinstance(pattern, str):
        return pattern
    if isinstance(pattern, (list, tuple)) and all(isinstance(p, str) for p in pattern):
        return list(pattern)
    raise ConfigError(f"origin_file_pattern must be a glob string or a list of them, got {pattern!r}")


def _download_source(value) -> str:
    where = "download_source"
    if value is None:
        value, where = os.environ.get(ENV_DOWNLOAD_SOURCE) or "modelscope", ENV_DOWNLOAD_SOURCE
    if isinstance(value, str) and value.strip().lower() in DOWNLOAD_SOURCES:
        return value.strip().lower()
    raise ConfigError(f"{where}={value!r} is not accepted; use one of {DOWNLOAD_SOURCES}")


def _skip_download(value) -> bool:
    if isinstance(value, bool):
        return value
    if value is not None:
        raise ConfigError(f"skip_download must be True, False or None (read {ENV_SKIP_DOWNLOAD}), got {value!r}")
    text = os.environ.get(ENV_SKIP_DOWNLOAD, "").strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise ConfigError(f"{ENV_SKIP_DOWNLOAD}={text!r} is not accepted; use one of {_TRUE + _FALSE[:-1]}")


__all__ = ["DOWNLOAD_SOURCES", "VRAM_KEYS", "ModelConfig"]
