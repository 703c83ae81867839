"""`Flux2ImagePipeline` with a FLUX.2 KV model (klein-9B-KV) on a tiny random repo: parity with diffusers'
`Flux2KleinKVPipeline`, the reference cache (filled once, equal to recomputing), the KV release detection (the
diffusers folder's `model_index.json`, the preset's repo id) and `use_kv_cache` refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from diffsynth_flux2_test_repo import CAPTIONS, our_pipeline
from diffsynth_flux_test_helpers import max_abs, random_image

from diffsynth.flux.flux2.presets import PRESETS
from diffsynth.runtime.errors import ConfigError

H = W = 64
STEPS = 3
KV_REPO = "black-forest-labs/FLUX.2-klein-9b-kv"


@pytest.fixture(scope="module")
def tiny_kv_repo(tiny_klein_repo, tmp_path_factory):
    """The tiny klein repo as a KV release: the diffusers folder's `model_index.json` names the KV pipeline."""
    root = tmp_path_factory.mktemp("tiny-flux2-klein-kv") / "repo"
    shutil.copytree(tiny_klein_repo, root)
    index = {"_class_name": "Flux2KleinKVPipeline", "is_distilled": True, "transformer": ["diffusers", "x"]}
    (root / "model_index.json").write_text(json.dumps(index))
    return root


@pytest.fixture(scope="module")
def kv_pipe(tiny_kv_repo):
    return our_pipeline(tiny_kv_repo)


def noise(batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 16, H // 16, W // 16, generator=torch.Generator().manual_seed(seed))


def ours(pipe, prompt, latents, **kwargs) -> np.ndarray:
    kwargs = {"height": H, "width": W, "num_inference_steps": STEPS, "progress_bar": False, **kwargs}
    return pipe(prompt, latents=latents, output_type="np", **kwargs)


def refs():
    return [random_image(96, 64, seed=1), random_image(72, 88, seed=2)]


def count_reference_passes(pipe, calls: list) -> torch.utils.hooks.RemovableHandle:
    """Appends to `calls` at each reference pass of the DiT (its first double block run on reference tokens)."""
    return pipe.dit.double_blocks[0].register_forward_pre_hook(
        lambda module, args: calls.append(1) if args[1] is None else None
    )


@pytest.mark.parity
def test_editing_matches_diffusers_kv_pipeline(kv_pipe, tiny_kv_repo, one_thread):
    """Two references (one cut to multiples of 16), two prompts sharing them, 3 steps: the first fills the cache."""
    import diffusers
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    theirs = diffusers.Flux2KleinKVPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_kv_repo / "scheduler"),
        vae=diffusers.AutoencoderKLFlux2.from_pretrained(tiny_kv_repo / "vae"),
        text_encoder=Qwen3ForCausalLM.from_pretrained(tiny_kv_repo / "text_encoder"),
        tokenizer=AutoTokenizer.from_pretrained(tiny_kv_repo / "tokenizer"),
        transformer=diffusers.Flux2Transformer2DModel.from_pretrained(tiny_kv_repo / "transformer"),
    )
    prompts, x = CAPTIONS[2:4], noise(2, seed=7)
    got = ours(kv_pipe, prompts, x, edit_image=refs())
    want = theirs(
        prompt=prompts, image=refs(), latents=x, height=H, width=W, num_inference_steps=STEPS, output_type="np"
    ).images
    print(f"pipeline parity: max abs diff {max_abs(got, want):.3g}")
    assert got.shape == want.shape == (2, H, W, 3)
    assert max_abs(got, want) < 2e-5


def test_kv_release_is_detected_and_cached_equals_recomputed(kv_pipe, tiny_klein_pipe, one_thread, monkeypatch):
    assert kv_pipe.dit.config.causal_references
    calls = []
    handle = count_reference_passes(kv_pipe, calls)
    try:
        x = noise(1, seed=3)
        cached = ours(kv_pipe, CAPTIONS[3], x, edit_image=refs())
        assert len(calls) == 1  # once, on the first step
        recomputed = ours(kv_pipe, CAPTIONS[3], x, edit_image=refs(), use_kv_cache=False)
        assert len(calls) == 1 + STEPS
    finally:
        handle.remove()
    assert max_abs(cached, recomputed) == 0
    assert max_abs(cached, ours(kv_pipe, CAPTIONS[3], x)) > 1e-3  # the references change the picture
    # the same weights as a plain klein model: references attended to at the step's timestep, a different picture
    assert max_abs(cached, ours(tiny_klein_pipe, CAPTIONS[3], x, edit_image=refs())) > 1e-3
    # true CFG: both halves of the batch read the same cache (the release is step-distilled and would ignore
    # cfg_scale: `test_flux2_call_checks`; taken as undistilled here to run the two halves)
    assert kv_pipe.step_distilled
    monkeypatch.setattr(kv_pipe, "step_distilled", False)
    cfg = ours(kv_pipe, CAPTIONS[3], x, edit_image=refs(), cfg_scale=3.0)
    assert max_abs(cfg, ours(kv_pipe, CAPTIONS[3], x, edit_image=refs(), cfg_scale=3.0, use_kv_cache=False)) == 0
    assert max_abs(cfg, cached) > 1e-3


def test_plain_klein_folder_is_not_a_kv_model_and_refuses_the_cache(tiny_klein_pipe):
    assert not tiny_klein_pipe.dit.config.causal_references
    with pytest.raises(ConfigError, match="use_kv_cache=True needs a FLUX.2 KV model"):
        tiny_klein_pipe(CAPTIONS[0], height=H, width=W, num_inference_steps=1, use_kv_cache=True, progress_bar=False)


def test_use_kv_cache_must_be_a_bool(kv_pipe):
    with pytest.raises(ConfigError, match="use_kv_cache='yes'"):
        kv_pipe(CAPTIONS[0], height=H, width=W, num_inference_steps=1, use_kv_cache="yes", progress_bar=False)


def test_kv_preset_has_the_authors_defaults_and_marks_the_dit(tiny_klein_repo, tmp_path, monkeypatch):
    """The preset's repo id marks the DiT even without `model_index.json` (the preset fetches no such file)."""
    from diffsynth.flux.flux2.pipeline import Flux2ImagePipeline

    preset = PRESETS[KV_REPO]
    assert {"num_inference_steps": 4, "cfg_scale": 1.0}.items() <= dict(preset.defaults).items()
    assert [f.origin_file_pattern for f in preset.files][0] == "transformer/*.safetensors*"
    base = tmp_path / "models"
    shutil.copytree(tiny_klein_repo, base / KV_REPO)
    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(base))
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "1")
    pipe = Flux2ImagePipeline.from_pretrained(KV_REPO, device="cpu", torch_dtype=torch.float32)
    assert pipe.dit.config.causal_references and pipe.kv_cache_setting(None) and pipe.step_distilled


def test_vram_managed_kv_pipeline_gives_the_same_image(tiny_kv_repo, kv_pipe, one_thread):
    """Every unit streamed: the reference pass calls the blocks like any other pass (their hooks fetch them)."""
    managed = our_pipeline(tiny_kv_repo, vram_limit=0)
    assert managed.dit.config.causal_references
    kwargs = dict(seed=0, output_type="pt", height=H, width=W, num_inference_steps=2, progress_bar=False)
    torch.testing.assert_close(
        managed(CAPTIONS[3], edit_image=refs(), **kwargs),
        kv_pipe(CAPTIONS[3], edit_image=refs(), **kwargs),
        atol=0,
        rtol=0,
    )
