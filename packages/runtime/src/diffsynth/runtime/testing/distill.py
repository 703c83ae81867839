"""Checks that a family's training task samples as its pipeline does (what the trainer's `--task direct_distill`
relies on: the same noise, schedule and per-step call)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def check_distill_matches_pipeline(
    task,
    pipe,
    row: Mapping[str, Any],
    *,
    timestep_arg: int,
    timestep_scale: float = 1.0,
    steps: int = 3,
    seed: int = 4,
    **options: Any,
) -> None:
    """`pipe(row["prompt"], seed=, num_inference_steps=, cfg_scale=1, **options)` against the task: the DiT sees
    `task.inference_sigmas(latents, steps)` (its positional argument `timestep_arg` holds the noise level times
    `timestep_scale`), and stepping the seed's noise along them with `task.velocity` gives the latent the
    pipeline decodes."""
    seen, decoded = [], []
    hook = pipe.dit.register_forward_pre_hook(lambda m, args: seen.append(float(args[timestep_arg].reshape(-1)[0])))
    decode = pipe.vae.decode
    pipe.vae.decode = lambda z, **kw: (decoded.append(z.clone()), decode(z, **kw))[1]
    try:
        pipe(row["prompt"], seed=seed, num_inference_steps=steps, cfg_scale=1.0, progress_bar=False, **options)
    finally:
        hook.remove()
        del pipe.vae.decode
    batch = task.collate(task.encode([dict(row)]))
    latents = batch["latents"]
    sigmas = task.inference_sigmas(tuple(latents.shape), steps)
    assert sigmas[-1] == 0 and len(seen) == steps, (seen, sigmas)
    torch.testing.assert_close(torch.tensor(seen) / timestep_scale, sigmas[:-1].float(), atol=1e-6, rtol=0)
    x = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for i in range(steps):
            x = x + (sigmas[i + 1] - sigmas[i]) * task.velocity(task.models["dit"], batch, x, sigmas[i].expand(1))
    torch.testing.assert_close(x, decoded[0].reshape(x.shape).float(), atol=1e-5, rtol=1e-5)
