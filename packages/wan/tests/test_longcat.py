"""LongCat-Video: the DiT against the authors' module and DiffSynth-Studio's (both read from their git mirrors into
private packages with stubs for their kernels; skipped where a mirror is absent, as in CI), the checkpoint layout,
and generation through `WanVideoPipeline` (T2V, I2V, continuation) on tiny models.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.loading import load_model, recognise
from diffsynth.runtime.testing import conformance as cf
from diffsynth.wan import WanVideoPipeline
from diffsynth.wan.formats import FAMILY, LONGCAT_DIT_SPEC
from diffsynth.wan.longcat import (
    LongCatConfig,
    LongCatVideoDiT,
    cfg_zero_star,
    config_from_state,
    longcat_lora_to_standard,
    longcat_sigmas,
)
from diffsynth.wan.presets import PRESETS

from . import conftest as C
from .conftest import studio_source

AUTHORS_MIRROR = Path("/work/.mirror/meituan-longcat+LongCat-Video/repo")
# The one place the tiny LongCat sizes live: head_dim 24 splits into 8 frame + 8 row + 8 column rotary channels.
TINY = dict(hidden_size=48, depth=2, num_heads=2, caption_channels=32, adaln_tembed_dim=16, frequency_embedding_size=32)


def tiny_model(seed: int = 0, **overrides) -> LongCatVideoDiT:
    return C.randomize(LongCatVideoDiT(LongCatConfig(**{**TINY, **overrides})), seed).eval()


def tiny_inputs(batch: int = 2, seed: int = 1, latent=(3, 4, 6), text: int = 7):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, *latent, generator=g)
    t = torch.rand(batch, generator=g) * 1000
    context = torch.randn(batch, text, TINY["caption_channels"], generator=g)
    mask = torch.ones(batch, text)
    mask[0, 5:] = 0  # the first prompt is shorter
    return x, t, context, mask


# ----------------------------------------------------------------------------------------- the references
def _git_show(repo: Path, path: str) -> str:
    if not (repo / "HEAD").exists() and not (repo / ".git").exists():
        pytest.skip(f"no mirror at {repo}")
    out = subprocess.run(["git", "-C", str(repo), "show", f"HEAD:{path}"], capture_output=True, text=True)
    if out.returncode:
        pytest.skip(f"{path} is not in {repo}")
    return out.stdout


def _sdpa(q, k, v):  # [B, H, S, D]
    return F.scaled_dot_product_attention(q, k, v)


def _varlen_cross(self, x, cond, kv_seqlen):
    """The authors' varlen cross-attention, written with SDPA per sample (their kernels are CUDA-only)."""
    b, n, c = x.shape
    q = self.q_norm(self.q_linear(x).view(b, n, self.num_heads, self.head_dim))
    kv = self.kv_linear(cond).view(1, -1, 2, self.num_heads, self.head_dim)
    k, v = kv.unbind(2)
    k = self.k_norm(k)
    outs, start = [], 0
    for i, length in enumerate(kv_seqlen):
        qi, ki, vi = (
            t.transpose(1, 2) for t in (q[i : i + 1], k[:, start : start + length], v[:, start : start + length])
        )
        outs.append(_sdpa(qi, ki, vi).transpose(1, 2))
        start += length
    return self.proj(torch.cat(outs).reshape(b, n, c))


