"""Wan-Dancer-14B: the DiT (music encoder and injections, the global modules and spread RoPE, the reference image's
tokens, the negative branch without block 9), its checkpoint layout, and the pipeline's `wantodance_*` arguments.

The DiT is compared with DiffSynth-Studio's `WanModel` (its `wantodance_*` options) run through its
`model_fn_wan_video` (the only public implementation), read from its local git mirror into a package of its own with
stubs for what those two need and nothing else; those tests skip where the mirror is absent (as in CI). Everything
else runs anywhere, with music features given as tensors (librosa is not needed).
"""

from __future__ import annotations

import ast
import importlib
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.loading import load_model, recognise
from diffsynth.runtime.testing import conformance as cf
from diffsynth.wan import WanVideoPipeline
from diffsynth.wan.dancer import (
    NEGATIVE_SKIP_BLOCK,
    DancerConfig,
    MusicCrossAttention,
    WanDancerDiT,
    config_from_state,
    decode_latents,
    frame_positions,
)
from diffsynth.wan.dit import CrossAttention
from diffsynth.wan.formats import DANCER_DIT_SPEC, DIT_SPEC, FAMILY
from diffsynth.wan.presets import NEGATIVE_PROMPT, PRESETS

from . import conftest as C
from .conftest import studio_source

# The one place the tiny dancer sizes live. DiffSynth-Studio fixes the CLIP width (1280) and the music encoder's
# sizes, so the tests against it keep those; `SMALL` shrinks them for the others. head_dim 24 splits into the
# same frame / row / column rotary channels in both implementations.
TINY = dict(dim=48, ffn_dim=64, num_heads=2, num_layers=10, text_dim=32, freq_dim=32, text_len=16)
TINY["music_inject_layers"] = (0, 4, 8)
SMALL = dict(num_layers=3, music_inject_layers=(0, 2), image_dim=32, music_width=16, music_heads=2, music_ffn_dim=32)
LATENT = (3, 8, 8)  # latent frames, height, width: a 4 x 4 patch grid, 2 tokens per music slot


def tiny_config(**overrides) -> DancerConfig:
    return DancerConfig(**{**TINY, **overrides})


def tiny_model(seed: int = 0, **overrides) -> WanDancerDiT:
    return C.randomize(WanDancerDiT(tiny_config(**overrides)), seed).eval()


def tiny_inputs(batch: int = 1, seed: int = 1, latent=LATENT, image_dim: int = 1280, text: int = 10) -> list:
    """`[x, timestep, context, clip_feature, y, music_feature, refimage_feature]` of random values."""
    frames, h, w = latent
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, 16, frames, h, w, generator=g),
        torch.rand(batch, generator=g) * 1000,
        torch.randn(batch, text, TINY["text_dim"], generator=g),
        torch.randn(batch, 257, image_dim, generator=g),
        torch.randn(batch, 20, frames, h, w, generator=g),
        torch.randn(37, 35, generator=g),
        torch.randn(batch, 257, image_dim, generator=g),
    ]


