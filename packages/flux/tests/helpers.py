"""What the FLUX tests share: tiny DiT / ControlNet builders and inputs, the diffusers references built on our
weights, and the image / noise / comparison helpers of the pipeline parity tests.

Under `--import-mode=importlib` test modules cannot import each other or conftest, so conftest loads this file
as the module `diffsynth_flux_test_helpers` (test modules import from that name). diffusers is imported inside
the functions that need it: collecting the tests without diffusers still works.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from diffsynth.flux.flux1.controlnet import Flux1ControlNet, Flux1ControlNetConfig
from diffsynth.flux.flux1.controlnet_formats import ours_to_diffusers as controlnet_to_diffusers
from diffsynth.flux.flux1.dit import Flux1DiT, Flux1DiTConfig
from diffsynth.flux.flux1.formats import ours_to_diffusers as dit_to_diffusers
from diffsynth.runtime.testing.weights import random_weights


# ------------------------------------------------------------------ the tiny DiT
def tiny_dit_config(**overrides) -> Flux1DiTConfig:
    """The one place tiny FLUX.1 DiT sizes live."""
    fields = dict(
        in_channels=16,
        out_channels=16,
        vec_in_dim=24,
        context_in_dim=32,
        hidden_size=32,
        num_heads=2,
        depth=2,
        depth_single_blocks=2,
        axes_dim=(4, 6, 6),
    )
    return Flux1DiTConfig(**{**fields, **overrides})


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Seeded random weights everywhere (norm scales around 1)."""
    return random_weights(model, seed, scale=0.2, is_norm=lambda name, p: name.endswith(".scale"))


def make_dit(config: Flux1DiTConfig | None = None, seed: int = 0) -> Flux1DiT:
    return randomize(Flux1DiT(config or tiny_dit_config()), seed)


def image_ids(height: int, width: int, first: float = 0.0) -> torch.Tensor:
    """`[1, h*w, 3]` ids (first, row, column) of a packed latent grid, as the FLUX pipelines build them."""
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    ids = torch.stack([torch.full_like(rows, 0), rows, cols], dim=-1).reshape(1, -1, 3).float()
    ids[..., 0] = first
    return ids


def dit_inputs(batch=2, grid=(4, 4), txt_len=7, seed=1, config: Flux1DiTConfig | None = None):
    """The DiT's positional inputs: img, img_ids, txt, txt_ids, timesteps, pooled y, guidance."""
    cfg = config or tiny_dit_config()
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(batch, grid[0] * grid[1], cfg.in_channels, generator=g)
    txt = torch.randn(batch, txt_len, cfg.context_in_dim, generator=g)
    txt_ids = torch.zeros(1, txt_len, 3)
    timesteps = torch.rand(batch, generator=g)
    y = torch.randn(batch, cfg.vec_in_dim, generator=g)
    guidance = 1.0 + 4.0 * torch.rand(batch, generator=g)
    return img, image_ids(*grid), txt, txt_ids, timesteps, y, guidance


# ------------------------------------------------------------------ the tiny ControlNet
def tiny_controlnet_config(**overrides) -> Flux1ControlNetConfig:
    """The one place tiny FLUX.1 ControlNet sizes live (widths equal the tiny DiT's)."""
    dit = tiny_dit_config()
    fields = dict(
        in_channels=dit.in_channels,
        vec_in_dim=dit.vec_in_dim,
        context_in_dim=dit.context_in_dim,
        hidden_size=dit.hidden_size,
        num_heads=dit.num_heads,
        depth=2,
        depth_single_blocks=3,
        axes_dim=dit.axes_dim,
        num_modes=4,
    )
    return Flux1ControlNetConfig(**{**fields, **overrides})


def make_controlnet(config: Flux1ControlNetConfig | None = None, seed: int = 0) -> Flux1ControlNet:
    return randomize(Flux1ControlNet(config or tiny_controlnet_config()), seed)


def controlnet_inputs(batch=2, grid=(4, 4), txt_len=7, seed=1, config: Flux1ControlNetConfig | None = None):
    """DiT inputs plus the condition tokens and a mode per sample, as one args tuple."""
    cfg = config or tiny_controlnet_config()
    img, img_ids, txt, txt_ids, t, y, g = dit_inputs(batch, grid, txt_len, seed, tiny_dit_config())
    cond = torch.randn(batch, img.shape[1], cfg.cond_in_channels, generator=torch.Generator().manual_seed(seed + 1))
    mode = torch.arange(batch) % (cfg.num_modes or 1)
    return img, img_ids, txt, txt_ids, t, y, g, cond, mode


