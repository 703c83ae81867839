"""FLUX.1 IP-Adapters: an image prompt as extra keys/values the DiT's image queries attend to.

An image encoder turns each reference image into one vector; a projection turns that vector into
`num_tokens` IP tokens (T5 width); per DiT block, `to_k_ip` / `to_v_ip` turn the tokens into keys
and values; the block's normalised image queries (QK-norm applied, no RoPE) attend to them and the
result, times `scale`, joins the image stream. Two released formats, told apart by their keys:

- InstantX `FLUX.1-dev-IP-Adapter` (`ip-adapter.bin`, a pickle `{"image_proj": ..., "ip_adapter": ...}`):
  SigLIP so400m `pooler_output` (1152) -> `image_proj` (Linear, GELU, Linear, LayerNorm; 128 tokens);
  one `ip_adapter.N` (bias-free projections) per block, the 19 double blocks first, then the 38
  single ones. Keys get an RMS norm per head (eps 1e-5, no weight; the reference hard-codes 128,
  FLUX.1's head width). Double blocks add the result to the image part of the attention output
  before `img_attn.proj`; single blocks to the whole `[text, image]` attention output before
  `linear2` (the queries of every token attend), as InstantX's attention processor does.
- XLabs `flux-ip-adapter` (`ip_adapter.safetensors`): CLIP ViT-L/14 `image_embeds` (768) ->
  `ip_adapter_proj_model` (Linear, LayerNorm; 4 tokens, 16 in v2); double blocks only, with biases,
  no key norm; the result is added to the image tokens after the block's MLP (diffusers'
  `FluxIPAdapterAttnProcessor`). We rename its keys to ours (`xlabs_to_ours`).

Several reference images give one longer token sequence (their tokens side by side), shared by every
prompt of the batch. Keys/values are computed once per generation (`FluxIPAdapter.forward`), so the
adapter's 5 GB of weights need not stay on the device while denoising.

Image preprocessing is fixed, as the references' processors do it: SigLIP resizes to its square size
(bicubic) and maps [0, 255] to [-1, 1]; CLIP resizes the short side (bicubic), centre-crops and
normalises with the OpenAI CLIP mean/std.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from diffsynth.runtime.attention import attention
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.registry import KeyLayout, ModelSpec, StateDict, check_config_facts

INSTANTX, XLABS = "instantx", "xlabs"
FORMATS = (INSTANTX, XLABS)
KEY_NORM_EPS = 1e-5  # InstantX's RMS norm of the IP keys
INSTANTX_DOUBLE_BLOCKS = 19  # FLUX.1-dev: the first 19 of the 57 `ip_adapter.N` belong to double blocks
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class FluxIPAdapterConfig:
    """Shapes of a FLUX.1 IP-Adapter; defaults are InstantX FLUX.1-dev-IP-Adapter."""

    format: str = INSTANTX
    image_embed_dim: int = 1152  # SigLIP so400m pooled width (XLabs: CLIP-L projection, 768)
    context_dim: int = 4096  # IP token width (the DiT's T5 width)
    num_tokens: int = 128  # IP tokens per image (XLabs: 4, v2: 16)
    hidden_size: int = 3072  # the DiT's width
    double_blocks: int = 19
    single_blocks: int = 38

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"FluxIPAdapterConfig.format={self.format!r} must be one of {FORMATS}")
        for name in ("image_embed_dim", "context_dim", "num_tokens", "hidden_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"FluxIPAdapterConfig.{name}={value!r} must be a positive integer")
        for name in ("double_blocks", "single_blocks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"FluxIPAdapterConfig.{name}={value!r} must be a non-negative integer")
        if self.format == XLABS and self.single_blocks:
            raise ValueError(f"FluxIPAdapterConfig.single_blocks={self.single_blocks}: XLabs adapters have none")

    @property
    def blocks(self) -> int:
        return self.double_blocks + self.single_blocks

    @property
    def after_mlp(self) -> bool:
        """XLabs adds the IP attention after the block's MLP; InstantX before the output projection."""
        return self.format == XLABS


