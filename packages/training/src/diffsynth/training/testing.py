"""Scaffolding for the tests of the families' training tasks: `diffsynth-train --family X` end to end on a tiny repo.

Those tests each write a tiny captioned dataset, train with small settings and read back the losses the trainer
logged; the helpers here do that once, so each test shows only what its family does differently. The family
packages do not depend on the trainer, so their tests import this module inside the trainer tests and fixtures
(`pytest.importorskip("diffsynth.training.testing")`), never at module level.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Mapping, Sequence
from os import PathLike
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from PIL import Image

from diffsynth.training.config import TrainConfig

# Small enough that a tiny repo trains in seconds on a CPU: 64x64 pictures, two rows a batch, a rank-4 LoRA,
# float32 throughout (runs compare bit for bit), two steps, every loss logged. Tests override what they study.
TINY_SETTINGS: dict[str, Any] = dict(
    max_pixels=64 * 64, bucket_step=16, batch_size=2, lora_rank=4, learning_rate=1e-2, mixed_precision="no",
    dtype="float32", max_steps=2, log_every=1,
)  # fmt: skip


def write_metadata(folder: str | PathLike, rows: Sequence[Mapping[str, Any]]) -> Path:
    """`metadata.jsonl` with one line per row (file paths relative to `folder`); returns the folder."""
    folder = Path(folder)
    (folder / "metadata.jsonl").write_text("".join(json.dumps(dict(row)) + "\n" for row in rows))
    return folder


def write_caption_dataset(
    folder: str | PathLike,
    prompts: Sequence[str],
    *,
    size: tuple[int, int] = (64, 64),
    seed: int = 0,
    images: Sequence[Image.Image] | None = None,
    extra: Sequence[Mapping[str, Any]] | None = None,
) -> Path:
    """An image dataset: `img{i}.png` captioned `prompts[i]`. The pictures are `images`, or seeded random RGB
    noise of (width, height) `size` (noise keeps the losses away from zero). `extra` adds columns row by row, such
    as the reference images an edit model trains with (the caller writes those files)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i, prompt in enumerate(prompts):
        if images is None:
            picture = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        else:
            picture = images[i]
        picture.save(folder / f"img{i}.png")
        rows.append({"image": f"img{i}.png", "prompt": prompt, **(extra[i] if extra is not None else {})})
    return write_metadata(folder, rows)


def write_edit_dataset(folder: str | PathLike, prompts: Sequence[str], column: str, stem: str) -> Path:
    """Recolouring edits of plain pictures (their latents are easy to learn: a few steps overfit them), for the
    models trained with reference images: `column` names the 48x32 reference `{stem}{i}.png` (kept at its size),
    `img{i}.png` is the 64x64 target. The first row names its reference as a path, the others as a JSON list of
    one path: the trainer takes both. At most two rows (two colour pairs)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    colours = [((40, 60, 200), (230, 200, 30)), ((200, 40, 40), (20, 140, 60))]  # (reference, target)
    if len(prompts) > len(colours):
        raise ValueError(f"write_edit_dataset writes at most {len(colours)} rows; got {len(prompts)} prompts")
    targets, references = [], []
    for i, (reference, target) in enumerate(colours[: len(prompts)]):
        Image.new("RGB", (48, 32), reference).save(folder / f"{stem}{i}.png")
        targets.append(Image.new("RGB", (64, 64), target))
        references.append({column: f"{stem}{i}.png" if i == 0 else [f"{stem}{i}.png"]})
    return write_caption_dataset(folder, prompts, images=targets, extra=references)


def write_video_dataset(
    folder: str | PathLike, prompts: Sequence[str], videos: Sequence[np.ndarray], fps: int = 8
) -> Path:
    """A video dataset: `clip{i}.mp4` from the [F, H, W, 3] uint8 frames `videos[i]`, captioned `prompts[i]`."""
    from diffsynth.runtime.media import save_video

    folder = Path(folder)
    rows = []
    for i, (prompt, frames) in enumerate(zip(prompts, videos, strict=True)):
        save_video(list(frames), folder / f"clip{i}.mp4", fps=fps)
        rows.append({"video": f"clip{i}.mp4", "prompt": prompt})
    return write_metadata(folder, rows)


def tiny_config(
    model: str | PathLike, family: str, dataset: str | PathLike, output: str | PathLike, **overrides: Any
) -> TrainConfig:
    """The `TrainConfig` of a tiny run: `TINY_SETTINGS`, then `overrides`."""
    paths = dict(model=str(model), family=family, dataset_base_path=str(dataset), output_path=str(output))
    return TrainConfig(**{**paths, **TINY_SETTINGS, **overrides})


def train_with_cli(
    model: str | PathLike, family: str, dataset: str | PathLike, output: str | PathLike, *extra: str
) -> list[float]:
    """Runs `diffsynth-train` in this process with `TINY_SETTINGS` as flags, then `extra` (a later flag wins), so
    the command line is tested as users type it. Returns the logged losses; none for a run that logs none
    (`--stage encode`)."""
    from diffsynth.training.cli import main

    argv = ["--model", str(model), "--family", family, "--dataset_base_path", str(dataset)]
    argv += ["--output_path", str(output)]
    for name, value in TINY_SETTINGS.items():
        argv += [f"--{name}", str(value)]
    argv += extra
    code = main(argv)
    if code != 0:
        raise AssertionError(f"diffsynth-train exited with {code}: {' '.join(argv)}")
    return logged_losses(output) if (Path(output) / "metrics.jsonl").exists() else []


def logged_losses(output: str | PathLike) -> list[float]:
    """The loss of every logged step, from the run's `metrics.jsonl`."""
    lines = (Path(output) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def load_module(path: str | PathLike, name: str) -> ModuleType:
    """Loads a helper file of another package's tests (a `conftest.py` that builds its tiny repo) by path: test
    folders are not importable packages."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