def repo_controlnet_config(dit_json: dict, **overrides) -> Flux1ControlNetConfig:
    """A small ControlNet of the tiny hub repo's DiT widths (`dit_json`: its transformer config.json)."""
    fields = dict(
        in_channels=64,
        vec_in_dim=dit_json["pooled_projection_dim"],
        context_in_dim=dit_json["joint_attention_dim"],
        hidden_size=dit_json["attention_head_dim"] * dit_json["num_attention_heads"],
        num_heads=dit_json["num_attention_heads"],
        depth=1,
        depth_single_blocks=1,
        num_modes=None,
    )
    return Flux1ControlNetConfig(**{**fields, **overrides})


def controlnet_config_json(cfg: Flux1ControlNetConfig) -> dict:
    """What diffusers writes for this model (`FluxControlNetModel.save_pretrained`)."""
    return {
        "_class_name": "FluxControlNetModel",
        "patch_size": 1,
        "in_channels": cfg.in_channels,
        "num_layers": cfg.depth,
        "num_single_layers": cfg.depth_single_blocks,
        "attention_head_dim": cfg.head_dim,
        "num_attention_heads": cfg.num_heads,
        "joint_attention_dim": cfg.context_in_dim,
        "pooled_projection_dim": cfg.vec_in_dim,
        "guidance_embeds": cfg.guidance_embed,
        "axes_dims_rope": list(cfg.axes_dim),
        "num_mode": cfg.num_modes,
        "conditioning_embedding_channels": None,
    }


def write_controlnet_folder(folder: Path, model: Flux1ControlNet, config_json: dict | None) -> Path:
    """A diffusers-style ControlNet folder: diffusers-named weights, and `config_json` when given."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(controlnet_to_diffusers(model.state_dict()), str(folder / "diffusion_pytorch_model.safetensors"))
    if config_json is not None:
        (folder / "config.json").write_text(json.dumps(config_json))
    return folder


# ------------------------------------------------------------------ diffusers references
def reference_dit(cfg: Flux1DiTConfig, ours: Flux1DiT | None = None):
    """diffusers' `FluxTransformer2DModel` of `cfg`'s sizes, in eval mode, holding `ours`' weights when given."""
    from diffusers import FluxTransformer2DModel

    reference = FluxTransformer2DModel(
        patch_size=1,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        num_layers=cfg.depth,
        num_single_layers=cfg.depth_single_blocks,
        attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.num_heads,
        joint_attention_dim=cfg.context_in_dim,
        pooled_projection_dim=cfg.vec_in_dim,
        guidance_embeds=cfg.guidance_embed,
        axes_dims_rope=cfg.axes_dim,
    ).eval()
    if ours is not None:
        reference.load_state_dict(dit_to_diffusers(ours.state_dict()), strict=True)
    return reference


def reference_dit_output(reference, args, guidance: bool = True, **kwargs) -> torch.Tensor:
    """diffusers' DiT on our positional inputs (it takes 2-D ids; guidance only where it has an embedder)."""
    img, img_ids, txt, txt_ids, t, y, g = args
    return reference(
        hidden_states=img,
        encoder_hidden_states=txt,
        pooled_projections=y,
        timestep=t,
        img_ids=img_ids[0],
        txt_ids=txt_ids[0],
        guidance=g if guidance else None,
        return_dict=False,
        **kwargs,
    )[0]


