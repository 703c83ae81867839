"""The FLUX.2 denoiser (dev, klein-4B, klein-9B and the klein base models), with BFL's original key names.

Same two-stage design as FLUX.1 (double-stream blocks with joint attention over `[text, image]`, then
single-stream blocks over the concatenated sequence) with these changes:

- no biases anywhere; SwiGLU MLPs (`silu(first half) * second half` of one fused input projection);
- modulation is computed once per call and shared by every block: `double_stream_modulation_img` /
  `_txt` (shift, scale, gate for attention and MLP) and `single_stream_modulation`;
- the modulation vector is built from the timestep and, on guidance-distilled models (dev), the
  guidance; there is no pooled text embedding;
- image tokens are 2x2-packed 32-channel latents (128 features); RoPE runs over 4-axis ids (t, h, w, l)
  with theta 2000. Reference images for editing are extra image tokens with t = 10, 20, ...

KV models (FLUX.2-klein-9B-KV, `causal_references`) were trained with references that do not depend on the
step: the reference tokens are modulated as at timestep 0 and attend only to each other, while text and
image tokens attend to everything. So their keys and values (after RoPE) at every block are the same at every
step: `forward(..., reference=, reference_ids=, cache=ReferenceCache())` computes them on the first call
(a pass of the reference tokens alone) and later calls run the text and image tokens only.

Module names equal `flux2-dev.safetensors` / `flux-2-klein-4b.safetensors`, so original files load as
is. Conventions follow BFL's `Flux2.forward`: timesteps in [0, 1] and guidance in the pipeline's units
(e.g. 4.0), both multiplied by 1000 inside.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from diffsynth.runtime.attention import attention
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.layers import add_mul, rope_tables, rotate, timestep_embedding
from diffsynth.runtime.parallel import batch_parallel, shard_sequence
from diffsynth.runtime.step_cache import run_blocks

from ..flux1.dit import (
    LastLayer,
    MLPEmbedder,
    Modulation,
    QKNorm,
    Rope,
    SelfAttention,
    check_dit_config,
    modulate,
    rope_from_ids,
    shard_after,
)

TIME_FREQ_DIM = 256  # sinusoidal features fed to time_in / guidance_in
TIME_FACTOR = 1000.0  # timesteps and guidance are multiplied by this before the embedding
NORM_EPS = 1e-6
KV = tuple[torch.Tensor, torch.Tensor]  # keys (after RoPE) and values `[B, N, heads, head_dim]`

# The released DiTs, as overrides of the defaults (FLUX.2-dev). klein-base-4B/9B equal klein-4B/9B.
VARIANTS: dict[str, dict] = {
    "dev": {},
    "klein-4b": dict(
        hidden_size=3072, num_heads=24, depth=5, depth_single_blocks=20, context_in_dim=7680, guidance_embed=False
    ),
    "klein-9b": dict(
        hidden_size=4096, num_heads=32, depth=8, depth_single_blocks=24, context_in_dim=12288, guidance_embed=False
    ),
}
VARIANTS["klein-9b-kv"] = dict(VARIANTS["klein-9b"], causal_references=True)


@dataclass
class Flux2DiTConfig:
    """Architecture of the FLUX.2 DiT (BFL `Flux2Params` names); defaults are FLUX.2-dev."""

    in_channels: int = 128
    out_channels: int = 128
    context_in_dim: int = 15360
    hidden_size: int = 6144
    mlp_ratio: float = 3.0
    num_heads: int = 48
    depth: int = 8
    depth_single_blocks: int = 48
    axes_dim: tuple[int, ...] = (32, 32, 32, 32)
    theta: float = 2000.0
    guidance_embed: bool = True
    # KV models: reference tokens modulated as at timestep 0 and attending only to references (ReferenceCache)
    causal_references: bool = False

    def __post_init__(self):
        self.axes_dim = tuple(int(d) for d in self.axes_dim)
        self.theta = float(self.theta)
        check_dit_config(self, ("in_channels", "out_channels", "context_in_dim", "hidden_size", "num_heads"))
        if not isinstance(self.causal_references, bool):
            raise ValueError(f"Flux2DiTConfig.causal_references={self.causal_references!r} must be True or False")

    @classmethod
    def variant(cls, name: str) -> Flux2DiTConfig:
        """The config of a released DiT: "dev", "klein-4b", "klein-9b" or "klein-9b-kv" (klein base models: same
        as klein)."""
        key = name.lower().removeprefix("flux.2-").removeprefix("flux2-").replace("-base", "")
        if key not in VARIANTS:
            raise ValueError(f"unknown FLUX.2 DiT variant {name!r}; known: {sorted(VARIANTS)}")
        return cls(**VARIANTS[key])

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        """Width after the SwiGLU gate (the fused input projections are twice this)."""
        return int(self.hidden_size * self.mlp_ratio)


class ReferenceCache:
    """The reference tokens' keys (after RoPE) and values at every block of a KV model (double blocks first).

    They depend on the reference images and their ids only (not on the prompt, the image or the step), so
    one cache serves a whole denoising loop, both halves of a CFG batch included. The first DiT call given
    the cache fills it; later calls read it and run the text and image tokens alone. `clear()` empties it
    for other references.
    """

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.layers: list[KV] = []
        self.tokens: int | None = None
        self.batch: int | None = None

    @property
    def filled(self) -> bool:
        return self.tokens is not None

    def __repr__(self) -> str:
        state = f"{len(self.layers)} blocks, {self.batch} x {self.tokens} tokens" if self.filled else "empty"
        return f"ReferenceCache({state})"


class SwiGLU(nn.Module):
    """`silu(a) * b` for the two halves `(a, b)` of the last axis (no parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x)


