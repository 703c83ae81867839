"""`LTX2TrainingTask` on the tiny random repo: its encodings are the pipeline's (prompt, video VAE, audio VAE
over the mel front end), its velocity is the pipeline's per-step prediction on the same noisy latents, a
clip without sound trains its video alone, the authors' noise levels, validation samples, and the errors."""

from __future__ import annotations

import math

import diffsynth_ltx2_test_repo as repo_module  # loaded by conftest
import numpy as np
import pytest
import torch

from diffsynth.ltx2.audio_vae import mel_spectrogram, pack_latents
from diffsynth.ltx2.pipeline import LTX2Text, pack_video
from diffsynth.ltx2.training import LTX2TimestepSampler, LTX2TrainingTask
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.hub import ModelConfig

CAPTIONS = repo_module.CAPTIONS
F, H, W = repo_module.FRAMES, repo_module.HEIGHT, repo_module.WIDTH
MAX_LEN = repo_module.MAX_SEQUENCE_LENGTH
RATE = 16000  # the audio VAE's


def model_configs(base) -> list[ModelConfig]:
    gemma = base / repo_module.GEMMA_REPO
    return [
        ModelConfig(path=str(base / repo_module.LTX_REPO / repo_module.SINGLE_FILE)),
        ModelConfig(path=sorted(str(p) for p in gemma.glob("model*.safetensors"))),
    ]


@pytest.fixture(scope="module")
def task(tiny_ltx2_base) -> LTX2TrainingTask:
    return LTX2TrainingTask.from_pretrained(
        model_configs(tiny_ltx2_base), torch_dtype=torch.float32, device="cpu", max_sequence_length=MAX_LEN
    )


def clip(seed: int, frames: int = F, seconds: float | None = None, rate: int = RATE) -> dict:
    """A row: random frames in [-1, 1] and (unless `seconds` is 0) a seeded stereo noise waveform."""
    g = torch.Generator().manual_seed(seed)
    row = {"prompt": CAPTIONS[seed % 3], "video": torch.rand(3, frames, H, W, generator=g) * 2 - 1}
    seconds = frames / 24 if seconds is None else seconds
    if seconds:
        row.update(audio=0.3 * torch.randn(2, int(seconds * rate), generator=g), audio_sample_rate=rate)
    return row


# ----------------------------------------------------------------------------------- encodings
def test_encodings_are_the_pipelines(task, tiny_ltx2_pipe):
    """Video tokens = the pipeline's packed VAE latents, contexts = `encode_prompt`, audio tokens = the audio
    VAE over `mel_spectrogram` of the clip's span, cut to `audio_latent_shape`'s length."""
    pipe = tiny_ltx2_pipe
    rows = [clip(0), clip(1, frames=17, seconds=0.3)]  # the second's sound is short: zero-padded
    rows[1]["frame_rate"] = 12.5
    samples = task.encode(rows)
    text = pipe.encode_prompt([r["prompt"] for r in rows], MAX_LEN)
    for i, (row, sample) in enumerate(zip(rows, samples, strict=True)):
        frames, fps = row["video"].shape[1], float(row.get("frame_rate", 24.0))
        video = pipe.vae.encode(row["video"][None])
        length = pipe.audio_latent_shape(1, frames, fps)[2]
        span = int(frames / fps * RATE)
        waveform = torch.nn.functional.pad(row["audio"], (0, max(0, span - row["audio"].shape[1])))[:, :span]
        audio = pipe.audio_vae.encode(mel_spectrogram(waveform[None], RATE, pipe.audio_vae.config))[:, :, :length]
        expected = torch.cat([pack_video(video)[0], pack_latents(audio)[0]])
        torch.testing.assert_close(sample["latents"], expected, rtol=0, atol=1e-6)
        assert sample["latents"].shape[0] == video[0, 0].numel() + length
        assert sample["video_shape"].tolist() == list(video.shape[2:])
        assert sample["audio_shape"].tolist() == list(audio.shape[1:])
        assert sample["frame_rate"].item() == fps and sample["audio_weight"].item() == 1.0
        torch.testing.assert_close(sample["text_video"], text.video[i], rtol=0, atol=0)
        torch.testing.assert_close(sample["text_audio"], text.audio[i], rtol=0, atol=0)


@pytest.mark.parametrize(("frames", "fps"), [(1, 24.0), (9, 24.0), (17, 25.0), (9, 8.0), (17, 23.976)])
def test_the_sound_covers_the_pipelines_audio_length(task, tiny_ltx2_pipe, frames, fps):
    """However long the given sound, the audio tokens are as many as the pipeline generates for the clip."""
    rows = [{**clip(2, frames=frames, seconds=seconds), "frame_rate": fps} for seconds in (0.05, frames / fps, 2.5)]
    for sample in task.encode(rows):
        expected = tiny_ltx2_pipe.audio_latent_shape(1, frames, fps)[2]
        assert sample["audio_shape"][1].item() == expected
        assert sample["latents"].shape[0] == sample["video_shape"].prod().item() + expected


