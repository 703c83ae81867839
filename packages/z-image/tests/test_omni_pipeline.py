"""Z-Image Omni through `ZImagePipeline`: a tiny random Omni repo (the tiny Z-Image repo with an Omni transformer
and a SigLIP2 tower), parity with diffusers' `ZImageOmniPipeline`, the prompt template and the refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffsynth.runtime.errors import ConfigError
from diffsynth.z_image import ZImagePipeline
from diffsynth.z_image.text_encoder import omni_segments

PROMPTS = ["a red circle on a blue background", "a yellow triangle on a black background"]


def edit_images():
    g = np.random.default_rng(3)
    first = Image.fromarray(g.integers(0, 256, (72, 100, 3), dtype=np.uint8))  # cropped to 96x64
    second = Image.fromarray(g.integers(0, 256, (80, 64, 3), dtype=np.uint8))
    return first, second


@pytest.fixture(scope="module")
def pipe(omni_repo):
    return ZImagePipeline.from_pretrained(str(omni_repo), torch_dtype="float32", device="cpu")


def test_omni_repo_loads_every_slot(pipe):
    assert pipe.dit.config.omni and pipe.dit.config.siglip_feat_dim == 24
    assert type(pipe.image_encoder).__name__ == "ZImageImageEncoder"
    assert pipe.image_encoder.config.num_patches == 16 and pipe.image_encoder.config.patch_size == 4


def test_prompt_template_segments():
    assert omni_segments("p", 0) == ["<|im_start|>user\np<|im_end|>\n<|im_start|>assistant\n"]
    assert omni_segments("p", 2) == [
        "<|im_start|>user\n<|vision_start|>",
        "<|vision_end|><|vision_start|>",
        "<|vision_end|>p<|im_end|>\n<|im_start|>assistant\n<|vision_start|>",
        "<|vision_end|><|im_end|>",
    ]


def test_edit_image_sets_the_output_size(pipe):
    out = pipe("a cat", edit_image=edit_images()[0], num_inference_steps=1, cfg_scale=1.0, seed=0, progress_bar=False)
    assert out.size == (96, 64)  # the edit image's center crop to multiples of 16


def test_edit_image_auto_resize(pipe):
    """Over 1024x1024 pixels an edit image is scaled to that area (Lanczos), then cropped to multiples of 16;
    DiffSynth-Studio's `edit_image_auto_resize=False` keeps its size (only the crop)."""
    big = Image.fromarray(np.random.default_rng(4).integers(0, 256, (1030, 1100, 3), dtype=np.uint8))
    (scaled_image, scaled) = pipe.prepare_edit_images([big], None, None)[0][0]
    (kept_image, kept) = pipe.prepare_edit_images([big], None, None, auto_resize=False)[0][0]
    w, h = scaled_image.size
    assert w * h <= 1024 * 1024 < 1100 * 1030 and abs(w / h - 1100 / 1030) < 0.01
    assert scaled.shape == (1, 3, h // 16 * 16, w // 16 * 16)
    assert kept_image.size == (1100, 1030) and kept.shape == (1, 3, 1024, 1088)
    left, top = (1100 - 1088) // 2, (1030 - 1024) // 2
    want = torch.from_numpy(np.asarray(big)[top : top + 1024, left : left + 1088].astype(np.float32) / 255.0)
    torch.testing.assert_close(kept[0], 2 * want.permute(2, 0, 1) - 1)
    with pytest.raises(ConfigError, match="edit_image_auto_resize='no'"):
        pipe("a cat", edit_image=edit_images()[0], edit_image_auto_resize="no", num_inference_steps=1)


def test_refusals(pipe, tiny_repo):
    plain = ZImagePipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu")
    with pytest.raises(ConfigError, match="Omni DiT"):
        plain("a cat", edit_image=edit_images()[0], num_inference_steps=1)
    encoder, pipe.image_encoder = pipe.image_encoder, None
    try:
        with pytest.raises(ConfigError, match="siglip/model.safetensors"):
            pipe("a cat", edit_image=edit_images()[0], num_inference_steps=1)
    finally:
        pipe.image_encoder = encoder
    with pytest.raises(ConfigError, match="both sides >= 64"):
        pipe("a cat", edit_image=Image.new("RGB", (48, 80)), num_inference_steps=1)
    with pytest.raises(ConfigError, match="empty list"):
        pipe("a cat", edit_image=[], num_inference_steps=1)
    with pytest.raises(ConfigError, match="no image file"):
        pipe("a cat", edit_image="/nonexistent/edit.png", num_inference_steps=1)


@pytest.fixture(scope="module")
def reference(omni_repo, pipe):
    diffusers = pytest.importorskip("diffusers")
    from transformers import (
        AutoTokenizer,
        Qwen3Model,
        Siglip2ImageProcessorPil,
        Siglip2VisionConfig,
        Siglip2VisionModel,
    )

    siglip = Siglip2VisionModel(
        Siglip2VisionConfig(**json.loads((omni_repo / "siglip" / "config.json").read_text()))
    ).eval()
    siglip.load_state_dict(pipe.image_encoder.state_dict(), strict=True)
    vae = diffusers.AutoencoderKL.from_pretrained(omni_repo / "vae")
    # diffusers casts the pixels to bfloat16 before its VAE (fine for a bfloat16 VAE, an error for a float32
    # one): cast them back to the VAE's dtype here. Our pipeline encodes in the VAE's dtype.
    encode = vae.encode
    vae.encode = lambda x, *a, **k: encode(x.float(), *a, **k)
    ref = diffusers.ZImageOmniPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(omni_repo / "scheduler"),
        vae=vae,
        text_encoder=Qwen3Model.from_pretrained(omni_repo / "text_encoder"),
        tokenizer=AutoTokenizer.from_pretrained(omni_repo / "tokenizer"),
        transformer=diffusers.ZImageTransformer2DModel.from_pretrained(omni_repo / "transformer"),
        siglip=siglip,
        siglip_processor=Siglip2ImageProcessorPil(patch_size=4, max_num_patches=16),
    )
    ref.set_progress_bar_config(disable=True)
    return ref


