"""The optimizers `--optimizer` names: torch's AdamW (the default), bitsandbytes' 8-bit AdamW (its moments in 8 bits
with blockwise scales: a quarter of AdamW's optimizer memory, the usual choice for full fine-tuning on one GPU),
transformers' Adafactor (factored second moments, no first moment) and Prodigy (a learning rate found by itself;
the `prodigyopt` package). Each is the library's own implementation; this module only builds it from the trainer's
options and says what to install when a library is missing."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from diffsynth.runtime.errors import ConfigError

OPTIMIZERS = ("adamw", "adamw8bit", "adafactor", "prodigy")


def make_optimizer(
    name: str,
    params: Iterable[torch.nn.Parameter],
    lr: float,
    weight_decay: float,
    options: Mapping[str, Any] | None = None,
) -> torch.optim.Optimizer:
    """The optimizer `name` over `params`, with the trainer's learning rate and weight decay; `options`
    (`--optimizer_options betas=0.9:0.99,eps=1e-8`) are passed to its constructor."""
    options = optimizer_arguments(options)
    params = list(params)
    if name == "adamw":
        return _built(torch.optim.AdamW, params, options, lr=lr, weight_decay=weight_decay)
    if name == "adamw8bit":
        bnb = _import("bitsandbytes", "--optimizer adamw8bit", "pip install bitsandbytes")
        return _built(bnb.optim.AdamW8bit, params, options, lr=lr, weight_decay=weight_decay)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        # the trainer's learning rate and schedule, not Adafactor's own relative step size
        defaults = {"relative_step": False, "scale_parameter": False, "warmup_init": False}
        return _built(Adafactor, params, options, defaults, lr=lr, weight_decay=weight_decay)
    if name == "prodigy":
        prodigy = _import("prodigyopt", "--optimizer prodigy", "pip install prodigyopt")
        return _built(prodigy.Prodigy, params, options, lr=lr, weight_decay=weight_decay)
    raise ConfigError(f"--optimizer {name!r} is not known; optimizers: {', '.join(OPTIMIZERS)}")


def optimizer_arguments(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """`--optimizer_options` (parsed by the trainer's config as YAML scalars) as keyword arguments: a text value
    of numbers joined by ':' becomes a tuple (`betas=0.9:0.99`), true/false a bool."""
    return {k: _value(k, v) if isinstance(v, str) else v for k, v in (options or {}).items()}


def _value(key: str, value: str) -> Any:
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    try:
        parts = [_number(v) for v in value.split(":")]
    except ValueError:
        raise ConfigError(
            f"--optimizer_options {key}={value!r}: values are numbers, true/false or a:b tuples"
        ) from None
    return tuple(parts) if len(parts) > 1 else parts[0]


def _number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)


def _built(cls, params, options: dict, defaults: dict | None = None, **given) -> torch.optim.Optimizer:
    try:
        return cls(params, **given, **{**(defaults or {}), **options})
    except (TypeError, ValueError) as exc:  # an option the optimizer does not take, or a value it refuses
        shown = ",".join(f"{k}={':'.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in options.items())
        raise ConfigError(f"--optimizer_options {shown}: {cls.__name__} says {exc}") from None


def check_optimizer(name: str, lr: float, weight_decay: float, options: Mapping[str, Any] | None) -> None:
    """Build the optimizer over one stand-in parameter, so that a bad `--optimizer_options` value is named before
    any model loads."""
    if options:
        make_optimizer(name, [torch.nn.Parameter(torch.zeros(1))], lr, weight_decay, options)


def _import(module: str, what: str, hint: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"{what} needs the {module} package: {hint}") from None


__all__ = ["OPTIMIZERS", "check_optimizer", "make_optimizer", "optimizer_arguments"]
