"""FLUX.1 ControlNets in FLUX.1's training task: the control picture's tokens and the net's residuals.

ControlNets (`flux1/controlnet.py`: InstantX Union, alimama inpainting, jasperai upscaler, ...): with one among the
model files (the pipeline's `controlnet` slot), rows may carry DiffSynth-Studio's `--extra_inputs` columns
`controlnet_image` (the control picture, aligned with the target: list it in `--data_file_keys`), for a Union net
`controlnet_processor_id` (its control mode: canny, tile, depth, blur, pose, gray, lq, or an index) and for the
inpainting net `controlnet_inpaint_mask` (white = repaint). Each row's `ControlNetInput` is encoded by the
pipeline's `prepare_controls` at the target's size (resized Lanczos, VAE-encoded and packed; the inpainting net's
masked image plus the folded mask), giving `"controlnet"` `[H/16 * W/16, 64 or 68]` and `"controlnet_mode"` `[1]`;
`velocity` hands them to `flux_velocity` as a `ControlCondition` at scale 1, so the net's residuals enter the DiT
as in the pipeline's denoise loop. Training the DiT (LoRA or full) keeps the net frozen; rows without
`controlnet_image` train it without. `trained_model="controlnet"` (what `--trainable_models controlnet` asks the
trainer for: the net is one of the task's `trainable_slots`) trains the net in full under the frozen DiT, saved as
`<step>/controlnet/diffusion_pytorch_model.safetensors` in diffusers' `FluxControlNetModel` keys (`export_state`:
the hub files' layout, which the pipeline's ControlNet spec reads). One net at a time.
Validation samples take `--validation_images` as the control image (the inpainting net: `"image.png,mask.png"`) and
a Union net's mode from `--task_options validation_processor_id=NAME`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from diffsynth.runtime.controlnet import ControlNetInput, ControlNetSlot
from diffsynth.runtime.errors import ConfigError

from ..flux1.controlnet import UNION_MODES, Flux1ControlNet, Flux1ControlNetConfig
from ..pipeline import ControlCondition
from .rows import has, row_picture

if TYPE_CHECKING:
    from ..training import FluxTrainingTask


CONTROLNET_HINT = (
    "add its diffusion_pytorch_model.safetensors to the models (e.g. --model_paths, or --model_id_with_origin_paths "
    "InstantX/FLUX.1-dev-Controlnet-Union-alpha:diffusion_pytorch_model.safetensors)"
)


def control_arguments(task: FluxTrainingTask, images: Sequence[Any]) -> dict[str, Any]:
    """A ControlNet validation sample's `controlnet_inputs`: the control image, the inpainting net's mask, a
    Union net's mode (`validation_processor_id`)."""
    config = task.controlnet_config
    if task.channel_kind is not None or task.kontext:
        raise ConfigError(
            "validation samples of a Fill / Canny / Depth or Kontext DiT with a ControlNet take two kinds of "
            "images, which --validation_images cannot tell apart; drop --validation_prompts"
        )
    if takes_mask(config):
        if len(images) != 2:
            raise ConfigError(
                "an inpainting ControlNet's validation sample takes two images, the image to repaint and its mask "
                f"(white = repaint), e.g. --validation_images 'cup.png,cup_mask.png'; got {len(images)}"
            )
        mask = images[1]
    else:
        if len(images) != 1:
            raise ConfigError(
                "a ControlNet's validation sample takes one image, its control image (a canny / depth / pose "
                f"map, the low-resolution image for an upscaler), e.g. --validation_images pose.png; got {len(images)}"
            )
        mask = None
    mode = union_mode(config, task.validation_processor_id, "--task_options validation_processor_id")
    return {"controlnet_inputs": [ControlNetInput(image=images[0], processor_id=mode, inpaint_mask=mask)]}


@contextlib.contextmanager
def controlnet_for_encoding(task: FluxTrainingTask):
    """The pipeline with a ControlNet in its slot for `prepare_controls`: the loaded net, or (the encoding stage
    of a cached run loads none) one of the header's config built on the meta device: only its config is read."""
    if task.pipe.controlnet is not None:
        yield
        return
    if task._shape_net is None:
        with torch.device("meta"):
            task._shape_net = Flux1ControlNet(task.controlnet_config)
    with task.pipe.using("controlnet", ControlNetSlot([task._shape_net])):
        yield


