"""One denoising step of the full-size FLUX.1-dev DiT, ours vs diffusers, on the same GPU.

Random weights (the same tensors for both: diffusers' model is loaded from ours through
`ours_to_diffusers`, by assignment, so both fit on one card), bf16, 1024x1024 (4096 packed image
tokens), a T5 caption of `--caption-len` tokens, embedded guidance 4, batch 1. Reports seconds per
step, achieved TFLOP/s, peak memory and how far the two outputs are apart, and appends a JSON record
to benchmarks/results/flux_dit_step.jsonl with the card and torch version.

    python benchmarks/bench_flux.py [--steps 10] [--warmup 3] [--height 1024 --width 1024]
    python benchmarks/bench_flux.py --tiny --device cpu   # a dry run of the script, nothing recorded
"""

from __future__ import annotations

import torch
from common import compare_steps, parse_step_args, random_model, share_weights, step_parser


def flops_per_step(cfg, image_tokens: int, text_tokens: int) -> float:
    """Matmul FLOPs of one forward (2 * MACs): projections, MLPs and attention; embedders ignored."""
    d, mlp, n = cfg.hidden_size, cfg.mlp_hidden_dim, image_tokens + text_tokens
    attention = 2 * n * n * d
    double = 4 * n * d * d + 2 * n * d * mlp + attention  # qkv + proj, MLP, per stream summed over tokens
    single = n * d * (3 * d + mlp) + n * (d + mlp) * d + attention  # linear1, linear2
    return 2 * (cfg.depth * double + cfg.depth_single_blocks * single)


def tiny_config():
    from diffsynth.flux.flux1.dit import Flux1DiTConfig

    return Flux1DiTConfig(
        in_channels=16, out_channels=16, vec_in_dim=24, context_in_dim=32, hidden_size=32, num_heads=2,
        depth=1, depth_single_blocks=1, axes_dim=(4, 6, 6),
    )  # fmt: skip


def diffusers_flux(cfg):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        num_layers=cfg.depth,
        num_single_layers=cfg.depth_single_blocks,
        attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.num_heads,
        joint_attention_dim=cfg.context_in_dim,
        pooled_projection_dim=cfg.vec_in_dim,
        guidance_embeds=cfg.guidance_embed,
        axes_dims_rope=cfg.axes_dim,
    )


def setup(args):
    """Our full-size (or `--tiny`) DiT and diffusers' on the same random weights, one call of each on
    the same inputs, and the sizes: `(cfg, ours, reference, ours_step, reference_step, image_tokens, dtype)`."""
    from accelerate import init_empty_weights

    from diffsynth.flux.flux1.dit import Flux1DiT, Flux1DiTConfig
    from diffsynth.flux.flux1.formats import ours_to_diffusers

    device = torch.device(args.device)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    cfg = tiny_config() if args.tiny else Flux1DiTConfig()
    ours = random_model(lambda: Flux1DiT(cfg), device, dtype)
    with init_empty_weights():
        reference = diffusers_flux(cfg)
    reference = share_weights(reference, ours_to_diffusers(ours.state_dict()), device)

    h, w = args.height // 16, args.width // 16  # packed 2x2 latent patches
    g = torch.Generator(device).manual_seed(0)
    img = torch.randn(1, h * w, cfg.in_channels, device=device, dtype=dtype, generator=g)
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(1, -1, 3).to(device, torch.float32)
    txt = torch.randn(1, args.caption_len, cfg.context_in_dim, device=device, dtype=dtype, generator=g)
    txt_ids = torch.zeros(1, args.caption_len, 3, device=device)
    y = torch.randn(1, cfg.vec_in_dim, device=device, dtype=dtype, generator=g)
    t = torch.tensor([0.5], device=device)
    # diffusers (like BFL's reference) scales timestep and guidance by 1000 in the model dtype; in bf16 3.5 * 1000
    # rounds to 3504, which shifts the sinusoidal embedding's fast components, while ours scales in float32. Both
    # 0.5 * 1000 and 4 * 1000 are exact in bf16, so the outputs compare like for like.
    guidance = torch.tensor([4.0], device=device)

    def ours_step():
        return ours(img, img_ids, txt, txt_ids, t, y, guidance)

    def reference_step():
        return reference(
            hidden_states=img,
            encoder_hidden_states=txt,
            pooled_projections=y,
            timestep=t,
            img_ids=img_ids[0],
            txt_ids=txt_ids[0],
            guidance=guidance,
            return_dict=False,
        )[0]

    return cfg, ours, reference, ours_step, reference_step, h * w, dtype


def main() -> None:
    args = parse_step_args(step_parser(__doc__.splitlines()[0], 10, 3, 1024, 1024, 512))
    cfg, _, _, ours_step, reference_step, image_tokens, dtype = setup(args)
    compare_steps(
        "flux_dit_step",
        ours_step,
        reference_step,
        flops_per_step(cfg, image_tokens, args.caption_len),
        args,
        model="tiny" if args.tiny else "FLUX.1-dev DiT (random weights)",
        dtype=str(dtype),
        image_tokens=image_tokens,
        text_tokens=args.caption_len,
    )


if __name__ == "__main__":
    main()