@pytest.mark.parity
@pytest.mark.parametrize(("n_images", "guidance"), [(1, 2.5), (2, 0.0), (0, 2.5)])
def test_images_match_diffusers(pipe, reference, n_images, guidance):
    images = list(edit_images()[:n_images])
    size = (64, 96) if n_images == 1 else (80, 64) if n_images == 2 else (64, 64)
    noise = torch.randn((2, 4, size[0] // 8, size[1] // 8), generator=torch.Generator("cpu").manual_seed(11))
    negative = ["bad quality, blurry"] * 2
    expected = reference(
        image=list(images) or None,
        prompt=list(PROMPTS),
        negative_prompt=list(negative),
        guidance_scale=guidance,
        num_inference_steps=2,
        height=None if images else 64,
        width=None if images else 64,
        latents=noise.clone(),
        output_type="np",
    ).images
    # the reference's own sigmas: the runtime's Z-Image template rounds some one float32 ulp away, which these
    # random tiny weights amplify past the tolerance (the plain pipeline's test shares that template)
    sigmas = reference.scheduler.sigmas[:-1].tolist()
    got = pipe(
        PROMPTS,
        negative_prompt=negative,
        edit_image=images or None,
        cfg_scale=guidance + 1.0,
        sigmas=sigmas,
        height=None if images else 64,
        width=None if images else 64,
        latents=noise.clone(),
        output_type="np",
        progress_bar=False,
    )
    assert got.shape == expected.shape == (2, *size, 3)
    diff = np.abs(got - expected).max()
    assert diff <= 1e-4, f"{n_images} edit images, guidance {guidance}: max abs diff {diff:.3g} vs diffusers"


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "I;16"])
def test_edit_image_of_another_mode_is_read_as_rgb(pipe, mode):
    """SigLIP2 and the VAE read three channels: an RGBA, grey, palette or 16-bit grey edit image is converted to RGB
    as PIL's plain `convert("RGB")` does (alpha dropped; 16-bit grey scaled to 8 bits, not clipped to white)."""
    rgb = edit_images()[0]
    if mode == "I;16":
        grey = np.asarray(rgb.convert("L")).astype(np.uint16)
        image, expected = Image.fromarray(grey * 257), Image.fromarray(grey.astype(np.uint8)).convert("RGB")
    else:
        image = rgb.convert(mode)
        expected = image.convert("RGB")
    assert image.mode == mode
    ((siglip_image, pixels),) = pipe.prepare_edit_images([image], None, None)[0]
    assert siglip_image.mode == "RGB" and np.array_equal(np.asarray(siglip_image), np.asarray(expected))
    args = dict(num_inference_steps=1, cfg_scale=1.0, seed=0, output_type="np", progress_bar=False)
    got = pipe("a cat", edit_image=image, **args)
    want = pipe("a cat", edit_image=expected, **args)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    ("groups", "message"),
    [
        ({"batch_size": 2}, r"batch \(CFG\) parallelism over 2 ranks \(enable_parallel\(batch=2\), --cfg-parallel 2\)"),
        ({"sequence_size": 2}, r"sequence parallelism over 2 ranks .*--sequence-parallel 2"),
        (None, "without step caches"),
    ],
)
def test_parallel_and_step_caches_are_refused_before_any_model_runs(pipe, monkeypatch, groups, message):
    """Omni calls divide nothing over ranks and cache no steps: the call names what is on before the text encoder
    runs (the DiT refused it only after the encoders, and called batch parallelism "sequence parallelism")."""
    from diffsynth.runtime.parallel import ParallelGroups
    from diffsynth.runtime.step_cache import FirstBlockCache

    def encoder_ran(*args, **kwargs):
        raise AssertionError("the text encoder ran before the refusal")

    monkeypatch.setattr(pipe, "encode_omni_prompt", encoder_ran)
    monkeypatch.setattr(pipe.dit, "parallel", None if groups is None else ParallelGroups(**groups))
    monkeypatch.setattr(pipe.dit, "step_cache", FirstBlockCache(0.1) if groups is None else None)
    with pytest.raises(ConfigError, match=message):
        pipe("a cat", edit_image=edit_images()[0], num_inference_steps=1, cfg_scale=2.0, seed=0, progress_bar=False)


