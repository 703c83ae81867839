"""The Qwen-Image 2.1 training task: its encodings and model call are `QwenImage21Pipeline`'s own (text-to-image
and with condition images), its noise levels the model's schedule at 1024x1024, and the trainer
(`diffsynth-train --family qwen_image21`) trains it end to end on RGBA pictures.

The tiny repo is `qwen_image21_repo.py`'s (our own modules in the hub's layout: no diffusers needed, so the
per-package and integration sessions run these; `output_resolution` 64 so the condition images fit the tiny
processor's 128x128 pixels). The trainer tests are `integration` (they need
diffsynth-training installed, which the per-package session does not install).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffsynth.qwen_image.qwen_image21.pipeline import (
    PromptEncoding,
    QwenImage21Pipeline,
    latents_to_tokens,
    qwen_image21_velocity,
    tokens_to_latents,
)
from diffsynth.qwen_image.qwen_image21.schedule import ScheduleSettings
from diffsynth.qwen_image.qwen_image21.training import QwenImage21TrainingTask, training_mu
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.media import pil_to_tensor
from diffsynth.runtime.pipeline import configs_from_folder
from diffsynth.runtime.schedulers import FlowMatchScheduler
from diffsynth.runtime.schedulers.templates import linear_mu
from diffsynth.runtime.testing.modules import load_beside

R = load_beside(__file__, "qwen_image21_repo.py", "qwen_image21_repo")
fx, SCHEDULER = R.fx, R.SCHEDULER

PROMPTS = ["a red circle on a blue background", "a small green square"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return R.build_repo(tmp_path_factory.mktemp("tiny-qwen-image-21-training"))


@pytest.fixture(scope="module")
def pipe(repo) -> QwenImage21Pipeline:
    return QwenImage21Pipeline.from_pretrained(str(repo), torch_dtype=torch.float32, device="cpu")


def make_task(repo: Path, **options) -> QwenImage21TrainingTask:
    configs, tokenizer = configs_from_folder(repo)
    return QwenImage21TrainingTask.from_pretrained(
        configs, tokenizer_config=tokenizer, torch_dtype="float32", device="cpu", **options
    )


@pytest.fixture(scope="module")
def task(repo) -> QwenImage21TrainingTask:
    return make_task(repo)


def condition_images() -> list[Image.Image]:
    """An RGBA picture with transparent pixels and an RGB one, at sizes the pipeline resizes."""
    rng = np.random.default_rng(7)
    rgba = rng.integers(0, 256, (40, 72, 4), dtype=np.uint8)
    rgba[..., 3] = np.where(rng.random((40, 72)) < 0.3, 0, 255)
    return [Image.fromarray(rgba, "RGBA"), Image.fromarray(rng.integers(0, 256, (64, 48, 3), dtype=np.uint8))]


def rows(conditions: list[Image.Image] | None = None, size: tuple[int, int] = (64, 64)) -> list[dict]:
    """Rows as the dataset gives them with image_mode "RGBA": tensors in [-1, 1], condition images at their size."""
    g = torch.Generator().manual_seed(0)
    out = []
    for prompt in PROMPTS:
        row = {"prompt": prompt, "image": torch.rand(4, size[1], size[0], generator=g) * 2 - 1}
        if conditions is not None:
            row["edit_image"] = [pil_to_tensor(image, mode="RGBA")[0] for image in conditions]
        out.append(row)
    return out


def pipeline_calls(pipe: QwenImage21Pipeline, prompts, **call) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(target tokens, sigma, prediction) of every DiT call of one pipeline run."""
    seen = []

    def hook(module, args, kwargs, output):
        latents, sigma = args[0], args[1]
        n_target = output.shape[1]
        seen.append((latents[:, -n_target:].clone(), sigma.clone(), output.clone()))

    handle = pipe.dit.register_forward_hook(hook, with_kwargs=True)
    try:
        pipe(prompts, seed=3, progress_bar=False, output_type="pt", **call)
    finally:
        handle.remove()
    return seen


