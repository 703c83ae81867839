"""`--offload_models`: frozen models that never sit on the GPU whole; their blocks stream from CPU memory.

The named models are loaded and left in CPU memory (`kept_on_host` around the task's loading: the pipeline's
placement skips them), so a base larger than the GPU can be trained under a LoRA. The LoRA goes into the real CPU
weights (peft builds its layers beside the base weight; a DoRA reads the base rows), and only then does the VRAM
manager take each model (`trainer.stream_from_cpu`): the frozen block weights stay in (pinned) CPU memory and are copied to
the device as the blocks run, forward and backward; what must live on the device (the trainable parameters, the
parameters and buffers outside the blocks) moves there; `--offload_vram_limit` GiB of blocks stay resident. The
trainer then prepares the denoiser without accelerate's device placement, which would move it whole.

One process only, like DiffSynth-Studio's CPU offload training: DDP needs every parameter on one device type and
broadcasts the whole module state when it starts, and FSDP / DeepSpeed place and shard the weights themselves.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager

from torch import nn

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.training_support import models_kept_on_host

from .config import TrainConfig
from .distributed import distributed_kind

logger = logging.getLogger(__name__)


def check_processes(cfg: TrainConfig, acc) -> None:
    """Refuse `--offload_models` outside a single process (see the module docstring)."""
    if not cfg.offload_models:
        return
    kind = distributed_kind(acc)
    if acc.num_processes > 1 or kind in ("FSDP", "DEEPSPEED"):
        raise ConfigError(
            f"--offload_models {','.join(cfg.offload_models)}: streaming a model from CPU memory trains in one "
            f"process only; this run has {acc.num_processes} processes ({kind}). Train in one process, or drop "
            "--offload_models and shard the base with FSDP2 / DeepSpeed ZeRO-3 (or store it with --fp8_models)"
        )


def kept_on_host(cfg: TrainConfig) -> AbstractContextManager:
    """Load a task inside this: the `--offload_models` models stay in CPU memory as loaded."""
    return models_kept_on_host(cfg.offload_models)


def to_device(device, *copies: nn.Module | None) -> None:
    """Copies made of an offloaded denoiser while it was in CPU memory (DMD2's fake score, a frozen teacher) run
    on `device` whole, as they do when the denoiser is resident."""
    for copy in copies:
        if copy is not None:
            copy.to(device)


__all__ = ["check_processes", "kept_on_host", "to_device"]
