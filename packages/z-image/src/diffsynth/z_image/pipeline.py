"""`ZImagePipeline`: text-to-image and image-to-image with Z-Image-Turbo and Z-Image.

Stages: encode prompts (Qwen3, second-to-last hidden states) -> prepare latents (seeded noise,
or the noised input image) -> denoise (Euler on the Z-Image sigma template, optional CFG batched
with the conditional pass) -> decode (AutoencoderKL). `z_image_velocity` is the per-step model
call; the trainer reuses it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.media import load_image, pil_to_tensor, tensor_to_output
from diffsynth.runtime.pipeline import BasePipeline
from diffsynth.runtime.schedulers import FlowMatchScheduler
from diffsynth.runtime.vram import module_dtype

from .text_encoder import encode_prompts

logger = logging.getLogger(__name__)


def z_image_velocity(dit, latents: torch.Tensor, sigma: torch.Tensor, text: list[torch.Tensor]) -> torch.Tensor:
    """Flow velocity (noise - clean) predicted by the Z-Image DiT at noise level `sigma` [B].

    The DiT was trained with the reversed time `1 - sigma` and predicts the opposite direction,
    as in the authors' code, hence both sign flips.
    """
    out = dit(latents.to(module_dtype(dit)), 1.0 - sigma.to(latents.device, torch.float32), text)
    return -out.float()


class ZImagePipeline(BasePipeline):
    """Z-Image text-to-image / image-to-image, API compatible with DiffSynth-Studio."""

    family = "z_image"
    model_slots = {"dit": "dit", "vae": "vae", "text_encoder": "text_encoder"}
    size_multiple = 16  # VAE 8x, patch 2

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] = "",
        cfg_scale: float | None = None,
        input_image=None,
        denoising_strength: float = 1.0,
        height: int | None = None,
        width: int | None = None,
        seed: int | None = None,
        rand_device: str = "cpu",
        num_inference_steps: int | None = None,
        sigma_shift: float | None = None,
        sigmas: Sequence[float] | torch.Tensor | None = None,
        latents: torch.Tensor | None = None,
        cfg_normalization: float = 0.0,
        cfg_truncation: float = 1.0,
        max_sequence_length: int = 512,
        tiled: bool = False,
        tile_size: int = 512,
        tile_stride: int = 384,
        output_type: str = "pil",
        progress_bar: bool = True,
    ):
        """Generate images: a PIL image for one prompt, a list for a list of prompts; "np"/"pt" give the batch.

        `cfg_scale` > 1 enables classifier-free guidance with `negative_prompt` (1 = off);
        `cfg_truncation` turns guidance off once the normalised time `1 - sigma` exceeds it;
        `cfg_normalization` > 0 caps the guided prediction's norm at that multiple of the
        conditional one (both as in the authors' pipeline). `latents` is the initial noise in the
        unpacked layout `[B, 16, H/8, W/8]`; `sigmas` an explicit schedule (N values, the
        terminal 0 is appended).
        """
        prompts, negatives = self.check_prompt_pair(prompt, negative_prompt)
        cfg_scale = float(self.setting("cfg_scale", cfg_scale, 1.0))
        steps = int(self.setting("num_inference_steps", num_inference_steps, 9))
        shift = float(self.setting("sigma_shift", sigma_shift, 3.0))
        height, width = self.check_size(
            int(self.setting("height", height, 1024)), int(self.setting("width", width, 1024))
        )
        if output_type not in ("pil", "np", "pt"):
            raise ConfigError(f"output_type={output_type!r} is not accepted; use 'pil', 'np' or 'pt'")
        use_cfg = cfg_scale != 1.0

        # 1. prompts
        self.load_models_to_device(["text_encoder"])
        text = self.encode_prompt(prompts, max_sequence_length)
        negative_text = self.encode_prompt(negatives, max_sequence_length) if use_cfg else None

        # 2. schedule and latents
        scheduler = FlowMatchScheduler("z_image")
        scheduler.set_timesteps(
            steps, denoising_strength=denoising_strength if input_image is not None else 1.0, sigmas=sigmas, shift=shift
        )
        self.load_models_to_device(["vae"] if input_image is not None else [])
        x = self.prepare_latents(
            len(prompts),
            height,
            width,
            seed,
            rand_device,
            latents,
            input_image,
            scheduler,
            tiled,
            tile_size,
            tile_stride,
        )

        # 3. denoise
        self.load_models_to_device(["dit"])
        for i in self.progress(range(len(scheduler.timesteps)), progress_bar):
            sigma = scheduler.sigmas[i]
            guided = use_cfg and (1.0 - float(sigma)) <= cfg_truncation
            velocity = self.predict(x, sigma, text, negative_text if guided else None, cfg_scale, cfg_normalization)
            x = scheduler.step(velocity, i, x)

        # 4. decode
        self.load_models_to_device(["vae"])
        images = self.vae.decode(
            x.to(module_dtype(self.vae)), tiled=tiled, tile_size=tile_size, tile_stride=tile_stride
        )
        self.load_models_to_device([])
        out = tensor_to_output(images.float(), output_type)
        return out[0] if isinstance(prompt, str) and output_type == "pil" else out

    # ------------------------------------------------------------------ checks
    def check_size(self, height: int, width: int) -> tuple[int, int]:
        """The base rounding, then the DiT's RoPE range: it places at most `axes_lens` rows and columns of patches."""
        height, width = super().check_size(height, width)
        config = self.dit.config
        cell = 8 * config.patch_size
        for name, value, rows in (("height", height, config.axes_lens[1]), ("width", width, config.axes_lens[2])):
            if value // cell > rows:
                raise ConfigError(f"{name}={value} is more than this DiT can place: at most {rows * cell} pixels")
        return height, width

    # ------------------------------------------------------------------ stages
    def encode_prompt(self, prompts: list[str], max_sequence_length: int = 512) -> list[torch.Tensor]:
        if self.tokenizer is None:
            raise ConfigError("ZImagePipeline has no tokenizer: pass tokenizer_config=ModelConfig(..., 'tokenizer/')")
        embeds = encode_prompts(
            self.text_encoder, self.tokenizer, prompts, max_length=max_sequence_length, device=self.device
        )
        return [e.to(self.device) for e in embeds]

    def prepare_latents(
        self, batch, height, width, seed, rand_device, latents, input_image, scheduler, tiled, tile_size, tile_stride
    ) -> torch.Tensor:
        shape = (batch, self.dit.config.in_channels, height // 8, width // 8)
        noise = (
            self.check_latents(latents, shape) if latents is not None else self.generate_noise(shape, seed, rand_device)
        )
        if input_image is None:
            return noise
        images = input_image if isinstance(input_image, (list, tuple)) else [input_image]
        images = [load_image(im).resize((width, height)) for im in images]
        pixels = pil_to_tensor(images, dtype=module_dtype(self.vae), device=self.device)
        clean = self.vae.encode(pixels, tiled=tiled, tile_size=tile_size, tile_stride=tile_stride).float()
        if clean.shape[0] == 1 and batch > 1:
            clean = clean.expand(batch, -1, -1, -1)
        return scheduler.add_noise(clean, noise, scheduler.sigmas[0])

    def predict(self, x, sigma, text, negative_text, cfg_scale, cfg_normalization) -> torch.Tensor:
        """One denoiser evaluation; with guidance the two branches run as one batch."""
        batch = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        if negative_text is None:
            return z_image_velocity(self.dit, x, sigma.expand(batch), text)
        both = z_image_velocity(self.dit, torch.cat([x, x]), sigma.expand(2 * batch), text + negative_text)
        positive, negative = both[:batch], both[batch:]
        guided = self.guide(positive, negative, cfg_scale)
        if cfg_normalization > 0:
            dims = tuple(range(1, guided.dim()))
            limit = positive.flatten(1).norm(dim=1) * cfg_normalization
            norm = guided.flatten(1).norm(dim=1)
            factor = torch.where(norm > limit, limit / norm, torch.ones_like(norm))
            guided = guided * factor.view(-1, *([1] * len(dims)))
        return guided
