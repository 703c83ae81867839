"""One rank of test_parallel.py (run as a script by `run_ranks`): FLUX.1 and FLUX.2 calls divided over the
ranks give what one process gives, which every rank also computes for itself.

The tiny models are seeded, so they are identical on every rank. Token counts are odd on purpose (the
last sequence shard is padded); the FLUX.1 DiT is also checked with Kontext reference tokens, ControlNet
residuals, EliGen-style masks and IP-Adapter keys, and the first-block cache must reuse the steps one
process reuses.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
from helpers import cached_calls, dit_inputs, image_ids, make_dit, our_pipeline, tiny_dit_config

from diffsynth.flux.flux1.ip_adapter import IPAdapterKV
from diffsynth.flux.flux2.dit import Flux2DiT, Flux2DiTConfig
from diffsynth.runtime.testing.distributed import check_parallel_pipeline
from diffsynth.runtime.testing.weights import random_weights

# float32 sums taken in another order (shards, all-to-all) differ in the 6th digit: on an AMD EPYC the
# FLUX.2 DiT's outputs (up to about 3 in size) differed by 2.3e-5
ATOL, RTOL = 2e-5, 1e-5


def close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL, msg=lambda m: f"{what}: {m}")


def record_first_block(blocks: torch.nn.ModuleList) -> list[tuple[int, int]]:
    """[batch, image tokens] entering the first double block on each call: what this rank really computed."""
    seen = []
    blocks[0].register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[:2])))
    return seen


def check_cache(model, calls, threshold: float, groups, what: str) -> None:
    """A first-block cache over `calls` (one per step) reuses the same steps under `groups` as in one process."""
    model.parallel = None
    want, cache = cached_calls(model, threshold, calls)
    reused = cache.skipped
    assert 0 < reused < cache.calls, f"{what}: threshold {threshold} should reuse some steps, not all ({cache})"
    model.parallel = groups
    got, cache = cached_calls(model, threshold, calls)
    assert cache.skipped == reused, f"{what}: {cache.skipped} steps reused, one process reused {reused}"
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        close(g, w, f"{what} step {step}")


def steps(noise: torch.Tensor, clean: torch.Tensor, make_args) -> list[tuple]:
    """The DiT's inputs at six noise levels of a short trajectory."""
    return [make_args(clean * (1 - s) + noise * s, s) for s in torch.linspace(1.0, 0.3, 6).tolist()]


