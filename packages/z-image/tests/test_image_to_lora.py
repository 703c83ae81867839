"""Z-Image-i2L: the generator against DiffSynth-Studio's class (its git mirror), the released sizes on meta, the
emitted LoRA on the tiny repo's DiT, `ZImageI2LPipeline` on tiny files, and `positive_only_lora`."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.loading import load_model
from diffsynth.runtime.lora import clear_loras, list_loras, load_lora
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
from diffsynth.z_image import ZImagePipeline
from diffsynth.z_image.image_to_lora import I2L_SPEC, ZImageI2L, ZImageI2LConfig, ZImageI2LPipeline, config_from_state

MIRROR = STUDIO_MIRROR
FAST = dict(num_inference_steps=2, height=64, width=64, seed=0, output_type="pt", progress_bar=False)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls: intra-op threads only add scheduling overhead on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_dit(tiny_repo):
    """The tiny repo's DiT (its sizes live in conftest)."""
    return load_model(tiny_repo / "transformer", torch_dtype=torch.float32)


def tiny_i2l(dit_config, seed: int = 0) -> ZImageI2L:
    """An i2L generator for the tiny DiT, at the released rank (files give only rank x width)."""
    config = ZImageI2LConfig(
        num_layers=dit_config.n_layers,
        num_refiner_layers=dit_config.n_refiner_layers,
        dim=dit_config.dim,
        ffn_dim=dit_config.ffn_dim,
        features=TINY_FEATURES,
        compress_dim=4,
    )
    return random_weights(ZImageI2L(config), seed).eval()


# ----------------------------------------------------------------------------------------- DiffSynth-Studio
@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    """DiffSynth-Studio's Z-Image i2L module (and the Qwen-Image one it imports), and its `merge_lora`."""
    sources = {
        "models/qwen_image_image2lora.py": "qwen_image_image2lora",
        "models/z_image_image2lora.py": "z_image_image2lora",
        "utils/lora/merge.py": "merge",
    }
    with studio_modules(tmp_path_factory.mktemp("studio-z-i2l"), "studio_z_i2l", sources) as (_, module, merge):
        yield module, merge


def test_generator_matches_diffsynth_studio(studio):
    """Their class (released block counts and widths, narrow 2, rank 1) loads strictly into ours; one image gives
    their LoRA exactly, two their per-image LoRAs merged by their `merge_lora`."""
    module, merge = studio
    torch.manual_seed(0)
    theirs = module.ZImageImage2LoRAModel(compress_dim=2, rank=1).eval()
    state = theirs.state_dict()
    config = config_from_state(state, {"rank": 1})
    assert config == ZImageI2LConfig(compress_dim=2, rank=1)
    ours = ZImageI2L(config).eval()
    ours.load_state_dict(state, strict=True)
    x = torch.randn(2, 5632)
    with torch.no_grad():
        want = [theirs(x=x[i : i + 1]) for i in range(2)]
        one, both = ours(x[:1]), ours(x)
    assert one.keys() == without_adapter(want[0]).keys() and len(one) == 2 * 7 * 34
    for key, value in without_adapter(want[0]).items():
        assert torch.equal(one[key], value), key
    merged = merge_loras([both], 0.5)
    for key, value in without_adapter(merge.merge_lora(want, alpha=0.5)).items():
        torch.testing.assert_close(merged[key], value, atol=1e-6, rtol=1e-5)


def test_released_size_on_meta(request):
    """Our spec derives the released config from its meta state dict; where the mirror is, DiffSynth-Studio's
    class as its model config builds it (compress_dim 128) has the same keys and shapes."""
    module = request.getfixturevalue("studio")[0] if MIRROR.exists() else None
    with torch.device("meta"):
        ours = ZImageI2L().state_dict()
        assert I2L_SPEC.match(ours) is not None and config_from_state(ours, None) == ZImageI2LConfig()
        if module is not None:
            theirs = module.ZImageImage2LoRAModel(compress_dim=128).state_dict()
            assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


def test_generator_conformance(tiny_dit, tmp_path):
    x = torch.randn(2, TINY_FEATURES)

    def factory():
        return tiny_i2l(tiny_dit.config)

    cf.check_declared_units(factory)
    cf.check_meta_load(factory, (x,))
    cf.check_streamed(factory, (x,), tmp_path, min_units=3)
    cf.check_layout_roundtrip(factory, I2L_SPEC.layouts[0])
    assert cf.check_spec_config(I2L_SPEC, factory) == factory().config


