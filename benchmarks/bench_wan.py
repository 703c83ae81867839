"""Wan2.1-T2V-1.3B on one GPU, ours vs diffusers: one DiT step and the VAE decode of a whole video.

Random weights (the same for both sides), bf16, 832x480x81 (21 latent frames, 32760 tokens) by
default. Reports s/step and peak memory for the DiT, and s and peak memory for decoding 81 frames
tiled and untiled, and appends a JSON record (card, torch version, command) to
benchmarks/results/wan.jsonl.

    python benchmarks/bench_wan.py [--steps 5] [--warmup 2] [--height 480 --width 832 --frames 81]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import torch


def timed(fn, steps: int, warmup: int) -> dict:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    return {"s": (time.perf_counter() - start) / steps, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def bench_dit(args, device, dtype) -> dict:
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    from diffsynth.wan.dit import WanDiT, WanDiTConfig

    cfg = WanDiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30)  # Wan2.1-T2V-1.3B
    torch.manual_seed(0)
    ours = WanDiT(cfg).to(device=device, dtype=dtype).eval()
    ref = WanTransformer3DModel(num_attention_heads=12, ffn_dim=8960, num_layers=30).to(device=device, dtype=dtype)
    ref.load_state_dict(convert_wan_transformer_to_diffusers(dict(ours.state_dict())), strict=True)
    ref.eval()
    frames = 1 + (args.frames - 1) // 4
    x = torch.randn(1, 16, frames, args.height // 8, args.width // 8, device=device, dtype=dtype)
    t = torch.tensor([500.0], device=device)
    context = torch.randn(1, 512, 4096, device=device, dtype=dtype)
    out = {}
    with torch.inference_mode():
        out["diffsynth"] = timed(lambda: ours(x, t, context), args.steps, args.warmup)
        out["diffusers"] = timed(lambda: ref(x, t, context, return_dict=False), args.steps, args.warmup)
    return out  # the models go out of scope here, before the VAE runs


def bench_vae(args, device, dtype) -> dict:
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    from diffsynth.runtime.models.wan_vae import WanVAE, WanVAEConfig

    torch.manual_seed(0)
    ours = WanVAE(WanVAEConfig()).to(device=device, dtype=dtype).eval()
    ref = AutoencoderKLWan().to(device=device, dtype=dtype).eval()
    ref.load_state_dict(convert_wan_vae_to_diffusers(dict(ours.state_dict())), strict=True)
    frames = 1 + (args.frames - 1) // 4
    z = torch.randn(1, 16, frames, args.height // 8, args.width // 8, device=device, dtype=dtype)
    out = {}
    with torch.inference_mode():
        out["diffsynth_untiled"] = timed(lambda: ours.decode(z), 1, 0)
        out["diffsynth_tiled"] = timed(lambda: ours.decode(z, tiled=True), 1, 0)
        out["diffusers_untiled"] = timed(lambda: ref.decode(z, return_dict=False), 1, 0)
        ref.enable_tiling()
        out["diffusers_tiled"] = timed(lambda: ref.decode(z, return_dict=False), 1, 0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--skip-vae", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    device, dtype = torch.device("cuda"), torch.bfloat16
    record = {
        "benchmark": "wan21_t2v_1_3b",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "card": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": "python benchmarks/bench_wan.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not False),
        "dit_step": bench_dit(args, device, dtype),
    }
    if not args.skip_vae:
        record["vae_decode"] = bench_vae(args, device, dtype)
    print(json.dumps(record, indent=2))
    out = Path(__file__).parent / "results" / "wan.jsonl"
    out.parent.mkdir(exist_ok=True)
    with out.open("a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
