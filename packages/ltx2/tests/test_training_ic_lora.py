"""IC-LoRA training (DiffSynth-Studio's LTX-2 / LTX-2.3 IC-LoRA recipes: `--data_file_keys
video,input_audio,in_context_videos`) on the tiny random repo: a row's control videos are encoded as the pipeline's
`encode_references` encodes them (tokens and positions, at factor 1 and 2), the task's velocity is the target part
of the pipeline's per-step prediction with those clean reference tokens appended, the errors name the column or
flag at fault, and (`integration`) the trainer trains an IC-LoRA which the pipeline loads and which changes what
it draws from a control video."""

from __future__ import annotations

import diffsynth_ltx2_test_repo as repo_module  # loaded by conftest
import numpy as np
import pytest
import torch

from diffsynth.ltx2.audio_vae import pack_latents
from diffsynth.ltx2.in_context import encode_references
from diffsynth.ltx2.pipeline import LTX2Keyframes, LTX2Text, pack_video
from diffsynth.ltx2.training import LTX2TrainingTask, reference_positions
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.media import tensor_to_pil

CAPTIONS = repo_module.CAPTIONS
F, H, W = repo_module.FRAMES, repo_module.HEIGHT, repo_module.WIDTH  # 9 frames, 64 x 64: 2 x 2 x 2 latents
MAX_LEN = repo_module.MAX_SEQUENCE_LENGTH
RATE = 16000


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls: intra-op threads only add scheduling overhead on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def task(tiny_ltx2_base) -> LTX2TrainingTask:
    gemma = tiny_ltx2_base / repo_module.GEMMA_REPO
    configs = [
        ModelConfig(path=str(tiny_ltx2_base / repo_module.LTX_REPO / repo_module.SINGLE_FILE)),
        ModelConfig(path=sorted(str(p) for p in gemma.glob("model*.safetensors"))),
    ]
    return LTX2TrainingTask.from_pretrained(
        configs, torch_dtype=torch.float32, device="cpu", max_sequence_length=MAX_LEN
    )


