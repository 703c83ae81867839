"""Which parameters the manager moves: the frozen floating parameters that belong to one unit only.

A parameter shared between units or with the rest of the model (tied weights), one that requires
grad (an adapter being trained) or a non-floating one stays where the model's other parameters
are: resident on the compute device while the model runs. So does everything outside units.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from .plan import find_units

logger = logging.getLogger(__name__)


@dataclass
class UnitParams:
    """The parameters one unit owns: name -> (param, [(owner module, attribute)])."""

    name: str
    module: nn.Module
    params: dict[str, tuple[nn.Parameter, list[tuple[nn.Module, str]]]] = field(default_factory=dict)


@dataclass
class ModelParams:
    """A model split into unit-owned parameters and the resident rest."""

    units: list[UnitParams]
    resident: list[tuple[str, nn.Parameter]]  # parameters that never move within a stage
    buffers: list[tuple[nn.Module, str]]  # every buffer (moves with the model between stages)


def collect(model: nn.Module) -> ModelParams:
    unit_modules = find_units(model)
    prefixes = [(name + ".", i) for i, (name, _) in enumerate(unit_modules)]
    owners: dict[int, list[tuple[int | None, str, nn.Module, str]]] = {}
    params: dict[int, nn.Parameter] = {}
    buffers: list[tuple[nn.Module, str]] = []
    for mod_name, module in model.named_modules(remove_duplicate=False):
        unit = _unit_of(mod_name, prefixes)
        for attr, param in module._parameters.items():
            if param is None:
                continue
            full = f"{mod_name}.{attr}" if mod_name else attr
            owners.setdefault(id(param), []).append((unit, full, module, attr))
            params[id(param)] = param
        for attr, buffer in module._buffers.items():
            if buffer is not None and (module, attr) not in buffers:
                buffers.append((module, attr))
    units = [UnitParams(name, module) for name, module in unit_modules]
    resident: list[tuple[str, nn.Parameter]] = []
    trainable = []
    for key, places in owners.items():
        param = params[key]
        unit_ids = {u for u, *_ in places}
        name = places[0][1]
        movable = len(unit_ids) == 1 and None not in unit_ids and param.is_floating_point()
        if movable and param.requires_grad:
            trainable.append(name)
            movable = False
        if movable:
            units[places[0][0]].params[name] = (param, [(m, a) for _, _, m, a in places])
        else:
            resident.append((name, param))
    if trainable:
        logger.info(
            "%d parameters inside offload units require grad and stay resident (e.g. %s)", len(trainable), trainable[0]
        )
    return ModelParams(units, resident, buffers)


def _unit_of(module_name: str, prefixes: list[tuple[str, int]]) -> int | None:
    probe = module_name + "."
    for prefix, index in prefixes:
        if probe.startswith(prefix):
            return index
    return None


def floating_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the model's first floating, non-fp8 parameter."""
    for p in model.parameters():
        if p.is_floating_point() and p.dtype.itemsize > 1:
            return p.dtype
    return None


def module_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a model's inputs should have (pipelines cast latents and pixels to it): `floating_dtype`, which
    a managed model answers with its compute dtype (outside forward its unit weights are placeholders in that
    dtype, whatever they are stored as), else float32."""
    return floating_dtype(module) or torch.float32


__all__ = ["ModelParams", "UnitParams", "collect", "floating_dtype", "module_dtype"]
