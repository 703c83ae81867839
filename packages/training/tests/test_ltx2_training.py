"""LTX-2 (video + audio) trained end to end by the trainer on the tiny random model base of the ltx2 tests
(`ltx2/tests/ltx2_repo.py`), through its preset `--model Lightricks/LTX-2` with downloads off.

The clips are 9-frame 64x64 mp4s at 24 fps with a tone muxed in (the dataset reads their tracks), one of them
silent where a test says so. Overfitting lowers the loss; the cached two-stage mode trains the same weights
as the direct one; the LoRA it writes is applied exactly by `LTX2Pipeline.load_lora` (our file and the peft
one with ComfyUI / diffusers names) and by diffusers' `LTX2Pipeline.load_lora_weights`; the command line
trains too. Prompts are 16 tokens (`max_sequence_length=16`) to keep the runs fast.

Integration: needs diffsynth-ltx2 installed (the `integration` nox session installs every package); the diffusers
check runs in the `parity` session, which has every package and diffusers.
"""

import math
from pathlib import Path

import pytest

pytest.importorskip("diffsynth.ltx2")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from diffsynth.ltx2.pipeline import LTX2Pipeline, ltx2_velocity  # noqa: E402
from diffsynth.runtime.errors import ConfigError  # noqa: E402
from diffsynth.runtime.media import mux_video_audio, save_video  # noqa: E402
from diffsynth.training.data import batch_plan  # noqa: E402
from diffsynth.training.testing import (  # noqa: E402
    CliTrainer,
    assert_overfits,
    assert_same_training,
    load_module,
    overfit_config,
    tiny_config,
    train_and_log,
    train_direct_and_cached,
    write_metadata,
)
from diffsynth.training.trainer import TrainState, save, setup, train, train_step  # noqa: E402

PRESET = "Lightricks/LTX-2"
TOKENS = 16
FRAMES, SIZE, FPS = 9, 64, 24
PROMPTS = ["a cat plays the piano and sings", "waves crash on a rocky beach at dawn"]
SETTINGS = dict(
    num_frames=FRAMES,
    max_pixels=SIZE * SIZE,
    bucket_step=32,
    num_epochs=1000,
    task_options={"max_sequence_length": TOKENS},
)


def _repo_module():
    return load_module(Path(__file__).parents[2] / "ltx2" / "tests" / "ltx2_repo.py", "ltx2_tiny_repo")


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    return _repo_module().build_tiny_base(tmp_path_factory.mktemp("tiny-ltx2"))


@pytest.fixture(autouse=True)
def offline_preset(tiny_base, monkeypatch):
    """`Lightricks/LTX-2` resolves to the tiny base, without downloads."""
    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(tiny_base))
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "1")


def write_clips(folder: Path, sound: tuple[bool, ...] = (True, True)) -> Path:
    """Mp4 clips of a square moving over a plain background, with a tone (220 Hz, 660 Hz, ...) muxed in
    where `sound` says so."""
    rows = []
    for i, voiced in enumerate(sound):
        frames = np.empty((FRAMES, SIZE, SIZE, 3), dtype=np.uint8)
        frames[:] = (20 + 150 * i, 40, 200 - 150 * i)
        for f in range(FRAMES):
            frames[f, 16:40, 4 + 3 * f : 28 + 3 * f] = (230, 200 - 150 * i, 30)
        path = folder / f"clip{i}.mp4"
        if voiced:
            t = np.arange(int(48000 * FRAMES / FPS) + 4800) / 48000
            tone = np.stack([0.4 * np.sin(2 * math.pi * 220 * (2 * i + 1) * t)] * 2)
            mux_video_audio(list(frames), tone, 48000, path, fps=FPS)
        else:
            save_video(list(frames), path, fps=FPS)
        rows.append({"video": path.name, "prompt": PROMPTS[i % 2]})
    return write_metadata(folder, rows)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_clips(tmp_path_factory.mktemp("clips"))


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls: intra-op threads only add scheduling overhead on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def config(dataset, output, **overrides):
    return tiny_config(PRESET, "ltx2", dataset, output, **{**SETTINGS, **overrides})


def probe(pipe: LTX2Pipeline, seed: int = 3):
    """Noisy video and audio latents of the clips' shapes, a noise level and a prompt's contexts."""
    g = torch.Generator().manual_seed(seed)
    video, audio = torch.randn(1, 8, 2, 2, 2, generator=g), torch.randn(1, 2, 9, 4, generator=g)
    return video, audio, torch.tensor([0.7]), pipe.encode_prompt(PROMPTS[:1], TOKENS)


