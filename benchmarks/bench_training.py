"""A LoRA training step of the full-size Z-Image DiT at 1024x1024 on one GPU: seconds per step and peak memory
for each memory option of `diffsynth-train`, and the same step on diffusers' Z-Image transformer with a peft
LoRA and its gradient checkpointing, in the same run.

Random weights (bf16, shared by assignment between ours and diffusers'), batch 1, a caption of `--caption-len`
tokens, LoRA rank 32 on the trainer's default targets (attention and MLP Linears), fp32 LoRA weights, bf16
autocast, AdamW over the LoRA, as the trainer runs it. The issue's goal: a full-size LoRA step within 24 GiB.

    python benchmarks/bench_training.py [--steps 5] [--warmup 2] [--modes bf16,checkpointing,...]
    python benchmarks/bench_training.py --tiny --device cpu   # a dry run of the script, nothing recorded
    python benchmarks/bench_training.py --estimate            # predicted peaks on a CPU machine (fake tensors)

Modes: `bf16` (no memory option), `checkpointing` (--use_gradient_checkpointing), `checkpointing_offload`
(+ --use_gradient_checkpointing_offload), `fp8_checkpointing` (+ --fp8_models dit), `fp8_checkpointing_offload`,
`diffusers_checkpointing` (diffusers' model, `enable_gradient_checkpointing`, peft `add_adapter`).

`--estimate` predicts the peak of the `bf16`, `checkpointing`, `fp8_checkpointing` and `diffusers_checkpointing`
modes without a GPU (`memory_estimate.py`: the step on fake tensors, every storage counted while it lives; no
allocator overhead or workspaces). The offload modes need CUDA (the activations go to pinned host memory).
"""

from __future__ import annotations

import contextlib
import gc
from functools import partial

import torch
from common import diffusers_z_image, random_model, record, step_parser, timed
from memory_estimate import estimate_peak_gib, fake_parameters

MODES = (
    "bf16",
    "checkpointing",
    "checkpointing_offload",
    "fp8_checkpointing",
    "fp8_checkpointing_offload",
    "diffusers_checkpointing",
)
TINY = dict(dim=64, n_layers=2, n_refiner_layers=1, n_heads=4, n_kv_heads=4, cap_feat_dim=32, axes_dims=(4, 6, 6))
ESTIMATED_MODES = ("bf16", "checkpointing", "fp8_checkpointing", "diffusers_checkpointing")
LORA_RANK = 32


