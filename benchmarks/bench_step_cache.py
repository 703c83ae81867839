"""Step cache cost per DiT call, ours vs diffusers' FirstBlockCache (and our TeaCache), FLUX.1-dev DiT, one GPU.

How many steps a threshold reuses depends on the real weights' trajectory, which random weights do
not have; what a benchmark can measure is the price of each kind of call, and that is what decides
the speed-up for a given reuse rate:
- `full`: the plain call (no cache);
- `checked`: a call with the cache on that runs every block (threshold 0): the plain call plus the
  residual bookkeeping and the host-side decision. Its calls alternate between the latents and their negation
  (identical inputs would change nothing, and even threshold 0 would then skip); the script checks that no
  call was skipped, ours or diffusers';
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


class AlternatingLatents:
    """A forward pre-hook feeding `model` its latents (`keyword`, or the first positional argument) on odd calls
    and their negation on even ones, so a cache at threshold 0 sees a change on every call."""

    def __init__(self, model: torch.nn.Module, keyword: str | None = None):
        self.calls = 0
        self.keyword = keyword
        self._negated = None
        self._handle = model.register_forward_pre_hook(self._swap, with_kwargs=True)

    def _swap(self, module, args, kwargs):
        self.calls += 1
        if self.calls % 2:
            return None
        latents = kwargs[self.keyword] if self.keyword else args[0]
        if self._negated is None:
            self._negated = -latents
        if self.keyword:
            return args, {**kwargs, self.keyword: self._negated}
        return (self._negated, *args[1:]), kwargs

    def remove(self) -> None:
        self._handle.remove()


class CallCounter:
    """Counts the forward calls of a module that only runs when its block is not skipped."""

    def __init__(self, module: torch.nn.Module):
        self.calls = 0
        self._handle = module.register_forward_hook(self._count)

    def _count(self, *_):
        self.calls += 1

    def remove(self) -> None:
        self._handle.remove()


def check_nothing_skipped(side: str, skipped: int, calls: int) -> None:
    """`checked` measures calls that run every block: a skipped one would make its time a mix of both kinds."""
    if skipped:
        raise RuntimeError(
            f"{side}: {skipped} of {calls} calls at threshold 0 were skipped; `checked` is not a full call"
        )


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
            checked = kind == "checked"
            if checked:
                ours_inputs, reference_inputs = AlternatingLatents(ours), AlternatingLatents(reference, "hidden_states")
                reference_tail = CallCounter(reference.single_transformer_blocks[-1].attn)
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
            if checked:
                check_nothing_skipped("diffsynth FirstBlockCache", cache.skipped, cache.calls)
                calls = reference_inputs.calls
                check_nothing_skipped("diffusers FirstBlockCache", calls - reference_tail.calls, calls)
                reference_inputs.remove()
                reference_tail.remove()

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
            if checked:
                check_nothing_skipped("diffsynth TeaCache", tea.skipped, tea.calls)
                ours_inputs.remove()
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
