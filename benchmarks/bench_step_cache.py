"""First-block cache cost per DiT call, ours vs diffusers' FirstBlockCache, FLUX.1-dev DiT on one GPU.

How many steps a threshold reuses depends on the real weights' trajectory, which random weights do
not have; what a benchmark can measure is the price of each kind of call, and that is what decides
the speed-up for a given reuse rate:
- `full`: the plain call (no cache);
- `checked`: a call with the cache on that runs every block (threshold 0): the plain call plus the
  residual bookkeeping and the host-side decision;
- `reused`: a call that runs the first block only (threshold inf): what a skipped step costs.
The same for diffusers (`enable_cache(FirstBlockCacheConfig(...))` on the same weights, calls in a `cache_context`).
A run that reuses a fraction r of the calls costs about `(1 - r) * checked + r * reused` per call.
Random weights shared by both (see bench_flux.py), bf16, 1024x1024, batch 1; results are appended
to benchmarks/results/step_cache.jsonl with the card and torch version.

    python benchmarks/bench_step_cache.py [--steps 10] [--warmup 3]
    python benchmarks/bench_step_cache.py --tiny --device cpu   # a dry run of the script, nothing recorded
"""

from __future__ import annotations

import torch
from bench_flux import diffusers_flux, tiny_config
from common import max_abs_diff, parse_step_args, random_model, record, share_weights, step_parser, timed


def main() -> None:
    args = parse_step_args(step_parser(__doc__.splitlines()[0], 10, 3, 1024, 1024, 512))

    from accelerate import init_empty_weights
    from diffusers.hooks import FirstBlockCacheConfig

    from diffsynth.flux.flux1.dit import Flux1DiT, Flux1DiTConfig
    from diffsynth.flux.flux1.formats import ours_to_diffusers
    from diffsynth.runtime.step_cache import FirstBlockCache

    device = torch.device(args.device)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    cfg = tiny_config() if args.tiny else Flux1DiTConfig()
    ours = random_model(lambda: Flux1DiT(cfg), device, dtype)
    with init_empty_weights():
        reference = diffusers_flux(cfg)
    reference = share_weights(reference, ours_to_diffusers(ours.state_dict()), device)

    h, w = args.height // 16, args.width // 16
    g = torch.Generator(device).manual_seed(0)
    img = torch.randn(1, h * w, cfg.in_channels, device=device, dtype=dtype, generator=g)
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(1, -1, 3).to(device, torch.float32)
    txt = torch.randn(1, args.caption_len, cfg.context_in_dim, device=device, dtype=dtype, generator=g)
    txt_ids = torch.zeros(1, args.caption_len, 3, device=device)
    y = torch.randn(1, cfg.vec_in_dim, device=device, dtype=dtype, generator=g)
    t, guidance = torch.tensor([0.5], device=device), torch.tensor([4.0], device=device)

    def ours_call():
        return ours(img, img_ids, txt, txt_ids, t, y, guidance)

    def reference_call():
        with reference.cache_context("cond"):
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

    results = {"diffsynth": {}, "diffusers": {}}
    with torch.inference_mode():
        plain = ours_call()
        results["diffsynth"]["full"] = timed(ours_call, args.steps, args.warmup)
        results["diffusers"]["full"] = timed(reference_call, args.steps, args.warmup)
        for kind, threshold in (("checked", 0.0), ("reused", float("inf"))):
            cache = ours.step_cache = FirstBlockCache(threshold)
            cache.begin_loop()

            def ours_cached():
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
    record(
        "step_cache",
        {
            "model": "tiny" if args.tiny else "FLUX.1-dev DiT (random weights)",
            "dtype": str(dtype),
            "image_tokens": h * w,
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