class MLPImageProjection(nn.Module):
    """InstantX `image_proj`: Linear(e, 2e), GELU, Linear(2e, tokens * ctx), LayerNorm per token."""

    def __init__(self, config: FluxIPAdapterConfig):
        super().__init__()
        e, ctx = config.image_embed_dim, config.context_dim
        self.num_tokens = config.num_tokens
        self.proj = nn.Sequential(nn.Linear(e, 2 * e), nn.GELU(), nn.Linear(2 * e, ctx * config.num_tokens))
        self.norm = nn.LayerNorm(ctx)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(embeds).unflatten(-1, (self.num_tokens, -1)))


class LinearImageProjection(nn.Module):
    """XLabs `ip_adapter_proj_model`: Linear(e, tokens * ctx), LayerNorm per token."""

    def __init__(self, config: FluxIPAdapterConfig):
        super().__init__()
        self.num_tokens = config.num_tokens
        self.proj = nn.Linear(config.image_embed_dim, config.context_dim * config.num_tokens)
        self.norm = nn.LayerNorm(config.context_dim)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(embeds).unflatten(-1, (self.num_tokens, -1)))


class IPKeyValue(nn.Module):
    """One block's `to_k_ip` / `to_v_ip`: IP tokens -> keys and values of the DiT's width."""

    def __init__(self, config: FluxIPAdapterConfig):
        super().__init__()
        bias = config.format == XLABS
        self.to_k_ip = nn.Linear(config.context_dim, config.hidden_size, bias=bias)
        self.to_v_ip = nn.Linear(config.context_dim, config.hidden_size, bias=bias)


@dataclass
class BlockIP:
    """What one DiT block reads: keys/values `[1 or B, N, heads, head_dim]`, the scale and where to add."""

    k: torch.Tensor
    v: torch.Tensor
    scale: float
    after_mlp: bool

    def attend(self, q: torch.Tensor) -> torch.Tensor:
        """`scale * attention(q, k, v)` for normalised queries `q` `[B, L, H, D]` -> `[B, L, H * D]`."""
        b = q.shape[0]
        k = self.k.to(q.dtype).expand(b, -1, -1, -1)
        v = self.v.to(q.dtype).expand(b, -1, -1, -1)
        return self.scale * attention(q, k, v).flatten(2)


@dataclass
class IPAdapterKV:
    """Per-block IP keys/values for `Flux1DiT.forward(ip_adapter=...)`: `double[i]` / `single[i]` are
    `(k, v)` `[1 or B, N, heads, head_dim]` (an empty `single` for adapters without single layers)."""

    double: list[tuple[torch.Tensor, torch.Tensor]]
    single: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    scale: float = 1.0
    after_mlp: bool = False

    def blocks(self, n_double: int, n_single: int, batch: int) -> tuple[list[BlockIP], list[BlockIP | None]]:
        """Checked per-block inputs for a DiT with `n_double` / `n_single` blocks and batch `batch`."""
        if len(self.double) != n_double or len(self.single) not in (0, n_single):
            raise ValueError(
                f"ip_adapter has {len(self.double)} double + {len(self.single)} single block layers; the DiT has "
                f"{n_double} double + {n_single} single blocks"
            )
        for k, v in [*self.double, *self.single]:
            if k.dim() != 4 or k.shape[0] not in (1, batch) or k.shape != v.shape:
                raise ValueError(
                    f"ip_adapter keys {tuple(k.shape)} / values {tuple(v.shape)}: expected equal [1 or B={batch}, N, H, D]"
                )
        double = [BlockIP(k, v, self.scale, self.after_mlp) for k, v in self.double]
        single = [BlockIP(k, v, self.scale, self.after_mlp) for k, v in self.single] or [None] * n_single
        return double, single

    def cat(self, other: IPAdapterKV, batch: int, other_batch: int) -> IPAdapterKV:
        """The two CFG branches as one batch: this one's keys for `batch` rows, then `other`'s."""
        if (self.scale, self.after_mlp, len(self.double), len(self.single)) != (
            other.scale,
            other.after_mlp,
            len(other.double),
            len(other.single),
        ):
            raise ValueError("the two IPAdapterKV to batch differ in scale, kind or block count")

        def join(a, b):
            return [
                tuple(
                    torch.cat([x.expand(batch, -1, -1, -1), y.expand(other_batch, -1, -1, -1)])
                    for x, y in zip(p, q, strict=True)
                )
                for p, q in zip(a, b, strict=True)
            ]

        return IPAdapterKV(join(self.double, other.double), join(self.single, other.single), self.scale, self.after_mlp)


