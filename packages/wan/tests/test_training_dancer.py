"""Wan-Dancer training: a row's conditions are the pipeline's (`check_dancer_call` + `dancer_conditions`, recorded
while the pipeline generates), the model call is the pipeline's per-step DiT call, a DiT LoRA trained by the real
trainer loads into `WanVideoPipeline`, and the rows and validation samples it cannot take are refused by name.

librosa is not installed in the test environment: the music features of a file come from a seeded stand-in for
`music_features_from_file`, patched where both the pipeline and the task read it (`check_dancer_call`), so the
comparison covers everything after the feature extraction. The tiny dancer DiT is test_dancer.py's.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.media import pil_to_tensor
from diffsynth.wan import WanVideoPipeline, dancer
from diffsynth.wan.training import WanTrainingTask

from . import conftest as C
from . import test_dancer as D

HEIGHT, WIDTH = D.HEIGHT, D.WIDTH  # 8 tokens a latent frame: one per music slot
FILES = ["dancer/global_model.safetensors", C.T5_FILE, "Wan2.1_VAE.pth", C.CLIP_FILE]
PROMPTS = C.CAPTIONS[:2]


def fake_features(path) -> torch.Tensor:
    """Seeded `[frames, 35]` features of a file (its bytes choose the seed; its first byte the length)."""
    data = Path(path).read_bytes()
    seed = int(hashlib.sha256(data).hexdigest()[:8], 16)
    return torch.randn(data[0], dancer.MUSIC_FEATURES, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def no_librosa(monkeypatch):
    monkeypatch.setattr(dancer, "music_features_from_file", fake_features)


def write_music(path: Path, frames: int, seed: int) -> str:
    """A stand-in music file: `frames` feature frames (30 a second) for `fake_features`."""
    path.write_bytes(bytes([frames]) + torch.randint(0, 256, (64,), generator=torch.Generator().manual_seed(seed))
                     .to(torch.uint8).numpy().tobytes())  # fmt: skip
    return str(path)


@pytest.fixture(scope="module")
def dancer_repo(tmp_path_factory) -> Path:
    """The tiny Wan-Dancer repo of test_dancer.py: the I2V repo's encoders and VAE, a 10-block dancer DiT."""
    root = C.build_tiny_repo(tmp_path_factory.mktemp("tiny-wan-dancer-train"), "i2v")
    D.save_tiny_dit(root / "dancer", seed=5, image_dim=C.TINY_CLIP["hidden_size"], text_dim=C.TINY_UMT5["d_model"],
                    text_len=512, num_layers=10, music_inject_layers=(0, 9))  # fmt: skip
    return root


@pytest.fixture(scope="module")
def task(dancer_repo) -> WanTrainingTask:
    configs = [ModelConfig(path=str(dancer_repo / f)) for f in FILES]
    tokenizer = ModelConfig(path=str(dancer_repo / C.TOKENIZER_DIR))
    return WanTrainingTask.from_pretrained(configs, tokenizer_config=tokenizer, torch_dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def music_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("music")
    for i, frames in enumerate((5, 5, 20)):  # 5 video frames at 30 fps, and at 7.5
        write_music(folder / f"music{i}.wav", frames, seed=i)
    return folder


def video(seed: int):
    return pil_to_tensor([D.image(seed + i) for i in range(5)]).transpose(0, 1)  # [3, 5, H, W]


def row(music_dir: Path, k: int = 0, *, fps=30.0, mask=(1, 0, 0, 0, 1), reference=True, **extra) -> dict:
    """A local-model row (DiffSynth-Studio's columns, loaded as the dataset loads its files)."""
    out = {
        "prompt": PROMPTS[k % 2], "video": video(10 * k), "wantodance_music_path": str(music_dir / f"music{k}.wav"),
        "wantodance_fps": fps, "wantodance_keyframes": pil_to_tensor(D.keyframes(list(mask), 30 + k)).transpose(0, 1),
        "wantodance_keyframes_mask": list(mask),
    }  # fmt: skip
    if reference:
        out["wantodance_reference_image"] = pil_to_tensor(D.image(90 + k))[0]
    return {**out, **extra}


def pipeline_arguments(r: dict) -> dict:
    """The pipeline's arguments for the same row."""
    from diffsynth.runtime.media import tensor_to_pil

    ref = r.get("wantodance_reference_image")
    return dict(
        wantodance_music_path=r["wantodance_music_path"], wantodance_fps=float(r["wantodance_fps"]),
        wantodance_reference_image=None if ref is None else tensor_to_pil(ref)[0],
        wantodance_keyframes=tensor_to_pil(r["wantodance_keyframes"].transpose(0, 1)),
        wantodance_keyframes_mask=list(r["wantodance_keyframes_mask"]),
    )  # fmt: skip


def pipeline_call(pipe, r: dict, noisy: torch.Tensor, sigma: float, monkeypatch=None, **changes):
    """The pipeline's DiT output at its one step from `noisy` at `sigma` (no guidance) and the conditions it built."""
    seen, built = [], []
    velocity = dancer.dancer_velocity

    def spy(dit, x, timestep, context, cond, skip_blocks=()):
        built.append((context, cond))
        out = velocity(dit, x, timestep, context, cond, skip_blocks)
        seen.append(out.detach().clone())
        return out

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dancer, "dancer_velocity", spy)
        pipe(
            r["prompt"], latents=noisy, sigmas=[sigma], height=HEIGHT, width=WIDTH, num_frames=5, cfg_scale=1.0,
            tiled=False, progress_bar=False, output_type="pt", **{**pipeline_arguments(r), **changes},
        )  # fmt: skip
    return seen[0], built[0]


