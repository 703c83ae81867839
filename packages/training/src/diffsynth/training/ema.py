"""An exponential moving average of the trained weights (`--ema_decay`): a float32 shadow of each trained tensor,
`shadow = decay * shadow + (1 - decay) * weight` after every optimizer step, saved beside the weights (LoRA file or
full weights, with `-ema` in the name) and in resume checkpoints. The average of the last thousands of steps is
often the better model for full fine-tuning; it costs one float32 copy of the trained weights."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch

from diffsynth.runtime.errors import ConfigError


class EMA:
    """The shadow weights of `params` (name -> trained parameter). `warmup`: the decay grows as
    min(decay, (1 + n) / (10 + n)) over the first updates, so early weights do not linger for thousands of steps."""

    def __init__(self, params: Mapping[str, torch.nn.Parameter], decay: float, warmup: bool = True):
        if not 0.0 < decay < 1.0:
            raise ConfigError(f"--ema_decay {decay} must be between 0 and 1 (e.g. 0.999; closer to 1 averages longer)")
        self.decay, self.warmup, self.updates = float(decay), bool(warmup), 0
        self.shadow = {name: p.detach().float().clone() for name, p in params.items()}

    def current_decay(self) -> float:
        """The decay of the next update."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, params: Mapping[str, torch.nn.Parameter]) -> None:
        """One step of the average toward the weights as they are now."""
        decay = self.current_decay()
        for name, shadow in self.shadow.items():
            shadow.lerp_(params[name].detach().to(device=shadow.device, dtype=torch.float32), 1.0 - decay)
        self.updates += 1

    @contextlib.contextmanager
    @torch.no_grad()
    def applied(self, params: Mapping[str, torch.nn.Parameter]) -> Iterator[None]:
        """The average in the parameters for the block (to save or sample it), the trained weights back after."""
        saved = {name: params[name].detach().clone() for name in self.shadow}
        try:
            for name, shadow in self.shadow.items():
                params[name].copy_(shadow.to(params[name].dtype))
            yield
        finally:
            for name, value in saved.items():
                params[name].copy_(value)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "warmup": self.warmup, "updates": self.updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: Mapping) -> None:
        missing = sorted(set(self.shadow) - set(state["shadow"]))
        if missing:
            raise ConfigError(
                f"the checkpoint's EMA has no average for {missing[:5]}: it was written for other trained weights"
            )
        self.updates = int(state["updates"])
        for name, shadow in self.shadow.items():
            shadow.copy_(state["shadow"][name])


__all__ = ["EMA"]
