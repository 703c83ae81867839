"""`diffsynth lora extract | resize | merge | convert`: the `lora_tools` operations on files, and a file renamed to
another naming (`lora_convert`), written with `save_lora`.

The written file keeps the input's safetensors header (merged for `merge`, `lora_tools`), its names' prefix
(`transformer.`, `lora_unet_`, ... when all inputs share one that fits `--format`; `--prefix` to choose) and its
dtype (`--dtype` to choose). `--format` and `-o` are checked before any work; an existing `-o` is replaced (with a
warning), and kohya names are written in kohya's layout only (their dots need the family: `convert` first)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

FORMATS = ("diffsynth", "peft", "kohya")  # `lora.SAVE_FORMATS`, spelled here so `--help` imports no torch
DTYPE_NAMES = ("float32", "float16", "bfloat16")  # `lora_tools.DTYPES`


def add_lora_parser(commands) -> None:
    lora = commands.add_parser(
        "lora", help="make LoRA files: extract one from a fine-tune, resize, merge, convert to another naming"
    )
    actions = lora.add_subparsers(dest="lora_command", required=True, metavar="ACTION")

    def common(
        parser: argparse.ArgumentParser,
        default_format: str | None = "diffsynth",
        help_format: str = "",
        *,
        prefix: bool = True,
        text_encoder: bool = True,
    ) -> None:
        parser.add_argument(
            "--output",
            "-o",
            required=True,
            help="the .safetensors file to write (replaced, with a warning, if it exists)",
        )
        parser.add_argument(
            "--format",
            default=default_format,
            help=help_format or "key layout: diffsynth (default), peft (ComfyUI names) or kohya",
        )
        parser.add_argument(
            "--dtype",
            default=None,
            help="dtype of the written tensors: float32, float16 or bfloat16 (default: the inputs')",
        )
        if prefix:
            parser.add_argument(
                "--prefix",
                default=None,
                help="prefix of the written names (default: the one the inputs were read with when they share one "
                "that fits --format, e.g. transformer. or lora_unet_; else the format's)",
            )
        if text_encoder:
            parser.add_argument(
                "--drop-text-encoder",
                action="store_true",
                help="write the denoiser's part of a LoRA that also changes text encoders (refused otherwise)",
            )

    ext = actions.add_parser("extract", help="a LoRA of a fine-tune's weight differences from its base (SVD)")
    ext.add_argument("base", help="the base checkpoint (file, shards' index or folder)")
    ext.add_argument("tuned", help="the fine-tuned checkpoint, in the same layout")
    ext.add_argument("--rank", type=int, required=True, help="rank of every extracted layer")
    ext.add_argument("--threshold", type=float, default=0.0, help="skip layers that changed by at most this much")
    ext.add_argument("--device", default="cpu", help="where the SVDs run (cuda is much faster for large models)")
    common(ext, text_encoder=False)

    res = actions.add_parser("resize", help="a LoRA (any kind) as a plain LoRA of another rank (SVD)")
    res.add_argument("lora", help="the LoRA file")
    res.add_argument("--rank", type=int, required=True, help="the new rank")
    common(res)

    mer = actions.add_parser("merge", help="several LoRAs as one, each at its scale (FILE[:SCALE])")
    mer.add_argument("loras", nargs="+", metavar="FILE[:SCALE]", help="LoRA files, with an optional scale each")
    mer.add_argument("--rank", type=int, default=None, help="cut the merged change to this rank (default: exact)")
    common(mer)

    con = actions.add_parser(
        "convert",
        help="a LoRA (any layout the family reads) in official (BFL / authors'), diffusers or ComfyUI names",
    )
    con.add_argument("lora", help="the LoRA file")
    con.add_argument("--family", required=True, help="the model family it is for (see `diffsynth list-models`)")
    con.add_argument(
        "--to",
        default="official",
        help="naming to write: official (default; fused layers as one exact LoRA each), diffusers (split into "
        "diffusers' layers, under transformer.) or comfyui (the names ComfyUI's model uses, under diffusion_model.: "
        "the official ones for FLUX and Wan, NextDiT's fused attention.qkv for z_image)",
    )
    common(
        con,
        prefix=False,
        default_format=None,
        help_format="key layout: diffsynth (default for --to official), peft (default for --to diffusers: "
        "transformer.<name>; and for --to comfyui: diffusion_model.<name>; also for official names) or kohya "
        "(official and comfyui names)",
    )


def run_lora(args) -> int:
    from .errors import ConfigError

    if Path(args.output).suffix != ".safetensors":
        raise ConfigError(f"-o {args.output}: LoRA files are written as .safetensors; give a path ending in it")
    if args.format is not None and args.format not in FORMATS:  # checked here to be one line like the others
        raise ConfigError(f"--format {args.format!r} is not a LoRA key layout; accepted: {', '.join(FORMATS)}")
    if args.dtype is not None and args.dtype not in DTYPE_NAMES:
        raise ConfigError(f"--dtype {args.dtype!r} is not accepted; choose one of {', '.join(DTYPE_NAMES)}")

    from .cli import path_and_scale
    from .lora import read_lora, save_lora
    from .lora_tools import DTYPES, extract_lora, merge_loras, resize_lora

    dtype = None if args.dtype is None else DTYPES[args.dtype]
    if args.lora_command == "convert":
        from .lora_convert import convert_lora_file

        warn_if_replacing(args.output)
        lora = convert_lora_file(
            args.lora, args.output, args.family, to=args.to, format=args.format, dtype=dtype,
            drop_text_encoder=args.drop_text_encoder,
        )  # fmt: skip
        logger.info("wrote %s (%d layers, %s names)", args.output, len(lora), args.to)
        return 0
    if args.lora_command == "extract":
        lora = extract_lora(args.base, args.tuned, args.rank, threshold=args.threshold, device=args.device, dtype=dtype)
    elif args.lora_command == "resize":
        read = read_lora(args.lora)
        refuse_kohya_names([read], args.format)
        lora = resize_lora(read, args.rank, dtype=dtype, drop_text_encoder=args.drop_text_encoder)
    else:
        specs = [(read_lora(path), scale) for path, scale in map(path_and_scale, args.loras)]
        refuse_kohya_names([read for read, _ in specs], args.format)
        lora = merge_loras(specs, rank=args.rank, dtype=dtype, drop_text_encoder=args.drop_text_encoder)
    prefix = save_prefix(lora.prefix, args.format) if args.prefix is None else args.prefix
    warn_if_replacing(args.output)
    save_lora(lora, args.output, format=args.format, prefix=prefix, metadata=lora.header)
    logger.info("wrote %s (%d layers)", args.output, len(lora))
    return 0


def save_prefix(read_with: str | None, format: str) -> str | None:
    """The prefix to write names under in `format`: the one they were read with when it fits the format (a kohya
    prefix for kohya, a dotted one for the others), else None (the format's own)."""
    from .lora import KOHYA_PREFIXES

    if not read_with:
        return None
    return read_with if (format == "kohya") == (read_with in KOHYA_PREFIXES) else None


def warn_if_replacing(output: str) -> None:
    """Say so when `-o` names a file that is there: it is replaced, as `diffsynth generate` replaces its outputs."""
    if Path(output).exists():
        logger.warning("-o %s exists; replacing it", output)


def refuse_kohya_names(loras, format: str) -> None:
    """Refuse writing kohya-read names (`lora_unet_blocks_0_proj`) in a dotted layout: `blocks_0_proj` is no module
    name, so peft and ComfyUI would drop those layers without a word. Only the family's converter knows the dots."""
    from .errors import ConfigError
    from .lora import KOHYA_PREFIXES

    if format == "kohya":
        return
    for lora in loras:
        underscored = [key for name, key in lora.keys.items() if key.startswith(KOHYA_PREFIXES) and "_" in name]
        if underscored:
            raise ConfigError(
                f"{lora.source} has kohya names ({underscored[0]!r}, ...), whose dots only the model tells; "
                f"--format {format} would write them underscored, names peft and ComfyUI do not find (they drop those "
                "layers). Keep --format kohya, or first run `diffsynth lora convert FILE --family FAMILY "
                "-o NEW.safetensors` (official, dotted names) and use NEW.safetensors"
            )
