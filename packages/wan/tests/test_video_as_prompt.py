"""Video-As-Prompt (ByteDance/Video-As-Prompt-Wan2.1-14B): the MoT expert, its joint forward with the Wan I2V DiT,
its official key layout and strict loading.

The joint forward is compared with DiffSynth-Studio's `MotWanModel` run through its `model_fn_wan_video` vap path,
read from the local git mirror into a package of its own (as `test_dancer.py` does); that test skips where the
mirror is absent. Everything else runs anywhere.
"""

from __future__ import annotations

import ast
import importlib
import json
import sys
import types

import pytest
import torch
from safetensors.torch import save_file

from diffsynth.runtime.errors import CheckpointError, ConfigError
from diffsynth.wan.dit import WanDiT, WanDiTConfig
from diffsynth.wan.formats import ours_to_diffusers
from diffsynth.wan.video_as_prompt import (
    RELEASED_MOT_LAYERS,
    VideoAsPromptConfig,
    VideoAsPromptExpert,
    expert_to_ours,
    joint_block,
    load_transformer_folder,
    official_keys,
    split_state_dict,
    vap_forward,
)

from . import conftest as C
from .conftest import studio_source
from .test_dancer import GRADIENT_STUB, MODEL_FN_HEADER

# head_dim 24: the same frame / row / column rotary split in every implementation; CLIP width 1280 and 257
# tokens are what DiffSynth-Studio's image projection and cross-attention fix
DIT = dict(dim=48, ffn_dim=64, num_heads=2, num_layers=5, text_dim=32, freq_dim=32, text_len=16)
MOT_LAYERS = (0, 2, 4)
LATENT = (3, 4, 6)  # latent frames, height, width


def tiny_dit(seed: int = 0) -> WanDiT:
    cfg = WanDiTConfig(**DIT, model_type="i2v", in_dim=36, has_image_input=True, image_dim=1280)
    return C.randomize(WanDiT(cfg), seed).eval()


def tiny_expert(seed: int = 1, mot_layers=MOT_LAYERS) -> VideoAsPromptExpert:
    cfg = VideoAsPromptConfig(
        dim=48, num_heads=2, ffn_dim=64, freq_dim=32, text_dim=32, text_len=16, mot_layers=mot_layers, num_layers=5
    )
    return C.randomize(VideoAsPromptExpert(cfg), seed).eval()


def tiny_inputs(seed: int = 2, batch: int = 1):
    """x, timestep, context, clip, y, vap latents (36 channels), vap context, vap clip."""
    g = torch.Generator().manual_seed(seed)
    f, h, w = LATENT
    return (
        torch.randn(batch, 16, f, h, w, generator=g),
        torch.tensor([700.0] * batch),
        torch.randn(batch, 16, 32, generator=g),
        torch.randn(batch, 257, 1280, generator=g),
        torch.randn(batch, 20, f, h, w, generator=g),
        torch.randn(batch, 36, f, h, w, generator=g),
        torch.randn(batch, 16, 32, generator=g),
        torch.randn(batch, 257, 1280, generator=g),
    )


def official_expert_state(expert: VideoAsPromptExpert) -> dict[str, torch.Tensor]:
    """Our expert's weights under the official (authors' diffusers-layout) names."""
    theirs_of = {ours: official for official, ours in official_keys(expert.config).items()}
    return {theirs_of[k]: v for k, v in expert.state_dict().items()}


