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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from diffsynth.runtime.attention import attention
from diffsynth.runtime.errors import CheckpointError, ConfigError, preview
from diffsynth.runtime.layers import rope_inverse_frequencies, rope_tables, rotate

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
            x, carried["tokens"] = joint_block(block, expert, x, carried["tokens"], shared, state)
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
]
