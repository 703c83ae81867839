"""One denoising step of the full-size Z-Image DiT, ours vs diffusers, on the same GPU.

Random weights (the same tensors for both, shared by assignment), bf16, 1024x1024 (64x64 latent patches -> 4096 image tokens), a
caption of `--caption-len` tokens, batch 1. Reports seconds per step, achieved TFLOP/s and peak
memory and how far the two outputs are apart, and appends a JSON record to benchmarks/results/ with
the card and torch version.

    python benchmarks/bench_z_image_dit.py [--steps 10] [--warmup 3] [--height 1024 --width 1024]
    python benchmarks/bench_z_image_dit.py --tiny --device cpu   # a dry run of the script, nothing recorded
"""

from __future__ import annotations

import argparse

import torch
from common import max_abs_diff, random_model, record, share_weights, timed


def flops_per_step(cfg, image_tokens: int, text_tokens: int) -> float:
    """Matmul FLOPs of one forward (2 * MACs); attention included, elementwise ignored."""
    d, ffn = cfg.dim, cfg.ffn_hidden_dim if hasattr(cfg, "ffn_hidden_dim") else int(cfg.dim / 3 * 8)

    def block(tokens):
        proj = 4 * tokens * d * d
        attn = 2 * tokens * tokens * d
        mlp = 3 * tokens * d * ffn
        return 2 * (proj + attn + mlp)

    total = image_tokens + text_tokens
    return cfg.n_layers * block(total) + cfg.n_refiner_layers * (block(image_tokens) + block(text_tokens))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--caption-len", type=int, default=128)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny config: check the script runs (CPU is fine)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU (or --tiny --device cpu for a dry run)")

    from accelerate import init_empty_weights
    from diffusers import ZImageTransformer2DModel

    from diffsynth.z_image.dit import ZImageDiT, ZImageDiTConfig

    device = torch.device(args.device)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    tiny = dict(dim=64, n_layers=2, n_refiner_layers=1, n_heads=4, n_kv_heads=4, cap_feat_dim=32, axes_dims=(4, 6, 6))
    cfg = ZImageDiTConfig(**tiny) if args.tiny else ZImageDiTConfig()
    ours = random_model(lambda: ZImageDiT(cfg), device, dtype)
    with init_empty_weights():
        ref = ZImageTransformer2DModel(
            dim=cfg.dim,
            n_layers=cfg.n_layers,
            n_refiner_layers=cfg.n_refiner_layers,
            n_heads=cfg.n_heads,
            n_kv_heads=cfg.n_kv_heads,
            cap_feat_dim=cfg.cap_feat_dim,
            axes_dims=list(cfg.axes_dims),
            axes_lens=list(cfg.axes_lens),
        )
    ref = share_weights(ref, ours.state_dict(), device)

    h, w = args.height // 8, args.width // 8
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(1, cfg.in_channels, h, w, device=device, dtype=dtype, generator=g)
    t = torch.tensor([0.5], device=device)
    text = [torch.randn(args.caption_len, cfg.cap_feat_dim, device=device, dtype=dtype, generator=g)]
    image_tokens = (h // 2) * (w // 2)
    flops = flops_per_step(cfg, image_tokens, args.caption_len)
    x_list = list(x.unsqueeze(2).unbind(0))

    def ours_step():
        return ours(x, t, text)

    def reference_step():
        return ref(x_list, t, text, return_dict=False)

    results = {}
    with torch.inference_mode():
        got, want = ours_step(), reference_step()[0][0].squeeze(1)
        agreement = max_abs_diff(got[0], want)
        results["diffsynth"] = timed(ours_step, args.steps, args.warmup)
        results["diffusers"] = timed(reference_step, args.steps, args.warmup)
    record(
        "z_image_dit_step",
        {
            "image_tokens": image_tokens,
            "text_tokens": args.caption_len,
            "model": "tiny" if args.tiny else "Z-Image DiT (random weights)",
            "agreement": agreement,
            "results": {
                name: {"s_per_step": s, "tflops": flops / s / 1e12, "peak_gib": mem}
                for name, (s, mem) in results.items()
            },
        },
        save=not args.tiny,
    )


if __name__ == "__main__":
    main()