# ----------------------------------------------------------------------------------------- DiffSynth-Studio's
@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    pytest.importorskip("einops", reason="DiffSynth-Studio's modules need einops")
    dit_source = studio_source("diffsynth/models/wan_video_dit.py").replace("device='cuda',", "device=None,")
    mot_source = studio_source("diffsynth/models/wan_video_mot.py")
    converter = studio_source("diffsynth/utils/state_dict_converters/wan_video_mot.py")
    pipeline_source = studio_source("diffsynth/pipelines/wan_video.py")
    wanted = {"wantodance_get_single_freqs", "model_fn_wan_video"}
    functions = [
        ast.get_source_segment(pipeline_source, node)
        for node in ast.parse(pipeline_source).body
        if isinstance(node, ast.FunctionDef) and node.name in wanted
    ]
    assert len(functions) == 2
    root = tmp_path_factory.mktemp("studio-vap")
    pkg = root / "studio_vap_ref"
    for sub in ("", "models", "core", "pipelines"):
        (pkg / sub).mkdir(parents=True, exist_ok=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "models" / "wan_video_dit.py").write_text(dit_source)
    (pkg / "models" / "wan_video_mot.py").write_text(mot_source)
    (pkg / "models" / "wantodance.py").write_text(studio_source("diffsynth/models/wantodance.py"))
    (pkg / "models" / "wan_video_camera_controller.py").write_text("class SimpleAdapter:\n    pass\n")
    (pkg / "models" / "converter.py").write_text(converter)
    (pkg / "core" / "gradient.py").write_text(GRADIENT_STUB)
    (pkg / "pipelines" / "model_fn.py").write_text(MODEL_FN_HEADER + "\n\n\n".join(functions) + "\n")
    sys.path.insert(0, str(root))
    try:
        yield types.SimpleNamespace(
            WanModel=importlib.import_module("studio_vap_ref.models.wan_video_dit").WanModel,
            MotWanModel=importlib.import_module("studio_vap_ref.models.wan_video_mot").MotWanModel,
            convert=importlib.import_module("studio_vap_ref.models.converter").WanVideoMotStateDictConverter,
            model_fn=importlib.import_module("studio_vap_ref.pipelines.model_fn").model_fn_wan_video,
            sinusoid=importlib.import_module("studio_vap_ref.models.wan_video_dit").sinusoidal_embedding_1d,
            converter_source=converter,
        )
    finally:
        sys.path.remove(str(root))


def studio_pair(studio, dit: WanDiT, expert: VideoAsPromptExpert):
    c = dit.config
    theirs = studio.WanModel(
        dim=c.dim, in_dim=36, ffn_dim=c.ffn_dim, out_dim=16, text_dim=c.text_dim, freq_dim=c.freq_dim, eps=c.eps,
        patch_size=(1, 2, 2), num_heads=c.num_heads, num_layers=c.num_layers, has_image_input=True,
    )  # fmt: skip
    theirs.load_state_dict(dit.state_dict(), strict=True)
    e = expert.config
    mot = studio.MotWanModel(
        mot_layers=e.mot_layers, dim=e.dim, num_heads=e.num_heads, ffn_dim=e.ffn_dim, freq_dim=e.freq_dim,
        text_dim=e.text_dim, in_dim=e.in_dim,
    )  # fmt: skip
    # through DiffSynth-Studio's converter from the official names: it hard-codes the released mot_layers
    official = official_expert_state(expert)
    if e.mot_layers != RELEASED_MOT_LAYERS:
        mapping = dict(zip(e.mot_layers, RELEASED_MOT_LAYERS, strict=False))
        official = {_relayer(k, mapping): v for k, v in official.items()}
    mot.load_state_dict(studio.convert(official), strict=True)
    return theirs.eval(), mot.eval()


def _relayer(key: str, mapping: dict[int, int]) -> str:
    parts = key.split(".")
    if parts[0] == "blocks":
        parts[1] = str(mapping[int(parts[1])])
    return ".".join(parts)


@pytest.mark.parity
@pytest.mark.parametrize("t", [999.0, 312.5])
def test_joint_forward_matches_diffsynth_studio(studio, t):
    dit, expert = tiny_dit(), tiny_expert()
    theirs, mot = studio_pair(studio, dit, expert)
    x, _, context, clip, y, vap, vap_context, vap_clip = tiny_inputs()
    timestep = torch.tensor([t])
    with torch.no_grad():
        # DiffSynth-Studio's vap branch reuses the name `t` for the reference's clean time embedding, so its head
        # is modulated by timestep 1; the authors' head takes the video's timestep, as ours does. Compare with its
        # head given the video's embedding, and check that the unpatched path is the one that differs.
        bugged = studio.model_fn(
            dit=theirs, vap=mot, latents=x, timestep=timestep, context=context, clip_feature=clip, y=y,
            vap_hidden_state=vap, vap_clip_feature=vap_clip, context_vap=vap_context,
        )  # fmt: skip
        t_video = theirs.time_embedding(studio.sinusoid(theirs.freq_dim, timestep))
        head = theirs.head.forward
        theirs.head.forward = lambda h, _t: head(h, t_video)
        got = vap_forward(dit, expert, x, timestep, context, clip, y, vap, vap_context, vap_clip)
        want = studio.model_fn(
            dit=theirs, vap=mot, latents=x, timestep=timestep, context=context, clip_feature=clip, y=y,
            vap_hidden_state=vap, vap_clip_feature=vap_clip, context_vap=vap_context,
        )  # fmt: skip
        plain = dit(x, timestep, context, clip, y)
    diff = (got - want).abs().max().item()
    assert diff <= 1e-4, diff
    assert (bugged - want).abs().max().item() > 1e-2
    assert (got - plain).abs().max().item() > 1e-3  # the reference changes the prediction


