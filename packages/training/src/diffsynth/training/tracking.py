"""`--report_to`: a run's loss, learning rate and validation pictures sent to experiment trackers.

accelerate does the work (its trackers: TensorBoard, Weights & Biases, SwanLab, MLflow, ...); this module checks
the names and the packages before any model loads, starts the trackers with the run's settings as their
hyperparameters, and hands them each logged step and the validation pictures. `OUTPUT/metrics.jsonl` is written
either way; TensorBoard's event files go to `OUTPUT/logs/<--tracker_project_name>/`.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from diffsynth.runtime.errors import ConfigError

logger = logging.getLogger(__name__)

# accelerate's tracker name -> the package it needs (pip name where it differs from the import name)
TRACKER_PACKAGES = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "swanlab": ("swanlab", "swanlab"),
    "mlflow": ("mlflow", "mlflow"),
    "comet_ml": ("comet_ml", "comet-ml"),
    "aim": ("aim", "aim"),
    "clearml": ("clearml", "clearml"),
    "dvclive": ("dvclive", "dvclive"),
    "trackio": ("trackio", "trackio"),
}
LOGS_FOLDER = "logs"


def check_trackers(names: Sequence[str]) -> None:
    """Each `--report_to` name is a tracker accelerate has and its package is installed."""
    for name in names:
        if name not in TRACKER_PACKAGES:
            raise ConfigError(f"--report_to {name!r} is not a tracker; accepted: {', '.join(TRACKER_PACKAGES)}")
        module, pip_name = TRACKER_PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"--report_to {name} needs the {pip_name} package: pip install {pip_name}")


def accelerator_options(names: Sequence[str], output: str | Path) -> dict[str, Any]:
    """`Accelerator(...)` keywords for the trackers (none without `--report_to`)."""
    if not names:
        return {}
    return {"log_with": list(names), "project_dir": str(Path(output) / LOGS_FOLDER)}


def hyperparameters(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The run's settings as trackers take them: numbers, strings and booleans as they are, lists and mappings
    as text, unset ones left out."""
    out: dict[str, Any] = {}
    for name, value in settings.items():
        if value is None:
            continue
        out[name] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return out


def log_pictures(accelerator, pictures: Sequence[Any], step: int) -> None:
    """The validation pictures (PIL images; a video family's samples are skipped) to the trackers that show
    images: TensorBoard (one image per prompt, `validation/K`) and Weights & Biases (a list)."""
    import numpy as np
    from PIL import Image

    images = [p for p in pictures if isinstance(p, Image.Image)]
    if not images:
        return
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            for k, image in enumerate(images):
                array = np.asarray(image.convert("RGB"))[None]
                tracker.log_images({f"validation/{k}": array}, step=step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({"validation": images}, step=step)


__all__ = ["TRACKER_PACKAGES", "accelerator_options", "check_trackers", "hyperparameters", "log_pictures"]