@pytest.fixture(scope="module")
def authors(tmp_path_factory):
    """The authors' `LongCatVideoTransformer3DModel` (its modules as written), with stubs for context parallelism,
    block-sparse attention and LoRA, and SDPA in place of their flash/xformers kernels."""
    pytest.importorskip("einops")
    pytest.importorskip("diffusers")
    files = ["longcat_video_dit.py", "attention.py", "blocks.py", "rope_3d.py"]
    sources = {f: _git_show(AUTHORS_MIRROR, f"longcat_video/modules/{f}") for f in files}
    root = tmp_path_factory.mktemp("longcat-authors")
    pkg = root / "longcat_ref"
    for sub in ("", "modules", "context_parallel", "block_sparse_attention"):
        (pkg / sub).mkdir(parents=True, exist_ok=True)
        (pkg / sub / "__init__.py").write_text("")
    for name, text in sources.items():
        (pkg / "modules" / name).write_text(text)
    (pkg / "modules" / "lora_utils.py").write_text(_git_show(AUTHORS_MIRROR, "longcat_video/modules/lora_utils.py"))
    (pkg / "context_parallel" / "context_parallel_util.py").write_text("def get_cp_size():\n    return 1\n")
    (pkg / "context_parallel" / "ulysses_wrapper.py").write_text("def ulysses_wrapper(f):\n    return f\n")
    (pkg / "block_sparse_attention" / "bsa_interface.py").write_text(
        "def flash_attn_bsa_3d(*a, **k):\n    raise RuntimeError\n"
    )
    sys.path.insert(0, str(root))
    try:
        module = importlib.import_module("longcat_ref.modules.longcat_video_dit")
        attention = importlib.import_module("longcat_ref.modules.attention")
        mp = pytest.MonkeyPatch()
        mp.setattr(attention.Attention, "_process_attn", lambda self, q, k, v, shape: _sdpa(q, k, v))
        mp.setattr(attention.MultiHeadCrossAttention, "_process_cross_attn", _varlen_cross)
        yield module.LongCatVideoTransformer3DModel
        mp.undo()
    finally:
        sys.path.remove(str(root))


def _authors_model(cls, cfg: LongCatConfig, zero_pad: bool = True):
    return cls(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, hidden_size=cfg.hidden_size, depth=cfg.depth,
        num_heads=cfg.num_heads, caption_channels=cfg.caption_channels, mlp_ratio=cfg.mlp_ratio,
        adaln_tembed_dim=cfg.adaln_tembed_dim, frequency_embedding_size=cfg.frequency_embedding_size,
        cp_split_hw=[1, 1], text_tokens_zero_pad=zero_pad,
    )  # fmt: skip


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    """DiffSynth-Studio's `longcat_video_dit.py` in a package of its own (stubs: its attention helper, device type
    and gradient checkpointing)."""
    pytest.importorskip("einops")
    source = studio_source("diffsynth/models/longcat_video_dit.py")
    root = tmp_path_factory.mktemp("longcat-studio")
    pkg = root / "studio_longcat_ref"
    for sub in ("", "models", "core", "core/device"):
        (pkg / sub).mkdir(parents=True, exist_ok=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "models" / "longcat_video_dit.py").write_text(source)
    (pkg / "models" / "wan_video_dit.py").write_text(
        "import torch.nn.functional as F\n\n\ndef flash_attention(q, k, v, num_heads, compatibility_mode=False):\n"
        "    b, s, _ = q.shape\n    q, k, v = (t.view(t.shape[0], t.shape[1], num_heads, -1).transpose(1, 2) for t in (q, k, v))\n"
        "    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, -1)\n"
    )
    (pkg / "core" / "device" / "npu_compatible_device.py").write_text("def get_device_type():\n    return 'cpu'\n")
    (pkg / "core" / "gradient.py").write_text(
        "def gradient_checkpoint_forward(model, use_gradient_checkpointing, use_gradient_checkpointing_offload, "
        "*args, **kwargs):\n    return model(*args, **kwargs)\n"
    )
    sys.path.insert(0, str(root))
    try:
        yield importlib.import_module("studio_longcat_ref.models.longcat_video_dit")
    finally:
        sys.path.remove(str(root))


@pytest.mark.parity
@pytest.mark.filterwarnings("ignore:CUDA is not available")
@pytest.mark.parametrize(("zero_pad", "cond"), [(True, 0), (True, 1), (False, 0), (False, 2)])
def test_dit_matches_the_authors(authors, zero_pad, cond):
    ours = tiny_model(text_tokens_zero_pad=zero_pad)
    theirs = _authors_model(authors, ours.config, zero_pad).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x, t, context, mask = tiny_inputs()
    timestep = t[:, None].expand(-1, x.shape[2]).clone()
    timestep[:, :cond] = 0  # the authors' pipeline zeroes the clean frames' time
    with torch.no_grad():
        expected = theirs(x, timestep, context[:, None], mask.long(), num_cond_latents=cond)
        got = ours(x, t, context, mask, num_cond_latents=cond)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parity