def swiglu(x: torch.Tensor) -> torch.Tensor:
    gate, value = x.chunk(2, dim=-1)
    return F.silu(gate) * value


def _mlp(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, 2 * hidden, bias=False), SwiGLU(), nn.Linear(hidden, dim, bias=False))


def _joint_attention(q, k, v, rope: Rope, mask: torch.Tensor | None = None, kv: KV | None = None) -> torch.Tensor:
    """Rotate q and k (`rope`: `rope_tables` of `rope_from_ids`) and attend; `[B, L, H * D]`. Under
    sequence parallelism the tokens are `[text (whole), this rank's image shard]` and `mask` masks the
    padding of the image tokens (None otherwise). `kv`: the reference tokens' rotated keys and values
    (`[B or 1, N, H, D]`, a KV model's), appended to the keys and values."""
    q, k = rotate(q, *rope), rotate(k, *rope)
    if kv is not None:
        b, (ref_k, ref_v) = q.shape[0], kv
        k = torch.cat((k, ref_k.expand(b, -1, -1, -1)), dim=1)
        v = torch.cat((v, ref_v.expand(b, -1, -1, -1)), dim=1)
    return attention(q, k, v, mask, sequence_parallel=True).flatten(2)


def _self_attention(q, k, v, rope: Rope) -> tuple[torch.Tensor, KV]:
    """Reference tokens among themselves: `[B, N, H * D]` and the rotated keys with the values."""
    k = rotate(k, *rope)
    return attention(rotate(q, *rope), k, v).flatten(2), (k, v)