@pytest.mark.integration  # the trainer with every package: the integration session
def test_full_finetune_overfits_two_clips_with_sound(dataset, tmp_path):
    """Full fine-tuning at a narrow noise band lowers the joint video + audio loss (seeded: 78.4 -> 13.3, the
    mean of the last 4 of 16 steps; 0.17-0.27 of the first over seeds 0-2)."""
    cfg = overfit_config(PRESET, "ltx2", dataset, tmp_path, noise=(0.45, 0.55), trainable_models=["dit"],
                         learning_rate=5e-3, max_steps=16, **SETTINGS)  # fmt: skip
    state, curve = train_and_log(cfg)
    assert_overfits(state, curve, steps=16, last=4)


@pytest.mark.integration  # the trainer with every package: the integration session
def test_the_lora_loads_in_our_pipeline_exactly(dataset, tmp_path):
    run = setup(config(dataset, tmp_path / "out", lora_formats=["diffsynth", "peft"]))
    assert run.task.family == "ltx2" and run.task.max_sequence_length == TOKENS
    state = TrainState()
    for batch in batch_plan(run.dataset.batch_keys, batch_size=2):
        state = train_step(run, state, [[run.dataset[i] for i in batch]])
        assert math.isfinite(state.loss) and state.loss > 0
    save(run, state)

    pipe = LTX2Pipeline.from_pretrained(PRESET, torch_dtype="float32", device="cpu")
    video, audio, sigma, text = probe(pipe)
    with torch.no_grad():
        trained = ltx2_velocity(run.model, video, audio, sigma, text)
        base = ltx2_velocity(pipe.dit, video, audio, sigma, text)
        assert all((a - b).abs().max() > 1e-4 for a, b in zip(trained, base, strict=True))  # both streams learned
        for suffix in ("", ".peft"):
            pipe.load_lora(tmp_path / "out" / f"step-000001{suffix}.safetensors", fuse=False, name="trained")
            for got, expected in zip(ltx2_velocity(pipe.dit, video, audio, sigma, text), trained, strict=True):
                torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
            pipe.clear_loras()


@pytest.mark.parity
def test_the_peft_lora_loads_in_diffusers(dataset, tmp_path):
    """diffusers' `LTX2Pipeline.load_lora_weights` reads the `diffusion_model.`-named file as written onto its
    transformer: its prediction moves as ours does with our file. (diffusers' LTX-2 loader refuses `.alpha`
    entries, every key must hold "lora": at the default alpha = rank the file has none.)"""
    pytest.importorskip("diffusers")
    from safetensors.torch import load_file

    train(config(dataset, tmp_path / "out", lora_formats=["diffsynth", "peft"], max_steps=1))
    peft = load_file(str(tmp_path / "out" / "step-000001.peft.safetensors"))
    assert not any(k.endswith(".alpha") for k in peft)
    assert all(k.startswith("diffusion_model.") for k in peft)
    pipe = LTX2Pipeline.from_pretrained(PRESET, torch_dtype="float32", device="cpu")
    reference = _repo_module().reference_pipeline(pipe, Path(pipe.model_configs["dit"].resolve()[0]).parents[2])
    video, audio, sigma, text = probe(pipe)
    before = theirs(reference, pipe, video, audio, sigma, text)
    reference.load_lora_weights(str(tmp_path / "out" / "step-000001.peft.safetensors"))
    pipe.load_lora(tmp_path / "out" / "step-000001.safetensors")
    after = theirs(reference, pipe, video, audio, sigma, text)
    with torch.no_grad():
        ours = ltx2_velocity(pipe.dit, video, audio, sigma, text)
    for b, a, o in zip(before, after, ours, strict=True):
        assert (a - b).abs().max() > 1e-4  # diffusers applied the LoRA
        torch.testing.assert_close(a, o, atol=1e-4, rtol=1e-4)


def theirs(reference, pipe, video, audio, sigma, text):
    """diffusers' transformer on our latents (packed as both pipelines pack them), velocities unpacked."""
    from diffsynth.ltx2.audio_vae import pack_latents, unpack_latents
    from diffsynth.ltx2.pipeline import pack_video, unpack_video

    with torch.no_grad():
        v_video, v_audio = reference.transformer(
            hidden_states=pack_video(video),
            audio_hidden_states=pack_latents(audio),
            encoder_hidden_states=text.video,
            audio_encoder_hidden_states=text.audio,
            timestep=sigma * 1000,
            encoder_attention_mask=text.mask,
            audio_encoder_attention_mask=text.mask,
            num_frames=video.shape[2],
            height=video.shape[3],
            width=video.shape[4],
            fps=FPS,
            audio_num_frames=audio.shape[2],
            return_dict=False,
        )
    return unpack_video(v_video.float(), *video.shape[2:]), unpack_latents(v_audio.float(), audio.shape[3])


