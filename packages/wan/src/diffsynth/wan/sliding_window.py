"""Temporal sliding windows for Wan's denoiser (DiffSynth-Studio's `sliding_window_size` / `sliding_window_stride`).

A long video's latents are denoised by running the DiT on overlapping windows of latent frames instead of the whole
clip at once: attention cost grows with the square of the tokens, and the DiTs were trained on about 21 latent frames.
Each window's velocity is weighted by a ramp over the frames it shares with a neighbour and the weighted sum is
normalised, so frames seen by one window keep its prediction and shared ones cross-fade:

- windows start every `stride` latent frames, each `size` long (the last one runs to the end); a window is skipped
  when the one before already reached the end;
- inside the `size - stride` frames at a side that has a neighbour, window frame `k` from that side weighs
  `(k + 1/2) / (size - stride)`; elsewhere 1.

Everything the DiT reads per latent frame is cut with the latents: `y` (the image-to-video channels, Fun Control's
control latent) and per-token timesteps (TI2V's clean first frame stays clean only in the window that holds it).
Text, CLIP features and a Fun reference image are whole-clip conditions and go to every window.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from diffsynth.runtime.errors import ConfigError

# Conditions a window can take: per-frame ones are cut, the others shared (see the module docstring).
PER_FRAME = ("y",)
SHARED = ("clip_feature", "reference_latents", "motion_modulation")


@dataclass(frozen=True)
class SlidingWindows:
    """Windows of `size` latent frames starting every `stride` frames."""

    size: int
    stride: int

    @classmethod
    def from_arguments(cls, size, stride) -> SlidingWindows | None:
        """The windows of a call, None when neither argument is given; a bad value is a ConfigError naming it."""
        if size is None and stride is None:
            return None
        if size is None or stride is None:
            raise ConfigError("sliding_window_size and sliding_window_stride go together: give both (latent frames)")
        for name, value in (("sliding_window_size", size), ("sliding_window_stride", stride)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r} must be a positive number of latent frames")
        if stride > size:
            raise ConfigError(
                f"sliding_window_stride={stride} is larger than sliding_window_size={size}: frames would be skipped"
            )
        return cls(size, stride)

    def spans(self, frames: int) -> list[tuple[int, int]]:
        """`[start, end)` latent frames of each window over `frames`."""
        spans = []
        for start in range(0, frames, self.stride):
            if start >= self.stride and start - self.stride + self.size >= frames:
                break  # the window before already reached the end
            spans.append((start, min(start + self.size, frames)))
        return spans

    def weights(self, length: int, first: bool, last: bool) -> torch.Tensor:
        """`[length]` weights of a window's frames: ramps over the overlap at the sides that have a neighbour (a
        window with a neighbour is longer than the overlap: see `spans`)."""
        weights = torch.ones(length)
        border = self.size - self.stride
        if border == 0:
            return weights
        ramp = (torch.arange(border, dtype=torch.float32) + 0.5) / border
        if not first:
            weights[:border] = ramp
        if not last:
            weights[-border:] = ramp.flip(0)
        return weights

    def predict(self, velocity: Callable, x: torch.Tensor, timestep: torch.Tensor, cond, uncond) -> torch.Tensor:
        """The blended velocity of `x` `[B, C, T, h, w]`: `velocity(x, timestep, cond, uncond)` on each window, with
        the window's frames of `x`, of per-token timesteps and of the conditions' per-frame inputs."""
        frames = x.shape[2]
        total = torch.zeros_like(x, dtype=torch.float32)
        norm = torch.zeros(frames, device=x.device)
        spans = self.spans(frames)
        for start, end in spans:
            part = velocity(x[:, :, start:end], _frames_of(timestep, x, start, end), *_cut(cond, uncond, start, end))
            weights = self.weights(end - start, start == 0, end == frames).to(x.device)
            total[:, :, start:end] += part.float() * weights.view(1, 1, -1, 1, 1)
            norm[start:end] += weights
        return total / norm.view(1, 1, -1, 1, 1)


def check_conditions(cond) -> None:
    """Windows cut the latents in time: refuse conditions that cannot be cut (VACE, Animate, Control-Camera)."""
    given = [name for name, value in cond.extras().items() if value is not None and name not in (*PER_FRAME, *SHARED)]
    given = [name for name in given if name != "vace_scale"]
    if given:
        raise ConfigError(
            f"sliding windows cut the video in time; they do not take {', '.join(sorted(given))} (VACE, Wan2.2-Animate "
            "and Control-Camera inputs): generate without sliding_window_size / sliding_window_stride"
        )


def _frames_of(timestep: torch.Tensor, x: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """A `[B]` timestep as it is; a per-token `[B, T * tokens]` one cut to the window's frames."""
    if timestep.dim() == 1:
        return timestep
    per_frame = timestep.shape[1] // x.shape[2]
    return timestep[:, start * per_frame : end * per_frame]


def _cut(cond, uncond, start: int, end: int):
    def window(c):
        if c is None or c.y is None:
            return c
        return replace(c, y=c.y[:, :, start:end])

    return window(cond), window(uncond)


__all__ = ["SlidingWindows", "check_conditions"]