class DoubleStreamBlock(nn.Module):
    """Separate image/text weights, joint attention over the concatenated `[text, image]` tokens."""

    def __init__(self, config: Flux2DiTConfig):
        super().__init__()
        dim, mlp = config.hidden_size, config.mlp_hidden_dim
        self.img_norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)
        self.img_attn = SelfAttention(dim, config.num_heads, qkv_bias=False, proj_bias=False)
        self.img_norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)
        self.img_mlp = _mlp(dim, mlp)
        self.txt_norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)
        self.txt_attn = SelfAttention(dim, config.num_heads, qkv_bias=False, proj_bias=False)
        self.txt_norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)
        self.txt_mlp = _mlp(dim, mlp)

    def forward(self, img, txt, mod_img, mod_txt, rope: Rope, mask=None, kv: KV | None = None):
        """`(img, txt)` after the block. `kv` (a KV model's reference keys and values at this block) joins the
        attention. With `txt` None, `img` holds reference tokens, which run alone through the image weights
        (`mod_txt` unused) and give `(img, (keys, values))`."""
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = mod_img
        iq, ik, iv = self.img_attn.qkv_heads(modulate(self.img_norm1(img), i_shift1, i_scale1))
        if txt is None:
            img_out, kv = _self_attention(iq, ik, iv, rope)
            img = add_mul(img, i_gate1, self.img_attn.proj(img_out))
            return add_mul(img, i_gate2, self.img_mlp(modulate(self.img_norm2(img), i_shift2, i_scale2))), kv
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = mod_txt
        tq, tk, tv = self.txt_attn.qkv_heads(modulate(self.txt_norm1(txt), t_shift1, t_scale1))
        q, k, v = torch.cat((tq, iq), 1), torch.cat((tk, ik), 1), torch.cat((tv, iv), 1)
        out = _joint_attention(q, k, v, rope, mask, kv)
        txt_out, img_out = out[:, : txt.shape[1]], out[:, txt.shape[1] :]
        img = add_mul(img, i_gate1, self.img_attn.proj(img_out))
        img = add_mul(img, i_gate2, self.img_mlp(modulate(self.img_norm2(img), i_shift2, i_scale2)))
        txt = add_mul(txt, t_gate1, self.txt_attn.proj(txt_out))
        txt = add_mul(txt, t_gate2, self.txt_mlp(modulate(self.txt_norm2(txt), t_shift2, t_scale2)))
        return img, txt


class SingleStreamBlock(nn.Module):
    """Parallel attention + SwiGLU MLP: `linear1` gives q, k, v and the MLP input; `linear2` merges both."""

    def __init__(self, config: Flux2DiTConfig):
        super().__init__()
        dim = config.hidden_size
        self.num_heads = config.num_heads
        self.mlp_hidden_dim = config.mlp_hidden_dim
        self.linear1 = nn.Linear(dim, 3 * dim + 2 * self.mlp_hidden_dim, bias=False)
        self.linear2 = nn.Linear(dim + self.mlp_hidden_dim, dim, bias=False)
        self.norm = QKNorm(config.head_dim)
        self.pre_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)

    def forward(self, x, mod, rope: Rope, mask=None, kv: KV | None = None, references: bool = False):
        """`x` after the block. `kv` (a KV model's reference keys and values at this block) joins the attention.
        `references`: `x` holds reference tokens alone; gives `(x, (keys, values))`."""
        shift, scale, gate = mod
        qkv, mlp = self.linear1(modulate(self.pre_norm(x), shift, scale)).split(
            [3 * x.shape[-1], 2 * self.mlp_hidden_dim], dim=-1
        )
        q, k, v = qkv.unflatten(-1, (3, self.num_heads, -1)).unbind(2)
        q, k = self.norm.query_norm(q), self.norm.key_norm(k)
        if references:
            out, kv = _self_attention(q, k, v, rope)
            return add_mul(x, gate, self.linear2(torch.cat((out, swiglu(mlp)), dim=-1))), kv
        out = _joint_attention(q, k, v, rope, mask, kv)
        return add_mul(x, gate, self.linear2(torch.cat((out, swiglu(mlp)), dim=-1)))


