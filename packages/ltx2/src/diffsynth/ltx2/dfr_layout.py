"""Where DFR puts its keyframe slots: the canvas padded to whole segments, one slot at each segment's end.

LTX-2.5's DFR pipeline (`dfr.py`) generates, beside the video, extra single-frame latents ("keyframe slots") at
the end of each segment of 24 or 32 video frames (3 or 4 latent frames of the x8 VAE). Every slot sits on a
latent border, so the clip is padded at its end to a whole number of segments: the "canvas". The segment
length is whichever of the two pads the clip least (the longer on a tie), and the slots are at frames
`S, 2S, ..., canvas - 1`: frame 0 has none (its latent already holds one frame) and the last frame has one.
The padding is generated with the rest and cut off before decoding (`trim_canvas`).

A temporal refine round doubles the frame rate of a finished canvas and re-denoises it in windows cut at the
keyframes (`temporal_tiles`): the previous slots become the seams the windows start and end on, and each window
generates new slots midway between them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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


@dataclass(frozen=True)
class TemporalTile:
    """One window of a temporal refine round: latent frames `[start, end)` of the round's canvas, of which the
    first `lead` only give context (the earlier tile owns them: they are dropped when stitching); the video frames
    it covers, `first_frame` to `last_frame` inclusive; the seams inside it (`anchors`, kept as keyframes) and the
    new slots it generates (`slots`, midway between its marks). Frames are on the round's canvas."""

    start: int
    end: int
    lead: int
    first_frame: int
    last_frame: int
    anchors: tuple[int, ...]
    slots: tuple[int, ...]


def temporal_tiles(
    seams: Sequence[int], num_frames: int, num_tiles: int, temporal_compression: int = 8
) -> list[TemporalTile]:
    """Split a round's canvas of `num_frames` (whose last frame is the last seam) into `num_tiles` windows cut at
    keyframe seams (video frames on latent borders). Segments are dealt out evenly, the leftovers to the first
    tiles; each later tile reaches back one segment and the seam before it, so it starts on a kept keyframe with
    the frames before as context."""
    tc = temporal_compression
    if any(p % tc or p <= 0 for p in seams) or any(a >= b for a, b in zip(seams[:-1], seams[1:], strict=True)):
        raise ConfigError(f"keyframe seams {list(seams)} must be increasing video frames on the x{tc} latent grid")
    length = (num_frames - 1) // tc + 1
    cells = [0, *(p // tc for p in seams)]
    if cells[-1] != length - 1:
        raise ConfigError(f"the last keyframe seam ({seams[-1]}) must be the canvas's last frame ({num_frames - 1})")
    segments = len(cells) - 1
    count = max(1, min(int(num_tiles), segments))
    base, extra = divmod(segments, count)
    overlap = cells[1] + 1
    tiles, cursor = [], 0
    for index in range(count):
        resume = cells[cursor] + 1
        start = 0 if index == 0 else max(0, resume - overlap)
        cursor += base + (1 if index < extra else 0)
        end = cells[cursor] + 1
        first, last = start * tc, (end - 1) * tc
        marks = [first, *(p for p in seams if first < p <= last)]
        tiles.append(
            TemporalTile(
                start=start,
                end=end,
                lead=0 if index == 0 else resume - start,
                first_frame=first,
                last_frame=last,
                anchors=tuple(p for p in seams if first <= p <= last),
                slots=tuple((a + b) // 2 for a, b in zip(marks[:-1], marks[1:], strict=True)),
            )
        )
    return tiles
