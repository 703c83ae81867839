"""What a run writes: resume checkpoints (atomic, prunable) and the trained weights in loadable formats.

A resume checkpoint is a folder `<output_path>/checkpoints/step-NNNNNN/`:

    trainable.safetensors   the trained parameters (LoRA matrices, or the fine-tuned models)
    state.pt                optimizer, LR scheduler, progress (step, epoch, batches done), the config
    rng-<rank>.pt           each process's random states (python, numpy, torch, cuda)
    deepspeed/              under DeepSpeed: its fp32 master weights and optimizer partitions (its own layout)
    <name>.safetensors      auxiliary trained models (`--task dmd2`: dmd2-fake_score, the fake score model)
    <name>-optimizer.pt     their optimizer states (`write_auxiliary` / `read_auxiliary`)

It is written under a temporary name and renamed into place with `os.replace` once complete, so a run killed
mid-save leaves the previous checkpoints intact and never a partial one that `--resume latest` would pick.

Exports, for use: a LoRA as `<output_path>/step-NNNNNN.safetensors` in our format (`.peft.safetensors` /
`.kohya.safetensors` on request, via `diffsynth.runtime.lora.save_lora`); full weights as
`<output_path>/step-NNNNNN/<slot>/diffusion_pytorch_model.safetensors` with the official keys (our module names
are the official keys) and a copy of the `config.json` the model was loaded with, so they load like the original.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from diffsynth.runtime.errors import ConfigError, preview

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
_STEP = re.compile(r"^step-(\d+)$")


def step_name(step: int) -> str:
    return f"step-{step:06d}"


# ----------------------------------------------------------------------------------- random states
def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what `rng_state` saved (a "noise" entry of older checkpoints is not needed: the trainer keys
    each micro-batch's noise by its index)."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------- resume checkpoints
def save_checkpoint(
    root: Path,
    step: int,
    *,
    trainable: Mapping[str, torch.Tensor],
    state: Mapping[str, Any],
    rng: Mapping[str, Any],
    rank: int = 0,
    barrier: Callable[[], None] = lambda: None,
    write_more: Callable[[Path], None] | None = None,
) -> Path:
    """Write checkpoint `step` under `root` atomically. Every process calls it (each writes its random state,
    and calls `write_more(folder)` when given); process 0 writes the weights and `state` and renames the folder
    into place."""
    from safetensors.torch import save_file

    final = root / step_name(step)
    tmp = root / f".{step_name(step)}.tmp"
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    torch.save(dict(rng), tmp / f"rng-{rank}.pt")
    if write_more is not None:
        write_more(tmp)
    if rank == 0:
        save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
        torch.save(dict(state), tmp / "state.pt")
    barrier()
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        logger.info("saved checkpoint %s", final)
    barrier()
    return final


def write_auxiliary(
    folder: Path, name: str, weights: Mapping[str, torch.Tensor], optimizer_state: Mapping[str, Any]
) -> None:
    """An auxiliary trained model (one that is not the exported denoiser, such as DMD2's fake score) in a
    checkpoint folder being written: its full weights and its optimizer's state. Called from `write_more`, so
    it lands atomically with the rest."""
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(folder / f"{name}.safetensors"))
    torch.save(dict(optimizer_state), folder / f"{name}-optimizer.pt")


def read_auxiliary(folder: Path, name: str, needed_by: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(weights, optimizer state) that `write_auxiliary` wrote; a checkpoint without them is refused, naming
    `needed_by` (what this run trains that the checkpoint did not)."""
    from safetensors.torch import load_file

    weights, optimizer = folder / f"{name}.safetensors", folder / f"{name}-optimizer.pt"
    if not (weights.is_file() and optimizer.is_file()):
        raise ConfigError(
            f"--resume {folder}: no {weights.name} / {optimizer.name}, which {needed_by} needs; this checkpoint "
            "was written by a run of another --task"
        )
    return load_file(str(weights)), torch.load(optimizer, map_location="cpu", weights_only=True)


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP.match(p.name)) and (p / "state.pt").is_file()]
    return [p for _, p in sorted(found)]


def find_checkpoint(resume: str, output_path: Path) -> Path | None:
    """The folder `--resume` names: 'latest' (None when there is none yet) or a checkpoint folder."""
    if resume == "latest":
        found = list_checkpoints(output_path / CHECKPOINTS)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "state.pt").is_file():
        listing = preview(p.name for p in list_checkpoints(output_path / CHECKPOINTS))
        raise ConfigError(
            f"--resume {resume}: not a checkpoint folder (no state.pt); checkpoints in {output_path / CHECKPOINTS}: "
            f"{listing}; or pass --resume latest"
        )
    return path