# ----------------------------------------------------------------------------------------- (a) the encoded sample
def test_encoded_sample_is_the_pipelines_preparation(task, music_dir):
    """Each row's conditions equal those the pipeline hands its DiT for the same music, reference image, keyframes,
    mask and fps at the video's size (local 30 fps with a reference image; 7.5 fps without one); the latents are the
    VAE's of the video and the text the pipeline's prompt states."""
    pipe = task.pipe
    rows = [row(music_dir, 0), row(music_dir, 1, fps=7.5, mask=(1, 0, 0, 0, 0), reference=False)]
    samples = task.encode(rows)
    noisy = torch.randn(1, 16, 2, 4, 8, generator=torch.Generator().manual_seed(0))
    for r, sample in zip(rows, samples, strict=True):
        _, (context, cond) = pipeline_call(pipe, r, noisy, 0.7)
        expected = {"clip_feature": cond.clip_feature[0], "y": cond.y[0], "music_feature": cond.music_feature}
        if cond.refimage_feature is not None:
            expected["refimage_feature"] = cond.refimage_feature[0]
        assert sample.keys() == {"latents", "text", "wantodance_fps", *expected}
        for key, value in expected.items():
            assert torch.equal(sample[key], value), key
        assert torch.equal(sample["music_feature"], fake_features(r["wantodance_music_path"]))
        assert float(sample["wantodance_fps"]) == cond.fps == r["wantodance_fps"]
        torch.testing.assert_close(sample["text"], context[0], rtol=0, atol=1e-5)  # encoded two prompts at once
        latents = pipe.vae.encode(r["video"][None])[0]
        assert torch.equal(sample["latents"], latents) and sample["latents"].shape == (16, 2, 4, 8)
    assert sample["y"][:4, 0].min() == 1 and sample["y"][:4, 1].max() == 0  # the mask: keyframe 0 only


# ----------------------------------------------------------------------------------------- (b) the model call
def test_velocity_is_the_pipelines_dit_call_and_needs_music_and_keyframes(task, music_dir):
    """`velocity` on an encoded batch equals the pipeline's DiT output at its first step from the same latents and
    sigma (both fps kinds); other music or other keyframes change it; a gradient reaches the DiT's blocks."""
    pipe = task.pipe
    rows = [row(music_dir, 0), row(music_dir, 1, mask=(1, 0, 1, 0, 0))]
    batch = task.collate(task.encode(rows))
    noisy = torch.randn(2, 16, 2, 4, 8, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.8, 0.35])
    dit = task.models["dit"]
    with torch.no_grad():
        ours = task.velocity(dit, batch, noisy, sigma)
        worst = 0.0
        for k, r in enumerate(rows):
            theirs, _ = pipeline_call(pipe, r, noisy[k : k + 1], float(sigma[k]))
            torch.testing.assert_close(ours[k : k + 1], theirs, rtol=1e-5, atol=1e-5)
            worst = max(worst, float((ours[k : k + 1] - theirs).abs().max()))
        slow = row(music_dir, 2, fps=7.5, reference=False)  # the global modules and the spread time line
        one = task.collate(task.encode([slow]))
        theirs, _ = pipeline_call(pipe, slow, noisy[:1], 0.5)
        torch.testing.assert_close(
            task.velocity(dit, one, noisy[:1], torch.tensor([0.5])), theirs, rtol=1e-5, atol=1e-5
        )
        silent = task.velocity(dit, {**batch, "music_feature": torch.zeros_like(batch["music_feature"])}, noisy, sigma)
        assert (silent - ours).abs().max() > 1e-4
        other = task.collate(task.encode([row(music_dir, 0, mask=(1, 0, 0, 0, 0)), rows[1]]))
        assert (task.velocity(dit, {**batch, "y": other["y"]}, noisy, sigma) - ours)[0].abs().max() > 1e-4
    assert worst <= 1e-5
    dit.requires_grad_(True)
    try:
        task.velocity(dit, batch, noisy, sigma).square().mean().backward()
        assert all(p.grad is not None for p in dit.blocks.parameters())
        assert all(p.grad is not None for p in dit.music_encoder.parameters())
    finally:
        dit.requires_grad_(False).zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------------------- (d) refusals
