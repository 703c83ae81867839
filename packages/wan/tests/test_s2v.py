"""Wan2.2-S2V: the speech-to-video DiT, the wav2vec2 audio features, loading, and the pipeline's S2V arguments.

The DiT is compared with the authors' `WanModel_S2V` (Wan-Video/Wan2.2 `wan/modules/s2v/`, read from the local git
mirror with its flash-attention call replaced by SDPA; skipped where the mirror is absent); the rest is checked
through invariants of the authors' design and hand-computable cases.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.loading import load_model
from diffsynth.runtime.testing import conformance as cf
from diffsynth.wan import audio_encoder as AE
from diffsynth.wan.formats import S2V_DIT_SPEC
from diffsynth.wan.s2v import FramePackMotioner, WanS2VConfig, WanS2VDiT, config_from_state


def _beside(name: str):
    spec = importlib.util.spec_from_file_location(f"wan_s2v_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


C = _beside("conftest")
P = _beside("test_pipeline")

# the only place the tiny S2V sizes live: 25 audio layers as the authors' CausalAudioEncoder hard-codes them
TINY_S2V = dict(dim=48, ffn_dim=64, num_heads=4, num_layers=3, text_dim=24, freq_dim=16, audio_dim=12,
                num_audio_token=2, audio_inject_layers=(0, 2), text_len=8)  # fmt: skip
TINY_WAV2VEC = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, vocab_size=33,
                    conv_dim=(8,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)  # fmt: skip


def tiny_model(seed: int = 0, **overrides) -> WanS2VDiT:
    return C.randomize(WanS2VDiT(WanS2VConfig(**{**TINY_S2V, **overrides})), seed).eval()


def inputs(frames: int = 3, hw=(16, 16), seed: int = 1, batch: int = 1) -> dict:
    """Keyword inputs of one clip of `frames` latent frames (19 motion latent frames before it)."""
    cfg = WanS2VConfig(**TINY_S2V)
    g = torch.Generator().manual_seed(seed)
    return dict(
        x=torch.randn(batch, 16, frames, *hw, generator=g),
        timestep=torch.full((batch,), 700.0),
        context=torch.randn(batch, 5, cfg.text_dim, generator=g),
        ref_latents=torch.randn(batch, 16, 1, *hw, generator=g),
        audio_embeds=torch.randn(batch, cfg.audio_layers, cfg.audio_dim, 4 * frames, generator=g),
        motion_latents=torch.randn(batch, 16, 19, *hw, generator=g),
        pose_latents=torch.randn(batch, 16, frames, *hw, generator=g),
    )


# ----------------------------------------------------------------------------------------- the authors' model
MIRROR = Path("/work/.mirror/Wan-Video+Wan2.2/repo")
AUTHORS_FILES = ["wan/modules/model.py"] + [
    f"wan/modules/s2v/{n}.py" for n in ("model_s2v", "audio_utils", "auxi_blocks", "motioner", "s2v_utils")
]
SDPA_STUB = """import torch
def flash_attention(q, k, v, q_lens=None, k_lens=None, dropout_p=0.0, softmax_scale=None, q_scale=None,
                    causal=False, window_size=(-1, -1), deterministic=False, dtype=None, version=None):
    out = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2).float() for t in (q, k, v)))
    return out.transpose(1, 2).to(q.dtype)
attention = flash_attention
"""
PARALLEL_STUB = """def distributed_attention(*args, **kwargs): raise NotImplementedError
def gather_forward(x, dim): return x
def get_rank(): return 0
def get_world_size(): return 1
"""


@pytest.fixture(scope="module")
def authors(tmp_path_factory):
    """The authors' S2V modules as a package `wan_s2v_ref` (attention through SDPA, no sequence parallelism)."""
    pytest.importorskip("diffusers")
    pytest.importorskip("einops")
    if not (MIRROR / "HEAD").exists() and not (MIRROR / ".git").exists():
        pytest.skip("the Wan2.2 git mirror is not on this machine")
    root = tmp_path_factory.mktemp("wan-s2v-ref")
    pkg = root / "wan_s2v_ref"
    for sub in ("", "modules", "modules/s2v", "distributed"):
        (pkg / sub).mkdir(parents=True, exist_ok=True)
        (pkg / sub / "__init__.py").write_text("")
    for name in AUTHORS_FILES:
        show = subprocess.run(["git", "-C", str(MIRROR), "show", f"HEAD:{name}"], capture_output=True, text=True)
        if show.returncode:
            pytest.skip(f"{name} is not in the Wan2.2 mirror")
        (pkg / name.removeprefix("wan/")).write_text(show.stdout)
    (pkg / "modules/attention.py").write_text(SDPA_STUB)
    (pkg / "distributed/sequence_parallel.py").write_text(PARALLEL_STUB)
    sys.path.insert(0, str(root))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = importlib.import_module("wan_s2v_ref.modules.s2v.model_s2v")
        yield module
    finally:
        sys.path.remove(str(root))
        for name in [m for m in sys.modules if m.startswith("wan_s2v_ref")]:
            del sys.modules[name]


