"""The Wan training task without the trainer: its encodings and its model call are the pipeline's own (text-to-video;
image-conditioned models in test_training_i2v.py)."""

import pytest
import torch

from diffsynth.runtime.errors import ConfigError
from diffsynth.wan import WanVideoPipeline
from diffsynth.wan.pipeline import WanConditions, folder_model_configs
from diffsynth.wan.training import WanTrainingTask

PROMPTS = ["a red circle on a blue background", "a small green square in the top left corner"]


@pytest.fixture(scope="module")
def loaded(tiny_repo):
    configs, tokenizer = folder_model_configs(tiny_repo)
    task = WanTrainingTask.from_pretrained(configs, tokenizer_config=tokenizer, torch_dtype="float32", device="cpu")
    pipe = WanVideoPipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu")
    return task, pipe


def rows():
    g = torch.Generator().manual_seed(0)
    video = torch.rand(3, 5, 32, 32, generator=g) * 2 - 1
    image = torch.rand(3, 32, 32, generator=g) * 2 - 1
    return [{"prompt": PROMPTS[0], "video": video}, {"prompt": PROMPTS[1], "image": image}]


def test_task_declares_the_protocol_attributes(loaded):
    task, _ = loaded
    assert (task.family, task.denoiser_slot, task.media) == ("wan", "dit", ("video", "image"))
    assert task.size_multiple == 16 and task.scheduler.template == "wan"
    assert set(task.models) == {"dit", "vae", "text_encoder"}
    assert set(task.model_files) >= {"dit", "vae", "text_encoder"}


def test_encode_gives_the_pipeline_encodings(loaded):
    task, pipe = loaded
    video_row, image_row = rows()
    samples = task.encode([video_row, image_row])
    context = pipe.encode_prompt(PROMPTS)
    assert samples[0]["latents"].shape == (16, 2, 4, 4) and samples[1]["latents"].shape == (16, 1, 4, 4)
    torch.testing.assert_close(samples[0]["latents"], pipe.vae.encode(video_row["video"][None])[0])
    torch.testing.assert_close(samples[1]["latents"], pipe.vae.encode(image_row["image"][None, :, None])[0])
    for sample, ctx in zip(samples, context, strict=True):
        assert sample["text"].shape == ctx.shape == (512, 32)
        torch.testing.assert_close(sample["text"], ctx)


def test_velocity_is_the_pipeline_per_step_prediction(loaded):
    task, pipe = loaded
    batch = task.collate(task.encode([rows()[0]] * 2))
    assert batch["latents"].shape == (2, 16, 2, 4, 4) and batch["text"].shape == (2, 512, 32)
    noisy = torch.randn(2, 16, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.75, 0.75])
    with torch.no_grad():
        ours = task.velocity(task.models["dit"], batch, noisy, sigma)
        t = pipe.timestep_input(pipe.dit, noisy, torch.tensor(750.0), False)
        theirs = pipe.predict(pipe.dit, noisy, t, WanConditions(pipe.encode_prompt([PROMPTS[0]] * 2)), None, 1.0, False)
    torch.testing.assert_close(ours, theirs)


def test_direct_distillation_samples_on_the_pipelines_schedule(loaded):
    """`inference_sigmas` (what `--task direct_distill` steps along) is the schedule the pipeline's DiT sees (x 1000)
    for one 32x48 frame in 3 steps, and stepping a seed's noise along it with the task's velocity gives the latent
    the pipeline decodes for that seed."""
    from diffsynth.runtime.testing.distill import check_distill_matches_pipeline

    task, pipe = loaded
    row = {"prompt": PROMPTS[0], "image": torch.zeros(3, 32, 48)}
    options = dict(height=32, width=48, num_frames=1, tiled=False)
    check_distill_matches_pipeline(task, pipe, row, timestep_arg=1, timestep_scale=1000, **options)


@pytest.mark.parametrize("shift", [3.0, 16.0])
def test_direct_distillation_follows_the_presets_sigma_shift(loaded, shift, monkeypatch):
    """A preset's `sigma_shift` (Wan2.1-I2V-480P's 3, FLF2V's 16), which `load_partial_pipeline` puts in the
    task's `pipe.defaults`, is the shift of the schedule the pipeline samples and `inference_sigmas` steps along;
    an explicit `sigma_shift` task option wins."""
    from diffsynth.runtime.testing.distill import check_distill_matches_pipeline

    task, pipe = loaded
    for defaults in (task.pipe.defaults, pipe.defaults):
        monkeypatch.setitem(defaults, "sigma_shift", shift)
    row = {"prompt": PROMPTS[0], "image": torch.zeros(3, 32, 48)}
    options = dict(height=32, width=48, num_frames=1, tiled=False)
    check_distill_matches_pipeline(task, pipe, row, timestep_arg=1, timestep_scale=1000, **options)
    t = torch.linspace(1, 0, 5)
    torch.testing.assert_close(task.inference_sigmas((1, 16, 1, 4, 4), 4), shift * t / (1 + (shift - 1) * t))
    monkeypatch.setattr(task, "sigma_shift", 5.0)  # --task_options sigma_shift=5
    torch.testing.assert_close(task.inference_sigmas((1, 16, 1, 4, 4), 4), 5 * t / (1 + 4 * t))


def test_stages_load_only_what_they_need(tiny_repo):
    configs, tokenizer = folder_model_configs(tiny_repo)
    trainer_side = WanTrainingTask.from_pretrained(configs, torch_dtype="float32", device="cpu", encoders=False)
    assert set(trainer_side.models) == {"dit"} and trainer_side.pipe.tokenizer is None
    encoder_side = WanTrainingTask.from_pretrained(
        configs, tokenizer_config=tokenizer, torch_dtype="float32", device="cpu", denoiser=False
    )
    assert set(encoder_side.models) == {"vae", "text_encoder"}


def test_clear_errors(loaded, tiny_repo_factory):
    task, _ = loaded
    bad = {"prompt": "x", "video": torch.zeros(3, 4, 32, 32)}
    with pytest.raises(ConfigError, match=r"row 0.*4 frames.*--num_frames"):
        task.encode([bad])
    with pytest.raises(ConfigError, match="row 0 of the batch"):
        task.encode([{"prompt": "x"}])
    with pytest.raises(ConfigError, match="mixes latent shapes"):
        task.collate(task.encode(rows()))
    configs, tokenizer = folder_model_configs(tiny_repo_factory("a14b"))
    with pytest.raises(ConfigError, match="train one expert at a time"):
        WanTrainingTask.from_pretrained(configs, tokenizer_config=tokenizer, torch_dtype="float32", device="cpu")