# ----------------------------------------------------------------------------------------- the task
def test_task_declares_the_protocol_attributes(task):
    from diffsynth.runtime.registry import installed_families

    assert (task.family, task.denoiser_slot, task.media, task.size_multiple) == ("qwen_image21", "dit", ("image",), 32)
    assert (task.conditioning, task.image_mode, task.validation_references) == (("edit_image",), "RGBA", "optional")
    assert task.loss_options == ("exponential_shift_mu",)
    assert not getattr(task, "ddp_find_unused_parameters", False)  # every weight gets a gradient (see below)
    assert set(task.models) == {"dit", "vae", "text_encoder"} and set(task.model_files) == set(task.models)
    assert task.pipe.processor is not None and task.pipe.tokenizer is not None
    family = installed_families()["qwen_image21"]
    assert family.training == "diffsynth.qwen_image.qwen_image21.training:QwenImage21TrainingTask"
    assert task.reference_arguments([]) == {} and task.reference_arguments(("a", "b")) == {"edit_image": ["a", "b"]}


def test_the_noise_levels_are_the_model_schedule_at_1024(repo, task):
    """mu is the tiny repo's dynamic shift at 64x64 latent tokens, the terminal its shift_terminal: the training
    grid is the model's own 1000-step schedule for 1024x1024 pictures; a stage without the encoders (training
    from a cache) reads the same schedule without loading the processor; `exponential_shift_mu` overrides."""
    mu = linear_mu(4096, 256, 8192, 0.5, 0.9)
    assert task.scheduler.template == "qwen_image"
    assert task.scheduler.template_defaults == pytest.approx({"mu": mu, "shift_terminal": 0.02})
    task.scheduler.set_training_grid()
    expected = ScheduleSettings.from_configs(SCHEDULER).sigmas(1000, 4096)[:-1]
    torch.testing.assert_close(task.scheduler.train_sigmas.float(), expected, rtol=0, atol=1e-6)
    trainer_side = make_task(repo, encoders=False)
    assert set(trainer_side.models) == {"dit"} and trainer_side.pipe.processor is None
    assert trainer_side.pipe.tokenizer is None
    assert trainer_side.scheduler.template_defaults == task.scheduler.template_defaults
    encoder_side = make_task(repo, denoiser=False)
    assert set(encoder_side.models) == {"vae", "text_encoder"}
    override = make_task(repo, encoders=False, exponential_shift_mu=0.8)
    assert override.scheduler.template_defaults == {"mu": 0.8, "shift_terminal": 0.02}


@pytest.mark.parametrize(
    "config",
    [
        {"use_dynamic_shifting": True, "time_shift_type": "linear", "base_shift": 0.7, "max_shift": 2.5},
        {"shift": 3.0},
        {},
    ],
    ids=["linear", "static", "none"],
)
def test_other_schedules_give_the_exponential_mu_that_equals_them(config):
    settings = ScheduleSettings.from_configs(config)
    scheduler = FlowMatchScheduler("qwen_image", mu=training_mu(settings), shift_terminal=None)
    scheduler.set_timesteps(20)
    torch.testing.assert_close(scheduler.sigmas, settings.sigmas(20, 4096), rtol=0, atol=1e-6)


def test_encode_and_collate_give_the_pipeline_encodings(task, pipe):
    """Text-to-image: the VAE latents of the same pixels, the prompts' own tokens (no slots) padded as the
    pipeline pads a batch; a 3-channel image is an opaque one."""
    batch_rows = rows()
    samples = task.encode(batch_rows)
    pixels = torch.stack([r["image"] for r in batch_rows])
    latents = pipe.vae.encode(pixels)
    text = pipe.encode_prompt(PROMPTS, [])
    assert text.mask is not None and text.mask.sum(1).tolist()[0] != text.mask.sum(1).tolist()[1]
    for i, sample in enumerate(samples):
        assert set(sample) == {"latents", "text", "slots"}
        assert torch.equal(sample["latents"], latents[i].float()) and sample["latents"].shape == (4, 4, 4)
        alone = pipe.encode_prompt([PROMPTS[i]], [])
        assert torch.equal(sample["text"], alone.embeds[0]) and not sample["slots"].any()
    batch = task.collate(samples)
    assert batch["latents"].shape == (2, 4, 4, 4) and batch["conditions"] == []
    assert torch.equal(batch["text_mask"], text.mask) and torch.equal(batch["slots"], text.slots)
    torch.testing.assert_close(batch["text"], text.embeds, rtol=0, atol=1e-5)  # one prompt or two: rounding
    opaque = [dict(batch_rows[0], image=batch_rows[0]["image"][:3])]
    with_alpha = [dict(batch_rows[0], image=torch.cat([batch_rows[0]["image"][:3], torch.ones(1, 64, 64)]))]
    assert torch.equal(task.encode(opaque)[0]["latents"], task.encode(with_alpha)[0]["latents"])


