"""Multi-process training: which accelerate modes the trainer runs, and the state that must be gathered
before it is written.

DDP keeps a full copy of the model on every process. FSDP2 (`fully_shard`, accelerate's `fsdp_version: 2`)
splits every parameter, its gradient and its optimizer state over the processes, so the frozen base of a
large model and (for full fine-tuning) its Adam moments take 1/N of the memory on each GPU. Sharded tensors are
DTensors: the trainer reads and writes weights and optimizer state through torch's `distributed.checkpoint`
state-dict functions, which gather full tensors to process 0 (on the CPU) and slice them back when resuming,
so a checkpoint holds the same files whatever the mode and can be resumed under another one.

DeepSpeed ZeRO (accelerate's `distributed_type: DEEPSPEED`) partitions the optimizer state (stage 1), the
gradients (2) and the weights (3) over the processes. The trainer's flags own what DeepSpeed's config also says
(`--batch_size`, `--gradient_accumulation_steps`, `--max_grad_norm`, `--mixed_precision`), so the same run
config trains the same way in every mode. DeepSpeed keeps fp32 master copies of the trained weights inside its
optimizer; its own `save_checkpoint` writes them with the optimizer partitions (one file per process) into the
resume checkpoint's `deepspeed/` folder, beside the gathered weights the trainer exports, and only a DeepSpeed
run with the same stage and number of processes resumes it. Under ZeRO-3 the weights are gathered one parameter
at a time when they are written.

Each declared offload unit of the denoiser (its transformer blocks) becomes one FSDP group unless the
accelerate config names `fsdp_transformer_layer_cls_to_wrap` itself. The accelerate configs ship in
`accelerate_configs/`; `python -m diffsynth.training.distributed fsdp2` prints the path of one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffsynth.runtime.errors import ConfigError

logger = logging.getLogger(__name__)

CONFIG_FOLDER = Path(__file__).with_name("accelerate_configs")
FSDP_CONFIGS = "fsdp2.yaml, fsdp2_shard_grad_op.yaml; `python -m diffsynth.training.distributed NAME` prints the path"
DEEPSPEED_FOLDER = "deepspeed"  # in a resume checkpoint: DeepSpeed's own files (master weights, optimizer)
_DEEPSPEED_TAG = "state"


def accelerate_config(name: str) -> Path:
    """The path of a shipped accelerate config (`fsdp2`, `fsdp2_shard_grad_op`, `deepspeed_zero2`,
    `deepspeed_zero3`), for `accelerate launch --config_file`."""
    path = CONFIG_FOLDER / f"{name.removesuffix('.yaml')}.yaml"
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in CONFIG_FOLDER.glob("*.yaml")))
        raise ConfigError(f"no shipped accelerate config {name!r}; shipped: {shipped}")
    return path


def distributed_kind(acc) -> str:
    """The accelerate mode a run uses: NO, MULTI_CPU, MULTI_GPU (DDP), FSDP, DEEPSPEED, ..."""
    return str(acc.distributed_type).rsplit(".", 1)[-1]


def is_deepspeed(acc) -> bool:
    return distributed_kind(acc) == "DEEPSPEED"


def zero_stage(acc) -> int:
    """The DeepSpeed ZeRO stage of a DeepSpeed run (0 when it is not one)."""
    if not is_deepspeed(acc):
        return 0
    return int(acc.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


def is_sharded(acc) -> bool:
    """Whether the weights themselves are split over the processes (FSDP2, ZeRO-3): then every process must
    take part in a forward pass, validation samples included."""
    return distributed_kind(acc) == "FSDP" or zero_stage(acc) == 3


def _check_fsdp_version(plugin) -> None:
    """The trainer runs FSDP2 only. accelerate before 1.6 has no `fsdp_version` (it reads the config's as FSDP1):
    there upgrading is the fix, not the config."""
    if plugin is not None and not hasattr(plugin, "fsdp_version"):
        import accelerate

        raise ConfigError(
            f"FSDP2 needs accelerate>=1.6 (installed {accelerate.__version__}): pip install -U accelerate"
        )
    if getattr(plugin, "fsdp_version", 1) != 2:
        raise ConfigError(
            "accelerate is configured for FSDP version 1; the trainer runs FSDP2 (fully_shard): set "
            f"fsdp_version: 2 in the accelerate config (shipped: {FSDP_CONFIGS})"
        )


def check_mode(acc) -> None:
    """Refuse the accelerate modes whose state the trainer cannot save and resume, and a launch configured for
    FSDP or DeepSpeed that accelerate runs as another mode without CUDA (plain DDP on the CPU: not what was asked)."""
    kind = distributed_kind(acc)
    for variable, wanted in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DEEPSPEED")):
        if _env_flag(variable) and kind != wanted and not torch.cuda.is_available():
            raise ConfigError(
                f"the accelerate config asks for {wanted} ({variable}), but accelerate runs this as {kind}: "
                f"{wanted} needs GPUs (CUDA); launch it on GPUs, or without that config for DDP"
            )
    if kind == "FSDP":
        _check_fsdp_version(getattr(acc.state, "fsdp_plugin", None))
    if kind == "DEEPSPEED":
        zero = acc.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
        offloaded = [
            f"{part}_device {zero[part].get('device')}"
            for part in ("offload_optimizer", "offload_param")
            if isinstance(zero.get(part), dict) and zero[part].get("device") not in (None, "none")
        ]
        if offloaded:
            raise ConfigError(
                f"the DeepSpeed config offloads to the CPU ({', '.join(offloaded)}), which needs DeepSpeed's own "
                "CPU Adam; the trainer offloads the frozen base with --fp8_models and activations with "
                "--use_gradient_checkpointing_offload instead: set the offload devices to none"
            )
    if kind not in ("NO", "MULTI_CPU", "MULTI_GPU", "FSDP", "DEEPSPEED"):
        raise ConfigError(
            f"accelerate is configured for {kind}; the trainer runs single-process, DDP, FSDP2 or DeepSpeed"
        )


def _env_flag(name: str) -> bool:
    """An environment switch as accelerate reads them (true, 1, yes, on)."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "t", "yes", "y", "on")


def configure_deepspeed(acc, cfg) -> None:
    """Before `prepare`: DeepSpeed's batch size, accumulation and clipping from the trainer's flags (which
    DeepSpeed must know: it checks the global batch and clips inside its optimizer step). A config file that says
    otherwise is overruled, with a warning naming both values."""
    config = acc.state.deepspeed_plugin.deepspeed_config
    wanted = {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "train_batch_size": cfg.batch_size * cfg.gradient_accumulation_steps * acc.num_processes,
        "gradient_clipping": float(cfg.max_grad_norm),
    }
    for key, value in wanted.items():
        given = config.get(key, "auto")
        if given not in ("auto", value):
            logger.warning("DeepSpeed config: %s %s overruled by the trainer's flags: %s", key, given, value)
        config[key] = value
    logger.info("DeepSpeed ZeRO stage %d", zero_stage(acc))


@contextlib.contextmanager
def loading_whole_models(acc):
    """Load the task's models whole under ZeRO-3 too. accelerate registers its DeepSpeed config with
    transformers, which then builds its models (the families' text encoders) for `deepspeed.zero.Init`
    partitioning and fails on our meta-device build; the trainer loads whole models and DeepSpeed partitions the
    denoiser at `prepare` (the shipped configs' `zero3_init_flag: false`), so the registration is lifted while
    the task loads."""
    if zero_stage(acc) != 3:
        yield
        return
    try:
        from transformers.integrations import unset_hf_deepspeed_config
    except ImportError:  # nothing registered without transformers
        yield
        return
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        acc.state.deepspeed_plugin.set_deepspeed_weakref()


def deepspeed_backward(acc, loss: torch.Tensor, *, last: bool) -> None:
    """One micro-batch's backward pass under DeepSpeed; the last of an accumulation group also takes the
    optimizer step (with DeepSpeed's clipping). The loss is already divided by the group's length."""
    acc.deepspeed_engine_wrapped.backward(loss, sync_gradients=last, scale_wrt_gas=False)


def save_deepspeed_state(acc, folder: Path) -> None:
    """Every process: DeepSpeed's master weights and optimizer partitions into `folder` (the trained weights
    only; the frozen base is not written)."""
    engine = acc.deepspeed_engine_wrapped.engine
    engine.save_checkpoint(str(folder), tag=_DEEPSPEED_TAG, save_latest=False, exclude_frozen_parameters=True)


def load_deepspeed_state(acc, folder: Path) -> None:
    """Every process: restore what `save_deepspeed_state` wrote (the trained weights from the fp32 masters)."""
    engine = acc.deepspeed_engine_wrapped.engine
    path, _ = engine.load_checkpoint(
        str(folder), tag=_DEEPSPEED_TAG, load_module_strict=False, load_lr_scheduler_states=False
    )
    if path is None:
        raise ConfigError(f"--resume: DeepSpeed could not read its state in {folder}")


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


class PreparedDenoiser:
    """The denoiser as a family's per-step call sees it: calling it runs the prepared wrapper (DDP's gradient
    reduction, DeepSpeed's engine), while its attributes (`config`, blocks, parameters) are the model's own,
    which those wrappers do not pass through (Qwen-Image's call reads `dit.config.patch_size`)."""

    def __init__(self, prepared: nn.Module, module: nn.Module):
        self._prepared, self._module = prepared, module

    def __call__(self, *args, **kwargs):
        return self._prepared(*args, **kwargs)

    @property
    def prepared(self) -> nn.Module:
        """The wrapper that runs the call (DDP, DeepSpeed's engine), e.g. for a task to read DDP's settings."""
        return self._prepared

    def __getattr__(self, name: str):
        return getattr(self._module, name)


def _options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kwargs)


