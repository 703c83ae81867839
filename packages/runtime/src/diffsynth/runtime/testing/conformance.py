"""Conformance checks every model runs in its own tests.

Each check is a plain function taking a `factory` (zero-argument callable that builds the tiny
model with its weights; it must also work under `torch.device("meta")`) and example inputs
(`args` tuple, optional `kwargs`). Checks raise `AssertionError` with a message naming what is
wrong, so they read well inside pytest. Model outputs may be a tensor or nested tuples, lists or
dicts of tensors.

    from diffsynth.runtime.testing import conformance as cf
    cf.check_forward(make_model, (x, t, text), expected_shapes=[x.shape])
    cf.check_meta_load(make_model, (x, t, text))
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from ..registry import KeyLayout, ModelSpec

Factory = Callable[[], nn.Module]

__all__ = [
    "check_backward",
    "check_declared_units",
    "check_first_block_cache",
    "check_tea_cache",
    "full_calls",
    "check_forward",
    "check_gradient_checkpointing",
    "check_layout_roundtrip",
    "check_meta_load",
    "check_spec_config",
    "check_streamed",
    "output_tensors",
]


def output_tensors(out: Any) -> list[torch.Tensor]:
    """All tensors in a model output, in order (tensor, tuple/list, dict values)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in output_tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in output_tensors(v)]
    return []


def _call(model: nn.Module, args: Sequence, kwargs: dict | None) -> list[torch.Tensor]:
    tensors = output_tensors(model(*args, **(kwargs or {})))
    assert tensors, f"{type(model).__name__} returned no tensors"
    return tensors


def _input_dtype(args: Sequence) -> torch.dtype | None:
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            return a.dtype
    return None


def check_forward(
    factory: Factory,
    args: Sequence,
    kwargs: dict | None = None,
    *,
    expected_shapes: Sequence[Sequence[int]] | None = None,
    dtype: torch.dtype | None = None,
) -> list[torch.Tensor]:
    """Forward in eval mode: outputs finite, with `expected_shapes` and `dtype` (default: the
    dtype of the first floating-point input). Returns the outputs."""
    model = factory().eval()
    with torch.no_grad():
        outs = _call(model, args, kwargs)
    dtype = dtype or _input_dtype(args)
    if expected_shapes is not None:
        got = [tuple(o.shape) for o in outs]
        want = [tuple(s) for s in expected_shapes]
        assert got == want, f"{type(model).__name__} output shapes {got}, expected {want}"
    for i, o in enumerate(outs):
        if dtype is not None and o.is_floating_point():
            assert o.dtype == dtype, f"output {i} has dtype {o.dtype}, expected {dtype}"
        assert torch.isfinite(o).all(), f"output {i} of {type(model).__name__} has non-finite values"
    return outs


def check_backward(
    factory: Factory, args: Sequence, kwargs: dict | None = None, *, allow_unused: Iterable[str] = ()
) -> dict[str, torch.Tensor]:
    """Backward in train mode: every trainable parameter (except `allow_unused`) gets a finite
    gradient. Returns the gradients by parameter name."""
    model = factory().train()
    loss = sum(o.float().square().mean() for o in _call(model, args, kwargs) if o.is_floating_point())
    loss.backward()
    allowed = set(allow_unused)
    grads = {}
    missing = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            if name not in allowed:
                missing.append(name)
            continue
        assert torch.isfinite(p.grad).all(), f"gradient of {name!r} has non-finite values"
        grads[name] = p.grad
    assert not missing, f"parameters without gradient: {missing[:8]} ({len(missing)} in all)"
    return grads


def check_gradient_checkpointing(factory: Factory, args: Sequence, kwargs: dict | None = None, atol: float = 1e-6):
    """With `gradient_checkpointing = True` the output and gradients equal those without."""
    results = []
    for flag in (False, True):
        torch.manual_seed(0)
        model = factory().train()
        assert hasattr(model, "gradient_checkpointing"), f"{type(model).__name__} has no gradient_checkpointing flag"
        model.gradient_checkpointing = flag
        outs = _call(model, args, kwargs)
        sum(o.float().square().mean() for o in outs).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append(([o.detach() for o in outs], grads))
    (outs_a, grads_a), (outs_b, grads_b) = results
    for a, b in zip(outs_a, outs_b, strict=True):
        torch.testing.assert_close(b, a, atol=atol, rtol=0)
    assert grads_a.keys() == grads_b.keys(), "gradient checkpointing changes which parameters get gradients"
    for name in grads_a:
        torch.testing.assert_close(
            grads_b[name], grads_a[name], atol=atol, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
        )