# ----------------------------------------------------------------------------------------- DiffSynth-Studio's
GRADIENT_STUB = """def gradient_checkpoint_forward(model, use_gradient_checkpointing, use_gradient_checkpointing_offload, *args,
                                **kwargs):
    return model(*args, **kwargs)
"""
MODEL_FN_HEADER = '''"""DiffSynth-Studio's `model_fn_wan_video` and `wantodance_get_single_freqs`, cut from its pipeline."""
from __future__ import annotations

import torch
from einops import rearrange

from ..core.gradient import gradient_checkpoint_forward
from ..models.wan_video_dit import sinusoidal_embedding_1d


class LongCatVideoTransformer3DModel:  # isinstance checks only
    pass


class WanAnimate2Transformer:
    pass


'''


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    """DiffSynth-Studio's `WanModel` module and `model_fn_wan_video` in a package of their own (stubs: the camera
    adapter it imports, gradient checkpointing), and the released files' constructor arguments from its
    `model_configs.py`. Its music encoder layers are built with `device='cuda'`; that one argument becomes None."""
    pytest.importorskip("einops", reason="DiffSynth-Studio's modules need einops")
    dit_source = studio_source("diffsynth/models/wan_video_dit.py")
    assert dit_source.count("device='cuda',") == 1
    pipeline_source = studio_source("diffsynth/pipelines/wan_video.py")
    wanted = {"wantodance_get_single_freqs", "model_fn_wan_video"}
    functions = [
        ast.get_source_segment(pipeline_source, node)
        for node in ast.parse(pipeline_source).body
        if isinstance(node, ast.FunctionDef) and node.name in wanted
    ]
    assert len(functions) == 2
    root = tmp_path_factory.mktemp("studio-dancer")
    pkg = root / "studio_dancer_ref"
    for sub in ("", "models", "core", "pipelines"):
        (pkg / sub).mkdir(parents=True, exist_ok=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "models" / "wan_video_dit.py").write_text(dit_source.replace("device='cuda',", "device=None,"))
    (pkg / "models" / "wantodance.py").write_text(studio_source("diffsynth/models/wantodance.py"))
    (pkg / "models" / "wan_video_camera_controller.py").write_text("class SimpleAdapter:\n    pass\n")
    (pkg / "core" / "gradient.py").write_text(GRADIENT_STUB)
    (pkg / "pipelines" / "model_fn.py").write_text(MODEL_FN_HEADER + "\n\n\n".join(functions) + "\n")
    configs = studio_source("diffsynth/configs/model_configs.py")
    released = [  # the `extra_kwargs` of the Wan-Dancer entry (the one with the wantodance flags)
        ast.literal_eval(node)
        for node in ast.walk(ast.parse(configs))
        if isinstance(node, ast.Dict)
        and any(isinstance(k, ast.Constant) and k.value == "wantodance_enable_global" for k in node.keys)
    ]
    assert len(released) == 1, released
    sys.path.insert(0, str(root))
    try:
        yield types.SimpleNamespace(
            WanModel=importlib.import_module("studio_dancer_ref.models.wan_video_dit").WanModel,
            model_fn=importlib.import_module("studio_dancer_ref.pipelines.model_fn").model_fn_wan_video,
            released=released[0],
        )
    finally:
        sys.path.remove(str(root))


def studio_model(studio, ours: WanDancerDiT):
    cfg = ours.config
    sizes = dict(dim=cfg.dim, ffn_dim=cfg.ffn_dim, num_heads=cfg.num_heads, num_layers=cfg.num_layers,
                 text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
                 wantodance_music_inject_layers=list(cfg.music_inject_layers))  # fmt: skip
    theirs = studio.WanModel(**{**studio.released, **sizes})
    theirs.load_state_dict(ours.state_dict(), strict=True)  # no converter: the file's keys are the module's
    return theirs.eval()


@pytest.fixture(scope="module")
def pair(studio):
    ours = tiny_model()
    return ours, studio_model(studio, ours)


@pytest.mark.parity
@pytest.mark.parametrize(
    ("fps", "negative", "with_reference", "t"),
    [(30.0, False, True, 999.0), (7.5, False, True, 612.5), (7.5, True, True, 250.3), (15.0, True, False, 80.0)],
)
def test_dit_matches_diffsynth_studio(studio, pair, fps, negative, with_reference, t):
    """The local call (fps 30), the global one (7.5: its own patch embedding and head, frames spread on the RoPE
    time line), the negative branch without block 9, and a call without the reference image."""
    ours, theirs = pair
    x, _, context, clip, y, music, ref = tiny_inputs()
    ref = ref if with_reference else None
    padded = torch.nn.functional.pad(context, (0, 0, 0, TINY["text_len"] - context.shape[1]))  # the pipeline's
    with torch.no_grad():
        got = ours(x, torch.tensor([t]), context, clip, y, music, ref, fps, [NEGATIVE_SKIP_BLOCK] if negative else [])
        want = studio.model_fn(
            dit=theirs, latents=x, timestep=torch.tensor([t]), context=padded, clip_feature=clip, y=y,
            wantodance_refimage_feature=ref, wantodance_fps=fps, music_feature=music, skip_9th_layer=negative,
        )  # fmt: skip
    assert got.shape == want.shape == x.shape
    assert (got - want).abs().max().item() <= 1e-5, (got - want).abs().max()


@pytest.mark.parity
def test_full_size_keys_and_shapes_equal_diffsynth_studio(studio):
    """DiffSynth-Studio's WanModel with the arguments it gives the released files (one hash for both)."""
    assert studio.released["dim"] == 5120 and studio.released["wantodance_enable_unimodel"]
    with torch.device("meta"):
        theirs = studio.WanModel(**studio.released).state_dict()
    assert {k: tuple(v.shape) for k, v in theirs.items()} == expected_14b_shapes()
    assert tuple(studio.released["wantodance_music_inject_layers"]) == DancerConfig().music_inject_layers


