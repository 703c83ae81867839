"""One denoising step of the full-size Qwen-Image DiT (20B), ours vs diffusers, on the same GPU.

Random weights (the same tensors for both: the official checkpoint names are diffusers' own, so
diffusers' model takes ours by assignment and both fit on one card), bf16, 1328x1328 (6889 packed
image tokens), a caption of `--caption-len` tokens, batch 1. Reports seconds per step, achieved
TFLOP/s, peak memory and how far the two outputs are apart, and appends a JSON record to
benchmarks/results/qwen_image_dit_step.jsonl with the card and torch version.

    python benchmarks/bench_qwen_image.py [--steps 5] [--warmup 2] [--height 1328 --width 1328]
    python benchmarks/bench_qwen_image.py --tiny --device cpu   # a dry run of the script, nothing recorded
"""

from __future__ import annotations

import torch
from common import compare_steps, parse_step_args, random_model, share_weights, step_parser


def flops_per_step(cfg, image_tokens: int, text_tokens: int) -> float:
    """Matmul FLOPs of one forward (2 * MACs): projections, MLPs (4x) and joint attention."""
    d, n = cfg.inner_dim, image_tokens + text_tokens
    block = 4 * n * d * d + 2 * n * d * 4 * d + 2 * n * n * d
    return 2 * cfg.num_layers * block


def tiny_config():
    from diffsynth.qwen_image.dit import QwenImageDiTConfig

    return QwenImageDiTConfig(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=(4, 6, 6),
    )  # fmt: skip


def diffusers_qwen(cfg):
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel(
        patch_size=cfg.patch_size,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        num_layers=cfg.num_layers,
        attention_head_dim=cfg.attention_head_dim,
        num_attention_heads=cfg.num_attention_heads,
        joint_attention_dim=cfg.joint_attention_dim,
        axes_dims_rope=tuple(cfg.axes_dims_rope),
    )


def main() -> None:
    args = parse_step_args(step_parser(__doc__.splitlines()[0], 5, 2, 1328, 1328, 256))

    from accelerate import init_empty_weights

    from diffsynth.qwen_image.dit import QwenImageDiT, QwenImageDiTConfig

    device = torch.device(args.device)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    cfg = tiny_config() if args.tiny else QwenImageDiTConfig()
    ours = random_model(lambda: QwenImageDiT(cfg), device, dtype)
    with init_empty_weights():
        reference = diffusers_qwen(cfg)
    reference = share_weights(reference, ours.state_dict(), device)

    h, w = args.height // 16, args.width // 16  # 8x VAE, 2x2 patches
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(1, h * w, cfg.in_channels, device=device, dtype=dtype, generator=g)
    text = torch.randn(1, args.caption_len, cfg.joint_attention_dim, device=device, dtype=dtype, generator=g)
    mask = torch.ones(1, args.caption_len, dtype=torch.bool, device=device)
    t = torch.tensor([0.5], device=device)
    shapes = [[(1, h, w)]]

    def ours_step():
        return ours(x, t, text, mask, shapes)

    def reference_step():
        return reference(
            hidden_states=x,
            encoder_hidden_states=text,
            encoder_hidden_states_mask=mask,
            timestep=t,
            img_shapes=shapes,
            return_dict=False,
        )[0]

    compare_steps(
        "qwen_image_dit_step",
        ours_step,
        reference_step,
        flops_per_step(cfg, h * w, args.caption_len),
        args,
        model="tiny" if args.tiny else "Qwen-Image DiT (random weights)",
        dtype=str(dtype),
        image_tokens=h * w,
        text_tokens=args.caption_len,
    )


if __name__ == "__main__":
    main()