def load_checkpoint(folder: Path, rank: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(trainable weights, state, this process's random state) of a checkpoint."""
    from safetensors.torch import load_file

    rng_file = folder / f"rng-{rank}.pt"
    if not rng_file.is_file():
        raise ConfigError(
            f"--resume {folder}: no random state for process {rank}; it was saved with fewer processes than this run"
        )
    trainable = load_file(str(folder / "trainable.safetensors"))
    state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
    rng = torch.load(rng_file, map_location="cpu", weights_only=True)
    return trainable, state, rng


def refuse_older_run(root: Path) -> None:
    """A run started without `--resume` into an output folder whose `root` (its checkpoints folder) holds an older
    run's checkpoints is refused: `--keep_last` would count the older steps as newer and delete the new run's,
    `--resume latest` would pick the older run, and the exports and metrics of both would mix."""
    found = list_checkpoints(root)
    if found:
        raise ConfigError(
            f"--output_path {root.parent} holds checkpoints of an earlier run ({preview(p.name for p in found)} in "
            f"{root}): pass --resume latest to continue it, or another --output_path"
        )


_EXPORT = re.compile(r"^step-(\d+)(?:-ema)?(?:\..+)?$")  # step-N(.fmt).safetensors, step-N(-ema)/ of the output
_PICTURE = re.compile(r"^step-(\d+)-\d+\.\w+$")  # validation/step-N-K.png (.mp4)


def set_aside_later(root: Path, step: int) -> Path | None:
    """Move the checkpoints of steps after `step` under `root` (those of a run that went on past the checkpoint a
    run resumes from: an abandoned branch) into `root/abandoned-from-step-NNNNNN-<time>/`, where `--resume latest`
    and `--keep_last` do not look, with that branch's exports (`exports/`) and validation pictures (`validation/`)
    from the output folder; the folder, or None when there were no later checkpoints. Nothing is deleted."""
    later = [p for p in list_checkpoints(root) if int(_STEP.match(p.name).group(1)) > step]
    if not later:
        return None
    folder = root / f"abandoned-from-{step_name(step)}-{time.strftime('%Y%m%d-%H%M%S')}"
    while folder.exists():  # two resumes within a second
        folder = folder.with_name(folder.name + "-1")
    folder.mkdir()
    for path in later:
        os.replace(path, folder / path.name)
    moved = _move_later(root.parent, _EXPORT, step, folder / "exports")
    moved += _move_later(root.parent / "validation", _PICTURE, step, folder / "validation")
    logger.warning(
        "resumed from step %d while %s had later checkpoints (%s): moved them%s to %s so that --resume latest, "
        "--keep_last and the output folder hold this run's",
        step,
        root,
        ", ".join(p.name for p in later),
        f" and {moved} exports / validation pictures of those steps" if moved else "",
        folder,
    )
    return folder


def _move_later(source: Path, pattern: re.Pattern, step: int, target: Path) -> int:
    """Move the entries of `source` whose name `pattern` matches with a step (its first group) after `step` into
    `target`; how many."""
    if not source.is_dir():
        return 0
    later = [p for p in source.iterdir() if (m := pattern.match(p.name)) and int(m.group(1)) > step]
    if later:
        target.mkdir(parents=True, exist_ok=True)
    for path in later:
        os.replace(path, target / path.name)
    return len(later)


def prune_checkpoints(root: Path, keep_last: int | None) -> None:
    """Delete all but the newest `keep_last` checkpoints (and any temporary folder left by a crash)."""
    for stale in root.glob(".step-*.tmp") if root.is_dir() else []:
        shutil.rmtree(stale, ignore_errors=True)
    if keep_last is None:
        return
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old)
        logger.info("removed old checkpoint %s (--keep_last %d)", old, keep_last)


# ----------------------------------------------------------------------------------- exports
def lora_weights(model: nn.Module, state: Mapping[str, torch.Tensor] | None = None):
    """The peft LoRA (or LoHa / LoKr) layers of `model` as `LoRAWeights` named after our (= the official) module
    names; their matrices from `state` (full tensors gathered from a sharded model) when given."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lycoris_utils import LycorisLayer

    from diffsynth.runtime.lora import LoRATarget, LoRAWeights

    def matrix(name: str, part: str, layer: nn.Module) -> torch.Tensor:
        key = f"{name}.lora_{part}.default.weight"
        return state[key] if state is not None else getattr(layer, f"lora_{part}")["default"].weight.detach()

    targets = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            targets[name] = LoRATarget(
                down=matrix(name, "A", module),
                up=matrix(name, "B", module),
                alpha=float(module.lora_alpha["default"]),
                magnitude=dora_magnitude(name, module, state),
            )
        elif isinstance(module, LycorisLayer) and "default" in module.scaling:
            targets[name] = LoRATarget(factors=lycoris_factors(name, module, state))
    if not targets:
        raise ConfigError(f"{type(model).__name__} carries no LoRA layers to save")
    return LoRAWeights(targets=targets, source="training")


def dora_magnitude(name: str, layer: nn.Module, state: Mapping[str, torch.Tensor] | None) -> torch.Tensor | None:
    """A peft DoRA layer's magnitude as [out, 1] (None for a plain LoRA layer)."""
    if "default" not in getattr(layer, "lora_magnitude_vector", {}):
        return None
    key = f"{name}.lora_magnitude_vector.default.weight"
    magnitude = state[key] if state is not None else layer.lora_magnitude_vector["default"].weight.detach()
    return magnitude.reshape(-1, 1)


def lycoris_factors(name: str, layer: nn.Module, state: Mapping[str, torch.Tensor] | None):
    """A peft LoHa / LoKr layer's change as the runtime's factored `WeightDelta` (peft's scale: alpha / rank)."""
    from diffsynth.runtime.lora_factors import HadamardDelta, KroneckerDelta

    def factor(field: str) -> torch.Tensor | None:
        if state is not None:
            return state.get(f"{name}.{field}.default")
        holder = getattr(layer, field, {})
        return holder["default"].detach() if "default" in holder else None

    scale = float(layer.scaling["default"])
    if factor("hada_w1_a") is not None:
        return HadamardDelta(*(factor(f) for f in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")), scale)
    w1, w2 = (factor(f"lokr_w{n}") for n in (1, 2))
    w1 = w1 if w1 is not None else (factor("lokr_w1_a"), factor("lokr_w1_b"))
    w2 = w2 if w2 is not None else (factor("lokr_w2_a"), factor("lokr_w2_b"))
    return KroneckerDelta(w1, w2, scale)


def save_lora_files(
    model: nn.Module,
    output_path: Path,
    name: str,
    formats: list[str],
    state: Mapping[str, torch.Tensor] | None = None,
    metadata: Mapping[str, str] | None = None,
    task: Any = None,
) -> list[Path]:
    """`<name>.safetensors` in our format (first of `formats`), plus `<name>.<format>.safetensors` for the rest
    (the matrices from `state` when given, see `lora_weights`), each with `metadata` in its header. A task with
    `lora_layout(format, weights)` gives each file's names and key prefix (FLUX.1: its `peft` file in diffusers'
    names under `transformer.`); otherwise every file has our names."""
    from diffsynth.runtime.lora import save_lora

    weights = lora_weights(model, state)
    layout = getattr(task, "lora_layout", None)
    written = []
    for i, fmt in enumerate(formats):
        path = output_path / (f"{name}.safetensors" if i == 0 else f"{name}.{fmt}.safetensors")
        lora, prefix = layout(fmt, weights) if callable(layout) else (weights, None)
        save_lora(lora, path, format=fmt, prefix=prefix, metadata=metadata)
        written.append(path)
    return written


def save_full_weights(
    weights: nn.Module | Mapping[str, torch.Tensor],
    folder: Path,
    dtype: torch.dtype,
    source_files: list[str] | None = None,
) -> Path:
    """`folder/diffusion_pytorch_model.safetensors` with a module's state dict (or the given full state) in
    `dtype`, plus the `config.json` that was beside the loaded weights, written atomically."""
    from diffsynth.runtime.checkpoint import save_safetensors

    folder.mkdir(parents=True, exist_ok=True)
    items = weights.state_dict().items() if isinstance(weights, nn.Module) else weights.items()
    state = {k: (v.to(dtype) if v.is_floating_point() else v).detach().cpu().contiguous() for k, v in items}
    path = folder / "diffusion_pytorch_model.safetensors"
    save_safetensors(state, path, metadata={"format": "pt"})
    for source in source_files or []:
        source = Path(source)
        config = (source if source.is_dir() else source.parent) / "config.json"
        if config.is_file():
            shutil.copyfile(config, folder / "config.json")
            break
    logger.info("saved %d tensors to %s", len(state), path)
    return path


__all__ = [
    "CHECKPOINTS",
    "find_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "lora_weights",
    "prune_checkpoints",
    "read_auxiliary",
    "refuse_older_run",
    "rng_state",
    "save_checkpoint",
    "save_full_weights",
    "save_lora_files",
    "set_aside_later",
    "set_rng_state",
    "step_name",
    "write_auxiliary",
]