def encode_control(task: FluxTrainingTask, index: int, row: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """`{"controlnet": [H/16 * W/16, 64 or 68]}` (+ `"controlnet_mode"` `[1]` for a Union net): the row's
    `ControlNetInput` as the pipeline's `prepare_controls` encodes it for an output of the target's size."""
    where = f"row {index} of the batch (prompt {str(row['prompt'])[:60]!r})"
    config = task.controlnet_config
    if config is None:
        raise ConfigError(
            f"{where} has controlnet_image, but no FLUX.1 ControlNet is among the models: {CONTROLNET_HINT}"
        )
    has_mask = has(row, "controlnet_inpaint_mask")
    if takes_mask(config) and not has_mask:
        raise ConfigError(
            f"{where} has no controlnet_inpaint_mask: this ControlNet is an inpainting net (condition width "
            f"{config.cond_in_channels}) and trains on controlnet_image with controlnet_inpaint_mask (white = "
            "repaint; --data_file_keys image,controlnet_image,controlnet_inpaint_mask)"
        )
    if has_mask and not takes_mask(config):
        raise ConfigError(
            f"{where} has controlnet_inpaint_mask, but this ControlNet takes no mask (condition width "
            f"{config.cond_in_channels}; alimama's inpainting net takes one): drop the column"
        )
    mode = union_mode(config, row.get("controlnet_processor_id"), f"{where}: controlnet_processor_id")
    control = ControlNetInput(
        image=row_picture(index, row, "controlnet_image"),
        processor_id=mode,
        inpaint_mask=row_picture(index, row, "controlnet_inpaint_mask") if has_mask else None,
    )
    _, height, width = row["image"].shape
    prepared = task.pipe.prepare_controls([control], height, width)[0]
    sample = {"controlnet": prepared.tokens[0]}
    if prepared.mode is not None:
        sample["controlnet_mode"] = torch.tensor([prepared.mode], dtype=torch.long)
    return sample


def control_conditions(
    task: FluxTrainingTask, model: nn.Module, batch: Mapping[str, Any]
) -> tuple[nn.Module, list[ControlCondition]]:
    """The DiT to run and the batch's ControlNet condition (none for a batch without controlnet_image)."""
    tokens = batch.get("controlnet")
    if task.trained_model != "controlnet":
        if tokens is None:
            return model, []
        net = task.pipe.controlnet.nets[0] if task.pipe.controlnet is not None else None
        if net is None:
            raise ConfigError(
                "this batch has a ControlNet condition (controlnet_image), but no FLUX.1 ControlNet is loaded: "
                f"{CONTROLNET_HINT}; or encode the cache again without it"
            )
        dit = model
    else:
        if tokens is None:
            raise ConfigError(
                "training the ControlNet needs batches with controlnet_image (list it in --data_file_keys, e.g. "
                "image,controlnet_image); a cache encoded without the ControlNet has none: encode it again"
            )
        net, dit = model, task.pipe.dit
        dit.gradient_checkpointing = bool(getattr(getattr(net, "module", net), "gradient_checkpointing", False))
    config = getattr(net, "module", net).config  # DDP wraps a trained net
    mode = batch.get("controlnet_mode")
    if tokens.shape[-1] != config.cond_in_channels or (mode is None) != (config.num_modes is None):
        raise ConfigError(
            f"this batch's ControlNet condition ({tokens.shape[-1]} features, "
            f"{'no mode' if mode is None else 'a mode'}) was encoded for another net than this one "
            f"({config.cond_in_channels}, {'a Union net' if config.num_modes else 'no modes'}): encode it again"
        )
    return dit, [ControlCondition(net, tokens, None if mode is None else mode.reshape(-1))]


def takes_mask(config: Flux1ControlNetConfig) -> bool:
    """Whether a ControlNet's condition carries the packed inpainting mask (alimama's: `Flux1ControlNet.takes_mask`)."""
    return config.cond_in_channels == config.in_channels + 4


def union_mode(config: Flux1ControlNetConfig, value: Any, where: str) -> str | int | None:
    """`value` as the pipeline's `processor_id` for a Union net: a mode name (DiffSynth-Studio's, `UNION_MODES`) or an
    index (a CSV cell's digits too); None for other nets, which have no modes."""
    n = config.num_modes
    if not n:
        return None
    names = [name for name, index in UNION_MODES.items() if index < n]
    if isinstance(value, str):
        value = int(value) if value.strip().isdigit() else value.strip().lower()
    if isinstance(value, str) and value in names:
        return value
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < n:
        return value
    given = "is missing" if value is None or value == "" else f"{value!r} is not one of its modes"
    raise ConfigError(
        f"{where} {given}: this Union ControlNet ({n} modes) needs its control mode, one of {', '.join(names)} "
        f"(DiffSynth-Studio's names) or an index in [0, {n})"
    )


def collate_controls(samples: list[Mapping[str, torch.Tensor]]) -> dict[str, Any]:
    """The rows' ControlNet tokens (and Union modes) stacked (none for a batch without controlnet_image)."""
    batch: dict[str, Any] = {}
    for key in ("controlnet", "controlnet_mode"):
        present = sum(key in s for s in samples)
        if present == len(samples):
            batch[key] = torch.stack([s[key] for s in samples])
        elif present:
            raise ConfigError(
                f"a batch mixes {present} rows with controlnet_image and {len(samples) - present} without; give "
                "every row its controlnet_image (or none), or train with --batch_size 1"
            )
    return batch
