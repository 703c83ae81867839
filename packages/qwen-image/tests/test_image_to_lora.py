"""Qwen-Image-i2L: the generators against DiffSynth-Studio's class (its git mirror), the released sizes on meta,
the emitted LoRA on a tiny DiT, and `QwenImageI2LPipeline` on tiny files (encoders, i2L models, the tiny repo's
text encoder and processor): merging over images, the Bias LoRA, loading and errors."""

from __future__ import annotations

import ast
import json
import subprocess

import numpy as np
import pytest
import qwen_image_test_dit as T  # loaded by conftest
import torch
from safetensors.torch import save_file

from diffsynth.qwen_image import QwenImagePipeline
from diffsynth.qwen_image.image_to_lora import (
    I2L_SPEC,
    RELEASED,
    QwenImageI2L,
    QwenImageI2LConfig,
    QwenImageI2LPipeline,
    config_from_state,
)
from diffsynth.runtime.errors import ConfigError, LoRAError
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.image_to_lora import crop_resize
from diffsynth.runtime.lora import load_lora
from diffsynth.runtime.models.lora_generator import merge_loras
from diffsynth.runtime.testing import conformance as cf
from diffsynth.runtime.testing.image_to_lora import (
    STUDIO_MIRROR,
    TINY_FEATURES,
    picture,
    studio_modules,
    without_adapter,
    write_image_encoders,
)
from diffsynth.runtime.testing.image_to_lora import lora_deltas as deltas
from diffsynth.runtime.testing.weights import random_weights

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls: threads only add overhead
MIRROR = STUDIO_MIRROR
# the one place the tiny i2L sizes live: the tiny DiT's widths (test_dit), the tiny encoders' features, the
# released rank (files give only rank x width: a file of another rank needs it in a config.json)
TINY = dict(num_blocks=2, dim=32, features=TINY_FEATURES, compress_dim=4, rank=4, residual_dim=32, residual_mid_dim=3)


def tiny_i2l(variant: str, residual_length: int = 5, seed: int = 0) -> QwenImageI2L:
    config = QwenImageI2LConfig(variant=variant, residual_length=residual_length, **TINY)
    return random_weights(QwenImageI2L(config), seed).eval()


# ----------------------------------------------------------------------------------------- DiffSynth-Studio
@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    """DiffSynth-Studio's i2L module and its `merge_lora`, from its git mirror (both need torch alone)."""
    sources = {"models/qwen_image_image2lora.py": "image2lora", "utils/lora/merge.py": "merge"}
    with studio_modules(tmp_path_factory.mktemp("studio-i2l"), "studio_qwen_i2l", sources) as modules:
        yield modules


