"""Which units stay resident on the compute device under `vram_limit`, from known sizes only.

A model declares its units (`offload_units`: dotted paths; a ModuleList or Sequential path means each child is a
unit) and may declare the working memory its forward needs (`vram_activation_gib`, default
`DEFAULT_ACTIVATION_GIB`). The plan subtracts from the budget what is always on the device while
the model runs (parameters outside units, buffers, activations, and the device buffers of the
units in flight when anything is streamed) and makes resident as many unit bytes as fit. Resident units
are spread evenly through the execution order rather than taken as a prefix: every streamed
unit then has resident units before it whose compute hides its transfer.
Nothing here polls free memory: the same model and limit always give the same plan.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from ..errors import ConfigError

logger = logging.getLogger(__name__)

GIB = 1024**3
DEFAULT_ACTIVATION_GIB = 1.0  # working memory of a forward when the model does not declare it
IN_FLIGHT = 2  # streamed units whose device copies may exist at once (computing + prefetching)
# Device buffers the plan reserves: the two in flight, plus the one just released, whose memory the
# CUDA caching allocator hands out again only once the compute that used it has finished.
BUFFERS = IN_FLIGHT + 1


def find_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(dotted name, module) of each unit `model.offload_units` declares, in declaration order."""
    declared = getattr(model, "offload_units", ())
    if isinstance(declared, str) or not all(isinstance(p, str) for p in declared):
        raise ConfigError(
            f"{type(model).__name__}.offload_units must be a tuple of dotted module paths, got {declared!r}"
        )
    units: list[tuple[str, nn.Module]] = []
    for path in declared:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise ConfigError(
                f"{type(model).__name__}.offload_units names {path!r}, which is not a submodule of the model"
            ) from None
        if isinstance(module, (nn.ModuleList, nn.Sequential)):  # containers whose children run one by one
            units += [(f"{path}.{i}", child) for i, child in enumerate(module)]
        else:
            units.append((path, module))
    names = [n for n, _ in units]
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            if a == b or b.startswith(a + ".") or a.startswith(b + "."):
                raise ConfigError(
                    f"{type(model).__name__}.offload_units overlap: {a!r} and {b!r} (a unit may not contain another)"
                )
    return units


def activation_bytes(model: nn.Module) -> int:
    gib = getattr(model, "vram_activation_gib", DEFAULT_ACTIVATION_GIB)
    if not isinstance(gib, (int, float)) or isinstance(gib, bool) or gib < 0:
        raise ConfigError(f"{type(model).__name__}.vram_activation_gib must be a non-negative number, got {gib!r}")
    return int(gib * GIB)


@dataclass(frozen=True)
class UnitSize:
    """Bytes of one unit: on the device when resident, and while in flight when streamed.

    `held`: its onload store's bytes, what a streamed unit keeps off the device and moves each forward
    (None: the same as `resident`). `converted`: the device copies a resident unit makes each forward
    when its preparing dtype is not what the forward sees (e.g. fp8 dequantised to bf16); 0 when plain.
    """

    name: str
    resident: int
    in_flight: int
    held: int | None = None
    converted: int = 0

    @property
    def held_bytes(self) -> int:
        return self.resident if self.held is None else self.held


@dataclass(frozen=True)
class Plan:
    """The outcome: which units are resident, which streamed, and the arithmetic behind it."""

    resident: tuple[str, ...]
    streamed: tuple[str, ...]
    budget: int | None  # bytes; None = no limit
    fixed: int  # always on the device while the model runs (non-unit params, buffers, activations)
    buffers: int  # device memory of the units in flight (0 when nothing is streamed or converted per forward)
    resident_bytes: int
    streamed_bytes: int  # onload-store bytes of the streamed units (held off the device, moved each forward)

    @property
    def peak(self) -> int:
        """Planned device bytes while the model runs."""
        return self.fixed + self.buffers + self.resident_bytes

    @property
    def fits(self) -> bool:
        return self.budget is None or self.peak <= self.budget

    def describe(self) -> str:
        limit = "no limit" if self.budget is None else f"limit {self.budget / GIB:.2f} GiB"
        return (
            f"{len(self.resident)} resident units ({self.resident_bytes / GIB:.2f} GiB), {len(self.streamed)} "
            f"streamed ({self.streamed_bytes / GIB:.2f} GiB); fixed {self.fixed / GIB:.2f} GiB, buffers "
            f"{self.buffers / GIB:.2f} GiB, planned peak {self.peak / GIB:.2f} GiB ({limit})"
        )


def make_plan(units: Sequence[UnitSize], fixed: int, budget: int | None) -> Plan:
    """Resident units spread evenly in `units` order so their bytes fit `budget - fixed - buffers`.

    Resident units whose weights are converted per forward (`converted`) have device copies in flight
    too, so everything resident still reserves `BUFFERS` of the largest such copy.
    `budget` None keeps everything resident. When even the fixed part and the buffers exceed the
    budget, every unit is streamed and the plan says it does not fit (the model still runs).
    """
    total = sum(u.resident for u in units)
    converted = BUFFERS * max((u.converted for u in units), default=0)
    if budget is None:
        return Plan(tuple(u.name for u in units), (), None, fixed, converted, total, 0)
    if fixed + converted + total <= budget:
        return Plan(tuple(u.name for u in units), (), budget, fixed, converted, total, 0)
    buffers = max(converted, BUFFERS * max((u.in_flight for u in units), default=0))
    room = max(0, budget - fixed - buffers)
    # credit in units of 1/total byte, in integers: a float share loses the last block of an exact fit
    resident, streamed, credit = [], [], 0
    for u in units:
        credit += room * u.resident
        if u.resident and credit >= u.resident * total:
            resident.append(u)
            credit -= u.resident * total
        else:
            streamed.append(u)
    plan = Plan(
        tuple(u.name for u in resident),
        tuple(u.name for u in streamed),
        budget,
        fixed,
        buffers if streamed else converted,
        sum(u.resident for u in resident),
        sum(u.held_bytes for u in streamed),
    )
    if not plan.fits:
        logger.warning(
            "vram_limit %.2f GiB is below what the model needs with every unit streamed (%.2f GiB); "
            "running anyway, above the limit",
            budget / GIB,
            plan.peak / GIB,
        )
    return plan


__all__ = [
    "BUFFERS",
    "DEFAULT_ACTIVATION_GIB",
    "GIB",
    "IN_FLIGHT",
    "Plan",
    "UnitSize",
    "activation_bytes",
    "find_units",
    "make_plan",
]
