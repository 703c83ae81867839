"""InfiniteYou in FLUX.1's training task: face embeddings, InfuseNet steered by the id projector's tokens.

InfiniteYou (DiffSynth-Studio's lora/ and full/FLUX.1-dev-InfiniteYou.sh): with the id projector
(`image_proj_model.bin`, loaded with both stages through the pipeline's `load_infiniteyou`) and InfuseNet (a FLUX.1
ControlNet: `InfuseNetModel/`) among the model files, a row's face photo `infinityou_id_image` (DiffSynth-Studio's
column; `infiniteyou_id_image` too; read at its own size: a `conditioning` column, list it in `--data_file_keys`)
is encoded as the pipeline's `prepare_infiniteyou` encodes it: the largest face through the face encoder
(insightface + facexlib, the `diffsynth-flux[infiniteyou]` extra; its `models/antelopev2/` root from
`--task_options infiniteyou_insightface_root=DIR`, else the hub's). A row may give the ArcFace embedding instead,
`infiniteyou_id_embedding` (or `infinityou_id_embedding`): a `.safetensors` (one tensor), `.npy` or `.pt` file of
`[512]` or `[N, 512]`, absolute or relative to the working directory (not a `--data_file_keys` column), or a
tensor. Only the face encoder is frozen in every mode, so the cache holds its embedding (`"infiniteyou_embedding"`
[N, 512]) and the row's `infinityou_guidance` (InfuseNet's own guidance, default 1; `"infiniteyou_guidance"` [1]);
the row's `controlnet_image` (default: a black picture of the target's size, as the pipeline's) is encoded as for
any ControlNet. `velocity` projects the embedding into InfuseNet's text tokens and hands InfuseNet to
`flux_velocity` as the pipeline's positive branch does (`ControlCondition` with the id tokens as its text at
position 0 and its guidance; the DiT keeps the prompt). Rows of one batch share their guidance. A DiT LoRA trains
under the frozen InfuseNet and projector. `--trainable_models controlnet,image_proj_model` (DiffSynth-Studio's
names; `controlnet` alone trains InfuseNet under the frozen projector) trains the two together: the trainer's model
is then `InfiniteYouInTraining` (slot "infiniteyou"), whose parts are the two models and whose forward is the whole
model call; it is saved as `<step>/infiniteyou/diffusion_pytorch_model.safetensors` holding InfuseNet in diffusers'
`FluxControlNetModel` keys under `controlnet.` and the projector in the authors' keys under `image_proj_model.`
(with InfuseNet's `config.json` beside it); `split_infiniteyou_weights` writes them as the released layout
(`InfuseNetModel/diffusion_pytorch_model.safetensors` + `config.json`, `image_proj_model.safetensors`), which the
pipeline loads strictly. Validation samples take `--validation_images` as the face photo (and optionally the control
image after it).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from PIL import Image
from torch import nn

from diffsynth.runtime.errors import ConfigError, preview
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.media import load_image
from diffsynth.runtime.pipeline import weight_paths
from diffsynth.runtime.vram import module_dtype

from ..flux1.controlnet import Flux1ControlNet
from ..pipeline import ControlCondition, FluxImagePipeline
from .rows import has, row_picture

if TYPE_CHECKING:
    from ..training import FluxTrainingTask


# InfiniteYou's row columns (DiffSynth-Studio's `infinityou_*` spelling first, then ours) and cached entries
IY_IMAGE_COLUMNS = ("infinityou_id_image", "infiniteyou_id_image")
IY_EMBEDDING_COLUMNS = ("infinityou_id_embedding", "infiniteyou_id_embedding")
IY_GUIDANCE_COLUMNS = ("infinityou_guidance", "infiniteyou_guidance")
IY_EMBEDS = "infiniteyou_embedding"  # an encoded row's ArcFace embedding(s) [N, 512]
IY_GUIDANCE = "infiniteyou_guidance"  # an encoded row's InfuseNet guidance [1]
IY_SLOT = "infiniteyou"  # the trainer's model when InfuseNet is trained: `InfiniteYouInTraining`
IY_HINT = (
    "add InfiniteYou's id projector and InfuseNet to the models (e.g. --model_id_with_origin_paths "
    "ByteDance/InfiniteYou:infu_flux_v1.0/aes_stage2/image_proj_model.bin,"
    "ByteDance/InfiniteYou:infu_flux_v1.0/aes_stage2/InfuseNetModel/*.safetensors)"
)


def encode_identity(task: FluxTrainingTask, index: int, row: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """`{"infiniteyou_embedding": [N, 512], "infiniteyou_guidance": [1]}` (float32): the row's face as the
    pipeline's `prepare_infiniteyou` embeds it before its projector (the face encoder's output for a photo, or
    the given embedding), checked as it checks them; the guidance as given (default 1)."""
    from ..flux1.infiniteyou import check_embedding

    where = f"row {index} of the batch (prompt {str(row['prompt'])[:60]!r})"
    image_column = one_spelling(row, IY_IMAGE_COLUMNS, where)
    embedding_column = one_spelling(row, IY_EMBEDDING_COLUMNS, where)
    guidance_column = one_spelling(row, IY_GUIDANCE_COLUMNS, where)
    given = image_column or embedding_column or guidance_column
    projector = task.pipe.infiniteyou_projector
    if projector is None:
        raise ConfigError(f"{where} has {given}, but InfiniteYou's id projector is not among the models: {IY_HINT}")
    if task.controlnet_config is None:
        raise ConfigError(
            f"{where} has {given}, but InfuseNet (a FLUX.1 ControlNet) is not among the models: {IY_HINT}"
        )
    if image_column and embedding_column:
        raise ConfigError(f"{where} has {image_column} and {embedding_column}; give the face photo or its embedding")
    if not (image_column or embedding_column):
        raise ConfigError(
            f"{where} has {guidance_column} but no face to guide: give {IY_IMAGE_COLUMNS[0]} (a photo) or "
            f"{IY_EMBEDDING_COLUMNS[1]} (its ArcFace embedding)"
        )
    if image_column:
        embedding = face_embedding(task, where, row_picture(index, row, image_column))
    else:
        embedding = read_embedding(row[embedding_column], f"{where}: {embedding_column}")
    try:
        embedding = check_embedding(embedding, projector.config.embedding_dim)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    guidance = iy_guidance(row.get(guidance_column) if guidance_column else None, f"{where}: {guidance_column}")
    return {IY_EMBEDS: embedding[0], IY_GUIDANCE: torch.tensor([guidance], dtype=torch.float32)}


def face_embedding(task: FluxTrainingTask, where: str, photo: Image.Image) -> torch.Tensor:
    """The `[512]` embedding of the largest face in `photo`: the pipeline's face encoder, built as the pipeline
    builds it at its first photo (the install command first when the extra is missing)."""
    from ..flux1.infiniteyou import FaceEncoder, face_libraries

    pipe = task.pipe
    if pipe.infiniteyou_face_encoder is None:
        face_libraries()
        pipe.infiniteyou_face_encoder = FaceEncoder.from_insightface(pipe.infiniteyou_insightface_root, pipe.device)
    try:
        return pipe.infiniteyou_face_encoder(load_image(photo))
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def identity_inputs(task: FluxTrainingTask, batch: Mapping[str, Any], trained: bool) -> tuple:
    """The batch's InfuseNet condition tokens, mode, face embeddings `[B, N, 512]` and guidance (one number), checked
    against the loaded projector; None for a batch without faces, which training InfuseNet refuses."""
    embeds = batch.get(IY_EMBEDS)
    if embeds is None:
        if trained:
            raise ConfigError(
                f"training InfuseNet needs batches with {IY_IMAGE_COLUMNS[0]} (or {IY_EMBEDDING_COLUMNS[1]}); a "
                "cache encoded without them has none: encode it again"
            )
        return None
    projector = task.pipe.infiniteyou_projector
    if projector is None:
        raise ConfigError(
            f"this batch has {IY_IMAGE_COLUMNS[0]}, but InfiniteYou's id projector is not loaded: {IY_HINT}; or "
            "encode the cache again without them"
        )
    if embeds.shape[-1] != projector.config.embedding_dim:
        raise ConfigError(
            f"this batch's face embeddings are {embeds.shape[-1]} wide, and InfiniteYou's projector takes "
            f"{projector.config.embedding_dim}: encode the cache again"
        )
    tokens, mode = batch.get("controlnet"), batch.get("controlnet_mode")
    width = task.controlnet_config.cond_in_channels if task.controlnet_config is not None else None
    if tokens is None or tokens.shape[-1] != width:
        raise ConfigError(
            f"this batch's InfuseNet condition ({'none' if tokens is None else tokens.shape[-1]} features) was not "
            f"encoded for this InfuseNet ({width}): encode the cache again"
        )
    guidances = batch[IY_GUIDANCE].reshape(-1).tolist()
    if len(set(guidances)) > 1:
        raise ConfigError(f"this batch's rows have {IY_GUIDANCE_COLUMNS[0]} {guidances}: one per batch")
    return tokens, None if mode is None else mode.reshape(-1), embeds, guidances[0]


def with_identity(
    task: FluxTrainingTask, controls: list[ControlCondition], inputs: tuple | None
) -> list[ControlCondition]:
    """The frozen InfuseNet's condition with the batch's id tokens (of `identity_inputs`) as its text and its
    guidance, as the pipeline's positive branch runs it; unchanged for a batch without faces."""
    if inputs is None:
        return controls
    projector = task.pipe.infiniteyou_projector
    embeds, guidance = inputs[2], inputs[3]
    with torch.no_grad():
        identity = projector(embeds.to(task.pipe.device, module_dtype(projector))).float()
    return [replace(control, text=identity, guidance=guidance) for control in controls]


