"""One rank of test_parallel.py (run as a script by `run_ranks`, 2 ranks): LTX-2 DiT calls divided over the ranks
give what one process gives, which every rank also computes for itself.

`sequence`: the video tokens are divided (27 of them: one rank holds padding), the audio stays whole;
`batch`: the rows of a call are divided. Both through the pipeline (CFG, STG and modality isolation in one
4-row call, an image-to-video first frame with per-token timesteps and a keyframe), with and without the
first-block cache, and on a bare DiT whose attention skips leave one rank's rows partly, wholly or not skipped.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffsynth.ltx2.dit import AttentionSkip, LTX2DiT, LTX2DiTConfig
from diffsynth.runtime.parallel import init_parallel
from diffsynth.runtime.testing.weights import random_weights

# 9 frames of 96 x 96 -> 2 x 3 x 3 latent tokens, plus a keyframe's 3 x 3: 27 video tokens
HEIGHT = WIDTH = 96
TOKENS = 27
# the relative first-block changes of this tiny random DiT run from 0.63 to 0.89: this threshold reuses the
# later steps and not the second
THRESHOLD = 0.8


def close(got, want):
    print(f"max abs difference {(got - want).abs().max().item():.2e}", flush=True)  # shown when a rank fails
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


def record_inputs(block) -> list[tuple[int, int, int]]:
    """[rows, video tokens, audio tokens] entering `block`: what this rank really computed."""
    seen = []
    block.register_forward_pre_hook(lambda module, args: seen.append((*args[0].shape[:2], args[1].shape[1])))
    return seen


def load_repo_module():
    spec = importlib.util.spec_from_file_location("ltx2_repo", Path(__file__).with_name("ltx2_repo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def picture(seed: int) -> Image.Image:
    small = np.random.default_rng(seed).integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((WIDTH, HEIGHT), Image.BILINEAR)


# ----------------------------------------------------------------------------------------- pipeline
def check_pipeline(base: str, sequence: int, batch: int) -> None:
    repo = load_repo_module()
    pipe = repo.our_pipeline(Path(base))
    # the tiny file's DiT has one video head (the runtime's gathered-K/V fallback); Ulysses proper divides the
    # heads, so give the pipeline a 2-head DiT
    config = replace(repo.tiny_configs()["dit"], num_heads=2, head_dim=64)
    pipe.dit = random_weights(LTX2DiT(config), 3, scale=0.2).eval()
    options = dict(
        negative_prompt=repo.CAPTIONS[3], cfg_scale=3.0, audio_cfg_scale=5.0, stg_scale=1.0, modality_scale=3.0,
        spatio_temporal_guidance_blocks=[1], input_images=[picture(1), picture(2)], input_images_indexes=[0, 8],
        image_crf=0, height=HEIGHT, width=WIDTH, num_frames=9, num_inference_steps=5,
        max_sequence_length=repo.MAX_SEQUENCE_LENGTH, output_type="pt", progress_bar=False,
    )  # fmt: skip

    def run():
        frames, audio = pipe(repo.CAPTIONS[0], seed=0, **options)
        return frames, audio.waveform

    seen = record_inputs(pipe.dit.transformer_blocks[0])
    want = run()
    full = seen[-1]
    assert full[:2] == (4, TOKENS), full  # cond, uncond, STG, isolated: one call
    cache = pipe.enable_first_block_cache(THRESHOLD)["dit"]
    want_cached = run()
    want_reused = (cache.calls, cache.skipped)
    assert 0 < cache.skipped < cache.calls, cache
    pipe.disable_first_block_cache()

    groups = pipe.enable_parallel(sequence=sequence, batch=batch)
    assert pipe.dit.parallel is groups
    for got, expected in zip(run(), want, strict=True):
        close(got, expected)
    # this rank's rows and video tokens (half of 27, rounded up); the audio tokens whole
    assert seen[-1] == (4 // batch, -(-TOKENS // sequence), full[2]), seen[-1]
    cache = pipe.enable_first_block_cache(THRESHOLD)["dit"]
    for got, expected in zip(run(), want_cached, strict=True):
        close(got, expected)
    assert (cache.calls, cache.skipped) == want_reused, (cache, want_reused)


# ----------------------------------------------------------------------------------------- bare DiT
def check_dit(sequence: int, batch: int, version: str) -> None:
    """`version="2.3"`: LTX-2.3's gated attentions, text AdaLN (from each stream's sigma) and cross-modal
    timesteps; its text contexts come at the stream widths (no caption projection)."""
    config = LTX2DiTConfig(
        in_channels=4, out_channels=4, num_heads=2, head_dim=8, audio_in_channels=4, audio_out_channels=4,
        audio_num_heads=2, audio_head_dim=4, num_layers=3, caption_channels=16,
    )  # fmt: skip
    if version == "2.3":
        config = replace(config, gated_attention=True, cross_attention_adaln=True, caption_projection=False)
    model = random_weights(LTX2DiT(config), 0, scale=0.2).eval()
    g = torch.Generator().manual_seed(1)
    rows = 4
    video, audio = torch.randn(rows, TOKENS, 4, generator=g), torch.randn(rows, 7, 4, generator=g)
    widths = (16, 16) if version == "2.0" else (config.dim, config.audio_dim)
    text = torch.randn(rows, 5, widths[0], generator=g), torch.randn(rows, 5, widths[1], generator=g)
    mask = torch.ones(rows, 5, dtype=torch.bool)
    mask[1:, 3:] = False
    timestep = (1000 * torch.rand(rows, 1, generator=g)).expand(rows, TOKENS).clone()
    timestep[:, :9] = 0.0  # a clean first latent frame
    # rows 2 and 3 skip the video self-attention in block 0 (one rank's rows wholly under batch parallelism),
    # row 1 the audio self-attention in block 1 (partly), rows 0 and 3 both cross-modal attentions everywhere
    skips = [
        AttentionSkip("video_self", (0,), (2, 3)),
        AttentionSkip("audio_self", (1,), (1,)),
        AttentionSkip("a2v", None, (0, 3)),
        AttentionSkip("v2a", None, (0, 3)),
    ]
    kwargs = dict(
        audio_timestep=torch.full((rows,), 500.0), video_context_mask=mask, audio_context_mask=mask,
        num_frames=3, height=3, width=3, fps=24.0,
    )  # fmt: skip
    with torch.no_grad():
        want = [model(video, audio, *text, timestep, skips=s, **kwargs) for s in (skips, ())]
        seen = record_inputs(model.transformer_blocks[0])
        model.parallel = init_parallel(sequence, batch)
        for s, expected in zip((skips, ()), want, strict=True):
            for got, wanted in zip(model(video, audio, *text, timestep, skips=s, **kwargs), expected, strict=True):
                close(got, wanted)
    assert seen == [(rows // batch, -(-TOKENS // sequence), 7)] * 2, seen


def main(base: str, mode: str) -> None:
    sequence, batch = {"sequence": (2, 1), "batch": (1, 2)}[mode]
    check_pipeline(base, sequence, batch)
    for version in ("2.0", "2.3"):
        check_dit(sequence, batch, version)


if __name__ == "__main__":
    for mode in sys.argv[2].split(","):  # several modes in one launch: one process start-up for all
        main(sys.argv[1], mode)
