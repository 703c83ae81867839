"""One denoising step of a full-size FLUX.2 DiT (klein-4B by default), ours vs diffusers, on the same GPU.

Random weights shared by both models (diffusers' is loaded from ours through `ours_to_diffusers`, by
assignment), bf16, 1024x1024 (4096 packed image tokens), a prompt of `--caption-len` tokens (the pipelines pad
to 512), batch 1, optionally `--references N` 1024x1024 reference images appended (editing). FLUX.2-dev
(`--variant dev`, 32B: about 65 GB of bf16 weights) needs an 80 GB card. Reports seconds per step, achieved
TFLOP/s, peak memory and how far the two outputs are apart, and appends a JSON record to
benchmarks/results/flux2_dit_step.jsonl with the card and torch version.

    python benchmarks/bench_flux2.py [--variant klein-4b|klein-9b|dev] [--references 1] [--steps 10]
    python benchmarks/bench_flux2.py --tiny --device cpu   # a dry run of the script, nothing recorded
"""

from __future__ import annotations

import torch
from common import compare_steps, parse_step_args, random_model, share_weights, step_parser


def flops_per_step(cfg, image_tokens: int, text_tokens: int) -> float:
    """Matmul FLOPs of one forward (2 * MACs): projections, SwiGLU MLPs and attention; embedders ignored."""
    d, mlp, n = cfg.hidden_size, cfg.mlp_hidden_dim, image_tokens + text_tokens
    attention = 2 * n * n * d
    double = 4 * n * d * d + 3 * n * d * mlp + attention  # qkv + proj, MLP in (2 x mlp) and out, both streams
    single = n * d * (3 * d + 2 * mlp) + n * (d + mlp) * d + attention  # linear1, linear2
    return 2 * (cfg.depth * double + cfg.depth_single_blocks * single)


def tiny_config():
    from diffsynth.flux.flux2.dit import Flux2DiTConfig

    return Flux2DiTConfig(
        in_channels=16, out_channels=16, context_in_dim=24, hidden_size=32, num_heads=2, depth=1,
        depth_single_blocks=1, axes_dim=(4, 4, 4, 4), guidance_embed=True,
    )  # fmt: skip


def diffusers_flux2(cfg):
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        num_layers=cfg.depth,
        num_single_layers=cfg.depth_single_blocks,
        attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.num_heads,
        joint_attention_dim=cfg.context_in_dim,
        mlp_ratio=cfg.mlp_ratio,
        axes_dims_rope=cfg.axes_dim,
        rope_theta=int(cfg.theta),
        guidance_embeds=cfg.guidance_embed,
    )


def grid_ids(h: int, w: int, t: int) -> torch.Tensor:
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([torch.full_like(rows, t), rows, cols, torch.zeros_like(rows)], -1).reshape(-1, 4)


def main() -> None:
    parser = step_parser(__doc__.splitlines()[0], 10, 3, 1024, 1024, 512)
    parser.add_argument("--variant", default="klein-4b", choices=["klein-4b", "klein-9b", "dev"])
    parser.add_argument("--references", type=int, default=0, help="reference images of the output's size appended")
    args = parse_step_args(parser)

    from diffsynth.flux.flux2.dit import Flux2DiT, Flux2DiTConfig
    from diffsynth.flux.flux2.formats import ours_to_diffusers

    device = torch.device(args.device)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    cfg = tiny_config() if args.tiny else Flux2DiTConfig.variant(args.variant)
    ours = random_model(lambda: Flux2DiT(cfg), device, dtype)
    from accelerate import init_empty_weights

    with init_empty_weights():
        reference = diffusers_flux2(cfg)
    reference = share_weights(reference, ours_to_diffusers(ours.state_dict()), device)

    h, w = args.height // 16, args.width // 16  # packed 2x2 latent patches
    tokens = h * w * (1 + args.references)
    g = torch.Generator(device).manual_seed(0)
    img = torch.randn(1, tokens, cfg.in_channels, device=device, dtype=dtype, generator=g)
    img_ids = torch.cat([grid_ids(h, w, 10 * i) for i in range(1 + args.references)])[None].to(device)
    txt = torch.randn(1, args.caption_len, cfg.context_in_dim, device=device, dtype=dtype, generator=g)
    txt_ids = torch.zeros(1, args.caption_len, 4, device=device, dtype=torch.long)
    txt_ids[..., 3] = torch.arange(args.caption_len, device=device)
    t = torch.tensor([0.5], device=device)
    # 0.5 * 1000 and 4 * 1000 are exact in bf16, where diffusers scales them (ours scales in float32)
    guidance = torch.tensor([4.0], device=device) if cfg.guidance_embed else None

    def ours_step():
        return ours(img, img_ids, txt, txt_ids, t, guidance)

    def reference_step():
        return reference(
            hidden_states=img,
            encoder_hidden_states=txt,
            timestep=t,
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=guidance,
            return_dict=False,
        )[0]

    compare_steps(
        "flux2_dit_step",
        ours_step,
        reference_step,
        flops_per_step(cfg, tokens, args.caption_len),
        args,
        model="tiny" if args.tiny else f"FLUX.2-{args.variant} DiT (random weights)",
        dtype=str(dtype),
        image_tokens=tokens,
        text_tokens=args.caption_len,
    )


if __name__ == "__main__":
    main()