def _controlnet_helpers():
    """`make_net` / `write_net` / `tiny_config` live in test_controlnet.py; load that module by path."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).with_name("test_controlnet.py")
    spec = importlib.util.spec_from_file_location("z_image_test_controlnet", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_controlnets_are_refused_with_an_omni_dit(pipe, omni_repo, tmp_path, monkeypatch):
    """The Omni forward takes no control: `controlnet_inputs` in an Omni call (with or without edit_image) and a
    net loaded on an Omni DiT are refused, not VAE-encoded and silently dropped."""
    from diffsynth.z_image import ControlNetInput

    C = _controlnet_helpers()

    def encoder_ran(*args, **kwargs):
        raise AssertionError("the text encoder ran before the refusal")

    monkeypatch.setattr(pipe, "encode_omni_prompt", encoder_ran)
    control = [ControlNetInput(image=C.picture(1))]
    for edit in (None, edit_images()[0]):
        with pytest.raises(ConfigError, match="controlnet_inputs with a Z-Image Omni DiT.*not Omni nets"):
            pipe("a cat", controlnet_inputs=control, edit_image=edit, num_inference_steps=1, progress_bar=False)
    net = C.write_net(tmp_path / "net", C.make_net(C.tiny_config("2.1", places=(0, 1), refiner=(0,)), seed=7))
    with pytest.raises(ConfigError, match="a loaded ControlNet with a Z-Image Omni DiT"):
        ZImagePipeline.from_pretrained(str(omni_repo), torch_dtype="float32", device="cpu", controlnet=str(net))
    fresh = ZImagePipeline.from_pretrained(str(omni_repo), torch_dtype="float32", device="cpu")
    with pytest.raises(ConfigError, match="a loaded ControlNet with a Z-Image Omni DiT"):
        fresh.load_controlnet(str(net))