def test_velocity_is_the_prediction_the_pipeline_makes(task, pipe):
    """At every step of a pipeline run (prefix cache on), the task's velocity on the same noisy latents and sigma
    is the DiT output the pipeline used: training fits what sampling reads."""
    batch = task.collate(task.encode(rows()))
    calls = pipeline_calls(pipe, PROMPTS, height=64, width=64, num_inference_steps=2)
    assert len(calls) == 2
    for tokens, sigma, prediction in calls:
        noisy = tokens_to_latents(tokens, 4, 4)
        with torch.no_grad():
            ours = task.velocity(task.models["dit"], batch, noisy, sigma)
        assert ours.shape == (2, 4, 4, 4)
        torch.testing.assert_close(latents_to_tokens(ours), prediction, rtol=0, atol=1e-5)


def test_condition_images_are_encoded_and_read_as_the_pipeline_does(task, pipe):
    """Two condition images (RGBA with transparency, and RGB) shared by a batch: their latents, the prompt's vision
    slots and the velocity are the pipeline's (`condition_images` at output_resolution 64, `encode_conditions`,
    `encode_prompt`, `qwen_image21_velocity`), and the pipeline's prediction at each step."""
    images = condition_images()
    batch_rows = rows(images)
    samples = task.encode(batch_rows)
    targets = pipe.vae.encode(torch.stack([r["image"] for r in batch_rows])).float()
    conditions = pipe.condition_images(images, 64)
    assert [c.size for c in conditions] == [(96, 32), (64, 64)]
    tokens, shapes = pipe.encode_conditions(conditions, {"tiled": False})
    text = pipe.encode_prompt(PROMPTS, conditions)
    for i, sample in enumerate(samples):
        assert set(sample) == {"latents", "text", "slots", "cond_0", "cond_1"}
        assert torch.equal(sample["latents"], targets[i])
        assert sample["cond_0"].shape == (4, 2, 6) and sample["cond_1"].shape == (4, 4, 4)
        joined = torch.cat([latents_to_tokens(sample[f"cond_{k}"][None]) for k in range(2)], dim=1)
        assert torch.equal(joined, tokens)
        assert int(sample["slots"].sum()) == (2 * 6 + 4 * 4) // 4
    batch = task.collate(samples)
    assert torch.equal(batch["slots"], text.slots) and torch.equal(batch["text_mask"], text.mask)
    torch.testing.assert_close(batch["text"], text.embeds, rtol=0, atol=1e-5)

    noisy = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.75, 0.3])
    with torch.no_grad():
        ours = task.velocity(task.models["dit"], batch, noisy, sigma)
        shared = PromptEncoding(text.embeds, text.mask, text.slots, None)
        theirs = qwen_image21_velocity(pipe.dit, latents_to_tokens(noisy), sigma, shared, [*shapes, (1, 4, 4)], tokens)
        plain = task.velocity(task.models["dit"], task.collate(task.encode(rows())), noisy, sigma)
    torch.testing.assert_close(latents_to_tokens(ours), theirs, rtol=0, atol=1e-5)
    assert (ours - plain).abs().max() > 1e-3  # the condition images count

    calls = pipeline_calls(pipe, PROMPTS, edit_image=images, height=64, width=64, num_inference_steps=2)
    for tokens_in, sigma, prediction in calls:
        with torch.no_grad():
            ours = task.velocity(task.models["dit"], batch, tokens_to_latents(tokens_in, 4, 4), sigma)
        torch.testing.assert_close(latents_to_tokens(ours), prediction, rtol=0, atol=1e-5)