class InfiniteYouInTraining(nn.Module):
    """InfuseNet and InfiniteYou's id projector as the trainer trains them (`--trainable_models
    controlnet,image_proj_model`: its `trainable_parts`, DiffSynth-Studio's names). The projector's tokens are
    InfuseNet's text, so both act in one model call; this module's forward is that whole call over the frozen DiT of
    `pipe`, so a DDP-wrapped model sees both. Its children are the pipeline's own InfuseNet and projector, so what the
    trainer changes is what the pipeline runs; `gradient_checkpointing` is handed to InfuseNet and the DiT."""

    trainable_parts: ClassVar[dict[str, tuple[str, ...]]] = {
        "controlnet": ("controlnet",),
        "image_proj_model": ("image_proj_model",),
    }

    def __init__(self, controlnet: Flux1ControlNet, projector: nn.Module, pipe: FluxImagePipeline):
        super().__init__()
        self.controlnet = controlnet
        self.image_proj_model = projector
        self.gradient_checkpointing = False
        self._frozen = (pipe,)  # not a submodule: the DiT is not trained here

    def forward(
        self,
        embeddings: torch.Tensor,
        tokens: torch.Tensor,
        mode: torch.Tensor | None,
        guidance: float,
        call: Callable[[list[ControlCondition]], torch.Tensor],
    ) -> torch.Tensor:
        """`call` (the task's `flux_velocity` over the frozen DiT) with InfuseNet steered by the id tokens the
        projector makes of `embeddings` `[B, N, 512]` (its text at position 0) and `guidance`, as the pipeline's
        positive branch runs it."""
        (pipe,) = self._frozen
        pipe.dit.gradient_checkpointing = self.controlnet.gradient_checkpointing = self.gradient_checkpointing
        identity = self.image_proj_model(embeddings.to(module_dtype(self.image_proj_model))).float()
        return call([ControlCondition(self.controlnet, tokens, mode, text=identity, guidance=guidance)])