def authors_model(module, ours: WanS2VDiT):
    """`WanModel_S2V` with our weights (loaded strictly: the key names and shapes must agree)."""
    cfg = ours.config
    ref = module.WanModel_S2V(
        cond_dim=cfg.cond_dim, audio_dim=cfg.audio_dim, num_audio_token=cfg.num_audio_token, enable_adain=True,
        adain_mode="attn_norm", audio_inject_layers=list(cfg.audio_inject_layers), zero_init=False,
        zero_timestep=True, enable_motioner=False, add_last_motion=True, enable_framepack=True,
        framepack_drop_mode="padd", text_len=cfg.text_len, in_dim=cfg.in_dim, dim=cfg.dim, ffn_dim=cfg.ffn_dim,
        freq_dim=cfg.freq_dim, text_dim=cfg.text_dim, out_dim=cfg.out_dim, num_heads=cfg.num_heads,
        num_layers=cfg.num_layers, cross_attn_norm=True,
    )  # fmt: skip
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ref.eval()


@pytest.mark.parity
@pytest.mark.parametrize("drop_motion", [True, False])
@pytest.mark.parametrize("with_pose", [True, False])
def test_dit_matches_the_authors_model(authors, drop_motion, with_pose):
    """Float32 on CPU: our RoPE / timestep tables are float32 where the authors' are float64 (hence 1e-4)."""
    ours = tiny_model()
    ref = authors_model(authors, ours)
    kw = inputs()
    pose = kw["pose_latents"] if with_pose else None
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the authors' torch.cuda.amp.autocast is deprecated
        got = ours(**{**kw, "pose_latents": pose}, drop_motion_frames=drop_motion)
        want = ref(
            [kw["x"][0]], kw["timestep"], [kw["context"][0]], 0, [kw["ref_latents"][0]], [kw["motion_latents"][0]],
            [(pose if pose is not None else torch.zeros_like(kw["x"]))[0]], kw["audio_embeds"],
            motion_frames=[73, 19], drop_motion_frames=drop_motion,
        )[0]  # fmt: skip
    torch.testing.assert_close(got[0], want, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------- invariants
def test_silenced_injection_makes_the_audio_irrelevant_and_otherwise_it_matters():
    """The audio enters only through the injectors' residual adds: with their output projections zeroed the audio
    cannot change the output; with them it does."""
    model = tiny_model()
    kw = inputs()
    louder = {**kw, "audio_embeds": kw["audio_embeds"] * 3 + 1}
    with torch.no_grad():
        assert not torch.allclose(model(**kw), model(**louder))
        for attn in model.audio_injector.injector:
            attn.o.weight.zero_()
            attn.o.bias.zero_()
        torch.testing.assert_close(model(**kw), model(**louder), atol=0, rtol=0)


def test_audio_tokens_are_causal_and_one_per_latent_frame():
    """Changing the features of the last 4 video frames changes only the last latent frame's audio tokens."""
    model = tiny_model()
    kw = inputs(frames=4)
    changed = kw["audio_embeds"].clone()
    changed[..., -4:] += 1.0
    with torch.no_grad():
        (g1, l1), (g2, l2) = (model.audio_tokens(a, 4, torch.float32) for a in (kw["audio_embeds"], changed))
    assert l1.shape == (1, 4, TINY_S2V["num_audio_token"] + 1, TINY_S2V["dim"]) and g1.shape == (1, 4, 1, 48)
    torch.testing.assert_close(l1[:, :3], l2[:, :3], atol=0, rtol=0)
    torch.testing.assert_close(g1[:, :3], g2[:, :3], atol=0, rtol=0)
    assert not torch.allclose(l1[:, 3], l2[:, 3])


def test_motion_frames_matter_unless_dropped_and_no_pose_is_a_zero_pose():
    model = tiny_model()
    kw = inputs()
    other = {**kw, "motion_latents": kw["motion_latents"] + 1}
    with torch.no_grad():
        assert not torch.allclose(model(**kw), model(**other))
        dropped = model(**kw, drop_motion_frames=True)
        torch.testing.assert_close(dropped, model(**other, drop_motion_frames=True), atol=0, rtol=0)
        torch.testing.assert_close(dropped, model(**{**kw, "motion_latents": None}), atol=0, rtol=0)
        no_pose = model(**{**kw, "pose_latents": None})
        zero_pose = model(**{**kw, "pose_latents": torch.zeros_like(kw["pose_latents"])})
    torch.testing.assert_close(no_pose, zero_pose, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("mode", "add_last", "kept"), [("padd", 2, 3), ("padd", 0, 3), ("drop", 1, 2), ("drop", 0, 1)])
def test_framepack_token_counts_and_positions(mode, add_last, kept):
    """19 latent frames at 8 x 16: the newest frame as (8/2)(16/2) = 32 tokens at frame -1, the next two as one
    frame of (8/4)(16/4) = 8 tokens at -3, the oldest 16 as 4 frames of (8/8)(16/8) = 2 tokens at -19, -14, -9, -4
    (4x-compressed positions spread over the 16 frames); "drop" removes the newest groups, "padd" zeroes them."""
    packer = FramePackMotioner(16, 8, (1, 2, 16), mode)
    tokens, positions = packer(torch.randn(2, 16, 19, 8, 16), add_last)
    groups = [(32, [-1]), (8, [-3]), (8, [-19, -14, -9, -4])][3 - kept :]
    assert tokens.shape == (2, sum(n for n, _ in groups), 8)
    frames = []
    for n, f in groups:
        frames += [v for v in f for _ in range(n // len(f))]
    assert positions[:, 0].tolist() == frames
    # the 2x group's 2 x 4 tokens sample rows 0..3 and columns 0..7 of the full 4 x 8 grid at every other place
    if kept >= 2:
        start = 32 if kept == 3 else 0
        assert positions[start : start + 8, 1].tolist() == [0, 0, 0, 0, 3, 3, 3, 3]
        assert positions[start : start + 4, 2].tolist() == [0, 2, 4, 7]


def test_conformance():
    kw = inputs()
    args = [kw.pop(k) for k in ("x", "timestep", "context", "ref_latents", "audio_embeds")]
    factory = lambda: tiny_model()  # noqa: E731
    cf.check_forward(factory, args, kw, expected_shapes=[args[0].shape])
    cf.check_backward(factory, args, kw)
    cf.check_gradient_checkpointing(factory, args, kw, atol=1e-5)
    cf.check_meta_load(factory, args, kw)
    cf.check_declared_units(factory)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"audio_embeds": torch.zeros(1, 25, 12, 11)}, "audio_embeds"),
        ({"ref_latents": torch.zeros(1, 16, 2, 16, 16)}, "ref_latents"),
        ({"pose_latents": torch.zeros(1, 16, 2, 16, 16)}, "pose_latents"),
        ({"motion_latents": torch.zeros(1, 16, 19, 8, 16)}, "motion_latents"),
        ({"context": torch.zeros(1, 9, 24)}, "context"),
        ({"x": torch.zeros(1, 4, 3, 16, 16)}, "x has shape"),
    ],
)
def test_bad_dit_inputs_name_the_argument(change, message):
    with pytest.raises(ConfigError, match=message):
        tiny_model()(**{**inputs(), **change})


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"audio_inject_layers": (0, 3)}, "audio_inject_layers"),
        ({"audio_inject_layers": (2, 0)}, "audio_inject_layers"),
        ({"framepack_buckets": (1, 3, 16)}, "framepack_buckets"),
        ({"framepack_drop_mode": "crop"}, "framepack_drop_mode"),
        ({"num_heads": 5}, "num_heads"),
        ({"audio_layers": 0}, "audio_layers"),
    ],
)
def test_config_refuses_bad_fields(overrides, field):
    with pytest.raises(ValueError, match=field):
        WanS2VConfig(**{**TINY_S2V, **overrides})