def test_every_weight_of_the_dit_gets_a_gradient(repo):
    """A backward pass through the velocity (with condition images, the prefix in the graph) reaches every DiT
    weight: the prefix's last-block outputs feed nothing, but their weights are the target's too, so DDP need
    not look for unused parameters."""
    task = make_task(repo)
    dit = task.models["dit"]
    for rows_ in (rows(condition_images()), rows()):
        batch = task.collate(task.encode(rows_))
        dit.zero_grad(set_to_none=True)
        dit.requires_grad_(True)
        noisy = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(2))
        task.velocity(dit, batch, noisy, torch.tensor([0.9, 0.2])).square().mean().backward()
        missing = [name for name, p in dit.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        assert not missing


def test_bad_rows_and_batches_are_named(task, monkeypatch):
    good = rows()
    with pytest.raises(ConfigError, match="row 1 of the batch has"):
        task.encode([good[0], {"prompt": "no image"}])
    with pytest.raises(ConfigError, match=r"row 0: the image must be \[4, H, W\]"):
        task.encode([dict(good[0], image=torch.zeros(2, 64, 64))])
    with pytest.raises(ConfigError, match="row 0: the image is 48x64 pixels.*multiples of 32"):
        task.encode([dict(good[0], image=torch.zeros(4, 64, 48))])
    images = condition_images()
    mixed = task.encode([rows(images)[0], good[1]])
    with pytest.raises(ConfigError, match="different condition images.*--batch_size 1"):
        task.collate(mixed)
    thin = Image.new("RGBA", (400, 8))
    with pytest.raises(ConfigError, match=r"row 1 of the batch \(prompt 'a small green square'\): edit_image\[0\]"):
        task.encode([good[0], dict(good[1], edit_image=thin)])
    monkeypatch.setitem(task.pipe.defaults, "output_resolution", 256)  # past the tiny processor's 128x128 pixels
    with pytest.raises(ConfigError, match=r"row 0 of the batch .*vision slots"):
        task.encode([dict(good[0], edit_image=images[1])])
    with pytest.raises(ConfigError, match="output_resolution=16"):
        QwenImage21TrainingTask(task.pipe, output_resolution=16)
    with pytest.raises(ConfigError, match="exponential_shift_mu='high'"):
        QwenImage21TrainingTask(task.pipe, exponential_shift_mu="high")


def test_validation_samples_are_the_pipeline_with_the_same_condition_images(task, pipe):
    references = [[condition_images()[1]], []]
    with torch.no_grad():
        drawn = task.sample(task.models["dit"], PROMPTS, seed=3, references=references, num_inference_steps=2)
    theirs = pipe(PROMPTS[0], edit_image=references[0], seed=3, num_inference_steps=2, progress_bar=False)
    assert drawn[0].mode == "RGBA" and drawn[0].size == (64, 64)
    assert np.array_equal(np.asarray(drawn[0]), np.asarray(theirs))


# ----------------------------------------------------------------------------------------- the trainer
def rgba_picture(rng, width: int, height: int) -> Image.Image:
    pixels = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    pixels[..., 3] = np.where(rng.random((height, width)) < 0.4, 0, 255)
    return Image.fromarray(pixels, "RGBA")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Two 64x64 RGBA pictures (transparent pixels), each with an RGBA condition image (`edit_image`; the second
    row's as a JSON list)."""
    testing = pytest.importorskip("diffsynth.training.testing")
    folder = tmp_path_factory.mktemp("qwen21-data")
    rng = np.random.default_rng(0)
    extra = []
    for i in range(2):
        rgba_picture(rng, 48, 32).save(folder / f"cond{i}.png")
        extra.append({"edit_image": f"cond{i}.png" if i == 0 else [f"cond{i}.png"]})
    images = [rgba_picture(rng, 64, 64) for _ in PROMPTS]
    rgba_picture(rng, 48, 32).save(folder / "reference.png")
    return testing.write_caption_dataset(folder, PROMPTS, images=images, extra=extra)


@pytest.fixture(scope="module")
def train(repo, dataset):
    """`diffsynth-train --family qwen_image21` on the tiny repo and dataset (sizes in multiples of 32), each row seen
    twice."""
    testing = pytest.importorskip("diffsynth.training.testing")
    return testing.CliTrainer(repo, "qwen_image21", dataset, "--bucket_step", "32", "--dataset_repeat", "2")


@pytest.mark.integration
def test_lora_training_writes_a_lora_the_pipeline_loads_and_rgba_samples(repo, pipe, train, tmp_path):
    """Two LoRA steps on RGBA rows with condition images; the validation sample (an edit of an RGBA reference) is
    an RGBA png; the LoRA changes what the pipeline draws."""
    from diffsynth.training.testing import outputs_before_and_after_lora

    out = tmp_path / "out"
    validation = ["--validation_prompts", PROMPTS[0], "--validation_images", "reference.png"]
    losses = train(out, *validation, "--validation_num_inference_steps", "1")
    assert len(losses) == 2 and all(np.isfinite(losses)) and losses[0] > 0
    assert (out / "checkpoints" / "step-000002").is_dir()
    with Image.open(out / "validation" / "step-000002-0.png") as sample:
        assert sample.mode == "RGBA" and sample.size == (64, 64)
    tuned = QwenImage21Pipeline.from_pretrained(str(repo), torch_dtype=torch.float32, device="cpu")
    call = dict(seed=0, output_type="pt", num_inference_steps=2, progress_bar=False, edit_image=condition_images())
    base, after = outputs_before_and_after_lora(tuned, out / "step-000002.safetensors", PROMPTS[0], **call)
    assert after.shape == base.shape == (1, 4, 64, 64)
    assert (after - base).abs().max() > 1e-4


@pytest.mark.integration
def test_resumed_lora_training_continues_where_it_stopped(train, tmp_path):
    """2 steps straight == 1 step, then `--resume latest` for the second (the optimizer, noise and data position
    come back from the checkpoint)."""
    from safetensors.torch import load_file

    straight_losses = train(tmp_path / "straight")
    assert len(train(tmp_path / "resumed", "--max_steps", "1")) == 1
    resumed_losses = train(tmp_path / "resumed", "--resume", "latest")  # its metrics.jsonl goes on
    assert resumed_losses == pytest.approx(straight_losses, rel=1e-6) and len(straight_losses) == 2
    name = Path("checkpoints") / "step-000002" / "trainable.safetensors"
    straight, resumed = (load_file(str(tmp_path / run / name)) for run in ("straight", "resumed"))
    assert straight.keys() == resumed.keys() and len(straight) > 0
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=1e-6)


@pytest.mark.integration
def test_full_training_writes_weights_the_pipeline_loads(repo, pipe, train, tmp_path):
    from diffsynth.training.testing import configs_with_trained_weights

    losses = train(tmp_path / "out", "--trainable_models", "dit", "--max_steps", "1")
    assert len(losses) == 1 and math.isfinite(losses[0])
    configs = configs_with_trained_weights(repo, tmp_path / "out" / "step-000001" / "dit")
    processor = ModelConfig(path=str(repo / "processor"))
    tuned = QwenImage21Pipeline.from_pretrained(
        configs, tokenizer_config=processor, torch_dtype="float32", device="cpu"
    )
    call = dict(seed=1, output_type="pt", height=64, width=64, num_inference_steps=2, progress_bar=False)
    image, reference = (p(PROMPTS[1], **call) for p in (tuned, pipe))
    assert (image - reference).abs().max() > 1e-5


@pytest.mark.integration
def test_cached_two_stage_training_gives_the_on_the_fly_loss_from_the_rgba_pixels(pipe, dataset, train, tmp_path):
    """The cache holds the latents of the pictures with their alpha (the trainer's dataset reads the task's
    `image_mode`), and training from it gives the loss of training on the fly."""
    from safetensors.torch import load_file

    direct, cached = train.direct_and_cached(tmp_path, "--max_steps", "1")
    assert len(direct) == len(cached) == 1
    assert cached[0] == pytest.approx(direct[0], rel=1e-5)
    stored = load_file(str(tmp_path / "cache" / "items" / "000000.safetensors"))
    assert set(stored) == {"latents", "text", "slots", "cond_0"} and stored["cond_0"].shape == (4, 4, 4)
    with Image.open(dataset / "img0.png") as picture:
        pixels = pil_to_tensor(picture, mode="RGBA")
    torch.testing.assert_close(stored["latents"], pipe.vae.encode(pixels)[0], rtol=0, atol=1e-5)  # batch of 2: rounding
    opaque = pipe.vae.encode(torch.cat([pixels[:, :3], torch.ones_like(pixels[:, 3:])], dim=1))[0]
    assert (stored["latents"] - opaque).abs().max() > 1e-3  # the alpha was read