def _zero3_parameters(module: nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in module.parameters())


def _gathered_zero3_state(module: nn.Module, *, trainable_only: bool) -> dict[str, torch.Tensor]:
    """ZeRO-3: each parameter gathered from its partitions in turn (one full tensor on the device at a time);
    process 0 keeps the CPU copies, the others get an empty dict."""
    import deepspeed

    keep = torch.distributed.get_rank() == 0
    state = {}
    for name, param in module.named_parameters():
        if trainable_only and not param.requires_grad:
            continue
        with deepspeed.zero.GatheredParameters([param]):
            if keep:
                state[name] = param.detach().cpu().clone()
    if keep and not trainable_only:
        state.update({name: b.detach().cpu().clone() for name, b in module.named_buffers()})
    return state


def parameter_shape(param: torch.Tensor) -> torch.Size:
    """A parameter's full shape, also when ZeRO-3 holds only a partition of it."""
    return getattr(param, "ds_shape", param.shape)


def full_state(module: nn.Module, *, trainable_only: bool) -> dict[str, torch.Tensor]:
    """The module's weights as full CPU tensors (only the trainable ones with `trainable_only`). Every process
    must call it; under FSDP process 0 gets the tensors and the others an empty dict."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    if _zero3_parameters(module):
        return _gathered_zero3_state(module, trainable_only=trainable_only)

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


def load_trainable(module: nn.Module, state: dict[str, torch.Tensor], *, sharded: bool) -> None:
    """Copy full tensors into the module's trainable weights (each process keeps its own shard under FSDP)."""
    if not sharded:
        _copy_into_parameters(module, state)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(module, state, options=_options(full_state_dict=True, strict=False))


