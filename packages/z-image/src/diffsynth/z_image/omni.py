"""Token layout of Z-Image Omni's joint sequence: caption segments, image latents, SigLIP features.

One sample of an Omni call holds

- caption segments `s_0 .. s_{S-1}` (the prompt template split around the images, see `pipeline.py`);
- image latents `x_0 .. x_n`: `n` clean condition images, then the noisy target;
- optionally SigLIP features for each condition image (a `[h, w, C]` grid); the target's SigLIP slot is
  always 32 pad tokens.

The layout is that of the reference implementation (diffusers' `ZImageTransformer2DModel` in its "omni"
mode, the same code as DiffSynth-Studio's and the authors'), so the released weights see what they were
trained on:

- each segment, image and SigLIP grid is padded on its own to a multiple of 32 tokens (pad rows are
  replaced by the stream's learned pad token after embedding);
- the joint sequence is `[all segments | all images | all SigLIP grids]`;
- on the first RoPE axis captions count from 1; segment `j` ends at `e_j`, image `j` sits at frame `e_j`,
  its SigLIP grid at `e_j + 1`, and segment `j + 1` starts at `e_j + 2`. Image rows and columns are the
  patch grid; SigLIP rows and columns are stretched onto the image's latent grid (truncated to integers);
- condition image `j`, its SigLIP grid and segment `j` are clean (time 1); everything else is noisy.

Two details are kept exactly as the reference computes them, although they look accidental: caption ids
are written segment by segment with `padded + pad` entries each and the concatenation is cut to the token
count (so from the second segment on, ids are shifted and some tokens get id 0), and a SigLIP grid is
flattened by reshaping its channel-first view (not a transpose).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

SEQ_MULTIPLE = 32  # every segment / image / SigLIP grid is padded to a multiple of this


def round_up(n: int) -> int:
    return n + (-n) % SEQ_MULTIPLE


@dataclass
class Stream:
    """One token stream of one sample, before embedding.

    `feats` `[N, C]` raw features (pad rows are zero), `is_pad` `[N]` rows that take the stream's pad
    token, `positions` `[N, 3]` RoPE ids, `noisy` `[N]` rows modulated by the noisy time (else the clean one).
    """

    feats: torch.Tensor
    is_pad: torch.Tensor
    positions: torch.Tensor
    noisy: torch.Tensor

    def __len__(self) -> int:
        return int(self.feats.shape[0])


def _padded(feats: torch.Tensor, positions: torch.Tensor | None, noisy: bool) -> Stream:
    n, device = feats.shape[0], feats.device
    pad = (-n) % SEQ_MULTIPLE
    rows = torch.arange(n + pad, device=device)
    if positions is None:
        positions = torch.zeros(n, 3, dtype=torch.long, device=device)
    return Stream(
        feats=F.pad(feats, (0, 0, 0, pad)),
        is_pad=rows >= n,
        positions=F.pad(positions, (0, 0, 0, pad)),  # pad rows sit at (0, 0, 0)
        noisy=torch.full((n + pad,), noisy, dtype=torch.bool, device=device),
    )


def _join(chunks: list[Stream]) -> Stream:
    return Stream(
        *(torch.cat([getattr(c, name) for c in chunks]) for name in ("feats", "is_pad", "positions", "noisy"))
    )


def grid_ids(grid: tuple[int, int, int], start: tuple[int, int, int], device) -> torch.Tensor:
    """`[F*H*W, 3]` ids of a row-major grid offset by `start`."""
    axes = [torch.arange(s, s + n, device=device) for s, n in zip(start, grid, strict=True)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)


def caption_stream(segments: list[torch.Tensor], n_clean: int) -> tuple[Stream, list[int]]:
    """The caption segments of one sample, and where each ends on the first RoPE axis (`e_j`)."""
    chunks, ids, ends = [], [], []
    start = 1
    for j, segment in enumerate(segments):
        n = int(segment.shape[0])
        padded = round_up(n)
        chunks.append(_padded(segment, None, noisy=j >= n_clean))
        # the reference's ids for this segment: `padded` consecutive ids, then `padded - n` zero ids
        seg_ids = torch.zeros(2 * padded - n, 3, dtype=torch.long, device=segment.device)
        seg_ids[:padded, 0] = torch.arange(start, start + padded, device=segment.device)
        ids.append(seg_ids)
        ends.append(start + n)
        start += n + 2  # the image and its SigLIP grid take the next two ids
    stream = _join(chunks)
    stream.positions = torch.cat(ids)[: len(stream)]
    return stream, ends


def image_stream(
    patches: list[torch.Tensor], grids: list[tuple[int, int, int]], ends: list[int], n_clean: int
) -> tuple[Stream, list[int]]:
    """The image latents of one sample (patch tokens `[N_j, patch_dim]` on token grids `grids`), and where
    each image starts in the stream."""
    chunks, starts, offset = [], [], 0
    for j, (tokens, grid) in enumerate(zip(patches, grids, strict=True)):
        ids = grid_ids(grid, (ends[j], 0, 0), tokens.device)
        chunks.append(_padded(tokens, ids, noisy=j >= n_clean))
        starts.append(offset)
        offset += len(chunks[-1])
    return _join(chunks), starts


def siglip_stream(
    feats: list[torch.Tensor], latent_sizes: list[tuple[int, int]], ends: list[int], feat_dim: int
) -> Stream:
    """SigLIP grids `[h, w, C]` of the condition images (latent sizes `(H, W)` each), then the target's slot."""
    chunks = []
    for j, grid in enumerate(feats):
        h, w, c = grid.shape
        flat = grid.permute(2, 0, 1).reshape(h * w, c)  # the reference's flattening (see the module docstring)
        ids = grid_ids((1, h, w), (ends[j] + 1, 0, 0), grid.device).float()
        height, width = latent_sizes[j]
        ids[:, 1] = ids[:, 1] / max(h - 1, 1) * (height - 1)
        ids[:, 2] = ids[:, 2] / max(w - 1, 1) * (width - 1)
        chunks.append(_padded(flat, ids.long(), noisy=False))
    device, dtype = feats[0].device, feats[0].dtype
    target = Stream(  # the target has no SigLIP grid: one block of pad tokens
        feats=torch.zeros(SEQ_MULTIPLE, feat_dim, device=device, dtype=dtype),
        is_pad=torch.ones(SEQ_MULTIPLE, dtype=torch.bool, device=device),
        positions=torch.zeros(SEQ_MULTIPLE, 3, dtype=torch.long, device=device),
        noisy=torch.ones(SEQ_MULTIPLE, dtype=torch.bool, device=device),
    )
    return _join([*chunks, target])


@dataclass
class TokenTime:
    """Per-token time conditioning: rows where `is_noisy` take the embedding of the step's time, the others
    that of time 1 (clean). `[B, adaln_dim]` embeddings, `[B, S]` mask."""

    noisy: torch.Tensor
    clean: torch.Tensor
    is_noisy: torch.Tensor


def modulation(linear, adaln: torch.Tensor | TokenTime) -> torch.Tensor:
    """`linear(adaln)` broadcast over tokens: `[B, 1, out]` for one time per sample, `[B, S, out]` per token."""
    if isinstance(adaln, TokenTime):
        return torch.where(adaln.is_noisy[..., None], linear(adaln.noisy)[:, None], linear(adaln.clean)[:, None])
    return linear(adaln)[:, None]


__all__ = ["Stream", "TokenTime", "caption_stream", "image_stream", "siglip_stream", "modulation", "round_up"]