# ----------------------------------------------------------------------------------------- pipeline
@pytest.fixture(scope="module")
def i2l(tiny_dit, tmp_path_factory):
    """`ZImageI2LPipeline` from tiny files in the released layouts (the generator's config from its shapes)."""
    root = tmp_path_factory.mktemp("tiny-z-i2l")
    siglip, dinov3 = write_image_encoders(root)
    state = {k: v.contiguous() for k, v in tiny_i2l(tiny_dit.config).state_dict().items()}
    save_file(state, str(root / "model.safetensors"))
    configs = [ModelConfig(path=str(p)) for p in (siglip, dinov3, root / "model.safetensors")]
    return ZImageI2LPipeline.from_pretrained(model_configs=configs, torch_dtype="float32", device="cpu")


def test_lora_of_several_images_is_their_mean_and_loads_onto_the_dit(i2l, tiny_dit):
    images = [picture(1), picture(2, (40, 90))]
    both = i2l.image_to_lora(images)
    first, second = (deltas(i2l.image_to_lora(image)) for image in images)
    for name, delta in deltas(both).items():
        torch.testing.assert_close(delta, (first[name] + second[name]) / 2, atol=1e-6, rtol=1e-4)
    blocks = ("layers.", "context_refiner.", "noise_refiner.")
    linears = {n for n, m in tiny_dit.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(blocks)}
    assert set(deltas(both)) == {n for n in linears if "adaLN" not in n}
    load_lora(tiny_dit, both, fuse=False, name="check")  # strict: an unmatched key would raise
    clear_loras(tiny_dit)


def test_positive_only_lora_acts_on_the_conditional_branch(tiny_repo, i2l):
    pipe = ZImagePipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu")
    lora = {k: v * 50 for k, v in i2l.image_to_lora(picture(3)).items()}  # large, so that the change shows
    prompt = "a red circle on a blue background"
    plain = pipe(prompt, cfg_scale=1.0, **FAST)
    pipe.load_lora(lora, fuse=False, name="both")
    with_lora = pipe(prompt, cfg_scale=1.0, **FAST)
    guided_both = pipe(prompt, negative_prompt="bad quality", cfg_scale=3.0, **FAST)
    pipe.clear_loras()
    # without guidance there is only the conditional branch: the same as the LoRA on the whole model
    torch.testing.assert_close(pipe(prompt, cfg_scale=1.0, positive_only_lora=lora, **FAST), with_lora)
    assert not torch.allclose(with_lora, plain, atol=1e-3) and not list_loras(pipe.dit)
    guided = pipe(prompt, negative_prompt="bad quality", cfg_scale=3.0, positive_only_lora=lora, **FAST)
    assert not torch.allclose(guided, guided_both, atol=1e-3) and not list_loras(pipe.dit)
    # DiffSynth-Studio's names: `lora` is positive_only_lora; `negative_lora` the unconditional branch's
    negative = {"negative_prompt": "bad quality", "cfg_scale": 3.0}
    torch.testing.assert_close(pipe(prompt, lora=lora, **negative, **FAST), guided, rtol=0, atol=0)
    torch.testing.assert_close(pipe(prompt, cfg_scale=1.0, negative_lora=lora, **FAST), plain, rtol=0, atol=0)
    # a LoRA on each branch is the LoRA on the whole model (the branches run apart instead of batched)
    both = pipe(prompt, positive_only_lora=lora, negative_lora=lora, **negative, **FAST)
    torch.testing.assert_close(both, guided_both, rtol=1e-4, atol=1e-5)
    only_negative = pipe(prompt, negative_lora=lora, **negative, **FAST)
    assert not torch.allclose(only_negative, guided, atol=1e-3) and not list_loras(pipe.dit)
    with pytest.raises(ConfigError, match="not both"):
        pipe(prompt, lora=lora, positive_only_lora=lora, **FAST)


# ----------------------------------------------------------------------------------------- errors and presets
def test_errors_and_presets(i2l, tmp_path):
    with pytest.raises(ConfigError, match="at least one image"):
        i2l.image_to_lora(None)
    with pytest.raises(ConfigError, match="positive_only_lora"):
        i2l("a cat")
    encoders = write_image_encoders(tmp_path)
    with pytest.raises(ConfigError, match="no image-to-LoRA model"):
        ZImageI2LPipeline.from_pretrained(model_configs=[ModelConfig(path=str(p)) for p in encoders], device="cpu")
    for repo in ("DiffSynth-Studio/Z-Image-i2L", "DiffSynth-Studio/Z-Image-Omni-Base-i2L"):
        preset = ZImageI2LPipeline._preset(repo)
        assert {(f.model_id, f.origin_file_pattern) for f in preset.files} == {
            ("DiffSynth-Studio/General-Image-Encoders", "SigLIP2-G384/model.safetensors"),
            ("DiffSynth-Studio/General-Image-Encoders", "DINOv3-7B/model.safetensors"),
            (repo, "model.safetensors"),
        }
        assert preset.pipeline_class() is ZImageI2LPipeline
    with pytest.raises(ConfigError, match="Z-Image-i2L"):
        ZImageI2LPipeline.from_pretrained("Tongyi-MAI/Z-Image")