def test_sound_at_another_rate_is_resampled(task):
    """A 440 Hz tone given at 48 kHz encodes (nearly) as the same tone given at 16 kHz."""
    t48, t16 = (torch.arange(int(F / 24 * r)) / r for r in (48000, RATE))
    rows = [clip(3, seconds=0), clip(3, seconds=0)]
    rows[0].update(audio=0.5 * torch.sin(2 * math.pi * 440 * t48)[None], audio_sample_rate=48000)
    rows[1].update(audio=0.5 * torch.sin(2 * math.pi * 440 * t16)[None], audio_sample_rate=RATE)
    a, b = (s["latents"] for s in task.encode(rows))
    assert (a - b).abs().max() < 0.05 * b.abs().max()
    tone = torch.sin(2 * math.pi * 1000 * t16)[None]  # another tone: far off
    rows[1]["audio"] = tone
    assert (a - task.encode(rows)[1]["latents"]).abs().max() > 0.2 * b.abs().max()


def test_an_image_row_is_a_one_frame_clip_without_sound(task, tiny_ltx2_pipe):
    g = torch.Generator().manual_seed(5)
    image = torch.rand(3, H, W, generator=g) * 2 - 1
    sample = task.encode([{"prompt": CAPTIONS[0], "image": image}])[0]
    video = tiny_ltx2_pipe.vae.encode(image[None, :, None])
    split = video[0, 0].numel()
    torch.testing.assert_close(sample["latents"][:split], pack_video(video)[0], rtol=0, atol=1e-6)
    assert sample["audio_weight"].item() == 0.0 and (sample["latents"][split:] == 0).all()
    assert sample["frame_rate"].item() == 24.0


# ----------------------------------------------------------------------------------- the model call
def test_velocity_is_the_pipelines_prediction(task, tiny_ltx2_pipe):
    """On the same noisy latents and noise levels, the task's joined velocity is the pipeline's `predict`
    (its per-step call without guidance), sample by sample, video and audio."""
    pipe = tiny_ltx2_pipe
    samples = task.encode([clip(6), clip(7)])
    batch = task.collate(samples)
    g = torch.Generator().manual_seed(8)
    noisy = torch.randn(batch["latents"].shape, generator=g)
    sigma = torch.tensor([0.3, 0.8])
    got = task.velocity(pipe.dit, batch, noisy, sigma)
    f, h, w = samples[0]["video_shape"].tolist()
    channels, length, bins = samples[0]["audio_shape"].tolist()
    text = pipe.encode_prompt([CAPTIONS[0], CAPTIONS[1]], MAX_LEN)
    for i in range(2):
        video = noisy[i, : f * h * w].T.reshape(1, -1, f, h, w)
        audio = noisy[i, f * h * w :].reshape(length, channels, bins).transpose(0, 1)[None]
        one = LTX2Text(
            text.video[i : i + 1], text.audio[i : i + 1], None if text.mask is None else text.mask[i : i + 1]
        )
        v_video, v_audio = pipe.predict(video, audio, sigma[i], one, 24.0, False, 1.0, 1.0, 0.0)
        expected = torch.cat([pack_video(v_video)[0], pack_latents(v_audio)[0]])
        torch.testing.assert_close(got[i], expected, rtol=0, atol=2e-5)


def test_a_clip_without_sound_trains_its_video_alone(task, tiny_ltx2_pipe):
    """A silent clip's audio is out of the loss and its video prediction ignores the audio stream (the
    authors' video-only training); a clip with sound hears it."""
    silent, sounding = clip(9, seconds=0), clip(9)
    batch = task.collate(task.encode([silent, sounding]))
    split = int(batch["video_shape"][0].prod())
    mask = task.loss_mask(batch).expand_as(batch["latents"])
    assert mask[0, split:].sum() == 0 and mask[1, split:].sum() > 0
    torch.testing.assert_close(mask.sum((1, 2)), torch.tensor([1.0, 2.0]))  # each stream: its own mean
    g = torch.Generator().manual_seed(10)
    noisy = torch.randn(batch["latents"].shape, generator=g)
    louder = noisy.clone()
    louder[:, split:] += 3 * torch.randn(louder[:, split:].shape, generator=g)
    sigma = torch.tensor([0.6, 0.6])
    before, after = (
        task.velocity(task.pipe.dit, batch, noisy, sigma),
        task.velocity(task.pipe.dit, batch, louder, sigma),
    )
    torch.testing.assert_close(after[0, :split], before[0, :split], rtol=0, atol=1e-6)
    assert (after[1, :split] - before[1, :split]).abs().max() > 1e-3


