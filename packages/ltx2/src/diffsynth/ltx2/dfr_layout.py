"""Where DFR puts its keyframe slots: the canvas padded to whole segments, one slot at each segment's end.

LTX-2.5's DFR pipeline (`dfr.py`) generates, beside the video, extra single-frame latents ("keyframe slots") at
the end of each segment of 24 or 32 video frames (3 or 4 latent frames of the x8 VAE). Every slot sits on a
latent border, so the clip is padded at its end to a whole number of segments: the "canvas". The segment
length is whichever of the two pads the clip least (the longer on a tie), and the slots are at frames
`S, 2S, ..., canvas - 1`: frame 0 has none (its latent already holds one frame) and the last frame has one.
The padding is generated with the rest and cut off before decoding (`trim_canvas`).
"""

from __future__ import annotations

import torch

from diffsynth.runtime.errors import ConfigError

SEGMENT_LATENT_FRAMES = (3, 4)  # the authors' segment lengths, in latent frames


def segment_length(content_frames: int, temporal_compression: int = 8) -> int:
    """The segment length (video frames) that pads `content_frames` (`num_frames - 1`) least, the longer on a tie."""
    candidates = [n * temporal_compression for n in SEGMENT_LATENT_FRAMES]
    return min(candidates, key=lambda s: ((s - content_frames % s) % s, -s))


def resolve_canvas(num_frames: int, temporal_compression: int = 8) -> tuple[int, int, list[int]]:
    """`(canvas frames, segment length, slot frames)` for a clip of `num_frames` (`8k + 1`, at least 9)."""
    if num_frames < temporal_compression + 1 or (num_frames - 1) % temporal_compression:
        raise ConfigError(
            f"num_frames={num_frames}: the DFR pipeline needs {temporal_compression}k + 1 frames, at least "
            f"{temporal_compression + 1}"
        )
    content = num_frames - 1
    segment = segment_length(content, temporal_compression)
    padded = content + (segment - content % segment) % segment
    return padded + 1, segment, list(range(segment, padded + 1, segment))


def trim_canvas(latents: torch.Tensor, num_frames: int, temporal_compression: int = 8) -> torch.Tensor:
    """The latent frames `[B, C, F, H, W]` that cover the first `num_frames` video frames (the canvas without
    its padding)."""
    return latents[:, :, : (num_frames - 1) // temporal_compression + 1]
