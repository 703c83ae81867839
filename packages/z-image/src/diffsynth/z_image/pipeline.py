"""`ZImagePipeline`: text-to-image and image-to-image with Z-Image-Turbo and Z-Image.

Stages: encode prompts (Qwen3, second-to-last hidden states) -> prepare latents (seeded noise,
or the noised input image) -> denoise (Euler on the Z-Image sigma template, optional CFG batched
with the conditional pass) -> decode (AutoencoderKL). `z_image_velocity` is the per-step model
call; the trainer reuses it.

Fun ControlNets (PAI Z-Image-Turbo-Fun-Controlnet-Union 1.0 / 2.0 / 2.1) are loaded with
`from_pretrained(..., controlnet=...)`, `load_controlnet(...)` or listed among `model_configs`, and used
through `controlnet_inputs=[ControlNetInput(...)]`: each input's condition is VAE-encoded once
(`encode_control`) and the DiT adds the net's hints, times the input's scale, on the steps where it acts.

Z-Image Omni (a DiT with `siglip_feat_dim`, e.g. Tongyi-MAI/Z-Image-Omni-Base) generates from text alone or edits:
`edit_image=` (one image or a list) are prepared as diffusers' `ZImageOmniPipeline` prepares them (over
1024x1024 pixels scaled to that area or to height*width, center-cropped to multiples of 16), encoded by the VAE
and by the SigLIP2 image encoder (`image_encoder` slot), and join the prompt's segments in the DiT's joint
sequence (`omni.py`). The Fun ControlNets are refused with an Omni DiT (`check_no_omni_controlnet`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from diffsynth.runtime.controlnet import ControlNetInput, acts_at, checked_inputs, model_source
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.lora import clear_loras, set_lora_scale
from diffsynth.runtime.media import eight_bit, load_image, load_images, pil_to_tensor, tensor_to_output
from diffsynth.runtime.parallel import describe_parallel
from diffsynth.runtime.pipeline import BasePipeline, finite_number
from diffsynth.runtime.schedulers import make_scheduler
from diffsynth.runtime.schedulers.templates import check_steps
from diffsynth.runtime.vram import module_dtype

from .controlnet import ZImageControl, ZImageControlNet
from .presets import CONTROLNET_FILES
from .text_encoder import check_max_length, encode_omni_prompts, encode_prompts

logger = logging.getLogger(__name__)

POSITIVE_LORA = "positive_only_lora"  # the name `positive_only_lora` is attached under for one call
NEGATIVE_LORA = "negative_only_lora"  # and `negative_lora`


@contextlib.contextmanager
def lora_scales(model, scales: dict):
    """The named unfused LoRAs of `model` at the given scales (None names are skipped), then back at 1."""
    names = [name for name in scales if name is not None]
    for name in names:
        set_lora_scale(model, name, scales[name])
    try:
        yield
    finally:
        for name in names:
            set_lora_scale(model, name, 1.0)


def z_image_velocity(
    dit, latents: torch.Tensor, sigma: torch.Tensor, text: list[torch.Tensor], controls: Sequence[ZImageControl] = ()
) -> torch.Tensor:
    """Flow velocity (noise - clean) predicted by the Z-Image DiT at noise level `sigma` [B].

    The DiT was trained with the reversed time `1 - sigma` and predicts the opposite direction,
    as in the authors' code, hence both sign flips. `controls` add ControlNet hints.
    """
    args = (latents.to(module_dtype(dit)), 1.0 - sigma.to(latents.device, torch.float32), text)
    out = dit(*args, controls) if controls else dit(*args)
    return -out.float()


def z_image_omni_velocity(
    dit,
    latents: torch.Tensor,
    sigma: torch.Tensor,
    text: list[list[torch.Tensor]],
    images: list[list[torch.Tensor]],
    siglip: list[list[torch.Tensor] | None],
) -> torch.Tensor:
    """`z_image_velocity` for Z-Image Omni: per sample, caption segments, clean condition latents and their
    SigLIP grids (see `ZImageDiT.forward_omni`). The time `1 - sigma` is rounded as the reference computes it
    from its timestep table, `(1000 - 1000 sigma) / 1000` in float32."""
    t = (1000.0 - sigma.to(latents.device, torch.float32) * 1000.0) / 1000.0
    return -dit(latents.to(module_dtype(dit)), t, text, images=images, siglip=siglip).float()


@dataclass
class EditCondition:
    """Z-Image Omni's condition images, ready for the DiT: VAE latents `[C, H/8, W/8]` and SigLIP grids
    `[rows, cols, width]` (None without images), shared by every sample and both CFG branches."""

    latents: list[torch.Tensor]
    siglip: list[torch.Tensor] | None


@dataclass
class ControlCondition:
    """A `ControlNetInput` ready for the denoiser: the net, its condition latents and scale, and the
    fractions of the steps where it acts."""

    control: ZImageControl
    start: float = 0.0
    end: float = 1.0

    def active(self, step: int, steps: int) -> bool:
        return acts_at(self.start, self.end, step, steps)


class ZImagePipeline(BasePipeline):
    """Z-Image text-to-image / image-to-image (and Fun ControlNets), API compatible with DiffSynth-Studio."""

    family = "z_image"
    model_slots = {
        "dit": "dit",
        "vae": "vae",
        "text_encoder": "text_encoder",
        "controlnet": "controlnet",
        "image_encoder": "image_encoder",  # Z-Image Omni's SigLIP2 tower, read for `edit_image`
    }
    optional_slots = ("controlnet", "image_encoder")
    slot_specs = {"dit": ("z_image_dit",), "vae": ("autoencoder_kl",), "text_encoder": ("qwen3",)}
    size_multiple = 16  # VAE 8x, patch 2

    # ------------------------------------------------------------------ loading (ControlNets: `BasePipeline`)
    def controlnet_spec(self):
        """Z-Image Fun ControlNets: a `ModelConfig`, a local file, or one of the known hub repos
        (`CONTROLNET_FILES`, e.g. "PAI/Z-Image-Turbo-Fun-Controlnet-Union-2.1": its 8-step Union file)."""
        from .formats import CONTROLNET_SPEC

        return CONTROLNET_SPEC

    @staticmethod
    def controlnet_source(item) -> ModelConfig:
        hint = f"a known ControlNet repo ({sorted(CONTROLNET_FILES)}; pass a ModelConfig for another file)"
        return model_source(item, "controlnet", CONTROLNET_FILES.get, hint)

    def describe_controlnet(self, net: ZImageControlNet) -> str:
        cfg = net.config
        return (
            f"{len(cfg.control_layers_places)} control layers after DiT layers {list(cfg.control_layers_places)}, "
            f"{cfg.control_in_dim} condition channels, refiner {cfg.add_control_noise_refiner}"
        )

    def controlnets_changed(self) -> None:
        self.check_controlnets()

    def check_controlnets(self) -> None:
        """Every loaded ControlNet fits the DiT: widths, layer places, and its condition channels (the
        latents' C for Union 1.0; C + 1 + C, control + mask + masked image, for the 2.x nets)."""
        if self.dit is None:
            return
        self.check_no_omni_controlnet(bool(self.controlnets()), "a loaded ControlNet")
        channels = self.dit.config.in_channels
        for i, net in enumerate(self.controlnets()):
            try:
                net.check_fits(self.dit.config)
            except ValueError as exc:
                raise ConfigError(f"ControlNet {i} does not fit this Z-Image DiT: {exc}") from None
            want = 2 * channels + 1 if net.takes_inpaint else channels
            if net.config.control_in_dim != want:
                raise ConfigError(
                    f"ControlNet {i} takes {net.config.control_in_dim} condition channels; with {channels}-channel "
                    f"latents it should take {want}"
                )

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
        sampler: str | None = None,
        latents: torch.Tensor | None = None,
        cfg_normalization: float = 0.0,
        cfg_truncation: float = 1.0,
        max_sequence_length: int = 512,
        controlnet_inputs: Sequence[ControlNetInput] | None = None,
        edit_image=None,
        edit_image_auto_resize: bool | None = None,
        positive_only_lora=None,
        lora=None,
        negative_lora=None,
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
        terminal 0 is appended); `sampler` "euler" (default) or "unipc" (`diffsynth.runtime.schedulers.UniPCScheduler`:
        fewer steps for the same accuracy). `controlnet_inputs` are `ControlNetInput`s for the loaded Fun
        ControlNets (several at once; see the README for the fields each net reads). With `input_image`
        (image-to-image, one image or one per prompt) and without `height`/`width`, the output takes the first
        image's size, rounded to a multiple of 16 (as diffusers' ZImageImg2ImgPipeline), not the preset's default.

        `edit_image` (Z-Image Omni only: one image or a list, PIL images or paths) are the images to edit or
        combine; without `height`/`width` the output takes the last one's (cropped) size. An image over
        1024x1024 pixels is first scaled to that area, or to `height * width` pixels when both are given (which can
        scale it up), unless `edit_image_auto_resize=False` (DiffSynth-Studio's argument; True by default).

        `positive_only_lora` (DiffSynth-Studio's; a LoRA file, state dict or `LoRAWeights`, e.g. what
        `ZImageI2LPipeline.image_to_lora` makes) acts on the conditional branch of guidance only, for this call;
        DiffSynth-Studio's `lora` is the same, and its `negative_lora` acts on the unconditional branch only.
        """
        if lora is not None:
            if positive_only_lora is not None:
                raise ConfigError("give positive_only_lora or DiffSynth-Studio's lora (the same thing), not both")
            positive_only_lora = lora
        prompts, negatives = self.check_prompt_pair(prompt, negative_prompt)
        self.check_no_omni_controlnet(bool(controlnet_inputs), "controlnet_inputs")
        edits = self.check_edit_images(edit_image)
        checked = self.check_control_inputs(controlnet_inputs)
        cfg_scale = finite_number(self.setting("cfg_scale", cfg_scale, 1.0), "cfg_scale")
        cfg_normalization = finite_number(cfg_normalization, "cfg_normalization")
        cfg_truncation = finite_number(cfg_truncation, "cfg_truncation")
        check_max_length(max_sequence_length, "max_sequence_length")  # refused before any model runs
        if input_image is None and denoising_strength != 1.0:
            raise ConfigError(
                f"denoising_strength={denoising_strength!r} is how far image-to-image moves from input_image: give "
                "input_image, or leave denoising_strength at 1"
            )
        if isinstance(input_image, (list, tuple)) and len(input_image) not in (1, len(prompts)):
            raise ConfigError(
                f"input_image has {len(input_image)} images for {len(prompts)} prompts: give 1 or one per prompt"
            )
        starts = load_images(input_image, "input_image")
        steps = check_steps(self.setting("num_inference_steps", num_inference_steps, 9))
        shift = finite_number(self.setting("sigma_shift", sigma_shift, 3.0), "sigma_shift")
        auto_resize = self.setting("edit_image_auto_resize", edit_image_auto_resize, True)
        if not isinstance(auto_resize, bool):
            raise ConfigError(f"edit_image_auto_resize={auto_resize!r} must be True or False")
        edits, edit_size = self.prepare_edit_images(edits, height, width, auto_resize)
        if edit_size is not None:  # as diffusers' Omni pipeline: the output defaults to the last image's size
            height, width = height or edit_size[0], width or edit_size[1]
        height, width = self.output_size(height, width, starts)
        if output_type not in ("pil", "np", "pt"):
            raise ConfigError(f"output_type={output_type!r} is not accepted; use 'pil', 'np' or 'pt'")
        use_cfg = cfg_scale != 1.0
        if self.dit is not None and self.dit.config.omni:
            self.check_omni_call()

        # 1. prompts
        self.load_models_to_device(["text_encoder"])
        omni = self.dit.config.omni
        if omni:  # the Omni template, split around the images (also without images)
            text = self.encode_omni_prompt(prompts, len(edits), max_sequence_length)
            negative_text = self.encode_omni_prompt(negatives, len(edits), max_sequence_length) if use_cfg else None
        else:
            text = self.encode_prompt(prompts, max_sequence_length)
            negative_text = self.encode_prompt(negatives, max_sequence_length) if use_cfg else None

        # 2. schedule and latents
        scheduler = make_scheduler("z_image", str(self.setting("sampler", sampler, "euler")))
        scheduler.set_timesteps(
            steps, denoising_strength=denoising_strength if input_image is not None else 1.0, sigmas=sigmas, shift=shift
        )
        self.load_models_to_device(["vae"] if input_image is not None or checked else [])
        x = self.prepare_latents(
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
        controls = [
            self.encode_control(item, net, height, width, tiled, tile_size, tile_stride, f"controlnet_inputs[{i}]")
            for i, (item, net) in enumerate(checked)
        ]
        condition = None
        if omni:
            self.load_models_to_device(["vae", "image_encoder"] if edits else [])
            condition = self.encode_edit_images(edits, tiled, tile_size, tile_stride)

        # 3. denoise
        self.load_models_to_device(["dit", "controlnet"] if controls else ["dit"])
        steps = len(scheduler.timesteps)
        branch_loras = {}  # the LoRAs of one branch of guidance, for this call (attached apart, removed after)
        try:
            for name, source in ((POSITIVE_LORA, positive_only_lora), (NEGATIVE_LORA, negative_lora)):
                if source is not None:
                    branch_loras[name] = self.load_lora(source, fuse=False, name=name)
            for i in self.progress(range(steps), progress_bar):
                sigma = scheduler.sigmas[i]
                guided = use_cfg and (1.0 - float(sigma)) <= cfg_truncation
                active = [c.control for c in controls if c.active(i, steps)]
                negative = negative_text if guided else None
                velocity = self.predict(
                    x, sigma, text, negative, cfg_scale, cfg_normalization, active, condition, branch_loras
                )
                x = scheduler.step(velocity, i, x)
        finally:
            for name in branch_loras.values():
                clear_loras(self.dit, name)

        # 4. decode
        self.load_models_to_device(["vae"])
        images = self.vae.decode(
            x.to(module_dtype(self.vae)), tiled=tiled, tile_size=tile_size, tile_stride=tile_stride
        )
        self.load_models_to_device([])
        out = tensor_to_output(images.float(), output_type)
        return out[0] if isinstance(prompt, str) and output_type == "pil" else out

    # ------------------------------------------------------------------ checks
    def read_lora(self, path, slot: str = "dit"):
        """The common LoRA layouts, and for the DiT also ComfyUI's NextDiT names (`layers.0.attention.qkv`,
        `x_embedder`, ...; `lora.convert_z_image_lora`: a fused `qkv` split exactly into q, k, v)."""
        lora = super().read_lora(path, slot)
        if slot != "dit":
            return lora
        from .lora import convert_z_image_lora

        return convert_z_image_lora(lora)

    def output_size(self, height: int | None, width: int | None, starts: list[Image.Image] | None) -> tuple[int, int]:
        """The checked `(height, width)`: the call's, else (as diffusers' ZImageImg2ImgPipeline) the first input
        image's, rounded to the size multiple as a given size is; else the preset's, else 1024."""
        if not starts or (height is not None and width is not None):
            return self.check_size(self.setting("height", height, 1024), self.setting("width", width, 1024))
        image_w, image_h = starts[0].size
        height, width = height if height is not None else image_h, width if width is not None else image_w
        try:
            return self.check_size(height, width)
        except ConfigError as exc:
            raise ConfigError(
                f"{exc} (the size of input_image, {image_w}x{image_h}; give height and width to generate at another "
                "size)"
            ) from None

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
        images = [image.resize((width, height), Image.LANCZOS) for image in input_image]  # as diffusers resizes
        pixels = pil_to_tensor(images, dtype=module_dtype(self.vae), device=self.device)
        clean = self.vae.encode(pixels, tiled=tiled, tile_size=tile_size, tile_stride=tile_stride).float()
        if clean.shape[0] == 1 and batch > 1:
            clean = clean.expand(batch, -1, -1, -1)
        return scheduler.add_noise(clean, noise, scheduler.sigmas[0])

    def predict(
        self,
        x,
        sigma,
        text,
        negative_text,
        cfg_scale,
        cfg_normalization,
        controls=(),
        condition=None,
        branch_loras=None,
    ) -> torch.Tensor:
        """One denoiser evaluation; with guidance the two branches run as one batch (both under the controls,
        as the authors' pipeline repeats the control condition for CFG; both with the Omni `condition`), or one
        after the other when `branch_loras` (`{POSITIVE_LORA: name, NEGATIVE_LORA: name}`, unfused) holds a LoRA
        of one branch: each runs with its own switched on and the other's off."""
        branch_loras = branch_loras or {}
        positive_lora, negative_lora = branch_loras.get(POSITIVE_LORA), branch_loras.get(NEGATIVE_LORA)
        batch = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)

        def velocity(latents, texts):
            n = latents.shape[0]
            if condition is None:
                return z_image_velocity(self.dit, latents, sigma.expand(n), texts, controls)
            images, grids = [condition.latents] * n, [condition.siglip] * n
            return z_image_omni_velocity(self.dit, latents, sigma.expand(n), texts, images, grids)

        if negative_text is None:
            with lora_scales(self.dit, {negative_lora: 0.0}):
                return velocity(x, text)
        if branch_loras:
            with lora_scales(self.dit, {negative_lora: 0.0}):
                positive = velocity(x, text)
            with lora_scales(self.dit, {positive_lora: 0.0}):
                negative = velocity(x, negative_text)
        else:
            both = velocity(torch.cat([x, x]), text + negative_text)
            positive, negative = both[:batch], both[batch:]
        guided = self.guide(positive, negative, cfg_scale)
        if cfg_normalization > 0:
            dims = tuple(range(1, guided.dim()))
            limit = positive.flatten(1).norm(dim=1) * cfg_normalization
            norm = guided.flatten(1).norm(dim=1)
            factor = torch.where(norm > limit, limit / norm, torch.ones_like(norm))
            guided = guided * factor.view(-1, *([1] * len(dims)))
        return guided

    # ------------------------------------------------------------------ Z-Image Omni
    def check_omni_call(self) -> None:
        """Omni calls run on one rank's whole sequence and batch, without step caches: refused before any model runs
        when the pipeline divides its DiT calls (`enable_parallel`) or caches steps."""
        if self.dit.parallel is not None:
            raise ConfigError(
                f"Z-Image Omni does not run under {describe_parallel(self.dit.parallel)}: its DiT calls are not "
                "divided over ranks; call pipe.disable_parallel() (leave out --sequence-parallel / --cfg-parallel) "
                "and run it in one process"
            )
        if self.dit.step_cache is not None:
            raise ConfigError(
                "Z-Image Omni runs without step caches: call pipe.disable_first_block_cache() / "
                "pipe.disable_tea_cache() (leave out --first-block-cache / --tea-cache)"
            )

    def encode_omni_prompt(self, prompts: list[str], n_images: int, max_sequence_length: int = 512):
        """Per prompt, the Omni template's segments (`omni_segments`) encoded one by one."""
        if self.tokenizer is None:
            raise ConfigError("ZImagePipeline has no tokenizer: pass tokenizer_config=ModelConfig(..., 'tokenizer/')")
        embeds = encode_omni_prompts(
            self.text_encoder, self.tokenizer, prompts, n_images, max_length=max_sequence_length, device=self.device
        )
        return [[e.to(self.device) for e in segments] for segments in embeds]

    def check_no_omni_controlnet(self, given: bool, what: str) -> None:
        """The Fun ControlNets were trained beside the plain Z-Image DiT: the Omni forward has no control hooks, so
        a net or its inputs with an Omni DiT would be encoded and then silently dropped. Refused instead."""
        if given and self.dit is not None and self.dit.config.omni:
            raise ConfigError(
                f"{what} with a Z-Image Omni DiT: the Fun ControlNets are not Omni nets and Omni calls take no "
                "control; use them with a plain Z-Image DiT (e.g. Tongyi-MAI/Z-Image-Turbo)"
            )

    def check_edit_images(self, edit_image) -> list:
        """`edit_image` as a list, refused where the loaded models cannot take it (before any model runs)."""
        if edit_image is None:
            return []
        images = list(edit_image) if isinstance(edit_image, (list, tuple)) else [edit_image]
        if not self.dit.config.omni:
            raise ConfigError(
                "edit_image needs a Z-Image Omni DiT (a transformer with SigLIP inputs, siglip_feat_dim in its "
                "config.json), e.g. ZImagePipeline.from_pretrained('Tongyi-MAI/Z-Image-Omni-Base'); this DiT has none"
            )
        if self.image_encoder is None:
            raise ConfigError(
                "edit_image needs the SigLIP2 image encoder of Z-Image Omni: add "
                "ModelConfig(model_id='Tongyi-MAI/Z-Image-Omni-Base', origin_file_pattern='siglip/model.safetensors')"
            )
        if not images:
            raise ConfigError("edit_image is an empty list; pass an image, a list of images, or None")
        return images

    def prepare_edit_images(self, images: list, height: int | None, width: int | None, auto_resize: bool = True):
        """Each image as diffusers' `ZImageOmniPipeline` prepares it, in RGB (another mode is converted first:
        `_open_image`): one over 1024x1024 pixels is scaled (Lanczos) to that area (to `height * width` when both
        are given; not with `auto_resize` False); that image goes to SigLIP2, and its center crop to multiples of
        16 to the VAE. Returns `(siglip image, pixels [1, 3, h, w] in [-1, 1])` pairs
        and the last crop's `(height, width)` (None without images)."""
        prepared, size = [], None
        for i, image in enumerate(images):
            image = _open_image(image, f"edit_image[{i}]")
            w, h = image.size
            if min(w, h) < 64 or max(w / h, h / w) > 8:
                raise ConfigError(
                    f"edit_image[{i}] is {w}x{h}; edit images need both sides >= 64 pixels and an aspect ratio "
                    "of at most 8:1"
                )
            if auto_resize and w * h > 1024 * 1024:
                area = height * width if height is not None and width is not None else 1024 * 1024
                scale = math.sqrt(area / (w * h))
                image = image.resize((int(w * scale), int(h * scale)), Image.LANCZOS)
                w, h = image.size
            m = self.size_multiple
            cw, ch = w // m * m, h // m * m
            left, top = (w - cw) // 2, (h - ch) // 2
            crop = image.crop((left, top, left + cw, top + ch))
            pixels = torch.from_numpy(np.asarray(crop).astype(np.float32) / 255.0).permute(2, 0, 1)[None]
            prepared.append((image, 2.0 * pixels - 1.0))
            size = (ch, cw)
        return prepared, size

    def encode_edit_images(self, prepared, tiled=False, tile_size=512, tile_stride=384) -> EditCondition:
        """VAE latents (posterior mean) and SigLIP2 grids of the prepared edit images. The pixels are rounded to
        bfloat16 first, as the reference pipeline does whatever the VAE's dtype (a no-op for a bfloat16 VAE)."""
        latents, grids = [], []
        for image, pixels in prepared:
            pixels = pixels.to(self.device, torch.bfloat16).to(module_dtype(self.vae))
            encoded = self.vae.encode(pixels, tiled=tiled, tile_size=tile_size, tile_stride=tile_stride)
            latents.append(encoded[0].float())
            grids.append(self.image_encoder.encode(image))
        return EditCondition(latents, grids or None)

    # ------------------------------------------------------------------ ControlNet
    def check_control_inputs(self, inputs) -> list[tuple[ControlNetInput, ZImageControlNet]]:
        """`controlnet_inputs` checked against the loaded nets (before any model runs), with each one's net."""
        nets = self.controlnets()
        how = (
            "use ZImagePipeline.from_pretrained(..., controlnet=...), list the ControlNet file among model_configs, "
            "or call pipe.load_controlnet(...)"
        )
        checked = []
        for i, item in enumerate(checked_inputs(inputs, len(nets), how)):
            where, cid = f"controlnet_inputs[{i}]", item.controlnet_id
            if item.processor_id is not None:
                raise ConfigError(
                    f"{where}.processor_id={item.processor_id!r} is not read by Z-Image ControlNets: the Union nets "
                    "tell the kind of control (canny, depth, pose, ...) from the image itself; leave it None"
                )
            net = nets[cid]
            inpaint = (item.inpaint_mask is not None, item.inpaint_image is not None)
            if not net.takes_inpaint:
                if any(inpaint):
                    raise ConfigError(
                        f"{where}: ControlNet {cid} (Union 1.0) takes no inpainting condition; inpaint_mask and "
                        "inpaint_image are read by the 2.x nets"
                    )
                if item.image is None:
                    raise ConfigError(f"{where}.image is missing: give the control image")
            elif inpaint[0] != inpaint[1]:
                raise ConfigError(
                    f"{where}: inpaint_mask and inpaint_image go together (the mask's white part is repainted, the "
                    "rest of inpaint_image is kept)"
                )
            elif item.image is None and not inpaint[0]:
                raise ConfigError(f"{where}: give the control image, or inpaint_mask with inpaint_image, or all three")
            checked.append((item, net))
        return checked

    def encode_control(
        self,
        item: ControlNetInput,
        net: ZImageControlNet,
        height,
        width,
        tiled=False,
        tile_size=512,
        tile_stride=384,
        where: str = "ControlNetInput",
    ) -> ControlCondition:
        """The condition latents `[1, C(, 1 + C), H/8, W/8]` of one checked input, as the authors build them.

        The control image's VAE latents; for the 2.x nets then the kept region (1 - mask, binarised at
        0.5, nearest-resized to the latent grid) and the latents of `inpaint_image` with the repainted
        pixels zeroed. A missing part is what the authors' pipeline and training use: zero control
        latents, and without a mask a zero mask channel and the latents of an all-zero image. `where` names the
        input in errors (e.g. "controlnet_inputs[1]").
        """
        size, shape = (width, height), (1, self.dit.config.in_channels, height // 8, width // 8)
        dtype = module_dtype(self.vae)

        def encode(pixels: torch.Tensor) -> torch.Tensor:
            return self.vae.encode(pixels, tiled=tiled, tile_size=tile_size, tile_stride=tile_stride).float()

        def pixels(image, field: str) -> torch.Tensor:
            image = load_image(image, name=f"{where}.{field}").resize(size, Image.LANCZOS)
            return pil_to_tensor([image], dtype=dtype, device=self.device)

        if item.image is not None:
            control = encode(pixels(item.image, "image"))
        else:
            control = torch.zeros(shape, device=self.device)
        if net.takes_inpaint:
            if item.inpaint_mask is None:
                keep = torch.zeros(1, 1, *shape[2:], device=self.device)
                masked = torch.zeros(1, 3, height, width, dtype=dtype, device=self.device)
            else:
                repaint = _load_mask(item.inpaint_mask, size, f"{where}.inpaint_mask").to(self.device)
                masked = pixels(item.inpaint_image, "inpaint_image") * (repaint < 0.5).to(dtype)
                keep = F.interpolate(1.0 - repaint, size=shape[2:], mode="nearest")
            control = torch.cat([control, keep, encode(masked)], dim=1)
        return ControlCondition(ZImageControl(net, control, float(item.scale)), float(item.start), float(item.end))


def _open_image(image, name: str) -> Image.Image:
    """An RGB PIL image, as given or opened from a path. An RGB image is returned as it is (as the reference takes
    it); any other mode is converted with PIL's plain `convert("RGB")` (SigLIP2 and the VAE both read three
    channels): an RGBA image's alpha is dropped, not composited on a background; grey images deeper than 8 bits
    are scaled to 8 bits first (`media.eight_bit`: PIL's `convert` would clip them to white)."""
    if not isinstance(image, Image.Image):
        if not isinstance(image, (str, os.PathLike)):
            raise ConfigError(f"{name} must be a PIL.Image or a file path, got {type(image).__name__}")
        if not os.path.isfile(image):
            raise ConfigError(f"{name}: no image file at {os.fspath(image)!r}")
        with Image.open(image) as opened:
            opened.load()
            image = opened.copy()
    if image.mode == "RGB":
        return image
    return eight_bit(image, name).convert("RGB")


def _load_mask(mask, size: tuple[int, int], name: str = "inpaint_mask") -> torch.Tensor:
    """`[1, 1, H, W]` float: 1 where the mask (a path or PIL image, white = repaint) is at least half white. It is
    read as the inpaint image is (`load_image`: upright as its EXIF says, 16-bit grey scaled to 8 bits, not clipped
    to white by PIL's `convert("L")`; a missing file is a ConfigError naming it)."""
    if not isinstance(mask, (str, os.PathLike, Image.Image)):
        raise ConfigError(f"{name} must be a file path or a PIL.Image, got {type(mask).__name__}")
    gray = np.asarray(load_image(mask, name=name).convert("L").resize(size, Image.LANCZOS), dtype=np.float32) / 255.0
    return torch.from_numpy((gray >= 0.5).astype(np.float32))[None, None]


__all__ = [
    "ControlCondition",
    "ControlNetInput",
    "EditCondition",
    "ZImagePipeline",
    "z_image_omni_velocity",
    "z_image_velocity",
]
