"""FLUX.1 Kontext in FLUX.1's training task: which model files name a Kontext model (its references' encoding is
the task's own `encode`).

References are sized as DiffSynth-Studio's trainer sizes them: the dataset shrinks each under `--max_pixels`
keeping its aspect ratio (not to the target's size); the pipeline's own Kontext auto-resize is off unless asked.
A Kontext model (a file, folder, hub repo or cached hub snapshot named "Kontext", or `kontext=True`) refuses rows
without references, at setup (`check_row`) and in each batch; rows of one batch must agree on having references
and on their sizes (`--batch_size 1` always does).
"""

from __future__ import annotations

from pathlib import Path

from diffsynth.runtime.hub import ModelConfig


def names_kontext(config: ModelConfig) -> bool:
    """Whether a model config names a Kontext model: its hub repo, or its file or the two folders above it, or the
    repo of a Hugging Face cache snapshot holding it (`models--org--FLUX.1-Kontext-dev/snapshots/<hash>/...`)."""
    names = [config.model_id or "", config.origin_file_pattern or ""]
    for path in [config.path] if isinstance(config.path, str) else list(config.path or ()):
        names += [*Path(path).parts[-3:], *cached_repos(Path(path))]
    return any("kontext" in name.lower() for name in names)


def cached_repos(path: Path) -> list[str]:
    """The repo folders (`models--org--name`) of the Hugging Face cache snapshots a path lies in; folders higher
    up name no model (a user's `kontext-runs/` holding FLUX.1-dev is no Kontext model)."""
    parts = path.parts
    return [
        parts[i - 1] for i in range(1, len(parts)) if parts[i] == "snapshots" and parts[i - 1].startswith("models--")
    ]
