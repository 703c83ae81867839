"""`--lora_checkpoint FILE` (DiffSynth-Studio's name): start the LoRA from a LoRA file instead of peft's
initialisation (B = 0), e.g. to go on training a LoRA made elsewhere, or to distil a fine-tuned LoRA further
(`--task trajectory_imitation`). Not `--resume`: the optimizer, the schedule and the data order start afresh.

The file is read in any layout the family's pipeline reads (`pipe.read_lora`: peft / diffusers, kohya, ours, the
family's own key names) and resolved against the denoiser before the trainer injects its LoRA layers; each target's
`down` / `up` then become the layer's `lora_A` / `lora_B`, with `up` rescaled from the file's alpha / rank to the
run's `--lora_alpha` / `--lora_rank`, so the model starts out computing exactly what the pipeline computes with the
file loaded."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn

from diffsynth.runtime.errors import ConfigError, LoRAError, preview
from diffsynth.runtime.lora import LoRATarget, resolve_lora

logger = logging.getLogger(__name__)


def read_lora_checkpoint(task, module: nn.Module, path: str) -> dict[str, LoRATarget]:
    """The LoRA at `path` as targets named like `module`'s Linears (call before the LoRA layers are injected)."""
    try:
        lora = task.pipe.read_lora(path, task.denoiser_slot) if hasattr(task, "pipe") else None
        if lora is None:
            from diffsynth.runtime.lora import read_lora

            lora = read_lora(path)
        resolved = resolve_lora(module, lora)
    except (LoRAError, OSError) as exc:
        raise ConfigError(f"--lora_checkpoint {path}: {exc}") from None
    bad = [
        name
        for name, t in resolved.targets.items()
        if t.down is None or t.diff is not None or t.diff_b is not None or t.magnitude is not None
    ]
    if bad:
        raise ConfigError(
            f"--lora_checkpoint {path}: {preview(bad, 5)} hold full weight differences (diff / diff_b), LyCORIS "
            "factors (LoHa, LoKr) or a DoRA magnitude, which a LoRA layer cannot start from; give a LoRA of down/up "
            "matrices"
        )
    return dict(resolved.targets)


@torch.no_grad()
def load_into_lora_layers(module: nn.Module, targets: Mapping[str, LoRATarget], rank: int, alpha: float, path: str):
    """Set the injected peft LoRA layers of `module` to `targets` (see the module docstring). Every target must
    be a layer the run trains (`--lora_target_modules`) and have the run's rank."""
    layers = {name: m for name, m in module.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    missing = sorted(set(targets) - set(layers))
    if missing:
        raise ConfigError(
            f"--lora_checkpoint {path}: {len(missing)} of its layers are not trained by this run "
            f"({preview(missing, 5)}); add them to --lora_target_modules"
        )
    ranks = sorted({t.rank for t in targets.values()})
    if ranks != [rank]:
        raise ConfigError(f"--lora_checkpoint {path} has rank {ranks}; train with --lora_rank {ranks[0]}")
    scale = alpha / rank  # peft's: delta W = (lora_alpha / r) * B @ A
    for name, target in targets.items():
        layer = layers[name]
        down, up = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        down.copy_(target.down.to(down))
        up.copy_((target.up.float() * (target.factor / scale)).to(up))
    untouched = len(layers) - len(targets)
    logger.info(
        "--lora_checkpoint %s: %d LoRA layers start from the file%s",
        path,
        len(targets),
        f", {untouched} from zero (not in the file)" if untouched else "",
    )


__all__ = ["load_into_lora_layers", "read_lora_checkpoint"]
