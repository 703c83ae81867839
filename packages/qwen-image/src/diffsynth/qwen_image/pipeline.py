"""`QwenImagePipeline`: text-to-image, image-to-image (Qwen-Image, 2512) and editing (Qwen-Image-Edit, 2509, 2511).

Stages: encode prompts (Qwen2.5-VL, last hidden states after the template's 34 tokens) -> prepare
latents (seeded noise `[B, 16, H/8, W/8]`, or the noised input image) -> denoise (Euler on the
Qwen-Image sigma template, true CFG with the authors' norm rescale) -> decode (the Wan 2.1 VAE
that Qwen ships in `vae/`). `qwen_image_velocity` is the per-step model call; a trainer reuses it.

Sigma templates (`sigma_template=`): "qwen_image" (the authors' schedule) and "lightning" (the fixed shift 3
without terminal stretch that lightx2v's Qwen-Image-Lightning LoRAs were distilled with).

Inpainting (`input_image` + `inpaint_mask`, white = repaint), as DiffSynth-Studio does it: outside the mask
each step's velocity is replaced by the one that carries the latent to the input image's latent noised to
the next sigma, so that region follows the input image's noising trajectory and ends on its clean latent.

Editing: each edit image is resized to about 1024x1024 pixels (aspect kept), VAE-encoded, and its
tokens follow the generated image's in the DiT; the prompt is encoded together with the images by the
Qwen2.5-VL vision tower (the `processor/` folder), with the Edit template (64 tokens dropped). Edit-2509
and 2511 number the images ("Picture 1: ...") and show the vision tower a 384x384-pixel version; the
first Edit shows it the 1024x1024 one (`edit_template`: "plus" or "edit"; by default the preset's, else the one
the DiT's hub repo or diffusers folder implies, else "plus").

Layer decomposition (Qwen-Image-Layered; `layered.py`): `layer_input_image` (an RGBA image) and `layer_num`, as in
DiffSynth-Studio, return `layer_num` RGBA layers per prompt (`decompose`), as diffusers'
`QwenImageLayeredPipeline` computes them; the prompt is a caption of the image.

ControlNets (InstantX/Qwen-Image-ControlNet-Union and -Inpainting, diffusers `QwenImageControlNetModel`
files) are loaded with `from_pretrained(..., controlnet=...)` or `load_controlnet(...)` and used through
`controlnet_inputs=[ControlNetInput(...)]`, as diffusers' `QwenImageControlNetPipeline` /
`QwenImageControlNetInpaintPipeline` build them: each control image is resized (Lanczos) to the output
size, VAE-encoded (posterior mode) and packed like the latents; for the inpainting net the pixels to
repaint (mask >= 0.5) are set to -1 first and the kept region (1 - mask, nearest on the latent grid) is
appended as a 17th channel. Every step each active net runs once on the noisy latents with the positive
prompt, and the sum of the nets' scaled residuals goes into both the positive and the negative DiT call.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from diffsynth.runtime.controlnet import ControlNetInput, checked_inputs, model_source
from diffsynth.runtime.eligen import check_entity_inputs, entity_regions
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.inpaint import check_blur, inpaint_velocity, mask_grid
from diffsynth.runtime.media import area_size, load_image, pil_to_tensor, tensor_to_output
from diffsynth.runtime.pipeline import BasePipeline, finite_number
from diffsynth.runtime.schedulers import FlowMatchScheduler, make_scheduler
from diffsynth.runtime.schedulers.templates import check_steps
from diffsynth.runtime.vram import module_dtype

from .blockwise_controlnet import QwenImageBlockwiseControlNet, blockwise_residual
from .controlnet import ControlCondition, QwenImageControlNet, sum_residuals
from .eligen import QwenEntityText, entity_text
from .layered import (
    LAYERED_TEMPLATES,
    check_layer_images,
    check_layer_num,
    check_layer_prompts,
    check_layered_models,
    layered_sigmas,
    layered_size,
    layered_velocity,
    refuse_other_modes,
)
from .presets import CONTROLNETS
from .text_encoder import (
    T2I_TEMPLATE,
    VisionPromptProcessor,
    check_max_sequence_length,
    encode_prompts,
    encode_prompts_with_images,
    processor_folder,
)

logger = logging.getLogger(__name__)

# `sigma_template=` name -> runtime sigma template
SIGMA_TEMPLATES = {"qwen_image": "qwen_image", "lightning": "qwen_image_lightning"}

CONDITION_AREA = 384 * 384  # Edit-2509/2511: what the vision tower sees of each edit image
EDIT_AREA = 1024 * 1024  # edit images' VAE size, and the default output size, for every Edit model
MAX_VISION_ASPECT = 200  # the Qwen2-VL image processor refuses images more elongated than this

# `edit_template=`: "edit" (the first Qwen-Image-Edit) or "plus" (Edit-2509/2511: numbered, 384x384 vision images)
EDIT_TEMPLATES = ("edit", "plus")
# the template of an Edit DiT loaded from one of these hub repos (lower case: repo ids match case-insensitively) ...
EDIT_TEMPLATE_OF_REPO = {
    "qwen/qwen-image-edit": "edit",
    "qwen/qwen-image-edit-2509": "plus",
    "qwen/qwen-image-edit-2511": "plus",
}
# ... or from a diffusers folder whose model_index.json names one of these pipeline classes
EDIT_TEMPLATE_OF_CLASS = {"QwenImageEditPipeline": "edit", "QwenImageEditPlusPipeline": "plus"}


def source_edit_template(config: ModelConfig | None) -> str | None:
    """The edit template the DiT's source implies, None when it says nothing: its hub repo (`EDIT_TEMPLATE_OF_REPO`)
    or the `model_index.json` of the diffusers folder its files are in. A local snapshot or DiffSynth-Studio's
    model_configs of the first Qwen-Image-Edit match no preset, yet need its unnumbered template."""
    if config is None:
        return None
    if config.model_id is not None:
        return EDIT_TEMPLATE_OF_REPO.get(config.model_id.strip().lower())
    paths = [config.path] if isinstance(config.path, (str, os.PathLike)) else list(config.path or ())
    for path in paths[:1]:
        for folder in (Path(path), Path(path).parent, Path(path).parent.parent):  # the weights' folder, one above
            index = folder / "model_index.json"
            if index.is_file():
                return EDIT_TEMPLATE_OF_CLASS.get(pipeline_class_name(index))
    return None


def pipeline_class_name(index: Path) -> str | None:
    """The `_class_name` of a diffusers `model_index.json` (None when it cannot be read: it only picks a default)."""
    try:
        name = json.loads(index.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) else None


def pack(latents: torch.Tensor, patch: int = 2) -> torch.Tensor:
    """`[B, C, H, W]` -> `[B, H/p * W/p, C * p * p]` tokens (channel-major inside a token, as the DiT expects)."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // patch) * (w // patch), c * patch * patch)


