"""The FLUX.1 training task: its encodings and model call are the pipeline's own, and the trainer
(`diffsynth-train --family flux`) trains it end to end on the tiny repo.

The trainer tests are `integration` (they need diffsynth-training installed, which the per-package session does
not install); the task tests need only this package and the runtime.
"""

import shutil

import numpy as np
import pytest
import torch

from diffsynth.flux.pipeline import FluxImagePipeline
from diffsynth.flux.training import FluxTrainingTask
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.pipeline import configs_from_folder

PROMPTS = ["a red circle on a blue background", "a small green square in the top left corner"]
FAST = {"height": 64, "width": 64, "num_inference_steps": 2, "progress_bar": False}


@pytest.fixture(scope="module")
def task(tiny_repo):
    configs, tokenizer = configs_from_folder(tiny_repo)
    return FluxTrainingTask.from_pretrained(configs, tokenizer_config=tokenizer, torch_dtype="float32", device="cpu")


def rows():
    g = torch.Generator().manual_seed(0)
    return [{"prompt": p, "image": torch.rand(3, 64, 64, generator=g) * 2 - 1} for p in PROMPTS]


def test_task_declares_the_protocol_attributes(task):
    assert (task.family, task.denoiser_slot, task.media, task.size_multiple) == ("flux", "dit", ("image",), 16)
    assert set(task.models) == {"dit", "vae", "text_encoder_1", "text_encoder_2"}
    assert set(task.model_files) == set(task.models)
    assert task.embedded_guidance == 1.0  # DiffSynth-Studio trains FLUX.1-dev at embedded guidance 1
    task.scheduler.set_training_grid()
    t = torch.linspace(1, 0, 1001, dtype=torch.float64)[:-1]
    torch.testing.assert_close(task.scheduler.train_sigmas, (3 * t / (1 + 2 * t)).float())  # static shift 3


def test_encode_and_collate_give_the_pipeline_encodings(task, tiny_pipe):
    batch_rows = rows()
    samples = task.encode(batch_rows)
    assert [tuple(s["latents"].shape) for s in samples] == [(16, 8, 8)] * 2
    assert [tuple(s["t5"].shape) for s in samples] == [(512, 32)] * 2
    assert [tuple(s["pooled"].shape) for s in samples] == [(32,)] * 2
    text = tiny_pipe.encode_prompt(PROMPTS)
    pixels = torch.stack([r["image"] for r in batch_rows])
    batch = task.collate(samples)
    assert batch["latents"].shape == (2, 16, 8, 8)
    assert torch.equal(batch["t5"], text.t5) and torch.equal(batch["pooled"], text.pooled)
    assert torch.equal(batch["latents"], tiny_pipe.vae.encode(pixels).float())


def test_velocity_is_the_pipeline_per_step_call(task, tiny_pipe):
    """Bit-equal to the pipeline's `predict` (its denoise loop's call) on the same inputs, with the guidance
    embedded at 1.0: one sigma per sample, and one shared sigma as the loop gives it."""
    batch = task.collate(task.encode(rows()))
    noisy = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.75, 0.3])
    text = tiny_pipe.encode_prompt(PROMPTS)
    with torch.no_grad():
        ours = task.velocity(task.models["dit"], batch, noisy, sigma)
        assert torch.equal(ours, tiny_pipe.predict(noisy, sigma, text, None, 1.0, 1.0))
        step = tiny_pipe.predict(noisy, sigma[0], text, None, 1.0, 1.0)
        assert torch.equal(task.velocity(task.models["dit"], batch, noisy, sigma[:1].expand(2)), step)
        assert not torch.equal(step, tiny_pipe.predict(noisy, sigma[0], text, None, 1.0, 3.5))  # guidance counts
    assert ours.shape == (2, 16, 8, 8) and ours.dtype == torch.float32


def test_direct_distillation_samples_on_the_pipelines_schedule(task, tiny_pipe):
    """`inference_sigmas` (what `--task direct_distill` steps along) is the schedule the pipeline's DiT sees at
    64x48 pixels in 3 steps, and stepping a seed's noise along it with the task's velocity gives the latent the
    pipeline decodes for that seed (at the task's embedded guidance, 1)."""
    from diffsynth.runtime.testing.distill import check_distill_matches_pipeline

    row = {"prompt": PROMPTS[0], "image": torch.zeros(3, 64, 48)}
    check_distill_matches_pipeline(task, tiny_pipe, row, timestep_arg=4, height=64, width=48, embedded_guidance=1.0)