def pixels(seed: int, frames: int = F) -> torch.Tensor:
    """`[3, F, H, W]` 8-bit frames in [-1, 1], as the dataset reads a video column at the clip's size."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, frames, H, W), generator=g, dtype=torch.uint8).float() / 127.5 - 1


def row(seed: int, controls, factor=None, sound: bool = True) -> dict:
    out = {"prompt": CAPTIONS[seed % 3], "video": pixels(seed), "in_context_videos": controls}
    if factor is not None:
        out["in_context_downsample_factor"] = factor
    if sound:
        g = torch.Generator().manual_seed(100 + seed)
        out.update(audio=0.3 * torch.randn(2, int(F / 24 * RATE), generator=g), audio_sample_rate=RATE)
    return out


def frames_of(video: torch.Tensor) -> list:
    """A `[3, F, H, W]` control video as the PIL frames a pipeline user passes."""
    return tensor_to_pil(video.transpose(0, 1))


# ----------------------------------------------------------------------------------- encodings
@pytest.mark.parametrize("factor", [1, 2])
def test_encoded_references_are_the_pipelines(task, tiny_ltx2_pipe, factor):
    """Two control videos (the second 17 frames long: cut to the clip's 9) encode to the tokens and positions
    `encode_references` gives the pipeline for the same frames at a 64 x 64, 9-frame, 25 fps clip; the factor is a
    CSV cell's string. The clip's own latents are unchanged by them."""
    controls = [pixels(20), pixels(21, frames=17)]
    sample = task.encode([{**row(1, controls, str(factor)), "frame_rate": 25.0}])[0]
    tokens, coords = encode_references(tiny_ltx2_pipe, [frames_of(c) for c in controls], H, W, F, 25.0, factor)
    side = 2 // factor  # latent rows and columns of the reference (the clip's are 2 x 2)
    assert sample["reference_tokens"].shape == tokens[0].shape == (2 * 2 * side * side, 8)  # 2 videos, 2 frames each
    diff = (sample["reference_tokens"] - tokens[0]).abs().max().item()
    print(f"reference tokens at factor {factor}: max abs diff {diff:.3g}")
    assert diff <= 1e-6
    assert sample["reference_grid"].tolist() == [[2, side, side]] * 2
    assert sample["reference_factor"].tolist() == [factor]
    got = reference_positions(tiny_ltx2_pipe.dit.config, sample["reference_grid"].tolist(), factor, 25.0)
    torch.testing.assert_close(got, coords, rtol=0, atol=0)
    plain = task.encode([{**row(1, None), "frame_rate": 25.0}])[0]
    torch.testing.assert_close(sample["latents"], plain["latents"], rtol=0, atol=0)
    assert "reference_tokens" not in plain


# ----------------------------------------------------------------------------------- the model call
def test_velocity_is_the_target_part_of_the_pipelines_prediction(task, tiny_ltx2_pipe):
    """A batch of two rows, each with its own control video at factor 2: on the same noisy latents and noise
    levels, the task's velocity (video and audio) is, row by row, the pipeline's `predict` with that row's
    references (from `encode_references`) as the clean tokens after the video's; the references are outside the
    trained latents; without them (or with another control video) the prediction differs."""
    pipe = tiny_ltx2_pipe
    controls = [pixels(30), pixels(31)]
    samples = task.encode([row(6, [controls[0]], 2), row(7, [controls[1]], 2)])
    batch = task.collate(samples)
    f, h, w = samples[0]["video_shape"].tolist()
    channels, length, bins = samples[0]["audio_shape"].tolist()
    assert batch["latents"].shape[1] == f * h * w + length  # the target only: the loss never sees a reference
    g = torch.Generator().manual_seed(8)
    noisy = torch.randn(batch["latents"].shape, generator=g)
    sigma = torch.tensor([0.3, 0.8])
    got = task.velocity(pipe.dit, batch, noisy, sigma)
    text = pipe.encode_prompt([CAPTIONS[0], CAPTIONS[1]], MAX_LEN)
    worst = 0.0
    for i in range(2):
        video = noisy[i, : f * h * w].T.reshape(1, -1, f, h, w)
        audio = noisy[i, f * h * w :].reshape(length, channels, bins).transpose(0, 1)[None]
        one = LTX2Text(
            text.video[i : i + 1], text.audio[i : i + 1], None if text.mask is None else text.mask[i : i + 1]
        )
        references = LTX2Keyframes(*encode_references(pipe, [frames_of(controls[i])], H, W, F, 24.0, 2))
        v_video, v_audio = pipe.predict(video, audio, sigma[i], one, 24.0, False, 1.0, 1.0, 0.0, keyframes=references)
        expected = torch.cat([pack_video(v_video)[0], pack_latents(v_audio)[0]])
        worst = max(worst, (got[i] - expected).abs().max().item())
    print(f"IC-LoRA velocity vs the pipeline's prediction: max abs diff {worst:.3g}")
    assert worst <= 1e-5
    bare = {k: v for k, v in batch.items() if not k.startswith("reference_")}
    assert (task.velocity(pipe.dit, bare, noisy, sigma) - got)[:, : f * h * w].abs().max() > 1e-3
    swapped = {**batch, "reference_tokens": batch["reference_tokens"].flip(0)}
    assert (task.velocity(pipe.dit, swapped, noisy, sigma) - got)[:, : f * h * w].abs().max() > 1e-3
    torch.testing.assert_close(task.loss_mask(batch), task.loss_mask(bare), rtol=0, atol=0)


def test_rows_without_sound_and_first_frame_conditioning_keep_working(task, tiny_ltx2_pipe):
    """A silent row with a control video trains its video alone (audio out of the loss); with `first_frame` the
    clean first latent frame and the references condition together, the first frame out of the loss."""
    batch = task.collate(task.encode([row(9, [pixels(40)], sound=False)]))
    split = int(batch["video_shape"][0].prod())
    assert batch["audio_weight"].item() == 0.0 and task.loss_mask(batch)[0, split:].sum() == 0
    i2v = LTX2TrainingTask(tiny_ltx2_pipe, first_frame=True, max_sequence_length=MAX_LEN)
    batch = i2v.collate(i2v.encode([row(10, [pixels(41)])]))
    noisy = torch.randn(batch["latents"].shape, generator=torch.Generator().manual_seed(3))
    moved = noisy.clone()
    moved[:, :4] += 5.0  # the first latent frame's 2 x 2 tokens: replaced by the clean frame
    sigma = torch.tensor([0.5])
    torch.testing.assert_close(
        i2v.velocity(tiny_ltx2_pipe.dit, batch, moved, sigma), i2v.velocity(tiny_ltx2_pipe.dit, batch, noisy, sigma)
    )
    assert (i2v.loss_mask(batch)[0, :4] == 0).all()


# ----------------------------------------------------------------------------------- errors
def test_clear_errors(task, tiny_ltx2_pipe):
    with pytest.raises(ConfigError, match=r"in_context_videos is the path 'c\.mp4'.*--data_file_keys video,in_context"):
        task.encode([row(11, "c.mp4")])
    with pytest.raises(ConfigError, match=r"in_context_videos is the path 'b\.mp4'"):
        task.encode([row(11, [pixels(1), "b.mp4"])])
    with pytest.raises(ConfigError, match="in_context_downsample_factor '1.5' is not accepted; use an integer"):
        task.encode([row(11, [pixels(1)], "1.5")])
    with pytest.raises(ConfigError, match="in_context_downsample_factor 0 is not accepted"):
        task.encode([row(11, [pixels(1)], 0)])
    with pytest.raises(ConfigError, match=r"in_context_downsample_factor=4 does not divide the 64x64 clip.*of 32"):
        task.encode([row(11, [pixels(1)], 4)])
    with pytest.raises(ConfigError, match=r"in_context_videos video must be \[3, F, H, W\], got \(1, 9, 64, 64\)"):
        task.encode([row(11, [torch.zeros(1, F, H, W)])])
    with pytest.raises(ConfigError, match="each in_context_videos entry"):
        task.encode([row(11, [7])])
    with pytest.raises(ConfigError, match="in_context_downsample_factor=2.5 is not accepted"):
        LTX2TrainingTask(tiny_ltx2_pipe, in_context_downsample_factor=2.5)
    with_reference, without = task.encode([row(12, [pixels(2)]), row(13, None)])
    with pytest.raises(ConfigError, match="mixes rows with and without in_context_videos.*--batch_size 1"):
        task.collate([with_reference, without])
    half = task.encode([row(14, [pixels(3)], 2)])[0]
    with pytest.raises(ConfigError, match=r"mixes IC-LoRA reference factors \[1, 2\] \(the rows' in_context_down"):
        task.collate([with_reference, half])  # the factor, not the latent grids it sets, is named


def test_the_task_option_sets_the_factor_of_rows_without_one(tiny_ltx2_pipe):
    halving = LTX2TrainingTask(tiny_ltx2_pipe, in_context_downsample_factor=2, max_sequence_length=MAX_LEN)
    given, unset = halving.encode([row(15, [pixels(4)], 1), row(15, [pixels(4)], "")])
    assert given["reference_factor"].item() == 1 and unset["reference_factor"].item() == 2
    assert unset["reference_tokens"].shape[0] * 4 == given["reference_tokens"].shape[0]


# ----------------------------------------------------------------------------------- the trainer
@pytest.mark.integration
def test_ic_lora_training_with_the_command_line(tiny_ltx2_base, tmp_path, monkeypatch):
    """DiffSynth-Studio's IC-LoRA recipe on two mp4 clips with control mp4s at factor 2 (`metadata.csv`,
    `--data_file_keys video,in_context_videos`): two steps, directly and from the cache (same losses; the cached
    sample holds the half-size reference); without the column in `--data_file_keys` the run is refused by name;
    the LoRA loads into the pipeline as an IC-LoRA and changes what it draws from a control video."""
    testing = pytest.importorskip("diffsynth.training.testing")
    from safetensors.torch import load_file

    from diffsynth.ltx2.pipeline import LTX2Pipeline
    from diffsynth.runtime.media import save_video
    from diffsynth.training.trainer import train

    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(tiny_ltx2_base))
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "1")
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(2):
        save_video(list(rng.integers(0, 256, (F, H, W, 3), dtype=np.uint8)), data / f"clip{i}.mp4", fps=24)
        save_video(list(rng.integers(0, 256, (F, H, W, 3), dtype=np.uint8)), data / f"depth{i}.mp4", fps=24)
        rows.append({"video": f"clip{i}.mp4", "prompt": CAPTIONS[i], "in_context_videos": f"depth{i}.mp4"})
        rows[-1]["in_context_downsample_factor"] = 2
    dataset = testing.write_metadata(data, rows)
    flags = ["--data_file_keys", "video,in_context_videos", "--num_frames", str(F), "--bucket_step", "32"]
    flags += ["--num_epochs", "9", "--task_options", f"max_sequence_length={MAX_LEN}"]
    trainer = testing.CliTrainer("Lightricks/LTX-2", "ltx2", dataset, *flags)
    direct, cached = trainer.direct_and_cached(tmp_path / "runs")
    assert len(direct) == 2 and all(np.isfinite(direct)) and direct[0] > 0
    assert cached == pytest.approx(direct, rel=1e-5)  # the cache keeps the references
    item = load_file(str(tmp_path / "runs" / "cache" / "items" / "000000.safetensors"))
    assert item["reference_grid"].tolist() == [[2, 1, 1]] and item["reference_factor"].item() == 2
    unread = testing.tiny_config(
        "Lightricks/LTX-2", "ltx2", dataset, tmp_path / "unread", data_file_keys=["video"], num_frames=F,
        bucket_step=32, task_options={"max_sequence_length": MAX_LEN},
    )  # fmt: skip
    with pytest.raises(ConfigError, match="in_context_videos is the path 'depth0.mp4'"):
        train(unread)
    pipe = LTX2Pipeline.from_pretrained("Lightricks/LTX-2", torch_dtype="float32", device="cpu")
    control = [frame.resize((W // 2, H // 2)) for frame in frames_of(pixels(50))]
    call = dict(
        in_context_videos=[control], in_context_downsample_factor=2, height=H, width=W, num_frames=F, seed=0,
        num_inference_steps=2, cfg_scale=1.0, stg_scale=0.0, modality_scale=1.0, max_sequence_length=MAX_LEN,
        output_type="pt", progress_bar=False,
    )  # fmt: skip
    lora = tmp_path / "runs" / "direct" / "step-000002.safetensors"
    from diffsynth.ltx2.in_context import lora_reference_downscale_factor

    assert lora_reference_downscale_factor(lora) == 2  # the factor it trained at, in the authors' header key
    (base, _), (after, _) = testing.outputs_before_and_after_lora(pipe, lora, CAPTIONS[0], {"fuse": False}, **call)
    assert after.shape == base.shape == (1, 3, F, H, W)
    assert (after - base).abs().max() > 1e-4
