"""Wan2.1-T2V-1.3B on one GPU, ours vs diffusers: one DiT step and the VAE decode of a whole video.

Random weights (the same for both sides), bf16, 832x480x81 (21 latent frames, 32760 tokens) by
default. Reports s/step and peak memory for the DiT, and s and peak memory for decoding 81 frames
tiled and untiled, and appends a JSON record (card, torch version, command) to
benchmarks/results/wan.jsonl.

    python benchmarks/bench_wan.py [--steps 5] [--warmup 2] [--height 480 --width 832 --frames 81]
"""

from __future__ import annotations

import argparse

import torch
from common import record, require_cuda, timed


def timed_dict(fn, steps: int, warmup: int) -> dict:
    seconds, peak = timed(fn, steps, warmup)
    return {"s": seconds, "peak_gib": peak}


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
        out["diffsynth"] = timed_dict(lambda: ours(x, t, context), args.steps, args.warmup)
        out["diffusers"] = timed_dict(lambda: ref(x, t, context, return_dict=False), args.steps, args.warmup)
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
        out["diffsynth_untiled"] = timed_dict(lambda: ours.decode(z), 1, 0)
        out["diffsynth_tiled"] = timed_dict(lambda: ours.decode(z, tiled=True), 1, 0)
        out["diffusers_untiled"] = timed_dict(lambda: ref.decode(z, return_dict=False), 1, 0)
        ref.enable_tiling()
        out["diffusers_tiled"] = timed_dict(lambda: ref.decode(z, return_dict=False), 1, 0)
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
    require_cuda()
    device, dtype = torch.device("cuda"), torch.bfloat16
    fields = {"dit_step": bench_dit(args, device, dtype)}
    if not args.skip_vae:
        fields["vae_decode"] = bench_vae(args, device, dtype)
    record("wan", fields)


if __name__ == "__main__":
    main()
