"""Image-conditioned Wan training: I2V / FLF2V conditions, TI2V's clean first frame, the A14B experts' noise ranges.

The references are the pipeline's own generation path (its DiT call, recorded by a hook while it generates one
step from the same latents) and the loss as DiffSynth-Studio defines it; the trainer tests need diffsynth-training.
"""

from __future__ import annotations

import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.media import pil_to_tensor
from diffsynth.wan import WanVideoPipeline
from diffsynth.wan.pipeline import folder_model_configs
from diffsynth.wan.training import EXPERT_BOUNDARY, ExpertScheduler, WanTrainingTask

PROMPTS = ["a red circle on a blue background", "a small green square in the top left corner"]


def load_task(repo, *, keep=lambda config: True, **options) -> WanTrainingTask:
    configs, tokenizer = folder_model_configs(repo)
    configs = [c for c in configs if keep(c)]
    return WanTrainingTask.from_pretrained(
        configs, tokenizer_config=tokenizer, torch_dtype="float32", device="cpu", **options
    )


def frames(seed: int, count: int = 5, size: int = 32) -> list[Image.Image]:
    """8-bit random frames, as a dataset's files give them."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


def as_video(pictures: list[Image.Image]) -> torch.Tensor:
    return pil_to_tensor(pictures).transpose(0, 1)  # [3, F, H, W]


def pipeline_velocity(pipe: WanVideoPipeline, prompt: str, noisy: torch.Tensor, sigma: float, **images):
    """What the pipeline's DiT returns at its first step from `noisy` at `sigma` (one step, no guidance)."""
    seen = []
    hook = pipe.dit.register_forward_hook(lambda module, args, output: seen.append(output.detach().clone()))
    try:
        _, _, f, h, w = noisy.shape
        s = pipe.vae.spatial_compression
        pipe(
            prompt, latents=noisy, sigmas=[sigma], height=h * s, width=w * s, num_frames=1 + 4 * (f - 1),
            cfg_scale=1.0, tiled=False, progress_bar=False, output_type="pt", **images,
        )  # fmt: skip
    finally:
        hook.remove()
    return seen[0]


@pytest.fixture(scope="module")
def i2v(tiny_repo_factory):
    repo = tiny_repo_factory("i2v")
    return load_task(repo), WanVideoPipeline.from_pretrained(str(repo), torch_dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def ti2v(tiny_repo_factory):
    """TI2V trained image-to-video (`first_frame=true`, DiffSynth-Studio's `--extra_inputs input_image`)."""
    repo = tiny_repo_factory("ti2v")
    task = load_task(repo, first_frame=True)
    return task, WanVideoPipeline.from_pretrained(str(repo), torch_dtype="float32", device="cpu")


# ----------------------------------------------------------------------------------------- (a) the pipeline's call
def test_i2v_velocity_is_the_pipeline_prediction_with_first_frame_conditions(i2v):
    task, pipe = i2v
    videos = [frames(1), frames(2)]
    samples = task.encode([{"prompt": p, "video": as_video(v)} for p, v in zip(PROMPTS, videos, strict=True)])
    assert set(samples[0]) == {"latents", "text", "y", "clip_feature"}
    assert samples[0]["y"].shape == (4 + 16, 2, 4, 4) and samples[0]["clip_feature"].shape == (5, 128)
    batch = task.collate(samples)
    noisy = torch.randn(2, 16, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.8, 0.35])
    with torch.no_grad():
        ours = task.velocity(task.models["dit"], batch, noisy, sigma)
    for k in range(2):  # the pipeline conditioned on the video's first frame, given as its input_image
        theirs = pipeline_velocity(pipe, PROMPTS[k], noisy[k : k + 1], float(sigma[k]), input_image=videos[k][0])
        torch.testing.assert_close(ours[k : k + 1], theirs, rtol=1e-5, atol=1e-5)


def test_i2v_input_and_end_image_columns_are_the_pipeline_input_and_end_image(i2v):
    task, pipe = i2v
    video, start, end = frames(3), frames(4, count=1)[0], frames(5, count=1)[0]
    row = {"prompt": PROMPTS[0], "video": as_video(video), "input_image": pil_to_tensor(start)[0]}
    row["end_image"] = pil_to_tensor(end)[0]
    batch = task.collate(task.encode([row]))
    assert batch["clip_feature"].shape == (1, 5, 128)  # the last image is in y; CLIP sees it only for FLF2V
    noisy = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = task.velocity(task.models["dit"], batch, noisy, torch.tensor([0.6]))
    theirs = pipeline_velocity(pipe, PROMPTS[0], noisy, 0.6, input_image=start, end_image=end)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    mixed = task.collate(task.encode([row, {"prompt": PROMPTS[1], "video": as_video(video)}]))
    assert mixed["clip_feature"].shape == (2, 5, 128)  # rows with and without an end_image batch together


