"""DiffSynth-Studio scripts ported with the README's import change: `model_configs` alone, without tokenizer or
processor configs, get Studio's defaults (FLUX.1-dev's tokenizers, Qwen2.5-VL-7B-Instruct's processor), resolved
under DIFFSYNTH_MODEL_BASE_PATH like any ModelConfig; Step1X-Edit's files given to FluxImagePipeline name the class
that loads them."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from diffsynth.flux.pipeline import FluxImagePipeline
from diffsynth.flux.step1x import Step1XEditPipeline
from diffsynth.runtime.errors import ConfigError, DiffSynthError
from diffsynth.runtime.hub import ModelConfig

DEV = "black-forest-labs/FLUX.1-dev"
KONTEXT = "black-forest-labs/FLUX.1-Kontext-dev"
FAST = dict(height=32, width=32, num_inference_steps=2, t5_sequence_length=16, progress_bar=False, output_type="pt")
LOAD = dict(torch_dtype="float32", device="cpu")


def _studio_configs(dit: ModelConfig) -> list[ModelConfig]:
    """FLUX.1-dev's encoders and VAE as DiffSynth-Studio's examples list them, after `dit`."""
    patterns = ("text_encoder/model.safetensors", "text_encoder_2/*.safetensors", "ae.safetensors")
    return [dit, *(ModelConfig(model_id=DEV, origin_file_pattern=p) for p in patterns)]


@pytest.fixture
def studio_base(bfl_repo_base, tmp_path, monkeypatch):
    """FLUX.1-dev (with its tokenizers) and a Kontext repo holding only its DiT, offline."""
    base = tmp_path / "models"
    shutil.copytree(bfl_repo_base, base)
    (base / KONTEXT).mkdir(parents=True)
    os.link(base / DEV / "flux1-dev.safetensors", base / KONTEXT / "flux1-kontext-dev.safetensors")
    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(base))
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "1")
    return base


def _photo(width=48, height=32, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_flux1_model_configs_default_to_flux1_dev_tokenizers(studio_base, one_thread):
    """FLUX.1-dev and FLUX.1-Kontext-dev from `model_configs` only run, with FLUX.1-dev's tokenizers; they equal
    the preset's pipeline (the same files), and the tokenizers are the repo's."""
    dit = ModelConfig(model_id=DEV, origin_file_pattern="flux1-dev.safetensors")
    pipe = FluxImagePipeline.from_pretrained(model_configs=_studio_configs(dit), **LOAD)
    assert pipe.tokenizer_1.name_or_path == str(studio_base / DEV / "tokenizer")
    assert pipe.tokenizer_2.name_or_path == str(studio_base / DEV / "tokenizer_2")
    preset = FluxImagePipeline.from_pretrained(DEV, **LOAD)
    torch.testing.assert_close(pipe("a cat", seed=1, **FAST), preset("a cat", seed=1, **FAST), atol=0, rtol=0)

    kontext_dit = ModelConfig(model_id=KONTEXT, origin_file_pattern="flux1-kontext-dev.safetensors")
    kontext = FluxImagePipeline.from_pretrained(_studio_configs(kontext_dit), **LOAD)
    edited = kontext("make it red", kontext_images=_photo(), seed=2, **FAST)
    assert edited.shape[-2:] == (32, 32) and torch.isfinite(edited).all()


def test_tokenizer_defaults_can_be_refused_and_name_the_argument(studio_base):
    """An explicit None loads no tokenizer (DiffSynth-Studio's meaning); a default tokenizer missing under the
    base path names its argument and the folder looked for."""
    dit = ModelConfig(model_id=DEV, origin_file_pattern="flux1-dev.safetensors")
    bare = FluxImagePipeline.from_pretrained(
        model_configs=_studio_configs(dit), tokenizer_1_config=None, tokenizer_2_config=None, **LOAD
    )
    assert bare.tokenizer_1 is None and bare.tokenizer_2 is None
    shutil.rmtree(studio_base / DEV / "tokenizer_2")
    with pytest.raises(DiffSynthError, match=r"tokenizer_2_config: .*'tokenizer_2/'"):
        FluxImagePipeline.from_pretrained(model_configs=_studio_configs(dit), **LOAD)


def _step1x_configs() -> list[ModelConfig]:
    """DiffSynth-Studio's Step1X-Edit example's model_configs."""
    return [
        ModelConfig(model_id="Qwen/Qwen2.5-VL-7B-Instruct", origin_file_pattern="model-*.safetensors"),
        ModelConfig(model_id="stepfun-ai/Step1X-Edit", origin_file_pattern="step1x-edit-i1258.safetensors"),
        ModelConfig(model_id="stepfun-ai/Step1X-Edit", origin_file_pattern="vae.safetensors"),
    ]


@pytest.fixture
def step1x_env(step1x_base, monkeypatch):
    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(step1x_base))
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "1")
    return step1x_base


def test_step1x_model_configs_default_to_the_qwen_processor(step1x_env, one_thread):
    """Step1XEditPipeline from DiffSynth-Studio's model_configs alone gets Qwen2.5-VL-7B-Instruct's processor and
    edits; `step1x_processor_config` (Studio's name) is taken too, an explicit None loads none."""
    pipe = Step1XEditPipeline.from_pretrained(model_configs=_step1x_configs(), **LOAD)
    assert pipe.processor is not None
    image = pipe("make it red", reference_image=_photo(), height=32, width=32, num_inference_steps=1, seed=0)
    assert image.size == (32, 32)
    folder = ModelConfig(path=str(step1x_env / "Qwen" / "Qwen2.5-VL-7B-Instruct"))
    studio = Step1XEditPipeline.from_pretrained(_step1x_configs(), step1x_processor_config=folder, **LOAD)
    assert studio.processor is not None
    none = Step1XEditPipeline.from_pretrained(_step1x_configs(), processor_config=None, **LOAD)
    assert none.processor is None


def test_flux_pipeline_names_step1x_for_its_qwen25vl(step1x_env):
    """Studio's Step1X-Edit example uses FluxImagePipeline: ours names the class that loads Step1X-Edit."""
    with pytest.raises(ConfigError, match=r"qwen25vl.*diffsynth\.flux\.step1x\.Step1XEditPipeline"):
        FluxImagePipeline.from_pretrained(model_configs=_step1x_configs(), **LOAD)


def test_local_model_configs_take_the_tokenizers_beside_them_without_a_download(tiny_repo, monkeypatch):
    """Local files only (a hub clone's folders): the tokenizers beside them, no hub default and no network."""
    from diffsynth.runtime import hub

    def no_download(*args, **kwargs):
        raise AssertionError("a local load must not download")

    monkeypatch.setattr(hub, "_download_calls", no_download)
    configs = [ModelConfig(path=str(tiny_repo / d)) for d in ("transformer", "vae", "text_encoder", "text_encoder_2")]
    pipe = FluxImagePipeline.from_pretrained(model_configs=configs, **LOAD)
    assert pipe.tokenizer_1.name_or_path == str((tiny_repo / "tokenizer").resolve())
    assert pipe.tokenizer_2.name_or_path == str((tiny_repo / "tokenizer_2").resolve())
