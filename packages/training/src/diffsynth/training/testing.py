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
from dataclasses import dataclass, replace
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


def overfit_config(
    model: str | PathLike,
    family: str,
    dataset: str | PathLike,
    output: str | PathLike,
    *,
    noise: tuple[float, float],
    **overrides: Any,
) -> TrainConfig:
    """A tiny run that overfits a two-row dataset (`tiny_config`): seeded, epochs enough for any step count, no loss
    weights, a learning rate of 2e-2 and timesteps only in the (min, max) boundaries `noise`, a narrow band so the
    latents, not the noise drawn, decide the loss the tests watch fall. Then `overrides`."""
    values = dict(
        learning_rate=2e-2, loss_weighting="none", min_timestep_boundary=noise[0], max_timestep_boundary=noise[1],
        seed=0, num_epochs=1000,
    )  # fmt: skip
    return tiny_config(model, family, dataset, output, **{**values, **overrides})


def train_and_log(config: TrainConfig) -> tuple[Any, list[float]]:
    """Trains `config` in this process; returns the last `TrainState` and the loss of every logged step."""
    from diffsynth.training.trainer import train

    state = train(config)
    return state, logged_losses(config.output_path)


def first_losses(config: TrainConfig, steps: int = 2, batch_size: int = 2) -> tuple[list[float], Any]:
    """The losses of the first `steps` steps of `config` (one micro-batch of `batch_size` a step, in `batch_plan`'s
    order), trained in this process by `train_step`, and the `Run` (its model, trainable weights, task)."""
    from diffsynth.training.data import batch_plan
    from diffsynth.training.trainer import TrainState, setup, train_step

    run = setup(config)
    state, losses = TrainState(), []
    for batch in batch_plan(run.dataset.batch_keys, batch_size=batch_size)[:steps]:
        state = train_step(run, state, [[run.dataset[i] for i in batch]])
        losses.append(state.loss)
    return losses, run


class Crash(Exception):
    """What `resume_after_crash` stops a run with."""


def resume_after_crash(config: TrainConfig, crash_after: int = 2) -> Any:
    """Train `config` until `crash_after` optimizer steps are done, stop it there as a crash would (an exception
    out of the training loop, after that step's saves), then run it again with `--resume latest`: the resumed
    run's last `TrainState`, for comparing with the same run trained without a stop."""
    from diffsynth.training import trainer

    real_step = trainer.train_step

    def crashing_step(run, state, group):
        if state.step == crash_after:
            raise Crash
        return real_step(run, state, group)

    trainer.train_step = crashing_step
    try:
        trainer.train(config)
    except Crash:
        pass
    else:
        raise AssertionError(f"the run ended before step {crash_after}: it never stopped")
    finally:
        trainer.train_step = real_step
    return trainer.train(replace(config, resume="latest"))


def assert_overfits(state: Any, curve: Sequence[float], steps: int, last: int) -> None:
    """The run took `steps` steps, logged each, and the mean loss of its `last` steps is under half the first's."""
    assert state.step == steps and len(curve) == steps
    assert sum(curve[-last:]) / last < 0.5 * curve[0], curve