# ----------------------------------------------------------------------------------------- invariants
def test_an_injection_is_attention_to_its_one_music_vector():
    """`o(v(music))` equals a Wan cross-attention (with its queries and keys) from any tokens to one music vector."""
    torch.manual_seed(0)
    injector = C.randomize(MusicCrossAttention(48, 1e-6), 3)
    attention = CrossAttention(48, 2, 1e-6, image_input=False)
    attention.load_state_dict(injector.state_dict(), strict=True)
    tokens, music = torch.randn(6, 5, 48), torch.randn(6, 1, 48)
    with torch.no_grad():
        torch.testing.assert_close(injector(music).expand(-1, 5, -1), attention(tokens, music, None), atol=1e-6, rtol=0)


def test_frame_positions_spread_frames_on_the_30_fps_time_line():
    at_7_5 = frame_positions(38, 7.5)
    assert at_7_5[0] == (0, 0, 0.0) and at_7_5[-1] == (151, 151, 0.0)  # the last at round(38 * 4) - 1
    assert all(abs(low + w - 4 * i) < 1e-4 and high == low + 1 for i, (low, high, w) in enumerate(at_7_5[1:-1], 1))
    assert frame_positions(4, 60.0)[1:3] == [(0, 1, pytest.approx(0.5, abs=1e-6)), (0, 1, pytest.approx(1.0, abs=1e-6))]
    assert frame_positions(1, 7.5) == [(3, 3, 0.0)]


def test_music_reference_fps_and_skipped_blocks_reach_the_output():
    model = tiny_model(**SMALL)
    x, t, context, clip, y, music, ref = tiny_inputs(image_dim=32)
    with torch.no_grad():
        base = model(x, t, context, clip, y, music, ref, 30.0)
        assert (model(x, t, context, clip, y, music + 1, ref, 30.0) - base).abs().max() > 1e-3
        assert (model(x, t, context, clip, y, music, None, 30.0) - base).abs().max() > 1e-3
        assert (model(x, t, context, clip, y, music, ref, 30.0, [1]) - base).abs().max() > 1e-3
        torch.testing.assert_close(
            model(x, t, context, clip, y, music, ref, 29.6), base, atol=0, rtol=0
        )  # rounds to 30
        spread = model(x, t, context, clip, y, music, ref, 7.5)
        assert (model(x, t, context, clip, y, music, ref, 15.0) - spread).abs().max() > 1e-4
        for name in ("patch_embedding_global", "head_global.head"):  # the local call never uses them
            model.get_submodule(name).weight.zero_()
        torch.testing.assert_close(model(x, t, context, clip, y, music, ref, 30.0), base, atol=0, rtol=0)
        assert (model(x, t, context, clip, y, music, ref, 7.5) - spread).abs().max() > 1e-3
        for injector in model.music_injector.injector:  # without the injections the music is irrelevant
            injector.o.weight.zero_()
            injector.o.bias.zero_()
        silent = model(x, t, context, clip, y, music, ref, 30.0)
        torch.testing.assert_close(model(x, t, context, clip, y, 5 * music, ref, 30.0), silent, atol=0, rtol=0)


def test_batch_equals_one_by_one():
    model = tiny_model(**SMALL)
    x, t, context, clip, y, music, ref = tiny_inputs(batch=2, image_dim=32)
    with torch.no_grad():
        both = model(x, t, context, clip, y, music, ref, 7.5)
        for i in range(2):
            one = model(x[i : i + 1], t[i : i + 1], context[i : i + 1], clip[i : i + 1], y[i : i + 1], music,
                        ref[i : i + 1], 7.5)  # fmt: skip
            torch.testing.assert_close(both[i : i + 1], one, atol=1e-5, rtol=0)


UNUSED = ["patch_embedding_global.weight", "patch_embedding_global.bias", "head_global.modulation",
          "head_global.head.weight", "head_global.head.bias", "ref_conv.weight", "ref_conv.bias"]  # fmt: skip
UNUSED += [f"music_injector.injector.{i}.{p}" for i in range(2) for p in
           ("q.weight", "q.bias", "k.weight", "k.bias", "norm_q.weight", "norm_k.weight")]  # fmt: skip


def test_conformance(tmp_path):
    args = (*tiny_inputs(image_dim=32), 30.0)
    factory = lambda: tiny_model(seed=3, **SMALL)  # noqa: E731
    cf.check_forward(factory, args, expected_shapes=[args[0].shape])
    cf.check_backward(factory, args, allow_unused=UNUSED)
    cf.check_gradient_checkpointing(factory, args, atol=1e-5)
    cf.check_meta_load(factory, args)
    cf.check_declared_units(factory)
    cf.check_streamed(factory, args, tmp_path, min_units=SMALL["num_layers"] + 2)
    for layout in DANCER_DIT_SPEC.layouts:
        cf.check_layout_roundtrip(factory, layout)
    json_fields = {"num_heads": 2, "text_len": 16, "music_heads": 2, "wantodance_music_inject_layers": [0, 2]}
    assert cf.check_spec_config(DANCER_DIT_SPEC, factory, json_fields) == tiny_config(**SMALL)