BAD_ROWS = [
    ({"wantodance_music_path": None}, "row 0 has no wantodance_music_path"),
    ({"wantodance_music_path": "nowhere.wav"}, r"wantodance_music_path='nowhere.wav' is not a file.*--data_file_keys"),
    ({"wantodance_keyframes": None}, "row 0 has no wantodance_keyframes:"),
    ({"wantodance_keyframes": "key.mp4"}, "wantodance_keyframes is the path 'key.mp4'.*--data_file_keys"),
    ({"wantodance_keyframes_mask": None}, "row 0 has no wantodance_keyframes_mask"),
    ({"wantodance_keyframes_mask": [1, 0, 0]}, "row 0: wantodance_keyframes_mask has 3 values; num_frames=5"),
    ({"wantodance_keyframes_mask": "1 0 2 0 0"}, "row 0: wantodance_keyframes_mask must hold only 0 and 1"),
    ({"wantodance_fps": "fast"}, "row 0: wantodance_fps='fast' is not a number"),
    ({"wantodance_fps": -1}, r"row 0: wantodance_fps=-1.0 must be a positive number"),
    ({"wantodance_reference_image": "ref.png"}, "wantodance_reference_image is the path 'ref.png'"),
    ({"framewise_decoding": True}, "row 0 has framewise_decoding: the global model's frame-by-frame recipe"),
    ({"input_image": pil_to_tensor(D.image(3))[0]}, "input_image, but Wan-Dancer takes its dancer as wantodance_ref"),
    ({"vap_video": video(4)}, "row 0 has vap_video, but it needs the Video-As-Prompt expert"),
    ({"motion_bucket_id": 3}, "row 0 has motion_bucket_id, but motion_bucket_id needs DiffSynth-Studio's speed"),
    ({"video": video(0)[..., :32]}, r"height=32, width=32: a latent frame has 2 x 2 = 4 tokens"),
]


@pytest.mark.parametrize(("change", "message"), BAD_ROWS)
def test_rows_that_cannot_train_are_refused_by_column(task, music_dir, change, message):
    with pytest.raises(ConfigError, match=message):
        task.encode([row(music_dir, 0, **change)])


def test_validation_samples_mixed_batches_and_other_dits_are_refused(task, music_dir, tiny_repo_factory):
    assert task.validation_references == "required"
    with pytest.raises(ConfigError, match="validation samples of a Wan-Dancer model follow music and keyframes"):
        task.reference_arguments([])
    with pytest.raises(ConfigError, match="mixes rows with and without wantodance_reference_image"):
        task.collate(task.encode([row(music_dir, 0), row(music_dir, 1, reference=False)]))
    with pytest.raises(ConfigError, match=r"mixes music_feature shapes \[\(5, 35\), \(20, 35\)\]: .*music of one"):
        task.collate(task.encode([row(music_dir, 0), row(music_dir, 2)]))
    batch = task.collate(task.encode([row(music_dir, 0), row(music_dir, 1, fps=7.5)]))
    with pytest.raises(ConfigError, match=r"a Wan-Dancer batch mixes wantodance_fps \[7.5, 30.0\]"):
        task.velocity(task.models["dit"], batch, torch.randn(2, 16, 2, 4, 8), torch.tensor([0.5, 0.5]))
    t2v = WanTrainingTask(WanVideoPipeline.from_pretrained(str(tiny_repo_factory("t2v")), torch_dtype="float32",
                                                           device="cpu"))  # fmt: skip
    plain = {"prompt": "a dance", "video": torch.zeros(3, 1, 32, 32), "wantodance_music_path": "music.wav"}
    with pytest.raises(ConfigError, match="wantodance_music_path, but this Wan DiT is not Wan-Dancer"):
        t2v.encode([plain])


