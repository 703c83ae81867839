"""FLUX.2 trained end to end by the trainer on the tiny klein repo of the flux tests (`flux/tests/flux2_repo.py`).

The LoRA it writes is applied exactly by our pipeline (the default file and the kohya one) and by diffusers'
`Flux2KleinPipeline.load_lora_weights` (the kohya one); the cached two-stage mode trains the same weights as the
direct one; validation samples are the pipeline's with the LoRA; `--model <klein preset>` keeps the preset's
sampling settings. Prompts are 64 tokens (`--task_options max_sequence_length=64`) to keep the runs fast.

Integration: needs diffsynth-flux installed (the `integration` nox session installs every package).
"""

import math
import shutil
from pathlib import Path

import pytest

pytest.importorskip("diffsynth.flux")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from diffsynth.flux.flux2.pipeline import Flux2ImagePipeline, flux2_velocity  # noqa: E402
from diffsynth.training.config import TrainConfig  # noqa: E402
from diffsynth.training.data import batch_plan  # noqa: E402
from diffsynth.training.testing import (  # noqa: E402
    assert_same_training,
    load_module,
    outputs_before_and_after_lora,
    tiny_config,
    train_direct_and_cached,
    write_caption_dataset,
)
from diffsynth.training.trainer import TrainState, save, setup, train, train_step  # noqa: E402

pytestmark = pytest.mark.integration

TOKENS = 64
PROMPTS = ["a red circle on a blue background", "a small green square in the top left corner"]
FAST = {"height": 64, "width": 64, "num_inference_steps": 2, "progress_bar": False}