@dataclass
class TwoStageRuns:
    """One tiny run trained twice under `root`: directly in `direct/`, and in two stages, `--stage encode` into
    `cache/` then the training from the cache in `cached/`. The two must agree: the cache holds what the first
    stage would have computed on the fly."""

    root: Path
    state: Any  # the cached run's last TrainState
    config: TrainConfig  # the cached run's second stage

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    def losses(self) -> tuple[list[float], list[float]]:
        """The logged losses of the direct run and of the cached one."""
        return logged_losses(self.root / "direct"), logged_losses(self.root / "cached")

    def cached_item(self, index: int) -> dict[str, Any]:
        """The tensors the first stage stored for the dataset's row `index`."""
        from safetensors.torch import load_file

        return load_file(str(self.cache / "items" / f"{index:06d}.safetensors"))

    def checkpoints(self, step: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """The trainable weights both runs checkpointed at `step` (direct, cached)."""
        from safetensors.torch import load_file

        name = Path("checkpoints") / f"step-{step:06d}" / "trainable.safetensors"
        return load_file(str(self.root / "direct" / name)), load_file(str(self.root / "cached" / name))


def train_direct_and_cached(config: TrainConfig) -> TwoStageRuns:
    """Trains `config` directly and in two stages (see `TwoStageRuns`) under its `output_path`."""
    from diffsynth.training.trainer import run_stage, train

    root = Path(config.output_path)
    cache = str(root / "cache")
    train(replace(config, output_path=str(root / "direct")))
    run_stage(replace(config, output_path=str(root / "cached"), cache_dir=cache, stage="encode"))
    second = replace(config, output_path=str(root / "cached"), cache_dir=cache)
    return TwoStageRuns(root, run_stage(second), second)


def assert_same_training(runs: TwoStageRuns, step: int, atol: float) -> None:
    """Both runs checkpointed the same trainable weights at `step` (to `atol`), and the cached run's second stage
    loads only the denoiser: no text encoder, no VAE, no tokenizer."""
    import torch

    from diffsynth.training.task import TrainingTask
    from diffsynth.training.trainer import setup

    direct, cached = runs.checkpoints(step)
    assert direct.keys() == cached.keys() and len(direct) > 0
    for name in direct:
        torch.testing.assert_close(cached[name], direct[name], rtol=0, atol=atol)
    stage2 = setup(runs.config)
    assert isinstance(stage2.task, TrainingTask)  # the family implements the protocol structurally
    assert set(stage2.task.models) == {"dit"}  # no text encoder, no VAE
    assert stage2.task.pipe.tokenizer is None


def outputs_before_and_after_lora(
    pipe: Any, lora: str | PathLike, prompt: str, load: Mapping[str, Any] | None = None, **call: Any
) -> tuple[Any, Any]:
    """The pipeline's output for `prompt` (`call`: seed, size, output type) before and after it loads the LoRA file
    `lora` (`load`: `load_lora`'s options), for the tests that check a trained LoRA changes what it draws."""
    before = pipe(prompt, **call)
    pipe.load_lora(lora, **(load or {}))
    return before, pipe(prompt, **call)


def configs_with_trained_weights(
    folder: str | PathLike, weights: str | PathLike, replaces: str = "transformer"
) -> list:
    """The `ModelConfig`s of the tiny repo `folder` with the weights a full fine-tune saved (`weights`, its
    `step-N/<model>/` folder) in place of the `replaces` subfolder's, to build the tuned pipeline from."""
    from diffsynth.runtime.hub import ModelConfig
    from diffsynth.runtime.pipeline import configs_from_folder

    files = sorted(Path(weights).glob("*.safetensors"))
    assert files, f"no *.safetensors saved in {weights}"
    configs = [c for c in configs_from_folder(Path(folder))[0] if replaces not in str(c.path)]
    return [ModelConfig(path=[str(f) for f in files]), *configs]


class CliTrainer:
    """`diffsynth-train` (`train_with_cli`) on one tiny repo and dataset with fixed extra flags, for a family's
    trainer tests: `trainer(output, *flags)` trains and returns the logged losses."""

    def __init__(self, model: str | PathLike, family: str, dataset: str | PathLike, *flags: str):
        self.model, self.family, self.dataset, self.flags = model, family, dataset, flags

    def __call__(self, output: str | PathLike, *extra: str) -> list[float]:
        return train_with_cli(self.model, self.family, self.dataset, output, *self.flags, *extra)

    def direct_and_cached(self, root: str | PathLike, *extra: str) -> tuple[list[float], list[float]]:
        """The losses of a run trained directly (`root/direct`) and in two stages (`root/cached`, from the
        cache the `--stage encode` run wrote in `root/cache`)."""
        root = Path(root)
        direct = self(root / "direct", *extra)
        cache = str(root / "cache")
        self(root / "cached", *extra, "--cache_dir", cache, "--stage", "encode")
        return direct, self(root / "cached", *extra, "--cache_dir", cache)


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
    """The loss of every logged step, from the run's `metrics.jsonl` (not its `val_loss` records)."""
    records = [json.loads(line) for line in (Path(output) / "metrics.jsonl").read_text().splitlines()]
    return [record["loss"] for record in records if "loss" in record]


def load_module(path: str | PathLike, name: str) -> ModuleType:
    """Loads a helper file of another package's tests (a `conftest.py` that builds its tiny repo) by path: test
    folders are not importable packages."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
