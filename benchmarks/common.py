"""What every benchmark script shares: GPU timing with peak memory, and the recorded result line."""

from __future__ import annotations

import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def require_cuda() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")


def timed(fn, steps: int, warmup: int, inference: bool = True) -> tuple[float, float]:
    """Mean seconds per call over `steps` calls after `warmup`, and peak GiB allocated during them; the calls
    run under `torch.inference_mode` unless `inference=False` (training steps)."""
    with torch.inference_mode(inference):
        return _timed(fn, steps, warmup)


def _timed(fn, steps: int, warmup: int) -> tuple[float, float]:
    cuda = torch.cuda.is_available()  # False only in a --tiny dry run on a CPU machine
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if cuda:
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    return (time.perf_counter() - start) / steps, peak


def record(name: str, fields: dict, save: bool = True) -> dict:
    """Print and append one JSON line to results/<name>.jsonl with the card, torch version and command
    (`save=False` for dry runs, which only print)."""
    entry = {
        "benchmark": name,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "card": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": "python " + " ".join(sys.argv),
        **fields,
    }
    print(json.dumps(entry, indent=2))
    if not save:
        return entry
    RESULTS.mkdir(exist_ok=True)
    with (RESULTS / f"{name}.jsonl").open("a") as f:
        f.write(json.dumps(entry) + "\n")
    return entry


@torch.no_grad()
def random_model(build, device, dtype, seed: int = 0):
    """`build()` with its parameters on the meta device, then materialised on `device` with seeded
    random weights in `dtype`.

    A multi-billion-parameter model initialises in seconds on the GPU where torch's CPU init takes
    minutes. accelerate's `init_empty_weights` puts only parameters on meta, so buffers and plain tensor
    attributes (RoPE tables) are built for real. Matrices get std 1/sqrt(fan_in), so activations keep
    their scale through dozens of blocks and bf16 outputs stay finite and comparable; norm scales 1.
    """
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = build()
    generator = torch.Generator(device).manual_seed(seed)
    for module_name, module in model.named_modules():
        for name, p in list(module.named_parameters(recurse=False)):
            value = torch.empty(p.shape, device=device, dtype=torch.float32)
            full = f"{module_name}.{name}"
            if p.dim() >= 2:
                value.normal_(0.0, p[0].numel() ** -0.5, generator=generator)
            elif "norm" in full or name == "scale":
                value.fill_(1.0)
            else:
                value.normal_(0.0, 0.02, generator=generator)
            module._parameters[name] = torch.nn.Parameter(value.to(dtype), requires_grad=False)
    return model.to(device).eval()


def share_weights(model, state: dict, device):
    """Load `state` into `model` (built under `init_empty_weights`) by assignment: no copy, no new memory."""
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device).eval().requires_grad_(False)


def diffusers_z_image(cfg, ours=None, device=None):
    """diffusers' Z-Image transformer with the shape of our `cfg`, holding `ours`' weight tensors (without
    `ours`: its parameters on the meta device)."""
    from accelerate import init_empty_weights
    from diffusers import ZImageTransformer2DModel

    with init_empty_weights():
        ref = ZImageTransformer2DModel(
            dim=cfg.dim,
            n_layers=cfg.n_layers,
            n_refiner_layers=cfg.n_refiner_layers,
            n_heads=cfg.n_heads,
            n_kv_heads=cfg.n_kv_heads,
            cap_feat_dim=cfg.cap_feat_dim,
            axes_dims=list(cfg.axes_dims),
            axes_lens=list(cfg.axes_lens),
        )
    return ref if ours is None else share_weights(ref, ours.state_dict(), device)


def max_abs_diff(got: torch.Tensor, want: torch.Tensor) -> dict:
    """Output agreement of two implementations: max abs difference and the output's own scale."""
    got, want = got.float(), want.float()
    return {
        "max_abs_diff": (got - want).abs().max().item(),
        "mean_abs_diff": (got - want).abs().mean().item(),
        "output_max_abs": want.abs().max().item(),
        "finite": bool(torch.isfinite(got).all() and torch.isfinite(want).all()),
    }


def step_parser(description: str, steps: int, warmup: int, height: int, width: int, caption_len: int):
    """The arguments every ours-vs-diffusers DiT step benchmark takes."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--height", type=int, default=height)
    parser.add_argument("--width", type=int, default=width)
    parser.add_argument("--caption-len", type=int, default=caption_len)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny config: check the script runs (CPU is fine)")
    return parser


def parse_step_args(parser):
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU (or --tiny --device cpu for a dry run)")
    return args


def compare_steps(name: str, ours_step, reference_step, flops: float, args, **fields) -> dict:
    """Time our step and diffusers' on the same inputs, check how far their outputs are apart, record both."""
    with torch.inference_mode():
        agreement = max_abs_diff(ours_step(), reference_step())
        results = {
            "diffsynth": timed(ours_step, args.steps, args.warmup),
            "diffusers": timed(reference_step, args.steps, args.warmup),
        }
    return record(
        name,
        {
            **fields,
            "agreement": agreement,
            "results": {
                side: {"s_per_step": s, "tflops": flops / s / 1e12, "peak_gib": mem}
                for side, (s, mem) in results.items()
            },
        },
        save=not args.tiny,
    )