def test_with_audio_none_and_required(tiny_ltx2_base):
    none = LTX2TrainingTask.from_pretrained(
        model_configs(tiny_ltx2_base),
        torch_dtype=torch.float32,
        device="cpu",
        with_audio="none",
        max_sequence_length=MAX_LEN,
    )
    assert none.encode([clip(11)])[0]["audio_weight"].item() == 0.0
    required = LTX2TrainingTask(none.pipe, with_audio="required", max_sequence_length=MAX_LEN)
    assert required.encode([clip(11)])[0]["audio_weight"].item() == 1.0
    with pytest.raises(ConfigError, match="has no sound, and with_audio='required'"):
        required.encode([clip(11, seconds=0)])
    with pytest.raises(ConfigError, match="with_audio='loud' is not accepted"):
        LTX2TrainingTask(none.pipe, with_audio="loud")


def test_first_frame_conditioning_is_the_pipelines_image_to_video(tiny_ltx2_base, tiny_ltx2_pipe):
    """`first_frame=True`: the velocity is the pipeline's image-to-video prediction (the latent of the first
    frame, encoded alone by `prepare_image_condition`, in place; its denoise mask), the given frame is out of
    the loss, and its noisy tokens do not matter."""
    pipe = tiny_ltx2_pipe
    task = LTX2TrainingTask(pipe, first_frame=True, max_sequence_length=MAX_LEN)
    g = torch.Generator().manual_seed(17)
    pixels = torch.randint(0, 256, (3, F, H, W), generator=g, dtype=torch.uint8)
    row = {**clip(17), "video": pixels.float() / 127.5 - 1}  # 8-bit frames, as the dataset reads them
    batch = task.collate(task.encode([row]))
    f, h, w = batch["video_shape"][0].tolist()
    noisy = torch.randn(batch["latents"].shape, generator=g)
    sigma = torch.tensor([0.5])
    got = task.velocity(pipe.dit, batch, noisy, sigma)

    from diffsynth.runtime.media import tensor_to_pil

    video = noisy[:, : f * h * w].transpose(1, 2).reshape(1, -1, f, h, w)
    video, mask = pipe.prepare_image_condition(video, tensor_to_pil(row["video"][:, 0]), H, W, crf=0)
    audio = noisy[0, f * h * w :].reshape(-1, 2, 4).transpose(0, 1)[None]
    text = pipe.encode_prompt([row["prompt"]], MAX_LEN)
    v_video, v_audio = pipe.predict(video, audio, sigma, text, 24.0, False, 1.0, 1.0, 0.0, denoise_mask=mask)
    torch.testing.assert_close(got[0], torch.cat([pack_video(v_video)[0], pack_latents(v_audio)[0]]), rtol=0, atol=2e-5)

    weights = task.loss_mask(batch)[0, :, 0]
    assert (weights[: h * w] == 0).all() and (weights[h * w : f * h * w] > 0).all()
    moved = noisy.clone()
    moved[:, : h * w] += 5.0
    torch.testing.assert_close(task.velocity(pipe.dit, batch, moved, sigma), got, rtol=0, atol=1e-6)
    assert task.validation_references == "expected"
    assert task.reference_arguments(["first.png"]) == {"input_image": "first.png"}
    image = task.collate(task.encode([{"prompt": "x", "image": row["video"][:, 0]}]))  # one frame: an image
    assert (task.loss_mask(image)[0, : h * w] > 0).all()
    with pytest.raises(ConfigError, match="first_frame='yes' is not accepted"):
        LTX2TrainingTask(pipe, first_frame="yes")


# ----------------------------------------------------------------------------------- noise levels
def test_the_authors_noise_levels():
    """Seeded, inside (0, 1], unweighted, later for longer videos (the shift follows the token count), the
    uniform mode flat, and the boundaries squeeze the draw into [1 - max, 1 - min]."""
    sampler = LTX2TimestepSampler()
    medians = []
    for tokens in (256, 1024, 4096, 8192):
        sampler.tokens = tokens
        draw = sampler.sample_training_sigmas(20000, torch.Generator().manual_seed(0))
        again = sampler.sample_training_sigmas(20000, torch.Generator().manual_seed(0))
        assert torch.equal(draw, again) and draw.dtype == torch.float32
        assert draw.min() > 0 and draw.max() <= 1
        medians.append(draw.median().item())
    assert medians == sorted(medians) and medians[-1] - medians[0] > 0.2
    sampler.tokens = 4096
    draw = sampler.sample_training_sigmas(20000, torch.Generator().manual_seed(1))
    mu = LTX2TimestepSampler.shift(4096)  # sigmoid(N(mu, 1)) stretched: its median maps sigmoid(mu)
    low, high = (1 / (1 + math.exp(-(mu + p))) for p in (-2.5758, 3.0902))
    assert draw.median().item() == pytest.approx((1 / (1 + math.exp(-mu)) - low) / (high - low), abs=0.02)
    squeezed = sampler.sample_training_sigmas(
        5000, torch.Generator().manual_seed(2), min_boundary=0.2, max_boundary=0.5
    )
    assert squeezed.min() >= 0.5 and squeezed.max() <= 0.8
    uniform = LTX2TimestepSampler("uniform").sample_training_sigmas(20000, torch.Generator().manual_seed(3))
    assert np.histogram(uniform.numpy(), bins=5, range=(0, 1))[0].min() > 3700
    assert torch.equal(sampler.training_weight(draw[:7]), torch.ones(7))
    with pytest.raises(ConfigError, match="timestep_sampling='beta'"):
        LTX2TimestepSampler("beta")