@pytest.mark.filterwarnings("ignore:In CPU autocast")
def test_dit_matches_diffsynth_studio(studio):
    ours = tiny_model()
    if "text_tokens_zero_pad: bool = True" not in studio_source("diffsynth/models/longcat_video_dit.py"):
        pytest.skip("DiffSynth-Studio's default changed")
    theirs = studio.LongCatVideoTransformer3DModel(**{k: v for k, v in TINY.items()}, enable_flashattn2=False)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    theirs.eval()
    x, t, context, _ = tiny_inputs(batch=1)
    mask = torch.ones(1, context.shape[1], dtype=torch.int64)
    mask[0, 5:] = 0
    with torch.no_grad():
        expected = theirs(x, t.clone(), context[:, None], mask, num_cond_latents=1)
        got = ours(x, t, context, mask, num_cond_latents=1)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_full_size_layout_equals_the_authors_on_meta(authors):
    with torch.device("meta"):
        theirs = _authors_model(authors, LongCatConfig())
        ours = LongCatVideoDiT()
    expected = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == expected


# ----------------------------------------------------------------------------------------- without mirrors
def released_layout() -> dict[str, tuple[int, ...]]:
    """The released keys and shapes, written out from the authors' module (hidden 4096, 48 blocks, SwiGLU 11008)."""
    c, t, f = 4096, 512, 11008
    layout = {
        "x_embedder.proj.weight": (c, 16, 1, 2, 2), "x_embedder.proj.bias": (c,),
        "t_embedder.mlp.0.weight": (t, 256), "t_embedder.mlp.0.bias": (t,),
        "t_embedder.mlp.2.weight": (t, t), "t_embedder.mlp.2.bias": (t,),
        "y_embedder.y_proj.0.weight": (c, 4096), "y_embedder.y_proj.0.bias": (c,),
        "y_embedder.y_proj.2.weight": (c, c), "y_embedder.y_proj.2.bias": (c,),
        "final_layer.linear.weight": (64, c), "final_layer.linear.bias": (64,),
        "final_layer.adaLN_modulation.1.weight": (2 * c, t), "final_layer.adaLN_modulation.1.bias": (2 * c,),
    }  # fmt: skip
    block = {
        "adaLN_modulation.1.weight": (6 * c, t), "adaLN_modulation.1.bias": (6 * c,),
        "pre_crs_attn_norm.weight": (c,), "pre_crs_attn_norm.bias": (c,),
        "attn.qkv.weight": (3 * c, c), "attn.qkv.bias": (3 * c,), "attn.q_norm.weight": (128,),
        "attn.k_norm.weight": (128,), "attn.proj.weight": (c, c), "attn.proj.bias": (c,),
        "cross_attn.q_linear.weight": (c, c), "cross_attn.q_linear.bias": (c,),
        "cross_attn.kv_linear.weight": (2 * c, c), "cross_attn.kv_linear.bias": (2 * c,),
        "cross_attn.proj.weight": (c, c), "cross_attn.proj.bias": (c,),
        "cross_attn.q_norm.weight": (128,), "cross_attn.k_norm.weight": (128,),
        "ffn.w1.weight": (f, c), "ffn.w2.weight": (c, f), "ffn.w3.weight": (f, c),
    }  # fmt: skip
    for i in range(48):
        layout.update({f"blocks.{i}.{k}": v for k, v in block.items()})
    return layout


def test_full_size_keys_shapes_and_recognition():
    with torch.device("meta"):
        model = LongCatVideoDiT()
    state = model.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == released_layout()
    assert sum(v.numel() for v in state.values()) == 13_581_071_424  # the "13.6B"
    assert [r.spec.name for r in recognise(state.keys(), FAMILY.specs)] == ["longcat_video_dit"]
    assert config_from_state(state) == LongCatConfig()
    assert LongCatConfig().rope_axes_dims == (44, 42, 42)


