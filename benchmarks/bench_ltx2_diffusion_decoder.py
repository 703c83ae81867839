"""LTX-2.5's diffusion video decoder, ours vs diffusers', decoding the same latents on the same GPU.

Random weights shared by both (diffusers' `LTX2VideoDiffusionDecoderModel` gets ours through `ours_to_diffusers`,
by assignment), bf16, one clip at the authors' first-stage size by default (768x512, 121 frames: latents 16 x 16 x
24), tiled as both decode by default (768 px / 80 frames tiles, 64 px / 24 frames overlaps; each tile draws its own
noise in the same order, so the two outputs should agree to bf16 rounding). Reports seconds per decode, peak memory
and how far the outputs are apart, and appends a JSON record to benchmarks/results/ltx2_diffusion_decoder.jsonl
with the card and torch version. diffusers' neighbourhood attention without NATTEN is flex attention, which
unless compiled materialises every score: a failure on its side is recorded, not raised.

    python benchmarks/bench_ltx2_diffusion_decoder.py [--height 512 --width 768 --num-frames 121] [--steps 2]
    python benchmarks/bench_ltx2_diffusion_decoder.py --tiny --device cpu --num-frames 17   # dry run, not recorded

A `--tiny` run fails unless both decoders agree to `TINY_TOLERANCE` (fp32), so the dry run catches a regression.
Give it at least 17 frames (3 latent frames): with 2 the authors' and diffusers' decoders differ by design.
"""

from __future__ import annotations

import torch
from common import max_abs_diff, parse_step_args, random_model, record, share_weights, step_parser, timed

TINY_TOLERANCE = 1e-4  # fp32 max abs difference the tiny dry run allows (it measures ~1e-5)
TILES = dict(frames=80, frame_stride=56, height=768, height_stride=704, width=768, width_stride=704)


def tiny_config():
    from diffsynth.ltx2.diffusion_decoder import LTX2DiffusionDecoderConfig

    return LTX2DiffusionDecoderConfig(
        latent_channels=8, head_dim=8, stage_channels=(32, 16, 16, 16, 16), stage_depths=(1, 1, 1, 1, 1),
        stage_kernels=((3, 1, 1), (3, 3, 3), (3, 3, 3), (3, 3, 3)), upsample_reductions=(2, 1, 1, 1),
        stage5_kernel=(3, 5, 5), t_emb_dim=32,
    )  # fmt: skip


def diffusers_decoder(cfg, tiles: dict):
    from accelerate import init_empty_weights
    from diffusers import LTX2VideoDiffusionDecoderModel

    with init_empty_weights():
        model = LTX2VideoDiffusionDecoderModel(
            latent_channels=cfg.latent_channels, out_channels=cfg.out_channels, patch_size=cfg.patch_size,
            decoder_head_dim=cfg.head_dim, decoder_stage_channels=cfg.stage_channels,
            decoder_stage_depths=cfg.stage_depths, decoder_stage_kernels=cfg.stage_kernels,
            decoder_upsample_strides=cfg.upsample_strides,
            decoder_upsample_channel_reductions=cfg.upsample_reductions, decoder_stage5_kernel=cfg.stage5_kernel,
            decoder_t_emb_dim=cfg.t_emb_dim, spatial_compression_ratio=cfg.spatial_compression,
            temporal_compression_ratio=cfg.temporal_compression,
        )  # fmt: skip
    model.enable_tiling(
        tile_sample_min_num_frames=tiles["frames"], tile_sample_stride_num_frames=tiles["frame_stride"],
        tile_sample_min_height=tiles["height"], tile_sample_stride_height=tiles["height_stride"],
        tile_sample_min_width=tiles["width"], tile_sample_stride_width=tiles["width_stride"],
    )  # fmt: skip
    return model


def check_tiny_agreement(agreement: dict | None, diffusers_result: dict) -> None:
    """In fp32 the two decoders compute the same thing: a dry run that disagrees (or fails) is a regression."""
    if agreement is None:
        raise RuntimeError(f"tiny run: diffusers' decoder failed: {diffusers_result.get('error')}")
    if not agreement["finite"] or not agreement["max_abs_diff"] <= TINY_TOLERANCE:
        raise RuntimeError(
            f"tiny run: ours and diffusers' decoders differ by {agreement['max_abs_diff']:.3g} "
            f"(allowed {TINY_TOLERANCE}); with fewer than 17 frames they differ by design"
        )


def main() -> None:
    parser = step_parser(__doc__.splitlines()[0], 2, 1, 512, 768, 0)
    parser.add_argument("--num-frames", type=int, default=121, help="video frames (8k + 1)")
    args = parse_step_args(parser)

    from diffsynth.ltx2.diffusion_decoder import DecoderTiles, LTX2DiffusionDecoder, LTX2DiffusionDecoderConfig
    from diffsynth.ltx2.diffusion_decoder_formats import ours_to_diffusers

    device = torch.device(args.device)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    cfg = tiny_config() if args.tiny else LTX2DiffusionDecoderConfig()
    tiles = {k: v // 2 for k, v in TILES.items()} if args.tiny else TILES
    ours = random_model(lambda: LTX2DiffusionDecoder(cfg), device, dtype)
    with torch.no_grad():  # positive latent statistics
        ours.per_channel_statistics.get_buffer("std-of-means").fill_(1.0)
    reference = share_weights(diffusers_decoder(cfg, tiles), ours_to_diffusers(ours.state_dict()), device)

    s, tc = cfg.spatial_compression, cfg.temporal_compression
    shape = (1, cfg.latent_channels, (args.num_frames - 1) // tc + 1, args.height // s, args.width // s)
    latents = torch.randn(shape, device=device, dtype=dtype, generator=torch.Generator(device).manual_seed(0))
    stats = ours.per_channel_statistics
    raw = latents * stats.get_buffer("std-of-means").view(1, -1, 1, 1, 1).to(dtype)
    raw = raw + stats.get_buffer("mean-of-means").view(1, -1, 1, 1, 1).to(dtype)

    def ours_decode():
        generator = torch.Generator(device).manual_seed(1)
        return ours.decode(latents, generator=generator, clamp=False, tiles=DecoderTiles(**tiles))

    def reference_decode():
        return reference.decode(raw, generator=torch.Generator(device).manual_seed(1)).sample

    results, agreement = {}, None
    with torch.inference_mode():
        seconds, peak = timed(ours_decode, args.steps, args.warmup)
        results["diffsynth"] = {"s_per_decode": seconds, "peak_gib": peak}
        try:
            agreement = max_abs_diff(ours_decode(), reference_decode())
            seconds, peak = timed(reference_decode, args.steps, args.warmup)
            results["diffusers"] = {"s_per_decode": seconds, "peak_gib": peak}
        except (RuntimeError, torch.OutOfMemoryError) as exc:  # recorded: diffusers' uncompiled flex attention
            results["diffusers"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    record(
        "ltx2_diffusion_decoder",
        {
            "model": "tiny" if args.tiny else "LTX-2.5 diffusion decoder (random weights)",
            "dtype": str(dtype),
            "latents": list(shape),
            "video": [args.num_frames, args.height, args.width],
            "tiles": tiles,
            "agreement": agreement,
            "results": results,
        },
        save=not args.tiny,
    )
    if args.tiny:
        check_tiny_agreement(agreement, results["diffusers"])


if __name__ == "__main__":
    main()
