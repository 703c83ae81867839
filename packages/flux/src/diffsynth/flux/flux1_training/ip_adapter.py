"""The FLUX.1 IP-Adapter in FLUX.1's training task: cached image vectors, per-block keys and values in the model
call.

IP-Adapter (DiffSynth-Studio's lora/ and full/FLUX.1-dev-IP-Adapter.sh): with the adapter file (InstantX's
`ip-adapter.bin`, or an XLabs `ip_adapter.safetensors`) and its image encoder (SigLIP so400m; CLIP-L for XLabs)
among the model files, as DiffSynth-Studio lists them, a row's `ipadapter_images` (one picture or a list, each read
at its own size: a `conditioning` column) is encoded as the pipeline's `prepare_ip_adapter` encodes it (resized and
normalised by `flux1.ip_adapter.preprocess`, then the encoder's pooled vector): `"ipadapter_embeds"` [N, E], one
vector per picture. Only the image encoder is frozen in every mode, so the cache holds its output and nothing the
adapter computes (1152 floats per picture, where the IP tokens are 128 x 4096 and the per-block keys/values some
45 M numbers): the adapter loads with the denoiser and `velocity` turns each row's vectors into its per-block keys
and values at scale 1 (`FluxIPAdapter.forward`, as the pipeline), handed to `flux_velocity` as the pipeline's
denoise step hands them. Training the DiT (LoRA) keeps the adapter frozen; `trained_model="ipadapter"`
(`--trainable_models ipadapter`, DiffSynth-Studio's name) trains the adapter in full under the frozen DiT (its image
projection and every block's `to_k_ip` / `to_v_ip`), saved as `<step>/ipadapter/diffusion_pytorch_model.safetensors`
in the released file's keys (`image_proj.*`, `ip_adapter.N.*`: `ip-adapter.bin`'s two groups flattened; XLabs'
names for an XLabs adapter), which `load_ip_adapter` reads strictly. Validation samples take `--validation_images`
as their `ipadapter_images` (the image encoder must be loaded: not from a cache).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.media import load_image
from diffsynth.runtime.pipeline import weight_paths
from diffsynth.runtime.vram import module_dtype

from ..flux1.ip_adapter import IPAdapterKV
from ..pipeline import FluxImagePipeline
from .rows import picture

if TYPE_CHECKING:
    from ..training import FluxTrainingTask


IP_COLUMN = "ipadapter_images"  # the IP-Adapter's reference picture(s) (DiffSynth-Studio's --extra_inputs)
IP_EMBEDS = "ipadapter_embeds"  # an encoded row's image-encoder vectors [N, E]
IP_ADAPTER_HINT = (
    "add the adapter and its image encoder to the models (e.g. --model_id_with_origin_paths "
    "InstantX/FLUX.1-dev-IP-Adapter:ip-adapter.bin,google/siglip-so400m-patch14-384:model.safetensors)"
)


def encode_ip_images(task: FluxTrainingTask, index: int, row: Mapping[str, Any]) -> torch.Tensor:
    """`[N, E]` (float32): the image encoder's vectors of the row's reference picture(s), as the pipeline's
    `prepare_ip_adapter` computes them (`preprocess` to the encoder's input, then `image_embeds`)."""
    from ..flux1.ip_adapter import preprocess

    where = f"row {index} of the batch (prompt {str(row['prompt'])[:60]!r})"
    encoder = task.pipe.ipadapter_image_encoder
    if encoder is None:
        missing = "its image encoder is not loaded" if task.ip_adapter else "no IP-Adapter is among the models"
        raise ConfigError(f"{where} has {IP_COLUMN}, but {missing}: {IP_ADAPTER_HINT}")
    value = row[IP_COLUMN]
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    names = [IP_COLUMN] if len(values) == 1 else [f"{IP_COLUMN}[{k}]" for k in range(len(values))]
    images = [load_image(picture(index, v, n, IP_COLUMN)) for v, n in zip(values, names, strict=True)]
    pixels = preprocess(images, encoder.kind, encoder.config.image_size)
    with torch.no_grad():
        return encoder.image_embeds(pixels.to(task.pipe.device, module_dtype(encoder))).float()


def ip_keys(task: FluxTrainingTask, batch: Mapping[str, Any], adapter: nn.Module | None) -> IPAdapterKV | None:
    """Each row's IP-Adapter keys/values at scale 1, from the trained `adapter` (with gradients) or the
    pipeline's frozen one, as `prepare_ip_adapter` makes them of the row's image vectors; rows side by side
    on the batch axis. None for a batch without reference pictures."""
    embeds = batch.get(IP_EMBEDS)
    if embeds is None:
        if adapter is not None:
            raise ConfigError(
                f"training the IP-Adapter needs batches with {IP_COLUMN}; a cache encoded without them has none: "
                "encode it again"
            )
        return None
    frozen = adapter is None
    adapter = task.pipe.ipadapter if frozen else adapter
    if adapter is None:
        raise ConfigError(
            f"this batch has {IP_COLUMN}, but no IP-Adapter is loaded: {IP_ADAPTER_HINT}; or encode the cache "
            "again without them"
        )
    config = getattr(adapter, "module", adapter).config  # DDP wraps a trained adapter
    if embeds.shape[-1] != config.image_embed_dim:
        raise ConfigError(
            f"this batch's {IP_COLUMN} were encoded into {embeds.shape[-1]}-wide vectors, and the IP-Adapter "
            f"takes {config.image_embed_dim}: the cache was encoded with another image encoder; encode it again"
        )
    heads = task.pipe.dit.config.num_heads
    with torch.no_grad() if frozen else contextlib.nullcontext():
        rows = [adapter(row, heads, 1.0) for row in embeds]
    if len(rows) == 1:
        return rows[0]

    def stack(layers):
        return [tuple(torch.cat(parts) for parts in zip(*pairs, strict=True)) for pairs in zip(*layers, strict=True)]

    first = rows[0]
    return IPAdapterKV(stack([r.double for r in rows]), stack([r.single for r in rows]), first.scale, first.after_mlp)


def ip_adapter_sources(model_configs: Sequence[ModelConfig]) -> tuple[tuple | None, list[ModelConfig]]:
    """The IP-Adapter file and the image encoder listed with it (`(adapter, encoder or None)`, None without an
    adapter), and the configs other than the adapter (the encoder stays among them: Redux may share it)."""
    from ..flux1.ip_adapter import source_part

    parts = [source_part(weight_paths(config)) for config in model_configs]
    adapters = [config for config, part in zip(model_configs, parts, strict=True) if part == "adapter"]
    if not adapters:
        return None, list(model_configs)
    if len(adapters) > 1:
        raise ConfigError(f"the model files hold {len(adapters)} IP-Adapters ({adapters}); give one")
    encoders = [config for config, part in zip(model_configs, parts, strict=True) if part == "image_encoder"]
    if len(encoders) > 1:
        raise ConfigError(f"the model files hold {len(encoders)} image encoders ({encoders}); give the adapter's one")
    rest = [config for config, part in zip(model_configs, parts, strict=True) if part != "adapter"]
    return (adapters[0], encoders[0] if encoders else None), rest


def load_ip_adapter_parts(
    pipe: FluxImagePipeline, adapter: ModelConfig, encoder: ModelConfig | None, *, encoders: bool, denoiser: bool
) -> None:
    """The IP-Adapter's parts a stage needs, frozen: the image encoder for encoding, the adapter for the model
    call; both through the pipeline's `load_ip_adapter` when a stage loads both."""
    from ..flux1.ip_adapter import check_fits, load_image_encoder, load_ip_adapter_model

    if encoders and encoder is None:
        raise ConfigError(
            f"the IP-Adapter {adapter} needs its image encoder among the models to encode ipadapter_images: "
            f"{IP_ADAPTER_HINT}"
        )
    if encoders and denoiser:
        pipe.load_ip_adapter(adapter, image_encoder=encoder)
        return
    if denoiser:
        model = load_ip_adapter_model(weight_paths(adapter), pipe.torch_dtype, double_blocks=pipe.dit.config.depth)
        check_fits(model, pipe.dit)
        pipe.ipadapter = model.eval().requires_grad_(False).to(pipe.device)
        pipe.model_configs["ipadapter"] = adapter
    if encoders:
        tower = load_image_encoder(weight_paths(encoder), pipe.torch_dtype)
        pipe.ipadapter_image_encoder = tower.eval().requires_grad_(False).to(pipe.device)
        pipe.model_configs["ipadapter_image_encoder"] = encoder


def collate_ip_embeds(samples: list[Mapping[str, torch.Tensor]]) -> dict[str, Any]:
    """The rows' image-encoder vectors stacked (none for a batch without); one picture count per batch."""
    batch: dict[str, Any] = {}
    if IP_EMBEDS in samples[0]:
        counts = [s[IP_EMBEDS].shape[0] for s in samples]
        if len(set(counts)) > 1:
            raise ConfigError(
                f"the rows of a batch have {counts} {IP_COLUMN}; rows with different picture counts cannot share "
                "a batch: train with --batch_size 1"
            )
        batch[IP_EMBEDS] = torch.stack([s[IP_EMBEDS] for s in samples])
    return batch
