"""Qwen-Image-Layered: an RGBA image decomposed into N RGBA layers, through `QwenImagePipeline(layer_input_image=...,
layer_num=N)` (DiffSynth-Studio's argument names).

What the authors ship (diffusers' `QwenImageLayeredPipeline` with the Qwen/Qwen-Image-Layered configs), which
`QwenImagePipeline` follows:

- the input image, as RGBA, is resized (Lanczos) to about `resolution`^2 pixels (640, the card's choice, or
  1024) with its aspect ratio, sides multiples of 32, and encoded by the 4-channel VAE (posterior mode);
- the latent holds N + 1 frames `[B, N + 1, 16, h, w]`: frame 0 becomes the whole image again, frames 1..N
  the layers. Each frame is packed into 2x2 tokens, frame after frame, and the input image's tokens follow as
  the condition; the DiT's layer-3D RoPE numbers the frames 0..N and puts the input image at -1, and its
  additional timestep embedding gets entry 0 for every sample;
- sigmas: `linspace(1, 0, steps + 1)` without its end, bent by a linear (SD3) shift of
  `sqrt(image tokens / 256)` (the scheduler config: dynamic shifting, `time_shift_type="linear"`, no terminal
  stretch); `layered_sigmas`;
- true CFG with the negative prompt, each token's guided velocity optionally rescaled to the norm of its
  conditional one (`cfg_normalize`, on in the authors' model card);
- frame 0 is dropped and each layer decoded as its own RGBA image.

DiffSynth-Studio's Qwen-Image-Layered-Control (a Layered DiT fine-tuned to pull out the one layer the prompt
names) runs the same call with `layer_num=0`: one generated frame, which is the layer, and is kept. Its V2 LoRA
also reads a `context_image` (a mask of the region to pull out, as RGBA): its latent tokens sit between the
generated frame's and the input image's, at the next RoPE frame, as DiffSynth-Studio places them. Its presets
use DiffSynth-Studio's schedule ("qwen_image") and plain CFG, as its examples do.

The prompt is a caption of the input image, encoded with the text-to-image template. diffusers writes one
with Qwen2.5-VL's text generation when the prompt is empty; our text encoder has no `lm_head` (it only yields
hidden states), so an empty prompt is refused, as DiffSynth-Studio does.

`layered_velocity` is the per-step model call.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.media import area_size
from diffsynth.runtime.schedulers.templates import check_steps, linear_grid, static_shift
from diffsynth.runtime.vram import module_dtype

RESOLUTIONS = (640, 1024)  # the authors' size buckets (`resolution=`): output area = resolution ** 2
BASE_TOKENS = 256  # image tokens at which the shift is 1
LAYERED_TEMPLATES = ("qwen_image_layered", "qwen_image")  # the authors' schedule; DiffSynth-Studio's
RGB_INDEX = 0  # entry of the additional timestep embedding the authors' pipeline uses (their `is_rgb`)

CAPTION_REQUIRED = (
    "Qwen-Image-Layered needs a caption of layer_input_image as its prompt. diffusers' QwenImageLayeredPipeline "
    "writes one with Qwen2.5-VL's text generation when the prompt is empty; this pipeline does not (its text "
    "encoder keeps no lm_head and only yields hidden states), as DiffSynth-Studio does not: describe the image "
    "in the prompt"
)


def layered_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """(width, height) of the layers for an input image of `width x height`: about `resolution`^2 pixels with
    its aspect ratio, sides multiples of 32."""
    if resolution not in RESOLUTIONS:
        raise ConfigError(f"layer_resolution={resolution!r} is not accepted; use one of {RESOLUTIONS}")
    return area_size(width, height, resolution * resolution)


def layered_sigmas(num_inference_steps: int, image_seq_len: int, mu: float | None = None) -> torch.Tensor:
    """The authors' N+1 sigmas (terminal 0 included): the linear grid with the static shift
    `mu = sqrt(image_seq_len / 256)`, where `image_seq_len` counts one frame's tokens (H/16 * W/16)."""
    steps = check_steps(num_inference_steps)
    if mu is None:
        mu = math.sqrt(image_seq_len / BASE_TOKENS)
    if not (isinstance(mu, (int, float)) and math.isfinite(mu) and mu > 0):
        raise ConfigError(f"exponential_shift_mu={mu!r} is not accepted for Qwen-Image-Layered; use a number > 0")
    sigmas = static_shift(linear_grid(steps), float(mu))
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(torch.float32)


