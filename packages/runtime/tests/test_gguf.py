"""GGUF checkpoints (`gguf.py`): our torch dequantization of every supported ggml block format equals the `gguf`
package's numpy reference, a .gguf opens as a lazy state dict in torch shapes, and a tiny Z-Image DiT written as
.gguf loads through the normal pipeline path with packed Linears and draws the same image as the same model holding
the dequantized weights (with and without an unfused LoRA)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from diffsynth.runtime.checkpoint import open_checkpoint
from diffsynth.runtime.errors import CheckpointError, ConfigError
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.lora import apply_lora, list_loras
from diffsynth.runtime.quant import is_quantized_linear, linear_weight, quantize_config
from diffsynth.runtime.testing.modules import load_beside

gguf = pytest.importorskip("gguf")

from diffsynth.runtime.gguf import (  # noqa: E402 - after the importorskip
    FORMATS,
    MODE_ENV,
    GGUFLinear,
    dequantize,
    dequantize_model,
)

helpers = load_beside(__file__, "helpers.py", "diffsynth_runtime_test_helpers")

T = gguf.GGMLQuantizationType
# byte offsets of each format's fp16 scales (d, dmin / m): filled with finite values, the rest of a block random
SCALES = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q2_K": [80, 82],
          "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}  # fmt: skip
ROUND_TRIP = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]  # the formats gguf.quants can quantize


def random_blocks(qtype: str, count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    nbytes = FORMATS[qtype].nbytes
    raw = rng.integers(0, 256, size=(count, nbytes), dtype=np.uint8)
    for offset in SCALES[qtype]:
        halves = (rng.standard_normal(count) * 0.05).astype(np.float16)
        raw[:, offset : offset + 2] = halves.view(np.uint8).reshape(count, 2)
    return raw


# ----------------------------------------------------------------------------------- block formats
@pytest.mark.parametrize("qtype", sorted(FORMATS))
def test_each_block_format_dequantizes_as_the_numpy_reference(qtype):
    raw = random_blocks(qtype, 24, seed=sorted(FORMATS).index(qtype))
    values = FORMATS[qtype].values
    reference = gguf.quants.dequantize(raw.reshape(3, -1), T[qtype])  # 3 rows of 8 blocks
    assert reference.shape == (3, 8 * values) and np.isfinite(reference).all() and np.abs(reference).max() > 0
    ours = dequantize(torch.from_numpy(raw), qtype, reference.shape)
    assert ours.dtype == torch.float32
    np.testing.assert_array_equal(ours.numpy(), reference)  # exact: the same float32 arithmetic
    as_bf16 = dequantize(torch.from_numpy(raw), qtype, reference.shape, torch.bfloat16)
    torch.testing.assert_close(as_bf16, torch.from_numpy(reference).to(torch.bfloat16), rtol=0, atol=0)


@pytest.mark.parametrize("qtype", ROUND_TRIP)
def test_quantized_data_round_trips(qtype):
    x = np.random.default_rng(1).standard_normal((4, 128)).astype(np.float32)
    packed = gguf.quants.quantize(x, T[qtype])
    ours = dequantize(torch.from_numpy(packed), qtype, x.shape).numpy()
    np.testing.assert_array_equal(ours, gguf.quants.dequantize(packed, T[qtype]))
    bound = {"Q8_0": 0.03, "Q4_0": 0.5, "Q4_1": 0.4, "Q5_0": 0.25, "Q5_1": 0.2}[qtype]  # a step of each format
    assert 0 < np.abs(ours - x).max() < bound


# ----------------------------------------------------------------------------------- reading
def test_a_gguf_file_opens_lazily_in_torch_shapes(tmp_path):
    rng = np.random.default_rng(2)
    weight = rng.standard_normal((48, 64)).astype(np.float32)  # [out, in]: ggml stores [64, 48]
    conv = rng.standard_normal((8, 4, 1, 2, 2)).astype(np.float16)  # 5-D: stored 4-D, true shape in the metadata
    bf16 = torch.randn(6, 5, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    path = helpers.write_gguf(
        tmp_path / "model.gguf",
        {
            "layer.weight": (gguf.quants.quantize(weight, T.Q8_0), T.Q8_0),
            "layer.bias": (rng.standard_normal(48).astype(np.float32), None),
            "patch.weight": (conv.reshape(8, 4, 1, 4), None),
            "norm.weight": (bf16.view(torch.int16).numpy().view(np.uint8), T.BF16),
        },
        {"comfy.gguf.orig_shape.patch.weight": [8, 4, 1, 2, 2], "general.name": "tiny"},
    )
    state = open_checkpoint(str(path))
    assert state.shapes() == {"layer.weight": (48, 64), "layer.bias": (48,), "patch.weight": (8, 4, 1, 2, 2),
                              "norm.weight": (6, 5)}  # fmt: skip
    assert state.dtypes()["patch.weight"] == torch.float16 and state.dtypes()["layer.weight"] == torch.float32
    assert state.meta_state_dict()["layer.weight"].shape == (48, 64) and state.metadata["general.name"] == "tiny"
    expected = gguf.quants.dequantize(gguf.quants.quantize(weight, T.Q8_0), T.Q8_0)
    np.testing.assert_array_equal(state["layer.weight"].numpy(), expected)
    np.testing.assert_array_equal(state["patch.weight"].numpy(), conv)
    torch.testing.assert_close(state["norm.weight"], bf16, rtol=0, atol=0)


def test_an_unsupported_type_is_an_error_naming_the_file_and_the_tensor(tmp_path):
    blocks = np.zeros((4, 18), dtype=np.uint8)  # IQ4_NL: 32 values in 18 bytes, which we do not decode
    path = helpers.write_gguf(tmp_path / "iq.gguf", {"blocks.0.attn.weight": (blocks, T.IQ4_NL)})
    with pytest.raises(CheckpointError, match=r"iq\.gguf: tensor 'blocks.0.attn.weight' is stored as IQ4_NL"):
        open_checkpoint(str(path))


def test_gguf_linear_computes_what_a_plain_linear_with_the_dequantized_weight_computes():
    raw = random_blocks("Q4_K", 6, seed=4)  # 3 rows of 512 values
    layer = GGUFLinear(512, 3, bias=True, qtype="Q4_K", device="meta")
    layer.weight = nn.Parameter(torch.from_numpy(raw).reshape(3, -1), requires_grad=False)
    layer.bias = nn.Parameter(torch.randn(3), requires_grad=False)
    x = torch.randn(2, 512, generator=torch.Generator().manual_seed(5))
    reference = torch.from_numpy(gguf.quants.dequantize(raw.reshape(3, -1), T.Q4_K))
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, reference, layer.bias), rtol=0, atol=0)
    assert layer(x.to(torch.bfloat16)).dtype == torch.bfloat16
    plain = dequantize_model(nn.Sequential(layer))[0]
    assert type(plain) is nn.Linear and torch.equal(plain.weight, reference)


# ----------------------------------------------------------------------------------- through a pipeline
PROMPT = "a red circle on a blue background"
FAST = {"height": 32, "width": 32, "num_inference_steps": 2, "progress_bar": False, "output_type": "pt", "seed": 0}
OTHERS = {"vae": "vae/diffusion_pytorch_model.safetensors", "text_encoder": "text_encoder/model.safetensors"}


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory) -> Path:
    """The tiny random Z-Image repo the z-image package's tests build (one builder, not a copy), with its DiT
    also as `gguf/dit.gguf` (2-D weights with whole rows of blocks as Q8_0 and Q4_0 in turn, the rest F32) and as
    `dequantized/` (the same tensors dequantized by the numpy reference, as safetensors)."""
    pytest.importorskip("diffsynth.z_image")
    from safetensors.torch import load_file, save_file

    conftest = Path(__file__).parents[2] / "z-image" / "tests" / "conftest.py"
    spec = importlib.util.spec_from_file_location("z_image_tiny_repo_gguf", conftest)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    root = module.build_tiny_repo(tmp_path_factory.mktemp("tiny-z-image-gguf"))
    state = load_file(str(root / "transformer" / "diffusion_pytorch_model.safetensors"))
    tensors, dense = {}, {}
    for i, (key, value) in enumerate(sorted(state.items())):
        array = value.float().numpy()
        if value.dim() == 2 and value.shape[1] % 32 == 0:
            qtype = (T.Q8_0, T.Q4_0)[i % 2]
            packed = gguf.quants.quantize(array, qtype)
            tensors[key] = (packed, qtype)
            dense[key] = torch.from_numpy(gguf.quants.dequantize(packed, qtype).copy())
        else:
            tensors[key] = (array, None)
            dense[key] = value.float()
    for folder in ("gguf", "dequantized"):
        (root / folder).mkdir()
        shutil.copy(root / "transformer" / "config.json", root / folder / "config.json")
    helpers.write_gguf(root / "gguf" / "dit.gguf", tensors)
    save_file(dense, str(root / "dequantized" / "diffusion_pytorch_model.safetensors"))
    return root


def pipeline(root: Path, dit: str, **options):
    from diffsynth.z_image import ZImagePipeline

    configs = [ModelConfig(path=str(root / dit))] + [ModelConfig(path=str(root / p)) for p in OTHERS.values()]
    return ZImagePipeline.from_pretrained(
        model_configs=configs, tokenizer_config=ModelConfig(path=str(root / "tokenizer")), device="cpu",
        torch_dtype="bfloat16", **options,
    )  # fmt: skip


def lora_state(model: nn.Module, names: list[str], rank: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    state = {}
    for name in names:
        module = model.get_submodule(name)
        state[f"{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=g) * 0.3
        state[f"{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=g) * 0.3
    return state


def test_a_gguf_dit_runs_packed_and_draws_the_image_of_its_dequantized_weights(tiny_repo, monkeypatch):
    monkeypatch.delenv(MODE_ENV, raising=False)
    pipe = pipeline(tiny_repo, "gguf/dit.gguf")
    linears = [m for m in pipe.dit.modules() if isinstance(m, nn.Linear)]
    packed = {n: m for n, m in pipe.dit.named_modules() if isinstance(m, GGUFLinear)}
    assert {m.qtype for m in packed.values()} == {"Q8_0", "Q4_0"} and 0 < len(packed) < len(linears)
    assert all(m.weight.dtype == torch.uint8 for m in packed.values())
    assert quantize_config(pipe.dit).method == "gguf" and quantize_config(pipe.vae) is None
    others = [p for n, p in pipe.dit.named_parameters() if n[: -len(".weight")] not in packed]
    assert all(p.dtype == torch.bfloat16 for p in others if p.is_floating_point())  # the rest in the pipeline dtype
    out = pipe(PROMPT, **FAST)
    plain = pipeline(tiny_repo, "dequantized")
    assert not any(isinstance(m, GGUFLinear) for m in plain.dit.modules())
    torch.testing.assert_close(out, plain(PROMPT, **FAST), rtol=0, atol=0)

    # a LoRA on the packed layers (asked to fuse: kept apart, a packed block cannot take a delta) equals it on
    # the dequantized model's
    assert all(is_quantized_linear(m) for m in packed.values())
    name = sorted(packed)[0]
    plain_weight = plain.dit.get_submodule(name).weight  # the dequantized values in the pipeline's bfloat16
    assert torch.equal(linear_weight(packed[name]).to(plain_weight.dtype), plain_weight)
    names = sorted(packed)[:6]
    state = lora_state(pipe.dit, names)
    pipe.load_lora(state, scale=0.8)
    assert list_loras(pipe.dit)  # attached, not fused
    apply_lora(plain.dit, state, scale=0.8, fuse=False)
    with_lora = pipe(PROMPT, **FAST)
    torch.testing.assert_close(with_lora, plain(PROMPT, **FAST), rtol=0, atol=0)
    assert (with_lora - out).abs().max() > 1e-3

    # the fallback: everything dequantized at load, plain Linears, the same image
    monkeypatch.setenv(MODE_ENV, "dequantize")
    dense = pipeline(tiny_repo, "gguf/dit.gguf")
    assert not any(isinstance(m, GGUFLinear) for m in dense.dit.modules()) and quantize_config(dense.dit) is None
    torch.testing.assert_close(dense(PROMPT, **FAST), out, rtol=0, atol=0)


def test_a_packed_gguf_dit_moves_whole_beside_block_managed_models(tiny_repo, monkeypatch):
    monkeypatch.delenv(MODE_ENV, raising=False)
    managed = pipeline(tiny_repo, "gguf/dit.gguf", vram_limit=1e-6)
    assert set(managed.vram_handles) == {"vae", "text_encoder"}
    torch.testing.assert_close(managed(PROMPT, **FAST), pipeline(tiny_repo, "gguf/dit.gguf")(PROMPT, **FAST))


def test_gguf_errors_name_the_file_and_the_tensor(tiny_repo, tmp_path, monkeypatch):
    from diffsynth.z_image import ZImagePipeline

    monkeypatch.delenv(MODE_ENV, raising=False)
    reader = open_checkpoint(str(tiny_repo / "gguf" / "dit.gguf"))
    key = next(k for k in reader if k.endswith("attention.norm_q.weight"))
    tensors = {k: (reader[k].numpy(), None) for k in reader}
    tensors[key] = (tensors[key][0][:-1].copy(), None)  # one value short
    (tmp_path / "bad").mkdir()
    shutil.copy(tiny_repo / "gguf" / "config.json", tmp_path / "bad" / "config.json")
    bad = helpers.write_gguf(tmp_path / "bad" / "dit.gguf", tensors)
    with pytest.raises(CheckpointError, match=rf"bad/dit\.gguf.*shape mismatches: '{key}'"):
        ZImagePipeline.from_pretrained(model_configs=[ModelConfig(path=str(bad))], device="cpu")
    quantized = ModelConfig(path=str(tiny_repo / "gguf" / "dit.gguf"), quantize="bitsandbytes_nf4")
    with pytest.raises(ConfigError, match=r"dit\.gguf is a GGUF file, quantized already \(.*Q4_0.*\); drop quantize"):
        ZImagePipeline.from_pretrained(model_configs=[quantized], device="cpu")
    monkeypatch.setenv(MODE_ENV, "fast")
    with pytest.raises(ConfigError, match=f"GGUF mode 'fast' .*{MODE_ENV}.* must be one of"):
        ZImagePipeline.from_pretrained(model_configs=[ModelConfig(path=str(bad))], device="cpu")


def test_quantize_by_slot_on_a_gguf_model_names_the_gguf_file(tiny_repo, monkeypatch):
    """`from_pretrained(quantize={"dit": ...})` on a GGUF DiT blamed "its ModelConfig's quantize", which was unset."""
    monkeypatch.delenv(MODE_ENV, raising=False)
    with pytest.raises(
        ConfigError, match=r"slot 'dit', whose model is quantized already: .*dit\.gguf'\) is a GGUF file"
    ):
        pipeline(tiny_repo, "gguf/dit.gguf", quantize={"dit": "bitsandbytes_nf4"})


def test_a_flux1_dit_in_bfl_names_loads_packed_and_dequantizes_to_its_reference_weights(tmp_path):
    """city96's FLUX files keep BFL's key names (our layout "original", a pure rename): every Linear whose rows are
    whole blocks is packed (Q4_K where rows hold 256-value blocks, Q5_1 elsewhere), and turned back into plain
    Linears it holds exactly what the plain loader, and the numpy reference, dequantize."""
    pytest.importorskip("diffsynth.flux")
    from diffsynth.flux.flux1.dit import Flux1DiT, Flux1DiTConfig
    from diffsynth.runtime.gguf import load_gguf
    from diffsynth.runtime.loading import load_model
    from diffsynth.runtime.testing.weights import random_weights

    config = Flux1DiTConfig(in_channels=16, out_channels=16, vec_in_dim=24, context_in_dim=32, hidden_size=128,
                            num_heads=1, depth=1, depth_single_blocks=1, axes_dim=(16, 56, 56))  # fmt: skip
    model = random_weights(Flux1DiT(config), 3, scale=0.2, is_norm=lambda name, p: name.endswith(".scale"))
    tensors, reference = {}, {}
    for key, value in model.state_dict().items():
        array = value.float().numpy()
        if value.dim() == 2 and value.shape[1] % 32 == 0:
            if value.shape[1] % 256 == 0:  # gguf.quants cannot quantize K-quants: random valid Q4_K blocks
                qtype = T.Q4_K
                packed = random_blocks("Q4_K", array.size // 256, seed=len(tensors)).reshape(array.shape[0], -1)
            else:
                qtype = T.Q5_1
                packed = gguf.quants.quantize(array, qtype)
            tensors[key] = (packed, qtype)
            reference[key] = torch.from_numpy(gguf.quants.dequantize(packed, qtype).copy())
        else:
            tensors[key] = (array, None)
            reference[key] = value.float()
    path = helpers.write_gguf(tmp_path / "flux1-dev-tiny.gguf", tensors)
    quantization, (loaded,) = load_gguf(str(path), torch_dtype=torch.float32, mode="packed")
    module = loaded.module
    linears = {n for n, m in module.named_modules() if isinstance(m, nn.Linear)}
    packed_layers = {n: m.qtype for n, m in module.named_modules() if isinstance(m, GGUFLinear)}
    assert linears - set(packed_layers) == {"img_in", "vector_in.in_layer"}  # rows of 64 and 24: not whole blocks
    assert set(packed_layers.values()) == {"Q4_K", "Q5_1"} and quantization.types == ("Q4_K", "Q5_1")
    assert quantize_config(module) is quantization
    plain = load_model(str(path), torch_dtype=torch.float32)
    dense = dequantize_model(module).state_dict()
    assert quantize_config(module) is None and set(dense) == set(reference)
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(dense[key], value, rtol=0, atol=0)
        torch.testing.assert_close(value, reference[key], rtol=0, atol=0)