def export_infiniteyou_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`InfiniteYouInTraining`'s weights in the released keys, each under its part's name: InfuseNet's in diffusers'
    `FluxControlNetModel` names (`controlnet.`), the projector's in the authors' `image_proj_model.bin` names
    (`image_proj_model.`)."""
    from ..flux1.controlnet_formats import ours_to_diffusers

    parts: dict[str, dict[str, torch.Tensor]] = {name: {} for name in InfiniteYouInTraining.trainable_parts}
    for key, value in state.items():
        name, _, rest = key.partition(".")
        if name not in parts:
            raise ConfigError(f"InfiniteYou's trained weights hold {key!r}, of neither InfuseNet nor the id projector")
        parts[name][rest] = value
    exported = {f"controlnet.{k}": v for k, v in ours_to_diffusers(parts["controlnet"]).items()}
    return exported | {f"image_proj_model.{k}": v for k, v in parts["image_proj_model"].items()}


def split_infiniteyou_weights(path: str | os.PathLike, folder: str | os.PathLike) -> tuple[Path, Path]:
    """The trainer's `<step>/infiniteyou/diffusion_pytorch_model.safetensors` written as InfiniteYou's released
    layout in `folder`: `InfuseNetModel/diffusion_pytorch_model.safetensors` (with the `config.json` found beside
    `path`) and `image_proj_model.safetensors`, which `FluxImagePipeline` loads (`load_controlnet`,
    `load_infiniteyou`, or both as `model_configs`). Returns (InfuseNet folder, projector file)."""
    import shutil

    from safetensors.torch import load_file, save_file

    path, folder = Path(path), Path(folder)
    state = load_file(str(path))
    parts: dict[str, dict[str, torch.Tensor]] = {"controlnet": {}, "image_proj_model": {}}
    for key, value in state.items():
        name, _, rest = key.partition(".")
        if name not in parts:
            raise ConfigError(
                f"{path} holds {key!r}: not InfiniteYou's trained weights (keys under controlnet. and "
                "image_proj_model.)"
            )
        parts[name][rest] = value
    empty = [name for name, part in parts.items() if not part]
    if empty:
        raise ConfigError(f"{path} holds no {' and no '.join(empty)} weights: not InfiniteYou's trained weights")
    net = folder / "InfuseNetModel"
    net.mkdir(parents=True, exist_ok=True)
    save_file(parts["controlnet"], str(net / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    if (path.parent / "config.json").is_file():
        shutil.copyfile(path.parent / "config.json", net / "config.json")
    projector = folder / "image_proj_model.safetensors"
    save_file(parts["image_proj_model"], str(projector), metadata={"format": "pt"})
    return net, projector


def infiniteyou_sources(model_configs: Sequence[ModelConfig]) -> tuple[ModelConfig | None, list[ModelConfig]]:
    """InfiniteYou's id projector among the model configs (None without one; its `.bin` is no registered model,
    so it is taken out before the others are recognised), and the other configs."""
    from ..flux1.infiniteyou import is_projector_file

    found = [is_projector_file(weight_paths(config)) for config in model_configs]
    projectors = [config for config, is_projector in zip(model_configs, found, strict=True) if is_projector]
    if len(projectors) > 1:
        raise ConfigError(f"the model files hold {len(projectors)} InfiniteYou id projectors ({projectors}); give one")
    rest = [config for config, is_projector in zip(model_configs, found, strict=True) if not is_projector]
    return (projectors[0] if projectors else None), rest


def identity_given(row: Mapping[str, Any]) -> bool:
    return any(has(row, c) for c in (*IY_IMAGE_COLUMNS, *IY_EMBEDDING_COLUMNS, *IY_GUIDANCE_COLUMNS))


def one_spelling(row: Mapping[str, Any], columns: tuple[str, str], where: str) -> str | None:
    """The one of DiffSynth-Studio's `infinityou_*` and our `infiniteyou_*` columns a row gives (None: neither)."""
    given = [column for column in columns if has(row, column)]
    if len(given) > 1:
        raise ConfigError(f"{where} has {given[0]} and {given[1]}: the same input twice; give one")
    return given[0] if given else None