@pytest.mark.parametrize(
    ("index", "change", "message"),
    [
        (4, lambda v: v[:, :4], "y has shape"),
        (3, lambda v: v[..., :8], "clip_feature has shape"),
        (6, lambda v: v[..., :8], "refimage_feature has shape"),
        (5, lambda v: v[:, :20], "music_feature has shape"),
        (2, lambda v: v[:, :, :8], "context has shape"),
    ],
)
def test_bad_dit_inputs_name_the_argument(index, change, message):
    args = tiny_inputs(image_dim=32)
    args[index] = change(args[index])
    with pytest.raises(ValueError, match=message), torch.no_grad():
        tiny_model(**SMALL)(*args)


def test_frames_whose_tokens_do_not_split_into_8_runs_and_bad_skips_are_refused():
    model = tiny_model(**SMALL)
    with pytest.raises(ValueError, match="multiple of 8"), torch.no_grad():
        model(*tiny_inputs(latent=(2, 4, 6), image_dim=32))
    with pytest.raises(ValueError, match="skip_blocks"), torch.no_grad():
        model(*tiny_inputs(image_dim=32), 30.0, [3])


@pytest.mark.parametrize(
    ("overrides", "field"),
    [({"num_heads": 5}, "num_heads"), ({"in_dim": 16}, "in_dim"), ({"music_inject_layers": (4, 0)}, "music_inject"),
     ({"music_inject_layers": (0, 10)}, "music_inject"), ({"music_heads": 3}, "music_width")],
)  # fmt: skip
def test_config_refuses_bad_fields(overrides, field):
    with pytest.raises(ValueError, match=f"DancerConfig.*{field}"):
        tiny_config(**overrides)


# ----------------------------------------------------------------------------------------- layout and files
def expected_14b_shapes() -> dict[str, tuple[int, ...]]:
    """The released files' keys and shapes, written out from DiffSynth-Studio's module structure."""
    d, f, t, fq, c = 5120, 13824, 4096, 256, 1280
    linear = lambda name, i, o: {f"{name}.weight": (o, i), f"{name}.bias": (o,)}  # noqa: E731
    shapes = {}
    for name in ("patch_embedding", "patch_embedding_global"):
        shapes |= {f"{name}.weight": (d, 36, 1, 2, 2), f"{name}.bias": (d,)}
    shapes |= linear("text_embedding.0", t, d) | linear("text_embedding.2", d, d)
    shapes |= linear("time_embedding.0", fq, d) | linear("time_embedding.2", d, d)
    shapes |= linear("time_projection.1", d, 6 * d)
    for name in ("head", "head_global"):
        shapes |= {f"{name}.modulation": (1, 2, d)} | linear(f"{name}.head", d, 64)
    for name in ("img_emb", "img_emb_refimage"):
        p = f"{name}.proj"
        shapes |= {f"{p}.0.weight": (c,), f"{p}.0.bias": (c,), f"{p}.4.weight": (d,), f"{p}.4.bias": (d,)}
        shapes |= linear(f"{p}.1", c, c) | linear(f"{p}.3", c, d)
    shapes |= {"ref_conv.weight": (d, 16, 2, 2), "ref_conv.bias": (d,)}
    for i in range(40):
        b = f"blocks.{i}"
        shapes[f"{b}.modulation"] = (1, 6, d)
        for name in ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                     "cross_attn.v", "cross_attn.o", "cross_attn.k_img", "cross_attn.v_img"):  # fmt: skip
            shapes |= linear(f"{b}.{name}", d, d)
        for name in ("self_attn.norm_q", "self_attn.norm_k", "cross_attn.norm_q", "cross_attn.norm_k",
                     "cross_attn.norm_k_img", "norm3"):  # fmt: skip
            shapes[f"{b}.{name}.weight"] = (d,)
        shapes[f"{b}.norm3.bias"] = (d,)
        shapes |= linear(f"{b}.ffn.0", d, f) | linear(f"{b}.ffn.2", f, d)
    shapes |= linear("music_projection", 35, 256)
    for i in range(2):
        m = f"music_encoder.{i}"
        shapes |= {f"{m}.self_attn.in_proj_weight": (768, 256), f"{m}.self_attn.in_proj_bias": (768,)}
        shapes |= linear(f"{m}.self_attn.out_proj", 256, 256) | linear(f"{m}.linear1", 256, 1024)
        shapes |= linear(f"{m}.linear2", 1024, 256)
        shapes |= {f"{m}.norm{n}.{p}": (256,) for n in (1, 2) for p in ("weight", "bias")}
    for i in range(8):
        m = f"music_injector.injector.{i}"
        shapes |= {f"{m}.norm_q.weight": (d,), f"{m}.norm_k.weight": (d,)}
        for name in "qkvo":
            shapes |= linear(f"{m}.{name}", d, d)
    return shapes


