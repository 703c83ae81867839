"""`ModelConfig`: where a model's files are, fetching only what is missing (DiffSynth-Studio compatible).

Files live under `local_model_path/model_id/` (as DiffSynth-Studio lays them out), so a folder
filled once works offline. Downloads go through modelscope (default) or huggingface_hub, imported
only when something is missing; a shard set is complete only when every shard its `*.index.json`
(or its `-0000i-of-0000N` names) lists is present.
"""

from __future__ import annotations

import glob
import logging
import os
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
            if not pattern:
                hits = [root] if os.path.isdir(root) and os.listdir(root) else []
            elif pattern.endswith("/"):
                hits = [h.rstrip("/\\") for h in glob.glob(os.path.join(glob.escape(root), pattern))]
                hits = [h for h in hits if os.path.isdir(h) and os.listdir(h)]
            else:
                hits = glob.glob(os.path.join(glob.escape(root), pattern))
            found[pattern] = sorted(hits)
        return found

    def _gaps(self, patterns: list[str], found: dict[str, list[str]]) -> list[str]:
        """What is missing: patterns with no match, then shards missing beside the matches."""
        gaps = [f"no match for {p!r}" for p in patterns if not found[p]]
        files = []
        for hits in found.values():
            for hit in hits:
                files += [str(f) for f in Path(hit).iterdir() if f.is_file()] if os.path.isdir(hit) else [hit]
        return gaps + [f"missing shard {m}" for m in missing_shards(files)]

    def _fetch(self, patterns: list[str], found: dict[str, list[str]]) -> None:
        root = self.local_folder
        calls = [(None, [])] if "" in patterns else _download_calls(patterns)
        allow = None if "" in patterns else [p + "*" if p.endswith("/") else p for p in patterns]
        present = []
        for hits in found.values():
            for hit in hits:
                targets = [f for f in Path(hit).rglob("*") if f.is_file()] if os.path.isdir(hit) else [Path(hit)]
                present += [glob.escape(f.relative_to(root).as_posix()) for f in targets]
        logger.info(
            "fetching %s %s from %s into %s (%d files already there)",
            self.model_id,
            allow or "(whole repo)",
            self.download_source,
            root,
            len(present),
        )
        try:
            for allow_patterns, ignore in calls:
                ignore_patterns = sorted(set(present)) + ignore
                _download(self.download_source, self.model_id, root, allow_patterns, ignore_patterns or None)
        except DiffSynthError:
            raise
        except Exception as exc:  # network, auth, unknown repo: one clear message
            raise CheckpointError(
                f"downloading {self.model_id!r} ({allow or 'whole repo'}) from {self.download_source} failed: "
                f"{type(exc).__name__}: {exc}. Check model_id and your connection, try "
                f"download_source='{_other(self.download_source)}', or set {ENV_SKIP_DOWNLOAD}=1 to use local files only"
            ) from exc

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


def _strip_dot(pattern: str) -> str:
    while pattern.startswith("./"):
        pattern = pattern[2:]
    return "" if pattern == "." else pattern


def _download_calls(patterns: list[str]) -> list[tuple[list[str], list[str]]]:
    """(allow_patterns, extra ignore_patterns) per hub call. Locally a pattern without '/' matches root files only
    (glob), but both hubs match allow patterns with fnmatch, where '*' crosses '/': such patterns go in a call
    that ignores every file below a subfolder ("*/*"), so "*.safetensors" brings the root files only."""
    nested = [p + "*" if p.endswith("/") else p for p in patterns if "/" in p]
    root = [p for p in patterns if "/" not in p]
    return [(allow, ignore) for allow, ignore in ((nested, []), (root, ["*/*"])) if allow]


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