def save_sharded(folder: Path, model: LongCatVideoDiT, prefix: str = "") -> list[Path]:
    """The model as the hub's `dit/` folder holds it: shards, an index and the authors' config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {prefix + k: v.contiguous() for k, v in model.state_dict().items()}
    keys = sorted(state)
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2 :]]
    paths, weight_map = [], {}
    for i, part in enumerate(halves, 1):
        name = f"diffusion_pytorch_model-0000{i}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, str(folder / name))
        weight_map.update(dict.fromkeys(part, name))
        paths.append(folder / name)
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    cfg = model.config
    config_json = {"_class_name": "LongCatVideoTransformer3DModel", "hidden_size": cfg.hidden_size, "depth": cfg.depth,
                   "num_heads": cfg.num_heads, "caption_channels": cfg.caption_channels, "mlp_ratio": cfg.mlp_ratio,
                   "adaln_tembed_dim": cfg.adaln_tembed_dim, "frequency_embedding_size": cfg.frequency_embedding_size,
                   "patch_size": [1, 2, 2], "enable_flashattn2": True, "enable_bsa": False, "cp_split_hw": [1, 1],
                   "bsa_params": {"sparsity": 0.9375}, "text_tokens_zero_pad": cfg.text_tokens_zero_pad}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config_json))
    return paths


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_a_sharded_dit_folder_loads_strictly(tmp_path, prefix):
    model = tiny_model(seed=4)
    paths = save_sharded(tmp_path / "dit", model, prefix)
    loaded = load_model([str(p) for p in paths])
    assert isinstance(loaded, LongCatVideoDiT) and loaded.config == model.config
    args = tiny_inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(*args, num_cond_latents=1), model(*args, num_cond_latents=1))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file({k: v for k, v in state.items() if k != "blocks.1.attn.k_norm.weight"}, str(tmp_path / "m.safetensors"))
    with pytest.raises(ValueError, match="blocks.1.attn.k_norm.weight"):
        load_model(str(tmp_path / "m.safetensors"), specs=[LONGCAT_DIT_SPEC])


def test_conformance(tmp_path):
    args = tiny_inputs()
    factory = lambda: tiny_model(seed=3)  # noqa: E731
    cf.check_forward(factory, args, expected_shapes=[args[0].shape])
    cf.check_backward(factory, args)
    cf.check_gradient_checkpointing(factory, args, atol=1e-5)
    cf.check_meta_load(factory, args)
    cf.check_declared_units(factory)
    cf.check_streamed(factory, args, tmp_path, min_units=TINY["depth"])
    for layout in LONGCAT_DIT_SPEC.layouts:
        cf.check_layout_roundtrip(factory, layout)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [({"num_heads": 5}, "num_heads"), ({"patch_size": (2, 2, 2)}, "patch_size"), ({"hidden_size": 40}, "head_dim")],
)
def test_config_refuses_bad_fields(overrides, message):
    with pytest.raises(ValueError, match=message):
        LongCatConfig(**{**TINY, **overrides})


def test_block_sparse_attention_is_refused_by_name():
    with pytest.raises(ConfigError, match="block-sparse"):
        LongCatConfig(attention_mode="bsa")


def test_clean_frames_ignore_the_noisy_ones_and_the_text():
    """Conditioning frames attend only among themselves and take no text: changing the later frames or the prompt
    leaves their output unchanged, while it changes the noisy frames' output."""
    model = tiny_model()
    x, t, context, mask = tiny_inputs()
    x2, context2 = x.clone(), torch.randn_like(context)
    x2[:, :, 2:] += 1
    with torch.no_grad():
        a = model(x, t, context, mask, num_cond_latents=2)
        b = model(x2, t, context2, mask, num_cond_latents=2)
    torch.testing.assert_close(a[:, :, :2], b[:, :, :2])
    assert (a[:, :, 2:] - b[:, :, 2:]).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------- the pipeline
