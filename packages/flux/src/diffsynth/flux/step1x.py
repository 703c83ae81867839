"""`Step1XEditPipeline`: stepfun-ai's Step1X-Edit v1.0, instruction-based image editing on a FLUX.1-style DiT.

Models: the DiT (FLUX.1 layout without the guidance embedder) and the connector (`flux1/step1x_connector.py`), both
in `step1x-edit-i1258.safetensors`; the FLUX.1 VAE (`vae.safetensors`); Qwen2.5-VL-7B-Instruct as text encoder
(`diffsynth.runtime.models.qwen25vl`), with its image processor and tokenizer.

As the authors' `inference.py` does:

- the reference image is resized (bicubic) to about `size_level`^2 pixels (default 512) at its aspect ratio, each
  side rounded down to a multiple of 16; that is the generated size, and the result is resized back to the
  reference's own size (pass `height`/`width` to generate at another size: the reference is then resized to it);
- Qwen2.5-VL sees that image after qwen_vl_utils' resize (multiples of 28) and then its processor's (256 to 324
  merged patches), as their `process_vision_info` + processor do (DiffSynth-Studio skips the first);
- the prompt runs through Qwen2.5-VL in a chat turn holding their prompt-enhancer prefix, the image and the
  instruction; quoted text in the instruction (and anything after an apostrophe) is tokenised character by
  character; the states of the first 217 tokens are dropped and the rest zero-padded to 640 tokens with a mask;
- the reference latents are packed and appended to the noisy tokens with the same (0, row, col) positions; the DiT
  sees the connector's 640 text tokens (ids 0) unmasked;
- the reference latent is the VAE's mean (the authors' autoencoder draws a sample of it);
- CFG: `uncond + cfg_scale * (cond - uncond)` over the noisy tokens with the negative prompt (default ""), Euler
  steps on FLUX.1's shifted schedule for the generated image's token count (28 steps, cfg 6 by default).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffsynth.runtime.errors import ConfigError, DiffSynthError
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.media import load_image, pil_to_tensor, tensor_to_output
from diffsynth.runtime.pipeline import BasePipeline, finite_number
from diffsynth.runtime.schedulers import make_scheduler
from diffsynth.runtime.vram import module_dtype

from .pipeline import NOT_GIVEN, latent_ids, pack_latents, unpack_latents

logger = logging.getLogger(__name__)

DEFAULT_STEPS = 28
DEFAULT_CFG = 6.0
DEFAULT_SIZE_LEVEL = 512
MAX_LENGTH = 640  # text tokens the connector and DiT see
DROPPED_TOKENS = 217  # leading states the authors drop (the chat head and their prefix)
MIN_PIXELS, MAX_PIXELS = 256 * 28 * 28, 324 * 28 * 28  # the authors' Qwen2.5-VL processor limits
VISION_FACTOR = 28  # Qwen2.5-VL's 14 px patches, merged 2 x 2
# qwen_vl_utils' own limits (4 to 16384 merged patches), applied before the processor's in the authors' code
FETCH_MIN_PIXELS, FETCH_MAX_PIXELS = 4 * 28 * 28, 16384 * 28 * 28
QUOTE_OPEN_ID, QUOTE_CLOSE_ID = 2073, 854  # Qwen2.5 token ids of the curly quotes wrapped around quoted characters
PROCESSOR_REPO = "Qwen/Qwen2.5-VL-7B-Instruct"  # DiffSynth-Studio's step1x_processor_config default
QUOTE_AFTER = 155  # quotes are only honoured past this character of the templated text (the authors' rule)

# The authors' prompt-enhancer prefix, put before the image in the user turn (their `Qwen25VL_7b_PREFIX`).
PREFIX = (
    'Given a user prompt, generate an "Enhanced prompt" that provides detailed visual descriptions suitable for '
    "image generation. Evaluate the level of detail in the user prompt:\n"
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial "
    "relationships to create vivid and concrete scenes.\n"
    "- If the prompt is already detailed, refine and enhance the existing details slightly without "
    "overcomplicating.\n\n"
    "Here are examples of how to transform or refine prompts:\n"
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping "
    "peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.\n"
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing street "
    "lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass "
    "skyscrapers.\n\n"
    "Please generate only the enhanced description for the prompt below and avoid including any additional "
    "commentary or evaluations:\nUser Prompt:"
)
IMAGE_PAD = "<|image_pad|>"
VISION_END = "<|vision_end|>"


def chat_text(prompt: str) -> str:
    """Qwen2.5-VL's chat template (default system turn, `add_vision_id`, generation prompt) around the prefix,
    one image and the instruction, as `apply_chat_template` renders the authors' message."""
    return (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        f"{PREFIX}Picture 1: <|vision_start|>{IMAGE_PAD}{VISION_END}{prompt}<|im_end|>\n<|im_start|>assistant\n"
    )