class FluxIPAdapter(nn.Module):
    """The image projection and per-block key/value layers of a FLUX.1 IP-Adapter (InstantX or XLabs).

    State-dict names are InstantX's (`image_proj.*`, `ip_adapter.N.to_k_ip.weight`), so `ip-adapter.bin`
    loads as is; XLabs files are renamed (`xlabs_to_ours`).
    """

    offload_units = ("ip_adapter",)

    def __init__(self, config: FluxIPAdapterConfig | None = None):
        super().__init__()
        self.config = config = config if config is not None else FluxIPAdapterConfig()
        projection = MLPImageProjection if config.format == INSTANTX else LinearImageProjection
        self.image_proj = projection(config)
        self.ip_adapter = nn.ModuleList(IPKeyValue(config) for _ in range(config.blocks))

    def image_tokens(self, embeds: torch.Tensor) -> torch.Tensor:
        """Image-encoder vectors `[N_images, image_embed_dim]` -> IP tokens `[1, N_images * num_tokens, ctx]`."""
        if embeds.dim() != 2 or embeds.shape[-1] != self.config.image_embed_dim:
            raise ValueError(
                f"image embeddings have shape {tuple(embeds.shape)}; expected [N, {self.config.image_embed_dim}]"
            )
        dtype = self.image_proj.norm.weight.dtype
        return self.image_proj(embeds.to(dtype)).flatten(0, 1)[None]

    def forward(self, embeds: torch.Tensor, num_heads: int, scale: float = 1.0) -> IPAdapterKV:
        """Per-block keys/values for image-encoder vectors `embeds` `[N_images, image_embed_dim]`."""
        tokens = self.image_tokens(embeds)
        kv = []
        for layer in self.ip_adapter:
            k = layer.to_k_ip(tokens).unflatten(-1, (num_heads, -1))
            v = layer.to_v_ip(tokens).unflatten(-1, (num_heads, -1))
            if self.config.format == INSTANTX:
                k = F.rms_norm(k.float(), (k.shape[-1],), eps=KEY_NORM_EPS).to(k.dtype)
            kv.append((k, v))
        n = self.config.double_blocks
        return IPAdapterKV(kv[:n], kv[n:], float(scale), self.config.after_mlp)


def check_fits(adapter: FluxIPAdapter, dit) -> None:
    """Raise `ConfigError` when the adapter's width or block counts differ from the DiT's."""
    a, d = adapter.config, dit.config
    singles = (0, d.depth_single_blocks) if a.format == XLABS else (d.depth_single_blocks,)
    if a.hidden_size != d.hidden_size or a.double_blocks != d.depth or a.single_blocks not in singles:
        raise ConfigError(
            f"the IP-Adapter ({a.format}: width {a.hidden_size}, {a.double_blocks} double + {a.single_blocks} "
            f"single block layers) does not fit the DiT (width {d.hidden_size}, {d.depth} double + "
            f"{d.depth_single_blocks} single blocks)"
        )


# ----------------------------------------------------------------------------------------- formats
_XLABS_RULES = (
    (re.compile(r"ip_adapter_proj_model\.(proj|norm)\.(weight|bias)"), "image_proj.{}.{}"),
    (
        re.compile(r"double_blocks\.(\d+)\.processor\.ip_adapter_double_stream_k_proj\.(weight|bias)"),
        "ip_adapter.{}.to_k_ip.{}",
    ),
    (
        re.compile(r"double_blocks\.(\d+)\.processor\.ip_adapter_double_stream_v_proj\.(weight|bias)"),
        "ip_adapter.{}.to_v_ip.{}",
    ),
)
_OURS_TO_XLABS = (
    (re.compile(r"image_proj\.(proj|norm)\.(weight|bias)"), "ip_adapter_proj_model.{}.{}"),
    (
        re.compile(r"ip_adapter\.(\d+)\.to_k_ip\.(weight|bias)"),
        "double_blocks.{}.processor.ip_adapter_double_stream_k_proj.{}",
    ),
    (
        re.compile(r"ip_adapter\.(\d+)\.to_v_ip\.(weight|bias)"),
        "double_blocks.{}.processor.ip_adapter_double_stream_v_proj.{}",
    ),
)


