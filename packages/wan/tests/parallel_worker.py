"""One rank of test_parallel.py (run as a script by `run_ranks`, 2 ranks): Wan DiT calls divided over the ranks
give what one process gives, which every rank also computes for itself.

`sequence`: the video tokens are divided (an odd count, so one rank holds padding), with per-token timesteps,
I2V channels and CLIP keys on a bare DiT, with VACE control tokens on a bare VACE DiT, and through the Wan 2.2 A14B pipeline (both experts) with and without
the first-block cache. `batch`: the positive and negative halves of a CFG step are divided (the pipeline merges
them into one call), on the same pipeline and on a bare DiT with per-token timesteps.
"""

from __future__ import annotations

import sys

import torch

from diffsynth.runtime.parallel import init_parallel
from diffsynth.runtime.testing.weights import random_weights
from diffsynth.wan import WanVideoPipeline
from diffsynth.wan.dit import WanDiT, WanDiTConfig

PROMPT = "a red circle on a blue background"
# 48 x 48 pixels, 9 frames -> a latent [16, 3, 6, 6] -> 3 x 3 x 3 = 27 tokens: odd, so the ranks pad
OPTIONS = {"height": 48, "width": 48, "num_frames": 9, "num_inference_steps": 6, "negative_prompt": "bad quality"}
OPTIONS |= {"cfg_scale": 4.0, "cfg_scale_2": 3.0, "switch_DiT_boundary": 0.875, "tiled": False}
OPTIONS |= {"output_type": "pt", "progress_bar": False}
TOKENS = 27
# the relative first-block changes of these tiny random experts lie between 0.3 and 1.4: this threshold
# reuses some calls and not others (checked below)
THRESHOLD = 0.9
TEA_THRESHOLD = 1.0


def close(got, want):
    print(f"max abs difference {(got - want).abs().max().item():.2e}", flush=True)  # shown when a rank fails
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


def record_inputs(*blocks) -> list[tuple[int, int]]:
    """[batch, tokens] entering each of `blocks`: what this rank really computed."""
    seen = []
    for block in blocks:
        block.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[:2])))
    return seen


# ----------------------------------------------------------------------------------------- bare DiT
def dit_inputs(model: WanDiT):
    """A batch of 2 on a 3 x 3 x 3 token grid with I2V channels, CLIP features and per-token timesteps
    (the first frame's 9 tokens at t = 0, as TI2V gives them)."""
    g = torch.Generator().manual_seed(1)
    cfg = model.config
    x = torch.randn(2, cfg.out_dim, 3, 6, 6, generator=g)
    y = torch.randn(2, cfg.in_dim - cfg.out_dim, 3, 6, 6, generator=g)
    context = torch.randn(2, 7, cfg.text_dim, generator=g)
    clip = torch.randn(2, 5, cfg.image_dim, generator=g)
    per_token = torch.tensor([[700.0], [300.0]]).expand(2, TOKENS).clone()
    per_token[:, :9] = 0.0
    return x, per_token, context, clip, y


