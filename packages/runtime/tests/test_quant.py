"""Weight-only 4-bit quantization (`quant.py`, bitsandbytes NF4 / FP4): the rounding stays within the format's
bound, the 4-bit layers compute exactly what plain Linears holding the rounded weights compute, LoRAs attach to
them and train through them, and a pipeline loads a quantized model from `ModelConfig(quantize=...)` and runs it,
alone or beside block-managed models."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.lora import apply_lora, list_loras
from diffsynth.runtime.quant import QuantizeConfig, is_quantized_linear, linear_weight, quantize_config
from diffsynth.runtime.testing.modules import load_beside

pytest.importorskip("bitsandbytes")

helpers = load_beside(__file__, "helpers.py", "diffsynth_runtime_test_helpers")

# NF4's 16 levels (QLoRA, Dettmers et al. 2023) over [-1, 1]; a weight is rounded to the nearest level times its
# block's absmax, so its error is at most half the widest gap times that absmax
NF4_LEVELS = torch.tensor(
    [-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0, 0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626,
     0.7230, 1.0]
)  # fmt: skip
NF4_HALF_GAP = float((NF4_LEVELS[1:] - NF4_LEVELS[:-1]).max()) / 2


def tiny(dtype=torch.float32) -> nn.Module:
    return helpers.tiny(dtype, embedding=True)  # the embedding must stay unquantized


def test_rounding_stays_within_the_nf4_bound_per_block():
    model = tiny()
    weight = model.blocks[0]["proj"].weight.clone()
    QuantizeConfig(method="bitsandbytes_nf4", backend_config_kwargs={"compress_statistics": False}).quantize_model(
        model
    )
    layer = model.blocks[0]["proj"]
    assert is_quantized_linear(layer) and isinstance(layer, nn.Linear)
    rounded = linear_weight(layer)
    assert rounded.shape == weight.shape and rounded.dtype == weight.dtype
    blocks = weight.flatten().unflatten(0, (-1, 64))  # bitsandbytes' default blocksize
    error = (rounded.flatten().unflatten(0, (-1, 64)) - blocks).abs()
    bound = NF4_HALF_GAP * blocks.abs().amax(1, keepdim=True) * (1 + 1e-3)
    assert (error <= bound).all(), (error / bound).max()
    assert error.max() > 0  # it did round
    stored = layer.weight.numel() * layer.weight.element_size()
    assert stored == weight.numel() // 2  # two weights a byte


@pytest.mark.parametrize("method", ["bitsandbytes_nf4", "bitsandbytes_fp4"])
def test_4bit_layers_compute_what_plain_layers_with_the_rounded_weights_compute(method):
    model = QuantizeConfig(method=method).quantize_model(tiny(torch.bfloat16))
    plain = QuantizeConfig(method=method, mode="dequant_once").quantize_model(tiny(torch.bfloat16))
    assert all(type(m) is nn.Linear for m in plain.modules() if isinstance(m, nn.Linear))
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    out = model(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, plain(x), rtol=0, atol=0)
    reference = tiny(torch.bfloat16)(x)
    assert 0 < (out - reference).abs().max() < 0.25 * reference.abs().max()
    assert quantize_config(model).method == method and model.embed.weight.dtype == torch.bfloat16


def test_targets_and_excludes_match_dotted_name_endings():
    model = tiny()
    config = QuantizeConfig(method="bitsandbytes_nf4", exclude_modules=["head", "blocks.1.out"])
    assert config.targets(model) == ["blocks.0.proj", "blocks.0.out", "blocks.1.proj"]
    assert QuantizeConfig(method="bitsandbytes_nf4", target_modules="proj").targets(model) == [
        "blocks.0.proj",
        "blocks.1.proj",
    ]
    config.quantize_model(model)
    assert not is_quantized_linear(model.head) and not is_quantized_linear(model.blocks[1]["out"])
    assert is_quantized_linear(model.blocks[1]["proj"])


def test_a_lora_on_4bit_layers_is_kept_apart_and_equals_it_on_the_rounded_weights():
    model = QuantizeConfig(method="bitsandbytes_nf4").quantize_model(tiny())
    plain = QuantizeConfig(method="bitsandbytes_nf4", mode="dequant_once").quantize_model(tiny())
    state = helpers.lora_state(model)
    assert apply_lora(model, state, scale=0.8) is not None  # fuse=True asked: attached instead
    assert list(list_loras(model)) == ["lora_0"]
    apply_lora(plain, state, scale=0.8, fuse=False)
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(model(x), plain(x), rtol=0, atol=1e-6)
    assert (model(x) - QuantizeConfig(method="bitsandbytes_nf4").quantize_model(tiny())(x)).abs().max() > 1e-3


def test_gradients_reach_a_trainable_branch_through_frozen_4bit_layers():
    """QLoRA's premise: the rounded base is frozen, the input's gradient flows through it (the trainer's LoRA
    layers sit on top), and it equals the gradient through plain layers with the rounded weights."""
    model = QuantizeConfig(method="bitsandbytes_nf4").quantize_model(tiny())
    plain = QuantizeConfig(method="bitsandbytes_nf4", mode="dequant_once").quantize_model(tiny())
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(3))
    grads = []
    for net in (model, plain):
        leaf = x.clone().requires_grad_(True)
        net(leaf).pow(2).sum().backward()
        grads.append(leaf.grad)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)
    assert not any(p.requires_grad for p in model.parameters())


def test_clear_errors(monkeypatch):
    with pytest.raises(ConfigError, match="method='int3' is not supported; methods: .*bitsandbytes_nf4"):
        QuantizeConfig(method="int3")
    with pytest.raises(ConfigError, match="mode='fast' must be one of"):
        QuantizeConfig(method="bitsandbytes_nf4", mode="fast")
    with pytest.raises(ConfigError, match=r"backend_config_kwargs \['group_size'\] are not bitsandbytes options"):
        QuantizeConfig(method="bitsandbytes_nf4", backend_config_kwargs={"group_size": 32})
    with pytest.raises(ConfigError, match="blocksize=48"):
        QuantizeConfig(method="bitsandbytes_nf4", backend_config_kwargs={"blocksize": 48})
    with pytest.raises(ConfigError, match="load_prequantized=True\\) describes a checkpoint saved quantized"):
        QuantizeConfig(method="bitsandbytes_nf4", load_prequantized=True).quantize_model(tiny())
    with pytest.raises(ConfigError, match="no nn.Linear of Tiny matches target_modules=\\['attn'\\]"):
        QuantizeConfig(method="bitsandbytes_nf4", target_modules=["attn"]).quantize_model(tiny())
    with pytest.raises(ConfigError, match="quantize must be a QuantizeConfig or a method name"):
        ModelConfig(path="model.safetensors", quantize=4)
    assert ModelConfig(path="model.safetensors", quantize="bitsandbytes_nf4").quantize.method == "bitsandbytes_nf4"
    with pytest.raises(ConfigError, match="float8_e4m3fn Linear .* cannot be quantized"):
        QuantizeConfig(method="bitsandbytes_nf4").quantize_model(tiny().to(torch.float8_e4m3fn))
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    with pytest.raises(ConfigError, match="needs the bitsandbytes package: pip install bitsandbytes"):
        QuantizeConfig(method="bitsandbytes_nf4").quantize_model(tiny())


# ----------------------------------------------------------------------------------- through a pipeline
PROMPT = "a red circle on a blue background"
FAST = {"height": 32, "width": 32, "num_inference_steps": 2, "progress_bar": False, "output_type": "pt", "seed": 0}
FILES = {
    "dit": "transformer/diffusion_pytorch_model.safetensors",
    "vae": "vae/diffusion_pytorch_model.safetensors",
    "text_encoder": "text_encoder/model.safetensors",
}


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory) -> Path:
    return helpers.tiny_z_image_repo(tmp_path_factory.mktemp("tiny-z-image-quant"))


def pipeline(root: Path, quantize, **options):
    from diffsynth.z_image import ZImagePipeline

    configs = [
        ModelConfig(path=str(root / path), quantize=quantize if slot == "dit" else None) for slot, path in FILES.items()
    ]
    return ZImagePipeline.from_pretrained(
        model_configs=configs, tokenizer_config=ModelConfig(path=str(root / "tokenizer")), device="cpu", **options
    )


def test_a_pipeline_runs_a_quantized_dit_as_plain_layers_with_the_rounded_weights(tiny_repo):
    nf4 = QuantizeConfig(method="bitsandbytes_nf4", exclude_modules=["t_embedder.mlp.0"])
    pipe = pipeline(tiny_repo, nf4, torch_dtype="bfloat16")
    linears = [m for m in pipe.dit.modules() if isinstance(m, nn.Linear)]
    quantized = [m for m in linears if is_quantized_linear(m)]
    assert quantize_config(pipe.dit) is nf4 and 0 < len(quantized) == len(linears) - 1
    out = pipe(PROMPT, **FAST)
    rounded = pipeline(tiny_repo, QuantizeConfig(method="bitsandbytes_nf4", mode="dequant_once",
                                                 exclude_modules=["t_embedder.mlp.0"]), torch_dtype="bfloat16")  # fmt: skip
    torch.testing.assert_close(out, rounded(PROMPT, **FAST), rtol=0, atol=0)
    plain = pipeline(tiny_repo, None, torch_dtype="bfloat16")
    full, other_seed = plain(PROMPT, **FAST), plain(PROMPT, **{**FAST, "seed": 1})
    # the rounding shows, and the image is still that seed's: nearer to it than another seed's image is
    assert 0 < (out - full).abs().mean() < (other_seed - full).abs().mean() / 2

    # beside block-managed models (a vram_limit): the 4-bit DiT moves as a whole, the others stream; same output
    managed = pipeline(tiny_repo, nf4, torch_dtype="bfloat16", vram_limit=1e-6)
    assert set(managed.vram_handles) == {"vae", "text_encoder"}
    torch.testing.assert_close(managed(PROMPT, **FAST), out, rtol=0, atol=0)
    report = managed.vram_report()
    assert report["dit"].state == "unmanaged" and report["vae"].bytes_per_step > 0


def test_vram_keys_a_quantized_model_cannot_take_are_refused(tiny_repo):
    from diffsynth.z_image import ZImagePipeline

    config = ModelConfig(path=str(tiny_repo / FILES["dit"]), quantize="bitsandbytes_nf4", offload_dtype="float8_e4m3fn")
    with pytest.raises(ConfigError, match="the dit model is quantized .*offload_dtype.*drop one of the two"):
        ZImagePipeline.from_pretrained(model_configs=[config], torch_dtype="bfloat16", device="cpu")


def test_enable_vram_management_refuses_by_name_what_a_quantized_model_cannot_take(tiny_repo):
    """The same keys given to `enable_vram_management` were dropped in silence for the quantized model (it was
    filtered out), as was the quantized slot named in `slots`."""
    pipe = pipeline(tiny_repo, "bitsandbytes_nf4", torch_dtype="bfloat16")
    with pytest.raises(ConfigError, match=r"the dit model is quantized \(bitsandbytes_nf4\); enable_vram_management "
                       r"also sets \{'offload_device': 'disk'\}.*drop one of the two"):  # fmt: skip
        pipe.enable_vram_management(slots=["dit"], offload_device="disk")
    with pytest.raises(ConfigError, match=r"enable_vram_management for every model \(slots=\['vae', 'text_encoder'\] "
                       r"leaves dit out\) also sets \{'preparing_dtype': torch.float8_e4m3fn\}"):  # fmt: skip
        pipe.enable_vram_management(preparing_dtype="float8_e4m3fn")
    with pytest.raises(ConfigError, match=r"slots=\['dit'\]\): the dit model is quantized .* leave it out of slots"):
        pipe.enable_vram_management(slots=["dit"], vram_limit=0)
    assert not pipe.vram_handles and pipe.vram_limit is None  # refused calls change nothing
    assert set(pipe.enable_vram_management(vram_limit=0)) == {"vae", "text_encoder"}  # all: dit moves whole
    assert set(pipe.enable_vram_management(slots=["vae"], preparing_dtype="float8_e4m3fn")) == {"vae", "text_encoder"}


def test_from_pretrained_quantize_by_slot_equals_the_model_config_route(tiny_repo):
    """`from_pretrained(folder, quantize={"dit": ...})` (presets and folders, whose ModelConfigs are not the
    user's) quantizes the same layers as `ModelConfig(quantize=...)`: the same image."""
    from diffsynth.z_image import ZImagePipeline

    by_slot = ZImagePipeline.from_pretrained(
        str(tiny_repo), torch_dtype="bfloat16", device="cpu", quantize={"dit": "bitsandbytes_nf4"}
    )
    assert quantize_config(by_slot.dit).method == "bitsandbytes_nf4" and quantize_config(by_slot.vae) is None
    by_config = pipeline(tiny_repo, "bitsandbytes_nf4", torch_dtype="bfloat16")
    torch.testing.assert_close(by_slot(PROMPT, **FAST), by_config(PROMPT, **FAST), rtol=0, atol=0)
    with pytest.raises(ConfigError, match="quantize names slot 'unet', which holds no loaded model; loaded: .*dit"):
        ZImagePipeline.from_pretrained(str(tiny_repo), device="cpu", quantize={"unet": "bitsandbytes_nf4"})
    with pytest.raises(ConfigError, match="quantize must map model slots to methods"):
        ZImagePipeline.from_pretrained(str(tiny_repo), device="cpu", quantize="bitsandbytes_nf4")
    # a quantized model names why it is: here its ModelConfig's quantize (a GGUF file: test_gguf.py)
    configs = [
        ModelConfig(path=str(tiny_repo / p), quantize="bitsandbytes_nf4" if s == "dit" else None)
        for s, p in FILES.items()
    ]
    with pytest.raises(ConfigError, match=r"quantized already: ModelConfig\(path=.*\) asks for quantize \(bitsandb"):
        ZImagePipeline.from_pretrained(model_configs=configs, device="cpu", quantize={"dit": "bitsandbytes_fp4"})


def test_cli_quantize_flag_reaches_from_pretrained(monkeypatch):
    from diffsynth.runtime import cli

    seen = {}

    class Stop(Exception):
        pass

    class Recorder:
        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            seen.update(kwargs)
            raise Stop

    monkeypatch.setattr(cli, "_pipeline_class", lambda model: Recorder)
    with pytest.raises(Stop):
        cli.main(["generate", "--model", "x", "--prompt", "a cat", "--device", "cpu", "--quantize", "bitsandbytes_nf4",
                  "--quantize", "text_encoder=bitsandbytes_fp4"])  # fmt: skip
    assert seen["quantize"] == {"dit": "bitsandbytes_nf4", "text_encoder": "bitsandbytes_fp4"}
    seen.clear()
    with pytest.raises(Stop):
        cli.main(["generate", "--model", "x", "--prompt", "a cat", "--device", "cpu"])
    assert "quantize" not in seen  # pipelines are called as before without the flag
    with pytest.raises(ConfigError, match="--quantize names the dit model twice"):
        cli.quantize_options(["bitsandbytes_nf4", "dit=bitsandbytes_fp4"])


def test_cli_quantize_flag_is_checked_before_any_model_loads(monkeypatch, capsys):
    """A wrong method or slot was refused by from_pretrained, after every model had loaded."""
    from diffsynth.runtime import cli
    from diffsynth.runtime.pipeline import BasePipeline

    class ZImagePipeline(BasePipeline):  # a family's slots, without the family package
        model_slots = {"text_encoder": "text_encoder", "dit": "dit", "vae": "vae"}

        def __call__(self, prompt, seed=0):
            raise AssertionError("the pipeline ran")

        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            raise AssertionError("from_pretrained ran")

    monkeypatch.setattr(cli, "_pipeline_class", lambda model: ZImagePipeline)
    run = ["generate", "--model", "x", "--prompt", "a cat", "--device", "cpu", "--quantize"]
    assert cli.main([*run, "foo"]) == 2
    assert "--quantize foo: QuantizeConfig method='foo' is not supported; methods: [" in capsys.readouterr().err
    assert cli.main([*run, "transformer=bitsandbytes_nf4"]) == 2
    err = capsys.readouterr().err
    assert "--quantize transformer=bitsandbytes_nf4: ZImagePipeline has no model slot 'transformer'; slots: [" in err
    assert cli.quantize_options(["vae=bitsandbytes_fp4"], ZImagePipeline) == {"vae": "bitsandbytes_fp4"}
