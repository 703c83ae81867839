"""DiffSynth-Studio's LoRA Encoder and LoRA Fusion for FLUX.1 (`flux1/lora_encoder.py`, `flux1/lora_fusion.py`).

- both models against DiffSynth-Studio's `FluxLoRAEncoder` / `FluxLoraPatcher` (compiled from its git mirror;
  skipped where it is absent) on tiny sizes, and the released layouts on the meta device;
- the same maths written out here (runs everywhere);
- the pipeline: `lora_encoder_inputs` appends one token per LoRA (times `lora_encoder_scale`) to the positive
  prompt only; `enable_lora_merger()` gates kept-apart LoRAs layer by layer, `load_lora` then keeps them apart,
  and `disable_lora_merger()` sums them again; both models load from `model_configs`; errors name the argument.
"""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffsynth_flux_test_helpers import our_pipeline
from safetensors.torch import save_file

from diffsynth.flux.flux1.lora_encoder import (
    LORA_ENCODER_SPEC,
    FluxLoRAEncoder,
    LoRAEncoderConfig,
    config_from_state,
    is_lora_encoder_file,
)
from diffsynth.flux.flux1.lora_fusion import (
    LORA_FUSION_SPEC,
    FluxLoRAFusion,
    LoRAFusionConfig,
    is_lora_fusion_file,
)
from diffsynth.flux.flux1.lora_fusion import config_from_state as fusion_config_from_state
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.lora import LoRATarget, list_loras
from diffsynth.runtime.testing.weights import random_weights

pytestmark = pytest.mark.usefixtures("one_thread")
STUDIO = Path("/work/.mirror/modelscope+DiffSynth-Studio/repo")
RUN = dict(num_inference_steps=2, height=32, width=32, seed=0, t5_sequence_length=16, progress_bar=False)
# the tiny repo's DiT (conftest): 1 double and 2 single blocks, width 256, MLP 1024, text width 32
TINY = dict(double_blocks=1, single_blocks=2, hidden=256, mlp_hidden=1024)


def studio_module(name: str, drop: tuple[str, ...] = ()) -> types.ModuleType:
    """One of DiffSynth-Studio's model files, compiled from the mirror (lines importing its package dropped)."""
    if not (STUDIO / "HEAD").exists():
        pytest.skip("the DiffSynth-Studio git mirror is not on this machine")
    source = subprocess.run(
        ["git", "-C", str(STUDIO), "show", f"HEAD:diffsynth/models/{name}.py"], capture_output=True, text=True
    )
    if source.returncode:
        pytest.skip(f"diffsynth/models/{name}.py is not in the mirror")
    text = "\n".join(line for line in source.stdout.splitlines() if not line.startswith(drop))
    module = types.ModuleType(f"studio_{name}")
    sys.modules[module.__name__] = module
    exec(compile(text, f"studio:{name}.py", "exec"), module.__dict__)
    return module


def random_targets(config, seed: int, rank: int = 3, skip: int = 0) -> dict[str, LoRATarget]:
    """A random LoRA on every layer the models read (our names), alpha 6 (factor 2); the first `skip` left out."""
    g = torch.Generator().manual_seed(seed)
    targets = {}
    for layer in config.studio_layers()[skip:]:
        down = torch.randn(rank, layer.in_features, generator=g) * 0.1
        up = torch.randn(layer.out_features, rank, generator=g) * 0.1
        targets[layer.ours] = LoRATarget(down=down, up=up, alpha=6.0)
    return targets


def tiny_encoder_config(dim: int = 256, head_dim: int = 128) -> LoRAEncoderConfig:
    return LoRAEncoderConfig(**TINY, dim=dim, intermediate=64, head_dim=head_dim, tokens_per_layer=4)


def tiny_encoder(seed: int = 0, **sizes) -> FluxLoRAEncoder:
    return random_weights(FluxLoRAEncoder(tiny_encoder_config(**sizes)), seed, scale=0.2).eval()


def tiny_fusion(seed: int = 0) -> FluxLoRAFusion:
    return random_weights(FluxLoRAFusion(LoRAFusionConfig(**TINY)), seed, scale=0.5).eval()


