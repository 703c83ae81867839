"""What every metric shares: finding its files, reading weights strictly, and turning user input into lists.

Metrics follow DiffSynth-Studio's `diffsynth.metrics` API: `XMetric.from_pretrained(model_config=ModelConfig(...),
device=...)`, then `metric.compute(...)`, which returns plain Python floats (a list, one per image).
"""

from __future__ import annotations

import json
import logging
import numbers
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from PIL import Image

from ..checkpoint import open_checkpoint
from ..dtypes import parse_device, parse_dtype
from ..errors import CheckpointError, ConfigError, preview
from ..hub import ModelConfig
from ..media import load_image

logger = logging.getLogger(__name__)

METRICS_REPO = "DiffSynth-Studio/ImageMetrics"  # the hub repo DiffSynth-Studio's metric files come from


def default_config(pattern: str) -> ModelConfig:
    """A fresh `ModelConfig` for one file or folder of DiffSynth-Studio's ImageMetrics repo."""
    return ModelConfig(model_id=METRICS_REPO, origin_file_pattern=pattern)


def resolve_files(config: ModelConfig | str | os.PathLike, what: str) -> list[str]:
    """The local paths behind `config` (a `ModelConfig` or a plain path), downloading what is missing."""
    if isinstance(config, (str, os.PathLike)):
        config = ModelConfig(path=os.fspath(config))
    if not isinstance(config, ModelConfig):
        raise ConfigError(f"{what} must be a ModelConfig or a path, got {type(config).__name__}")
    return config.resolve()


def resolve_folder(config: ModelConfig | str | os.PathLike, what: str) -> str:
    """One local folder (a processor's files) behind `config`; a file's folder is accepted too."""
    paths = resolve_files(config, what)
    folders = {p if os.path.isdir(p) else os.path.dirname(p) for p in paths}
    if len(folders) != 1:
        raise ConfigError(f"{what} must name one folder, got {preview(sorted(folders))}")
    return folders.pop()


def read_json_beside(files: Sequence[str], *folders: str) -> dict | None:
    """The `config.json` beside the weight file, else in one of `folders`; None when there is none."""
    candidates = [Path(files[0]).parent / "config.json"] + [Path(f) / "config.json" for f in folders if f]
    for path in candidates:
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise CheckpointError(f"{path} is not valid JSON ({exc}); fix or delete it") from None
            logger.debug("metric config from %s", path)
            return data
    return None


def read_state_dict(files: Sequence[str]) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint (one file or shards), read into memory."""
    state = open_checkpoint(list(files))
    return {key: state[key] for key in state}


def load_strict(module: torch.nn.Module, state: Mapping[str, torch.Tensor], label: str) -> None:
    """Put `state` into `module` (built on the meta device or not); a missing or unexpected key or a shape
    mismatch raises, naming it and the file. `position_ids` buffers, which files do not carry, are rebuilt."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"{label}: the weights do not fit {type(module).__name__}: missing {preview(missing)}; "
            f"unexpected {preview(unexpected)}"
        )
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise CheckpointError(
                f"{label}: {key} has shape {tuple(value.shape)} in the file, {tuple(own[key].shape)} in "
                f"{type(module).__name__}"
            )
    module.load_state_dict(dict(state), strict=True, assign=True)
    for name, buffer in list(module.named_buffers()):
        if buffer.device.type != "meta":
            continue
        if not name.endswith("position_ids"):
            raise CheckpointError(f"{label}: buffer {name!r} is in neither the file nor rebuilt by the model")
        owner = module.get_submodule(name.rpartition(".")[0])
        positions = torch.arange(buffer.shape[-1]).expand(buffer.shape).clone()
        owner.register_buffer("position_ids", positions, persistent=False)


def build_on_meta(factory: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Build a module without allocating or initialising weights (they come from the file)."""
    with torch.device("meta"):
        return factory()


def convert_keys(
    state: Mapping[str, torch.Tensor], rules: Sequence[tuple[str, str | None]], label: str
) -> dict[str, torch.Tensor]:
    """Rename keys by the first matching `(file prefix, our prefix)` rule; `None` drops the key on purpose.

    A key no rule matches is an error naming it, so an unknown layout is never loaded half-way.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for source, target in rules:
            if key.startswith(source):
                if target is not None:
                    out[target + key[len(source) :]] = value
                break
        else:
            raise CheckpointError(f"{label}: key {key!r} is not part of any known layout of this metric's model")
    return out


def pick_device(device: str | torch.device | None) -> torch.device:
    """The compute device: a real one (metrics are not offloaded to disk)."""
    parsed = parse_device(device)
    if not isinstance(parsed, torch.device):
        raise ConfigError(f"device={device!r} is not accepted for a metric; use 'cuda', 'cuda:1' or 'cpu'")
    return parsed


def check_batch_size(batch_size) -> int:
    """Images per forward pass: an int >= 1, refused up front (0 or -1 would fail deep inside a batching loop)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r} is not accepted; use an integer >= 1 (images per forward pass)")
    return int(batch_size)


def pick_dtype(torch_dtype: str | torch.dtype | None) -> torch.dtype:
    """The weights' dtype; None means float32 (as DiffSynth-Studio's metrics default)."""
    return torch.float32 if torch_dtype is None else parse_dtype(torch_dtype)


def as_images(images, what: str = "images") -> list[Image.Image]:
    """RGB PIL images from one image or path, or a list/tuple of them."""
    if isinstance(images, (Image.Image, str, os.PathLike)):
        images = [images]
    if not isinstance(images, (list, tuple)):
        raise ConfigError(f"{what} must be a PIL.Image, a path, or a list of them, got {type(images).__name__}")
    if not images:
        raise ConfigError(f"{what} is empty: give at least one image")
    return [load_image(image) for image in images]


def pair_prompts(prompt, images) -> tuple[list[str], list[Image.Image]]:
    """One prompt per image: a single string applies to every image; a list must match the images in number."""
    images = as_images(images)
    if isinstance(prompt, str):
        return [prompt] * len(images), images
    if not isinstance(prompt, (list, tuple)) or not all(isinstance(p, str) for p in prompt):
        raise ConfigError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}")
    if len(prompt) != len(images):
        raise ConfigError(
            f"prompt has {len(prompt)} entries but images has {len(images)}: give one prompt per image, "
            "or a single string to score every image against it"
        )
    return list(prompt), images


class Metric(torch.nn.Module):
    """Base class of the metrics: a frozen model in eval mode whose scores come back as Python floats."""

    @staticmethod
    def tensor_to_list(value) -> list:
        """A list of floats from a tensor or a number (DiffSynth-Studio's helper name)."""
        if torch.is_tensor(value):
            value = value.detach().float().cpu().tolist()
        return value if isinstance(value, list) else [value]

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def _ready(self, device: torch.device, dtype: torch.dtype, keep_float32: Callable | None = None):
        """Move to `device`/`dtype`, freeze, eval."""
        self.to(device=device, dtype=dtype)
        if keep_float32 is not None:
            keep_float32(self)
        self.requires_grad_(False)
        return self.eval()


def grid_side(positions: int) -> int:
    """The side of a ViT's square patch grid from its position count (the grid plus one class token)."""
    import math

    from ..errors import CheckpointError

    side = math.isqrt(positions - 1)
    if side * side != positions - 1:
        raise CheckpointError(f"{positions} vision positions is not a square grid plus the class token")
    return side