def test_collate_sets_the_token_count_of_the_batch(task):
    batch = task.collate(task.encode([clip(12, frames=17)]))
    assert task.scheduler.tokens == int(batch["video_shape"][0].prod()) == 3 * 2 * 2


# ----------------------------------------------------------------------------------- validation samples
def test_validation_samples_are_the_pipelines_frames_and_sound(task, tiny_ltx2_pipe):
    options = dict(height=H, width=W, num_frames=F, num_inference_steps=2)
    drawn = task.sample(task.pipe.dit, [CAPTIONS[0]], seed=4, **options)
    frames, sound = tiny_ltx2_pipe(
        CAPTIONS[0], seed=4, cfg_scale=1.0, stg_scale=0.0, modality_scale=1.0, max_sequence_length=MAX_LEN,
        progress_bar=False, **options,
    )  # fmt: skip
    assert len(drawn) == 1 and len(drawn[0][0]) == F
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(drawn[0][0], frames, strict=True))
    waveform, sample_rate = drawn[0][1]
    assert sample_rate == sound.sample_rate and torch.equal(waveform, sound.waveform)


# ----------------------------------------------------------------------------------- errors
def test_clear_errors(task):
    with pytest.raises(ConfigError, match=r"8 frames; LTX-2 needs 8k \+ 1 frames .* e\.g\. 1\)"):
        task.encode([clip(13, frames=8)])
    row = clip(13)
    row["video"] = row["video"][:, :, :48]
    with pytest.raises(ConfigError, match="64x48; LTX-2 needs multiples of 32"):
        task.encode([row])
    with pytest.raises(ConfigError, match="audio is the path 'a.wav'.*--data_file_keys video,audio"):
        task.encode([{**clip(13, seconds=0), "audio": "a.wav"}])
    with pytest.raises(ConfigError, match=r"mono or stereo waveform \[channels, samples\], got \(3, 100\)"):
        task.encode([{**clip(13, seconds=0), "audio": torch.zeros(3, 100)}])
    with pytest.raises(ConfigError, match="frame_rate 'fast' is not a positive number"):
        task.encode([{**clip(13), "frame_rate": "fast"}])
    with pytest.raises(ConfigError, match="rows with a video .* and a prompt"):
        task.encode([{"prompt": "x"}])
    a, b = task.encode([clip(14), {**clip(15), "frame_rate": 25.0}])  # as many audio tokens
    with pytest.raises(ConfigError, match="mixes frame_rate"):
        task.collate([a, b])
    with pytest.raises(ConfigError, match="mixes latents"):
        task.collate([a, task.encode([clip(16, frames=17)])[0]])
    encoders_only = LTX2TrainingTask(task.pipe, max_sequence_length=MAX_LEN)
    with encoders_only.pipe.using("vae", None), pytest.raises(ConfigError, match=r"without \['vae'\]"):
        encoders_only.encode([clip(13)])


def test_each_stage_loads_only_its_models_from_the_single_file(tiny_ltx2_base):
    """The encode stage builds the encoders (and the vocoder, for validation samples) without the DiT, the
    training stage the DiT alone, though one file holds all of them (the real DiT is 19B parameters)."""
    configs = model_configs(tiny_ltx2_base)
    options = dict(torch_dtype=torch.float32, device="cpu", max_sequence_length=MAX_LEN)
    encode = LTX2TrainingTask.from_pretrained(configs, denoiser=False, **options)
    loaded = {slot for slot in encode.pipe.model_slots if getattr(encode.pipe, slot) is not None}
    assert loaded == {"vae", "audio_vae", "connectors", "text_encoder", "vocoder"}
    train = LTX2TrainingTask.from_pretrained(configs, encoders=False, **options)
    assert {slot for slot in train.pipe.model_slots if getattr(train.pipe, slot) is not None} == {"dit"}