@pytest.mark.parity
def test_full_size_keys_equal_diffsynth_studio(studio):
    """Every released expert key, through DiffSynth-Studio's converter, lands on its `MotWanModel` (built on meta
    with the released sizes) with the same shapes as ours; and nothing is left over."""
    with torch.device("meta"):
        ours = VideoAsPromptExpert()
        theirs = studio.MotWanModel().state_dict()
    official = official_expert_state(ours)
    converted = studio.convert(official)
    assert len(converted) == len(official)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    assert tuple(studio.MotWanModel().mot_layers if False else RELEASED_MOT_LAYERS) == ours.config.mot_layers


# ----------------------------------------------------------------------------------------- anywhere
def test_full_size_official_layout_on_meta():
    """The released expert's official keys and shapes (written from the authors' `WanTransformerBlock` with
    `with_mot_ref` and the `*_mot_ref` embedders): dim 5120, ffn 13824, CLIP 1280, umT5 4096, 36 input channels."""
    with torch.device("meta"):
        expert = VideoAsPromptExpert()
    shapes = {k: tuple(v.shape) for k, v in official_expert_state(expert).items()}
    d, f = 5120, 13824
    expected = {
        "patch_embedding_mot_ref.weight": (d, 36, 1, 2, 2),
        "patch_embedding_mot_ref.bias": (d,),
        "condition_embedder_mot_ref.time_embedder.linear_1.weight": (d, 256),
        "condition_embedder_mot_ref.time_embedder.linear_2.weight": (d, d),
        "condition_embedder_mot_ref.time_proj.weight": (6 * d, d),
        "condition_embedder_mot_ref.text_embedder.linear_1.weight": (d, 4096),
        "condition_embedder_mot_ref.text_embedder.linear_2.weight": (d, d),
        "condition_embedder_mot_ref.image_embedder.norm1.weight": (1280,),
        "condition_embedder_mot_ref.image_embedder.ff.net.0.proj.weight": (1280, 1280),
        "condition_embedder_mot_ref.image_embedder.ff.net.2.weight": (d, 1280),
        "condition_embedder_mot_ref.image_embedder.norm2.weight": (d,),
    }
    for key, shape in expected.items():
        assert shapes[key] == shape, key
    per_block = {
        "attn1_mot_ref.to_q.weight": (d, d),
        "attn1_mot_ref.norm_q.weight": (d,),
        "attn1_mot_ref.to_out.0.weight": (d, d),
        "attn2_mot_ref.add_k_proj.weight": (d, d),
        "attn2_mot_ref.norm_added_k.weight": (d,),
        "norm2_mot_ref.weight": (d,),
        "ffn_mot_ref.net.0.proj.weight": (f, d),
        "ffn_mot_ref.net.2.weight": (d, f),
        "scale_shift_table_mot_ref": (1, 6, d),
    }
    for layer in RELEASED_MOT_LAYERS:
        for key, shape in per_block.items():
            assert shapes[f"blocks.{layer}.{key}"] == shape, (layer, key)
    assert not any(k.startswith("blocks.1.") for k in shapes)
    # 10 top modules (weight + bias) + 10 blocks x (13 linears/norms x 2 + 5 RMSNorms + 1 table)
    assert len(shapes) == 20 + 10 * (13 * 2 + 5 + 1)


def _write_folder(folder, dit, expert, extra=None):
    state = {**ours_to_diffusers(dit.state_dict()), **official_expert_state(expert), **(extra or {})}
    state = {k: v.contiguous() for k, v in state.items()}
    keys = sorted(state)
    half = len(keys) // 2  # sharded, as the released folder is
    folder.mkdir(parents=True, exist_ok=True)
    config = {"_class_name": "WanTransformer3DMOTModel", "num_attention_heads": 2, "attention_head_dim": 24,
              "block_idx_with_mot_ref": list(expert.config.mot_layers)}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: state[k] for k in keys[:half]}, str(folder / "diffusion_pytorch_model-00001-of-00002.safetensors"))
    save_file({k: state[k] for k in keys[half:]}, str(folder / "diffusion_pytorch_model-00002-of-00002.safetensors"))