@pytest.mark.parametrize("schnell", ["preset", "no_guidance_embedding"])
def test_direct_distillation_follows_the_presets_schedule(task, tiny_pipe, schnell, monkeypatch):
    """FLUX.1-schnell samples unshifted: by its preset's `sigma_shift` 1 (which `load_partial_pipeline` puts in
    the task's `pipe.defaults`), or from any folder by its DiT having no guidance embedding; `inference_sigmas`
    is that schedule, and an explicit `sigma_shift` task option wins over both."""
    from diffsynth.runtime.testing.distill import check_distill_matches_pipeline

    for pipe in (task.pipe, tiny_pipe):
        if schnell == "preset":
            monkeypatch.setitem(pipe.defaults, "sigma_shift", 1.0)
        else:  # the schedule's rule only: the tiny DiT keeps its guidance embedder
            monkeypatch.setattr(pipe.dit.config, "guidance_embed", False)
    row = {"prompt": PROMPTS[0], "image": torch.zeros(3, 64, 48)}
    check_distill_matches_pipeline(task, tiny_pipe, row, timestep_arg=4, height=64, width=48, embedded_guidance=1.0)
    unshifted = torch.linspace(1, 0, 5)
    torch.testing.assert_close(task.inference_sigmas((1, 16, 128, 128), 4), unshifted)
    monkeypatch.setattr(task, "sigma_shift", 3.0)  # --task_options sigma_shift=3
    torch.testing.assert_close(task.inference_sigmas((1, 16, 128, 128), 4), 3 * unshifted / (1 + 2 * unshifted))


def test_stages_load_only_what_they_need(tiny_repo):
    configs, tokenizer = configs_from_folder(tiny_repo)
    trainer_side = FluxTrainingTask.from_pretrained(
        configs, tokenizer_config=tokenizer, torch_dtype="float32", device="cpu", encoders=False
    )
    assert set(trainer_side.models) == {"dit"}
    assert trainer_side.pipe.tokenizer_1 is None and trainer_side.pipe.tokenizer_2 is None
    # no tokenizer config: the two folders are found beside the model files
    encoder_side = FluxTrainingTask.from_pretrained(configs, torch_dtype="float32", device="cpu", denoiser=False)
    assert set(encoder_side.models) == {"vae", "text_encoder_1", "text_encoder_2"}
    assert encoder_side.pipe.tokenizer_1 is not None and encoder_side.pipe.tokenizer_2 is not None


def test_preset_sources_give_both_tokenizers(bfl_repo_base, monkeypatch):
    """`--model black-forest-labs/FLUX.1-dev`: the preset names `tokenizer/`; `tokenizer_2/` comes from the same repo."""
    from diffsynth.runtime.pipeline import preset_sources
    from diffsynth.runtime.registry import find_preset

    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(bfl_repo_base))
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "1")
    configs, tokenizer, _ = preset_sources(find_preset("black-forest-labs/FLUX.1-dev")[1])
    task = FluxTrainingTask.from_pretrained(
        configs, tokenizer_config=tokenizer, torch_dtype="float32", device="cpu", denoiser=False
    )
    assert set(task.models) == {"vae", "text_encoder_1", "text_encoder_2"}
    assert task.pipe.tokenizer_1 is not None and task.pipe.tokenizer_2 is not None


def test_clear_errors(task, tiny_repo, tmp_path):
    with pytest.raises(ConfigError, match="row 0 of the batch"):
        task.encode([{"prompt": "x"}])
    configs, _ = configs_from_folder(tiny_repo)
    with pytest.raises(ConfigError, match="tokenizer_2/"):
        FluxTrainingTask.from_pretrained(
            configs, tokenizer_config=ModelConfig(path=str(tmp_path)), torch_dtype="float32", device="cpu"
        )
    dit_only = [c for c in configs if "transformer" in str(c.path)]
    with pytest.raises(ConfigError, match="needs"):
        FluxTrainingTask.from_pretrained(dit_only, torch_dtype="float32", device="cpu")