def check_dit(sequence: int, batch: int) -> None:
    config = WanDiTConfig(
        dim=32, ffn_dim=64, num_heads=2, num_layers=2, freq_dim=32, text_len=16, in_dim=20, out_dim=8, text_dim=24,
        model_type="i2v", has_image_input=True, image_dim=16,
    )  # fmt: skip
    model = random_weights(WanDiT(config), 0, scale=0.2).eval()
    x, per_token, context, clip, y = dit_inputs(model)
    with torch.no_grad():
        want = [model(x, t, context, clip, y) for t in (per_token, torch.tensor([700.0, 300.0]))]
        seen = record_inputs(model.blocks[0])
        model.parallel = init_parallel(sequence, batch)
        for t, expected in zip((per_token, torch.tensor([700.0, 300.0])), want, strict=True):
            close(model(x, t, context, clip, y), expected)
    assert seen == [(2 // batch, -(-TOKENS // sequence))] * 2, seen


def check_vace_dit(sequence: int, batch: int) -> None:
    """A VACE DiT: the control tokens are divided like the video tokens (a control one frame short, so its
    last frame's tokens are zeros that span the ranks' boundary), per-layer scales."""
    config = WanDiTConfig(
        dim=32, ffn_dim=64, num_heads=2, num_layers=3, freq_dim=32, text_len=16, in_dim=8, out_dim=8, text_dim=24,
        vace_layers=(0, 2), vace_in_dim=12,
    )  # fmt: skip
    model = random_weights(WanDiT(config), 0, scale=0.2).eval()
    x, _, context, _, _ = dit_inputs(model)
    control = torch.randn(2, 12, 2, 6, 6, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([700.0, 300.0])
    with torch.no_grad():
        want = model(x, t, context, vace_context=control, vace_scale=(0.5, 1.5))
        seen = record_inputs(model.vace_blocks[1])
        model.parallel = init_parallel(sequence, batch)
        close(model(x, t, context, vace_context=control, vace_scale=(0.5, 1.5)), want)
    assert seen == [(2 // batch, -(-TOKENS // sequence))], seen


# ----------------------------------------------------------------------------------------- pipeline
def check_pipeline(repo: str, sequence: int, batch: int) -> None:
    pipe = WanVideoPipeline.from_pretrained(repo, torch_dtype="float32", device="cpu")
    assert pipe.dit2 is not None
    # one process: the two CFG branches as two calls (the default) and as one batched call
    want = pipe(PROMPT, seed=0, **OPTIONS)
    close(pipe(PROMPT, seed=0, cfg_merge=True, **OPTIONS), want)
    merged = batch > 1  # batch parallelism divides a merged call: its cache sees one call per step
    caches = pipe.enable_first_block_cache(THRESHOLD)
    want_cached = pipe(PROMPT, seed=0, cfg_merge=merged, **OPTIONS)
    want_reused = {slot: (c.calls, c.skipped) for slot, c in caches.items()}
    assert all(0 < skipped < calls for calls, skipped in want_reused.values()), want_reused
    pipe.disable_first_block_cache()
    # TeaCache (an identity polynomial: these tiny experts' modulation changes 0.3 to 1.1 per step)
    tea = pipe.enable_tea_cache(TEA_THRESHOLD, coefficients=(1.0, 0.0))
    want_tea = pipe(PROMPT, seed=0, cfg_merge=merged, **OPTIONS)
    want_tea_reused = {slot: (c.calls, c.skipped) for slot, c in tea.items()}
    assert any(skipped for _, skipped in want_tea_reused.values()), want_tea_reused
    pipe.disable_tea_cache()

    seen = record_inputs(pipe.dit.blocks[0], pipe.dit2.blocks[0])
    groups = pipe.enable_parallel(sequence=sequence, batch=batch)
    assert pipe.dit.parallel is groups and pipe.dit2.parallel is groups
    close(pipe(PROMPT, seed=0, **OPTIONS), want)
    # every call of either expert: half of the 27 tokens (rounded up), or one of the two CFG rows
    rows, tokens = (2, TOKENS) if merged else (1, TOKENS)
    assert set(seen) == {(rows // batch, -(-tokens // sequence))}, set(seen)
    # the cache decides on every rank's part together: the same calls are reused as in one process
    caches = pipe.enable_first_block_cache(THRESHOLD)
    close(pipe(PROMPT, seed=0, **OPTIONS), want_cached)
    assert {slot: (c.calls, c.skipped) for slot, c in caches.items()} == want_reused
    pipe.disable_first_block_cache()
    tea = pipe.enable_tea_cache(TEA_THRESHOLD, coefficients=(1.0, 0.0))
    close(pipe(PROMPT, seed=0, **OPTIONS), want_tea)
    assert {slot: (c.calls, c.skipped) for slot, c in tea.items()} == want_tea_reused


def main(repo: str, mode: str) -> None:
    sequence, batch = {"sequence": (2, 1), "batch": (1, 2)}[mode]
    check_pipeline(repo, sequence, batch)
    check_dit(sequence, batch)
    check_vace_dit(sequence, batch)


if __name__ == "__main__":
    for mode in sys.argv[2].split(","):  # several modes in one launch: one process start-up for all
        main(sys.argv[1], mode)
