"""`FluxImagePipeline`: FLUX.1-dev, Krea-dev and Kontext-dev text-to-image, image-to-image and editing.

Stages: encode prompts (CLIP-L pooled + T5-XXL states) -> prepare latents (seeded noise, or the
noised input image; Kontext reference images VAE-encoded and packed) -> denoise (Euler on the FLUX.1
schedule, distilled guidance embedded, optional true CFG batched with the conditional pass) ->
decode (AutoencoderKL). `flux_velocity` is the per-step model call; a trainer reuses it.

Latents are `[B, 16, H/8, W/8]` outside the DiT; it sees them packed 2x2 into `[B, H/16 * W/16, 64]`
tokens with (t, row, col) position ids, as BFL and diffusers do. Kontext reference tokens are
appended after the image tokens with t = 1 and the DiT output is cut back to the image tokens.

ControlNets (diffusers `FluxControlNetModel` files: InstantX Union, alimama inpainting, jasperai
upscaler, ...) are loaded with `from_pretrained(..., controlnet=...)` or `load_controlnet(...)`
and used through `controlnet_inputs=[ControlNetInput(...)]`: each control image is VAE-encoded and
packed like the latents, every active net runs on the noisy tokens each step and the residuals of
all of them, each times its scale, are summed into the DiT's blocks.

FLUX.1 Tools DiTs with a wider input (`flux1/channels.py`) take their condition concatenated to every image
token's features: FLUX.1-Fill-dev `flux_fill_image` + `flux_fill_mask` (the masked image's latents and the
folded mask), FLUX.1-Canny-dev / -Depth-dev (or FLUX.1-dev with their control LoRA) `control_image` (its latents).

IP-Adapters (InstantX FLUX.1-dev-IP-Adapter with SigLIP, XLabs flux-ip-adapter with CLIP-L) are loaded with
`load_ip_adapter(...)` and used through `ipadapter_images` / `ipadapter_scale`: the images are encoded once and
turned into per-block keys/values that the DiT's image queries attend to (`flux1/ip_adapter.py`).

FLUX.1 Redux (black-forest-labs/FLUX.1-Redux-dev) is loaded with `load_redux(...)` and used through
`flux_redux_image` (DiffSynth-Studio's name) / `flux_redux_scale`: SigLIP patch features of each image become
T5-width tokens appended to the positive prompt's T5 states (`flux1/redux.py`); the negative prompt is left as is.

Nexus-Gen V2 (DiffSynth-Studio/Nexus-GenV2, `flux1/nexus_gen.py`) is loaded from model_configs (`model*.safetensors`:
the `nexus_gen` slot; `edit_decoder.bin` / `generation_decoder.bin`: the DiT and the `nexus_gen_editing_adapter` /
`nexus_gen_generation_adapter` slot): its Qwen2.5-VL predicts 81 image embeddings from the prompt (and
`nexus_gen_reference_image`, which editing needs), the adapter turns them into the positive branch's text tokens
(editing: with the reference's embeddings after them, at 2-D text positions); the CLIP vector and the negative
prompt stay FLUX.1's.

Insert Anything (`insert_anything_*`, a Fill DiT with the authors' LoRA and Redux) is a Fill + Redux call on the
diptych `flux1/insert_anything.py` prepares, with zero text states, its output pasted back into the source image.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from diffsynth.runtime.controlnet import ControlNetInput, acts_at, checked_inputs, model_source
from diffsynth.runtime.errors import ConfigError, DiffSynthError
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.media import eight_bit, load_image, pil_to_tensor, tensor_to_output, upright
from diffsynth.runtime.pipeline import (
    BasePipeline,
    accepts_tea_cache,
    describe_config,
    fetch_companion_config,
    finite_number,
    lora_file,
    weight_paths,
)
from diffsynth.runtime.schedulers import make_scheduler
from diffsynth.runtime.vram import module_dtype

from .flux1.channels import CONTROL, FILL, FLEX, condition_kind, describe_widths, fold_mask
from .flux1.controlnet import UNION_MODES, Flux1ControlNet
from .flux1.dit import residual_per_block
from .flux1.eligen import EliGenEntities, check_entity_inputs, entity_regions, joint_inputs
from .flux1.flex import DEFAULT_CONTROL_STOP, DEFAULT_CONTROL_STRENGTH, check_flex_inputs, encode_flex
from .flux1.ip_adapter import IPAdapterKV
from .flux1.text_encoder import T5_SEQUENCE_LENGTH, FluxPromptEmbeds, encode_prompts

logger = logging.getLogger(__name__)

DEFAULT_GUIDANCE = 3.5  # FLUX.1-dev model card
DEFAULT_STEPS = 28  # diffusers FluxPipeline
FILL_GUIDANCE = 30.0  # FLUX.1-Fill-dev model card (and diffusers FluxFillPipeline's defaults: 30, 50 steps)
FILL_STEPS = 50
# (width, height) FLUX.1-Kontext was trained at (BFL's list, also diffusers'); `kontext_auto_resize` picks one
_KONTEXT_WIDTHS = (672, 688, 720, 752, 800, 832, 880, 944, 1024, 1104, 1184, 1248, 1328, 1392, 1456, 1504, 1568)
KONTEXT_RESOLUTIONS = tuple(zip(_KONTEXT_WIDTHS, reversed(_KONTEXT_WIDTHS), strict=True))  # the list is symmetric


# ----------------------------------------------------------------------------------------------- tokens
def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """`[B, C, H, W]` -> `[B, H/2 * W/2, C * 4]`: each 2x2 patch becomes one token (channel-major)."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of `pack_latents` for a latent of `height` x `width`."""
    b, _, features = tokens.shape
    c = features // 4
    return tokens.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, height, width)