HEIGHT, WIDTH = 32, 48
FAST = dict(height=HEIGHT, width=WIDTH, num_frames=9, num_inference_steps=2, progress_bar=False, tiled=False)
PROMPT = C.CAPTIONS[0]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    """A tiny LongCat-Video: the T2V repo's umT5, VAE and tokenizer beside a sharded `dit/` folder of their widths,
    loaded as DiffSynth-Studio's example does (a ModelConfig per model)."""
    root = C.build_tiny_repo(tmp_path_factory.mktemp("tiny-longcat"), "t2v")
    shards = save_sharded(root / "dit", tiny_model(seed=5, caption_channels=C.TINY_UMT5["d_model"]))
    configs = [ModelConfig(path=[str(p) for p in shards]), ModelConfig(path=str(root / C.T5_FILE))]
    configs.append(ModelConfig(path=str(root / "Wan2.1_VAE.pth")))
    return WanVideoPipeline.from_pretrained(
        model_configs=configs, tokenizer_config=ModelConfig(path=str(root / C.TOKENIZER_DIR)),
        torch_dtype="float32", device="cpu",
    )  # fmt: skip


def frames(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)) for _ in range(n)]


class Latents:
    """Records the latents the VAE decodes and the DiT's inputs."""

    def __init__(self, pipe):
        self.decoded, self.calls, self.pipe = [], [], pipe

    def __enter__(self):
        decode = self.pipe.vae.decode
        self.pipe.vae.decode = lambda z, **kw: (self.decoded.append(z.clone()), decode(z, **kw))[1]
        self.handle = self.pipe.dit.register_forward_pre_hook(
            lambda m, args, kwargs: self.calls.append((args, kwargs)), with_kwargs=True
        )
        return self

    def __exit__(self, *exc):
        del self.pipe.vae.decode
        self.handle.remove()


def test_the_dit_is_recognised_and_t2v_runs(pipe):
    assert isinstance(pipe.dit, LongCatVideoDiT) and pipe.dit2 is None
    video = pipe(PROMPT, seed=1, cfg_scale=2.0, output_type="pt", **FAST)
    assert video.shape == (1, 3, 9, HEIGHT, WIDTH) and torch.isfinite(video).all()
    again = pipe(PROMPT, seed=1, cfg_scale=2.0, output_type="pt", **FAST)
    torch.testing.assert_close(video, again)


@pytest.mark.parametrize("mode", ["i2v", "continuation"])
def test_conditioning_latents_stay_fixed(pipe, mode):
    """The given frames' latents open the decoded latents unchanged, and the DiT is told how many they are."""
    given = frames(5, seed=3)
    kwargs = {"input_image": given[0]} if mode == "i2v" else {"longcat_video": given}
    cond = 1 if mode == "i2v" else 2
    from diffsynth.wan.animate import frames_tensor

    expected = pipe.vae.encode(
        frames_tensor(given[:1] if mode == "i2v" else given, HEIGHT, WIDTH, torch.float32, "cpu")
    )
    with Latents(pipe) as rec:
        pipe(PROMPT, seed=2, cfg_scale=2.0, output_type="pt", **FAST, **kwargs)
    torch.testing.assert_close(rec.decoded[0][:, :, :cond], expected)
    assert all(kwargs_["num_cond_latents"] == cond for _, kwargs_ in rec.calls) and len(rec.calls) == 4