def reference_components(repo: Path) -> dict:
    """diffusers' / transformers' loads of the tiny hub repo's parts, as a `FluxPipeline` takes them (fresh
    models each call: a test may change them)."""
    import diffusers
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    return dict(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(repo / "scheduler"),
        vae=diffusers.AutoencoderKL.from_pretrained(repo / "vae"),
        text_encoder=CLIPTextModel.from_pretrained(repo / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(repo / "tokenizer"),
        text_encoder_2=T5EncoderModel.from_pretrained(repo / "text_encoder_2"),
        tokenizer_2=T5TokenizerFast.from_pretrained(repo / "tokenizer_2"),
        transformer=diffusers.FluxTransformer2DModel.from_pretrained(repo / "transformer"),
    )


# ------------------------------------------------------------------ first-block cache (FLUX.1 and FLUX.2 DiTs)
def cached_calls(model: torch.nn.Module, threshold: float, calls) -> tuple[list[torch.Tensor], object]:
    """`model(*args)` for each args of `calls`, one per denoising step of a first-block cache of `threshold`;
    returns the outputs and the cache (the model's cache is off again afterwards)."""
    from diffsynth.runtime.step_cache import FirstBlockCache

    cache = model.step_cache = FirstBlockCache(threshold)
    outs = []
    try:
        cache.begin_loop()
        with torch.no_grad():
            for args in calls:
                cache.begin_step()
                outs.append(model(*args))
        cache.end_loop()
    finally:
        model.step_cache = None
    return outs, cache


def reused_call_reference(model: torch.nn.Module, full_args, reused_args, n_txt: int) -> torch.Tensor:
    """What a first-block cache must give on `reused_args` after a full call on `full_args`, built by hand
    from the model's own pieces: the first double block's (img, txt) on `reused_args`, plus what the later
    blocks (the other double blocks, then the single blocks over `[txt, img]`) added on the full call."""
    seen = {}
    hooks = [
        model.double_blocks[0].register_forward_hook(lambda m, i, o: seen.__setitem__("first", o)),
        model.single_blocks[-1].register_forward_hook(lambda m, i, o: seen.__setitem__("last", o)),
    ]
    with torch.no_grad():
        model(*full_args)
    for hook in hooks:
        hook.remove()
    (img, txt), last = seen["first"], seen["last"]
    rest = (last[:, n_txt:] - img, last[:, :n_txt] - txt)
    double, single = model.double_blocks, model.single_blocks
    model.double_blocks, model.single_blocks = double[:1], torch.nn.ModuleList()
    hook = double[0].register_forward_hook(lambda m, i, o: tuple(a + r for a, r in zip(o, rest, strict=True)))
    try:
        with torch.no_grad():
            return model(*reused_args)
    finally:
        hook.remove()
        model.double_blocks, model.single_blocks = double, single


def check_pipeline_first_block_cache(pipe, run, steps: int, calls_per_step: int = 1) -> None:
    """`run()` (a pipeline call of `steps` steps, `calls_per_step` DiT calls each) with the cache: threshold 0
    reuses nothing and gives the same image; a huge one reuses every call after the first step's and changes
    the image; disabled, the uncached image comes back."""
    plain = run()
    caches = pipe.enable_first_block_cache(0.0)
    try:
        assert list(caches) == ["dit"] and pipe.step_caches() == caches
        exact = run()
        assert (caches["dit"].calls, caches["dit"].skipped) == (steps * calls_per_step, 0)
        assert max_abs(exact, plain) == 0
        loose = pipe.enable_first_block_cache(1e9)["dit"]
        approx = run()
        assert (loose.calls, loose.skipped) == (steps * calls_per_step, (steps - 1) * calls_per_step)
        assert approx.shape == plain.shape and max_abs(approx, plain) > 1e-4
    finally:
        pipe.disable_first_block_cache()
    assert pipe.step_caches() == {} and pipe.dit.step_cache is None
    assert max_abs(run(), plain) == 0


# ------------------------------------------------------------------ pipelines, images, noise
def our_pipeline(repo: Path, **kwargs):
    """Our pipeline on the tiny hub repo, fp32 on the CPU (a fresh one: a test may load adapters into it)."""
    from diffsynth.flux.pipeline import FluxImagePipeline

    return FluxImagePipeline.from_pretrained(str(repo), torch_dtype="float32", device="cpu", **kwargs)


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """Seeded uniform-noise RGB picture."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def latent_noise(batch: int, height: int, width: int, seed: int = 11) -> torch.Tensor:
    """Seeded initial noise in the VAE's latent shape (16 channels, /8) for an image of `height` x `width`."""
    return torch.randn((batch, 16, height // 8, width // 8), generator=torch.Generator("cpu").manual_seed(seed))


def reference_images(pipe, noise: torch.Tensor, text_len: int, **kwargs) -> np.ndarray:
    """A diffusers FLUX pipeline's images from `noise` (packed as diffusers takes it), T5 padded to `text_len`."""
    from diffsynth.flux.pipeline import pack_latents

    return pipe(latents=pack_latents(noise.clone()), max_sequence_length=text_len, output_type="np", **kwargs).images


def our_images(pipe, prompt, noise: torch.Tensor, text_len: int, **kwargs) -> np.ndarray:
    """Our pipeline's images from the same `noise` and T5 length, for comparing with `reference_images`."""
    return pipe(
        prompt,
        latents=noise.clone(),
        t5_sequence_length=text_len,
        output_type="np",
        progress_bar=False,
        **kwargs,
    )


def max_abs(got, want) -> float:
    """Largest absolute difference of two arrays or tensors of the same shape."""
    got, want = (x.detach().numpy() if isinstance(x, torch.Tensor) else x for x in (got, want))
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.abs(got - want).max())
