"""`pipe.compile` / DiffSynth-Studio's `pipe.compile_pipeline`: regional torch.compile of the denoiser's repeated
blocks (whole-model compile for a model without `compile_units`), and the same images after it. Dynamo's "eager"
backend traces the graphs without code generation, so the test runs in seconds on a CPU."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from diffsynth.runtime.errors import ConfigError

pytest.importorskip("diffsynth.z_image")
from diffsynth.z_image import ZImagePipeline  # noqa: E402

PROMPT = "a red circle on a blue background"
FAST = {"height": 32, "width": 32, "num_inference_steps": 2, "progress_bar": False, "output_type": "pt", "seed": 0}


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory) -> Path:
    conftest = Path(__file__).parents[2] / "z-image" / "tests" / "conftest.py"
    spec = importlib.util.spec_from_file_location("z_image_tiny_repo_compile", conftest)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    return module.build_tiny_repo(tmp_path_factory.mktemp("tiny-z-image-compile"))


def compiled(module: torch.nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


def test_compile_pipeline_compiles_the_denoiser_blocks_and_keeps_the_images(tiny_repo):
    torch._dynamo.reset()
    pipe = ZImagePipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu")
    before = pipe(PROMPT, **FAST)
    pipe.compile_pipeline(backend="eager")  # DiffSynth-Studio's defaults: mode "default", dynamic, not fullgraph
    units = pipe.dit.compile_units
    blocks = [block for path in units for block in pipe.dit.get_submodule(path)]
    assert units and blocks and all(compiled(block) for block in blocks)
    assert not compiled(pipe.dit) and not compiled(pipe.vae)  # regional: the blocks only, the other models not
    torch.testing.assert_close(pipe(PROMPT, **FAST), before, rtol=0, atol=1e-6)

    pipe.compile_pipeline(compile_models=["vae"], backend="eager")  # no compile_units: the whole model
    assert compiled(pipe.vae) == (not getattr(pipe.vae, "compile_units", ()))
    torch.testing.assert_close(pipe(PROMPT, **FAST), before, rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="compile: slot 'unet' holds no loaded model; loaded: .*'dit'"):
        pipe.compile_pipeline(compile_models=["unet"])
    torch._dynamo.reset()