# ------------------------------------------------------------------ LoRA Encoder
def test_encoder_matches_diffsynth_studio():
    studio = studio_module("flux_lora_encoder")
    config = tiny_encoder_config()
    patterns = [
        {"name": layer.key.replace("___", "."), "dim": (layer.in_features, layer.out_features),
         "type": layer.kind.replace("___", ".")}
        for layer in config.studio_layers()
    ]  # fmt: skip
    studio.LoRAEmbedder.default_lora_patterns = lambda self: patterns  # their sizes are FLUX.1-dev's
    layer_cls = studio.CLIPEncoderLayer  # their heads are fixed at 32 x 128: 2 x 128 at width 256
    studio.CLIPEncoderLayer = lambda dim, inner, num_heads, head_dim: layer_cls(dim, inner, num_heads=2, head_dim=128)
    theirs = studio.FluxLoRAEncoder(embed_dim=256, encoder_intermediate_size=64, num_embeds_per_lora=4).eval()
    ours = tiny_encoder(seed=1)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    targets = random_targets(config, seed=2)
    studio_lora = {}  # their names; alpha / rank folded into the up matrix as their loader does
    for layer in config.studio_layers():
        t = targets[layer.ours]
        name = layer.key.replace("___", ".")
        studio_lora[f"{name}.lora_A.weight"], studio_lora[f"{name}.lora_B.weight"] = t.down, t.up * t.factor
    with torch.no_grad():
        want, got = theirs(studio_lora), ours(targets)
    assert got.shape == want.shape == (1, 1, 256)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_encoder_written_out():
    """probe -> LoRA delta -> LayerNorm -> per-kind Linear; the special token first; one pre-LN CLIP layer (no
    mask, quick GELU); the special token's output through a LayerNorm and a Linear. A missing layer is a zero
    change."""
    enc = tiny_encoder(seed=3, dim=32, head_dim=16)
    config = enc.config
    targets = random_targets(config, seed=4, skip=1)
    tokens = []
    for layer in config.studio_layers():
        probe = enc.embedder.model_dict[layer.key]
        t = targets.get(layer.ours)
        delta = t.factor * t.up @ t.down if t is not None else torch.zeros(layer.out_features, layer.in_features)
        y = F.layer_norm(probe.x @ delta.T, (layer.out_features,), probe.layer_norm.weight, probe.layer_norm.bias)
        tokens.append(enc.embedder.proj_dict[layer.kind](y))
    x = torch.cat([enc.special_embeds, *tokens], dim=1)
    block = enc.encoders[0]
    h = block.layer_norm1(x)
    heads = lambda t: t.view(1, -1, 2, 16).transpose(1, 2)  # noqa: E731
    q, k, v = heads(block.attn.to_q(h)), heads(block.attn.to_k(h)), heads(block.attn.to_v(h))
    attn = ((q @ k.transpose(-1, -2)) / 4.0).softmax(-1) @ v
    x = x + block.attn.to_out(attn.transpose(1, 2).reshape(1, -1, 32))
    h = block.fc1(block.layer_norm2(x))
    x = x + block.fc2(h * torch.sigmoid(1.702 * h))
    with torch.no_grad():
        want = enc.final_linear(enc.final_layer_norm(x[:, :1]))
        torch.testing.assert_close(enc(targets), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="changes none of the DiT layers"):
        enc({"img_in": targets["single_blocks.0.linear1"]})


