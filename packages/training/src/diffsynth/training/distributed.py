"""Multi-process training: which accelerate modes the trainer runs, and the state that must be gathered
before it is written.

DDP keeps a full copy of the model on every process. FSDP2 (`fully_shard`, accelerate's `fsdp_version: 2`)
splits every parameter, its gradient and its optimizer state over the processes, so the frozen base of a
large model and (for full fine-tuning) its Adam moments take 1/N of the memory on each GPU. Sharded tensors are
DTensors: the trainer reads and writes weights and optimizer state through torch's `distributed.checkpoint`
state-dict functions, which gather full tensors to process 0 (on the CPU) and slice them back when resuming,
so a checkpoint holds the same files whatever the mode and can be resumed under another one.

Each declared offload unit of the denoiser (its transformer blocks) becomes one FSDP group unless the
accelerate config names `fsdp_transformer_layer_cls_to_wrap` itself. The accelerate configs ship in
`accelerate_configs/`; `python -m diffsynth.training.distributed fsdp2` prints the path of one.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffsynth.runtime.errors import ConfigError

logger = logging.getLogger(__name__)

CONFIG_FOLDER = Path(__file__).with_name("accelerate_configs")
FSDP_CONFIGS = "fsdp2.yaml, fsdp2_shard_grad_op.yaml; `python -m diffsynth.training.distributed NAME` prints the path"


def accelerate_config(name: str) -> Path:
    """The path of a shipped accelerate config (`fsdp2`, `fsdp2_shard_grad_op`), for `accelerate launch
    --config_file`."""
    path = CONFIG_FOLDER / f"{name.removesuffix('.yaml')}.yaml"
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in CONFIG_FOLDER.glob("*.yaml")))
        raise ConfigError(f"no shipped accelerate config {name!r}; shipped: {shipped}")
    return path


def distributed_kind(acc) -> str:
    """The accelerate mode a run uses: NO, MULTI_CPU, MULTI_GPU (DDP), FSDP, DEEPSPEED, ..."""
    return str(acc.distributed_type).rsplit(".", 1)[-1]


def is_sharded(acc) -> bool:
    return distributed_kind(acc) == "FSDP"


def check_mode(acc) -> None:
    """Refuse the accelerate modes whose state the trainer cannot save and resume."""
    kind = distributed_kind(acc)
    if kind == "FSDP" and getattr(getattr(acc.state, "fsdp_plugin", None), "fsdp_version", 1) != 2:
        raise ConfigError(
            "accelerate is configured for FSDP version 1; the trainer runs FSDP2 (fully_shard): set "
            f"fsdp_version: 2 in the accelerate config (shipped: {FSDP_CONFIGS})"
        )
    if kind == "DEEPSPEED":
        raise ConfigError(
            "accelerate is configured for DeepSpeed, which the trainer does not run; use FSDP2 for sharded "
            f"training (full sharding is ZeRO-3, fsdp_reshard_after_forward false is ZeRO-2; shipped: "
            f"{FSDP_CONFIGS}) or DDP"
        )
    if kind not in ("NO", "MULTI_CPU", "MULTI_GPU", "FSDP"):
        raise ConfigError(f"accelerate is configured for {kind}; the trainer runs single-process, DDP or FSDP2")


def configure_fsdp(acc, module: nn.Module) -> None:
    """Before `prepare`: shard each of the module's offload units (its blocks) as one FSDP group, unless the
    accelerate config names the classes to wrap."""
    plugin = acc.state.fsdp_plugin
    if getattr(plugin, "transformer_cls_names_to_wrap", None):
        return
    from diffsynth.runtime.vram.plan import find_units

    names = sorted({type(unit).__name__ for _, unit in find_units(module)})
    if not names:
        raise ConfigError(
            f"FSDP: {type(module).__name__} declares no offload_units to shard; name its block classes with "
            "fsdp_transformer_layer_cls_to_wrap in the accelerate config"
        )
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    plugin.auto_wrap_policy = transformer_auto_wrap_policy
    plugin.transformer_cls_names_to_wrap = names
    logger.info("FSDP: one group per %s", ", ".join(names))


def _options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kwargs)


def full_state(module: nn.Module, *, trainable_only: bool) -> dict[str, torch.Tensor]:
    """The module's weights as full CPU tensors (only the trainable ones with `trainable_only`). Every process
    must call it; under FSDP process 0 gets the tensors and the others an empty dict."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(
        module, options=_options(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    )
    if trainable_only:  # buffers are never trained
        names = {name for name, p in module.named_parameters() if p.requires_grad}
        state = {k: v for k, v in state.items() if k in names}
    return {k: v.detach() for k, v in state.items()}


def full_optimizer_state(module: nn.Module, optimizer) -> dict[str, Any]:
    """The optimizer's state keyed by parameter name, full tensors on the CPU (process 0 under FSDP)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimizer, options=_options(full_state_dict=True, cpu_offload=True))


def load_trainable(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy full tensors into the module's trainable weights (each process keeps its own shard under FSDP)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(module, state, options=_options(full_state_dict=True, strict=False))


def load_optimizer(module: nn.Module, optimizer, state: dict[str, Any]) -> None:
    """Restore what `full_optimizer_state` gave. Checkpoints written before it keyed the state by parameter
    index (`optimizer.state_dict()`): those load as they are."""
    if all(isinstance(k, int) for k in state.get("state", {})):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    # strict=False: a parameter that never got a gradient (an unused pad token) has no Adam state yet
    set_optimizer_state_dict(module, optimizer, state, options=_options(full_state_dict=True, strict=False))


__all__ = [
    "accelerate_config",
    "check_mode",
    "configure_fsdp",
    "distributed_kind",
    "full_optimizer_state",
    "full_state",
    "is_sharded",
    "load_optimizer",
    "load_trainable",
]


def main(argv: list[str] | None = None) -> int:
    """`python -m diffsynth.training.distributed NAME`: print the path of a shipped accelerate config."""
    names = sys.argv[1:] if argv is None else argv
    try:
        for name in names or ["fsdp2"]:
            print(accelerate_config(name))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