# ----------------------------------------------------------------------------------------- full-size layout
def expected_14b_shapes() -> dict[str, tuple[int, ...]]:
    """Every parameter of the authors' `WanModel_S2V` built with `wan/configs/wan_s2v_14B.py`, by module:

    - the Wan 2.1 T2V-14B parts it shares (`patch_embedding`, `text_embedding`, `time_embedding`, `time_projection`,
      40 `WanS2VAttentionBlock`s = Wan attention blocks with `cross_attn_norm`, `Head_S2V` = Wan's head);
    - `cond_encoder`: Conv3d(cond_dim 16 -> 5120, patch 1x2x2);
    - `casual_audio_encoder`: `weights` [1, 25, 1, 1] and `MotionEncoder_tc(in_dim=1024, hidden_dim=5120,
      num_heads=4, need_global=True)`: conv1_local 1024 -> 1280 * 4, conv1_global 1024 -> 1280, conv2 1280 -> 2560,
      conv3 2560 -> 5120 (kernel 3), final_linear 5120 -> 5120, padding_tokens [1, 1, 1, 5120]; its LayerNorms have
      no weights;
    - `audio_injector`: 12 `AudioCrossAttention`s (one per injection layer, Wan cross-attention with q/k norms) and
      12 `AdaLayerNorm(output_dim=10240, embedding_dim=5120)` (`linear` only); the pre-norms have no weights and
      `adain_mode="attn_norm"` builds no output layers;
    - `trainable_cond_mask`: Embedding(3, 5120);
    - `frame_packer` (`enable_framepack=True`): Conv3d 16 -> 5120 with kernels 1x2x2, 2x4x4, 4x8x8;
    - no `motioner` / `zip_motion_out` (`enable_motioner=False`) and no `token_freqs`.
    """
    d, f, a = 5120, 13824, 1024
    out = {
        "patch_embedding.weight": (d, 16, 1, 2, 2), "patch_embedding.bias": (d,),
        "text_embedding.0.weight": (d, 4096), "text_embedding.0.bias": (d,),
        "text_embedding.2.weight": (d, d), "text_embedding.2.bias": (d,),
        "time_embedding.0.weight": (d, 256), "time_embedding.0.bias": (d,),
        "time_embedding.2.weight": (d, d), "time_embedding.2.bias": (d,),
        "time_projection.1.weight": (6 * d, d), "time_projection.1.bias": (6 * d,),
        "head.head.weight": (64, d), "head.head.bias": (64,), "head.modulation": (1, 2, d),
        "cond_encoder.weight": (d, 16, 1, 2, 2), "cond_encoder.bias": (d,),
        "casual_audio_encoder.weights": (1, 25, 1, 1),
        "casual_audio_encoder.encoder.conv1_local.conv.weight": (4 * d // 4, a, 3),
        "casual_audio_encoder.encoder.conv1_local.conv.bias": (d,),
        "casual_audio_encoder.encoder.conv1_global.conv.weight": (d // 4, a, 3),
        "casual_audio_encoder.encoder.conv1_global.conv.bias": (d // 4,),
        "casual_audio_encoder.encoder.conv2.conv.weight": (d // 2, d // 4, 3),
        "casual_audio_encoder.encoder.conv2.conv.bias": (d // 2,),
        "casual_audio_encoder.encoder.conv3.conv.weight": (d, d // 2, 3),
        "casual_audio_encoder.encoder.conv3.conv.bias": (d,),
        "casual_audio_encoder.encoder.final_linear.weight": (d, d),
        "casual_audio_encoder.encoder.final_linear.bias": (d,),
        "casual_audio_encoder.encoder.padding_tokens": (1, 1, 1, d),
        "trainable_cond_mask.weight": (3, d),
    }  # fmt: skip
    attention = {f"{n}.{p}": (d, d) if p == "weight" else (d,) for n in "qkvo" for p in ("weight", "bias")}
    attention.update({"norm_q.weight": (d,), "norm_k.weight": (d,)})
    for i in range(40):
        b = f"blocks.{i}."
        out.update({b + "self_attn." + k: v for k, v in attention.items()})
        out.update({b + "cross_attn." + k: v for k, v in attention.items()})
        out.update({b + "norm3.weight": (d,), b + "norm3.bias": (d,), b + "modulation": (1, 6, d)})
        out.update(
            {b + "ffn.0.weight": (f, d), b + "ffn.0.bias": (f,), b + "ffn.2.weight": (d, f), b + "ffn.2.bias": (d,)}
        )
    for k in range(12):
        out.update({f"audio_injector.injector.{k}.{n}": v for n, v in attention.items()})
        out[f"audio_injector.injector_adain_layers.{k}.linear.weight"] = (2 * d, d)
        out[f"audio_injector.injector_adain_layers.{k}.linear.bias"] = (2 * d,)
    for name, kernel in (("proj", (1, 2, 2)), ("proj_2x", (2, 4, 4)), ("proj_4x", (4, 8, 8))):
        out[f"frame_packer.{name}.weight"] = (d, 16, *kernel)
        out[f"frame_packer.{name}.bias"] = (d,)
    return out


def test_full_size_layout_is_the_authors():
    with torch.device("meta"):
        model = WanS2VDiT()
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    want = expected_14b_shapes()
    assert sorted(set(got) ^ set(want)) == []
    assert {k for k in got if got[k] != want[k]} == set()
    # and the config derived from those shapes is the 14B one
    assert config_from_state({k: torch.empty(v, device="meta") for k, v in want.items()}) == WanS2VConfig()


# ----------------------------------------------------------------------------------------- files
def test_the_authors_file_loads_strictly_and_the_spec_wins_over_the_plain_dit(tmp_path):
    from safetensors.torch import save_file

    model = tiny_model(seed=3)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    names = sorted(state)
    half = len(names) // 2  # two shards, as the hub repo holds several
    save_file({k: state[k] for k in names[:half]}, str(tmp_path / "diffusion_pytorch_model-00001-of-00002.safetensors"))
    save_file({k: state[k] for k in names[half:]}, str(tmp_path / "diffusion_pytorch_model-00002-of-00002.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "WanModel_S2V", "num_heads": 4,
                                                      "audio_inject_layers": [0, 2], "text_len": 8}))  # fmt: skip
    files = sorted(str(p) for p in tmp_path.glob("*.safetensors"))
    loaded = load_model(files)
    assert isinstance(loaded, WanS2VDiT) and loaded.config == model.config
    kw = inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**kw), model(**kw), atol=0, rtol=0)


def test_missing_or_misshapen_keys_are_refused(tmp_path):
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in tiny_model().state_dict().items()}
    save_file(state, str(tmp_path / "injectors.safetensors"))
    with pytest.raises(ConfigError, match="2 audio injectors, not the 14B model's 12"):  # and no config.json
        load_model(str(tmp_path / "injectors.safetensors"), specs=[S2V_DIT_SPEC])
    (tmp_path / "config.json").write_text(json.dumps({"num_heads": 4, "audio_inject_layers": [0, 2]}))
    wrong = dict(state)
    wrong["trainable_cond_mask.weight"] = torch.zeros(4, 48)
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(ValueError, match="trainable_cond_mask"):
        load_model(str(tmp_path / "wrong.safetensors"), specs=[S2V_DIT_SPEC])
    missing = {k: v for k, v in state.items() if k != "frame_packer.proj_2x.bias"}
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="frame_packer.proj_2x.bias"):
        load_model(str(tmp_path / "missing.safetensors"), specs=[S2V_DIT_SPEC])


# ----------------------------------------------------------------------------------------- audio features
def tiny_wav2vec(seed: int = 7):
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    torch.manual_seed(seed)
    return Wav2Vec2ForCTC(Wav2Vec2Config(**{**AE.XLSR_53, **TINY_WAV2VEC})).eval()


def save_wav2vec_folder(folder: Path, seed: int = 7):
    """A wav2vec2 folder as the S2V repo holds it: config.json and model.safetensors with the older weight-norm
    names (`weight_g` / `weight_v`) of the released file."""
    from safetensors.torch import save_file

    model = tiny_wav2vec(seed)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    renamed = {}
    for k, v in state.items():
        k = k.replace("parametrizations.weight.original0", "weight_g").replace(
            "parametrizations.weight.original1", "weight_v"
        )
        renamed[k] = v
    folder.mkdir(parents=True, exist_ok=True)
    save_file(renamed, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(model.config.to_dict()))
    (folder / "preprocessor_config.json").write_text(json.dumps({"do_normalize": True, "sampling_rate": 16000}))
    return model


def test_wav2vec_folder_loads_strictly_and_gives_transformers_hidden_states(tmp_path):
    from transformers import Wav2Vec2FeatureExtractor

    ref = save_wav2vec_folder(tmp_path / "wav2vec2-large-xlsr-53-english")
    ours = load_model(str(tmp_path / "wav2vec2-large-xlsr-53-english" / "model.safetensors"))
    assert isinstance(ours, AE.Wav2VecAudioEncoder)
    wave = torch.from_numpy(np.random.default_rng(0).standard_normal(8000).astype(np.float32)) * 0.3 + 0.1
    values = Wav2Vec2FeatureExtractor(do_normalize=True)(wave.numpy(), sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        want = torch.cat(ref(values.input_values, output_hidden_states=True).hidden_states)
        got = ours(wave[None])[0]
    assert got.shape == (3, 24, 16)  # embeddings + 2 layers, 8000 / 320 - 1 frames
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_feature_resampling_is_linear_with_aligned_corners():
    ramp = torch.arange(50, dtype=torch.float32)[None, :, None].expand(2, 50, 3)  # one second at 50 per second
    out = AE.resample_features(ramp)
    assert out.shape == (2, 30, 3)
    torch.testing.assert_close(out[0, :, 0], torch.arange(30) * (49 / 29), atol=1e-5, rtol=0)


def test_bucketing_picks_one_feature_per_video_frame():
    """40 features at 30 per second, 16 fps, clips of 8 frames: int(40 / (8 * 30 / 16)) + 1 = 3 clips; frame i takes
    feature round(i * 1.875) (ties to even: 7.5 -> 8, 22.5 -> 22), frames past the 40th feature get zeros."""
    features = (torch.arange(40, dtype=torch.float32) + 1)[None, :, None].expand(2, 40, 3).contiguous()
    clips = AE.bucket_features(features, fps=16, batch_frames=8)
    assert len(clips) == 3 and all(c.shape == (1, 2, 3, 8) for c in clips)
    by_hand = [0, 2, 4, 6, 8, 9, 11, 13, 15, 17, 19, 21, 22, 24, 26, 28, 30, 32, 34, 36, 38, 39, None, None]
    values = torch.cat(clips, dim=-1)[0, 0, 0].tolist()
    assert values == [0.0 if i is None else i + 1.0 for i in by_hand]


@pytest.mark.parametrize("num", [1, 40, 151, 333])
def test_bucketing_equals_the_authors(num):
    """The authors' `get_audio_embed_bucket_fps` (read from the Wan2.2 mirror, librosa stubbed)."""
    module = _authors_audio_encoder()
    features = torch.randn(3, num, 4, generator=torch.Generator().manual_seed(num))
    helper = object.__new__(module.AudioEncoder)
    helper.video_rate = 30
    want, count = helper.get_audio_embed_bucket_fps(features, fps=16, batch_frames=80, m=0)
    want = want.unsqueeze(0).permute(0, 2, 3, 1)
    got = AE.bucket_features(features, fps=16, batch_frames=80)
    assert len(got) == count
    torch.testing.assert_close(torch.cat(got, dim=-1), want, atol=0, rtol=0)


def _authors_audio_encoder():
    if not (MIRROR / "HEAD").exists() and not (MIRROR / ".git").exists():
        pytest.skip("the Wan2.2 git mirror is not on this machine")
    show = subprocess.run(
        ["git", "-C", str(MIRROR), "show", "HEAD:wan/modules/s2v/audio_encoder.py"], capture_output=True, text=True
    )
    if show.returncode:
        pytest.skip("audio_encoder.py is not in the Wan2.2 mirror")
    namespace = {"__name__": "wan_s2v_ref_audio"}
    saved = sys.modules.get("librosa")
    sys.modules["librosa"] = type(sys)("librosa")  # imported at the top, used only to read files
    try:
        exec(compile(show.stdout, "audio_encoder.py", "exec"), namespace)  # noqa: S102
    finally:
        if saved is None:
            del sys.modules["librosa"]
        else:
            sys.modules["librosa"] = saved
    return type("AuthorsAudio", (), {"AudioEncoder": namespace["AudioEncoder"]})


# ----------------------------------------------------------------------------------------- pipeline
SIZE = 64  # the 4x FramePack convolution needs at least 8 latent rows and columns
FAST = dict(height=SIZE, width=SIZE, num_frames=9, num_inference_steps=2, cfg_scale=1.0, progress_bar=False)


def _save_s2v_dit(root: Path) -> None:
    """An S2V DiT of the tiny repo sizes (umT5 width, the tiny wav2vec's 3 hidden states of 16) in the authors'
    layout, replacing the T2V DiT of the tiny repo."""
    from safetensors.torch import save_file

    fields = dict(dim=32, ffn_dim=64, num_heads=2, num_layers=2, freq_dim=32, text_dim=C.TINY_UMT5["d_model"],
                  audio_dim=TINY_WAV2VEC["hidden_size"], audio_layers=TINY_WAV2VEC["num_hidden_layers"] + 1,
                  audio_inject_layers=(0, 1))  # fmt: skip
    model = C.randomize(WanS2VDiT(WanS2VConfig(**fields)), 1)
    for p in root.glob("diffusion_pytorch_model*.safetensors"):
        p.unlink()
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "diffusion_pytorch_model.safetensors")
    )
    config_json = {
        "_class_name": "WanModel_S2V",
        "num_heads": 2,
        "audio_inject_layers": [0, 1],
        "patch_size": [1, 2, 2],
    }
    (root / "config.json").write_text(json.dumps(config_json))