def test_one_step_is_the_authors_formula(pipe):
    """One denoising step, computed by hand: sigma 1 -> 0 (steps=1 gives the authors' sigmas [1]), CFG-Zero* with
    cfg 3 of the DiT's two predictions on the noise whose first latent frame is the image's latent."""
    image = frames(1, seed=9)[0]
    noise = torch.randn(1, 16, 3, HEIGHT // 8, WIDTH // 8, generator=torch.Generator().manual_seed(7))
    with Latents(pipe) as rec:
        pipe(PROMPT, negative_prompt="static", input_image=image, latents=noise, cfg_scale=3.0,
             output_type="pt", **{**FAST, "num_inference_steps": 1})  # fmt: skip
    (pos_args, _), (neg_args, _) = rec.calls
    x = pos_args[0]
    assert float(pos_args[1][0, 0]) == 1000.0
    torch.testing.assert_close(x[:, :, 1:], noise[:, :, 1:])
    with torch.no_grad():
        c = pipe.dit(*pos_args, num_cond_latents=1)
        u = pipe.dit(*neg_args, num_cond_latents=1)
    st = (c * u).sum() / ((u * u).sum() + 1e-8)
    guided = u * st + 3.0 * (c - u * st)
    expected = x.clone()
    expected[:, :, 1:] = x[:, :, 1:] + (0.0 - 1.0) * -guided[:, :, 1:]
    torch.testing.assert_close(rec.decoded[0], expected)


def test_schedule_and_guidance_helpers():
    s = longcat_sigmas(4, 1.0)
    torch.testing.assert_close(s, torch.tensor([1.0, 0.667, 0.334, 0.001, 0.0]))
    shifted = longcat_sigmas(4, 3.0)
    torch.testing.assert_close(shifted[1], torch.tensor(3 * 0.667 / (1 + 2 * 0.667)))
    c, u = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    one = cfg_zero_star(c[:1], u[:1], 4.0)
    torch.testing.assert_close(cfg_zero_star(c, u, 4.0)[:1], one)  # the projection is per sample
    torch.testing.assert_close(cfg_zero_star(c, c, 4.0), c, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"longcat_video": "clip6"}, "4n \\+ 1"),
        ({"longcat_video": "clip9"}, "must be longer"),
        ({"longcat_video": "clip5", "input_image": "image"}, "not both"),
        ({"end_image": "image"}, "takes no end_image"),
        ({"vace_video": "clip5"}, "takes no vace_video"),
        ({"sampler": "unipc"}, "Euler"),
        ({"cfg_merge": True}, "cfg_merge"),
        ({"framewise_decoding": True}, "framewise_decoding"),
    ],
)
def test_bad_arguments_are_refused_by_name(pipe, kwargs, message):
    values = {"clip5": frames(5), "clip6": frames(6), "clip9": frames(9), "image": frames(1)[0]}
    given = {k: values.get(v, v) if isinstance(v, str) else v for k, v in kwargs.items()}
    with pytest.raises(ConfigError, match=message):
        pipe(PROMPT, seed=0, **FAST, **given)


def test_another_dit_refuses_longcat_video(tiny_repo):
    other = WanVideoPipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu")
    with pytest.raises(ConfigError, match="LongCat-Video DiT"):
        other(PROMPT, longcat_video=frames(5), **FAST)


def test_preset_has_the_authors_defaults():
    preset = PRESETS["meituan-longcat/LongCat-Video"]
    d = preset.defaults
    assert (d["num_inference_steps"], d["cfg_scale"], d["fps"], d["num_frames"]) == (50, 4.0, 15, 93)
    assert (d["height"], d["width"]) == (480, 832)
    assert [(f.model_id, f.origin_file_pattern) for f in preset.files][0] == (
        "meituan-longcat/LongCat-Video",
        "dit/diffusion_pytorch_model*.safetensors",
    )


