"""Timestep LoRA (DiffSynth-Studio's `load_timestep_lora`, e.g. `DiffSynth-Studio/MultiAlign-FLUX.1-dev`): a LoRA whose
rank activations are scaled and shifted by functions of the timestep.

Each adapted Linear has, besides the usual `lora_A` / `lora_B`, two small Linears `lora_time_gamma` and
`lora_time_beta` from the 256-wide sinusoidal embedding of the timestep (`[cos, sin]` of 1000 sigma, the FLUX.1
time embedding's first stage) to the rank: `delta = alpha * B((A x) * gamma(t) + beta(t))`, added to the layer's
output (to its rows of a fused layer). The file is peft's, in diffusers names under `base_model.model.`; those
names are mapped onto our (BFL's) fused Linears with the FLUX.1 key tables: `to_q`, `to_k`, `to_v` are row blocks
of `img_attn.qkv` / `single_blocks.N.linear1`, `add_*_proj` of `txt_attn.qkv`. DiffSynth-Studio's alpha (2) is the
default. It acts through forward hooks for as long as it is loaded, reading the timestep of each DiT call.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from diffsynth.runtime.errors import LoRAError
from diffsynth.runtime.layers import timestep_embedding

from .formats import DIFFUSERS_TO_OURS, OURS_FUSED, template

PREFIX = "base_model.model."
PARTS = ("lora_A.weight", "lora_B.weight", "lora_time_gamma.weight", "lora_time_gamma.bias",
         "lora_time_beta.weight", "lora_time_beta.bias")  # fmt: skip
EMBEDDING_DIM = 256
DEFAULT_ALPHA = 2.0  # DiffSynth-Studio's `load_timestep_lora(alpha=2.0)`
_KEY = re.compile(
    r"^(.+)\.(lora_A\.weight|lora_B\.weight|lora_time_gamma\.(?:weight|bias)|lora_time_beta\.(?:weight|bias))$"
)


@dataclass
class TimestepLoRALayer:
    """One adapted (part of a) Linear: our module name, the rows of its output it adds to, and its tensors."""

    module: str
    rows: slice
    down: torch.Tensor  # [r, in]
    up: torch.Tensor  # [out part, r]
    gamma: tuple[torch.Tensor, torch.Tensor]  # weight [r, 256], bias [r]
    beta: tuple[torch.Tensor, torch.Tensor]

    def delta(self, x: torch.Tensor, embedding: torch.Tensor, alpha: float) -> torch.Tensor:
        """`alpha * B((A x) * gamma(t) + beta(t))` for `x` `[B, L, in]` and the timestep embedding `[B, 256]`,
        computed where `x` is (the tensors follow it there once: an offloaded DiT computes on another device)."""
        if self.down.device != x.device:
            self.down, self.up = self.down.to(x.device), self.up.to(x.device)
            self.gamma = tuple(t.to(x.device) for t in self.gamma)
            self.beta = tuple(t.to(x.device) for t in self.beta)
        h = torch.nn.functional.linear(x.to(self.down.dtype), self.down)
        t = embedding.to(device=h.device, dtype=h.dtype)
        gamma = torch.nn.functional.linear(t, *self.gamma)[:, None]
        beta = torch.nn.functional.linear(t, *self.beta)[:, None]
        return torch.nn.functional.linear(h * gamma + beta, self.up) * alpha


def _part_rows(dit: nn.Module, layer: str) -> tuple[str, slice | None]:
    """Our module for a diffusers Linear name, and the rows of its output that part is (None: all of it)."""
    name, blocks = template(layer + ".weight")
    if name in DIFFUSERS_TO_OURS:
        return DIFFUSERS_TO_OURS[name].format(*blocks)[: -len(".weight")], None
    for fused, parts in OURS_FUSED.items():
        if name in parts:
            module = fused.format(*blocks)[: -len(".weight")]
            width = dit.config.hidden_size
            start = parts.index(name) * width  # q, k, v (and linear1's mlp after them) in that order
            return module, slice(start, None)
    raise LoRAError(f"timestep LoRA: {layer!r} is no FLUX.1 DiT Linear (diffusers names expected)")


def read_timestep_lora(state: Mapping[str, torch.Tensor], dit: nn.Module, source: str) -> list[TimestepLoRALayer]:
    """The file's layers in our names (see the module docstring); every layer needs all six tensors."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = _KEY.match(key[len(PREFIX) :] if key.startswith(PREFIX) else key)
        if match is None:
            raise LoRAError(f"{source}: key {key!r} is not a timestep LoRA tensor ({', '.join(PARTS)})")
        groups.setdefault(match.group(1), {})[match.group(2)] = tensor
    layers = []
    for layer, parts in groups.items():
        missing = [p for p in PARTS if p not in parts]
        if missing:
            raise LoRAError(f"{source}: {layer} lacks {', '.join(missing)}")
        module, rows = _part_rows(dit, layer)
        linear = dit.get_submodule(module)
        up, down = parts["lora_B.weight"], parts["lora_A.weight"]
        rows = slice(0, up.shape[0]) if rows is None else slice(rows.start, rows.start + up.shape[0])
        if down.shape[1] != linear.in_features or rows.stop > linear.out_features:
            raise LoRAError(
                f"{source}: {layer} ({tuple(down.shape)} down, {tuple(up.shape)} up) does not fit {module} "
                f"({linear.in_features} -> {linear.out_features})"
            )
        gamma = (parts["lora_time_gamma.weight"], parts["lora_time_gamma.bias"])
        beta = (parts["lora_time_beta.weight"], parts["lora_time_beta.bias"])
        layers.append(TimestepLoRALayer(module, rows, down, up, gamma, beta))
    if not layers:
        raise LoRAError(f"{source} holds no timestep LoRA layers")
    return layers


class TimestepLoRA:
    """A loaded timestep LoRA on a DiT: forward hooks on its Linears, the timestep embedding of the current DiT
    call (a pre-hook on the DiT). `remove()` takes it off."""

    def __init__(self, dit: nn.Module, layers: list[TimestepLoRALayer], alpha: float = DEFAULT_ALPHA):
        self.layers, self.alpha, self.embedding = layers, float(alpha), None
        self.handles = [dit.register_forward_pre_hook(self._timestep, with_kwargs=True)]
        by_module: dict[str, list[TimestepLoRALayer]] = {}
        for layer in layers:
            by_module.setdefault(layer.module, []).append(layer)
        for module, parts in by_module.items():
            self.handles.append(dit.get_submodule(module).register_forward_hook(self._adder(parts)))

    def _timestep(self, module, args, kwargs):
        t = kwargs["timesteps"] if "timesteps" in kwargs else args[4]
        b = (kwargs["img"] if "img" in kwargs else args[0]).shape[0]
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(b)
        self.embedding = timestep_embedding(t * 1000, EMBEDDING_DIM, cos_first=True)

    def _adder(self, parts: list[TimestepLoRALayer]):
        def hook(module, args, output):
            if self.embedding is None:
                return output
            x = args[0]
            output = output.clone()
            for part in parts:
                delta = part.delta(x, self.embedding, self.alpha)
                output[..., part.rows] = output[..., part.rows] + delta.to(output.dtype)
            return output

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles, self.embedding = [], None


__all__ = ["DEFAULT_ALPHA", "TimestepLoRA", "TimestepLoRALayer", "read_timestep_lora"]