@pytest.fixture(scope="module")
def s2v_repo(tmp_path_factory):
    """A tiny Wan2.2-S2V-14B-style repo: the T2V repo's umT5, VAE and tokenizer, an S2V DiT and a wav2vec2 folder."""
    root = C.build_tiny_repo(tmp_path_factory.mktemp("tiny-wan-s2v"), "t2v")
    _save_s2v_dit(root)
    save_wav2vec_folder(root / "wav2vec2-large-xlsr-53-english")
    return root


@pytest.fixture(scope="module")
def s2v_pipe(s2v_repo):
    return P.load(s2v_repo)


class PoolVAE(torch.nn.Module):
    """A cheap stand-in for the Wan VAE with its interface and compression (8x in space, causal 4x in time: the
    first frame alone, then groups of 4), for the tests that encode the 73 motion frames: the real tiny VAE takes
    about a minute for them on two CPU cores. Encoding averages, decoding repeats."""

    spatial_compression, temporal_compression, z_dim = 8, 4, 16

    def __init__(self):
        super().__init__()
        self.gain = torch.nn.Parameter(torch.ones(()))

    def encode(self, x: torch.Tensor, **_) -> torch.Tensor:
        groups = [x[:, :, :1], *(g for g in x[:, :, 1:].split(4, dim=2) if g.shape[2])]
        z = torch.cat([g.mean(2, keepdim=True) for g in groups], dim=2)
        z = torch.nn.functional.avg_pool3d(z.float(), (1, 8, 8))
        return z.repeat(1, 6, 1, 1, 1)[:, :16] * self.gain

    def decode(self, z: torch.Tensor, **_) -> torch.Tensor:
        pixels = z[:, :3].repeat_interleave(8, dim=3).repeat_interleave(8, dim=4) * self.gain
        return torch.cat([pixels[:, :, :1], pixels[:, :, 1:].repeat_interleave(4, dim=2)], dim=2)


