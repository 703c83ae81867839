"""`diffsynth lora extract | resize | merge`: the `lora_tools` operations on files, written with `save_lora`."""

from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)


def add_lora_parser(commands) -> None:
    lora = commands.add_parser("lora", help="make LoRA files: extract one from a fine-tune, resize, merge")
    actions = lora.add_subparsers(dest="lora_command", required=True, metavar="ACTION")

    def common(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--output", "-o", required=True, help="the .safetensors file to write")
        parser.add_argument(
            "--format", default="diffsynth", help="key layout: diffsynth (default), peft (ComfyUI names) or kohya"
        )

    ext = actions.add_parser("extract", help="a LoRA of a fine-tune's weight differences from its base (SVD)")
    ext.add_argument("base", help="the base checkpoint (file, shards' index or folder)")
    ext.add_argument("tuned", help="the fine-tuned checkpoint, in the same layout")
    ext.add_argument("--rank", type=int, required=True, help="rank of every extracted layer")
    ext.add_argument("--threshold", type=float, default=0.0, help="skip layers that changed by at most this much")
    ext.add_argument("--device", default="cpu", help="where the SVDs run (cuda is much faster for large models)")
    common(ext)

    res = actions.add_parser("resize", help="a LoRA (any kind) as a plain LoRA of another rank (SVD)")
    res.add_argument("lora", help="the LoRA file")
    res.add_argument("--rank", type=int, required=True, help="the new rank")
    common(res)

    mer = actions.add_parser("merge", help="several LoRAs as one, each at its scale (FILE[:SCALE])")
    mer.add_argument("loras", nargs="+", metavar="FILE[:SCALE]", help="LoRA files, with an optional scale each")
    mer.add_argument("--rank", type=int, default=None, help="cut the merged change to this rank (default: exact)")
    common(mer)


def run_lora(args) -> int:
    from .cli import path_and_scale
    from .lora import save_lora
    from .lora_tools import extract_lora, merge_loras, resize_lora

    if args.lora_command == "extract":
        lora = extract_lora(args.base, args.tuned, args.rank, threshold=args.threshold, device=args.device)
    elif args.lora_command == "resize":
        lora = resize_lora(args.lora, args.rank)
    else:
        lora = merge_loras([path_and_scale(spec) for spec in args.loras], rank=args.rank)
    save_lora(lora, args.output, format=args.format)
    logger.info("wrote %s (%d layers)", args.output, len(lora))
    return 0