@pytest.mark.parametrize("use_residual", [False, True])
def test_generator_matches_diffsynth_studio(studio, use_residual):
    """Their class (released widths, 2 blocks a group) loads strictly into ours; one image gives their LoRA
    exactly, two give their per-image LoRAs merged by their `merge_lora`."""
    module, merge = studio
    torch.manual_seed(0)
    kwargs = dict(num_blocks=2, compress_dim=4, rank=2, residual_length=5, residual_mid_dim=3)
    theirs = module.QwenImageImage2LoRAModel(use_residual=use_residual, **kwargs).eval()
    state = theirs.state_dict()
    config = config_from_state(state, {"rank": 2, "variant": "coarse"} if use_residual else {"rank": 2})
    assert config.variant == ("coarse" if use_residual else "style") and (config.num_blocks, config.dim) == (2, 3072)
    ours = QwenImageI2L(config).eval()
    ours.load_state_dict(state, strict=True)
    x = torch.randn(2, 5632)
    residual = torch.randn(2, 5, 3584) if use_residual else None
    with torch.no_grad():
        want = [
            theirs(x=x[i : i + 1], residual=None if residual is None else residual[i : i + 1].reshape(1, -1))
            for i in range(2)
        ]
        one = ours(x[:1], None if residual is None else residual[:1])
        both = ours(x, residual)
    assert one.keys() == without_adapter(want[0]).keys() and len(one) == 2 * 12 * 2
    for key, value in without_adapter(want[0]).items():
        assert torch.equal(one[key], value), key
    merged = without_adapter(merge.merge_lora(want, alpha=0.5))
    ours_merged = merge_loras([both], 0.5)
    for key, value in merged.items():
        torch.testing.assert_close(ours_merged[key], value, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("size", [(97, 61), (1500, 900), (300, 3000)])
def test_crop_matches_diffsynth_studio(size):
    """`crop_resize` gives DiffSynth-Studio's `ImageCropAndResize` pixels (its method, run with torchvision)."""
    torchvision = pytest.importorskip("torchvision", reason="DiffSynth-Studio's crop runs through torchvision")
    if not (MIRROR / "HEAD").exists() and not (MIRROR / ".git").exists():
        pytest.skip("the DiffSynth-Studio git mirror is not on this machine")
    source = subprocess.run(
        ["git", "-C", str(MIRROR), "show", "HEAD:diffsynth/core/data/operators.py"], capture_output=True, text=True
    ).stdout
    cls = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == "ImageCropAndResize")
    method = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "crop_and_resize")
    namespace = {"torchvision": torchvision}
    exec(compile(ast.Module([method], []), "operators.py", "exec"), namespace)  # noqa: S102 (their method, in a test)
    image = picture(5, size)
    for side in (1024, 224):
        want = np.asarray(namespace["crop_and_resize"](None, image, side, side))
        assert np.array_equal(np.asarray(crop_resize(image, side, side)), want)


def test_released_sizes_on_meta(request):
    """Style, Coarse and Fine: our spec derives each released config from its own meta state dict, and, where the
    mirror is, DiffSynth-Studio's class built as its model configs build them has the same keys and shapes."""
    kwargs = {
        "style": dict(compress_dim=64, use_residual=False),
        "coarse": {},
        "fine": dict(residual_length=1376, residual_mid_dim=64),
    }
    module = request.getfixturevalue("studio")[0] if MIRROR.exists() else None
    with torch.device("meta"):
        for variant, extra in kwargs.items():
            ours = QwenImageI2L(RELEASED[variant]).state_dict()
            assert I2L_SPEC.match(ours) is not None and config_from_state(ours, None) == RELEASED[variant]
            if module is not None and variant != "coarse":  # Coarse is Fine's layout at other sizes
                theirs = module.QwenImageImage2LoRAModel(**extra).state_dict()
                assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


def test_generator_conformance(tmp_path):
    x, residual = torch.randn(2, TINY_FEATURES), torch.randn(2, 5, 32)

    def factory():
        return tiny_i2l("coarse")

    cf.check_declared_units(factory)
    cf.check_meta_load(factory, (x, residual))
    cf.check_streamed(factory, (x, residual), tmp_path, min_units=8)
    cf.check_layout_roundtrip(factory, I2L_SPEC.layouts[0])


# ----------------------------------------------------------------------------------------- the LoRA on the DiT
def test_emitted_lora_loads_onto_the_dit_and_changes_it():
    dit = T.make_model(T.tiny_config(num_layers=TINY["num_blocks"])).eval()
    assert dit.config.inner_dim == TINY["dim"]
    lora = tiny_i2l("fine")(torch.randn(3, TINY_FEATURES), torch.randn(3, 5, 32))
    linears = {
        n for n, m in dit.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("transformer_blocks")
    }
    targets = set(deltas(lora))
    assert targets <= linears and len(targets) == 12 * TINY["num_blocks"]
    args = T.inputs()
    with torch.no_grad():
        before = dit(*args)
        name = load_lora(dit, lora, fuse=False)  # strict: an unmatched key would raise
        after = dit(*args)
    assert name is not None and not torch.allclose(before, after)


# ----------------------------------------------------------------------------------------- pipeline
@pytest.fixture(scope="module")
def files(tiny_repo, tmp_path_factory):
    """Tiny encoders and a Style file in the released layouts (the Style config from shapes alone)."""
    root = tmp_path_factory.mktemp("tiny-qwen-i2l")
    siglip, dinov3 = write_image_encoders(root)
    save_file({k: v.contiguous() for k, v in tiny_i2l("style").state_dict().items()}, str(root / "style.safetensors"))
    return root, [ModelConfig(path=str(siglip)), ModelConfig(path=str(dinov3))]