def test_released_layouts_on_meta():
    with torch.device("meta"):
        encoder, fusion = FluxLoRAEncoder(), FluxLoRAFusion()
    state = encoder.state_dict()
    assert len([k for k in state if k.endswith(".x")]) == 19 * 10 + 38 * 3
    assert tuple(state["embedder.model_dict.single_blocks___37___to_qkv_mlp.x"].shape) == (1, 16, 3072)
    assert tuple(state["embedder.model_dict.single_blocks___0___proj_out.layer_norm.weight"].shape) == (3072,)
    assert tuple(state["embedder.proj_dict.norm1_a___linear.weight"].shape) == (4096, 18432)
    assert tuple(state["encoders.0.fc1.weight"].shape) == (8192, 4096)
    assert tuple(state["special_embeds"].shape) == (1, 1, 4096)
    assert config_from_state(state) == LoRAEncoderConfig()
    fused = fusion.state_dict()
    assert tuple(fused["model_dict.blocks___18___attn___b_to_qkv.weight_cross"].shape) == (9216,)
    assert tuple(fused["model_dict.single_blocks___0___to_qkv_mlp.norm_lora.bias"].shape) == (21504,)
    assert fusion_config_from_state(fused) == LoRAFusionConfig()
    try:
        studio_encoder = studio_module("flux_lora_encoder")
        studio_patcher = studio_module("flux_lora_patcher", drop=("from ..",))
    except pytest.skip.Exception:
        return
    with torch.device("meta"):
        theirs = studio_encoder.FluxLoRAEncoder(), studio_patcher.FluxLoraPatcher()
    for ours, their in zip((state, fused), theirs, strict=True):
        assert {k: tuple(v.shape) for k, v in ours.items()} == {
            k: tuple(v.shape) for k, v in their.state_dict().items()
        }


# ------------------------------------------------------------------ LoRA Fusion
def test_merger_matches_diffsynth_studio():
    studio = studio_module("flux_lora_patcher", drop=("from ..",))
    fusion = tiny_fusion(seed=5)
    layers = fusion.layers
    theirs = studio.FluxLoraPatcher(
        [{"name": layer.key.replace("___", "."), "dim": layer.out_features} for layer in layers]
    )
    theirs.load_state_dict(fusion.state_dict(), strict=True)
    g = torch.Generator().manual_seed(6)
    for layer in layers:
        base = torch.randn(2, 5, layer.out_features, generator=g)
        loras = torch.randn(3, 2, 5, layer.out_features, generator=g) * 0.3
        with torch.no_grad():
            want = theirs(base, loras, layer.key.replace("___", "."))
            got = fusion.model_dict[layer.key](base, loras)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_merger_written_out():
    merger = tiny_fusion(seed=7).model_dict["blocks___0___attn___a_to_out"]
    base, loras = torch.randn(4, 256), torch.randn(2, 4, 256)
    nb = F.layer_norm(base, (256,), merger.norm_base.weight, merger.norm_base.bias)
    nl = F.layer_norm(loras, (256,), merger.norm_lora.weight, merger.norm_lora.bias)
    gate = torch.sigmoid(
        nb * merger.weight_base + nl * merger.weight_lora + nb * nl * merger.weight_cross + merger.bias
    )
    with torch.no_grad():
        torch.testing.assert_close(merger(base, loras), base + (merger.weight_out * gate * loras).sum(0))


# ------------------------------------------------------------------ the pipeline
def write_model(module: torch.nn.Module, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path))
    return path