def _flux2_repo_module():
    return load_module(Path(__file__).parents[2] / "flux" / "tests" / "flux2_repo.py", "flux2_tiny_repo")


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return _flux2_repo_module().build_tiny_klein_repo(tmp_path_factory.mktemp("tiny-flux2"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    captions = _flux2_repo_module().CAPTIONS
    return write_caption_dataset(tmp_path_factory.mktemp("data"), [captions[i % 3] for i in range(4)], seed=1)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls: intra-op threads only add scheduling overhead on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def config(tiny_repo, dataset, output, **overrides) -> TrainConfig:
    values = {"task_options": {"max_sequence_length": TOKENS}, **overrides}
    return tiny_config(tiny_repo, "flux2", dataset, output, **values)


def test_lora_training_gives_a_lora_our_pipeline_applies_exactly(tiny_repo, dataset, tmp_path):
    run = setup(config(tiny_repo, dataset, tmp_path / "out", lora_formats=["diffsynth", "kohya"]))
    assert run.task.max_sequence_length == TOKENS
    state = TrainState()
    for batch in batch_plan(run.dataset.batch_keys, batch_size=2):
        state = train_step(run, state, [[run.dataset[i] for i in batch]])
        assert math.isfinite(state.loss) and state.loss > 0
    save(run, state)

    pipe = Flux2ImagePipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu")
    g = torch.Generator().manual_seed(3)
    latents, sigma = torch.randn(1, 16, 4, 4, generator=g), torch.tensor([0.7])
    text = pipe.encode_prompt(PROMPTS[:1], TOKENS)
    with torch.no_grad():
        trained = flux2_velocity(run.model, latents, sigma, text)
        assert (trained - flux2_velocity(pipe.dit, latents, sigma, text)).abs().max() > 1e-4  # it learned something
        for suffix in ("", ".kohya"):
            pipe.load_lora(tmp_path / "out" / f"step-000002{suffix}.safetensors", fuse=False, name="trained")
            torch.testing.assert_close(flux2_velocity(pipe.dit, latents, sigma, text), trained, atol=1e-5, rtol=1e-5)
            pipe.clear_loras()


@pytest.mark.parity
def test_the_kohya_lora_file_loads_in_diffusers(tiny_repo, dataset, tmp_path):
    """diffusers' FLUX.2 LoRA loader converts the kohya file (BFL names, fused qkv split into to_q/to_k/to_v)
    onto its transformer: the same velocity as our trained DiT."""
    pytest.importorskip("diffusers")
    from diffsynth.flux.flux2.pipeline import grid_ids, latents_to_tokens, text_ids

    train(config(tiny_repo, dataset, tmp_path / "out", lora_formats=["diffsynth", "kohya"]))
    reference = _flux2_repo_module().reference_pipeline(tiny_repo)
    pipe = Flux2ImagePipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu")
    g = torch.Generator().manual_seed(4)
    latents, sigma = torch.randn(1, 16, 4, 4, generator=g), torch.tensor([0.6])
    text = pipe.encode_prompt(PROMPTS[1:], TOKENS)

    def theirs():
        with torch.no_grad():
            return reference.transformer(
                hidden_states=latents_to_tokens(latents),
                timestep=sigma,
                guidance=None,
                encoder_hidden_states=text,
                txt_ids=text_ids(TOKENS)[None],
                img_ids=grid_ids(4, 4)[None],
                return_dict=False,
            )[0]

    base = theirs()
    reference.load_lora_weights(str(tmp_path / "out" / "step-000002.kohya.safetensors"))
    pipe.load_lora(tmp_path / "out" / "step-000002.safetensors")
    with torch.no_grad():
        ours = latents_to_tokens(flux2_velocity(pipe.dit, latents, sigma, text))
    after = theirs()
    assert (after - base).abs().max() > 1e-4  # diffusers applied the LoRA
    torch.testing.assert_close(after, ours, atol=1e-5, rtol=1e-5)


def test_cached_two_stage_training_equals_direct_training(tiny_repo, dataset, tmp_path):
    runs = train_direct_and_cached(config(tiny_repo, dataset, tmp_path))
    assert runs.state.step == 2
    assert set(runs.cached_item(0)) == {"latents", "prompt_embeds"}
    assert runs.cached_item(0)["prompt_embeds"].shape == (TOKENS, 48)
    assert_same_training(runs, step=2, atol=1e-6)


def test_validation_samples_are_the_pipeline_with_the_lora_in_training(tiny_repo, dataset, tmp_path):
    """The sample written at the last step is what the pipeline draws with the saved LoRA applied (at the
    task's prompt length), with a reference image given through --validation_images."""
    Image.new("RGB", (64, 64), (200, 40, 40)).save(dataset / "val_ref.png")
    size = {"validation_height": 64, "validation_width": 64, "validation_num_inference_steps": 2}
    cfg = config(
        tiny_repo,
        dataset,
        tmp_path / "out",
        validation_prompts=["a red circle"],
        validation_images=["val_ref.png"],
        **size,
    )
    train(cfg)
    drawn = np.asarray(Image.open(tmp_path / "out" / "validation" / "step-000002-0.png")).astype(int)

    pipe = Flux2ImagePipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu")
    call = {**FAST, "seed": 0, "max_sequence_length": TOKENS, "edit_image": [Image.open(dataset / "val_ref.png")]}
    pictures = outputs_before_and_after_lora(pipe, tmp_path / "out" / "step-000002.safetensors", "a red circle", **call)
    base, expected = (np.asarray(picture).astype(int) for picture in pictures)
    assert drawn.shape == (64, 64, 3)
    assert np.abs(drawn - expected).max() <= 1  # PNG rounding of the same picture
    assert np.abs(drawn - base).max() > 1  # and not the base model's


@pytest.mark.parametrize("preset", ["black-forest-labs/FLUX.2-klein-4B", "black-forest-labs/FLUX.2-klein-base-4B"])
def test_a_klein_preset_keeps_its_sampling_settings(tiny_repo, tmp_path, monkeypatch, preset):
    """`--model Org/Name` expands to the preset's files (and tokenizer); validation samples keep the preset's
    steps and CFG: klein-base LoRAs are validated at 50 steps with CFG 4, not at klein's 4 steps without."""
    from diffsynth.flux.flux2.presets import PRESETS
    from diffsynth.training.task import model_sources
    from diffsynth.training.trainer import build_task, task_class

    base = tmp_path / "models"
    shutil.copytree(tiny_repo, base / preset)
    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(base))
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "1")
    cfg = TrainConfig(model=preset, dataset_base_path=str(tmp_path), dtype="float32")  # the family from the preset
    task = build_task(task_class(cfg), cfg, "cpu", encoders=True, denoiser=True)
    assert task.family == "flux2" and model_sources(cfg)[0][0].model_id == preset
    assert task.pipe.tokenizer is not None
    wanted = PRESETS[preset].defaults
    assert {k: task.pipe.defaults.get(k) for k in wanted} == wanted