@pytest.fixture(scope="module")
def pipe(files, tiny_repo):
    """Encoders, Style, and (from a folder with a config.json saying `variant`) Coarse; Fine put in its slot;
    the tiny repo's text encoder and processor. Residual lengths are what the tiny tokenizer gives."""
    root, encoders = files
    configs = [
        *encoders,
        ModelConfig(path=str(root / "style.safetensors")),
        ModelConfig(path=str(tiny_repo / "text_encoder")),
    ]
    pipe = QwenImageI2LPipeline.from_pretrained(
        model_configs=configs,
        processor_config=ModelConfig(path=str(tiny_repo / "processor")),
        torch_dtype="float32",
        device="cpu",
    )
    lengths = {size: pipe.image_tokens(crop_resize(picture(0), size, size)).shape[0] for size in (224, 1024)}
    coarse = root / "coarse"
    coarse.mkdir(exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in tiny_i2l("coarse", lengths[224], 1).state_dict().items()},
        str(coarse / "model.safetensors"),
    )
    (coarse / "config.json").write_text(json.dumps({"variant": "coarse", "rank": TINY["rank"]}))
    pipe.load_models_to_device([])
    pipe._load_config(ModelConfig(path=str(coarse / "model.safetensors")))
    pipe.image2lora_fine = tiny_i2l("fine", lengths[1024], 2)
    return pipe


def test_pipeline_loads_each_model_into_its_slot(pipe):
    assert pipe.image2lora_style.config.variant == "style" and pipe.image2lora_coarse.config.variant == "coarse"
    assert [slot for slot, _ in pipe.check_models()] == ["image2lora_style", "image2lora_coarse", "image2lora_fine"]


def test_several_images_give_the_mean_of_their_loras(pipe):
    """Ranks concatenate over the three models and the images; the weight change is the images' mean."""
    images = [picture(1), picture(2, (40, 90))]
    both = pipe.image_to_lora(images)
    ones = [pipe.image_to_lora(image) for image in images]
    assert all(v.device.type == "cpu" for v in both.values())
    assert both["transformer_blocks.0.attn.to_q.lora_A.weight"].shape == (3 * 2 * TINY["rank"], TINY["dim"])
    first, second = deltas(ones[0]), deltas(ones[1])
    for name, delta in deltas(both).items():
        torch.testing.assert_close(delta, (first[name] + second[name]) / 2, atol=1e-6, rtol=1e-4)
    dit = T.make_model(T.tiny_config(num_layers=TINY["num_blocks"]))
    load_lora(dit, both)


def test_bias_lora_is_appended_at_weight_one(pipe, tmp_path):
    image = picture(3)
    plain = pipe.image_to_lora(image, bias_lora=False)
    bias = {k.replace(".weight", ".default.weight"): torch.randn_like(v) for k, v in plain.items()}  # their key form
    save_file(bias, str(tmp_path / "bias.safetensors"))
    pipe.defaults["bias_lora"] = ModelConfig(path=str(tmp_path / "bias.safetensors"))  # as a preset names it
    try:
        with_bias = pipe.image_to_lora(image)
        assert deltas(pipe.image_to_lora(image, bias_lora=False)).keys() == deltas(plain).keys()
    finally:
        del pipe.defaults["bias_lora"]
    extra = deltas(without_adapter(bias))
    for name, delta in deltas(with_bias).items():
        torch.testing.assert_close(delta, deltas(plain)[name] + extra[name], atol=1e-5, rtol=1e-4)
    foreign = {
        "layers.0.attention.to_q.lora_A.weight": torch.zeros(2, 32),
        "layers.0.attention.to_q.lora_B.weight": torch.zeros(32, 2),
    }
    with pytest.raises(LoRAError, match="layers.0.attention.to_q"):
        pipe.image_to_lora(image, bias_lora=foreign)