class Flux2DiT(nn.Module):
    """FLUX.2 DiT. `forward(img, img_ids, txt, txt_ids, timesteps, guidance=None)` -> `[B, L_img, out]`."""

    offload_units = ("double_blocks", "single_blocks")
    compile_units = ("double_blocks", "single_blocks")
    lora_target_modules = (
        "img_attn.qkv",
        "img_attn.proj",
        "txt_attn.qkv",
        "txt_attn.proj",
        "img_mlp.0",
        "img_mlp.2",
        "txt_mlp.0",
        "txt_mlp.2",
        "linear1",
        "linear2",
    )

    def __init__(self, config: Flux2DiTConfig | None = None):
        super().__init__()
        self.config = config = config if config is not None else Flux2DiTConfig()
        self.gradient_checkpointing = False
        # a FirstBlockCache over double_blocks + single_blocks (BasePipeline.enable_first_block_cache)
        self.step_cache = None
        self.parallel = None  # ParallelGroups dividing batch and image tokens (BasePipeline.enable_parallel)
        dim = config.hidden_size
        self.img_in = nn.Linear(config.in_channels, dim, bias=False)
        self.time_in = MLPEmbedder(TIME_FREQ_DIM, dim, bias=False)
        self.guidance_in = MLPEmbedder(TIME_FREQ_DIM, dim, bias=False) if config.guidance_embed else None
        self.txt_in = nn.Linear(config.context_in_dim, dim, bias=False)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(config) for _ in range(config.depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(config) for _ in range(config.depth_single_blocks))
        self.double_stream_modulation_img = Modulation(dim, double=True, bias=False)
        self.double_stream_modulation_txt = Modulation(dim, double=True, bias=False)
        self.single_stream_modulation = Modulation(dim, double=False, bias=False)
        self.final_layer = LastLayer(dim, config.out_channels, bias=False)

    def forward(
        self,
        img: torch.Tensor,
        img_ids: torch.Tensor,
        txt: torch.Tensor,
        txt_ids: torch.Tensor,
        timesteps: torch.Tensor | float,
        guidance: torch.Tensor | float | None = None,
        *,
        reference: torch.Tensor | None = None,
        reference_ids: torch.Tensor | None = None,
        cache: ReferenceCache | None = None,
    ) -> torch.Tensor:
        """Velocity for packed image tokens `img` `[B, L_img, in_channels]`.

        `img_ids` / `txt_ids` are `[B or 1, L, 4]` (or `[L, 4]`) positions (t, h, w, l), integer or
        float; `txt` is `[B, L_txt, context_in_dim]`; `timesteps` `[B]` (or a scalar) in [0, 1];
        `guidance` `[B]` (or a scalar) in the pipeline's units, needed by guidance-distilled models
        (dev) and ignored by the others (klein). Reference-image tokens for editing are appended to
        `img` (with their ids); the output covers every image token, the caller keeps the first ones.
        Computation runs in `img.dtype`. With `parallel` set, the batch and the image tokens (references
        included) are divided over the ranks (`enable_parallel`).

        KV models (`causal_references`) take their references apart instead: `reference` `[B or 1, N,
        in_channels]` with `reference_ids` `[N, 4]` (or `[1, N, 4]`), and optionally a `ReferenceCache`: an
        empty one is filled from `reference`, a filled one is read (`reference` may then be left out, and the
        references' own pass is skipped). The output covers the image tokens only.
        """
        img_ids, txt_ids = check_inputs(self.config, img, img_ids, txt, txt_ids)  # ids now [B or 1, L, axes]
        kv = None
        if reference is not None or reference_ids is not None or cache is not None:
            reference = reference.to(img.dtype) if isinstance(reference, torch.Tensor) else reference
            kv = self.reference_kv(img.shape[0], reference, reference_ids, cache, guidance)
        return batch_parallel(
            self.parallel, img.shape[0], self._forward, img, img_ids, txt, txt_ids, timesteps, guidance, kv
        )

    def reference_kv(self, batch: int, reference, reference_ids, cache: ReferenceCache | None, guidance) -> list[KV]:
        """The reference tokens' keys and values at every block: from `cache` when it is filled, else from a
        pass of the references alone (modulated as at timestep 0, attending only to each other), which fills
        `cache` when one is given."""
        cfg = self.config
        if not cfg.causal_references:
            raise ConfigError(
                "reference= / cache= are for FLUX.2 KV models (causal_references=True, e.g. FLUX.2-klein-9B-KV); "
                "this DiT attends to its references at every step: append them to img (see flux2_velocity)"
            )
        if cache is not None and not isinstance(cache, ReferenceCache):
            raise TypeError(f"cache must be a ReferenceCache, got {type(cache).__name__}")
        n_blocks = len(self.double_blocks) + len(self.single_blocks)
        if cache is not None and cache.filled:
            if len(cache.layers) != n_blocks or cache.batch not in (1, batch):
                raise ValueError(
                    f"{cache!r} does not fit this call ({n_blocks} blocks, batch {batch}): clear() it for new inputs"
                )
            if reference is not None and reference.shape[-2] != cache.tokens:
                raise ValueError(
                    f"reference has {reference.shape[-2]} tokens but {cache!r} holds {cache.tokens}: "
                    "clear() it for other references"
                )
            return cache.layers
        reference, reference_ids = check_references(cfg, batch, reference, reference_ids)
        if self.guidance_in is not None:  # per-sample guidance modulates the references too
            reference = reference.expand(batch, -1, -1)
        n = reference.shape[0]
        vec = self.conditioning_vector(0.0, guidance, n, reference.device, reference.dtype)
        mod_img, mod_single = self.double_stream_modulation_img(vec), self.single_stream_modulation(vec)
        rope = rope_tables(*rope_from_ids(reference_ids, cfg.axes_dim, cfg.theta))
        x, layers = self.img_in(reference), []
        for block in self.double_blocks:
            x, kv = self._run(block, x, None, mod_img, None, rope)
            layers.append(kv)
        for block in self.single_blocks:
            x, kv = self._run(block, x, mod_single, rope, None, None, True)
            layers.append(kv)
        if cache is not None:
            cache.layers, cache.tokens, cache.batch = layers, reference.shape[1], n
        return layers

    def _forward(self, img, img_ids, txt, txt_ids, timesteps, guidance, kv=None) -> torch.Tensor:
        cfg = self.config
        b, n_img = img.shape[:2]
        dtype = img.dtype

        vec = self.conditioning_vector(timesteps, guidance, b, img.device, dtype)
        mod_img = self.double_stream_modulation_img(vec)
        mod_txt = self.double_stream_modulation_txt(vec)
        mod_single = self.single_stream_modulation(vec)
        img = self.img_in(img)
        txt = self.txt_in(txt.to(dtype))
        n_ids = max(img_ids.shape[0], txt_ids.shape[0])  # ids shared by the batch give one table
        id_dtype = torch.promote_types(txt_ids.dtype, img_ids.dtype)
        ids = torch.cat((txt_ids.to(id_dtype).expand(n_ids, -1, -1), img_ids.to(id_dtype).expand(n_ids, -1, -1)), 1)
        rope = rope_tables(*rope_from_ids(ids, cfg.axes_dim, cfg.theta))

        n_txt, mask = txt.shape[1], None
        with shard_sequence(self.parallel, n_img, prefix=n_txt) as shards:
            if shards is not None:  # this rank's image tokens; the text stays whole
                if kv is not None:
                    raise ConfigError(
                        "a KV model's cached references do not run under sequence parallelism yet; "
                        "use enable_parallel(sequence=1) or pass no references"
                    )
                img, rope = shards.shard(img), tuple(shard_after(shards, t, n_txt) for t in rope)
                mask = shards.key_mask(None, b, img.device)
            img = self._blocks(img, txt, mod_img, mod_txt, mod_single, rope, mask, kv)
            if shards is not None:
                img = shards.gather(img)
        return self.final_layer(img, vec)

    def _blocks(self, img, txt, mod_img, mod_txt, mod_single, rope: Rope, mask, kv=None) -> torch.Tensor:
        """Both block lists (through the step cache); returns the image stream. `kv`: a KV model's reference
        keys and values per block (double blocks first)."""
        n_txt, n_double = txt.shape[1], len(self.double_blocks)

        def extra(index: int) -> tuple:  # the reference keys and values of block `index`, when there are any
            return () if kv is None else (kv[index],)

        # The step cache spans both lists (as diffusers' does): its first block is the first double block
        # (the first single one without double blocks), the rest returns the streams split again.
        def first(streams):
            img, txt = streams
            if n_double:
                return self._run(self.double_blocks[0], img, txt, mod_img, mod_txt, rope, mask, *extra(0))
            x = self._run(self.single_blocks[0], torch.cat((txt, img), dim=1), mod_single, rope, mask, *extra(0))
            return x[:, n_txt:], x[:, :n_txt]

        def rest(streams):
            img, txt = streams
            for index in range(1, n_double):
                img, txt = self._run(self.double_blocks[index], img, txt, mod_img, mod_txt, rope, mask, *extra(index))
            x = torch.cat((txt, img), dim=1)
            for index in range(0 if n_double else 1, len(self.single_blocks)):
                x = self._run(self.single_blocks[index], x, mod_single, rope, mask, *extra(n_double + index))
            return x[:, n_txt:], x[:, :n_txt]

        if n_double + len(self.single_blocks):
            img, txt = run_blocks(self.step_cache, (img, txt), first, rest)
        return img

    def conditioning_vector(self, timesteps, guidance, batch: int, device, dtype) -> torch.Tensor:
        """The modulation vector `[B, hidden]`: `time_in(t)` plus `guidance_in(guidance)` where it exists."""
        t = _per_sample("timesteps", timesteps, batch, device)
        vec = self.time_in(timestep_embedding(t * TIME_FACTOR, TIME_FREQ_DIM).to(dtype))
        if self.guidance_in is not None:
            if guidance is None:
                raise ValueError(
                    f"this {type(self).__name__} is guidance-distilled (guidance_embed=True, FLUX.2-dev): "
                    "pass `guidance` (e.g. 4.0)"
                )
            g = _per_sample("guidance", guidance, batch, device)
            vec = vec + self.guidance_in(timestep_embedding(g * TIME_FACTOR, TIME_FREQ_DIM).to(dtype))
        return vec

    def _run(self, block: nn.Module, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)


