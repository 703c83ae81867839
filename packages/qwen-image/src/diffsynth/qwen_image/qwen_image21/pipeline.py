"""`QwenImage21Pipeline`: Qwen-Image 2.1 text-to-image and editing with condition images (RGBA in and out).

Stages: encode the prompt together with the condition images (Qwen3-VL: the images fill the vision slots of the
prompt template) -> VAE-encode the condition images (RGBA, 16x, 64 channels) and draw the target's noise ->
denoise (Euler on the schedule the model ships, `schedule.py`; optional true CFG with a negative prompt) ->
decode (RGBA).

The DiT reads one sequence: the prompt's tokens, in which every vision slot of a condition image stands for 2x2
of that image's latent tokens, then the target image. Attention is block-causal and the prompt and condition
tokens are modulated as at t = 0, so they do not change from step to step: the first step stores their keys and
values (`PrefixCache`) and later steps compute only the target's tokens (`use_kv_cache`, on by default, as in
diffusers' `QwenImage21Pipeline`).

Condition images (`edit_image`, one or a list, read in the order given) are converted to RGBA and resized
(Lanczos) to about `output_resolution`^2 pixels with their aspect ratio, sides multiples of 32; the vision tower
sees them composited over white, the VAE all four channels. Without `height` / `width` the output takes the
last condition image's size, else `output_resolution` square.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.inpaint import check_blur, inpaint_velocity, mask_grid
from diffsynth.runtime.media import area_size, load_image, pil_to_tensor, tensor_to_output
from diffsynth.runtime.pipeline import BasePipeline, finite_number
from diffsynth.runtime.schedulers import FlowMatchScheduler
from diffsynth.runtime.schedulers.flow_match import _check_sigmas as check_sigmas
from diffsynth.runtime.vram import module_dtype

from .dit import PrefixCache
from .presets import SCHEDULE_FILES
from .schedule import ScheduleSettings
from .text_encoder import encode_prompts21, load_processor

logger = logging.getLogger(__name__)

COMPRESSION = 16  # VAE 16x, DiT patch 1
SLOT_SIZE = 2  # one vision slot covers 2x2 latent tokens (32x32 pixels)
DEFAULT_RESOLUTION = 1024


def latents_to_tokens(latents: torch.Tensor) -> torch.Tensor:
    """`[B, C, h, w]` -> `[B, h * w, C]`, row-major."""
    return latents.flatten(2).transpose(1, 2)


def tokens_to_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of `latents_to_tokens` for an `height` x `width` latent grid."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], height, width)


class PromptEncoding:
    """One prompt batch as the DiT reads it: embeddings `[B, L, D]`, the text mask `[B, L]` (None when nothing is
    padded), the vision-slot positions `[L]` (the template puts the images before the prompt's words, so every
    prompt of a batch has them at the same places) and the DiT's prefix cache for this prompt."""

    def __init__(self, embeds: torch.Tensor, mask: torch.Tensor | None, slots: torch.Tensor, cache):
        self.embeds, self.mask, self.slots, self.cache = embeds, mask, slots, cache