# ------------------------------------------------------------------ FLUX.1
def check_flux1_pipeline(repo: str, sequence: int, batch: int):
    """The path users take: `pipe.enable_parallel`; true CFG runs both branches as one batched call."""
    pipe = our_pipeline(repo)
    seen = record_first_block(pipe.dit.double_blocks)
    options = dict(
        negative_prompt="blurry",
        cfg_scale=2.0,
        seed=0,
        height=48,  # 3 x 3 image tokens: the last sequence shard is padded
        width=48,
        num_inference_steps=4,
        t5_sequence_length=16,
        output_type="pt",
        progress_bar=False,
    )

    def run(**extra):
        return pipe("a red circle on a blue background", **{**options, **extra})

    # TeaCache over 6 steps at 0.5 reuses 2 of the 4 calls it may reuse (first and last run in full)
    tea = {"num_inference_steps": 6, "tea_cache_l1_thresh": 0.5}
    tea_full_calls = []
    pipe.dit.single_blocks[-1].register_forward_hook(lambda m, i, o: tea_full_calls.append(0))
    want_tea, tea_full = run(**tea), len(tea_full_calls)
    assert tea_full == 4, tea_full
    # the tiny random DiT changes a lot from step to step (relative first-block change 0.76, 0.86, 0.96):
    # this threshold reuses some steps, not all

    def check_shards():  # this rank's share of the batch and of the image tokens (seen[0]: one process's)
        assert seen[-1] == (seen[0][0] // batch, math.ceil(seen[0][1] / sequence)), (seen[-1], seen[0])

    groups, _ = check_parallel_pipeline(pipe, run, 0.9, sequence, batch, close, check_shards)
    # TeaCache decides on every rank's image rows together (padding left out): the same calls run in full
    tea_full_calls.clear()
    close(run(**tea), want_tea, "FLUX.1 pipeline, TeaCache")
    assert len(tea_full_calls) == tea_full, (len(tea_full_calls), tea_full)
    return groups


def check_flux1_dit(groups, sequence: int, batch: int) -> None:
    dit = make_dit()
    seen = record_first_block(dit.double_blocks)
    img, ids, txt, txt_ids, t, y, guidance = dit_inputs(batch=2, grid=(3, 5), txt_len=7)
    g = torch.Generator().manual_seed(3)
    # Kontext: reference tokens follow the noisy ones in the image stream (15 + 4 = 19 tokens)
    kontext = torch.randn(2, 4, 16, generator=g)
    img, ids = torch.cat([img, kontext], 1), torch.cat([ids, image_ids(2, 2, first=1.0)], 1)
    n_txt, n_img = txt.shape[1], img.shape[1]
    joint = n_txt + n_img
    eye = torch.eye(joint, dtype=torch.bool)
    heads_mask = torch.where((torch.rand(1, 2, joint, joint, generator=g) > 0.3) | eye, 0.0, float("-inf"))
    ip = IPAdapterKV(
        double=[tuple(torch.randn(2, 3, 2, 16, generator=g) for _ in "kv") for _ in dit.double_blocks],
        single=[tuple(torch.randn(1, 3, 2, 16, generator=g) for _ in "kv") for _ in dit.single_blocks],
        scale=0.7,
    )
    cases = {
        "plain": {},
        # residuals of the 15 noisy tokens only; one list shared by the batch ([1, L, D]), one per sample
        "controlnet": dict(
            controlnet_block_samples=[0.3 * torch.randn(2, 15, 32, generator=g)],
            controlnet_single_block_samples=[
                0.3 * torch.randn(1, 15, 32, generator=g),
                0.3 * torch.randn(2, 15, 32, generator=g),
            ],
        ),
        "eligen mask": dict(attn_mask=(torch.rand(2, 1, joint, joint, generator=g) > 0.3) | eye),
        "per-head mask": dict(attn_mask=heads_mask),
        "ip-adapter": dict(ip_adapter=ip),
    }
    args = (img, ids, txt, txt_ids, t, y, guidance)
    with torch.no_grad():
        for name, kwargs in cases.items():
            dit.parallel = None
            want = dit(*args, **kwargs)
            dit.parallel = groups
            close(dit(*args, **kwargs), want, f"FLUX.1 DiT, {name}")
            assert seen[-1] == (2 // batch, math.ceil(n_img / sequence)), (name, seen[-1])

    noise = torch.randn(img.shape, generator=g)
    calls = steps(noise, img, lambda x, s: (x, ids, txt, txt_ids, torch.full((2,), s), y, guidance))
    # the relative first-block changes of these steps are 0.92, 0.94, 1.09, 1.66, 1.05
    check_cache(dit, calls, 1.0, groups, "FLUX.1 DiT cache")

    # 3 heads do not divide over 2 ranks: the runtime gathers keys and values instead of exchanging heads,
    # and the masks then keep this rank's query rows with every head
    dit = make_dit(tiny_dit_config(hidden_size=48, num_heads=3), seed=1)
    heads_mask = torch.where((torch.rand(1, 3, joint, joint, generator=g) > 0.3) | eye, 0.0, float("-inf"))
    with torch.no_grad():
        for name, kwargs in {
            "plain": {},
            "eligen mask": cases["eligen mask"],
            "per-head mask": {"attn_mask": heads_mask},
        }.items():
            dit.parallel = None
            want = dit(*args, **kwargs)
            dit.parallel = groups
            close(dit(*args, **kwargs), want, f"FLUX.1 DiT with 3 heads, {name}")


# ------------------------------------------------------------------ FLUX.2
def make_flux2_dit() -> Flux2DiT:
    config = Flux2DiTConfig(
        in_channels=16,
        out_channels=16,
        context_in_dim=32,
        hidden_size=32,
        num_heads=2,
        depth=2,
        depth_single_blocks=2,
        axes_dim=(4, 4, 4, 4),
    )
    return random_weights(Flux2DiT(config), 0, scale=0.2, is_norm=lambda name, p: name.endswith(".scale"))


def flux2_ids(height: int, width: int, t: int = 0) -> torch.Tensor:
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return torch.stack([torch.full_like(rows, t), rows, cols, torch.zeros_like(rows)], dim=-1).reshape(-1, 4)


def check_flux2_dit(groups, sequence: int, batch: int) -> None:
    dit = make_flux2_dit()
    seen = record_first_block(dit.double_blocks)
    g = torch.Generator().manual_seed(4)
    # 3 x 3 image tokens and a 1 x 2 reference image: 11 tokens in the image stream
    img = torch.randn(2, 11, 16, generator=g)
    ids = torch.cat([flux2_ids(3, 3), flux2_ids(1, 2, t=10)])
    txt = torch.randn(2, 5, 32, generator=g)
    txt_ids = torch.zeros(5, 4, dtype=torch.long)
    txt_ids[:, 3] = torch.arange(5)
    t, guidance = torch.rand(2, generator=g), 1.0 + 4.0 * torch.rand(2, generator=g)
    with torch.no_grad():
        dit.parallel = None
        want = dit(img, ids, txt, txt_ids, t, guidance)
        dit.parallel = groups
        close(dit(img, ids, txt, txt_ids, t, guidance), want, "FLUX.2 DiT")
    assert seen[-1] == (2 // batch, math.ceil(11 / sequence)), seen[-1]

    noise = torch.randn(img.shape, generator=g)
    calls = steps(noise, img, lambda x, s: (x, ids, txt, txt_ids, torch.full((2,), s), guidance))
    # the relative first-block changes of these steps are 1.13, 3.11, 1.17, 1.22, 1.31
    check_cache(dit, calls, 1.2, groups, "FLUX.2 DiT cache")


def check_flux2_pipeline(repo: str, sequence: int, batch: int) -> None:
    """FLUX.2-klein with CFG (one batched call) and a reference image (its tokens join the image stream)."""
    from flux2_repo import our_pipeline as flux2_pipeline
    from helpers import random_image

    pipe = flux2_pipeline(Path(repo))
    seen = record_first_block(pipe.dit.double_blocks)
    options = dict(edit_image=random_image(64, 80, seed=3), cfg_scale=4.0, seed=0, height=48, width=48)
    options.update(num_inference_steps=2, output_type="pt", progress_bar=False)
    want = pipe("a red circle on a blue background", **options)
    full = seen[-1]
    pipe.enable_parallel(sequence=sequence, batch=batch)
    close(pipe("a red circle on a blue background", **options), want, "FLUX.2 pipeline")
    assert seen[-1] == (full[0] // batch, math.ceil(full[1] / sequence)), (seen[-1], full)


def main(repo: str, klein_repo: str, sequence: int, batch: int) -> None:
    torch.set_num_threads(1)
    groups = check_flux1_pipeline(repo, sequence, batch)
    check_flux1_dit(groups, sequence, batch)
    check_flux2_dit(groups, sequence, batch)
    check_flux2_pipeline(klein_repo, sequence, batch)


if __name__ == "__main__":
    for layout in sys.argv[3].split(","):  # "SxB,...": several layouts in one launch, one process start-up
        sequence, batch = (int(n) for n in layout.split("x"))
        main(sys.argv[1], sys.argv[2], sequence, batch)