def train_step(model, forward, params, offload: bool, device: torch.device, autocast: bool):
    """One optimizer step as the trainer takes it: bf16 autocast forward, MSE to a fixed target, backward
    (activations saved to pinned CPU memory with `offload`), AdamW over the LoRA."""
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast)

    def step():
        saved = torch.autograd.graph.save_on_cpu(pin_memory=True) if offload else contextlib.nullcontext()
        with autocast, saved:
            out = forward()
        loss = (out.float() - 1.0).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def main() -> None:
    parser = step_parser(__doc__.splitlines()[0], 5, 2, 1024, 1024, 128)
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {', '.join(MODES)}")
    parser.add_argument("--estimate", action="store_true", help="predict peaks on fake tensors (no GPU needed)")
    args = parser.parse_args()
    if args.estimate:
        return estimate(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU (or --tiny --device cpu for a dry run)")
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise SystemExit(f"--modes {','.join(unknown)}: choose from {', '.join(MODES)}")

    from diffsynth.z_image.dit import ZImageDiT, ZImageDiTConfig

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    cfg = ZImageDiTConfig(**TINY) if args.tiny else ZImageDiTConfig()
    dtype = torch.bfloat16
    h, w = args.height // 8, args.width // 8
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(1, cfg.in_channels, h, w, device=device, dtype=dtype, generator=g)
    sigma = torch.tensor([0.5], device=device)
    text = [torch.randn(args.caption_len, cfg.cap_feat_dim, device=device, dtype=dtype, generator=g)]

    results = {}
    for mode in modes:
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        ours = random_model(lambda: ZImageDiT(cfg), device, dtype)
        if mode == "diffusers_checkpointing":
            model, forward, params = diffusers_model(cfg, ours, device, x, sigma, text)
            del ours
        else:
            model = ours
            forward = with_our_lora(model, mode, x, sigma, text)
            if mode.startswith("fp8"):
                store_fp8(model, device)
            model.train()
            params = [p for p in model.parameters() if p.requires_grad]

        offload = mode.endswith("offload") and cuda
        step = train_step(model, forward, params, offload=offload, device=device, autocast=cuda)
        seconds, peak = timed(step, args.steps, args.warmup, inference=False)
        results[mode] = {
            "s_per_step": seconds,
            "peak_gib": peak,
            "lora_parameters": sum(p.numel() for p in params),
        }
        print(mode, results[mode], flush=True)
        del model, params, step, forward
    record_results("training_lora_step", "Z-Image DiT (random weights)", args, results)


def estimate(args) -> None:
    """Predicted peak GiB of a LoRA step per mode: the full-size DiT (or `--tiny`) on fake CPU tensors."""
    from accelerate import init_empty_weights
    from torch._subclasses.fake_tensor import FakeTensorMode

    from diffsynth.z_image.dit import ZImageDiT, ZImageDiTConfig

    cfg = ZImageDiTConfig(**TINY) if args.tiny else ZImageDiTConfig()
    modes = [m for m in args.modes.split(",") if m in ESTIMATED_MODES] or list(ESTIMATED_MODES)
    results = {}
    for mode in modes:
        fake = FakeTensorMode(allow_non_fake_inputs=True)  # real buffers (RoPE tables) enter as constants
        with fake:
            x = torch.randn(1, cfg.in_channels, args.height // 8, args.width // 8, dtype=torch.bfloat16)
            sigma = torch.tensor([0.5])
            text = [torch.randn(args.caption_len, cfg.cap_feat_dim, dtype=torch.bfloat16)]
        with init_empty_weights():
            model = ZImageDiT(cfg).to(torch.bfloat16)
        model.requires_grad_(False)
        if mode == "diffusers_checkpointing":
            targets = model.lora_target_modules
            model, forward, _ = with_diffusers_lora(diffusers_z_image(cfg).to(torch.bfloat16), targets, x, sigma, text)
        else:
            forward = with_our_lora(model, mode, x, sigma, text)
        model = fake_parameters(model, fake).train()
        params = [p for p in model.parameters() if p.requires_grad]
        cpu = torch.device("cpu")
        step = train_step(model, forward, params, offload=False, device=cpu, autocast=True)
        # per-tensor scales: the per-channel choice reads the values (the scales are a few KiB either way)
        setup = partial(store_fp8, model, cpu, fp8_granularity="tensor") if mode.startswith("fp8") else None
        results[mode] = {"estimated_peak_gib": estimate_peak_gib(model, fake, step, [x, sigma, *text], setup=setup)}
        print(mode, results[mode], flush=True)
    record_results("training_lora_step_estimate", "Z-Image DiT (fake tensors)", args, results)


def with_our_lora(model, mode: str, x, sigma, text):
    """The trainer's LoRA (`add_lora`, rank `LORA_RANK`) on our DiT, gradient checkpointing as `mode` says;
    returns the step's forward."""
    from diffsynth.training.config import TrainConfig
    from diffsynth.training.trainer import add_lora
    from diffsynth.z_image.pipeline import z_image_velocity

    model.gradient_checkpointing = "checkpointing" in mode
    add_lora(model, TrainConfig(lora_rank=LORA_RANK))
    return lambda: z_image_velocity(model, x, sigma, text)


def store_fp8(model, device, **options) -> None:
    """`--fp8_models dit`: the VRAM manager keeps the frozen weights in float8_e4m3fn and casts them block by
    block to bf16 as they run."""
    from diffsynth.runtime.vram import enable_vram_management

    settings = {"preparing_dtype": "float8_e4m3fn"}
    enable_vram_management(model, settings, device=device, dtype=torch.bfloat16, name="dit", **options)


def record_results(name: str, model: str, args, results: dict) -> None:
    """One result line per run: the step's sizes, the goal and each mode's figures (printed only for --tiny)."""
    fields = {"model": "tiny" if args.tiny else model, "height": args.height, "width": args.width}
    fields.update(text_tokens=args.caption_len, lora_rank=LORA_RANK, goal_peak_gib=24, results=results)
    record(name, fields, save=not args.tiny)


def diffusers_model(cfg, ours, device, x, sigma, text):
    """diffusers' transformer on our weights, with a peft LoRA on the same Linears and its own checkpointing."""
    return with_diffusers_lora(diffusers_z_image(cfg, ours, device), ours.lora_target_modules, x, sigma, text)


def with_diffusers_lora(ref, targets, x, sigma, text):
    """`ref` with a peft LoRA (fp32) on the `targets` Linears and diffusers' gradient checkpointing, in training
    mode; returns it, its step's forward and its trainable parameters."""
    from peft import LoraConfig

    torch.manual_seed(0)
    ref.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, target_modules=list(targets)))
    for name, p in ref.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
            p.requires_grad_(True)
    ref.enable_gradient_checkpointing()
    ref.train()
    params = [p for p in ref.parameters() if p.requires_grad]
    x_list = list(x.unsqueeze(2).unbind(0))
    t = 1.0 - sigma  # diffusers' Z-Image takes the reversed time, as our velocity gives it

    def forward():
        return torch.stack([o.squeeze(1) for o in ref(x_list, t, text, return_dict=False)[0]])

    return ref, forward, params


if __name__ == "__main__":
    main()
