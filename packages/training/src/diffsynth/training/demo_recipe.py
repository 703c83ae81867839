"""`diffsynth-train-demo`: train the bundled demo model (Z-Image preset `demo`) from scratch, seeded.

The demo is the real Z-Image pipeline at a tiny size: a ZImageDiT, an AutoencoderKL and a Qwen3 text
encoder, trained on pictures of flat shapes that the recipe draws itself (`diffsynth.z_image.demo`).
Stages, each skipped when its output already exists so an interrupted run picks up where it stopped:

1. data: ~6000 captioned 128x128 pictures and `metadata.csv` (held-out scenes are never drawn);
2. tokenizer: a Qwen-style BPE trained on the captions; text encoder: a frozen random Qwen3 (the DiT
   learns to read its features; a random encoder keeps words apart, which is all the captions need);
3. VAE: an 8x AutoencoderKL trained as a plain autoencoder through its posterior mean (L1 + L2, a little
   latent noise), its latent shift and scale measured on the data, as the released VAEs' are;
4. DiT: full training from a seeded random init with `diffsynth-train` (cached two-stage: the captions
   and latents are encoded once, then the DiT trains without the encoders);
5. export: the model folder in the hub layout, weights in float16, generation defaults in
   `diffsynth.json`, and the share of held-out scenes whose generated picture matches its caption.

Copy `OUTPUT/model/` over `packages/z-image/src/diffsynth/z_image/demo_model/` to ship a new demo. The number
of steps depends on the device (`SCHEDULES`); the shipped demo is a GPU run.

`--device` (cpu, cuda or cuda:N; default cuda when available) is checked before any stage runs and is where each
stage computes: the VAE training, both `diffsynth-train` runs of the DiT (told through accelerate's
ACCELERATE_USE_CPU / ACCELERATE_TORCH_DEVICE; bf16 mixed precision on CUDA, none on CPU) and the final check.
A rerun in the same folder resumes each stage; one with a smaller `--steps` than the DiT run already reached is
refused (give a new `--output_path`, or `--steps` at least that far).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import os
import random
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file

from diffsynth.runtime.checkpoint import save_safetensors

logger = logging.getLogger("diffsynth.training.demo")

DIT_CONFIG = {
    "_class_name": "ZImageTransformer2DModel",
    "all_patch_size": [2],
    "all_f_patch_size": [1],
    "in_channels": 16,
    "dim": 128,
    "n_layers": 6,
    "n_refiner_layers": 1,
    "n_heads": 4,
    "n_kv_heads": 4,
    "norm_eps": 1e-5,
    "qk_norm": True,
    "cap_feat_dim": 64,
    "rope_theta": 256.0,
    "t_scale": 1000.0,
    "axes_dims": [8, 12, 12],
    "axes_lens": [128, 32, 32],
}
VAE_CONFIG = {
    "_class_name": "AutoencoderKL",
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [16, 16, 32, 32],
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 16,  # 4 cannot hold a small shape's colour and its background's in one 8x8 cell
    "norm_num_groups": 4,  # channels per group carry the absolute colour; 1 per group (16) would erase it
    "sample_size": 128,
    "scaling_factor": 1.0,  # measured on the data in stage 3
    "shift_factor": 0.0,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": False,
}
TEXT_CONFIG = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "attention_bias": False,
}
# Optimizer steps and batch sizes by device: the CPU schedule fits an hour on 2 cores; a GPU runs the same
# tiny models launch-bound, so its minutes buy more steps and bigger batches (the shipped demo is the GPU run).
SCHEDULES = {
    "cpu": {"vae_steps": 2500, "vae_batch_size": 8, "steps": 4800, "batch_size": 32},
    "cuda": {"vae_steps": 4000, "vae_batch_size": 16, "steps": 6000, "batch_size": 64},
}
GENERATION_DEFAULTS = {"height": 128, "width": 128, "num_inference_steps": 20, "cfg_scale": 3.0, "sigma_shift": 3.0}
WEIGHTS = "diffusion_pytorch_model.safetensors"
LATENT_NOISE = 0.1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffsynth-train-demo", description=__doc__.split("\n")[0])
    p.add_argument("--output_path", default="./models/demo", help="working folder; the model lands in OUTPUT/model")
    p.add_argument("--seed", type=int, default=0, help="seed of every stage")
    p.add_argument("--copies", type=int, default=2, help="pictures drawn per training scene")
    p.add_argument("--vae_steps", type=int, default=None, help="VAE optimizer steps (default: SCHEDULES)")
    p.add_argument("--vae_batch_size", type=int, default=None, help="VAE batch size (default: SCHEDULES)")
    p.add_argument("--steps", type=int, default=None, help="DiT optimizer steps (default: SCHEDULES)")
    p.add_argument("--batch_size", type=int, default=None, help="DiT batch size (default: SCHEDULES)")
    p.add_argument("--learning_rate", type=float, default=5e-4, help="DiT peak learning rate (cosine decay)")
    p.add_argument(
        "--device",
        default=None,
        help="cpu, cuda or cuda:N: where the VAE, the DiT (its encode and train runs) and the final check run, and "
        "which SCHEDULES entry gives the defaults (default: cuda when available)",
    )
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import diffsynth.z_image.demo  # noqa: F401
    except ImportError:
        print("error: the demo recipe trains a Z-Image model: pip install diffsynth-z-image", file=sys.stderr)
        return 2
    from diffsynth.runtime.errors import DiffSynthError

    try:  # refused before any stage runs
        device = check_demo_device(args.device)
        for name, value in SCHEDULES["cpu" if device == "cpu" else "cuda"].items():
            if getattr(args, name) is None:
                setattr(args, name, value)
        check_previous_run(Path(args.output_path), args.steps)
    except DiffSynthError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    logger.info(
        "demo on %s: VAE %d steps x %d, DiT %d steps x %d",
        device,
        args.vae_steps,
        args.vae_batch_size,
        args.steps,
        args.batch_size,
    )
    out = Path(args.output_path)
    model = out / "model"
    started = time.perf_counter()
    write_dataset(out / "data", args.copies, args.seed)
    write_text_encoder(model, out / "data", args.seed)
    train_vae(model / "vae", out / "data", args.vae_steps, args.vae_batch_size, args.seed, device)
    write_initial_dit(out / "init" / "transformer", args.seed)
    train_dit(out, args, device)
    export(out, args.steps)
    score = evaluate(model, device)
    logger.info(
        "demo model in %s; held-out scenes matched: %.0f%%; took %.0f s",
        model,
        100 * score,
        time.perf_counter() - started,
    )
    return 0


def check_demo_device(given: str | None) -> str:
    """`--device` as "cpu", "cuda" or "cuda:N" (None: cuda when available), refused (ConfigError naming the flag)
    when it is no device name or a GPU this torch does not see. mps and disk are refused: the demo's schedules and
    mixed precision are set for CPU and CUDA runs only."""
    from diffsynth.runtime.dtypes import check_device, parse_device
    from diffsynth.runtime.errors import ConfigError

    try:
        device = parse_device(given)
    except ConfigError:
        device = None
    if not isinstance(device, torch.device) or device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {given}: not a device the demo trains on; use cpu, cuda or cuda:N")
    check_device(device, "--device", given)
    return str(device)


def check_previous_run(out: Path, steps: int) -> None:
    """Refuse a rerun in a folder whose DiT training already went past `--steps` (it would resume there, train
    nothing and have no step-`steps` weights to export), unless those weights were exported on the way."""
    from diffsynth.runtime.errors import ConfigError

    from .checkpoint import list_checkpoints, step_name

    found = list_checkpoints(out / "train" / "checkpoints")
    if not found:
        return
    latest = int(found[-1].name.split("-")[1])
    if latest > steps and not (out / "train" / step_name(steps) / "dit" / WEIGHTS).is_file():
        raise ConfigError(
            f"--steps {steps}: the DiT run in {out / 'train'} is already at step {latest}; give --steps {latest} "
            "or more to continue it, or a new --output_path to train a shorter run from scratch"
        )


# ------------------------------------------------------------------ 1. data
def write_dataset(folder: Path, copies: int, seed: int) -> None:
    from diffsynth.z_image.demo import training_rows

    metadata = folder / "metadata.csv"
    if metadata.exists():
        logger.info("data: %s exists, kept", metadata)
        return
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (image, caption) in enumerate(training_rows(copies=copies, seed=seed)):
        name = f"images/{i:05d}.png"
        image.save(folder / name)
        rows.append({"image": name, "prompt": caption})
    partial = metadata.with_suffix(".csv.tmp")
    with partial.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "prompt"])
        writer.writeheader()
        writer.writerows(rows)
    partial.replace(metadata)
    logger.info("data: %d pictures in %s", len(rows), folder)


def _captions(data: Path) -> list[str]:
    with (data / "metadata.csv").open(newline="") as f:
        return sorted({row["prompt"] for row in csv.DictReader(f) if row["prompt"]})


# ------------------------------------------------------------------ 2. tokenizer and text encoder
def write_text_encoder(model: Path, data: Path, seed: int) -> None:
    from diffsynth.runtime.models.qwen3 import QWEN3_SPEC
    from diffsynth.runtime.testing.tokenizers import build_tiny_qwen_tokenizer
    from diffsynth.runtime.testing.weights import random_weights

    if (model / "text_encoder" / "model.safetensors").exists():
        logger.info("text encoder: kept")
        return
    tokenizer = build_tiny_qwen_tokenizer(model / "tokenizer", texts=_captions(data), vocab_size=512)
    config = dict(TEXT_CONFIG, vocab_size=len(tokenizer))
    encoder = random_weights(QWEN3_SPEC.build(QWEN3_SPEC.config_from_state({}, config)), seed, scale=0.1)
    folder = model / "text_encoder"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    state = {"model." + k: v.to(torch.float16).contiguous() for k, v in encoder.state_dict().items()}
    save_safetensors(state, str(folder / "model.safetensors"))
    logger.info("text encoder: random Qwen3, vocabulary of %d tokens", len(tokenizer))


# ------------------------------------------------------------------ 3. VAE
def train_vae(folder: Path, data: Path, steps: int, batch_size: int, seed: int, device: str) -> None:
    from PIL import Image

    from diffsynth.runtime.media import pil_to_tensor
    from diffsynth.runtime.models.autoencoder_kl import AUTOENCODER_KL_SPEC

    if (folder / WEIGHTS).exists():
        logger.info("vae: kept")
        return
    torch.manual_seed(seed)
    rng = random.Random(seed)
    paths = sorted((data / "images").glob("*.png"))
    vae = AUTOENCODER_KL_SPEC.build(AUTOENCODER_KL_SPEC.config_from_state({}, VAE_CONFIG)).to(device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.05)
    for step in range(steps):
        images = [Image.open(path).convert("RGB") for path in rng.sample(paths, batch_size)]
        pixels = pil_to_tensor(images, dtype=torch.float32, device=device)
        mean = vae.encoder(pixels).chunk(2, dim=1)[0]
        # a plain autoencoder through the posterior mean, with a little noise so the decoder tolerates the
        # DiT's imperfect latents and a light penalty that keeps the latents near unit scale
        reconstruction = vae.decoder(mean + LATENT_NOISE * torch.randn_like(mean))
        error = reconstruction - pixels
        loss = error.abs().mean() + error.pow(2).mean() + 1e-4 * mean.pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            logger.info("vae step %d/%d: loss %.4f", step + 1, steps, loss.item())
    # normalise latents to zero mean, unit variance, as the released VAEs' shift/scale factors do
    with torch.no_grad():
        sample = [Image.open(p).convert("RGB") for p in rng.sample(paths, min(512, len(paths)))]
        means = torch.cat(
            [
                vae.encoder(pil_to_tensor(sample[i : i + 64], device=device)).chunk(2, 1)[0]
                for i in range(0, len(sample), 64)
            ]
        )
    config = dict(
        VAE_CONFIG, shift_factor=round(means.mean().item(), 4), scaling_factor=round(1 / means.std().item(), 4)
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_safetensors({k: v.to(torch.float16).contiguous() for k, v in vae.state_dict().items()}, str(folder / WEIGHTS))
    logger.info("vae: shift %.4f, scale %.4f", config["shift_factor"], config["scaling_factor"])


# ------------------------------------------------------------------ 4. DiT
def write_initial_dit(folder: Path, seed: int) -> None:
    from diffsynth.z_image.formats import DIT_SPEC

    if (folder / WEIGHTS).exists():
        return
    torch.manual_seed(seed)
    dit = DIT_SPEC.build(DIT_SPEC.config_from_state({}, DIT_CONFIG))  # torch's default init, seeded
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(DIT_CONFIG, indent=2))
    save_safetensors({k: v.contiguous() for k, v in dit.state_dict().items()}, str(folder / WEIGHTS))


@contextlib.contextmanager
def accelerate_device(device: str):
    """`diffsynth-train` picks its device through accelerate (CUDA when available): point it at `device` for the
    DiT stage with accelerate's own environment variables (ACCELERATE_USE_CPU for cpu, ACCELERATE_TORCH_DEVICE for
    cuda:N), put back as they were after."""
    names = {"cpu": {"ACCELERATE_USE_CPU": "true"}, "cuda": {}}.get(device, {"ACCELERATE_TORCH_DEVICE": device})
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(names)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def train_dit(out: Path, args, device: str) -> None:
    with accelerate_device(device):
        _train_dit(out, args, device)


def _train_dit(out: Path, args, device: str) -> None:
    from .cli import main as train

    model = out / "model"
    start = out / "init"
    for part in ("vae", "text_encoder", "tokenizer"):  # the training folder: initial DiT + the frozen parts
        if not (start / part).exists():
            shutil.copytree(model / part, start / part)
    common = [
        "--family", "z_image",
        "--model", str(start),
        "--dataset_base_path", str(out / "data"),
        "--height", "128", "--width", "128",
        "--dtype", "float32",
        "--mixed_precision", "no" if device == "cpu" else "bf16",
        "--batch_size", str(args.batch_size),
        "--cache_dir", str(out / "cache"),
        "--seed", str(args.seed),
    ]  # fmt: skip
    if not (out / "cache" / "index.json").exists():
        if train([*common, "--stage", "encode"]) != 0:
            raise SystemExit("demo recipe: encoding the dataset failed (see the log above)")
    runs = out / "train"
    resume = ["--resume", "latest"] if (runs / "checkpoints").exists() else []
    code = train(
        [
            *common,
            "--trainable_models", "dit",
            "--learning_rate", str(args.learning_rate),
            "--lr_scheduler", "cosine",
            "--lr_warmup_steps", "200",
            "--weight_decay", "0.0",
            "--num_epochs", "1000",
            "--max_steps", str(args.steps),
            "--save_steps", "500",
            "--keep_last", "1",
            "--save_dtype", "float16",
            "--output_path", str(runs),
            "--log_every", "50",
            *resume,
        ]
    )  # fmt: skip
    if code != 0:
        raise SystemExit("demo recipe: DiT training failed (see the log above)")


# ------------------------------------------------------------------ 5. export and check
def export(out: Path, steps: int) -> None:
    trained = out / "train" / f"step-{steps:06d}" / "dit"
    folder = out / "model" / "transformer"
    folder.mkdir(parents=True, exist_ok=True)
    state = load_file(str(trained / WEIGHTS))
    save_safetensors({k: v.to(torch.float16).contiguous() for k, v in state.items()}, str(folder / WEIGHTS))
    shutil.copy(trained / "config.json", folder / "config.json")
    defaults = {
        "description": "DiffSynth demo: a tiny Z-Image trained from scratch on shapes (diffsynth-train-demo)",
        "defaults": GENERATION_DEFAULTS,
    }
    (out / "model" / "diffsynth.json").write_text(json.dumps(defaults, indent=2) + "\n")


def evaluate(model: Path, device: str) -> float:
    """Share of held-out scenes whose generated picture passes `check_image`."""
    from diffsynth.z_image.demo import check_image, held_out_scenes
    from diffsynth.z_image.pipeline import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(str(model), torch_dtype=torch.float32, device=device)
    scenes = held_out_scenes()
    images = pipe([s.caption for s in scenes], seed=0, progress_bar=False)
    failures = {s.caption: check_image(im, s) for s, im in zip(scenes, images, strict=True)}
    for caption, problems in failures.items():
        if problems:
            logger.info("held out %r: %s", caption, "; ".join(problems))
    return sum(not p for p in failures.values()) / len(scenes)


if __name__ == "__main__":
    sys.exit(main())