@pytest.fixture(scope="module")
def pooled_pipe(s2v_repo):
    pipe = P.load(s2v_repo)
    pipe.vae = PoolVAE()
    return pipe


def speech(seconds: float = 1.0, seed: int = 0, rate: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    noise = np.random.default_rng(seed).standard_normal(t.shape)
    return (0.4 * np.sin(2 * np.pi * (180 + 40 * seed) * t) + 0.1 * noise).astype(np.float32)


def call(pipe, **kwargs):
    given = {"input_image": P.image(3, (SIZE, SIZE)), "seed": 1, "output_type": "pt", **FAST, **kwargs}
    return pipe(P.PROMPT, **given)


def test_pipeline_makes_a_clip_of_num_frames(s2v_pipe):
    """From the repo's files (the real tiny VAE): the reference frame and 8 new ones."""
    video = s2v_pipe(P.PROMPT, input_image=P.image(3, (SIZE, SIZE)), input_audio=speech(), seed=1, **FAST)
    assert len(video) == 9 and video[0].size == (SIZE, SIZE)


def test_vram_managed_pipeline_gives_the_same_clip(s2v_repo, s2v_pipe):
    """Every model streamed block by block (the audio encoder and the S2V DiT included), guidance on."""
    kwargs = dict(input_audio=speech(), cfg_scale=2.0, num_inference_steps=1)
    managed = P.WanVideoPipeline.from_pretrained(str(s2v_repo), torch_dtype="float32", device="cpu", vram_limit=0)
    torch.testing.assert_close(call(managed, **kwargs), call(s2v_pipe, **kwargs), atol=1e-6, rtol=0)


def test_same_seed_same_clip_and_the_audio_and_seed_change_it(pooled_pipe):
    first = call(pooled_pipe, input_audio=speech())
    torch.testing.assert_close(call(pooled_pipe, input_audio=speech()), first, atol=0, rtol=0)
    assert not torch.allclose(call(pooled_pipe, input_audio=speech(seed=1)), first)
    assert not torch.allclose(call(pooled_pipe, input_audio=speech(), seed=2), first)


def test_audio_embeds_path_and_resampling_give_the_same_clip(pooled_pipe):
    s2v_pipe = pooled_pipe
    from diffsynth.runtime.media import resample_audio

    wave = speech()
    embeds = AE.audio_clips(s2v_pipe.audio_encoder, AE.prepare_waveform(wave, 16000), 16, 8, "cpu")
    assert len(embeds) == int(29 / (8 * 30 / 16)) + 1  # 1 s -> 49 wav2vec frames -> 29 at 30 per second
    want = call(s2v_pipe, input_audio=wave)
    torch.testing.assert_close(call(s2v_pipe, audio_embeds=embeds[0]), want, atol=0, rtol=0)
    at_8k = resample_audio(torch.from_numpy(wave)[None], 16000, 8000)
    assert call(s2v_pipe, input_audio=at_8k, audio_sample_rate=8000).shape == want.shape


@pytest.mark.parametrize("samples", [320, 640])
def test_audio_shorter_than_two_wav2vec_states_is_padded_with_silence(pooled_pipe, samples):
    """Under 720 samples at 16 kHz (two hidden states of the xlsr-53 convolutions) the waveform gets trailing zeros
    up to 720: the clip of the padded waveform, not a torch error from the convolutions or the resampling."""
    wave = speech(samples / 16000)
    got = call(pooled_pipe, input_audio=wave)
    padded = np.concatenate([wave, np.zeros(720 - samples, np.float32)])
    torch.testing.assert_close(got, call(pooled_pipe, input_audio=padded), atol=0, rtol=0)
    encoder = pooled_pipe.audio_encoder
    assert AE.min_waveform_length(encoder.config) == 720
    with torch.no_grad():
        assert encoder(torch.zeros(1, 720)).shape[2] == 2 and encoder(torch.zeros(1, 719)).shape[2] == 1
    assert AE.resample_features(torch.zeros(3, 1, 4)).shape == (3, 1, 4)


def test_guidance_silences_the_audio_of_the_negative_branch(pooled_pipe):
    s2v_pipe = pooled_pipe
    seen = []
    hook = s2v_pipe.dit.register_forward_pre_hook(lambda m, args: seen.append(args[4].abs().sum().item()))
    try:
        call(s2v_pipe, input_audio=speech(), cfg_scale=3.0, num_inference_steps=1)
    finally:
        hook.remove()
    assert len(seen) == 2 and seen[0] > 0 and seen[1] == 0


def test_motion_video_continues_a_clip_and_pose_video_changes_it(pooled_pipe):
    """The second clip sees the first's frames (as frames or as DiffSynth-Studio's [-1, 1] tensor); the decode
    starts from the motion latents, so the clip is still its context frame + num_frames - 1 new ones."""
    s2v_pipe = pooled_pipe
    first = call(s2v_pipe, input_audio=speech())
    frames = [Image.fromarray((f.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for f in first[0].unbind(1)]
    second = call(s2v_pipe, input_audio=speech(seed=1), motion_video=frames[1:])
    assert second.shape == first.shape and not torch.allclose(second, first)
    other = call(s2v_pipe, input_audio=speech(seed=1), motion_video=frames[:1] * 8)
    assert not torch.allclose(other, second)
    as_tensor = call(s2v_pipe, input_audio=speech(seed=1), motion_video=first[:, :, 1:] * 2 - 1)
    torch.testing.assert_close(as_tensor, second, atol=2e-2, rtol=0)  # the frames went through uint8
    posed = call(s2v_pipe, input_audio=speech(), s2v_pose_video=[P.image(40 + i, (SIZE, SIZE)) for i in range(6)])
    assert posed.shape == first.shape and not torch.allclose(posed, first)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"input_image": None}, "input_image"),
        ({"input_audio": None}, "input_audio"),
        ({"audio_embeds": torch.zeros(1, 3, 16, 8)}, "not both"),
        ({"input_audio": None, "audio_embeds": torch.zeros(1, 3, 16, 7)}, "audio_embeds has shape"),
        ({"s2v_pose_latents": torch.zeros(1, 16, 3, 8, 8)}, "s2v_pose_latents"),
        ({"motion_video": torch.zeros(1, 3, 5, 32, 32)}, "motion_video"),
        ({"motion_video": 3}, "motion_video"),
        ({"end_image": P.image(0)}, "takes no end_image"),
        ({"vace_video": [P.image(0)] * 9}, "takes no vace_video"),
        ({"num_frames": 1}, "at least 5"),
        ({"audio_sample_rate": -1}, "audio_sample_rate"),
        ({"input_audio": np.zeros((0,), np.float32)}, "input_audio"),
    ],
)
def test_bad_s2v_arguments_name_the_argument(pooled_pipe, change, message):
    s2v_pipe = pooled_pipe
    kwargs = {"input_audio": speech(), **change}
    with pytest.raises(ConfigError, match=message):
        call(s2v_pipe, **kwargs)


