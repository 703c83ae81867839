"""`diffsynth score`: an image-quality metric from the command line (one line per image, or the FID / LPIPS)."""

from __future__ import annotations

import argparse
import json

from ..errors import ConfigError

METRICS = {
    "pickscore": "PickScoreMetric",
    "clip": "CLIPMetric",
    "hpsv2": "HPSv2Metric",
    "aesthetic": "AestheticMetric",
    "fid": "FIDMetric",
    "lpips": "LPIPSMetric",
    "image_reward": "ImageRewardMetric",
}
PROMPTED = ("pickscore", "clip", "hpsv2", "image_reward")
PAIRED = ("fid", "lpips")  # metrics of two image sets: one number


def positive_int(text: str) -> int:
    """argparse type of --batch-size: 0 or -1 would only fail deep inside a metric's batching loop."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not accepted; use an integer >= 1")
    return value


def add_score_parser(commands) -> argparse.ArgumentParser:
    """Register `score` on the `diffsynth` command's subparsers."""
    score = commands.add_parser(
        "score",
        help="score images with an image-quality metric (PickScore, CLIP score, HPSv2, aesthetic, ImageReward, FID, "
        "LPIPS)",
        description="Print one score per image (tab-separated after its path), or the FID / LPIPS of two image "
        "folders (LPIPS: also of two images).",
    )
    score.add_argument("--metric", required=True, choices=sorted(METRICS), help="which metric")
    score.add_argument(
        "images",
        nargs="+",
        help="image files; for fid: REFERENCE_DIR GENERATED_DIR; for lpips: A B (images or folders)",
    )
    score.add_argument("--prompt", action="append", default=None, help="the prompt (one, or one per image)")
    score.add_argument(
        "--model-path", default=None, help="the metric's weights file (default: DiffSynth-Studio/ImageMetrics)"
    )
    score.add_argument(
        "--processor-path",
        default=None,
        help="the folder of its processor (CLIP-based metrics) or tokenizer (image_reward)",
    )
    score.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    score.add_argument("--batch-size", type=positive_int, default=16, help="images per forward pass")
    score.add_argument(
        "--fid-resize",
        default=None,
        help="fid: how images are resized to 299x299: bilinear (pytorch-fid's, the default) or bicubic "
        "(DiffSynth-Studio's, to reproduce its numbers)",
    )
    score.add_argument("--lpips-net", default=None, help="lpips: the feature network, alex (default), vgg or squeeze")
    score.add_argument(
        "--target-size",
        type=int,
        default=None,
        help="lpips: the square size images of different sizes are resized and centre-cropped to (default 512)",
    )
    score.add_argument(
        "--json",
        action="store_true",
        help='print JSON: {"metric", "scores": [{"path", "score"}, ...]} in input order (fid/lpips: {METRIC: value})',
    )
    return score


def check_inputs(name: str, paths: list[str]) -> None:
    """Refuse a missing input (or a folder where image files are scored) before the metric's model is loaded, which
    can mean a download."""
    from pathlib import Path

    from ..checkpoint import folder_listing

    for path in map(Path, paths):
        if path.is_file() or (name in PAIRED and path.is_dir()):
            continue
        if path.is_dir():
            raise ConfigError(f"{path} is a folder; --metric {name} scores image files (fid and lpips take folders)")
        raise ConfigError(f"{path} does not exist; {folder_listing(path.parent)}")


def run_score(args) -> int:
    """Build the metric named by `--metric` and print its scores."""
    from .. import metrics

    name = args.metric
    if name in PROMPTED and not args.prompt:
        raise ConfigError(f"--metric {name} needs --prompt (one for every image, or one per image)")
    if name not in PROMPTED and args.prompt:
        raise ConfigError(f"--metric {name} takes no --prompt")
    if name in PROMPTED and len(args.prompt) not in (1, len(args.images)):
        raise ConfigError(
            f"--metric {name} got {len(args.prompt)} --prompt for {len(args.images)} images: give one for every "
            "image, or one per image"
        )
    if name == "fid" and len(args.images) != 2:
        raise ConfigError(f"--metric fid takes two folders, REFERENCE_DIR GENERATED_DIR; got {len(args.images)}")
    if name == "lpips" and len(args.images) != 2:
        raise ConfigError(f"--metric lpips takes two images or two folders, A B; got {len(args.images)} paths")
    options = {"device": args.device, "batch_size": args.batch_size}
    if args.fid_resize is not None:
        if name != "fid":
            raise ConfigError(f"--metric {name} takes no --fid-resize (it is how FID resizes its images)")
        options["resize"] = args.fid_resize
    for flag, value, key in (
        ("--lpips-net", args.lpips_net, "net"),
        ("--target-size", args.target_size, "target_size"),
    ):
        if value is not None:
            if name != "lpips":
                raise ConfigError(f"--metric {name} takes no {flag} (it is an LPIPS setting)")
            options[key] = value
    if args.model_path:
        options["model_config"] = args.model_path
    if args.processor_path:
        if name in PAIRED:
            raise ConfigError(f"--metric {name} takes no --processor-path")
        options["tokenizer_config" if name == "image_reward" else "processor_config"] = args.processor_path
    check_inputs(name, args.images)
    metric = getattr(metrics, METRICS[name]).from_pretrained(**options)
    if name in PAIRED:
        value = metric.compute(*args.images)
        print(json.dumps({name: value}) if args.json else f"{value:.6f}")
        return 0
    if name in PROMPTED:
        prompt = args.prompt[0] if len(args.prompt) == 1 else args.prompt
        scores = metric.compute(prompt, args.images)
    else:
        scores = metric.compute(args.images)
    if args.json:
        entries = [{"path": path, "score": value} for path, value in zip(args.images, scores, strict=True)]
        print(json.dumps({"metric": name, "scores": entries}))  # a list: a path given twice keeps both scores
    else:
        for path, value in zip(args.images, scores, strict=True):
            print(f"{path}\t{value:.6f}")
    return 0
