"""`diffsynth-train`: train a LoRA or fine-tune any installed family from flags or a YAML file.

diffsynth-train --model Tongyi-MAI/Z-Image-Turbo --dataset_base_path data/ --output_path out/
diffsynth-train --config run.yaml --learning_rate 5e-5      # flags override the file
accelerate launch --num_processes 8 -m diffsynth.training.cli --config run.yaml
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

from diffsynth.runtime.errors import DiffSynthError

logger = logging.getLogger("diffsynth.training")


def main(argv: Sequence[str] | None = None) -> int:
    from .config import parse_args

    try:
        config, args = parse_args(argv)
    except DiffSynthError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    level = logging.DEBUG if args.verbose else logging.INFO
    if int(os.environ.get("RANK", "0")) != 0:  # under accelerate/torchrun only the first process reports progress
        level = logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .trainer import run_stage

    try:
        run_stage(config)
    except DiffSynthError as exc:
        logger.error("%s", exc)
        return 2
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        leave_without_teardown()
    return 0


def leave_without_teardown() -> None:
    """End a finished multi-process run here: every file is written and closed and every rank has passed the
    trainer's last barrier, but tearing the interpreter down can still abort a rank ("terminate called without an
    active exception": gloo's / DeepSpeed's threads destroyed at exit), which launchers report as a failed run."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