def test_a_model_without_s2v_modules_refuses_the_arguments(tiny_repo):
    with pytest.raises(ConfigError, match="input_audio, motion_video need a Wan2.2-S2V model"):
        P.load(tiny_repo)(P.PROMPT, seed=1, **P.FAST, input_audio=speech(), motion_video=[P.image(0)])


def test_preset_has_the_authors_defaults():
    from diffsynth.runtime.registry import installed_families

    preset = installed_families()["wan"].presets["Wan-AI/Wan2.2-S2V-14B"]
    d = preset.defaults
    assert (d["num_inference_steps"], d["cfg_scale"], d["sigma_shift"], d["num_frames"], d["fps"]) == (
        40,
        4.5,
        3.0,
        81,
        16,
    )
    assert (d["height"], d["width"]) == (448, 832)
    assert d["negative_prompt"].startswith("画面模糊，最差质量，画面模糊") and d["negative_prompt"].endswith("倒着走")
    assert [f.origin_file_pattern for f in preset.files] == [
        "diffusion_pytorch_model*.safetensors",
        "wav2vec2-large-xlsr-53-english/model.safetensors",
        "models_t5_umt5-xxl-enc-bf16.pth",
        "Wan2.1_VAE.pth",
    ]
    assert math.isclose(WanS2VConfig().motion_latent_frames, 19)