def test_ti2v_velocity_is_the_pipeline_prediction_with_the_clean_first_frame(ti2v):
    task, pipe = ti2v
    assert task.size_multiple == 32  # 16x VAE, 2x2 patches
    videos = [frames(6, size=64), frames(7, size=64)]
    samples = task.encode([{"prompt": p, "video": as_video(v)} for p, v in zip(PROMPTS, videos, strict=True)])
    assert set(samples[0]) == {"latents", "text", "first_latent"} and samples[0]["first_latent"].shape == (48, 1, 4, 4)
    batch = task.collate(samples)
    noisy = torch.randn(2, 48, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor([0.9, 0.4])
    with torch.no_grad():
        ours = task.velocity(task.models["dit"], batch, noisy, sigma)
    for k in range(2):
        theirs = pipeline_velocity(pipe, PROMPTS[k], noisy[k : k + 1], float(sigma[k]), input_image=videos[k][0])
        torch.testing.assert_close(ours[k : k + 1], theirs, rtol=1e-5, atol=1e-5)
    image_row = task.encode([{"prompt": PROMPTS[0], "image": as_video(videos[0][:1])[:, 0]}])[0]
    assert set(image_row) == {"latents", "text"}  # one frame: nothing to condition on, trains as text-to-image


def test_ti2v_trains_text_to_video_by_default(ti2v, caplog):
    """As DiffSynth-Studio without `--extra_inputs input_image`: no first latent, the whole clip in the loss, the
    pipeline's text-to-video call (no input_image), and a row's input_image ignored with a warning naming the
    option; validation samples take a first frame only when given one."""
    pipe = ti2v[0].pipe
    with caplog.at_level("INFO", logger="diffsynth.wan.training"):
        task = WanTrainingTask(pipe)
    assert "first_frame=true" in caplog.text and task.validation_references == "optional"
    video = frames(14, size=64)
    row = {"prompt": PROMPTS[0], "video": as_video(video), "input_image": pil_to_tensor(video[0])[0]}
    caplog.clear()
    with caplog.at_level("WARNING", logger="diffsynth.wan.training"):
        batch = task.collate(task.encode([row, row]))
    assert set(batch) == {"latents", "text"} and task.loss_mask(batch) is None
    assert caplog.text.count("--task_options first_frame=true") == 1  # once, not per row
    assert task.draw_choices(batch, torch.Generator().manual_seed(0)) == {}
    noisy = torch.randn(1, 48, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = task.velocity(task.models["dit"], {k: v[:1] for k, v in batch.items()}, noisy, torch.tensor([0.7]))
    torch.testing.assert_close(ours, pipeline_velocity(pipe, PROMPTS[0], noisy, 0.7), rtol=1e-5, atol=1e-5)


def test_ti2v_first_frame_probability_draws_per_batch(ti2v, i2v):
    """`first_frame=0.5`: every clip is encoded with its first latent; one draw per batch (`draw_choices`) says
    whether the batch trains image-to-video, and `velocity` and `loss_mask` follow it."""
    task, _ = ti2v
    mixed = WanTrainingTask(task.pipe, first_frame=0.5)
    batch = mixed.collate(mixed.encode([{"prompt": PROMPTS[0], "video": as_video(frames(15, size=64))}]))
    assert "first_latent" in batch and mixed.validation_references == "optional"
    draws = [mixed.draw_choices(batch, torch.Generator().manual_seed(k))["first_frame"] for k in range(8)]
    assert {bool(d.all()) for d in draws} == {True, False}
    noisy = torch.randn(1, 48, 2, 4, 4, generator=torch.Generator().manual_seed(4))
    sigma = torch.tensor([0.6])
    with torch.no_grad():
        conditioned = mixed.velocity(mixed.models["dit"], {**batch, "first_frame": torch.tensor([True])}, noisy, sigma)
        plain = mixed.velocity(mixed.models["dit"], {**batch, "first_frame": torch.tensor([False])}, noisy, sigma)
        torch.testing.assert_close(conditioned, task.velocity(task.models["dit"], batch, noisy, sigma))
        batch_t2v = {k: v for k, v in batch.items() if k != "first_latent"}
        torch.testing.assert_close(
            plain, WanTrainingTask(task.pipe).velocity(task.models["dit"], batch_t2v, noisy, sigma)
        )
    assert mixed.loss_mask({**batch, "first_frame": torch.tensor([False])}) is None
    assert mixed.loss_mask({**batch, "first_frame": torch.tensor([True])})[0, 0, 0].item() == 0
    with pytest.raises(ConfigError, match="first_frame=0.5 draws per batch"):
        mixed.loss_mask(batch)
    for bad in (2, "yes", -0.1):
        with pytest.raises(ConfigError, match=f"first_frame={bad!r} is not accepted"):
            WanTrainingTask(task.pipe, first_frame=bad)
    assert WanTrainingTask(i2v[0].pipe, first_frame=True).first_frame_p == 0.0  # I2V always takes its frame
    with pytest.raises(ConfigError, match="first_frame=0.5 picks text- or image-to-video .* 'i2v' Wan DiT"):
        WanTrainingTask(i2v[0].pipe, first_frame=0.5)


def test_encoding_without_the_dit_gives_the_same_samples(i2v, tiny_repo_factory):
    task, _ = i2v
    encoder = load_task(tiny_repo_factory("i2v"), denoiser=False)
    assert set(encoder.models) == {"vae", "text_encoder", "image_encoder"}
    row = {"prompt": PROMPTS[0], "video": as_video(frames(8))}
    for ours, theirs in zip(encoder.encode([row]), task.encode([row]), strict=True):
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert torch.equal(ours[key], theirs[key]), key
    trainer_side = load_task(tiny_repo_factory("i2v"), encoders=False)
    assert set(trainer_side.models) == {"dit"}

    # FLF2V (a DiT with CLIP positions for two images): the video's last frame is the end image by default
    flf2v = WanTrainingTask(encoder.pipe, dit_config=replace(encoder.dit_config, image_pos_len=10))
    (implicit,) = flf2v.encode([row])
    (explicit,) = flf2v.encode([dict(row, end_image=row["video"][:, -1])])
    assert implicit["clip_feature"].shape == (10, 128) and implicit.keys() == explicit.keys()
    for key in implicit:
        assert torch.equal(implicit[key], explicit[key]), key


def test_flf2v_validation_and_pipeline_need_both_frames(i2v):
    """An FLF2V DiT's CLIP positions are for two images: one frame is refused by name, at setup and in the pipeline,
    rather than as a token-count mismatch inside the DiT."""
    task, pipe = i2v
    first, last = frames(13, count=2)
    flf2v = WanTrainingTask(task.pipe, dit_config=replace(task.dit_config, image_pos_len=10))
    assert flf2v.reference_arguments([first, last]) == {"input_image": first, "end_image": last}
    with pytest.raises(ConfigError, match="FLF2V DiT draws each sample between a first and a last frame"):
        flf2v.reference_arguments([first])
    flf2v_pipe = types.SimpleNamespace(
        dit=types.SimpleNamespace(config=replace(pipe.dit.config, image_pos_len=10)),
        image_encoder=pipe.image_encoder,
        _image_list=pipe._image_list,
    )
    firsts, lasts = WanVideoPipeline.check_images(flf2v_pipe, first, last, 1)
    assert len(firsts) == len(lasts) == 1
    with pytest.raises(ConfigError, match=r"FLF2V\): pass end_image"):
        WanVideoPipeline.check_images(flf2v_pipe, first, None, 1)
    assert WanVideoPipeline.check_images(pipe, first, None, 1)[1] is None  # plain I2V: the last frame is optional


# ----------------------------------------------------------------------------------------- (d) TI2V's loss
def test_ti2v_loss_leaves_out_the_first_latent_frame(ti2v):
    trainer = pytest.importorskip("diffsynth.training.trainer")
    task, _ = ti2v
    batch = task.collate(task.encode([{"prompt": PROMPTS[0], "video": as_video(frames(9, size=64))}]))
    config = pytest.importorskip("diffsynth.training.config").TrainConfig(
        min_timestep_boundary=0.0, max_timestep_boundary=1.0, loss_weighting="scheduler"
    )  # the trainer's defaults for the rest (uniform timesteps, no masks)
    predictions = []
    real_velocity = task.velocity

    def recording(dit, batch, noisy, sigma):
        out = real_velocity(dit, batch, noisy, sigma)
        out.retain_grad()
        predictions.append(out)
        return out

    run = types.SimpleNamespace(config=config, task=types.SimpleNamespace(**vars(task)))
    run.task.velocity, run.task.loss_mask, run.task.scheduler = recording, task.loss_mask, task.scheduler
    dit = task.models["dit"]
    dit.requires_grad_(True)
    try:
        loss = trainer.flow_matching_loss(run, dit, batch, torch.Generator().manual_seed(5))
        loss.backward()
    finally:
        dit.requires_grad_(False)
        dit.zero_grad(set_to_none=True)
    grad = predictions[0].grad
    assert torch.count_nonzero(grad[:, :, :1]) == 0 and torch.count_nonzero(grad[:, :, 1:]) == grad[:, :, 1:].numel()

    # DiffSynth-Studio's loss: MSE over the frames after the first, with the clean first frame in the input
    g = torch.Generator().manual_seed(5)
    x0 = batch["latents"]
    sigma = task.scheduler.sample_training_sigmas(1, g)
    noise = torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        predicted = task.velocity(dit, batch, (1 - sigma) * x0 + sigma * noise, sigma)
    expected = (predicted - (noise - x0))[:, :, 1:].pow(2).mean() * task.scheduler.training_weight(sigma)
    torch.testing.assert_close(loss.detach(), expected[0], rtol=1e-5, atol=1e-6)

    # what the first frame of x0 holds never matters: the model gets the given frame, the loss skips it
    changed = dict(batch, latents=torch.cat([torch.randn_like(x0[:, :, :1]), x0[:, :, 1:]], dim=2))
    run.task.velocity = real_velocity
    with torch.no_grad():
        again = trainer.flow_matching_loss(run, dit, changed, torch.Generator().manual_seed(5))
    assert torch.equal(again, loss.detach())


# ----------------------------------------------------------------------------------------- (e) A14B experts
def test_a14b_experts_draw_sigmas_only_in_their_range(tiny_repo_factory):
    repo = tiny_repo_factory("i2v_a14b")
    high = load_task(repo, keep=lambda c: "low_noise" not in str(c.path), encoders=False)
    low = load_task(repo, keep=lambda c: "high_noise" not in str(c.path), encoders=False)
    assert isinstance(high.scheduler, ExpertScheduler) and isinstance(low.scheduler, ExpertScheduler)
    assert (high.scheduler.expert, low.scheduler.expert) == ("high", "low")
    assert high.scheduler.boundary == low.scheduler.boundary == EXPERT_BOUNDARY["i2v"] == 0.9
    g = torch.Generator().manual_seed(0)
    drawn_high = high.scheduler.sample_training_sigmas(20000, g)
    drawn_low = low.scheduler.sample_training_sigmas(20000, g)
    assert (drawn_high >= 0.9).all() and (drawn_low < 0.9).all()
    # together they draw every grid point: the range is split at the boundary, nothing is lost
    grid = high.scheduler.train_sigmas
    assert len(set(drawn_high.tolist()) | set(drawn_low.tolist())) == len(grid) == 1000
    # DiffSynth-Studio's scripts train the I2V experts with --max/--min_timestep_boundary 0.358 (shift 5)
    assert high.scheduler.expert_span() == (0, 358) and low.scheduler.expert_span() == (358, 1000)
    # the user's --min/max_timestep_boundary narrow the expert's range further
    narrowed = high.scheduler.sample_training_sigmas(500, g, min_boundary=0.1, max_boundary=0.9)
    assert (narrowed >= 0.9).all() and (narrowed <= grid[100]).all()
    with pytest.raises(ConfigError, match="min_timestep_boundary 0.5.*high-noise expert"):
        high.scheduler.sample_training_sigmas(1, g, min_boundary=0.5)


def test_a14b_expert_from_the_folder_or_the_option(tiny_repo_factory):
    repo = tiny_repo_factory("a14b")
    low = load_task(repo, keep=lambda c: "high_noise" not in str(c.path), encoders=False)
    assert low.scheduler.expert == "low" and low.scheduler.boundary == EXPERT_BOUNDARY["t2v"] == 0.875
    assert low.scheduler.expert_span() == (417, 1000)  # DiffSynth-Studio's T2V A14B scripts: 0.417
    g = torch.Generator().manual_seed(1)
    assert (low.scheduler.sample_training_sigmas(2000, g) < 0.875).all()
    forced = load_task(repo, keep=lambda c: "high_noise" not in str(c.path), encoders=False, expert="high")
    assert (forced.scheduler.sample_training_sigmas(2000, g) >= 0.875).all()
    folder = WanTrainingTask.from_pretrained(  # the expert's folder itself given (--model_paths a folder)
        [ModelConfig(path=str(repo / "low_noise_model"))], torch_dtype="float32", device="cpu", encoders=False
    )
    assert folder.scheduler.expert == "low" and set(folder.models) == {"dit"}
    with pytest.raises(ConfigError, match="direct_distill: a Wan 2.2 A14B expert samples only part"):
        folder.inference_sigmas((1, 16, 1, 4, 4), 4)
    # validation samples likewise: the trainer checks `reference_arguments` at setup ("required")
    assert folder.validation_references == "required"
    with pytest.raises(ConfigError, match="validation_prompts: a Wan 2.2 A14B expert samples only part"):
        folder.reference_arguments([])
    plain = load_task(tiny_repo_factory("t2v"), encoders=False)  # Wan 2.1: the whole range
    assert type(plain.scheduler).__name__ == "FlowMatchScheduler"
    with pytest.raises(ConfigError, match="train one expert at a time"):
        load_task(repo, encoders=False)
    with pytest.raises(ConfigError, match="expert='x'"):
        load_task(repo, keep=lambda c: "high_noise" not in str(c.path), encoders=False, expert="x")
    with pytest.raises(ConfigError, match="not a Wan 2.2 A14B expert"):
        load_task(tiny_repo_factory("ti2v"), encoders=False, expert="high")


# ----------------------------------------------------------------------------------------- (f) errors
def test_clear_errors(i2v, tiny_repo_factory, tiny_repo):
    task, _ = i2v
    video = as_video(frames(10))
    with pytest.raises(ConfigError, match=r"row 0: input_image is the path 'first.png'.*--data_file_keys"):
        task.encode([{"prompt": "x", "video": video, "input_image": "first.png"}])
    with pytest.raises(ConfigError, match=r"row 0: end_image must be an image \[3, H, W\]"):
        task.encode([{"prompt": "x", "video": video, "end_image": video}])
    assert task.validation_references == "required"  # the trainer refuses --validation_prompts without images
    t2v = load_task(tiny_repo, encoders=True, denoiser=False)
    with pytest.raises(ConfigError, match="row 0 has input_image.*text-to-video"):
        t2v.encode([{"prompt": "x", "video": video, "input_image": video[:, 0]}])
    # Fun Control's columns on a DiT without its control channels: refused by name, not ignored
    control = {"control_video": video, "reference_image": video[:, 0]}
    with pytest.raises(ConfigError, match="row 0 has control_video, reference_image, but this 't2v' Wan DiT is not a"):
        t2v.encode([{"prompt": "x", "video": video, **control}])
    with pytest.raises(ConfigError, match="row 0 has control_video, but this 'i2v' Wan DiT is not a Fun Control"):
        task.encode([{"prompt": "x", "video": video, "control_video": video}])
    ti2v = load_task(tiny_repo_factory("ti2v"), denoiser=False, first_frame=True)
    with pytest.raises(ConfigError, match="row 0 has an end_image; Wan2.2-TI2V"):
        ti2v.encode([{"prompt": "x", "video": video, "end_image": video[:, 0]}])
    with pytest.raises(ConfigError, match="row 0 is a single frame with an input_image"):
        ti2v.encode([{"prompt": "x", "image": video[:, 0], "input_image": video[:, 0]}])
    repo = tiny_repo_factory("i2v")
    with pytest.raises(ConfigError, match="takes CLIP image features: add the image encoder"):
        load_task(repo, keep=lambda c: "clip" not in str(c.path))
    with pytest.raises(ConfigError, match="needs the DiT's files"):
        load_task(repo, keep=lambda c: "diffusion_pytorch_model" not in str(c.path), denoiser=False)


# ----------------------------------------------------------------------------------------- (b, c) the trainer
def video_dataset(folder: Path, size: int) -> Path:
    """Two 5-frame mp4 videos of a square moving across a plain background."""
    from diffsynth.training.testing import write_video_dataset

    videos = []
    for background, square in [((20, 40, 200), (230, 30, 30)), ((10, 10, 10), (40, 220, 60))]:
        pictures = np.empty((5, size, size, 3), dtype=np.uint8)
        pictures[:] = background
        for f in range(5):
            pictures[f, size // 4 : size // 2, f * size // 8 : f * size // 8 + size // 3] = square
        videos.append(pictures)
    return write_video_dataset(folder, PROMPTS, videos)


def train_config(repo, dataset, output, size, **overrides):
    from diffsynth.training.testing import overfit_config

    values = dict(num_frames=5, max_pixels=size * size, bucket_step=size, trainable_models=["dit"], max_steps=10)
    return overfit_config(repo, "wan", dataset, output, noise=(0.45, 0.55), **{**values, **overrides})


@pytest.mark.integration
@pytest.mark.parametrize("kind, size, steps", [("i2v", 32, 10), ("ti2v", 64, 16)])
def test_trainer_overfits_two_videos(tiny_repo_factory, tmp_path, kind, size, steps):
    """Full fine-tuning at a narrow noise band; seeded: i2v 4.47 -> 2.02, ti2v 171 -> 55.9 (mean of the last 3)."""
    testing = pytest.importorskip("diffsynth.training.testing")
    dataset = video_dataset(tmp_path, size)
    options = {"task_options": {"first_frame": True}} if kind == "ti2v" else {}  # TI2V trained image-to-video
    config = train_config(tiny_repo_factory(kind), dataset, tmp_path / "out", size, max_steps=steps, **options)
    testing.assert_overfits(*testing.train_and_log(config), steps=steps, last=3)


@pytest.mark.integration
def test_i2v_cached_training_gives_the_online_losses(tiny_repo_factory, tmp_path):
    testing = pytest.importorskip("diffsynth.training.testing")
    repo, dataset = tiny_repo_factory("i2v"), video_dataset(tmp_path, 32)
    settings = dict(max_steps=3, trainable_models=[], lora_rank=4, learning_rate=1e-2)
    runs = testing.train_direct_and_cached(train_config(repo, dataset, tmp_path, 32, **settings))
    assert set(runs.cached_item(0)) == {"latents", "text", "y", "clip_feature"}
    online, cached = runs.losses()
    assert cached == pytest.approx(online, rel=1e-5)


# ----------------------------------------------------------------------------------------- validation samples
def test_i2v_validation_samples_are_the_pipeline_with_the_same_frames(i2v):
    """`sample` (the trainer's --validation_images) draws what the pipeline draws from the same first (and last)
    frame, seed and size; the frames matter (another first frame gives another video); none is an error."""
    task, pipe = i2v
    first, other, last = frames(11, count=3)
    references = [[first], [first, last]]
    size = {"height": 32, "width": 32, "num_frames": 5, "num_inference_steps": 2, "cfg_scale": 1.0}
    size.update(tiled=False, output_type="np")
    assert task.validation_references == "required"
    with torch.no_grad():
        drawn = task.sample(task.models["dit"], PROMPTS, seed=3, references=references, **size)
        moved = task.sample(task.models["dit"], PROMPTS[:1], seed=3, references=[[other]], **size)
        for prompt, images, ours in zip(PROMPTS, references, drawn, strict=True):
            ends = {"end_image": images[1]} if len(images) == 2 else {}
            theirs = pipe(prompt, input_image=images[0], seed=3, progress_bar=False, **ends, **size)
            assert ours.shape == (1, 5, 32, 32, 3) and np.abs(ours - theirs).max() <= 1e-5
    assert np.abs(moved[0] - drawn[0]).max() > 1e-4  # deterministic: ignored frames would give 0
    with pytest.raises(ConfigError, match="Wan I2V validation needs --validation_images"):
        task.sample(task.models["dit"], PROMPTS[:1], seed=3, **size)
    with pytest.raises(ConfigError, match="3 reference images for one Wan validation sample"):
        task.reference_arguments([first, other, last])


def test_ti2v_and_t2v_validation_references(ti2v, tiny_repo):
    task, _ = ti2v
    first = frames(12, count=1)[0]
    assert task.validation_references == "expected"
    assert task.reference_arguments([first]) == {"input_image": first} and task.reference_arguments([]) == {}
    with pytest.raises(ConfigError, match="takes a first frame only"):
        task.reference_arguments([first, first])
    t2v = load_task(tiny_repo, encoders=False)
    assert t2v.validation_references == "none"
    with pytest.raises(ConfigError, match="text-to-video and takes no reference images"):
        t2v.reference_arguments([first])