def write_lora(pipe, path: Path, seed: int) -> Path:
    """A random peft LoRA (BFL names) on every Linear of the tiny DiT's blocks."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in pipe.dit.named_modules():
        if isinstance(module, torch.nn.Linear) and "blocks." in name:
            state[f"{name}.lora_A.weight"] = torch.randn(2, module.in_features, generator=g) * 0.1
            state[f"{name}.lora_B.weight"] = torch.randn(module.out_features, 2, generator=g) * 0.1
    save_file(state, str(path))
    return path


def _dit_texts(pipe, **kwargs):
    seen = []
    hook = pipe.dit.register_forward_pre_hook(lambda m, args, kw: seen.append(args[2] if len(args) > 2 else kw["txt"]),
                                              with_kwargs=True)  # fmt: skip
    try:
        out = pipe("a cat on the beach", output_type="np", **{**RUN, **kwargs})
    finally:
        hook.remove()
    return seen, out


def test_lora_encoder_tokens_follow_the_positive_prompt(tiny_repo, tmp_path):
    """The encoder loads from model_configs; each LoRA adds one token (its embedding times the scale) after the
    positive prompt's T5 states; the negative branch is unchanged (DiffSynth-Studio's unit)."""
    pipe = our_pipeline(tiny_repo)
    encoder = tiny_encoder(seed=8, dim=32, head_dim=16)
    path = write_model(encoder, tmp_path / "model.safetensors")
    assert is_lora_encoder_file([str(path)]) and not is_lora_fusion_file([str(path)])
    pipe = our_pipeline(tiny_repo, model_configs=[ModelConfig(path=str(path))])
    assert pipe.lora_encoder is not None and pipe.lora_encoder.config.head_dim == 32  # one head from the file
    first, second = write_lora(pipe, tmp_path / "a.safetensors", 1), write_lora(pipe, tmp_path / "b.safetensors", 2)
    plain, plain_image = _dit_texts(pipe)
    seen, image = _dit_texts(pipe, lora_encoder_inputs=[str(first), str(second)], lora_encoder_scale=0.5)
    with torch.no_grad():
        tokens = torch.cat([pipe.lora_encoder(pipe.read_lora(str(p))) for p in (first, second)], dim=1)[0] * 0.5
    length = plain[0].shape[1]
    assert seen[0].shape == (1, length + 2, 32)
    torch.testing.assert_close(seen[0][:, :length], plain[0])
    torch.testing.assert_close(seen[0][0, length:], tokens)
    assert abs(image - plain_image).max() > 1e-4
    cfg, _ = _dit_texts(pipe, lora_encoder_inputs=str(first), cfg_scale=2.0, negative_prompt="dark")
    assert sorted(t.shape[1] for t in cfg[:2]) == [length, length + 1]  # the branches run apart
    # scale 0 appends nothing: zero tokens would still be real ones after the DiT's text embedding (its bias)
    zero, zero_image = _dit_texts(pipe, lora_encoder_inputs=[str(first), str(second)], lora_encoder_scale=0)
    assert zero[0].shape == plain[0].shape and (zero_image == plain_image).all()


def test_lora_fusion_gates_kept_apart_loras(tiny_repo, tmp_path):
    """With the merger on, `load_lora` keeps LoRAs apart and each layer returns merger(base, [lora_1, lora_2]);
    off again, the same layers sum them; an explicit fuse=True still fuses."""
    fusion = tiny_fusion(seed=9)
    path = write_model(fusion, tmp_path / "fusion.safetensors")
    assert is_lora_fusion_file([str(path)]) and not is_lora_encoder_file([str(path)])
    pipe = our_pipeline(tiny_repo, model_configs=[ModelConfig(path=str(path))])
    pipe.enable_lora_merger()
    first, second = write_lora(pipe, tmp_path / "a.safetensors", 1), write_lora(pipe, tmp_path / "b.safetensors", 2)
    pipe.load_lora(str(first), scale=0.8)
    pipe.load_lora(pipe.dit, ModelConfig(path=str(second)))  # DiffSynth-Studio's form: hotload left to the pipeline
    assert len(list_loras(pipe.dit)) == 2
    layer = pipe.dit.get_submodule("single_blocks.1.linear1")
    x = torch.randn(3, layer.in_features)
    base = F.linear(x, layer.weight, layer.bias)
    outputs = []
    for path, scale in ((first, 0.8), (second, 1.0)):
        t = pipe.read_lora(str(path)).targets["single_blocks.1.linear1"]
        outputs.append(scale * t.factor * F.linear(F.linear(x, t.down), t.up))
    with torch.no_grad():
        merger = fusion.model_dict["single_blocks___1___to_qkv_mlp"]
        torch.testing.assert_close(layer(x), merger(base, torch.stack(outputs)), atol=1e-5, rtol=1e-5)
        image = pipe("a cat", output_type="np", **RUN)
        pipe.disable_lora_merger()
        torch.testing.assert_close(layer(x), base + outputs[0] + outputs[1], atol=1e-5, rtol=1e-5)
        assert abs(pipe("a cat", output_type="np", **RUN) - image).max() > 1e-4
    pipe.enable_lora_merger()
    pipe.clear_loras()
    pipe.load_lora(str(first), fuse=True)
    assert list_loras(pipe.dit) == {}


def test_errors_name_the_argument(tiny_repo, tmp_path):
    pipe = our_pipeline(tiny_repo)
    with pytest.raises(ConfigError, match="load_lora_encoder"):
        pipe("a", lora_encoder_inputs=str(tmp_path / "x.safetensors"), **RUN)
    with pytest.raises(ConfigError, match="load_lora_fusion"):
        pipe.enable_lora_merger()
    wide = write_model(tiny_encoder(seed=1, dim=64, head_dim=16), tmp_path / "wide.safetensors")
    with pytest.raises(ConfigError, match="64-wide tokens; this DiT reads 32-wide text"):
        pipe.load_lora_encoder(str(wide))
    other = random_weights(FluxLoRAFusion(LoRAFusionConfig(**{**TINY, "single_blocks": 3})), 0)
    with pytest.raises(ConfigError, match="1 double and 3 single blocks"):
        pipe.load_lora_fusion(str(write_model(other, tmp_path / "other.safetensors")))
    pipe.load_lora_encoder(str(write_model(tiny_encoder(seed=1, dim=32, head_dim=16), tmp_path / "e.safetensors")))
    lora = str(write_lora(pipe, tmp_path / "l.safetensors", 1))
    with pytest.raises(ConfigError, match="lora_encoder_scale"):
        pipe("a", lora_encoder_inputs=lora, lora_encoder_scale="x")
    for scale in (float("nan"), float("inf")):  # else the appended tokens, so the image, are NaN
        with pytest.raises(ConfigError, match=f"lora_encoder_scale={scale!r} must be a finite number"):
            pipe("a", lora_encoder_inputs=lora, lora_encoder_scale=scale, **{**RUN, "num_inference_steps": 1})
    assert LORA_ENCODER_SPEC.role == "lora_encoder" and LORA_FUSION_SPEC.role == "lora_fusion"


def test_presets_and_cli_flag(bfl_repo_base, tmp_path, monkeypatch):
    """`diffsynth generate --model DiffSynth-Studio/LoRA-Encoder-FLUX.1-Dev --lora L --lora-encoder-inputs L` writes
    the pipeline's image; the LoRA Fusion preset loads the fusion model beside FLUX.1-dev's files."""
    import shutil

    import numpy as np
    from PIL import Image

    from diffsynth.flux import FluxImagePipeline
    from diffsynth.runtime.cli import main

    base = tmp_path / "models"
    shutil.copytree(bfl_repo_base, base)
    for repo, model in (
        ("LoRA-Encoder-FLUX.1-Dev", tiny_encoder(seed=8, dim=32, head_dim=32)),
        ("LoRAFusion-preview-FLUX.1-dev", tiny_fusion(seed=2)),
    ):
        (base / "DiffSynth-Studio" / repo).mkdir(parents=True)
        write_model(model, base / "DiffSynth-Studio" / repo / "model.safetensors")
    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(base))
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "1")
    fused = FluxImagePipeline.from_pretrained("DiffSynth-Studio/LoRAFusion-preview-FLUX.1-dev", torch_dtype="float32")
    assert fused.lora_fusion is not None and fused.lora_encoder is None
    pipe = FluxImagePipeline.from_pretrained("DiffSynth-Studio/LoRA-Encoder-FLUX.1-Dev", torch_dtype="float32")
    lora = write_lora(pipe, tmp_path / "style.safetensors", 3)
    out = tmp_path / "out.png"
    args = ["generate", "--model", "DiffSynth-Studio/LoRA-Encoder-FLUX.1-Dev", "--prompt", "a cat", "--seed", "1"]
    args += ["--lora", str(lora), "--lora-encoder-inputs", str(lora), "--steps", "1", "--height", "32", "--width", "32"]
    assert main([*args, "--output", str(out), "--device", "cpu", "--dtype", "float32"]) == 0
    pipe.load_lora(str(lora))
    want = pipe("a cat", lora_encoder_inputs=[str(lora)], seed=1, num_inference_steps=1, height=32, width=32)
    with Image.open(out) as written:
        assert np.array_equal(np.asarray(written), np.asarray(want))