def read_embedding(value: Any, where: str) -> torch.Tensor:
    """A row's ArcFace embedding: a tensor (or array), or a file holding one: `.safetensors` (one tensor), `.npy`,
    `.pt` / `.pth` (a tensor), absolute or relative to the working directory."""
    import numpy as np

    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if isinstance(value, torch.Tensor):
        return value
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        raise ConfigError(f"{where} must be a tensor or a .safetensors / .npy / .pt file, got {preview(value)}")
    path = Path(str(value).strip())
    if not path.is_file():
        raise ConfigError(
            f"{where} {str(value)!r} is no file (relative paths are taken from the working directory {os.getcwd()}; "
            "give absolute paths)"
        )
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(path))
            if len(tensors) != 1:
                raise ConfigError(f"{where} {path} holds {len(tensors)} tensors ({preview(sorted(tensors))}); give one")
            return next(iter(tensors.values()))
        if suffix == ".npy":
            return torch.from_numpy(np.load(path, allow_pickle=False))
        if suffix in (".pt", ".pth"):
            loaded = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(loaded, torch.Tensor):
                raise ConfigError(f"{where} {path} holds a {type(loaded).__name__}, not one tensor")
            return loaded
    except (OSError, ValueError, RuntimeError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"{where} {path} cannot be read ({reason})") from None
    raise ConfigError(f"{where} {path}: use a .safetensors, .npy or .pt file of the [512] ArcFace embedding")