@pytest.mark.integration  # the trainer with every package: the integration session
def test_cached_two_stage_training_equals_direct_training(dataset, tmp_path):
    runs = train_direct_and_cached(config(dataset, tmp_path))
    assert runs.state.step == 2
    direct, cached = runs.losses()
    assert cached == pytest.approx(direct, rel=1e-5)
    item = runs.cached_item(0)
    assert item["latents"].shape == (2 * 2 * 2 + 9, 8)  # video tokens, then audio tokens
    assert item["audio_weight"].item() == 1.0 and item["frame_rate"].item() == FPS
    assert_same_training(runs, step=2, atol=1e-6)


@pytest.mark.integration  # the trainer with every package: the integration session
def test_a_silent_clip_trains_its_video_alone(tmp_path):
    """A clip without an audio track trains with its audio out of the loss; with_audio=required refuses it."""
    data = write_clips(tmp_path / "data", sound=(True, False))
    runs = train_direct_and_cached(config(data, tmp_path / "runs", batch_size=1))
    weights = sorted(runs.cached_item(i)["audio_weight"].item() for i in range(2))
    assert weights == [0.0, 1.0]
    direct, cached = runs.losses()
    assert all(math.isfinite(x) and x > 0 for x in direct) and cached == pytest.approx(direct, rel=1e-5)
    options = {"max_sequence_length": TOKENS, "with_audio": "required"}
    with pytest.raises(ConfigError, match="has no sound, and with_audio='required'"):
        train(config(data, tmp_path / "required", batch_size=1, max_steps=2, task_options=options))


@pytest.mark.integration  # the trainer with every package: the integration session
def test_two_processes_with_a_silent_clip_equal_one_process_accumulating(tmp_path):
    """DDP over a clip with sound and one without (one per process): the silent clip's process skips the
    audio->video attentions, whose LoRAs get no gradient there; the task tells DDP so, and the two processes
    train what one process accumulating both clips trains."""
    from diffsynth_training_toy import assert_same_tensors, run_two_processes
    from safetensors.torch import load_file

    from diffsynth.training.testing import TINY_SETTINGS

    data = write_clips(tmp_path / "data", sound=(True, False))
    settings = dict(batch_size=1, max_steps=2, save_steps=2, weight_decay=0.0, num_frames=FRAMES, bucket_step=32)
    train(config(data, tmp_path / "one", gradient_accumulation_steps=2, **settings))
    flags = {**TINY_SETTINGS, **SETTINGS, **settings, "model": PRESET, "family": "ltx2", "dataset_base_path": data}
    run_two_processes(
        tmp_path, {**flags, "task_options": f"max_sequence_length={TOKENS}", "output_path": tmp_path / "ddp"}
    )
    one, ddp = (load_file(str(tmp_path / name / "step-000002.safetensors")) for name in ("one", "ddp"))
    assert max(v.abs().max().item() for k, v in one.items() if "audio_to_video_attn" in k and "lora_B" in k) > 1e-4
    assert_same_tensors(one, ddp)


@pytest.mark.integration  # the trainer with every package: the integration session
def test_validation_samples_are_videos_as_long_as_the_clips(dataset, tmp_path):
    """--validation_prompts draws with the DiT in training, as many frames as the clips (not the preset's 121),
    written with the sound it drew, at the clips' frame rate."""
    import av

    from diffsynth.runtime.media import load_video

    size = {"validation_height": SIZE, "validation_width": SIZE, "validation_num_inference_steps": 2}
    train(config(dataset, tmp_path / "out", max_steps=1, validation_prompts=[PROMPTS[0]], **size))
    path = tmp_path / "out" / "validation" / "step-000001-0.mp4"
    frames = load_video(path)
    assert len(frames) == FRAMES and frames[0].size == (SIZE, SIZE)
    with av.open(str(path)) as container:
        assert float(container.streams.video[0].average_rate) == FPS
        assert container.streams.audio[0].rate == 24000 and container.streams.audio[0].channels == 2


@pytest.mark.integration  # the trainer with every package: the integration session
def test_the_command_line_trains_ltx2(dataset, tmp_path):
    trainer = CliTrainer(PRESET, "ltx2", dataset, "--num_frames", "9", "--bucket_step", "32", "--num_epochs", "9",
                         "--task_options", f"max_sequence_length={TOKENS},timestep_sampling=uniform")  # fmt: skip
    losses = trainer(tmp_path / "out", "--max_steps", "2")
    assert len(losses) == 2 and all(math.isfinite(x) and x > 0 for x in losses)
    assert (tmp_path / "out" / "step-000002.safetensors").is_file()