# ----------------------------------------------------------------------------------------- distilled sampling
def authors_lora_state(model: LongCatVideoDiT, rank: int = 4, alpha_scale: float = 0.75, seed: int = 3) -> dict:
    """A LoRA in the authors' layout on every block's projections: the fused qkv / kv ones with their up matrix
    split per output chunk (`lora_up.blocks.N`), the scale stored as `alpha_scale`, as their `LoRANetwork` saves."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name.split(".")[-1] not in model.lora_target_modules:
            continue
        key = "lora___lorahyphen___" + name.replace(".", "___lorahyphen___")
        chunks = {"qkv": 3, "kv_linear": 2}.get(name.split(".")[-1], 1)
        state[f"{key}.lora_down.weight"] = torch.randn(chunks * rank, module.in_features, generator=g) * 0.1
        if chunks == 1:
            state[f"{key}.lora_up.weight"] = torch.randn(module.out_features, rank, generator=g) * 0.1
        for i in range(chunks if chunks > 1 else 0):
            state[f"{key}.lora_up.blocks.{i}.weight"] = torch.randn(module.out_features // chunks, rank, generator=g)
        state[f"{key}.alpha_scale"] = torch.tensor(alpha_scale)
    return state


def test_longcat_lora_layout_is_read_onto_the_weights(pipe, tmp_path):
    """A LoRA file in the authors' layout loads through `pipe.load_lora`; fused, each projection gains
    `alpha_scale * up @ down` with output chunk N of a split up matrix reading rows N of the down matrix."""
    from diffsynth.runtime.lora import clear_loras

    state = authors_lora_state(pipe.dit)
    path = tmp_path / "cfg_step_lora.safetensors"
    save_file(state, str(path))
    before = {k: v.clone() for k, v in pipe.dit.state_dict().items()}
    try:
        pipe.load_lora(str(path), fuse=True)
        after = pipe.dit.state_dict()
        for name, module in pipe.dit.named_modules():
            if not isinstance(module, torch.nn.Linear) or name.split(".")[-1] not in pipe.dit.lora_target_modules:
                continue
            key = "lora___lorahyphen___" + name.replace(".", "___lorahyphen___")
            down = state[f"{key}.lora_down.weight"]
            ups = [state[k] for k in sorted(state) if k.startswith(f"{key}.lora_up.blocks.")] or [
                state[f"{key}.lora_up.weight"]
            ]
            rank = down.shape[0] // len(ups)
            delta = torch.cat([up @ down[i * rank : (i + 1) * rank] for i, up in enumerate(ups)])
            torch.testing.assert_close(after[f"{name}.weight"], before[f"{name}.weight"] + 0.75 * delta)
    finally:
        pipe.dit.load_state_dict(before)
        clear_loras(pipe.dit)


def test_longcat_lora_errors_name_the_key():
    from diffsynth.runtime.errors import LoRAError

    state = authors_lora_state(tiny_model())
    key = next(k for k in state if k.endswith("lora_up.blocks.1.weight"))
    with pytest.raises(LoRAError, match="lora_up.blocks has chunks \\[0, 2\\]"):
        longcat_lora_to_standard({k: v for k, v in state.items() if k != key}, "f.safetensors")
    with pytest.raises(LoRAError, match="f.safetensors: key 'lora___lorahyphen___x.weight' is not"):
        longcat_lora_to_standard({**state, "lora___lorahyphen___x.weight": torch.zeros(1)}, "f.safetensors")
    down = next(k for k in state if k.endswith("lora_down.weight"))
    with pytest.raises(LoRAError, match="lacks its down matrix"):
        longcat_lora_to_standard({k: v for k, v in state.items() if k != down}, "f.safetensors")


@pytest.mark.parity
@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_longcat_lora_matches_the_authors(authors, tmp_path):
    """The same file through the authors' `load_lora` + `enable_loras` (their LoRA forward beside each Linear)
    and through ours (fused and kept apart): the DiT's outputs agree."""
    from diffsynth.runtime.lora import apply_lora, read_lora

    ours = tiny_model(seed=4)
    theirs = _authors_model(authors, ours.config).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    state = authors_lora_state(ours)
    save_file(state, str(tmp_path / "lora.safetensors"))
    theirs.load_lora(str(tmp_path / "lora.safetensors"), "cfg_step_lora", lora_network_dim=4, lora_network_alpha=2)
    theirs.enable_loras(["cfg_step_lora"])
    x, t, context, mask = tiny_inputs()
    timestep = t[:, None].expand(-1, x.shape[2]).clone()
    with torch.no_grad():
        expected = theirs(x, timestep, context[:, None], mask.long())
        plain = ours(x, t, context, mask)
        for fuse in (False, True):
            model = tiny_model(seed=4)
            apply_lora(model, read_lora(longcat_lora_to_standard(state)), fuse=fuse)
            got = model(x, t, context, mask)
            print(f"LongCat LoRA (fuse={fuse}) vs the authors': max abs {(got - expected).abs().max():.1e}")
            torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    assert (plain - expected).abs().max() > 1e-2  # the LoRA changes the output