def unpack(tokens: torch.Tensor, height: int, width: int, patch: int = 2) -> torch.Tensor:
    """Inverse of `pack` for a latent of `height` x `width` cells."""
    b, _, d = tokens.shape
    c = d // (patch * patch)
    x = tokens.reshape(b, height // patch, width // patch, c, patch, patch)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, c, height, width)


def qwen_image_velocity(
    dit,
    latents: torch.Tensor,
    sigma: torch.Tensor,
    text: torch.Tensor,
    text_mask: torch.Tensor | None = None,
    edit_latents: Sequence[torch.Tensor] = (),
    entities: QwenEntityText | None = None,
    controlnet_block_samples: Sequence[torch.Tensor] | None = None,
    edit_rope_interpolation: bool = False,
) -> torch.Tensor:
    """Flow velocity (noise - clean) `[B, 16, H, W]` (float32) predicted at noise level `sigma` [B].

    `latents` are unpacked `[B, 16, H, W]`; `edit_latents` (Edit models) are clean reference latents
    `[B, 16, h, w]` whose tokens follow the image's, their predictions discarded. `entities` (EliGen) replace
    `text` by the entity prompts and the global one, with their attention mask. `controlnet_block_samples`
    are the ControlNets' residuals for this step (`controlnet_residuals`), added to the image's tokens.
    `edit_rope_interpolation` spreads the references' positions over the image's grid (see `msrope_angles`).
    """
    p = dit.config.patch_size
    b, _, h, w = latents.shape
    dtype = module_dtype(dit)
    tokens = [pack(latents, p)] + [pack(e, p) for e in edit_latents]
    shapes = [(1, h // p, w // p)] + [(1, e.shape[-2] // p, e.shape[-1] // p) for e in edit_latents]
    image = torch.cat(tokens, dim=1).to(dtype)
    sigma = sigma.to(latents.device, torch.float32).expand(b)
    control = {} if controlnet_block_samples is None else {"controlnet_block_samples": controlnet_block_samples}
    if edit_rope_interpolation:
        control["edit_rope_interpolation"] = True
    if entities is not None:
        mask = entities.attention_mask(image.shape[1])
        out = dit(image, sigma, entities.text.to(dtype), None, [shapes] * b, entities.segments, mask, **control)
    else:
        out = dit(image, sigma, text.to(dtype), text_mask, [shapes] * b, **control)
    return unpack(out[:, : tokens[0].shape[1]].float(), h, w, p)


def controlnet_residuals(
    controls: Sequence[ControlCondition],
    latents: torch.Tensor,
    sigma: torch.Tensor,
    text: torch.Tensor,
    text_mask: torch.Tensor | None,
    blocks: int,
) -> list[torch.Tensor] | None:
    """The summed, scaled residuals of the ControlNets acting at this step (None without any), for a DiT of
    `blocks` blocks. Each net sees the noisy `latents` `[B, 16, H, W]` (the generated image only) and the
    prompt's `text`; it runs in its own dtype. Lists of one length are summed entry by entry (diffusers'
    multi-ControlNet), nets of different depths block by block (`sum_residuals`)."""
    if not controls:
        return None
    b, _, h, w = latents.shape
    lists = []
    for control in controls:
        net = control.model
        p, dtype = net.config.patch_size, module_dtype(net)
        lists.append(
            net(
                pack(latents, p).to(dtype),
                sigma.to(latents.device, torch.float32).expand(b),
                text.to(dtype),
                text_mask,
                [(1, h // p, w // p)],
                cond=control.tokens.to(latents.device, dtype),
                scale=control.scale,
            )
        )
    return sum_residuals(lists, blocks)


def true_cfg(positive: torch.Tensor, negative: torch.Tensor, cfg_scale: float, patch: int = 2) -> torch.Tensor:
    """The authors' true CFG: `neg + s * (pos - neg)`, then each token's guided velocity rescaled
    to the norm of its conditional one (norms over a token's packed channels)."""
    h, w = positive.shape[-2:]
    pos, neg = pack(positive, patch), pack(negative, patch)
    guided = neg + cfg_scale * (pos - neg)
    guided = guided * (pos.norm(dim=-1, keepdim=True) / guided.norm(dim=-1, keepdim=True))
    return unpack(guided, h, w, patch)


@contextlib.contextmanager
def dit_config(dit, **overrides):
    """The DiT's config with the given fields (those not None) changed for the duration, then restored."""
    given = {k: v for k, v in overrides.items() if v is not None}
    saved = {k: getattr(dit.config, k) for k in given}
    for k, v in given.items():
        setattr(dit.config, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(dit.config, k, v)


class QwenImagePipeline(BasePipeline):
    """Qwen-Image text-to-image / image-to-image, API compatible with DiffSynth-Studio."""

    family = "qwen_image"
    model_slots = {
        "dit": "dit",
        "vae": "vae",
        "text_encoder": "text_encoder",
        "controlnet": "controlnet",
        "blockwise_controlnet": "blockwise_controlnet",
    }
    optional_slots = ("controlnet", "blockwise_controlnet")
    controlnet_slots = ("controlnet", "blockwise_controlnet")
    slot_specs = {"dit": ("qwen_image_dit",), "vae": ("wan21_vae",), "text_encoder": ("qwen25vl",)}
    size_multiple = 16  # VAE 8x, patch 2

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.processor = None  # VisionPromptProcessor (tokenizer + image preprocessing) for editing

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, *args, processor_config: ModelConfig | None = None, **kwargs):
        """`BasePipeline.from_pretrained`, plus DiffSynth-Studio's `processor_config`: the Edit models' Qwen2-VL
        `processor/` folder (e.g. `ModelConfig(model_id="Qwen/Qwen-Image-Edit", origin_file_pattern="processor/")`),
        which `edit_image` needs. Without a `tokenizer_config` (or a preset / folder giving one) its tokenizer
        is the prompt tokenizer too, as Studio scripts that pass only `processor_config` expect."""
        if processor_config is None:
            return super().from_pretrained(*args, **kwargs)
        if not isinstance(processor_config, ModelConfig):
            raise ConfigError(
                f"processor_config must be a ModelConfig naming the processor/ folder, got "
                f"{type(processor_config).__name__}: ModelConfig(model_id='Qwen/Qwen-Image-Edit', "
                "origin_file_pattern='processor/')"
            )
        folder, processor = processor_folder(processor_config)  # checked before any model loads
        if processor is None:
            raise ConfigError(
                f"processor_config: {folder} holds no Qwen2-VL processor (preprocessor_config.json, in it or in a "
                "processor/ beside it); name the Edit model's processor/ folder"
            )
        pipe = super().from_pretrained(*args, **kwargs)
        pipe.processor = VisionPromptProcessor.from_folder(processor)
        if pipe.tokenizer is None:
            pipe.tokenizer = pipe.processor.tokenizer
        return pipe

    def controlnet_spec(self):
        """InstantX Qwen-Image ControlNets (diffusers `QwenImageControlNetModel` files): a `ModelConfig`, a local
        file or folder (with its `config.json`), or a hub repo id: "InstantX/Qwen-Image-ControlNet-Union",
        "InstantX/Qwen-Image-ControlNet-Inpainting", DiffSynth-Studio's Blockwise repos (`presets.CONTROLNETS`),
        or another repo with a root `diffusion_pytorch_model.safetensors`."""
        from .blockwise_controlnet import BLOCKWISE_CONTROLNET_SPEC
        from .controlnet_formats import CONTROLNET_SPEC

        return CONTROLNET_SPEC, BLOCKWISE_CONTROLNET_SPEC

    @staticmethod
    def controlnet_source(item) -> ModelConfig:
        def files(repo: str) -> list[str]:  # the known repos' files, else a root diffusers file
            return list(CONTROLNETS.get(repo, ("diffusion_pytorch_model.safetensors",)))

        return model_source(item, "controlnet", files, f"a hub repo id (Org/Name), e.g. one of {sorted(CONTROLNETS)}")

    def describe_controlnet(self, net) -> str:
        kind = "inpainting" if net.takes_mask else "control-image"
        return f"{kind} {type(net).__name__}, {net.config.num_layers} blocks"

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        cfg_scale: float | None = None,
        input_image=None,
        denoising_strength: float = 1.0,
        height: int | None = None,
        width: int | None = None,
        seed: int | None = None,
        rand_device: str = "cpu",
        num_inference_steps: int | None = None,
        exponential_shift_mu: float | None = None,
        sigma_template: str | None = None,
        sampler: str | None = None,
        latents: torch.Tensor | None = None,
        inpaint_mask=None,
        inpaint_blur_size: int | None = None,
        inpaint_blur_sigma: float | None = None,
        edit_image=None,
        edit_image_auto_resize: bool | None = None,
        edit_rope_interpolation: bool | None = None,
        zero_cond_t: bool | None = None,
        edit_template: str | None = None,
        context_image=None,
        eligen_entity_prompts: Sequence[str] | None = None,
        eligen_entity_masks: Sequence[Image.Image] | None = None,
        eligen_enable_on_negative: bool = False,
        controlnet_inputs: Sequence[ControlNetInput] | None = None,
        blockwise_controlnet_inputs: Sequence[ControlNetInput] | None = None,
        layer_input_image=None,
        layer_num: int | None = None,
        layer_resolution: int | None = None,
        cfg_normalize: bool | None = None,
        max_sequence_length: int = 512,
        tiled: bool = False,
        tile_size: int | tuple[int, int] = (34, 34),
        tile_stride: int | tuple[int, int] = (18, 16),
        output_type: str = "pil",
        progress_bar: bool = True,
    ):
        """Generate images: a PIL image for one prompt, a list for a list of prompts; "np"/"pt" give the batch.

        `cfg_scale` is the authors' `true_cfg_scale` (> 1 runs a second, negative pass; 1 = off).
        `exponential_shift_mu` overrides the schedule's shift (resolution-dependent for "qwen_image", ln 3 for
        `sigma_template="lightning"`, the Qwen-Image-Lightning LoRAs' schedule). `sampler` "euler" (default) or
        "unipc" (`diffsynth.runtime.schedulers.UniPCScheduler`; not for layer decomposition). `latents` is the
        initial noise, unpacked: `[B, 16, H/8, W/8]` (or `[B, 16, 1, H/8, W/8]`, the VAE's layout).
        `inpaint_mask` (with `input_image`; a PIL "L" image of the input image's size, or one per input
        image; white = repaint) keeps the rest of the input image (see `inpaint_velocity`);
        `inpaint_blur_size` with `inpaint_blur_sigma` blur it on the latent grid (DiffSynth-Studio's arguments).
        `eligen_entity_prompts` / `eligen_entity_masks` (one PIL mask each, white = entity) are EliGen's regional
        prompts for one prompt at a time; `eligen_enable_on_negative` gives the negative branch the same regions,
        each with the negative prompt (`eligen.py`).
        `controlnet_inputs` are `ControlNetInput`s for the loaded ControlNets (several at once; see the module
        docstring): `image`, `scale`, `start` / `end` and `controlnet_id` are read, and `inpaint_mask` (white =
        repaint) by the inpainting net, which repaints `image`. `blockwise_controlnet_inputs` are the same
        for DiffSynth-Studio's Blockwise ControlNets (`blockwise_controlnet.py`), run in one process.
        Tiles are in latent cells. `edit_image` (one image or a list) switches to editing; without
        `edit_image_auto_resize` the images keep their size (rounded down to multiples of 16).
        `height`/`width` then default to about 1024x1024 with the last edit image's aspect ratio (a side not
        given is that size's). `edit_template` ("edit" for the first Qwen-Image-Edit, "plus" for Edit-2509/2511)
        picks the prompt template; by default the preset's, else the one the DiT's source implies (its hub repo, or
        a diffusers folder's `model_index.json`), else "plus".
        `max_sequence_length` cuts a text-to-image prompt; an edit prompt, which carries the edit images' vision
        tokens before the instruction, is kept whole (as the authors' Edit pipelines do).
        `edit_rope_interpolation` (DiffSynth-Studio's, for its Qwen-Image-Edit-Lowres-Fix LoRA) spreads a smaller
        edit image's rotary positions over the generated image's grid, so a low-resolution image edits a larger one.
        `zero_cond_t` (DiffSynth-Studio's argument) modulates the edit images' tokens with timestep 0, as
        Qwen-Image-Edit-2511 was trained; by default the DiT's `config.json` decides (True for Edit-2511), and a
        bool overrides it for this call (e.g. a single-file Edit-2511 DiT without its config.json).
        `context_image` (DiffSynth-Studio's In-Context Control LoRAs, e.g. Qwen-Image-In-Context-Control-Union with
        a "Context_Control. " prompt) is resized to the output size and its latent tokens follow the image's as a
        clean reference that the text encoder does not see; a control map (pose, depth, edges, ...) is followed.

        `layer_input_image` (Qwen-Image-Layered; see `decompose`) returns `layer_num` RGBA layers per prompt
        instead; `layer_resolution` and `cfg_normalize` belong to that mode.
        """
        exponential_shift_mu = self.setting("exponential_shift_mu", exponential_shift_mu, None)
        if exponential_shift_mu is not None:  # NaN would make every sigma NaN
            exponential_shift_mu = finite_number(exponential_shift_mu, "exponential_shift_mu")
        check_max_sequence_length(max_sequence_length)
        if layer_input_image is not None or getattr(getattr(self.dit, "config", None), "use_layer3d_rope", False):
            if layer_input_image is None:
                raise ConfigError(
                    "this is the Qwen-Image-Layered DiT: it decomposes an image into layers; pass "
                    "layer_input_image=<an RGBA image> (and layer_num) with a caption of it as the prompt"
                )
            refuse_other_modes(
                {
                    "input_image": input_image,
                    "inpaint_mask": inpaint_mask,
                    "edit_image": edit_image,
                    "edit_rope_interpolation": edit_rope_interpolation or None,
                    "sampler": None if sampler in (None, "euler") else sampler,
                    "eligen_entity_prompts": eligen_entity_prompts,
                    "eligen_entity_masks": eligen_entity_masks,
                    "eligen_enable_on_negative": eligen_enable_on_negative,
                    "inpaint_blur_size": inpaint_blur_size,
                    "inpaint_blur_sigma": inpaint_blur_sigma,
                    "edit_image_auto_resize": edit_image_auto_resize is not None,
                    "zero_cond_t": zero_cond_t is not None,
                    "edit_template": edit_template,
                    "controlnet_inputs": controlnet_inputs,
                    "blockwise_controlnet_inputs": blockwise_controlnet_inputs,
                    "denoising_strength < 1": denoising_strength != 1.0,
                }
            )
            return self.decompose(
                prompt,
                layer_input_image,
                negative_prompt=negative_prompt,
                layer_num=layer_num,
                layer_resolution=layer_resolution,
                context_image=context_image,
                cfg_scale=cfg_scale,
                cfg_normalize=cfg_normalize,
                height=height,
                width=width,
                seed=seed,
                rand_device=rand_device,
                num_inference_steps=num_inference_steps,
                exponential_shift_mu=exponential_shift_mu,
                sigma_template=sigma_template,
                latents=latents,
                max_sequence_length=max_sequence_length,
                tiled=tiled,
                tile_size=tile_size,
                tile_stride=tile_stride,
                output_type=output_type,
                progress_bar=progress_bar,
            )
        for name, value in (("layer_num", layer_num), ("layer_resolution", layer_resolution)):
            if value is not None:
                raise ConfigError(f"{name} belongs to layer decomposition (Qwen-Image-Layered): give layer_input_image")
        if cfg_normalize is not None:
            raise ConfigError(
                "cfg_normalize belongs to layer decomposition (Qwen-Image-Layered); Qwen-Image's true CFG always "
                "rescales to the conditional norm, as the authors do"
            )
        if edit_rope_interpolation and edit_image is None and context_image is None:  # a preset's default may stay
            raise ConfigError(
                "edit_rope_interpolation=True spreads the edit images' rotary positions over the output's grid: "
                "give edit_image, or leave it out"
            )
        if edit_template is not None and edit_image is None:
            raise ConfigError(
                f"edit_template={edit_template!r} picks the prompt template of edit_image: give edit_image, or leave "
                "it out"
            )
        edit_image_auto_resize = self.setting("edit_image_auto_resize", edit_image_auto_resize, True)
        if not isinstance(edit_image_auto_resize, bool):  # "no" would be true
            raise ConfigError(
                f"edit_image_auto_resize={edit_image_auto_resize!r} must be True, False or None (True: about "
                "1024x1024 pixels)"
            )
        edit_rope_interpolation = self.setting("edit_rope_interpolation", edit_rope_interpolation, False)
        if not isinstance(edit_rope_interpolation, bool):  # "no" would be true
            raise ConfigError(f"edit_rope_interpolation={edit_rope_interpolation!r} must be True, False or None")
        zero_cond_t = self.setting("zero_cond_t", zero_cond_t, None)
        if zero_cond_t is not None and not isinstance(zero_cond_t, bool):
            raise ConfigError(f"zero_cond_t={zero_cond_t!r} must be True, False or None (the DiT's config decides)")
        style = self.edit_template(edit_template) if edit_image is not None else None
        edits = self.prepare_edit_images(edit_image, edit_image_auto_resize, style)
        if edits is not None and (height is None or width is None):  # as diffusers' Edit pipelines, side by side
            edit_width, edit_height = self.edit_size(edits[-1][2], EDIT_AREA, len(edits) - 1)
            height = edit_height if height is None else height
            width = edit_width if width is None else width
        negative_prompt = self.setting("negative_prompt", negative_prompt, "")
        prompts, negatives = self.check_prompt_pair(prompt, negative_prompt)
        cfg_scale = finite_number(self.setting("cfg_scale", cfg_scale, 4.0), "cfg_scale")  # NaN: CFG silently off
        steps = check_steps(self.setting("num_inference_steps", num_inference_steps, 50))
        height, width = self.check_size(self.setting("height", height, 1328), self.setting("width", width, 1328))
        if output_type not in ("pil", "np", "pt"):
            raise ConfigError(f"output_type={output_type!r} is not accepted; use 'pil', 'np' or 'pt'")
        if not 0.0 < denoising_strength <= 1.0:
            raise ConfigError(f"denoising_strength={denoising_strength!r} must be in (0, 1]")
        if denoising_strength != 1.0 and input_image is None:
            raise ConfigError(
                f"denoising_strength={denoising_strength!r} is image-to-image (how far it moves from input_image): "
                "give input_image, or leave it at 1"
            )
        use_cfg = cfg_scale > 1.0
        template = self.setting("sigma_template", sigma_template, "qwen_image")
        if template not in SIGMA_TEMPLATES:
            raise ConfigError(f"sigma_template={template!r} is not known; use one of {', '.join(SIGMA_TEMPLATES)}")
        entity_prompts, entity_masks = check_entity_inputs(eligen_entity_prompts, eligen_entity_masks)
        if entity_prompts and (len(prompts) != 1 or edits is not None or context_image is not None):
            raise ConfigError(
                "EliGen (eligen_entity_prompts) takes one prompt at a time and no edit_image or context_image"
            )
        if not isinstance(eligen_enable_on_negative, bool):
            raise ConfigError(f"eligen_enable_on_negative={eligen_enable_on_negative!r} must be True or False")
        blur = check_blur(inpaint_blur_size, inpaint_blur_sigma)
        repaint = self.prepare_inpaint_mask(inpaint_mask, input_image, len(prompts), height, width, blur)
        if controlnet_inputs and blockwise_controlnet_inputs:
            raise ConfigError("give controlnet_inputs or blockwise_controlnet_inputs, not both in one call")
        control_inputs = self.check_controls(controlnet_inputs)
        blockwise_inputs = self.check_blockwise(blockwise_controlnet_inputs)

        # 1. prompts
        self.load_models_to_device(["text_encoder"])
        text, text_mask = self.encode_prompt(prompts, max_sequence_length, edits, style)
        negative = self.encode_prompt(negatives, max_sequence_length, edits, style) if use_cfg else None
        entities = negative_entities = None
        if entity_prompts:
            regions = entity_regions(entity_masks, height, width).to(self.device)
            encoded = [self.encode_prompt([p], max_sequence_length) for p in entity_prompts]
            entities = entity_text(encoded, (text, text_mask), regions)
            if negative is not None and eligen_enable_on_negative:
                negative_entities = entity_text([negative] * len(encoded), negative, regions)

        # 2. schedule and latents
        scheduler = make_scheduler(SIGMA_TEMPLATES[template], str(self.setting("sampler", sampler, "euler")))
        scheduler.set_timesteps(
            steps,
            denoising_strength=denoising_strength,
            image_seq_len=(height // 16) * (width // 16),
            mu=exponential_shift_mu,
        )
        uses_vae = input_image is not None or edits is not None or bool(control_inputs or blockwise_inputs)
        uses_vae = uses_vae or context_image is not None
        self.load_models_to_device(["vae"] if uses_vae else [])
        noise = self.prepare_noise(len(prompts), height, width, seed, rand_device, latents)
        clean = None
        if input_image is not None:
            clean = self.encode_input_image(input_image, len(prompts), height, width, tiled, tile_size, tile_stride)
        x = noise if clean is None else scheduler.add_noise(clean, noise, scheduler.sigmas[0])
        references = (
            [] if edits is None else self.encode_edit_images(edits, len(prompts), tiled, tile_size, tile_stride)
        )
        if context_image is not None:  # before the edit images, as DiffSynth-Studio lays them out
            context = self.encode_context_image(
                context_image, len(prompts), height, width, tiled, tile_size, tile_stride
            )
            references = [context, *references]
        controls = self.encode_controls(control_inputs, height, width, tiled, tile_size, tile_stride)
        blockwise = self.encode_blockwise(blockwise_inputs, height, width, tiled, tile_size, tile_stride)

        # 3. denoise
        self.load_models_to_device(
            ["dit"] + (["controlnet"] if controls else []) + (["blockwise_controlnet"] if blockwise else [])
        )
        n_steps = len(scheduler.timesteps)
        with dit_config(self.dit, zero_cond_t=zero_cond_t):
            for i in self.progress(range(n_steps), progress_bar):
                sigma = scheduler.sigmas[i].expand(x.shape[0])
                active = [c for c in controls if c.active(i, n_steps)]
                residuals = controlnet_residuals(active, x, sigma, text, text_mask, self.dit.config.num_layers)
                if blockwise:
                    residuals = blockwise_residual([c for c in blockwise if c.active(i, n_steps)])
                velocity = qwen_image_velocity(
                    self.dit, x, sigma, text, text_mask, references, entities, residuals, edit_rope_interpolation
                )
                if negative is not None:  # the negative call gets the positive prompt's control (as diffusers)
                    negative_velocity = qwen_image_velocity(
                        self.dit, x, sigma, *negative, references, negative_entities, residuals,
                        edit_rope_interpolation,
                    )  # fmt: skip
                    velocity = true_cfg(velocity, negative_velocity, cfg_scale, self.dit.config.patch_size)
                if repaint is not None:
                    velocity = inpaint_velocity(velocity, x, clean, scheduler.sigmas[i], repaint)
                x = scheduler.step(velocity, i, x)

        # 4. decode
        self.load_models_to_device(["vae"])
        video = self.vae.decode(
            x.unsqueeze(2).to(module_dtype(self.vae)), tiled=tiled, tile_size=tile_size, tile_stride=tile_stride
        )
        self.load_models_to_device([])
        out = tensor_to_output(video[:, :, 0].float(), output_type)
        return out[0] if isinstance(prompt, str) and output_type == "pil" else out

    # ------------------------------------------------------------------ layer decomposition
    @torch.no_grad()
    def decompose(
        self,
        prompt: str | Sequence[str],
        layer_input_image,
        *,
        negative_prompt: str | Sequence[str] | None = None,
        layer_num: int | None = None,
        layer_resolution: int | None = None,
        context_image=None,
        cfg_scale: float | None = None,
        cfg_normalize: bool | None = None,
        height: int | None = None,
        width: int | None = None,
        seed: int | None = None,
        rand_device: str = "cpu",
        num_inference_steps: int | None = None,
        exponential_shift_mu: float | None = None,
        sigma_template: str | None = None,
        latents: torch.Tensor | None = None,
        max_sequence_length: int = 512,
        tiled: bool = False,
        tile_size: int | tuple[int, int] = (34, 34),
        tile_stride: int | tuple[int, int] = (18, 16),
        output_type: str = "pil",
        progress_bar: bool = True,
    ):
        """Qwen-Image-Layered (`layered.py`): `layer_num` RGBA layers of `layer_input_image` (one image, or one
        per prompt) for each prompt, a caption of the image. "pil" gives the list of layers (a list of such
        lists for a list of prompts); "np" `[B, N, H, W, 4]`, "pt" `[B, N, 4, H, W]`, in [0, 1].

        The size is about `layer_resolution`^2 pixels (640 or 1024) with the image's aspect ratio, unless
        `height` and `width` are given (DiffSynth-Studio's way); the image is resized to it. `cfg_scale` > 1
        runs the negative prompt (true CFG), `cfg_normalize` rescales each token's guided velocity to the
        conditional one's norm. `sigma_template`: "qwen_image_layered" (the authors' schedule, default) or
        "qwen_image" (Qwen-Image's, which DiffSynth-Studio uses); `exponential_shift_mu` replaces its mu (for
        the authors' schedule, the linear shift itself). `latents` is the initial noise `[B, N + 1, 16, H/8, W/8]`
        (frame 0 is the whole image).

        `layer_num=0` (Qwen-Image-Layered-Control, DiffSynth-Studio's) makes the one layer the prompt names: a
        one-frame latent `[B, 1, 16, H/8, W/8]` whose frame is the layer, returned as the only one. Its V2 LoRA
        also reads `context_image`, a mask (white = the region to pull out) encoded as RGBA at the output size.
        """
        check_layered_models(self.dit, self.vae)
        check_layer_prompts(prompt)
        prompts, negatives = self.check_prompt_pair(prompt, self.setting("negative_prompt", negative_prompt, " "))
        batch, n = len(prompts), check_layer_num(self.setting("layer_num", layer_num, 4))
        cfg_scale = finite_number(self.setting("cfg_scale", cfg_scale, 4.0), "cfg_scale")
        if exponential_shift_mu is not None:  # decompose is also called directly, not only through __call__
            exponential_shift_mu = finite_number(exponential_shift_mu, "exponential_shift_mu")
        check_max_sequence_length(max_sequence_length)
        normalize = self.setting("cfg_normalize", cfg_normalize, True)
        if not isinstance(normalize, bool):
            raise ConfigError(f"cfg_normalize={normalize!r} must be True or False")
        steps = check_steps(self.setting("num_inference_steps", num_inference_steps, 50))
        template = self.setting("sigma_template", sigma_template, LAYERED_TEMPLATES[0])
        if template not in LAYERED_TEMPLATES:
            raise ConfigError(f"sigma_template={template!r} is not accepted here; use one of {LAYERED_TEMPLATES}")
        if output_type not in ("pil", "np", "pt"):
            raise ConfigError(f"output_type={output_type!r} is not accepted; use 'pil', 'np' or 'pt'")
        images = [load_image(im, "RGBA") for im in check_layer_images(layer_input_image, batch)]
        if height is None and width is None:
            width, height = layered_size(*images[0].size, int(self.setting("layer_resolution", layer_resolution, 640)))
        elif height is None or width is None or layer_resolution is not None:
            raise ConfigError(
                "give height and width together (the layers' size), or layer_resolution (640 or 1024: the size "
                "then follows the image's aspect ratio), not both"
            )
        height, width = self.check_size(height, width)

        # 1. prompts
        self.load_models_to_device(["text_encoder"])
        text, text_mask = self.encode_prompt(prompts, max_sequence_length)
        negative = self.encode_prompt(negatives, max_sequence_length) if cfg_scale > 1.0 else None

        # 2. the input image's latent, the noise and the schedule
        self.load_models_to_device(["vae"])
        resized = [im.resize((width, height), Image.LANCZOS) for im in images]
        pixels = pil_to_tensor(resized, module_dtype(self.vae), self.device, mode="RGBA").unsqueeze(2)
        condition = self.vae.encode(pixels, tiled=tiled, tile_size=tile_size, tile_stride=tile_stride)
        condition = condition[:, :, 0].float().expand(batch, -1, -1, -1)
        context = None
        if context_image is not None:
            context = self.encode_context_image(
                context_image, batch, height, width, tiled, tile_size, tile_stride, "RGBA"
            )
        shape = (batch, n + 1, self.vae.z_dim, height // 8, width // 8)
        x = self.generate_noise(shape, seed, rand_device) if latents is None else self.check_latents(latents, shape)
        scheduler, tokens = FlowMatchScheduler("qwen_image"), (height // 16) * (width // 16)
        if template == "qwen_image":
            scheduler.set_timesteps(steps, image_seq_len=tokens, mu=exponential_shift_mu)
        else:
            scheduler.set_timesteps(steps, sigmas=layered_sigmas(steps, tokens, exponential_shift_mu))

        # 3. denoise
        self.load_models_to_device(["dit"])
        for i in self.progress(range(len(scheduler.timesteps)), progress_bar):
            sigma = scheduler.sigmas[i].expand(batch)
            velocity = layered_velocity(self.dit, x, sigma, text, text_mask, condition, context=context)
            if negative is not None:
                negative_velocity = layered_velocity(self.dit, x, sigma, *negative, condition, context=context)
                if normalize:
                    p = self.dit.config.patch_size
                    guided = true_cfg(velocity.flatten(0, 1), negative_velocity.flatten(0, 1), cfg_scale, p)
                    velocity = guided.unflatten(0, (batch, n + 1))
                else:
                    velocity = self.guide(velocity, negative_velocity, cfg_scale)
            x = scheduler.step(velocity, i, x)

        # 4. decode the layers (frame 0, the whole image, is dropped; with layer_num=0 it is the layer), each as
        # its own image
        self.load_models_to_device(["vae"])
        x, n = (x, 1) if n == 0 else (x[:, 1:], n)
        layers = x.flatten(0, 1).unsqueeze(2).to(module_dtype(self.vae))
        pixels = self.vae.decode(layers, tiled=tiled, tile_size=tile_size, tile_stride=tile_stride)[:, :, 0]
        self.load_models_to_device([])
        out = tensor_to_output(pixels.float(), output_type)
        if output_type != "pil":
            return out.reshape(batch, n, *out.shape[1:])
        per_prompt = [out[b * n : (b + 1) * n] for b in range(batch)]
        return per_prompt[0] if isinstance(prompt, str) else per_prompt

    # ------------------------------------------------------------------ stages
    def encode_prompt(
        self,
        prompts: list[str],
        max_sequence_length: int = 512,
        edits: list | None = None,
        edit_template: str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt embeddings `[B, L, 3584]` and their mask `[B, L]`, on the pipeline's device; with
        `edits` (from `prepare_edit_images`) the images are encoded with the prompt in `edit_template` (None: the
        pipeline's, `edit_template`), and `max_sequence_length` cuts nothing (`encode_prompts_with_images`)."""
        if edits is not None:
            if self.processor is None:
                raise ConfigError(
                    "edit_image needs the Qwen2-VL processor: load a folder or preset with a `processor/` folder"
                )
            embeds, mask = encode_prompts_with_images(
                self.text_encoder,
                self.processor,
                prompts,
                [edit[0] for edit in edits],
                numbered=self.edit_template(edit_template) == "plus",
                max_sequence_length=max_sequence_length,
                device=self.device,
            )
            return embeds.to(self.device), mask.to(self.device)
        if self.tokenizer is None:
            raise ConfigError(
                "QwenImagePipeline has no tokenizer: pass tokenizer_config=ModelConfig(..., origin_file_pattern="
                "'tokenizer/')"
            )
        embeds, mask = encode_prompts(
            self.text_encoder,
            self.tokenizer,
            prompts,
            max_sequence_length=max_sequence_length,
            template=T2I_TEMPLATE,
            device=self.device,
        )
        return embeds.to(self.device), mask.to(self.device)

    def edit_template(self, value: str | None = None) -> str:
        """The edit prompt template: `value`, else the preset's or folder's default, else the one the DiT's source
        implies (`source_edit_template`), else "plus" (Edit-2509/2511, and their fine-tunes)."""
        style = self.setting("edit_template", value, None)
        if style is None:
            style = source_edit_template(self.model_configs.get("dit")) or "plus"
        if style not in EDIT_TEMPLATES:
            raise ConfigError(
                f"edit_template={style!r} is not known; use 'edit' (the first Qwen-Image-Edit) or 'plus' "
                "(Edit-2509/2511)"
            )
        return style

    def prepare_edit_images(self, edit_image, auto_resize: bool, edit_template: str | None = None) -> list | None:
        """(vision-tower image, VAE image, original size) per edit image, at the sizes the authors use for
        `edit_template` (None: the pipeline's, `edit_template`)."""
        if edit_image is None:
            return None
        images = list(edit_image) if isinstance(edit_image, (list, tuple)) else [edit_image]
        if not images:
            raise ConfigError("edit_image is an empty list; pass one image or a list of images")
        style = self.edit_template(edit_template)
        pairs = []
        for i, image in enumerate(images):
            image = load_image(image, name=f"edit_image[{i}]")
            if auto_resize:
                vae_size = self.edit_size(image.size, EDIT_AREA, i)
            else:
                vae_size = (max(16, image.width // 16 * 16), max(16, image.height // 16 * 16))
            vae_image = image.resize(vae_size, Image.LANCZOS)
            if style == "plus":
                vision = image.resize(self.edit_size(image.size, CONDITION_AREA, i), Image.LANCZOS)
            else:
                vision = vae_image
            if max(vision.size) > MAX_VISION_ASPECT * min(vision.size):  # else a bare ValueError in the processor
                raise ConfigError(
                    f"edit_image[{i}] is {image.width}x{image.height}: too elongated for the vision tower (its "
                    f"{vision.width}x{vision.height} image is over {MAX_VISION_ASPECT}:1)"
                )
            pairs.append((vision, vae_image, image.size))
        return pairs

    def edit_size(self, image_size: tuple[int, int], area: int, index: int) -> tuple[int, int]:
        """`(width, height)` of about `area` pixels with the aspect ratio of edit_image[index] (`image_size`), sides
        multiples of 32; a picture so elongated that a side would round to nothing is refused (as
        `QwenImage21Pipeline` does)."""
        size = area_size(*image_size, area)
        if min(size) < self.size_multiple:
            side = round(area**0.5)
            raise ConfigError(
                f"edit_image[{index}] is {image_size[0]}x{image_size[1]}: too elongated for {side}x{side} pixels "
                f"(it would be {size[0]}x{size[1]})"
            )
        return size

    def encode_edit_images(self, edits, batch, tiled, tile_size, tile_stride) -> list[torch.Tensor]:
        """Normalised VAE latents `[B, 16, h, w]` of each edit image (the posterior mode)."""
        latents = []
        for _, image, _ in edits:
            pixels = pil_to_tensor(image, dtype=module_dtype(self.vae), device=self.device).unsqueeze(2)
            z = self.vae.encode(pixels, tiled=tiled, tile_size=tile_size, tile_stride=tile_stride)[:, :, 0].float()
            latents.append(z.expand(batch, -1, -1, -1))
        return latents

    def _load_tokenizer(self, config):
        """The tokenizer, and the Qwen2-VL processor when a `processor/` folder is there (Edit models)."""
        folder, processor = processor_folder(config)
        if processor is not None:
            self.processor = VisionPromptProcessor.from_folder(processor)
            if processor == folder:
                return self.processor.tokenizer
        return super()._load_tokenizer(config)

    def prepare_noise(self, batch, height, width, seed, rand_device, latents) -> torch.Tensor:
        """The initial noise `[B, 16, H/8, W/8]`: `latents` when given (checked), else seeded noise."""
        shape = (batch, self.vae.z_dim, height // 8, width // 8)
        if latents is not None and isinstance(latents, torch.Tensor) and latents.dim() == 5 and latents.shape[2] == 1:
            latents = latents[:, :, 0]
        if latents is not None:
            return self.check_latents(latents, shape)
        return self.generate_noise(shape, seed, rand_device)

    def input_images(self, input_image) -> list[Image.Image]:
        images = input_image if isinstance(input_image, (list, tuple)) else [input_image]
        return [load_image(im) for im in images]

    def encode_context_image(
        self, context_image, batch, height, width, tiled, tile_size, tile_stride, mode: str = "RGB"
    ) -> torch.Tensor:
        """Normalised VAE latents `[B, 16, H/8, W/8]` of one in-context control image, resized to `width x height`
        (read as `mode`: "RGBA" for the Layered VAE)."""
        if isinstance(context_image, (list, tuple)):
            raise ConfigError("context_image is one image (a path or PIL image), shared by every prompt")
        image = load_image(context_image, mode).resize((width, height))
        pixels = pil_to_tensor(image, dtype=module_dtype(self.vae), device=self.device, mode=mode)
        clean = self.vae.encode(pixels.unsqueeze(2), tiled=tiled, tile_size=tile_size, tile_stride=tile_stride)
        return clean[:, :, 0].float().expand(batch, -1, -1, -1)

    def encode_input_image(self, input_image, batch, height, width, tiled, tile_size, tile_stride) -> torch.Tensor:
        """Normalised VAE latents `[B, 16, H/8, W/8]` of the input image(s), resized to `width x height`."""
        images = [im.resize((width, height)) for im in self.input_images(input_image)]
        pixels = pil_to_tensor(images, dtype=module_dtype(self.vae), device=self.device)
        clean = self.vae.encode(pixels.unsqueeze(2), tiled=tiled, tile_size=tile_size, tile_stride=tile_stride)
        clean = clean[:, :, 0].float()
        if clean.shape[0] == 1 and batch > 1:
            clean = clean.expand(batch, -1, -1, -1)
        elif clean.shape[0] != batch:
            raise ConfigError(f"input_image has {clean.shape[0]} images for {batch} prompts")
        return clean

    def prepare_inpaint_mask(self, inpaint_mask, input_image, batch, height, width, blur=None) -> torch.Tensor | None:
        """`inpaint_mask` as `[B or 1, 1, H/8, W/8]` floats in [0, 1] on the latent grid (1 = repaint), blurred
        there with `blur` (taps, sigma); see `diffsynth.runtime.inpaint.mask_grid`."""
        if inpaint_mask is None:
            if blur is not None:
                raise ConfigError("inpaint_blur_size / inpaint_blur_sigma blur inpaint_mask: give the mask too")
            return None
        if input_image is None:
            raise ConfigError("inpaint_mask needs input_image: the mask says which part of input_image to repaint")
        images = self.input_images(input_image)
        return mask_grid(inpaint_mask, images, batch, (height // 8, width // 8), self.device, blur)

    # ------------------------------------------------------------------ ControlNet
    def check_controls(
        self, inputs
    ) -> list[tuple[QwenImageControlNet, ControlNetInput, Image.Image, Image.Image | None]]:
        """`controlnet_inputs` checked against the loaded nets, with their images (and masks) loaded: a list of
        (net, input, control image, mask or None). Fields a net does not read are refused."""
        nets = self.controlnets()
        how = (
            "use QwenImagePipeline.from_pretrained(..., controlnet='InstantX/Qwen-Image-ControlNet-Union') or "
            "pipe.load_controlnet(...)"
        )
        checked = []
        for i, item in enumerate(checked_inputs(inputs, len(nets), how)):
            where, cid = f"controlnet_inputs[{i}]", item.controlnet_id
            if item.image is None:
                raise ConfigError(f"{where}.image is missing: give the control image (or the image to inpaint)")
            if item.processor_id is not None:
                raise ConfigError(
                    f"{where}.processor_id={item.processor_id!r} is not read: the Qwen-Image ControlNets take no "
                    "control mode (the Union net tells canny, soft edge, depth and pose apart from the image)"
                )
            if item.inpaint_image is not None:
                raise ConfigError(
                    f"{where}.inpaint_image is not read by Qwen-Image ControlNets: the inpainting net repaints "
                    "`image` where `inpaint_mask` is white"
                )
            net = nets[cid]
            self.check_controlnet_widths(net, f"{where}: ControlNet {cid}")
            if net.takes_mask and item.inpaint_mask is None:
                raise ConfigError(
                    f"{where}: ControlNet {cid} is an inpainting net; give inpaint_mask (white = repaint)"
                )
            if not net.takes_mask and item.inpaint_mask is not None:
                raise ConfigError(
                    f"{where}.inpaint_mask is given but ControlNet {cid} takes no mask (a control-image net); "
                    "load InstantX/Qwen-Image-ControlNet-Inpainting to inpaint with a ControlNet"
                )
            mask = None if item.inpaint_mask is None else load_image(item.inpaint_mask).convert("L")
            checked.append((net, item, load_image(item.image), mask))
        return checked

    def check_controlnet_widths(self, net: QwenImageControlNet, what: str) -> None:
        """A net made for another DiT would fail deep in torch (a layer-norm shape); say which widths differ."""
        names = ("inner_dim", "joint_attention_dim", "in_channels", "patch_size")
        ours, dits = ({n: getattr(c, n) for n in names} for c in (net.config, self.dit.config))
        if ours != dits:
            differ = ", ".join(f"{n} {ours[n]} (the DiT's: {dits[n]})" for n in names if ours[n] != dits[n])
            raise ConfigError(f"{what} was made for another DiT: {differ}")

    def check_blockwise(self, inputs) -> list[tuple[QwenImageBlockwiseControlNet, ControlNetInput]]:
        """`blockwise_controlnet_inputs` checked against the loaded Blockwise ControlNets, with each one's net."""
        nets = self.controlnets("blockwise_controlnet")
        how = (
            "list its file among model_configs, e.g. ModelConfig(model_id='DiffSynth-Studio/"
            "Qwen-Image-Blockwise-ControlNet-Depth', origin_file_pattern='model.safetensors'), or pipe.load_controlnet"
        )
        checked = []
        for i, item in enumerate(checked_inputs(inputs, len(nets), how)):
            where, net = f"blockwise_controlnet_inputs[{i}]", nets[item.controlnet_id]
            dit = self.dit.config
            if (net.config.num_layers, net.config.dim) != (dit.num_layers, dit.inner_dim):
                raise ConfigError(
                    f"{where}: Blockwise ControlNet {item.controlnet_id} has {net.config.num_layers} blocks of width "
                    f"{net.config.dim}; this DiT has {dit.num_layers} of {dit.inner_dim}"
                )
            if item.image is None:
                raise ConfigError(f"{where}.image is missing: give the control image (or the image to inpaint)")
            for name in ("processor_id", "inpaint_image"):
                if getattr(item, name) is not None:
                    raise ConfigError(f"{where}.{name} is not read by Blockwise ControlNets")
            if net.takes_mask != (item.inpaint_mask is not None):
                need = "an inpainting net: give inpaint_mask (white = repaint)" if net.takes_mask else "no mask"
                raise ConfigError(f"{where}: Blockwise ControlNet {item.controlnet_id} takes {need}")
            checked.append((net, item))
        return checked

    def encode_blockwise(self, checked, height, width, tiled, tile_size, tile_stride) -> list[ControlCondition]:
        """DiffSynth-Studio's Blockwise conditions: the control image (resized to the output) with the pixels
        under a mask brighter than mid-grey blacked out, VAE-encoded, the kept region (1 - mask, the channels'
        mean, nearest-resized to the latent grid) appended for the inpainting net, packed and embedded."""
        conditions = []
        for net, item in checked:
            z = self.blockwise_latent(item, height, width, tiled, tile_size, tile_stride)
            embedded = net.embed(pack(z, self.dit.config.patch_size))
            conditions.append(ControlCondition(net, embedded, float(item.scale), float(item.start), float(item.end)))
        return conditions

    def blockwise_latent(self, item, height, width, tiled=False, tile_size=(34, 34), tile_stride=(18, 16)):
        """One Blockwise condition before packing, `[1, 16 (17 with a mask), H/8, W/8]` (`encode_blockwise`; a
        trainer caches it)."""
        image = load_image(item.image).resize((width, height))
        keep = None
        if item.inpaint_mask is not None:
            mask = pil_to_tensor(load_image(item.inpaint_mask).resize((width, height)))  # [1, 3, H, W] in [-1, 1]
            array = np.asarray(image).copy()
            array[mask[0].mean(dim=0).numpy() > 0] = 0
            image = Image.fromarray(array)
            keep = (mask + 1) / 2
        pixels = pil_to_tensor(image, module_dtype(self.vae), self.device)
        z = self.vae.encode(pixels.unsqueeze(2), tiled=tiled, tile_size=tile_size, tile_stride=tile_stride)
        z = z[:, :, 0].float()
        if keep is not None:
            keep = 1 - F.interpolate(keep.mean(dim=1, keepdim=True), size=z.shape[-2:]).to(z.device)
            z = torch.cat([z, keep], dim=1)
        return z

    def encode_controls(self, checked, height, width, tiled=False, tile_size=(34, 34), tile_stride=(18, 16)):
        """Each checked control as a `ControlCondition`: its image resized (Lanczos) to the output size,
        VAE-encoded (posterior mode, normalised) and packed; for the inpainting net the pixels to repaint set
        to -1 before encoding and the kept region appended as a 17th latent channel (see the module docstring)."""
        controls = []
        for net, item, image, mask in checked:
            z = self.control_latent(image, mask, height, width, tiled, tile_size, tile_stride)
            tokens = pack(z, net.config.patch_size)
            controls.append(ControlCondition(net, tokens, float(item.scale), float(item.start), float(item.end)))
        return controls

    def control_latent(self, image, mask, height, width, tiled=False, tile_size=(34, 34), tile_stride=(18, 16)):
        """One ControlNet condition before packing, `[1, 16 (17 with a mask), H/8, W/8]` (`encode_controls`; a
        trainer caches it)."""
        image, mask = load_image(image), None if mask is None else load_image(mask).convert("L")
        pixels = pil_to_tensor(image.resize((width, height), Image.LANCZOS), module_dtype(self.vae), self.device)
        repaint = None
        if mask is not None:  # binarised at 0.5 after the resize, as diffusers' mask processor does
            gray = np.asarray(mask.resize((width, height), Image.LANCZOS), dtype=np.float32) / 255.0
            repaint = torch.from_numpy(gray >= 0.5)[None, None].to(self.device)
            pixels = pixels.masked_fill(repaint, -1.0)
        z = self.vae.encode(pixels.unsqueeze(2), tiled=tiled, tile_size=tile_size, tile_stride=tile_stride)
        z = z[:, :, 0].float()
        if repaint is not None:
            keep = 1.0 - F.interpolate(repaint.float(), size=z.shape[-2:], mode="nearest")
            z = torch.cat([z, keep], dim=1)
        return z


__all__ = [
    "SIGMA_TEMPLATES",
    "ControlNetInput",
    "QwenImagePipeline",
    "controlnet_residuals",
    "inpaint_velocity",
    "pack",
    "qwen_image_velocity",
    "true_cfg",
    "unpack",
]