def test_full_size_layout_and_config():
    with torch.device("meta"):
        model = WanDancerDiT()
    state = model.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == expected_14b_shapes()
    assert len(state) == 1424 and sum(v.numel() for v in state.values()) == 17_245_198_464
    # the plain Wan DiT spec matches the shared keys, but the dancer spec owns the whole file and wins
    assert DIT_SPEC.match(state) is not None
    assert [r.spec.name for r in recognise(state.keys(), FAMILY.specs)] == ["wan_dancer_dit"]
    assert config_from_state(state) == DancerConfig()


def save_tiny_dit(folder: Path, seed: int = 0, prefix: str = "", **overrides) -> tuple[Path, WanDancerDiT]:
    """A tiny DiT as the hub repo stores it (`global_model.safetensors`), with a config.json giving what the shapes
    cannot (heads, text length, the injected blocks)."""
    model = tiny_model(seed, **{**SMALL, **overrides})
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "global_model.safetensors"
    save_file({prefix + k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    cfg = model.config
    fields = {"num_heads": cfg.num_heads, "text_len": cfg.text_len, "music_heads": cfg.music_heads}
    fields["wantodance_music_inject_layers"] = list(cfg.music_inject_layers)  # DiffSynth-Studio's name
    (folder / "config.json").write_text(json.dumps(fields))
    return path, model


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_the_file_is_recognised_and_loads_strictly(tmp_path, prefix):
    path, model = save_tiny_dit(tmp_path / "dancer", prefix=prefix)
    loaded = load_model(str(path))
    assert isinstance(loaded, WanDancerDiT) and loaded.config == model.config
    state = model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())
    args = tiny_inputs(image_dim=32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(*args, 7.5), model(*args, 7.5), atol=1e-5, rtol=0)


def test_missing_or_misshapen_keys_are_refused(tmp_path):
    state = {k: v.contiguous() for k, v in tiny_model(**SMALL).state_dict().items()}
    json_fields = {"num_heads": 2, "text_len": 16, "music_heads": 2, "music_inject_layers": [0, 2]}
    (tmp_path / "config.json").write_text(json.dumps(json_fields))
    # an injection's key norm changes no output, yet a file without it is not the model
    missing = {k: v for k, v in state.items() if k != "music_injector.injector.1.norm_k.weight"}
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="music_injector.injector.1.norm_k.weight"):
        load_model(str(tmp_path / "missing.safetensors"), specs=[DANCER_DIT_SPEC])
    wrong = {**state, "music_encoder.1.self_attn.in_proj_bias": torch.zeros(40)}
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(ValueError, match="music_encoder.1.self_attn.in_proj_bias"):
        load_model(str(tmp_path / "wrong.safetensors"), specs=[DANCER_DIT_SPEC])
    with pytest.raises(ConfigError, match="2 music injectors.*music_inject_layers"):  # not the released 8, no json
        config_from_state(state, {"num_heads": 2})
    with pytest.raises(ConfigError, match="music_inject_layers"):
        config_from_state(state, {**json_fields, "music_inject_layers": [0]})
    with pytest.raises(ConfigError, match="num_layers"):  # a config.json that contradicts the shapes
        config_from_state(state, {**json_fields, "num_layers": 4})


# ----------------------------------------------------------------------------------------- the pipeline
HEIGHT, WIDTH = 32, 64  # a 2 x 4 patch grid: 8 tokens a latent frame, one per music slot
FAST = dict(
    height=HEIGHT, width=WIDTH, num_frames=5, num_inference_steps=2, cfg_scale=1.0, progress_bar=False, tiled=False
)
PROMPT = C.CAPTIONS[0]
MASK = [1, 0, 0, 0, 1]


def image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8))


def keyframes(mask=MASK, seed: int = 20) -> list[Image.Image]:
    """Keyframes where the mask is 1, solid black elsewhere (as DiffSynth-Studio's examples make them)."""
    black = Image.new("RGB", (WIDTH, HEIGHT))
    return [image(seed + i) if flag else black for i, flag in enumerate(mask)]