def _per_sample(name: str, value, batch: int, device) -> torch.Tensor:
    """A scalar or `[1]` / `[B]` tensor as float32 `[B]`."""
    t = torch.as_tensor(value, device=device, dtype=torch.float32).reshape(-1)
    if t.numel() not in (1, batch):
        raise ValueError(f"{name} has {t.numel()} values; expected a scalar, 1 or batch={batch}")
    return t.expand(batch)


def check_references(cfg: Flux2DiTConfig, batch: int, reference, reference_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """A KV model's reference tokens `[B or 1, N, in_channels]` and their ids as `[1, N, axes]`."""
    if reference is None or reference_ids is None:
        raise ValueError(
            "a KV model's references need both reference `[B or 1, N, in_channels]` and reference_ids `[N, 4]` "
            "(an empty ReferenceCache is filled from them)"
        )
    if reference.dim() != 3 or reference.shape[0] not in (1, batch) or reference.shape[-1] != cfg.in_channels:
        raise ValueError(
            f"reference has shape {tuple(reference.shape)}; expected [B={batch} or 1, N, in_channels={cfg.in_channels}]"
        )
    ids = reference_ids.unsqueeze(0) if reference_ids.dim() == 2 else reference_ids
    axes = len(cfg.axes_dim)
    if ids.dim() != 3 or ids.shape[0] != 1 or ids.shape[1:] != (reference.shape[1], axes):
        raise ValueError(
            f"reference_ids has shape {tuple(reference_ids.shape)}; expected [{reference.shape[1]}, {axes}] "
            "(the same positions for every sample)"
        )
    return reference, ids


def check_inputs(cfg: Flux2DiTConfig, img, img_ids, txt, txt_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """Shapes of a FLUX.2 DiT call; returns the ids as `[B or 1, L, axes]`."""
    if img.dim() != 3 or img.shape[-1] != cfg.in_channels:
        raise ValueError(f"img has shape {tuple(img.shape)}; expected [B, L_img, in_channels={cfg.in_channels}]")
    b = img.shape[0]
    if txt.dim() != 3 or txt.shape[0] != b or txt.shape[-1] != cfg.context_in_dim:
        raise ValueError(
            f"txt has shape {tuple(txt.shape)}; expected [B={b}, L_txt, context_in_dim={cfg.context_in_dim}]"
        )
    checked = []
    axes = len(cfg.axes_dim)
    for name, ids, tokens in (("img_ids", img_ids, img), ("txt_ids", txt_ids, txt)):
        ids = ids.unsqueeze(0) if ids.dim() == 2 else ids
        if ids.dim() != 3 or ids.shape[0] not in (1, b) or ids.shape[1] != tokens.shape[1]:
            raise ValueError(f"{name} has shape {tuple(ids.shape)}; expected [B={b} or 1, {tokens.shape[1]}, {axes}]")
        if ids.shape[2] != axes:
            raise ValueError(
                f"{name} has {ids.shape[2]} axes; FLUX.2 ids are (t, h, w, l) and axes_dim={cfg.axes_dim} needs {axes}"
            )
        checked.append(ids)
    return checked[0], checked[1]