def _rename(state: dict[str, torch.Tensor], rules, what: str) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for pattern, template in rules:
            if m := pattern.fullmatch(key):
                out[template.format(*m.groups())] = value
                break
        else:
            raise KeyError(f"{key} (no {what} mapping)")
    return out


def xlabs_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """XLabs `ip_adapter.safetensors` names -> ours; `KeyError` names a key without a mapping."""
    return _rename(state, _XLABS_RULES, "XLabs IP-Adapter")


def ours_to_xlabs(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our names of an XLabs-format adapter -> XLabs' (the inverse of `xlabs_to_ours`)."""
    return _rename(state, _OURS_TO_XLABS, "XLabs IP-Adapter")


def diffsynth_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DiffSynth-Studio's trained InstantX adapters name the layers `ipadapter_modules.N.*`."""
    return {re.sub(r"^ipadapter_modules\.", "ip_adapter.", k): v for k, v in state.items()}


def flatten_instantx(obj) -> dict[str, torch.Tensor]:
    """InstantX's pickle `{"image_proj": {...}, "ip_adapter": {...}}` as one flat `group.key` dict."""
    groups = ("image_proj", "ip_adapter")
    if isinstance(obj, dict) and obj and set(obj) <= set(groups) and all(isinstance(v, dict) for v in obj.values()):
        return {f"{g}.{k}": v for g, part in obj.items() if isinstance(part, dict) for k, v in part.items()}
    return obj


_LAYER = re.compile(r"ip_adapter\.(\d+)\.to_k_ip\.weight")


def config_from_state(state: StateDict, config_json: dict | None = None) -> FluxIPAdapterConfig:
    """Shapes give every size; InstantX's split of its layers into double / single blocks is FLUX.1-dev's
    (19 double) unless `config_json` gives `double_blocks` (the pipeline passes its DiT's)."""
    given = dict(config_json or {})
    k = state["ip_adapter.0.to_k_ip.weight"]
    hidden, ctx = k.shape
    layers = 1 + max(int(m.group(1)) for key in state if (m := _LAYER.fullmatch(key)))
    if "image_proj.proj.0.weight" in state:
        fmt, embed = INSTANTX, state["image_proj.proj.0.weight"].shape[1]
        out_features = state["image_proj.proj.2.weight"].shape[0]
        double = int(given.get("double_blocks", INSTANTX_DOUBLE_BLOCKS))
        if double > layers:
            raise ConfigError(f"the IP-Adapter has {layers} block layers, fewer than double_blocks={double}")
    else:
        fmt, embed = XLABS, state["image_proj.proj.weight"].shape[1]
        out_features = state["image_proj.proj.weight"].shape[0]
        double = layers
    if out_features % ctx:
        raise ConfigError(f"the IP-Adapter projection width {out_features} is not a multiple of the token width {ctx}")
    return FluxIPAdapterConfig(fmt, embed, ctx, out_features // ctx, hidden, double, layers - double)


FLUX_IP_ADAPTER_SPEC = ModelSpec(
    name="flux1_ip_adapter",
    role="flux_ip_adapter",
    layouts=(
        KeyLayout(
            "instantx",
            (
                "image_proj.proj.0.weight",
                "image_proj.proj.2.weight",
                "image_proj.norm.weight",
                "ip_adapter.0.to_k_ip.weight",
                "ip_adapter.0.to_v_ip.weight",
            ),
        ),
        KeyLayout(
            "diffsynth",
            (
                "image_proj.proj.0.weight",
                "image_proj.proj.2.weight",
                "image_proj.norm.weight",
                "ipadapter_modules.0.to_k_ip.weight",
                "ipadapter_modules.0.to_v_ip.weight",
            ),
            convert=diffsynth_to_ours,
        ),
        KeyLayout(
            "xlabs",
            (
                "ip_adapter_proj_model.proj.weight",
                "ip_adapter_proj_model.norm.weight",
                "double_blocks.0.processor.ip_adapter_double_stream_k_proj.weight",
                "double_blocks.0.processor.ip_adapter_double_stream_v_proj.weight",
            ),
            convert=xlabs_to_ours,
        ),
        KeyLayout(
            "ours-xlabs",
            (
                "image_proj.proj.weight",
                "image_proj.norm.weight",
                "ip_adapter.0.to_k_ip.weight",
                "ip_adapter.0.to_v_ip.weight",
            ),
        ),
    ),
    config_from_state=config_from_state,
    build=FluxIPAdapter,
    description="FLUX.1 IP-Adapter (InstantX ip-adapter.bin, XLabs ip_adapter.safetensors)",
)


def read_ip_adapter_state(path: str) -> dict[str, torch.Tensor]:
    """The tensors of an IP-Adapter file: safetensors as stored, InstantX's nested pickle flattened."""
    from diffsynth.runtime.checkpoint import open_checkpoint

    if str(path).endswith((".bin", ".pt", ".pth", ".ckpt")):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        flat = flatten_instantx(obj)
        if isinstance(flat, dict) and flat and all(isinstance(v, torch.Tensor) for v in flat.values()):
            return flat
    state = open_checkpoint(path)
    return {k: state[k] for k in state}


def source_part(paths: str | Sequence[str]) -> str | None:
    """What a model file or folder given among a pipeline's `model_configs` is to the IP-Adapter, told from its
    key names: "adapter" (any IP-Adapter layout), "image_encoder" (a SigLIP or CLIP vision tower, alone or in a
    whole two-tower model), or None (another model: the DiT, a text encoder, the VAE). Safetensors are told from
    their headers; pickles are read (memory-mapped), as InstantX's nested `ip-adapter.bin` needs."""
    from diffsynth.runtime.checkpoint import TORCH_SUFFIXES, open_checkpoint, weight_files
    from diffsynth.runtime.errors import DiffSynthError

    keys: set[str] = set()
    for path in weight_files(paths):
        try:
            keys |= set(read_ip_adapter_state(path) if path.endswith(TORCH_SUFFIXES) else open_checkpoint(path))
        except DiffSynthError:
            return None  # not a state dict this part reads; the pipeline's own loading names the problem
    if FLUX_IP_ADAPTER_SPEC.match(keys) is not None:
        return "adapter"
    vision = [k for k in keys if not k.startswith(_OTHER_TOWER) and not k.endswith("position_ids")]
    if vision and any(spec.match(vision) is not None for spec in (SIGLIP_VISION_SPEC, CLIP_VISION_SPEC)):
        return "image_encoder"
    return None


def load_ip_adapter_model(
    paths: str | Sequence[str], torch_dtype=None, double_blocks: int | None = None
) -> FluxIPAdapter:
    """An IP-Adapter from its file(s) or folder, loaded strictly; `double_blocks` is the DiT's (InstantX)."""
    from diffsynth.runtime.checkpoint import weight_files
    from diffsynth.runtime.loading import load_models

    state: dict[str, torch.Tensor] = {}
    for path in weight_files(paths):
        state.update(read_ip_adapter_state(path))
    config = {"double_blocks": double_blocks} if double_blocks is not None else None
    (loaded,) = load_models(state, torch_dtype, "cpu", specs=[FLUX_IP_ADAPTER_SPEC], config=config)
    return loaded.module


def load_image_encoder(paths: str | Sequence[str], torch_dtype=None) -> nn.Module:
    """The SigLIP or CLIP vision tower in a file or folder (a whole CLIP/SigLIP model's text tower is
    skipped); the `config.json` beside the weights, when present, gives what shapes cannot."""
    from diffsynth.runtime.checkpoint import open_checkpoint
    from diffsynth.runtime.loading import config_json_beside, load_models

    state = open_checkpoint(paths)
    config = config_json_beside(list(state.files))
    specs = [SIGLIP_VISION_SPEC, CLIP_VISION_SPEC]
    (loaded,) = load_models(vision_keys(state), torch_dtype, "cpu", specs=specs, config=config)
    return loaded.module


# ----------------------------------------------------------------------------------------- image encoders
class _VisionBuffers:
    """`position_ids` is a non-persistent buffer no checkpoint carries: rebuilt after a meta build."""

    def materialize_buffers(self) -> None:
        tower = getattr(self, "vision_model", self)  # transformers 5's SigLIP tower has no `vision_model`
        embeddings = tower.embeddings
        device = embeddings.patch_embedding.weight.device
        if embeddings.position_ids.device.type == "meta" and device.type != "meta":
            ids = torch.arange(embeddings.position_embedding.num_embeddings, device=device).expand((1, -1))
            embeddings.register_buffer("position_ids", ids, persistent=False)


@cache
def encoder_classes() -> dict[str, type[nn.Module]]:
    """Our SigLIP / CLIP image encoder classes (transformers is imported on first use only)."""
    from transformers import CLIPVisionModelWithProjection, SiglipVisionModel

    class SiglipImageEncoder(_VisionBuffers, SiglipVisionModel):
        """transformers' `SiglipVisionModel`; `image_embeds` is its `pooler_output` (the MAP head).

        transformers 5 names its weights without the `vision_model.` prefix that hub files carry.
        """

        offload_units = ("encoder.layers",)
        kind = "siglip"

        def __init__(self, config):
            super().__init__(config)
            self.register_load_state_dict_post_hook(_rebuild_after_load)

        def image_embeds(self, pixels: torch.Tensor) -> torch.Tensor:
            return self(pixel_values=pixels).pooler_output

    class CLIPImageEncoder(_VisionBuffers, CLIPVisionModelWithProjection):
        """transformers' `CLIPVisionModelWithProjection`; `image_embeds` is the projected class token."""

        offload_units = ("vision_model.encoder.layers",)
        kind = "clip"

        def __init__(self, config):
            super().__init__(config)
            self.register_load_state_dict_post_hook(_rebuild_after_load)

        def image_embeds(self, pixels: torch.Tensor) -> torch.Tensor:
            return self(pixel_values=pixels).image_embeds

    return {"siglip": SiglipImageEncoder, "clip": CLIPImageEncoder}


def _rebuild_after_load(module, incompatible_keys) -> None:
    module.materialize_buffers()


_ENCODER_LAYER = re.compile(r"(?:vision_model\.)?encoder\.layers\.(\d+)\.")
_HEADS_BY_WIDTH = {768: 12, 1024: 16, 1152: 16, 1280: 16}  # CLIP-B, CLIP-L, SigLIP so400m, CLIP-H


def _vision_fields(state: StateDict, config_json: dict | None, model_types: tuple[str, str], prefix: str) -> dict:
    """Vision-tower config fields: shapes, then the `config.json` (a whole CLIP/SigLIP config or the vision part)."""
    given = dict(config_json or {})
    if given.get("model_type") == model_types[0] and isinstance(given.get("vision_config"), dict):
        given = dict(given["vision_config"])
    elif given.get("model_type") != model_types[1]:
        given = {}
    given = {k: v for k, v in given.items() if not k.startswith("_") and k not in ("architectures", "model_type")}
    hidden, _, patch, _ = state[f"{prefix}embeddings.patch_embedding.weight"].shape
    layers = {int(m.group(1)) for k in state if (m := _ENCODER_LAYER.match(k))}
    facts = dict(
        hidden_size=hidden,
        patch_size=patch,
        num_hidden_layers=max(layers) + 1 if layers else 0,
        intermediate_size=state[f"{prefix}encoder.layers.0.mlp.fc1.weight"].shape[0],
    )
    check_config_facts("the image encoder's config.json", given, facts)
    given.setdefault("num_attention_heads", _HEADS_BY_WIDTH.get(hidden, max(1, hidden // 64)))
    return {**given, **facts}


# (patch size, patches per side) -> the released input size where the patches do not cover it exactly:
# google/siglip-so400m-patch14-384 (InstantX's IP-Adapter, FLUX.1 Redux) takes 384 pixels, 27 patches of 14
_SIGLIP_RELEASED_SIZES = {(14, 27): 384}


def siglip_config_from_state(state: StateDict, config_json: dict | None = None):
    fields = _vision_fields(state, config_json, ("siglip", "siglip_vision_model"), "")
    side = int(round(state["embeddings.position_embedding.weight"].shape[0] ** 0.5))
    # without a config.json (the file listed alone, as DiffSynth-Studio lists the IP-Adapter's encoder)
    fields.setdefault(
        "image_size", _SIGLIP_RELEASED_SIZES.get((fields["patch_size"], side), side * fields["patch_size"])
    )
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(**fields)


def clip_vision_config_from_state(state: StateDict, config_json: dict | None = None):
    fields = _vision_fields(state, config_json, ("clip", "clip_vision_model"), "vision_model.")
    positions = state["vision_model.embeddings.position_embedding.weight"].shape[0]  # patches + class token
    fields.setdefault("image_size", int(round((positions - 1) ** 0.5)) * fields["patch_size"])
    fields["projection_dim"] = state["visual_projection.weight"].shape[0]
    fields.setdefault("hidden_act", "quick_gelu")
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(**fields)


_SIGLIP_SIGNATURE = ("embeddings.patch_embedding.weight", "head.probe", "post_layernorm.weight")
SIGLIP_VISION_SPEC = ModelSpec(
    name="siglip_vision",
    role="ip_adapter_image_encoder",
    layouts=(
        # hub files (a whole `SiglipModel`, or a transformers 4 `SiglipVisionModel` such as Redux's)
        KeyLayout("transformers4", _SIGLIP_SIGNATURE, prefix="vision_model."),
        # transformers 5 `SiglipVisionModel`
        KeyLayout(
            "transformers5", _SIGLIP_SIGNATURE, owns_prefixes=("embeddings.", "encoder.", "post_layernorm.", "head.")
        ),
    ),
    config_from_state=siglip_config_from_state,
    build=lambda config: encoder_classes()["siglip"](config),
    description="SigLIP vision tower (google/siglip-so400m-patch14-384), InstantX IP-Adapter image encoder",
)
CLIP_VISION_SPEC = ModelSpec(
    name="clip_vision",
    role="ip_adapter_image_encoder",
    layouts=(
        KeyLayout(
            "transformers",
            ("vision_model.embeddings.class_embedding", "vision_model.pre_layrnorm.weight", "visual_projection.weight"),
            owns_prefixes=("vision_model.", "visual_projection."),
        ),
    ),
    config_from_state=clip_vision_config_from_state,
    build=lambda config: encoder_classes()["clip"](config),
    description="CLIP vision tower with projection (openai/clip-vit-large-patch14), XLabs IP-Adapter image encoder",
)
_OTHER_TOWER = ("text_model.", "text_projection.", "logit_scale", "logit_bias")


def vision_keys(state: StateDict) -> dict[str, torch.Tensor]:
    """A CLIP/SigLIP file's vision tower: the text tower of a whole `CLIPModel` / `SiglipModel` is dropped."""
    return {k: state[k] for k in state if not k.startswith(_OTHER_TOWER) and not k.endswith("position_ids")}


def preprocess(images: Sequence[Image.Image], kind: str, size: int) -> torch.Tensor:
    """Pixels `[N, 3, size, size]` as the encoder expects them (see the module docstring)."""
    arrays = []
    for image in images:
        image = image.convert("RGB")
        if kind == "siglip":
            image = image.resize((size, size), Image.BICUBIC)
            mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
        else:
            w, h = image.size
            short = min(w, h)
            resized = (size, int(size * h / w)) if w == short else (int(size * w / h), size)
            image = image.resize(resized, Image.BICUBIC)
            left, top = (image.width - size) // 2, (image.height - size) // 2
            image = image.crop((left, top, left + size, top + size))
            mean, std = CLIP_MEAN, CLIP_STD
        x = np.asarray(image, dtype=np.float32) / 255.0
        arrays.append((x - np.array(mean, dtype=np.float32)) / np.array(std, dtype=np.float32))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


__all__ = [
    "CLIP_VISION_SPEC",
    "FLUX_IP_ADAPTER_SPEC",
    "FluxIPAdapter",
    "FluxIPAdapterConfig",
    "IPAdapterKV",
    "SIGLIP_VISION_SPEC",
    "source_part",
    "check_fits",
    "encoder_classes",
    "load_image_encoder",
    "load_ip_adapter_model",
    "config_from_state",
    "ours_to_xlabs",
    "preprocess",
    "read_ip_adapter_state",
    "vision_keys",
    "xlabs_to_ours",
]