def _record_blocks(model: nn.Module, blocks: Sequence[str]) -> tuple[list, list, list]:
    """The modules of the block lists at `blocks`, the list their forward hooks append their index to, and
    the hook handles."""
    modules = [b for path in blocks for b in model.get_submodule(path)]
    assert modules, f"no blocks under {list(blocks)}"
    ran: list[int] = []
    hooks = [b.register_forward_hook(lambda m, i, o, k=k: ran.append(k)) for k, b in enumerate(modules)]
    return modules, ran, hooks


def _cache_loop(model: nn.Module, cache, steps: list[list[Sequence]], kwargs: dict | None, ran: list) -> tuple:
    """One denoising loop of `model` under `cache`: per step, the calls (`args` each) in order. Returns
    each call's outputs, the blocks `ran` recorded per step, and the cache (then removed from the model)."""
    model.step_cache = cache
    outs, counts = [], []
    cache.begin_loop(len(steps))
    for step in steps:
        cache.begin_step()
        ran.clear()
        outs.append([_call(model, a, kwargs) for a in step])
        counts.append(list(ran))
    cache.end_loop()
    model.step_cache = None
    return outs, counts, cache


def check_first_block_cache(
    factory: Factory,
    args: Sequence,
    kwargs: dict | None = None,
    other_args: Sequence | None = None,
    blocks: Sequence[str] = (),
    atol: float = 1e-5,
) -> None:
    """The model's `step_cache` hook (see `diffsynth.runtime.step_cache`):
    - off by default, and a loop with threshold 0 gives exactly the uncached outputs;
    - with an infinite threshold a later step runs only the first of the `blocks` (dotted paths of
      the block lists the cache spans) and, fed the same input, gives the same output as the full call;
    - each call position in a step keeps its own state (inputs `args` and `other_args` alternate);
    - with autograd recording nothing is skipped."""
    from ..step_cache import FirstBlockCache

    other_args = args if other_args is None else other_args
    model = factory().eval()
    assert hasattr(model, "step_cache"), f"{type(model).__name__} has no step_cache attribute"
    assert model.step_cache is None, "the step cache must be off by default"
    block_modules, ran, hooks = _record_blocks(model, blocks)

    def loop(threshold: float, steps: list[list[Sequence]]) -> tuple[list[list[list[torch.Tensor]]], list, Any]:
        return _cache_loop(model, FirstBlockCache(threshold), steps, kwargs, ran)

    try:
        with torch.no_grad():
            plain = [_call(model, a, kwargs) for a in (args, other_args)]
            outs, _, cache = loop(0.0, [[args], [other_args]])
            assert (cache.calls, cache.skipped) == (2, 0), f"threshold 0 reused a call: {cache}"
            for got, want in zip((outs[0][0], outs[1][0]), plain, strict=True):
                for a, b in zip(got, want, strict=True):
                    assert torch.equal(a, b), "a cache that reuses nothing changed the output"

            outs, counts, cache = loop(float("inf"), [[args, other_args], [args, other_args]])
            assert (cache.calls, cache.skipped) == (4, 2), f"an infinite threshold should reuse both calls: {cache}"
            assert counts[0] == list(range(len(block_modules))) * 2, f"the first step must run every block: {counts[0]}"
            assert counts[1] == [0, 0], f"a reused call must run only the first block, ran {counts[1]}"
            for position in range(2):
                for a, b in zip(outs[1][position], outs[0][position], strict=True):
                    torch.testing.assert_close(
                        a, b, atol=atol, rtol=0, msg=lambda m, p=position: f"call {p}, same input, reused: {m}"
                    )

        model.train()
        with torch.enable_grad():
            _, counts, cache = loop(float("inf"), [[args], [args]])
        assert cache.skipped == 0 and counts[1] == list(range(len(block_modules))), "training must not skip blocks"
    finally:
        for hook in hooks:
            hook.remove()
        model.step_cache = None


