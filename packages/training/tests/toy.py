"""Test helpers: a toy family and dataset writers.

The toy family has a pooling "VAE", a byte-embedding "text encoder" and a small MLP denoiser, and implements
the `TrainingTask` protocol the way a real family does (structurally). conftest.py loads this file as the
module `diffsynth_training_toy`, so configs name the task `diffsynth_training_toy:ToyTask`.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.checkpoint import checkpoint

from diffsynth.runtime.schedulers import FlowMatchScheduler

TASK = "diffsynth_training_toy:ToyTask"
LATENT_CHANNELS = 4
TEXT_DIM = 8


class ToyVAE(nn.Module):
    """8x average pooling and a 1x1 convolution: [B, 3, H, W] -> [B, 4, H/8, W/8]."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, LATENT_CHANNELS, 1)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(F.avg_pool2d(pixels, 8))


class ToyTextEncoder(nn.Module):
    """One embedding per byte of the prompt: [len(prompt), 8]."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(256, TEXT_DIM)

    def encode(self, prompts: list[str]) -> list[torch.Tensor]:
        device = self.embed.weight.device
        return [self.embed(torch.tensor(list(p.encode() or b" "), device=device)) for p in prompts]


class ToyDenoiser(nn.Module):
    """Per-latent-pixel MLP conditioned on sigma and the mean text embedding."""

    lora_target_modules = ("proj_in", "blocks.0.0", "proj_out")
    offload_units = ("blocks",)  # what the VRAM manager manages (--fp8_models)

    def __init__(self, width: int = 32):
        super().__init__()
        self.gradient_checkpointing = False
        self.proj_in = nn.Linear(LATENT_CHANNELS, width)
        self.time = nn.Linear(1, width)
        self.text = nn.Linear(TEXT_DIM, width)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(width, width), nn.SiLU())])
        self.proj_out = nn.Linear(width, LATENT_CHANNELS)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, text: list[torch.Tensor]) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        cond = self.time(sigma.view(b, 1).to(x.dtype)) + self.text(torch.stack([t.mean(0) for t in text]).to(x.dtype))
        hidden = F.silu(self.proj_in(tokens) + cond[:, None])
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                hidden = hidden + checkpoint(block, hidden, use_reentrant=False)
            else:
                hidden = hidden + block(hidden)
        return self.proj_out(hidden).transpose(1, 2).reshape(b, c, h, w)


def build(name: str) -> nn.Module:
    """The toy model `name` with fixed weights (the global random state is left untouched)."""
    seeds = {"vae": 1, "text_encoder": 2, "denoiser": 3}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seeds[name])
        return {"vae": ToyVAE, "text_encoder": ToyTextEncoder, "denoiser": ToyDenoiser}[name]()


class ToyTask:
    family: ClassVar[str] = "toy"
    denoiser_slot: ClassVar[str] = "denoiser"
    size_multiple: ClassVar[int] = 8
    media: ClassVar[tuple[str, ...]] = ("image",)
    builds: ClassVar[list[dict[str, bool]]] = []  # what each from_pretrained call loaded (tests read it)
    loss_options: ClassVar[tuple[str, ...]] = ("sigma_shift",)  # --task_options that do not shape the cache

    def __init__(
        self,
        models: dict[str, nn.Module],
        device: torch.device,
        *,
        sigma_shift: float | None = None,
        text_scale: float = 1.0,
    ):
        self._models = models
        self.device = device
        self.scheduler = FlowMatchScheduler("z_image", **({} if sigma_shift is None else {"shift": sigma_shift}))
        self.text_scale = text_scale  # an option that shapes the encoded samples

    @classmethod
    def from_pretrained(
        cls,
        model_configs,
        *,
        tokenizer_config=None,
        torch_dtype=torch.float32,
        device=None,
        encoders=True,
        denoiser=True,
        **options,
    ):
        cls.builds.append({"encoders": encoders, "denoiser": denoiser})
        names = (["vae", "text_encoder"] if encoders else []) + (["denoiser"] if denoiser else [])
        device = torch.device(device or "cpu")
        models = {n: build(n).to(device=device, dtype=torch_dtype).eval().requires_grad_(False) for n in names}
        return cls(models, device, **options)

    @property
    def models(self) -> dict[str, nn.Module]:
        return dict(self._models)

    @property
    def model_files(self) -> dict[str, list[str]]:
        return {}

    def encode(self, rows: list[dict[str, Any]]) -> list[dict[str, torch.Tensor]]:
        pixels = torch.stack([r["image"] for r in rows]).to(self.device)
        latents = self._models["vae"].encode(pixels)
        text = [t * self.text_scale for t in self._models["text_encoder"].encode([r["prompt"] for r in rows])]
        return [{"latents": lat, "text": t} for lat, t in zip(latents, text, strict=True)]

    def collate(self, samples):
        return {"latents": torch.stack([s["latents"] for s in samples]), "text": [s["text"] for s in samples]}

    def velocity(self, denoiser, batch, noisy_latents, sigma):
        # reads the denoiser's own attributes, as real families do (Qwen-Image: `dit.config.patch_size`), which
        # the trainer must keep reachable when DDP or DeepSpeed wraps the model
        return denoiser(noisy_latents.to(denoiser.proj_in.weight.dtype), sigma, batch["text"])

    def inference_sigmas(self, latent_shape, num_inference_steps):
        """The toy's sampling schedule: its scheduler's template for that many steps (`--task direct_distill`)."""
        scheduler = FlowMatchScheduler(self.scheduler.template, **self.scheduler.template_defaults)
        scheduler.set_timesteps(num_inference_steps)
        return scheduler.sigmas

    def sample(self, denoiser, prompts, *, seed, **options):
        """Euler steps from seeded noise; the toy has no decoder, so the latents' first 3 channels are the picture."""
        text = self._models["text_encoder"].encode(prompts)
        x = torch.randn(len(prompts), LATENT_CHANNELS, 8, 8, generator=torch.Generator().manual_seed(seed))
        x = x.to(denoiser.proj_in.weight.dtype)  # as pipelines do: a DeepSpeed bf16 run holds a bf16 denoiser
        sigmas = torch.linspace(1.0, 0.0, 5)
        for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
            x = x + (s_next - s) * denoiser(x, s.expand(len(prompts)), text)
        pixels = ((x[:, :3].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        return [Image.fromarray(p).resize((32, 32)) for p in pixels]


VIDEO_TASK = "diffsynth_training_toy:ToyVideoTask"
TC = 2  # the toy video VAE's frames per latent frame after the first (not Wan's 4: nothing may assume it)


class ToyVideoTask(ToyTask):
    """The toy family on videos `[3, F, H, W]` (a picture is one frame): each frame pooled by the toy VAE, then
    latent frame 0 is frame 0 and latent frame j > 0 the mean of frames 1 + 2(j - 1) and 2 + 2(j - 1), a causal video
    VAE's chunks; latents `[4, T, h, w]`. The per-cell denoiser sees the latent frames as more rows of cells."""

    family = "toy_video"
    media = ("video", "image")
    temporal_compression = TC

    def encode(self, rows):
        text = [t * self.text_scale for t in self._models["text_encoder"].encode([r["prompt"] for r in rows])]
        samples = []
        for row, prompt in zip(rows, text, strict=True):
            video = row["video"] if isinstance(row.get("video"), torch.Tensor) else row["image"][:, None]
            frames = self._models["vae"].encode(video.transpose(0, 1).to(self.device))  # [F, 4, h, w]
            groups = [frames[:1]] + [frames[1 + k * TC : 1 + (k + 1) * TC] for k in range((len(frames) - 1) // TC)]
            samples.append({"latents": torch.stack([g.mean(0) for g in groups], dim=1), "text": prompt})
        return samples

    def velocity(self, denoiser, batch, noisy_latents, sigma):
        b, c, t, h, w = noisy_latents.shape
        flat = noisy_latents.reshape(b, c, t * h, w).to(denoiser.proj_in.weight.dtype)
        return denoiser(flat, sigma, batch["text"]).reshape(b, c, t, h, w)


# ----------------------------------------------------------------------------------- datasets
PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow star", "a black line", "a white dot"]


def write_images(folder: Path, sizes: list[tuple[int, int]], seed: int = 0) -> list[str]:
    """Random RGB images of the given (width, height) sizes; returns their file names."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, (w, h) in enumerate(sizes):
        name = f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)
        names.append(name)
    return names


def write_dataset(folder: Path, sizes: list[tuple[int, int]], fmt: str = "csv") -> Path:
    names = write_images(folder, sizes)
    rows = [{"image": n, "prompt": PROMPTS[i % len(PROMPTS)]} for i, n in enumerate(names)]
    if fmt == "csv":
        with (folder / "metadata.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["image", "prompt"])
            writer.writeheader()
            writer.writerows(rows)
    elif fmt == "json":
        (folder / "metadata.json").write_text(json.dumps(rows))
    else:
        (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


# ----------------------------------------------------------------------------------- two-process runs
# Settings of the multi-process tests: tiny, float32, three optimizer steps.
DISTRIBUTED_SETTINGS = dict(
    family=TASK,
    max_pixels=64 * 128,
    bucket_step=16,
    batch_size=1,
    mixed_precision="no",
    dtype="float32",
    lora_rank=4,
    learning_rate=1e-2,
    max_steps=3,
    num_epochs=1,
)
# Runs `diffsynth.training.cli` with this toy family registered, after `prelude` (code run before the trainer).
_LAUNCHER = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("diffsynth_training_toy", sys.argv[1])
module = importlib.util.module_from_spec(spec)
sys.modules["diffsynth_training_toy"] = module
spec.loader.exec_module(module)
import torch
torch.set_num_threads(1)
{prelude}
from diffsynth.training.cli import main
sys.exit(main(sys.argv[2:]))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def toy_config(tmp_path: Path, dataset: Path, name: str = "out", **overrides):
    """The trainer tests' usual run: LoRA rank 4 on the toy family, float32, batches of 2, logged every step, 4 steps
    over up to 10 epochs, into `tmp_path / name`; `overrides` replace any setting."""
    from diffsynth.training.config import TrainConfig

    values = dict(
        family=TASK, dataset_base_path=str(dataset), output_path=str(tmp_path / name), max_pixels=64 * 128,
        bucket_step=16, batch_size=2, mixed_precision="no", dtype="float32", lora_rank=4, learning_rate=1e-2,
        max_steps=4, num_epochs=10, log_every=1,
    )  # fmt: skip
    return TrainConfig(**{**values, **overrides})


def train_one_process(folder: Path, dataset: Path, accumulation: int = 2, **overrides) -> Path:
    """The reference of the multi-process tests: one process training `DISTRIBUTED_SETTINGS` (with `overrides`)
    and accumulating `accumulation` micro-batches per optimizer step, into `folder / "one"`."""
    from diffsynth.training.config import TrainConfig
    from diffsynth.training.trainer import train

    settings = {**DISTRIBUTED_SETTINGS, **overrides}
    output = folder / "one"
    train(TrainConfig(**settings, dataset_base_path=str(dataset), output_path=str(output),
                      gradient_accumulation_steps=accumulation))  # fmt: skip
    return output


def assert_same_tensors(expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor]) -> None:
    """The same non-empty set of names, each tensor equal to float32 round-off."""
    assert expected.keys() == got.keys() and len(expected) > 0
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


def _without_bytecode_switch(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment minus PYTHONDONTWRITEBYTECODE: launched processes import torch (and DeepSpeed) from
    source, which with that switch set is compiled anew in every process (about 10 s each here); without it
    the first launch caches the bytecode for the others."""
    return {k: v for k, v in environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def run_two_processes(
    folder: Path, settings: dict[str, Any], prelude: str = "", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`diffsynth-train` with `settings` as flags in two CPU processes (gloo) started by torch.distributed.run,
    with `env` added to the environment; asserts that it succeeded and returns the finished process (its stderr
    holds the log)."""
    launcher = folder / f"launch_{free_port()}.py"
    launcher.write_text(_LAUNCHER.format(prelude=prelude))
    flags = [(f"--{k}" if v else f"--no-{k}") if isinstance(v, bool) else f"--{k}={v}" for k, v in settings.items()]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    done = subprocess.run(
        [*command, str(launcher), __file__, *flags],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**_without_bytecode_switch(os.environ), **(env or {})},
    )
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    return done
