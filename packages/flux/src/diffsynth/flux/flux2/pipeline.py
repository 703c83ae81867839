"""`Flux2ImagePipeline`: FLUX.2-dev and FLUX.2-klein text-to-image, image-to-image and multi-reference editing.

Stages: encode prompts (Mistral-Small-3.1 for dev, Qwen3 for klein: three inner layers' hidden
states side by side) -> prepare latents (seeded noise, or the noised input image; reference images
VAE-encoded) -> denoise (Euler on FLUX.2's schedule; dev embeds its distilled guidance, klein base
models use true CFG batched with the conditional pass) -> decode (FLUX.2 VAE).
`flux2_velocity` is the per-step model call; the trainer reuses it.

Latents are `[B, 128, H/16, W/16]` outside the DiT: the VAE's 32 channels packed 2x2 and
normalised by its BatchNorm statistics (`Flux2VAE.encode` returns them so). The DiT sees them as
`H/16 * W/16` tokens in row-major order with 4-axis ids (t, row, col, 0); text tokens get
(0, 0, 0, index). Reference images (`edit_image`) are appended after the image tokens, the i-th
with t = 10 * (i + 1), and the output is cut back to the image tokens, as BFL and diffusers do.
KV models (FLUX.2-klein-9B-KV) take the references apart: their keys and values are computed on the
first step and reused by the later ones (`use_kv_cache`, on by default for them; `ReferenceCache`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.inpaint import check_blur, inpaint_velocity, mask_grid
from diffsynth.runtime.media import area_size, load_image, load_images, pil_to_tensor, tensor_to_output
from diffsynth.runtime.models.qwen3 import Qwen3TextEncoder
from diffsynth.runtime.pipeline import BasePipeline, finite_number, weight_paths
from diffsynth.runtime.schedulers import FlowMatchScheduler
from diffsynth.runtime.vram import module_dtype

from .dit import Flux2DiT, ReferenceCache
from .formats import released_as_distilled, released_as_kv
from .text_encoder import load_mistral_tokenizer, mistral_prompt_embeds, qwen3_prompt_embeds

logger = logging.getLogger(__name__)

DEFAULT_GUIDANCE = 4.0  # FLUX.2-dev model card and diffusers' Flux2Pipeline
DEFAULT_STEPS = 50
REFERENCE_TIME_SCALE = 10  # reference image i is placed at t = 10 * (i + 1)
REFERENCE_MAX_AREA = 1024 * 1024  # larger reference images are scaled down to this many pixels
REFERENCE_MIN_SIDE = 64
REFERENCE_MAX_ASPECT = 8


# ----------------------------------------------------------------------------------------------- tokens
def latents_to_tokens(latents: torch.Tensor) -> torch.Tensor:
    """`[B, C, h, w]` -> `[B, h * w, C]` in row-major order."""
    return latents.flatten(2).transpose(1, 2)


def tokens_to_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of `latents_to_tokens` for an `height` x `width` latent grid."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], height, width)


def grid_ids(height: int, width: int, t: float = 0.0, device=None) -> torch.Tensor:
    """`[h * w, 4]` position ids (t, row, col, 0) of an `height` x `width` latent grid, row-major."""
    rows = torch.arange(height, device=device, dtype=torch.float32)
    cols = torch.arange(width, device=device, dtype=torch.float32)
    ids = torch.zeros(height, width, 4, device=device)
    ids[..., 0] = t
    ids[..., 1] = rows[:, None]
    ids[..., 2] = cols[None, :]
    return ids.reshape(-1, 4)


def text_ids(length: int, device=None) -> torch.Tensor:
    """`[L, 4]` ids (0, 0, 0, index) of the text tokens."""
    ids = torch.zeros(length, 4, device=device)
    ids[:, 3] = torch.arange(length, device=device, dtype=torch.float32)
    return ids


@dataclass
class ReferenceLatents:
    """Reference-image tokens `[1 or B, N, 128]` and their ids `[N, 4]` (t = 10, 20, ... per image)."""

    tokens: torch.Tensor
    ids: torch.Tensor


def flux2_velocity(
    dit,
    latents: torch.Tensor,
    sigma: torch.Tensor,
    prompt_embeds: torch.Tensor,
    guidance: torch.Tensor | float | None = None,
    references: ReferenceLatents | None = None,
    cache: ReferenceCache | None = None,
) -> torch.Tensor:
    """Flow velocity (noise - clean) `[B, 128, h, w]` (float32) predicted at noise level `sigma` [B].

    `prompt_embeds` `[B, L, context]` come from `encode_prompt`. `guidance` is the distilled guidance
    of FLUX.2-dev (e.g. 4.0), per sample or shared; it is not passed to models without a guidance
    embedder (klein). `references` are appended after the image tokens and cut from the output; a KV
    model (`causal_references`) takes them apart, with `cache` (a `ReferenceCache`) keeping their keys
    and values from the first call on. Computation runs in the DiT's dtype.
    """
    dtype = module_dtype(dit)
    b, _, h, w = latents.shape
    img = latents_to_tokens(latents)
    ids = grid_ids(h, w, device=latents.device)
    n_img = img.shape[1]
    kv_inputs = {}
    if getattr(dit.config, "causal_references", False) or cache is not None:
        if references is not None:
            kv_inputs = dict(reference=references.tokens.to(dtype), reference_ids=references.ids.to(ids.device))
        if cache is not None:
            kv_inputs["cache"] = cache
    elif references is not None:
        img = torch.cat([img, references.tokens.to(img.dtype).expand(b, -1, -1)], dim=1)
        ids = torch.cat([ids, references.ids.to(ids.device)], dim=0)
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=latents.device).reshape(-1).expand(b)
    if getattr(dit.config, "guidance_embed", False):
        guidance = DEFAULT_GUIDANCE if guidance is None else guidance
        guidance = torch.as_tensor(guidance, dtype=torch.float32, device=latents.device).reshape(-1).expand(b)
    else:
        guidance = None
    txt_ids = text_ids(prompt_embeds.shape[1], device=latents.device)
    out = dit(img.to(dtype), ids, prompt_embeds.to(dtype), txt_ids, sigma, guidance, **kv_inputs)
    return tokens_to_latents(out[:, :n_img].float(), h, w)


def reference_size(width: int, height: int) -> tuple[int, int]:
    """The size a reference image is used at: scaled down to at most 1024 x 1024 pixels of area (keeping
    its aspect), then cut to multiples of 16 (BFL's and diffusers' rule)."""
    if width * height > REFERENCE_MAX_AREA:
        scale = math.sqrt(REFERENCE_MAX_AREA / (width * height))
        width, height = int(width * scale), int(height * scale)
    return width, height


def fit_to_area(image: Image.Image, area: int = REFERENCE_MAX_AREA) -> Image.Image:
    """DiffSynth-Studio's `edit_image_auto_resize`: about `area` pixels with the image's aspect, sides rounded to
    multiples of 32; scaled (bilinear) to cover that size, then cut at the centre (torchvision's rounding)."""
    target_w, target_h = area_size(image.width, image.height, area)
    scale = max(target_w / image.width, target_h / image.height)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
    top, left = int(round((image.height - target_h) / 2.0)), int(round((image.width - target_w) / 2.0))
    return image.crop((left, top, left + target_w, top + target_h))


class Flux2ImagePipeline(BasePipeline):
    """FLUX.2 text-to-image / image-to-image / editing, API compatible with DiffSynth-Studio."""

    family = "flux2"
    model_slots = {"dit": "dit", "vae": "vae", "text_encoder": "text_encoder"}
    # klein's text encoder is a Qwen3 (the runtime's spec), the others a Mistral 3
    slot_specs = {"dit": ("flux2_dit",), "vae": ("flux2_vae",), "text_encoder": ("mistral3_text_encoder", "qwen3")}
    size_multiple = 16  # VAE 8x, 2x2 packing
    # A step-distilled DiT (klein-4B/9B/9B-KV, model_index.json `is_distilled`) ignores cfg_scale, as diffusers'
    # Flux2KleinPipeline does; set on loading the DiT (`_load_config`), True by hand for a single file.
    step_distilled: bool = False

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] = "",
        cfg_scale: float | None = None,
        embedded_guidance: float | None = None,
        input_image=None,
        denoising_strength: float = 1.0,
        inpaint_mask=None,
        inpaint_blur_size: int | None = None,
        inpaint_blur_sigma: float | None = None,
        edit_image=None,
        edit_image_auto_resize: bool | None = None,
        height: int | None = None,
        width: int | None = None,
        seed: int | None = None,
        rand_device: str = "cpu",
        num_inference_steps: int | None = None,
        sigmas: Sequence[float] | torch.Tensor | None = None,
        latents: torch.Tensor | None = None,
        initial_noise: torch.Tensor | None = None,
        max_sequence_length: int | None = None,
        tiled: bool = False,
        tile_size: int = 512,
        tile_stride: int = 384,
        output_type: str = "pil",
        progress_bar: bool = True,
        use_kv_cache: bool | None = None,
    ):
        """Generate images: a PIL image for one prompt, a list for a list of prompts; "np"/"pt" give the batch.

        `embedded_guidance` is FLUX.2-dev's distilled guidance (4 by default; klein has none).
        `cfg_scale` > 1 adds true classifier-free guidance with `negative_prompt` (the klein base
        models' preset uses 4; the step-distilled models ignore it with a warning: `step_distilled`).
        `edit_image` (one image or a list) are
        reference images for editing, used at their own size (scaled down to 1024x1024 pixels of area
        when larger, cut to multiples of 16); without `height`/`width` the output takes the first one's
        size. `edit_image_auto_resize` (DiffSynth-Studio's argument) True scales each reference to about 1024x1024
        pixels of area (up or down, sides multiples of 32: `fit_to_area`), False keeps it as given (cut to
        multiples of 16). `input_image` with `denoising_strength` < 1 is image-to-image; without `height`/`width` the
        output takes the first input image's size (scaled down to 1024x1024 pixels of area when larger, cut to
        multiples of 16, as diffusers' Flux2KleinInpaintPipeline), ahead of `edit_image`'s; a side given is kept.
        With `inpaint_mask` (a PIL "L" image
        of its size, or one per input image; white = repaint) the rest of it is kept, the mask optionally
        blurred by `inpaint_blur_size` / `inpaint_blur_sigma` on the token grid (DiffSynth-Studio's arguments,
        `diffsynth.runtime.inpaint`). `latents` (or DiffSynth-Studio's `initial_noise`) is the initial
        noise `[B, 128, H/16, W/16]`; `sigmas` an explicit schedule (terminal 0 appended).
        `use_kv_cache` (KV models such as FLUX.2-klein-9B-KV; on by default for them): the references' keys and
        values are computed on the first step and reused by the later ones; False recomputes them every step
        (the same result, slower). Other models refuse True: their references depend on the step.
        """
        if initial_noise is not None:
            if latents is not None:
                raise ConfigError("give latents or DiffSynth-Studio's initial_noise (the same thing), not both")
            latents = initial_noise
        prompts, negatives = self.check_prompt_pair(prompt, negative_prompt)
        cfg_scale = finite_number(self.setting("cfg_scale", cfg_scale, 1.0), "cfg_scale")
        if embedded_guidance is not None and not self.dit.config.guidance_embed:
            raise ConfigError(
                f"embedded_guidance={embedded_guidance!r} is FLUX.2-dev's distilled guidance; this DiT (klein) has no "
                "guidance embedder, so it would change nothing. klein has no distilled guidance: the klein base "
                "models take cfg_scale (true CFG), the step-distilled ones neither"
            )
        guidance = finite_number(
            self.setting("embedded_guidance", embedded_guidance, DEFAULT_GUIDANCE), "embedded_guidance"
        )
        steps = self.setting("num_inference_steps", num_inference_steps, DEFAULT_STEPS)
        max_sequence_length = self.setting("max_sequence_length", max_sequence_length, 512)
        if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) or max_sequence_length < 1:
            raise ConfigError(f"max_sequence_length={max_sequence_length!r} is not accepted; use an integer >= 1")
        kv_cache = self.kv_cache_setting(use_kv_cache)
        starts = load_images(input_image, "input_image")
        references = self.load_edit_images(edit_image, edit_image_auto_resize)
        height, width = self.output_size(height, width, starts, references)
        if output_type not in ("pil", "np", "pt"):
            raise ConfigError(f"output_type={output_type!r} is not accepted; use 'pil', 'np' or 'pt'")
        if cfg_scale != 1.0 and self.step_distilled:
            logger.warning(
                "cfg_scale=%s is ignored for step-distilled FLUX.2 models (klein-4B/9B/9B-KV): sampling without CFG",
                cfg_scale,
            )
            cfg_scale = 1.0
        if cfg_scale != 1.0 and self.dit.config.guidance_embed:
            logger.warning("cfg_scale=%s on a guidance-distilled FLUX.2 model doubles the compute", cfg_scale)
        use_cfg = cfg_scale != 1.0
        blur = check_blur(inpaint_blur_size, inpaint_blur_sigma)
        if inpaint_mask is None and blur is not None:
            raise ConfigError("inpaint_blur_size / inpaint_blur_sigma blur inpaint_mask: give the mask too")
        if inpaint_mask is not None and input_image is None:
            raise ConfigError("inpaint_mask needs input_image: the mask says which part of input_image to repaint")
        if input_image is None and denoising_strength != 1.0:
            raise ConfigError(
                f"denoising_strength={denoising_strength!r} is how far image-to-image moves from input_image: give "
                "input_image, or leave denoising_strength at 1"
            )

        # 1. prompts
        self.load_models_to_device(["text_encoder"])
        text = self.encode_prompt(prompts, max_sequence_length)
        negative_text = self.encode_prompt(negatives, max_sequence_length) if use_cfg else None

        # 2. schedule, latents and reference tokens
        scheduler = FlowMatchScheduler("flux2")
        scheduler.set_timesteps(
            steps, denoising_strength=denoising_strength, sigmas=sigmas, image_seq_len=height * width // 256
        )
        self.load_models_to_device(["vae"] if input_image is not None or references else [])
        x, clean = self.prepare_latents(
            len(prompts),
            height,
            width,
            seed,
            rand_device,
            latents,
            starts,
            scheduler,
            tiled,
            tile_size,
            tile_stride,
        )
        refs = self.encode_references(references, tiled, tile_size, tile_stride) if references else None
        repaint = None
        if inpaint_mask is not None:
            repaint = mask_grid(inpaint_mask, starts, len(prompts), (height // 16, width // 16), self.device, blur)

        # 3. denoise
        self.load_models_to_device(["dit"])
        cache = ReferenceCache() if kv_cache and refs is not None else None  # one for both CFG halves
        for i in self.progress(range(len(scheduler.timesteps)), progress_bar):
            velocity = self.predict(x, scheduler.sigmas[i], text, negative_text, cfg_scale, guidance, refs, cache)
            if repaint is not None:
                velocity = inpaint_velocity(velocity, x, clean, scheduler.sigmas[i], repaint)
            x = scheduler.step(velocity, i, x)

        # 4. decode
        self.load_models_to_device(["vae"])
        images = self.vae.decode(
            x.to(module_dtype(self.vae)), tiled=tiled, tile_size=tile_size, tile_stride=tile_stride
        )
        self.load_models_to_device([])
        out = tensor_to_output(images.float(), output_type)
        return out[0] if isinstance(prompt, str) and output_type == "pil" else out

    def kv_cache_setting(self, use_kv_cache: bool | None) -> bool:
        """`use_kv_cache` checked; None takes the preset's setting, else whether the DiT is a KV model."""
        causal = bool(getattr(getattr(self.dit, "config", None), "causal_references", False))
        value = self.setting("use_kv_cache", use_kv_cache, None)
        if value is None:
            return causal
        if not isinstance(value, bool):
            raise ConfigError(f"use_kv_cache={value!r} is not accepted; use True, False or None (the model's default)")
        if value and not causal:
            raise ConfigError(
                "use_kv_cache=True needs a FLUX.2 KV model (black-forest-labs/FLUX.2-klein-9b-kv): this DiT's "
                "reference tokens attend to the image at every step, so their keys and values cannot be reused. "
                "A KV checkpoint loaded from a single file is marked with pipe.dit.config.causal_references = True"
            )
        return value

    def _load_config(self, config: ModelConfig) -> None:
        """A DiT from a FLUX.2 KV release (its hub repo, or a diffusers folder whose `model_index.json` names
        `Flux2KleinKVPipeline`) is marked `causal_references`: its files alone cannot tell."""
        held = self.dit
        super()._load_config(config)
        if self.dit is not held and isinstance(self.dit, Flux2DiT):
            if released_as_kv(config.model_id, weight_paths(config)):
                self.dit.config.causal_references = True
            self.step_distilled = released_as_distilled(config.model_id, weight_paths(config))

    def _load_tokenizer(self, config: ModelConfig):
        """klein's Qwen tokenizer as is; FLUX.2-dev's Pixtral folder with the processor's chat template
        (`load_mistral_tokenizer`), chosen by the text encoder loaded beside it."""
        if isinstance(self.text_encoder, Qwen3TextEncoder):
            return super()._load_tokenizer(config)
        paths = config.resolve()
        return load_mistral_tokenizer(paths[0] if Path(paths[0]).is_dir() else Path(paths[0]).parent)

    def read_lora(self, path, slot: str = "dit"):
        """FLUX.2 DiT LoRAs in BFL, kohya, ComfyUI/ai-toolkit and diffusers/peft layouts, merged onto our fused
        layers (`flux2/lora.py`); other slots read the common layouts."""
        from .dit import Flux2DiT
        from .lora import read_flux2_lora

        model = getattr(self, slot, None)
        if isinstance(model, Flux2DiT):
            return read_flux2_lora(path, model)
        return super().read_lora(path, slot)

    # ------------------------------------------------------------------ stages
    def encode_prompt(self, prompts: list[str], max_sequence_length: int = 512) -> torch.Tensor:
        """`[B, L, context]`: Qwen3 (klein) or Mistral-Small (dev) hidden states of three layers, side by side."""
        if self.tokenizer is None:
            raise ConfigError(
                "Flux2ImagePipeline has no tokenizer: pass tokenizer_config=ModelConfig(..., origin_file_pattern='tokenizer/')"
            )
        encode = qwen3_prompt_embeds if isinstance(self.text_encoder, Qwen3TextEncoder) else mistral_prompt_embeds
        embeds = encode(
            self.text_encoder, self.tokenizer, prompts, max_sequence_length=max_sequence_length, device=self.device
        )
        # without a DiT (a trainer's encoding stage) there is nothing to check the width against
        context = self.dit.config.context_in_dim if self.dit is not None else embeds.shape[-1]
        if embeds.shape[-1] != context:
            raise ConfigError(
                f"the text encoder gives {embeds.shape[-1]} features per token but this DiT takes {context}: "
                "the text encoder and the DiT come from different FLUX.2 models"
            )
        return embeds.to(self.device)

    def output_size(self, height, width, starts, references) -> tuple[int, int]:
        """The checked `(height, width)`: the call's; a side not given comes from the first input image (at the size a
        reference is used at: `reference_size`, cut to multiples of 16, as diffusers' Flux2KleinInpaintPipeline),
        else from the first reference image; else the preset's, else 1024."""
        if starts:
            image_w, image_h = starts[0].size
            size_w, size_h = reference_size(image_w, image_h)
            size_w, size_h = size_w // 16 * 16, size_h // 16 * 16
            if (height is None or width is None) and (size_w, size_h) != (image_w, image_h):
                logger.warning(
                    "input_image %dx%d used at %dx%d (at most 1024x1024 pixels of area, multiples of 16); "
                    "give height and width for another size",
                    image_w, image_h, size_w, size_h,
                )  # fmt: skip
            height, width = height if height is not None else size_h, width if width is not None else size_w
            try:
                return self.check_size(height, width)
            except ConfigError as exc:
                raise ConfigError(
                    f"{exc} (from the size of input_image, {image_w}x{image_h}; give height and width)"
                ) from None
        if references:
            height = height if height is not None else references[0].height
            width = width if width is not None else references[0].width
        return self.check_size(self.setting("height", height, 1024), self.setting("width", width, 1024))

    def prepare_latents(
        self, batch, height, width, seed, rand_device, latents, input_images, scheduler, tiled, tile_size, tile_stride
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The starting latents, and the input images' clean latents (None without any); `input_images` are
        loaded RGB images (`load_images`), resized to the output size."""
        shape = (batch, self.dit.config.in_channels, height // 16, width // 16)
        noise = (
            self.check_latents(latents, shape) if latents is not None else self.generate_noise(shape, seed, rand_device)
        )
        if input_images is None:
            return noise, None
        images = [image.resize((width, height), Image.LANCZOS) for image in input_images]
        if len(images) not in (1, batch):
            raise ConfigError(f"input_image has {len(images)} images for {batch} prompts; give one or one per prompt")
        clean = self.vae_encode(images, tiled, tile_size, tile_stride)
        if clean.shape[0] == 1 and batch > 1:
            clean = clean.expand(batch, -1, -1, -1)
        return scheduler.add_noise(clean, noise, scheduler.sigmas[0]), clean

    def vae_encode(self, images: list[Image.Image], tiled=False, tile_size=512, tile_stride=384) -> torch.Tensor:
        pixels = pil_to_tensor(images, dtype=module_dtype(self.vae), device=self.device)
        return self.vae.encode(pixels, tiled=tiled, tile_size=tile_size, tile_stride=tile_stride).float()

    def load_edit_images(self, edit_image, auto_resize: bool | None = None) -> list[Image.Image]:
        """Reference images as RGB at the size they are encoded at (`reference_size`, or `fit_to_area` with
        `auto_resize`, or as given without; then a centred cut to multiples of 16); too small or too elongated
        images are refused, naming the item."""
        if auto_resize is not None and not isinstance(auto_resize, bool):
            raise ConfigError(f"edit_image_auto_resize={auto_resize!r} is not accepted; use True, False or None")
        if edit_image is None:
            return []
        items = list(edit_image) if isinstance(edit_image, (list, tuple)) else [edit_image]
        images = []
        for i, item in enumerate(items):
            image = load_image(item, name=f"edit_image[{i}]" if isinstance(edit_image, (list, tuple)) else "edit_image")
            w, h = image.size
            if min(w, h) < REFERENCE_MIN_SIDE:
                raise ConfigError(f"edit_image[{i}] is {w}x{h}; both sides need at least {REFERENCE_MIN_SIDE} pixels")
            if max(w / h, h / w) > REFERENCE_MAX_ASPECT:
                raise ConfigError(
                    f"edit_image[{i}] is {w}x{h}; its aspect ratio may be at most {REFERENCE_MAX_ASPECT}:1"
                )
            if auto_resize:
                image = fit_to_area(image)
            elif auto_resize is None and (size := reference_size(w, h)) != image.size:
                image = image.resize(size, Image.LANCZOS)
            cut_w, cut_h = image.width // 16 * 16, image.height // 16 * 16
            left, top = (image.width - cut_w) // 2, (image.height - cut_h) // 2
            images.append(image.crop((left, top, left + cut_w, top + cut_h)))
        return images

    def encode_references(self, images: list[Image.Image], tiled=False, tile_size=512, tile_stride=384):
        """Every reference image VAE-encoded (posterior mode), as tokens with ids (10 * (i + 1), row, col, 0)."""
        tokens, ids = [], []
        for i, image in enumerate(images):
            z = self.vae_encode([image], tiled, tile_size, tile_stride)
            tokens.append(latents_to_tokens(z))
            ids.append(grid_ids(z.shape[2], z.shape[3], t=REFERENCE_TIME_SCALE * (i + 1), device=self.device))
        return ReferenceLatents(torch.cat(tokens, dim=1), torch.cat(ids, dim=0))

    def predict(self, x, sigma, text, negative_text, cfg_scale, guidance, references=None, cache=None) -> torch.Tensor:
        """One denoiser evaluation; with true CFG the two branches run as one batch."""
        batch = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        if negative_text is None:
            return flux2_velocity(self.dit, x, sigma.expand(batch), text, guidance, references, cache)
        both = flux2_velocity(
            self.dit,
            torch.cat([x, x]),
            sigma.expand(2 * batch),
            _cat_padded(text, negative_text),
            guidance,
            references,
            cache,
        )
        return self.guide(both[:batch], both[batch:], cfg_scale)


def _cat_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Two prompt batches as one; both are padded to `max_sequence_length`, so lengths agree."""
    if a.shape[1] != b.shape[1]:
        raise ConfigError(f"prompt and negative prompt embeddings differ in length ({a.shape[1]} vs {b.shape[1]})")
    return torch.cat([a, b])