# ----------------------------------------------------------------------------------------- (c) the trainer
@pytest.fixture(scope="module")
def dancer_folder(dancer_repo, tmp_path_factory) -> Path:
    """The repo as Wan-AI/Wan-Dancer-14B lays it out: the dancer DiT beside the encoders and VAE, no other DiT."""
    root = tmp_path_factory.mktemp("wan-dancer-folder")
    for name in (C.T5_FILE, "Wan2.1_VAE.pth", C.CLIP_FILE):
        shutil.copy(dancer_repo / name, root / name)
    shutil.copytree(dancer_repo / C.TOKENIZER_DIR, root / C.TOKENIZER_DIR)
    for name in ("global_model.safetensors", "config.json"):
        shutil.copy(dancer_repo / "dancer" / name, root / name)
    return root


@pytest.mark.integration
def test_trainer_trains_a_dit_lora_that_loads_into_the_pipeline(dancer_folder, tmp_path, monkeypatch):
    """DiffSynth-Studio's local recipe (`--data_file_keys video,wantodance_reference_image,wantodance_keyframes,
    wantodance_music_path`: the music read by the task from the absolute path the dataset hands on;
    a LoRA on q,k,v,o,ffn.0,ffn.2) for 2 steps: the saved LoRA, loaded into `WanVideoPipeline`, changes its Wan-Dancer
    velocity to the trained model's."""
    testing = pytest.importorskip("diffsynth.training.testing")
    from diffsynth.runtime.media import save_image, save_video
    from diffsynth.training import trainer

    data = tmp_path / "data"
    data.mkdir()
    rows = []
    for i, prompt in enumerate(PROMPTS):
        save_video([D.image(10 * i + j) for j in range(5)], data / f"clip{i}.mp4", fps=30)
        save_video(D.keyframes(D.MASK, 30 + i), data / f"keys{i}.mp4", fps=30)
        save_image(D.image(90 + i), data / f"ref{i}.png")
        write_music(data / f"music{i}.wav", 5, seed=i)  # relative in the metadata, as DiffSynth-Studio's
        rows.append({"video": f"clip{i}.mp4", "prompt": prompt, "wantodance_reference_image": f"ref{i}.png",
                     "wantodance_keyframes": f"keys{i}.mp4", "wantodance_keyframes_mask": D.MASK,
                     "wantodance_fps": 30, "wantodance_music_path": f"music{i}.wav"})  # fmt: skip
    dataset = testing.write_metadata(data, rows)
    built = []
    build_task = trainer.build_task

    def keep(*args, **kwargs):
        built.append(build_task(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(trainer, "build_task", keep)
    config = testing.tiny_config(
        dancer_folder, "wan", dataset, tmp_path / "out", num_frames=5, height=HEIGHT, width=WIDTH, batch_size=1,
        data_file_keys=["video", "wantodance_reference_image", "wantodance_keyframes", "wantodance_music_path"],
        lora_base_model="dit",
        lora_target_modules=["q", "k", "v", "o", "ffn.0", "ffn.2"], max_steps=2,
    )  # fmt: skip
    state = trainer.train(config)
    assert state.step == 2
    (task,) = built
    lora_file = tmp_path / "out" / "step-000002.safetensors"
    saved = load_file(str(lora_file))
    assert saved and all("lora" in k for k in saved)

    pipe = WanVideoPipeline.from_pretrained(str(dancer_folder), torch_dtype="float32", device="cpu")
    music_dir = tmp_path / "eval"
    music_dir.mkdir()
    write_music(music_dir / "music0.wav", 5, seed=7)
    r = row(music_dir, 0)
    noisy = torch.randn(1, 16, 2, 4, 8, generator=torch.Generator().manual_seed(4))
    before, _ = pipeline_call(pipe, r, noisy, 0.6)
    pipe.load_lora(str(lora_file))
    after, _ = pipeline_call(pipe, r, noisy, 0.6)
    with torch.no_grad():
        ours = task.velocity(task.models["dit"], task.collate(task.encode([r])), noisy, torch.tensor([0.6]))
    torch.testing.assert_close(after, ours, rtol=1e-5, atol=1e-5)
    assert (after - before).abs().max() > 1e-6