def test_full_export_replaces_the_diffusers_transformer_folder(task, tiny_repo, tmp_path):
    from safetensors.torch import load_file, save_file

    name = "diffusion_pytorch_model.safetensors"
    original = load_file(str(tiny_repo / "transformer" / name))
    untouched = task.export_state("dit", task.pipe.dit.state_dict())
    assert set(untouched) == set(original)  # diffusers' names: fused qkv and linear1 split
    assert all(torch.equal(untouched[k], original[k]) for k in original)  # untrained: the very file
    generator = torch.Generator().manual_seed(7)
    tuned = {k: v + 0.01 * torch.randn(v.shape, generator=generator) for k, v in task.pipe.dit.state_dict().items()}
    repo = shutil.copytree(tiny_repo, tmp_path / "tuned")  # the export in place of transformer/'s weights
    save_file({k: v.contiguous() for k, v in task.export_state("dit", tuned).items()}, str(repo / "transformer" / name))
    ours = FluxImagePipeline.from_pretrained(str(repo), torch_dtype="float32", device="cpu")
    assert all(torch.equal(ours.dit.state_dict()[k], v) for k, v in tuned.items())  # our pipeline reads it back


def test_diffusers_loads_the_full_export_strictly(task, tiny_repo, tmp_path):
    from safetensors.torch import save_file

    diffusers = pytest.importorskip("diffusers")
    export = shutil.copytree(tiny_repo / "transformer", tmp_path / "transformer")
    exported = task.export_state("dit", task.pipe.dit.state_dict())
    save_file({k: v.contiguous() for k, v in exported.items()}, str(export / "diffusion_pytorch_model.safetensors"))
    _, info = diffusers.FluxTransformer2DModel.from_pretrained(export, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


# ----------------------------------------------------------------------------------------- the trainer
@pytest.fixture(scope="module")
def train(tiny_repo, tmp_path_factory):
    """`diffsynth-train --family flux` on the tiny repo and two captioned noise pictures, each seen twice."""
    testing = pytest.importorskip("diffsynth.training.testing")
    dataset = testing.write_caption_dataset(tmp_path_factory.mktemp("flux-data"), PROMPTS)
    return testing.CliTrainer(tiny_repo, "flux", dataset, "--dataset_repeat", "2")


@pytest.mark.integration
def test_lora_training_gives_a_lora_the_pipeline_loads(tiny_repo, train, tmp_path):
    from diffsynth.training.testing import outputs_before_and_after_lora

    losses = train(tmp_path / "out")
    assert len(losses) == 2 and all(np.isfinite(losses)) and losses[0] > 0
    pipe = FluxImagePipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu")
    lora = tmp_path / "out" / "step-000002.safetensors"
    base, after = outputs_before_and_after_lora(pipe, lora, PROMPTS[0], seed=0, output_type="pt", **FAST)
    assert after.shape == base.shape == (1, 3, 64, 64)
    assert (after - base).abs().max() > 1e-4  # the LoRA changes the image


@pytest.mark.integration
def test_full_training_writes_weights_the_pipeline_loads(tiny_repo, tiny_pipe, train, tmp_path):
    from diffsynth.training.testing import configs_with_trained_weights

    losses = train(tmp_path / "out", "--trainable_models", "dit", "--max_steps", "1")
    assert len(losses) == 1 and np.isfinite(losses[0])
    tuned = FluxImagePipeline.from_pretrained(
        configs_with_trained_weights(tiny_repo, tmp_path / "out" / "step-000001" / "dit"),  # asserts files saved
        tokenizer_1_config=ModelConfig(path=str(tiny_repo / "tokenizer")),
        tokenizer_2_config=ModelConfig(path=str(tiny_repo / "tokenizer_2")),
        torch_dtype="float32",
        device="cpu",
    )
    image, reference = (p(PROMPTS[1], seed=1, output_type="pt", **FAST) for p in (tuned, tiny_pipe))
    assert (image - reference).abs().max() > 1e-5


@pytest.mark.integration
def test_cached_two_stage_training_gives_the_on_the_fly_loss(train, tmp_path):
    direct, cached = train.direct_and_cached(tmp_path, "--max_steps", "1")
    assert len(direct) == len(cached) == 1
    assert cached[0] == pytest.approx(direct[0], rel=1e-6, abs=1e-7)