def _copy_into_parameters(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy in place, so the optimizer, the EMA and the run's table of trained weights keep the parameters they
    hold: torch's `set_model_state_dict` assigns new ones when some weights are meta placeholders (the frozen
    blocks the VRAM manager streams under --offload_models / --fp8_models)."""
    params = {_state_dict_name(name): p for name, p in module.named_parameters()}
    unknown = sorted(set(state) - set(params))
    if unknown:
        raise ConfigError(f"the checkpoint holds weights the model lacks: {', '.join(unknown[:5])}")
    with torch.no_grad():
        for name, value in state.items():
            param = params[name]
            if param.shape != value.shape:
                raise ConfigError(
                    f"the checkpoint's {name} has shape {tuple(value.shape)}, the model's {tuple(param.shape)}"
                )
            param.copy_(value)


def load_optimizer(module: nn.Module, optimizer, state: dict[str, Any]) -> None:
    """Restore what `full_optimizer_state` gave. Checkpoints written before it keyed the state by parameter
    index (`optimizer.state_dict()`): those load as they are."""
    if all(isinstance(k, int) for k in state.get("state", {})):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    # strict=False: a parameter that never got a gradient (an unused pad token) has no Adam state yet
    try:
        set_optimizer_state_dict(module, optimizer, state, options=_options(full_state_dict=True, strict=False))
    except KeyError:  # group settings an optimizer adds at its first step (Prodigy's d_denom), unknown before it
        optimizer.load_state_dict(_by_index(module, optimizer, state))
        return
    _forget_unsaved_state(module, optimizer, state)


def _forget_unsaved_state(module: nn.Module, optimizer, state: dict[str, Any]) -> None:
    """torch's `set_optimizer_state_dict` first gives every parameter a state (a step with zero gradients), then
    overwrites the saved ones: a parameter that had no state when saved (no gradient yet: a layer a module dropout
    left out, an unused token) would resume with one more Adam step counted than the run it continues. Drop those."""
    saved = set(state.get("state", {}))
    named = {_state_dict_name(name): p for name, p in module.named_parameters() if p.requires_grad}
    if not saved & named.keys():  # names that do not line up (a wrapper we do not know): leave the state alone
        return
    for name, param in named.items():
        if name not in saved:
            optimizer.state.pop(param, None)


def _state_dict_name(name: str) -> str:
    """A parameter's name as torch's distributed state dicts write it (without the wrappers' path segments)."""
    for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(wrapper, "")
    return name


def _by_index(module: nn.Module, optimizer, state: dict[str, Any]) -> dict[str, Any]:
    """A name-keyed optimizer state (one process's, unsharded) keyed by parameter index, as
    `optimizer.load_state_dict` takes it."""
    names = {id(p): n for n, p in module.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    index = {name: i for i, name in enumerate(order)}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]
    return {"state": {index[n]: v for n, v in state["state"].items()}, "param_groups": groups}


__all__ = [
    "DEEPSPEED_FOLDER",
    "PreparedDenoiser",
    "accelerate_config",
    "check_mode",
    "configure_deepspeed",
    "configure_fsdp",
    "deepspeed_backward",
    "distributed_kind",
    "full_optimizer_state",
    "full_state",
    "is_deepspeed",
    "is_sharded",
    "load_deepspeed_state",
    "loading_whole_models",
    "load_optimizer",
    "load_trainable",
    "parameter_shape",
    "save_deepspeed_state",
    "zero_stage",
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