def qwen_image21_velocity(
    dit,
    latents: torch.Tensor,
    sigma: torch.Tensor,
    prompt: PromptEncoding,
    img_shapes: Sequence[tuple[int, int, int]],
    condition_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Flow velocity `[B, h * w, 64]` (float32) of the target tokens `latents` `[B, h * w, 64]` at `sigma` [B].

    `condition_tokens` `[1 or B, N, 64]` (the condition images' latent tokens, in order) lead the sequence;
    `img_shapes` lists every image's `(1, h, w)`, the target last. Computation runs in the DiT's dtype.
    """
    dtype = module_dtype(dit)
    b = latents.shape[0]
    x = latents.to(dtype)
    if condition_tokens is not None:
        x = torch.cat([condition_tokens.to(dtype).expand(b, -1, -1), x], dim=1)
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=latents.device).reshape(-1).expand(b)
    out = dit(
        x,
        sigma,
        prompt.embeds.to(dtype),
        img_shapes=list(img_shapes),
        image_slots=prompt.slots,
        text_mask=prompt.mask,
        cache=prompt.cache,
    )
    return out.float()


class QwenImage21Pipeline(BasePipeline):
    """Qwen-Image 2.1 text-to-image / editing, with DiffSynth-Studio's argument names where they exist."""

    family = "qwen_image21"
    model_slots = {"dit": "dit", "vae": "vae", "text_encoder": "text_encoder"}
    slot_specs = {"dit": ("qwen_image21_dit",), "vae": ("qwen_image21_vae",), "text_encoder": ("qwen3vl",)}
    size_multiple = COMPRESSION * SLOT_SIZE

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.processor = None  # Qwen3-VL processor: the tokenizer and the vision tower's image preprocessing
        self.schedule = ScheduleSettings()  # replaced by the model's own when its processor is loaded

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] = "",
        cfg_scale: float | None = None,
        edit_image=None,
        height: int | None = None,
        width: int | None = None,
        output_resolution: int | None = None,
        seed: int | None = None,
        rand_device: str = "cpu",
        num_inference_steps: int | None = None,
        sigmas: Sequence[float] | torch.Tensor | None = None,
        latents: torch.Tensor | None = None,
        input_image=None,
        denoising_strength: float = 1.0,
        inpaint_mask=None,
        inpaint_blur_size: int | None = None,
        inpaint_blur_sigma: float | None = None,
        use_kv_cache: bool = True,
        tiled: bool = False,
        tile_size: int | None = None,
        tile_stride: int | None = None,
        output_type: str = "pil",
        progress_bar: bool = True,
    ):
        """Generate RGBA images: a PIL image for one prompt, a list for a list of prompts; "np"/"pt" give the batch.

        `edit_image`: condition images (one, or a list used in that order) shared by every prompt.
        `cfg_scale` > 1 adds true classifier-free guidance with `negative_prompt` (the model is meant to be
        sampled without: 1 by default). `num_inference_steps` defaults to the model's (its `sample_sigmas`, else
        40); `sigmas` is an explicit schedule used as given (terminal 0 appended). `latents` is the initial noise
        `[B, 64, H/16, W/16]`. `use_kv_cache=False` recomputes the prompt and condition tokens every step (the
        same result up to rounding). `tiled` encodes and decodes with the VAE in tiles.

        Image-to-image (DiffSynth-Studio's arguments): `input_image` (one image for every prompt, or one per prompt;
        RGBA kept, resized to the output size, which it sets when no `height` / `width` or condition image does) is
        VAE-encoded and noised to the schedule's level at `denoising_strength` (1 = from pure noise; fewer steps run
        below 1). `inpaint_mask` (a PIL "L" image of the input image's size, or one per input image; white =
        repaint) keeps the rest of the input image at every step (`diffsynth.runtime.inpaint`);
        `inpaint_blur_size` with `inpaint_blur_sigma` blur it on the latent grid.
        """
        prompts, negatives = self.check_prompt_pair(prompt, negative_prompt)
        cfg_scale = finite_number(self.setting("cfg_scale", cfg_scale, 1.0), "cfg_scale")  # NaN would turn CFG off
        output_resolution = self.setting("output_resolution", output_resolution, DEFAULT_RESOLUTION)
        if isinstance(output_resolution, bool) or not isinstance(output_resolution, int) or output_resolution < 32:
            raise ConfigError(f"output_resolution={output_resolution!r} is not accepted; use an integer >= 32")
        if output_type not in ("pil", "np", "pt"):
            raise ConfigError(f"output_type={output_type!r} is not accepted; use 'pil', 'np' or 'pt'")
        conditions = self.condition_images(edit_image, output_resolution)
        inputs = self.input_images(input_image, len(prompts))
        if conditions:
            default_w, default_h = conditions[-1].size
        elif inputs:
            default_w, default_h = self.fitted_size(inputs[0], output_resolution, "input_image")
        else:
            default_w = default_h = output_resolution
        height, width = self.check_size(
            self.setting("height", height, default_h), self.setting("width", width, default_w)
        )
        if not isinstance(use_kv_cache, bool):  # "no" would be true
            raise ConfigError(f"use_kv_cache={use_kv_cache!r} is not accepted; use True or False")
        use_cfg = cfg_scale > 1.0  # as the authors (diffusers: true_cfg_scale > 1); at or below 1, no CFG
        tiles = self.vae_tiling(tiled, tile_size, tile_stride)
        strength = self.check_strength(denoising_strength, inputs)
        sigmas = None if sigmas is None else check_sigmas(sigmas)  # before the encoders run
        blur = check_blur(inpaint_blur_size, inpaint_blur_sigma)
        repaint = self.inpaint_tokens(inpaint_mask, inputs, len(prompts), height, width, blur)

        # 1. prompts, read together with the condition images
        self.load_models_to_device(["text_encoder"])
        cache = use_kv_cache and self.dit.config.causal_condition
        text = self.encode_prompt(prompts, conditions, cache)
        negative_text = self.encode_prompt(negatives, conditions, cache) if use_cfg else None

        # 2. condition latents, noise and schedule
        self.load_models_to_device(["vae"] if conditions or inputs else [])
        condition_tokens, shapes = self.encode_conditions(conditions, tiles)
        clean = self.encode_input_images(inputs, len(prompts), height, width, tiles) if inputs else None
        self.check_slots(text, shapes)
        h, w = height // COMPRESSION, width // COMPRESSION
        img_shapes = [*shapes, (1, h, w)]
        shape = (len(prompts), self.dit.config.in_channels, h, w)
        noise = (
            self.check_latents(latents, shape) if latents is not None else self.generate_noise(shape, seed, rand_device)
        )
        x = latents_to_tokens(noise)
        scheduler = self.scheduler(num_inference_steps, sigmas, h * w, strength)
        if clean is not None:
            x = scheduler.add_noise(clean, x, scheduler.sigmas[0])

        # 3. denoise
        self.load_models_to_device(["dit"])
        for i in self.progress(range(len(scheduler.timesteps)), progress_bar):
            sigma = scheduler.sigmas[i]
            velocity = qwen_image21_velocity(self.dit, x, sigma, text, img_shapes, condition_tokens)
            if negative_text is not None:
                negative = qwen_image21_velocity(self.dit, x, sigma, negative_text, img_shapes, condition_tokens)
                velocity = self.guide(velocity, negative, cfg_scale)
            if repaint is not None:
                velocity = inpaint_velocity(velocity, x, clean, sigma, repaint)
            x = scheduler.step(velocity, i, x)

        # 4. decode
        self.load_models_to_device(["vae"])
        images = self.vae.decode(tokens_to_latents(x, h, w).to(module_dtype(self.vae)), **tiles)
        self.load_models_to_device([])
        out = tensor_to_output(images.float(), output_type)
        return out[0] if isinstance(prompt, str) and output_type == "pil" else out

    # ------------------------------------------------------------------ loading
    def _load_tokenizer(self, config: ModelConfig):
        """The Qwen3-VL processor from `processor/`; the schedule files beside it are read (fetched from a hub
        repo) into `self.schedule`."""
        paths = config.resolve()
        folder = Path(paths[0]) if Path(paths[0]).is_dir() else Path(paths[0]).parent
        self.processor = load_processor(folder)
        if config.model_id is not None and config.path is None:
            fetch_schedule_files(config)
        self.schedule = ScheduleSettings.from_folder(folder.parent)
        return self.processor.tokenizer

    # ------------------------------------------------------------------ stages
    def condition_images(self, edit_image, resolution: int) -> list[Image.Image]:
        """The condition images as RGBA, resized (Lanczos) to about `resolution`^2 pixels, sides multiples of 32."""
        if edit_image is None:
            return []
        items = list(edit_image) if isinstance(edit_image, (list, tuple)) else [edit_image]
        if not items:
            raise ConfigError("edit_image is an empty list; pass None for text-to-image")
        images = []
        for i, item in enumerate(items):
            if isinstance(item, (list, tuple)):
                raise ConfigError(
                    f"edit_image[{i}] is a list: edit_image is one flat list of condition images shared by every "
                    "prompt; call the pipeline once per prompt for different images"
                )
            image = load_image(item, "RGBA")
            images.append(image.resize(self.fitted_size(image, resolution, f"edit_image[{i}]"), Image.LANCZOS))
        return images

    def encode_prompt(self, prompts: list[str], images: list[Image.Image], cache: bool = False) -> PromptEncoding:
        """Prompt embeddings with the vision slots of `images`, and a fresh prefix cache when `cache`."""
        if self.processor is None:
            raise ConfigError(
                "QwenImage21Pipeline has no processor: pass tokenizer_config=ModelConfig(..., "
                "origin_file_pattern='processor/')"
            )
        embeds, mask, slots = encode_prompts21(self.text_encoder, self.processor, prompts, images or None)
        context = self.dit.config.context_in_dim if self.dit is not None else embeds.shape[-1]
        if embeds.shape[-1] != context:
            raise ConfigError(
                f"the text encoder gives {embeds.shape[-1]} features per token but this DiT takes {context}: "
                "the text encoder and the DiT come from different models"
            )
        if slots.dim() == 2 and bool((slots == slots[:1]).all()):  # the images lead the prompt: always shared
            slots = slots[0]
        device = self.device
        mask = None if mask is None else mask.to(device)
        return PromptEncoding(embeds.to(device), mask, slots.to(device), PrefixCache() if cache else None)

    def check_slots(self, text: PromptEncoding, shapes: list[tuple[int, int, int]]) -> None:
        """The vision tower must have given each condition image one slot per 2x2 of its latent tokens: a
        processor whose pixel limits resized an image differently breaks that, named here rather than in the DiT."""
        slots = int(text.slots.sum())
        tokens = sum(h * w for _, h, w in shapes)
        if slots * SLOT_SIZE * SLOT_SIZE != tokens:
            pixels = [(w * COMPRESSION, h * COMPRESSION) for _, h, w in shapes]
            raise ConfigError(
                f"the processor gave the condition images {slots} vision slots, but at {pixels} pixels they need "
                f"{tokens // (SLOT_SIZE * SLOT_SIZE)}: its image preprocessing (min_pixels / max_pixels in "
                "processor/preprocessor_config.json) resizes them; lower output_resolution or use the model's processor"
            )

    def encode_conditions(self, images: list[Image.Image], tiles: dict):
        """Every condition image VAE-encoded alone (posterior mean, normalised): tokens `[1, N, 64]` side by
        side, and each image's `(1, h, w)`. `(None, [])` without images."""
        if not images:
            return None, []
        tokens, shapes = [], []
        for image in images:
            pixels = pil_to_tensor(image, dtype=module_dtype(self.vae), device=self.device, mode="RGBA")
            z = self.vae.encode(pixels, **tiles).float()
            tokens.append(latents_to_tokens(z))
            shapes.append((1, z.shape[2], z.shape[3]))
        return torch.cat(tokens, dim=1), shapes

    def scheduler(
        self, num_inference_steps: int | None, sigmas, image_seq_len: int, strength: float = 1.0
    ) -> FlowMatchScheduler:
        """Euler steps on the model's schedule (`self.schedule`), or on explicit `sigmas`; image-to-image keeps the
        tail from the level at `strength` (`apply_strength`)."""
        scheduler = FlowMatchScheduler("qwen_image")
        if sigmas is not None:
            values = check_sigmas(sigmas)  # ends with 0
            steps = len(values) - 1
            scheduler.set_timesteps(steps, sigmas=values, denoising_strength=strength)
            return scheduler
        requested = self.setting("num_inference_steps", num_inference_steps, None)
        settings = self.schedule
        if settings.sample_sigmas is not None and requested is not None and requested != len(settings.sample_sigmas):
            logger.warning(
                "num_inference_steps=%s replaces the model's %d tuned noise levels (sample_sigmas) with an evenly "
                "spaced grid",
                requested,
                len(settings.sample_sigmas),
            )
            settings = ScheduleSettings(**{**vars(settings), "sample_sigmas": None})
        steps = settings.steps(requested)
        scheduler.set_timesteps(steps, sigmas=settings.sigmas(steps, image_seq_len), denoising_strength=strength)
        return scheduler

    def input_images(self, input_image, batch: int) -> list[Image.Image]:
        """Image-to-image's images as RGBA: one for every prompt, or one per prompt."""
        if input_image is None:
            return []
        items = list(input_image) if isinstance(input_image, (list, tuple)) else [input_image]
        if len(items) not in (1, batch):
            raise ConfigError(f"input_image is a list of {len(items)} images for {batch} prompts; give one or {batch}")
        return [load_image(item, "RGBA") for item in items]

    def fitted_size(self, image: Image.Image, resolution: int, name: str) -> tuple[int, int]:
        """`(width, height)` of about `resolution`^2 pixels with `image`'s aspect ratio, sides multiples of 32."""
        size = area_size(image.width, image.height, resolution * resolution)
        if min(size) < self.size_multiple:
            raise ConfigError(
                f"{name} is {image.width}x{image.height}: too elongated for {resolution}^2 pixels "
                f"(it would be {size[0]}x{size[1]})"
            )
        return size

    @staticmethod
    def check_strength(denoising_strength, inputs) -> float:
        """`denoising_strength` in (0, 1], below 1 only with an input image."""
        if isinstance(denoising_strength, bool) or not isinstance(denoising_strength, (int, float)):
            raise ConfigError(f"denoising_strength={denoising_strength!r} is not accepted; use a number in (0, 1]")
        if not 0.0 < denoising_strength <= 1.0:
            raise ConfigError(f"denoising_strength={denoising_strength!r} is not accepted; use a number in (0, 1]")
        if denoising_strength != 1.0 and not inputs:
            raise ConfigError("denoising_strength < 1 is image-to-image: give input_image")
        return float(denoising_strength) if inputs else 1.0

    def inpaint_tokens(self, inpaint_mask, inputs, batch: int, height: int, width: int, blur) -> torch.Tensor | None:
        """`inpaint_mask` on the token grid `[B or 1, h * w, 1]` (1 = repaint), blurred there with `blur`."""
        if inpaint_mask is None:
            if blur is not None:
                raise ConfigError("inpaint_blur_size / inpaint_blur_sigma blur inpaint_mask: give the mask too")
            return None
        if not inputs:
            raise ConfigError("inpaint_mask needs input_image: the mask says which part of input_image to repaint")
        grid = (height // COMPRESSION, width // COMPRESSION)
        return latents_to_tokens(mask_grid(inpaint_mask, inputs, batch, grid, self.device, blur))

    def encode_input_images(self, images, batch: int, height: int, width: int, tiles: dict) -> torch.Tensor:
        """Normalised latent tokens `[B, h * w, 64]` of the input images (RGBA), resized to `width` x `height`."""
        resized = [image.resize((width, height), Image.LANCZOS) for image in images]
        pixels = pil_to_tensor(resized, dtype=module_dtype(self.vae), device=self.device, mode="RGBA")
        tokens = latents_to_tokens(self.vae.encode(pixels, **tiles).float())
        return tokens.expand(batch, -1, -1) if tokens.shape[0] == 1 else tokens

    def vae_tiling(self, tiled: bool, tile_size, tile_stride) -> dict:
        """The VAE's tiling arguments (its own tile defaults unless given)."""
        if not isinstance(tiled, bool):
            raise ConfigError(f"tiled={tiled!r} is not accepted; use True or False")
        tiles: dict = {"tiled": tiled}
        if tile_size is not None:
            tiles["tile_size"] = tile_size
        if tile_stride is not None:
            tiles["tile_stride"] = tile_stride
        return tiles


def fetch_schedule_files(config: ModelConfig) -> None:
    """Fetch the schedule's files from the processor's hub repo (they are optional: defaults apply without)."""
    for pattern in SCHEDULE_FILES:
        companion = ModelConfig(
            model_id=config.model_id,
            origin_file_pattern=pattern,
            download_source=config.download_source,
            local_model_path=config.local_model_path,
            skip_download=config.skip_download,
        )
        try:
            companion.resolve()
        except Exception as exc:  # a folder without them still samples, with a warning (ScheduleSettings)
            logger.info("no %s in %s (%s)", pattern, config.model_id, exc)