# ----------------------------------------------------------------------------------------- errors and presets
def test_input_and_model_errors(pipe, files):
    root, encoders = files
    with pytest.raises(ConfigError, match="at least one image"):
        pipe.image_to_lora([])
    with pytest.raises(ConfigError, match="image_to_lora"):
        pipe("a cat")
    with pytest.raises(ConfigError, match="no image-to-LoRA model"):
        QwenImageI2LPipeline.from_pretrained(model_configs=encoders, torch_dtype="float32", device="cpu")
    without_text = QwenImageI2LPipeline(device="cpu", torch_dtype="float32")
    without_text.siglip2_image_encoder, without_text.dinov3_image_encoder = (
        pipe.siglip2_image_encoder,
        pipe.dinov3_image_encoder,
    )
    without_text.image2lora_coarse = pipe.image2lora_coarse
    with pytest.raises(ConfigError, match="text encoder"):
        without_text.image_to_lora(picture(0))
    without_text.text_encoder = pipe.text_encoder
    with pytest.raises(ConfigError, match="processor"):
        without_text.image_to_lora(picture(0))
    state = {k: v.to("meta") for k, v in tiny_i2l("coarse", residual_length=9).state_dict().items()}
    with pytest.raises(ConfigError, match="variant"):
        config_from_state(state, {"rank": 2})


def test_cli_writes_the_lora_of_the_images(files, tmp_path, monkeypatch, capsys):
    """`diffsynth generate --model <i2L> --lora-image ... --output x.safetensors` saves `image_to_lora`'s LoRA."""
    from safetensors.torch import load_file

    from diffsynth.runtime import cli

    root, encoders = files
    made = QwenImageI2LPipeline.from_pretrained(
        model_configs=[*encoders, ModelConfig(path=str(root / "style.safetensors"))], torch_dtype="float32",
        device="cpu",
    )  # fmt: skip
    monkeypatch.setattr(QwenImageI2LPipeline, "from_pretrained", classmethod(lambda cls, *a, **k: made))
    paths = []
    for seed in (1, 2):
        picture(seed).save(tmp_path / f"{seed}.png")
        paths += ["--lora-image", str(tmp_path / f"{seed}.png")]
    out = tmp_path / "style.safetensors"
    args = ["generate", "--model", "DiffSynth-Studio/Qwen-Image-i2L:style", *paths, "--output", str(out)]
    assert cli.main(args) == 0
    want = made.image_to_lora([str(tmp_path / "1.png"), str(tmp_path / "2.png")])
    got = load_file(str(out))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert cli.main([*args[:3], "--output", str(out)]) == 2
    assert "--lora-image" in capsys.readouterr().err
    assert cli.main([*args[:-1], str(tmp_path / "style.png")]) == 2
    assert ".safetensors file" in capsys.readouterr().err


def test_presets_name_the_i2l_files_and_pipeline():
    style = QwenImageI2LPipeline._preset("DiffSynth-Studio/Qwen-Image-i2L:style")
    patterns = {f.origin_file_pattern for f in style.files}
    assert patterns == {
        "SigLIP2-G384/model.safetensors",
        "DINOv3-7B/model.safetensors",
        "Qwen-Image-i2L-Style.safetensors",
    }
    both = QwenImageI2LPipeline._preset("DiffSynth-Studio/Qwen-Image-i2L:coarse-fine")
    assert {"text_encoder/*.safetensors*", "Qwen-Image-i2L-Coarse.safetensors", "Qwen-Image-i2L-Fine.safetensors"} <= {
        f.origin_file_pattern for f in both.files
    }
    assert both.defaults["bias_lora"].origin_file_pattern == "Qwen-Image-i2L-Bias.safetensors"
    assert both.tokenizer.origin_file_pattern == "processor/" and both.pipeline_class() is QwenImageI2LPipeline
    with pytest.raises(ConfigError, match="QwenImagePipeline preset"):
        QwenImagePipeline.from_pretrained("DiffSynth-Studio/Qwen-Image-i2L:style")
    with pytest.raises(ConfigError, match="Qwen-Image-i2L:style"):
        QwenImageI2LPipeline.from_pretrained("DiffSynth-Studio/Qwen-Image-i2L")
