"""FLUX.1 Tools conditions that widen the DiT's input: Fill (inpainting / outpainting) and Canny / Depth.

These DiTs are FLUX.1-dev with a wider `img_in`: each image token carries its 64 noisy features followed by
condition features of the same token, and the output stays 64 wide.

- Fill (`FLUX.1-Fill-dev`, `in_channels` 384): the masked image (pixels to repaint set to 0 in [-1, 1]),
  VAE-encoded and packed (64 features), then the pixel mask folded per token: each 16x16 pixel patch of a
  token as 2x2 latent pixels of 8x8 mask pixels, 256 features ordered (mask row, mask column, latent row,
  latent column), as BFL's `prepare_fill` rearranges it.
- Canny / Depth (`FLUX.1-Canny-dev`, `FLUX.1-Depth-dev`, `in_channels` 128; or FLUX.1-dev with the control
  LoRA, which widens `img_in` the same way): the control map VAE-encoded and packed (64 features).
- Flex.2 (`ostris/Flex.2-preview`, `in_channels` 196; 8 double blocks): the inpainting image's latents with the
  part to repaint faded out by the mask, the mask on the latent grid, and the control map's latents times a
  strength, each packed (64 + 4 + 64 features): the three latents side by side on channels, then the 2x2 packing,
  as DiffSynth-Studio builds them (`flex_condition`). Every part is optional: zeros, and a mask of ones.

What kind of DiT a model is follows from its widths alone (`condition_kind`).
"""

from __future__ import annotations

import torch

FILL = "fill"
CONTROL = "control"
FLEX = "flex"
MASK_FEATURES = 256  # 16x16 pixels per token
FLEX_MASK_FEATURES = 4  # one latent-grid channel, 2x2 per token


def condition_kind(config) -> str | None:
    """`FILL`, `CONTROL` or None (a plain DiT) from a FLUX.1 DiT config's `in_channels` / `out_channels`;
    "unknown" for other widths."""
    extra = config.in_channels - config.out_channels
    if extra == 0:
        return None
    if extra == config.out_channels + MASK_FEATURES:
        return FILL
    if extra == config.out_channels:
        return CONTROL
    if extra == 2 * config.out_channels + FLEX_MASK_FEATURES:
        return FLEX
    return "unknown"


def describe_widths(config) -> str:
    """Words for a DiT's input kind, for error messages."""
    kind = condition_kind(config)
    names = {
        None: "a plain FLUX.1 DiT",
        FILL: "a FLUX.1 Fill DiT",
        CONTROL: "a FLUX.1 Canny/Depth DiT",
        FLEX: "a Flex.2 DiT",
        "unknown": "a FLUX.1 DiT of unknown input kind",
    }
    return f"{names[kind]} (in_channels {config.in_channels}, out_channels {config.out_channels})"


def flex_condition(
    inpaint: torch.Tensor | None, mask: torch.Tensor | None, control: torch.Tensor | None, like: torch.Tensor
) -> torch.Tensor:
    """Flex.2's condition latents `[B, 2 C + 1, h, w]` (to be packed) from the inpainting image's latents
    `inpaint`, the mask `[B, 1, h, w]` on the latent grid (1 = repaint) and the control map's latents `control`
    (already scaled by its strength); absent parts are zeros (the mask: ones), shaped `like` the noisy latents."""
    b, c, h, w = like.shape
    mask = torch.ones(b, 1, h, w, dtype=like.dtype, device=like.device) if mask is None else mask.to(like)
    inpaint = like.new_zeros(b, c, h, w) if inpaint is None else inpaint.to(like)
    control = like.new_zeros(b, c, h, w) if control is None else control.to(like)
    parts = [p.expand(b, -1, -1, -1) for p in (inpaint * (1 - mask), mask, control)]
    return torch.cat(parts, dim=1)


def fold_mask(mask: torch.Tensor) -> torch.Tensor:
    """A pixel mask `[B, 1, H, W]` (H, W multiples of 16) -> `[B, H/16 * W/16, 256]` Fill mask tokens.

    Token (i, j) covers pixel rows `16 i + 8 py + dy` and columns `16 j + 8 px + dx`; its features are ordered
    (dy, dx, py, px): BFL's `b (h ph) (w pw) -> b (ph pw) h w` with ph = pw = 8, then the 2x2 packing."""
    b, c, h, w = mask.shape
    if c != 1 or h % 16 or w % 16:
        raise ValueError(f"mask has shape {tuple(mask.shape)}; expected [B, 1, H, W] with H, W multiples of 16")
    grid = mask.reshape(b, h // 16, 2, 8, w // 16, 2, 8)  # b, i, py, dy, j, px, dx
    return grid.permute(0, 1, 4, 3, 6, 2, 5).reshape(b, (h // 16) * (w // 16), MASK_FEATURES)


__all__ = [
    "CONTROL",
    "FILL",
    "FLEX",
    "FLEX_MASK_FEATURES",
    "MASK_FEATURES",
    "condition_kind",
    "describe_widths",
    "flex_condition",
    "fold_mask",
]