def iy_guidance(value: Any, where: str) -> float:
    """InfuseNet's guidance of a row: 1 when absent (the pipeline's default); a number or a CSV cell's text."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return 1.0
    try:
        guidance = float(value) if isinstance(value, str) and not isinstance(value, bool) else value
    except ValueError:
        raise ConfigError(f"{where} {value!r} is not a number (InfuseNet's guidance, 1 by default)") from None
    if isinstance(guidance, torch.Tensor) and guidance.numel() == 1:
        guidance = guidance.item()
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance):
        raise ConfigError(f"{where} {value!r} is not a number (InfuseNet's guidance, 1 by default)")
    return float(guidance)


def collate_identities(samples: list[Mapping[str, torch.Tensor]]) -> dict[str, Any]:
    """InfiniteYou rows' face embeddings and guidance stacked (none for a batch without faces); one
    count and one guidance per batch, as InfuseNet takes them."""
    batch: dict[str, Any] = {}
    present = sum(IY_EMBEDS in s for s in samples)
    if present and present < len(samples):
        raise ConfigError(
            f"a batch mixes {present} rows with {IY_IMAGE_COLUMNS[0]} and {len(samples) - present} without; give "
            "every row its own (or none), or train with --batch_size 1"
        )
    if present:
        counts = [s[IY_EMBEDS].shape[0] for s in samples]
        guidances = [float(s[IY_GUIDANCE]) for s in samples]
        if len(set(counts)) > 1 or len(set(guidances)) > 1:
            raise ConfigError(
                f"the rows of a batch have {counts} face embeddings and {IY_GUIDANCE_COLUMNS[0]} {guidances}; "
                "InfuseNet takes one count and one guidance per batch: train with --batch_size 1"
            )
        batch[IY_EMBEDS] = torch.stack([s[IY_EMBEDS] for s in samples])
        batch[IY_GUIDANCE] = torch.stack([s[IY_GUIDANCE] for s in samples])
    return batch
