"""Tiny FLUX.1 Tools repos (Fill, Canny/Depth) made from conftest's tiny FLUX.1 repo, and control LoRAs.

Test modules load this file with `load_beside(__file__, "flux1_tools_repo.py", "diffsynth_flux1_tools_repo")`
(under importlib mode they cannot import each other). diffusers is never imported here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from diffsynth.flux.flux1.dit import Flux1DiT
from diffsynth.flux.flux1.formats import DIFFUSERS_TO_OURS, FLUX1_DIT_SPEC, OURS_FUSED, SWAPPED, ours_to_diffusers
from diffsynth.flux.key_tables import template
from diffsynth.runtime.testing.weights import random_weights

FILL_CHANNELS = 384
CONTROL_CHANNELS = 128
SHARED = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


def tools_dit(tiny_repo: Path, in_channels: int, seed: int) -> Flux1DiT:
    """The tiny repo's DiT sizes with `in_channels` inputs and 64 outputs, random weights."""
    config = json.loads((tiny_repo / "transformer" / "config.json").read_text())
    config = {**config, "in_channels": in_channels, "out_channels": 64}
    dit = Flux1DiT(FLUX1_DIT_SPEC.config_from_state({}, config))
    return random_weights(dit, seed, scale=0.05, is_norm=lambda name, p: name.endswith(".scale"))


def tools_repo(tiny_repo: Path, root: Path, in_channels: int, seed: int) -> Path:
    """`root`: a hub-style repo whose `transformer/` (diffusers names, config.json) holds a DiT of `in_channels`
    inputs (384 Fill, 128 Canny/Depth); the other folders are copies of the tiny repo's."""
    root.mkdir(parents=True, exist_ok=True)
    for name in SHARED:
        shutil.copytree(tiny_repo / name, root / name)
    dit = tools_dit(tiny_repo, in_channels, seed)
    folder = root / "transformer"
    folder.mkdir()
    config = json.loads((tiny_repo / "transformer" / "config.json").read_text())
    config = {**config, "in_channels": in_channels, "out_channels": 64}
    (folder / "config.json").write_text(json.dumps(config))
    save_file(ours_to_diffusers(dit.state_dict()), str(folder / "diffusion_pytorch_model.safetensors"))
    return root


def bfl_layout(repo: Path, target: Path, dit_file: str) -> Path:
    """`repo` as a preset fetches it: BFL single-file DiT `dit_file` and `ae.safetensors` at the root."""
    from diffsynth.flux.flux1.formats import diffusers_to_ours
    from diffsynth.runtime.checkpoint import open_checkpoint

    target.mkdir(parents=True, exist_ok=True)
    for name in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        shutil.copytree(repo / name, target / name)
    dit = open_checkpoint(str(repo / "transformer" / "diffusion_pytorch_model.safetensors"))
    save_file(diffusers_to_ours({k: dit[k] for k in dit}), str(target / dit_file))
    shutil.copy(repo / "vae" / "diffusion_pytorch_model.safetensors", target / "ae.safetensors")
    return target


# ------------------------------------------------------------------ control LoRAs
CONTROL_LORA_LAYERS = (
    "img_in",
    "double_blocks.0.img_attn.qkv",
    "double_blocks.0.txt_mlp.0",
    "double_blocks.0.img_mod.lin",
    "single_blocks.1.linear1",
    "final_layer.adaLN_modulation.1",
    "final_layer.linear",
)
CONTROL_LORA_NORMS = (
    "double_blocks.0.img_attn.norm.query_norm.scale",
    "double_blocks.0.img_attn.norm.key_norm.scale",
    "double_blocks.0.txt_attn.norm.query_norm.scale",
    "double_blocks.0.txt_attn.norm.key_norm.scale",
    "single_blocks.0.norm.query_norm.scale",
    "single_blocks.1.norm.key_norm.scale",
)


def control_lora(dit: Flux1DiT, layers=CONTROL_LORA_LAYERS, norms=CONTROL_LORA_NORMS, rank=2, seed=0) -> dict:
    """A BFL-named control LoRA for `dit` (a FLUX.1-dev-shaped DiT): `lora_A` / `lora_B` / `lora_B.bias` per layer,
    `img_in`'s twice the DiT's input wide, and replacement QK-norm scales, like `flux1-canny-dev-lora`."""
    g = torch.Generator().manual_seed(seed)
    modules = dict(dit.named_modules())
    params = dict(dit.named_parameters())
    state = {}
    for layer in layers:
        out_features, in_features = modules[layer].weight.shape
        if layer == "img_in":
            in_features *= 2
        state[f"{layer}.lora_A.weight"] = 0.2 * torch.randn(rank, in_features, generator=g)
        state[f"{layer}.lora_B.weight"] = 0.2 * torch.randn(out_features, rank, generator=g)
        state[f"{layer}.lora_B.bias"] = 0.05 * torch.randn(out_features, generator=g)
    for name in norms:
        state[name] = 1.0 + 0.2 * torch.randn(params[name].shape, generator=g)
    return state


def control_lora_to_diffusers(state: dict, hidden: int) -> dict:
    """The same LoRA in diffusers names (`transformer.` prefix): fused layers split (one lora_A shared by the
    parts, lora_B and its bias split by rows), `norm_out.linear` halves swapped, norms renamed."""
    inverse = {ours: theirs for theirs, ours in DIFFUSERS_TO_OURS.items()}
    swapped = {ours: theirs for theirs, ours in SWAPPED.items()}
    out = {}
    for key, value in state.items():
        if key.endswith(".scale"):
            t, index = template(key)
            out["transformer." + inverse[t].format(*index)] = value
            continue
        layer, kind = key.split(".lora_")
        kind = "lora_" + kind
        t, index = template(f"{layer}.weight")
        if t in inverse:
            out[f"transformer.{inverse[t].format(*index).removesuffix('.weight')}.{kind}"] = value
        elif t in swapped:
            a, b = value.chunk(2) if kind != "lora_A.weight" else (value, None)
            value = value if b is None else torch.cat([b, a])
            out[f"transformer.{swapped[t].removesuffix('.weight')}.{kind}"] = value
        else:
            parts = [p.removesuffix(".weight").format(*index) for p in OURS_FUSED[t]]
            sizes = [value.shape[0] // 3] * 3 if len(parts) == 3 else [hidden] * 3 + [value.shape[0] - 3 * hidden]
            pieces = [value] * len(parts) if kind == "lora_A.weight" else value.split(sizes)
            for part, piece in zip(parts, pieces, strict=True):
                out[f"transformer.{part}.{kind}"] = piece.clone()
    return out


def full_size_control_lora(dit: Flux1DiT, rank: int = 1) -> dict:
    """The key set of BFL's `flux1-canny-dev-lora.safetensors` on meta: every Linear of FLUX.1-dev with lora_A /
    lora_B / lora_B.bias (img_in's lora_A twice as wide) and every QK-norm scale."""
    state = {}
    for name, module in dit.named_modules():
        if isinstance(module, torch.nn.Linear):
            out_features, in_features = module.weight.shape
            in_features *= 2 if name == "img_in" else 1
            state[f"{name}.lora_A.weight"] = torch.empty(rank, in_features, device="meta")
            state[f"{name}.lora_B.weight"] = torch.empty(out_features, rank, device="meta")
            state[f"{name}.lora_B.bias"] = torch.empty(out_features, device="meta")
    for name, p in dit.named_parameters():
        if name.endswith("_norm.scale"):
            state[name] = torch.empty(p.shape, device="meta")
    return state