def pack_frames(latents: torch.Tensor, patch: int = 2) -> torch.Tensor:
    """`[B, F, C, H, W]` -> `[B, F * H/p * W/p, C * p * p]`: each frame packed into tokens, frame after frame."""
    b, f, c, h, w = latents.shape
    x = latents.reshape(b, f, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 1, 3, 5, 2, 4, 6).reshape(b, f * (h // patch) * (w // patch), c * patch * patch)


def unpack_frames(tokens: torch.Tensor, frames: int, height: int, width: int, patch: int = 2) -> torch.Tensor:
    """Inverse of `pack_frames` for `frames` frames of `height x width` latent cells."""
    b, _, d = tokens.shape
    c = d // (patch * patch)
    x = tokens.reshape(b, frames, height // patch, width // patch, c, patch, patch)
    return x.permute(0, 1, 4, 2, 5, 3, 6).reshape(b, frames, c, height, width)


def layered_velocity(
    dit,
    latents: torch.Tensor,
    sigma: torch.Tensor,
    text: torch.Tensor,
    text_mask: torch.Tensor | None,
    condition: torch.Tensor,
    context: torch.Tensor | None = None,
) -> torch.Tensor:
    """Flow velocity `[B, F, 16, h, w]` (float32) of the `F` generated frames `latents` (unpacked, the whole
    image then the layers) at noise level `sigma` [B], given the clean latent `condition` `[B, 16, h', w']` of
    the input image; its tokens follow the frames' and their predictions are discarded. A clean `context`
    latent `[B, 16, h'', w'']` (Layered-Control V2's mask) goes between the two, at RoPE frame F."""
    p = dit.config.patch_size
    b, f, _, h, w = latents.shape
    dtype = module_dtype(dit)
    frames = pack_frames(latents, p)
    clean = [condition] if context is None else [context, condition]
    tokens = torch.cat([frames, *(pack_frames(c[:, None], p) for c in clean)], dim=1).to(dtype)
    shapes = [(1, h // p, w // p)] * f + [(1, c.shape[-2] // p, c.shape[-1] // p) for c in clean]
    extra = {}
    if dit.config.use_additional_t_cond:
        extra["additional_t_cond"] = torch.full((b,), RGB_INDEX, dtype=torch.long, device=latents.device)
    sigma = sigma.to(latents.device, torch.float32).expand(b)
    out = dit(tokens, sigma, text.to(dtype), text_mask, [shapes] * b, **extra)
    return unpack_frames(out[:, : frames.shape[1]].float(), f, h, w, p)


def check_layer_num(layer_num) -> int:
    """`layer_num` >= 1 layers (Qwen-Image-Layered), or 0: the one layer the prompt names (Layered-Control)."""
    if isinstance(layer_num, bool) or not isinstance(layer_num, int) or layer_num < 0:
        raise ConfigError(
            f"layer_num={layer_num!r} is not accepted; use an integer >= 1 (the authors use 4), or 0 with "
            "Qwen-Image-Layered-Control (the layer the prompt names)"
        )
    return layer_num


def check_layered_models(dit, vae) -> None:
    """The loaded DiT and VAE are Qwen-Image-Layered's, with a message naming the files that would be."""
    if not dit.config.use_layer3d_rope:
        raise ConfigError(
            "layer_input_image needs the Qwen-Image-Layered DiT (use_layer3d_rope); the loaded DiT is another "
            "Qwen-Image model: load Qwen/Qwen-Image-Layered's transformer/ (QwenImagePipeline.from_pretrained("
            "'Qwen/Qwen-Image-Layered'))"
        )
    if vae.config.in_channels != 4:
        raise ConfigError(
            f"Qwen-Image-Layered needs its RGBA VAE (4 channels); the loaded VAE has {vae.config.in_channels}: "
            "load Qwen/Qwen-Image-Layered's vae/diffusion_pytorch_model.safetensors"
        )


def refuse_other_modes(given: dict) -> None:
    """Inputs of the other modes are refused with layer_input_image (`given`: name -> value as passed)."""

    def is_set(value) -> bool:
        return value is not None and value is not False and not (isinstance(value, (list, tuple)) and not value)

    used = [name for name, value in given.items() if is_set(value)]
    if used:
        raise ConfigError(
            f"{', '.join(used)} cannot be combined with layer_input_image (Qwen-Image-Layered decomposes one image)"
        )


def check_layer_images(layer_input_image, batch: int) -> list:
    """One input image for all prompts, or one per prompt."""
    images = list(layer_input_image) if isinstance(layer_input_image, (list, tuple)) else [layer_input_image]
    if len(images) not in (1, batch):
        raise ConfigError(f"layer_input_image has {len(images)} images for {batch} prompts; give one, or one each")
    return images


def check_layer_prompts(prompt: str | Sequence[str]) -> None:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt) if prompt is not None else [None]
    if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise ConfigError(CAPTION_REQUIRED)


__all__ = [
    "CAPTION_REQUIRED",
    "LAYERED_TEMPLATES",
    "RESOLUTIONS",
    "check_layer_num",
    "layered_sigmas",
    "layered_size",
    "layered_velocity",
    "pack_frames",
    "unpack_frames",
]