def music(frames: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randn(frames, 35, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def dancer_repo(tmp_path_factory) -> Path:
    """A tiny Wan-Dancer-style repo: the I2V repo's umT5, CLIP, VAE and tokenizer, and a 10-block dancer DiT of their
    widths in `dancer/` (10 blocks: the negative branch leaves out block 9)."""
    root = C.build_tiny_repo(tmp_path_factory.mktemp("tiny-wan-dancer"), "i2v")
    save_tiny_dit(root / "dancer", seed=5, image_dim=C.TINY_CLIP["hidden_size"], text_dim=C.TINY_UMT5["d_model"],
                  text_len=512, num_layers=10, music_inject_layers=(0, 9))  # fmt: skip
    return root


def load_pipe(root: Path, dit: str = "dancer/global_model.safetensors", **kwargs) -> WanVideoPipeline:
    """As DiffSynth-Studio's examples: one ModelConfig per file."""
    files = [dit, C.T5_FILE, "Wan2.1_VAE.pth", C.CLIP_FILE]
    return WanVideoPipeline.from_pretrained(
        model_configs=[ModelConfig(path=str(root / f)) for f in files],
        tokenizer_config=ModelConfig(path=str(root / C.TOKENIZER_DIR)), torch_dtype="float32", device="cpu",
        **kwargs,
    )  # fmt: skip


@pytest.fixture(scope="module")
def pipe(dancer_repo):
    return load_pipe(dancer_repo)


def call(pipe, **kwargs):
    given = dict(wantodance_music_feature=music(), wantodance_reference_image=image(90), wantodance_fps=30.0,
                 wantodance_keyframes=keyframes(), wantodance_keyframes_mask=MASK, seed=1, output_type="pt")  # fmt: skip
    return pipe(PROMPT, **{**FAST, **given, **kwargs})


class DitCalls:
    """Records the DiT's calls (their positional inputs) through a forward pre-hook."""

    def __init__(self, dit):
        self.calls = []
        self.handle = dit.register_forward_pre_hook(lambda module, args: self.calls.append(args))

    def __enter__(self):
        return self.calls

    def __exit__(self, *exc):
        self.handle.remove()


def test_local_and_global_calls(pipe):
    """The local call makes num_frames frames and follows the music; the global call (7.5 fps, frame-wise decoding)
    one image per latent frame, each the VAE's decode of that latent frame alone."""
    out = call(pipe)
    assert out.shape == (1, 3, 5, HEIGHT, WIDTH) and torch.isfinite(out).all()
    assert (call(pipe, wantodance_music_feature=music(seed=3)) - out).abs().max() > 1e-4
    with DitCalls(pipe.dit) as calls:
        keys = call(pipe, wantodance_fps=7.5, framewise_decoding=True, wantodance_keyframes_mask=[1, 0, 0, 0, 0])
    assert keys.shape == (1, 3, 2, HEIGHT, WIDTH) and all(c[7] == 7.5 for c in calls)
    latents = torch.randn(1, 16, 2, 4, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        frames = decode_latents(pipe.vae, latents, True)
        for i in range(2):
            torch.testing.assert_close(frames[:, :, i : i + 1], pipe.vae.decode(latents[:, :, i : i + 1]))


def test_conditions_are_those_diffsynth_studio_composes(pipe):
    """y: the I2V mask of the keyframes (the first frame standing for a whole latent frame) and the keyframe video's
    latent; the first keyframe's and the reference image's CLIP features; the music as given; guidance runs the
    negative prompt without block 9 on the same conditions."""
    from diffsynth.wan.image_encoder import encode_image

    given = music(seed=7)
    with DitCalls(pipe.dit) as calls:
        call(pipe, cfg_scale=3.0, negative_prompt="bad quality", wantodance_music_feature=given)
    assert len(calls) == 4  # 2 steps x (positive, negative)
    assert [c[8] for c in calls] == [(), [NEGATIVE_SKIP_BLOCK]] * 2
    x, t, context, clip, y, features, ref, fps, _ = calls[0]
    assert not torch.equal(context, calls[1][2]) and all(torch.equal(y, c[4]) for c in calls)
    assert x.shape == (1, 16, 2, 4, 8) and y.shape == (1, 20, 2, 4, 8) and fps == 30.0
    assert y[0, :4, 0].min() == 1 and y[0, :4, 1, 0, 0].tolist() == [0, 0, 0, 1]  # frames 1-3 free, frame 4 given
    torch.testing.assert_close(features, given)
    with torch.no_grad():
        video = torch.stack([pipe._pixels([f], HEIGHT, WIDTH, torch.float32)[0] for f in keyframes()], dim=1)[None]
        torch.testing.assert_close(y[:, 4:], pipe.vae.encode(video).float(), atol=1e-5, rtol=0)
        for image_in, features_in in ((keyframes()[0], clip), (image(90), ref)):
            pixels = pipe._pixels([image_in], HEIGHT, WIDTH, torch.float32)
            torch.testing.assert_close(features_in, encode_image(pipe.image_encoder, pixels), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"wantodance_keyframes_mask": [1, 0, 0, 1]}, "wantodance_keyframes_mask has 4 values; num_frames=5"),
        ({"wantodance_keyframes_mask": [1, 0, 2, 0, 1]}, "only 0 and 1"),
        ({"wantodance_keyframes_mask": None}, "needs wantodance_keyframes_mask"),
        ({"wantodance_keyframes": keyframes()[:4]}, "wantodance_keyframes has 4 frames; num_frames=5 needs 5"),
        ({"wantodance_keyframes": None}, "needs wantodance_keyframes"),
        ({"height": 40}, "height=40: Wan-Dancer takes a height and width that are multiples of 16"),
        ({"width": 32}, "2 x 2 = 4 tokens"),
        ({"wantodance_music_feature": None}, "needs the music"),
        ({"wantodance_music_path": "song.wav"}, "not both"),
        ({"wantodance_music_feature": torch.zeros(5, 34)}, "wantodance_music_feature has shape \\(5, 34\\)"),
        ({"wantodance_fps": 0}, "wantodance_fps=0"),
        ({"input_image": image(1)}, "Wan-Dancer takes no input_image"),
        ({"animate2_reference_video": keyframes()}, "takes no animate2_reference_video"),
        ({"cfg_merge": True, "cfg_scale": 2.0}, "cfg_merge"),
        ({"latents": torch.zeros(1, 16, 3, 4, 8)}, "latents must be a tensor of shape \\(1, 16, 2, 4, 8\\)"),
    ],
)
def test_bad_arguments_name_the_argument(pipe, change, message):
    with pytest.raises(ConfigError, match=message):
        call(pipe, **change)