def test_strict_load_of_an_official_transformer_folder(tmp_path):
    dit, expert = tiny_dit(), tiny_expert()
    _write_folder(tmp_path / "transformer", dit, expert)
    got_dit, got_expert = load_transformer_folder(tmp_path / "transformer")
    assert got_expert.config.mot_layers == MOT_LAYERS and got_dit.config.num_layers == 5
    for mine, loaded in ((dit, got_dit), (expert, got_expert)):
        ref = mine.state_dict()
        assert all(torch.equal(ref[k], v) for k, v in loaded.state_dict().items())
    got_dit.config.text_len = got_expert.config.text_len = 16  # not fixed by the shapes (released: 512)
    x, t, context, clip, y, vap, vap_context, vap_clip = tiny_inputs()
    with torch.no_grad():
        a = vap_forward(dit, expert, x, t, context, clip, y, vap, vap_context, vap_clip)
        b = vap_forward(got_dit, got_expert, x, t, context, clip, y, vap, vap_context, vap_clip)
    assert torch.equal(a, b)


def test_strict_load_refuses_unknown_and_missing_expert_keys(tmp_path):
    dit, expert = tiny_dit(), tiny_expert()
    _write_folder(tmp_path / "a", dit, expert, {"blocks.0.attn3_mot_ref.to_q.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="attn3_mot_ref"):
        load_transformer_folder(tmp_path / "a")
    official = official_expert_state(expert)
    del official["blocks.2.ffn_mot_ref.net.2.bias"]
    with pytest.raises(KeyError):  # a partial block is not a layout we know: the converter maps, the load refuses
        load_transformer_folder_from(tmp_path / "b", dit, official)
    with pytest.raises(CheckpointError, match="no diffusion_pytorch_model"):
        load_transformer_folder(tmp_path)


def load_transformer_folder_from(folder, dit, official):
    state = {**ours_to_diffusers(dit.state_dict()), **official}
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"num_attention_heads": 2, "attention_head_dim": 24}))
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "diffusion_pytorch_model.safetensors"))
    try:
        load_transformer_folder(folder)
    except CheckpointError as err:
        assert "ffn.2.bias" in str(err)
        raise KeyError(str(err)) from err


def test_split_routes_expert_keys_and_leaves_the_dit_untouched():
    dit, expert = tiny_dit(), tiny_expert()
    official = {**ours_to_diffusers(dit.state_dict()), **official_expert_state(expert)}
    dit_part, expert_part = split_state_dict(official)
    assert set(dit_part) == set(ours_to_diffusers(dit.state_dict()))
    assert set(expert_to_ours(expert_part, MOT_LAYERS)) == set(expert.state_dict())


def test_joint_attention_couples_the_branches_only_at_mot_layers():
    """With zero expert gates the video tokens still see the reference (shared keys) and differ from the plain
    DiT; a DiT with the expert only at layer 4 equals the plain DiT up to layer 4 (checked via the hook)."""
    dit, expert = tiny_dit(), tiny_expert(mot_layers=(4,))
    x, t, context, clip, y, vap, vap_context, vap_clip = tiny_inputs()
    seen = []
    state = expert.prepare(vap, vap_context, vap_clip, torch.float32)
    hook = expert.block_hook(dit, state)

    def spy(block, h, shared):
        seen.append(h.clone())
        return hook(block, h, shared)

    plain_seen = []

    def plain_spy(block, h, shared):
        plain_seen.append(h.clone())
        return dit._run(block, h, *shared)

    with torch.no_grad():
        out = dit(x, t, context, clip, y, block_hook=spy)
        plain = dit(x, t, context, clip, y, block_hook=plain_spy)
        assert torch.equal(plain, dit(x, t, context, clip, y))  # the hook path equals the DiT's own
    for a, b in zip(seen, plain_seen, strict=True):  # layers 0..4 get the same input
        assert torch.equal(a, b)
    assert (out - plain).abs().max() > 1e-4