def latent_ids(height: int, width: int, index: float = 0.0, device=None) -> torch.Tensor:
    """`[H/2 * W/2, 3]` position ids (index, row, col) of the packed tokens of a `height` x `width` latent."""
    ids = torch.zeros(height // 2, width // 2, 3, device=device)
    ids[..., 0] = index
    ids[..., 1] = torch.arange(height // 2, device=device)[:, None]
    ids[..., 2] = torch.arange(width // 2, device=device)[None, :]
    return ids.reshape(-1, 3)


@dataclass
class KontextLatents:
    """Packed reference-image tokens `[1 or B, N, 64]` and their ids `[N, 3]` (first axis 1)."""

    tokens: torch.Tensor
    ids: torch.Tensor


@dataclass
class ControlCondition:
    """A control prepared for the denoiser: the net, its packed condition tokens `[1 or B, N, C]`, the
    union mode (None for other nets), its scale and the fractions of the steps where it acts."""

    model: Flux1ControlNet
    tokens: torch.Tensor
    mode: int | None = None
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    text: torch.Tensor | None = None  # `[1, N, 4096]` in place of the prompt's T5 states (InfiniteYou's id tokens)
    guidance: float | None = None  # in place of the DiT's embedded guidance

    def active(self, step: int, steps: int) -> bool:
        return acts_at(self.start, self.end, step, steps)


def flux_velocity(
    dit,
    latents: torch.Tensor,
    sigma: torch.Tensor,
    prompt: FluxPromptEmbeds,
    guidance: torch.Tensor | float | None = DEFAULT_GUIDANCE,
    kontext: KontextLatents | None = None,
    controls: Sequence[ControlCondition] = (),
    eligen: EliGenEntities | None = None,
    ip_adapter: IPAdapterKV | None = None,
    condition: torch.Tensor | None = None,
    text_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Flow velocity (noise - clean) `[B, 16, H/8, W/8]` (float32) predicted at noise level `sigma` [B].

    `guidance` is the distilled guidance (BFL units, e.g. 3.5) per sample or shared; models without a
    guidance embedder ignore it. Computation runs in the DiT's dtype. `controls` are the ControlNets
    acting at this step: each sees the noisy image tokens (not Kontext's) and the same text, and
    their scaled residuals are summed into the DiT's blocks. `eligen` adds the entity prompts before
    the global one and restricts the DiT's attention to their regions (`flux1/eligen.py`).
    `ip_adapter` holds the IP-Adapter's per-block image keys/values (`flux1/ip_adapter.py`).
    `condition` `[1 or B, L_img, C]` is concatenated to each image token's features for DiTs with a wider input
    (Fill: 320 features, Canny/Depth: 64; `flux1/channels.py`); the ControlNets see the noisy tokens alone.
    `text_ids` `[L, 3]` are the first text tokens' positions (Nexus-Gen editing), the rest at 0 (zeros without).
    """
    dtype = module_dtype(dit)
    b, _, h, w = latents.shape
    img = pack_latents(latents)
    ids = latent_ids(h, w, device=latents.device)
    n_img = img.shape[1]
    txt_ids = torch.zeros(prompt.t5.shape[1], 3, device=latents.device)
    if text_ids is not None:
        txt_ids[: text_ids.shape[0]] = text_ids.to(txt_ids)
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=latents.device).reshape(-1).expand(b)
    if guidance is not None:
        guidance = torch.as_tensor(guidance, dtype=torch.float32, device=latents.device).reshape(-1).expand(b)
    residuals = {}
    if controls:
        blocks = (len(dit.double_blocks), len(dit.single_blocks))
        residuals = controlnet_residuals(controls, img, ids, prompt, txt_ids, sigma, guidance, blocks)
    if condition is not None:
        condition = condition.to(img.device, img.dtype)
        if condition.shape[0] not in (1, b):
            condition = condition.repeat(b // condition.shape[0], 1, 1)  # true CFG doubles the batch
        img = torch.cat([img, condition.expand(b, -1, -1)], dim=-1)
    if kontext is not None:
        img = torch.cat([img, kontext.tokens.to(img.dtype).expand(b, -1, -1)], dim=1)
        ids = torch.cat([ids, kontext.ids.to(ids.device)], dim=0)
    txt, masked = prompt.t5, {}
    if eligen is not None:
        txt, mask = joint_inputs(prompt.t5, eligen, img.shape[1])
        txt_ids, masked = torch.zeros(txt.shape[1], 3, device=latents.device), {"attn_mask": mask}
    if ip_adapter is not None:
        masked["ip_adapter"] = ip_adapter
    out = dit(
        img.to(dtype), ids, txt.to(dtype), txt_ids, sigma, prompt.pooled.to(dtype), guidance, **residuals, **masked
    )
    return unpack_latents(out[:, :n_img].float(), h, w)


def controlnet_residuals(
    controls: Sequence[ControlCondition],
    img: torch.Tensor,
    img_ids: torch.Tensor,
    prompt: FluxPromptEmbeds,
    txt_ids: torch.Tensor,
    sigma: torch.Tensor,
    guidance: torch.Tensor | None,
    blocks: tuple[int, int],
) -> dict[str, list[torch.Tensor] | None]:
    """The summed, scaled residuals of `controls` as `Flux1DiT.forward` keyword arguments.

    Nets whose residual lists have the same length are summed sample by sample (diffusers'
    multi-ControlNet); otherwise each list is first spread over the DiT's `blocks` (double, single).
    """
    b = img.shape[0]
    doubles, singles = [], []
    for control in controls:
        net = control.model
        dtype = module_dtype(net)
        tokens = control.tokens.to(img.device, dtype)
        if tokens.shape[0] not in (1, b):
            tokens = tokens.repeat(b // tokens.shape[0], 1, 1)  # true CFG doubles the batch
        text, text_ids, net_guidance = prompt.t5, txt_ids, guidance
        if control.text is not None:  # its own text stream, at text position 0 (InfiniteYou)
            text = control.text.expand(b, -1, -1)
            text_ids = torch.zeros(text.shape[1], 3, device=img.device)
        if control.guidance is not None:
            net_guidance = torch.full((b,), float(control.guidance), device=img.device)
        double, single = net(
            img.to(dtype),
            img_ids,
            text.to(dtype),
            text_ids,
            sigma,
            prompt.pooled.to(dtype),
            net_guidance,
            cond=tokens,
            mode=control.mode,
            scale=control.scale,
        )
        doubles.append(double)
        singles.append(single)
    return {
        "controlnet_block_samples": _sum_residuals(doubles, blocks[0]),
        "controlnet_single_block_samples": _sum_residuals(singles, blocks[1]),
    }


def _sum_residuals(lists: list[list[torch.Tensor]], blocks: int) -> list[torch.Tensor] | None:
    lists = [items for items in lists if items]
    if not lists:
        return None
    if len({len(items) for items in lists}) > 1:
        lists = [residual_per_block(items, blocks, "ControlNet residuals") for items in lists]
    total = list(lists[0])
    for items in lists[1:]:
        total = [a + b for a, b in zip(total, items, strict=True)]
    return total


# ----------------------------------------------------------------------------------------------- pipeline
INFINITEYOU_REPO = "ByteDance/InfiniteYou"  # its face detector folder: `supports/insightface/`


def infinityou_spellings(image, studio_image, guidance, studio_guidance) -> tuple:
    """InfiniteYou's (id image, guidance) from our names or DiffSynth-Studio's `infinityou_*` (one of each)."""
    if image is not None and studio_image is not None:
        raise ConfigError("give infiniteyou_id_image or DiffSynth-Studio's infinityou_id_image, not both")
    if guidance is not None and studio_guidance is not None:
        raise ConfigError("give infiniteyou_guidance or DiffSynth-Studio's infinityou_guidance, not both")
    guidance = studio_guidance if guidance is None else guidance
    return (studio_image if image is None else image), (1.0 if guidance is None else guidance)


class _NotGiven:
    """The default of arguments whose explicit None means "none" (DiffSynth-Studio's), unlike leaving them out."""

    def __repr__(self) -> str:
        return "<not given>"


NOT_GIVEN: Any = _NotGiven()
STUDIO_TOKENIZER_REPO = "black-forest-labs/FLUX.1-dev"  # DiffSynth-Studio's tokenizer_1/2_config repo


def load_flux_tokenizer(pipe: BasePipeline, config: ModelConfig, argument: str):
    """A tokenizer folder loaded with `AutoTokenizer`; a missing folder names the argument it came from."""
    try:
        return BasePipeline._load_tokenizer(pipe, config)
    except DiffSynthError as exc:
        raise type(exc)(f"{argument}: {exc}") from exc


def holds_qwen25vl(config: ModelConfig) -> bool:
    """Whether a config's files hold a Qwen2.5-VL (read from their headers): Step1X-Edit's text encoder."""
    from diffsynth.runtime.checkpoint import checkpoint_label, open_checkpoint
    from diffsynth.runtime.loading import recognise

    try:
        state = open_checkpoint(weight_paths(config))
        found = recognise(state.meta_state_dict(), label=checkpoint_label(state.files))
    except DiffSynthError:  # unreadable or unknown files: the caller's own error says so
        return False
    return any(rec.spec.name == "qwen25vl" for rec in found)


def kontext_resolution(width: int, height: int) -> tuple[int, int]:
    """The (width, height) of `KONTEXT_RESOLUTIONS` whose aspect ratio is nearest `width / height`."""
    return min(KONTEXT_RESOLUTIONS, key=lambda wh: (abs(width / height - wh[0] / wh[1]), wh))


class FluxImagePipeline(BasePipeline):
    """FLUX.1 text-to-image / image-to-image / Kontext editing, API compatible with DiffSynth-Studio."""

    family = "flux"
    model_slots = {
        "dit": "dit",
        "vae": "vae",
        "text_encoder_1": "clip_text_encoder",
        "text_encoder_2": "t5_text_encoder",
        "controlnet": "controlnet",
        "ipadapter": "flux_ip_adapter",
        "ipadapter_image_encoder": "ip_adapter_image_encoder",
        "flux_redux": "flux_redux",
        "flux_redux_image_encoder": "flux_redux_image_encoder",
        "value_controller": "value_controller",
        "lora_encoder": "lora_encoder",
        "lora_fusion": "lora_fusion",
        "nexus_gen": "nexus_gen",
        "nexus_gen_generation_adapter": "nexus_gen_generation_adapter",
        "nexus_gen_editing_adapter": "nexus_gen_editing_adapter",
    }
    optional_slots = (
        "controlnet", "ipadapter", "ipadapter_image_encoder", "flux_redux", "flux_redux_image_encoder",
        "value_controller", "lora_encoder", "lora_fusion", "nexus_gen", "nexus_gen_generation_adapter",
        "nexus_gen_editing_adapter",
    )  # fmt: skip
    slot_specs = {
        "dit": ("flux1_dit",),
        "vae": ("autoencoder_kl",),
        "text_encoder_1": ("clip_text_encoder",),
        "text_encoder_2": ("t5_encoder",),
    }
    size_multiple = 16  # VAE 8x, 2x2 packing

    def __init__(self, device=None, torch_dtype=torch.bfloat16):
        super().__init__(device=device, torch_dtype=torch_dtype)
        self.tokenizer_1 = None  # CLIP
        self.tokenizer_2 = None  # T5
        self._ip_adapter_sources: dict[str, ModelConfig] = {}  # model_configs entries loaded by load_ip_adapter
        self._redux_source: ModelConfig | None = None  # a Redux embedder among model_configs (load_redux)
        self.infiniteyou_projector = None  # InfiniteYou's id resampler (`load_infiniteyou`)
        self.infiniteyou_insightface_root = None
        self.infiniteyou_face_encoder = None  # `flux1.infiniteyou.FaceEncoder`, built at the first face photo
        self.infusenet_ids: list[int] = []  # controlnet_ids of nets loaded from an `InfuseNet*` file or folder
        self.timestep_loras = []  # `flux1.timestep_lora.TimestepLoRA`s attached to the DiT (`load_timestep_lora`)
        self.nexus_gen_processor = None  # `flux1.nexus_gen.NexusGenProcessor` (`load_nexus_gen_processor`)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        model_id_or_configs: str | os.PathLike | Sequence[ModelConfig] | None = None,
        *,
        torch_dtype: torch.dtype | str = torch.bfloat16,
        device: str | torch.device | None = None,
        model_configs: Sequence[ModelConfig] = (),
        tokenizer_config: ModelConfig | None = None,
        tokenizer_1_config: ModelConfig | None = NOT_GIVEN,
        tokenizer_2_config: ModelConfig | None = NOT_GIVEN,
        vram_limit: float | None = None,
        use_usp: bool = False,
        controlnet: str | os.PathLike | ModelConfig | Sequence[str | os.PathLike | ModelConfig] | None = None,
        nexus_gen_processor_config: ModelConfig | None = None,
        step1x_processor_config: ModelConfig | None = None,
        quantize=None,
    ):
        """As `BasePipeline.from_pretrained`, with FLUX.1's two tokenizers.

        `tokenizer_1_config` (CLIP, `tokenizer/`; `tokenizer_config` is accepted for it too) and
        `tokenizer_2_config` (T5, `tokenizer_2/`) default to those folders of the given local folder
        or preset repo; with `model_configs`, to those of black-forest-labs/FLUX.1-dev, as DiffSynth-Studio's
        (only the tokenizer files are fetched). An explicit None loads none (as DiffSynth-Studio).
        `step1x_processor_config` (DiffSynth-Studio's) is refused: Step1X-Edit is `Step1XEditPipeline`.
        `controlnet` loads one or several ControlNets (see `load_controlnet`).
        `nexus_gen_processor_config` (DiffSynth-Studio's name) is Nexus-Gen's processor folder; with its model
        loaded it defaults to `processor/` of DiffSynth-Studio/Nexus-GenV2.
        """
        if step1x_processor_config is not None:
            raise ConfigError(
                "step1x_processor_config is for Step1X-Edit, which loads with "
                "diffsynth.flux.step1x.Step1XEditPipeline.from_pretrained(model_configs=..., processor_config=...)"
            )
        pipe = super().from_pretrained(
            model_id_or_configs,
            torch_dtype=torch_dtype,
            device=device,
            model_configs=model_configs,
            vram_limit=vram_limit,
            use_usp=use_usp,
            controlnet=controlnet,
            quantize=quantize,
        )
        sources, pipe._ip_adapter_sources = pipe._ip_adapter_sources, {}
        redux, pipe._redux_source = pipe._redux_source, None
        if sources and "adapter" not in sources and redux is None:
            raise ConfigError(
                f"model_configs hold an image encoder ({sources['image_encoder']}) but no IP-Adapter file nor "
                "Redux embedder; add the adapter (ip-adapter.bin / ip_adapter.safetensors) or the Redux embedder "
                "(flux1-redux-dev.safetensors), or drop the encoder"
            )
        if tokenizer_1_config is NOT_GIVEN and tokenizer_config is not None:
            tokenizer_1_config = tokenizer_config
        defaults = cls._default_tokenizers(model_id_or_configs, model_configs)
        for attribute, given, default in zip(
            ("tokenizer_1", "tokenizer_2"), (tokenizer_1_config, tokenizer_2_config), defaults, strict=True
        ):
            config = default if given is NOT_GIVEN else given
            if config is not None:
                setattr(pipe, attribute, load_flux_tokenizer(pipe, config, f"{attribute}_config"))
        # an IP-Adapter or Redux among model_configs, as DiffSynth-Studio lists them: loaded once the DiT is
        if "adapter" in sources:
            pipe.load_ip_adapter(sources["adapter"], image_encoder=sources.get("image_encoder"))
        if redux is not None:  # the image encoder listed with it serves it too (the same SigLIP so400m tower)
            pipe.load_redux(redux, image_encoder=sources.get("image_encoder"))
        if pipe.nexus_gen is not None:
            from .flux1.nexus_gen import REPO

            pipe.load_nexus_gen_processor(
                nexus_gen_processor_config or ModelConfig(model_id=REPO, origin_file_pattern="processor/")
            )
        elif nexus_gen_processor_config is not None:
            raise ConfigError(
                "nexus_gen_processor_config was given but no Nexus-Gen model is loaded: add "
                "ModelConfig(model_id='DiffSynth-Studio/Nexus-GenV2', origin_file_pattern='model*.safetensors')"
            )
        return pipe

    @classmethod
    def _default_tokenizers(cls, source, model_configs=()) -> list[ModelConfig | None]:
        """The (CLIP, T5) tokenizer configs a left-out `tokenizer_1/2_config` means: the folder's or preset repo's
        `tokenizer/` and `tokenizer_2/`; for hub `model_configs`, black-forest-labs/FLUX.1-dev's (DiffSynth-Studio's
        defaults: every FLUX.1 model shares these tokenizers); for local files only, the `tokenizer/` and
        `tokenizer_2/` folders beside them (a hub clone's layout), never a download."""
        names = ("tokenizer", "tokenizer_2")
        if not isinstance(source, (str, os.PathLike)):
            configs = [*(source or ()), *model_configs]
            if any(config.model_id is not None for config in configs):
                return [ModelConfig(model_id=STUDIO_TOKENIZER_REPO, origin_file_pattern=f"{n}/") for n in names]
            from .flux1_training.loading import tokenizer_pair  # the trainer's search beside the files

            return list(tokenizer_pair(None, configs))
        if Path(source).is_dir():
            return [ModelConfig(path=str(p)) if p.is_dir() else None for p in (Path(source) / n for n in names)]
        preset = cls._preset(str(source))
        repo = preset.tokenizer.model_id if preset.tokenizer is not None else preset.name
        return [ModelConfig(model_id=repo, origin_file_pattern=f"{n}/") for n in names]

    def controlnet_spec(self):
        """FLUX.1 ControlNets: diffusers `FluxControlNetModel` files (`controlnet=` / `load_controlnet` take a
        `ModelConfig`, a local file or folder with its `config.json`, or a hub repo id such as
        "InstantX/FLUX.1-dev-Controlnet-Union-alpha": its root `diffusion_pytorch_model.safetensors`)."""
        from .flux1.controlnet_formats import FLUX1_CONTROLNET_SPEC

        return FLUX1_CONTROLNET_SPEC

    def describe_controlnet(self, net: Flux1ControlNet) -> str:
        return _describe_net(net)

    def _add_controlnet(self, net, config: ModelConfig | None, slot: str = "controlnet") -> int:
        check_controlnet_fits(net, self.dit, describe_config(config) if config is not None else "the ControlNet")
        index = super()._add_controlnet(net, config, slot)
        if slot == "controlnet" and config is not None and _names_infusenet(config):
            self.infusenet_ids.append(index)
        return index

    def controlnets_changed(self) -> None:
        """Nets listed in `model_configs` before the DiT were not checked as they joined: check them now."""
        for i, net in enumerate(self.controlnets()):
            check_controlnet_fits(net, self.dit, f"ControlNet {i}")

    def infusenet_id(self) -> int:
        """The `controlnet_id` of InfiniteYou's InfuseNet: the first net loaded from a file or folder whose path
        names InfuseNet (the released `InfuseNetModel/`), else ControlNet 0."""
        return self.infusenet_ids[0] if self.infusenet_ids else 0

    def _load_config(self, config: ModelConfig) -> None:
        """ControlNet files among `model_configs` (once their spec is registered) join the `controlnet` slot; an
        IP-Adapter and its image encoder are kept for `from_pretrained` to load once the DiT is there."""
        from .flux1.ip_adapter import source_part
        from .flux1.nexus_gen import is_nexus_gen_file
        from .flux1.redux import is_redux_file

        if is_nexus_gen_file(weight_paths(config)):  # Nexus-Gen's Qwen2.5-VL or a decoder (DiT + adapter)
            self.load_nexus_gen(config)
            return
        if is_redux_file(weight_paths(config)):
            if self._redux_source is not None:
                raise ConfigError(f"model_configs hold two Redux embedders: {self._redux_source}, {config}")
            self._redux_source = config
            return
        from .flux1.value_control import is_value_encoder_file

        if is_value_encoder_file(weight_paths(config)):  # an AttriCtrl encoder: joins those loaded, in order
            self.load_value_controller(config)
            return
        from .flux1.lora_encoder import is_lora_encoder_file
        from .flux1.lora_fusion import is_lora_fusion_file

        if is_lora_encoder_file(weight_paths(config)):  # DiffSynth-Studio's LoRA Encoder, as its example lists it
            self.load_lora_encoder(config)
            return
        if is_lora_fusion_file(weight_paths(config)):  # DiffSynth-Studio's LoRA Fusion (`enable_lora_merger`)
            self.load_lora_fusion(config)
            return
        from .flux1.infiniteyou import is_projector_file

        if is_projector_file(weight_paths(config)):  # InfiniteYou's image_proj_model.bin, as DiffSynth-Studio lists it
            self.load_infiniteyou(config)
            return
        part = source_part(weight_paths(config))
        if part is not None:
            if part in self._ip_adapter_sources:
                raise ConfigError(
                    f"model_configs hold two IP-Adapter {part}s: {self._ip_adapter_sources[part]}, {config}"
                )
            self._ip_adapter_sources[part] = config
            return
        try:
            super()._load_config(config)
        except ConfigError as exc:
            if not holds_qwen25vl(config):
                raise
            raise ConfigError(
                f"{exc}. Qwen2.5-VL is Step1X-Edit's text encoder: load DiffSynth-Studio's Step1X-Edit model_configs "
                "with diffsynth.flux.step1x.Step1XEditPipeline.from_pretrained (or the stepfun-ai/Step1X-Edit preset)"
            ) from None

    def _load_tokenizer(self, config: ModelConfig):
        """The base class finds at most one tokenizer; `from_pretrained` loads FLUX.1's two itself."""
        return None

    def read_lora(self, path, slot: str = "dit"):
        """FLUX.1 DiT LoRAs in BFL, kohya, diffusers/peft and XLabs layouts, merged onto our fused layers
        (`flux1/lora.py`); other slots read the common layouts."""
        from .flux1.dit import Flux1DiT
        from .flux1.lora import read_flux1_lora

        model = getattr(self, slot, None)
        if isinstance(model, Flux1DiT):
            return read_flux1_lora(path, model)
        return super().read_lora(path, slot)

    def apply_lora(self, source, scale: float, fuse: bool, slot: str, name: str | None):
        """As `BasePipeline.apply_lora`; a FLUX.1 control LoRA (FLUX.1-Canny-dev-lora, -Depth-dev-lora) first
        widens the DiT's `img_in` and replaces its QK-norm scales (`flux1/lora.py` `prepare_model`), which only
        a fused load can do: those changes cannot be switched off or scaled like the LoRA's deltas."""
        from .flux1.dit import Flux1DiT
        from .flux1.lora import Flux1LoRAWeights, prepare_model

        model = getattr(self, slot, None)
        if not isinstance(model, Flux1DiT):
            return super().apply_lora(source, scale, fuse, slot, name)
        if _text_encoder_only(source):  # kohya's --network_train_text_encoder_only: nothing for the DiT
            return self._apply_text_encoder_loras(source, scale, fuse, name, required=True)
        lora = self.read_lora(source, slot)
        if isinstance(lora, Flux1LoRAWeights) and lora.changes_model:
            changes = [
                *([f"widens img_in to {lora.in_channels} input features"] if lora.in_channels else []),
                *([f"replaces {len(lora.norm_scales)} QK-norm scales"] if lora.norm_scales else []),
            ]
            what = f"{lora.source} is a control LoRA: it {' and '.join(changes)}"
            if not fuse:
                raise ConfigError(
                    f"{what}, which a hot-swappable load cannot undo; load it with fuse=True (reload the DiT "
                    "to remove it)"
                )
            if self.vram_handles.get(slot) is not None:
                raise ConfigError(
                    f"{what}, which cannot be done to a VRAM-managed DiT; load the LoRA before "
                    "enable_vram_management (or before passing vram_limit / offload settings)"
                )
            prepare_model(model, lora)
        result = super().apply_lora(lora, scale, fuse, slot, name)
        self._apply_text_encoder_loras(source, scale, fuse, None if fuse else result or name)
        return result

    def _apply_text_encoder_loras(
        self, source, scale: float, fuse: bool, name: str | None, required: bool = False
    ) -> str | None:
        """A DiT LoRA file's CLIP-L / T5 entries (`flux1/text_encoder_lora.py`) applied to those encoders, at the
        same scale, fused or kept apart (under the DiT LoRA's name, else the first encoder's) like the DiT's part.
        Returns the name it is kept apart under (None when fused); `required` (a file with nothing else) makes
        a file none of whose encoders is loaded a `ConfigError`."""
        from .flux1.text_encoder_lora import text_encoder_loras

        applied = 0
        for slot, lora in text_encoder_loras(source).items():
            if getattr(self, slot, None) is None:
                logger.warning("%s: no %s loaded; its %d LoRA layers there are left out", lora.source, slot, len(lora))
                continue
            name = super().apply_lora(lora, scale, fuse, slot, name) or name
            applied += 1
            logger.info("%s: applied to %s (%d layers)", lora.source, slot, len(lora))
        if required and not applied:
            raise ConfigError(
                f"LoRA {source if isinstance(source, (str, os.PathLike)) else '<state dict>'} holds only text-encoder "
                "weights, and none of its encoders (text_encoder_1: CLIP-L, text_encoder_2: T5) is loaded"
            )
        return name

    def clear_loras(self, slot: str = "dit") -> None:
        """As `BasePipeline.clear_loras`; for the DiT also the text encoders' unfused LoRAs (a file's CLIP / T5
        part comes with its DiT part)."""
        super().clear_loras(slot)
        if slot == "dit":
            for encoder in ("text_encoder_1", "text_encoder_2"):
                if getattr(self, encoder, None) is not None:
                    super().clear_loras(encoder)

    # ------------------------------------------------------------------ call
    @accepts_tea_cache
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str] | None = None,
        negative_prompt: str | Sequence[str] = "",
        cfg_scale: float | None = None,
        embedded_guidance: float | None = None,
        t5_sequence_length: int | None = None,
        input_image=None,
        denoising_strength: float = 1.0,
        kontext_images=None,
        kontext_auto_resize: bool | None = None,
        controlnet_inputs: Sequence[ControlNetInput] | None = None,
        eligen_entity_prompts: Sequence[str] | None = None,
        eligen_entity_masks: Sequence[Image.Image] | None = None,
        eligen_enable_on_negative: bool = False,
        ipadapter_images: Image.Image | Sequence[Image.Image] | None = None,
        ipadapter_scale: float = 1.0,
        flux_redux_image: Image.Image | Sequence[Image.Image] | None = None,
        flux_redux_scale: float | Sequence[float] = 1.0,
        flux_redux_pooled_scale: float | Sequence[float] = 1.0,
        flux_fill_image=None,
        flux_fill_mask=None,
        control_image=None,
        flex_inpaint_image=None,
        flex_inpaint_mask=None,
        flex_control_image=None,
        flex_control_strength: float = DEFAULT_CONTROL_STRENGTH,
        flex_control_stop: float = DEFAULT_CONTROL_STOP,
        infiniteyou_id_image=None,
        infiniteyou_id_embedding: torch.Tensor | None = None,
        infiniteyou_guidance: float | None = None,
        infinityou_id_image=None,
        infinityou_guidance: float | None = None,
        value_controller_inputs: float | Sequence[float] | None = None,
        lora_encoder_inputs=None,
        lora_encoder_scale: float = 1.0,
        insert_anything_source_image: Image.Image | None = None,
        insert_anything_source_mask: Image.Image | None = None,
        insert_anything_ref_image: Image.Image | None = None,
        insert_anything_ref_mask: Image.Image | None = None,
        nexus_gen_reference_image: Image.Image | None = None,
        height: int | None = None,
        width: int | None = None,
        seed: int | None = None,
        rand_device: str = "cpu",
        num_inference_steps: int | None = None,
        sigma_shift: float | None = None,
        sigmas: Sequence[float] | torch.Tensor | None = None,
        sampler: str | None = None,
        latents: torch.Tensor | None = None,
        tiled: bool = False,
        tile_size: int = 512,
        tile_stride: int = 384,
        output_type: str = "pil",
        progress_bar: bool = True,
        tea_cache_l1_thresh: float | None = None,
    ):
        """Generate images: a PIL image for one prompt, a list for a list of prompts; "np"/"pt" give the batch.

        `embedded_guidance` is the distilled guidance the DiT is conditioned on (dev: 3.5);
        `cfg_scale` > 1 adds true classifier-free guidance with `negative_prompt` (twice the compute).
        `sigma_shift` replaces the resolution-dependent FLUX.1 shift by a fixed one (a DiT without guidance
        embedding, schnell, samples unshifted, as BFL's); `denoising_strength` needs `input_image`. `kontext_images`
        (one image or a list; Kontext-dev) are used at their own size rounded down to multiples of 16, or with
        `kontext_auto_resize` (the Kontext preset's default) at the training resolution nearest their aspect;
        without `height`/`width` the output takes the first one's size. `latents` is the initial
        noise `[B, 16, H/8, W/8]`; `sigmas` an explicit schedule (terminal 0 appended); `sampler` "euler"
        (default) or "unipc" (`diffsynth.runtime.schedulers.UniPCScheduler`).
        `controlnet_inputs` are `ControlNetInput`s for the loaded ControlNets (several at once).
        `eligen_entity_prompts` / `eligen_entity_masks` (one PIL mask each, white = entity) are EliGen's
        regional prompts; `eligen_enable_on_negative` gives the CFG branch the same regions, each with
        the negative prompt (see `flux1/eligen.py`).
        `ipadapter_images` (one or several reference images) condition the loaded IP-Adapter
        (`load_ip_adapter`), its attention output times `ipadapter_scale`.
        `flux_redux_image` (one or several images) appends the loaded Redux embedder's tokens (`load_redux`) to the
        positive prompt's T5 states; `flux_redux_scale` / `flux_redux_pooled_scale` (one number or one per image)
        are diffusers' `prompt_embeds_scale` / `pooled_prompt_embeds_scale`: they weight the prompt's T5 states
        with the image tokens, and its CLIP vector, per image, and the images are summed (see `flux1/redux.py`).
        `flux_fill_image` + `flux_fill_mask` (a FLUX.1 Fill DiT; DiffSynth-Studio's names; white = repaint,
        binarised at 0.5) repaint the masked part of the image; `control_image` (a Canny/Depth DiT, or FLUX.1-dev
        with their control LoRA) is the canny or depth map to follow. One image (and mask) or one per prompt;
        resized to the output size, which they give when `height`/`width` are not passed (rounded down to
        multiples of 16). FLUX.1 Fill defaults to embedded guidance 30 and 50 steps.
        Flex.2 (`flux1/flex.py`, DiffSynth-Studio's arguments): `flex_inpaint_image` + `flex_inpaint_mask` (white =
        repaint) and/or `flex_control_image`, weighted by `flex_control_strength` and followed for the first
        `flex_control_stop` of the steps; all optional.
        InfiniteYou (`load_infiniteyou` and the InfuseNet ControlNet): the face in `infiniteyou_id_image` (needs
        the `diffsynth-flux[infiniteyou]` extra, see `flux1/infiniteyou.py`), or its ArcFace embedding
        `infiniteyou_id_embedding` `[512]`, becomes InfuseNet's text tokens, with InfuseNet guided at
        `infiniteyou_guidance` (default 1); its control image (`controlnet_inputs`) defaults to a black one (no
        pose), and with true CFG the negative branch runs without InfuseNet, as the authors'. InfuseNet is the net
        loaded from a path naming it (`infusenet_id`); other ControlNets keep the prompt and `embedded_guidance`
        on both branches. DiffSynth-Studio's spellings `infinityou_id_image` / `infinityou_guidance` are accepted too.
        AttriCtrl (`load_value_controller`; DiffSynth-Studio's name): `value_controller_inputs`, one number in
        [0, 1] per loaded attribute encoder, appends its tokens to both prompts' T5 states (`flux1/value_control.py`).
        LoRA Encoder (`load_lora_encoder`; DiffSynth-Studio's names): `lora_encoder_inputs`, one LoRA or a list (a
        file, `ModelConfig`, hub name or state dict; usually the LoRA also loaded into the DiT), appends one token
        per LoRA, times `lora_encoder_scale`, to the positive prompt's T5 states, so the LoRA acts without its
        trigger words (`flux1/lora_encoder.py`); `lora_encoder_scale=0` appends nothing (the call without them).
        `tea_cache_l1_thresh` turns on TeaCache for this call (DiffSynth-Studio's argument; see
        `enable_tea_cache`).
        Insert Anything (a Fill DiT with the authors' LoRA and `load_redux`; DiffSynth-Studio's names, see
        `flux1/insert_anything.py`): `insert_anything_source_image` / `_source_mask` (where the object goes, white)
        and `insert_anything_ref_image` / `_ref_mask` (the object, white) give the Fill diptych, its mask and the
        Redux image (after zero text states: no prompt, no true CFG); the result is that diptych's right half
        pasted back into the source image. `height` sets the diptych's side (the authors' 768), `width` is twice it.
        Nexus-Gen (its model and a decoder among model_configs, or the DiffSynth-Studio/Nexus-GenV2 presets): every
        prompt goes through its Qwen2.5-VL; `nexus_gen_reference_image` (DiffSynth-Studio's name) is the image to
        edit (the editing decoder, `edit_decoder.bin`); without it the generation decoder draws from the prompt.
        """
        insert = self.check_insert_anything(
            (insert_anything_source_image, insert_anything_source_mask, insert_anything_ref_image,
             insert_anything_ref_mask),
            prompt=prompt, cfg_scale=cfg_scale, height=height, width=width, flux_fill_image=flux_fill_image,
            flux_fill_mask=flux_fill_mask, flux_redux_image=flux_redux_image, kontext_images=kontext_images,
            input_image=input_image,
        )  # fmt: skip
        if insert is not None:
            flux_fill_image, flux_fill_mask, flux_redux_image = insert.fill_image, insert.fill_mask, insert.redux_image
            height, width = insert.height, insert.width
        prompts, negatives = ([""], [""]) if insert is not None else self.check_prompt_pair(prompt, negative_prompt)
        entity_prompts, entity_masks = check_entity_inputs(eligen_entity_prompts, eligen_entity_masks)
        if not isinstance(eligen_enable_on_negative, bool):
            raise ConfigError(f"eligen_enable_on_negative={eligen_enable_on_negative!r} must be True or False")
        ip_images = self.check_ip_adapter_inputs(ipadapter_images, ipadapter_scale)
        nexus_reference = self.check_nexus_gen_inputs(nexus_gen_reference_image, entity_prompts, insert is not None)
        redux_inputs = self.check_redux_inputs(flux_redux_image, flux_redux_scale, flux_redux_pooled_scale)
        channel_inputs = self.check_channel_inputs(flux_fill_image, flux_fill_mask, control_image, kontext_images)
        flex = check_flex_inputs(
            self.dit, flex_inpaint_image, flex_inpaint_mask, flex_control_image, flex_control_strength,
            flex_control_stop, kontext_images,
        )  # fmt: skip
        cfg_scale = finite_number(self.setting("cfg_scale", cfg_scale, 1.0), "cfg_scale")
        fill = channel_inputs is not None and channel_inputs[0] == FILL
        guidance = self.setting("embedded_guidance", embedded_guidance, FILL_GUIDANCE if fill else DEFAULT_GUIDANCE)
        guidance = check_guidance(guidance)
        if input_image is None and denoising_strength != 1.0:
            raise ConfigError(
                f"denoising_strength={denoising_strength!r} is how far image-to-image moves from input_image: give "
                "input_image, or leave denoising_strength at 1"
            )
        text_len = self.setting("t5_sequence_length", t5_sequence_length, T5_SEQUENCE_LENGTH)
        if isinstance(text_len, bool) or not isinstance(text_len, int) or text_len < 1:
            raise ConfigError(f"t5_sequence_length={text_len!r} is not accepted; use an integer >= 1 (512 for dev)")
        steps = self.setting("num_inference_steps", num_inference_steps, FILL_STEPS if fill else DEFAULT_STEPS)
        auto_resize = bool(self.setting("kontext_auto_resize", kontext_auto_resize, False))
        references = self.load_kontext_images(kontext_images, auto_resize)
        if references:
            height = height if height is not None else references[0].height
            width = width if width is not None else references[0].width
        first = channel_inputs[1][0] if channel_inputs is not None else flex.first_image() if flex else None
        if first is not None:
            height = height if height is not None else first.height // 16 * 16
            width = width if width is not None else first.width // 16 * 16
        height, width = self.check_size(self.setting("height", height, 1024), self.setting("width", width, 1024))
        if output_type not in ("pil", "np", "pt"):
            raise ConfigError(f"output_type={output_type!r} is not accepted; use 'pil', 'np' or 'pt'")
        use_cfg = cfg_scale != 1.0

        # 1. prompts
        self.load_models_to_device(["text_encoder_1", "text_encoder_2"] if insert is None else [])
        text = self.encode_prompt(prompts, text_len) if insert is None else self.insert_anything_text(text_len)
        negative_text = self.encode_prompt(negatives, text_len) if use_cfg else None
        text, text_ids = self.prepare_nexus_gen(prompts, nexus_reference, text, height, width)
        text = self.prepare_redux(text, *redux_inputs)
        text, negative_text = self.prepare_value_control(value_controller_inputs, text, negative_text)
        text = self.prepare_lora_encoding(lora_encoder_inputs, lora_encoder_scale, text)
        entities = self.prepare_eligen(
            entity_prompts, entity_masks, negative_text, eligen_enable_on_negative, height, width, text_len
        )
        ip_kv = self.prepare_ip_adapter(ip_images, ipadapter_scale, use_cfg)

        # 2. schedule, latents and reference tokens
        scheduler = make_scheduler("flux1", str(self.setting("sampler", sampler, "euler")))
        shift = self.setting("sigma_shift", sigma_shift, None)
        shape = {"image_seq_len": (height // 16) * (width // 16)}
        if shift is not None:
            if not finite_number(shift, "sigma_shift") > 0:
                raise ConfigError(f"sigma_shift={shift!r} is not accepted; use a number > 0 (or None for FLUX.1's)")
            shape = {"mu": math.log(shift)}  # e^mu / (e^mu + 1/t - 1) is the static shift by e^mu
        elif not self.dit.config.guidance_embed:  # schnell: BFL and diffusers sample it unshifted
            shape = {"mu": 0.0}
        scheduler.set_timesteps(steps, denoising_strength=denoising_strength, sigmas=sigmas, **shape)
        id_image, id_guidance = infinityou_spellings(
            infiniteyou_id_image, infinityou_id_image, infiniteyou_guidance, infinityou_guidance
        )
        identity = self.prepare_infiniteyou(id_image, infiniteyou_id_embedding, id_guidance)
        infusenet = self.infusenet_id() if identity is not None else None
        given = _as_list(controlnet_inputs) if controlnet_inputs else []
        if identity is not None and not any(getattr(c, "controlnet_id", None) == infusenet for c in given):
            # the authors' default for InfuseNet: a black control image
            controlnet_inputs = [
                *given,
                ControlNetInput(image=Image.new("RGB", (width, height)), controlnet_id=infusenet),
            ]
        uses_vae = input_image is not None or references or controlnet_inputs or channel_inputs is not None
        uses_vae = uses_vae or (flex is not None and flex.first_image() is not None)
        self.load_models_to_device(["vae"] if uses_vae else [])
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
        kontext = self.encode_kontext(references, tiled, tile_size, tile_stride) if references else None
        controls = self.prepare_controls(controlnet_inputs, height, width, tiled, tile_size, tile_stride)
        if identity is not None:  # InfuseNet alone reads the id tokens at its own guidance; other nets the prompt
            net = self.controlnets()[infusenet]
            controls = [
                replace(c, text=identity, guidance=float(id_guidance)) if c.model is net else c for c in controls
            ]
        condition = None
        if channel_inputs is not None:
            condition = self.encode_channel_condition(
                channel_inputs, len(prompts), height, width, tiled, tile_size, tile_stride
            )
        if flex is not None:
            flex = encode_flex(self, flex, x, len(scheduler.timesteps), tiled, tile_size, tile_stride)

        # 3. denoise
        self.load_models_to_device(["dit", "controlnet"] if controls else ["dit"])
        steps = len(scheduler.timesteps)
        for i in self.progress(range(steps), progress_bar):
            active = [c for c in controls if c.active(i, steps)]
            velocity = self.predict(
                x,
                scheduler.sigmas[i],
                text,
                negative_text,
                cfg_scale,
                guidance,
                kontext,
                active,
                entities,
                ip_kv,
                condition if flex is None else flex.at(i),
                text_ids=text_ids,
            )
            x = scheduler.step(velocity, i, x)

        # 4. decode
        self.load_models_to_device(["vae"])
        images = self.vae.decode(
            x.to(module_dtype(self.vae)), tiled=tiled, tile_size=tile_size, tile_stride=tile_stride
        )
        self.load_models_to_device([])
        if insert is not None:
            return insert_anything_output(images.float(), insert, output_type)
        out = tensor_to_output(images.float(), output_type)
        return out[0] if isinstance(prompt, str) and output_type == "pil" else out

    # ------------------------------------------------------------------ checks
    def check_size(self, height, width) -> tuple[int, int]:
        """FLUX.1 needs multiples of 16 (8x VAE, 2x2 packing): other sizes are refused, naming what fits."""
        m = self.size_multiple
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < m:
                raise ConfigError(f"{name}={value!r} is not accepted: use an integer multiple of {m}, at least {m}")
            if value % m:
                lower, upper = max(m, value // m * m), (value // m + 1) * m
                raise ConfigError(f"{name}={value} is not a multiple of {m}; use {lower} or {upper}")
        return height, width

    # ------------------------------------------------------------------ stages
    def encode_prompt(self, prompts: list[str], t5_sequence_length: int = T5_SEQUENCE_LENGTH) -> FluxPromptEmbeds:
        missing = [
            n
            for n, t in (
                ("tokenizer_1_config (tokenizer/)", self.tokenizer_1),
                ("tokenizer_2_config (tokenizer_2/)", self.tokenizer_2),
            )
            if t is None
        ]
        if missing:
            raise ConfigError(
                f"FluxImagePipeline has no tokenizer for {missing}: pass ModelConfig(..., 'tokenizer/') etc."
            )
        return encode_prompts(
            self.text_encoder_1,
            self.tokenizer_1,
            self.text_encoder_2,
            self.tokenizer_2,
            prompts,
            t5_sequence_length,
            device=self.device,
        )

    def prepare_latents(
        self, batch, height, width, seed, rand_device, latents, input_image, scheduler, tiled, tile_size, tile_stride
    ) -> torch.Tensor:
        shape = (batch, self.vae.config.latent_channels, height // 8, width // 8)
        noise = (
            self.check_latents(latents, shape) if latents is not None else self.generate_noise(shape, seed, rand_device)
        )
        if input_image is None:
            return noise
        images = input_image if isinstance(input_image, (list, tuple)) else [input_image]
        images = [load_image(im).resize((width, height), Image.LANCZOS) for im in images]
        if len(images) not in (1, batch):
            raise ConfigError(f"input_image has {len(images)} images for {batch} prompts; give one or one per prompt")
        clean = self.vae_encode(images, tiled, tile_size, tile_stride)
        if clean.shape[0] == 1 and batch > 1:
            clean = clean.expand(batch, -1, -1, -1)
        return scheduler.add_noise(clean, noise, scheduler.sigmas[0])

    def vae_encode(self, images: list[Image.Image], tiled=False, tile_size=512, tile_stride=384) -> torch.Tensor:
        pixels = pil_to_tensor(images, dtype=module_dtype(self.vae), device=self.device)
        return self.vae.encode(pixels, tiled=tiled, tile_size=tile_size, tile_stride=tile_stride).float()

    def load_kontext_images(self, kontext_images, auto_resize: bool = False) -> list[Image.Image]:
        """Reference images as RGB, each resized down to the nearest multiple of 16 (as diffusers does), or
        with `auto_resize` to the Kontext training resolution nearest its aspect ratio (`kontext_resolution`)."""
        if kontext_images is None:
            return []
        items = list(kontext_images) if isinstance(kontext_images, (list, tuple)) else [kontext_images]
        images = []
        for i, item in enumerate(items):
            image = load_image(item)
            if auto_resize:
                images.append(image.resize(kontext_resolution(image.width, image.height), Image.LANCZOS))
                continue
            w, h = image.width // 16 * 16, image.height // 16 * 16
            if w < 16 or h < 16:
                raise ConfigError(
                    f"kontext_images[{i}] is {image.width}x{image.height}; it needs at least 16x16 pixels"
                )
            images.append(image if (w, h) == image.size else image.resize((w, h), Image.LANCZOS))
        return images

    def encode_kontext(self, images: list[Image.Image], tiled=False, tile_size=512, tile_stride=384) -> KontextLatents:
        """Every reference image VAE-encoded (posterior mean), packed, with ids (1, row, col)."""
        tokens, ids = [], []
        for image in images:
            z = self.vae_encode([image], tiled, tile_size, tile_stride)
            tokens.append(pack_latents(z))
            ids.append(latent_ids(z.shape[2], z.shape[3], index=1.0, device=self.device))
        return KontextLatents(torch.cat(tokens, dim=1), torch.cat(ids, dim=0))

    def predict(
        self,
        x,
        sigma,
        text,
        negative_text,
        cfg_scale,
        guidance,
        kontext=None,
        controls=(),
        entities=(None, None),
        ip_adapter=(None, None),
        condition=None,
        text_ids=None,
    ) -> torch.Tensor:
        """One denoiser evaluation; with true CFG the two branches run as one batch (the ControlNets
        see each branch's own prompt), or one after the other when only one branch has EliGen
        `entities` (positive, negative). `ip_adapter` holds each branch's IP-Adapter keys/values;
        `condition` the Fill / Canny / Depth tokens both branches see; `text_ids` the positive text's
        position ids (Nexus-Gen editing; zeros otherwise)."""
        eligen, negative_eligen = entities
        ip, negative_ip = ip_adapter
        batch = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        if negative_text is None:
            return flux_velocity(
                self.dit, x, sigma.expand(batch), text, guidance, kontext, controls, eligen, ip, condition, text_ids
            )
        # text lengths differ (EliGen, Redux tokens), only one branch has IP keys, or InfuseNet (a control with
        # its own text) steers the positive branch alone (InfiniteYou's authors)
        lengths_differ = text.t5.shape[1] != negative_text.t5.shape[1]
        negative_controls = [c for c in controls if c.text is None]
        one_sided = (eligen is None) != (negative_eligen is None) or (ip is None) != (negative_ip is None)
        one_sided = one_sided or text_ids is not None
        if lengths_differ or one_sided or len(negative_controls) != len(controls):
            positive = flux_velocity(
                self.dit, x, sigma.expand(batch), text, guidance, kontext, controls, eligen, ip, condition, text_ids
            )
            negative = flux_velocity(
                self.dit,
                x,
                sigma.expand(batch),
                negative_text,
                guidance,
                kontext,
                negative_controls,
                negative_eligen,
                negative_ip,
                condition=condition,
            )
            return self.guide(positive, negative, cfg_scale)
        if eligen is not None:
            eligen = eligen.cat(negative_eligen, text.batch, negative_text.batch)
        if ip is not None:
            ip = ip.cat(negative_ip, batch, batch)
        both = flux_velocity(
            self.dit,
            torch.cat([x, x]),
            sigma.expand(2 * batch),
            text.cat(negative_text),
            guidance,
            kontext,
            controls,
            eligen,
            ip,
            condition=condition,
        )
        return self.guide(both[:batch], both[batch:], cfg_scale)

    # ------------------------------------------------------------------ FLUX.1 Fill, Canny / Depth
    def cli_options(self, options: dict) -> dict:
        """The `diffsynth generate` inputs under this pipeline's names, by the DiT's kind: `--edit-image` is
        Kontext's `kontext_images` (with Nexus-Gen loaded, its `nexus_gen_reference_image`); `--input-image` + `--inpaint-mask` are a Fill DiT's `flux_fill_*` or Flex.2's
        `flex_inpaint_*`; `--control-image MAP[:STRENGTH]` (no `--controlnet`) is Flex.2's `flex_control_image`."""
        from diffsynth.runtime.cli import path_and_scale

        options = dict(options)
        kind = condition_kind(self.dit.config) if self.dit is not None else None
        if "edit_image" in options and self.nexus_gen is not None:  # Nexus-Gen edits one image
            images = _as_list(options.pop("edit_image"))
            if len(images) != 1:
                raise ConfigError(f"--edit-image was given {len(images)} times; Nexus-Gen edits one image")
            options["nexus_gen_reference_image"] = images[0]
        if "edit_image" in options:
            options["kontext_images"] = options.pop("edit_image")
        if "inpaint_mask" in options and kind in (FILL, FLEX):
            if "input_image" not in options:
                raise ConfigError("--inpaint-mask says which part of --input-image to repaint: give --input-image too")
            prefix = "flux_fill" if kind == FILL else "flex_inpaint"
            options[f"{prefix}_mask"] = options.pop("inpaint_mask")
            options[f"{prefix}_image"] = options.pop("input_image")
        if "control_image" in options and kind == FLEX:
            image, strength = path_and_scale(options.pop("control_image"), DEFAULT_CONTROL_STRENGTH)
            options.update(flex_control_image=image, flex_control_strength=strength)
        return options

    def check_channel_inputs(self, fill_image, fill_mask, control_image, kontext_images):
        """(kind, images, masks) for the DiT's wider input (`flux1/channels.py`), or None for a plain DiT; the
        inputs must be the ones the DiT takes, each one image or a list (one per prompt)."""
        kind = condition_kind(self.dit.config) if self.dit is not None else None
        what = describe_widths(self.dit.config) if self.dit is not None else "no DiT"
        if fill_mask is not None and fill_image is None:
            raise ConfigError("flux_fill_mask needs flux_fill_image: the mask says which part of that image to repaint")
        if fill_image is not None and fill_mask is None:
            raise ConfigError(
                "flux_fill_image needs flux_fill_mask (white = repaint); to outpaint, pad the image and give a mask "
                "that is white over the padding"
            )
        if fill_image is not None and control_image is not None:
            raise ConfigError("flux_fill_image and control_image go to different DiTs (Fill, Canny/Depth); give one")
        if fill_image is not None and kind != FILL:
            raise ConfigError(
                f"flux_fill_image / flux_fill_mask need a FLUX.1 Fill DiT (in_channels 384, e.g. "
                f"black-forest-labs/FLUX.1-Fill-dev); this is {what}"
            )
        if control_image is not None and kind != CONTROL:
            raise ConfigError(
                f"control_image needs a FLUX.1 Canny/Depth DiT (in_channels 128: black-forest-labs/FLUX.1-Canny-dev, "
                f"-Depth-dev, or FLUX.1-dev with pipe.load_lora(<FLUX.1-Canny-dev-lora / -Depth-dev-lora file>)); "
                f"this is {what}. ControlNets take their images through controlnet_inputs"
            )
        if kind == "unknown":
            raise ConfigError(f"this is {what}: its input is neither FLUX.1's, Fill's, Canny/Depth's nor Flex.2's")
        if kind == FLEX:
            return None  # Flex.2's inputs are its own (`flux1/flex.py`)
        if kind == FILL and fill_image is None:
            raise ConfigError(
                f"this is {what}: give flux_fill_image and flux_fill_mask (white = repaint) to inpaint or outpaint"
            )
        if kind == CONTROL and control_image is None:
            raise ConfigError(f"this is {what}: give control_image (the canny edges or depth map to follow)")
        if kind is None:
            return None
        if kontext_images is not None:
            raise ConfigError(f"kontext_images are not taken by {what}; they need FLUX.1-Kontext-dev")
        if kind == FILL:
            images = [load_image(im) for im in _as_list(fill_image)]
            masks = [
                _load_mask(m, "flux_fill_mask" if len(_as_list(fill_mask)) == 1 else f"flux_fill_mask[{i}]")
                for i, m in enumerate(_as_list(fill_mask))
            ]
            return kind, images, masks
        return kind, [load_image(im) for im in _as_list(control_image)], []

    def encode_channel_condition(
        self, channel_inputs, batch: int, height: int, width: int, tiled=False, tile_size=512, tile_stride=384
    ) -> torch.Tensor:
        """The condition tokens `[1 or B, L, C]` concatenated to the noisy ones: Fill's masked image latents
        (repainted pixels set to 0 in [-1, 1]) and folded mask (binarised at 0.5), or the control map's latents;
        images and masks resized to the output size (Lanczos) and VAE-encoded (posterior mean)."""
        kind, images, masks = channel_inputs
        name = "flux_fill_image" if kind == FILL else "control_image"
        for label, items in ((name, images), ("flux_fill_mask", masks)):
            if len(items) not in (0, 1, batch):
                raise ConfigError(f"{label} has {len(items)} images for {batch} prompts; give one or one per prompt")
        images = [im.resize((width, height), Image.LANCZOS) for im in images]
        pixels = pil_to_tensor(images, dtype=module_dtype(self.vae), device=self.device)
        if kind != FILL:
            return pack_latents(self._encode_pixels(pixels, tiled, tile_size, tile_stride))
        repaint = torch.stack([_binary_mask(m, width, height) for m in masks])[:, None].to(self.device)
        if repaint.shape[0] != pixels.shape[0]:  # one image and several masks, or the other way round
            pixels = pixels.expand(repaint.shape[0], -1, -1, -1) if pixels.shape[0] == 1 else pixels
            repaint = repaint.expand(pixels.shape[0], -1, -1, -1)
        masked = pixels * (1 - repaint.to(pixels.dtype))
        latents = self._encode_pixels(masked, tiled, tile_size, tile_stride)
        return torch.cat([pack_latents(latents), fold_mask(repaint.float())], dim=-1)

    def _encode_pixels(self, pixels: torch.Tensor, tiled, tile_size, tile_stride) -> torch.Tensor:
        return self.vae.encode(pixels, tiled=tiled, tile_size=tile_size, tile_stride=tile_stride).float()

    # ------------------------------------------------------------------ EliGen
    def prepare_eligen(
        self, prompts, masks, negative_text, on_negative: bool, height: int, width: int, text_len: int
    ) -> tuple[EliGenEntities | None, EliGenEntities | None]:
        """Entity prompts T5-encoded at `text_len` (their CLIP vectors are not used) and masks reduced to token
        regions, for the positive branch and, with `on_negative` and true CFG, the negative prompt in every region.
        Tokens appended to a prompt's T5 states (Redux, AttriCtrl, LoRA Encoder) stay in its global segment only."""
        if not prompts:
            return None, None
        regions = entity_regions(masks, height, width).to(self.device)
        for i in torch.nonzero(~regions.any(dim=1)).flatten().tolist():
            logger.warning(
                "eligen_entity_masks[%d] covers no latent token at %dx%d; it has no effect", i, width, height
            )
        states = self.encode_prompt(list(prompts), text_len).t5
        positive = EliGenEntities(states[None], regions[None])
        if not on_negative or negative_text is None:
            return positive, None
        n = len(prompts)
        negative = negative_text.t5[:, None, :text_len]  # without appended tokens, like the entity prompts
        return positive, EliGenEntities(negative.expand(-1, n, -1, -1), regions[None])

    # ------------------------------------------------------------------ IP-Adapter
    def load_ip_adapter(
        self,
        ip_adapter: str | os.PathLike | ModelConfig,
        image_encoder: str | os.PathLike | ModelConfig | None = None,
    ) -> None:
        """Load a FLUX.1 IP-Adapter and its image encoder (see `flux1/ip_adapter.py`).

        `ip_adapter` is a `ModelConfig`, a local file or folder, or a known hub repo id
        (`IP_ADAPTER_REPOS`: InstantX's `ip-adapter.bin`, XLabs' `ip_adapter.safetensors`). The format
        is told from the keys. `image_encoder` (SigLIP for InstantX, CLIP ViT-L/14 with projection for
        XLabs; a folder with its `config.json`, a file, a repo id or a `ModelConfig`) defaults to the
        one the adapter was trained with. Both load in the pipeline's dtype, placed like the other models.
        """
        from .flux1.ip_adapter import XLABS, check_fits, load_image_encoder, load_ip_adapter_model

        config = _ip_adapter_config(ip_adapter)
        double = self.dit.config.depth if self.dit is not None else None
        adapter = load_ip_adapter_model(weight_paths(config), self.torch_dtype, double_blocks=double)
        if self.dit is not None:
            check_fits(adapter, self.dit)
        fmt = adapter.config.format
        encoder_config = _image_encoder_config(image_encoder if image_encoder is not None else IP_ADAPTER_ENCODERS[fmt])
        encoder = load_image_encoder(weight_paths(encoder_config), self.torch_dtype)
        wanted = "clip" if fmt == XLABS else "siglip"
        if encoder.kind != wanted:
            raise ConfigError(
                f"image_encoder is a {encoder.kind} vision model; the {fmt} IP-Adapter was trained with {wanted}"
            )
        width = encoder.config.projection_dim if wanted == "clip" else encoder.config.hidden_size
        if width != adapter.config.image_embed_dim:
            raise ConfigError(
                f"image_encoder gives {width}-wide image embeddings; the IP-Adapter takes {adapter.config.image_embed_dim}"
            )
        self.ipadapter = adapter.eval().requires_grad_(False)
        self.ipadapter_image_encoder = encoder.eval().requires_grad_(False)
        self.model_configs["ipadapter"], self.model_configs["ipadapter_image_encoder"] = config, encoder_config
        logger.info(
            "IP-Adapter (%s, %d tokens per image, %d double + %d single block layers)",
            fmt,
            adapter.config.num_tokens,
            adapter.config.double_blocks,
            adapter.config.single_blocks,
        )
        if self.vram_handles:
            self.enable_vram_management(slots=["ipadapter", "ipadapter_image_encoder"])
        elif not self.model_offload:
            self.ipadapter.to(self.device)
            self.ipadapter_image_encoder.to(self.device)

    def check_ip_adapter_inputs(self, images, scale) -> list[Image.Image]:
        """`ipadapter_images` as a list of RGB images (empty for none); refused without a loaded adapter."""
        if images is None:
            return []
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        if not items:
            return []
        if self.ipadapter is None or self.ipadapter_image_encoder is None:
            raise ConfigError(
                "ipadapter_images were given but no IP-Adapter is loaded: use "
                "pipe.load_ip_adapter('InstantX/FLUX.1-dev-IP-Adapter') (or a local file / ModelConfig)"
            )
        finite_number(scale, "ipadapter_scale")  # NaN / inf would turn every image token, so the image, to NaN
        return [load_image(item) for item in items]

    def prepare_ip_adapter(
        self, images: list[Image.Image], scale: float, use_cfg: bool
    ) -> tuple[IPAdapterKV | None, IPAdapterKV | None]:
        """Image embeddings -> per-block IP keys/values, for the positive branch and (true CFG) the
        negative one: zero embeddings for InstantX (as DiffSynth-Studio), a black image for XLabs (as
        diffusers), both at `scale` (DiffSynth-Studio gives its negative branch scale 1)."""
        from .flux1.ip_adapter import XLABS, check_fits, preprocess

        if not images:
            return None, None
        adapter, encoder = self.ipadapter, self.ipadapter_image_encoder
        check_fits(adapter, self.dit)
        self.load_models_to_device(["ipadapter_image_encoder", "ipadapter"])
        size = encoder.config.image_size
        dtype = module_dtype(encoder)
        embeds = encoder.image_embeds(preprocess(images, encoder.kind, size).to(self.device, dtype))
        heads = self.dit.config.num_heads
        positive = adapter(embeds, heads, scale)
        if not use_cfg:
            return positive, None
        if adapter.config.format == XLABS:
            black = [Image.new("RGB", (size, size))] * len(images)
            negative_embeds = encoder.image_embeds(preprocess(black, encoder.kind, size).to(self.device, dtype))
        else:
            negative_embeds = torch.zeros_like(embeds)
        return positive, adapter(negative_embeds, heads, scale)

    # ------------------------------------------------------------------ InfiniteYou
    def load_infiniteyou(
        self,
        projector: str | os.PathLike | ModelConfig,
        insightface_root: str | os.PathLike | ModelConfig | None = None,
    ) -> None:
        """Load InfiniteYou's image projector (`image_proj_model.bin`; a file, folder or `ModelConfig`). Its
        InfuseNet is a ControlNet: load it with `load_controlnet`. `insightface_root` is the folder holding
        `models/antelopev2/` for `infiniteyou_id_image` (default: `supports/insightface/` of ByteDance/InfiniteYou,
        fetched at the first face photo, where DiffSynth-Studio's example puts it)."""
        from .flux1.infiniteyou import load_projector

        config = projector if isinstance(projector, ModelConfig) else ModelConfig(path=str(projector))
        self.infiniteyou_projector = load_projector(weight_paths(config), self.torch_dtype).eval().requires_grad_(False)
        self.infiniteyou_projector.to(self.device)
        if insightface_root is None:
            insightface_root = ModelConfig(model_id=INFINITEYOU_REPO, origin_file_pattern="supports/insightface/")
        self.infiniteyou_insightface_root = insightface_root
        self.infiniteyou_face_encoder = None

    def prepare_infiniteyou(self, image, embedding, guidance) -> torch.Tensor | None:
        """InfuseNet's text tokens `[1, 8, 4096]` for the face (photo or embedding), or None without one."""
        from .flux1.infiniteyou import FaceEncoder, check_embedding, face_libraries

        if image is None and embedding is None:
            return None
        if image is not None and embedding is not None:
            raise ConfigError("give infiniteyou_id_image or infiniteyou_id_embedding, not both")
        finite_number(guidance, "infiniteyou_guidance")
        projector = self.infiniteyou_projector
        if projector is None:
            raise ConfigError(
                "infiniteyou_id_* needs InfiniteYou's image projector: pipe.load_infiniteyou(<image_proj_model.bin>), "
                "or the ByteDance/InfiniteYou preset"
            )
        nets = self.controlnets()
        if not nets:
            raise ConfigError("infiniteyou_id_* steers the InfuseNet ControlNet: load it (pipe.load_controlnet(...))")
        net = nets[self.infusenet_id()]
        if getattr(net, "config", projector.config).context_in_dim != projector.config.output_dim:
            raise ConfigError(
                f"InfiniteYou's projector makes {projector.config.output_dim}-wide id tokens but a loaded "
                f"ControlNet reads {net.config.context_in_dim}-wide text: load the projector of its InfuseNet"
            )
        if image is not None:
            if self.infiniteyou_face_encoder is None:
                face_libraries()  # what to install, before any fetch
                self.infiniteyou_face_encoder = FaceEncoder.from_insightface(
                    self.infiniteyou_insightface_root, self.device
                )
            embedding = self.infiniteyou_face_encoder(load_image(image))
        embedding = check_embedding(embedding, projector.config.embedding_dim)
        with torch.no_grad():
            return projector(embedding.to(self.device, module_dtype(projector))).float()

    # ------------------------------------------------------------------ timestep LoRA
    def load_timestep_lora(self, lora, alpha: float | None = None):
        """Attach a timestep LoRA (DiffSynth-Studio's `load_timestep_lora`, e.g. the `adapter_model.safetensors` of
        DiffSynth-Studio/MultiAlign-FLUX.1-dev; a file, a `ModelConfig` or a hub name) to the DiT: each adapted
        Linear adds `alpha * B((A x) * gamma(t) + beta(t))` (`flux1/timestep_lora.py`; alpha 2 as theirs) until
        `clear_timestep_loras()`. Returns the `TimestepLoRA`."""
        from diffsynth.runtime.lora import read_lora_state

        from .flux1.timestep_lora import DEFAULT_ALPHA, TimestepLoRA, read_timestep_lora

        state, source = read_lora_state(lora_file(lora))
        attached = TimestepLoRA(self.dit, read_timestep_lora(state, self.dit, source), DEFAULT_ALPHA if alpha is None
                                else alpha)  # fmt: skip
        self.timestep_loras.append(attached)
        return attached

    def clear_timestep_loras(self) -> None:
        """Take every timestep LoRA off the DiT."""
        for attached in self.timestep_loras:
            attached.remove()
        self.timestep_loras = []

    # ------------------------------------------------------------------ AttriCtrl
    def load_value_controller(self, encoder: str | os.PathLike | ModelConfig) -> int:
        """Load one AttriCtrl attribute encoder (e.g. `models/brightness.safetensors` of
        DiffSynth-Studio/AttriCtrl-FLUX.1-Dev; a file or `ModelConfig`) after those already loaded; returns its
        position in `value_controller_inputs`."""
        from diffsynth.runtime.loading import load_models

        from .flux1.value_control import VALUE_ENCODER_SPEC, ValueControllers

        config = encoder if isinstance(encoder, ModelConfig) else ModelConfig(path=str(encoder))
        (loaded,) = load_models(
            weight_paths(config), torch_dtype=self.torch_dtype, device="cpu", specs=[VALUE_ENCODER_SPEC]
        )
        dim = loaded.module.config.dim
        if self.dit is not None and dim != self.dit.config.context_in_dim:
            raise ConfigError(
                f"{config}: the AttriCtrl encoder makes {dim}-wide tokens; this DiT reads "
                f"{self.dit.config.context_in_dim}-wide text"
            )
        if self.value_controller is None:
            self.value_controller = ValueControllers()
            self.model_configs.setdefault("value_controller", config)
        self.value_controller.encoders.append(loaded.module.eval().requires_grad_(False))
        if self.vram_handles:
            self.enable_vram_management(slots=["value_controller"])
        elif not self.model_offload:
            self.value_controller.to(self.device)
        return len(self.value_controller.encoders) - 1

    def prepare_value_control(self, values, text: FluxPromptEmbeds, negative: FluxPromptEmbeds | None):
        """Both prompts with the AttriCtrl tokens of `values` appended (unchanged without values)."""
        from .flux1.value_control import check_values

        if values is None:
            return text, negative
        encoders = self.value_controller.encoders if self.value_controller is not None else ()
        values = check_values(values, len(encoders))
        self.load_models_to_device(["value_controller"])
        with torch.no_grad():
            tokens = self.value_controller(values).float()

        def appended(embeds):
            extra = tokens.to(embeds.t5.device).expand(embeds.batch, -1, -1)
            return FluxPromptEmbeds(t5=torch.cat([embeds.t5, extra.to(embeds.t5.dtype)], dim=1), pooled=embeds.pooled)

        return appended(text), (appended(negative) if negative is not None else None)

    # ------------------------------------------------------------------ LoRA Encoder, LoRA Fusion
    def load_lora_encoder(self, encoder: str | os.PathLike | ModelConfig) -> None:
        """Load DiffSynth-Studio's LoRA Encoder (`model.safetensors` of DiffSynth-Studio/LoRA-Encoder-FLUX.1-Dev; a
        file or `ModelConfig`), for `lora_encoder_inputs`."""
        from .flux1.lora_encoder import LORA_ENCODER_SPEC

        self.lora_encoder = self._load_lora_model(encoder, LORA_ENCODER_SPEC, "lora_encoder", "LoRA Encoder")

    def load_lora_fusion(self, fusion: str | os.PathLike | ModelConfig) -> None:
        """Load DiffSynth-Studio's LoRA Fusion (`model.safetensors` of DiffSynth-Studio/LoRAFusion-preview-FLUX.1-dev;
        a file or `ModelConfig`); `enable_lora_merger()` puts it to work."""
        from .flux1.lora_fusion import LORA_FUSION_SPEC

        self.lora_fusion = self._load_lora_model(fusion, LORA_FUSION_SPEC, "lora_fusion", "LoRA Fusion")

    def _load_lora_model(self, source, spec, slot: str, what: str) -> torch.nn.Module:
        from diffsynth.runtime.loading import load_models

        config = source if isinstance(source, ModelConfig) else ModelConfig(path=str(source))
        (loaded,) = load_models(weight_paths(config), torch_dtype=self.torch_dtype, device="cpu", specs=[spec])
        module = loaded.module.eval().requires_grad_(False)
        if self.dit is not None:
            want = (self.dit.config.hidden_size, len(self.dit.double_blocks), len(self.dit.single_blocks))
            got = (module.config.hidden, module.config.double_blocks, module.config.single_blocks)
            if got != want:
                raise ConfigError(
                    f"{config}: the {what} is for a DiT of width {got[0]} with {got[1]} double and {got[2]} single "
                    f"blocks; this DiT has {want[0]}, {want[1]} and {want[2]} (it is made for FLUX.1-dev)"
                )
            width = getattr(module.config, "dim", None)
            if width is not None and width != self.dit.config.context_in_dim:
                raise ConfigError(
                    f"{config}: the {what} makes {width}-wide tokens; this DiT reads {self.dit.config.context_in_dim}"
                    "-wide text"
                )
        self.model_configs[slot] = config
        return module.to(self.device)

    def enable_lora_merger(self) -> None:
        """DiffSynth-Studio's name: LoRAs kept apart from the DiT's weights (`load_lora(..., fuse=False)`, now the
        default of `load_lora` on the DiT) are combined by the loaded LoRA Fusion's gates instead of summed
        (`flux1/lora_fusion.py`); LoRAs fused before stay in the weights. `disable_lora_merger()` undoes it."""
        from diffsynth.runtime.lora import set_lora_merger

        if self.lora_fusion is None:
            raise ConfigError(
                "enable_lora_merger() needs the LoRA Fusion model: pipe.load_lora_fusion(<model.safetensors of "
                "DiffSynth-Studio/LoRAFusion-preview-FLUX.1-dev>), or list it among model_configs"
            )
        if self.dit is None:
            raise ConfigError("enable_lora_merger() needs the DiT: load FLUX.1-dev first")
        self.lora_fusion.to(self.device)
        for name, merger in self.lora_fusion.mergers().items():
            set_lora_merger(self.dit.get_submodule(name), merger)
        self.lora_merger_enabled = True

    def disable_lora_merger(self) -> None:
        """Kept-apart LoRAs are summed again, as without LoRA Fusion."""
        from diffsynth.runtime.lora import set_lora_merger

        if self.lora_fusion is not None and self.dit is not None:
            for name in self.lora_fusion.mergers():
                set_lora_merger(self.dit.get_submodule(name), None)
        self.lora_merger_enabled = False

    def default_lora_fuse(self, slot: str) -> bool:
        """With the LoRA merger on, DiT LoRAs are kept apart (the merger only sees those)."""
        return not (slot == "dit" and getattr(self, "lora_merger_enabled", False))

    def prepare_lora_encoding(self, loras, scale, text: FluxPromptEmbeds) -> FluxPromptEmbeds:
        """The positive prompt with one LoRA Encoder token per LoRA of `loras` appended (unchanged without, and
        with `scale` 0: no token is appended, as the DiT's text embedding would make zero tokens real ones)."""
        if loras is None:
            return text
        if self.lora_encoder is None:
            raise ConfigError(
                "lora_encoder_inputs needs the LoRA Encoder: pipe.load_lora_encoder(<model.safetensors of "
                "DiffSynth-Studio/LoRA-Encoder-FLUX.1-Dev>), or list it among model_configs"
            )
        scale = finite_number(scale, "lora_encoder_scale")  # NaN / inf tokens would make the image NaN
        items = list(loras) if isinstance(loras, (list, tuple)) else [loras]
        if not items:
            raise ConfigError("lora_encoder_inputs is empty; give one LoRA or a list of them")
        if scale == 0:
            return text
        self.load_models_to_device(["lora_encoder"])
        with torch.no_grad():
            tokens = torch.cat([self.lora_encoder(self.read_lora(lora_file(item), "dit")) for item in items], dim=1)
        tokens = tokens.float() * float(scale)
        extra = tokens.to(text.t5.device, text.t5.dtype).expand(text.batch, -1, -1)
        return FluxPromptEmbeds(t5=torch.cat([text.t5, extra], dim=1), pooled=text.pooled)

    # ------------------------------------------------------------------ Redux
    def load_redux(
        self,
        redux: str | os.PathLike | ModelConfig = "black-forest-labs/FLUX.1-Redux-dev",
        image_encoder: str | os.PathLike | ModelConfig | None = None,
    ) -> None:
        """Load the FLUX.1 Redux embedder and its SigLIP image encoder (see `flux1/redux.py`).

        `redux` is a `ModelConfig`, a local file or folder, or the hub repo id (`REDUX_REPOS`:
        `flux1-redux-dev.safetensors`; diffusers' `image_embedder/` folder has the same keys). `image_encoder`
        (a folder with its `config.json`, a file, a repo id or a `ModelConfig`, e.g. the Redux repo's
        `image_encoder/`) defaults to google/siglip-so400m-patch14-384, the tower BFL's reference loads. Both
        load in the pipeline's dtype, placed like the other models.
        """
        from .flux1.ip_adapter import load_image_encoder
        from .flux1.redux import REDUX_REPOS, load_redux_model

        hint = f"one of the known repos {sorted(REDUX_REPOS)} (pass a ModelConfig for other repos)"
        config = model_source(redux, "redux", REDUX_REPOS.get, hint)
        embedder = load_redux_model(weight_paths(config), self.torch_dtype)
        self._check_redux_fits(embedder)
        encoder_config = _image_encoder_config(image_encoder if image_encoder is not None else REDUX_ENCODER)
        # a hub file such as the Redux repo's image_encoder/model.safetensors: its config.json gives the 384
        # input size, which the shapes alone (27x27 patches of 14) cannot
        fetch_companion_config(encoder_config)
        encoder = load_image_encoder(weight_paths(encoder_config), self.torch_dtype)
        if encoder.kind != "siglip":
            raise ConfigError(f"image_encoder is a {encoder.kind} vision model; FLUX.1 Redux was trained with SigLIP")
        if encoder.config.hidden_size != embedder.config.image_dim:
            raise ConfigError(
                f"image_encoder gives {encoder.config.hidden_size}-wide patch features; the Redux embedder takes "
                f"{embedder.config.image_dim}"
            )
        self.flux_redux = embedder.eval().requires_grad_(False)
        self.flux_redux_image_encoder = encoder.eval().requires_grad_(False)
        self.model_configs["flux_redux"], self.model_configs["flux_redux_image_encoder"] = config, encoder_config
        logger.info(
            "FLUX.1 Redux (%d image tokens per image)", (encoder.config.image_size // encoder.config.patch_size) ** 2
        )
        if self.vram_handles:
            self.enable_vram_management(slots=["flux_redux", "flux_redux_image_encoder"])
        elif not self.model_offload:
            self.flux_redux.to(self.device)
            self.flux_redux_image_encoder.to(self.device)

    def _check_redux_fits(self, embedder) -> None:
        if self.dit is not None and embedder.config.text_dim != self.dit.config.context_in_dim:
            raise ConfigError(
                f"the Redux embedder gives {embedder.config.text_dim}-wide tokens; the DiT reads "
                f"{self.dit.config.context_in_dim}-wide text (context_in_dim)"
            )

    def check_redux_inputs(self, images, scale, pooled_scale) -> tuple[list[Image.Image], list[float], list[float]]:
        """`flux_redux_image` as RGB images and the two scales one per image; refused without a loaded Redux."""
        from .flux1.redux import check_scales

        items = [] if images is None else _as_list(images)
        if not items:
            return [], [], []
        if self.flux_redux is None or self.flux_redux_image_encoder is None:
            raise ConfigError(
                "flux_redux_image was given but no Redux model is loaded: use "
                "pipe.load_redux('black-forest-labs/FLUX.1-Redux-dev') (or a local file / ModelConfig)"
            )
        scales = check_scales(scale, len(items), "flux_redux_scale")
        pooled_scales = check_scales(pooled_scale, len(items), "flux_redux_pooled_scale")
        return [load_image(item) for item in items], scales, pooled_scales

    def prepare_redux(
        self, text: FluxPromptEmbeds, images: list[Image.Image], scales: list[float], pooled_scales: list[float]
    ) -> FluxPromptEmbeds:
        """`text` with the Redux tokens of `images` appended (SigLIP's processor: 384x384 bicubic, [-1, 1];
        `last_hidden_state` -> Redux embedder), weighted per image as `flux1/redux.py` says."""
        from .flux1.ip_adapter import preprocess
        from .flux1.redux import redux_prompt

        if not images:
            return text
        self._check_redux_fits(self.flux_redux)
        self.load_models_to_device(["flux_redux_image_encoder", "flux_redux"])
        encoder = self.flux_redux_image_encoder
        pixels = preprocess(images, "siglip", encoder.config.image_size).to(self.device, module_dtype(encoder))
        features = encoder(pixel_values=pixels).last_hidden_state
        tokens = self.flux_redux(features).float()
        return redux_prompt(text, tokens, scales, pooled_scales)

    # ------------------------------------------------------------------ Insert Anything
    def check_insert_anything(self, images, *, prompt, cfg_scale, height, width, **others):
        """The Fill + Redux inputs of an Insert Anything call (`flux1/insert_anything.py`), or None when none of
        its four images is given; refused when some are missing, with inputs it replaces or cannot take, without a
        Fill DiT or a loaded Redux."""
        from .flux1.insert_anything import ARGUMENTS, SIZE, prepare_insert_anything

        given = [name for name, image in zip(ARGUMENTS, images, strict=True) if image is not None]
        if not given:
            return None
        if len(given) < len(ARGUMENTS):
            missing = [name for name in ARGUMENTS if name not in given]
            raise ConfigError(f"Insert Anything needs all of {', '.join(ARGUMENTS)}; {', '.join(missing)} missing")
        for name, value in others.items():
            if value is not None:
                raise ConfigError(
                    f"{name} cannot be combined with insert_anything_*, which make the Fill / Redux inputs"
                )
        if prompt is not None and not (isinstance(prompt, str) and not prompt.strip()):
            raise ConfigError(
                f"prompt={prompt!r} is not read by Insert Anything (the authors' prompt is the reference's Redux "
                "tokens after zero text states); leave it out"
            )
        cfg = self.setting("cfg_scale", cfg_scale, 1.0)
        if float(cfg) != 1.0:
            raise ConfigError(f"cfg_scale={cfg!r}: Insert Anything has no negative prompt (no true CFG); use 1")
        if self.dit is None or condition_kind(self.dit.config) != FILL:
            what = describe_widths(self.dit.config) if self.dit is not None else "no DiT"
            raise ConfigError(
                f"insert_anything_* need a FLUX.1 Fill DiT (black-forest-labs/FLUX.1-Fill-dev with the "
                f"HuanJue/Insert-Anything LoRA: the preset of that name); this is {what}"
            )
        if self.flux_redux is None or self.flux_redux_image_encoder is None:
            raise ConfigError(
                "insert_anything_ref_image is read by FLUX.1 Redux, which is not loaded: use "
                "pipe.load_redux('black-forest-labs/FLUX.1-Redux-dev') (the HuanJue/Insert-Anything preset loads it)"
            )
        side = SIZE if height is None else height
        self.check_size(side, 2 * side)
        if width is not None and width != 2 * side:
            raise ConfigError(f"width={width!r}: an Insert Anything diptych is twice as wide as high ({2 * side})")
        return prepare_insert_anything(*images, size=side)

    def insert_anything_text(self, text_len: int) -> FluxPromptEmbeds:
        """The authors' text states for Insert Anything: zeros (diffusers' Redux prior without text encoders)."""
        from .flux1.insert_anything import zero_prompt

        cfg = self.dit.config
        text = zero_prompt(1, text_len, cfg.context_in_dim, cfg.vec_in_dim)
        return FluxPromptEmbeds(text.t5.to(self.device), text.pooled.to(self.device))

    # ------------------------------------------------------------------ Nexus-Gen
    def load_nexus_gen(self, config: ModelConfig) -> None:
        """Nexus-Gen's autoregressive model (`model*.safetensors`) or a decoder (`edit_decoder.bin` /
        `generation_decoder.bin`: the DiT and an adapter) into their slots, strictly (`flux1/nexus_gen.py`)."""
        from diffsynth.runtime.loading import load_models

        from .flux1.nexus_gen import NEXUS_GEN_SPECS

        roles = {role: slot for slot, role in self.model_slots.items()}
        for item in load_models(
            weight_paths(config), torch_dtype=self.torch_dtype, device="cpu", specs=NEXUS_GEN_SPECS
        ):
            slot = roles[item.role]
            if getattr(self, slot) is not None:
                logger.warning("%s replaces an earlier %s model", config, slot)
            setattr(self, slot, item.module.eval().requires_grad_(False))
            self.model_configs[slot] = config

    def load_nexus_gen_processor(self, config: ModelConfig) -> None:
        """Nexus-Gen's image processor and tokenizer from its `processor/` folder (a `ModelConfig`)."""
        from .flux1.nexus_gen import NexusGenProcessor

        paths = config.resolve()
        folder = paths[0] if Path(paths[0]).is_dir() else str(Path(paths[0]).parent)
        self.nexus_gen_processor = NexusGenProcessor.from_folder(folder)

    def check_nexus_gen_inputs(self, reference, entity_prompts, insert: bool) -> Image.Image | None:
        """`nexus_gen_reference_image` as an RGB image (None for generation), checked against the loaded Nexus-Gen
        parts; None as well without Nexus-Gen (no reference may then be given)."""
        adapters = self.nexus_gen_editing_adapter, self.nexus_gen_generation_adapter
        if self.nexus_gen is None:
            if reference is not None:
                raise ConfigError(
                    "nexus_gen_reference_image was given but no Nexus-Gen model is loaded: use the "
                    "DiffSynth-Studio/Nexus-GenV2 preset, or list its model*.safetensors and edit_decoder.bin"
                )
            if any(a is not None for a in adapters):
                raise ConfigError(
                    "a Nexus-Gen decoder is loaded without its autoregressive model: add ModelConfig(model_id="
                    "'DiffSynth-Studio/Nexus-GenV2', origin_file_pattern='model*.safetensors')"
                )
            return None
        if reference is not None and self.nexus_gen_editing_adapter is None:
            raise ConfigError(
                "nexus_gen_reference_image needs Nexus-Gen's editing decoder (edit_decoder.bin: the "
                "DiffSynth-Studio/Nexus-GenV2 preset), which is not loaded"
                + ("; the generation decoder makes images from the prompt alone" if adapters[1] is not None else "")
            )
        if reference is None and self.nexus_gen_generation_adapter is None:
            raise ConfigError(
                "Nexus-Gen is loaded with "
                + ("its editing decoder (edit_decoder.bin): give nexus_gen_reference_image, the image to edit, or "
                   if adapters[0] is not None else "no decoder: ")
                + "load generation_decoder.bin (the DiffSynth-Studio/Nexus-GenV2:generation preset) to draw from "
                "the prompt alone"
            )  # fmt: skip
        if entity_prompts:
            raise ConfigError("eligen_entity_prompts cannot be combined with Nexus-Gen, whose tokens replace the text")
        if insert:
            raise ConfigError("insert_anything_* cannot be combined with Nexus-Gen (a Fill DiT with Redux)")
        if self.nexus_gen_processor is None:
            raise ConfigError(
                "Nexus-Gen has no processor: load it with pipe.load_nexus_gen_processor(ModelConfig(...))"
            )
        return None if reference is None else load_image(reference)

    def prepare_nexus_gen(self, prompts, reference, text: FluxPromptEmbeds, height: int, width: int):
        """The positive text with its T5 states replaced by Nexus-Gen's tokens, one prompt at a time (the CLIP
        vector stays), and their position ids (editing; None for generation, whose ids are zeros). Unchanged
        without Nexus-Gen."""
        from .flux1.nexus_gen import editing_text_ids

        if self.nexus_gen is None:
            return text, None
        self.load_models_to_device(
            ["nexus_gen", "nexus_gen_editing_adapter" if reference is not None else "nexus_gen_generation_adapter"]
        )
        tokens, ids = [], None
        for prompt in prompts:
            predicted, given, grids = self.nexus_gen.image_embeddings(
                self.nexus_gen_processor(prompt, reference), self.device
            )
            if reference is None:
                tokens.append(self.nexus_gen_generation_adapter(predicted[None]).float())
                continue
            tokens.append(self.nexus_gen_editing_adapter(predicted[None], grids[1], given[None], grids[0]).float())
            # DiffSynth-Studio makes these in the latents' dtype (the pipeline's): rounded the same way
            ids = editing_text_ids(height // 8, width // 8, grids[1], grids[0]).to(self.torch_dtype).float()
        width_in = self.dit.config.context_in_dim
        if tokens[0].shape[-1] != width_in:
            raise ConfigError(
                f"the Nexus-Gen adapter makes {tokens[0].shape[-1]}-wide tokens; the DiT reads {width_in}-wide text"
            )
        t5 = torch.cat(tokens).to(text.t5.device)
        return FluxPromptEmbeds(t5=t5, pooled=text.pooled), (None if ids is None else ids.to(self.device))

    # ------------------------------------------------------------------ ControlNet
    def prepare_controls(
        self, inputs, height: int, width: int, tiled=False, tile_size=512, tile_stride=384
    ) -> list[ControlCondition]:
        """Check `controlnet_inputs` and encode each control image (and inpainting mask) for its net."""
        nets = self.controlnets()
        how = "use FluxImagePipeline.from_pretrained(..., controlnet=...) or pipe.load_controlnet(...)"
        controls = []
        for i, item in enumerate(checked_inputs(inputs, len(nets), how)):
            where, cid = f"controlnet_inputs[{i}]", item.controlnet_id
            if item.image is None:
                raise ConfigError(f"{where}.image is missing: give the control image")
            if item.inpaint_image is not None:
                raise ConfigError(
                    f"{where}.inpaint_image is not read by FLUX.1 ControlNets: an inpainting net repaints `image`"
                )
            net = nets[cid]
            image = load_image(item.image).resize((width, height), Image.LANCZOS)
            if net.takes_mask:
                if item.inpaint_mask is None:
                    raise ConfigError(
                        f"{where}: ControlNet {cid} is an inpainting net; give inpaint_mask (white = repaint)"
                    )
                tokens = self.encode_inpaint_control(image, item.inpaint_mask, tiled, tile_size, tile_stride)
            else:
                if item.inpaint_mask is not None:
                    raise ConfigError(
                        f"{where}.inpaint_mask is given but ControlNet {cid} takes no mask "
                        f"(condition width {net.config.cond_in_channels})"
                    )
                tokens = pack_latents(self.vae_encode([image], tiled, tile_size, tile_stride))
            mode = _control_mode(net, item.processor_id, where)
            controls.append(ControlCondition(net, tokens, mode, float(item.scale), float(item.start), float(item.end)))
        return controls

    def encode_inpaint_control(self, image: Image.Image, mask, tiled=False, tile_size=512, tile_stride=384):
        """alimama's inpainting condition: the image with the masked pixels black, VAE-encoded, and the
        kept region (1 - mask, nearest-resized to the latent grid) as a 17th channel, packed (68 features)."""
        gray = _load_mask(mask, "inpaint_mask").resize(image.size, Image.LANCZOS)
        repaint = torch.from_numpy(np.asarray(gray, dtype=np.float32) / 255.0 >= 0.5).float()[None, None]
        pixels = pil_to_tensor([image], dtype=module_dtype(self.vae), device=self.device)
        pixels = pixels.masked_fill(repaint.to(self.device).bool(), -1.0)
        z = self.vae.encode(pixels, tiled=tiled, tile_size=tile_size, tile_stride=tile_stride).float()
        keep = 1.0 - F.interpolate(repaint, size=z.shape[-2:]).to(z.device)
        return pack_latents(torch.cat([z, keep], dim=1))


def check_guidance(value) -> float:
    """`embedded_guidance` as the float the DiT embeds (a finite number, as every scale: `finite_number`); a list
    or NaN was a bare TypeError or a NaN image."""
    try:
        return finite_number(value, "embedded_guidance")
    except ConfigError as error:
        raise ConfigError(f"{error} (dev: 3.5, Fill: 30)") from None


def _as_list(items) -> list:
    return list(items) if isinstance(items, (list, tuple)) else [items]


def _names_infusenet(config: ModelConfig) -> bool:
    """Whether a ControlNet's `ModelConfig` (its path or hub pattern) names InfiniteYou's InfuseNet."""
    names = [*_as_list(config.path or []), *_as_list(config.origin_file_pattern or [])]
    return any("infusenet" in str(name).lower() for name in names)


def insert_anything_output(images: torch.Tensor, insert, output_type: str):
    """The decoded diptych `[1, 3, H, W]` pasted back into the source image (`paste_back`), as `output_type`."""
    from .flux1.insert_anything import paste_back

    pasted = paste_back(tensor_to_output(images, "pil")[0], insert.crop)
    if output_type == "pil":
        return pasted
    unit = torch.from_numpy(np.asarray(pasted, dtype=np.float32) / 255.0)[None]
    return unit.numpy() if output_type == "np" else unit.permute(0, 3, 1, 2).contiguous()


def _load_mask(mask, name: str) -> Image.Image:
    """A mask (PIL image of any mode, or a file path) as a grayscale image; white = repaint. It is read upright as
    its EXIF says, and 16-bit grey is scaled to 8 bits (`media.eight_bit`): PIL's `convert("L")` would clip it to
    white, so a soft mask would repaint everything. A missing or unreadable file is a ConfigError naming it."""
    if isinstance(mask, (str, os.PathLike)):
        return load_image(mask).convert("L")
    if not isinstance(mask, Image.Image):
        raise ConfigError(f"{name} must be a file path or a PIL.Image (white = repaint), got {type(mask).__name__}")
    return eight_bit(upright(mask), name).convert("L")


def _binary_mask(mask: Image.Image, width: int, height: int) -> torch.Tensor:
    """`[H, W]` 1 where `mask` (resized Lanczos to the output size) is at least half white, else 0."""
    gray = np.asarray(mask.resize((width, height), Image.LANCZOS), dtype=np.float32) / 255.0
    return torch.from_numpy(gray >= 0.5).float()


# hub repos of the released adapters: their weight file and the image encoder they were trained with
IP_ADAPTER_REPOS = {
    "InstantX/FLUX.1-dev-IP-Adapter": "ip-adapter.bin",
    "XLabs-AI/flux-ip-adapter": "ip_adapter.safetensors",
    "XLabs-AI/flux-ip-adapter-v2": "ip_adapter.safetensors",
}
IP_ADAPTER_ENCODERS = {"instantx": "google/siglip-so400m-patch14-384", "xlabs": "openai/clip-vit-large-patch14"}
REDUX_ENCODER = IP_ADAPTER_ENCODERS["instantx"]  # the same SigLIP so400m tower (BFL's Redux reference loads it)


def _ip_adapter_config(item) -> ModelConfig:
    hint = f"one of the known repos {sorted(IP_ADAPTER_REPOS)} (pass a ModelConfig for other repos)"
    return model_source(item, "ip_adapter", IP_ADAPTER_REPOS.get, hint)


def _image_encoder_config(item) -> ModelConfig:
    return model_source(item, "image_encoder", lambda repo: ["model.safetensors", "config.json"], "a hub repo id")


def _control_mode(net: Flux1ControlNet, processor_id, where: str) -> int | None:
    """The union control mode for `processor_id` (a `UNION_MODES` name or an index); None for other nets."""
    if not net.is_union:
        return None
    n = net.config.num_modes
    if isinstance(processor_id, str) and processor_id.lower() in UNION_MODES:
        processor_id = UNION_MODES[processor_id.lower()]
    if isinstance(processor_id, numbers.Integral) and not isinstance(processor_id, bool):
        processor_id = int(processor_id)  # a numpy integer too
    if isinstance(processor_id, bool) or not isinstance(processor_id, int) or not 0 <= processor_id < n:
        given = "is missing" if processor_id is None else f"={processor_id!r} is not one of its modes"
        raise ConfigError(
            f"{where}.processor_id {given}: this union ControlNet ({n} modes) needs a control mode, "
            f"one of {UNION_MODES} (those below {n}) or an index in [0, {n})"
        )
    return processor_id


def check_controlnet_fits(net: Flux1ControlNet, dit, source: str) -> None:
    """Refuse (naming `source` and the width) a net that does not fit `dit` (None: not loaded yet) at load time,
    rather than at the first step: its residuals join the DiT's hidden states, and it reads the DiT's noisy latent
    tokens, T5 text and pooled CLIP vector. Its own attention (heads, rope axes) is its own business."""
    dit_config = getattr(dit, "config", None)
    if dit_config is None:
        return
    widths = (
        ("hidden_size", "hidden_size"),
        ("context_in_dim", "context_in_dim"),
        ("vec_in_dim", "vec_in_dim"),
        ("in_channels", "out_channels"),  # the noisy latent tokens, without a Fill / Control DiT's extra channels
    )
    for net_field, dit_field in widths:
        ours, theirs = getattr(net.config, net_field), getattr(dit_config, dit_field)
        if ours != theirs:
            raise ConfigError(
                f"{source} does not fit the DiT: the ControlNet's {net_field} is {ours}, the DiT's {dit_field} "
                f"is {theirs} (a ControlNet for another FLUX.1 model?)"
            )


def _describe_net(net: Flux1ControlNet) -> str:
    cfg = net.config
    kind = "union" if net.is_union else "inpainting" if net.takes_mask else "single-condition"
    return f"{kind}, {cfg.depth} double + {cfg.depth_single_blocks} single blocks"


__all__ = [
    "ControlCondition",
    "ControlNetInput",
    "FluxImagePipeline",
    "controlnet_residuals",
    "KontextLatents",
    "flux_velocity",
    "latent_ids",
    "pack_latents",
    "unpack_latents",
]


def _text_encoder_only(source) -> bool:
    """Whether the LoRA `source` (a file or state dict) has text-encoder entries and nothing for the DiT, as kohya's
    `--network_train_text_encoder_only` writes."""
    from collections.abc import Mapping

    from diffsynth.runtime.lora import SKIPPED_PREFIXES

    from .flux1.text_encoder_lora import PREFIXES

    if isinstance(source, Mapping):
        keys = list(source)
    elif isinstance(source, (str, os.PathLike)):
        keys = _lora_file_keys(source)
    else:  # LoRAWeights: already a DiT's
        return False
    return (
        bool(keys)
        and all(k.startswith(SKIPPED_PREFIXES) for k in keys)
        and any(k.startswith(tuple(PREFIXES)) for k in keys)
    )


def _lora_file_keys(path: str | os.PathLike) -> list[str]:
    """The tensor names of a LoRA file (a safetensors file's from its header, without reading the tensors); empty
    when it cannot be read (the DiT's reader then reports why)."""
    from diffsynth.runtime.lora import read_lora_state

    try:
        if str(path).endswith(".safetensors") and Path(path).is_file():
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                return list(f.keys())
        return list(read_lora_state(path)[0])
    except Exception:
        return []