def quote_pieces(text: str) -> list[str]:
    """The authors' split of the templated text: straight/curly double quotes and apostrophes become `"`; past
    character `QUOTE_AFTER`, each quote closes the running piece, and every character between two quotes is its
    own piece wrapped in curly quotes (tokenised alone)."""
    text = text.replace("\u201c", '"').replace("\u201d", '"').replace("'", '"')
    pieces, current, quoted = [], "", False
    for i, ch in enumerate(text):
        if ch == '"' and i > QUOTE_AFTER:
            current += ch
            if not quoted:
                pieces.append(current)
                current = ""
            quoted = not quoted
        elif quoted:
            pieces.append(f"\u201c{ch}\u201d")
        else:
            current += ch
    if current:
        pieces.append(current)
    return pieces


def vision_size(width: int, height: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(width, height) in multiples of 28 near the image's, its area brought within [min_pixels, max_pixels] at
    about the same aspect ratio: Qwen2.5-VL's resize rule (its processor's and qwen_vl_utils')."""
    f = VISION_FACTOR
    w, h = max(f, round(width / f) * f), max(f, round(height / f) * f)
    if w * h > max_pixels:
        beta = math.sqrt(width * height / max_pixels)
        w, h = max(f, math.floor(width / beta / f) * f), max(f, math.floor(height / beta / f) * f)
    elif w * h < min_pixels:
        beta = math.sqrt(min_pixels / (width * height))
        w, h = math.ceil(width * beta / f) * f, math.ceil(height * beta / f) * f
    return w, h


def reference_size(width: int, height: int, size_level: int = DEFAULT_SIZE_LEVEL) -> tuple[int, int]:
    """(width, height) of about `size_level`^2 pixels at the image's aspect ratio, multiples of 16 rounded down
    (the authors' `input_process_image`)."""
    ratio = width / height
    if width > height:
        w = math.ceil(math.sqrt(size_level * size_level * ratio))
        h = math.ceil(w / ratio)
    else:
        h = math.ceil(math.sqrt(size_level * size_level / ratio))
        w = math.ceil(h * ratio)
    return w // 16 * 16, h // 16 * 16


class Step1XProcessor:
    """Qwen2.5-VL inputs for one instruction and one image: transformers' Qwen2-VL image processor (the authors'
    pixel limits) and the tokenizer; the image placeholder is expanded to one token per merged patch group."""

    def __init__(self, image_processor, tokenizer):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        # the curly quotes' ids (Qwen2.5's 2073 and 854, which the authors compare against), from this tokenizer
        self.quote_ids = tuple(
            ids[0] if len(ids := self.token_ids(quote)) == 1 else default
            for quote, default in (("\u201c", QUOTE_OPEN_ID), ("\u201d", QUOTE_CLOSE_ID))
        )

    @classmethod
    def from_folder(cls, folder, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS) -> Step1XProcessor:
        from transformers import AutoImageProcessor, AutoTokenizer

        image_processor = AutoImageProcessor.from_pretrained(str(folder), min_pixels=min_pixels, max_pixels=max_pixels)
        return cls(image_processor, AutoTokenizer.from_pretrained(str(folder)))

    def token_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def __call__(self, prompt: str, image: Image.Image) -> dict:
        """`input_ids` `[1, L]`, `attention_mask`, `pixel_values`, `image_grid_thw`: the authors' token sequence
        (the processor's up to the vision end, the quote-aware re-tokenisation from there)."""
        # the authors' `process_vision_info` resizes first (bicubic, qwen_vl_utils' wide limits), then the
        # processor resizes within its own: a non-square image can end at another size than one resize gives
        size = vision_size(image.width, image.height, FETCH_MIN_PIXELS, FETCH_MAX_PIXELS)
        image = image.convert("RGB")
        if size != image.size:
            image = image.resize(size, Image.BICUBIC)
        vision = self.image_processor(images=[image], return_tensors="pt")
        count = int(vision["image_grid_thw"][0].prod()) // self.image_processor.merge_size**2
        text = chat_text(prompt)
        head = text[: text.index(IMAGE_PAD)]
        ids = self.token_ids(head) + [self.tokenizer.convert_tokens_to_ids(IMAGE_PAD)] * count
        end_id = self.tokenizer.convert_tokens_to_ids(VISION_END)
        rest: list[int] = []
        for piece in quote_pieces(text):
            tokens = self.token_ids(piece)
            if len(tokens) > 1 and (tokens[0], tokens[-1]) == self.quote_ids:
                tokens = tokens[1:-1]
            rest += tokens
        ids += rest[rest.index(end_id) :]
        input_ids = torch.tensor([ids], dtype=torch.long)
        return {
            "input_ids": input_ids,
            "attention_mask": (input_ids > 0).long(),  # as the authors: token id 0 counts as padding
            "pixel_values": vision["pixel_values"],
            "image_grid_thw": vision["image_grid_thw"],
        }


@torch.no_grad()
def encode_instructions(
    text_encoder,
    processor: Step1XProcessor,
    prompts: Sequence[str],
    image: Image.Image,
    *,
    max_length: int = MAX_LENGTH,
    drop: int = DROPPED_TOKENS,
    device=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per prompt, Qwen2.5-VL's last hidden states after the first `drop` tokens, cut to `max_length` and
    zero-padded to it: `[B, max_length, hidden]` float32 states and the `[B, max_length]` long mask."""
    device = device if device is not None else next(text_encoder.parameters()).device
    hidden_size = text_encoder.config.text_config.hidden_size
    states = torch.zeros(len(prompts), max_length, hidden_size, device=device)
    mask = torch.zeros(len(prompts), max_length, dtype=torch.long, device=device)
    dtype = next(text_encoder.visual.parameters()).dtype
    for i, prompt in enumerate(prompts):
        inputs = processor(prompt, image)
        hidden = text_encoder.last_hidden_state(
            inputs["input_ids"].to(device),
            inputs["attention_mask"].to(device),
            pixel_values=inputs["pixel_values"].to(device, dtype),
            image_grid_thw=inputs["image_grid_thw"].to(device),
        )[0, drop:][:max_length]
        if hidden.shape[0] == 0:
            raise ConfigError(
                f"prompt {i} gives {inputs['input_ids'].shape[1]} tokens, not more than the {drop} dropped ones"
            )
        states[i, : hidden.shape[0]] = hidden.float()
        mask[i, : hidden.shape[0]] = 1
    return states, mask


def step1x_velocity(dit, connector, x, reference, ids, states, mask, sigma) -> torch.Tensor:
    """One model call as the authors' `Step1XEdit.forward`: connector -> DiT over `[noisy, reference]` tokens;
    returns the velocity of the noisy tokens. `x` / `reference` are packed `[B, L, 64]` (or one reference for
    all), `ids` their `[L, 3]`, `sigma` one noise level or one per row."""
    dtype = module_dtype(dit)
    b, n = x.shape[:2]
    t = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(b)  # one, or one a row
    txt, y = connector(states, t, mask)
    img = torch.cat([x, reference.expand(b, -1, -1)], dim=1).to(dtype)
    img_ids = torch.cat([ids, ids], dim=0)
    txt_ids = torch.zeros(states.shape[1], 3, device=x.device)
    out = dit(img, img_ids, txt.to(dtype), txt_ids, t, y.to(dtype))
    return out[:, :n].float()


def one_processor_config(ours, studio, kwargs: dict):
    """The processor config given under one of its names (ours, DiffSynth-Studio's `step1x_processor_config`, or
    `tokenizer_config` in `kwargs`, popped), NOT_GIVEN when none is."""
    given = {"processor_config": ours, "step1x_processor_config": studio}
    if "tokenizer_config" in kwargs:
        given["tokenizer_config"] = kwargs.pop("tokenizer_config")
    named = {name: value for name, value in given.items() if value is not NOT_GIVEN}
    if len(named) > 1:
        raise ConfigError(f"give one of {sorted(named)}: they all name Step1X-Edit's Qwen2.5-VL processor")
    return next(iter(named.values()), NOT_GIVEN)


class Step1XEditPipeline(BasePipeline):
    """Step1X-Edit: `pipe(prompt, reference_image=image)` edits the image as the instruction says."""

    family = "flux"
    model_slots = {
        "dit": "dit",
        "step1x_connector": "step1x_connector",
        "vae": "vae",
        "text_encoder": "text_encoder",
    }
    slot_specs = {
        "dit": ("flux1_dit",),
        "step1x_connector": ("step1x_connector",),
        "vae": ("autoencoder_kl",),
        "text_encoder": ("qwen25vl",),
    }
    size_multiple = 16

    def __init__(self, device=None, torch_dtype=torch.bfloat16):
        super().__init__(device=device, torch_dtype=torch_dtype)
        self.processor: Step1XProcessor | None = None

    @classmethod
    def from_pretrained(
        cls,
        model_id_or_configs: str | os.PathLike | Sequence[ModelConfig] | None = None,
        *,
        processor_config: ModelConfig | None = NOT_GIVEN,
        step1x_processor_config: ModelConfig | None = NOT_GIVEN,
        **kwargs,
    ):
        """As `BasePipeline.from_pretrained`; `processor_config` (DiffSynth-Studio's `step1x_processor_config` and
        `tokenizer_config` are taken too) gives the image processor and tokenizer. Left out, it is the preset's
        tokenizer entry, or with `model_configs` Qwen/Qwen2.5-VL-7B-Instruct's `*.json` files (DiffSynth-Studio's
        default repo); an explicit None loads none."""
        processor_config = one_processor_config(processor_config, step1x_processor_config, kwargs)
        if processor_config is NOT_GIVEN:
            preset = isinstance(model_id_or_configs, (str, os.PathLike))
            processor_config = None if preset else ModelConfig(model_id=PROCESSOR_REPO, origin_file_pattern="*.json")
        pipe = super().from_pretrained(model_id_or_configs, tokenizer_config=processor_config, **kwargs)
        if pipe.dit is not None and pipe.dit.guidance_in is not None:
            raise ConfigError("Step1XEditPipeline: the DiT has a guidance embedder; Step1X-Edit's has none")
        return pipe

    def _load_tokenizer(self, config: ModelConfig):
        try:
            paths = config.resolve()
        except DiffSynthError as exc:
            raise type(exc)(f"processor_config: {exc}") from exc
        folder = paths[0] if Path(paths[0]).is_dir() else str(Path(paths[0]).parent)
        self.processor = Step1XProcessor.from_folder(folder)
        return self.processor.tokenizer

    def read_lora(self, path, slot: str = "dit"):
        """The DiT's LoRAs in FLUX.1's layouts (BFL, kohya / sd-scripts as the authors train them, diffusers)."""
        from .flux1.dit import Flux1DiT
        from .flux1.lora import read_flux1_lora

        model = getattr(self, slot, None)
        if isinstance(model, Flux1DiT):
            return read_flux1_lora(path, model)
        return super().read_lora(path, slot)

    def cli_options(self, options: dict) -> dict:
        """`diffsynth generate --input-image` (or `--edit-image`) is the image to edit."""
        options = dict(options)
        for name in ("input_image", "edit_image"):
            if name in options:
                options["reference_image"] = options.pop(name)
        return options

    @torch.no_grad()
    def __call__(
        self,
        prompt: str,
        reference_image=None,
        negative_prompt: str = "",
        cfg_scale: float | None = None,
        num_inference_steps: int | None = None,
        height: int | None = None,
        width: int | None = None,
        size_level: int | None = None,
        seed: int | None = None,
        rand_device: str = "cpu",
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        progress_bar: bool = True,
        step1x_reference_image=None,
    ):
        """Edit `reference_image` (DiffSynth-Studio's `step1x_reference_image` too) as `prompt` says.

        Without `height`/`width` the image is generated at about `size_level`^2 pixels (512) at the reference's
        aspect ratio and returned at the reference's own size; with them (multiples of 16) it is generated and
        returned at that size. `cfg_scale` (6) weighs the prompt against `negative_prompt`; 1 turns CFG off.
        """
        if reference_image is None:
            reference_image = step1x_reference_image
        if reference_image is None:
            raise ConfigError("Step1X-Edit edits an image: pass reference_image (a PIL image or a path)")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ConfigError(f"prompt must be a non-empty string (the edit instruction), got {prompt!r}")
        if not isinstance(negative_prompt, str):
            raise ConfigError(f"negative_prompt must be a string, got {negative_prompt!r}")
        if self.processor is None:
            raise ConfigError("Step1XEditPipeline has no Qwen2.5-VL processor: pass processor_config=ModelConfig(...)")
        if output_type not in ("pil", "np", "pt"):
            raise ConfigError(f"output_type={output_type!r} is not accepted; use 'pil', 'np' or 'pt'")
        cfg_scale = finite_number(self.setting("cfg_scale", cfg_scale, DEFAULT_CFG), "cfg_scale")  # NaN: NaN image
        steps = self.setting("num_inference_steps", num_inference_steps, DEFAULT_STEPS)
        level = self.setting("size_level", size_level, DEFAULT_SIZE_LEVEL)
        if isinstance(level, bool) or not isinstance(level, int) or level < 16:
            raise ConfigError(f"size_level={level!r} is not accepted; use an integer >= 16 (512 or 1024)")
        image = load_image(reference_image)
        original = image.size
        if (height is None) != (width is None):
            raise ConfigError("give both height and width, or neither (the reference image's size is used)")
        if height is None:
            width, height = reference_size(image.width, image.height, level)
            if width < 16 or height < 16:
                raise ConfigError(f"reference_image of {original[0]}x{original[1]} is too narrow for size {level}")
        else:
            height, width = self.check_size(height, width)
            original = (width, height)
        image = image.resize((width, height), Image.BICUBIC) if image.size != (width, height) else image
        use_cfg = cfg_scale != 1.0

        self.load_models_to_device(["text_encoder"])
        prompts = [prompt, negative_prompt] if use_cfg else [prompt]
        states, mask = encode_instructions(self.text_encoder, self.processor, prompts, image, device=self.device)

        self.load_models_to_device(["vae"])
        pixels = pil_to_tensor([image], dtype=module_dtype(self.vae), device=self.device)
        reference = pack_latents(self.vae.encode(pixels).float())
        shape = (1, self.vae.config.latent_channels, height // 8, width // 8)
        x = self.check_latents(latents, shape) if latents is not None else self.generate_noise(shape, seed, rand_device)
        x = pack_latents(x)
        ids = latent_ids(height // 8, width // 8, device=self.device)

        scheduler = make_scheduler("flux1", "euler")
        scheduler.set_timesteps(steps, image_seq_len=(height // 16) * (width // 16))
        self.load_models_to_device(["dit", "step1x_connector"])
        batch = len(prompts)
        for i in self.progress(range(len(scheduler.timesteps)), progress_bar):
            both = step1x_velocity(
                self.dit,
                self.step1x_connector,
                x.expand(batch, -1, -1),
                reference,
                ids,
                states,
                mask,
                scheduler.sigmas[i],
            )
            velocity = self.guide(both[:1], both[1:], cfg_scale) if use_cfg else both
            x = scheduler.step(velocity, i, x)

        self.load_models_to_device(["vae"])
        out = self.vae.decode(unpack_latents(x, height // 8, width // 8).to(module_dtype(self.vae)))
        self.load_models_to_device([])
        if tuple(out.shape[-2:]) == (original[1], original[0]):
            images = tensor_to_output(out.float(), output_type)
            return images[0] if output_type == "pil" else images
        # back to the reference's size (bicubic, through PIL) whatever the output type, so all three agree
        result = tensor_to_output(out.float(), "pil")[0].resize(original, Image.BICUBIC)
        if output_type == "pil":
            return result
        unit = torch.from_numpy(np.asarray(result, dtype=np.float32) / 255.0)[None]
        return unit.numpy() if output_type == "np" else unit.permute(0, 3, 1, 2).contiguous()