def test_a_music_file_without_librosa_names_the_install(pipe, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "librosa", None)  # `import librosa` fails as when it is not installed
    (tmp_path / "song.wav").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"pip install librosa .*diffsynth-wan\[dance\].*wantodance_music_feature"):
        call(pipe, wantodance_music_feature=None, wantodance_music_path=str(tmp_path / "song.wav"))


def test_another_dit_refuses_the_dancer_arguments_and_decodes_frame_by_frame(dancer_repo):
    """The tiny repo's Wan 2.1 I2V DiT: dancer arguments are refused by name; `framewise_decoding` works there too."""
    other = load_pipe(dancer_repo, dit="diffusion_pytorch_model.safetensors")
    with pytest.raises(ConfigError, match="wantodance_fps, wantodance_keyframes need a Wan-Dancer model"):
        other(PROMPT, **FAST, wantodance_fps=7.5, wantodance_keyframes=keyframes())
    out = other(PROMPT, **FAST, input_image=image(3), framewise_decoding=True, output_type="pt", seed=0)
    assert out.shape == (1, 3, 2, HEIGHT, WIDTH)


def test_a_folder_loads_one_dancer_dit_and_asks_which_when_it_holds_both(dancer_repo, tmp_path):
    """A local copy of the repo: its DiT files are two models, not two shards of one; with both, the pipeline
    asks for one (the released folder holds global_model and local_model side by side)."""
    folder = tmp_path / "Wan-Dancer-14B"
    for name in (C.T5_FILE, "Wan2.1_VAE.pth", C.CLIP_FILE, C.TOKENIZER_DIR, "dancer/config.json"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).symlink_to(dancer_repo / name)
    (folder / "dancer" / "global_model.safetensors").symlink_to(dancer_repo / "dancer" / "global_model.safetensors")
    pipe = WanVideoPipeline.from_pretrained(str(folder), torch_dtype="float32", device="cpu")
    assert isinstance(pipe.dit, WanDancerDiT) and pipe.dit2 is None
    (folder / "dancer" / "local_model.safetensors").symlink_to(dancer_repo / "dancer" / "global_model.safetensors")
    with pytest.raises(ConfigError, match=r"two DiTs were given \(WanDancerDiT, WanDancerDiT\).*Wan-Dancer-14B:global"):
        WanVideoPipeline.from_pretrained(str(folder), torch_dtype="float32", device="cpu")