def check_tea_cache(
    factory: Factory,
    args: Sequence,
    kwargs: dict | None = None,
    other_args: Sequence | None = None,
    blocks: Sequence[str] = (),
    indicator_blocks: int = 0,
    atol: float = 1e-5,
) -> None:
    """The model's TeaCache support (see `diffsynth.runtime.step_cache.TeaCache`):
    - it declares `tea_cache_coefficients`, a model id -> polynomial table;
    - with an infinite threshold, of three steps on the same input the middle one runs no block but the
      `indicator_blocks` first ones its indicator needs, and gives the full call's output; the first and
      the last run every block of `blocks`;
    - at threshold 0 (identity polynomial) changed inputs (`args`, `other_args`) run in full, exactly;
    - with autograd recording nothing is skipped."""
    from ..step_cache import TeaCache

    other_args = args if other_args is None else other_args
    model = factory().eval()
    table = getattr(model, "tea_cache_coefficients", None)
    assert isinstance(table, dict) and table, f"{type(model).__name__} declares no tea_cache_coefficients"
    assert all(len(c) >= 1 and all(isinstance(v, float) for v in c) for c in table.values()), table
    block_modules, ran, hooks = _record_blocks(model, blocks)
    every, head = list(range(len(block_modules))), list(range(indicator_blocks))

    def loop(threshold: float, steps: list[Sequence]) -> tuple[list[list[torch.Tensor]], list, Any]:
        outs, counts, cache = _cache_loop(model, TeaCache(threshold, (1.0, 0.0)), [[a] for a in steps], kwargs, ran)
        return [out for (out,) in outs], counts, cache

    try:
        with torch.no_grad():
            outs, counts, cache = loop(float("inf"), [args, args, args])
            assert (cache.calls, cache.skipped) == (3, 1), f"only the middle step may be reused: {cache}"
            assert counts[0] == every and counts[2] == every, f"first and last steps must run every block: {counts}"
            assert counts[1] == head, f"a reused call ran blocks {counts[1]}, expected {head} (its indicator's)"
            for a, b in zip(outs[1], outs[0], strict=True):
                torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=lambda m: f"same input, reused: {m}")

            plain = [_call(model, a, kwargs) for a in (args, other_args, args)]
            outs, _, cache = loop(0.0, [args, other_args, args])
            assert cache.skipped == 0, f"threshold 0 reused a changed input: {cache}"
            for got, want in zip(outs, plain, strict=True):
                for a, b in zip(got, want, strict=True):
                    assert torch.equal(a, b), "a cache that reuses nothing changed the output"

        model.train()
        with torch.enable_grad():
            _, counts, cache = loop(float("inf"), [args, args, args])
        assert cache.skipped == 0 and counts[1] == every, "training must not skip blocks"
    finally:
        for hook in hooks:
            hook.remove()
        model.step_cache = None


def full_calls(head: nn.Module, tail: nn.Module) -> tuple[list[bool], list]:
    """Which model calls ran every block, to compare first-block caches call by call: one entry per call
    (counted on `head`, the first block), True when the call also ran `tail` (a module the last block runs
    inside its own forward, so that a cache hook replacing that block's forward on reused calls is not
    counted). Returns the list and the hook handles to remove."""
    calls: list[bool] = []
    hooks = [
        head.register_forward_hook(lambda m, i, o: calls.append(False)),
        tail.register_forward_hook(lambda m, i, o: calls.__setitem__(-1, True)),
    ]
    return calls, hooks


def check_meta_load(factory: Factory, args: Sequence, kwargs: dict | None = None) -> None:
    """Build on the meta device, `load_state_dict(assign=True, strict=True)` the weights of a real
    build: nothing is left on meta (non-persistent buffers!) and the output is bit-identical."""
    reference = factory().eval()
    state = reference.state_dict()
    with torch.device("meta"):
        model = factory()
    model.load_state_dict(state, strict=True, assign=True)
    model.eval()
    on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert not on_meta, f"still on the meta device after an assign=True load: {on_meta[:8]}"
    with torch.no_grad():
        want = _call(reference, args, kwargs)
        got = _call(model, args, kwargs)
    for i, (a, b) in enumerate(zip(want, got, strict=True)):
        assert torch.equal(a, b), f"output {i} differs after meta build + load (max abs diff {(a - b).abs().max()})"