def test_joint_block_equals_separate_attention_when_the_reference_is_empty():
    """With no reference tokens the joint block is exactly the DiT's own block."""
    dit, expert = tiny_dit(), tiny_expert()
    x, t, context, clip, y, vap, vap_context, vap_clip = tiny_inputs()
    captured = {}

    def grab(block, h, shared):
        captured.setdefault("args", (block, h, shared))
        return dit._run(block, h, *shared)

    with torch.no_grad():
        dit(x, t, context, clip, y, block_hook=grab)
        block, h, shared = captured["args"]
        state = expert.prepare(vap, vap_context, vap_clip, torch.float32)
        empty = state.tokens[:, :0]
        state.rope = tuple(r[:, :0] for r in state.rope)
        got, _ = joint_block(block, expert.blocks[0], h, empty, shared, state)
        want = block(h, *shared)
    assert (got - want).abs().max().item() <= 1e-6


def test_reference_rope_puts_frames_before_the_video():
    expert = tiny_expert()
    cos, sin = expert.reference_rope((3, 2, 2), torch.device("cpu"))
    dit = tiny_dit()
    cos_main, sin_main = dit._rope((4, 2, 2), torch.device("cpu"))  # token 12 = frame 3, row 0, column 0
    t = expert.config.rope_axes_dims[0]
    # frame -3 has the angle of frame 3 negated: cos equal, sin opposite on the frame channels
    assert torch.allclose(cos[0, 0, 0, :t], cos_main[0, 12, 0, :t], atol=1e-6)
    assert torch.allclose(sin[0, 0, 0, :t], -sin_main[0, 12, 0, :t], atol=1e-6)
    assert torch.equal(cos[..., t:], cos_main[:, :12, :, t:])  # rows and columns shared


def test_bad_inputs_raise_clear_errors():
    dit, expert = tiny_dit(), tiny_expert()
    x, t, context, clip, y, vap, vap_context, vap_clip = tiny_inputs()
    with pytest.raises(ValueError, match="vap latents"):
        vap_forward(dit, expert, x, t, context, clip, y, vap[:, :16], vap_context, vap_clip)
    with pytest.raises(ValueError, match="vap context"):
        vap_forward(dit, expert, x, t, context, clip, y, vap, vap_context[..., :8], vap_clip)
    with pytest.raises(ValueError, match="vap clip_feature"):
        vap_forward(dit, expert, x, t, context, clip, y, vap, vap_context, None)
    with pytest.raises(ValueError, match="batch"):
        vap_forward(dit, expert, x, t, context, clip, y, vap.repeat(2, 1, 1, 1, 1), vap_context.repeat(2, 1, 1),
                    vap_clip.repeat(2, 1, 1))  # fmt: skip
    big = C.randomize(WanDiT(WanDiTConfig(**{**DIT, "dim": 96, "num_heads": 4}, model_type="i2v", in_dim=36,
                                          has_image_input=True)), 0)  # fmt: skip
    with pytest.raises(ConfigError, match="does not fit"):
        vap_forward(big, expert, x, t, context, clip, y, vap, vap_context, vap_clip)
    with pytest.raises(ConfigError, match="mot_layers"):
        VideoAsPromptConfig(mot_layers=(4, 0))
    with pytest.raises(ConfigError, match="mot_layers"):
        VideoAsPromptConfig(mot_layers=(40,))
    with pytest.raises(ConfigError, match="num_heads"):
        VideoAsPromptConfig(dim=50, num_heads=3)


def test_gradient_checkpointing_covers_the_joint_layers_and_changes_nothing():
    """With the DiT's gradient checkpointing on, the joint layers are recomputed in backward too (their activations
    are not kept: the saved-tensor count drops) and the output and gradients are the same."""
    x, t, context, clip, y, vap, vap_context, vap_clip = tiny_inputs(seed=5)

    def run(checkpointing: bool):
        dit, expert = tiny_dit().train(), tiny_expert().train()
        dit.gradient_checkpointing = checkpointing
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = vap_forward(dit, expert, x, t, context, clip, y, vap, vap_context, vap_clip)
        out.square().mean().backward()
        grads = {f"dit.{k}": p.grad for k, p in dit.named_parameters()}
        grads |= {f"expert.{k}": p.grad for k, p in expert.named_parameters() if p.grad is not None}
        return out.detach(), grads, len(saved)

    plain, plain_grads, kept = run(False)
    out, grads, kept_checkpointed = run(True)
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
    assert grads.keys() == plain_grads.keys() and any(k.startswith("expert.blocks.") for k in grads)
    for key, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[key], rtol=1e-5, atol=1e-6, msg=key)
    assert kept_checkpointed < kept / 2
