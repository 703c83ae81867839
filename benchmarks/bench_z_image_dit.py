"""One denoising step of the full-size Z-Image DiT, ours vs diffusers, on the same GPU.

Random weights (same for both), bf16, 1024x1024 (64x64 latent patches -> 4096 image tokens), a
caption of `--caption-len` tokens, batch 1. Reports seconds per step, achieved TFLOP/s and peak
memory, and appends a JSON record to benchmarks/results/ with the card and torch version.

    python benchmarks/bench_z_image_dit.py [--steps 10] [--warmup 3] [--height 1024 --width 1024]
"""

from __future__ import annotations

import argparse

import torch
from common import record, require_cuda, timed


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
    args = parser.parse_args()
    require_cuda()

    from diffusers import ZImageTransformer2DModel

    from diffsynth.z_image.dit import ZImageDiT, ZImageDiTConfig

    device, dtype = torch.device("cuda"), torch.bfloat16
    cfg = ZImageDiTConfig()
    torch.manual_seed(0)
    ours = ZImageDiT(cfg).to(device=device, dtype=dtype).eval()
    ref = ZImageTransformer2DModel(axes_lens=list(cfg.axes_lens)).to(device=device, dtype=dtype).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)

    h, w = args.height // 8, args.width // 8
    x = torch.randn(1, cfg.in_channels, h, w, device=device, dtype=dtype)
    t = torch.tensor([0.5], device=device)
    text = [torch.randn(args.caption_len, cfg.cap_feat_dim, device=device, dtype=dtype)]
    image_tokens = (h // 2) * (w // 2)
    flops = flops_per_step(cfg, image_tokens, args.caption_len)

    results = {}
    with torch.inference_mode():
        results["diffsynth"] = timed(lambda: ours(x, t, text), args.steps, args.warmup)
        x_list = list(x.unsqueeze(2).unbind(0))

        def reference_step():
            return ref(x_list, t, text, return_dict=False)

        results["diffusers"] = timed(reference_step, args.steps, args.warmup)
    record(
        "z_image_dit_step",
        {
            "image_tokens": image_tokens,
            "text_tokens": args.caption_len,
            "results": {
                name: {"s_per_step": s, "tflops": flops / s / 1e12, "peak_gib": mem}
                for name, (s, mem) in results.items()
            },
        },
    )


if __name__ == "__main__":
    main()
