"""Step cache cost per DiT call, ours vs diffusers' FirstBlockCache (and our TeaCache), FLUX.1-dev DiT, one GPU.

How many steps a threshold reuses depends on the real weights' trajectory, which random weights do
not have; what a benchmark can measure is the price of each kind of call, and that is what decides
the speed-up for a given reuse rate:
- `full`: the plain call (no cache);
- `checked`: a call with the cache on that runs every block (threshold 0): the plain call plus the
  residual bookkeeping and the host-side decision;
- `reused`: a call that runs the first block only (threshold inf): what a skipped step costs.
The same for diffusers (`enable_cache(FirstBlockCacheConfig(...))` on the same weights, calls in a `cache_context`).
Ours also for TeaCache (`tea_checked`, `tea_reused`; diffusers has none): a reused TeaCache call runs the first
double block only, for its modulated input.
A run that reuses a fraction r of the calls costs about `(1 - r) * checked + r * reused` per call.
Random weights shared by both (see bench_flux.py), bf16, 1024x1024, batch 1; results are appended
to benchmarks/results/step_cache.jsonl with the card and torch version.

    python benchmarks/bench_step_cache.py [--steps 10] [--warmup 3]
    python benchmarks/bench_step_cache.py --tiny --device cpu   # a dry run of the script, nothing recorded
"""

from __future__ import annotations

import torch
from bench_flux import setup
from common import max_abs_diff, parse_step_args, record, step_parser, timed


def main() -> None:
    args = parse_step_args(step_parser(__doc__.splitlines()[0], 10, 3, 1024, 1024, 512))

    from diffusers.hooks import FirstBlockCacheConfig

    from diffsynth.runtime.step_cache import FirstBlockCache, TeaCache

    _, ours, reference, ours_call, reference_step, image_tokens, dtype = setup(args)

    def reference_call():
        with reference.cache_context("cond"):  # diffusers' cache keeps its state per named context
            return reference_step()

    results = {"diffsynth": {}, "diffusers": {}}
    with torch.inference_mode():
        plain = ours_call()
        results["diffsynth"]["full"] = timed(ours_call, args.steps, args.warmup)
        results["diffusers"]["full"] = timed(reference_call, args.steps, args.warmup)
        for kind, threshold in (("checked", 0.0), ("reused", float("inf"))):
            cache = ours.step_cache = FirstBlockCache(threshold)
            cache.begin_loop()

            def ours_cached(cache=cache):
                cache.begin_step()
                return ours_call()

            ours_cached()  # the first call of a loop always runs in full
            results["diffsynth"][kind] = timed(ours_cached, args.steps, args.warmup)
            if kind == "reused":
                reused_ours = ours_cached()
            ours.step_cache = None

            reference.enable_cache(FirstBlockCacheConfig(threshold=threshold))
            reference_call()
            results["diffusers"][kind] = timed(reference_call, args.steps, args.warmup)
            if kind == "reused":
                reused_reference = reference_call()
            reference.disable_cache()

            # TeaCache: at threshold 0 the FLUX.1 polynomial (positive) runs every call, at inf it reuses them
            # (a loop of unknown length has no last step to run in full)
            tea = ours.step_cache = TeaCache(threshold, ours.tea_cache_coefficients["FLUX.1"])
            tea.begin_loop()

            def ours_tea(cache=tea):
                cache.begin_step()
                return ours_call()

            ours_tea()
            results["diffsynth"][f"tea_{kind}"] = timed(ours_tea, args.steps, args.warmup)
            ours.step_cache = None
    record(
        "step_cache",
        {
            "model": "tiny" if args.tiny else "FLUX.1-dev DiT (random weights)",
            "dtype": str(dtype),
            "image_tokens": image_tokens,
            "text_tokens": args.caption_len,
            # a reused call on the same input as the full one returns (nearly) the full output
            "reused_vs_full": {
                "diffsynth": max_abs_diff(reused_ours, plain),
                "diffusers": max_abs_diff(reused_reference, plain),
            },
            "results": {
                side: {kind: {"s_per_call": s, "peak_gib": mem} for kind, (s, mem) in kinds.items()}
                for side, kinds in results.items()
            },
        },
        save=not args.tiny,
    )


if __name__ == "__main__":
    main()
