"""One rank of test_parallel.py (run as a script by `run_ranks`): Qwen-Image calls divided over the ranks give
what one process gives, which every rank also computes for itself.

The tiny models are seeded, so they are identical on every rank. Token counts are odd on purpose (the last
sequence shard is padded), prompts have different lengths (text masks), and the DiT is also checked as an
Edit-2511 model (reference tokens in the image stream, `zero_cond_t` doubling the modulation batch inside
each rank's part of the batch) and with ControlNet residuals (divided with the image tokens and the batch).
The first-block cache must reuse the steps one process reuses.
"""

from __future__ import annotations

import math
import sys

import torch

from diffsynth.qwen_image import QwenImagePipeline
from diffsynth.qwen_image.dit import QwenImageDiT, QwenImageDiTConfig
from diffsynth.runtime.step_cache import FirstBlockCache
from diffsynth.runtime.testing.distributed import check_parallel_pipeline
from diffsynth.runtime.testing.weights import random_weights

ATOL = 2e-5
PROMPTS = ["a red circle on a blue background", "a small green square in the top left corner of a white page"]


def assert_shape(seen: tuple[int, int], want: tuple[int, int]) -> None:
    """[batch, image tokens] this rank computed against what its share should be."""
    assert seen == want, (seen, want)


def close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0, msg=lambda m: f"{what}: {m}")


def record_first_block(dit: QwenImageDiT) -> list[tuple[int, int]]:
    """[batch, image tokens] entering the first block on each call: what this rank really computed."""
    seen = []
    dit.transformer_blocks[0].register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[:2])))
    return seen


def check_pipeline(repo: str, sequence: int, batch: int):
    """The path users take: `pipe.enable_parallel`. Qwen-Image runs the negative prompt as its own call, so
    batch parallelism divides the two prompts of each call."""
    pipe = QwenImagePipeline.from_pretrained(repo, torch_dtype="float32", device="cpu")
    seen = record_first_block(pipe.dit)
    options = dict(
        negative_prompt="blurry",
        cfg_scale=4.0,
        seed=0,
        height=48,  # 3 x 3 image tokens: the last sequence shard is padded
        width=48,
        num_inference_steps=4,
        output_type="pt",
        progress_bar=False,
    )

    def run():
        return pipe(PROMPTS, **options)

    # relative first-block changes of the tiny random DiT (positive, negative call): steps 2 and 3 of 4 1.62,
    # 1.64 and 0.77, 0.78, then step 4 against step 2 0.90, 0.90: this threshold reuses step 3 only
    groups, _ = check_parallel_pipeline(
        pipe, run, 0.85, sequence, batch, close,
        lambda: assert_shape(seen[-1], (seen[0][0] // batch, math.ceil(seen[0][1] / sequence))),
    )  # fmt: skip
    return groups


def make_dit(zero_cond_t: bool) -> QwenImageDiT:
    config = QwenImageDiTConfig(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=3,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        axes_dims_rope=(4, 6, 6),
        zero_cond_t=zero_cond_t,
    )
    return random_weights(QwenImageDiT(config), 0)


def check_dit(groups, sequence: int, batch: int) -> None:
    """An Edit-2511 DiT: a 3 x 3 image and a 2 x 2 reference (13 tokens), texts of 5 and 9 tokens (masked); also
    given two ControlNet residuals of the image's 9 tokens (spread over the 3 blocks, divided with the tokens)."""
    g = torch.Generator().manual_seed(1)
    shapes = [[(1, 3, 3), (1, 2, 2)]] * 2
    x = torch.randn(2, 13, 16, generator=g)
    t = torch.rand(2, generator=g)
    text = torch.randn(2, 9, 32, generator=g)
    mask = torch.arange(9)[None] < torch.tensor([5, 9])[:, None]
    control = [torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(2 + i)) for i in range(2)]
    for zero_cond_t in (False, True):
        dit = make_dit(zero_cond_t)
        seen = record_first_block(dit)
        with torch.no_grad():
            want = dit(x, t, text, mask, shapes)
            want_control = dit(x, t, text, mask, shapes, controlnet_block_samples=control)
            dit.parallel = groups
            close(dit(x, t, text, mask, shapes), want, f"DiT (zero_cond_t={zero_cond_t})")
            got = dit(x, t, text, mask, shapes, controlnet_block_samples=control)
            close(got, want_control, f"DiT with ControlNet residuals (zero_cond_t={zero_cond_t})")
        assert seen[-1] == (2 // batch, math.ceil(13 / sequence)), seen[-1]

    # the cache over six steps of a trajectory (relative first-block changes 0.54, 0.94, 1.00, 0.61, 0.56)
    noise = torch.randn(x.shape, generator=g)
    calls = [(x * (1 - s) + noise * s, torch.full((2,), s), text, mask, shapes) for s in torch.linspace(1, 0.3, 6)]
    runs = []
    for parallel in (None, groups):
        dit.parallel = parallel
        cache = dit.step_cache = FirstBlockCache(0.58)
        cache.begin_loop()
        outs = []
        with torch.no_grad():
            for args in calls:
                cache.begin_step()
                outs.append(dit(*args))
        runs.append((outs, cache.skipped))
    (want, reused), (got, got_reused) = runs
    assert 0 < reused < len(calls) and got_reused == reused, (reused, got_reused)
    for step, (a, b) in enumerate(zip(got, want, strict=True)):
        close(a, b, f"DiT cache step {step}")


def main(repo: str, sequence: int, batch: int) -> None:
    torch.set_num_threads(1)
    groups = check_pipeline(repo, sequence, batch)
    check_dit(groups, sequence, batch)


if __name__ == "__main__":
    for layout in sys.argv[2].split(","):  # "SxB,...": several layouts in one launch, one process start-up
        sequence, batch = (int(n) for n in layout.split("x"))
        main(sys.argv[1], sequence, batch)
