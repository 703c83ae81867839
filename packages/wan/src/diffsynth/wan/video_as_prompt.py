"""Video-As-Prompt (ByteDance/Video-As-Prompt-Wan2.1-14B): a Mixture-of-Transformers expert beside a frozen
Wan 2.1 I2V 14B DiT.

The reference video (its VAE latent, the I2V conditioning of its first frame, its own caption and the CLIP
tokens of its first frame) is embedded by the expert's own input layers and runs through the expert's blocks,
one beside each DiT layer in `mot_layers`. At those layers the two token sets share one self-attention (queries,
keys and values of both concatenated, each projected and rotated by its own block); cross-attention, the
feed-forward and the modulation stay separate. The reference is always "clean": the expert's timestep is 1.
Its RoPE puts the reference frames at negative times (-F .. -1), before the generated video's 0 .. F-1; rows and
columns are shared. Only the DiT's output is used: the expert has no head.

The expert's keys live in the same `transformer/` files as the DiT (diffusers layout), with `_mot_ref` after the
module name (`patch_embedding_mot_ref.*`, `condition_embedder_mot_ref.*`, `blocks.N.attn1_mot_ref.*` with N the
DiT layer). `split_state_dict` routes them here (renamed to our module names) and the rest to the DiT.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from diffsynth.runtime.attention import attention
from diffsynth.runtime.errors import CheckpointError, ConfigError, preview
from diffsynth.runtime.layers import rope_inverse_frequencies, rope_tables, rotate
from diffsynth.runtime.registry import KeyLayout

from .dit import ImageEmbedding, Rope, WanBlock, WanDiT, _heads, add_input_layers, text_tokens, time_modulation

logger = logging.getLogger(__name__)

MOT_SUFFIX = "_mot_ref"
RELEASED_MOT_LAYERS = (0, 4, 8, 12, 16, 20, 24, 28, 32, 36)  # DiffSynth-Studio's `MotWanModel` default


@dataclass
class VideoAsPromptConfig:
    """The expert's sizes; defaults are the released Video-As-Prompt-Wan2.1-14B expert (beside Wan2.1-I2V-14B)."""

    dim: int = 5120
    num_heads: int = 40
    ffn_dim: int = 13824
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    in_dim: int = 36  # 16 latent + 4 mask + 16 first-frame latent channels, as the I2V DiT's
    image_dim: int = 1280
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    rope_theta: float = 10000.0
    mot_layers: tuple[int, ...] = field(default=RELEASED_MOT_LAYERS)
    num_layers: int = 40  # the DiT's layer count (mot_layers index into it)
    reference_timestep: float = 1.0  # the authors' "clean" timestep for the reference tokens

    has_image_input = True  # read by `WanBlock` (the expert's cross-attention has CLIP keys/values)

    def __post_init__(self):
        self.patch_size = tuple(self.patch_size)
        self.mot_layers = tuple(int(i) for i in self.mot_layers)
        if self.dim % self.num_heads:
            raise ConfigError(f"dim={self.dim} must be divisible by num_heads={self.num_heads}")
        if (self.dim // self.num_heads) % 2:
            raise ConfigError(f"head_dim={self.dim // self.num_heads} must be even (RoPE)")
        if not self.mot_layers:
            raise ConfigError("mot_layers is empty: the expert needs at least one layer")
        if list(self.mot_layers) != sorted(set(self.mot_layers)):
            raise ConfigError(f"mot_layers={self.mot_layers} must be strictly increasing")
        if self.mot_layers[0] < 0 or self.mot_layers[-1] >= self.num_layers:
            raise ConfigError(f"mot_layers={self.mot_layers} must lie in [0, num_layers={self.num_layers})")
        if len(self.patch_size) != 3:
            raise ConfigError(f"patch_size={self.patch_size} must have 3 entries")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_axes_dims(self) -> tuple[int, int, int]:
        hw = 2 * (self.head_dim // 6)
        return (self.head_dim - 2 * hw, hw, hw)


# ----------------------------------------------------------------------------------- keys
# official (diffusers layout, `_mot_ref` removed) -> ours; `{}` is the expert block index in ours and the DiT
# layer in the official names. `.weight` / `.bias` are appended.
_TOP = {
    "patch_embedding": "patch_embedding",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.image_embedder.norm1": "img_emb.proj.0",
    "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",
    "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3",
    "condition_embedder.image_embedder.norm2": "img_emb.proj.4",
}
_BLOCK = {
    "attn1.to_q": "self_attn.q",
    "attn1.to_k": "self_attn.k",
    "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn2.to_q": "cross_attn.q",
    "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "attn2.add_k_proj": "cross_attn.k_img",
    "attn2.add_v_proj": "cross_attn.v_img",
    "norm2": "norm3",  # the affine cross-attention pre-norm
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
}
_BLOCK_WEIGHT_ONLY = {
    "attn1.norm_q": "self_attn.norm_q",
    "attn1.norm_k": "self_attn.norm_k",
    "attn2.norm_q": "cross_attn.norm_q",
    "attn2.norm_k": "cross_attn.norm_k",
    "attn2.norm_added_k": "cross_attn.norm_k_img",
}


def _official_block_table() -> dict[str, str]:
    """Block keys: official name with `{}` = DiT layer (without the suffix) -> ours with `{}` = expert index."""
    table = {}
    for official, ours in _BLOCK.items():
        for p in ("weight", "bias"):
            table[f"{official}.{p}"] = f"{ours}.{p}"
    for official, ours in _BLOCK_WEIGHT_ONLY.items():
        table[f"{official}.weight"] = f"{ours}.weight"
    table["scale_shift_table"] = "modulation"
    return table


BLOCK_KEYS = _official_block_table()
TOP_KEYS = {f"{o}.{p}": f"{ours}.{p}" for o, ours in _TOP.items() for p in ("weight", "bias")}
IGNORED_BLOCK_KEYS = frozenset({"attn2.norm_added_q.weight"})  # in some diffusers I2V files, never used


def _with_suffix(official: str) -> str:
    """`condition_embedder.time_proj.weight` -> `condition_embedder_mot_ref.time_proj.weight` (suffix on the
    first path component, as the authors name their modules)."""
    head, _, rest = official.partition(".")
    return f"{head}{MOT_SUFFIX}.{rest}"


def official_keys(config: VideoAsPromptConfig) -> dict[str, str]:
    """Every official expert key of `config` -> our expert key."""
    keys = {_with_suffix(o): ours for o, ours in TOP_KEYS.items()}
    for n, layer in enumerate(config.mot_layers):
        for o, ours in BLOCK_KEYS.items():
            comp, _, rest = o.partition(".")
            keys[f"blocks.{layer}.{comp}{MOT_SUFFIX}.{rest}" if rest else f"blocks.{layer}.{o}{MOT_SUFFIX}"] = (
                f"blocks.{n}.{ours}"
            )
    return keys


def is_expert_key(key: str) -> bool:
    return MOT_SUFFIX in key


def expert_to_ours(state: dict[str, torch.Tensor], mot_layers: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Official expert keys (with `_mot_ref`) -> ours; `KeyError` names a key with no mapping."""
    index = {layer: n for n, layer in enumerate(mot_layers)}
    out = {}
    for key, value in state.items():
        plain = key.replace(MOT_SUFFIX, "", 1)
        if plain in TOP_KEYS:
            out[TOP_KEYS[plain]] = value
            continue
        parts = plain.split(".", 2)
        if len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit():
            layer, rest = int(parts[1]), parts[2]
            if rest in IGNORED_BLOCK_KEYS:
                continue
            if rest in BLOCK_KEYS and layer in index:
                out[f"blocks.{index[layer]}.{BLOCK_KEYS[rest]}"] = value
                continue
        raise KeyError(f"Video-As-Prompt expert: no mapping for key {key!r} (mot_layers={mot_layers})")
    return out


def mot_layers_of(state) -> tuple[int, ...]:
    """The DiT layers that carry an expert block in an official state dict (or key list)."""
    layers = set()
    for key in state:
        parts = key.split(".")
        if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit() and parts[2].endswith(MOT_SUFFIX):
            layers.add(int(parts[1]))
    return tuple(sorted(layers))


def split_state_dict(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """An official `transformer/` state dict -> (the DiT's keys, untouched; the expert's keys, untouched)."""
    dit, expert = {}, {}
    for key, value in state.items():
        (expert if is_expert_key(key) else dit)[key] = value
    return dit, expert


def config_from_state(expert_state, num_layers: int, **overrides) -> VideoAsPromptConfig:
    """The expert config the shapes of an official expert state dict fix (heads from the released head_dim)."""
    name = "patch_embedding" + MOT_SUFFIX + ".weight"
    if name not in expert_state:
        raise CheckpointError(f"Video-As-Prompt expert: {name!r} is missing (keys: {preview(expert_state)})")
    patch = expert_state[name]
    dim = int(patch.shape[0])
    fields = dict(
        dim=dim,
        in_dim=int(patch.shape[1]),
        patch_size=tuple(int(s) for s in patch.shape[2:]),
        num_heads=max(1, dim // 128),
        ffn_dim=int(
            expert_state[f"blocks.{mot_layers_of(expert_state)[0]}.ffn{MOT_SUFFIX}.net.0.proj.weight"].shape[0]
        ),
        freq_dim=int(expert_state[_with_suffix("condition_embedder.time_embedder.linear_1.weight")].shape[1]),
        text_dim=int(expert_state[_with_suffix("condition_embedder.text_embedder.linear_1.weight")].shape[1]),
        image_dim=int(expert_state[_with_suffix("condition_embedder.image_embedder.norm1.weight")].shape[0]),
        mot_layers=mot_layers_of(expert_state),
        num_layers=num_layers,
    )
    fields.update(overrides)
    return VideoAsPromptConfig(**fields)


# ----------------------------------------------------------------------------------- model
@dataclass
class ReferenceState:
    """The embedded reference for one forward: tokens `[B, S', dim]` float32, their modulation `[B, 6, dim]`,
    text and CLIP context, and RoPE tables."""

    tokens: torch.Tensor
    e: torch.Tensor
    context: torch.Tensor
    context_img: torch.Tensor
    rope: Rope


class VideoAsPromptExpert(nn.Module):
    """The MoT expert (`pipe.vap`): input layers as a Wan I2V DiT's and one Wan block per entry of `mot_layers`."""

    offload_units = ("blocks",)
    compile_units = ("blocks",)
    lora_target_modules = ("q", "k", "v", "o", "ffn.0", "ffn.2")

    def __init__(self, config: VideoAsPromptConfig | None = None):
        super().__init__()
        self.config = config = config if config is not None else VideoAsPromptConfig()
        add_input_layers(self, config)
        self.img_emb = ImageEmbedding(config.image_dim, config.dim)
        self.blocks = nn.ModuleList(WanBlock(config) for _ in config.mot_layers)

    def check_dit(self, dit: WanDiT) -> None:
        cfg, d = self.config, dit.config
        if not d.has_image_input or d.dim != cfg.dim or d.num_heads != cfg.num_heads or d.num_layers != cfg.num_layers:
            raise ConfigError(
                f"the Video-As-Prompt expert (dim={cfg.dim}, num_heads={cfg.num_heads}, beside {cfg.num_layers} "
                f"layers) does not fit this DiT (dim={d.dim}, num_heads={d.num_heads}, num_layers={d.num_layers}, "
                f"has_image_input={d.has_image_input}): it runs beside a Wan 2.1 I2V 14B DiT"
            )

    def reference_rope(self, grid: tuple[int, int, int], device: torch.device) -> Rope:
        """RoPE tables `[1, S', 1, head_dim]` for the reference grid: frames at -F .. -1, rows/columns 0 ..."""
        f, h, w = grid
        halves = []
        for dim, positions in zip(
            self.config.rope_axes_dims, (torch.arange(-f, 0), torch.arange(h), torch.arange(w)), strict=True
        ):
            angles = torch.outer(positions.double(), rope_inverse_frequencies(dim, self.config.rope_theta)).float()
            halves.append(angles)
        ft, ht, wt = halves
        angles = torch.cat(
            [
                ft[:, None, None].expand(f, h, w, -1),
                ht[None, :, None].expand(f, h, w, -1),
                wt[None, None, :].expand(f, h, w, -1),
            ],
            dim=-1,
        ).reshape(f * h * w, -1)
        angles = angles.to(device)
        return rope_tables(angles.cos()[None, :, None], angles.sin()[None, :, None])

    def prepare(
        self, latents: torch.Tensor, context: torch.Tensor, clip_feature: torch.Tensor, dtype: torch.dtype
    ) -> ReferenceState:
        """Embed the reference: `latents` `[B, in_dim, F, H, W]` (its VAE latent joined with its I2V
        conditioning), `context` its umT5 states `[B, L <= text_len, text_dim]`, `clip_feature` `[B, N, image_dim]`."""
        cfg = self.config
        if latents.dim() != 5 or latents.shape[1] != cfg.in_dim:
            raise ValueError(
                f"vap latents have shape {tuple(latents.shape)}; expected [B, in_dim={cfg.in_dim}, F, H, W] "
                "(the reference video's latent joined with its mask and first-frame latent)"
            )
        b = latents.shape[0]
        if any(s % p for s, p in zip(latents.shape[2:], cfg.patch_size, strict=True)):
            raise ValueError(f"vap latent size {tuple(latents.shape[2:])} must be divisible by {cfg.patch_size}")
        if context.dim() != 3 or context.shape[0] != b or context.shape[2] != cfg.text_dim:
            raise ValueError(f"vap context has shape {tuple(context.shape)}; expected [{b}, L, {cfg.text_dim}]")
        if context.shape[1] > cfg.text_len:
            raise ValueError(f"vap context has {context.shape[1]} tokens; at most text_len={cfg.text_len}")
        if clip_feature is None or clip_feature.dim() != 3 or clip_feature.shape[0] != b:
            shape = None if clip_feature is None else tuple(clip_feature.shape)
            raise ValueError(f"vap clip_feature has shape {shape}; expected [{b}, N, {cfg.image_dim}]")
        if clip_feature.shape[2] != cfg.image_dim:
            raise ValueError(f"vap clip_feature has width {clip_feature.shape[2]}; expected {cfg.image_dim}")
        grid = tuple(s // p for s, p in zip(latents.shape[2:], cfg.patch_size, strict=True))
        tokens = self.patch_embedding(latents.to(dtype)).flatten(2).transpose(1, 2).float()
        t = torch.full((b,), cfg.reference_timestep, device=latents.device)
        e, _ = time_modulation(self, t, dtype)
        return ReferenceState(
            tokens=tokens,
            e=e,
            context=text_tokens(self, context, dtype),
            context_img=self.img_emb(clip_feature, dtype),
            rope=self.reference_rope(grid, latents.device),
        )

    def block_hook(self, dit: WanDiT, state: ReferenceState) -> Callable:
        """The `block_hook` for `WanDiT.forward`: runs DiT layer N jointly with the expert where N is in
        `mot_layers`, alone elsewhere. It carries the reference tokens from layer to layer (one forward only)."""
        self.check_dit(dit)
        layer_of = {id(block): n for n, block in enumerate(dit.blocks)}
        expert_of = {layer: block for layer, block in zip(self.config.mot_layers, self.blocks, strict=True)}
        carried = {"tokens": state.tokens}

        def hook(block: nn.Module, x: torch.Tensor, shared: tuple) -> torch.Tensor:
            expert = expert_of.get(layer_of.get(id(block)))
            if expert is None:
                return dit._run(block, x, *shared)
            if shared[5] is not None:
                raise ValueError("Video-As-Prompt does not run under sequence parallelism")
            if carried["tokens"].shape[0] != x.shape[0]:
                raise ValueError(
                    f"vap inputs have batch {carried['tokens'].shape[0]}; the latents have batch {x.shape[0]}"
                )
            args = (block, expert, x, carried["tokens"], shared, state)
            if dit.gradient_checkpointing and torch.is_grad_enabled():  # recomputed in backward, as `dit._run`
                x, carried["tokens"] = checkpoint(joint_block, *args, use_reentrant=False)
            else:
                x, carried["tokens"] = joint_block(*args)
            return x

        return hook


def _qkv(attn: nn.Module, h: torch.Tensor, rope: Rope) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = attn.num_heads
    q = rotate(_heads(attn.norm_q(attn.q(h)), n), *rope)
    k = rotate(_heads(attn.norm_k(attn.k(h)), n), *rope)
    return q, k, _heads(attn.v(h), n)


def joint_block(
    main: WanBlock, expert: WanBlock, x: torch.Tensor, r: torch.Tensor, shared: tuple, state: ReferenceState
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DiT layer and its expert block: the video tokens `x` and the reference tokens `r` (both `[B, S, dim]`
    float32) attend to each other in one self-attention; everything else is per branch."""
    e, index, context, context_img, rope, _ = shared
    dtype = context.dtype
    mod = main.modulation.float() + e
    rmod = expert.modulation.float() + state.e
    shift, scale, gate = (mod[:, i][index] for i in range(3))
    rshift, rscale, rgate = (rmod[:, i, None] for i in range(3))
    q, k, v = _qkv(main.self_attn, (main.norm1(x) * (1 + scale) + shift).to(dtype), rope)
    rq, rk, rv = _qkv(expert.self_attn, (expert.norm1(r) * (1 + rscale) + rshift).to(dtype), state.rope)
    out = attention(torch.cat([q, rq], 1), torch.cat([k, rk], 1), torch.cat([v, rv], 1))
    a, ra = out.split([x.shape[1], r.shape[1]], dim=1)
    x = x + main.self_attn.o(a.flatten(2)).float() * gate
    r = r + expert.self_attn.o(ra.flatten(2)).float() * rgate
    x = x + main.cross_attn(main.norm3(x).to(dtype), context, context_img).float()
    r = r + expert.cross_attn(expert.norm3(r).to(dtype), state.context, state.context_img).float()
    shift, scale, gate = (mod[:, i][index] for i in range(3, 6))
    rshift, rscale, rgate = (rmod[:, i, None] for i in range(3, 6))
    x = x + main.ffn((main.norm2(x) * (1 + scale) + shift).to(dtype)).float() * gate
    r = r + expert.ffn((expert.norm2(r) * (1 + rscale) + rshift).to(dtype)).float() * rgate
    return x, r


def vap_forward(
    dit: WanDiT,
    expert: VideoAsPromptExpert,
    x: torch.Tensor,
    timestep,
    context: torch.Tensor,
    clip_feature: torch.Tensor,
    y: torch.Tensor,
    vap_latents: torch.Tensor,
    vap_context: torch.Tensor,
    vap_clip_feature: torch.Tensor,
) -> torch.Tensor:
    """The DiT's velocity for `x` with the reference video as prompt (the joint forward)."""
    if dit.parallel is not None:
        raise ValueError("Video-As-Prompt does not run under batch/sequence parallelism (enable_parallel)")
    state = expert.prepare(vap_latents, vap_context, vap_clip_feature, x.dtype)
    return dit(x, timestep, context, clip_feature=clip_feature, y=y, block_hook=expert.block_hook(dit, state))


# ----------------------------------------------------------------------------------- loading
def load_transformer_folder(
    folder: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[WanDiT, VideoAsPromptExpert]:
    """Strictly load a `transformer/` folder of the official layout (`diffusion_pytorch_model*.safetensors`):
    the DiT's keys to a `WanDiT`, the `_mot_ref` keys to a `VideoAsPromptExpert`."""
    from safetensors.torch import load_file

    from . import formats

    folder = Path(folder)
    files = sorted(folder.glob("diffusion_pytorch_model*.safetensors"))
    if not files:
        raise CheckpointError(
            f"{folder}: no diffusion_pytorch_model*.safetensors (found: {preview(p.name for p in folder.iterdir())})"
            if folder.is_dir()
            else f"{folder} is not a folder"
        )
    state = {}
    for f in files:
        state.update(load_file(str(f), device="cpu"))
    dit_state, expert_state = split_state_dict(state)
    if not expert_state:
        raise CheckpointError(f"{folder}: no Video-As-Prompt expert keys (`*{MOT_SUFFIX}*`): a plain Wan DiT?")
    dit_state = formats.diffusers_to_ours(dit_state)
    config_json = None
    if (folder / "config.json").is_file():  # the authors' WanTransformer3DMOTModel config: heads for the DiT
        raw = json.loads((folder / "config.json").read_text())
        config_json = {k: raw[k] for k in ("num_attention_heads", "attention_head_dim") if k in raw} or None
        if "block_idx_with_mot_ref" in raw and tuple(raw["block_idx_with_mot_ref"]) != mot_layers_of(expert_state):
            raise CheckpointError(
                f"{folder}/config.json: block_idx_with_mot_ref={raw['block_idx_with_mot_ref']} but the files hold "
                f"expert blocks at {mot_layers_of(expert_state)}"
            )
    dit_config = formats.config_from_state(dit_state, config_json)
    dit = WanDiT(dit_config)
    _strict_load(dit, dit_state, f"{folder} (Wan DiT)")
    config = config_from_state(expert_state, dit_config.num_layers, num_heads=dit_config.num_heads)
    expert = VideoAsPromptExpert(config)
    try:
        ours = expert_to_ours(expert_state, config.mot_layers)
    except KeyError as err:
        raise CheckpointError(f"{folder}: {err.args[0]}") from None
    _strict_load(expert, ours, f"{folder} (Video-As-Prompt expert)")
    return dit.to(device=device, dtype=dtype), expert.to(device=device, dtype=dtype)


def _strict_load(model: nn.Module, state: dict[str, torch.Tensor], label: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{label}: missing keys {preview(missing)}; unexpected keys {preview(unexpected)}")
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{label}: {key} has shape {tuple(value.shape)}; the model expects {tuple(expected[key].shape)}"
            )
    model.load_state_dict(state, strict=True)


# ----------------------------------------------------------------------------------- recognition
# The official `transformer/` files hold the DiT (diffusers names) and the expert (`*_mot_ref*`) together: the DiT
# layouts own no expert key (`DiTKeyLayout`), the expert's layout owns only those (`ExpertKeyLayout`), so the loader
# splits one file into two models, each loaded strictly.
@dataclass(frozen=True)
class DiTKeyLayout(KeyLayout):
    """A Wan DiT layout that leaves the Video-As-Prompt expert's keys to `ExpertKeyLayout`."""

    def owns(self, key: str) -> bool:
        return not is_expert_key(key) and super().owns(key)


@dataclass(frozen=True)
class ExpertKeyLayout(KeyLayout):
    """The expert's keys of an official `transformer/` file (every key with `_mot_ref`)."""

    def owns(self, key: str) -> bool:
        return is_expert_key(key) and super().owns(key)


EXPERT_SIGNATURE = (
    _with_suffix("patch_embedding.weight"),
    _with_suffix("condition_embedder.time_proj.weight"),
    _with_suffix("condition_embedder.text_embedder.linear_1.weight"),
    _with_suffix("condition_embedder.image_embedder.norm1.weight"),
)


def layout_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The loader's conversion: official expert keys -> ours, the layers read from the key names."""
    return expert_to_ours(state, mot_layers_of(state))


def spec_config(state, config_json: dict | None = None) -> VideoAsPromptConfig:
    """The expert's config from our-named shapes. Our names drop the DiT layer of each block; the released
    layout (10 blocks, every 4th of 40 layers) is assumed for 10 blocks, else one block per layer of a DiT as deep
    as the expert, unless `config_json` (the authors' `WanTransformer3DMOTModel` config: `block_idx_with_mot_ref`,
    `num_layers`, heads) says otherwise. `WanVideoPipeline` sets the exact layers from the file's key names
    (`fit_expert_layers`)."""
    if "patch_embedding.weight" not in state:
        raise CheckpointError(f"Video-As-Prompt expert: patch_embedding is missing (keys: {preview(state)})")
    count = 0
    while f"blocks.{count}.modulation" in state:
        count += 1
    if not count:
        raise CheckpointError("Video-As-Prompt expert: no blocks (blocks.0.modulation is missing)")
    patch = state["patch_embedding.weight"]
    dim = int(patch.shape[0])
    layers = RELEASED_MOT_LAYERS if count == len(RELEASED_MOT_LAYERS) else tuple(range(count))
    fields = dict(
        dim=dim,
        in_dim=int(patch.shape[1]),
        patch_size=tuple(int(s) for s in patch.shape[2:]),
        ffn_dim=int(state["blocks.0.ffn.0.weight"].shape[0]),
        freq_dim=int(state["time_embedding.0.weight"].shape[1]),
        text_dim=int(state["text_embedding.0.weight"].shape[1]),
        image_dim=int(state["img_emb.proj.0.weight"].shape[0]),
        mot_layers=layers,
        num_layers=40 if layers == RELEASED_MOT_LAYERS else count,
    )
    json_fields = config_json or {}
    if json_fields.get("block_idx_with_mot_ref") is not None:
        fields["mot_layers"] = tuple(int(i) for i in json_fields["block_idx_with_mot_ref"])
    if json_fields.get("num_layers") is not None:
        fields["num_layers"] = int(json_fields["num_layers"])
    if json_fields.get("num_attention_heads") is not None:
        fields["num_heads"] = int(json_fields["num_attention_heads"])
    elif dim % 128:
        raise ConfigError(
            f"Video-As-Prompt expert dim={dim} is not a multiple of 128: the head count cannot be derived from the "
            "shapes; give num_attention_heads in a config.json beside the file"
        )
    else:
        fields["num_heads"] = dim // 128
    if len(fields["mot_layers"]) != count:
        raise ConfigError(
            f"Video-As-Prompt expert: config.json block_idx_with_mot_ref={list(fields['mot_layers'])} names "
            f"{len(fields['mot_layers'])} layers but the checkpoint has {count} expert blocks"
        )
    return VideoAsPromptConfig(**fields)


def fit_expert_layers(expert: VideoAsPromptExpert, files, dit: WanDiT | None) -> None:
    """Give a loaded expert the DiT layers its blocks sit beside, read from the official key names of `files`
    (`blocks.N.*_mot_ref*`), and the depth of `dit` (the model it was loaded with)."""
    from diffsynth.runtime.checkpoint import open_checkpoint

    layers = mot_layers_of(open_checkpoint(files).keys())
    if not layers:  # a file in our names: the derived config stands
        return
    if len(layers) != len(expert.blocks):
        raise CheckpointError(
            f"{preview(files)}: expert blocks at DiT layers {layers} but {len(expert.blocks)} blocks were loaded"
        )
    depth = dit.config.num_layers if dit is not None else max(expert.config.num_layers, layers[-1] + 1)
    expert.config = replace(expert.config, mot_layers=layers, num_layers=depth)


# ----------------------------------------------------------------------------------- pipeline
@dataclass
class VapInputs:
    """One guidance branch's reference inputs: the latent `[B, in_dim, F, h, w]` (the reference video's VAE latent
    joined with the I2V conditioning of its first frame), its caption's umT5 states `[B, L, text_dim]` and the CLIP
    features of its first frame `[B, 257, image_dim]`."""

    latents: torch.Tensor
    context: torch.Tensor
    clip_feature: torch.Tensor

    def merged(self, other: VapInputs) -> VapInputs:
        """Both branches as one batch (this one first), for `cfg_merge`."""
        return VapInputs(*(torch.cat([a, b]) for a, b in zip(self.astuple(), other.astuple(), strict=True)))

    def astuple(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.latents, self.context, self.clip_feature


def vap_velocity(
    dit: WanDiT,
    expert: VideoAsPromptExpert,
    x: torch.Tensor,
    timestep: torch.Tensor,
    context: torch.Tensor,
    vap: VapInputs,
    clip_feature: torch.Tensor | None = None,
    y: torch.Tensor | None = None,
    **extras,
) -> torch.Tensor:
    """`wan_velocity` with the reference video as prompt: the joint forward (`vap_forward`) in the DiT's dtype,
    the timestep in float32, the velocity in float32."""
    from diffsynth.runtime.vram import module_dtype

    if extras:
        raise ConfigError(f"Video-As-Prompt takes no other DiT inputs; got {sorted(extras)}")
    if clip_feature is None or y is None:
        raise ConfigError("Video-As-Prompt runs beside an image-to-video DiT: it needs input_image (CLIP and y)")
    dtype = module_dtype(dit)
    out = vap_forward(
        dit,
        expert,
        x.to(dtype),
        timestep.to(device=x.device, dtype=torch.float32),
        context.to(dtype),
        clip_feature.to(dtype),
        y.to(dtype),
        *(t.to(dtype) for t in vap.astuple()),
    )
    return out.float()


VAP_ARGUMENTS = ("vap_video", "vap_prompt", "negative_vap_prompt")


def check_vap_call(pipe, vap_video, vap_prompt, negative_vap_prompt, others: dict, input_image) -> bool:
    """Whether this call runs with a reference video; `ConfigError`s name what it cannot take. `others` are the
    call's inputs of the other modes (name -> value; None when not given)."""
    if vap_video is None:
        given = [n for n, v in (("vap_prompt", vap_prompt), ("negative_vap_prompt", negative_vap_prompt)) if v]
        if given:
            raise ConfigError(f"{', '.join(given)} describe the reference video: give vap_video too")
        return False
    if pipe.vap is None:
        raise ConfigError(
            "vap_video needs the Video-As-Prompt expert (pipe.vap): load the preset "
            "ByteDance/Video-As-Prompt-Wan2.1-14B, or ModelConfig(model_id='ByteDance/Video-As-Prompt-Wan2.1-14B', "
            "origin_file_pattern='transformer/diffusion_pytorch_model*.safetensors')"
        )
    refused = [name for name, value in others.items() if value is not None and value is not False]
    if refused:
        raise ConfigError(f"vap_video (Video-As-Prompt) takes no {', '.join(refused)}")
    dit = pipe.dit
    if type(dit) is not WanDiT or dit.config.vace_layers or dit.config.animate or dit.config.ref_conv:
        raise ConfigError(
            f"vap_video: the Video-As-Prompt expert runs beside a plain Wan 2.1 I2V DiT, not a "
            f"{type(dit).__name__} with VACE / Animate / Fun modules"
        )
    if dit.config.camera_adapter_dim or dit.config.model_type != "i2v":
        raise ConfigError(f"vap_video: the DiT must be an image-to-video one (model_type {dit.config.model_type!r})")
    if pipe.dit2 is not None:
        raise ConfigError("vap_video: the Video-As-Prompt expert goes with one DiT; this pipeline holds two (dit2)")
    pipe.vap.check_dit(dit)
    if input_image is None:
        raise ConfigError("vap_video: Video-As-Prompt animates input_image (the first frame): give one")
    if getattr(dit, "parallel", None) is not None:
        raise ConfigError("vap_video: Video-As-Prompt does not run under enable_parallel (batch/sequence parallelism)")
    if pipe.step_caches():
        raise ConfigError(
            "vap_video: a step cache (TeaCache, first-block cache) skips the blocks the expert runs beside: disable "
            "it for this call"
        )
    for name, value in (("vap_prompt", vap_prompt), ("negative_vap_prompt", negative_vap_prompt)):
        items = value if isinstance(value, (list, tuple)) else [value]
        if value is not None and not all(isinstance(v, str) for v in items):
            raise ConfigError(f"{name} must be a string (or one per prompt), got {type(value).__name__}")
    return True


def select_frames(frames: list, count: int) -> list:
    """`count` frames spread evenly over the reference video, first and last included (the authors'
    `frames_selection="evenly"`); a video of `count` frames is taken whole."""
    if not frames:
        raise ConfigError("vap_video holds no frames")
    index = torch.linspace(0, len(frames) - 1, count).long().tolist()
    return [frames[i] for i in index]


def _texts(value, batch: int, name: str) -> list[str]:
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if len(items) == 1:
        items = items * batch
    if len(items) != batch:
        raise ConfigError(f"{name} has {len(items)} texts for {batch} prompts; give one, or one per prompt")
    return items


def encode_vap(
    pipe, vap_video, vap_prompt, negative_vap_prompt, batch: int, size: tuple[int, int, int], vae_kwargs,
    use_cfg: bool, max_sequence_length: int = 512,
) -> tuple[VapInputs, VapInputs | None]:  # fmt: skip
    """The reference inputs of both guidance branches (the negative one only with `use_cfg`): `num_frames` frames
    of `vap_video` (a list of images or a video file) spread evenly over it and resized to the output size, their
    VAE latent joined with the I2V conditioning of the first frame (mask + latent of that frame followed by black),
    the CLIP features of that frame, and the umT5 states of `vap_prompt` (`negative_vap_prompt` for the negative
    branch)."""
    from diffsynth.runtime.media import load_image, load_video
    from diffsynth.runtime.vram import module_dtype

    height, width, frames = size
    if isinstance(vap_video, (str, os.PathLike)):
        vap_video = load_video(vap_video)
    video = [load_image(f) for f in select_frames(list(vap_video), frames)]
    pipe.load_models_to_device(["text_encoder"])
    context = pipe.encode_prompt(_texts(vap_prompt, batch, "vap_prompt"), max_sequence_length)
    negative = None
    if use_cfg:
        negative = pipe.encode_prompt(_texts(negative_vap_prompt, batch, "negative_vap_prompt"), max_sequence_length)
    clip = pipe.encode_clip([video[0]], None, height, width)
    pipe.load_models_to_device(["vae"])
    pixels = pipe._pixels(video, height, width, module_dtype(pipe.vae))  # [F, 3, H, W]
    latent = pipe.vae.encode(pixels.transpose(0, 1)[None], **vae_kwargs).float()
    y = pipe.encode_frames([video[0]], None, 1, frames, height, width, vae_kwargs)
    latents = torch.cat([latent, y], dim=1).expand(batch, -1, -1, -1, -1)
    clip = clip.expand(batch, -1, -1)
    positive = VapInputs(latents, context, clip)
    return positive, None if negative is None else VapInputs(latents, negative, clip)


__all__ = [
    "VideoAsPromptConfig",
    "VideoAsPromptExpert",
    "ReferenceState",
    "joint_block",
    "vap_forward",
    "split_state_dict",
    "expert_to_ours",
    "official_keys",
    "load_transformer_folder",
    "DiTKeyLayout",
    "ExpertKeyLayout",
    "VapInputs",
    "vap_velocity",
    "check_vap_call",
    "encode_vap",
    "fit_expert_layers",
    "select_frames",
]
