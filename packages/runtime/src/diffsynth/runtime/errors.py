"""Error types: every message names the file, key, argument or value at fault and what is accepted."""

from __future__ import annotations


class DiffSynthError(Exception):
    """Base class for errors raised on bad user input or unusable files."""


class CheckpointError(DiffSynthError, ValueError):
    """A checkpoint file is missing, truncated, incomplete (shards) or unreadable."""


class UnknownModelError(DiffSynthError, ValueError):
    """No installed model spec recognises a checkpoint."""


class ConfigError(DiffSynthError, ValueError):
    """An argument or config value is not accepted."""


class LoRAError(DiffSynthError, ValueError):
    """A LoRA file cannot be read or does not fit the model it is applied to."""


def preview(items, limit: int = 8) -> str:
    """Show the first `limit` items of a collection, with a count of the rest."""
    items = list(items)
    shown = ", ".join(repr(x) for x in items[:limit])
    if len(items) > limit:
        shown += f", ... ({len(items) - limit} more)"
    return shown or "(none)"