def test_cli_input_audio_drives_an_s2v_model(s2v_repo, tmp_path, monkeypatch):
    """`--input-audio` (LTX-2's audio-to-video flag) reaches a Wan2.2-S2V pipeline as `input_audio`, and
    `--s2v-pose-video` as `s2v_pose_video`."""
    from diffsynth.runtime.media import load_video, save_audio, save_video

    save_audio(torch.from_numpy(speech())[None], tmp_path / "voice.wav", 16000)
    P.image(3, (32, 32)).save(tmp_path / "face.png")
    save_video([P.image(k, (32, 32)) for k in range(5)], tmp_path / "pose.mp4", fps=16)
    flags = ["--input-image", str(tmp_path / "face.png"), "--input-audio", str(tmp_path / "voice.wav")]
    flags += ["--s2v-pose-video", str(tmp_path / "pose.mp4")]
    seen, _, out = P.run_cli(s2v_repo, tmp_path, monkeypatch, *flags)
    assert seen["input_audio"] == str(tmp_path / "voice.wav") and "retake_audio" not in seen
    assert seen["s2v_pose_video"] == str(tmp_path / "pose.mp4")
    assert len(load_video(out)) == 5


def test_unipc_sampler_steps_every_step(pooled_pipe):
    """`sampler="unipc"`: every step is UniPC's, in order (the sampler: runtime's test_unipc.py)."""
    from diffsynth.runtime.testing.samplers import check_unipc_sampling

    check_unipc_sampling(
        lambda sampler: call(pooled_pipe, input_audio=speech(), sampler=sampler, num_inference_steps=3)
    )