def test_presets_have_diffsynth_studios_settings():
    glob, local = PRESETS["Wan-AI/Wan-Dancer-14B:global"], PRESETS["Wan-AI/Wan-Dancer-14B:local"]
    for preset, dit, steps, fps, framewise, tiled in (
        (glob, "global_model.safetensors", 48, 7.5, True, False),
        (local, "local_model.safetensors", 24, 30.0, False, True),
    ):
        d = preset.defaults
        assert (d["num_inference_steps"], d["wantodance_fps"], d["fps"]) == (steps, fps, fps)
        assert (d["framewise_decoding"], d["tiled"]) == (framewise, tiled)
        assert (d["num_frames"], d["height"], d["width"], d["cfg_scale"], d["sigma_shift"]) == (149, 1280, 720, 5, 5)
        assert d["negative_prompt"] == NEGATIVE_PROMPT
        assert [(f.model_id, f.origin_file_pattern) for f in preset.files] == [
            ("Wan-AI/Wan-Dancer-14B", dit),
            ("Wan-AI/Wan-Dancer-14B", "models_t5_umt5-xxl-enc-bf16.pth"),
            ("Wan-AI/Wan-Dancer-14B", "Wan2.1_VAE.pth"),
            ("Wan-AI/Wan-Dancer-14B", "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"),
        ]
        assert (preset.tokenizer.model_id, preset.tokenizer.origin_file_pattern) == (
            "Wan-AI/Wan2.1-T2V-1.3B", "google/umt5-xxl/",
        )  # fmt: skip
        assert preset.name in FAMILY.presets


def test_the_preset_defaults_reach_the_call(pipe, monkeypatch):
    """The global preset's frame rate and guidance reach the DiT and its frame-wise decoding gives one image per
    latent frame."""
    monkeypatch.setattr(pipe, "defaults", dict(PRESETS["Wan-AI/Wan-Dancer-14B:global"].defaults))
    with DitCalls(pipe.dit) as calls:
        out = call(pipe, wantodance_fps=None, num_inference_steps=1, cfg_scale=None)
    assert out.shape[2] == 2 and [c[7] for c in calls] == [7.5, 7.5]  # guidance 5: both branches


def test_unipc_sampler_steps_every_step(pipe):
    """`sampler="unipc"`: every step is UniPC's, in order (the sampler: runtime's test_unipc.py)."""
    from diffsynth.runtime.testing.samplers import check_unipc_sampling

    check_unipc_sampling(lambda sampler: call(pipe, sampler=sampler, num_inference_steps=3))


def test_cli_inputs_become_the_dancer_arguments(pipe, tmp_path):
    """`diffsynth generate` on Wan-Dancer (`cli_options`): `--input-image` is the dancer, `--input-audio` the music;
    the global model (7.5 fps) starts its keyframes from the dancer, the rest black; the local model (30 fps) puts
    the `--control-video` keyframes every 16th frame, black between."""
    from diffsynth.runtime.media import save_video

    dancer = tmp_path / "dancer.png"
    image(7).save(dancer)
    size = dict(height=HEIGHT, width=WIDTH)
    saved = dict(pipe.defaults)
    try:
        pipe.defaults.update(wantodance_fps=7.5)
        given = pipe.cli_options({"input_image": str(dancer), "retake_audio": "music.wav", "num_frames": 5, **size})
        assert given["wantodance_music_path"] == "music.wav" and "input_image" not in given
        assert given["wantodance_keyframes_mask"] == [1, 0, 0, 0, 0]
        keys = [np.asarray(k) for k in given["wantodance_keyframes"]]
        assert np.array_equal(keys[0], np.asarray(image(7))) and not any(k.any() for k in keys[1:])
        pipe.defaults.update(wantodance_fps=30.0)
        colours = [Image.new("RGB", (WIDTH, HEIGHT), c) for c in ((200, 40, 40), (40, 40, 200))]
        save_video(colours, tmp_path / "keys.mp4", fps=7.5)
        local = pipe.cli_options({"control_video": str(tmp_path / "keys.mp4"), "num_frames": 21, **size})
        assert local["wantodance_keyframes_mask"] == [1 if i in (0, 16) else 0 for i in range(21)]
        means = [np.asarray(k).reshape(-1, 3).mean(0) for k in local["wantodance_keyframes"]]
        assert means[0][0] > 150 > means[0][2] and means[16][2] > 150 > means[16][0]  # red, then blue (mp4-coded)
        assert not any(m.any() for i, m in enumerate(means) if i not in (0, 16))
    finally:
        pipe.defaults.clear()
        pipe.defaults.update(saved)
