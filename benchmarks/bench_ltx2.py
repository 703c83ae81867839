"""One denoising step of the full-size LTX-2 19B audio-video DiT, ours vs diffusers, on the same GPU.

Random weights shared by both models (diffusers' `LTX2VideoTransformer3DModel` is loaded from ours through
`ours_to_diffusers`, by assignment: about 38 GB of bf16 weights once), bf16, batch 1, the authors' first-stage
size by default: 768x512, 121 frames at 24 fps (16 x 24 x 16 = 6144 video tokens, 126 audio tokens), prompts
of `--caption-len` connector tokens (the pipeline pads to 1024). Reports seconds per step, approximate
matmul TFLOP/s, peak memory and how far the two outputs are apart, and appends a JSON record to
benchmarks/results/ltx2_dit_step.jsonl with the card and torch version.

    python benchmarks/bench_ltx2.py [--height 512 --width 768 --num-frames 121] [--steps 5]
    python benchmarks/bench_ltx2.py --tiny --device cpu   # a dry run of the script, nothing recorded
"""

from __future__ import annotations

import torch
from common import compare_steps, parse_step_args, random_model, share_weights, step_parser

AUDIO_LATENTS_PER_SECOND = 25  # 16 kHz mel, hop 160, 4x compressed


def flops_per_step(cfg, video: int, audio: int, text: int) -> float:
    """Approximate matmul FLOPs of one forward (2 * MACs): the projections, attention products and 4x MLPs of
    both streams, their text cross-attentions and the audio<->video attentions; embedders and norms ignored."""
    d, a = cfg.dim, cfg.audio_dim

    def stream(n: int, width: int) -> float:
        self_attention = 4 * n * width * width + 2 * n * n * width
        cross = 2 * n * width * width + 2 * text * width * width + 2 * n * text * width
        return self_attention + cross + 8 * n * width * width

    between = (2 * video * d * a + 2 * audio * a * a + 2 * video * audio * a) * 2  # a2v and v2a, inner width a
    return 2 * cfg.num_layers * (stream(video, d) + stream(audio, a) + between)


def tiny_config():
    from diffsynth.ltx2.dit import LTX2DiTConfig

    return LTX2DiTConfig(
        in_channels=8, out_channels=8, num_heads=2, head_dim=16, audio_in_channels=8, audio_out_channels=8,
        audio_num_heads=2, audio_head_dim=8, num_layers=2, caption_channels=32,
    )  # fmt: skip


def diffusers_ltx2(cfg):
    from diffusers import LTX2VideoTransformer3DModel

    from diffsynth.ltx2.dit_formats import diffusers_config

    return LTX2VideoTransformer3DModel(**diffusers_config(cfg))


def main() -> None:
    parser = step_parser(__doc__.splitlines()[0], 5, 2, 512, 768, 1024)
    parser.add_argument("--num-frames", type=int, default=121, help="video frames (8k + 1)")
    parser.add_argument("--fps", type=float, default=24.0)
    args = parse_step_args(parser)

    from diffsynth.ltx2.dit import LTX2DiT, LTX2DiTConfig
    from diffsynth.ltx2.dit_formats import ours_to_diffusers

    device = torch.device(args.device)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    cfg = tiny_config() if args.tiny else LTX2DiTConfig()
    ours = random_model(lambda: LTX2DiT(cfg), device, dtype)
    from accelerate import init_empty_weights

    with init_empty_weights():
        reference = diffusers_ltx2(cfg)
    reference = share_weights(reference, ours_to_diffusers(ours.state_dict()), device)

    f, h, w = (args.num_frames - 1) // 8 + 1, args.height // 32, args.width // 32
    audio_frames = max(1, round(args.num_frames / args.fps * AUDIO_LATENTS_PER_SECOND))
    g = torch.Generator(device).manual_seed(0)
    video = torch.randn(1, f * h * w, cfg.in_channels, device=device, dtype=dtype, generator=g)
    audio = torch.randn(1, audio_frames, cfg.audio_in_channels, device=device, dtype=dtype, generator=g)
    video_text = torch.randn(1, args.caption_len, cfg.caption_channels, device=device, dtype=dtype, generator=g)
    audio_text = torch.randn(1, args.caption_len, cfg.caption_channels, device=device, dtype=dtype, generator=g)
    mask = torch.ones(1, args.caption_len, dtype=torch.bool, device=device)
    t = torch.tensor([500.0], device=device)  # exact in bf16
    sizes = dict(num_frames=f, height=h, width=w, fps=args.fps)

    def both(outputs) -> torch.Tensor:  # one tensor, so the agreement covers the video and the audio stream
        return torch.cat([o.flatten() for o in outputs])

    def ours_step():
        return both(
            ours(video, audio, video_text, audio_text, t, video_context_mask=mask, audio_context_mask=mask, **sizes)
        )

    def reference_step():
        return both(
            reference(
                hidden_states=video,
                audio_hidden_states=audio,
                encoder_hidden_states=video_text,
                audio_encoder_hidden_states=audio_text,
                timestep=t,
                encoder_attention_mask=mask,
                audio_encoder_attention_mask=mask,
                audio_num_frames=audio_frames,
                return_dict=False,
                **sizes,
            )
        )

    compare_steps(
        "ltx2_dit_step",
        ours_step,
        reference_step,
        flops_per_step(cfg, f * h * w, audio_frames, args.caption_len),
        args,
        model="tiny" if args.tiny else "LTX-2 19B DiT (random weights)",
        dtype=str(dtype),
        video_tokens=f * h * w,
        audio_tokens=audio_frames,
        text_tokens=args.caption_len,
    )


if __name__ == "__main__":
    main()