def test_distill_schedule_is_the_authors():
    """`longcat_distill` sigmas: N picks at even strides of the 50-step grid 1000, 980, ..., 20 (over 1000), then
    the shift; equal to the authors' `get_timesteps_sigmas(N, use_distill=True)` (read from their mirror when
    present) and to the grid written out here."""
    for steps in (16, 4, 50):
        grid = np.arange(1000, 0, -20) / 1000
        want = grid[np.floor(np.linspace(0, 50, steps, endpoint=False)).astype(int)]
        got = longcat_sigmas(steps, 1.0, distill=True)
        assert got[-1] == 0 and len(got) == steps + 1
        np.testing.assert_allclose(got[:-1].numpy(), want, atol=1e-7)
    assert longcat_sigmas(16, 1.0, distill=True)[:3].tolist() == pytest.approx([1.0, 0.94, 0.88])
    shifted = longcat_sigmas(16, 3.0, distill=True)
    torch.testing.assert_close(shifted[1], torch.tensor(3 * 0.94 / (1 + 2 * 0.94)))
    with pytest.raises(ConfigError, match="at most 50"):
        longcat_sigmas(51, 1.0, distill=True)
    try:
        source = _git_show(AUTHORS_MIRROR, "longcat_video/pipeline_longcat_video.py")
    except pytest.skip.Exception:
        return
    import ast
    import types

    tree = ast.parse(source)
    function = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "get_timesteps_sigmas")
    namespace = {"torch": torch, "np": np}
    exec(compile(ast.Module([function], []), "longcat:get_timesteps_sigmas", "exec"), namespace)
    owner = types.SimpleNamespace(num_distill_sample_steps=50, num_timesteps=1000)
    for steps in (16, 4, 50):
        theirs = namespace["get_timesteps_sigmas"](owner, steps, use_distill=True)
        torch.testing.assert_close(longcat_sigmas(steps, 1.0, distill=True)[:-1], theirs)
        torch.testing.assert_close(longcat_sigmas(steps, 1.0)[:-1], namespace["get_timesteps_sigmas"](owner, steps))


def test_distill_runs_on_its_grid(pipe):
    """`longcat_distill=True`: the DiT sees the distilled grid's timesteps, one call a step (no CFG at 1)."""
    with Latents(pipe) as rec:
        pipe(PROMPT, longcat_distill=True, cfg_scale=1.0, sigma_shift=3.0, seed=0, **{**FAST, "num_inference_steps": 4})
    seen = [float(args[1][0, 0]) for args, _ in rec.calls]
    assert seen == pytest.approx((longcat_sigmas(4, 3.0, distill=True)[:-1] * 1000).tolist())


def test_distill_preset_fuses_the_cfg_step_lora(tmp_path, monkeypatch):
    """`meituan-longcat/LongCat-Video:distill` loads the base files and the authors' `lora/cfg_step_lora.safetensors`
    (fused): its DiT equals the base's after `load_lora(file)`, with 16 steps, no CFG and the distilled grid."""
    import shutil

    root = C.build_tiny_repo(tmp_path / "tiny", "t2v")
    base = tmp_path / "models"
    longcat = base / "meituan-longcat" / "LongCat-Video"
    model = tiny_model(seed=5, caption_channels=C.TINY_UMT5["d_model"])
    save_sharded(longcat / "dit", model)
    (longcat / "lora").mkdir(parents=True)
    save_file(authors_lora_state(model), str(longcat / "lora" / "cfg_step_lora.safetensors"))
    wan = base / "Wan-AI" / "Wan2.1-T2V-14B"
    wan.mkdir(parents=True)
    for name in (C.T5_FILE, "Wan2.1_VAE.pth"):
        shutil.copy(root / name, wan / name)
    shutil.copytree(root / C.TOKENIZER_DIR, base / "Wan-AI" / "Wan2.1-T2V-1.3B" / "google" / "umt5-xxl")
    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(base))
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "1")
    distilled = WanVideoPipeline.from_pretrained("meituan-longcat/LongCat-Video:distill", torch_dtype="float32")
    plain = WanVideoPipeline.from_pretrained("meituan-longcat/LongCat-Video", torch_dtype="float32")
    plain.load_lora(str(longcat / "lora" / "cfg_step_lora.safetensors"), fuse=True)
    ours, want = distilled.dit.state_dict(), plain.dit.state_dict()
    assert all(torch.equal(ours[k], want[k]) for k in want)
    d = distilled.defaults
    assert (d["num_inference_steps"], d["cfg_scale"], d["longcat_distill"]) == (16, 1.0, True)