def check_streamed(factory: Factory, args: Sequence, tmp_path=None, min_units: int = 1) -> None:
    """Every declared unit streamed by the VRAM manager (`vram_limit=0`) from cpu memory, and, given `tmp_path`,
    from a safetensors file on disk: both outputs are bit-identical to the unmanaged model's (float32 weights
    move unchanged). At least `min_units` units must be streamed."""
    from safetensors.torch import save_file

    from ..vram import enable_vram_management

    with torch.no_grad():
        want = _call(factory().eval(), args, None)
        sources = [({"offload_device": "cpu", "onload_device": "cpu"}, None)]
        if tmp_path is not None:
            sources.append(({"offload_device": "disk", "onload_device": "disk"}, tmp_path / "streamed.safetensors"))
        for settings, path in sources:
            model = factory().eval().requires_grad_(False)
            if path is not None:
                save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
            checkpoint = None if path is None else [str(path)]
            handle = enable_vram_management(model, settings, vram_limit=0, device="cpu", checkpoint=checkpoint)
            assert handle.plan.resident == (), f"vram_limit=0 kept units resident: {handle.plan.resident}"
            assert len(handle.units) >= min_units, f"{len(handle.units)} units streamed, expected >= {min_units}"
            got = _call(model, args, None)
            where = settings["offload_device"]
            for i, (a, b) in enumerate(zip(want, got, strict=True)):
                assert torch.equal(a, b), (
                    f"output {i} streamed from {where} differs (max abs diff {(a - b).abs().max()})"
                )


def check_declared_units(factory: Factory | nn.Module) -> None:
    """`offload_units` / `compile_units` are dotted paths to modules (a ModuleList means each child
    is a unit); every `lora_target_modules` name ends the name of at least one Linear. Takes a
    factory or a built model; a meta build is enough."""
    if isinstance(factory, nn.Module):
        model = factory
    else:
        with torch.device("meta"):
            model = factory()
    for attr in ("offload_units", "compile_units"):
        for path in getattr(model, attr, ()):
            try:
                module = model.get_submodule(path)
            except AttributeError as exc:
                raise AssertionError(f"{type(model).__name__}.{attr} names {path!r}, which does not exist") from exc
            assert isinstance(module, nn.Module), f"{attr} entry {path!r} is not a module"
            if isinstance(module, nn.ModuleList):
                assert all(isinstance(m, nn.Module) for m in module), f"{attr} entry {path!r} holds non-modules"
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    for target in getattr(model, "lora_target_modules", ()):
        hits = [n for n in linears if n == target or n.endswith("." + target)]
        assert hits, f"lora_target_modules entry {target!r} matches no Linear of {type(model).__name__}"


def check_layout_roundtrip(
    factory: Factory,
    layout: KeyLayout,
    from_ours: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
) -> None:
    """Our state dict written in `layout` (by `from_ours`, identity by default, prefix added here)
    is recognised by the layout's signature and converts back to exactly our keys and tensors."""
    ours = factory().state_dict()
    written = dict(ours) if from_ours is None else from_ours(dict(ours))
    stored = {layout.prefix + k: v for k, v in written.items()}
    assert layout.matches(stored), (
        f"layout {layout.name!r} does not recognise its own keys; missing signature keys: "
        f"{[k for k in layout.signature if layout.prefix + k not in stored]}"
    )
    back = layout.to_ours(stored)
    missing, extra = sorted(ours.keys() - back.keys()), sorted(back.keys() - ours.keys())
    assert not missing and not extra, f"layout {layout.name!r} round trip: missing {missing[:8]}, extra {extra[:8]}"
    for key, value in ours.items():
        assert torch.equal(back[key], value), f"layout {layout.name!r} round trip changes the values of {key!r}"


def check_spec_config(spec: ModelSpec, factory: Factory, config_json: dict | None = None) -> Any:
    """The config `spec` derives from the model's own (meta) shapes builds a model with exactly the
    same keys and shapes. Returns that config."""
    with torch.device("meta"):
        model = factory()
        state = model.state_dict()
        config = spec.config_from_state(state, config_json)
        rebuilt = spec.build(config)
    want = {k: tuple(v.shape) for k, v in state.items()}
    got = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    assert got == want, (
        f"{spec.name}: config derived from shapes builds a different model; "
        f"missing {sorted(want.keys() - got.keys())[:8]}, extra {sorted(got.keys() - want.keys())[:8]}, "
        f"shape changes {[k for k in want.keys() & got.keys() if want[k] != got[k]][:8]}"
    )
    return config
