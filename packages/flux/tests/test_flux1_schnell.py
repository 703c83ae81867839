"""FLUX.1-schnell loaded other ways than its preset name, and FLUX.1 call arguments that were silently ignored.

A schnell DiT (no guidance embedding) from a plain folder sampled with dev's resolution-dependent time shift, and
DiffSynth-Studio's `model_configs` of the schnell repo took none of the preset's defaults (dev's 28 steps, shift,
512 T5 tokens): both now sample as BFL and diffusers do. `denoising_strength` without `input_image` was dropped and
a list `embedded_guidance` was a bare TypeError: both are refused naming the argument.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from diffsynth_flux_test_helpers import latent_noise, max_abs, our_images, our_pipeline, reference_images
from safetensors.torch import save_file

from diffsynth.flux.pipeline import FluxImagePipeline
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.hub import ModelConfig

SCHNELL = "black-forest-labs/FLUX.1-schnell"
SCHNELL_SCHEDULER = {  # black-forest-labs/FLUX.1-schnell scheduler/scheduler_config.json
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": False,
}
TEXT_LEN = 48
FAST = dict(height=32, width=32, num_inference_steps=2, t5_sequence_length=16, progress_bar=False)


def build_schnell_folder(repo: Path, root: Path) -> Path:
    """The tiny repo's encoders, VAE and tokenizers with a DiT without guidance embedding and schnell's scheduler."""
    from diffsynth.flux.flux1.formats import FLUX1_DIT_SPEC, ours_to_diffusers
    from diffsynth.runtime.testing.weights import random_weights

    for name in ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        shutil.copytree(repo / name, root / name)
    config = {**json.loads((repo / "transformer" / "config.json").read_text()), "guidance_embeds": False}
    dit = FLUX1_DIT_SPEC.build(FLUX1_DIT_SPEC.config_from_state({}, config))
    dit = random_weights(dit, 5, scale=0.05, is_norm=lambda name, p: name.endswith(".scale"))
    (root / "transformer").mkdir()
    (root / "transformer" / "config.json").write_text(json.dumps(config))
    save_file(ours_to_diffusers(dit.state_dict()), str(root / "transformer" / "diffusion_pytorch_model.safetensors"))
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHNELL_SCHEDULER))
    return root


@pytest.fixture(scope="module")
def schnell_base(tiny_repo, tmp_path_factory) -> Path:
    """A model base path holding the tiny schnell as `black-forest-labs/FLUX.1-schnell` (diffusers layout)."""
    base = tmp_path_factory.mktemp("schnell-models")
    (base / SCHNELL).mkdir(parents=True)
    build_schnell_folder(tiny_repo, base / SCHNELL)
    return base


def test_a_schnell_folder_samples_unshifted_as_diffusers(schnell_base, one_thread):
    """No preset, no `sigma_shift`: a DiT without guidance embedding takes BFL's `shift=False` (diffusers' schnell
    scheduler: shift 1, no dynamic shifting); it was shifted as dev, 0.1 to 0.25 off diffusers' image."""
    pytest.importorskip("diffusers")
    import diffusers
    from diffsynth_flux_test_helpers import reference_components

    folder = schnell_base / SCHNELL
    ours = our_pipeline(folder)
    assert not ours.dit.config.guidance_embed and ours.defaults == {}
    ref = diffusers.FluxPipeline(**reference_components(folder)).to(torch.float32)
    ref.set_progress_bar_config(disable=True)
    noise = latent_noise(1, 32, 32, seed=2)
    size = dict(num_inference_steps=3, height=32, width=32)
    expected = reference_images(ref, noise, TEXT_LEN, prompt="a red circle", guidance_scale=0.0, **size)
    got = our_images(ours, "a red circle", noise, TEXT_LEN, **size)
    assert max_abs(got, expected) <= 1e-4


def studio_configs(*extra: ModelConfig) -> list[ModelConfig]:
    """The schnell repo's files as DiffSynth-Studio lists them (resolved under DIFFSYNTH_MODEL_BASE_PATH)."""
    patterns = ("transformer/*.safetensors", "vae/*.safetensors", "text_encoder/*.safetensors")
    return [ModelConfig(model_id=SCHNELL, origin_file_pattern=p) for p in (*patterns, "text_encoder_2/")] + [*extra]


def test_schnell_model_configs_take_the_preset_defaults(schnell_base, monkeypatch):
    """`model_configs` of the schnell repo only get the preset's settings (4 steps, shift 1, 256 T5 tokens) as the
    preset name does; with a local file among them (it may be another DiT) they get none."""
    from diffsynth.runtime.registry import find_preset

    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(schnell_base))
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "1")
    tokenizers = dict(
        tokenizer_1_config=ModelConfig(model_id=SCHNELL, origin_file_pattern="tokenizer/"),
        tokenizer_2_config=ModelConfig(model_id=SCHNELL, origin_file_pattern="tokenizer_2/"),
    )
    load = dict(torch_dtype="float32", device="cpu", **tokenizers)
    pipe = FluxImagePipeline.from_pretrained(model_configs=studio_configs(), **load)
    assert pipe.defaults == dict(find_preset(SCHNELL)[1].defaults) and pipe.defaults["num_inference_steps"] == 4
    assert FluxImagePipeline.from_pretrained(studio_configs(), **load).defaults == pipe.defaults
    local = ModelConfig(path=str(schnell_base / SCHNELL / "vae" / "diffusion_pytorch_model.safetensors"))
    assert FluxImagePipeline.from_pretrained(model_configs=studio_configs(local), **load).defaults == {}


@pytest.mark.parametrize("strength", [0.3, 7.0])
def test_denoising_strength_without_input_image_is_refused(tiny_pipe, strength):
    """It was dropped without a word (even 7.0): the image came out as plain text-to-image."""
    with pytest.raises(ConfigError, match=rf"denoising_strength={strength}.*input_image"):
        tiny_pipe("a cat", denoising_strength=strength, seed=0, **FAST)


@pytest.mark.parametrize("guidance", [[1.0, 2.0], math.nan, math.inf, "high", "3.5", True])
def test_embedded_guidance_that_is_no_finite_number_is_refused(tiny_pipe, guidance):
    """A list was a bare TypeError inside float(); NaN and infinity gave NaN images."""
    with pytest.raises(ConfigError, match=r"embedded_guidance=.*finite number"):
        tiny_pipe("a cat", embedded_guidance=guidance, seed=0, **FAST)
