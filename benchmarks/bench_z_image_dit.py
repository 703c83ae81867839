"""One denoising step of the full-size Z-Image DiT, ours vs diffusers, on the same GPU.

Random weights (the same tensors for both, shared by assignment), bf16, 1024x1024 (64x64 latent patches -> 4096 image tokens), a
caption of `--caption-len` tokens, batch 1. Reports seconds per step, achieved TFLOP/s and peak
memory and how far the two outputs are apart, and appends a JSON record to benchmarks/results/ with
the card and torch version.

    python benchmarks/bench_z_image_dit.py [--steps 10] [--warmup 3] [--height 1024 --width 1024]
    python benchmarks/bench_z_image_dit.py --tiny --device cpu   # a dry run of the script, nothing recorded
"""

from __future__ import annotations

import torch
from common import compare_steps, diffusers_z_image, parse_step_args, random_model, step_parser


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
    args = parse_step_args(step_parser(__doc__.splitlines()[0], 10, 3, 1024, 1024, 128))

    from diffsynth.z_image.dit import ZImageDiT, ZImageDiTConfig

    device = torch.device(args.device)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    tiny = dict(dim=64, n_layers=2, n_refiner_layers=1, n_heads=4, n_kv_heads=4, cap_feat_dim=32, axes_dims=(4, 6, 6))
    cfg = ZImageDiTConfig(**tiny) if args.tiny else ZImageDiTConfig()
    ours = random_model(lambda: ZImageDiT(cfg), device, dtype)
    ref = diffusers_z_image(cfg, ours, device)

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

    def reference_step():  # diffusers returns a list of [C, 1, H, W]
        return torch.stack([o.squeeze(1) for o in ref(x_list, t, text, return_dict=False)[0]])

    compare_steps(
        "z_image_dit_step",
        ours_step,
        reference_step,
        flops,
        args,
        model="tiny" if args.tiny else "Z-Image DiT (random weights)",
        image_tokens=image_tokens,
        text_tokens=args.caption_len,
    )


if __name__ == "__main__":
    main()
